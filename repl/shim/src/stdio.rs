//! stdio: glibc's streams write through its internal `__write`, which no preloaded wrapper
//! sees. So a stream opened for writing on a file in a fileset is replaced by a
//! `fopencookie` stream whose write/seek/close go through the shim's descriptor wrappers
//! (fwrite, fputs, fprintf, putc, fflush, fclose... then all reach the ring, in order), and
//! `fileno` is wrapped so it still returns the real descriptor.
//!
//! Streams that cannot be swapped (freopen keeps the caller's FILE object, stdout/stderr
//! inherited on a tracked file, `,ccs=` modes) are *mirrored*: their new bytes are read back
//! from the file at fflush, fclose, seeks and exit. Lock order: glibc's stream and list locks
//! before the shim's; this module never calls into stdio while holding the shim's lock.

#![allow(clippy::missing_safety_doc)]

use std::ffi::{CStr, c_void};
use std::sync::atomic::Ordering;

use ft::replog::OpRef;
use libc::{FILE, c_char, c_int, off_t, off64_t, size_t, ssize_t};

use crate::canon;
use crate::diag::{self, Trouble};
use crate::fdbits;
use crate::fdops::{self, write_tracked};
use crate::real;
use crate::rec::{self, MODE_BITS, Reader, shielded};
use crate::reentry::{self, Errno};
use crate::state::{self, COOKIE_STREAMS, MIRROR_STREAMS, Session, Stream};

#[repr(C)]
struct CookieIoFunctions {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, size_t) -> ssize_t>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, size_t) -> ssize_t>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut off64_t, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

unsafe extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, funcs: CookieIoFunctions)
    -> *mut FILE;
    static mut stdout: *mut FILE;
    static mut stderr: *mut FILE;
}

/// The state behind one of our cookie streams.
struct Cookie {
    fd: c_int,
    file: *mut FILE,
}

/// A parsed fopen mode (glibc's rules: r/w/a, then up to six of `+xbmce`, then `,ccs=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    kind: u8,
    plus: bool,
    cloexec: bool,
    ccs: bool,
}

impl Mode {
    fn parse(mode: &CStr) -> Option<Self> {
        let bytes = mode.to_bytes();
        let kind = *bytes.first()?;
        if !matches!(kind, b'r' | b'w' | b'a') {
            return None;
        }
        let mut parsed = Mode {
            kind,
            plus: false,
            cloexec: false,
            ccs: false,
        };
        for &b in bytes.iter().skip(1).take(6) {
            match b {
                b'+' => parsed.plus = true,
                b'e' => parsed.cloexec = true,
                b',' => break,
                _ => {}
            }
        }
        parsed.ccs = bytes.windows(5).any(|w| w == b",ccs=");
        Some(parsed)
    }

    fn writes(self) -> bool {
        self.kind != b'r' || self.plus
    }

    fn reads(self) -> bool {
        self.kind == b'r' || self.plus
    }

    /// The mode string for fopencookie (which only reads the kind and `+`).
    fn cookie_mode(self) -> &'static CStr {
        match (self.kind, self.plus) {
            (b'r', false) => c"r",
            (b'r', true) => c"r+",
            (b'w', false) => c"w",
            (b'w', true) => c"w+",
            (_, false) => c"a",
            (_, true) => c"a+",
        }
    }
}

unsafe extern "C" fn cookie_read(cookie: *mut c_void, buf: *mut c_char, size: size_t) -> ssize_t {
    // SAFETY: glibc passes back the cookie we gave fopencookie, alive until cookie_close.
    let fd = unsafe { (*cookie.cast::<Cookie>()).fd };
    // SAFETY: glibc's buffer is valid for `size` bytes; read is not wrapped.
    unsafe { libc::read(fd, buf.cast(), size) }
}

