-- Crash safety: every admitted answer is a pending row from admission until it is
-- settled, refunded or recovered as an estimate (the rules: docs/quotas.md,
-- "Crash safety"; the PostgreSQL migration of the same name explains the
-- exactly-once argument). Written in admission's IMMEDIATE transaction.
CREATE TABLE pending_answers (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day TEXT NOT NULL,
    created_at TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    cost TEXT NOT NULL DEFAULT '0',
    currency TEXT NOT NULL DEFAULT 'USD'
);
CREATE INDEX pending_answers_created_idx ON pending_answers (created_at);
