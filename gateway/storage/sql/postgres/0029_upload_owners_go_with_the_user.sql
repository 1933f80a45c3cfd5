-- A user's uploads go with the user (0027 kept them past a deletion). The
-- gateway knows a user only by the id it is given (a key's user, a token's
-- claim, a trusted header): a user deleted and later made again under the same
-- id is somebody new, and must not attach the files the old one uploaded
-- (review F9's refusal, docs/security.md). As for the ledger, leases and
-- pending answers (0024-0026), the users table's triggers delete the rows,
-- whoever deletes and however, TRUNCATE included.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- What users deleted before this release left behind: every user that uploads
-- has its row (authentication makes it first), so a row whose user is not
-- there belongs to a deleted one.
DELETE FROM upload_owners o WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = o.user_id);

-- The trigger finds a user's rows by this index, not by reading the table.
CREATE INDEX IF NOT EXISTS upload_owners_user_idx ON upload_owners (user_id);

CREATE OR REPLACE FUNCTION user_deleted_cascade() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM stream_leases WHERE user_id = OLD.id;
    DELETE FROM pending_answers WHERE user_id = OLD.id;
    DELETE FROM usage_events WHERE user_id = OLD.id;
    DELETE FROM upload_owners WHERE user_id = OLD.id;
    RETURN OLD;
END
$$;

CREATE OR REPLACE FUNCTION users_truncated_cascade() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    TRUNCATE stream_leases, pending_answers, usage_events, upload_owners;
    RETURN NULL;
END
$$;
