//! Atomic publish on the target: a site's generations, its work area, and the two
//! phases of an atomic session's commit.
//!
//! A site published atomically serves `<root>`, a symbolic link to one generation in
//! `<root>.generations/`. An atomic session applies to the site's one work area
//! (`building`), made from the live generation when a job first needs it; its index rows
//! (manifest, pages) live under the work area's own store key, copied from the live
//! generation's. Prepare makes the work area whole and durable; switch renames it to its
//! number and renames a new link over the root, so a reader sees the old tree or the new
//! one. A session aborted or never switched leaves the work area as it is: the next job
//! goes on from it, and the live generation was never touched.

use std::time::Instant;

use sqlx::FromRow;

use cms_mirror::db::Db;
use cms_mirror::model::ChangeAction;
use cms_mirror::pb;

use crate::TargetService;
use crate::error::TargetError;
use crate::ledger::{SessionRow, SessionStatus, session_id};

/// Generations a site keeps when the source does not say (the live one included).
pub const DEFAULT_KEEP: u32 = 3;

/// One generation of a site, as the target's database holds it.
#[derive(Clone, Debug, FromRow)]
pub struct GenRow {
    pub site: String,
    pub store: String,
    pub number: Option<i64>,
    pub state: String,
    pub job_id: String,
    pub created_at: i64,
    pub published_at: Option<i64>,
}

const COLUMNS: &str = "site, store, number, state, job_id, created_at, published_at";

async fn with_state(db: &Db, site: &str, states: &str) -> Result<Option<GenRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM generations WHERE site = $1 AND state IN ({states}) \
         ORDER BY created_at DESC LIMIT 1"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(site)
        .fetch_optional(&db.pool)
        .await
}

/// The site's live generation; `None` while it is published in place.
pub async fn live(db: &Db, site: &str) -> Result<Option<GenRow>, sqlx::Error> {
    with_state(db, site, "'live'").await
}

/// The site's work area (building or prepared), if it has one.
async fn work_area(db: &Db, site: &str) -> Result<Option<GenRow>, sqlx::Error> {
    with_state(db, site, "'building', 'prepared'").await
}

/// The store key of what a site serves now (its own name in place).
pub async fn live_store(db: &Db, site: &str) -> Result<String, sqlx::Error> {
    Ok(live(db, site)
        .await?
        .map_or_else(|| site.to_string(), |g| g.store))
}

/// The store a site's manifest is read from: its work area (an atomic job plans against
/// what it builds), else what it serves.
pub async fn manifest_store(db: &Db, site: &str) -> Result<String, sqlx::Error> {
    match work_area(db, site).await? {
        Some(w) => Ok(w.store),
        None => live_store(db, site).await,
    }
}

/// Every generation of a site, newest first (the work area, if any, first of all).
pub async fn list(db: &Db, site: &str) -> Result<Vec<GenRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM generations WHERE site = $1 \
         ORDER BY CASE WHEN number IS NULL THEN 1 ELSE 0 END DESC, number DESC"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(site)
        .fetch_all(&db.pool)
        .await
}

/// The site's generation of a number, if it keeps it.
async fn numbered(db: &Db, site: &str, number: u64) -> Result<Option<GenRow>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM generations WHERE site = $1 AND number = $2");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(site)
        .bind(number as i64)
        .fetch_optional(&db.pool)
        .await
}

/// The generation a store holds.
async fn of_store(db: &Db, site: &str, store: &str) -> Result<Option<GenRow>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM generations WHERE site = $1 AND store = $2");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(site)
        .bind(store)
        .fetch_optional(&db.pool)
        .await
}

/// (files, bytes) of a store.
async fn size_of(db: &Db, store: &str) -> Result<(u64, u64), sqlx::Error> {
    // SUM is NUMERIC on PostgreSQL: cast back.
    let (files, bytes): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM entries \
         WHERE site = $1 AND kind = $2",
    )
    .bind(store)
    .bind(cms_mirror::model::Kind::File.code())
    .fetch_one(&db.pool)
    .await?;
    Ok((files.max(0) as u64, bytes.max(0) as u64))
}

