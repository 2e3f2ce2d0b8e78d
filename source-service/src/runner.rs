//! Running jobs: the worker loop that claims queued jobs, and the per-target session
//! (plan, stream packages in a window, checkpoint each ack, rewind and reconnect on
//! faults, hold deletes back until content has landed, commit).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tracing::Instrument;

use cms_mirror::config::{ChannelConfig, OnDiskFull, TargetConfig};
use cms_mirror::jobstore::{JobRow, JobState, NewItemError, Progress};
use cms_mirror::model::Item;
use cms_mirror::pb::target_service_client::TargetServiceClient;
use cms_mirror::security::AuthChannel;
use cms_mirror::{package, pb};

use crate::App;
use crate::metrics::Metrics;
use crate::packer::{Built, Packer};
use crate::plan::{self, Compare, Cursor, PhaseName, PlanSpec};

/// Sends of one package that may fail their checksum before its items are given up.
pub const MAX_PACKAGE_ATTEMPTS: u32 = 5;
/// Interval between stored progress events of one target.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The worker loop: claims runnable jobs and runs them, until `shutdown`.
pub async fn worker(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        match app.store.claim_next(&app.instance_id, app.lease_ms).await {
            Ok(Some(job)) => {
                let app2 = app.clone();
                tokio::spawn(async move { run_job(app2, job).await });
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot claim jobs; retrying"),
        }
        tokio::select! {
            _ = app.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// What became of one target of a job.
#[derive(Debug)]
struct TargetOutcome {
    state: &'static str,
    items: u64,
    bytes: u64,
    deletes: u64,
    item_errors: u64,
    error: Option<String>,
}

impl TargetOutcome {
    fn failed(error: String, item_errors: u64) -> TargetOutcome {
        TargetOutcome {
            state: "failed",
            items: 0,
            bytes: 0,
            deletes: 0,
            item_errors,
            error: Some(error),
        }
    }
}

/// Runs one claimed job to its end, in a span that continues the trace of the request
/// that started it.
pub async fn run_job(app: Arc<App>, job: JobRow) {
    let span = tracing::info_span!("job", job = %job.id, channel = %job.channel, trigger = %job.trigger_kind);
    cms_mirror::telemetry::follow_stored(&span, &job.options().trace);
    run_job_inner(app, job).instrument(span).await
}

async fn run_job_inner(app: Arc<App>, job: JobRow) {
    let id = job.id.clone();
    let (cancel_tx, cancel_rx) = watch::channel(false);
    app.running
        .lock()
        .expect("running lock")
        .insert(id.clone(), cancel_tx.clone());
    let resumed = job.event_seq > 1;
    app.bus
        .emit(
            &id,
            if resumed { "resumed" } else { "started" },
            "",
            json!({"instance": app.instance_id}),
        )
        .await;
    // Lease renewal and cancel polling (a cancel may arrive through another instance).
    let keeper = {
        let app = app.clone();
        let id = id.clone();
        let cancel_tx = cancel_tx.clone();
        tokio::spawn(async move {
            let every = Duration::from_millis((app.lease_ms / 3).max(100) as u64);
            loop {
                tokio::time::sleep(every.min(Duration::from_millis(500))).await;
                match app
                    .store
                    .renew_lease(&id, &app.instance_id, app.lease_ms)
                    .await
                {
                    Ok(false) => {
                        tracing::warn!(job = %id, "lease lost; stopping");
                        let _ = cancel_tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!(job = %id, error = %e, "cannot renew lease"),
                    Ok(true) => {}
                }
                if let Ok(j) = app.store.get_job(&id).await
                    && j.cancel_requested != 0
                {
                    let _ = cancel_tx.send(true);
                }
            }
        })
    };
    let (state, error, summary) = match app.config.channel(&job.channel) {
        None => (
            JobState::Failed,
            Some(format!(
                "unknown channel {:?} (not in the source's configuration)",
                job.channel
            )),
            String::new(),
        ),
        Some(ch) => {
            let ch = ch.clone();
            let futs = ch.targets.iter().map(|t| {
                run_target(&app, &job, &ch, t, cancel_rx.clone())
                    .instrument(tracing::info_span!("target", job = %job.id, target = %t.name, url = %t.url, site = %t.site))
            });
            let outcomes = futures::future::join_all(futs).await;
            aggregate(&ch, &outcomes, *cancel_rx.borrow(), job.options().dry_run)
        }
    };
    keeper.abort();
    app.running.lock().expect("running lock").remove(&id);
    // A job whose lease was taken over is finished by its new owner.
    if let Ok(j) = app.store.get_job(&id).await
        && j.lease_owner.as_deref() != Some(app.instance_id.as_str())
        && j.state() == JobState::Running
    {
        return;
    }
    if let Err(e) = app
        .store
        .finish_job(&id, state, error.as_deref(), &summary)
        .await
    {
        tracing::error!(job = %id, error = %e, "cannot record the job outcome");
    }
    app.metrics
        .jobs
        .get_or_create(&cms_mirror::observe::labels(&[
            ("channel", &job.channel),
            ("outcome", state.as_str()),
        ]))
        .inc();
    let targets = app.store.targets(&id).await.unwrap_or_default();
    app.bus
        .emit(&id, "finished", "", json!({"state": state.as_str(), "error": error, "summary": summary, "targets": targets}))
        .await;
    tracing::info!(job = %id, state = state.as_str(), %summary, "job finished");
}

fn aggregate(
    ch: &ChannelConfig,
    outcomes: &[TargetOutcome],
    cancelled: bool,
    dry_run: bool,
) -> (JobState, Option<String>, String) {
    let items: u64 = outcomes.iter().map(|o| o.items).sum();
    let bytes: u64 = outcomes.iter().map(|o| o.bytes).sum();
    let deletes: u64 = outcomes.iter().map(|o| o.deletes).sum();
    let errors: u64 = outcomes.iter().map(|o| o.item_errors).sum();
    let verb = if dry_run { "would mirror" } else { "mirrored" };
    let summary = format!(
        "{verb} {items} items ({bytes} bytes) and {deletes} deletes to {} target(s); {errors} item error(s)",
        outcomes.len()
    );
    let failed: Vec<String> = ch
        .targets
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| o.state == "failed")
        .map(|(t, o)| format!("{}: {}", t.name, o.error.clone().unwrap_or_default()))
        .collect();
    if cancelled && outcomes.iter().any(|o| o.state == "cancelled") {
        return (JobState::Cancelled, Some("cancelled".into()), summary);
    }
    if !failed.is_empty() {
        return (JobState::Failed, Some(failed.join("; ")), summary);
    }
    if errors > 0 {
        return (JobState::CompletedWithErrors, None, summary);
    }
    (JobState::Succeeded, None, summary)
}

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

/// Sleeps for `d`; false when the job was cancelled meanwhile.
async fn wait_unless_cancelled(d: Duration, cancel: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = cancel.changed() => {}
    }
    !*cancel.borrow()
}

fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

/// Why a stream attempt ended.
enum StreamEnd {
    Done {
        last_seq: u64,
    },
    Rewind(String),
    /// The target is out of space and the channel waits for it (`on_disk_full = "wait"`).
    WaitForSpace(String),
    /// The stream broke; `progressed` when packages were acknowledged on it.
    Disconnected(String, bool),
    Cancelled,
    Fatal(String),
}

async fn run_target(
    app: &Arc<App>,
    job: &JobRow,
    ch: &ChannelConfig,
    t: &TargetConfig,
    mut cancel: watch::Receiver<bool>,
) -> TargetOutcome {
    let opts = job.options();
    let jid = job.id.as_str();
    let tname = t.name.as_str();
    let store = &app.store;
    let fail = |msg: String, errs: u64| async move {
        let _ = store
            .set_target_state(jid, tname, "failed", Some(&msg))
            .await;
        app.bus
            .emit(jid, "target_failed", tname, json!({"error": msg}))
            .await;
        TargetOutcome::failed(msg, errs)
    };
    let _ = store.set_target_state(jid, tname, "connecting", None).await;
    // Token and TLS files are read for every job, so rotating them needs no restart.
    let channel = match t.auth.channel(&t.url) {
        Ok(c) => c,
        Err(e) => return fail(format!("{}: {e}", target_label(t)), 0).await,
    };
    let mut client = TargetServiceClient::new(channel)
        .max_decoding_message_size(cms_mirror::transport::MAX_MESSAGE)
        .max_encoding_message_size(cms_mirror::transport::MAX_MESSAGE);

    // Open (or re-open) the session, retrying within the budget.
    let mut failures = 0u32;
    let session = loop {
        if opts.dry_run {
            break None;
        }
        let req = pb::OpenSessionRequest {
            job_id: jid.to_string(),
            site: t.site.clone(),
            lineage: opts.lineage.clone(),
            source_id: app.instance_id.clone(),
            channel: ch.name.clone(),
            protocol_version: cms_mirror::PROTOCOL_VERSION,
            dry_run: false,
        };
        match within(ch.ack_timeout, client.open_session(traced(req))).await {
            Ok(r) => break Some(r.into_inner()),
            Err(s) if retryable(&s) && failures < ch.retry_budget => {
                failures += 1;
                app.bus
                    .emit(
                        jid,
                        "reconnecting",
                        tname,
                        json!({"attempt": failures, "error": s.message()}),
                    )
                    .await;
                if !wait_unless_cancelled(backoff(failures), &mut cancel).await {
                    return cancelled(app, jid, tname).await;
                }
            }
            Err(s) => {
                return fail(
                    format!(
                        "{} unreachable or refused the session: {}",
                        target_label(t),
                        status_text(&s)
                    ),
                    0,
                )
                .await;
            }
        }
    };
    if let Some(s) = &session {
        app.bus
            .emit(
                jid,
                "target_connected",
                tname,
                json!({"url": t.url, "site": t.site, "last_applied_seq": s.last_applied_seq}),
            )
            .await;
    }

    // Plan, unless a stored plan of this job exists (resume).
    let plan_dir = app.plan_dir(jid, tname);
    let row = store
        .targets(jid)
        .await
        .ok()
        .and_then(|v| v.into_iter().find(|r| r.target == tname));
    let stored_totals =
        plan::load_totals(&plan_dir).filter(|_| row.as_ref().is_some_and(|r| r.planned == 1));
    let planned_now = stored_totals.is_none();
    let totals = match stored_totals {
        Some(tot) => tot,
        None => {
            let _ = store.set_target_state(jid, tname, "planning", None).await;
            let mut failures = 0u32;
            loop {
                match make_plan(app, &mut client, ch, t, &opts, &plan_dir, jid)
                    .instrument(tracing::info_span!("plan", job = %jid, target = %tname))
                    .await
                {
                    Ok(tot) => break tot,
                    Err(PlanError::Transport(msg)) if failures < ch.retry_budget => {
                        failures += 1;
                        app.bus
                            .emit(
                                jid,
                                "reconnecting",
                                tname,
                                json!({"attempt": failures, "error": msg}),
                            )
                            .await;
                        tokio::time::sleep(backoff(failures)).await;
                    }
                    Err(PlanError::Transport(msg) | PlanError::Fatal(msg)) => {
                        return fail(msg, 0).await;
                    }
                }
            }
        }
    };
    if let Some(limit) = ch.max_delete.map(|m| m.limit(totals.target_items))
        && totals.deletes > limit
    {
        return fail(
            format!(
                "max_delete exceeded: the plan deletes {} of {} items on {}, the limit is {limit}; nothing was deleted",
                totals.deletes,
                totals.target_items,
                target_label(t)
            ),
            0,
        )
        .await;
    }
    if planned_now {
        let seq = session.as_ref().map(|s| s.last_applied_seq).unwrap_or(0) as i64;
        // Planned before, but the plan is not here: another instance ran this job (or the
        // data directory was lost). The new plan holds only what is left.
        let replanned = row.as_ref().filter(|r| r.planned == 1);
        let (items, bytes, deletes) = (
            totals.items() as i64,
            totals.bytes as i64,
            totals.deletes as i64,
        );
        let stored = match replanned {
            Some(_) => store.replan(jid, tname, items, bytes, deletes, seq).await,
            None => {
                store
                    .set_planned(jid, tname, items, bytes, deletes, seq)
                    .await
            }
        };
        if let Err(e) = stored {
            return fail(format!("cannot store the plan totals: {e}"), 0).await;
        }
        let (items_done, bytes_done, deletes_done) = replanned
            .map(|r| (r.items_done, r.bytes_done, r.deletes_done))
            .unwrap_or_default();
        app.bus
            .emit(jid, "planned", tname, json!({
                "items_total": items + items_done, "bytes_total": bytes + bytes_done,
                "deletes_total": deletes + deletes_done,
                "creates": totals.creates, "updates": totals.updates, "unchanged": totals.unchanged,
                "replanned": replanned.is_some(),
            }))
            .await;
    }
    let Some(session) = session else {
        let _ = store.set_target_state(jid, tname, "planned", None).await;
        return TargetOutcome {
            state: "planned",
            items: totals.items(),
            bytes: totals.bytes,
            deletes: totals.deletes,
            item_errors: 0,
            error: None,
        };
    };
    if session.committed {
        let _ = store.set_target_state(jid, tname, "committed", None).await;
        let r = store
            .targets(jid)
            .await
            .ok()
            .and_then(|v| v.into_iter().find(|r| r.target == tname))
            .unwrap_or_default();
        return TargetOutcome {
            state: "committed",
            items: r.items_done as u64,
            bytes: r.bytes_done as u64,
            deletes: r.deletes_done as u64,
            item_errors: r.item_errors as u64,
            error: None,
        };
    }

    let _ = store.set_target_state(jid, tname, "sending", None).await;
    let mut attempts: HashMap<u64, u32> = HashMap::new();
    let mut failures = 0u32;
    let mut space_waits = 0u32;
    let last_seq = loop {
        let end = stream_once(
            app,
            &mut client,
            jid,
            ch,
            t,
            &session.session_id,
            &plan_dir,
            &mut cancel,
            &mut attempts,
        )
        .instrument(tracing::info_span!("package_batch", job = %jid, target = %tname))
        .await;
        match end {
            StreamEnd::Done { last_seq } => break last_seq,
            StreamEnd::Cancelled => {
                abort_session(&mut client, &session.session_id).await;
                return cancelled(app, jid, tname).await;
            }
            StreamEnd::Fatal(msg) => {
                // The session ends here: the target drops what it staged.
                abort_session(&mut client, &session.session_id).await;
                let errs = current_row(app, jid, tname).await.item_errors as u64;
                return fail(format!("{}: {msg}", target_label(t)), errs).await;
            }
            StreamEnd::Rewind(why) => {
                app.bus
                    .emit(jid, "rewind", tname, json!({"reason": why}))
                    .await;
            }
            StreamEnd::WaitForSpace(why) => {
                space_waits += 1;
                let wait = Duration::from_secs((1u64 << space_waits.min(5)).min(30));
                if space_waits == 1 {
                    let _ = store
                        .set_target_state(jid, tname, "waiting_for_space", None)
                        .await;
                }
                app.bus
                    .emit(
                        jid,
                        "waiting_for_space",
                        tname,
                        json!({"reason": why, "retry_in_ms": wait.as_millis() as u64}),
                    )
                    .await;
                if !wait_unless_cancelled(wait, &mut cancel).await {
                    return cancelled(app, jid, tname).await;
                }
            }
            StreamEnd::Disconnected(why, progressed) => {
                // The budget bounds consecutive failures: a stream that made progress
                // starts the count again.
                failures = if progressed { 1 } else { failures + 1 };
                let _ = store.add_sent(jid, tname, 0, 0, 0, 1).await;
                app.metrics
                    .reconnects
                    .get_or_create(&Metrics::target(&ch.name, tname))
                    .inc();
                if failures > ch.retry_budget {
                    let errs = current_row(app, jid, tname).await.item_errors as u64;
                    return fail(
                        format!(
                            "{} unreachable after {} attempts: {why}",
                            target_label(t),
                            failures
                        ),
                        errs,
                    )
                    .await;
                }
                app.bus
                    .emit(
                        jid,
                        "target_disconnected",
                        tname,
                        json!({"error": why, "attempt": failures}),
                    )
                    .await;
                if !wait_unless_cancelled(backoff(failures), &mut cancel).await {
                    return cancelled(app, jid, tname).await;
                }
                app.bus
                    .emit(jid, "reconnecting", tname, json!({"attempt": failures}))
                    .await;
            }
        }
    };

    // Commit: directory times, hooks; then the outcome.
    let mut failures = 0u32;
    let commit = loop {
        let r = client
            .commit(traced(pb::CommitRequest {
                session_id: session.session_id.clone(),
                last_seq,
                run_hooks: true,
                abort: false,
            }))
            .await;
        match r {
            Err(s) if retryable(&s) && failures < ch.retry_budget => {
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
            }
            r => break r,
        }
    };
    let row = current_row(app, jid, tname).await;
    match commit {
        Ok(r) => {
            let r = r.into_inner();
            for h in &r.hooks {
                app.bus.emit(jid, "hook_result", tname, json!({"hook": h.hook, "ok": h.ok, "status": h.status, "error": h.error, "attempts": h.attempts, "duration_ms": h.duration_ms})).await;
            }
            let state = if row.item_errors > 0 {
                "completed_with_errors"
            } else {
                "committed"
            };
            let _ = store.set_target_state(jid, tname, state, None).await;
            if row.item_errors == 0 {
                let _ = store
                    .record_success(&ch.name, tname, jid, cms_mirror::now_ms())
                    .await;
            }
            app.bus
                .emit(jid, "committed", tname, json!({"created": r.items_created, "updated": r.items_updated, "deleted": r.items_deleted}))
                .await;
            TargetOutcome {
                state: "committed",
                items: row.items_done as u64,
                bytes: row.bytes_done as u64,
                deletes: row.deletes_done as u64,
                item_errors: row.item_errors as u64,
                error: None,
            }
        }
        Err(s) => {
            fail(
                format!("{}: commit failed: {}", target_label(t), status_text(&s)),
                row.item_errors as u64,
            )
            .await
        }
    }
}

async fn cancelled(app: &Arc<App>, jid: &str, tname: &str) -> TargetOutcome {
    let _ = app
        .store
        .set_target_state(jid, tname, "cancelled", None)
        .await;
    TargetOutcome {
        state: "cancelled",
        items: 0,
        bytes: 0,
        deletes: 0,
        item_errors: 0,
        error: Some("cancelled".into()),
    }
}

async fn current_row(app: &Arc<App>, jid: &str, tname: &str) -> cms_mirror::jobstore::TargetRow {
    app.store
        .targets(jid)
        .await
        .ok()
        .and_then(|v| v.into_iter().find(|r| r.target == tname))
        .unwrap_or_default()
}

/// The end of a target's job once its item errors exceed the channel's `max_errors`.
fn too_many_errors(ch: &ChannelConfig, item_errors: u64) -> Option<StreamEnd> {
    let max = ch.max_errors?;
    (item_errors > max).then(|| {
        StreamEnd::Fatal(format!(
            "{item_errors} item errors exceed max_errors = {max}"
        ))
    })
}

/// A request carrying the current span's trace context.
fn traced<T>(msg: T) -> tonic::Request<T> {
    cms_mirror::telemetry::inject(tonic::Request::new(msg))
}

/// Tells the target to drop a session's staged files (best effort, bounded).
async fn abort_session(client: &mut TargetServiceClient<AuthChannel>, session_id: &str) {
    let req = pb::CommitRequest {
        session_id: session_id.to_string(),
        abort: true,
        ..Default::default()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), client.commit(req)).await;
}

/// `f`, or DEADLINE_EXCEEDED when the peer does not answer within `d` (a stopped
/// process accepts connections but never answers).
async fn within<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(d, f).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {}s",
            d.as_secs()
        )))
    })
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Cancelled
    )
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Marks a manifest stream that broke (retryable) among planner errors.
const MANIFEST_BROKE: &str = "\u{1}manifest:";

