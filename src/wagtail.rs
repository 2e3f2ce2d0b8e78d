//! The `wagtail` content provider's reader: a subtree of a Wagtail site's page tree, read
//! from the site's own database (SQLite or PostgreSQL), read-only.
//!
//! Each page is read as it is **live**: tree fields, title and slug from the page table
//! (which Wagtail keeps at the published state), its other fields from its live
//! revision. Drafts, unpublished pages, pages whose publication expired and pages behind
//! a view restriction (with everything below them) are not read. A page's identity is
//! its `translation_key` and locale, which neither side's integer ids decide; its parent
//! is named the same way, its place among its siblings by its treebeard step.
//!
//! Foreign keys are taken from the page type's own table, which Django clears when the
//! object behind one is deleted (`on_delete=SET_NULL`) while the revision keeps the id.
//!
//! References (to pages, images and documents, in rich text, StreamField blocks and
//! foreign keys) come from Wagtail's reference index, each with the content path where
//! it sits, the source's id and the identity it resolves to (a page's key, a file's
//! path), so a target can point it at its own copies. A site upgraded from a Wagtail
//! before 4.1 needs `manage.py rebuild_references_index` once.
//!
//! Pages are read in key order (locale, then translation key), in batches of
//! [`BATCH`] by keyset, each its own statement: memory stays flat in the size of the
//! tree, and a SQLite CMS is never locked out of its database for longer than a batch.

use serde::Deserialize;
use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;

use std::collections::HashMap;

use crate::db::{Backend, Db};
use crate::page::{PageDoc, RefKind, Reference};

/// Pages read per statement.
pub const BATCH: i64 = 1000;

/// The subtree of a channel (`root_page`, `include_root`, `languages`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subtree {
    /// A Wagtail `url_path` (`/home/news/`) or a numeric page id.
    pub root: String,
    pub include_root: bool,
    /// Locale codes to read; empty: every locale the root is translated into.
    pub languages: Vec<String>,
    /// Read only these pages and their subtrees (Wagtail url_paths, inside the
    /// subtree); empty: the whole subtree.
    pub only: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WagtailError {
    #[error("Wagtail database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("Wagtail database: {0}")]
    Open(#[from] crate::db::DbError),
    #[error("root page {0:?} not found (a url_path such as /home/news/, or a page id)")]
    NoRoot(String),
    #[error("root page {root:?} is not translated into {missing}")]
    NoLocale { root: String, missing: String },
    #[error(
        "page {0:?} is not a page of the channel's subtree (a Wagtail url_path such as /home/news/section-0/)"
    )]
    NotInSubtree(String),
    #[error("root page {0:?} is behind a view restriction: private pages are never mirrored")]
    Private(String),
    #[error("page {id} ({url_path}): {problem}")]
    Page {
        id: i64,
        url_path: String,
        /// The page's key, when it could be read.
        key: String,
        problem: String,
    },
}

/// Fields of a revision's content that the page table (or the tree) already gives, or
/// that are the CMS's bookkeeping, not the page's content.
const BASE_FIELDS: &[&str] = &[
    "pk",
    "path",
    "depth",
    "numchild",
    "translation_key",
    "locale",
    "latest_revision",
    "live",
    "has_unpublished_changes",
    "first_published_at",
    "last_published_at",
    "live_revision",
    "go_live_at",
    "expire_at",
    "expired",
    "locked",
    "locked_at",
    "locked_by",
    "title",
    "draft_title",
    "slug",
    "content_type",
    "url_path",
    "owner",
    "seo_title",
    "show_in_menus",
    "search_description",
    "latest_revision_created_at",
    "alias_of",
    "wagtail_admin_comments",
];

/// The root page in one locale.
#[derive(Clone, Debug)]
pub struct Root {
    pub id: i64,
    pub path: String,
    pub depth: i64,
    pub locale_id: i64,
    pub locale: String,
    pub url_path: String,
}

