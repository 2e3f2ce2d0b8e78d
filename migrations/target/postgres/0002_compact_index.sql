-- The touched-directories index only holds rows that have a touched session
-- (directories of an open session), not every item of every site.
DROP INDEX entries_touched_idx;
CREATE INDEX entries_touched_idx ON entries (site, touched_session) WHERE touched_session IS NOT NULL;
