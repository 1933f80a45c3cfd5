-- Issue 21, limits as data. Admission is one generic check-and-reserve over a
-- set of limits (meter, window, maximum: gateway/quota.py), settle and refund
-- adjust the counters it reserved. The live functions are no longer created
-- by migrations: they are defined once each in sql/postgres/functions/ and
-- applied (CREATE OR REPLACE) by every `migrate` whose set of function files
-- differs from the one applied last (schema_functions holds its hash). This
-- migration drops every function the earlier migrations created - overloads
-- included - so that the files define all of them; schema and data stay.
--
-- Money budgets: admission reserves an upper bound of an answer's cost. The day
-- row holds what answers under way reserved (cost_reserved), the pending row
-- its own reservation (reserved_cost), which settle, refund and recovery take
-- off the day row again. Existing rows reserve nothing.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema() AND p.proname LIKE 'gateway\_%'
    LOOP
        EXECUTE 'DROP FUNCTION ' || f;
    END LOOP;
END
$$;

ALTER TABLE usage_daily ADD COLUMN cost_reserved numeric NOT NULL DEFAULT 0;
ALTER TABLE pending_answers ADD COLUMN reserved_cost numeric NOT NULL DEFAULT 0;

CREATE TABLE schema_functions (
    id integer PRIMARY KEY CHECK (id = 1),
    hash text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Rates (requests_per_minute, tokens_per_minute, ...): each rate window is
-- counted in RATE_BUCKETS + 1 slots of RATE_SECONDS / RATE_BUCKETS seconds
-- (gateway/quota.py), a ring: a slot holds the bucket it counts and its amount,
-- and a newer bucket of the same slot replaces it (gateway_rate_add). meter and
-- per are numbered as quota.METERS and quota.PERS (1-based). An answer's
-- pending row remembers the rates it counts in (quota.RATE_BITS).
CREATE TABLE usage_rates (
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    meter smallint NOT NULL,
    per smallint NOT NULL,
    slot smallint NOT NULL,
    bucket bigint NOT NULL,
    amount numeric NOT NULL,
    PRIMARY KEY (user_id, meter, per, slot)
);
ALTER TABLE pending_answers ADD COLUMN rates smallint NOT NULL DEFAULT 0;

-- Per-model limits ([[plans.NAME.limits]] with `models`): each has its own
-- counters, per user, key (quota.Limit.counter_key: "m:" and the sorted globs)
-- and day, of what the requests for a matching model used; cost_reserved is
-- what such answers under way reserved. An answer's pending row names the
-- keys it counts in (scopes).
CREATE TABLE usage_models (
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    scope text NOT NULL,
    day date NOT NULL,
    queries bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens bigint NOT NULL DEFAULT 0,
    cost numeric NOT NULL DEFAULT 0,
    cost_reserved numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, scope, day)
);
ALTER TABLE pending_answers ADD COLUMN scopes text[] NOT NULL DEFAULT '{}';
