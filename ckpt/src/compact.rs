//! Composing a full image from an incremental chain (compaction): the bytes recovery would
//! leave after applying the chain's full base and its increments in order, written as one full
//! image. Owns the overlay of the increments' newest byte ranges and the streaming merge with
//! the base. It must never emit a byte that was not verified by its chunk checksum in this
//! pass, never hold more than one chunk of the base in memory, and never write anywhere but the
//! writer it is given (the store commits or discards that).
//!
//! ```text
//!  increments (oldest → newest): verify whole, index chunks ──► overlay: range → newest chunk
//!  base: stream chunk by chunk (verified) ──► patch overlay ranges in (re-read, re-verified)
//!        ──► write;  then overlay ranges outside every base chunk ──► write
//! ```

use crate::image::{ImageError, ImageHeader, ImageReader, ImageWriter, read_chunk_at};
use crate::store::{CompactGate, ImageFile};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// One image of the chain to compose: its open file (what was checked is what is read), its
/// path for error messages, and its header.
#[derive(Debug)]
pub(crate) struct Link<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub header: &'a ImageHeader,
}

/// Why a composition stopped.
#[derive(Debug)]
pub(crate) enum ComposeError {
    /// An image of the chain is unreadable or corrupt (the path names it).
    Source { path: PathBuf, source: ImageError },
    /// Writing the composed image failed.
    Output(ImageError),
    /// The chain cannot be composed into one image (its images disagree on the layout).
    Layout(String),
    /// A chunk read again no longer matches what was verified moments before.
    Reread { path: PathBuf, record_pos: u64 },
    /// The gate said to stop.
    Cancelled,
}

/// Where the newest bytes of a range live: in chunk `chunk` of chain image `image`, whose
/// record is at `record_pos` and whose data starts at `chunk_offset` in the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Origin {
    image: usize,
    chunk: u64,
    record_pos: u64,
    chunk_offset: u64,
}

/// Disjoint byte ranges of one region, each with a value; a later insert wins over the
/// ranges it overlaps (which are trimmed or dropped).
#[derive(Debug)]
struct RangeMap<T: Copy> {
    /// start → (end, value), end exclusive, ranges disjoint.
    ranges: BTreeMap<u64, (u64, T)>,
}

impl<T: Copy> RangeMap<T> {
    fn new() -> RangeMap<T> {
        RangeMap {
            ranges: BTreeMap::new(),
        }
    }

    fn insert(&mut self, start: u64, end: u64, value: T) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64, T)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, (e, v))| (*s, *e, *v))
            .collect();
        for (s, e, v) in overlapping {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, (start, v));
            }
            if e > end {
                self.ranges.insert(end, (e, v));
            }
        }
        self.ranges.insert(start, (end, value));
    }

    /// The parts of the ranges that intersect `[start, end)`, clipped to it, in order.
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, T)> + '_ {
        let end = end.max(start);
        // The range beginning at or before `start` may reach into the window.
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .map_or(start, |(s, _)| *s);
        self.ranges
            .range(first..end)
            .filter(move |(_, (e, _))| *e > start)
            .map(move |(s, (e, v))| ((*s).max(start), (*e).min(end), *v))
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64, T)> + '_ {
        self.ranges.iter().map(|(s, (e, v))| (*s, *e, *v))
    }
}

/// The chunk last read again from each chain image, so consecutive ranges of one chunk cost
/// one read and one checksum.
#[derive(Debug)]
struct ChunkCache {
    slots: Vec<Option<(u64, Vec<u8>)>>,
}

impl ChunkCache {
    fn new(images: usize) -> ChunkCache {
        ChunkCache {
            slots: (0..images).map(|_| None).collect(),
        }
    }

    /// The bytes `[start, end)` of the region, from the chunk `origin` names.
    fn bytes(
        &mut self,
        links: &[Link<'_>],
        origin: Origin,
        start: u64,
        end: u64,
    ) -> Result<&[u8], ComposeError> {
        let link = &links[origin.image];
        let slot = &mut self.slots[origin.image];
        if slot
            .as_ref()
            .is_none_or(|(pos, _)| *pos != origin.record_pos)
        {
            let mut data = slot.take().map(|(_, d)| d).unwrap_or_default();
            read_chunk_at(link.file, origin.record_pos, origin.chunk, &mut data)
                .map_err(|e| source_err(link, e))?;
            *slot = Some((origin.record_pos, data));
        }
        let data = &slot.as_ref().expect("filled just above").1;
        let index = |at: u64| {
            at.checked_sub(origin.chunk_offset)
                .and_then(|i| usize::try_from(i).ok())
        };
        match (index(start), index(end)) {
            (Some(from), Some(to)) => data.get(from..to),
            _ => None,
        }
        .ok_or_else(|| ComposeError::Reread {
            path: link.path.to_owned(),
            record_pos: origin.record_pos,
        })
    }
}

/// A reader of the whole image, from its first byte (the file may have been read before).
fn reader<'a>(link: &Link<'a>, app: &str) -> Result<ImageReader<&'a File>, ComposeError> {
    let mut file = link.file;
    file.seek(SeekFrom::Start(0))
        .map_err(|source| source_err(link, ImageError::Io { offset: 0, source }))?;
    ImageReader::new(file, app).map_err(|e| source_err(link, e))
}

fn source_err(link: &Link<'_>, source: ImageError) -> ComposeError {
    ComposeError::Source {
        path: link.path.to_owned(),
        source,
    }
}

