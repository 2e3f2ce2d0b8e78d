//! The delivery API: a site's page store served read-only, shaped like Wagtail's API v2
//! so that a front end written for Wagtail reads the replica unchanged.
//!
//! - `GET /api/v2/pages/?site=S` with `locale`, `child_of`, `type`, `fields=*`, `limit`
//!   (default 20, at most 1000), `offset`: `{"meta": {"total_count"}, "items": [...]}`;
//!   children in their CMS order, other listings by locale and URL.
//! - `GET /api/v2/pages/ID/?site=S`: one page with every field.
//! - `GET /api/v2/pages/find/?site=S&html_path=/en/news/`: a redirect to the page.
//!
//! `site` may be left out when the target serves one site. Every answer carries an
//! `ETag` (of its body) and `Last-Modified` (the site's last page change) and answers
//! `If-None-Match` / `If-Modified-Since` with 304.

mod render;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;

use cms_mirror::config::SiteConfig;
use cms_mirror::db::Db;
use cms_mirror::page::PageDoc;

use render::{Linked, Resolved};

/// The page store of every site, as served.
pub struct Delivery {
    db: Db,
    sites: Vec<SiteConfig>,
}

impl Delivery {
    pub fn new(db: Db, sites: Vec<SiteConfig>) -> Arc<Delivery> {
        Arc::new(Delivery { db, sites })
    }
}

/// Serves the delivery API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, d: Arc<Delivery>) {
    let app = axum::Router::new()
        .route("/api/v2/pages/", axum::routing::get(list))
        .route("/api/v2/pages/find/", axum::routing::get(find))
        .route("/api/v2/pages/{id}/", axum::routing::get(detail))
        .with_state(d);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "delivery API stopped");
    }
}

/// An answer that is not a page: Wagtail's `{"message": ...}` with its status.
struct Problem(StatusCode, String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"message": self.1}))).into_response()
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Problem {
        tracing::error!(error = %e, "delivery API: database error");
        Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "page store unavailable".into(),
        )
    }
}

#[derive(Deserialize, Default)]
struct Params {
    site: Option<String>,
    locale: Option<String>,
    child_of: Option<i64>,
    #[serde(rename = "type")]
    page_type: Option<String>,
    fields: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    html_path: Option<String>,
}

/// A site as one request serves it: its configuration and the store of its live
/// generation (what a site published atomically serves until its next switch).
struct Served<'a> {
    cfg: &'a SiteConfig,
    store: String,
}

impl Delivery {
    async fn site(&self, name: Option<&str>) -> Result<Served<'_>, Problem> {
        let cfg = self.config(name)?;
        let store = crate::generations::live_store(&self.db, &cfg.name).await?;
        Ok(Served { cfg, store })
    }

    fn config(&self, name: Option<&str>) -> Result<&SiteConfig, Problem> {
        match name {
            Some(n) => self
                .sites
                .iter()
                .find(|s| s.name == n)
                .ok_or_else(|| Problem(StatusCode::BAD_REQUEST, format!("site not found: {n}"))),
            None if self.sites.len() == 1 => Ok(&self.sites[0]),
            None => Err(Problem(
                StatusCode::BAD_REQUEST,
                "this target serves several sites: say which with ?site=NAME".into(),
            )),
        }
    }

    /// What references resolve to for one request: every mirrored page of the site as
    /// links show it, the site's base URL, and the API's own for `detail_url`.
    async fn resolved(
        &self,
        site: &Served<'_>,
        headers: &HeaderMap,
    ) -> Result<Resolved, sqlx::Error> {
        let base = base_url(site.cfg);
        let rows = sqlx::query(
            "SELECT page_key, id, page_type, title, url_path FROM pages WHERE site = $1",
        )
        .bind(&site.store)
        .fetch_all(&self.db.pool)
        .await?;
        let pages = rows
            .iter()
            .map(|r| {
                let url: Option<String> = r.get(4);
                let linked = Linked {
                    id: r.get(1),
                    page_type: r.get(2),
                    title: r.get(3),
                    html_url: url.map(|u| format!("{base}{u}")),
                };
                (r.get::<String, _>(0), linked)
            })
            .collect();
        Ok(Resolved {
            pages,
            base_url: base,
            api_base: api_base(headers),
        })
    }

    /// The site's last page change, in seconds.
    async fn last_change(&self, site: &str) -> Result<i64, sqlx::Error> {
        let r = sqlx::query("SELECT COALESCE(MAX(updated_at), 0) FROM pages WHERE site = $1")
            .bind(site)
            .fetch_one(&self.db.pool)
            .await?;
        Ok(r.get::<i64, _>(0) / 1000)
    }
}

