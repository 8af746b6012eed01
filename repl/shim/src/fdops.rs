//! The exported wrappers of descriptor-based calls: opens (which start tracking), writes,
//! truncation, space allocation, copies into files, fsync, close and dup.
//!
//! Each wrapper's fast path (shim off, or a descriptor not tracked) is the real call plus at
//! most a few atomic loads: no lock, no allocation, usable from signal handlers. Wrappers make
//! the real call exactly once, with the caller's arguments, and return its result unchanged.

#![allow(clippy::missing_safety_doc)]

use std::cell::Cell;
use std::ffi::c_void;

use ft::replog::OpRef;
use libc::{c_char, c_int, c_uint, c_ulong, iovec, mode_t, off_t, off64_t, size_t, ssize_t};

use crate::canon;
use crate::diag::{self, Trouble};
use crate::fdbits;
use crate::real;
use crate::rec::{self, MODE_BITS, Reader, on_any_fd, on_tracked, shielded};
use crate::reentry::{self, Errno};
use crate::state;

/// What a wrapper returns when libc lacks the function it wraps.
pub(crate) fn missing<R: From<i8>>() -> R {
    reentry::set_errno(libc::ENOSYS);
    R::from(-1)
}

/// A descriptor a wrapped call just created: a stale table entry under its number (the old
/// descriptor was closed where no wrapper saw it) must go.
#[inline]
pub(crate) fn fresh_fd(fd: c_int) {
    if fdbits::is_set(fd)
        && let Some(shim) = state::get()
        && let Some(_inside) = reentry::enter()
    {
        let errno = Errno::save();
        shim.session().tracked_mut().untrack(fd);
        errno.restore();
    }
}

/// After an open-like call returned `fd` with `flags`: log Create/Truncate and track it if it
/// is a regular file in a fileset opened for writing. Read-only opens cost nothing.
pub(crate) fn opened(fd: c_int, flags: c_int) {
    if fd < 0 {
        return;
    }
    fresh_fd(fd);
    let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
    if flags & libc::O_PATH != 0 || !(writable || flags & (libc::O_CREAT | libc::O_TRUNC) != 0) {
        return;
    }
    let Some(shim) = state::get() else {
        return;
    };
    let Some(_inside) = reentry::enter() else {
        return;
    };
    let errno = Errno::save();
    adopt(shim, fd, flags, writable);
    errno.restore();
}

/// Classifies `fd` and, in a fileset, logs what `flags` did and tracks it if `writable`.
pub(crate) fn adopt(shim: &state::Shim, fd: c_int, flags: c_int, writable: bool) {
    let Some(st) = canon::fstat(fd) else {
        return;
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink == 0 {
        return;
    }
    let Some(canon) = canon::fd_path(fd) else {
        diag::report(
            Trouble::Path,
            format_args!("cannot resolve the path of descriptor {fd} (is /proc mounted?)"),
        );
        return;
    };
    let Some((fileset, rel)) = shim.classify_canon(&canon) else {
        return;
    };
    let mut session = shim.session();
    shielded(|| {
        if flags & libc::O_CREAT != 0 {
            session.emit(
                fileset,
                OpRef::Create {
                    path: rel,
                    mode: st.st_mode & MODE_BITS,
                },
            );
        }
        if flags & libc::O_TRUNC != 0 {
            session.emit(fileset, OpRef::Truncate { path: rel, len: 0 });
        }
        if writable {
            session.tracked_mut().track(fd, fileset, rel.to_vec());
        }
    });
}

// ---- open family -------------------------------------------------------------------------
// The mode is declared as a third fixed argument: on the x86-64 and AArch64 Linux ABIs a
// variadic integer argument travels exactly like a named one, and it is only read (by libc)
// when the flags ask for it (O_CREAT, O_TMPFILE).

#[unsafe(no_mangle)]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    let Some(real) = real::open() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged to the function it meant to call.
    let fd = unsafe { real(path, flags, c_uint::from(mode)) };
    opened(fd, flags);
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    let Some(real) = real::open64() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(path, flags, c_uint::from(mode)) };
    opened(fd, flags);
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    let Some(real) = real::openat() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(dirfd, path, flags, c_uint::from(mode)) };
    opened(fd, flags);
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> c_int {
    let Some(real) = real::openat64() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(dirfd, path, flags, c_uint::from(mode)) };
    opened(fd, flags);
    fd
}

