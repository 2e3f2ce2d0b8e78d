//! Incremental jobs: an exact plan, only what changed on the wire, deletions last and
//! guarded, filters, dry run.

use crate::helpers::*;

fn target_of(job: &serde_json::Value) -> &serde_json::Value {
    &job["targets"][0]
}

#[test]
fn a_second_job_sends_only_what_changed() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(make_tree, "delete = true");
    let (code, first) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{first:#}");

    // No change: no file data, no package, nothing to do.
    let (code, again) = run_job(&source.url(), &[]);
    assert_eq!(code, 0);
    let t = target_of(&again);
    assert_eq!(
        (
            t["items_total"].as_u64(),
            t["bytes_total"].as_u64(),
            t["deletes_total"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{t}"
    );
    assert_eq!(t["packages_sent"], 0);
    assert_eq!(t["bytes_on_wire"], 0);

    // Modify (same size, new mtime), add, delete, rename a file and a directory.
    write(&src, "docs/readme.md", &bytes(33, 10_000));
    write(&src, "new/added.txt", &bytes(4, 2_000));
    std::fs::remove_file(src.join("a/b/c/deep.txt")).unwrap();
    std::fs::rename(src.join("index.html"), src.join("home.html")).unwrap();
    std::fs::rename(src.join("empty dir"), src.join("renamed dir")).unwrap();
    let changed_bytes = 10_000 + 2_000 + 13; // readme, added, home.html (renamed index)

    // The dry run: same counts as the real run, target untouched.
    let before = snapshot(&dst);
    let (code, dry) = run_job(&source.url(), &["--dry-run"]);
    assert_eq!(code, 0, "{dry:#}");
    assert_eq!(snapshot(&dst), before, "a dry run changed the target");
    let (code, real) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{real:#}");
    let (d, r) = (target_of(&dry), target_of(&real));
    for k in ["items_total", "bytes_total", "deletes_total"] {
        assert_eq!(d[k], r[k], "dry run and real run differ in {k}");
    }
    assert_eq!(
        r["bytes_total"].as_u64().unwrap(),
        changed_bytes as u64,
        "{r}"
    );
    assert_eq!(r["bytes_done"], r["bytes_total"]);
    // Creates: home.html, renamed dir, new/, new/added.txt; updates: readme.md and the
    // directories whose entries changed (mtime): root-level ones a/b/c, src root is not
    // an item. Deletes: index.html, empty dir, a/b/c/deep.txt.
    assert_eq!(r["deletes_total"], 3, "{r}");
    assert_eq!(r["deletes_done"], 3, "{r}");
    // Data on the wire is the changed bytes plus framing, far below the tree's size.
    let wire = r["bytes_on_wire"].as_u64().unwrap();
    assert!(
        wire >= changed_bytes as u64 && wire < changed_bytes as u64 + 8_000,
        "bytes on the wire {wire}"
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn deletes_are_skipped_after_an_item_error_and_max_delete_stops_a_job() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(
        make_tree,
        "delete = true\nmax_delete = \"20%\"\nexclude = [\"*.keep\"]",
    );
    assert_eq!(run_job(&source.url(), &[]).0, 0);
    // A file on the target that the filter excludes is left alone.
    write(&dst, "local.keep", b"target's own");

    // One failed item (a FIFO) and one delete: nothing is deleted.
    std::fs::remove_file(src.join("docs/readme.md")).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(src.join("docs/fifo"))
            .status()
            .unwrap()
            .success()
    );
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "{job:#}");
    assert!(
        dst.join("docs/readme.md").exists(),
        "deleted despite an item error"
    );
    assert_eq!(target_of(&job)["deletes_done"], 0);
    std::fs::remove_file(src.join("docs/fifo")).unwrap();

    // Without errors the delete lands.
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert!(!dst.join("docs/readme.md").exists());
    assert_eq!(
        std::fs::read(dst.join("local.keep")).unwrap(),
        b"target's own"
    );

    // A source mostly gone (a directory that did not mount) trips max_delete: nothing
    // deleted.
    for d in ["a", "media", "docs"] {
        std::fs::remove_dir_all(src.join(d)).unwrap();
    }
    let before = snapshot(&dst);
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 2, "{job:#}");
    let err = job["error"].as_str().unwrap();
    assert!(err.contains("max_delete exceeded"), "{err}");
    assert_eq!(snapshot(&dst), before);
}

#[test]
fn last_patterns_land_after_the_rest_of_the_content() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    write(&src, "sitemap.xml", b"<urlset/>");
    let target = App::target(tmp.path()).site(&dst).spawn();
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "last = [\"sitemap.xml\", \"index.html\"]",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &["--dry-run"]);
    assert_eq!(code, 0);
    let out = mirrorctl(
        &source.url(),
        &["plan", job["id"].as_str().unwrap(), "--json"],
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let paths: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
    let n = paths.len();
    assert!(n > 5);
    assert_eq!(&paths[n - 2..], ["index.html", "sitemap.xml"], "{paths:?}");
    assert_eq!(run_job(&source.url(), &[]).0, 0);
    assert_same_tree(&src, &dst);
}
