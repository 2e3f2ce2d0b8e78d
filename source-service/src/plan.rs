//! Planning: a merge join of the source walk and the target's manifest, both in tree
//! order, written to an on-disk plan so that memory does not grow with the tree and a
//! resumed job continues the same plan.
//!
//! A plan is three JSON-lines files: `content` (creates and updates), `last` (those
//! matching the channel's `last` patterns, applied after the rest) and `delete`
//! (applied after all content has landed).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use cms_mirror::fswalk::{Filter, Patterns, WalkError, Walker};
use cms_mirror::model::{Item, Kind, tree_key};
use cms_mirror::page::PageDoc;
use cms_mirror::wagtail::WagtailError;

/// What to do with one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanEntry {
    pub a: Action,
    pub i: Item,
    /// A page's document, as read when planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
    /// The size of the target's version of a file this update may send as a delta
    /// against (see [`cms_mirror::delta`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<u64>,
}

/// The phases of a plan, in apply order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum PhaseName {
    Content,
    Last,
    Delete,
}

impl PhaseName {
    pub const ALL: [PhaseName; 3] = [PhaseName::Content, PhaseName::Last, PhaseName::Delete];
    pub fn file(self) -> &'static str {
        match self {
            PhaseName::Content => "content.jsonl",
            PhaseName::Last => "last.jsonl",
            PhaseName::Delete => "delete.jsonl",
        }
    }
    pub fn to_pb(self) -> cms_mirror::pb::Phase {
        match self {
            PhaseName::Content => cms_mirror::pb::Phase::Content,
            PhaseName::Last => cms_mirror::pb::Phase::Last,
            PhaseName::Delete => cms_mirror::pb::Phase::Delete,
        }
    }
}

/// Totals of a plan, known before the first byte is sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub creates: u64,
    pub updates: u64,
    pub deletes: u64,
    pub unchanged: u64,
    /// Body bytes to send (those of files that go as deltas included: what crosses for
    /// them is known only once they are sent).
    pub bytes: u64,
    /// Of them, files (and their bytes) that may go as deltas.
    #[serde(default)]
    pub delta_files: u64,
    #[serde(default)]
    pub delta_bytes: u64,
    /// Items the target held before the job (for percentage `max_delete`).
    pub target_items: u64,
}

impl Totals {
    pub fn items(&self) -> u64 {
        self.creates + self.updates
    }
}

/// How to compare items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    /// Same kind, size, mtime and mode (rsync's quick check).
    Quick,
    /// Same kind and BLAKE3 of the content (rsync -c).
    Checksum,
    /// Everything is sent again.
    Full,
}

/// Inputs of a plan.
pub struct PlanSpec {
    pub source: PathBuf,
    pub filter: Filter,
    /// Items matching these go to the `last` phase.
    pub last: Patterns,
    pub delete: bool,
    pub compare: Compare,
    /// Restrict to these paths (and what is below them); empty = everything.
    pub paths: Vec<String>,
    /// Files of at least this size on both sides go as deltas (`None`: never).
    pub delta_min: Option<u64>,
}

/// Whether a job restricted to `paths` covers item `p`. File paths are relative;
/// CMS pages are named by their URL paths (starting with `/`): a job naming pages reads
/// only those pages and their subtrees, so it creates and updates the pages it reads and
/// deletes none (a later job of the whole channel does).
fn within(paths: &[String], p: &str, delete: bool) -> bool {
    if paths.is_empty() {
        return true;
    }
    if cms_mirror::pathsafe::is_page_key(p) {
        return !delete && paths.iter().any(|x| x.starts_with('/'));
    }
    paths
        .iter()
        .filter(|x| !x.starts_with('/'))
        .any(|x| p == x || p.starts_with(&format!("{x}/")) || x.starts_with(&format!("{p}/")))
}

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The target's manifest stream broke: a transport fault, tried again.
    #[error("{0}")]
    ManifestBroke(String),
    /// Anything else (the source root, the plan files, a malformed manifest entry)
    /// fails the target.
    #[error("{0}")]
    Fatal(String),
}

/// A target item as the planner receives it from the manifest stream.
pub type ManifestItem = Result<Item, PlanError>;

fn fatal(what: String) -> PlanError {
    PlanError::Fatal(what)
}

