//! Delta transfer of changed files and the bandwidth limit, on loopback: what crosses,
//! what lands, a basis that changes under a delta, a target killed mid-delta.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::helpers::*;

const LARGE: usize = 6 << 20;

fn large_tree(root: &Path) {
    for i in 0..3 {
        write(root, &format!("media/video{i}.bin"), &bytes(100 + i, LARGE));
    }
    write(root, "index.html", b"<html>home</html>");
}

/// Inserts 100 bytes in the middle of each large file (its tail shifts).
fn insert_in_the_middle(root: &Path) {
    for i in 0..3 {
        let p = root.join(format!("media/video{i}.bin"));
        let mut b = std::fs::read(&p).unwrap();
        b.splice(LARGE / 2..LARGE / 2, bytes(900 + i, 100));
        std::fs::write(&p, b).unwrap();
    }
}

fn target0(job: &serde_json::Value) -> &serde_json::Value {
    &job["targets"][0]
}

fn delta_round(extra: &str) {
    let m = Mirror::start(large_tree, extra);
    let (code, first) = run_job(&m.source.url(), &[]);
    assert_eq!(code, 0, "{first:#}");
    let full_wire = target0(&first)["bytes_on_wire"].as_u64().unwrap();
    assert!(full_wire >= 3 * LARGE as u64, "first job sent {full_wire}");

    insert_in_the_middle(&m.src);
    let (code, second) = run_job(&m.source.url(), &[]);
    assert_eq!(code, 0, "{second:#}");
    assert_same_tree(&m.src, &m.dst);
    let t = target0(&second);
    // The plan counts the files' bytes; the wire carries a few chunks of each.
    assert_eq!(
        t["bytes_total"].as_u64(),
        Some(3 * (LARGE as u64 + 100)),
        "{t}"
    );
    let wire = t["bytes_on_wire"].as_u64().unwrap();
    assert!(
        wire < 600 * 1024,
        "a 100-byte insert into each of 3 x 6 MiB files sent {wire} bytes"
    );
    let job = second["id"].as_str().unwrap();
    let planned = events(&m.source.url(), job)
        .into_iter()
        .find(|e| e["kind"] == "planned")
        .expect("a planned event");
    assert_eq!(planned["data"]["delta_files"], 3, "{planned}");
}

#[test]
fn a_changed_large_file_crosses_as_a_delta() {
    delta_round("");
}

#[test]
fn a_delta_builds_an_atomic_generation_from_the_live_one() {
    delta_round("publish = \"atomic\"");
}

#[test]
fn without_delta_the_file_goes_whole() {
    let m = Mirror::start(large_tree, "delta = false");
    assert_eq!(run_job(&m.source.url(), &[]).0, 0);
    insert_in_the_middle(&m.src);
    let (code, second) = run_job(&m.source.url(), &[]);
    assert_eq!(code, 0, "{second:#}");
    assert_same_tree(&m.src, &m.dst);
    let wire = target0(&second)["bytes_on_wire"].as_u64().unwrap();
    assert!(wire >= 3 * LARGE as u64, "{wire}");
}

#[test]
fn a_basis_that_changes_under_a_delta_sends_the_file_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    large_tree(&src);
    let target = App::target(tmp.path())
        .site(&dst)
        .env("CMS_MIRROR_FAILPOINT_CHANGE_BASIS", "1")
        .spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).spawn();
    assert_eq!(run_job(&source.url(), &[]).0, 0);
    insert_in_the_middle(&src);
    let (code, second) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{second:#}");
    assert_same_tree(&src, &dst);
    let t = target0(&second);
    assert_eq!(t["item_errors"], 0, "{t}");
    let wire = t["bytes_on_wire"].as_u64().unwrap();
    assert!(wire >= 3 * LARGE as u64, "the files went whole: {wire}");
    let job = second["id"].as_str().unwrap();
    let rewinds: Vec<_> = events(&source.url(), job)
        .into_iter()
        .filter(|e| e["data"].to_string().contains("basis of a delta changed"))
        .collect();
    assert!(!rewinds.is_empty(), "no event names the changed basis");
}

