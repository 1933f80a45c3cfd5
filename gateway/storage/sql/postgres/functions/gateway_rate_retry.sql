-- Whole seconds (at least 1) until a request refused by a rate limit would fit:
-- until enough of the oldest counted buckets have left the window
-- (quota.rate_retry). Run only for a refusal.
CREATE OR REPLACE FUNCTION gateway_rate_retry(
    p_user text, p_meter smallint, p_per smallint, p_max numeric, p_amount numeric,
    p_now timestamptz
) RETURNS integer LANGUAGE plpgsql STABLE AS $$
DECLARE
    w integer := CASE p_per WHEN 4 THEN 5 ELSE 300 END;
    v_epoch numeric := extract(epoch FROM p_now);
    v_used numeric := gateway_rate_used(p_user, p_meter, p_per, p_now);
    r record;
BEGIN
    FOR r IN
        SELECT u.bucket, u.amount FROM usage_rates u
        WHERE u.user_id = p_user AND u.meter = p_meter AND u.per = p_per
            AND u.bucket >= gateway_rate_bucket(p_per, p_now) - 12
        ORDER BY u.bucket
    LOOP
        v_used := v_used - r.amount;
        IF NOT gateway_refuses(p_meter, p_max, v_used, p_amount) THEN
            RETURN greatest(ceil((r.bucket + 13) * w - v_epoch), 1)::integer;
        END IF;
    END LOOP;
    RETURN w * 12;
END
$$;
