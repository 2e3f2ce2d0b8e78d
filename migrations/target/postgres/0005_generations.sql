-- Atomic publish. A site published atomically has generations: whole trees beside its
-- root (in <root>.generations/), the root a symbolic link to the live one. Each
-- generation's index rows (entries, pages, page_links) are kept under its own store
-- key in the `site` column of those tables; a site published in place keeps its rows
-- under its own name, as before.
CREATE TABLE generations (
    site TEXT NOT NULL,
    -- The key of its rows in entries, pages and page_links.
    store TEXT NOT NULL,
    -- Given by the source when it is published (the same on every target of the
    -- channel); NULL while it is built. 0: the tree as it was before the first atomic
    -- publish.
    number BIGINT,
    -- building (the one work area of the site, where sessions apply), prepared (whole
    -- and durable, waiting for its source's decision), live (served), kept (for rollback).
    state TEXT NOT NULL,
    -- The job that built it (the last one, when several jobs built one work area).
    job_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    published_at BIGINT,
    PRIMARY KEY (site, store)
);
CREATE INDEX generations_state_idx ON generations (site, state);

-- The store a session applies to: empty for in place (the site's own rows).
ALTER TABLE sessions ADD COLUMN store TEXT NOT NULL DEFAULT '';

-- A page's id is derived from its site and key: every generation of a site holds the
-- same ids, so ids are unique per store, not overall.
DROP INDEX pages_id_idx;
CREATE UNIQUE INDEX pages_id_idx ON pages (site, id);
