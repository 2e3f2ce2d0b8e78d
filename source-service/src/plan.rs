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
    /// Body bytes to send.
    pub bytes: u64,
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
}

fn within(paths: &[String], p: &str) -> bool {
    paths.is_empty()
        || paths
            .iter()
            .any(|x| p == x || p.starts_with(&format!("{x}/")) || x.starts_with(&format!("{p}/")))
}

/// Writes the plan for one target into `dir`, merging the source walk with `manifest`
/// (the target's items in tree order). Walk errors are returned for the job record.
pub fn build(
    spec: &PlanSpec,
    manifest: &mut mpsc::Receiver<Result<Item, String>>,
    dir: &Path,
) -> Result<(Totals, Vec<WalkError>), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create plan directory {}: {e}", dir.display()))?;
    let open = |ph: PhaseName| -> Result<BufWriter<File>, String> {
        File::create(dir.join(ph.file()))
            .map(BufWriter::new)
            .map_err(|e| format!("cannot write plan {}: {e}", dir.join(ph.file()).display()))
    };
    let (mut content, mut last, mut delete) = (
        open(PhaseName::Content)?,
        open(PhaseName::Last)?,
        open(PhaseName::Delete)?,
    );
    let md = std::fs::metadata(&spec.source)
        .map_err(|e| format!("source directory {}: {e}", spec.source.display()))?;
    if !md.is_dir() {
        return Err(format!(
            "source {} is not a directory",
            spec.source.display()
        ));
    }
    let mut walker = Walker::new(&spec.source, spec.filter.clone()).peekable();
    let mut totals = Totals::default();
    let mut errors = Vec::new();
    let mut next_target =
        || -> Result<Option<Item>, String> { manifest.blocking_recv().transpose() };
    let mut tgt = next_target()?;
    let mut write = |ph: PhaseName, e: &PlanEntry| -> Result<(), String> {
        let w = match ph {
            PhaseName::Content => &mut content,
            PhaseName::Last => &mut last,
            PhaseName::Delete => &mut delete,
        };
        serde_json::to_writer(&mut *w, e).map_err(|e| e.to_string())?;
        w.write_all(b"\n")
            .map_err(|e| format!("cannot write plan: {e}"))
    };
    loop {
        // Source side: next walkable item (errors are recorded and skipped).
        let src = loop {
            match walker.peek() {
                Some(Err(_)) => {
                    if let Some(Err(e)) = walker.next() {
                        errors.push(e);
                    }
                }
                Some(Ok(_)) => break walker.peek().and_then(|r| r.as_ref().ok()).cloned(),
                None => break None,
            }
        };
        let order = match (&src, &tgt) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(s), Some(t)) => tree_key(&s.path).cmp(&tree_key(&t.path)),
        };
        match order {
            std::cmp::Ordering::Less => {
                let mut s = src.expect("some");
                walker.next();
                if within(&spec.paths, &s.path) {
                    hash_if_needed(spec, &mut s, &mut errors);
                    add(spec, &mut totals, Action::Create, s, &mut write)?;
                }
            }
            std::cmp::Ordering::Greater => {
                let t = tgt.take().expect("some");
                tgt = next_target()?;
                totals.target_items += 1;
                if spec.delete
                    && within(&spec.paths, &t.path)
                    && !spec.filter.excludes_with_ancestors(&t.path, t.kind)
                {
                    totals.deletes += 1;
                    write(
                        PhaseName::Delete,
                        &PlanEntry {
                            a: Action::Delete,
                            i: t,
                        },
                    )?;
                }
            }
            std::cmp::Ordering::Equal => {
                let mut s = src.expect("some");
                walker.next();
                let t = tgt.take().expect("some");
                tgt = next_target()?;
                totals.target_items += 1;
                if !within(&spec.paths, &s.path) {
                    continue;
                }
                let same = match spec.compare {
                    Compare::Full => false,
                    Compare::Quick => s.same_quick(&t),
                    Compare::Checksum => {
                        hash_if_needed(spec, &mut s, &mut errors);
                        s.kind == t.kind
                            && s.mode == t.mode
                            && match s.kind {
                                Kind::File => {
                                    s.hash.is_some() && s.hash == t.hash && s.mtime_ns == t.mtime_ns
                                }
                                _ => s.same_quick(&t),
                            }
                    }
                };
                if same {
                    totals.unchanged += 1;
                } else {
                    add(spec, &mut totals, Action::Update, s, &mut write)?;
                }
            }
        }
    }
    for mut w in [content, last, delete] {
        w.flush().map_err(|e| format!("cannot write plan: {e}"))?;
    }
    let t = serde_json::to_vec(&totals).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("totals.json"), t).map_err(|e| format!("cannot write plan: {e}"))?;
    Ok((totals, errors))
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

fn add(
    spec: &PlanSpec,
    totals: &mut Totals,
    a: Action,
    i: Item,
    write: &mut impl FnMut(PhaseName, &PlanEntry) -> Result<(), String>,
) -> Result<(), String> {
    match a {
        Action::Create => totals.creates += 1,
        _ => totals.updates += 1,
    }
    if i.kind == Kind::File {
        totals.bytes += i.size;
    }
    let ph = if i.kind != Kind::Dir && spec.last.matches(&i.path) {
        PhaseName::Last
    } else {
        PhaseName::Content
    };
    write(ph, &PlanEntry { a, i })
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
