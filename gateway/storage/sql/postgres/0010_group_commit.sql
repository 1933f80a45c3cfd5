-- Group commit: many admissions, or many settles, in one call - so one round
-- trip and one transaction (one commit, one WAL flush) for a whole batch, and
-- one write of each row the batch touches: a user's day row and lifetime totals
-- are updated once per batch, however many of the user's answers it holds.
--
-- A batch decides and writes exactly what its elements would, sent one by one
-- in (user, position) order through 0008's and 0009's functions:
-- tests/storage/test_group_commit.py runs random batches both ways and compares
-- every table. Admission is sequential within a user - each element is checked
-- against the counters the elements before it left - but the counters are kept
-- in memory and written once. A settle batch writes set by set.
--
-- The elements come as parallel arrays, one element per answer; the functions
-- return one row per element, `ord` being its position (from 1) in the arrays.
--
-- Lock order, as everywhere (0008): pending rows, then leases, then users'
-- rows, then day rows; users' rows in user order. Admission batches go user by
-- user in user order; a settle batch claims its pending rows and releases its
-- leases first, then locks all its users' rows in user order before it writes
-- any of them. So no two batches, of any replica, wait for each other in a
-- circle, and neither waits in a circle with a recovery (which never waits for
-- a pending row: SKIP LOCKED).
--
-- Expired leases. Admission used to delete a user's expired leases after
-- locking the user's row, while settles and recoveries delete a lease before
-- locking the user's: a cycle, which PostgreSQL broke as a deadlock (an expired
-- lease is exactly what a recovery, or a settle after a long answer, deletes).
-- Admission now counts only the leases still open and removes expired ones it
-- can lock without waiting (gateway_drop_expired_leases, SKIP LOCKED), so it
-- never waits for a lease; 0003's gateway_admit is replaced to do the same.
--
-- A batch is one transaction: an error in any element (a duplicate pending id,
-- a user deleted meanwhile) rolls the whole batch back, and the gateway then
-- sends that batch's elements again, each on its own, so that only the element
-- at fault fails (gateway/storage/group.py). A batch waits at most 250 ms for a
-- row lock (lock_timeout): a row held elsewhere - another replica's long batch,
-- an admin's transaction - would otherwise hold up every user in the batch, and
-- behind it every batch of the process; the calls then go on their own, and
-- only the held user's wait.

-- Removes the user's leases expired at p_now that no one else is deleting.
CREATE FUNCTION gateway_drop_expired_leases(p_user text, p_now timestamptz)
RETURNS void LANGUAGE sql AS $$
    DELETE FROM stream_leases WHERE id IN (
        SELECT id FROM stream_leases
        WHERE user_id = p_user AND expires_at <= p_now
        FOR UPDATE SKIP LOCKED
    );
$$;

