-- Issue 24: an admission no longer waits for the same user's settles' row
-- locks (held until their commit is flushed: a third of an admission's wall
-- time at 100 answers/s, docs/performance.md).
--
-- A user's day is two rows: part 0, written by admissions (the query, advanced
-- RAG, a web search and a cost bound reserved, uploads) and refunds; part 1,
-- written by settles, recoveries and the release of reservations (the tokens,
-- the cost, the web searches used less those reserved, the cost bound given
-- back - a negative cost_reserved). A day's usage is the sum of its two rows:
-- every reader sums them (an admission in the one statement that reads its
-- counters, so a settle's "release the reservation, add what was used" is seen
-- whole or not at all). An existing row is part 0.
--
-- Admissions serialize per user on a transaction-scoped advisory lock
-- (gateway_admit) instead of the user's row, which settles update (lifetime
-- totals).
ALTER TABLE usage_daily ADD COLUMN IF NOT EXISTS part smallint NOT NULL DEFAULT 0;
ALTER TABLE usage_daily DROP CONSTRAINT IF EXISTS usage_daily_pkey;
-- The key is rebuilt under the table's ACCESS EXCLUSIVE lock, in the migration's
-- transaction (no CONCURRENTLY there): every pod's admissions and settles wait
-- for it, about 2.5 s per 1.5 M rows (docs/deploy.md, the upgrade note).
ALTER TABLE usage_daily ADD PRIMARY KEY (user_id, day, part);
-- NOT VALID: the rows already there hold the column's default, 0, so the scan
-- that would check them (a tenth of the migration's time under the lock) is
-- skipped; every row written from now on is checked.
ALTER TABLE usage_daily ADD CONSTRAINT usage_daily_part_check CHECK (part IN (0, 1)) NOT VALID;

-- The per-model counters (0015) likewise: part 0 written by admissions and
-- refunds, part 1 by settles, recoveries and supersedes (gateway_add_models'
-- p_part); their readers sum the key's rows of the days they count. An
-- existing row is part 0.
ALTER TABLE usage_models ADD COLUMN IF NOT EXISTS part smallint NOT NULL DEFAULT 0;
ALTER TABLE usage_models DROP CONSTRAINT IF EXISTS usage_models_pkey;
ALTER TABLE usage_models ADD PRIMARY KEY (user_id, scope, day, part);
ALTER TABLE usage_models ADD CONSTRAINT usage_models_part_check CHECK (part IN (0, 1)) NOT VALID;

-- The live functions' record gets a new name (it was schema_functions, 0015).
-- The previous release's migrate() installs its own function set only when
-- to_regclass('schema_functions') is not null: one of its pods restarting
-- during a rolling update therefore leaves this release's functions in place
-- instead of putting back functions whose ON CONFLICT (user_id, day) matches
-- no key of usage_daily any more (docs/deploy.md, the upgrade note of 0023).
ALTER TABLE schema_functions RENAME TO schema_function_set;
