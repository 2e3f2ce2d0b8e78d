//! A stored page document as Wagtail's API v2 shows a page, with every reference
//! pointed at the replica: pages by their replica id and URL, images and documents by
//! their mirrored files.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use cms_mirror::page::{PageDoc, RefKind};

/// A page of the store as links and nested objects show it.
#[derive(Clone, Debug)]
pub struct Linked {
    pub id: i64,
    pub page_type: String,
    pub title: String,
    /// Absolute when the site has a `base_url`.
    pub html_url: Option<String>,
}

/// What a page's references resolve to on the replica.
pub struct Resolved {
    /// Mirrored pages by key (those not here are not mirrored: broken links).
    pub pages: HashMap<String, Linked>,
    /// The site's `base_url` without its trailing `/` (files are served under it).
    pub base_url: String,
    /// `http://host` the API is reached at, for `detail_url`.
    pub api_base: String,
}

impl Resolved {
    pub fn detail_url(&self, id: i64) -> String {
        format!("{}/api/v2/pages/{id}/", self.api_base)
    }

    fn file_url(&self, path: &str) -> String {
        format!("{}/{path}", self.base_url)
    }

    /// A related page as Wagtail nests it (`{"id", "meta": {"type", "detail_url"},
    /// "title"}`), or null when it is not mirrored.
    pub fn nested_page(&self, key: &str, with_html_url: bool) -> Value {
        let Some(p) = self.pages.get(key) else {
            return Value::Null;
        };
        let mut meta = json!({"type": p.page_type, "detail_url": self.detail_url(p.id)});
        if with_html_url {
            meta["html_url"] = json!(p.html_url);
        }
        json!({"id": p.id, "meta": meta, "title": p.title})
    }
}

/// The page's fields as the API shows them.
pub fn fields(doc: &PageDoc, r: &Resolved) -> Map<String, Value> {
    let mut pages: HashMap<i64, &str> = HashMap::new();
    let mut files: HashMap<(RefKind, i64), (&str, &str)> = HashMap::new();
    for x in &doc.references {
        match x.kind {
            RefKind::Page => {
                pages.insert(x.id, &x.to);
            }
            k => {
                files.insert((k, x.id), (&x.to, &x.title));
            }
        }
    }
    let mut out = Map::new();
    for (name, value) in &doc.fields {
        let mut v = value.clone();
        let below = format!("{name}.");
        for x in doc
            .references
            .iter()
            .filter(|x| x.path == *name || x.path.starts_with(&below))
        {
            let Some(slot) = locate(&mut v, &x.path[name.len()..]) else {
                continue;
            };
            if slot.as_i64() != Some(x.id) {
                continue; // rich text: rewritten below
            }
            let top_level = x.path == *name;
            *slot = match (x.kind, top_level) {
                (RefKind::Page, true) => r.nested_page(&x.to, false),
                (RefKind::Page, false) => r.pages.get(&x.to).map_or(Value::Null, |p| json!(p.id)),
                (kind, true) if !x.to.is_empty() => {
                    let ty = match kind {
                        RefKind::Image => "wagtailimages.Image",
                        _ => "wagtaildocs.Document",
                    };
                    json!({"id": x.id, "meta": {"type": ty, "download_url": r.file_url(&x.to)}, "title": x.title})
                }
                (_, true) => Value::Null,
                (_, false) => json!(x.id),
            };
        }
        rewrite_strings(&mut v, &|html| rich_text(html, &pages, &files, r));
        out.insert(name.clone(), v);
    }
    out
}

/// The value at a content path below a field (`""`, `.<block id>`, `.<block id>.<child>`).
fn locate<'v>(v: &'v mut Value, rest: &str) -> Option<&'v mut Value> {
    let mut cur = v;
    for part in rest.split('.').filter(|p| !p.is_empty()) {
        cur = match cur {
            Value::Array(blocks) => blocks
                .iter_mut()
                .find(|b| b.get("id").and_then(Value::as_str) == Some(part))
                .and_then(|b| b.get_mut("value"))?,
            Value::Object(o) => o.get_mut(part)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn rewrite_strings(v: &mut Value, f: &dyn Fn(&str) -> Option<String>) {
    match v {
        Value::String(s) => {
            if let Some(new) = f(s) {
                *s = new;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_strings(x, f)),
        Value::Object(o) => o.values_mut().for_each(|x| rewrite_strings(x, f)),
        _ => {}
    }
}

/// Wagtail's rich text with its links pointed at the replica: a page link keeps
/// `linktype="page"` with the replica's id and gains `href` (its URL); a document link
/// gains `href` (the mirrored file); a link to a page not mirrored loses its target.
/// `None` when the text has no link to rewrite.
fn rich_text(
    html: &str,
    pages: &HashMap<i64, &str>,
    files: &HashMap<(RefKind, i64), (&str, &str)>,
    r: &Resolved,
) -> Option<String> {
    if !html.contains("linktype=") {
        return None;
    }
    let mut out = String::with_capacity(html.len() + 64);
    let mut rest = html;
    while let Some(start) = rest.find("<a ") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        let tag = &rest[start..start + len + 1];
        out.push_str(&link_tag(tag, pages, files, r));
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Some(out)
}

fn attr<'t>(tag: &'t str, name: &str) -> Option<&'t str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = tag[at..].find('"')?;
    Some(&tag[at..at + end])
}

fn link_tag(
    tag: &str,
    pages: &HashMap<i64, &str>,
    files: &HashMap<(RefKind, i64), (&str, &str)>,
    r: &Resolved,
) -> String {
    let id = attr(tag, "id").and_then(|i| i.parse::<i64>().ok());
    match (attr(tag, "linktype"), id) {
        (Some("page"), Some(id)) => match pages.get(&id).and_then(|k| r.pages.get(*k)) {
            Some(p) => format!(
                "<a linktype=\"page\" id=\"{}\" href=\"{}\">",
                p.id,
                escape(p.html_url.as_deref().unwrap_or(""))
            ),
            None => "<a>".into(),
        },
        (Some("document"), Some(id)) => match files.get(&(RefKind::Document, id)) {
            Some((path, _)) if !path.is_empty() => format!(
                "<a linktype=\"document\" id=\"{id}\" href=\"{}\">",
                escape(&r.file_url(path))
            ),
            _ => "<a>".into(),
        },
        _ => tag.to_string(),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
}
