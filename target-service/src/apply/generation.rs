//! A site's generations on disk (atomic publish): whole trees in `<root>.generations/`,
//! the site root a symbolic link to the live one. A new generation is built in the work
//! area (`building`) from the live tree, every unchanged file shared by a hard link (its
//! bytes never copied: a changed file is always a new inode, so no generation sees
//! another's change), and published by renaming a new link over the root.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cms_mirror::pathsafe::STAGING_DIR;

use super::{SiteFs, unix};

/// The work area's directory name in the generations directory.
pub const WORK_DIR: &str = "building";

impl SiteFs {
    /// The directory that holds the site's generations: beside the root, on its file
    /// system (hard links and the switch's rename need that).
    pub fn generations(&self) -> PathBuf {
        let mut name = self
            .root
            .file_name()
            .map(OsString::from)
            .unwrap_or_default();
        name.push(".generations");
        self.root.with_file_name(name)
    }

    /// The work area, where an atomic session applies.
    pub fn work(&self) -> SiteFs {
        SiteFs {
            root: self.generations().join(WORK_DIR),
            links: self.links,
        }
    }

    /// The tree served now: the root's link resolved, or the root itself while the site
    /// is published in place.
    pub fn live_dir(&self) -> PathBuf {
        match fs::read_link(&self.root) {
            Ok(to) => self.root.with_file_name(to),
            Err(_) => self.root.clone(),
        }
    }

    /// Builds the work area afresh from the live tree: directories made, files and links
    /// shared by hard links, the staging directory and the target's own short-lived
    /// files left out, directory modes and times as they are. Returns (directories,
    /// files) made.
    pub fn build_work_area(&self) -> io::Result<(u64, u64)> {
        let work = self.work().root;
        remove_tree(&work)?;
        fs::create_dir_all(self.generations())?;
        let mut counts = (0, 0);
        clone_dir(&self.live_dir(), &work, true, &mut counts)?;
        Ok(counts)
    }

    /// Publishes the work area as generation `number`: the work directory renamed to its
    /// number, then a new link renamed over the root, then the root's directory synced.
    /// A root that is still a directory (the site's first atomic publish) is exchanged
    /// with the link in one `renameat2(RENAME_EXCHANGE)` and kept as generation 0.
    /// Idempotent: a switch interrupted by a crash is completed by the next call.
    /// Returns whether generation 0 is kept (see [`Self::point_root_at`]).
    pub fn switch_to(&self, number: u64) -> io::Result<bool> {
        let gens = self.generations();
        let dest = gens.join(number.to_string());
        let work = gens.join(WORK_DIR);
        if work.exists() {
            if dest.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists already", dest.display()),
                ));
            }
            fs::rename(&work, &dest)?;
            fs::File::open(&gens)?.sync_all()?;
        } else if !dest.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("neither {} nor {} exists", work.display(), dest.display()),
            ));
        }
        self.point_root_at(number)
    }

    /// Points the root's link at an existing generation (a switch or a rollback).
    /// Returns whether generation 0 (the tree served before the first atomic publish)
    /// is kept: known from the directory, so that a switch a crash cut short after the
    /// exchange still records it.
    pub fn point_root_at(&self, number: u64) -> io::Result<bool> {
        let gens = self.generations();
        let gens_name = gens.file_name().unwrap_or_default();
        let to = Path::new(gens_name).join(number.to_string());
        let parent = self.root.parent().unwrap_or(Path::new("/"));
        let mut tmp_name = OsString::from(".");
        tmp_name.push(self.root.file_name().unwrap_or_default());
        tmp_name.push(format!(".{STAGING_DIR}-link"));
        let tmp = parent.join(tmp_name);
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&to, &tmp)?;
        let was_dir = fs::symlink_metadata(&self.root).is_ok_and(|m| m.is_dir());
        if was_dir {
            use rustix::fs::{CWD, RenameFlags, renameat_with};
            renameat_with(CWD, &tmp, CWD, &self.root, RenameFlags::EXCHANGE)?;
            // `tmp` is now the tree served until this moment.
            let kept = gens.join("0");
            if kept.exists() {
                fs::rename(&tmp, gens.join(format!("0-{}", cms_mirror::now_ms())))?;
            } else {
                fs::rename(&tmp, &kept)?;
            }
            fs::File::open(&gens)?.sync_all()?;
        } else {
            fs::rename(&tmp, &self.root)?;
        }
        fs::File::open(parent)?.sync_all()?;
        Ok(gens.join("0").is_dir())
    }

    /// Removes the work area's tree (a rollback made it stale).
    pub fn remove_work_area(&self) -> io::Result<()> {
        remove_tree(&self.work().root)
    }

    /// Removes a generation's directory (one no longer kept).
    pub fn remove_generation(&self, number: u64) -> io::Result<()> {
        remove_tree(&self.generations().join(number.to_string()))
    }

    /// Makes the work area durable before it is declared prepared: everything the
    /// clone made (directories, links) went through the page cache.
    pub fn sync_work_area(&self) -> io::Result<()> {
        unix::syncfs(&self.work().root)
    }
}

fn remove_tree(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Copies a directory's tree, hard-linking everything but directories. The directory's
/// mode and times are set after its entries (which moved them).
fn clone_dir(from: &Path, to: &Path, top: bool, counts: &mut (u64, u64)) -> io::Result<()> {
    let md = fs::symlink_metadata(from)?;
    fs::create_dir(to)?;
    // Writable by the target while it fills the directory; its own mode comes last.
    fs::set_permissions(to, fs::Permissions::from_mode(0o700))?;
    counts.0 += 1;
    for e in fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        if top && name.to_string_lossy().starts_with(STAGING_DIR) {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if e.file_type()?.is_dir() {
            clone_dir(&src, &dst, false, counts)?;
        } else {
            // linkat without AT_SYMLINK_FOLLOW: a symbolic link is shared as itself.
            fs::hard_link(&src, &dst)?;
            counts.1 += 1;
        }
    }
    fs::set_permissions(to, fs::Permissions::from_mode(md.mode() & 0o7777))?;
    unix::set_mtime(to, cms_mirror::fswalk::mtime_ns(&md))
}
