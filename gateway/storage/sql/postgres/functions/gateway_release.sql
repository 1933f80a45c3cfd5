-- Ends the reservations admission made with a pending row (its web searches
-- and its cost bound) on the day row it made them on. The settle that ends
-- them adds what the answer used instead.
CREATE OR REPLACE FUNCTION gateway_release(
    p_user text, p_day date, p_web_searches integer, p_cost numeric
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE usage_daily SET
        web_searches = greatest(web_searches - p_web_searches, 0),
        cost_reserved = cost_reserved - p_cost
    WHERE user_id = p_user AND day = p_day;
END
$$;
