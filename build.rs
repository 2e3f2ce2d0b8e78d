//! Generates the gRPC code from `proto/` with protox (no system `protoc` needed) and
//! writes the encoded descriptor set used by server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