-- 0003's gateway_admit with one change: open streams are the leases not yet
-- expired, and expired ones are removed without waiting for them (see above).
CREATE OR REPLACE FUNCTION gateway_admit(
    p_user text,
    p_day date,
    p_month_start date,
    p_queries bigint,
    p_tokens_day bigint,
    p_tokens_month bigint,
    p_streams bigint,
    p_lease text,
    p_lease_expires timestamptz,
    p_now timestamptz,
    p_advanced_rag boolean
) RETURNS TABLE (
    refused_by text,
    queries bigint,
    tokens_today bigint,
    tokens_month bigint,
    web_searches bigint,
    open_streams bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_queries bigint;
    v_tokens bigint;
    v_web bigint;
    v_prev bigint;
    v_streams bigint := 0;
    v_refused text;
BEGIN
    PERFORM 1 FROM users WHERE id = p_user FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE foreign_key_violation USING MESSAGE = 'unknown user ' || p_user;
    END IF;
    SELECT d.queries, d.total_tokens, d.web_searches INTO v_queries, v_tokens, v_web
    FROM usage_daily d WHERE d.user_id = p_user AND d.day = p_day;
    v_queries := coalesce(v_queries, 0);
    v_tokens := coalesce(v_tokens, 0);
    v_web := coalesce(v_web, 0);
    SELECT coalesce(sum(d.total_tokens), 0) INTO v_prev
    FROM usage_daily d WHERE d.user_id = p_user AND d.day >= p_month_start AND d.day < p_day;
    IF p_streams IS NOT NULL THEN
        PERFORM gateway_drop_expired_leases(p_user, p_now);
        SELECT count(*) INTO v_streams FROM stream_leases l
        WHERE l.user_id = p_user AND l.expires_at > p_now;
    END IF;

    v_refused := CASE
        WHEN p_queries IS NOT NULL AND v_queries >= p_queries THEN 'queries_per_day'
        WHEN p_tokens_day IS NOT NULL AND v_tokens >= p_tokens_day THEN 'tokens_per_day'
        WHEN p_tokens_month IS NOT NULL AND v_prev + v_tokens >= p_tokens_month THEN 'tokens_per_month'
        WHEN p_streams IS NOT NULL AND v_streams >= p_streams THEN 'max_concurrent_streams'
    END;
    IF v_refused IS NULL THEN
        INSERT INTO usage_daily AS d (user_id, day, queries, advanced_rag)
        VALUES (p_user, p_day, 1, CASE WHEN p_advanced_rag THEN 1 ELSE 0 END)
        ON CONFLICT (user_id, day) DO UPDATE SET
            queries = d.queries + 1,
            advanced_rag = d.advanced_rag + excluded.advanced_rag;
        v_queries := v_queries + 1;
        IF p_lease IS NOT NULL THEN
            INSERT INTO stream_leases (id, user_id, expires_at) VALUES (p_lease, p_user, p_lease_expires);
            v_streams := v_streams + 1;
        END IF;
    END IF;
    RETURN QUERY SELECT v_refused, v_queries, v_tokens, v_prev + v_tokens, v_web, v_streams;
END
$$;

-- Admissions: the arguments of 0008's gateway_admit, as arrays. An element whose
-- user is unknown is answered with `known` false and nothing written (the single
-- function raises instead, which here would abort the whole batch).
CREATE FUNCTION gateway_admit_many(
    p_users text[],
    p_days date[],
    p_month_starts date[],
    p_queries bigint[],
    p_tokens_day bigint[],
    p_tokens_month bigint[],
    p_streams bigint[],
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
    p_currency text[]
) RETURNS TABLE (
    ord integer,
    known boolean,
    refused_by text,
    queries bigint,
    tokens_today bigint,
    tokens_month bigint,
    web_searches bigint,
    open_streams bigint
) LANGUAGE plpgsql SET lock_timeout = '250ms' AS $$
DECLARE
    e record;
    v_admitted boolean[] := array_fill(false, ARRAY[cardinality(p_users)]);
    -- The user (and day and month) whose counters are loaded.
    v_user text;
    v_day date;
    v_month date;
    v_known boolean := false;
    v_queries bigint;
    v_tokens bigint;
    v_web bigint;
    v_prev bigint;
    -- The user's open leases: their expiry times, read at the first element
    -- with a stream limit; each element counts those still open at its own
    -- time, plus the leases this batch added (v_leases).
    v_expiries timestamptz[];
    v_streams bigint := 0;
    v_counted boolean := false;
    v_leases bigint := 0;
    -- This run's admissions, not yet added to the day row.
    v_new bigint := 0;
    v_new_rag bigint := 0;
    v_refused text;
    v_shown bigint;
BEGIN
    -- A batch of one is the single function (cheaper than the loop below),
    -- after the check for an unknown user that the single function makes by
    -- raising. The function's lock_timeout holds for it too.
    IF cardinality(p_users) = 1 THEN
        IF NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p_users[1]) THEN
            RETURN QUERY SELECT 1, false, NULL::text, NULL::bigint, NULL::bigint,
                NULL::bigint, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        RETURN QUERY SELECT 1, true, a.* FROM gateway_admit(
            p_users[1], p_days[1], p_month_starts[1], p_queries[1], p_tokens_day[1],
            p_tokens_month[1], p_streams[1], p_leases[1], p_lease_expires[1], p_now[1],
            p_advanced_rag[1], p_pending[1], p_endpoints[1], p_prompt[1], p_completion[1],
            p_total[1], p_cost[1], p_currency[1]
        ) AS a;
        RETURN;
    END IF;
    FOR e IN
        SELECT * FROM unnest(
            p_users, p_days, p_month_starts, p_queries, p_tokens_day, p_tokens_month,
            p_streams, p_leases, p_now, p_advanced_rag
        ) WITH ORDINALITY AS t(
            user_id, day, month_start, queries, tokens_day, tokens_month, streams, lease,
            now, advanced_rag, ord
        )
        ORDER BY t.user_id, t.ord
    LOOP
        IF v_user IS DISTINCT FROM e.user_id OR v_day <> e.day
            OR v_month <> e.month_start
        THEN
            -- A new run: the last one's admissions go to its day row first, so
            -- that counters read from now on include them.
            IF v_new > 0 THEN
                INSERT INTO usage_daily AS d (user_id, day, queries, advanced_rag)
                VALUES (v_user, v_day, v_new, v_new_rag)
                ON CONFLICT (user_id, day) DO UPDATE SET
                    queries = d.queries + excluded.queries,
                    advanced_rag = d.advanced_rag + excluded.advanced_rag;
                v_new := 0;
                v_new_rag := 0;
            END IF;
            IF v_user IS DISTINCT FROM e.user_id THEN
                -- 0003's lock: the user's admissions and settles queue here.
                PERFORM 1 FROM users WHERE id = e.user_id FOR NO KEY UPDATE;
                v_known := FOUND;
                v_counted := false;
                v_leases := 0;
            END IF;
            v_user := e.user_id;
            v_day := e.day;
            v_month := e.month_start;
            IF v_known THEN
                SELECT d.queries, d.total_tokens, d.web_searches
                INTO v_queries, v_tokens, v_web
                FROM usage_daily d WHERE d.user_id = v_user AND d.day = v_day;
                v_queries := coalesce(v_queries, 0);
                v_tokens := coalesce(v_tokens, 0);
                v_web := coalesce(v_web, 0);
                SELECT coalesce(sum(d.total_tokens), 0) INTO v_prev
                FROM usage_daily d
                WHERE d.user_id = v_user AND d.day >= v_month AND d.day < v_day;
            END IF;
        END IF;
        IF NOT v_known THEN
            -- The single function raises foreign_key_violation; here that would
            -- abort the whole batch, so the element is answered as unknown.
            RETURN QUERY SELECT e.ord::integer, false, NULL::text, 0::bigint, 0::bigint,
                0::bigint, 0::bigint, 0::bigint;
            CONTINUE;
        END IF;
        IF e.streams IS NOT NULL THEN
            IF NOT v_counted THEN
                PERFORM gateway_drop_expired_leases(v_user, e.now);
                v_expiries := ARRAY(
                    SELECT l.expires_at FROM stream_leases l
                    WHERE l.user_id = v_user AND l.expires_at > e.now
                );
                v_counted := true;
            END IF;
            SELECT count(*) + v_leases INTO v_streams
            FROM unnest(v_expiries) AS x(expires_at) WHERE x.expires_at > e.now;
        END IF;
        -- 0003's decision, in 0003's order.
        v_refused := CASE
            WHEN e.queries IS NOT NULL AND v_queries >= e.queries THEN 'queries_per_day'
            WHEN e.tokens_day IS NOT NULL AND v_tokens >= e.tokens_day THEN 'tokens_per_day'
            WHEN e.tokens_month IS NOT NULL AND v_prev + v_tokens >= e.tokens_month
                THEN 'tokens_per_month'
            WHEN e.streams IS NOT NULL AND v_streams >= e.streams THEN 'max_concurrent_streams'
        END;
        -- Without a stream limit 0003 counts no leases: it reports the lease it
        -- took, if any.
        v_shown := 0;
        IF v_refused IS NULL THEN
            v_admitted[e.ord] := true;
            v_queries := v_queries + 1;
            v_new := v_new + 1;
            IF e.advanced_rag THEN
                v_new_rag := v_new_rag + 1;
            END IF;
            IF e.lease IS NOT NULL THEN
                -- Its lease outlives the batch: it counts for every later element.
                v_leases := v_leases + 1;
                v_streams := v_streams + 1;
                v_shown := 1;
            END IF;
        END IF;
        IF e.streams IS NOT NULL THEN
            v_shown := v_streams;
        END IF;
        RETURN QUERY SELECT e.ord::integer, true, v_refused, v_queries, v_tokens,
            v_prev + v_tokens, v_web, v_shown;
    END LOOP;
    IF v_new > 0 THEN
        INSERT INTO usage_daily AS d (user_id, day, queries, advanced_rag)
        VALUES (v_user, v_day, v_new, v_new_rag)
        ON CONFLICT (user_id, day) DO UPDATE SET
            queries = d.queries + excluded.queries,
            advanced_rag = d.advanced_rag + excluded.advanced_rag;
    END IF;
    -- The admitted elements' leases and pending rows (0008), each set at once.
    INSERT INTO stream_leases (id, user_id, expires_at)
    SELECT t.lease, t.user_id, t.expires
    FROM unnest(p_leases, p_users, p_lease_expires) WITH ORDINALITY AS t(lease, user_id, expires, ord)
    WHERE v_admitted[t.ord] AND t.lease IS NOT NULL
    ORDER BY t.user_id, t.ord;
    INSERT INTO pending_answers (
        id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
        total_tokens, cost, currency
    )
    SELECT t.pending, t.user_id, t.day, t.now, t.endpoint, t.prompt, t.completion, t.total,
        t.cost, t.currency
    FROM unnest(
        p_pending, p_users, p_days, p_now, p_endpoints, p_prompt, p_completion, p_total,
        p_cost, p_currency
    ) WITH ORDINALITY AS t(
        pending, user_id, day, now, endpoint, prompt, completion, total, cost, currency, ord
    )
    WHERE v_admitted[t.ord] AND t.pending IS NOT NULL
    ORDER BY t.user_id, t.ord;
