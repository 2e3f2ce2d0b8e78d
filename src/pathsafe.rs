//! Validation of the relative paths a target receives. The target trusts nothing:
//! a path is accepted only when every component is a plain name.

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path {0:?}")]
    Absolute(String),
    #[error("path {0:?} has an empty, '.' or '..' component")]
    BadComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} contains a backslash")]
    Backslash(String),
    #[error("path of {len} bytes exceeds the limit of {limit}")]
    TooLong { len: usize, limit: usize },
    #[error("path {0:?} has a component longer than 255 bytes")]
    NameTooLong(String),
    #[error("path {0:?} is reserved for the target's staging area")]
    Reserved(String),
    #[error("path {0:?} is reserved for the target's trace file")]
    ReservedForTrace(String),
    #[error("path {0:?} is reserved for CMS pages")]
    ReservedForPages(String),
}

/// Name of the directory under each site root where the target stages incoming files
/// (same filesystem as the site, so a rename publishes atomically).
pub const STAGING_DIR: &str = ".cms-mirror-staging";

/// The file at each site root where the target notes its last committed job (date,
/// job, channel, source, lineage), for mirror checkers that read its age. Not content:
/// never sent, never deleted by a job.
pub const TRACE_FILE: &str = ".cms-mirror-trace";

/// Where the keys of CMS pages live among a site's items (`.cms-mirror-pages/<locale>/
/// <translation key>`): no file may be written below it, and a page's key is always
/// below it.
pub const PAGES_DIR: &str = ".cms-mirror-pages";

/// The page key of an item path below [`PAGES_DIR`] (`.cms-mirror-pages/en/abc` is
/// `en/abc`); `None` for any other path.
pub fn page_key(path: &str) -> Option<&str> {
    path.strip_prefix(PAGES_DIR)?.strip_prefix('/')
}

/// Whether `path` is below [`PAGES_DIR`].
pub fn is_page_key(path: &str) -> bool {
    page_key(path).is_some()
}

/// The item path of a page key (the inverse of [`page_key`]).
pub fn page_path(key: &str) -> String {
    format!("{PAGES_DIR}/{key}")
}

/// Checks that `path` is a safe relative path: '/'-separated plain names, none empty,
/// "." or "..", no NUL, no backslash, within the length limits.
pub fn validate(path: &str, max_len: usize) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > max_len {
        return Err(PathError::TooLong {
            len: path.len(),
            limit: max_len,
        });
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.into()));
    }
    if path.contains('\0') {
        return Err(PathError::Nul(path.replace('\0', "\\0")));
    }
    if path.contains('\\') {
        return Err(PathError::Backslash(path.into()));
    }
    for c in path.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(PathError::BadComponent(path.into()));
        }
        if c.len() > 255 {
            return Err(PathError::NameTooLong(path.into()));
        }
    }
    // The staging directory, and the target's short-lived files named after it beside
    // it (its site probe, its trace file being written).
    if path
        .split('/')
        .next()
        .is_some_and(|top| top.starts_with(STAGING_DIR))
    {
        return Err(PathError::Reserved(path.into()));
    }
    if path == TRACE_FILE {
        return Err(PathError::ReservedForTrace(path.into()));
    }
    Ok(())
}

/// Checks a path for a file, directory or link: safe, and not where pages live.
pub fn validate_file(path: &str, max_len: usize) -> Result<(), PathError> {
    validate(path, max_len)?;
    if path == PAGES_DIR || is_page_key(path) {
        return Err(PathError::ReservedForPages(path.into()));
    }
    Ok(())
}

/// Whether a symbolic link at `path` (relative to the root) with `target` leaves the
/// root, read as rsync's `--safe-links` reads it: an absolute (or empty) target always
/// does, a relative one when its `..` climb above the root. Lexical: links among the
/// target's own components are not followed (the target never follows links anyway).
pub fn link_leaves_root(path: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') {
        return true;
    }
    let mut depth = path.matches('/').count();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." if depth == 0 => return true,
            ".." => depth -= 1,
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_that_climb_out_of_the_root_are_told_apart() {
        for (path, target) in [
            ("a", "/etc/passwd"),
            ("a", ".."),
            ("a", "../x"),
            ("d/a", "../../x"),
            ("d/a", "x/../../../y"),
            ("d/a", ""),
        ] {
            assert!(link_leaves_root(path, target), "{path} -> {target}");
        }
        for (path, target) in [
            ("a", "b"),
            ("d/a", "../b"),
            ("d/e/a", "../../b/c"),
            ("d/a", "x/../y"),
            ("d/a", "./b"),
        ] {
            assert!(!link_leaves_root(path, target), "{path} -> {target}");
        }
    }

    #[test]
    fn refuses_hostile_paths() {
        for p in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "a//b",
            "./a",
            "a/.",
            "a\0b",
            "a\\..\\b",
            ".cms-mirror-staging/x",
            ".cms-mirror-staging-probe-12",
            ".cms-mirror-trace",
        ] {
            assert!(validate(p, 4096).is_err(), "{p:?} accepted");
        }
        assert!(validate(&"x".repeat(300), 4096).is_err());
        assert!(validate(&"a/".repeat(3000), 4096).is_err());
        for p in [
            "a",
            "a/b c/ü.html",
            "..a",
            "a..",
            ".hidden",
            "a/.cms-mirror-staging-x",
            "a/.cms-mirror-trace",
        ] {
            assert!(validate(p, 4096).is_ok(), "{p:?} refused");
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Fuzz target (`scripts/fuzz.sh` runs it long): whatever the input, an accepted
        /// path joined to a root stays under it, component by component.
        #[test]
        fn fuzz_accepted_paths_stay_under_the_root(
            p in proptest::string::string_regex(r"[a./\\\x00\u{e9}\u{301}~:-]{0,24}").unwrap()
                .boxed()
                .prop_union(any::<String>().boxed())
        ) {
            if validate(&p, 4096).is_ok() {
                let joined = std::path::Path::new("/srv/site").join(&p);
                prop_assert!(joined.starts_with("/srv/site"));
                for c in std::path::Path::new(&p).components() {
                    prop_assert!(matches!(c, std::path::Component::Normal(_)), "{:?} in {:?}", c, p);
                }
                prop_assert!(!p.contains('\0') && !p.contains('\\'));
                prop_assert!(p.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
            }
        }
    }
}
