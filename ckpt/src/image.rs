//! Checkpoint image format v1: one file = header, checksummed chunks, footer (all integers
//! little-endian, checksums xxh3-64). Owns encoding (`ImageWriter`, streaming, allocation-free
//! after its header) and verification (`read_image`, `ImageReader`, `read_chunk_at`); it must
//! never accept an image that is truncated, bit-flipped, reordered, of another application or
//! followed by garbage, and never buffers a whole image in memory.
//!
//! Layout, with the byte ranges each checksum covers:
//! ```text
//! header  magic "FTCKPT\0\x01" | version u32 | header_len u32 | app (u16 len + UTF-8)
//!         | stream u32 | seq u64 | parent u64 (0 = full) | created_unix_ns u64 | page_size u32
//!         | region count u32 | { id u32, base u64, len u64 }*      <- header_len bytes
//!         | xxh3(those header_len bytes) u64
//! chunk*  region index u32 | offset u64 | len u32 | xxh3(index|offset|len|data) u64 | data
//! footer  "FTCKEND\0" | chunk count u64 | data bytes u64
//!         | xxh3(header checksum | every chunk checksum, in order) u64
//! ```
//! A chunk's checksum covers its record fields as well as its data, so a flipped offset or
//! region index is caught at that chunk, not applied to the wrong place.

use std::fmt;
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Largest data length of one chunk; `ImageWriter::chunk` splits longer data itself.
pub const MAX_CHUNK: usize = 1 << 20;
/// First bytes of every image; the last byte is the format generation.
pub const MAGIC: [u8; 8] = *b"FTCKPT\0\x01";
/// The format version this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// First bytes of the footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"FTCKEND\0";
/// Longest application identity, in bytes of UTF-8.
pub const MAX_APP_LEN: usize = 255;
/// Most regions one image may describe. Keeps the header bounded, and keeps every valid region
/// index far below the value of the footer magic's first four bytes read as a u32, which is how
/// a reader tells the footer from one more chunk.
pub const MAX_REGIONS: usize = 1 << 16;

/// magic + version + header_len.
const PREAMBLE_LEN: usize = 8 + 4 + 4;
/// Header bytes besides the app bytes and the region table: preamble, app length, stream,
/// seq, parent, created, page size, region count.
const HEADER_FIXED_LEN: usize = PREAMBLE_LEN + 2 + 4 + 8 + 8 + 8 + 4 + 4;
const REGION_DESC_LEN: usize = 4 + 8 + 8;
const CHECKSUM_LEN: usize = 8;
/// Largest `header_len` a valid image can have; anything above is refused before allocating.
const MAX_HEADER_LEN: usize = HEADER_FIXED_LEN + MAX_APP_LEN + MAX_REGIONS * REGION_DESC_LEN;
/// Record fields that precede a chunk's checksum (and are covered by it).
const CHUNK_FIELDS_LEN: usize = 4 + 8 + 4;
/// Whole chunk record before the data.
pub const CHUNK_RECORD_LEN: usize = CHUNK_FIELDS_LEN + CHECKSUM_LEN;
/// Whole footer.
pub const FOOTER_LEN: usize = 8 + 8 + 8 + CHECKSUM_LEN;
/// Read-side buffer; large enough that a reader passed unbuffered still reads in big blocks.
const READ_BUFFER: usize = 64 * 1024;
/// Chunks that `ImageWriter::chunks` hands to one vectored write at most (two I/O slices each,
/// far below IOV_MAX = 1024): small chunks (an increment's single pages) cost one system call
/// per batch instead of one or two each.
const CHUNK_BATCH: usize = 64;
/// Data bytes after which `ImageWriter::chunks` writes its batch out: checksumming and writing
/// then alternate in small steps, so the sink sees a steady stream (and can start writeback
/// early) instead of one huge write after all the checksums.
const BATCH_BYTES: usize = MAX_CHUNK;

/// One memory region an image describes: `len` bytes that live at `base` in the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDesc {
    pub id: u32,
    pub base: u64,
    pub len: u64,
}

/// What the header of an image says. `parent` is `None` for a full image, else the sequence of
/// the image this one is an increment against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    pub app: String,
    pub stream: u32,
    pub seq: u64,
    pub parent: Option<u64>,
    pub created_unix_ns: u64,
    pub page_size: u32,
    pub regions: Vec<RegionDesc>,
}

/// Receives each verified chunk: (region index, offset in the region, data).
pub type ChunkVisitor<'a> = dyn FnMut(u32, u64, &[u8]) + 'a;

/// Totals of a written or verified image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub chunks: u64,
    pub data_bytes: u64,
    pub file_bytes: u64,
}

/// Why an image could not be written or was refused. Offsets are byte offsets in the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "image truncated: it ends at offset {offset} inside the {what} ({needed} more bytes needed)"
    )]
    Truncated {
        offset: u64,
        what: &'static str,
        needed: usize,
    },
    #[error("not a checkpoint image: bad magic {found:02x?} at offset 0")]
    BadMagic { found: [u8; 8] },
    #[error(
        "unknown image format version {version} at offset 8 (this build reads {FORMAT_VERSION})"
    )]
    UnknownVersion { version: u32 },
    #[error("bad header length {len} at offset 12 ({reason})")]
    HeaderLength { len: u32, reason: &'static str },
    #[error(
        "header checksum mismatch at offset {offset}: stored {stored:#018x}, computed {computed:#018x}"
    )]
    HeaderChecksum {
        offset: u64,
        stored: u64,
        computed: u64,
    },
    #[error("invalid header at offset {offset}: {reason}")]
    InvalidHeader { offset: u64, reason: String },
    #[error("image belongs to application {found:?}, expected {expected:?}")]
    ForeignApp { found: String, expected: String },
    #[error(
        "chunk {chunk} at offset {offset} names region index {region_index}, but the image has {regions} regions (a damaged chunk record or footer)"
    )]
    NoSuchRegion {
        chunk: u64,
        offset: u64,
        region_index: u32,
        regions: usize,
    },
    #[error("chunk {chunk} at offset {offset} has length {len} (must be 1..={MAX_CHUNK})")]
    ChunkLength { chunk: u64, offset: u64, len: u64 },
    #[error(
        "chunk {chunk} at offset {offset} lies outside its region {region_index}: bytes {chunk_offset}..{chunk_end} of a region of {region_len} bytes"
    )]
    ChunkOutsideRegion {
        chunk: u64,
        offset: u64,
        region_index: u32,
        chunk_offset: u64,
        chunk_end: u64,
        region_len: u64,
    },
    #[error(
        "chunk {chunk} at offset {offset}: checksum mismatch (stored {stored:#018x}, computed {computed:#018x})"
    )]
    ChunkChecksum {
        chunk: u64,
        offset: u64,
        stored: u64,
        computed: u64,
    },
    #[error("footer at offset {offset}: {what} is {stored} but the image holds {counted}")]
    FooterMismatch {
        offset: u64,
        what: &'static str,
        stored: u64,
        counted: u64,
    },
    #[error(
        "footer at offset {offset}: checksum over the chunk sequence mismatches (stored {stored:#018x}, computed {computed:#018x}): a chunk is missing, extra or out of order"
    )]
    FooterChecksum {
        offset: u64,
        stored: u64,
        computed: u64,
    },
    #[error("trailing garbage after the footer at offset {offset}")]
    TrailingGarbage { offset: u64 },
    #[error("bad footer at offset {offset}: {reason}")]
    BadFooter { offset: u64, reason: &'static str },
    #[error("an earlier write to this image failed ({kind}); the image is incomplete")]
    Poisoned { kind: io::ErrorKind },
    #[error("the image is finished (its footer is written); it takes no more chunks")]
    Finished,
}

