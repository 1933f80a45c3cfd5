-- Ends the reservations admission made with a pending row (its web searches
-- and its cost bound) on the day it made them on: negative amounts in the
-- settles' row of that day (part 1, 0023), which the admissions' row's
-- reservation and it sum to nothing. The settle that ends them adds what the
-- answer used instead.
CREATE OR REPLACE FUNCTION gateway_release(
    p_user text, p_day date, p_web_searches integer, p_cost numeric
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily AS d (user_id, day, part, web_searches, cost_reserved)
    VALUES (p_user, p_day, 1, -p_web_searches, -p_cost)
    ON CONFLICT (user_id, day, part) DO UPDATE SET
        web_searches = d.web_searches + excluded.web_searches,
        cost_reserved = d.cost_reserved + excluded.cost_reserved;
END
$$;
