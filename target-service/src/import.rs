//! The Import stream: packages in, one answer per package out, in package order.
//!
//! A pipeline: package N+1 is staged (written, hashed) while N is published (flushed,
//! put in place) and N-1 recorded in the ledger. A package is published only after the
//! one before it is published and recorded only after it is recorded; after a failed
//! package nothing later is published. [`read_ahead`] receives and opens the next
//! package while the current one is staged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tonic::{Status, Streaming};
use tracing::Instrument;

use cms_mirror::model::ErrorCode;
use cms_mirror::package::{self, Limits};
use cms_mirror::pb;

use crate::apply::{self, Applied};
use crate::error::TargetError;
use crate::ledger::SessionRow;
use crate::{TargetService, metrics};

/// How long an Import stream may stay silent before the target drops it.
pub const IMPORT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Packages of one stream past staging and not yet answered: each is writing its
/// chunks, publishing or recording (one at a time per step, in order). Each holds its
/// payload, so this also bounds the memory of a stream.
const PENDING_MAX: usize = 3;

/// Room for decoded packages, shared by all Import streams and counted in KiB: a
/// package is decoded only once its decoded size fits, and gives the room back when it
/// is staged, so many streams at once cannot hold more than the budget.
#[derive(Clone)]
pub(crate) struct DecodeBudget {
    room: Arc<Semaphore>,
    /// Counts the packages that had to wait.
    waits: prometheus_client::metrics::counter::Counter,
}

impl DecodeBudget {
    pub(crate) fn new(
        bytes: usize,
        waits: prometheus_client::metrics::counter::Counter,
    ) -> DecodeBudget {
        let room = Arc::new(Semaphore::new(kib(bytes)));
        DecodeBudget { room, waits }
    }

    /// Waits until `bytes` fit in the budget.
    async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let n = u32::try_from(kib(bytes).max(1)).unwrap_or(u32::MAX);
        if let Ok(p) = self.room.clone().try_acquire_many_owned(n) {
            return p;
        }
        self.waits.inc();
        self.room
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the budget is never closed")
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS)
}

type Reply = Result<pb::PackageAck, TargetError>;
type Outbound = mpsc::Sender<Result<pb::ImportResponse, Status>>;

/// What the first look at a package decided.
enum Prepared {
    /// Answered at once (already applied, or refused).
    Answer(pb::PackageAck),
    /// To be staged, published and recorded.
    Apply(pb::PackagePayload),
}

/// A package being published or recorded while the next one is staged.
struct Pending {
    task: tokio::task::JoinHandle<Reply>,
    started: Instant,
    places_symlinks: bool,
    /// How far its finish has come, for the package after it.
    step: watch::Receiver<Step>,
}

/// How far a package's finish has come. A package is published only once the one
/// before it is published, and recorded only once that one is recorded; after a
/// failure, nothing later is published or recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Publishing,
    Published,
    Recorded,
    Failed,
}

/// Waits until the package before (if any) has reached `at`: false when it failed or
/// its task ended without saying.
async fn reached(prev: &mut Option<watch::Receiver<Step>>, at: Step) -> bool {
    let Some(rx) = prev else {
        return true;
    };
    let done = |s: &Step| match at {
        Step::Published => matches!(s, Step::Published | Step::Recorded | Step::Failed),
        _ => matches!(s, Step::Recorded | Step::Failed),
    };
    matches!(rx.wait_for(done).await.as_deref(), Ok(&s) if s != Step::Failed)
}

/// The answer to a package that was not applied (`out.no_space` or `out.not_written`):
/// not recorded, sent again. On a full disk the source waits for space or fails the job,
/// as its channel says; after a failed write it gives the items up after a few attempts.
fn not_applied_ack(session: &str, seq: u64, out: Applied) -> pb::PackageAck {
    // The error that stopped the package: the full disk, or the write pushed last.
    let cause = out
        .errors
        .iter()
        .find(|e| ErrorCode::NoSpace.is(&e.code))
        .or(out.errors.last())
        .map(|e| format!("{}: {}", e.path, e.message))
        .unwrap_or_default();
    let what = if out.no_space {
        "target disk full"
    } else if out
        .errors
        .iter()
        .any(|e| ErrorCode::BasisChanged.is(&e.code))
    {
        "the basis of a delta changed"
    } else {
        "a chunk could not be written"
    };
    tracing::warn!(session, seq, error = %cause, "{what}; package not applied");
    let mut a = ack_for(
        seq,
        pb::AckStatus::Retry,
        format!("{what}, package {seq} not applied ({cause})"),
    );
    a.item_errors = out.errors;
    a
}

