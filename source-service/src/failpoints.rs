//! Fault injection for tests of the recovery paths, off unless its environment
//! variable is set. `CMS_MIRROR_FAILPOINT_CORRUPT_SEQ=N` flips one payload byte of
//! package N after it was sealed, the first time it is sent (a corruption on the wire).

use std::sync::atomic::{AtomicBool, Ordering};

use cms_mirror::pb;

static CORRUPTED: AtomicBool = AtomicBool::new(false);

pub fn maybe_corrupt(pkg: &mut pb::Package) {
    let Some(seq) = std::env::var("CMS_MIRROR_FAILPOINT_CORRUPT_SEQ")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    if pkg.seq == seq && !pkg.payload.is_empty() && !CORRUPTED.swap(true, Ordering::SeqCst) {
        let mut v = pkg.payload.to_vec();
        let i = v.len() / 2;
        v[i] ^= 0x5a;
        pkg.payload = v.into();
        tracing::warn!(seq, "failpoint: corrupted a package after sealing");
    }
}
