//! cms-mirror source service.
//!
//! - [`App`]: shared state (configuration, job store, event bus, running jobs).
//! - [`SourceService`]: the gRPC `SourceService` (StartJob, GetJob, ListJobs, CancelJob,
//!   ListChannels, WatchJobs, GetPlan).
//! - [`runner`]: the worker that claims jobs and runs each target's session.
//! - [`plan`] and [`packer`]: the merge-join planner and the package builder.
//! - [`events`]: stored-then-broadcast job events.
//! - [`start`]: wires it all on a bound listener.
#![forbid(unsafe_code)]

pub mod bwlimit;
pub mod error;
pub mod events;
#[cfg(feature = "failpoints")]
pub mod failpoints;
pub mod generations;
pub mod health;
pub mod metrics;
pub mod packer;
pub mod plan;
pub mod runner;
pub mod triggers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use cms_mirror::config::{ChannelConfig, MirrorConfig};
use cms_mirror::jobstore::{EventRow, JobOptions, JobRow, JobStore, NewJob, StoreError};
use cms_mirror::pb;
use cms_mirror::pb::source_service_server::{SourceService as SourceApi, SourceServiceServer};
use cms_mirror::transport::ServeError;
use cms_mirror::{ms_to_rfc3339, now_ms};

pub use error::SourceError;
use events::EventBus;

/// Shared state of a source instance.
pub struct App {
    /// The configuration now: `reload` replaces it (running jobs keep their channel as
    /// it was when they started).
    config: std::sync::RwLock<Arc<MirrorConfig>>,
    /// Stops the trigger tasks of the configuration now.
    triggers: Mutex<Option<watch::Sender<bool>>>,
    pub store: JobStore,
    pub bus: EventBus,
    /// Plans and other per-job files.
    pub data_dir: PathBuf,
    /// Identifies this instance in job leases.
    pub instance_id: String,
    /// How long a claimed job stays ours without renewal.
    pub lease_ms: i64,
    /// Wakes the worker when a job is queued.
    pub wake: Notify,
    /// Cancel switches of the jobs this instance runs.
    pub running: Mutex<HashMap<String, watch::Sender<bool>>>,
    pub metrics: metrics::Metrics,
    /// The last check of each (channel, target).
    pub health: Mutex<HashMap<(String, String), pb::TargetHealth>>,
    /// How often every target is checked (`None`: only on demand).
    pub check_every: Option<std::time::Duration>,
    /// Finished jobs older than this are removed (`None`: kept for ever).
    pub keep_jobs: Option<std::time::Duration>,
    /// The limit of the whole service (`--bwlimit`), shared by every target's stream.
    pub bwlimit: Option<Arc<bwlimit::Pacer>>,
    /// The limits of targets that set `bwlimit`.
    pub pacers: bwlimit::Pacers,
}

impl App {
    /// Where the plans of a job's targets are stored.
    pub fn plans_of(&self, job: &str) -> PathBuf {
        self.data_dir.join("plans").join(job)
    }

    /// Where the plan of one target of a job is stored.
    pub fn plan_dir(&self, job: &str, target: &str) -> PathBuf {
        self.plans_of(job)
            .join(&blake3::hash(target.as_bytes()).to_hex().as_str()[..16])
    }

    pub fn new(config: MirrorConfig, store: JobStore, data_dir: PathBuf) -> App {
        let instance_id = unique_instance("source");
        App {
            config: std::sync::RwLock::new(Arc::new(config)),
            triggers: Mutex::new(None),
            bus: EventBus::new(store.clone()),
            store,
            data_dir,
            instance_id,
            lease_ms: 15_000,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            metrics: metrics::Metrics::new(),
            health: Mutex::new(HashMap::new()),
            check_every: Some(DEFAULT_CHECK_EVERY),
            keep_jobs: None,
            bwlimit: None,
            pacers: bwlimit::Pacers::default(),
        }
    }

    /// The configuration now.
    pub fn config(&self) -> Arc<MirrorConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Replaces the configuration (SIGHUP): new and changed channels, schedules and
    /// watches take effect at once; running jobs go on with the channel they started with.
    pub async fn reload(self: &Arc<Self>, config: MirrorConfig) {
        let channels = config.channels.len();
        *self.config.write().expect("config lock") = Arc::new(config);
        self.restart_triggers().await;
        tracing::info!(channels, "configuration reloaded");
    }

