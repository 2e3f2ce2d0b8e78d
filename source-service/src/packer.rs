//! Turning a stored plan into packages of bounded size, from any cursor.
//!
//! Bodies are read in pieces; a file larger than a package spans several. The packer
//! never mixes phases in one package, so the sender can hold the delete phase back
//! until every content package is acknowledged. A file that changes while it is read
//! is aborted on the target (which keeps its old version) and reported. A changed file
//! the target holds in another version goes as a delta against it when the target sends
//! that version's signatures ([`Signatures`]): copies of its chunks and literal bytes.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use cms_mirror::delta::{ChunkSizes, Index, chunk_hash};
use cms_mirror::fswalk::{DirCache, io_error, mtime_ns};
use cms_mirror::jobstore::NewItemError;
use cms_mirror::model::{ErrorCode, Item, Kind};
use cms_mirror::package;
use cms_mirror::pb;

use crate::plan::{Action, Cursor, PhaseName, PlanEntry, PlanReader};

/// Rough per-entry framing overhead counted against the package size.
const ENTRY_OVERHEAD: usize = 128;
/// Bytes of a body read (and hashed) at a time: well within the CPU's L2 cache.
const READ_PIECE: usize = 256 * 1024;

/// A sealed package and what it completes.
#[derive(Debug)]
pub struct Built {
    pub pkg: pb::Package,
    pub phase: PhaseName,
    /// Where the plan stands once this package is applied.
    pub cursor_after: Cursor,
    pub items: u64,
    /// File data in this package (what crossed: rates and metrics).
    pub bytes: u64,
    /// Bytes of files the target copies from their earlier versions (deltas).
    pub copied: u64,
    /// Files whose body ends in this package, with their sizes: what the job counts as
    /// mirrored once the package is applied (less any the target reports an error for).
    pub completed: Vec<(String, u64)>,
    pub deletes: u64,
    /// Items the source could not send (vanished, unreadable, changed while read).
    pub errors: Vec<NewItemError>,
}

struct Current {
    item: Item,
    file: File,
    offset: u64,
    hasher: blake3::Hasher,
    entry_pos: u64,
    phase: PhaseName,
    mtime_ns: i64,
    /// Times this file was read again because it changed while read.
    retries: u32,
    /// Where its put sits in the package being built (None once that package is done).
    put_at: Option<(package::Mark, usize, u64)>,
    /// The size of the target's version, while a delta against it is planned and not
    /// started (its signatures are fetched when the body is first packed).
    basis: Option<u64>,
    delta: Option<Delta>,
}

impl Current {
    /// Whether the file still has the size and mtime it had when its reading began (at
    /// its end, what was read is then what is there).
    fn unchanged(&self) -> bool {
        self.file
            .metadata()
            .is_ok_and(|md| md.len() == self.item.size && mtime_ns(&md) == self.mtime_ns)
    }
}

/// The target's version of a file as its signatures describe it.
pub struct Basis {
    pub index: Index,
    pub size: u64,
    pub mtime_ns: i64,
}

/// Where the packer gets the signatures of a target's version of a file.
pub trait Signatures: Send {
    /// The target's version of `path` cut with `sizes`, or `None` when it cannot be had
    /// (the file then goes whole).
    fn fetch(&mut self, path: &str, sizes: ChunkSizes) -> Option<Basis>;
}

/// A body going as a delta.
struct Delta {
    basis: Basis,
    /// The body from where the delta started (at most its planned size).
    chunks: cms_mirror::delta::Chunker<io::Take<File>>,
    /// The body offset the chunker started at.
    base: u64,
    /// The basis chunk the last chunk matched.
    matched: Option<cms_mirror::delta::Chunk>,
}

/// A delta's step waiting for the next chunk: merged with it when it continues it.
enum Step {
    Copy { at: u64, from: u64, len: u64 },
    Literal { at: u64, data: Vec<u8> },
}

