-- The admission rule of gateway/quota/limits.py (`decide` and `refuses`), over the
-- counters one user's request finds: which limit, if any, refuses the request,
-- and how many web searches it reserves. Limits come as parallel arrays (meter,
-- window, maximum); meters are numbered as quota.METERS (1 queries, 2 advanced
-- RAG, 3 web searches, 4 uploads, 5 upload bytes, 6 input tokens, 7 output
-- tokens, 8 tokens, 9 cost, 10 streams), windows as quota.PERS (1 day, 2 month,
-- 3 open at once, 4 a minute, 5 an hour); p_day and p_month hold meters 1-9,
-- p_rates what each rate limit's window or per-model limit counts (parallel to
-- the limits, NULL for the others),
-- p_charge meters 1-10. A limit of scope 2 (p_scopes; 1: the user) counts the
-- user's team: p_team_day, p_team_month and p_team_streams.
-- tests/storage/test_quota_model.py checks this against the Python rule.
-- gateway_admit_many writes the part for a user's own limits out in its loop
-- (a call per element cost a third of an element's work): a change here is
-- made there too; the model test's batches of own limits check that copy.
CREATE OR REPLACE FUNCTION gateway_decide(
    p_meters smallint[],
    p_pers smallint[],
    p_maxes numeric[],
    p_day numeric[],
    p_month numeric[],
    p_streams bigint,
    p_rates numeric[],
    p_charge numeric[],
    p_web_optional boolean,
    p_scopes smallint[],
    p_team_day numeric[],
    p_team_month numeric[],
    p_team_streams bigint,
    OUT refused integer,
    OUT web integer
) LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    i integer;
    m smallint;
    v_used numeric;
    n integer := coalesce(cardinality(p_meters), 0);
BEGIN
    web := p_charge[3]::integer;
    -- Web-search limits first: only a request asking for web search adds to
    -- them, and one of them may only turn the search off (p_web_optional).
    IF web > 0 THEN
        FOR i IN 1 .. n LOOP
            CONTINUE WHEN p_meters[i] <> 3;
            IF p_scopes[i] = 2 THEN
                v_used := CASE p_pers[i] WHEN 1 THEN p_team_day[3] ELSE p_team_month[3] END;
            ELSE
                v_used := CASE p_pers[i] WHEN 1 THEN p_day[3] ELSE p_month[3] END;
            END IF;
            IF v_used + web > p_maxes[i] THEN
                IF p_web_optional THEN
                    web := 0;
                    EXIT;
                END IF;
                refused := i;
                web := 0;
                RETURN;
            END IF;
        END LOOP;
    END IF;
    FOR i IN 1 .. n LOOP
        m := p_meters[i];
        CONTINUE WHEN m = 3;
        IF p_rates[i] IS NOT NULL THEN
            -- A rate's or a per-model limit's count, read by the caller.
            v_used := p_rates[i];
        ELSIF p_scopes[i] = 2 THEN
            v_used := CASE p_pers[i]
                WHEN 1 THEN p_team_day[m] WHEN 2 THEN p_team_month[m] ELSE p_team_streams
            END;
        ELSE
            v_used := CASE p_pers[i]
                WHEN 1 THEN p_day[m] WHEN 2 THEN p_month[m] WHEN 3 THEN p_streams ELSE p_rates[i]
            END;
        END IF;
        -- gateway_refuses, written out: a function call per limit would cost
        -- more than the rule (this runs for every admission).
        IF (p_charge[m] > 0 AND v_used + p_charge[m] > p_maxes[i])
            OR (m BETWEEN 6 AND 9 AND v_used >= p_maxes[i])
        THEN
            refused := i;
            web := 0;
            RETURN;
        END IF;
    END LOOP;
END
$$;
