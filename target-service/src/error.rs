//! The target's errors, and their one mapping to gRPC status codes.

use tonic::Status;

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
    #[error("--max-decoded-bytes {decoded} is less than --max-package-bytes {package}")]
    DecodeBudget { decoded: usize, package: usize },
    #[error("cannot read the ledger: {0}")]
    Ledger(#[from] sqlx::Error),
}

/// Why a call of the target service failed. Each variant has one status code
/// ([`From<TargetError> for Status`]); database detail stays in the target's log.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    OverBound(#[from] cms_mirror::bounds::OverBound),
    #[error(
        "protocol version {got} is not supported by this target (it speaks {min} to {max}); upgrade the older side"
    )]
    ProtocolVersion { got: u32, min: u32, max: u32 },
    #[error("unknown site {0:?}")]
    UnknownSite(String),
    /// A site that cannot take content: refused before anything is sent.
    #[error("site {site:?} cannot take content: {problem}")]
    SiteUnusable {
        site: String,
        problem: crate::apply::SiteProblem,
    },
    #[error("unknown session {0:?}; call OpenSession first")]
    UnknownSession(String),
    #[error("session {0} is already committed")]
    AlreadyCommitted(String),
    #[error("session {0} was aborted")]
    SessionAborted(String),
    #[error("session {0} expired (idle past the target's session expiry); open it again")]
    SessionExpired(String),
    #[error("job {job} already passed through target {target} (lineage loop)")]
    LineageLoop { job: String, target: String },
    #[error("commit of session {session} at package {asked} but {applied} applied")]
    CommitMismatch {
        session: String,
        asked: u64,
        applied: i64,
    },
    /// An in-place session for a site published atomically (its tree would change
    /// under a generation kept for rollback), or a phase out of turn.
    #[error("{0}")]
    Publish(String),
    /// The work area or a generation could not be made, synced or switched to.
    #[error("site {site:?}: {what}: {source}")]
    Generation {
        site: String,
        what: &'static str,
        source: std::io::Error,
    },
    /// A peer beyond the package limits: the stream ends here.
    #[error("{0}")]
    OverLimit(cms_mirror::package::PackageError),
    /// A package behind one that failed in the same stream.
    #[error("package {seq} not {step}: an earlier package of the stream failed")]
    EarlierFailed { seq: u64, step: &'static str },
    #[error("import stream idle for too long")]
    Idle,
    #[error("target ledger unavailable; retry later")]
    Ledger(#[from] sqlx::Error),
    #[error("{what} task failed: {source}")]
    Task {
        what: &'static str,
        source: tokio::task::JoinError,
    },
}

impl TargetError {
    /// A blocking task that panicked or was cancelled.
    pub fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> TargetError {
        move |source| TargetError::Task { what, source }
    }
}

impl From<TargetError> for Status {
    fn from(e: TargetError) -> Status {
        let msg = e.to_string();
        match e {
            TargetError::InvalidArgument(_) | TargetError::OverBound(_) => {
                Status::invalid_argument(msg)
            }
            TargetError::ProtocolVersion { .. } | TargetError::SiteUnusable { .. } => {
                Status::failed_precondition(msg)
            }
            TargetError::UnknownSite(_) | TargetError::UnknownSession(_) => Status::not_found(msg),
            TargetError::AlreadyCommitted(_)
            | TargetError::SessionAborted(_)
            | TargetError::SessionExpired(_)
            | TargetError::LineageLoop { .. }
            | TargetError::CommitMismatch { .. }
            | TargetError::Publish(_)
            | TargetError::Generation { .. } => Status::failed_precondition(msg),
            TargetError::OverLimit(_) => Status::out_of_range(msg),
            TargetError::EarlierFailed { .. } => Status::aborted(msg),
            TargetError::Idle => Status::deadline_exceeded(msg),
            TargetError::Ledger(ref db) => {
                tracing::error!(error = %db, "ledger database error");
                Status::unavailable(msg)
            }
            TargetError::Task { .. } => Status::internal(msg),
        }
    }
}
