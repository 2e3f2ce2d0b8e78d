//! Atomic publish: generations on the targets, the two-phase switch across targets, and
//! what a reader of a target site sees meanwhile (through a real HTTP server).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// A channel `site` publishing atomically to targets `web1`, `web2`, ... at `urls`.
fn atomic_config(dir: &Path, src: &Path, urls: &[String], extra: &str) -> PathBuf {
    let mut toml = format!(
        "[[channel]]\nname = \"site\"\nsource = \"{}\"\npublish = \"atomic\"\nretry_budget = 8\n{extra}\n",
        src.display()
    );
    for (i, url) in urls.iter().enumerate() {
        toml.push_str(&format!(
            "\n  [[channel.target]]\n  name = \"web{}\"\n  url = \"{url}\"\n  site = \"main\"\n",
            i + 1
        ));
    }
    let p = dir.join("mirror.toml");
    std::fs::write(&p, toml).unwrap();
    p
}

/// The generation a site root's link points at (`None`: the root is not a link).
fn live_generation(root: &Path) -> Option<u64> {
    let to = std::fs::read_link(root).ok()?;
    to.file_name()?.to_str()?.parse().ok()
}

fn generations_dir(root: &Path) -> PathBuf {
    root.with_file_name(format!(
        "{}.generations",
        root.file_name().unwrap().to_str().unwrap()
    ))
}

