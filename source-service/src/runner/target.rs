//! One target of a job, phase by phase: connect (open the session), plan, send (streams
//! with reconnects, rewinds and waits for space), commit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tracing::Instrument;

use cms_mirror::config::{ChannelConfig, MaxDelete, TargetConfig};
use cms_mirror::jobstore::{JobOptions, JobRow, Sent, TargetRow, TargetState};
use cms_mirror::pb;
use cms_mirror::pb::target_service_client::TargetServiceClient;
use cms_mirror::security::AuthChannel;

use super::publish::{Coordinator, Decision, Prepared};
use super::remote_plan::{EarlyManifest, make_plan};
use super::retry::{GaveUp, backoff, retryable, retrying, wait_unless_cancelled, within};
use super::stream::{StreamEnd, stream_once};
use super::{current_row, logged, status_text, target_label, traced};
use crate::App;
use crate::metrics::Metrics;
use crate::plan::{self, PlanError};

/// What became of one target of a job.
#[derive(Debug)]
pub(super) struct TargetOutcome {
    pub(super) state: TargetState,
    pub(super) items: u64,
    pub(super) bytes: u64,
    pub(super) deletes: u64,
    pub(super) item_errors: u64,
    pub(super) error: Option<String>,
}

impl TargetOutcome {
    fn from_row(state: TargetState, r: &TargetRow) -> TargetOutcome {
        TargetOutcome {
            state,
            items: r.items_done as u64,
            bytes: r.bytes_done as u64,
            deletes: r.deletes_done as u64,
            item_errors: r.item_errors as u64,
            error: None,
        }
    }
}

/// Why a target's run stopped before its outcome was decided.
enum Stop {
    /// The target failed: the message, and the item errors counted so far.
    Failed(String, u64),
    Cancelled,
    /// The target no longer takes packages in the session (expired, aborted or
    /// committed): open it again to learn why.
    SessionClosed(String),
}

/// Runs one target of a job to its outcome.
pub(super) async fn run_target(
    app: &Arc<App>,
    job: &JobRow,
    ch: &ChannelConfig,
    t: &TargetConfig,
    cancel: watch::Receiver<bool>,
    coord: Option<&Coordinator>,
) -> TargetOutcome {
    let ran = match TargetRun::new(app, job, ch, t, cancel, coord).await {
        Ok(mut run) => run.run().await,
        Err(msg) => Err(Stop::Failed(msg, 0)),
    };
    if let (Some(c), Err(stop)) = (coord, &ran) {
        // A target that stopped before it prepared votes against the switch (a vote
        // it cast already stands).
        let why = match stop {
            Stop::Failed(m, _) | Stop::SessionClosed(m) => m.clone(),
            Stop::Cancelled => format!("{}: cancelled", target_label(t)),
        };
        c.vote(&t.name, Err(why));
    }
    match ran {
        Ok(outcome) => outcome,
        Err(Stop::Failed(msg, errors)) => fail(app, &job.id, &t.name, msg, errors).await,
        Err(Stop::SessionClosed(msg)) => fail(app, &job.id, &t.name, msg, 0).await,
        Err(Stop::Cancelled) => {
            let state = TargetState::Cancelled;
            logged(
                app.store
                    .set_target_state(&job.id, &t.name, state, None)
                    .await,
                &job.id,
                "target state",
            );
            TargetOutcome {
                state,
                items: 0,
                bytes: 0,
                deletes: 0,
                item_errors: 0,
                error: Some("cancelled".into()),
            }
        }
    }
}

async fn fail(app: &Arc<App>, jid: &str, tname: &str, msg: String, errors: u64) -> TargetOutcome {
    let state = TargetState::Failed;
    logged(
        app.store
            .set_target_state(jid, tname, state, Some(&msg))
            .await,
        jid,
        "target state",
    );
    tracing::warn!(job = jid, target = tname, error = %msg, "target failed");
    app.bus
        .emit(jid, "target_failed", tname, json!({"error": msg}))
        .await;
    TargetOutcome {
        state,
        items: 0,
        bytes: 0,
        deletes: 0,
        item_errors: errors,
        error: Some(msg),
    }
}

