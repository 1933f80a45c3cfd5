-- Counts a settled answer's tokens in the token rates its admission counted it
-- in (p_bits 4: the minute, 8: the hour), in the buckets of p_at.
CREATE OR REPLACE FUNCTION gateway_count_token_rates(
    p_user text, p_bits integer, p_at timestamptz, p_tokens bigint
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_bits & 4 <> 0 THEN
        PERFORM gateway_rate_add(p_user, 8::smallint, 4::smallint, p_at, p_tokens);
    END IF;
    IF p_bits & 8 <> 0 THEN
        PERFORM gateway_rate_add(p_user, 8::smallint, 5::smallint, p_at, p_tokens);
    END IF;
END
$$;
