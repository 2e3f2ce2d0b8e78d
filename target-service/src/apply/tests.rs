use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cms_mirror::config::Links;
use cms_mirror::model::Kind;

use super::body::*;
use super::publish::*;
use super::stage::*;
use super::unix::*;
use super::writer::*;
use super::*;

fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// Direct I/O takes the block-aligned head of a large chunk at an aligned offset,
/// nothing else; what lands in the file is the same either way. (The tests' temporary
/// directory is on ext4 here, which takes direct I/O.)
#[test]
fn large_aligned_chunks_go_direct_and_the_file_is_whole() {
    let dir = tempfile::tempdir().unwrap();
    let data = body(3 * DIRECT_PIECE + 5000);
    let (a, rest) = data.split_at(DIRECT_PIECE + 8192);
    let (b, c) = rest.split_at(100);
    let path = dir.path().join("f");
    let file = File::create_new(&path).unwrap();
    let mut w = BodyWriter::new(true);
    assert_eq!(w.write_at(&file, a, 0).unwrap(), a.len() as u64);
    // Too small, then at an unaligned offset: through the page cache.
    assert_eq!(w.write_at(&file, b, a.len() as u64).unwrap(), 0);
    let at = (a.len() + b.len()) as u64;
    assert_eq!(w.write_at(&file, c, at).unwrap(), 0);
    assert_eq!(fs::read(&path).unwrap(), data);

    let path = dir.path().join("g");
    let file = File::create_new(&path).unwrap();
    // An aligned offset with an unaligned length: the head direct, its tail not.
    assert_eq!(w.write_at(&file, &data[..4096], 0).unwrap(), 0);
    let head = (data.len() - 4096) / 4096 * 4096;
    assert_eq!(w.write_at(&file, &data[4096..], 4096).unwrap(), head as u64);
    assert_eq!(fs::read(&path).unwrap(), data);
    // The descriptor is back to buffered I/O.
    let flags = rustix::fs::fcntl_getfl(&file).unwrap();
    assert!(!flags.contains(rustix::fs::OFlags::DIRECT));

    let path = dir.path().join("h");
    let file = File::create_new(&path).unwrap();
    let mut off = BodyWriter::new(false);
    assert_eq!(off.write_at(&file, &data, 0).unwrap(), 0);
    assert_eq!(fs::read(&path).unwrap(), data);
}

fn put_entry(item: &Item) -> pb::Entry {
    pb::Entry {
        op: Some(pb::entry::Op::Put(item.to_pb())),
    }
}

fn data_entry(path: &str, offset: u64, data: &[u8], last: bool, hash: &[u8]) -> pb::Entry {
    pb::Entry {
        op: Some(pb::entry::Op::Data(pb::FileData {
            path: path.into(),
            offset,
            data: data.to_vec().into(),
            last,
            blake3: hash.to_vec(),
            ..Default::default()
        })),
    }
}

/// A file's put and its body in two chunks, split at `at` (the hash on the last).
fn two_chunks(path: &str, data: &[u8], at: usize) -> [pb::Entry; 3] {
    let (a, b) = data.split_at(at);
    [
        put_entry(&file_item(path, data.len(), 0)),
        data_entry(path, 0, a, false, &[]),
        data_entry(path, at as u64, b, true, blake3::hash(data).as_bytes()),
    ]
}

fn file_item(path: &str, size: usize, mtime_ns: i64) -> Item {
    Item {
        path: path.into(),
        kind: Kind::File,
        size: size as u64,
        mtime_ns,
        mode: 0o640,
        link: String::new(),
        hash: None,
    }
}

