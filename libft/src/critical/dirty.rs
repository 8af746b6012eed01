//! Dirty-page tracking for critical memory: which pages of the heap and of registered regions
//! were written since the last time we asked.
//!
//! Preferred: userfaultfd write-protect in asynchronous mode (the kernel resolves write faults
//! itself and only records them) read back and re-armed atomically by the PAGEMAP_SCAN ioctl.
//! Fallback: an xxh3 hash per page compared with the previous collection. Both answer the same
//! question with the same semantics; this module never copies or writes tracked memory.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::Error;
use super::uapi::{
    PAGE_IS_WRITTEN, PAGEMAP_SCAN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, PageRegion,
    PmScanArg, UFFD_API, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, UFFD_USER_MODE_ONLY,
    UFFDIO_API, UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_WP, UFFDIO_WRITEPROTECT,
    UFFDIO_WRITEPROTECT_MODE_WP, UffdioApi, UffdioRange, UffdioRegister, UffdioWriteprotect,
};
use super::vm::{align_down, align_up, page_size};

/// How many page runs one PAGEMAP_SCAN call may return before we call again.
const SCAN_BATCH: usize = 512;

/// Which dirty-tracking method to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyMode {
    /// userfaultfd + PAGEMAP_SCAN when the kernel allows it, else hashing (with a warning).
    #[default]
    Auto,
    /// userfaultfd + PAGEMAP_SCAN, or an error.
    Uffd,
    /// Per-page hashes (`FT_DIRTY=hash`).
    Hash,
}

impl DirtyMode {
    /// Parses `FT_DIRTY`: `auto`, `uffd` or `hash`.
    pub fn parse(text: &str) -> Option<DirtyMode> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(DirtyMode::Auto),
            "uffd" | "userfaultfd" => Some(DirtyMode::Uffd),
            "hash" => Some(DirtyMode::Hash),
            _ => None,
        }
    }
}

/// The method a tracker actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerKind {
    /// userfaultfd write-protect (async) + PAGEMAP_SCAN.
    Uffd,
    /// Per-page xxh3 hashes.
    Hash,
}

/// A tracked range of memory. Pages are counted from `base`, so an area that does not start on
/// a page boundary has its own page grid (its last page may be short).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    /// First byte.
    pub base: usize,
    /// Length in bytes.
    pub len: usize,
}

impl Area {
    /// Number of area pages (the last one possibly partial).
    pub fn pages(&self) -> usize {
        self.len.div_ceil(page_size())
    }

    /// The smallest page-aligned range containing the first `limit` bytes of the area.
    fn cover(&self, limit: usize) -> (usize, usize) {
        let page = page_size();
        let end = self.base + limit.min(self.len);
        let start = align_down(self.base, page);
        (start, align_up(end, page).unwrap_or(end))
    }
}

/// A set of area-relative page numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    len: usize,
}

impl PageSet {
    /// An empty set for pages `0..len`.
    pub fn with_len(len: usize) -> PageSet {
        PageSet {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Whether no page is in the set.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Adds pages `first..=last` (clipped to the set's length).
    pub fn insert_range(&mut self, first: usize, last: usize) {
        let last = last.min(self.len.saturating_sub(1));
        for page in first..=last {
            if let Some(w) = self.words.get_mut(page / 64) {
                *w |= 1 << (page % 64);
            }
        }
    }

    /// Whether `page` is in the set.
    #[cfg(test)]
    pub fn contains(&self, page: usize) -> bool {
        self.words
            .get(page / 64)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Number of pages in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Adds every page of `other` (clipped to this set's length).
    pub fn union_with(&mut self, other: &PageSet) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        self.clear_tail();
    }

    fn clear_tail(&mut self) {
        if !self.len.is_multiple_of(64)
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << (self.len % 64)) - 1;
        }
    }

    /// Runs of consecutive pages, as `(first, end)` with `end` exclusive, in order.
    pub fn runs(&self) -> Runs<'_> {
        Runs { set: self, pos: 0 }
    }

    fn next_set(&self, from: usize) -> Option<usize> {
        let mut index = from / 64;
        let mut word = *self.words.get(index)? & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let page = index * 64 + word.trailing_zeros() as usize;
                return (page < self.len).then_some(page);
            }
            index += 1;
            word = *self.words.get(index)?;
        }
    }

    fn next_clear(&self, from: usize) -> usize {
        let mut index = from / 64;
        let Some(&first) = self.words.get(index) else {
            return self.len;
        };
        let mut word = !first & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                return (index * 64 + word.trailing_zeros() as usize).min(self.len);
            }
            index += 1;
            match self.words.get(index) {
                Some(w) => word = !w,
                None => return self.len,
            }
        }
    }
}

