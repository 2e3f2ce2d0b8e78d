//! One Import stream to a target: packages from the plan's checkpoint, a window of them
//! in flight, each ack checkpointed before it counts, deletes held until all content is
//! acknowledged; the stream ends done, or with a reason to rewind, reconnect, wait for
//! space or give the target up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use cms_mirror::config::{ChannelConfig, OnDiskFull, TargetConfig};
use cms_mirror::jobstore::{NewItemError, Progress, Sent, TargetState};
use cms_mirror::model::ErrorCode;
use cms_mirror::observe::TargetLabels;
use cms_mirror::pb::target_service_client::TargetServiceClient;
use cms_mirror::security::AuthChannel;
use cms_mirror::{package, pb};

use super::retry::retryable;
use super::{MAX_PACKAGE_ATTEMPTS, PROGRESS_EVERY, current_row, emit_progress, logged};
use super::{pb_item_error, record_item_errors, status_text, traced};
use crate::App;
use crate::bwlimit::{self, Pacer};
use crate::metrics::Metrics;
use crate::packer::{Basis, Built, Packer, Signatures};
use crate::plan::{Cursor, PhaseName};

/// Packages in flight and no answer for this long (or half the ack timeout, if less):
/// the target shows as `stalled` until it answers again.
const STALLED_AFTER: Duration = Duration::from_secs(5);
/// How long a cancelled stream waits for the acks of the packages in flight.
const CANCEL_DRAIN: Duration = Duration::from_secs(10);

/// Why a stream attempt ended.
pub(super) enum StreamEnd {
    Done {
        last_seq: u64,
    },
    Rewind(String),
    /// The target is out of space and the channel waits for it (`on_disk_full = "wait"`).
    WaitForSpace(String),
    /// The stream broke; `progressed` when packages were acknowledged on it.
    Disconnected(String, bool),
    Cancelled,
    /// The target refused the session (expired, aborted or committed).
    SessionClosed(String),
    Fatal(String),
}

/// A package sent and not yet acknowledged.
struct InFlight {
    seq: u64,
    cursor_after: Cursor,
    items: u64,
    bytes: u64,
    copied: u64,
    completed: Vec<(String, u64)>,
    deletes: u64,
    errors: Vec<NewItemError>,
}

impl InFlight {
    /// Bytes of the files completed in this package, leaving out the paths in `failed`.
    fn bytes_landed(&self, failed: &[&str]) -> u64 {
        self.completed
            .iter()
            .filter(|(p, _)| !failed.contains(&p.as_str()))
            .map(|(_, n)| n)
            .sum()
    }
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

/// One Import stream from the checkpoint until the plan is done or the stream ends.
#[allow(clippy::too_many_arguments)]
pub(super) async fn stream_once(
    app: &Arc<App>,
    client: &mut TargetServiceClient<AuthChannel>,
    jid: &str,
    ch: &ChannelConfig,
    t: &TargetConfig,
    session_id: &str,
    plan_dir: &Path,
    cancel: &mut watch::Receiver<bool>,
    attempts: &mut HashMap<u64, u32>,
    whole: &mut HashSet<String>,
) -> StreamEnd {
    let row = current_row(app, jid, &t.name).await;
    let cursor: Cursor = serde_json::from_str(&row.checkpoint_json).unwrap_or_default();
    let last_acked = row.checkpoint_seq as u64;
    let item_errors = row.item_errors as u64;
    if let Some(e) = too_many_errors(ch, item_errors) {
        return e;
    }
    let lbl = Metrics::target(&ch.name, &t.name);
    let pacers: Vec<Arc<Pacer>> = t
        .bwlimit
        .map(|r| app.pacers.for_target(&ch.name, &t.name, r))
        .into_iter()
        .chain(app.bwlimit.clone())
        .collect();
    let limit = pacers.iter().map(|p| p.rate()).min();
    if let Some(r) = limit {
        app.metrics.bwlimit.get_or_create(&lbl).set(r as i64);
    }
    let package_bytes = bwlimit::package_bytes(ch.package_bytes, limit);
    let packer = match packer_at(ch, plan_dir, &cursor, last_acked + 1, package_bytes) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let packer = match ch.delta_min_bytes {
        Some(_) => {
            let sigs = TargetSignatures::start(
                client,
                session_id,
                ch.ack_timeout,
                plan_dir,
                &cursor,
                whole,
            );
            packer.with_delta(Box::new(sigs), whole.clone())
        }
        None => packer,
    };
    let (brx, producer) = produce(packer);
    let window = bwlimit::window(ch.window, ch.package_bytes, package_bytes);
    let (otx, orx) = mpsc::channel::<pb::ImportRequest>(window + 2);
    let header = pb::ImportRequest {
        msg: Some(pb::import_request::Msg::Header(pb::ImportHeader {
            session_id: session_id.to_string(),
        })),
    };
    let _ = otx.send(header).await;
    let acks = match client.import(traced(ReceiverStream::new(orx))).await {
        Ok(r) => r.into_inner(),
        Err(s) if retryable(&s) => return StreamEnd::Disconnected(status_text(&s), false),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            return StreamEnd::SessionClosed(format!("import refused: {}", status_text(&s)));
        }
        Err(s) => return StreamEnd::Fatal(format!("import refused: {}", status_text(&s))),
    };
    if cursor != Cursor::default() || last_acked > 0 {
        app.bus
            .emit(jid, "resumed", &t.name, json!({"from_seq": last_acked + 1}))
            .await;
    }
    let mut s = Stream {
        app,
        jid,
        ch,
        tname: &t.name,
        lbl,
        otx,
        attempts,
        whole,
        pacers,
        limit,
        inflight: VecDeque::new(),
        window,
        unrecorded: Sent::default(),
        max_sent_seq: row.max_sent_seq as u64,
        held: None,
        packer_done: false,
        skip_deletes: false,
        last_acked,
        item_errors,
        acked_here: 0,
        bytes_this_stream: 0,
        started: Instant::now(),
        last_progress: Instant::now() - PROGRESS_EVERY,
    };
    let end = s.pump(brx, acks, cancel).await;
    producer.abort();
    s.finish(end).await
}

