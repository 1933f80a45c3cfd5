-- Adds p_amount to the rate bucket p_at falls in (a refund adds -1). The slot
-- ring (0015): a newer bucket replaces the slot's older one; an amount for a
-- bucket older than the slot's is out of every counted span and is dropped.
CREATE OR REPLACE FUNCTION gateway_rate_add(
    p_user text, p_meter smallint, p_per smallint, p_at timestamptz, p_amount numeric
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_rates AS r (user_id, meter, per, slot, bucket, amount)
    SELECT p_user, p_meter, p_per, (b.bucket % 13)::smallint, b.bucket, p_amount
    FROM (SELECT gateway_rate_bucket(p_per, p_at) AS bucket) b
    ON CONFLICT (user_id, meter, per, slot) DO UPDATE SET
        amount = CASE
            WHEN r.bucket = excluded.bucket THEN r.amount + excluded.amount
            WHEN excluded.bucket > r.bucket THEN excluded.amount
            ELSE r.amount
        END,
        bucket = greatest(r.bucket, excluded.bucket);
END
$$;