/// Literal bytes of a delta per FileData entry at most.
const LITERAL_MAX: usize = 1024 * 1024;
/// A copied byte costs the target a read, a write and a hash but nothing on the wire:
/// it counts as 1/COPY_WEIGHT of a byte against the package size, so a package holds
/// 16 MiB of copies at the default size and the target copies one part of a file while
/// the source cuts the next (with 64 the target waited for whole files and a large
/// insert case took twice as long).
const COPY_WEIGHT: u64 = 4;

/// Reads of a file that changed while read, before it is reported.
pub const MAX_CHANGE_RETRIES: u32 = 3;

pub struct Packer {
    reader: PlanReader,
    source: PathBuf,
    /// Looks up the source's items one name at a time.
    dirs: DirCache,
    package_bytes: usize,
    max_entries: usize,
    compression: pb::Compression,
    seq: u64,
    current: Option<Current>,
    pending: Option<(PhaseName, PlanEntry, u64)>,
    signatures: Option<Box<dyn Signatures>>,
    /// Files to send whole even where a delta is planned (their basis changed).
    whole: HashSet<String>,
}

fn err(path: &str, code: &str, message: String, retryable: bool) -> NewItemError {
    NewItemError {
        path: path.to_string(),
        code: code.to_string(),
        message,
        retryable,
    }
}

impl Packer {
    /// Compress packages with `c` (each one only when that makes it smaller).
    pub fn with_compression(mut self, c: pb::Compression) -> Packer {
        self.compression = c;
        self
    }

    /// Send planned deltas with signatures from `s`, except for the files in `whole`.
    pub fn with_delta(mut self, s: Box<dyn Signatures>, whole: HashSet<String>) -> Packer {
        self.signatures = Some(s);
        self.whole = whole;
        self
    }

    /// A packer that continues `cursor` with package number `next_seq`.
    pub fn new(
        plan_dir: &std::path::Path,
        source: PathBuf,
        cursor: &Cursor,
        phases: Vec<PhaseName>,
        next_seq: u64,
        package_bytes: usize,
    ) -> io::Result<Packer> {
        let mut reader = PlanReader::open(plan_dir, cursor, phases)?;
        let mut dirs = DirCache::new(source.clone());
        let mut current = None;
        if cursor.body_offset > 0 {
            // Resume inside a file: its put was acknowledged, continue its body.
            if let Some((phase, e, pos)) = reader.next_entry()? {
                let mut file = dirs.open(&e.i.path)?;
                let md = file.metadata()?;
                let mut hasher = blake3::Hasher::new();
                let mut prefix = (&mut file).take(cursor.body_offset);
                hasher.update_reader(&mut prefix)?;
                file.seek(SeekFrom::Start(cursor.body_offset))?;
                current = Some(Current {
                    item: e.i,
                    file,
                    offset: cursor.body_offset,
                    hasher,
                    entry_pos: pos,
                    phase,
                    mtime_ns: mtime_ns(&md),
                    retries: 0,
                    put_at: None,
                    basis: e.basis,
                    delta: None,
                });
            }
        }
        Ok(Packer {
            reader,
            source,
            dirs,
            package_bytes,
            max_entries: package::DEFAULT_MAX_ENTRIES,
            compression: pb::Compression::None,
            seq: next_seq,
            current,
            pending: None,
            signatures: None,
            whole: HashSet::new(),
        })
    }

    fn next_plan_entry(&mut self) -> io::Result<Option<(PhaseName, PlanEntry, u64)>> {
        if let Some(p) = self.pending.take() {
            return Ok(Some(p));
        }
        self.reader.next_entry()
    }

    fn cursor_now(&self) -> Cursor {
        if let Some(c) = &self.current {
            return Cursor {
                phase: Some(c.phase),
                pos: c.entry_pos,
                body_offset: c.offset,
            };
        }
        if let Some((ph, _, pos)) = &self.pending {
            return Cursor {
                phase: Some(*ph),
                pos: *pos,
                body_offset: 0,
            };
        }
        let (ph, pos) = self.reader.position();
        Cursor {
            phase: Some(ph),
            pos,
            body_offset: 0,
        }
    }