/// Iterator over the runs of a [`PageSet`].
#[derive(Debug)]
pub struct Runs<'a> {
    set: &'a PageSet,
    pos: usize,
}

impl Iterator for Runs<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let first = self.set.next_set(self.pos)?;
        let end = self.set.next_clear(first);
        self.pos = end;
        Some((first, end))
    }
}

/// Dirty pages of every area, indexed like the areas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    areas: Vec<PageSet>,
}

impl DirtySet {
    /// An empty set shaped for `areas`.
    pub fn for_areas(areas: &[Area]) -> DirtySet {
        DirtySet {
            areas: areas.iter().map(|a| PageSet::with_len(a.pages())).collect(),
        }
    }

    /// The pages of area `index`.
    pub fn area(&self, index: usize) -> Option<&PageSet> {
        self.areas.get(index)
    }

    /// Total pages in the set.
    pub fn count(&self) -> usize {
        self.areas.iter().map(PageSet::count).sum()
    }

    /// Adds every page of `other`.
    pub fn union_with(&mut self, other: &DirtySet) {
        for (mine, theirs) in self.areas.iter_mut().zip(&other.areas) {
            mine.union_with(theirs);
        }
    }

    /// Empties the set and reshapes it for `areas`.
    pub fn reset(&mut self, areas: &[Area]) {
        *self = DirtySet::for_areas(areas);
    }

    /// Adds pages `first..=last` of area `index`.
    pub fn mark(&mut self, index: usize, first: usize, last: usize) {
        if let Some(set) = self.areas.get_mut(index) {
            set.insert_range(first, last);
        }
    }
}

/// Tracks written pages of a list of areas. Area `i` of every call is the `i`-th area added.
#[derive(Debug)]
pub struct Tracker {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Uffd(UffdTracker),
    Hash(HashTracker),
}

impl Tracker {
    /// A tracker of the requested kind. With [`DirtyMode::Auto`], a kernel (or a policy such as
    /// EPERM) that refuses userfaultfd gives a hashing tracker and the reason as the second value.
    pub fn new(mode: DirtyMode) -> Result<(Tracker, Option<String>), Error> {
        match mode {
            DirtyMode::Hash => Ok((Tracker::hashing(), None)),
            DirtyMode::Uffd => {
                let uffd = UffdTracker::open().map_err(Error::Tracking)?;
                Ok((
                    Tracker {
                        inner: Inner::Uffd(uffd),
                    },
                    None,
                ))
            }
            DirtyMode::Auto => match UffdTracker::open() {
                Ok(uffd) => Ok((
                    Tracker {
                        inner: Inner::Uffd(uffd),
                    },
                    None,
                )),
                Err(e) => Ok((
                    Tracker::hashing(),
                    Some(format!(
                        "userfaultfd write-protect tracking unavailable ({e})"
                    )),
                )),
            },
        }
    }

    /// A hashing tracker (the fallback).
    pub fn hashing() -> Tracker {
        Tracker {
            inner: Inner::Hash(HashTracker::default()),
        }
    }

    /// The method in use.
    pub fn kind(&self) -> TrackerKind {
        match self.inner {
            Inner::Uffd(_) => TrackerKind::Uffd,
            Inner::Hash(_) => TrackerKind::Hash,
        }
    }

    /// Starts tracking `area` (the next index): its current contents count as clean. `scan_len`
    /// is how much of it holds data now (for the heap: its used span).
    pub fn add_area(&mut self, area: Area, scan_len: usize) -> Result<(), Error> {
        match &mut self.inner {
            Inner::Uffd(u) => u.add_area(area).map_err(Error::Tracking),
            Inner::Hash(h) => {
                h.add_area(area, scan_len);
                Ok(())
            }
        }
    }

    /// Adds to `out` the pages written since the last `collect` (or `add_area`/`reset`), within
    /// the first `scan_lens[i]` bytes of area `i`, and makes them clean again.
    pub fn collect(
        &mut self,
        areas: &[Area],
        scan_lens: &[usize],
        out: &mut DirtySet,
    ) -> Result<(), Error> {
        match &mut self.inner {
            Inner::Uffd(u) => u.collect(areas, scan_lens, out).map_err(Error::Tracking),
            Inner::Hash(h) => {
                h.collect(areas, scan_lens, out);
                Ok(())
            }
        }
    }

