//! The source's job store: jobs, per-target state and checkpoints, the append-only
//! event log that monitors replay, item errors, and per-channel sync state.
//!
//! Every write that a monitor or a resume depends on is committed before it is
//! announced: an event gets its per-job sequence number in the same transaction
//! that stores it, and an ack is counted only once its checkpoint row is stored.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use crate::db::{Backend, Db};
use crate::now_ms;
use std::sync::Arc;

mod states;

pub use states::{JobState, TargetState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {0} not found")]
    NotFound(String),
    #[error("job id prefix {prefix:?} is ambiguous: {} and more", .ids.join(", "))]
    Ambiguous { prefix: String, ids: Vec<String> },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Options a job was started with (stored as JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOptions {
    #[serde(default)]
    pub full: bool,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub checksum: bool,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub lineage: Vec<String>,
    /// `max_delete` for this job only (as given: "N" or "N%").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delete: Option<String>,
    /// A rollback job (switch the targets back to a generation they keep), to
    /// `rollback_to` or, unset, to the one before the live one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<u64>,
    /// W3C trace context of the request that started the job, so the job's spans join
    /// the caller's trace even though the job runs later.
    #[serde(default, skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub trace: std::collections::HashMap<String, String>,
}

#[derive(Clone, Debug, FromRow)]
pub struct JobRow {
    pub id: String,
    pub channel: String,
    pub state: String,
    pub trigger_kind: String,
    pub requested_by: String,
    pub options_json: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
    pub summary: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub cancel_requested: i64,
    pub event_seq: i64,
}

impl JobRow {
    pub fn state(&self) -> JobState {
        JobState::parse(&self.state).unwrap_or(JobState::Failed)
    }
    pub fn options(&self) -> JobOptions {
        serde_json::from_str(&self.options_json).unwrap_or_default()
    }
}

#[derive(Clone, Debug, Default, FromRow, Serialize)]
pub struct TargetRow {
    pub job_id: String,
    pub target: String,
    pub url: String,
    pub site: String,
    pub state: String,
    pub planned: i64,
    pub items_total: i64,
    pub bytes_total: i64,
    pub deletes_total: i64,
    pub items_done: i64,
    pub bytes_done: i64,
    pub deletes_done: i64,
    pub packages_sent: i64,
    pub packages_acked: i64,
    pub packages_retried: i64,
    /// The highest package number sent so far (a lower or equal one is sent again).
    pub max_sent_seq: i64,
    pub bytes_on_wire: i64,
    pub item_errors: i64,
    pub reconnects: i64,
    pub checkpoint_seq: i64,
    pub checkpoint_json: String,
    pub error: Option<String>,
}

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub job_id: String,
    pub seq: i64,
    pub kind: String,
    pub at: i64,
    pub target: String,
    pub data_json: String,
}

#[derive(Clone, Debug, FromRow, Serialize)]
pub struct ItemErrorRow {
    pub target: String,
    pub path: String,
    pub code: String,
    pub message: String,
    pub retryable: i64,
    pub at: i64,
}

#[derive(Clone, Debug, FromRow)]
pub struct ChannelTargetRow {
    pub channel: String,
    pub target: String,
    pub last_success_at: Option<i64>,
    pub last_job_id: Option<String>,
}

/// A new job to queue.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub channel: String,
    pub trigger: String,
    pub requested_by: String,
    pub options: JobOptions,
    /// (name, url, site) of each target of the channel.
    pub targets: Vec<(String, String, String)>,
}

/// Counter increments applied with a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub items: i64,
    pub bytes: i64,
    pub deletes: i64,
    pub packages_acked: i64,
    pub item_errors: i64,
    /// What was sent since the last checkpoint (stored with it, so sending a package
    /// costs no write of its own).
    pub sent: Sent,
}

/// Packages sent, and what happened to the connection, since they were last stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub packages: i64,
    pub wire_bytes: i64,
    /// Of `packages`, those sent again (after a reconnect, a rewind or a restart).
    pub retried: i64,
    /// The highest package number sent.
    pub max_seq: i64,
    pub reconnects: i64,
}

/// Item error to record.
#[derive(Clone, Debug)]
pub struct NewItemError {
    pub path: String,
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

const JOB_COLS: &str = "id, channel, state, trigger_kind, requested_by, options_json, created_at, \
     started_at, finished_at, error, summary, lease_owner, lease_expires_at, cancel_requested, \
     event_seq";

/// The job store over either backend.
#[derive(Clone, Debug)]
pub struct JobStore {
    db: Db,
    /// Who writes through this store (an instance id), sent with event notifications so
    /// an instance skips its own.
    origin: Arc<std::sync::OnceLock<String>>,
}

/// The PostgreSQL channel on which stored job events are announced ("ORIGIN ID").
pub const EVENTS_CHANNEL: &str = "cms_mirror_events";

impl JobStore {
    pub fn new(db: Db) -> JobStore {
        JobStore {
            db,
            origin: Default::default(),
        }
    }

