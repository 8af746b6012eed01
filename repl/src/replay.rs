//! Replay: applies [`OpRecord`]s in sequence order to a replica directory on a backup and keeps
//! the applied seq durably. Owns the confinement of every operation beneath the replica root
//! (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, `*at` calls on the final name relative to a
//! parent resolved that way); it must never follow a symlink, never touch anything outside the
//! root, and never stop the stream on an operation the replica's state does not allow.
//!
//! ```text
//!   SegmentLog ──read_from──► drain ──apply──► Replica ──commit──► fsync tree, then <state>/applied
//! ```
//!
//! Idempotency (for a stream a primary produced, where every operation succeeded): applied
//! again to the state it produced, or for operations confined to their own path to any later
//! state followed by the operations after it, an operation changes nothing in the end. Writes
//! land at their offset, creates never truncate, removals of what is gone are done, removals
//! are forceful (whatever is at the path goes, as it went on the primary), and modes are exact
//! whatever the umask. Renames and links are not idempotent against later states (the source
//! name may hold a newer file by then), so `apply` commits right before and right after each
//! of them: a crash can re-apply one only to the state just before or just after it. Removing
//! one name of a hard-linked file is preceded by a commit too: operations made through that
//! name before it went must not be re-applied (they could no longer reach the file through its
//! other names).

mod resolve;
mod state;

#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::segment::{LogError, SegmentLog};
use crate::{Op, OpRecord, RelPath};

pub(crate) use resolve::{FileId, ParentDir, file_name, identity, kind_of, lstat_at, open_beneath};
pub use state::APPLIED_FILE;

/// Mode of a regular file that a `Write` has to create (it carries no mode).
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Mode of a parent directory created because an operation needed it.
pub const DEFAULT_DIR_MODE: u32 = 0o755;
/// Writable file descriptors kept open between operations (a stream of writes into the same
/// file then costs one `pwrite` each).
pub const MAX_CACHED_FILES: usize = 64;
/// Changed files and directories remembered for `fsync` at the next commit; beyond this the
/// commit syncs the whole filesystem (`syncfs`) instead.
pub const MAX_DIRTY_FDS: usize = 256;
/// Deepest directory tree a forceful removal descends into (one open fd per level).
pub const MAX_REMOVE_DEPTH: usize = 128;
/// `drain` commits after this many records so that a crash re-applies a bounded amount.
pub const DRAIN_COMMIT_EVERY: u64 = 4096;

/// Permission bits applied by `Create`, `Mkdir` and `Chmod` (setuid, setgid, sticky, rwx).
const MODE_BITS: u32 = 0o7777;
/// One past the largest byte offset a file can have (`off_t` is signed).
const MAX_FILE_END: u64 = 0x7fff_ffff_ffff_ffff;
const NANOS_PER_SEC: i64 = 1_000_000_000;
/// Passes over a directory being removed before giving up on entries that keep appearing.
const REMOVE_PASSES: usize = 3;

/// Errors of replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The operation would have reached outside the replica root (through a symlink); it was
    /// refused and counted, the applied seq moved past it (the stream goes on).
    #[error("op {seq} on {path} refused: {why}")]
    Escape {
        seq: u64,
        path: RelPath,
        why: String,
    },
    /// The log payload is not a valid record for this seq; refused and counted, the applied
    /// seq moved past it (the stream goes on).
    #[error("record {seq} refused: {why}")]
    Undecodable { seq: u64, why: String },
    /// The record is not the next one: records in between were never applied.
    #[error("record {got} would skip records: the replica has applied through {applied}")]
    Gap { applied: u64, got: u64 },
    /// An I/O error that is not about the replica's state (disk full, I/O error, ...); the
    /// record was not applied and can be retried.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The applied-seq file is damaged.
    #[error("the applied-seq file {path} is damaged ({why}); resync the replica")]
    State { path: PathBuf, why: String },
    /// Another replica uses the state directory.
    #[error("the replica state directory {path} is in use by another process")]
    Locked { path: PathBuf },
    /// The kernel lacks openat2 (Linux 5.6 or later is needed).
    #[error("openat2 is not available (Linux 5.6 or later is needed to confine replay)")]
    Unsupported,
    /// An earlier sync of the replica failed: what reached the disk is unknown.
    #[error("the replica is unusable after a failed sync ({reason}); reopen it")]
    Poisoned { reason: String },
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

impl ReplayError {
    /// Whether the record was consumed (refused and counted; the applied seq moved past it),
    /// so the caller goes on with the next one.
    pub fn consumed(&self) -> bool {
        matches!(
            self,
            ReplayError::Escape { .. } | ReplayError::Undecodable { .. }
        )
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReplayError + 'a {
    move |source| ReplayError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// What applying one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The operation changed the replica.
    Done,
    /// Its effect was already present (re-application after a crash).
    AlreadyDone,
    /// `seq <= applied`: not looked at.
    Skipped,
    /// The replica's state does not allow it (a later state during re-application, or a
    /// replica that diverged); nothing was changed, the stream goes on.
    Conflict { why: String },
}

/// Counters since the replica was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Operations that changed the replica.
    pub done: u64,
    /// Operations whose effect was already present.
    pub already_done: u64,
    /// Records at or below the applied seq.
    pub skipped: u64,
    /// Operations the replica's state did not allow.
    pub conflicts: u64,
    /// Records refused: escapes and undecodable payloads.
    pub refused: u64,
    /// Durable commits.
    pub commits: u64,
}

