-- Issue 24: every admission inserts a stream lease and a pending row and its
-- settle deletes them, each in a commit on the event loop. Keyed by a text id
-- in a rowid table, each row lived in two b-trees (the table and the index of
-- its primary key): a page more to change and write to the WAL per table and
-- transaction. WITHOUT ROWID keeps a row in its primary key's b-tree alone.
-- The rows are small (a few hundred bytes), as WITHOUT ROWID wants them.
-- Nothing references these tables: they are rebuilt and the old ones dropped.
CREATE TABLE stream_leases_new (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO stream_leases_new (id, user_id, expires_at)
SELECT id, user_id, expires_at FROM stream_leases
WHERE id IS NOT NULL AND user_id IN (SELECT id FROM users);
DROP TABLE stream_leases;
ALTER TABLE stream_leases_new RENAME TO stream_leases;
CREATE INDEX stream_leases_user_idx ON stream_leases (user_id, expires_at);
CREATE TABLE pending_answers_new (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day TEXT NOT NULL,
    created_at TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    cost TEXT NOT NULL DEFAULT '0',
    currency TEXT NOT NULL DEFAULT 'USD',
    web_searches INTEGER NOT NULL DEFAULT 0,
    reserved_cost TEXT NOT NULL DEFAULT '0',
    rates INTEGER NOT NULL DEFAULT 0,
    scopes TEXT NOT NULL DEFAULT '[]',
    upstream TEXT NOT NULL DEFAULT 'default'
) WITHOUT ROWID;
INSERT INTO pending_answers_new (
    id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens, total_tokens,
    cost, currency, web_searches, reserved_cost, rates, scopes, upstream
)
SELECT
    id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens, total_tokens,
    cost, currency, web_searches, reserved_cost, rates, scopes, upstream
FROM pending_answers
WHERE id IS NOT NULL AND user_id IN (SELECT id FROM users);
DROP TABLE pending_answers;
ALTER TABLE pending_answers_new RENAME TO pending_answers;
CREATE INDEX pending_answers_created_idx ON pending_answers (created_at);
