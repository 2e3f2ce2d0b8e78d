//! Direct protocol tests against an in-process target: checksums, duplicates, order,
//! and paths that must be refused.

use std::path::{Path, PathBuf};

use cms_mirror::package;
use cms_mirror::pb;
use cms_mirror::pb::target_service_client::TargetServiceClient;
use mirror_target::apply::Durability;
use mirror_target::{TargetService, TargetSettings, ledger::Ledger};
use tokio_stream::wrappers::ReceiverStream;

struct InProc {
    url: String,
    root: PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_target(dir: &Path) -> InProc {
    let root = dir.join("site");
    let db = cms_mirror::db::connect(
        &format!("sqlite://{}", dir.join("t.db").display()),
        cms_mirror::db::Schema::Target,
    )
    .await
    .unwrap();
    let settings = TargetSettings {
        sites: vec![cms_mirror::config::SiteConfig {
            // Links that leave the site are let through here, to test the defences
            // behind that setting: nothing is ever written through a link.
            links: cms_mirror::config::Links::Copy,
            ..cms_mirror::config::SiteConfig::from_flag(&format!("main={}", root.display()))
                .unwrap()
        }],
        limits: Default::default(),
        durability: Durability::Fsync,
        direct_io: true,
        target_id: "t1".into(),
        session_expiry: mirror_target::DEFAULT_SESSION_EXPIRY,
        min_free_bytes: mirror_target::DEFAULT_MIN_FREE_BYTES,
        signature_cache_bytes: mirror_target::sigcache::DEFAULT_BUDGET,
    };
    let svc = TargetService::new(settings, Ledger::new(db)).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(mirror_target::run(
        listener,
        svc,
        Default::default(),
        async {
            let _ = rx.await;
        },
    ));
    InProc {
        url,
        root: root.canonicalize().unwrap(),
        _stop: tx,
    }
}

fn put_file(path: &str, data: &[u8]) -> Vec<pb::Entry> {
    vec![
        pb::Entry {
            op: Some(pb::entry::Op::Put(pb::ItemMeta {
                path: path.into(),
                kind: pb::ItemKind::File as i32,
                size: data.len() as u64,
                mtime_ns: 1_600_000_000_000_000_000,
                mode: 0o644,
                ..Default::default()
            })),
        },
        pb::Entry {
            op: Some(pb::entry::Op::Data(pb::FileData {
                path: path.into(),
                offset: 0,
                data: data.to_vec().into(),
                last: true,
                blake3: blake3::hash(data).as_bytes().to_vec(),
                ..Default::default()
            })),
        },
    ]
}

fn pkg(seq: u64, entries: Vec<pb::Entry>) -> pb::Package {
    package::seal(
        seq,
        pb::Phase::Content,
        &pb::PackagePayload { entries },
        pb::Compression::None,
    )
}

/// Opens a session and an Import stream; returns the sender and the ack stream.
pub(crate) async fn session(
    url: &str,
    job: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::ImportRequest>,
    tonic::Streaming<pb::ImportResponse>,
    String,
) {
    let mut c = TargetServiceClient::connect(url.to_string()).await.unwrap();
    let s = c
        .open_session(pb::OpenSessionRequest {
            job_id: job.into(),
            site: "main".into(),
            protocol_version: cms_mirror::PROTOCOL_VERSION,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::ImportRequest {
        msg: Some(pb::import_request::Msg::Header(pb::ImportHeader {
            session_id: s.session_id.clone(),
        })),
    })
    .await
    .unwrap();
    let acks = c
        .import(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, acks, s.session_id)
}

pub(crate) async fn send(
    tx: &tokio::sync::mpsc::Sender<pb::ImportRequest>,
    acks: &mut tonic::Streaming<pb::ImportResponse>,
    p: pb::Package,
) -> pb::PackageAck {
    tx.send(pb::ImportRequest {
        msg: Some(pb::import_request::Msg::Package(p)),
    })
    .await
    .unwrap();
    match acks.message().await.unwrap().unwrap().msg {
        Some(pb::import_response::Msg::Ack(a)) => a,
        None => panic!("empty response"),
    }
}

pub(crate) fn status(a: &pb::PackageAck) -> pb::AckStatus {
    pb::AckStatus::try_from(a.status).unwrap()
}

#[tokio::test]
async fn a_package_with_a_wrong_checksum_is_refused_and_nothing_is_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let t = start_target(tmp.path()).await;
    let (tx, mut acks, _) = session(&t.url, "job-1").await;
    let mut p = pkg(1, put_file("x.html", b"hello"));
    let mut payload = p.payload.to_vec();
    let last = payload.len() - 40;
    payload[last] ^= 0xff; // a byte flipped after hashing
    p.payload = payload.into();
    let a = send(&tx, &mut acks, p).await;
    assert_eq!(status(&a), pb::AckStatus::Retry);
    assert!(a.message.contains("checksum mismatch"), "{}", a.message);
    assert!(!t.root.join("x.html").exists());
    // Sent again intact, it is applied.
    let a = send(&tx, &mut acks, pkg(1, put_file("x.html", b"hello"))).await;
    assert_eq!(status(&a), pb::AckStatus::Ok);
    assert_eq!(std::fs::read(t.root.join("x.html")).unwrap(), b"hello");
}

#[tokio::test]
async fn a_package_delivered_twice_is_applied_once() {
    let tmp = tempfile::tempdir().unwrap();
    let t = start_target(tmp.path()).await;
    let (tx, mut acks, _) = session(&t.url, "job-2").await;
    let p = pkg(1, put_file("once.txt", b"original"));
    let a = send(&tx, &mut acks, p.clone()).await;
    assert_eq!(
        (status(&a), a.duplicate, a.items_applied),
        (pb::AckStatus::Ok, false, 1)
    );
    // Change the file behind the target's back: re-applying would overwrite it.
    std::fs::write(t.root.join("once.txt"), b"changed locally").unwrap();
    let a = send(&tx, &mut acks, p.clone()).await;
    assert_eq!((status(&a), a.duplicate), (pb::AckStatus::Ok, true));
    assert_eq!(
        std::fs::read(t.root.join("once.txt")).unwrap(),
        b"changed locally"
    );
    // Also across a reconnect (a new stream of the same session).
    drop(tx);
    let (tx, mut acks, _) = session(&t.url, "job-2").await;
    let a = send(&tx, &mut acks, p).await;
    assert!(a.duplicate);
    assert_eq!(
        std::fs::read(t.root.join("once.txt")).unwrap(),
        b"changed locally"
    );
}

#[tokio::test]
async fn packages_out_of_order_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = start_target(tmp.path()).await;
    let (tx, mut acks, _) = session(&t.url, "job-3").await;
    let a = send(&tx, &mut acks, pkg(2, put_file("skip.txt", b"x"))).await;
    assert_eq!(status(&a), pb::AckStatus::OutOfOrder);
    assert_eq!(a.expected_seq, 1);
    assert!(
        a.message.contains("expected package 1, got 2"),
        "{}",
        a.message
    );
    assert!(!t.root.join("skip.txt").exists());
}

