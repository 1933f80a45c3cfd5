-- Issue 21: the teams directory. A team has a plan and per-team overrides, as a
-- user has; a user belongs to at most one team (team_id NULL: none). Team usage is
-- not stored apart: it is the sum of its members' day rows. Team limits are
-- enforced by admission (the accounting core), which reads the team from here.
CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    plan TEXT NOT NULL,
    overrides TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
ALTER TABLE users ADD COLUMN team_id TEXT REFERENCES teams (id);
CREATE INDEX users_team_idx ON users (team_id);
