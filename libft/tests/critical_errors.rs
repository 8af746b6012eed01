//! A full disk under the checkpoint store: the asynchronous failure is reported by the next
//! call and by the sync variant, the previous checkpoint stays intact, no temp file is left,
//! and no dirty page is lost: once the disk has room, the next (incremental) checkpoint plus
//! recovery in a new process equals the live state.

mod critical_support;

use std::ffi::CString;
use std::path::{Path, PathBuf};

use critical_support::{
    ROLE_ENV, Rng, crash, describe, digest, heap_addr, killed_by_sigkill, report, run_role, unique,
    values,
};
use ft::capi::{FT_ENOSPC, FT_OK, t_checkpoint, t_checkpoint_sync, t_checkpoint_wait};
use ft::critical::global;

const ENTRY: &str = "child_role";
/// Small enough that a 2 MiB increment cannot fit, big enough for the first full image.
const SMALL_TMPFS: &str = "size=1m";
const LARGE_TMPFS: &str = "size=64m";

/// A tmpfs mounted for the test, lazily unmounted on drop (also when the test fails).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// None when this process may not mount (not root, or no mount namespace rights).
    fn mount(path: &Path, options: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("mount point");
        let target = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        let data = CString::new(options).expect("options");
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs ({}), the disk-full test cannot run",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(Tmpfs {
            path: path.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid path string; MNT_DETACH never blocks on busy files.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn remount(path: &Path, options: &str) {
    let target = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let data = CString::new(options).expect("options");
    // SAFETY: valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "remount: {}", std::io::Error::last_os_error());
}

fn heap_digest() -> String {
    let heap = global().expect("critical memory").heap();
    let used = heap.stats().expect("stats").used_span;
    // SAFETY: the used span of our heap is readable.
    format!("{:016x}", unsafe { digest(heap.base(), used) })
}

/// Files of the stream-0 store: committed images and anything else (temp files).
fn store_files(dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("0"))
        .expect("store dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().partition(|n| n.ends_with(".ckpt"))
}

#[test]
fn child_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    match role.as_str() {
        "fill_disk" => fill_disk(),
        "verify" => verify(),
        other => panic!("unknown role {other}"),
    }
}

fn fill_disk() {
    let store_root = PathBuf::from(std::env::var("FT_CKPT_DIR").expect("FT_CKPT_DIR"));
    let cp = global().expect("critical memory");
    let heap = cp.heap();
    let mut rng = Rng::new(77);
    let small = heap.alloc(64 << 10, 4096).expect("small").as_ptr();
    for i in 0..(64 << 10) {
        // SAFETY: inside the block.
        unsafe { small.add(i).write(rng.byte()) };
    }
    let first = cp.checkpoint_sync(0).expect("the first image fits");
    report("first_seq", first.seq);

    let big = heap.alloc(2 << 20, 4096).expect("big").as_ptr();
    for i in 0..(2 << 20) {
        // SAFETY: inside the block.
        unsafe { big.add(i).write(rng.byte()) };
    }
    // The capture succeeds; writing the image fails in the background ...
    assert_eq!(t_checkpoint(0), FT_OK);
    // ... and the next call reports it, without taking a checkpoint.
    assert_eq!(t_checkpoint(0), FT_ENOSPC);
    assert_eq!(t_checkpoint_wait(0), FT_OK, "the failure is reported once");
    // The sync variant reports its own failure.
    assert_eq!(t_checkpoint_sync(0), FT_ENOSPC);
    let (images, others) = store_files(&store_root);
    assert_eq!(
        images,
        vec![format!("{:020}.ckpt", first.seq)],
        "previous image intact"
    );
    assert!(others.is_empty(), "temp files left behind: {others:?}");

    // Room again: the next increment carries every page the failed ones carried, although
    // nothing was written since.
    remount(&store_root, LARGE_TMPFS);
    let after = cp
        .checkpoint_sync(0)
        .expect("checkpoint after the disk has room");
    assert_eq!(
        after.parent,
        Some(first.seq),
        "an increment on the intact image"
    );
    assert!(
        after.data_bytes >= 2 << 20,
        "the failed pages are in it: {after:?}"
    );
    report("last_seq", after.seq);
    report("digest", heap_digest());
    crash();
}

fn verify() {
    let cp = global().expect("critical memory");
    // SAFETY: nothing touched critical memory yet.
    let recovered = unsafe { cp.recover(0) }
        .expect("recover")
        .expect("a checkpoint");
    report("seq", recovered.seq);
    report("digest", heap_digest());
}

#[test]
fn disk_full_is_reported_and_loses_no_dirty_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let Some(mount) = Tmpfs::mount(&store, SMALL_TMPFS) else {
        return;
    };
    let env = vec![
        ("FT_SERVICE", unique("crit-errors")),
        ("FT_HEAP_ADDR", format!("{:#x}", heap_addr(60))),
        ("FT_HEAP_SIZE", "64MiB".to_owned()),
        ("FT_CKPT_DIR", store.display().to_string()),
    ];
    let first = run_role(ENTRY, "fill_disk", &env);
    assert!(killed_by_sigkill(&first), "{}", describe(&first));
    let wrote = values(&first);
    let second = run_role(ENTRY, "verify", &env);
    assert!(second.status.success(), "{}", describe(&second));
    let read = values(&second);
    assert_eq!(read.get("seq"), wrote.get("last_seq"), "{read:?} {wrote:?}");
    assert_eq!(
        read.get("digest"),
        wrote.get("digest"),
        "recovered = live state"
    );
    drop(mount);
}
