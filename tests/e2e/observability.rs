//! Issue 9: one trace across mirrorctl, source and target (in-process OTLP collector),
//! /metrics after a job, gRPC health following the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::helpers::*;

/// A collected span: (service, name, trace id, span id, parent span id).
#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
}

/// Serves an in-process collector on a free loopback port; its URL.
fn serve_collector(
    rt: &tokio::runtime::Runtime,
    router: tonic::transport::server::Router,
) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
    url
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: s.name,
                        trace: s.trace_id,
                        id: s.span_id,
                        parent: s.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The spans of mirrorctl's trace whose parent is not (yet) in it, the root excepted.
fn orphans(spans: &[Span]) -> Vec<&Span> {
    let Some(root) = spans
        .iter()
        .find(|s| s.service == "mirrorctl" && s.name == "mirrorctl")
    else {
        return Vec::new();
    };
    let ids: std::collections::HashSet<&[u8]> = spans
        .iter()
        .filter(|s| s.trace == root.trace)
        .map(|s| s.id.as_slice())
        .collect();
    spans
        .iter()
        .filter(|s| s.trace == root.trace && s.id != root.id)
        .filter(|s| !ids.contains(s.parent.as_slice()))
        .collect()
}

#[test]
fn one_trace_spans_mirrorctl_source_and_target() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let otlp = serve_collector(
        &rt,
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(collector.clone())),
    );
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let target = App::target(tmp.path()).site(&dst).envs(&env).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).envs(&env).spawn();
    let out = std::process::Command::new(bin_dir().join("mirrorctl"))
        .args(["--source", &source.url(), "start", "site", "--wait"])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&src, &dst);

    // mirrorctl flushed at exit; the services within their batch delay. A span is
    // exported when it ends, so a parent (a stream's RPC span) can arrive in a later
    // batch than its children: wait until every span of the trace links to a parent in
    // the trace (the root excepted).
    let spans = wait_until(Duration::from_secs(20), || {
        let spans = collector.0.lock().unwrap().clone();
        let has = |svc: &str, name: &str| spans.iter().any(|s| s.service == svc && s.name == name);
        let orphans = orphans(&spans);
        if has("mirrorctl", "mirrorctl")
            && has("mirror-source", "job")
            && has("mirror-source", "package_batch")
            && has("mirror-target", "apply_package")
            && orphans.is_empty()
        {
            return Ok(spans);
        }
        Err(format!(
            "spans missing, or with a parent outside the trace: {orphans:#?}\nall spans: {spans:#?}"
        ))
    });
    let root = spans
        .iter()
        .find(|s| s.service == "mirrorctl" && s.name == "mirrorctl")
        .unwrap();
    assert!(root.parent.is_empty(), "mirrorctl's span is the root");
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace == root.trace).collect();
    let by_id: HashMap<&[u8], &Span> = trace.iter().map(|s| (s.id.as_slice(), *s)).collect();
    // The chain from an applied package goes target -> source -> mirrorctl.
    let chain = |s: &Span| -> Vec<(String, String)> {
        let mut v = vec![(s.service.clone(), s.name.clone())];
        let mut cur = s;
        while let Some(p) = by_id.get(cur.parent.as_slice()) {
            v.push((p.service.clone(), p.name.clone()));
            cur = p;
        }
        v
    };
    let apply = trace
        .iter()
        .find(|s| s.service == "mirror-target" && s.name == "apply_package")
        .expect("the target's package spans are in mirrorctl's trace");
    let c = chain(apply);
    let names: Vec<&str> = c.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "apply_package",
            "cmsmirror.v1.TargetService/Import",
            "package_batch",
            "target",
            "job",
            "cmsmirror.v1.SourceService/StartJob",
            "mirrorctl"
        ],
        "{c:?}"
    );
    let services: Vec<&str> = c.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(services[0], "mirror-target");
    assert_eq!(services[1], "mirror-target");
    assert!(
        services[2..6].iter().all(|s| *s == "mirror-source"),
        "{c:?}"
    );
    assert_eq!(services[6], "mirrorctl");
}

