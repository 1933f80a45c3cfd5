-- Issue 20, two accounting fixes.
--
-- 1. Web searches are reserved at admission, in the same atomic step as the
-- query. The allowance used to be read apart from admission, so 20 parallel
-- requests with one search left all passed the read and ran 20 searches. Now a
-- request that asks for web search reserves one on the user's day row under
-- the user's row lock, with the query; with none left, the same step refuses
-- it ('web_searches_per_day') or admits it without one (the gateway then turns
-- web search off in the request), as the operator chose. The reservation is
-- kept on the answer's pending row (web_searches): settle replaces it with the
-- count the answer used (the ledger row records that count; the day row ends
-- at it), a refund gives it back, a recovery keeps it spent - like the query,
-- since the upstream may have searched - and records it on its ledger row.
--
-- 2. A real record supersedes a recovered estimate. During a long database
-- outage an answer's record waits in the spool while a recovery charges its
-- pending row a prompt-only estimate; the replayed record used to find the
-- pending row gone and change nothing (2,336 tokens recorded as 2). The link
-- between the two is the pending row's id (the request id): the estimate is
-- the ledger row 'gw-' || pending id, with outcome 'recovered' and that
-- request id, of the same user (rows recovered before this migration are
-- found the same way). A settle whose pending row is gone looks for that
-- estimate and, if it is there, replaces it: the ledger row takes the real
-- answer id and figures, the day row (of the day the estimate was charged on)
-- and the lifetime totals move by the difference, and the alert checks run on
-- the real totals. The estimate's outcome changes with it, so a second replay
-- finds none and changes nothing; a recovery after a settle finds no pending
-- row. If the real answer id is already in the ledger as another row, the
-- estimate is left as it is (the answer would otherwise count twice).
--
-- The functions keep their names and, where they existed, their signatures
-- (gateways of the previous version, during a rolling upgrade, then settle and
-- refund by the same rules). Admission gets new overloads, with the web search
-- arguments; the older ones stay for the previous version.
--
-- Lock order, as everywhere (0008, 0010): pending rows, then leases, then
-- (for a supersede) the estimate's ledger row, then users' rows, then day rows.

ALTER TABLE pending_answers ADD COLUMN web_searches integer NOT NULL DEFAULT 0;

-- Admission (0010's gateway_admit and 0008's pending row) with the web search:
-- p_web_ask, the request asks for it; p_web_limit, the allowance (NULL:
-- unlimited); p_web_refuse, refuse rather than admit without one when none is
-- left. A spent allowance refuses first, as it did when it was checked before
-- the rest of admission.
CREATE FUNCTION gateway_admit(
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
    p_advanced_rag boolean,
    p_pending text,
    p_endpoint text,
    p_prompt bigint,
    p_completion bigint,
    p_total bigint,
    p_cost numeric,
    p_currency text,
    p_web_ask boolean,
    p_web_limit bigint,
    p_web_refuse boolean
) RETURNS TABLE (
    refused_by text,
    queries bigint,
    tokens_today bigint,
    tokens_month bigint,
    web_searches bigint,
    open_streams bigint,
    web_reserved boolean
) LANGUAGE plpgsql AS $$
DECLARE
    v_queries bigint;
    v_tokens bigint;
    v_web bigint;
    v_prev bigint;
    v_streams bigint := 0;
    v_refused text;
    v_search integer := 0;
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
    IF p_web_ask AND (p_web_limit IS NULL OR v_web < p_web_limit) THEN
        v_search := 1;
    END IF;

    v_refused := CASE
        WHEN p_web_ask AND p_web_refuse AND v_search = 0 THEN 'web_searches_per_day'
        WHEN p_queries IS NOT NULL AND v_queries >= p_queries THEN 'queries_per_day'
        WHEN p_tokens_day IS NOT NULL AND v_tokens >= p_tokens_day THEN 'tokens_per_day'
        WHEN p_tokens_month IS NOT NULL AND v_prev + v_tokens >= p_tokens_month THEN 'tokens_per_month'
        WHEN p_streams IS NOT NULL AND v_streams >= p_streams THEN 'max_concurrent_streams'
    END;
    IF v_refused IS NULL THEN
        INSERT INTO usage_daily AS d (user_id, day, queries, advanced_rag, web_searches)
        VALUES (p_user, p_day, 1, CASE WHEN p_advanced_rag THEN 1 ELSE 0 END, v_search)
        ON CONFLICT (user_id, day) DO UPDATE SET
            queries = d.queries + 1,
            advanced_rag = d.advanced_rag + excluded.advanced_rag,
            web_searches = d.web_searches + excluded.web_searches;
        v_queries := v_queries + 1;
        v_web := v_web + v_search;
        IF p_lease IS NOT NULL THEN
            INSERT INTO stream_leases (id, user_id, expires_at) VALUES (p_lease, p_user, p_lease_expires);
            v_streams := v_streams + 1;
        END IF;
        IF p_pending IS NOT NULL THEN
            INSERT INTO pending_answers (
                id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
                total_tokens, cost, currency, web_searches
            ) VALUES (
                p_pending, p_user, p_day, p_now, p_endpoint, p_prompt, p_completion,
                p_total, p_cost, p_currency, v_search
            );
        END IF;
    ELSE
        v_search := 0;
    END IF;
    RETURN QUERY SELECT v_refused, v_queries, v_tokens, v_prev + v_tokens, v_web, v_streams,
        v_search = 1;