/// A package of many whole files, small and larger, is written on several threads:
/// every file lands whole with its time and mode (the larger ones mostly with direct
/// I/O), a body whose hash is wrong is refused alone, and a file in several chunks
/// beside them takes the ordinary path.
#[test]
fn whole_files_written_in_parallel_are_checked_one_by_one() {
    let root = tempfile::tempdir().unwrap();
    let site = site_in(&root);
    let mut entries = vec![put_entry(&Item {
        kind: Kind::Dir,
        mode: 0o755,
        ..file_item("d", 0, 0)
    })];
    let mut expected = Vec::new();
    for i in 0..96 {
        let path = format!("d/f{i:03}");
        // Every tenth file is over DIRECT_MIN.
        let data = body(if i % 10 == 3 {
            3 * DIRECT_MIN + i
        } else {
            1 + i * 97
        });
        let mtime = 1_600_000_000_000_000_000 + i as i64 * 1_000_000_007;
        let mut hash = blake3::hash(&data).as_bytes().to_vec();
        if i == 7 {
            hash[0] ^= 1;
        }
        entries.push(put_entry(&file_item(&path, data.len(), mtime)));
        entries.push(data_entry(&path, 0, &data, true, &hash));
        expected.push((path, data, mtime));
    }
    let big = body(2 * DIRECT_MIN + 3);
    entries.extend(two_chunks("d/big", &big, DIRECT_MIN));

    // The one-chunk bodies take the whole-file path, the chunked one does not.
    let mut it = entries.clone().into_iter().peekable();
    let mut whole = 0;
    while let Some(e) = it.next() {
        if let Some(pb::entry::Op::Put(m)) = &e.op {
            let item = Item::from_pb(m).unwrap();
            let taken = take_whole_body(&item, &mut it).is_some();
            assert_eq!(taken, item.path.starts_with("d/f"), "{}", item.path);
            whole += taken as usize;
        }
    }
    assert_eq!(whole, expected.len());
    let weight: u64 = expected
        .iter()
        .map(|(_, d, _)| d.len() as u64 + WHOLE_FILE_WEIGHT)
        .sum();
    assert!(weight >= WHOLE_PARALLEL_MIN);

    let mut sess = SessionFiles::new(site.session_dir("s"), true);
    let staged = stage(&site, &mut sess, pb::PackagePayload { entries }, 4096);
    let out = publish(&site, staged, Durability::None);

    let errors: Vec<_> = out
        .errors
        .iter()
        .map(|e| (e.path.as_str(), e.code.as_str()))
        .collect();
    assert_eq!(errors, [("d/f007", "checksum_mismatch")]);
    assert_eq!(out.items as usize, 1 + expected.len() - 1 + 1);
    // The larger whole files and the chunked file's two chunks went direct (all but
    // their unaligned tails); the small ones through the page cache.
    let larger: u64 = expected
        .iter()
        .filter(|(p, d, _)| d.len() >= DIRECT_MIN && p != "d/f007")
        .map(|(_, d, _)| d.len() as u64 / 4096 * 4096)
        .sum();
    assert_eq!(out.bytes_direct, larger + 2 * DIRECT_MIN as u64);
    assert!(!sess.helpers.is_empty() && sess.helpers.iter().all(|h| h.direct));
    assert_eq!(fs::read(root.path().join("d/big")).unwrap(), big);
    for (path, data, mtime) in expected {
        let dest = root.path().join(&path);
        if path == "d/f007" {
            assert!(!dest.exists(), "{path} was published with a wrong hash");
            continue;
        }
        assert_eq!(fs::read(&dest).unwrap(), data, "{path}");
        let md = fs::metadata(&dest).unwrap();
        assert_eq!(
            filetime::FileTime::from_last_modification_time(&md),
            file_time(mtime)
        );
        assert_eq!(md.permissions().mode() & 0o777, 0o640, "{path}");
    }
}

