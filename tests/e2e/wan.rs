//! Jobs over a slow, far link: the project's WAN test bed (`scripts/wan/`): a network
//! namespace for the target joined to the host (the source's side) by a veth pair whose
//! ends are rate-limited with tc's token bucket filter, a delaying proxy for latency,
//! and the link cut with `ip link set down`. Needs root.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::helpers::*;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/wan")
        .join(name)
}

/// One test bed: namespace `cmwN` behind host interface `cmwNa` (10.77.N.1), its own end
/// 10.77.N.2. Removed when dropped.
pub struct Bed {
    pub n: u32,
}

impl Bed {
    pub fn up(rate: &str) -> Bed {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Apart from the beds of other test processes on the machine.
        let n = (std::process::id() % 40) * 6 + 1 + NEXT.fetch_add(1, Ordering::SeqCst) % 6;
        bed(&["up", &n.to_string(), "--rate", rate]);
        Bed { n }
    }

    pub fn ns(&self) -> String {
        format!("cmw{}", self.n)
    }

    pub fn inner_ip(&self) -> String {
        format!("10.77.{}.2", self.n)
    }

    pub fn cut(&self) {
        bed(&["cut", &self.n.to_string()]);
    }

    pub fn restore(&self) {
        bed(&["restore", &self.n.to_string()]);
    }

    /// A helper script in the namespace; it prints "... listening on ..." when ready.
    pub fn run(&self, args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(), "python3"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 in the namespace");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "{args:?}: {line}");
        (child, out)
    }

    /// A delaying proxy in the namespace in front of `to`, `ms` each way: the URL that
    /// reaches `to` through it, and the proxy (stopped when dropped).
    pub fn delayed(&self, to: &str, ms: u32) -> (String, Killed) {
        let proxied = format!("{}:7000", self.inner_ip());
        let (proxy, _) = self.run(&[
            script("delay_proxy.py").to_str().unwrap(),
            "--listen",
            &proxied,
            "--to",
            to,
            "--delay-ms",
            &ms.to_string(),
        ]);
        (format!("http://{proxied}"), Killed(proxy))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        bed(&["down", &self.n.to_string()]);
    }
}

fn bed(args: &[&str]) {
    let out = Command::new("python3")
        .arg(script("bed.py"))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "bed.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Seconds since the epoch of an event's time.
fn at(e: &serde_json::Value) -> f64 {
    let t = chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap();
    t.timestamp_millis() as f64 / 1000.0
}

#[test]
#[cfg_attr(
    not(any(ci, root_user)),
    ignore = "needs root for network namespaces and tc"
)]
fn a_job_across_a_slow_far_link_with_a_cut_lands_exact() {
    let bed = Bed::up("20mbit");
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    for i in 0..24 {
        write(&src, &format!("img/{i}.jpg"), &bytes(i, 1 << 20));
    }
    write(&src, "video.mp4", &bytes(99, 8 << 20));
    let target = App::target(tmp.path()).site(&dst).netns(&bed.ns()).spawn();
    let (url, _proxy) = bed.delayed(&target.addr, 80);
    let config = write_config_with_target(
        tmp.path(),
        &src,
        &url,
        "package_bytes = 1048576\nretry_budget = 30",
        "",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let job = start_job(&source.url());
    wait_acked(&source.url(), &job, 6);
    bed.cut();
    std::thread::sleep(Duration::from_secs(20));
    let during = show_job(&source.url(), &job);
    bed.restore();
    assert_eq!(
        during["state"], "running",
        "the job ended during the cut: {during:#}"
    );
    assert_eq!(
        wait_for_job(&source.url(), &job),
        0,
        "{:#}",
        show_job(&source.url(), &job)
    );
    assert_same_tree(&src, &dst);
    let t = &show_job(&source.url(), &job)["targets"][0];
    // Each package crossed once, or again after the cut: no more than the window over.
    let wire = t["bytes_on_wire"].as_u64().unwrap();
    assert!(wire < 32 * (1 << 20) + 12 * (1 << 20), "{t}");
}

#[test]
#[cfg_attr(
    not(any(ci, root_user)),
    ignore = "needs root for network namespaces and tc"
)]
fn the_bandwidth_limit_holds_while_another_flow_keeps_its_share() {
    // 20 Mbit/s: about 2.4 MB/s of TCP payload; the mirror is held to 400 KiB/s.
    let bed = Bed::up("20mbit");
    let limit = 400.0 * 1024.0;
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    write(&src, "big.bin", &bytes(5, 6 << 20));
    let link = 2_400_000.0;
    let target = App::target(tmp.path())
        .site(&dst)
        .netns(&bed.ns())
        .listen(&format!("{}:0", bed.inner_ip()))
        .spawn();
    let config = write_config_with_target(
        tmp.path(),
        &src,
        &target.url(),
        "package_bytes = 1048576",
        "  bwlimit = \"400KiB/s\"\n",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let sink_addr = format!("{}:9000", bed.inner_ip());
    let (sink, sink_out) = bed.run(&[
        script("flow.py").to_str().unwrap(),
        "sink",
        "--listen",
        &sink_addr,
    ]);
    let _sink = Killed(sink);
    let sender = Command::new("python3")
        .arg(script("flow.py"))
        .args(["send", "--to", &sink_addr, "--seconds", "18"])
        .spawn()
        .unwrap();
    let sender = Killed(sender);
    std::thread::sleep(Duration::from_secs(1));
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_same_tree(&src, &dst);

    assert_paced(&source.url(), job["id"].as_str().unwrap(), limit);

    // The other flow, from what its receiver counted: it kept the rest of the link.
    drop(sender);
    let counts: Vec<(f64, f64)> = sink_out
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            let (t, n) = l.split_once(' ')?;
            Some((t.parse().ok()?, n.parse().ok()?))
        })
        .collect();
    let between = |lo: f64, hi: f64| {
        let a = counts.iter().find(|(t, _)| *t >= lo)?;
        let b = counts.iter().rfind(|(t, _)| *t <= hi)?;
        Some((b.1 - a.1) / (b.0 - a.0))
    };
    let other = between(3.0, 12.0).expect("the sink's counts");
    assert!(
        other >= (link - limit) * 0.6,
        "the other flow got {other:.0} B/s beside the mirror"
    );
}

