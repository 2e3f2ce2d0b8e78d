//! Pages through the whole pipeline: a wagtail channel between real service processes
//! mirrors the generated CMS's subtree into a target's page store (and its images and
//! documents into the site's files), sends nothing when nothing changed, and one page
//! when one was published again.

use std::path::Path;

use cms_mirror::db::Backend;

use crate::cms::Cms;
use crate::helpers::*;

/// The target's page store: (key, title, URL path, source id) of each page of site
/// `main`.
fn replica(dir: &Path) -> Vec<(String, String, Option<String>, i64)> {
    let url = format!("sqlite://{}", dir.join("target-data/target.db").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let db = cms_mirror::db::connect(&url, cms_mirror::db::Schema::Target)
            .await
            .unwrap();
        let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
            "SELECT page_key, title, url_path, doc FROM pages WHERE site = 'main' ORDER BY page_key",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(k, t, u, doc)| {
                let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
                (k, t, u, doc["source_id"].as_i64().unwrap())
            })
            .collect()
    })
}

/// A target.toml in `dir` with site `main` at `dir/dst` under `base_url`, and a hook
/// that writes its JSON to `dir/hook.json` (read it with [`read_hook`]).
pub(crate) fn target_toml(dir: &Path, base_url: &str) -> std::path::PathBuf {
    let toml = dir.join("target.toml");
    std::fs::write(
        &toml,
        format!(
            "[[site]]\nname = \"main\"\nroot = \"{}\"\nbase_url = \"{base_url}\"\n\n\
             [[site.hook]]\ncommand = [\"sh\", \"-c\", \"cat > {}\"]\n",
            dir.join("dst").display(),
            dir.join("hook.json").display()
        ),
    )
    .unwrap();
    toml
}

