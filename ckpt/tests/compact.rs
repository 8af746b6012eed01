//! Compaction: an increment replaced by the full image of the same state. Recovery before and
//! after is byte for byte the same (several regions, odd lengths, chunks straddling the base's
//! chunk boundaries, memory that only increments hold); a corrupt chain is refused and left
//! alone; a gate that says stop leaves nothing; newer images stay valid on top of a compacted
//! one, and retention then drops the old chain.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use ckpt::{ImageHeader, MAX_CHUNK, Store, StoreError, StorePolicy};
use common::*;

/// Never compacts by itself (full_every large), keeps everything.
fn manual() -> StorePolicy {
    StorePolicy {
        keep: 100,
        full_every: 1000,
    }
}

/// Recovers `store` into zeroed regions of `lens`; returns the bytes and the chain applied.
fn recovered(store: &Store, lens: &[usize]) -> (Vec<Vec<u8>>, Vec<u64>) {
    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0; l]).collect();
    let r = store
        .recover(&mut |_h, region, off, data| {
            let off = usize::try_from(off).unwrap();
            bufs[usize::try_from(region).unwrap()][off..off + data.len()].copy_from_slice(data);
        })
        .unwrap()
        .unwrap();
    (bufs, r.chain)
}

fn header(model: &Model, seq: u64, parent: Option<u64>) -> ImageHeader {
    model.header(seq, parent)
}

/// Commits an image of `model`'s regions holding only `ranges` (region, start, end).
fn commit_ranges(
    store: &Store,
    model: &Model,
    seq: u64,
    parent: Option<u64>,
    ranges: &[(usize, usize, usize)],
) {
    let mut p = store.begin(&header(model, seq, parent)).unwrap();
    for &(r, s, e) in ranges {
        p.chunk(u32::try_from(r).unwrap(), s as u64, &model.regions[r][s..e])
            .unwrap();
    }
    p.commit().unwrap();
}

#[test]
fn compacted_image_recovers_exactly_what_its_chain_did() {
    let mut rng = Rng::new(7);
    // Region 0 spans several MAX_CHUNK pieces, so increments straddle base chunk boundaries.
    let lens = [2 * MAX_CHUNK + 5 * PAGE + 77, 3 * PAGE + 1, 1];
    for round in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), APP, manual()).unwrap();
        let mut model = Model::new(&lens);
        for r in 0..lens.len() {
            for b in model.regions[r].iter_mut() {
                *b = u8::try_from(rng.below(256)).unwrap();
            }
        }
        // The base holds region 0 only up to a point (memory grows later), region 1 whole, and
        // region 2 not at all.
        let base_end = MAX_CHUNK + 3 * PAGE;
        commit_ranges(
            &store,
            &model,
            1,
            None,
            &[(0, 0, base_end), (1, 0, lens[1])],
        );
        let mut seq = 1;
        for _ in 0..5 + round {
            seq += 1;
            let mut ranges = Vec::new();
            for _ in 0..1 + rng.below(6) {
                let r = rng.below(lens.len());
                let start = rng.below(lens[r]);
                let end = (start + 1 + rng.below(3 * PAGE)).min(lens[r]);
                for b in &mut model.regions[r][start..end] {
                    *b = u8::try_from(rng.below(256)).unwrap();
                }
                ranges.push((r, start, end));
            }
            // One range across the first base chunk boundary, every time.
            let (s, e) = (MAX_CHUNK - 100, MAX_CHUNK + 100);
            model.regions[0][s..e].fill(u8::try_from(seq).unwrap());
            ranges.push((0, s, e));
            commit_ranges(&store, &model, seq, Some(seq - 1), &ranges);
        }
        let (before, chain) = recovered(&store, &lens);
        assert_eq!(chain.len(), usize::try_from(seq).unwrap());
        let info = store.compact(seq, &mut || true).unwrap();
        assert_eq!((info.seq, info.parent), (seq, None));
        assert_eq!(store.verify(seq).unwrap(), info);
        // A fresh store (no cache) reads the compacted image from disk.
        let fresh = Store::open(dir.path(), APP, manual()).unwrap();
        let (after, chain) = recovered(&fresh, &lens);
        assert_eq!(chain, vec![seq], "round {round}");
        assert!(after == before, "round {round}: compacted state differs");
        // Zero-initialised targets make the comparison with the model exact where images
        // never wrote: the model started from zeroes only where nothing was committed.
        assert_eq!(after[1], model.regions[1], "round {round}");
        // Compacting a full image changes nothing.
        assert_eq!(store.compact(seq, &mut || true).unwrap(), info);
    }
}

