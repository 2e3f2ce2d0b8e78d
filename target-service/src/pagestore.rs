//! The page store: a site's CMS pages in the target's database, written in the
//! transaction of the package that brought them (so a package applied twice changes
//! nothing), with their index rows in `entries` (kind page) like any other item.

use std::collections::HashMap;

use sqlx::Row;

use cms_mirror::model::{ChangeAction, ErrorCode};
use cms_mirror::page::{PageDoc, RefKind};
use cms_mirror::pathsafe::{page_key, page_path};
use cms_mirror::pb;

type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

/// A page as the store keeps it: the document as received, and what it is looked up by.
#[derive(Clone, Debug, PartialEq)]
pub struct PageRow {
    pub key: String,
    pub locale: String,
    pub parent: Option<String>,
    pub position: String,
    pub slug: String,
    pub page_type: String,
    pub title: String,
    pub doc: String,
    pub hash: Vec<u8>,
    /// The pages it links to: key ("" for a page gone from the CMS) and the page's URL
    /// path in the source, for messages.
    pub links: Vec<(String, String)>,
}

impl PageRow {
    /// The row of a checked page document (`doc` its exact bytes).
    pub fn new(p: PageDoc, doc: String) -> PageRow {
        let mut links: Vec<(String, String)> = p
            .references
            .iter()
            .filter(|r| r.kind == RefKind::Page)
            .map(|r| (r.to.clone(), r.title.clone()))
            .collect();
        links.sort();
        links.dedup_by(|a, b| a.0 == b.0);
        PageRow {
            links,
            hash: blake3::hash(doc.as_bytes()).as_bytes().to_vec(),
            key: p.key,
            locale: p.locale,
            parent: p.parent,
            position: p.position,
            slug: p.slug,
            page_type: p.page_type,
            title: p.title,
            doc,
        }
    }

    /// The page's item path (below [`cms_mirror::pathsafe::PAGES_DIR`]).
    pub fn path(&self) -> String {
        page_path(&self.key)
    }
}

/// A page's id in the delivery API: derived from its site and key (52 bits, so
/// JavaScript clients read it exactly), the same on every target and after a rebuild.
pub fn page_id(site: &str, key: &str) -> i64 {
    let h = blake3::hash(format!("{site}\0{key}").as_bytes());
    let b = h.as_bytes();
    let v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    ((v >> 12) | 1) as i64
}

