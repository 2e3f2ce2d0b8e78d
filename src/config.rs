//! Configuration files: `mirror.toml` (the source's channels) and `target.toml` (the
//! target's sites). Unknown keys are refused; every error names the file and the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::fswalk::{Filter, Patterns};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: channel {channel:?}: {key}: {problem}")]
    Channel {
        path: PathBuf,
        channel: String,
        key: &'static str,
        problem: Box<Invalid>,
    },
    #[error("config {path}: site {site:?}: {key}: {problem}")]
    Site {
        path: PathBuf,
        site: String,
        key: &'static str,
        problem: Box<Invalid>,
    },
}

/// What is wrong with one value; [`ConfigError`] adds the file, the table and the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("must not be empty")]
    Empty,
    #[error("must be unique and not empty")]
    NotUnique,
    #[error("{0:?} appears twice")]
    Twice(String),
    #[error("{value} is not between {lo} and {hi}")]
    OutOfRange {
        value: String,
        lo: String,
        hi: String,
    },
    #[error("{value:?} is not {expected}")]
    NotAmong { value: String, expected: String },
    #[error("{0:?} is not a number or a percentage")]
    NotCountOrPercent(String),
    #[error("{0:?} is not between 0% and 100%")]
    PercentOutOfRange(String),
    #[error("{value:?} is not a cron expression with seconds (6 fields expected, {fields} found)")]
    CronFields { value: String, fields: usize },
    #[error("{value:?} is not a valid cron expression: {reason}")]
    Cron { value: String, reason: String },
    #[error("{0}")]
    Pattern(String),
    #[error("{0:?} is not an http:// or https:// URL")]
    NotHttpUrl(String),
    #[error("{value:?} is not a rate: {reason} (e.g. \"20MiB/s\", \"500KB/s\", \"100Mbit/s\")")]
    Rate { value: String, reason: String },
    #[error("a channel needs at least one [[channel.target]]")]
    NoTarget,
    #[error("cert_file and key_file go together")]
    IdentityIncomplete,
    #[error("{key} {path}: {error}")]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        error: String,
    },
    #[error("set exactly one of url or command (a non-empty list)")]
    HookKind,
    #[error("headers and header_files go with a url hook, not a command")]
    HeadersOnCommand,
    #[error("{0:?}: expected NAME=DIR")]
    SiteFlag(String),
    #[error("{name}: {problem}")]
    InTarget { name: String, problem: Box<Invalid> },
    #[error("is required with source = \"wagtail+...\" (Wagtail's MEDIA_ROOT)")]
    MediaRootNeeded,
    #[error(
        "is required with source = \"wagtail+...\" (the url_path or id of the subtree's root page, e.g. \"/home/news/\")"
    )]
    RootPageNeeded,
    #[error(
        "belongs to a wagtail source (source = \"wagtail+sqlite://...\" or \"wagtail+postgres://...\")"
    )]
    OnlyForPages,
    #[error("{0:?} is not wagtail+sqlite://PATH or wagtail+postgres://...")]
    PagesUrl(String),
}

/// A key of a table that is wrong, and why.
type KeyError = (&'static str, Invalid);

/// `max_delete`: an absolute count or a percentage of the target's items.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaxDelete {
    Count(u64),
    Percent(f64),
}