/// A source of another protocol version is refused with both versions named, and the
/// target answers its own version to one it speaks.
#[tokio::test]
async fn a_source_of_an_older_protocol_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let t = start_target(tmp.path()).await;
    let mut c = TargetServiceClient::connect(t.url.clone()).await.unwrap();
    let req = |v| pb::OpenSessionRequest {
        job_id: "job-v".into(),
        site: "main".into(),
        protocol_version: v,
        ..Default::default()
    };
    for old in [0, 1] {
        let e = c.open_session(req(old)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let want = format!("protocol version {old} is not supported by this target");
        assert!(e.message().contains(&want), "{}", e.message());
        assert!(
            e.message()
                .contains(&cms_mirror::PROTOCOL_VERSION.to_string())
        );
    }
    let ok = c
        .open_session(req(cms_mirror::PROTOCOL_VERSION))
        .await
        .unwrap();
    assert_eq!(
        ok.into_inner().protocol_version,
        cms_mirror::PROTOCOL_VERSION
    );
}

#[tokio::test]
async fn hostile_paths_are_refused_and_nothing_leaves_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let t = start_target(tmp.path()).await;
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // A symlinked directory planted on the target before the job.
    std::os::unix::fs::symlink(&outside, t.root.join("planted")).unwrap();
    let (tx, mut acks, _) = session(&t.url, "job-4").await;
    let mut entries = Vec::new();
    for p in [
        "../escape.txt",
        "/abs.txt",
        "a/../../x",
        "planted/x.txt",
        "ok/../x",
        "nul\0.txt",
        ".cms-mirror-staging/x",
        "back\\..\\..\\x",
        "",
        "./dot",
    ] {
        entries.extend(put_file(p, b"evil"));
    }
    let long = format!("{}.html", "n".repeat(300));
    entries.extend(put_file(&long, b"evil"));
    // A symlink created by the package, then an entry through it.
    entries.push(pb::Entry {
        op: Some(pb::entry::Op::Put(pb::ItemMeta {
            path: "a".into(),
            kind: pb::ItemKind::Symlink as i32,
            symlink_target: "/".into(),
            ..Default::default()
        })),
    });
    let a = send(&tx, &mut acks, pkg(1, entries)).await;
    assert_eq!(status(&a), pb::AckStatus::Ok);
    let a2 = send(&tx, &mut acks, pkg(2, put_file("a/x", b"evil"))).await;
    let mut errs: Vec<String> = a
        .item_errors
        .iter()
        .chain(&a2.item_errors)
        .map(|e| format!("{} {}", e.code, e.path))
        .collect();
    errs.sort();
    assert_eq!(errs.len(), 12, "{errs:?}");
    assert!(
        a.item_errors
            .iter()
            .chain(&a2.item_errors)
            .all(|e| e.code == "invalid_path" && !e.message.is_empty()),
        "{errs:?}"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written outside the root"
    );
    assert!(
        !tmp.path().join("escape.txt").exists()
            && !Path::new("/abs.txt").exists()
            && !Path::new("/x").exists()
    );
    // The symlink itself is a legitimate item: it exists as a link, nothing went through it.
    assert_eq!(
        std::fs::read_link(t.root.join("a")).unwrap(),
        Path::new("/")
    );
}

