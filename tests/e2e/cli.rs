//! mirrorctl as an admin's shell expects it: short job ids, event lines on stdout when
//! piped, no panic on a closed pipe, Ctrl-C that leaves the job running, clear errors
//! for a wrong --source, an unknown channel or a missing token file, dry runs marked,
//! completions and a manual page.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn short_job_ids_piped_events_and_dry_runs_read_as_an_admin_expects() {
    let Mirror {
        tmp: _tmp,
        src: _src,
        dst: _dst,
        config: _config,
        target,
        source,
    } = Mirror::start(|src| make_many(src, 400), "");
    // Text mode with stdout piped: one line per event on stdout, then the job.
    let out = mirrorctl(&source.url(), &["start", "site", "--wait", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("job ")?.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job line: {stdout}"))
        .to_string();
    let short = &id[..8];
    for kind in ["queued", "planned", "finished"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!(" {kind}")) && l.contains(short)),
            "no {kind} event line on stdout: {stdout}"
        );
    }
    assert!(
        !text(&out.stderr).contains(" planned"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("(dry run: nothing was changed)"),
        "{stdout}"
    );
    assert!(stdout.contains("would mirror "), "{stdout}");
    // Sizes read as sizes.
    assert!(
        stdout.contains(" MiB") || stdout.contains(" KiB"),
        "{stdout}"
    );
    let jobs = text(&mirrorctl(&source.url(), &["jobs"]).stdout);
    assert!(jobs.contains("[dry run] would mirror"), "{jobs}");

    // The short id shown in event lines works wherever an id does.
    let shown = show_job(&source.url(), short);
    assert_eq!(shown["id"], id.as_str());
    let plan = mirrorctl(&source.url(), &["plan", short]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan.stderr));
    assert!(text(&plan.stdout).lines().count() > 400);
    let out = mirrorctl(&source.url(), &["show", "ffffffff-0000"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );

    // A reader that stops early (`| head`) ends mirrorctl quietly.
    let piped = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' --source {} plan {short} | head -n 2 >/dev/null; echo \"exit=${{PIPESTATUS[0]}}\"",
            bin_dir().join("mirrorctl").display(),
            source.url()
        ))
        .output()
        .unwrap();
    let (o, e) = (text(&piped.stdout), text(&piped.stderr));
    assert!(o.contains("exit=0"), "{o} {e}");
    assert!(!e.contains("panicked"), "{e}");

    // Errors an admin makes: a path that is not there, nor its directory (one whose
    // directory is there may be a deletion to mirror).
    let out = mirrorctl(
        &source.url(),
        &["start", "site", "--path", "nowhere/f.html"],
    );
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(
        err.contains("\"nowhere/f.html\" is not in the source directory"),
        "{err}"
    );
    let out = mirrorctl(
        &source.url(),
        &[
            "start",
            "site",
            "--path",
            "d1/e1/gone.html",
            "--dry-run",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = mirrorctl(&source.url(), &["jobs", "--channel", "nope"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("unknown channel \"nope\""),
        "{}",
        text(&out.stderr)
    );
    let out = mirrorctl(&target.url(), &["jobs"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert!(
        err.contains("does not serve the source API") && err.contains("mirror-target"),
        "{err}"
    );
}

#[test]
fn ctrl_c_on_start_wait_leaves_the_job_running_and_says_how_to_cancel_it() {
    let Mirror {
        tmp: _tmp,
        src: _src,
        dst: _dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(
        |src| make_many(src, 3000),
        "package_bytes = 16384\nwindow = 1",
    );
    let mut child = Command::new(bin_dir().join("mirrorctl"))
        .args(["--source", &source.url(), "start", "site", "--wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let id = first
        .strip_prefix("job ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    wait_acked(&source.url(), &id, 1);
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("goes on"), "{rest}");
    assert!(
        rest.contains(&format!("mirrorctl cancel {}", &id[..8])),
        "{rest}"
    );
    // The job did go on, to its end.
    let j = wait_until(Duration::from_secs(120), || {
        let j = show_job(&source.url(), &id);
        ready(j["state"] == "succeeded", || format!("{j:#}")).map(|()| j)
    });
    assert_eq!(
        j["targets"][0]["items_done"],
        j["targets"][0]["items_total"]
    );
}

#[test]
fn a_missing_token_file_stops_the_source_at_start_and_completions_and_man_page_print() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let missing = tmp.path().join("web1.token");
    let config = write_config(
        tmp.path(),
        &src,
        "http://127.0.0.1:9",
        &format!("token_file = \"{}\"", missing.display()),
    );
    // token_file is a key of the target table: move it there.
    let toml = std::fs::read_to_string(&config).unwrap();
    let line = format!("token_file = \"{}\"\n", missing.display());
    let toml = toml.replacen(&line, "", 1) + &format!("  {line}");
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(bin_dir().join("mirror-source"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("token_file")
            && err.contains(&missing.display().to_string())
            && err.contains("No such file"),
        "{err}"
    );

    let ctl = |args: &[&str]| {
        Command::new(bin_dir().join("mirrorctl"))
            .args(args)
            .output()
            .unwrap()
    };
    let bash = ctl(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = text(&bash.stdout);
    assert!(
        script.contains("_mirrorctl()") && script.contains("--max-delete"),
        "{script}"
    );
    let man = ctl(&["man"]);
    assert!(man.status.success());
    let page = text(&man.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH mirrorctl"),
        "{page}"
    );
    assert!(page.contains("completions"), "{page}");
}
