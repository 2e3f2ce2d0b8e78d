//! cms-mirror target service.
//!
//! - [`TargetService`] ([`service`]): the gRPC `TargetService` (OpenSession, GetManifest,
//!   Import, Commit) over the sites it serves.
//! - [`import`]: the Import stream, a pipeline that stages package N+1 while N is
//!   published and N-1 recorded, answering in package order.
//! - [`session`]: commit and abort of a session (directory times, hooks, tier push).
//! - [`apply`]: durable, path-safe application of package entries to a site directory.
//! - [`delivery`]: the page store served read-only, shaped like Wagtail's API v2.
//! - [`pagestore`]: the CMS pages of each site, written with their package.
//! - [`ledger`]: sessions, applied packages and the manifest index, in the target's own
//!   database (SQLite by default).
//! - [`error`]: the target's errors and their one mapping to gRPC status codes.
//! - [`run`]: serves the service (with health and reflection) on a bound listener.
#![forbid(unsafe_code)]

pub mod apply;
pub mod delivery;
pub mod error;
#[cfg(feature = "failpoints")]
mod failpoints;
pub mod generations;
pub mod hooks;
mod import;
pub mod ledger;
pub mod metrics;
pub mod pagestore;
mod service;
mod session;
pub mod sigcache;
mod signatures;

use tokio::net::TcpListener;

use cms_mirror::config::SiteConfig;
use cms_mirror::package::Limits;
use cms_mirror::pb::target_service_server::TargetServiceServer;
use cms_mirror::transport::ServeError;

pub use apply::Durability;
pub use error::{StartError, TargetError};
pub use import::IMPORT_IDLE_TIMEOUT;
pub use service::TargetService;

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
    /// Open sessions idle this long are expired: their staging is removed and their job,
    /// if it comes back, plans again.
    pub session_expiry: std::time::Duration,
    /// A session is refused while its site has less free space than this.
    pub min_free_bytes: u64,
    /// Memory for the delta signatures of written bodies ([`sigcache`]); 0 keeps none.
    pub signature_cache_bytes: u64,
}

/// The default [`TargetSettings::min_free_bytes`].
pub const DEFAULT_MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;

/// The default [`TargetSettings::session_expiry`]: a day, longer than any retry budget
/// and than a source's restart.
pub const DEFAULT_SESSION_EXPIRY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Serves the target service, gRPC health and reflection on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    service: TargetService,
    security: cms_mirror::security::ServerSecurity,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let mut server = cms_mirror::transport::secure_server(&security)?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    cms_mirror::observe::follow_database(
        health_reporter,
        <TargetServiceServer<TargetService> as tonic::server::NamedService>::NAME,
        service.ledger().db().clone(),
    )
    .await;
    let (reflection_v1, reflection_v1alpha) = cms_mirror::transport::reflection();
    let max = service.settings().limits.max_message_bytes;
    let sweeper = service.spawn_expiry();
    let served = server
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            TargetServiceServer::new(service)
                // Only for a caller that asks (the source does for the manifest: paths
                // shrink well; signatures and acks would not).
                .send_compressed(tonic::codec::CompressionEncoding::Zstd)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            security.auth,
        ))
        .serve_with_incoming_shutdown(cms_mirror::transport::incoming(listener), shutdown)
        .await
        .map_err(|e| ServeError::transport(&e));
    sweeper.abort();
    served
}