END
$$;

-- Settles: the arguments of 0009's gateway_settle, as arrays, except for the
-- alert checks. An element's checks are a slice of the check arrays (from
-- p_check_from, p_check_count long), its channels a slice of p_channels; an
-- element with no checks has a count of 0. Crossings are compared with the
-- counters after the whole batch (as a single settle compares them after its
-- own answer); a check that several of a user's elements carry (the same
-- limit, value and threshold) is made once, as of the latest day among them
-- (a month's sum runs to that day) and with the last one's time.
CREATE FUNCTION gateway_settle_many(
    p_answer_ids text[],
    p_users text[],
    p_days date[],
    p_created_at timestamptz[],
    p_endpoints text[],
    p_prompt bigint[],
    p_completion bigint[],
    p_total bigint[],
    p_cost numeric[],
    p_currency text[],
    p_outcomes text[],
    p_estimated boolean[],
    p_web_searches integer[],
    p_conversations text[],
    p_requests text[],
    p_upstream_ms double precision[],
    p_overhead_ms double precision[],
    p_leases text[],
    p_pending text[],
    p_models text[],
    p_cached bigint[],
    p_reasoning bigint[],
    p_month_starts date[],
    p_check_from integer[],
    p_check_count integer[],
    p_channel_from integer[],
    p_channel_count integer[],
    p_kinds text[],
    p_periods text[],
    p_values bigint[],
    p_thresholds integer[],
    p_channels text[]
) RETURNS TABLE (ord integer, settled boolean) LANGUAGE plpgsql
SET lock_timeout = '250ms' AS $$
DECLARE
    v_claimed text[];
    v_candidates bigint[];
    v_inserted text[];
    v_settled boolean[];
BEGIN
    -- A batch of one (a settle that found no batch in flight, the usual case
    -- under light load) is the single function: it does the same, for about
    -- half the CPU of the set-based path below. The function's lock_timeout
    -- holds for it too.
    IF cardinality(p_answer_ids) = 1 THEN
        RETURN QUERY SELECT 1, gateway_settle(
            p_answer_ids[1], p_users[1], p_days[1], p_created_at[1], p_endpoints[1],
            p_prompt[1], p_completion[1], p_total[1], p_cost[1], p_currency[1],
            p_outcomes[1], p_estimated[1], p_web_searches[1], p_conversations[1],
            p_requests[1], p_upstream_ms[1], p_overhead_ms[1], p_leases[1], p_pending[1],
            p_models[1], p_cached[1], p_reasoning[1], p_month_starts[1],
            p_kinds[p_check_from[1]:p_check_from[1] + p_check_count[1] - 1],
            p_periods[p_check_from[1]:p_check_from[1] + p_check_count[1] - 1],
            p_values[p_check_from[1]:p_check_from[1] + p_check_count[1] - 1],
            p_thresholds[p_check_from[1]:p_check_from[1] + p_check_count[1] - 1],
            p_channels[p_channel_from[1]:p_channel_from[1] + p_channel_count[1] - 1]
        );
        RETURN;
    END IF;
    -- 0008's claim: every pending row of the batch at once, in the index's order.
    WITH claimed AS (
        DELETE FROM pending_answers WHERE id = ANY (p_pending) RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO v_claimed FROM claimed;
    -- Settled or not, an answer's lease goes (0002, 0008).
    DELETE FROM stream_leases WHERE id = ANY (p_leases);

    -- The elements that may write a ledger row: those naming no pending row
    -- (the answer id's unique rule alone decides) and, of those naming a
    -- pending row this batch claimed, the first in (user, position) order;
    -- then, of those with the same answer id, the first.
    SELECT coalesce(array_agg(c.ord), '{}') INTO v_candidates FROM (
        SELECT DISTINCT ON (f.answer_id) f.ord FROM (
            SELECT DISTINCT ON (coalesce(t.pending, '#' || t.ord)) t.answer_id, t.user_id, t.ord
            FROM unnest(p_answer_ids, p_users, p_pending)
                WITH ORDINALITY AS t(answer_id, user_id, pending, ord)
            WHERE t.pending IS NULL OR t.pending = ANY (v_claimed)
            ORDER BY coalesce(t.pending, '#' || t.ord), t.user_id, t.ord
        ) f
        ORDER BY f.answer_id, f.user_id, f.ord
    ) c;

    WITH written AS (
        INSERT INTO usage_events (
            answer_id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
            total_tokens, cost, currency, outcome, estimated, web_searches, conversation_id,
            request_id, upstream_latency_ms, overhead_ms, model, cached_tokens,
            reasoning_tokens
        )
        SELECT t.answer_id, t.user_id, t.day, t.created_at, t.endpoint, t.prompt, t.completion,
            t.total, t.cost, t.currency, t.outcome, t.estimated, t.web_searches,
            t.conversation, t.request, t.upstream_ms, t.overhead_ms, t.model, t.cached,
            t.reasoning
        FROM unnest(
            p_answer_ids, p_users, p_days, p_created_at, p_endpoints, p_prompt, p_completion,
            p_total, p_cost, p_currency, p_outcomes, p_estimated, p_web_searches,
            p_conversations, p_requests, p_upstream_ms, p_overhead_ms, p_models, p_cached,
            p_reasoning
        ) WITH ORDINALITY AS t(
            answer_id, user_id, day, created_at, endpoint, prompt, completion, total, cost,
            currency, outcome, estimated, web_searches, conversation, request, upstream_ms,
            overhead_ms, model, cached, reasoning, ord
        )
        WHERE t.ord = ANY (v_candidates)
        ORDER BY t.user_id, t.ord
        ON CONFLICT (answer_id) DO NOTHING
        RETURNING answer_id
    )
    SELECT coalesce(array_agg(answer_id), '{}') INTO v_inserted FROM written;

    SELECT array_agg(t.ord = ANY (v_candidates) AND t.answer_id = ANY (v_inserted) ORDER BY t.ord)
    INTO v_settled
    FROM unnest(p_answer_ids) WITH ORDINALITY AS t(answer_id, ord);

    IF cardinality(v_inserted) > 0 THEN
        -- The users' rows, locked in user order before any is written.
        PERFORM 1 FROM users
        WHERE id IN (SELECT t.user_id FROM unnest(p_users) WITH ORDINALITY AS t(user_id, ord)
                     WHERE v_settled[t.ord])
        ORDER BY id FOR NO KEY UPDATE;
        UPDATE users u SET
            lifetime_prompt_tokens = u.lifetime_prompt_tokens + s.prompt,
            lifetime_completion_tokens = u.lifetime_completion_tokens + s.completion,
            lifetime_tokens = u.lifetime_tokens + s.total,
            lifetime_cost = u.lifetime_cost + s.cost
        FROM (
            SELECT t.user_id, sum(t.prompt) AS prompt, sum(t.completion) AS completion,
                sum(t.total) AS total, sum(t.cost) AS cost
            FROM unnest(p_users, p_prompt, p_completion, p_total, p_cost)
                WITH ORDINALITY AS t(user_id, prompt, completion, total, cost, ord)
            WHERE v_settled[t.ord]
            GROUP BY t.user_id
        ) s
        WHERE u.id = s.user_id;
        INSERT INTO usage_daily AS d
            (user_id, day, web_searches, prompt_tokens, completion_tokens, total_tokens, cost)
        SELECT t.user_id, t.day, sum(t.web_searches), sum(t.prompt), sum(t.completion),
            sum(t.total), sum(t.cost)
        FROM unnest(p_users, p_days, p_web_searches, p_prompt, p_completion, p_total, p_cost)
            WITH ORDINALITY AS t(user_id, day, web_searches, prompt, completion, total, cost, ord)
        WHERE v_settled[t.ord]
        GROUP BY t.user_id, t.day
        ORDER BY t.user_id, t.day
        ON CONFLICT (user_id, day) DO UPDATE SET
            web_searches = d.web_searches + excluded.web_searches,
            prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = d.completion_tokens + excluded.completion_tokens,
            total_tokens = d.total_tokens + excluded.total_tokens,
            cost = d.cost + excluded.cost;
    END IF;

    IF cardinality(v_inserted) > 0 AND coalesce(cardinality(p_kinds), 0) > 0 THEN
        -- 0009's alert decision, for each (user, limit, period, threshold) the
        -- batch's settled elements check.
        WITH checks AS (
            SELECT DISTINCT ON (t.user_id, k.kind, k.period, k.threshold, k.value)
                t.user_id, t.day, t.month_start, t.created_at, t.channel_from,
                t.channel_count, k.kind, k.period, k.value, k.threshold
            FROM unnest(
                p_users, p_days, p_month_starts, p_created_at, p_check_from, p_check_count,
                p_channel_from, p_channel_count
            ) WITH ORDINALITY AS t(
                user_id, day, month_start, created_at, check_from, check_count, channel_from,
                channel_count, ord
            )
            CROSS JOIN LATERAL unnest(
                p_kinds[t.check_from:t.check_from + t.check_count - 1],
                p_periods[t.check_from:t.check_from + t.check_count - 1],
                p_values[t.check_from:t.check_from + t.check_count - 1],
                p_thresholds[t.check_from:t.check_from + t.check_count - 1]
            ) AS k(kind, period, value, threshold)
            WHERE v_settled[t.ord] AND t.check_count > 0
            ORDER BY t.user_id, k.kind, k.period, k.threshold, k.value, t.day DESC, t.ord DESC
        ), measured AS (
            SELECT c.*,
                CASE c.kind
                    WHEN 'queries_per_day' THEN u.queries_per_day
                    WHEN 'tokens_per_day' THEN u.tokens_per_day
                    WHEN 'web_searches_per_day' THEN u.web_searches_per_day
                    ELSE u.tokens_per_month
                END AS used
            FROM checks c CROSS JOIN LATERAL (
                SELECT
                    coalesce(max(d.queries) FILTER (WHERE d.day = c.day), 0) AS queries_per_day,
                    coalesce(max(d.total_tokens) FILTER (WHERE d.day = c.day), 0)
                        AS tokens_per_day,
                    coalesce(max(d.web_searches) FILTER (WHERE d.day = c.day), 0)
                        AS web_searches_per_day,
                    coalesce(sum(d.total_tokens), 0) AS tokens_per_month
                FROM usage_daily d
                WHERE d.user_id = c.user_id AND d.day >= c.month_start AND d.day <= c.day
            ) u
        ), new AS (
            INSERT INTO notifications AS n (
                user_id, kind, period, threshold, created_at, limit_value, used
            )
            SELECT m.user_id, m.kind, m.period, m.threshold, m.created_at, m.value, m.used
            FROM measured m
            WHERE m.used * 100 >= m.value * m.threshold
            ORDER BY m.user_id, m.kind, m.period, m.threshold
            ON CONFLICT DO NOTHING
            RETURNING n.user_id, n.kind, n.period, n.threshold, n.limit_value
        )
        INSERT INTO alert_outbox (user_id, kind, period, threshold, channel, created_at,
            next_attempt_at)
        SELECT x.user_id, x.kind, x.period, x.threshold, ch, m.created_at, m.created_at
        FROM new x
        JOIN measured m ON (m.user_id, m.kind, m.period, m.threshold, m.value)
            = (x.user_id, x.kind, x.period, x.threshold, x.limit_value)
        CROSS JOIN LATERAL unnest(
            p_channels[m.channel_from:m.channel_from + m.channel_count - 1]
        ) AS ch;
    END IF;

    RETURN QUERY SELECT t.ord::integer, v_settled[t.ord]
    FROM generate_subscripts(p_answer_ids, 1) AS t(ord);
END
$$;
