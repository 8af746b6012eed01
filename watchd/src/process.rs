//! A service's processes as the OS sees them: spawning the main process (own process group,
//! own cgroup, log file, user switch), pidfds, waiting for its end, re-adopting it after a
//! watchd restart, signalling its whole tree and measuring its memory.
//!
//! It never keeps a `std::process::Child` (reaping is `waitid` on the pidfd), never sets
//! PR_SET_PDEATHSIG (services outlive a crash of watchd), and never allocates between fork and
//! exec.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::{Gid, Uid, User};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, WaitIdStatus};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::cgroup::{Cgroup, CgroupError, send_signal};
use crate::logs::LOG_FILE_MODE;
use crate::machine::{ExitStatus, TreeSignal};

/// Index of `starttime` (field 22 of `/proc/PID/stat`) among the fields after the comm's `)`,
/// which start at field 3 (`state`).
const STAT_STARTTIME: usize = 22 - 3;

/// Index of `ppid` (field 4) among the fields after the comm's `)`.
const STAT_PPID: usize = 4 - 3;

/// Size of the kernel's sigset_t (64 signals) as rt_sigaction expects it.
const KERNEL_SIGSET_BYTES: usize = 8;

/// Room for the kernel's struct sigaction (handler, flags, restorer, mask: 4 words on 64-bit
/// architectures), with margin.
const KERNEL_SIGACTION_WORDS: usize = 8;

/// What to start for a service.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The service's name (for messages).
    pub service: String,
    /// A path, or a bare name looked up in PATH (of `env` when it sets one, else watchd's).
    pub command: String,
    /// Arguments after argv\[0\] (which is `command` as written).
    pub args: Vec<String>,
    /// Added to watchd's environment; later entries win.
    pub env: Vec<(String, String)>,
    /// Working directory; watchd's when `None`.
    pub cwd: Option<PathBuf>,
    /// User name or numeric uid to run as; uid, gid and supplementary groups are switched.
    pub user: Option<String>,
    /// stdout and stderr are appended here (created 0640); stdin is /dev/null.
    pub log_path: PathBuf,
    /// The child moves itself into this cgroup before exec.
    pub cgroup: Option<Cgroup>,
}

/// A started main process.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: u32,
    /// A pidfd for it: waiting and signalling through it cannot hit a reused pid.
    pub pidfd: OwnedFd,
    /// Its start time (clock ticks since boot), recorded so a later watchd can re-adopt it.
    pub start_time: u64,
}

/// What can go wrong with a service's processes.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A bare command name is in no directory of PATH.
    #[error("command {command:?} not found in PATH {path:?}")]
    NotFound {
        /// The command as configured.
        command: String,
        /// The PATH searched.
        path: String,
    },
    /// The user to run as does not exist.
    #[error("unknown user {user:?} for command {command:?}")]
    UnknownUser {
        /// The configured user.
        user: String,
        /// The command.
        command: String,
    },
    /// The user database could not be read.
    #[error("cannot look up user {user:?} for command {command:?}: {source}")]
    UserLookup {
        /// The configured user.
        user: String,
        /// The command.
        command: String,
        /// The OS error.
        source: nix::Error,
    },
    /// The log file could not be opened.
    #[error("cannot open log file {path} for command {command:?}: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// The command.
        command: String,
        /// The OS error.
        source: io::Error,
    },
    /// The working directory is not a usable directory.
    #[error("working directory {path} of command {command:?}: {source}")]
    Cwd {
        /// The configured directory.
        path: PathBuf,
        /// The command.
        command: String,
        /// The OS error.
        source: io::Error,
    },
    /// The service's cgroup could not be used.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// fork, the child's setup or exec failed.
    #[error("cannot start command {command:?}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// The OS error (from exec: ENOENT, EACCES, ...).
        source: io::Error,
    },
    /// pidfd_open failed for a reason other than the process being gone.
    #[error("cannot open a pidfd for pid {pid}: {source}")]
    Pidfd {
        /// The process.
        pid: u32,
        /// The OS error.
        source: io::Error,
    },
    /// `/proc/PID/stat` could not be read.
    #[error("cannot read /proc/{pid}/stat: {source}")]
    Proc {
        /// The process.
        pid: u32,
        /// The OS error (NotFound: the process is gone).
        source: io::Error,
    },
    /// `/proc/PID/stat` did not have the expected fields.
    #[error("unexpected format of /proc/{pid}/stat")]
    ProcFormat {
        /// The process.
        pid: u32,
    },
    /// A pid that must never be signalled (0, 1, watchd itself, out of range).
    #[error("refusing to use pid {pid}: not a service process")]
    InvalidPid {
        /// The pid.
        pid: u32,
    },
    /// kill/killpg failed for a reason other than ESRCH.
    #[error("cannot send signal {signal} to pid {pid}: {source}")]
    Signal {
        /// The process (or process group).
        pid: u32,
        /// The signal number.
        signal: i32,
        /// The OS error.
        source: io::Error,
    },
}

/// uid, gid and supplementary groups to switch to, resolved before fork.
#[derive(Debug)]
struct Identity {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    name: Option<String>,
    home: Option<PathBuf>,
}