/// A channel's CMS pages as its provider reads them, in key order.
pub type PageFeed = mpsc::Receiver<Result<PageDoc, WagtailError>>;

/// A source item, with its document when it is a page.
type SourceItem = (Item, Option<String>);

/// The source's items in tree order: the walked files merged with the CMS pages (whose
/// keys are below [`cms_mirror::pathsafe::PAGES_DIR`], in key order, which is their tree order).
struct Sources {
    walker: std::iter::Peekable<Walker>,
    pages: Option<PageFeed>,
    next_page: Option<SourceItem>,
}

impl Sources {
    fn new(
        walker: Walker,
        mut pages: Option<PageFeed>,
        errors: &mut Vec<WalkError>,
    ) -> Result<Sources, PlanError> {
        let next_page = next_page(&mut pages, errors)?;
        Ok(Sources {
            walker: walker.peekable(),
            pages,
            next_page,
        })
    }

    /// The next item (walk errors and unreadable pages recorded and skipped).
    fn next(&mut self, errors: &mut Vec<WalkError>) -> Result<Option<SourceItem>, PlanError> {
        let file = next_source(&mut self.walker, errors);
        let page_first = match (&file, &self.next_page) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(f), Some((p, _))) => tree_key(&p.path) < tree_key(&f.path),
        };
        if page_first {
            let page = self.next_page.take();
            self.next_page = next_page(&mut self.pages, errors)?;
            return Ok(page);
        }
        if file.is_some() {
            self.walker.next();
        }
        Ok(file.map(|f| (f, None)))
    }
}

/// The next readable page of the feed as an item with its document.
fn next_page(
    feed: &mut Option<PageFeed>,
    errors: &mut Vec<WalkError>,
) -> Result<Option<SourceItem>, PlanError> {
    let Some(rx) = feed else { return Ok(None) };
    loop {
        match rx.blocking_recv() {
            None => return Ok(None),
            Some(Ok(p)) => {
                let doc = p.document();
                return Ok(Some((p.item(doc.as_bytes()), Some(doc))));
            }
            Some(Err(WagtailError::Page {
                key,
                id,
                url_path,
                problem,
            })) => errors.push(WalkError {
                path: cms_mirror::pathsafe::page_path(&key),
                code: "unreadable",
                message: format!("page {id} ({url_path}): {problem}"),
                retryable: false,
            }),
            Some(Err(e)) => return Err(fatal(format!("cannot read the CMS: {e}"))),
        }
    }
}

/// Writes the plan for one target into `dir`, merging the source walk (and `pages`)
/// with `manifest` (the target's items in tree order). Walk errors are returned for the
/// job record.
pub fn build(
    spec: &PlanSpec,
    manifest: &mut mpsc::Receiver<ManifestItem>,
    pages: Option<PageFeed>,
    dir: &Path,
) -> Result<(Totals, Vec<WalkError>), PlanError> {
    let mut out = PlanFiles::create(dir)?;
    let md = std::fs::metadata(&spec.source)
        .map_err(|e| fatal(format!("source directory {}: {e}", spec.source.display())))?;
    if !md.is_dir() {
        return Err(fatal(format!(
            "source {} is not a directory",
            spec.source.display()
        )));
    }
    let mut m = Merge {
        spec,
        totals: Totals::default(),
        errors: Vec::new(),
    };
    // A source that is itself a target's site (a tier of a chain) holds that target's
    // own files at its top: they are not content.
    let walker = Walker::new(&spec.source, spec.filter.clone()).skip_top_level(&[
        cms_mirror::pathsafe::STAGING_DIR,
        cms_mirror::pathsafe::TRACE_FILE,
    ]);
    let mut sources = Sources::new(walker, pages, &mut m.errors)?;
    let mut next_target = || manifest.blocking_recv().transpose();
    let mut src = sources.next(&mut m.errors)?;
    let mut tgt = next_target()?;
    loop {
        let order = match (&src, &tgt) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((s, _)), Some(t)) => tree_key(&s.path).cmp(&tree_key(&t.path)),
        };
        let s = if order == std::cmp::Ordering::Greater {
            None
        } else {
            std::mem::replace(&mut src, sources.next(&mut m.errors)?)
        };
        let t = match order {
            std::cmp::Ordering::Less => None,
            _ => std::mem::replace(&mut tgt, next_target()?),
        };
        m.merge(s, t, &mut out)?;
    }
    out.finish(dir, &m.totals)?;
    Ok((m.totals, m.errors))
}

