//! The real [`Tree`]: reads entries beneath the fileset root through a directory fd, resolving
//! every path with openat2 (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS). It must never follow a
//! symlink, never read outside the root, and never open a FIFO or device for reading.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use rustix::fs::{Dir, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::engine::{FileMeta, Observed, Tree, TreeFile};
use crate::RelPath;

/// Times an entry is looked at again when it changes kind between two steps of observing it.
const OBSERVE_ATTEMPTS: usize = 3;

/// Nanoseconds per second, for timestamps.
const NANOS_PER_SEC: i64 = 1_000_000_000;

/// The tree beneath a root directory.
#[derive(Debug)]
pub struct FsTree {
    root: OwnedFd,
}

impl FsTree {
    /// Opens `root` (a directory) without following a symlink at its end.
    pub fn open(root: &Path) -> io::Result<Self> {
        let root = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { root })
    }

    fn resolve(&self, path: &RelPath, flags: OFlags) -> Result<OwnedFd, Errno> {
        rustix::fs::openat2(
            &self.root,
            path.as_path(),
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
    }
}

/// Errors meaning "nothing (that we may look at) is there": gone, a non-directory on the way,
/// or a symlink on the way (the tree is never followed through one).
fn is_missing(e: Errno) -> bool {
    matches!(e, Errno::NOENT | Errno::NOTDIR | Errno::LOOP)
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(NANOS_PER_SEC)
        .saturating_add(meta.mtime_nsec())
}

/// An open regular file of the tree.
#[derive(Debug)]
pub struct FsFile(File);

impl TreeFile for FsFile {
    fn meta(&mut self) -> io::Result<FileMeta> {
        let m = self.0.metadata()?;
        Ok(FileMeta {
            mode: m.mode(),
            len: m.len(),
            mtime_ns: mtime_ns(&m),
        })
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
}

impl Tree for FsTree {
    type File = FsFile;

    fn observe(&mut self, path: &RelPath) -> io::Result<Observed<FsFile>> {
        for _ in 0..OBSERVE_ATTEMPTS {
            // O_PATH opens nothing for I/O (no side effect on FIFOs or devices) and, with
            // O_NOFOLLOW, yields the symlink itself.
            let fd = match self.resolve(path, OFlags::PATH) {
                Ok(fd) => fd,
                Err(e) if is_missing(e) => return Ok(Observed::Missing),
                Err(e) => return Err(e.into()),
            };
            let entry = File::from(fd);
            let meta = entry.metadata()?;
            let kind = meta.file_type();
            if kind.is_dir() {
                return Ok(Observed::Dir { mode: meta.mode() });
            }
            if kind.is_symlink() {
                // The O_PATH fd is the link itself; an empty path reads it.
                let target = rustix::fs::readlinkat(&entry, "", Vec::new())?;
                return Ok(Observed::Symlink {
                    target: target.into_bytes(),
                });
            }
            if !kind.is_file() {
                return Ok(Observed::Other);
            }
            // O_NONBLOCK: if the name was replaced by a FIFO meanwhile, opening must not hang.
            let fd = match self.resolve(path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY) {
                Ok(fd) => fd,
                Err(e) if is_missing(e) => return Ok(Observed::Missing),
                Err(e) => return Err(e.into()),
            };
            let file = File::from(fd);
            if file.metadata()?.file_type().is_file() {
                return Ok(Observed::File(FsFile(file)));
            }
        }
        Err(io::Error::other(format!(
            "{path:?} keeps changing kind while it is looked at"
        )))
    }

    fn list(&mut self, dir: &RelPath) -> io::Result<Option<Vec<Vec<u8>>>> {
        let fd = match self.resolve(dir, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if is_missing(e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut names = Vec::new();
        for entry in Dir::new(fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        Ok(Some(names))
    }

    fn is_dir(&mut self, path: &RelPath) -> io::Result<bool> {
        match self.resolve(path, OFlags::PATH) {
            Ok(fd) => Ok(File::from(fd).metadata()?.is_dir()),
            Err(e) if is_missing(e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