/// A Wagtail site's database, opened read-only.
pub struct WagtailDb {
    db: Db,
    /// Foreign-key columns of each page type's own table, as found.
    fk_columns: tokio::sync::Mutex<HashMap<String, Vec<String>>>,
    /// Pages read per statement ([`BATCH`]).
    batch: i64,
    page_ct: i64,
    image_ct: i64,
    document_ct: i64,
}

impl WagtailDb {
    /// Opens `url`: `sqlite://PATH` (opened read-only) or `postgres://...`, with or
    /// without a `wagtail+` prefix.
    pub async fn open(url: &str) -> Result<WagtailDb, WagtailError> {
        let url = url.strip_prefix("wagtail+").unwrap_or(url);
        let db = crate::db::connect_read_only(url).await?;
        let ct = |app: &'static str, model: &'static str| {
            let pool = db.pool.clone();
            async move {
                sqlx::query(
                    "SELECT CAST(id AS BIGINT) FROM django_content_type WHERE app_label = $1 AND model = $2",
                )
                .bind(app)
                .bind(model)
                .fetch_optional(&pool)
                .await
                .map(|r| r.map_or(-1, |r| r.get::<i64, _>(0)))
            }
        };
        let page_ct = ct("wagtailcore", "page").await?;
        let image_ct = ct("wagtailimages", "image").await?;
        let document_ct = ct("wagtaildocs", "document").await?;
        Ok(WagtailDb {
            db,
            fk_columns: Default::default(),
            batch: BATCH,
            page_ct,
            image_ct,
            document_ct,
        })
    }

