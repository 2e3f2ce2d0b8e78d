//! Tracing set-up shared by the binaries: human-readable logs by default, JSON with
//! `--log-format json`, filtered by `RUST_LOG` (default `info`); OpenTelemetry trace
//! export over OTLP/gRPC when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) variable is set, with `OTEL_SERVICE_NAME`
//! naming the service; and W3C trace context carried in gRPC metadata, so one trace
//! follows a job from mirrorctl through the source to every target.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = crate::model::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            o => Err(crate::model::UnknownName::new(
                "log format",
                o,
                "text or json",
            )),
        }
    }
}

/// Flushes and stops trace export when dropped (keep it alive in `main`).
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: cannot flush traces: {e}");
        }
    }
}

/// Why traces are not exported although an endpoint is set (a warning at start).
#[derive(Debug, thiserror::Error)]
enum ExportOff {
    #[error("{var}={value:?} is not an http:// or https:// URL; traces are not exported")]
    NotHttpUrl { var: &'static str, value: String },
    #[error("cannot export traces to {endpoint:?}: {reason}; traces are not exported")]
    Exporter { endpoint: String, reason: String },
}

/// The OTLP endpoint from the environment, if export is asked for; Err for a value
/// that is not an http(s) URL.
fn otlp_endpoint() -> Option<Result<String, ExportOff>> {
    let (var, v) = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|k| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (*k, v))
    })?;
    let ok = (v.starts_with("http://") || v.starts_with("https://"))
        && v.parse::<tonic::transport::Uri>()
            .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
    Some(if ok {
        Ok(v)
    } else {
        Err(ExportOff::NotHttpUrl { var, value: v })
    })
}

/// Installs the global subscriber (logs on stderr, and spans to OTLP when configured).
/// Must run inside the Tokio runtime. `service` names the service unless
/// `OTEL_SERVICE_NAME` does. A malformed endpoint is a warning; the process runs on
/// without export.
pub fn init(format: LogFormat, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let mut warning = None;
    let provider = match otlp_endpoint() {
        None => None,
        Some(Err(w)) => {
            warning = Some(w);
            None
        }
        Some(Ok(endpoint)) => {
            use opentelemetry_otlp::WithExportConfig;
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
            {
                Ok(exporter) => {
                    let name = std::env::var("OTEL_SERVICE_NAME")
                        .ok()
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| service.to_string());
                    let resource = opentelemetry_sdk::Resource::builder()
                        .with_service_name(name)
                        .build();
                    Some(
                        SdkTracerProvider::builder()
                            .with_batch_exporter(exporter)
                            .with_resource(resource)
                            .build(),
                    )
                }
                Err(e) => {
                    let reason = e.to_string();
                    warning = Some(ExportOff::Exporter { endpoint, reason });
                    None
                }
            }
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("cms-mirror")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // Colours only for a person at a terminal, not in log files and journals.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    Telemetry { provider }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Adds the current span's trace context to a request (`traceparent`).
pub fn inject<T>(mut req: tonic::Request<T>) -> tonic::Request<T> {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(req.metadata_mut()));
    req
}

/// Makes `span` a child of the trace context a request carries, if any.
pub fn follow(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    set_parent(
        span,
        TraceContextPropagator::new().extract(&MetadataExtractor(metadata)),
    );
}

fn set_parent(span: &tracing::Span, cx: opentelemetry::Context) {
    if opentelemetry::trace::TraceContextExt::span(&cx)
        .span_context()
        .is_valid()
    {
        let _ = span.set_parent(cx);
    }
}

/// The current span's trace context as text (to store with a job and continue later).
pub fn current_context() -> std::collections::HashMap<String, String> {
    let mut m = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut m);
    m
}

/// Makes `span` a child of a stored trace context.
pub fn follow_stored(span: &tracing::Span, stored: &std::collections::HashMap<String, String>) {
    set_parent(span, TraceContextPropagator::new().extract(stored));
}
