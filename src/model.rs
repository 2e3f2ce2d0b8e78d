//! The content model: one item kind set for every provider, and the tree order in
//! which both sides enumerate their content so that a plan is a merge join.

use serde::{Deserialize, Serialize};

use crate::pb;

/// Kind of an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A CMS page: its key is under [`crate::pathsafe::PAGES_DIR`], its content a JSON
    /// document that goes to the target's page store, never to its file tree.
    Page,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File => "file",
            Kind::Symlink => "symlink",
            Kind::Page => "page",
        }
    }
    pub fn to_pb(self) -> pb::ItemKind {
        match self {
            Kind::Dir => pb::ItemKind::Directory,
            Kind::File => pb::ItemKind::File,
            Kind::Symlink => pb::ItemKind::Symlink,
            Kind::Page => pb::ItemKind::Page,
        }
    }
    pub fn from_pb(k: i32) -> Option<Kind> {
        match pb::ItemKind::try_from(k).ok()? {
            pb::ItemKind::Directory => Some(Kind::Dir),
            pb::ItemKind::File => Some(Kind::File),
            pb::ItemKind::Page => Some(Kind::Page),
            pb::ItemKind::Symlink => Some(Kind::Symlink),
            pb::ItemKind::Unspecified => None,
        }
    }
    pub fn code(self) -> i64 {
        self.to_pb() as i64
    }
}

/// One item of a site: a stable key (its relative path) and its metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub path: String,
    pub kind: Kind,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mtime_ns: i64,
    #[serde(default)]
    pub mode: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link: String,
    /// BLAKE3 of the body, hex, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

impl Item {
    pub fn to_pb(&self) -> pb::ItemMeta {
        pb::ItemMeta {
            path: self.path.clone(),
            kind: self.kind.to_pb() as i32,
            size: self.size,
            mtime_ns: self.mtime_ns,
            mode: self.mode,
            symlink_target: self.link.clone(),
            blake3: self
                .hash
                .as_deref()
                .and_then(|h| blake3::Hash::from_hex(h).ok())
                .map(|h| h.as_bytes().to_vec())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    /// Converts protocol metadata; `None` when the kind is missing or unknown.
    pub fn from_pb(m: &pb::ItemMeta) -> Option<Item> {
        Some(Item {
            path: m.path.clone(),
            kind: Kind::from_pb(m.kind)?,
            size: m.size,
            mtime_ns: m.mtime_ns,
            mode: m.mode,
            link: m.symlink_target.clone(),
            hash: (m.blake3.len() == 32).then(|| hex(&m.blake3)),
        })
    }

    /// Quick check (rsync's default): same kind, and for files same size and mtime,
    /// for symlinks same target. Directories are equal when their mode and mtime are,
    /// pages when their documents are (same size and BLAKE3).
    pub fn same_quick(&self, other: &Item) -> bool {
        self.kind == other.kind
            && match self.kind {
                Kind::File => {
                    self.size == other.size
                        && self.mtime_ns == other.mtime_ns
                        && self.mode == other.mode
                }
                Kind::Symlink => self.link == other.link && self.mtime_ns == other.mtime_ns,
                Kind::Dir => self.mode == other.mode && self.mtime_ns == other.mtime_ns,
                Kind::Page => {
                    self.size == other.size && self.hash.is_some() && self.hash == other.hash
                }
            }
    }
}

/// Lowercase hex of bytes.
pub fn hex(b: &[u8]) -> String {
    // Called for every item's hash of a manifest: no formatting machinery per byte.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 15)] as char);
    }
    s
}

/// The tree-order key of a path: its components joined by a NUL byte.
///
/// Sorting by this key is the order of a depth-first walk that visits the children of
/// each directory sorted by name bytes (`a`, `a/b`, `a-c`), which is what the walker
/// produces and what the target's index returns, so a plan is one merge join.
pub fn tree_key(path: &str) -> Vec<u8> {
    path.bytes()
        .map(|b| if b == b'/' { 0 } else { b })
        .collect()
}

/// Parent directory of a relative path ("" for top-level items).
pub fn parent(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_matches_blake3s() {
        assert_eq!(hex(&[0x00, 0xab, 0xff, 0x10]), "00abff10");
        let h = blake3::hash(b"cms-mirror");
        assert_eq!(hex(h.as_bytes()), h.to_hex().as_str());
    }

    #[test]
    fn tree_order_is_depth_first() {
        let mut v = vec!["a-c", "a/b", "a", "a/b/c", "b", "a.txt"];
        v.sort_by_key(|p| tree_key(p));
        assert_eq!(v, ["a", "a/b", "a/b/c", "a-c", "a.txt", "b"]);
    }
}

/// Machine-readable item error codes: the `code` of `pb::ItemError`, stable on the wire
/// (job records, hooks and scripts read them as text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// A device, FIFO or socket: nothing to mirror.
    SpecialFile,
    Unreadable,
    /// Gone between the plan and the read.
    Vanished,
    ChangedWhileRead,
    /// A source name that is not valid UTF-8 or not mirrorable.
    InvalidName,
    /// A path the target refuses (unsafe, too long, a normalisation twin, ...).
    InvalidPath,
    InvalidArgument,
    ChecksumMismatch,
    /// The target's disk (or quota) is full.
    NoSpace,
    /// A symbolic link that leaves the site, refused by the site's `links = "safe"`.
    UnsafeLink,
    /// A page links to a page that is not mirrored (outside the subtree, or deleted).
    BrokenLink,
    /// A page whose parent is not mirrored: it has no URL.
    MissingParent,
    /// A page whose URL another page already has.
    SlugCollision,
    /// A cache invalidation hook of the target failed after the commit: what it should
    /// have purged may be served stale until it runs again.
    HookFailed,
    /// The basis of a delta transfer changed on the target after its signatures were
    /// read: the package comes back and the file is sent whole.
    BasisChanged,
    Io,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::SpecialFile => "special_file",
            ErrorCode::Unreadable => "unreadable",
            ErrorCode::Vanished => "vanished",
            ErrorCode::ChangedWhileRead => "changed_while_read",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::InvalidPath => "invalid_path",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::UnsafeLink => "unsafe_link",
            ErrorCode::BrokenLink => "broken_link",
            ErrorCode::MissingParent => "missing_parent",
            ErrorCode::SlugCollision => "slug_collision",
            ErrorCode::HookFailed => "hook_failed",
            ErrorCode::BasisChanged => "basis_changed",
            ErrorCode::Io => "io",
        }
    }

    /// Whether an item error's wire code is this one.
    pub fn is(self, code: &str) -> bool {
        code == self.as_str()
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job did to an item, as recorded per session and handed to hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeAction {
    Created,
    Updated,
    Deleted,
}

impl ChangeAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            ChangeAction::Created => "created",
            ChangeAction::Updated => "updated",
            ChangeAction::Deleted => "deleted",
        }
    }
}

impl std::str::FromStr for ChangeAction {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "created" => Ok(ChangeAction::Created),
            "updated" => Ok(ChangeAction::Updated),
            "deleted" => Ok(ChangeAction::Deleted),
            o => Err(UnknownName::new(
                "change action",
                o,
                "created, updated or deleted",
            )),
        }
    }
}

/// A name outside a closed set (a state, an action, a setting's value).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("unknown {what} {value:?} (expected {expected})")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl UnknownName {
    pub fn new(what: &'static str, value: &str, expected: &'static str) -> UnknownName {
        UnknownName {
            what,
            value: value.into(),
            expected,
        }
    }
}