/// The next walkable source item (walk errors are recorded and skipped).
fn next_source(
    walker: &mut std::iter::Peekable<Walker>,
    errors: &mut Vec<WalkError>,
) -> Option<Item> {
    loop {
        match walker.peek() {
            Some(Err(_)) => {
                if let Some(Err(e)) = walker.next() {
                    errors.push(e);
                }
            }
            Some(Ok(_)) => return walker.peek().and_then(|r| r.as_ref().ok()).cloned(),
            None => return None,
        }
    }
}

/// The three files of a plan being written.
struct PlanFiles {
    content: BufWriter<File>,
    last: BufWriter<File>,
    delete: BufWriter<File>,
}

impl PlanFiles {
    fn create(dir: &Path) -> Result<PlanFiles, PlanError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            fatal(format!(
                "cannot create plan directory {}: {e}",
                dir.display()
            ))
        })?;
        let open = |ph: PhaseName| {
            File::create(dir.join(ph.file()))
                .map(BufWriter::new)
                .map_err(|e| {
                    fatal(format!(
                        "cannot write plan {}: {e}",
                        dir.join(ph.file()).display()
                    ))
                })
        };
        Ok(PlanFiles {
            content: open(PhaseName::Content)?,
            last: open(PhaseName::Last)?,
            delete: open(PhaseName::Delete)?,
        })
    }

    fn write(&mut self, ph: PhaseName, e: &PlanEntry) -> Result<(), PlanError> {
        let w = match ph {
            PhaseName::Content => &mut self.content,
            PhaseName::Last => &mut self.last,
            PhaseName::Delete => &mut self.delete,
        };
        serde_json::to_writer(&mut *w, e).map_err(|e| fatal(e.to_string()))?;
        w.write_all(b"\n")
            .map_err(|e| fatal(format!("cannot write plan: {e}")))
    }

    fn finish(self, dir: &Path, totals: &Totals) -> Result<(), PlanError> {
        for mut w in [self.content, self.last, self.delete] {
            w.flush()
                .map_err(|e| fatal(format!("cannot write plan: {e}")))?;
        }
        let t = serde_json::to_vec(totals).map_err(|e| fatal(e.to_string()))?;
        std::fs::write(dir.join("totals.json"), t)
            .map_err(|e| fatal(format!("cannot write plan: {e}")))
    }
}

/// The merge join's decisions and counts.
struct Merge<'a> {
    spec: &'a PlanSpec,
    totals: Totals,
    errors: Vec<WalkError>,
}

impl Merge<'_> {
    /// Decides one path: on the source only (create), on the target only (delete), or
    /// on both (update unless unchanged).
    fn merge(
        &mut self,
        src: Option<SourceItem>,
        tgt: Option<Item>,
        out: &mut PlanFiles,
    ) -> Result<(), PlanError> {
        let (src, doc) = match src {
            Some((s, doc)) => (Some(s), doc),
            None => (None, None),
        };
        let spec = self.spec;
        if tgt.is_some() {
            self.totals.target_items += 1;
        }
        match (src, tgt) {
            (Some(mut s), None) if within(&spec.paths, &s.path, false) => {
                hash_if_needed(spec, &mut s, &mut self.errors);
                self.add(Action::Create, s, doc, None, out)
            }
            (None, Some(t))
                if spec.delete
                    && within(&spec.paths, &t.path, true)
                    && !spec.filter.excludes_with_ancestors(&t.path, t.kind) =>
            {
                self.totals.deletes += 1;
                let e = PlanEntry {
                    a: Action::Delete,
                    i: t,
                    doc: None,
                    basis: None,
                };
                out.write(PhaseName::Delete, &e)
            }
            (Some(mut s), Some(t)) if within(&spec.paths, &s.path, false) => {
                if self.unchanged(&mut s, &t) {
                    self.totals.unchanged += 1;
                    return Ok(());
                }
                let delta = self.spec.delta_min.is_some_and(|min| {
                    s.kind == Kind::File && t.kind == Kind::File && s.size >= min && t.size >= min
                });
                if delta {
                    self.totals.delta_files += 1;
                    self.totals.delta_bytes += s.size;
                }
                self.add(Action::Update, s, doc, delta.then_some(t.size), out)
            }
            _ => Ok(()),
        }
    }

    /// Whether the source item `s` is the target's `t` as the channel compares them.
    /// (Hashes `s` for a checksum comparison.)
    fn unchanged(&mut self, s: &mut Item, t: &Item) -> bool {
        match self.spec.compare {
            Compare::Full => false,
            Compare::Quick => s.same_quick(t),
            Compare::Checksum => {
                hash_if_needed(self.spec, s, &mut self.errors);
                s.kind == t.kind
                    && s.mode == t.mode
                    && match s.kind {
                        Kind::File => {
                            s.hash.is_some() && s.hash == t.hash && s.mtime_ns == t.mtime_ns
                        }
                        _ => s.same_quick(t),
                    }
            }
        }
    }

    fn add(
        &mut self,
        a: Action,
        i: Item,
        doc: Option<String>,
        basis: Option<u64>,
        out: &mut PlanFiles,
    ) -> Result<(), PlanError> {
        match a {
            Action::Create => self.totals.creates += 1,
            _ => self.totals.updates += 1,
        }
        if i.kind == Kind::File {
            self.totals.bytes += i.size;
        }
        let ph = if i.kind != Kind::Dir && self.spec.last.matches(&i.path) {
            PhaseName::Last
        } else {
            PhaseName::Content
        };
        out.write(ph, &PlanEntry { a, i, doc, basis })
    }
}

