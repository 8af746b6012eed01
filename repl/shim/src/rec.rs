//! Recording helpers shared by the wrappers: the lock-taking slow paths, write offsets,
//! reading bytes back from files, and the ops that recreate or remove whole trees.
//!
//! Everything here runs after the real call succeeded and inside the re-entrancy guard; it
//! must never change what the application sees (errno, file positions, descriptors).

use std::ffi::OsStr;
use std::io::IoSlice;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use ft::replog::OpRef;
use libc::{c_int, iovec};

use crate::canon::{self, Canon};
use crate::diag::{self, Trouble};
use crate::reentry::{self, Errno};
use crate::state::{self, Session};

/// Bytes read back from a file per Write operation (copy_file_range, snapshots).
pub(crate) const READ_BACK_CHUNK: usize = 1 << 20;
/// Permission and special bits of a mode, as the log records them.
pub(crate) const MODE_BITS: u32 = 0o7777;

/// Runs recording work, turning a panic into a one-time report.
pub(crate) fn shielded(work: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(work)).is_err() {
        diag::report(
            Trouble::Panic,
            format_args!("an internal error was caught; the operation was not replicated"),
        );
    }
}

/// The slow path of a call on a descriptor whose bit is set: under the lock, make the real
/// call and, if the descriptor is tracked, record what it did. errno is the real call's.
pub(crate) fn on_tracked<R: Copy>(
    fd: c_int,
    call: impl FnOnce() -> R,
    record: impl FnOnce(&Session<'_>, usize, &[u8], R),
) -> R {
    let Some(_inside) = reentry::enter() else {
        diag::report(
            Trouble::Reentered,
            format_args!(
                "a call on a tracked file from a signal handler interrupting the shim was not replicated"
            ),
        );
        return call();
    };
    let Some(shim) = state::get() else {
        return call();
    };
    let session = shim.session();
    let Some(desc) = session.tracked().desc(fd) else {
        drop(session);
        return call();
    };
    let result = call();
    let errno = Errno::save();
    shielded(|| record(&session, desc.fileset, &desc.path, result));
    drop(session);
    errno.restore();
    result
}

/// Like [`on_tracked`] for metadata calls (fsync, fchmod, futimens): a descriptor that is not
/// tracked (read-only, directory, opened where no wrapper saw it) is classified from its path.
pub(crate) fn on_any_fd<R: Copy>(
    fd: c_int,
    call: impl FnOnce() -> R,
    ok: impl FnOnce(R) -> bool,
    record: impl FnOnce(&Session<'_>, usize, &[u8]),
) -> R {
    if crate::fdbits::is_set(fd) {
        return on_tracked(fd, call, |s, fileset, path, r| {
            if ok(r) {
                record(s, fileset, path);
            }
        });
    }
    let Some(shim) = state::get() else {
        return call();
    };
    let Some(_inside) = reentry::enter() else {
        return call();
    };
    let canon = canon::fd_path(fd);
    let Some((fileset, rel)) = canon.as_ref().and_then(|c| shim.classify_canon(c)) else {
        return call();
    };
    let session = shim.session();
    let result = call();
    let errno = Errno::save();
    if ok(result) {
        shielded(|| record(&session, fileset, rel));
    }
    drop(session);
    errno.restore();
    result
}

/// The slow path of a path-based call: `resolve` names the entry (before the call, while it
/// and its parent exist); outside every fileset the call runs with no lock. Inside, the call
/// and `record` run under the lock when `ok(result)`.
pub(crate) fn on_entry<R: Copy>(
    resolve: impl FnOnce() -> Option<Canon>,
    call: impl FnOnce() -> R,
    ok: impl FnOnce(R) -> bool,
    record: impl FnOnce(&mut Session<'_>, usize, &[u8], &Canon),
) -> R {
    let Some(shim) = state::get() else {
        return call();
    };
    let Some(_inside) = reentry::enter() else {
        return call();
    };
    let Some(canon) = resolve() else {
        return call();
    };
    let Some((fileset, rel)) = shim.classify_canon(&canon) else {
        return call();
    };
    let mut session = shim.session();
    let result = call();
    let errno = Errno::save();
    if ok(result) {
        shielded(|| record(&mut session, fileset, rel, &canon));
    }
    drop(session);
    errno.restore();
    result
}

/// The descriptor's file position.
pub(crate) fn position(fd: c_int) -> Option<u64> {
    // SAFETY: lseek with SEEK_CUR and offset 0 only reads the position.
    let pos = unsafe { libc::lseek64(fd, 0, libc::SEEK_CUR) };
    let pos = u64::try_from(pos).ok();
    if pos.is_none() {
        diag::report(
            Trouble::Position,
            format_args!("cannot read the position of descriptor {fd}; a write was not replicated"),
        );
    }
    pos
}

/// The size of the file `fd` refers to.
pub(crate) fn size(fd: c_int) -> Option<u64> {
    let size = canon::fstat(fd).and_then(|st| u64::try_from(st.st_size).ok());
    if size.is_none() {
        diag::report(
            Trouble::Position,
            format_args!(
                "cannot read the size of descriptor {fd}; an operation was not replicated"
            ),
        );
    }
    size
}

/// Whether writes through `fd` append (O_APPEND on its open file description).
pub(crate) fn appends(fd: c_int) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::c_long::from(libc::O_APPEND) != 0
}

/// Where `n` bytes just written through `fd` landed. `explicit` is the offset of a
/// positioned write (pwrite); position-based and appending writes are located from the file
/// position (or, for an appending pwrite, which leaves the position alone, the file size).
/// Whether `fd` appends is the tracked description's flag (see [`crate::state::Desc`]).
pub(crate) fn written_at(
    s: &Session<'_>,
    fd: c_int,
    n: usize,
    explicit: Option<i64>,
) -> Option<u64> {
    let n = u64::try_from(n).ok()?;
    let appending = || {
        s.tracked()
            .desc(fd)
            .map_or_else(|| appends(fd), |d| d.appends.get())
    };
    match explicit {
        Some(offset) if !appending() => u64::try_from(offset).ok(),
        Some(_) => size(fd)?.checked_sub(n),
        None => position(fd)?.checked_sub(n),
    }
}

/// Borrows an iovec array as IoSlices.
///
/// # Safety
/// `iov` must point to `count` valid iovecs whose buffers stay valid for `'a`.
pub(crate) unsafe fn io_slices<'a>(iov: *const iovec, count: c_int) -> &'a [IoSlice<'a>] {
    let Ok(count) = usize::try_from(count) else {
        return &[];
    };
    if iov.is_null() || count == 0 {
        return &[];
    }
    // SAFETY: IoSlice is documented as ABI-compatible with iovec on Unix; the caller
    // guarantees `count` valid entries.
    unsafe { std::slice::from_raw_parts(iov.cast::<IoSlice<'a>>(), count) }
}

/// Records a gathered write of `n` bytes at `offset` (n may be short of the whole vector).
pub(crate) fn emit_vectored(
    s: &Session<'_>,
    fileset: usize,
    path: &[u8],
    offset: u64,
    bufs: &[IoSlice<'_>],
    n: usize,
) {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if n == total {
        s.emit(
            fileset,
            OpRef::WriteVectored {
                path,
                offset,
                data: bufs,
            },
        );
        return;
    }
    let mut at = offset;
    let mut left = n;
    for buf in bufs {
        if left == 0 {
            break;
        }
        let take = buf.len().min(left);
        if take > 0 {
            s.emit(
                fileset,
                OpRef::Write {
                    path,
                    offset: at,
                    data: &buf[..take],
                },
            );
        }
        at += take as u64;
        left -= take;
    }
}

/// A descriptor that can be read: `fd` itself when opened for reading, else a fresh
/// read-only open of the same file through /proc (closed on drop).
pub(crate) struct Reader {
    fd: c_int,
    owned: bool,
}

impl Reader {
    pub(crate) fn new(fd: c_int) -> Option<Self> {
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let flags = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) };
        let mode = c_int::try_from(flags).ok()? & libc::O_ACCMODE;
        if mode == libc::O_RDONLY || mode == libc::O_RDWR {
            return Some(Self { fd, owned: false });
        }
        let mut name = [0u8; 40];
        let text = format!("/proc/self/fd/{fd}\0");
        name[..text.len()].copy_from_slice(text.as_bytes());
        // SAFETY: `name` is NUL-terminated; a read-only open has no side effects.
        let fresh = unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        match c_int::try_from(fresh) {
            Ok(fd) if fd >= 0 => Some(Self { fd, owned: true }),
            _ => None,
        }
    }

    /// Reads up to `buf.len()` bytes at `offset`, retrying EINTR; 0 at end of file.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Option<usize> {
        let offset = i64::try_from(offset).ok()?;
        loop {
            // SAFETY: `buf` is valid for writes of its length; pread leaves the position alone.
            let n = unsafe { libc::pread64(self.fd, buf.as_mut_ptr().cast(), buf.len(), offset) };
            if n >= 0 {
                return usize::try_from(n).ok();
            }
            if Errno::save().value() != libc::EINTR {
                return None;
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: the descriptor was opened by `Reader::new` and is closed once.
            unsafe { libc::syscall(libc::SYS_close, self.fd) };
        }
    }
}

/// Records `len` bytes of `src` at `src_offset` as Writes at `dst_offset` of `path` (the
/// destination of copy_file_range, sendfile, splice, clones, read-back of mirrored streams).
pub(crate) fn copy_back(
    s: &Session<'_>,
    fileset: usize,
    path: &[u8],
    src: &Reader,
    src_offset: u64,
    dst_offset: u64,
    len: u64,
) {
    let mut buf = vec![
        0u8;
        usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(READ_BACK_CHUNK)
    ];
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(n) = src.read_at(&mut buf[..want], src_offset + done) else {
            diag::report(
                Trouble::ReadBack,
                format_args!("cannot read back copied bytes; a write was not replicated"),
            );
            return;
        };
        if n == 0 {
            break;
        }
        s.emit(
            fileset,
            OpRef::Write {
                path,
                offset: dst_offset + done,
                data: &buf[..n],
            },
        );
        done += n as u64;
    }
}

/// Records the whole current contents of the file `fd` refers to (after calls whose effect
/// on the bytes is not known in detail: clones, collapsing fallocate).
pub(crate) fn resend_file(s: &Session<'_>, fileset: usize, path: &[u8], fd: c_int) {
    let (Some(reader), Some(len)) = (Reader::new(fd), size(fd)) else {
        diag::report(
            Trouble::ReadBack,
            format_args!("cannot read a file back; its contents were not replicated"),
        );
        return;
    };
    s.emit(fileset, OpRef::Truncate { path, len: 0 });
    copy_back(s, fileset, path, &reader, 0, 0, len);
    s.emit(fileset, OpRef::Truncate { path, len });
}

/// Access and modification times of a stat, in ns since the epoch.
pub(crate) fn stat_times(st: &libc::stat) -> (i64, i64) {
    let ns = |sec: i64, nsec: i64| sec.saturating_mul(1_000_000_000).saturating_add(nsec);
    (
        ns(st.st_atime, st.st_atime_nsec),
        ns(st.st_mtime, st.st_mtime_nsec),
    )
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = Vec::with_capacity(rel.len() + 1 + name.len());
    path.extend_from_slice(rel);
    path.push(b'/');
    path.extend_from_slice(name);
    path
}

fn sorted_children(dir: &Path) -> Vec<PathBuf> {
    let mut children: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            diag::report(
                Trouble::ReadBack,
                format_args!(
                    "cannot list {}: {e}; its entries were not replicated",
                    dir.display()
                ),
            );
            Vec::new()
        }
    };
    children.sort();
    children
}

