//! Issue 4: jobs survive faults. Real processes, real kills, a TCP proxy that cuts
//! connections, a corrupted package.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// A TCP proxy that cuts every connection each time `cut_every` bytes went upstream,
/// at most `max_cuts` times.
struct CutProxy {
    addr: String,
    cuts: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

fn cut_proxy(upstream: String, cut_every: u64, max_cuts: u64) -> CutProxy {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cuts = Arc::new(AtomicU64::new(0));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (gen_tx, _) = tokio::sync::watch::channel(0u64);
    let gen_tx = Arc::new(gen_tx);
    let since = Arc::new(AtomicU64::new(0));
    let c = cuts.clone();
    rt.spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (gen_tx, since, cuts) = (gen_tx.clone(), since.clone(), c.clone());
            let mut gen_rx = gen_tx.subscribe();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let mut up = [0u8; 16384];
                let mut down = [0u8; 16384];
                loop {
                    tokio::select! {
                        n = cr.read(&mut up) => {
                            let Ok(n) = n else { return };
                            if n == 0 || sw.write_all(&up[..n]).await.is_err() { return; }
                            let total = since.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                            if total >= cut_every && cuts.load(Ordering::SeqCst) < max_cuts {
                                since.store(0, Ordering::SeqCst);
                                cuts.fetch_add(1, Ordering::SeqCst);
                                gen_tx.send_modify(|g| *g += 1);
                                return;
                            }
                        }
                        n = sr.read(&mut down) => {
                            let Ok(n) = n else { return };
                            if n == 0 || cw.write_all(&down[..n]).await.is_err() { return; }
                        }
                        _ = gen_rx.changed() => return,
                    }
                }
            });
        }
    });
    CutProxy {
        addr: format!("http://{addr}"),
        cuts,
        _rt: rt,
    }
}

#[test]
fn a_mirror_completes_through_a_connection_cut_every_n_packages() {
    for n in [3u64, 7] {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        make_many(&src, 2000);
        let target = App::target(tmp.path()).site(&dst).spawn();
        let package = 32 * 1024u64;
        let proxy = cut_proxy(target.addr.clone(), n * package, 6);
        let window = 4u64;
        let config = write_config(
            tmp.path(),
            &src,
            &proxy.addr,
            &format!("package_bytes = {package}\nwindow = {window}\nretry_budget = 20"),
        );
        let source = App::source(tmp.path(), &config).spawn();
        let (code, job) = run_job(&source.url(), &[]);
        assert_eq!(code, 0, "N={n}: {job:#}");
        assert_same_tree(&src, &dst);
        let cuts = proxy.cuts.load(Ordering::SeqCst);
        assert!(cuts >= 3, "N={n}: the proxy cut only {cuts} times");
        let t = &job["targets"][0];
        let (sent, last) = (
            t["packages_sent"].as_u64().unwrap(),
            t["last_acked_seq"].as_u64().unwrap(),
        );
        assert!(sent >= last, "{t}");
        // Re-sent after the cuts: at most one window per cut.
        assert!(
            sent - last <= cuts * window,
            "N={n}: {} packages re-sent for {cuts} cuts: {t}",
            sent - last
        );
        assert!(t["reconnects"].as_u64().unwrap() >= 1, "{t}");
    }
}

#[test]
fn kill_9_of_the_target_at_random_points() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_many(&src, 3000);
    let mut target = App::target(tmp.path()).site(&dst).spawn();
    let addr = target.addr.clone();
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "package_bytes = 16384\nretry_budget = 30",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let job = start_job(&source.url());
    let mut rng = fastrand::Rng::with_seed(7);
    let mut acked = 2;
    for _ in 0..3 {
        wait_acked(&source.url(), &job, acked);
        std::thread::sleep(Duration::from_millis(rng.u64(0..200)));
        target.kill9();
        std::thread::sleep(Duration::from_millis(rng.u64(50..300)));
        target = App::target(tmp.path()).site(&dst).listen(&addr).spawn();
        acked = show_job(&source.url(), &job)["targets"][0]["packages_acked"]
            .as_u64()
            .unwrap()
            + 5;
    }
    assert_succeeds(&source.url(), &job);
    assert_same_tree(&src, &dst);
    assert!(
        !dst.join(".cms-mirror-staging").exists(),
        "temp files remain"
    );
}

