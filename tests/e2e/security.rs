//! Issue 8: bearer tokens (with rotation) and TLS / mutual TLS, with real processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cms_mirror::pb;
use cms_mirror::pb::target_service_client::TargetServiceClient;
use cms_mirror::security::ClientAuth;

use crate::helpers::*;

/// Opens a session on a target with the given client settings; the error's code when refused.
async fn open_session(url: &str, auth: &ClientAuth) -> Result<(), tonic::Status> {
    let ch = auth
        .connect(url)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    TargetServiceClient::new(ch)
        .open_session(pb::OpenSessionRequest {
            job_id: "direct".into(),
            site: "main".into(),
            protocol_version: cms_mirror::PROTOCOL_VERSION,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

fn token_auth(token: &str) -> ClientAuth {
    ClientAuth {
        token: Some(token.into()),
        ..Default::default()
    }
}

/// A job through mirrorctl that must succeed and leave the target equal to the source.
fn run_ok(url: &str, env: &[(&str, &str)], src: &Path, dst: &Path) {
    let out = mirrorctl_env(url, env, &["start", "site", "--wait", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(job_of(&out)["state"], "succeeded", "{err}");
    assert_same_tree(src, dst);
}

const ADMIN: &str = "admin-token-7f3a9c1e5b";
const OLD: &str = "s2t-old-token-0c4e8a2f";
const NEW: &str = "s2t-new-token-9d1b7e3a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_every_rpc_and_rotate_without_a_failed_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let (admin_file, target_tokens, source_token) = (
        tmp.path().join("admin.tokens"),
        tmp.path().join("target.tokens"),
        tmp.path().join("to-target.token"),
    );
    std::fs::write(&admin_file, format!("# admin clients\n{ADMIN}\n")).unwrap();
    // The overlap: the target accepts the old and the new source-to-target token.
    std::fs::write(&target_tokens, format!("{OLD}\n{NEW}\n")).unwrap();
    std::fs::write(&source_token, format!("{OLD}\n")).unwrap();
    let tt = target_tokens.to_str().unwrap();
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--auth-tokens", tt])
        .spawn();
    let extra = format!("token_file = \"{}\"", source_token.display());
    let config = write_config(tmp.path(), &src, &target.url(), "");
    // The token file belongs to the target entry.
    let text = std::fs::read_to_string(&config).unwrap() + &format!("  {extra}\n");
    std::fs::write(&config, text).unwrap();
    let source = App::source(tmp.path(), &config)
        .args(&["--auth-tokens", admin_file.to_str().unwrap()])
        .spawn();
    let url = source.url();

    // Admin API: no token, a wrong token, the source-to-target token: all refused.
    for (env, why) in [
        (vec![], "missing bearer token"),
        (
            vec![("MIRROR_TOKEN", "not-the-admin-token-123")],
            "invalid bearer token",
        ),
        (vec![("MIRROR_TOKEN", OLD)], "invalid bearer token"),
    ] {
        let out = mirrorctl_env(&url, &env, &["start", "site"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("Unauthenticated") || err.contains("unauthenticated"),
            "{err}"
        );
        assert!(err.contains(why), "{err}");
        assert!(
            !err.contains("not-the-admin") && !err.contains(OLD),
            "a secret echoed: {err}"
        );
    }
    let admin = [("MIRROR_TOKEN", ADMIN)];
    let jobs = mirrorctl_env(&url, &admin, &["jobs", "--json"]);
    assert!(jobs.status.success());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&jobs.stdout).unwrap(),
        serde_json::json!([]),
        "a refused request created a job"
    );
    assert!(!dst.exists() || std::fs::read_dir(&dst).unwrap().next().is_none());

    // Target API: no token or the admin token: refused before anything is opened.
    let turl = target.url();
    for auth in [ClientAuth::default(), token_auth(ADMIN)] {
        let e = open_session(&turl, &auth).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    }

    // With the old token during the overlap.
    run_ok(&url, &admin, &src, &dst);

    // The source switches to the new token while the target still accepts both.
    std::fs::write(&source_token, format!("{NEW}\n")).unwrap();
    write(&src, "rotated.txt", b"after the rotation");
    run_ok(&url, &admin, &src, &dst);

    // The overlap ends (no restart): the old token is refused, the new one works.
    std::fs::write(&target_tokens, format!("{NEW}\n")).unwrap();
    let e = wait_for(Duration::from_secs(10), || async {
        match open_session(&turl, &token_auth(OLD)).await {
            Ok(_) => Err("the old token is still accepted".to_string()),
            Err(e) => Ok(e),
        }
    })
    .await;
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("invalid bearer token"), "{e:?}");
    open_session(&turl, &token_auth(NEW)).await.unwrap();

    // A source still on the old token: the job fails with the reason, nothing applied.
    std::fs::write(&source_token, format!("{OLD}\n")).unwrap();
    let before = snapshot(&dst);
    write(&src, "late.txt", b"must not arrive");
    let out = mirrorctl_env(&url, &admin, &["start", "site", "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let j = job_of(&out);
    let why = j["targets"][0]["error"].as_str().unwrap();
    assert!(why.contains("invalid bearer token"), "{why}");
    assert!(!why.contains(OLD), "{why}");
    assert_eq!(snapshot(&dst), before);
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "cms-mirror test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, eku: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![eku];
        let k = KeyPair::generate().unwrap();
        (p.signed_by(&k, &issuer).unwrap().pem(), k.serialize_pem())
    };
    let (server, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(
        vec!["mirror-source".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: w("ca.pem", &ca_cert.pem()),
        cert: w("server.pem", &server),
        key: w("server.key", &server_key),
        client_cert: w("client.pem", &client),
        client_key: w("client.key", &client_key),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_between_all_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    make_tree(&src);
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    // The target requires a client certificate (mutual TLS); the source serves TLS.
    let tls = [
        "--tls-cert".to_string(),
        s(&pki.cert),
        "--tls-key".into(),
        s(&pki.key),
    ];
    let mut target_args: Vec<&str> = tls.iter().map(String::as_str).collect();
    let ca = s(&pki.ca);
    target_args.extend(["--tls-client-ca", &ca]);
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&target_args)
        .spawn();
    let turl = format!("https://{}", target.addr);
    let config = write_config(tmp.path(), &src, &turl, "");
    let text = std::fs::read_to_string(&config).unwrap()
        + &format!(
            "  ca_file = \"{}\"\n  cert_file = \"{}\"\n  key_file = \"{}\"\n",
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        );
    std::fs::write(&config, text).unwrap();
    let source_args: Vec<&str> = tls.iter().map(String::as_str).collect();
    let source = App::source(tmp.path(), &config).args(&source_args).spawn();
    let url = format!("https://{}", source.addr);

    // mirrorctl over TLS, trusting the test CA: a whole job, source -> target over mTLS.
    run_ok(&url, &[("MIRROR_CA_FILE", &ca)], &src, &dst);

    // Without the CA the source's certificate is not trusted; plain HTTP gets nowhere.
    let out = mirrorctl_env(&url, &[], &["jobs"]);
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "{err}"
    );
    let out = mirrorctl_env(&source.url(), &[], &["jobs"]);
    assert_eq!(out.status.code(), Some(3));

    // A client that trusts the target but has no certificate fails the handshake.
    let no_cert = ClientAuth {
        ca_file: Some(pki.ca.clone()),
        ..Default::default()
    };
    let e = open_session(&turl, &no_cert).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    // With the client certificate the same call is accepted.
    let with_cert = ClientAuth {
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
        ..no_cert
    };
    open_session(&turl, &with_cert).await.unwrap();
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Sends one package on a fresh session; the stream's answer.
async fn import_one(url: &str, job: &str, p: pb::Package) -> Result<pb::PackageAck, tonic::Status> {
    use tokio_stream::wrappers::ReceiverStream;
    let mut c = TargetServiceClient::connect(url.to_string())
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX);
    let s = c
        .open_session(pb::OpenSessionRequest {
            job_id: job.into(),
            site: "main".into(),
            protocol_version: cms_mirror::PROTOCOL_VERSION,
            ..Default::default()
        })
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::ImportRequest {
        msg: Some(pb::import_request::Msg::Header(pb::ImportHeader {
            session_id: s.session_id,
        })),
    })
    .await
    .unwrap();
    tx.send(pb::ImportRequest {
        msg: Some(pb::import_request::Msg::Package(p)),
    })
    .await
    .unwrap();
    let mut acks = c.import(ReceiverStream::new(rx)).await?.into_inner();
    match acks.message().await? {
        Some(pb::ImportResponse {
            msg: Some(pb::import_response::Msg::Ack(a)),
        }) => Ok(a),
        other => panic!("unexpected answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_and_a_compression_bomb_are_refused_within_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    write(&dst, "keep.html", b"the site as it was");
    let before = snapshot(&dst);
    const LIMIT: usize = 4 << 20;
    let target = App::target(tmp.path())
        .site(&dst)
        .args(&["--max-package-bytes", &LIMIT.to_string()])
        .spawn();
    let url = target.url();
    let file = |data: Vec<u8>| pb::PackagePayload {
        entries: vec![
            pb::Entry {
                op: Some(pb::entry::Op::Put(pb::ItemMeta {
                    path: "big.bin".into(),
                    kind: pb::ItemKind::File as i32,
                    size: data.len() as u64,
                    mode: 0o644,
                    ..Default::default()
                })),
            },
            pb::Entry {
                op: Some(pb::entry::Op::Data(pb::FileData {
                    path: "big.bin".into(),
                    blake3: blake3::hash(&data).as_bytes().to_vec(),
                    data: data.into(),
                    last: true,
                    ..Default::default()
                })),
            },
        ],
    };
    // Warm up (first session, pools, allocator), then measure from here.
    let ok = import_one(&url, "warm", package_seal(file(vec![1; 1000]), false))
        .await
        .unwrap();
    assert!(
        ok.status == pb::AckStatus::Ok as i32 && ok.item_errors.is_empty(),
        "{ok:?}"
    );
    std::fs::remove_file(dst.join("big.bin")).unwrap();
    let base = peak_rss(target.child.id());

    // 1. A message larger than the target takes: refused by the gRPC layer.
    let e = import_one(
        &url,
        "big",
        package_seal(file(vec![7; LIMIT + (2 << 20)]), false),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ) && e.message().contains("too large"),
        "{e:?}"
    );

    // 2. A payload within the message limit but over the package limit: OUT_OF_RANGE.
    let e = import_one(
        &url,
        "over",
        package_seal(file(vec![7; LIMIT + 1000]), false),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("exceeds the limit"), "{e:?}");

    // 3. A compression bomb: 128 MiB of zeros (32x the limit) in a few KiB, declared small.
    let mut bomb = package_seal(file(vec![0; 128 << 20]), true);
    bomb.uncompressed_size = LIMIT as u64;
    assert!(bomb.payload.len() < 1 << 20, "{}", bomb.payload.len());
    let e = import_one(&url, "bomb", bomb.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("compression bomb"), "{e:?}");
    // Declared with its true size: refused before decompressing.
    bomb.uncompressed_size = 128 << 20;
    let e = import_one(&url, "bomb2", bomb).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");

    let grown = peak_rss(target.child.id()).saturating_sub(base);
    // The declared size (4 MiB), the zstd window (at most 16 MiB), message buffers.
    assert!(
        grown < 48 << 20,
        "the target's peak memory grew by {} MiB",
        grown >> 20
    );
    // (Uncommitted sessions keep their staging area; it is not part of the site.)
    let mut after = snapshot(&dst);
    after.retain(|p, _| !p.starts_with(".cms-mirror-staging"));
    assert_eq!(after, before, "the site changed");
}

/// Seals a payload, compressed with zstd or not.
fn package_seal(payload: pb::PackagePayload, zstd: bool) -> pb::Package {
    let c = if zstd {
        pb::Compression::Zstd
    } else {
        pb::Compression::None
    };
    cms_mirror::package::seal(1, pb::Phase::Content, &payload, c)
}