/// Chunks of 1 MiB and more are hashed on a second thread while they are written:
/// the hash still runs over every chunk in order, across packages, so a whole body
/// is accepted and a body with one changed byte is refused; the same for a body of
/// 1 MiB and more that comes whole in one package.
#[test]
fn large_chunks_hashed_beside_their_write_are_checked() {
    let root = tempfile::tempdir().unwrap();
    let site = site_in(&root);
    let a = body(2 * HASH_BESIDE_MIN + HASH_BESIDE_MIN / 2);
    let mut b = body(2 * HASH_BESIDE_MIN + 1);
    let b_hash = blake3::hash(&b);
    b[HASH_BESIDE_MIN + 5] ^= 1;
    let (a1, a2) = a.split_at(2 * HASH_BESIDE_MIN);
    let (b1, b2) = b.split_at(HASH_BESIDE_MIN);
    assert!(a1.len() >= HASH_BESIDE_MIN && a2.len() < HASH_BESIDE_MIN);
    let c = body(HASH_BESIDE_MIN + 10);
    let mut w = c.clone();
    w[7] ^= 1;
    let first = vec![
        put_entry(&file_item("a", a.len(), 1)),
        data_entry("a", 0, a1, false, &[]),
        put_entry(&file_item("b", b.len(), 1)),
        data_entry("b", 0, b1, false, &[]),
        put_entry(&file_item("c", c.len(), 1)),
        data_entry("c", 0, &c, true, blake3::hash(&c).as_bytes()),
        put_entry(&file_item("w", w.len(), 1)),
        data_entry("w", 0, &w, true, blake3::hash(&c).as_bytes()),
    ];
    let second = vec![
        data_entry("a", a1.len() as u64, a2, true, blake3::hash(&a).as_bytes()),
        data_entry("b", b1.len() as u64, b2, true, b_hash.as_bytes()),
    ];
    let mut sess = SessionFiles::new(site.session_dir("s"), true);
    let mut outs = Vec::new();
    for entries in [first, second] {
        let staged = stage(&site, &mut sess, pb::PackagePayload { entries }, 4096);
        outs.push(publish(&site, staged, Durability::None));
    }
    let errors = |out: &Applied| -> Vec<(String, String)> {
        out.errors
            .iter()
            .map(|e| (e.path.clone(), e.code.clone()))
            .collect()
    };
    let mismatch = |p: &str| vec![(p.to_string(), "checksum_mismatch".to_string())];
    assert_eq!(errors(&outs[0]), mismatch("w"));
    assert_eq!(fs::read(root.path().join("c")).unwrap(), c);
    assert!(!root.path().join("w").exists());
    assert_eq!(errors(&outs[1]), mismatch("b"));
    assert_eq!(fs::read(root.path().join("a")).unwrap(), a);
    assert!(!root.path().join("b").exists());
    let published: Vec<_> = outs[1].changes.upserts.iter().collect();
    assert_eq!(published.len(), 1);
    assert_eq!(
        published[0].hash.as_deref(),
        Some(blake3::hash(&a).to_hex().as_str())
    );
}

/// A resent last chunk of a file that a stopped target had already put in place
/// finds it there only when it is that file: a regular file of the chunk's end size
/// with the source's hash.
#[test]
fn a_resent_last_chunk_finds_only_its_own_published_file() {
    let root = tempfile::tempdir().unwrap();
    let site = site_in(&root);
    let data = body(10_000);
    fs::create_dir(root.path().join("d")).unwrap();
    fs::write(root.path().join("d/f"), &data).unwrap();
    std::os::unix::fs::symlink("f", root.path().join("d/l")).unwrap();
    let hash = blake3::hash(&data);
    let chunk = |path: &str, from: usize, blake3: &[u8]| pb::FileData {
        path: path.into(),
        offset: from as u64,
        data: data[from..].to_vec().into(),
        last: true,
        blake3: blake3.to_vec(),
        ..Default::default()
    };
    let item = already_published(&site, &chunk("d/f", 4096, hash.as_bytes())).unwrap();
    assert_eq!((item.kind, item.size), (Kind::File, 10_000));
    assert_eq!(item.hash, Some(hash.to_hex().to_string()));
    let mut wrong = hash.as_bytes().to_vec();
    wrong[0] ^= 1;
    assert!(already_published(&site, &chunk("d/f", 4096, &wrong)).is_none());
    let mut short = chunk("d/f", 4096, hash.as_bytes());
    short.data.truncate(100);
    assert!(already_published(&site, &short).is_none());
    assert!(already_published(&site, &chunk("d/l", 4096, hash.as_bytes())).is_none());
    assert!(already_published(&site, &chunk("d/gone", 4096, hash.as_bytes())).is_none());
}