/// The answer of a finished apply task.
fn joined(r: Result<Reply, tokio::task::JoinError>) -> Reply {
    r.unwrap_or_else(|e| Err(TargetError::task("apply")(e)))
}

fn ack_for(seq: u64, status: pb::AckStatus, message: String) -> pb::PackageAck {
    pb::PackageAck {
        seq,
        status: status as i32,
        message,
        ..Default::default()
    }
}

fn is_ok(reply: &Reply) -> bool {
    matches!(reply, Ok(a) if a.status == pb::AckStatus::Ok as i32)
}

/// A package ready to publish, and where it comes in its stream.
struct ToFinish {
    session: SessionRow,
    seq: u64,
    checksum: Vec<u8>,
    /// Taken by its publish.
    staged: Option<apply::Staged>,
    /// The step of the package before, whose record may still be running while this
    /// one is published.
    prev: Option<watch::Receiver<Step>>,
}

impl TargetService {
    /// Checks a package's number and what opening it gave (see [`read_ahead`]): an
    /// answer at once, or a payload to apply. `last` is the last package this stream
    /// accepted.
    async fn prepare(
        &self,
        session: &str,
        last: u64,
        pkg: &pb::Package,
        opened: Result<pb::PackagePayload, package::PackageError>,
    ) -> Result<Prepared, TargetError> {
        let seq = pkg.seq;
        let answer = |status, message| Ok(Prepared::Answer(ack_for(seq, status, message)));
        if seq == 0 {
            return answer(
                pb::AckStatus::Rejected,
                "package sequence numbers start at 1".into(),
            );
        }
        if seq > last + 1 {
            let mut a = ack_for(
                seq,
                pb::AckStatus::OutOfOrder,
                format!("out of order: expected package {}, got {seq}", last + 1),
            );
            a.expected_seq = last + 1;
            return Ok(Prepared::Answer(a));
        }
        if seq <= last
            && let Some(sum) = self.inner.ledger.applied_checksum(session, seq).await?
            && sum == pkg.checksum
        {
            let mut a = ack_for(seq, pb::AckStatus::Ok, "already applied".into());
            a.duplicate = true;
            return Ok(Prepared::Answer(a));
        }
        match opened {
            Ok(p) => Ok(Prepared::Apply(p)),
            Err(e) if e.over_limit() => {
                // A peer beyond the limits is cut off: the stream ends here.
                tracing::warn!(session, seq, error = %e, "package refused; stream cut off");
                Err(TargetError::OverLimit(e))
            }
            Err(e) => {
                tracing::warn!(session, seq, error = %e, "package refused");
                let status = if e.retryable() {
                    pb::AckStatus::Retry
                } else {
                    pb::AckStatus::Rejected
                };
                answer(status, e.to_string())
            }
        }
    }

    /// Writes and verifies a package's bodies in the staging directory.
    async fn stage(
        &self,
        session: &SessionRow,
        payload: pb::PackagePayload,
    ) -> Result<apply::Staged, TargetError> {
        let state = self.session_state(session)?;
        let max_path = self.inner.settings.limits.max_path_bytes;
        let staged = tokio::task::spawn_blocking(move || {
            let mut f = state.files.lock().expect("session files lock");
            (!f.aborted).then(|| apply::stage(&state.fs, &mut f, payload, max_path))
        })
        .await
        .map_err(TargetError::task("apply"))?;
        staged.ok_or_else(|| TargetError::SessionAborted(session.id.clone()))
    }

    /// Publishes and records a staged package; returns its ack and tells the package
    /// after through `step`. A package the disk had no room for is not recorded: the
    /// source sends it again once there is space (or fails the job, as its channel
    /// says).
    async fn finish(self, mut p: ToFinish, step: watch::Sender<Step>) -> Reply {
        let r = self.publish_and_record(&mut p, &step).await;
        step.send_replace(if is_ok(&r) {
            Step::Recorded
        } else {
            Step::Failed
        });
        r
    }

