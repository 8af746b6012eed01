//! Files whose changes are replicated: [`File`] and the path operations [`rename`],
//! [`remove_file`], [`create_dir`], [`remove_dir`], with the shape of `std::fs`.
//!
//! Every change is first made with the real syscall, then logged to the ring of the fileset
//! the canonical path belongs to ([`crate::replog::Filesets`], from `FT_REPL_FILESETS`), under
//! the fileset's order lock, so one process logs its operations in the order its syscalls
//! completed. Paths outside every fileset are plain files: nothing is logged for them. In a
//! sync-mode fileset a change returns only once the backups have it durable. Nothing here ever
//! loses the local change because of replication: errors are reported after the fact.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard, PoisonError, RwLock};

use crate::replog::{Filesets, OpRef, RingError, Ticket};

/// Mode of files created by [`File::create`] (before the umask), as in `std::fs`.
const DEFAULT_FILE_MODE: u32 = 0o666;
/// Bytes read at a time when a file moved into a fileset is logged as writes.
const IMPORT_CHUNK: usize = 1 << 20;
/// Permission bits of `st_mode` (what `Op::Chmod` and `Op::Create` carry).
const PERMISSION_BITS: u32 = 0o7777;
/// What the kernel appends to the `/proc/self/fd` link of a directory that was removed.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// The process-wide filesets, read from the environment on first use.
static FILESETS: RwLock<Option<Arc<Filesets>>> = RwLock::new(None);

/// The filesets `ft::fs` and the C file API log to: `FT_REPL_FILESETS` on first use (an
/// invalid value is reported once on stderr and replicates nothing), or what
/// [`set_filesets`] installed.
pub fn filesets() -> Arc<Filesets> {
    if let Some(sets) = FILESETS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        return Arc::clone(sets);
    }
    let mut slot = FILESETS.write().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(slot.get_or_insert_with(|| {
        Arc::new(Filesets::from_env().unwrap_or_else(|e| {
            eprintln!("libft: files are not replicated: {e}");
            Filesets::none()
        }))
    }))
}

/// Replaces the process-wide filesets (files opened before keep the ones they had).
pub fn set_filesets(sets: Filesets) {
    *FILESETS.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(sets));
}

/// A change was made locally but could not be replicated as asked: not logged (ring full,
/// corrupt), or (sync mode) not confirmed durable by the backups in time — the operation then
/// stays queued in the ring. The `io::Error` carrying it has kind `TimedOut` for the latter,
/// `StorageFull` for a full ring, `Other` otherwise.
#[derive(Debug, thiserror::Error)]
#[error("the {op} was done locally but not replicated as asked: {source}")]
pub struct ReplicationError {
    /// What was done (`write`, `rename`, ...).
    pub op: &'static str,
    /// Why.
    #[source]
    pub source: RingError,
}

impl ReplicationError {
    /// Whether only the durability confirmation is missing (the operation is logged).
    pub fn is_durability_timeout(&self) -> bool {
        matches!(self.source, RingError::NotDurable(_))
    }
}

fn replication_error(op: &'static str, source: RingError) -> io::Error {
    let kind = match source {
        RingError::NotDurable(_) => io::ErrorKind::TimedOut,
        RingError::Full(_) => io::ErrorKind::StorageFull,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, ReplicationError { op, source })
}

/// Where a path's operations are logged: its fileset and its path relative to the root.
#[derive(Debug, Clone)]
struct Target {
    sets: Arc<Filesets>,
    index: usize,
    rel: Vec<u8>,
}

impl Target {
    fn order(&self) -> Option<MutexGuard<'_, ()>> {
        self.sets.order_lock(self.index)
    }

    /// Appends under the caller's order lock.
    fn log(&self, what: &'static str, op: OpRef<'_>) -> io::Result<Option<Ticket>> {
        self.sets
            .append(self.index, op)
            .map_err(|e| replication_error(what, e))
    }

    /// Sync mode: waits for the backups, outside the order lock.
    fn settle(&self, what: &'static str, ticket: Option<Ticket>) -> io::Result<()> {
        match ticket {
            Some(t) => self
                .sets
                .wait_durable(self.index, t)
                .map_err(|e| replication_error(what, e)),
            None => Ok(()),
        }
    }
}