fn site_in(root: &tempfile::TempDir) -> SiteFs {
    SiteFs {
        root: root.path().to_path_buf(),
        links: Links::Safe,
    }
}

fn payload(entries: Vec<pb::Entry>) -> pb::PackagePayload {
    pb::PackagePayload { entries }
}

/// The chunks of a body over several packages are written after their packages are
/// staged, in any order between packages (as the finishing tasks of a stream run):
/// the body lands whole, with its own time (set after the last write), and its
/// direct bytes are counted.
#[test]
fn chunks_written_after_staging_land_whole_with_their_time() {
    let root = tempfile::tempdir().unwrap();
    let site = site_in(&root);
    let data = body(3 * 2 * DIRECT_MIN + 100);
    let (c0, rest) = data.split_at(2 * DIRECT_MIN);
    let (c1, c2) = rest.split_at(2 * DIRECT_MIN);
    let mtime = 1_500_000_000_123_456_789;
    let hash = blake3::hash(&data);
    let mut sess = SessionFiles::new(site.session_dir("s"), true);
    let mut staged: Vec<Staged> = [
        vec![
            put_entry(&file_item("f", data.len(), mtime)),
            data_entry("f", 0, c0, false, &[]),
        ],
        vec![data_entry("f", c0.len() as u64, c1, false, &[])],
        vec![data_entry(
            "f",
            (c0.len() + c1.len()) as u64,
            c2,
            true,
            hash.as_bytes(),
        )],
    ]
    .into_iter()
    .map(|e| stage(&site, &mut sess, payload(e), 4096))
    .collect();
    assert!(staged.iter().all(Staged::has_deferred));
    // The last package's chunk is written first, then the others as they publish.
    let last = write_deferred(staged.pop().unwrap());
    assert!(!last.has_deferred());
    let mut outs: Vec<Applied> = staged
        .into_iter()
        .map(|s| publish(&site, s, Durability::None))
        .collect();
    outs.push(publish(&site, last, Durability::None));
    assert!(outs.iter().all(|o| o.errors.is_empty() && !o.not_written));
    assert_eq!(outs.iter().map(|o| o.items).sum::<u64>(), 1);
    let direct: u64 = outs.iter().map(|o| o.bytes_direct).sum();
    assert_eq!(direct, (data.len() / 4096 * 4096) as u64);
    let dest = root.path().join("f");
    assert_eq!(fs::read(&dest).unwrap(), data);
    let md = fs::metadata(&dest).unwrap();
    assert_eq!(
        filetime::FileTime::from_last_modification_time(&md),
        file_time(mtime)
    );
}

