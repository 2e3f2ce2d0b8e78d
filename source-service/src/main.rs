//! `mirror-source`: runs mirroring jobs for the channels of its configuration.

use std::path::PathBuf;
use std::sync::Arc;

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
    /// Directory for the default SQLite store and job plans.
    #[arg(long, env = "MIRROR_DATA_DIR", default_value = "./mirror-source-data")]
    data_dir: PathBuf,
    /// Name of this instance in job events and logs (a random suffix keeps it unique
    /// among instances sharing a database).
    #[arg(long, env = "MIRROR_INSTANCE_NAME", default_value = "source")]
    instance_name: String,
    /// Seconds a claimed job stays with this instance without renewal.
    #[arg(long, env = "MIRROR_LEASE_SECS", default_value_t = 15)]
    lease_secs: u64,
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
    let _telemetry = cms_mirror::telemetry::init(args.log_format, "mirror-source");
    cms_mirror::no_transparent_huge_pages();
    let config = MirrorConfig::load(&args.config)?;
    for c in &config.channels {
        if !c.source.is_dir() {
            tracing::warn!(channel = %c.name, source = %c.source.display(), "source directory does not exist (yet); its jobs will fail until it does");
        }
    }
    let security = args.security.load().map_err(anyhow::Error::msg)?;
    let db_url = cms_mirror::db::url_or_default(args.db.as_deref(), &args.data_dir, "source.db");
    let db = cms_mirror::db::connect(&db_url, cms_mirror::db::Schema::Source).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let mut app = App::new(config, JobStore::new(db), args.data_dir.clone());
    app.set_instance_name(&args.instance_name);
    app.lease_ms = (args.lease_secs * 1000) as i64;
    let app = Arc::new(app);
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
