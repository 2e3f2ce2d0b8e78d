//! Cache invalidation hooks, run after a session is committed: an HTTP POST of a JSON
//! body, or a command with that JSON on its standard input. Each hook has a timeout and
//! retries with backoff; its result goes back to the source in the commit answer. A
//! failing hook never undoes the mirror.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use cms_mirror::config::Hook;
use cms_mirror::pb;

/// Why one attempt of a hook, or a push to the next tier, did not run to an answer.
#[derive(Debug, thiserror::Error)]
enum HookError {
    #[error("POST {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program:?}: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
    #[error("timed out connecting")]
    ConnectTimeout,
    #[error("header {name}: cannot read {}: {source}", path.display())]
    HeaderFile {
        name: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Connect(#[from] cms_mirror::security::SecurityError),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
}

/// What a job changed on one site, as hooks receive it.
pub struct Changes {
    pub job_id: String,
    pub channel: String,
    pub site: String,
    pub base_url: Option<String>,
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
    /// CMS pages created, updated, moved or deleted, with their old and new URL paths.
    pub pages: Vec<crate::pagestore::PageChange>,
    /// URL paths of the pages whose lists of children changed.
    pub parents: Vec<String>,
}

impl Changes {
    pub fn body(&self) -> Value {
        let mut v = json!({
            "job_id": self.job_id,
            "channel": self.channel,
            "site": self.site,
            "created": self.created,
            "updated": self.updated,
            "deleted": self.deleted,
        });
        if !self.pages.is_empty() {
            // Page URLs are paths of the site; full URLs when it has a base_url.
            let full = |u: &Option<String>| -> Value {
                match (u, &self.base_url) {
                    (Some(u), Some(b)) => json!(format!("{}{u}", b.trim_end_matches('/'))),
                    (u, _) => json!(u),
                }
            };
            v["pages"] = self
                .pages
                .iter()
                .map(|p| {
                    json!({"key": p.key, "locale": p.locale, "action": p.action,
                           "old_url": full(&p.old_url), "new_url": full(&p.new_url)})
                })
                .collect();
            v["parents"] = self
                .parents
                .iter()
                .map(|u| full(&Some(u.clone())))
                .collect();
        }
        if let Some(base) = &self.base_url {
            // A directory's index is also served (and cached) at the directory's URL:
            // both are purged.
            let urls = |paths: &[String]| -> Vec<String> {
                let base = base.trim_end_matches('/');
                let mut out = Vec::with_capacity(paths.len());
                for p in paths {
                    out.push(format!("{base}/{}", encode_path(p)));
                    if let Some(dir) = index_dir(p) {
                        out.push(format!("{base}/{}", encode_path(dir)));
                    }
                }
                out
            };
            v["urls"] = json!({
                "created": urls(&self.created),
                "updated": urls(&self.updated),
                "deleted": urls(&self.deleted),
            });
        }
        v
    }
}

/// The directory URL path (`docs/`, or `` for the root) that serves `p` when `p` is a
/// directory index (`index.html`, `index.htm`).
fn index_dir(p: &str) -> Option<&str> {
    let name = p.rsplit('/').next()?;
    (name == "index.html" || name == "index.htm").then(|| &p[..p.len() - name.len()])
}

/// Percent-encodes a relative path for a URL (keeps `/` and unreserved characters).
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn describe(h: &Hook) -> String {
    match h {
        Hook::Http { url, .. } => format!("POST {url}"),
        Hook::Command { argv, .. } => argv.join(" "),
    }
}

/// Runs every hook of a site (one after the other) and reports each.
pub async fn run_all(hooks: &[Hook], changes: &Changes) -> Vec<pb::HookResult> {
    let body = serde_json::to_vec(&changes.body()).unwrap_or_default();
    let mut out = Vec::new();
    for h in hooks {
        let (timeout, retries) = match h {
            Hook::Http {
                timeout_secs,
                retries,
                ..
            }
            | Hook::Command {
                timeout_secs,
                retries,
                ..
            } => (Duration::from_secs(*timeout_secs), *retries),
        };
        let started = Instant::now();
        let mut attempts = 0u32;
        let (ok, status, error) = loop {
            attempts += 1;
            let r = tokio::time::timeout(timeout, run_once(h, &body)).await;
            let (ok, status, error) = match r {
                Err(_) => (false, 0, format!("timed out after {}s", timeout.as_secs())),
                Ok(Ok((true, status))) => (true, status, String::new()),
                Ok(Ok((false, status))) => (false, status, format!("failed with status {status}")),
                Ok(Err(e)) => (false, -1, e.to_string()),
            };
            // A command that cannot start will not start on a retry either.
            let hopeless = status == -1 && matches!(h, Hook::Command { .. });
            if ok || attempts > retries || hopeless {
                break (ok, status, error);
            }
            tokio::time::sleep(Duration::from_millis(200u64 << attempts.min(6))).await;
        };
        if ok {
            tracing::info!(hook = %describe(h), status, attempts, "hook succeeded");
        } else {
            tracing::warn!(hook = %describe(h), status, attempts, %error, "hook failed");
        }
        out.push(pb::HookResult {
            hook: describe(h),
            ok,
            status,
            error,
            attempts,
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    out
}

/// One attempt: success and the HTTP status (2xx succeeds) or the command's exit code
/// (0 succeeds; -2 when killed by a signal).
async fn run_once(h: &Hook, body: &[u8]) -> Result<(bool, i32), HookError> {
    match h {
        Hook::Http {
            url,
            headers,
            header_files,
            ..
        } => {
            let mut req = http_client()
                .post(url)
                .header("content-type", "application/json");
            for (name, value) in headers {
                req = req.header(name, value);
            }
            for (name, path) in header_files {
                let text = tokio::fs::read_to_string(path).await.map_err(|source| {
                    HookError::HeaderFile {
                        name: name.clone(),
                        path: path.clone(),
                        source,
                    }
                })?;
                req = req.header(name, text.lines().next().unwrap_or("").trim());
            }
            let r = req
                .body(body.to_vec())
                .send()
                .await
                .map_err(|source| HookError::Http {
                    url: url.clone(),
                    source,
                })?;
            Ok((r.status().is_success(), r.status().as_u16() as i32))
        }
        Hook::Command { argv, .. } => {
            let mut child = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| HookError::Spawn {
                    program: argv[0].clone(),
                    source,
                })?;
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(body).await;
            }
            let st = child.wait().await.map_err(|source| HookError::Wait {
                program: argv[0].clone(),
                source,
            })?;
            Ok((st.success(), st.code().unwrap_or(-2)))
        }
    }
}

fn http_client() -> &'static reqwest::Client {
    static C: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .user_agent(concat!("cms-mirror/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client")
    })
}

/// Starts the next tier's channel on another source service (after a commit). The
/// lineage carries every target the content passed, so a loop is refused.
pub async fn push(
    p: &cms_mirror::config::Push,
    job_id: &str,
    lineage: Vec<String>,
) -> pb::HookResult {
    let started = Instant::now();
    let hook = format!("push {} to {}", p.channel, p.source);
    let res = async {
        let ch = tokio::time::timeout(Duration::from_secs(10), p.auth.connect(&p.source))
            .await
            .map_err(|_| HookError::ConnectTimeout)??;
        let mut c = pb::source_service_client::SourceServiceClient::new(ch);
        let r = c
            .start_job(cms_mirror::telemetry::inject(tonic::Request::new(
                pb::StartJobRequest {
                    channel: p.channel.clone(),
                    trigger: pb::Trigger::Api as i32,
                    requested_by: format!("tier push after job {job_id}"),
                    lineage,
                    ..Default::default()
                },
            )))
            .await
            .map_err(HookError::Refused)?;
        Ok::<String, HookError>(r.into_inner().job_id)
    }
    .await;
    match &res {
        Ok(j) => tracing::info!(%hook, job = %j, "pushed to the next tier"),
        Err(e) => tracing::warn!(%hook, error = %e, "push to the next tier failed"),
    }
    pb::HookResult {
        hook,
        ok: res.is_ok(),
        status: 0,
        error: res.err().map(|e| e.to_string()).unwrap_or_default(),
        attempts: 1,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}
