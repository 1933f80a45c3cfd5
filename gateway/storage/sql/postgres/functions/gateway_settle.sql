-- One settle, as the gateway calls it: gateway_settle_pending, then the
-- answer's model and token parts, then the threshold alerts the settle crossed
-- (0009), all in the caller's transaction. p_upstream: the named upstream
-- that answered (0017; a caller of the previous version names none).
CREATE OR REPLACE FUNCTION gateway_settle(p_answer_id text, p_user text, p_day date, p_created_at timestamp with time zone, p_endpoint text, p_prompt bigint, p_completion bigint, p_total bigint, p_cost numeric, p_currency text, p_outcome text, p_estimated boolean, p_web_searches integer, p_conversation text, p_request text, p_upstream_ms double precision, p_overhead_ms double precision, p_lease text, p_pending text, p_model text, p_cached bigint, p_reasoning bigint, p_month_start date, p_kinds text[], p_periods text[], p_values numeric[], p_thresholds integer[], p_channels text[], p_cache_write bigint, p_upstream text DEFAULT 'default'::text, p_specs text[] DEFAULT NULL)
 RETURNS boolean
 LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT gateway_settle_pending(
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms, p_lease, p_pending, p_upstream
    ) THEN
        RETURN false;
    END IF;
    -- Answers that name no model nor token parts (Dify's) skip this update; it
    -- touches only columns no index covers, so it is a HOT update (0006). The
    -- prompt tokens written to the provider's cache (0014) go with them.
    IF p_model IS NOT NULL OR p_cached <> 0 OR p_reasoning <> 0 OR p_cache_write <> 0 THEN
        UPDATE usage_events SET
            model = p_model, cached_tokens = p_cached, reasoning_tokens = p_reasoning,
            cache_write_tokens = p_cache_write
        WHERE answer_id = p_answer_id;
    END IF;
    IF coalesce(cardinality(p_kinds), 0) > 0 THEN
        WITH used AS (
            SELECT
                coalesce(max(d.queries) FILTER (WHERE d.day = p_day), 0) AS queries_per_day,
                coalesce(max(d.total_tokens) FILTER (WHERE d.day = p_day), 0) AS tokens_per_day,
                coalesce(max(d.web_searches) FILTER (WHERE d.day = p_day), 0)
                    AS web_searches_per_day,
                coalesce(sum(d.total_tokens), 0) AS tokens_per_month
            FROM usage_daily d
            WHERE d.user_id = p_user AND d.day >= p_month_start AND d.day <= p_day
        ), checks AS (
            SELECT c.kind, c.period, c.value, c.threshold,
                CASE
                    -- Any other limit per day or month (issue 21): money
                    -- budgets, general, per-model and team limits.
                    WHEN c.spec IS NOT NULL
                        THEN gateway_alert_used(p_user, p_day, p_month_start, c.spec)
                    WHEN c.kind = 'queries_per_day' THEN u.queries_per_day
                    WHEN c.kind = 'tokens_per_day' THEN u.tokens_per_day
                    WHEN c.kind = 'web_searches_per_day' THEN u.web_searches_per_day
                    ELSE u.tokens_per_month
                END AS used
            FROM unnest(p_kinds, p_periods, p_values, p_thresholds, p_specs)
                AS c(kind, period, value, threshold, spec),
                used u
        ), new AS (
            INSERT INTO notifications AS n (
                user_id, kind, period, threshold, created_at, limit_value, used
            )
            SELECT p_user, c.kind, c.period, c.threshold, p_created_at, c.value, c.used
            FROM checks c
            WHERE c.used * 100 >= c.value * c.threshold
            ON CONFLICT DO NOTHING
            RETURNING n.kind, n.period, n.threshold
        )
        INSERT INTO alert_outbox (user_id, kind, period, threshold, channel, created_at,
            next_attempt_at)
        SELECT p_user, x.kind, x.period, x.threshold, ch, p_created_at, p_created_at
        FROM new x, unnest(p_channels) AS ch;
    END IF;
    RETURN true;
END
$$;
