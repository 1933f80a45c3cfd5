-- The ledger id an answer of request p_request is recorded under when its own
-- id, p_answer_id, may be taken (review-once F1): p_answer_id if no row holds
-- it; NULL if the row holding it is this request's (a retried settle, a replayed
-- spool line, a record whose estimate it superseded already: a duplicate);
-- else the row is another request's answer under the same upstream id (a buggy
-- or hostile upstream repeating an id), and this answer is a new one, recorded
-- under '<id>#<request id>' - looked up the same way in turn, so an upstream
-- that named some answer that very id (it may know request ids: dialects pass
-- them on as trace ids) only adds one more '#<request id>'. The row of the
-- upstream's own id is the first answer's, so `answer_owner` still names its
-- user. A record with no request id cannot be told from another request's:
-- taken is a duplicate, as before. Called only when the id was found taken, so
-- a settle of a new id pays nothing for it.
CREATE OR REPLACE FUNCTION gateway_answer_id(p_answer_id text, p_request text)
 RETURNS text
 LANGUAGE plpgsql
AS $$
DECLARE
    v_answer text := p_answer_id;
    v_request text;
BEGIN
    LOOP
        SELECT e.request_id INTO v_request FROM usage_events e WHERE e.answer_id = v_answer;
        IF NOT FOUND THEN
            RETURN v_answer;
        END IF;
        IF p_request IS NULL OR v_request = p_request THEN
            RETURN NULL;
        END IF;
        v_answer := v_answer || '#' || p_request;
    END LOOP;
END
$$;
