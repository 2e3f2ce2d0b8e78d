//! Pages through the whole pipeline: a wagtail channel between real service processes
//! mirrors the generated CMS's subtree into a target's page store (and its images and
//! documents into the site's files), sends nothing when nothing changed, and one page
//! when one was published again.

use std::path::Path;

use cms_mirror::db::Backend;

use crate::cms::Cms;
use crate::helpers::*;

/// The target's page store: (key, title) of each page of site `main`.
fn replica(dir: &Path) -> Vec<(String, String)> {
    let url = format!("sqlite://{}", dir.join("target-data/target.db").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let db = cms_mirror::db::connect(&url, cms_mirror::db::Schema::Target)
            .await
            .unwrap();
        sqlx::query_as("SELECT page_key, title FROM pages WHERE site = 'main' ORDER BY page_key")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    })
}

fn wagtail_config(dir: &Path, cms: &Cms, target_url: &str) -> std::path::PathBuf {
    let p = dir.join("mirror.toml");
    std::fs::write(
        &p,
        format!(
            "[[channel]]\nname = \"site\"\nsource = \"wagtail+{}\"\nmedia_root = \"{}\"\n\
             root_page = \"/home/news/\"\ndelete = true\n\n  [[channel.target]]\n  name = \"web1\"\n  url = \"{target_url}\"\n  site = \"main\"\n",
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
    let dst = tmp.path().join("dst");
    let hook_out = tmp.path().join("hook.json");
    let toml = tmp.path().join("target.toml");
    std::fs::write(
        &toml,
        format!(
            "[[site]]\nname = \"main\"\nroot = \"{}\"\nbase_url = \"https://www.example.com/\"\n\n\
             [[site.hook]]\ncommand = [\"sh\", \"-c\", \"cat > {}\"]\n",
            dst.display(),
            hook_out.display()
        ),
    )
    .unwrap();
    let target = App::target(tmp.path()).config(&toml).spawn();
    let config = wagtail_config(tmp.path(), &cms, &target.url());
    let source = App::source(tmp.path(), &config).spawn();

    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let pages = replica(tmp.path());
    let live = cms.made["live_in_news"].as_u64().unwrap() as usize;
    assert_eq!(pages.len(), live, "{pages:#?}");
    assert!(
        pages
            .iter()
            .any(|(k, t)| k.starts_with("de/") && t == "Nachrichten")
    );
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
    assert!(pages.iter().any(|(_, t)| t == "All the news"), "{pages:#?}");
}
