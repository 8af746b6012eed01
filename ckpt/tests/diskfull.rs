//! Disk full: a store on a 256 KiB tmpfs; committing an image larger than the space fails with
//! StorageFull (ENOSPC), leaves no temp file, and the previous checkpoint still recovers. Needs
//! root to mount; skips with a message otherwise.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ckpt::{Store, StorePolicy};
use common::*;

const TMPFS_SIZE: &str = "size=256k";
/// Far more than the tmpfs holds.
const BIG_REGION: usize = 1 << 20;

/// A tmpfs mounted on a fresh directory, unmounted (lazily, so a leaked fd cannot keep it) on
/// drop, also when the test fails.
struct Tmpfs {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", TMPFS_SIZE, "tmpfs"])
            .arg(dir.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipping disk-full test: cannot mount tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs { dir, mounted: true })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("store")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    dir_names(dir)
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[test]
fn commit_on_a_full_disk_fails_cleanly() {
    let Some(fs) = Tmpfs::mount() else {
        return;
    };
    let dir = fs.path();
    let policy = StorePolicy {
        keep: 3,
        full_every: 0,
    };
    let store = Store::open(&dir, APP, policy.clone()).unwrap();
    let mut small = Model::new(&[2 * PAGE, 33]);
    small.write(0, 100, &[7; 5000]);
    small.write(1, 0, &[9; 33]);
    small.checkpoint(&store);

    // As libft does it: a chunk write fails, the caller gives up (abort).
    let mut big = Model::new(&[BIG_REGION]);
    big.write(0, 0, &vec![0xAB; BIG_REGION]);
    let plan = store.plan().unwrap();
    let e = big.checkpoint_with(&store, &plan).unwrap_err();
    assert!(e.is_storage_full(), "expected StorageFull, got {e}");
    assert!(temp_files(&dir).is_empty(), "{:?}", dir_names(&dir));

    // A caller that ignores the chunk error and commits anyway gets StorageFull from commit.
    let mut p = store.begin(&big.header(plan.seq, None)).unwrap();
    let chunk_err = p.chunk(0, 0, &big.regions[0]).unwrap_err();
    assert!(chunk_err.is_storage_full(), "{chunk_err}");
    let e = p.commit().unwrap_err();
    assert_eq!(e.io_kind(), Some(std::io::ErrorKind::StorageFull), "{e}");
    assert!(temp_files(&dir).is_empty(), "{:?}", dir_names(&dir));

    // The previous checkpoint is intact, and the store takes the next (small) commit.
    let fresh = Store::open(&dir, APP, policy.clone()).unwrap();
    let (bufs, r) = recover(&fresh, &small);
    assert_eq!(r.unwrap().seq, 1);
    assert_eq!(bufs, small.regions);
    small.write(1, 3, &[1, 2, 3]);
    let info = small.checkpoint(&fresh);
    assert_eq!(info.seq, 2);
    let (bufs, r) = recover(&Store::open(&dir, APP, policy).unwrap(), &small);
    assert_eq!(r.unwrap().seq, 2);
    assert_eq!(bufs, small.regions);
}