    /// Reads the subtree's live pages, locale by locale in key order, into `tx`. A page
    /// that cannot be read is sent as its error ([`WagtailError::Page`]) and the walk
    /// goes on; any other error ends it (sent last). Stops when the receiver is gone.
    pub async fn walk(
        &self,
        s: &Subtree,
        tx: tokio::sync::mpsc::Sender<Result<PageDoc, WagtailError>>,
    ) {
        if let Err(e) = self.walk_inner(s, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    }

    async fn walk_inner(
        &self,
        s: &Subtree,
        tx: &tokio::sync::mpsc::Sender<Result<PageDoc, WagtailError>>,
    ) -> Result<(), WagtailError> {
        let roots = self.roots(s).await?;
        let inside = inside_any(&roots);
        let scopes = self.scopes(s, &roots).await?;
        for (root, scope) in roots.iter().zip(scopes) {
            let Some(scope) = scope else { continue };
            let hidden = self.hidden(root).await?;
            let mut after: Option<String> = None;
            while let Some((pages, last)) = self
                .batch(root, s, &scope, &hidden, &inside, after.as_deref())
                .await?
            {
                for p in pages {
                    if tx.send(p).await.is_err() {
                        return Ok(());
                    }
                }
                after = Some(last);
            }
        }
        Ok(())
    }

    /// The SQL condition of the pages to read under each root (treebeard paths are
    /// digits and capitals, written into the statement): its whole subtree, or the
    /// subtrees of the pages `only` names in its locale (`None`: none there).
    async fn scopes(
        &self,
        s: &Subtree,
        roots: &[Root],
    ) -> Result<Vec<Option<String>>, WagtailError> {
        let top = |r: &Root| if s.include_root { r.depth } else { r.depth + 1 };
        let alnum = |p: &str| p.bytes().all(|b| b.is_ascii_alphanumeric());
        if s.only.is_empty() {
            return Ok(roots
                .iter()
                .map(|r| {
                    alnum(&r.path)
                        .then(|| format!("p.path LIKE '{}%' AND p.depth >= {}", r.path, top(r)))
                })
                .collect());
        }
        let mut by_root: Vec<Vec<String>> = vec![Vec::new(); roots.len()];
        for url_path in &s.only {
            let row = sqlx::query("SELECT path, CAST(depth AS BIGINT), CAST(locale_id AS BIGINT) FROM wagtailcore_page WHERE url_path = $1")
                .bind(url_path)
                .fetch_optional(&self.db.pool)
                .await?;
            let Some(row) = row else {
                return Err(WagtailError::NotInSubtree(url_path.clone()));
            };
            let (path, depth, locale): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
            let root = roots.iter().position(|r| {
                r.locale_id == locale && path.starts_with(&r.path) && depth >= top(r)
            });
            match root {
                Some(i) if alnum(&path) => by_root[i].push(format!("p.path LIKE '{path}%'")),
                _ => return Err(WagtailError::NotInSubtree(url_path.clone())),
            }
        }
        Ok(by_root
            .into_iter()
            .map(|c| (!c.is_empty()).then(|| format!("({})", c.join(" OR "))))
            .collect())
    }

    /// A cheap fingerprint of the CMS's pages: it changes when a page is published,
    /// unpublished, moved, reordered, created or deleted (Wagtail logs each action, and
    /// every publish writes a revision).
    pub async fn fingerprint(&self) -> Result<String, WagtailError> {
        let live = match self.backend() {
            Backend::Sqlite => "live",
            Backend::Postgres => "CASE WHEN live THEN 1 ELSE 0 END",
        };
        let sql = format!(
            "SELECT (SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM wagtailcore_pagelogentry), \
             (SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM wagtailcore_revision), \
             (SELECT CAST(COUNT(*) AS BIGINT) FROM wagtailcore_page), \
             (SELECT CAST(COALESCE(SUM({live}), 0) AS BIGINT) FROM wagtailcore_page)"
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.db.pool)
            .await?;
        let v: Vec<i64> = (0..4).map(|i| r.get::<i64, _>(i)).collect();
        Ok(format!("{v:?}"))
    }

    /// Reads `n` pages per statement instead of [`BATCH`].
    pub fn with_batch(mut self, n: i64) -> WagtailDb {
        self.batch = n.max(1);
        self
    }

    fn backend(&self) -> Backend {
        self.db.backend
    }

    /// The subtree's root page in each locale read, by locale code.
    pub async fn roots(&self, s: &Subtree) -> Result<Vec<Root>, WagtailError> {
        let by = if s.root.parse::<i64>().is_ok() {
            "CAST(id AS TEXT) = $1"
        } else {
            "url_path = $1"
        };
        let sql = format!(
            "SELECT CAST(p.id AS BIGINT), p.path, CAST(p.depth AS BIGINT), CAST(p.locale_id AS BIGINT), \
             l.language_code, p.url_path FROM wagtailcore_page p \
             JOIN wagtailcore_locale l ON l.id = p.locale_id \
             WHERE p.translation_key = (SELECT translation_key FROM wagtailcore_page WHERE {by}) \
             ORDER BY l.language_code"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&s.root)
            .fetch_all(&self.db.pool)
            .await?;
        let all: Vec<Root> = rows
            .iter()
            .map(|r| Root {
                id: r.get(0),
                path: r.get(1),
                depth: r.get(2),
                locale_id: r.get(3),
                locale: r.get(4),
                url_path: r.get(5),
            })
            .collect();
        if all.is_empty() {
            return Err(WagtailError::NoRoot(s.root.clone()));
        }
        if let Some(missing) = s
            .languages
            .iter()
            .find(|l| !all.iter().any(|r| &r.locale == *l))
        {
            return Err(WagtailError::NoLocale {
                root: s.root.clone(),
                missing: missing.clone(),
            });
        }
        Ok(all
            .into_iter()
            .filter(|r| s.languages.is_empty() || s.languages.contains(&r.locale))
            .collect())
    }

    /// The treebeard paths under `root` whose pages are not mirrored with everything
    /// below them: not live, or behind a view restriction. A restriction above the root
    /// hides the whole subtree, which is an error rather than an empty mirror.
    pub async fn hidden(&self, root: &Root) -> Result<Vec<String>, WagtailError> {
        let restricted: Vec<String> = sqlx::query(
            "SELECT p.path FROM wagtailcore_pageviewrestriction v \
             JOIN wagtailcore_page p ON p.id = v.page_id",
        )
        .fetch_all(&self.db.pool)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        if restricted.iter().any(|p| root.path.starts_with(p.as_str())) {
            return Err(WagtailError::Private(root.url_path.clone()));
        }
        let live = match self.backend() {
            Backend::Sqlite => "live",
            Backend::Postgres => "CASE WHEN live THEN 1 ELSE 0 END",
        };
        let mut hidden: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT path FROM wagtailcore_page WHERE path LIKE $1 AND {live} = 0"
        )))
        .bind(format!("{}%", root.path))
        .fetch_all(&self.db.pool)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        hidden.extend(restricted.into_iter().filter(|p| p.starts_with(&root.path)));
        hidden.sort();
        // Keep only the top of each hidden subtree.
        hidden.dedup_by(|b, a| b.starts_with(a.as_str()));
        Ok(hidden)
    }

    /// The next batch of live pages of `root`'s subtree after the translation key
    /// `after`, in key order, each read or its error; pages under `hidden` paths are
    /// left out (the batch may then be shorter than [`BATCH`]; `None` means the end).
    /// `inside` tells a linked page (`tp`) in any locale's subtree ([`inside_any`]).
    #[allow(clippy::too_many_arguments)]
    async fn batch(
        &self,
        root: &Root,
        s: &Subtree,
        scope: &str,
        hidden: &[String],
        inside: &str,
        after: Option<&str>,
    ) -> Result<Option<(Vec<Result<PageDoc, WagtailError>>, String)>, WagtailError> {
        let sql = self.batch_sql(after.is_some(), scope, inside);
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(root.locale_id);
        if let Some(a) = after {
            q = q.bind(a);
        }
        let rows = q.fetch_all(&self.db.pool).await?;
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        let last_key: String = last.get("tkey");
        let fks = self.live_foreign_keys(&rows).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let path: String = r.get("path");
            if hidden.iter().any(|h| path.starts_with(h.as_str())) {
                continue;
            }
            let mut page = self.record(r, root, s);
            if let Ok(p) = &mut page
                && let Some(live) = fks.get(&p.source_id)
            {
                for (field, value) in live {
                    if p.fields.contains_key(field) {
                        p.fields
                            .insert(field.clone(), value.map_or(Value::Null, Value::from));
                    }
                }
            }
            out.push(page);
        }
        Ok(Some((out, last_key)))
    }

    /// The foreign keys of the pages' own tables as they are now. A revision keeps the
    /// ids it was published with; when the object behind one is deleted, Django clears
    /// the column (`on_delete=SET_NULL`) but not the revision, and Wagtail serves the
    /// column. By page id: (field, id).
    async fn live_foreign_keys(
        &self,
        rows: &[AnyRow],
    ) -> Result<HashMap<i64, Vec<(String, Option<i64>)>>, WagtailError> {
        let mut by_table: HashMap<String, Vec<i64>> = HashMap::new();
        for r in rows {
            let table = format!(
                "{}_{}",
                r.get::<String, _>("app_label"),
                r.get::<String, _>("model")
            );
            by_table.entry(table).or_default().push(r.get("id"));
        }
        let mut out: HashMap<i64, Vec<(String, Option<i64>)>> = HashMap::new();
        for (table, ids) in by_table {
            let cols = self.fk_columns_of(&table).await?;
            if cols.is_empty() {
                continue;
            }
            let select: Vec<String> = cols
                .iter()
                .map(|c| format!("CAST({c} AS BIGINT)"))
                .collect();
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            let sql = format!(
                "SELECT CAST(page_ptr_id AS BIGINT), {} FROM {table} WHERE page_ptr_id IN ({})",
                select.join(", "),
                ids.join(", ")
            );
            for r in sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(&self.db.pool)
                .await?
            {
                let id: i64 = r.get(0);
                let live = cols.iter().enumerate().map(|(i, c)| {
                    let field = c.strip_suffix("_id").unwrap_or(c).to_string();
                    (field, r.get::<Option<i64>, _>(i + 1))
                });
                out.entry(id).or_default().extend(live);
            }
        }
        Ok(out)
    }

    /// Columns of a page type's table that hold foreign keys (`*_id`, other than the
    /// link to its page row); none when the table does not exist under Django's default
    /// name. Names that are not plain identifiers are left out.
    async fn fk_columns_of(&self, table: &str) -> Result<Vec<String>, WagtailError> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !plain(table) {
            return Ok(Vec::new());
        }
        if let Some(c) = self.fk_columns.lock().await.get(table) {
            return Ok(c.clone());
        }
        let sql = match self.backend() {
            Backend::Sqlite => "SELECT name FROM pragma_table_info($1)",
            Backend::Postgres => {
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_name = $1 AND table_schema = current_schema()"
            }
        };
        let cols: Vec<String> = sqlx::query(sql)
            .bind(table)
            .fetch_all(&self.db.pool)
            .await?
            .iter()
            .map(|r| r.get::<String, _>(0))
            .filter(|c| c.ends_with("_id") && c != "page_ptr_id" && plain(c))
            .collect();
        self.fk_columns
            .lock()
            .await
            .insert(table.to_string(), cols.clone());
        Ok(cols)
    }

    fn batch_sql(&self, after: bool, scope: &str, inside: &str) -> String {
        let pg = self.backend() == Backend::Postgres;
        let tkey = if pg {
            "REPLACE(CAST(p.translation_key AS TEXT), '-', '')"
        } else {
            "p.translation_key"
        };
        let ptkey = tkey.replace("p.", "pp.");
        let time = |c: &str| {
            if pg {
                format!("CAST(p.{c} AT TIME ZONE 'UTC' AS TEXT)")
            } else {
                format!("CAST(p.{c} AS TEXT)")
            }
        };
        let boolean = |c: &str| format!("CASE WHEN p.{c} THEN 1 ELSE 0 END");
        let (img, doc, page) = (self.image_ct, self.document_ct, self.page_ct);
        let object = if pg {
            "json_build_object"
        } else {
            "json_object"
        };
        let agg = if pg { "json_agg" } else { "json_group_array" };
        let to_page = tkey.replace("p.", "tp.");
        // The referenced object's id as a number, only for references to that type (the
        // index keeps ids as text, and other models' may not be numbers): compared with
        // the id column itself, the lookup uses its primary key instead of a scan.
        let to_id = |ct: i64| {
            format!(
                "(CASE WHEN ri.to_content_type_id = {ct} THEN CAST(ri.to_object_id AS BIGINT) END)"
            )
        };
        // Every reference of the page, resolved to what it points at. A linked page
        // outside the subtree (in every locale) is named by its URL path too (a link to
        // it is broken on the mirror, and the message names it); inside, it is not, so
        // that moving a page does not change the documents of the pages linking to it.
        let refs = format!(
            "(SELECT CAST({agg}({object}('path', ri.content_path, 'ct', CAST(ri.to_content_type_id AS BIGINT), \
               'id', ri.to_object_id, 'page', {to_page}, 'page_locale', tl.language_code, \
               'page_url', CASE WHEN {inside} THEN NULL ELSE tp.url_path END, \
               'image', im.file, 'image_title', im.title, 'doc', dd.file, 'doc_title', dd.title)) AS TEXT) \
             FROM wagtailcore_referenceindex ri \
             LEFT JOIN wagtailcore_page tp ON tp.id = {tp_id} \
             LEFT JOIN wagtailcore_locale tl ON tl.id = tp.locale_id \
             LEFT JOIN wagtailimages_image im ON im.id = {im_id} \
             LEFT JOIN wagtaildocs_document dd ON dd.id = {dd_id} \
             WHERE ri.base_content_type_id = {page} AND ri.object_id = CAST(p.id AS TEXT))",
            tp_id = to_id(page),
            im_id = to_id(img),
            dd_id = to_id(doc),
        );
        let after_cond = match (after, pg) {
            (false, _) => String::new(),
            (true, true) => "AND p.translation_key > CAST($2 AS uuid)".into(),
            (true, false) => "AND p.translation_key > $2".into(),
        };
        format!(
            "SELECT CAST(p.id AS BIGINT) AS id, p.path AS path, {tkey} AS tkey, p.url_path AS url_path, \
             CAST(p.depth AS BIGINT) AS depth, {ptkey} AS parent_tkey, \
             ct.app_label AS app_label, ct.model AS model, p.slug AS slug, p.title AS title, \
             p.seo_title AS seo_title, p.search_description AS search_description, \
             CAST({menus} AS BIGINT) AS show_in_menus, {first} AS first_published_at, \
             {last} AS last_published_at, CAST(r.content AS TEXT) AS content, {refs} AS refs \
             FROM wagtailcore_page p \
             JOIN django_content_type ct ON ct.id = p.content_type_id \
             LEFT JOIN wagtailcore_page pp ON pp.path = SUBSTR(p.path, 1, LENGTH(p.path) - 4) \
             LEFT JOIN wagtailcore_revision r ON r.id = p.live_revision_id \
             WHERE p.locale_id = $1 AND {scope} {after_cond} \
             ORDER BY p.translation_key LIMIT {batch}",
            batch = self.batch,
            menus = boolean("show_in_menus"),
            first = time("first_published_at"),
            last = time("last_published_at"),
        )
    }

    fn record(&self, r: &AnyRow, root: &Root, s: &Subtree) -> Result<PageDoc, WagtailError> {
        let id: i64 = r.get("id");
        let url_path: String = r.get("url_path");
        let tkey: String = r.get("tkey");
        let problem = |problem: String| WagtailError::Page {
            id,
            url_path: url_path.clone(),
            key: format!("{}/{tkey}", root.locale),
            problem,
        };
        let content: Option<String> = r.get("content");
        let content = content.ok_or_else(|| problem("live but without a live revision".into()))?;
        let content: Value = serde_json::from_str(&content)
            .map_err(|e| problem(format!("live revision is not JSON: {e}")))?;
        let Value::Object(content) = content else {
            return Err(problem("live revision is not a JSON object".into()));
        };
        let fields = content
            .into_iter()
            .filter(|(k, _)| !BASE_FIELDS.contains(&k.as_str()))
            .map(|(k, v)| (k, stream_field(v)))
            .collect();
        let depth: i64 = r.get("depth");
        let at_root = depth == root.depth || (!s.include_root && depth == root.depth + 1);
        let key = |tkey: String| format!("{}/{}", root.locale, tkey);
        let parent: Option<String> = r.get("parent_tkey");
        let path: String = r.get("path");
        let refs: Option<String> = r.get("refs");
        Ok(PageDoc {
            key: key(tkey.clone()),
            locale: root.locale.clone(),
            parent: parent.filter(|_| !at_root).map(key),
            position: path[path.len().saturating_sub(4)..].to_string(),
            page_type: page_type(r.get("app_label"), r.get("model")),
            slug: r.get("slug"),
            title: r.get("title"),
            seo_title: r.get("seo_title"),
            search_description: r.get("search_description"),
            show_in_menus: r.get::<i64, _>("show_in_menus") != 0,
            first_published_at: r.get::<Option<String>, _>("first_published_at").map(utc),
            last_published_at: r.get::<Option<String>, _>("last_published_at").map(utc),
            fields,
            references: self.references(refs.as_deref()).map_err(problem)?,
            source_id: id,
        })
    }

    /// The references of a page from the JSON list its query aggregated.
    fn references(&self, refs: Option<&str>) -> Result<Vec<Reference>, String> {
        #[derive(Deserialize)]
        struct Raw {
            path: String,
            ct: i64,
            id: String,
            page: Option<String>,
            page_locale: Option<String>,
            page_url: Option<String>,
            image: Option<String>,
            image_title: Option<String>,
            doc: Option<String>,
            doc_title: Option<String>,
        }
        let raw: Vec<Option<Raw>> = match refs {
            None => Vec::new(),
            Some(s) => serde_json::from_str(s).map_err(|e| format!("reference index: {e}"))?,
        };
        let mut out = Vec::new();
        // PostgreSQL aggregates no rows to NULL, SQLite to a list of one null object.
        for r in raw.into_iter().flatten() {
            let Ok(id) = r.id.parse() else { continue };
            let (kind, to, title) = if r.ct == self.page_ct {
                let to = r
                    .page
                    .zip(r.page_locale)
                    .map(|(k, l)| format!("{l}/{}", k.replace('-', "")));
                (RefKind::Page, to, r.page_url)
            } else if r.ct == self.image_ct {
                (RefKind::Image, r.image, r.image_title)
            } else if r.ct == self.document_ct {
                (RefKind::Document, r.doc, r.doc_title)
            } else {
                continue; // snippets, collections, users: not mirrored
            };
            out.push(Reference {
                // A field's own references have an empty content path after its name
                // (`body.`).
                path: r.path.trim_end_matches('.').to_string(),
                kind,
                id,
                to: to.unwrap_or_default(),
                title: title.unwrap_or_default(),
            });
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// An SQL condition: the linked page `tp` is in the subtree of one of `roots` (their
/// treebeard paths are digits and capitals, written into the statement).
fn inside_any(roots: &[Root]) -> String {
    let conds: Vec<String> = roots
        .iter()
        .filter(|r| r.path.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(|r| format!("tp.path LIKE '{}%'", r.path))
        .collect();
    if conds.is_empty() {
        "1 = 0".into()
    } else {
        format!("({})", conds.join(" OR "))
    }
}

/// `app_label.model` of a content type. Django keeps the model's name in lower case
/// (`testsite.articlepage`); the class name Wagtail's API shows (`ArticlePage`) is not
/// in the database.
fn page_type(app: String, model: String) -> String {
    format!("{app}.{model}")
}

/// A revision field that holds a StreamField (a JSON string of blocks, each with
/// `type` and `value`) as its block list; anything else as it is.
fn stream_field(v: Value) -> Value {
    if let Value::String(s) = &v
        && s.starts_with('[')
        && let Ok(Value::Array(blocks)) = serde_json::from_str::<Value>(s)
        && blocks
            .iter()
            .all(|b| b.get("type").is_some() && b.get("value").is_some())
    {
        return Value::Array(blocks);
    }
    v
}

/// A database time (`2026-12-06 03:05:36.558148`, UTC) as Wagtail's API shows it:
/// RFC 3339 with microseconds, none when they are zero (`2026-12-06T03:05:36.558148Z`).
/// PostgreSQL's text drops trailing zeros of the fraction; they are put back.
fn utc(t: String) -> String {
    let t = t.trim_end_matches("+00:00").trim_end_matches("+00");
    let t = t.replacen(' ', "T", 1);
    match t.split_once('.') {
        Some((secs, frac)) if frac.trim_end_matches('0').is_empty() => format!("{secs}Z"),
        Some((secs, frac)) => format!("{secs}.{frac:0<6}Z"),
        None => format!("{t}Z"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_read_as_wagtails_api_writes_them() {
        for (db, api) in [
            ("2026-12-06 03:05:36.558148", "2026-12-06T03:05:36.558148Z"),
            ("2026-12-06 03:11:30.18131", "2026-12-06T03:11:30.181310Z"),
            ("2026-12-06 03:11:30", "2026-12-06T03:11:30Z"),
            ("2026-12-06 03:11:30.000000", "2026-12-06T03:11:30Z"),
            ("2026-12-06 03:11:30.5+00", "2026-12-06T03:11:30.500000Z"),
        ] {
            assert_eq!(super::utc(db.into()), api);
        }
    }

    #[test]
    fn stream_fields_become_block_lists_and_nothing_else_does() {
        use serde_json::json;
        let blocks = json!([{"type": "heading", "value": "x", "id": "1"}]);
        assert_eq!(super::stream_field(json!(blocks.to_string())), blocks);
        for other in [
            json!("[not json"),
            json!("[1, 2]"),
            json!("<p>[x]</p>"),
            json!(5),
        ] {
            assert_eq!(super::stream_field(other.clone()), other);
        }
    }
}
