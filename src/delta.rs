//! Delta transfer: the target cuts the current version of a file (the basis) into
//! content-defined chunks (FastCDC 2020) and sends each one's length and a short BLAKE3;
//! the source cuts its new version the same way and sends each chunk either as a copy
//! of a basis chunk with the same hash or as literal bytes. Content-defined boundaries
//! find the old content again after an insert anywhere in the file (a block-aligned
//! scheme loses every block after it), and matching is one hash-table lookup per chunk
//! rather than one per byte. The whole new body is still checked by its BLAKE3.

use std::collections::HashMap;
use std::io::{self, Read};

use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN};
pub use fastcdc::v2020::{ChunkData, StreamCDC};

/// Bytes of a chunk's BLAKE3 sent in a signature: a false match needs two chunks of the
/// same length whose 64-bit prefixes collide, and the body's full BLAKE3 catches it.
pub const HASH_LEN: usize = 8;
/// Chunks per signature batch (about 100 KiB on the wire).
pub const BATCH_CHUNKS: usize = 8192;
/// Smallest average chunk: below it the signatures weigh more than they save.
pub const MIN_AVG: u32 = 4 * 1024;

/// Chunk sizes of one delta transfer, chosen by the source from the basis's size and
/// used by both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSizes {
    pub avg: u32,
}

impl ChunkSizes {
    /// About two square roots of the size, a power of two between 4 KiB and 4 MiB: a
    /// 64 MiB file is cut into ~4,000 chunks of 16 KiB (~45 KiB of signatures), a
    /// 1 TiB file into ~500,000 of 2 MiB, so the source's index of a basis stays within
    /// a few tens of MiB for any size.
    pub fn for_size(size: u64) -> ChunkSizes {
        let root = (size as f64).sqrt() as u64 * 2;
        let avg = root
            .next_power_of_two()
            .clamp(MIN_AVG as u64, AVERAGE_MAX as u64);
        ChunkSizes { avg: avg as u32 }
    }

    /// The sizes a request names, if the chunker takes them.
    pub fn from_avg(avg: u32) -> Option<ChunkSizes> {
        let ok = (MIN_AVG as usize..=AVERAGE_MAX).contains(&(avg as usize))
            && avg as usize >= AVERAGE_MIN
            && avg.is_power_of_two();
        ok.then_some(ChunkSizes { avg })
    }

    pub fn min(self) -> usize {
        self.avg as usize / 4
    }

    pub fn max(self) -> usize {
        self.avg as usize * 4
    }

    /// Cuts what `r` reads into chunks.
    pub fn chunker<R: Read>(self, r: R) -> StreamCDC<R> {
        StreamCDC::new(r, self.min(), self.avg as usize, self.max())
    }
}

/// The first [`HASH_LEN`] bytes of a chunk's BLAKE3, as a number.
pub fn chunk_hash(data: &[u8]) -> u64 {
    let h = blake3::hash(data);
    let mut b = [0u8; HASH_LEN];
    b.copy_from_slice(&h.as_bytes()[..HASH_LEN]);
    u64::from_le_bytes(b)
}

/// Reads a basis and yields its signatures a batch at a time (lengths, packed hashes).
pub struct Signer<R: Read> {
    cdc: StreamCDC<R>,
}

impl<R: Read> Signer<R> {
    pub fn new(r: R, sizes: ChunkSizes) -> Self {
        Signer {
            cdc: sizes.chunker(r),
        }
    }

    /// The next batch of up to [`BATCH_CHUNKS`] chunks; empty at the end.
    pub fn next_batch(&mut self) -> io::Result<(Vec<u32>, Vec<u8>)> {
        let mut lengths = Vec::new();
        let mut hashes = Vec::new();
        for c in self.cdc.by_ref().take(BATCH_CHUNKS) {
            let c = c.map_err(io::Error::from)?;
            lengths.push(c.length as u32);
            hashes.extend_from_slice(&chunk_hash(&c.data).to_le_bytes());
        }
        Ok((lengths, hashes))
    }
}

/// Where each chunk of a basis lies, by hash.
#[derive(Default)]
pub struct Index {
    chunks: HashMap<u64, (u64, u32)>,
    /// Bytes of the basis covered so far.
    pub size: u64,
}

