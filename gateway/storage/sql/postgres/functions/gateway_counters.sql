-- One user's counters today and this month (today included) from the day rows,
-- in gateway_decide's meter order (1-9); cost counts what answers under way
-- reserved (cost_reserved). One range scan of the primary key.
CREATE OR REPLACE FUNCTION gateway_counters(
    p_user text, p_day date, p_month_start date, OUT day_used numeric[], OUT month_used numeric[]
) LANGUAGE sql STABLE AS $$
    SELECT
        ARRAY[
            coalesce(sum(d.queries) FILTER (WHERE d.day = p_day), 0),
            coalesce(sum(d.advanced_rag) FILTER (WHERE d.day = p_day), 0),
            coalesce(sum(d.web_searches) FILTER (WHERE d.day = p_day), 0),
            coalesce(sum(d.uploads) FILTER (WHERE d.day = p_day), 0),
            coalesce(sum(d.upload_bytes) FILTER (WHERE d.day = p_day), 0),
            coalesce(sum(d.prompt_tokens) FILTER (WHERE d.day = p_day), 0),
            coalesce(sum(d.completion_tokens) FILTER (WHERE d.day = p_day), 0),
            coalesce(sum(d.total_tokens) FILTER (WHERE d.day = p_day), 0),
            coalesce(sum(d.cost + d.cost_reserved) FILTER (WHERE d.day = p_day), 0)
        ]::numeric[],
        ARRAY[
            coalesce(sum(d.queries), 0),
            coalesce(sum(d.advanced_rag), 0),
            coalesce(sum(d.web_searches), 0),
            coalesce(sum(d.uploads), 0),
            coalesce(sum(d.upload_bytes), 0),
            coalesce(sum(d.prompt_tokens), 0),
            coalesce(sum(d.completion_tokens), 0),
            coalesce(sum(d.total_tokens), 0),
            coalesce(sum(d.cost + d.cost_reserved), 0)
        ]::numeric[]
    FROM usage_daily d
    WHERE d.user_id = p_user AND d.day >= p_month_start AND d.day <= p_day;
$$;
