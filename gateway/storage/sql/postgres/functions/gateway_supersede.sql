-- The real record of an answer whose pending row a recovery charged replaces
-- the estimate (0011): the ledger row takes the real answer id and figures, its
-- model and token parts (0006, 0014), the day row, lifetime totals and
-- per-model counters (0016) move by the difference. The real id taken by
-- another request's answer (review-once F1), the row takes the id
-- gateway_answer_id gives it; taken by this request's, nothing changes.
-- Returns whether it did.
CREATE OR REPLACE FUNCTION gateway_supersede(p_pending text, p_answer_id text, p_user text, p_created_at timestamp with time zone, p_endpoint text, p_prompt bigint, p_completion bigint, p_total bigint, p_cost numeric, p_currency text, p_outcome text, p_estimated boolean, p_web_searches integer, p_conversation text, p_request text, p_upstream_ms double precision, p_overhead_ms double precision, p_upstream text, p_model text, p_cached bigint, p_reasoning bigint, p_cache_write bigint)
 RETURNS boolean
 LANGUAGE plpgsql
AS $$
DECLARE
    r usage_events%ROWTYPE;
    v_answer text;
BEGIN
    -- The row lock makes a second settle of the same record wait, then find
    -- the outcome changed and do nothing.
    SELECT * INTO r FROM usage_events e
    WHERE e.answer_id = 'gw-' || p_pending AND e.outcome = 'recovered'
        AND e.request_id = p_pending AND e.user_id = p_user
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_answer_id = r.answer_id THEN
        v_answer := p_answer_id;  -- an answer the upstream named no id for
    ELSE
        v_answer := gateway_answer_id(p_answer_id, p_request);
        IF v_answer IS NULL THEN
            RETURN false;
        END IF;
    END IF;
    UPDATE usage_events SET
        answer_id = v_answer, created_at = p_created_at, endpoint = p_endpoint,
        prompt_tokens = p_prompt, completion_tokens = p_completion, total_tokens = p_total,
        cost = p_cost, currency = p_currency, outcome = p_outcome, estimated = p_estimated,
        web_searches = p_web_searches, conversation_id = p_conversation, request_id = p_request,
        upstream_latency_ms = p_upstream_ms, overhead_ms = p_overhead_ms, model = p_model,
        cached_tokens = p_cached, reasoning_tokens = p_reasoning,
        cache_write_tokens = p_cache_write, upstream = p_upstream
    WHERE answer_id = r.answer_id;
    UPDATE users SET
        lifetime_prompt_tokens = lifetime_prompt_tokens + p_prompt - r.prompt_tokens,
        lifetime_completion_tokens = lifetime_completion_tokens + p_completion - r.completion_tokens,
        lifetime_tokens = lifetime_tokens + p_total - r.total_tokens,
        lifetime_cost = lifetime_cost + p_cost - r.cost
    WHERE id = p_user;
    -- The difference goes to the settles' row of the estimate's day (0023).
    INSERT INTO usage_daily AS d (
        user_id, day, part, web_searches, prompt_tokens, completion_tokens, total_tokens, cost
    ) VALUES (
        p_user, r.day, 1, p_web_searches - r.web_searches, p_prompt - r.prompt_tokens,
        p_completion - r.completion_tokens, p_total - r.total_tokens, p_cost - r.cost
    ) ON CONFLICT (user_id, day, part) DO UPDATE SET
        web_searches = d.web_searches + excluded.web_searches,
        prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = d.completion_tokens + excluded.completion_tokens,
        total_tokens = d.total_tokens + excluded.total_tokens,
        cost = d.cost + excluded.cost;
    IF cardinality(r.scopes) > 0 THEN
        -- The per-model counters the estimate was charged to, likewise (0016).
        PERFORM gateway_add_models(
            p_user, r.scopes, r.day, 0, p_prompt - r.prompt_tokens,
            p_completion - r.completion_tokens, p_total - r.total_tokens, p_cost - r.cost, 0,
            1::smallint
        );
    END IF;
    RETURN true;
END
$$;
