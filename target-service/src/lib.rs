//! cms-mirror target service.
//!
//! - [`TargetService`]: the gRPC `TargetService` (OpenSession, GetManifest, Import,
//!   Commit) over the sites it serves.
//! - [`apply`]: durable, path-safe application of package entries to a site directory.
//! - [`ledger`]: sessions, applied packages and the manifest index, in the target's own
//!   database (SQLite by default).
//! - [`run`]: serves the service (with health and reflection) on a bound listener.
#![forbid(unsafe_code)]

pub mod apply;
pub mod hooks;
pub mod ledger;
pub mod metrics;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use cms_mirror::config::SiteConfig;
use cms_mirror::package::{self, Limits};
use cms_mirror::pb;
use cms_mirror::pb::target_service_server::{TargetService as TargetApi, TargetServiceServer};

use apply::{Applied, Durability, SessionFiles, SiteFs};
use ledger::Ledger;

/// How long an Import stream may stay silent before the target drops it.
pub const IMPORT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Packages of one stream past staging and not yet answered: each is writing its
/// chunks, publishing or recording (one at a time per step, in order). Each holds its
/// payload, so this also bounds the memory of a stream.
const PENDING_MAX: usize = 3;

/// Settings of a target service.
#[derive(Clone, Debug)]
pub struct TargetSettings {
    pub sites: Vec<SiteConfig>,
    pub limits: Limits,
    pub durability: Durability,
    /// Write large bodies with direct I/O when acknowledgements wait for the disk.
    pub direct_io: bool,
    /// Identifies this target in lineages (loop prevention in tier chains).
    pub target_id: String,
}

struct Site {
    fs: SiteFs,
}

/// A session's files in progress. Staging holds `files`; publishing holds `publishing`,
/// whose flag says the session was aborted (so an abort waits for both halves of a
/// package in progress, and nothing is published after it).
struct SessionState {
    files: Mutex<SessionFiles>,
    publishing: Mutex<bool>,
}

/// What the first look at a package decided.
enum Prepared {
    /// Answered at once (already applied, or refused).
    Answer(pb::PackageAck),
    /// To be staged, published and recorded.
    Apply(pb::PackagePayload),
}