impl MaxDelete {
    pub fn parse(s: &str) -> Result<MaxDelete, Invalid> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| Invalid::NotCountOrPercent(s.into()))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(Invalid::PercentOutOfRange(s.into()));
            }
            Ok(MaxDelete::Percent(v))
        } else {
            s.parse()
                .map(MaxDelete::Count)
                .map_err(|_| Invalid::NotCountOrPercent(s.into()))
        }
    }

    /// Largest number of deletes allowed on a target holding `existing` items.
    pub fn limit(&self, existing: u64) -> u64 {
        match *self {
            MaxDelete::Count(n) => n,
            MaxDelete::Percent(p) => ((existing as f64) * p / 100.0).floor() as u64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    S(String),
    N(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    #[serde(default)]
    channel: Vec<RawChannel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    name: String,
    source: String,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    exclude_presets: Vec<String>,
    #[serde(default)]
    last: Vec<String>,
    #[serde(default)]
    delete: bool,
    max_delete: Option<StrOrNum>,
    #[serde(default)]
    allow_empty_source: bool,
    max_lag_secs: Option<u64>,
    max_errors: Option<u64>,
    #[serde(default)]
    checksum: bool,
    schedule: Option<String>,
    package_bytes: Option<u64>,
    window: Option<u32>,
    retry_budget: Option<u32>,
    ack_timeout_secs: Option<u64>,
    on_disk_full: Option<String>,
    publish: Option<String>,
    keep_generations: Option<u32>,
    compression: Option<String>,
    delta: Option<bool>,
    delta_min_bytes: Option<u64>,
    schedule_spread_secs: Option<u64>,
    #[serde(default)]
    watch: bool,
    watch_quiet_ms: Option<u64>,
    media_root: Option<String>,
    root_page: Option<String>,
    include_root: Option<bool>,
    languages: Option<Vec<String>>,
    #[serde(default)]
    target: Vec<RawTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Option<String>,
    url: String,
    site: String,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    bwlimit: Option<String>,
}

/// A target of a channel.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// Unique within the channel; defaults to `SITE@HOST:PORT`.
    pub name: String,
    pub url: String,
    pub site: String,
    /// Token and TLS settings for reaching the target.
    pub auth: crate::security::ClientAuth,
    /// Bytes per second the source sends this target at most (`bwlimit`).
    pub bwlimit: Option<u64>,
}

/// Packages in flight per target unless a channel says otherwise: with 4 MiB packages,
/// enough that the target still has one to stage while earlier ones are made durable and
/// acknowledged (at 4 it waited for packages in about a third of a large-file mirror).
pub const DEFAULT_WINDOW: u32 = 8;

/// The channel's `max_delete` when it sets none: a job that would delete more than a
/// quarter of a target (a source directory half gone, a wrong path) stops before
/// deleting anything.
pub const DEFAULT_MAX_DELETE: MaxDelete = MaxDelete::Percent(25.0);

/// `exclude_presets`: named lists of patterns for what a web root should never carry.
pub const EXCLUDE_PRESETS: [(&str, &[&str]); 2] = [
    // Version control metadata (a directory, or a file in worktrees and submodules).
    (
        "vcs",
        &[
            "**/.git",
            "**/.svn",
            "**/.hg",
            "**/.bzr",
            "**/CVS",
            "**/_darcs",
        ],
    ),
    // Credentials and keys that are sometimes left in a web root.
    (
        "secrets",
        &[
            "**/.env",
            "**/.env.*",
            "**/.git-credentials",
            "**/.netrc",
            "**/.npmrc",
            "**/.pypirc",
            "**/.htpasswd",
            "**/.ssh",
            "**/id_rsa",
            "**/id_dsa",
            "**/id_ecdsa",
            "**/id_ed25519",
            "**/*.key",
        ],
    ),
];

/// A channel: what to mirror from where to which targets.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    pub name: String,
    /// Source directory of the channel's files: the `fs` provider's tree, or a wagtail
    /// source's `media_root` (its original images and documents).
    pub source: PathBuf,
    /// The CMS pages of a `wagtail+...` source.
    pub pages: Option<PagesConfig>,
    pub include: Vec<String>,
    /// The `exclude` patterns, then those of the `exclude_presets`.
    pub exclude: Vec<String>,
    pub filter: Filter,
    /// Items applied after the rest of the content (indexes, sitemaps, feeds).
    pub last: Patterns,
    pub delete: bool,
    pub max_delete: MaxDelete,
    /// Mirror an empty source directory (and delete the targets' content with it).
    pub allow_empty_source: bool,
    /// A target whose last success is older than this is reported as lagging.
    pub max_lag_secs: Option<u64>,
    pub max_errors: Option<u64>,
    pub checksum: bool,
    pub schedule: Option<String>,
    pub package_bytes: usize,
    /// Packages in flight per target.
    pub window: u32,
    /// Reconnect attempts per target before the target is given up.
    pub retry_budget: u32,
    /// Packages in flight and no ack for this long: the target is hung, reconnect.
    pub ack_timeout: std::time::Duration,
    pub on_disk_full: OnDiskFull,
    /// How a job's content reaches the targets' readers.
    pub publish: Publish,
    /// Generations each target keeps for rollback (the live one included), with
    /// `publish = "atomic"`.
    pub keep_generations: u32,
    /// Package compression on the wire (`none` by default: on a fast link zstd costs
    /// more time than it saves; see PERF-NOTES).
    pub compression: crate::pb::Compression,
    /// Files of at least this size that the target holds in another version are sent as
    /// a delta against it (`delta_min_bytes`); `None` with `delta = false`.
    pub delta_min_bytes: Option<u64>,
    /// Schedules fire at their cron times plus an offset in [0, spread) chosen once per
    /// installation (seed 002: many installations spread their load).
    pub schedule_spread: std::time::Duration,
    /// Start an incremental job when the source directory changes (after `watch_quiet`
    /// without further changes).
    pub watch: bool,
    pub watch_quiet: std::time::Duration,
    pub targets: Vec<TargetConfig>,
}

