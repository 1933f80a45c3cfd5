-- What the foreign keys dropped by 0024 and 0025 did, whoever deletes a user and
-- however (review of 0024/0025):
-- - The trigger's function runs as its owner (the role that migrates), with the
--   search_path it was created under: a deleting session with another path
--   emptied same-named tables of another schema, or failed, and a role allowed
--   to delete users needed rights on the three tables too, which the keys'
--   cascades did not ask for.
-- - TRUNCATE users (CASCADE) fires no row trigger: the three tables go with it,
--   as the keys' cascade took them. Else a user made again under the same id
--   met the old pending answers (charged to them by recovery), leases and
--   ledger rows.
-- The path the functions keep (FROM CURRENT): the gateway's schema, then pg_temp
-- named last, as a function run as its owner should have it (else a session's
-- temporary tables of those names would be searched first). For the rest of
-- this migration's transaction only.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE OR REPLACE FUNCTION user_deleted_cascade() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM stream_leases WHERE user_id = OLD.id;
    DELETE FROM pending_answers WHERE user_id = OLD.id;
    DELETE FROM usage_events WHERE user_id = OLD.id;
    RETURN OLD;
END
$$;

CREATE OR REPLACE FUNCTION users_truncated_cascade() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    TRUNCATE stream_leases, pending_answers, usage_events;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS users_truncated ON users;
CREATE TRIGGER users_truncated AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION users_truncated_cascade();