/// Why an operation did not complete (internal).
#[derive(Debug)]
enum Fail {
    Conflict(String),
    Escape(String),
    Io {
        op: &'static str,
        path: String,
        errno: Errno,
    },
}

/// Errnos that describe the replica's state (what is or is not at a path) rather than a
/// failing system: the operation is skipped as a conflict instead of stalling the stream.
fn is_state_mismatch(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT
            | Errno::EXIST
            | Errno::NOTDIR
            | Errno::ISDIR
            | Errno::NOTEMPTY
            | Errno::LOOP
            | Errno::OPNOTSUPP
            | Errno::INVAL
            | Errno::MLINK
            | Errno::NAMETOOLONG
            | Errno::PERM
            | Errno::ACCESS
            | Errno::FBIG
            | Errno::XDEV
            | Errno::TXTBSY
            | Errno::OVERFLOW
            | Errno::BUSY
            | Errno::NXIO
            | Errno::ILSEQ
    )
}

fn op_fail(e: Errno, op: &'static str, path: &RelPath) -> Fail {
    if is_state_mismatch(e) {
        Fail::Conflict(format!("{op} {path}: {e}"))
    } else {
        Fail::Io {
            op,
            path: path.to_string(),
            errno: e,
        }
    }
}

fn timespec(ns: Option<i64>) -> Timespec {
    match ns {
        Some(ns) => Timespec {
            tv_sec: ns.div_euclid(NANOS_PER_SEC),
            tv_nsec: ns.rem_euclid(NANOS_PER_SEC),
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
    }
}

fn mode(bits: u32) -> Mode {
    Mode::from_raw_mode(bits & MODE_BITS)
}

/// Creates the regular file `name` in `dir` with exactly `bits` as its mode (whatever this
/// process's umask), failing with EEXIST when something is there. Where the filesystem has
/// `O_TMPFILE` the file appears under its name with its final mode already set, so a crash can
/// never leave it with the umask's mode (a re-applied `Create` would find it and keep it).
fn create_exclusive(dir: BorrowedFd<'_>, name: &OsStr, bits: u32) -> Result<OwnedFd, Errno> {
    let unnamed = rustix::fs::openat(
        dir,
        c".",
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        mode(bits),
    );
    match unnamed {
        Ok(fd) => {
            rustix::fs::fchmod(&fd, mode(bits))?;
            match rustix::fs::linkat(&fd, c"", dir, name, AtFlags::EMPTY_PATH) {
                Ok(()) => return Ok(fd),
                // Linking an fd by itself needs CAP_DAC_READ_SEARCH on older kernels.
                Err(Errno::NOENT | Errno::PERM | Errno::ACCESS) => {}
                Err(e) => return Err(e),
            }
        }
        // No O_TMPFILE on this filesystem.
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
        Err(e) => return Err(e),
    }
    let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CREATE | OFlags::EXCL;
    let fd = open_beneath(dir, name, flags, mode(bits))?;
    rustix::fs::fchmod(&fd, mode(bits))?;
    Ok(fd)
}

/// A writable file kept open between operations.
#[derive(Debug, Clone)]
struct OpenFile {
    fd: Arc<OwnedFd>,
    id: FileId,
}

/// A replica directory and its durable applied seq.
#[derive(Debug)]
pub struct Replica {
    root_path: PathBuf,
    root: OwnedFd,
    root_dev: u64,
    state: state::StateFile,
    applied: u64,
    committed: u64,
    files: HashMap<RelPath, OpenFile>,
    dirty: HashMap<FileId, Arc<OwnedFd>>,
    root_dirty: bool,
    dirty_overflow: bool,
    poisoned: Option<String>,
    stats: ReplayStats,
}

impl Replica {
    /// Opens the replica rooted at `root` (created if missing) with its applied seq kept in
    /// `<state_dir>/applied` (0 when new). `state_dir` is locked against a second opener;
    /// keep it apart from the log directory.
    pub fn open(root: &Path, state_dir: &Path) -> Result<Replica, ReplayError> {
        std::fs::create_dir_all(root).map_err(io_err("create directory", root))?;
        let root_fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open", root)(e.into()))?;
        let root_dev = rustix::fs::fstat(&root_fd)
            .map_err(|e| io_err("stat", root)(e.into()))?
            .st_dev;
        match rustix::fs::openat2(
            &root_fd,
            ".",
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            resolve::no_symlinks(),
        ) {
            Ok(_) => {}
            Err(Errno::NOSYS) => return Err(ReplayError::Unsupported),
            Err(e) => return Err(io_err("openat2", root)(e.into())),
        }
        let (state, applied) = state::StateFile::open(state_dir)?;
        Ok(Replica {
            root_path: root.to_path_buf(),
            root: root_fd,
            root_dev,
            state,
            applied,
            committed: applied,
            files: HashMap::new(),
            dirty: HashMap::new(),
            root_dirty: false,
            dirty_overflow: false,
            poisoned: None,
            stats: ReplayStats::default(),
        })
    }

    /// The replica root.
    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// The last seq applied (or refused) in this process; durable only after `commit`.
    pub fn applied_seq(&self) -> u64 {
        self.applied
    }

    /// The applied seq as last stored durably.
    pub fn committed_seq(&self) -> u64 {
        self.committed
    }

    /// Counters since open.
    pub fn stats(&self) -> ReplayStats {
        self.stats
    }

    fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    fn check_usable(&self) -> Result<(), ReplayError> {
        match &self.poisoned {
            Some(reason) => Err(ReplayError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, err: ReplayError) -> ReplayError {
        tracing::error!(root = %self.root_path.display(), error = %err, "replica poisoned");
        self.poisoned = Some(err.to_string());
        err
    }

    /// `Some(Skipped)` for an old record, an error for a gap, `None` for the next record.
    fn admit(&mut self, seq: u64) -> Result<Option<Applied>, ReplayError> {
        if seq <= self.applied {
            self.stats.skipped += 1;
            return Ok(Some(Applied::Skipped));
        }
        if seq - self.applied > 1 {
            return Err(ReplayError::Gap {
                applied: self.applied,
                got: seq,
            });
        }
        Ok(None)
    }

    /// Applies one record: `seq <= applied` is skipped, `seq > applied + 1` is a gap. An escape
    /// is returned as [`ReplayError::Escape`] with the record consumed; other I/O errors leave
    /// the record unapplied. Renames and links are bracketed by commits (see the module doc).
    pub fn apply(&mut self, rec: &OpRecord) -> Result<Applied, ReplayError> {
        self.check_usable()?;
        if let Some(skipped) = self.admit(rec.seq)? {
            return Ok(skipped);
        }
        let barrier = matches!(rec.op, Op::Rename { .. } | Op::Link { .. });
        let removes_shared = match &rec.op {
            Op::Unlink { path } | Op::Rmdir { path } => self.is_shared_file(path),
            _ => false,
        };
        if barrier || removes_shared {
            self.commit()?;
        }
        let outcome = self.apply_op(&rec.op);
        let applied = match outcome {
            Ok(a) => a,
            Err(Fail::Conflict(why)) => {
                tracing::warn!(seq = rec.seq, op = ?rec.op, %why, "replay: operation skipped");
                self.stats.conflicts += 1;
                Applied::Conflict { why }
            }
            Err(Fail::Escape(why)) => {
                tracing::warn!(seq = rec.seq, op = ?rec.op, %why, "replay: escape refused");
                self.stats.refused += 1;
                self.applied = rec.seq;
                return Err(ReplayError::Escape {
                    seq: rec.seq,
                    path: rec.op.path().clone(),
                    why,
                });
            }
            Err(Fail::Io { op, path, errno }) => {
                return Err(ReplayError::Io {
                    op,
                    path,
                    source: errno.into(),
                });
            }
        };
        match applied {
            Applied::Done => self.stats.done += 1,
            Applied::AlreadyDone => self.stats.already_done += 1,
            _ => {}
        }
        self.applied = rec.seq;
        // Also after an AlreadyDone or a conflict: the record must not stay in the window
        // that a later crash re-applies.
        if barrier {
            self.commit()?;
        }
        Ok(applied)
    }

    /// Decodes a log payload (see [`encode_record`]) and applies it. A payload that does not
    /// decode, or carries another seq, is refused as [`ReplayError::Undecodable`] (consumed).
    pub fn apply_encoded(&mut self, seq: u64, payload: &[u8]) -> Result<Applied, ReplayError> {
        self.check_usable()?;
        if let Some(skipped) = self.admit(seq)? {
            return Ok(skipped);
        }
        let why = match decode_record(payload) {
            Ok(rec) if rec.seq == seq => return self.apply(&rec),
            Ok(rec) => format!("the payload carries seq {}", rec.seq),
            Err(e) => format!("undecodable payload: {e}"),
        };
        tracing::warn!(seq, %why, "replay: record refused");
        self.stats.refused += 1;
        self.applied = seq;
        Err(ReplayError::Undecodable { seq, why })
    }

    /// Makes every change applied so far durable (fsync of the touched files and directories,
    /// or `syncfs` when there were too many), then stores the applied seq with the atomic
    /// recipe. Returns the durable applied seq. A failed sync poisons the replica.
    pub fn commit(&mut self) -> Result<u64, ReplayError> {
        self.check_usable()?;
        let clean = self.dirty.is_empty() && !self.root_dirty && !self.dirty_overflow;
        if clean && self.applied == self.committed {
            return Ok(self.committed);
        }
        if let Err(e) = self.sync_changes() {
            return Err(self.poison(e));
        }
        self.state.store(self.applied)?;
        self.committed = self.applied;
        self.stats.commits += 1;
        Ok(self.committed)
    }

    fn sync_changes(&mut self) -> Result<(), ReplayError> {
        let failed = |e: Errno| io_err("sync", &self.root_path)(e.into());
        if self.dirty_overflow {
            rustix::fs::syncfs(&self.root).map_err(failed)?;
        } else {
            for fd in self.dirty.values() {
                rustix::fs::fsync(fd.as_fd()).map_err(failed)?;
            }
            if self.root_dirty {
                rustix::fs::fsync(&self.root).map_err(failed)?;
            }
        }
        self.dirty.clear();
        self.root_dirty = false;
        self.dirty_overflow = false;
        Ok(())
    }

    /// Declares (durably) that the replica's content corresponds to stream position `seq`,
    /// for a resync: the next record applied is `seq + 1`. Pending changes are made durable
    /// first.
    pub fn rebase(&mut self, seq: u64) -> Result<(), ReplayError> {
        self.check_usable()?;
        if let Err(e) = self.sync_changes() {
            return Err(self.poison(e));
        }
        self.state.store(seq)?;
        self.applied = seq;
        self.committed = seq;
        self.stats.commits += 1;
        Ok(())
    }

    /// Whether `path` names a non-directory that has other names too (hard links).
    fn is_shared_file(&self, path: &RelPath) -> bool {
        let Ok(Some(parent)) = self.existing_parent(path) else {
            return false;
        };
        lstat_at(parent.fd(self.root_fd()), file_name(path))
            .is_ok_and(|st| kind_of(&st) != FileType::Directory && st.st_nlink > 1)
    }

    // ----- dirty tracking and the fd cache -----

    fn mark_dirty(&mut self, fd: Arc<OwnedFd>, id: FileId) {
        if self.dirty_overflow {
            return;
        }
        if self.dirty.len() >= MAX_DIRTY_FDS && !self.dirty.contains_key(&id) {
            self.dirty.clear();
            self.dirty_overflow = true;
            return;
        }
        self.dirty.entry(id).or_insert(fd);
    }

    fn mark_dir_dirty(&mut self, dir: ParentDir) {
        match dir {
            ParentDir::Root => self.root_dirty = true,
            ParentDir::Dir(fd) => match rustix::fs::fstat(&fd) {
                Ok(st) => self.mark_dirty(Arc::new(fd), identity(&st)),
                // Cannot tell which directory this is: sync the whole filesystem instead.
                Err(_) => {
                    self.dirty.clear();
                    self.dirty_overflow = true;
                }
            },
        }
    }

    fn remember(&mut self, path: &RelPath, file: OpenFile) {
        if self.files.len() >= MAX_CACHED_FILES {
            self.files.clear();
        }
        self.files.insert(path.clone(), file);
    }

    /// Drops cached fds at or beneath `path`: its name now refers to something else.
    fn forget(&mut self, path: &RelPath) {
        self.files.retain(|p, _| !p.starts_with(path));
    }

    // ----- resolution -----

    /// Maps a refused resolution of `probe` (a prefix of, or, the operation's path) to an
    /// escape when following its symlinks would leave the root, else to a conflict.
    fn resolve_fail(&self, e: Errno, probe: &RelPath, what: &'static str) -> Fail {
        match e {
            // ENOTDIR is what a symlink in place of a directory gives with O_DIRECTORY.
            Errno::LOOP | Errno::NOTDIR if resolve::leads_outside(self.root_fd(), probe) => {
                Fail::Escape(format!(
                    "{what}: {probe} leads outside the replica root through a symlink"
                ))
            }
            Errno::LOOP => Fail::Conflict(format!(
                "{what}: {probe} is or goes through a symlink; replay never follows symlinks"
            )),
            Errno::XDEV => {
                Fail::Escape(format!("{what}: {probe} resolves outside the replica root"))
            }
            e => op_fail(e, what, probe),
        }
    }

    /// The parent directory of `path`; `None` when it is missing or not a directory (then
    /// nothing is at `path` either).
    fn existing_parent(&self, path: &RelPath) -> Result<Option<ParentDir>, Fail> {
        let Some(parent) = path.parent() else {
            return Ok(Some(ParentDir::Root));
        };
        match open_beneath(
            self.root_fd(),
            parent.as_path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(ParentDir::Dir(fd))),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::NOTDIR) if !resolve::leads_outside(self.root_fd(), &parent) => Ok(None),
            Err(e) => Err(self.resolve_fail(e, &parent, "open parent")),
        }
    }

    /// The parent directory of `path`, creating missing directories on the way.
    fn parent_or_create(&mut self, path: &RelPath) -> Result<ParentDir, Fail> {
        let Some(parent) = path.parent() else {
            return Ok(ParentDir::Root);
        };
        match open_beneath(
            self.root_fd(),
            parent.as_path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(ParentDir::Dir(fd)),
            Err(Errno::NOENT) => self.make_dirs(&parent),
            Err(e) => Err(self.resolve_fail(e, &parent, "open parent")),
        }
    }

    /// Walks `dir` from the root one component at a time, creating what is missing.
    fn make_dirs(&mut self, dir: &RelPath) -> Result<ParentDir, Fail> {
        let bytes = dir.as_bytes();
        let mut cur = ParentDir::Root;
        let mut end = 0usize;
        for component in bytes.split(|&b| b == b'/') {
            end += component.len();
            let prefix = || RelPath::new(&bytes[..end]).unwrap_or_else(|_| dir.clone());
            let name = OsStr::from_bytes(component);
            let flags = OFlags::RDONLY | OFlags::DIRECTORY;
            let next = match open_beneath(cur.fd(self.root_fd()), name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(cur.fd(self.root_fd()), name, mode(DEFAULT_DIR_MODE))
                    {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(op_fail(e, "mkdir", &prefix())),
                    }
                    let fd = open_beneath(cur.fd(self.root_fd()), name, flags, Mode::empty())
                        .map_err(|e| self.resolve_fail(e, &prefix(), "open new directory"))?;
                    // Exact mode, whatever this process's umask.
                    rustix::fs::fchmod(&fd, mode(DEFAULT_DIR_MODE))
                        .map_err(|e| op_fail(e, "chmod", &prefix()))?;
                    let above = std::mem::replace(&mut cur, ParentDir::Root);
                    self.mark_dir_dirty(above);
                    fd
                }
                Err(e) => return Err(self.resolve_fail(e, &prefix(), "open parent")),
            };
            cur = ParentDir::Dir(next);
            end += 1;
        }
        Ok(cur)
    }

    /// A writable fd for the regular file at `path` (cached), creating it when `create`.
    /// `None`: it does not exist and `create` is false.
    fn writable(&mut self, path: &RelPath, create: bool) -> Result<Option<OpenFile>, Fail> {
        if let Some(file) = self.files.get(path) {
            return Ok(Some(file.clone()));
        }
        let parent = if create {
            self.parent_or_create(path)?
        } else {
            match self.existing_parent(path)? {
                Some(parent) => parent,
                None => return Ok(None),
            }
        };
        let name = file_name(path);
        let flags = OFlags::WRONLY | OFlags::NONBLOCK;
        let opened = if create {
            create_exclusive(parent.fd(self.root_fd()), name, DEFAULT_FILE_MODE)
                .map(|fd| (fd, true))
        } else {
            Err(Errno::EXIST)
        };
        let (fd, created) = match opened {
            Ok(opened) => opened,
            Err(Errno::EXIST) => {
                match open_beneath(parent.fd(self.root_fd()), name, flags, Mode::empty()) {
                    Ok(fd) => (fd, false),
                    Err(Errno::NOENT) if !create => return Ok(None),
                    Err(e) => return Err(self.resolve_fail(e, path, "open")),
                }
            }
            Err(e) => return Err(self.resolve_fail(e, path, "create")),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| op_fail(e, "stat", path))?;
        if kind_of(&st) != FileType::RegularFile {
            return Err(Fail::Conflict(format!("{path} is not a regular file")));
        }
        if created {
            self.mark_dir_dirty(parent);
        }
        let file = OpenFile {
            fd: Arc::new(fd),
            id: identity(&st),
        };
        self.remember(path, file.clone());
        Ok(Some(file))
    }

    /// Whether something (of any kind) is at `path`, without following a symlink.
    fn exists(&self, path: &RelPath) -> Result<bool, Fail> {
        let Some(parent) = self.existing_parent(path)? else {
            return Ok(false);
        };
        match lstat_at(parent.fd(self.root_fd()), file_name(path)) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(op_fail(e, "stat", path)),
        }
    }

    /// Opens a regular file or directory at `path` read-only for fchmod/futimens/fsync; a
    /// symlink is refused (escape or conflict), a missing entry is `Ok(None)`.
    fn open_for_metadata(&self, path: &RelPath) -> Result<Option<(OwnedFd, FileId)>, Fail> {
        let Some(parent) = self.existing_parent(path)? else {
            return Ok(None);
        };
        let name = file_name(path);
        let st = match lstat_at(parent.fd(self.root_fd()), name) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(op_fail(e, "stat", path)),
        };
        match kind_of(&st) {
            FileType::RegularFile | FileType::Directory => {}
            FileType::Symlink => return Err(self.resolve_fail(Errno::LOOP, path, "open")),
            _ => {
                return Err(Fail::Conflict(format!(
                    "{path} is neither a regular file nor a directory"
                )));
            }
        }
        let fd = open_beneath(
            parent.fd(self.root_fd()),
            name,
            OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| self.resolve_fail(e, path, "open"))?;
        Ok(Some((fd, identity(&st))))
    }

    // ----- the operations -----

    fn apply_op(&mut self, op: &Op) -> Result<Applied, Fail> {
        match op {
            Op::Create { path, mode } => self.create(path, *mode),
            Op::Write { path, offset, data } => self.write(path, *offset, data),
            Op::Truncate { path, len } => self.truncate(path, *len),
            Op::Rename { from, to } => self.rename(from, to),
            Op::Unlink { path } => self.remove(path, false),
            Op::Rmdir { path } => self.remove(path, true),
            Op::Mkdir { path, mode } => self.mkdir(path, *mode),
            Op::Chmod { path, mode } => self.chmod(path, *mode),
            Op::SetTimes {
                path,
                atime_ns,
                mtime_ns,
            } => self.set_times(path, *atime_ns, *mtime_ns),
            Op::Symlink { target, path } => self.symlink(target, path),
            Op::Link { from, to } => self.link(from, to),
            Op::Fsync { path } => self.fsync(path),
        }
    }

    fn create(&mut self, path: &RelPath, bits: u32) -> Result<Applied, Fail> {
        if self.files.contains_key(path) {
            return Ok(Applied::AlreadyDone);
        }
        let parent = self.parent_or_create(path)?;
        let name = file_name(path);
        match create_exclusive(parent.fd(self.root_fd()), name, bits) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(|e| op_fail(e, "stat", path))?;
                let file = OpenFile {
                    fd: Arc::new(fd),
                    id: identity(&st),
                };
                self.mark_dirty(file.fd.clone(), file.id);
                self.remember(path, file);
                self.mark_dir_dirty(parent);
                Ok(Applied::Done)
            }
            Err(Errno::EXIST) => match lstat_at(parent.fd(self.root_fd()), name) {
                Ok(st) if kind_of(&st) == FileType::RegularFile => Ok(Applied::AlreadyDone),
                Ok(st) if kind_of(&st) == FileType::Symlink => {
                    Err(self.resolve_fail(Errno::LOOP, path, "create"))
                }
                Ok(_) => Err(Fail::Conflict(format!(
                    "create {path}: exists and is not a regular file"
                ))),
                Err(e) => Err(op_fail(e, "stat", path)),
            },
            Err(e) => Err(self.resolve_fail(e, path, "create")),
        }
    }

    fn write(&mut self, path: &RelPath, offset: u64, data: &[u8]) -> Result<Applied, Fail> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if offset.checked_add(len).is_none_or(|end| end > MAX_FILE_END) {
            return Err(Fail::Conflict(format!(
                "write {path}: {len} bytes at {offset} go beyond the largest possible file"
            )));
        }
        let file = self
            .writable(path, true)?
            .ok_or_else(|| Fail::Conflict(format!("write {path}: could not create it")))?;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + u64::try_from(done).unwrap_or(u64::MAX);
            match rustix::io::pwrite(file.fd.as_fd(), &data[done..], at) {
                Ok(0) => return Err(op_fail(Errno::IO, "write", path)),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(op_fail(e, "write", path)),
            }
        }
        self.mark_dirty(file.fd, file.id);
        Ok(Applied::Done)
    }

    fn truncate(&mut self, path: &RelPath, len: u64) -> Result<Applied, Fail> {
        if len > MAX_FILE_END {
            return Err(Fail::Conflict(format!(
                "truncate {path}: {len} is beyond the largest possible file"
            )));
        }
        let Some(file) = self.writable(path, false)? else {
            return Err(Fail::Conflict(format!("truncate {path}: no such file")));
        };
        // A truncate to the size the file already has changes nothing, and skipping it matters:
        // ext4 takes any truncate to 0 as "replace via truncate" and writes the file back
        // synchronously on its next close (auto_da_alloc), which made every `open(O_TRUNC)` of
        // a new file cost the backup a writeback.
        let size = rustix::fs::fstat(file.fd.as_fd())
            .map_err(|e| op_fail(e, "truncate", path))?
            .st_size;
        if u64::try_from(size).is_ok_and(|s| s == len) {
            return Ok(Applied::Done);
        }
        rustix::fs::ftruncate(file.fd.as_fd(), len).map_err(|e| op_fail(e, "truncate", path))?;
        self.mark_dirty(file.fd, file.id);
        Ok(Applied::Done)
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<Applied, Fail> {
        let moved_already = |this: &Self| -> Result<Applied, Fail> {
            if this.exists(to)? {
                Ok(Applied::AlreadyDone)
            } else {
                Err(Fail::Conflict(format!(
                    "rename {from} -> {to}: neither exists"
                )))
            }
        };
        let Some(source_dir) = self.existing_parent(from)? else {
            return moved_already(self);
        };
        let target_dir = self.parent_or_create(to)?;
        match rustix::fs::renameat(
            source_dir.fd(self.root_fd()),
            file_name(from),
            target_dir.fd(self.root_fd()),
            file_name(to),
        ) {
            Ok(()) => {
                self.forget(from);
                self.forget(to);
                self.mark_dir_dirty(source_dir);
                self.mark_dir_dirty(target_dir);
                Ok(Applied::Done)
            }
            Err(Errno::NOENT) => moved_already(self),
            Err(e) => Err(op_fail(e, "rename", from)),
        }
    }

    /// Unlink and rmdir alike leave nothing at `path`, whatever it holds (see the module doc).
    fn remove(&mut self, path: &RelPath, rmdir: bool) -> Result<Applied, Fail> {
        let Some(parent) = self.existing_parent(path)? else {
            return Ok(Applied::AlreadyDone);
        };
        let name = file_name(path);
        let dir = parent.fd(self.root_fd());
        let flags = if rmdir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        match rustix::fs::unlinkat(dir, name, flags) {
            Ok(()) => {}
            Err(Errno::NOENT) => return Ok(Applied::AlreadyDone),
            Err(Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST) => {
                self.remove_tree(&parent, name, path)?;
            }
            Err(Errno::NOTDIR) if rmdir => {
                match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                    Ok(()) => {}
                    Err(Errno::NOENT) => return Ok(Applied::AlreadyDone),
                    Err(e) => return Err(op_fail(e, "unlink", path)),
                }
            }
            Err(e) => return Err(op_fail(e, if rmdir { "rmdir" } else { "unlink" }, path)),
        }
        self.forget(path);
        self.mark_dir_dirty(parent);
        Ok(Applied::Done)
    }

    /// Removes the directory `name` in `parent` with everything beneath it, never following a
    /// symlink (they are unlinked themselves) and never descending into another filesystem.
    fn remove_tree(&self, parent: &ParentDir, name: &OsStr, path: &RelPath) -> Result<(), Fail> {
        let fail = |e: Errno| op_fail(e, "remove", path);
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY;
        let top = open_beneath(parent.fd(self.root_fd()), name, dir_flags, Mode::empty())
            .map_err(|e| self.resolve_fail(e, path, "remove"))?;
        if rustix::fs::fstat(&top).map_err(fail)?.st_dev != self.root_dev {
            return Err(Fail::Conflict(format!(
                "remove {path}: it is a mount point"
            )));
        }
        let top_name = CString::new(name.as_bytes()).map_err(|_| fail(Errno::INVAL))?;
        // (directory being emptied, its name in the directory above, passes over it)
        let mut stack: Vec<(Dir, CString, usize)> =
            vec![(Dir::new(top).map_err(fail)?, top_name, 0)];
        while let Some(depth) = stack.len().checked_sub(1) {
            let entry = stack[depth].0.read();
            match entry {
                Some(Ok(entry)) => {
                    let child: &CStr = entry.file_name();
                    if child == c"." || child == c".." {
                        continue;
                    }
                    let here = stack[depth].0.fd().map_err(fail)?;
                    let st = match rustix::fs::statat(here, child, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) => st,
                        Err(Errno::NOENT) => continue,
                        Err(e) => return Err(fail(e)),
                    };
                    if kind_of(&st) != FileType::Directory {
                        match rustix::fs::unlinkat(here, child, AtFlags::empty()) {
                            Ok(()) | Err(Errno::NOENT) => {}
                            Err(e) => return Err(fail(e)),
                        }
                        continue;
                    }
                    if st.st_dev != self.root_dev {
                        return Err(Fail::Conflict(format!(
                            "remove {path}: a mount point lies beneath it"
                        )));
                    }
                    if stack.len() >= MAX_REMOVE_DEPTH {
                        return Err(Fail::Conflict(format!(
                            "remove {path}: deeper than {MAX_REMOVE_DEPTH} levels"
                        )));
                    }
                    let fd = open_beneath(here, child, dir_flags, Mode::empty()).map_err(fail)?;
                    let owned = child.to_owned();
                    stack.push((Dir::new(fd).map_err(fail)?, owned, 0));
                }
                Some(Err(e)) => return Err(fail(e)),
                None => {
                    let (mut dir, dir_name, passes) = stack
                        .pop()
                        .expect("the loop runs only while the stack is non-empty");
                    let above = match stack.last() {
                        Some((d, _, _)) => d.fd().map_err(fail)?,
                        None => parent.fd(self.root_fd()),
                    };
                    match rustix::fs::unlinkat(above, dir_name.as_c_str(), AtFlags::REMOVEDIR) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(Errno::NOTEMPTY | Errno::EXIST) if passes + 1 < REMOVE_PASSES => {
                            dir.rewind();
                            stack.push((dir, dir_name, passes + 1));
                        }
                        Err(e) => return Err(fail(e)),
                    }
                }
            }
        }
        Ok(())
    }

    fn mkdir(&mut self, path: &RelPath, bits: u32) -> Result<Applied, Fail> {
        let parent = self.parent_or_create(path)?;
        let name = file_name(path);
        match rustix::fs::mkdirat(parent.fd(self.root_fd()), name, mode(bits)) {
            Ok(()) => {
                let fd = open_beneath(
                    parent.fd(self.root_fd()),
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY,
                    Mode::empty(),
                )
                .map_err(|e| self.resolve_fail(e, path, "open new directory"))?;
                // Exact mode, whatever this process's umask.
                rustix::fs::fchmod(&fd, mode(bits)).map_err(|e| op_fail(e, "chmod", path))?;
                let st = rustix::fs::fstat(&fd).map_err(|e| op_fail(e, "stat", path))?;
                self.mark_dirty(Arc::new(fd), identity(&st));
                self.mark_dir_dirty(parent);
                Ok(Applied::Done)
            }
            // The directory is this operation's own (a crash may have come before its mode was
            // set) or a later one that later operations replace: either way the mode is this
            // operation's, and operations after it adjust it again.
            Err(Errno::EXIST) => match lstat_at(parent.fd(self.root_fd()), name) {
                Ok(st)
                    if kind_of(&st) == FileType::Directory
                        && st.st_mode & MODE_BITS == bits & MODE_BITS =>
                {
                    Ok(Applied::AlreadyDone)
                }
                Ok(st) if kind_of(&st) == FileType::Directory => {
                    let fd = open_beneath(
                        parent.fd(self.root_fd()),
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY,
                        Mode::empty(),
                    )
                    .map_err(|e| self.resolve_fail(e, path, "open directory"))?;
                    rustix::fs::fchmod(&fd, mode(bits)).map_err(|e| op_fail(e, "chmod", path))?;
                    self.mark_dirty(Arc::new(fd), identity(&st));
                    Ok(Applied::Done)
                }
                Ok(_) => Err(Fail::Conflict(format!(
                    "mkdir {path}: exists and is not a directory"
                ))),
                Err(e) => Err(op_fail(e, "stat", path)),
            },
            Err(e) => Err(op_fail(e, "mkdir", path)),
        }
    }

    fn chmod(&mut self, path: &RelPath, bits: u32) -> Result<Applied, Fail> {
        let Some((fd, id)) = self.open_for_metadata(path)? else {
            return Err(Fail::Conflict(format!("chmod {path}: no such file")));
        };
        rustix::fs::fchmod(&fd, mode(bits)).map_err(|e| op_fail(e, "chmod", path))?;
        self.mark_dirty(Arc::new(fd), id);
        Ok(Applied::Done)
    }

    fn set_times(
        &mut self,
        path: &RelPath,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
    ) -> Result<Applied, Fail> {
        let times = Timestamps {
            last_access: timespec(atime_ns),
            last_modification: timespec(mtime_ns),
        };
        let Some(parent) = self.existing_parent(path)? else {
            return Err(Fail::Conflict(format!("settimes {path}: no such file")));
        };
        let name = file_name(path);
        let st = match lstat_at(parent.fd(self.root_fd()), name) {
            Ok(st) => st,
            Err(Errno::NOENT) => {
                return Err(Fail::Conflict(format!("settimes {path}: no such file")));
            }
            Err(e) => return Err(op_fail(e, "stat", path)),
        };
        if kind_of(&st) == FileType::Symlink {
            // The times of the link itself (lutimes on the primary); nothing is followed.
            rustix::fs::utimensat(
                parent.fd(self.root_fd()),
                name,
                &times,
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| op_fail(e, "settimes", path))?;
            self.mark_dir_dirty(parent);
            return Ok(Applied::Done);
        }
        let Some((fd, id)) = self.open_for_metadata(path)? else {
            return Err(Fail::Conflict(format!("settimes {path}: no such file")));
        };
        rustix::fs::futimens(&fd, &times).map_err(|e| op_fail(e, "settimes", path))?;
        self.mark_dirty(Arc::new(fd), id);
        Ok(Applied::Done)
    }

    fn symlink(&mut self, target: &[u8], path: &RelPath) -> Result<Applied, Fail> {
        if target.is_empty() || target.contains(&0) || target.len() > ft::replog::MAX_PATH_BYTES {
            return Err(Fail::Conflict(format!(
                "symlink {path}: the target is empty, too long or contains NUL"
            )));
        }
        let parent = self.parent_or_create(path)?;
        let name = file_name(path);
        match rustix::fs::symlinkat(OsStr::from_bytes(target), parent.fd(self.root_fd()), name) {
            Ok(()) => {
                self.forget(path);
                self.mark_dir_dirty(parent);
                Ok(Applied::Done)
            }
            Err(Errno::EXIST) => {
                match rustix::fs::readlinkat(parent.fd(self.root_fd()), name, Vec::new()) {
                    Ok(existing) if existing.as_bytes() == target => Ok(Applied::AlreadyDone),
                    Ok(_) => Err(Fail::Conflict(format!(
                        "symlink {path}: a symlink with another target exists"
                    ))),
                    Err(Errno::INVAL) => Err(Fail::Conflict(format!(
                        "symlink {path}: exists and is not a symlink"
                    ))),
                    Err(e) => Err(op_fail(e, "readlink", path)),
                }
            }
            Err(e) => Err(op_fail(e, "symlink", path)),
        }
    }

    fn link(&mut self, from: &RelPath, to: &RelPath) -> Result<Applied, Fail> {
        let Some(source_dir) = self.existing_parent(from)? else {
            return Err(Fail::Conflict(format!("link {from} -> {to}: no source")));
        };
        let target_dir = self.parent_or_create(to)?;
        let (from_name, to_name) = (file_name(from), file_name(to));
        match rustix::fs::linkat(
            source_dir.fd(self.root_fd()),
            from_name,
            target_dir.fd(self.root_fd()),
            to_name,
            AtFlags::empty(),
        ) {
            Ok(()) => {
                self.forget(to);
                self.mark_dir_dirty(target_dir);
                Ok(Applied::Done)
            }
            Err(Errno::EXIST) => {
                let a = lstat_at(source_dir.fd(self.root_fd()), from_name);
                let b = lstat_at(target_dir.fd(self.root_fd()), to_name);
                match (a, b) {
                    (Ok(a), Ok(b)) if identity(&a) == identity(&b) => Ok(Applied::AlreadyDone),
                    _ => Err(Fail::Conflict(format!(
                        "link {from} -> {to}: the target exists and is another file"
                    ))),
                }
            }
            Err(e) => Err(op_fail(e, "link", from)),
        }
    }

    fn fsync(&mut self, path: &RelPath) -> Result<Applied, Fail> {
        // The log already holds the operation durably; the replica's copy becomes durable at
        // the next commit.
        if let Some(file) = self.files.get(path).cloned() {
            self.mark_dirty(file.fd, file.id);
            return Ok(Applied::Done);
        }
        match self.open_for_metadata(path)? {
            Some((fd, id)) => {
                self.mark_dirty(Arc::new(fd), id);
                Ok(Applied::Done)
            }
            None => Ok(Applied::AlreadyDone),
        }
    }
}

