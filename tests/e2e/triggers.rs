//! Issue 6: hooks after commit, path-list jobs, coalesced triggers, schedules, the watch
//! trigger.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// A tiny HTTP server that records JSON bodies (and each request's header lines) and
/// answers every request with `status`.
struct HookServer {
    url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    headers: Arc<Mutex<Vec<Vec<String>>>>,
}

fn hook_server(status: u16) -> HookServer {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/purge", l.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let headers = Arc::new(Mutex::new(Vec::new()));
    let (b, h) = (bodies.clone(), headers.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                lines.push(line.trim_end().to_ascii_lowercase());
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            h.lock().unwrap().push(lines);
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            if let Ok(v) = serde_json::from_slice(&body) {
                b.lock().unwrap().push(v);
            }
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    HookServer {
        url,
        bodies,
        headers,
    }
}

#[test]
fn a_cdn_hook_gets_its_headers_a_key_from_a_file_and_directory_urls() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    write(&src, "index.html", b"home");
    write(&src, "docs/index.html", b"docs");
    write(&src, "docs/a.css", b"a");
    let cdn = hook_server(200);
    let key = tmp.path().join("purge.key");
    std::fs::write(&key, "first-key\n").unwrap();
    let toml = tmp.path().join("target.toml");
    let site = |key_file: &str| {
        format!(
            "[[site]]\nname = \"main\"\nroot = \"{}\"\nbase_url = \"https://www.example.com/\"\n\n\
             [[site.hook]]\nurl = \"{}\"\nheaders = {{ \"Surrogate-Control\" = \"max-age=60\" }}\n\
             header_files = {{ \"Fastly-Key\" = \"{key_file}\" }}\n",
            dst.display(),
            cdn.url
        )
    };
    // A key file that is not there stops the target at start, naming it.
    std::fs::write(&toml, site("missing.key")).unwrap();
    let out = std::process::Command::new(bin_dir().join("mirror-target"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.key"),
        "{err}"
    );
    std::fs::write(&toml, site(key.to_str().unwrap())).unwrap();
    let target = App::target(tmp.path()).config(&toml).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    // The key is read at each run: rotated without a restart.
    std::fs::write(&key, "second-key\n").unwrap();
    write(&src, "docs/index.html", b"docs, again");
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let headers = cdn.headers.lock().unwrap();
    assert_eq!(headers.len(), 2);
    assert!(
        headers[0].contains(&"surrogate-control: max-age=60".to_string()),
        "{headers:?}"
    );
    assert!(
        headers[0].contains(&"fastly-key: first-key".to_string()),
        "{headers:?}"
    );
    assert!(
        headers[1].contains(&"fastly-key: second-key".to_string()),
        "{headers:?}"
    );
    let bodies = cdn.bodies.lock().unwrap();
    let created = sorted(&bodies[0]["urls"]["created"]);
    for u in [
        "https://www.example.com/",
        "https://www.example.com/index.html",
        "https://www.example.com/docs/",
        "https://www.example.com/docs/index.html",
        "https://www.example.com/docs/a.css",
    ] {
        assert!(created.contains(&u.to_string()), "{u} not in {created:?}");
    }
    let updated = sorted(&bodies[1]["urls"]["updated"]);
    assert!(
        updated.contains(&"https://www.example.com/docs/".to_string()),
        "{updated:?}"
    );
    assert!(
        !updated.contains(&"https://www.example.com/".to_string()),
        "{updated:?}"
    );
}

fn sorted(v: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn hooks_get_exactly_what_changed_and_a_failing_hook_is_an_error_of_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let good = hook_server(200);
    let bad = hook_server(503);
    let toml = tmp.path().join("target.toml");
    std::fs::write(
        &toml,
        format!(
            "[[site]]\nname = \"main\"\nroot = \"{}\"\nbase_url = \"https://www.example.com/\"\n\n\
             [[site.hook]]\nurl = \"{}\"\n\n\
             [[site.hook]]\nurl = \"{}\"\nretries = 2\ntimeout_secs = 2\n\n\
             [[site.hook]]\ncommand = [\"/nonexistent/purge-cache\"]\n",
            dst.display(),
            good.url,
            bad.url
        ),
    )
    .unwrap();
    let target = App::target(tmp.path()).config(&toml).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "delete = true");
    let metrics = free_addr();
    let source = App::source(tmp.path(), &config)
        .args(&["--metrics-listen", &metrics])
        .spawn();
    let (code, job) = run_job(&source.url(), &[]);
    // The content is all there, but what the failed hooks should have purged may be
    // served stale: the job says so (exit 1), naming each hook, and so do the metrics.
    assert_eq!(code, 1, "{job:#}");
    assert_eq!(job["state"], "completed_with_errors", "{job:#}");
    assert_same_tree(&src, &dst);
    let failed: Vec<&serde_json::Value> = job["item_errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["code"] == "hook_failed")
        .collect();
    assert_eq!(failed.len(), 2, "{job:#}");
    assert!(
        failed[0]["path"].as_str().unwrap().contains(&bad.url),
        "{failed:?}"
    );
    assert!(
        failed[0]["message"]
            .as_str()
            .unwrap()
            .contains("3 attempt(s)"),
        "{failed:?}"
    );
    assert!(
        failed[1]["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/purge-cache"),
        "{failed:?}"
    );
    assert_eq!(job["targets"][0]["item_errors"], 2, "{job:#}");
    let (_, page) = http_get(&metrics, "/metrics");
    assert_eq!(
        metric(
            &page,
            "mirror_hook_failures_total{channel=\"site\",target=\"web1\"}"
        ),
        Some(2.0),
        "{page}"
    );
    {
        let bodies = good.bodies.lock().unwrap();
        assert_eq!(bodies.len(), 1);
        let b = &bodies[0];
        assert_eq!(b["job_id"], job["id"]);
        assert_eq!(b["channel"], "site");
        assert_eq!(b["site"], "main");
        let all: Vec<String> = snapshot(&src).keys().cloned().collect();
        assert_eq!(sorted(&b["created"]), all);
        assert!(
            b["urls"]["created"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u == "https://www.example.com/a/%C3%BCbersicht.json"),
            "{b}"
        );
    }
    // The failing hook was tried 1 + 2 times; its failure and the missing command are
    // job events.
    assert_eq!(bad.bodies.lock().unwrap().len(), 3);
    let ev = events(&source.url(), job["id"].as_str().unwrap());
    let hooks: Vec<&serde_json::Value> = ev.iter().filter(|e| e["kind"] == "hook_result").collect();
    assert_eq!(hooks.len(), 3, "{ev:#?}");
    assert_eq!(hooks[0]["data"]["ok"], true);
    assert_eq!(hooks[1]["data"]["ok"], false);
    assert_eq!(hooks[1]["data"]["status"], 503);
    assert_eq!(hooks[1]["data"]["attempts"], 3);
    assert_eq!(hooks[2]["data"]["ok"], false);
    assert!(
        hooks[2]["data"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot run \"/nonexistent/purge-cache\""),
        "{:#}",
        hooks[2]
    );

    // A second job: one update, one create, one delete.
    write(&src, "index.html", b"<h1>home, again</h1>");
    write(&src, "docs/new.txt", b"new");
    std::fs::remove_file(src.join("a/b/c/deep.txt")).unwrap();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "{job:#}");
    assert_same_tree(&src, &dst);
    let bodies = good.bodies.lock().unwrap();
    let b = &bodies[1];
    assert_eq!(sorted(&b["created"]), ["docs/new.txt"]);
    assert_eq!(sorted(&b["deleted"]), ["a/b/c/deep.txt"]);
    let updated = sorted(&b["updated"]);
    assert!(updated.contains(&"index.html".to_string()), "{updated:?}");
    for u in &updated {
        assert!(
            u == "index.html" || src.join(u).is_dir(),
            "{u} did not change: {updated:?}"
        );
    }
}

