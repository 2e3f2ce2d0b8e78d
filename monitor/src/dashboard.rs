//! `mirrorctl dashboard`: a web page over the source's admin API. One HTML file (no
//! front-end build), a small JSON API and a server-sent event stream fed by WatchJobs.
//!
//! Routes: `/` (channels, running jobs, history), `/jobs/{id}` (one job: per-target
//! progress, item errors, event log), `/api/channels`, `/api/jobs`, `/api/jobs/{id}`,
//! `POST /api/channels/{name}/start`, `/api/channels/{name}/generations`,
//! `POST /api/channels/{name}/rollback[?to=N]`, `POST /api/jobs/{id}/cancel`, and
//! `/api/events[?job=ID]` (SSE: one job replayed then live, or every job live).

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio_stream::StreamExt;

use cms_mirror::pb;

use crate::{Client, channel_json, event_json, job_json};

const PAGE: &str = include_str!("dashboard.html");

#[derive(Clone)]
struct Dash {
    client: Client,
    /// The source's URL, named when it cannot be reached.
    source: std::sync::Arc<str>,
}

/// Serves the dashboard until the process is stopped. Prints
/// `dashboard listening on ADDR` once the socket is bound (port 0 picks a free one).
pub async fn serve(listen: &str, client: Client, source: &str) -> Result<(), crate::CliError> {
    let app = Router::new()
        .route("/", get(index))
        .route("/jobs/{id}", get(job_page))
        .route("/api/channels", get(channels))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/channels/{name}/start", post(start))
        .route("/api/channels/{name}/generations", get(generations))
        .route("/api/channels/{name}/rollback", post(rollback))
        .route("/api/events", get(events))
        .fallback(not_found)
        .with_state(Dash {
            client,
            source: source.into(),
        });
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| cms_mirror::observe::BindError {
            what: "the dashboard",
            addr: listen.into(),
            source,
        })?;
    println!("dashboard listening on {}", l.local_addr()?);
    Ok(axum::serve(l, app).await?)
}

impl Dash {
    /// A gRPC error as an HTTP answer with a JSON body; one of the transport names the
    /// source that cannot be reached.
    fn error(&self, s: tonic::Status) -> Response {
        if matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ) {
            let msg = format!(
                "mirror-source at {} is unreachable: {}",
                self.source,
                s.message()
            );
            return api_error(tonic::Status::new(s.code(), msg));
        }
        api_error(s)
    }
}

/// A gRPC error as an HTTP answer with a JSON body.
fn api_error(s: tonic::Status) -> Response {
    let code = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => StatusCode::CONFLICT,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        code,
        axum::Json(json!({"error": s.message(), "code": s.code().to_string()})),
    )
        .into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(job: &str) -> Html<String> {
    Html(PAGE.replace("{{JOB}}", &escape(job)))
}

/// An error page in the dashboard's own look (its header and styles).
fn error_page(code: StatusCode, title: &str, detail: &str) -> Response {
    let style = PAGE
        .split("<style>")
        .nth(1)
        .and_then(|s| s.split("</style>").next())
        .unwrap_or("");
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}: cms-mirror</title>\
         <style>{style}</style></head><body class=\"error-page\">\
         <header><a href=\"/\">cms-mirror</a><span>{code}</span></header>\
         <main><section><h2>{t}</h2><p>{d}</p><p><a href=\"/\">Back to the dashboard</a></p></section></main>\
         </body></html>",
        t = escape(title),
        d = escape(detail),
        code = code.as_u16(),
    );
    (code, Html(body)).into_response()
}

async fn index() -> Html<String> {
    page("")
}

async fn not_found() -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page on this dashboard.",
    )
}

async fn job_page(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    let mut c = d.client.clone();
    match c.get_job(pb::GetJobRequest { job_id: id.clone() }).await {
        Ok(j) => page(&j.into_inner().id).into_response(),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::NotFound | tonic::Code::InvalidArgument
            ) =>
        {
            error_page(
                StatusCode::NOT_FOUND,
                "No such job",
                &format!("The source knows no job {id}."),
            )
        }
        Err(s) => error_page(
            StatusCode::BAD_GATEWAY,
            "Source unavailable",
            &format!(
                "mirror-source at {} answered {}: {}",
                d.source,
                s.code(),
                s.message()
            ),
        ),
    }
}