    /// Builds the next package, or None when the plan is done.
    pub fn next_package(&mut self) -> io::Result<Option<Built>> {
        let mut f = Filling {
            out: package::PayloadWriter::with_capacity(self.package_bytes + 64 * 1024),
            size: 0,
            phase: self.current.as_ref().map(|c| c.phase),
            items: 0,
            bytes: 0,
            copied: 0,
            completed: Vec::new(),
            deletes: 0,
            errors: Vec::new(),
            full: false,
        };
        if let Some(c) = &mut self.current {
            c.put_at = None;
        }
        while f.out.entries() < self.max_entries && f.size < self.package_bytes && !f.full {
            if self.current.is_some() {
                self.continue_body(&mut f);
                continue;
            }
            let Some((ph, e, pos)) = self.next_plan_entry()? else {
                break;
            };
            if f.phase.is_some_and(|p| p != ph) {
                self.pending = Some((ph, e, pos));
                break;
            }
            f.phase = Some(ph);
            f.size += ENTRY_OVERHEAD + e.i.path.len();
            if e.a == Action::Delete {
                f.out.push(&pb::Entry {
                    op: Some(pb::entry::Op::Delete(pb::DeleteItem {
                        path: e.i.path,
                        kind: e.i.kind.to_pb() as i32,
                    })),
                });
                f.deletes += 1;
                continue;
            }
            if e.i.kind == Kind::Page {
                // A page's document travels whole in its put.
                let doc = e.doc.unwrap_or_default();
                f.size += doc.len();
                let mut meta = e.i.to_pb();
                meta.properties_json = doc;
                f.out.push(&pb::Entry {
                    op: Some(pb::entry::Op::Put(meta)),
                });
                f.items += 1;
                continue;
            }
            let marks = (f.out.mark(), f.size, f.bytes);
            if self.begin(e.i, e.basis, pos, ph, 0, marks, &mut f.out, &mut f.errors) {
                f.items += 1;
            }
        }
        if f.out.is_empty() && f.errors.is_empty() {
            return Ok(None);
        }
        let phase = f.phase.unwrap_or(PhaseName::Content);
        let pkg = package::seal_written(self.seq, phase.to_pb(), f.out, self.compression);
        self.seq += 1;
        Ok(Some(Built {
            pkg,
            phase,
            cursor_after: self.cursor_now(),
            items: f.items,
            bytes: f.bytes,
            copied: f.copied,
            completed: f.completed,
            deletes: f.deletes,
            errors: f.errors,
        }))
    }

    /// Adds the next chunk of the current file's body to the package: as much as fits,
    /// ending on a block boundary when the body goes on in the next package. A file that
    /// changed while read is read again from the start (or given up).
    fn continue_body(&mut self, f: &mut Filling) {
        self.start_delta();
        if self.current.as_ref().is_some_and(|c| c.delta.is_some()) {
            return self.continue_delta(f);
        }
        let cur = self.current.as_mut().expect("a current file");
        let remaining = cur.item.size - cur.offset;
        let budget = (self.package_bytes - f.size).max(4096) as u64;
        let mut want = remaining.min(budget);
        if want < remaining {
            // Continued in the next package: end on a block boundary.
            let end = (cur.offset + want) / package::BODY_ALIGN * package::BODY_ALIGN;
            if end > cur.offset {
                want = end - cur.offset;
            }
        }
        let want = want as usize;
        let path = cur.item.path.clone();
        let offset = cur.offset;
        let last = offset + want as u64 == cur.item.size;
        let before = f.out.mark();
        #[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
        let source = &self.source;
        // Read straight into the payload a piece at a time, hashing each piece while it
        // is in the CPU cache.
        let pushed = f.out.push_data(&path, offset, want, last, |sink, len| {
            let mut left = len;
            while left > 0 {
                let piece = left.min(READ_PIECE);
                let got = sink.append(|buf| read_up_to(&cur.file, buf, piece))?;
                cur.hasher.update(got);
                left -= got.len();
                if got.len() < piece {
                    break;
                }
            }
            #[cfg(feature = "failpoints")]
            crate::failpoints::maybe_change(source, &path);
            Ok(last.then(|| *cur.hasher.finalize().as_bytes()))
        });
        let changed = match pushed {
            Ok(Ok(())) => false,
            Ok(Err(_short)) => true,
            Err(e) => {
                let e = io_error(&path, &e);
                f.out.push(&abort(&path, &e.message));
                f.errors.push(err(&path, e.code, e.message, e.retryable));
                self.current = None;
                return;
            }
        };
        cur.offset += want as u64;
        // At the end, the file must still be what we started reading.
        if changed || (last && !cur.unchanged()) {
            f.out.truncate(before);
            let cur = self.current.take().expect("current file");
            self.read_again(cur, f);
            return;
        }
        f.size += want + ENTRY_OVERHEAD;
        f.bytes += want as u64;
        if last {
            f.items += 1;
            let done = self.current.take().expect("current file").item;
            f.completed.push((done.path, done.size));
        }
    }

