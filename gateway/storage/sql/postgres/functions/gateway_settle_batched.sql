-- A batch of one settle (a settle that found no batch in flight, the usual
-- case under light load): gateway_settle under the batches' lock timeout (0010:
-- the gateway then sends it again on its own), with the settle's own
-- arguments: through gateway_settle_many it cost the decoding and slicing of
-- 35 arrays, a query and a tuple store more (0.06-0.14 ms of PostgreSQL CPU a
-- settle; docs/performance.md).
CREATE OR REPLACE FUNCTION gateway_settle_batched(p_answer_id text, p_user text, p_day date, p_created_at timestamp with time zone, p_endpoint text, p_prompt bigint, p_completion bigint, p_total bigint, p_cost numeric, p_currency text, p_outcome text, p_estimated boolean, p_web_searches integer, p_conversation text, p_request text, p_upstream_ms double precision, p_overhead_ms double precision, p_lease text, p_pending text, p_model text, p_cached bigint, p_reasoning bigint, p_month_start date, p_kinds text[], p_periods text[], p_values numeric[], p_thresholds integer[], p_channels text[], p_cache_write bigint, p_upstream text DEFAULT 'default'::text, p_specs text[] DEFAULT NULL)
 RETURNS boolean
 LANGUAGE plpgsql
 SET lock_timeout TO '250ms'
AS $$
BEGIN
    RETURN gateway_settle(
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms, p_lease, p_pending, p_model, p_cached,
        p_reasoning, p_month_start, p_kinds, p_periods, p_values, p_thresholds, p_channels,
        p_cache_write, p_upstream, p_specs
    );
END
$$;