    /// (Re)starts the schedule and watch tasks of the configuration now.
    async fn restart_triggers(self: &Arc<Self>) {
        let (tx, rx) = watch::channel(false);
        if let Some(old) = self.triggers.lock().expect("triggers lock").replace(tx) {
            let _ = old.send(true);
        }
        triggers::start(self.clone(), rx).await;
    }

    /// Names this instance `NAME-xxxxxxxxxxxx` (before it is started).
    pub fn set_instance_name(&mut self, name: &str) {
        self.instance_id = unique_instance(name);
    }

    /// The metrics page: refreshes the gauges read from elsewhere, then encodes.
    pub async fn render_metrics(&self) -> String {
        self.metrics.subscribers.set(self.bus.subscribers() as i64);
        if let Ok(states) = self.store.channel_states().await {
            let now = cms_mirror::now_ms();
            for st in states {
                if let Some(at) = st.last_success_at {
                    self.metrics
                        .sync_lag
                        .get_or_create(&metrics::Metrics::target(&st.channel, &st.target))
                        .set((now - at).max(0) as f64 / 1000.0);
                }
            }
        }
        self.metrics.render()
    }
}

/// A rollback goes to a generation: only on a channel published atomically, and it
/// mirrors nothing (no dry run, paths, full or checksum comparison).
fn check_rollback(ch: &ChannelConfig, req: &pb::StartJobRequest) -> Result<(), SourceError> {
    if ch.publish != cms_mirror::config::Publish::Atomic {
        return Err(SourceError::InvalidRollback(format!(
            "channel {:?} publishes in place: it keeps no generations to roll back to (publish = \"atomic\")",
            ch.name
        )));
    }
    if req.dry_run || req.full || req.checksum || !req.paths.is_empty() {
        return Err(SourceError::InvalidRollback(
            "a rollback mirrors nothing: it takes no dry run, full, checksum or paths".into(),
        ));
    }
    Ok(())
}

/// The paths of a StartJob: safe relative paths (for a wagtail channel also page URL
/// paths, `/home/news/`); a directory channel's each in the source or at least its
/// directory (a path gone from the source mirrors its deletion; one whose directory is
/// not there either is a typo).
async fn check_paths(
    ch: &cms_mirror::config::ChannelConfig,
    paths: &[String],
) -> Result<(), SourceError> {
    for p in paths {
        if ch.pages.is_some() && p.starts_with('/') {
            if p.len() > 4096 || p.split('/').any(|c| c == "..") || p.contains('\0') {
                return Err(SourceError::InvalidPath(format!(
                    "{p:?} is not a page URL path"
                )));
            }
            continue;
        }
        cms_mirror::pathsafe::validate(p, 4096)
            .map_err(|e| SourceError::InvalidPath(e.to_string()))?;
        if ch.pages.is_some() {
            continue;
        }
        let item = ch.source.join(p);
        let here = async |q: &Path| tokio::fs::symlink_metadata(q).await.is_ok();
        let dir = item.parent().unwrap_or(&ch.source);
        if !here(&item).await && !here(dir).await {
            return Err(SourceError::InvalidPath(format!(
                "{p:?} is not in the source directory {}, nor is its directory",
                ch.source.display()
            )));
        }
    }
    Ok(())
}

fn store_status(e: StoreError) -> Status {
    SourceError::from(e).into()
}

impl SourceService {
    /// Refuses a channel the configuration does not have.
    fn known_channel(&self, name: Option<&str>) -> Result<(), Status> {
        match name {
            Some(n) if self.app.config().channel(n).is_none() => {
                Err(SourceError::UnknownChannel(n.to_string()).into())
            }
            _ => Ok(()),
        }
    }

    /// The job a request names by its id or a unique prefix of it.
    async fn job_id(&self, given: &str) -> Result<String, Status> {
        self.app
            .store
            .resolve_job_id(given)
            .await
            .map_err(store_status)
    }
}

fn trigger_name(t: i32) -> &'static str {
    match pb::Trigger::try_from(t).unwrap_or(pb::Trigger::Unspecified) {
        pb::Trigger::Schedule => "schedule",
        pb::Trigger::Api => "api",
        pb::Trigger::Watch => "watch",
        pb::Trigger::Admin | pb::Trigger::Unspecified => "admin",
    }
}

