//! Authentication and TLS for both services and their clients.
//!
//! Bearer tokens: a service started with `--auth-tokens FILE` accepts any token listed
//! in FILE (one a line; `#` comments and blank lines ignored), so an old and a new token
//! overlap during a rotation. The file is re-read at most once a second: removing the old
//! token ends the overlap without a restart. Only BLAKE3 hashes of the tokens are kept,
//! and a presented token is compared hash against hash in constant time. Refusals say
//! what was wrong, never what was presented.
//!
//! TLS uses rustls (ring): `--tls-cert`/`--tls-key` on a service; `--tls-client-ca`
//! turns on mutual TLS, with client certificates checked against that CA bundle (old and
//! new CA in one file overlap). Clients use `ca_file` (else the system's roots) and, for
//! mutual TLS, `cert_file`/`key_file`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};

/// What can be wrong with security settings or a connection they make; each names the
/// file or URL.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {} lists no token", path.display())]
    NoToken { path: PathBuf },
    #[error(
        "token file {}: token {number} is shorter than 16 characters or not printable ASCII",
        path.display()
    )]
    BadToken { path: PathBuf, number: usize },
    #[error("the token is not printable ASCII")]
    TokenNotAscii,
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("{url}: ca_file/cert_file are set but the URL is not https://")]
    TlsOnPlainUrl { url: String },
    #[error("cert_file and key_file go together")]
    ClientIdentityIncomplete,
    #[error("--tls-cert and --tls-key go together (and --tls-client-ca needs both)")]
    ServerTlsIncomplete,
    #[error("TLS settings for {url}: {reason}")]
    Tls { url: String, reason: String },
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// How often a token file is re-read.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Parses a token file's text: one token a line, comments and blanks skipped.
fn parse_tokens(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn read_token_file(path: &Path) -> Result<Vec<String>, SecurityError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecurityError::Read {
        what: "token file",
        path: path.to_path_buf(),
        source,
    })?;
    let tokens = parse_tokens(&text);
    if tokens.is_empty() {
        return Err(SecurityError::NoToken {
            path: path.to_path_buf(),
        });
    }
    Ok(tokens)
}

fn read_tokens(path: &Path) -> Result<Vec<blake3::Hash>, SecurityError> {
    let tokens = read_token_file(path)?;
    if let Some(bad) = tokens
        .iter()
        .position(|t| t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(SecurityError::BadToken {
            path: path.to_path_buf(),
            number: bad + 1,
        });
    }
    Ok(tokens.iter().map(|t| blake3::hash(t.as_bytes())).collect())
}

struct TokenState {
    checked: Instant,
    hashes: Arc<Vec<blake3::Hash>>,
}

/// The bearer tokens a service accepts, from a file that is followed while it runs.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    state: Arc<Mutex<TokenState>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Loads the file; an unreadable or empty file is an error at start.
    pub fn load(path: &Path) -> Result<Tokens, SecurityError> {
        let hashes = read_tokens(path)?;
        Ok(Tokens {
            path: path.to_path_buf(),
            state: Arc::new(Mutex::new(TokenState {
                checked: Instant::now(),
                hashes: Arc::new(hashes),
            })),
        })
    }

    fn current(&self) -> Arc<Vec<blake3::Hash>> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.checked.elapsed() >= RELOAD_EVERY {
            st.checked = Instant::now();
            match read_tokens(&self.path) {
                Ok(h) => st.hashes = Arc::new(h),
                // A file being rewritten, or broken: keep the last good set.
                Err(e) => tracing::warn!(error = %e, "keeping the previous tokens"),
            }
        }
        st.hashes.clone()
    }

    /// Whether `token` is one of the accepted tokens (constant-time per comparison:
    /// `blake3::Hash` equality does not stop at the first differing byte).
    pub fn accepts(&self, token: &str) -> bool {
        let h = blake3::hash(token.as_bytes());
        self.current()
            .iter()
            .fold(false, |ok, accepted| ok | (*accepted == h))
    }
}

/// Server-side check of `authorization: Bearer TOKEN`, run on the request headers before
/// any message of a stream is read. `Auth(None)` lets every request through.
#[derive(Clone, Default)]
pub struct Auth(pub Option<Tokens>);

impl Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(tokens) = &self.0 else {
            return Ok(req);
        };
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing bearer token (authorization: Bearer ...)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
            .map(str::trim);
        match token {
            Some(t) if tokens.accepts(t) => Ok(req),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "malformed authorization header (expected: Bearer TOKEN)",
            )),
        }
    }
}