/// Large bodies reach the disk with direct I/O chunk by chunk; a target killed in the
/// middle of them finishes its staged files after the restart (their next chunks direct
/// again, read back for the hash) and the copy is exact.
#[test]
fn kill_9_of_the_target_inside_bodies_written_with_direct_io() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    for i in 0..4u64 {
        let size = 3 * 1024 * 1024 + 1000 * i as usize;
        write(&src, &format!("media/v{i}.bin"), &bytes(100 + i, size));
    }
    let tm = free_addr();
    let mut target = App::target(tmp.path()).site(&dst).spawn();
    let addr = target.addr.clone();
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "package_bytes = 262144\nwindow = 2\nretry_budget = 30",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let job = start_job(&source.url());
    let mut acked = 3;
    for _ in 0..2 {
        wait_acked(&source.url(), &job, acked);
        target.kill9();
        std::thread::sleep(Duration::from_millis(100));
        target = App::target(tmp.path())
            .site(&dst)
            .listen(&addr)
            .args(&["--metrics-listen", &tm])
            .spawn();
        acked = show_job(&source.url(), &job)["targets"][0]["packages_acked"]
            .as_u64()
            .unwrap()
            + 8;
    }
    assert_succeeds(&source.url(), &job);
    assert_same_tree(&src, &dst);
    assert!(
        !dst.join(".cms-mirror-staging").exists(),
        "temp files remain"
    );
    let (direct, page) = direct_bytes(&tm);
    assert!(
        direct >= 1024.0 * 1024.0,
        "{direct} bytes direct after the restart\n{page}"
    );
}

#[test]
fn kill_9_of_the_source_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_many(&src, 3000);
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "package_bytes = 16384\nwindow = 2",
    );
    let mut source = App::source(tmp.path(), &config).spawn();
    let job = start_job(&source.url());
    wait_acked(&source.url(), &job, 10);
    source.kill9();
    // The checkpoint the dead instance left.
    let db_path = tmp.path().join("source-data/source.db");
    let checkpoint = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let db = cms_mirror::db::connect(
            &format!("sqlite://{}", db_path.display()),
            cms_mirror::db::Schema::Source,
        )
        .await
        .unwrap();
        cms_mirror::jobstore::JobStore::new(db)
            .targets(&job)
            .await
            .unwrap()[0]
            .checkpoint_seq as u64
    });
    assert!(checkpoint >= 10);
    let source = App::source(tmp.path(), &config).spawn();
    assert_eq!(wait_for_job(&source.url(), &job), 0);
    assert_same_tree(&src, &dst);
    // The new instance resumed right after the checkpoint: no acknowledged package again.
    let resumed: Vec<u64> = events(&source.url(), &job)
        .into_iter()
        .filter(|e| e["kind"] == "resumed" && e["target"] == "web1")
        .map(|e| e["data"]["from_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        resumed.first(),
        Some(&(checkpoint + 1)),
        "resume points: {resumed:?}"
    );
    let j = show_job(&source.url(), &job);
    let t = &j["targets"][0];
    assert_eq!(j["state"], "succeeded");
    assert!(
        t["packages_sent"].as_u64().unwrap() - t["last_acked_seq"].as_u64().unwrap() <= 2,
        "{t}"
    );
}

#[test]
fn a_corrupted_package_is_detected_and_sent_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config)
        .envs(&[("CMS_MIRROR_FAILPOINT_CORRUPT_SEQ", "2")])
        .spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    // The refused package and those sent after it in the window went again.
    assert!(retried(&job) >= 1, "{job:#}");
    assert_same_tree(&src, &dst);
}

/// Packages sent again, checked against the rule every finished job keeps: each
/// package sent was acknowledged once or sent again.
fn retried(job: &serde_json::Value) -> u64 {
    let t = &job["targets"][0];
    let n = |k: &str| t[k].as_u64().unwrap();
    assert_eq!(
        n("packages_sent"),
        n("packages_acked") + n("packages_retried"),
        "{t:#}"
    );
    n("packages_retried")
}