fn trigger_pb(s: &str) -> pb::Trigger {
    match s {
        "schedule" => pb::Trigger::Schedule,
        "api" => pb::Trigger::Api,
        "watch" => pb::Trigger::Watch,
        _ => pb::Trigger::Admin,
    }
}

fn state_pb(s: &str) -> pb::JobState {
    use cms_mirror::jobstore::JobState as S;
    match S::parse(s) {
        Some(S::Queued) => pb::JobState::Queued,
        Some(S::Running) => pb::JobState::Running,
        Some(S::Succeeded) => pb::JobState::Succeeded,
        Some(S::CompletedWithErrors) => pb::JobState::CompletedWithErrors,
        Some(S::Failed) => pb::JobState::Failed,
        Some(S::Cancelled) => pb::JobState::Cancelled,
        None => pb::JobState::Unspecified,
    }
}

fn event_pb(e: &EventRow, channel: &str, missed: u64) -> pb::JobEvent {
    pb::JobEvent {
        id: e.id as u64,
        job_id: e.job_id.clone(),
        seq: e.seq as u64,
        kind: e.kind.clone(),
        at: ms_to_rfc3339(e.at),
        channel: channel.to_string(),
        target: e.target.clone(),
        data_json: e.data_json.clone(),
        missed,
    }
}

/// The gRPC source service.
#[derive(Clone)]
pub struct SourceService {
    app: Arc<App>,
}

impl SourceService {
    pub fn new(app: Arc<App>) -> SourceService {
        SourceService { app }
    }

    async fn job_pb(&self, j: JobRow, detail: bool) -> Result<pb::Job, Status> {
        let store = &self.app.store;
        let targets = store.targets(&j.id).await.map_err(store_status)?;
        let errors = if detail {
            store.item_errors(&j.id).await.map_err(store_status)?
        } else {
            Vec::new()
        };
        let o = j.options();
        Ok(pb::Job {
            state: state_pb(&j.state) as i32,
            trigger: trigger_pb(&j.trigger_kind) as i32,
            requested_by: j.requested_by.clone(),
            created_at: ms_to_rfc3339(j.created_at),
            started_at: j.started_at.map(ms_to_rfc3339).unwrap_or_default(),
            finished_at: j.finished_at.map(ms_to_rfc3339).unwrap_or_default(),
            error: j.error.clone().unwrap_or_default(),
            summary: j.summary.clone().unwrap_or_default(),
            targets: targets
                .into_iter()
                .map(|t| pb::TargetProgress {
                    target: t.target,
                    url: t.url,
                    site: t.site,
                    state: t.state,
                    items_total: t.items_total as u64,
                    bytes_total: t.bytes_total as u64,
                    deletes_total: t.deletes_total as u64,
                    items_done: t.items_done as u64,
                    bytes_done: t.bytes_done as u64,
                    deletes_done: t.deletes_done as u64,
                    packages_sent: t.packages_sent as u64,
                    packages_acked: t.packages_acked as u64,
                    item_errors: t.item_errors as u64,
                    error: t.error.unwrap_or_default(),
                    bytes_on_wire: t.bytes_on_wire as u64,
                    packages_retried: t.packages_retried as u64,
                    reconnects: t.reconnects as u64,
                    planned: t.planned != 0,
                    last_acked_seq: t.checkpoint_seq as u64,
                })
                .collect(),
            item_errors: errors
                .into_iter()
                .map(|e| pb::JobItemError {
                    target: e.target,
                    at: ms_to_rfc3339(e.at),
                    error: Some(pb::ItemError {
                        path: e.path,
                        code: e.code,
                        message: e.message,
                        retryable: e.retryable != 0,
                    }),
                })
                .collect(),
            dry_run: o.dry_run,
            full: o.full,
            checksum: o.checksum,
            paths: o.paths,
            rollback: o.rollback,
            rollback_to: o.rollback_to,
            id: j.id,
            channel: j.channel,
        })
    }