/// A chunk the disk refuses after its package was staged fails the whole package:
/// nothing of it is published (not even a whole file beside it), and the answer says
/// which file and why. Here ext4 refuses an offset beyond its largest file (EFBIG).
#[test]
#[cfg_attr(
    not(ci),
    ignore = "needs the temporary directory on ext4 (CI's machine has it); run with --include-ignored"
)]
fn a_chunk_that_cannot_be_written_fails_its_whole_package() {
    let root = tempfile::tempdir().unwrap();
    let ext4 = rustix::fs::statfs(root.path()).unwrap().f_type == 0xEF53;
    assert!(
        ext4,
        "the temporary directory must be on ext4 for this test"
    );
    let site = site_in(&root);
    let far = 1u64 << 44;
    let chunk = body(DIRECT_MIN);
    let small = body(100);
    let entries = vec![
        put_entry(&file_item("small", small.len(), 1)),
        data_entry("small", 0, &small, true, blake3::hash(&small).as_bytes()),
        put_entry(&file_item("huge", (far + chunk.len() as u64) as usize, 1)),
        data_entry("huge", 0, &chunk, false, &[]),
        data_entry("huge", far, &chunk, false, &[]),
    ];
    let mut sess = SessionFiles::new(site.session_dir("s"), true);
    let staged = stage(&site, &mut sess, payload(entries), 4096);
    assert!(staged.has_deferred());
    assert!(staged.out.errors.is_empty());
    let out = publish(&site, staged, Durability::None);
    assert!(out.not_written && !out.no_space);
    assert_eq!((out.items, out.bytes), (0, 0));
    let errors: Vec<_> = out
        .errors
        .iter()
        .map(|e| (e.path.as_str(), e.code.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        errors,
        [("huge", "io", "cannot write: File too large (os error 27)")]
    );
    assert!(!root.path().join("small").exists());
    assert!(!root.path().join("huge").exists());
}

/// A body whose chunks are written by finishing tasks and that must be read back to
/// be hashed (a package of it came again, so its offsets no longer follow on) is read
/// only once its earlier chunks are written: its last chunk waits for them.
#[test]
fn a_body_read_back_waits_for_its_chunks_still_to_write() {
    let root = tempfile::tempdir().unwrap();
    let site = site_in(&root);
    let data = body(2 * 2 * DIRECT_MIN + 300);
    let (c0, rest) = data.split_at(2 * DIRECT_MIN);
    let (c1, c2) = rest.split_at(2 * DIRECT_MIN);
    let at1 = c0.len() as u64;
    let at2 = at1 + c1.len() as u64;
    let mut sess = SessionFiles::new(site.session_dir("s"), true);
    let first = vec![
        put_entry(&file_item("f", data.len(), 7)),
        data_entry("f", 0, c0, false, &[]),
    ];
    let staged = stage(&site, &mut sess, payload(first), 4096);
    assert!(publish(&site, staged, Durability::None).errors.is_empty());
    // The second package is staged, then dropped (a package before it failed), and
    // comes again: its chunk now follows nothing the target hashed.
    let second = || vec![data_entry("f", at1, c1, false, &[])];
    discard(stage(&site, &mut sess, payload(second()), 4096));
    let again = stage(&site, &mut sess, payload(second()), 4096);
    assert!(again.has_deferred());
    let writer = {
        let site = site_in(&root);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            publish(&site, again, Durability::None)
        })
    };
    let last = vec![data_entry(
        "f",
        at2,
        c2,
        true,
        blake3::hash(&data).as_bytes(),
    )];
    let staged = stage(&site, &mut sess, payload(last), 4096);
    assert!(staged.out.errors.is_empty(), "{:?}", staged.out.errors);
    assert!(writer.join().unwrap().errors.is_empty());
    let out = publish(&site, staged, Durability::None);
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(fs::read(root.path().join("f")).unwrap(), data);
}

/// Bytes of `paths` in the page cache, from util-linux's `fincore`.
fn resident(paths: &[PathBuf]) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .args(paths)
        .output()
        .expect("fincore (util-linux) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse::<u64>().unwrap())
        .sum()
}

/// With durable acks, published bodies (whole files, one in two chunks) leave the page
/// cache once they are synced; with direct I/O off they stay cached. The files are
/// whole either way.
#[test]
fn durable_bodies_leave_the_page_cache_unless_direct_io_is_off() {
    // On the disk (a tmpfs keeps every page): under the build's target directory.
    let under = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    fs::create_dir_all(&under).unwrap();
    for drop_cache in [true, false] {
        let root = tempfile::tempdir_in(&under).unwrap();
        let site = site_in(&root);
        let mut entries = Vec::new();
        let mut files = Vec::new();
        for i in 0..40 {
            let path = format!("f{i:02}");
            let data = body(5_000 + i * 1_000);
            entries.push(put_entry(&file_item(&path, data.len(), 0)));
            entries.push(data_entry(
                &path,
                0,
                &data,
                true,
                blake3::hash(&data).as_bytes(),
            ));
            files.push((root.path().join(&path), data));
        }
        let big = body(50_000);
        entries.extend(two_chunks("big", &big, 20_000));
        files.push((root.path().join("big"), big));

        let mut sess = SessionFiles::new(site.session_dir("s"), drop_cache);
        let staged = stage(&site, &mut sess, payload(entries), 4096);
        let mut out = publish(&site, staged, Durability::Syncfs);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.items, files.len() as u64);
        uncache(std::mem::take(&mut out.to_uncache));
        let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        let cached = resident(&paths);
        let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
        if drop_cache {
            assert_eq!(cached, 0, "durable bodies still cached");
        } else {
            assert!(cached >= total, "{cached} of {total} bytes cached");
        }
        for (p, d) in &files {
            assert_eq!(&fs::read(p).unwrap(), d, "{}", p.display());
        }
    }
}

