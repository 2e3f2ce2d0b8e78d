//! Jobs that start by themselves: a channel's cron schedule (offset by a delay chosen
//! once per installation and stored), and the watch trigger (a change under an fs
//! channel's source directory, or a publish, unpublish, move or delete in a wagtail
//! channel's CMS, starts an incremental job after a quiet period).
//!
//! A schedule slot fires once across every instance sharing the store: the instance
//! that advances the channel's stored last slot (compare-and-set) queues the job. A
//! slot missed while no instance ran is run once at start, not once per missed slot.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use notify::Watcher;
use tokio::sync::{mpsc, watch};

use cms_mirror::config::ChannelConfig;
use cms_mirror::pb;

use crate::{App, SourceService};

/// The store key of the installation's random draw (0..1_000_000).
pub const SEED_KEY: &str = "schedule_seed";

/// Starts a task per scheduled or watched channel.
pub async fn start(app: Arc<App>, shutdown: watch::Receiver<bool>) {
    let seed = match app
        .store
        .init_setting(SEED_KEY, &fastrand::u64(0..1_000_000).to_string())
        .await
    {
        Ok(v) => v.parse::<u64>().unwrap_or(0),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the schedule offset; schedules use none");
            0
        }
    };
    for ch in app.config().channels.clone() {
        if let Some(expr) = &ch.schedule {
            let cron = match cms_mirror::config::parse_cron(expr) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(channel = %ch.name, error = %e, "schedule ignored");
                    continue;
                }
            };
            let offset = offset(seed, ch.schedule_spread);
            tracing::info!(channel = %ch.name, schedule = %expr, offset_ms = offset.as_millis() as u64, "schedule active");
            tokio::spawn(schedule_loop(
                app.clone(),
                ch.clone(),
                cron,
                offset,
                shutdown.clone(),
            ));
        }
        if ch.watch && ch.pages.is_some() {
            tokio::spawn(cms_watch_loop(app.clone(), ch.clone(), shutdown.clone()));
        } else if ch.watch {
            tokio::spawn(watch_loop(app.clone(), ch.clone(), shutdown.clone()));
        }
    }
}

/// This installation's offset for a channel: the stored draw scaled to its spread (so a
/// changed spread rescales the offset instead of drawing a new one).
pub fn offset(seed: u64, spread: Duration) -> Duration {
    Duration::from_millis((spread.as_millis() as u64).saturating_mul(seed) / 1_000_000)
}

fn slot_after(cron: &croner::Cron, t: DateTime<Utc>, offset: TimeDelta) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&(t - offset), false)
        .ok()
        .map(|s| s + offset)
}

fn slot_at_or_before(
    cron: &croner::Cron,
    t: DateTime<Utc>,
    offset: TimeDelta,
) -> Option<DateTime<Utc>> {
    cron.find_previous_occurrence(&(t - offset), true)
        .ok()
        .map(|s| s + offset)
}

async fn queue(app: &Arc<App>, ch: &ChannelConfig, trigger: pb::Trigger, who: String) {
    let svc = SourceService::new(app.clone());
    let req = pb::StartJobRequest {
        channel: ch.name.clone(),
        trigger: trigger as i32,
        requested_by: who,
        ..Default::default()
    };
    match svc.start_job(req).await {
        Ok(r) => {
            tracing::info!(channel = %ch.name, job = %r.job_id, coalesced = r.coalesced, trigger = ?trigger, "job triggered")
        }
        Err(e) => {
            tracing::error!(channel = %ch.name, error = %e, "cannot queue a triggered job")
        }
    }
}