#[test]
fn a_target_killed_mid_delta_resumes_and_lands_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    // One 16 MiB file; the second job rewrites every other 256 KiB of it, so its delta
    // is half literal bytes over many packages, slowed by the limit.
    let n = 16 << 20;
    write(&src, "big.bin", &bytes(7, n));
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config_with_target(
        tmp.path(),
        &src,
        &target.url(),
        "retry_budget = 20",
        "  bwlimit = \"2MiB/s\"\n",
    );
    let source = App::source(tmp.path(), &config).spawn();
    assert_eq!(run_job(&source.url(), &[]).0, 0);
    let mut b = std::fs::read(src.join("big.bin")).unwrap();
    for (i, part) in b
        .chunks_mut(256 << 10)
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
    {
        part.copy_from_slice(&bytes(1000 + i as u64, part.len()));
    }
    std::fs::write(src.join("big.bin"), &b).unwrap();

    let job = start_job(&source.url());
    wait_acked(&source.url(), &job, 10);
    let mut target = target;
    let addr = target.url().trim_start_matches("http://").to_string();
    target.kill9();
    let _target = App::target(tmp.path()).site(&dst).listen(&addr).spawn();
    assert_eq!(wait_for_job(&source.url(), &job), 0);
    assert_same_tree(&src, &dst);
    let t = target0(&show_job(&source.url(), &job)).clone();
    let wire = t["bytes_on_wire"].as_u64().unwrap();
    // Half the file is new; the other half was copied on the target (a resent package
    // or two cost a little more).
    assert!(
        wire < (n as u64) * 3 / 4,
        "a half-changed file sent {wire} of {n} bytes"
    );
}

#[test]
fn the_bandwidth_limit_holds_a_job_back_and_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let n = 12 << 20;
    write(&src, "big.bin", &bytes(3, n));
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config_with_target(
        tmp.path(),
        &src,
        &target.url(),
        "",
        "  bwlimit = \"4MiB/s\"\n",
    );
    let metrics = free_addr();
    let source = App::source(tmp.path(), &config)
        .args(&["--metrics-listen", &metrics])
        .spawn();
    let t0 = Instant::now();
    let (code, job) = run_job(&source.url(), &[]);
    let took = t0.elapsed();
    assert_eq!(code, 0, "{job:#}");
    assert_same_tree(&src, &dst);
    // 12 MiB at 4 MiB/s cannot land in less than ~3 s (the first package leaves at once).
    assert!(took >= Duration::from_millis(2800), "{took:?}");
    let (status, page) = http_get(&metrics, "/metrics");
    assert_eq!(status, 200);
    let lbl = "{channel=\"site\",target=\"web1\"}";
    assert_eq!(
        metric(&page, &format!("mirror_bwlimit_bytes_per_second{lbl}")),
        Some((4u64 << 20) as f64),
        "{page}"
    );
    assert!(metric(&page, &format!("mirror_throttled_seconds_total{lbl}")).unwrap_or(0.0) > 1.0);
    let id = job["id"].as_str().unwrap();
    let progress = events(&source.url(), id)
        .into_iter()
        .rfind(|e| e["kind"] == "progress")
        .expect("progress events");
    assert_eq!(
        progress["data"]["bwlimit_bytes_per_sec"],
        4u64 << 20,
        "{progress}"
    );
}

/// The target's signature counters for site "main": (answered from the cache, read from
/// the file).
fn signature_counts(metrics_addr: &str) -> (f64, f64) {
    let (status, page) = http_get(metrics_addr, "/metrics");
    assert_eq!(status, 200, "{page}");
    let n = |name: &str| metric(&page, &format!("{name}{{site=\"main\"}}")).unwrap_or(0.0);
    (
        n("mirror_target_signatures_cached_total"),
        n("mirror_target_signatures_read_total"),
    )
}

