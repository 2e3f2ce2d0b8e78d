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

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use cms_mirror::model::{Item, Kind, hex, parent};
use cms_mirror::pathsafe::{self, STAGING_DIR};
use cms_mirror::pb;

use crate::ledger::PackageChanges;

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
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "syncfs" => Ok(Durability::Syncfs),
            "fsync" => Ok(Durability::Fsync),
            "none" => Ok(Durability::None),
            o => Err(format!(
                "unknown durability {o:?} (expected syncfs, fsync or none)"
            )),
        }
    }
}

/// A site's directories.
#[derive(Clone, Debug)]
pub struct SiteFs {
    pub root: PathBuf,
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

/// A file whose body is arriving over several entries (possibly several packages).
struct OpenFile {
    meta: Item,
    file: File,
    /// The body's name in the session's staging directory; `None` while it is an unnamed
    /// file in its destination directory (`O_TMPFILE`), which a crash simply frees.
    tmp: Option<PathBuf>,
    /// Its destination directory, open, while `tmp` is `None`.
    dir: Option<Arc<OwnedFd>>,
    /// Incremental hash while chunks arrive contiguously from offset 0 in this process.
    hasher: Option<blake3::Hasher>,
    next_offset: u64,
    /// Whether the metadata sidecar exists (written only for a file still in progress
    /// when its package ends, so a restarted target can finish it).
    meta_written: bool,
    /// Set once a chunk's write was left for its package's finishing task: from then on
    /// every chunk of this body is written there (see [`Deferred`]).
    writes: Option<Arc<FileWrites>>,
}

impl OpenFile {
    fn remove(self) {
        if let Some(t) = &self.tmp {
            let _ = fs::remove_file(t);
        }
    }
}

/// Per-session state of files in progress (kept in memory, rebuilt from the staging
/// directory after a restart).
pub struct SessionFiles {
    pub dir: PathBuf,
    open: HashMap<String, OpenFile>,
    failed: HashSet<String>,
    /// Set by an abort: no package of this session is applied any more.
    pub aborted: bool,
    writer: BodyWriter,
    /// Writers of the other threads that write whole files (see [`write_wholes`]).
    helpers: Vec<BodyWriter>,
    /// Writes the chunks left for the packages' finishing tasks, one package at a time.
    deferred_writer: Arc<Mutex<BodyWriter>>,
    /// Drop a package's bodies from the page cache once they are durable (see
    /// [`publish`]).
    drop_cache: bool,
}

impl SessionFiles {
    /// `direct_io`: write large block-aligned chunks with direct I/O (see [`BodyWriter`])
    /// and drop the rest of each body from the page cache once it is durable; only when
    /// acknowledgements wait for the disk.
    pub fn new(dir: PathBuf, direct_io: bool) -> SessionFiles {
        SessionFiles {
            dir,
            open: HashMap::new(),
            failed: HashSet::new(),
            aborted: false,
            writer: BodyWriter::new(direct_io),
            helpers: Vec::new(),
            deferred_writer: Arc::new(Mutex::new(BodyWriter::new(direct_io))),
            drop_cache: direct_io,
        }
    }
}

/// Smallest block-aligned part of a chunk written with direct I/O; less goes through the
/// page cache (a direct write waits for the device, which only pays off for large ones).
const DIRECT_MIN: usize = 64 * 1024;
/// Chunks of at least this size are hashed on a second thread while they are written.
const HASH_BESIDE_MIN: usize = 1024 * 1024;
/// Bytes copied into the aligned buffer per direct write: a whole chunk of a default
/// 4 MiB package in one write (fewer completions to wait for than 1 MiB pieces: large
/// full mirrors ~6% faster, target CPU ~10% lower). A writer's buffer grows to the
/// largest piece it has written (the threads that write smaller whole files keep less).
const DIRECT_PIECE: usize = 4 * 1024 * 1024;

/// Writes file bodies. With direct I/O (when acknowledgements wait for the disk anyway),
/// the block-aligned part of a large chunk goes from an aligned buffer straight to the
/// device: no page-cache pages to allocate and fill, and nothing dirty left for the
/// package's flush to write. The rest of a chunk (its unaligned tail, small chunks,
/// chunks at unaligned offsets) is written through the page cache. A file system that
/// refuses direct I/O turns it off for the session.
struct BodyWriter {
    direct: bool,
    /// Holds one aligned piece (grown as needed).
    buf: Vec<u8>,
}

impl BodyWriter {
    fn new(direct: bool) -> BodyWriter {
        BodyWriter {
            direct,
            buf: Vec::new(),
        }
    }