    /// A file that changed while it was read: read again from the start (dropping what
    /// this package holds of it, or telling the target to drop what earlier packages
    /// brought), or reported once it kept changing.
    fn read_again(&mut self, cur: Current, f: &mut Filling) {
        let path = cur.item.path.clone();
        if cur.retries >= MAX_CHANGE_RETRIES {
            f.out.push(&abort(&path, "changed while being read"));
            f.errors.push(err(
                &path,
                ErrorCode::ChangedWhileRead.as_str(),
                format!(
                    "file changed while it was read ({} attempts); the target keeps its previous version",
                    cur.retries + 1
                ),
                true,
            ));
            return;
        }
        match cur.put_at {
            Some((m, sz, by)) => {
                f.out.truncate(m);
                f.size = sz;
                f.bytes = by;
            }
            None => {
                f.out
                    .push(&abort(&path, "changed while being read; reading it again"));
                f.size += ENTRY_OVERHEAD + path.len();
            }
        }
        tracing::debug!(
            path,
            attempt = cur.retries + 1,
            "file changed while read; reading it again"
        );
        std::thread::sleep(Duration::from_millis(20 << cur.retries));
        let marks = (f.out.mark(), f.size, f.bytes);
        let (item, pos, phase, retries) = (cur.item, cur.entry_pos, cur.phase, cur.retries + 1);
        let basis = cur.basis.or(cur.delta.map(|d| d.basis.size));
        if self.begin(
            item,
            basis,
            pos,
            phase,
            retries,
            marks,
            &mut f.out,
            &mut f.errors,
        ) {
            f.items += 1;
        }
    }

    /// Starts the delta planned for the current file, if its target's version can be
    /// had: the file's chunks from where its body stands.
    fn start_delta(&mut self) {
        let Some(cur) = self.current.as_mut() else {
            return;
        };
        let Some(basis_size) = cur.basis.take() else {
            return;
        };
        let Some(src) = self.signatures.as_mut() else {
            return;
        };
        if self.whole.contains(&cur.item.path) {
            return;
        }
        let sizes = ChunkSizes::for_size(basis_size);
        let Some(basis) = src.fetch(&cur.item.path, sizes) else {
            return;
        };
        // The dup shares the file's offset, which stands where the body does.
        let started = cur.file.try_clone().map(|f| Delta {
            basis,
            chunks: sizes.chunker(f.take(cur.item.size - cur.offset)),
            base: cur.offset,
            matched: None,
        });
        match started {
            Ok(d) => cur.delta = Some(d),
            Err(e) => {
                tracing::debug!(path = cur.item.path, error = %e, "delta not started; sending the file whole")
            }
        }
    }