    /// Queues a job for a channel (used by the API, the scheduler and the watcher).
    pub async fn start_job(
        &self,
        req: pb::StartJobRequest,
    ) -> Result<pb::StartJobResponse, SourceError> {
        use cms_mirror::bounds::{self, MAX_LINEAGE, MAX_NAME_BYTES, MAX_PATHS, MAX_TEXT_BYTES};
        bounds::text("channel", &req.channel, MAX_NAME_BYTES)?;
        bounds::text("requested_by", &req.requested_by, MAX_TEXT_BYTES)?;
        bounds::list("lineage", &req.lineage, MAX_LINEAGE, MAX_NAME_BYTES)?;
        bounds::list("paths", &req.paths, MAX_PATHS, usize::MAX)?;
        let config = self.app.config();
        let Some(ch) = config.channel(&req.channel) else {
            return Err(SourceError::UnknownChannel(req.channel));
        };
        check_paths(ch, &req.paths).await?;
        if req.rollback {
            check_rollback(ch, &req)?;
        }
        let max_delete = (!req.max_delete.is_empty()).then_some(req.max_delete);
        if let Some(m) = &max_delete {
            cms_mirror::config::MaxDelete::parse(m).map_err(SourceError::InvalidMaxDelete)?;
        }
        let new = NewJob {
            channel: ch.name.clone(),
            trigger: trigger_name(req.trigger).to_string(),
            requested_by: req.requested_by.clone(),
            options: JobOptions {
                full: req.full,
                dry_run: req.dry_run,
                checksum: req.checksum,
                paths: req.paths,
                lineage: req.lineage,
                max_delete,
                rollback: req.rollback,
                rollback_to: req.rollback_to,
                trace: cms_mirror::telemetry::current_context(),
            },
            targets: ch
                .targets
                .iter()
                .map(|t| (t.name.clone(), t.url.clone(), t.site.clone()))
                .collect(),
        };
        let (job, coalesced) = self.app.store.create_job(new).await?;
        if !coalesced {
            self.app
                .bus
                .emit(&job.id, "queued", "", serde_json::json!({"channel": job.channel, "trigger": job.trigger_kind, "requested_by": job.requested_by}))
                .await;
        }
        self.app.wake.notify_one();
        tracing::info!(job = %job.id, channel = %job.channel, coalesced, "job queued");
        Ok(pb::StartJobResponse {
            job_id: job.id,
            coalesced,
        })
    }
}

type BoxStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// One WatchJobs stream: replays stored events, then follows live ones; a gap in one
/// job's sequence, a watcher too slow for the live feed, or (for one job) a poll tick
/// each second makes it catch up from the store, so a job run by another instance is
/// followed too.
struct Watcher {
    store: JobStore,
    tx: mpsc::Sender<Result<pb::JobEvent, Status>>,
    one_job: Option<String>,
    channel_filter: Option<String>,
    /// Each job's channel, as looked up.
    channels: HashMap<String, String>,
    /// For all jobs: the last event id sent (`i64::MAX`: live only, no catching up).
    last_id: i64,
    /// For one job: the last per-job sequence number sent.
    last_seq: i64,
}

/// Whether a watch goes on.
enum Watch {
    On,
    Over,
}

