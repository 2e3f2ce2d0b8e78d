//! The `wagtail` reader against the generated site: what it reads of the subtree is what
//! Wagtail's own API v2 serves of it, page by page, with every reference listed.

use std::collections::HashMap;

use serde_json::Value;

use cms_mirror::db::Backend;
use cms_mirror::page::{PageDoc, RefKind};
use cms_mirror::wagtail::{Subtree, WagtailDb, WagtailError};

use crate::cms::Cms;

fn subtree(languages: &[&str], include_root: bool) -> Subtree {
    Subtree {
        root: "/home/news/".into(),
        include_root,
        languages: languages.iter().map(|l| l.to_string()).collect(),
        only: Vec::new(),
    }
}

async fn read(w: &WagtailDb, s: &Subtree) -> Result<Vec<PageDoc>, WagtailError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let walk = w.walk(s, tx);
    let collect = async {
        let mut out = Vec::new();
        while let Some(p) = rx.recv().await {
            out.push(p?);
        }
        Ok(out)
    };
    let ((), out) = tokio::join!(walk, collect);
    out
}

#[tokio::test]
async fn sqlite_the_reader_reads_what_wagtails_api_serves() {
    the_reader_reads_what_wagtails_api_serves(Backend::Sqlite).await
}

#[tokio::test]
#[cfg_attr(
    not(any(ci, test_database)),
    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
)]
async fn postgres_the_reader_reads_what_wagtails_api_serves() {
    the_reader_reads_what_wagtails_api_serves(Backend::Postgres).await
}

async fn the_reader_reads_what_wagtails_api_serves(backend: Backend) {
    let cms = Cms::generate(backend).await;
    let w = WagtailDb::open(&format!("wagtail+{}", cms.db_url))
        .await
        .unwrap();
    let pages = read(&w, &subtree(&[], true)).await.unwrap();
    let api = cms.api_dump("/home/news/");
    assert_eq!(pages.len(), api.len(), "{backend:?}: pages read vs served");
    assert_eq!(
        api.len() as u64,
        cms.made["live_in_news"].as_u64().unwrap(),
        "the API serves every live page of both locales' subtrees"
    );
    // Key order: locale, then translation key.
    let keys: Vec<&str> = pages.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");

    let by_id: HashMap<i64, &PageDoc> = pages.iter().map(|p| (p.source_id, p)).collect();
    for a in &api {
        let id = a["id"].as_i64().unwrap();
        let p = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("{backend:?}: page {id} served, not read"));
        same_page(a, p, &by_id);
    }
    // Not read: the draft's title, the unpublished page, the page never published.
    let draft = cms.made["draft"].as_i64().unwrap();
    assert_ne!(by_id[&draft].title, "Article with a draft title");
    assert!(!by_id.contains_key(&cms.made["unpublished"].as_i64().unwrap()));
    assert!(!pages.iter().any(|p| p.slug == "never-published"));

    // Sibling order is the CMS's: under each parent, positions sort as the API lists.
    let mut order: HashMap<(&str, Option<&str>), Vec<&str>> = HashMap::new();
    for a in &api {
        let p = by_id[&a["id"].as_i64().unwrap()];
        order
            .entry((&p.locale, p.parent.as_deref()))
            .or_default()
            .push(&p.position);
    }
    for (parent, positions) in order {
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{parent:?}: {positions:?}"
        );
    }
    references(&pages, &cms);
    options(&w).await;
    // Read in statements of 7 pages, the same pages in the same order.
    let small = WagtailDb::open(&format!("wagtail+{}", cms.db_url))
        .await
        .unwrap()
        .with_batch(7);
    assert_eq!(
        read(&small, &subtree(&[], true)).await.unwrap(),
        pages,
        "{backend:?}"
    );
}

/// One page as read against Wagtail's API answer for it.
fn same_page(a: &Value, p: &PageDoc, by_id: &HashMap<i64, &PageDoc>) {
    let m = &a["meta"];
    let id = p.source_id;
    assert_eq!(a["title"], p.title, "{id}");
    assert_eq!(m["slug"], p.slug, "{id}");
    assert_eq!(m["locale"], p.locale, "{id}");
    assert_eq!(m["seo_title"], p.seo_title, "{id}");
    assert_eq!(m["search_description"], p.search_description, "{id}");
    assert_eq!(m["show_in_menus"], p.show_in_menus, "{id}");
    assert_eq!(
        m["first_published_at"].as_str(),
        p.first_published_at.as_deref(),
        "{id}"
    );
    // Django keeps model names in lower case; the API shows the class name.
    assert_eq!(
        m["type"].as_str().unwrap().to_lowercase(),
        p.page_type,
        "{id}"
    );
    // The subtree's root has no parent in the mirror; every other page its parent's key.
    let parent = m["parent"]["id"].as_i64().and_then(|pid| by_id.get(&pid));
    assert_eq!(parent.map(|q| q.key.as_str()), p.parent.as_deref(), "{id}");
    let fields: Vec<&String> = a
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !matches!(k.as_str(), "id" | "meta" | "title"))
        .collect();
    assert!(!fields.is_empty(), "{id}: no fields served");
    for f in fields {
        let ours = &p.fields[f.as_str()];
        match &a[f.as_str()] {
            // Foreign keys: the API nests the object, the revision holds its id.
            Value::Object(o) => assert_eq!(o["id"], *ours, "{id}.{f}"),
            v => assert_eq!(v, ours, "{id}.{f}"),
        }
    }
}