    /// Names the instance writing through this store (once).
    pub fn set_origin(&self, origin: &str) {
        let _ = self.origin.set(origin.to_string());
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Queues a job, or folds the request into the channel's job that is already queued
    /// with the same options (`coalesced = true`). Returns the job and the stored
    /// `queued` event when a new job was created.
    pub async fn create_job(&self, new: NewJob) -> Result<(JobRow, bool), StoreError> {
        let options_json = serde_json::to_string(&new.options).unwrap_or_else(|_| "{}".into());
        let mut tx = self.db.pool.begin().await?;
        // Take the write lock before reading: two triggers of one channel at once must
        // not both queue a job, and on SQLite a read transaction that later writes fails
        // at once (SQLITE_BUSY) when another writer got in between.
        match self.db.backend {
            Backend::Sqlite => {
                sqlx::query("UPDATE jobs SET id = id WHERE 1 = 0")
                    .execute(&mut *tx)
                    .await?;
            }
            Backend::Postgres => {
                sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtext($1))) l")
                    .bind(&new.channel)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // Same options (the caller's trace context aside): one follow-up job.
        let queued: Vec<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLS} FROM jobs WHERE channel = $1 AND state = 'queued' ORDER BY created_at"
        )))
        .bind(&new.channel)
        .fetch_all(&mut *tx)
        .await?;
        let same = |o: &JobOptions| JobOptions {
            trace: Default::default(),
            ..o.clone()
        };
        let existing = queued
            .into_iter()
            .find(|j| same(&j.options()) == same(&new.options));
        if let Some(job) = existing {
            tx.commit().await?;
            return Ok((job, true));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO jobs (id, channel, state, trigger_kind, requested_by, options_json, created_at) \
             VALUES ($1, $2, 'queued', $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(&new.channel)
        .bind(&new.trigger)
        .bind(&new.requested_by)
        .bind(&options_json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for (name, url, site) in &new.targets {
            sqlx::query(
                "INSERT INTO job_targets (job_id, target, url, site, state) VALUES ($1, $2, $3, $4, 'pending')",
            )
            .bind(&id)
            .bind(name)
            .bind(url)
            .bind(site)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((self.get_job(&id).await?, false))
    }

    pub async fn get_job(&self, id: &str) -> Result<JobRow, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLS} FROM jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// The full id of the job `given` names: the id itself, or a unique prefix of one
    /// (the short ids event lines show).
    pub async fn resolve_job_id(&self, given: &str) -> Result<String, StoreError> {
        let not_found = || StoreError::NotFound(given.to_string());
        // Only characters of an id: nothing a LIKE pattern would read otherwise.
        if given.is_empty() || !given.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(not_found());
        }
        let ids: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM jobs WHERE id LIKE $1 ORDER BY id LIMIT 3")
                .bind(format!("{}%", given.to_ascii_lowercase()))
                .fetch_all(&self.db.pool)
                .await?;
        let mut ids: Vec<String> = ids.into_iter().map(|r| r.0).collect();
        match ids.len() {
            0 => Err(not_found()),
            1 => Ok(ids.remove(0)),
            _ if ids.iter().any(|i| i == given) => Ok(given.to_string()),
            _ => Err(StoreError::Ambiguous {
                prefix: given.to_string(),
                ids,
            }),
        }
    }

    /// Removes jobs that finished before `before_ms` (their targets, events and item
    /// errors with them), at most `limit` at a time; answers their ids.
    pub async fn prune_finished(
        &self,
        before_ms: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let ids: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM jobs WHERE finished_at < $1 \
             AND state IN ('succeeded', 'completed_with_errors', 'failed', 'cancelled') \
             ORDER BY finished_at LIMIT $2",
        )
        .bind(before_ms)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for (id,) in &ids {
            for table in ["job_events", "job_item_errors", "job_targets"] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE job_id = $1"
                )))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("DELETE FROM jobs WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ids.into_iter().map(|r| r.0).collect())
    }

    /// Newest first.
    pub async fn list_jobs(
        &self,
        channel: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRow>, StoreError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLS} FROM jobs WHERE ($1 = '' OR channel = $1) \
             ORDER BY created_at DESC, id LIMIT $2"
        )))
        .bind(channel.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// Claims the oldest runnable job for `owner`: a queued job of a channel that has no
    /// job running, or a running job whose lease expired (its owner died). On PostgreSQL
    /// the candidate row is locked with `SKIP LOCKED`, so concurrent instances never
    /// claim the same job.
    pub async fn claim_next(
        &self,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Option<JobRow>, StoreError> {
        let now = now_ms();
        let lock = match self.db.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_at = $2, \
                 started_at = COALESCE(started_at, $3) \
             WHERE id = (SELECT j.id FROM jobs j WHERE \
                 (j.state = 'queued' AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.channel = j.channel \
                      AND r.state = 'running' AND r.lease_expires_at >= $3)) \
                 OR (j.state = 'running' AND j.lease_expires_at < $3) \
               ORDER BY j.state DESC, j.created_at LIMIT 1 {lock}) \
             RETURNING {JOB_COLS}"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(now + lease_ms)
            .bind(now)
            .fetch_optional(&self.db.pool)
            .await?)
    }

    /// Extends a lease; false when the job is no longer ours (taken over or finished).
    pub async fn renew_lease(
        &self,
        id: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE jobs SET lease_expires_at = $1 WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
        )
        .bind(now_ms() + lease_ms)
        .bind(id)
        .bind(owner)
        .execute(&self.db.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records the outcome of a job.
    pub async fn finish_job(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        summary: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET state = $1, error = $2, summary = $3, finished_at = $4, \
             lease_owner = NULL, lease_expires_at = NULL WHERE id = $5",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(summary)
        .bind(now_ms())
        .bind(id)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Asks a job to stop. A queued job is cancelled at once (returns true); a running
    /// job gets a flag its runner polls.
    pub async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let job = self.get_job(id).await?;
        match job.state() {
            JobState::Queued => {
                let r = sqlx::query(
                    "UPDATE jobs SET state = 'cancelled', finished_at = $1, error = 'cancelled before it started' \
                     WHERE id = $2 AND state = 'queued'",
                )
                .bind(now_ms())
                .bind(id)
                .execute(&self.db.pool)
                .await?;
                Ok(r.rows_affected() == 1)
            }
            JobState::Running => {
                sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = $1")
                    .bind(id)
                    .execute(&self.db.pool)
                    .await?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    pub async fn targets(&self, job: &str) -> Result<Vec<TargetRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT job_id, target, url, site, state, planned, items_total, bytes_total, deletes_total, \
             items_done, bytes_done, deletes_done, packages_sent, packages_acked, packages_retried, \
             max_sent_seq, bytes_on_wire, item_errors, reconnects, checkpoint_seq, checkpoint_json, error \
             FROM job_targets WHERE job_id = $1 ORDER BY target",
        )
        .bind(job)
        .fetch_all(&self.db.pool)
        .await?)
    }

    pub async fn set_target_state(
        &self,
        job: &str,
        target: &str,
        state: TargetState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE job_targets SET state = $1, error = $2 WHERE job_id = $3 AND target = $4",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(job)
        .bind(target)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Stores a target's planned totals; progress counters and the plan cursor restart
    /// from zero, and the package sequence continues from `seq` (the target session's).
    pub async fn set_planned(
        &self,
        job: &str,
        target: &str,
        items: i64,
        bytes: i64,
        deletes: i64,
        seq: i64,
    ) -> Result<(), StoreError> {
        self.store_plan(job, target, items, bytes, deletes, seq, false)
            .await
    }

    /// A new plan for a job that was under way elsewhere (its plan files are on another
    /// instance): what is done stays done, the totals grow by what is left, and the
    /// checkpoint restarts at the beginning of the new plan after package `seq`.
    pub async fn replan(
        &self,
        job: &str,
        target: &str,
        items_left: i64,
        bytes_left: i64,
        deletes_left: i64,
        seq: i64,
    ) -> Result<(), StoreError> {
        self.store_plan(job, target, items_left, bytes_left, deletes_left, seq, true)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_plan(
        &self,
        job: &str,
        target: &str,
        items: i64,
        bytes: i64,
        deletes: i64,
        seq: i64,
        keep_done: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(if keep_done {
            "UPDATE job_targets SET planned = 1, items_total = items_done + $1, \
             bytes_total = bytes_done + $2, deletes_total = deletes_done + $3, \
             checkpoint_json = '', checkpoint_seq = $6, max_sent_seq = $6 WHERE job_id = $4 AND target = $5"
        } else {
            "UPDATE job_targets SET planned = 1, items_total = $1, bytes_total = $2, deletes_total = $3, \
             items_done = 0, bytes_done = 0, deletes_done = 0, checkpoint_json = '', checkpoint_seq = $6, \
             max_sent_seq = $6 WHERE job_id = $4 AND target = $5"
        })
        .bind(items)
        .bind(bytes)
        .bind(deletes)
        .bind(job)
        .bind(target)
        .bind(seq)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Stores the checkpoint after an ack (the highest contiguous acknowledged package
    /// and where the plan stands after it) together with the counters it adds.
    pub async fn checkpoint(
        &self,
        job: &str,
        target: &str,
        seq: i64,
        cursor_json: &str,
        p: &Progress,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE job_targets SET checkpoint_seq = $1, checkpoint_json = $2, \
             items_done = items_done + $3, bytes_done = bytes_done + $4, deletes_done = deletes_done + $5, \
             packages_acked = packages_acked + $6, item_errors = item_errors + $7, \
             packages_sent = packages_sent + $8, bytes_on_wire = bytes_on_wire + $9, \
             packages_retried = packages_retried + $10, reconnects = reconnects + $11, \
             max_sent_seq = CASE WHEN max_sent_seq > $12 THEN max_sent_seq ELSE $12 END \
             WHERE job_id = $13 AND target = $14",
        )
        .bind(seq)
        .bind(cursor_json)
        .bind(p.items)
        .bind(p.bytes)
        .bind(p.deletes)
        .bind(p.packages_acked)
        .bind(p.item_errors)
        .bind(p.sent.packages)
        .bind(p.sent.wire_bytes)
        .bind(p.sent.retried)
        .bind(p.sent.reconnects)
        .bind(p.sent.max_seq)
        .bind(job)
        .bind(target)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Adds to the transport counters of a target.
    pub async fn add_sent(&self, job: &str, target: &str, s: &Sent) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE job_targets SET packages_sent = packages_sent + $1, bytes_on_wire = bytes_on_wire + $2, \
             packages_retried = packages_retried + $3, reconnects = reconnects + $4, \
             max_sent_seq = CASE WHEN max_sent_seq > $5 THEN max_sent_seq ELSE $5 END \
             WHERE job_id = $6 AND target = $7",
        )
        .bind(s.packages)
        .bind(s.wire_bytes)
        .bind(s.retried)
        .bind(s.reconnects)
        .bind(s.max_seq)
        .bind(job)
        .bind(target)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Records item errors (the target's counter is updated by the caller's checkpoint).
    pub async fn add_item_errors(
        &self,
        job: &str,
        target: &str,
        errors: &[NewItemError],
    ) -> Result<(), StoreError> {
        if errors.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.db.pool.begin().await?;
        for e in errors {
            sqlx::query(
                "INSERT INTO job_item_errors (job_id, target, path, code, message, retryable, at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(job)
            .bind(target)
            .bind(&e.path)
            .bind(&e.code)
            .bind(&e.message)
            .bind(e.retryable as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Counts `n` more item errors for a target (those recorded outside a checkpoint,
    /// e.g. reported by its commit).
    pub async fn count_item_errors(
        &self,
        job: &str,
        target: &str,
        n: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE job_targets SET item_errors = item_errors + $1 WHERE job_id = $2 AND target = $3")
            .bind(n)
            .bind(job)
            .bind(target)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    pub async fn item_errors(&self, job: &str) -> Result<Vec<ItemErrorRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT target, path, code, message, retryable, at FROM job_item_errors \
             WHERE job_id = $1 ORDER BY id",
        )
        .bind(job)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// Appends an event with the job's next sequence number (gap-free: the number is
    /// taken in the transaction that stores the event).
    pub async fn append_event(
        &self,
        job: &str,
        kind: &str,
        target: &str,
        data: &serde_json::Value,
    ) -> Result<EventRow, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let (seq,): (i64,) = sqlx::query_as(
            "UPDATE jobs SET event_seq = event_seq + 1 WHERE id = $1 RETURNING event_seq",
        )
        .bind(job)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(job.to_string()))?;
        let ev: EventRow = sqlx::query_as(
            "INSERT INTO job_events (job_id, seq, kind, at, target, data_json) VALUES ($1, $2, $3, $4, $5, $6) \
             RETURNING id, job_id, seq, kind, at, target, data_json",
        )
        .bind(job)
        .bind(seq)
        .bind(kind)
        .bind(now_ms())
        .bind(target)
        .bind(data.to_string())
        .fetch_one(&mut *tx)
        .await?;
        if self.db.backend == Backend::Postgres {
            // Delivered at commit, to every instance listening (cross-instance watch).
            let origin = self.origin.get().map(String::as_str).unwrap_or("");
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(EVENTS_CHANNEL)
                .bind(format!("{origin} {}", ev.id))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ev)
    }

    /// One stored event by its global id.
    pub async fn event_by_id(&self, id: i64) -> Result<Option<EventRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, job_id, seq, kind, at, target, data_json FROM job_events WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?)
    }

    /// Stored events of one job after a per-job sequence number.
    pub async fn events_of_job(
        &self,
        job: &str,
        after_seq: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, job_id, seq, kind, at, target, data_json FROM job_events \
             WHERE job_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(job)
        .bind(after_seq)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// Stored events of all jobs (optionally of one channel) after a global event id.
    pub async fn events_after(
        &self,
        channel: Option<&str>,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT e.id, e.job_id, e.seq, e.kind, e.at, e.target, e.data_json FROM job_events e \
             JOIN jobs j ON j.id = e.job_id WHERE e.id > $1 AND ($2 = '' OR j.channel = $2) \
             ORDER BY e.id LIMIT $3",
        )
        .bind(after_id)
        .bind(channel.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// Records a successful sync of a channel to a target (for sync lag).
    pub async fn record_success(
        &self,
        channel: &str,
        target: &str,
        job: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO channel_target_state (channel, target, last_success_at, last_job_id) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (channel, target) \
             DO UPDATE SET last_success_at = excluded.last_success_at, last_job_id = excluded.last_job_id",
        )
        .bind(channel)
        .bind(target)
        .bind(at)
        .bind(job)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Records an atomic job's decision to switch, numbering its generation above
    /// `at_least` (the highest any target has) and above every generation the channel
    /// decided before; returns the number. Once recorded the decision stands: a second
    /// call returns the same number.
    pub async fn decide_switch(
        &self,
        job: &str,
        channel: &str,
        at_least: u64,
    ) -> Result<u64, StoreError> {
        // One statement: a read then a write in one SQLite transaction fails at once
        // (SQLITE_BUSY_SNAPSHOT) when another writer came between them.
        self.record_decision(
            job,
            channel,
            at_least,
            "SELECT $1, $2, CASE WHEN COALESCE(MAX(generation), 0) > $3 \
             THEN COALESCE(MAX(generation), 0) + 1 ELSE $3 + 1 END, $4 \
             FROM publish_decisions WHERE channel = $2",
        )
        .await
    }

    /// Records a rollback job's decision to switch back to generation `to`; returns it
    /// (the one recorded before, if any).
    pub async fn record_rollback(
        &self,
        job: &str,
        channel: &str,
        to: u64,
    ) -> Result<u64, StoreError> {
        self.record_decision(job, channel, to, "VALUES ($1, $2, $3, $4)")
            .await
    }

    /// Inserts a job's decision (`rows`: the values, from job $1, channel $2, number
    /// $3 and time $4) unless it has one; returns the one it has.
    async fn record_decision(
        &self,
        job: &str,
        channel: &str,
        number: u64,
        rows: &'static str,
    ) -> Result<u64, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO publish_decisions (job_id, channel, generation, decided_at) {rows} \
             ON CONFLICT (job_id) DO NOTHING"
        )))
        .bind(job)
        .bind(channel)
        .bind(number as i64)
        .bind(crate::now_ms())
        .execute(&self.db.pool)
        .await?;
        self.decision(job)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("the publish decision of job {job}")))
    }

    /// The generation an atomic job decided to switch to, if it decided.
    pub async fn decision(&self, job: &str) -> Result<Option<u64>, StoreError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT generation FROM publish_decisions WHERE job_id = $1")
                .bind(job)
                .fetch_optional(&self.db.pool)
                .await?;
        Ok(row.map(|r| r.0.max(0) as u64))
    }

    pub async fn channel_states(&self) -> Result<Vec<ChannelTargetRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT channel, target, last_success_at, last_job_id FROM channel_target_state",
        )
        .fetch_all(&self.db.pool)
        .await?)
    }

    pub async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// Replaces a setting's value if it still is `old` (compare-and-set); true when it did.
    pub async fn swap_setting(&self, key: &str, old: &str, new: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE settings SET value = $1 WHERE key = $2 AND value = $3")
            .bind(new)
            .bind(key)
            .bind(old)
            .execute(&self.db.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Stores a setting unless it exists; returns the value that is stored.
    pub async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.db.pool)
        .await?;
        Ok(self
            .get_setting(key)
            .await?
            .unwrap_or_else(|| value.to_string()))
    }
}