    /// Writes all of `data` at `offset` of `file`; returns how many bytes of it went
    /// with direct I/O.
    fn write_at(&mut self, file: &File, data: &[u8], offset: u64) -> io::Result<u64> {
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
    fn write_direct(&mut self, file: &File, data: &[u8], offset: u64) -> io::Result<()> {
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
struct FileWrites {
    pending: Mutex<usize>,
    idle: Condvar,
}

impl FileWrites {
    /// Waits until at most `left` writes of this body are pending (the others written,
    /// or dropped with their package).
    fn wait_until(&self, left: usize) {
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
struct Deferred {
    path: String,
    file: File,
    data: bytes::Bytes,
    offset: u64,
    writes: Arc<FileWrites>,
}

impl Deferred {
    fn new(
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
}

/// A staged item waiting to be put in place.
struct Publish {
    body: Body,
    item: Item,
    had_meta: bool,
    /// A body whose chunks were written by finishing tasks gets its time at publish,
    /// once they are all done (a write after it would change it).
    late: Option<LateTime>,
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
    code: &str,
    message: impl Into<String>,
    retryable: bool,
) -> pb::ItemError {
    pb::ItemError {
        path: path.to_string(),
        code: code.to_string(),
        message: message.into(),
        retryable,
    }
}

/// Item error code of a write that failed for lack of space.
pub const NO_SPACE: &str = "no_space";

fn io_item_error(path: &str, what: &str, e: &io::Error) -> pb::ItemError {
    let (code, retryable) = match e.raw_os_error() {
        Some(28) | Some(122) => (NO_SPACE, true), // ENOSPC, EDQUOT
        Some(36) => ("invalid_path", false),      // ENAMETOOLONG
        Some(84) | Some(22) => ("invalid_path", false), // EILSEQ, EINVAL: name refused
        _ => ("io", true),
    };
    item_error(path, code, format!("{what}: {e}"), retryable)
}

/// Checks that every ancestor of `rel` under `root` is a real directory (not a symlink).
fn check_parents(root: &Path, rel: &str) -> Result<(), String> {
    check_parents_cached(root, rel, &mut HashSet::new())
}

/// [`check_parents`], skipping ancestors already checked in this package (`ok` holds
/// them; an entry that replaces a directory must remove it and its descendants).
fn check_parents_cached(root: &Path, rel: &str, ok: &mut HashSet<String>) -> Result<(), String> {
    let parent_rel = parent(rel);
    if parent_rel.is_empty() || ok.contains(parent_rel) {
        return Ok(());
    }
    let mut cur = root.to_path_buf();
    let comps: Vec<&str> = rel.split('/').collect();
    for (i, c) in comps[..comps.len() - 1].iter().enumerate() {
        cur.push(c);
        if ok.contains(&comps[..=i].join("/")) {
            continue;
        }
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(format!(
                    "refusing to write through symlink {:?}",
                    comps[..=i].join("/")
                ));
            }
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(format!("{:?} is not a directory", comps[..=i].join("/"))),
            Err(e) => return Err(format!("parent {:?}: {e}", comps[..=i].join("/"))),
        }
    }
    ok.insert(parent_rel.to_string());
    Ok(())
}

/// Refuses a path that differs from another only by Unicode normalisation (NFC vs NFD,
/// as macOS clients and filesystems produce): another path in this package, or a name
/// already in one of its directories on the target. Such twins look identical to people
/// and are merged by normalising filesystems. ASCII paths cost nothing here; each
/// directory is listed at most once per package.
#[derive(Default)]
struct Normalisation {
    /// NFC form -> the path as sent, for this package.
    in_package: HashMap<String, String>,
    /// Directory -> its non-ASCII names on disk by NFC form.
    dirs: HashMap<PathBuf, HashMap<String, String>>,
}

impl Normalisation {
    fn check(&mut self, root: &Path, rel: &str) -> Result<(), String> {
        use unicode_normalization::UnicodeNormalization;
        if rel.is_ascii() {
            return Ok(());
        }
        let nfc: String = rel.nfc().collect();
        if let Some(other) = self.in_package.get(&nfc).filter(|o| *o != rel) {
            return Err(format!(
                "differs from {other:?} in the same package only by Unicode normalisation"
            ));
        }
        self.in_package.insert(nfc, rel.to_string());
        let mut dir = root.to_path_buf();
        for c in rel.split('/') {
            if !c.is_ascii() {
                let names = self.dirs.entry(dir.clone()).or_insert_with(|| {
                    fs::read_dir(&dir)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter_map(|e| e.file_name().into_string().ok())
                        .filter(|n| !n.is_ascii())
                        .map(|n| (n.nfc().collect(), n))
                        .collect()
                });
                let want: String = c.nfc().collect();
                if let Some(existing) = names.get(&want).filter(|n| *n != c) {
                    let at = dir.join(existing);
                    return Err(format!(
                        "differs from the existing {:?} only by Unicode normalisation",
                        at.strip_prefix(root).unwrap_or(&at).display()
                    ));
                }
            }
            dir.push(c);
        }
        Ok(())
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn staged_name(prefix: &str, path: &str) -> String {
    format!("{prefix}-{}", &blake3::hash(path.as_bytes()).to_hex()[..32])
}

fn file_time(mtime_ns: i64) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000) as u32,
    )
}

fn set_mtime(path: &Path, mtime_ns: i64) -> io::Result<()> {
    let t = file_time(mtime_ns);
    filetime::set_file_times(path, t, t)
}

fn set_symlink_mtime(path: &Path, mtime_ns: i64) -> io::Result<()> {
    let t = filetime::FileTime::from_unix_time(
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000) as u32,
    );
    filetime::set_symlink_file_times(path, t, t)
}

/// A package whose bodies are written and verified in the staging directory but not yet
/// durable nor visible: [`publish`] finishes it, [`discard`] drops it.
///
/// The two halves let a target write package N+1 while package N is flushed and renamed
/// into place (the flush is I/O wait, the writing is CPU): see `handle_import`.
pub struct Staged {
    publish: Vec<Publish>,
    to_sync: Vec<PathBuf>,
    dirs_to_sync: HashSet<PathBuf>,
    session_dir: PathBuf,
    /// Chunks still to write, in the order they came, and the session's writer for them.
    deferred: Vec<Deferred>,
    deferred_writer: Option<Arc<Mutex<BodyWriter>>>,
    drop_cache: bool,
    pub out: Applied,
}

impl Staged {
    fn empty(session_dir: PathBuf, out: Applied) -> Staged {
        Staged {
            publish: Vec::new(),
            to_sync: Vec::new(),
            dirs_to_sync: HashSet::new(),
            session_dir,
            deferred: Vec::new(),
            deferred_writer: None,
            drop_cache: false,
            out,
        }
    }

    /// Whether chunks are left to write (see [`write_deferred`]).
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Whether publishing places a symlink: a later package's parent checks, made before
    /// that, could then be out of date, so it must wait for this publish.
    pub fn places_symlinks(&self) -> bool {
        self.publish.iter().any(|p| p.item.kind == Kind::Symlink)
    }
}

/// First half of applying a package: validates every entry, creates directories, writes
/// and verifies file bodies in the staging directory, and deletes what the package
/// deletes. I/O problems with one item become item errors; the rest of the package is
/// applied. On a full disk nothing of the package is left to publish (`out.no_space`).
pub fn stage(
    site: &SiteFs,
    sess: &mut SessionFiles,
    payload: pb::PackagePayload,
    max_path: usize,
) -> Staged {
    let mut out = Applied::default();
    let mut publish: Vec<Publish> = Vec::new();
    let mut to_sync: Vec<PathBuf> = Vec::new();
    let mut dirs_to_sync: HashSet<PathBuf> = HashSet::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut parents_ok: HashSet<String> = HashSet::new();
    let mut normalised = Normalisation::default();
    let mut dirs = DestDirs::default();
    if let Err(e) = fs::create_dir_all(&sess.dir) {
        out.errors
            .push(io_item_error("", "cannot create staging directory", &e));
        return Staged::empty(sess.dir.clone(), out);
    }
    let mut wholes: Vec<WholeFile> = Vec::new();
    let mut deferred: Vec<Deferred> = Vec::new();
    let mut entries = payload.entries.into_iter().peekable();
    while let Some(entry) = entries.next() {
        let Some(op) = entry.op else { continue };
        match op {
            pb::entry::Op::Put(meta) => {
                let path = meta.path.clone();
                if let Err(e) = pathsafe::validate(&path, max_path) {
                    out.errors
                        .push(item_error(&path, "invalid_path", e.to_string(), false));
                    sess.failed.insert(path);
                    continue;
                }
                if !seen.insert(path.clone()) {
                    out.errors.push(item_error(
                        &path,
                        "invalid_path",
                        "duplicate path in one package",
                        false,
                    ));
                    // Its chunks must not land on the first occurrence's file.
                    sess.failed.insert(path);
                    continue;
                }
                let Some(item) = Item::from_pb(&meta) else {
                    out.errors.push(item_error(
                        &path,
                        "invalid_argument",
                        "unknown item kind",
                        false,
                    ));
                    sess.failed.insert(path);
                    continue;
                };
                if item.mode > 0o7777 {
                    out.errors.push(item_error(
                        &path,
                        "invalid_argument",
                        format!("mode {:o} out of range", item.mode),
                        false,
                    ));
                    sess.failed.insert(path);
                    continue;
                }
                if let Err(m) = check_parents_cached(&site.root, &path, &mut parents_ok)
                    .and_then(|()| normalised.check(&site.root, &path))
                {
                    out.errors.push(item_error(&path, "invalid_path", m, false));
                    sess.failed.insert(path);
                    continue;
                }
                sess.failed.remove(&path);
                if let Some(data) = take_whole_body(&item, &mut entries) {
                    if let Some(of) = sess.open.remove(&item.path) {
                        of.remove();
                    }
                    wholes.push(WholeFile { item, data });
                    continue;
                }
                match put(
                    site,
                    sess,
                    &mut dirs,
                    item,
                    &mut publish,
                    &mut to_sync,
                    &mut out,
                ) {
                    Ok(()) => {}
                    Err(e) => {
                        let err = io_item_error(&path, "cannot write", &e);
                        if err.code == NO_SPACE {
                            out.errors.push(err);
                            out.no_space = true;
                            break;
                        }
                        out.errors.push(err);
                        sess.failed.insert(path);
                    }
                }
            }
            pb::entry::Op::Data(d) => {
                if sess.failed.contains(&d.path) {
                    continue;
                }
                let path = d.path.clone();
                match data(site, sess, d, &mut publish, &mut deferred, &mut out) {
                    Ok(Some(tmp)) => to_sync.push(tmp),
                    Ok(None) => {}
                    Err(e) if e.code == NO_SPACE => {
                        // Keep what was staged: the package comes again once there is
                        // space, and its chunks are written at their offsets.
                        out.errors.push(e);
                        out.no_space = true;
                        break;
                    }
                    Err(e) => {
                        out.errors.push(e);
                        if let Some(of) = sess.open.remove(&path) {
                            if of.meta_written {
                                let _ = fs::remove_file(sess.dir.join(staged_name("m", &path)));
                            }
                            of.remove();
                        }
                        sess.failed.insert(path);
                    }
                }
            }
            pb::entry::Op::Delete(d) => {
                dirs.clear();
                let path = d.path;
                if let Err(e) = pathsafe::validate(&path, max_path) {
                    out.errors
                        .push(item_error(&path, "invalid_path", e.to_string(), false));
                    continue;
                }
                if let Err(m) = check_parents(&site.root, &path) {
                    // A missing parent means the item is already gone.
                    if !m.contains("No such file") {
                        out.errors.push(item_error(&path, "invalid_path", m, false));
                        continue;
                    }
                } else if let Err(e) = remove_any(&site.root.join(&path)) {
                    out.errors.push(io_item_error(&path, "cannot delete", &e));
                    continue;
                }
                dirs_to_sync.insert(site.root.join(parent(&path)));
                touch_parent(&mut out.changes, &path);
                out.changes.deletes.push(path.clone());
                out.changes.changes.push((path, "deleted"));
                out.items += 1;
            }
            pb::entry::Op::Abort(a) => {
                if let Some(of) = sess.open.remove(&a.path) {
                    of.remove();
                }
                // Also after a restart, when the body is known only by its sidecar.
                let _ = fs::remove_file(sess.dir.join(staged_name("f", &a.path)));
                let _ = fs::remove_file(sess.dir.join(staged_name("m", &a.path)));
                // Later chunks of the abandoned body (already packed) are dropped.
                sess.failed.insert(a.path);
            }
        }
    }
    if !out.no_space {
        let results = write_wholes(site, &sess.dir, wholes, &mut sess.writer, &mut sess.helpers);
        for r in results {
            match r {
                Ok((p, direct)) => {
                    out.bytes += p.item.size;
                    out.bytes_direct += direct;
                    if let Body::Named(tmp) = &p.body {
                        to_sync.push(tmp.clone());
                    }
                    publish.push(p);
                }
                Err((path, e)) => {
                    // Out of space, the package is sent again as a whole.
                    if e.code == NO_SPACE {
                        out.no_space = true;
                    } else {
                        sess.failed.insert(path);
                    }
                    out.errors.push(e);
                }
            }
        }
    }
    let nothing = |publish, out| Staged::empty(sess.dir.clone(), discard_for_retry(publish, out));
    if out.no_space {
        return nothing(publish, out);
    }

    // Files continuing in a later package: keep their metadata beside the staged body so
    // a restarted target can finish them when the next chunk arrives.
    for (path, of) in sess.open.iter_mut().filter(|(_, of)| !of.meta_written) {
        let meta_path = sess.dir.join(staged_name("m", path));
        let written = (|| {
            if of.tmp.is_none() {
                let tmp = sess.dir.join(staged_name("f", path));
                let _ = fs::remove_file(&tmp);
                link_unnamed(&of.file, &tmp)?;
                to_sync.push(tmp.clone());
                of.tmp = Some(tmp);
            }
            fs::write(&meta_path, serde_json::to_vec(&of.meta).unwrap_or_default())
        })();
        match written {
            Ok(()) => {
                of.meta_written = true;
                to_sync.push(meta_path);
            }
            Err(e) => {
                let err = io_item_error(path, "cannot write staging metadata", &e);
                out.no_space |= err.code == NO_SPACE;
                out.errors.push(err);
            }
        }
    }
    if out.no_space {
        return nothing(publish, out);
    }
    Staged {
        publish,
        to_sync,
        dirs_to_sync,
        session_dir: sess.dir.clone(),
        deferred_writer: (!deferred.is_empty()).then(|| sess.deferred_writer.clone()),
        deferred,
        drop_cache: sess.drop_cache,
        out,
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
    let no_space = err.code == NO_SPACE;
    let mut out = discard_for_retry(staged.publish, staged.out);
    out.errors.push(err);
    out.no_space |= no_space;
    out.not_written = !no_space;
    Staged::empty(staged.session_dir, out)
}

/// What a whole file weighs when a package's whole files are split between threads: its
/// bytes plus this much for creating, timing and linking it.
const WHOLE_FILE_WEIGHT: u64 = 16 * 1024;

/// Packages whose whole files weigh less are written on the staging thread alone (32
/// small files, or a few larger ones).
const WHOLE_PARALLEL_MIN: u64 = 32 * WHOLE_FILE_WEIGHT;

/// A file whose whole body follows its put in the same package.
struct WholeFile {
    item: Item,
    data: pb::FileData,
}

/// The chunk after a file's put when it is the file's whole body: taken from `entries`,
/// for [`write_wholes`].
fn take_whole_body(
    item: &Item,
    entries: &mut std::iter::Peekable<impl Iterator<Item = pb::Entry>>,
) -> Option<pb::FileData> {
    if item.kind != Kind::File || item.size == 0 {
        return None;
    }
    let whole = |e: &pb::Entry| {
        matches!(&e.op, Some(pb::entry::Op::Data(d))
            if d.path == item.path && d.offset == 0 && d.last && d.data.len() as u64 == item.size)
    };
    if !entries.peek().is_some_and(whole) {
        return None;
    }
    match entries.next()?.op? {
        pb::entry::Op::Data(d) => Some(d),
        _ => None,
    }
}

/// Writes whole files (their checks already made in package order) into unnamed files
/// beside their destinations, verifies their hashes and sets their times. Small files
/// cost a few system calls that mostly wait on the kernel's locks and page allocation,
/// larger ones a hash and a copy: a package's files are split between threads by
/// weight, in contiguous parts (`writer` serves the first, `helpers` the others).
/// Returns, per file in package order, what to publish (with the bytes written with
/// direct I/O), or the file's error.
fn write_wholes(
    site: &SiteFs,
    session_dir: &Path,
    wholes: Vec<WholeFile>,
    writer: &mut BodyWriter,
    helpers: &mut Vec<BodyWriter>,
) -> Vec<Result<(Publish, u64), (String, pb::ItemError)>> {
    let write_all = |part: Vec<WholeFile>, writer: &mut BodyWriter| {
        let mut dirs = DestDirs::default();
        part.into_iter()
            .map(|w| {
                let path = w.item.path.clone();
                write_whole(site, session_dir, &mut dirs, writer, w).map_err(|e| (path, e))
            })
            .collect::<Vec<_>>()
    };
    let weight = |w: &WholeFile| w.item.size + WHOLE_FILE_WEIGHT;
    let total: u64 = wholes.iter().map(weight).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get().min(4))
        .min(wholes.len());
    if threads < 2 || total < WHOLE_PARALLEL_MIN {
        return write_all(wholes, writer);
    }
    // Contiguous parts of about equal weight: the files of one directory mostly stay on
    // one thread.
    let mut parts: Vec<Vec<WholeFile>> = vec![Vec::new()];
    let mut acc = 0;
    for w in wholes {
        let cut = total * parts.len() as u64 / threads as u64;
        if acc >= cut && parts.len() < threads && !parts.last().expect("one part").is_empty() {
            parts.push(Vec::new());
        }
        acc += weight(&w);
        parts.last_mut().expect("one part").push(w);
    }
    while helpers.len() < parts.len() - 1 {
        helpers.push(BodyWriter::new(writer.direct));
    }
    let first = parts.remove(0);
    let all = std::thread::scope(|s| {
        let others: Vec<_> = parts
            .into_iter()
            .zip(helpers.iter_mut())
            .map(|(p, w)| s.spawn(move || write_all(p, w)))
            .collect();
        let mut all = write_all(first, writer);
        for h in others {
            all.extend(h.join().expect("a staging thread panicked"));
        }
        all
    });
    // A file system that refused direct I/O on one thread refuses it on all.
    if helpers.iter().any(|h| !h.direct) {
        writer.direct = false;
    }
    for h in helpers.iter_mut() {
        h.direct = writer.direct;
    }
    all
}

/// Writes one whole file; see [`write_wholes`].
fn write_whole(
    site: &SiteFs,
    session_dir: &Path,
    dirs: &mut DestDirs,
    writer: &mut BodyWriter,
    w: WholeFile,
) -> Result<(Publish, u64), pb::ItemError> {
    let WholeFile { mut item, data } = w;
    let path = item.path.clone();
    let (file, tmp, dir) = create_body(site, session_dir, dirs, &item)
        .map_err(|e| io_item_error(&path, "cannot write", &e))?;
    let mut hasher = blake3::Hasher::new();
    let written = write_hashed(writer, &file, &data.data, 0, Some(&mut hasher));
    let actual = hasher.finalize();
    let mut direct = 0;
    let written = written
        .map_err(|e| io_item_error(&path, "cannot write", &e))
        .and_then(|n| {
            direct = n;
            check_hash(&path, &actual, &data.blake3)
        })
        .and_then(|()| {
            let t = file_time(item.mtime_ns);
            filetime::set_file_handle_times(&file, Some(t), Some(t))
                .map_err(|e| io_item_error(&path, "cannot set mtime", &e))
        });
    if let Err(e) = written {
        if let Some(t) = &tmp {
            let _ = fs::remove_file(t);
        }
        return Err(e);
    }
    item.hash = Some(actual.to_hex().to_string());
    let publish = Publish {
        body: staged_body(file, tmp, dir),
        item,
        had_meta: false,
        late: None,
    };
    Ok((publish, direct))
}

/// Writes `data` at `offset` of `file` and feeds it to `hasher`: a chunk of
/// [`HASH_BESIDE_MIN`] or more is hashed on a second thread while it is written. The
/// hasher has seen `data` whatever the write gave. Returns the bytes written with direct
/// I/O.
fn write_hashed(
    writer: &mut BodyWriter,
    file: &File,
    data: &[u8],
    offset: u64,
    hasher: Option<&mut blake3::Hasher>,
) -> io::Result<u64> {
    match hasher {
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

/// Creates the file a new body of `item` is written into, with the item's mode: unnamed
/// in its open destination directory where the file system allows (no name to create
/// now nor to remove from a staging directory later, nothing left behind by a crash,
/// and the inode lands beside its directory), else named in the session's staging
/// directory. Returns the file and either its staging name or its open directory.
fn create_body(
    site: &SiteFs,
    session_dir: &Path,
    dirs: &mut DestDirs,
    item: &Item,
) -> io::Result<(File, Option<PathBuf>, Option<Arc<OwnedFd>>)> {
    let dir = dirs.open(&site.root, parent(&item.path))?;
    let (file, tmp, dir) = match create_unnamed(dir.as_fd(), item.mode)? {
        Some(f) => (f, None, Some(dir)),
        None => {
            let tmp = session_dir.join(staged_name("f", &item.path));
            (File::create(&tmp)?, Some(tmp), None)
        }
    };
    if tmp.is_some() || !created_with(item.mode) {
        file.set_permissions(fs::Permissions::from_mode(item.mode))
            .inspect_err(|_| {
                if let Some(t) = &tmp {
                    let _ = fs::remove_file(t);
                }
            })?;
    }
    Ok((file, tmp, dir))
}

/// A finished body to publish: its staging name if it has one, else the unnamed file
/// and its destination directory.
fn staged_body(file: File, tmp: Option<PathBuf>, dir: Option<Arc<OwnedFd>>) -> Body {
    match (tmp, dir) {
        (Some(tmp), _) => Body::Named(tmp),
        (None, Some(dir)) => Body::Unnamed(file, dir),
        (None, None) => unreachable!("a body is either named or in an open directory"),
    }
}

/// Refuses a body whose BLAKE3 is not the one the source sent.
fn check_hash(path: &str, actual: &blake3::Hash, expected: &[u8]) -> Result<(), pb::ItemError> {
    if expected.len() == 32 && actual.as_bytes().as_slice() == expected {
        return Ok(());
    }
    let m = format!(
        "content hash {} does not match the source's {}",
        actual.to_hex(),
        hex(expected)
    );
    Err(item_error(path, "checksum_mismatch", m, true))
}

/// Drops a staged package that will not be published (an earlier package of its stream
/// failed): bodies that began in an earlier package keep their staged data, as on a full
/// disk, so a resend completes them.
pub fn discard(staged: Staged) {
    discard_for_retry(staged.publish, staged.out);
}

/// Second half of applying a package: makes the staged bodies durable as one batch,
/// renames them into place and syncs their directories. Only then may the package be
/// recorded and acknowledged.
pub fn publish(site: &SiteFs, staged: Staged, durability: Durability) -> Applied {
    // Chunks the finishing task has not written yet (it usually has).
    let Staged {
        publish,
        to_sync,
        mut dirs_to_sync,
        session_dir,
        drop_cache,
        mut out,
        ..
    } = write_deferred(staged);
    if out.no_space || out.not_written {
        return out;
    }
    // Every write of these bodies is done, also those of a package written by a stream
    // that ended: their times are set now, before the batch is made durable.
    let mut publish: Vec<Publish> = publish
        .into_iter()
        .filter_map(|mut p| {
            let Some(late) = p.late.take() else {
                return Some(p);
            };
            late.writes.wait_until(0);
            let t = file_time(late.mtime_ns);
            match filetime::set_file_handle_times(&late.file, Some(t), Some(t)) {
                Ok(()) => Some(p),
                Err(e) => {
                    out.errors
                        .push(io_item_error(&p.item.path, "cannot set mtime", &e));
                    if p.had_meta {
                        let _ = fs::remove_file(session_dir.join(staged_name("m", &p.item.path)));
                    }
                    p.body.remove();
                    None
                }
            }
        })
        .collect();
    if let Err(e) = sync_batch(&site.root, &to_sync, &publish, durability) {
        if matches!(e.raw_os_error(), Some(28) | Some(122)) {
            let first = publish
                .first()
                .map(|p| p.item.path.clone())
                .unwrap_or_default();
            out.errors.push(io_item_error(&first, "cannot sync", &e));
            out.no_space = true;
            return discard_for_retry(publish, out);
        }
        for p in publish.drain(..) {
            out.errors
                .push(io_item_error(&p.item.path, "cannot sync", &e));
            p.body.remove();
        }
    }
    if drop_cache {
        uncache_named(&publish);
    }
    // Once a symlink is published, a later item's parent may have become that link:
    // check every later item's parents again before its rename.
    let mut recheck = false;
    for p in publish {
        let dest = site.root.join(&p.item.path);
        if recheck && let Err(m) = check_parents(&site.root, &p.item.path) {
            out.errors
                .push(item_error(&p.item.path, "invalid_path", m, false));
            p.body.remove();
            continue;
        }
        recheck |= p.item.kind == Kind::Symlink;
        let res = match &p.body {
            Body::Unnamed(f, dir) => link_into_place(f, dir, &dest, &session_dir, &p.item.path),
            Body::Named(tmp) => rename_into_place(tmp, &dest),
        };
        match res {
            Ok(action) => {
                if drop_cache
                    && p.item.kind == Kind::File
                    && let Body::Unnamed(f, _) = p.body
                {
                    out.to_uncache.push(f);
                }
                if p.had_meta {
                    let _ = fs::remove_file(session_dir.join(staged_name("m", &p.item.path)));
                }
                dirs_to_sync.insert(site.root.join(parent(&p.item.path)));
                touch_parent(&mut out.changes, &p.item.path);
                out.changes.changes.push((p.item.path.clone(), action));
                out.changes.upserts.push(p.item);
                out.items += 1;
            }
            Err(e) => {
                out.errors
                    .push(io_item_error(&p.item.path, "cannot put into place", &e));
                p.body.remove();
            }
        }
    }
    // The renames become durable with their directories: one more syncfs (it writes
    // every directory of the package at once; a fsync per directory waits for each in
    // turn), or a fsync of each directory.
    let synced = match durability {
        Durability::None => Ok(()),
        Durability::Syncfs if dirs_to_sync.is_empty() => Ok(()),
        Durability::Syncfs => syncfs(&site.root),
        Durability::Fsync => dirs_to_sync
            .iter()
            .try_for_each(|d| File::open(d)?.sync_all()),
    };
    if let Err(e) = synced {
        out.errors.push(io_item_error(
            "",
            "cannot sync the package's directories",
            &e,
        ));
    }
    out
}

/// Drops durable (hence clean) bodies from the page cache. Their pages go back to the
/// free lists and later packages' writes reuse them: in a VM whose host takes back idle
/// guest memory, writing into pages not used for a while costs more than the copy itself
/// (a loop writing 20,000 files of 8.7 KiB with a `syncfs` per 500 took 1.07-1.11 s
/// keeping its pages and 0.55-0.59 s dropping them). The target does it once the package
/// is recorded, beside the next package's publish: on the publish path it cost a small
/// full mirror 7% of its wall time where new pages are cheap, after it 5%. Readers of the
/// site read the files back from the disk, as they do those written with direct I/O.
/// Advice only: an error changes nothing.
pub fn uncache(files: Vec<File>) {
    for f in files {
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
    }
}

/// [`uncache`] for bodies staged under a name, before their rename (by name, not
/// following a symlink put in their place).
fn uncache_named(publish: &[Publish]) {
    use rustix::fs::{Advice, Mode, OFlags, fadvise, openat};
    for p in publish.iter().filter(|p| p.item.kind == Kind::File) {
        if let Body::Named(tmp) = &p.body {
            let _ = openat(
                rustix::fs::CWD,
                tmp,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .and_then(|f| fadvise(&f, 0, None, Advice::DontNeed));
        }
    }
}

/// Puts an unnamed body in place: one link for a new item; an existing one is replaced
/// by renaming over it (from a link in the session's staging directory), an existing
/// directory removed first. Returns whether the item was created or updated.
fn link_into_place(
    f: &File,
    dir: &OwnedFd,
    dest: &Path,
    session_dir: &Path,
    path: &str,
) -> io::Result<&'static str> {
    let name = path.rsplit_once('/').map_or(path, |(_, n)| n);
    match link_unnamed_at(f, dir.as_fd(), name) {
        Ok(()) => return Ok("created"),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if fs::symlink_metadata(dest)?.is_dir() {
        fs::remove_dir_all(dest)?;
        link_unnamed(f, dest)?;
        return Ok("updated");
    }
    let tmp = session_dir.join(staged_name("f", path));
    let _ = fs::remove_file(&tmp);
    link_unnamed(f, &tmp)?;
    fs::rename(&tmp, dest).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    Ok("updated")
}

/// Puts a named staged item in place (a directory in the way is removed first).
fn rename_into_place(tmp: &Path, dest: &Path) -> io::Result<&'static str> {
    let action = match fs::symlink_metadata(dest) {
        Ok(md) if md.is_dir() => {
            fs::remove_dir_all(dest)?;
            "updated"
        }
        Ok(_) => "updated",
        Err(e) if e.kind() == io::ErrorKind::NotFound => "created",
        Err(e) => return Err(e),
    };
    fs::rename(tmp, dest)?;
    Ok(action)
}

/// Gives an unnamed (`O_TMPFILE`) file the name `name` in the open directory `dir`.
/// Without CAP_DAC_READ_SEARCH the kernel refuses `AT_EMPTY_PATH`; the file's /proc
/// link works for any owner.
fn link_unnamed_at<P: rustix::path::Arg + Copy>(
    f: &File,
    dir: BorrowedFd<'_>,
    name: P,
) -> io::Result<()> {
    use rustix::fs::{AtFlags, CWD, linkat};
    match linkat(f, "", dir, name, AtFlags::EMPTY_PATH) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {
            use std::os::fd::AsRawFd;
            let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
            linkat(CWD, proc.as_str(), dir, name, AtFlags::SYMLINK_FOLLOW).map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Gives an unnamed (`O_TMPFILE`) file the path `dest`.
fn link_unnamed(f: &File, dest: &Path) -> io::Result<()> {
    link_unnamed_at(f, rustix::fs::CWD, dest)
}

/// Creates an unnamed file in the open directory `dir` with `mode` (less the umask), or
/// `None` where the file system has no `O_TMPFILE` or no descriptor is left: the caller
/// stages a named file instead.
fn create_unnamed(dir: BorrowedFd<'_>, mode: u32) -> io::Result<Option<File>> {
    use rustix::fs::{Mode, OFlags, openat};
    use rustix::io::Errno;
    match openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o7777),
    ) {
        Ok(fd) => Ok(Some(File::from(fd))),
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::MFILE | Errno::NFILE) => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The process's umask, read once without changing it (`None` if unknown).
fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("Umask:"))?;
        u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
    })
}

/// Whether a file created with `mode` already has it (no `fchmod` needed).
fn created_with(mode: u32) -> bool {
    mode & !0o777 == 0 && umask().is_some_and(|u| u & mode == 0)
}

fn syncfs(root: &Path) -> io::Result<()> {
    rustix::fs::syncfs(File::open(root)?).map_err(io::Error::from)
}

/// Undoes the visible effects of a package that ran out of space: none of its files is
/// published. Bodies that began in an earlier package keep their staged data and
/// metadata, so the resent package completes them.
fn discard_for_retry(publish: Vec<Publish>, mut out: Applied) -> Applied {
    for p in publish.into_iter().filter(|p| !p.had_meta) {
        p.body.remove();
    }
    out.changes = PackageChanges::default();
    out.items = 0;
    out.bytes = 0;
    out
}

fn touch_parent(ch: &mut PackageChanges, path: &str) {
    let p = parent(path);
    if !p.is_empty() && ch.touched_dirs.last().map(String::as_str) != Some(p) {
        ch.touched_dirs.push(p.to_string());
    }
}

/// Destination directories opened while staging a package. The last one stays open: a
/// package holds the files of a directory together, and each of them is then created
/// and linked by its name in that directory (one name for the kernel to resolve, not
/// every component of its path twice).
#[derive(Default)]
struct DestDirs {
    last: Option<(String, Arc<OwnedFd>)>,
}

impl DestDirs {
    fn open(&mut self, root: &Path, rel: &str) -> io::Result<Arc<OwnedFd>> {
        use rustix::fs::{Mode, OFlags, openat};
        if let Some((r, fd)) = &self.last
            && r == rel
        {
            return Ok(fd.clone());
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = Arc::new(openat(
            rustix::fs::CWD,
            root.join(rel),
            flags,
            Mode::empty(),
        )?);
        self.last = Some((rel.to_string(), fd.clone()));
        Ok(fd)
    }

    /// Forgets the open directory (a directory of the tree was created or removed).
    fn clear(&mut self) {
        self.last = None;
    }
}

fn put(
    site: &SiteFs,
    sess: &mut SessionFiles,
    dirs: &mut DestDirs,
    item: Item,
    publish: &mut Vec<Publish>,
    to_sync: &mut Vec<PathBuf>,
    out: &mut Applied,
) -> io::Result<()> {
    match item.kind {
        Kind::Dir => {
            dirs.clear();
            let dest = site.root.join(&item.path);
            let action = match fs::symlink_metadata(&dest) {
                Ok(md) if md.is_dir() => "updated",
                Ok(_) => {
                    fs::remove_file(&dest)?;
                    fs::create_dir(&dest)?;
                    "updated"
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&dest)?;
                    "created"
                }
                Err(e) => return Err(e),
            };
            fs::set_permissions(&dest, fs::Permissions::from_mode(item.mode))?;
            touch_parent(&mut out.changes, &item.path);
            out.changes.changes.push((item.path.clone(), action));
            out.changes.touched_dirs.push(item.path.clone());
            out.changes.upserts.push(item);
            out.items += 1;
        }
        Kind::Symlink => {
            let tmp = sess.dir.join(staged_name("l", &item.path));
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&item.link, &tmp)?;
            set_symlink_mtime(&tmp, item.mtime_ns)?;
            publish.push(Publish {
                body: Body::Named(tmp),
                item,
                had_meta: false,
                late: None,
            });
        }
        Kind::File => {
            if let Some(of) = sess.open.remove(&item.path) {
                of.remove();
            }
            let (file, tmp, dir) = create_body(site, &sess.dir, dirs, &item)?;
            if item.size > 0 {
                sess.open.insert(
                    item.path.clone(),
                    OpenFile {
                        meta: item,
                        file,
                        tmp,
                        dir,
                        hasher: Some(blake3::Hasher::new()),
                        next_offset: 0,
                        meta_written: false,
                        writes: None,
                    },
                );
                return Ok(());
            }
            let expected = blake3::hash(b"");
            if let Some(h) = &item.hash
                && h != &expected.to_hex().to_string()
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "hash of an empty file does not match",
                ));
            }
            let t = file_time(item.mtime_ns);
            filetime::set_file_handle_times(&file, Some(t), Some(t))?;
            let mut item = item;
            item.hash = Some(expected.to_hex().to_string());
            to_sync.extend(tmp.clone());
            let body = staged_body(file, tmp, dir);
            publish.push(Publish {
                body,
                item,
                had_meta: false,
                late: None,
            });
        }
    }
    Ok(())
}