impl ImageError {
    /// The kind of the underlying I/O error, when this error comes from one (a failed write or
    /// read, or a writer poisoned by one). `StorageFull` means the disk is full.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            ImageError::Io { source, .. } => Some(source.kind()),
            ImageError::Poisoned { kind } => Some(*kind),
            _ => None,
        }
    }
}

/// Nanoseconds since the Unix epoch now (0 if the clock is before the epoch), for
/// `ImageHeader::created_unix_ns`.
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Checks the rules every header obeys, on both the write and the read side.
fn validate_header(h: &ImageHeader) -> Result<(), String> {
    if h.app.is_empty() {
        return Err("empty application identity".into());
    }
    if h.app.len() > MAX_APP_LEN {
        return Err(format!(
            "application identity is {} bytes (at most {MAX_APP_LEN})",
            h.app.len()
        ));
    }
    if h.seq == 0 {
        return Err("sequence 0 is reserved (parent 0 means a full image)".into());
    }
    if let Some(p) = h.parent
        && (p == 0 || p >= h.seq)
    {
        return Err(format!(
            "parent sequence {p} must be in 1..{} (older than the image)",
            h.seq
        ));
    }
    if !h.page_size.is_power_of_two() {
        return Err(format!("page size {} is not a power of two", h.page_size));
    }
    if h.regions.len() > MAX_REGIONS {
        return Err(format!(
            "{} regions (at most {MAX_REGIONS})",
            h.regions.len()
        ));
    }
    for (i, r) in h.regions.iter().enumerate() {
        if r.base.checked_add(r.len).is_none() {
            return Err(format!(
                "region {i} (id {}) at {:#x} of {} bytes wraps the address space",
                r.id, r.base, r.len
            ));
        }
        if h.regions[..i].iter().any(|o| o.id == r.id) {
            return Err(format!("region id {} appears twice", r.id));
        }
    }
    Ok(())
}

fn encode_header(h: &ImageHeader) -> Result<Vec<u8>, ImageError> {
    validate_header(h).map_err(|reason| ImageError::InvalidHeader { offset: 0, reason })?;
    let len = HEADER_FIXED_LEN + h.app.len() + h.regions.len() * REGION_DESC_LEN;
    let invalid = |reason: &str| ImageError::InvalidHeader {
        offset: 0,
        reason: reason.to_owned(),
    };
    let header_len = u32::try_from(len).map_err(|_| invalid("header too long"))?;
    let app_len = u16::try_from(h.app.len()).map_err(|_| invalid("app too long"))?;
    let region_count = u32::try_from(h.regions.len()).map_err(|_| invalid("too many regions"))?;
    let mut b = Vec::with_capacity(len + CHECKSUM_LEN);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&header_len.to_le_bytes());
    b.extend_from_slice(&app_len.to_le_bytes());
    b.extend_from_slice(h.app.as_bytes());
    b.extend_from_slice(&h.stream.to_le_bytes());
    b.extend_from_slice(&h.seq.to_le_bytes());
    b.extend_from_slice(&h.parent.unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&h.created_unix_ns.to_le_bytes());
    b.extend_from_slice(&h.page_size.to_le_bytes());
    b.extend_from_slice(&region_count.to_le_bytes());
    for r in &h.regions {
        b.extend_from_slice(&r.id.to_le_bytes());
        b.extend_from_slice(&r.base.to_le_bytes());
        b.extend_from_slice(&r.len.to_le_bytes());
    }
    debug_assert_eq!(b.len(), len);
    let sum = xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    Ok(b)
}

/// A cursor over a byte slice that cannot panic: every take is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses the checksummed header bytes (`header_len` of them, checksum already verified).
fn decode_header(b: &[u8]) -> Result<ImageHeader, ImageError> {
    let short = || ImageError::InvalidHeader {
        offset: 0,
        reason: "fields run past the header length".into(),
    };
    let mut c = Cursor {
        bytes: b,
        pos: PREAMBLE_LEN,
    };
    let app_len = usize::from(c.u16().ok_or_else(short)?);
    let app_at = c.pos as u64;
    let app = c.take(app_len).ok_or_else(short)?;
    let app = std::str::from_utf8(app)
        .map_err(|e| ImageError::InvalidHeader {
            offset: app_at,
            reason: format!("application identity is not UTF-8: {e}"),
        })?
        .to_owned();
    let stream = c.u32().ok_or_else(short)?;
    let seq = c.u64().ok_or_else(short)?;
    let parent = c.u64().ok_or_else(short)?;
    let created_unix_ns = c.u64().ok_or_else(short)?;
    let page_size = c.u32().ok_or_else(short)?;
    let count_at = c.pos as u64;
    let count = c.u32().ok_or_else(short)?;
    let count = usize::try_from(count)
        .ok()
        .filter(|&n| n <= MAX_REGIONS)
        .ok_or_else(|| ImageError::InvalidHeader {
            offset: count_at,
            reason: format!("region count {count} exceeds {MAX_REGIONS}"),
        })?;
    let mut regions = Vec::with_capacity(count);
    for _ in 0..count {
        regions.push(RegionDesc {
            id: c.u32().ok_or_else(short)?,
            base: c.u64().ok_or_else(short)?,
            len: c.u64().ok_or_else(short)?,
        });
    }
    if c.pos != b.len() {
        return Err(ImageError::InvalidHeader {
            offset: c.pos as u64,
            reason: format!(
                "header length says {} bytes but its fields end at {}",
                b.len(),
                c.pos
            ),
        });
    }
    let h = ImageHeader {
        app,
        stream,
        seq,
        parent: (parent != 0).then_some(parent),
        created_unix_ns,
        page_size,
        regions,
    };
    validate_header(&h).map_err(|reason| ImageError::InvalidHeader { offset: 0, reason })?;
    Ok(h)
}

