//! Applying a package's entries to a site directory, durably and safely.
//!
//! A file's body is written as an unnamed file (`O_TMPFILE`) in its destination
//! directory, or, for a body that spans packages and where the file system has no
//! unnamed files, under the session's staging directory (same file system). A package's
//! bodies are made durable as one batch, then linked or renamed into place, then their
//! directories are synced; only then does the caller record the package in the ledger
//! and ack it. A crash at any moment leaves either the old or the new version of each
//! file visible, never a partial one, and no unnamed file survives it.
//!
//! Every path is validated ([`cms_mirror::pathsafe`]) and resolved one component at a
//! time without following symlinks: an ancestor that is a symlink (planted on the
//! target or created by an earlier entry) refuses the item.

mod body;
mod generation;
mod page;
mod pathcheck;
mod publish;
mod stage;
#[cfg(test)]
mod tests;
mod unix;
mod writer;

use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use cms_mirror::model::{ErrorCode, Item};
use cms_mirror::pathsafe::STAGING_DIR;
use cms_mirror::pb;
use writer::FileWrites;

use crate::ledger::PackageChanges;

pub use body::SessionFiles;
pub use generation::WORK_DIR;
pub use publish::{discard, publish, restore_dir_times, set_root_meta, uncache};
pub use stage::{Staged, abort_session, clean_staging, stage};
pub use writer::write_deferred;

/// How an applied package is made durable before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// One `syncfs` of the site's filesystem per package (fastest for a dedicated volume).
    Syncfs,
    /// `fsync` of every written file, from a few threads.
    Fsync,
    /// No sync (tests and benchmarks of the transport only): acks do not mean durable.
    None,
}

impl std::str::FromStr for Durability {
    type Err = cms_mirror::model::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "syncfs" => Ok(Durability::Syncfs),
            "fsync" => Ok(Durability::Fsync),
            "none" => Ok(Durability::None),
            o => Err(cms_mirror::model::UnknownName::new(
                "durability",
                o,
                "syncfs, fsync or none",
            )),
        }
    }
}

/// A site's directories.
#[derive(Clone, Debug)]
pub struct SiteFs {
    pub root: PathBuf,
    /// What to do with a symbolic link that leaves the site.
    pub links: cms_mirror::config::Links,
}

impl SiteFs {
    pub fn staging(&self) -> PathBuf {
        self.root.join(STAGING_DIR)
    }
    pub fn session_dir(&self, session: &str) -> PathBuf {
        self.staging()
            .join(&blake3::hash(session.as_bytes()).to_hex()[..32])
    }
}

/// Why a site cannot take a session.
#[derive(Debug, thiserror::Error)]
pub enum SiteProblem {
    #[error("its root {0} does not exist or is not a directory")]
    NoRoot(PathBuf),
    #[error("cannot write in its root {path}: {source}")]
    NotWritable { path: PathBuf, source: io::Error },
    #[error(
        "only {free} free in its root {path} (the target keeps at least {min}: --min-free-space)"
    )]
    NoSpace {
        path: PathBuf,
        free: bytesize::ByteSize,
        min: bytesize::ByteSize,
    },
}

impl SiteFs {
    /// Replaces the site's trace file ([`cms_mirror::pathsafe::TRACE_FILE`]) with `text`:
    /// written unnamed and made durable, then named beside it and renamed over it, so the
    /// temporary name is visible only between two directory operations.
    pub fn write_trace(&self, text: &str) -> io::Result<()> {
        use std::io::Write as _;
        use std::os::fd::AsFd;
        let path = self.root.join(cms_mirror::pathsafe::TRACE_FILE);
        let tmp = self.beside_staging("trace");
        let root = File::open(&self.root)?;
        self.keeping_root_times(|| {
            match unix::create_unnamed(root.as_fd(), 0o644)? {
                Some(mut f) => {
                    f.write_all(text.as_bytes())?;
                    f.sync_all()?;
                    unix::link_unnamed(&f, &tmp)?;
                }
                None => {
                    let mut f = File::create(&tmp)?;
                    f.write_all(text.as_bytes())?;
                    f.sync_all()?;
                }
            }
            fs::rename(&tmp, &path)
        })?;
        root.sync_all()
    }

    /// A name at the site root for one short-lived file of the target's own, unique to
    /// this call (sessions commit and sites are checked concurrently) and removed at start
    /// if a crash left it ([`clean_staging`]).
    fn beside_staging(&self, what: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root
            .join(format!("{STAGING_DIR}-{what}-{}-{n}", std::process::id()))
    }

    /// Writes and drops a file at the site root: unnamed where the file system allows
    /// it (nothing appears in the site, its times stay), else named and removed.
    fn probe_write(&self) -> io::Result<()> {
        use std::io::Write as _;
        use std::os::fd::AsFd;
        let root = File::open(&self.root)?;
        if let Some(mut f) = unix::create_unnamed(root.as_fd(), 0o600)? {
            return f.write_all(b"cms-mirror site check\n");
        }
        let probe = self.beside_staging("probe");
        self.keeping_root_times(|| {
            let written = fs::write(&probe, b"cms-mirror site check\n");
            let _ = fs::remove_file(&probe);
            written
        })
    }

