//! Writing bodies: direct I/O for large aligned chunks, and chunks left for a
//! package's finishing task so the disk writes one package while the next is staged.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use cms_mirror::model::ErrorCode;

use crate::sigcache::{SigCache, Signing, Ticket};

use super::io_item_error;
use super::publish::discard_for_retry;
use super::stage::Staged;

/// Smallest block-aligned part of a chunk written with direct I/O; less goes through the
/// page cache (a direct write waits for the device, which only pays off for large ones).
pub(super) const DIRECT_MIN: usize = 64 * 1024;
/// Chunks of at least this size are hashed on a second thread while they are written.
pub(super) const HASH_BESIDE_MIN: usize = 1024 * 1024;
/// Bytes copied into the aligned buffer per direct write: a whole chunk of a default
/// 4 MiB package in one write (fewer completions to wait for than 1 MiB pieces: large
/// full mirrors ~6% faster, target CPU ~10% lower). A writer's buffer grows to the
/// largest piece it has written (the threads that write smaller whole files keep less).
pub(super) const DIRECT_PIECE: usize = 4 * 1024 * 1024;

/// Writes file bodies. With direct I/O (when acknowledgements wait for the disk anyway),
/// the block-aligned part of a large chunk goes from an aligned buffer straight to the
/// device: no page-cache pages to allocate and fill, and nothing dirty left for the
/// package's flush to write. The rest of a chunk (its unaligned tail, small chunks,
/// chunks at unaligned offsets) is written through the page cache. A file system that
/// refuses direct I/O turns it off for the session.
pub(super) struct BodyWriter {
    pub(super) direct: bool,
    /// Holds one aligned piece (grown as needed).
    pub(super) buf: Vec<u8>,
}

impl BodyWriter {
    pub(super) fn new(direct: bool) -> BodyWriter {
        BodyWriter {
            direct,
            buf: Vec::new(),
        }
    }

