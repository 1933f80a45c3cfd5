-- Charges pending answers whose gateway died as estimates (outcome
-- 'recovered'): their queries, and any web search reserved, stay spent; a cost
-- bound reserved is replaced by the estimate; the estimate's tokens count in the
-- token rates the answer was admitted under. SKIP LOCKED: each pending row is
-- recovered by one process, or settled by its gateway. The estimate is the
-- upstream's the answer was sent to (0017). The pending rows of users who are
-- gone (no foreign key since 0024: deleted with triggers off, say) are dropped
-- first, with their leases: they do not count in the batch the caller reads a
-- short one of as the end (review of 0024/0025). A row is taken only when it
-- is older than the caller's age (p_now - p_before) by the database's clock as
-- well as by the caller's: a replica whose clock runs ahead of the others' by
-- more than that age would otherwise charge answers still streaming
-- (gateway/recovery.py). Only ever later than the caller asked: a caller behind
-- the database recovers by its own clock, as before.
CREATE OR REPLACE FUNCTION gateway_recover(p_before timestamp with time zone, p_limit integer, p_now timestamp with time zone)
 RETURNS SETOF text
 LANGUAGE plpgsql
AS $$
DECLARE
    r pending_answers%ROWTYPE;
    v_recorded boolean;
    -- p_before moved back by how far the database's clock is behind the
    -- caller's (never forward): a small interval, not the age of whole days,
    -- which a timestamptz less days reckons in the session's time zone (an
    -- hour off across a change of daylight saving time: review-skew F6).
    v_before timestamptz := p_before + LEAST(interval '0', now() - p_now);
BEGIN
    WITH gone AS (
        DELETE FROM pending_answers p WHERE p.created_at < v_before
            AND NOT EXISTS (SELECT FROM users u WHERE u.id = p.user_id)
        RETURNING p.id
    )
    DELETE FROM stream_leases l USING gone WHERE l.id = gone.id;
    FOR r IN
        SELECT * FROM pending_answers p WHERE p.created_at < v_before
        ORDER BY p.user_id, p.id LIMIT p_limit FOR UPDATE SKIP LOCKED
    LOOP
        DELETE FROM pending_answers WHERE id = r.id;
        IF NOT EXISTS (SELECT FROM users WHERE id = r.user_id) THEN
            -- Its user was deleted since the drop above: no one to charge.
            DELETE FROM stream_leases WHERE id = r.id;
            CONTINUE;
        END IF;
        -- The estimate is written as a settle with no pending row, no model
        -- nor token parts and no alert checks writes an answer.
        v_recorded := gateway_settle(
            'gw-' || r.id, r.user_id, r.day, p_now, r.endpoint, r.prompt_tokens,
            r.completion_tokens, r.total_tokens, r.cost, r.currency, 'recovered', true, 0,
            NULL, r.id, NULL, NULL, r.id, NULL, NULL, 0, 0, NULL, NULL, NULL, NULL, NULL,
            NULL, 0, r.upstream, NULL
        );
        IF v_recorded AND r.rates & 12 <> 0 THEN
            -- The estimate counts in the token rates its admission counted the
            -- answer in, as a settled answer's tokens do, in the buckets of now.
            PERFORM gateway_count_token_rates(r.user_id, r.rates, p_now, r.total_tokens);
        END IF;
        IF v_recorded AND (r.web_searches <> 0 OR cardinality(r.scopes) > 0) THEN
            -- The ledger row keeps what a superseding record corrects: the web
            -- searches reserved and the per-model counters' keys (0016). (Its
            -- request's: an upstream could have named another answer
            -- 'gw-<this request id>', and the estimate then went in under
            -- another id, gateway_answer_id; no record supersedes that one.)
            UPDATE usage_events SET web_searches = r.web_searches,
                scopes = CASE WHEN cardinality(r.scopes) > 0 THEN r.scopes END
            WHERE answer_id = 'gw-' || r.id AND request_id = r.id;
        END IF;
        IF cardinality(r.scopes) > 0 THEN
            PERFORM gateway_add_models(
                r.user_id, r.scopes, r.day, 0, r.prompt_tokens, r.completion_tokens,
                r.total_tokens, r.cost, -r.reserved_cost, 1::smallint
            );
        END IF;
        IF r.reserved_cost <> 0 THEN
            -- The cost bound's reservation ends: the estimate is charged
            -- instead (admission made it at least the bound). Lock order:
            -- the user's row, then the day row.
            PERFORM 1 FROM users WHERE id = r.user_id FOR NO KEY UPDATE;
            PERFORM gateway_release(r.user_id, r.day, 0, r.reserved_cost);
        END IF;
        RETURN NEXT r.id;
    END LOOP;
END
$$;