/// Records what recreates the tree now at `abs` as `rel` in `fileset`: a file or symlink
/// moved or linked in from outside, or one side of an exchange.
pub(crate) fn snapshot_tree(s: &Session<'_>, fileset: usize, rel: &[u8], abs: &Path) {
    let mut work = vec![(rel.to_vec(), abs.to_path_buf())];
    while let Some((rel, abs)) = work.pop() {
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(meta) => meta,
            Err(e) => {
                diag::report(
                    Trouble::ReadBack,
                    format_args!("cannot read {}: {e}; it was not replicated", abs.display()),
                );
                continue;
            }
        };
        let mode = meta.permissions().mode() & MODE_BITS;
        let kind = meta.file_type();
        if kind.is_dir() {
            s.emit(fileset, OpRef::Mkdir { path: &rel, mode });
            s.emit(fileset, OpRef::Chmod { path: &rel, mode });
            for child in sorted_children(&abs).into_iter().rev() {
                if let Some(name) = child.file_name() {
                    work.push((join(&rel, name.as_bytes()), child.clone()));
                }
            }
        } else if kind.is_symlink() {
            match std::fs::read_link(&abs) {
                Ok(target) => {
                    s.emit(fileset, OpRef::Unlink { path: &rel });
                    s.emit(
                        fileset,
                        OpRef::Symlink {
                            target: target.as_os_str().as_bytes(),
                            path: &rel,
                        },
                    );
                }
                Err(e) => diag::report(
                    Trouble::ReadBack,
                    format_args!("cannot read the link {}: {e}", abs.display()),
                ),
            }
        } else if kind.is_file() {
            snapshot_file(s, fileset, &rel, &abs, mode, &meta);
        } else {
            diag::report(
                Trouble::Unsupported,
                format_args!(
                    "{} is a device, FIFO or socket, which replication does not carry",
                    abs.display()
                ),
            );
        }
    }
}

