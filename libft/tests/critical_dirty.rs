//! Dirty-page tracking through the Checkpointer, for both methods (userfaultfd write-protect
//! with PAGEMAP_SCAN, and per-page hashing): exactly the written pages are reported, nothing after
//! a checkpoint, never pages that were only read or never touched; incremental images carry
//! exactly those pages; periodic checkpoints happen at safe points.

mod critical_support;

use std::time::{Duration, Instant};

use critical_support::{Pages, Rng, config, low_byte, page_size};
use ft::critical::{CaptureMethod, Checkpointer, DirtyMode, TrackerKind};

/// Writes one byte into each of `pages` distinct random pages of `[base, base + count pages)`.
fn write_random_pages(base: *mut u8, count: usize, pages: usize, rng: &mut Rng) -> Vec<usize> {
    let mut chosen: Vec<usize> = Vec::new();
    while chosen.len() < pages {
        let p = rng.below(count);
        if !chosen.contains(&p) {
            chosen.push(p);
        }
    }
    for &p in &chosen {
        // SAFETY: page p of the caller's buffer.
        unsafe {
            base.add(p * page_size() + rng.below(page_size()))
                .write(0x5A)
        };
    }
    chosen
}

fn exact_counts(dirty: DirtyMode, slot: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = Checkpointer::new(config(dir.path(), slot, 64 << 20, dirty)).expect("checkpointer");
    let expected_kind = match dirty {
        DirtyMode::Hash => TrackerKind::Hash,
        _ => TrackerKind::Uffd,
    };
    assert_eq!(cp.tracker_kind(), expected_kind);

    // 256 heap pages, and a 16-page region: a private mapping nothing else touches.
    let heap_pages = 256;
    let buf = cp
        .heap()
        .alloc(heap_pages * page_size(), page_size())
        .expect("alloc")
        .as_ptr();
    let mapping = Pages::map(16);
    let region = mapping.base;
    let region_len = 16 * page_size();
    // SAFETY: `mapping` outlives the checkpointer (dropped after it, below).
    let id = unsafe { cp.register(region, region_len) }.expect("register");
    assert_eq!(id, 1);
    let cp = cp;

    let base = cp.checkpoint_sync(0).expect("full checkpoint");
    assert_eq!(base.parent, None);
    assert_eq!(
        cp.pending_pages(0).expect("scan"),
        0,
        "clean after a checkpoint"
    );

    let mut rng = Rng::new(42 + slot as u64);
    for round in 0..5 {
        let k = 1 + rng.below(40);
        write_random_pages(buf, heap_pages, k, &mut rng);
        // Region page i covers [region + i*page, ...): one write per chosen region page.
        let j = rng.below(8);
        write_random_pages(region, 16, j, &mut rng);
        // Reads never count.
        let mut sum = 0u64;
        for p in 0..heap_pages {
            // SAFETY: inside the heap buffer.
            sum += u64::from(unsafe { buf.add(p * page_size()).read_volatile() });
        }
        std::hint::black_box(sum);
        assert_eq!(
            cp.pending_pages(0).expect("scan"),
            k + j,
            "round {round}: {k}+{j} written"
        );
        // Asking again does not lose them (they stay pending for the stream) ...
        assert_eq!(cp.pending_pages(0).expect("scan"), k + j);
        let info = cp.checkpoint_sync(0).expect("incremental checkpoint");
        // ... and the increment carries exactly those pages.
        assert_eq!(info.parent, Some(info.seq - 1), "round {round}");
        assert_eq!(
            info.data_bytes,
            ((k + j) * page_size()) as u64,
            "round {round}"
        );
        assert_eq!(
            cp.pending_pages(0).expect("scan"),
            0,
            "round {round}: none after"
        );
    }
    // Never-touched pages are never reported, however often we ask.
    for _ in 0..3 {
        assert_eq!(cp.pending_pages(0).expect("scan"), 0);
    }
    drop(cp);
    drop(mapping);
}

#[test]
fn uffd_reports_exactly_the_written_pages() {
    exact_counts(DirtyMode::Uffd, 20);
}

#[test]
fn hashing_reports_exactly_the_written_pages() {
    exact_counts(DirtyMode::Hash, 21);
}

