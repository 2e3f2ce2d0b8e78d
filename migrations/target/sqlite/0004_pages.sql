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
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (site, page_key)
);
CREATE UNIQUE INDEX pages_id_idx ON pages (id);
CREATE INDEX pages_children_idx ON pages (site, parent_key, position);
