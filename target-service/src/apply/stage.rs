use super::body::{
    OpenFile, SessionFiles, WholeFile, create_body, data, staged_body, take_whole_body,
    write_wholes,
};
use super::pathcheck::{DestDirs, Normalisation, check_parents, check_parents_cached, remove_any};
use super::publish::{discard_for_retry, touch_parent};
use super::unix::{file_time, link_unnamed, set_symlink_mtime};
use super::writer::{BodyWriter, Deferred};
use super::{Applied, Body, Publish, SiteFs, io_item_error, item_error, staged_name};
use cms_mirror::model::{ChangeAction, ErrorCode, Item, Kind, parent};
use cms_mirror::pathsafe::{self};
use cms_mirror::pb;
use std::collections::HashSet;
use std::fs::{self};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A package whose bodies are written and verified in the staging directory but not yet
/// durable nor visible: [`publish`] finishes it, [`discard`] drops it.
///
/// The two halves let a target write package N+1 while package N is flushed and renamed
/// into place (the flush is I/O wait, the writing is CPU): see `handle_import`.
pub struct Staged {
    pub(super) publish: Vec<Publish>,
    pub(super) to_sync: Vec<PathBuf>,
    pub(super) dirs_to_sync: HashSet<PathBuf>,
    pub(super) session_dir: PathBuf,
    /// Chunks still to write, in the order they came, and the session's writer for them.
    pub(super) deferred: Vec<Deferred>,
    pub(super) deferred_writer: Option<Arc<Mutex<BodyWriter>>>,
    pub(super) drop_cache: bool,
    pub out: Applied,
}

impl Staged {
    pub(super) fn empty(session_dir: PathBuf, out: Applied) -> Staged {
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
                    out.errors.push(item_error(
                        &path,
                        ErrorCode::InvalidPath,
                        e.to_string(),
                        false,
                    ));
                    sess.failed.insert(path);
                    continue;
                }
                if !seen.insert(path.clone()) {
                    out.errors.push(item_error(
                        &path,
                        ErrorCode::InvalidPath,
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
                        ErrorCode::InvalidArgument,
                        "unknown item kind",
                        false,
                    ));
                    sess.failed.insert(path);
                    continue;
                };
                if item.mode > 0o7777 {
                    out.errors.push(item_error(
                        &path,
                        ErrorCode::InvalidArgument,
                        format!("mode {:o} out of range", item.mode),
                        false,
                    ));
                    sess.failed.insert(path);
                    continue;
                }
                if let Err(m) = check_parents_cached(&site.root, &path, &mut parents_ok)
                    .and_then(|()| normalised.check(&site.root, &path))
                {
                    out.errors
                        .push(item_error(&path, ErrorCode::InvalidPath, m, false));
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
                        if ErrorCode::NoSpace.is(&err.code) {
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
                    Err(e) if ErrorCode::NoSpace.is(&e.code) => {
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
                    out.errors.push(item_error(
                        &path,
                        ErrorCode::InvalidPath,
                        e.to_string(),
                        false,
                    ));
                    continue;
                }
                if let Err(m) = check_parents(&site.root, &path) {
                    // A missing parent means the item is already gone.
                    if !m.contains("No such file") {
                        out.errors
                            .push(item_error(&path, ErrorCode::InvalidPath, m, false));
                        continue;
                    }
                } else if let Err(e) = remove_any(&site.root.join(&path)) {
                    out.errors.push(io_item_error(&path, "cannot delete", &e));
                    continue;
                }
                dirs_to_sync.insert(site.root.join(parent(&path)));
                touch_parent(&mut out.changes, &path);
                out.changes.deletes.push(path.clone());
                out.changes.changes.push((path, ChangeAction::Deleted));
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
                    if ErrorCode::NoSpace.is(&e.code) {
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
                out.no_space |= ErrorCode::NoSpace.is(&err.code);
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

pub(super) fn put(
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
                Ok(md) if md.is_dir() => ChangeAction::Updated,
                Ok(_) => {
                    fs::remove_file(&dest)?;
                    fs::create_dir(&dest)?;
                    ChangeAction::Updated
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&dest)?;
                    ChangeAction::Created
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

/// Aborts a session: waits for an apply in progress (the caller holds the lock), drops
/// its open files and removes its staging directory, and the site's staging directory
/// when it is empty.
pub fn abort_session(site: &SiteFs, sess: &mut SessionFiles) {
    sess.aborted = true;
    sess.open.clear();
    let _ = fs::remove_dir_all(&sess.dir);
    let _ = fs::remove_dir(site.staging());
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