fn base_url(site: &SiteConfig) -> String {
    site.base_url
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string()
}

fn api_base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

#[derive(sqlx::FromRow)]
struct Row_ {
    id: i64,
    locale: String,
    parent_key: Option<String>,
    slug: String,
    page_type: String,
    title: String,
    doc: String,
    url_path: Option<String>,
}

const COLUMNS: &str = "id, locale, parent_key, slug, page_type, title, doc, url_path";

/// One page as the API shows it: `detail` adds the fields Wagtail shows on a detail
/// view; `all_fields` the page type's own fields.
fn page_json(row: &Row_, r: &Resolved, detail: bool, all_fields: bool) -> Result<Value, Problem> {
    let doc: PageDoc = serde_json::from_str(&row.doc).map_err(|e| {
        Problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored page document: {e}"),
        )
    })?;
    let html_url = row.url_path.as_ref().map(|u| format!("{}{u}", r.base_url));
    let mut meta = json!({
        "type": row.page_type,
        "detail_url": r.detail_url(row.id),
        "html_url": html_url,
        "slug": row.slug,
        "first_published_at": doc.first_published_at,
        "locale": row.locale,
    });
    if detail {
        meta["show_in_menus"] = json!(doc.show_in_menus);
        meta["seo_title"] = json!(doc.seo_title);
        meta["search_description"] = json!(doc.search_description);
        meta["alias_of"] = Value::Null;
        meta["parent"] = row
            .parent_key
            .as_deref()
            .map_or(Value::Null, |k| r.nested_page(k, true));
    }
    let mut page = json!({"id": row.id, "meta": meta, "title": row.title});
    if detail || all_fields {
        for (k, v) in render::fields(&doc, r) {
            page[k] = v;
        }
    }
    Ok(page)
}

/// A JSON answer with its validators, or 304 when the client has it.
fn answer(body: &Value, last_change: i64, headers: &HeaderMap) -> Response {
    let bytes = serde_json::to_vec(body).expect("JSON");
    let etag = format!("\"{}\"", &blake3::hash(&bytes).to_hex()[..32]);
    let modified = chrono::DateTime::from_timestamp(last_change, 0)
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let not_modified = match headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        Some(tags) => tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"),
        None => headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
            .is_some_and(|since| since.timestamp() >= last_change),
    };
    let mut resp = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], bytes).into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("ASCII"));
    h.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_str(&modified).expect("ASCII"),
    );
    resp
}

async fn detail(
    State(d): State<Arc<Delivery>>,
    Path(id): Path<i64>,
    Query(q): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let site = d.site(q.site.as_deref()).await?;
    let row: Option<Row_> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM pages WHERE site = $1 AND id = $2 AND url_path IS NOT NULL"
    )))
    .bind(&site.store)
    .bind(id)
    .fetch_optional(&d.db.pool)
    .await?;
    let row = row.ok_or_else(|| {
        Problem(
            StatusCode::NOT_FOUND,
            "No Page matches the given query.".into(),
        )
    })?;
    let r = d.resolved(&site, &headers).await?;
    let body = page_json(&row, &r, true, true)?;
    Ok(answer(&body, d.last_change(&site.store).await?, &headers))
}