/// The canonical absolute path of a directory entry: its parent's canonical path plus its
/// final name (the entry itself is not resolved: rename and unlink act on a symlink, not its
/// target). `None` when the parent does not resolve (the syscall will fail on its own).
fn canonical_entry(path: &Path) -> Option<PathBuf> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            Some(canonical_dir(parent)?.join(name))
        }
        // `/`, `..` or a path ending in `..`: there is no final name to keep.
        _ => std::fs::canonicalize(path).ok(),
    }
}

/// The canonical path of a directory, as the kernel names it: one path walk (an `O_PATH` open)
/// and a readlink of its `/proc/self/fd` entry, where `realpath` walks the path again for each
/// of its components. Falls back to `realpath` without /proc.
fn canonical_dir(dir: &Path) -> Option<PathBuf> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir);
    let Ok(handle) = opened else {
        return std::fs::canonicalize(dir).ok();
    };
    let link = format!("/proc/self/fd/{}", handle.as_raw_fd());
    match std::fs::read_link(link) {
        // The kernel marks a directory removed meanwhile with " (deleted)": not canonical.
        Ok(p) if p.is_absolute() && !p.as_os_str().as_bytes().ends_with(DELETED_SUFFIX) => Some(p),
        _ => std::fs::canonicalize(dir).ok(),
    }
}

/// The canonical path of the file an open will reach: like [`canonical_entry`], but a final
/// symlink is followed when its target exists.
fn canonical_file(path: &Path) -> Option<PathBuf> {
    let entry = canonical_entry(path)?;
    match std::fs::symlink_metadata(&entry) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(&entry).ok().or(Some(entry)),
        _ => Some(entry),
    }
}

fn classify(sets: &Arc<Filesets>, canonical: Option<PathBuf>) -> Option<Target> {
    if sets.is_empty() {
        return None;
    }
    let canonical = canonical?;
    let (index, rel) = sets.classify(canonical.as_os_str().as_bytes())?;
    Some(Target {
        sets: Arc::clone(sets),
        index,
        rel: rel.to_vec(),
    })
}

/// Options for [`File::open`], those of `std::fs::OpenOptions` (which cannot be inspected,
/// and what gets logged depends on them).
#[derive(Debug, Clone)]
pub struct OpenOptions {
    read: bool,
    write: bool,
    append: bool,
    truncate: bool,
    create: bool,
    create_new: bool,
    mode: u32,
    custom_flags: i32,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenOptions {
    /// All options off, mode 0o666.
    pub fn new() -> Self {
        Self {
            read: false,
            write: false,
            append: false,
            truncate: false,
            create: false,
            create_new: false,
            mode: DEFAULT_FILE_MODE,
            custom_flags: 0,
        }
    }
    /// Open for reading.
    pub fn read(&mut self, on: bool) -> &mut Self {
        self.read = on;
        self
    }
    /// Open for writing.
    pub fn write(&mut self, on: bool) -> &mut Self {
        self.write = on;
        self
    }
    /// Every write goes to the end of the file (`O_APPEND`).
    pub fn append(&mut self, on: bool) -> &mut Self {
        self.append = on;
        self
    }
    /// Truncate to length 0 on open (logged as a truncation).
    pub fn truncate(&mut self, on: bool) -> &mut Self {
        self.truncate = on;
        self
    }
    /// Create the file if it does not exist (logged as a create).
    pub fn create(&mut self, on: bool) -> &mut Self {
        self.create = on;
        self
    }
    /// Create the file, failing if it exists.
    pub fn create_new(&mut self, on: bool) -> &mut Self {
        self.create_new = on;
        self
    }
    /// Permission bits of a created file, before the umask.
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = mode;
        self
    }
    /// Further `open(2)` flags (e.g. `O_SYNC`, `O_NOFOLLOW`).
    pub fn custom_flags(&mut self, flags: i32) -> &mut Self {
        self.custom_flags = flags;
        self
    }
    /// Opens `path` with these options.
    pub fn open(&self, path: impl AsRef<Path>) -> io::Result<File> {
        File::open(path, self)
    }

    fn to_std(&self) -> std::fs::OpenOptions {
        let mut o = std::fs::OpenOptions::new();
        o.read(self.read)
            .write(self.write)
            .append(self.append)
            .truncate(self.truncate)
            .create(self.create)
            .create_new(self.create_new)
            .mode(self.mode)
            .custom_flags(self.custom_flags);
        o
    }
}

