//! Path checks on the target: no symlink among an item's ancestors, no Unicode
//! normalisation twins, and the open destination directory of a package.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cms_mirror::model::parent;

/// Why an item's path is refused on this target.
#[derive(Debug, thiserror::Error)]
pub(super) enum PathRefused {
    #[error("refusing to write through symlink {0:?}")]
    ThroughSymlink(String),
    #[error("{0:?} is not a directory")]
    NotADirectory(String),
    #[error("parent {path:?}: {source}")]
    Parent { path: String, source: io::Error },
    #[error("differs from {0:?} in the same package only by Unicode normalisation")]
    TwinInPackage(String),
    #[error("differs from the existing {0:?} only by Unicode normalisation")]
    TwinOnDisk(String),
}

impl PathRefused {
    /// An ancestor does not exist (so neither does the item).
    pub(super) fn parent_missing(&self) -> bool {
        matches!(self, PathRefused::Parent { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Checks that every ancestor of `rel` under `root` is a real directory (not a symlink).
pub(super) fn check_parents(root: &Path, rel: &str) -> Result<(), PathRefused> {
    check_parents_cached(root, rel, &mut HashSet::new())
}

/// [`check_parents`], skipping ancestors already checked in this package (`ok` holds
/// them; an entry that replaces a directory must remove it and its descendants).
pub(super) fn check_parents_cached(
    root: &Path,
    rel: &str,
    ok: &mut HashSet<String>,
) -> Result<(), PathRefused> {
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
        let path = || comps[..=i].join("/");
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(PathRefused::ThroughSymlink(path()));
            }
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(PathRefused::NotADirectory(path())),
            Err(source) => {
                let path = path();
                return Err(PathRefused::Parent { path, source });
            }
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
pub(super) struct Normalisation {
    /// NFC form -> the path as sent, for this package.
    pub(super) in_package: HashMap<String, String>,
    /// Directory -> its non-ASCII names on disk by NFC form.
    pub(super) dirs: HashMap<PathBuf, HashMap<String, String>>,
}

impl Normalisation {
    pub(super) fn check(&mut self, root: &Path, rel: &str) -> Result<(), PathRefused> {
        use unicode_normalization::UnicodeNormalization;
        if rel.is_ascii() {
            return Ok(());
        }
        let nfc: String = rel.nfc().collect();
        if let Some(other) = self.in_package.get(&nfc).filter(|o| *o != rel) {
            return Err(PathRefused::TwinInPackage(other.clone()));
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
                    let rel = at.strip_prefix(root).unwrap_or(&at);
                    return Err(PathRefused::TwinOnDisk(rel.display().to_string()));
                }
            }
            dir.push(c);
        }
        Ok(())
    }
}

pub(super) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Destination directories opened while staging a package. The last one stays open: a
/// package holds the files of a directory together, and each of them is then created
/// and linked by its name in that directory (one name for the kernel to resolve, not
/// every component of its path twice).
#[derive(Default)]
pub(super) struct DestDirs {
    pub(super) last: Option<(String, Arc<OwnedFd>)>,
}

impl DestDirs {
    pub(super) fn open(&mut self, root: &Path, rel: &str) -> io::Result<Arc<OwnedFd>> {
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
    pub(super) fn clear(&mut self) {
        self.last = None;
    }
}
