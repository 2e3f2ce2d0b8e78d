//! "Check system": each target checked through the authenticated path a job takes, on
//! demand and periodically, told apart as ok / unreachable / refused / misconfigured;
//! sync lag over a channel's max_lag_secs; the trace file a committed job leaves.

use std::time::Duration;

use crate::helpers::*;

/// Five targets of one channel, one of each kind, and a channel of the good one alone.
struct Targets {
    tmp: tempfile::TempDir,
    src: std::path::PathBuf,
    good_dst: std::path::PathBuf,
    source: Proc,
    _targets: Vec<Proc>,
}

fn five_targets(source_args: &[&str], good_extra: &str) -> Targets {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let good_dst = tmp.path().join("good");
    let good = App::target(tmp.path()).site(&good_dst).spawn();
    let tokens = tmp.path().join("target.tokens");
    std::fs::write(&tokens, "the-current-token-4f2a9c\n").unwrap();
    let rotated = tmp.path().join("stale.token");
    std::fs::write(&rotated, "the-previous-token-77e1b0\n").unwrap();
    let locked = App::target(tmp.path())
        .site(&tmp.path().join("locked"))
        .args(&["--auth-tokens", tokens.to_str().unwrap()])
        .spawn();
    let full = App::target(tmp.path())
        .site(&tmp.path().join("full"))
        .args(&["--min-free-space", "1000PiB"])
        .spawn();
    let down = free_addr();
    let target = |name: &str, url: &str, site: &str, extra: &str| {
        format!(
            "  [[channel.target]]\n  name = \"{name}\"\n  url = \"{url}\"\n  site = \"{site}\"\n{extra}\n"
        )
    };
    let toml = format!(
        "[[channel]]\nname = \"good\"\nsource = \"{src}\"\n{good_extra}\n{}\n\
         [[channel]]\nname = \"site\"\nsource = \"{src}\"\n{}{}{}{}{}",
        target("web1", &good.url(), "main", ""),
        target("web1", &good.url(), "main", ""),
        target("down", &format!("http://{down}"), "main", ""),
        target(
            "rotated",
            &locked.url(),
            "main",
            &format!("  token_file = \"{}\"", rotated.display())
        ),
        target("nosite", &good.url(), "elsewhere", ""),
        target("full", &full.url(), "main", ""),
        src = src.display(),
    );
    let config = tmp.path().join("mirror.toml");
    std::fs::write(&config, toml).unwrap();
    let source = App::source(tmp.path(), &config).args(source_args).spawn();
    Targets {
        tmp,
        src,
        good_dst,
        source,
        _targets: vec![good, locked, full],
    }
}

fn status_of(all: &[serde_json::Value], target: &str) -> serde_json::Value {
    all.iter()
        .find(|t| t["target"] == target)
        .unwrap_or_else(|| panic!("no {target} in {all:#?}"))
        .clone()
}

