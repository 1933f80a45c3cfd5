-- A user's counters, as gateway_team_counters gives a team's: today's day row
-- and, with p_month_start, this month's sums (today's included), numbered as
-- quota.METERS 1-9. gateway_admit reads the same inline, on purpose (a call and
-- its function scan cost more than the read on every answer); uploads call this.
CREATE OR REPLACE FUNCTION gateway_user_counters(
    p_user text, p_day date, p_month_start date,
    OUT day_used numeric[], OUT month_used numeric[]
) LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- Today's two rows (admissions' and settles', 0023) in one statement.
    SELECT ARRAY[
        coalesce(sum(u.queries), 0), coalesce(sum(u.advanced_rag), 0),
        coalesce(sum(u.web_searches), 0), coalesce(sum(u.uploads), 0),
        coalesce(sum(u.upload_bytes), 0), coalesce(sum(u.prompt_tokens), 0),
        coalesce(sum(u.completion_tokens), 0), coalesce(sum(u.total_tokens), 0),
        coalesce(sum(u.cost + u.cost_reserved), 0)
    ]::numeric[]
    INTO day_used
    FROM usage_daily u WHERE u.user_id = p_user AND u.day = p_day;
    IF p_month_start IS NOT NULL THEN
        SELECT ARRAY[
            day_used[1] + coalesce(sum(u.queries), 0),
            day_used[2] + coalesce(sum(u.advanced_rag), 0),
            day_used[3] + coalesce(sum(u.web_searches), 0),
            day_used[4] + coalesce(sum(u.uploads), 0),
            day_used[5] + coalesce(sum(u.upload_bytes), 0),
            day_used[6] + coalesce(sum(u.prompt_tokens), 0),
            day_used[7] + coalesce(sum(u.completion_tokens), 0),
            day_used[8] + coalesce(sum(u.total_tokens), 0),
            day_used[9] + coalesce(sum(u.cost + u.cost_reserved), 0)
        ]::numeric[]
        INTO month_used
        FROM usage_daily u
        WHERE u.user_id = p_user AND u.day >= p_month_start AND u.day < p_day;
    END IF;
END
$$;
