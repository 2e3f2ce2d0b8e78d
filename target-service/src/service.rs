//! The gRPC `TargetService` over the sites a target serves: its state, OpenSession and
//! GetManifest; Import is in [`crate::import`], Commit in [`crate::session`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use cms_mirror::pb;
use cms_mirror::pb::target_service_server::TargetService as TargetApi;

use crate::apply::{self, Durability, SessionFiles, SiteFs};
use crate::error::{StartError, TargetError};
use crate::import::DecodeBudget;
use crate::ledger::{Ledger, SessionRow, SessionStatus};
use crate::session::{SessionState, StreamGuard};
use crate::{TargetSettings, metrics};

/// A site the target serves.
pub(crate) struct Site {
    pub(crate) fs: SiteFs,
    /// Held while the site's work area is made, prepared or switched.
    pub(crate) generations: tokio::sync::Mutex<()>,
}

pub(crate) struct Inner {
    pub(crate) sites: HashMap<String, Site>,
    pub(crate) ledger: Ledger,
    pub(crate) settings: TargetSettings,
    /// Files in progress per session; one package of a session is staged at a time and
    /// one published at a time.
    pub(crate) sessions: Mutex<HashMap<String, Arc<SessionState>>>,
    pub(crate) metrics: metrics::Metrics,
    /// Lineage of each open session (passed on by tier pushes).
    pub(crate) lineages: Mutex<HashMap<String, Vec<String>>>,
    /// Room for decoded packages, shared by all streams ([`Limits::max_decoded_bytes`]).
    pub(crate) decode_budget: DecodeBudget,
    pub(crate) sigcache: Arc<crate::sigcache::SigCache>,
}

/// Refuses a peer of a protocol version this target does not speak.
fn speaks(got: u32) -> Result<(), TargetError> {
    if (MIN_PROTOCOL_VERSION..=cms_mirror::PROTOCOL_VERSION).contains(&got) {
        return Ok(());
    }
    Err(TargetError::ProtocolVersion {
        got,
        min: MIN_PROTOCOL_VERSION,
        max: cms_mirror::PROTOCOL_VERSION,
    })
}

/// The gRPC target service.
#[derive(Clone)]
pub struct TargetService {
    pub(crate) inner: Arc<Inner>,
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
        let limits = &settings.limits;
        if limits.max_decoded_bytes < limits.max_payload_bytes {
            return Err(StartError::DecodeBudget {
                decoded: limits.max_decoded_bytes,
                package: limits.max_payload_bytes,
            });
        }
        let metrics = metrics::Metrics::new();
        let decode_budget =
            DecodeBudget::new(limits.max_decoded_bytes, metrics.decode_waits.clone());
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
            // The root's own name is kept, not resolved: a site published atomically
            // has a link there that each switch replaces.
            let root = match (s.root.parent(), s.root.file_name()) {
                (Some(p), Some(name)) => {
                    let p = if p.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        p
                    };
                    p.canonicalize()
                        .map(|p| p.join(name))
                        .map_err(|e| err(e.to_string()))?
                }
                _ => s.root.canonicalize().map_err(|e| err(e.to_string()))?,
            };
            let fs = SiteFs {
                root,
                links: s.links,
            };
            let mut removed = apply::clean_staging(&fs, &open)
                .map_err(|e| err(format!("cannot clean staging: {e}")))?;
            let work = fs.work();
            if work.root.is_dir() {
                removed += apply::clean_staging(&work, &open)
                    .map_err(|e| err(format!("cannot clean the work area's staging: {e}")))?;
            }
            if removed > 0 {
                tracing::info!(site = %s.name, removed, "removed leftover staging files");
            }
            sites.insert(
                s.name.clone(),
                Site {
                    fs,
                    generations: Default::default(),
                },
            );
        }
        let sigcache =
            crate::sigcache::SigCache::new(settings.signature_cache_bytes, metrics.signing.clone());
        Ok(TargetService {
            inner: Arc::new(Inner {
                sites,
                ledger,
                settings,
                sessions: Mutex::new(HashMap::new()),
                metrics,
                lineages: Mutex::new(HashMap::new()),
                decode_budget,
                sigcache,
            }),
        })
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    pub fn settings(&self) -> &TargetSettings {
        &self.inner.settings
    }

    pub(crate) fn site(&self, name: &str) -> Result<&Site, TargetError> {
        self.inner
            .sites
            .get(name)
            .ok_or_else(|| TargetError::UnknownSite(name.to_string()))
    }

    /// The session of an id a source names.
    pub(crate) async fn known_session(&self, id: &str) -> Result<SessionRow, TargetError> {
        self.inner
            .ledger
            .session(id)
            .await?
            .ok_or_else(|| TargetError::UnknownSession(id.to_string()))
    }

    /// Where a session applies: the site's root in place, its work area when atomic.
    pub(crate) fn session_fs(&self, s: &SessionRow) -> Result<SiteFs, TargetError> {
        let fs = &self.site(&s.site)?.fs;
        Ok(if s.atomic() { fs.work() } else { fs.clone() })
    }

    pub(crate) fn session_state(&self, s: &SessionRow) -> Result<Arc<SessionState>, TargetError> {
        let fs = self.session_fs(s)?;
        let mut m = self.inner.sessions.lock().expect("sessions lock");
        Ok(m.entry(s.id.clone())
            .or_insert_with(|| {
                let mut files = SessionFiles::new(
                    fs.session_dir(&s.id),
                    self.inner.settings.direct_io
                        && self.inner.settings.durability != Durability::None,
                );
                files.sigcache = self.inner.sigcache.clone();
                Arc::new(SessionState {
                    files: Mutex::new(files),
                    publishing: Mutex::new(false),
                    streams: Default::default(),
                    fs,
                })
            })
            .clone())
    }

    pub(crate) fn count(
        &self,
        site: &str,
        reply: &Result<pb::PackageAck, TargetError>,
        took: std::time::Duration,
    ) {
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
}