/// Waits until the target's signing thread has signed `n` bodies in all (it signs at the
/// lowest priority, after the job may have ended), with none left unsigned.
fn wait_signed(metrics_addr: &str, n: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, page) = http_get(metrics_addr, "/metrics");
        assert_eq!(status, 200, "{page}");
        let signed = metric(&page, "mirror_target_bodies_signed_total").unwrap_or(0.0);
        let unsigned = metric(&page, "mirror_target_bodies_unsigned_total").unwrap_or(0.0);
        assert_eq!(unsigned, 0.0, "bodies left unsigned");
        if signed >= n {
            assert_eq!(signed, n, "more bodies signed than written");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{signed} of {n} bodies signed after 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The large tree mirrored once to a target started with `target_args` that serves its
/// metrics (at the address returned).
fn mirrored_with_metrics(target_args: &[&str]) -> (Mirror, String) {
    let tm = free_addr();
    let args: Vec<&str> = ["--metrics-listen", tm.as_str()]
        .into_iter()
        .chain(target_args.iter().copied())
        .collect();
    let m = Mirror::start_with(large_tree, "", &args);
    assert_eq!(run_job(&m.source.url(), &[]).0, 0);
    (m, tm)
}

/// The target signs the large bodies it writes (whole, and assembled by a delta from the
/// basis's known chunks), so the deltas after them are described without reading the
/// old versions; a file changed behind the target's back with its size and mtime put
/// back is read again (its ctime moved), and every round lands exact.
#[test]
fn written_bodies_answer_the_next_deltas_signatures() {
    let (m, tm) = mirrored_with_metrics(&[]);
    let (src, dst, source) = (&m.src, &m.dst, &m.source);
    assert_eq!(signature_counts(&tm), (0.0, 0.0));
    for round in 1..=2 {
        wait_signed(&tm, 3.0 * round as f64);
        insert_in_the_middle(src);
        let (code, job) = run_job(&source.url(), &[]);
        assert_eq!(code, 0, "{job:#}");
        assert_same_tree(src, dst);
        let wire = target0(&job)["bytes_on_wire"].as_u64().unwrap();
        assert!(wire < 600 * 1024, "round {round} sent {wire} bytes");
        assert_eq!(
            signature_counts(&tm),
            (3.0 * round as f64, 0.0),
            "round {round}: every basis described from the cache"
        );
    }

    wait_signed(&tm, 9.0);
    // Rewritten on the target in place, same size, its mtime put back.
    let victim = dst.join("media/video0.bin");
    let before = std::fs::metadata(&victim).unwrap();
    let mut body = std::fs::read(&victim).unwrap();
    body[LARGE / 4..LARGE / 4 + 4096].fill(0xee);
    std::fs::write(&victim, &body).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    filetime::set_file_handle_times(
        &f,
        None,
        Some(filetime::FileTime::from_last_modification_time(&before)),
    )
    .unwrap();
    drop(f);
    insert_in_the_middle(src);
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_eq!(target0(&job)["item_errors"], 0, "{job:#}");
    assert_same_tree(src, dst);
    assert_eq!(
        signature_counts(&tm),
        (8.0, 1.0),
        "the changed file was read, the others came from the cache"
    );
}

/// `--signature-cache 0`: nothing is signed or kept, every delta reads its basis, and
/// the copy is as exact.
#[test]
fn without_a_signature_cache_every_basis_is_read() {
    let (m, tm) = mirrored_with_metrics(&["--signature-cache", "0"]);
    let (src, dst, source) = (&m.src, &m.dst, &m.source);
    for round in 1..=2 {
        insert_in_the_middle(src);
        let (code, job) = run_job(&source.url(), &[]);
        assert_eq!(code, 0, "{job:#}");
        assert_same_tree(src, dst);
        assert_eq!(signature_counts(&tm), (0.0, 3.0 * round as f64));
    }
    wait_signed(&tm, 0.0);
}
