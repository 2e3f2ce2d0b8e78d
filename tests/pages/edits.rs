//! An editor's day reaches the replica exactly: a subtree moved, a slug renamed, siblings
//! reordered, a page deleted, one unpublished, the draft published, an image replaced;
//! mirrored through a target killed (kill -9) in the middle of the job, on SQLite and on
//! PostgreSQL CMS databases.

use cms_mirror::db::Backend;

use crate::cms::Cms;
use crate::delivery::assert_serves_like_wagtail;
use crate::helpers::*;
use crate::mirror::{read_hook, target_toml, wagtail_config_with};

#[test]
fn sqlite_an_editors_day_reaches_the_replica_through_a_killed_target() {
    an_editors_day_reaches_the_replica_through_a_killed_target(Backend::Sqlite);
}

#[test]
#[cfg_attr(
    not(any(ci, test_database)),
    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
)]
fn postgres_an_editors_day_reaches_the_replica_through_a_killed_target() {
    an_editors_day_reaches_the_replica_through_a_killed_target(Backend::Postgres);
}

fn an_editors_day_reaches_the_replica_through_a_killed_target(backend: Backend) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cms = rt.block_on(Cms::generate(backend));
    let tmp = tempfile::tempdir().unwrap();
    let (dst, hook_out) = (tmp.path().join("dst"), tmp.path().join("hook.json"));
    let toml = target_toml(tmp.path(), "http://cms.test/");
    let api = free_addr();
    let target_app = || {
        App::target(tmp.path())
            .config(&toml)
            .args(&["--delivery-listen", &api])
    };
    let mut target = target_app().spawn();
    let addr = target.addr.clone();
    // One page per package, so that the job after the edits has several to cut into.
    let config = wagtail_config_with(
        tmp.path(),
        &cms,
        &target.url(),
        "package_bytes = 1024\nretry_budget = 30",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "broken links only: {job:#}");
    assert_serves_like_wagtail(&api, &cms);

    let did: serde_json::Value = serde_json::from_str(&cms.run(&["mutate"])).unwrap();
    target.kill9();
    target = target_app()
        .listen(&addr)
        .env("CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS", "300")
        .spawn();
    let job = start_job(&source.url());
    wait_acked(&source.url(), &job, 3);
    target.kill9();
    let _target = target_app().listen(&addr).spawn();
    let code = wait_for_job(&source.url(), &job);
    assert!(code <= 1, "{:#}", show_job(&source.url(), &job));
    let j = show_job(&source.url(), &job);
    assert!(
        j["targets"][0]["reconnects"].as_u64().unwrap() >= 1,
        "{j:#}"
    );

    // The replica is Wagtail's subtree again, page for page.
    let (wagtail, _) = assert_serves_like_wagtail(&api, &cms);
    assert!(
        wagtail
            .iter()
            .any(|a| a["title"] == "Article with a draft title")
    );
    let image = did["image"].as_str().unwrap();
    assert_eq!(
        std::fs::read(dst.join(image)).unwrap(),
        std::fs::read(cms.media_root.join(image)).unwrap()
    );
    // The hook hears of the move, with the moved page's descendants, and of the deletes.
    let hook = read_hook(&hook_out);
    let pages = hook["pages"].as_array().unwrap();
    let find = |old: &str| {
        pages
            .iter()
            .find(|p| p["old_url"] == format!("http://cms.test{old}"))
            .unwrap_or_else(|| panic!("{old} not in {hook:#}"))
    };
    let moved = find("/en/news/section-1/topic-1-0/");
    assert_eq!(moved["action"], "moved");
    assert_eq!(
        moved["new_url"],
        "http://cms.test/en/news/section-2/topic-1-0/"
    );
    let below = find("/en/news/section-1/topic-1-0/article-1-0-0/");
    assert_eq!(
        below["new_url"],
        "http://cms.test/en/news/section-2/topic-1-0/article-1-0-0/"
    );
    for gone in [
        "/en/news/section-0/topic-0-1/article-0-1-1/",
        "/en/news/section-1/topic-1-1/article-1-1-1/",
    ] {
        let p = find(gone);
        assert_eq!(
            (p["action"].as_str(), &p["new_url"]),
            (Some("deleted"), &serde_json::Value::Null)
        );
    }
    let parents = hook["parents"].to_string();
    assert!(
        parents.contains("http://cms.test/en/news/section-1/"),
        "{hook:#}"
    );
    assert!(
        parents.contains("http://cms.test/en/news/section-2/"),
        "{hook:#}"
    );
}
