-- What a rate window counts at p_now: the current bucket and the 12 before it
-- (quota.rate_used).
CREATE OR REPLACE FUNCTION gateway_rate_used(
    p_user text, p_meter smallint, p_per smallint, p_now timestamptz
) RETURNS numeric LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT coalesce(sum(r.amount), 0) FROM usage_rates r
        WHERE r.user_id = p_user AND r.meter = p_meter AND r.per = p_per
            AND r.bucket >= gateway_rate_bucket(p_per, p_now) - 12
    );
END
$$;
