-- Issue 24: a settle writes its ledger row without a foreign-key check. The
-- check was a query of its own at the end of the insert (the users row locked
-- FOR KEY SHARE): 43,000 of a lone settle's 754,000 instructions (5.7%;
-- docs/performance.md). A settle that records its answer updates the user's
-- row (the lifetime totals) in the same transaction, and now fails as the key
-- did, with its error (foreign_key_violation), when that update finds no row:
-- gateway_settle and gateway_settle_many. That is race-free: a user's delete
-- committed before the update leaves the update nothing to find; one after it
-- waits for the settle's row lock, and then deletes the answer's ledger row
-- with the user's (below). A settle of an answer already recorded writes no
-- ledger row and checked nothing before either.
--
-- What the key's ON DELETE CASCADE did, deleting a user (by hand: the gateway
-- never deletes one) still does, by 0024's trigger, which deletes the user's
-- ledger rows too now.
ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_user_id_fkey;

CREATE OR REPLACE FUNCTION user_deleted_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM stream_leases WHERE user_id = OLD.id;
    DELETE FROM pending_answers WHERE user_id = OLD.id;
    DELETE FROM usage_events WHERE user_id = OLD.id;
    RETURN OLD;
END
$$;

-- The day rows' check of their part (0023's CHECK (part IN (0, 1))) goes too:
-- PostgreSQL parses and compiles a table's CHECK expressions again for every
-- statement that writes the table: 26,000 of a lone settle's instructions
-- (3.5%), and as many of a lone admission's. Only the function set writes
-- the column: each statement the column's default, 0 (admissions, refunds),
-- or a literal 1 (settles, recoveries, releases); a row of another part would
-- still be summed by every reader of the day. (usage_models keeps its check:
-- only plans with per-model limits write it.)
ALTER TABLE usage_daily DROP CONSTRAINT IF EXISTS usage_daily_part_check;