/// A package being published or recorded while the next one is staged.
struct Pending {
    task: tokio::task::JoinHandle<Result<pb::PackageAck, Status>>,
    started: std::time::Instant,
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
        .find(|e| e.code == apply::NO_SPACE)
        .or(out.errors.last())
        .map(|e| format!("{}: {}", e.path, e.message))
        .unwrap_or_default();
    let what = if out.no_space {
        "target disk full"
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
fn joined(
    r: Result<Result<pb::PackageAck, Status>, tokio::task::JoinError>,
) -> Result<pb::PackageAck, Status> {
    r.unwrap_or_else(|e| Err(Status::internal(format!("apply task failed: {e}"))))
}

fn ack_for(seq: u64, status: pb::AckStatus, message: String) -> pb::PackageAck {
    pb::PackageAck {
        seq,
        status: status as i32,
        message,
        ..Default::default()
    }
}

struct Inner {
    sites: HashMap<String, Site>,
    ledger: Ledger,
    settings: TargetSettings,
    /// Files in progress per session; one package of a session is staged at a time and
    /// one published at a time.
    sessions: Mutex<HashMap<String, Arc<SessionState>>>,
    metrics: metrics::Metrics,
    /// Lineage of each open session (passed on by tier pushes).
    lineages: Mutex<HashMap<String, Vec<String>>>,
}

/// The gRPC target service.
#[derive(Clone)]
pub struct TargetService {
    inner: Arc<Inner>,
}

/// Errors starting a target.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("site {site:?}: root {root}: {message}")]
    Site {
        site: String,
        root: String,
        message: String,
    },
    #[error("no site configured (use --site NAME=DIR or a target.toml)")]
    NoSites,
    #[error("cannot read the ledger: {0}")]
    Ledger(#[from] sqlx::Error),
}

fn db_status(e: sqlx::Error) -> Status {
    tracing::error!(error = %e, "ledger database error");
    Status::unavailable("target ledger unavailable; retry later")
}

impl TargetService {
    /// Prepares the sites (creating their roots, cleaning leftover staging files).
    pub async fn new(
        settings: TargetSettings,
        ledger: Ledger,
    ) -> Result<TargetService, StartError> {
        if settings.sites.is_empty() {
            return Err(StartError::NoSites);
        }
        let open: Vec<String> = ledger
            .open_sessions()
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect();
        let mut sites = HashMap::new();
        for s in &settings.sites {
            let err = |message: String| StartError::Site {
                site: s.name.clone(),
                root: s.root.display().to_string(),
                message,
            };
            std::fs::create_dir_all(&s.root).map_err(|e| err(e.to_string()))?;
            let root = s.root.canonicalize().map_err(|e| err(e.to_string()))?;
            let fs = SiteFs { root };
            let removed = apply::clean_staging(&fs, &open)
                .map_err(|e| err(format!("cannot clean staging: {e}")))?;
            if removed > 0 {
                tracing::info!(site = %s.name, removed, "removed leftover staging files");
            }
            sites.insert(s.name.clone(), Site { fs });
        }
        Ok(TargetService {
            inner: Arc::new(Inner {
                sites,
                ledger,
                settings,
                sessions: Mutex::new(HashMap::new()),
                metrics: metrics::Metrics::new(),
                lineages: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    fn site(&self, name: &str) -> Result<&Site, Status> {
        self.inner
            .sites
            .get(name)
            .ok_or_else(|| Status::not_found(format!("unknown site {name:?}")))
    }

    fn session_state(&self, session: &str, fs: &SiteFs) -> Arc<SessionState> {
        let mut m = self.inner.sessions.lock().expect("sessions lock");
        m.entry(session.to_string())
            .or_insert_with(|| {
                Arc::new(SessionState {
                    files: Mutex::new(SessionFiles::new(
                        fs.session_dir(session),
                        self.inner.settings.direct_io
                            && self.inner.settings.durability != Durability::None,
                    )),
                    publishing: Mutex::new(false),
                })
            })
            .clone()
    }

    fn count(&self, site: &str, reply: &Result<pb::PackageAck, Status>, took: std::time::Duration) {
        let m = &self.inner.metrics;
        let l = metrics::Metrics::site(site);
        match reply {
            Ok(a) if a.status == pb::AckStatus::Ok as i32 => {
                if !a.duplicate {
                    m.packages_applied.get_or_create(&l).inc();
                    m.bytes_applied.get_or_create(&l).inc_by(a.bytes_applied);
                    m.apply_seconds
                        .get_or_create(&l)
                        .observe(took.as_secs_f64());
                }
                m.item_errors
                    .get_or_create(&l)
                    .inc_by(a.item_errors.len() as u64);
            }
            _ => {
                m.packages_refused.get_or_create(&l).inc();
            }
        }
    }

    /// The metrics page.
    pub fn render_metrics(&self) -> String {
        self.inner.metrics.render()
    }

    /// Checks a package's number and what opening it gave (see [`read_ahead`]): an
    /// answer at once, or a payload to apply. `last` is the last package this stream
    /// accepted.
    async fn prepare(
        &self,
        session: &str,
        last: u64,
        pkg: &pb::Package,
        opened: Result<pb::PackagePayload, package::PackageError>,
    ) -> Result<Prepared, Status> {
        let seq = pkg.seq;
        let answer = |status, message| Ok(Prepared::Answer(ack_for(seq, status, message)));
        if seq == 0 {
            return answer(
                pb::AckStatus::Rejected,
                "package sequence numbers start at 1".into(),
            );
        }
        if seq > last + 1 {
            return answer(
                pb::AckStatus::Rejected,
                format!("out of order: expected package {}, got {seq}", last + 1),
            );
        }
        if seq <= last
            && let Some(sum) = self
                .inner
                .ledger
                .applied_checksum(session, seq)
                .await
                .map_err(db_status)?
            && sum == pkg.checksum
        {
            let mut a = ack_for(seq, pb::AckStatus::Ok, "already applied".into());
            a.duplicate = true;
            return Ok(Prepared::Answer(a));
        }
        match opened {
            Ok(p) => Ok(Prepared::Apply(p)),
            Err(e) => {
                tracing::warn!(session, seq, error = %e, "package refused");
                if e.over_limit() {
                    // A peer beyond the limits is cut off: the stream ends here.
                    return Err(Status::out_of_range(e.to_string()));
                }
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
        session: &str,
        site_name: &str,
        payload: pb::PackagePayload,
    ) -> Result<apply::Staged, Status> {
        let fs = self.site(site_name)?.fs.clone();
        let state = self.session_state(session, &fs);
        let max_path = self.inner.settings.limits.max_path_bytes;
        let staged = tokio::task::spawn_blocking(move || {
            let mut f = state.files.lock().expect("session files lock");
            (!f.aborted).then(|| apply::stage(&fs, &mut f, payload, max_path))
        })
        .await
        .map_err(|e| Status::internal(format!("apply task failed: {e}")))?;
        staged.ok_or_else(|| Status::failed_precondition(format!("session {session} was aborted")))
    }

    /// Publishes and records a staged package; returns its ack. A package the disk had
    /// no room for is not recorded: the source sends it again once there is space (or
    /// fails the job, as its channel says). `prev` is the step of the package before,
    /// whose record may still be running while this one is published; `step` tells the
    /// package after.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        self,
        session: String,
        site_name: String,
        seq: u64,
        checksum: Vec<u8>,
        staged: apply::Staged,
        mut prev: Option<watch::Receiver<Step>>,
        step: watch::Sender<Step>,
    ) -> Result<pb::PackageAck, Status> {
        let r = self
            .publish_and_record(
                &session, &site_name, seq, &checksum, staged, &mut prev, &step,
            )
            .await;
        let ok = matches!(&r, Ok(a) if a.status == pb::AckStatus::Ok as i32);
        step.send_replace(if ok { Step::Recorded } else { Step::Failed });
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish_and_record(
        &self,
        session: &str,
        site_name: &str,
        seq: u64,
        checksum: &[u8],
        staged: apply::Staged,
        prev: &mut Option<watch::Receiver<Step>>,
        step: &watch::Sender<Step>,
    ) -> Result<pb::PackageAck, Status> {
        // Chunks left to write go to the disk now, while the package before this one may
        // still be publishing and the next one is being staged.
        let staged = if staged.has_deferred() {
            tokio::task::spawn_blocking(move || apply::write_deferred(staged))
                .await
                .map_err(|e| Status::internal(format!("apply task failed: {e}")))?
        } else {
            staged
        };
        if staged.out.no_space || staged.out.not_written {
            return Ok(not_applied_ack(session, seq, staged.out));
        }
        if !reached(prev, Step::Published).await {
            apply::discard(staged);
            return Err(Status::aborted(format!(
                "package {seq} not published: an earlier package of the stream failed"
            )));
        }
        let fs = self.site(site_name)?.fs.clone();
        let state = self.session_state(session, &fs);
        let durability = self.inner.settings.durability;
        let applied: Option<Applied> = tokio::task::spawn_blocking(move || {
            let aborted = state.publishing.lock().expect("session publish lock");
            if *aborted {
                apply::discard(staged);
                return None;
            }
            Some(apply::publish(&fs, staged, durability))
        })
        .await
        .map_err(|e| Status::internal(format!("apply task failed: {e}")))?;
        let Some(mut applied) = applied else {
            return Err(Status::failed_precondition(format!(
                "session {session} was aborted"
            )));
        };
        let uncache = std::mem::take(&mut applied.to_uncache);
        if applied.no_space || applied.not_written {
            return Ok(not_applied_ack(session, seq, applied));
        }
        step.send_replace(Step::Published);
        // Published but not recorded, as after a crash: the source sends it again and
        // the target finds its files in place.
        if !reached(prev, Step::Recorded).await {
            return Err(Status::aborted(format!(
                "package {seq} not recorded: an earlier package of the stream was not"
            )));
        }
        self.inner
            .ledger
            .record_package(session, site_name, seq, checksum, &applied.changes)
            .await
            .map_err(db_status)?;
        self.inner
            .metrics
            .bytes_direct
            .get_or_create(&metrics::Metrics::site(site_name))
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

    /// Waits for a package being published, counts and sends its answer; false when the
    /// stream must stop (the answer was not a plain acknowledgement, or no one listens).
    /// True when nothing was pending.
    async fn settle_front(
        &self,
        site: &str,
        pending: &mut VecDeque<Pending>,
        tx: &mpsc::Sender<Result<pb::ImportResponse, Status>>,
    ) -> bool {
        let Some(p) = pending.pop_front() else {
            return true;
        };
        let reply = joined(p.task.await);
        self.answer(site, reply, p.started, tx).await
    }

    /// Settles every pending package, in order; false at the first that stops the
    /// stream (the ones after it publish nothing).
    async fn settle(
        &self,
        site: &str,
        pending: &mut VecDeque<Pending>,
        tx: &mpsc::Sender<Result<pb::ImportResponse, Status>>,
    ) -> bool {
        while !pending.is_empty() {
            if !self.settle_front(site, pending, tx).await {
                return false;
            }
        }
        true
    }

    /// Counts and sends one answer; false when the stream must stop.
    async fn answer(
        &self,
        site: &str,
        reply: Result<pb::PackageAck, Status>,
        started: std::time::Instant,
        tx: &mpsc::Sender<Result<pb::ImportResponse, Status>>,
    ) -> bool {
        self.count(site, &reply, started.elapsed());
        let go_on = matches!(&reply, Ok(a) if a.status == pb::AckStatus::Ok as i32);
        let item = reply.map(|ack| pb::ImportResponse {
            msg: Some(pb::import_response::Msg::Ack(ack)),
        });
        tx.send(item).await.is_ok() && go_on
    }

    /// Applies the packages of one Import stream, in order, as a pipeline: package N+1
    /// is staged (written, hashed) while N is published (flushed, put in place) and N-1
    /// recorded in the ledger. Answers stay in package order; after a failed package
    /// nothing later is published.
    async fn handle_import(
        self,
        session: ledger::SessionRow,
        inbound: Streaming<pb::ImportRequest>,
        tx: mpsc::Sender<Result<pb::ImportResponse, Status>>,
    ) {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        self.import_packages(session, inbound, tx, &mut pending)
            .await;
        // Packages behind one that stopped the stream drop what they staged once they
        // see its failure: wait for them, so that the session's next stream starts on
        // settled staging files.
        for p in pending {
            let _ = p.task.await;
        }
    }

    async fn import_packages(
        &self,
        session: ledger::SessionRow,
        inbound: Streaming<pb::ImportRequest>,
        tx: mpsc::Sender<Result<pb::ImportResponse, Status>>,
        pending: &mut VecDeque<Pending>,
    ) {
        let mut last = session.last_seq as u64;
        let (mut incoming, _reader) = read_ahead(inbound, self.inner.settings.limits.clone());
        loop {
            let next = tokio::select! {
                // An idle stream must not hold back the answers of packages in progress.
                r = async { (&mut pending.front_mut().expect("checked").task).await }, if !pending.is_empty() => {
                    let p = pending.pop_front().expect("checked");
                    if !self.answer(&session.site, joined(r), p.started, &tx).await {
                        return;
                    }
                    continue;
                }
                // The idle clock runs only while this loop waits for a package, as the
                // source may be waiting for acks of packages still being applied.
                m = tokio::time::timeout(IMPORT_IDLE_TIMEOUT, incoming.recv()) => {
                    m.map_or(Inbound::Idle, |m| m.unwrap_or(Inbound::End))
                }
            };
            let started = std::time::Instant::now();
            let (pkg, opened) = match next {
                Inbound::Package { pkg, opened } => (pkg, opened),
                Inbound::End => break,
                Inbound::Failed(status) => {
                    // A message over the size limit arrives here: the peer is told, then
                    // cut off (after the answer of a package still in progress).
                    tracing::info!(session = %session.id, %status, "import stream ended");
                    self.settle(&session.site, pending, &tx).await;
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                Inbound::Idle => {
                    self.settle(&session.site, pending, &tx).await;
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(
                            "import stream idle for too long",
                        )))
                        .await;
                    return;
                }
                Inbound::NotAPackage => {
                    self.settle(&session.site, pending, &tx).await;
                    let _ = tx
                        .send(Err(Status::invalid_argument("expected a package")))
                        .await;
                    return;
                }
            };
            slow_apply_failpoint().await;
            let span = tracing::info_span!("apply_package", seq = pkg.seq, site = %session.site);
            let prepared = self
                .prepare(&session.id, last, &pkg, opened)
                .instrument(span.clone())
                .await;
            let payload = match prepared {
                Ok(Prepared::Apply(payload)) => payload,
                other => {
                    if !self.settle(&session.site, pending, &tx).await {
                        return;
                    }
                    let reply = other.map(|p| match p {
                        Prepared::Answer(a) => a,
                        Prepared::Apply(_) => unreachable!("matched above"),
                    });
                    let fatal = reply.is_err();
                    // A refused package leaves `last` as it was, so what follows it is out
                    // of order until the source rewinds.
                    if !self.answer(&session.site, reply, started, &tx).await && fatal {
                        return;
                    }
                    continue;
                }
            };
            // A symlink placed by a package in progress could change what this one's
            // parent checks see: wait for it.
            if pending.iter().any(|p| p.places_symlinks)
                && !self.settle(&session.site, pending, &tx).await
            {
                return;
            }
            let staged = self
                .stage(&session.id, &session.site, payload)
                .instrument(span.clone())
                .await;
            // At most one package writing, one publishing and one recording while this
            // one joins.
            while pending.len() >= PENDING_MAX {
                if !self.settle_front(&session.site, pending, &tx).await {
                    if let Ok(s) = staged {
                        apply::discard(s);
                    }
                    return;
                }
            }
            let staged = match staged {
                Ok(s) => s,
                Err(status) => {
                    if self.settle(&session.site, pending, &tx).await {
                        self.answer(&session.site, Err(status), started, &tx).await;
                    }
                    return;
                }
            };
            let no_space = staged.out.no_space;
            let places_symlinks = staged.places_symlinks();
            let prev = pending.back().map(|p| p.step.clone());
            let (step_tx, step) = watch::channel(Step::Publishing);
            let task = tokio::spawn(
                self.clone()
                    .finish(
                        session.id.clone(),
                        session.site.clone(),
                        pkg.seq,
                        pkg.checksum,
                        staged,
                        prev,
                        step_tx,
                    )
                    .instrument(span),
            );
            pending.push_back(Pending {
                task,
                started,
                places_symlinks,
                step,
            });
            if no_space {
                // Answered at once; `last` stays, as for any package not recorded.
                self.settle(&session.site, pending, &tx).await;
                continue;
            }
            last = last.max(pkg.seq);
        }
        self.settle(&session.site, pending, &tx).await;
    }
}

/// A message of an Import stream as [`read_ahead`] passes it on.
enum Inbound {
    /// A package, opened (checksum checked, payload decoded) when it arrived.
    Package {
        pkg: pb::Package,
        opened: Result<pb::PackagePayload, package::PackageError>,
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
) -> (mpsc::Receiver<Inbound>, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(1);
    let task = tokio::spawn(async move {
        loop {
            let m = match inbound.message().await {
                Ok(Some(pb::ImportRequest {
                    msg: Some(pb::import_request::Msg::Package(pkg)),
                })) => {
                    let opened = package::open(&pkg, &limits);
                    Inbound::Package { pkg, opened }
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

type BoxStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl TargetApi for TargetService {
    async fn open_session(
        &self,
        req: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        let r = req.into_inner();
        if r.job_id.is_empty() {
            return Err(Status::invalid_argument("job_id is required"));
        }
        self.site(&r.site)?;
        if r.lineage
            .iter()
            .any(|l| l == &self.inner.settings.target_id)
        {
            return Err(Status::failed_precondition(format!(
                "job {} already passed through target {} (lineage loop)",
                r.job_id, self.inner.settings.target_id
            )));
        }
        let s = self
            .inner
            .ledger
            .open_session(&r.job_id, &r.site, &r.channel)
            .await
            .map_err(db_status)?;
        self.inner
            .lineages
            .lock()
            .expect("lineages lock")
            .insert(s.id.clone(), r.lineage.clone());
        tracing::info!(session = %s.id, last_seq = s.last_seq, "session opened");
        Ok(Response::new(pb::OpenSessionResponse {
            session_id: s.id,
            last_applied_seq: s.last_seq as u64,
            committed: s.state == "committed",
            max_message_bytes: self.inner.settings.limits.max_message_bytes as u64,
            max_entries_per_package: self.inner.settings.limits.max_entries as u32,
            target_id: self.inner.settings.target_id.clone(),
        }))
    }

    type GetManifestStream = BoxStream<pb::ManifestBatch>;

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> Result<Response<Self::GetManifestStream>, Status> {
        let r = req.into_inner();
        self.site(&r.site)?;
        let ledger = self.inner.ledger.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut after = if r.after_path.is_empty() {
                Vec::new()
            } else {
                cms_mirror::model::tree_key(&r.after_path)
            };
            loop {
                let page = match ledger.manifest_page(&r.site, &after, 2000).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(db_status(e))).await;
                        return;
                    }
                };
                let Some(lastp) = page.last() else { return };
                after = cms_mirror::model::tree_key(&lastp.path);
                let batch = pb::ManifestBatch {
                    entries: page
                        .iter()
                        .map(|i| pb::ManifestEntry {
                            meta: Some(i.to_pb()),
                        })
                        .collect(),
                };
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ImportStream = BoxStream<pb::ImportResponse>;

    async fn import(
        &self,
        req: Request<Streaming<pb::ImportRequest>>,
    ) -> Result<Response<Self::ImportStream>, Status> {
        let mut inbound = req.into_inner();
        let header = match inbound.message().await? {
            Some(pb::ImportRequest {
                msg: Some(pb::import_request::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first Import message must be an ImportHeader",
                ));
            }
        };
        let session = self
            .inner
            .ledger
            .session(&header.session_id)
            .await
            .map_err(db_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown session {:?}; call OpenSession first",
                    header.session_id
                ))
            })?;
        if session.state == "committed" {
            return Err(Status::failed_precondition(format!(
                "session {} is already committed",
                session.id
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(
            self.clone()
                .handle_import(session, inbound, tx)
                .in_current_span(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let r = req.into_inner();
        let ledger = &self.inner.ledger;
        let s = ledger
            .session(&r.session_id)
            .await
            .map_err(db_status)?
            .ok_or_else(|| Status::not_found(format!("unknown session {:?}", r.session_id)))?;
        let site = self.site(&s.site)?;
        if r.abort {
            // Under the session's lock: an apply still running for a dropped stream
            // finishes first, and no later package of this session is applied.
            let state = self.session_state(&s.id, &site.fs);
            let fs = site.fs.clone();
            tokio::task::spawn_blocking(move || {
                let mut aborted = state.publishing.lock().expect("session publish lock");
                *aborted = true;
                let mut f = state.files.lock().expect("session files lock");
                apply::abort_session(&fs, &mut f);
            })
            .await
            .map_err(|e| Status::internal(format!("abort task failed: {e}")))?;
            ledger.abort_session(&s.id).await.map_err(db_status)?;
            self.inner
                .lineages
                .lock()
                .expect("lineages lock")
                .remove(&s.id);
            tracing::info!(session = %s.id, "session aborted");
            return Ok(Response::new(pb::CommitResponse::default()));
        }
        if s.state != "committed" {
            if s.last_seq as u64 != r.last_seq {
                return Err(Status::failed_precondition(format!(
                    "commit of session {} at package {} but {} applied",
                    s.id, r.last_seq, s.last_seq
                )));
            }
            let dirs = ledger
                .touched_dirs(&s.id, &s.site)
                .await
                .map_err(db_status)?;
            let fs = site.fs.clone();
            let sdir = fs.session_dir(&s.id);
            tokio::task::spawn_blocking(move || {
                apply::restore_dir_times(&fs.root, &dirs);
                let _ = std::fs::remove_dir_all(sdir);
                // Leave no trace in the site once nothing is in progress.
                let _ = std::fs::remove_dir(fs.staging());
            })
            .await
            .map_err(|e| Status::internal(format!("commit task failed: {e}")))?;
            self.inner
                .sessions
                .lock()
                .expect("sessions lock")
                .remove(&s.id);
        }
        let first_commit = s.state != "committed";
        let mut lineage = self
            .inner
            .lineages
            .lock()
            .expect("lineages lock")
            .remove(&s.id)
            .unwrap_or_default();
        let (created, updated, deleted) = ledger
            .commit_session(&s.id, &s.site)
            .await
            .map_err(db_status)?;
        tracing::info!(session = %s.id, created, updated, deleted, "session committed");
        let mut hooks = Vec::new();
        if first_commit {
            self.inner
                .metrics
                .sessions_committed
                .get_or_create(&metrics::Metrics::site(&s.site))
                .inc();
            let cfg = self.inner.settings.sites.iter().find(|c| c.name == s.site);
            if let Some(cfg) = cfg.filter(|c| r.run_hooks && !c.hooks.is_empty()) {
                let mut ch = hooks::Changes {
                    job_id: s.job_id.clone(),
                    channel: s.channel.clone(),
                    site: s.site.clone(),
                    base_url: cfg.base_url.clone(),
                    created: Vec::new(),
                    updated: Vec::new(),
                    deleted: Vec::new(),
                };
                for (path, action) in ledger.changes(&s.id).await.map_err(db_status)? {
                    match action.as_str() {
                        "created" => ch.created.push(path),
                        "updated" => ch.updated.push(path),
                        _ => ch.deleted.push(path),
                    }
                }
                hooks = hooks::run_all(&cfg.hooks, &ch).await;
            }
            if let Some(cfg) = cfg.filter(|c| r.run_hooks && !c.push.is_empty()) {
                lineage.push(self.inner.settings.target_id.clone());
                for p in &cfg.push {
                    hooks.push(hooks::push(p, &s.job_id, lineage.clone()).await);
                }
            }
        }
        Ok(Response::new(pb::CommitResponse {
            items_created: created,
            items_updated: updated,
            items_deleted: deleted,
            hooks,
        }))
    }
}

/// Serves the target service, gRPC health and reflection on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    service: TargetService,
    security: cms_mirror::security::ServerSecurity,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let mut server = cms_mirror::transport::secure_server(&security)?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    cms_mirror::observe::follow_database(
        health_reporter,
        <TargetServiceServer<TargetService> as tonic::server::NamedService>::NAME,
        service.inner.ledger.db().clone(),
    )
    .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cms_mirror::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set is valid");
    let max = service.inner.settings.limits.max_message_bytes;
    server
        .add_service(health)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            TargetServiceServer::new(service)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            security.auth,
        ))
        .serve_with_incoming_shutdown(cms_mirror::transport::incoming(listener), shutdown)
        .await
        .map_err(|e| cms_mirror::security::error_chain(&e))
}

/// Test failpoint `CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS=N`: every package waits N ms
/// before it is applied (a slow target disk), so tests can watch a job in flight.
async fn slow_apply_failpoint() {
    static DELAY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        let ms = std::env::var("CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS")
            .ok()?
            .parse()
            .ok()?;
        tracing::warn!(
            ms,
            "failpoint: every package is delayed; never in production"
        );
        Some(ms)
    });
    if let Some(ms) = delay {
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
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
