-- A team's counters (issue 21, team scope): its members' day rows summed, today
-- and, with p_month_start, this month; and its members' open streams. Team
-- usage is not stored apart (0013): it is the sum of its members'.
-- Bitmap and sequential scans off: its members' leases are read by an index
-- scan, whoever calls it first on a connection (see gateway_admit).
CREATE OR REPLACE FUNCTION gateway_team_counters(
    p_team text, p_day date, p_month_start date, p_now timestamptz,
    OUT day_used numeric[], OUT month_used numeric[], OUT streams bigint
) LANGUAGE plpgsql STABLE SET enable_bitmapscan = off SET enable_seqscan = off AS $$
BEGIN
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
        CASE WHEN p_month_start IS NOT NULL THEN ARRAY[
            coalesce(sum(d.queries), 0),
            coalesce(sum(d.advanced_rag), 0),
            coalesce(sum(d.web_searches), 0),
            coalesce(sum(d.uploads), 0),
            coalesce(sum(d.upload_bytes), 0),
            coalesce(sum(d.prompt_tokens), 0),
            coalesce(sum(d.completion_tokens), 0),
            coalesce(sum(d.total_tokens), 0),
            coalesce(sum(d.cost + d.cost_reserved), 0)
        ]::numeric[] END
    INTO day_used, month_used
    FROM usage_daily d JOIN users u ON u.id = d.user_id
    WHERE u.team_id = p_team AND d.day >= coalesce(p_month_start, p_day) AND d.day <= p_day;
    SELECT count(*) INTO streams FROM stream_leases l JOIN users u ON u.id = l.user_id
    WHERE u.team_id = p_team AND l.expires_at > p_now;
END
$$;