/// A body spanning several packages is cut at block boundaries by the source, so the
/// target writes nearly all of it with direct I/O (counted on its /metrics); the copy is
/// exact. Without the source's alignment only the first chunk could go direct.
#[test]
fn large_bodies_are_written_past_the_page_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let size = 2 * 1024 * 1024 + 777;
    write(&src, "media/big.bin", &bytes(3, size));
    write(&src, "index.html", b"<a href=media/big.bin>big</a>");
    let tm = free_addr();
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--metrics-listen", &tm])
        .spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "package_bytes = 262144");
    let source = App::source(tmp.path(), &config).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    assert_same_tree(&src, &dst);
    assert!(
        job["targets"][0]["packages_acked"].as_u64().unwrap() >= 8,
        "{job:#}"
    );
    let (direct, page) = direct_bytes(&tm);
    assert!(
        direct > 0.9 * size as f64,
        "{direct} of {size} bytes direct\n{page}"
    );
    assert_eq!(direct as u64 % 4096, 0, "{page}");
}

#[test]
fn metrics_count_a_jobs_packages_and_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_many(&src, 400);
    let (tm, sm) = (free_addr(), free_addr());
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--metrics-listen", &tm])
        .spawn();
    // One package in flight: package 5 goes out after package 4's checkpoint, so when
    // it is refused once (failpoint) the rewind ends a stream with a sending no
    // checkpoint stored; it is stored at the stream's end and must count too.
    let config = write_config(
        tmp.path(),
        &src,
        &target.url(),
        "package_bytes = 16384\nwindow = 1",
    );
    // A malformed OTLP endpoint is a warning; the service runs on without export.
    let source = App::source(tmp.path(), &config)
        .args(&["--metrics-listen", &sm])
        .envs(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url"),
            ("CMS_MIRROR_FAILPOINT_CORRUPT_SEQ", "5"),
        ])
        .spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0, "{job:#}");
    let t = &job["targets"][0];
    let acked = t["packages_acked"].as_f64().unwrap();
    assert!(acked > 10.0, "{t}");

    let (status, page) = http_get(&sm, "/metrics");
    assert_eq!(status, 200);
    let lbl = "{channel=\"site\",target=\"web1\"}";
    assert_eq!(
        metric(&page, &format!("mirror_packages_acked_total{lbl}")),
        Some(acked),
        "{page}"
    );
    assert_eq!(
        metric(&page, &format!("mirror_bytes_acked_total{lbl}")),
        t["bytes_done"].as_f64(),
        "{page}"
    );
    assert_eq!(
        metric(&page, &format!("mirror_packages_sent_total{lbl}")),
        t["packages_sent"].as_f64(),
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "mirror_jobs_total{channel=\"site\",outcome=\"succeeded\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert!(
        metric(&page, &format!("mirror_sync_lag_seconds{lbl}")).is_some_and(|v| v >= 0.0),
        "{page}"
    );

    let (status, page) = http_get(&tm, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric(&page, "mirror_target_packages_applied_total{site=\"main\"}"),
        Some(acked),
        "{page}"
    );
    assert_eq!(
        metric(&page, "mirror_target_apply_seconds_count{site=\"main\"}"),
        Some(acked),
        "{page}"
    );
    assert_eq!(http_get(&tm, "/nope").0, 404);

    let log = logs(tmp.path(), "source");
    assert!(
        log.contains("OTEL_EXPORTER_OTLP_ENDPOINT=\"not a url\" is not an http:// or https:// URL"),
        "{log}"
    );
}

async fn health(url: &str, service: &str) -> Result<i32, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = c
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        })
        .await?;
    Ok(r.into_inner().status)
}

#[test]
#[cfg_attr(
    not(any(ci, test_database)),
    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
)]
fn health_is_serving_and_not_serving_once_the_database_is_gone() {
    let base = std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL must name a PostgreSQL server for this test");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let name = format!("cmsmirror_test_{}", uuid::Uuid::new_v4().simple());
    let admin = rt.block_on(cms_mirror::db::connect_raw(&base)).unwrap();
    rt.block_on(
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin),
    )
    .unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let tmp = tempfile::tempdir().unwrap();
    let target = App::target(tmp.path())
        .site(&tmp.path().join("dst"))
        .args(&["--db", &url])
        .spawn();
    let svc = "cmsmirror.v1.TargetService";
    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;
    let wait_for = |want: i32| {
        wait_until(Duration::from_secs(15), || {
            let got = rt.block_on(health(&target.url(), svc));
            ready(got.as_ref().ok() == Some(&want), || {
                format!("health {got:?}, want {want}")
            })
        });
        assert_eq!(rt.block_on(health(&target.url(), "")).unwrap(), want);
    };
    wait_for(SERVING);
    rt.block_on(
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {name} WITH (FORCE)"
        )))
        .execute(&admin),
    )
    .unwrap();
    wait_for(NOT_SERVING);
}

