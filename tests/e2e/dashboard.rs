//! Issue 5: the web dashboard, driven in Debian's headless Chromium through ChromeDriver.
//! A slowed target (failpoint) keeps the job in flight long enough to see it move.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::helpers::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Chromium and ChromeDriver, installed by the project's own script when missing.
fn ensure_browser() {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-chromium.sh");
    let st = Command::new("bash")
        .arg(&script)
        .status()
        .expect("run bash");
    assert!(
        st.success() && Path::new(CHROMIUM).exists(),
        "the dashboard test needs Debian's chromium and chromium-driver: {} failed",
        script.display()
    );
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(profile: &Path) -> (Driver, Client) {
    ensure_browser();
    let addr = free_addr();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let driver = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://{addr}"))
            .await
        {
            Ok(c) => return (driver, c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot start a Chromium session through chromedriver: {e}"),
        }
    }
}

/// Where test artifacts (screenshots) go: target/test-artifacts.
fn artifact(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// What the page shows about its jobs, read in the browser.
async fn page_state(c: &Client) -> Value {
    c.execute(
        r#"
        const rows = [...document.querySelectorAll('#history tr')].map(r => ({
            job: r.dataset.job, state: r.querySelector('.state')?.textContent }));
        const bars = [...document.querySelectorAll('#running progress')].map(p => ({
            value: Number(p.value), max: Number(p.max),
            text: p.parentElement.querySelector('.progress-text')?.textContent }));
        const cancel = document.querySelector('#running button.cancel');
        return { rows, bars, updates: Number(document.body.dataset.progressUpdates || 0),
                 marker: window.__noReload || null, cancel: cancel ? cancel.dataset.job : null,
                 started: document.querySelector('#start-site')?.dataset.lastJob || null };
        "#,
        vec![],
    )
    .await
    .expect("run script in the page")
}

/// Clicks an element, finding it again if a live update replaced it in between.
async fn click(c: &Client, css: &str) {
    for attempt in 0.. {
        let clicked = match c.find(Locator::Css(css)).await {
            Ok(b) => b.click().await.is_ok(),
            Err(_) => false,
        };
        if clicked {
            return;
        }
        assert!(attempt < 20, "cannot click {css}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of an element once `ok` accepts it (or the last text read after 20 s),
/// finding the element again whenever a live update replaced it.
async fn text_when(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..200 {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
        {
            if ok(&t) {
                return t;
            }
            last = t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_starts_a_job_shows_it_live_and_cancels_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    for i in 0..24 {
        write(&src, &format!("media/f{i:02}.bin"), &bytes(i, 200_000));
    }
    write(&src, "index.html", b"<h1>dashboard</h1>");
    let target = App::target(tmp.path())
        .site(&dst)
        .envs(&[("CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS", "150")])
        .spawn();
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "package_bytes = 131072\nwindow = 1",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let dash = App::new("mirrorctl", tmp.path())
        .args(&[
            "--source",
            &source.url(),
            "dashboard",
            "--listen",
            "127.0.0.1:0",
        ])
        .spawn();

    // Bad input first: unknown jobs are 404 pages and 404 answers, not crashes.
    let (code, body) = http_get(&dash.addr, "/jobs/4c0ffee0-0000-4000-8000-000000000000");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("No such job"), "{body}");
    let (code, body) = http_get(&dash.addr, "/api/jobs/nope");
    assert!(code == 404 || code == 400, "{code} {body}");
    assert_eq!(http_get(&dash.addr, "/no/such/page").0, 404);
    // A page of another site cannot start jobs through the admin's browser.
    let answer = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&dash.addr).unwrap();
        write!(
            s,
            "POST /api/channels/site/start HTTP/1.0\r\nHost: {}\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\r\n",
            dash.addr
        )
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    };
    assert!(answer.starts_with("HTTP/1.0 403"), "{answer}");
    assert!(
        serde_json::from_slice::<Value>(&mirrorctl(&source.url(), &["jobs", "--json"]).stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty(),
        "a refused request started a job"
    );

    let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;
    let base = format!("http://{}", dash.addr);
    c.goto(&base).await.unwrap();
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#start-site"))
        .await
        .expect("the channel's start button");
    // A marker that survives only if the page is never reloaded.
    c.execute("window.__noReload = 'still here'; return 1;", vec![])
        .await
        .unwrap();
    click(&c, "#start-site").await;

    // Follow the page until the job shows as finished, sampling its progress bars.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut partial = Vec::new();
    let (job, last) = loop {
        let s = page_state(&c).await;
        for b in s["bars"].as_array().unwrap() {
            let (v, m) = (b["value"].as_f64().unwrap(), b["max"].as_f64().unwrap());
            if v > 0.0 && v < m {
                if partial.is_empty() {
                    let png = c.screenshot().await.unwrap();
                    std::fs::write(artifact("dashboard-running.png"), png).unwrap();
                }
                partial.push(b["text"].as_str().unwrap_or("").to_string());
            }
        }
        if let Some(job) = s["started"].as_str() {
            let row = s["rows"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["job"] == job)
                .cloned();
            if row.is_some_and(|r| r["state"] == "succeeded") {
                break (job.to_string(), s);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the job never showed as finished: {s}"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    };
    assert_eq!(last["marker"], "still here", "the page was reloaded");
    assert!(
        last["updates"].as_u64().unwrap() >= 2,
        "progress events did not reach the page: {last}"
    );
    assert!(
        !partial.is_empty(),
        "no progress bar was ever seen part way: {last}"
    );
    let j = show_job(&source.url(), &job);
    assert_eq!(j["state"], "succeeded");
    assert_eq!(
        j["targets"][0]["items_done"],
        j["targets"][0]["items_total"]
    );
    assert_same_tree(&src, &dst);
    c.screenshot()
        .await
        .map(|png| std::fs::write(artifact("dashboard-index.png"), png).unwrap())
        .unwrap();

    // The job's detail page: its targets at their totals and the event log.
    c.goto(&format!("{base}/jobs/{job}")).await.unwrap();
    let total = j["targets"][0]["items_total"].as_u64().unwrap();
    let want = format!("items {total}/{total}");
    let text = text_when(&c, "#d-targets .progress-text", |t| t.contains(&want)).await;
    assert!(text.contains(&want), "{text}");
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath("//div[@id='log']/div/b[text()='finished']"))
        .await
        .expect("the finished event in the job's log");
    assert_eq!(
        text_when(&c, "#d-state", |t| t == "succeeded").await,
        "succeeded"
    );
    c.screenshot()
        .await
        .map(|png| std::fs::write(artifact("dashboard-job.png"), png).unwrap())
        .unwrap();

    // Cancel: every file changes, the next job is slow again; the button stops it.
    for i in 0..24 {
        write(
            &src,
            &format!("media/f{i:02}.bin"),
            &bytes(100 + i, 200_000),
        );
    }
    c.goto(&base).await.unwrap();
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#start-site"))
        .await
        .unwrap();
    click(&c, "#start-site").await;
    let second = wait_for(Duration::from_secs(60), || async {
        let s = page_state(&c).await;
        match (s["cancel"].as_str(), s["started"].as_str()) {
            (Some(job), Some(started))
                if job == started && !s["bars"].as_array().unwrap().is_empty() =>
            {
                Ok(job.to_string())
            }
            _ => Err(format!("the second job never showed as running: {s}")),
        }
    })
    .await;
    click(&c, &format!("#running button.cancel[data-job='{second}']")).await;
    wait_for(Duration::from_secs(60), || async {
        let s = page_state(&c).await;
        let rows = s["rows"].as_array().unwrap();
        let row = rows.iter().find(|r| r["job"] == second.as_str());
        let shown = row.is_some_and(|r| r["state"] == "cancelled");
        ready(shown, || format!("the cancel never showed: {s}"))
    })
    .await;
    assert_eq!(show_job(&source.url(), &second)["state"], "cancelled");
    c.close().await.unwrap();
}

/// Whether `css` matches an element in the page now.
async fn present(c: &Client, css: &str) -> bool {
    c.execute(
        "return document.querySelector(arguments[0]) !== null;",
        vec![json!(css)],
    )
    .await
    .map(|v| v == json!(true))
    .unwrap_or(false)
}

/// Waits until `css` matches (20 s), else fails with what the page says.
async fn until_present(c: &Client, css: &str) {
    for _ in 0..200 {
        if present(c, css).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = c.source().await.unwrap_or_default();
    panic!("{css} never appeared: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_reads_as_an_admin_expects() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    for i in 0..16 {
        write(&src, &format!("media/f{i:02}.bin"), &bytes(i, 200_000));
    }
    let target = App::target(tmp.path())
        .site(&dst)
        .envs(&[("CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS", "150")])
        .spawn();
    let down = free_addr();
    let config = tmp.path().join("mirror.toml");
    std::fs::write(
        &config,
        format!(
            "[[channel]]\nname = \"site\"\nsource = \"{src}\"\npackage_bytes = 131072\nwindow = 1\n\
             [[channel.target]]\nname = \"web1\"\nurl = \"{t}\"\nsite = \"main\"\n\n\
             [[channel]]\nname = \"broken\"\nsource = \"{src}\"\n\
             [[channel.target]]\nname = \"web9\"\nurl = \"http://{down}\"\nsite = \"main\"\n",
            src = src.display(),
            t = target.url()
        ),
    )
    .unwrap();
    let source = App::source(tmp.path(), &config)
        .args(&["--check-interval-secs", "1"])
        .spawn();
    let dashboard = |source: &str| {
        App::new("mirrorctl", tmp.path())
            .args(&["--source", source, "dashboard", "--listen", "127.0.0.1:0"])
            .spawn()
    };
    let dash = dashboard(&source.url());

    // A wrong address gets a page in the dashboard's own look.
    let (code, body) = http_get(&dash.addr, "/no/such/page");
    assert_eq!(code, 404);
    assert!(
        body.contains("class=\"error-page\"") && body.contains("<header>"),
        "{body}"
    );
    assert!(
        body.contains("--ok:"),
        "the 404 page lacks the dashboard's styles: {body}"
    );
    // A dashboard whose source is down names it.
    let gone = format!("http://{}", free_addr());
    let orphan = dashboard(&gone);
    let (code, body) = http_get(&orphan.addr, "/api/channels");
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains(&format!("mirror-source at {gone} is unreachable")),
        "{body}"
    );

    let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;
    c.goto(&format!("http://{}", orphan.addr)).await.unwrap();
    let msg = text_when(&c, "#msg", |t| t.contains(&gone)).await;
    assert!(msg.contains(&gone), "{msg}");

    // Each target's health from the source's periodic check, beside its sync lag.
    let base = format!("http://{}", dash.addr);
    c.goto(&base).await.unwrap();
    until_present(
        &c,
        "tr[data-channel='site'] .channel-target[data-target='web1'] .health.ok",
    )
    .await;
    until_present(&c, "tr[data-channel='broken'] .health.unreachable").await;
    let lag = text_when(&c, "tr[data-channel='site'] .lag", |t| t == "never synced").await;
    assert_eq!(lag, "never synced");

    // A dry run from its own button, marked as such, with local times.
    click(&c, "#dry-run-site").await;
    until_present(&c, "#history tr .dry").await;
    let row = c
        .execute(
            "const r = document.querySelector('#history tr'); const t = r.querySelector('time');
             return { state: r.querySelector('.state').textContent, dry: r.querySelector('.dry').textContent,
                      datetime: t.getAttribute('datetime'), shown: t.textContent, job: r.dataset.job };",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(row["dry"], "dry run", "{row}");
    let shown = row["shown"].as_str().unwrap();
    assert!(
        !shown.contains('T') && shown.contains("ago"),
        "times read as local times: {row}"
    );
    assert!(row["datetime"].as_str().unwrap().ends_with('Z'), "{row}");
    let dry_job = row["job"].as_str().unwrap().to_string();

    // Start is disabled while the channel runs, and comes back after.
    let job = start_job(&source.url());
    until_present(&c, "#start-site:disabled").await;
    assert!(present(&c, "#dry-run-site:disabled").await);
    let pct = text_when(&c, "#running .progress-text", |t| t.contains('%')).await;
    assert!(pct.contains('%') && pct.contains("items"), "{pct}");
    c.screenshot()
        .await
        .map(|png| std::fs::write(artifact("dashboard-busy.png"), png).unwrap())
        .unwrap();
    assert_succeeds(&source.url(), &job);
    until_present(&c, "#start-site:enabled").await;

    // The job's events as sentences, not JSON.
    c.goto(&format!("{base}/jobs/{dry_job}")).await.unwrap();
    until_present(&c, "#log div[data-seq]").await;
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath("//div[@id='log']/div/b[text()='finished']"))
        .await
        .expect("the finished event in the job's log");
    let lines: Vec<String> = c
        .execute(
            "return [...document.querySelectorAll('#log div')].map(d => d.textContent);",
            vec![],
        )
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(lines.iter().all(|l| !l.contains('{')), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("planned [web1] 17 items")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("would mirror")),
        "{lines:#?}"
    );
    let state = text_when(&c, "#d-state", |t| t.contains("dry run")).await;
    assert!(
        state.contains("succeeded") && state.contains("nothing was changed"),
        "{state}"
    );
    c.screenshot()
        .await
        .map(|png| std::fs::write(artifact("dashboard-dry-run.png"), png).unwrap())
        .unwrap();
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_generations_and_rolls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "publish = \"atomic\"");
    let source = App::source(tmp.path(), &config).spawn();
    let source_url = source.url();
    let ran = tokio::task::spawn_blocking(move || {
        let first = run_job(&source_url, &[]);
        write(&src, "index.html", b"generation 2");
        (first, run_job(&source_url, &[]))
    })
    .await
    .unwrap();
    assert_eq!(((ran.0).0, (ran.1).0), (0, 0), "{ran:#?}");
    let dash = App::new("mirrorctl", tmp.path())
        .args(&[
            "--source",
            &source.url(),
            "dashboard",
            "--listen",
            "127.0.0.1:0",
        ])
        .spawn();
    let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;
    c.goto(&format!("http://{}", dash.addr)).await.unwrap();
    let shown = text_when(&c, "#gens-site", |t| t.contains("2 (live)")).await;
    assert!(
        shown.contains("web1") && shown.contains("2 (live)") && shown.contains('1'),
        "{shown}"
    );
    // The Rollback button asks first (answered yes here), then starts a rollback job.
    c.execute("window.confirm = () => true; return true;", vec![])
        .await
        .unwrap();
    click(&c, "#rollback-site").await;
    let shown = text_when(&c, "#gens-site", |t| t.contains("1 (live)")).await;
    assert!(shown.contains("1 (live)"), "{shown}");
    assert_eq!(
        std::fs::read_link(&dst).unwrap(),
        Path::new("dst.generations/1")
    );
    let png = c.screenshot().await.unwrap();
    std::fs::write(artifact("dashboard-generations.png"), png).unwrap();
}
