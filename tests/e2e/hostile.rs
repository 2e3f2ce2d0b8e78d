//! A hostile client against a real target process: what it sends must cost the target
//! little and be answered precisely.

use cms_mirror::package;
use cms_mirror::pb;

use crate::helpers::*;
use crate::protocol::session;

/// Peak resident memory of a process, in MiB (`VmHWM`).
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024
}

/// A 3 KB package whose payload decompresses to 32 MiB of empty entries (16 Mi of
/// them: two bytes each on the wire, hundreds each once decoded).
fn entry_bomb(seq: u64) -> pb::Package {
    let raw = b"\x0a\x00".repeat(16 << 20);
    let compressed = zstd::bulk::compress(&raw, 3).unwrap();
    pb::Package {
        seq,
        phase: pb::Phase::Content as i32,
        checksum: package::checksum(pb::ChecksumKind::Blake3, &compressed),
        checksum_kind: pb::ChecksumKind::Blake3 as i32,
        compression: pb::Compression::Zstd as i32,
        uncompressed_size: raw.len() as u64,
        payload: compressed.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_count_bomb_is_refused_before_it_is_decoded_even_three_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    // Room for one decoded package at a time, each held 300 ms before it is answered:
    // the three bombs are decoded in turn.
    let metrics = free_addr();
    let target = App::target(tmp.path())
        .site(&tmp.path().join("dst"))
        .args(&[
            "--max-package-bytes",
            "33554432",
            "--max-decoded-bytes",
            "33554432",
        ])
        .args(&["--metrics-listen", &metrics])
        .env("CMS_MIRROR_FAILPOINT_APPLY_DELAY_MS", "300")
        .spawn();
    let pid = target.child.id();
    let before = peak_rss_mib(pid);
    let bomb = entry_bomb(1);
    assert!(bomb.payload.len() < 8192, "{} bytes", bomb.payload.len());
    let streams = (0..3).map(|i| {
        let (url, bomb) = (target.url(), bomb.clone());
        tokio::spawn(async move {
            let (tx, mut acks, _) = session(&url, &format!("bomb-{i}")).await;
            let msg = pb::import_request::Msg::Package(bomb);
            tx.send(pb::ImportRequest { msg: Some(msg) }).await.unwrap();
            acks.message().await.unwrap_err()
        })
    });
    for s in streams.collect::<Vec<_>>() {
        let status = s.await.unwrap();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(
            status
                .message()
                .contains("16777216 entries exceed the limit of"),
            "{status:?}"
        );
    }
    let (_, page) = http_get(&metrics, "/metrics");
    let waits = metric(&page, "mirror_target_decode_waits_total").unwrap_or(0.0);
    assert!(
        waits >= 1.0,
        "no bomb waited for the decode budget:\n{page}"
    );
    // Decoding them would have taken gigabytes; the decompressed bytes are all they
    // cost (what the allocator keeps of them included).
    let peak = peak_rss_mib(pid);
    assert!(
        peak < before + 3 * 32 + 64,
        "peak RSS {peak} MiB (at start {before} MiB)"
    );
    // The target is still serving.
    let (tx, mut acks, _) = session(&target.url(), "after").await;
    let ack = crate::protocol::send(&tx, &mut acks, ok_package()).await;
    assert_eq!(crate::protocol::status(&ack), pb::AckStatus::Ok, "{ack:?}");
}

fn ok_package() -> pb::Package {
    let payload = pb::PackagePayload {
        entries: vec![pb::Entry {
            op: Some(pb::entry::Op::Put(pb::ItemMeta {
                path: "dir".into(),
                kind: pb::ItemKind::Directory as i32,
                mode: 0o755,
                mtime_ns: 1_600_000_000_000_000_000,
                ..Default::default()
            })),
        }],
    };
    package::seal(1, pb::Phase::Content, &payload, pb::Compression::None)
}

/// A codec that sends and receives raw bytes: a client that does not speak protobuf.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

/// Calls `method` (e.g. "/cmsmirror.v1.SourceService/StartJob") with `body` as its
/// request message, whatever it is.
async fn raw_call(url: &str, method: &'static str, body: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap();
    let mut grpc = tonic::client::Grpc::new(ch.connect().await.unwrap());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(tonic::Request::new(body.to_vec()), path, Raw)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn malformed_protobuf_is_the_clients_fault_and_the_log_names_the_peer() {
    let m = Mirror::start(|src| write(src, "a", b"a"), "");
    // Field 1 (a string) claiming more bytes than follow.
    let broken = b"\x0a\xff\xff\xff\x0fabc";
    for (url, method, role) in [
        (
            m.source.url(),
            "/cmsmirror.v1.SourceService/StartJob",
            "source",
        ),
        (
            m.target.url(),
            "/cmsmirror.v1.TargetService/OpenSession",
            "target",
        ),
    ] {
        let e = raw_call(&url, method, broken).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{method}: {e:?}");
        assert!(e.message().starts_with("malformed "), "{e:?}");
        let log = wait_until(std::time::Duration::from_secs(10), || {
            let log = logs(m.tmp.path(), role);
            ready(log.contains("malformed message refused"), || log.clone()).map(|()| log)
        });
        let line = log
            .lines()
            .find(|l| l.contains("malformed message refused"))
            .unwrap();
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
    }
    // A well-formed request still works.
    let ok = pb::StartJobRequest {
        channel: "site".into(),
        ..Default::default()
    };
    let body = prost::Message::encode_to_vec(&ok);
    raw_call(
        &m.source.url(),
        "/cmsmirror.v1.SourceService/StartJob",
        &body,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn free_text_and_lists_from_clients_are_bounded() {
    let m = Mirror::start(|src| write(src, "a", b"a"), "");
    let mut c = pb::source_service_client::SourceServiceClient::connect(m.source.url())
        .await
        .unwrap();
    let huge = pb::StartJobRequest {
        channel: "site".into(),
        requested_by: "x".repeat(3 << 20),
        ..Default::default()
    };
    let e = c.start_job(huge).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        "requested_by is 3145728 bytes long; at most 1024 are accepted"
    );
    let loop_of_tiers = pb::StartJobRequest {
        channel: "site".into(),
        lineage: vec!["t".into(); 1000],
        ..Default::default()
    };
    let e = c.start_job(loop_of_tiers).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("lineage has 1000 entries"), "{e:?}");
    let jobs = c.list_jobs(pb::ListJobsRequest::default()).await.unwrap();
    assert!(
        jobs.into_inner().jobs.is_empty(),
        "a refused request created a job"
    );

    let mut t = pb::target_service_client::TargetServiceClient::connect(m.target.url())
        .await
        .unwrap();
    let e = t
        .open_session(pb::OpenSessionRequest {
            job_id: "j".repeat(100_000),
            site: "main".into(),
            protocol_version: cms_mirror::PROTOCOL_VERSION,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("job_id is 100000 bytes long"),
        "{e:?}"
    );
}

/// A target site whose `links` setting is `links` (None: the default), and a source
/// tree with links inside and outside the site.
fn links_setup(tmp: &std::path::Path, links: Option<&str>) -> (Proc, Proc, std::path::PathBuf) {
    let (src, dst) = (tmp.join("src"), tmp.join("dst"));
    write(&src, "index.html", b"<h1>site</h1>");
    write(&src, "d/page.html", b"page");
    std::os::unix::fs::symlink("../index.html", src.join("d/home")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../../etc", src.join("d/etc")).unwrap();
    let toml = tmp.join("target.toml");
    let setting = links
        .map(|l| format!("links = \"{l}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &toml,
        format!(
            "[[site]]\nname = \"main\"\nroot = \"{}\"\n{setting}",
            dst.display()
        ),
    )
    .unwrap();
    let target = App::target(tmp).config(&toml).spawn();
    let config = write_config(tmp, &src, &target.url(), "");
    let source = App::source(tmp, &config).spawn();
    (target, source, dst)
}

#[test]
fn links_that_leave_the_site_are_refused_by_default_skipped_or_copied_as_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (_t, source, dst) = links_setup(tmp.path(), None);
    let (code, job) = run_job(&source.url(), &[]);
    assert_eq!(code, 1, "{job:#}");
    let mut errors: Vec<(String, String)> = job["item_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().into(),
                e["code"].as_str().unwrap().into(),
            )
        })
        .collect();
    errors.sort();
    let unsafe_link = |p: &str| (p.to_string(), "unsafe_link".to_string());
    assert_eq!(
        errors,
        [unsafe_link("d/etc"), unsafe_link("passwd")],
        "{job:#}"
    );
    let message = job["item_errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("leaves the site"), "{message}");
    assert!(
        dst.join("d/home").is_symlink(),
        "a link inside the site is mirrored"
    );
    assert!(!dst.join("passwd").exists() && !dst.join("d/etc").is_symlink());

    for (links, kept) in [("skip", false), ("copy", true)] {
        let tmp = tempfile::tempdir().unwrap();
        let (_t, source, dst) = links_setup(tmp.path(), Some(links));
        let (code, job) = run_job(&source.url(), &[]);
        assert_eq!(code, 0, "{links}: {job:#}");
        assert_eq!(dst.join("passwd").is_symlink(), kept, "{links}");
        assert_eq!(dst.join("d/etc").is_symlink(), kept, "{links}");
        assert!(dst.join("d/home").is_symlink(), "{links}");
    }
}
