//! Packages: the unit of transfer and acknowledgement.
//!
//! A package carries an encoded [`pb::PackagePayload`] and a BLAKE3 checksum of the bytes
//! as sent. The target verifies the checksum and the limits *before* decoding anything,
//! so a corrupted or hostile package is refused without being applied.

use prost::Message;

use crate::pb;

/// Default bytes of file data per package (a few MiB: large enough to amortise the
/// per-package fsync and ack, small enough to bound memory with a window in flight).
pub const DEFAULT_PACKAGE_BYTES: usize = 4 * 1024 * 1024;
/// Default most entries in one package (bounds per-package work on tiny files).
pub const DEFAULT_MAX_ENTRIES: usize = 2000;

/// Limits a target enforces on what it receives.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest gRPC message accepted (a package plus its framing).
    pub max_message_bytes: usize,
    /// Largest decoded payload.
    pub max_payload_bytes: usize,
    pub max_entries: usize,
    /// Longest relative path, in bytes.
    pub max_path_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_bytes: 64 * 1024 * 1024,
            max_payload_bytes: 64 * 1024 * 1024,
            max_entries: 10_000,
            max_path_bytes: 4096,
        }
    }
}

/// Why a package was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackageError {
    #[error("package {seq}: checksum mismatch (expected {expected}, computed {actual})")]
    Checksum {
        seq: u64,
        expected: String,
        actual: String,
    },
    #[error("package {seq}: payload of {size} bytes exceeds the limit of {limit}")]
    TooLarge { seq: u64, size: usize, limit: usize },
    #[error("package {seq}: {count} entries exceed the limit of {limit}")]
    TooManyEntries {
        seq: u64,
        count: usize,
        limit: usize,
    },
    #[error(
        "package {seq}: decompresses to more than its declared {declared} bytes (limit {limit}); refused as a compression bomb"
    )]
    Inflates {
        seq: u64,
        declared: u64,
        limit: usize,
    },
    #[error("package {seq}: unsupported compression {0}", .compression)]
    Compression { seq: u64, compression: i32 },
    #[error("package {seq}: unsupported checksum kind {kind}")]
    ChecksumKind { seq: u64, kind: i32 },
    #[error("package {seq}: payload does not decode: {message}")]
    Decode { seq: u64, message: String },
}

impl PackageError {
    /// Whether sending the same package again could succeed (transport corruption).
    pub fn retryable(&self) -> bool {
        matches!(self, PackageError::Checksum { .. })
    }

    /// Whether the package broke a size limit (the peer is refused, not the package).
    pub fn over_limit(&self) -> bool {
        matches!(
            self,
            PackageError::TooLarge { .. }
                | PackageError::TooManyEntries { .. }
                | PackageError::Inflates { .. }
        )
    }
}

/// Seals a payload into a package: encodes it, compresses it when asked and when that
/// makes it smaller, and computes the checksum of the bytes on the wire.
pub fn seal(
    seq: u64,
    phase: pb::Phase,
    payload: &pb::PackagePayload,
    compression: pb::Compression,
) -> pb::Package {
    let bytes = payload.encode_to_vec();
    let uncompressed_size = bytes.len() as u64;
    let (wire, used) = match compression {
        pb::Compression::Zstd => match zstd::bulk::compress(&bytes, ZSTD_LEVEL) {
            Ok(z) if z.len() < bytes.len() => (z, pb::Compression::Zstd),
            _ => (bytes, pb::Compression::None),
        },
        pb::Compression::None => (bytes, pb::Compression::None),
    };
    pb::Package {
        seq,
        checksum: checksum(pb::ChecksumKind::Xxh3128, &wire),
        uncompressed_size,
        payload: wire.into(),
        compression: used as i32,
        phase: phase as i32,
        checksum_kind: pb::ChecksumKind::Xxh3128 as i32,
    }
}

/// The checksum of a package's wire bytes. It guards the transfer only (a peer that
/// means harm can compute any checksum; tokens and TLS keep it out); every body is also
/// verified end to end by its BLAKE3, so the package checksum can be the cheaper XXH3.
pub fn checksum(kind: pb::ChecksumKind, wire: &[u8]) -> Vec<u8> {
    match kind {
        pb::ChecksumKind::Blake3 => blake3::hash(wire).as_bytes().to_vec(),
        pb::ChecksumKind::Xxh3128 => xxhash_rust::xxh3::xxh3_128(wire).to_be_bytes().to_vec(),
    }
}