#[test]
#[cfg_attr(
    not(any(ci, root_user)),
    ignore = "needs root for network namespaces and tc"
)]
fn the_bandwidth_limit_holds_across_a_long_round_trip() {
    // 1 s each way: at the limit's package size (64 KiB), a window of 8 packages is 1.3 s
    // of sending, less than one round trip, so the window must hold more of them.
    let bed = Bed::up("20mbit");
    let limit = 400.0 * 1024.0;
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    write(&src, "big.bin", &bytes(7, 8 << 20));
    let target = App::target(tmp.path()).site(&dst).netns(&bed.ns()).spawn();
    let (url, _proxy) = bed.delayed(&target.addr, 1000);
    let config = write_config_with_target(
        tmp.path(),
        &src,
        &url,
        "package_bytes = 1048576",
        "  bwlimit = \"400KiB/s\"\n",
    );
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_same_tree(&src, &dst);
    assert_paced(&source.url(), job["id"].as_str().unwrap(), limit);
}

/// What the job's source counted sent at each progress event: over every span of 10 s
/// or more until all was sent (then the last acknowledgements are on their way), within
/// a few percent of the limit and never above it.
fn assert_paced(source: &str, job: &str, limit: f64) {
    let mut points: Vec<(f64, f64)> = events(source, job)
        .into_iter()
        .filter(|e| e["kind"] == "progress")
        .map(|e| (at(&e), e["data"]["bytes_on_wire"].as_f64().unwrap()))
        .collect();
    let all = points.last().map_or(0.0, |p| p.1);
    points.truncate(points.iter().position(|p| p.1 >= all).map_or(0, |i| i + 1));
    let mut spans = 0;
    for (i, (t1, b1)) in points.iter().enumerate() {
        for (t2, b2) in &points[i + 1..] {
            if t2 - t1 >= 10.0 {
                let rate = (b2 - b1) / (t2 - t1);
                assert!(
                    rate <= limit * 1.05 && rate >= limit * 0.9,
                    "{rate:.0} B/s over {:.1} s from {:.1} s into the job against a limit of \
                     {limit}; (s, bytes on the wire) at each progress event: {:?}",
                    t2 - t1,
                    t1 - points[0].0,
                    points
                        .iter()
                        .map(|(t, b)| (((t - points[0].0) * 10.0).round() / 10.0, *b as u64))
                        .collect::<Vec<_>>()
                );
                spans += 1;
            }
        }
    }
    assert!(spans > 0, "the job was too short to measure: {points:?}");
}