/// The services a server lists through gRPC reflection, version `$v` (v1 or v1alpha).
macro_rules! reflection_services {
    ($v:ident, $url:expr) => {{
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        let ch = tonic::transport::Endpoint::from_shared($url.to_string()).unwrap();
        let mut c = ServerReflectionClient::new(ch.connect().await.unwrap());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = c
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        match resp
            .message()
            .await
            .unwrap()
            .expect("an answer")
            .message_response
        {
            Some(MessageResponse::ListServicesResponse(l)) => l
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected answer {other:?}"),
        }
    }};
}

/// Both reflection versions list a service's API (grpcurl speaks v1; grpcui, Postman
/// and Python's grpcio-reflection v1alpha).
#[tokio::test]
async fn both_services_answer_reflection_v1_and_v1alpha() {
    let m = Mirror::start(|src| write(src, "a", b"a"), "");
    for (url, svc) in [
        (m.target.url(), "cmsmirror.v1.TargetService"),
        (m.source.url(), "cmsmirror.v1.SourceService"),
    ] {
        let v1 = reflection_services!(v1, url);
        let v1alpha = reflection_services!(v1alpha, url);
        assert!(v1.iter().any(|s| s == svc), "{v1:?}");
        assert!(v1alpha.iter().any(|s| s == svc), "{v1alpha:?}");
    }
}

/// One OTLP data point: (service, metric name, attributes, value).
type Point = (String, String, String, f64);

/// OTLP metrics received: every data point.
#[derive(Clone, Default)]
struct MetricsCollector(Arc<Mutex<Vec<Point>>>);

#[tonic::async_trait]
impl MetricsService for MetricsCollector {
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
        let mut out = self.0.lock().unwrap();
        for rm in req.into_inner().resource_metrics {
            let service = format!(
                "{:?}",
                rm.resource.map(|r| r.attributes).unwrap_or_default()
            );
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let points = match m.data {
                        Some(Data::Sum(s)) => s.data_points,
                        Some(Data::Gauge(g)) => g.data_points,
                        _ => Vec::new(),
                    };
                    for p in points {
                        let v = match p.value {
                            Some(number_data_point::Value::AsDouble(d)) => d,
                            Some(number_data_point::Value::AsInt(i)) => i as f64,
                            None => continue,
                        };
                        out.push((
                            service.clone(),
                            m.name.clone(),
                            format!("{:?}", p.attributes),
                            v,
                        ));
                    }
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[test]
fn metrics_are_pushed_over_otlp_when_configured() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let collector = MetricsCollector::default();
    let otlp = serve_collector(
        &rt,
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(collector.clone())),
    );
    let env = [
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", otlp.as_str()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let target = App::target(tmp.path()).site(&dst).envs(&env).spawn();
    let config = write_config(tmp.path(), &src, &target.url(), "");
    let source = App::source(tmp.path(), &config).envs(&env).spawn();
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 0);
    let bytes = job["targets"][0]["bytes_done"].as_f64().unwrap();
    let packages = job["targets"][0]["packages_acked"].as_f64().unwrap();
    assert!(bytes > 0.0);
    wait_until(Duration::from_secs(20), || {
        let got = collector.0.lock().unwrap().clone();
        let latest = |svc: &str, name: &str| {
            got.iter()
                .rev()
                .find(|(s, n, a, _)| s.contains(svc) && n == name && a.contains("web1"))
                .map(|p| p.3)
        };
        let exported = latest("mirror-source", "mirror_bytes_acked") == Some(bytes)
            && latest("mirror-source", "mirror_packages_acked") == Some(packages)
            && got.iter().any(|(s, _, _, _)| s.contains("mirror-target"));
        ready(exported, || {
            format!("job's {bytes} bytes / {packages} packages not exported: {got:#?}")
        })
    });
}
