-- Threshold alerts. A crossing is a row of notifications (its primary key makes
-- it once per user, limit, period and threshold); each crossing queues one outbox
-- row per channel, delivered with retries (docs/admin.md, "Alerts").
ALTER TABLE notifications ADD COLUMN limit_value INTEGER NOT NULL DEFAULT 0;
ALTER TABLE notifications ADD COLUMN used INTEGER NOT NULL DEFAULT 0;
CREATE INDEX notifications_created_idx ON notifications (created_at DESC);

CREATE TABLE alert_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    channel TEXT NOT NULL,
    created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    -- NULL once delivered or given up: no further attempt.
    next_attempt_at TEXT,
    claimed_until TEXT,
    delivered_at TEXT,
    last_error TEXT,
    UNIQUE (user_id, kind, period, threshold, channel),
    FOREIGN KEY (user_id, kind, period, threshold)
        REFERENCES notifications (user_id, kind, period, threshold) ON DELETE CASCADE
);
CREATE INDEX alert_outbox_due_idx ON alert_outbox (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