    /// Makes every page of every area clean: after recovery rewrote them.
    pub fn reset(&mut self, areas: &[Area], scan_lens: &[usize]) -> Result<(), Error> {
        match &mut self.inner {
            Inner::Uffd(u) => u.reset(areas).map_err(Error::Tracking),
            Inner::Hash(h) => {
                h.reset(areas, scan_lens);
                Ok(())
            }
        }
    }
}

/// Marks in `out` every page of every area that `[start, end)` touches.
fn mark_range(areas: &[Area], scan_lens: &[usize], start: usize, end: usize, out: &mut DirtySet) {
    let page = page_size();
    for (index, (area, limit)) in areas.iter().zip(scan_lens).enumerate() {
        let lo = start.max(area.base);
        let hi = end.min(area.base + (*limit).min(area.len));
        if lo < hi {
            out.mark(index, (lo - area.base) / page, (hi - 1 - area.base) / page);
        }
    }
}

#[derive(Debug)]
struct UffdTracker {
    uffd: OwnedFd,
    pagemap: File,
    vec: Vec<PageRegion>,
}

impl UffdTracker {
    fn open() -> io::Result<UffdTracker> {
        let uffd = match open_uffd(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED) {
            Ok(fd) => fd,
            // Without WP_UNPOPULATED, never-populated pages are simply not protected; a write
            // to one still shows as written, so asynchronous tracking stays correct.
            Err(_) => open_uffd(UFFD_FEATURE_WP_ASYNC)?,
        };
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut tracker = UffdTracker {
            uffd,
            pagemap,
            vec: vec![PageRegion::default(); SCAN_BATCH],
        };
        // An empty scan proves the kernel has PAGEMAP_SCAN (ENOTTY before 6.7).
        tracker.scan(0, 0, 0, &mut |_, _| ())?;
        Ok(tracker)
    }

    fn add_area(&mut self, area: Area) -> io::Result<()> {
        let (start, end) = area.cover(area.len);
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: (end - start) as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register that lives for the call;
        // registering only changes how the kernel handles faults in the range.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        self.protect(start, end)
    }

