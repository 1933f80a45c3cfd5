-- Initial schema (what each table holds: docs/proxy.md and docs/quotas.md).
CREATE TABLE users (
    id text PRIMARY KEY,
    plan text NOT NULL,
    overrides jsonb NOT NULL DEFAULT '{}',
    lifetime_prompt_tokens bigint NOT NULL DEFAULT 0,
    lifetime_completion_tokens bigint NOT NULL DEFAULT 0,
    lifetime_tokens bigint NOT NULL DEFAULT 0,
    lifetime_cost numeric NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_plan_idx ON users (plan);
CREATE INDEX users_lifetime_tokens_idx ON users (lifetime_tokens);

CREATE TABLE api_keys (
    id text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_hash text NOT NULL UNIQUE,
    prefix text NOT NULL,
    name text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);

CREATE TABLE usage_daily (
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day date NOT NULL,
    queries bigint NOT NULL DEFAULT 0,
    advanced_rag bigint NOT NULL DEFAULT 0,
    web_searches bigint NOT NULL DEFAULT 0,
    uploads bigint NOT NULL DEFAULT 0,
    upload_bytes bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens bigint NOT NULL DEFAULT 0,
    cost numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);
CREATE INDEX usage_daily_day_idx ON usage_daily (day);

CREATE TABLE usage_events (
    seq bigserial PRIMARY KEY,
    answer_id text NOT NULL UNIQUE,
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day date NOT NULL,
    created_at timestamptz NOT NULL,
    endpoint text NOT NULL,
    conversation_id text,
    request_id text,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens bigint NOT NULL DEFAULT 0,
    cost numeric NOT NULL DEFAULT 0,
    currency text NOT NULL DEFAULT 'USD',
    outcome text NOT NULL,
    estimated boolean NOT NULL DEFAULT false,
    web_searches integer NOT NULL DEFAULT 0,
    upstream_latency_ms double precision,
    overhead_ms double precision
);
CREATE INDEX usage_events_day_idx ON usage_events (day, seq);
CREATE INDEX usage_events_user_day_idx ON usage_events (user_id, day, seq);

CREATE TABLE notifications (
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind text NOT NULL,
    period text NOT NULL,
    threshold integer NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, kind, period, threshold)
);
