-- Group commit: many admissions, or many settles, in one call - so one round
-- trip and one transaction (one commit, one WAL flush) for a whole batch.
--
-- Each batch function loops over its elements and calls the single-answer
-- function of 0008/0009 for each, in the same transaction: what an admission or
-- a settle decides and writes stays in one place, and a batch is exact the way
-- the single calls are - every element sees what the elements before it wrote
-- (the same user admitted twice in one batch is counted twice before the second
-- is checked). The elements come as parallel arrays, one element per answer; the
-- functions return one row per element, `ord` being its position (from 1) in
-- the arrays.
--
-- Lock order. Elements run in (user, position) order, not in the order they came
-- in: every batch, from any replica, takes the users' row locks in the same
-- order, so two batches never wait for each other in a circle. A settle batch
-- first claims all its pending rows in one statement (0008's rule: a pending row
-- first, then the lease, the user's row, the day row); as recovery never waits
-- for a pending row (SKIP LOCKED), a batch holding users' rows never waits for a
-- row a recovery holds.
--
-- A batch is one transaction: an error in any element (a duplicate pending id,
-- a user deleted meanwhile) rolls the whole batch back, and the gateway then
-- sends that batch's elements one by one, so that only the element at fault
-- fails (gateway/storage/group.py).

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
) LANGUAGE plpgsql AS $$
DECLARE
    e record;
    r record;
    v_user text;
    v_known boolean := false;
BEGIN
    FOR e IN
        SELECT * FROM unnest(
            p_users, p_days, p_month_starts, p_queries, p_tokens_day, p_tokens_month,
            p_streams, p_leases, p_lease_expires, p_now, p_advanced_rag, p_pending,
            p_endpoints, p_prompt, p_completion, p_total, p_cost, p_currency
        ) WITH ORDINALITY AS t(
            user_id, day, month_start, queries, tokens_day, tokens_month, streams, lease,
            lease_expires, now, advanced_rag, pending, endpoint, prompt, completion, total,
            cost, currency, ord
        )
        ORDER BY t.user_id, t.ord
    LOOP
        IF v_user IS DISTINCT FROM e.user_id THEN
            v_user := e.user_id;
            PERFORM 1 FROM users WHERE id = e.user_id;
            v_known := FOUND;
        END IF;
        IF NOT v_known THEN
            RETURN QUERY SELECT e.ord::integer, false, NULL::text, 0::bigint, 0::bigint,
                0::bigint, 0::bigint, 0::bigint;
            CONTINUE;
        END IF;
        SELECT * INTO r FROM gateway_admit(
            e.user_id, e.day, e.month_start, e.queries, e.tokens_day, e.tokens_month,
            e.streams, e.lease, e.lease_expires, e.now, e.advanced_rag, e.pending,
            e.endpoint, e.prompt, e.completion, e.total, e.cost, e.currency
        );
        RETURN QUERY SELECT e.ord::integer, true, r.refused_by, r.queries, r.tokens_today,
            r.tokens_month, r.web_searches, r.open_streams;
    END LOOP;
END
$$;

-- Settles: the arguments of 0009's gateway_settle, as arrays, except for the
-- alert checks. An element's checks are a slice of the check arrays (from
-- p_check_from, p_check_count long), its channels a slice of p_channels; an
-- element with no checks has a count of 0.
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
) RETURNS TABLE (ord integer, settled boolean) LANGUAGE plpgsql AS $$
DECLARE
    e record;
    v_claimed text[];
    v_last integer;
    v_channel_last integer;
BEGIN
    -- Every pending row of the batch claimed at once, in the index's order.
    WITH claimed AS (
        DELETE FROM pending_answers WHERE id = ANY (p_pending) RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO v_claimed FROM claimed;

    FOR e IN
        SELECT * FROM unnest(
            p_answer_ids, p_users, p_days, p_created_at, p_endpoints, p_prompt, p_completion,
            p_total, p_cost, p_currency, p_outcomes, p_estimated, p_web_searches,
            p_conversations, p_requests, p_upstream_ms, p_overhead_ms, p_leases, p_pending,
            p_models, p_cached, p_reasoning, p_month_starts, p_check_from, p_check_count,
            p_channel_from, p_channel_count
        ) WITH ORDINALITY AS t(
            answer_id, user_id, day, created_at, endpoint, prompt, completion, total, cost,
            currency, outcome, estimated, web_searches, conversation, request, upstream_ms,
            overhead_ms, lease, pending, model, cached, reasoning, month_start, check_from,
            check_count, channel_from, channel_count, ord
        )
        ORDER BY t.user_id, t.ord
    LOOP
        IF e.pending IS NOT NULL AND NOT e.pending = ANY (v_claimed) THEN
            -- Settled, refunded or recovered already: 0008's rule, the lease goes.
            DELETE FROM stream_leases WHERE id = e.lease;
            RETURN QUERY SELECT e.ord::integer, false;
            CONTINUE;
        END IF;
        v_last := e.check_from + e.check_count - 1;
        v_channel_last := e.channel_from + e.channel_count - 1;
        -- The pending row is claimed: settled under the answer id's unique rule.
        RETURN QUERY SELECT e.ord::integer, gateway_settle(
            e.answer_id, e.user_id, e.day, e.created_at, e.endpoint, e.prompt, e.completion,
            e.total, e.cost, e.currency, e.outcome, e.estimated, e.web_searches,
            e.conversation, e.request, e.upstream_ms, e.overhead_ms, e.lease, NULL::text,
            e.model, e.cached, e.reasoning, e.month_start,
            p_kinds[e.check_from:v_last], p_periods[e.check_from:v_last],
            p_values[e.check_from:v_last], p_thresholds[e.check_from:v_last],
            p_channels[e.channel_from:v_channel_last]
        );
    END LOOP;
END
$$;
