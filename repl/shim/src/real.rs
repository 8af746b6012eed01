//! The real libc functions the shim wraps, found once with `dlsym(RTLD_NEXT, …)`.
//!
//! Owns the table of resolved addresses. It must never call a wrapper of this crate: every
//! address comes from the next object in the lookup order, never from ourselves.

use std::ffi::{CStr, c_void};
use std::sync::atomic::{AtomicPtr, Ordering};

/// Resolves `name` in the objects loaded after this one, caching the address in `slot`.
fn resolve(slot: &AtomicPtr<c_void>, name: &CStr) -> *mut c_void {
    let cached = slot.load(Ordering::Acquire);
    if !cached.is_null() {
        return cached;
    }
    // SAFETY: `name` is a NUL-terminated symbol name; RTLD_NEXT is a valid pseudo-handle for
    // a library that was loaded by the dynamic linker (LD_PRELOAD or a normal dependency).
    let found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    // Races are harmless: every thread finds the same address.
    slot.store(found, Ordering::Release);
    found
}

macro_rules! real_fns {
    ($($name:ident: $ty:ty;)*) => {
        $(
            /// The real function of that name, or `None` if no later object defines it.
            #[allow(non_snake_case, clippy::missing_transmute_annotations)]
            #[inline]
            pub(crate) fn $name() -> Option<$ty> {
                static SLOT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
                const NAME: &CStr =
                    match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                        Ok(name) => name,
                        Err(_) => panic!("a symbol name has no interior NUL"),
                    };
                let found = resolve(&SLOT, NAME);
                if found.is_null() {
                    return None;
                }
                // SAFETY: `found` is the address of the libc function named like this
                // accessor, whose C prototype is exactly `$ty` (glibc's documented ABI).
                Some(unsafe { std::mem::transmute::<*mut c_void, $ty>(found) })
            }
        )*

        /// Resolves every function now, so that later calls (possibly from signal handlers)
        /// never enter `dlsym`.
        pub(crate) fn resolve_all() {
            $( let _ = $name(); )*
        }
    };
}

use libc::{FILE, c_char, c_int, c_uint, c_ulong, iovec, mode_t, off_t, off64_t, size_t, ssize_t};

type Utimbuf = libc::utimbuf;
type Timeval = libc::timeval;
type Timespec = libc::timespec;

