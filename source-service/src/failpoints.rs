//! Fault injection for tests of the recovery paths, off unless its environment
//! variable is set. `CMS_MIRROR_FAILPOINT_CORRUPT_SEQ=N` flips one payload byte of
//! package N after it was sealed, the first time it is sent (a corruption on the wire);
//! `CMS_MIRROR_FAILPOINT_CORRUPT_TIMES=K` does so the first K times (default 1).
//! `CMS_MIRROR_FAILPOINT_CHANGE=PATH:K` appends a byte to the source file PATH (relative
//! to the channel's source) while it is being read, the first K times it is read.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use cms_mirror::pb;

static CORRUPTED: AtomicU32 = AtomicU32::new(0);
static CHANGED: AtomicU32 = AtomicU32::new(0);
static WARNED: AtomicBool = AtomicBool::new(false);

fn warn_once() {
    if !WARNED.swap(true, Ordering::SeqCst) {
        tracing::warn!("failpoints are enabled (CMS_MIRROR_FAILPOINT_*); never in production");
    }
}

pub fn maybe_corrupt(pkg: &mut pb::Package) {
    let Some(seq) = std::env::var("CMS_MIRROR_FAILPOINT_CORRUPT_SEQ")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let times = std::env::var("CMS_MIRROR_FAILPOINT_CORRUPT_TIMES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1);
    warn_once();
    if pkg.seq == seq && !pkg.payload.is_empty() && CORRUPTED.fetch_add(1, Ordering::SeqCst) < times
    {
        let mut v = pkg.payload.to_vec();
        let i = v.len() / 2;
        v[i] ^= 0x5a;
        pkg.payload = v.into();
        tracing::warn!(seq, "failpoint: corrupted a package after sealing");
    }
}

pub fn maybe_change(source: &std::path::Path, path: &str) {
    let Ok(v) = std::env::var("CMS_MIRROR_FAILPOINT_CHANGE") else {
        return;
    };
    let Some((p, times)) = v.rsplit_once(':') else {
        return;
    };
    let times: u32 = times.parse().unwrap_or(1);
    warn_once();
    if p == path && CHANGED.fetch_add(1, Ordering::SeqCst) < times {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .open(source.join(path))
        {
            let _ = f.write_all(b"+");
            tracing::warn!(path, "failpoint: changed a file while it was read");
        }
    }
}

/// `CMS_MIRROR_FAILPOINT_KILL_AT=POINT:FILE`: the source kills itself with SIGKILL at
/// POINT of an atomic job (`prepared`: every target prepared, nothing decided;
/// `decided`: the decision recorded, no target told), once: FILE is created to say it
/// happened.
pub fn kill_at(point: &str) {
    let Ok(v) = std::env::var("CMS_MIRROR_FAILPOINT_KILL_AT") else {
        return;
    };
    let Some((at, marker)) = v.split_once(':') else {
        return;
    };
    warn_once();
    if at == point
        && std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(marker)
            .is_ok()
    {
        tracing::warn!(point, "failpoint: the source kills itself");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
