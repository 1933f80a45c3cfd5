-- Review of issue 21: an upload's reservation is keyed by its request id, so a
-- second count of the same upload (after a reservation whose answer was lost,
-- or the bytes of a file reserved by its count alone) changes nothing but its
-- bytes, and a give-back gives it back once. A row lives a day or two: the
-- user's next reservation deletes those of days before yesterday.
CREATE TABLE IF NOT EXISTS upload_reservations (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    day TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS upload_reservations_user_day_idx
    ON upload_reservations (user_id, day);
