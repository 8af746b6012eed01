//! Transparent checkpoint of unmodified processes (Winckp on Linux, x86_64): `dump` freezes a
//! process with ptrace and writes its registers, memory, descriptors and signal state as an
//! image of the ckpt store; `restore` brings a dead process back in a new one; `rollback`
//! returns a live one to a checkpoint. Every call blocks (run it on a dedicated thread) and
//! does all its ptrace work on the calling thread. It must never leave a target traced, stopped
//! or with injected state after a failed call, and never apply an image that did not verify.
//!
//! ```text
//! dump:     seize+interrupt threads ─► regs/xstate/sigmask ─► inject rt_sigaction/brk ─►
//!           maps, fds, pagemap ─► [tracked: written pages by PAGEMAP_SCAN, or arm uffd-wp] ─►
//!           image (meta region 0, pages, file snapshots) ─► detach ─► commit
//! restore:  clone3 stub (TRACEME) ─► inject: close fds, open files, munmap all, move vdso,
//!           mmap image layout, sigactions, PR_SET_MM_MAP, rseq ─► write pages ─► inject
//!           clone3 per other thread (old tid when free; TRACECLONE) ─► in each: rseq, robust
//!           list ─► regs/xstate/sigmask of every thread ─► detach
//! rollback: seize the live process ─► inject exit in its other threads ─► the same rebuild
//!           in place (descriptors kept when they still are the same file) ─► file contents
//!           put back ─► regs ─► detach
//! ```

mod dump;
pub mod meta;
mod procfs;
mod ptrace;
mod rebuild;
mod regs;
mod track;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;

use crate::image::ImageError;
use crate::store::{Store, StoreError};

pub use meta::{FdKind, FdState, ProcessMeta};
pub use track::Tracker;

/// Default largest file whose whole contents a dump keeps for a rollback (64 MiB).
pub const DEFAULT_MAX_FILE_SNAPSHOT: u64 = 64 << 20;

/// What a dump keeps besides memory and registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpOptions {
    /// Keep the contents of regular files the process has open for writing, so a rollback or
    /// restore puts them back (Winckp's undo of file writes). Default true.
    pub snapshot_files: bool,
    /// Files larger than this keep only their size (a rollback truncates them back to it).
    pub max_file_snapshot: u64,
    /// Files left out of the file snapshot, e.g. the log a supervisor gave the process as its
    /// stdout and stderr. A descriptor's file is excluded when its `/proc/PID/fd/N` target is
    /// one of these paths (as given or canonicalized) or the same device and inode as one.
    /// See [`FdState::excluded`] for what a restore and a rollback do with such a file.
    pub exclude_paths: Vec<PathBuf>,
    /// Descriptor numbers whose files are left out the same way (every descriptor of the
    /// same file, at any number, is then excluded too: a snapshot taken through another
    /// descriptor would roll the contents back all the same).
    pub exclude_fds: Vec<i32>,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            snapshot_files: true,
            max_file_snapshot: DEFAULT_MAX_FILE_SNAPSHOT,
            exclude_paths: Vec::new(),
            exclude_fds: Vec::new(),
        }
    }
}

/// A descriptor a restore cannot bring back by itself (a pipe, a socket, a tty, an anon
/// inode); `RestoreOptions::fds` may supply a replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrestorable {
    pub fd: i32,
    pub what: String,
}

/// What a dump wrote.
#[derive(Debug, Clone)]
pub struct DumpSummary {
    pub pid: i32,
    pub seq: u64,
    pub path: PathBuf,
    pub threads: usize,
    pub mappings: usize,
    /// Pages of memory written to the image (in an increment: those written since its parent).
    pub pages: u64,
    /// The image this one is an increment against; None for a full image.
    pub parent: Option<u64>,
    /// Why a tracked dump (`dump_incremental`) wrote a full image: the first dump, the memory
    /// layout or the files changed, the store wanted a full image, tracking was lost or is
    /// unavailable. None for an increment and for untracked dumps.
    pub full_reason: Option<String>,
    /// Bytes of regular files snapshotted.
    pub file_bytes: u64,
    pub image_bytes: u64,
    /// How long the target was stopped.
    pub pause: Duration,
    /// The whole dump, commit included.
    pub total: Duration,
    /// Descriptors recorded but not restorable by path.
    pub unrestorable: Vec<Unrestorable>,
    /// Files open for writing whose contents were too large to keep (size kept only).
    pub files_size_only: Vec<String>,
    /// Files left out of the snapshot by `DumpOptions::exclude_paths` / `exclude_fds`
    /// (recorded as open descriptors only).
    pub files_excluded: Vec<String>,
}

/// How a restore builds the new process.
#[derive(Debug, Default)]
pub struct RestoreOptions {
    /// Descriptors to install in place of the image's unrestorable ones (fd number → the
    /// descriptor to give the new process, e.g. a new pipe to a log reader). A regular file
    /// the image had open at such a number is not put back: the caller supplies its file (a
    /// supervisor's log keeps what was appended since the checkpoint).
    pub fds: Vec<(i32, OwnedFd)>,
    /// Leave files the process wrote as they are now instead of putting back their
    /// checkpointed contents.
    pub keep_file_contents: bool,
    /// A cgroup v2 directory the new process is created in (clone3 `CLONE_INTO_CGROUP`), so a
    /// supervisor confines it exactly like a process it spawned.
    pub cgroup: Option<OwnedFd>,
}

