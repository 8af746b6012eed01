//! The shim's one lock: it orders the real calls on tracked files with their ring records.
//!
//! A futex mutex (not std's) because fork handling needs to take it without a guard and to
//! reset it in the child. It must never be held while waiting for a backup (sync mode).

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;
/// Locked, and some thread may be sleeping on the futex.
const CONTENDED: u32 = 2;

/// A mutex over `T` whose state is one futex word.
pub(crate) struct OrderLock<T> {
    word: AtomicU32,
    data: UnsafeCell<T>,
}

impl<T> std::fmt::Debug for OrderLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderLock")
            .field("word", &self.word.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

// SAFETY: access to `data` is serialized by `word` (a mutex), so sharing the lock between
// threads is sound whenever `T` itself may move between threads.
unsafe impl<T: Send> Sync for OrderLock<T> {}

impl<T> OrderLock<T> {
    /// A new, unlocked lock.
    pub(crate) const fn new(value: T) -> Self {
        Self {
            word: AtomicU32::new(UNLOCKED),
            data: UnsafeCell::new(value),
        }
    }

    /// Takes the lock.
    pub(crate) fn lock(&self) -> OrderGuard<'_, T> {
        self.acquire();
        OrderGuard { lock: self }
    }

    fn acquire(&self) {
        if self
            .word
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        while self.word.swap(CONTENDED, Ordering::Acquire) != UNLOCKED {
            futex(
                &self.word,
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                CONTENDED,
            );
        }
    }

    fn release(&self) {
        if self.word.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            futex(&self.word, libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1);
        }
    }

    /// Takes the lock without a guard (fork's prepare handler); pair with
    /// [`OrderLock::release_after_fork`] or [`OrderLock::reset_in_child`].
    pub(crate) fn acquire_for_fork(&self) {
        self.acquire();
    }

    /// Releases a lock taken by [`OrderLock::acquire_for_fork`] (fork's parent handler).
    pub(crate) fn release_after_fork(&self) {
        self.release();
    }

    /// Makes the lock free in a fresh child: only the forking thread exists there, so any
    /// holder recorded in the word is gone (or is this thread's prepare handler).
    pub(crate) fn reset_in_child(&self) {
        self.word.store(UNLOCKED, Ordering::Release);
    }
}

/// Holds the lock; dropping it releases it.
pub(crate) struct OrderGuard<'a, T> {
    lock: &'a OrderLock<T>,
}

impl<T> std::fmt::Debug for OrderGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OrderGuard")
    }
}

impl<T> Deref for OrderGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while the lock is held, so no other reference to
        // `data` is live.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for OrderGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for OrderGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.release();
    }
}

fn futex(word: &AtomicU32, op: libc::c_int, value: u32) {
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; a null timeout
    // means wait without limit; FUTEX_WAKE ignores the timeout argument.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            value,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_lock_serializes_threads() {
        let lock = Arc::new(OrderLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = Arc::clone(&lock);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *lock.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread finished");
        }
        assert_eq!(*lock.lock(), 40_000);
    }

    #[test]
    fn a_lock_taken_for_fork_is_free_after_reset() {
        let lock = OrderLock::new(());
        lock.acquire_for_fork();
        lock.reset_in_child();
        drop(lock.lock());
        lock.acquire_for_fork();
        lock.release_after_fork();
        drop(lock.lock());
    }
}
