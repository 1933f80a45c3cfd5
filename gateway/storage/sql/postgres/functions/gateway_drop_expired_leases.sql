-- Removes the user's leases expired at p_now that no one else is deleting
-- (SKIP LOCKED: admission never waits for a lease; see 0010).
CREATE OR REPLACE FUNCTION gateway_drop_expired_leases(p_user text, p_now timestamp with time zone)
 RETURNS void
 LANGUAGE sql
AS $$
    DELETE FROM stream_leases WHERE id IN (
        SELECT id FROM stream_leases
        WHERE user_id = p_user AND expires_at <= p_now
        FOR UPDATE SKIP LOCKED
    );
$$;
