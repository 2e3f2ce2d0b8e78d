//! The delivery API against Wagtail's own API v2: the replica serves every mirrored page
//! as Wagtail does (titles, slugs, types, locales, parents, URLs, sibling order, every
//! field), with links pointed at the replica, and answers conditional requests with 304.

use std::collections::HashMap;

use serde_json::Value;

use cms_mirror::db::Backend;

use crate::cms::Cms;
use crate::helpers::*;

/// GET on the replica as a client of `cms.test` would; (status, head, JSON body).
fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, Value) {
    let mut h = vec![("Host", "cms.test")];
    h.extend_from_slice(headers);
    let (status, head, body) = http_request(addr, path, &h);
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, head, json)
}

/// Page links of Wagtail's rich text with ids mapped to the replica's (`<a>` for a page
/// that is not mirrored), and the replica's with their `href` dropped: equal when the
/// replica points every link where Wagtail does.
fn links_as_ids(html: &str, ids: Option<&HashMap<i64, i64>>) -> String {
    let mut out = String::new();
    let mut rest = html;
    while let Some(i) = rest.find("<a ") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('>').unwrap() + i + 1;
        let tag = &rest[i..end];
        let tag = match tag.split_once(" href=\"") {
            Some((before, after)) => format!("{before}{}", &after[after.find('"').unwrap() + 1..]),
            None => tag.to_string(),
        };
        let mapped = match (ids, tag.strip_prefix("<a linktype=\"page\" id=\"")) {
            (Some(ids), Some(idrest)) => {
                let id: i64 = idrest[..idrest.find('"').unwrap()].parse().unwrap();
                match ids.get(&id) {
                    Some(r) => format!("<a linktype=\"page\" id=\"{r}\">"),
                    None => "<a>".to_string(),
                }
            }
            _ => tag,
        };
        out.push_str(&mapped);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Wagtail's value of a field as the replica should serve it: page ids mapped, links
/// in rich text mapped, images and documents by their files.
fn expected(field: &Value, ids: &HashMap<i64, i64>) -> Value {
    match field {
        Value::String(s) => Value::String(links_as_ids(s, Some(ids))),
        Value::Array(blocks) => Value::Array(
            blocks
                .iter()
                .map(|b| {
                    let mut b = b.clone();
                    let ty = b["type"].as_str().unwrap().to_string();
                    let v = &mut b["value"];
                    match ty.as_str() {
                        "page" => {
                            *v = ids
                                .get(&v.as_i64().unwrap())
                                .map_or(Value::Null, |r| (*r).into())
                        }
                        "card" => {
                            let link = v["link"].as_i64().unwrap();
                            v["link"] = ids.get(&link).map_or(Value::Null, |r| (*r).into());
                        }
                        "paragraph" => {
                            *v = Value::String(links_as_ids(v.as_str().unwrap(), Some(ids)))
                        }
                        _ => {}
                    }
                    b
                })
                .collect(),
        ),
        Value::Object(o)
            if o["meta"]["type"] == "wagtailcore.Page"
                || o["meta"].get("html_url").is_none()
                    && o["meta"].get("download_url").is_none() =>
        {
            // A related page: the replica's id, or null when it is not mirrored.
            match ids.get(&o["id"].as_i64().unwrap()) {
                Some(r) => serde_json::json!({"id": r, "title": o["title"]}),
                None => Value::Null,
            }
        }
        Value::Object(o) => {
            // An image or document: the same id and title, served from the mirrored file.
            let url = o["meta"]["download_url"].as_str().unwrap();
            let file = url.rsplit_once("/media/").unwrap().1;
            serde_json::json!({"id": o["id"], "title": o["title"], "file": file})
        }
        v => v.clone(),
    }
}

/// The replica's value reduced as [`expected`] reduces Wagtail's (its links' `href`
/// dropped).
fn served(field: &Value) -> Value {
    match field {
        Value::String(s) => Value::String(links_as_ids(s, None)),
        Value::Array(blocks) => Value::Array(
            blocks
                .iter()
                .map(|b| {
                    let mut b = b.clone();
                    if b["type"] == "paragraph" {
                        let html = links_as_ids(b["value"].as_str().unwrap(), None);
                        b["value"] = Value::String(html);
                    }
                    b
                })
                .collect(),
        ),
        Value::Object(o) if o["meta"].get("download_url").is_some() => {
            let url = o["meta"]["download_url"].as_str().unwrap();
            let file = url.strip_prefix("http://cms.test/").unwrap();
            serde_json::json!({"id": o["id"], "title": o["title"], "file": file})
        }
        Value::Object(o) => serde_json::json!({"id": o["id"], "title": o["title"]}),
        v => v.clone(),
    }
}

/// Compares the replica's delivery API at `api` with Wagtail's own API for every live
/// page of the subtree: found at Wagtail's URL, then meta, parent, title and every field
/// (ids mapped, links' hrefs dropped). Wagtail's answers and the id map.
pub(crate) fn assert_serves_like_wagtail(api: &str, cms: &Cms) -> (Vec<Value>, HashMap<i64, i64>) {
    let wagtail = cms.api_dump("/home/news/");
    // Every page is found at Wagtail's URL; its replica id maps Wagtail's.
    let mut ids: HashMap<i64, i64> = HashMap::new();
    for a in &wagtail {
        let html = a["meta"]["html_url"].as_str().unwrap();
        let path = html.strip_prefix("http://cms.test").unwrap();
        let (status, head, _) = get(api, &format!("/api/v2/pages/find/?html_path={path}"), &[]);
        assert_eq!(status, 302, "{path}");
        let to = header_of(&head, "location").unwrap();
        let (status, _, page) = get(api, &to, &[]);
        assert_eq!(status, 200, "{to}");
        assert_eq!(page["meta"]["html_url"], html, "{to}");
        ids.insert(a["id"].as_i64().unwrap(), page["id"].as_i64().unwrap());
    }
    for a in &wagtail {
        let rid = ids[&a["id"].as_i64().unwrap()];
        let (_, _, r) = get(api, &format!("/api/v2/pages/{rid}/"), &[]);
        let (am, rm) = (&a["meta"], &r["meta"]);
        for k in [
            "slug",
            "locale",
            "html_url",
            "first_published_at",
            "seo_title",
            "search_description",
            "show_in_menus",
        ] {
            assert_eq!(am[k], rm[k], "{rid}: meta.{k}");
        }
        assert_eq!(
            am["type"].as_str().unwrap().to_lowercase(),
            rm["type"],
            "{rid}"
        );
        assert_eq!(
            rm["detail_url"],
            format!("http://cms.test/api/v2/pages/{rid}/")
        );
        let parent = am["parent"]["id"].as_i64().and_then(|p| ids.get(&p));
        assert_eq!(
            rm["parent"]["id"].as_i64().as_ref(),
            parent,
            "{rid}: parent"
        );
        assert_eq!(a["title"], r["title"], "{rid}");
        for (k, v) in a.as_object().unwrap() {
            if matches!(k.as_str(), "id" | "meta" | "title") {
                continue;
            }
            assert_eq!(served(&r[k]), expected(v, &ids), "{rid}: field {k}");
        }
    }

    assert_eq!(
        get(api, "/api/v2/pages/?limit=1000", &[]).2["meta"]["total_count"],
        wagtail.len(),
        "the replica serves no page Wagtail does not"
    );
    (wagtail, ids)
}

#[test]
fn the_replica_serves_what_wagtails_api_serves_with_links_to_itself() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cms = rt.block_on(Cms::generate(Backend::Sqlite));
    let tmp = tempfile::tempdir().unwrap();
    let toml = crate::mirror::target_toml(tmp.path(), "http://cms.test/");
    let api = free_addr();
    let target = App::target(tmp.path())
        .config(&toml)
        .args(&["--delivery-listen", &api])
        .spawn();
    let config = crate::mirror::wagtail_config(tmp.path(), &cms, &target.url());
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "broken links only: {job:#}");

    let (wagtail, ids) = assert_serves_like_wagtail(&api, &cms);

    // A section's children in the CMS's order, and the listing's count.
    let section = wagtail
        .iter()
        .find(|a| a["meta"]["slug"] == "section-1" && a["meta"]["locale"] == "en")
        .unwrap();
    let sid = section["id"].as_i64().unwrap();
    let children: Vec<&Value> = wagtail
        .iter()
        .filter(|a| a["meta"]["parent"]["id"] == sid)
        .map(|a| &a["title"])
        .collect();
    let (_, _, list) = get(
        &api,
        &format!("/api/v2/pages/?child_of={}&fields=*", ids[&sid]),
        &[],
    );
    let titles: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["title"])
        .collect();
    assert_eq!(titles, children);
    assert_eq!(list["meta"]["total_count"], children.len());
    assert!(
        list["items"][0].get("body").is_some(),
        "fields=* lists the fields"
    );
    let (_, _, de) = get(&api, "/api/v2/pages/?locale=de&limit=1000", &[]);
    let de_count = wagtail
        .iter()
        .filter(|a| a["meta"]["locale"] == "de")
        .count();
    assert_eq!(de["meta"]["total_count"], de_count);

    // Validators: the same answer again is 304.
    let path = format!("/api/v2/pages/{}/", ids[&sid]);
    let (_, head, _) = get(&api, &path, &[]);
    let etag = header_of(&head, "etag").unwrap();
    let modified = header_of(&head, "last-modified").unwrap();
    assert_eq!(get(&api, &path, &[("If-None-Match", &etag)]).0, 304);
    assert_eq!(get(&api, &path, &[("If-Modified-Since", &modified)]).0, 304);
    assert_eq!(get(&api, &path, &[("If-None-Match", "\"other\"")]).0, 200);
    let (status, _, body) = get(&api, "/api/v2/pages/12345/", &[]);
    assert_eq!(
        (status, body["message"].as_str()),
        (404, Some("No Page matches the given query."))
    );
    let (status, _, body) = get(&api, "/api/v2/pages/?site=nope", &[]);
    assert_eq!(status, 400, "{body}");
}