/// Starts the service's main process: in its own process group and (when given) cgroup, with
/// stdout/stderr appended to the log file. Returns once exec has succeeded, or with exec's
/// error; no zombie is left behind on any error path.
pub fn spawn(spec: &SpawnSpec) -> Result<Spawned, ProcessError> {
    let program = resolve_command(&spec.command, &spec.env)?;
    let identity = spec
        .user
        .as_deref()
        .map(|u| resolve_user(u, &spec.command))
        .transpose()?;
    let log = open_log(&spec.log_path).map_err(|source| ProcessError::Log {
        path: spec.log_path.clone(),
        command: spec.command.clone(),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| ProcessError::Log {
        path: spec.log_path.clone(),
        command: spec.command.clone(),
        source,
    })?;
    if let Some(cwd) = &spec.cwd {
        // Checked here because a failed chdir in the child reads like a missing command.
        match fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ProcessError::Cwd {
                    path: cwd.clone(),
                    command: spec.command.clone(),
                    source: io::Error::from_raw_os_error(libc::ENOTDIR),
                });
            }
            Err(source) => {
                return Err(ProcessError::Cwd {
                    path: cwd.clone(),
                    command: spec.command.clone(),
                    source,
                });
            }
        }
    }
    let cgroup_procs = spec.cgroup.as_ref().map(Cgroup::procs_file).transpose()?;

    let mut cmd = Command::new(&program);
    cmd.arg0(&spec.command)
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0);
    if let Some(id) = &identity {
        // As a login would; the spec's env below may still override them.
        if let Some(name) = &id.name {
            cmd.env("USER", name).env("LOGNAME", name);
        }
        if let Some(home) = &id.home {
            cmd.env("HOME", home);
        }
    }
    for (key, value) in &spec.env {
        cmd.env(key, value);
    }
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let setup = ChildSetup::new(cgroup_procs, identity);
    // SAFETY: `ChildSetup::apply` runs in the forked child before exec and only makes
    // async-signal-safe calls (sigprocmask, and raw rt_sigaction, write, setgroups, setgid
    // and setuid syscalls) on data prepared before the fork; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || setup.apply());
    }
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        command: spec.command.clone(),
        source,
    })?;
    let pid = child.id();
    // std's Child neither waits nor kills on drop; wait_exit reaps through the pidfd.
    drop(child);

    let pidfd = match open_pidfd(pid) {
        Ok(fd) => fd,
        Err(source) => {
            kill_and_reap_child(pid);
            return Err(ProcessError::Pidfd { pid, source });
        }
    };
    match start_time(pid) {
        Ok(start_time) => Ok(Spawned {
            pid,
            pidfd,
            start_time,
        }),
        Err(e) => {
            kill_and_reap_child(pid);
            Err(e)
        }
    }
}

/// Everything the child does between fork and exec, prepared in the parent.
struct ChildSetup {
    empty_mask: libc::sigset_t,
    max_signal: libc::c_int,
    cgroup_procs: Option<OwnedFd>,
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
}

impl ChildSetup {
    fn new(cgroup_procs: Option<OwnedFd>, identity: Option<Identity>) -> ChildSetup {
        // SAFETY: sigset_t is plain data; an all-zero value is a valid input to sigemptyset,
        // which fully initialises it.
        let mut empty_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: the pointer is to a live, writable sigset_t.
        unsafe {
            libc::sigemptyset(&raw mut empty_mask);
        }
        ChildSetup {
            empty_mask,
            max_signal: libc::SIGRTMAX(),
            cgroup_procs,
            ids: identity.map(|i| (i.uid, i.gid, i.groups)),
        }
    }

