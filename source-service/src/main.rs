//! `mirror-source`: runs mirroring jobs for the channels of its configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mimalloc::MiMalloc;

use cms_mirror::config::MirrorConfig;
use cms_mirror::jobstore::JobStore;
use mirror_source::App;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Streams channels' content to mirror-target services as jobs.
#[derive(Parser, Debug)]
#[command(name = "mirror-source", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "MIRROR_SOURCE_LISTEN", default_value = "127.0.0.1:7700")]
    listen: String,
    /// mirror.toml with the channels.
    #[arg(long, env = "MIRROR_CONFIG")]
    config: PathBuf,
    /// Job store URL (sqlite://PATH or postgres://...). Default: a SQLite file in the
    /// data directory.
    #[arg(long, env = "MIRROR_DB")]
    db: Option<String>,
    /// Directory for the default SQLite store and job plans (default:
    /// mirror-source-data beside the --config file).
    #[arg(long, env = "MIRROR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Name of this instance in job events and logs (a random suffix keeps it unique
    /// among instances sharing a database).
    #[arg(long, env = "MIRROR_INSTANCE_NAME", default_value = "source")]
    instance_name: String,
    /// Seconds a claimed job stays with this instance without renewal.
    #[arg(long, env = "MIRROR_LEASE_SECS", default_value_t = 15)]
    lease_secs: u64,
    /// Check every target (connection, TLS, token, site, free space) this often, for
    /// `channels`, the dashboard and the metrics; 0: only when asked (`mirrorctl check`).
    #[arg(long, env = "MIRROR_CHECK_INTERVAL_SECS", default_value_t = mirror_source::DEFAULT_CHECK_EVERY.as_secs())]
    check_interval_secs: u64,
    /// Remove finished jobs (their events, errors and plans) after this many days; 0
    /// keeps them for ever.
    #[arg(long, env = "MIRROR_KEEP_JOBS", default_value_t = 90)]
    keep_jobs: u64,
    /// Send at most this much per second to all targets together (e.g. "20MiB/s",
    /// "100Mbit/s"); each target's own `bwlimit` holds within it.
    #[arg(long, env = "MIRROR_BWLIMIT", value_parser = |s: &str| cms_mirror::config::parse_rate(s).map_err(|e| e.to_string()))]
    bwlimit: Option<u64>,
    /// Serve Prometheus/OpenMetrics text at http://ADDR/metrics.
    #[arg(long, env = "MIRROR_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    security: cms_mirror::security::ServerArgs,
    /// Log format: text or json.
    #[arg(long, env = "MIRROR_LOG_FORMAT", default_value = "text")]
    log_format: cms_mirror::telemetry::LogFormat,
}

/// `kill -HUP`: reads the configuration file again; one that does not load is logged
/// and the running configuration stays.
fn reload_on_sighup(app: Arc<App>, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                return tracing::warn!(error = %e, "no SIGHUP handler; reloading needs a restart");
            }
        };
        while hup.recv().await.is_some() {
            match MirrorConfig::load(&path) {
                Ok(config) => app.reload(config).await,
                Err(e) => {
                    tracing::error!(error = %e, "configuration not reloaded; the running one stays")
                }
            }
        }
    });
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = cms_mirror::telemetry::init(args.log_format, "mirror-source");
    cms_mirror::no_transparent_huge_pages();
    let config = MirrorConfig::load(&args.config)?;
    for c in &config.channels {
        if !c.source.is_dir() {
            tracing::warn!(channel = %c.name, source = %c.source.display(), "source directory does not exist (yet); its jobs will fail until it does");
        }
    }
    let security = args.security.load().map_err(anyhow::Error::msg)?;
    let data_dir = cms_mirror::config::data_dir(
        args.data_dir.as_deref(),
        Some(&args.config),
        "mirror-source-data",
    );
    let db_url = cms_mirror::db::url_or_default(args.db.as_deref(), &data_dir, "source.db");
    let db = cms_mirror::db::connect(&db_url, cms_mirror::db::Schema::Source).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let mut app = App::new(config, JobStore::new(db), data_dir);
    app.set_instance_name(&args.instance_name);
    app.lease_ms = (args.lease_secs * 1000) as i64;
    app.keep_jobs = (args.keep_jobs > 0).then(|| Duration::from_secs(args.keep_jobs * 86_400));
    app.check_every =
        (args.check_interval_secs > 0).then(|| Duration::from_secs(args.check_interval_secs));
    app.bwlimit = args.bwlimit.map(mirror_source::bwlimit::Pacer::new);
    let app = Arc::new(app);
    reload_on_sighup(app.clone(), args.config.clone());
    {
        let app = app.clone();
        cms_mirror::observe::export_metrics_otlp("mirror-source", move || {
            let app = app.clone();
            async move { app.render_metrics().await }
        });
    }
    if let Some(m) = &args.metrics_listen {
        let l = cms_mirror::observe::bind_metrics(m)
            .await
            .map_err(anyhow::Error::msg)?;
        let app = app.clone();
        tokio::spawn(cms_mirror::observe::serve_metrics(l, move || {
            let app = app.clone();
            async move { app.render_metrics().await }
        }));
    }
    println!("mirror-source listening on {addr}");
    tracing::info!(%addr, instance = %app.instance_id, db = %cms_mirror::db::redact(&db_url), security = %security.describe(), "mirror-source started");
    mirror_source::start(listener, app, security, cms_mirror::shutdown_signal())
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}
