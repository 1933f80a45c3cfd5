-- Admission also counts advanced-RAG queries, in the same step as the query.
DROP FUNCTION gateway_admit(text, date, date, bigint, bigint, bigint, bigint, text, timestamptz, timestamptz);

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
    p_advanced_rag boolean
) RETURNS TABLE (
    refused_by text,
    queries bigint,
    tokens_today bigint,
    tokens_month bigint,
    web_searches bigint,
    open_streams bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_queries bigint;
    v_tokens bigint;
    v_web bigint;
    v_prev bigint;
    v_streams bigint := 0;
    v_refused text;
BEGIN
    -- All admissions of one user queue on this row lock; every statement after
    -- it sees what the ones before committed (READ COMMITTED takes a fresh
    -- snapshot per statement), so check-then-increment is exact. NO KEY UPDATE
    -- does not block the foreign-key checks of concurrent ledger writes.
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
        DELETE FROM stream_leases l WHERE l.user_id = p_user AND l.expires_at <= p_now;
        SELECT count(*) INTO v_streams FROM stream_leases l WHERE l.user_id = p_user;
    END IF;

    v_refused := CASE
        WHEN p_queries IS NOT NULL AND v_queries >= p_queries THEN 'queries_per_day'
        WHEN p_tokens_day IS NOT NULL AND v_tokens >= p_tokens_day THEN 'tokens_per_day'
        WHEN p_tokens_month IS NOT NULL AND v_prev + v_tokens >= p_tokens_month THEN 'tokens_per_month'
        WHEN p_streams IS NOT NULL AND v_streams >= p_streams THEN 'max_concurrent_streams'
    END;
    IF v_refused IS NULL THEN
        INSERT INTO usage_daily AS d (user_id, day, queries, advanced_rag)
        VALUES (p_user, p_day, 1, CASE WHEN p_advanced_rag THEN 1 ELSE 0 END)
        ON CONFLICT (user_id, day) DO UPDATE SET
            queries = d.queries + 1,
            advanced_rag = d.advanced_rag + excluded.advanced_rag;
        v_queries := v_queries + 1;
        IF p_lease IS NOT NULL THEN
            INSERT INTO stream_leases (id, user_id, expires_at) VALUES (p_lease, p_user, p_lease_expires);
            v_streams := v_streams + 1;
        END IF;
    END IF;
    RETURN QUERY SELECT v_refused, v_queries, v_tokens, v_prev + v_tokens, v_web, v_streams;
END
$$;