#[test]
fn leftovers_of_a_crash_are_cleaned_at_start_and_content_is_kept() {
    let root = tempfile::tempdir().unwrap();
    let site = site_in(&root);
    std::fs::create_dir_all(site.staging().join("0123abcd")).unwrap();
    std::fs::write(site.staging().join("0123abcd/body"), b"partial").unwrap();
    std::fs::write(root.path().join(".cms-mirror-staging-probe-77"), b"probe").unwrap();
    std::fs::write(root.path().join(".cms-mirror-staging-trace-77"), b"date: x").unwrap();
    std::fs::write(root.path().join(".cms-mirror-trace"), b"date: y").unwrap();
    std::fs::write(root.path().join("index.html"), b"content").unwrap();
    assert_eq!(clean_staging(&site, &[]).unwrap(), 3);
    let mut left: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [".cms-mirror-staging", ".cms-mirror-trace", "index.html"]
    );
    // The site check and the trace file leave the root's own times as they were.
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    filetime::set_file_times(root.path(), t, t).unwrap();
    site.check(0).unwrap();
    site.write_trace("date: z\n").unwrap();
    let md = std::fs::metadata(root.path()).unwrap();
    assert_eq!(filetime::FileTime::from_last_modification_time(&md), t);
    assert_eq!(
        std::fs::read_to_string(root.path().join(".cms-mirror-trace")).unwrap(),
        "date: z\n"
    );
}

/// Signs a body as `Signer` would cut the file from scratch.
fn signed_from_scratch(path: &Path, size: usize) -> crate::sigcache::Signatures {
    let sizes = cms_mirror::delta::ChunkSizes::for_size(size as u64);
    let mut s = cms_mirror::delta::Signer::new(fs::File::open(path).unwrap(), sizes);
    let mut out = crate::sigcache::Signatures {
        sizes,
        lengths: Vec::new(),
        hashes: Vec::new(),
    };
    loop {
        let (l, h) = s.next_batch().unwrap();
        if l.is_empty() {
            return out;
        }
        out.lengths.extend(l);
        out.hashes.extend(h);
    }
}

