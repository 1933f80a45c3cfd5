-- The ledger keeps the prompt tokens an answer wrote to the provider's prompt
-- cache (Anthropic's cache_creation_input_tokens), a part of prompt_tokens
-- priced at its own rate, beside the part read from it (cached_tokens).
--
-- Like 0006 and 0009 it wraps rather than repeats: the 29-argument
-- gateway_settle and the 33-argument gateway_settle_many call those of 0011
-- and then set the new column on the rows they wrote, in the same transaction.
-- The earlier functions stay as they are for gateways of previous versions
-- during a rolling upgrade (they record no cache writes).
ALTER TABLE usage_events ADD COLUMN cache_write_tokens bigint NOT NULL DEFAULT 0;

CREATE FUNCTION gateway_settle(
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
    p_pending text,
    p_model text,
    p_cached bigint,
    p_reasoning bigint,
    p_month_start date,
    p_kinds text[],
    p_periods text[],
    p_values bigint[],
    p_thresholds integer[],
    p_channels text[],
    p_cache_write bigint
) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF NOT gateway_settle(
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms, p_lease, p_pending, p_model, p_cached,
        p_reasoning, p_month_start, p_kinds, p_periods, p_values, p_thresholds, p_channels
    ) THEN
        RETURN false;
    END IF;
    -- Most answers write nothing to a cache and skip this (a HOT update otherwise).
    IF p_cache_write <> 0 THEN
        UPDATE usage_events SET cache_write_tokens = p_cache_write
        WHERE answer_id = p_answer_id;
    END IF;
    RETURN true;
END
$$;

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
    p_channels text[],
    p_cache_write bigint[]
) RETURNS TABLE (ord integer, settled boolean) LANGUAGE plpgsql
SET lock_timeout = '250ms' AS $$
DECLARE
    v_ords integer[];
    v_settled boolean[];
BEGIN
    SELECT coalesce(array_agg(s.ord ORDER BY s.ord), '{}'),
        coalesce(array_agg(s.settled ORDER BY s.ord), '{}')
    INTO v_ords, v_settled
    FROM gateway_settle_many(
        p_answer_ids, p_users, p_days, p_created_at, p_endpoints, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcomes, p_estimated, p_web_searches, p_conversations,
        p_requests, p_upstream_ms, p_overhead_ms, p_leases, p_pending, p_models, p_cached,
        p_reasoning, p_month_starts, p_check_from, p_check_count, p_channel_from,
        p_channel_count, p_kinds, p_periods, p_values, p_thresholds, p_channels
    ) AS s;
    -- The rows this batch wrote, of the elements that wrote to a cache.
    UPDATE usage_events e SET cache_write_tokens = t.cache_write
    FROM unnest(p_answer_ids, p_cache_write) WITH ORDINALITY AS t(answer_id, cache_write, ord),
        unnest(v_ords, v_settled) AS b(ord, settled)
    WHERE b.ord = t.ord AND b.settled AND t.cache_write <> 0 AND e.answer_id = t.answer_id;
    RETURN QUERY SELECT b.ord, b.settled FROM unnest(v_ords, v_settled) AS b(ord, settled);
END
$$;
