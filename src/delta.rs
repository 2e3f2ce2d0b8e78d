//! Delta transfer: the target cuts the current version of a file (the basis) into
//! content-defined chunks (FastCDC 2020) and sends each one's length and a 64-bit hash;
//! the source cuts its new version the same way and sends each chunk either as a copy
//! of a basis chunk with the same hash and length or as literal bytes. Content-defined
//! boundaries find the old content again after an insert anywhere in the file (a
//! block-aligned scheme loses every block after it), and matching is one hash-table
//! lookup per chunk rather than one per byte. Chunks are told apart by XXH3 (as rsync's
//! block checksums are): a false match would need two chunks of one length whose
//! 64-bit hashes collide, and the whole new body is still checked by its BLAKE3 before
//! it is published, so a collision can fail a file but never corrupt it.

use std::collections::HashMap;
use std::io::{self, Read};

use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, Normalization};

/// Bytes of a chunk's hash in a signature.
pub const HASH_LEN: usize = 8;
/// Chunks per signature batch (about 100 KiB on the wire).
pub const BATCH_CHUNKS: usize = 8192;
/// Smallest average chunk: below it the signatures weigh more than they save.
pub const MIN_AVG: u32 = 4 * 1024;
/// Chunks an index holds at most (about 48 MiB): a basis of more than ~4 TiB is cut
/// into more, and its chunks past this many are not looked up (their content goes as
/// literal bytes), so memory stays bounded for any file size.
pub const MAX_INDEXED: usize = 1 << 20;

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
    pub fn chunker<R: Read>(self, r: R) -> Chunker<R> {
        Chunker {
            r,
            sizes: self,
            masks: fastcdc::v2020::select_masks(self.avg as usize, Normalization::Level1),
            buf: vec![0; (2 * self.max()).max(4 << 20)],
            pos: 0,
            filled: 0,
            eof: false,
            offset: 0,
        }
    }
}

/// Cuts a stream into content-defined chunks (FastCDC 2020), read into one buffer a few
/// MiB at a time: a chunk is a slice of the buffer, valid until the next call (no copy
/// per chunk; the unread rest moves to the front once per refill).
pub struct Chunker<R> {
    r: R,
    sizes: ChunkSizes,
    masks: (u64, u64),
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    eof: bool,
    /// The stream offset of `buf[pos]`.
    offset: u64,
}

impl<R: Read> Chunker<R> {
    pub fn sizes(&self) -> ChunkSizes {
        self.sizes
    }