unsafe extern "C" fn cookie_write(
    cookie: *mut c_void,
    buf: *const c_char,
    size: size_t,
) -> ssize_t {
    // SAFETY: as in cookie_read.
    let fd = unsafe { (*cookie.cast::<Cookie>()).fd };
    // glibc's own file streams retry short writes and count any shortfall as an error; a
    // cookie reports errors as 0 bytes (never negative) with errno set.
    let mut done = 0usize;
    while done < size {
        // SAFETY: `buf` is valid for `size` bytes, so `buf + done` for `size - done`.
        let n = write_tracked(fd, unsafe { buf.add(done) }.cast(), size - done);
        match usize::try_from(n) {
            Ok(n) if n > 0 => done += n,
            _ => break,
        }
    }
    ssize_t::try_from(done).unwrap_or(ssize_t::MAX)
}

unsafe extern "C" fn cookie_seek(cookie: *mut c_void, pos: *mut off64_t, whence: c_int) -> c_int {
    // SAFETY: as in cookie_read.
    let fd = unsafe { (*cookie.cast::<Cookie>()).fd };
    // SAFETY: glibc passes a valid position to read and update.
    let at = unsafe { libc::lseek64(fd, *pos, whence) };
    if at < 0 {
        return -1;
    }
    // SAFETY: as above.
    unsafe { *pos = at };
    0
}

unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    // SAFETY: glibc calls close once, last; the cookie came from Box::into_raw in `wrap`.
    let cookie = unsafe { Box::from_raw(cookie.cast::<Cookie>()) };
    if let (Some(shim), Some(_inside)) = (state::get(), reentry::enter()) {
        let errno = Errno::save();
        shielded(|| {
            shim.session().tracked_mut().remove_stream(cookie.file);
        });
        errno.restore();
    }
    fdops::close_fd(cookie.fd)
}

/// Puts a cookie stream over the tracked descriptor `fd`; null (errno set) on failure. Must be
/// called without the shim's lock (fopencookie takes glibc's list lock).
fn wrap(fd: c_int, mode: Mode) -> *mut FILE {
    let cookie = Box::into_raw(Box::new(Cookie {
        fd,
        file: std::ptr::null_mut(),
    }));
    let funcs = CookieIoFunctions {
        read: Some(cookie_read),
        write: Some(cookie_write),
        seek: Some(cookie_seek),
        close: Some(cookie_close),
    };
    // SAFETY: the cookie outlives the stream (freed in cookie_close); the mode is a literal.
    let file = unsafe { fopencookie(cookie.cast(), mode.cookie_mode().as_ptr(), funcs) };
    if file.is_null() {
        // SAFETY: fopencookie failed, so glibc never saw the cookie: it is still ours.
        drop(unsafe { Box::from_raw(cookie) });
        return file;
    }
    // SAFETY: the cookie is alive, and no callback can run before we return the stream.
    unsafe { (*cookie).file = file };
    file
}

/// The real descriptor of a glibc file stream (−1 for ours and other cookie streams).
fn real_fileno(file: *mut FILE) -> c_int {
    match real::fileno() {
        // SAFETY: `file` is a stream the caller passed to a stdio function.
        Some(f) => unsafe { f(file) },
        None => -1,
    }
}

