-- Review-limits F5: Dify answers every later message of a conversation with
-- the inputs the conversation began with, not the request's. The gateway
-- keeps, for each conversation whose first message asked for advanced RAG or
-- web search, which it asked for, and holds a later message to it
-- (gateway/conversations.py; PostgreSQL 0030 says more). Rows go with their
-- user by a trigger, as upload owners do (0022).
CREATE TABLE conversation_features (
    user_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    upstream TEXT NOT NULL,
    advanced_rag INTEGER NOT NULL,
    web_search INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
) WITHOUT ROWID;

CREATE TRIGGER IF NOT EXISTS users_deleted_conversation_features AFTER DELETE ON users
BEGIN
    DELETE FROM conversation_features WHERE user_id = OLD.id;
END;
