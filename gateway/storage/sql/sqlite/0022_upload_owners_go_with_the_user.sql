-- A user's uploads go with the user (0020 kept them past a deletion). The
-- gateway knows a user only by the id it is given (a key's user, a token's
-- claim, a trusted header): a user deleted and later made again under the same
-- id is somebody new, and must not attach the files the old one uploaded
-- (review F9's refusal, docs/security.md). A trigger, not a foreign key: it
-- fires with foreign keys off too (the sqlite3 shell's default, where the
-- other tables' cascades do not run), and the table is not rebuilt.

-- What users deleted before this release left behind: every user that uploads
-- has its row (authentication makes it first), so a row whose user is not
-- there belongs to a deleted one.
DELETE FROM upload_owners WHERE user_id NOT IN (SELECT id FROM users);

-- The trigger finds a user's rows by this index, not by reading the table.
CREATE INDEX IF NOT EXISTS upload_owners_user_idx ON upload_owners (user_id);

CREATE TRIGGER IF NOT EXISTS users_deleted_upload_owners AFTER DELETE ON users
BEGIN
    DELETE FROM upload_owners WHERE user_id = OLD.id;
END;
