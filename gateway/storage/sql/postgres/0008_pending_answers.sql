-- Crash safety: every admitted answer is in the database from the moment it is
-- admitted, as a pending row, until it is settled, refunded or recovered.
--
-- Admission writes the pending row in the same call (so in the same round trip)
-- as the reservation; it carries what an estimate needs (the prompt-size
-- estimate the dialect makes for an answer that was never seen) so that an
-- answer whose gateway died (kill -9, OOM, power) is charged as an estimate by
-- `gateway_recover`, run by any replica on start-up and periodically.
--
-- Exactly once: the pending row is the answer's one token. Settle, refund and
-- recovery each DELETE it first and go on only if they got it; the row lock
-- makes the second of two racing callers wait and then find nothing, so a
-- retried settle, a recovery racing a late settle, or a refund after either
-- cannot count the answer twice. Settles that name no pending row (fail-open
-- admissions, spooled records of older versions) keep the old rule: unique on
-- the answer id. See docs/quotas.md ("Crash safety").
--
-- Lock order, everywhere: the pending row, then the lease, then the user's row,
-- then the day row (admission takes the user's row first but only ever creates
-- its pending row, which no one else can hold yet).
--
-- The new gateway_admit and gateway_settle take more arguments; the earlier
-- signatures are left in place (PostgreSQL tells them apart by their number of
-- arguments), so that gateways of the previous version keep working while a
-- rolling upgrade replaces them. They write and claim no pending rows.
CREATE TABLE pending_answers (
    id text PRIMARY KEY,  -- the request id; also its stream lease's id
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day date NOT NULL,
    created_at timestamptz NOT NULL,
    endpoint text NOT NULL,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens bigint NOT NULL DEFAULT 0,
    cost numeric NOT NULL DEFAULT 0,
    currency text NOT NULL DEFAULT 'USD'
);
CREATE INDEX pending_answers_created_idx ON pending_answers (created_at);

