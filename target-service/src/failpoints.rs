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
