-- One settle, as the gateway calls it, in one function body (no helper
-- layers: each PL/pgSQL call cost a frame and its arguments' evaluation on
-- every answer). In the caller's transaction:
-- 1. claims the answer's pending row (0008): a second settle, a refund or a
--    recovery then finds it gone; a settle whose pending row a recovery took
--    supersedes the estimate it charged (gateway_supersede, 0011);
-- 2. releases the lease and writes the answer - the ledger row with its model
--    and token parts, the lifetime totals, the day row - unless this
--    request's answer is recorded already (the ledger's unique index decides,
--    also across replicas; an id another request's answer holds is a new
--    answer under an id of its own, gateway_answer_id): then it changes
--    nothing but ending the reservations;
-- 3. ends the reservations made with the pending row (web searches, the cost
--    bound, per-model counters) whether or not the answer was new, and counts
--    its tokens in the token rates its admission counted it in;
-- 4. decides the threshold alerts the settle crossed (0009).
-- It writes the settles' row of the day (part 1, 0023), never the one
-- admissions write, nor takes the admission lock: an admission does not wait
-- for it. What it adds and the reservation it gives back are one write of that
-- row (a reservation's release is a negative amount there).
-- Returns whether it recorded the answer. p_upstream: the named upstream that
-- answered (0017; a caller of the previous version names none). A recovery
-- writes its estimate through here too, with no pending row and no checks.
--
-- p_batched: a batch of one (a settle that found no batch in flight, the usual
-- case under light load), under the batches' lock timeout (0010: the gateway
-- then sends it again on its own). The timeout is set for the call and put
-- back before it returns, as a SET clause would (an error rolls it back with
-- the call's transaction or savepoint); a wrapper function with the clause
-- cost a call more (docs/performance.md). Without p_batched a row lock is
-- waited for under the caller's timeout.
CREATE OR REPLACE FUNCTION gateway_settle(p_answer_id text, p_user text, p_day date, p_created_at timestamp with time zone, p_endpoint text, p_prompt bigint, p_completion bigint, p_total bigint, p_cost numeric, p_currency text, p_outcome text, p_estimated boolean, p_web_searches integer, p_conversation text, p_request text, p_upstream_ms double precision, p_overhead_ms double precision, p_lease text, p_pending text, p_model text, p_cached bigint, p_reasoning bigint, p_month_start date, p_kinds text[], p_periods text[], p_values numeric[], p_thresholds integer[], p_channels text[], p_cache_write bigint, p_upstream text DEFAULT 'default'::text, p_specs text[] DEFAULT NULL, p_batched boolean DEFAULT false)
 RETURNS boolean
 LANGUAGE plpgsql
AS $$
DECLARE
    -- (No initial values where a statement sets the variable or NULL does:
    -- PL/pgSQL prepares each expression again in every transaction, about
    -- 1,400 instructions each; docs/performance.md.)
    v_day date;
    v_reserved integer;
    v_reserved_cost numeric;
    v_rates integer;
    v_keys text[];
    v_recovered boolean;
    v_settled boolean;
    v_answer text;
    -- true: the reservations ended on the answer's day row (NULL: not yet).
    v_ended boolean;
    -- Today's counters (both rows) and the month's tokens, for the alert
    -- checks; NULL: not read yet.
    v_queries bigint;
    v_tokens bigint;
    v_searches bigint;
    v_month numeric;
    v_used numeric;
    v_crossed integer[];  -- NULL: none (NULL || i is {i})
    v_amounts numeric[];
    v_timeout text;
    v_set text;
BEGIN
    IF p_batched THEN
        -- (Assignments, not PERFORM: an expression, not a query.)
        v_timeout := current_setting('lock_timeout');
        v_set := set_config('lock_timeout', '250ms', true);
    END IF;
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending
        RETURNING day, web_searches, reserved_cost, rates, scopes
        INTO v_day, v_reserved, v_reserved_cost, v_rates, v_keys;
        v_recovered := NOT FOUND;
    ELSE
        -- No pending row (a recovery's estimate, a fail-open answer): nothing reserved.
        v_reserved := 0;
        v_reserved_cost := 0;
        v_rates := 0;
        v_keys := '{}';
    END IF;
    IF v_recovered THEN
        -- A recovery took the pending row and charged an estimate.
        DELETE FROM stream_leases WHERE id = p_lease;
        -- The estimate's row takes the answer's figures, its model and token
        -- parts (0006, 0014) with them.
        IF NOT gateway_supersede(
            p_pending, p_answer_id, p_user, p_created_at, p_endpoint, p_prompt, p_completion,
            p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
            p_request, p_upstream_ms, p_overhead_ms, p_upstream, p_model, p_cached, p_reasoning,
            p_cache_write
        ) THEN
            IF p_batched THEN
                v_set := set_config('lock_timeout', v_timeout, true);
            END IF;
            RETURN false;
        END IF;
    ELSE
        IF p_lease IS NOT NULL THEN
            DELETE FROM stream_leases WHERE id = p_lease;
        END IF;
        -- A second settle of the same answer waits here on the unique index
        -- until the first commits, then inserts nothing and changes nothing.
        -- An id another request's answer holds is no such second settle: the
        -- answer goes in under the id gateway_answer_id gives it (review-once
        -- F1; v_answer NULL: the upstream's id, the usual case).
        LOOP
            INSERT INTO usage_events (
                answer_id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
                total_tokens, cost, currency, outcome, estimated, web_searches, conversation_id,
                request_id, upstream_latency_ms, overhead_ms, model, cached_tokens,
                reasoning_tokens, cache_write_tokens, upstream
            ) VALUES (
                coalesce(v_answer, p_answer_id), p_user, p_day, p_created_at, p_endpoint,
                p_prompt, p_completion, p_total, p_cost, p_currency, p_outcome, p_estimated,
                p_web_searches, p_conversation, p_request, p_upstream_ms, p_overhead_ms, p_model,
                p_cached, p_reasoning, p_cache_write, p_upstream
            ) ON CONFLICT (answer_id) DO NOTHING;
            v_settled := FOUND;
            EXIT WHEN v_settled;
            -- (Taken again by the time of the insert: a concurrent settle took
            -- the id given; the next look decides again.)
            v_answer := gateway_answer_id(coalesce(v_answer, p_answer_id), p_request);
            EXIT WHEN v_answer IS NULL;
        END LOOP;
        IF v_settled THEN
            UPDATE users SET
                lifetime_prompt_tokens = lifetime_prompt_tokens + p_prompt,
                lifetime_completion_tokens = lifetime_completion_tokens + p_completion,
                lifetime_tokens = lifetime_tokens + p_total,
                lifetime_cost = lifetime_cost + p_cost
            WHERE id = p_user;
            IF NOT FOUND THEN
                -- No such user (0025): the error the ledger's foreign key
                -- raised, and the ledger row goes with the transaction.
                RAISE foreign_key_violation USING
                    MESSAGE = 'insert or update on table "usage_events" violates foreign key '
                        'constraint "usage_events_user_id_fkey"',
                    DETAIL = format('Key (user_id)=(%s) is not present in table "users".', p_user);
            END IF;
            IF v_day = p_day AND (v_reserved <> 0 OR v_reserved_cost <> 0) THEN
                -- The reservations end on the day row the answer is added to:
                -- one write of it, leaving what adding then releasing would.
                -- (The web searches reserved were counted in the admissions'
                -- row: here they become what the answer used.)
                INSERT INTO usage_daily AS d (
                    user_id, day, part, web_searches, prompt_tokens, completion_tokens,
                    total_tokens, cost, cost_reserved
                ) VALUES (
                    p_user, p_day, 1, p_web_searches - v_reserved, p_prompt,
                    p_completion, p_total, p_cost, -v_reserved_cost
                ) ON CONFLICT (user_id, day, part) DO UPDATE SET
                    web_searches = d.web_searches + excluded.web_searches,
                    prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
                    completion_tokens = d.completion_tokens + excluded.completion_tokens,
                    total_tokens = d.total_tokens + excluded.total_tokens,
                    cost = d.cost + excluded.cost,
                    cost_reserved = d.cost_reserved + excluded.cost_reserved;
                v_ended := true;
            ELSE
                INSERT INTO usage_daily AS d (
                    user_id, day, part, web_searches, prompt_tokens, completion_tokens,
                    total_tokens, cost
                ) VALUES (
                    p_user, p_day, 1, p_web_searches, p_prompt, p_completion, p_total, p_cost
                ) ON CONFLICT (user_id, day, part) DO UPDATE SET
                    web_searches = d.web_searches + excluded.web_searches,
                    prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
                    completion_tokens = d.completion_tokens + excluded.completion_tokens,
                    total_tokens = d.total_tokens + excluded.total_tokens,
                    cost = d.cost + excluded.cost;
            END IF;
        END IF;
        IF v_ended IS NULL AND (v_reserved <> 0 OR v_reserved_cost <> 0) THEN
            -- Whether or not the answer id was new, the reservations end, on
            -- the day they were made on. The user's row first, as among
            -- settles (the users update took it if the answer was new).
            IF NOT v_settled THEN
                PERFORM 1 FROM users WHERE id = p_user FOR NO KEY UPDATE;
            END IF;
            PERFORM gateway_release(p_user, v_day, v_reserved, v_reserved_cost);
        END IF;
        IF cardinality(v_keys) > 0 THEN
            -- The per-model counters: the answer's figures if it was recorded,
            -- and the end of its cost bound's reservation either way.
            PERFORM gateway_add_models(
                p_user, v_keys, v_day, 0,
                CASE WHEN v_settled THEN p_prompt ELSE 0 END,
                CASE WHEN v_settled THEN p_completion ELSE 0 END,
                CASE WHEN v_settled THEN p_total ELSE 0 END,
                CASE WHEN v_settled THEN p_cost ELSE 0 END,
                -v_reserved_cost, 1::smallint
            );
        END IF;
        IF NOT v_settled THEN
            IF p_batched THEN
                v_set := set_config('lock_timeout', v_timeout, true);
            END IF;
            RETURN false;
        END IF;
        IF v_rates & 12 <> 0 THEN
            PERFORM gateway_count_token_rates(p_user, v_rates, p_created_at, p_total);
        END IF;
    END IF;
    IF coalesce(cardinality(p_kinds), 0) > 0 THEN
        -- The alert checks (0009): each is (kind, period, value, threshold,
        -- spec), crossed when the limit's counter is at or past threshold %
        -- of value. Decided one by one here rather than by one statement
        -- joining them with the counters, which cost about a fifth of a
        -- settle's PostgreSQL CPU even when nothing was crossed
        -- (docs/performance.md). The four original kinds read the user's day
        -- rows (both parts of a day, 0023) when a check first needs them: the
        -- month's tokens only when a monthly check is there, with today's in
        -- one read if both are.
        -- As far as the longest list reaches (a shorter one reads NULLs), as
        -- unnest(p_kinds, p_periods, ...) did.
        FOR i IN 1 .. greatest(
            cardinality(p_kinds), coalesce(cardinality(p_periods), 0),
            coalesce(cardinality(p_values), 0), coalesce(cardinality(p_thresholds), 0),
            coalesce(cardinality(p_specs), 0)
        ) LOOP
            IF p_specs[i] IS NOT NULL THEN
                -- Any other limit per day or month (issue 21): money budgets,
                -- general, per-model and team limits.
                v_used := gateway_alert_used(p_user, p_day, p_month_start, p_specs[i]);
            ELSIF p_kinds[i] IN ('queries_per_day', 'tokens_per_day', 'web_searches_per_day') THEN
                IF v_queries IS NULL THEN
                    IF (p_month_start <= p_day) IS TRUE AND 'tokens_per_month' = ANY (p_kinds) THEN
                        SELECT
                            coalesce(sum(d.queries) FILTER (WHERE d.day = p_day), 0),
                            coalesce(sum(d.total_tokens) FILTER (WHERE d.day = p_day), 0),
                            coalesce(sum(d.web_searches) FILTER (WHERE d.day = p_day), 0),
                            coalesce(sum(d.total_tokens), 0)
                        INTO v_queries, v_tokens, v_searches, v_month
                        FROM usage_daily d
                        WHERE d.user_id = p_user AND d.day >= p_month_start AND d.day <= p_day;
                    ELSE
                        SELECT
                            coalesce(sum(d.queries), 0), coalesce(sum(d.total_tokens), 0),
                            coalesce(sum(d.web_searches), 0)
                        INTO v_queries, v_tokens, v_searches
                        FROM usage_daily d WHERE d.user_id = p_user AND d.day = p_day;
                    END IF;
                END IF;
                IF p_kinds[i] = 'queries_per_day' THEN
                    v_used := v_queries;
                ELSIF p_kinds[i] = 'tokens_per_day' THEN
                    v_used := v_tokens;
                ELSE
                    v_used := v_searches;
                END IF;
            ELSE
                IF v_month IS NULL THEN
                    SELECT coalesce(sum(d.total_tokens), 0) INTO v_month
                    FROM usage_daily d
                    WHERE d.user_id = p_user AND d.day >= p_month_start AND d.day <= p_day;
                END IF;
                v_used := v_month;
            END IF;
            IF v_used * 100 >= p_values[i] * p_thresholds[i] THEN
                v_crossed := v_crossed || i;
                v_amounts := v_amounts || v_used;
            END IF;
        END LOOP;
        IF cardinality(v_crossed) > 0 THEN
            -- Each crossing is announced once per user, limit, period and
            -- threshold (the notifications key); its channels queue in the outbox.
            WITH new AS (
                INSERT INTO notifications AS n (
                    user_id, kind, period, threshold, created_at, limit_value, used
                )
                SELECT p_user, p_kinds[c.at], p_periods[c.at], p_thresholds[c.at],
                    p_created_at, p_values[c.at], c.used
                FROM unnest(v_crossed, v_amounts) WITH ORDINALITY AS c(at, used, ord)
                ORDER BY c.ord
                ON CONFLICT DO NOTHING
                RETURNING n.kind, n.period, n.threshold
            )
            INSERT INTO alert_outbox (user_id, kind, period, threshold, channel, created_at,
                next_attempt_at)
            SELECT p_user, x.kind, x.period, x.threshold, ch, p_created_at, p_created_at
            FROM new x, unnest(p_channels) AS ch;
        END IF;
    END IF;
    IF p_batched THEN
        v_set := set_config('lock_timeout', v_timeout, true);
    END IF;
    RETURN true;
END
$$;
