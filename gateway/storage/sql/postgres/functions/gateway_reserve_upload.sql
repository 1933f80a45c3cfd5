-- An upload's check-and-reserve (issue 21), in one round trip: one upload and
-- its file's p_size bytes are counted on the user's day only while every limit
-- given (uploads and upload bytes per day or month; scope 2: the team's) allows
-- it. The locks are gateway_admit's, in its order (the team's row, then the
-- user's admission lock), so a user's - or a team's - uploads and answers are decided one at a
-- time, across replicas; the rule is gateway_decide's, with a charge of one
-- upload (meter 4) and p_size upload bytes (meter 5). With no limits the upload
-- is counted, unconditionally. Limits come as gateway_admit takes them.
--
-- Keyed by p_key (the request id; upload_reservations, 0022): an upload
-- counted under it already is not counted again, nor checked - its bytes only
-- become p_size, on the day it was counted - so a count after a reservation
-- whose answer was lost counts it once (docs/quotas.md, "Uploads").
--
-- Returns the limit that refused (its 1-based index in p_meters), or NULL, and
-- the counters: after the upload when admitted, before it when refused.
CREATE OR REPLACE FUNCTION gateway_reserve_upload(
    p_user text,
    p_key text,
    p_day date,
    p_month_start date,
    p_size bigint,
    p_meters smallint[],
    p_pers smallint[],
    p_maxes numeric[],
    p_scopes smallint[],
    p_team text
) RETURNS TABLE (
    refused integer,
    day_used numeric[],
    month_used numeric[],
    team_day numeric[],
    team_month numeric[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_day numeric[];
    v_month numeric[];
    v_team_day numeric[];
    v_team_month numeric[];
    v_team_streams bigint;
    v_charge numeric[] := ARRAY[0, 0, 0, 1, p_size, 0, 0, 0, 0, 0]::numeric[];
    v_team boolean := p_team IS NOT NULL AND 2 = ANY (p_scopes);
    v_held_day date;
    v_held_size bigint;
    d record;
BEGIN
    IF v_team THEN
        PERFORM 1 FROM teams WHERE id = p_team FOR NO KEY UPDATE;
    END IF;
    -- The user's admission lock, as gateway_admit takes it (0023).
    PERFORM pg_advisory_xact_lock(hashtextextended(p_user, 24)) FROM users WHERE id = p_user;
    IF NOT FOUND THEN
        RAISE foreign_key_violation USING MESSAGE = 'unknown user ' || p_user;
    END IF;
    -- Under the user's row lock: a key is counted by one call at a time.
    SELECT r.day, r.size INTO v_held_day, v_held_size
    FROM upload_reservations r WHERE r.id = p_key AND r.user_id = p_user;
    IF v_held_day IS NOT NULL AND v_held_size <> p_size THEN
        UPDATE usage_daily u SET upload_bytes = greatest(u.upload_bytes + p_size - v_held_size, 0)
        WHERE u.user_id = p_user AND u.day = v_held_day AND u.part = 0;
        UPDATE upload_reservations SET size = p_size WHERE id = p_key;
    END IF;
    SELECT c.day_used, c.month_used INTO v_day, v_month
    FROM gateway_user_counters(
        p_user, p_day, CASE WHEN 2 = ANY (p_pers) THEN p_month_start END
    ) c;
    IF v_team THEN
        SELECT c.day_used, c.month_used, c.streams INTO v_team_day, v_team_month, v_team_streams
        FROM gateway_team_counters(
            p_team, p_day, CASE WHEN 2 = ANY (p_pers) THEN p_month_start END, now()
        ) c;
    END IF;
    IF v_held_day IS NOT NULL THEN
        RETURN QUERY SELECT NULL::integer, v_day, v_month, v_team_day, v_team_month;
        RETURN;
    END IF;
    d := gateway_decide(p_meters, p_pers, p_maxes, v_day, v_month, 0, NULL, v_charge, false,
        p_scopes, v_team_day, v_team_month, 0);
    IF d.refused IS NOT NULL THEN
        RETURN QUERY SELECT d.refused, v_day, v_month, v_team_day, v_team_month;
        RETURN;
    END IF;
    INSERT INTO usage_daily AS u (user_id, day, uploads, upload_bytes)
    VALUES (p_user, p_day, 1, p_size)
    ON CONFLICT (user_id, day, part) DO UPDATE SET
        uploads = u.uploads + 1,
        upload_bytes = u.upload_bytes + excluded.upload_bytes;
    DELETE FROM upload_reservations WHERE user_id = p_user AND day < p_day - 1;
    INSERT INTO upload_reservations (id, user_id, day, size) VALUES (p_key, p_user, p_day, p_size);
    v_day[4] := v_day[4] + 1;
    v_day[5] := v_day[5] + p_size;
    IF v_month IS NOT NULL THEN
        v_month[4] := v_month[4] + 1;
        v_month[5] := v_month[5] + p_size;
    END IF;
    IF v_team THEN
        v_team_day[4] := v_team_day[4] + 1;
        v_team_day[5] := v_team_day[5] + p_size;
        IF v_team_month IS NOT NULL THEN
            v_team_month[4] := v_team_month[4] + 1;
            v_team_month[5] := v_team_month[5] + p_size;
        END IF;
    END IF;
    RETURN QUERY SELECT NULL::integer, v_day, v_month, v_team_day, v_team_month;
END
$$;
