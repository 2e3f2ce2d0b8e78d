//! Shared helpers: the service binaries as real processes, generated trees, and tree
//! snapshots for exact comparison.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Directory of the workspace's built binaries; builds them once per test binary, with
/// the services' fault injection (`failpoints`), which release builds leave out.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "mirror-source",
                "-p",
                "mirror-target",
                "-p",
                "mirrorctl",
                "--features",
                "mirror-source/failpoints,mirror-target/failpoints",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(st.success(), "building the service binaries failed");
        let exe = std::env::current_exe().expect("test exe path");
        exe.parent()
            .and_then(|p| p.parent())
            .expect("target/debug")
            .to_path_buf()
    })
}

/// A service process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Proc {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A service process to start, zero2prod's `spawn_app` as a builder: every test starts
/// its processes with it and sets only what it is about, e.g.
/// `App::target(dir).site(&dst).spawn()` or
/// `App::source(dir, &config).env("CMS_MIRROR_FAILPOINT_CORRUPT_SEQ", "2").spawn()`.
/// The process's log goes to a fresh file in `dir`; `spawn` waits until it listens.
pub struct App {
    bin: &'static str,
    dir: PathBuf,
    listen: Option<String>,
    durability: Option<&'static str>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    netns: Option<String>,
}

impl App {
    /// Any of the binaries, with only the arguments given.
    pub fn new(bin: &'static str, dir: &Path) -> App {
        App {
            bin,
            dir: dir.to_path_buf(),
            listen: None,
            durability: None,
            args: Vec::new(),
            env: Vec::new(),
            netns: None,
        }
    }

    /// mirror-target on a free port, its data in `dir/target-data`, with `fsync`
    /// durability (the same guarantees as `syncfs`, cheaper for the tests' small trees).
    pub fn target(dir: &Path) -> App {
        let mut app = App::new("mirror-target", dir);
        app.listen = Some("127.0.0.1:0".into());
        app.durability = Some("fsync");
        app.arg("--data-dir").arg(dir.join("target-data"))
    }

    /// mirror-source on a free port with `config`, its data in `dir/source-data`, and a
    /// 3-second job lease (so that tests of a lost instance end quickly).
    pub fn source(dir: &Path, config: &Path) -> App {
        let mut app = App::new("mirror-source", dir);
        app.listen = Some("127.0.0.1:0".into());
        app.args(&["--config", path_str(config)])
            .arg("--data-dir")
            .arg(dir.join("source-data"))
            .args(&["--lease-secs", "3"])
    }

    /// The target's site `main`, served from `root`.
    pub fn site(self, root: &Path) -> App {
        self.arg(format!("--site=main={}", root.display()))
    }

    /// The target's sites from a `target.toml` (hooks, pushes, base URLs), with the
    /// service's default durability.
    pub fn config(mut self, toml: &Path) -> App {
        self.durability = None;
        self.args(&["--config", path_str(toml)])
    }