/// A prepared work area that will not be switched (its session aborted) is built on
/// again.
pub(crate) async fn unprepare(db: &Db, site: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE generations SET state = 'building' WHERE site = $1 AND state = 'prepared'")
        .bind(site)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Whether any session applied a change to a store since it was made.
async fn changed(db: &Db, store: &str) -> Result<bool, sqlx::Error> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM sessions s WHERE s.store = $1 \
         AND EXISTS (SELECT 1 FROM session_changes c WHERE c.session_id = s.id)",
    )
    .bind(store)
    .fetch_one(&db.pool)
    .await?;
    Ok(n > 0)
}

/// The highest number a site has published (0 when none).
async fn last_number(db: &Db, site: &str) -> Result<u64, sqlx::Error> {
    let (n,): (Option<i64>,) =
        sqlx::query_as("SELECT MAX(number) FROM generations WHERE site = $1")
            .bind(site)
            .fetch_one(&db.pool)
            .await?;
    Ok(n.unwrap_or(0).max(0) as u64)
}

/// The index rows of one store copied under another (a new work area starts as the
/// live generation's copy): (table, the column batches are cut on, the copy of the rows
/// of `site = $2` whose key is above `$3` (and, where `{upper}` adds it, at most `$4`)
/// under store `$1`).
const COPY_ROWS: [(&str, &str, &str); 3] = [
    (
        "entries",
        "sort_key",
        "INSERT INTO entries (site, sort_key, path, kind, size, mtime_ns, mode, link_target, hash) \
         SELECT $1, sort_key, path, kind, size, mtime_ns, mode, link_target, hash FROM entries \
         WHERE site = $2 AND sort_key > $3 {upper}",
    ),
    (
        "pages",
        "page_key",
        "INSERT INTO pages (site, page_key, id, locale, parent_key, position, slug, page_type, title, doc, hash, url_path, updated_at) \
         SELECT $1, page_key, id, locale, parent_key, position, slug, page_type, title, doc, hash, url_path, updated_at \
         FROM pages WHERE site = $2 AND page_key > $3 {upper}",
    ),
    (
        "page_links",
        "from_key",
        "INSERT INTO page_links (site, from_key, to_key, to_hint) \
         SELECT $1, from_key, to_key, to_hint FROM page_links \
         WHERE site = $2 AND from_key > $3 {upper}",
    ),
];

/// Rows per statement of a copy: a statement that reads and writes one table may hold
/// what it read until it ends (SQLite's temporary table), so no statement copies more.
const COPY_BATCH: i64 = 20_000;

/// Copies a store's rows of one table under another, in key ranges of about
/// [`COPY_BATCH`] rows; `none` is the key below every key (empty bytes or text).
async fn copy_rows<K>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    (table, key, insert): (&str, &str, &str),
    from: &str,
    to: &str,
    none: K,
) -> Result<(), sqlx::Error>
where
    K: for<'q> sqlx::Encode<'q, sqlx::Any>
        + for<'r> sqlx::Decode<'r, sqlx::Any>
        + sqlx::Type<sqlx::Any>
        + Clone
        + Send
        + Unpin
        + 'static,
{
    let mut after = none;
    loop {
        let bound: Option<(K,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {key} FROM {table} WHERE site = $1 AND {key} > $2 \
             ORDER BY {key} LIMIT 1 OFFSET $3"
        )))
        .bind(from)
        .bind(after.clone())
        .bind(COPY_BATCH - 1)
        .fetch_optional(&mut **tx)
        .await?;
        let upper = if bound.is_some() {
            format!("AND {key} <= $4")
        } else {
            String::new()
        };
        let mut q = sqlx::query(sqlx::AssertSqlSafe(insert.replace("{upper}", &upper)))
            .bind(to)
            .bind(from)
            .bind(after);
        if let Some((b,)) = &bound {
            q = q.bind(b.clone());
        }
        q.execute(&mut **tx).await?;
        match bound {
            Some((b,)) => after = b,
            None => return Ok(()),
        }
    }
}