/// Writes a chunk. Returns the staged path to sync when the chunk was written to a
/// named file.
fn data(
    site: &SiteFs,
    sess: &mut SessionFiles,
    d: pb::FileData,
    publish: &mut Vec<Publish>,
    deferred: &mut Vec<Deferred>,
    out: &mut Applied,
) -> Result<Option<PathBuf>, pb::ItemError> {
    let path = d.path.clone();
    if !sess.open.contains_key(&path)
        && d.last
        && let Some(item) = already_published(site, &d)
    {
        // The target stopped after publishing this file but before recording its
        // package; the resent last chunk finds it complete in place.
        touch_parent(&mut out.changes, &path);
        out.changes.changes.push((path, "updated"));
        out.changes.upserts.push(item);
        out.items += 1;
        return Ok(None);
    }
    if !sess.open.contains_key(&path) {
        // After a restart: reopen the staged file and its metadata.
        let meta_path = sess.dir.join(staged_name("m", &path));
        let tmp = sess.dir.join(staged_name("f", &path));
        let meta: Item = fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                item_error(
                    &path,
                    "invalid_argument",
                    "file data without a preceding put",
                    false,
                )
            })?;
        let file = fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&tmp)
            .map_err(|e| io_item_error(&path, "cannot reopen staged file", &e))?;
        sess.open.insert(
            path.clone(),
            OpenFile {
                meta,
                file,
                tmp: Some(tmp),
                dir: None,
                hasher: None,
                next_offset: u64::MAX,
                meta_written: true,
                writes: None,
            },
        );
    }
    let of = sess.open.get_mut(&path).expect("inserted above");
    let end = d.offset.saturating_add(d.data.len() as u64);
    if end > of.meta.size {
        return Err(item_error(
            &path,
            "invalid_argument",
            format!(
                "chunk ends at {end}, beyond the announced size {}",
                of.meta.size
            ),
            false,
        ));
    }
    if d.offset != of.next_offset {
        of.hasher = None;
    }
    let len = d.data.len() as u64;
    // A large chunk of a body hashed as it comes is written by the finishing task, and
    // so is every later chunk of that body; but a last chunk whose body must be read
    // back to be hashed is written here, once the body's other writes are done.
    let defer = match &of.writes {
        Some(_) => !(d.last && of.hasher.is_none()),
        None => of.hasher.is_some() && d.data.len() >= DIRECT_MIN,
    };
    if defer {
        let file = of
            .file
            .try_clone()
            .map_err(|e| io_item_error(&path, "cannot write", &e))?;
        if let Some(h) = of.hasher.as_mut() {
            h.update(&d.data);
        }
        let writes = of.writes.get_or_insert_with(Default::default).clone();
        deferred.push(Deferred::new(path.clone(), file, d.data, d.offset, writes));
    } else {
        if let Some(w) = &of.writes {
            // This package's own chunks of the body are written here, after those of
            // the packages before it.
            let mine: Vec<Deferred> = deferred.extract_if(.., |x| x.path == path).collect();
            w.wait_until(mine.len());
            for m in mine {
                match sess.writer.write_at(&m.file, &m.data, m.offset) {
                    Ok(n) => out.bytes_direct += n,
                    Err(e) => return Err(io_item_error(&path, "cannot write", &e)),
                }
            }
        }
        match write_hashed(
            &mut sess.writer,
            &of.file,
            &d.data,
            d.offset,
            of.hasher.as_mut(),
        ) {
            Ok(n) => out.bytes_direct += n,
            Err(e) => {
                // The chunk may come again: hash the file by reading it back at the end.
                of.hasher = None;
                return Err(io_item_error(&path, "cannot write", &e));
            }
        }
    }
    of.next_offset = end;
    out.bytes += len;
    if !d.last {
        return Ok(of.tmp.clone());
    }
    let of = sess.open.remove(&path).expect("present");
    // Written contiguously from 0 into a new file: its length is where writing ended.
    let len = match &of.hasher {
        Some(_) => of.next_offset,
        None => of
            .file
            .metadata()
            .map_err(|e| io_item_error(&path, "cannot stat", &e))?
            .len(),
    };
    if len != of.meta.size {
        let m = format!("received {len} bytes, expected {}", of.meta.size);
        of.remove();
        return Err(item_error(&path, "checksum_mismatch", m, true));
    }
    let actual = match &of.hasher {
        Some(h) => h.finalize(),
        None => {
            let mut h = blake3::Hasher::new();
            let read = h.update_reader(ReadAt::new(&of.file));
            if let Err(e) = read {
                of.remove();
                return Err(io_item_error(&path, "cannot read back", &e));
            }
            h.finalize()
        }
    };
    if let Err(e) = check_hash(&path, &actual, &d.blake3) {
        of.remove();
        return Err(e);
    }
    let late = match of.writes {
        Some(writes) => Some(LateTime {
            file: of
                .file
                .try_clone()
                .map_err(|e| io_item_error(&path, "cannot set mtime", &e))?,
            writes,
            mtime_ns: of.meta.mtime_ns,
        }),
        None => {
            let t = file_time(of.meta.mtime_ns);
            filetime::set_file_handle_times(&of.file, Some(t), Some(t))
                .map_err(|e| io_item_error(&path, "cannot set mtime", &e))?;
            None
        }
    };
    let mut item = of.meta;
    item.hash = Some(actual.to_hex().to_string());
    let synced = of.tmp.clone();
    let body = staged_body(of.file, of.tmp, of.dir);
    publish.push(Publish {
        body,
        item,
        had_meta: of.meta_written,
        late,
    });
    Ok(synced)
}