/// A region that does not start on a page boundary has its own page grid: hashing sees the
/// one region page written; write-protection sees the hardware page, which overlaps two region
/// pages, and reports both (a superset, never less).
fn unaligned_region(dirty: DirtyMode, slot: usize, expected: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mapping = Pages::map(9);
    let cp = Checkpointer::new(config(dir.path(), slot, 16 << 20, dirty)).expect("checkpointer");
    // SAFETY: the region lies inside `mapping`, which outlives `cp` (dropped explicitly below).
    let region = unsafe { mapping.base.add(100) };
    // SAFETY: as above.
    unsafe { cp.register(region, 8 * page_size()) }.expect("register");
    cp.checkpoint_sync(0).expect("full");
    // Region page 5, 2000 bytes in: hardware page 5 (100 + 2000 < one page).
    // SAFETY: inside the region.
    unsafe { region.add(5 * page_size() + 2000).write(1) };
    assert_eq!(cp.pending_pages(0).expect("scan"), expected);
    let info = cp.checkpoint_sync(0).expect("incremental");
    assert_eq!(info.data_bytes, (expected * page_size()) as u64);
    drop(cp);
}

#[test]
fn unaligned_region_with_uffd() {
    unaligned_region(DirtyMode::Uffd, 25, 2);
}

#[test]
fn unaligned_region_with_hashing() {
    unaligned_region(DirtyMode::Hash, 26, 1);
}

#[test]
fn streams_track_their_own_dirty_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp =
        Checkpointer::new(config(dir.path(), 22, 16 << 20, DirtyMode::Auto)).expect("checkpointer");
    let buf = cp
        .heap()
        .alloc(64 * page_size(), page_size())
        .expect("alloc")
        .as_ptr();
    cp.checkpoint_sync(1).expect("full of stream 1");
    cp.checkpoint_sync(2).expect("full of stream 2");
    let mut rng = Rng::new(9);
    write_random_pages(buf, 64, 5, &mut rng);
    let one = cp.checkpoint_sync(1).expect("stream 1");
    assert_eq!(one.data_bytes, (5 * page_size()) as u64);
    write_random_pages(buf, 64, 1, &mut rng);
    // Stream 2 still owes the first 5 pages (unless the second write hit one of them).
    let two = cp.checkpoint_sync(2).expect("stream 2");
    assert!(two.data_bytes >= (5 * page_size()) as u64, "{two:?}");
    assert!(dir.path().join("1").is_dir() && dir.path().join("2").is_dir());
}

#[test]
fn registration_is_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp =
        Checkpointer::new(config(dir.path(), 23, 16 << 20, DirtyMode::Auto)).expect("checkpointer");
    let mapping = Pages::map(4);
    // SAFETY: every call below either refuses the range or registers memory that outlives cp.
    unsafe {
        assert!(cp.register(std::ptr::null_mut(), 8).is_err(), "NULL");
        assert!(cp.register(mapping.base, 0).is_err(), "empty");
        let heap = cp.heap().base() as *mut u8;
        assert!(cp.register(heap.add(4096), 8).is_err(), "inside the heap");
        assert!(cp.register(0x1000 as *mut u8, 8).is_err(), "unmapped");
        assert_eq!(cp.register(mapping.base, 100).expect("first"), 1);
        assert!(cp.register(mapping.base.add(50), 100).is_err(), "overlap");
        assert_eq!(
            cp.register(mapping.base.add(100), 100).expect("adjacent"),
            2
        );
    }
    assert_eq!(cp.region_count(), 2);
    drop(cp);
}

#[test]
fn periodic_checkpoints_happen_at_safe_points() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp =
        Checkpointer::new(config(dir.path(), 24, 16 << 20, DirtyMode::Auto)).expect("checkpointer");
    let buf = cp.heap().alloc(page_size(), 16).expect("alloc").as_ptr();
    // Nothing scheduled: a safe point takes nothing.
    assert_eq!(cp.safe_point().expect("safe point"), None);
    cp.set_every(0, Some(Duration::from_millis(40)));
    let started = Instant::now();
    let mut taken = 0;
    let mut calls = 0u64;
    while started.elapsed() < Duration::from_millis(420) {
        // SAFETY: our heap block.
        unsafe { buf.write(low_byte(calls)) };
        if let Some(s) = cp.safe_point().expect("safe point") {
            assert_eq!(s.method, CaptureMethod::Staging);
            taken += 1;
        }
        calls += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    cp.wait(0).expect("last image");
    // At most one per period; at least a few even on a loaded machine.
    assert!(
        (3..=11).contains(&taken),
        "{taken} checkpoints in 420 ms at 40 ms"
    );
    cp.set_every(0, None);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(cp.safe_point().expect("safe point"), None, "stopped");
    // The cheap path: no checkpoint due.
    let t = Instant::now();
    for _ in 0..1_000_000 {
        assert!(cp.safe_point().expect("safe point").is_none());
    }
    eprintln!(
        "safe_point with nothing due: {:?} per call",
        t.elapsed() / 1_000_000
    );
}