#[test]
fn a_path_list_job_mirrors_only_those_paths() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(make_tree, "delete = true");
    assert_eq!(run_job(&source.url(), &[]).0, 0);
    write(&src, "index.html", b"<h1>published</h1>");
    write(&src, "docs/readme.md", b"also changed, not published");
    write(&src, "news/new.html", b"fresh");
    std::fs::remove_file(src.join("a/b/c/deep.txt")).unwrap();
    let (code, job) = run_job(
        &source.url(),
        &["--path", "index.html", "--path", "news", "--path", "a/b/c"],
    );
    assert_eq!(code, 0, "{job:#}");
    assert_eq!(
        std::fs::read(dst.join("index.html")).unwrap(),
        b"<h1>published</h1>"
    );
    assert_eq!(std::fs::read(dst.join("news/new.html")).unwrap(), b"fresh");
    assert!(
        !dst.join("a/b/c/deep.txt").exists(),
        "the deletion under a listed path"
    );
    assert_ne!(
        std::fs::read(dst.join("docs/readme.md")).unwrap(),
        b"also changed, not published",
        "a path outside the list was mirrored"
    );
}

#[test]
fn a_trigger_during_a_running_job_yields_exactly_one_follow_up_job() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(
        |src| make_many(src, 800),
        "package_bytes = 16384\nwindow = 1",
    );
    let start = || {
        let out = mirrorctl(&source.url(), &["start", "site", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = start();
    let first_id = first["job_id"].as_str().unwrap().to_string();
    // Wait until it runs, then trigger three times.
    wait_until(Duration::from_secs(30), || {
        let j = show_job(&source.url(), &first_id);
        ready(j["state"] == "running", || format!("{j:#}"))
    });
    let a = start();
    let b = start();
    let c = start();
    assert_eq!(a["coalesced"], false, "{a}");
    assert_eq!(b["coalesced"], true, "{b}");
    assert_eq!(c["coalesced"], true, "{c}");
    assert_eq!(a["job_id"], b["job_id"]);
    assert_eq!(a["job_id"], c["job_id"]);
    let follow = a["job_id"].as_str().unwrap();
    assert_eq!(
        mirrorctl(&source.url(), &["watch", follow]).status.code(),
        Some(0)
    );
    let jobs: serde_json::Value =
        serde_json::from_slice(&mirrorctl(&source.url(), &["jobs", "--json"]).stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 2, "{jobs:#}");
    assert_same_tree(&src, &dst);
}

fn ms(v: &serde_json::Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap_or_else(|e| panic!("{v}: {e}"))
        .timestamp_millis()
}

fn stored_seed(tmp: &std::path::Path) -> u64 {
    let url = format!("sqlite://{}", tmp.join("source-data/source.db").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let db = cms_mirror::db::connect(&url, cms_mirror::db::Schema::Source)
            .await
            .unwrap();
        cms_mirror::jobstore::JobStore::new(db)
            .get_setting("schedule_seed")
            .await
            .unwrap()
            .expect("the offset is stored")
            .parse()
            .unwrap()
    })
}

#[test]
fn a_schedule_runs_at_its_offset_times_never_overlaps_and_keeps_its_offset() {
    const EVERY: i64 = 3000;
    const SPREAD: i64 = 2000;
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_many(&src, 300);
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "schedule = \"*/3 * * * * *\"\nschedule_spread_secs = 2\npackage_bytes = 16384\nwindow = 1",
    );
    let mut source = App::source(tmp.path(), &config).spawn();
    let finished = |j: &serde_json::Value| j["finished_at"].as_str().is_some_and(|s| !s.is_empty());
    // Three slots' worth: at least two jobs run to their end.
    let first = wait_until(Duration::from_secs(20), || {
        let list = jobs(&source.url());
        let done = list.iter().filter(|j| finished(j)).count();
        ready(list.len() >= 3 && done >= 2, || format!("{list:#?}")).map(|()| list)
    });
    let seed = stored_seed(tmp.path());
    let offset = SPREAD * seed as i64 / 1_000_000;
    let check = |list: &[serde_json::Value]| {
        for j in list {
            assert_eq!(j["trigger"], "schedule", "{j:#}");
            let phase = (ms(&j["created_at"]) - offset).rem_euclid(EVERY);
            assert!(
                phase < 700,
                "job {} created {phase} ms after its slot (offset {offset} ms)",
                j["id"]
            );
        }
    };
    check(&first);
    // Never two at once: each job starts after the one before it finished.
    let mut runs: Vec<(i64, i64)> = first
        .iter()
        .filter(|j| finished(j))
        .map(|j| (ms(&j["started_at"]), ms(&j["finished_at"])))
        .collect();
    runs.sort();
    for w in runs.windows(2) {
        assert!(w[1].0 >= w[0].1, "overlapping jobs: {runs:?}");
    }

    // Down for more than two slots: after the restart the missed slots run once, and the
    // schedule keeps its stored offset.
    source.kill9();
    std::thread::sleep(Duration::from_millis(7_000));
    let before = first.len();
    let restarted = chrono::Utc::now().timestamp_millis();
    let source = App::source(tmp.path(), &config).spawn();
    assert_eq!(stored_seed(tmp.path()), seed, "the offset was drawn again");
    // The missed slot's job and two regular ones after it.
    let (all, after) = wait_until(Duration::from_secs(20), || {
        let all = jobs(&source.url());
        let after: Vec<serde_json::Value> = all
            .iter()
            .filter(|j| ms(&j["created_at"]) >= restarted)
            .cloned()
            .collect();
        ready(after.len() >= 3, || format!("{after:#?}")).map(|()| (all, after))
    });
    let summary: Vec<(i64, i64, String)> = after
        .iter()
        .map(|j| {
            let c = ms(&j["created_at"]);
            (
                c - restarted,
                (c - offset).rem_euclid(EVERY),
                j["trigger"].to_string(),
            )
        })
        .collect();
    let (missed, regular): (Vec<_>, Vec<_>) = after.into_iter().partition(|j| {
        j["requested_by"]
            .as_str()
            .unwrap()
            .ends_with("(missed slot)")
    });
    assert_eq!(
        missed.len(),
        1,
        "missed slots run once: {summary:?} (offset {offset})"
    );
    assert!(
        ms(&missed[0]["created_at"]) < restarted + 2000,
        "{missed:#?}"
    );
    assert!(regular.len() >= 2, "{regular:#?}");
    check(&regular);
    assert!(all.len() >= before + 3);
    assert_same_tree(&src, &dst);
}