    async fn publish_and_record(&self, p: &mut ToFinish, step: &watch::Sender<Step>) -> Reply {
        let (session, seq) = (p.session.id.as_str(), p.seq);
        let staged = p.staged.take().expect("a package is published once");
        // Chunks left to write go to the disk now, while the package before this one may
        // still be publishing and the next one is being staged.
        let staged = if staged.has_deferred() {
            tokio::task::spawn_blocking(move || apply::write_deferred(staged))
                .await
                .map_err(TargetError::task("apply"))?
        } else {
            staged
        };
        if staged.out.no_space || staged.out.not_written {
            return Ok(not_applied_ack(session, seq, staged.out));
        }
        if !reached(&mut p.prev, Step::Published).await {
            apply::discard(staged);
            return Err(TargetError::EarlierFailed {
                seq,
                step: "published",
            });
        }
        let mut applied = self.publish(&p.session, staged).await?;
        let uncache = std::mem::take(&mut applied.to_uncache);
        for (md, ticket) in std::mem::take(&mut applied.signed) {
            self.inner.sigcache.put_signed(md, ticket);
        }
        if applied.no_space || applied.not_written {
            return Ok(not_applied_ack(session, seq, applied));
        }
        step.send_replace(Step::Published);
        // Published but not recorded, as after a crash: the source sends it again and
        // the target finds its files in place.
        if !reached(&mut p.prev, Step::Recorded).await {
            return Err(TargetError::EarlierFailed {
                seq,
                step: "recorded",
            });
        }
        self.inner
            .ledger
            .record_package(&p.session, seq, &p.checksum, &applied.changes)
            .await?;
        self.inner
            .metrics
            .bytes_direct
            .get_or_create(&metrics::Metrics::site(&p.session.site))
            .inc_by(applied.bytes_direct);
        if !uncache.is_empty() {
            tokio::task::spawn_blocking(move || apply::uncache(uncache));
        }
        let mut a = ack_for(seq, pb::AckStatus::Ok, String::new());
        a.items_applied = applied.items;
        a.bytes_applied = applied.bytes;
        a.item_errors = applied.errors;
        Ok(a)
    }

    /// Makes a staged package durable and visible, unless its session was aborted.
    async fn publish(
        &self,
        session: &SessionRow,
        staged: apply::Staged,
    ) -> Result<Applied, TargetError> {
        let state = self.session_state(session)?;
        let durability = self.inner.settings.durability;
        let applied = tokio::task::spawn_blocking(move || {
            let aborted = state.publishing.lock().expect("session publish lock");
            if *aborted {
                apply::discard(staged);
                return None;
            }
            Some(apply::publish(&state.fs, staged, durability))
        })
        .await
        .map_err(TargetError::task("apply"))?;
        applied.ok_or_else(|| TargetError::SessionAborted(session.id.clone()))
    }

    /// Applies the packages of one Import stream; see the module doc.
    pub(crate) async fn handle_import(
        self,
        session: SessionRow,
        inbound: Streaming<pb::ImportRequest>,
        tx: Outbound,
        _counted: crate::session::StreamGuard,
    ) {
        let last = session.last_seq as u64;
        let mut s = ImportStream {
            svc: self,
            session,
            tx,
            pending: VecDeque::new(),
            last,
        };
        s.run(inbound).await;
        // Packages behind one that stopped the stream drop what they staged once they
        // see its failure: wait for them, so that the session's next stream starts on
        // settled staging files.
        for p in s.pending {
            let _ = p.task.await;
        }
    }
}

/// Whether the stream goes on after a step.
enum Flow {
    Next,
    Stop,
}

/// One Import stream in progress.
struct ImportStream {
    svc: TargetService,
    session: SessionRow,
    tx: Outbound,
    pending: VecDeque<Pending>,
    /// The last package this stream accepted.
    last: u64,
}

impl ImportStream {
    async fn run(&mut self, inbound: Streaming<pb::ImportRequest>) {
        let inner = &self.svc.inner;
        let (mut incoming, _reader) = read_ahead(
            inbound,
            inner.settings.limits.clone(),
            inner.decode_budget.clone(),
        );
        loop {
            let Some(next) = self.next_inbound(&mut incoming).await else {
                return;
            };
            let flow = match next {
                Inbound::Package { pkg, opened, room } => self.take(pkg, opened, room).await,
                Inbound::End => break,
                Inbound::Failed(status) => {
                    // A message over the size limit arrives here: the peer is told, then
                    // cut off (after the answer of a package still in progress).
                    tracing::info!(session = %self.session.id, %status, "import stream ended");
                    self.end_with(status).await
                }
                Inbound::Idle => self.end_with(TargetError::Idle.into()).await,
                Inbound::NotAPackage => {
                    let e = TargetError::InvalidArgument("expected a package".into());
                    self.end_with(e.into()).await
                }
            };
            if let Flow::Stop = flow {
                return;
            }
        }
        self.settle().await;
    }

