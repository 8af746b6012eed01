//! A crash (SIGKILL) or an injected error at every step of the commit recipe and of compaction.
//! The child is this test binary re-executed to run only `child_commit_helper` (it commits image
//! N+1 of a deterministic history) or `child_compact_helper` (it compacts the increment N of
//! that history into a full image), with `FT_CKPT_FAILPOINT` set. The parent then opens the
//! store and recovers: the result is exactly state N or exactly state N+1 (never a mix), a
//! compaction leaves image N as the old increment or the new full image and never a broken
//! chain, and the store takes the next commit.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use ckpt::failpoint::{COMMIT_POINTS, COMPACT_POINTS, ENV_VAR};
use ckpt::{Store, StorePolicy};
use common::*;

/// Set (to the store directory) only in the re-executed child.
const CHILD_ENV: &str = "CKPT_CRASH_TEST_CHILD_DIR";
const HELPER: &str = "child_commit_helper";
/// Exit code of a child whose commit returned an error.
const CHILD_COMMIT_FAILED: i32 = 3;
/// Images committed before the child runs.
const BEFORE: u64 = 3;
const LENS: [usize; 2] = [8 * PAGE + 1000, 777];

fn policy() -> StorePolicy {
    StorePolicy {
        keep: 3,
        full_every: 2,
    }
}

/// The writes of history step `j`: a page of region 0 (the partial last page included) and a
/// few bytes of region 1.
fn step(m: &mut Model, j: u64) {
    let b = u8::try_from(j % 250).unwrap() + 1;
    let page = usize::try_from(j * 3 % 9).unwrap();
    let len = if page == 8 { 1000 } else { PAGE };
    m.write(0, page * PAGE, &vec![b; len]);
    m.write(1, usize::try_from(j).unwrap() * 7 % 700, &[b; 50]);
}

fn state(k: u64) -> Vec<Vec<u8>> {
    let mut m = Model::new(&LENS);
    for j in 1..=k {
        step(&mut m, j);
    }
    m.regions
}

/// Recovers the store into a model that can go on checkpointing from there.
fn recovered_model(store: &Store) -> (Model, Option<u64>) {
    let mut m = Model::new(&LENS);
    let (bufs, r) = recover(store, &m);
    m.regions = bufs;
    m.last_committed = r.map(|r| r.seq);
    let last = m.last_committed;
    (m, last)
}

/// Runs only in the re-executed child: commits the next step of the history.
#[test]
fn child_commit_helper() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // Not the child: the parent tests below drive this.
    };
    let store = Store::open(Path::new(&dir), APP, policy()).unwrap();
    let (mut m, last) = recovered_model(&store);
    let next = last.unwrap_or(0) + 1;
    step(&mut m, next);
    let plan = store.plan().unwrap();
    match m.checkpoint_with(&store, &plan) {
        Ok(info) => println!("CHILD committed {}", info.seq),
        Err(e) => {
            println!("CHILD failed: {e}");
            std::process::exit(CHILD_COMMIT_FAILED);
        }
    }
}

struct Outcome {
    status: std::process::ExitStatus,
    stdout: String,
}

fn run_child(dir: &Path, failpoint: Option<String>) -> Outcome {
    run_helper(HELPER, CHILD_ENV, dir, failpoint)
}

fn run_helper(helper: &str, env: &str, dir: &Path, failpoint: Option<String>) -> Outcome {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([helper, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, dir);
    match failpoint {
        Some(spec) => cmd.env(ENV_VAR, spec),
        None => cmd.env_remove(ENV_VAR),
    };
    let out = cmd.output().unwrap();
    Outcome {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// A store holding images 1..=BEFORE of the history.
fn prepared() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), APP, policy()).unwrap();
    let mut m = Model::new(&LENS);
    for j in 1..=BEFORE {
        step(&mut m, j);
        m.checkpoint(&store);
    }
    dir
}

