//! File bodies: files in progress across packages, whole small files written on several
//! threads, chunks checked against their BLAKE3, a body found already published.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cms_mirror::model::{ChangeAction, ErrorCode, Item, Kind, hex, parent};
use cms_mirror::pb;

use super::pathcheck::DestDirs;
use super::publish::touch_parent;
use super::unix::{create_unnamed, created_with, file_time};
use super::writer::{
    BodyWriter, DIRECT_MIN, DIRECT_PIECE, Deferred, Digest, FileWrites, write_hashed,
};
use super::{Applied, Body, LateTime, Publish, SiteFs, io_item_error, item_error, staged_name};
use crate::sigcache::{SigCache, Signatures};

/// A file whose body is arriving over several entries (possibly several packages).
pub(super) struct OpenFile {
    pub(super) meta: Item,
    pub(super) file: File,
    /// The body's name in the session's staging directory; `None` while it is an unnamed
    /// file in its destination directory (`O_TMPFILE`), which a crash simply frees.
    pub(super) tmp: Option<PathBuf>,
    /// Its destination directory, open, while `tmp` is `None`.
    pub(super) dir: Option<Arc<OwnedFd>>,
    /// Incremental hash (and signatures) while chunks arrive contiguously from offset 0
    /// in this process.
    pub(super) digest: Option<Digest>,
    pub(super) next_offset: u64,
    /// Whether the metadata sidecar exists (written only for a file still in progress
    /// when its package ends, so a restarted target can finish it).
    pub(super) meta_written: bool,
    /// Set once a chunk's write was left for its package's finishing task: from then on
    /// every chunk of this body is written there (see [`Deferred`]).
    pub(super) writes: Option<Arc<FileWrites>>,
    /// The version this body's copy instructions copy from, once one came and found it
    /// unchanged (see [`copy_chunk`]).
    pub(super) basis: Option<File>,
    /// The basis's cached signatures with the chunk sizes this body is signed with, and
    /// where each chunk starts (one more: the end).
    pub(super) basis_sigs: Option<(Arc<Signatures>, Vec<u64>)>,
}

impl OpenFile {
    pub(super) fn remove(self) {
        if let Some(t) = &self.tmp {
            let _ = fs::remove_file(t);
        }
    }
}

/// Per-session state of files in progress (kept in memory, rebuilt from the staging
/// directory after a restart).
pub struct SessionFiles {
    pub dir: PathBuf,
    pub(super) open: HashMap<String, OpenFile>,
    pub(super) failed: HashSet<String>,
    /// Set by an abort: no package of this session is applied any more.
    pub aborted: bool,
    pub(super) writer: BodyWriter,
    /// Writers of the other threads that write whole files (see [`write_wholes`]).
    pub(super) helpers: Vec<BodyWriter>,
    /// Writes the chunks left for the packages' finishing tasks, one package at a time.
    pub(super) deferred_writer: Arc<Mutex<BodyWriter>>,
    /// Drop a package's bodies from the page cache once they are durable (see
    /// [`publish`]).
    pub(super) drop_cache: bool,
    /// The target's signatures of written bodies (one without a budget, as made here,
    /// keeps none and signs nothing); a delta's copies take their chunks' signatures
    /// from its basis's instead of cutting the copied bytes again.
    pub sigcache: Arc<SigCache>,
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
            sigcache: SigCache::new(0, Default::default()),
        }
    }
}

/// What a whole file weighs when a package's whole files are split between threads: its
/// bytes plus this much for creating, timing and linking it.
pub(super) const WHOLE_FILE_WEIGHT: u64 = 16 * 1024;

/// Packages whose whole files weigh less are written on the staging thread alone (32
/// small files, or a few larger ones).
pub(super) const WHOLE_PARALLEL_MIN: u64 = 32 * WHOLE_FILE_WEIGHT;

/// A file whose whole body follows its put in the same package.
pub(super) struct WholeFile {
    pub(super) item: Item,
    pub(super) data: pb::FileData,
}

