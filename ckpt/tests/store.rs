//! The store: planning of full and incremental images, list/verify/delete, retention, stale
//! temp files, and the refusals of `begin`.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;

use ckpt::{Plan, Store, StoreError, StorePolicy};
use common::*;

fn policy(keep: usize, full_every: u32) -> StorePolicy {
    StorePolicy { keep, full_every }
}

fn small_model() -> Model {
    Model::new(&[3 * PAGE + 100, 700])
}

fn touch(model: &mut Model, n: u64) {
    let b = u8::try_from(n % 251).unwrap();
    model.write(0, usize::try_from(n).unwrap() % (3 * PAGE), &[b, b, b]);
    model.write(1, 5, &[b]);
}

#[test]
fn plan_gives_a_full_image_every_full_every() {
    for full_every in [0u32, 1, 3, 8] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), APP, policy(100, full_every)).unwrap();
        let mut model = small_model();
        let mut increments = 0;
        for seq in 1..=20u64 {
            let plan = store.plan().unwrap();
            // Past full_every increments the next image is an increment that is compacted
            // into a full one (with full_every 0, every image is captured full).
            let due = seq > 1 && increments == full_every;
            let expect = if seq == 1 || full_every == 0 {
                Plan {
                    seq,
                    parent: None,
                    compact: false,
                }
            } else {
                Plan {
                    seq,
                    parent: Some(seq - 1),
                    compact: due,
                }
            };
            assert_eq!(plan, expect, "full_every {full_every}");
            touch(&mut model, seq);
            let info = model.checkpoint_with(&store, &plan).unwrap();
            let full = expect.parent.is_none() || due;
            assert_eq!(
                (info.seq, info.parent),
                (seq, if full { None } else { Some(seq - 1) }),
                "full_every {full_every}"
            );
            increments = if full { 0 } else { increments + 1 };
        }
        let (bufs, r) = recover(&store, &model);
        assert_eq!(r.unwrap().seq, 20);
        assert_eq!(bufs, model.regions);
    }
}

#[test]
fn chains_stay_bounded_when_nobody_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(100, 3);
    assert_eq!(p.chain_limit(), 3 + ckpt::store::COMPACTION_SLACK_MIN);
    assert_eq!(policy(3, 8).chain_limit(), 16);
    assert_eq!(
        policy(3, 0).chain_limit(),
        ckpt::store::COMPACTION_SLACK_MIN
    );
    let store = Store::open(dir.path(), APP, p.clone()).unwrap();
    let mut model = small_model();
    let limit = u64::from(p.chain_limit());
    for seq in 1..=limit + 2 {
        let plan = store.plan().unwrap();
        let increments = seq - 1; // what an increment against the newest image would carry
        if seq == 1 || increments > limit {
            assert_eq!(plan.parent, None, "seq {seq}");
        } else {
            assert_eq!(plan.parent, Some(seq - 1), "seq {seq}");
            assert_eq!(plan.compact, increments > 3, "seq {seq}");
        }
        // Write what the plan allows, never compacting.
        let header = model.header(plan.seq, plan.parent);
        let mut pending = store.begin(&header).unwrap();
        for (ri, region) in model.regions.iter().enumerate() {
            pending
                .chunk(u32::try_from(ri).unwrap(), 0, region)
                .unwrap();
        }
        let info = pending.commit().unwrap();
        if seq == limit + 1 {
            // The newest chain holds `limit` increments: no further increment is accepted.
            assert_eq!(info.parent, Some(seq - 1));
            let e = store
                .begin(&model.header(seq + 1, Some(seq)))
                .map(|_| ())
                .unwrap_err();
            assert!(matches!(e, StoreError::ParentUnusable { .. }), "{e}");
            assert!(e.to_string().contains("write a full image"), "{e}");
        }
        touch(&mut model, seq);
    }
}

