-- Review of issue 23: a Dify conversation lives in the app that made it. A
-- request continuing one, on a mount with fallbacks, is sent to the upstream
-- the ledger records for that user's conversation: one index probe.
CREATE INDEX IF NOT EXISTS usage_events_conversation_idx
    ON usage_events (user_id, conversation_id, seq)
    WHERE conversation_id IS NOT NULL;