#[test]
fn check_tells_ok_unreachable_refused_and_misconfigured_apart() {
    let t = five_targets(&["--check-interval-secs", "0"], "");
    let out = mirrorctl(&t.source.url(), &["check", "site", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all.len(), 5);
    let expect = [
        ("web1", "ok", ""),
        ("down", "unreachable", "reachable"),
        ("rotated", "refused", "token"),
        ("nosite", "misconfigured", "unknown site \"elsewhere\""),
        ("full", "misconfigured", "--min-free-space"),
    ];
    for (name, status, why) in expect {
        let h = status_of(&all, name);
        assert_eq!(h["status"], status, "{h:#}");
        assert!(h["detail"].as_str().unwrap().contains(why), "{h:#}");
    }
    let ok = status_of(&all, "web1");
    let steps: Vec<&str> = ok["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["reachable", "token", "protocol", "site", "free space"]
    );
    assert!(ok["free_bytes"].as_u64().unwrap() > 0);
    // The text form: one line per check, the failing one marked.
    let out = mirrorctl(&t.source.url(), &["check", "site"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("site -> rotated"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("FAIL") && l.contains("token")),
        "{text}"
    );
    // A channel whose targets are all fine: exit 0.
    let out = mirrorctl(&t.source.url(), &["check", "good"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = mirrorctl(&t.source.url(), &["check", "nope"]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn the_source_checks_periodically_flags_lag_and_a_committed_job_leaves_a_trace() {
    let metrics = free_addr();
    let t = five_targets(
        &["--check-interval-secs", "1", "--metrics-listen", &metrics],
        "max_lag_secs = 1",
    );
    // The periodic check reaches `channels` and the metrics without being asked.
    let channels = wait_until(Duration::from_secs(30), || {
        let out = mirrorctl(&t.source.url(), &["channels", "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let site = v.iter().find(|c| c["name"] == "site").unwrap().clone();
        let checked = site["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["health"]["status"].is_string());
        ready(checked, || format!("not all checked: {site:#}")).map(|()| site)
    });
    let health = |name: &str| {
        channels["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()["health"]["status"]
            .clone()
    };
    assert_eq!(health("web1"), "ok");
    assert_eq!(health("down"), "unreachable");
    assert_eq!(health("rotated"), "refused");
    let (_, page) = http_get(&metrics, "/metrics");
    assert_eq!(
        metric(
            &page,
            "mirror_target_health{channel=\"site\",target=\"rotated\",status=\"refused\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "mirror_target_health{channel=\"site\",target=\"rotated\",status=\"ok\"}"
        ),
        Some(0.0),
        "{page}"
    );

    // A committed job writes the trace file; a job later does not send or delete it.
    let out = mirrorctl(&t.source.url(), &["start", "good", "--wait", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let job = job_of(&out);
    let trace = std::fs::read_to_string(t.good_dst.join(".cms-mirror-trace")).unwrap();
    assert!(
        trace.contains(&format!("job: {}", job["id"].as_str().unwrap())),
        "{trace}"
    );
    assert!(trace.contains("channel: good"), "{trace}");
    assert!(trace.contains("source: source-"), "{trace}");
    assert!(
        trace.lines().next().unwrap().starts_with("date: 20"),
        "{trace}"
    );
    // A source that is itself a mirror carries its target's files: they stay home.
    write(&t.src, ".cms-mirror-trace", b"date: upstream\n");
    write(&t.src, ".cms-mirror-staging/leftover", b"x");
    let out = mirrorctl(&t.source.url(), &["start", "good", "--wait", "--json"]);
    let job2 = job_of(&out);
    assert_eq!(out.status.code(), Some(0), "{job2:#}");
    assert_eq!(job2["targets"][0]["items_total"], 0, "{job2:#}");
    let trace = std::fs::read_to_string(t.good_dst.join(".cms-mirror-trace")).unwrap();
    assert!(trace.contains(job2["id"].as_str().unwrap()), "{trace}");

    // max_lag_secs = 1: a second after its last success the target lags, and says so.
    wait_until(Duration::from_secs(30), || {
        let out = mirrorctl(&t.source.url(), &["channels", "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let good = v.iter().find(|c| c["name"] == "good").unwrap().clone();
        ready(good["targets"][0]["lagging"] == true, || {
            format!("{good:#}")
        })
    });
    let text =
        String::from_utf8_lossy(&mirrorctl(&t.source.url(), &["channels"]).stdout).to_string();
    assert!(text.contains("LAGGING"), "{text}");
    wait_until(Duration::from_secs(30), || {
        let (_, page) = http_get(&metrics, "/metrics");
        let v = metric(
            &page,
            "mirror_target_lagging{channel=\"good\",target=\"web1\"}",
        );
        ready(v == Some(1.0), || page.clone())
    });
    let log = logs(t.tmp.path(), "source");
    assert!(log.contains("lags behind"), "{log}");
    assert!(log.contains("target check failed"), "{log}");
}
