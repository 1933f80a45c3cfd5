-- Issue 21: a recovered answer's ledger row keeps the per-model counters' keys
-- its pending row counted in (scopes, a JSON array of keys), so that the
-- answer's real record, arriving later, moves those counters by the difference
-- from the estimate as it moves the day row. NULL for every other row.
ALTER TABLE usage_events ADD COLUMN scopes TEXT;