#[test]
fn cancel_stops_the_job_and_leaves_the_target_consistent() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(
        |src| make_many(src, 3000),
        "package_bytes = 16384\nwindow = 2",
    );
    let job = start_job(&source.url());
    wait_acked(&source.url(), &job, 3);
    let out = mirrorctl(&source.url(), &["cancel", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_for_job(&source.url(), &job), 2);
    let j = show_job(&source.url(), &job);
    assert_eq!(j["state"], "cancelled", "{j:#}");
    assert_eq!(j["targets"][0]["state"], "cancelled");
    let acked_at_end = j["targets"][0]["packages_acked"].as_u64().unwrap();
    let planned = j["targets"][0]["items_total"].as_u64().unwrap();
    assert!(
        j["targets"][0]["items_done"].as_u64().unwrap() < planned,
        "the job ran to its end: {j:#}"
    );
    // Honest: what the target applied before the cancel is counted, no more, no less.
    assert_eq!(
        j["targets"][0]["items_done"].as_u64().unwrap(),
        snapshot(&dst).len() as u64,
        "counted items are not the items that landed: {j:#}"
    );
    // Consistent: every visible file is a complete copy of its source; no staging left.
    assert!(
        !dst.join(".cms-mirror-staging").exists(),
        "staged files left after cancel"
    );
    let (a, b) = (snapshot(&src), snapshot(&dst));
    for (k, n) in b.iter().filter(|(_, n)| n.kind == "file") {
        assert_eq!(
            a.get(k).map(|x| &x.content),
            Some(&n.content),
            "{k} is not a complete copy"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        show_job(&source.url(), &job)["targets"][0]["packages_acked"]
            .as_u64()
            .unwrap(),
        acked_at_end,
        "still sending after cancel"
    );
}

/// A target site on a 2 MiB tmpfs (unmounted on drop); mounting it needs root. Its
/// targets run with `--min-free-space 0`: the disk is below the default minimum.
pub(crate) struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    pub(crate) fn mount(dst: &std::path::Path) -> SmallDisk {
        std::fs::create_dir_all(dst).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=2m",
                "tmpfs",
                dst.to_str().unwrap(),
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot mount a tmpfs at {} (needs root)", dst.display());
        SmallDisk(dst.to_path_buf())
    }

    fn grow(&self) {
        assert!(
            std::process::Command::new("mount")
                .args(["-o", "remount,size=20m", self.0.to_str().unwrap()])
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Every file visible in `dst` is a complete copy of its source.
fn assert_nothing_partial(src: &std::path::Path, dst: &std::path::Path) {
    let a = snapshot(src);
    for (k, n) in snapshot(dst)
        .iter()
        .filter(|(k, n)| n.kind == "file" && !k.starts_with(".cms-mirror-staging/"))
    {
        assert_eq!(
            a.get(k).map(|x| &x.content),
            Some(&n.content),
            "{k} is truncated"
        );
    }
}

fn media_files(src: &std::path::Path) {
    for i in 0..12 {
        write(src, &format!("media/f{i:02}.bin"), &bytes(i, 300_000));
    }
}

#[test]
#[cfg_attr(not(any(ci, root_user)), ignore = "needs root to mount a small tmpfs")]
fn a_full_disk_on_the_target_is_a_clear_error_and_a_later_job_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    media_files(&src);
    let disk = SmallDisk::mount(&dst);
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--min-free-space", "0"])
        .spawn();
    // Files span packages: chunks of a file that then finds no room were acknowledged.
    let config = write_config(tmp.path(), &src, &target.url(), "package_bytes = 65536");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    // The default, on_disk_full = "fail": the job fails and says why.
    assert_eq!(code, 2, "{job:#}");
    assert_eq!(job["state"], "failed", "{job:#}");
    assert!(
        job["error"].as_str().unwrap().contains("disk full"),
        "{job:#}"
    );
    let errs = job["item_errors"].as_array().unwrap();
    assert!(!errs.is_empty());
    assert!(
        errs.iter()
            .all(|e| e["code"] == "no_space"
                && e["message"].as_str().unwrap().contains("No space left")),
        "{errs:?}"
    );
    assert_nothing_partial(&src, &dst);
    assert!(
        !dst.join(".cms-mirror-staging").exists(),
        "the failed session's staged files remain"
    );
    // One source of truth: the summary says what the target line says, and that is
    // what landed (a file discarded for want of space is not counted).
    let t = &job["targets"][0];
    let landed = snapshot(&dst);
    let files_landed = landed.values().filter(|n| n.kind == "file").count() as u64;
    let bytes_landed: u64 = landed.values().map(|n| n.size).sum();
    assert_eq!(t["bytes_done"].as_u64().unwrap(), bytes_landed, "{job:#}");
    assert!(t["items_done"].as_u64().unwrap() >= files_landed, "{job:#}");
    let summary = job["summary"].as_str().unwrap();
    let expected = format!(
        "mirrored {} items ({})",
        t["items_done"],
        bytesize::ByteSize(t["bytes_done"].as_u64().unwrap())
    );
    assert!(summary.starts_with(&expected), "{summary} / {expected}");
    // Space freed: the next job completes and the trees are identical.
    disk.grow();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_same_tree(&src, &dst);
    assert!(!dst.join(".cms-mirror-staging").exists());
}

/// Waits until the job's target waits for space (the job running all along).
fn wait_for_space_wait(source_url: &str, job: &str) {
    wait_until(Duration::from_secs(60), || {
        let j = show_job(source_url, job);
        assert!(j["state"] == "running" || j["state"] == "queued", "{j:#}");
        let waiting = j["targets"][0]["state"] == "waiting_for_space";
        ready(waiting, || format!("never waited for space: {j:#}"))
    })
}

#[test]
#[cfg_attr(not(any(ci, root_user)), ignore = "needs root to mount a small tmpfs")]
fn a_full_disk_with_on_disk_full_wait_waits_for_space_then_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    media_files(&src);
    let disk = SmallDisk::mount(&dst);
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--min-free-space", "0"])
        .spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "on_disk_full = \"wait\"");
    let source = App::source(tmp.path(), &config).spawn();
    let job = start_job(&source.url());
    wait_for_space_wait(&source.url(), &job);
    assert_nothing_partial(&src, &dst);
    disk.grow();
    assert_succeeds(&source.url(), &job);
    let j = show_job(&source.url(), &job);
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(j["item_errors"].as_array().map(Vec::len), Some(0), "{j:#}");
    assert_same_tree(&src, &dst);
}