/// The chunk after a file's put when it is the file's whole body: taken from `entries`,
/// for [`write_wholes`].
pub(super) fn take_whole_body(
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
pub(super) fn write_wholes(
    site: &SiteFs,
    session_dir: &Path,
    wholes: Vec<WholeFile>,
    cache: &Arc<SigCache>,
    writer: &mut BodyWriter,
    helpers: &mut Vec<BodyWriter>,
) -> Vec<Result<(Publish, u64), (String, pb::ItemError)>> {
    let write_all = |part: Vec<WholeFile>, writer: &mut BodyWriter| {
        let mut dirs = DestDirs::default();
        part.into_iter()
            .map(|w| {
                let path = w.item.path.clone();
                write_whole(site, session_dir, &mut dirs, writer, w, cache).map_err(|e| (path, e))
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
pub(super) fn write_whole(
    site: &SiteFs,
    session_dir: &Path,
    dirs: &mut DestDirs,
    writer: &mut BodyWriter,
    w: WholeFile,
    cache: &Arc<SigCache>,
) -> Result<(Publish, u64), pb::ItemError> {
    let WholeFile { mut item, data } = w;
    let path = item.path.clone();
    let (file, tmp, dir) = create_body(site, session_dir, dirs, &item)
        .map_err(|e| io_item_error(&path, "cannot write", &e))?;
    let mut digest = Digest::new(item.size, cache);
    digest.sign(&data.data);
    let written = write_hashed(writer, &file, &data.data, 0, Some(&mut digest));
    let (actual, sigs) = digest.finish();
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
        sigs,
    };
    Ok((publish, direct))
}

/// Creates the file a new body of `item` is written into, with the item's mode: unnamed
/// in its open destination directory where the file system allows (no name to create
/// now nor to remove from a staging directory later, nothing left behind by a crash,
/// and the inode lands beside its directory), else named in the session's staging
/// directory. Returns the file and either its staging name or its open directory.
pub(super) fn create_body(
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
pub(super) fn staged_body(file: File, tmp: Option<PathBuf>, dir: Option<Arc<OwnedFd>>) -> Body {
    match (tmp, dir) {
        (Some(tmp), _) => Body::Named(tmp),
        (None, Some(dir)) => Body::Unnamed(file, dir),
        (None, None) => unreachable!("a body is either named or in an open directory"),
    }
}

/// Refuses a body whose BLAKE3 is not the one the source sent.
pub(super) fn check_hash(
    path: &str,
    actual: &blake3::Hash,
    expected: &[u8],
) -> Result<(), pb::ItemError> {
    if expected.len() == 32 && actual.as_bytes().as_slice() == expected {
        return Ok(());
    }
    let m = format!(
        "content hash {} does not match the source's {}",
        actual.to_hex(),
        hex(expected)
    );
    Err(item_error(path, ErrorCode::ChecksumMismatch, m, true))
}

/// Writes a chunk. Returns the staged path to sync when the chunk was written to a
/// named file.
pub(super) fn data(
    site: &SiteFs,
    sess: &mut SessionFiles,
    mut d: pb::FileData,
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
        out.changes.changes.push((path, ChangeAction::Updated));
        out.changes.upserts.push(item);
        out.items += 1;
        return Ok(None);
    }
    if !sess.open.contains_key(&path) {
        let of = reopen_staged(&sess.dir, &path)?;
        sess.open.insert(path.clone(), of);
    }
    let of = sess.open.get_mut(&path).expect("inserted above");
    let copy = d.copy_len > 0;
    if copy && !d.data.is_empty() {
        let why = "a copy instruction that also carries data";
        return Err(item_error(&path, ErrorCode::InvalidArgument, why, false));
    }
    let len = if copy {
        d.copy_len
    } else {
        d.data.len() as u64
    };
    let end = d.offset.saturating_add(len);
    if end > of.meta.size {
        let why = format!(
            "chunk ends at {end}, beyond the announced size {}",
            of.meta.size
        );
        return Err(item_error(&path, ErrorCode::InvalidArgument, why, false));
    }
    if d.offset != of.next_offset {
        of.digest = None;
    }
    let last = d.last;
    let blake3 = std::mem::take(&mut d.blake3);
    if copy {
        copy_chunk(site, &mut sess.writer, &sess.sigcache, of, d, deferred, out)?;
    } else {
        write_chunk(&mut sess.writer, of, d, deferred, out)?;
    }
    of.next_offset = end;
    out.bytes += len;
    if !last {
        return Ok(of.tmp.clone());
    }
    let of = sess.open.remove(&path).expect("present");
    finish_body(of, &path, &blake3, publish)
}

/// After a restart: reopens a body staged under a name, and its metadata sidecar.
fn reopen_staged(dir: &Path, path: &str) -> Result<OpenFile, pb::ItemError> {
    let meta_path = dir.join(staged_name("m", path));
    let tmp = dir.join(staged_name("f", path));
    let meta: Item = fs::read(&meta_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            let why = "file data without a preceding put";
            item_error(path, ErrorCode::InvalidArgument, why, false)
        })?;
    let file = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&tmp)
        .map_err(|e| io_item_error(path, "cannot reopen staged file", &e))?;
    Ok(OpenFile {
        meta,
        file,
        tmp: Some(tmp),
        dir: None,
        digest: None,
        next_offset: u64::MAX,
        meta_written: true,
        writes: None,
        basis: None,
        basis_sigs: None,
    })
}

/// Bytes of a copy instruction read from the basis and written at a time (one direct
/// write's worth).
const COPY_PIECE: usize = DIRECT_PIECE;

/// Applies a copy instruction: its bytes read from the basis (the version of the file
/// in the session's tree whose signatures the source used, checked by size and mtime)
/// and written here a piece at a time, never left for the finishing task, so a package
/// of copies holds no more than one piece in memory. The pieces are cut at block
/// boundaries of the new body, whatever the basis offset: after an insert the copies
/// land at unaligned offsets, and only the first few bytes of each then go through the
/// page cache, the rest with direct I/O. A basis that changed fails the chunk with
/// `basis_changed`: the package is sent again with the file whole.
fn copy_chunk(
    site: &SiteFs,
    writer: &mut BodyWriter,
    cache: &SigCache,
    of: &mut OpenFile,
    d: pb::FileData,
    deferred: &mut Vec<Deferred>,
    out: &mut Applied,
) -> Result<(), pb::ItemError> {
    let path = d.path.clone();
    let changed = |why: String| {
        let m = format!("the version a delta copies from changed on the target ({why})");
        item_error(&path, ErrorCode::BasisChanged, m, true)
    };
    if of.basis.is_none() {
        let mut dirs = cms_mirror::fswalk::DirCache::new(&site.root);
        let f = dirs.open(&path).map_err(|e| changed(e.to_string()))?;
        let md = f.metadata().map_err(|e| changed(e.to_string()))?;
        let mtime = cms_mirror::fswalk::mtime_ns(&md);
        if !md.is_file() || md.len() != d.basis_size || mtime != d.basis_mtime_ns {
            return Err(changed(format!(
                "{} bytes, mtime {mtime} where the signatures had {} bytes, mtime {}",
                md.len(),
                d.basis_size,
                d.basis_mtime_ns
            )));
        }
        let signed_with = of
            .digest
            .as_ref()
            .and_then(|g| g.signer.as_ref())
            .map(|s| s.sizes());
        of.basis_sigs = signed_with
            .and_then(|sizes| cache.get(&md, sizes))
            .map(|sigs| {
                let mut starts = Vec::with_capacity(sigs.lengths.len() + 1);
                let mut at = 0u64;
                starts.push(0);
                for l in &sigs.lengths {
                    at += *l as u64;
                    starts.push(at);
                }
                (sigs, starts)
            });
        of.basis = Some(f);
    }
    if d.copy_from.saturating_add(d.copy_len) > d.basis_size {
        let why = format!(
            "copy of {} bytes at {} beyond the basis's {} bytes",
            d.copy_len, d.copy_from, d.basis_size
        );
        return Err(item_error(&path, ErrorCode::InvalidArgument, why, false));
    }
    // The copy's own chunks when it copies whole chunks of a basis whose signatures are
    // known: the new body's signer takes them as they are (the source cut the new body
    // at both ends of the copy) instead of cutting the bytes. Their bytes are still
    // hashed for the body's BLAKE3.
    let known = of.basis_sigs.as_ref().and_then(|(sigs, starts)| {
        let first = starts.binary_search(&d.copy_from).ok()?;
        let end = starts.binary_search(&(d.copy_from + d.copy_len)).ok()?;
        (end > first).then(|| (sigs.clone(), first..end))
    });
    let align = cms_mirror::package::BODY_ALIGN;
    let mut buf = vec![0u8; COPY_PIECE.min(d.copy_len as usize)];
    let mut done = 0u64;
    while done < d.copy_len {
        let at = d.offset + done;
        let left = d.copy_len - done;
        let n = match at % align {
            0 => left.min(COPY_PIECE as u64),
            off => left.min(align - off),
        } as usize;
        let basis = of.basis.as_ref().expect("opened above");
        if let Err(e) = basis.read_exact_at(&mut buf[..n], d.copy_from + done) {
            of.basis = None;
            return Err(changed(e.to_string()));
        }
        if known.is_none()
            && let Some(g) = of.digest.as_mut().filter(|g| g.signer.is_some())
        {
            g.sign(&Bytes::copy_from_slice(&buf[..n]));
        }
        write_now(writer, of, &path, &buf[..n], at, deferred, out)?;
        done += n as u64;
    }
    if let Some((sigs, range)) = known
        && let Some(s) = of.digest.as_mut().and_then(|g| g.signer.as_mut())
    {
        s.push_known(&sigs, range);
    }
    Ok(())
}

/// Writes (or leaves for the finishing task) one chunk of an open body. A large chunk of
/// a body hashed as it comes is written by the finishing task, and so is every later
/// chunk of that body; but a last chunk whose body must be read back to be hashed is
/// written here (as a copy's pieces are, [`write_now`]), once the body's other writes
/// are done.
fn write_chunk(
    writer: &mut BodyWriter,
    of: &mut OpenFile,
    d: pb::FileData,
    deferred: &mut Vec<Deferred>,
    out: &mut Applied,
) -> Result<(), pb::ItemError> {
    let path = d.path.as_str();
    let defer = match &of.writes {
        Some(_) => !(d.last && of.digest.is_none()),
        None => of.digest.is_some() && d.data.len() >= DIRECT_MIN,
    };
    if defer {
        let file = of
            .file
            .try_clone()
            .map_err(|e| io_item_error(path, "cannot write", &e))?;
        if let Some(h) = of.digest.as_mut() {
            h.update(&d.data);
            h.sign(&d.data);
        }
        let writes = of.writes.get_or_insert_with(Default::default).clone();
        deferred.push(Deferred::new(d.path, file, d.data, d.offset, writes));
        return Ok(());
    }
    if let Some(h) = of.digest.as_mut() {
        h.sign(&d.data);
    }
    write_now(writer, of, path, &d.data, d.offset, deferred, out)
}

/// Writes `data` at `offset` of an open body here, after the body's writes left by
/// earlier chunks of this package (see [`write_chunk`]).
fn write_now(
    writer: &mut BodyWriter,
    of: &mut OpenFile,
    path: &str,
    data: &[u8],
    offset: u64,
    deferred: &mut Vec<Deferred>,
    out: &mut Applied,
) -> Result<(), pb::ItemError> {
    if let Some(w) = &of.writes {
        // This package's own chunks of the body are written here, after those of the
        // packages before it.
        let mine: Vec<Deferred> = deferred.extract_if(.., |x| x.path == path).collect();
        w.wait_until(mine.len());
        for m in mine {
            match writer.write_at(&m.file, &m.data, m.offset) {
                Ok(n) => out.bytes_direct += n,
                Err(e) => return Err(io_item_error(path, "cannot write", &e)),
            }
        }
    }
    match write_hashed(writer, &of.file, data, offset, of.digest.as_mut()) {
        Ok(n) => out.bytes_direct += n,
        Err(e) => {
            // The chunk may come again: hash the file by reading it back at the end.
            of.digest = None;
            return Err(io_item_error(path, "cannot write", &e));
        }
    }
    Ok(())
}

/// A body whose last chunk arrived: checks its length and BLAKE3 (read back when its
/// chunks did not arrive in order in this process), gives it its time (or leaves that
/// for publish while chunks are still being written) and queues it for publishing.
fn finish_body(
    mut of: OpenFile,
    path: &str,
    expected: &[u8],
    publish: &mut Vec<Publish>,
) -> Result<Option<PathBuf>, pb::ItemError> {
    // Written contiguously from 0 into a new file: its length is where writing ended.
    let len = match &of.digest {
        Some(_) => of.next_offset,
        None => of
            .file
            .metadata()
            .map_err(|e| io_item_error(path, "cannot stat", &e))?
            .len(),
    };
    if len != of.meta.size {
        let m = format!("received {len} bytes, expected {}", of.meta.size);
        of.remove();
        return Err(item_error(path, ErrorCode::ChecksumMismatch, m, true));
    }
    let (actual, sigs) = match of.digest.take() {
        Some(h) => h.finish(),
        None => {
            let mut h = blake3::Hasher::new();
            if let Err(e) = h.update_reader(ReadAt::new(&of.file)) {
                of.remove();
                return Err(io_item_error(path, "cannot read back", &e));
            }
            (h.finalize(), None)
        }
    };
    if let Err(e) = check_hash(path, &actual, expected) {
        of.remove();
        return Err(e);
    }
    let late = match of.writes {
        Some(writes) => Some(LateTime {
            file: of
                .file
                .try_clone()
                .map_err(|e| io_item_error(path, "cannot set mtime", &e))?,
            writes,
            mtime_ns: of.meta.mtime_ns,
        }),
        None => {
            let t = file_time(of.meta.mtime_ns);
            filetime::set_file_handle_times(&of.file, Some(t), Some(t))
                .map_err(|e| io_item_error(path, "cannot set mtime", &e))?;
            None
        }
    };
    let mut item = of.meta;
    item.hash = Some(actual.to_hex().to_string());
    let synced = of.tmp.clone();
    publish.push(Publish {
        body: staged_body(of.file, of.tmp, of.dir),
        item,
        had_meta: of.meta_written,
        late,
        sigs,
    });
    Ok(synced)
}

/// Reads a file from offset 0 by position (the handle's offset is left alone).
pub(super) struct ReadAt<'a> {
    pub(super) file: &'a File,
    pub(super) pos: u64,
}

impl<'a> ReadAt<'a> {
    pub(super) fn new(file: &'a File) -> Self {
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
pub(super) fn already_published(site: &SiteFs, d: &pb::FileData) -> Option<Item> {
    let end = d
        .offset
        .checked_add(d.data.len() as u64)?
        .checked_add(d.copy_len)?;
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
