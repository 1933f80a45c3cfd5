-- Counts an admitted query in its query rates' current buckets (p_bits 1: the
-- minute, 2: the hour) and returns the rate counters with it added.
CREATE OR REPLACE FUNCTION gateway_count_query_rates(
    p_user text, p_meters smallint[], p_pers smallint[], p_rates numeric[], p_bits integer,
    p_now timestamptz
) RETURNS numeric[] LANGUAGE plpgsql AS $$
DECLARE
    i integer;
BEGIN
    IF p_bits & 1 <> 0 THEN
        PERFORM gateway_rate_add(p_user, 1::smallint, 4::smallint, p_now, 1);
    END IF;
    IF p_bits & 2 <> 0 THEN
        PERFORM gateway_rate_add(p_user, 1::smallint, 5::smallint, p_now, 1);
    END IF;
    FOR i IN 1 .. cardinality(p_meters) LOOP
        IF p_meters[i] = 1 AND p_pers[i] >= 4 THEN
            p_rates[i] := p_rates[i] + 1;
        END IF;
    END LOOP;
    RETURN p_rates;
END
$$;