async fn list(
    State(d): State<Arc<Delivery>>,
    Query(q): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let site = d.site(q.site.as_deref()).await?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) || q.offset.is_some_and(|o| o < 0) {
        return Err(Problem(
            StatusCode::BAD_REQUEST,
            "limit must be 1 to 1000, offset 0 or more".into(),
        ));
    }
    let all_fields = match q.fields.as_deref() {
        None | Some("") => false,
        Some("*") => true,
        Some(f) => {
            return Err(Problem(
                StatusCode::BAD_REQUEST,
                format!("fields: only * is supported, not {f:?}"),
            ));
        }
    };
    let mut cond = String::from("site = $1 AND url_path IS NOT NULL");
    let mut binds: Vec<Value> = vec![json!(site.store)];
    let mut bind = |sql: &str, v: Value| {
        binds.push(v);
        cond.push_str(&sql.replace('?', &format!("${}", binds.len())));
    };
    if let Some(l) = &q.locale {
        bind(" AND locale = ?", json!(l));
    }
    if let Some(t) = &q.page_type {
        bind(" AND page_type = ?", json!(t.to_lowercase()));
    }
    let order = match q.child_of {
        Some(parent) => {
            bind(
                " AND parent_key = (SELECT page_key FROM pages p WHERE p.site = $1 AND p.id = ?)",
                json!(parent),
            );
            "position"
        }
        None => "locale, url_path",
    };
    let count_sql = format!("SELECT COUNT(*) FROM pages WHERE {cond}");
    let list_sql = format!(
        "SELECT {COLUMNS} FROM pages WHERE {cond} ORDER BY {order} LIMIT {limit} OFFSET {}",
        q.offset.unwrap_or(0)
    );
    let mut count = sqlx::query(sqlx::AssertSqlSafe(count_sql));
    let mut rows = sqlx::query_as::<_, Row_>(sqlx::AssertSqlSafe(list_sql));
    for b in &binds {
        match b {
            Value::Number(n) => {
                count = count.bind(n.as_i64());
                rows = rows.bind(n.as_i64());
            }
            v => {
                count = count.bind(v.as_str().unwrap_or_default().to_string());
                rows = rows.bind(v.as_str().unwrap_or_default().to_string());
            }
        }
    }
    let total: i64 = count.fetch_one(&d.db.pool).await?.get(0);
    let rows = rows.fetch_all(&d.db.pool).await?;
    let r = d.resolved(&site, &headers).await?;
    let items = rows
        .iter()
        .map(|row| page_json(row, &r, false, all_fields))
        .collect::<Result<Vec<_>, _>>()?;
    let body = json!({"meta": {"total_count": total}, "items": items});
    Ok(answer(&body, d.last_change(&site.store).await?, &headers))
}

async fn find(
    State(d): State<Arc<Delivery>>,
    Query(q): Query<Params>,
) -> Result<Response, Problem> {
    let site = d.site(q.site.as_deref()).await?;
    let path = q
        .html_path
        .as_deref()
        .ok_or_else(|| Problem(StatusCode::BAD_REQUEST, "html_path is required".into()))?;
    let path = format!("/{}/", path.trim_matches('/')).replace("//", "/");
    let row = sqlx::query("SELECT id FROM pages WHERE site = $1 AND url_path = $2")
        .bind(&site.store)
        .bind(&path)
        .fetch_optional(&d.db.pool)
        .await?
        .ok_or_else(|| {
            Problem(
                StatusCode::NOT_FOUND,
                "No Page matches the given query.".into(),
            )
        })?;
    let id: i64 = row.get(0);
    let to = format!("/api/v2/pages/{id}/?site={}", site.cfg.name);
    Ok((StatusCode::FOUND, [(header::LOCATION, to)]).into_response())
}
