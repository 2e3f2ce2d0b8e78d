//! Generates the gRPC code from `proto/` with protox (no system `protoc` needed) and
//! writes the encoded descriptor set used by server reflection; tells the tests which
//! of their prerequisites this build can count on (see `prerequisites`).

use std::path::PathBuf;

/// Test prerequisites as `cfg`s, so that a test needing what a machine lacks is marked
/// ignored with its reason, never passed without checking: `ci` under CI (`CI=true`),
/// where every prerequisite must be there and a missing one fails its test;
/// `test_database` when `TEST_DATABASE_URL` names a PostgreSQL server; `root_user`
/// when building as root (the full-disk tests mount a tmpfs); `systemd_analyze` when
/// systemd's `systemd-analyze` is on the PATH (the unit files are verified with it).
fn prerequisites() {
    for cfg in ["ci", "test_database", "root_user", "systemd_analyze"] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
    }
    println!("cargo:rerun-if-env-changed=CI");
    println!("cargo:rerun-if-env-changed=TEST_DATABASE_URL");
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        println!("cargo:rustc-cfg=ci");
    }
    if std::env::var("TEST_DATABASE_URL").is_ok_and(|v| !v.is_empty()) {
        println!("cargo:rustc-cfg=test_database");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d.join("systemd-analyze").is_file()) {
        println!("cargo:rustc-cfg=systemd_analyze");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"));
    if uid.and_then(|u| u.split_whitespace().next()) == Some("0") {
        println!("cargo:rustc-cfg=root_user");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    prerequisites();
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    let files = [
        "proto/cmsmirror/v1/content.proto",
        "proto/cmsmirror/v1/target.proto",
        "proto/cmsmirror/v1/source.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("cmsmirror_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // ProstCodec with one change for large messages (see src/transport.rs).
        .codec_path("crate::transport::Codec")
        .bytes(".cmsmirror.v1.Package.payload")
        .bytes(".cmsmirror.v1.FileData.data")
        .compile_fds(fds)?;
    Ok(())
}