/// The log payload of a record: MessagePack (rmp-serde) of the whole [`OpRecord`].
pub fn encode_record(rec: &OpRecord) -> Vec<u8> {
    let mut payload = Vec::new();
    encode_record_into(rec, &mut payload);
    payload
}

/// Appends the log payload of a record ([`encode_record`]) to `buf`: the bcplog encodes
/// straight into the log's write buffer.
pub fn encode_record_into(rec: &OpRecord, buf: &mut Vec<u8>) {
    rmp_serde::encode::write(buf, rec)
        .expect("an OpRecord is plain data and a Vec<u8> sink cannot fail");
}

/// Decodes a log payload; validates every path ([`RelPath`] rules).
pub fn decode_record(payload: &[u8]) -> Result<OpRecord, rmp_serde::decode::Error> {
    rmp_serde::from_slice(payload)
}

/// Applies `(seq, payload)` records (from [`SegmentLog::read_from`] or a
/// [`crate::segment::SegmentReader`]) past the replica's applied seq, committing every
/// [`DRAIN_COMMIT_EVERY`] records and at the end. Refused records are logged, counted and
/// passed over. Returns the durable applied seq.
pub fn apply_all<I>(records: I, replica: &mut Replica) -> Result<u64, ReplayError>
where
    I: IntoIterator<Item = Result<(u64, Vec<u8>), LogError>>,
{
    let mut since_commit = 0u64;
    for item in records {
        let (seq, payload) = item?;
        match replica.apply_encoded(seq, &payload) {
            Ok(_) => {}
            Err(e) if e.consumed() => {}
            Err(e) => return Err(e),
        }
        since_commit += 1;
        if since_commit >= DRAIN_COMMIT_EVERY {
            replica.commit()?;
            since_commit = 0;
        }
    }
    replica.commit()
}

/// Applies everything the log holds past the replica's applied seq and commits (before a
/// backup is promoted, and in the replay loop). Returns the durable applied seq; the caller
/// trims the log through it.
pub fn drain(log: &mut SegmentLog, replica: &mut Replica) -> Result<u64, ReplayError> {
    match replica.applied_seq().checked_add(1) {
        Some(from) if from <= log.last_seq() => apply_all(log.read_from(from)?, replica),
        _ => replica.commit(),
    }
}