    /// The next message of the stream, answering packages that finish meanwhile; `None`
    /// when an answer stopped the stream.
    async fn next_inbound(&mut self, incoming: &mut mpsc::Receiver<Inbound>) -> Option<Inbound> {
        loop {
            tokio::select! {
                // An idle stream must not hold back the answers of packages in progress.
                r = async { (&mut self.pending.front_mut().expect("checked").task).await }, if !self.pending.is_empty() => {
                    let p = self.pending.pop_front().expect("checked");
                    if !self.answer(joined(r), p.started).await {
                        return None;
                    }
                }
                // The idle clock runs only while this loop waits for a package, as the
                // source may be waiting for acks of packages still being applied.
                m = tokio::time::timeout(IMPORT_IDLE_TIMEOUT, incoming.recv()) => {
                    return Some(m.map_or(Inbound::Idle, |m| m.unwrap_or(Inbound::End)));
                }
            }
        }
    }

    /// Settles what is in progress, then ends the stream with `status`.
    async fn end_with(&mut self, status: Status) -> Flow {
        self.settle().await;
        let _ = self.tx.send(Err(status)).await;
        Flow::Stop
    }

    /// Takes one package: answered at once, or staged and handed to a finishing task.
    async fn take(
        &mut self,
        pkg: pb::Package,
        opened: Result<pb::PackagePayload, package::PackageError>,
        room: OwnedSemaphorePermit,
    ) -> Flow {
        let started = Instant::now();
        #[cfg(feature = "failpoints")]
        crate::failpoints::slow_apply().await;
        let span = tracing::info_span!("apply_package", seq = pkg.seq, site = %self.session.site);
        let prepared = self
            .svc
            .prepare(&self.session.id, self.last, &pkg, opened)
            .instrument(span.clone())
            .await;
        let payload = match prepared {
            Ok(Prepared::Apply(payload)) => payload,
            Ok(Prepared::Answer(a)) => {
                // A refused package leaves `last` as it was, so what follows it is out of
                // order until the source rewinds.
                if !self.settle().await {
                    return Flow::Stop;
                }
                self.answer(Ok(a), started).await;
                return Flow::Next;
            }
            Err(e) => {
                if self.settle().await {
                    self.answer(Err(e), started).await;
                }
                return Flow::Stop;
            }
        };
        // A symlink placed by a package in progress could change what this one's parent
        // checks see: wait for it.
        if self.pending.iter().any(|p| p.places_symlinks) && !self.settle().await {
            return Flow::Stop;
        }
        let staged = self
            .svc
            .stage(&self.session, payload)
            .instrument(span.clone())
            .await;
        // Staged: the payload is gone (its bodies are in staging files).
        drop(room);
        self.hand_over(pkg, staged, started, span).await
    }

    /// Hands a staged package to its finishing task, once the pipeline has room.
    async fn hand_over(
        &mut self,
        pkg: pb::Package,
        staged: Result<apply::Staged, TargetError>,
        started: Instant,
        span: tracing::Span,
    ) -> Flow {
        // At most one package writing, one publishing and one recording while this one
        // joins.
        while self.pending.len() >= PENDING_MAX {
            if !self.settle_front().await {
                if let Ok(s) = staged {
                    apply::discard(s);
                }
                return Flow::Stop;
            }
        }
        let staged = match staged {
            Ok(s) => s,
            Err(e) => {
                if self.settle().await {
                    self.answer(Err(e), started).await;
                }
                return Flow::Stop;
            }
        };
        let no_space = staged.out.no_space;
        let places_symlinks = staged.places_symlinks();
        let (step_tx, step) = watch::channel(Step::Publishing);
        let job = ToFinish {
            session: self.session.clone(),
            seq: pkg.seq,
            checksum: pkg.checksum,
            staged: Some(staged),
            prev: self.pending.back().map(|p| p.step.clone()),
        };
        let task = tokio::spawn(self.svc.clone().finish(job, step_tx).instrument(span));
        self.pending.push_back(Pending {
            task,
            started,
            places_symlinks,
            step,
        });
        if no_space {
            // Answered at once; `last` stays, as for any package not recorded.
            self.settle().await;
            return Flow::Next;
        }
        self.last = self.last.max(pkg.seq);
        Flow::Next
    }

    /// Waits for the oldest package in progress, counts and sends its answer; false
    /// when the stream must stop (the answer was not a plain acknowledgement, or no one
    /// listens). True when nothing was pending.
    async fn settle_front(&mut self) -> bool {
        let Some(p) = self.pending.pop_front() else {
            return true;
        };
        let reply = joined(p.task.await);
        self.answer(reply, p.started).await
    }