    /// Runs `f`, which adds or removes a name at the site root, and gives the root its
    /// times back: they are the source root's (mirrored at each commit), not ours.
    fn keeping_root_times<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let md = fs::metadata(&self.root)?;
        let r = f();
        let (atime, mtime) = (
            filetime::FileTime::from_last_access_time(&md),
            filetime::FileTime::from_last_modification_time(&md),
        );
        let restored = filetime::set_file_times(&self.root, atime, mtime);
        let done = r?; // the operation's own error first
        restored?;
        Ok(done)
    }

    /// Whether the site can take content now: its root is a directory, a file can be
    /// written beside where bodies are staged, and at least `min_free` bytes are free.
    /// Answers the free bytes.
    pub fn check(&self, min_free: u64) -> Result<u64, SiteProblem> {
        if !self.root.is_dir() {
            return Err(SiteProblem::NoRoot(self.root.clone()));
        }
        let not_writable = |source| SiteProblem::NotWritable {
            path: self.root.clone(),
            source,
        };
        // Permissions alone do not tell (root passes them; a read-only mount does not):
        // a file is written and removed.
        self.probe_write().map_err(not_writable)?;
        // Published atomically: each switch replaces the link in the root's parent.
        if self.root.is_symlink()
            && let Some(parent) = self.root.parent()
        {
            rustix::fs::access(parent, rustix::fs::Access::WRITE_OK).map_err(|e| {
                SiteProblem::NotWritable {
                    path: parent.to_path_buf(),
                    source: e.into(),
                }
            })?;
        }
        let st = rustix::fs::statvfs(&self.root).map_err(|e| not_writable(e.into()))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < min_free {
            return Err(SiteProblem::NoSpace {
                path: self.root.clone(),
                free: bytesize::ByteSize(free),
                min: bytesize::ByteSize(min_free),
            });
        }
        Ok(free)
    }
}

/// Outcome of applying one package.
#[derive(Default)]
pub struct Applied {
    pub changes: PackageChanges,
    pub errors: Vec<pb::ItemError>,
    pub items: u64,
    pub bytes: u64,
    /// Of `bytes`, written with direct I/O.
    pub bytes_direct: u64,
    /// The target ran out of space: nothing of this package was published, it is not
    /// recorded, and the source must send it again (or fail the job) once space is freed.
    pub no_space: bool,
    /// A chunk left for the finishing task could not be written (the error is in
    /// `errors`): nothing of this package was published, it is not recorded, and the
    /// source sends it again.
    pub not_written: bool,
    /// Published bodies, durable, to drop from the page cache ([`uncache`]) once the
    /// package is recorded: not on the path of the next package's publish.
    pub to_uncache: Vec<File>,
    /// Bodies put in place with their signatures (each stat'ed in place), for the
    /// target's signature cache.
    pub signed: Vec<(fs::Metadata, crate::sigcache::Ticket)>,
}

/// A staged item waiting to be put in place.
struct Publish {
    body: Body,
    item: Item,
    had_meta: bool,
    /// A body whose chunks were written by finishing tasks gets its time at publish,
    /// once they are all done (a write after it would change it).
    late: Option<LateTime>,
    /// The body's delta signatures, being cut as it was written, for the cache once it
    /// is in place.
    sigs: Option<crate::sigcache::Ticket>,
}

struct LateTime {
    file: File,
    writes: Arc<FileWrites>,
    mtime_ns: i64,
}

/// Where a staged item is.
enum Body {
    /// An unnamed file in its destination directory (open beside it), linked into place.
    Unnamed(File, Arc<OwnedFd>),
    /// A file or symlink in the session's staging directory, renamed into place.
    Named(PathBuf),
}

impl Body {
    fn remove(self) {
        if let Body::Named(t) = self {
            let _ = fs::remove_file(t);
        }
    }
}

fn item_error(
    path: &str,
    code: ErrorCode,
    message: impl Into<String>,
    retryable: bool,
) -> pb::ItemError {
    pb::ItemError {
        path: path.to_string(),
        code: code.as_str().to_string(),
        message: message.into(),
        retryable,
    }
}

/// Whether an I/O error means the disk (or the quota) is full.
fn is_no_space(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let no_space = [Errno::NOSPC, Errno::DQUOT].map(|e| e.raw_os_error());
    e.raw_os_error().is_some_and(|n| no_space.contains(&n))
}

fn io_item_error(path: &str, what: &str, e: &io::Error) -> pb::ItemError {
    use rustix::io::Errno;
    // A name the file system refuses: too long, not in its encoding, or invalid.
    let refused = [Errno::NAMETOOLONG, Errno::ILSEQ, Errno::INVAL].map(|e| e.raw_os_error());
    let (code, retryable) = match e.raw_os_error() {
        _ if is_no_space(e) => (ErrorCode::NoSpace, true),
        Some(n) if refused.contains(&n) => (ErrorCode::InvalidPath, false),
        _ => (ErrorCode::Io, true),
    };
    item_error(path, code, format!("{what}: {e}"), retryable)
}

fn staged_name(prefix: &str, path: &str) -> String {
    format!("{prefix}-{}", &blake3::hash(path.as_bytes()).to_hex()[..32])
}
