-- Web searches are reserved at admission, like the query (issue 20): the
-- reservation lives on the answer's pending row until settle replaces it with
-- the count the answer used, a refund gives it back, or a recovery keeps it
-- (docs/features.md, "Web searches per day"; the PostgreSQL migration 0011
-- explains the rules).
ALTER TABLE pending_answers ADD COLUMN web_searches INTEGER NOT NULL DEFAULT 0;
