-- The page store: each site's CMS pages (kind 4 in entries) as their documents, with
-- what the delivery API and link resolution look them up by. A page's key is
-- <locale>/<identity> (the source CMS's translation key); its id in the delivery API is
-- derived from site and key, so it survives a rebuilt target.
CREATE TABLE pages (
    site TEXT NOT NULL,
    page_key TEXT NOT NULL,
    id BIGINT NOT NULL,
    locale TEXT NOT NULL,
    parent_key TEXT,
    position TEXT NOT NULL,
    slug TEXT NOT NULL,
    page_type TEXT NOT NULL,
    title TEXT NOT NULL,
    doc TEXT NOT NULL,
    hash BLOB NOT NULL,
    -- The page's path in the site (pages_root, locale, slugs), set at commit; NULL
    -- while its parent is missing or its path collides with another page's.
    url_path TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (site, page_key)
);
CREATE UNIQUE INDEX pages_id_idx ON pages (id);
CREATE INDEX pages_children_idx ON pages (site, parent_key, position);
CREATE INDEX pages_url_idx ON pages (site, url_path);

-- Links between pages (from each page's references), to find the pages a deleted or
-- missing page leaves with a broken link.
CREATE TABLE page_links (
    site TEXT NOT NULL,
    from_key TEXT NOT NULL,
    to_key TEXT NOT NULL,
    -- The linked page's URL path in the source, to name it when the link breaks.
    to_hint TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (site, from_key, to_key)
);
CREATE INDEX page_links_to_idx ON page_links (site, to_key);

-- Each page a session put or deleted, as it was before the session first touched it:
-- what the hooks are told (created, updated, moved, deleted; old and new URL).
CREATE TABLE session_pages (
    session_id TEXT NOT NULL,
    page_key TEXT NOT NULL,
    existed BIGINT NOT NULL,
    locale TEXT NOT NULL,
    old_url TEXT,
    old_parent TEXT,
    -- 1: put or deleted by the session; 0: moved along with a page above it.
    direct BIGINT NOT NULL DEFAULT 1,
    PRIMARY KEY (session_id, page_key)
);