    /// Settles every package in progress, in order; false at the first that stops the
    /// stream (the ones after it publish nothing).
    async fn settle(&mut self) -> bool {
        while !self.pending.is_empty() {
            if !self.settle_front().await {
                return false;
            }
        }
        true
    }

    /// Counts and sends one answer; false when the stream must stop.
    async fn answer(&self, reply: Reply, started: Instant) -> bool {
        self.svc
            .count(&self.session.site, &reply, started.elapsed());
        let go_on = is_ok(&reply);
        let item = reply.map_err(Status::from).map(|ack| pb::ImportResponse {
            msg: Some(pb::import_response::Msg::Ack(ack)),
        });
        self.tx.send(item).await.is_ok() && go_on
    }
}

/// A message of an Import stream as [`read_ahead`] passes it on.
enum Inbound {
    /// A package, opened (checksum checked, payload decoded) when it arrived.
    Package {
        pkg: pb::Package,
        opened: Result<pb::PackagePayload, package::PackageError>,
        /// Its room in the [`DecodeBudget`], held until it is staged.
        room: OwnedSemaphorePermit,
    },
    NotAPackage,
    End,
    Failed(Status),
    /// Nothing arrived for [`IMPORT_IDLE_TIMEOUT`] while the apply loop waited.
    Idle,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads an Import stream one package ahead of the apply loop: the next package is
/// received (copied out of the HTTP/2 frames) and opened while the one before it is
/// staged, so neither waits on the other's CPU. At most one opened package waits in the
/// channel, so memory stays bounded by the window. The task ends after the first
/// message that is not a package, or when the returned guard is dropped (the apply
/// loop keeps the idle timeout).
fn read_ahead(
    mut inbound: Streaming<pb::ImportRequest>,
    limits: Limits,
    budget: DecodeBudget,
) -> (mpsc::Receiver<Inbound>, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(1);
    let task = tokio::spawn(async move {
        loop {
            let m = match inbound.message().await {
                Ok(Some(pb::ImportRequest {
                    msg: Some(pb::import_request::Msg::Package(pkg)),
                })) => {
                    let size = package::decoded_size(&pkg, limits.max_payload_bytes);
                    let room = budget.reserve(size).await;
                    let opened = package::open(&pkg, &limits);
                    Inbound::Package { pkg, opened, room }
                }
                Ok(Some(_)) => Inbound::NotAPackage,
                Ok(None) => Inbound::End,
                Err(status) => Inbound::Failed(status),
            };
            let more = matches!(m, Inbound::Package { .. });
            if tx.send(m).await.is_err() || !more {
                return;
            }
        }
    });
    (rx, AbortOnDrop(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `reached` is still waiting after 50 ms.
    async fn waits(prev: &mut Option<watch::Receiver<Step>>, at: Step) -> bool {
        tokio::time::timeout(Duration::from_millis(50), reached(prev, at))
            .await
            .is_err()
    }

    /// The chaining rule of the Import pipeline: publish after the package before is
    /// published, record after it is recorded, nothing after a failure or a task that
    /// ended without saying.
    #[tokio::test]
    async fn a_package_waits_for_the_step_of_the_one_before() {
        assert!(reached(&mut None, Step::Recorded).await);

        let (tx, rx) = watch::channel(Step::Publishing);
        let mut prev = Some(rx);
        assert!(
            waits(&mut prev, Step::Published).await,
            "must wait while the one before publishes"
        );
        tx.send_replace(Step::Published);
        assert!(reached(&mut prev, Step::Published).await);
        assert!(
            waits(&mut prev, Step::Recorded).await,
            "must wait while the one before records"
        );
        tx.send_replace(Step::Recorded);
        assert!(reached(&mut prev, Step::Recorded).await);
        drop(tx);
        // Recorded stays readable after its task ended.
        assert!(reached(&mut prev, Step::Recorded).await);

        let (tx, rx) = watch::channel(Step::Publishing);
        let mut prev = Some(rx);
        tx.send_replace(Step::Failed);
        assert!(!reached(&mut prev, Step::Published).await);

        let (tx, rx) = watch::channel(Step::Published);
        let mut prev = Some(rx);
        drop(tx);
        assert!(reached(&mut prev, Step::Published).await);
        assert!(!reached(&mut prev, Step::Recorded).await);
    }
}
