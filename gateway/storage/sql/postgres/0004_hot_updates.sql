-- Settling an answer updates the user's row (lifetime totals) and the day row. An
-- update can be HOT - no new index entries, no dead index tuples - only if no
-- indexed column changes and the page has room. The index on lifetime_tokens made
-- every settle a full update; it goes (sorting users by lifetime tokens scans the
-- users table instead), and both tables leave room on their pages for HOT
-- updates. Measured in docs/performance.md.
DROP INDEX IF EXISTS users_lifetime_tokens_idx;
ALTER TABLE users SET (fillfactor = 70);
ALTER TABLE usage_daily SET (fillfactor = 70);
