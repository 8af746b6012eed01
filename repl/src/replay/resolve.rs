//! Resolution of fileset-relative paths beneath a root directory fd: openat2 with
//! RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, `O_NOFOLLOW` on the last component, and the `*at`
//! calls on the final name relative to an already-resolved parent. Owns the rule that replay
//! and manifest scanning never follow a symlink; it must never resolve a path through the
//! process's working directory or outside the root.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::RelPath;

/// Beneath the directory, never through a symlink (nor a /proc magic link).
pub(crate) fn no_symlinks() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// Opens `path` relative to `dir` without following any symlink and without leaving `dir`.
pub(crate) fn open_beneath<P: rustix::path::Arg>(
    dir: BorrowedFd<'_>,
    path: P,
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        path,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY,
        mode,
        no_symlinks(),
    )
}

/// Whether following the symlinks along `path` would lead out of `root`. Used only to tell an
/// escape attempt from a harmless symlink after a no-follow resolution refused `path`: the
/// probe opens with `O_PATH` (no read, no side effect) and RESOLVE_BENEATH, so even the probe
/// never reaches anything outside.
pub(crate) fn leads_outside(root: BorrowedFd<'_>, path: &RelPath) -> bool {
    matches!(
        rustix::fs::openat2(
            root,
            path.as_path(),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ),
        Err(Errno::XDEV)
    )
}

/// The last component of a path, as an OS string for the `*at` calls.
pub(crate) fn file_name(path: &RelPath) -> &OsStr {
    let bytes = path.as_bytes();
    let start = bytes.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    OsStr::from_bytes(&bytes[start..])
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Stat, Errno> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
}

/// The file type in a stat result.
pub(crate) fn kind_of(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// (device, inode): the identity of a file.
pub(crate) type FileId = (u64, u64);

/// The identity of the file a stat result describes.
pub(crate) fn identity(st: &Stat) -> FileId {
    (st.st_dev, st.st_ino)
}

/// A resolved parent directory: the root itself or a directory fd beneath it.
#[derive(Debug)]
pub(crate) enum ParentDir {
    Root,
    Dir(OwnedFd),
}

impl ParentDir {
    pub(crate) fn fd<'a>(&'a self, root: BorrowedFd<'a>) -> BorrowedFd<'a> {
        match self {
            ParentDir::Root => root,
            ParentDir::Dir(fd) => fd.as_fd(),
        }
    }
}