#[tokio::test]
async fn a_directory_turned_into_a_symlink_in_the_same_package_is_not_written_through() {
    let tmp = tempfile::tempdir().unwrap();
    let t = start_target(tmp.path()).await;
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let (tx, mut acks, _) = session(&t.url, "job-5").await;
    let dir = pb::Entry {
        op: Some(pb::entry::Op::Put(pb::ItemMeta {
            path: "a".into(),
            kind: pb::ItemKind::Directory as i32,
            mode: 0o755,
            ..Default::default()
        })),
    };
    assert_eq!(
        status(&send(&tx, &mut acks, pkg(1, vec![dir])).await),
        pb::AckStatus::Ok
    );
    // One package: `a` becomes a link to the outside, then a file below `a`.
    let mut entries = vec![pb::Entry {
        op: Some(pb::entry::Op::Put(pb::ItemMeta {
            path: "a".into(),
            kind: pb::ItemKind::Symlink as i32,
            symlink_target: outside.display().to_string(),
            ..Default::default()
        })),
    }];
    entries.extend(put_file("a/x", b"evil"));
    let a = send(&tx, &mut acks, pkg(2, entries)).await;
    assert_eq!(status(&a), pb::AckStatus::Ok);
    assert!(
        a.item_errors
            .iter()
            .any(|e| e.path == "a/x" && e.code == "invalid_path"),
        "{:?}",
        a.item_errors
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "written through the symlink"
    );
}

