-- The ledger records which model answered and the parts of the prompt and
-- completion counts that providers price apart: prompt tokens read from the
-- prompt cache, completion tokens spent reasoning (docs/upstreams/openai.md).
ALTER TABLE usage_events ADD COLUMN model TEXT;
ALTER TABLE usage_events ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