/// A process brought back by `restore`: a child of the calling process (reap it, e.g. with
/// `waitid` on `pidfd`).
#[derive(Debug)]
pub struct RestoredProcess {
    pub pid: i32,
    /// A pidfd of the new process (clone3 `CLONE_PIDFD`), taken before it could be reaped, so
    /// it can never name another process.
    pub pidfd: OwnedFd,
    /// True when it got the pid of the checkpointed process.
    pub same_pid: bool,
    /// True when every thread, the main one included, got its checkpointed id (a program
    /// that keeps thread ids, e.g. for `tgkill`, then finds them valid).
    pub same_tids: bool,
    pub seq: u64,
    pub took: Duration,
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackSummary {
    pub pid: i32,
    pub seq: u64,
    pub pause: Duration,
    /// True when every thread the image's process had was recreated with its checkpointed id.
    pub same_tids: bool,
}

/// Why a dump, restore or rollback failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no process {pid}")]
    NoSuchProcess { pid: i32 },
    #[error("process {pid} cannot be checkpointed: {reason}")]
    PermissionDenied { pid: i32, reason: String },
    #[error("process {pid} exited during the operation")]
    Exited { pid: i32 },
    #[error("{op} on thread {tid} failed: {errno}")]
    Ptrace {
        op: &'static str,
        tid: i32,
        errno: Errno,
    },
    #[error("injected {syscall} in thread {tid} failed: {errno}")]
    Injected {
        syscall: &'static str,
        tid: i32,
        errno: Errno,
    },
    #[error("cannot {op} {len} bytes at {addr:#x} of process {pid}: {errno}")]
    Memory {
        op: &'static str,
        pid: i32,
        addr: u64,
        len: usize,
        errno: Errno,
    },
    #[error("cannot read {path}: {source}")]
    Procfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    ProcfsFormat { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("image {path}: {source}")]
    Meta {
        path: PathBuf,
        #[source]
        source: meta::MetaError,
    },
    #[error("no process checkpoint in {dir}")]
    NoImage { dir: PathBuf },
    #[error("image {seq} cannot be restored: {reason}")]
    Unrestorable { seq: u64, reason: String },
    #[error("{path} changed since the checkpoint: {reason}")]
    FileChanged { path: String, reason: String },
    #[error("cannot {op} {path}: {source}")]
    File {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not supported: {reason}")]
    Unsupported { reason: String },
    #[error("the restore stub failed: {reason}")]
    Stub { reason: String },
}

/// Checkpoints process `pid` into `store` (a full image). The process is stopped only while
/// its state and memory are read, and runs on as before whether the dump succeeds or not.
pub fn dump(pid: i32, store: &Store, opts: &DumpOptions) -> Result<DumpSummary, ProcError> {
    dump::dump(pid, store, opts, None).map_err(|e| exited_if_gone(pid, e))
}

/// `PF_EXITING` in the flags of `/proc/PID/stat` (`linux/sched.h`): the task is in `exit`.
const PF_EXITING: u64 = 0x4;

/// An error met because the target died during the call (a `/proc` file vanished, its memory
/// or a thread could no longer be reached) reported as what it is: the process exited.
fn exited_if_gone(pid: i32, e: ProcError) -> ProcError {
    let esrch = match &e {
        ProcError::Procfs { source, .. } | ProcError::File { source, .. } => {
            source.raw_os_error() == Some(libc::ESRCH)
        }
        ProcError::Ptrace { errno, .. }
        | ProcError::Injected { errno, .. }
        | ProcError::Memory { errno, .. } => *errno == Errno::ESRCH,
        _ => false,
    };
    let io_error = matches!(
        e,
        ProcError::Procfs { .. }
            | ProcError::ProcfsFormat { .. }
            | ProcError::Memory { .. }
            | ProcError::Ptrace { .. }
            | ProcError::Injected { .. }
            | ProcError::File { .. }
    );
    // Gone, a zombie, or on its way out (its mm may already be torn down).
    let gone = || {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let flags: u64 = fields.nth(5).and_then(|f| f.parse().ok()).unwrap_or(0);
        state.starts_with(['Z', 'X']) || flags & PF_EXITING != 0
    };
    if esrch || (io_error && gone()) {
        ProcError::Exited { pid }
    } else {
        e
    }
}

/// Checkpoints `tracker`'s process into `store`: an increment holding only the pages written
/// since the tracker's previous dump when the memory layout and open files are the same and
/// the store takes an increment against it, else a full image (`DumpSummary::full_reason`
/// says why) that starts tracking writes again. The first dump is full; the tracking lives
/// as long as the tracker.
pub fn dump_incremental(
    tracker: &mut Tracker,
    store: &Store,
    opts: &DumpOptions,
) -> Result<DumpSummary, ProcError> {
    let pid = tracker.pid();
    dump::dump(pid, store, opts, Some(tracker)).map_err(|e| exited_if_gone(pid, e))
}

/// Brings back the process of image `seq` (the newest good one when None) as a new child of
/// the calling process, with the checkpointed pid and thread ids when they are free
/// (`RestoredProcess::same_tids` says whether all were), every thread with its registers,
/// signal mask, rseq, robust list and clear_child_tid. A failure kills the half-built process.
pub fn restore(
    store: &Store,
    seq: Option<u64>,
    opts: RestoreOptions,
) -> Result<RestoredProcess, ProcError> {
    rebuild::restore(store, seq, opts)
}

/// Returns live process `pid` to image `seq` (the newest good one when None): memory layout
/// and contents, registers, signal actions, descriptors and file offsets, and the contents of
/// the files it had open for writing. Its threads other than the main one are ended and the
/// image's created again (with their old ids when free). A failure found before anything
/// changed leaves the process running as it was; one after the first change (ending its
/// threads) kills it, and the error says so: a half-rebuilt process must not run on.
pub fn rollback(pid: i32, store: &Store, seq: Option<u64>) -> Result<RollbackSummary, ProcError> {
    rebuild::rollback(pid, store, seq)
}
