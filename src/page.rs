//! The page document: what a content provider reads of one CMS page and a target's page
//! store keeps, the same for every CMS. It travels as the JSON `properties_json` of a
//! `put` of kind page whose key is below [`crate::pathsafe::PAGES_DIR`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Item, Kind};
use crate::pathsafe::page_path;

/// What a reference points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefKind {
    Page,
    Image,
    Document,
}

/// One reference of a page, where it sits in the page's fields.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Reference {
    /// Wagtail's content path: a field name, then block ids and struct children
    /// (`body.8f0c….link`); rich text holds all its links at the field's path.
    pub path: String,
    pub kind: RefKind,
    /// The id the source's fields use.
    pub id: i64,
    /// The page's key, or the file's path under the media root; empty when the object
    /// is gone (a broken link).
    pub to: String,
    /// The image's or document's title; for a page outside the subtree, its URL path
    /// in the source CMS (a link to it is broken on the mirror; messages name it so).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub title: String,
}

/// A live page as it is mirrored: the JSON document a page item carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PageDoc {
    /// `<locale>/<translation key>`, unique in the site.
    pub key: String,
    pub locale: String,
    /// The parent's key; `None` at the destination root.
    pub parent: Option<String>,
    /// Place among the siblings (treebeard step; siblings sort by it).
    pub position: String,
    /// `app_label.ModelName`.
    #[serde(rename = "type")]
    pub page_type: String,
    pub slug: String,
    pub title: String,
    pub seo_title: String,
    pub search_description: String,
    pub show_in_menus: bool,
    pub first_published_at: Option<String>,
    pub last_published_at: Option<String>,
    /// The page type's own fields (StreamFields as their block lists).
    pub fields: BTreeMap<String, Value>,
    pub references: Vec<Reference>,
    /// The source's id, for messages and tests (stable: not the page's place).
    pub source_id: i64,
}

impl PageDoc {
    /// The document sent for the page. Serialised fields are sorted, so equal pages
    /// give equal bytes.
    pub fn document(&self) -> String {
        serde_json::to_string(self).expect("a page record serialises")
    }

    /// The page as a site item: its key below [`crate::pathsafe::PAGES_DIR`], the size and BLAKE3 of its
    /// document (a page is unchanged exactly when its document is).
    pub fn item(&self, doc: &[u8]) -> Item {
        Item {
            path: page_path(&self.key),
            kind: Kind::Page,
            size: doc.len() as u64,
            mtime_ns: 0,
            mode: 0,
            link: String::new(),
            hash: Some(blake3::hash(doc).to_hex().to_string()),
        }
    }
}

/// Whether `key` has the shape of a page key: `<locale>/<identity>`, both plain
/// lower-case names (letters, digits, `-`, `_`).
pub fn valid_key(key: &str) -> bool {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    key.split_once('/')
        .is_some_and(|(l, k)| plain(l) && plain(k))
}
