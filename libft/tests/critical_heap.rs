//! The critical heap in this process: the fixed address is honoured, an occupied range is
//! refused without touching its occupant, the allocator survives a random alloc/free storm
//! with every invariant intact, refuses bad frees, runs out cleanly, and its typed values work.

mod critical_support;

use std::collections::BTreeMap;
use std::ptr::NonNull;

use critical_support::{Rng, heap_addr, low_byte, page_size};
use ft::critical::{
    Critical, CriticalBox, CriticalHeap, Error, HeapConfig, MAX_ALIGN, MIN_HEAP_SIZE,
};

/// A heap at test slot `slot` (unique per test in this binary).
fn heap(slot: usize, size: usize) -> CriticalHeap {
    CriticalHeap::map(HeapConfig {
        addr: heap_addr(slot),
        size,
    })
    .expect("map the test heap")
}

#[test]
fn heap_is_mapped_at_the_fixed_address() {
    let h = heap(1, 8 << 20);
    assert_eq!(h.base(), heap_addr(1));
    assert_eq!(h.size(), 8 << 20);
    let p = h.alloc(100, 16).expect("alloc");
    assert!(h.contains(p.as_ptr()));
    assert_eq!(p.as_ptr() as usize % 16, 0);
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let line = format!("{:x}-{:x} rw-p", heap_addr(1), heap_addr(1) + (8 << 20));
    assert!(maps.contains(&line), "no mapping {line} in\n{maps}");
}

