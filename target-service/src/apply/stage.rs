//! Staging a package: each entry checked and written (directories in place, bodies as
//! unnamed or staged files), nothing visible yet except directories and deletions.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cms_mirror::config::Links;
use cms_mirror::model::{ChangeAction, ErrorCode, Item, Kind, parent};
use cms_mirror::pathsafe;
use cms_mirror::pb;

use super::body::{
    OpenFile, SessionFiles, WholeFile, create_body, data, staged_body, take_whole_body,
    write_wholes,
};
use super::pathcheck::{DestDirs, Normalisation, check_parents, check_parents_cached, remove_any};
use super::publish::{discard_for_retry, touch_parent};
use super::unix::{file_time, link_unnamed, set_symlink_mtime};
use super::writer::{BodyWriter, Deferred, Digest};
use super::{Applied, Body, Publish, SiteFs, io_item_error, item_error, staged_name};

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
    if let Err(e) = fs::create_dir_all(&sess.dir) {
        // Nothing of the package can be applied: each of its items says so.
        let what = format!("cannot create the staging directory {}", sess.dir.display());
        let errors = payload
            .entries
            .iter()
            .filter_map(|entry| match &entry.op {
                Some(pb::entry::Op::Put(m)) => Some(m.path.as_str()),
                Some(pb::entry::Op::Delete(d)) => Some(d.path.as_str()),
                _ => None,
            })
            .map(|path| io_item_error(path, &what, &e))
            .collect();
        let out = Applied {
            errors,
            ..Applied::default()
        };
        return Staged::empty(sess.dir.clone(), out);
    }
    let mut st = Stager {
        site,
        sess,
        max_path,
        out: Applied::default(),
        publish: Vec::new(),
        to_sync: Vec::new(),
        dirs_to_sync: HashSet::new(),
        seen: HashSet::new(),
        parents_ok: HashSet::new(),
        normalised: Normalisation::default(),
        dirs: DestDirs::default(),
        wholes: Vec::new(),
        deferred: Vec::new(),
    };
    let mut entries = payload.entries.into_iter().peekable();
    while let Some(entry) = entries.next() {
        match entry.op {
            Some(pb::entry::Op::Put(meta)) => st.put(meta, &mut entries),
            Some(pb::entry::Op::Data(d)) => st.data(d),
            Some(pb::entry::Op::Delete(d)) => st.delete(d.path),
            Some(pb::entry::Op::Abort(a)) => st.abort(a.path),
            None => {}
        }
        if st.out.no_space || st.out.not_written {
            break;
        }
    }
    if !st.out.no_space && !st.out.not_written {
        st.write_wholes();
    }
    if !st.out.no_space && !st.out.not_written {
        st.write_sidecars();
    }
    st.into_staged()
}

/// A package being staged.
struct Stager<'a> {
    site: &'a SiteFs,
    sess: &'a mut SessionFiles,
    max_path: usize,
    out: Applied,
    publish: Vec<Publish>,
    to_sync: Vec<PathBuf>,
    dirs_to_sync: HashSet<PathBuf>,
    /// Paths put by this package (a second put of one is refused).
    seen: HashSet<String>,
    parents_ok: HashSet<String>,
    normalised: Normalisation,
    dirs: DestDirs,
    /// Files whose whole body follows their put, written together at the end.
    wholes: Vec<WholeFile>,
    deferred: Vec<Deferred>,
}

