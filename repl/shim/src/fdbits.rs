//! One bit per file descriptor: "this descriptor may be tracked".
//!
//! The fast path of every fd-based wrapper reads it with two atomic loads, no lock and no
//! allocation (it runs in signal handlers). Bits change only under the shim's lock.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// Descriptors per chunk (a chunk is allocated the first time one of its fds is tracked).
const CHUNK_FDS: usize = 4096;
const WORDS_PER_CHUNK: usize = CHUNK_FDS / 64;
/// Chunks: descriptors from 0 to `CHUNKS * CHUNK_FDS - 1` (4 Mi) can be tracked, above the
/// kernel's default `nr_open` of 1 Mi.
const CHUNKS: usize = 1024;

type Chunk = [AtomicU64; WORDS_PER_CHUNK];

static TOP: [AtomicPtr<Chunk>; CHUNKS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; CHUNKS];

fn split(fd: libc::c_int) -> Option<(usize, usize, u64)> {
    let fd = usize::try_from(fd).ok()?;
    let chunk = fd / CHUNK_FDS;
    if chunk >= CHUNKS {
        return None;
    }
    let within = fd % CHUNK_FDS;
    Some((chunk, within / 64, 1u64 << (within % 64)))
}

/// Whether `fd` may be tracked (the shim's table decides; a clear bit means "certainly not").
#[inline]
pub(crate) fn is_set(fd: libc::c_int) -> bool {
    let Some((chunk, word, bit)) = split(fd) else {
        return false;
    };
    let ptr = TOP[chunk].load(Ordering::Acquire);
    if ptr.is_null() {
        return false;
    }
    // SAFETY: chunks are leaked boxes that are never freed once published.
    let chunk = unsafe { &*ptr };
    chunk[word].load(Ordering::Acquire) & bit != 0
}

/// Marks `fd`; returns false if it is beyond the trackable range. Call under the shim's lock.
pub(crate) fn set(fd: libc::c_int) -> bool {
    let Some((chunk, word, bit)) = split(fd) else {
        return false;
    };
    let mut ptr = TOP[chunk].load(Ordering::Acquire);
    if ptr.is_null() {
        let fresh: Box<Chunk> = Box::new([const { AtomicU64::new(0) }; WORDS_PER_CHUNK]);
        ptr = Box::into_raw(fresh);
        // Only one thread sets bits at a time (the shim's lock), so a plain store publishes.
        TOP[chunk].store(ptr, Ordering::Release);
    }
    // SAFETY: as in `is_set`: published chunks live for the rest of the process.
    let chunk = unsafe { &*ptr };
    chunk[word].fetch_or(bit, Ordering::Release);
    true
}

/// Clears `fd`'s bit. Call under the shim's lock.
pub(crate) fn clear(fd: libc::c_int) {
    let Some((chunk, word, bit)) = split(fd) else {
        return;
    };
    let ptr = TOP[chunk].load(Ordering::Acquire);
    if ptr.is_null() {
        return;
    }
    // SAFETY: as in `is_set`.
    let chunk = unsafe { &*ptr };
    chunk[word].fetch_and(!bit, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_set_and_cleared_per_descriptor() {
        // Descriptors far beyond what the test process uses, so the test owns these bits.
        let fds = [1_000_001, 1_000_002, 1_004_097];
        for fd in fds {
            assert!(!is_set(fd));
            assert!(set(fd));
            assert!(is_set(fd));
        }
        clear(fds[1]);
        assert!(is_set(fds[0]) && !is_set(fds[1]) && is_set(fds[2]));
        assert!(!is_set(-1));
        assert!(!set(i32::MAX));
        for fd in fds {
            clear(fd);
        }
    }
}
