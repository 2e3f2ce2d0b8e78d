//! Issue 7: several mirror-source processes sharing one PostgreSQL job store. These run
//! when TEST_DATABASE_URL names a PostgreSQL server (as .ci/run sets it); each test
//! makes its own database.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;
use crate::postgres::fresh_database;

/// Two sources on one database with the same configuration; their instance ids start
/// with "a-" and "b-".
fn two_sources(dir: &Path, config: &Path, db: &str) -> (Proc, Proc) {
    let one = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        App::source(&d, config)
            .args(&["--db", db, "--instance-name", name])
            .spawn()
    };
    (one("a"), one("b"))
}

/// The instance that ran a job, each time one started or took it over (its events
/// `started` and job-level `resumed`).
fn runs_of(source: &str, id: &str) -> Vec<String> {
    events(source, id)
        .iter()
        .filter(|e| (e["kind"] == "started" || e["kind"] == "resumed") && e["target"] == "")
        .map(|e| e["data"]["instance"].as_str().unwrap_or("").to_string())
        .collect()
}

fn wait_finished(source: &str, id: &str, secs: u64) -> Value {
    wait_until(Duration::from_secs(secs), || {
        let j = show_job(source, id);
        match j["state"].as_str() {
            Some("queued" | "running") => Err(format!("job {id} did not finish: {j}")),
            _ => Ok(j),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(any(ci, test_database)),
    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
)]
async fn ten_jobs_on_two_instances_each_run_exactly_once() {
    let db = fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut sites = Vec::new();
    let mut toml = String::new();
    for i in 0..10 {
        let src = tmp.path().join(format!("src{i}"));
        write(&src, "index.html", format!("<h1>site {i}</h1>").as_bytes());
        write(&src, &format!("media/{i}.bin"), &bytes(i, 50_000));
        sites.push(format!(
            "s{i}={}",
            tmp.path().join(format!("dst{i}")).display()
        ));
        toml.push_str(&format!(
            "[[channel]]\nname = \"ch{i}\"\nsource = \"{}\"\n\n",
            src.display()
        ));
    }
    let target = sites
        .iter()
        .fold(App::target(tmp.path()), |app, s| {
            app.arg(format!("--site={s}"))
        })
        .spawn();
    let mut config = String::new();
    for (i, chunk) in toml.split("\n\n").filter(|c| !c.is_empty()).enumerate() {
        config.push_str(&format!(
            "{chunk}\n  [[channel.target]]\n  name = \"t\"\n  url = \"{}\"\n  site = \"s{i}\"\n\n",
            target.url()
        ));
    }
    let config_path = tmp.path().join("mirror.toml");
    std::fs::write(&config_path, config).unwrap();
    let (a, b) = two_sources(tmp.path(), &config_path, &db);

    // Ten jobs, asked of both instances alternately, as fast as possible.
    let ids: Vec<String> = (0..10)
        .map(|i| {
            let via = if i % 2 == 0 { &a } else { &b };
            let out = mirrorctl(&via.url(), &["start", &format!("ch{i}")]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect();
    let mut by_instance: BTreeMap<String, usize> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let j = wait_finished(&a.url(), id, 120);
        assert_eq!(j["state"], "succeeded", "{j}");
        let runs = runs_of(&b.url(), id);
        assert_eq!(
            runs.len(),
            1,
            "job {id} started {} times: {runs:?}",
            runs.len()
        );
        *by_instance.entry(runs[0].clone()).or_default() += 1;
        assert_same_tree(
            &tmp.path().join(format!("src{i}")),
            &tmp.path().join(format!("dst{i}")),
        );
    }
    eprintln!("jobs per instance: {by_instance:?}");
    assert_eq!(by_instance.values().sum::<usize>(), 10);
}

/// A slow target keeps a job in flight; returns (target, config, src, dst).
fn slow_setup(
    tmp: &Path,
) -> (
    Proc,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let (src, dst) = (tmp.join("src"), tmp.join("dst"));
    for i in 0..30 {
        write(&src, &format!("media/f{i:02}.bin"), &bytes(i, 100_000));
    }
    let target = App::target(tmp)
        .site(&dst)
        .envs(&[("CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS", "150")])
        .spawn();
    let config = write_config(
        tmp,
        &src,
        &target.url(),
        "package_bytes = 65536\nwindow = 1",
    );
    (target, config, src, dst)
}

/// Starts a job and waits until it has acknowledged packages; returns (job, runner).
async fn start_in_flight(via: &str, min_acked: u64) -> (String, String) {
    let out = mirrorctl(via, &["start", "site"]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    wait_until(Duration::from_secs(60), || {
        let j = show_job(via, &id);
        let acked = j["targets"][0]["packages_acked"].as_u64().unwrap_or(0);
        ready(acked >= min_acked, || format!("job never got going: {j}"))
    });
    // The `started` event names the instance; read the replay only that far.
    let mut c =
        cms_mirror::pb::source_service_client::SourceServiceClient::connect(via.to_string())
            .await
            .unwrap();
    let mut s = c
        .watch_jobs(cms_mirror::pb::WatchJobsRequest {
            job_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(e) = s.message().await.unwrap() {
        if e.kind == "started" {
            let d: Value = serde_json::from_str(&e.data_json).unwrap();
            return (id, d["instance"].as_str().unwrap().to_string());
        }
    }
    panic!("job {id} has no started event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(any(ci, test_database)),
    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
)]
async fn a_killed_instance_s_job_is_finished_by_the_other_from_its_checkpoint() {
    let db = fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (_target, config, src, dst) = slow_setup(tmp.path());
    let (mut a, mut b) = two_sources(tmp.path(), &config, &db);
    let (id, runner) = start_in_flight(&a.url(), 5).await;
    // Kill the process that runs the job.
    let survivor = if runner.starts_with("a-") {
        a.kill9();
        b.url()
    } else {
        b.kill9();
        a.url()
    };
    let j = wait_finished(&survivor, &id, 120);
    assert_eq!(j["state"], "succeeded", "{j}");
    // Exact progress across the takeover: done is total, nothing counted twice.
    let t = &j["targets"][0];
    assert_eq!(t["items_done"], t["items_total"], "{t}");
    assert_eq!(t["bytes_done"], t["bytes_total"], "{t}");
    // The file in flight at the kill is sent again whole by the new plan (at most one
    // file more than the tree); a package the target applied whose ack the dead instance
    // never stored is in neither the old count nor the new plan (at most the window, one
    // 64 KiB package, less).
    let total = t["bytes_total"].as_u64().unwrap();
    assert!(
        (30 * 100_000 - 65_536..31 * 100_000).contains(&total),
        "{total}"
    );
    assert_same_tree(&src, &dst);
    let evs = events(&survivor, &id);
    let runs = runs_of(&survivor, &id);
    let kinds: Vec<String> = evs
        .iter()
        .map(|e| format!("{} {} {}", e["kind"], e["target"], e["data"]))
        .filter(|k| !k.starts_with("\"progress"))
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?} {kinds:#?}");
    assert_ne!(runs[0], runs[1], "the same instance ran it twice");
    let resumed: Vec<u64> = evs
        .iter()
        .filter(|e| e["kind"] == "resumed" && e["target"] != "")
        .map(|e| e["data"]["from_seq"].as_u64().unwrap())
        .collect();
    assert!(
        resumed.iter().any(|&s| s > 5),
        "the takeover did not resume from the checkpoint: {resumed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(any(ci, test_database)),
    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
)]
async fn a_watch_on_one_instance_follows_a_job_the_other_runs() {
    let db = fresh_database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (_target, config, src, dst) = slow_setup(tmp.path());
    let (a, b) = two_sources(tmp.path(), &config, &db);
    let (id, runner) = start_in_flight(&a.url(), 2).await;
    // Watch, live, through the instance that does not run the job.
    let other = if runner.starts_with("a-") { &b } else { &a };
    let out = mirrorctl(&other.url(), &["watch", &id, "--json"]);
    let evs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "gap or duplicate"
    );
    assert_eq!(evs.last().unwrap()["kind"], "finished", "{evs:?}");
    assert_eq!(evs.last().unwrap()["data"]["state"], "succeeded");
    let progress = evs.iter().filter(|e| e["kind"] == "progress").count();
    assert!(progress >= 3, "only {progress} progress events");
    assert_same_tree(&src, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(any(ci, test_database)),
    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
)]
async fn losing_the_database_mid_job_pauses_it_and_nothing_is_counted_twice() {
    let db = fresh_database().await;
    let name = db.rsplit('/').next().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let (_target, config, src, dst) = slow_setup(tmp.path());
    let source = App::source(tmp.path(), &config)
        .args(&["--db", &db])
        .spawn();
    let (id, _) = start_in_flight(&source.url(), 3).await;

    // The database goes away: no new connections, the open ones cut.
    let admin = cms_mirror::db::connect_raw(&std::env::var("TEST_DATABASE_URL").unwrap())
        .await
        .unwrap();
    let run = |sql: String| {
        let admin = admin.clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .unwrap()
        }
    };
    run(format!(
        "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"
    ))
    .await;
    run(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ))
    .await;
    std::thread::sleep(Duration::from_secs(4));
    // Meanwhile the job could not finish: its end cannot be recorded.
    let out = mirrorctl(&source.url(), &["show", &id, "--json"]);
    assert!(
        !out.status.success(),
        "the store answered while it was gone"
    );
    run(format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")).await;

    let j = wait_finished(&source.url(), &id, 120);
    assert_eq!(j["state"], "succeeded", "{j}");
    let t = &j["targets"][0];
    assert_eq!(t["items_done"], t["items_total"], "{t}");
    assert_eq!(t["bytes_done"], t["bytes_total"], "{t}");
    assert_eq!(t["bytes_total"].as_u64().unwrap(), 30 * 100_000, "{t}");
    assert_same_tree(&src, &dst);
}

#[test]
fn an_unreachable_database_at_start_is_a_clear_error_with_the_password_redacted() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        &tmp.path().join("src"),
        "http://127.0.0.1:1",
        "",
    );
    let port = free_addr().rsplit(':').next().unwrap().to_string();
    let url = format!("postgres://mirror:s3cret-pw@127.0.0.1:{port}/nothing");
    let out = std::process::Command::new(bin_dir().join("mirror-source"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
            "--db",
            &url,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("postgres://mirror:***@127.0.0.1:{port}/nothing")),
        "{err}"
    );
    assert!(!err.contains("s3cret-pw"), "{err}");
}