-- As in 0003, plus the pending row (p_pending NULL: none is written).
CREATE OR REPLACE FUNCTION gateway_admit(
    p_user text,
    p_day date,
    p_month_start date,
    p_queries bigint,
    p_tokens_day bigint,
    p_tokens_month bigint,
    p_streams bigint,
    p_lease text,
    p_lease_expires timestamptz,
    p_now timestamptz,
    p_advanced_rag boolean,
    p_pending text,
    p_endpoint text,
    p_prompt bigint,
    p_completion bigint,
    p_total bigint,
    p_cost numeric,
    p_currency text
) RETURNS TABLE (
    refused_by text,
    queries bigint,
    tokens_today bigint,
    tokens_month bigint,
    web_searches bigint,
    open_streams bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_queries bigint;
    v_tokens bigint;
    v_web bigint;
    v_prev bigint;
    v_streams bigint := 0;
    v_refused text;
BEGIN
    -- All admissions of one user queue on this row lock; every statement after
    -- it sees what the ones before committed (READ COMMITTED takes a fresh
    -- snapshot per statement), so check-then-increment is exact. NO KEY UPDATE
    -- does not block the foreign-key checks of concurrent ledger writes.
    PERFORM 1 FROM users WHERE id = p_user FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE foreign_key_violation USING MESSAGE = 'unknown user ' || p_user;
    END IF;
    SELECT d.queries, d.total_tokens, d.web_searches INTO v_queries, v_tokens, v_web
    FROM usage_daily d WHERE d.user_id = p_user AND d.day = p_day;
    v_queries := coalesce(v_queries, 0);
    v_tokens := coalesce(v_tokens, 0);
    v_web := coalesce(v_web, 0);
    SELECT coalesce(sum(d.total_tokens), 0) INTO v_prev
    FROM usage_daily d WHERE d.user_id = p_user AND d.day >= p_month_start AND d.day < p_day;
    IF p_streams IS NOT NULL THEN
        DELETE FROM stream_leases l WHERE l.user_id = p_user AND l.expires_at <= p_now;
        SELECT count(*) INTO v_streams FROM stream_leases l WHERE l.user_id = p_user;
    END IF;

    v_refused := CASE
        WHEN p_queries IS NOT NULL AND v_queries >= p_queries THEN 'queries_per_day'
        WHEN p_tokens_day IS NOT NULL AND v_tokens >= p_tokens_day THEN 'tokens_per_day'
        WHEN p_tokens_month IS NOT NULL AND v_prev + v_tokens >= p_tokens_month THEN 'tokens_per_month'
        WHEN p_streams IS NOT NULL AND v_streams >= p_streams THEN 'max_concurrent_streams'
    END;
    IF v_refused IS NULL THEN
        INSERT INTO usage_daily AS d (user_id, day, queries, advanced_rag)
        VALUES (p_user, p_day, 1, CASE WHEN p_advanced_rag THEN 1 ELSE 0 END)
        ON CONFLICT (user_id, day) DO UPDATE SET
            queries = d.queries + 1,
            advanced_rag = d.advanced_rag + excluded.advanced_rag;
        v_queries := v_queries + 1;
        IF p_lease IS NOT NULL THEN
            INSERT INTO stream_leases (id, user_id, expires_at) VALUES (p_lease, p_user, p_lease_expires);
            v_streams := v_streams + 1;
        END IF;
        -- New in 0008: the answer is pending from here on.
        IF p_pending IS NOT NULL THEN
            INSERT INTO pending_answers (
                id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
                total_tokens, cost, currency
            ) VALUES (
                p_pending, p_user, p_day, p_now, p_endpoint, p_prompt, p_completion,
                p_total, p_cost, p_currency
            );
        END IF;
    END IF;
    RETURN QUERY SELECT v_refused, v_queries, v_tokens, v_prev + v_tokens, v_web, v_streams;
END
$$;

-- The ledger write shared by settle and recovery (as gateway_settle did in 0002).
CREATE OR REPLACE FUNCTION gateway_record(
    p_answer_id text,
    p_user text,
    p_day date,
    p_created_at timestamptz,
    p_endpoint text,
    p_prompt bigint,
    p_completion bigint,
    p_total bigint,
    p_cost numeric,
    p_currency text,
    p_outcome text,
    p_estimated boolean,
    p_web_searches integer,
    p_conversation text,
    p_request text,
    p_upstream_ms double precision,
    p_overhead_ms double precision
) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    -- A second write of the same answer waits here on the unique index until
    -- the first commits, then inserts nothing and changes nothing.
    INSERT INTO usage_events (
        answer_id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
        total_tokens, cost, currency, outcome, estimated, web_searches, conversation_id,
        request_id, upstream_latency_ms, overhead_ms
    ) VALUES (
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms
    ) ON CONFLICT (answer_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE users SET
        lifetime_prompt_tokens = lifetime_prompt_tokens + p_prompt,
        lifetime_completion_tokens = lifetime_completion_tokens + p_completion,
        lifetime_tokens = lifetime_tokens + p_total,
        lifetime_cost = lifetime_cost + p_cost
    WHERE id = p_user;
    INSERT INTO usage_daily AS d
        (user_id, day, web_searches, prompt_tokens, completion_tokens, total_tokens, cost)
    VALUES (p_user, p_day, p_web_searches, p_prompt, p_completion, p_total, p_cost)
    ON CONFLICT (user_id, day) DO UPDATE SET
        web_searches = d.web_searches + excluded.web_searches,
        prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = d.completion_tokens + excluded.completion_tokens,
        total_tokens = d.total_tokens + excluded.total_tokens,
        cost = d.cost + excluded.cost;
    RETURN true;
END
$$;

-- As in 0002, plus p_pending: the answer's pending row, claimed first.
CREATE OR REPLACE FUNCTION gateway_settle(
    p_answer_id text,
    p_user text,
    p_day date,
    p_created_at timestamptz,
    p_endpoint text,
    p_prompt bigint,
    p_completion bigint,
    p_total bigint,
    p_cost numeric,
    p_currency text,
    p_outcome text,
    p_estimated boolean,
    p_web_searches integer,
    p_conversation text,
    p_request text,
    p_upstream_ms double precision,
    p_overhead_ms double precision,
    p_lease text,
    p_pending text
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_claimed boolean := true;
BEGIN
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending;
        -- Gone: this answer was settled already (a retry), or recovered as an
        -- estimate by a replica that took it for dead. Either way it is counted.
        v_claimed := FOUND;
    END IF;
    IF p_lease IS NOT NULL THEN
        DELETE FROM stream_leases WHERE id = p_lease;
    END IF;
    IF NOT v_claimed THEN
        RETURN false;
    END IF;
    RETURN gateway_record(
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms
    );
END
$$;

-- Give back an admitted query that produced no answer. With p_pending, only
-- while its pending row is there: a refund retried, or one after a recovery
-- charged the answer, changes nothing. Returns whether the query was returned.
CREATE OR REPLACE FUNCTION gateway_refund(p_user text, p_day date, p_lease text, p_pending text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending;
        IF NOT FOUND THEN
            DELETE FROM stream_leases WHERE id = p_lease;
            RETURN false;
        END IF;
    END IF;
    DELETE FROM stream_leases WHERE id = p_lease;
    UPDATE usage_daily SET queries = queries - 1
    WHERE user_id = p_user AND day = p_day AND queries > 0;
    RETURN true;
END
$$;

-- Charge the pending answers admitted before p_before as estimates (outcome
-- 'recovered'); their reserved queries stay spent. SKIP LOCKED: replicas running
-- this at once share the rows out instead of queueing on them, and a row a
-- settle is claiming right now is left to that settle. Returns the ids recovered.
CREATE OR REPLACE FUNCTION gateway_recover(p_before timestamptz, p_limit integer, p_now timestamptz)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    r pending_answers%ROWTYPE;
BEGIN
    -- In user order, so that two replicas recovering rows of the same users take
    -- the users' row locks in the same order (no deadlock between them).
    FOR r IN
        SELECT * FROM pending_answers p WHERE p.created_at < p_before
        ORDER BY p.user_id, p.id LIMIT p_limit FOR UPDATE SKIP LOCKED
    LOOP
        DELETE FROM pending_answers WHERE id = r.id;
        DELETE FROM stream_leases WHERE id = r.id;
        PERFORM gateway_record(
            'gw-' || r.id, r.user_id, r.day, p_now, r.endpoint, r.prompt_tokens,
            r.completion_tokens, r.total_tokens, r.cost, r.currency, 'recovered', true, 0,
            NULL, r.id, NULL, NULL
        );
        RETURN NEXT r.id;
    END LOOP;
END
$$;