const ZSTD_LEVEL: i32 = 3;
/// Largest zstd window a target accepts (16 MiB): bounds the decoder's memory whatever
/// a frame header asks for. The encoder's level 3 stays well below it.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Decompresses exactly the declared size (itself within `limit`) into a buffer
/// allocated once: a payload that would inflate further is refused at the first extra
/// byte, so a bomb never costs more than the declared size plus the decoder's window.
fn decompress(pkg: &pb::Package, limit: usize) -> Result<bytes::Bytes, PackageError> {
    use std::io::Read;
    let seq = pkg.seq;
    let declared = pkg.uncompressed_size;
    if declared > limit as u64 {
        return Err(PackageError::TooLarge {
            seq,
            size: declared as usize,
            limit,
        });
    }
    let decode_err = |message: String| PackageError::Decode { seq, message };
    let mut d = zstd::stream::read::Decoder::with_buffer(&pkg.payload[..])
        .map_err(|e| decode_err(format!("zstd: {e}")))?;
    d.window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(|e| decode_err(format!("zstd: {e}")))?;
    let mut out = vec![0u8; declared as usize];
    d.read_exact(&mut out).map_err(|e| {
        decode_err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                format!("decompresses to fewer bytes than the declared {declared}")
            }
            _ => format!("zstd: {e}"),
        })
    })?;
    let mut extra = [0u8; 1];
    match d.read(&mut extra) {
        Ok(0) => Ok(out.into()),
        Ok(_) => Err(PackageError::Inflates {
            seq,
            declared,
            limit,
        }),
        Err(e) => Err(decode_err(format!("zstd: {e}"))),
    }
}

