//! The `fs` content provider's reader: a depth-first walk in tree order
//! ([`crate::model::tree_key`]), children of each directory sorted by name.
//!
//! Memory is bounded by the sum of the widths of the directories on the current path,
//! never by the size of the tree. Symlinks are reported as links, never followed;
//! special files (FIFOs, sockets, devices) and names that are not UTF-8 are reported
//! as item errors and skipped.
//!
//! Items are looked up by name in an open directory (`fstatat`, `openat`), not by
//! their path from `/`: each lookup resolves one name instead of every component
//! again, which is most of the cost of a walk over many small files (the kernel's
//! dentry hash chains grow with everything cached).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::model::{Item, Kind};

/// An item the walker could not read; the job records it and goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkError {
    pub path: String,
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

/// A list of glob patterns matched against relative paths (an empty list matches
/// nothing).
#[derive(Clone, Debug, Default)]
pub struct Patterns(Option<GlobSet>);

impl Patterns {
    /// Compiles the patterns; the error names the one that does not parse.
    pub fn new(pats: &[String]) -> Result<Patterns, globset::Error> {
        if pats.is_empty() {
            return Ok(Patterns(None));
        }
        let mut b = GlobSetBuilder::new();
        for p in pats {
            b.add(Glob::new(p)?);
        }
        Ok(Patterns(Some(b.build()?)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn matches(&self, path: &str) -> bool {
        self.0.as_ref().is_some_and(|g| g.is_match(path))
    }
}

/// Include / exclude filters of a channel, matched against relative paths.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Empty: every file and link is included.
    include: Patterns,
    exclude: Patterns,
}

impl Filter {
    pub fn new(include: Patterns, exclude: Patterns) -> Filter {
        Filter { include, exclude }
    }

    /// Whether an item is excluded (an excluded directory prunes its subtree).
    /// Include patterns select files and links; directories are kept unless excluded.
    pub fn excludes(&self, path: &str, kind: Kind) -> bool {
        if self.exclude.matches(path)
            || (kind == Kind::Dir && self.exclude.matches(&format!("{path}/")))
        {
            return true;
        }
        matches!(kind, Kind::File | Kind::Symlink)
            && !self.include.is_empty()
            && !self.include.matches(path)
    }

    /// Whether a path is excluded by itself or through one of its ancestors
    /// (for entries of the target's manifest, which is not walked).
    pub fn excludes_with_ancestors(&self, path: &str, kind: Kind) -> bool {
        if self.excludes(path, kind) {
            return true;
        }
        let mut p = path;
        while let Some((parent, _)) = p.rsplit_once('/') {
            if self.excludes(parent, Kind::Dir) {
                return true;
            }
            p = parent;
        }
        false
    }
}

/// Directory levels deeper than this are looked up from the root instead of holding a
/// descriptor each (a pathologically deep tree must not run out of descriptors).
const MAX_HELD_DIRS: usize = 48;

/// A directory on the walk's current path.
struct Level {
    rel: String,
    /// Names still to visit (reversed: pop = next).
    names: Vec<String>,
    /// The open directory (none below [`MAX_HELD_DIRS`]).
    fd: Option<OwnedFd>,
}

/// A sorted depth-first walk of a directory tree (the root itself is not an item).
pub struct Walker {
    root: PathBuf,
    root_fd: Option<OwnedFd>,
    filter: Filter,
    stack: Vec<Level>,
    started: bool,
    /// Names that the walk itself must never report (the target's staging dir).
    skip_top: Vec<String>,
    /// Item errors found while listing a directory, reported before its entries.
    pending: Vec<WalkError>,
}

impl Walker {
    pub fn new(root: impl Into<PathBuf>, filter: Filter) -> Walker {
        Walker {
            root: root.into(),
            root_fd: None,
            filter,
            stack: Vec::new(),
            started: false,
            skip_top: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Leaves out these top-level names.
    pub fn skip_top_level(mut self, names: &[&str]) -> Walker {
        self.skip_top = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Lists an open directory, names sorted in reverse (pop = next).
    fn list(&mut self, rel: &str, dir: BorrowedFd<'_>) -> Result<Vec<String>, WalkError> {
        let rd = rustix::fs::Dir::read_from(dir).map_err(|e| io_error(rel, &e.into()))?;
        let mut names = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| io_error(rel, &e.into()))?;
            let raw = ent.file_name().to_bytes();
            if raw == b"." || raw == b".." {
                continue;
            }
            match std::str::from_utf8(raw) {
                Ok(n) => names.push(n.to_string()),
                Err(_) => self.pending.push(WalkError {
                    path: join(rel, &String::from_utf8_lossy(raw)),
                    code: "invalid_name",
                    message: "file name is not valid UTF-8; skipped".into(),
                    retryable: false,
                }),
            }
        }
        if rel.is_empty() {
            names.retain(|n| !self.skip_top.contains(n));
        }
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(names)
    }

    /// Opens the root and lists it.
    fn start(&mut self) -> Result<(), WalkError> {
        let fd = open_dir(rustix::fs::CWD, &self.root, false).map_err(|e| io_error("", &e))?;
        let names = self.list("", fd.as_fd())?;
        self.stack.push(Level {
            rel: String::new(),
            names,
            fd: None,
        });
        self.root_fd = Some(fd);
        Ok(())
    }

    /// The next item of the walk, or `None` at its end.
    fn step(&mut self) -> Option<Result<Item, WalkError>> {
        loop {
            if let Some(e) = self.pending.pop() {
                return Some(Err(e));
            }
            let root_fd = self.root_fd.as_ref()?.as_fd();
            let depth = self.stack.len();
            let level = self.stack.last_mut()?;
            let Some(name) = level.names.pop() else {
                self.stack.pop();
                continue;
            };
            let rel = join(&level.rel, &name);
            // The directory holding `name`, and `name` relative to it.
            let (dir, at) = match &level.fd {
                Some(fd) => (fd.as_fd(), name.as_str()),
                None if level.rel.is_empty() => (root_fd, name.as_str()),
                None => (root_fd, rel.as_str()),
            };
            let item = match item_at(dir, &rel, at) {
                Ok(i) => i,
                Err(e) => return Some(Err(e)),
            };
            if self.filter.excludes(&rel, item.kind) {
                continue;
            }
            if item.kind == Kind::Dir {
                let opened = open_dir(dir, at, true).map_err(|e| io_error(&rel, &e));
                let listed = opened.and_then(|fd| Ok((self.list(&rel, fd.as_fd())?, fd)));
                match listed {
                    Ok((names, fd)) => self.stack.push(Level {
                        rel,
                        names,
                        fd: (depth < MAX_HELD_DIRS).then_some(fd),
                    }),
                    Err(e) => return Some(Err(e)),
                }
            }
            return Some(Ok(item));
        }
    }
}

impl Iterator for Walker {
    type Item = Result<Item, WalkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.started {
            self.started = true;
            if let Err(e) = self.start() {
                return Some(Err(e));
            }
        }
        self.step()
    }
}

/// Opens a directory for lookups and listing; `nofollow` refuses a symlink in its place.
fn open_dir<P: rustix::path::Arg>(at: impl AsFd, path: P, nofollow: bool) -> io::Result<OwnedFd> {
    let mut flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    if nofollow {
        flags |= OFlags::NOFOLLOW;
    }
    Ok(rustix::fs::openat(at, path, flags, Mode::empty())?)
}

/// Open directories of one tree, for looking up items by their relative paths one name
/// at a time: the directory of the last lookup stays open, so the items of one
/// directory (which a plan visits together) cost one open between them.
pub struct DirCache {
    root: PathBuf,
    root_fd: Option<OwnedFd>,
    dir: Option<(String, OwnedFd)>,
}

impl DirCache {
    pub fn new(root: impl Into<PathBuf>) -> DirCache {
        DirCache {
            root: root.into(),
            root_fd: None,
            dir: None,
        }
    }

    /// The open directory that holds `rel`, and `rel`'s last name.
    pub fn parent_of<'a>(&mut self, rel: &'a str) -> io::Result<(BorrowedFd<'_>, &'a str)> {
        if self.root_fd.is_none() {
            self.root_fd = Some(open_dir(rustix::fs::CWD, &self.root, false)?);
        }
        let root_fd = self.root_fd.as_ref().expect("opened above");
        let Some((parent, name)) = rel.rsplit_once('/') else {
            return Ok((root_fd.as_fd(), rel));
        };
        if self.dir.as_ref().is_none_or(|(p, _)| p != parent) {
            let fd = open_dir(root_fd, parent, false)?;
            self.dir = Some((parent.to_string(), fd));
        }
        let (_, fd) = self.dir.as_ref().expect("opened above");
        Ok((fd.as_fd(), name))
    }

    /// The item at `rel`, from `lstat` (links are not followed).
    pub fn item(&mut self, rel: &str) -> Result<Item, WalkError> {
        let (dir, name) = self.parent_of(rel).map_err(|e| io_error(rel, &e))?;
        item_at(dir, rel, name)
    }

    /// Opens the file at `rel` for reading; a link there is not followed (ELOOP), as
    /// [`item`](Self::item) does not follow it, so what is opened is what was looked up.
    pub fn open(&mut self, rel: &str) -> io::Result<std::fs::File> {
        let (dir, name) = self.parent_of(rel)?;
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(dir, name, flags, Mode::empty())?;
        Ok(std::fs::File::from(fd))
    }
}

/// A file's modification time in nanoseconds since the epoch (the unit of `Item`).
pub fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

/// The item `rel`, found as `name` in the open directory `dir` (not following links).
pub fn item_at(dir: BorrowedFd<'_>, rel: &str, name: &str) -> Result<Item, WalkError> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_error(rel, &e.into()))?;
    let link = match FileType::from_raw_mode(st.st_mode as _) {
        FileType::Symlink => {
            let t = rustix::fs::readlinkat(dir, name, Vec::new())
                .map_err(|e| io_error(rel, &e.into()))?;
            t.into_string().map_err(|_| WalkError {
                path: rel.to_string(),
                code: "invalid_name",
                message: "symlink target is not valid UTF-8".into(),
                retryable: false,
            })?
        }
        _ => String::new(),
    };
    item_from_stat(rel, &st, link)
}

/// Builds an item from `lstat` data (and a link's target); special files are an error.
#[allow(clippy::unnecessary_cast)] // the field types differ between architectures
fn item_from_stat(rel: &str, st: &Stat, link: String) -> Result<Item, WalkError> {
    let kind = match FileType::from_raw_mode(st.st_mode as _) {
        FileType::Directory => Kind::Dir,
        FileType::RegularFile => Kind::File,
        FileType::Symlink => Kind::Symlink,
        other => {
            let what = match other {
                FileType::Fifo => "fifo",
                FileType::Socket => "socket",
                FileType::BlockDevice => "block device",
                FileType::CharacterDevice => "character device",
                _ => "unknown file type",
            };
            return Err(WalkError {
                path: rel.to_string(),
                code: "special_file",
                message: format!("special file ({what}) skipped"),
                retryable: false,
            });
        }
    };
    Ok(Item {
        path: rel.to_string(),
        kind,
        size: if kind == Kind::File {
            st.st_size as u64
        } else {
            0
        },
        mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
        mode: if kind == Kind::Symlink {
            0
        } else {
            st.st_mode as u32 & 0o7777
        },
        link,
        hash: None,
    })
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Classifies an I/O error on a source item.
pub fn io_error(rel: &str, e: &std::io::Error) -> WalkError {
    use std::io::ErrorKind::*;
    let (code, retryable) = match e.kind() {
        NotFound => ("vanished", true),
        PermissionDenied => ("unreadable", false),
        _ => ("io", true),
    };
    WalkError {
        path: rel.to_string(),
        code,
        message: e.to_string(),
        retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn walks_in_tree_order_and_reports_bad_names() {
        let d = tempfile::tempdir().unwrap();
        for p in ["a/b", "a-c", "b"] {
            std::fs::create_dir_all(d.path().join(p)).unwrap();
        }
        std::fs::write(d.path().join("a/b/f"), b"x").unwrap();
        std::fs::write(d.path().join(std::ffi::OsStr::from_bytes(b"bad\xff")), b"x").unwrap();
        let (mut ok, mut errs) = (Vec::new(), Vec::new());
        for r in Walker::new(d.path(), Filter::default()) {
            match r {
                Ok(i) => ok.push(i.path),
                Err(e) => errs.push(e.code),
            }
        }
        assert_eq!(ok, ["a", "a/b", "a/b/f", "a-c", "b"]);
        assert_eq!(errs, ["invalid_name"]);
    }

    /// Below the levels that keep a directory open, items are looked up from the root:
    /// the walk still finds every one, with its size, and so does a [`DirCache`].
    #[test]
    fn a_tree_deeper_than_the_open_directories_is_walked_whole() {
        let d = tempfile::tempdir().unwrap();
        let depth = MAX_HELD_DIRS + 5;
        let mut rel = String::new();
        let mut want = Vec::new();
        for i in 0..depth {
            rel = join(&rel, &format!("d{i}"));
            std::fs::create_dir(d.path().join(&rel)).unwrap();
            want.push((rel.clone(), 0));
            let f = join(&rel, "f");
            std::fs::write(d.path().join(&f), vec![b'x'; i]).unwrap();
            want.push((f, i as u64));
        }
        // Tree order: a directory's file "f" sorts before its subdirectory "dN".
        want.sort_by_key(|(p, _)| crate::model::tree_key(p));
        let got: Vec<(String, u64)> = Walker::new(d.path(), Filter::default())
            .map(|r| r.map(|i| (i.path, i.size)).unwrap())
            .collect();
        assert_eq!(got, want);

        let mut cache = DirCache::new(d.path());
        for (path, size) in want.iter().rev() {
            let item = cache.item(path).unwrap();
            assert_eq!((item.path.as_str(), item.size), (path.as_str(), *size));
            if path.ends_with("/f") {
                let mut body = Vec::new();
                std::io::Read::read_to_end(&mut cache.open(path).unwrap(), &mut body).unwrap();
                assert_eq!(body.len() as u64, *size);
            }
        }
        assert_eq!(cache.item("d0/missing").unwrap_err().code, "vanished");
    }

    /// What a DirCache opens is the file it looked up: a link in its place is refused,
    /// never followed (a target's delta must not read outside its site through one).
    #[test]
    fn a_link_is_not_opened_through() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::fs::write(d.path().join("plain"), b"y").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("link")).unwrap();
        let mut cache = DirCache::new(d.path());
        assert!(cache.open("plain").is_ok());
        let e = cache.open("link").unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error()),
            "{e}"
        );
    }
}