/// An open file whose changes are logged for replication when it lies in a fileset.
///
/// Reads, writes and seeks go through this value, which tracks the file offset itself (so a
/// write is logged at its offset without an extra syscall): do not move the offset of the
/// underlying descriptor behind its back.
#[derive(Debug)]
pub struct File {
    file: std::fs::File,
    pos: u64,
    append: bool,
    target: Option<Target>,
}

impl File {
    /// Opens a file for writing, creating it or truncating it (like `std::fs::File::create`).
    pub fn create(path: impl AsRef<Path>) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    }

    /// Options to open a file with.
    pub fn options() -> OpenOptions {
        OpenOptions::new()
    }

    /// Opens `path` with `options`, logging the creation and truncation it implies.
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> io::Result<File> {
        let path = path.as_ref();
        let sets = filesets();
        if sets.is_empty() {
            let file = options.to_std().open(path)?;
            return Ok(Self::wrap(file, options, None));
        }
        // The file an open reaches is the entry itself unless that is a symlink. Rather than
        // look first (one more path walk per open), open with O_NOFOLLOW: it fails, with no
        // effect, exactly when the entry is a symlink, which then takes the long way.
        if options.custom_flags & libc::O_NOFOLLOW == 0 {
            let mut direct = options.clone();
            direct.custom_flags |= libc::O_NOFOLLOW;
            match Self::open_as(path, &direct, classify(&sets, canonical_entry(path))) {
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {}
                other => return other,
            }
        }
        Self::open_as(path, options, classify(&sets, canonical_file(path)))
    }

    /// Opens `path`, which reaches the file of `target` (`None`: outside every fileset).
    fn open_as(path: &Path, options: &OpenOptions, target: Option<Target>) -> io::Result<File> {
        let Some(target) = target else {
            let file = options.to_std().open(path)?;
            return Ok(Self::wrap(file, options, None));
        };
        let (file, last) = {
            let _order = target.order();
            let file = options.to_std().open(path)?;
            let mut last = None;
            if options.create || options.create_new {
                let mode = file.metadata()?.mode() & PERMISSION_BITS;
                last = target.log(
                    "create",
                    OpRef::Create {
                        path: &target.rel,
                        mode,
                    },
                )?;
            }
            if options.truncate && (options.write || options.append) {
                last = target
                    .log(
                        "truncate",
                        OpRef::Truncate {
                            path: &target.rel,
                            len: 0,
                        },
                    )?
                    .or(last);
            }
            (file, last)
        };
        target.settle("create", last)?;
        Ok(Self::wrap(file, options, Some(target)))
    }

    fn wrap(file: std::fs::File, options: &OpenOptions, target: Option<Target>) -> File {
        File {
            file,
            pos: 0,
            append: options.append,
            target,
        }
    }

    /// Whether changes of this file are logged (it lies in a fileset).
    pub fn is_replicated(&self) -> bool {
        self.target.is_some()
    }

    /// The fileset's name and the path relative to its root, when replicated.
    pub fn replicated_as(&self) -> Option<(&str, &[u8])> {
        let t = self.target.as_ref()?;
        Some((t.sets.get(t.index)?.name.as_str(), &t.rel))
    }

    /// Writes at `offset` without moving the file offset (`pwrite`). On a file opened for
    /// appending, Linux appends instead, and the write is logged where it landed.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let Some(target) = &self.target else {
            return self.file.write_at(buf, offset);
        };
        let (n, ticket) = {
            let _order = target.order();
            let n = self.file.write_at(buf, offset)?;
            let at = if self.append {
                self.file.metadata()?.len().saturating_sub(n as u64)
            } else {
                offset
            };
            (n, log_write(target, at, &buf[..n])?)
        };
        target.settle("write", ticket)?;
        Ok(n)
    }

    /// Reads at `offset` without moving the file offset (`pread`).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    /// Truncates or extends the file (logged as a truncation).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        let Some(target) = &self.target else {
            return self.file.set_len(len);
        };
        let ticket = {
            let _order = target.order();
            self.file.set_len(len)?;
            target.log(
                "truncate",
                OpRef::Truncate {
                    path: &target.rel,
                    len,
                },
            )?
        };
        target.settle("truncate", ticket)
    }

    /// Makes the file durable locally (`fsync`) and, logged as an fsync, on the replicas; in
    /// sync mode returns once the backups have every earlier change of the fileset durable.
    pub fn sync_all(&self) -> io::Result<()> {
        self.sync_with("fsync", std::fs::File::sync_all)
    }

    /// Like [`sync_all`](Self::sync_all) with `fdatasync` locally.
    pub fn sync_data(&self) -> io::Result<()> {
        self.sync_with("fdatasync", std::fs::File::sync_data)
    }

    fn sync_with(
        &self,
        what: &'static str,
        sync: impl FnOnce(&std::fs::File) -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(target) = &self.target else {
            return sync(&self.file);
        };
        let ticket = {
            let _order = target.order();
            sync(&self.file)?;
            target.log(what, OpRef::Fsync { path: &target.rel })?
        };
        target.settle(what, ticket)
    }

    /// Changes the permission bits (logged as a chmod).
    pub fn set_permissions(&self, perm: std::fs::Permissions) -> io::Result<()> {
        let Some(target) = &self.target else {
            return self.file.set_permissions(perm);
        };
        let mode = perm.mode() & PERMISSION_BITS;
        let ticket = {
            let _order = target.order();
            self.file.set_permissions(perm)?;
            target.log(
                "chmod",
                OpRef::Chmod {
                    path: &target.rel,
                    mode,
                },
            )?
        };
        target.settle("chmod", ticket)
    }

    /// The file's metadata.
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.file.metadata()
    }
}