async fn channels(State(d): State<Dash>) -> Response {
    let mut c = d.client.clone();
    match c.list_channels(pb::ListChannelsRequest {}).await {
        Ok(r) => axum::Json(
            r.into_inner()
                .channels
                .iter()
                .map(channel_json)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(s) => d.error(s),
    }
}

#[derive(Deserialize)]
struct JobsQuery {
    channel: Option<String>,
    limit: Option<u32>,
}

async fn jobs(State(d): State<Dash>, Query(q): Query<JobsQuery>) -> Response {
    let mut c = d.client.clone();
    let req = pb::ListJobsRequest {
        channel: q.channel.unwrap_or_default(),
        limit: q.limit.unwrap_or(50).min(500),
    };
    match c.list_jobs(req).await {
        Ok(r) => {
            axum::Json(r.into_inner().jobs.iter().map(job_json).collect::<Vec<_>>()).into_response()
        }
        Err(s) => d.error(s),
    }
}

async fn job(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    let mut c = d.client.clone();
    match c.get_job(pb::GetJobRequest { job_id: id }).await {
        Ok(j) => axum::Json(job_json(&j.into_inner())).into_response(),
        Err(s) => d.error(s),
    }
}

/// Refuses a state-changing request sent by a page of another origin (a form or script
/// on some other site the admin has open): its `Origin` must name this dashboard. The
/// refusal, if it is one.
fn cross_origin_refusal(h: &HeaderMap) -> Option<Response> {
    let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return None; // not a browser's cross-site request (curl, scripts)
    };
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.split("://").nth(1).unwrap_or("");
    (host.is_empty() || origin_host != host).then(|| {
        (
            StatusCode::FORBIDDEN,
            axum::Json(json!({"error": format!("cross-origin request from {origin} refused")})),
        )
            .into_response()
    })
}

#[derive(Deserialize)]
struct StartQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn start(
    State(d): State<Dash>,
    Path(name): Path<String>,
    Query(q): Query<StartQuery>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = cross_origin_refusal(&h) {
        return r;
    }
    let req = pb::StartJobRequest {
        channel: name,
        trigger: pb::Trigger::Admin as i32,
        requested_by: "dashboard".into(),
        dry_run: q.dry_run,
        ..Default::default()
    };
    start_job(&d, req).await
}

/// Starts a job for the page; its id as JSON.
async fn start_job(d: &Dash, req: pb::StartJobRequest) -> Response {
    let mut c = d.client.clone();
    match c
        .start_job(cms_mirror::telemetry::inject(tonic::Request::new(req)))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            axum::Json(json!({"job_id": r.job_id, "coalesced": r.coalesced})).into_response()
        }
        Err(s) => d.error(s),
    }
}

async fn generations(State(d): State<Dash>, Path(name): Path<String>) -> Response {
    let mut c = d.client.clone();
    match c
        .list_generations(pb::ListGenerationsRequest { channel: name })
        .await
    {
        Ok(r) => axum::Json(
            r.into_inner()
                .targets
                .iter()
                .map(crate::generations_json)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(s) => d.error(s),
    }
}

#[derive(Deserialize)]
struct RollbackQuery {
    to: Option<u64>,
}

async fn rollback(
    State(d): State<Dash>,
    Path(name): Path<String>,
    Query(q): Query<RollbackQuery>,
    h: HeaderMap,
) -> Response {
    if let Some(r) = cross_origin_refusal(&h) {
        return r;
    }
    let req = pb::StartJobRequest {
        channel: name,
        trigger: pb::Trigger::Admin as i32,
        requested_by: "dashboard".into(),
        rollback: true,
        rollback_to: q.to,
        ..Default::default()
    };
    start_job(&d, req).await
}

async fn cancel(State(d): State<Dash>, Path(id): Path<String>, h: HeaderMap) -> Response {
    if let Some(r) = cross_origin_refusal(&h) {
        return r;
    }
    let mut c = d.client.clone();
    match c.cancel_job(pb::CancelJobRequest { job_id: id }).await {
        Ok(j) => axum::Json(job_json(&j.into_inner())).into_response(),
        Err(s) => d.error(s),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    job: Option<String>,
    channel: Option<String>,
}

/// Server-sent events from WatchJobs. For one job: its stored events, then live ones,
/// ending after `finished`; the SSE id is the per-job sequence number, so a browser
/// that reconnects (`Last-Event-ID`) resumes where it stopped. Without a job: every
/// job's live events.
async fn events(State(d): State<Dash>, Query(q): Query<EventsQuery>, h: HeaderMap) -> Response {
    let job = q.job.unwrap_or_default();
    let since = h
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|_| !job.is_empty())
        .unwrap_or(0);
    let req = pb::WatchJobsRequest {
        live_only: job.is_empty(),
        job_id: job.clone(),
        channel: q.channel.unwrap_or_default(),
        since,
    };
    let mut c = d.client.clone();
    let stream = match c.watch_jobs(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => return d.error(s),
    };
    let one_job = !job.is_empty();
    let sse = stream
        .map_while(move |r| {
            let e = r.ok()?;
            let id = if one_job { e.seq } else { e.id };
            Some(
                Event::default()
                    .id(id.to_string())
                    .data(event_json(&e).to_string()),
            )
        })
        .map(Ok::<_, Infallible>);
    Sse::new(sse)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
