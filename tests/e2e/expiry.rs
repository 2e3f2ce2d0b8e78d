//! Issue 27: abandoned sessions expire. A target with a short session expiry closes the
//! session of a job whose source died and removes its staging; the job, resumed later,
//! plans again against what the target holds and ends exact. Sessions opened and
//! abandoned by a client leave nothing behind.

use std::path::Path;
use std::time::Duration;

use cms_mirror::pb;

use crate::helpers::*;

/// The target's sessions by state.
fn session_states(dir: &Path) -> Vec<(String, i64)> {
    let url = format!("sqlite://{}", dir.join("target-data/target.db").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let db = cms_mirror::db::connect(&url, cms_mirror::db::Schema::Target)
            .await
            .unwrap();
        sqlx::query_as("SELECT state, COUNT(*) FROM sessions GROUP BY state ORDER BY state")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    })
}

fn expired_total(metrics_addr: &str) -> f64 {
    let (_, page) = http_get(metrics_addr, "/metrics");
    metric(&page, "mirror_target_sessions_expired_total{site=\"main\"}").unwrap_or(0.0)
}

#[test]
fn an_abandoned_session_expires_and_its_job_plans_again_when_it_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_many(&src, 3000);
    let tm = free_addr();
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--session-expiry-secs", "1", "--metrics-listen", &tm])
        .spawn();
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "package_bytes = 16384\nwindow = 2\ndelete = true",
    );
    let mut source = App::source(tmp.path(), &config).spawn();
    let job = start_job(&source.url());
    wait_acked(&source.url(), &job, 10);
    source.kill9();
    assert_eq!(session_states(tmp.path()), [("open".to_string(), 1)]);

    // Idle for a second, the session expires: its staging is removed.
    wait_until(Duration::from_secs(30), || {
        let n = expired_total(&tm);
        ready(n >= 1.0, || format!("{n} sessions expired"))
    });
    assert_eq!(session_states(tmp.path()), [("expired".to_string(), 1)]);
    assert!(!dst.join(".cms-mirror-staging").exists(), "staging remains");
    assert!(logs(tmp.path(), "target").contains("session expired"));

    // Meanwhile the site changes: a file already sent is edited, one deleted, one added.
    assert!(
        dst.join("d0/e0/f0.html").exists(),
        "not sent before the kill"
    );
    write(&src, "d0/e0/f0.html", b"edited while the job was away");
    std::fs::remove_file(src.join("d0/e0/f1020.html")).unwrap();
    write(&src, "new/late.txt", b"added while the job was away");

    // The job comes back (its lease ran out), opens the session again from package 1,
    // plans against the target's manifest and ends exact.
    let source = App::source(tmp.path(), &config).spawn();
    assert_succeeds(&source.url(), &job);
    assert_same_tree(&src, &dst);
    let ev = events(&source.url(), &job);
    assert!(ev.iter().any(|e| e["kind"] == "session_expired"), "{ev:#?}");
    let last_plan = ev.iter().rev().find(|e| e["kind"] == "planned").unwrap();
    assert_eq!(last_plan["data"]["replanned"], true, "{last_plan}");
    let j = show_job(&source.url(), &job);
    let t = &j["targets"][0];
    assert_eq!(t["items_done"], t["items_total"], "{t}");
    assert_eq!(t["bytes_done"], t["bytes_total"], "{t}");
    assert_eq!(session_states(tmp.path()), [("committed".to_string(), 1)]);
}

/// Sessions a client opens and abandons do not pile up: they expire, and one that never
/// changed anything leaves no row.
#[test]
fn sessions_opened_and_abandoned_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    let tm = free_addr();
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--session-expiry-secs", "1", "--metrics-listen", &tm])
        .spawn();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = pb::target_service_client::TargetServiceClient::connect(target.url())
            .await
            .unwrap();
        for i in 0..40 {
            c.open_session(pb::OpenSessionRequest {
                job_id: format!("abandoned-{i}"),
                site: "main".into(),
                protocol_version: cms_mirror::PROTOCOL_VERSION,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    });
    assert_eq!(session_states(tmp.path()), [("open".to_string(), 40)]);
    wait_until(Duration::from_secs(30), || {
        let n = expired_total(&tm);
        ready(n >= 40.0, || format!("{n} sessions expired"))
    });
    assert_eq!(session_states(tmp.path()), []);
}
