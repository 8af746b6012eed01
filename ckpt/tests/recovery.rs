//! Recovery: the newest image whose whole chain verifies is applied, corrupt images and broken
//! chains are skipped with a reason, and nothing of a chain that does not verify is applied.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use ckpt::{ImageWriter, Store, StorePolicy};
use common::*;

fn policy(full_every: u32) -> StorePolicy {
    StorePolicy {
        keep: 100,
        full_every,
    }
}

/// Commits `n` images, each changing a few pages; returns the model state after each commit
/// (index 0 = before any).
fn commit_states(store: &Store, model: &mut Model, n: u64) -> Vec<Vec<Vec<u8>>> {
    let mut states = vec![model.regions.clone()];
    for k in 1..=n {
        let b = u8::try_from(k).unwrap();
        model.write(0, usize::try_from(k).unwrap() * 1000, &[b; 300]);
        model.write(1, 3, &[b; 10]);
        model.checkpoint(store);
        states.push(model.regions.clone());
    }
    states
}

fn model() -> Model {
    Model::new(&[6 * PAGE + 123, 99])
}

/// Recovers through a fresh store (no cache), recording which image each applied chunk came from.
fn recover_recording(
    dir: &std::path::Path,
    m: &Model,
) -> (Vec<Vec<u8>>, Option<ckpt::Recovery>, Vec<u64>) {
    let store = Store::open(dir, APP, policy(8)).unwrap();
    let mut bufs = m.zeroed();
    let mut applied = Vec::new();
    let r = store
        .recover(&mut |h, region, off, data| {
            applied.push(h.seq);
            let off = usize::try_from(off).unwrap();
            bufs[usize::try_from(region).unwrap()][off..off + data.len()].copy_from_slice(data);
        })
        .unwrap();
    (bufs, r, applied)
}

#[test]
fn empty_store_recovers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let (bufs, r, applied) = recover_recording(dir.path(), &m);
    assert!(r.is_none());
    assert!(applied.is_empty());
    assert_eq!(bufs, m.zeroed());
}

#[test]
fn truncated_newest_falls_back_to_previous() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(0)).unwrap();
    let mut m = model();
    let states = commit_states(&store, &mut m, 3);
    let p3 = image_path(dir.path(), 3);
    truncate(&p3, file_len(&p3) / 2);
    let (bufs, r, applied) = recover_recording(dir.path(), &m);
    let r = r.unwrap();
    assert_eq!((r.seq, r.chain.clone()), (2, vec![2]));
    assert_eq!(bufs, states[2]);
    assert!(applied.iter().all(|&s| s == 2));
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].0, 3);
    assert!(r.skipped[0].1.contains("truncated"), "{}", r.skipped[0].1);
    assert!(
        r.skipped[0].1.contains("00000000000000000003.ckpt"),
        "{}",
        r.skipped[0].1
    );
}

#[test]
fn bit_flipped_newest_falls_back_to_previous() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(8)).unwrap();
    let mut m = model();
    let states = commit_states(&store, &mut m, 4);
    let p4 = image_path(dir.path(), 4);
    flip_byte(&p4, file_len(&p4) - 50);
    let (bufs, r, _) = recover_recording(dir.path(), &m);
    let r = r.unwrap();
    assert_eq!((r.seq, r.chain.clone()), (3, vec![1, 2, 3]));
    assert_eq!(r.header.seq, 3);
    assert_eq!(bufs, states[3]);
    assert_eq!(r.skipped.len(), 1);
    assert!(
        r.skipped[0].1.contains("checksum mismatch"),
        "{}",
        r.skipped[0].1
    );
}

#[test]
fn foreign_app_newest_falls_back_to_previous() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(8)).unwrap();
    let mut m = model();
    let states = commit_states(&store, &mut m, 2);
    // Another application's (valid) image lands in this directory as seq 3.
    let mut h = m.header(3, None);
    h.app = "intruder".into();
    let f = std::fs::File::create(image_path(dir.path(), 3)).unwrap();
    let mut w = ImageWriter::new(f, &h).unwrap();
    w.chunk(0, 0, &[0xEE; 64]).unwrap();
    w.finish().unwrap();
    let (bufs, r, applied) = recover_recording(dir.path(), &m);
    let r = r.unwrap();
    assert_eq!(r.seq, 2);
    assert_eq!(bufs, states[2]);
    assert!(applied.iter().all(|&s| s <= 2));
    assert_eq!(r.skipped[0].0, 3);
    assert!(
        r.skipped[0].1.contains("\"intruder\""),
        "{}",
        r.skipped[0].1
    );
}