// _FORTIFY_SOURCE builds call these when the flags are not a compile-time constant.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    let Some(real) = real::__open_2() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(path, flags) };
    opened(fd, flags);
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    let Some(real) = real::__open64_2() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(path, flags) };
    opened(fd, flags);
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    let Some(real) = real::__openat_2() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(dirfd, path, flags) };
    opened(fd, flags);
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    let Some(real) = real::__openat64_2() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(dirfd, path, flags) };
    opened(fd, flags);
    fd
}

const CREAT_FLAGS: c_int = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat(path: *const c_char, mode: mode_t) -> c_int {
    let Some(real) = real::creat() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(path, mode) };
    opened(fd, CREAT_FLAGS);
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: mode_t) -> c_int {
    let Some(real) = real::creat64() else {
        return missing();
    };
    // SAFETY: as in `open`.
    let fd = unsafe { real(path, mode) };
    opened(fd, CREAT_FLAGS);
    fd
}

// mkstemp and friends open through glibc's internal open, which no wrapper sees.
const MKSTEMP_FLAGS: c_int = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;

macro_rules! mkstemp_wrapper {
    ($name:ident ($($arg:ident: $ty:ty),*) flags $flags:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(template: *mut c_char $(, $arg: $ty)*) -> c_int {
            let Some(real) = real::$name() else {
                return missing();
            };
            // SAFETY: as in `open`.
            let fd = unsafe { real(template $(, $arg)*) };
            opened(fd, MKSTEMP_FLAGS | $flags);
            fd
        }
    };
}

mkstemp_wrapper!(mkstemp() flags 0);
mkstemp_wrapper!(mkstemp64() flags 0);
mkstemp_wrapper!(mkostemp(flags: c_int) flags flags);
mkstemp_wrapper!(mkostemp64(flags: c_int) flags flags);
mkstemp_wrapper!(mkstemps(suffix: c_int) flags { let _ = suffix; 0 });
mkstemp_wrapper!(mkstemps64(suffix: c_int) flags { let _ = suffix; 0 });
mkstemp_wrapper!(mkostemps(suffix: c_int, flags: c_int) flags { let _ = suffix; flags });
mkstemp_wrapper!(mkostemps64(suffix: c_int, flags: c_int) flags { let _ = suffix; flags });

// ---- writes ------------------------------------------------------------------------------

/// The body of a plain write on a tracked descriptor (also used by stdio cookies).
pub(crate) fn write_tracked(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    let Some(real) = real::write() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let call = || unsafe { real(fd, buf, count) };
    if !fdbits::is_set(fd) {
        return call();
    }
    on_tracked(fd, call, |s, fileset, path, n| {
        let Ok(n) = usize::try_from(n) else { return };
        if n == 0 {
            return;
        }
        if let Some(offset) = rec::written_at(s, fd, n, None) {
            // SAFETY: the kernel just read `n` bytes from `buf`, so they are valid.
            let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), n) };
            s.emit(fileset, OpRef::Write { path, offset, data });
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    write_tracked(fd, buf, count)
}