/// Writes one image, streaming: the header at `new`, the chunks as they come, the footer at
/// `finish`. Nothing but the chunk records of the current batch is ever buffered here, and
/// after `new` nothing allocates: a copy-on-write snapshot child (a clone of a possibly
/// multi-threaded process, where any allocator lock may be held forever) drives a copy of a
/// writer through `chunks` and `finish_in_place`.
pub struct ImageWriter<W: Write> {
    out: W,
    pos: u64,
    regions: Vec<RegionDesc>,
    sequence_hash: Xxh3,
    chunks: u64,
    data_bytes: u64,
    /// Set by the first failed write: the bytes on `out` no longer form a valid prefix.
    failed: Option<io::ErrorKind>,
    /// The footer was written: the image is complete.
    finished: bool,
}

impl<W: Write> fmt::Debug for ImageWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageWriter")
            .field("pos", &self.pos)
            .field("regions", &self.regions.len())
            .field("chunks", &self.chunks)
            .field("data_bytes", &self.data_bytes)
            .field("failed", &self.failed)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<W: Write> ImageWriter<W> {
    /// Validates `header` and writes it to `out`.
    pub fn new(out: W, header: &ImageHeader) -> Result<Self, ImageError> {
        let bytes = encode_header(header)?;
        let header_sum = le_u64(&bytes, bytes.len() - CHECKSUM_LEN);
        let mut sequence_hash = Xxh3::new();
        sequence_hash.update(&header_sum.to_le_bytes());
        let mut w = ImageWriter {
            out,
            pos: 0,
            regions: header.regions.clone(),
            sequence_hash,
            chunks: 0,
            data_bytes: 0,
            failed: None,
            finished: false,
        };
        w.write_slices(&mut [IoSlice::new(&bytes)])?;
        Ok(w)
    }

    /// Refuses a writer that failed or is finished.
    fn usable(&self) -> Result<(), ImageError> {
        if let Some(kind) = self.failed {
            return Err(ImageError::Poisoned { kind });
        }
        if self.finished {
            return Err(ImageError::Finished);
        }
        Ok(())
    }

    /// Writes every byte of `bufs` (vectored, retrying short writes); the first failure
    /// poisons the writer.
    fn write_slices(&mut self, mut bufs: &mut [IoSlice<'_>]) -> Result<(), ImageError> {
        while !bufs.is_empty() {
            match self.out.write_vectored(bufs) {
                Ok(0) => return Err(self.fail(io::Error::from(io::ErrorKind::WriteZero))),
                Ok(n) => {
                    self.pos += n as u64;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(())
    }

    fn fail(&mut self, source: io::Error) -> ImageError {
        self.failed = Some(source.kind());
        ImageError::Io {
            offset: self.pos,
            source,
        }
    }

    /// Checks that `len` bytes at `offset` lie inside region `region_index`.
    fn check_range(&self, region_index: u32, offset: u64, len: usize) -> Result<(), ImageError> {
        let regions = self.regions.len();
        let region_len = usize::try_from(region_index)
            .ok()
            .and_then(|i| self.regions.get(i))
            .map(|r| r.len)
            .ok_or(ImageError::NoSuchRegion {
                chunk: self.chunks,
                offset: self.pos,
                region_index,
                regions,
            })?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > region_len) {
            return Err(ImageError::ChunkOutsideRegion {
                chunk: self.chunks,
                offset: self.pos,
                region_index,
                chunk_offset: offset,
                chunk_end: end.unwrap_or(u64::MAX),
                region_len,
            });
        }
        Ok(())
    }

    /// Appends `data` as the bytes at `offset` of region `region_index` (an index into the
    /// header's region list). Data longer than `MAX_CHUNK` is split into several chunks; empty
    /// data writes nothing. Refuses data that does not lie inside the region (writing nothing).
    pub fn chunk(&mut self, region_index: u32, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.chunks(std::iter::once((region_index, offset, data)))
    }

    /// Appends each `(region_index, offset, data)` as `chunk` does, with as few write calls as
    /// possible: the records and the data of up to `CHUNK_BATCH` chunks go to `out` in one
    /// vectored write, straight from where the data lies. A refused chunk is written not at
    /// all; the chunks before it are. Allocates nothing.
    pub fn chunks<'d, I>(&mut self, chunks: I) -> Result<(), ImageError>
    where
        I: IntoIterator<Item = (u32, u64, &'d [u8])>,
    {
        self.usable()?;
        let mut records = [[0u8; CHUNK_RECORD_LEN]; CHUNK_BATCH];
        let mut datas: [&[u8]; CHUNK_BATCH] = [&[]; CHUNK_BATCH];
        let mut queued = 0;
        let mut queued_bytes = 0;
        for (region_index, offset, data) in chunks {
            if let Err(e) = self.check_range(region_index, offset, data.len()) {
                // Flush first, so the error names the offset where the chunk would have gone.
                self.write_batch(&records[..queued], &datas[..queued])?;
                return Err(self
                    .check_range(region_index, offset, data.len())
                    .err()
                    .unwrap_or(e));
            }
            let mut at = offset;
            for piece in data.chunks(MAX_CHUNK) {
                if queued == CHUNK_BATCH || queued_bytes >= BATCH_BYTES {
                    self.write_batch(&records[..queued], &datas[..queued])?;
                    queued = 0;
                    queued_bytes = 0;
                }
                let len = u32::try_from(piece.len()).unwrap_or(u32::MAX);
                let record = &mut records[queued];
                record[0..4].copy_from_slice(&region_index.to_le_bytes());
                record[4..12].copy_from_slice(&at.to_le_bytes());
                record[12..16].copy_from_slice(&len.to_le_bytes());
                let sum = chunk_checksum(&record[..CHUNK_FIELDS_LEN], piece);
                record[16..24].copy_from_slice(&sum.to_le_bytes());
                datas[queued] = piece;
                queued += 1;
                queued_bytes += piece.len();
                // The footer covers the chunk sequence; a failed write poisons the writer, so
                // counting before the bytes are out never yields a bad image.
                self.sequence_hash.update(&sum.to_le_bytes());
                self.chunks += 1;
                self.data_bytes += u64::from(len);
                at += u64::from(len);
            }
        }
        self.write_batch(&records[..queued], &datas[..queued])
    }

    fn write_batch(
        &mut self,
        records: &[[u8; CHUNK_RECORD_LEN]],
        datas: &[&[u8]],
    ) -> Result<(), ImageError> {
        let mut iov = [IoSlice::new(&[]); 2 * CHUNK_BATCH];
        let mut used = 0;
        for ((record, data), pair) in records.iter().zip(datas).zip(iov.chunks_exact_mut(2)) {
            pair[0] = IoSlice::new(record);
            pair[1] = IoSlice::new(data);
            used += 2;
        }
        self.write_slices(&mut iov[..used])
    }

    /// Writes the footer and flushes `out`; the image is then complete and the writer takes no
    /// more chunks. Allocates nothing (see `chunks`).
    pub fn finish_in_place(&mut self) -> Result<ImageSummary, ImageError> {
        self.usable()?;
        let mut footer = [0u8; FOOTER_LEN];
        footer[0..8].copy_from_slice(&FOOTER_MAGIC);
        footer[8..16].copy_from_slice(&self.chunks.to_le_bytes());
        footer[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        footer[24..32].copy_from_slice(&self.sequence_hash.digest().to_le_bytes());
        self.write_slices(&mut [IoSlice::new(&footer)])?;
        if let Err(source) = self.out.flush() {
            return Err(self.fail(source));
        }
        self.finished = true;
        Ok(ImageSummary {
            chunks: self.chunks,
            data_bytes: self.data_bytes,
            file_bytes: self.pos,
        })
    }

    /// Writes the footer, flushes `out` and hands it back with the image's totals.
    pub fn finish(mut self) -> Result<(W, ImageSummary), ImageError> {
        let summary = self.finish_in_place()?;
        Ok((self.out, summary))
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Gives up the writer without writing a footer: the sink and the bytes written so far
    /// (which form no complete image unless `finish_in_place` ran, here or in a copy).
    pub fn into_parts(self) -> (W, u64) {
        (self.out, self.pos)
    }

    /// The sink the image is written to.
    pub fn get_ref(&self) -> &W {
        &self.out
    }
}

fn chunk_checksum(fields: &[u8], data: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(fields);
    h.update(data);
    h.digest()
}

/// A reader that knows its offset, so every error can say where.
struct Source<R: Read> {
    inner: R,
    pos: u64,
}

impl<R: Read> Source<R> {
    /// Fills `buf` completely; an early end of the input is `Truncated` inside `what`.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), ImageError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(ImageError::Truncated {
                        offset: self.pos,
                        what,
                        needed: buf.len() - got,
                    });
                }
                Ok(n) => {
                    got += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ImageError::Io {
                        offset: self.pos,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// True when the input is at its end.
    fn at_end(&mut self) -> Result<bool, ImageError> {
        let mut one = [0u8; 1];
        loop {
            match self.inner.read(&mut one) {
                Ok(0) => return Ok(true),
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ImageError::Io {
                        offset: self.pos,
                        source,
                    });
                }
            }
        }
    }
}

/// Reads and verifies the header; returns it with its checksum.
fn read_header_from<R: Read>(
    src: &mut Source<R>,
    expect_app: &str,
) -> Result<(ImageHeader, u64), ImageError> {
    let mut preamble = [0u8; PREAMBLE_LEN];
    // Check the magic as soon as it is complete, so a short foreign file is "not an image"
    // rather than "truncated".
    src.fill(&mut preamble[..8], "header magic")?;
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&preamble[..8]);
    if magic != MAGIC {
        return Err(ImageError::BadMagic { found: magic });
    }
    src.fill(&mut preamble[8..], "header")?;
    let version = le_u32(&preamble, 8);
    if version != FORMAT_VERSION {
        return Err(ImageError::UnknownVersion { version });
    }
    let header_len = le_u32(&preamble, 12);
    let len = usize::try_from(header_len).unwrap_or(usize::MAX);
    if len < HEADER_FIXED_LEN {
        return Err(ImageError::HeaderLength {
            len: header_len,
            reason: "shorter than the fixed fields",
        });
    }
    if len > MAX_HEADER_LEN {
        return Err(ImageError::HeaderLength {
            len: header_len,
            reason: "longer than any valid header",
        });
    }
    let mut bytes = vec![0u8; len + CHECKSUM_LEN];
    bytes[..PREAMBLE_LEN].copy_from_slice(&preamble);
    src.fill(&mut bytes[PREAMBLE_LEN..], "header")?;
    let stored = le_u64(&bytes, len);
    let computed = xxh3_64(&bytes[..len]);
    if stored != computed {
        return Err(ImageError::HeaderChecksum {
            offset: len as u64,
            stored,
            computed,
        });
    }
    let header = decode_header(&bytes[..len])?;
    if header.app != expect_app {
        return Err(ImageError::ForeignApp {
            found: header.app,
            expected: expect_app.to_owned(),
        });
    }
    Ok((header, stored))
}

/// Reads and verifies only the header of an image (cheap: no chunk is read).
pub fn read_header(r: impl Read, expect_app: &str) -> Result<ImageHeader, ImageError> {
    let mut src = Source { inner: r, pos: 0 };
    read_header_from(&mut src, expect_app).map(|(h, _)| h)
}

/// Reads the footer at the end of a seekable image without verifying anything else: returns
/// (chunk count, data bytes) as the footer states them. For cheap listings only.
pub fn read_footer<R: Read + Seek>(r: &mut R) -> Result<(u64, u64), ImageError> {
    let end = r
        .seek(SeekFrom::End(0))
        .map_err(|source| ImageError::Io { offset: 0, source })?;
    let at = end
        .checked_sub(FOOTER_LEN as u64)
        .ok_or(ImageError::Truncated {
            offset: end,
            what: "footer",
            needed: FOOTER_LEN,
        })?;
    r.seek(SeekFrom::Start(at))
        .map_err(|source| ImageError::Io { offset: at, source })?;
    let mut src = Source { inner: r, pos: at };
    let mut f = [0u8; FOOTER_LEN];
    src.fill(&mut f, "footer")?;
    if f[..8] != FOOTER_MAGIC {
        return Err(ImageError::BadFooter {
            offset: at,
            reason: "no footer magic at the end of the file",
        });
    }
    Ok((le_u64(&f, 8), le_u64(&f, 16)))
}

/// Verifies the whole image; calls `visit(region_index, offset, data)` for each chunk only if
/// `visit` is Some. Chunks are visited as they verify, before the footer is checked: a caller
/// that must not act on part of a bad image verifies it first (as `Store::recover` does).
pub fn read_image(
    r: impl Read,
    expect_app: &str,
    mut visit: Option<&mut ChunkVisitor<'_>>,
) -> Result<(ImageHeader, ImageSummary), ImageError> {
    let mut reader = ImageReader::new(r, expect_app)?;
    while let Some(chunk) = reader.next_chunk()? {
        if let Some(v) = visit.as_mut() {
            v(chunk.region_index, chunk.offset, chunk.data);
        }
    }
    let summary = reader
        .summary
        .clone()
        .expect("next_chunk returns None only after it verified the footer");
    Ok((reader.header, summary))
}

/// One verified chunk handed out by `ImageReader::next_chunk`.
#[derive(Debug)]
pub struct ChunkRef<'a> {
    /// Index of its region in the header's region list.
    pub region_index: u32,
    /// Offset of its data in the region.
    pub offset: u64,
    /// Byte offset of its record in the image (`read_chunk_at` reads it again from there).
    pub record_pos: u64,
    /// Its data, verified; the reader's own buffer, so a caller may patch it in place.
    pub data: &'a mut [u8],
}

/// Reads an image chunk by chunk, verifying as it goes: the header in `new`, each chunk's
/// checksum before handing it out, and the footer (counts, sequence checksum, nothing after
/// it) before `next_chunk` returns None. Like `read_image`, a caller that must not act on part
/// of a bad image only commits to what it did once `next_chunk` returned None.
pub struct ImageReader<R: Read> {
    src: Source<io::BufReader<R>>,
    header: ImageHeader,
    sequence_hash: Xxh3,
    chunks: u64,
    data_bytes: u64,
    data: Vec<u8>,
    summary: Option<ImageSummary>,
}

impl<R: Read> fmt::Debug for ImageReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageReader")
            .field("pos", &self.src.pos)
            .field("seq", &self.header.seq)
            .field("chunks", &self.chunks)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl<R: Read> ImageReader<R> {
    /// Reads and verifies the header; refuses an image of another application.
    pub fn new(r: R, expect_app: &str) -> Result<Self, ImageError> {
        let mut src = Source {
            inner: io::BufReader::with_capacity(READ_BUFFER, r),
            pos: 0,
        };
        let (header, header_sum) = read_header_from(&mut src, expect_app)?;
        let mut sequence_hash = Xxh3::new();
        sequence_hash.update(&header_sum.to_le_bytes());
        Ok(ImageReader {
            src,
            header,
            sequence_hash,
            chunks: 0,
            data_bytes: 0,
            data: Vec::new(),
            summary: None,
        })
    }

    /// The verified header.
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// The image's totals, once `next_chunk` returned None (the whole image verified).
    pub fn summary(&self) -> Option<&ImageSummary> {
        self.summary.as_ref()
    }

    /// The next chunk, verified; None once the footer verified and nothing follows it.
    pub fn next_chunk(&mut self) -> Result<Option<ChunkRef<'_>>, ImageError> {
        if self.summary.is_some() {
            return Ok(None);
        }
        let src = &mut self.src;
        let at = src.pos;
        let mut record = [0u8; CHUNK_RECORD_LEN];
        src.fill(&mut record[..8], "chunk record or footer")?;
        if record[..8] == FOOTER_MAGIC {
            let mut rest = [0u8; FOOTER_LEN - 8];
            src.fill(&mut rest, "footer")?;
            let stored_chunks = le_u64(&rest, 0);
            let stored_bytes = le_u64(&rest, 8);
            let stored_sum = le_u64(&rest, 16);
            if stored_chunks != self.chunks {
                return Err(ImageError::FooterMismatch {
                    offset: at,
                    what: "chunk count",
                    stored: stored_chunks,
                    counted: self.chunks,
                });
            }
            if stored_bytes != self.data_bytes {
                return Err(ImageError::FooterMismatch {
                    offset: at,
                    what: "data byte count",
                    stored: stored_bytes,
                    counted: self.data_bytes,
                });
            }
            let computed = self.sequence_hash.digest();
            if stored_sum != computed {
                return Err(ImageError::FooterChecksum {
                    offset: at,
                    stored: stored_sum,
                    computed,
                });
            }
            let end = src.pos;
            if !src.at_end()? {
                return Err(ImageError::TrailingGarbage { offset: end });
            }
            self.summary = Some(ImageSummary {
                chunks: self.chunks,
                data_bytes: self.data_bytes,
                file_bytes: end,
            });
            return Ok(None);
        }
        src.fill(&mut record[8..], "chunk record")?;
        let (region_index, offset, len) =
            check_record(&record, &self.header.regions, self.chunks, at)?;
        self.data.resize(len, 0);
        src.fill(&mut self.data, "chunk data")?;
        verify_chunk(&record, &self.data, self.chunks, at)?;
        self.sequence_hash.update(&record[16..24]);
        self.chunks += 1;
        self.data_bytes += len as u64;
        Ok(Some(ChunkRef {
            region_index,
            offset,
            record_pos: at,
            data: &mut self.data,
        }))
    }
}

