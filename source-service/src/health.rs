//! Heartbeats: each target checked along the path a job takes (its credentials, the
//! connection and TLS, the token, the protocol version, the site and its free space),
//! on demand (`CheckTargets`, `mirrorctl check`) and every `--check-interval-secs`; and
//! each target's sync lag against its channel's `max_lag_secs`. A target that is up but
//! turns the source away (a rotated token) is told apart from one that is down.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use cms_mirror::config::{ChannelConfig, TargetConfig};
use cms_mirror::pb;
use cms_mirror::pb::target_service_client::TargetServiceClient;

use crate::App;
use crate::metrics::Metrics;

/// What a check can find, best first.
pub const STATUSES: [&str; 4] = ["ok", "unreachable", "refused", "misconfigured"];

/// How long a check waits for the target's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// One check's findings as they accumulate.
struct Checking {
    health: pb::TargetHealth,
}

impl Checking {
    fn step(&mut self, name: &str, detail: impl Into<String>) {
        self.health.steps.push(pb::CheckStep {
            name: name.into(),
            ok: true,
            detail: detail.into(),
        });
    }

    fn fail(mut self, status: &str, name: &str, detail: impl Into<String>) -> pb::TargetHealth {
        let detail = detail.into();
        self.health.steps.push(pb::CheckStep {
            name: name.into(),
            ok: false,
            detail: detail.clone(),
        });
        self.health.status = status.into();
        self.health.detail = format!("{name}: {detail}");
        self.health
    }
}

/// Checks one target now.
pub async fn check_target(ch: &ChannelConfig, t: &TargetConfig) -> pb::TargetHealth {
    let mut c = Checking {
        health: pb::TargetHealth {
            channel: ch.name.clone(),
            target: t.name.clone(),
            url: t.url.clone(),
            site: t.site.clone(),
            checked_at: cms_mirror::ms_to_rfc3339(cms_mirror::now_ms()),
            ..Default::default()
        },
    };
    // Read as a job reads them: a token file gone or unreadable is found here.
    let channel = match t.auth.channel(&t.url) {
        Ok(channel) => channel,
        Err(e) => return c.fail("misconfigured", "credentials", e.to_string()),
    };
    let mut client = TargetServiceClient::new(channel);
    let req = pb::CheckSiteRequest {
        site: t.site.clone(),
        protocol_version: cms_mirror::PROTOCOL_VERSION,
    };
    let answer = match tokio::time::timeout(CHECK_TIMEOUT, client.check_site(req)).await {
        Err(_) => {
            let why = format!("no answer within {}s", CHECK_TIMEOUT.as_secs());
            return c.fail("unreachable", "reachable", why);
        }
        Ok(Err(s)) => return failed(c, &s),
        Ok(Ok(r)) => r.into_inner(),
    };
    c.step("reachable", t.url.clone());
    if t.url.starts_with("https://") {
        c.step(
            "tls",
            "the target's certificate is trusted (and ours accepted)",
        );
    }
    c.step("token", "accepted");
    c.step("protocol", format!("version {}", answer.protocol_version));
    if !answer.problem.is_empty() {
        return c.fail("misconfigured", "site", answer.problem);
    }
    c.step("site", format!("{} writable", t.site));
    c.step(
        "free space",
        bytesize::ByteSize(answer.free_bytes).to_string(),
    );
    c.health.free_bytes = answer.free_bytes;
    c.health.status = "ok".into();
    c.health
}

