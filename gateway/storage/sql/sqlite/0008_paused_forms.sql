-- Issue 20: a human-input form's token -> the workflow run it resumes and the end
-- user who started that run, as the paused stream named them. Submitting the
-- form resumes the run in Dify's worker; the gateway then follows the run's
-- events itself (docs/upstreams/dify.md, "Human input"), and the submit names
-- only the token. Kept in the database, not in memory: the submit may reach
-- another process or replica than the paused stream. The token is a capability:
-- only its SHA-256 is kept.
CREATE TABLE paused_forms (
    token_hash TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX paused_forms_created_idx ON paused_forms (created_at);