/// Chunks of 256 KiB are written after their package is staged (while the next is
/// staged): a full disk found then fails the package as a whole, the job waits for
/// space, and the package sent again completes the body (read back to be hashed).
#[test]
#[cfg_attr(not(any(ci, root_user)), ignore = "needs root to mount a small tmpfs")]
fn a_full_disk_under_a_large_body_waits_for_space_then_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    write(&src, "media/large.bin", &bytes(7, 3_000_000));
    write(&src, "media/small.txt", b"beside it");
    let disk = SmallDisk::mount(&dst);
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--min-free-space", "0"])
        .spawn();
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "on_disk_full = \"wait\"\npackage_bytes = 262144\nwindow = 4",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let job = start_job(&source.url());
    wait_for_space_wait(&source.url(), &job);
    assert_nothing_partial(&src, &dst);
    assert!(!dst.join("media/large.bin").exists());
    disk.grow();
    assert_succeeds(&source.url(), &job);
    let j = show_job(&source.url(), &job);
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(j["item_errors"].as_array().map(Vec::len), Some(0), "{j:#}");
    // Every refusal was "disk full" (waited for), none a plain "send again"; what was
    // in flight went again after the wait.
    let ev = events(&source.url(), &job);
    assert!(
        !ev.iter().any(|e| e["kind"] == "rewind"
            && e["data"]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("must be sent again")),
        "{ev:#?}"
    );
    assert!(retried(&j) >= 1, "{j:#}");
    assert_same_tree(&src, &dst);
}

