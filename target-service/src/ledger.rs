//! The target's ledger (sessions, applied packages, what each session changed) and its
//! manifest index (one row per item of each site, in tree order).

use sqlx::FromRow;

use cms_mirror::db::{Backend, Db};
use cms_mirror::model::{ChangeAction, Item, Kind, hex, tree_key};
use cms_mirror::now_ms;
use cms_mirror::pathsafe::is_page_key;

#[derive(Clone, Debug, FromRow)]
pub struct SessionRow {
    pub id: String,
    pub job_id: String,
    pub site: String,
    pub channel: String,
    pub last_seq: i64,
    #[sqlx(try_from = "String")]
    pub state: SessionStatus,
    /// The store its index rows go to: empty in place (the site's own), else the
    /// site's work area (an atomic session).
    pub store: String,
}

impl SessionRow {
    /// The key of the session's rows in the manifest index and the page store.
    pub fn key(&self) -> &str {
        if self.store.is_empty() {
            &self.site
        } else {
            &self.store
        }
    }

    pub fn atomic(&self) -> bool {
        !self.store.is_empty()
    }
}

/// Where a session stands in the target's ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStatus {
    /// Packages may arrive.
    Open,
    /// An atomic session whose generation is whole and durable, waiting for the
    /// source's decision: no package is taken.
    Prepared,
    Committed,
    /// Given up by its source; what was applied stays applied.
    Aborted,
    /// Idle past the target's session expiry: its staging is gone and it starts again
    /// from package 1 when its job comes back; what was applied stays applied.
    Expired,
}

impl SessionStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Open => "open",
            SessionStatus::Prepared => "prepared",
            SessionStatus::Committed => "committed",
            SessionStatus::Aborted => "aborted",
            SessionStatus::Expired => "expired",
        }
    }
}

impl TryFrom<String> for SessionStatus {
    type Error = cms_mirror::model::UnknownName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "open" => Ok(SessionStatus::Open),
            "prepared" => Ok(SessionStatus::Prepared),
            "committed" => Ok(SessionStatus::Committed),
            "aborted" => Ok(SessionStatus::Aborted),
            "expired" => Ok(SessionStatus::Expired),
            o => Err(cms_mirror::model::UnknownName::new(
                "session state",
                o,
                "open, prepared, committed, aborted or expired",
            )),
        }
    }
}

#[derive(Clone, Debug, FromRow)]
struct EntryRow {
    path: String,
    kind: i64,
    size: i64,
    mtime_ns: i64,
    mode: i64,
    link_target: String,
    hash: Option<Vec<u8>>,
}

impl EntryRow {
    fn item(self) -> Item {
        let hash = self.hash.as_deref().filter(|h| h.len() == 32).map(hex);
        entry_item(
            self.path,
            self.kind,
            self.size,
            self.mtime_ns,
            self.mode,
            self.link_target,
            hash,
        )
    }
}

/// An index row as an item, its hash given in hex (empty or malformed: none).
fn entry_item(
    path: String,
    kind: i64,
    size: i64,
    mtime_ns: i64,
    mode: i64,
    link: String,
    hash: Option<String>,
) -> Item {
    Item {
        kind: Kind::from_pb(kind as i32).unwrap_or(Kind::File),
        path,
        size: size as u64,
        mtime_ns,
        mode: mode as u32,
        link,
        hash: hash.filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())),
    }
}

/// What applying one package changes in the database, written in one transaction with
/// the package's ledger row.
#[derive(Debug, Default)]
pub struct PackageChanges {
    pub upserts: Vec<Item>,
    /// Deleted paths (with everything below them).
    pub deletes: Vec<String>,
    /// Directories whose content changed (their mtime is restored at commit).
    pub touched_dirs: Vec<String>,
    /// (path, "created" | "updated" | "deleted")
    pub changes: Vec<(String, ChangeAction)>,
    /// CMS pages put by the package (their index rows are in `upserts`).
    pub pages: Vec<crate::pagestore::PageRow>,
}

#[derive(Clone, Debug)]
pub struct Ledger {
    db: Db,
}

/// Rows per multi-row statement (10 columns x 200 rows stays far below the bind
/// parameter limits of SQLite, 32766, and PostgreSQL, 65535).
const ROWS: usize = 200;

/// `($1, ..., $cols), ($cols+1, ...)` for `rows` rows; plain `?` on SQLite, where
/// numbered parameters are looked up by name on every bind (quadratic in a statement
/// with thousands of them, measured at 14% of the target's CPU).
type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

