-- Issue 23: the gateway fronts several named upstreams. The ledger records
-- which one answered, and an answer's pending row the one it was sent to (a
-- recovery charges its estimate to that upstream). Rows written before are the
-- single `[upstream]` table's, the upstream named "default". A constant
-- default: PostgreSQL adds both columns without rewriting the tables.
--
-- The live functions (sql/postgres/functions/) take the upstream as a last
-- argument with the default 'default', so a gateway of the previous version
-- still calls them during a rolling upgrade (its answers recorded as the
-- default upstream's, which they are).
ALTER TABLE usage_events ADD COLUMN upstream text NOT NULL DEFAULT 'default';
ALTER TABLE pending_answers ADD COLUMN upstream text NOT NULL DEFAULT 'default';
