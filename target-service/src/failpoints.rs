//! Fault injection for tests, compiled only with the `failpoints` feature (never in a
//! release build): `CMS_MIRROR_FAILPOINT_*` variables make the target misbehave on cue.

/// Test failpoint `CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS=N`: every package waits N ms
/// before it is applied (a slow target disk), so tests can watch a job in flight.
pub async fn slow_apply() {
    static DELAY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        let ms = std::env::var("CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS")
            .ok()?
            .parse()
            .ok()?;
        tracing::warn!(
            ms,
            "failpoint: every package is delayed; never in production"
        );
        Some(ms)
    });
    if let Some(ms) = delay {
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}

/// Test failpoint `CMS_MIRROR_FAILPOINT_KILL_AT_SWITCH=FILE`: the target kills itself
/// with SIGKILL when the first switch arrives (between the phases of an atomic commit),
/// once: FILE is created to say it happened.
pub fn before_switch() {
    let Ok(marker) = std::env::var("CMS_MIRROR_FAILPOINT_KILL_AT_SWITCH") else {
        return;
    };
    let first = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
        .is_ok();
    if first {
        tracing::warn!("failpoint: killed at the switch; never in production");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// Test failpoint `CMS_MIRROR_FAILPOINT_CHANGE_BASIS=1`: once a file's signatures are
/// sent, its mtime moves on a second (as if another writer touched it), so the delta's
/// copies find their basis changed.
pub fn after_signatures(file: &std::fs::File) {
    if std::env::var_os("CMS_MIRROR_FAILPOINT_CHANGE_BASIS").is_none() {
        return;
    }
    let Ok(md) = file.metadata() else { return };
    let later = filetime::FileTime::from_unix_time(
        filetime::FileTime::from_last_modification_time(&md).unix_seconds() + 1,
        0,
    );
    tracing::warn!("failpoint: a delta's basis changed; never in production");
    let _ = filetime::set_file_handle_times(file, None, Some(later));
}