fn generation_numbers(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(generations_dir(root))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn an_atomic_job_publishes_a_generation_and_keeps_the_ones_before() {
    publishes_and_keeps_generations(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(any(ci, test_database)),
    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
)]
async fn generations_on_a_target_whose_ledger_is_postgresql() {
    let db = crate::postgres::fresh_database().await;
    tokio::task::spawn_blocking(move || publishes_and_keeps_generations(Some(db)))
        .await
        .unwrap();
}

/// Three atomic jobs on one target (its ledger on `db`, else SQLite), then a job in
/// place, which the site refuses.
fn publishes_and_keeps_generations(db: Option<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let mut target = App::target(tmp.path()).site(&dst);
    if let Some(db) = &db {
        target = target.args(&["--db", db]);
    }
    let target = target.spawn();
    let config = atomic_config(tmp.path(), &src, &[target.url()], "keep_generations = 2");
    let source = App::source(tmp.path(), &config).spawn();

    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_eq!(
        live_generation(&dst),
        Some(1),
        "the root links to generation 1"
    );
    assert_same_tree(&src, &dst);
    // The site as it was before its first atomic job (empty) is kept as generation 0.
    assert_eq!(generation_numbers(&dst), ["0", "1"]);
    assert!(snapshot(&generations_dir(&dst).join("0")).is_empty());

    // A second job: a new generation; the first stays as it was, sharing what did not
    // change (the same inode), never a copy.
    write(&src, "index.html", b"changed for generation 2");
    write(&src, "new/file.txt", b"new in generation 2");
    let before = snapshot(&dst);
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_eq!(live_generation(&dst), Some(2));
    assert_same_tree(&src, &dst);
    let gens = generations_dir(&dst);
    assert_eq!(snapshot(&gens.join("1")), before, "generation 1 changed");
    let unchanged = snapshot(&src)
        .into_iter()
        .find(|(k, n)| n.kind == "file" && k != "index.html")
        .unwrap()
        .0;
    let ino = |g: &str| {
        std::fs::symlink_metadata(gens.join(g).join(&unchanged))
            .unwrap()
            .ino()
    };
    assert_eq!(ino("1"), ino("2"), "{unchanged} is not shared");
    assert_ne!(
        std::fs::read(gens.join("1/index.html")).unwrap(),
        std::fs::read(gens.join("2/index.html")).unwrap()
    );
    let events = events(&source.url(), job["id"].as_str().unwrap());
    let decided = events
        .iter()
        .find(|e| e["kind"] == "publish_decided")
        .expect("a publish decision event");
    assert_eq!(decided["data"]["generation"], 2, "{decided}");

    // keep_generations = 2: after a third job only generations 2 and 3 are left.
    write(&src, "index.html", b"generation 3");
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_eq!(live_generation(&dst), Some(3));
    assert_eq!(generation_numbers(&dst), ["2", "3"]);
    assert_same_tree(&src, &dst);
    // The target lists them with their sizes (from its ledger).
    let out = mirrorctl(&source.url(), &["generations", "site", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gens = listed[0]["generations"].as_array().unwrap();
    let files = snapshot(&src).values().filter(|n| n.kind == "file").count() as u64;
    assert_eq!(gens.len(), 2, "{listed:#}");
    assert_eq!(
        (gens[0]["number"].as_u64(), gens[0]["live"].as_bool()),
        (Some(3), Some(true))
    );
    assert_eq!(gens[0]["files"].as_u64(), Some(files), "{listed:#}");

    // A job that changes nothing makes no generation (scheduled runs do not push the
    // ones kept for rollback out); the live tree's trace says it ran.
    let trace = dst.join(".cms-mirror-trace");
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let summary = job["summary"].as_str().unwrap();
    assert!(
        summary.ends_with("nothing changed, no new generation"),
        "{summary}"
    );
    assert_eq!(live_generation(&dst), Some(3));
    assert_eq!(generation_numbers(&dst), ["2", "3", "building"]);
    let traced = std::fs::read_to_string(&trace).unwrap();
    assert!(traced.contains(job["id"].as_str().unwrap()), "{traced}");

    // A job published in place would change a generation kept for rollback: refused,
    // and the site stays as it is.
    drop(source);
    let in_place = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &in_place).spawn();
    write(&src, "index.html", b"not to be published in place");
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 2, "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("publishes atomically"), "{error}");
    assert_eq!(
        std::fs::read(dst.join("index.html")).unwrap(),
        b"generation 3"
    );
}

#[test]
fn an_in_place_site_becomes_atomic_with_its_first_atomic_job() {
    let m = Mirror::start(make_tree, "");
    let (code, job) = run_job(&m.source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert!(m.dst.is_dir() && !m.dst.is_symlink());
    let in_place = snapshot(&m.dst);
    let config = atomic_config(m.tmp.path(), &m.src, &[m.target.url()], "");
    let mut source = m.source;
    source.kill9();
    let source = App::source(m.tmp.path(), &config).spawn();
    write(&m.src, "a.txt", b"the first atomic job");
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert!(m.dst.is_symlink(), "the root became a link");
    assert_eq!(live_generation(&m.dst), Some(1));
    assert_same_tree(&m.src, &m.dst);
    // The tree served in place until the switch is generation 0, as it was.
    assert_eq!(snapshot(&generations_dir(&m.dst).join("0")), in_place);
}

/// `python3 -m http.server` serving `root` (a real web server that opens each request's
/// path through the root's link, as nginx or Apache do), killed when dropped.
struct WebServer {
    child: Child,
    addr: String,
}

impl WebServer {
    fn serve(root: &Path, log: &Path) -> WebServer {
        let addr = free_addr();
        let port = addr.rsplit(':').next().unwrap().to_string();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port,
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("python3 -m http.server");
        wait_until(Duration::from_secs(20), || {
            ready(std::net::TcpStream::connect(&addr).is_ok(), || {
                format!("the web server at {addr} does not answer")
            })
        });
        WebServer { child, addr }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A site of `files` pages whose content names `version`, with `manifest.txt` naming
/// every page with its BLAKE3.
fn versioned_site(src: &Path, version: u32, files: usize) {
    let mut manifest = format!("version {version}\n");
    for i in 0..files {
        let rel = format!("pages/p{i:03}.html");
        let body = format!("<p>page {i} of version {version}</p>\n{}", "x".repeat(1500));
        write(src, &rel, body.as_bytes());
        manifest.push_str(&format!(
            "{rel} {}\n",
            blake3::hash(body.as_bytes()).to_hex()
        ));
    }
    write(src, "manifest.txt", manifest.as_bytes());
}

/// One reading of a site through its web server: the manifest, every page it names,
/// the manifest again. `Ok(version)` when the pages are the manifest's; `Err` says which
/// page differs. `None` when the manifest changed during the reading (it straddled a
/// switch, which a reader of two requests cannot avoid).
fn read_site(addr: &str) -> Option<Result<u32, String>> {
    let (status, manifest) = http_get(addr, "/manifest.txt");
    assert_eq!(status, 200, "{manifest}");
    let mut lines = manifest.lines();
    let version: u32 = lines
        .next()
        .and_then(|l| l.strip_prefix("version "))
        .and_then(|v| v.parse().ok())
        .expect("a version line");
    let mut bad = None;
    for line in lines {
        let (path, hash) = line.split_once(' ').expect("path and hash");
        let (status, body) = http_get(addr, &format!("/{path}"));
        let got = blake3::hash(body.as_bytes()).to_hex().to_string();
        if status != 200 || got != hash {
            bad.get_or_insert(format!(
                "{path}: status {status}, not the version {version} page"
            ));
        }
    }
    let (_, again) = http_get(addr, "/manifest.txt");
    if again != manifest {
        return None;
    }
    Some(match bad {
        Some(b) => Err(b),
        None => Ok(version),
    })
}

#[test]
fn readers_see_one_whole_generation_and_both_targets_switch_together() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    versioned_site(&src, 1, 120);
    let roots: Vec<PathBuf> = (1..=2)
        .map(|i| tmp.path().join(format!("t{i}/www")))
        .collect();
    let targets: Vec<Proc> = roots
        .iter()
        .map(|root| {
            let dir = root.parent().unwrap();
            std::fs::create_dir_all(dir).unwrap();
            // Slow disks: the job's packages land over seconds while readers read.
            App::target(dir)
                .site(root)
                .env("CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS", "40")
                .spawn()
        })
        .collect();
    let urls: Vec<String> = targets.iter().map(|t| t.url()).collect();
    let config = atomic_config(tmp.path(), &src, &urls, "package_bytes = 8192\nwindow = 1");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");

    let web: Vec<WebServer> = roots
        .iter()
        .enumerate()
        .map(|(i, r)| WebServer::serve(r, &tmp.path().join(format!("web{i}.log"))))
        .collect();
    for w in &web {
        assert_eq!(read_site(&w.addr), Some(Ok(1)));
    }

    versioned_site(&src, 2, 120);
    let job = start_job(&source.url());
    let started = Instant::now();
    // Each reader polls its target until it has served version 2 for a while; it
    // notes every whole reading and when version 2 first appeared.
    let readings: Vec<(Vec<u32>, Vec<String>, Option<Instant>)> = std::thread::scope(|s| {
        let handles: Vec<_> = web
            .iter()
            .map(|w| {
                s.spawn(|| {
                    let (mut seen, mut mixed, mut first_v2) = (Vec::new(), Vec::new(), None);
                    let mut v2_readings = 0;
                    while v2_readings < 5 && started.elapsed() < Duration::from_secs(120) {
                        match read_site(&w.addr) {
                            Some(Ok(v)) => {
                                if v == 2 {
                                    v2_readings += 1;
                                    first_v2.get_or_insert_with(Instant::now);
                                }
                                seen.push(v);
                            }
                            Some(Err(e)) => mixed.push(e),
                            None => {}
                        }
                    }
                    (seen, mixed, first_v2)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_succeeds(&source.url(), &job);
    for (i, (seen, mixed, _)) in readings.iter().enumerate() {
        assert!(
            mixed.is_empty(),
            "target {i}: a reading mixed generations: {mixed:?}"
        );
        assert!(
            seen.iter().filter(|v| **v == 1).count() >= 2,
            "target {i}: too few readings while the job ran: {seen:?}"
        );
        assert_eq!(seen.last(), Some(&2), "target {i}: {seen:?}");
    }
    let (a, b) = (readings[0].2.unwrap(), readings[1].2.unwrap());
    let apart = if a > b { a - b } else { b - a };
    // A reading takes a while itself: the switch times are closer than this.
    assert!(
        apart < Duration::from_secs(1),
        "the targets switched {apart:?} apart"
    );
    for r in &roots {
        assert_eq!(live_generation(r), Some(2));
        assert_same_tree(&src, r);
    }
}

/// Both targets' roots link to the same generation, whose tree is the source's.
fn assert_on_one_generation(src: &Path, roots: &[PathBuf], generation: u64) {
    for r in roots {
        assert_eq!(live_generation(r), Some(generation), "{}", r.display());
        assert_same_tree(src, r);
    }
}

fn two_targets(tmp: &Path, env: &[(&str, &str)]) -> (Vec<PathBuf>, Vec<Proc>) {
    let roots: Vec<PathBuf> = (1..=2).map(|i| tmp.join(format!("t{i}/www"))).collect();
    let procs = roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            let dir = root.parent().unwrap();
            std::fs::create_dir_all(dir).unwrap();
            let app = App::target(dir).site(root);
            if i == 1 { app.envs(env) } else { app }.spawn()
        })
        .collect();
    (roots, procs)
}

#[test]
fn kill_9_of_a_target_between_prepare_and_switch_ends_with_both_on_one_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let marker = tmp.path().join("killed-at-switch");
    let (roots, mut targets) = two_targets(
        tmp.path(),
        &[(
            "CMS_MIRROR_FAILPOINT_KILL_AT_SWITCH",
            marker.to_str().unwrap(),
        )],
    );
    let urls: Vec<String> = targets.iter().map(|t| t.url()).collect();
    let config = atomic_config(tmp.path(), &src, &urls, "");
    let source = App::source(tmp.path(), &config).spawn();
    let job = start_job(&source.url());
    // web2 dies (SIGKILL) as its switch arrives; it comes back on its port.
    let status = targets[1].child.wait().unwrap();
    assert!(marker.exists(), "web2 ended otherwise: {status}");
    assert_eq!(
        live_generation(&roots[1]),
        None,
        "web2 switched before it died"
    );
    let dir = roots[1].parent().unwrap();
    targets[1] = App::target(dir)
        .site(&roots[1])
        .listen(&targets[1].addr.clone())
        .spawn();
    assert_succeeds(&source.url(), &job);
    assert_on_one_generation(&src, &roots, 1);
}

#[test]
fn kill_9_of_the_source_between_the_phases_ends_with_every_target_on_one_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let (roots, targets) = two_targets(tmp.path(), &[]);
    let urls: Vec<String> = targets.iter().map(|t| t.url()).collect();
    let config = atomic_config(tmp.path(), &src, &urls, "");
    for (point, generation) in [("prepared", 1), ("decided", 2)] {
        write(&src, "a.txt", point.as_bytes());
        let marker = tmp.path().join(format!("killed-{point}"));
        let mut source = App::source(tmp.path(), &config)
            .env(
                "CMS_MIRROR_FAILPOINT_KILL_AT",
                &format!("{point}:{}", marker.display()),
            )
            .spawn();
        let job = start_job(&source.url());
        source.child.wait().unwrap();
        assert!(marker.exists(), "the source did not stop at {point}");
        // Between the phases: every target prepared, none switched.
        for r in &roots {
            assert_eq!(
                live_generation(r),
                (generation > 1).then_some(generation - 1)
            );
        }
        let source = App::source(tmp.path(), &config).spawn();
        assert_succeeds(&source.url(), &job);
        assert_on_one_generation(&src, &roots, generation);
    }
}

#[test]
#[cfg_attr(not(any(ci, root_user)), ignore = "needs root to mount a small tmpfs")]
fn a_target_whose_disk_fills_while_it_prepares_leaves_every_target_on_the_old_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    // web2's site and its generations on a 2 MiB disk.
    let roots: Vec<PathBuf> = vec![tmp.path().join("t1/www"), tmp.path().join("t2/disk/www")];
    let _disk = crate::faults::SmallDisk::mount(&tmp.path().join("t2/disk"));
    let targets: Vec<Proc> = roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            let dir = tmp.path().join(format!("t{}", i + 1));
            std::fs::create_dir_all(&dir).unwrap();
            App::target(&dir)
                .site(root)
                .args(&["--min-free-space", "0"])
                .spawn()
        })
        .collect();
    let urls: Vec<String> = targets.iter().map(|t| t.url()).collect();
    let config = atomic_config(tmp.path(), &src, &urls, "package_bytes = 65536");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let generation_1 = snapshot(&roots[0]);
    // More than web2's disk holds.
    for i in 0..8 {
        write(&src, &format!("media/more{i}.bin"), &bytes(10 + i, 400_000));
    }
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 2, "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("web2") && error.contains("disk full"),
        "{error}"
    );
    // web1 prepared the new generation but was told not to switch, and says why.
    let web1 = &job["targets"][0];
    assert_eq!(web1["state"], "failed", "{job:#}");
    assert!(
        web1["error"].as_str().unwrap().contains("not switched"),
        "{job:#}"
    );
    for r in &roots {
        assert_eq!(live_generation(r), Some(1), "{}", r.display());
        assert_eq!(snapshot(r), generation_1, "{} changed", r.display());
    }
}

#[test]
fn rollback_restores_the_earlier_generation_on_every_target_and_tells_the_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    // web1 runs a hook that writes what it is told; web2 has none.
    let t1 = tmp.path().join("t1");
    std::fs::create_dir_all(&t1).unwrap();
    let hook_out = t1.join("hook.json");
    let toml = t1.join("target.toml");
    std::fs::write(
        &toml,
        format!(
            "[[site]]\nname = \"main\"\nroot = \"{}\"\n\n[[site.hook]]\ncommand = [\"sh\", \"-c\", \"cat > {}\"]\n",
            t1.join("www").display(),
            hook_out.display()
        ),
    )
    .unwrap();
    let web1 = App::target(&t1).config(&toml).spawn();
    let t2 = tmp.path().join("t2");
    std::fs::create_dir_all(&t2).unwrap();
    let web2 = App::target(&t2).site(&t2.join("www")).spawn();
    let roots = [t1.join("www"), t2.join("www")];
    let config = atomic_config(tmp.path(), &src, &[web1.url(), web2.url()], "delete = true");
    let source = App::source(tmp.path(), &config).spawn();

    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let first: Vec<_> = roots.iter().map(|r| snapshot(r)).collect();
    write(&src, "index.html", b"generation 2");
    write(&src, "added.txt", b"added in generation 2");
    std::fs::remove_file(src.join("docs/readme.md")).unwrap();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_on_one_generation(&src, &roots, 2);

    // Each target lists what it keeps, the live one marked.
    let out = mirrorctl(&source.url(), &["generations", "site", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for t in listed.as_array().unwrap() {
        let numbers: Vec<(u64, bool)> = t["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["number"].as_u64().unwrap(), g["live"].as_bool().unwrap()))
            .collect();
        assert_eq!(numbers, [(2, true), (1, false), (0, false)], "{t}");
    }
    let text = mirrorctl(&source.url(), &["generations", "site"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("web1:") && text.lines().any(|l| l.trim_start().starts_with("* ")),
        "{text}"
    );

    // Back to the generation before: both targets, byte for byte as they were.
    let _ = std::fs::remove_file(&hook_out);
    let out = mirrorctl(&source.url(), &["rollback", "site", "--wait", "--json"]);
    let job = job_of(&out);
    assert_eq!(out.status.code(), Some(0), "{job:#}");
    assert_eq!(job["rollback"], true, "{job:#}");
    assert_eq!(job["summary"], "rolled back to generation 1", "{job:#}");
    for (r, before) in roots.iter().zip(&first) {
        assert_eq!(live_generation(r), Some(1));
        assert_eq!(&snapshot(r), before, "{} is not generation 1", r.display());
    }
    let told: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&hook_out).unwrap()).unwrap();
    assert_eq!(
        told["created"],
        serde_json::json!(["docs/readme.md"]),
        "{told:#}"
    );
    assert_eq!(
        told["deleted"],
        serde_json::json!(["added.txt"]),
        "{told:#}"
    );
    assert!(
        told["updated"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "index.html"),
        "{told:#}"
    );

    // Forward again by number; a generation no target keeps is refused, nothing moves.
    let out = mirrorctl(&source.url(), &["rollback", "site", "--to", "2", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_on_one_generation(&src, &roots, 2);
    let out = mirrorctl(
        &source.url(),
        &["rollback", "site", "--to", "9", "--wait", "--json"],
    );
    let job = job_of(&out);
    assert_eq!(out.status.code(), Some(2), "{job:#}");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("has no generation 9"),
        "{job:#}"
    );
    assert_on_one_generation(&src, &roots, 2);

    // The next job builds on the live generation.
    write(&src, "index.html", b"generation 3");
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_on_one_generation(&src, &roots, 3);
}