pub(crate) type BoxStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// The oldest source protocol this target still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 2;

impl TargetService {
    async fn open(
        &self,
        r: pb::OpenSessionRequest,
    ) -> Result<pb::OpenSessionResponse, TargetError> {
        speaks(r.protocol_version)?;
        if r.job_id.is_empty() {
            return Err(TargetError::InvalidArgument("job_id is required".into()));
        }
        {
            use cms_mirror::bounds::{self, MAX_LINEAGE, MAX_NAME_BYTES};
            let name = |field, v: &str| bounds::text(field, v, MAX_NAME_BYTES);
            name("job_id", &r.job_id)?;
            name("site", &r.site)?;
            name("channel", &r.channel)?;
            name("source_id", &r.source_id)?;
            bounds::list("lineage", &r.lineage, MAX_LINEAGE, MAX_NAME_BYTES)?;
        }
        if let Err(e) = self.check_site_now(&r.site).await? {
            tracing::warn!(job = %r.job_id, error = %e, "session refused");
            return Err(e);
        }
        let me = &self.inner.settings.target_id;
        if r.lineage.iter().any(|l| l == me) {
            return Err(TargetError::LineageLoop {
                job: r.job_id,
                target: me.clone(),
            });
        }
        let store = self.work_area_for(&r).await?;
        let (s, expired) = self
            .inner
            .ledger
            .open_session(&r.job_id, &r.site, &r.channel, &store)
            .await?;
        if expired {
            tracing::info!(session = %s.id, "expired session opened again; its job plans again");
        }
        self.inner
            .lineages
            .lock()
            .expect("lineages lock")
            .insert(s.id.clone(), r.lineage);
        tracing::info!(session = %s.id, last_seq = s.last_seq, "session opened");
        let limits = &self.inner.settings.limits;
        Ok(pb::OpenSessionResponse {
            session_id: s.id,
            last_applied_seq: s.last_seq as u64,
            committed: s.state == SessionStatus::Committed,
            prepared: s.state == SessionStatus::Prepared,
            max_message_bytes: limits.max_message_bytes as u64,
            max_entries_per_package: limits.max_entries as u32,
            target_id: me.clone(),
            protocol_version: cms_mirror::PROTOCOL_VERSION,
            expired,
        })
    }

    /// The site check of OpenSession, answered instead of enforced. An unknown site or
    /// protocol version is an error, as it is for OpenSession.
    async fn check(&self, r: pb::CheckSiteRequest) -> Result<pb::CheckSiteResponse, TargetError> {
        speaks(r.protocol_version)?;
        cms_mirror::bounds::text("site", &r.site, cms_mirror::bounds::MAX_NAME_BYTES)?;
        let (problem, free_bytes) = match self.check_site_now(&r.site).await? {
            Ok(free) => (String::new(), free),
            Err(e) => (e.to_string(), 0),
        };
        Ok(pb::CheckSiteResponse {
            target_id: self.inner.settings.target_id.clone(),
            protocol_version: cms_mirror::PROTOCOL_VERSION,
            problem,
            free_bytes,
        })
    }

