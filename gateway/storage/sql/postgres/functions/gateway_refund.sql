-- Gives back what admission reserved for an answer that was never produced:
-- the query, its lease, and (with its pending row, only while that row is
-- there) the web search and cost bound reserved with it.
CREATE OR REPLACE FUNCTION gateway_refund(p_user text, p_day date, p_lease text, p_pending text)
 RETURNS boolean
 LANGUAGE plpgsql
AS $$
DECLARE
    v_claimed boolean := true;
    v_day date := p_day;
    v_reserved integer := 0;
    v_reserved_cost numeric := 0;
    v_rates integer := 0;
    v_at timestamptz;
    v_keys text[] := '{}';
BEGIN
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending RETURNING day, web_searches, reserved_cost, rates, created_at, scopes
        INTO v_day, v_reserved, v_reserved_cost, v_rates, v_at, v_keys;
        v_claimed := FOUND;
    END IF;
    DELETE FROM stream_leases WHERE id = p_lease;
    IF v_claimed THEN
        -- The query leaves the admissions' row it was counted in (0023).
        UPDATE usage_daily SET queries = queries - 1
        WHERE user_id = p_user AND day = p_day AND part = 0 AND queries > 0;
        IF v_reserved <> 0 OR v_reserved_cost <> 0 THEN
            PERFORM gateway_release(p_user, v_day, v_reserved, v_reserved_cost);
        END IF;
        IF cardinality(v_keys) > 0 THEN
            PERFORM gateway_add_models(
                p_user, v_keys, v_day, -1, 0, 0, 0, 0, -v_reserved_cost, 0::smallint
            );
        END IF;
        -- The query leaves the query rates' buckets it was counted in.
        IF v_rates & 1 <> 0 THEN
            PERFORM gateway_rate_add(p_user, 1::smallint, 4::smallint, v_at, -1);
        END IF;
        IF v_rates & 2 <> 0 THEN
            PERFORM gateway_rate_add(p_user, 1::smallint, 5::smallint, v_at, -1);
        END IF;
    END IF;
    RETURN v_claimed;
END
$$;