/// Copies every index row of store `from` (manifest, pages, links) under store `to`.
pub async fn copy_store(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    from: &str,
    to: &str,
) -> Result<(), sqlx::Error> {
    let [entries, pages, links] = COPY_ROWS;
    copy_rows(tx, entries, from, to, Vec::<u8>::new()).await?;
    copy_rows(tx, pages, from, to, String::new()).await?;
    copy_rows(tx, links, from, to, String::new()).await
}

/// Removes a store's index rows.
const DROP_ROWS: [&str; 3] = [
    "DELETE FROM entries WHERE site = $1",
    "DELETE FROM pages WHERE site = $1",
    "DELETE FROM page_links WHERE site = $1",
];

/// The rows of store `$2` that store `$1` does not hold as they are, with whether `$1`
/// lacks the path (1) or holds another version (0): `{cols}` is what is selected.
const PUT_SQL: &str = "SELECT {cols} FROM entries n \
     LEFT JOIN entries o ON o.site = $1 AND o.sort_key = n.sort_key \
     WHERE n.site = $2 AND (o.sort_key IS NULL OR o.kind <> n.kind OR o.size <> n.size \
     OR o.mtime_ns <> n.mtime_ns OR o.mode <> n.mode OR o.link_target <> n.link_target \
     OR o.hash IS DISTINCT FROM n.hash)";

/// The rows of store `$1` whose path store `$2` does not hold.
const GONE_SQL: &str = "SELECT {cols} FROM entries o WHERE o.site = $1 AND NOT EXISTS \
     (SELECT 1 FROM entries n WHERE n.site = $2 AND n.sort_key = o.sort_key)";

/// What differs between two stores' manifests (files, directories and links; pages
/// are told by the page store), in path order: the changes a switch from `from` to
/// `to` makes visible. Read only for hooks (it holds every changed path).
async fn diff(db: &Db, from: &str, to: &str) -> Result<Vec<(String, ChangeAction)>, sqlx::Error> {
    let sql = |q: &str, cols: &str| sqlx::AssertSqlSafe(q.replace("{cols}", cols));
    let put: Vec<(String, i64)> = sqlx::query_as(sql(
        PUT_SQL,
        "n.path, CASE WHEN o.sort_key IS NULL THEN 1 ELSE 0 END",
    ))
    .bind(from)
    .bind(to)
    .fetch_all(&db.pool)
    .await?;
    let gone: Vec<(String,)> = sqlx::query_as(sql(GONE_SQL, "o.path"))
        .bind(from)
        .bind(to)
        .fetch_all(&db.pool)
        .await?;
    let mut all: Vec<(String, ChangeAction)> = put
        .into_iter()
        .map(|(p, created)| {
            let a = if created == 1 {
                ChangeAction::Created
            } else {
                ChangeAction::Updated
            };
            (p, a)
        })
        .chain(gone.into_iter().map(|(p,)| (p, ChangeAction::Deleted)))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all)
}

/// How many paths a switch from `from` to `to` creates, updates and deletes, counted by
/// the database (a full mirror changes every path: its list is not held for a count).
async fn diff_counts(db: &Db, from: &str, to: &str) -> Result<(u64, u64, u64), sqlx::Error> {
    let sql = |q: &str, cols: &str| sqlx::AssertSqlSafe(q.replace("{cols}", cols));
    let (created, updated): (i64, i64) = sqlx::query_as(sql(
        PUT_SQL,
        "CAST(COALESCE(SUM(CASE WHEN o.sort_key IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN o.sort_key IS NULL THEN 0 ELSE 1 END), 0) AS BIGINT)",
    ))
    .bind(from)
    .bind(to)
    .fetch_one(&db.pool)
    .await?;
    let (deleted,): (i64,) = sqlx::query_as(sql(GONE_SQL, "COUNT(*)"))
        .bind(from)
        .bind(to)
        .fetch_one(&db.pool)
        .await?;
    let n = |v: i64| v.max(0) as u64;
    Ok((n(created), n(updated), n(deleted)))
}