#[test]
fn newer_images_stay_valid_on_a_compacted_one_and_retention_drops_the_old_chain() {
    let dir = tempfile::tempdir().unwrap();
    let policy = StorePolicy {
        keep: 2,
        full_every: 1000,
    };
    let store = Store::open(dir.path(), APP, policy).unwrap();
    let mut model = Model::new(&[5 * PAGE + 9, 300]);
    for n in 1..=6u64 {
        let b = u8::try_from(n).unwrap();
        model.write(0, usize::try_from(n).unwrap() * 700, &[b; 900]);
        model.write(1, 2, &[b]);
        model.checkpoint(&store);
    }
    assert_eq!(seqs(&store), vec![1, 2, 3, 4, 5, 6]);
    let info = store.compact(4, &mut || true).unwrap();
    assert_eq!(info.parent, None);
    // The old chain stays until retention runs.
    assert_eq!(seqs(&store), vec![1, 2, 3, 4, 5, 6]);
    store.retain().unwrap();
    // 6 and 5 are the two kept checkpoints; their chains now start at the full 4.
    assert_eq!(seqs(&store), vec![4, 5, 6]);
    let fresh = Store::open(dir.path(), APP, StorePolicy::default()).unwrap();
    let (bufs, chain) = recovered(&fresh, &[5 * PAGE + 9, 300]);
    assert_eq!(chain, vec![4, 5, 6]);
    assert_eq!(bufs, model.regions);
}

#[test]
fn a_corrupt_chain_is_not_compacted_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, manual()).unwrap();
    let mut model = Model::new(&[4 * PAGE, 50]);
    for n in 1..=4u64 {
        model.write(0, usize::try_from(n).unwrap() * 100, &[7; 200]);
        model.checkpoint(&store);
    }
    let p2 = image_path(dir.path(), 2);
    // Keep the modification time, so this process's verification cache still vouches for the
    // image: only the composition itself can notice.
    let mtime = std::fs::metadata(&p2).unwrap().modified().unwrap();
    flip_byte(&p2, file_len(&p2) - 40);
    std::fs::File::options()
        .write(true)
        .open(&p2)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let names = dir_names(dir.path());
    // A fresh store, so the corruption is seen (this process's cache vouches for what it wrote).
    let fresh = Store::open(dir.path(), APP, manual()).unwrap();
    let e = fresh.compact(4, &mut || true).unwrap_err();
    assert!(matches!(e, StoreError::Uncompactable { seq: 4, .. }), "{e}");
    assert!(e.to_string().contains("chain broken"), "{e}");
    assert_eq!(dir_names(dir.path()), names);

    // Corruption the cache does not know about is caught while composing.
    let e = store.compact(4, &mut || true).unwrap_err();
    assert!(matches!(e, StoreError::Image { .. }), "{e}");
    assert!(e.to_string().contains("00000000000000000002.ckpt"), "{e}");
    assert_eq!(dir_names(dir.path()), names, "no temp file left");
}

#[test]
fn a_cancelled_compaction_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, manual()).unwrap();
    let mut model = Model::new(&[3 * PAGE, 10]);
    for n in 1..=3u64 {
        model.write(0, usize::try_from(n).unwrap() * 10, &[1; 10]);
        model.checkpoint(&store);
    }
    let names = dir_names(dir.path());
    let mut chunks_before_cancel = 2;
    let mut gate = || {
        chunks_before_cancel -= 1;
        chunks_before_cancel > 0
    };
    let e = store.compact(3, &mut gate).unwrap_err();
    assert!(matches!(e, StoreError::Cancelled { seq: 3 }), "{e}");
    assert_eq!(dir_names(dir.path()), names);
    assert_eq!(store.list().unwrap()[2].parent, Some(2));
    let e = store.compact(9, &mut || true).unwrap_err();
    assert!(matches!(e, StoreError::Uncompactable { seq: 9, .. }), "{e}");
}

#[test]
fn a_chain_with_another_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, manual()).unwrap();
    let small = Model::new(&[2 * PAGE, 10]);
    let big = Model::new(&[3 * PAGE, 10]);
    commit_ranges(&store, &small, 1, None, &[(0, 0, PAGE)]);
    commit_ranges(&store, &big, 2, Some(1), &[(0, 2 * PAGE, 3 * PAGE)]);
    let e = store.compact(2, &mut || true).unwrap_err();
    assert!(matches!(e, StoreError::Uncompactable { seq: 2, .. }), "{e}");
    assert!(e.to_string().contains("other regions"), "{e}");
}
