//! The source API's errors, and their one mapping to gRPC status codes.

use tonic::Status;

use cms_mirror::jobstore::StoreError;

/// Why a call of the source service failed. Each variant has one status code
/// ([`From<SourceError> for Status`]); database detail stays in the source's log.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
    #[error("paths: {0}")]
    InvalidPath(String),
    #[error("max_delete: {0}")]
    InvalidMaxDelete(cms_mirror::config::Invalid),
    /// A rollback the channel cannot have.
    #[error("{0}")]
    InvalidRollback(String),
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("{0}")]
    AmbiguousJob(String),
    #[error(transparent)]
    OverBound(#[from] cms_mirror::bounds::OverBound),
    #[error("job store unavailable; retry later")]
    Store(#[source] StoreError),
}

impl From<StoreError> for SourceError {
    fn from(e: StoreError) -> SourceError {
        match e {
            StoreError::NotFound(id) => SourceError::JobNotFound(id),
            e @ StoreError::Ambiguous { .. } => SourceError::AmbiguousJob(e.to_string()),
            other => SourceError::Store(other),
        }
    }
}

impl From<SourceError> for Status {
    fn from(e: SourceError) -> Status {
        let msg = e.to_string();
        match e {
            SourceError::UnknownChannel(_) | SourceError::JobNotFound(_) => Status::not_found(msg),
            SourceError::InvalidPath(_)
            | SourceError::InvalidMaxDelete(_)
            | SourceError::AmbiguousJob(_)
            | SourceError::InvalidRollback(_)
            | SourceError::OverBound(_) => Status::invalid_argument(msg),
            SourceError::Store(ref db) => {
                tracing::error!(error = %db, "job store error");
                Status::unavailable(msg)
            }
        }
    }
}
