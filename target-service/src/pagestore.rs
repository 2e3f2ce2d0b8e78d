//! The page store: a site's CMS pages in the target's database, written in the
//! transaction of the package that brought them (so a package applied twice changes
//! nothing), with their index rows in `entries` (kind page) like any other item.

use cms_mirror::model::ChangeAction;
use cms_mirror::page::PageDoc;
use cms_mirror::pathsafe::{PAGES_DIR, is_page_key};

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
}

impl PageRow {
    /// The row of a checked page document (`doc` its exact bytes).
    pub fn new(p: PageDoc, doc: String) -> PageRow {
        PageRow {
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

    /// The page's item path (below [`PAGES_DIR`]).
    pub fn path(&self) -> String {
        format!("{PAGES_DIR}/{}", self.key)
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
    pages: &[PageRow],
    deletes: &[String],
    now: i64,
) -> Result<Vec<(String, ChangeAction)>, sqlx::Error> {
    let mut changes = Vec::with_capacity(pages.len());
    for p in pages {
        let existed = sqlx::query("SELECT 1 FROM pages WHERE site = $1 AND page_key = $2")
            .bind(site)
            .bind(&p.key)
            .fetch_optional(&mut **tx)
            .await?
            .is_some();
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
        .bind(page_id(site, &p.key))
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
    }
    for path in deletes.iter().filter(|p| is_page_key(p)) {
        let key = &path[PAGES_DIR.len() + 1..];
        sqlx::query("DELETE FROM pages WHERE site = $1 AND page_key = $2")
            .bind(site)
            .bind(key)
            .execute(&mut **tx)
            .await?;
    }
    Ok(changes)
}

/// How many pages a site's store holds.
pub async fn count(db: &cms_mirror::db::Db, site: &str) -> Result<i64, sqlx::Error> {
    use sqlx::Row;
    let r = sqlx::query("SELECT COUNT(*) FROM pages WHERE site = $1")
        .bind(site)
        .fetch_one(&db.pool)
        .await?;
    Ok(r.get::<i64, _>(0))
}