/// Where a channel's CMS pages come from.
#[derive(Clone, Debug)]
pub struct PagesConfig {
    /// The CMS database (`sqlite://...` or `postgres://...`, without `wagtail+`); may
    /// hold a password.
    pub url: crate::db::SecretUrl,
    pub subtree: crate::wagtail::Subtree,
}

/// Files of a Wagtail site a channel mirrors unless it says otherwise: the originals of
/// images and documents (renditions are made by the CMS, not mirrored).
pub const WAGTAIL_MEDIA: [&str; 2] = ["original_images/**", "documents/**"];

/// How a job's content reaches the targets' readers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Publish {
    /// Package by package into the served tree (the default): readers see each file
    /// as soon as it lands.
    #[default]
    InPlace,
    /// Into a new generation beside the served tree on every target; all targets switch
    /// to it together once every one has it whole (two-phase commit), or none does.
    Atomic,
}

/// The default [`ChannelConfig::keep_generations`].
pub const DEFAULT_KEEP_GENERATIONS: u32 = 3;

/// What a job does when a target runs out of space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDiskFull {
    /// The target fails with a clear error (the default); a later job completes once
    /// space is freed.
    Fail,
    /// The job waits (retrying the package with backoff) until space is freed or the
    /// job is cancelled.
    Wait,
}

/// The data directory a service uses: the one given, else `name` beside its
/// configuration file (not in whatever directory the service was started from, which
/// under an init system is `/`), else `name` in the working directory.
pub fn data_dir(given: Option<&Path>, config: Option<&Path>, name: &str) -> std::path::PathBuf {
    match (given, config.and_then(Path::parent)) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(dir)) => dir.join(name),
        (None, None) => Path::new(".").join(name),
    }
}

/// The source's configuration (`mirror.toml`).
#[derive(Clone, Debug, Default)]
pub struct MirrorConfig {
    pub channels: Vec<ChannelConfig>,
}

impl MirrorConfig {
    pub fn load(path: &Path) -> Result<MirrorConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        MirrorConfig::parse(&text, path)
    }

    /// Parses `mirror.toml` text; `path` is used in messages and to resolve relative
    /// source directories (relative to the config file's directory).
    pub fn parse(text: &str, path: &Path) -> Result<MirrorConfig, ConfigError> {
        let raw: RawMirror = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut channels: Vec<ChannelConfig> = Vec::new();
        for c in raw.channel {
            let channel = c.name.clone();
            let err = |(key, problem): KeyError| ConfigError::Channel {
                path: path.to_path_buf(),
                channel: channel.clone(),
                key,
                problem: Box::new(problem),
            };
            if c.name.is_empty() || channels.iter().any(|x| x.name == c.name) {
                return Err(err(("name", Invalid::NotUnique)));
            }
            channels.push(channel_config(c, base).map_err(err)?);
        }
        Ok(MirrorConfig { channels })
    }

    pub fn channel(&self, name: &str) -> Option<&ChannelConfig> {
        self.channels.iter().find(|c| c.name == name)
    }
}

/// Checks `value` of `key` against its allowed range.
fn in_range<T>(
    key: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, KeyError>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        return Ok(value);
    }
    let (lo, hi) = range.into_inner();
    let (value, lo, hi) = (value.to_string(), lo.to_string(), hi.to_string());
    Err((key, Invalid::OutOfRange { value, lo, hi }))
}

/// One of two words for a key (`None` is the first).
fn one_of<T: Copy>(
    key: &'static str,
    value: Option<&str>,
    words: [(&'static str, T); 2],
) -> Result<T, KeyError> {
    match value {
        None => Ok(words[0].1),
        Some(v) => words
            .iter()
            .find(|(w, _)| *w == v)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let value = v.to_string();
                let expected = format!("{:?} or {:?}", words[0].0, words[1].0);
                (key, Invalid::NotAmong { value, expected })
            }),
    }
}

/// The pages source of a channel and the directory of its files: `source` itself for
/// the `fs` provider, `media_root` for a wagtail source.
fn pages_config(
    c: &mut RawChannel,
    base: &Path,
) -> Result<(Option<PagesConfig>, PathBuf), KeyError> {
    let Some(url) = c.source.strip_prefix("wagtail+") else {
        for (key, set) in [
            ("media_root", c.media_root.is_some()),
            ("root_page", c.root_page.is_some()),
            ("include_root", c.include_root.is_some()),
            ("languages", c.languages.is_some()),
        ] {
            if set {
                return Err((key, Invalid::OnlyForPages));
            }
        }
        return Ok((None, base.join(&c.source)));
    };
    let url = match url.strip_prefix("sqlite://") {
        // A relative SQLite path is relative to the config file, as source directories are.
        Some(path) if !path.starts_with('/') => format!("sqlite://{}", base.join(path).display()),
        Some(_) => url.to_string(),
        None if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            url.to_string()
        }
        None => return Err(("source", Invalid::PagesUrl(crate::db::redact(&c.source)))),
    };
    let media_root = c
        .media_root
        .as_ref()
        .ok_or(("media_root", Invalid::MediaRootNeeded))?;
    if c.include.is_empty() {
        c.include = WAGTAIL_MEDIA.iter().map(|s| s.to_string()).collect();
    }
    let subtree = crate::wagtail::Subtree {
        root: c
            .root_page
            .clone()
            .ok_or(("root_page", Invalid::RootPageNeeded))?,
        include_root: c.include_root.unwrap_or(true),
        languages: c.languages.clone().unwrap_or_default(),
        only: Vec::new(),
    };
    let pages = PagesConfig {
        url: crate::db::SecretUrl::new(url),
        subtree,
    };
    Ok((Some(pages), base.join(media_root)))
}