/// One target of a running job.
struct TargetRun<'a> {
    app: &'a Arc<App>,
    jid: &'a str,
    ch: &'a ChannelConfig,
    t: &'a TargetConfig,
    opts: JobOptions,
    client: TargetServiceClient<AuthChannel>,
    cancel: watch::Receiver<bool>,
    /// The vote of an atomic job's targets.
    coord: Option<&'a Coordinator>,
    /// The manifest asked for beside the session's opening.
    early_manifest: Option<EarlyManifest>,
}

impl<'a> TargetRun<'a> {
    async fn new(
        app: &'a Arc<App>,
        job: &'a JobRow,
        ch: &'a ChannelConfig,
        t: &'a TargetConfig,
        cancel: watch::Receiver<bool>,
        coord: Option<&'a Coordinator>,
    ) -> Result<TargetRun<'a>, String> {
        let jid = job.id.as_str();
        let state = TargetState::Connecting;
        logged(
            app.store.set_target_state(jid, &t.name, state, None).await,
            jid,
            "target state",
        );
        // Token and TLS files are read for every job, so rotating them needs no restart.
        let channel = t
            .auth
            .channel(&t.url)
            .map_err(|e| format!("{}: {e}", target_label(t)))?;
        let client = TargetServiceClient::new(channel)
            .max_decoding_message_size(cms_mirror::transport::MAX_MESSAGE)
            .max_encoding_message_size(cms_mirror::transport::MAX_MESSAGE);
        Ok(TargetRun {
            app,
            jid,
            ch,
            t,
            opts: job.options(),
            client,
            cancel,
            coord,
            early_manifest: None,
        })
    }

    fn tname(&self) -> &'a str {
        self.t.name.as_str()
    }

    async fn set_state(&self, state: TargetState) {
        let r = self
            .app
            .store
            .set_target_state(self.jid, self.tname(), state, None)
            .await;
        logged(r, self.jid, "target state");
    }

    async fn emit(&self, kind: &str, data: serde_json::Value) {
        self.app.bus.emit(self.jid, kind, self.tname(), data).await;
    }

    async fn run(&mut self) -> Result<TargetOutcome, Stop> {
        if self.opts.dry_run {
            let totals = self.plan(0, false).await?;
            self.set_state(TargetState::Planned).await;
            return Ok(TargetOutcome {
                state: TargetState::Planned,
                items: totals.items(),
                bytes: totals.bytes,
                deletes: totals.deletes,
                item_errors: 0,
                error: None,
            });
        }
        // In place only: an atomic session's opening may build the work area the
        // manifest is read from.
        if self.coord.is_none() {
            self.early_manifest = Some(EarlyManifest::start(&self.client, self.ch, self.t));
        }
        let mut session = self.connect().await?;
        if self.coord.is_some_and(|c| c.rollback_to().is_some()) {
            return self.roll_back(&session).await;
        }
        // A session the target expired while this job was away is opened again from
        // package 1: the job plans again against what the target holds now. Bounded, so
        // that a target expiring sessions faster than they are sent ends the job.
        let mut reopened = 0;
        loop {
            match self.run_session(&session).await {
                Err(Stop::SessionClosed(why)) => {
                    reopened += 1;
                    if reopened <= 3 {
                        session = self.connect().await?;
                        if session.expired || session.committed {
                            continue;
                        }
                    }
                    return Err(Stop::Failed(format!("{}: {why}", target_label(self.t)), 0));
                }
                end => return end,
            }
        }
    }

    /// A rollback's session: nothing to plan or send; both phases of its commit.
    async fn roll_back(
        &mut self,
        session: &pb::OpenSessionResponse,
    ) -> Result<TargetOutcome, Stop> {
        if session.committed {
            return Ok(self.committed_before().await);
        }
        self.commit(&session.session_id, session.last_applied_seq)
            .await
    }

    /// The outcome of a session the target had committed before (a resumed job).
    async fn committed_before(&self) -> TargetOutcome {
        if let Some(c) = self.coord {
            // Switched before a restart of this source: it voted then.
            c.vote(self.tname(), Ok(Prepared::default()));
        }
        self.set_state(TargetState::Committed).await;
        let r = current_row(self.app, self.jid, self.tname()).await;
        TargetOutcome::from_row(TargetState::Committed, &r)
    }

    /// Plans (or takes the stored plan), sends and commits one opened session.
    async fn run_session(
        &mut self,
        session: &pb::OpenSessionResponse,
    ) -> Result<TargetOutcome, Stop> {
        if session.expired {
            tracing::warn!(
                job = self.jid,
                target = self.tname(),
                "the target expired this job's session (idle past its session expiry); planning again"
            );
            self.emit("session_expired", json!({"site": self.t.site}))
                .await;
        }
        let totals = self.plan(session.last_applied_seq, session.expired).await;
        if let Err(Stop::Cancelled) = totals {
            // Cancelled while the plan waited to retry: the open session ends too.
            self.abort_session(&session.session_id).await;
            return Err(Stop::Cancelled);
        }
        totals?;
        if session.committed {
            return Ok(self.committed_before().await);
        }
        if session.prepared {
            // Everything was sent and the generation prepared before a restart: prepare
            // again (the same answer) and wait for the decision.
            return self
                .commit(&session.session_id, session.last_applied_seq)
                .await;
        }
        self.set_state(TargetState::Sending).await;
        let last_seq = self.send(&session.session_id).await?;
        self.commit(&session.session_id, last_seq).await
    }

    /// Opens (or re-opens, to resume) the session, retrying within the budget.
    async fn connect(&mut self) -> Result<pb::OpenSessionResponse, Stop> {
        let req = pb::OpenSessionRequest {
            job_id: self.jid.to_string(),
            site: self.t.site.clone(),
            lineage: self.opts.lineage.clone(),
            source_id: self.app.instance_id.clone(),
            channel: self.ch.name.clone(),
            protocol_version: cms_mirror::PROTOCOL_VERSION,
            dry_run: false,
            atomic: self.coord.is_some(),
            rollback_to: self.coord.and_then(|c| c.rollback_to()),
        };
        let (app, jid, tname, ack_timeout) =
            (self.app, self.jid, self.tname(), self.ch.ack_timeout);
        let client = &self.client;
        let retried = std::sync::atomic::AtomicBool::new(false);
        let opened = retrying(
            self.ch.retry_budget,
            &mut self.cancel,
            || {
                let (mut client, req) = (client.clone(), req.clone());
                Box::pin(async move { within(ack_timeout, client.open_session(traced(req))).await })
            },
            retryable,
            |attempt, s: &tonic::Status| {
                retried.store(true, std::sync::atomic::Ordering::Relaxed);
                let data = json!({"attempt": attempt, "error": s.message()});
                Box::pin(async move {
                    app.bus.emit(jid, "reconnecting", tname, data).await;
                })
            },
        )
        .await;
        if retried.into_inner() {
            // Read before a wait of unknown length: the plan asks again.
            self.early_manifest = None;
        }
        let s = match opened {
            Ok(r) => r.into_inner(),
            Err(GaveUp::Cancelled) => return Err(Stop::Cancelled),
            Err(GaveUp::Failed(s)) => {
                let how = match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => "is unreachable",
                    _ => "refused the session",
                };
                let msg = format!("{} {how}: {}", target_label(self.t), status_text(&s));
                return Err(Stop::Failed(msg, 0));
            }
        };
        if s.protocol_version < cms_mirror::PROTOCOL_VERSION {
            // Targets before version 2 do not answer a version at all.
            let theirs = match s.protocol_version {
                0 => "a protocol older than version 2".to_string(),
                v => format!("protocol version {v}"),
            };
            let msg = format!(
                "{} speaks {theirs}, this source needs version {}; upgrade the target",
                target_label(self.t),
                cms_mirror::PROTOCOL_VERSION
            );
            return Err(Stop::Failed(msg, 0));
        }
        let data =
            json!({"url": self.t.url, "site": self.t.site, "last_applied_seq": s.last_applied_seq});
        self.emit("target_connected", data).await;
        Ok(s)
    }

    /// Plans, unless a stored plan of this job exists (resume) and the target kept its
    /// session (not `expired`); checks `max_delete` and announces the totals.
    /// `resume_seq` is the last package the target applied.
    async fn plan(&mut self, resume_seq: u64, expired: bool) -> Result<plan::Totals, Stop> {
        let plan_dir = self.app.plan_dir(self.jid, self.tname());
        let row = self
            .app
            .store
            .targets(self.jid)
            .await
            .ok()
            .and_then(|v| v.into_iter().find(|r| r.target == self.tname()));
        let planned_before = row.as_ref().is_some_and(|r| r.planned == 1);
        let stored = plan::load_totals(&plan_dir).filter(|_| planned_before && !expired);
        if let Some(totals) = stored {
            self.early_manifest = None;
            self.check_max_delete(&totals)?;
            return Ok(totals);
        }
        self.set_state(TargetState::Planning).await;
        let totals = self.make_plan(&plan_dir).await?;
        self.check_max_delete(&totals)?;
        // Planned before, but the plan is not here (another instance ran this job, or the
        // data directory was lost) or no longer fits the target's session (expired): the
        // new plan holds only what is left.
        let replanned = row.filter(|_| planned_before);
        self.store_totals(&totals, resume_seq as i64, replanned.as_ref())
            .await?;
        Ok(totals)
    }

    async fn make_plan(&mut self, plan_dir: &std::path::Path) -> Result<plan::Totals, Stop> {
        let (app, jid, tname) = (self.app, self.jid, self.tname());
        let (ch, t, opts) = (self.ch, self.t, &self.opts);
        let client = &self.client;
        // The first attempt reads the manifest asked for early, if any; a retry asks again.
        let mut early = self.early_manifest.take();
        let planned = retrying(
            ch.retry_budget,
            &mut self.cancel,
            || {
                let (client, early) = (client.clone(), early.take());
                let span = tracing::info_span!("plan", job = %jid, target = %tname);
                Box::pin(
                    async move { make_plan(app, &client, ch, t, opts, plan_dir, jid, early).await }
                        .instrument(span),
                )
            },
            |e| matches!(e, PlanError::ManifestBroke(_)),
            |attempt, e: &PlanError| {
                let data = json!({"attempt": attempt, "error": e.to_string()});
                Box::pin(async move {
                    app.bus.emit(jid, "reconnecting", tname, data).await;
                })
            },
        )
        .await;
        match planned {
            Ok(totals) => Ok(totals),
            Err(GaveUp::Cancelled) => Err(Stop::Cancelled),
            Err(GaveUp::Failed(e)) => Err(Stop::Failed(e.to_string(), 0)),
        }
    }

    /// The job's own `max_delete` (`mirrorctl start --max-delete`), else the channel's.
    fn check_max_delete(&self, totals: &plan::Totals) -> Result<(), Stop> {
        let once = self.opts.max_delete.as_deref();
        let max = once
            .and_then(|m| MaxDelete::parse(m).ok())
            .unwrap_or(self.ch.max_delete);
        let limit = max.limit(totals.target_items);
        if totals.deletes <= limit {
            return Ok(());
        }
        let whose = if once.is_some() {
            "this job's"
        } else {
            "the channel's"
        };
        Err(Stop::Failed(
            format!(
                "max_delete exceeded: the plan deletes {} of {} items on {}, {whose} limit is {limit}; nothing was sent or deleted. \
                 If the source is right, run once with `mirrorctl start {} --max-delete {}` or raise the channel's max_delete",
                totals.deletes,
                totals.target_items,
                target_label(self.t),
                self.ch.name,
                totals.deletes,
            ),
            0,
        ))
    }

    /// Stores a new plan's totals (added to what an earlier plan of this job already
    /// did) and announces them.
    async fn store_totals(
        &self,
        totals: &plan::Totals,
        seq: i64,
        replanned: Option<&TargetRow>,
    ) -> Result<(), Stop> {
        let store = &self.app.store;
        let (jid, tname) = (self.jid, self.tname());
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
            return Err(Stop::Failed(
                format!("cannot store the plan totals: {e}"),
                0,
            ));
        }
        let (items_done, bytes_done, deletes_done) = replanned
            .map(|r| (r.items_done, r.bytes_done, r.deletes_done))
            .unwrap_or_default();
        self.emit(
            "planned",
            json!({
                "items_total": items + items_done, "bytes_total": bytes + bytes_done,
                "deletes_total": deletes + deletes_done,
                "creates": totals.creates, "updates": totals.updates, "unchanged": totals.unchanged,
                "delta_files": totals.delta_files, "delta_bytes": totals.delta_bytes,
                "replanned": replanned.is_some(),
            }),
        )
        .await;
        Ok(())
    }

    /// Streams the plan until every package is acknowledged; returns the last package.
    async fn send(&mut self, session_id: &str) -> Result<u64, Stop> {
        let plan_dir = self.app.plan_dir(self.jid, self.tname());
        let mut attempts: HashMap<u64, u32> = HashMap::new();
        // Files whose delta found the target's version changed: sent whole from then on.
        let mut whole: HashSet<String> = HashSet::new();
        let mut failures = 0u32;
        let mut space_waits = 0u32;
        let (jid, tname) = (self.jid, self.tname());
        loop {
            let span = tracing::info_span!("package_batch", job = %jid, target = %tname);
            let end = stream_once(
                self.app,
                &mut self.client,
                self.jid,
                self.ch,
                self.t,
                session_id,
                &plan_dir,
                &mut self.cancel,
                &mut attempts,
                &mut whole,
            )
            .instrument(span)
            .await;
            match end {
                StreamEnd::Done { last_seq } => return Ok(last_seq),
                StreamEnd::Cancelled => {
                    self.abort_session(session_id).await;
                    return Err(Stop::Cancelled);
                }
                StreamEnd::Fatal(msg) => {
                    // The session ends here: the target drops what it staged.
                    self.abort_session(session_id).await;
                    let errs = current_row(self.app, self.jid, self.tname())
                        .await
                        .item_errors;
                    return Err(Stop::Failed(
                        format!("{}: {msg}", target_label(self.t)),
                        errs as u64,
                    ));
                }
                StreamEnd::SessionClosed(why) => return Err(Stop::SessionClosed(why)),
                StreamEnd::Rewind(why) => self.emit("rewind", json!({"reason": why})).await,
                StreamEnd::WaitForSpace(why) => {
                    space_waits += 1;
                    self.wait_for_space(space_waits, why).await?;
                }
                StreamEnd::Disconnected(why, progressed) => {
                    // The budget bounds consecutive failures: a stream that made progress
                    // starts the count again.
                    failures = if progressed { 1 } else { failures + 1 };
                    self.reconnect(failures, why).await?;
                }
            }
        }
    }

    /// Waits (with a growing pause, up to 30 s) before a package the target had no
    /// room for is sent again.
    async fn wait_for_space(&mut self, waits: u32, why: String) -> Result<(), Stop> {
        let wait = Duration::from_secs((1u64 << waits.min(5)).min(30));
        if waits == 1 {
            self.set_state(TargetState::WaitingForSpace).await;
        }
        let data = json!({"reason": why, "retry_in_ms": wait.as_millis() as u64});
        self.emit("waiting_for_space", data).await;
        if !wait_unless_cancelled(wait, &mut self.cancel).await {
            return Err(Stop::Cancelled);
        }
        Ok(())
    }

    /// Counts a broken stream and waits before the next, or gives the target up past
    /// the retry budget.
    async fn reconnect(&mut self, failures: u32, why: String) -> Result<(), Stop> {
        let (jid, tname) = (self.jid, self.tname());
        logged(
            self.app
                .store
                .add_sent(
                    jid,
                    tname,
                    &Sent {
                        reconnects: 1,
                        ..Sent::default()
                    },
                )
                .await,
            jid,
            "reconnect count",
        );
        self.app
            .metrics
            .reconnects
            .get_or_create(&Metrics::target(&self.ch.name, tname))
            .inc();
        if failures > self.ch.retry_budget {
            let errs = current_row(self.app, jid, tname).await.item_errors as u64;
            let msg = format!(
                "{} unreachable after {failures} attempts: {why}",
                target_label(self.t)
            );
            return Err(Stop::Failed(msg, errs));
        }
        self.emit(
            "target_disconnected",
            json!({"error": why, "attempt": failures}),
        )
        .await;
        if !wait_unless_cancelled(backoff(failures), &mut self.cancel).await {
            return Err(Stop::Cancelled);
        }
        self.emit("reconnecting", json!({"attempt": failures}))
            .await;
        Ok(())
    }

    /// Sends one Commit, retried within the budget even if the job is cancelled
    /// meanwhile (all content has landed: the target's session must not stay open).
    async fn send_commit(
        &mut self,
        req: pb::CommitRequest,
        what: &str,
    ) -> Result<pb::CommitResponse, Stop> {
        let client = &self.client;
        let (_keep, mut not_cancelled) = watch::channel(false);
        let committed = retrying(
            self.ch.retry_budget,
            &mut not_cancelled,
            || {
                let (mut client, req) = (client.clone(), req.clone());
                Box::pin(async move { client.commit(traced(req)).await })
            },
            retryable,
            |_, _| Box::pin(async {}),
        )
        .await;
        match committed {
            Ok(r) => Ok(r.into_inner()),
            Err(GaveUp::Cancelled) => Err(Stop::Cancelled),
            Err(GaveUp::Failed(s)) => {
                let msg = format!(
                    "{}: {what} failed: {}",
                    target_label(self.t),
                    status_text(&s)
                );
                let row = current_row(self.app, self.jid, self.tname()).await;
                Err(Stop::Failed(msg, row.item_errors as u64))
            }
        }
    }

    /// An atomic commit's two phases on this target: prepare and vote, then do what the
    /// job decided. The switch's answer, or why the target did not switch.
    async fn prepare_and_switch(
        &mut self,
        c: &Coordinator,
        req: pb::CommitRequest,
    ) -> Result<pb::CommitResponse, Stop> {
        let session_id = req.session_id.clone();
        if !c.decided_before() {
            let prepare = pb::CommitRequest {
                phase: pb::CommitPhase::Prepare as i32,
                ..req.clone()
            };
            // A prepare that fails ends this run, which votes against the switch.
            let r = self.send_commit(prepare, "prepare").await?;
            self.record_commit_errors(&r.item_errors).await;
            self.emit(
                "prepared",
                json!({"last_generation": r.last_generation, "unchanged": r.unchanged}),
            )
            .await;
            c.vote(
                self.tname(),
                Ok(Prepared {
                    last_generation: r.last_generation,
                    unchanged: r.unchanged,
                }),
            );
        }
        match c.decision().await {
            Decision::Switch(generation) => {
                let switch = pb::CommitRequest {
                    phase: pb::CommitPhase::Switch as i32,
                    generation,
                    keep_generations: self.ch.keep_generations,
                    ..req
                };
                let r = self.send_commit(switch, "switch").await.map_err(|e| match e {
                    Stop::Failed(m, n) => Stop::Failed(
                        format!("{m} (the decision stands: this target switches to generation {generation} when the job runs again)"),
                        n,
                    ),
                    other => other,
                })?;
                self.emit("switched", json!({"generation": r.generation}))
                    .await;
                Ok(r)
            }
            Decision::Keep => {
                // The work area equals the live tree: it stays for the next job.
                self.abort_session(&session_id).await;
                Ok(pb::CommitResponse::default())
            }
            Decision::Abort(why) => {
                self.abort_session(&session_id).await;
                let row = current_row(self.app, self.jid, self.tname()).await;
                Err(Stop::Failed(
                    format!(
                        "{}: not switched, the previous generation is still served: {why}",
                        target_label(self.t)
                    ),
                    row.item_errors as u64,
                ))
            }
        }
    }

    /// Commits the session (directory times, hooks; for an atomic job both phases) and
    /// decides the outcome.
    async fn commit(&mut self, session_id: &str, last_seq: u64) -> Result<TargetOutcome, Stop> {
        let req = pb::CommitRequest {
            session_id: session_id.to_string(),
            last_seq,
            run_hooks: true,
            abort: false,
            root: root_meta(&self.ch.source),
            source_id: self.app.instance_id.clone(),
            ..Default::default()
        };
        let r = match self.coord {
            Some(c) => self.prepare_and_switch(c, req).await?,
            None => {
                let r = self.send_commit(req, "commit").await?;
                self.record_commit_errors(&r.item_errors).await;
                r
            }
        };
        // The content is in place whatever the hooks did: the last success counts it.
        let content_ok = current_row(self.app, self.jid, self.tname())
            .await
            .item_errors
            == 0;
        self.record_hooks(&r.hooks).await;
        let row = current_row(self.app, self.jid, self.tname()).await;
        let state = if row.item_errors > 0 {
            TargetState::CompletedWithErrors
        } else {
            TargetState::Committed
        };
        self.set_state(state).await;
        if content_ok {
            let r = self
                .app
                .store
                .record_success(&self.ch.name, self.tname(), self.jid, cms_mirror::now_ms())
                .await;
            logged(r, self.jid, "the last success");
        }
        self.emit("committed", json!({"created": r.items_created, "updated": r.items_updated, "deleted": r.items_deleted}))
            .await;
        Ok(TargetOutcome::from_row(TargetState::Committed, &row))
    }

    /// Records the problems the target found once the session was complete (pages
    /// with broken links, missing parents, colliding URLs) as the job's item errors.
    async fn record_commit_errors(&self, errors: &[pb::ItemError]) {
        if errors.is_empty() {
            return;
        }
        let errs: Vec<cms_mirror::jobstore::NewItemError> = errors
            .iter()
            .map(|e| cms_mirror::jobstore::NewItemError {
                path: e.path.clone(),
                code: e.code.clone(),
                message: e.message.clone(),
                retryable: e.retryable,
            })
            .collect();
        self.add_item_errors(&errs, "commit item errors").await;
    }

    /// Item errors found after the packages (at the commit): recorded, announced and
    /// added to the target's count.
    async fn add_item_errors(&self, errs: &[cms_mirror::jobstore::NewItemError], what: &str) {
        super::record_item_errors(self.app, self.jid, &self.ch.name, self.tname(), errs).await;
        let counted = self
            .app
            .store
            .count_item_errors(self.jid, self.tname(), errs.len() as i64)
            .await;
        logged(counted, self.jid, what);
    }

    /// Announces each hook's result; a failed hook is an item error of the job (it ends
    /// `completed_with_errors`, and `show`, the dashboard and the metrics say which).
    async fn record_hooks(&self, hooks: &[pb::HookResult]) {
        let mut failed = Vec::new();
        for h in hooks {
            self.emit("hook_result", json!({"hook": h.hook, "ok": h.ok, "status": h.status, "error": h.error, "attempts": h.attempts, "duration_ms": h.duration_ms})).await;
            if !h.ok {
                failed.push(cms_mirror::jobstore::NewItemError {
                    path: h.hook.clone(),
                    code: cms_mirror::model::ErrorCode::HookFailed
                        .as_str()
                        .to_string(),
                    message: format!("hook failed after {} attempt(s): {}", h.attempts, h.error),
                    retryable: true,
                });
            }
        }
        if failed.is_empty() {
            return;
        }
        self.app
            .metrics
            .hook_failures
            .get_or_create(&crate::metrics::Metrics::target(
                &self.ch.name,
                self.tname(),
            ))
            .inc_by(failed.len() as u64);
        self.add_item_errors(&failed, "hook failures").await;
    }

    /// Tells the target to drop a session's staged files (best effort, bounded).
    async fn abort_session(&mut self, session_id: &str) {
        let req = pb::CommitRequest {
            session_id: session_id.to_string(),
            abort: true,
            ..Default::default()
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.commit(req)).await;
    }
}

/// The source root's mode and mtime, for the target's site root; `None` when it cannot
/// be read (the site root is then left as it is).
fn root_meta(root: &std::path::Path) -> Option<pb::ItemMeta> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(root).ok()?;
    Some(pb::ItemMeta {
        kind: pb::ItemKind::Directory as i32,
        mode: md.mode() & 0o7777,
        mtime_ns: cms_mirror::fswalk::mtime_ns(&md),
        ..Default::default()
    })
}
