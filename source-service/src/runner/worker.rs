//! The worker loop (claim runnable jobs, run each) and one job from claim to outcome.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tracing::Instrument;

use cms_mirror::config::{ChannelConfig, Publish};
use cms_mirror::jobstore::{JobRow, JobState, TargetRow, TargetState};

use super::publish::{Coordinator, Decision};
use super::target::{TargetOutcome, run_target};
use crate::App;

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
    let kind = if resumed { "resumed" } else { "started" };
    app.bus
        .emit(&id, kind, "", json!({"instance": app.instance_id}))
        .await;
    let keeper = spawn_keeper(app.clone(), id.clone(), cancel_tx);
    let config = app.config();
    let ran = match config.channel(&job.channel) {
        None => Err(format!(
            "unknown channel {:?} (not in the source's configuration)",
            job.channel
        )),
        Some(ch) => run_channel(&app, &job, ch, &cancel_rx).await,
    };
    let (state, error, summary, rows) = match ran {
        Ok(done) => done,
        Err(why) => (
            JobState::Failed,
            Some(why),
            String::new(),
            app.store.targets(&job.id).await.unwrap_or_default(),
        ),
    };
    keeper.abort();
    app.running.lock().expect("running lock").remove(&id);
    finish(&app, &job, state, error, summary, rows).await;
}

/// Runs a job's targets on its channel: its outcome, error, summary and target rows, or
/// why it could not start.
async fn run_channel(
    app: &Arc<App>,
    job: &JobRow,
    ch: &ChannelConfig,
    cancel: &watch::Receiver<bool>,
) -> Result<(JobState, Option<String>, String, Vec<TargetRow>), String> {
    check_source(ch).await?;
    let coord = coordinator(app, job, ch).await?;
    let futs = ch.targets.iter().map(|t| {
        run_target(app, job, ch, t, cancel.clone(), coord.as_ref())
            .instrument(tracing::info_span!("target", job = %job.id, target = %t.name, url = %t.url, site = %t.site))
    });
    let decided = async {
        if let Some(c) = coord.as_ref().filter(|c| !c.decided_before()) {
            decide(app, job, ch, c).await;
        }
    };
    let (outcomes, ()) = tokio::join!(futures::future::join_all(futs), decided);
    let rows = app.store.targets(&job.id).await.unwrap_or_default();
    let dry_run = job.options().dry_run;
    let (state, error, mut summary) = aggregate(ch, &outcomes, &rows, *cancel.borrow(), dry_run);
    if let Some(c) = &coord {
        summary = published(c, state, summary);
    }
    Ok((state, error, summary, rows))
}

/// The vote of an atomic job's targets (none for a job published in place or a dry
/// run), with the decision a run of this job recorded before a restart.
async fn coordinator(
    app: &Arc<App>,
    job: &JobRow,
    ch: &ChannelConfig,
) -> Result<Option<Coordinator>, String> {
    let opts = job.options();
    if ch.publish != Publish::Atomic || opts.dry_run {
        if opts.rollback {
            return Err(format!(
                "channel {:?} publishes in place: nothing to roll back",
                ch.name
            ));
        }
        return Ok(None);
    }
    let recorded = match app.store.decision(&job.id).await {
        Ok(d) => d,
        Err(e) => {
            // Not knowing is not deciding: the targets prepare again and the job decides.
            tracing::warn!(job = %job.id, error = %e, "cannot read the job's publish decision");
            None
        }
    };
    if let Some(n) = recorded {
        tracing::info!(job = %job.id, generation = n, "resuming after the decision to switch");
    }
    let c = Coordinator::new(ch.targets.len(), recorded);
    if !opts.rollback {
        return Ok(Some(c));
    }
    let to = match (recorded, opts.rollback_to) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => crate::generations::previous(&crate::generations::list_all(ch).await)
            .map_err(|why| format!("nothing to roll back to: {why}"))?,
    };
    Ok(Some(c.rollback(to)))
}

/// Decides an atomic job once every target voted: switch (recorded before any target
/// is told) when all prepared, else no target switches.
async fn decide(app: &Arc<App>, job: &JobRow, ch: &ChannelConfig, c: &Coordinator) {
    let tally = c.tally().await;
    let d = if tally.unchanged && c.rollback_to().is_none() {
        Decision::Keep
    } else if tally.refused.is_empty() {
        #[cfg(feature = "failpoints")]
        crate::failpoints::kill_at("prepared");
        let recorded = match c.rollback_to() {
            Some(to) => app.store.record_rollback(&job.id, &ch.name, to).await,
            None => {
                app.store
                    .decide_switch(&job.id, &ch.name, tally.max_generation)
                    .await
            }
        };
        match recorded {
            Ok(n) => Decision::Switch(n),
            Err(e) => Decision::Abort(format!("cannot record the decision to switch: {e}")),
        }
    } else {
        Decision::Abort(tally.refused.join("; "))
    };
    #[cfg(feature = "failpoints")]
    crate::failpoints::kill_at("decided");
    let data = match &d {
        Decision::Switch(n) => json!({"switch": true, "generation": n}),
        Decision::Keep => json!({"switch": false, "unchanged": true}),
        Decision::Abort(why) => json!({"switch": false, "error": why}),
    };
    app.bus.emit(&job.id, "publish_decided", "", data).await;
    c.decide(d);
}