    /// Adds the next steps of the current file's delta to the package: copies of the
    /// target's chunks and literal bytes, as much as fits.
    fn continue_delta(&mut self, f: &mut Filling) {
        let before = f.out.mark();
        let cur = self.current.as_mut().expect("a current file");
        let d = cur.delta.as_mut().expect("a delta");
        let path = cur.item.path.clone();
        let basis = (d.basis.size, d.basis.mtime_ns);
        let mut step: Option<Step> = None;
        // What the step not yet pushed weighs against the package size.
        let mut weight = 0;
        // Each round may push the step before it, and the last step is pushed after.
        let (package_bytes, max_entries) = (self.package_bytes, self.max_entries);
        let room = |f: &Filling, weight: usize| {
            f.size + weight < package_bytes && f.out.entries() + 2 <= max_entries
        };
        if !room(f, 0) {
            f.full = true;
            return;
        }
        let size = cur.item.size;
        // The file ended before its planned size: it changed while read.
        let mut short = false;
        while cur.offset < size && room(f, weight) {
            let sizes = d.chunks.sizes();
            let expected = d.matched.and_then(|m| d.basis.index.following(m, sizes));
            let (off, c, hit) = match d.chunks.next_chunk_expecting(expected) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    short = true;
                    break;
                }
                Err(e) => {
                    let e = io_error(&path, &e);
                    f.out.truncate(before);
                    f.out.push(&abort(&path, &e.message));
                    f.errors.push(err(&path, e.code, e.message, e.retryable));
                    self.current = None;
                    return;
                }
            };
            cur.hasher.update(c);
            let at = d.base + off;
            let len = c.len() as u64;
            let copy_weight = (len / COPY_WEIGHT) as usize;
            d.matched = match hit {
                true => expected,
                false => d.basis.index.find(chunk_hash(c), c.len()),
            };
            match (d.matched.map(|m| m.at), &mut step) {
                (
                    Some(from),
                    Some(Step::Copy {
                        from: f0, len: l0, ..
                    }),
                ) if *f0 + *l0 == from => {
                    *l0 += len;
                    weight += copy_weight;
                }
                (Some(from), _) => {
                    push_step(f, &path, step.take(), false, None, basis);
                    step = Some(Step::Copy { at, from, len });
                    weight = copy_weight;
                }
                (None, Some(Step::Literal { data, .. })) if data.len() < LITERAL_MAX => {
                    data.extend_from_slice(c);
                    weight += c.len();
                }
                (None, _) => {
                    push_step(f, &path, step.take(), false, None, basis);
                    weight = c.len();
                    step = Some(Step::Literal {
                        at,
                        data: c.to_vec(),
                    });
                }
            }
            cur.offset = at + len;
        }
        #[cfg(feature = "failpoints")]
        crate::failpoints::maybe_change(&self.source, &path);
        if !short && cur.offset < size {
            push_step(f, &path, step, false, None, basis);
            return;
        }
        if short || cur.offset != cur.item.size || !cur.unchanged() {
            f.out.truncate(before);
            let cur = self.current.take().expect("current file");
            self.read_again(cur, f);
            return;
        }
        let hash = *cur.hasher.finalize().as_bytes();
        let step = step.unwrap_or(Step::Literal {
            at: cur.offset,
            data: Vec::new(),
        });
        push_step(f, &path, Some(step), true, Some(hash), basis);
        f.items += 1;
        let done = self.current.take().expect("current file").item;
        f.completed.push((done.path, done.size));
    }
}

