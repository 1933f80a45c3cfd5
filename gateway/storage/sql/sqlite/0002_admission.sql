-- Concurrent-stream limits: an open answer holds a lease; a crashed gateway's
-- leases expire on their own. Times are ISO-8601 UTC text.
CREATE TABLE stream_leases (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at TEXT NOT NULL
);
CREATE INDEX stream_leases_user_idx ON stream_leases (user_id, expires_at);
