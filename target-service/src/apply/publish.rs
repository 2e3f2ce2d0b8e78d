//! Publishing a staged package: one durable batch, bodies linked or renamed into
//! place, directories synced; and the clean-up around it (discard, page cache, times).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cms_mirror::model::{ChangeAction, ErrorCode, Item, Kind, parent};

use super::pathcheck::check_parents;
use super::stage::Staged;
use super::unix::{file_time, link_unnamed, link_unnamed_at, set_mtime, syncfs};
use super::writer::write_deferred;
use super::{
    Applied, Body, Durability, Publish, SiteFs, io_item_error, is_no_space, item_error, staged_name,
};
use crate::ledger::PackageChanges;

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
    let mut publish = set_late_times(publish, &session_dir, &mut out);
    if let Err(e) = sync_batch(&site.root, &to_sync, &publish, durability) {
        if is_no_space(&e) {
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
        if recheck && let Err(m) = check_parents(&site.root, &p.item.path) {
            out.errors.push(item_error(
                &p.item.path,
                ErrorCode::InvalidPath,
                m.to_string(),
                false,
            ));
            p.body.remove();
            continue;
        }
        recheck |= p.item.kind == Kind::Symlink;
        if let Some(dir) = place(site, &session_dir, p, drop_cache, &mut out) {
            dirs_to_sync.insert(dir);
        }
    }
    if let Err(e) = sync_dirs(&site.root, &dirs_to_sync, durability) {
        out.errors.push(io_item_error(
            "",
            "cannot sync the package's directories",
            &e,
        ));
    }
    out
}

/// Every write of these bodies is done, also those of a package written by a stream
/// that ended: bodies whose time was left for now get it, before the batch is made
/// durable. A body whose time cannot be set is dropped with an item error.
fn set_late_times(publish: Vec<Publish>, session_dir: &Path, out: &mut Applied) -> Vec<Publish> {
    publish
        .into_iter()
        .filter_map(|mut p| {
            let Some(late) = p.late.take() else {
                return Some(p);
            };
            late.writes.wait_until(0);
            let t = file_time(late.mtime_ns);
            let Err(e) = filetime::set_file_handle_times(&late.file, Some(t), Some(t)) else {
                return Some(p);
            };
            out.errors
                .push(io_item_error(&p.item.path, "cannot set mtime", &e));
            if p.had_meta {
                let _ = fs::remove_file(session_dir.join(staged_name("m", &p.item.path)));
            }
            p.body.remove();
            None
        })
        .collect()
}

/// Puts one durable item in place and records the change; returns its directory, to
/// sync.
fn place(
    site: &SiteFs,
    session_dir: &Path,
    p: Publish,
    drop_cache: bool,
    out: &mut Applied,
) -> Option<PathBuf> {
    let dest = site.root.join(&p.item.path);
    let res = match &p.body {
        Body::Unnamed(f, dir) => link_into_place(f, dir, &dest, session_dir, &p.item.path),
        Body::Named(tmp) => rename_into_place(tmp, &dest),
    };
    let action = match res {
        Ok(action) => action,
        Err(e) => {
            out.errors
                .push(io_item_error(&p.item.path, "cannot put into place", &e));
            p.body.remove();
            return None;
        }
    };
    if let Some(sigs) = p.sigs {
        // Stat'ed in place: the link or rename was the body's last change.
        let md = match &p.body {
            Body::Unnamed(f, _) => f.metadata(),
            Body::Named(_) => fs::symlink_metadata(&dest),
        };
        if let Ok(md) = md {
            out.signed.push((md, sigs));
        }
    }
    if drop_cache
        && p.item.kind == Kind::File
        && let Body::Unnamed(f, _) = p.body
    {
        out.to_uncache.push(f);
    }
    if p.had_meta {
        let _ = fs::remove_file(session_dir.join(staged_name("m", &p.item.path)));
    }
    touch_parent(&mut out.changes, &p.item.path);
    out.changes.changes.push((p.item.path.clone(), action));
    let dir = site.root.join(parent(&p.item.path));
    out.changes.upserts.push(p.item);
    out.items += 1;
    Some(dir)
}

/// The renames become durable with their directories: one more syncfs (it writes every
/// directory of the package at once; a fsync per directory waits for each in turn), or
/// a fsync of each directory.
fn sync_dirs(root: &Path, dirs: &HashSet<PathBuf>, durability: Durability) -> io::Result<()> {
    match durability {
        Durability::None => Ok(()),
        Durability::Syncfs if dirs.is_empty() => Ok(()),
        Durability::Syncfs => syncfs(root),
        Durability::Fsync => dirs.iter().try_for_each(|d| match File::open(d) {
            Ok(f) => f.sync_all(),
            // Deleted by a later entry of the package (a subtree deleted deepest
            // first): its own removal is in its parent, which is synced too.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }),
    }
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
pub(super) fn uncache_named(publish: &[Publish]) {
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
pub(super) fn link_into_place(
    f: &File,
    dir: &OwnedFd,
    dest: &Path,
    session_dir: &Path,
    path: &str,
) -> io::Result<ChangeAction> {
    let name = path.rsplit_once('/').map_or(path, |(_, n)| n);
    match link_unnamed_at(f, dir.as_fd(), name) {
        Ok(()) => return Ok(ChangeAction::Created),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if fs::symlink_metadata(dest)?.is_dir() {
        fs::remove_dir_all(dest)?;
        link_unnamed(f, dest)?;
        return Ok(ChangeAction::Updated);
    }
    let tmp = session_dir.join(staged_name("f", path));
    let _ = fs::remove_file(&tmp);
    link_unnamed(f, &tmp)?;
    fs::rename(&tmp, dest).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    Ok(ChangeAction::Updated)
}

/// Puts a named staged item in place (a directory in the way is removed first).
pub(super) fn rename_into_place(tmp: &Path, dest: &Path) -> io::Result<ChangeAction> {
    let action = match fs::symlink_metadata(dest) {
        Ok(md) if md.is_dir() => {
            fs::remove_dir_all(dest)?;
            ChangeAction::Updated
        }
        Ok(_) => ChangeAction::Updated,
        Err(e) if e.kind() == io::ErrorKind::NotFound => ChangeAction::Created,
        Err(e) => return Err(e),
    };
    fs::rename(tmp, dest)?;
    Ok(action)
}

/// Undoes the visible effects of a package that ran out of space: none of its files is
/// published. Bodies that began in an earlier package keep their staged data and
/// metadata, so the resent package completes them.
pub(super) fn discard_for_retry(publish: Vec<Publish>, mut out: Applied) -> Applied {
    for p in publish.into_iter().filter(|p| !p.had_meta) {
        p.body.remove();
    }
    out.changes = PackageChanges::default();
    out.items = 0;
    out.bytes = 0;
    out
}

pub(super) fn touch_parent(ch: &mut PackageChanges, path: &str) {
    let p = parent(path);
    if !p.is_empty() && ch.touched_dirs.last().map(String::as_str) != Some(p) {
        ch.touched_dirs.push(p.to_string());
    }
}

/// Makes a package's staged files durable: the named files in `files` (bodies still in
/// progress, sidecars, named bodies) and the unnamed bodies about to be published.
pub(super) fn sync_batch(
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

/// Gives the site root the source root's mode and mtime (after everything inside it
/// changed, as its mtime would move otherwise).
pub fn set_root_meta(root: &Path, mode: u32, mtime_ns: i64) -> io::Result<()> {
    if mode != 0 {
        fs::set_permissions(root, fs::Permissions::from_mode(mode & 0o7777))?;
    }
    set_mtime(root, mtime_ns)
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