/// A packer for the channel's plan from `cursor`, numbering packages from `seq`.
fn packer_at(
    ch: &ChannelConfig,
    plan_dir: &Path,
    cursor: &Cursor,
    seq: u64,
    package_bytes: usize,
) -> Result<Packer, StreamEnd> {
    let mut phases = vec![PhaseName::Content, PhaseName::Last];
    if ch.delete {
        phases.push(PhaseName::Delete);
    }
    let source = ch.source.clone();
    match Packer::new(plan_dir, source, cursor, phases, seq, package_bytes) {
        Ok(p) => Ok(p.with_compression(ch.compression)),
        Err(e) => Err(StreamEnd::Fatal(format!(
            "cannot read the plan in {}: {e}",
            plan_dir.display()
        ))),
    }
}

/// Packs on a blocking thread, at most two packages ahead of the stream.
fn produce(
    packer: Packer,
) -> (
    mpsc::Receiver<std::io::Result<Built>>,
    tokio::task::JoinHandle<()>,
) {
    let (btx, brx) = mpsc::channel::<std::io::Result<Built>>(2);
    let producer = tokio::task::spawn_blocking(move || {
        let mut packer = packer;
        while let Some(b) = packer.next_package().transpose() {
            if btx.blocking_send(b).is_err() {
                return;
            }
        }
    });
    (brx, producer)
}

/// The state of one Import stream.
struct Stream<'a> {
    app: &'a Arc<App>,
    jid: &'a str,
    ch: &'a ChannelConfig,
    tname: &'a str,
    lbl: TargetLabels,
    otx: mpsc::Sender<pb::ImportRequest>,
    /// Sends per package that failed its checksum, across the streams of this target.
    attempts: &'a mut HashMap<u64, u32>,
    /// Files to send whole (their delta's basis changed), across the streams.
    whole: &'a mut HashSet<String>,
    /// The bandwidth limits a package waits for, and the lowest of them.
    pacers: Vec<Arc<Pacer>>,
    limit: Option<u64>,
    inflight: VecDeque<InFlight>,
    /// Packages allowed in flight ([`bwlimit::window`]).
    window: usize,
    /// Packages sent and not yet in the store: they go with the next checkpoint, or at
    /// the end of the stream.
    unrecorded: Sent,
    /// The highest package number ever sent to this target: one not above it is a
    /// package sent again.
    max_sent_seq: u64,
    /// A delete-phase package waiting until all content is acknowledged.
    held: Option<Built>,
    packer_done: bool,
    skip_deletes: bool,
    last_acked: u64,
    item_errors: u64,
    acked_here: u64,
    bytes_this_stream: u64,
    started: Instant,
    last_progress: Instant,
}

