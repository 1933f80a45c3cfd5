-- Issue 21: a crossing's limit and usage may be amounts of money (cost_per_day,
-- a cost limit of [[plans.NAME.limits]], the team's), kept exactly: TEXT
-- holding the decimal (counts as their digits), as PostgreSQL's numeric
-- (0018). The INTEGER columns 0003 added turned a decimal string into a REAL.
-- SQLite cannot change a column's type: the table is rebuilt. Dropping it
-- would delete its outbox rows (ON DELETE CASCADE; foreign keys cannot be
-- turned off inside the migration's transaction), so they are kept apart and
-- put back, with their ids.
CREATE TEMP TABLE alert_outbox_kept AS SELECT * FROM alert_outbox;
CREATE TABLE notifications_new (
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    limit_value TEXT NOT NULL DEFAULT '0',
    used TEXT NOT NULL DEFAULT '0',
    PRIMARY KEY (user_id, kind, period, threshold)
);
-- A REAL already stored becomes its shortest decimal (15 digits at most):
-- what it held is all there is.
INSERT INTO notifications_new
    (user_id, kind, period, threshold, created_at, limit_value, used)
SELECT user_id, kind, period, threshold, created_at, CAST(limit_value AS TEXT), CAST(used AS TEXT)
FROM notifications;
DROP TABLE notifications;
ALTER TABLE notifications_new RENAME TO notifications;
CREATE INDEX notifications_created_idx ON notifications (created_at DESC);
INSERT INTO alert_outbox SELECT * FROM alert_outbox_kept;
DROP TABLE alert_outbox_kept;
