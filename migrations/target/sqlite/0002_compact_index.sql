-- The manifest index and the session changes become WITHOUT ROWID tables: each row is
-- stored once, in its primary key's B-tree, instead of in a rowid table plus a separate
-- primary-key index (two B-tree inserts and two copies of the path per row; the ledger
-- writes one row of each per file). The touched-directories index only holds rows that
-- have a touched session (directories of an open session), not every item.

CREATE TABLE entries_v2 (
    site TEXT NOT NULL,
    sort_key BLOB NOT NULL,
    path TEXT NOT NULL,
    kind BIGINT NOT NULL,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    mode BIGINT NOT NULL,
    link_target TEXT NOT NULL DEFAULT '',
    hash BLOB,
    touched_session TEXT,
    PRIMARY KEY (site, sort_key)
) WITHOUT ROWID;
INSERT INTO entries_v2 (site, sort_key, path, kind, size, mtime_ns, mode, link_target, hash, touched_session)
    SELECT site, sort_key, path, kind, size, mtime_ns, mode, link_target, hash, touched_session FROM entries;
DROP TABLE entries;
ALTER TABLE entries_v2 RENAME TO entries;
CREATE INDEX entries_touched_idx ON entries (site, touched_session) WHERE touched_session IS NOT NULL;

CREATE TABLE session_changes_v2 (
    session_id TEXT NOT NULL REFERENCES sessions (id),
    path TEXT NOT NULL,
    action TEXT NOT NULL,
    PRIMARY KEY (session_id, path)
) WITHOUT ROWID;
INSERT INTO session_changes_v2 (session_id, path, action)
    SELECT session_id, path, action FROM session_changes;
DROP TABLE session_changes;
ALTER TABLE session_changes_v2 RENAME TO session_changes;
