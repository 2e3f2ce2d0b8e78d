//! GetSignatures: the chunk signatures of the current version of a file in a session's
//! tree, the basis a delta transfer copies from (see [`cms_mirror::delta`]). Read on a
//! blocking thread and streamed a batch at a time, so neither end holds more than a
//! batch of them in flight.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use cms_mirror::delta::{ChunkSizes, Signer};
use cms_mirror::fswalk::{DirCache, mtime_ns};
use cms_mirror::pb;

use crate::error::TargetError;
use crate::ledger::SessionStatus;
use crate::service::{BoxStream, TargetService};

impl TargetService {
    pub(crate) async fn signatures(
        &self,
        r: pb::SignaturesRequest,
    ) -> Result<BoxStream<pb::SignatureBatch>, Status> {
        let sizes = ChunkSizes::from_avg(r.avg_chunk).ok_or_else(|| {
            TargetError::InvalidArgument(format!(
                "avg_chunk {} is not a power of two between 4 KiB and 4 MiB",
                r.avg_chunk
            ))
        })?;
        let max_path = self.inner.settings.limits.max_path_bytes;
        cms_mirror::pathsafe::validate(&r.path, max_path)
            .map_err(|e| TargetError::InvalidArgument(format!("path {:?}: {e}", r.path)))?;
        let s = self.known_session(&r.session_id).await?;
        if s.state != SessionStatus::Open {
            return Err(TargetError::Publish(format!(
                "session {} is not open: it takes no delta transfer",
                s.id
            ))
            .into());
        }
        let root = self.session_fs(&s)?.root;
        let path = r.path;
        let opened = tokio::task::spawn_blocking(move || {
            let no_file =
                |why: String| Status::not_found(format!("no file {path:?} to copy from: {why}"));
            // Not through a link (the open refuses one): what is read is the file itself.
            let f = DirCache::new(root)
                .open(&path)
                .map_err(|e| no_file(e.to_string()))?;
            let md = f.metadata().map_err(|e| no_file(e.to_string()))?;
            if !md.is_file() {
                return Err(no_file("not a regular file".into()));
            }
            Ok((f, md))
        })
        .await
        .map_err(TargetError::task("signature read"))??;
        let (file, md) = opened;
        let (tx, rx) = mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            #[cfg(feature = "failpoints")]
            let touched = file.try_clone();
            let mut signer = Signer::new(std::io::BufReader::with_capacity(1 << 20, file), sizes);
            // The basis's identity goes with the first batch (an empty file has one,
            // empty, batch).
            let mut first = Some((md.len(), mtime_ns(&md)));
            loop {
                let (lengths, hashes) = match signer.next_batch() {
                    Ok(b) => b,
                    Err(e) => {
                        let e = Status::internal(format!("cannot read the basis: {e}"));
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                };
                if lengths.is_empty() && first.is_none() {
                    break;
                }
                let (basis_size, basis_mtime_ns) = first.take().unwrap_or_default();
                let batch = pb::SignatureBatch {
                    basis_size,
                    basis_mtime_ns,
                    lengths,
                    hashes,
                };
                if tx.blocking_send(Ok(batch)).is_err() {
                    return;
                }
            }
            #[cfg(feature = "failpoints")]
            if let Ok(f) = &touched {
                crate::failpoints::after_signatures(f);
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}