/// Reads a file from offset 0 by position (the handle's offset is left alone).
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
}

impl<'a> ReadAt<'a> {
    fn new(file: &'a File) -> Self {
        ReadAt { file, pos: 0 }
    }
}

impl io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The item at `d.path` when it already is the complete body the last chunk `d` ends
/// (same length, same BLAKE3) and there is nothing staged for it.
fn already_published(site: &SiteFs, d: &pb::FileData) -> Option<Item> {
    let end = d.offset.checked_add(d.data.len() as u64)?;
    let mut dirs = cms_mirror::fswalk::DirCache::new(&site.root);
    let mut item = dirs
        .item(&d.path)
        .ok()
        .filter(|i| i.kind == Kind::File && i.size == end && d.blake3.len() == 32)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(dirs.open(&d.path).ok()?).ok()?;
    if h.finalize().as_bytes().as_slice() != d.blake3.as_slice() {
        return None;
    }
    item.hash = Some(hex(&d.blake3));
    Some(item)
}

/// Makes a package's staged files durable: the named files in `files` (bodies still in
/// progress, sidecars, named bodies) and the unnamed bodies about to be published.
fn sync_batch(
    root: &Path,
    files: &[PathBuf],
    publish: &[Publish],
    durability: Durability,
) -> io::Result<()> {
    let unnamed = || {
        publish.iter().filter_map(|p| match &p.body {
            Body::Unnamed(f, _) => Some(f),
            Body::Named(_) => None,
        })
    };
    match durability {
        Durability::None => Ok(()),
        Durability::Syncfs if files.is_empty() && unnamed().next().is_none() => Ok(()),
        Durability::Syncfs => syncfs(root),
        Durability::Fsync => {
            enum One<'a> {
                Path(&'a Path),
                Open(&'a File),
            }
            let all: Vec<One> = files
                .iter()
                .map(|p| One::Path(p))
                .chain(unnamed().map(One::Open))
                .collect();
            let threads = all.len().clamp(1, 4);
            let chunk = all.len().div_ceil(threads).max(1);
            std::thread::scope(|s| {
                let handles: Vec<_> = all
                    .chunks(chunk)
                    .map(|c| {
                        s.spawn(move || -> io::Result<()> {
                            for one in c {
                                match one {
                                    One::Path(p) => File::open(p)?.sync_all()?,
                                    One::Open(f) => f.sync_all()?,
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                handles.into_iter().try_for_each(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("sync thread panicked")))
                })
            })
        }
    }
}

/// Aborts a session: waits for an apply in progress (the caller holds the lock), drops
/// its open files and removes its staging directory, and the site's staging directory
/// when it is empty.
pub fn abort_session(site: &SiteFs, sess: &mut SessionFiles) {
    sess.aborted = true;
    sess.open.clear();
    let _ = fs::remove_dir_all(&sess.dir);
    let _ = fs::remove_dir(site.staging());
}

/// Restores the recorded mtime of directories (deepest first), at commit.
pub fn restore_dir_times(root: &Path, dirs: &[Item]) {
    for d in dirs {
        if check_parents(root, &d.path).is_err() {
            continue;
        }
        let p = root.join(&d.path);
        if fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            let _ = set_mtime(&p, d.mtime_ns);
        }
    }
}

/// Removes staging directories of sessions that are not open any more (leftovers of a
/// crash); keeps those of open sessions, whose acknowledged partial files a resumed job
/// continues.
pub fn clean_staging(site: &SiteFs, open_sessions: &[String]) -> io::Result<usize> {
    let keep: HashSet<String> = open_sessions
        .iter()
        .map(|s| {
            site.session_dir(s)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut removed = 0;
    match fs::read_dir(site.staging()) {
        Ok(rd) => {
            for e in rd.flatten() {
                if !keep.contains(&e.file_name().to_string_lossy().into_owned()) {
                    remove_any(&e.path())?;
                    removed += 1;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// Direct I/O takes the block-aligned head of a large chunk at an aligned offset,
    /// nothing else; what lands in the file is the same either way. (The tests' temporary
    /// directory is on ext4 here, which takes direct I/O.)
    #[test]
    fn large_aligned_chunks_go_direct_and_the_file_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let data = body(3 * DIRECT_PIECE + 5000);
        let (a, rest) = data.split_at(DIRECT_PIECE + 8192);
        let (b, c) = rest.split_at(100);
        let path = dir.path().join("f");
        let file = File::create_new(&path).unwrap();
        let mut w = BodyWriter::new(true);
        assert_eq!(w.write_at(&file, a, 0).unwrap(), a.len() as u64);
        // Too small, then at an unaligned offset: through the page cache.
        assert_eq!(w.write_at(&file, b, a.len() as u64).unwrap(), 0);
        let at = (a.len() + b.len()) as u64;
        assert_eq!(w.write_at(&file, c, at).unwrap(), 0);
        assert_eq!(fs::read(&path).unwrap(), data);

        let path = dir.path().join("g");
        let file = File::create_new(&path).unwrap();
        // An aligned offset with an unaligned length: the head direct, its tail not.
        assert_eq!(w.write_at(&file, &data[..4096], 0).unwrap(), 0);
        let head = (data.len() - 4096) / 4096 * 4096;
        assert_eq!(w.write_at(&file, &data[4096..], 4096).unwrap(), head as u64);
        assert_eq!(fs::read(&path).unwrap(), data);
        // The descriptor is back to buffered I/O.
        let flags = rustix::fs::fcntl_getfl(&file).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::DIRECT));

        let path = dir.path().join("h");
        let file = File::create_new(&path).unwrap();
        let mut off = BodyWriter::new(false);
        assert_eq!(off.write_at(&file, &data, 0).unwrap(), 0);
        assert_eq!(fs::read(&path).unwrap(), data);
    }

    fn put_entry(item: &Item) -> pb::Entry {
        pb::Entry {
            op: Some(pb::entry::Op::Put(item.to_pb())),
        }
    }

    fn data_entry(path: &str, offset: u64, data: &[u8], last: bool, hash: &[u8]) -> pb::Entry {
        pb::Entry {
            op: Some(pb::entry::Op::Data(pb::FileData {
                path: path.into(),
                offset,
                data: data.to_vec().into(),
                last,
                blake3: hash.to_vec(),
                ..Default::default()
            })),
        }
    }

    /// A file's put and its body in two chunks, split at `at` (the hash on the last).
    fn two_chunks(path: &str, data: &[u8], at: usize) -> [pb::Entry; 3] {
        let (a, b) = data.split_at(at);
        [
            put_entry(&file_item(path, data.len(), 0)),
            data_entry(path, 0, a, false, &[]),
            data_entry(path, at as u64, b, true, blake3::hash(data).as_bytes()),
        ]
    }

    fn file_item(path: &str, size: usize, mtime_ns: i64) -> Item {
        Item {
            path: path.into(),
            kind: Kind::File,
            size: size as u64,
            mtime_ns,
            mode: 0o640,
            link: String::new(),
            hash: None,
        }
    }

    /// A package of many whole files, small and larger, is written on several threads:
    /// every file lands whole with its time and mode (the larger ones mostly with direct
    /// I/O), a body whose hash is wrong is refused alone, and a file in several chunks
    /// beside them takes the ordinary path.
    #[test]
    fn whole_files_written_in_parallel_are_checked_one_by_one() {
        let root = tempfile::tempdir().unwrap();
        let site = SiteFs {
            root: root.path().to_path_buf(),
        };
        let mut entries = vec![put_entry(&Item {
            kind: Kind::Dir,
            mode: 0o755,
            ..file_item("d", 0, 0)
        })];
        let mut expected = Vec::new();
        for i in 0..96 {
            let path = format!("d/f{i:03}");
            // Every tenth file is over DIRECT_MIN.
            let data = body(if i % 10 == 3 {
                3 * DIRECT_MIN + i
            } else {
                1 + i * 97
            });
            let mtime = 1_600_000_000_000_000_000 + i as i64 * 1_000_000_007;
            let mut hash = blake3::hash(&data).as_bytes().to_vec();
            if i == 7 {
                hash[0] ^= 1;
            }
            entries.push(put_entry(&file_item(&path, data.len(), mtime)));
            entries.push(data_entry(&path, 0, &data, true, &hash));
            expected.push((path, data, mtime));
        }
        let big = body(2 * DIRECT_MIN + 3);
        entries.extend(two_chunks("d/big", &big, DIRECT_MIN));

        // The one-chunk bodies take the whole-file path, the chunked one does not.
        let mut it = entries.clone().into_iter().peekable();
        let mut whole = 0;
        while let Some(e) = it.next() {
            if let Some(pb::entry::Op::Put(m)) = &e.op {
                let item = Item::from_pb(m).unwrap();
                let taken = take_whole_body(&item, &mut it).is_some();
                assert_eq!(taken, item.path.starts_with("d/f"), "{}", item.path);
                whole += taken as usize;
            }
        }
        assert_eq!(whole, expected.len());
        let weight: u64 = expected
            .iter()
            .map(|(_, d, _)| d.len() as u64 + WHOLE_FILE_WEIGHT)
            .sum();
        assert!(weight >= WHOLE_PARALLEL_MIN);

        let mut sess = SessionFiles::new(site.session_dir("s"), true);
        let staged = stage(&site, &mut sess, pb::PackagePayload { entries }, 4096);
        let out = publish(&site, staged, Durability::None);

        let errors: Vec<_> = out
            .errors
            .iter()
            .map(|e| (e.path.as_str(), e.code.as_str()))
            .collect();
        assert_eq!(errors, [("d/f007", "checksum_mismatch")]);
        assert_eq!(out.items as usize, 1 + expected.len() - 1 + 1);
        // The larger whole files and the chunked file's two chunks went direct (all but
        // their unaligned tails); the small ones through the page cache.
        let larger: u64 = expected
            .iter()
            .filter(|(p, d, _)| d.len() >= DIRECT_MIN && p != "d/f007")
            .map(|(_, d, _)| d.len() as u64 / 4096 * 4096)
            .sum();
        assert_eq!(out.bytes_direct, larger + 2 * DIRECT_MIN as u64);
        assert!(!sess.helpers.is_empty() && sess.helpers.iter().all(|h| h.direct));
        assert_eq!(fs::read(root.path().join("d/big")).unwrap(), big);
        for (path, data, mtime) in expected {
            let dest = root.path().join(&path);
            if path == "d/f007" {
                assert!(!dest.exists(), "{path} was published with a wrong hash");
                continue;
            }
            assert_eq!(fs::read(&dest).unwrap(), data, "{path}");
            let md = fs::metadata(&dest).unwrap();
            assert_eq!(
                filetime::FileTime::from_last_modification_time(&md),
                file_time(mtime)
            );
            assert_eq!(md.permissions().mode() & 0o777, 0o640, "{path}");
        }
    }

    /// Chunks of 1 MiB and more are hashed on a second thread while they are written:
    /// the hash still runs over every chunk in order, across packages, so a whole body
    /// is accepted and a body with one changed byte is refused; the same for a body of
    /// 1 MiB and more that comes whole in one package.
    #[test]
    fn large_chunks_hashed_beside_their_write_are_checked() {
        let root = tempfile::tempdir().unwrap();
        let site = SiteFs {
            root: root.path().to_path_buf(),
        };
        let a = body(2 * HASH_BESIDE_MIN + HASH_BESIDE_MIN / 2);
        let mut b = body(2 * HASH_BESIDE_MIN + 1);
        let b_hash = blake3::hash(&b);
        b[HASH_BESIDE_MIN + 5] ^= 1;
        let (a1, a2) = a.split_at(2 * HASH_BESIDE_MIN);
        let (b1, b2) = b.split_at(HASH_BESIDE_MIN);
        assert!(a1.len() >= HASH_BESIDE_MIN && a2.len() < HASH_BESIDE_MIN);
        let c = body(HASH_BESIDE_MIN + 10);
        let mut w = c.clone();
        w[7] ^= 1;
        let first = vec![
            put_entry(&file_item("a", a.len(), 1)),
            data_entry("a", 0, a1, false, &[]),
            put_entry(&file_item("b", b.len(), 1)),
            data_entry("b", 0, b1, false, &[]),
            put_entry(&file_item("c", c.len(), 1)),
            data_entry("c", 0, &c, true, blake3::hash(&c).as_bytes()),
            put_entry(&file_item("w", w.len(), 1)),
            data_entry("w", 0, &w, true, blake3::hash(&c).as_bytes()),
        ];
        let second = vec![
            data_entry("a", a1.len() as u64, a2, true, blake3::hash(&a).as_bytes()),
            data_entry("b", b1.len() as u64, b2, true, b_hash.as_bytes()),
        ];
        let mut sess = SessionFiles::new(site.session_dir("s"), true);
        let mut outs = Vec::new();
        for entries in [first, second] {
            let staged = stage(&site, &mut sess, pb::PackagePayload { entries }, 4096);
            outs.push(publish(&site, staged, Durability::None));
        }
        let errors = |out: &Applied| -> Vec<(String, String)> {
            out.errors
                .iter()
                .map(|e| (e.path.clone(), e.code.clone()))
                .collect()
        };
        let mismatch = |p: &str| vec![(p.to_string(), "checksum_mismatch".to_string())];
        assert_eq!(errors(&outs[0]), mismatch("w"));
        assert_eq!(fs::read(root.path().join("c")).unwrap(), c);
        assert!(!root.path().join("w").exists());
        assert_eq!(errors(&outs[1]), mismatch("b"));
        assert_eq!(fs::read(root.path().join("a")).unwrap(), a);
        assert!(!root.path().join("b").exists());
        let published: Vec<_> = outs[1].changes.upserts.iter().collect();
        assert_eq!(published.len(), 1);
        assert_eq!(
            published[0].hash.as_deref(),
            Some(blake3::hash(&a).to_hex().as_str())
        );
    }

    /// A resent last chunk of a file that a stopped target had already put in place
    /// finds it there only when it is that file: a regular file of the chunk's end size
    /// with the source's hash.
    #[test]
    fn a_resent_last_chunk_finds_only_its_own_published_file() {
        let root = tempfile::tempdir().unwrap();
        let site = SiteFs {
            root: root.path().to_path_buf(),
        };
        let data = body(10_000);
        fs::create_dir(root.path().join("d")).unwrap();
        fs::write(root.path().join("d/f"), &data).unwrap();
        std::os::unix::fs::symlink("f", root.path().join("d/l")).unwrap();
        let hash = blake3::hash(&data);
        let chunk = |path: &str, from: usize, blake3: &[u8]| pb::FileData {
            path: path.into(),
            offset: from as u64,
            data: data[from..].to_vec().into(),
            last: true,
            blake3: blake3.to_vec(),
            ..Default::default()
        };
        let item = already_published(&site, &chunk("d/f", 4096, hash.as_bytes())).unwrap();
        assert_eq!((item.kind, item.size), (Kind::File, 10_000));
        assert_eq!(item.hash, Some(hash.to_hex().to_string()));
        let mut wrong = hash.as_bytes().to_vec();
        wrong[0] ^= 1;
        assert!(already_published(&site, &chunk("d/f", 4096, &wrong)).is_none());
        let mut short = chunk("d/f", 4096, hash.as_bytes());
        short.data.truncate(100);
        assert!(already_published(&site, &short).is_none());
        assert!(already_published(&site, &chunk("d/l", 4096, hash.as_bytes())).is_none());
        assert!(already_published(&site, &chunk("d/gone", 4096, hash.as_bytes())).is_none());
    }

    fn site_in(root: &tempfile::TempDir) -> SiteFs {
        SiteFs {
            root: root.path().to_path_buf(),
        }
    }

    fn payload(entries: Vec<pb::Entry>) -> pb::PackagePayload {
        pb::PackagePayload { entries }
    }

    /// The chunks of a body over several packages are written after their packages are
    /// staged, in any order between packages (as the finishing tasks of a stream run):
    /// the body lands whole, with its own time (set after the last write), and its
    /// direct bytes are counted.
    #[test]
    fn chunks_written_after_staging_land_whole_with_their_time() {
        let root = tempfile::tempdir().unwrap();
        let site = site_in(&root);
        let data = body(3 * 2 * DIRECT_MIN + 100);
        let (c0, rest) = data.split_at(2 * DIRECT_MIN);
        let (c1, c2) = rest.split_at(2 * DIRECT_MIN);
        let mtime = 1_500_000_000_123_456_789;
        let hash = blake3::hash(&data);
        let mut sess = SessionFiles::new(site.session_dir("s"), true);
        let mut staged: Vec<Staged> = [
            vec![
                put_entry(&file_item("f", data.len(), mtime)),
                data_entry("f", 0, c0, false, &[]),
            ],
            vec![data_entry("f", c0.len() as u64, c1, false, &[])],
            vec![data_entry(
                "f",
                (c0.len() + c1.len()) as u64,
                c2,
                true,
                hash.as_bytes(),
            )],
        ]
        .into_iter()
        .map(|e| stage(&site, &mut sess, payload(e), 4096))
        .collect();
        assert!(staged.iter().all(Staged::has_deferred));
        // The last package's chunk is written first, then the others as they publish.
        let last = write_deferred(staged.pop().unwrap());
        assert!(!last.has_deferred());
        let mut outs: Vec<Applied> = staged
            .into_iter()
            .map(|s| publish(&site, s, Durability::None))
            .collect();
        outs.push(publish(&site, last, Durability::None));
        assert!(outs.iter().all(|o| o.errors.is_empty() && !o.not_written));
        assert_eq!(outs.iter().map(|o| o.items).sum::<u64>(), 1);
        let direct: u64 = outs.iter().map(|o| o.bytes_direct).sum();
        assert_eq!(direct, (data.len() / 4096 * 4096) as u64);
        let dest = root.path().join("f");
        assert_eq!(fs::read(&dest).unwrap(), data);
        let md = fs::metadata(&dest).unwrap();
        assert_eq!(
            filetime::FileTime::from_last_modification_time(&md),
            file_time(mtime)
        );
    }

    /// A chunk the disk refuses after its package was staged fails the whole package:
    /// nothing of it is published (not even a whole file beside it), and the answer says
    /// which file and why. Here ext4 refuses an offset beyond its largest file (EFBIG).
    #[test]
    fn a_chunk_that_cannot_be_written_fails_its_whole_package() {
        let root = tempfile::tempdir().unwrap();
        let ext4 = rustix::fs::statfs(root.path()).unwrap().f_type == 0xEF53;
        if !ext4 {
            eprintln!("skipping: the temporary directory is not on ext4");
            return;
        }
        let site = site_in(&root);
        let far = 1u64 << 44;
        let chunk = body(DIRECT_MIN);
        let small = body(100);
        let entries = vec![
            put_entry(&file_item("small", small.len(), 1)),
            data_entry("small", 0, &small, true, blake3::hash(&small).as_bytes()),
            put_entry(&file_item("huge", (far + chunk.len() as u64) as usize, 1)),
            data_entry("huge", 0, &chunk, false, &[]),
            data_entry("huge", far, &chunk, false, &[]),
        ];
        let mut sess = SessionFiles::new(site.session_dir("s"), true);
        let staged = stage(&site, &mut sess, payload(entries), 4096);
        assert!(staged.has_deferred());
        assert!(staged.out.errors.is_empty());
        let out = publish(&site, staged, Durability::None);
        assert!(out.not_written && !out.no_space);
        assert_eq!((out.items, out.bytes), (0, 0));
        let errors: Vec<_> = out
            .errors
            .iter()
            .map(|e| (e.path.as_str(), e.code.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(
            errors,
            [("huge", "io", "cannot write: File too large (os error 27)")]
        );
        assert!(!root.path().join("small").exists());
        assert!(!root.path().join("huge").exists());
    }

    /// A body whose chunks are written by finishing tasks and that must be read back to
    /// be hashed (a package of it came again, so its offsets no longer follow on) is read
    /// only once its earlier chunks are written: its last chunk waits for them.
    #[test]
    fn a_body_read_back_waits_for_its_chunks_still_to_write() {
        let root = tempfile::tempdir().unwrap();
        let site = site_in(&root);
        let data = body(2 * 2 * DIRECT_MIN + 300);
        let (c0, rest) = data.split_at(2 * DIRECT_MIN);
        let (c1, c2) = rest.split_at(2 * DIRECT_MIN);
        let at1 = c0.len() as u64;
        let at2 = at1 + c1.len() as u64;
        let mut sess = SessionFiles::new(site.session_dir("s"), true);
        let first = vec![
            put_entry(&file_item("f", data.len(), 7)),
            data_entry("f", 0, c0, false, &[]),
        ];
        let staged = stage(&site, &mut sess, payload(first), 4096);
        assert!(publish(&site, staged, Durability::None).errors.is_empty());
        // The second package is staged, then dropped (a package before it failed), and
        // comes again: its chunk now follows nothing the target hashed.
        let second = || vec![data_entry("f", at1, c1, false, &[])];
        discard(stage(&site, &mut sess, payload(second()), 4096));
        let again = stage(&site, &mut sess, payload(second()), 4096);
        assert!(again.has_deferred());
        let writer = {
            let site = site_in(&root);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                publish(&site, again, Durability::None)
            })
        };
        let last = vec![data_entry(
            "f",
            at2,
            c2,
            true,
            blake3::hash(&data).as_bytes(),
        )];
        let staged = stage(&site, &mut sess, payload(last), 4096);
        assert!(staged.out.errors.is_empty(), "{:?}", staged.out.errors);
        assert!(writer.join().unwrap().errors.is_empty());
        let out = publish(&site, staged, Durability::None);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(fs::read(root.path().join("f")).unwrap(), data);
    }

    /// Bytes of `paths` in the page cache, from util-linux's `fincore`.
    fn resident(paths: &[PathBuf]) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
            .args(paths)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.trim().parse::<u64>().unwrap())
            .sum()
    }

    /// With durable acks, published bodies (whole files, one in two chunks) leave the page
    /// cache once they are synced; with direct I/O off they stay cached. The files are
    /// whole either way.
    #[test]
    fn durable_bodies_leave_the_page_cache_unless_direct_io_is_off() {
        // On the disk (a tmpfs keeps every page): under the build's target directory.
        let under = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        fs::create_dir_all(&under).unwrap();
        for drop_cache in [true, false] {
            let root = tempfile::tempdir_in(&under).unwrap();
            let site = site_in(&root);
            let mut entries = Vec::new();
            let mut files = Vec::new();
            for i in 0..40 {
                let path = format!("f{i:02}");
                let data = body(5_000 + i * 1_000);
                entries.push(put_entry(&file_item(&path, data.len(), 0)));
                entries.push(data_entry(
                    &path,
                    0,
                    &data,
                    true,
                    blake3::hash(&data).as_bytes(),
                ));
                files.push((root.path().join(&path), data));
            }
            let big = body(50_000);
            entries.extend(two_chunks("big", &big, 20_000));
            files.push((root.path().join("big"), big));

            let mut sess = SessionFiles::new(site.session_dir("s"), drop_cache);
            let staged = stage(&site, &mut sess, payload(entries), 4096);
            let mut out = publish(&site, staged, Durability::Syncfs);
            assert!(out.errors.is_empty(), "{:?}", out.errors);
            assert_eq!(out.items, files.len() as u64);
            uncache(std::mem::take(&mut out.to_uncache));
            let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
            let cached = resident(&paths);
            let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
            if drop_cache {
                assert_eq!(cached, 0, "durable bodies still cached");
            } else {
                assert!(cached >= total, "{cached} of {total} bytes cached");
            }
            for (p, d) in &files {
                assert_eq!(&fs::read(p).unwrap(), d, "{}", p.display());
            }
        }
    }
}