/// After glibc opened `file` for `mode`: in a fileset, log Create/Truncate, track the
/// descriptor, and return a cookie stream in its place (or mirror it).
fn opened_stream(file: *mut FILE, mode: *const c_char) -> *mut FILE {
    if file.is_null() || mode.is_null() {
        return file;
    }
    let Some(shim) = state::get() else {
        return file;
    };
    // SAFETY: a non-null mode argument is a NUL-terminated string.
    let Some(mode) = Mode::parse(unsafe { CStr::from_ptr(mode) }) else {
        return file;
    };
    if !mode.writes() {
        return file;
    }
    let Some(_inside) = reentry::enter() else {
        return file;
    };
    let errno = Errno::save();
    let fd = real_fileno(file);
    if fdbits::is_set(fd) {
        // A stale entry: the number was closed where no wrapper saw it.
        shim.session().tracked_mut().untrack(fd);
    }
    let classified = (fd >= 0)
        .then(|| canon::fstat(fd))
        .flatten()
        .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink > 0)
        .and_then(|st| Some((st, canon::fd_path(fd)?)));
    let Some((st, canon)) = classified else {
        errno.restore();
        return file;
    };
    let Some((fileset, rel)) = shim.classify_canon(&canon) else {
        errno.restore();
        return file;
    };
    // Swap in a cookie stream on a duplicate of the descriptor (closing glibc's stream closes
    // the original). Nothing is buffered yet, so nothing is lost.
    let mut result = file;
    let mut fd_used = fd;
    let mut mirrored = true;
    if !mode.ccs {
        let cmd = if mode.cloexec {
            libc::F_DUPFD_CLOEXEC
        } else {
            libc::F_DUPFD
        };
        // SAFETY: duplicating a descriptor we just checked; raw, so no wrapper runs.
        let dup = unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, 0) };
        if let Ok(dup) = c_int::try_from(dup)
            && dup >= 0
        {
            let cookie = wrap(dup, mode);
            if cookie.is_null() {
                // SAFETY: our own duplicate, closed once.
                unsafe { libc::syscall(libc::SYS_close, dup) };
            } else {
                if let Some(real_fclose) = real::fclose() {
                    // SAFETY: glibc's stream, which nobody else has seen yet.
                    unsafe { real_fclose(file) };
                }
                result = cookie;
                fd_used = dup;
                mirrored = false;
            }
        }
        if mirrored {
            diag::report(
                Trouble::Stream,
                format_args!(
                    "cannot give a stdio stream a tracking cookie; it is replicated at fflush/fclose instead"
                ),
            );
        }
    }
    let mut session = shim.session();
    shielded(|| {
        if mode.kind != b'r' {
            session.emit(
                fileset,
                OpRef::Create {
                    path: rel,
                    mode: st.st_mode & MODE_BITS,
                },
            );
        }
        if mode.kind == b'w' {
            session.emit(fileset, OpRef::Truncate { path: rel, len: 0 });
        }
        let tracked = session.tracked_mut();
        if tracked.track(fd_used, fileset, rel.to_vec()) {
            let stream = if mirrored {
                Stream::Mirror {
                    fd: fd_used,
                    mark: rec::position(fd_used).unwrap_or(0),
                }
            } else {
                Stream::Cookie { fd: fd_used }
            };
            tracked.set_stream(result, stream);
        }
    });
    drop(session);
    errno.restore();
    result
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut FILE {
    let Some(real) = real::fopen() else {
        reentry::set_errno(libc::ENOSYS);
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let file = unsafe { real(path, mode) };
    opened_stream(file, mode)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE {
    let Some(real) = real::fopen64() else {
        reentry::set_errno(libc::ENOSYS);
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let file = unsafe { real(path, mode) };
    opened_stream(file, mode)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdopen(fd: c_int, mode: *const c_char) -> *mut FILE {
    let Some(real) = real::fdopen() else {
        reentry::set_errno(libc::ENOSYS);
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let call = || unsafe { real(fd, mode) };
    // Every stream over a tracked descriptor becomes a cookie stream, so that its fclose
    // closes the descriptor where the shim sees it.
    if !fdbits::is_set(fd) || mode.is_null() {
        return call();
    }
    let (Some(_shim), Some(_inside)) = (state::get(), reentry::enter()) else {
        return call();
    };
    // SAFETY: a non-null mode is a NUL-terminated string.
    let parsed = Mode::parse(unsafe { CStr::from_ptr(mode) });
    let Some(parsed) = parsed.filter(|m| !m.ccs) else {
        return call();
    };
    // glibc's checks and its O_APPEND adjustment for "a", then our stream.
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) };
    let Ok(flags) = c_int::try_from(flags) else {
        return call();
    };
    if flags < 0 {
        reentry::set_errno(libc::EBADF);
        return std::ptr::null_mut();
    }
    let access = flags & libc::O_ACCMODE;
    if (access == libc::O_RDONLY && parsed.writes()) || (access == libc::O_WRONLY && parsed.reads())
    {
        reentry::set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    if parsed.kind == b'a' && flags & libc::O_APPEND == 0 {
        // SAFETY: F_SETFL on the caller's descriptor, as glibc's fdopen does for "a".
        let rc =
            unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFL, flags | libc::O_APPEND) };
        if rc < 0 {
            return std::ptr::null_mut();
        }
    }
    let file = wrap(fd, parsed);
    if !file.is_null()
        && let Some(shim) = state::get()
    {
        let errno = Errno::save();
        shielded(|| {
            shim.session()
                .tracked_mut()
                .set_stream(file, Stream::Cookie { fd })
        });
        errno.restore();
    }
    file
}

fn freopen_common(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut FILE,
    call: impl FnOnce() -> *mut FILE,
) -> *mut FILE {
    let (Some(shim), Some(inside)) = (state::get(), reentry::enter()) else {
        return call();
    };
    // glibc closes the old descriptor internally (our cookies' close callback still runs).
    if MIRROR_STREAMS.load(Ordering::Relaxed) > 0 {
        drop(inside);
        sync_mirror(stream, true);
    } else {
        drop(inside);
    }
    let old_fd = real_fileno(stream);
    if old_fd >= 0
        && fdbits::is_set(old_fd)
        && let Some(_inside) = reentry::enter()
    {
        let errno = Errno::save();
        let mut session = shim.session();
        session.tracked_mut().remove_stream(stream);
        session.tracked_mut().untrack(old_fd);
        drop(session);
        errno.restore();
    }
    let file = call();
    if file.is_null() || path.is_null() {
        return file;
    }
    // SAFETY: a non-null mode is a NUL-terminated string.
    let Some(parsed) = (!mode.is_null())
        .then(|| Mode::parse(unsafe { CStr::from_ptr(mode) }))
        .flatten()
    else {
        return file;
    };
    if !parsed.writes() {
        return file;
    }
    let Some(_inside) = reentry::enter() else {
        return file;
    };
    let errno = Errno::save();
    let fd = real_fileno(file);
    if fd >= 0 {
        let cloexec = if parsed.cloexec { libc::O_CLOEXEC } else { 0 };
        let flags = match parsed.kind {
            b'w' => libc::O_CREAT | libc::O_TRUNC,
            b'a' => libc::O_CREAT | libc::O_APPEND,
            _ => 0,
        } | cloexec
            | if parsed.plus {
                libc::O_RDWR
            } else if parsed.kind == b'r' {
                libc::O_RDONLY
            } else {
                libc::O_WRONLY
            };
        fdops::adopt(shim, fd, flags, true);
        let mut session = shim.session();
        if session.tracked().desc(fd).is_some() {
            let mark = rec::position(fd).unwrap_or(0);
            session
                .tracked_mut()
                .set_stream(file, Stream::Mirror { fd, mark });
        }
    }
    errno.restore();
    file
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn freopen(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut FILE,
) -> *mut FILE {
    let Some(real) = real::freopen() else {
        reentry::set_errno(libc::ENOSYS);
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    freopen_common(path, mode, stream, || unsafe { real(path, mode, stream) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn freopen64(
    path: *const c_char,
    mode: *const c_char,
    stream: *mut FILE,
) -> *mut FILE {
    let Some(real) = real::freopen64() else {
        reentry::set_errno(libc::ENOSYS);
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    freopen_common(path, mode, stream, || unsafe { real(path, mode, stream) })
}

/// fileno of one of our cookie streams: the tracked descriptor behind it.
fn cookie_fileno(file: *mut FILE, real_result: c_int, errno_before: Errno) -> c_int {
    if real_result >= 0 || COOKIE_STREAMS.load(Ordering::Relaxed) == 0 {
        return real_result;
    }
    let (Some(shim), Some(_inside)) = (state::get(), reentry::enter()) else {
        return real_result;
    };
    match shim.session().tracked().stream(file) {
        Some(Stream::Cookie { fd }) => {
            errno_before.restore();
            fd
        }
        _ => real_result,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fileno(file: *mut FILE) -> c_int {
    let Some(real) = real::fileno() else {
        return fdops::missing();
    };
    let before = Errno::save();
    // SAFETY: the caller's argument, forwarded unchanged.
    let fd = unsafe { real(file) };
    cookie_fileno(file, fd, before)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fileno_unlocked(file: *mut FILE) -> c_int {
    let Some(real) = real::fileno_unlocked() else {
        return fdops::missing();
    };
    let before = Errno::save();
    // SAFETY: the caller's argument, forwarded unchanged.
    let fd = unsafe { real(file) };
    cookie_fileno(file, fd, before)
}

// ---- mirrored streams ----------------------------------------------------------------------

/// Logs what a mirrored stream wrote since its mark, flushing it first if `flush` (never with
/// the shim's lock held: fflush takes the stream's lock).
fn sync_mirror(file: *mut FILE, flush: bool) {
    let Some(shim) = state::get() else {
        return;
    };
    if file.is_null() || MIRROR_STREAMS.load(Ordering::Relaxed) == 0 {
        return;
    }
    if flush && let Some(real_fflush) = real::fflush() {
        // SAFETY: a stream the application passed to a stdio call (or stdout/stderr).
        unsafe { real_fflush(file) };
    }
    let Some(_inside) = reentry::enter() else {
        return;
    };
    let errno = Errno::save();
    let mut session = shim.session();
    shielded(|| log_mirror(&mut session, file));
    drop(session);
    errno.restore();
}

fn log_mirror(session: &mut Session<'_>, file: *mut FILE) {
    let Some(Stream::Mirror { fd, mark }) = session.tracked().stream(file) else {
        return;
    };
    let Some(desc) = session.tracked().desc(fd) else {
        return;
    };
    let (fileset, path) = (desc.fileset, desc.path.clone());
    let now = if rec::appends(fd) {
        rec::size(fd)
    } else {
        rec::position(fd)
    };
    let Some(now) = now else { return };
    if now > mark {
        if let Some(reader) = Reader::new(fd) {
            rec::copy_back(session, fileset, &path, &reader, mark, mark, now - mark);
        }
    } else if now < mark {
        // The position moved back where no wrapper saw it: send the whole file.
        rec::resend_file(session, fileset, &path, fd);
    }
    session
        .tracked_mut()
        .set_stream(file, Stream::Mirror { fd, mark: now });
}

/// Makes stdout/stderr mirrored streams when their descriptor became tracked (dup2 onto 1/2,
/// or inherited at startup). Called with the lock held: only reads the FILE pointers.
pub(crate) fn mirror_std_stream(session: &mut Session<'_>, fd: c_int) {
    // SAFETY: reading glibc's stdout/stderr pointers (set before any constructor runs).
    let file = unsafe {
        match fd {
            libc::STDOUT_FILENO => stdout,
            libc::STDERR_FILENO => stderr,
            _ => return,
        }
    };
    if file.is_null() || real_fileno(file) != fd {
        return;
    }
    let mark = rec::position(fd).unwrap_or(0);
    session
        .tracked_mut()
        .set_stream(file, Stream::Mirror { fd, mark });
}

/// Logs every mirrored stream, flushing each first (exit, fflush(NULL)).
pub(crate) fn sync_all_mirrors(flush: bool) {
    if MIRROR_STREAMS.load(Ordering::Relaxed) == 0 {
        return;
    }
    let Some(shim) = state::get() else {
        return;
    };
    let mirrors = {
        let Some(_inside) = reentry::enter() else {
            return;
        };
        shim.session().tracked().mirrors()
    };
    for (file, _) in mirrors {
        sync_mirror(file as *mut FILE, flush);
    }
}

fn is_mirror(file: *mut FILE) -> bool {
    if MIRROR_STREAMS.load(Ordering::Relaxed) == 0 || file.is_null() {
        return false;
    }
    let (Some(shim), Some(_inside)) = (state::get(), reentry::enter()) else {
        return false;
    };
    matches!(
        shim.session().tracked().stream(file),
        Some(Stream::Mirror { .. })
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fflush(file: *mut FILE) -> c_int {
    let Some(real) = real::fflush() else {
        return fdops::missing();
    };
    // SAFETY: the caller's argument, forwarded unchanged.
    let rc = unsafe { real(file) };
    if MIRROR_STREAMS.load(Ordering::Relaxed) > 0 {
        let errno = Errno::save();
        if file.is_null() {
            sync_all_mirrors(false);
        } else {
            sync_mirror(file, false);
        }
        errno.restore();
    }
    rc
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fflush_unlocked(file: *mut FILE) -> c_int {
    let Some(real) = real::fflush_unlocked() else {
        return fdops::missing();
    };
    // SAFETY: the caller's argument, forwarded unchanged.
    let rc = unsafe { real(file) };
    if MIRROR_STREAMS.load(Ordering::Relaxed) > 0 {
        let errno = Errno::save();
        if file.is_null() {
            sync_all_mirrors(false);
        } else {
            sync_mirror(file, false);
        }
        errno.restore();
    }
    rc
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fclose(file: *mut FILE) -> c_int {
    let Some(real) = real::fclose() else {
        return fdops::missing();
    };
    if is_mirror(file) {
        let errno = Errno::save();
        sync_mirror(file, true);
        if let (Some(shim), Some(_inside)) = (state::get(), reentry::enter()) {
            let fd = real_fileno(file);
            let mut session = shim.session();
            session.tracked_mut().remove_stream(file);
            // glibc closes the descriptor internally.
            session.tracked_mut().untrack(fd);
        }
        errno.restore();
    }
    // SAFETY: the caller's argument, forwarded unchanged.
    unsafe { real(file) }
}

/// A seek on a mirrored stream: log what was written before it, restart the mark after it.
fn around_seek(file: *mut FILE, call: impl FnOnce() -> c_int) -> c_int {
    if !is_mirror(file) {
        return call();
    }
    let errno = Errno::save();
    sync_mirror(file, true);
    errno.restore();
    let rc = call();
    let errno = Errno::save();
    if let (Some(shim), Some(_inside)) = (state::get(), reentry::enter()) {
        let mut session = shim.session();
        if let Some(Stream::Mirror { fd, .. }) = session.tracked().stream(file)
            && let Some(mark) = rec::position(fd)
        {
            session
                .tracked_mut()
                .set_stream(file, Stream::Mirror { fd, mark });
        }
    }
    errno.restore();
    rc
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fseek(file: *mut FILE, offset: libc::c_long, whence: c_int) -> c_int {
    let Some(real) = real::fseek() else {
        return fdops::missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    around_seek(file, || unsafe { real(file, offset, whence) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fseeko(file: *mut FILE, offset: off_t, whence: c_int) -> c_int {
    let Some(real) = real::fseeko() else {
        return fdops::missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    around_seek(file, || unsafe { real(file, offset, whence) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fseeko64(file: *mut FILE, offset: off64_t, whence: c_int) -> c_int {
    let Some(real) = real::fseeko64() else {
        return fdops::missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    around_seek(file, || unsafe { real(file, offset, whence) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsetpos(file: *mut FILE, pos: *const libc::fpos_t) -> c_int {
    let Some(real) = real::fsetpos() else {
        return fdops::missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    around_seek(file, || unsafe { real(file, pos) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsetpos64(file: *mut FILE, pos: *const libc::fpos64_t) -> c_int {
    let Some(real) = real::fsetpos64() else {
        return fdops::missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    around_seek(file, || unsafe { real(file, pos) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn rewind(file: *mut FILE) {
    let Some(real) = real::rewind() else {
        return;
    };
    around_seek(file, || {
        // SAFETY: the caller's argument, forwarded unchanged.
        unsafe { real(file) };
        0
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_like_glibc() {
        let m = |s: &CStr| Mode::parse(s);
        assert_eq!(m(c"r").map(Mode::writes), Some(false));
        assert_eq!(m(c"rb+").map(Mode::writes), Some(true));
        assert_eq!(
            m(c"w").map(|m| (m.writes(), m.reads())),
            Some((true, false))
        );
        assert_eq!(
            m(c"a+e").map(|m| (m.reads(), m.cloexec)),
            Some((true, true))
        );
        assert_eq!(m(c"w,ccs=UTF-8").map(|m| m.ccs), Some(true));
        assert!(m(c"x").is_none());
        assert!(m(c"").is_none());
        assert_eq!(m(c"wx").map(Mode::cookie_mode), Some(c"w"));
        assert_eq!(m(c"r+b").map(Mode::cookie_mode), Some(c"r+"));
    }
}