#[test]
fn writing_into_the_source_starts_one_job_after_the_quiet_period() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(make_tree, "watch = true\nwatch_quiet_ms = 700");
    std::thread::sleep(Duration::from_millis(500));
    assert!(jobs(&source.url()).is_empty());
    let t0 = Instant::now();
    for i in 0..10 {
        write(&src, &format!("incoming/f{i}.html"), &bytes(i, 3000));
        std::thread::sleep(Duration::from_millis(100));
    }
    let wrote = t0.elapsed();
    let job = wait_until(Duration::from_secs(20), || {
        let list = jobs(&source.url());
        assert!(list.len() <= 1, "{list:#?}");
        list.first()
            .cloned()
            .ok_or_else(|| "no job was started".to_string())
    });
    // Not before the writes were over and quiet for the period.
    assert!(
        t0.elapsed() >= wrote + Duration::from_millis(600),
        "started during the writes"
    );
    assert_eq!(job["trigger"], "watch");
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        mirrorctl(&source.url(), &["watch", id]).status.code(),
        Some(0)
    );
    assert_same_tree(&src, &dst);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(jobs(&source.url()).len(), 1, "one burst of writes, one job");
}

#[test]
fn a_tier_one_target_pushes_to_tier_two_after_its_import() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (src, mid, dst) = (
        tmp.path().join("src"),
        tmp.path().join("mid"),
        tmp.path().join("dst"),
    );
    make_tree(&src);
    std::fs::create_dir_all(&mid).unwrap();
    // Tier 2: a source mirroring the tier-1 site to its own target.
    let t2 = App::target(&b).site(&dst).spawn();
    let b_config = write_config(&b, &mid, &t2.url(), "");
    let source_b = App::source(&b, &b_config).spawn();
    // Tier 1: its target pushes channel "site" of tier 2's source after each import.
    let toml = a.join("target.toml");
    std::fs::write(
        &toml,
        format!(
            "[[site]]\nname = \"main\"\nroot = \"{}\"\n\n  [[site.push]]\n  source = \"{}\"\n  channel = \"site\"\n",
            mid.display(),
            source_b.url()
        ),
    )
    .unwrap();
    let t1 = App::target(&a).config(&toml).spawn();
    let a_config = write_config(&a, &src, &t1.url(), "");
    let source_a = App::source(&a, &a_config).spawn();
    let (code, job) = run_job(&source_a.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let ev = events(&source_a.url(), job["id"].as_str().unwrap());
    let push = ev
        .iter()
        .find(|e| e["kind"] == "hook_result")
        .unwrap_or_else(|| panic!("no push result: {ev:#?}"));
    assert_eq!(push["data"]["ok"], true, "{push:#}");
    // Tier 2 ran because of the push and ends identical to the origin.
    let j2 = wait_until(Duration::from_secs(30), || {
        match jobs(&source_b.url()).first() {
            Some(j) if j["state"] != "queued" && j["state"] != "running" => Ok(j.clone()),
            j => Err(format!("tier 2 did not run: {j:?}")),
        }
    });
    assert_eq!(j2["state"], "succeeded", "{j2:#}");
    assert_eq!(j2["trigger"], "api");
    assert!(
        j2["requested_by"]
            .as_str()
            .unwrap()
            .contains(job["id"].as_str().unwrap()),
        "{j2:#}"
    );
    assert_same_tree(&src, &dst);
}