impl Watcher {
    async fn run(
        &mut self,
        mut live: tokio::sync::broadcast::Receiver<EventRow>,
        live_only: bool,
        since: i64,
    ) {
        // For one job `since` is its per-job sequence number; for all jobs, a global id.
        if self.one_job.is_some() {
            self.last_seq = since;
        }
        if live_only {
            self.last_id = i64::MAX;
        } else {
            if self.one_job.is_none() {
                self.last_id = since;
            }
            if let Watch::Over = self.replay_stored().await {
                return;
            }
        }
        let mut poll = tokio::time::interval(std::time::Duration::from_secs(1));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let received = match &self.one_job {
                Some(_) => tokio::select! {
                    r = live.recv() => Some(r),
                    _ = poll.tick() => None,
                },
                None => Some(live.recv().await),
            };
            use tokio::sync::broadcast::error::RecvError;
            let step = match received {
                None => self.catch_up(0).await,
                Some(Ok(e)) if self.gap_before(&e) => self.catch_up(0).await,
                Some(Ok(e)) => self.live(e).await,
                Some(Err(RecvError::Lagged(n))) => {
                    tracing::debug!(missed = n, "watcher lagged; catching up from the store");
                    self.catch_up(n).await
                }
                Some(Err(RecvError::Closed)) => Watch::Over,
            };
            if let Watch::Over = step {
                return;
            }
        }
    }

    /// Whether a live event of the watched job comes after one not seen yet.
    fn gap_before(&self, e: &EventRow) -> bool {
        self.one_job.as_ref().is_some_and(|id| e.job_id == *id) && e.seq > self.last_seq + 1
    }

    async fn channel_of(&mut self, job: &str) -> String {
        if let Some(c) = self.channels.get(job) {
            return c.clone();
        }
        let c = self
            .store
            .get_job(job)
            .await
            .map(|j| j.channel)
            .unwrap_or_default();
        self.channels.insert(job.to_string(), c.clone());
        c
    }

    /// Stored events after what was sent.
    async fn stored(&self) -> Result<Vec<EventRow>, StoreError> {
        match &self.one_job {
            Some(id) => self.store.events_of_job(id, self.last_seq).await,
            None => {
                let chf = self.channel_filter.as_deref();
                self.store.events_after(chf, self.last_id, 10_000).await
            }
        }
    }

    /// Sends one event; over when no one listens or the watched job finished.
    async fn send(&mut self, e: &EventRow, missed: u64) -> Watch {
        let c = self.channel_of(&e.job_id).await;
        let done = e.kind == "finished" && self.one_job.is_some();
        if self.tx.send(Ok(event_pb(e, &c, missed))).await.is_err() || done {
            return Watch::Over;
        }
        Watch::On
    }

    /// The replay at the start.
    async fn replay_stored(&mut self) -> Watch {
        let evs = match self.stored().await {
            Ok(evs) => evs,
            Err(e) => {
                let _ = self.tx.send(Err(store_status(e))).await;
                return Watch::Over;
            }
        };
        for e in evs {
            self.last_id = self.last_id.max(e.id);
            self.last_seq = e.seq;
            if let Watch::Over = self.send(&e, 0).await {
                return Watch::Over;
            }
        }
        Watch::On
    }

    /// Catches up from the store (then says how many it missed live).
    async fn catch_up(&mut self, mut missed: u64) -> Watch {
        let evs = match self.stored().await {
            Ok(v) => v,
            Err(e) => {
                let _ = self.tx.send(Err(store_status(e))).await;
                return Watch::Over;
            }
        };
        for e in evs {
            if self.one_job.is_none() && e.id <= self.last_id {
                continue;
            }
            self.last_id = self.last_id.max(e.id);
            self.last_seq = e.seq;
            if let Watch::Over = self.send(&e, missed).await {
                return Watch::Over;
            }
            missed = 0;
        }
        Watch::On
    }

    /// A live event: sent unless already sent or not watched.
    async fn live(&mut self, e: EventRow) -> Watch {
        let seen = match &self.one_job {
            Some(id) => &e.job_id != id || e.seq <= self.last_seq,
            None => e.id <= self.last_id && self.last_id != i64::MAX,
        };
        if seen {
            return Watch::On;
        }
        if let Some(f) = self.channel_filter.clone()
            && self.channel_of(&e.job_id).await != f
        {
            return Watch::On;
        }
        if self.last_id != i64::MAX {
            self.last_id = self.last_id.max(e.id);
        }
        self.last_seq = e.seq;
        self.send(&e, 0).await
    }
}

#[tonic::async_trait]
impl SourceApi for SourceService {
    async fn start_job(
        &self,
        req: Request<pb::StartJobRequest>,
    ) -> Result<Response<pb::StartJobResponse>, Status> {
        Ok(Response::new(
            SourceService::start_job(self, req.into_inner()).await?,
        ))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = self.job_id(&req.into_inner().job_id).await?;
        let j = self.app.store.get_job(&id).await.map_err(store_status)?;
        Ok(Response::new(self.job_pb(j, true).await?))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = req.into_inner();
        let limit = if r.limit == 0 { 50 } else { r.limit.min(1000) } as i64;
        let ch = (!r.channel.is_empty()).then_some(r.channel.as_str());
        self.known_channel(ch)?;
        let rows = self
            .app
            .store
            .list_jobs(ch, limit)
            .await
            .map_err(store_status)?;
        let mut jobs = Vec::with_capacity(rows.len());
        for j in rows {
            jobs.push(self.job_pb(j, false).await?);
        }
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let id = self.job_id(&req.into_inner().job_id).await?;
        let was_queued = self
            .app
            .store
            .request_cancel(&id)
            .await
            .map_err(store_status)?;
        if was_queued {
            self.app
                .bus
                .emit(&id, "finished", "", serde_json::json!({"state": "cancelled", "error": "cancelled before it started", "summary": ""}))
                .await;
        } else if let Some(tx) = self.app.running.lock().expect("running lock").get(&id) {
            let _ = tx.send(true);
        }
        let j = self.app.store.get_job(&id).await.map_err(store_status)?;
        Ok(Response::new(self.job_pb(j, true).await?))
    }