/// Writes a package's pages and page deletions; returns what each did to the site
/// (created or updated), for the session's changes.
pub(crate) async fn record(
    tx: &mut Tx<'_>,
    site: &str,
    // The site's own name (the page ids derive from it); `site` is its store key.
    id_site: &str,
    session: &str,
    pages: &[PageRow],
    deletes: &[String],
    now: i64,
) -> Result<Vec<(String, ChangeAction)>, sqlx::Error> {
    let mut changes = Vec::with_capacity(pages.len());
    for p in pages {
        let existed = remember(tx, site, session, &p.key, &p.locale).await?;
        sqlx::query(
            "INSERT INTO pages (site, page_key, id, locale, parent_key, position, slug, page_type, title, doc, hash, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (site, page_key) DO UPDATE SET locale = excluded.locale, \
             parent_key = excluded.parent_key, position = excluded.position, slug = excluded.slug, \
             page_type = excluded.page_type, title = excluded.title, doc = excluded.doc, \
             hash = excluded.hash, updated_at = excluded.updated_at",
        )
        .bind(site)
        .bind(&p.key)
        .bind(page_id(id_site, &p.key))
        .bind(&p.locale)
        .bind(p.parent.as_deref())
        .bind(&p.position)
        .bind(&p.slug)
        .bind(&p.page_type)
        .bind(&p.title)
        .bind(&p.doc)
        .bind(&p.hash)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        let action = if existed {
            ChangeAction::Updated
        } else {
            ChangeAction::Created
        };
        changes.push((p.path(), action));
        sqlx::query("DELETE FROM page_links WHERE site = $1 AND from_key = $2")
            .bind(site)
            .bind(&p.key)
            .execute(&mut **tx)
            .await?;
        for (to, hint) in &p.links {
            sqlx::query(
                "INSERT INTO page_links (site, from_key, to_key, to_hint) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(site)
            .bind(&p.key)
            .bind(to)
            .bind(hint)
            .execute(&mut **tx)
            .await?;
        }
    }
    for key in deletes.iter().filter_map(|p| page_key(p)) {
        let locale = key.split('/').next().unwrap_or_default();
        remember(tx, site, session, key, locale).await?;
        for sql in [
            "DELETE FROM pages WHERE site = $1 AND page_key = $2",
            "DELETE FROM page_links WHERE site = $1 AND from_key = $2",
        ] {
            sqlx::query(sql)
                .bind(site)
                .bind(key)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(changes)
}

/// Keeps a page's state from before the session first touched it (for the hooks);
/// whether the page exists now.
async fn remember(
    tx: &mut Tx<'_>,
    site: &str,
    session: &str,
    key: &str,
    locale: &str,
) -> Result<bool, sqlx::Error> {
    let before =
        sqlx::query("SELECT url_path, parent_key FROM pages WHERE site = $1 AND page_key = $2")
            .bind(site)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
    let existed = before.is_some();
    let (old_url, old_parent): (Option<String>, Option<String>) =
        before.map_or((None, None), |r| (r.get(0), r.get(1)));
    sqlx::query(
        "INSERT INTO session_pages (session_id, page_key, existed, locale, old_url, old_parent) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (session_id, page_key) DO NOTHING",
    )
    .bind(session)
    .bind(key)
    .bind(existed as i64)
    .bind(locale)
    .bind(old_url)
    .bind(old_parent)
    .execute(&mut **tx)
    .await?;
    Ok(existed)
}

/// A page a session changed, as hooks are told.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PageChange {
    pub key: String,
    pub locale: String,
    /// `created`, `updated`, `moved` (its URL changed) or `deleted`.
    pub action: &'static str,
    pub old_url: Option<String>,
    pub new_url: Option<String>,
}

/// What a session did to a site's pages (once resolved), and the URLs of the parent
/// pages whose lists of children changed (a child created, changed, moved or deleted).
pub async fn session_changes(
    db: &cms_mirror::db::Db,
    site: &str,
    session: &str,
) -> Result<(Vec<PageChange>, Vec<String>), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT s.page_key, s.locale, s.existed, s.old_url, s.old_parent, p.page_key, p.url_path, p.parent_key, s.direct \
         FROM session_pages s LEFT JOIN pages p ON p.site = $1 AND p.page_key = s.page_key \
         WHERE s.session_id = $2 ORDER BY s.page_key",
    )
    .bind(site)
    .bind(session)
    .fetch_all(&db.pool)
    .await?;
    let mut changes = Vec::new();
    let mut parents: Vec<String> = Vec::new();
    for r in rows {
        let (existed, now): (bool, Option<String>) = (r.get::<i64, _>(2) != 0, r.get(5));
        let (old_url, new_url): (Option<String>, Option<String>) = (r.get(3), r.get(6));
        let (old_parent, new_parent): (Option<String>, Option<String>) = (r.get(4), r.get(7));
        let action = match (existed, now.is_some()) {
            (false, false) => continue, // created and deleted within the session
            (false, true) => "created",
            (true, false) => "deleted",
            (true, true) if old_url != new_url => "moved",
            (true, true) => "updated",
        };
        // A parent lists its children (their titles, URLs, order): any change of a
        // child the session put or deleted changes it. Pages that moved along with a
        // page above them leave their parents' lists as they were.
        if r.get::<i64, _>(8) != 0 {
            parents.extend(old_parent.filter(|_| existed));
            parents.extend(new_parent.filter(|_| now.is_some()));
        }
        changes.push(PageChange {
            key: r.get(0),
            locale: r.get(1),
            action,
            old_url,
            new_url,
        });
    }
    parents.sort();
    parents.dedup();
    let mut parent_urls = Vec::new();
    for key in parents {
        let url: Option<(Option<String>,)> =
            sqlx::query_as("SELECT url_path FROM pages WHERE site = $1 AND page_key = $2")
                .bind(site)
                .bind(&key)
                .fetch_optional(&db.pool)
                .await?;
        parent_urls.extend(url.and_then(|u| u.0));
    }
    Ok((changes, parent_urls))
}

/// How many pages a site's store holds.
pub async fn count(db: &cms_mirror::db::Db, site: &str) -> Result<i64, sqlx::Error> {
    let r = sqlx::query("SELECT COUNT(*) FROM pages WHERE site = $1")
        .bind(site)
        .fetch_one(&db.pool)
        .await?;
    Ok(r.get::<i64, _>(0))
}

