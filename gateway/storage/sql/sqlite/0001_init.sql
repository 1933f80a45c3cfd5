-- Initial schema (what each table holds: docs/proxy.md and docs/quotas.md). Money is TEXT holding an exact decimal;
-- the backend registers dec_add / dec_sum so arithmetic on it never goes through
-- a float. Dates are ISO 'YYYY-MM-DD' text and times ISO-8601 text in UTC, both of
-- which sort correctly as strings.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    plan TEXT NOT NULL,
    overrides TEXT NOT NULL DEFAULT '{}',
    lifetime_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    lifetime_completion_tokens INTEGER NOT NULL DEFAULT 0,
    lifetime_tokens INTEGER NOT NULL DEFAULT 0,
    lifetime_cost TEXT NOT NULL DEFAULT '0',
    created_at TEXT NOT NULL
);
CREATE INDEX users_plan_idx ON users (plan);
CREATE INDEX users_lifetime_tokens_idx ON users (lifetime_tokens);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);

CREATE TABLE usage_daily (
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day TEXT NOT NULL,
    queries INTEGER NOT NULL DEFAULT 0,
    advanced_rag INTEGER NOT NULL DEFAULT 0,
    web_searches INTEGER NOT NULL DEFAULT 0,
    uploads INTEGER NOT NULL DEFAULT 0,
    upload_bytes INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    cost TEXT NOT NULL DEFAULT '0',
    PRIMARY KEY (user_id, day)
) WITHOUT ROWID;
CREATE INDEX usage_daily_day_idx ON usage_daily (day);

CREATE TABLE usage_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    answer_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day TEXT NOT NULL,
    created_at TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    conversation_id TEXT,
    request_id TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    cost TEXT NOT NULL DEFAULT '0',
    currency TEXT NOT NULL DEFAULT 'USD',
    outcome TEXT NOT NULL,
    estimated INTEGER NOT NULL DEFAULT 0,
    web_searches INTEGER NOT NULL DEFAULT 0,
    upstream_latency_ms REAL,
    overhead_ms REAL
);
CREATE INDEX usage_events_day_idx ON usage_events (day, seq);
CREATE INDEX usage_events_user_day_idx ON usage_events (user_id, day, seq);

CREATE TABLE notifications (
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (user_id, kind, period, threshold)
);
