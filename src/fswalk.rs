//! The `fs` content provider's reader: a depth-first walk in tree order
//! ([`crate::model::tree_key`]), children of each directory sorted by name.
//!
//! Memory is bounded by the sum of the widths of the directories on the current path,
//! never by the size of the tree. Symlinks are reported as links, never followed;
//! special files (FIFOs, sockets, devices) and names that are not UTF-8 are reported
//! as item errors and skipped.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

/// A sorted depth-first walk of a directory tree (the root itself is not an item).
pub struct Walker {
    root: PathBuf,
    filter: Filter,
    /// Names still to visit, per directory on the current path (reversed: pop = next).
    stack: Vec<(String, Vec<String>)>,
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

    fn list(&mut self, rel: &str) -> Result<Vec<String>, WalkError> {
        let dir = if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        };
        let rd = std::fs::read_dir(&dir).map_err(|e| io_error(rel, &e))?;
        let mut names = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| io_error(rel, &e))?;
            match ent.file_name().into_string() {
                Ok(n) => names.push(n),
                Err(raw) => self.pending.push(WalkError {
                    path: join(rel, &raw.to_string_lossy()),
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
}

impl Iterator for Walker {
    type Item = Result<Item, WalkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.started {
            self.started = true;
            match self.list("") {
                Ok(names) => self.stack.push((String::new(), names)),
                Err(e) => return Some(Err(e)),
            }
        }
        loop {
            if let Some(e) = self.pending.pop() {
                return Some(Err(e));
            }
            let (dir, names) = self.stack.last_mut()?;
            let Some(name) = names.pop() else {
                self.stack.pop();
                continue;
            };
            let rel = join(dir, &name);
            let md = match std::fs::symlink_metadata(self.root.join(&rel)) {
                Ok(md) => md,
                Err(e) => return Some(Err(io_error(&rel, &e))),
            };
            let item = match item_from_metadata(&self.root, &rel, &md) {
                Ok(i) => i,
                Err(e) => return Some(Err(e)),
            };
            if self.filter.excludes(&rel, item.kind) {
                continue;
            }
            if item.kind == Kind::Dir {
                match self.list(&rel) {
                    Ok(children) => self.stack.push((rel, children)),
                    Err(e) => return Some(Err(e)),
                }
            }
            return Some(Ok(item));
        }
    }
}

/// Builds an item from `lstat` metadata; special files are an error.
pub fn item_from_metadata(
    root: &Path,
    rel: &str,
    md: &std::fs::Metadata,
) -> Result<Item, WalkError> {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        use std::os::unix::fs::FileTypeExt;
        let what = if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "unknown file type"
        };
        return Err(WalkError {
            path: rel.to_string(),
            code: "special_file",
            message: format!("special file ({what}) skipped"),
            retryable: false,
        });
    };
    let link = if kind == Kind::Symlink {
        let t = std::fs::read_link(root.join(rel)).map_err(|e| io_error(rel, &e))?;
        t.into_os_string().into_string().map_err(|_| WalkError {
            path: rel.to_string(),
            code: "invalid_name",
            message: "symlink target is not valid UTF-8".into(),
            retryable: false,
        })?
    } else {
        String::new()
    };
    Ok(Item {
        path: rel.to_string(),
        kind,
        size: if kind == Kind::File { md.len() } else { 0 },
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        mode: if kind == Kind::Symlink {
            0
        } else {
            md.permissions().mode() & 0o7777
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
}
