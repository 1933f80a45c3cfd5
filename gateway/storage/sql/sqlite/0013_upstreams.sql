-- Issue 23: the gateway fronts several named upstreams. The ledger records
-- which one answered, and an answer's pending row the one it was sent to (a
-- recovery charges its estimate to that upstream). Rows written before are the
-- single `[upstream]` table's, the upstream named "default".
ALTER TABLE usage_events ADD COLUMN upstream TEXT NOT NULL DEFAULT 'default';
ALTER TABLE pending_answers ADD COLUMN upstream TEXT NOT NULL DEFAULT 'default';