/// Client side: adds the bearer token, when there is one, to every request.
#[derive(Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, SecurityError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => MetadataValue::try_from(format!("Bearer {t}"))
                .map(|v| Bearer(Some(v)))
                .map_err(|_| SecurityError::TokenNotAscii),
        }
    }

    /// The first token of a token file (read each time a connection is made, so the
    /// file can be rotated while the process runs).
    pub fn from_file(path: &Path) -> Result<Bearer, SecurityError> {
        let first = &read_token_file(path)?[0];
        Bearer::new(Some(first)).map_err(|_| SecurityError::BadToken {
            path: path.to_path_buf(),
            number: 1,
        })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client channel that presents a bearer token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// How a client reaches a service: token and TLS settings (all optional).
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    pub token_file: Option<PathBuf>,
    /// A token given directly (mirrorctl `--token` / `MIRROR_TOKEN`); wins over the file.
    pub token: Option<String>,
    /// CA bundle for the service's certificate; default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl ClientAuth {
    pub fn bearer(&self) -> Result<Bearer, SecurityError> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Bearer::new(Some(t)),
            (None, Some(f)) => Bearer::from_file(f),
            (None, None) => Ok(Bearer(None)),
        }
    }

    /// An endpoint for `url` with the project's transport tuning and, for `https://`,
    /// TLS from these settings. TLS settings on an `http://` URL are an error (they
    /// would be silently unused).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, SecurityError> {
        let ep = crate::transport::endpoint(url).map_err(|e| SecurityError::InvalidUrl {
            url: url.into(),
            reason: e.to_string(),
        })?;
        let tls_set = self.ca_file.is_some() || self.cert_file.is_some();
        if !url.starts_with("https://") {
            if tls_set {
                return Err(SecurityError::TlsOnPlainUrl { url: url.into() });
            }
            return Ok(ep);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_file {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "CA bundle")?)),
            None => tls.with_native_roots(),
        };
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                tls = tls.identity(Identity::from_pem(
                    read(c, "client certificate")?,
                    read(k, "client key")?,
                ))
            }
            (None, None) => {}
            _ => return Err(SecurityError::ClientIdentityIncomplete),
        }
        ep.tls_config(tls).map_err(|e| SecurityError::Tls {
            url: url.into(),
            reason: error_chain(&e),
        })
    }

    /// A lazily connecting channel with the token interceptor.
    pub fn channel(&self, url: &str) -> Result<AuthChannel, SecurityError> {
        Ok(InterceptedService::new(
            self.endpoint(url)?.connect_lazy(),
            self.bearer()?,
        ))
    }

    /// Connects now (errors name the URL).
    pub async fn connect(&self, url: &str) -> Result<AuthChannel, SecurityError> {
        let bearer = self.bearer()?;
        let ch = self
            .endpoint(url)?
            .connect()
            .await
            .map_err(|e| SecurityError::Unreachable {
                url: url.into(),
                reason: error_chain(&e),
            })?;
        Ok(InterceptedService::new(ch, bearer))
    }
}

/// An error with its causes (tonic's transport errors hide the useful part, such as a
/// certificate problem, in the source chain).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Server TLS from `--tls-cert`, `--tls-key` and, for mutual TLS, `--tls-client-ca`.
pub fn server_tls(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<ServerTlsConfig>, SecurityError> {
    match (cert, key) {
        (None, None) if client_ca.is_none() => Ok(None),
        (Some(c), Some(k)) => {
            let mut tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(read(c, "certificate")?, read(k, "key")?));
            if let Some(ca) = client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA bundle")?));
            }
            Ok(Some(tls))
        }
        _ => Err(SecurityError::ServerTlsIncomplete),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_rotate_and_refusals_do_not_echo() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "# admin\nold-token-0123456789\nnew-token-0123456789\n").unwrap();
        let t = Tokens::load(&f).unwrap();
        assert!(t.accepts("old-token-0123456789") && t.accepts("new-token-0123456789"));
        assert!(!t.accepts("new-token-012345678"));
        std::fs::write(&f, "new-token-0123456789\n").unwrap();
        t.state.lock().unwrap().checked -= RELOAD_EVERY;
        assert!(!t.accepts("old-token-0123456789"));
        assert!(t.accepts("new-token-0123456789"));

        let mut auth = Auth(Some(t));
        let mut req = Request::new(());
        req.metadata_mut().insert(
            "authorization",
            "Bearer secret-guess-12345".parse().unwrap(),
        );
        let e = auth.call(req).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.message().contains("secret-guess"), "{}", e.message());
        assert!(auth.call(Request::new(())).is_err());

        std::fs::write(&f, "short\n").unwrap();
        let e = Tokens::load(&f).unwrap_err();
        assert!(
            matches!(e, SecurityError::BadToken { number: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("shorter than 16"), "{e}");
        std::fs::write(&f, "# nothing\n").unwrap();
        let e = Tokens::load(&f).unwrap_err();
        assert!(matches!(e, SecurityError::NoToken { .. }), "{e}");
    }
}

/// The security flags both services take.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// File of accepted bearer tokens, one a line (re-read while running, for rotation).
    #[arg(long, env = "MIRROR_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// PEM certificate chain: serve TLS (with --tls-key).
    #[arg(long, env = "MIRROR_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MIRROR_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by one of these (mutual TLS).
    #[arg(long, env = "MIRROR_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

/// What a service enforces: tokens on its own RPCs (not on health and reflection) and
/// TLS on its listener.
#[derive(Clone, Default)]
pub struct ServerSecurity {
    pub auth: Auth,
    pub tls: Option<ServerTlsConfig>,
}

impl ServerArgs {
    pub fn load(&self) -> Result<ServerSecurity, SecurityError> {
        let auth = match &self.auth_tokens {
            Some(f) => Auth(Some(Tokens::load(f)?)),
            None => Auth(None),
        };
        let tls = server_tls(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )?;
        Ok(ServerSecurity { auth, tls })
    }
}

impl ServerSecurity {
    /// How the service is protected, for its start-up log line.
    pub fn describe(&self) -> String {
        let auth = if self.auth.0.is_some() {
            "bearer tokens"
        } else {
            "no authentication"
        };
        let tls = match &self.tls {
            None => "plaintext",
            Some(_) => "TLS",
        };
        format!("{auth}, {tls}")
    }
}
