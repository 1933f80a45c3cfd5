-- Group commit of settles (0010): many settles in one round trip and one
-- transaction, set by set, exactly as gateway_settle one after another; the
-- claimed pending rows' reservations (web searches, cost bounds) end.
-- p_upstreams: the named upstreams that answered (0017; NULL: 'default').
CREATE OR REPLACE FUNCTION gateway_settle_many(p_answer_ids text[], p_users text[], p_days date[], p_created_at timestamp with time zone[], p_endpoints text[], p_prompt bigint[], p_completion bigint[], p_total bigint[], p_cost numeric[], p_currency text[], p_outcomes text[], p_estimated boolean[], p_web_searches integer[], p_conversations text[], p_requests text[], p_upstream_ms double precision[], p_overhead_ms double precision[], p_leases text[], p_pending text[], p_models text[], p_cached bigint[], p_reasoning bigint[], p_month_starts date[], p_check_from integer[], p_check_count integer[], p_channel_from integer[], p_channel_count integer[], p_kinds text[], p_periods text[], p_values numeric[], p_thresholds integer[], p_channels text[], p_cache_write bigint[], p_upstreams text[] DEFAULT NULL::text[], p_specs text[] DEFAULT NULL)
 RETURNS TABLE(ord integer, settled boolean)
 LANGUAGE plpgsql
 SET lock_timeout TO '250ms'
 SET plan_cache_mode TO force_generic_plan
AS $$
DECLARE
    v_claimed text[];
    v_claimed_rows pending_answers[];
    v_give_back boolean;
    v_token_rates boolean;
    v_per_model boolean;
    v_ord bigint;
    v_candidates bigint[];
    v_inserted text[];
    -- The elements written under an id of their own (review-once F1), and the
    -- id one is given.
    v_again bigint[];
    v_answer text;
    v_settled boolean[];
    v_users bigint;
    v_found bigint;
    v_set text;