/// Adds a delta's step to the package as one FileData entry (the last one with the
/// body's BLAKE3).
fn push_step(
    f: &mut Filling,
    path: &str,
    step: Option<Step>,
    last: bool,
    blake3: Option<[u8; 32]>,
    (basis_size, basis_mtime_ns): (u64, i64),
) {
    let Some(step) = step else {
        return;
    };
    let mut d = pb::FileData {
        path: path.to_string(),
        last,
        blake3: blake3.map(|h| h.to_vec()).unwrap_or_default(),
        ..Default::default()
    };
    match step {
        Step::Copy { at, from, len } => {
            d.offset = at;
            d.copy_from = from;
            d.copy_len = len;
            d.basis_size = basis_size;
            d.basis_mtime_ns = basis_mtime_ns;
            f.size += (len / COPY_WEIGHT) as usize;
            f.copied += len;
        }
        Step::Literal { at, data } => {
            d.offset = at;
            f.size += data.len();
            f.bytes += data.len() as u64;
            d.data = data.into();
        }
    }
    f.size += ENTRY_OVERHEAD;
    f.out.push(&pb::Entry {
        op: Some(pb::entry::Op::Data(d)),
    });
}

/// A package being filled, and what it holds so far.
struct Filling {
    out: package::PayloadWriter,
    /// Bytes counted against `package_bytes` (file data and entry overheads).
    size: usize,
    phase: Option<PhaseName>,
    items: u64,
    bytes: u64,
    copied: u64,
    completed: Vec<(String, u64)>,
    deletes: u64,
    errors: Vec<NewItemError>,
    /// No room for another step of a delta: the package ends here.
    full: bool,
}

impl Packer {
    /// Starts an item: re-reads its metadata (what is sent is what is there now) and
    /// pushes its put; a file with a body becomes `current`. True when the item is
    /// complete with its put. `marks` (entries, size, bytes of the package so far)
    /// let a file that changes while read be dropped from this package again.
    #[allow(clippy::too_many_arguments)]
    fn begin(
        &mut self,
        mut item: Item,
        basis: Option<u64>,
        pos: u64,
        ph: PhaseName,
        retries: u32,
        marks: (package::Mark, usize, u64),
        out: &mut package::PayloadWriter,
        errors: &mut Vec<NewItemError>,
    ) -> bool {
        if retries > 0 {
            item.hash = None;
        }
        // Read without following links.
        match self.dirs.item(&item.path) {
            Ok(now) if now.kind == item.kind => {
                item.size = now.size;
                item.mtime_ns = now.mtime_ns;
                item.mode = now.mode;
                item.link = now.link;
            }
            Ok(_) => {
                errors.push(err(
                    &item.path,
                    ErrorCode::ChangedWhileRead.as_str(),
                    "item changed kind since planning".into(),
                    true,
                ));
                return false;
            }
            Err(we) => {
                errors.push(err(&item.path, we.code, we.message, we.retryable));
                return false;
            }
        }
        if item.kind == Kind::File && item.size > 0 {
            let file = match self.dirs.open(&item.path) {
                Ok(f) => f,
                Err(e) => {
                    let we = io_error(&item.path, &e);
                    errors.push(err(&item.path, we.code, we.message, we.retryable));
                    return false;
                }
            };
            out.push(&pb::Entry {
                op: Some(pb::entry::Op::Put(item.to_pb())),
            });
            self.current = Some(Current {
                mtime_ns: item.mtime_ns,
                item,
                file,
                offset: 0,
                hasher: blake3::Hasher::new(),
                entry_pos: pos,
                phase: ph,
                retries,
                put_at: Some(marks),
                basis,
                delta: None,
            });
            return false;
        }
        if item.kind == Kind::File {
            item.hash = Some(blake3::hash(b"").to_hex().to_string());
        }
        out.push(&pb::Entry {
            op: Some(pb::entry::Op::Put(item.to_pb())),
        });
        true
    }
}

fn abort(path: &str, reason: &str) -> pb::Entry {
    pb::Entry {
        op: Some(pb::entry::Op::Abort(pb::AbortItem {
            path: path.to_string(),
            reason: reason.to_string(),
        })),
    }
}

/// Appends up to `want` bytes of `f` to `buf` (into its spare capacity, which std's
/// `File` reads into without zeroing it first); fewer only at the end of the file.
fn read_up_to(f: &File, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
    f.take(want as u64).read_to_end(buf)?;
    Ok(())
}
