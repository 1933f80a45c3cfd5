-- Settle of an answer admission recorded as pending: claims the pending row
-- (a second settle, a refund or a recovery then finds it gone), writes the
-- answer (gateway_record) and ends the reservations made with the row. A
-- settle whose pending row a recovery took supersedes the estimate it charged
-- (gateway_supersede).
CREATE OR REPLACE FUNCTION gateway_settle_pending(p_answer_id text, p_user text, p_day date, p_created_at timestamp with time zone, p_endpoint text, p_prompt bigint, p_completion bigint, p_total bigint, p_cost numeric, p_currency text, p_outcome text, p_estimated boolean, p_web_searches integer, p_conversation text, p_request text, p_upstream_ms double precision, p_overhead_ms double precision, p_lease text, p_pending text, p_upstream text DEFAULT 'default'::text)
 RETURNS boolean
 LANGUAGE plpgsql
AS $$
DECLARE
    v_day date;
    v_reserved integer := 0;
    v_reserved_cost numeric := 0;
    v_rates integer := 0;
    v_keys text[] := '{}';
    v_settled boolean;
BEGIN
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending RETURNING day, web_searches, reserved_cost, rates, scopes
        INTO v_day, v_reserved, v_reserved_cost, v_rates, v_keys;
        IF NOT FOUND THEN
            DELETE FROM stream_leases WHERE id = p_lease;
            RETURN gateway_supersede(
                p_pending, p_answer_id, p_user, p_created_at, p_endpoint, p_prompt,
                p_completion, p_total, p_cost, p_currency, p_outcome, p_estimated,
                p_web_searches, p_conversation, p_request, p_upstream_ms, p_overhead_ms,
                p_upstream
            );
        END IF;
    END IF;
    v_settled := gateway_record(
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms, p_lease, p_upstream
    );
    IF v_reserved <> 0 OR v_reserved_cost <> 0 THEN
        -- Whether or not the answer id was new, the reservation ends here. The
        -- user's row first, as everywhere (the ledger write took it already
        -- unless the answer id was recorded before).
        PERFORM 1 FROM users WHERE id = p_user FOR NO KEY UPDATE;
        PERFORM gateway_release(p_user, v_day, v_reserved, v_reserved_cost);
    END IF;
    IF cardinality(v_keys) > 0 THEN
        -- The per-model counters: the answer's figures if it was recorded, and
        -- the end of its cost bound's reservation either way.
        PERFORM gateway_add_models(
            p_user, v_keys, v_day, 0,
            CASE WHEN v_settled THEN p_prompt ELSE 0 END,
            CASE WHEN v_settled THEN p_completion ELSE 0 END,
            CASE WHEN v_settled THEN p_total ELSE 0 END,
            CASE WHEN v_settled THEN p_cost ELSE 0 END,
            -v_reserved_cost
        );
    END IF;
    IF v_settled AND v_rates & 12 <> 0 THEN
        PERFORM gateway_count_token_rates(p_user, v_rates, p_created_at, p_total);
    END IF;
    RETURN v_settled;
END
$$;