impl Index {
    /// Adds a batch of signatures (in file order). Refuses a batch whose hashes and
    /// lengths disagree.
    pub fn add(&mut self, lengths: &[u32], hashes: &[u8]) -> Result<(), String> {
        if hashes.len() != lengths.len() * HASH_LEN {
            return Err(format!(
                "{} chunk lengths with {} bytes of hashes",
                lengths.len(),
                hashes.len()
            ));
        }
        for (len, h) in lengths.iter().zip(hashes.chunks_exact(HASH_LEN)) {
            let h = u64::from_le_bytes(h.try_into().expect("HASH_LEN bytes"));
            self.chunks.entry(h).or_insert((self.size, *len));
            self.size += *len as u64;
        }
        Ok(())
    }

    /// The basis offset of a chunk with this hash and length.
    pub fn find(&self, hash: u64, len: usize) -> Option<u64> {
        match self.chunks.get(&hash) {
            Some((at, l)) if *l as usize == len => Some(*at),
            _ => None,
        }
    }

    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(basis: &[u8], sizes: ChunkSizes) -> Index {
        let mut s = Signer::new(basis, sizes);
        let mut ix = Index::default();
        loop {
            let (l, h) = s.next_batch().unwrap();
            if l.is_empty() {
                break;
            }
            ix.add(&l, &h).unwrap();
        }
        ix
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut r = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| r.u8(..)).collect()
    }

    /// Rebuilds `new` from `basis` by the chunks the index finds: the literal bytes
    /// needed and the result.
    fn apply(basis: &[u8], new: &[u8], ix: &Index, sizes: ChunkSizes) -> (usize, Vec<u8>) {
        let mut out = Vec::new();
        let mut literal = 0;
        for c in sizes.chunker(new) {
            let c = c.unwrap();
            match ix.find(chunk_hash(&c.data), c.length) {
                Some(at) => out.extend_from_slice(&basis[at as usize..at as usize + c.length]),
                None => {
                    literal += c.length;
                    out.extend_from_slice(&c.data);
                }
            }
        }
        (literal, out)
    }

    #[test]
    fn an_insert_in_the_middle_costs_a_few_chunks() {
        let basis = noise(4 << 20, 1);
        let mut new = basis.clone();
        new.splice(2 << 20..2 << 20, noise(100, 2));
        let sizes = ChunkSizes::for_size(basis.len() as u64);
        let ix = index_of(&basis, sizes);
        assert_eq!(ix.size, basis.len() as u64);
        let (literal, out) = apply(&basis, &new, &ix, sizes);
        assert_eq!(out, new);
        assert!(
            literal <= 3 * sizes.max(),
            "{literal} literal bytes for a 100-byte insert (avg chunk {})",
            sizes.avg
        );
    }

    #[test]
    fn unrelated_content_finds_nothing() {
        let basis = noise(1 << 20, 3);
        let new = noise(1 << 20, 4);
        let sizes = ChunkSizes::for_size(basis.len() as u64);
        let (literal, out) = apply(&basis, &new, &index_of(&basis, sizes), sizes);
        assert_eq!((literal, out.len()), (new.len(), new.len()));
    }

    #[test]
    fn chunk_sizes_grow_with_the_file_and_stay_in_bounds() {
        assert_eq!(ChunkSizes::for_size(0).avg, MIN_AVG);
        assert_eq!(ChunkSizes::for_size(64 << 20).avg, 16 * 1024);
        assert_eq!(ChunkSizes::for_size(1 << 40).avg, 2 << 20);
        assert_eq!(ChunkSizes::for_size(u64::MAX).avg as usize, AVERAGE_MAX);
        assert!(ChunkSizes::from_avg(16 * 1024).is_some());
        assert!(ChunkSizes::from_avg(1000).is_none());
        assert!(ChunkSizes::from_avg(8 << 20).is_none());
    }

    #[test]
    fn a_batch_whose_parts_disagree_is_refused() {
        let mut ix = Index::default();
        assert!(ix.add(&[10, 20], &[0; 8]).is_err());
    }
}