impl Stream<'_> {
    /// Sends packages and takes acks until the stream ends.
    async fn pump(
        &mut self,
        mut brx: mpsc::Receiver<std::io::Result<Built>>,
        mut acks: tonic::Streaming<pb::ImportResponse>,
        cancel: &mut watch::Receiver<bool>,
    ) -> StreamEnd {
        // A hung target (stopped, deadlocked, behind a black-holed route) stops acking
        // while the connection may look alive: no ack for `ack_timeout` with packages in
        // flight is a disconnect. Every ack restarts the clock.
        let mut ack_deadline = tokio::time::Instant::now() + self.ch.ack_timeout;
        let stall_after = STALLED_AFTER.min(self.ch.ack_timeout / 2);
        let mut stalled = false;
        // Once cancelled, nothing more is sent, and the acks of what is in flight are
        // awaited (briefly): what the target applied is counted.
        let mut draining: Option<tokio::time::Instant> = None;
        loop {
            if self.inflight.is_empty() {
                ack_deadline = tokio::time::Instant::now() + self.ch.ack_timeout;
            }
            let stall_at = ack_deadline - self.ch.ack_timeout + stall_after;
            if draining.is_some() && self.inflight.is_empty() {
                return StreamEnd::Cancelled;
            }
            if draining.is_none()
                && let Err(e) = self.release_deletes().await
            {
                return e;
            }
            if self.packer_done && self.inflight.is_empty() && self.held.is_none() {
                return StreamEnd::Done {
                    last_seq: self.last_acked,
                };
            }
            let room = draining.is_none()
                && !self.packer_done
                && self.held.is_none()
                && self.inflight.len() < self.window;
            let step = tokio::select! {
                _ = cancel.changed(), if draining.is_none() => {
                    if *cancel.borrow() {
                        draining = Some(tokio::time::Instant::now() + CANCEL_DRAIN.min(self.ch.ack_timeout));
                    }
                    Ok(())
                }
                _ = tokio::time::sleep_until(draining.unwrap_or(ack_deadline)), if draining.is_some() => {
                    Err(StreamEnd::Cancelled)
                }
                b = brx.recv(), if room => self.on_built(b).await,
                _ = tokio::time::sleep_until(stall_at), if !self.inflight.is_empty() && !stalled => {
                    stalled = true;
                    self.set_state(TargetState::Stalled).await;
                    let data = json!({"seconds": stall_after.as_secs_f64(), "in_flight": self.inflight.len()});
                    self.app.bus.emit(self.jid, "stalled", self.tname, data).await;
                    Ok(())
                }
                _ = tokio::time::sleep_until(ack_deadline), if !self.inflight.is_empty() => {
                    Err(StreamEnd::Disconnected(
                        format!("no acknowledgement for {}s with {} package(s) in flight; the target seems hung", self.ch.ack_timeout.as_secs(), self.inflight.len()),
                        self.acked_here > 0,
                    ))
                }
                a = acks.message() => {
                    ack_deadline = tokio::time::Instant::now() + self.ch.ack_timeout;
                    if std::mem::take(&mut stalled) {
                        self.set_state(TargetState::Sending).await;
                    }
                    self.on_message(a, cancel).await
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// The delete phase waits until all content is acknowledged; with item errors it is
    /// skipped (a failed item must not turn into a dangling reference).
    async fn release_deletes(&mut self) -> Result<(), StreamEnd> {
        if self.held.is_none() || !self.inflight.is_empty() {
            return Ok(());
        }
        if self.item_errors > 0 {
            self.skip_deletes = true;
            self.packer_done = true;
            self.held = None;
            let reason = format!(
                "{} item error(s) in this job; no deletions applied",
                self.item_errors
            );
            self.app
                .bus
                .emit(
                    self.jid,
                    "deletes_skipped",
                    self.tname,
                    json!({"reason": reason}),
                )
                .await;
            return Ok(());
        }
        match self.held.take() {
            Some(b) => self.send(b).await,
            None => Ok(()),
        }
    }

    /// A package from the packer: sent, held back (deletes), or the end of the plan.
    async fn on_built(&mut self, b: Option<std::io::Result<Built>>) -> Result<(), StreamEnd> {
        match b {
            None => self.packer_done = true,
            Some(Err(e)) => return Err(StreamEnd::Fatal(format!("cannot read the source: {e}"))),
            Some(Ok(b)) if b.phase == PhaseName::Delete && self.skip_deletes => {
                self.packer_done = true;
            }
            Some(Ok(b))
                if b.phase == PhaseName::Delete
                    && (!self.inflight.is_empty() || self.item_errors > 0) =>
            {
                self.held = Some(b);
            }
            Some(Ok(b)) => self.send(b).await?,
        }
        Ok(())
    }

    /// A message from the target: an ack for the oldest package in flight, or the end.
    async fn on_message(
        &mut self,
        m: Result<Option<pb::ImportResponse>, tonic::Status>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), StreamEnd> {
        let progressed = self.acked_here > 0;
        let ack = match m {
            Ok(Some(pb::ImportResponse {
                msg: Some(pb::import_response::Msg::Ack(ack)),
            })) => ack,
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {
                let why = "the target closed the stream".into();
                return Err(StreamEnd::Disconnected(why, progressed));
            }
            Err(s) if retryable(&s) => {
                return Err(StreamEnd::Disconnected(status_text(&s), progressed));
            }
            Err(s) => return Err(StreamEnd::Fatal(status_text(&s))),
        };
        let Some(front) = self.inflight.front() else {
            return Err(StreamEnd::Rewind(format!(
                "unexpected ack for package {}",
                ack.seq
            )));
        };
        if ack.seq != front.seq {
            return Err(StreamEnd::Rewind(format!(
                "ack for package {} while {} was expected",
                ack.seq, front.seq
            )));
        }
        let status = pb::AckStatus::try_from(ack.status).unwrap_or(pb::AckStatus::Unspecified);
        match status {
            pb::AckStatus::Ok => self.on_ok(ack, cancel).await,
            pb::AckStatus::Retry
                if ack
                    .item_errors
                    .iter()
                    .any(|e| ErrorCode::NoSpace.is(&e.code)) =>
            {
                Err(self.on_no_space(ack).await)
            }
            pb::AckStatus::Retry
                if ack
                    .item_errors
                    .iter()
                    .any(|e| ErrorCode::BasisChanged.is(&e.code)) =>
            {
                // Packed again from the checkpoint, these files whole.
                self.whole
                    .extend(ack.item_errors.into_iter().map(|e| e.path));
                Err(StreamEnd::Rewind(format!(
                    "package {}: {}",
                    ack.seq, ack.message
                )))
            }
            pb::AckStatus::Retry => Err(self.on_retry(ack).await),
            pb::AckStatus::OutOfOrder => Err(StreamEnd::Rewind(ack.message)),
            _ => Err(StreamEnd::Fatal(format!(
                "package {} rejected: {}",
                ack.seq, ack.message
            ))),
        }
    }

    /// An applied package: its item errors recorded, its checkpoint stored, then counted.
    async fn on_ok(
        &mut self,
        ack: pb::PackageAck,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), StreamEnd> {
        let f = self.inflight.pop_front().expect("front exists");
        let target_errs = ack.item_errors.len() as u64;
        let failed: Vec<&str> = ack.item_errors.iter().map(|e| e.path.as_str()).collect();
        let bytes_done = f.bytes_landed(&failed);
        let mut errs = f.errors;
        errs.extend(ack.item_errors.into_iter().map(pb_item_error));
        record_item_errors(self.app, self.jid, &self.ch.name, self.tname, &errs).await;
        self.item_errors += errs.len() as u64;
        let p = Progress {
            items: f.items.saturating_sub(target_errs) as i64,
            bytes: bytes_done as i64,
            deletes: f.deletes as i64,
            packages_acked: 1,
            item_errors: errs.len() as i64,
            sent: self.unrecorded,
        };
        let cursor_json = serde_json::to_string(&f.cursor_after).unwrap_or_default();
        self.checkpoint(f.seq, &cursor_json, &p, cancel).await?;
        self.unrecorded = Sent::default();
        self.last_acked = f.seq;
        self.acked_here += 1;
        self.app
            .metrics
            .packages_acked
            .get_or_create(&self.lbl)
            .inc();
        self.app
            .metrics
            .bytes_acked
            .get_or_create(&self.lbl)
            .inc_by(f.bytes);
        if f.copied > 0 {
            self.app
                .metrics
                .bytes_copied
                .get_or_create(&self.lbl)
                .inc_by(f.copied);
        }
        self.bytes_this_stream += f.bytes;
        if let Some(e) = too_many_errors(self.ch, self.item_errors) {
            return Err(e);
        }
        let all_acked = self.packer_done && self.inflight.is_empty();
        if self.last_progress.elapsed() >= PROGRESS_EVERY && !all_acked {
            self.last_progress = Instant::now();
            self.progress().await;
        }
        Ok(())
    }

    async fn set_state(&self, state: TargetState) {
        let r = self
            .app
            .store
            .set_target_state(self.jid, self.tname, state, None)
            .await;
        logged(r, self.jid, "target state");
    }

    /// Announces the target's progress (counters from the store, this stream's rate).
    async fn progress(&self) {
        emit_progress(
            self.app,
            self.jid,
            self.tname,
            self.bytes_this_stream,
            self.started,
            self.limit,
        )
        .await;
    }

    /// Stores an ack's checkpoint: the ack counts only once it is stored, so the write
    /// is retried until it is, or until the job is cancelled (the package is then sent
    /// again by the job's next run and found applied).
    async fn checkpoint(
        &self,
        seq: u64,
        cursor_json: &str,
        p: &Progress,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), StreamEnd> {
        loop {
            let r = self
                .app
                .store
                .checkpoint(self.jid, self.tname, seq as i64, cursor_json, p)
                .await;
            let Err(e) = r else {
                return Ok(());
            };
            tracing::warn!(job = self.jid, error = %e, "cannot store checkpoint; retrying");
            if !super::retry::wait_unless_cancelled(Duration::from_millis(500), cancel).await {
                return Err(StreamEnd::Cancelled);
            }
        }
    }

    /// The target's disk is full: wait for space or fail, as the channel says.
    async fn on_no_space(&mut self, ack: pb::PackageAck) -> StreamEnd {
        if self.ch.on_disk_full == OnDiskFull::Wait {
            return StreamEnd::WaitForSpace(ack.message);
        }
        let errs: Vec<NewItemError> = ack.item_errors.into_iter().map(pb_item_error).collect();
        record_item_errors(self.app, self.jid, &self.ch.name, self.tname, &errs).await;
        let row = current_row(self.app, self.jid, self.tname).await;
        let p = Progress {
            item_errors: errs.len() as i64,
            ..Default::default()
        };
        let r = self
            .app
            .store
            .checkpoint(
                self.jid,
                self.tname,
                self.last_acked as i64,
                &row.checkpoint_json,
                &p,
            )
            .await;
        logged(r, self.jid, "item error counts");
        StreamEnd::Fatal(ack.message)
    }

    /// A package to send again (its checksum failed, or a chunk could not be written):
    /// rewind; after [`MAX_PACKAGE_ATTEMPTS`] its items are given up.
    async fn on_retry(&mut self, ack: pb::PackageAck) -> StreamEnd {
        let n = self.attempts.entry(ack.seq).or_insert(0);
        *n += 1;
        let n = *n;
        if n >= 2 * MAX_PACKAGE_ATTEMPTS {
            return StreamEnd::Fatal(format!(
                "package {} refused {n} times, even after giving its items up: {}",
                ack.seq, ack.message
            ));
        }
        if n >= MAX_PACKAGE_ATTEMPTS {
            // Sent again as a package that gives its items up (see `send`).
            return StreamEnd::Rewind(format!(
                "package {} refused {n} times ({}); its items are given up",
                ack.seq, ack.message
            ));
        }
        StreamEnd::Rewind(format!(
            "package {} must be sent again: {}",
            ack.seq, ack.message
        ))
    }

    /// Sends one package (given up first if it failed too often).
    async fn send(&mut self, mut b: Built) -> Result<(), StreamEnd> {
        let seq = b.pkg.seq;
        if self
            .attempts
            .get(&seq)
            .is_some_and(|n| *n >= MAX_PACKAGE_ATTEMPTS)
        {
            give_up_package(&mut b);
        }
        let wire = b.pkg.payload.len() as i64;
        #[cfg(feature = "failpoints")]
        crate::failpoints::maybe_corrupt(&mut b.pkg);
        self.inflight.push_back(InFlight {
            seq,
            cursor_after: b.cursor_after,
            items: b.items,
            bytes: b.bytes,
            copied: b.copied,
            completed: b.completed,
            deletes: b.deletes,
            errors: b.errors,
        });
        self.unrecorded.packages += 1;
        self.unrecorded.wire_bytes += wire;
        self.unrecorded.max_seq = self.unrecorded.max_seq.max(seq as i64);
        if seq <= self.max_sent_seq {
            // After a reconnect, a rewind or a restart of the source.
            self.unrecorded.retried += 1;
            self.app
                .metrics
                .packages_retried
                .get_or_create(&self.lbl)
                .inc();
        }
        self.max_sent_seq = self.max_sent_seq.max(seq);
        self.app
            .metrics
            .packages_sent
            .get_or_create(&self.lbl)
            .inc();
        self.app
            .metrics
            .bytes_sent
            .get_or_create(&self.lbl)
            .inc_by(wire as u64);
        let mut waited = Duration::ZERO;
        for p in &self.pacers {
            waited += p.admit(wire as u64).await;
        }
        if !waited.is_zero() {
            self.app
                .metrics
                .throttled
                .get_or_create(&self.lbl)
                .inc_by(waited.as_secs_f64());
        }
        let req = pb::ImportRequest {
            msg: Some(pb::import_request::Msg::Package(b.pkg)),
        };
        self.otx.send(req).await.map_err(|_| {
            StreamEnd::Disconnected(format!("stream closed while sending package {seq}"), false)
        })
    }

    /// Stores what was sent and not yet counted, and the final progress of a finished
    /// stream.
    async fn finish(self, end: StreamEnd) -> StreamEnd {
        if self.unrecorded.packages > 0 {
            let r = self
                .app
                .store
                .add_sent(self.jid, self.tname, &self.unrecorded)
                .await;
            logged(r, self.jid, "sent-package counts");
        }
        if matches!(end, StreamEnd::Done { .. }) {
            self.progress().await;
        }
        end
    }
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
    let (keep, paths) = split_for_giving_up(payload);
    let dirs = keep.len() as u64;
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
    b.completed.clear();
    b.deletes = 0;
    b.errors.extend(paths.into_iter().map(|path| NewItemError {
        path,
        code: ErrorCode::ChecksumMismatch.as_str().into(),
        message: reason.clone(),
        retryable: true,
    }));
}

/// A package's directory puts, which stay (they carry no body, and giving one up would
/// fail everything below it), and every other item's path, once each, in order.
fn split_for_giving_up(payload: pb::PackagePayload) -> (Vec<pb::Entry>, Vec<String>) {
    let mut keep: Vec<pb::Entry> = Vec::new();
    let mut paths: Vec<String> = Vec::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    for e in payload.entries {
        let path = match e.op {
            Some(pb::entry::Op::Put(m)) if m.kind == pb::ItemKind::Directory as i32 => {
                keep.push(pb::Entry {
                    op: Some(pb::entry::Op::Put(m)),
                });
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
    (keep, paths)
}

/// Signatures of the target's versions of files, fetched for the packer's thread from
/// the session's target (GetSignatures). A target that cannot give them (no such file,
/// an older target, a broken connection) gets the file whole.
struct TargetSignatures {
    client: TargetServiceClient<AuthChannel>,
    session_id: String,
    timeout: Duration,
    handle: tokio::runtime::Handle,
    /// Signatures fetched ahead of the packer, in plan order.
    ahead: Option<mpsc::Receiver<(String, Option<Basis>)>>,
    /// The file asked for last (asked again when it is read again).
    last: Option<String>,
}

/// Signatures fetched ahead of the packer, several at once: on a far link each fetch
/// costs a round trip, and the target cuts and hashes the next files while the source
/// cuts the one before.
const SIGNATURES_AHEAD: usize = 4;

impl TargetSignatures {
    /// Signatures from the session's target, the planned deltas' fetched ahead from
    /// `cursor` on (those of the files in `whole` left out).
    fn start(
        client: &TargetServiceClient<AuthChannel>,
        session_id: &str,
        timeout: Duration,
        plan_dir: &Path,
        cursor: &Cursor,
        whole: &HashSet<String>,
    ) -> TargetSignatures {
        let mut me = TargetSignatures {
            client: client.clone(),
            session_id: session_id.to_string(),
            timeout,
            handle: tokio::runtime::Handle::current(),
            ahead: None,
            last: None,
        };
        me.ahead = Some(me.fetch_ahead(plan_dir, cursor, whole.clone()));
        me
    }

    /// Reads the plan from `cursor` (on a blocking thread) and fetches the signatures
    /// of each planned delta, [`SIGNATURES_AHEAD`] at a time, handing them on in plan
    /// order. Ends when the receiver is dropped.
    fn fetch_ahead(
        &self,
        plan_dir: &Path,
        cursor: &Cursor,
        whole: HashSet<String>,
    ) -> mpsc::Receiver<(String, Option<Basis>)> {
        use futures::StreamExt;
        let (tx, rx) = mpsc::channel(SIGNATURES_AHEAD);
        let (ptx, prx) = mpsc::channel::<(String, u64)>(SIGNATURES_AHEAD);
        let phases = vec![PhaseName::Content, PhaseName::Last];
        let reader = crate::plan::PlanReader::open(plan_dir, cursor, phases);
        tokio::task::spawn_blocking(move || {
            let Ok(mut reader) = reader else { return };
            while let Ok(Some((_, e, _))) = reader.next_entry() {
                let Some(basis) = e.basis.filter(|_| !whole.contains(&e.i.path)) else {
                    continue;
                };
                if ptx.blocking_send((e.i.path, basis)).is_err() {
                    return;
                }
            }
        });
        let (client, session_id, timeout) =
            (self.client.clone(), self.session_id.clone(), self.timeout);
        self.handle.spawn(async move {
            let mut fetched = ReceiverStream::new(prx)
                .map(|(path, basis)| {
                    let (client, session_id) = (client.clone(), session_id.clone());
                    async move {
                        let avg = cms_mirror::delta::ChunkSizes::for_size(basis).avg;
                        let got = fetch(client, session_id, timeout, &path, avg).await;
                        (path, got)
                    }
                })
                .buffered(SIGNATURES_AHEAD);
            while let Some(got) = fetched.next().await {
                if tx.send(got).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Fetches one file's signatures and waits for them.
    fn fetch_now(&mut self, path: &str, sizes: cms_mirror::delta::ChunkSizes) -> Option<Basis> {
        let (client, session_id) = (self.client.clone(), self.session_id.clone());
        self.handle
            .block_on(fetch(client, session_id, self.timeout, path, sizes.avg))
    }
}

/// One file's signatures from the target, or `None` (logged) when it cannot give them
/// within `timeout`.
async fn fetch(
    client: TargetServiceClient<AuthChannel>,
    session_id: String,
    timeout: Duration,
    path: &str,
    avg_chunk: u32,
) -> Option<Basis> {
    match tokio::time::timeout(timeout, basis(client, session_id, path, avg_chunk)).await {
        Ok(Ok(b)) => Some(b),
        Ok(Err(e)) => {
            tracing::info!(path, error = %e, "no signatures; sending the file whole");
            None
        }
        Err(_) => {
            tracing::info!(path, "signatures timed out; sending the file whole");
            None
        }
    }
}

async fn basis(
    mut client: TargetServiceClient<AuthChannel>,
    session_id: String,
    path: &str,
    avg_chunk: u32,
) -> Result<Basis, String> {
    let req = pb::SignaturesRequest {
        session_id,
        path: path.to_string(),
        avg_chunk,
    };
    let mut batches = client
        .get_signatures(super::traced(req))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let mut index = cms_mirror::delta::Index::default();
    let mut basis: Option<(u64, i64)> = None;
    while let Some(b) = batches.message().await.map_err(|s| status_text(&s))? {
        basis.get_or_insert((b.basis_size, b.basis_mtime_ns));
        index.add(&b.lengths, &b.hashes)?;
    }
    let (size, mtime_ns) = basis.ok_or("no signatures")?;
    if index.size != size {
        return Err(format!(
            "signatures cover {} bytes of a {size}-byte file",
            index.size
        ));
    }
    Ok(Basis {
        index,
        size,
        mtime_ns,
    })
}

impl Signatures for TargetSignatures {
    fn fetch(&mut self, path: &str, sizes: cms_mirror::delta::ChunkSizes) -> Option<Basis> {
        // A file read again asks again; the others come in plan order from the fetches
        // ahead (those of files the packer skipped are passed over).
        let again = self.last.as_deref() == Some(path);
        self.last = Some(path.to_string());
        if let Some(ahead) = self.ahead.as_mut().filter(|_| !again) {
            while let Some((p, got)) = ahead.blocking_recv() {
                if p == path {
                    return got;
                }
            }
            self.ahead = None;
        }
        self.fetch_now(path, sizes)
    }
}