real_fns! {
    open: unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
    open64: unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
    openat: unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
    openat64: unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
    __open_2: unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    __open64_2: unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    __openat_2: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
    __openat64_2: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
    creat: unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    creat64: unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    write: unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t;
    pwrite: unsafe extern "C" fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
    pwrite64: unsafe extern "C" fn(c_int, *const c_void, size_t, off64_t) -> ssize_t;
    writev: unsafe extern "C" fn(c_int, *const iovec, c_int) -> ssize_t;
    pwritev: unsafe extern "C" fn(c_int, *const iovec, c_int, off_t) -> ssize_t;
    pwritev64: unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t) -> ssize_t;
    pwritev2: unsafe extern "C" fn(c_int, *const iovec, c_int, off_t, c_int) -> ssize_t;
    pwritev64v2: unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t, c_int) -> ssize_t;
    ftruncate: unsafe extern "C" fn(c_int, off_t) -> c_int;
    ftruncate64: unsafe extern "C" fn(c_int, off64_t) -> c_int;
    truncate: unsafe extern "C" fn(*const c_char, off_t) -> c_int;
    truncate64: unsafe extern "C" fn(*const c_char, off64_t) -> c_int;
    fallocate: unsafe extern "C" fn(c_int, c_int, off_t, off_t) -> c_int;
    fallocate64: unsafe extern "C" fn(c_int, c_int, off64_t, off64_t) -> c_int;
    posix_fallocate: unsafe extern "C" fn(c_int, off_t, off_t) -> c_int;
    posix_fallocate64: unsafe extern "C" fn(c_int, off64_t, off64_t) -> c_int;
    copy_file_range: unsafe extern "C" fn(c_int, *mut off64_t, c_int, *mut off64_t, size_t, c_uint) -> ssize_t;
    sendfile: unsafe extern "C" fn(c_int, c_int, *mut off_t, size_t) -> ssize_t;
    sendfile64: unsafe extern "C" fn(c_int, c_int, *mut off64_t, size_t) -> ssize_t;
    splice: unsafe extern "C" fn(c_int, *mut off64_t, c_int, *mut off64_t, size_t, c_uint) -> ssize_t;
    ioctl: unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
    rename: unsafe extern "C" fn(*const c_char, *const c_char) -> c_int;
    renameat: unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char) -> c_int;
    renameat2: unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char, c_uint) -> c_int;
    unlink: unsafe extern "C" fn(*const c_char) -> c_int;
    unlinkat: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
    remove: unsafe extern "C" fn(*const c_char) -> c_int;
    mkdir: unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    mkdirat: unsafe extern "C" fn(c_int, *const c_char, mode_t) -> c_int;
    rmdir: unsafe extern "C" fn(*const c_char) -> c_int;
    symlink: unsafe extern "C" fn(*const c_char, *const c_char) -> c_int;
    symlinkat: unsafe extern "C" fn(*const c_char, c_int, *const c_char) -> c_int;
    link: unsafe extern "C" fn(*const c_char, *const c_char) -> c_int;
    linkat: unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char, c_int) -> c_int;
    chmod: unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    lchmod: unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    fchmod: unsafe extern "C" fn(c_int, mode_t) -> c_int;
    fchmodat: unsafe extern "C" fn(c_int, *const c_char, mode_t, c_int) -> c_int;
    utimensat: unsafe extern "C" fn(c_int, *const c_char, *const Timespec, c_int) -> c_int;
    futimens: unsafe extern "C" fn(c_int, *const Timespec) -> c_int;
    utime: unsafe extern "C" fn(*const c_char, *const Utimbuf) -> c_int;
    utimes: unsafe extern "C" fn(*const c_char, *const Timeval) -> c_int;
    lutimes: unsafe extern "C" fn(*const c_char, *const Timeval) -> c_int;
    futimes: unsafe extern "C" fn(c_int, *const Timeval) -> c_int;
    futimesat: unsafe extern "C" fn(c_int, *const c_char, *const Timeval) -> c_int;
    setxattr: unsafe extern "C" fn(*const c_char, *const c_char, *const c_void, size_t, c_int) -> c_int;
    lsetxattr: unsafe extern "C" fn(*const c_char, *const c_char, *const c_void, size_t, c_int) -> c_int;
    fsetxattr: unsafe extern "C" fn(c_int, *const c_char, *const c_void, size_t, c_int) -> c_int;
    fsync: unsafe extern "C" fn(c_int) -> c_int;
    fdatasync: unsafe extern "C" fn(c_int) -> c_int;
    close: unsafe extern "C" fn(c_int) -> c_int;
    close_range: unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
    closefrom: unsafe extern "C" fn(c_int);
    dup: unsafe extern "C" fn(c_int) -> c_int;
    dup2: unsafe extern "C" fn(c_int, c_int) -> c_int;
    dup3: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
    fcntl: unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    fcntl64: unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    mkstemp: unsafe extern "C" fn(*mut c_char) -> c_int;
    mkstemp64: unsafe extern "C" fn(*mut c_char) -> c_int;
    mkostemp: unsafe extern "C" fn(*mut c_char, c_int) -> c_int;
    mkostemp64: unsafe extern "C" fn(*mut c_char, c_int) -> c_int;
    mkstemps: unsafe extern "C" fn(*mut c_char, c_int) -> c_int;
    mkstemps64: unsafe extern "C" fn(*mut c_char, c_int) -> c_int;
    mkostemps: unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    mkostemps64: unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    mkdtemp: unsafe extern "C" fn(*mut c_char) -> *mut c_char;
    fopen: unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE;
    fopen64: unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE;
    fdopen: unsafe extern "C" fn(c_int, *const c_char) -> *mut FILE;
    freopen: unsafe extern "C" fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE;
    freopen64: unsafe extern "C" fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE;
    fileno: unsafe extern "C" fn(*mut FILE) -> c_int;
    fileno_unlocked: unsafe extern "C" fn(*mut FILE) -> c_int;
    fflush: unsafe extern "C" fn(*mut FILE) -> c_int;
    fflush_unlocked: unsafe extern "C" fn(*mut FILE) -> c_int;
    fclose: unsafe extern "C" fn(*mut FILE) -> c_int;
    fseek: unsafe extern "C" fn(*mut FILE, libc::c_long, c_int) -> c_int;
    fseeko: unsafe extern "C" fn(*mut FILE, off_t, c_int) -> c_int;
    fseeko64: unsafe extern "C" fn(*mut FILE, off64_t, c_int) -> c_int;
    fsetpos: unsafe extern "C" fn(*mut FILE, *const libc::fpos_t) -> c_int;
    fsetpos64: unsafe extern "C" fn(*mut FILE, *const libc::fpos64_t) -> c_int;
    rewind: unsafe extern "C" fn(*mut FILE);
    _IO_list_lock: unsafe extern "C" fn();
    _IO_list_unlock: unsafe extern "C" fn();
}