/// Checks one `[[channel]]` table; relative paths are resolved against `base`.
fn channel_config(mut c: RawChannel, base: &Path) -> Result<ChannelConfig, KeyError> {
    let (pages, source) = pages_config(&mut c, base)?;
    let pat =
        |key, p: &[String]| Patterns::new(p).map_err(|e| (key, Invalid::Pattern(e.to_string())));
    for name in &c.exclude_presets {
        let Some((_, pats)) = EXCLUDE_PRESETS.iter().find(|(n, _)| n == name) else {
            let expected = EXCLUDE_PRESETS.map(|(n, _)| format!("{n:?}")).join(" or ");
            let value = name.clone();
            return Err(("exclude_presets", Invalid::NotAmong { value, expected }));
        };
        c.exclude.extend(pats.iter().map(|p| p.to_string()));
    }
    let (include, exclude, last) = (
        pat("include", &c.include)?,
        pat("exclude", &c.exclude)?,
        pat("last", &c.last)?,
    );
    let max_delete = match &c.max_delete {
        None => DEFAULT_MAX_DELETE,
        Some(StrOrNum::N(n)) => MaxDelete::Count(*n),
        Some(StrOrNum::S(s)) => MaxDelete::parse(s).map_err(|m| ("max_delete", m))?,
    };
    if let Some(s) = &c.schedule {
        parse_cron(s).map_err(|m| ("schedule", m))?;
    }
    let package_bytes = c
        .package_bytes
        .unwrap_or(crate::package::DEFAULT_PACKAGE_BYTES as u64);
    let package_bytes = in_range("package_bytes", package_bytes, 1024..=32 * 1024 * 1024)?;
    let window = in_range("window", c.window.unwrap_or(DEFAULT_WINDOW), 1..=64)?;
    let ack_timeout_secs = in_range(
        "ack_timeout_secs",
        c.ack_timeout_secs.unwrap_or(60),
        1..=3600,
    )?;
    let on_disk_full = one_of(
        "on_disk_full",
        c.on_disk_full.as_deref(),
        [("fail", OnDiskFull::Fail), ("wait", OnDiskFull::Wait)],
    )?;
    let publish = one_of(
        "publish",
        c.publish.as_deref(),
        [("in_place", Publish::InPlace), ("atomic", Publish::Atomic)],
    )?;
    let keep_generations = in_range(
        "keep_generations",
        c.keep_generations.unwrap_or(DEFAULT_KEEP_GENERATIONS),
        1..=1000,
    )?;
    let compression = one_of(
        "compression",
        c.compression.as_deref(),
        [
            ("none", crate::pb::Compression::None),
            ("zstd", crate::pb::Compression::Zstd),
        ],
    )?;
    let delta_min_bytes = in_range(
        "delta_min_bytes",
        c.delta_min_bytes.unwrap_or(DEFAULT_DELTA_MIN_BYTES),
        DEFAULT_DELTA_MIN_BYTES..=u64::MAX,
    )?;
    if c.target.is_empty() {
        return Err(("target", Invalid::NoTarget));
    }
    let targets = targets_config(c.target, base)?;
    Ok(ChannelConfig {
        name: c.name,
        source,
        pages,
        include: c.include,
        exclude: c.exclude,
        filter: Filter::new(include, exclude),
        last,
        delete: c.delete,
        max_delete,
        allow_empty_source: c.allow_empty_source,
        max_lag_secs: c.max_lag_secs,
        max_errors: c.max_errors,
        checksum: c.checksum,
        schedule: c.schedule,
        package_bytes: package_bytes as usize,
        window,
        retry_budget: c.retry_budget.unwrap_or(8),
        ack_timeout: std::time::Duration::from_secs(ack_timeout_secs),
        on_disk_full,
        publish,
        keep_generations,
        compression,
        delta_min_bytes: c.delta.unwrap_or(true).then_some(delta_min_bytes),
        schedule_spread: std::time::Duration::from_secs(c.schedule_spread_secs.unwrap_or(300)),
        watch: c.watch,
        watch_quiet: std::time::Duration::from_millis(c.watch_quiet_ms.unwrap_or(2000).max(50)),
        targets,
    })
}

