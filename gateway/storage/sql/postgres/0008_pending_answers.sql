-- Crash safety: every admitted answer is in the database from the moment it is
-- admitted, as a pending row, until it is settled, refunded or recovered.
--
-- Admission writes the pending row in the same call (so in the same round trip)
-- as the reservation; it carries what an estimate needs (the prompt-size
-- estimate the dialect makes for an answer that was never seen) so that an
-- answer whose gateway died (kill -9, OOM, power) is charged as an estimate by
-- `gateway_recover`, run by any replica on start-up and periodically.
--
-- Exactly once: the pending row is the answer's one token. Settle, refund and
-- recovery each DELETE it first and go on only if they got it; the row lock
-- makes the second of two racing callers wait and then find nothing, so a
-- retried settle, a recovery racing a late settle, or a refund after either
-- cannot count the answer twice. Settles that name no pending row (fail-open
-- admissions, spooled records of older versions) keep the old rule: unique on
-- the answer id. See docs/quotas.md ("Crash safety").
--
-- Lock order, everywhere: the pending row, then the lease, then the user's row,
-- then the day row (admission takes the user's row first but only ever creates
-- its pending row, which no one else can hold yet).
--
-- The new gateway_admit and gateway_settle are wrappers, with more arguments, of
-- the ones of 0003 and 0002 (PostgreSQL tells them apart by their number of
-- arguments): what those decide and write is left to them, whatever later
-- migrations make of them, and gateways of the previous version keep calling
-- them unchanged during a rolling upgrade.
CREATE TABLE pending_answers (
    id text PRIMARY KEY,  -- the request id; also its stream lease's id
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day date NOT NULL,
    created_at timestamptz NOT NULL,
    endpoint text NOT NULL,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens bigint NOT NULL DEFAULT 0,
    cost numeric NOT NULL DEFAULT 0,
    currency text NOT NULL DEFAULT 'USD'
);
CREATE INDEX pending_answers_created_idx ON pending_answers (created_at);

-- Admission (0003's gateway_admit), then, when admitted, the pending row
-- (p_pending NULL: none is written). One call, one transaction.
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
    p_advanced_rag boolean,
    p_pending text,
    p_endpoint text,
    p_prompt bigint,
    p_completion bigint,
    p_total bigint,
    p_cost numeric,
    p_currency text
) RETURNS TABLE (
    refused_by text,
    queries bigint,
    tokens_today bigint,
    tokens_month bigint,
    web_searches bigint,
    open_streams bigint
) LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM gateway_admit(
        p_user, p_day, p_month_start, p_queries, p_tokens_day, p_tokens_month, p_streams,
        p_lease, p_lease_expires, p_now, p_advanced_rag
    );
    IF r.refused_by IS NULL AND p_pending IS NOT NULL THEN
        INSERT INTO pending_answers (
            id, user_id, day, created_at, endpoint, prompt_tokens, completion_tokens,
            total_tokens, cost, currency
        ) VALUES (
            p_pending, p_user, p_day, p_now, p_endpoint, p_prompt, p_completion,
            p_total, p_cost, p_currency
        );
    END IF;
    RETURN QUERY SELECT r.refused_by, r.queries, r.tokens_today, r.tokens_month,
        r.web_searches, r.open_streams;
END
$$;

-- Settle: claim the answer's pending row (p_pending), then 0002's gateway_settle
-- (lease, ledger, lifetime totals, day row). Without the claim - the answer was
-- settled already (a retry), or recovered as an estimate by a replica that took
-- it for dead - only the lease is released, and false returned.
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
BEGIN
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending;
        IF NOT FOUND THEN
            DELETE FROM stream_leases WHERE id = p_lease;
            RETURN false;
        END IF;
    END IF;
    RETURN gateway_settle(
        p_answer_id, p_user, p_day, p_created_at, p_endpoint, p_prompt, p_completion,
        p_total, p_cost, p_currency, p_outcome, p_estimated, p_web_searches, p_conversation,
        p_request, p_upstream_ms, p_overhead_ms, p_lease
    );
END
$$;

-- Give back an admitted query that produced no answer. With p_pending, only
-- while its pending row is there: a refund retried, or one after a recovery
-- charged the answer, changes nothing. Returns whether the query was returned.
CREATE OR REPLACE FUNCTION gateway_refund(p_user text, p_day date, p_lease text, p_pending text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_claimed boolean := true;
BEGIN
    IF p_pending IS NOT NULL THEN
        DELETE FROM pending_answers WHERE id = p_pending;
        v_claimed := FOUND;
    END IF;
    DELETE FROM stream_leases WHERE id = p_lease;
    IF v_claimed THEN
        UPDATE usage_daily SET queries = queries - 1
        WHERE user_id = p_user AND day = p_day AND queries > 0;
    END IF;
    RETURN v_claimed;
END
$$;

-- Charge the pending answers admitted before p_before as estimates (outcome
-- 'recovered', answer id 'gw-' || request id); their reserved queries stay
-- spent. SKIP LOCKED: replicas running this at once share the rows out instead
-- of queueing on them, and a row a settle is claiming right now is left to that
-- settle. Returns the ids recovered.
CREATE OR REPLACE FUNCTION gateway_recover(p_before timestamptz, p_limit integer, p_now timestamptz)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    r pending_answers%ROWTYPE;
BEGIN
    -- In user order, so that two replicas recovering rows of the same users take
    -- the users' row locks in the same order (no deadlock between them).
    FOR r IN
        SELECT * FROM pending_answers p WHERE p.created_at < p_before
        ORDER BY p.user_id, p.id LIMIT p_limit FOR UPDATE SKIP LOCKED
    LOOP
        DELETE FROM pending_answers WHERE id = r.id;
        -- The answer's lease has the same id as its pending row.
        PERFORM gateway_settle(
            'gw-' || r.id, r.user_id, r.day, p_now, r.endpoint, r.prompt_tokens,
            r.completion_tokens, r.total_tokens, r.cost, r.currency, 'recovered', true, 0,
            NULL, r.id, NULL, NULL, r.id
        );
        RETURN NEXT r.id;
    END LOOP;
END
$$;
