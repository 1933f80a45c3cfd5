-- Issue 24: an admission inserts its lease and its pending row without a
-- foreign-key check each. Each check is a query of its own (the users row
-- locked FOR KEY SHARE, which a settle's update of that row turns into a
-- multixact): 84,000 of a lone admission's 1,070,000 instructions (7.9%;
-- docs/performance.md). The admission has just found the user, under the
-- user's admission lock, so the checks only ever passed.
--
-- What the keys' ON DELETE CASCADE did, deleting a user (by hand: the gateway
-- never deletes one) still does, by the trigger below. A user deleted while
-- one of its admissions is in flight can leave that admission's rows behind
-- (the checks would have made one of the two wait): a lease then only counts
-- for a user who no longer exists until it expires, and recovery drops a
-- pending row whose user is gone instead of charging an estimate to no one
-- (gateway_recover).
ALTER TABLE stream_leases DROP CONSTRAINT IF EXISTS stream_leases_user_id_fkey;
ALTER TABLE pending_answers DROP CONSTRAINT IF EXISTS pending_answers_user_id_fkey;

-- (Not named gateway_*: migrate() drops and re-creates those, and this one
-- belongs to the trigger, not to the function set.)
CREATE OR REPLACE FUNCTION user_deleted_cascade() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM stream_leases WHERE user_id = OLD.id;
    DELETE FROM pending_answers WHERE user_id = OLD.id;
    RETURN OLD;
END
$$;
DROP TRIGGER IF EXISTS users_deleted ON users;
CREATE TRIGGER users_deleted AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION user_deleted_cascade();
