//! The exported wrappers of path-based calls: rename, unlink, mkdir, rmdir, symlink, link,
//! chmod, truncate and the utimes family.
//!
//! Entries are resolved before the call (the canonical parent plus the final name, or the
//! canonical target for calls that follow a final symlink), while they exist. A path outside
//! every fileset costs the resolution and nothing else: no lock, no allocation.

#![allow(clippy::missing_safety_doc)]

use std::cell::Cell;
use std::ffi::{CStr, c_void};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use ft::replog::OpRef;
use libc::{c_char, c_int, c_uint, mode_t, off_t, off64_t, size_t};

use crate::canon::{self, Canon};
use crate::fdops::missing;
use crate::real;
use crate::rec::{self, MODE_BITS, on_any_fd, on_entry, shielded};
use crate::reentry::{self, Errno};
use crate::state::{self, Session};

/// Borrows a C path argument; `None` for NULL.
fn cpath<'a>(path: *const c_char) -> Option<&'a CStr> {
    // SAFETY: a non-null path argument of a libc call is a NUL-terminated string that lives
    // for the call.
    (!path.is_null()).then(|| unsafe { CStr::from_ptr(path) })
}

fn is_zero(rc: c_int) -> bool {
    rc == 0
}

/// The entry `path` names relative to `dirfd` (final symlink not followed).
fn entry(dirfd: c_int, path: *const c_char) -> Option<Canon> {
    canon::entry_path(dirfd, cpath(path)?)
}

/// What `path` refers to relative to `dirfd`, following a final symlink if `follow`.
fn target(dirfd: c_int, path: *const c_char, follow: bool) -> Option<Canon> {
    canon::target_path(dirfd, cpath(path)?, follow)
}

// ---- unlink, rmdir, remove ---------------------------------------------------------------

