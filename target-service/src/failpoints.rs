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