    async fn list_channels(
        &self,
        _req: Request<pb::ListChannelsRequest>,
    ) -> Result<Response<pb::ListChannelsResponse>, Status> {
        let states = self
            .app
            .store
            .channel_states()
            .await
            .map_err(store_status)?;
        let now = now_ms();
        let mut channels = Vec::new();
        for c in &self.app.config().channels {
            let last = self
                .app
                .store
                .list_jobs(Some(&c.name), 1)
                .await
                .map_err(store_status)?;
            channels.push(pb::Channel {
                name: c.name.clone(),
                source: c.source.display().to_string(),
                schedule: c.schedule.clone().unwrap_or_default(),
                delete: c.delete,
                publish: match c.publish {
                    cms_mirror::config::Publish::InPlace => "in_place".into(),
                    cms_mirror::config::Publish::Atomic => "atomic".into(),
                },
                last_job_id: last.first().map(|j| j.id.clone()).unwrap_or_default(),
                last_job_state: last.first().map(|j| state_pb(&j.state) as i32).unwrap_or(0),
                targets: c
                    .targets
                    .iter()
                    .map(|t| {
                        let st = states
                            .iter()
                            .find(|s| s.channel == c.name && s.target == t.name);
                        let at = st.and_then(|s| s.last_success_at);
                        let lag_seconds = at.map(|a| (now - a) / 1000).unwrap_or(-1);
                        let health = self.app.health.lock().expect("health lock");
                        pb::ChannelTarget {
                            name: t.name.clone(),
                            url: t.url.clone(),
                            site: t.site.clone(),
                            last_success_at: at.map(ms_to_rfc3339).unwrap_or_default(),
                            lag_seconds,
                            health: health.get(&(c.name.clone(), t.name.clone())).cloned(),
                            lagging: health::lagging(c, lag_seconds),
                        }
                    })
                    .collect(),
            });
        }
        Ok(Response::new(pb::ListChannelsResponse { channels }))
    }

    type WatchJobsStream = BoxStream<pb::JobEvent>;