/// Checks a channel's `[[channel.target]]` tables; names must be unique.
fn targets_config(raw: Vec<RawTarget>, base: &Path) -> Result<Vec<TargetConfig>, KeyError> {
    let mut targets: Vec<TargetConfig> = Vec::new();
    for t in raw {
        let t = target_config(t, base)?;
        if targets.iter().any(|x| x.name == t.name) {
            return Err(("target.name", Invalid::Twice(t.name)));
        }
        targets.push(t);
    }
    Ok(targets)
}

/// Checks one `[[channel.target]]` table.
fn target_config(t: RawTarget, base: &Path) -> Result<TargetConfig, KeyError> {
    if !http_url(&t.url) {
        return Err(("target.url", Invalid::NotHttpUrl(t.url)));
    }
    if t.site.is_empty() {
        return Err(("target.site", Invalid::Empty));
    }
    let name = t.name.unwrap_or_else(|| {
        let host = t
            .url
            .split("://")
            .nth(1)
            .unwrap_or(&t.url)
            .trim_end_matches('/');
        format!("{}@{}", t.site, host)
    });
    let auth =
        client_auth(base, t.token_file, t.ca_file, t.cert_file, t.key_file).map_err(|m| {
            let problem = Box::new(m);
            let name = name.clone();
            ("target", Invalid::InTarget { name, problem })
        })?;
    let bwlimit = match &t.bwlimit {
        None => None,
        Some(r) => Some(parse_rate(r).map_err(|m| ("target.bwlimit", m))?),
    };
    Ok(TargetConfig {
        name,
        url: t.url,
        site: t.site,
        auth,
        bwlimit,
    })
}

/// The default [`ChannelConfig::delta_min_bytes`], also the least it may be: below it a
/// file's signatures and the round trip to fetch them weigh about what sending it whole
/// does. Not higher: a site's changed images and documents are mostly 50 KiB-1 MiB, and
/// with 1 MiB the mixed dataset's 1% edit sent 3.1x rsync -z's bytes (1.3x with this),
/// slower at 100 Mbit/s as well as at 20 Mbit/s.
pub const DEFAULT_DELTA_MIN_BYTES: u64 = 64 * 1024;

