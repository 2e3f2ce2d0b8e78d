//! The end of a session: commit (directory times, counts, hooks, tier push) or abort
//! (staged files dropped; what was applied stays applied).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cms_mirror::model::ChangeAction;
use cms_mirror::pb;

use crate::apply::{self, SessionFiles};
use crate::error::TargetError;
use crate::ledger::{SessionRow, SessionStatus};
use crate::{TargetService, hooks, metrics};

/// A session's files in progress. Staging holds `files`; publishing holds `publishing`,
/// whose flag says the session was aborted (so an abort waits for both halves of a
/// package in progress, and nothing is published after it).
pub(crate) struct SessionState {
    pub(crate) files: Mutex<SessionFiles>,
    pub(crate) publishing: Mutex<bool>,
    /// Import streams of the session in progress: a session with one is not idle.
    pub(crate) streams: AtomicUsize,
    /// Where it applies (the site's root, or its work area).
    pub(crate) fs: apply::SiteFs,
}

/// Counts an Import stream of a session while it lives.
pub(crate) struct StreamGuard(Arc<SessionState>);

impl StreamGuard {
    pub(crate) fn new(state: Arc<SessionState>) -> StreamGuard {
        state.streams.fetch_add(1, Ordering::SeqCst);
        StreamGuard(state)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TargetService {
    /// Commits (or, with `abort`, aborts) a session. A second commit of a committed
    /// session answers its counts again and runs no hook.
    pub(crate) async fn commit_session(
        &self,
        r: pb::CommitRequest,
    ) -> Result<pb::CommitResponse, TargetError> {
        let s = self.known_session(&r.session_id).await?;
        if r.abort {
            self.abort(&s).await?;
            return Ok(pb::CommitResponse::default());
        }
        match (s.atomic(), r.phase()) {
            (false, pb::CommitPhase::Unspecified) => self.commit_in_place(s, r).await,
            (true, pb::CommitPhase::Prepare) => self.prepare_generation(s, r).await,
            (true, pb::CommitPhase::Switch) => self.switch_generation(s, r).await,
            (true, _) => Err(TargetError::Publish(format!(
                "session {} publishes atomically: commit it in two phases (prepare, then switch)",
                s.id
            ))),
            (false, _) => Err(TargetError::Publish(format!(
                "session {} publishes in place: its commit has no phases",
                s.id
            ))),
        }
    }

    async fn commit_in_place(
        &self,
        s: SessionRow,
        r: pb::CommitRequest,
    ) -> Result<pb::CommitResponse, TargetError> {
        let first_commit = s.state != SessionStatus::Committed;
        if first_commit {
            self.finalize(&s, &r).await?;
        }
        let lineage = self.take_lineage(&s);
        let item_errors = if first_commit {
            self.resolve_pages(&s).await?
        } else {
            Vec::new()
        };
        let (created, updated, deleted) = self.inner.ledger.commit_session(&s.id, &s.site).await?;
        tracing::info!(session = %s.id, created, updated, deleted, "session committed");
        let mut hooks = Vec::new();
        if first_commit {
            self.write_trace(&s, self.site(&s.site)?.fs.clone(), &r.source_id, &lineage)
                .await;
            self.count_committed(&s);
            if r.run_hooks {
                let changes = async { Ok(self.inner.ledger.changes(&s.id).await?) };
                hooks = self.run_hooks(&s, changes, lineage).await?;
            }
        }
        Ok(pb::CommitResponse {
            items_created: created,
            items_updated: updated,
            items_deleted: deleted,
            hooks,
            item_errors,
            ..Default::default()
        })
    }

    pub(crate) fn take_lineage(&self, s: &SessionRow) -> Vec<String> {
        self.inner
            .lineages
            .lock()
            .expect("lineages lock")
            .remove(&s.id)
            .unwrap_or_default()
    }

    pub(crate) fn count_committed(&self, s: &SessionRow) {
        self.inner
            .metrics
            .sessions_committed
            .get_or_create(&metrics::Metrics::site(&s.site))
            .inc();
    }

    /// Notes the committed job in the trace file of the tree at `fs` (replaced whole, by a
    /// rename), for mirror checkers that read its age; a failure is logged, the commit
    /// stands.
    pub(crate) async fn write_trace(
        &self,
        s: &SessionRow,
        fs: apply::SiteFs,
        source: &str,
        lineage: &[String],
    ) {
        let text = format!(
            "date: {}\njob: {}\nchannel: {}\nsite: {}\nsource: {source}\ntarget: {}\nlineage: {}\n",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            s.job_id,
            s.channel,
            s.site,
            self.inner.settings.target_id,
            lineage.join(" "),
        );
        let written = tokio::task::spawn_blocking(move || fs.write_trace(&text)).await;
        if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
            tracing::warn!(site = %s.site, error = %e, "cannot write the trace file");
        }
    }

    /// Resolves the pages the session put and deleted (URLs, links); the problems found.
    pub(crate) async fn resolve_pages(
        &self,
        s: &SessionRow,
    ) -> Result<Vec<pb::ItemError>, TargetError> {
        let mut put = std::collections::HashSet::new();
        let mut deleted = Vec::new();
        for (path, action) in self.inner.ledger.page_changes(&s.id).await? {
            let Some(key) = cms_mirror::pathsafe::page_key(&path) else {
                continue;
            };
            match action {
                ChangeAction::Deleted => deleted.push(key.to_string()),
                _ => {
                    put.insert(key.to_string());
                }
            }
        }
        if put.is_empty() && deleted.is_empty() {
            return Ok(Vec::new());
        }
        let root = self
            .inner
            .settings
            .sites
            .iter()
            .find(|c| c.name == s.site)
            .map_or("/", |c| c.pages_root.as_str());
        let r = crate::pagestore::Resolver {
            site: s.key(),
            session: &s.id,
            root,
            put: &put,
            deleted: &deleted,
        };
        let errors = r.resolve(self.inner.ledger.db()).await?;
        if !errors.is_empty() {
            tracing::warn!(session = %s.id, errors = errors.len(), "pages that cannot be served as they are");
        }
        Ok(errors)
    }

    /// Drops a session's staged files, under its locks: an apply still running for a
    /// dropped stream finishes first, and no later package of this session is applied.
    async fn abort(&self, s: &SessionRow) -> Result<(), TargetError> {
        self.drop_staging(s).await?;
        self.inner.ledger.abort_session(&s.id).await?;
        if s.atomic() {
            // What was applied stays in the work area, which the next job goes on from;
            // the live generation was never touched.
            crate::generations::unprepare(self.inner.ledger.db(), &s.site).await?;
        }
        // Its state stays in memory, marked aborted, so that a package of a stream still
        // running is not applied after the abort.
        self.inner
            .lineages
            .lock()
            .expect("lineages lock")
            .remove(&s.id);
        tracing::info!(session = %s.id, "session aborted");
        Ok(())
    }

    async fn drop_staging(&self, s: &SessionRow) -> Result<(), TargetError> {
        let state = self.session_state(s)?;
        tokio::task::spawn_blocking(move || {
            let mut aborted = state.publishing.lock().expect("session publish lock");
            *aborted = true;
            let mut f = state.files.lock().expect("session files lock");
            apply::abort_session(&state.fs, &mut f);
        })
        .await
        .map_err(TargetError::task("abort"))?;
        Ok(())
    }

    /// Expires the open sessions idle past the session expiry (none with an Import
    /// stream in progress): staging removed, the times of the directories they touched
    /// restored. Returns how many expired.
    pub(crate) async fn expire_idle(&self) -> Result<usize, TargetError> {
        let expiry = self.inner.settings.session_expiry;
        let before = cms_mirror::now_ms() - expiry.as_millis() as i64;
        let mut n = 0;
        for s in self.inner.ledger.idle_sessions(before).await? {
            let streaming = self
                .inner
                .sessions
                .lock()
                .expect("sessions lock")
                .get(&s.id)
                .is_some_and(|st| st.streams.load(Ordering::SeqCst) > 0);
            let Ok(fs) = self.session_fs(&s) else {
                continue; // a site no longer served: its session waits for it
            };
            if streaming {
                continue;
            }
            let Some(dirs) = self.inner.ledger.expire_session(&s, before).await? else {
                continue;
            };
            self.drop_staging(&s).await?;
            // No stream runs (and none can start on an expired session): a reopened
            // session starts with fresh state.
            self.inner
                .sessions
                .lock()
                .expect("sessions lock")
                .remove(&s.id);
            self.inner
                .lineages
                .lock()
                .expect("lineages lock")
                .remove(&s.id);
            tokio::task::spawn_blocking(move || apply::restore_dir_times(&fs.root, &dirs))
                .await
                .map_err(TargetError::task("expire"))?;
            self.inner
                .metrics
                .sessions_expired
                .get_or_create(&metrics::Metrics::site(&s.site))
                .inc();
            tracing::info!(session = %s.id, job = %s.job_id, site = %s.site, idle_secs = expiry.as_secs(), "session expired");
            n += 1;
        }
        Ok(n)
    }

    /// Runs [`Self::expire_idle`] now (sessions left by a target that was down) and then
    /// every quarter of the expiry (at most every minute).
    pub(crate) fn spawn_expiry(&self) -> tokio::task::JoinHandle<()> {
        let svc = self.clone();
        let every = (svc.inner.settings.session_expiry / 4)
            .clamp(Duration::from_millis(250), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = svc.expire_idle().await {
                    tracing::warn!(error = %e, "cannot expire idle sessions");
                }
            }
        })
    }

    /// Checks that every package the source sent was applied, restores the times of
    /// the directories the session touched and removes its staging directory (and the
    /// site's, once nothing is in progress).
    pub(crate) async fn finalize(
        &self,
        s: &SessionRow,
        r: &pb::CommitRequest,
    ) -> Result<(), TargetError> {
        if s.last_seq as u64 != r.last_seq {
            return Err(TargetError::CommitMismatch {
                session: s.id.clone(),
                asked: r.last_seq,
                applied: s.last_seq,
            });
        }
        let root = r.root.as_ref();
        let dirs = self.inner.ledger.touched_dirs(&s.id, s.key()).await?;
        let fs = self.session_fs(s)?;
        let sdir = fs.session_dir(&s.id);
        let root = root.map(|r| (r.mode, r.mtime_ns));
        tokio::task::spawn_blocking(move || {
            apply::restore_dir_times(&fs.root, &dirs);
            let _ = std::fs::remove_dir_all(sdir);
            let _ = std::fs::remove_dir(fs.staging());
            // Last: removing the staging directory moved the root's time.
            if let Some((mode, mtime_ns)) = root
                && let Err(e) = apply::set_root_meta(&fs.root, mode, mtime_ns)
            {
                tracing::warn!(root = %fs.root.display(), error = %e, "cannot set the site root's mode and time");
            }
        })
        .await
        .map_err(TargetError::task("commit"))?;
        self.inner
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(&s.id);
        Ok(())
    }

    /// Runs the site's cache invalidation hooks with what changed (`files`, the paths in
    /// order, listed only when the site has hooks: a full mirror changes every path; and
    /// the pages the session changed), then its tier pushes (with this target added to
    /// the lineage).
    pub(crate) async fn run_hooks(
        &self,
        s: &SessionRow,
        files: impl std::future::Future<Output = Result<Vec<(String, ChangeAction)>, TargetError>>,
        mut lineage: Vec<String>,
    ) -> Result<Vec<pb::HookResult>, TargetError> {
        let Some(cfg) = self.inner.settings.sites.iter().find(|c| c.name == s.site) else {
            return Ok(Vec::new());
        };
        let mut results = Vec::new();
        if !cfg.hooks.is_empty() {
            let mut ch = hooks::Changes {
                job_id: s.job_id.clone(),
                channel: s.channel.clone(),
                site: s.site.clone(),
                base_url: cfg.base_url.clone(),
                created: Vec::new(),
                updated: Vec::new(),
                deleted: Vec::new(),
                pages: Vec::new(),
                parents: Vec::new(),
            };
            (ch.pages, ch.parents) =
                crate::pagestore::session_changes(self.inner.ledger.db(), s.key(), &s.id).await?;
            for (path, action) in files.await? {
                // Pages are not files of the site: no file URL names them.
                if cms_mirror::pathsafe::is_page_key(&path) {
                    continue;
                }
                match action {
                    ChangeAction::Created => ch.created.push(path),
                    ChangeAction::Updated => ch.updated.push(path),
                    ChangeAction::Deleted => ch.deleted.push(path),
                }
            }
            results = hooks::run_all(&cfg.hooks, &ch).await;
        }
        if !cfg.push.is_empty() {
            lineage.push(self.inner.settings.target_id.clone());
            for p in &cfg.push {
                results.push(hooks::push(p, &s.job_id, lineage.clone()).await);
            }
        }
        Ok(results)
    }
}
