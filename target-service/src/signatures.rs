//! GetSignatures: the chunk signatures of the current version of a file in a session's
//! tree, the basis a delta transfer copies from (see [`cms_mirror::delta`]). Answered
//! from those kept of the body the target wrote ([`crate::sigcache`]) when the file is
//! still that body; else read on a blocking thread and streamed a batch at a time, so
//! neither end holds more than a batch of them in flight (and kept once read whole).

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use cms_mirror::delta::{BATCH_CHUNKS, ChunkSizes, Signer, pack_hashes};
use cms_mirror::fswalk::{DirCache, mtime_ns};
use cms_mirror::pb;

use crate::error::TargetError;
use crate::ledger::SessionStatus;
use crate::service::{BoxStream, TargetService};
use crate::sigcache::Signatures;

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
        let labels = crate::metrics::Metrics::site(&s.site);
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
        // The basis's identity goes with the first batch (an empty file has one, empty,
        // batch).
        let mut first = Some((md.len(), mtime_ns(&md)));
        let metrics = &self.inner.metrics;
        if let Some(sigs) = self.inner.sigcache.get(&md, sizes) {
            metrics.signatures_cached.get_or_create(&labels).inc();
            let batches: Vec<_> = sigs
                .lengths
                .chunks(BATCH_CHUNKS)
                .zip(sigs.hashes.chunks(BATCH_CHUNKS))
                .map(|(l, h)| Ok(batch(&mut first, l.to_vec(), h)))
                .collect();
            #[cfg(feature = "failpoints")]
            crate::failpoints::after_signatures(&file);
            #[cfg(not(feature = "failpoints"))]
            drop(file);
            return Ok(Box::pin(tokio_stream::iter(batches)));
        }
        metrics.signatures_read.get_or_create(&labels).inc();
        let (tx, rx) = mpsc::channel(2);
        let svc = self.clone();
        tokio::task::spawn_blocking(move || {
            #[cfg(feature = "failpoints")]
            let touched = file.try_clone();
            let mut signer = Signer::new(std::io::BufReader::with_capacity(1 << 20, file), sizes);
            // Kept once the whole file was read, for the next delta of this version.
            let mut kept = Signatures {
                sizes,
                lengths: Vec::new(),
                hashes: Vec::new(),
            };
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
                    svc.inner.sigcache.put(&md, kept);
                    break;
                }
                kept.lengths.extend_from_slice(&lengths);
                kept.hashes.extend_from_slice(&hashes);
                if tx
                    .blocking_send(Ok(batch(&mut first, lengths, &hashes)))
                    .is_err()
                {
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

/// One batch of a file's signatures as they cross; the first (`first` still set) names
/// the basis's size and mtime.
fn batch(first: &mut Option<(u64, i64)>, lengths: Vec<u32>, hashes: &[u64]) -> pb::SignatureBatch {
    let (basis_size, basis_mtime_ns) = first.take().unwrap_or_default();
    pb::SignatureBatch {
        basis_size,
        basis_mtime_ns,
        lengths,
        hashes: pack_hashes(hashes),
    }
}
