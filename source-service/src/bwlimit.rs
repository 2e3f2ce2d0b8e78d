//! Bandwidth limits: a pacer per target of a channel (`bwlimit`) and one for the whole
//! source service (`--bwlimit`). A package leaves only once the pacers admit it: each
//! books its bytes at the limit's rate after the end of the bytes booked before, so over
//! any window the bytes sent are at most the rate times the window plus one package (and
//! packages are kept to a fraction of a second's worth at the rate, see
//! [`package_bytes`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A rate limit shared by the streams it applies to.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    /// When the bytes booked so far have left at the rate.
    free_at: Mutex<Instant>,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Arc<Pacer> {
        Arc::new(Pacer {
            rate: bytes_per_sec.max(1),
            free_at: Mutex::new(Instant::now()),
        })
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Waits until `bytes` may go, and books them. Returns the time waited.
    pub async fn admit(&self, bytes: u64) -> Duration {
        let start = {
            let mut free_at = self.free_at.lock().expect("pacer lock");
            let now = Instant::now();
            // Time not used while idle is not saved up for a burst.
            let start = (*free_at).max(now);
            *free_at = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start
        };
        let waited = start.saturating_duration_since(Instant::now());
        tokio::time::sleep_until(start).await;
        waited
    }
}

/// Package size under a limit: at most an eighth of a second's worth at the rate (and
/// 64 KiB at least), so one package moves a 10-second window's count by ~1%.
pub fn package_bytes(package_bytes: usize, limit: Option<u64>) -> usize {
    match limit {
        Some(rate) => package_bytes.min(((rate / 8) as usize).max(64 * 1024)),
        None => package_bytes,
    }
}

/// Packages in flight under a limit: as many more as packages were cut smaller (up to
/// 64), so the bytes in flight, and the time the window lets acknowledgements lag, stay
/// what the channel's `window` gives at full size. With the count alone, 8 packages of
/// an eighth of a second each would stall the stream whenever acknowledgements lag
/// a second, and the time lost would not come back.
pub fn window(window: u32, package_bytes: usize, cut_to: usize) -> usize {
    let scaled = window as usize * package_bytes / cut_to.max(1);
    scaled.clamp(window as usize, MAX_WINDOW.max(window as usize))
}

/// The most packages a window under a limit holds.
const MAX_WINDOW: usize = 64;

/// The pacers of the targets of all channels, kept across jobs (a limit holds across
/// job boundaries too) and made again when a reloaded configuration changes the rate.
#[derive(Default)]
pub struct Pacers {
    by_target: Mutex<HashMap<(String, String), Arc<Pacer>>>,
}

impl Pacers {
    pub fn for_target(&self, channel: &str, target: &str, rate: u64) -> Arc<Pacer> {
        let mut m = self.by_target.lock().expect("pacers lock");
        let key = (channel.to_string(), target.to_string());
        match m.get(&key) {
            Some(p) if p.rate == rate => p.clone(),
            _ => {
                let p = Pacer::new(rate);
                m.insert(key, p.clone());
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pacer_lets_the_rate_through_and_no_more() {
        let p = Pacer::new(1_000_000);
        let t0 = Instant::now();
        for _ in 0..100 {
            p.admit(100_000).await;
        }
        // 10 MB at 1 MB/s: the last package may leave after 9.9 s.
        let took = t0.elapsed().as_secs_f64();
        assert!((9.85..9.95).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_is_not_saved_for_a_burst() {
        let p = Pacer::new(1_000_000);
        p.admit(1_000_000).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t0 = Instant::now();
        p.admit(500_000).await;
        p.admit(500_000).await;
        let took = t0.elapsed().as_secs_f64();
        assert!((0.45..0.55).contains(&took), "{took}");
    }

    #[test]
    fn packages_shrink_under_a_low_limit() {
        assert_eq!(package_bytes(4 << 20, None), 4 << 20);
        assert_eq!(package_bytes(4 << 20, Some(1 << 20)), 128 << 10);
        assert_eq!(package_bytes(4 << 20, Some(1000)), 64 << 10);
        assert_eq!(package_bytes(4 << 20, Some(1 << 30)), 4 << 20);
    }

    #[test]
    fn a_window_of_smaller_packages_holds_more_of_them() {
        assert_eq!(window(8, 4 << 20, 4 << 20), 8);
        assert_eq!(window(8, 1 << 20, 256 << 10), 32);
        assert_eq!(window(8, 4 << 20, 64 << 10), 64);
        assert_eq!(window(2, 4 << 20, 4 << 20), 2);
    }
}
