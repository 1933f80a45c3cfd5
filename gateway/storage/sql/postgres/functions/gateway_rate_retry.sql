-- Whole seconds (at least 1) until a request refused by a rate limit would fit:
-- until enough of the oldest counted buckets have left the window
-- (quota.rate_retry) - the user's buckets, or with p_team the team members'
-- summed per bucket. Run only for a refusal.
CREATE OR REPLACE FUNCTION gateway_rate_retry(
    p_user text, p_team text, p_meter smallint, p_per smallint, p_max numeric,
    p_amount numeric, p_now timestamptz
) RETURNS integer LANGUAGE plpgsql STABLE AS $$
DECLARE
    w integer := CASE p_per WHEN 4 THEN 5 ELSE 300 END;
    v_epoch numeric := extract(epoch FROM p_now);
    v_used numeric := 0;
    v_buckets bigint[];
    v_amounts numeric[];
    i integer;
BEGIN
    SELECT coalesce(array_agg(b.bucket ORDER BY b.bucket), '{}'),
        coalesce(array_agg(b.amount ORDER BY b.bucket), '{}')
    INTO v_buckets, v_amounts
    FROM (
        SELECT u.bucket, sum(u.amount) AS amount FROM usage_rates u
        WHERE u.user_id = ANY (
                CASE WHEN p_team IS NULL THEN ARRAY[p_user]
                ELSE ARRAY(SELECT m.id FROM users m WHERE m.team_id = p_team) END
            )
            AND u.meter = p_meter AND u.per = p_per
            AND u.bucket >= gateway_rate_bucket(p_per, p_now) - 12
        GROUP BY u.bucket
    ) b;
    FOR i IN 1 .. cardinality(v_buckets) LOOP
        v_used := v_used + v_amounts[i];
    END LOOP;
    FOR i IN 1 .. cardinality(v_buckets) LOOP
        v_used := v_used - v_amounts[i];
        IF NOT gateway_refuses(p_meter, p_max, v_used, p_amount) THEN
            RETURN greatest(ceil((v_buckets[i] + 13) * w - v_epoch), 1)::integer;
        END IF;
    END LOOP;
    RETURN w * 12;
END
$$;