#[test]
fn plan_default_policy_is_keep_3_full_every_8() {
    assert_eq!(StorePolicy::default(), policy(3, 8));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("a/b/c"), APP, StorePolicy::default()).unwrap();
    assert_eq!(
        store.plan().unwrap(),
        Plan {
            seq: 1,
            parent: None,
            compact: false
        }
    );
    assert!(store.dir().is_dir());
}

#[test]
fn plan_skips_a_corrupt_newest_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    let mut model = small_model();
    for n in 1..=3 {
        touch(&mut model, n);
        model.checkpoint(&store);
    }
    let p3 = image_path(dir.path(), 3);
    flip_byte(&p3, file_len(&p3) - 40);
    let store = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    // The sequence stays above the corrupt image; the increment is against the newest good one.
    assert_eq!(
        store.plan().unwrap(),
        Plan {
            seq: 4,
            parent: Some(2),
            compact: false
        }
    );
}

#[test]
fn list_verify_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    let mut model = small_model();
    let mut infos = Vec::new();
    for n in 1..=3 {
        touch(&mut model, n);
        infos.push(model.checkpoint(&store));
    }
    assert_eq!(store.list().unwrap(), infos);
    assert_eq!(infos[0].parent, None);
    assert_eq!(infos[1].parent, Some(1));
    for i in &infos {
        assert_eq!(i.file_bytes, file_len(&i.path));
        assert_eq!(store.verify(i.seq).unwrap(), *i);
    }
    // A fresh store (no cache) reads the same from disk.
    let reopened = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    assert_eq!(reopened.list().unwrap(), infos);
    assert_eq!(reopened.verify(2).unwrap(), infos[1]);

    store.delete(3).unwrap();
    assert_eq!(seqs(&store), vec![1, 2]);
    assert!(matches!(
        store.delete(3),
        Err(StoreError::NotFound { seq: 3, .. })
    ));
    assert!(matches!(
        store.verify(3),
        Err(StoreError::NotFound { seq: 3, .. })
    ));

    // Data corruption: list (header only) still shows it, verify refuses it and names the file.
    flip_byte(&infos[1].path, infos[1].file_bytes - 40);
    assert_eq!(seqs(&store), vec![1, 2]);
    let e = store.verify(2).unwrap_err();
    assert!(matches!(e, StoreError::Image { .. }), "{e}");
    assert!(e.to_string().contains("00000000000000000002.ckpt"), "{e}");

    // Header corruption: list leaves it out, list_entries says why.
    flip_byte(&infos[0].path, 20);
    assert_eq!(seqs(&store), vec![2]);
    let entries = store.list_entries().unwrap();
    assert_eq!(entries.len(), 2);
    let e = entries[0].1.as_ref().unwrap_err();
    assert!(e.to_string().contains("header checksum"), "{e}");
}

/// What retention must leave: existing images, the newest `keep` of them (all good here) and
/// their chains. `parents` maps seq -> parent for every image ever committed.
fn expected_after(existing: &BTreeSet<u64>, parents: &[Option<u64>], keep: usize) -> BTreeSet<u64> {
    let mut needed = BTreeSet::new();
    for &s in existing.iter().rev().take(keep.max(1)) {
        let mut cur = Some(s);
        while let Some(c) = cur {
            needed.insert(c);
            cur = parents[usize::try_from(c).unwrap()];
        }
    }
    needed
}

