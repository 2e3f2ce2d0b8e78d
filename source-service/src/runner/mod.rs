//! Running jobs: the worker loop that claims queued jobs ([`worker`]) and, per target of
//! a job, a [`target::TargetRun`] that connects, plans ([`remote_plan`]), streams packages
//! in a window with a checkpoint per ack ([`stream`]), reconnects and rewinds on faults
//! ([`retry`]), holds deletes back until content has landed, and commits.
//!
//! Store writes during a job follow one policy: a write that makes progress count (a
//! checkpoint, the plan totals) must succeed (a checkpoint is retried until it is
//! stored or the job is cancelled; the totals fail the target); a bookkeeping write
//! (a target's state, sent-package counters, events) that fails is logged at WARN and
//! the job goes on, since the next checkpoint or the job's outcome corrects it.

mod publish;
mod remote_plan;
mod retry;
mod stream;
mod target;
mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use cms_mirror::config::TargetConfig;
use cms_mirror::jobstore::{NewItemError, StoreError, TargetRow};
use cms_mirror::pb;

use crate::App;
use crate::metrics::Metrics;

pub use worker::{run_job, worker};

/// Sends of one package that may fail their checksum before its items are given up.
pub const MAX_PACKAGE_ATTEMPTS: u32 = 5;
/// Interval between stored progress events of one target.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

fn target_label(t: &TargetConfig) -> String {
    format!("target {} ({}, site {})", t.name, t.url, t.site)
}

fn walk_error(e: cms_mirror::fswalk::WalkError) -> NewItemError {
    NewItemError {
        path: e.path,
        code: e.code.to_string(),
        message: e.message,
        retryable: e.retryable,
    }
}

fn pb_item_error(e: pb::ItemError) -> NewItemError {
    NewItemError {
        path: e.path,
        code: e.code,
        message: e.message,
        retryable: e.retryable,
    }
}

/// A request carrying the current span's trace context.
fn traced<T>(msg: T) -> tonic::Request<T> {
    cms_mirror::telemetry::inject(tonic::Request::new(msg))
}

pub(crate) fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// A bookkeeping store write: its failure is logged and the job goes on (see the
/// module doc).
fn logged<T>(r: Result<T, StoreError>, job: &str, what: &str) {
    if let Err(e) = r {
        tracing::warn!(job, error = %e, "cannot store {what}; going on");
    }
}

async fn current_row(app: &Arc<App>, jid: &str, tname: &str) -> TargetRow {
    app.store
        .targets(jid)
        .await
        .ok()
        .and_then(|v| v.into_iter().find(|r| r.target == tname))
        .unwrap_or_default()
}

async fn record_item_errors(
    app: &Arc<App>,
    jid: &str,
    channel: &str,
    tname: &str,
    errs: &[NewItemError],
) {
    if errs.is_empty() {
        return;
    }
    app.metrics
        .item_errors
        .get_or_create(&Metrics::target(channel, tname))
        .inc_by(errs.len() as u64);
    if let Err(e) = app.store.add_item_errors(jid, tname, errs).await {
        tracing::error!(job = jid, error = %e, "cannot store item errors");
    }
    for e in errs {
        app.bus
            .emit(jid, "item_failed", tname, json!({"path": e.path, "code": e.code, "message": e.message, "retryable": e.retryable}))
            .await;
    }
}

/// Announces a target's progress: counters from the store; the rate of what crossed
/// since `started` (`bytes`); the bandwidth limit it is held to.
async fn emit_progress(
    app: &Arc<App>,
    jid: &str,
    tname: &str,
    bytes: u64,
    started: Instant,
    bwlimit: Option<u64>,
) {
    let r = current_row(app, jid, tname).await;
    let secs = started.elapsed().as_secs_f64().max(0.001);
    app.bus
        .emit(
            jid,
            "progress",
            tname,
            json!({
                "items_done": r.items_done, "items_total": r.items_total,
                "bytes_done": r.bytes_done, "bytes_total": r.bytes_total,
                "deletes_done": r.deletes_done, "deletes_total": r.deletes_total,
                "packages_acked": r.packages_acked, "item_errors": r.item_errors,
                "rate_bytes_per_sec": (bytes as f64 / secs) as u64,
                "bytes_on_wire": r.bytes_on_wire,
                "bwlimit_bytes_per_sec": bwlimit,
            }),
        )
        .await;
}