impl Write for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(target) = &self.target else {
            let n = self.file.write(buf)?;
            self.pos += n as u64;
            return Ok(n);
        };
        let (n, ticket) = {
            let _order = target.order();
            let n = self.file.write(buf)?;
            let offset = if self.append {
                // O_APPEND: the kernel chose the offset; the file offset is now past the data.
                self.file.stream_position()?.saturating_sub(n as u64)
            } else {
                self.pos
            };
            self.pos = offset + n as u64;
            (n, log_write(target, offset, &buf[..n])?)
        };
        target.settle("write", ticket)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Nothing is buffered: every write is in the kernel (and logged) when it returns.
        Ok(())
    }
}

impl Read for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for File {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.pos = self.file.seek(pos)?;
        Ok(self.pos)
    }
}

/// Renames `from` to `to` (like `std::fs::rename`). Within one fileset it is logged as a
/// rename; an entry leaving a fileset is logged as its removal (its whole tree), an entry
/// entering one as its creation with its contents.
pub fn rename(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    let (from, to) = (from.as_ref(), to.as_ref());
    let sets = filesets();
    let src = classify(&sets, canonical_entry(from));
    let dst = classify(&sets, canonical_entry(to));
    if src.is_none() && dst.is_none() {
        return std::fs::rename(from, to);
    }
    // Take both order locks in index order, so two renames in opposite directions cannot
    // deadlock.
    let mut indices: Vec<usize> = src.iter().chain(dst.iter()).map(|t| t.index).collect();
    indices.sort_unstable();
    indices.dedup();
    let mut tickets: Vec<(Target, Option<Ticket>)> = Vec::new();
    {
        let _locks: Vec<_> = indices.iter().filter_map(|&i| sets.order_lock(i)).collect();
        std::fs::rename(from, to)?;
        match (&src, &dst) {
            (Some(s), Some(d)) if s.index == d.index => {
                let t = s.log(
                    "rename",
                    OpRef::Rename {
                        from: &s.rel,
                        to: &d.rel,
                    },
                )?;
                tickets.push((s.clone(), t));
            }
            _ => {
                // The moved entry now lives at `to`: walk it there.
                if let Some(s) = &src {
                    let t = log_removal(s, &s.rel, to)?;
                    tickets.push((s.clone(), t));
                }
                if let Some(d) = &dst {
                    let t = log_import(d, &d.rel, to)?;
                    tickets.push((d.clone(), t));
                }
            }
        }
    }
    for (target, ticket) in tickets {
        target.settle("rename", ticket)?;
    }
    Ok(())
}