#[test]
fn retention_keeps_newest_good_and_their_chains_only() {
    // keep 2, full every 3: the hand-computed table first.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(2, 3)).unwrap();
    let mut model = small_model();
    let expect: [&[u64]; 10] = [
        &[1],
        &[1, 2],
        &[1, 2, 3],
        &[1, 2, 3, 4],
        &[1, 2, 3, 4, 5],
        &[5, 6],
        &[5, 6, 7],
        &[5, 6, 7, 8],
        &[5, 6, 7, 8, 9],
        &[9, 10],
    ];
    for (n, want) in (1..).zip(expect) {
        touch(&mut model, n);
        model.checkpoint(&store);
        assert_eq!(seqs(&store), want, "after commit {n}");
    }

    // Then a model over several policies.
    for (keep, full_every) in [
        (0usize, 0u32),
        (1, 0),
        (1, 4),
        (3, 0),
        (3, 2),
        (3, 8),
        (5, 3),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), APP, policy(keep, full_every)).unwrap();
        let mut model = small_model();
        let mut parents = vec![None];
        let mut existing = BTreeSet::new();
        for n in 1..=30 {
            touch(&mut model, n);
            let info = model.checkpoint(&store);
            parents.push(info.parent);
            existing.insert(info.seq);
            existing = expected_after(&existing, &parents, keep);
            let got: BTreeSet<u64> = seqs(&store).into_iter().collect();
            assert_eq!(
                got, existing,
                "keep {keep} full_every {full_every} after {n}"
            );
        }
        let (bufs, r) = recover(&store, &model);
        assert_eq!(r.unwrap().seq, 30);
        assert_eq!(bufs, model.regions);
    }
}

#[test]
fn retention_does_not_count_corrupt_images() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(2, 0)).unwrap();
    let mut model = small_model();
    for n in 1..=2 {
        touch(&mut model, n);
        model.checkpoint(&store);
    }
    let p2 = image_path(dir.path(), 2);
    flip_byte(&p2, file_len(&p2) - 40);
    let store = Store::open(dir.path(), APP, policy(2, 0)).unwrap();
    // 2 is refused and newer than every good image: kept as evidence, nothing deleted.
    assert_eq!(store.retain().unwrap(), Vec::<u64>::new());
    touch(&mut model, 3);
    model.checkpoint(&store);
    // Now 3 and 1 are the two newest good checkpoints; the corrupt 2 goes.
    assert_eq!(seqs(&store), vec![1, 3]);
}

#[test]
fn retention_deletes_nothing_when_nothing_is_good() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(1, 0)).unwrap();
    let mut model = small_model();
    for n in 1..=2 {
        touch(&mut model, n);
        model.checkpoint(&store);
    }
    assert_eq!(seqs(&store), vec![2]);
    let p = image_path(dir.path(), 2);
    flip_byte(&p, file_len(&p) - 40);
    let store = Store::open(dir.path(), APP, policy(1, 0)).unwrap();
    assert_eq!(store.retain().unwrap(), Vec::<u64>::new());
    assert!(p.exists());
}

#[test]
fn stale_temp_files_are_cleaned_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let alive = Reap(
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap(),
    );
    let alive_pid = alive.0.id();
    let own = std::process::id();
    for name in [
        format!(".tmp-5-{dead_pid}"),
        format!(".tmp-6-{alive_pid}"),
        format!(".tmp-7-{own}"),
        ".tmp-garbage".to_owned(),
        ".tmp-8--3".to_owned(),
        ".tmp-9-0".to_owned(),
        "unrelated.txt".to_owned(),
    ] {
        std::fs::write(dir.path().join(name), b"partial").unwrap();
    }
    let _store = Store::open(dir.path(), APP, StorePolicy::default()).unwrap();
    assert_eq!(
        dir_names(dir.path()),
        vec![
            format!(".tmp-6-{alive_pid}"),
            format!(".tmp-7-{own}"),
            "unrelated.txt".to_owned()
        ]
    );
}

#[test]
fn abort_and_drop_remove_the_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, StorePolicy::default()).unwrap();
    let model = small_model();
    let mut p = store.begin(&model.header(1, None)).unwrap();
    p.chunk(0, 0, &[1, 2, 3]).unwrap();
    assert!(p.temp_path().exists());
    assert_eq!(dir_names(dir.path()).len(), 1);
    p.abort();
    assert!(dir_names(dir.path()).is_empty());
    {
        let mut p = store.begin(&model.header(1, None)).unwrap();
        p.writer().chunk(1, 0, &[1]).unwrap();
        assert_eq!(dir_names(dir.path()).len(), 1);
    }
    assert!(dir_names(dir.path()).is_empty());
    assert_eq!(
        store.plan().unwrap(),
        Plan {
            seq: 1,
            parent: None,
            compact: false
        }
    );
}

