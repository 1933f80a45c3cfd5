-- Issue 21: threshold alerts watch money budgets too (cost_per_day, a cost
-- limit of [[plans.NAME.limits]], the team's): a crossing's limit and usage
-- may be amounts of money, kept exactly. Counts stay whole numbers in it.
ALTER TABLE notifications
    ALTER COLUMN limit_value TYPE numeric,
    ALTER COLUMN used TYPE numeric;
