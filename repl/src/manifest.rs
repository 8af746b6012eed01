//! Manifests for resync: a scan of every entry beneath a root (kind, mode, size, mtime, xxh3 of
//! contents or link target), the comparison of a primary's manifest with a replica's, and the
//! conversion of what differs into ordinary [`Op`]s so that a resync travels the same way as
//! the stream. Owns no state; it must never follow a symlink, never leave the root, and report
//! unreadable entries instead of failing the whole scan.
//!
//! Not carried: hard-link identity (each name is fetched as its own file), directory mtimes
//! (they change whenever entries are added), owners, xattrs, special files (listed as skipped).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::replay::{file_name, kind_of, lstat_at, open_beneath};
use crate::{Op, RelPath};

/// Largest `Write` a fetched file is cut into.
pub const FETCH_CHUNK_BYTES: usize = 1 << 20;
/// Read buffer for hashing file contents (allocated, zeroed, once per scan: a scan of a small
/// tree, as at every role change, must not cost more than its files).
const HASH_BUFFER_BYTES: usize = 64 << 10;
/// Smallest read of a fetched file: what is read where the file's length at its `stat` says
/// it ends (it may have grown since). Reads are sized to the bytes expected, so a small file
/// costs no [`FETCH_CHUNK_BYTES`] buffer.
const FETCH_PROBE_BYTES: usize = 4 << 10;
const MODE_BITS: u32 = 0o7777;
const NANOS_PER_SEC: i64 = 1_000_000_000;

/// Errors of scanning and fetching.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// An I/O operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The entry to fetch is not a regular file or a symlink (any more).
    #[error("{path} is not a regular file or a symlink")]
    NotFetchable { path: RelPath },
}

fn errno(op: &'static str, path: impl std::fmt::Display) -> impl FnOnce(Errno) -> ManifestError {
    move |e| ManifestError::Io {
        op,
        path: path.to_string(),
        source: e.into(),
    }
}

/// The kind of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device: listed, never replicated.
    Other,
}

/// One entry of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Bytes of contents (files) or of the target (symlinks); 0 for directories and others.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// xxh3-64 of the contents (files) or the target (symlinks); 0 otherwise.
    pub hash: u64,
}

/// An entry that could not be read; the scan went on without it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanProblem {
    /// The path relative to the root (lossy for display).
    pub path: String,
    pub error: String,
}

/// Every entry beneath a root (the root itself excluded), sorted by path bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<RelPath, Entry>,
    pub problems: Vec<ScanProblem>,
}

impl Manifest {
    /// A hash of the tree's contents: paths, kinds, modes, sizes and content hashes; times are
    /// left out (they differ legitimately between a primary and its replica for directories,
    /// and after re-application for files). Two trees with the same `content_hash` hold the
    /// same files.
    pub fn content_hash(&self) -> u64 {
        let mut h = Xxh3::new();
        for (path, e) in &self.entries {
            h.update(&(path.as_bytes().len() as u64).to_le_bytes());
            h.update(path.as_bytes());
            let kind: u8 = match e.kind {
                Kind::File => 1,
                Kind::Dir => 2,
                Kind::Symlink => 3,
                Kind::Other => 4,
            };
            h.update(&[kind]);
            h.update(&e.mode.to_le_bytes());
            h.update(&e.size.to_le_bytes());
            h.update(&e.hash.to_le_bytes());
        }
        h.digest()
    }
}

fn mtime_ns(st: &Stat) -> i64 {
    let secs = st.st_mtime;
    let nanos = i64::try_from(st.st_mtime_nsec).unwrap_or(0);
    secs.saturating_mul(NANOS_PER_SEC).saturating_add(nanos)
}

