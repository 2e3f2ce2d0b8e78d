//! Safe deletion by default: an empty or missing source is refused, `max_delete` has a
//! limit unless set otherwise (with a one-off override), and the exclude presets keep
//! version control metadata and secrets off the targets.

use crate::helpers::*;

fn error_of(job: &serde_json::Value) -> &str {
    job["error"].as_str().unwrap_or_default()
}

#[test]
fn an_empty_or_missing_source_is_refused_and_the_default_max_delete_holds() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(make_tree, "delete = true");
    assert_eq!(run_job(&source.url(), &[]).0, 0);
    let mirrored = snapshot(&dst);

    // A mount that failed: an empty directory, then none at all. Nothing is deleted.
    let kept = src.with_extension("kept");
    std::fs::rename(&src, &kept).unwrap();
    std::fs::create_dir(&src).unwrap();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 2, "{job:#}");
    assert!(error_of(&job).contains("is empty"), "{job:#}");
    assert!(error_of(&job).contains("allow_empty_source"), "{job:#}");
    std::fs::remove_dir(&src).unwrap();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 2, "{job:#}");
    assert!(
        error_of(&job).contains("cannot read the source directory"),
        "{job:#}"
    );
    assert_eq!(snapshot(&dst), mirrored);

    // Half the site gone (a wrong path, a partial restore): over the default 25%.
    std::fs::rename(&kept, &src).unwrap();
    std::fs::remove_dir_all(src.join("a")).unwrap();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 2, "{job:#}");
    let err = error_of(&job);
    assert!(err.contains("max_delete exceeded"), "{err}");
    assert!(err.contains("the channel's limit is 3"), "{err}");
    assert!(err.contains("mirrorctl start site --max-delete 7"), "{err}");
    assert_eq!(snapshot(&dst), mirrored);

    // The operator checked: this job only may delete that much.
    let out = mirrorctl(&source.url(), &["start", "site", "--max-delete", "lots"]);
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_delete"), "{stderr}");
    let (code, job) = run_job(&source.url(), &["--max-delete", "7"]);
    assert_eq!(code, 0, "{job:#}");
    assert_same_tree(&src, &dst);
    // The next job is back to the channel's limit.
    std::fs::remove_dir_all(src.join("media")).unwrap();
    std::fs::remove_file(src.join("media-link")).unwrap();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 2, "{job:#}");
    assert!(error_of(&job).contains("max_delete exceeded"), "{job:#}");
}

#[test]
fn a_channel_that_allows_an_empty_source_mirrors_it() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(
        make_tree,
        "delete = true\nallow_empty_source = true\nmax_delete = \"100%\"",
    );
    assert_eq!(run_job(&source.url(), &[]).0, 0);
    std::fs::remove_dir_all(&src).unwrap();
    std::fs::create_dir(&src).unwrap();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert!(snapshot(&dst).is_empty(), "{:?}", snapshot(&dst));
}

#[test]
fn the_exclude_presets_keep_version_control_and_secrets_off_the_targets() {
    let secret = [
        ".git/config",
        ".git/objects/ab/cdef",
        "themes/child/.git",
        ".svn/entries",
        ".env",
        ".env.production",
        "app/.git-credentials",
        ".htpasswd",
        "home/.netrc",
        "home/.ssh/id_ed25519",
        "certs/server.key",
    ];
    let public = [
        "index.html",
        "css/site.css",
        "certs/server.pem",
        "docs/env.md",
    ];
    let Mirror {
        tmp: _tmp,
        src: _src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(
        |src| {
            for p in secret.iter().chain(&public) {
                write(src, p, p.as_bytes());
            }
        },
        "exclude_presets = [\"vcs\", \"secrets\"]",
    );
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let landed = snapshot(&dst);
    for p in public {
        assert!(landed.contains_key(p), "{p} missing: {landed:?}");
    }
    for p in secret {
        assert!(!dst.join(p).exists(), "{p} was mirrored");
    }
    for dir in [".git", ".svn", "home/.ssh"] {
        assert!(!dst.join(dir).exists(), "{dir} was mirrored");
    }
}
