-- Admission: check-and-reserve one request against a set of limits, in one
-- round trip (docs/quotas.md). Under the user's admission lock (an advisory
-- lock of the transaction, keyed by the user: all admissions of a user queue
-- on it, and each statement after it sees what the ones before committed (READ
-- COMMITTED), so check-then-reserve is exact across replicas; settles do not
-- take it, 0023) the counters are read (today's rows; the month's sums and the
-- open leases only when a monthly or stream limit is set), gateway_decide
-- applies the rule, and an admitted request's
-- charge is added: one query, an advanced-RAG query, a web search, a cost
-- bound (cost_reserved), a stream lease, the query in the query rates' current
-- buckets, and its pending row, which holds the web search and cost bound
-- reserved (and the rates it counts in) until settle, refund or recovery.
-- A refusal by a rate limit comes with the seconds until the request fits.
--
-- Returns the limit that refused (its 1-based index in p_meters), or NULL, and
-- the counters: after the charge when admitted, before it when refused.
--
-- p_batched: a batch of one (an admission that found no batch in flight, the
-- usual case under light load), answered as gateway_admit_many answers an
-- element - an unknown user is known = false, not an error - under the
-- batches' lock timeout (0010: the gateway then sends it again on its own).
-- The timeout is set for the call and put back before it returns, as a SET
-- clause would, which cannot be one function's for one kind of call only: a
-- wrapper function with it cost a call, a query and a tuple store more
-- (docs/performance.md). Without p_batched an unknown user raises and a row
-- lock is waited for.
--
-- Bitmap and sequential scans are off for the statements planned here: the
-- open leases are read by an index scan of the (user, expiry) index. A bitmap
-- scan of that range visits every lease deleted there since the last vacuum -
-- every answer settled within a lease's lifetime, tens of thousands after a
-- burst - at every admission, and never marks them dead; an index scan marks
-- them as it passes, so the next one skips them; a sequential scan (which the
-- planner picks under statistics taken before a burst) reads the whole table
-- for every user. Which one the planner picks depends on the statistics and
-- on when a connection plans the statement (7.3M against 0.73M instructions
-- an admission with 20,000 such leases; docs/performance.md). The clauses hold
-- for this function's own statements only: a function's plans are cached per
-- connection, whoever called it first, so gateway_team_counters, which reads
-- the team's leases, carries its own.
CREATE OR REPLACE FUNCTION gateway_admit(
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
    p_upstream text DEFAULT 'default',
    p_batched boolean DEFAULT false
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
) LANGUAGE plpgsql SET enable_bitmapscan = off SET enable_seqscan = off AS $$
DECLARE
    v_day numeric[];
    v_month numeric[];
    v_streams bigint := 0;
    v_charge numeric[];
    v_rates numeric[];
    v_bits integer := 0;
    v_retry integer;
    d record;
    i integer;
    v_team_day numeric[];
    v_team_month numeric[];
    v_team_streams bigint := 0;
    v_keys text[];
    v_team boolean := p_team IS NOT NULL AND 2 = ANY (p_scopes);
    v_monthly boolean := 2 = ANY (p_pers);
    v_streamed boolean := 10 = ANY (p_meters);
    v_expired boolean;
    v_timeout text;
    v_set text;
    v_leases bigint[];