pub(crate) fn read_hook(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

pub(crate) fn wagtail_config(dir: &Path, cms: &Cms, target_url: &str) -> std::path::PathBuf {
    wagtail_config_with(dir, cms, target_url, "")
}

/// A mirror.toml with channel `site` of the CMS's `/home/news/` subtree (deletes on),
/// `extra` channel keys added.
pub(crate) fn wagtail_config_with(
    dir: &Path,
    cms: &Cms,
    target_url: &str,
    extra: &str,
) -> std::path::PathBuf {
    let p = dir.join("mirror.toml");
    std::fs::write(
        &p,
        format!(
            "[[channel]]\nname = \"site\"\nsource = \"wagtail+{}\"\nmedia_root = \"{}\"\n\
             root_page = \"/home/news/\"\ndelete = true\n{extra}\n\n  [[channel.target]]\n  name = \"web1\"\n  url = \"{target_url}\"\n  site = \"main\"\n",
            cms.db_url,
            cms.media_root.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn a_wagtail_channel_mirrors_the_live_subtree_and_then_only_what_changed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cms = rt.block_on(Cms::generate(Backend::Sqlite));
    let tmp = tempfile::tempdir().unwrap();
    let (dst, hook_out) = (tmp.path().join("dst"), tmp.path().join("hook.json"));
    let toml = target_toml(tmp.path(), "https://www.example.com/");
    let target = App::target(tmp.path()).config(&toml).spawn();
    let config = wagtail_config(tmp.path(), &cms, &target.url());
    let source = App::source(tmp.path(), &config).spawn();

    // Links to `about` (outside the subtree) and to the unpublished page are broken on
    // the replica: item errors naming both pages, and the job goes on.
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "{job:#}");
    let errors = job["item_errors"].as_array().unwrap();
    assert!(
        errors.iter().all(|e| e["code"] == "broken_link"),
        "{errors:#?}"
    );
    let pages = replica(tmp.path());
    let key_of = |id: i64| pages.iter().find(|p| p.3 == id).map(|p| p.0.clone());
    // The first article links to `about`.
    let first = key_of(cms.made["first_article"].as_i64().unwrap()).unwrap();
    let about = cms.made["about"].as_i64().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["path"].as_str().unwrap().ends_with(&first)
                && e["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("page \"Article 0.0.0\" (/en/news/")
                && e["message"]
                    .as_str()
                    .unwrap()
                    .contains("links to /home/about/ (en/")),
        "no broken link from {first} (to about, page {about}): {errors:#?}"
    );
    let live = cms.made["live_in_news"].as_u64().unwrap() as usize;
    assert_eq!(pages.len(), live, "{pages:#?}");
    assert!(
        pages
            .iter()
            .any(|p| p.0.starts_with("de/") && p.1 == "Nachrichten")
    );
    // Every page's URL on the replica is the one Wagtail gives it (pages_root "/").
    for a in cms.api_dump("/home/news/") {
        let id = a["id"].as_i64().unwrap();
        let html = a["meta"]["html_url"].as_str().unwrap();
        let path = html.strip_prefix("http://cms.test").unwrap();
        let p = pages.iter().find(|p| p.3 == id).unwrap();
        assert_eq!(p.2.as_deref(), Some(path), "page {id}");
    }
    // Images and documents land as files, renditions do not.
    for f in cms.made["images"]
        .as_array()
        .unwrap()
        .iter()
        .chain(cms.made["documents"].as_array().unwrap())
    {
        let f = f.as_str().unwrap();
        assert_eq!(
            std::fs::read(dst.join(f)).unwrap(),
            std::fs::read(cms.media_root.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!dst.join("images").exists(), "renditions mirrored");
    assert!(
        !dst.join(".cms-mirror-pages").exists(),
        "pages must not touch the site's files"
    );
    // The hook hears of the files by their URLs, and of every page with its locale and
    // its new URL (full, as the site has a base_url); no file URL names a page.
    let hook = read_hook(&hook_out);
    let created = hook["created"].as_array().unwrap();
    assert!(
        created
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("original_images/")),
        "{hook:#}"
    );
    assert!(
        !hook["urls"].to_string().contains(".cms-mirror-pages"),
        "{hook:#}"
    );
    assert!(
        !hook["created"].to_string().contains(".cms-mirror-pages"),
        "{hook:#}"
    );
    let hooked = hook["pages"].as_array().unwrap();
    assert_eq!(hooked.len(), live, "{hook:#}");
    let news = hooked
        .iter()
        .find(|p| p["new_url"] == "https://www.example.com/en/news/")
        .unwrap_or_else(|| panic!("{hook:#}"));
    assert_eq!(
        (news["action"].as_str(), news["locale"].as_str()),
        (Some("created"), Some("en"))
    );
    assert_eq!(news["old_url"], serde_json::Value::Null);

    // Nothing changed: nothing sent.
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let t = &job["targets"][0];
    assert_eq!(t["items_total"], 0, "{t:#}");

    // One page published again: one page sent.
    let id = cms.made["news"].as_i64().unwrap().to_string();
    cms.run(&["retitle", "--id", &id, "--title", "All the news"]);
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let t = &job["targets"][0];
    assert_eq!(t["items_total"], 1, "{t:#}");
    let pages = replica(tmp.path());
    assert_eq!(pages.len(), live);
    assert!(pages.iter().any(|p| p.1 == "All the news"), "{pages:#?}");
    let hook = read_hook(&hook_out);
    let hooked = hook["pages"].as_array().unwrap();
    assert_eq!(hooked.len(), 1, "{hook:#}");
    assert_eq!(hooked[0]["action"], "updated");
    assert_eq!(hooked[0]["new_url"], "https://www.example.com/en/news/");
    assert_eq!(hook["parents"], serde_json::json!([]), "{hook:#}");

    // A section renamed: it and everything below it move, the hook hears of each with
    // its old and new URL, and of the parent whose list of children changed.
    let id = cms.made["section_0"].as_i64().unwrap().to_string();
    cms.run(&["reslug", "--id", &id, "--slug", "world"]);
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_eq!(
        job["targets"][0]["items_total"], 1,
        "one page sent: {job:#}"
    );
    let pages = replica(tmp.path());
    let below = pages
        .iter()
        .filter(|p| {
            p.2.as_deref()
                .is_some_and(|u| u.starts_with("/en/news/world/"))
        })
        .count();
    assert!(below > 1, "{pages:#?}");
    assert!(!pages.iter().any(|p| {
        p.2.as_deref()
            .is_some_and(|u| u.starts_with("/en/news/section-0/"))
    }));
    let hook = read_hook(&hook_out);
    let hooked = hook["pages"].as_array().unwrap();
    assert_eq!(hooked.len(), below, "{hook:#}");
    for h in hooked {
        assert_eq!(h["action"], "moved", "{h}");
        let (old, new) = (
            h["old_url"].as_str().unwrap(),
            h["new_url"].as_str().unwrap(),
        );
        assert_eq!(
            old.replace("/en/news/section-0/", "/en/news/world/"),
            new,
            "{h}"
        );
    }
    assert_eq!(
        hook["parents"],
        serde_json::json!(["https://www.example.com/en/news/"]),
        "{hook:#}"
    );
}

/// A publish in the CMS starts an incremental job on its own (no plugin in the CMS):
/// the watch notices it in the CMS's database once it has been quiet for a moment.
#[test]
fn a_publish_in_the_cms_starts_a_job_that_brings_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cms = rt.block_on(Cms::generate(Backend::Sqlite));
    let tmp = tempfile::tempdir().unwrap();
    let target = App::target(tmp.path())
        .site(&tmp.path().join("dst"))
        .spawn();
    let config = wagtail_config_with(
        tmp.path(),
        &cms,
        &target.url(),
        "watch = true\nwatch_quiet_ms = 300",
    );
    let source = App::source(tmp.path(), &config).spawn();
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert!(
        jobs(&source.url()).is_empty(),
        "a job with nothing published"
    );
    let id = cms.made["news"].as_i64().unwrap().to_string();
    cms.run(&["retitle", "--id", &id, "--title", "Published in the CMS"]);
    let job = wait_until(std::time::Duration::from_secs(30), || {
        let list = jobs(&source.url());
        assert!(list.len() <= 1, "one publish, one job: {list:#?}");
        list.first()
            .cloned()
            .ok_or_else(|| "no job was started".to_string())
    });
    assert_eq!(job["trigger"], "watch", "{job:#}");
    let code = wait_for_job(&source.url(), job["id"].as_str().unwrap());
    assert!(code <= 1, "{job:#}");
    assert!(
        replica(tmp.path())
            .iter()
            .any(|p| p.1 == "Published in the CMS")
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        jobs(&source.url()).len(),
        1,
        "nothing published since: no job"
    );
}

