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

/// A listener that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {what} on {addr}: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: String,
    pub source: std::io::Error,
}

/// Binds the metrics listener and prints its address (like the gRPC one, for port 0).
pub async fn bind_metrics(addr: &str) -> Result<tokio::net::TcpListener, BindError> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError {
            what: "metrics",
            addr: addr.into(),
            source,
        })?;
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

/// Pushes the metrics over OTLP/gRPC when `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every `OTEL_METRIC_EXPORT_INTERVAL` ms (default
/// 60000): the same counters and gauges as `/metrics` (histograms stay on `/metrics`),
/// as cumulative sums and gauges with their labels as attributes. Off, and free,
/// otherwise; an unreachable collector is a warning, never a failure.
pub fn export_metrics_otlp<F, Fut>(service: &'static str, render: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let Some(endpoint) = [
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty())) else {
        return;
    };
    let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
        Ok(e) => e.connect_lazy(),
        Err(e) => {
            tracing::warn!(%endpoint, error = %e, "malformed OTLP endpoint; metrics are not exported");
            return;
        }
    };
    let every = std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(60_000)
        .max(100);
    let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    tokio::spawn(async move {
        use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
        let mut client = MetricsServiceClient::new(channel);
        let start = crate::now_ms() as u64 * 1_000_000;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(every));
        let mut warned = false;
        loop {
            tick.tick().await;
            let text = render().await;
            let now = crate::now_ms() as u64 * 1_000_000;
            let req = otlp::request(&service_name, &text, start, now);
            match client.export(req).await {
                Ok(_) => warned = false,
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "cannot export metrics over OTLP; retrying at each interval");
                }
                Err(_) => {}
            }
        }
    });
}

/// The Prometheus text page as an OTLP metrics request.
mod otlp {
    use std::collections::HashMap;

    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::metrics::v1::{
        AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
        metric, number_data_point,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.to_string())),
            }),
            ..Default::default()
        }
    }

    /// A metric's name, labels and value.
    type Sample<'a> = (&'a str, Vec<(String, String)>, f64);

    /// `name{a="x",b="y"} 1.5` -> (name, labels, value).
    fn sample(line: &str) -> Option<Sample<'_>> {
        let (head, value) = line.rsplit_once(' ')?;
        let value: f64 = value.parse().ok()?;
        let Some((name, rest)) = head.split_once('{') else {
            return Some((head, Vec::new(), value));
        };
        let mut labels = Vec::new();
        let mut chars = rest.strip_suffix('}')?.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            if chars.next() != Some('"') {
                return None;
            }
            let mut val = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.push(match chars.next()? {
                        'n' => '\n',
                        other => other,
                    }),
                    '"' => break,
                    c => val.push(c),
                }
            }
            labels.push((key.trim_start_matches(',').to_string(), val));
            if chars.peek() == Some(&',') {
                chars.next();
            }
        }
        Some((name, labels, value))
    }

    pub fn request(service: &str, text: &str, start: u64, now: u64) -> ExportMetricsServiceRequest {
        let mut types: HashMap<&str, &str> = HashMap::new();
        let mut metrics: Vec<Metric> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some((name, ty)) = rest.split_once(' ') {
                    types.insert(name, ty);
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((name, labels, value)) = sample(line) else {
                continue;
            };
            let (family, kind) = match types.get(name) {
                Some(&"gauge") => (name, "gauge"),
                _ => match name
                    .strip_suffix("_total")
                    .and_then(|f| Some((f, *types.get(f)?)))
                {
                    Some((f, "counter")) => (f, "counter"),
                    _ => continue, // histograms and the rest stay on /metrics
                },
            };
            let point = NumberDataPoint {
                attributes: labels.iter().map(|(k, v)| kv(k, v)).collect(),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsDouble(value)),
                ..Default::default()
            };
            let i = *index.entry(family.to_string()).or_insert_with(|| {
                metrics.push(Metric {
                    name: family.to_string(),
                    data: Some(if kind == "counter" {
                        metric::Data::Sum(Sum {
                            data_points: Vec::new(),
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        })
                    } else {
                        metric::Data::Gauge(Gauge {
                            data_points: Vec::new(),
                        })
                    }),
                    ..Default::default()
                });
                metrics.len() - 1
            });
            match &mut metrics[i].data {
                Some(metric::Data::Sum(s)) => s.data_points.push(point),
                Some(metric::Data::Gauge(g)) => g.data_points.push(point),
                _ => {}
            }
        }
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn counters_and_gauges_with_labels() {
            let text = "# TYPE mirror_bytes_acked counter\n\
                mirror_bytes_acked_total{channel=\"site\",target=\"we\\\"b1\"} 4096\n\
                # TYPE mirror_lag gauge\nmirror_lag{channel=\"site\"} -1\n\
                # TYPE mirror_apply histogram\nmirror_apply_bucket{le=\"0.1\"} 3\n# EOF\n";
            let r = super::request("svc", text, 1, 2);
            let m = &r.resource_metrics[0].scope_metrics[0].metrics;
            assert_eq!(m.len(), 2, "{m:?}");
            assert_eq!(m[0].name, "mirror_bytes_acked");
            let s = format!("{m:?}");
            assert!(
                s.contains("AsDouble(4096.0)")
                    && s.contains("we\\\"b1")
                    && s.contains("is_monotonic: true"),
                "{s}"
            );
            assert!(s.contains("AsDouble(-1.0)"), "{s}");
        }
    }
}
