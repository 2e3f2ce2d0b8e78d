//! Delta signatures of the bodies this target wrote, kept so that a delta transfer of a
//! large file does not read and cut its old version again (Syncthing keeps its block
//! hashes for the same reason). GetSignatures answers from here when the file is still
//! that body, and otherwise reads it as before.
//!
//! A body is cut as it is written, on one thread at idle priority (SCHED_IDLE) fed
//! the written bytes through a queue of at most [`QUEUE_BYTES`]: signing takes only CPU
//! the transfer leaves idle, all it needs behind a slow link and none a fast link's
//! transfer wants. A body whose bytes find the queue full is not signed (its next delta
//! reads it, as without a cache). Its signatures reach the cache when both the cut and
//! the body's placing are done, whichever comes last.
//!
//! A cached entry names its inode and holds the size, mtime and ctime it was recorded
//! with: any write, truncation, rename over it or change of its metadata changes the
//! ctime (which no one can set back), so a file changed behind the target's back is
//! read again rather than described by stale signatures. Bounded in bytes, least
//! recently used first out; kept in memory only, so a restarted target reads each
//! basis once again.

use std::fs::Metadata;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};

use bytes::Bytes;
use cms_mirror::delta::{ChunkSizes, SignSink};
use cms_mirror::fswalk::mtime_ns;
use prometheus_client::metrics::counter::Counter;

/// Bodies smaller than this are not signed: a delta never copies from them (the least
/// `delta_min_bytes` a source takes).
pub const SIGN_MIN: u64 = cms_mirror::config::DEFAULT_DELTA_MIN_BYTES;

/// Default memory for cached signatures: about 12 bytes per chunk, so 64 MiB describe
/// some 90 GB of 64 MiB files.
pub const DEFAULT_BUDGET: u64 = 64 * 1024 * 1024;

/// Written bytes waiting for the signing thread, at most: a body that would pass it is
/// not signed.
pub const QUEUE_BYTES: u64 = 16 * 1024 * 1024;

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

/// Bodies signed as written, and bodies not signed because the queue was full.
#[derive(Clone, Debug, Default)]
pub struct SigningCounters {
    pub signed: Counter,
    pub unsigned: Counter,
}

pub struct SigCache {
    budget: u64,
    inner: Mutex<(lru::LruCache<Key, Entry>, u64)>,
    /// To the signing thread (none without a budget).
    work: Option<mpsc::Sender<Work>>,
    /// Bytes sent to the signing thread and not yet cut.
    queued: Arc<AtomicU64>,
    counters: SigningCounters,
}

/// What the signing thread is given, each body's in the order it was written.
enum Work {
    Data(Ticket, Bytes),
    Known(Ticket, Arc<Signatures>, Range<usize>),
    Finish(Ticket),
    /// Answered once all work sent before it is done.
    #[cfg(test)]
    Settle(mpsc::SyncSender<()>),
}

/// A body's signatures on their way to the cache.
#[derive(Clone)]
pub struct Ticket(Arc<Mutex<Slot>>);

struct Slot {
    /// Cutting (none once abandoned or finished).
    sink: Option<SignSink>,
    /// Cut, the body not yet placed.
    done: Option<Signatures>,
    /// Placed, the cut not yet done.
    placed: Option<Metadata>,
}

impl SigCache {
    /// A cache of at most `budget` bytes of signatures (0: none kept, nothing signed).
    pub fn new(budget: u64, counters: SigningCounters) -> Arc<SigCache> {
        let queued = Arc::new(AtomicU64::new(0));
        Arc::new_cyclic(|cache: &Weak<SigCache>| {
            let work = (budget > 0).then(|| {
                let (tx, rx) = mpsc::channel();
                let (cache, queued) = (cache.clone(), queued.clone());
                std::thread::Builder::new()
                    .name("mirror-sign".into())
                    .spawn(move || sign_idle(rx, cache, queued))
                    .expect("a thread for signing");
                tx
            });
            SigCache {
                budget,
                inner: Mutex::new((lru::LruCache::unbounded(), 0)),
                work,
                queued,
                counters,
            }
        })
    }

    /// A body of `size` bytes to sign as it is written, if it is large enough to be a
    /// delta's basis and signatures are kept.
    pub fn signing(self: &Arc<Self>, size: u64) -> Option<Signing> {
        let work = self.work.clone().filter(|_| size >= SIGN_MIN)?;
        let sizes = ChunkSizes::for_size(size);
        Some(Signing {
            cache: self.clone(),
            work,
            sizes,
            ticket: Ticket(Arc::new(Mutex::new(Slot {
                sink: Some(SignSink::new(sizes)),
                done: None,
                placed: None,
            }))),
            live: true,
        })
    }

    /// Records the signatures `ticket` brings for the file `md` describes (stat'ed after
    /// it was put in place): now if they are cut, else when they are.
    pub fn put_signed(&self, md: Metadata, ticket: Ticket) {
        let mut slot = ticket.0.lock().expect("signing slot lock");
        match slot.done.take() {
            Some(sigs) => {
                drop(slot);
                self.put(&md, sigs);
            }
            None => slot.placed = Some(md),
        }
    }

