-- Adds to the user's per-model counters of each key in p_keys, on day p_day:
-- admission's query and cost bound, settle's tokens and cost, a refund's or a
-- release's negative amounts.
CREATE OR REPLACE FUNCTION gateway_add_models(
    p_user text, p_keys text[], p_day date, p_queries bigint, p_prompt bigint,
    p_completion bigint, p_total bigint, p_cost numeric, p_reserved numeric
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_models AS m (
        user_id, scope, day, queries, prompt_tokens, completion_tokens, total_tokens, cost,
        cost_reserved
    )
    SELECT p_user, k, p_day, p_queries, p_prompt, p_completion, p_total, p_cost, p_reserved
    FROM unnest(p_keys) AS k ORDER BY k
    ON CONFLICT (user_id, scope, day) DO UPDATE SET
        queries = m.queries + excluded.queries,
        prompt_tokens = m.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = m.completion_tokens + excluded.completion_tokens,
        total_tokens = m.total_tokens + excluded.total_tokens,
        cost = m.cost + excluded.cost,
        cost_reserved = m.cost_reserved + excluded.cost_reserved;
END
$$;