fn temp_files(dir: &Path) -> Vec<String> {
    dir_names(dir)
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

/// Recovers after the child; checks the state is exactly `expect`'s, then commits the next
/// step and checks that recovers too.
fn check_recovers_to(dir: &Path, expect: u64, what: &str) {
    let store = Store::open(dir, APP, policy()).unwrap();
    assert!(
        temp_files(dir).is_empty(),
        "{what}: stale temp file survived open"
    );
    let (mut m, got) = recovered_model(&store);
    assert_eq!(got, Some(expect), "{what}");
    assert!(
        m.regions == state(expect),
        "{what}: recovered memory is not state {expect}"
    );

    step(&mut m, expect + 1);
    let info = m.checkpoint(&store);
    assert_eq!(info.seq, expect + 1, "{what}: next commit");
    let fresh = Store::open(dir, APP, policy()).unwrap();
    let (m2, got) = recovered_model(&fresh);
    assert_eq!(got, Some(expect + 1), "{what}: after the next commit");
    assert!(
        m2.regions == state(expect + 1),
        "{what}: state after the next commit"
    );
}

#[test]
fn child_without_failpoint_commits() {
    let dir = prepared();
    let out = run_child(dir.path(), None);
    assert!(out.status.success(), "{:?}: {}", out.status, out.stdout);
    assert!(
        out.stdout
            .contains(&format!("CHILD committed {}", BEFORE + 1)),
        "{}",
        out.stdout
    );
    check_recovers_to(dir.path(), BEFORE + 1, "no failpoint");
}

#[test]
fn crash_at_every_commit_step_leaves_old_or_new_state() {
    for point in COMMIT_POINTS {
        let dir = prepared();
        let out = run_child(dir.path(), Some(format!("{point}=kill")));
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "{point}: child should die by SIGKILL, got {:?}: {}",
            out.status,
            out.stdout
        );
        let renamed = point == "commit.renamed" || point == "commit.dir_synced";
        if renamed {
            assert!(temp_files(dir.path()).is_empty(), "{point}");
            assert!(image_path(dir.path(), BEFORE + 1).exists(), "{point}");
        } else {
            // The dead child's temp file is there until the next open cleans it.
            assert_eq!(temp_files(dir.path()).len(), 1, "{point}");
            assert!(!image_path(dir.path(), BEFORE + 1).exists(), "{point}");
        }
        let expect = if renamed { BEFORE + 1 } else { BEFORE };
        check_recovers_to(dir.path(), expect, &format!("kill at {point}"));
    }
}

#[test]
fn injected_error_at_every_commit_step_keeps_the_old_checkpoint() {
    for point in COMMIT_POINTS {
        let dir = prepared();
        let before = dir_names(dir.path());
        let out = run_child(dir.path(), Some(format!("{point}=error")));
        assert_eq!(
            out.status.code(),
            Some(CHILD_COMMIT_FAILED),
            "{point}: {:?}: {}",
            out.status,
            out.stdout
        );
        assert!(
            out.stdout
                .contains(&format!("injected failure at failpoint {point}")),
            "{point}: {}",
            out.stdout
        );
        // The failed commit removed everything it had created.
        assert_eq!(dir_names(dir.path()), before, "{point}");
        check_recovers_to(dir.path(), BEFORE, &format!("error at {point}"));
    }
}

#[test]
fn failpoint_spec_with_several_entries_and_unknown_names() {
    let dir = prepared();
    let spec = "no.such.point=kill,commit.synced=error".to_owned();
    let out = run_child(dir.path(), Some(spec));
    assert_eq!(
        out.status.code(),
        Some(CHILD_COMMIT_FAILED),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("commit.synced"), "{}", out.stdout);
    check_recovers_to(dir.path(), BEFORE, "list spec");
}

/// Set (to the store directory) only in the re-executed compacting child.
const COMPACT_CHILD_ENV: &str = "CKPT_CRASH_TEST_COMPACT_DIR";
const COMPACT_HELPER: &str = "child_compact_helper";
/// The image the child compacts: the newest of a chain of one full image and increments.
const CHAIN: u64 = 5;

/// A store holding images 1..=CHAIN of the history, all but the first increments.
fn prepared_chain() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let never = StorePolicy {
        keep: 3,
        full_every: 100,
    };
    let store = Store::open(dir.path(), APP, never).unwrap();
    let mut m = Model::new(&LENS);
    for j in 1..=CHAIN {
        step(&mut m, j);
        let info = m.checkpoint(&store);
        assert_eq!(info.parent, (j > 1).then(|| j - 1));
    }
    dir
}