/// Why planning failed: a transport problem is retried, anything else fails the target.
enum PlanError {
    Transport(String),
    Fatal(String),
}

async fn make_plan(
    app: &Arc<App>,
    client: &mut TargetServiceClient<AuthChannel>,
    ch: &ChannelConfig,
    t: &TargetConfig,
    opts: &cms_mirror::jobstore::JobOptions,
    plan_dir: &std::path::Path,
    jid: &str,
) -> Result<plan::Totals, PlanError> {
    let (mtx, mut mrx) = mpsc::channel::<Result<Item, String>>(4096);
    let mut stream = within(
        ch.ack_timeout,
        client.get_manifest(traced(pb::GetManifestRequest {
            site: t.site.clone(),
            after_path: String::new(),
        })),
    )
    .await
    .map_err(|s| {
        let msg = format!(
            "{}: cannot read its manifest: {}",
            target_label(t),
            status_text(&s)
        );
        if retryable(&s) {
            PlanError::Transport(msg)
        } else {
            PlanError::Fatal(msg)
        }
    })?
    .into_inner();
    let label = target_label(t);
    let idle = ch.ack_timeout;
    let feeder = tokio::spawn(async move {
        loop {
            match within(idle, stream.message()).await {
                Ok(Some(batch)) => {
                    for e in batch.entries {
                        let item = e
                            .meta
                            .as_ref()
                            .and_then(Item::from_pb)
                            .ok_or_else(|| format!("{label}: malformed manifest entry"));
                        if mtx.send(item).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => return,
                Err(s) => {
                    let _ = mtx
                        .send(Err(format!("{MANIFEST_BROKE}{label}: {}", status_text(&s))))
                        .await;
                    return;
                }
            }
        }
    });
    let spec = PlanSpec {
        source: ch.source.clone(),
        filter: ch.filter.clone(),
        last: ch.last.clone(),
        delete: ch.delete,
        compare: if opts.full {
            Compare::Full
        } else if opts.checksum || ch.checksum {
            Compare::Checksum
        } else {
            Compare::Quick
        },
        paths: opts.paths.clone(),
    };
    let dir = plan_dir.to_path_buf();
    let (totals, walk_errors) =
        tokio::task::spawn_blocking(move || plan::build(&spec, &mut mrx, &dir))
            .await
            .map_err(|e| PlanError::Fatal(format!("planner failed: {e}")))?
            .map_err(|m| match m.strip_prefix(MANIFEST_BROKE) {
                Some(rest) => PlanError::Transport(format!("manifest stream broke: {rest}")),
                None => PlanError::Fatal(m),
            })?;
    feeder.abort();
    if !walk_errors.is_empty() {
        let errs: Vec<NewItemError> = walk_errors.into_iter().map(walk_error).collect();
        record_item_errors(app, jid, &ch.name, &t.name, &errs).await;
        let _ = app
            .store
            .checkpoint(
                jid,
                &t.name,
                0,
                "",
                &Progress {
                    item_errors: errs.len() as i64,
                    ..Default::default()
                },
            )
            .await;
    }
    Ok(totals)
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

/// Packages sent (and their wire bytes) not yet in the store: they go with the next
/// checkpoint, or at the end of the stream.
#[derive(Default)]
struct Sent {
    packages: i64,
    wire: i64,
}

struct InFlight {
    seq: u64,
    cursor_after: Cursor,
    items: u64,
    bytes: u64,
    deletes: u64,
    errors: Vec<NewItemError>,
}

/// One Import stream from the checkpoint until the plan is done or the stream ends.
#[allow(clippy::too_many_arguments)]
async fn stream_once(
    app: &Arc<App>,
    client: &mut TargetServiceClient<AuthChannel>,
    jid: &str,
    ch: &ChannelConfig,
    t: &TargetConfig,
    session_id: &str,
    plan_dir: &std::path::Path,
    cancel: &mut watch::Receiver<bool>,
    attempts: &mut HashMap<u64, u32>,
) -> StreamEnd {
    let tname = t.name.as_str();
    let lbl = Metrics::target(&ch.name, tname);
    let row = current_row(app, jid, tname).await;
    let cursor: Cursor = serde_json::from_str(&row.checkpoint_json).unwrap_or_default();
    let mut last_acked = row.checkpoint_seq as u64;
    let mut item_errors = row.item_errors as u64;
    if let Some(e) = too_many_errors(ch, item_errors) {
        return e;
    }
    let mut phases = vec![PhaseName::Content, PhaseName::Last];
    if ch.delete {
        phases.push(PhaseName::Delete);
    }
    let packer = match Packer::new(
        plan_dir,
        ch.source.clone(),
        &cursor,
        phases,
        last_acked + 1,
        ch.package_bytes,
    ) {
        Ok(p) => p.with_compression(ch.compression),
        Err(e) => {
            return StreamEnd::Fatal(format!(
                "cannot read the plan in {}: {e}",
                plan_dir.display()
            ));
        }
    };
    let (btx, mut brx) = mpsc::channel::<std::io::Result<Built>>(2);
    let producer = tokio::task::spawn_blocking(move || {
        let mut packer = packer;
        loop {
            let next = packer.next_package().transpose();
            let Some(b) = next else { return };
            if btx.blocking_send(b).is_err() {
                return;
            }
        }
    });
    let (otx, orx) = mpsc::channel::<pb::ImportRequest>(ch.window as usize + 2);
    let header = pb::ImportRequest {
        msg: Some(pb::import_request::Msg::Header(pb::ImportHeader {
            session_id: session_id.to_string(),
        })),
    };
    let _ = otx.send(header).await;
    let mut acks = match client.import(traced(ReceiverStream::new(orx))).await {
        Ok(r) => r.into_inner(),
        Err(s) if retryable(&s) => return StreamEnd::Disconnected(status_text(&s), false),
        Err(s) => return StreamEnd::Fatal(format!("import refused: {}", status_text(&s))),
    };
    if cursor != Cursor::default() || last_acked > 0 {
        app.bus
            .emit(jid, "resumed", tname, json!({"from_seq": last_acked + 1}))
            .await;
    }
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let mut unrecorded = Sent::default();
    let mut held: Option<Built> = None;
    let mut packer_done = false;
    let mut skip_deletes = false;
    let mut last_progress = Instant::now() - PROGRESS_EVERY;
    let started = Instant::now();
    let mut bytes_this_stream = 0u64;
    let mut acked_here = 0u64;
    // A hung target (stopped, deadlocked, behind a black-holed route) stops acking while
    // the connection may look alive: no ack for `ack_timeout` with packages in flight is
    // a disconnect. Every ack restarts the clock.
    let mut ack_deadline = tokio::time::Instant::now() + ch.ack_timeout;
    let end = loop {
        if inflight.is_empty() {
            ack_deadline = tokio::time::Instant::now() + ch.ack_timeout;
        }
        // The delete phase waits until all content is acknowledged; with item errors it
        // is skipped (a failed item must not turn into a dangling reference).
        if held.is_some() && inflight.is_empty() {
            if item_errors > 0 {
                skip_deletes = true;
                packer_done = true;
                held = None;
                app.bus.emit(jid, "deletes_skipped", tname, json!({"reason": format!("{item_errors} item error(s) in this job; no deletions applied")})).await;
            } else if let Some(b) = held.take()
                && let Err(e) =
                    send_built(app, &otx, b, &mut inflight, attempts, &lbl, &mut unrecorded).await
            {
                break e;
            }
        }
        if packer_done && inflight.is_empty() && held.is_none() {
            break StreamEnd::Done {
                last_seq: last_acked,
            };
        }
        tokio::select! {
            _ = cancel.changed() => {
                if *cancel.borrow() { break StreamEnd::Cancelled; }
            }
            b = brx.recv(), if !packer_done && held.is_none() && inflight.len() < ch.window as usize => {
                match b {
                    None => packer_done = true,
                    Some(Err(e)) => break StreamEnd::Fatal(format!("cannot read the source: {e}")),
                    Some(Ok(b)) => {
                        if b.phase == PhaseName::Delete && !skip_deletes && (!inflight.is_empty() || item_errors > 0) {
                            held = Some(b);
                        } else if b.phase == PhaseName::Delete && skip_deletes {
                            packer_done = true;
                        } else if let Err(e) = send_built(app, &otx, b, &mut inflight, attempts, &lbl, &mut unrecorded).await {
                            break e;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(ack_deadline), if !inflight.is_empty() => {
                break StreamEnd::Disconnected(
                    format!("no acknowledgement for {}s with {} package(s) in flight; the target seems hung", ch.ack_timeout.as_secs(), inflight.len()),
                    acked_here > 0,
                );
            }
            a = acks.message() => {
                ack_deadline = tokio::time::Instant::now() + ch.ack_timeout;
                let ack = match a {
                    Ok(Some(pb::ImportResponse { msg: Some(pb::import_response::Msg::Ack(ack)) })) => ack,
                    Ok(Some(_)) => continue,
                    Ok(None) => break StreamEnd::Disconnected("the target closed the stream".into(), acked_here > 0),
                    Err(s) if retryable(&s) => break StreamEnd::Disconnected(status_text(&s), acked_here > 0),
                    Err(s) => break StreamEnd::Fatal(status_text(&s)),
                };
                let Some(front) = inflight.front() else {
                    break StreamEnd::Rewind(format!("unexpected ack for package {}", ack.seq));
                };
                if ack.seq != front.seq {
                    break StreamEnd::Rewind(format!("ack for package {} while {} was expected", ack.seq, front.seq));
                }
                match pb::AckStatus::try_from(ack.status).unwrap_or(pb::AckStatus::Unspecified) {
                    pb::AckStatus::Ok => {
                        let f = inflight.pop_front().expect("front exists");
                        let mut errs = f.errors;
                        let target_errs = ack.item_errors.len() as u64;
                        errs.extend(ack.item_errors.into_iter().map(pb_item_error));
                        record_item_errors(app, jid, &ch.name, tname, &errs).await;
                        item_errors += errs.len() as u64;
                        let p = Progress {
                            items: f.items.saturating_sub(target_errs) as i64,
                            bytes: f.bytes as i64,
                            deletes: f.deletes as i64,
                            packages_acked: 1,
                            item_errors: errs.len() as i64,
                            packages_sent: unrecorded.packages,
                            wire_bytes: unrecorded.wire,
                        };
                        let cursor_json = serde_json::to_string(&f.cursor_after).unwrap_or_default();
                        // The ack counts only once its checkpoint is stored.
                        loop {
                            match app.store.checkpoint(jid, tname, f.seq as i64, &cursor_json, &p).await {
                                Ok(()) => {
                                    unrecorded = Sent::default();
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!(job = jid, error = %e, "cannot store checkpoint; retrying");
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                }
                            }
                        }
                        last_acked = f.seq;
                        acked_here += 1;
                        app.metrics.packages_acked.get_or_create(&lbl).inc();
                        app.metrics.bytes_acked.get_or_create(&lbl).inc_by(f.bytes);
                        bytes_this_stream += f.bytes;
                        if let Some(e) = too_many_errors(ch, item_errors) {
                            break e;
                        }
                        if last_progress.elapsed() >= PROGRESS_EVERY && !(packer_done && inflight.is_empty()) {
                            last_progress = Instant::now();
                            emit_progress(app, jid, tname, bytes_this_stream, started).await;
                        }
                    }
                    pb::AckStatus::Retry if ack.item_errors.iter().any(|e| e.code == "no_space") => {
                        if ch.on_disk_full == OnDiskFull::Wait {
                            break StreamEnd::WaitForSpace(ack.message);
                        }
                        let errs: Vec<NewItemError> = ack.item_errors.into_iter().map(pb_item_error).collect();
                        record_item_errors(app, jid, &ch.name, tname, &errs).await;
                        let _ = app.store.checkpoint(jid, tname, last_acked as i64, &current_row(app, jid, tname).await.checkpoint_json, &Progress { item_errors: errs.len() as i64, ..Default::default() }).await;
                        break StreamEnd::Fatal(ack.message);
                    }
                    pb::AckStatus::Retry => {
                        let n = attempts.entry(ack.seq).or_insert(0);
                        *n += 1;
                        let _ = app.store.add_sent(jid, tname, 0, 0, 1, 0).await;
                        app.metrics.packages_retried.get_or_create(&lbl).inc();
                        if *n >= 2 * MAX_PACKAGE_ATTEMPTS {
                            break StreamEnd::Fatal(format!("package {} refused {} times, even after giving its items up: {}", ack.seq, n, ack.message));
                        }
                        if *n >= MAX_PACKAGE_ATTEMPTS {
                            // Sent again as a package that gives its items up (see send_built).
                            break StreamEnd::Rewind(format!("package {} refused {} times ({}); its items are given up", ack.seq, n, ack.message));
                        }
                        break StreamEnd::Rewind(format!("package {} must be sent again: {}", ack.seq, ack.message));
                    }
                    pb::AckStatus::Rejected if ack.message.starts_with("out of order") => {
                        break StreamEnd::Rewind(ack.message);
                    }
                    _ => break StreamEnd::Fatal(format!("package {} rejected: {}", ack.seq, ack.message)),
                }
            }
        }
    };
    drop(brx);
    producer.abort();
    if unrecorded.packages > 0 {
        let _ = app
            .store
            .add_sent(jid, tname, unrecorded.packages, unrecorded.wire, 0, 0)
            .await;
    }
    if matches!(end, StreamEnd::Done { .. }) {
        emit_progress(app, jid, tname, bytes_this_stream, started).await;
    }
    end
}

#[allow(clippy::too_many_arguments)]
async fn send_built(
    app: &Arc<App>,
    otx: &mpsc::Sender<pb::ImportRequest>,
    b: Built,
    inflight: &mut VecDeque<InFlight>,
    attempts: &HashMap<u64, u32>,
    lbl: &cms_mirror::observe::TargetLabels,
    unrecorded: &mut Sent,
) -> Result<(), StreamEnd> {
    let seq = b.pkg.seq;
    let mut b = b;
    if attempts
        .get(&seq)
        .is_some_and(|n| *n >= MAX_PACKAGE_ATTEMPTS)
    {
        give_up_package(&mut b);
    }
    let wire = b.pkg.payload.len() as i64;
    crate::failpoints::maybe_corrupt(&mut b.pkg);
    inflight.push_back(InFlight {
        seq,
        cursor_after: b.cursor_after,
        items: b.items,
        bytes: b.bytes,
        deletes: b.deletes,
        errors: b.errors,
    });
    unrecorded.packages += 1;
    unrecorded.wire += wire;
    app.metrics.packages_sent.get_or_create(lbl).inc();
    app.metrics
        .bytes_sent
        .get_or_create(lbl)
        .inc_by(wire as u64);
    otx.send(pb::ImportRequest {
        msg: Some(pb::import_request::Msg::Package(b.pkg)),
    })
    .await
    .map_err(|_| {
        StreamEnd::Disconnected(format!("stream closed while sending package {seq}"), false)
    })
}

/// Replaces a package that failed its checksum MAX_PACKAGE_ATTEMPTS times by one with
/// the same number that abandons its items (so the sequence stays contiguous and the
/// target drops what it staged of them); each item becomes an item error.
fn give_up_package(b: &mut Built) {
    let payload = match package::open(&b.pkg, &package::Limits::default()) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(seq = b.pkg.seq, error = %e, "cannot reopen a package to give it up");
            pb::PackagePayload::default()
        }
    };
    // Directories stay (they carry no body, and giving one up would fail everything
    // below it); every other item is abandoned.
    let mut keep: Vec<pb::Entry> = Vec::new();
    let mut paths: Vec<String> = Vec::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut dirs: u64 = 0;
    for e in payload.entries {
        let path = match e.op {
            Some(pb::entry::Op::Put(m)) if m.kind == pb::ItemKind::Directory as i32 => {
                keep.push(pb::Entry {
                    op: Some(pb::entry::Op::Put(m)),
                });
                dirs += 1;
                continue;
            }
            Some(pb::entry::Op::Put(m)) => m.path,
            Some(pb::entry::Op::Data(d)) => d.path,
            Some(pb::entry::Op::Delete(d)) => d.path,
            _ => continue,
        };
        if seen.insert(path.clone()) {
            paths.push(path);
        }
    }
    let reason = format!(
        "package {} failed its checksum on the target {MAX_PACKAGE_ATTEMPTS} times",
        b.pkg.seq
    );
    let entries = keep
        .into_iter()
        .chain(paths.iter().map(|p| pb::Entry {
            op: Some(pb::entry::Op::Abort(pb::AbortItem {
                path: p.clone(),
                reason: reason.clone(),
            })),
        }))
        .collect();
    let phase = pb::Phase::try_from(b.pkg.phase).unwrap_or(pb::Phase::Content);
    let compression = pb::Compression::try_from(b.pkg.compression).unwrap_or(pb::Compression::None);
    b.pkg = package::seal(
        b.pkg.seq,
        phase,
        &pb::PackagePayload { entries },
        compression,
    );
    b.items = dirs;
    b.bytes = 0;
    b.deletes = 0;
    b.errors.extend(paths.into_iter().map(|path| NewItemError {
        path,
        code: "checksum_mismatch".into(),
        message: reason.clone(),
        retryable: true,
    }));
}

async fn emit_progress(app: &Arc<App>, jid: &str, tname: &str, bytes: u64, started: Instant) {
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
            }),
        )
        .await;
}