BEGIN
    IF p_batched THEN
        -- (Assignments, not PERFORM: an expression, not a query.)
        v_timeout := current_setting('lock_timeout');
        v_set := set_config('lock_timeout', '250ms', true);
    END IF;
    -- Team scope: the team's row first - the lock every member's admission takes,
    -- so that the team's counters are checked and reserved one admission at a
    -- time - then the user's (the same order everywhere: teams, then users).
    IF v_team THEN
        PERFORM 1 FROM teams WHERE id = p_team FOR NO KEY UPDATE;
    END IF;
    -- The user's admission lock, taken if the user exists. Not the user's row:
    -- settles update it (lifetime totals), and an admission would wait for
    -- their commits (0023). The key is 64 bits of the user id's hash (a
    -- collision only makes two users' admissions queue on one lock).
    PERFORM pg_advisory_xact_lock(hashtextextended(p_user, 24)) FROM users WHERE id = p_user;
    IF NOT FOUND THEN
        IF NOT p_batched THEN
            RAISE foreign_key_violation USING MESSAGE = 'unknown user ' || p_user;
        END IF;
        v_set := set_config('lock_timeout', v_timeout, true);
        known := false;
        web_reserved := false;
        RETURN NEXT;
        RETURN;
    END IF;
    -- The counters, in one statement after the lock (a statement that waited
    -- for the lock would read other tables' rows as they were before it; one
    -- snapshot: a settle's release of a reservation and what it adds instead
    -- are both seen or neither, 0023): today's two rows (admissions' and
    -- settles'); only for a monthly limit, the month's sums (today's
    -- included); only for a stream limit, the open leases and the expired
    -- ones. Read here rather than by a helper (a call and its function
    -- scan cost more than the read), in one statement rather than four (each
    -- costs an executor start-up).
    SELECT
        ARRAY[
            coalesce(sum(u.queries) FILTER (WHERE u.day = p_day), 0),
            coalesce(sum(u.advanced_rag) FILTER (WHERE u.day = p_day), 0),
            coalesce(sum(u.web_searches) FILTER (WHERE u.day = p_day), 0),
            coalesce(sum(u.uploads) FILTER (WHERE u.day = p_day), 0),
            coalesce(sum(u.upload_bytes) FILTER (WHERE u.day = p_day), 0),
            coalesce(sum(u.prompt_tokens) FILTER (WHERE u.day = p_day), 0),
            coalesce(sum(u.completion_tokens) FILTER (WHERE u.day = p_day), 0),
            coalesce(sum(u.total_tokens) FILTER (WHERE u.day = p_day), 0),
            coalesce(sum(u.cost + u.cost_reserved) FILTER (WHERE u.day = p_day), 0)
        ]::numeric[],
        CASE WHEN v_monthly THEN ARRAY[
            coalesce(sum(u.queries), 0), coalesce(sum(u.advanced_rag), 0),
            coalesce(sum(u.web_searches), 0), coalesce(sum(u.uploads), 0),
            coalesce(sum(u.upload_bytes), 0), coalesce(sum(u.prompt_tokens), 0),
            coalesce(sum(u.completion_tokens), 0), coalesce(sum(u.total_tokens), 0),
            coalesce(sum(u.cost + u.cost_reserved), 0)
        ]::numeric[] END,
        -- The open and the expired ones in one index scan of the user's
        -- leases (a subplan less: 2% of an admission's instructions). An
        -- index scan (the SET clauses, above): it marks
        -- the settled leases' entries dead as it passes them.
        (CASE WHEN v_streamed THEN (
            SELECT ARRAY[
                count(*) FILTER (WHERE s.expires_at > p_now),
                count(*) FILTER (WHERE s.expires_at <= p_now)
            ]
            FROM stream_leases s WHERE s.user_id = p_user
        ) ELSE '{0,0}'::bigint[] END)
    -- Today's rows and the month's in one scan of the user's day rows (today's
    -- only without a monthly limit), the day's sums filtered: a subplan less
    -- than a scan each (11,000 instructions, 1% of a lone admission;
    -- docs/performance.md).
    FROM usage_daily u
    WHERE u.user_id = p_user AND u.day <= p_day
        AND u.day >= CASE WHEN v_monthly THEN p_month_start ELSE p_day END
    INTO v_day, v_month, v_leases;
    v_streams := v_leases[1];
    v_expired := v_leases[2] > 0;
    IF v_expired THEN
        -- The user's expired leases no one else is deleting (SKIP LOCKED:
        -- admission never waits for a lease). Written here, not in a LANGUAGE
        -- sql helper, which would be planned again at every call.
        DELETE FROM stream_leases WHERE id IN (
            SELECT s.id FROM stream_leases s
            WHERE s.user_id = p_user AND s.expires_at <= p_now
            FOR UPDATE SKIP LOCKED
        );
    END IF;
    IF v_team THEN
        SELECT c.day_used, c.month_used, c.streams INTO v_team_day, v_team_month, v_team_streams
        FROM gateway_team_counters(
            p_team, p_day, CASE WHEN 2 = ANY (p_pers) THEN p_month_start END, p_now
        ) c;
    END IF;
    IF 4 = ANY (p_pers) OR 5 = ANY (p_pers) THEN
        SELECT r.used, r.bits INTO v_rates, v_bits
        FROM gateway_rates(p_user, p_meters, p_pers, p_scopes, CASE WHEN v_team THEN p_team END,
            p_now) r;
    END IF;
    -- Per-model limits: each counts its own counters (their keys in p_keys).
    -- (A subquery costs an executor start-up: run only when a key is set.)
    IF array_remove(p_keys, NULL) <> '{}' THEN
        v_keys := ARRAY(SELECT DISTINCT k FROM unnest(p_keys) AS k WHERE k IS NOT NULL ORDER BY k);
    ELSE
        v_keys := '{}';
    END IF;
    IF cardinality(v_keys) > 0 THEN
        v_rates := coalesce(v_rates, array_fill(NULL::numeric, ARRAY[cardinality(p_meters)]));
        FOR i IN 1 .. cardinality(p_meters) LOOP
            IF p_keys[i] IS NOT NULL THEN
                v_rates[i] := gateway_model_used(p_user, p_keys[i], p_meters[i], p_pers[i],
                    p_day, p_month_start);
            END IF;
        END LOOP;
    END IF;
    v_charge := ARRAY[
        1, CASE WHEN p_advanced_rag THEN 1 ELSE 0 END, CASE WHEN p_web_ask THEN 1 ELSE 0 END,
        0, 0, 0, 0, 0, coalesce(p_reserve_cost, 0), CASE WHEN p_lease IS NULL THEN 0 ELSE 1 END
    ]::numeric[];
    d := gateway_decide(p_meters, p_pers, p_maxes, v_day, v_month, v_streams, v_rates,
        v_charge, p_web_optional, p_scopes, v_team_day, v_team_month, v_team_streams);
    IF d.refused IS NOT NULL THEN
        IF p_pers[d.refused] >= 4 THEN
            v_retry := gateway_rate_retry(p_user,
                CASE WHEN p_scopes[d.refused] = 2 THEN p_team END,
                p_meters[d.refused], p_pers[d.refused],
                p_maxes[d.refused], v_charge[p_meters[d.refused]], p_now);
        END IF;
        IF p_batched THEN
            v_set := set_config('lock_timeout', v_timeout, true);
        END IF;
        -- RETURN NEXT of the output columns, not RETURN QUERY (a query).
        known := true;
        refused := d.refused;
        day_used := v_day;
        month_used := v_month;
        open_streams := v_streams;
        web_reserved := false;
        rate_used := v_rates;
        retry_after := v_retry;
        team_day := v_team_day;
        team_month := v_team_month;
        team_streams := v_team_streams;
        RETURN NEXT;
        RETURN;
    END IF;
    v_charge[3] := d.web;
    -- The admissions' row of the day (part 0): settles write the other one.
    INSERT INTO usage_daily AS u (user_id, day, queries, advanced_rag, web_searches, cost_reserved)
    VALUES (p_user, p_day, 1, v_charge[2], d.web, v_charge[9])
    ON CONFLICT (user_id, day, part) DO UPDATE SET
        queries = u.queries + 1,
        advanced_rag = u.advanced_rag + excluded.advanced_rag,
        web_searches = u.web_searches + excluded.web_searches,
        cost_reserved = u.cost_reserved + excluded.cost_reserved;
    -- Only queries, advanced RAG, web searches and cost take a charge (1-3, 9).
    FOREACH i IN ARRAY ARRAY[1, 2, 3, 9] LOOP
        v_day[i] := v_day[i] + v_charge[i];
        IF v_month IS NOT NULL THEN
            v_month[i] := v_month[i] + v_charge[i];
        END IF;
    END LOOP;
    IF cardinality(v_keys) > 0 THEN
        PERFORM gateway_add_models(p_user, v_keys, p_day, 1, 0, 0, 0, 0, v_charge[9], 0::smallint);
        FOR i IN 1 .. cardinality(p_meters) LOOP
            IF p_keys[i] IS NOT NULL AND p_meters[i] IN (1, 9) THEN
                v_rates[i] := v_rates[i] + v_charge[p_meters[i]];
            END IF;
        END LOOP;
    END IF;
    IF v_bits & 3 <> 0 THEN
        v_rates := gateway_count_query_rates(p_user, p_meters, p_pers, v_rates, v_bits, p_now);
    END IF;
    IF p_lease IS NOT NULL THEN
        INSERT INTO stream_leases (id, user_id, expires_at) VALUES (p_lease, p_user, p_lease_expires);
        v_streams := v_streams + 1;
    END IF;
    IF p_pending IS NOT NULL THEN
        INSERT INTO pending_answers (
            id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
            total_tokens, cost, currency, web_searches, reserved_cost, rates, scopes, upstream
        ) VALUES (
            p_pending, p_user, p_day, p_now, p_endpoint, p_prompt, p_completion,
            p_total, p_cost, p_currency, d.web, v_charge[9], v_bits, v_keys, p_upstream
        );
    END IF;
    IF v_team THEN
        -- The team's counters after this request, as the user's.
        FOREACH i IN ARRAY ARRAY[1, 2, 3, 9] LOOP
            v_team_day[i] := v_team_day[i] + v_charge[i];
            IF v_team_month IS NOT NULL THEN
                v_team_month[i] := v_team_month[i] + v_charge[i];
            END IF;
        END LOOP;
        v_team_streams := v_team_streams + v_charge[10];
    END IF;
    IF p_batched THEN
        v_set := set_config('lock_timeout', v_timeout, true);
    END IF;
    known := true;
    day_used := v_day;
    month_used := v_month;
    open_streams := v_streams;
    web_reserved := d.web > 0;
    rate_used := v_rates;
    team_day := v_team_day;
    team_month := v_team_month;
    team_streams := v_team_streams;
    RETURN NEXT;
END
$$;