END
$$;

-- 0010's gateway_admit_many with the web search (three more arrays, one more
-- column): each element is decided against the counters - the web searches
-- too - that the elements before it left.
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
    p_currency text[],
    p_web_ask boolean[],
    p_web_limit bigint[],
    p_web_refuse boolean[]
) RETURNS TABLE (
    ord integer,
    known boolean,
    refused_by text,
    queries bigint,
    tokens_today bigint,
    tokens_month bigint,
    web_searches bigint,
    open_streams bigint,
    web_reserved boolean
) LANGUAGE plpgsql SET lock_timeout = '250ms' AS $$
DECLARE
    e record;
    v_admitted boolean[] := array_fill(false, ARRAY[cardinality(p_users)]);
    v_searches integer[] := array_fill(0, ARRAY[cardinality(p_users)]);
    v_user text;
    v_day date;
    v_month date;
    v_known boolean := false;
    v_queries bigint;
    v_tokens bigint;
    v_web bigint;
    v_prev bigint;
    v_expiries timestamptz[];
    v_streams bigint := 0;
    v_counted boolean := false;
    v_leases bigint := 0;
    v_new bigint := 0;
    v_new_rag bigint := 0;
    v_new_web bigint := 0;
    v_refused text;
    v_shown bigint;
    v_search integer;
