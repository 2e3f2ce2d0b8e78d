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
/// A chunk of a body that continues in a later package ends at a multiple of this file
/// offset, so every chunk starts block-aligned and a target can write it with direct I/O
/// (a target does not rely on it: unaligned chunks go through the page cache).
pub const BODY_ALIGN: u64 = 4096;

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
    /// Decoded payloads held at once by all streams together, from decoding until the
    /// package is staged; a stream waits for room (at least `max_payload_bytes`).
    pub max_decoded_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_bytes: 64 * 1024 * 1024,
            max_payload_bytes: 64 * 1024 * 1024,
            max_entries: 10_000,
            max_path_bytes: 4096,
            max_decoded_bytes: 256 * 1024 * 1024,
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
    seal_with(seq, phase, payload.encode_to_vec(), None, compression)
}

/// Seals what a [`PayloadWriter`] built, with the checksum it computed while the bytes
/// were still in the CPU cache (unless the payload is sent compressed).
pub fn seal_written(
    seq: u64,
    phase: pb::Phase,
    written: PayloadWriter,
    compression: pb::Compression,
) -> pb::Package {
    let (bytes, sum) = written.finish();
    seal_with(seq, phase, bytes, Some(sum), compression)
}

/// `sum`: the XXH3 of `bytes`, when already known.
fn seal_with(
    seq: u64,
    phase: pb::Phase,
    bytes: Vec<u8>,
    sum: Option<u128>,
    compression: pb::Compression,
) -> pb::Package {
    let uncompressed_size = bytes.len() as u64;
    let (wire, used, sum) = match compression {
        pb::Compression::Zstd => match zstd::bulk::compress(&bytes, ZSTD_LEVEL) {
            Ok(z) if z.len() < bytes.len() => (z, pb::Compression::Zstd, None),
            _ => (bytes, pb::Compression::None, sum),
        },
        pb::Compression::None => (bytes, pb::Compression::None, sum),
    };
    let checksum = match sum {
        Some(s) => s.to_be_bytes().to_vec(),
        None => checksum(pb::ChecksumKind::Xxh3128, &wire),
    };
    pb::Package {
        seq,
        checksum,
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
        pb::ChecksumKind::Xxh3128 => twox_hash::XxHash3_128::oneshot(wire).to_be_bytes().to_vec(),
    }
}

/// Builds an encoded [`pb::PackagePayload`] entry by entry, with file data read straight
/// into the payload: a body is copied once from the file, not into a buffer and then
/// into the payload. The bytes are what `prost` would encode for the same entries. The
/// package checksum (XXH3) is fed as the bytes land, a piece of a body at a time, so it
/// reads them from the CPU cache rather than the whole payload again from memory.
#[derive(Default)]
pub struct PayloadWriter {
    buf: Vec<u8>,
    entries: usize,
    /// XXH3 of `buf[..summed]`; stale once the buffer is truncated below `summed`.
    sum: twox_hash::XxHash3_128,
    summed: usize,
    stale: bool,
}

/// Where [`PayloadWriter::push_data`] lets a body's bytes land: at the end of the
/// payload, fed to its checksum as they come.
pub struct BodySink<'a> {
    buf: &'a mut Vec<u8>,
    sum: &'a mut twox_hash::XxHash3_128,
}

impl BodySink<'_> {
    /// Appends what `read` adds to the end of the buffer (read into its spare capacity)
    /// and returns those bytes.
    pub fn append(
        &mut self,
        read: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
    ) -> std::io::Result<&[u8]> {
        let start = self.buf.len();
        let r = read(self.buf);
        // Fed even after an error: the entry is then dropped, which makes the sum stale.
        self.sum.write(&self.buf[start..]);
        r.map(|()| &self.buf[start..])
    }
}

/// A point a [`PayloadWriter`] can be truncated back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    len: usize,
    entries: usize,
}

/// Field numbers of `Entry.data` and of `FileData`'s fields (content.proto).
const ENTRY_DATA: u32 = 2;
const FD_PATH: u32 = 1;
const FD_OFFSET: u32 = 2;
const FD_DATA: u32 = 3;
const FD_LAST: u32 = 4;
const FD_BLAKE3: u32 = 5;