/// Runs only in the re-executed child: compacts image CHAIN.
#[test]
fn child_compact_helper() {
    let Ok(dir) = std::env::var(COMPACT_CHILD_ENV) else {
        return; // Not the child: the parent tests below drive this.
    };
    let store = Store::open(Path::new(&dir), APP, policy()).unwrap();
    match store.compact(CHAIN, &mut || true) {
        Ok(info) => println!("CHILD compacted {} parent {:?}", info.seq, info.parent),
        Err(e) => {
            println!("CHILD failed: {e}");
            std::process::exit(CHILD_COMMIT_FAILED);
        }
    }
}

/// After a compacting child: image CHAIN holds state CHAIN, as the full image when `replaced`
/// or else as the increment with its whole chain.
fn check_compaction_outcome(dir: &Path, replaced: bool, what: &str) {
    let store = Store::open(dir, APP, policy()).unwrap();
    assert!(
        temp_files(dir).is_empty(),
        "{what}: temp file survived open"
    );
    let newest = store.list().unwrap().pop().unwrap();
    assert_eq!(newest.seq, CHAIN, "{what}");
    assert_eq!(
        newest.parent,
        (!replaced).then_some(CHAIN - 1),
        "{what}: which image is there"
    );
    let mut m = Model::new(&LENS);
    let (bufs, r) = recover(&store, &m);
    let r = r.unwrap();
    let chain: Vec<u64> = if replaced {
        vec![CHAIN]
    } else {
        (1..=CHAIN).collect()
    };
    assert_eq!(r.chain, chain, "{what}");
    assert!(
        bufs == state(CHAIN),
        "{what}: recovered memory is not state {CHAIN}"
    );
    if !replaced {
        // The interrupted compaction can simply run again.
        let info = store.compact(CHAIN, &mut || true).unwrap();
        assert_eq!(info.parent, None, "{what}: compaction again");
        m.regions = recover(&store, &m).0;
        assert!(m.regions == state(CHAIN), "{what}: after compacting again");
    }
    check_recovers_to(dir, CHAIN, what);
}

#[test]
fn child_without_failpoint_compacts() {
    let dir = prepared_chain();
    let out = run_helper(COMPACT_HELPER, COMPACT_CHILD_ENV, dir.path(), None);
    assert!(out.status.success(), "{:?}: {}", out.status, out.stdout);
    assert!(
        out.stdout
            .contains(&format!("CHILD compacted {CHAIN} parent None")),
        "{}",
        out.stdout
    );
    check_compaction_outcome(dir.path(), true, "no failpoint");
}

#[test]
fn crash_at_every_compaction_step_leaves_a_recoverable_store() {
    for point in COMPACT_POINTS {
        let dir = prepared_chain();
        let out = run_helper(
            COMPACT_HELPER,
            COMPACT_CHILD_ENV,
            dir.path(),
            Some(format!("{point}=kill")),
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "{point}: child should die by SIGKILL, got {:?}: {}",
            out.status,
            out.stdout
        );
        let replaced = point == "compact.renamed" || point == "compact.dir_synced";
        // The dead child's temp file is there until the next open cleans it.
        assert_eq!(
            temp_files(dir.path()).len(),
            usize::from(!replaced),
            "{point}"
        );
        check_compaction_outcome(dir.path(), replaced, &format!("kill at {point}"));
    }
}

#[test]
fn injected_error_at_every_compaction_step_leaves_a_recoverable_store() {
    for point in COMPACT_POINTS {
        let dir = prepared_chain();
        let before = dir_names(dir.path());
        let out = run_helper(
            COMPACT_HELPER,
            COMPACT_CHILD_ENV,
            dir.path(),
            Some(format!("{point}=error")),
        );
        assert_eq!(
            out.status.code(),
            Some(CHILD_COMMIT_FAILED),
            "{point}: {:?}: {}",
            out.status,
            out.stdout
        );
        assert!(
            out.stdout
                .contains(&format!("injected failure at failpoint {point}")),
            "{point}: {}",
            out.stdout
        );
        // Nothing was left behind: no temp file, the same image names (the full image, once
        // renamed into place, stays: it holds the same state).
        assert_eq!(dir_names(dir.path()), before, "{point}");
        let replaced = point == "compact.renamed" || point == "compact.dir_synced";
        check_compaction_outcome(dir.path(), replaced, &format!("error at {point}"));
    }
}
