-- When each session last saw activity (opened, or a package recorded): sessions idle
-- past the target's session expiry are closed as 'expired' and their staging removed.
ALTER TABLE sessions ADD COLUMN active_at BIGINT NOT NULL DEFAULT 0;
UPDATE sessions SET active_at = COALESCE(committed_at, created_at);
CREATE INDEX sessions_idle_idx ON sessions (state, active_at);