BEGIN
    IF cardinality(p_users) = 1 THEN
        IF NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p_users[1]) THEN
            RETURN QUERY SELECT 1, false, NULL::text, NULL::bigint, NULL::bigint,
                NULL::bigint, NULL::bigint, NULL::bigint, false;
            RETURN;
        END IF;
        RETURN QUERY SELECT 1, true, a.* FROM gateway_admit(
            p_users[1], p_days[1], p_month_starts[1], p_queries[1], p_tokens_day[1],
            p_tokens_month[1], p_streams[1], p_leases[1], p_lease_expires[1], p_now[1],
            p_advanced_rag[1], p_pending[1], p_endpoints[1], p_prompt[1], p_completion[1],
            p_total[1], p_cost[1], p_currency[1], p_web_ask[1], p_web_limit[1], p_web_refuse[1]
        ) AS a;
        RETURN;
    END IF;
    FOR e IN
        SELECT * FROM unnest(
            p_users, p_days, p_month_starts, p_queries, p_tokens_day, p_tokens_month,
            p_streams, p_leases, p_now, p_advanced_rag, p_web_ask, p_web_limit, p_web_refuse
        ) WITH ORDINALITY AS t(
            user_id, day, month_start, queries, tokens_day, tokens_month, streams, lease,
            now, advanced_rag, web_ask, web_limit, web_refuse, ord
        )
        ORDER BY t.user_id, t.ord
    LOOP
        IF v_user IS DISTINCT FROM e.user_id OR v_day <> e.day
            OR v_month <> e.month_start
        THEN
            IF v_new > 0 THEN
                INSERT INTO usage_daily AS d (user_id, day, queries, advanced_rag, web_searches)
                VALUES (v_user, v_day, v_new, v_new_rag, v_new_web)
                ON CONFLICT (user_id, day) DO UPDATE SET
                    queries = d.queries + excluded.queries,
                    advanced_rag = d.advanced_rag + excluded.advanced_rag,
                    web_searches = d.web_searches + excluded.web_searches;
                v_new := 0;
                v_new_rag := 0;
                v_new_web := 0;
            END IF;
            IF v_user IS DISTINCT FROM e.user_id THEN
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
            RETURN QUERY SELECT e.ord::integer, false, NULL::text, 0::bigint, 0::bigint,
                0::bigint, 0::bigint, 0::bigint, false;
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
        v_search := CASE
            WHEN e.web_ask AND (e.web_limit IS NULL OR v_web < e.web_limit) THEN 1 ELSE 0
        END;
        -- The single function's decision, in its order.
        v_refused := CASE
            WHEN e.web_ask AND e.web_refuse AND v_search = 0 THEN 'web_searches_per_day'
            WHEN e.queries IS NOT NULL AND v_queries >= e.queries THEN 'queries_per_day'
            WHEN e.tokens_day IS NOT NULL AND v_tokens >= e.tokens_day THEN 'tokens_per_day'
            WHEN e.tokens_month IS NOT NULL AND v_prev + v_tokens >= e.tokens_month
                THEN 'tokens_per_month'
            WHEN e.streams IS NOT NULL AND v_streams >= e.streams THEN 'max_concurrent_streams'
        END;
        v_shown := 0;
        IF v_refused IS NULL THEN
            v_admitted[e.ord] := true;
            v_searches[e.ord] := v_search;
            v_queries := v_queries + 1;
            v_new := v_new + 1;
            v_web := v_web + v_search;
            v_new_web := v_new_web + v_search;
            IF e.advanced_rag THEN
                v_new_rag := v_new_rag + 1;
            END IF;
            IF e.lease IS NOT NULL THEN
                v_leases := v_leases + 1;
                v_streams := v_streams + 1;
                v_shown := 1;
            END IF;
        ELSE
            v_search := 0;
        END IF;
        IF e.streams IS NOT NULL THEN
            v_shown := v_streams;
        END IF;
        RETURN QUERY SELECT e.ord::integer, true, v_refused, v_queries, v_tokens,
            v_prev + v_tokens, v_web, v_shown, v_search = 1;
    END LOOP;
    IF v_new > 0 THEN
        INSERT INTO usage_daily AS d (user_id, day, queries, advanced_rag, web_searches)
        VALUES (v_user, v_day, v_new, v_new_rag, v_new_web)
        ON CONFLICT (user_id, day) DO UPDATE SET
            queries = d.queries + excluded.queries,
            advanced_rag = d.advanced_rag + excluded.advanced_rag,
            web_searches = d.web_searches + excluded.web_searches;
    END IF;
    INSERT INTO stream_leases (id, user_id, expires_at)
    SELECT t.lease, t.user_id, t.expires
    FROM unnest(p_leases, p_users, p_lease_expires) WITH ORDINALITY AS t(lease, user_id, expires, ord)
    WHERE v_admitted[t.ord] AND t.lease IS NOT NULL
    ORDER BY t.user_id, t.ord;
    INSERT INTO pending_answers (
        id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
        total_tokens, cost, currency, web_searches
    )
    SELECT t.pending, t.user_id, t.day, t.now, t.endpoint, t.prompt, t.completion, t.total,
        t.cost, t.currency, v_searches[t.ord]
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

