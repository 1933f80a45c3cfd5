-- Adds what a batch admitted for one user and day to the day row, once
-- (p_charge in gateway_decide's meter order: queries, advanced RAG, web
-- searches, ..., cost bound reserved).
CREATE OR REPLACE FUNCTION gateway_add_admitted(p_user text, p_day date, p_charge numeric[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily AS u (user_id, day, queries, advanced_rag, web_searches, cost_reserved)
    VALUES (p_user, p_day, p_charge[1], p_charge[2], p_charge[3], p_charge[9])
    ON CONFLICT (user_id, day) DO UPDATE SET
        queries = u.queries + excluded.queries,
        advanced_rag = u.advanced_rag + excluded.advanced_rag,
        web_searches = u.web_searches + excluded.web_searches,
        cost_reserved = u.cost_reserved + excluded.cost_reserved;
END
$$;