fn snapshot_file(
    s: &Session<'_>,
    fileset: usize,
    rel: &[u8],
    abs: &Path,
    mode: u32,
    meta: &std::fs::Metadata,
) {
    use std::os::fd::AsRawFd;
    let file = match std::fs::File::open(abs) {
        Ok(file) => file,
        Err(e) => {
            diag::report(
                Trouble::ReadBack,
                format_args!(
                    "cannot read {}: {e}; its contents were not replicated",
                    abs.display()
                ),
            );
            return;
        }
    };
    s.emit(fileset, OpRef::Unlink { path: rel });
    s.emit(fileset, OpRef::Create { path: rel, mode });
    if let Some(reader) = Reader::new(file.as_raw_fd()) {
        copy_back(s, fileset, rel, &reader, 0, 0, meta.len());
    }
    s.emit(
        fileset,
        OpRef::Truncate {
            path: rel,
            len: meta.len(),
        },
    );
    s.emit(fileset, OpRef::Chmod { path: rel, mode });
    s.emit(
        fileset,
        OpRef::SetTimes {
            path: rel,
            atime_ns: Some(
                meta.atime()
                    .saturating_mul(1_000_000_000)
                    .saturating_add(meta.atime_nsec()),
            ),
            mtime_ns: Some(
                meta.mtime()
                    .saturating_mul(1_000_000_000)
                    .saturating_add(meta.mtime_nsec()),
            ),
        },
    );
}

