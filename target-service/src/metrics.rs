//! The target's metrics, served on `/metrics` with `--metrics-listen`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use cms_mirror::observe::TargetLabels;

type Counters = Family<TargetLabels, Counter>;
type Histograms = Family<TargetLabels, Histogram, fn() -> Histogram>;

fn apply_buckets() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub packages_applied: Counters,
    pub packages_refused: Counters,
    pub bytes_applied: Counters,
    pub bytes_direct: Counters,
    pub item_errors: Counters,
    pub apply_seconds: Histograms,
    pub sessions_committed: Counters,
    pub sessions_expired: Counters,
    /// Packages that waited for room in the decode budget (all sites together).
    pub decode_waits: Counter,
    pub signatures_cached: Counters,
    pub signatures_read: Counters,
    /// Bodies signed as written, or not (all sites together).
    pub signing: crate::sigcache::SigningCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mirror_target");
        let m = Metrics {
            registry: Registry::default(),
            packages_applied: Counters::default(),
            packages_refused: Counters::default(),
            bytes_applied: Counters::default(),
            bytes_direct: Counters::default(),
            item_errors: Counters::default(),
            apply_seconds: Histograms::new_with_constructor(apply_buckets),
            sessions_committed: Counters::default(),
            sessions_expired: Counters::default(),
            decode_waits: Counter::default(),
            signatures_cached: Counters::default(),
            signatures_read: Counters::default(),
            signing: Default::default(),
        };
        registry.register(
            "packages_applied",
            "Packages verified, applied and recorded",
            m.packages_applied.clone(),
        );
        registry.register(
            "packages_refused",
            "Packages answered with retry or rejected (checksum, order, limits, disk full)",
            m.packages_refused.clone(),
        );
        registry.register(
            "bytes_applied",
            "File body bytes written",
            m.bytes_applied.clone(),
        );
        registry.register(
            "bytes_direct",
            "File body bytes written with direct I/O (past the page cache)",
            m.bytes_direct.clone(),
        );
        registry.register(
            "item_errors",
            "Items refused or failed while applying",
            m.item_errors.clone(),
        );
        registry.register(
            "apply_seconds",
            "Time to verify, apply, make durable and record one package",
            m.apply_seconds.clone(),
        );
        registry.register(
            "sessions_committed",
            "Committed sessions (jobs imported)",
            m.sessions_committed.clone(),
        );
        registry.register(
            "sessions_expired",
            "Open sessions closed after being idle past the session expiry",
            m.sessions_expired.clone(),
        );
        registry.register(
            "decode_waits",
            "Packages that waited for room in --max-decoded-bytes before they were decoded",
            m.decode_waits.clone(),
        );
        registry.register(
            "signatures_cached",
            "Delta signatures answered from the signatures kept of written bodies",
            m.signatures_cached.clone(),
        );
        registry.register(
            "signatures_read",
            "Delta signatures answered by reading the file and cutting it",
            m.signatures_read.clone(),
        );
        registry.register(
            "bodies_signed",
            "Written bodies cut for their delta signatures on the idle-priority signing thread",
            m.signing.signed.clone(),
        );
        registry.register(
            "bodies_unsigned",
            "Written bodies left unsigned because the signing thread was too far behind",
            m.signing.unsigned.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn site(site: &str) -> TargetLabels {
        cms_mirror::observe::labels(&[("site", site)])
    }

    pub fn render(&self) -> String {
        cms_mirror::observe::render(&self.registry)
    }
}