/// Checks a chunk record's fields against the region table: (region index, offset, length).
fn check_record(
    record: &[u8; CHUNK_RECORD_LEN],
    regions: &[RegionDesc],
    chunk: u64,
    at: u64,
) -> Result<(u32, u64, usize), ImageError> {
    let region_index = le_u32(record, 0);
    let offset = le_u64(record, 4);
    let len = le_u32(record, 12);
    let region = usize::try_from(region_index)
        .ok()
        .and_then(|i| regions.get(i))
        .ok_or(ImageError::NoSuchRegion {
            chunk,
            offset: at,
            region_index,
            regions: regions.len(),
        })?;
    let len_usize = check_len(len, chunk, at)?;
    let end = offset.checked_add(u64::from(len));
    if end.is_none_or(|e| e > region.len) {
        return Err(ImageError::ChunkOutsideRegion {
            chunk,
            offset: at,
            region_index,
            chunk_offset: offset,
            chunk_end: end.unwrap_or(u64::MAX),
            region_len: region.len,
        });
    }
    Ok((region_index, offset, len_usize))
}

fn check_len(len: u32, chunk: u64, at: u64) -> Result<usize, ImageError> {
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len == 0 || len_usize > MAX_CHUNK {
        return Err(ImageError::ChunkLength {
            chunk,
            offset: at,
            len: u64::from(len),
        });
    }
    Ok(len_usize)
}

