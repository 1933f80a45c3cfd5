-- One user's counters today and, with p_month_start, this month (today
-- included) from the day rows,
-- in gateway_decide's meter order (1-9); cost counts what answers under way
-- reserved (cost_reserved). One range scan of the primary key. PL/pgSQL, whose
-- plans are kept for the session (a SQL function is planned at every call).
CREATE OR REPLACE FUNCTION gateway_counters(
    p_user text, p_day date, p_month_start date, OUT day_used numeric[], OUT month_used numeric[]
) LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_month_start IS NULL THEN
        -- No monthly limit: today's row alone (month_used stays NULL).
        SELECT ARRAY[
            d.queries, d.advanced_rag, d.web_searches, d.uploads, d.upload_bytes,
            d.prompt_tokens, d.completion_tokens, d.total_tokens, d.cost + d.cost_reserved
        ]::numeric[]
        INTO day_used
        FROM usage_daily d WHERE d.user_id = p_user AND d.day = p_day;
        day_used := coalesce(day_used, array_fill(0, ARRAY[9])::numeric[]);
        RETURN;
    END IF;
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
    INTO day_used, month_used
    FROM usage_daily d
    WHERE d.user_id = p_user AND d.day >= p_month_start AND d.day <= p_day;
END
$$;