BEGIN
    -- Its statements on their generic plans (the SET clause) for batches of
    -- up to 12: PostgreSQL planned them again at every call otherwise, a
    -- fifth of a batch of 8's instructions. Larger batches are planned per
    -- call, which pays there: probably because a custom plan's = ANY of a
    -- (then constant) array is hashed (docs/performance.md).
    IF cardinality(p_answer_ids) > 12 THEN
        v_set := set_config('plan_cache_mode', 'auto', true);
    END IF;
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
            p_channels[p_channel_from[1]:p_channel_from[1] + p_channel_count[1] - 1],
            p_cache_write[1], coalesce(p_upstreams[1], 'default'),
            p_specs[p_check_from[1]:p_check_from[1] + p_check_count[1] - 1]
        );
        RETURN;
    END IF;
    -- 0008's claim: every pending row of the batch at once, in the index's order.
    WITH claimed AS (
        DELETE FROM pending_answers WHERE id = ANY (p_pending) RETURNING *
    )
    SELECT coalesce(array_agg(c.id), '{}'), coalesce(array_agg(ROW(c.*)::pending_answers), '{}'),
        -- What the claimed rows reserved, read once here: web searches or cost
        -- bounds to give back, token rates to count the answers in.
        coalesce(bool_or(c.web_searches <> 0 OR c.reserved_cost <> 0), false),
        coalesce(bool_or(c.rates & 12 <> 0), false),
        coalesce(bool_or(cardinality(c.scopes) > 0), false)
    INTO v_claimed, v_claimed_rows, v_give_back, v_token_rates, v_per_model FROM claimed c;

    -- An element whose pending row is gone and was recovered as an estimate
    -- supersedes it (0011). Rare - a record replayed after a long outage - so
    -- such a batch is not decided set by set: its claimed rows are put back
    -- and its elements go through the single function one after another, in
    -- (user, position) order, in this transaction: exactly what they would do
    -- one by one.
    -- So is one holding an answer counted in per-model counters (their writes
    -- are per answer).
    IF v_per_model OR EXISTS (
        SELECT 1 FROM unnest(p_pending, p_users) AS t(pending, user_id)
        WHERE t.pending IS NOT NULL AND NOT (t.pending = ANY (v_claimed))
            AND EXISTS (
                SELECT 1 FROM usage_events e
                WHERE e.answer_id = 'gw-' || t.pending AND e.outcome = 'recovered'
                    AND e.request_id = t.pending AND e.user_id = t.user_id
            )
    ) THEN
        INSERT INTO pending_answers SELECT * FROM unnest(v_claimed_rows) AS r ORDER BY r.user_id, r.id;
        -- Every element's lease goes before any element writes a row (each
        -- single call's own delete then finds it gone). Deleted element by
        -- element, a later element's expired lease could be held by an
        -- admission (which deletes expired leases under the user's admission
        -- lock) waiting for a per-model counter row an earlier element wrote:
        -- a lock cycle broken only by the lock timeout.
        DELETE FROM stream_leases WHERE id = ANY (p_leases);
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
                p_channels[p_channel_from[v_ord]:p_channel_from[v_ord] + p_channel_count[v_ord] - 1],
                p_cache_write[v_ord], coalesce(p_upstreams[v_ord], 'default'),
                p_specs[p_check_from[v_ord]:p_check_from[v_ord] + p_check_count[v_ord] - 1]
            );
        END LOOP;
        RETURN;
    END IF;
    -- The web searches reserved with the claimed rows are given back below (0011).
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
            reasoning_tokens, cache_write_tokens, upstream
        )
        SELECT t.answer_id, t.user_id, t.day, t.created_at, t.endpoint, t.prompt, t.completion,
            t.total, t.cost, t.currency, t.outcome, t.estimated, t.web_searches,
            t.conversation, t.request, t.upstream_ms, t.overhead_ms, t.model, t.cached,
            t.reasoning, t.cache_write, coalesce(t.upstream, 'default')
        FROM unnest(
            p_answer_ids, p_users, p_days, p_created_at, p_endpoints, p_prompt, p_completion,
            p_total, p_cost, p_currency, p_outcomes, p_estimated, p_web_searches,
            p_conversations, p_requests, p_upstream_ms, p_overhead_ms, p_models, p_cached,
            p_reasoning, p_cache_write, p_upstreams
        ) WITH ORDINALITY AS t(
            answer_id, user_id, day, created_at, endpoint, prompt, completion, total, cost,
            currency, outcome, estimated, web_searches, conversation, request, upstream_ms,
            overhead_ms, model, cached, reasoning, cache_write, upstream, ord
        )
        WHERE t.ord = ANY (v_candidates)
        ORDER BY t.user_id, t.ord
        ON CONFLICT (answer_id) DO NOTHING
        RETURNING answer_id
    )
    SELECT coalesce(array_agg(answer_id), '{}') INTO v_inserted FROM written;

    -- An element that may write a ledger row and did not found its id taken:
    -- by a row of its own request (a retry, a replay: a duplicate), or by
    -- another request's answer, in the ledger or before it in this batch, an
    -- upstream repeated the id of (review-once F1). That one is a new answer,
    -- written under the id gateway_answer_id gives it, one by one in (user,
    -- position) order, as gateway_settle would. Only a batch that wrote fewer
    -- rows than it has elements looks.
    IF cardinality(v_inserted) < cardinality(p_answer_ids) THEN
        FOR v_ord IN
            SELECT f.ord FROM (
                SELECT DISTINCT ON (coalesce(t.pending, '#' || t.ord)) t.answer_id, t.user_id, t.ord
                FROM unnest(p_answer_ids, p_users, p_pending)
                    WITH ORDINALITY AS t(answer_id, user_id, pending, ord)
                WHERE t.pending IS NULL OR t.pending = ANY (v_claimed)
                ORDER BY coalesce(t.pending, '#' || t.ord), t.user_id, t.ord
            ) f
            WHERE NOT (f.ord = ANY (v_candidates) AND f.answer_id = ANY (v_inserted))
            ORDER BY f.user_id, f.ord
        LOOP
            v_answer := NULL;
            LOOP
                v_answer := gateway_answer_id(
                    coalesce(v_answer, p_answer_ids[v_ord]), p_requests[v_ord]
                );
                EXIT WHEN v_answer IS NULL;
                INSERT INTO usage_events (
                    answer_id, user_id, day, created_at, endpoint, prompt_tokens,
                    completion_tokens, total_tokens, cost, currency, outcome, estimated,
                    web_searches, conversation_id, request_id, upstream_latency_ms, overhead_ms,
                    model, cached_tokens, reasoning_tokens, cache_write_tokens, upstream
                ) VALUES (
                    v_answer, p_users[v_ord], p_days[v_ord], p_created_at[v_ord],
                    p_endpoints[v_ord], p_prompt[v_ord], p_completion[v_ord], p_total[v_ord],
                    p_cost[v_ord], p_currency[v_ord], p_outcomes[v_ord], p_estimated[v_ord],
                    p_web_searches[v_ord], p_conversations[v_ord], p_requests[v_ord],
                    p_upstream_ms[v_ord], p_overhead_ms[v_ord], p_models[v_ord], p_cached[v_ord],
                    p_reasoning[v_ord], p_cache_write[v_ord], coalesce(p_upstreams[v_ord], 'default')
                ) ON CONFLICT (answer_id) DO NOTHING;
                IF FOUND THEN
                    v_again := v_again || v_ord;
                    v_inserted := v_inserted || v_answer;
                    EXIT;
                END IF;
            END LOOP;
        END LOOP;
    END IF;

    -- (And how many users they are: each must be found below, 0025.)
    SELECT array_agg(s.settled ORDER BY s.ord), count(DISTINCT s.user_id) FILTER (WHERE s.settled)
    INTO v_settled, v_users
    FROM (
        SELECT t.ord, t.user_id,
            (t.ord = ANY (v_candidates) AND t.answer_id = ANY (v_inserted))
                OR t.ord = ANY (coalesce(v_again, '{}')) AS settled
        FROM unnest(p_answer_ids, p_users) WITH ORDINALITY AS t(answer_id, user_id, ord)
    ) s;

    IF cardinality(v_inserted) > 0 OR v_give_back THEN
        -- The users' rows, locked in user order before any is written: those of
        -- the settled elements and those given web searches back.
        PERFORM 1 FROM users
        WHERE id IN (SELECT t.user_id FROM unnest(p_users) WITH ORDINALITY AS t(user_id, ord)
                     WHERE v_settled[t.ord]
                     UNION
                     SELECT r.user_id FROM unnest(v_claimed_rows) AS r
                     WHERE r.web_searches <> 0 OR r.reserved_cost <> 0)
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
        -- A settled element's user not found (0025): the error the ledger's
        -- foreign key raised. (The gateway then settles the batch's elements
        -- one by one: only that one fails.)
        GET DIAGNOSTICS v_found = ROW_COUNT;
        IF v_found < v_users THEN
            RAISE foreign_key_violation USING
                MESSAGE = 'insert or update on table "usage_events" violates foreign key '
                    'constraint "usage_events_user_id_fkey"';
        END IF;
        -- The settles' rows of the days (part 1, 0023): admissions do not wait for them.
        INSERT INTO usage_daily AS d
            (user_id, day, part, web_searches, prompt_tokens, completion_tokens, total_tokens, cost)
        SELECT t.user_id, t.day, 1, sum(t.web_searches), sum(t.prompt), sum(t.completion),
            sum(t.total), sum(t.cost)
        FROM unnest(p_users, p_days, p_web_searches, p_prompt, p_completion, p_total, p_cost)
            WITH ORDINALITY AS t(user_id, day, web_searches, prompt, completion, total, cost, ord)
        WHERE v_settled[t.ord]
        GROUP BY t.user_id, t.day
        ORDER BY t.user_id, t.day
        ON CONFLICT (user_id, day, part) DO UPDATE SET
            web_searches = d.web_searches + excluded.web_searches,
            prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = d.completion_tokens + excluded.completion_tokens,
            total_tokens = d.total_tokens + excluded.total_tokens,
            cost = d.cost + excluded.cost;
    END IF;
    IF v_token_rates AND cardinality(v_inserted) > 0 THEN
        -- Settled answers' tokens go into the token rates their admission
        -- counted them in (the users' rows are locked above).
        PERFORM gateway_count_token_rates(r.user_id, r.rates, t.created_at, t.total)
        FROM unnest(v_claimed_rows) AS r
        JOIN unnest(p_pending, p_created_at, p_total) WITH ORDINALITY AS t(pending, created_at, total, ord)
            ON t.pending = r.id
        WHERE r.rates & 12 <> 0 AND v_settled[t.ord]
        ORDER BY r.user_id, t.ord;
    END IF;
    IF v_give_back THEN
        -- Each claimed row's reservation ends, whether or not its element was
        -- recorded (as in the single function); before the alert checks, so
        -- that they see the count the answers used.
        -- Negative amounts in the settles' rows (gateway_release).
        INSERT INTO usage_daily AS d (user_id, day, part, web_searches, cost_reserved)
        SELECT r.user_id, r.day, 1, -sum(r.web_searches), -sum(r.reserved_cost)
        FROM unnest(v_claimed_rows) AS r WHERE r.web_searches <> 0 OR r.reserved_cost <> 0
        GROUP BY r.user_id, r.day
        ORDER BY r.user_id, r.day
        ON CONFLICT (user_id, day, part) DO UPDATE SET
            web_searches = d.web_searches + excluded.web_searches,
            cost_reserved = d.cost_reserved + excluded.cost_reserved;
    END IF;

    IF cardinality(v_inserted) > 0 AND coalesce(cardinality(p_kinds), 0) > 0 THEN
        -- 0009's alert decision, for each (user, limit, period, threshold) the
        -- batch's settled elements check.
        WITH checks AS (
            SELECT DISTINCT ON (e.user_id, kind, period, threshold, value)
                e.user_id, e.day, e.month_start, e.created_at, e.channel_from,
                e.channel_count, p_kinds[e.at] AS kind, p_periods[e.at] AS period,
                p_values[e.at] AS value, p_thresholds[e.at] AS threshold, p_specs[e.at] AS spec
            FROM (
                -- One row per check of a settled element, its position in the
                -- check arrays from a set-returning function in the select
                -- list: a per-element function scan in FROM (unnest of its
                -- slices) built five arrays and a tuple store for every element.
                SELECT t.*, generate_series(t.check_from, t.check_from + t.check_count - 1) AS at
                FROM unnest(
                    p_users, p_days, p_month_starts, p_created_at, p_check_from, p_check_count,
                    p_channel_from, p_channel_count
                ) WITH ORDINALITY AS t(
                    user_id, day, month_start, created_at, check_from, check_count, channel_from,
                    channel_count, ord
                )
                WHERE v_settled[t.ord] AND t.check_count > 0
            ) e
            ORDER BY e.user_id, kind, period, threshold, value, e.day DESC, e.ord DESC
        ), measured AS (
            SELECT c.*,
                CASE
                    WHEN c.spec IS NOT NULL
                        THEN gateway_alert_used(c.user_id, c.day, c.month_start, c.spec)
                    WHEN c.kind = 'queries_per_day' THEN u.queries_per_day
                    WHEN c.kind = 'tokens_per_day' THEN u.tokens_per_day
                    WHEN c.kind = 'web_searches_per_day' THEN u.web_searches_per_day
                    ELSE u.tokens_per_month
                END AS used
            FROM checks c CROSS JOIN LATERAL (
                SELECT
                    coalesce(sum(d.queries) FILTER (WHERE d.day = c.day), 0) AS queries_per_day,
                    coalesce(sum(d.total_tokens) FILTER (WHERE d.day = c.day), 0)
                        AS tokens_per_day,
                    coalesce(sum(d.web_searches) FILTER (WHERE d.day = c.day), 0)
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
