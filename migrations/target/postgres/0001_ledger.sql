-- Target ledger and manifest index. Times are milliseconds since the Unix epoch.

-- One session per (job, site): what the source resumes from.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    site TEXT NOT NULL,
    channel TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    committed_at BIGINT
);
CREATE INDEX sessions_state_idx ON sessions (state);

-- Every package applied, so a package delivered twice is applied once.
CREATE TABLE applied_packages (
    session_id TEXT NOT NULL REFERENCES sessions (id),
    seq BIGINT NOT NULL,
    checksum BYTEA NOT NULL,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

-- What each session created, updated or deleted (cache invalidation hooks read it).
CREATE TABLE session_changes (
    session_id TEXT NOT NULL REFERENCES sessions (id),
    path TEXT NOT NULL,
    action TEXT NOT NULL,
    PRIMARY KEY (session_id, path)
);

-- The manifest index: one row per item of each site. sort_key is the path with '/'
-- replaced by NUL, so byte order is tree order (a directory's children sort right
-- after it, before any sibling that shares its prefix).
CREATE TABLE entries (
    site TEXT NOT NULL,
    sort_key BYTEA NOT NULL,
    path TEXT NOT NULL,
    kind BIGINT NOT NULL,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    mode BIGINT NOT NULL,
    link_target TEXT NOT NULL DEFAULT '',
    hash BYTEA,
    touched_session TEXT,
    PRIMARY KEY (site, sort_key)
);
CREATE INDEX entries_touched_idx ON entries (site, touched_session);
