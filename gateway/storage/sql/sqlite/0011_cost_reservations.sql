-- Issue 21, money budgets: admission reserves an upper bound of an answer's cost
-- against the user's cost limits. The day row holds what answers under way have
-- reserved (cost_reserved, a decimal string like cost); the answer's pending row
-- holds its own reservation (reserved_cost), which settle, refund and recovery
-- take off the day row again. Existing rows reserve nothing.
ALTER TABLE usage_daily ADD COLUMN cost_reserved TEXT NOT NULL DEFAULT '0';
ALTER TABLE pending_answers ADD COLUMN reserved_cost TEXT NOT NULL DEFAULT '0';
