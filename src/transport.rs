//! HTTP/2 settings and the gRPC codec shared by every gRPC client and server of the
//! project.
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

/// gRPC reflection for the project's services: v1 (grpcurl) and v1alpha (grpcui,
/// Postman, Python's grpcio-reflection), both to be served.
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
    };
    (
        builder().build_v1().expect("descriptor set is valid"),
        builder().build_v1alpha().expect("descriptor set is valid"),
    )
}

/// Why a service stopped serving, or could not start to.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("serving failed: {0}")]
    Transport(String),
}

impl ServeError {
    pub fn transport(e: &tonic::transport::Error) -> ServeError {
        ServeError::Transport(crate::security::error_chain(e))
    }
}

/// A server builder with the project's tuning and, when configured, TLS.
pub fn secure_server(
    sec: &crate::security::ServerSecurity,
) -> Result<tonic::transport::Server, ServeError> {
    match &sec.tls {
        None => Ok(server()),
        Some(tls) => server()
            .tls_config(tls.clone())
            .map_err(|e| ServeError::Tls(crate::security::error_chain(&e))),
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
    let peer = req
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|c| c.remote_addr())
        .map(|a| a.to_string())
        .unwrap_or_default();
    let span =
        tracing::info_span!("rpc", otel.name = %path.trim_start_matches('/'), rpc = %path, %peer);
    let md = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
    crate::telemetry::follow(&span, &md);
    span
}

/// Messages of at least this size are encoded into a buffer reserved up front (see
/// [`Codec`]).
const RESERVE_MIN: usize = 256 * 1024;

/// The gRPC codec of every generated client and server: `tonic_prost::ProstCodec`, except
/// that a large message (a package) first reserves the next power of two of its size.
///
/// tonic encodes each message into one `BytesMut` and sends it as a frozen slice of it.
/// When the buffer is its only owner again and a message needs more room than it holds,
/// `BytesMut` grows its vector with `realloc`, which copies the whole old allocation,
/// the previous message included, though none of it is needed any more: on a large
/// mirror that was half a copy of every byte sent, in the source's busiest task.
/// Reserving a size that every later package of the stream also fits in keeps the buffer
/// reused in place, or replaced by a fresh one while the previous message is still being
/// sent, never grown.
#[derive(Debug)]
pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = Encoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        Encoder(tonic_prost::ProstEncoder::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(tonic_prost::ProstDecoder::default())
    }
}

/// The decoder of [`Codec`]: `ProstDecoder`, except that bytes that are not the expected
/// message are the sender's fault, INVALID_ARGUMENT (tonic answers INTERNAL), and are
/// logged in the call's span, which names the peer.
#[derive(Debug)]
pub struct Decoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<U>, Self::Error> {
        U::decode(buf).map(Some).map_err(|e| {
            let message = std::any::type_name::<U>().rsplit("::").next().unwrap_or("");
            tracing::warn!(error = %e, message, "malformed message refused");
            tonic::Status::invalid_argument(format!("malformed {message} message: {e}"))
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

/// The encoder of [`Codec`]: reserves, then leaves the encoding to `ProstEncoder`.
#[derive(Debug)]
pub struct Encoder<T>(tonic_prost::ProstEncoder<T>);

impl<T: prost::Message> tonic::codec::Encoder for Encoder<T> {
    type Item = T;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: T,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        let len = item.encoded_len();
        if len >= RESERVE_MIN {
            buf.reserve(len.next_power_of_two());
        }
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}
