-- A batch of one admission (one that found no batch in flight, the usual case
-- under light load): what gateway_admit_many answers for it - an unknown user
-- is known = false, not an error - under the batches' lock timeout (0010: the
-- gateway then sends it again on its own), with the admission's own arguments:
-- through gateway_admit_many it cost the decoding and slicing of 26 arrays
-- more (docs/performance.md).
CREATE OR REPLACE FUNCTION gateway_admit_batched(
    p_user text,
    p_day date,
    p_month_start date,
    p_meters smallint[],
    p_pers smallint[],
    p_maxes numeric[],
    p_scopes smallint[],
    p_keys text[],
    p_lease text,
    p_lease_expires timestamptz,
    p_now timestamptz,
    p_advanced_rag boolean,
    p_pending text,
    p_endpoint text,
    p_prompt bigint,
    p_completion bigint,
    p_total bigint,
    p_cost numeric,
    p_currency text,
    p_web_ask boolean,
    p_web_optional boolean,
    p_reserve_cost numeric,
    p_team text,
    -- The upstream the answer is sent to (0017), kept on its pending row.
    p_upstream text DEFAULT 'default'
) RETURNS TABLE (
    known boolean,
    refused integer,
    day_used numeric[],
    month_used numeric[],
    open_streams bigint,
    web_reserved boolean,
    rate_used numeric[],
    retry_after integer,
    team_day numeric[],
    team_month numeric[],
    team_streams bigint
) LANGUAGE plpgsql SET lock_timeout = '250ms' AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p_user) THEN
        RETURN QUERY SELECT false, NULL::integer, NULL::numeric[], NULL::numeric[],
            NULL::bigint, false, NULL::numeric[], NULL::integer, NULL::numeric[],
            NULL::numeric[], NULL::bigint;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, a.* FROM gateway_admit(
        p_user, p_day, p_month_start, p_meters, p_pers, p_maxes, p_scopes, p_keys, p_lease,
        p_lease_expires, p_now, p_advanced_rag, p_pending, p_endpoint, p_prompt,
        p_completion, p_total, p_cost, p_currency, p_web_ask, p_web_optional,
        p_reserve_cost, p_team, p_upstream
    ) AS a;
END
$$;