#[test]
fn an_occupied_range_is_refused_and_its_occupant_left_alone() {
    let addr = heap_addr(2) + (1 << 20);
    // SAFETY: a fresh one-page mapping at a test-only address nobody else uses.
    let occupant = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            page_size(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(occupant as usize, addr, "test setup mmap");
    // SAFETY: the page just mapped.
    unsafe { occupant.cast::<u64>().write(0xDEAD_BEEF) };

    let err = CriticalHeap::map(HeapConfig {
        addr: heap_addr(2),
        size: 4 << 20,
    })
    .expect_err("the range holds a mapping");
    match &err {
        Error::AddressInUse {
            addr: a, occupant, ..
        } => {
            assert_eq!(*a, heap_addr(2));
            assert!(occupant.contains(&format!("{addr:x}")), "{err}");
        }
        other => panic!("expected AddressInUse, got {other}"),
    }
    assert!(err.to_string().contains("FT_HEAP_ADDR"), "{err}");
    // SAFETY: still our page, untouched by the failed heap.
    assert_eq!(unsafe { occupant.cast::<u64>().read() }, 0xDEAD_BEEF);
    // SAFETY: unmapping our own test page.
    unsafe { libc::munmap(occupant, page_size()) };

    // A second heap on top of a live one is refused the same way.
    let first = heap(3, 1 << 20);
    let again = CriticalHeap::map(HeapConfig {
        addr: first.base(),
        size: 1 << 20,
    });
    assert!(
        matches!(again, Err(Error::AddressInUse { .. })),
        "{again:?}"
    );
    assert!(first.alloc(8, 8).is_ok(), "the first heap still works");
}

#[test]
fn bad_configurations_are_refused() {
    for (addr, size) in [
        (0, 1 << 20),
        (heap_addr(4) + 1, 1 << 20),
        (heap_addr(4), 100),
    ] {
        let r = CriticalHeap::map(HeapConfig { addr, size });
        assert!(
            matches!(r, Err(Error::Config(_))),
            "{addr:#x}+{size}: {r:?}"
        );
    }
}

/// Fills a block with a pattern derived from its address and id.
fn fill(p: NonNull<u8>, len: usize, id: u64) {
    for i in 0..len {
        // SAFETY: the block holds at least `len` bytes.
        unsafe {
            p.as_ptr()
                .add(i)
                .write(low_byte(id).wrapping_add(low_byte(i as u64)))
        };
    }
}

fn check(p: NonNull<u8>, len: usize, id: u64) {
    for i in 0..len {
        // SAFETY: the block holds at least `len` bytes.
        let b = unsafe { p.as_ptr().add(i).read() };
        assert_eq!(
            b,
            low_byte(id).wrapping_add(low_byte(i as u64)),
            "block {id} byte {i} overwritten"
        );
    }
}

#[test]
fn alloc_free_storm_keeps_every_block_intact_and_the_heap_consistent() {
    let h = heap(5, 64 << 20);
    let mut rng = Rng::new(0x5eed);
    // address -> (len, id, align)
    let mut live: BTreeMap<usize, (usize, u64, usize)> = BTreeMap::new();
    let mut next_id = 0u64;
    for round in 0..20_000 {
        if live.is_empty() || rng.below(100) < 55 {
            let len = match rng.below(10) {
                0 => rng.below(64 << 10),
                1..=3 => rng.below(4096),
                _ => rng.below(256),
            };
            let align = [1, 8, 16, 64, 256, 4096][rng.below(6)];
            let p = h.alloc(len, align).expect("the heap is big enough");
            assert_eq!(p.as_ptr() as usize % align, 0, "alignment {align}");
            assert!(h.usable_size(p).expect("live") >= len);
            let addr = p.as_ptr() as usize;
            // No overlap with the neighbours.
            if let Some((&a, &(l, _, _))) = live.range(..addr).next_back() {
                assert!(
                    a + l.max(1) <= addr,
                    "{addr:#x} overlaps block at {a:#x}+{l}"
                );
            }
            if let Some((&a, _)) = live.range(addr..).next() {
                assert!(
                    addr + len.max(1) <= a,
                    "{addr:#x}+{len} overlaps block at {a:#x}"
                );
            }
            fill(p, len, next_id);
            live.insert(addr, (len, next_id, align));
            next_id += 1;
        } else {
            let k = rng.below(live.len());
            let (&addr, &(len, id, _)) = live.iter().nth(k).expect("k < len");
            let p = NonNull::new(addr as *mut u8).expect("non-null");
            check(p, len, id);
            // SAFETY: a live block of this heap, forgotten right after.
            unsafe { h.free(p) }.expect("free a live block");
            live.remove(&addr);
        }
        if round % 2000 == 0 {
            h.check().expect("allocator invariants");
        }
    }
    for (&addr, &(len, id, _)) in &live {
        check(NonNull::new(addr as *mut u8).expect("non-null"), len, id);
    }
    h.check().expect("allocator invariants");
    let stats = h.stats().expect("stats");
    assert_eq!(stats.allocations, live.len());
    for &addr in live.keys() {
        // SAFETY: every remaining block is live and not used again.
        unsafe { h.free(NonNull::new(addr as *mut u8).expect("non-null")) }.expect("free");
    }
    h.check()
        .expect("allocator invariants after freeing everything");
    let empty = h.stats().expect("stats");
    assert_eq!((empty.allocations, empty.allocated), (0, 0));
    // Freed space is reused: the same workload again does not grow the used span.
    let span = empty.used_span;
    let blocks: Vec<_> = (0..100)
        .map(|_| h.alloc(1000, 16).expect("alloc"))
        .collect();
    assert_eq!(
        h.stats().expect("stats").used_span,
        span,
        "freed space reused"
    );
    for b in blocks {
        // SAFETY: live blocks, not used again.
        unsafe { h.free(b) }.expect("free");
    }
}

#[test]
fn bad_frees_are_refused_without_damage() {
    let h = heap(6, 1 << 20);
    let a = h.alloc(64, 16).expect("alloc");
    let b = h.alloc(64, 16).expect("alloc");
    fill(b, 64, 7);
    // SAFETY: a live block.
    unsafe { h.free(a) }.expect("first free");
    // SAFETY: deliberately wrong calls; `free` must refuse them.
    unsafe {
        assert!(
            matches!(h.free(a), Err(Error::InvalidPointer(_))),
            "double free"
        );
        let inside = NonNull::new(b.as_ptr().add(8)).expect("non-null");
        assert!(
            matches!(h.free(inside), Err(Error::InvalidPointer(_))),
            "misaligned"
        );
        let outside = NonNull::new(0x1000 as *mut u8).expect("non-null");
        assert!(
            matches!(h.free(outside), Err(Error::InvalidPointer(_))),
            "outside"
        );
        let past_top = NonNull::new((h.base() + h.size() - 64) as *mut u8).expect("non-null");
        assert!(h.free(past_top).is_err(), "beyond the used span");
    }
    check(b, 64, 7);
    h.check().expect("allocator invariants");
    assert!(matches!(
        h.alloc(1, MAX_ALIGN * 2),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(h.alloc(1, 3), Err(Error::InvalidArgument(_))));
}

#[test]
fn exhaustion_is_an_error_and_the_heap_recovers_from_it() {
    let h = heap(7, MIN_HEAP_SIZE);
    let mut blocks = Vec::new();
    let err = loop {
        match h.alloc(1000, 16) {
            Ok(p) => blocks.push(p),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            err,
            Error::OutOfMemory {
                requested: 1000,
                ..
            }
        ),
        "{err}"
    );
    assert!(blocks.len() > 40, "only {} blocks fit", blocks.len());
    assert!(matches!(
        h.alloc(usize::MAX, 16),
        Err(Error::OutOfMemory { .. })
    ));
    h.check().expect("allocator invariants when full");
    for b in blocks.drain(..) {
        // SAFETY: live blocks, not used again.
        unsafe { h.free(b) }.expect("free");
    }
    assert!(
        h.alloc(20_000, 16).is_ok(),
        "coalesced free space serves a large block"
    );
}

#[test]
fn roots_and_typed_values_live_in_the_heap() {
    let h = heap(8, 4 << 20);
    #[derive(Clone, Copy, Debug, PartialEq)]
    #[repr(C)]
    struct Point {
        x: i64,
        y: i64,
        next: *mut Point,
    }
    let mut first = CriticalBox::new_in(
        &h,
        Point {
            x: 1,
            y: 2,
            next: std::ptr::null_mut(),
        },
    )
    .expect("box");
    assert!(h.contains(first.as_ptr().cast()));
    first.x = 10;
    let second = CriticalBox::new_in(
        &h,
        Point {
            x: 3,
            y: 4,
            next: first.as_ptr(),
        },
    )
    .expect("box");
    assert_eq!(second.next, first.as_ptr());
    let raw = second.into_raw();
    h.set_root("points", Some(raw.cast())).expect("root");
    assert_eq!(h.root("points").expect("root"), Some(raw.cast()));
    assert_eq!(h.root("missing").expect("root"), None);
    assert!(h.set_root("", None).is_err());
    assert!(h.set_root(&"x".repeat(48), None).is_err());
    // SAFETY: `raw` came from into_raw of a Box<Point> in this heap.
    let back = unsafe { CriticalBox::from_raw(&h, raw) };
    // SAFETY: `next` points at `first`, alive.
    assert_eq!(unsafe { (*back.next).x }, 10);

    let names: Critical<'_, Vec<String>> = Critical::new(&h, "names").expect("value");
    assert_eq!(names.load().expect("load"), None);
    names.store(&vec!["a".into(), "b".into()]).expect("store");
    assert_eq!(
        names.load().expect("load"),
        Some(vec!["a".to_owned(), "b".to_owned()])
    );
    // Growing past the slot moves it; the name still finds it.
    let long: Vec<String> = (0..1000).map(|i| format!("name-{i}")).collect();
    names.store(&long).expect("store grown");
    assert_eq!(names.load().expect("load"), Some(long));
    // A value of another type under the same name is an error, not garbage.
    let wrong: Critical<'_, u64> = Critical::new(&h, "names").expect("value");
    assert!(matches!(wrong.load(), Err(Error::Value { .. })));
    names.clear().expect("clear");
    assert_eq!(names.load().expect("load"), None);
    h.check().expect("allocator invariants");
}
