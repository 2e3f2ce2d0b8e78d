//! A wagtail channel published atomically: the target's delivery API serves the page
//! store of the live generation, and flips with the files at the switch.

use cms_mirror::db::Backend;

use crate::cms::Cms;
use crate::helpers::*;

/// Every page title the delivery API at `api` lists.
fn titles(api: &str) -> Vec<String> {
    let (status, body) = http_get(api, "/api/v2/pages/?limit=1000");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["title"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_delivery_api_flips_with_the_files_at_the_switch() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cms = rt.block_on(Cms::generate(Backend::Sqlite));
    let tmp = tempfile::tempdir().unwrap();
    let toml = crate::mirror::target_toml(tmp.path(), "http://cms.test/");
    let api = free_addr();
    let target = App::target(tmp.path())
        .config(&toml)
        .args(&["--delivery-listen", &api])
        .spawn();
    let config =
        crate::mirror::wagtail_config_with(tmp.path(), &cms, &target.url(), "publish = \"atomic\"");
    let source = App::source(tmp.path(), &config).spawn();
    // Broken links (to pages outside the subtree) are item errors: the job publishes.
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "{job:#}");
    let dst = tmp.path().join("dst");
    assert_eq!(
        std::fs::read_link(&dst).unwrap(),
        std::path::Path::new("dst.generations/1")
    );
    let before = titles(&api);
    assert!(!before.is_empty());

    // The next job stops between its phases: the target has the new page in its work
    // area, and the delivery API still serves generation 1.
    let id = cms.made["news"].as_i64().unwrap().to_string();
    cms.run(&["retitle", "--id", &id, "--title", "All the news"]);
    drop(source);
    let marker = tmp.path().join("killed");
    let mut source = App::source(tmp.path(), &config)
        .env(
            "CMS_MIRROR_FAILPOINT_KILL_AT",
            &format!("decided:{}", marker.display()),
        )
        .spawn();
    let job = start_job(&source.url());
    source.child.wait().unwrap();
    assert!(marker.exists());
    assert_eq!(
        titles(&api),
        before,
        "the API served the prepared generation"
    );
    assert_eq!(
        std::fs::read_link(&dst).unwrap(),
        std::path::Path::new("dst.generations/1")
    );

    // The source comes back and tells the target to switch: pages and files together.
    let source = App::source(tmp.path(), &config).spawn();
    assert_succeeds(&source.url(), &job);
    assert_eq!(
        std::fs::read_link(&dst).unwrap(),
        std::path::Path::new("dst.generations/2")
    );
    let after = titles(&api);
    assert!(after.contains(&"All the news".to_string()), "{after:?}");
    assert_eq!(after.len(), before.len());
}
