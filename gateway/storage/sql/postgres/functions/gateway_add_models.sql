-- Adds to the user's per-model counters of each key in p_keys, on day p_day:
-- admission's query and cost bound, settle's tokens and cost, a refund's or a
-- release's negative amounts. p_part (0023): 0 the admissions' row (admissions,
-- refunds), 1 the settles' row (settles, recoveries, supersedes), as in
-- usage_daily: an admission does not wait for a settle's row lock here either.
CREATE OR REPLACE FUNCTION gateway_add_models(
    p_user text, p_keys text[], p_day date, p_queries bigint, p_prompt bigint,
    p_completion bigint, p_total bigint, p_cost numeric, p_reserved numeric, p_part smallint
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_models AS m (
        user_id, scope, day, part, queries, prompt_tokens, completion_tokens, total_tokens,
        cost, cost_reserved
    )
    SELECT p_user, k, p_day, p_part, p_queries, p_prompt, p_completion, p_total, p_cost,
        p_reserved
    FROM unnest(p_keys) AS k ORDER BY k
    ON CONFLICT (user_id, scope, day, part) DO UPDATE SET
        queries = m.queries + excluded.queries,
        prompt_tokens = m.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = m.completion_tokens + excluded.completion_tokens,
        total_tokens = m.total_tokens + excluded.total_tokens,
        cost = m.cost + excluded.cost,
        cost_reserved = m.cost_reserved + excluded.cost_reserved;
END
$$;
