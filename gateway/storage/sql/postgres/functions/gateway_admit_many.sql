-- Group commit of admissions (gateway/storage/group.py): many admissions in one
-- round trip and one transaction, deciding exactly what gateway_admit would
-- one after another in (user, position) order - each element against the
-- counters the elements before it left, kept in memory - but writing each
-- user's day row once per batch. Each element's limits are a slice (from,
-- count) of the shared limit arrays. Lock order as everywhere: teams' rows,
-- users' admission locks (gateway_admit) in user order, then day rows. A batch
-- waits at most 250 ms for a lock: the
-- gateway then sends the elements one by one (0010). Bitmap and sequential
-- scans are off, as in gateway_admit (its leases' reads).
CREATE OR REPLACE FUNCTION gateway_admit_many(
    p_users text[],
    p_days date[],
    p_month_starts date[],
    p_limit_from integer[],
    p_limit_count integer[],
    p_meters smallint[],
    p_pers smallint[],
    p_maxes numeric[],
    p_scopes smallint[],
    p_keys text[],
    p_leases text[],
    p_lease_expires timestamptz[],
    p_now timestamptz[],
    p_advanced_rag boolean[],
    p_pending text[],
    p_endpoints text[],
    p_prompt bigint[],
    p_completion bigint[],
    p_total bigint[],
    p_cost numeric[],
    p_currency text[],
    p_web_ask boolean[],
    p_web_optional boolean[],
    p_reserve_cost numeric[],
    p_teams text[],
    -- The upstreams the answers are sent to (0017; NULL: 'default').
    p_upstreams text[] DEFAULT NULL
) RETURNS TABLE (
    ord integer,
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
) LANGUAGE plpgsql SET lock_timeout = '250ms' SET enable_bitmapscan = off SET enable_seqscan = off AS $$
DECLARE
    e record;
    n integer := cardinality(p_users);
    v_admitted boolean[] := array_fill(false, ARRAY[cardinality(p_users)]);
    v_searches integer[] := array_fill(0, ARRAY[cardinality(p_users)]);
    v_bits integer[] := array_fill(0, ARRAY[cardinality(p_users)]);
    v_pers smallint[];
    v_maxes numeric[];
    v_rates numeric[];
    v_retry integer;
    v_bit integer;
    -- The month's rows are read when an element of the batch has a monthly limit.
    v_months boolean := 2 = ANY (p_pers);
    -- Its users' leases are read when an element has a stream limit.
    v_streams_any boolean := 10 = ANY (p_meters);
    v_leased boolean;
    v_read timestamptz[];
    v_expired boolean;
    v_user text;
    v_day date;
    v_month date;
    v_known boolean := false;
    v_used_day numeric[];
    v_used_month numeric[];
    v_expiries timestamptz[];
    v_counted boolean := false;
    v_leases bigint := 0;
    v_streams bigint;
    v_charge numeric[];
    v_meters smallint[];
    -- The limit slice in hand (elements with the same limits share one: the
    -- gateway sends a set once per batch) and what it asks for.
    v_from integer;
    v_count integer;
    v_rated boolean;
    v_streamed boolean;
    v_monthly boolean;
    v_new numeric[] := array_fill(0, ARRAY[9])::numeric[];
    i integer;
    x timestamptz;
    m smallint;
    v_used numeric;
    v_refused integer;
    v_web integer;
BEGIN
    IF n = 1 THEN
        RETURN QUERY SELECT 1, a.* FROM gateway_admit(
            p_users[1], p_days[1], p_month_starts[1],
            p_meters[p_limit_from[1]:p_limit_from[1] + p_limit_count[1] - 1],
            p_pers[p_limit_from[1]:p_limit_from[1] + p_limit_count[1] - 1],
            p_maxes[p_limit_from[1]:p_limit_from[1] + p_limit_count[1] - 1],
            p_scopes[p_limit_from[1]:p_limit_from[1] + p_limit_count[1] - 1],
            p_keys[p_limit_from[1]:p_limit_from[1] + p_limit_count[1] - 1],
            p_leases[1], p_lease_expires[1], p_now[1], p_advanced_rag[1], p_pending[1],
            p_endpoints[1], p_prompt[1], p_completion[1], p_total[1], p_cost[1],
            p_currency[1], p_web_ask[1], p_web_optional[1], p_reserve_cost[1], p_teams[1],
            coalesce(p_upstreams[1], 'default'), true
        ) AS a;
        RETURN;
    END IF;
    IF 2 = ANY (p_scopes) OR array_remove(p_keys, NULL) <> '{}' THEN
        -- Team-scope or per-model limits: the elements go through gateway_admit one after
        -- another, each seeing what the ones before it reserved for the team. The
        -- batch's teams are locked first (gateway_admit locks a team before its
        -- user), then the elements go in (user, position) order: a user's in the
        -- order they were made, those with the team's limits and those without
        -- (a reload between them) alike.
        IF 2 = ANY (p_scopes) THEN
            PERFORM 1 FROM teams WHERE id = ANY (p_teams) ORDER BY id FOR NO KEY UPDATE;
        END IF;
        FOR e IN
            SELECT t.ord FROM unnest(p_users) WITH ORDINALITY AS t(user_id, ord)
            ORDER BY t.user_id, t.ord
        LOOP
            RETURN QUERY SELECT e.ord::integer, a.* FROM gateway_admit(
                p_users[e.ord], p_days[e.ord], p_month_starts[e.ord],
                p_meters[p_limit_from[e.ord]:p_limit_from[e.ord] + p_limit_count[e.ord] - 1],
                p_pers[p_limit_from[e.ord]:p_limit_from[e.ord] + p_limit_count[e.ord] - 1],
                p_maxes[p_limit_from[e.ord]:p_limit_from[e.ord] + p_limit_count[e.ord] - 1],
                p_scopes[p_limit_from[e.ord]:p_limit_from[e.ord] + p_limit_count[e.ord] - 1],
                p_keys[p_limit_from[e.ord]:p_limit_from[e.ord] + p_limit_count[e.ord] - 1],
                p_leases[e.ord], p_lease_expires[e.ord], p_now[e.ord], p_advanced_rag[e.ord],
                p_pending[e.ord], p_endpoints[e.ord], p_prompt[e.ord], p_completion[e.ord],
                p_total[e.ord], p_cost[e.ord], p_currency[e.ord], p_web_ask[e.ord],
                p_web_optional[e.ord], p_reserve_cost[e.ord], p_teams[e.ord],
                coalesce(p_upstreams[e.ord], 'default'), true
            ) AS a;
        END LOOP;
        RETURN;
    END IF;
    FOR e IN
        SELECT * FROM unnest(
            p_users, p_days, p_month_starts, p_limit_from, p_limit_count, p_leases, p_now,
            p_advanced_rag, p_web_ask, p_web_optional, p_reserve_cost
        ) WITH ORDINALITY AS t(
            user_id, day, month_start, limit_from, limit_count, lease, now, advanced_rag,
            web_ask, web_optional, reserve, ord
        )
        ORDER BY t.user_id, t.ord
    LOOP
        IF v_user IS DISTINCT FROM e.user_id OR v_day <> e.day OR v_month <> e.month_start
        THEN
            IF v_new[1] > 0 THEN
                -- What the batch admitted for this user and day, added to the day row once.
                INSERT INTO usage_daily AS u (user_id, day, queries, advanced_rag, web_searches, cost_reserved)
                VALUES (v_user, v_day, v_new[1], v_new[2], v_new[3], v_new[9])
                ON CONFLICT (user_id, day, part) DO UPDATE SET
                    queries = u.queries + excluded.queries,
                    advanced_rag = u.advanced_rag + excluded.advanced_rag,
                    web_searches = u.web_searches + excluded.web_searches,
                    cost_reserved = u.cost_reserved + excluded.cost_reserved;
                v_new := array_fill(0, ARRAY[9])::numeric[];
            END IF;
            IF v_user IS DISTINCT FROM e.user_id THEN
                PERFORM pg_advisory_xact_lock(hashtextextended(e.user_id, 24))
                FROM users WHERE id = e.user_id;
                v_known := FOUND;
                v_counted := false;
                v_leases := 0;
            END IF;
            v_user := e.user_id;
            v_day := e.day;
            v_month := e.month_start;
            IF v_known THEN
                -- The counters, read as in gateway_admit, in one statement;
                -- a new user's leases (when an element has a stream limit)
                -- read with them, once per user.
                v_leased := v_streams_any AND NOT v_counted;
                SELECT
                    (
                        SELECT ARRAY[
                            coalesce(sum(u.queries), 0), coalesce(sum(u.advanced_rag), 0),
                            coalesce(sum(u.web_searches), 0), coalesce(sum(u.uploads), 0),
                            coalesce(sum(u.upload_bytes), 0), coalesce(sum(u.prompt_tokens), 0),
                            coalesce(sum(u.completion_tokens), 0),
                            coalesce(sum(u.total_tokens), 0),
                            coalesce(sum(u.cost + u.cost_reserved), 0)
                        ]::numeric[]
                        FROM usage_daily u WHERE u.user_id = v_user AND u.day = v_day
                    ),
                    CASE WHEN v_months THEN (
                        SELECT ARRAY[
                            coalesce(sum(u.queries), 0), coalesce(sum(u.advanced_rag), 0),
                            coalesce(sum(u.web_searches), 0), coalesce(sum(u.uploads), 0),
                            coalesce(sum(u.upload_bytes), 0), coalesce(sum(u.prompt_tokens), 0),
                            coalesce(sum(u.completion_tokens), 0),
                            coalesce(sum(u.total_tokens), 0),
                            coalesce(sum(u.cost + u.cost_reserved), 0)
                        ]::numeric[]
                        FROM usage_daily u
                        WHERE u.user_id = v_user AND u.day >= v_month AND u.day <= v_day
                    ) END,
                    CASE WHEN v_leased THEN ARRAY(
                        SELECT s.expires_at FROM stream_leases s
                        WHERE s.user_id = v_user AND s.expires_at > e.now
                    ) END,
                    v_leased AND EXISTS (
                        SELECT 1 FROM stream_leases s
                        WHERE s.user_id = v_user AND s.expires_at <= e.now
                    )
                INTO v_used_day, v_used_month, v_read, v_expired;
                IF v_leased THEN
                    v_expiries := v_read;
                    v_counted := true;
                END IF;
                IF v_expired THEN
                    -- As in gateway_admit.
                    DELETE FROM stream_leases WHERE id IN (
                        SELECT s.id FROM stream_leases s
                        WHERE s.user_id = v_user AND s.expires_at <= e.now
                        FOR UPDATE SKIP LOCKED
                    );
                END IF;
            END IF;
        END IF;
        -- Each element's row goes out with RETURN NEXT (the output columns
        -- assigned): a RETURN QUERY would start an executor per element.
        ord := e.ord;
        IF NOT v_known THEN
            known := false;
            refused := NULL;
            day_used := NULL;
            month_used := NULL;
            open_streams := 0;
            web_reserved := false;
            rate_used := NULL;
            retry_after := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF v_from IS DISTINCT FROM e.limit_from OR v_count <> e.limit_count THEN
            v_from := e.limit_from;
            v_count := e.limit_count;
            v_meters := p_meters[v_from:v_from + v_count - 1];
            v_pers := p_pers[v_from:v_from + v_count - 1];
            v_maxes := p_maxes[v_from:v_from + v_count - 1];
            v_rated := 4 = ANY (v_pers) OR 5 = ANY (v_pers);
            v_streamed := 10 = ANY (v_meters);
            v_monthly := 2 = ANY (v_pers);
        END IF;
        v_streams := 0;
        v_rates := NULL;
        v_retry := NULL;
        IF v_rated THEN
            -- Rate buckets are written as each element is admitted (below), so
            -- this reads what the elements before it counted.
            SELECT r.used, r.bits INTO v_rates, v_bit
            FROM gateway_rates(v_user, v_meters, v_pers, NULL, NULL, e.now) r;
            v_bits[e.ord] := v_bit;
        END IF;
        IF v_streamed THEN
            -- Counted in PL/pgSQL, not by a statement (an executor start-up per element).
            v_streams := v_leases;
            FOREACH x IN ARRAY v_expiries LOOP
                IF x > e.now THEN
                    v_streams := v_streams + 1;
                END IF;
            END LOOP;
        END IF;
        v_charge := ARRAY[
            1, CASE WHEN e.advanced_rag THEN 1 ELSE 0 END, CASE WHEN e.web_ask THEN 1 ELSE 0 END,
            0, 0, 0, 0, 0, coalesce(e.reserve, 0), CASE WHEN e.lease IS NULL THEN 0 ELSE 1 END
        ]::numeric[];
        -- gateway_decide's rule for a user's own limits, written out: here it
        -- runs for every element, and the call cost more than the rule (a
        -- third of an element's work in a batch of one user's answers). Kept
        -- the same as gateway_decide; tests/storage/test_quota_model.py checks
        -- both against the Python rule.
        v_refused := NULL;
        v_web := v_charge[3]::integer;
        IF v_web > 0 THEN
            FOR i IN 1 .. v_count LOOP
                CONTINUE WHEN v_meters[i] <> 3;
                v_used := CASE v_pers[i] WHEN 1 THEN v_used_day[3] ELSE v_used_month[3] END;
                IF v_used + v_web > v_maxes[i] THEN
                    IF e.web_optional THEN
                        v_web := 0;
                        EXIT;
                    END IF;
                    v_refused := i;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF v_refused IS NULL THEN
            FOR i IN 1 .. v_count LOOP
                m := v_meters[i];
                CONTINUE WHEN m = 3;
                IF v_rates[i] IS NOT NULL THEN
                    v_used := v_rates[i];
                ELSE
                    v_used := CASE v_pers[i]
                        WHEN 1 THEN v_used_day[m] WHEN 2 THEN v_used_month[m] WHEN 3 THEN v_streams
                    END;
                END IF;
                IF (v_charge[m] > 0 AND v_used + v_charge[m] > v_maxes[i])
                    OR (m BETWEEN 6 AND 9 AND v_used >= v_maxes[i])
                THEN
                    v_refused := i;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF v_refused IS NULL THEN
            v_charge[3] := v_web;
            v_admitted[e.ord] := true;
            v_searches[e.ord] := v_web;
            -- Only queries, advanced RAG, web searches and cost take a charge;
            -- the query's always, the others' when there is one (each array
            -- element written costs: this runs for every element).
            v_used_day[1] := v_used_day[1] + 1;
            IF v_used_month IS NOT NULL THEN
                v_used_month[1] := v_used_month[1] + 1;
            END IF;
            v_new[1] := v_new[1] + 1;
            IF v_charge[2] <> 0 OR v_charge[3] <> 0 OR v_charge[9] <> 0 THEN
                FOREACH i IN ARRAY ARRAY[2, 3, 9] LOOP
                    v_used_day[i] := v_used_day[i] + v_charge[i];
                    IF v_used_month IS NOT NULL THEN
                        v_used_month[i] := v_used_month[i] + v_charge[i];
                    END IF;
                    v_new[i] := v_new[i] + v_charge[i];
                END LOOP;
            END IF;
            IF e.lease IS NOT NULL THEN
                v_leases := v_leases + 1;
                v_streams := v_streams + 1;
            END IF;
            IF v_bits[e.ord] & 3 <> 0 THEN
                v_rates := gateway_count_query_rates(v_user, v_meters, v_pers, v_rates,
                    v_bits[e.ord], e.now);
            END IF;
        ELSE
            v_web := 0;
            IF v_pers[v_refused] >= 4 THEN
                v_retry := gateway_rate_retry(v_user, NULL, v_meters[v_refused],
                    v_pers[v_refused], v_maxes[v_refused], v_charge[v_meters[v_refused]], e.now);
            END IF;
        END IF;
        known := true;
        refused := v_refused;
        day_used := v_used_day;
        -- The month's counters only for an element with a monthly limit, as
        -- gateway_admit returns them.
        month_used := CASE WHEN v_monthly THEN v_used_month END;
        open_streams := v_streams;
        web_reserved := v_web > 0;
        rate_used := v_rates;
        retry_after := v_retry;
        RETURN NEXT;
    END LOOP;
    IF v_new[1] > 0 THEN
        INSERT INTO usage_daily AS u (user_id, day, queries, advanced_rag, web_searches, cost_reserved)
        VALUES (v_user, v_day, v_new[1], v_new[2], v_new[3], v_new[9])
        ON CONFLICT (user_id, day, part) DO UPDATE SET
            queries = u.queries + excluded.queries,
            advanced_rag = u.advanced_rag + excluded.advanced_rag,
            web_searches = u.web_searches + excluded.web_searches,
            cost_reserved = u.cost_reserved + excluded.cost_reserved;
    END IF;
    INSERT INTO stream_leases (id, user_id, expires_at)
    SELECT t.lease, t.user_id, t.expires
    FROM unnest(p_leases, p_users, p_lease_expires) WITH ORDINALITY AS t(lease, user_id, expires, ord)
    WHERE v_admitted[t.ord] AND t.lease IS NOT NULL
    ORDER BY t.user_id, t.ord;
    INSERT INTO pending_answers (
        id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
        total_tokens, cost, currency, web_searches, reserved_cost, rates, upstream
    )
    SELECT t.pending, t.user_id, t.day, t.now, t.endpoint, t.prompt, t.completion, t.total,
        t.cost, t.currency, v_searches[t.ord], coalesce(t.reserve, 0), v_bits[t.ord],
        coalesce(t.upstream, 'default')
    FROM unnest(
        p_pending, p_users, p_days, p_now, p_endpoints, p_prompt, p_completion, p_total,
        p_cost, p_currency, p_reserve_cost, p_upstreams
    ) WITH ORDINALITY AS t(
        pending, user_id, day, now, endpoint, prompt, completion, total, cost, currency,
        reserve, upstream, ord
    )
    WHERE v_admitted[t.ord] AND t.pending IS NOT NULL
    ORDER BY t.user_id, t.ord;
END
$$;