/// Logs the removal of the tree that was at `rel` and now lies at `now_at`, deepest first.
fn log_removal(target: &Target, rel: &[u8], now_at: &Path) -> io::Result<Option<Ticket>> {
    let meta = std::fs::symlink_metadata(now_at)?;
    if !meta.is_dir() {
        return target.log("rename", OpRef::Unlink { path: rel });
    }
    let mut last = None;
    for entry in std::fs::read_dir(now_at)? {
        let entry = entry?;
        let child = join_rel(rel, entry.file_name().as_bytes());
        last = log_removal(target, &child, &entry.path())?.or(last);
    }
    Ok(target.log("rename", OpRef::Rmdir { path: rel })?.or(last))
}

/// Logs the creation of the tree now at `at` as `rel`: directories, files with their
/// contents and modes, symlinks. Other kinds (fifos, devices, sockets) are not replicated.
fn log_import(target: &Target, rel: &[u8], at: &Path) -> io::Result<Option<Ticket>> {
    let meta = std::fs::symlink_metadata(at)?;
    let mode = meta.mode() & PERMISSION_BITS;
    let ft = meta.file_type();
    let mut last;
    if ft.is_dir() {
        target.log("rename", OpRef::Mkdir { path: rel, mode })?;
        last = target.log("rename", OpRef::Chmod { path: rel, mode })?;
        for entry in std::fs::read_dir(at)? {
            let entry = entry?;
            let child = join_rel(rel, entry.file_name().as_bytes());
            last = log_import(target, &child, &entry.path())?.or(last);
        }
    } else if ft.is_symlink() {
        let dest = std::fs::read_link(at)?;
        target.log("rename", OpRef::Unlink { path: rel })?;
        last = target.log(
            "rename",
            OpRef::Symlink {
                target: dest.as_os_str().as_bytes(),
                path: rel,
            },
        )?;
    } else if ft.is_file() {
        target.log("rename", OpRef::Unlink { path: rel })?;
        target.log("rename", OpRef::Create { path: rel, mode })?;
        let mut file = std::fs::File::open(at)?;
        let mut buf = vec![0u8; IMPORT_CHUNK];
        let mut offset = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            target.log(
                "rename",
                OpRef::Write {
                    path: rel,
                    offset,
                    data: &buf[..n],
                },
            )?;
            offset += n as u64;
        }
        last = target.log("rename", OpRef::Chmod { path: rel, mode })?;
    } else {
        last = None;
    }
    Ok(last)
}

fn log_write(target: &Target, offset: u64, data: &[u8]) -> io::Result<Option<Ticket>> {
    if data.is_empty() {
        return Ok(None);
    }
    target.log(
        "write",
        OpRef::Write {
            path: &target.rel,
            offset,
            data,
        },
    )
}

fn join_rel(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
    v.extend_from_slice(parent);
    v.push(b'/');
    v.extend_from_slice(name);
    v
}

/// Runs `syscall` on a path and logs `op(rel)` when the path lies in a fileset.
fn path_op(
    path: &Path,
    what: &'static str,
    syscall: impl FnOnce(&Path) -> io::Result<()>,
    op: impl for<'r> FnOnce(&'r [u8], &Path) -> io::Result<OpRef<'r>>,
) -> io::Result<()> {
    let sets = filesets();
    let Some(target) = classify(&sets, canonical_entry(path)) else {
        return syscall(path);
    };
    let ticket = {
        let _order = target.order();
        syscall(path)?;
        target.log(what, op(&target.rel, path)?)?
    };
    target.settle(what, ticket)
}

/// Removes a file or symlink (logged as an unlink).
pub fn remove_file(path: impl AsRef<Path>) -> io::Result<()> {
    path_op(
        path.as_ref(),
        "unlink",
        |p| std::fs::remove_file(p),
        |rel, _| Ok(OpRef::Unlink { path: rel }),
    )
}

/// Creates a directory (logged as a mkdir with the mode it got).
pub fn create_dir(path: impl AsRef<Path>) -> io::Result<()> {
    path_op(
        path.as_ref(),
        "mkdir",
        |p| std::fs::create_dir(p),
        |rel, p| {
            let mode = std::fs::symlink_metadata(p)?.mode() & PERMISSION_BITS;
            Ok(OpRef::Mkdir { path: rel, mode })
        },
    )
}

/// Removes an empty directory (logged as an rmdir).
pub fn remove_dir(path: impl AsRef<Path>) -> io::Result<()> {
    path_op(
        path.as_ref(),
        "rmdir",
        |p| std::fs::remove_dir(p),
        |rel, _| Ok(OpRef::Rmdir { path: rel }),
    )
}
