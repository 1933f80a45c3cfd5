-- gateway/quota/limits.py's `refuses`: whether a limit of meter p_meter (numbered as
-- quota.METERS) and maximum p_max refuses a request adding p_amount to p_used.
-- Reserved meters hold only a request that adds to them; measured ones (6-9:
-- tokens, cost) refuse once used has reached the maximum. (PL/pgSQL, not SQL:
-- a SQL function called from PL/pgSQL is planned again at every call.)
CREATE OR REPLACE FUNCTION gateway_refuses(
    p_meter smallint, p_max numeric, p_used numeric, p_amount numeric
) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN (p_amount > 0 AND p_used + p_amount > p_max)
        OR (p_meter BETWEEN 6 AND 9 AND p_used >= p_max);
END
$$;