impl Stager<'_> {
    /// Refuses an item (and the rest of its body in this package).
    fn refuse(&mut self, path: String, code: ErrorCode, why: impl Into<String>) {
        self.out.errors.push(item_error(&path, code, why, false));
        self.sess.failed.insert(path);
    }

    /// Checks a put's path and metadata: the item, or `None` once refused.
    fn checked(&mut self, meta: &pb::ItemMeta) -> Option<Item> {
        let path = meta.path.clone();
        if let Err(e) = pathsafe::validate_file(&path, self.max_path) {
            self.refuse(path, ErrorCode::InvalidPath, e.to_string());
            return None;
        }
        if !self.seen.insert(path.clone()) {
            // Its chunks must not land on the first occurrence's file.
            self.refuse(
                path,
                ErrorCode::InvalidPath,
                "duplicate path in one package",
            );
            return None;
        }
        let Some(item) = Item::from_pb(meta) else {
            self.refuse(path, ErrorCode::InvalidArgument, "unknown item kind");
            return None;
        };
        if item.mode > 0o7777 {
            let why = format!("mode {:o} out of range", item.mode);
            self.refuse(path, ErrorCode::InvalidArgument, why);
            return None;
        }
        if item.kind == Kind::Symlink && pathsafe::link_leaves_root(&path, &item.link) {
            match self.site.links {
                Links::Copy => {}
                Links::Skip => {
                    tracing::debug!(%path, link = %item.link, "link leaving the site skipped");
                    return None;
                }
                Links::Safe => {
                    let why = format!(
                        "symbolic link to {:?} leaves the site (the site's links = \"safe\"; \"copy\" mirrors it, \"skip\" leaves it out)",
                        item.link
                    );
                    self.refuse(path, ErrorCode::UnsafeLink, why);
                    return None;
                }
            }
        }
        let root = &self.site.root;
        if let Err(m) = check_parents_cached(root, &path, &mut self.parents_ok)
            .and_then(|()| self.normalised.check(root, &path))
        {
            self.refuse(path, ErrorCode::InvalidPath, m.to_string());
            return None;
        }
        self.sess.failed.remove(&path);
        Some(item)
    }

    fn put(
        &mut self,
        meta: pb::ItemMeta,
        entries: &mut std::iter::Peekable<impl Iterator<Item = pb::Entry>>,
    ) {
        if meta.kind == pb::ItemKind::Page as i32 {
            return self.put_page(&meta);
        }
        let Some(item) = self.checked(&meta) else {
            return;
        };
        if let Some(data) = take_whole_body(&item, entries) {
            if let Some(of) = self.sess.open.remove(&item.path) {
                of.remove();
            }
            self.wholes.push(WholeFile { item, data });
            return;
        }
        let path = item.path.clone();
        let put = match item.kind {
            Kind::Dir => self.put_dir(item),
            Kind::Symlink => self.put_symlink(item),
            Kind::File => self.put_file(item),
            Kind::Page => unreachable!("pages are put by put_page"),
        };
        if let Err(e) = put {
            let err = io_item_error(&path, "cannot write", &e);
            self.out.no_space = ErrorCode::NoSpace.is(&err.code);
            self.out.errors.push(err);
            if !self.out.no_space {
                self.sess.failed.insert(path);
            }
        }
    }

    /// A page goes to the page store with the package's ledger row.
    fn put_page(&mut self, meta: &pb::ItemMeta) {
        let path = meta.path.clone();
        match super::page::checked(meta, self.max_path) {
            Err((code, why)) => self.refuse(path, code, why),
            Ok(_) if !self.seen.insert(path.clone()) => {
                self.refuse(
                    path,
                    ErrorCode::InvalidPath,
                    "duplicate path in one package",
                );
            }
            Ok((item, row)) => {
                self.out.changes.upserts.push(item);
                self.out.changes.pages.push(row);
                self.out.items += 1;
            }
        }
    }

    /// Creates (or keeps) a directory in place at once, with the item's mode.
    fn put_dir(&mut self, item: Item) -> io::Result<()> {
        self.dirs.clear();
        let dest = self.site.root.join(&item.path);
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
        let out = &mut self.out;
        touch_parent(&mut out.changes, &item.path);
        out.changes.changes.push((item.path.clone(), action));
        out.changes.touched_dirs.push(item.path.clone());
        out.changes.upserts.push(item);
        out.items += 1;
        Ok(())
    }

    /// Stages a symlink under a name, for its rename at publish.
    fn put_symlink(&mut self, item: Item) -> io::Result<()> {
        let tmp = self.sess.dir.join(staged_name("l", &item.path));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&item.link, &tmp)?;
        set_symlink_mtime(&tmp, item.mtime_ns)?;
        self.publish.push(Publish {
            body: Body::Named(tmp),
            item,
            had_meta: false,
            late: None,
            sigs: None,
        });
        Ok(())
    }

    /// Creates a file's body: open for its chunks, or (empty) ready to publish.
    fn put_file(&mut self, mut item: Item) -> io::Result<()> {
        let sess = &mut *self.sess;
        if let Some(of) = sess.open.remove(&item.path) {
            of.remove();
        }
        let (file, tmp, dir) = create_body(self.site, &sess.dir, &mut self.dirs, &item)?;
        if item.size > 0 {
            let path = item.path.clone();
            let digest = Some(Digest::new(item.size, &sess.sigcache));
            let of = OpenFile {
                meta: item,
                file,
                tmp,
                dir,
                digest,
                next_offset: 0,
                meta_written: false,
                writes: None,
                basis: None,
                basis_sigs: None,
            };
            sess.open.insert(path, of);
            return Ok(());
        }
        let expected = blake3::hash(b"").to_hex().to_string();
        if item.hash.as_ref().is_some_and(|h| h != &expected) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hash of an empty file does not match",
            ));
        }
        let t = file_time(item.mtime_ns);
        filetime::set_file_handle_times(&file, Some(t), Some(t))?;
        item.hash = Some(expected);
        self.to_sync.extend(tmp.clone());
        self.publish.push(Publish {
            body: staged_body(file, tmp, dir),
            item,
            had_meta: false,
            late: None,
            sigs: None,
        });
        Ok(())
    }

    fn data(&mut self, d: pb::FileData) {
        if self.sess.failed.contains(&d.path) {
            return;
        }
        let path = d.path.clone();
        let sess = &mut *self.sess;
        match data(
            self.site,
            sess,
            d,
            &mut self.publish,
            &mut self.deferred,
            &mut self.out,
        ) {
            Ok(Some(tmp)) => self.to_sync.push(tmp),
            Ok(None) => {}
            Err(e) if ErrorCode::NoSpace.is(&e.code) => {
                // Keep what was staged: the package comes again once there is space,
                // and its chunks are written at their offsets.
                self.out.errors.push(e);
                self.out.no_space = true;
            }
            Err(e) if ErrorCode::BasisChanged.is(&e.code) => {
                // The package comes again with the file whole (what its earlier packages
                // brought was copied from the basis as it was, and stays).
                self.out.errors.push(e);
                self.out.not_written = true;
            }
            Err(e) => {
                self.out.errors.push(e);
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

    fn delete(&mut self, path: String) {
        self.dirs.clear();
        let root = &self.site.root;
        if let Err(e) = pathsafe::validate(&path, self.max_path) {
            let err = item_error(&path, ErrorCode::InvalidPath, e.to_string(), false);
            self.out.errors.push(err);
            return;
        }
        if pathsafe::is_page_key(&path) {
            // The page store drops it with the package's ledger row.
            self.out.changes.deletes.push(path.clone());
            self.out.changes.changes.push((path, ChangeAction::Deleted));
            self.out.items += 1;
            return;
        }
        if let Err(m) = check_parents(root, &path) {
            // A missing parent means the item is already gone.
            if !m.parent_missing() {
                let err = item_error(&path, ErrorCode::InvalidPath, m.to_string(), false);
                self.out.errors.push(err);
                return;
            }
        } else if let Err(e) = remove_any(&root.join(&path)) {
            self.out
                .errors
                .push(io_item_error(&path, "cannot delete", &e));
            return;
        }
        self.dirs_to_sync.insert(root.join(parent(&path)));
        touch_parent(&mut self.out.changes, &path);
        self.out.changes.deletes.push(path.clone());
        self.out.changes.changes.push((path, ChangeAction::Deleted));
        self.out.items += 1;
    }

    /// A body the source gave up: what was staged of it goes, and later chunks of it
    /// (already packed) are dropped.
    fn abort(&mut self, path: String) {
        let sess = &mut *self.sess;
        if let Some(of) = sess.open.remove(&path) {
            of.remove();
        }
        // Also after a restart, when the body is known only by its sidecar.
        let _ = fs::remove_file(sess.dir.join(staged_name("f", &path)));
        let _ = fs::remove_file(sess.dir.join(staged_name("m", &path)));
        sess.failed.insert(path);
    }

    /// Writes the package's whole files (see [`write_wholes`]).
    fn write_wholes(&mut self) {
        let sess = &mut *self.sess;
        let wholes = std::mem::take(&mut self.wholes);
        let results = write_wholes(
            self.site,
            &sess.dir,
            wholes,
            &sess.sigcache,
            &mut sess.writer,
            &mut sess.helpers,
        );
        for r in results {
            match r {
                Ok((p, direct)) => {
                    self.out.bytes += p.item.size;
                    self.out.bytes_direct += direct;
                    if let Body::Named(tmp) = &p.body {
                        self.to_sync.push(tmp.clone());
                    }
                    self.publish.push(p);
                }
                Err((path, e)) => {
                    // Out of space, the package is sent again as a whole.
                    if ErrorCode::NoSpace.is(&e.code) {
                        self.out.no_space = true;
                    } else {
                        sess.failed.insert(path);
                    }
                    self.out.errors.push(e);
                }
            }
        }
    }

    /// Files continuing in a later package: their metadata is kept beside the staged
    /// body so a restarted target can finish them when the next chunk arrives.
    fn write_sidecars(&mut self) {
        let sess = &mut *self.sess;
        for (path, of) in sess.open.iter_mut().filter(|(_, of)| !of.meta_written) {
            let meta_path = sess.dir.join(staged_name("m", path));
            let written = (|| {
                if of.tmp.is_none() {
                    let tmp = sess.dir.join(staged_name("f", path));
                    let _ = fs::remove_file(&tmp);
                    link_unnamed(&of.file, &tmp)?;
                    self.to_sync.push(tmp.clone());
                    of.tmp = Some(tmp);
                }
                fs::write(&meta_path, serde_json::to_vec(&of.meta).unwrap_or_default())
            })();
            match written {
                Ok(()) => {
                    of.meta_written = true;
                    self.to_sync.push(meta_path);
                }
                Err(e) => {
                    let err = io_item_error(path, "cannot write staging metadata", &e);
                    self.out.no_space |= ErrorCode::NoSpace.is(&err.code);
                    self.out.errors.push(err);
                }
            }
        }
    }

    /// The staged package; on a full disk or a changed basis, nothing of it to publish.
    fn into_staged(self) -> Staged {
        let sess = self.sess;
        if self.out.no_space || self.out.not_written {
            let out = discard_for_retry(self.publish, self.out);
            return Staged::empty(sess.dir.clone(), out);
        }
        Staged {
            publish: self.publish,
            to_sync: self.to_sync,
            dirs_to_sync: self.dirs_to_sync,
            session_dir: sess.dir.clone(),
            deferred_writer: (!self.deferred.is_empty()).then(|| sess.deferred_writer.clone()),
            deferred: self.deferred,
            drop_cache: sess.drop_cache,
            out: self.out,
        }
    }
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
    // A site probe or trace file a crash left beside the staging directory.
    for e in fs::read_dir(&site.root)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{}-", pathsafe::STAGING_DIR)) {
            remove_any(&e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}