    /// Listen on `addr` instead of a free port (a restart on the port it had).
    pub fn listen(mut self, addr: &str) -> App {
        self.listen = Some(addr.into());
        self
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> App {
        self.args
            .push(arg.as_ref().to_str().expect("UTF-8 argument").into());
        self
    }

    pub fn args(self, args: &[&str]) -> App {
        args.iter().fold(self, |app, a| app.arg(a))
    }

    pub fn env(mut self, key: &str, value: &str) -> App {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Run in the network namespace `ns` (`ip netns exec`, which execs the binary: the
    /// child is the service itself).
    pub fn netns(mut self, ns: &str) -> App {
        self.netns = Some(ns.into());
        self
    }

    pub fn envs(self, env: &[(&str, &str)]) -> App {
        env.iter().fold(self, |app, (k, v)| app.env(k, v))
    }

    /// Starts the process and waits until it prints "... listening on ADDR".
    pub fn spawn(self) -> Proc {
        let role = self.bin.trim_start_matches("mirror-");
        let log = self.dir.join(format!("{role}-{}.log", stamp()));
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin_dir().join(self.bin));
                c
            }
            None => Command::new(bin_dir().join(self.bin)),
        };
        if let Some(listen) = &self.listen {
            cmd.args(["--listen", listen]);
        }
        if let Some(durability) = self.durability {
            cmd.args(["--durability", durability]);
        }
        let mut child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.split("listening on ").nth(1) {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not start: {}",
                    self.bin,
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Proc { child, addr }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn stamp() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Polls `probe` every 20 ms until it returns `Ok`: tests wait for a state, never for
/// a fixed time. `Err` says what is still missing; when `timeout` passes first, the test
/// fails with the last such message.
pub fn wait_until<T>(timeout: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() >= deadline => {
                panic!("still not there after {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// [`wait_until`] for a probe that is async.
pub async fn wait_for<T, F>(timeout: Duration, mut probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("still not there after {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// `Ok(())` when `cond` holds, else `Err(why)`: a probe for [`wait_until`].
pub fn ready(cond: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(why()) }
}

/// A job's stored events, as `mirrorctl watch JOB --json` replays them.
pub fn events(source_url: &str, job: &str) -> Vec<serde_json::Value> {
    let out = mirrorctl(source_url, &["watch", job, "--json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A free loopback port (bound, then released).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// GET over plain HTTP/1.0; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, path, &[]);
    (status, body)
}

/// GET over plain HTTP/1.0 with extra request headers (a `Host` among them replaces
/// the address); returns (status, response head, body).
pub fn http_request(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    (status, head.to_string(), body.to_string())
}

/// A response header's value (case-insensitive name) from a response head.
#[allow(dead_code)] // the page suite's (it includes these helpers)
pub fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Writes a mirror.toml with one channel `site` and the given extra channel keys.
pub fn write_config(dir: &Path, source: &Path, target_url: &str, extra: &str) -> PathBuf {
    let p = dir.join("mirror.toml");
    std::fs::write(
        &p,
        format!(
            "[[channel]]\nname = \"site\"\nsource = \"{}\"\n{}{}{extra}\n\n  [[channel.target]]\n  name = \"web1\"\n  url = \"{target_url}\"\n  site = \"main\"\n",
            source.display(),
            if extra.contains("package_bytes") { "" } else { "package_bytes = 65536\n" },
            if extra.contains("retry_budget") { "" } else { "retry_budget = 2\n" },
        ),
    )
    .unwrap();
    p
}

/// [`write_config`], with `target` (indented keys, e.g. `  bwlimit = "2MiB/s"\n`) added to
/// its target's table.
pub fn write_config_with_target(
    dir: &Path,
    source: &Path,
    target_url: &str,
    extra: &str,
    target: &str,
) -> PathBuf {
    let config = write_config(dir, source, target_url, extra);
    let text = std::fs::read_to_string(&config).unwrap() + target;
    std::fs::write(&config, text).unwrap();
    config
}

/// Runs mirrorctl against a source.
pub fn mirrorctl(source_url: &str, args: &[&str]) -> Output {
    mirrorctl_env(source_url, &[], args)
}

/// Runs mirrorctl with extra environment variables (and no inherited MIRROR_TOKEN).
pub fn mirrorctl_env(source_url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(bin_dir().join("mirrorctl"))
        .env_remove("MIRROR_TOKEN")
        .arg("--source")
        .arg(source_url)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run mirrorctl")
}

/// The job printed (pretty JSON, after any event lines) by `start --wait --json`.
pub fn job_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let start = stdout.find("{\n").unwrap_or_else(|| {
        panic!(
            "no job JSON in mirrorctl output: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(&stdout[start..]).expect("job JSON")
}

/// `mirrorctl show JOB --json`.
pub fn show_job(source_url: &str, job: &str) -> serde_json::Value {
    serde_json::from_slice(&mirrorctl(source_url, &["show", job, "--json"]).stdout)
        .expect("job JSON")
}

pub fn wait_for_job(source_url: &str, job: &str) -> i32 {
    let out = mirrorctl(source_url, &["watch", job]);
    out.status.code().unwrap_or(-1)
}

/// Waits for the job to end and asserts it succeeded (showing the job when not).
pub fn assert_succeeds(source_url: &str, job: &str) {
    assert_eq!(
        wait_for_job(source_url, job),
        0,
        "{:#}",
        show_job(source_url, job)
    );
}

pub fn start_job(source_url: &str) -> String {
    let out = mirrorctl(source_url, &["start", "site"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until the job's first target acknowledged at least `n` packages.
pub fn wait_acked(source_url: &str, job: &str, n: u64) {
    wait_until(Duration::from_secs(60), || {
        let j = show_job(source_url, job);
        assert!(
            j["state"] != "succeeded" && j["state"] != "failed",
            "job ended too early: {j:#}"
        );
        let acked = j["targets"][0]["packages_acked"].as_u64().unwrap_or(0);
        ready(acked >= n, || {
            format!("job {job} has {acked} acks, not {n}")
        })
    })
}

/// `mirrorctl jobs --json`: the jobs, newest first.
pub fn jobs(source_url: &str) -> Vec<serde_json::Value> {
    let out = mirrorctl(source_url, &["jobs", "--json", "--limit", "100"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
        .as_array()
        .unwrap()
        .clone()
}

/// Starts a job and waits for it; returns (exit code, the job as JSON).
pub fn run_job(source_url: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["start", "site", "--wait", "--json"];
    args.extend_from_slice(extra);
    let out = mirrorctl(source_url, &args);
    (out.status.code().unwrap_or(-1), job_of(&out))
}

/// One entry of a tree snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    /// BLAKE3 of a file, or the target of a symlink.
    pub content: String,
}

/// Every item under `root` (not the root itself, nor a target's trace file and
/// short-lived files at its top: they are the target's own, not content), by relative
/// path.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Node>) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            // The target's own files at the top: its trace, and the short-lived names
            // beside its staging directory (a trace being replaced while a job commits).
            let staging_side = format!("{}-", cms_mirror::pathsafe::STAGING_DIR);
            if rel.is_empty()
                && (name == cms_mirror::pathsafe::TRACE_FILE || name.starts_with(&staging_side))
            {
                continue;
            }
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(root.join(&r)).unwrap();
            let ft = md.file_type();
            let (kind, content) = if ft.is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(root.join(&r))
                        .unwrap()
                        .display()
                        .to_string(),
                )
            } else if ft.is_dir() {
                ("dir", String::new())
            } else if ft.is_file() {
                (
                    "file",
                    blake3::hash(&std::fs::read(root.join(&r)).unwrap())
                        .to_hex()
                        .to_string(),
                )
            } else {
                ("special", String::new())
            };
            out.insert(
                r.clone(),
                Node {
                    kind,
                    mode: if kind == "symlink" {
                        0
                    } else {
                        md.permissions().mode() & 0o7777
                    },
                    mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                    size: if kind == "file" { md.len() } else { 0 },
                    content,
                },
            );
            if kind == "dir" {
                walk(root, &r, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// Asserts two trees are identical in paths, kinds, bytes, modes, mtimes and links.
pub fn assert_same_tree(src: &Path, dst: &Path) {
    let a = snapshot(src);
    let b = snapshot(dst);
    let only_a: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_b: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "only in source: {only_a:?}; only in target: {only_b:?}"
    );
    for (k, na) in &a {
        assert_eq!(Some(na), b.get(k), "item {k:?} differs");
    }
}

/// Sets an mtime (seconds + nanos) on a path without following symlinks.
pub fn set_mtime(p: &Path, secs: i64, nanos: u32) {
    let t = filetime::FileTime::from_unix_time(secs, nanos);
    filetime::set_symlink_file_times(p, t, t).unwrap();
}

pub fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The tree every e2e test starts from: nested dirs, an empty dir, a symlink, a file
/// larger than three packages (64 KiB each), a zero-byte file, non-ASCII and
/// space-containing names, varied modes and mtimes (with nanoseconds).
pub fn make_tree(root: &Path) -> usize {
    std::fs::create_dir_all(root).unwrap();
    write(root, "index.html", b"<h1>home</h1>");
    write(root, "a/b/c/deep.txt", b"deep");
    write(root, "a/b/page two.html", &bytes(1, 5000));
    write(
        root,
        "a/übersicht.json",
        "{\"title\":\"Übersicht ✓\"}".as_bytes(),
    );
    write(root, "media/big.bin", &bytes(2, 300_000));
    write(root, "media/zero.bin", b"");
    write(root, "docs/readme.md", &bytes(3, 10_000));
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    std::os::unix::fs::symlink("../index.html", root.join("a/link-to-index")).unwrap();
    std::os::unix::fs::symlink("media", root.join("media-link")).unwrap();
    std::fs::set_permissions(
        root.join("docs/readme.md"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("a/b/page two.html"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let mut n = 0;
    for (i, (k, _)) in snapshot(root).iter().rev().enumerate() {
        set_mtime(&root.join(k), 1_700_000_000 + i as i64 * 1000, 123_456_789);
        n += 1;
    }
    n
}

/// Many small files in nested directories, plus a few that span packages.
pub fn make_many(root: &Path, n: usize) {
    for i in 0..n {
        write(
            root,
            &format!("d{}/e{}/f{i}.html", i % 17, i % 5),
            &bytes(i as u64, 500 + (i * 37) % 4000),
        );
    }
    for i in 0..3 {
        write(root, &format!("media/v{i}.bin"), &bytes(1000 + i, 200_000));
    }
}

/// A source tree, a target process serving `dst`, and a source process with a channel
/// `site` from `src` to it (`extra` adds channel keys).
pub struct Mirror {
    pub tmp: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub config: PathBuf,
    pub target: Proc,
    pub source: Proc,
}

impl Mirror {
    pub fn start<R>(fill: impl FnOnce(&Path) -> R, extra: &str) -> Mirror {
        Mirror::start_with(fill, extra, &[])
    }

    /// [`Mirror::start`] with `target_args` added to mirror-target's command line.
    pub fn start_with<R>(
        fill: impl FnOnce(&Path) -> R,
        extra: &str,
        target_args: &[&str],
    ) -> Mirror {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fill(&src);
        let target = App::target(tmp.path()).site(&dst).args(target_args).spawn();
        let config = write_config(tmp.path(), &src, &target.url(), extra);
        let source = App::source(tmp.path(), &config).spawn();
        Mirror {
            tmp,
            src,
            dst,
            config,
            target,
            source,
        }
    }
}

/// The value of one sample (`name{labels}`) on a /metrics page.
pub fn metric(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Bytes a target wrote with direct I/O for site "main" (0 before the first), read from
/// its /metrics page at `metrics_addr`; and the page.
pub fn direct_bytes(metrics_addr: &str) -> (f64, String) {
    let (status, page) = http_get(metrics_addr, "/metrics");
    assert_eq!(status, 200, "{page}");
    let n = metric(&page, "mirror_target_bytes_direct_total{site=\"main\"}").unwrap_or(0.0);
    (n, page)
}

/// Everything the processes of `role` ("source", "target", "mirrorctl") started in
/// `dir` logged so far.
pub fn logs(dir: &Path, role: &str) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&format!("{role}-")) && name.ends_with(".log")
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}
