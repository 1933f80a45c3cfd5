-- Threshold alerts. A crossing is a row of notifications (its primary key makes
-- it once per user, limit, period and threshold, also when replicas settle at the
-- same time); each crossing queues one outbox row per channel, delivered with
-- retries by whichever replica claims it (docs/admin.md, "Alerts").
ALTER TABLE notifications ADD COLUMN limit_value bigint NOT NULL DEFAULT 0;
ALTER TABLE notifications ADD COLUMN used bigint NOT NULL DEFAULT 0;
CREATE INDEX notifications_created_idx ON notifications (created_at DESC);

CREATE TABLE alert_outbox (
    id bigserial PRIMARY KEY,
    user_id text NOT NULL,
    kind text NOT NULL,
    period text NOT NULL,
    threshold integer NOT NULL,
    channel text NOT NULL,
    created_at timestamptz NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    -- NULL once delivered or given up: no further attempt.
    next_attempt_at timestamptz,
    claimed_until timestamptz,
    delivered_at timestamptz,
    last_error text,
    UNIQUE (user_id, kind, period, threshold, channel),
    FOREIGN KEY (user_id, kind, period, threshold)
        REFERENCES notifications (user_id, kind, period, threshold) ON DELETE CASCADE
);
CREATE INDEX alert_outbox_due_idx ON alert_outbox (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