/// Checks that every image of the chain describes the same regions (ids and lengths; bases
/// may differ between processes) and page size as the newest.
fn check_layouts(links: &[Link<'_>]) -> Result<(), ComposeError> {
    let newest = links
        .last()
        .ok_or_else(|| ComposeError::Layout("an empty chain".to_owned()))?
        .header;
    for link in links {
        let h = link.header;
        let same = h.page_size == newest.page_size
            && h.regions.len() == newest.regions.len()
            && h.regions
                .iter()
                .zip(&newest.regions)
                .all(|(a, b)| a.id == b.id && a.len == b.len);
        if !same {
            return Err(ComposeError::Layout(format!(
                "image {} describes other regions than image {}",
                h.seq, newest.seq
            )));
        }
    }
    Ok(())
}

/// Writes into `out` (whose header is the newest image's, made full) the bytes that applying
/// `links` (full base first, then the increments in order) would leave: every base chunk with
/// the increments' newer bytes patched in, then the increments' ranges that no base chunk
/// covers. Verifies every image whole on the way (a corrupt one stops the composition).
/// `gate` is asked between chunks whether to go on (it may block for a while).
pub(crate) fn compose(
    links: &[Link<'_>],
    app: &str,
    out: &mut ImageWriter<ImageFile>,
    gate: &mut CompactGate<'_>,
) -> Result<(), ComposeError> {
    check_layouts(links)?;
    let mut cancelled = || !gate();
    let regions = links[0].header.regions.len();
    let mut overlay: Vec<RangeMap<Origin>> = (0..regions).map(|_| RangeMap::new()).collect();
    for (image, link) in links.iter().enumerate().skip(1) {
        let mut reader = reader(link, app)?;
        let mut chunk = 0;
        while let Some(c) = reader.next_chunk().map_err(|e| source_err(link, e))? {
            let end = c.offset + c.data.len() as u64;
            let origin = Origin {
                image,
                chunk,
                record_pos: c.record_pos,
                chunk_offset: c.offset,
            };
            if let Some(map) = overlay.get_mut(c.region_index as usize) {
                map.insert(c.offset, end, origin);
            }
            chunk += 1;
            if cancelled() {
                return Err(ComposeError::Cancelled);
            }
        }
    }

    let mut cache = ChunkCache::new(links.len());
    let mut covered: Vec<RangeMap<()>> = (0..regions).map(|_| RangeMap::new()).collect();
    let base = &links[0];
    let mut reader = reader(base, app)?;
    while let Some(c) = reader.next_chunk().map_err(|e| source_err(base, e))? {
        let region = c.region_index as usize;
        let end = c.offset + c.data.len() as u64;
        if let Some(map) = overlay.get(region) {
            for (s, e, origin) in map.overlapping(c.offset, end) {
                let newer = cache.bytes(links, origin, s, e)?;
                let from = usize::try_from(s - c.offset).unwrap_or(usize::MAX);
                let to = usize::try_from(e - c.offset).unwrap_or(usize::MAX);
                if let Some(dst) = c.data.get_mut(from..to) {
                    dst.copy_from_slice(newer);
                }
            }
        }
        if let Some(cov) = covered.get_mut(region) {
            cov.insert(c.offset, end, ());
        }
        out.chunk(c.region_index, c.offset, c.data)
            .map_err(ComposeError::Output)?;
        if cancelled() {
            return Err(ComposeError::Cancelled);
        }
    }

    // Ranges only increments hold (memory that grew after the base was taken).
    for (region, map) in overlay.iter().enumerate() {
        let index = u32::try_from(region).unwrap_or(u32::MAX);
        for (start, end, origin) in map.iter() {
            let mut at = start;
            let holes: Vec<(u64, u64)> = covered[region]
                .overlapping(start, end)
                .map(|(s, e, ())| (s, e))
                .chain(std::iter::once((end, end)))
                .collect();
            for (s, e) in holes {
                if at < s {
                    let bytes = cache.bytes(links, origin, at, s)?;
                    out.chunk(index, at, bytes).map_err(ComposeError::Output)?;
                }
                at = at.max(e);
            }
            if cancelled() {
                return Err(ComposeError::Cancelled);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(m: &RangeMap<u8>) -> Vec<(u64, u64, u8)> {
        m.iter().collect()
    }

    #[test]
    fn later_inserts_win_and_trim_what_they_overlap() {
        let mut m = RangeMap::new();
        m.insert(0, 100, 1);
        m.insert(10, 20, 2);
        m.insert(90, 120, 3);
        m.insert(15, 15, 9); // empty: ignored
        assert_eq!(
            ranges(&m),
            vec![(0, 10, 1), (10, 20, 2), (20, 90, 1), (90, 120, 3)]
        );
        m.insert(5, 95, 4);
        assert_eq!(ranges(&m), vec![(0, 5, 1), (5, 95, 4), (95, 120, 3)]);
        m.insert(0, 200, 5);
        assert_eq!(ranges(&m), vec![(0, 200, 5)]);
    }

    #[test]
    fn overlapping_clips_to_the_window() {
        let mut m = RangeMap::new();
        m.insert(0, 10, 1);
        m.insert(20, 30, 2);
        m.insert(40, 50, 3);
        let got: Vec<_> = m.overlapping(5, 45).collect();
        assert_eq!(got, vec![(5, 10, 1), (20, 30, 2), (40, 45, 3)]);
        assert_eq!(m.overlapping(10, 20).count(), 0);
        assert_eq!(m.overlapping(29, 31).collect::<Vec<_>>(), vec![(29, 30, 2)]);
        assert_eq!(m.overlapping(60, 70).count(), 0);
    }
}