fn hash_if_needed(spec: &PlanSpec, s: &mut Item, errors: &mut Vec<WalkError>) {
    if spec.compare != Compare::Checksum || s.kind != Kind::File || s.hash.is_some() {
        return;
    }
    let p = spec.source.join(&s.path);
    let mut h = blake3::Hasher::new();
    match File::open(&p).and_then(|f| h.update_reader(f).map(|_| ())) {
        Ok(()) => s.hash = Some(h.finalize().to_hex().to_string()),
        Err(e) => errors.push(cms_mirror::fswalk::io_error(&s.path, &e)),
    }
}

/// Reads the totals of a stored plan.
pub fn load_totals(dir: &Path) -> Option<Totals> {
    serde_json::from_slice(&std::fs::read(dir.join("totals.json")).ok()?).ok()
}

/// Where a plan stands: the phase, the byte position of the next entry in that phase's
/// file, and for a file whose body is being sent, the offset reached.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub phase: Option<PhaseName>,
    pub pos: u64,
    pub body_offset: u64,
}

/// Sequential reader of a stored plan, from a cursor.
pub struct PlanReader {
    dir: PathBuf,
    phase: PhaseName,
    reader: BufReader<File>,
    pos: u64,
    /// Phases to read (the delete phase is dropped when deletes are not allowed).
    phases: Vec<PhaseName>,
}

impl PlanReader {
    pub fn open(
        dir: &Path,
        cursor: &Cursor,
        phases: Vec<PhaseName>,
    ) -> std::io::Result<PlanReader> {
        let phase = cursor.phase.unwrap_or(phases[0]);
        let mut f = File::open(dir.join(phase.file()))?;
        f.seek(SeekFrom::Start(cursor.pos))?;
        Ok(PlanReader {
            dir: dir.to_path_buf(),
            phase,
            reader: BufReader::new(f),
            pos: cursor.pos,
            phases,
        })
    }

    /// Position of the next entry.
    pub fn position(&self) -> (PhaseName, u64) {
        (self.phase, self.pos)
    }

    /// Next entry with its phase and the position it starts at, or None at the end.
    pub fn next_entry(&mut self) -> std::io::Result<Option<(PhaseName, PlanEntry, u64)>> {
        let mut line = String::new();
        loop {
            line.clear();
            let start = self.pos;
            let n = self.reader.read_line(&mut line)?;
            if n == 0 {
                let idx = self
                    .phases
                    .iter()
                    .position(|p| *p == self.phase)
                    .unwrap_or(usize::MAX);
                match self.phases.get(idx.wrapping_add(1)) {
                    Some(&next) => {
                        self.phase = next;
                        self.reader = BufReader::new(File::open(self.dir.join(next.file()))?);
                        self.pos = 0;
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            self.pos += n as u64;
            let e: PlanEntry = serde_json::from_str(line.trim_end())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            return Ok(Some((self.phase, e, start)));
        }
    }
}
