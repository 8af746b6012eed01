//! Shared helpers of the critical-memory tests: unique heap addresses, configurations, child
//! processes that re-execute the test binary in a role, and digests of memory.

#![allow(dead_code)] // each test file uses a different subset

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use ft::critical::{CheckpointConfig, DirtyMode, HeapConfig};

/// The environment variable that selects a child role in a re-executed test binary.
pub const ROLE_ENV: &str = "FT_CRIT_TEST_ROLE";

/// Test heaps live here: inside the default window's range of addresses, far from anything
/// the test binary maps.
const TEST_WINDOW: usize = 0x6100_0000_0000;
/// Distance between two test heaps (room for the largest test heap).
const TEST_SLOT: usize = 1 << 34;

/// A heap address no other test in this binary uses (`slot` is unique per test).
pub fn heap_addr(slot: usize) -> usize {
    TEST_WINDOW + slot * TEST_SLOT
}

/// A configuration for an in-process test: store under `dir`, heap of `size` at `slot`.
pub fn config(dir: &Path, slot: usize, size: usize, dirty: DirtyMode) -> CheckpointConfig {
    let mut c = CheckpointConfig::new(
        &format!("crit-test-{}", std::process::id()),
        dir,
        HeapConfig {
            addr: heap_addr(slot),
            size,
        },
    );
    c.dirty = dirty;
    c
}

/// A name unique within this test process, for services and files.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs this test binary again with only the test `entry` selected and `ROLE_ENV=role`, plus
/// `envs`; returns its output.
pub fn run_role(entry: &str, role: &str, envs: &[(&str, String)]) -> Output {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", entry, "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run the test binary in a child role")
}

/// The `key=value` lines a role printed.
pub fn values(out: &Output) -> std::collections::BTreeMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("@"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Prints a value for the parent (`@key=value`, so libtest's own lines never match; on a line
/// of its own, since libtest leaves "test name ... " unterminated while the test runs).
pub fn report(key: &str, value: impl std::fmt::Display) {
    println!("\n@{key}={value}");
}

/// Explains a child's failure with everything it printed.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether the child died of SIGKILL.
pub fn killed_by_sigkill(out: &Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(libc::SIGKILL)
}

/// Kills the calling process with SIGKILL: a crash at exactly this point.
pub fn crash() -> ! {
    // SAFETY: raise has no memory-safety preconditions.
    unsafe { libc::raise(libc::SIGKILL) };
    unreachable!("SIGKILL cannot be caught")
}

/// xxh3 of `len` bytes at `addr`.
///
/// # Safety
/// The bytes must be mapped and readable.
pub unsafe fn digest(addr: usize, len: usize) -> u64 {
    // SAFETY: guaranteed by the caller.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The low byte of `v`: fill patterns that wrap on purpose.
pub fn low_byte(v: u64) -> u8 {
    v.to_le_bytes()[0]
}

/// A small deterministic generator (xorshift), so children and parents agree without a
/// shared crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below n fits usize")
    }
}

/// An anonymous private mapping of `pages` pages, unmapped on drop: memory no allocator or
/// other thread ever touches, for exact dirty-page counts.
#[derive(Debug)]
pub struct Pages {
    pub base: *mut u8,
    pub len: usize,
}

impl Pages {
    pub fn map(pages: usize) -> Pages {
        let len = pages * page_size();
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        Pages {
            base: p.cast(),
            len,
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `map`; tests drop it only after the Checkpointer that
        // tracked it.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size")
}