/// Every kind of reference is listed where it sits, resolved to what it points at.
fn references(pages: &[PageDoc], cms: &Cms) {
    let about = cms.made["about"].as_i64().unwrap();
    let first = pages
        .iter()
        .find(|p| p.slug == "article-0-0-0" && p.locale == "en")
        .unwrap();
    let r = &first.references;
    let outside = r
        .iter()
        .find(|r| r.kind == RefKind::Page && r.id == about)
        .unwrap_or_else(|| panic!("no link to about: {r:#?}"));
    assert_eq!(outside.path, "body");
    assert!(outside.to.starts_with("en/"), "{outside:?}");
    assert!(
        !pages.iter().any(|p| p.key == outside.to),
        "about is outside the subtree"
    );
    let images: Vec<String> = cms.made["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for (field, kind) in [
        ("hero_image", RefKind::Image),
        ("attachment", RefKind::Document),
        ("related_page", RefKind::Page),
        ("body", RefKind::Image),
        ("body", RefKind::Document),
    ] {
        let hit = r.iter().find(|x| x.path == field && x.kind == kind);
        let hit = hit.unwrap_or_else(|| panic!("no {kind:?} reference at {field}: {r:#?}"));
        assert!(!hit.to.is_empty(), "{hit:?}");
        if kind == RefKind::Image {
            assert!(images.contains(&hit.to), "{hit:?} not in {images:?}");
            assert!(hit.title.starts_with("picture "), "{hit:?}");
        }
    }
    // A section's StreamField: rich text, image, document and page choosers and a
    // struct's children, each at its block's path.
    let section = pages
        .iter()
        .find(|p| p.slug == "section-0" && p.locale == "en")
        .unwrap();
    let blocks = section.fields["body"]
        .as_array()
        .expect("StreamField as blocks");
    for b in blocks {
        let (ty, bid) = (b["type"].as_str().unwrap(), b["id"].as_str().unwrap());
        let at = |path: String, kind: RefKind, value: &Value| {
            let hit = section
                .references
                .iter()
                .find(|r| r.path == path && r.kind == kind);
            let hit =
                hit.unwrap_or_else(|| panic!("no {kind:?} at {path}: {:#?}", section.references));
            if let Some(v) = value.as_i64() {
                assert_eq!(hit.id, v, "{path}");
            }
        };
        match ty {
            "image" => at(format!("body.{bid}"), RefKind::Image, &b["value"]),
            "document" => at(format!("body.{bid}"), RefKind::Document, &b["value"]),
            "page" | "paragraph" => at(format!("body.{bid}"), RefKind::Page, &b["value"]),
            "card" => {
                at(
                    format!("body.{bid}.link"),
                    RefKind::Page,
                    &b["value"]["link"],
                );
                at(
                    format!("body.{bid}.image"),
                    RefKind::Image,
                    &b["value"]["image"],
                );
            }
            _ => {}
        }
    }
}

/// The subtree's options: the root left out, one locale, clear errors.
async fn options(w: &WagtailDb) {
    let all = read(w, &subtree(&[], true)).await.unwrap();
    let without_root = read(w, &subtree(&[], false)).await.unwrap();
    assert_eq!(
        without_root.len(),
        all.len() - 2,
        "the root in both locales"
    );
    assert!(!without_root.iter().any(|p| p.slug == "news"));
    let tops: Vec<&str> = without_root
        .iter()
        .filter(|p| p.parent.is_none())
        .map(|p| p.slug.as_str())
        .collect();
    assert_eq!(tops.len(), 6, "three sections in two locales: {tops:?}");
    assert!(tops.iter().all(|s| s.starts_with("section-")), "{tops:?}");
    let de = read(w, &subtree(&["de"], true)).await.unwrap();
    assert!(!de.is_empty() && de.iter().all(|p| p.locale == "de"));
    assert_eq!(
        de.len() + read(w, &subtree(&["en"], true)).await.unwrap().len(),
        all.len()
    );
    let e = read(w, &subtree(&["fr"], true)).await.unwrap_err();
    assert!(matches!(e, WagtailError::NoLocale { .. }), "{e}");
    let mut nowhere = subtree(&[], true);
    nowhere.root = "/home/nowhere/".into();
    let e = read(w, &nowhere).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "root page \"/home/nowhere/\" not found (a url_path such as /home/news/, or a page id)"
    );
}
