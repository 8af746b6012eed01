//! Full images by compaction: after the first image (captured whole by a copy-on-write child
//! that writes the image file itself), every checkpoint captures only its increment, and the
//! increment the store's policy wants full is compacted into a full image in the background.
//! Chains stay short, and what the store recovers is the memory at the last checkpoint.

mod critical_support;

use ckpt::{Store, StorePolicy};
use critical_support::{Rng, config, low_byte, page_size};
use ft::critical::{CaptureMethod, Checkpointer, DirtyMode};

const FULL_EVERY: u32 = 3;

fn compaction_replaces_scheduled_full_captures(dirty: DirtyMode, slot: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path(), slot, 64 << 20, dirty);
    c.policy = StorePolicy {
        keep: 2,
        full_every: FULL_EVERY,
    };
    // The first (full) image is larger than this: it goes through the snapshot child.
    c.staging_max = 256 << 10;
    let app = c.app.clone();
    let store_dir = c.stream_dir(0);
    let cp = Checkpointer::new(c).expect("checkpointer");
    let len = 2 << 20;
    let buf = cp.heap().alloc(len, page_size()).expect("alloc").as_ptr();
    let mut rng = Rng::new(11);
    for i in 0..len {
        // SAFETY: inside the block.
        unsafe { buf.add(i).write(low_byte(rng.next())) };
    }
    let first = cp.checkpoint(0).expect("first checkpoint");
    assert_eq!((first.parent, first.method), (None, CaptureMethod::Fork));
    assert!(!first.compacts);
    cp.wait(0).expect("first image").expect("committed");

    let pages = len / page_size();
    let mut compacted = 0;
    for round in 1..=12u64 {
        for _ in 0..3 {
            let at = rng.below(pages) * page_size() + rng.below(page_size());
            // SAFETY: inside the block.
            unsafe { buf.add(at).write(low_byte(round)) };
        }
        let s = cp.checkpoint(0).expect("checkpoint");
        assert_eq!(s.method, CaptureMethod::Staging, "round {round}: {s:?}");
        assert_eq!(s.parent, Some(s.seq - 1), "round {round}: an increment");
        // Image 1 is full; every FULL_EVERY + 1 images the increment is compacted.
        let due = (s.seq - 1).is_multiple_of(u64::from(FULL_EVERY) + 1);
        assert_eq!(s.compacts, due, "round {round}: {s:?}");
        let info = cp.wait(0).expect("image").expect("committed");
        assert_eq!(info.seq, s.seq);
        if due {
            compacted += 1;
            let full = cp
                .last_compaction(0)
                .expect("a compaction ran")
                .expect("and succeeded");
            assert_eq!((full.seq, full.parent), (s.seq, None), "round {round}");
        }
        let store = Store::open(&store_dir, &app, StorePolicy::default()).expect("store");
        let listed = store.list().expect("list");
        let newest = listed.last().expect("an image");
        assert_eq!(newest.seq, s.seq);
        assert_eq!(newest.parent, (!due).then(|| s.seq - 1), "round {round}");
    }
    assert_eq!(compacted, 3);

    // The store recovers exactly the memory as it is now (nothing written since the last
    // checkpoint), from a chain that starts at a compacted image.
    let store = Store::open(&store_dir, &app, StorePolicy::default()).expect("store");
    let heap_base = cp.heap().base();
    let offset = buf as usize - heap_base;
    let mut heap = vec![0u8; offset + len];
    let recovery = store
        .recover(&mut |_h, region, at, data| {
            let at = usize::try_from(at).expect("small offset");
            if region == 0 && at < heap.len() {
                let end = (at + data.len()).min(heap.len());
                heap[at..end].copy_from_slice(&data[..end - at]);
            }
        })
        .expect("recover")
        .expect("an image");
    assert_eq!(recovery.seq, 13);
    assert_eq!(recovery.chain, vec![13], "image 13 was compacted");
    // SAFETY: the block is live and nobody writes it now.
    let live = unsafe { std::slice::from_raw_parts(buf, len) };
    assert!(
        heap[offset..] == *live,
        "the recovered block differs from memory"
    );
}

#[test]
fn compaction_replaces_scheduled_full_captures_with_uffd() {
    compaction_replaces_scheduled_full_captures(DirtyMode::Uffd, 1);
}

#[test]
fn compaction_replaces_scheduled_full_captures_with_hashing() {
    compaction_replaces_scheduled_full_captures(DirtyMode::Hash, 2);
}