#[test]
fn begin_refuses_what_would_break_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    let mut model = small_model();
    for n in 1..=2 {
        touch(&mut model, n);
        model.checkpoint(&store);
    }
    let mut h = model.header(3, Some(2));
    h.app = "someone-else".into();
    assert!(matches!(store.begin(&h), Err(StoreError::WrongApp { .. })));
    let e = store.begin(&model.header(2, Some(1))).unwrap_err();
    assert!(
        matches!(e, StoreError::SeqNotNewer { seq: 2, newest: 2 }),
        "{e}"
    );
    let e = store.begin(&model.header(3, Some(1))).map(|_| ());
    assert!(
        e.is_ok(),
        "an increment against an older good image is allowed"
    );
    let p1 = image_path(dir.path(), 1);
    flip_byte(&p1, file_len(&p1) - 40);
    let store = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    let e = store.begin(&model.header(3, Some(2))).unwrap_err();
    assert!(
        matches!(e, StoreError::ParentUnusable { parent: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("chain broken"), "{e}");
    let e = store.begin(&model.header(3, Some(7))).unwrap_err();
    assert!(
        matches!(e, StoreError::ParentUnusable { parent: 7, .. }),
        "{e}"
    );
    // Nothing was left behind by the refusals.
    assert_eq!(dir_names(dir.path()).len(), 2);
}

#[test]
fn commit_never_replaces_an_existing_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    let model = small_model();
    let p = store.begin(&model.header(1, None)).unwrap();
    // Another writer commits seq 1 first.
    let q = store.begin(&model.header(1, None));
    assert!(
        q.is_err(),
        "the same pid cannot hold two temp files of one seq"
    );
    let other = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    std::fs::write(image_path(dir.path(), 1), b"someone else's image").unwrap();
    let e = p.commit().unwrap_err();
    assert_eq!(e.io_kind(), Some(std::io::ErrorKind::AlreadyExists), "{e}");
    assert_eq!(
        std::fs::read(image_path(dir.path(), 1)).unwrap(),
        b"someone else's image"
    );
    assert_eq!(dir_names(other.dir()).len(), 1);
}

#[test]
fn commit_finished_checks_the_file_against_its_writers_report() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy(10, 8)).unwrap();
    let mut model = small_model();
    touch(&mut model, 1);
    // As a snapshot child does with its copy of the writer: chunks, then the footer in place.
    let finish = |seq: u64, model: &Model| {
        let mut p = store.begin(&model.header(seq, None)).unwrap();
        let w = p.writer();
        w.chunks(
            model
                .regions
                .iter()
                .enumerate()
                .map(|(i, r)| (u32::try_from(i).unwrap(), 0, r.as_slice())),
        )
        .unwrap();
        let summary = w.finish_in_place().unwrap();
        (p, summary)
    };
    let (p, summary) = finish(1, &model);
    let mut wrong = summary.clone();
    wrong.chunks += 1;
    let e = p.commit_finished(&wrong).unwrap_err();
    assert!(matches!(e, StoreError::Unfinished { .. }), "{e}");
    assert!(dir_names(dir.path()).is_empty(), "the temp file is removed");

    let (p, summary) = finish(1, &model);
    let mut short = summary.clone();
    short.file_bytes -= 1;
    let e = p.commit_finished(&short).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");

    let (p, summary) = finish(1, &model);
    let info = p.commit_finished(&summary).unwrap();
    assert_eq!(info.file_bytes, summary.file_bytes);
    assert_eq!(store.verify(1).unwrap(), info);
    let (bufs, r) = recover(&store, &model);
    assert_eq!(r.unwrap().seq, 1);
    assert_eq!(bufs, model.regions);
}