/// A check the target's answer (or the transport) refused, by kind.
fn failed(mut c: Checking, s: &tonic::Status) -> pb::TargetHealth {
    let text = crate::runner::status_text(s);
    let tls = ["certificate", "tls", "handshake", "CertificateRequired"]
        .iter()
        .any(|w| text.contains(w));
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded if tls => {
            c.step("reachable", c.health.url.clone());
            c.fail("refused", "tls", text)
        }
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            c.fail("unreachable", "reachable", text)
        }
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            c.step("reachable", c.health.url.clone());
            c.fail("refused", "token", text)
        }
        tonic::Code::Unimplemented => c.fail(
            "misconfigured",
            "protocol",
            format!("not a mirror-target, or one too old to be checked: {text}"),
        ),
        tonic::Code::FailedPrecondition => {
            c.step("reachable", c.health.url.clone());
            c.step("token", "accepted");
            c.fail("misconfigured", "protocol", text)
        }
        tonic::Code::NotFound => {
            c.step("reachable", c.health.url.clone());
            c.step("token", "accepted");
            c.fail("misconfigured", "site", text)
        }
        _ => c.fail("misconfigured", "answer", text),
    }
}

/// Checks every target of `channel` (of every channel when `None`), all at once.
pub async fn check_all(app: &App, channel: Option<&str>) -> Vec<pb::TargetHealth> {
    let config = app.config();
    let checks = config
        .channels
        .iter()
        .filter(|ch| channel.is_none_or(|c| c == ch.name))
        .flat_map(|ch| ch.targets.iter().map(move |t| check_target(ch, t)));
    futures::future::join_all(checks).await
}

/// Keeps what a check found: for `channels` and the dashboard, in the metrics, and in
/// the log when a target's status changes.
pub fn record(app: &App, found: &[pb::TargetHealth]) {
    let mut last = app.health.lock().expect("health lock");
    for h in found {
        for s in STATUSES {
            let labels = cms_mirror::observe::labels(&[
                ("channel", &h.channel),
                ("target", &h.target),
                ("status", s),
            ]);
            let on = i64::from(h.status == s);
            app.metrics.target_health.get_or_create(&labels).set(on);
        }
        let key = (h.channel.clone(), h.target.clone());
        let before = last.get(&key).map(|b| b.status.clone());
        if before.as_deref() != Some(h.status.as_str()) {
            if h.status == "ok" {
                tracing::info!(channel = %h.channel, target = %h.target, "target check: ok");
            } else {
                tracing::warn!(channel = %h.channel, target = %h.target, status = %h.status, detail = %h.detail, "target check failed");
            }
        }
        last.insert(key, h.clone());
    }
}

/// Whether a target's sync lag is over its channel's `max_lag_secs` (never synced is
/// not lagging: there is nothing to compare yet).
pub fn lagging(ch: &ChannelConfig, lag_seconds: i64) -> bool {
    ch.max_lag_secs
        .is_some_and(|max| lag_seconds >= 0 && lag_seconds as u64 > max)
}

/// Sets the `lagging` gauges and warns once when a target falls behind.
async fn watch_lag(app: &App, behind: &mut std::collections::HashSet<(String, String)>) {
    let Ok(states) = app.store.channel_states().await else {
        return;
    };
    let now = cms_mirror::now_ms();
    let config = app.config();
    for st in states {
        let Some(ch) = config.channel(&st.channel) else {
            continue;
        };
        let lag = st.last_success_at.map_or(-1, |at| (now - at) / 1000);
        let is = lagging(ch, lag);
        app.metrics
            .target_lagging
            .get_or_create(&Metrics::target(&st.channel, &st.target))
            .set(i64::from(is));
        let key = (st.channel.clone(), st.target.clone());
        if is && behind.insert(key.clone()) {
            tracing::warn!(channel = %st.channel, target = %st.target, lag_seconds = lag, max_lag_secs = ch.max_lag_secs, "target lags behind its channel's max_lag_secs");
        } else if !is && behind.remove(&key) {
            tracing::info!(channel = %st.channel, target = %st.target, "target caught up");
        }
    }
}

/// Checks every target every `every` until `stop`.
pub fn spawn(app: Arc<App>, every: Duration, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut behind = std::collections::HashSet::new();
        loop {
            let found = check_all(&app, None).await;
            record(&app, &found);
            watch_lag(&app, &mut behind).await;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
        }
    });
}