-- The real record of an answer whose pending row a recovery charged replaces
-- the estimate (see 2. above). Called by settle when the pending row is gone,
-- after the lease went. Returns whether it replaced one.
CREATE FUNCTION gateway_supersede(
    p_pending text,
    p_answer_id text,
    p_user text,
    p_created_at timestamptz,
    p_endpoint text,
    p_prompt bigint,
    p_completion bigint,
    p_total bigint,
    p_cost numeric,
    p_currency text,
    p_outcome text,
    p_estimated boolean,
    p_web_searches integer,
    p_conversation text,
    p_request text,
    p_upstream_ms double precision,
    p_overhead_ms double precision
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    r usage_events%ROWTYPE;
BEGIN
    -- The row lock makes a second settle of the same record wait, then find
    -- the outcome changed and do nothing.
    SELECT * INTO r FROM usage_events e
    WHERE e.answer_id = 'gw-' || p_pending AND e.outcome = 'recovered'
        AND e.request_id = p_pending AND e.user_id = p_user
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_answer_id <> r.answer_id
        AND EXISTS (SELECT 1 FROM usage_events e WHERE e.answer_id = p_answer_id)
    THEN
        RETURN false;
    END IF;
    UPDATE usage_events SET
        answer_id = p_answer_id, created_at = p_created_at, endpoint = p_endpoint,
        prompt_tokens = p_prompt, completion_tokens = p_completion, total_tokens = p_total,
        cost = p_cost, currency = p_currency, outcome = p_outcome, estimated = p_estimated,
        web_searches = p_web_searches, conversation_id = p_conversation, request_id = p_request,
        upstream_latency_ms = p_upstream_ms, overhead_ms = p_overhead_ms, model = NULL,
        cached_tokens = 0, reasoning_tokens = 0
    WHERE answer_id = r.answer_id;
    UPDATE users SET
        lifetime_prompt_tokens = lifetime_prompt_tokens + p_prompt - r.prompt_tokens,
        lifetime_completion_tokens = lifetime_completion_tokens + p_completion - r.completion_tokens,
        lifetime_tokens = lifetime_tokens + p_total - r.total_tokens,
        lifetime_cost = lifetime_cost + p_cost - r.cost
    WHERE id = p_user;
    UPDATE usage_daily SET
        web_searches = greatest(web_searches + p_web_searches - r.web_searches, 0),
        prompt_tokens = prompt_tokens + p_prompt - r.prompt_tokens,
        completion_tokens = completion_tokens + p_completion - r.completion_tokens,
        total_tokens = total_tokens + p_total - r.total_tokens,
        cost = cost + p_cost - r.cost
    WHERE user_id = p_user AND day = r.day;
    RETURN true;
END
$$;

-- 0008's settle: claim the pending row, then 0002's ledger write; now the
-- claim also ends the web-search reservation (the day row keeps the count the
-- answer used), and a settle whose pending row a recovery took supersedes the
-- estimate. The 28-argument gateway_settle (0009) and the batches (0010) go
-- through this function.
CREATE OR REPLACE FUNCTION gateway_settle(
    p_answer_id text,
    p_user text,
    p_day date,
    p_created_at timestamptz,
    p_endpoint text,
    p_prompt bigint,
    p_completion bigint,
    p_total bigint,
    p_cost numeric,
    p_currency text,
    p_outcome text,
    p_estimated boolean,
    p_web_searches integer,
    p_conversation text,
    p_request text,
    p_upstream_ms double precision,
    p_overhead_ms double precision,
    p_lease text,
    p_pending text
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_day date;
    v_reserved integer := 0;
    v_settled boolean;
BEGIN
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending RETURNING day, web_searches
        INTO v_day, v_reserved;
        IF NOT FOUND THEN
            DELETE FROM stream_leases WHERE id = p_lease;
            RETURN gateway_supersede(
                p_pending, p_answer_id, p_user, p_created_at, p_endpoint, p_prompt,
                p_completion, p_total, p_cost, p_currency, p_outcome, p_estimated,
                p_web_searches, p_conversation, p_request, p_upstream_ms, p_overhead_ms
            );
        END IF;
    END IF;
    v_settled := gateway_settle(
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms, p_lease
    );
    IF v_reserved <> 0 THEN
        -- Whether or not the answer id was new, the reservation ends here. The
        -- user's row first, as everywhere (the ledger write took it already
        -- unless the answer id was recorded before).
        PERFORM 1 FROM users WHERE id = p_user FOR NO KEY UPDATE;
        UPDATE usage_daily SET web_searches = greatest(web_searches - v_reserved, 0)
        WHERE user_id = p_user AND day = v_day;
    END IF;
    RETURN v_settled;
END
$$;

-- 0008's refund, giving back the web search reserved with the query.
CREATE OR REPLACE FUNCTION gateway_refund(p_user text, p_day date, p_lease text, p_pending text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_claimed boolean := true;
    v_day date := p_day;
    v_reserved integer := 0;
BEGIN
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending RETURNING day, web_searches
        INTO v_day, v_reserved;
        v_claimed := FOUND;
    END IF;
    DELETE FROM stream_leases WHERE id = p_lease;
    IF v_claimed THEN
        UPDATE usage_daily SET queries = queries - 1
        WHERE user_id = p_user AND day = p_day AND queries > 0;
        IF v_reserved <> 0 THEN
            UPDATE usage_daily SET web_searches = greatest(web_searches - v_reserved, 0)
            WHERE user_id = p_user AND day = v_day;
        END IF;
    END IF;
    RETURN v_claimed;
END
$$;

-- 0008's recovery; a web search reserved stays spent and its ledger row says
-- so (the day row has it already), so that a superseding record corrects it.
CREATE OR REPLACE FUNCTION gateway_recover(p_before timestamptz, p_limit integer, p_now timestamptz)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    r pending_answers%ROWTYPE;
BEGIN
    FOR r IN
        SELECT * FROM pending_answers p WHERE p.created_at < p_before
        ORDER BY p.user_id, p.id LIMIT p_limit FOR UPDATE SKIP LOCKED
    LOOP
        DELETE FROM pending_answers WHERE id = r.id;
        IF gateway_settle(
            'gw-' || r.id, r.user_id, r.day, p_now, r.endpoint, r.prompt_tokens,
            r.completion_tokens, r.total_tokens, r.cost, r.currency, 'recovered', true, 0,
            NULL, r.id, NULL, NULL, r.id
        ) AND r.web_searches <> 0 THEN
            UPDATE usage_events SET web_searches = r.web_searches WHERE answer_id = 'gw-' || r.id;
        END IF;
        RETURN NEXT r.id;
    END LOOP;
END
$$;

-- 0010's settle batch, with the two changes of this migration: a batch holding
-- a settle that supersedes a recovered estimate runs its elements through the
-- single function, and the claimed pending rows' web-search reservations end.
CREATE OR REPLACE FUNCTION gateway_settle_many(
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
    v_claimed_rows pending_answers[];
    v_give_back boolean;
    v_ord bigint;
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
        DELETE FROM pending_answers WHERE id = ANY (p_pending) RETURNING *
    )
    SELECT coalesce(array_agg(c.id), '{}'), coalesce(array_agg(ROW(c.*)::pending_answers), '{}')
    INTO v_claimed, v_claimed_rows FROM claimed c;

    -- An element whose pending row is gone and was recovered as an estimate
    -- supersedes it (0011). Rare - a record replayed after a long outage - so
    -- such a batch is not decided set by set: its claimed rows are put back
    -- and its elements go through the single function one after another, in
    -- (user, position) order, in this transaction: exactly what they would do
    -- one by one.
    IF EXISTS (
        SELECT 1 FROM unnest(p_pending, p_users) AS t(pending, user_id)
        WHERE t.pending IS NOT NULL AND NOT (t.pending = ANY (v_claimed))
            AND EXISTS (
                SELECT 1 FROM usage_events e
                WHERE e.answer_id = 'gw-' || t.pending AND e.outcome = 'recovered'
                    AND e.request_id = t.pending AND e.user_id = t.user_id
            )
    ) THEN
        INSERT INTO pending_answers SELECT * FROM unnest(v_claimed_rows) AS r ORDER BY r.user_id, r.id;
        FOR v_ord IN
            SELECT t.ord FROM unnest(p_users) WITH ORDINALITY AS t(user_id, ord)
            ORDER BY t.user_id, t.ord
        LOOP
            RETURN QUERY SELECT v_ord::integer, gateway_settle(
                p_answer_ids[v_ord], p_users[v_ord], p_days[v_ord], p_created_at[v_ord],
                p_endpoints[v_ord], p_prompt[v_ord], p_completion[v_ord], p_total[v_ord],
                p_cost[v_ord], p_currency[v_ord], p_outcomes[v_ord], p_estimated[v_ord],
                p_web_searches[v_ord], p_conversations[v_ord], p_requests[v_ord],
                p_upstream_ms[v_ord], p_overhead_ms[v_ord], p_leases[v_ord], p_pending[v_ord],
                p_models[v_ord], p_cached[v_ord], p_reasoning[v_ord], p_month_starts[v_ord],
                p_kinds[p_check_from[v_ord]:p_check_from[v_ord] + p_check_count[v_ord] - 1],
                p_periods[p_check_from[v_ord]:p_check_from[v_ord] + p_check_count[v_ord] - 1],
                p_values[p_check_from[v_ord]:p_check_from[v_ord] + p_check_count[v_ord] - 1],
                p_thresholds[p_check_from[v_ord]:p_check_from[v_ord] + p_check_count[v_ord] - 1],
                p_channels[p_channel_from[v_ord]:p_channel_from[v_ord] + p_channel_count[v_ord] - 1]
            );
        END LOOP;
        RETURN;
    END IF;
    -- The web searches reserved with the claimed rows are given back below (0011).
    v_give_back := EXISTS (SELECT 1 FROM unnest(v_claimed_rows) AS r WHERE r.web_searches <> 0);
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

    IF cardinality(v_inserted) > 0 OR v_give_back THEN
        -- The users' rows, locked in user order before any is written: those of
        -- the settled elements and those given web searches back.
        PERFORM 1 FROM users
        WHERE id IN (SELECT t.user_id FROM unnest(p_users) WITH ORDINALITY AS t(user_id, ord)
                     WHERE v_settled[t.ord]
                     UNION
                     SELECT r.user_id FROM unnest(v_claimed_rows) AS r WHERE r.web_searches <> 0)
        ORDER BY id FOR NO KEY UPDATE;
    END IF;
    IF cardinality(v_inserted) > 0 THEN
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
    IF v_give_back THEN
        -- Each claimed row's reservation ends, whether or not its element was
        -- recorded (as in the single function); before the alert checks, so
        -- that they see the count the answers used.
        UPDATE usage_daily d SET web_searches = greatest(d.web_searches - g.searches, 0)
        FROM (
            SELECT r.user_id, r.day, sum(r.web_searches) AS searches
            FROM unnest(v_claimed_rows) AS r WHERE r.web_searches <> 0
            GROUP BY r.user_id, r.day
        ) g
        WHERE d.user_id = g.user_id AND d.day = g.day;
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
