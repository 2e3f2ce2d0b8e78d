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
    #[error("package {seq}: unsupported compression {0}", .compression)]
    Compression { seq: u64, compression: i32 },
    #[error("package {seq}: payload does not decode: {message}")]
    Decode { seq: u64, message: String },
}

impl PackageError {
    /// Whether sending the same package again could succeed (transport corruption).
    pub fn retryable(&self) -> bool {
        matches!(self, PackageError::Checksum { .. })
    }
}

/// Seals a payload into a package: encodes it and computes its checksum.
pub fn seal(seq: u64, phase: pb::Phase, payload: &pb::PackagePayload) -> pb::Package {
    let bytes = payload.encode_to_vec();
    let checksum = blake3::hash(&bytes).as_bytes().to_vec();
    pb::Package {
        seq,
        checksum,
        uncompressed_size: bytes.len() as u64,
        payload: bytes.into(),
        compression: pb::Compression::None as i32,
        phase: phase as i32,
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
    let actual = blake3::hash(&pkg.payload);
    if actual.as_bytes().as_slice() != pkg.checksum.as_slice() {
        return Err(PackageError::Checksum {
            seq,
            expected: crate::model::hex(&pkg.checksum),
            actual: actual.to_hex().to_string(),
        });
    }
    if pkg.compression != pb::Compression::None as i32 {
        return Err(PackageError::Compression {
            seq,
            compression: pkg.compression,
        });
    }
    let payload =
        pb::PackagePayload::decode(pkg.payload.clone()).map_err(|e| PackageError::Decode {
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
        let pkg = seal(7, pb::Phase::Content, &payload());
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
    fn limits_refuse_before_decoding() {
        let pkg = seal(1, pb::Phase::Content, &payload());
        let small = Limits {
            max_payload_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            open(&pkg, &small),
            Err(PackageError::TooLarge { .. })
        ));
    }
}
