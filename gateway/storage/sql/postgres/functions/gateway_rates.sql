-- What each rate limit of a request (the limits with p_pers 4 or 5) counts at
-- p_now, parallel to the limits (NULL for the others) - a team-scope one
-- (p_scopes 2) over the members of p_team - and the rates the request counts
-- in (quota.RATE_BITS: 1 queries a minute, 2 an hour, 4 tokens a minute, 8 an
-- hour; a team's rate sums its members' buckets, so a member's request counts
-- in the same bits as for a rate of their own).
CREATE OR REPLACE FUNCTION gateway_rates(
    p_user text, p_meters smallint[], p_pers smallint[], p_scopes smallint[], p_team text,
    p_now timestamptz, OUT used numeric[], OUT bits integer
) LANGUAGE plpgsql STABLE AS $$
DECLARE
    i integer;
BEGIN
    bits := 0;
    used := array_fill(NULL::numeric, ARRAY[coalesce(cardinality(p_meters), 0)]);
    FOR i IN 1 .. coalesce(cardinality(p_meters), 0) LOOP
        CONTINUE WHEN p_pers[i] < 4;
        IF p_scopes[i] = 2 THEN
            CONTINUE WHEN p_team IS NULL;
            used[i] := gateway_team_rate_used(p_team, p_meters[i], p_pers[i], p_now);
        ELSE
            used[i] := gateway_rate_used(p_user, p_meters[i], p_pers[i], p_now);
        END IF;
        bits := bits | CASE WHEN p_meters[i] = 1 THEN 1 ELSE 4 END
            * CASE p_pers[i] WHEN 4 THEN 1 ELSE 2 END;
    END LOOP;
END
$$;
