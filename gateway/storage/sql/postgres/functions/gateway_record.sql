-- Writes one answer to the ledger, the day row and the lifetime totals, and
-- releases its lease; false, changing nothing else, when the answer id is
-- recorded already (the ledger's unique index decides, also across replicas).
-- p_upstream: the named upstream that answered (0017).
CREATE OR REPLACE FUNCTION gateway_record(p_answer_id text, p_user text, p_day date, p_created_at timestamp with time zone, p_endpoint text, p_prompt bigint, p_completion bigint, p_total bigint, p_cost numeric, p_currency text, p_outcome text, p_estimated boolean, p_web_searches integer, p_conversation text, p_request text, p_upstream_ms double precision, p_overhead_ms double precision, p_lease text, p_upstream text DEFAULT 'default'::text)
 RETURNS boolean
 LANGUAGE plpgsql
AS $$
BEGIN
    IF p_lease IS NOT NULL THEN
        DELETE FROM stream_leases WHERE id = p_lease;
    END IF;
    -- A second settle of the same answer waits here on the unique index until
    -- the first commits, then inserts nothing and changes nothing.
    INSERT INTO usage_events (
        answer_id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
        total_tokens, cost, currency, outcome, estimated, web_searches, conversation_id,
        request_id, upstream_latency_ms, overhead_ms, upstream
    ) VALUES (
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms, p_upstream
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