    /// Runs in the child after fork. Only async-signal-safe calls, no allocation.
    fn apply(&self) -> io::Result<()> {
        // A mask blocked by a signal-handling thread of watchd (tokio) is inherited over exec.
        // SAFETY: both pointers are valid for the call (the old-mask pointer is null).
        if unsafe {
            libc::sigprocmask(
                libc::SIG_SETMASK,
                &raw const self.empty_mask,
                std::ptr::null_mut(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // Handlers reset to default on exec, but ignored signals stay ignored: undo SIG_IGN.
        // The raw syscall, because glibc's sigaction refuses the two signals it reserves (32,
        // 33), which can be ignored all the same.
        for sig in 1..=self.max_signal {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old = [0usize; KERNEL_SIGACTION_WORDS];
            // SAFETY: a null new action only queries; `old` is writable and larger than the
            // kernel's struct sigaction on every architecture.
            let queried = unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    std::ptr::null::<usize>(),
                    old.as_mut_ptr(),
                    KERNEL_SIGSET_BYTES,
                )
            } == 0;
            // The handler is the first field of the kernel's struct sigaction everywhere.
            if queried && old[0] == libc::SIG_IGN {
                // All zero is SIG_DFL (0) with no flags and an empty mask in every layout.
                let dfl = [0usize; KERNEL_SIGACTION_WORDS];
                // SAFETY: `dfl` is readable and at least as large as the kernel's struct.
                let set = unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        dfl.as_ptr(),
                        std::ptr::null_mut::<usize>(),
                        KERNEL_SIGSET_BYTES,
                    )
                };
                if set != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        if let Some(fd) = &self.cgroup_procs {
            // "0" moves the writing process, i.e. this child, before it runs any service code.
            rustix::io::write(fd, b"0").map_err(io::Error::from)?;
        }
        if let Some((uid, gid, groups)) = &self.ids {
            // Raw syscalls: in the child only this thread exists, and glibc's wrappers would
            // try to synchronise the ids of threads that were not forked.
            // SAFETY: `groups` is a live Vec; the kernel reads `len` gid_t from its pointer.
            if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: plain integer argument.
            if unsafe { libc::syscall(libc::SYS_setgid, *gid) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: plain integer argument; setuid last, while we may still change groups.
            if unsafe { libc::syscall(libc::SYS_setuid, *uid) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// A path is used as is; a bare name is looked up in the spec's PATH (its last entry wins),
/// else watchd's. Empty PATH elements (the current directory) are skipped.
fn resolve_command(command: &str, env: &[(String, String)]) -> Result<PathBuf, ProcessError> {
    if command.contains('/') {
        return Ok(PathBuf::from(command));
    }
    let path_var: OsString = match env.iter().rev().find(|(k, _)| k == "PATH") {
        Some((_, v)) => v.into(),
        None => std::env::var_os("PATH").unwrap_or_default(),
    };
    if !command.is_empty() {
        for dir in std::env::split_paths(&path_var).filter(|d| !d.as_os_str().is_empty()) {
            let candidate = dir.join(command);
            let executable = fs::metadata(&candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            if executable {
                return Ok(candidate);
            }
        }
    }
    Err(ProcessError::NotFound {
        command: command.to_owned(),
        path: path_var.to_string_lossy().into_owned(),
    })
}

/// A user name, or a numeric uid (which need not be in the user database: then its gid is the
/// uid and it has no supplementary groups).
fn resolve_user(user: &str, command: &str) -> Result<Identity, ProcessError> {
    let lookup_err = |source| ProcessError::UserLookup {
        user: user.to_owned(),
        command: command.to_owned(),
        source,
    };
    let numeric = user.parse::<u32>().ok();
    let entry = match numeric {
        Some(uid) => User::from_uid(Uid::from_raw(uid)).map_err(lookup_err)?,
        None => User::from_name(user).map_err(lookup_err)?,
    };
    match (entry, numeric) {
        (Some(u), _) => {
            let name = std::ffi::CString::new(u.name.as_bytes()).map_err(|_| {
                ProcessError::UnknownUser {
                    user: user.to_owned(),
                    command: command.to_owned(),
                }
            })?;
            let groups = nix::unistd::getgrouplist(&name, u.gid).map_err(lookup_err)?;
            Ok(Identity {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                groups: groups.into_iter().map(Gid::as_raw).collect(),
                name: Some(u.name),
                home: Some(u.dir),
            })
        }
        (None, Some(uid)) => Ok(Identity {
            uid,
            gid: uid,
            groups: Vec::new(),
            name: None,
            home: None,
        }),
        (None, None) => Err(ProcessError::UnknownUser {
            user: user.to_owned(),
            command: command.to_owned(),
        }),
    }
}

fn open_log(path: &Path) -> io::Result<OwnedFd> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_FILE_MODE)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

fn raw_pid(pid: u32) -> Option<Pid> {
    Pid::from_raw(i32::try_from(pid).ok()?)
}

fn open_pidfd(pid: u32) -> io::Result<OwnedFd> {
    let p = raw_pid(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    rustix::process::pidfd_open(p, PidfdFlags::empty()).map_err(io::Error::from)
}

/// Error path of spawn: our unreaped child still holds its pid (and group id), so signalling
/// them cannot hit another process.
fn kill_and_reap_child(pid: u32) {
    if let Some(p) = raw_pid(pid) {
        let _ = rustix::process::kill_process_group(p, Signal::KILL);
        let _ = rustix::process::kill_process(p, Signal::KILL);
        let _ = rustix::process::waitid(WaitId::Pid(p), WaitIdOptions::EXITED);
    }
}

/// The fields of `/proc/PID/stat` after the comm, which may itself contain `)` and spaces.
fn stat_fields(pid: u32) -> Result<Vec<String>, ProcessError> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| ProcessError::Proc { pid, source })?;
    let (_, rest) = text
        .rsplit_once(')')
        .ok_or(ProcessError::ProcFormat { pid })?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

fn stat_field(pid: u32, index: usize) -> Result<u64, ProcessError> {
    let fields = stat_fields(pid)?;
    fields
        .get(index)
        .and_then(|f| f.parse().ok())
        .ok_or(ProcessError::ProcFormat { pid })
}

/// The start time of `pid` (field 22 of `/proc/PID/stat`, clock ticks since boot): with the
/// pid it names one process for the life of the system.
pub fn start_time(pid: u32) -> Result<u64, ProcessError> {
    stat_field(pid, STAT_STARTTIME)
}

/// Re-adopts a recorded process: opens a pidfd first and only then checks the start time, so
/// the pidfd cannot end up naming a process that reused the pid. `Ok(None)` when the process
/// is gone or the pid now belongs to another process.
pub fn adopt(pid: u32, start_time: u64) -> Result<Option<OwnedFd>, ProcessError> {
    if raw_pid(pid).is_none() || pid == 1 || pid == std::process::id() {
        return Ok(None);
    }
    let pidfd = match open_pidfd(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(source) => return Err(ProcessError::Pidfd { pid, source }),
    };
    match self::start_time(pid) {
        Ok(t) if t == start_time => Ok(Some(pidfd)),
        Ok(_) => Ok(None),
        Err(ProcessError::Proc { source, .. })
            if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Whether `pid` is a child of this process (only then can its exit status be collected).
pub fn is_child(pid: u32) -> bool {
    stat_field(pid, STAT_PPID).is_ok_and(|ppid| ppid == u64::from(std::process::id()))
}

/// Waits, without polling, until the process of `pidfd` has ended; reaps it when it is our
/// child and says how it ended, else [`ExitStatus::Unknown`]. Must run inside a tokio runtime.
pub async fn wait_exit(pidfd: OwnedFd, pid: u32) -> ExitStatus {
    match until_exited(pidfd, pid).await {
        Some(pidfd) => reap(pidfd, pid).await,
        None => ExitStatus::Unknown,
    }
}

/// [`wait_exit`], but kills the rest of the tree before reaping: while our child is an
/// unreaped zombie its pid and process group id cannot be reused, so the kill cannot hit an
/// unrelated process (a kill after reaping could, once the pid has been recycled).
pub async fn wait_exit_killing_tree(
    pidfd: OwnedFd,
    pid: u32,
    cgroup: Option<Cgroup>,
) -> ExitStatus {
    let Some(pidfd) = until_exited(pidfd, pid).await else {
        return ExitStatus::Unknown;
    };
    if let Err(e) = signal_tree(pid, cgroup.as_ref(), TreeSignal::Kill) {
        tracing::warn!(pid, error = %e, "killing what is left of the process tree failed");
    }
    reap(pidfd, pid).await
}

/// Returns the pidfd once it is readable (the process has exited); `None` only when even the
/// blocking fallback could not run (the runtime is shutting down).
async fn until_exited(pidfd: OwnedFd, pid: u32) -> Option<OwnedFd> {
    // SAFETY: an OwnedFd returns the same open fd from every as_raw_fd() and keeps it open
    // until it is dropped, which happens only after the AsyncFd gives it back (into_inner) or
    // is dropped itself.
    let registered = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
    let fd = match registered {
        Ok(afd) => match afd.readable().await {
            // A pidfd stays readable once its process has exited, so one readiness is final
            // and is not cleared.
            Ok(_guard) => return Some(afd.into_inner()),
            Err(error) => {
                tracing::warn!(pid, %error, "pidfd readiness failed; waiting in a blocking thread");
                afd.into_inner()
            }
        },
        Err(e) => {
            let (fd, error) = e.into_parts();
            tracing::warn!(pid, %error, "cannot register pidfd; waiting in a blocking thread");
            fd
        }
    };
    tokio::task::spawn_blocking(move || {
        loop {
            let mut fds = [nix::poll::PollFd::new(
                fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(n) if n > 0 => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                // EBADF/EINVAL/ENOMEM: nothing to wait on; reaping reports what it can.
                Err(_) => break,
            }
        }
        fd
    })
    .await
    .ok()
}

/// Collects the exit status of an exited process through its pidfd.
async fn reap(pidfd: OwnedFd, pid: u32) -> ExitStatus {
    match rustix::process::waitid(
        WaitId::PidFd(pidfd.as_fd()),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    ) {
        Ok(Some(status)) => map_status(&status),
        // Readable but not yet waitable should not happen; wait for it off the event loop.
        Ok(None) => tokio::task::spawn_blocking(move || {
            match rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED) {
                Ok(Some(status)) => map_status(&status),
                _ => ExitStatus::Unknown,
            }
        })
        .await
        .unwrap_or(ExitStatus::Unknown),
        // Not our child (adopted after a restart of watchd): its parent collects the status.
        Err(Errno::CHILD) => ExitStatus::Unknown,
        Err(e) => {
            tracing::warn!(pid, error = %e, "waitid on pidfd failed");
            ExitStatus::Unknown
        }
    }
}

fn map_status(status: &WaitIdStatus) -> ExitStatus {
    if let Some(code) = status.exit_status() {
        ExitStatus::Code(code)
    } else if let Some(sig) = status.terminating_signal() {
        ExitStatus::Signal(sig)
    } else {
        ExitStatus::Unknown
    }
}

/// Signals every process of a service: through its cgroup when it has one (`cgroup.kill`
/// for Kill; SIGTERM then SIGCONT to each process for Term), else its process group and the
/// main pid (which may have left the group). SIGCONT follows SIGTERM so that a stopped
/// process can act on it. A process that is already gone is not an error.
pub fn signal_tree(
    pid: u32,
    cgroup: Option<&Cgroup>,
    signal: TreeSignal,
) -> Result<(), ProcessError> {
    let me = std::process::id();
    let sig = match signal {
        TreeSignal::Term => Signal::TERM,
        TreeSignal::Kill => Signal::KILL,
    };
    match cgroup {
        Some(cg) => match signal {
            TreeSignal::Kill => cg.kill()?,
            TreeSignal::Term => {
                for p in cg.tree_procs()?.into_iter().filter(|p| *p != me) {
                    for s in [sig, Signal::CONT] {
                        send_signal(p, s).map_err(|source| ProcessError::Signal {
                            pid: p,
                            signal: s.as_raw(),
                            source,
                        })?;
                    }
                }
            }
        },
        None => {
            let target = raw_pid(pid)
                .filter(|_| pid > 1 && pid != me)
                .ok_or(ProcessError::InvalidPid { pid })?;
            let signals: &[Signal] = match signal {
                TreeSignal::Term => &[Signal::TERM, Signal::CONT],
                TreeSignal::Kill => &[Signal::KILL],
            };
            for s in signals {
                let err = |source: io::Error| ProcessError::Signal {
                    pid,
                    signal: s.as_raw(),
                    source,
                };
                match rustix::process::kill_process_group(target, *s) {
                    Ok(()) | Err(Errno::SRCH) => {}
                    Err(e) => return Err(err(e.into())),
                }
                match rustix::process::kill_process(target, *s) {
                    Ok(()) | Err(Errno::SRCH) => {}
                    Err(e) => return Err(err(e.into())),
                }
            }
        }
    }
    Ok(())
}

/// Resident memory in bytes of the cgroup's processes, else of `pid` and its descendants.
/// Processes that vanish while being measured count as zero.
pub fn tree_rss(pid: u32, cgroup: Option<&Cgroup>) -> u64 {
    let pids = match cgroup.map(Cgroup::tree_procs) {
        Some(Ok(pids)) => pids,
        _ => descendants_and_self(pid),
    };
    pids.into_iter().map(vm_rss).fold(0u64, u64::saturating_add)
}

/// `pid` and everything below it through `/proc/PID/task/TID/children`.
fn descendants_and_self(pid: u32) -> Vec<u32> {
    let mut seen = HashSet::new();
    let mut queue = vec![pid];
    let mut out = Vec::new();
    while let Some(p) = queue.pop() {
        if !seen.insert(p) {
            continue;
        }
        out.push(p);
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            queue.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// VmRSS of one process in bytes; 0 when it is gone, a zombie or a kernel thread.
fn vm_rss(pid: u32) -> u64 {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::test_support::root;
    use std::time::Duration;

    /// Generous bound for anything a test waits for; real waits end far sooner.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);
    const POLL_PAUSE: Duration = Duration::from_millis(10);

    /// Kills the tree of a test's process and reaps it, also when the test fails midway. It
    /// signals through a pidfd, and the group only while the main pid is unreaped, so it can
    /// never hit a recycled pid.
    struct ProcGuard {
        pid: u32,
        pidfd: OwnedFd,
    }

    impl ProcGuard {
        fn new(s: &Spawned) -> ProcGuard {
            ProcGuard {
                pid: s.pid,
                pidfd: s.pidfd.try_clone().expect("dup pidfd"),
            }
        }
    }

    impl Drop for ProcGuard {
        fn drop(&mut self) {
            let opts = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
            let unreaped_child =
                rustix::process::waitid(WaitId::PidFd(self.pidfd.as_fd()), opts).is_ok();
            if unreaped_child && let Some(p) = raw_pid(self.pid) {
                let _ = rustix::process::kill_process_group(p, Signal::KILL);
            }
            let _ = rustix::process::pidfd_send_signal(&self.pidfd, Signal::KILL);
            if unreaped_child {
                let _ = rustix::process::waitid(
                    WaitId::PidFd(self.pidfd.as_fd()),
                    WaitIdOptions::EXITED,
                );
            }
        }
    }

    fn spec(dir: &Path, command: &str, args: &[&str]) -> SpawnSpec {
        SpawnSpec {
            service: "svc".into(),
            command: command.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            log_path: dir.join("logs").join("svc.log"),
            cgroup: None,
        }
    }

    fn sh(dir: &Path, script: &str) -> SpawnSpec {
        spec(dir, "/bin/sh", &["-c", script])
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(POLL_PAUSE).await;
        }
    }

    async fn exit_of(pidfd: OwnedFd, pid: u32) -> ExitStatus {
        tokio::time::timeout(TEST_TIMEOUT, wait_exit(pidfd, pid))
            .await
            .expect("process did not end in time")
    }

    fn children(pid: u32) -> Vec<u32> {
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect()
    }

    fn log_text(s: &SpawnSpec) -> String {
        fs::read_to_string(&s.log_path).unwrap_or_default()
    }

    fn proc_state(pid: u32) -> Option<char> {
        stat_fields(pid).ok()?.first()?.chars().next()
    }

    /// Waits until each of `pids` (not our children) has ended, through their pidfds.
    async fn all_end(pidfds: Vec<(u32, OwnedFd)>) {
        for (pid, fd) in pidfds {
            let status = exit_of(fd, pid).await;
            assert_eq!(
                status,
                ExitStatus::Unknown,
                "grandchild {pid} is not ours to reap"
            );
        }
    }

    fn open_all(pids: &[u32]) -> Vec<(u32, OwnedFd)> {
        pids.iter()
            .map(|p| (*p, open_pidfd(*p).expect("pidfd of a live process")))
            .collect()
    }

    #[tokio::test]
    async fn output_goes_to_the_log_and_kill_gives_signal_9() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = sh(dir.path(), "echo hi; sleep 100 & sleep 100");
        let p = spawn(&s).expect("spawn");
        let _guard = ProcGuard::new(&p);
        assert!(is_child(p.pid));
        assert_eq!(start_time(p.pid).expect("start time"), p.start_time);
        wait_until("hi in the log", || log_text(&s) == "hi\n").await;
        wait_until("two sleeps", || children(p.pid).len() == 2).await;
        let grandchildren = open_all(&children(p.pid));
        // Own process group, not our session's.
        assert_eq!(
            stat_fields(p.pid).expect("stat")[2],
            p.pid.to_string(),
            "pgid is the pid"
        );
        signal_tree(p.pid, None, TreeSignal::Kill).expect("kill tree");
        assert_eq!(
            exit_of(p.pidfd, p.pid).await,
            ExitStatus::Signal(libc::SIGKILL)
        );
        all_end(grandchildren).await;
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(&s.log_path).expect("log").mode() & 0o777,
            LOG_FILE_MODE
        );
    }

    #[tokio::test]
    async fn exit_codes_are_mapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn(&sh(dir.path(), "exit 3")).expect("spawn");
        assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(3));
        let p = spawn(&sh(dir.path(), "kill -TERM $$")).expect("spawn");
        assert_eq!(
            exit_of(p.pidfd, p.pid).await,
            ExitStatus::Signal(libc::SIGTERM)
        );
        let p = spawn(&spec(dir.path(), "true", &[])).expect("bare name through PATH");
        assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(0));
    }

    /// Our children that never got to exec keep the spawning thread's name.
    fn our_children_named(comm: &str) -> Vec<u32> {
        let me = std::process::id().to_string();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                let named = text
                    .split_once('(')
                    .and_then(|(_, r)| r.rsplit_once(')'))
                    .is_some_and(|(c, _)| c == comm);
                named && stat_fields(*pid).is_ok_and(|f| f.get(STAT_PPID) == Some(&me))
            })
            .collect()
    }

    #[test]
    fn a_missing_command_is_an_error_naming_it_and_leaves_no_zombie() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bare = spawn(&spec(dir.path(), "ftkit-no-such-command", &[])).expect_err("must fail");
        assert!(matches!(bare, ProcessError::NotFound { .. }));
        assert!(bare.to_string().contains("ftkit-no-such-command"), "{bare}");

        let not_exec = dir.path().join("not-executable");
        fs::write(&not_exec, "#!/bin/sh\n").expect("write");
        let missing = dir.path().join("missing-binary");
        // Exec-time failures go through fork; run them on a thread with a known name so a
        // leftover unreaped child (which keeps that name) can be found.
        const THREAD: &str = "ftk-nozombie";
        let d = dir.path().to_owned();
        let errors = std::thread::Builder::new()
            .name(THREAD.into())
            .spawn(move || {
                let a = spawn(&spec(&d, missing.to_str().expect("utf-8 path"), &[]))
                    .expect_err("ENOENT");
                let b = spawn(&spec(&d, not_exec.to_str().expect("utf-8 path"), &[]))
                    .expect_err("EACCES");
                (a, b, missing, not_exec)
            })
            .expect("thread")
            .join()
            .expect("no panic");
        let (a, b, missing, not_exec) = errors;
        match &a {
            ProcessError::Spawn { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
            }
            other => panic!("expected a spawn error, got {other:?}"),
        }
        assert!(a.to_string().contains(&*missing.to_string_lossy()), "{a}");
        assert!(
            matches!(&b, ProcessError::Spawn { source, .. } if source.raw_os_error() == Some(libc::EACCES)),
            "{b:?}"
        );
        assert!(b.to_string().contains(&*not_exec.to_string_lossy()), "{b}");
        assert_eq!(
            our_children_named(THREAD),
            Vec::<u32>::new(),
            "a failed spawn left a zombie"
        );
    }

    #[tokio::test]
    async fn kill_ends_a_stopped_tree_without_cgroup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn(&sh(dir.path(), "sleep 100 & sleep 100 & wait")).expect("spawn");
        let _guard = ProcGuard::new(&p);
        wait_until("two sleeps", || children(p.pid).len() == 2).await;
        let grandchildren = open_all(&children(p.pid));
        send_signal(p.pid, Signal::STOP).expect("stop");
        wait_until("main stopped", || proc_state(p.pid) == Some('T')).await;
        signal_tree(p.pid, None, TreeSignal::Kill).expect("kill tree");
        assert_eq!(
            exit_of(p.pidfd, p.pid).await,
            ExitStatus::Signal(libc::SIGKILL)
        );
        all_end(grandchildren).await;
    }

