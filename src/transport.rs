//! HTTP/2 settings shared by every gRPC client and server of the project.
//!
//! hyper's defaults (1 MiB windows, 16 KiB frames) let only one 1 MiB message be in
//! flight; these values were measured on the project machines (../shared/PERF-NOTES.md).

use std::time::Duration;

pub const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Largest message either side decodes (packages are a few MiB; limits are enforced
/// again, more tightly, on the payload).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// HTTP/2 keepalive: a peer that stops answering pings is a disconnect.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A client endpoint with the project's HTTP/2 tuning.
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// A server builder with the project's tuning and, when configured, TLS.
pub fn secure_server(
    sec: &crate::security::ServerSecurity,
) -> Result<tonic::transport::Server, String> {
    match &sec.tls {
        None => Ok(server()),
        Some(tls) => server()
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS settings: {}", crate::security::error_chain(&e))),
    }
}

/// The accepted connections of a listener, with TCP_NODELAY. The server builder's own
/// `tcp_nodelay` applies only to listeners it binds itself; without it every small
/// answer (OpenSession, Commit, an ack) waits for the peer's delayed ACK, about 40 ms.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A server builder with the project's HTTP/2 tuning.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .trace_fn(request_span)
}

/// A span per RPC, named after the method and continuing the caller's trace (W3C
/// `traceparent` in the request metadata).
fn request_span(req: &axum::http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    if path.starts_with("/grpc.health") || path.starts_with("/grpc.reflection") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("rpc", otel.name = %path.trim_start_matches('/'), rpc = %path);
    let md = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
    crate::telemetry::follow(&span, &md);
    span
}
