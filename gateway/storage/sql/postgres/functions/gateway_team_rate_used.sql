-- What a team's rate window counts at p_now: its members' buckets summed
-- (gateway_rate_used over the team).
CREATE OR REPLACE FUNCTION gateway_team_rate_used(
    p_team text, p_meter smallint, p_per smallint, p_now timestamptz
) RETURNS numeric LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT coalesce(sum(r.amount), 0) FROM users u
        JOIN usage_rates r ON r.user_id = u.id
        WHERE u.team_id = p_team AND r.meter = p_meter AND r.per = p_per
            AND r.bucket >= gateway_rate_bucket(p_per, p_now) - 12
    );
END
$$;
