//! Operational endpoints shared by both services: Prometheus/OpenMetrics text on
//! `/metrics` (`--metrics-listen`), and gRPC health that follows the database.

use std::future::Future;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::db::Db;

/// Label set of a per-channel, per-target metric.
pub type TargetLabels = Vec<(String, String)>;

pub fn labels(pairs: &[(&str, &str)]) -> TargetLabels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Encodes a registry in the OpenMetrics text format (which Prometheus scrapes).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = encode(&mut out, registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// Serves `GET /metrics` on `listener`; `render` produces the page (it may refresh
/// gauges first).
pub async fn serve_metrics<F, Fut>(listener: tokio::net::TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render().await,
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

/// Binds the metrics listener and prints its address (like the gRPC one, for port 0).
pub async fn bind_metrics(addr: &str) -> Result<tokio::net::TcpListener, String> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    if let Ok(a) = l.local_addr() {
        println!("metrics on http://{a}/metrics");
    }
    Ok(l)
}

/// Keeps `service` (and the overall "" entry) SERVING while the database answers and
/// NOT_SERVING while it does not. Starts NOT_SERVING until the first check passes.
pub async fn follow_database(reporter: HealthReporter, service: &'static str, db: Db) {
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(service, ServingStatus::NotServing)
        .await;
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let ok = tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query("SELECT 1").execute(&db.pool),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if last != Some(ok) {
                let status = if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                reporter.set_service_status(service, status).await;
                if ok {
                    tracing::info!(service, "health: serving");
                } else {
                    tracing::warn!(service, db = %db.redacted_url, "health: database unreachable; not serving");
                }
                last = Some(ok);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
