-- Issue 21, money budgets: admission reserves an upper bound of an answer's cost
-- against the user's cost limits. The day row holds what answers under way have
-- reserved (cost_reserved, a decimal string like cost); the answer's pending row
-- holds its own reservation (reserved_cost), which settle, refund and recovery
-- take off the day row again. Existing rows reserve nothing.
ALTER TABLE usage_daily ADD COLUMN cost_reserved TEXT NOT NULL DEFAULT '0';
ALTER TABLE pending_answers ADD COLUMN reserved_cost TEXT NOT NULL DEFAULT '0';

-- Rates (requests_per_minute, tokens_per_minute, ...): each rate window is
-- counted in RATE_BUCKETS + 1 slots of RATE_SECONDS / RATE_BUCKETS seconds
-- (gateway/quota.py), a ring: a slot holds the bucket it counts and its amount,
-- and a newer bucket of the same slot replaces it. meter and per are numbered
-- as quota.METERS and quota.PERS (1-based). An answer's pending row remembers
-- the rates it counts in (quota.RATE_BITS).
CREATE TABLE usage_rates (
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    meter INTEGER NOT NULL,
    per INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (user_id, meter, per, slot)
);
ALTER TABLE pending_answers ADD COLUMN rates INTEGER NOT NULL DEFAULT 0;

-- Per-model limits ([[plans.NAME.limits]] with `models`): each has its own
-- counters, per user, key (quota.Limit.counter_key: "m:" and the sorted globs)
-- and day, of what the requests for a matching model used; cost_reserved is
-- what such answers under way reserved. An answer's pending row names the
-- keys it counts in (scopes: a JSON array of keys).
CREATE TABLE usage_models (
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    scope TEXT NOT NULL,
    day TEXT NOT NULL,
    queries INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    cost TEXT NOT NULL DEFAULT '0',
    cost_reserved TEXT NOT NULL DEFAULT '0',
    PRIMARY KEY (user_id, scope, day)
);
ALTER TABLE pending_answers ADD COLUMN scopes TEXT NOT NULL DEFAULT '[]';
