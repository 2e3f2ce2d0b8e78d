//! A page put: its key, its document's size and BLAKE3, and the document itself checked
//! before it goes to the page store (nothing of a page touches the site's files).

use cms_mirror::model::{ErrorCode, Item};
use cms_mirror::page::{PageDoc, valid_key};
use cms_mirror::pathsafe::{self, PAGES_DIR};
use cms_mirror::pb;

use crate::pagestore::PageRow;

/// The page's item and store row, or why it is refused.
pub(super) fn checked(
    meta: &pb::ItemMeta,
    max_path: usize,
) -> Result<(Item, PageRow), (ErrorCode, String)> {
    let path = &meta.path;
    let bad = |code, why: String| Err((code, why));
    if let Err(e) = pathsafe::validate(path, max_path) {
        return bad(ErrorCode::InvalidPath, e.to_string());
    }
    let key = pathsafe::page_key(path).unwrap_or_default();
    if !valid_key(key) {
        return bad(
            ErrorCode::InvalidPath,
            format!("a page's key is {PAGES_DIR}/<locale>/<identity>, not {path:?}"),
        );
    }
    let doc = &meta.properties_json;
    if doc.len() as u64 != meta.size {
        return bad(
            ErrorCode::InvalidArgument,
            format!(
                "page document of {} bytes, announced {}",
                doc.len(),
                meta.size
            ),
        );
    }
    if meta.blake3.as_slice() != blake3::hash(doc.as_bytes()).as_bytes() {
        return bad(
            ErrorCode::ChecksumMismatch,
            "page document does not match its BLAKE3".into(),
        );
    }
    let p: PageDoc = serde_json::from_str(doc)
        .map_err(|e| (ErrorCode::InvalidArgument, format!("page document: {e}")))?;
    if p.key != key {
        return bad(
            ErrorCode::InvalidArgument,
            format!("page document of {:?} under key {key:?}", p.key),
        );
    }
    if let Some(parent) = p.parent.as_deref().filter(|k| !valid_key(k)) {
        return bad(
            ErrorCode::InvalidArgument,
            format!("parent key {parent:?} is not a page key"),
        );
    }
    let item = Item::from_pb(meta).expect("a page's kind is known");
    Ok((item, PageRow::new(p, doc.clone())))
}
