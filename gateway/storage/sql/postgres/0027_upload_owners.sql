-- Review F9: Dify resolves an answer's `upload_file_id` within the whole
-- workspace, not the end user (Dify 1.x `_build_from_local_file`), so the
-- gateway keeps whose each upload is: the id of every file the upstream
-- accepted through `POST /files/upload` (the 201 body's `id`, a UUID kept in
-- its canonical lower-case form) and the user who uploaded it. An answer naming
-- a file not kept here for its caller is refused 404 (docs/security.md). No
-- user foreign key, as for the ledger (0025): a user's deletion need not wait on
-- this table. The first record of an id wins.
CREATE TABLE upload_owners (
    upload_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    upstream TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