#[test]
fn a_package_that_always_fails_its_checksum_gives_its_items_up_and_the_job_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_many(&src, 300);
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "package_bytes = 16384");
    let source = App::source(tmp.path(), &config)
        .envs(&[
            ("CMS_MIRROR_FAILPOINT_CORRUPT_SEQ", "3"),
            ("CMS_MIRROR_FAILPOINT_CORRUPT_TIMES", "5"),
        ])
        .spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "{job:#}");
    assert_eq!(job["state"], "completed_with_errors", "{job:#}");
    assert!(retried(&job) >= 5, "{job:#}");
    let failed: std::collections::BTreeSet<String> = job["item_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["code"], "checksum_mismatch", "{e}");
            assert_eq!(e["retryable"], true, "{e}");
            e["path"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(!failed.is_empty());
    // Every other item arrived intact; the given-up ones are not there at all.
    let (a, b) = (snapshot(&src), snapshot(&dst));
    for (k, n) in &a {
        if failed.contains(k) {
            assert!(
                !b.contains_key(k) || n.kind == "dir",
                "{k} should have been given up"
            );
        } else if n.kind == "file" {
            assert_eq!(b.get(k).map(|x| &x.content), Some(&n.content), "{k}");
        }
    }
    // A later job sends them again.
    let source = {
        drop(source);
        App::source(tmp.path(), &config).spawn()
    };
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_same_tree(&src, &dst);
}

#[test]
fn a_file_changed_while_read_is_read_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    // media/big.bin spans several packages; it grows while its first read is under way.
    let source = App::source(tmp.path(), &config)
        .envs(&[("CMS_MIRROR_FAILPOINT_CHANGE", "media/big.bin:1")])
        .spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_eq!(
        std::fs::metadata(src.join("media/big.bin")).unwrap().len(),
        300_001
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn a_file_that_keeps_changing_is_reported_and_the_target_keeps_its_old_version() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).spawn();
    assert_eq!(run_job(&source.url(), &[]).0, 0);
    drop(source);
    let old = std::fs::read(dst.join("media/big.bin")).unwrap();
    write(&src, "media/big.bin", &bytes(99, 300_000));
    write(&src, "index.html", b"<h1>new home</h1>");
    let source = App::source(tmp.path(), &config)
        .envs(&[("CMS_MIRROR_FAILPOINT_CHANGE", "media/big.bin:1000")])
        .spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "{job:#}");
    let errs = job["item_errors"].as_array().unwrap();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0]["path"], "media/big.bin");
    assert_eq!(errs[0]["code"], "changed_while_read");
    assert!(
        errs[0]["message"].as_str().unwrap().contains("4 attempts"),
        "{errs:?}"
    );
    // Never half-old half-new: the previous version, exactly.
    assert_eq!(std::fs::read(dst.join("media/big.bin")).unwrap(), old);
    assert_eq!(
        std::fs::read(dst.join("index.html")).unwrap(),
        b"<h1>new home</h1>"
    );
    assert!(!dst.join(".cms-mirror-staging").exists());
}

#[test]
fn max_errors_turns_too_many_item_errors_into_a_failed_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    for i in 0..3 {
        assert!(
            std::process::Command::new("mkfifo")
                .arg(src.join(format!("docs/pipe{i}")))
                .status()
                .unwrap()
                .success()
        );
    }
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "max_errors = 2");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 2, "{job:#}");
    assert_eq!(job["state"], "failed");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("3 item errors exceed max_errors = 2"),
        "{job:#}"
    );
    assert_eq!(job["item_errors"].as_array().unwrap().len(), 3);
}

#[test]
fn a_stopped_target_is_detected_as_hung_and_the_job_resumes_when_it_continues() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target,
        source,
    } = Mirror::start(
        |src| make_many(src, 2000),
        "package_bytes = 16384\nwindow = 2\nack_timeout_secs = 2\nretry_budget = 40",
    );
    let job = start_job(&source.url());
    wait_acked(&source.url(), &job, 3);
    let pid = target.child.id().to_string();
    let signal = |s: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([s, &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    signal("-STOP");
    // Within a second (half the ack timeout) the target shows as stalled, not sending.
    wait_until(Duration::from_secs(10), || {
        let j = show_job(&source.url(), &job);
        let state = &j["targets"][0]["state"];
        ready(state == "stalled", || format!("state {state}, not stalled"))
    });
    wait_until(Duration::from_secs(15), || {
        let j = show_job(&source.url(), &job);
        let noticed = j["targets"][0]["reconnects"].as_u64().unwrap_or(0) >= 1;
        ready(noticed, || {
            format!("a stopped target went unnoticed: {j:#}")
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    signal("-CONT");
    assert_succeeds(&source.url(), &job);
    assert_same_tree(&src, &dst);
    let ev = events(&source.url(), &job);
    assert!(
        ev.iter().any(|e| e["kind"] == "target_disconnected"
            && e["data"]["error"]
                .as_str()
                .unwrap_or("")
                .contains("no acknowledgement")),
        "{ev:#?}"
    );
    assert!(ev.iter().any(|e| e["kind"] == "stalled"), "{ev:#?}");
    // The counters tell what happened: every package sent was acknowledged once, or
    // sent again (those in flight when the target stopped).
    let t = &show_job(&source.url(), &job)["targets"][0];
    let n = |k: &str| t[k].as_u64().unwrap();
    assert!(n("packages_retried") >= 1, "{t:#}");
    assert_eq!(
        n("packages_sent"),
        n("packages_acked") + n("packages_retried"),
        "{t:#}"
    );
}
