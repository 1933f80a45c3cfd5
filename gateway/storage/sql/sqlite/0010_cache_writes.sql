-- The ledger keeps the prompt tokens an answer wrote to the provider's prompt
-- cache (Anthropic's cache_creation_input_tokens), a part of prompt_tokens
-- priced at its own rate, beside the part read from it (cached_tokens).
ALTER TABLE usage_events ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