/// StartJob `paths` on a wagtail channel take page URL paths: a job mirrors those pages
/// and their subtrees, and nothing else changed in the CMS.
#[test]
fn a_job_of_page_paths_brings_those_pages_and_nothing_else() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cms = rt.block_on(Cms::generate(Backend::Sqlite));
    let tmp = tempfile::tempdir().unwrap();
    let target = App::target(tmp.path())
        .site(&tmp.path().join("dst"))
        .spawn();
    let config = wagtail_config(tmp.path(), &cms, &target.url());
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "broken links only: {job:#}");
    for (id, title) in [("section_0", "Section zero"), ("news", "Not asked for")] {
        let id = cms.made[id].as_i64().unwrap().to_string();
        cms.run(&["retitle", "--id", &id, "--title", title]);
    }
    let (code, job) = run_job(&source.url(), &["--path", "/home/news/section-0/"]);
    assert!(code <= 1, "{job:#}");
    assert_eq!(job["targets"][0]["items_total"], 1, "{job:#}");
    assert_eq!(job["targets"][0]["deletes_total"], 0, "{job:#}");
    let titles: Vec<String> = replica(tmp.path()).into_iter().map(|p| p.1).collect();
    assert!(titles.contains(&"Section zero".to_string()), "{titles:?}");
    assert!(!titles.contains(&"Not asked for".to_string()), "{titles:?}");
    // A page outside the channel's subtree is a clear error.
    let (code, job) = run_job(&source.url(), &["--path", "/home/about/"]);
    assert_eq!(code, 2, "{job:#}");
    let error = job["targets"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("\"/home/about/\" is not a page of the channel's subtree"),
        "{error}"
    );
}