    async fn watch_jobs(
        &self,
        req: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        let mut r = req.into_inner();
        if !r.job_id.is_empty() {
            r.job_id = self.job_id(&r.job_id).await?;
        }
        let store = self.app.store.clone();
        let one_job = (!r.job_id.is_empty()).then(|| r.job_id.clone());
        let job_channel = match &one_job {
            Some(id) => Some(store.get_job(id).await.map_err(store_status)?.channel),
            None => None,
        };
        // Subscribe before replaying, so nothing falls between the two.
        let live = self.app.bus.subscribe();
        let (tx, rx) = mpsc::channel::<Result<pb::JobEvent, Status>>(256);
        let mut w = Watcher {
            store,
            tx,
            channel_filter: (!r.channel.is_empty()).then(|| r.channel.clone()),
            channels: one_job.clone().zip(job_channel).into_iter().collect(),
            one_job,
            last_id: 0,
            last_seq: 0,
        };
        tokio::spawn(async move { w.run(live, r.live_only, r.since as i64).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_generations(
        &self,
        req: Request<pb::ListGenerationsRequest>,
    ) -> Result<Response<pb::ListGenerationsResponse>, Status> {
        let r = req.into_inner();
        self.known_channel(Some(&r.channel))?;
        let config = self.app.config();
        let ch = config
            .channel(&r.channel)
            .ok_or_else(|| SourceError::UnknownChannel(r.channel.clone()))?;
        let targets = generations::list_all(ch).await;
        Ok(Response::new(pb::ListGenerationsResponse { targets }))
    }

    async fn check_targets(
        &self,
        req: Request<pb::CheckTargetsRequest>,
    ) -> Result<Response<pb::CheckTargetsResponse>, Status> {
        let r = req.into_inner();
        let channel = (!r.channel.is_empty()).then_some(r.channel.as_str());
        self.known_channel(channel)?;
        let targets = health::check_all(&self.app, channel).await;
        health::record(&self.app, &targets);
        Ok(Response::new(pb::CheckTargetsResponse { targets }))
    }

    type GetPlanStream = BoxStream<pb::PlanItem>;

    async fn get_plan(
        &self,
        req: Request<pb::GetPlanRequest>,
    ) -> Result<Response<Self::GetPlanStream>, Status> {
        let mut r = req.into_inner();
        r.job_id = self.job_id(&r.job_id).await?;
        let targets = self
            .app
            .store
            .targets(&r.job_id)
            .await
            .map_err(store_status)?;
        if targets.is_empty() {
            return Err(SourceError::JobNotFound(r.job_id).into());
        }
        let dirs: Vec<(String, PathBuf)> = targets
            .into_iter()
            .filter(|t| r.target.is_empty() || t.target == r.target)
            .map(|t| {
                let d = self.app.plan_dir(&r.job_id, &t.target);
                (t.target, d)
            })
            .collect();
        let (tx, rx) = mpsc::channel(64);
        tokio::task::spawn_blocking(move || {
            for (target, dir) in dirs {
                let Ok(mut rd) = plan::PlanReader::open(
                    &dir,
                    &plan::Cursor::default(),
                    plan::PhaseName::ALL.to_vec(),
                ) else {
                    continue;
                };
                while let Ok(Some((ph, e, _))) = rd.next_entry() {
                    let item = pb::PlanItem {
                        action: e.a.as_str().into(),
                        meta: Some(e.i.to_pb()),
                        target: target.clone(),
                        phase: ph.to_pb() as i32,
                    };
                    if tx.blocking_send(Ok(item)).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Removes finished jobs older than `keep` (and their plans) at start and every hour.
fn spawn_retention(app: Arc<App>, keep: std::time::Duration, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            let before = now_ms() - keep.as_millis() as i64;
            loop {
                match app.store.prune_finished(before, 500).await {
                    Ok(ids) if ids.is_empty() => break,
                    Ok(ids) => {
                        for id in &ids {
                            let _ = tokio::fs::remove_dir_all(app.plans_of(id)).await;
                        }
                        tracing::info!(jobs = ids.len(), "removed jobs past --keep-jobs");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot remove old jobs; trying again later");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                _ = stop.changed() => return,
            }
        }
    });
}

/// How often the targets are checked unless `--check-interval-secs` says otherwise.
pub const DEFAULT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn unique_instance(name: &str) -> String {
    format!(
        "{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Serves the source service (with health and reflection) and runs the job worker on
/// `listener`, until `shutdown`.
pub async fn start(
    listener: TcpListener,
    app: Arc<App>,
    security: cms_mirror::security::ServerSecurity,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let server = cms_mirror::transport::secure_server(&security)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    app.store.set_origin(&app.instance_id);
    app.bus.follow_other_instances(app.instance_id.clone());
    let worker = tokio::spawn(runner::worker(app.clone(), stop_rx.clone()));
    if let Some(every) = app.check_every {
        health::spawn(app.clone(), every, stop_rx.clone());
    }
    if let Some(keep) = app.keep_jobs {
        spawn_retention(app.clone(), keep, stop_rx.clone());
    }
    app.restart_triggers().await;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    cms_mirror::observe::follow_database(
        health_reporter,
        <SourceServiceServer<SourceService> as tonic::server::NamedService>::NAME,
        app.store.db().clone(),
    )
    .await;
    let (reflection_v1, reflection_v1alpha) = cms_mirror::transport::reflection();
    let mut server = server;
    let res = server
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            SourceServiceServer::new(SourceService::new(app.clone())),
            security.auth,
        ))
        .serve_with_incoming_shutdown(cms_mirror::transport::incoming(listener), shutdown)
        .await
        .map_err(|e| ServeError::transport(&e));
    let _ = stop_tx.send(true);
    if let Some(t) = app.triggers.lock().expect("triggers lock").take() {
        let _ = t.send(true);
    }
    let _ = worker.await;
    res
}
