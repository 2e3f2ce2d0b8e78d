//! `mirror-target`: receives packages from mirror-source and applies them to its sites.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mimalloc::MiMalloc;

use cms_mirror::config::SiteConfig;
use cms_mirror::package::Limits;
use mirror_target::apply::Durability;
use mirror_target::{TargetService, TargetSettings, ledger::Ledger};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Receives a site's content from mirror-source and applies it durably.
#[derive(Parser, Debug)]
#[command(name = "mirror-target", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "MIRROR_TARGET_LISTEN", default_value = "127.0.0.1:7701")]
    listen: String,
    /// A site as NAME=DIR (repeatable).
    #[arg(long = "site", env = "MIRROR_SITES", value_delimiter = ',')]
    sites: Vec<String>,
    /// target.toml with sites and hooks.
    #[arg(long, env = "MIRROR_TARGET_CONFIG")]
    config: Option<PathBuf>,
    /// Ledger database URL (sqlite://PATH or postgres://...). Default: a SQLite file in
    /// the data directory.
    #[arg(long, env = "MIRROR_DB")]
    db: Option<String>,
    /// Directory for the default SQLite ledger (default: mirror-target-data beside the
    /// --config file, or in the working directory without one).
    #[arg(long, env = "MIRROR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// How applied packages are made durable before the ack: syncfs, fsync or none.
    #[arg(long, env = "MIRROR_DURABILITY", default_value = "syncfs")]
    durability: Durability,
    /// When durability is syncfs or fsync: write the block-aligned part of large file
    /// chunks straight to the disk (O_DIRECT) and drop the rest of each body from the page
    /// cache once it is durable; false: everything through the page cache, and it stays
    /// cached.
    #[arg(long, env = "MIRROR_DIRECT_IO", default_value_t = true, action = clap::ArgAction::Set)]
    direct_io: bool,
    /// Largest package payload accepted, in bytes.
    #[arg(long, env = "MIRROR_MAX_PACKAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_package_bytes: usize,
    /// Decoded packages held at once by all import streams together, in bytes (at
    /// least --max-package-bytes): bounds the memory of many concurrent streams.
    #[arg(long, env = "MIRROR_MAX_DECODED_BYTES", default_value_t = 256 * 1024 * 1024)]
    max_decoded_bytes: usize,
    /// Seconds after which an open session with no activity (its job cancelled without
    /// an abort, or its source gone) is expired and its staging removed; a job that comes
    /// back later plans again.
    #[arg(long, env = "MIRROR_SESSION_EXPIRY_SECS", default_value_t = mirror_target::DEFAULT_SESSION_EXPIRY.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    session_expiry_secs: u64,
    /// Refuse a session while a site's file system has less free space than this
    /// (e.g. 16MiB, 2GiB; 0 turns the check off).
    #[arg(long, env = "MIRROR_MIN_FREE_SPACE", default_value_t = bytesize::ByteSize(mirror_target::DEFAULT_MIN_FREE_BYTES))]
    min_free_space: bytesize::ByteSize,
    /// Memory for the delta signatures of the large bodies this target writes, so a
    /// later delta transfer of one does not read its old version to describe it (e.g.
    /// 64MiB, about 12 bytes per chunk: some 90 GB of large files; 0 keeps none).
    #[arg(long, env = "MIRROR_SIGNATURE_CACHE", default_value_t = bytesize::ByteSize(mirror_target::sigcache::DEFAULT_BUDGET))]
    signature_cache: bytesize::ByteSize,
    /// Identity of this target in lineages (default: the listen address).
    #[arg(long, env = "MIRROR_TARGET_ID")]
    target_id: Option<String>,
    /// Serve the sites' CMS pages read-only at http://ADDR/api/v2/pages/ (shaped like
    /// Wagtail's API v2).
    #[arg(long, env = "MIRROR_DELIVERY_LISTEN")]
    delivery_listen: Option<String>,
    /// Serve Prometheus/OpenMetrics text at http://ADDR/metrics.
    #[arg(long, env = "MIRROR_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    security: cms_mirror::security::ServerArgs,
    /// Log format: text or json.
    #[arg(long, env = "MIRROR_LOG_FORMAT", default_value = "text")]
    log_format: cms_mirror::telemetry::LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One TLS provider for the whole process (hooks over https).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _telemetry = cms_mirror::telemetry::init(args.log_format, "mirror-target");
    cms_mirror::no_transparent_huge_pages();
    raise_open_files_limit();
    let mut sites = Vec::new();
    if let Some(path) = &args.config {
        sites.extend(SiteConfig::load_file(path)?);
    }
    for s in &args.sites {
        sites.push(SiteConfig::from_flag(s).map_err(|e| anyhow::anyhow!("--site {e}"))?);
    }
    let security = args.security.load()?;
    let data_dir = cms_mirror::config::data_dir(
        args.data_dir.as_deref(),
        args.config.as_deref(),
        "mirror-target-data",
    );
    let db_url = cms_mirror::db::url_or_default(args.db.as_deref(), &data_dir, "target.db");
    let db = cms_mirror::db::connect(&db_url, cms_mirror::db::Schema::Target).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // A message is a package plus a little framing: anything larger is refused by the
    // gRPC layer before it is buffered.
    let limits = Limits {
        max_payload_bytes: args.max_package_bytes,
        max_message_bytes: args.max_package_bytes.saturating_add(1 << 20),
        max_decoded_bytes: args.max_decoded_bytes,
        ..Limits::default()
    };
    let settings = TargetSettings {
        sites,
        limits,
        durability: args.durability,
        direct_io: args.direct_io,
        target_id: args.target_id.unwrap_or_else(|| addr.to_string()),
        session_expiry: std::time::Duration::from_secs(args.session_expiry_secs),
        min_free_bytes: args.min_free_space.as_u64(),
        signature_cache_bytes: args.signature_cache.as_u64(),
    };
    let service = TargetService::new(settings, Ledger::new(db)).await?;
    {
        let svc = service.clone();
        cms_mirror::observe::export_metrics_otlp("mirror-target", move || {
            let svc = svc.clone();
            async move { svc.render_metrics() }
        });
    }
    if let Some(m) = &args.metrics_listen {
        let l = cms_mirror::observe::bind_metrics(m)
            .await
            .map_err(anyhow::Error::msg)?;
        let svc = service.clone();
        tokio::spawn(cms_mirror::observe::serve_metrics(l, move || {
            let svc = svc.clone();
            async move { svc.render_metrics() }
        }));
    }
    if let Some(addr) = &args.delivery_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--delivery-listen)"))?;
        println!("delivery API on http://{}/api/v2/pages/", l.local_addr()?);
        let d = mirror_target::delivery::Delivery::new(
            service.ledger().db().clone(),
            service.settings().sites.clone(),
        );
        tokio::spawn(mirror_target::delivery::serve(l, d));
    }
    // The bound address on stdout, for scripts and tests that listen on port 0.
    println!("mirror-target listening on {addr}");
    tracing::info!(%addr, db = %cms_mirror::db::redact(&db_url), security = %security.describe(), "mirror-target started");
    mirror_target::run(listener, service, security, cms_mirror::shutdown_signal())
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Bodies stay open from their first chunk until their package is published (two
/// packages at a time, up to thousands of small files): raise the soft limit on open
/// files to the hard one, as Go's runtime does. Past the limit the target stages named
/// files instead, which is slower but works.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::debug!(error = %e, "cannot raise the open files limit");
        }
    }
}
