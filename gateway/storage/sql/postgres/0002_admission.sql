-- Concurrent-stream limits and explicitly ordered admission and settle.
--
-- An open answer holds a lease; a crashed gateway's leases expire on their own.
-- Admission and settle are functions so that their locks are taken in one fixed
-- order - the user's row, then the day row - which rules out deadlocks between a
-- user's admissions and settles running at the same time on different replicas.
-- Each is still one round trip.
CREATE TABLE stream_leases (
    id text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL
);
CREATE INDEX stream_leases_user_idx ON stream_leases (user_id, expires_at);

CREATE FUNCTION gateway_admit(
    p_user text,
    p_day date,
    p_month_start date,
    p_queries bigint,
    p_tokens_day bigint,
    p_tokens_month bigint,
    p_streams bigint,
    p_lease text,
    p_lease_expires timestamptz,
    p_now timestamptz
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
        INSERT INTO usage_daily AS d (user_id, day, queries) VALUES (p_user, p_day, 1)
        ON CONFLICT (user_id, day) DO UPDATE SET queries = d.queries + 1;
        v_queries := v_queries + 1;
        IF p_lease IS NOT NULL THEN
            INSERT INTO stream_leases (id, user_id, expires_at) VALUES (p_lease, p_user, p_lease_expires);
            v_streams := v_streams + 1;
        END IF;
    END IF;
    RETURN QUERY SELECT v_refused, v_queries, v_tokens, v_prev + v_tokens, v_web, v_streams;
END
$$;

CREATE FUNCTION gateway_settle(
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
    p_lease text
) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF p_lease IS NOT NULL THEN
        DELETE FROM stream_leases WHERE id = p_lease;
    END IF;
    -- A second settle of the same answer waits here on the unique index until
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