    /// A shell that exits 7 on SIGTERM, only once it runs again.
    const TRAPPING: &str = "trap 'exit 7' TERM; sleep 100 & wait";

    #[tokio::test]
    async fn term_and_cont_end_a_stopped_shell_without_cgroup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn(&sh(dir.path(), TRAPPING)).expect("spawn");
        let _guard = ProcGuard::new(&p);
        wait_until("the sleep", || children(p.pid).len() == 1).await;
        let grandchildren = open_all(&children(p.pid));
        send_signal(p.pid, Signal::STOP).expect("stop");
        wait_until("main stopped", || proc_state(p.pid) == Some('T')).await;
        signal_tree(p.pid, None, TreeSignal::Term).expect("term tree");
        assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(7));
        all_end(grandchildren).await;
    }

    #[tokio::test]
    async fn cgroup_kill_reaches_a_child_that_left_the_process_group() {
        let Some(guard) = root("spawn") else { return };
        let cg = guard.0.service("svc").expect("service cgroup");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = sh(dir.path(), "setsid sleep 100 & sleep 100");
        s.cgroup = Some(cg.clone());
        let p = spawn(&s).expect("spawn");
        let _guard = ProcGuard::new(&p);
        assert!(
            cg.procs().expect("procs").contains(&p.pid),
            "moved before exec"
        );
        let session = |pid: u32| stat_fields(pid).ok().map(|f| f[3].clone());
        let main_session = session(p.pid);
        assert!(main_session.is_some());
        // Three processes, one of which has finished calling setsid().
        wait_until("a child in its own session", || {
            cg.procs().is_ok_and(|v| {
                v.len() == 3
                    && v.iter()
                        .any(|q| session(*q).is_some_and(|s| Some(s) != main_session))
            })
        })
        .await;
        let procs = cg.procs().expect("procs");
        let others: Vec<u32> = procs.iter().copied().filter(|q| *q != p.pid).collect();
        let others = open_all(&others);
        signal_tree(p.pid, Some(&cg), TreeSignal::Kill).expect("cgroup kill");
        assert_eq!(
            exit_of(p.pidfd, p.pid).await,
            ExitStatus::Signal(libc::SIGKILL)
        );
        all_end(others).await;
        wait_until("cgroup empty", || cg.is_empty()).await;
    }

    #[tokio::test]
    async fn cgroup_term_and_cont_end_a_stopped_shell() {
        let Some(guard) = root("term") else { return };
        let cg = guard.0.service("svc").expect("service cgroup");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = sh(dir.path(), TRAPPING);
        s.cgroup = Some(cg.clone());
        let p = spawn(&s).expect("spawn");
        let _guard = ProcGuard::new(&p);
        wait_until("the sleep", || cg.procs().is_ok_and(|v| v.len() == 2)).await;
        assert!(tree_rss(p.pid, Some(&cg)) > 0);
        send_signal(p.pid, Signal::STOP).expect("stop");
        wait_until("main stopped", || proc_state(p.pid) == Some('T')).await;
        signal_tree(p.pid, Some(&cg), TreeSignal::Term).expect("term tree");
        assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(7));
        wait_until("cgroup empty", || cg.is_empty()).await;
    }

    #[tokio::test]
    async fn wait_exit_killing_tree_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn(&sh(dir.path(), "sleep 100 & exit 4")).expect("spawn");
        let _guard = ProcGuard::new(&p);
        let status =
            tokio::time::timeout(TEST_TIMEOUT, wait_exit_killing_tree(p.pidfd, p.pid, None))
                .await
                .expect("in time");
        assert_eq!(status, ExitStatus::Code(4));
        // The orphaned sleep shared the main's process group, and was killed with it.
        let pgid = p.pid.to_string();
        let leftovers: Vec<u32> = fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|q| stat_fields(*q).is_ok_and(|f| f.get(2) == Some(&pgid) && f[0] != "Z"))
            .collect();
        assert_eq!(leftovers, Vec::<u32>::new());
    }

    #[tokio::test]
    async fn adopt_checks_the_start_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn(&spec(dir.path(), "sleep", &["100"])).expect("spawn");
        let _guard = ProcGuard::new(&p);
        assert!(adopt(p.pid, p.start_time).expect("adopt").is_some());
        assert!(
            adopt(p.pid, p.start_time + 1).expect("adopt").is_none(),
            "another process now"
        );
        assert!(adopt(0, 0).expect("adopt").is_none());
        signal_tree(p.pid, None, TreeSignal::Kill).expect("kill");
        assert_eq!(
            exit_of(p.pidfd, p.pid).await,
            ExitStatus::Signal(libc::SIGKILL)
        );
        assert!(adopt(p.pid, p.start_time).expect("adopt").is_none(), "dead");
        assert!(matches!(start_time(p.pid), Err(ProcessError::Proc { .. })));
    }

    #[tokio::test]
    async fn an_adopted_non_child_ends_as_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = sh(dir.path(), "sleep 100 & echo $!");
        let p = spawn(&s).expect("spawn");
        assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(0));
        let orphan: u32 = log_text(&s).trim().parse().expect("pid printed");
        assert!(
            !is_child(orphan),
            "double fork: the sleep's parent was the shell"
        );
        let st = start_time(orphan).expect("start time");
        let fd = adopt(orphan, st).expect("adopt").expect("alive");
        let killer = fd.try_clone().expect("dup");
        let waiter = tokio::spawn(wait_exit(fd, orphan));
        rustix::process::pidfd_send_signal(&killer, Signal::KILL).expect("kill through pidfd");
        let status = tokio::time::timeout(TEST_TIMEOUT, waiter)
            .await
            .expect("in time")
            .expect("task");
        assert_eq!(status, ExitStatus::Unknown);
    }

    #[tokio::test]
    async fn runs_as_another_user() {
        let Ok(Some(nobody)) = User::from_name("nobody") else {
            eprintln!("skipping: no user nobody here");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        for user in ["nobody".to_owned(), nobody.uid.to_string()] {
            let mut s = spec(dir.path(), "sleep", &["100"]);
            s.user = Some(user);
            let p = spawn(&s).expect("spawn as nobody");
            let _guard = ProcGuard::new(&p);
            let status = fs::read_to_string(format!("/proc/{}/status", p.pid)).expect("status");
            let ids = |key: &str| -> Vec<String> {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .expect("field present")
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(ids("Uid:"), vec![nobody.uid.to_string(); 4]);
            assert_eq!(ids("Gid:"), vec![nobody.gid.to_string(); 4]);
            let groups = nix::unistd::getgrouplist(
                &std::ffi::CString::new("nobody").expect("no NUL"),
                nobody.gid,
            )
            .expect("groups");
            let mut want: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            want.sort();
            want.dedup();
            let mut got = ids("Groups:");
            got.sort();
            assert_eq!(got, want);
            signal_tree(p.pid, None, TreeSignal::Kill).expect("kill");
            assert_eq!(
                exit_of(p.pidfd, p.pid).await,
                ExitStatus::Signal(libc::SIGKILL)
            );
        }
        let mut s = spec(dir.path(), "sleep", &["100"]);
        s.user = Some("ftkit-no-such-user".into());
        let e = spawn(&s).expect_err("unknown user");
        assert!(matches!(e, ProcessError::UnknownUser { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn env_cwd_and_path_come_from_the_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("work");
        fs::create_dir(&work).expect("mkdir");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).expect("mkdir");
        let tool = bin.join("ftkit-test-tool");
        fs::write(&tool, "#!/bin/sh\necho \"tool $FOO $BAR\"\npwd\n").expect("write");
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut s = spec(dir.path(), "ftkit-test-tool", &[]);
        s.env = vec![
            ("FOO".into(), "first".into()),
            ("PATH".into(), "/nonexistent".into()),
            ("FOO".into(), "second".into()),
            ("BAR".into(), "b".into()),
            ("PATH".into(), format!("/nonexistent::{}", bin.display())),
        ];
        s.cwd = Some(dir.path().join("absent"));
        assert!(matches!(spawn(&s), Err(ProcessError::Cwd { .. })));
        s.cwd = Some(work.clone());
        let p = spawn(&s).expect("spawn through the spec's PATH");
        assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(0));
        let want = format!(
            "tool second b\n{}\n",
            fs::canonicalize(&work).expect("canonical").display()
        );
        assert_eq!(log_text(&s), want);
    }

    #[tokio::test]
    async fn blocked_and_ignored_signals_do_not_leak_into_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = spec(dir.path(), "sleep", &["100"]);
        const THREAD_NAME: &str = "ftk-sigmask";
        let spawned = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                // This thread blocks SIGUSR1 (as a signal-handling thread would) and ignores
                // SIGWINCH (process-wide; harmless to the test harness), then spawns.
                let mut set = nix::sys::signal::SigSet::empty();
                set.add(nix::sys::signal::Signal::SIGUSR1);
                set.thread_block().expect("block");
                // SAFETY: SIG_IGN installs no handler code; nothing else in the test binary
                // relies on SIGWINCH.
                let old = unsafe {
                    nix::sys::signal::signal(
                        nix::sys::signal::Signal::SIGWINCH,
                        nix::sys::signal::SigHandler::SigIgn,
                    )
                }
                .expect("ignore");
                let p = spawn(&s);
                // SAFETY: restores the disposition read above.
                let _ =
                    unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGWINCH, old) };
                p
            })
            .expect("thread")
            .join()
            .expect("no panic")
            .expect("spawn");
        let _guard = ProcGuard::new(&spawned);
        let status = fs::read_to_string(format!("/proc/{}/status", spawned.pid)).expect("status");
        let mask = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .map(str::to_owned)
        };
        assert_eq!(mask("SigBlk:").as_deref(), Some("0000000000000000"));
        assert_eq!(mask("SigIgn:").as_deref(), Some("0000000000000000"));
        signal_tree(spawned.pid, None, TreeSignal::Kill).expect("kill");
        assert_eq!(
            exit_of(spawned.pidfd, spawned.pid).await,
            ExitStatus::Signal(libc::SIGKILL)
        );
    }

    #[tokio::test]
    async fn tree_rss_counts_the_live_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn(&sh(dir.path(), "sleep 100 & sleep 100")).expect("spawn");
        let _guard = ProcGuard::new(&p);
        wait_until("two sleeps", || children(p.pid).len() == 2).await;
        let main_only = vm_rss(p.pid);
        assert!(main_only > 0);
        assert!(tree_rss(p.pid, None) > main_only, "children are counted");
        signal_tree(p.pid, None, TreeSignal::Kill).expect("kill");
        assert_eq!(
            exit_of(p.pidfd, p.pid).await,
            ExitStatus::Signal(libc::SIGKILL)
        );
        assert_eq!(tree_rss(p.pid, None), 0, "a reaped process has no memory");
    }

    #[test]
    fn dangerous_pids_are_refused() {
        for pid in [0, 1, std::process::id(), u32::MAX] {
            assert!(
                matches!(
                    signal_tree(pid, None, TreeSignal::Kill),
                    Err(ProcessError::InvalidPid { .. })
                ),
                "{pid}"
            );
        }
    }
}