    /// Writes all of `data` at `offset` of `file`; returns how many bytes of it went
    /// with direct I/O.
    pub(super) fn write_at(&mut self, file: &File, data: &[u8], offset: u64) -> io::Result<u64> {
        let align = cms_mirror::package::BODY_ALIGN as usize;
        let head = data.len() / align * align;
        if !self.direct || !offset.is_multiple_of(align as u64) || head < DIRECT_MIN {
            return file.write_all_at(data, offset).map(|()| 0);
        }
        match self.write_direct(file, &data[..head], offset) {
            Ok(()) => file
                .write_all_at(&data[head..], offset + head as u64)
                .map(|()| head as u64),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                tracing::info!(error = %e, "direct I/O refused; writing through the page cache");
                self.direct = false;
                file.write_all_at(data, offset).map(|()| 0)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes block-aligned `data` at block-aligned `offset` with `O_DIRECT`, then clears
    /// the flag again.
    pub(super) fn write_direct(&mut self, file: &File, data: &[u8], offset: u64) -> io::Result<()> {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        let align = cms_mirror::package::BODY_ALIGN as usize;
        let need = data.len().min(DIRECT_PIECE) + align;
        if self.buf.len() < need {
            self.buf = vec![0; need];
        }
        let start = self.buf.as_ptr().align_offset(align);
        let flags = fcntl_getfl(file)?;
        fcntl_setfl(file, flags | OFlags::DIRECT)?;
        let written = (|| {
            let mut at = offset;
            for piece in data.chunks(DIRECT_PIECE) {
                let b = &mut self.buf[start..start + piece.len()];
                b.copy_from_slice(piece);
                let mut done = 0;
                while done < b.len() {
                    match rustix::io::pwrite(file, &b[done..], at + done as u64)? {
                        0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                        n => done += n,
                    }
                }
                at += piece.len() as u64;
            }
            Ok(())
        })();
        fcntl_setfl(file, flags)?;
        written
    }
}

/// The writes of one body's chunks that are left for finishing tasks and not done yet.
#[derive(Default)]
pub(super) struct FileWrites {
    pub(super) pending: Mutex<usize>,
    pub(super) idle: Condvar,
}

impl FileWrites {
    /// Waits until at most `left` writes of this body are pending (the others written,
    /// or dropped with their package).
    pub(super) fn wait_until(&self, left: usize) {
        let mut n = self.pending.lock().expect("file writes lock");
        while *n > left {
            n = self.idle.wait(n).expect("file writes lock");
        }
    }
}

/// A chunk whose write is left for its package's finishing task ([`write_deferred`]):
/// the staging thread only hashes it and goes on with the next package while the chunk
/// goes to the disk. A large body's chunks are all written this way once one is, by one
/// writer at a time, so no two threads switch direct I/O on the same open file. Dropped
/// unwritten (its package not published), it no longer counts as pending.
pub(super) struct Deferred {
    pub(super) path: String,
    pub(super) file: File,
    pub(super) data: bytes::Bytes,
    pub(super) offset: u64,
    pub(super) writes: Arc<FileWrites>,
}

impl Deferred {
    pub(super) fn new(
        path: String,
        file: File,
        data: bytes::Bytes,
        offset: u64,
        writes: Arc<FileWrites>,
    ) -> Self {
        *writes.pending.lock().expect("file writes lock") += 1;
        Deferred {
            path,
            file,
            data,
            offset,
            writes,
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        let mut n = self.writes.pending.lock().expect("file writes lock");
        *n -= 1;
        self.writes.idle.notify_all();
    }
}

/// Writes the chunks a package's staging left (see [`Deferred`]), in order, on the
/// session's deferred writer; the caller runs it before the package before it is
/// published, so the disk writes one package while the next is staged. A chunk that
/// cannot be written fails the whole package (`not_written`, or `no_space` on a full
/// disk): none of it is published and the source sends it again, which writes the
/// chunk again and reads the body back to hash it (its offsets no longer follow on).
pub fn write_deferred(mut staged: Staged) -> Staged {
    let Some(writer) = staged.deferred_writer.take() else {
        return staged;
    };
    let mut writer = writer.lock().expect("deferred writer lock");
    let mut failed = None;
    for d in std::mem::take(&mut staged.deferred) {
        if failed.is_some() {
            continue;
        }
        match writer.write_at(&d.file, &d.data, d.offset) {
            Ok(n) => staged.out.bytes_direct += n,
            Err(e) => failed = Some(io_item_error(&d.path, "cannot write", &e)),
        }
    }
    drop(writer);
    let Some(err) = failed else {
        return staged;
    };
    let no_space = ErrorCode::NoSpace.is(&err.code);
    let mut out = discard_for_retry(staged.publish, staged.out);
    out.errors.push(err);
    out.no_space |= no_space;
    out.not_written = !no_space;
    Staged::empty(staged.session_dir, out)
}

/// What a body's bytes are fed to while they arrive in order: its BLAKE3, and for a body
/// large enough to be a delta's basis later its signatures ([`crate::sigcache`]).
pub(super) struct Digest {
    pub(super) hasher: blake3::Hasher,
    pub(super) signer: Option<Signing>,
}

impl Digest {
    /// `cache`: sign the body for it too (if it is large enough and the cache keeps
    /// signatures).
    pub(super) fn new(size: u64, cache: &Arc<SigCache>) -> Digest {
        Digest {
            hasher: blake3::Hasher::new(),
            signer: cache.signing(size),
        }
    }

    /// Hashes the body's next bytes ([`write_hashed`] does it beside the write).
    pub(super) fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    /// Queues the body's next bytes for signing (in the body's order, like `update`); a
    /// body left unsigned drops its signer.
    pub(super) fn sign(&mut self, data: &Bytes) {
        if let Some(s) = self.signer.as_mut()
            && !s.push(data)
        {
            self.signer = None;
        }
    }

    /// The body's hash, and its signatures' ticket if it is being signed.
    pub(super) fn finish(self) -> (blake3::Hash, Option<Ticket>) {
        (
            self.hasher.finalize(),
            self.signer.and_then(Signing::finish),
        )
    }
}

/// Writes `data` at `offset` of `file` and feeds it to `digest`: a chunk of
/// [`HASH_BESIDE_MIN`] or more is hashed on a second thread while it is written. The
/// digest has seen `data` whatever the write gave. Returns the bytes written with direct
/// I/O.
pub(super) fn write_hashed(
    writer: &mut BodyWriter,
    file: &File,
    data: &[u8],
    offset: u64,
    digest: Option<&mut Digest>,
) -> io::Result<u64> {
    match digest {
        Some(h) if data.len() >= HASH_BESIDE_MIN => std::thread::scope(|s| {
            let hashing = s.spawn(move || {
                h.update(data);
            });
            let written = writer.write_at(file, data, offset);
            hashing.join().expect("hashing thread");
            written
        }),
        h => {
            if let Some(h) = h {
                h.update(data);
            }
            writer.write_at(file, data, offset)
        }
    }
}