/// The target signs what it writes: a whole body as it is written, and a body a delta
/// assembles from copies of its basis and literal bytes, the copies' chunks taken from
/// the basis's signatures when they are kept ("f") and cut from the copied bytes when
/// they are not ("g"); each is exactly what cutting the file from scratch gives.
#[test]
fn written_bodies_carry_the_signatures_a_fresh_cut_gives() {
    use cms_mirror::delta::{ChunkSizes, Index, chunk_hash};
    let root = tempfile::tempdir().unwrap();
    let site = site_in(&root);
    let cache = crate::sigcache::SigCache::new(1 << 20, Default::default());
    let mut sess = SessionFiles::new(site.session_dir("s"), false);
    sess.sigcache = cache.clone();
    let old: Vec<u8> = {
        let mut r = fastrand::Rng::with_seed(11);
        (0..3 << 20).map(|_| r.u8(..)).collect()
    };
    let mut entries = two_chunks("f", &old, 1 << 20).to_vec();
    entries.extend(two_chunks("g", &old, 1 << 20));
    let staged = stage(&site, &mut sess, payload(entries), 4096);
    let mut out = publish(&site, staged, Durability::None);
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let sizes = ChunkSizes::for_size(old.len() as u64);
    let mut signed = out.signed.drain(..);
    let (md, ticket) = signed.next().expect("f is being signed");
    // Put before the cut is done: the signing thread puts it when it is.
    cache.put_signed(md.clone(), ticket);
    cache.settle();
    let sigs = cache.get(&md, sizes).expect("the body's signatures");
    assert_eq!(
        *sigs,
        signed_from_scratch(&root.path().join("f"), old.len())
    );
    let (g_md, _) = signed.next().expect("g is being signed, and is left out");
    drop(signed);

    // A new version: 100 bytes inserted in the middle, the tail cut off, a new end.
    let mut new = old.clone();
    new.splice(old.len() / 2..old.len() / 2, [7u8; 100]);
    new.truncate(old.len() - 200_000);
    new.extend_from_slice(&[9u8; 50_000]);
    assert_eq!(sizes, ChunkSizes::for_size(new.len() as u64));
    let mut ix = Index::default();
    ix.add(&sigs.lengths, &cms_mirror::delta::pack_hashes(&sigs.hashes))
        .unwrap();
    // As the source packs it: a copy per run of matching chunks, literal bytes else.
    let delta = |path: &str, md: &fs::Metadata| {
        let mut entries = vec![put_entry(&file_item(path, new.len(), 0))];
        let mut chunks = sizes.chunker(&new[..]);
        let (mut copies, mut literal) = (0, 0);
        let (bsize, bmtime) = (md.len(), cms_mirror::fswalk::mtime_ns(md));
        while let Some((at, c)) = chunks.next_chunk().unwrap() {
            let e = match ix.find(chunk_hash(c), c.len()) {
                Some(m) => {
                    copies += 1;
                    if let Some(pb::entry::Op::Data(prev)) = &mut entries.last_mut().unwrap().op
                        && prev.copy_len > 0
                        && prev.copy_from + prev.copy_len == m.at
                    {
                        prev.copy_len += c.len() as u64;
                        continue;
                    }
                    pb::FileData {
                        path: path.into(),
                        offset: at,
                        copy_from: m.at,
                        copy_len: c.len() as u64,
                        basis_size: bsize,
                        basis_mtime_ns: bmtime,
                        ..Default::default()
                    }
                }
                None => {
                    literal += c.len();
                    pb::FileData {
                        path: path.into(),
                        offset: at,
                        data: c.to_vec().into(),
                        ..Default::default()
                    }
                }
            };
            entries.push(pb::Entry {
                op: Some(pb::entry::Op::Data(e)),
            });
        }
        let Some(pb::entry::Op::Data(last)) = &mut entries.last_mut().unwrap().op else {
            unreachable!()
        };
        last.last = true;
        last.blake3 = blake3::hash(&new).as_bytes().to_vec();
        assert!(
            copies > 100 && literal < 200_000,
            "{copies} copies, {literal} literal bytes"
        );
        entries
    };
    let mut entries = delta("f", &md);
    entries.extend(delta("g", &g_md));
    let staged = stage(&site, &mut sess, payload(entries), 4096);
    let mut out = publish(&site, staged, Durability::None);
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(out.signed.len(), 2);
    cache.settle();
    for (md, ticket) in out.signed.drain(..) {
        // Put after the cut is done.
        cache.put_signed(md.clone(), ticket);
        let sigs = cache
            .get(&md, sizes)
            .expect("the assembled body's signatures");
        use std::os::unix::fs::MetadataExt;
        let g = fs::metadata(root.path().join("g")).unwrap();
        let which = if md.ino() == g.ino() { "g" } else { "f" };
        let dest = root.path().join(which);
        assert_eq!(fs::read(&dest).unwrap(), new);
        assert_eq!(*sigs, signed_from_scratch(&dest, new.len()), "{which}");
    }
}
