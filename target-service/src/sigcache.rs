//! Delta signatures of the bodies this target wrote, kept so that a delta transfer of a
//! large file does not read and cut its old version again (Syncthing keeps its block
//! hashes for the same reason). A body's signatures are cut as it is written, from the
//! bytes that are hashed anyway; GetSignatures answers from here when the file is still
//! that body, and otherwise reads it as before.
//!
//! A cached entry names its inode and holds the size, mtime and ctime it was recorded
//! with: any write, truncation, rename over it or change of its metadata changes the
//! ctime (which no one can set back), so a file changed behind the target's back is
//! read again rather than described by stale signatures. Bounded in bytes, least
//! recently used first out; kept in memory only, so a restarted target reads each
//! basis once again.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use cms_mirror::delta::ChunkSizes;
use cms_mirror::fswalk::mtime_ns;

/// Bodies smaller than this are not signed: a delta never copies from them (the least
/// `delta_min_bytes` a source takes).
pub const SIGN_MIN: u64 = cms_mirror::config::DEFAULT_DELTA_MIN_BYTES;

/// Default memory for cached signatures: about 12 bytes per chunk, so 64 MiB describe
/// some 90 GB of 64 MiB files.
pub const DEFAULT_BUDGET: u64 = 64 * 1024 * 1024;

/// The signatures of one body, as GetSignatures sends them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signatures {
    pub sizes: ChunkSizes,
    pub lengths: Vec<u32>,
    pub hashes: Vec<u64>,
}

impl Signatures {
    fn weight(&self) -> u64 {
        (self.lengths.len() * 12 + 64) as u64
    }
}

/// What a cached entry must still find on the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of(md: &Metadata) -> Stamp {
        Stamp {
            size: md.len(),
            mtime_ns: mtime_ns(md),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        }
    }
}

type Key = (u64, u64);

struct Entry {
    stamp: Stamp,
    sigs: Arc<Signatures>,
}

pub struct SigCache {
    budget: u64,
    inner: Mutex<(lru::LruCache<Key, Entry>, u64)>,
}

impl SigCache {
    /// A cache of at most `budget` bytes of signatures (0: none kept).
    pub fn new(budget: u64) -> SigCache {
        SigCache {
            budget,
            inner: Mutex::new((lru::LruCache::unbounded(), 0)),
        }
    }

    /// Records the signatures of the file `md` describes (stat'ed after it was put in
    /// place).
    pub fn put(&self, md: &Metadata, sigs: Signatures) {
        let weight = sigs.weight();
        // An empty body has no chunks to describe (and its answer is read in no time).
        if weight > self.budget || !md.is_file() || sigs.lengths.is_empty() {
            return;
        }
        let entry = Entry {
            stamp: Stamp::of(md),
            sigs: Arc::new(sigs),
        };
        let mut g = self.inner.lock().expect("signature cache lock");
        let (map, bytes) = &mut *g;
        if let Some(old) = map.put((md.dev(), md.ino()), entry) {
            *bytes -= old.sigs.weight();
        }
        *bytes += weight;
        while *bytes > self.budget {
            let Some((_, old)) = map.pop_lru() else { break };
            *bytes -= old.sigs.weight();
        }
    }

    /// The signatures with these chunk sizes of the file `md` describes, if they were
    /// recorded for exactly this version of it. A stale entry is dropped.
    pub fn get(&self, md: &Metadata, sizes: ChunkSizes) -> Option<Arc<Signatures>> {
        let key = (md.dev(), md.ino());
        let mut g = self.inner.lock().expect("signature cache lock");
        let (map, bytes) = &mut *g;
        let e = map.get(&key)?;
        if e.stamp == Stamp::of(md) {
            return (e.sigs.sizes == sizes).then(|| e.sigs.clone());
        }
        let old = map.pop(&key).expect("found above");
        *bytes -= old.sigs.weight();
        None
    }

    /// Bytes held.
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.inner.lock().expect("signature cache lock").1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sigs(n: usize) -> Signatures {
        Signatures {
            sizes: ChunkSizes::from_avg(4096).unwrap(),
            lengths: vec![4096; n],
            hashes: (0..n as u64).collect(),
        }
    }

    #[test]
    fn an_entry_answers_only_for_the_version_it_was_recorded_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let cache = SigCache::new(1 << 20);
        let md = std::fs::metadata(&path).unwrap();
        cache.put(&md, sigs(2));
        let avg = ChunkSizes::from_avg(4096).unwrap();
        assert_eq!(cache.get(&md, avg).unwrap().lengths.len(), 2);
        // Other chunk sizes: no answer, the entry stays.
        assert!(
            cache
                .get(&md, ChunkSizes::from_avg(8192).unwrap())
                .is_none()
        );
        assert!(cache.get(&md, avg).is_some());
        // Rewritten in place with its size and mtime put back: the ctime tells.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(&[2u8; 10]).unwrap();
        filetime::set_file_handle_times(
            &f,
            None,
            Some(filetime::FileTime::from_last_modification_time(&md)),
        )
        .unwrap();
        drop(f);
        let now = std::fs::metadata(&path).unwrap();
        assert_eq!((now.len(), mtime_ns(&now)), (md.len(), mtime_ns(&md)));
        assert!(cache.get(&now, avg).is_none());
        assert_eq!(cache.bytes(), 0, "the stale entry is dropped");
    }

    #[test]
    fn the_least_recently_used_go_first_when_the_budget_is_spent() {
        let dir = tempfile::tempdir().unwrap();
        let avg = ChunkSizes::from_avg(4096).unwrap();
        let mds: Vec<Metadata> = (0..3)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, [i as u8]).unwrap();
                std::fs::metadata(&p).unwrap()
            })
            .collect();
        let one = sigs(100).weight();
        let cache = SigCache::new(2 * one);
        cache.put(&mds[0], sigs(100));
        cache.put(&mds[1], sigs(100));
        assert!(cache.get(&mds[0], avg).is_some());
        cache.put(&mds[2], sigs(100));
        assert!(cache.get(&mds[0], avg).is_some());
        assert!(
            cache.get(&mds[1], avg).is_none(),
            "the least recently used went"
        );
        assert!(cache.get(&mds[2], avg).is_some());
        assert_eq!(cache.bytes(), 2 * one);
        // More than the whole budget is not kept at all.
        cache.put(&mds[1], sigs(1000));
        assert!(cache.get(&mds[1], avg).is_none());
        assert_eq!(SigCache::new(0).bytes(), 0);
    }
}