fn pwrite_common(
    fd: c_int,
    buf: *const c_void,
    offset: i64,
    call: impl FnOnce() -> ssize_t,
) -> ssize_t {
    if !fdbits::is_set(fd) {
        return call();
    }
    on_tracked(fd, call, |s, fileset, path, n| {
        let Ok(n) = usize::try_from(n) else { return };
        if n == 0 {
            return;
        }
        if let Some(at) = rec::written_at(s, fd, n, Some(offset)) {
            // SAFETY: the kernel just read `n` bytes from `buf`.
            let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), n) };
            s.emit(
                fileset,
                OpRef::Write {
                    path,
                    offset: at,
                    data,
                },
            );
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite(
    fd: c_int,
    buf: *const c_void,
    count: size_t,
    offset: off_t,
) -> ssize_t {
    let Some(real) = real::pwrite() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    pwrite_common(fd, buf, offset, || unsafe { real(fd, buf, count, offset) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    count: size_t,
    offset: off64_t,
) -> ssize_t {
    let Some(real) = real::pwrite64() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    pwrite_common(fd, buf, offset, || unsafe { real(fd, buf, count, offset) })
}

/// `offset` None: at the file position (writev, or pwritev2 with -1).
fn writev_common(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    offset: Option<i64>,
    force_append: bool,
    call: impl FnOnce() -> ssize_t,
) -> ssize_t {
    if !fdbits::is_set(fd) {
        return call();
    }
    on_tracked(fd, call, |s, fileset, path, n| {
        let Ok(n) = usize::try_from(n) else { return };
        if n == 0 {
            return;
        }
        let at = if force_append {
            rec::size(fd).and_then(|size| size.checked_sub(n as u64))
        } else {
            rec::written_at(s, fd, n, offset)
        };
        if let Some(at) = at {
            // SAFETY: the caller passed `iovcnt` valid iovecs, which the kernel just read.
            let bufs = unsafe { rec::io_slices(iov, iovcnt) };
            rec::emit_vectored(s, fileset, path, at, bufs, n);
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t {
    let Some(real) = real::writev() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    writev_common(fd, iov, iovcnt, None, false, || unsafe {
        real(fd, iov, iovcnt)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwritev(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
) -> ssize_t {
    let Some(real) = real::pwritev() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    writev_common(fd, iov, iovcnt, Some(offset), false, || unsafe {
        real(fd, iov, iovcnt, offset)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwritev64(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off64_t,
) -> ssize_t {
    let Some(real) = real::pwritev64() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    writev_common(fd, iov, iovcnt, Some(offset), false, || unsafe {
        real(fd, iov, iovcnt, offset)
    })
}

fn pwritev2_common(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    offset: i64,
    flags: c_int,
    call: impl FnOnce() -> ssize_t,
) -> ssize_t {
    let at = (offset != -1).then_some(offset);
    let append = flags & libc::RWF_APPEND != 0 && at.is_some();
    writev_common(fd, iov, iovcnt, at, append, call)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwritev2(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
    flags: c_int,
) -> ssize_t {
    let Some(real) = real::pwritev2() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    pwritev2_common(fd, iov, iovcnt, offset, flags, || unsafe {
        real(fd, iov, iovcnt, offset, flags)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwritev64v2(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off64_t,
    flags: c_int,
) -> ssize_t {
    let Some(real) = real::pwritev64v2() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    pwritev2_common(fd, iov, iovcnt, offset, flags, || unsafe {
        real(fd, iov, iovcnt, offset, flags)
    })
}

// ---- size and space ----------------------------------------------------------------------

fn ftruncate_common(fd: c_int, len: i64, call: impl FnOnce() -> c_int) -> c_int {
    if !fdbits::is_set(fd) {
        return call();
    }
    on_tracked(fd, call, |s, fileset, path, rc| {
        if rc == 0
            && let Ok(len) = u64::try_from(len)
        {
            s.emit(fileset, OpRef::Truncate { path, len });
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: off_t) -> c_int {
    let Some(real) = real::ftruncate() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    ftruncate_common(fd, len, || unsafe { real(fd, len) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: off64_t) -> c_int {
    let Some(real) = real::ftruncate64() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    ftruncate_common(fd, len, || unsafe { real(fd, len) })
}

/// Zeros for recording punched holes and zeroed ranges.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

fn fallocate_common(
    fd: c_int,
    mode: c_int,
    offset: i64,
    len: i64,
    call: impl FnOnce() -> c_int,
) -> c_int {
    if !fdbits::is_set(fd) {
        return call();
    }
    on_tracked(fd, call, |s, fileset, path, rc| {
        if rc != 0 {
            return;
        }
        if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            rec::resend_file(s, fileset, path, fd);
            return;
        }
        let Some(size) = rec::size(fd) else { return };
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            let (Ok(start), Ok(len)) = (u64::try_from(offset), u64::try_from(len)) else {
                return;
            };
            let end = start.saturating_add(len).min(size);
            let mut at = start;
            while at < end {
                let n = usize::try_from(end - at)
                    .unwrap_or(usize::MAX)
                    .min(ZEROS.len());
                s.emit(
                    fileset,
                    OpRef::Write {
                        path,
                        offset: at,
                        data: &ZEROS[..n],
                    },
                );
                at += n as u64;
            }
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            s.emit(fileset, OpRef::Truncate { path, len: size });
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, offset: off_t, len: off_t) -> c_int {
    let Some(real) = real::fallocate() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    fallocate_common(fd, mode, offset, len, || unsafe {
        real(fd, mode, offset, len)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fallocate64(
    fd: c_int,
    mode: c_int,
    offset: off64_t,
    len: off64_t,
) -> c_int {
    let Some(real) = real::fallocate64() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    fallocate_common(fd, mode, offset, len, || unsafe {
        real(fd, mode, offset, len)
    })
}

// posix_fallocate returns the error number instead of setting errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_fallocate(fd: c_int, offset: off_t, len: off_t) -> c_int {
    let Some(real) = real::posix_fallocate() else {
        return libc::ENOSYS;
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    fallocate_common(fd, 0, offset, len, || unsafe { real(fd, offset, len) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_fallocate64(fd: c_int, offset: off64_t, len: off64_t) -> c_int {
    let Some(real) = real::posix_fallocate64() else {
        return libc::ENOSYS;
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    fallocate_common(fd, 0, offset, len, || unsafe { real(fd, offset, len) })
}

// ---- copies into files -------------------------------------------------------------------

/// Reads `*ptr` or, when null, the descriptor's position.
fn offset_or_position(ptr: *const i64, fd: c_int) -> Option<u64> {
    if ptr.is_null() {
        rec::position(fd)
    } else {
        // SAFETY: non-null offset pointers passed to copy calls point to a valid offset.
        u64::try_from(unsafe { *ptr }).ok()
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn copy_file_range(
    fd_in: c_int,
    off_in: *mut off64_t,
    fd_out: c_int,
    off_out: *mut off64_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    let Some(real) = real::copy_file_range() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let call = || unsafe { real(fd_in, off_in, fd_out, off_out, len, flags) };
    if !fdbits::is_set(fd_out) {
        return call();
    }
    // Both starting offsets are read under the lock, before the call moves them.
    let starts = Cell::new(None);
    on_tracked(
        fd_out,
        || {
            starts.set(Some((
                offset_or_position(off_in, fd_in),
                offset_or_position(off_out, fd_out),
            )));
            call()
        },
        |s, fileset, path, n| {
            let (Ok(n), Some((Some(src), Some(dst)))) = (u64::try_from(n), starts.get()) else {
                return;
            };
            if n > 0
                && let Some(reader) = Reader::new(fd_in)
            {
                rec::copy_back(s, fileset, path, &reader, src, dst, n);
            }
        },
    )
}

fn sendfile_common(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut i64,
    call: impl FnOnce() -> ssize_t,
) -> ssize_t {
    if !fdbits::is_set(out_fd) {
        return call();
    }
    let src = Cell::new(None);
    on_tracked(
        out_fd,
        || {
            src.set(offset_or_position(offset, in_fd));
            call()
        },
        |s, fileset, path, n| {
            let (Ok(n), Some(src)) = (usize::try_from(n), src.get()) else {
                return;
            };
            if n > 0
                && let Some(dst) = rec::written_at(s, out_fd, n, None)
                && let Some(reader) = Reader::new(in_fd)
            {
                rec::copy_back(s, fileset, path, &reader, src, dst, n as u64);
            }
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut off_t,
    count: size_t,
) -> ssize_t {
    let Some(real) = real::sendfile() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    sendfile_common(out_fd, in_fd, offset, || unsafe {
        real(out_fd, in_fd, offset, count)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile64(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut off64_t,
    count: size_t,
) -> ssize_t {
    let Some(real) = real::sendfile64() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    sendfile_common(out_fd, in_fd, offset, || unsafe {
        real(out_fd, in_fd, offset, count)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut off64_t,
    fd_out: c_int,
    off_out: *mut off64_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    let Some(real) = real::splice() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let call = || unsafe { real(fd_in, off_in, fd_out, off_out, len, flags) };
    if !fdbits::is_set(fd_out) {
        return call();
    }
    let dst = Cell::new(None);
    on_tracked(
        fd_out,
        || {
            dst.set(offset_or_position(off_out, fd_out));
            call()
        },
        |s, fileset, path, n| {
            // The source is usually a pipe, already drained: read the bytes back from the file.
            let (Ok(n), Some(dst)) = (u64::try_from(n), dst.get()) else {
                return;
            };
            if n > 0
                && let Some(reader) = Reader::new(fd_out)
            {
                rec::copy_back(s, fileset, path, &reader, dst, dst, n);
            }
        },
    )
}

/// ioctl: only reflink clones into a tracked file change its bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    let Some(real) = real::ioctl() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged (the third is passed through as the
    // pointer-sized value the caller put there).
    let call = || unsafe { real(fd, request, arg) };
    if !fdbits::is_set(fd) || (request != libc::FICLONE && request != libc::FICLONERANGE) {
        return call();
    }
    on_tracked(fd, call, |s, fileset, path, rc| {
        if rc != 0 {
            return;
        }
        if request == libc::FICLONE {
            rec::resend_file(s, fileset, path, fd);
            return;
        }
        // SAFETY: FICLONERANGE's argument is a file_clone_range the kernel just read.
        let range = unsafe { *arg.cast::<libc::file_clone_range>() };
        let Ok(src_fd) = c_int::try_from(range.src_fd) else {
            return;
        };
        let Some(reader) = Reader::new(src_fd) else {
            return;
        };
        let len = if range.src_length == 0 {
            rec::size(src_fd).map_or(0, |size| size.saturating_sub(range.src_offset))
        } else {
            range.src_length
        };
        rec::copy_back(
            s,
            fileset,
            path,
            &reader,
            range.src_offset,
            range.dest_offset,
            len,
        );
    })
}

// ---- durability --------------------------------------------------------------------------

fn sync_common(fd: c_int, call: impl FnOnce() -> c_int) -> c_int {
    if state::get().is_none() {
        return call();
    }
    // The real fsync runs outside the lock: it may take long and orders nothing.
    let rc = call();
    if rc == 0 {
        let errno = Errno::save();
        on_any_fd(
            fd,
            || 0,
            |_| true,
            |s, fileset, path| {
                s.emit(fileset, OpRef::Fsync { path });
            },
        );
        errno.restore();
    }
    rc
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    let Some(real) = real::fsync() else {
        return missing();
    };
    // SAFETY: the caller's argument, forwarded unchanged.
    sync_common(fd, || unsafe { real(fd) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    let Some(real) = real::fdatasync() else {
        return missing();
    };
    // SAFETY: the caller's argument, forwarded unchanged.
    sync_common(fd, || unsafe { real(fd) })
}

// ---- descriptor table --------------------------------------------------------------------

/// Closes `fd` (also the stdio cookies' close).
pub(crate) fn close_fd(fd: c_int) -> c_int {
    let Some(real) = real::close() else {
        return missing();
    };
    // SAFETY: the caller's argument, forwarded unchanged.
    let call = || unsafe { real(fd) };
    if !fdbits::is_set(fd) {
        return call();
    }
    let (Some(shim), Some(_inside)) = (state::get(), reentry::enter()) else {
        return call();
    };
    let mut session = shim.session();
    // Linux releases the descriptor even when close reports an error.
    let rc = call();
    let errno = Errno::save();
    shielded(|| session.tracked_mut().untrack(fd));
    drop(session);
    errno.restore();
    rc
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    close_fd(fd)
}

fn forget_range(first: c_int, last: c_int) {
    let (Some(shim), Some(_inside)) = (state::get(), reentry::enter()) else {
        return;
    };
    let errno = Errno::save();
    shielded(|| shim.session().tracked_mut().untrack_range(first, last));
    errno.restore();
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let Some(real) = real::close_range() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let rc = unsafe { real(first, last, flags) };
    let cloexec_only = u32::try_from(flags).is_ok_and(|f| f & libc::CLOSE_RANGE_CLOEXEC != 0);
    if rc == 0 && !cloexec_only {
        let clamp = |v: c_uint| c_int::try_from(v).unwrap_or(c_int::MAX);
        forget_range(clamp(first), clamp(last));
    }
    rc
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(lowfd: c_int) {
    let Some(real) = real::closefrom() else {
        return;
    };
    // SAFETY: the caller's argument, forwarded unchanged.
    unsafe { real(lowfd) };
    forget_range(lowfd.max(0), c_int::MAX);
}

/// A dup-like call made `new` a copy of `old` (or failed).
fn dup_common(old: c_int, new_hint: Option<c_int>, call: impl FnOnce() -> c_int) -> c_int {
    let watched = fdbits::is_set(old) || new_hint.is_some_and(fdbits::is_set);
    if !watched {
        let fd = call();
        fresh_fd(fd);
        return fd;
    }
    let (Some(shim), Some(_inside)) = (state::get(), reentry::enter()) else {
        return call();
    };
    let mut session = shim.session();
    let fd = call();
    let errno = Errno::save();
    if fd >= 0 {
        shielded(|| {
            session.tracked_mut().share(old, fd);
            if (fd == libc::STDOUT_FILENO || fd == libc::STDERR_FILENO)
                && session.tracked().desc(fd).is_some()
            {
                crate::stdio::mirror_std_stream(&mut session, fd);
            }
        });
    }
    drop(session);
    errno.restore();
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    let Some(real) = real::dup() else {
        return missing();
    };
    // SAFETY: the caller's argument, forwarded unchanged.
    dup_common(old, None, || unsafe { real(old) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let Some(real) = real::dup2() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    dup_common(old, Some(new), || unsafe { real(old, new) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let Some(real) = real::dup3() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    dup_common(old, Some(new), || unsafe { real(old, new, flags) })
}

fn fcntl_common(fd: c_int, cmd: c_int, call: impl FnOnce() -> c_int) -> c_int {
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        dup_common(fd, None, call)
    } else if cmd == libc::F_SETFL && fdbits::is_set(fd) {
        // O_APPEND may have changed: the tracked description keeps it (see `Desc::appends`).
        on_tracked(fd, call, |s, _, _, rc| {
            if rc == 0
                && let Some(desc) = s.tracked().desc(fd)
            {
                desc.appends.set(rec::appends(fd));
            }
        })
    } else {
        call()
    }
}

// The third argument is passed through as the pointer-sized value the caller put there (an
// int, a pointer or nothing, depending on `cmd`), exactly as glibc's own fcntl reads it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let Some(real) = real::fcntl() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    fcntl_common(fd, cmd, || unsafe { real(fd, cmd, arg) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let Some(real) = real::fcntl64() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    fcntl_common(fd, cmd, || unsafe { real(fd, cmd, arg) })
}
