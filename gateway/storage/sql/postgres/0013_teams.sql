-- Issue 21: the teams directory. A team has a plan and per-team overrides, as a
-- user has; a user belongs to at most one team (team_id NULL: none). Team usage is
-- not stored apart: it is the sum of its members' day rows. Team limits are
-- enforced by admission (the accounting core), which reads the team from here.
-- Adding a nullable column without a default rewrites nothing: existing users
-- stay as they are, in no team.
CREATE TABLE teams (
    id text PRIMARY KEY,
    plan text NOT NULL,
    overrides jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE users ADD COLUMN team_id text REFERENCES teams (id);
CREATE INDEX users_team_idx ON users (team_id);