fn page_error(key: &str, code: ErrorCode, message: String) -> pb::ItemError {
    pb::ItemError {
        path: page_path(key),
        code: code.as_str().into(),
        message,
        retryable: false,
    }
}

#[derive(sqlx::FromRow)]
struct Place {
    locale: String,
    parent_key: Option<String>,
    slug: String,
    url_path: Option<String>,
}

async fn place(tx: &mut Tx<'_>, site: &str, key: &str) -> Result<Option<Place>, sqlx::Error> {
    sqlx::query_as(
        "SELECT locale, parent_key, slug, url_path FROM pages WHERE site = $1 AND page_key = $2",
    )
    .bind(site)
    .bind(key)
    .fetch_optional(&mut **tx)
    .await
}

/// Pages deeper than this are taken for a cycle of parents.
const MAX_DEPTH: usize = 512;

/// What a session changed in a site's pages, resolved once all its packages are in.
pub struct Resolver<'a> {
    pub site: &'a str,
    pub session: &'a str,
    /// The site's `pages_root` (starts and ends with `/`).
    pub root: &'a str,
    /// Keys of the pages the session put.
    pub put: &'a std::collections::HashSet<String>,
    /// Keys of the pages it deleted.
    pub deleted: &'a [String],
}

impl Resolver<'_> {
    /// Gives each page put its URL path (its pages_root, locale and slugs; a moved or
    /// renamed page's descendants follow it) and reports what cannot be served as it
    /// is: a missing parent, a URL another page has, a link to a page not mirrored.
    pub async fn resolve(
        &self,
        db: &cms_mirror::db::Db,
    ) -> Result<Vec<pb::ItemError>, sqlx::Error> {
        let mut tx = db.pool.begin().await?;
        let mut memo: HashMap<String, Option<String>> = HashMap::new();
        let mut errors = Vec::new();
        let mut put: Vec<(String, Option<String>)> = Vec::with_capacity(self.put.len());
        for key in self.put {
            let url = self.url_of(&mut tx, key, &mut memo).await?;
            put.push((key.clone(), url));
        }
        // Shallow pages first, so a moved page's descendants follow it before their own
        // (equal) paths are written.
        put.sort_by_key(|(_, u)| u.as_ref().map_or(usize::MAX, |u| u.matches('/').count()));
        for (key, url) in &put {
            let url = match url {
                None => {
                    let why = "its parent page is not mirrored, so it has no URL".to_string();
                    errors.push(page_error(key, ErrorCode::MissingParent, why));
                    None
                }
                Some(u) => match self.taken(&mut tx, key, u).await? {
                    Some(other) => {
                        let why = format!(
                            "its URL {u} is already page {other}'s; it is not served until its slug changes"
                        );
                        errors.push(page_error(key, ErrorCode::SlugCollision, why));
                        None
                    }
                    None => Some(u.clone()),
                },
            };
            self.set_url(&mut tx, key, url.as_deref()).await?;
        }
        self.broken_links(&mut tx, &mut errors).await?;
        tx.commit().await?;
        Ok(errors)
    }

    /// The URL path a page gets: up its parents to one this session did not put (or
    /// the top of the mirror), then down again.
    async fn url_of(
        &self,
        tx: &mut Tx<'_>,
        key: &str,
        memo: &mut HashMap<String, Option<String>>,
    ) -> Result<Option<String>, sqlx::Error> {
        let mut chain: Vec<(String, String)> = Vec::new();
        let mut cur = key.to_string();
        let base = loop {
            if let Some(u) = memo.get(&cur) {
                break u.clone();
            }
            if chain.len() > MAX_DEPTH {
                break None;
            }
            let Some(p) = place(tx, self.site, &cur).await? else {
                break None;
            };
            if !self.put.contains(&cur) {
                break p.url_path;
            }
            chain.push((cur.clone(), p.slug));
            match p.parent_key {
                None => break Some(format!("{}{}/", self.root, p.locale)),
                Some(parent) => cur = parent,
            }
        };
        let mut url = base;
        for (k, slug) in chain.into_iter().rev() {
            url = url.map(|u| format!("{u}{slug}/"));
            memo.insert(k, url.clone());
        }
        Ok(url)
    }

    /// A page as messages name it: its title and URL path.
    async fn describe(&self, tx: &mut Tx<'_>, key: &str) -> Result<String, sqlx::Error> {
        let r = sqlx::query("SELECT title, url_path FROM pages WHERE site = $1 AND page_key = $2")
            .bind(self.site)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(match r {
            Some(r) => {
                let (title, url): (String, Option<String>) = (r.get(0), r.get(1));
                format!(
                    "page {title:?} ({})",
                    url.unwrap_or_else(|| key.to_string())
                )
            }
            None => format!("page {key}"),
        })
    }

    /// Another page that has URL path `url`.
    async fn taken(
        &self,
        tx: &mut Tx<'_>,
        key: &str,
        url: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        let r = sqlx::query(
            "SELECT page_key FROM pages WHERE site = $1 AND url_path = $2 AND page_key <> $3",
        )
        .bind(self.site)
        .bind(url)
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(r.map(|r| r.get::<String, _>(0)))
    }

    /// Writes a page's URL path; the pages below a page whose path changed move with it.
    async fn set_url(
        &self,
        tx: &mut Tx<'_>,
        key: &str,
        url: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let old = place(tx, self.site, key).await?.and_then(|p| p.url_path);
        if old.as_deref() == url {
            return Ok(());
        }
        sqlx::query("UPDATE pages SET url_path = $1 WHERE site = $2 AND page_key = $3")
            .bind(url)
            .bind(self.site)
            .bind(key)
            .execute(&mut **tx)
            .await?;
        if let (Some(old), Some(new)) = (old, url) {
            // The pages below move with it: the hooks hear of them as moved.
            sqlx::query(
                "INSERT INTO session_pages (session_id, page_key, existed, locale, old_url, old_parent, direct) \
                 SELECT $1, page_key, 1, locale, url_path, parent_key, 0 FROM pages \
                 WHERE site = $2 AND SUBSTR(url_path, 1, CAST($3 AS INTEGER)) = $4 AND page_key <> $5 \
                 ON CONFLICT (session_id, page_key) DO NOTHING",
            )
            .bind(self.session)
            .bind(self.site)
            .bind(old.len() as i64)
            .bind(&old)
            .bind(key)
            .execute(&mut **tx)
            .await?;
            sqlx::query(
                "UPDATE pages SET url_path = $1 || SUBSTR(url_path, CAST($2 AS INTEGER)) \
                 WHERE site = $3 AND SUBSTR(url_path, 1, CAST($4 AS INTEGER)) = $5 AND page_key <> $6",
            )
            .bind(new)
            .bind(old.len() as i64 + 1)
            .bind(self.site)
            .bind(old.len() as i64)
            .bind(&old)
            .bind(key)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Links of the pages put that lead to no mirrored page, and links of other pages
    /// to the pages deleted; each error names both pages.
    async fn broken_links(
        &self,
        tx: &mut Tx<'_>,
        errors: &mut Vec<pb::ItemError>,
    ) -> Result<(), sqlx::Error> {
        // (from, to, the linked page's source URL path)
        let mut found: Vec<(String, String, String)> = Vec::new();
        for key in self.put {
            let rows = sqlx::query(
                "SELECT l.to_key, l.to_hint FROM page_links l \
                 LEFT JOIN pages p ON p.site = l.site AND p.page_key = l.to_key \
                 WHERE l.site = $1 AND l.from_key = $2 AND p.page_key IS NULL",
            )
            .bind(self.site)
            .bind(key)
            .fetch_all(&mut **tx)
            .await?;
            found.extend(rows.iter().map(|r| (key.clone(), r.get(0), r.get(1))));
        }
        for gone in self.deleted {
            let rows = sqlx::query(
                "SELECT from_key, to_hint FROM page_links WHERE site = $1 AND to_key = $2",
            )
            .bind(self.site)
            .bind(gone)
            .fetch_all(&mut **tx)
            .await?;
            for r in rows {
                let from: String = r.get(0);
                if !self.put.contains(&from) {
                    found.push((from, gone.clone(), r.get(1)));
                }
            }
        }
        for (from, to, hint) in found {
            let page = self.describe(tx, &from).await?;
            let why = if to.is_empty() {
                format!("{page} links to a page that no longer exists in the CMS")
            } else {
                let target = if hint.is_empty() {
                    to
                } else {
                    format!("{hint} ({to})")
                };
                format!(
                    "{page} links to {target}, which is not mirrored (outside the subtree, unpublished or deleted)"
                )
            };
            errors.push(page_error(&from, ErrorCode::BrokenLink, why));
        }
        Ok(())
    }
}