/// Verifies a package against its checksum and the limits, then decodes it.
pub fn open(pkg: &pb::Package, limits: &Limits) -> Result<pb::PackagePayload, PackageError> {
    let seq = pkg.seq;
    if pkg.payload.len() > limits.max_payload_bytes {
        return Err(PackageError::TooLarge {
            seq,
            size: pkg.payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    let Ok(kind) = pb::ChecksumKind::try_from(pkg.checksum_kind) else {
        return Err(PackageError::ChecksumKind {
            seq,
            kind: pkg.checksum_kind,
        });
    };
    let actual = checksum(kind, &pkg.payload);
    if actual != pkg.checksum {
        return Err(PackageError::Checksum {
            seq,
            expected: crate::model::hex(&pkg.checksum),
            actual: crate::model::hex(&actual),
        });
    }
    let bytes = match pb::Compression::try_from(pkg.compression) {
        Ok(pb::Compression::None) => pkg.payload.clone(),
        Ok(pb::Compression::Zstd) => decompress(pkg, limits.max_payload_bytes)?,
        Err(_) => {
            return Err(PackageError::Compression {
                seq,
                compression: pkg.compression,
            });
        }
    };
    let payload = pb::PackagePayload::decode(bytes).map_err(|e| PackageError::Decode {
        seq,
        message: e.to_string(),
    })?;
    if payload.entries.len() > limits.max_entries {
        return Err(PackageError::TooManyEntries {
            seq,
            count: payload.entries.len(),
            limit: limits.max_entries,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> pb::PackagePayload {
        pb::PackagePayload {
            entries: vec![pb::Entry {
                op: Some(pb::entry::Op::Data(pb::FileData {
                    path: "a".into(),
                    data: vec![1u8; 100].into(),
                    ..Default::default()
                })),
            }],
        }
    }

    #[test]
    fn round_trip_and_flipped_byte() {
        let pkg = seal(7, pb::Phase::Content, &payload(), pb::Compression::None);
        assert_eq!(open(&pkg, &Limits::default()).unwrap(), payload());
        let mut bad = pkg.clone();
        let mut v = bad.payload.to_vec();
        v[10] ^= 1;
        bad.payload = v.into();
        let err = open(&bad, &Limits::default()).unwrap_err();
        assert!(
            matches!(err, PackageError::Checksum { seq: 7, .. }),
            "{err}"
        );
        assert!(err.retryable());
    }

    #[test]
    fn both_checksum_kinds_are_verified_and_an_unknown_one_is_refused() {
        let mut pkg = seal(5, pb::Phase::Content, &payload(), pb::Compression::None);
        assert_eq!(pkg.checksum_kind, pb::ChecksumKind::Xxh3128 as i32);
        assert_eq!(pkg.checksum.len(), 16);
        // A sender that predates the field (BLAKE3, kind 0) is still understood.
        pkg.checksum_kind = pb::ChecksumKind::Blake3 as i32;
        assert!(matches!(
            open(&pkg, &Limits::default()),
            Err(PackageError::Checksum { seq: 5, .. })
        ));
        pkg.checksum = blake3::hash(&pkg.payload).as_bytes().to_vec();
        assert_eq!(open(&pkg, &Limits::default()).unwrap(), payload());
        pkg.checksum_kind = 9;
        let err = open(&pkg, &Limits::default()).unwrap_err();
        assert_eq!(err, PackageError::ChecksumKind { seq: 5, kind: 9 });
        assert!(!err.retryable());
    }

    #[test]
    fn limits_refuse_before_decoding() {
        let pkg = seal(1, pb::Phase::Content, &payload(), pb::Compression::None);
        let small = Limits {
            max_payload_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            open(&pkg, &small),
            Err(PackageError::TooLarge { .. })
        ));
    }

    #[test]
    fn zstd_round_trip_and_a_bomb_is_refused_within_the_limit() {
        let pkg = seal(3, pb::Phase::Content, &payload(), pb::Compression::Zstd);
        assert_eq!(pkg.compression, pb::Compression::Zstd as i32);
        assert!(pkg.payload.len() < pkg.uncompressed_size as usize);
        assert_eq!(open(&pkg, &Limits::default()).unwrap(), payload());

        // 256 MiB of zeros in a few KiB, declared as small.
        let zeros = vec![0u8; 256 << 20];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        drop(zeros);
        let mut p = pb::Package {
            seq: 9,
            checksum: blake3::hash(&bomb).as_bytes().to_vec(),
            uncompressed_size: 1000,
            payload: bomb.into(),
            compression: pb::Compression::Zstd as i32,
            phase: pb::Phase::Content as i32,
            checksum_kind: pb::ChecksumKind::Blake3 as i32,
        };
        let err = open(&p, &Limits::default()).unwrap_err();
        assert!(
            matches!(err, PackageError::Inflates { seq: 9, .. }),
            "{err}"
        );
        assert!(err.over_limit());
        // Declared honestly, it is refused before any decompression.
        p.uncompressed_size = 256 << 20;
        let err = open(&p, &Limits::default()).unwrap_err();
        assert!(matches!(err, PackageError::TooLarge { .. }), "{err}");
    }

    use proptest::prelude::*;

    proptest! {
        /// Fuzz target (`scripts/fuzz.sh` runs it long): any bytes, any declared size and
        /// compression, with a checksum that matches or not: `open` returns, never
        /// panics, and what it accepts is within the limits.
        #[test]
        fn fuzz_open_never_panics(
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
            declared in prop_oneof![Just(0u64), 0u64..4096, any::<u64>()],
            compression in 0i32..4,
            fix_checksum in any::<bool>(),
            checksum_kind in 0i32..3,
        ) {
            let limits = Limits { max_payload_bytes: 1 << 20, max_entries: 64, ..Limits::default() };
            let checksum = match pb::ChecksumKind::try_from(checksum_kind) {
                Ok(k) if fix_checksum => super::checksum(k, &payload),
                _ => vec![0; 32],
            };
            let pkg = pb::Package {
                seq: 1, checksum, uncompressed_size: declared, payload: payload.into(),
                compression, phase: 0, checksum_kind,
            };
            if let Ok(p) = open(&pkg, &limits) {
                prop_assert!(p.entries.len() <= limits.max_entries);
            }
        }

        /// A real package with bytes flipped after sealing (checksum recomputed, so the
        /// decoder and the decompressor see the damage).
        #[test]
        fn fuzz_damaged_packages_are_refused_cleanly(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            zstd in any::<bool>(),
        ) {
            let c = if zstd { pb::Compression::Zstd } else { pb::Compression::None };
            let mut pkg = seal(2, pb::Phase::Content, &payload(), c);
            let mut v = pkg.payload.to_vec();
            for (i, x) in flips {
                let i = i.index(v.len());
                v[i] ^= x | 1;
            }
            pkg.checksum = checksum(pb::ChecksumKind::Xxh3128, &v);
            pkg.payload = v.into();
            let _ = open(&pkg, &Limits::default());
        }
    }
}
