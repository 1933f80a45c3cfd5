-- What the limit of an alert check counts after a settle (issue 21), for the
-- checks other than the four gateway_settle reads from the user's day rows:
-- p_spec is storage.alert_spec, 'meter:per:scope:key' (meter and window
-- numbered as quota.METERS and quota.PERS, scope 1 the user and 2 the user's
-- team, key a per-model limit's counters or empty). Cost is what was spent:
-- what answers under way reserved is not usage yet.
CREATE OR REPLACE FUNCTION gateway_alert_used(
    p_user text, p_day date, p_month_start date, p_spec text
) RETURNS numeric LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_parts text[] := string_to_array(p_spec, ':');
    v_meter integer := v_parts[1]::integer;
    v_start date := CASE WHEN v_parts[2] = '2' THEN p_month_start ELSE p_day END;
    v_key text := nullif(substr(p_spec, length(v_parts[1] || v_parts[2] || v_parts[3]) + 4), '');
BEGIN
    IF v_key IS NOT NULL THEN
        RETURN (
            SELECT coalesce(sum(CASE v_meter
                WHEN 1 THEN m.queries::numeric WHEN 6 THEN m.prompt_tokens
                WHEN 7 THEN m.completion_tokens WHEN 8 THEN m.total_tokens ELSE m.cost
            END), 0)
            FROM usage_models m
            WHERE m.user_id = p_user AND m.scope = v_key AND m.day >= v_start AND m.day <= p_day
        );
    END IF;
    RETURN (
        SELECT coalesce(sum(CASE v_meter
            WHEN 1 THEN d.queries::numeric WHEN 2 THEN d.advanced_rag WHEN 3 THEN d.web_searches
            WHEN 4 THEN d.uploads WHEN 5 THEN d.upload_bytes WHEN 6 THEN d.prompt_tokens
            WHEN 7 THEN d.completion_tokens WHEN 8 THEN d.total_tokens ELSE d.cost
        END), 0)
        FROM usage_daily d
        WHERE d.user_id = ANY (
                CASE WHEN v_parts[3] = '2' THEN ARRAY(
                    SELECT m.id FROM users m
                    WHERE m.team_id = (SELECT u.team_id FROM users u WHERE u.id = p_user)
                ) ELSE ARRAY[p_user] END
            )
            AND d.day >= v_start AND d.day <= p_day
    );
END
$$;