fn kind(st: &Stat) -> Kind {
    match kind_of(st) {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// Opens a regular file for reading without moving its atime (a scan must not change the tree
/// it looks at); `O_NOATIME` needs ownership or CAP_FOWNER, so fall back without it.
fn open_for_reading(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlags::RDONLY | OFlags::NONBLOCK;
    match open_beneath(dir, name, flags | OFlags::NOATIME, Mode::empty()) {
        Err(Errno::PERM) => open_beneath(dir, name, flags, Mode::empty()),
        other => other,
    }
}

fn open_root(root: &Path) -> Result<OwnedFd, ManifestError> {
    rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open", root.display()))
}

/// Hashes a whole file, returning (bytes read, xxh3).
fn hash_file(file: OwnedFd, buf: &mut [u8]) -> io::Result<(u64, u64)> {
    let mut file = File::from(file);
    let mut h = Xxh3::new();
    let mut size = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => return Ok((size, h.digest())),
            Ok(n) => {
                h.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Scans every entry beneath `root` without following symlinks. Entries that cannot be read
/// (or whose path is longer than a [`RelPath`] allows) are listed in `problems`.
pub fn scan(root: &Path) -> Result<Manifest, ManifestError> {
    scan_skipping(root, |_| false)
}

/// [`scan`] without the entries whose name `skip` returns true for, nor anything beneath them
/// (they are neither read nor listed: copy mode's excluded names).
pub fn scan_skipping(root: &Path, skip: impl Fn(&[u8]) -> bool) -> Result<Manifest, ManifestError> {
    let root_fd = open_root(root)?;
    let mut manifest = Manifest::default();
    let mut buf = vec![0u8; HASH_BUFFER_BYTES];
    // Breadth-first with one directory open at a time, so depth costs no file descriptors.
    let mut queue: VecDeque<Option<RelPath>> = VecDeque::from([None]);
    while let Some(dir_path) = queue.pop_front() {
        let shown = dir_path
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        let opened = match &dir_path {
            None => rustix::io::dup(&root_fd),
            Some(p) => open_beneath(
                root_fd.as_fd(),
                p.as_path(),
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            ),
        };
        let mut dir = match opened.and_then(Dir::new) {
            Ok(dir) => dir,
            Err(e) => {
                manifest.problems.push(ScanProblem {
                    path: shown,
                    error: format!("open directory: {e}"),
                });
                continue;
            }
        };
        let mut names = Vec::new();
        loop {
            match dir.read() {
                None => break,
                Some(Ok(entry)) => {
                    let name = entry.file_name().to_bytes();
                    if name != b"." && name != b".." && !skip(name) {
                        names.push(name.to_vec());
                    }
                }
                Some(Err(e)) => {
                    manifest.problems.push(ScanProblem {
                        path: shown.clone(),
                        error: format!("read directory: {e}"),
                    });
                    break;
                }
            }
        }
        let Ok(dir_fd) = dir.fd() else { continue };
        for name in names {
            let full = match &dir_path {
                None => name.clone(),
                Some(p) => [p.as_bytes(), b"/", &name].concat(),
            };
            let path = match RelPath::new(full.clone()) {
                Ok(path) => path,
                Err(e) => {
                    manifest.problems.push(ScanProblem {
                        path: String::from_utf8_lossy(&full).into_owned(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            match scan_entry(dir_fd, &path, &mut buf) {
                Ok(entry) => {
                    if entry.kind == Kind::Dir {
                        queue.push_back(Some(path.clone()));
                    }
                    manifest.entries.insert(path, entry);
                }
                Err(error) => manifest.problems.push(ScanProblem {
                    path: path.to_string(),
                    error,
                }),
            }
        }
    }
    Ok(manifest)
}

fn scan_entry(dir: BorrowedFd<'_>, path: &RelPath, buf: &mut [u8]) -> Result<Entry, String> {
    let name = file_name(path);
    let st = lstat_at(dir, name).map_err(|e| format!("stat: {e}"))?;
    let mut entry = Entry {
        kind: kind(&st),
        mode: st.st_mode & MODE_BITS,
        size: 0,
        mtime_ns: mtime_ns(&st),
        hash: 0,
    };
    match entry.kind {
        Kind::File => {
            let fd = open_for_reading(dir, name).map_err(|e| format!("open: {e}"))?;
            let (size, hash) = hash_file(fd, buf).map_err(|e| format!("read: {e}"))?;
            entry.size = size;
            entry.hash = hash;
        }
        Kind::Symlink => {
            let target = rustix::fs::readlinkat(dir, name, Vec::new())
                .map_err(|e| format!("readlink: {e}"))?;
            entry.size = target.as_bytes().len() as u64;
            entry.hash = xxhash_rust::xxh3::xxh3_64(target.as_bytes());
        }
        Kind::Dir | Kind::Other => {}
    }
    Ok(entry)
}

/// What a replica must do to match a primary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    /// Entries only on the replica, or of another kind there; deepest first.
    pub remove: Vec<(RelPath, Kind)>,
    /// Directories missing on the replica, with their mode; parents first.
    pub mkdir: Vec<(RelPath, u32)>,
    /// Files and symlinks missing or with other contents on the replica.
    pub fetch: Vec<RelPath>,
    /// Same contents, other permission bits (files and directories).
    pub chmod: Vec<(RelPath, u32)>,
    /// Files with the same contents and another mtime.
    pub settimes: Vec<(RelPath, i64)>,
    /// Special files on the primary (fifos, sockets, devices): not replicated.
    pub skipped: Vec<RelPath>,
}

impl Diff {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.mkdir.is_empty()
            && self.fetch.is_empty()
            && self.chmod.is_empty()
            && self.settimes.is_empty()
    }
}

/// Compares a primary's manifest with a replica's.
pub fn diff(primary: &Manifest, replica: &Manifest) -> Diff {
    let mut d = Diff::default();
    for (path, r) in &replica.entries {
        match primary.entries.get(path) {
            Some(p) if p.kind == r.kind => {}
            _ => d.remove.push((path.clone(), r.kind)),
        }
    }
    // Byte order puts every path after its ancestors; reversed, descendants come first.
    d.remove.reverse();
    for (path, p) in &primary.entries {
        let r = replica.entries.get(path).filter(|r| r.kind == p.kind);
        match (p.kind, r) {
            (Kind::Other, _) => d.skipped.push(path.clone()),
            (Kind::Dir, None) => d.mkdir.push((path.clone(), p.mode)),
            (Kind::Dir, Some(r)) => {
                if r.mode != p.mode {
                    d.chmod.push((path.clone(), p.mode));
                }
            }
            (Kind::File | Kind::Symlink, None) => d.fetch.push(path.clone()),
            (Kind::Symlink, Some(r)) => {
                if (r.size, r.hash) != (p.size, p.hash) {
                    d.fetch.push(path.clone());
                }
            }
            (Kind::File, Some(r)) => {
                if (r.size, r.hash) != (p.size, p.hash) {
                    d.fetch.push(path.clone());
                } else {
                    if r.mode != p.mode {
                        d.chmod.push((path.clone(), p.mode));
                    }
                    if r.mtime_ns != p.mtime_ns {
                        d.settimes.push((path.clone(), p.mtime_ns));
                    }
                }
            }
        }
    }
    d
}

/// The operations that recreate one file or symlink of the primary on a replica, read from
/// the primary lazily: for a file `Create`, `Write`s of at most [`FETCH_CHUNK_BYTES`],
/// `Truncate` to the length read, `Chmod`, `SetTimes`; for a symlink `Unlink` + `Symlink`.
#[derive(Debug)]
pub struct EntryOps {
    path: RelPath,
    queue: VecDeque<Op>,
    file: Option<File>,
    offset: u64,
    /// The file's length when it was opened: reads are sized to it.
    expected: u64,
    tail: Vec<Op>,
}

impl EntryOps {
    fn open(root: BorrowedFd<'_>, path: &RelPath) -> Result<EntryOps, ManifestError> {
        let mut ops = EntryOps {
            path: path.clone(),
            queue: VecDeque::new(),
            file: None,
            offset: 0,
            expected: 0,
            tail: Vec::new(),
        };
        let shown = path.to_string();
        // Resolve the parent beneath the root first, so that not even a stat goes through a
        // symlink.
        let parent = match path.parent() {
            Some(p) => Some(
                open_beneath(
                    root,
                    p.as_path(),
                    OFlags::RDONLY | OFlags::DIRECTORY,
                    Mode::empty(),
                )
                .map_err(errno("open parent of", &shown))?,
            ),
            None => None,
        };
        let dir = parent.as_ref().map_or(root, |fd| fd.as_fd());
        let st = lstat_at(dir, file_name(path)).map_err(errno("stat", &shown))?;
        match kind(&st) {
            Kind::File => {
                let fd = open_for_reading(dir, file_name(path)).map_err(errno("open", &shown))?;
                let st = rustix::fs::fstat(&fd).map_err(errno("stat", &shown))?;
                if kind(&st) != Kind::File {
                    return Err(ManifestError::NotFetchable { path: path.clone() });
                }
                let mode = st.st_mode & MODE_BITS;
                ops.expected = u64::try_from(st.st_size).unwrap_or(0);
                ops.queue.push_back(Op::Create {
                    path: path.clone(),
                    mode,
                });
                ops.tail = vec![
                    Op::Chmod {
                        path: path.clone(),
                        mode,
                    },
                    Op::SetTimes {
                        path: path.clone(),
                        atime_ns: None,
                        mtime_ns: Some(mtime_ns(&st)),
                    },
                ];
                ops.file = Some(File::from(fd));
            }
            Kind::Symlink => {
                let target = rustix::fs::readlinkat(dir, file_name(path), Vec::new())
                    .map_err(errno("readlink", &shown))?;
                ops.queue.push_back(Op::Unlink { path: path.clone() });
                ops.queue.push_back(Op::Symlink {
                    target: target.into_bytes(),
                    path: path.clone(),
                });
            }
            Kind::Dir | Kind::Other => {
                return Err(ManifestError::NotFetchable { path: path.clone() });
            }
        }
        Ok(ops)
    }

    fn read_chunk(&mut self) -> Result<Option<Op>, ManifestError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(None);
        };
        let want = usize::try_from(self.expected.saturating_sub(self.offset))
            .unwrap_or(FETCH_CHUNK_BYTES)
            .clamp(FETCH_PROBE_BYTES, FETCH_CHUNK_BYTES);
        let mut data = vec![0u8; want];
        let mut filled = 0usize;
        while filled < data.len() {
            match file.read(&mut data[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    self.file = None;
                    return Err(ManifestError::Io {
                        op: "read",
                        path: self.path.to_string(),
                        source,
                    });
                }
            }
        }
        if filled == 0 {
            // The length read is the length sent: a file that changed size since the scan
            // still ends up consistent with the bytes that were shipped.
            self.file = None;
            self.queue.push_back(Op::Truncate {
                path: self.path.clone(),
                len: self.offset,
            });
            self.queue.extend(std::mem::take(&mut self.tail));
            return Ok(self.queue.pop_front());
        }
        data.truncate(filled);
        let op = Op::Write {
            path: self.path.clone(),
            offset: self.offset,
            data,
        };
        self.offset += filled as u64;
        Ok(Some(op))
    }
}

impl Iterator for EntryOps {
    type Item = Result<Op, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(op) = self.queue.pop_front() {
            return Some(Ok(op));
        }
        self.read_chunk().transpose()
    }
}

/// The operations that recreate the primary's file or symlink at `path` (beneath `root`).
pub fn entry_ops(root: &Path, path: &RelPath) -> Result<EntryOps, ManifestError> {
    let root_fd = open_root(root)?;
    EntryOps::open(root_fd.as_fd(), path)
}

/// Every operation of a resync, in an order that works: removals (deepest first), missing
/// directories (parents first), fetched files and symlinks, then mode and time fixes. An entry
/// that cannot be read yields an error item and the iteration goes on with the next one.
#[derive(Debug)]
pub struct ResyncOps {
    root: OwnedFd,
    queue: VecDeque<Op>,
    fetch: VecDeque<RelPath>,
    current: Option<EntryOps>,
    after: VecDeque<Op>,
}

impl ResyncOps {
    /// Plans the ops for `diff`, reading fetched entries from the primary tree at `root`.
    pub fn new(root: &Path, diff: &Diff) -> Result<ResyncOps, ManifestError> {
        let mut queue = VecDeque::new();
        for (path, kind) in &diff.remove {
            let path = path.clone();
            queue.push_back(match kind {
                Kind::Dir => Op::Rmdir { path },
                _ => Op::Unlink { path },
            });
        }
        for (path, mode) in &diff.mkdir {
            queue.push_back(Op::Mkdir {
                path: path.clone(),
                mode: *mode,
            });
        }
        let mut after = VecDeque::new();
        for (path, mode) in &diff.chmod {
            after.push_back(Op::Chmod {
                path: path.clone(),
                mode: *mode,
            });
        }
        for (path, mtime) in &diff.settimes {
            after.push_back(Op::SetTimes {
                path: path.clone(),
                atime_ns: None,
                mtime_ns: Some(*mtime),
            });
        }
        Ok(ResyncOps {
            root: open_root(root)?,
            queue,
            fetch: diff.fetch.iter().cloned().collect(),
            current: None,
            after,
        })
    }
}

impl Iterator for ResyncOps {
    type Item = Result<Op, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(op) = self.queue.pop_front() {
            return Some(Ok(op));
        }
        loop {
            if let Some(current) = self.current.as_mut() {
                match current.next() {
                    Some(item) => return Some(item),
                    None => self.current = None,
                }
            }
            let Some(path) = self.fetch.pop_front() else {
                return self.after.pop_front().map(Ok);
            };
            match EntryOps::open(self.root.as_fd(), &path) {
                Ok(ops) => self.current = Some(ops),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests;