impl PayloadWriter {
    pub fn with_capacity(bytes: usize) -> PayloadWriter {
        PayloadWriter {
            buf: Vec::with_capacity(bytes),
            ..PayloadWriter::default()
        }
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    pub fn mark(&self) -> Mark {
        Mark {
            len: self.buf.len(),
            entries: self.entries,
        }
    }

    /// Drops every entry pushed after `m`.
    pub fn truncate(&mut self, m: Mark) {
        self.buf.truncate(m.len);
        self.entries = m.entries;
        // Rare (a file that changed or failed while read): the sum is computed over the
        // whole payload at the end instead.
        if m.len < self.summed {
            self.stale = true;
            self.summed = m.len;
        }
    }

    pub fn push(&mut self, e: &pb::Entry) {
        prost::encoding::message::encode(1, e, &mut self.buf);
        self.entries += 1;
    }

    /// Pushes a `FileData` entry whose `data` is `len` bytes that `fill` appends through
    /// the sink it is given; `blake3` (of the whole body, on the last chunk) is computed
    /// by `fill` from the bytes it read. When `fill` fails or appends fewer bytes, the
    /// entry is dropped again and the error (or the short count) returned.
    pub fn push_data(
        &mut self,
        path: &str,
        offset: u64,
        len: usize,
        last: bool,
        fill: impl FnOnce(&mut BodySink<'_>, usize) -> std::io::Result<Option<[u8; 32]>>,
    ) -> std::io::Result<Result<(), usize>> {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        let mark = self.mark();
        let hash_len = if last { key_len(FD_BLAKE3) + 1 + 32 } else { 0 };
        let body = (if path.is_empty() {
            0
        } else {
            key_len(FD_PATH) + encoded_len_varint(path.len() as u64) + path.len()
        }) + (if offset == 0 {
            0
        } else {
            key_len(FD_OFFSET) + encoded_len_varint(offset)
        }) + (if len == 0 {
            0
        } else {
            key_len(FD_DATA) + encoded_len_varint(len as u64) + len
        }) + if last { key_len(FD_LAST) + 1 } else { 0 }
            + hash_len;
        let entry = key_len(ENTRY_DATA) + encoded_len_varint(body as u64) + body;
        self.buf
            .reserve(key_len(1) + encoded_len_varint(entry as u64) + entry);
        encode_key(1, WireType::LengthDelimited, &mut self.buf);
        encode_varint(entry as u64, &mut self.buf);
        encode_key(ENTRY_DATA, WireType::LengthDelimited, &mut self.buf);
        encode_varint(body as u64, &mut self.buf);
        if !path.is_empty() {
            encode_key(FD_PATH, WireType::LengthDelimited, &mut self.buf);
            encode_varint(path.len() as u64, &mut self.buf);
            self.buf.extend_from_slice(path.as_bytes());
        }
        if offset != 0 {
            prost::encoding::uint64::encode(FD_OFFSET, &offset, &mut self.buf);
        }
        if len > 0 {
            encode_key(FD_DATA, WireType::LengthDelimited, &mut self.buf);
            encode_varint(len as u64, &mut self.buf);
        }
        let start = self.buf.len();
        self.sum.write(&self.buf[self.summed..]);
        self.summed = start;
        let mut sink = BodySink {
            buf: &mut self.buf,
            sum: &mut self.sum,
        };
        let filled = fill(&mut sink, len);
        self.summed = self.buf.len();
        let hash = match filled {
            Ok(h) => h,
            Err(e) => {
                self.truncate(mark);
                return Err(e);
            }
        };
        let got = self.buf.len() - start;
        if got != len || (last && hash.is_none()) {
            self.truncate(mark);
            return Ok(Err(got));
        }
        if last {
            prost::encoding::bool::encode(FD_LAST, &true, &mut self.buf);
            encode_key(FD_BLAKE3, WireType::LengthDelimited, &mut self.buf);
            encode_varint(32, &mut self.buf);
            self.buf.extend_from_slice(&hash.expect("checked above"));
        }
        self.entries += 1;
        Ok(Ok(()))
    }

    /// The encoded payload and its XXH3.
    pub fn finish(mut self) -> (Vec<u8>, u128) {
        if self.stale {
            let sum = twox_hash::XxHash3_128::oneshot(&self.buf);
            return (self.buf, sum);
        }
        self.sum.write(&self.buf[self.summed..]);
        (self.buf, self.sum.finish_128())
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

/// Bytes a package takes once decoded, as far as its header tells (a package that
/// claims more than `limit` is refused before it is decoded).
pub fn decoded_size(pkg: &pb::Package, limit: usize) -> usize {
    match pb::Compression::try_from(pkg.compression) {
        Ok(pb::Compression::Zstd) => pkg.uncompressed_size.min(limit as u64) as usize,
        _ => pkg.payload.len().min(limit),
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
    let count = count_entries(&bytes, seq)?;
    if count > limits.max_entries {
        return Err(PackageError::TooManyEntries {
            seq,
            count,
            limit: limits.max_entries,
        });
    }
    pb::PackagePayload::decode(bytes).map_err(|e| PackageError::Decode {
        seq,
        message: e.to_string(),
    })
}

/// Counts a payload's entries on the wire, before anything is decoded: an empty entry
/// is two bytes there and hundreds in memory, so the limit must hold before decoding.
/// Walks the top-level fields only (no allocation); refuses bytes that are not a
/// protobuf message.
fn count_entries(mut buf: &[u8], seq: u64) -> Result<usize, PackageError> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    const ENTRIES: u32 = 1;
    let broken = |message: String| PackageError::Decode { seq, message };
    let mut count = 0;
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(|e| broken(e.to_string()))?;
        let skip = match wire {
            WireType::Varint => decode_varint(&mut buf).map(|_| 0),
            WireType::LengthDelimited => decode_varint(&mut buf),
            WireType::SixtyFourBit => Ok(8),
            WireType::ThirtyTwoBit => Ok(4),
            WireType::StartGroup | WireType::EndGroup => {
                return Err(broken(format!(
                    "field {tag}: groups are not part of a package"
                )));
            }
        }
        .map_err(|e| broken(e.to_string()))?;
        if skip > buf.len() as u64 {
            return Err(broken(format!(
                "field {tag} runs past the end of the payload"
            )));
        }
        buf = &buf[skip as usize..];
        count += usize::from(tag == ENTRIES);
    }
    Ok(count)
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

    /// The package checksum is standard XXH3-128 (a peer built with another XXH3
    /// implementation agrees), on the short path and on the long one that takes SIMD.
    #[test]
    fn the_xxh3_checksum_is_the_standard_one() {
        let long: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for (input, expected) in [
            (&b""[..], 0x99aa06d3014798d86001c324468d497f_u128),
            (&long[..], 0xb65af738c61b5fc15d12941f4cf541c5),
        ] {
            let sum = checksum(pb::ChecksumKind::Xxh3128, input);
            assert_eq!(sum, expected.to_be_bytes().to_vec());
            // Fed piece by piece, as the payload writer does.
            let mut streamed = twox_hash::XxHash3_128::new();
            input.chunks(1000).for_each(|c| streamed.write(c));
            assert_eq!(streamed.finish_128(), expected);
        }
    }

    #[test]
    fn payload_writer_encodes_what_prost_encodes() {
        let put = pb::Entry {
            op: Some(pb::entry::Op::Abort(pb::AbortItem {
                path: "gone".into(),
                reason: "changed".into(),
            })),
        };
        let body: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let hash = *blake3::hash(&body).as_bytes();
        let chunk = |offset: u64, data: &[u8], last: bool| pb::Entry {
            op: Some(pb::entry::Op::Data(pb::FileData {
                path: "dir/a.bin".into(),
                offset,
                data: data.to_vec().into(),
                last,
                blake3: if last { hash.to_vec() } else { Vec::new() },
                ..Default::default()
            })),
        };
        let expected = pb::PackagePayload {
            entries: vec![
                put.clone(),
                chunk(0, &body[..200], false),
                chunk(200, &body[200..], true),
            ],
        };
        // Each body lands in pieces, as the packer reads it.
        let fill = |from: usize, to: usize, last: bool| {
            let body = &body;
            move |sink: &mut BodySink<'_>, len: usize| {
                assert!(to - from <= len);
                for piece in body[from..to].chunks(64) {
                    let got = sink.append(|buf| {
                        buf.extend_from_slice(piece);
                        Ok(())
                    })?;
                    assert_eq!(got, piece);
                }
                Ok(last.then_some(hash))
            }
        };
        // Summed as the bytes land, and after a dropped entry (summed again at the end).
        for short_read in [false, true] {
            let mut w = PayloadWriter::default();
            w.push(&put);
            assert!(
                w.push_data("dir/a.bin", 0, 200, false, fill(0, 200, false))
                    .unwrap()
                    .is_ok()
            );
            if short_read {
                let before = w.mark();
                // A short read drops the entry again and says how much came.
                let short = w
                    .push_data("dir/a.bin", 200, 100, true, fill(200, 250, true))
                    .unwrap();
                assert_eq!(short, Err(50));
                assert_eq!(w.mark(), before);
            }
            assert!(
                w.push_data("dir/a.bin", 200, 100, true, fill(200, 300, true))
                    .unwrap()
                    .is_ok()
            );
            assert_eq!(w.entries(), 3);
            let pkg = seal_written(1, pb::Phase::Content, w, pb::Compression::None);
            assert_eq!(pkg.payload, expected.encode_to_vec());
            assert_eq!(
                pkg.checksum,
                checksum(pb::ChecksumKind::Xxh3128, &pkg.payload),
                "short read: {short_read}"
            );
            assert_eq!(open(&pkg, &Limits::default()).unwrap(), expected);
        }
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

    /// Millions of empty entries are counted on the wire and refused before any is
    /// decoded (decoding them all would take gigabytes).
    #[test]
    fn an_entry_count_bomb_is_refused_before_decoding() {
        let entries = 4 * 1024 * 1024;
        let raw = b"\x0a\x00".repeat(entries);
        let mut pkg = seal(1, pb::Phase::Content, &payload(), pb::Compression::Zstd);
        pkg.payload = zstd::bulk::compress(&raw, 3).unwrap().into();
        pkg.uncompressed_size = raw.len() as u64;
        pkg.checksum = checksum(pb::ChecksumKind::Blake3, &pkg.payload);
        pkg.checksum_kind = pb::ChecksumKind::Blake3 as i32;
        let limit = Limits::default().max_entries;
        assert_eq!(
            open(&pkg, &Limits::default()),
            Err(PackageError::TooManyEntries {
                seq: 1,
                count: entries,
                limit
            })
        );
        let cut = [&raw[..], b"\x0a\x05ab"].concat();
        assert_eq!(
            count_entries(&cut, 1).unwrap_err().to_string(),
            "package 1: payload does not decode: field 1 runs past the end of the payload"
        );
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