    /// Waits until the signing thread has done all work sent to it so far.
    #[cfg(test)]
    pub fn settle(&self) {
        if let Some(w) = &self.work {
            let (tx, rx) = mpsc::sync_channel(1);
            w.send(Work::Settle(tx)).expect("the signing thread");
            rx.recv().expect("the signing thread");
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

/// A body being signed as it is written: its bytes go to the signing thread in order.
pub struct Signing {
    cache: Arc<SigCache>,
    work: mpsc::Sender<Work>,
    sizes: ChunkSizes,
    ticket: Ticket,
    /// False once abandoned: nothing more is sent.
    live: bool,
}

impl Signing {
    pub fn sizes(&self) -> ChunkSizes {
        self.sizes
    }

    /// The body's next bytes. False once the body is left unsigned.
    pub fn push(&mut self, data: &Bytes) -> bool {
        if !self.live {
            return false;
        }
        let n = data.len() as u64;
        let queued = &self.cache.queued;
        if queued.fetch_add(n, Ordering::Relaxed) + n > QUEUE_BYTES {
            queued.fetch_sub(n, Ordering::Relaxed);
            self.abandon();
        } else if self
            .work
            .send(Work::Data(self.ticket.clone(), data.clone()))
            .is_err()
        {
            self.abandon();
        }
        self.live
    }

    /// Chunks of `sigs` known to come next, at a cut ([`SignSink::push_known`]).
    pub fn push_known(&mut self, sigs: &Arc<Signatures>, range: Range<usize>) {
        if self.live
            && self
                .work
                .send(Work::Known(self.ticket.clone(), sigs.clone(), range))
                .is_err()
        {
            self.abandon();
        }
    }

    /// The body's end: its signatures will come with the ticket (none if abandoned).
    pub fn finish(mut self) -> Option<Ticket> {
        if self.live && self.work.send(Work::Finish(self.ticket.clone())).is_err() {
            self.abandon();
        }
        self.live.then(|| self.ticket.clone())
    }

    fn abandon(&mut self) {
        self.live = false;
        self.ticket.0.lock().expect("signing slot lock").sink = None;
        self.cache.counters.unsigned.inc();
    }
}

/// The signing thread: cuts bodies from the bytes queued for them, with only the CPU
/// nothing else wants.
fn sign_idle(rx: mpsc::Receiver<Work>, cache: Weak<SigCache>, queued: Arc<AtomicU64>) {
    // SCHED_IDLE: any other thread that wakes takes the CPU at once (at nice 19 it would
    // wait out the running slice, which on a CPU-bound fast link costs ~10%).
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
        tracing::warn!(error = ?e, "cannot give the signing thread idle priority");
    }
    for w in rx {
        match w {
            Work::Data(t, data) => {
                if let Some(sink) = t.0.lock().expect("signing slot lock").sink.as_mut() {
                    sink.push(&data);
                }
                queued.fetch_sub(data.len() as u64, Ordering::Relaxed);
            }
            Work::Known(t, sigs, range) => {
                if let Some(sink) = t.0.lock().expect("signing slot lock").sink.as_mut() {
                    sink.push_known(&sigs.lengths[range.clone()], &sigs.hashes[range]);
                }
            }
            Work::Finish(t) => {
                let mut slot = t.0.lock().expect("signing slot lock");
                let Some(sink) = slot.sink.take() else {
                    continue;
                };
                let sizes = sink.sizes();
                let (lengths, hashes) = sink.finish();
                let sigs = Signatures {
                    sizes,
                    lengths,
                    hashes,
                };
                let Some(cache) = cache.upgrade() else { return };
                cache.counters.signed.inc();
                match slot.placed.take() {
                    Some(md) => cache.put(&md, sigs),
                    None => slot.done = Some(sigs),
                }
            }
            #[cfg(test)]
            Work::Settle(tx) => {
                let _ = tx.send(());
            }
        }
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
        let cache = SigCache::new(1 << 20, Default::default());
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

    /// Bytes the signing thread has not caught up with are bounded: a body that would
    /// pass the queue's bound is left unsigned, and the others are signed as before.
    #[test]
    fn a_body_the_signing_thread_cannot_keep_up_with_is_left_unsigned() {
        let counters = SigningCounters::default();
        let cache = SigCache::new(1 << 20, counters.clone());
        assert!(cache.signing(SIGN_MIN - 1).is_none(), "too small to sign");
        let mut held = cache.signing(SIGN_MIN).unwrap();
        let slot = held.ticket.clone();
        let busy = slot.0.lock().unwrap();
        // The thread waits for this body's slot: what follows stays queued.
        assert!(held.push(&Bytes::from(vec![1u8; 4096])));
        let mut big = cache.signing(1 << 30).unwrap();
        let piece = Bytes::from(vec![2u8; QUEUE_BYTES as usize / 4]);
        for _ in 0..3 {
            assert!(
                big.push(&piece),
                "4 KiB and three quarters of the bound queued"
            );
        }
        assert!(!big.push(&piece), "a quarter more is past the bound");
        assert!(
            !big.push(&Bytes::from_static(b"x")),
            "and it stays unsigned"
        );
        assert_eq!(counters.unsigned.get(), 1);
        drop(busy);
        assert!(big.finish().is_none());
        let ticket = held.finish().unwrap();
        cache.settle();
        assert_eq!(cache.queued.load(Ordering::Relaxed), 0);
        assert_eq!((counters.signed.get(), counters.unsigned.get()), (1, 1));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        cache.put_signed(md.clone(), ticket);
        let sigs = cache.get(&md, ChunkSizes::for_size(SIGN_MIN)).unwrap();
        assert_eq!(sigs.lengths, vec![4096]);
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
        let cache = SigCache::new(2 * one, Default::default());
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
        assert_eq!(SigCache::new(0, Default::default()).bytes(), 0);
    }
}