fn verify_chunk(
    record: &[u8; CHUNK_RECORD_LEN],
    data: &[u8],
    chunk: u64,
    at: u64,
) -> Result<(), ImageError> {
    let stored = le_u64(record, 16);
    let computed = chunk_checksum(&record[..CHUNK_FIELDS_LEN], data);
    if stored != computed {
        return Err(ImageError::ChunkChecksum {
            chunk,
            offset: at,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Reads again the chunk whose record starts at byte `record_pos` of `file` (as
/// `ChunkRef::record_pos` reported it) and verifies its checksum; its data lands in `data`.
/// Returns its region index and offset. Only the chunk itself is checked (the image it belongs
/// to was verified whole before): `chunk` is its index, for error messages.
pub fn read_chunk_at(
    file: &std::fs::File,
    record_pos: u64,
    chunk: u64,
    data: &mut Vec<u8>,
) -> Result<(u32, u64), ImageError> {
    use std::os::unix::fs::FileExt;
    let truncated = |e: io::Error, offset: u64, what: &'static str, needed: usize| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ImageError::Truncated {
                offset,
                what,
                needed,
            }
        } else {
            ImageError::Io { offset, source: e }
        }
    };
    let mut record = [0u8; CHUNK_RECORD_LEN];
    file.read_exact_at(&mut record, record_pos)
        .map_err(|e| truncated(e, record_pos, "chunk record", CHUNK_RECORD_LEN))?;
    let len = check_len(le_u32(&record, 12), chunk, record_pos)?;
    let data_pos = record_pos + CHUNK_RECORD_LEN as u64;
    data.resize(len, 0);
    file.read_exact_at(data, data_pos)
        .map_err(|e| truncated(e, data_pos, "chunk data", len))?;
    verify_chunk(&record, data, chunk, record_pos)?;
    Ok((le_u32(&record, 0), le_u64(&record, 4)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    const APP: &str = "test-app";

    fn header(regions: &[u64]) -> ImageHeader {
        ImageHeader {
            app: APP.into(),
            stream: 7,
            seq: 3,
            parent: Some(2),
            created_unix_ns: 1_700_000_000_000_000_000,
            page_size: 64,
            regions: regions
                .iter()
                .enumerate()
                .map(|(i, &len)| RegionDesc {
                    id: u32::try_from(i).unwrap() + 10,
                    base: 0x7000_0000 + 0x10_0000 * i as u64,
                    len,
                })
                .collect(),
        }
    }

    /// A small image: two regions, four chunks of 64 bytes (equal sizes, so records can be
    /// swapped), the last region of odd length.
    fn small_image() -> Vec<u8> {
        let mut w = ImageWriter::new(Vec::new(), &header(&[256, 131])).unwrap();
        for (i, (region, off)) in [(0u32, 0u64), (0, 128), (1, 0), (1, 64)].iter().enumerate() {
            let data: Vec<u8> = (0..64u8).map(|b| b ^ u8::try_from(i).unwrap()).collect();
            w.chunk(*region, *off, &data).unwrap();
        }
        w.finish().unwrap().0
    }

    fn header_end(img: &[u8]) -> usize {
        usize::try_from(le_u32(img, 12)).unwrap() + CHECKSUM_LEN
    }

    fn chunk_span(img: &[u8], n: usize) -> std::ops::Range<usize> {
        let mut at = header_end(img);
        for _ in 0..n {
            at += CHUNK_RECORD_LEN + usize::try_from(le_u32(img, at + 12)).unwrap();
        }
        at..at + CHUNK_RECORD_LEN + usize::try_from(le_u32(img, at + 12)).unwrap()
    }

    fn read(img: &[u8]) -> Result<(ImageHeader, ImageSummary), ImageError> {
        read_image(img, APP, None)
    }

    #[test]
    fn small_image_reads_back() {
        let img = small_image();
        let (h, s) = read(&img).unwrap();
        assert_eq!(h, header(&[256, 131]));
        assert_eq!(s.chunks, 4);
        assert_eq!(s.data_bytes, 256);
        assert_eq!(s.file_bytes, img.len() as u64);
        assert_eq!(read_header(&img[..], APP).unwrap(), h);
        assert_eq!(
            read_footer(&mut std::io::Cursor::new(&img)).unwrap(),
            (4, 256)
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let img = small_image();
        for len in 0..img.len() {
            match read(&img[..len]) {
                Err(ImageError::Truncated { offset, .. }) => assert_eq!(offset, len as u64),
                other => panic!("prefix of {len} bytes: expected Truncated, got {other:?}"),
            }
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let img = small_image();
        for at in 0..img.len() {
            for bit in 0..8 {
                let mut bad = img.clone();
                bad[at] ^= 1 << bit;
                let r = read(&bad);
                assert!(r.is_err(), "flip of bit {bit} at byte {at} was accepted");
            }
        }
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut img = small_image();
        img[..8].copy_from_slice(b"NOTANIMG");
        let e = read(&img).unwrap_err();
        assert!(matches!(e, ImageError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("bad magic"), "{e}");
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut img = small_image();
        img[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = read(&img).unwrap_err();
        assert!(
            matches!(e, ImageError::UnknownVersion { version: 2 }),
            "{e}"
        );
        assert!(e.to_string().contains("version 2"), "{e}");
    }

    #[test]
    fn foreign_app_is_refused() {
        let img = small_image();
        let e = read_image(&img[..], "other-app", None).unwrap_err();
        assert!(matches!(e, ImageError::ForeignApp { .. }), "{e}");
        assert!(e.to_string().contains("\"test-app\""), "{e}");
        assert!(e.to_string().contains("\"other-app\""), "{e}");
    }

    #[test]
    fn trailing_garbage_is_refused() {
        let mut img = small_image();
        let end = img.len() as u64;
        img.push(0);
        match read(&img) {
            Err(ImageError::TrailingGarbage { offset }) => assert_eq!(offset, end),
            other => panic!("expected TrailingGarbage, got {other:?}"),
        }
    }

    #[test]
    fn chunk_outside_its_region_is_refused() {
        // Shrink region 1 in the header (with a valid header checksum): its chunk at 64..128
        // then ends past the region.
        let mut img = small_image();
        let hlen = header_end(&img) - CHECKSUM_LEN;
        let region1_len_at = hlen - 8;
        img[region1_len_at..hlen].copy_from_slice(&100u64.to_le_bytes());
        let sum = xxh3_64(&img[..hlen]);
        img[hlen..hlen + 8].copy_from_slice(&sum.to_le_bytes());
        let at = chunk_span(&img, 3).start as u64;
        match read(&img) {
            Err(ImageError::ChunkOutsideRegion {
                chunk,
                offset,
                region_index,
                region_len,
                ..
            }) => {
                assert_eq!((chunk, offset, region_index, region_len), (3, at, 1, 100));
            }
            other => panic!("expected ChunkOutsideRegion, got {other:?}"),
        }
    }

    #[test]
    fn reordered_chunks_are_refused() {
        let img = small_image();
        let (a, b) = (chunk_span(&img, 1), chunk_span(&img, 2));
        assert_eq!(a.len(), b.len());
        let mut bad = img.clone();
        bad[a.clone()].copy_from_slice(&img[b.clone()]);
        bad[b].copy_from_slice(&img[a]);
        let e = read(&bad).unwrap_err();
        assert!(matches!(e, ImageError::FooterChecksum { .. }), "{e}");
        assert!(e.to_string().contains("out of order"), "{e}");
    }

    #[test]
    fn missing_chunk_is_refused() {
        let img = small_image();
        let mut bad = img.clone();
        bad.drain(chunk_span(&img, 1));
        let e = read(&bad).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::FooterMismatch {
                    what: "chunk count",
                    stored: 4,
                    counted: 3,
                    ..
                }
            ),
            "{e}"
        );
        // Even with the footer's totals patched to match, the sequence checksum catches it.
        let f = bad.len() - FOOTER_LEN;
        bad[f + 8..f + 16].copy_from_slice(&3u64.to_le_bytes());
        bad[f + 16..f + 24].copy_from_slice(&192u64.to_le_bytes());
        let e = read(&bad).unwrap_err();
        assert!(matches!(e, ImageError::FooterChecksum { .. }), "{e}");
    }

    #[test]
    fn duplicated_chunk_is_refused() {
        let img = small_image();
        let span = chunk_span(&img, 0);
        let mut bad = img.clone();
        let copy = img[span.clone()].to_vec();
        bad.splice(span.end..span.end, copy);
        assert!(read(&bad).is_err());
    }

    #[test]
    fn chunk_with_flipped_offset_is_caught_at_that_chunk() {
        let img = small_image();
        let span = chunk_span(&img, 1);
        let mut bad = img.clone();
        bad[span.start + 4] ^= 0x40; // offset 128 -> 192, still inside the region
        match read(&bad) {
            Err(ImageError::ChunkChecksum {
                chunk: 1, offset, ..
            }) => {
                assert_eq!(offset, span.start as u64);
            }
            other => panic!("expected ChunkChecksum at chunk 1, got {other:?}"),
        }
    }

    #[test]
    fn absurd_header_length_is_refused_without_allocating() {
        let mut img = small_image();
        img[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = read(&img).unwrap_err();
        assert!(matches!(e, ImageError::HeaderLength { .. }), "{e}");
    }

    #[test]
    fn writer_refuses_bad_headers() {
        let good = header(&[10]);
        let cases: Vec<(&str, ImageHeader)> = vec![
            (
                "empty app",
                ImageHeader {
                    app: String::new(),
                    ..good.clone()
                },
            ),
            (
                "long app",
                ImageHeader {
                    app: "x".repeat(MAX_APP_LEN + 1),
                    ..good.clone()
                },
            ),
            (
                "seq 0",
                ImageHeader {
                    seq: 0,
                    parent: None,
                    ..good.clone()
                },
            ),
            (
                "parent = seq",
                ImageHeader {
                    parent: Some(3),
                    ..good.clone()
                },
            ),
            (
                "parent 0",
                ImageHeader {
                    parent: Some(0),
                    ..good.clone()
                },
            ),
            (
                "page size",
                ImageHeader {
                    page_size: 4095,
                    ..good.clone()
                },
            ),
            (
                "duplicate ids",
                ImageHeader {
                    regions: vec![
                        RegionDesc {
                            id: 1,
                            base: 0,
                            len: 1,
                        },
                        RegionDesc {
                            id: 1,
                            base: 8,
                            len: 1,
                        },
                    ],
                    ..good.clone()
                },
            ),
            (
                "wrapping region",
                ImageHeader {
                    regions: vec![RegionDesc {
                        id: 1,
                        base: u64::MAX,
                        len: 2,
                    }],
                    ..good.clone()
                },
            ),
        ];
        for (what, h) in cases {
            match ImageWriter::new(Vec::new(), &h) {
                Err(ImageError::InvalidHeader { .. }) => {}
                other => panic!("{what}: expected InvalidHeader, got {other:?}"),
            }
        }
        let max_app = ImageHeader {
            app: "é".repeat(MAX_APP_LEN / 2),
            ..good
        };
        let img = ImageWriter::new(Vec::new(), &max_app)
            .unwrap()
            .finish()
            .unwrap()
            .0;
        assert_eq!(read_image(&img[..], &max_app.app, None).unwrap().0, max_app);
    }

    #[test]
    fn writer_refuses_chunks_outside_regions() {
        let mut w = ImageWriter::new(Vec::new(), &header(&[100, 7])).unwrap();
        assert!(matches!(
            w.chunk(2, 0, &[1]),
            Err(ImageError::NoSuchRegion {
                region_index: 2,
                regions: 2,
                ..
            })
        ));
        assert!(matches!(
            w.chunk(1, 0, &[0; 8]),
            Err(ImageError::ChunkOutsideRegion {
                chunk_end: 8,
                region_len: 7,
                ..
            })
        ));
        assert!(matches!(
            w.chunk(0, u64::MAX, &[0; 2]),
            Err(ImageError::ChunkOutsideRegion { .. })
        ));
        // Refusals write nothing, so the image is still good.
        w.chunk(1, 0, &[9; 7]).unwrap();
        w.chunk(0, 50, &[]).unwrap();
        let (img, s) = w.finish().unwrap();
        assert_eq!(s.chunks, 1);
        assert_eq!(read(&img).unwrap().1, s);
    }

    #[test]
    fn batched_chunks_match_single_chunks_and_stop_at_a_refused_one() {
        let h = header(&[1 << 16, 300]);
        let pieces: Vec<(u32, u64, Vec<u8>)> = (0..3 * CHUNK_BATCH as u64 + 5)
            .map(|i| {
                let data: Vec<u8> = (0..1 + i % 7).map(|b| (b + i).to_le_bytes()[0]).collect();
                (u32::from(i % 3 == 0), i * 8 % 290, data)
            })
            .collect();
        let mut one = ImageWriter::new(Vec::new(), &h).unwrap();
        for (r, o, d) in &pieces {
            one.chunk(*r, *o, d).unwrap();
        }
        let mut batched = ImageWriter::new(Vec::new(), &h).unwrap();
        batched
            .chunks(pieces.iter().map(|(r, o, d)| (*r, *o, d.as_slice())))
            .unwrap();
        let (a, sa) = one.finish().unwrap();
        let (b, sb) = batched.finish().unwrap();
        assert_eq!((a.clone(), sa.clone()), (b, sb));
        assert_eq!(read(&a).unwrap().1, sa);

        // A refused chunk in the middle of a batch: the chunks before it are written, it and
        // the rest are not, and the image is still good.
        let mut w = ImageWriter::new(Vec::new(), &h).unwrap();
        let bad = [
            (0u32, 0u64, &[1u8; 4][..]),
            (1, 299, &[2; 2][..]),
            (0, 8, &[3; 4][..]),
        ];
        let e = w.chunks(bad).unwrap_err();
        assert!(
            matches!(e, ImageError::ChunkOutsideRegion { chunk: 1, .. }),
            "{e}"
        );
        let (img, s) = w.finish().unwrap();
        assert_eq!(s.chunks, 1);
        assert_eq!(read(&img).unwrap().1, s);
    }

    #[test]
    fn a_finished_writer_takes_no_more_chunks() {
        let mut w = ImageWriter::new(Vec::new(), &header(&[64])).unwrap();
        w.chunk(0, 0, &[5; 64]).unwrap();
        let s = w.finish_in_place().unwrap();
        assert!(matches!(w.chunk(0, 0, &[1]), Err(ImageError::Finished)));
        assert!(matches!(w.finish_in_place(), Err(ImageError::Finished)));
        let (img, n) = w.into_parts();
        assert_eq!(n, s.file_bytes);
        assert_eq!(read(&img).unwrap().1, s);
    }

    #[test]
    fn reader_reports_record_positions_that_read_chunk_at_reads_again() {
        let img = small_image();
        let dir = std::env::temp_dir().join(format!("ckpt-image-test-{}", std::process::id()));
        std::fs::write(&dir, &img).unwrap();
        let file = std::fs::File::open(&dir).unwrap();
        let mut reader = ImageReader::new(&img[..], APP).unwrap();
        let mut seen = Vec::new();
        while let Some(c) = reader.next_chunk().unwrap() {
            seen.push((c.region_index, c.offset, c.record_pos, c.data.to_vec()));
        }
        assert_eq!(reader.summary().unwrap().chunks, 4);
        assert!(reader.next_chunk().unwrap().is_none());
        let mut buf = Vec::new();
        for (i, (r, o, pos, data)) in seen.iter().enumerate() {
            assert_eq!(chunk_span(&img, i).start as u64, *pos);
            let got = read_chunk_at(&file, *pos, i as u64, &mut buf).unwrap();
            assert_eq!((got, &buf), ((*r, *o), data));
        }
        // A flipped data byte is caught when read again; so is a position past the end.
        let mut bad = img.clone();
        bad[chunk_span(&img, 2).start + CHUNK_RECORD_LEN + 3] ^= 1;
        std::fs::write(&dir, &bad).unwrap();
        let file = std::fs::File::open(&dir).unwrap();
        let e = read_chunk_at(&file, seen[2].2, 2, &mut buf).unwrap_err();
        assert!(
            matches!(e, ImageError::ChunkChecksum { chunk: 2, .. }),
            "{e}"
        );
        let e = read_chunk_at(&file, img.len() as u64, 9, &mut buf).unwrap_err();
        assert!(matches!(e, ImageError::Truncated { .. }), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }

    /// A sink that accepts `room` bytes, then fails like a full disk.
    #[derive(Debug)]
    struct Full {
        room: usize,
    }
    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_write_poisons_the_writer() {
        let mut w = ImageWriter::new(Full { room: 200 }, &header(&[4096])).unwrap();
        let e = w.chunk(0, 0, &[1; 4096]).unwrap_err();
        assert_eq!(e.io_kind(), Some(io::ErrorKind::StorageFull));
        let e = w.chunk(0, 0, &[1; 1]).unwrap_err();
        assert!(matches!(
            e,
            ImageError::Poisoned {
                kind: io::ErrorKind::StorageFull
            }
        ));
        let e = w.finish().unwrap_err();
        assert_eq!(e.io_kind(), Some(io::ErrorKind::StorageFull));
    }
}
