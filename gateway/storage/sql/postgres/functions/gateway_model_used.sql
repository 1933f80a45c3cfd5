-- What a per-model limit counts (meter p_meter of quota.METERS: 1 queries, 6
-- input tokens, 7 output tokens, 8 tokens, 9 cost with what is reserved; p_per
-- 1 today, 2 this month): the user's per-model counters of key p_key.
CREATE OR REPLACE FUNCTION gateway_model_used(
    p_user text, p_key text, p_meter smallint, p_per smallint, p_day date, p_month_start date
) RETURNS numeric LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT coalesce(sum(CASE p_meter
            WHEN 1 THEN m.queries WHEN 6 THEN m.prompt_tokens WHEN 7 THEN m.completion_tokens
            WHEN 8 THEN m.total_tokens ELSE m.cost + m.cost_reserved END), 0)
        FROM usage_models m
        WHERE m.user_id = p_user AND m.scope = p_key AND m.day <= p_day
            AND m.day >= CASE WHEN p_per = 1 THEN p_day ELSE p_month_start END
    );
END
$$;
