//! Issue 2: a whole job between two real processes, its record, and bad input.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use crate::helpers::*;

#[test]
fn full_mirror_is_identical_and_the_job_record_is_true() {
    let mut items = 0;
    let Mirror {
        tmp,
        src,
        dst,
        config: _config,
        target,
        source,
    } = Mirror::start(
        |src| {
            items = make_tree(src);
        },
        "delete = true",
    );
    // The root's own mode and time are mirrored too (rsync -a does).
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    set_mtime(&src, 1_500_000_000, 123_456_789);

    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "exit code of start --wait: {job:#}");
    assert_same_tree(&src, &dst);
    let (s, d) = (src.metadata().unwrap(), dst.metadata().unwrap());
    assert_eq!(d.permissions().mode() & 0o7777, 0o750);
    assert_eq!((d.mtime(), d.mtime_nsec()), (s.mtime(), s.mtime_nsec()));
    // Both services turn transparent huge pages off for themselves (memory and CPU).
    for p in [&source, &target] {
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("THP_enabled:"))
            .expect("THP_enabled in /proc/PID/status (Linux 5.0 and later)");
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
    assert!(
        !dst.join(".cms-mirror-staging").exists(),
        "staging area left in the site"
    );

    // The job record: state, counters equal to what the test created, per-target outcome.
    let snap = snapshot(&src);
    let bytes: u64 = snap.values().map(|n| n.size).sum();
    let id = job["id"].as_str().unwrap().to_string();
    let out = mirrorctl(&source.url(), &["show", &id, "--json"]);
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["state"], "succeeded");
    assert_eq!(shown["trigger"], "admin");
    assert!(!shown["finished_at"].as_str().unwrap().is_empty());
    let t = &shown["targets"][0];
    assert_eq!(t["target"], "web1");
    assert_eq!(t["state"], "committed");
    assert_eq!(t["items_total"], items as u64);
    assert_eq!(t["items_done"], items as u64);
    assert_eq!(t["bytes_total"], bytes);
    assert_eq!(t["bytes_done"], bytes);
    assert_eq!(t["item_errors"], 0);
    // 300 KB in 64 KiB packages: the large file alone spans more than three packages.
    assert!(t["packages_acked"].as_u64().unwrap() > 4, "{t}");
    assert_eq!(t["packages_acked"], t["packages_sent"]);
    assert_eq!(shown["item_errors"].as_array().unwrap().len(), 0);

    // The same through the store itself.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!(
            "sqlite://{}",
            tmp.path().join("source-data/source.db").display()
        );
        let db = cms_mirror::db::connect(&url, cms_mirror::db::Schema::Source)
            .await
            .unwrap();
        let store = cms_mirror::jobstore::JobStore::new(db);
        let row = store.get_job(&id).await.unwrap();
        assert_eq!(row.state, "succeeded");
        assert!(row.started_at.is_some() && row.finished_at.is_some());
        let tr = &store.targets(&id).await.unwrap()[0];
        assert_eq!((tr.items_done, tr.bytes_done as u64), (items as i64, bytes));
        let evs = store.events_of_job(&id, 0).await.unwrap();
        let seqs: Vec<i64> = evs.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=evs.len() as i64).collect::<Vec<_>>(),
            "event sequence has gaps"
        );
        assert_eq!(evs.first().unwrap().kind, "queued");
        assert_eq!(evs.last().unwrap().kind, "finished");
    });
}

#[test]
fn one_job_fans_out_to_several_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let dirs: Vec<_> = (0..3).map(|i| tmp.path().join(format!("t{i}"))).collect();
    let targets: Vec<Proc> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let td = tmp.path().join(format!("tdata{i}"));
            std::fs::create_dir_all(&td).unwrap();
            App::target(&td).site(d).spawn()
        })
        .collect();
    let mut cfg = format!(
        "[[channel]]\nname = \"site\"\nsource = \"{}\"\npackage_bytes = 65536\n",
        src.display()
    );
    for (i, t) in targets.iter().enumerate() {
        cfg += &format!(
            "[[channel.target]]\nname = \"web{i}\"\nurl = \"{}\"\nsite = \"main\"\n",
            t.url()
        );
    }
    let config = tmp.path().join("mirror.toml");
    std::fs::write(&config, cfg).unwrap();
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let states: BTreeMap<String, String> = job["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap().to_string(),
                t["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(states.len(), 3);
    assert!(states.values().all(|s| s == "committed"), "{states:?}");
    for d in &dirs {
        assert_same_tree(&src, d);
    }
}

#[test]
fn special_files_are_item_errors_and_the_job_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let fifo = src.join("a/pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "completed_with_errors exits 1: {job:#}");
    assert_eq!(job["state"], "completed_with_errors");
    let errs = job["item_errors"].as_array().unwrap();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0]["path"], "a/pipe");
    assert_eq!(errs[0]["code"], "special_file");
    assert!(errs[0]["message"].as_str().unwrap().contains("fifo"));
    std::fs::remove_file(&fifo).unwrap();
    // Everything else arrived; a/ differs only by its mtime (the fifo was in it).
    let (a, b) = (snapshot(&src), snapshot(&dst));
    for (k, v) in &a {
        if k != "a" {
            assert_eq!(Some(v), b.get(k), "{k}");
        }
    }
}

#[test]
fn bad_input_gives_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);

    // A malformed config: the service does not start and names the file and key.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[[channel]]\nname = \"x\"\nsource = \"/tmp\"\nmax_delete = \"lots\"\n[[channel.target]]\nurl = \"http://127.0.0.1:1\"\nsite = \"main\"\n").unwrap();
    let out = std::process::Command::new(bin_dir().join("mirror-source"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--config",
            bad.to_str().unwrap(),
            "--data-dir",
            tmp.path().join("d").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("max_delete") && err.contains("\"x\""),
        "{err}"
    );

    // An unknown channel: NOT_FOUND from StartJob, non-zero exit, no job.
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).spawn();
    let out = mirrorctl(&source.url(), &["start", "nope", "--wait"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown channel \"nope\""));

    // An unreachable target: the job fails, naming the target's URL.
    let dir2 = tmp.path().join("unreach");
    std::fs::create_dir_all(&dir2).unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let cfg2 = write_config(&dir2, &src, &dead_url, "");
    let source2 = App::source(&dir2, &cfg2).spawn();
    let (code, job) = run_job(&source2.url(), &[]);
    assert_eq!(code, 2);
    assert_eq!(job["state"], "failed");
    assert!(
        job["error"].as_str().unwrap().contains(&dead_url),
        "{job:#}"
    );

    // A missing source directory: the job fails naming it; the target is untouched.
    let dir3 = tmp.path().join("nosrc");
    std::fs::create_dir_all(&dir3).unwrap();
    let missing = tmp.path().join("does-not-exist");
    let cfg3 = write_config(&dir3, &missing, &target.url(), "");
    let source3 = App::source(&dir3, &cfg3).spawn();
    let (code, job) = run_job(&source3.url(), &[]);
    assert_eq!(code, 2);
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains(missing.to_str().unwrap()),
        "{job:#}"
    );
    assert_eq!(
        std::fs::read_dir(&dst).unwrap().count(),
        0,
        "target changed"
    );
}
