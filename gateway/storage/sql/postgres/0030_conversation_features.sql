-- Review-limits F5: Dify answers every later message of a conversation with
-- the inputs the conversation began with (`conversation.inputs if conversation
-- else ...` in each chat app generator), not the request's. So a conversation
-- begun with advanced RAG or web search runs them on every later message,
-- whatever those messages' inputs say. The gateway keeps, for each conversation
-- whose first message asked for either, which it asked for, and holds a later
-- message to it (gateway/conversations.py). Only such conversations are kept:
-- the row is written before the client can know the conversation's id, so a
-- conversation not found here began without them (or before this release).
-- Rows go with their user, as the other per-user tables do (0026, 0029).
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE TABLE conversation_features (
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    upstream TEXT NOT NULL,
    advanced_rag BOOLEAN NOT NULL,
    web_search BOOLEAN NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);

CREATE OR REPLACE FUNCTION user_deleted_cascade() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM stream_leases WHERE user_id = OLD.id;
    DELETE FROM pending_answers WHERE user_id = OLD.id;
    DELETE FROM usage_events WHERE user_id = OLD.id;
    DELETE FROM upload_owners WHERE user_id = OLD.id;
    DELETE FROM conversation_features WHERE user_id = OLD.id;
    RETURN OLD;
END
$$;

CREATE OR REPLACE FUNCTION users_truncated_cascade() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    TRUNCATE stream_leases, pending_answers, usage_events, upload_owners, conversation_features;
    RETURN NULL;
END
$$;