/// Parses a transfer rate into bytes per second: a size per second in bytes ("20MiB/s",
/// "500KB/s", "1048576", the "/s" optional) or in bits ("100Mbit/s", "512kbit").
pub fn parse_rate(s: &str) -> Result<u64, Invalid> {
    let bad = |reason: &str| Invalid::Rate {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let bytes = if let Some(n) = t.strip_suffix("bit").or_else(|| t.strip_suffix("bps")) {
        let (num, scale) = match n.trim().char_indices().last() {
            Some((i, 'k' | 'K')) => (&n[..i], 1e3),
            Some((i, 'M')) => (&n[..i], 1e6),
            Some((i, 'G')) => (&n[..i], 1e9),
            _ => (n, 1.0),
        };
        let v: f64 = num.trim().parse().map_err(|_| bad("not a number"))?;
        (v * scale / 8.0) as u64
    } else {
        t.parse::<bytesize::ByteSize>()
            .map_err(|e| bad(&e.to_string()))?
            .as_u64()
    };
    if bytes < 1024 {
        return Err(bad("below 1 KiB per second"));
    }
    Ok(bytes)
}

/// Parses a cron expression with seconds (six fields: sec min hour day month weekday).
pub fn parse_cron(s: &str) -> Result<croner::Cron, Invalid> {
    let fields = s.split_whitespace().count();
    if fields != 6 {
        let value = s.into();
        return Err(Invalid::CronFields { value, fields });
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(s)
        .map_err(|e| Invalid::Cron {
            value: s.into(),
            reason: e.to_string(),
        })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetFile {
    #[serde(default)]
    site: Vec<RawSite>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    root: PathBuf,
    base_url: Option<String>,
    links: Option<String>,
    pages_root: Option<String>,
    #[serde(default)]
    hook: Vec<RawHook>,
    #[serde(default)]
    push: Vec<RawPush>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPush {
    source: String,
    channel: String,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// Token and TLS files of a client entry, relative to the config file's directory.
fn client_auth(
    base: &Path,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> Result<crate::security::ClientAuth, Invalid> {
    if cert_file.is_some() != key_file.is_some() {
        return Err(Invalid::IdentityIncomplete);
    }
    // Read again per job (a rotated token is picked up), but a file missing from the
    // start is a mistake to report now, not at the first job.
    let readable = |key: &'static str, p: Option<PathBuf>| match p.map(|p| base.join(p)) {
        Some(path) => match std::fs::File::open(&path) {
            Ok(_) => Ok(Some(path)),
            Err(e) => Err(Invalid::Unreadable {
                key,
                path,
                error: e.to_string(),
            }),
        },
        None => Ok(None),
    };
    Ok(crate::security::ClientAuth {
        token_file: readable("token_file", token_file)?,
        token: None,
        ca_file: readable("ca_file", ca_file)?,
        cert_file: readable("cert_file", cert_file)?,
        key_file: readable("key_file", key_file)?,
    })
}

/// After a committed import, start `channel` on another source service (a tier-1
/// mirror pushing to tier 2, seed 002 point 5).
#[derive(Clone, Debug)]
pub struct Push {
    pub source: String,
    pub channel: String,
    pub auth: crate::security::ClientAuth,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    url: Option<String>,
    command: Option<Vec<String>>,
    timeout_secs: Option<u64>,
    retries: Option<u32>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    header_files: std::collections::BTreeMap<String, PathBuf>,
}

/// A cache invalidation hook run after a job is committed.
#[derive(Clone, Debug)]
pub enum Hook {
    Http {
        url: String,
        timeout_secs: u64,
        retries: u32,
        /// Extra request headers (a purge API's options).
        headers: Vec<(String, String)>,
        /// Headers whose value is the first line of a file, read at each run (a purge
        /// API's key, kept out of the configuration and rotated without a restart).
        header_files: Vec<(String, PathBuf)>,
    },
    Command {
        argv: Vec<String>,
        timeout_secs: u64,
        retries: u32,
    },
}

/// A site the target serves.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    pub name: String,
    pub root: PathBuf,
    pub base_url: Option<String>,
    pub links: Links,
    /// The URL path under which the site's CMS pages are served (`/` by default;
    /// always starting and ending with `/`).
    pub pages_root: String,
    pub hooks: Vec<Hook>,
    pub push: Vec<Push>,
}

/// `pages_root` as a path that starts and ends with `/`.
fn pages_root(v: Option<&str>) -> Result<String, Invalid> {
    let v = v.unwrap_or("/");
    let inner = v.trim_matches('/');
    if inner.split('/').any(|c| c == "." || c == "..") || v.contains(['?', '#', '\\']) {
        return Err(Invalid::NotAmong {
            value: v.into(),
            expected: "a URL path such as \"/\" or \"/archive/\"".into(),
        });
    }
    Ok(if inner.is_empty() {
        "/".into()
    } else {
        format!("/{inner}/")
    })
}

/// What a target does with a symbolic link whose target leaves the site (absolute, or
/// climbing above the root with `..`), as rsync's `--safe-links` decides: the target
/// never follows links, but a web server in front of the site may.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Links {
    /// Refused, an item error naming the link (the default).
    #[default]
    Safe,
    /// Created as sent.
    Copy,
    /// Left out without an error.
    Skip,
}

impl Links {
    fn parse(s: Option<&str>) -> Result<Links, Invalid> {
        match s {
            None | Some("safe") => Ok(Links::Safe),
            Some("copy") => Ok(Links::Copy),
            Some("skip") => Ok(Links::Skip),
            Some(v) => Err(Invalid::NotAmong {
                value: v.into(),
                expected: r#""safe", "copy" or "skip""#.into(),
            }),
        }
    }
}

impl SiteConfig {
    /// Parses the `--site NAME=DIR` short form.
    pub fn from_flag(s: &str) -> Result<SiteConfig, Invalid> {
        let (name, dir) = s
            .split_once('=')
            .filter(|(n, d)| !n.is_empty() && !d.is_empty())
            .ok_or_else(|| Invalid::SiteFlag(s.into()))?;
        Ok(SiteConfig {
            name: name.into(),
            root: dir.into(),
            base_url: None,
            links: Links::default(),
            pages_root: "/".into(),
            hooks: Vec::new(),
            push: Vec::new(),
        })
    }

    /// Loads the sites of a `target.toml`.
    pub fn load_file(path: &Path) -> Result<Vec<SiteConfig>, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawTargetFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        raw.site
            .into_iter()
            .map(|s| {
                let err = |(key, problem): KeyError| ConfigError::Site {
                    path: path.to_path_buf(),
                    site: s.name.clone(),
                    key,
                    problem: Box::new(problem),
                };
                let hooks = s.hook.iter().map(|h| hook_config(h, base));
                let hooks = hooks.collect::<Result<Vec<_>, _>>().map_err(err)?;
                let push = s.push.into_iter().map(|p| push_config(p, base));
                let push = push.collect::<Result<Vec<_>, _>>().map_err(err)?;
                let links = Links::parse(s.links.as_deref()).map_err(|e| err(("links", e)))?;
                let pages_root =
                    pages_root(s.pages_root.as_deref()).map_err(|e| err(("pages_root", e)))?;
                Ok(SiteConfig {
                    root: base.join(&s.root),
                    name: s.name.clone(),
                    base_url: s.base_url.clone(),
                    links,
                    pages_root,
                    hooks,
                    push,
                })
            })
            .collect()
    }
}

/// Whether `u` is an http:// or https:// URL.
fn http_url(u: &str) -> bool {
    (u.starts_with("http://") || u.starts_with("https://"))
        && u.parse::<tonic::transport::Uri>().is_ok()
}

/// Whether `name` can be an HTTP header's name (RFC 9110 token characters).
fn header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks one `[[site.hook]]` table; header files are relative to `base`.
fn hook_config(h: &RawHook, base: &Path) -> Result<Hook, KeyError> {
    let timeout_secs = h.timeout_secs.unwrap_or(10);
    let retries = h.retries.unwrap_or(3);
    let names = h.headers.keys().chain(h.header_files.keys());
    if let Some(bad) = names.clone().find(|n| !header_name(n)) {
        return Err((
            "hook.headers",
            Invalid::NotAmong {
                value: bad.clone(),
                expected: "an HTTP header name".into(),
            },
        ));
    }
    if h.command.is_some() && names.count() > 0 {
        return Err(("hook.headers", Invalid::HeadersOnCommand));
    }
    if let Some(v) = h.headers.values().find(|v| v.contains(['\r', '\n'])) {
        return Err((
            "hook.headers",
            Invalid::NotAmong {
                value: v.clone(),
                expected: "a header value on one line".into(),
            },
        ));
    }
    let mut header_files = Vec::new();
    for (name, path) in &h.header_files {
        let path = base.join(path);
        if let Err(e) = std::fs::File::open(&path) {
            let error = e.to_string();
            return Err((
                "hook.header_files",
                Invalid::Unreadable {
                    key: "header file",
                    path,
                    error,
                },
            ));
        }
        header_files.push((name.clone(), path));
    }
    match (&h.url, &h.command) {
        (Some(u), None) if !http_url(u) => Err(("hook.url", Invalid::NotHttpUrl(u.clone()))),
        (Some(u), None) => Ok(Hook::Http {
            url: u.clone(),
            timeout_secs,
            retries,
            headers: h.headers.clone().into_iter().collect(),
            header_files,
        }),
        (None, Some(argv)) if !argv.is_empty() => Ok(Hook::Command {
            argv: argv.clone(),
            timeout_secs,
            retries,
        }),
        _ => Err(("hook", Invalid::HookKind)),
    }
}

/// Checks one `[[site.push]]` table.
fn push_config(p: RawPush, base: &Path) -> Result<Push, KeyError> {
    if !http_url(&p.source) {
        return Err(("push.source", Invalid::NotHttpUrl(p.source)));
    }
    if p.channel.is_empty() {
        return Err(("push.channel", Invalid::Empty));
    }
    let auth = client_auth(base, p.token_file, p.ca_file, p.cert_file, p.key_file)
        .map_err(|m| ("push", m))?;
    Ok(Push {
        source: p.source,
        channel: p.channel,
        auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<MirrorConfig, ConfigError> {
        MirrorConfig::parse(t, Path::new("/etc/mirror.toml"))
    }

    const OK: &str = r#"
[[channel]]
name = "site"
source = "site"
exclude = ["cache/**"]
max_delete = "10%"
  [[channel.target]]
  url = "http://127.0.0.1:7701"
  site = "main"
"#;

    #[test]
    fn parses_a_channel() {
        let c = parse(OK).unwrap();
        let ch = c.channel("site").unwrap();
        assert_eq!(ch.source, Path::new("/etc/site"));
        assert_eq!(ch.max_delete, MaxDelete::Percent(10.0));
        assert_eq!(ch.targets[0].name, "main@127.0.0.1:7701");
        assert!(ch.filter.excludes("cache/x", crate::model::Kind::File));
    }

    #[test]
    fn defaults_are_safe_and_presets_add_to_exclude() {
        let c = parse(&OK.replace(
            "max_delete = \"10%\"",
            "exclude_presets = [\"vcs\", \"secrets\"]",
        ))
        .unwrap();
        let ch = c.channel("site").unwrap();
        assert_eq!(ch.max_delete, DEFAULT_MAX_DELETE);
        assert!(!ch.allow_empty_source);
        use crate::model::Kind::{Dir, File};
        assert!(
            ch.filter.excludes("cache/x", File),
            "the channel's own pattern stays"
        );
        assert!(ch.filter.excludes(".git", Dir));
        assert!(ch.filter.excludes("themes/a/.git", File));
        assert!(ch.filter.excludes("deploy/.env", File));
        assert!(!ch.filter.excludes("docs/env.md", File));
        let e = parse(&OK.replace("max_delete = \"10%\"", "exclude_presets = [\"cvs\"]"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exclude_presets") && e.contains("\"vcs\" or \"secrets\""),
            "{e}"
        );
    }

    #[test]
    fn hook_headers_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let sites = |hook: &str| {
            let p = dir.path().join("target.toml");
            let text =
                format!("[[site]]\nname = \"main\"\nroot = \"www\"\n[[site.hook]]\n{hook}\n");
            std::fs::write(&p, text).unwrap();
            SiteConfig::load_file(&p)
        };
        std::fs::write(dir.path().join("key"), "k\n").unwrap();
        let ok = sites(
            "url = \"http://cdn\"\nheaders = { \"X-A\" = \"1\" }\nheader_files = { \"X-Key\" = \"key\" }",
        );
        match &ok.unwrap()[0].hooks[0] {
            Hook::Http {
                headers,
                header_files,
                ..
            } => {
                assert_eq!(headers, &[("X-A".to_string(), "1".to_string())]);
                assert_eq!(header_files[0].1, dir.path().join("key"));
            }
            other => panic!("{other:?}"),
        }
        for (hook, says) in [
            (
                "url = \"http://cdn\"\nheaders = { \"Bad Name\" = \"1\" }",
                "an HTTP header name",
            ),
            (
                "url = \"http://cdn\"\nheaders = { \"X-A\" = \"a\\nb\" }",
                "on one line",
            ),
            (
                "command = [\"purge\"]\nheaders = { \"X-A\" = \"1\" }",
                "not a command",
            ),
            (
                "url = \"http://cdn\"\nheader_files = { \"X-Key\" = \"gone\" }",
                "No such file",
            ),
        ] {
            let e = sites(hook).unwrap_err().to_string();
            assert!(
                e.contains("site \"main\"") && e.contains(says),
                "{hook}: {e}"
            );
        }
    }

    #[test]
    fn errors_name_the_channel_and_key() {
        let e = parse(&OK.replace("\"10%\"", "\"lots\"")).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Channel { key: "max_delete", problem, .. }
                if **problem == Invalid::NotCountOrPercent("lots".into())),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(e.contains("channel \"site\": max_delete"), "{e}");
        let e = parse(&OK.replace("cache/**", "cache/["))
            .unwrap_err()
            .to_string();
        assert!(e.contains("channel \"site\": exclude"), "{e}");
        let e = parse(&OK.replace("http://127.0.0.1:7701", "ftp://x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("target.url"), "{e}");
        let e = parse(&OK.replace("site = \"main\"", "site = \"main\"\nbogus = 1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/mirror.toml") && e.contains("bogus"), "{e}");
    }

    #[test]
    fn rates_read_in_bytes_or_bits() {
        assert_eq!(parse_rate("20MiB/s").unwrap(), 20 << 20);
        assert_eq!(parse_rate("20 MiB").unwrap(), 20 << 20);
        assert_eq!(parse_rate("500KB/s").unwrap(), 500_000);
        assert_eq!(parse_rate("100Mbit/s").unwrap(), 12_500_000);
        assert_eq!(parse_rate("512kbit").unwrap(), 64_000);
        assert_eq!(parse_rate("1048576").unwrap(), 1 << 20);
        for bad in ["fast", "10", "20 furlongs/s", "-5MB/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn delta_and_bwlimit_have_defaults_and_checks() {
        let c = parse(OK).unwrap();
        let ch = c.channel("site").unwrap();
        assert_eq!(ch.delta_min_bytes, Some(DEFAULT_DELTA_MIN_BYTES));
        assert_eq!(ch.targets[0].bwlimit, None);
        let off = OK.replace("max_delete", "delta = false\nmax_delete");
        assert_eq!(parse(&off).unwrap().channels[0].delta_min_bytes, None);
        let limited = format!("{OK}  bwlimit = \"2MiB/s\"\n");
        assert_eq!(
            parse(&limited).unwrap().channels[0].targets[0].bwlimit,
            Some(2 << 20)
        );
        let e = parse(&format!("{OK}  bwlimit = \"lots\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bwlimit") && e.contains("lots"), "{e}");
        let small = OK.replace("max_delete", "delta_min_bytes = 100\nmax_delete");
        assert!(
            parse(&small)
                .unwrap_err()
                .to_string()
                .contains("delta_min_bytes")
        );
    }
}