    /// The next chunk, with its offset in the stream; `None` at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        Ok(self.next_chunk_expecting(None)?.map(|(at, c, _)| (at, c)))
    }

    /// The next chunk as [`Chunker::next_chunk`] cuts it, but first checks whether it is
    /// `expected`, a basis chunk (cut with these sizes and a whole maximum chunk ahead)
    /// that follows one just matched: when the bytes ahead hash to it, they are taken
    /// without cutting (true with the chunk). The cut would have ended there too: with a
    /// whole maximum chunk ahead, FastCDC decides a cut from the chunk's own bytes alone,
    /// so equal bytes end where the basis chunk ended. A body that is mostly its basis is
    /// then hashed once per chunk instead of rolled over byte by byte (as rsync jumps a
    /// whole block after a match).
    pub fn next_chunk_expecting(
        &mut self,
        expected: Option<Chunk>,
    ) -> io::Result<Option<(u64, &[u8], bool)>> {
        loop {
            let avail = self.filled - self.pos;
            let len = expected.map_or(usize::MAX, |e| e.len as usize);
            if avail >= self.sizes.max()
                && len <= avail
                && expected.is_some_and(|e| chunk_hash(&self.buf[self.pos..][..len]) == e.hash)
            {
                let (start, at) = (self.pos, self.offset);
                self.pos += len;
                self.offset += len as u64;
                return Ok(Some((at, &self.buf[start..start + len], true)));
            }
            // A cut is content-defined only with a whole maximum chunk ahead (or the end).
            if avail >= self.sizes.max() || (self.eof && avail > 0) {
                let n = cut(self.sizes, self.masks, &self.buf[self.pos..self.filled]);
                let (start, at) = (self.pos, self.offset);
                self.pos += n;
                self.offset += n as u64;
                return Ok(Some((at, &self.buf[start..start + n], false)));
            }
            if self.eof {
                return Ok(None);
            }
            self.buf.copy_within(self.pos..self.filled, 0);
            self.filled -= self.pos;
            self.pos = 0;
            while self.filled < self.buf.len() {
                match self.r.read(&mut self.buf[self.filled..]) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => self.filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Where the chunk at the start of `window` ends: content-defined when the window holds a
/// whole maximum chunk, else (at the end of a stream) by the window's end.
fn cut(s: ChunkSizes, (ms, ml): (u64, u64), window: &[u8]) -> usize {
    let (_, n) = fastcdc::v2020::cut(
        window,
        s.min(),
        s.avg as usize,
        s.max(),
        ms,
        ml,
        ms << 1,
        ml << 1,
    );
    n.clamp(1, window.len())
}

/// Cuts a body pushed to it piece by piece exactly as [`Signer`] cuts it read whole:
/// the signatures of a body as it is written (only the start of a chunk that straddles
/// two pieces is copied, never more than a maximum chunk).
pub struct SignSink {
    sizes: ChunkSizes,
    masks: (u64, u64),
    pending: Vec<u8>,
    pub lengths: Vec<u32>,
    pub hashes: Vec<u64>,
}

impl SignSink {
    pub fn new(sizes: ChunkSizes) -> Self {
        SignSink {
            sizes,
            masks: fastcdc::v2020::select_masks(sizes.avg as usize, Normalization::Level1),
            pending: Vec::new(),
            lengths: Vec::new(),
            hashes: Vec::new(),
        }
    }

    pub fn sizes(&self) -> ChunkSizes {
        self.sizes
    }

    /// The next bytes of the body.
    pub fn push(&mut self, mut data: &[u8]) {
        let max = self.sizes.max();
        while !self.pending.is_empty() {
            let take = (max - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < max {
                return;
            }
            let n = cut(self.sizes, self.masks, &self.pending);
            self.emit_pending(n);
        }
        while data.len() >= max {
            let n = cut(self.sizes, self.masks, data);
            self.lengths.push(n as u32);
            self.hashes.push(chunk_hash(&data[..n]));
            data = &data[n..];
        }
        self.pending.extend_from_slice(data);
    }

    /// Chunks already known to come next, at a cut (where the bytes pushed so far end a
    /// chunk, as where a delta's copy begins): what is pending is cut as a body's end,
    /// and these are taken as they are.
    pub fn push_known(&mut self, lengths: &[u32], hashes: &[u64]) {
        debug_assert_eq!(lengths.len(), hashes.len());
        self.flush();
        self.lengths.extend_from_slice(lengths);
        self.hashes.extend_from_slice(hashes);
    }

    fn flush(&mut self) {
        while !self.pending.is_empty() {
            let n = cut(self.sizes, self.masks, &self.pending);
            self.emit_pending(n);
        }
    }

    fn emit_pending(&mut self, n: usize) {
        self.lengths.push(n as u32);
        self.hashes.push(chunk_hash(&self.pending[..n]));
        self.pending.drain(..n);
    }

    /// The body's end: cuts what is left.
    pub fn finish(mut self) -> (Vec<u32>, Vec<u64>) {
        self.flush();
        (self.lengths, self.hashes)
    }
}

/// A chunk's hash: the low 64 bits of its XXH3-128 (several times cheaper per byte than
/// BLAKE3, which hashes every body once more anyway).
pub fn chunk_hash(data: &[u8]) -> u64 {
    twox_hash::XxHash3_128::oneshot(data) as u64
}

/// Reads a basis and yields its signatures a batch at a time (lengths, packed hashes).
pub struct Signer<R: Read> {
    chunks: Chunker<R>,
}

impl<R: Read> Signer<R> {
    pub fn new(r: R, sizes: ChunkSizes) -> Self {
        Signer {
            chunks: sizes.chunker(r),
        }
    }

    /// The next batch of up to [`BATCH_CHUNKS`] chunks (lengths, hashes); empty at the end.
    pub fn next_batch(&mut self) -> io::Result<(Vec<u32>, Vec<u64>)> {
        let mut lengths = Vec::new();
        let mut hashes = Vec::new();
        while lengths.len() < BATCH_CHUNKS {
            let Some((_, c)) = self.chunks.next_chunk()? else {
                break;
            };
            lengths.push(c.len() as u32);
            hashes.push(chunk_hash(c));
        }
        Ok((lengths, hashes))
    }
}

/// Chunk hashes as a signature batch carries them ([`HASH_LEN`] bytes each, little
/// endian; [`Index::add`] reads them back).
pub fn pack_hashes(hashes: &[u64]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.to_le_bytes()).collect()
}

/// One chunk of a basis: its number, where it lies, and its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub n: u32,
    pub at: u64,
    pub len: u32,
    pub hash: u64,
}

/// The chunks of a basis in file order, and where each lies by hash.
#[derive(Default)]
pub struct Index {
    /// (offset, hash, length) by chunk number.
    chunks: Vec<(u64, u64, u32)>,
    by_hash: HashMap<u64, u32>,
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
            if self.chunks.len() < MAX_INDEXED {
                self.by_hash.entry(h).or_insert(self.chunks.len() as u32);
                self.chunks.push((self.size, h, *len));
            }
            self.size += *len as u64;
        }
        Ok(())
    }

    /// A chunk with this hash and length.
    pub fn find(&self, hash: u64, len: usize) -> Option<Chunk> {
        let c = self.chunk(*self.by_hash.get(&hash)?)?;
        (c.len as usize == len).then_some(c)
    }

    /// The chunk after `c`, if it was cut with a whole maximum chunk of `sizes` ahead
    /// (the ones in the basis's last stretch were cut by where it ends, not by content
    /// alone): what [`Chunker::next_chunk_expecting`] may expect after a match of `c`.
    pub fn following(&self, c: Chunk, sizes: ChunkSizes) -> Option<Chunk> {
        self.chunk(c.n.checked_add(1)?)
            .filter(|next| next.at + sizes.max() as u64 <= self.size)
    }

    fn chunk(&self, n: u32) -> Option<Chunk> {
        let &(at, hash, len) = self.chunks.get(n as usize)?;
        Some(Chunk { n, at, len, hash })
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
            ix.add(&l, &pack_hashes(&h)).unwrap();
        }
        ix
    }

    #[test]
    fn a_body_pushed_in_pieces_is_cut_as_one_read_whole() {
        let sizes = ChunkSizes::from_avg(4096).unwrap();
        let body = noise(300_000, 7);
        let mut whole = (Vec::new(), Vec::new());
        let mut s = Signer::new(&body[..], sizes);
        loop {
            let (l, h) = s.next_batch().unwrap();
            if l.is_empty() {
                break;
            }
            whole.0.extend(l);
            whole.1.extend(h);
        }
        assert!(whole.0.len() > 40, "{} chunks", whole.0.len());
        let mut r = fastrand::Rng::with_seed(3);
        // Pieces smaller than a chunk, around a maximum chunk, and larger than many.
        for most in [100, 20_000, 200_000] {
            let mut sink = SignSink::new(sizes);
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = r.usize(0..=most).min(rest.len());
                sink.push(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(sink.finish(), whole, "pieces of up to {most} bytes");
        }
        assert_eq!(SignSink::new(sizes).finish(), (vec![], vec![]));
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
        let mut chunks = sizes.chunker(new);
        while let Some((at, c)) = chunks.next_chunk().unwrap() {
            assert_eq!(at as usize, out.len());
            match ix.find(chunk_hash(c), c.len()) {
                Some(m) => out.extend_from_slice(&basis[m.at as usize..m.at as usize + c.len()]),
                None => {
                    literal += c.len();
                    out.extend_from_slice(c);
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
    fn chunks_do_not_depend_on_how_the_reader_splits_its_reads() {
        /// Gives at most 1,000 bytes a read.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(1000).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let data = noise(9 << 20, 5);
        let sizes = ChunkSizes::for_size(data.len() as u64);
        let cuts = |mut c: Chunker<&mut dyn Read>| {
            let mut v = Vec::new();
            while let Some((at, ch)) = c.next_chunk().unwrap() {
                v.push((at, ch.len()));
            }
            v
        };
        let whole = cuts(sizes.chunker(&mut &data[..]));
        let dribbled = cuts(sizes.chunker(&mut Dribble(&data)));
        assert_eq!(whole, dribbled);
        assert_eq!(whole.iter().map(|c| c.1).sum::<usize>(), data.len());
        assert!(whole.iter().all(|c| c.1 <= sizes.max()));
        // Cut by content: the fastcdc reference cuts the same places.
        let reference: Vec<(u64, usize)> =
            fastcdc::v2020::FastCDC::new(&data, sizes.min(), sizes.avg as usize, sizes.max())
                .map(|c| (c.offset as u64, c.length))
                .collect();
        assert_eq!(whole, reference);
    }

    #[test]
    fn expecting_the_next_basis_chunk_cuts_where_the_chunker_cuts() {
        let basis = noise(6 << 20, 6);
        let mut new = basis.clone();
        // An insert, a deletion, an overwrite and a new tail: the stream goes out of step
        // with the basis and finds it again several times.
        new.splice(1 << 20..1 << 20, noise(100, 7));
        new.drain(3 << 20..(3 << 20) + 5000);
        new[(4 << 20)..(4 << 20) + 64].fill(0);
        new.extend(noise(300_000, 8));
        let sizes = ChunkSizes::for_size(basis.len() as u64);
        let ix = index_of(&basis, sizes);
        let plain: Vec<(u64, usize)> = {
            let mut c = sizes.chunker(&new[..]);
            std::iter::from_fn(|| c.next_chunk().unwrap().map(|(at, c)| (at, c.len()))).collect()
        };
        let (mut hinted, mut hits, mut last) = (Vec::new(), 0, None);
        let mut c = sizes.chunker(&new[..]);
        while let Some((at, ch, hit)) = c
            .next_chunk_expecting(last.and_then(|m| ix.following(m, sizes)))
            .unwrap()
        {
            let m = ix.find(chunk_hash(ch), ch.len());
            if hit {
                hits += 1;
                assert_eq!(
                    m.map(|m| m.at),
                    last.and_then(|l| ix.following(l, sizes)).map(|n| n.at)
                );
            }
            hinted.push((at, ch.len()));
            last = m;
        }
        assert_eq!(hinted, plain);
        assert!(
            hits * 10 > plain.len() * 8,
            "{hits} of {} chunks expected",
            plain.len()
        );
        // The basis's last stretch is never expected.
        let end = ix.find(
            ix.chunks.last().unwrap().1,
            ix.chunks.last().unwrap().2 as usize,
        );
        let before_end = ix.chunk(end.unwrap().n - 1).unwrap();
        assert_eq!(ix.following(before_end, sizes), None);
    }

    #[test]
    fn a_batch_whose_parts_disagree_is_refused() {
        let mut ix = Index::default();
        assert!(ix.add(&[10, 20], &[0; 8]).is_err());
    }
}