impl TargetService {
    /// The generations a site keeps (published ones: not its work area), newest first.
    pub(crate) async fn generations(
        &self,
        r: pb::ListSiteGenerationsRequest,
    ) -> Result<pb::ListSiteGenerationsResponse, TargetError> {
        self.site(&r.site)?;
        let db = self.inner.ledger.db();
        let mut generations = Vec::new();
        for g in list(db, &r.site).await? {
            let Some(number) = g.number else { continue };
            let (files, bytes) = size_of(db, &g.store).await?;
            generations.push(pb::Generation {
                number: number.max(0) as u64,
                job_id: g.job_id,
                published_at_ms: g.published_at.unwrap_or(0),
                files,
                bytes,
                live: g.state == "live",
            });
        }
        Ok(pb::ListSiteGenerationsResponse { generations })
    }

    /// OpenSession's part: the store a session applies to. In place: "" (refused for a
    /// site that publishes atomically, whose tree is a generation kept for rollback).
    /// Atomic: the session's own work area when it resumes, else the site's, made now
    /// from the live generation if the site has none.
    pub(crate) async fn work_area_for(
        &self,
        r: &pb::OpenSessionRequest,
    ) -> Result<String, TargetError> {
        let db = self.inner.ledger.db();
        if !r.atomic {
            if let Some(g) = live(db, &r.site).await? {
                return Err(TargetError::Publish(format!(
                    "site {:?} publishes atomically (generation {} is live): set publish = \"atomic\" \
                     on the channel (docs/configuration.md says how to go back to in place)",
                    r.site,
                    g.number.unwrap_or(0)
                )));
            }
            return Ok(String::new());
        }
        let site = self.site(&r.site)?;
        let _building = site.generations.lock().await;
        if let Some(n) = r.rollback_to {
            return self.rollback_store(&r.site, n).await;
        }
        let work = work_area(db, &r.site).await?;
        if let Some(s) = self
            .inner
            .ledger
            .session(&session_id(&r.job_id, &r.site))
            .await?
            .filter(|s| s.atomic())
        {
            let resumes = work.as_ref().is_some_and(|w| w.store == s.store);
            if resumes || s.state == SessionStatus::Committed {
                return Ok(s.store);
            }
        }
        if let Some(w) = work {
            sqlx::query("UPDATE generations SET job_id = $1 WHERE site = $2 AND store = $3")
                .bind(&r.job_id)
                .bind(&r.site)
                .bind(&w.store)
                .execute(&db.pool)
                .await?;
            if w.state == "prepared" {
                tracing::warn!(site = %r.site, job = %r.job_id, previous = %w.job_id,
                    "a new job builds on a prepared work area whose switch never came");
                unprepare(db, &r.site).await?;
            }
            return Ok(w.store);
        }
        let from = live_store(db, &r.site).await?;
        let started = Instant::now();
        let fs = site.fs.clone();
        let (dirs, files) = tokio::task::spawn_blocking(move || fs.build_work_area())
            .await
            .map_err(TargetError::task("work area"))?
            .map_err(|source| TargetError::Generation {
                site: r.site.clone(),
                what: "cannot build the work area",
                source,
            })?;
        let store = format!(
            "{}@{}",
            r.site,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut tx = db.pool.begin().await?;
        copy_store(&mut tx, &from, &store).await?;
        sqlx::query(
            "INSERT INTO generations (site, store, state, job_id, created_at) VALUES ($1, $2, 'building', $3, $4)",
        )
        .bind(&r.site)
        .bind(&store)
        .bind(&r.job_id)
        .bind(cms_mirror::now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(site = %r.site, job = %r.job_id, dirs, files,
            took_ms = started.elapsed().as_millis() as u64, "work area built from the live tree");
        Ok(store)
    }

    /// The store of the generation a rollback session serves again: one the site keeps,
    /// whose tree is there.
    async fn rollback_store(&self, site: &str, n: u64) -> Result<String, TargetError> {
        let db = self.inner.ledger.db();
        let kept: Vec<String> = list(db, site)
            .await?
            .iter()
            .filter_map(|g| g.number.map(|n| n.to_string()))
            .collect();
        let missing = || {
            TargetError::Publish(format!(
                "site {site:?} has no generation {n} to roll back to (it keeps: {})",
                if kept.is_empty() {
                    "none".to_string()
                } else {
                    kept.join(", ")
                }
            ))
        };
        let g = numbered(db, site, n).await?.ok_or_else(missing)?;
        let dir = self.site(site)?.fs.generations().join(n.to_string());
        if !tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
            return Err(TargetError::Publish(format!(
                "site {site:?}: generation {n}'s tree {} is missing",
                dir.display()
            )));
        }
        Ok(g.store)
    }

    /// The first phase of an atomic commit: the work area finished (directory times,
    /// staging removed, pages resolved, trace written) and made durable; the session
    /// takes no more packages. Again on a prepared session: the same answer.
    pub(crate) async fn prepare_generation(
        &self,
        s: SessionRow,
        r: pb::CommitRequest,
    ) -> Result<pb::CommitResponse, TargetError> {
        let site = self.site(&s.site)?;
        let _building = site.generations.lock().await;
        let db = self.inner.ledger.db();
        let mut item_errors = Vec::new();
        let rollback = of_store(db, &s.site, &s.store)
            .await?
            .and_then(|g| g.number);
        let unchanged = rollback.is_none() && !changed(db, &s.store).await?;
        match s.state {
            SessionStatus::Open if rollback.is_some() => {
                // Its tree was checked when the session opened, and it was durable
                // when it was first published.
                self.inner
                    .ledger
                    .close_session(&s.id, s.key(), SessionStatus::Prepared)
                    .await?;
                tracing::info!(session = %s.id, generation = rollback, "rollback prepared");
            }
            SessionStatus::Open => {
                self.finalize(&s, &r).await?;
                item_errors = self.resolve_pages(&s).await?;
                let lineage = self.lineage(&s);
                self.write_trace(&s, site.fs.work(), &r.source_id, &lineage)
                    .await;
                if unchanged {
                    // A job that changes nothing switches nothing: the live tree's trace
                    // says it ran.
                    self.write_trace(&s, site.fs.clone(), &r.source_id, &lineage)
                        .await;
                }
                if self.inner.settings.durability != crate::apply::Durability::None {
                    let fs = site.fs.clone();
                    tokio::task::spawn_blocking(move || fs.sync_work_area())
                        .await
                        .map_err(TargetError::task("prepare"))?
                        .map_err(|source| TargetError::Generation {
                            site: s.site.clone(),
                            what: "cannot make the work area durable",
                            source,
                        })?;
                }
                self.inner
                    .ledger
                    .close_session(&s.id, s.key(), SessionStatus::Prepared)
                    .await?;
                sqlx::query(
                    "UPDATE generations SET state = 'prepared', job_id = $1 WHERE site = $2 AND store = $3",
                )
                .bind(&s.job_id)
                .bind(&s.site)
                .bind(&s.store)
                .execute(&db.pool)
                .await?;
                tracing::info!(session = %s.id, "generation prepared");
            }
            SessionStatus::Prepared => {}
            SessionStatus::Committed => return Err(TargetError::AlreadyCommitted(s.id)),
            SessionStatus::Aborted => return Err(TargetError::SessionAborted(s.id)),
            SessionStatus::Expired => return Err(TargetError::SessionExpired(s.id)),
        }
        let (created, updated, deleted) = self.inner.ledger.change_counts(&s.id).await?;
        Ok(pb::CommitResponse {
            items_created: created,
            items_updated: updated,
            items_deleted: deleted,
            item_errors,
            prepared: true,
            unchanged,
            last_generation: last_number(db, &s.site).await?,
            ..Default::default()
        })
    }

    /// The second phase: the prepared work area becomes generation `r.generation` and is
    /// served (one rename of the root's link); the hooks are told what changed since the
    /// generation served before; generations beyond the ones kept are removed. Again on
    /// a switched session: the same counts, no hook.
    pub(crate) async fn switch_generation(
        &self,
        s: SessionRow,
        r: pb::CommitRequest,
    ) -> Result<pb::CommitResponse, TargetError> {
        let db = self.inner.ledger.db();
        let site = self.site(&s.site)?;
        let building = site.generations.lock().await;
        match s.state {
            SessionStatus::Prepared => {}
            SessionStatus::Committed => {
                let number = of_store(db, &s.site, &s.store)
                    .await?
                    .and_then(|g| g.number);
                let (created, updated, deleted) = self.inner.ledger.change_counts(&s.id).await?;
                return Ok(pb::CommitResponse {
                    items_created: created,
                    items_updated: updated,
                    items_deleted: deleted,
                    generation: number.unwrap_or(0).max(0) as u64,
                    ..Default::default()
                });
            }
            _ => {
                return Err(TargetError::Publish(format!(
                    "session {} is not prepared: prepare it before the switch",
                    s.id
                )));
            }
        }
        if r.generation == 0 {
            return Err(TargetError::InvalidArgument(
                "a switch needs the generation's number".into(),
            ));
        }
        // A rollback session holds a generation the site keeps.
        let rollback = of_store(db, &s.site, &s.store)
            .await?
            .and_then(|g| g.number)
            .map(|n| n.max(0) as u64);
        if rollback.is_some_and(|n| n != r.generation) {
            return Err(TargetError::InvalidArgument(format!(
                "session {} rolls back to generation {}, not {}",
                s.id,
                rollback.unwrap_or(0),
                r.generation
            )));
        }
        #[cfg(feature = "failpoints")]
        crate::failpoints::before_switch();
        let from = live_store(db, &s.site).await?;
        let fs = site.fs.clone();
        let number = r.generation;
        let started = Instant::now();
        let zero_kept = tokio::task::spawn_blocking(move || match rollback {
            Some(n) => fs.point_root_at(n),
            None => fs.switch_to(number),
        })
        .await
        .map_err(TargetError::task("switch"))?
        .map_err(|source| TargetError::Generation {
            site: s.site.clone(),
            what: "cannot switch to the new generation",
            source,
        })?;
        let now = cms_mirror::now_ms();
        let mut tx = db.pool.begin().await?;
        sqlx::query("UPDATE generations SET state = 'kept' WHERE site = $1 AND state = 'live'")
            .bind(&s.site)
            .execute(&mut *tx)
            .await?;
        if zero_kept {
            sqlx::query(
                "INSERT INTO generations (site, store, number, state, job_id, created_at, published_at) \
                 VALUES ($1, $1, 0, 'kept', '', $2, $2) ON CONFLICT (site, store) DO NOTHING",
            )
            .bind(&s.site)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if rollback.is_some() {
            sqlx::query("UPDATE generations SET state = 'live' WHERE site = $1 AND store = $2")
                .bind(&s.site)
                .bind(&s.store)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE generations SET state = 'live', number = $1, published_at = $2, job_id = $3 \
                 WHERE site = $4 AND store = $5",
            )
            .bind(number as i64)
            .bind(now)
            .bind(&s.job_id)
            .bind(&s.site)
            .bind(&s.store)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE sessions SET state = 'committed', committed_at = $1 WHERE id = $2")
            .bind(now)
            .bind(&s.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if rollback.is_some() {
            // A work area was built from the generation served until now.
            self.drop_work_area(&s.site).await;
        }
        let (created, updated, deleted) = diff_counts(db, &from, &s.store).await?;
        tracing::info!(session = %s.id, generation = number, created, updated, deleted,
            took_ms = started.elapsed().as_millis() as u64, "switched to the new generation");
        self.prune(&s.site, r.keep_generations).await;
        drop(building);
        self.count_committed(&s);
        let lineage = self.take_lineage(&s);
        let hooks = if r.run_hooks {
            let changes = async { Ok(diff(db, &from, &s.store).await?) };
            self.run_hooks(&s, changes, lineage).await?
        } else {
            Vec::new()
        };
        Ok(pb::CommitResponse {
            items_created: created,
            items_updated: updated,
            items_deleted: deleted,
            hooks,
            generation: number,
            ..Default::default()
        })
    }

    /// Removes the site's work area (its tree and its rows), logging a failure: the next
    /// atomic job builds a new one from the live generation.
    async fn drop_work_area(&self, site: &str) {
        let db = self.inner.ledger.db();
        let dropped = async {
            let Some(w) = work_area(db, site).await? else {
                return Ok(());
            };
            let fs = self.site(site)?.fs.clone();
            tokio::task::spawn_blocking(move || fs.remove_work_area())
                .await
                .map_err(TargetError::task("work area"))?
                .map_err(|source| TargetError::Generation {
                    site: site.to_string(),
                    what: "cannot remove the work area",
                    source,
                })?;
            self.drop_store(site, &w.store).await
        };
        if let Err(e) = dropped.await {
            tracing::warn!(site, error = %e, "cannot remove the work area");
        }
    }

    /// Removes a generation's index rows and its row.
    async fn drop_store(&self, site: &str, store: &str) -> Result<(), TargetError> {
        let mut tx = self.inner.ledger.db().pool.begin().await?;
        for sql in DROP_ROWS {
            sqlx::query(sql).bind(store).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM generations WHERE site = $1 AND store = $2")
            .bind(site)
            .bind(store)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The lineage of an open session (kept for the switch's tier pushes).
    fn lineage(&self, s: &SessionRow) -> Vec<String> {
        self.inner
            .lineages
            .lock()
            .expect("lineages lock")
            .get(&s.id)
            .cloned()
            .unwrap_or_default()
    }

    /// Removes the generations beyond the `keep` newest (the live one always kept): their
    /// directories and their index rows. A failure is logged; the switch stands.
    async fn prune(&self, site: &str, keep: u32) {
        let keep = if keep == 0 { DEFAULT_KEEP } else { keep } as usize;
        if let Err(e) = self.prune_inner(site, keep).await {
            tracing::warn!(site, error = %e, "cannot remove old generations");
        }
    }

    async fn prune_inner(&self, site: &str, keep: usize) -> Result<(), TargetError> {
        let db = self.inner.ledger.db();
        let old: Vec<GenRow> = list(db, site)
            .await?
            .into_iter()
            .filter(|g| g.state == "kept")
            .skip(keep.saturating_sub(1))
            .collect();
        let fs = self.site(site)?.fs.clone();
        for g in old {
            let number = g.number.unwrap_or(0).max(0) as u64;
            let dir = fs.clone();
            tokio::task::spawn_blocking(move || dir.remove_generation(number))
                .await
                .map_err(TargetError::task("prune"))?
                .map_err(|source| TargetError::Generation {
                    site: site.to_string(),
                    what: "cannot remove an old generation",
                    source,
                })?;
            self.drop_store(site, &g.store).await?;
            tracing::info!(site, generation = number, "old generation removed");
        }
        Ok(())
    }
}
