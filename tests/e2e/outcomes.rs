//! Honest outcomes: a target that cannot take content refuses the session with its
//! path before anything is sent; a failed job is logged as an error with its reason.

use crate::helpers::*;

/// The job of a target that refused its session: failed, nothing counted as mirrored,
/// the reason naming the site, and the site as it was.
fn assert_refused(job: &serde_json::Value, code: i32, why: &[&str]) {
    assert_eq!(code, 2, "{job:#}");
    assert_eq!(job["state"], "failed", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("refused the session"), "{error}");
    for w in why {
        assert!(error.contains(w), "{error} does not say {w:?}");
    }
    let t = &job["targets"][0];
    assert_eq!(t["items_done"], 0, "{job:#}");
    assert_eq!(t["bytes_done"], 0, "{job:#}");
    assert!(
        job["summary"]
            .as_str()
            .unwrap()
            .starts_with("mirrored 0 items (0 B)"),
        "{job:#}"
    );
}

#[test]
fn a_target_short_of_space_refuses_the_session_and_the_failure_is_logged_as_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    // No disk has this much free: the site check refuses every session.
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--min-free-space", "1000PiB"])
        .spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    let root = dst.canonicalize().unwrap();
    assert_refused(
        &job,
        code,
        &[
            "site \"main\"",
            &root.display().to_string(),
            "free",
            "--min-free-space",
        ],
    );
    assert!(snapshot(&dst).is_empty(), "{:?}", snapshot(&dst));
    // Both sides say why in their logs, at the level an operator's alerting reads.
    let id = job["id"].as_str().unwrap();
    let source_log = logs(tmp.path(), "source");
    let failed = source_log
        .lines()
        .find(|l| l.contains("job failed") && l.contains(id))
        .unwrap_or_else(|| panic!("no failure line for {id}: {source_log}"));
    assert!(failed.contains("ERROR"), "{failed}");
    assert!(failed.contains("--min-free-space"), "{failed}");
    let target_log = logs(tmp.path(), "target");
    assert!(
        target_log
            .lines()
            .any(|l| l.contains("WARN") && l.contains("session refused") && l.contains("free")),
        "{target_log}"
    );
}

/// A read-only file system (a failed mount remounted read-only, a wrong bind mount):
/// permissions alone would not tell, and root passes them.
#[test]
#[cfg_attr(
    not(any(ci, root_user)),
    ignore = "needs root to mount a read-only tmpfs"
)]
fn a_target_whose_site_is_read_only_refuses_the_session_with_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    std::fs::create_dir_all(&dst).unwrap();
    let _ro = ReadOnlyMount::mount(&dst);
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    let root = dst.canonicalize().unwrap();
    assert_refused(
        &job,
        code,
        &[&root.display().to_string(), "Read-only file system"],
    );
    assert!(snapshot(&dst).is_empty());
}

/// An empty tmpfs mounted read-only at a path (unmounted on drop).
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    fn mount(dst: &std::path::Path) -> ReadOnlyMount {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=4m", "tmpfs"])
            .arg(dst)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount a tmpfs at {} (needs root)", dst.display());
        ReadOnlyMount(dst.to_path_buf())
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