/// Removes the index rows of deleted items and everything below them.
async fn delete_entries(tx: &mut Tx<'_>, site: &str, paths: &[String]) -> Result<(), sqlx::Error> {
    for path in paths {
        let key = tree_key(path);
        let mut upper = key.clone();
        upper.push(1);
        let mut lower = key.clone();
        lower.push(0);
        // The item itself and everything below it: keys "path" and "path\0...".
        sqlx::query(
            "DELETE FROM entries WHERE site = $1 AND (sort_key = $2 OR (sort_key >= $3 AND sort_key < $4))",
        )
        .bind(site)
        .bind(&key)
        .bind(&lower)
        .bind(&upper)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The last of each path's values, in the order paths first came.
fn last_per_path<'a, T>(all: impl Iterator<Item = &'a T>, path: impl Fn(&T) -> &str) -> Vec<&'a T>
where
    T: 'a,
{
    let mut out: Vec<&T> = Vec::new();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for it in all {
        match seen.get(path(it)) {
            Some(&i) => out[i] = it,
            None => {
                seen.insert(path(it), out.len());
                out.push(it);
            }
        }
    }
    out
}

fn placeholders(backend: Backend, rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let v: Vec<String> = (1..=cols)
                .map(|c| match backend {
                    Backend::Sqlite => "?".to_string(),
                    Backend::Postgres => format!("${}", r * cols + c),
                })
                .collect();
            format!("({})", v.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The directories a session touched, deepest first (their times are restored in that
/// order). Without statistics SQLite would walk the site's whole primary key for this
/// (it prefers the key's order to the partial index) at every commit; the index holds
/// only open sessions' directories.
fn touched_dirs_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "SELECT path, kind, size, mtime_ns, mode, link_target, hash FROM entries \
             INDEXED BY entries_touched_idx \
             WHERE site = $1 AND touched_session = $2 ORDER BY sort_key DESC"
        }
        Backend::Postgres => {
            "SELECT path, kind, size, mtime_ns, mode, link_target, hash FROM entries \
             WHERE site = $1 AND touched_session = $2 ORDER BY sort_key DESC"
        }
    }
}

pub fn session_id(job: &str, site: &str) -> String {
    format!("{job}/{site}")
}

impl Ledger {
    pub fn new(db: Db) -> Ledger {
        Ledger { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Opens a session or returns the existing one (resume). An expired session opens
    /// again from package 1; the flag says so.
    pub async fn open_session(
        &self,
        job: &str,
        site: &str,
        channel: &str,
        store: &str,
    ) -> Result<(SessionRow, bool), sqlx::Error> {
        let id = session_id(job, site);
        let now = now_ms();
        sqlx::query(
            "INSERT INTO sessions (id, job_id, site, channel, state, created_at, active_at, store) \
             VALUES ($1, $2, $3, $4, 'open', $5, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET active_at = excluded.active_at, store = excluded.store \
             WHERE sessions.state = 'open'",
        )
        .bind(&id)
        .bind(job)
        .bind(site)
        .bind(channel)
        .bind(now)
        .bind(store)
        .execute(&self.db.pool)
        .await?;
        let reopened = sqlx::query(
            "UPDATE sessions SET state = 'open', last_seq = 0, active_at = $2, store = $3 \
             WHERE id = $1 AND state = 'expired'",
        )
        .bind(&id)
        .bind(now)
        .bind(store)
        .execute(&self.db.pool)
        .await?
        .rows_affected()
            > 0;
        let row = self.session(&id).await?.ok_or(sqlx::Error::RowNotFound)?;
        Ok((row, reopened))
    }

    /// Open sessions with no activity since `before` (ms since the epoch).
    pub async fn idle_sessions(&self, before: i64) -> Result<Vec<SessionRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, job_id, site, channel, last_seq, state, store FROM sessions \
             WHERE state = 'open' AND active_at < $1",
        )
        .bind(before)
        .fetch_all(&self.db.pool)
        .await
    }

    /// Expires a session still idle since `before`: its applied packages are forgotten
    /// (it starts again from package 1) and its directories released, which are
    /// returned so that their times can be restored. A session that changed nothing is
    /// removed whole. `None`: it was active again, or not open.
    pub async fn expire_session(
        &self,
        s: &SessionRow,
        before: i64,
    ) -> Result<Option<Vec<Item>>, sqlx::Error> {
        let mut tx = self.db.pool.begin().await?;
        let expired = sqlx::query(
            "UPDATE sessions SET state = 'expired' WHERE id = $1 AND state = 'open' AND active_at < $2",
        )
        .bind(&s.id)
        .bind(before)
        .execute(&mut *tx)
        .await?;
        if expired.rows_affected() == 0 {
            return Ok(None);
        }
        let dirs: Vec<EntryRow> = sqlx::query_as(touched_dirs_sql(self.db.backend))
            .bind(s.key())
            .bind(&s.id)
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE entries SET touched_session = NULL WHERE site = $1 AND touched_session = $2",
        )
        .bind(s.key())
        .bind(&s.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM applied_packages WHERE session_id = $1")
            .bind(&s.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM sessions WHERE id = $1 AND last_seq = 0 \
             AND NOT EXISTS (SELECT 1 FROM session_changes WHERE session_id = $1)",
        )
        .bind(&s.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(dirs.into_iter().map(EntryRow::item).collect()))
    }

    pub async fn session(&self, id: &str) -> Result<Option<SessionRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, job_id, site, channel, last_seq, state, store FROM sessions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await
    }

    pub async fn open_sessions(&self) -> Result<Vec<SessionRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, job_id, site, channel, last_seq, state, store FROM sessions WHERE state = 'open'",
        )
        .fetch_all(&self.db.pool)
        .await
    }

    /// The checksum a package was applied with, if it was.
    pub async fn applied_checksum(
        &self,
        session: &str,
        seq: u64,
    ) -> Result<Option<Vec<u8>>, sqlx::Error> {
        let r: Option<(Vec<u8>,)> = sqlx::query_as(
            "SELECT checksum FROM applied_packages WHERE session_id = $1 AND seq = $2",
        )
        .bind(session)
        .bind(seq as i64)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(r.map(|r| r.0))
    }

    /// Records an applied package and its index changes atomically.
    pub async fn record_package(
        &self,
        s: &SessionRow,
        seq: u64,
        checksum: &[u8],
        ch: &PackageChanges,
    ) -> Result<(), sqlx::Error> {
        let (session, site) = (s.id.as_str(), s.key());
        let mut tx = self.db.pool.begin().await?;
        delete_entries(&mut tx, site, &ch.deletes).await?;
        self.upsert_entries(&mut tx, session, site, &ch.upserts)
            .await?;
        self.touch_dirs(&mut tx, session, site, &ch.touched_dirs)
            .await?;
        self.record_changes(&mut tx, session, &ch.changes).await?;
        if !ch.pages.is_empty() || ch.deletes.iter().any(|p| is_page_key(p)) {
            let pages = crate::pagestore::record(
                &mut tx,
                site,
                &s.site,
                session,
                &ch.pages,
                &ch.deletes,
                now_ms(),
            )
            .await?;
            self.record_changes(&mut tx, session, &pages).await?;
        }
        sqlx::query(
            "INSERT INTO applied_packages (session_id, seq, checksum, applied_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (session_id, seq) DO UPDATE SET checksum = excluded.checksum, applied_at = excluded.applied_at",
        )
        .bind(session)
        .bind(seq as i64)
        .bind(checksum)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sessions SET last_seq = CASE WHEN last_seq < $1 THEN $1 ELSE last_seq END, \
             active_at = $3 WHERE id = $2",
        )
        .bind(seq as i64)
        .bind(session)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Index rows of a package's items, in multi-row statements: one round-trip per
    /// ROWS items, not per item. Rows are deduplicated by path (last wins) so no
    /// statement touches one row twice.
    async fn upsert_entries(
        &self,
        tx: &mut Tx<'_>,
        session: &str,
        site: &str,
        items: &[Item],
    ) -> Result<(), sqlx::Error> {
        let upserts = last_per_path(items.iter(), |it| it.path.as_str());
        for chunk in upserts.chunks(ROWS) {
            let sql = format!(
                "INSERT INTO entries (site, sort_key, path, kind, size, mtime_ns, mode, link_target, hash, touched_session) \
                 VALUES {} ON CONFLICT (site, sort_key) DO UPDATE SET \
                 path = excluded.path, kind = excluded.kind, size = excluded.size, mtime_ns = excluded.mtime_ns, \
                 mode = excluded.mode, link_target = excluded.link_target, hash = excluded.hash, \
                 touched_session = excluded.touched_session",
                placeholders(self.db.backend, chunk.len(), 10)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for it in chunk {
                let hash = it
                    .hash
                    .as_deref()
                    .and_then(|h| blake3::Hash::from_hex(h).ok())
                    .map(|h| h.as_bytes().to_vec());
                let touched = (it.kind == Kind::Dir).then(|| session.to_string());
                q = q
                    .bind(site)
                    .bind(tree_key(&it.path))
                    .bind(it.path.clone())
                    .bind(it.kind.code())
                    .bind(it.size as i64)
                    .bind(it.mtime_ns)
                    .bind(it.mode as i64)
                    .bind(it.link.clone())
                    .bind(hash)
                    .bind(touched);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Marks directories whose entries changed, so commit restores their times.
    async fn touch_dirs(
        &self,
        tx: &mut Tx<'_>,
        session: &str,
        site: &str,
        dirs: &[String],
    ) -> Result<(), sqlx::Error> {
        let mut touched: Vec<&String> = dirs.iter().collect();
        touched.sort();
        touched.dedup();
        for chunk in touched.chunks(ROWS) {
            let keys: Vec<String> = (0..chunk.len())
                .map(|i| match self.db.backend {
                    Backend::Sqlite => format!("?{}", i + 4),
                    Backend::Postgres => format!("${}", i + 4),
                })
                .collect();
            let sql = format!(
                "UPDATE entries SET touched_session = $1 WHERE site = $2 AND kind = $3 AND sort_key IN ({})",
                keys.join(", ")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(session)
                .bind(site)
                .bind(Kind::Dir.code());
            for d in chunk {
                q = q.bind(tree_key(d));
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// What the package did per path; a path created then updated (in one package or
    /// across the session) stays "created".
    async fn record_changes(
        &self,
        tx: &mut Tx<'_>,
        session: &str,
        all: &[(String, ChangeAction)],
    ) -> Result<(), sqlx::Error> {
        let mut changes: Vec<(&str, ChangeAction)> = Vec::with_capacity(all.len());
        let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (path, action) in all {
            match seen.get(path.as_str()) {
                Some(&i) => {
                    let created_then_updated =
                        changes[i].1 == ChangeAction::Created && *action == ChangeAction::Updated;
                    if !created_then_updated {
                        changes[i].1 = *action;
                    }
                }
                None => {
                    seen.insert(path.as_str(), changes.len());
                    changes.push((path.as_str(), *action));
                }
            }
        }
        for chunk in changes.chunks(ROWS) {
            let sql = format!(
                "INSERT INTO session_changes (session_id, path, action) VALUES {} \
                 ON CONFLICT (session_id, path) DO UPDATE SET action = CASE \
                 WHEN session_changes.action = 'created' AND excluded.action = 'updated' THEN 'created' \
                 ELSE excluded.action END",
                placeholders(self.db.backend, chunk.len(), 3)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (path, action) in chunk {
                q = q.bind(session).bind(path.to_string()).bind(action.as_str());
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// One page of a site's manifest in tree order, after `after` (a tree key).
    ///
    /// The page comes back as one JSON array in one row: the SQLite driver hands rows
    /// from its worker thread to the caller one at a time through a channel, and for a
    /// no-change plan of a large site that hand-off (a thread wake-up per few rows) was
    /// most of the target's CPU and the longest part of the plan.
    pub async fn manifest_page(
        &self,
        site: &str,
        after: &[u8],
        limit: i64,
    ) -> Result<Vec<Item>, sqlx::Error> {
        let sql = match self.db.backend {
            Backend::Sqlite => {
                "SELECT json_group_array(json_array(path, kind, size, mtime_ns, mode, link_target, \
                 lower(hex(hash))) ORDER BY sort_key) FROM (SELECT sort_key, path, kind, size, \
                 mtime_ns, mode, link_target, hash FROM entries WHERE site = $1 AND sort_key > $2 \
                 ORDER BY sort_key LIMIT $3)"
            }
            Backend::Postgres => {
                "SELECT COALESCE(json_agg(json_build_array(path, kind, size, mtime_ns, mode, \
                 link_target, encode(hash, 'hex')) ORDER BY sort_key), '[]')::text FROM (SELECT \
                 sort_key, path, kind, size, mtime_ns, mode, link_target, hash FROM entries \
                 WHERE site = $1 AND sort_key > $2 ORDER BY sort_key LIMIT $3) page"
            }
        };
        let (page,): (String,) = sqlx::query_as(sql)
            .bind(site)
            .bind(after)
            .bind(limit)
            .fetch_one(&self.db.pool)
            .await?;
        type Row = (String, i64, i64, i64, i64, String, Option<String>);
        let rows: Vec<Row> = serde_json::from_str(&page)
            .map_err(|e| sqlx::Error::Decode(format!("manifest page: {e}").into()))?;
        Ok(rows
            .into_iter()
            .map(|(path, kind, size, mtime_ns, mode, link, hash)| {
                entry_item(path, kind, size, mtime_ns, mode, link, hash)
            })
            .collect())
    }

    /// Directories touched by a session, with the mtime the source gave them.
    pub async fn touched_dirs(&self, session: &str, site: &str) -> Result<Vec<Item>, sqlx::Error> {
        let rows: Vec<EntryRow> = sqlx::query_as(touched_dirs_sql(self.db.backend))
            .bind(site)
            .bind(session)
            .fetch_all(&self.db.pool)
            .await?;
        Ok(rows.into_iter().map(EntryRow::item).collect())
    }

    /// Marks a session committed; returns the created / updated / deleted counts.
    pub async fn commit_session(
        &self,
        session: &str,
        site: &str,
    ) -> Result<(u64, u64, u64), sqlx::Error> {
        self.close_session(session, site, SessionStatus::Committed)
            .await
    }

    /// Marks a session committed, or prepared (an atomic session between the phases);
    /// its directories are no longer touched. Returns the created / updated / deleted
    /// counts.
    pub async fn close_session(
        &self,
        session: &str,
        site: &str,
        state: SessionStatus,
    ) -> Result<(u64, u64, u64), sqlx::Error> {
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "UPDATE entries SET touched_session = NULL WHERE site = $1 AND touched_session = $2",
        )
        .bind(site)
        .bind(session)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE sessions SET state = $3, committed_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(session)
            .bind(state.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.change_counts(session).await
    }

    /// Closes a session without committing it (its staging files are gone).
    pub async fn abort_session(&self, session: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE sessions SET state = 'aborted' WHERE id = $1 AND state IN ('open', 'prepared')",
        )
        .bind(session)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    pub async fn change_counts(&self, session: &str) -> Result<(u64, u64, u64), sqlx::Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT action, COUNT(*) FROM session_changes WHERE session_id = $1 GROUP BY action",
        )
        .bind(session)
        .fetch_all(&self.db.pool)
        .await?;
        let get = |a: &str| {
            rows.iter()
                .find(|r| r.0 == a)
                .map(|r| r.1 as u64)
                .unwrap_or(0)
        };
        Ok((get("created"), get("updated"), get("deleted")))
    }

    /// What a session changed, in path order.
    pub async fn changes(&self, session: &str) -> Result<Vec<(String, ChangeAction)>, sqlx::Error> {
        self.changes_below(session, "").await
    }

    /// What a session changed in its CMS pages (a site of files changes none: their list
    /// is not read for this).
    pub async fn page_changes(
        &self,
        session: &str,
    ) -> Result<Vec<(String, ChangeAction)>, sqlx::Error> {
        self.changes_below(session, &format!("{}/", cms_mirror::pathsafe::PAGES_DIR))
            .await
    }

    /// What a session changed at paths that start with `prefix` (ASCII), in path order.
    async fn changes_below(
        &self,
        session: &str,
        prefix: &str,
    ) -> Result<Vec<(String, ChangeAction)>, sqlx::Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT path, action FROM session_changes WHERE session_id = $1 \
             AND SUBSTR(path, 1, CAST($2 AS INTEGER)) = $3 ORDER BY path",
        )
        .bind(session)
        .bind(prefix.len() as i64)
        .bind(prefix)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter()
            .map(|(path, action)| {
                let action = action
                    .parse()
                    .map_err(|e: cms_mirror::model::UnknownName| sqlx::Error::Decode(e.into()))?;
                Ok((path, action))
            })
            .collect()
    }

    /// Number of items indexed for a site.
    pub async fn count_entries(&self, site: &str) -> Result<i64, sqlx::Error> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM entries WHERE site = $1")
            .bind(site)
            .fetch_one(&self.db.pool)
            .await?;
        Ok(n)
    }
}