    fn protect(&self, start: usize, end: usize) -> io::Result<()> {
        if start >= end {
            return Ok(());
        }
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: (end - start) as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a uffdio_writeprotect that lives for the call; in
        // async mode a protected page still accepts writes (the kernel records them).
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn collect(
        &mut self,
        areas: &[Area],
        scan_lens: &[usize],
        out: &mut DirtySet,
    ) -> io::Result<()> {
        let mut ranges: Vec<(usize, usize)> = areas
            .iter()
            .zip(scan_lens)
            .map(|(a, limit)| a.cover(*limit))
            .filter(|(s, e)| s < e)
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        for (start, end) in merged {
            self.scan(
                start,
                end,
                PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                &mut |s, e| mark_range(areas, scan_lens, s, e, out),
            )?;
        }
        Ok(())
    }

    fn reset(&mut self, areas: &[Area]) -> io::Result<()> {
        for area in areas {
            let (start, end) = area.cover(area.len);
            self.protect(start, end)?;
        }
        Ok(())
    }

    /// Walks `[start, end)` with PAGEMAP_SCAN for written pages, calling `found` for each run.
    /// With PM_SCAN_WP_MATCHING the kernel write-protects each page as it reports it.
    fn scan(
        &mut self,
        start: usize,
        end: usize,
        flags: u64,
        found: &mut dyn FnMut(usize, usize),
    ) -> io::Result<()> {
        let mut from = start as u64;
        let end = end as u64;
        loop {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                flags,
                start: from,
                end,
                vec: self.vec.as_mut_ptr() as u64,
                vec_len: self.vec.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` PageRegions into
            // `self.vec`, which is that long and outlives the call.
            let ret = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            let count = usize::try_from(ret).map_err(|_| io::Error::last_os_error())?;
            for r in self.vec.iter().take(count) {
                found(super::heap::to_usize(r.start), super::heap::to_usize(r.end));
            }
            if arg.walk_end >= end {
                return Ok(());
            }
            if arg.walk_end <= from {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            from = arg.walk_end;
        }
    }
}

fn open_uffd(features: u64) -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes only flags and returns a new fd or -1.
    let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
    if raw < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // Kernels before 5.11 do not know UFFD_USER_MODE_ONLY.
        // SAFETY: as above.
        raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    }
    let raw = i32::try_from(raw)
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(io::Error::last_os_error)?;
    // SAFETY: `raw` is a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a uffdio_api that lives for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Per-page hashes of the last collection; pages never hashed count as zero-filled.
#[derive(Debug, Default)]
struct HashTracker {
    hashes: Vec<Vec<u64>>,
    zero_page: u64,
}

impl HashTracker {
    fn zero_hash(&mut self) -> u64 {
        if self.zero_page == 0 {
            self.zero_page = xxhash_rust::xxh3::xxh3_64(&vec![0u8; page_size()]);
        }
        self.zero_page
    }

    fn add_area(&mut self, area: Area, scan_len: usize) {
        let hashes = page_hashes(area, scan_len);
        self.hashes.push(hashes);
    }

    fn collect(&mut self, areas: &[Area], scan_lens: &[usize], out: &mut DirtySet) {
        let zero = self.zero_hash();
        let page = page_size();
        for (index, ((area, limit), hashes)) in areas
            .iter()
            .zip(scan_lens)
            .zip(&mut self.hashes)
            .enumerate()
        {
            let pages = (*limit).min(area.len).div_ceil(page);
            if hashes.len() < pages {
                hashes.resize(pages, zero);
            }
            for (p, old) in hashes.iter_mut().enumerate().take(pages) {
                let h = hash_page(*area, p);
                if h != *old {
                    *old = h;
                    out.mark(index, p, p);
                }
            }
        }
    }

    fn reset(&mut self, areas: &[Area], scan_lens: &[usize]) {
        self.hashes = areas
            .iter()
            .zip(scan_lens)
            .map(|(a, limit)| page_hashes(*a, *limit))
            .collect();
    }
}

fn page_hashes(area: Area, scan_len: usize) -> Vec<u64> {
    let pages = scan_len.min(area.len).div_ceil(page_size());
    (0..pages).map(|p| hash_page(area, p)).collect()
}

fn hash_page(area: Area, page: usize) -> u64 {
    let size = page_size();
    let offset = page * size;
    let len = size.min(area.len - offset);
    // SAFETY: areas are mapped readable for as long as they are tracked (the heap is our own
    // mapping; regions were checked against /proc/self/maps when registered and the caller of
    // `register` promised they stay valid), and `offset + len <= area.len`. The application
    // does not write critical memory while a checkpoint collects (the checkpoint contract).
    let bytes = unsafe { std::slice::from_raw_parts((area.base + offset) as *const u8, len) };
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_set_runs() {
        let mut s = PageSet::with_len(200);
        assert!(s.is_empty());
        assert_eq!(s.runs().count(), 0);
        s.insert_range(3, 5);
        s.insert_range(63, 64);
        s.insert_range(66, 66);
        s.insert_range(120, 500);
        assert_eq!(
            s.runs().collect::<Vec<_>>(),
            vec![(3, 6), (63, 65), (66, 67), (120, 200)]
        );
        assert_eq!(s.count(), 3 + 2 + 1 + 80);
        assert!(s.contains(199) && !s.contains(200) && !s.contains(62));
        let mut full = PageSet::with_len(128);
        full.insert_range(0, 127);
        assert_eq!(full.runs().collect::<Vec<_>>(), vec![(0, 128)]);
        let mut u = PageSet::with_len(70);
        u.union_with(&s);
        assert_eq!(
            u.runs().collect::<Vec<_>>(),
            vec![(3, 6), (63, 65), (66, 67)]
        );
    }

    #[test]
    fn unaligned_area_marks_both_of_its_pages() {
        let page = page_size();
        let areas = [Area {
            base: 10 * page + 100,
            len: 2 * page,
        }];
        let mut out = DirtySet::for_areas(&areas);
        assert_eq!(areas[0].pages(), 2);
        // Hardware page 11 holds the end of area page 0 and the start of area page 1.
        mark_range(&areas, &[areas[0].len], 11 * page, 12 * page, &mut out);
        assert_eq!(out.count(), 2);
        let mut out = DirtySet::for_areas(&areas);
        mark_range(&areas, &[areas[0].len], 10 * page, 11 * page, &mut out);
        assert_eq!(
            out.area(0).map(|s| s.runs().collect::<Vec<_>>()),
            Some(vec![(0, 1)])
        );
        assert_eq!(areas[0].cover(areas[0].len), (10 * page, 13 * page));
    }

    #[test]
    fn dirty_mode_parses() {
        assert_eq!(DirtyMode::parse("hash"), Some(DirtyMode::Hash));
        assert_eq!(DirtyMode::parse("UFFD"), Some(DirtyMode::Uffd));
        assert_eq!(DirtyMode::parse(""), Some(DirtyMode::Auto));
        assert_eq!(DirtyMode::parse("soft-dirty"), None);
    }
}