#[test]
fn corrupt_base_breaks_its_whole_chain_and_nothing_of_it_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(2)).unwrap();
    let mut m = model();
    // Full every 2: 1F 2 3 4F 5 6.
    let states = commit_states(&store, &mut m, 6);
    let parents: Vec<_> = store.list().unwrap().iter().map(|i| i.parent).collect();
    assert_eq!(
        parents,
        vec![None, Some(1), Some(2), None, Some(4), Some(5)]
    );
    // Corrupt the LAST chunk of base 4: a reader that applied while verifying would already
    // have applied its first chunks.
    let p4 = image_path(dir.path(), 4);
    flip_byte(&p4, file_len(&p4) - 40);
    let (bufs, r, applied) = recover_recording(dir.path(), &m);
    let r = r.unwrap();
    assert_eq!((r.seq, r.chain.clone()), (3, vec![1, 2, 3]));
    assert_eq!(bufs, states[3]);
    assert!(!applied.is_empty());
    assert!(applied.iter().all(|&s| s <= 3), "applied from {applied:?}");
    assert!(
        applied.windows(2).all(|w| w[0] <= w[1]),
        "base first: {applied:?}"
    );
    let skipped: Vec<u64> = r.skipped.iter().map(|s| s.0).collect();
    assert_eq!(skipped, vec![6, 5, 4]);
    for (seq, why) in &r.skipped[..2] {
        assert!(
            why.contains("chain broken") && why.contains("image 4"),
            "{seq}: {why}"
        );
    }
    assert!(
        r.skipped[2].1.contains("checksum mismatch"),
        "{}",
        r.skipped[2].1
    );
}

#[test]
fn missing_parent_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(8)).unwrap();
    let mut m = model();
    let states = commit_states(&store, &mut m, 4);
    std::fs::remove_file(image_path(dir.path(), 3)).unwrap();
    let (bufs, r, applied) = recover_recording(dir.path(), &m);
    let r = r.unwrap();
    assert_eq!(r.seq, 2);
    assert_eq!(bufs, states[2]);
    assert!(applied.iter().all(|&s| s <= 2));
    assert_eq!(r.skipped[0].0, 4);
    assert!(
        r.skipped[0]
            .1
            .contains("no checkpoint image with sequence 3"),
        "{}",
        r.skipped[0].1
    );
}

#[test]
fn nothing_good_recovers_nothing_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(8)).unwrap();
    let mut m = model();
    commit_states(&store, &mut m, 3);
    // The full base is bad: every image depends on it.
    let p1 = image_path(dir.path(), 1);
    flip_byte(&p1, file_len(&p1) - 40);
    let (bufs, r, applied) = recover_recording(dir.path(), &m);
    assert!(r.is_none());
    assert!(applied.is_empty());
    assert_eq!(bufs, m.zeroed());
}

/// Random page writes over many checkpoints (some full, most incremental); recovering into
/// zeroed memory gives exactly the model, at every point checked.
#[test]
fn random_incremental_chains_recover_exactly() {
    for seed in 1..=4u64 {
        let dir = tempfile::tempdir().unwrap();
        let policy = StorePolicy {
            keep: 3,
            full_every: 5,
        };
        let store = Store::open(dir.path(), APP, policy.clone()).unwrap();
        let lens = [16 * PAGE, 10_007, 3 * PAGE, 1];
        let mut m = Model::new(&lens);
        let mut rng = Rng::new(seed);
        let mut fulls = 0;
        for k in 1..=60u64 {
            for _ in 0..rng.below(12) {
                let region = rng.below(lens.len());
                let off = rng.below(lens[region]);
                let len = 1 + rng.below((lens[region] - off).min(3 * PAGE));
                let byte = u8::try_from(rng.next() & 0xFF).unwrap();
                m.write(region, off, &vec![byte; len]);
            }
            let info = m.checkpoint(&store);
            assert_eq!(info.seq, k);
            fulls += usize::from(info.parent.is_none());
            if k % 7 == 0 || k == 60 {
                let fresh = Store::open(dir.path(), APP, policy.clone()).unwrap();
                let (bufs, r) = recover(&fresh, &m);
                let r = r.unwrap();
                assert_eq!(r.seq, k, "seed {seed}");
                assert!(r.skipped.is_empty());
                assert_eq!(*r.chain.last().unwrap(), k);
                assert!(
                    bufs == m.regions,
                    "seed {seed}: recovered state differs at {k}"
                );
            }
        }
        assert_eq!(fulls, 10, "a full image every 6th");
    }
}