/// An atomic job's summary: the generation its targets serve now (a rollback's says
/// where it went back to, not what it mirrored).
fn published(c: &Coordinator, state: JobState, summary: String) -> String {
    let switched = matches!(state, JobState::Succeeded | JobState::CompletedWithErrors);
    match (c.rollback_to(), c.decided()) {
        (Some(n), _) if switched => format!("rolled back to generation {n}"),
        (Some(n), _) => format!("not rolled back to generation {n}"),
        (None, Some(Decision::Switch(n))) if switched => format!("{summary}; generation {n} live"),
        (None, Some(Decision::Keep)) => format!("{summary}; nothing changed, no new generation"),
        (None, _) => format!("{summary}; not switched, the previous generation is live"),
    }
}

/// A directory channel's source must exist and hold something, unless the channel
/// allows it to be empty: an empty directory is more often a failed mount than a site,
/// and mirroring it with `delete = true` would empty every target.
async fn check_source(ch: &ChannelConfig) -> Result<(), String> {
    if ch.pages.is_some() || ch.allow_empty_source {
        return Ok(());
    }
    let root = ch.source.display();
    let mut dir = tokio::fs::read_dir(&ch.source).await.map_err(|e| {
        format!("cannot read the source directory {root}: {e}; nothing was sent or deleted")
    })?;
    match dir.next_entry().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!(
            "the source directory {root} is empty (a mount that failed?); nothing was sent or deleted. \
             Set allow_empty_source = true on the channel if it is meant to be empty"
        )),
        Err(e) => Err(format!("cannot read the source directory {root}: {e}")),
    }
}

/// Renews the job's lease and polls for a cancel (which may arrive through another
/// instance) until aborted; a lost lease stops the job here.
fn spawn_keeper(
    app: Arc<App>,
    id: String,
    cancel_tx: watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
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
}

/// Records the job's outcome, counts it and tells the watchers (with its target rows,
/// as read once the targets were done).
async fn finish(
    app: &Arc<App>,
    job: &JobRow,
    state: JobState,
    error: Option<String>,
    summary: String,
    targets: Vec<TargetRow>,
) {
    let id = job.id.as_str();
    // A job whose lease was taken over is finished by its new owner.
    if let Ok(j) = app.store.get_job(id).await
        && j.lease_owner.as_deref() != Some(app.instance_id.as_str())
        && j.state() == JobState::Running
    {
        return;
    }
    if let Err(e) = app
        .store
        .finish_job(id, state, error.as_deref(), &summary)
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
    app.bus
        .emit(id, "finished", "", json!({"state": state.as_str(), "error": error, "summary": summary, "targets": targets}))
        .await;
    let why = error.as_deref().unwrap_or("");
    match state {
        JobState::Failed => {
            tracing::error!(job = %id, state = state.as_str(), error = why, %summary, "job failed")
        }
        JobState::Succeeded => {
            tracing::info!(job = %id, state = state.as_str(), %summary, "job finished")
        }
        _ => {
            tracing::warn!(job = %id, state = state.as_str(), error = why, %summary, "job finished")
        }
    }
}

fn aggregate(
    ch: &ChannelConfig,
    outcomes: &[TargetOutcome],
    rows: &[TargetRow],
    cancelled: bool,
    dry_run: bool,
) -> (JobState, Option<String>, String) {
    let summary = summary(ch, outcomes, rows, dry_run);
    let errors: u64 = outcomes.iter().map(|o| o.item_errors).sum();
    let failed: Vec<String> = ch
        .targets
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| o.state == TargetState::Failed)
        .map(|(t, o)| format!("{}: {}", t.name, o.error.clone().unwrap_or_default()))
        .collect();
    if cancelled && outcomes.iter().any(|o| o.state == TargetState::Cancelled) {
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

/// What the job did, from the stored target rows: the counters `show` and the dashboard
/// print too (a dry run: what the plans would do). One line when every target got the
/// same, else one part per target.
fn summary(
    ch: &ChannelConfig,
    outcomes: &[TargetOutcome],
    rows: &[TargetRow],
    dry_run: bool,
) -> String {
    let counts: Vec<(u64, u64, u64)> = ch
        .targets
        .iter()
        .zip(outcomes)
        .map(|(t, o)| {
            if dry_run {
                return (o.items, o.bytes, o.deletes);
            }
            let n = |v: i64| v.max(0) as u64;
            rows.iter()
                .find(|r| r.target == t.name)
                .map_or((0, 0, 0), |r| {
                    (n(r.items_done), n(r.bytes_done), n(r.deletes_done))
                })
        })
        .collect();
    let errors: u64 = outcomes.iter().map(|o| o.item_errors).sum();
    let verb = if dry_run { "would mirror" } else { "mirrored" };
    let n = counts.len();
    let what = |(i, b, d): (u64, u64, u64)| {
        format!("{i} items ({}) and {d} deletes", bytesize::ByteSize(b))
    };
    let body = match counts.first() {
        Some(first) if counts.iter().all(|c| c == first) => {
            let each = if n > 1 { " each" } else { "" };
            format!("{verb} {} to {n} target(s){each}", what(*first))
        }
        _ => {
            let parts: Vec<String> = ch
                .targets
                .iter()
                .zip(&counts)
                .map(|(t, c)| format!("{}: {}", t.name, what(*c)))
                .collect();
            format!("{verb} to {n} targets: {}", parts.join("; "))
        }
    };
    format!("{body}; {errors} item error(s)")
}
