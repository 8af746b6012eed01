//! The per-thread re-entrancy guard and errno preservation.
//!
//! Owns the rule "the shim never records its own I/O": while a thread runs shim code, every
//! wrapped call it makes goes straight to libc. Must never allocate: it runs in signal handlers.

use std::cell::Cell;

thread_local! {
    // `const` and free of destructors, so access is a plain TLS load: no allocation, no
    // registration, safe in signal handlers and in threads that are being torn down.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Proof that this thread is inside the shim; leaving the scope ends it.
#[derive(Debug)]
pub(crate) struct Inside(());

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.with(|inside| inside.set(false));
    }
}

/// Enters the shim, or `None` if this thread is already inside it (the caller must then
/// only make the real call).
#[inline]
pub(crate) fn enter() -> Option<Inside> {
    INSIDE.with(|inside| {
        if inside.get() {
            None
        } else {
            inside.set(true);
            Some(Inside(()))
        }
    })
}

/// Whether this thread is inside the shim right now.
#[inline]
pub(crate) fn is_inside() -> bool {
    INSIDE.with(Cell::get)
}

/// The thread's `errno` as the real call left it; [`Errno::restore`] puts it back after the
/// shim's own work (which may have changed it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Errno(libc::c_int);

impl Errno {
    /// Saves the current `errno`.
    #[inline]
    pub(crate) fn save() -> Self {
        // SAFETY: `__errno_location` always returns the valid thread-local errno address.
        Self(unsafe { *libc::__errno_location() })
    }

    /// The saved value.
    pub(crate) fn value(self) -> libc::c_int {
        self.0
    }

    /// Sets `errno` back to the saved value.
    #[inline]
    pub(crate) fn restore(self) {
        set_errno(self.0);
    }
}

/// Sets the thread's `errno`.
#[inline]
pub(crate) fn set_errno(value: libc::c_int) {
    // SAFETY: `__errno_location` always returns the valid thread-local errno address.
    unsafe { *libc::__errno_location() = value };
}