fn record_unlink(s: &mut Session<'_>, fileset: usize, rel: &[u8]) {
    s.emit(fileset, OpRef::Unlink { path: rel });
    s.tracked_mut().forget_path(fileset, rel);
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
    let Some(real) = real::unlink() else {
        return missing();
    };
    on_entry(
        || entry(libc::AT_FDCWD, path),
        // SAFETY: the caller's argument, forwarded unchanged.
        || unsafe { real(path) },
        is_zero,
        |s, fileset, rel, _| record_unlink(s, fileset, rel),
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn unlinkat(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    let Some(real) = real::unlinkat() else {
        return missing();
    };
    on_entry(
        || entry(dirfd, path),
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(dirfd, path, flags) },
        is_zero,
        |s, fileset, rel, _| {
            if flags & libc::AT_REMOVEDIR != 0 {
                s.emit(fileset, OpRef::Rmdir { path: rel });
            } else {
                record_unlink(s, fileset, rel);
            }
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn rmdir(path: *const c_char) -> c_int {
    let Some(real) = real::rmdir() else {
        return missing();
    };
    on_entry(
        || entry(libc::AT_FDCWD, path),
        // SAFETY: the caller's argument, forwarded unchanged.
        || unsafe { real(path) },
        is_zero,
        |s, fileset, rel, _| s.emit(fileset, OpRef::Rmdir { path: rel }),
    )
}

// glibc's remove() unlinks or rmdirs through internal calls no wrapper sees.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn remove(path: *const c_char) -> c_int {
    let Some(real) = real::remove() else {
        return missing();
    };
    let was_dir = Cell::new(false);
    on_entry(
        || {
            let canon = entry(libc::AT_FDCWD, path)?;
            let is_dir =
                std::fs::symlink_metadata(rec::canon_path(&canon)).is_ok_and(|m| m.is_dir());
            was_dir.set(is_dir);
            Some(canon)
        },
        // SAFETY: the caller's argument, forwarded unchanged.
        || unsafe { real(path) },
        is_zero,
        |s, fileset, rel, _| {
            if was_dir.get() {
                s.emit(fileset, OpRef::Rmdir { path: rel });
            } else {
                record_unlink(s, fileset, rel);
            }
        },
    )
}

// ---- mkdir, mkdtemp, symlink -------------------------------------------------------------

fn record_mkdir(s: &Session<'_>, fileset: usize, rel: &[u8], canon: &Canon, requested: mode_t) {
    // The mode after umask is what the directory really got.
    let mode = std::fs::symlink_metadata(rec::canon_path(canon))
        .map_or(requested & MODE_BITS, |m| {
            m.permissions().mode() & MODE_BITS
        });
    s.emit(fileset, OpRef::Mkdir { path: rel, mode });
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdir(path: *const c_char, mode: mode_t) -> c_int {
    let Some(real) = real::mkdir() else {
        return missing();
    };
    on_entry(
        || entry(libc::AT_FDCWD, path),
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(path, mode) },
        is_zero,
        |s, fileset, rel, canon| record_mkdir(s, fileset, rel, canon, mode),
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdirat(dirfd: c_int, path: *const c_char, mode: mode_t) -> c_int {
    let Some(real) = real::mkdirat() else {
        return missing();
    };
    on_entry(
        || entry(dirfd, path),
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(dirfd, path, mode) },
        is_zero,
        |s, fileset, rel, canon| record_mkdir(s, fileset, rel, canon, mode),
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mkdtemp(template: *mut c_char) -> *mut c_char {
    let Some(real) = real::mkdtemp() else {
        reentry::set_errno(libc::ENOSYS);
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's argument, forwarded unchanged.
    let made = unsafe { real(template) };
    if made.is_null() {
        return made;
    }
    // The name is only known afterwards; the directory is new, so order does not matter.
    let errno = Errno::save();
    on_entry(
        || entry(libc::AT_FDCWD, made),
        || 0,
        is_zero,
        |s, fileset, rel, canon| {
            record_mkdir(s, fileset, rel, canon, 0o700);
        },
    );
    errno.restore();
    made
}

fn record_symlink(s: &Session<'_>, fileset: usize, rel: &[u8], target: *const c_char) {
    if let Some(target) = cpath(target) {
        s.emit(
            fileset,
            OpRef::Symlink {
                target: target.to_bytes(),
                path: rel,
            },
        );
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn symlink(target: *const c_char, linkpath: *const c_char) -> c_int {
    let Some(real) = real::symlink() else {
        return missing();
    };
    on_entry(
        || entry(libc::AT_FDCWD, linkpath),
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(target, linkpath) },
        is_zero,
        |s, fileset, rel, _| record_symlink(s, fileset, rel, target),
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn symlinkat(
    target: *const c_char,
    dirfd: c_int,
    linkpath: *const c_char,
) -> c_int {
    let Some(real) = real::symlinkat() else {
        return missing();
    };
    on_entry(
        || entry(dirfd, linkpath),
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(target, dirfd, linkpath) },
        is_zero,
        |s, fileset, rel, _| record_symlink(s, fileset, rel, target),
    )
}

// ---- rename and link: two entries ---------------------------------------------------------

/// Resolves both entries; `None` when neither is in a fileset (the call then needs nothing).
struct Pair {
    from: Option<Canon>,
    to: Option<Canon>,
}

fn same_inode(a: &Canon, b: &Canon) -> bool {
    match (
        std::fs::symlink_metadata(rec::canon_path(a)),
        std::fs::symlink_metadata(rec::canon_path(b)),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Runs a two-entry call: `record` gets the session and both (resolved, classified) sides.
fn on_pair(
    pair: impl FnOnce() -> Pair,
    call: impl FnOnce() -> c_int,
    record: impl FnOnce(&mut Session<'_>, &Pair, bool),
) -> c_int {
    let Some(shim) = state::get() else {
        return call();
    };
    let Some(_inside) = reentry::enter() else {
        return call();
    };
    let pair = pair();
    let inside = |c: &Option<Canon>| c.as_ref().and_then(|c| shim.classify_canon(c)).is_some();
    if !inside(&pair.from) && !inside(&pair.to) {
        return call();
    }
    let mut session = shim.session();
    // rename() between two links of one inode does nothing and succeeds.
    let same = match (&pair.from, &pair.to) {
        (Some(a), Some(b)) => same_inode(a, b),
        _ => false,
    };
    let rc = call();
    let errno = Errno::save();
    if rc == 0 {
        shielded(|| record(&mut session, &pair, same));
    }
    drop(session);
    errno.restore();
    rc
}

fn record_rename(s: &mut Session<'_>, pair: &Pair, same: bool, flags: c_uint) {
    let (Some(from_abs), Some(to_abs)) = (&pair.from, &pair.to) else {
        return;
    };
    if same {
        return;
    }
    let shim = s.shim();
    let from = shim.classify_canon(from_abs);
    let to = shim.classify_canon(to_abs);
    let from_path = rec::canon_path(from_abs);
    let to_path = rec::canon_path(to_abs);
    if flags & libc::RENAME_EXCHANGE != 0 {
        // Replay cannot swap atomically and three renames are not idempotent: remove what each
        // side held (its old tree is now on the other side) and recreate it from the new one.
        for (side, side_path, other_path) in [(from, from_path, to_path), (to, to_path, from_path)]
        {
            if let Some((fileset, rel)) = side {
                rec::remove_tree(s, fileset, rel, other_path);
                rec::snapshot_tree(s, fileset, rel, side_path);
            }
        }
        let from_ids = from.map(|(f, rel)| (s.tracked().descs_under(f, rel), rel));
        let to_ids = to.map(|(f, rel)| (s.tracked().descs_under(f, rel), rel));
        if let Some((ids, rel)) = from_ids {
            s.tracked_mut().relocate(&ids, rel, to);
        }
        if let Some((ids, rel)) = to_ids {
            s.tracked_mut().relocate(&ids, rel, from);
        }
        return;
    }
    match (from, to) {
        (Some((a, f)), Some((b, t))) if a == b => {
            s.emit(a, OpRef::Rename { from: f, to: t });
            s.tracked_mut().forget_path(b, t);
        }
        (Some((a, f)), _) => {
            rec::remove_tree(s, a, f, to_path);
            if let Some((b, t)) = to {
                rec::snapshot_tree(s, b, t, to_path);
                s.tracked_mut().forget_path(b, t);
            }
        }
        (None, Some((b, t))) => {
            rec::snapshot_tree(s, b, t, to_path);
            s.tracked_mut().forget_path(b, t);
        }
        (None, None) => {}
    }
    if let Some((a, f)) = from {
        let ids = s.tracked().descs_under(a, f);
        s.tracked_mut().relocate(&ids, f, to);
    }
}

fn rename_common(
    olddirfd: c_int,
    old: *const c_char,
    newdirfd: c_int,
    new: *const c_char,
    flags: c_uint,
    call: impl FnOnce() -> c_int,
) -> c_int {
    on_pair(
        || Pair {
            from: entry(olddirfd, old),
            to: entry(newdirfd, new),
        },
        call,
        |s, pair, same| record_rename(s, pair, same, flags),
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn rename(old: *const c_char, new: *const c_char) -> c_int {
    let Some(real) = real::rename() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    rename_common(libc::AT_FDCWD, old, libc::AT_FDCWD, new, 0, || unsafe {
        real(old, new)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn renameat(
    olddirfd: c_int,
    old: *const c_char,
    newdirfd: c_int,
    new: *const c_char,
) -> c_int {
    let Some(real) = real::renameat() else {
        return missing();
    };
    rename_common(olddirfd, old, newdirfd, new, 0, || {
        // SAFETY: the caller's arguments, forwarded unchanged.
        unsafe { real(olddirfd, old, newdirfd, new) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn renameat2(
    olddirfd: c_int,
    old: *const c_char,
    newdirfd: c_int,
    new: *const c_char,
    flags: c_uint,
) -> c_int {
    let Some(real) = real::renameat2() else {
        return missing();
    };
    rename_common(olddirfd, old, newdirfd, new, flags, || {
        // SAFETY: the caller's arguments, forwarded unchanged.
        unsafe { real(olddirfd, old, newdirfd, new, flags) }
    })
}

/// The source of a link: the descriptor itself (AT_EMPTY_PATH), the final symlink's target
/// (AT_SYMLINK_FOLLOW) or the entry.
fn link_source(olddirfd: c_int, old: *const c_char, flags: c_int) -> Option<Canon> {
    let empty = cpath(old).is_some_and(|p| p.to_bytes().is_empty());
    if empty && flags & libc::AT_EMPTY_PATH != 0 {
        canon::fd_path(olddirfd)
    } else {
        target(olddirfd, old, flags & libc::AT_SYMLINK_FOLLOW != 0)
    }
}

/// The descriptor a link's source names directly: `linkat(fd, "", …, AT_EMPTY_PATH)` or
/// `linkat(AT_FDCWD, "/proc/self/fd/N", …, AT_SYMLINK_FOLLOW)` (the O_TMPFILE recipes).
fn linked_descriptor(olddirfd: c_int, old: *const c_char, flags: c_int) -> Option<c_int> {
    let old = cpath(old)?.to_bytes();
    if old.is_empty() && flags & libc::AT_EMPTY_PATH != 0 {
        return Some(olddirfd);
    }
    if flags & libc::AT_SYMLINK_FOLLOW == 0 {
        return None;
    }
    let digits = old.strip_prefix(b"/proc/self/fd/")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn link_common(
    olddirfd: c_int,
    old: *const c_char,
    flags: c_int,
    newdirfd: c_int,
    new: *const c_char,
    call: impl FnOnce() -> c_int,
) -> c_int {
    let named_fd = linked_descriptor(olddirfd, old, flags);
    on_pair(
        || Pair {
            from: link_source(olddirfd, old, flags),
            to: entry(newdirfd, new),
        },
        call,
        |s, pair, _| {
            let shim = s.shim();
            let Some(to_abs) = &pair.to else { return };
            let Some((b, t)) = shim.classify_canon(to_abs) else {
                return;
            };
            let from = pair.from.as_ref().and_then(|c| shim.classify_canon(c));
            match from {
                Some((a, f)) if a == b => s.emit(b, OpRef::Link { from: f, to: t }),
                // A file from outside (or an O_TMPFILE file) gets its contents sent.
                _ => rec::snapshot_tree(s, b, t, rec::canon_path(to_abs)),
            }
            // An anonymous (O_TMPFILE) descriptor now has a name in the fileset.
            if let Some(fd) = named_fd
                && s.tracked().desc(fd).is_none()
                && writable(fd)
            {
                s.tracked_mut().track(fd, b, t.to_vec());
            }
        },
    )
}

fn writable(fd: c_int) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) };
    c_int::try_from(flags).is_ok_and(|f| f >= 0 && f & libc::O_ACCMODE != libc::O_RDONLY)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn link(old: *const c_char, new: *const c_char) -> c_int {
    let Some(real) = real::link() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    link_common(libc::AT_FDCWD, old, 0, libc::AT_FDCWD, new, || unsafe {
        real(old, new)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn linkat(
    olddirfd: c_int,
    old: *const c_char,
    newdirfd: c_int,
    new: *const c_char,
    flags: c_int,
) -> c_int {
    let Some(real) = real::linkat() else {
        return missing();
    };
    link_common(olddirfd, old, flags, newdirfd, new, || {
        // SAFETY: the caller's arguments, forwarded unchanged.
        unsafe { real(olddirfd, old, newdirfd, new, flags) }
    })
}

// ---- chmod, truncate, times --------------------------------------------------------------

fn record_chmod(s: &Session<'_>, fileset: usize, rel: &[u8], canon: &Canon, requested: mode_t) {
    let mode = std::fs::symlink_metadata(rec::canon_path(canon))
        .map_or(requested & MODE_BITS, |m| {
            m.permissions().mode() & MODE_BITS
        });
    s.emit(fileset, OpRef::Chmod { path: rel, mode });
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn chmod(path: *const c_char, mode: mode_t) -> c_int {
    let Some(real) = real::chmod() else {
        return missing();
    };
    on_entry(
        || target(libc::AT_FDCWD, path, true),
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(path, mode) },
        is_zero,
        |s, fileset, rel, canon| record_chmod(s, fileset, rel, canon, mode),
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn lchmod(path: *const c_char, mode: mode_t) -> c_int {
    let Some(real) = real::lchmod() else {
        return missing();
    };
    on_entry(
        || target(libc::AT_FDCWD, path, false),
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(path, mode) },
        is_zero,
        |s, fileset, rel, canon| record_chmod(s, fileset, rel, canon, mode),
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fchmodat(
    dirfd: c_int,
    path: *const c_char,
    mode: mode_t,
    flags: c_int,
) -> c_int {
    let Some(real) = real::fchmodat() else {
        return missing();
    };
    on_entry(
        || target(dirfd, path, flags & libc::AT_SYMLINK_NOFOLLOW == 0),
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(dirfd, path, mode, flags) },
        is_zero,
        |s, fileset, rel, canon| record_chmod(s, fileset, rel, canon, mode),
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fchmod(fd: c_int, mode: mode_t) -> c_int {
    let Some(real) = real::fchmod() else {
        return missing();
    };
    on_any_fd(
        fd,
        // SAFETY: the caller's arguments, forwarded unchanged.
        || unsafe { real(fd, mode) },
        is_zero,
        |s, fileset, rel| {
            let mode = canon::fstat(fd).map_or(mode & MODE_BITS, |st| st.st_mode & MODE_BITS);
            s.emit(fileset, OpRef::Chmod { path: rel, mode });
        },
    )
}

// Setting the access ACL sets the permission bits too (cp -a and tar preserve modes that way).
// Other extended attributes are not replicated.
const ACL_ACCESS: &[u8] = b"system.posix_acl_access";

fn sets_mode(name: *const c_char) -> bool {
    cpath(name).is_some_and(|n| n.to_bytes() == ACL_ACCESS)
}

fn record_mode_now(s: &Session<'_>, fileset: usize, rel: &[u8], canon: &Canon) {
    if let Some(st) = lstat_canon(canon) {
        s.emit(
            fileset,
            OpRef::Chmod {
                path: rel,
                mode: st.st_mode & MODE_BITS,
            },
        );
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn setxattr(
    path: *const c_char,
    name: *const c_char,
    value: *const c_void,
    size: size_t,
    flags: c_int,
) -> c_int {
    let Some(real) = real::setxattr() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let call = || unsafe { real(path, name, value, size, flags) };
    if !sets_mode(name) {
        return call();
    }
    on_entry(
        || target(libc::AT_FDCWD, path, true),
        call,
        is_zero,
        |s, fileset, rel, canon| {
            record_mode_now(s, fileset, rel, canon);
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn lsetxattr(
    path: *const c_char,
    name: *const c_char,
    value: *const c_void,
    size: size_t,
    flags: c_int,
) -> c_int {
    let Some(real) = real::lsetxattr() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let call = || unsafe { real(path, name, value, size, flags) };
    if !sets_mode(name) {
        return call();
    }
    on_entry(
        || target(libc::AT_FDCWD, path, false),
        call,
        is_zero,
        |s, fileset, rel, canon| {
            record_mode_now(s, fileset, rel, canon);
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsetxattr(
    fd: c_int,
    name: *const c_char,
    value: *const c_void,
    size: size_t,
    flags: c_int,
) -> c_int {
    let Some(real) = real::fsetxattr() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    let call = || unsafe { real(fd, name, value, size, flags) };
    if !sets_mode(name) {
        return call();
    }
    on_any_fd(fd, call, is_zero, |s, fileset, rel| {
        if let Some(st) = canon::fstat(fd) {
            s.emit(
                fileset,
                OpRef::Chmod {
                    path: rel,
                    mode: st.st_mode & MODE_BITS,
                },
            );
        }
    })
}

fn truncate_common(path: *const c_char, len: i64, call: impl FnOnce() -> c_int) -> c_int {
    on_entry(
        || target(libc::AT_FDCWD, path, true),
        call,
        is_zero,
        |s, fileset, rel, _| {
            if let Ok(len) = u64::try_from(len) {
                s.emit(fileset, OpRef::Truncate { path: rel, len });
            }
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn truncate(path: *const c_char, len: off_t) -> c_int {
    let Some(real) = real::truncate() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    truncate_common(path, len, || unsafe { real(path, len) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn truncate64(path: *const c_char, len: off64_t) -> c_int {
    let Some(real) = real::truncate64() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    truncate_common(path, len, || unsafe { real(path, len) })
}

/// Which of the two times a call set (UTIME_OMIT leaves one alone).
#[derive(Clone, Copy)]
struct Which {
    atime: bool,
    mtime: bool,
}

const BOTH: Which = Which {
    atime: true,
    mtime: true,
};

fn which_of(times: *const libc::timespec) -> Which {
    if times.is_null() {
        return BOTH;
    }
    // SAFETY: a non-null times argument points to two timespecs.
    let (a, m) = unsafe { (*times, *times.add(1)) };
    Which {
        atime: a.tv_nsec != libc::UTIME_OMIT,
        mtime: m.tv_nsec != libc::UTIME_OMIT,
    }
}

/// Records the times the entry has now (exact even for "now" and UTIME_NOW).
fn emit_times(s: &Session<'_>, fileset: usize, rel: &[u8], st: &libc::stat, which: Which) {
    let (atime, mtime) = rec::stat_times(st);
    s.emit(
        fileset,
        OpRef::SetTimes {
            path: rel,
            atime_ns: which.atime.then_some(atime),
            mtime_ns: which.mtime.then_some(mtime),
        },
    );
}

fn lstat_canon(canon: &Canon) -> Option<libc::stat> {
    let mut z = [0u8; canon::CANON_BYTES + 1];
    z[..canon.as_bytes().len()].copy_from_slice(canon.as_bytes());
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `z` is NUL-terminated; `st` is valid for one stat.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_newfstatat,
            libc::AT_FDCWD,
            z.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    // SAFETY: rc == 0 means the kernel filled `st`.
    (rc == 0).then(|| unsafe { st.assume_init() })
}

fn times_at(
    dirfd: c_int,
    path: *const c_char,
    follow: bool,
    which: Which,
    call: impl FnOnce() -> c_int,
) -> c_int {
    match cpath(path) {
        // No path: the call works on the descriptor (futimens, futimesat(fd, NULL, ...)).
        None => times_fd(dirfd, which, call),
        Some(p) if p.to_bytes().is_empty() => times_fd(dirfd, which, call),
        Some(_) => on_entry(
            || target(dirfd, path, follow),
            call,
            is_zero,
            |s, fileset, rel, canon| {
                if let Some(st) = lstat_canon(canon) {
                    emit_times(s, fileset, rel, &st, which);
                }
            },
        ),
    }
}

fn times_fd(fd: c_int, which: Which, call: impl FnOnce() -> c_int) -> c_int {
    on_any_fd(fd, call, is_zero, |s, fileset, rel| {
        if let Some(st) = canon::fstat(fd) {
            emit_times(s, fileset, rel, &st, which);
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn utimensat(
    dirfd: c_int,
    path: *const c_char,
    times: *const libc::timespec,
    flags: c_int,
) -> c_int {
    let Some(real) = real::utimensat() else {
        return missing();
    };
    times_at(
        dirfd,
        path,
        flags & libc::AT_SYMLINK_NOFOLLOW == 0,
        which_of(times),
        || {
            // SAFETY: the caller's arguments, forwarded unchanged.
            unsafe { real(dirfd, path, times, flags) }
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn futimens(fd: c_int, times: *const libc::timespec) -> c_int {
    let Some(real) = real::futimens() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    times_fd(fd, which_of(times), || unsafe { real(fd, times) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn utime(path: *const c_char, times: *const libc::utimbuf) -> c_int {
    let Some(real) = real::utime() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    times_at(libc::AT_FDCWD, path, true, BOTH, || unsafe {
        real(path, times)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn utimes(path: *const c_char, times: *const libc::timeval) -> c_int {
    let Some(real) = real::utimes() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    times_at(libc::AT_FDCWD, path, true, BOTH, || unsafe {
        real(path, times)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn lutimes(path: *const c_char, times: *const libc::timeval) -> c_int {
    let Some(real) = real::lutimes() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    times_at(libc::AT_FDCWD, path, false, BOTH, || unsafe {
        real(path, times)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn futimes(fd: c_int, times: *const libc::timeval) -> c_int {
    let Some(real) = real::futimes() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    times_fd(fd, BOTH, || unsafe { real(fd, times) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn futimesat(
    dirfd: c_int,
    path: *const c_char,
    times: *const libc::timeval,
) -> c_int {
    let Some(real) = real::futimesat() else {
        return missing();
    };
    // SAFETY: the caller's arguments, forwarded unchanged.
    times_at(dirfd, path, true, BOTH, || unsafe {
        real(dirfd, path, times)
    })
}
