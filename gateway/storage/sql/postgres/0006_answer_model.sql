-- The ledger records which model answered and the parts of the prompt and
-- completion counts that providers price apart: prompt tokens read from the
-- prompt cache, completion tokens spent reasoning (docs/upstreams/openai.md).
ALTER TABLE usage_events
    ADD COLUMN model text,
    ADD COLUMN cached_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens bigint NOT NULL DEFAULT 0;

-- Settle with those three as well. It wraps gateway_settle rather than
-- replacing it, so that whatever that function does (the day row, lifetime
-- totals, leases) stays in one place; the extra update touches only columns
-- no index covers, so it is a HOT update of the row just written.
CREATE FUNCTION gateway_settle_model(
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
    p_model text,
    p_cached bigint,
    p_reasoning bigint
) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF NOT gateway_settle(
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms, p_lease
    ) THEN
        RETURN false;
    END IF;
    UPDATE usage_events SET
        model = p_model, cached_tokens = p_cached, reasoning_tokens = p_reasoning
    WHERE answer_id = p_answer_id;
    RETURN true;
END
$$;
