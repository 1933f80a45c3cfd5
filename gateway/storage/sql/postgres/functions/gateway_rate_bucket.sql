-- The bucket of a rate window (p_per 4: a minute, 5: an hour) that a moment
-- falls in: quota.bucket_of (RATE_BUCKETS = 12 buckets a window).
CREATE OR REPLACE FUNCTION gateway_rate_bucket(p_per smallint, p_at timestamptz)
RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN floor(extract(epoch FROM p_at) / CASE p_per WHEN 4 THEN 5 ELSE 300 END)::bigint;
END
$$;
