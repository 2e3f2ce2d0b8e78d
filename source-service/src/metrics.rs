//! The source's metrics, served on `/metrics` with `--metrics-listen`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use cms_mirror::observe::{TargetLabels, labels};

type Counters = Family<TargetLabels, Counter>;

pub struct Metrics {
    registry: Registry,
    pub jobs: Counters,
    pub packages_sent: Counters,
    pub packages_acked: Counters,
    pub packages_retried: Counters,
    pub bytes_sent: Counters,
    pub bytes_acked: Counters,
    pub item_errors: Counters,
    pub hook_failures: Counters,
    pub reconnects: Counters,
    pub subscribers: Gauge,
    pub sync_lag: Family<TargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub target_health: Family<TargetLabels, Gauge>,
    pub target_lagging: Family<TargetLabels, Gauge>,
    pub bwlimit: Family<TargetLabels, Gauge>,
    pub throttled: Family<TargetLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub bytes_copied: Counters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mirror");
        let m = Metrics {
            registry: Registry::default(),
            jobs: Counters::default(),
            packages_sent: Counters::default(),
            packages_acked: Counters::default(),
            packages_retried: Counters::default(),
            bytes_sent: Counters::default(),
            bytes_acked: Counters::default(),
            item_errors: Counters::default(),
            hook_failures: Counters::default(),
            reconnects: Counters::default(),
            subscribers: Gauge::default(),
            sync_lag: Family::default(),
            target_health: Family::default(),
            target_lagging: Family::default(),
            bwlimit: Family::default(),
            throttled: Family::default(),
            bytes_copied: Counters::default(),
        };
        registry.register(
            "jobs",
            "Finished jobs by channel and outcome",
            m.jobs.clone(),
        );
        registry.register(
            "packages_sent",
            "Packages sent to a target (resends included)",
            m.packages_sent.clone(),
        );
        registry.register(
            "packages_acked",
            "Packages a target acknowledged as applied",
            m.packages_acked.clone(),
        );
        registry.register(
            "packages_retried",
            "Packages a target asked for again (checksum, disk full)",
            m.packages_retried.clone(),
        );
        registry.register(
            "bytes_sent",
            "Package payload bytes sent on the wire",
            m.bytes_sent.clone(),
        );
        registry.register(
            "bytes_acked",
            "Content bytes acknowledged by targets",
            m.bytes_acked.clone(),
        );
        registry.register(
            "item_errors",
            "Items that could not be mirrored",
            m.item_errors.clone(),
        );
        registry.register(
            "hook_failures",
            "Cache invalidation hooks of the targets that failed after a commit",
            m.hook_failures.clone(),
        );
        registry.register(
            "reconnects",
            "Broken target streams that were retried",
            m.reconnects.clone(),
        );
        registry.register(
            "event_subscribers",
            "Live WatchJobs subscribers",
            m.subscribers.clone(),
        );
        registry.register(
            "sync_lag_seconds",
            "Seconds since the last successful job per channel and target",
            m.sync_lag.clone(),
        );
        registry.register(
            "target_health",
            "1 for the status the last check found per channel and target (ok, unreachable, refused, misconfigured)",
            m.target_health.clone(),
        );
        registry.register(
            "target_lagging",
            "1 while a target's sync lag is over its channel's max_lag_secs",
            m.target_lagging.clone(),
        );
        registry.register(
            "bwlimit_bytes_per_second",
            "The rate a target's packages are held to (the lower of its bwlimit and the service's --bwlimit)",
            m.bwlimit.clone(),
        );
        registry.register(
            "throttled_seconds",
            "Time a target's packages waited for the bandwidth limit",
            m.throttled.clone(),
        );
        registry.register(
            "bytes_copied",
            "Bytes of changed files a target copied from its own earlier versions (delta transfer) instead of receiving them",
            m.bytes_copied.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn target(channel: &str, target: &str) -> TargetLabels {
        labels(&[("channel", channel), ("target", target)])
    }

    pub fn render(&self) -> String {
        cms_mirror::observe::render(&self.registry)
    }
}