#[tokio::test]
async fn unicode_twins_and_duplicate_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = start_target(tmp.path()).await;
    let (tx, mut acks, _) = session(&t.url, "job-uni").await;
    let nfc = "caf\u{e9}.html"; // é precomposed
    let nfd = "cafe\u{301}.html"; // e + combining acute
    let a = send(&tx, &mut acks, pkg(1, put_file(nfc, b"one"))).await;
    assert!(a.item_errors.is_empty(), "{:?}", a.item_errors);
    // Against a name already on the target.
    let a = send(&tx, &mut acks, pkg(2, put_file(nfd, b"two"))).await;
    assert_eq!(status(&a), pb::AckStatus::Ok);
    assert!(
        a.item_errors.iter().any(|e| e.path == nfd
            && e.code == "invalid_path"
            && e.message.contains("Unicode normalisation")),
        "{:?}",
        a.item_errors
    );
    // Within one package (directories too), and a path sent twice.
    let dir = |p: &str| pb::Entry {
        op: Some(pb::entry::Op::Put(pb::ItemMeta {
            path: p.into(),
            kind: pb::ItemKind::Directory as i32,
            mode: 0o755,
            ..Default::default()
        })),
    };
    let mut entries = vec![dir("\u{fc}ber"), dir("u\u{308}ber")]; // ü, u + diaeresis
    entries.extend(put_file("\u{fc}ber/a.txt", b"a"));
    entries.extend(put_file("u\u{308}ber/b.txt", b"b"));
    entries.extend(put_file("same.txt", b"first"));
    entries.extend(put_file("same.txt", b"second"));
    let a = send(&tx, &mut acks, pkg(3, entries)).await;
    let msgs: Vec<String> = a
        .item_errors
        .iter()
        .map(|e| format!("{} {}: {}", e.code, e.path, e.message))
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("invalid_path u\u{308}ber:") && m.contains("Unicode normalisation")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("same.txt") && m.contains("duplicate")),
        "{msgs:?}"
    );
    let names: Vec<String> = std::fs::read_dir(&t.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with(".cms-mirror"))
        .collect();
    assert!(
        names.contains(&nfc.to_string()) && !names.contains(&nfd.to_string()),
        "{names:?}"
    );
    assert!(!t.root.join("u\u{308}ber").exists());
    assert_eq!(std::fs::read(t.root.join(nfc)).unwrap(), b"one");
    assert_eq!(std::fs::read(t.root.join("\u{fc}ber/a.txt")).unwrap(), b"a");
    assert_eq!(std::fs::read(t.root.join("same.txt")).unwrap(), b"first");
    assert_eq!(msgs.len(), 3, "{msgs:?}"); // the twin dir, its file, the duplicate
}

/// The manifest comes zstd-compressed to a caller that asks (the source does: on a slow
/// link the plan waits for it), and plain to one that does not; both read the same.
#[tokio::test]
async fn the_manifest_is_compressed_for_a_caller_that_asks() {
    let tmp = tempfile::tempdir().unwrap();
    let t = start_target(tmp.path()).await;
    let (tx, mut acks, _) = session(&t.url, "job-manifest").await;
    let entries = (0..500)
        .flat_map(|i| {
            put_file(
                &format!("a-page-of-the-site-with-a-long-name-{i:04}.html"),
                b"x",
            )
        })
        .collect();
    let a = send(&tx, &mut acks, pkg(1, entries)).await;
    assert_eq!((status(&a), a.items_applied), (pb::AckStatus::Ok, 500));
    let request = || pb::GetManifestRequest {
        site: "main".into(),
        after_path: String::new(),
    };
    let mut read = Vec::new();
    for asks in [true, false] {
        let mut c = TargetServiceClient::connect(t.url.clone()).await.unwrap();
        if asks {
            c = c.accept_compressed(tonic::codec::CompressionEncoding::Zstd);
        }
        let resp = c.get_manifest(request()).await.unwrap();
        let encoding = resp
            .metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(encoding.as_deref(), asks.then_some("zstd"), "asked: {asks}");
        let mut stream = resp.into_inner();
        let mut paths = Vec::new();
        while let Some(b) = stream.message().await.unwrap() {
            paths.extend(b.entries.into_iter().map(|e| e.meta.unwrap().path));
        }
        read.push(paths);
    }
    assert_eq!(read[0].len(), 500);
    assert_eq!(read[0], read[1]);
}