/// Records the removal of `rel` from `fileset`, where the tree that used to be there is now
/// at `abs` (it was moved out, or exchanged).
pub(crate) fn remove_tree(s: &Session<'_>, fileset: usize, rel: &[u8], abs: &Path) {
    let is_dir = std::fs::symlink_metadata(abs).is_ok_and(|m| m.is_dir());
    if !is_dir {
        s.emit(fileset, OpRef::Unlink { path: rel });
        return;
    }
    // Depth-first listing; emitted in reverse so children go before their directory.
    let mut order: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut work = vec![(rel.to_vec(), abs.to_path_buf())];
    while let Some((rel, abs)) = work.pop() {
        order.push((rel.clone(), true));
        for child in sorted_children(&abs) {
            let Some(name) = child.file_name() else {
                continue;
            };
            let child_rel = join(&rel, name.as_bytes());
            if std::fs::symlink_metadata(&child).is_ok_and(|m| m.is_dir()) {
                work.push((child_rel, child));
            } else {
                order.push((child_rel, false));
            }
        }
    }
    for (path, dir) in order.iter().rev() {
        if *dir {
            s.emit(fileset, OpRef::Rmdir { path });
        } else {
            s.emit(fileset, OpRef::Unlink { path });
        }
    }
}

/// The canonical path as an OS path.
pub(crate) fn canon_path(canon: &Canon) -> &Path {
    Path::new(OsStr::from_bytes(canon.as_bytes()))
}