async fn schedule_loop(
    app: Arc<App>,
    ch: ChannelConfig,
    cron: croner::Cron,
    offset: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let off = TimeDelta::from_std(offset).unwrap_or_default();
    let key = format!("schedule_last:{}", ch.name);
    let who = format!("scheduler@{}", app.instance_id);
    // The slot due most recently; on a new installation it counts as done.
    let now = Utc::now();
    let due = slot_at_or_before(&cron, now, off).map(|t| t.timestamp_millis());
    let mut last: i64 = match app
        .store
        .init_setting(&key, &due.unwrap_or(0).to_string())
        .await
    {
        Ok(v) => v.parse().unwrap_or(0),
        Err(e) => {
            tracing::error!(channel = %ch.name, error = %e, "schedule disabled: cannot read its state");
            return;
        }
    };
    if let Some(due) = due
        && due > last
    {
        // Missed while down: once, now.
        tracing::info!(channel = %ch.name, missed_slot = due, "running a missed schedule slot");
        if fire(&app, &ch, &key, last, due, &format!("{who} (missed slot)")).await {
            last = due;
        }
    }
    loop {
        let now = Utc::now();
        let Some(next) = slot_after(
            &cron,
            now.max(DateTime::from_timestamp_millis(last).unwrap_or(now)),
            off,
        ) else {
            tracing::warn!(channel = %ch.name, "schedule has no next occurrence");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        let slot = next.timestamp_millis();
        if fire(&app, &ch, &key, last, slot, &who).await {
            last = slot;
        } else if let Ok(Some(v)) = app.store.get_setting(&key).await {
            // Another instance fired it.
            last = v.parse().unwrap_or(slot);
        } else {
            last = slot;
        }
    }
}

/// Claims a slot (compare-and-set of the channel's last slot) and queues its job.
async fn fire(
    app: &Arc<App>,
    ch: &ChannelConfig,
    key: &str,
    last: i64,
    slot: i64,
    who: &str,
) -> bool {
    match app
        .store
        .swap_setting(key, &last.to_string(), &slot.to_string())
        .await
    {
        Ok(true) => {
            queue(app, ch, pb::Trigger::Schedule, who.to_string()).await;
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::error!(channel = %ch.name, error = %e, "cannot claim a schedule slot");
            false
        }
    }
}

/// The watch trigger of a wagtail channel: the CMS's database is polled (a few
/// aggregate queries, [`cms_mirror::wagtail::WagtailDb::fingerprint`]) and once it has
/// changed and then stayed the same for `watch_quiet`, an incremental job is queued.
/// No plugin in the CMS.
async fn cms_watch_loop(app: Arc<App>, ch: ChannelConfig, mut shutdown: watch::Receiver<bool>) {
    let Some(pages) = ch.pages.clone() else {
        return;
    };
    let poll = (ch.watch_quiet / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut cms: Option<cms_mirror::wagtail::WagtailDb> = None;
    let mut seen: Option<String> = None;
    let mut changed = false;
    tracing::info!(channel = %ch.name, poll_ms = poll.as_millis() as u64, quiet_ms = ch.watch_quiet.as_millis() as u64, "watching the CMS for publishes");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {},
            _ = shutdown.changed() => return,
        }
        if cms.is_none() {
            match cms_mirror::wagtail::WagtailDb::open(pages.url.expose()).await {
                Ok(w) => cms = Some(w),
                Err(e) => {
                    tracing::warn!(channel = %ch.name, error = %e, "cannot watch the CMS; trying again");
                    continue;
                }
            }
        }
        let now = match cms.as_ref().expect("opened").fingerprint().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(channel = %ch.name, error = %e, "cannot read the CMS's state");
                cms = None;
                continue;
            }
        };
        match &seen {
            None => {}
            Some(before) if *before != now => changed = true,
            Some(_) if changed => {
                // The same for a poll after a change: quiet once it stays so.
                tokio::time::sleep(ch.watch_quiet.saturating_sub(poll)).await;
                match cms.as_ref().expect("opened").fingerprint().await {
                    Ok(again) if again == now => {
                        changed = false;
                        queue(&app, &ch, pb::Trigger::Watch, "watch".into()).await;
                    }
                    Ok(again) => {
                        seen = Some(again);
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            Some(_) => {}
        }
        seen = Some(now);
    }
}

async fn watch_loop(app: Arc<App>, ch: ChannelConfig, mut shutdown: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !ev.kind.is_access()
        {
            let _ = tx.try_send(());
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(channel = %ch.name, error = %e, "cannot watch the source directory");
            return;
        }
    };
    if let Err(e) = watcher.watch(&ch.source, notify::RecursiveMode::Recursive) {
        tracing::error!(channel = %ch.name, source = %ch.source.display(), error = %e, "cannot watch the source directory");
        return;
    }
    tracing::info!(channel = %ch.name, source = %ch.source.display(), quiet_ms = ch.watch_quiet.as_millis() as u64, "watching for changes");
    loop {
        tokio::select! {
            r = rx.recv() => if r.is_none() { return },
            _ = shutdown.changed() => return,
        }
        // Debounce: wait until the tree has been quiet for the whole period.
        while tokio::time::timeout(ch.watch_quiet, rx.recv())
            .await
            .is_ok()
        {}
        queue(&app, &ch, pb::Trigger::Watch, "watch".into()).await;
    }
}