    /// Whether a known site can take content now (`SiteFs::check`, off the runtime):
    /// its free bytes, or the refusal as a session would get it.
    async fn check_site_now(&self, site: &str) -> Result<Result<u64, TargetError>, TargetError> {
        let fs = self.site(site)?.fs.clone();
        let min_free = self.inner.settings.min_free_bytes;
        let checked = tokio::task::spawn_blocking(move || fs.check(min_free))
            .await
            .map_err(TargetError::task("site check"))?;
        Ok(checked.map_err(|problem| TargetError::SiteUnusable {
            site: site.to_string(),
            problem,
        }))
    }

    /// Streams a site's manifest in tree order, in pages read from the ledger.
    fn manifest(
        &self,
        r: pb::GetManifestRequest,
    ) -> Result<BoxStream<pb::ManifestBatch>, TargetError> {
        self.site(&r.site)?;
        let ledger = self.inner.ledger.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            // An atomic job plans against the work area it builds.
            let store = match crate::generations::manifest_store(ledger.db(), &r.site).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(TargetError::from(e).into())).await;
                    return;
                }
            };
            let mut after = if r.after_path.is_empty() {
                Vec::new()
            } else {
                cms_mirror::model::tree_key(&r.after_path)
            };
            loop {
                let page = match ledger.manifest_page(&store, &after, 2000).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(TargetError::from(e).into())).await;
                        return;
                    }
                };
                let Some(lastp) = page.last() else { return };
                after = cms_mirror::model::tree_key(&lastp.path);
                let entries = page
                    .iter()
                    .map(|i| pb::ManifestEntry {
                        meta: Some(i.to_pb()),
                    })
                    .collect();
                if tx.send(Ok(pb::ManifestBatch { entries })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Checks an Import stream's header and starts its pipeline.
    async fn start_import(
        &self,
        mut inbound: Streaming<pb::ImportRequest>,
    ) -> Result<BoxStream<pb::ImportResponse>, Status> {
        let header = match inbound.message().await? {
            Some(pb::ImportRequest {
                msg: Some(pb::import_request::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(TargetError::InvalidArgument(
                    "the first Import message must be an ImportHeader".into(),
                )
                .into());
            }
        };
        let session = self.known_session(&header.session_id).await?;
        match session.state {
            SessionStatus::Open => {}
            SessionStatus::Prepared => {
                return Err(TargetError::Publish(format!(
                    "session {} is prepared: it takes no more packages",
                    session.id
                ))
                .into());
            }
            SessionStatus::Committed => {
                return Err(TargetError::AlreadyCommitted(session.id).into());
            }
            SessionStatus::Aborted => return Err(TargetError::SessionAborted(session.id).into()),
            SessionStatus::Expired => return Err(TargetError::SessionExpired(session.id).into()),
        }
        let guard = StreamGuard::new(self.session_state(&session)?);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(
            self.clone()
                .handle_import(session, inbound, tx, guard)
                .in_current_span(),
        );
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl TargetApi for TargetService {
    async fn open_session(
        &self,
        req: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        Ok(Response::new(self.open(req.into_inner()).await?))
    }

    type GetManifestStream = BoxStream<pb::ManifestBatch>;

    async fn get_manifest(
        &self,
        req: Request<pb::GetManifestRequest>,
    ) -> Result<Response<Self::GetManifestStream>, Status> {
        Ok(Response::new(self.manifest(req.into_inner())?))
    }

    type ImportStream = BoxStream<pb::ImportResponse>;

    async fn import(
        &self,
        req: Request<Streaming<pb::ImportRequest>>,
    ) -> Result<Response<Self::ImportStream>, Status> {
        self.start_import(req.into_inner()).await.map(Response::new)
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        Ok(Response::new(self.commit_session(req.into_inner()).await?))
    }

    async fn check_site(
        &self,
        req: Request<pb::CheckSiteRequest>,
    ) -> Result<Response<pb::CheckSiteResponse>, Status> {
        Ok(Response::new(self.check(req.into_inner()).await?))
    }

    async fn list_generations(
        &self,
        req: Request<pb::ListSiteGenerationsRequest>,
    ) -> Result<Response<pb::ListSiteGenerationsResponse>, Status> {
        let r = req.into_inner();
        speaks(r.protocol_version)?;
        cms_mirror::bounds::text("site", &r.site, cms_mirror::bounds::MAX_NAME_BYTES)
            .map_err(TargetError::from)?;
        Ok(Response::new(self.generations(r).await?))
    }

    type GetSignaturesStream = BoxStream<pb::SignatureBatch>;

    async fn get_signatures(
        &self,
        req: Request<pb::SignaturesRequest>,
    ) -> Result<Response<Self::GetSignaturesStream>, Status> {
        self.signatures(req.into_inner()).await.map(Response::new)
    }
}
