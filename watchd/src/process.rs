//! A service's processes as the OS sees them: spawning the main process (clone3 straight into
//! its cgroup with a pidfd; fork and a write to `cgroup.procs` where clone3 cannot), own process
//! group, log file, user switch; pidfds, waiting for its end, re-adopting it after a watchd
//! restart, signalling its whole tree and measuring its memory.
//!
//! It never keeps a `std::process::Child` (reaping is `waitid` on the pidfd), never sets
//! PR_SET_PDEATHSIG (services outlive a crash of watchd), and never allocates between fork (or
//! clone) and exec.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CString, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

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

/// How a main process is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// clone3, falling back to [`Method::Command`] where the kernel or a sandbox refuses it.
    Auto,
    /// clone3 only: tests and the timing run prove that the fast path works on this host.
    #[cfg(test)]
    Clone3,
    /// std's `Command` (fork), the child moving itself into the cgroup before exec. A
    /// migration waits for an RCU grace period in the kernel (milliseconds), which is why it
    /// is only the fallback.
    Command,
}

/// Starts the service's main process: in its own process group and (when given) cgroup, with
/// stdout/stderr appended to the log file. Returns once exec has succeeded, or with exec's
/// error; no zombie is left behind on any error path.
pub fn spawn(spec: &SpawnSpec) -> Result<Spawned, ProcessError> {
    spawn_with(spec, Method::Auto)
}

fn spawn_with(spec: &SpawnSpec, method: Method) -> Result<Spawned, ProcessError> {
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
    if method != Method::Command {
        match spawn_clone3(spec, &program, identity.as_ref(), &log) {
            Ok(spawned) => return Ok(spawned),
            Err(Clone3Error::Failed(e)) => return Err(e),
            Err(Clone3Error::Unavailable(source)) => {
                if method != Method::Auto {
                    return Err(ProcessError::Spawn {
                        command: spec.command.clone(),
                        source,
                    });
                }
                if !CLONE3_FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        service = %spec.service,
                        error = %source,
                        "clone3 into the cgroup did not work; falling back to fork and a move \
                         into the cgroup, which makes a start slower (logged once)"
                    );
                }
            }
        }
    }
    spawn_command(spec, &program, identity, log)
}

/// Set once the fallback to [`Method::Command`] has been logged, so it is logged once.
static CLONE3_FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Why the clone3 path did not start the process.
#[derive(Debug)]
enum Clone3Error {
    /// The kernel lacks clone3 or CLONE_INTO_CGROUP, a sandbox (seccomp) refuses it, or the
    /// child was killed before it ran: the fork path may still work.
    Unavailable(io::Error),
    /// A failure the fork path would hit as well (exec, setup, resources): reported as is.
    Failed(ProcessError),
}

impl From<ProcessError> for Clone3Error {
    fn from(e: ProcessError) -> Clone3Error {
        Clone3Error::Failed(e)
    }
}

/// The fallback: std's `Command`, with the move into the cgroup written by the child itself
/// before exec, and the pidfd opened after the fact (the child is unreaped, so its pid cannot
/// have been reused).
fn spawn_command(
    spec: &SpawnSpec,
    program: &Path,
    identity: Option<Identity>,
    log: OwnedFd,
) -> Result<Spawned, ProcessError> {
    let log_err = log.try_clone().map_err(|source| ProcessError::Log {
        path: spec.log_path.clone(),
        command: spec.command.clone(),
        source,
    })?;
    let cgroup_procs = spec.cgroup.as_ref().map(Cgroup::procs_file).transpose()?;

    let mut cmd = Command::new(program);
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
    let setup = ChildSetup::new(cgroup_procs, identity.as_ref());
    // SAFETY: `ChildSetup::apply` runs in the forked child before exec and only makes
    // async-signal-safe calls (sigprocmask, and raw rt_sigaction, write, setgroups, setgid
    // and setuid syscalls) on data prepared before the fork; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || setup.apply().map_err(io::Error::from_raw_os_error));
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

/// `CLONE_PIDFD` of linux/sched.h: the kernel stores a pidfd of the child at `clone_args.pidfd`.
const CLONE_PIDFD: u64 = 0x1000;

/// `CLONE_INTO_CGROUP` of linux/sched.h (Linux 5.7): the child starts in the cgroup whose
/// directory fd is `clone_args.cgroup`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `CLONE_ARGS_SIZE_VER2` of linux/sched.h: `struct clone_args` up to and including `cgroup`.
const CLONE_ARGS_SIZE_VER2: usize = 88;

/// `struct clone_args` of linux/sched.h, version 2 (libc has it only for some architectures).
#[repr(C)]
#[derive(Debug, Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const _: () = assert!(std::mem::size_of::<CloneArgs>() == CLONE_ARGS_SIZE_VER2);

/// clone3 errors after which the fork path is tried: no clone3 (ENOSYS; also what container
/// seccomp profiles return), no CLONE_INTO_CGROUP (E2BIG on 5.3-5.6: the `cgroup` field is
/// beyond what the kernel knows; EINVAL for an unknown flag), or refused (EPERM).
const CLONE3_UNAVAILABLE: [i32; 4] = [libc::ENOSYS, libc::E2BIG, libc::EINVAL, libc::EPERM];

/// Exit status of a child whose setup or exec failed (the shell's "cannot execute").
const CHILD_FAILED_EXIT: libc::c_int = 127;

/// Where `execve` sends a file that is executable but neither ELF nor `#!`, as glibc's execvp
/// (which the fork path uses) does.
const SCRIPT_SHELL: &str = "/bin/sh";

/// stdin of every service.
const DEV_NULL: &str = "/dev/null";

/// `CLOSE_RANGE_CLOEXEC` of linux/close_range.h: mark the range close-on-exec.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Lowest fd that dup2 onto stdin/stdout/stderr cannot overwrite.
const FIRST_NON_STDIO_FD: RawFd = 3;

/// Bytes of the child's failure report: the step (u32) and its errno (i32).
const REPORT_LEN: usize = 8;

/// The first byte the child writes, before anything else: a report without it means the child
/// never ran (it was killed as it was created).
const REPORT_STARTED: u8 = 0xA5;

/// Set once a child cloned into a cgroup was SIGKILLed before it ran. Linux (6.18 here) snapshots
/// the kill counter of the *parent's* cgroup for CLONE_INTO_CGROUP and compares it with the
/// target's after the fork, so every child cloned into a cgroup that was ever killed through
/// `cgroup.kill` dies at birth. From then on an empty service cgroup is recreated (a new
/// directory has a fresh counter) before each clone into it.
static CLONE_INTO_KILLED_CGROUP_KILLS: AtomicBool = AtomicBool::new(false);

/// Set when even a freshly created cgroup killed the child at birth: CLONE_INTO_CGROUP is then
/// not used again by this process.
static CLONE_INTO_CGROUP_UNUSABLE: AtomicBool = AtomicBool::new(false);

/// What the error says when the kernel killed the child before it ran.
const KILLED_AT_BIRTH: &str = "the child cloned into the cgroup was killed before it ran";

/// The clone3 path: the child is created inside its cgroup (no migration) and the pidfd comes
/// with it (no window for pid reuse). Everything the child touches is prepared before the
/// clone, because watchd is multi-threaded and the child may only make raw system calls.
fn spawn_clone3(
    spec: &SpawnSpec,
    program: &Path,
    identity: Option<&Identity>,
    log: &OwnedFd,
) -> Result<Spawned, Clone3Error> {
    if spec.cgroup.is_some() && CLONE_INTO_CGROUP_UNUSABLE.load(Ordering::Relaxed) {
        return Err(Clone3Error::Unavailable(io::Error::other(KILLED_AT_BIRTH)));
    }
    let spawn_err = |source: io::Error| ProcessError::Spawn {
        command: spec.command.clone(),
        source,
    };
    let image = ExecImage::new(spec, program, identity).map_err(spawn_err)?;
    let stdin = fs::File::open(DEV_NULL)
        .map(OwnedFd::from)
        .and_then(above_stdio)
        .map_err(spawn_err)?;
    let log = log
        .try_clone()
        .and_then(above_stdio)
        .map_err(|source| ProcessError::Log {
            path: spec.log_path.clone(),
            command: spec.command.clone(),
            source,
        })?;
    let setup = ChildSetup::new(None, identity);
    let child = ChildFiles {
        image: &image,
        setup: &setup,
        stdin: &stdin,
        log: &log,
    };
    let mut recreate = CLONE_INTO_KILLED_CGROUP_KILLS.load(Ordering::Relaxed);
    // At most two rounds: the second recreates the cgroup after the first child was killed.
    loop {
        let fresh = match &spec.cgroup {
            Some(cg) if recreate => cg.recreate_if_empty().unwrap_or_else(|error| {
                // The old cgroup may still be there; if not, opening it below fails.
                tracing::warn!(service = %spec.service, %error, "cannot recreate the cgroup");
                false
            }),
            _ => false,
        };
        // Opened after a recreation: an fd of the removed directory would name a dead cgroup.
        let cgroup = spec
            .cgroup
            .as_ref()
            .map(Cgroup::dir_fd)
            .transpose()
            .map_err(ProcessError::from)?;
        if let Some(spawned) = clone_and_exec(&child, cgroup.as_ref(), &spawn_err)? {
            return Ok(spawned);
        }
        let killed = || Clone3Error::Unavailable(io::Error::other(KILLED_AT_BIRTH));
        if spec.cgroup.is_none() || (recreate && !fresh) {
            // Killed by someone else, or the cgroup could not be renewed: the fork path then.
            return Err(killed());
        }
        if fresh {
            CLONE_INTO_CGROUP_UNUSABLE.store(true, Ordering::Relaxed);
            return Err(killed());
        }
        if !CLONE_INTO_KILLED_CGROUP_KILLS.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                service = %spec.service,
                "this kernel kills children cloned into a cgroup that was killed before; \
                 empty service cgroups are recreated before each start from now on"
            );
        }
        recreate = true;
    }
}

/// What every clone of one spawn shares: prepared once, before any clone.
#[derive(Debug)]
struct ChildFiles<'a> {
    image: &'a ExecImage,
    setup: &'a ChildSetup,
    stdin: &'a OwnedFd,
    log: &'a OwnedFd,
}

/// One clone3 and its outcome: `Ok(None)` when the child was killed before it ran (it has been
/// reaped); a failed exec or setup is reaped and returned as the error.
fn clone_and_exec(
    child: &ChildFiles<'_>,
    cgroup: Option<&OwnedFd>,
    spawn_err: &dyn Fn(io::Error) -> ProcessError,
) -> Result<Option<Spawned>, Clone3Error> {
    let (report_read, report_write) = io::pipe().map_err(spawn_err)?;
    let report_write = above_stdio(OwnedFd::from(report_write)).map_err(spawn_err)?;
    let plan = ExecPlan {
        image: child.image,
        stdin: child.stdin.as_raw_fd(),
        log: child.log.as_raw_fd(),
        report: report_write.as_raw_fd(),
        setup: child.setup,
    };

    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD,
        // The kernel writes the pidfd through this address.
        pidfd: (&raw mut pidfd).expose_provenance() as u64,
        exit_signal: u64::from(libc::SIGCHLD.unsigned_abs()),
        ..CloneArgs::default()
    };
    if let Some(dir) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        // An OwnedFd is never negative.
        args.cgroup = u64::from(dir.as_raw_fd().unsigned_abs());
    }
    let cloned = {
        // The child starts with every signal blocked, so no handler of watchd runs in it
        // before it has reset them all; the parent's mask is restored when this guard drops.
        let _blocked = SignalsBlocked::new().map_err(spawn_err)?;
        // SAFETY: `args` is a valid clone_args of the size passed, and `pidfd` (where the
        // kernel writes) outlives the call. Without CLONE_VM the child runs on a copy of this
        // address space and stack, so `plan` and everything it points to is valid in it; it
        // goes straight to `exec_child`, which never returns and only makes raw system calls
        // (no allocation, no lock, nothing a thread that was not copied might hold).
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &raw mut args,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if ret == 0 {
            exec_child(&plan);
        }
        // errno is read before the guard drops and restores the mask.
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    };
    // Only the child may keep the write end: EOF on the read end then means exec succeeded.
    drop(report_write);
    let ret = match cloned {
        Ok(ret) => ret,
        Err(e)
            if e.raw_os_error()
                .is_some_and(|n| CLONE3_UNAVAILABLE.contains(&n)) =>
        {
            return Err(Clone3Error::Unavailable(e));
        }
        Err(e) => return Err(spawn_err(e).into()),
    };
    // SAFETY: clone3 succeeded with CLONE_PIDFD, so the kernel stored a new pidfd (O_CLOEXEC)
    // that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let Ok(pid) = u32::try_from(ret) else {
        // Not reachable (pids are positive and below 2^22); the pidfd still names the child.
        kill_and_reap(&pidfd, None);
        return Err(spawn_err(io::Error::from_raw_os_error(libc::EINVAL)).into());
    };
    match read_report(report_read) {
        Ok(ChildReport::Execed) => {}
        // The child is dead or in _exit; the kill only makes sure reaping cannot wait on a
        // child that is somehow still there (stopped, say).
        Ok(ChildReport::NeverRan) => {
            kill_and_reap(&pidfd, Some(pid));
            return Ok(None);
        }
        Ok(ChildReport::Failed { step, errno }) => {
            kill_and_reap(&pidfd, Some(pid));
            return Err(spawn_err(child_failure(step, errno)).into());
        }
        Err(e) => {
            kill_and_reap(&pidfd, Some(pid));
            return Err(spawn_err(e).into());
        }
    }
    match start_time(pid) {
        Ok(start_time) => Ok(Some(Spawned {
            pid,
            pidfd,
            start_time,
        })),
        Err(e) => {
            kill_and_reap(&pidfd, Some(pid));
            Err(e.into())
        }
    }
}

/// An fd at 3 or above (a duplicate, CLOEXEC, when it is not): the child dup2s onto 0-2, which
/// must not overwrite a source it still needs.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= FIRST_NON_STDIO_FD {
        return Ok(fd);
    }
    rustix::io::fcntl_dupfd_cloexec(&fd, FIRST_NON_STDIO_FD).map_err(io::Error::from)
}

/// What the child wrote to the report pipe before its write end closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildReport {
    /// Nothing: the child was killed before it ran.
    NeverRan,
    /// Only the start byte: exec closed the CLOEXEC write end.
    Execed,
    /// A setup step or exec failed with this errno.
    Failed { step: u32, errno: i32 },
}

/// Reads the report until EOF, i.e. until the child has exec'd or ended.
fn read_report(mut reader: io::PipeReader) -> io::Result<ChildReport> {
    let mut buf = Vec::with_capacity(1 + REPORT_LEN);
    // read_to_end retries EINTR. EOF comes once every copy of the write end is closed: the
    // child's at exec or exit, and that of a child another thread forks meanwhile at its exec.
    reader.read_to_end(&mut buf)?;
    match buf.as_slice() {
        [] => Ok(ChildReport::NeverRan),
        [REPORT_STARTED] => Ok(ChildReport::Execed),
        [REPORT_STARTED, s0, s1, s2, s3, e0, e1, e2, e3] => Ok(ChildReport::Failed {
            step: u32::from_ne_bytes([*s0, *s1, *s2, *s3]),
            errno: i32::from_ne_bytes([*e0, *e1, *e2, *e3]),
        }),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("garbled report from the child ({} bytes)", other.len()),
        )),
    }
}

/// The error of a failed child: exec's errno as is (ENOENT, EACCES, ...), a setup step's
/// errno with the step named.
fn child_failure(step: u32, errno: i32) -> io::Error {
    let source = io::Error::from_raw_os_error(errno);
    match ChildStep::from_code(step) {
        Some(ChildStep::Exec) => source,
        Some(step) => io::Error::new(source.kind(), ChildSetupError { step, source }),
        None => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown step {step} in the child's failure report ({source})"),
        ),
    }
}

/// A setup step of the child failed before exec.
#[derive(Debug, thiserror::Error)]
#[error("{step} in the child before exec: {source}")]
struct ChildSetupError {
    step: ChildStep,
    source: io::Error,
}

/// The steps of the child between clone and exec, as reported through the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildStep {
    Signals,
    ProcessGroup,
    Stdio,
    Cwd,
    Ids,
    Exec,
}

impl ChildStep {
    const ALL: [ChildStep; 6] = [
        ChildStep::Signals,
        ChildStep::ProcessGroup,
        ChildStep::Stdio,
        ChildStep::Cwd,
        ChildStep::Ids,
        ChildStep::Exec,
    ];

    fn code(self) -> u32 {
        match self {
            ChildStep::Signals => 1,
            ChildStep::ProcessGroup => 2,
            ChildStep::Stdio => 3,
            ChildStep::Cwd => 4,
            ChildStep::Ids => 5,
            ChildStep::Exec => 6,
        }
    }

    fn from_code(code: u32) -> Option<ChildStep> {
        ChildStep::ALL.into_iter().find(|s| s.code() == code)
    }
}

impl std::fmt::Display for ChildStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChildStep::Signals => "resetting signal dispositions and mask",
            ChildStep::ProcessGroup => "setpgid",
            ChildStep::Stdio => "setting up stdin/stdout/stderr",
            ChildStep::Cwd => "chdir",
            ChildStep::Ids => "switching user and groups",
            ChildStep::Exec => "exec",
        })
    }
}

/// The exec arguments as C strings, with the null-terminated pointer arrays into them (the
/// pointers stay valid while `self` lives: moving a CString does not move its bytes).
#[derive(Debug)]
struct ExecImage {
    program: CString,
    cwd: Option<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// [`SCRIPT_SHELL`], run when exec says ENOEXEC, with `script_argv`: the shell, the
    /// program, the arguments.
    shell: CString,
    script_argv: Vec<*const libc::c_char>,
    _strings: Vec<CString>,
}

impl ExecImage {
    /// argv\[0\] is the command as configured; the environment is watchd's, then USER,
    /// LOGNAME and HOME of the user, then the spec's entries (later ones win), as the fork path
    /// builds it. A NUL byte anywhere is InvalidInput.
    fn new(spec: &SpawnSpec, program: &Path, identity: Option<&Identity>) -> io::Result<ExecImage> {
        let c = |bytes: &[u8]| CString::new(bytes).map_err(io::Error::from);
        let program = c(program.as_os_str().as_bytes())?;
        let shell = c(SCRIPT_SHELL.as_bytes())?;
        let cwd = spec
            .cwd
            .as_ref()
            .map(|d| c(d.as_os_str().as_bytes()))
            .transpose()?;
        let args = spec
            .args
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let arg0 = c(spec.command.as_bytes())?;
        let env = child_environment(spec, identity)
            .into_iter()
            .map(|(k, v)| {
                let mut entry = k.into_vec();
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                c(&entry)
            })
            .collect::<io::Result<Vec<_>>>()?;

        let null = std::ptr::null::<libc::c_char>();
        let argv = std::iter::once(arg0.as_ptr())
            .chain(args.iter().map(|a| a.as_ptr()))
            .chain(std::iter::once(null))
            .collect();
        let script_argv = [shell.as_ptr(), program.as_ptr()]
            .into_iter()
            .chain(args.iter().map(|a| a.as_ptr()))
            .chain(std::iter::once(null))
            .collect();
        let envp = env
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(null))
            .collect();
        let mut strings = vec![arg0];
        strings.extend(args);
        strings.extend(env);
        Ok(ExecImage {
            program,
            cwd,
            argv,
            envp,
            shell,
            script_argv,
            _strings: strings,
        })
    }
}

/// watchd's environment, then the user's login variables, then the spec's entries.
fn child_environment(
    spec: &SpawnSpec,
    identity: Option<&Identity>,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    if let Some(id) = identity {
        if let Some(name) = &id.name {
            env.insert("USER".into(), name.into());
            env.insert("LOGNAME".into(), name.into());
        }
        if let Some(home) = &id.home {
            env.insert("HOME".into(), home.into());
        }
    }
    for (key, value) in &spec.env {
        env.insert(key.into(), value.into());
    }
    env
}

/// What the child of clone3 works with: fds and memory of the parent, which stay valid in the
/// child's copy of the address space.
#[derive(Debug)]
struct ExecPlan<'a> {
    image: &'a ExecImage,
    stdin: RawFd,
    log: RawFd,
    report: RawFd,
    setup: &'a ChildSetup,
}

/// Runs in the child of clone3 and never returns: exec, or report the failed step and its
/// errno through the pipe and `_exit`. Raw system calls only; no allocation, no panic path.
fn exec_child(plan: &ExecPlan<'_>) -> ! {
    let started = [REPORT_STARTED];
    // SAFETY: `started` is a live one-byte buffer; `plan.report` is the pipe's write end, open
    // in this child. Should it fail, the parent kills and reaps the child as one that never ran.
    unsafe {
        libc::write(plan.report, started.as_ptr().cast(), started.len());
    }
    let (step, errno) = plan.run();
    let s = step.code().to_ne_bytes();
    let e = errno.to_ne_bytes();
    let report: [u8; REPORT_LEN] = [s[0], s[1], s[2], s[3], e[0], e[1], e[2], e[3]];
    // SAFETY: `report` is a live buffer of the given length; `plan.report` is the pipe's write
    // end, open in this child. A failed write leaves only the exit status to tell.
    unsafe {
        libc::write(plan.report, report.as_ptr().cast(), report.len());
    }
    // SAFETY: _exit ends this process at once, without running atexit handlers or flushing
    // stdio buffers copied from the parent.
    unsafe { libc::_exit(CHILD_FAILED_EXIT) }
}

impl ExecPlan<'_> {
    /// The child's steps in order; returns only on failure, with the step and its errno.
    fn run(&self) -> (ChildStep, i32) {
        if let Err(errno) = self.setup.reset_signals() {
            return (ChildStep::Signals, errno);
        }
        // SAFETY: plain integer arguments.
        if unsafe { libc::setpgid(0, 0) } != 0 {
            return (ChildStep::ProcessGroup, last_errno());
        }
        for (from, to) in [
            (self.stdin, libc::STDIN_FILENO),
            (self.log, libc::STDOUT_FILENO),
            (self.log, libc::STDERR_FILENO),
        ] {
            // SAFETY: both are fds of this process; the sources are at 3 or above
            // (`above_stdio`), so no dup2 overwrites one that a later one reads.
            if unsafe { libc::dup2(from, to) } < 0 {
                return (ChildStep::Stdio, last_errno());
            }
        }
        // Descriptors watchd inherited without CLOEXEC must not reach the service (a stray
        // pipe would also make its transparent checkpoints unrestorable). Best effort: kernels
        // before 5.11 lack the flag, and exec then passes them on as before.
        // SAFETY: plain integer arguments; only marks this child's own descriptors.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                FIRST_NON_STDIO_FD,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            );
        }
        if let Some(cwd) = &self.image.cwd {
            // SAFETY: a NUL-terminated string prepared before the clone.
            if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
                return (ChildStep::Cwd, last_errno());
            }
        }
        if let Err(errno) = self.setup.switch_ids() {
            return (ChildStep::Ids, errno);
        }
        let image = self.image;
        // SAFETY: the path is NUL-terminated and argv/envp are null-terminated arrays of
        // NUL-terminated strings, all prepared before the clone and alive in this copy.
        unsafe {
            libc::execve(
                image.program.as_ptr(),
                image.argv.as_ptr(),
                image.envp.as_ptr(),
            );
        }
        let errno = last_errno();
        if errno != libc::ENOEXEC {
            return (ChildStep::Exec, errno);
        }
        // SAFETY: as above; the shell's argv was prepared alongside.
        unsafe {
            libc::execve(
                image.shell.as_ptr(),
                image.script_argv.as_ptr(),
                image.envp.as_ptr(),
            );
        }
        (ChildStep::Exec, last_errno())
    }
}

/// errno of the last failed call, without allocating.
fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Blocks every signal in the calling thread until dropped, then restores its mask.
struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    fn new() -> io::Result<SignalsBlocked> {
        // SAFETY: sigset_t is plain data; all-zero is a valid input to sigfillset and to
        // pthread_sigmask's output, which overwrite it.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: the pointer is to a live, writable sigset_t.
        unsafe {
            libc::sigfillset(&raw mut all);
        }
        // glibc leaves out the two signals it uses internally, which is what it needs.
        // SAFETY: both pointers are to live sigset_t values.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &raw const all, &raw mut old) };
        if rc == 0 {
            Ok(SignalsBlocked { old })
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: `old` is the mask pthread_sigmask returned; the old-mask pointer is null.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &raw const self.old, std::ptr::null_mut());
        }
    }
}

/// What the child does between fork and exec besides stdio, prepared in the parent: shared by
/// both spawn paths.
#[derive(Debug)]
struct ChildSetup {
    empty_mask: libc::sigset_t,
    max_signal: libc::c_int,
    cgroup_procs: Option<OwnedFd>,
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
}

impl ChildSetup {
    fn new(cgroup_procs: Option<OwnedFd>, identity: Option<&Identity>) -> ChildSetup {
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
            ids: identity.map(|i| (i.uid, i.gid, i.groups.clone())),
        }
    }

    /// The fork path's pre_exec: signals, the move into the cgroup, the ids. Runs in the
    /// child after fork: only async-signal-safe calls, no allocation. Err is an errno.
    fn apply(&self) -> Result<(), i32> {
        self.reset_signals()?;
        if let Some(fd) = &self.cgroup_procs {
            // "0" moves the writing process, i.e. this child, before it runs any service code.
            rustix::io::write(fd, b"0").map_err(|e| e.raw_os_error())?;
        }
        self.switch_ids()
    }

    /// Every disposition back to SIG_DFL, then an empty mask. Handlers would reset on exec
    /// anyway, but ignored signals would stay ignored, and a handler of watchd must not run in
    /// the child (the clone3 path starts with all signals blocked for that reason). The mask
    /// matters because one blocked by a signal-handling thread of watchd (tokio) is inherited
    /// over exec. Err is an errno.
    fn reset_signals(&self) -> Result<(), i32> {
        // The raw syscall, because glibc's sigaction refuses the two signals it reserves (32,
        // 33), which can be ignored or handled all the same.
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
            if queried && old[0] != libc::SIG_DFL {
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
                    return Err(last_errno());
                }
            }
        }
        // SAFETY: both pointers are valid for the call (the old-mask pointer is null).
        if unsafe {
            libc::sigprocmask(
                libc::SIG_SETMASK,
                &raw const self.empty_mask,
                std::ptr::null_mut(),
            )
        } != 0
        {
            return Err(last_errno());
        }
        Ok(())
    }

    /// setgroups, setgid, setuid, when a user is configured. Err is an errno.
    fn switch_ids(&self) -> Result<(), i32> {
        let Some((uid, gid, groups)) = &self.ids else {
            return Ok(());
        };
        // Raw syscalls: in the child only this thread exists, and glibc's wrappers would try
        // to synchronise the ids of threads that were not forked.
        // SAFETY: `groups` is a live Vec; the kernel reads `len` gid_t from its pointer.
        if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } != 0 {
            return Err(last_errno());
        }
        // SAFETY: plain integer argument.
        if unsafe { libc::syscall(libc::SYS_setgid, *gid) } != 0 {
            return Err(last_errno());
        }
        // SAFETY: plain integer argument; setuid last, while we may still change groups.
        if unsafe { libc::syscall(libc::SYS_setuid, *uid) } != 0 {
            return Err(last_errno());
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

/// Error path of the clone3 spawn: kills the child (and its process group while the child is
/// unreaped, so the group id cannot have been reused) and reaps it.
fn kill_and_reap(pidfd: &OwnedFd, pid: Option<u32>) {
    if let Some(p) = pid.and_then(raw_pid) {
        let _ = rustix::process::kill_process_group(p, Signal::KILL);
    }
    let _ = rustix::process::pidfd_send_signal(pidfd, Signal::KILL);
    reap_blocking(pidfd);
}

/// Waits for our child of `pidfd` to end and collects its status, so it leaves no zombie.
fn reap_blocking(pidfd: &OwnedFd) {
    loop {
        match rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED) {
            Err(Errno::INTR) => {}
            _ => return,
        }
    }
}

/// Error path of the fork spawn: our unreaped child still holds its pid (and group id), so
/// signalling them cannot hit another process.
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
        let cgroup = root("nozombie");
        for method in [Method::Clone3, Method::Command] {
            // Exec-time failures go through fork; run them on a thread with a known name so a
            // leftover unreaped child (which keeps that name) can be found.
            const THREAD: &str = "ftk-nozombie";
            let d = dir.path().to_owned();
            let (missing, not_exec) = (missing.clone(), not_exec.clone());
            let cg = cgroup
                .as_ref()
                .map(|g| g.0.service("svc").expect("service cgroup"));
            let in_cgroup = cg.clone();
            let errors = std::thread::Builder::new()
                .name(THREAD.into())
                .spawn(move || {
                    let mut s = spec(&d, missing.to_str().expect("utf-8 path"), &[]);
                    s.cgroup = in_cgroup.clone();
                    let a = spawn_with(&s, method).expect_err("ENOENT");
                    let mut s = spec(&d, not_exec.to_str().expect("utf-8 path"), &[]);
                    s.cgroup = in_cgroup;
                    let b = spawn_with(&s, method).expect_err("EACCES");
                    (a, b, missing, not_exec)
                })
                .expect("thread")
                .join()
                .expect("no panic");
            let (a, b, missing, not_exec) = errors;
            match &a {
                ProcessError::Spawn { source, .. } => {
                    assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{method:?}")
                }
                other => panic!("{method:?}: expected a spawn error, got {other:?}"),
            }
            assert!(a.to_string().contains(&*missing.to_string_lossy()), "{a}");
            assert!(
                matches!(&b, ProcessError::Spawn { source, .. } if source.raw_os_error() == Some(libc::EACCES)),
                "{method:?}: {b:?}"
            );
            assert!(b.to_string().contains(&*not_exec.to_string_lossy()), "{b}");
            assert_eq!(
                our_children_named(THREAD),
                Vec::<u32>::new(),
                "{method:?}: a failed spawn left a zombie"
            );
            if let Some(cg) = cg {
                assert!(
                    cg.is_empty(),
                    "{method:?}: a failed child is left in the cgroup"
                );
            }
        }
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
        // SIGKILL is delivered asynchronously: the member may take a moment to die.
        let pgid = p.pid.to_string();
        let leftovers = || -> Vec<u32> {
            fs::read_dir("/proc")
                .expect("proc")
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|q| stat_fields(*q).is_ok_and(|f| f.get(2) == Some(&pgid) && f[0] != "Z"))
                .collect()
        };
        wait_until("the group's members gone", || leftovers().is_empty()).await;
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
        for method in [Method::Clone3, Method::Command] {
            s.log_path = dir.path().join(format!("{method:?}.log"));
            let p = spawn_with(&s, method).expect("spawn through the spec's PATH");
            assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(0));
            let want = format!(
                "tool second b\n{}\n",
                fs::canonicalize(&work).expect("canonical").display()
            );
            assert_eq!(log_text(&s), want, "{method:?}");
        }
    }

    #[tokio::test]
    async fn blocked_and_ignored_signals_do_not_leak_into_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        for method in [Method::Clone3, Method::Command] {
            let s = spec(dir.path(), "sleep", &["100"]);
            const THREAD_NAME: &str = "ftk-sigmask";
            let spawned = std::thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(move || {
                    // This thread blocks SIGUSR1 (as a signal-handling thread would) and
                    // ignores SIGWINCH (process-wide; harmless to the test harness), then spawns.
                    let mut set = nix::sys::signal::SigSet::empty();
                    set.add(nix::sys::signal::Signal::SIGUSR1);
                    set.thread_block().expect("block");
                    // SAFETY: SIG_IGN installs no handler code; nothing else in the test
                    // binary relies on SIGWINCH.
                    let old = unsafe {
                        nix::sys::signal::signal(
                            nix::sys::signal::Signal::SIGWINCH,
                            nix::sys::signal::SigHandler::SigIgn,
                        )
                    }
                    .expect("ignore");
                    let p = spawn_with(&s, method);
                    // SAFETY: restores the disposition read above.
                    let _ = unsafe {
                        nix::sys::signal::signal(nix::sys::signal::Signal::SIGWINCH, old)
                    };
                    p
                })
                .expect("thread")
                .join()
                .expect("no panic")
                .expect("spawn");
            let _guard = ProcGuard::new(&spawned);
            let status =
                fs::read_to_string(format!("/proc/{}/status", spawned.pid)).expect("status");
            let mask = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::trim)
                    .map(str::to_owned)
            };
            assert_eq!(
                mask("SigBlk:").as_deref(),
                Some("0000000000000000"),
                "{method:?}"
            );
            assert_eq!(
                mask("SigIgn:").as_deref(),
                Some("0000000000000000"),
                "{method:?}"
            );
            signal_tree(spawned.pid, None, TreeSignal::Kill).expect("kill");
            assert_eq!(
                exit_of(spawned.pidfd, spawned.pid).await,
                ExitStatus::Signal(libc::SIGKILL)
            );
        }
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
    /// The `0::` line of a `/proc/PID/cgroup` text.
    fn unified_line(text: &str) -> Option<&str> {
        text.lines().find_map(|l| l.strip_prefix("0::"))
    }

    #[tokio::test]
    async fn clone3_starts_the_child_inside_its_cgroup() {
        let Some(guard) = root("into") else { return };
        let cg = guard.0.service("svc").expect("service cgroup");
        let instance = guard
            .0
            .path()
            .file_name()
            .expect("instance dir has a name")
            .to_string_lossy()
            .into_owned();
        let dir = tempfile::tempdir().expect("tempdir");
        for method in [Method::Clone3, Method::Command] {
            // cat's first act is to read its own cgroup membership.
            let mut s = spec(dir.path(), "/bin/cat", &["/proc/self/cgroup"]);
            s.log_path = dir.path().join(format!("{method:?}.log"));
            s.cgroup = Some(cg.clone());
            let p = spawn_with(&s, method).expect("spawn");
            assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(0));
            let text = log_text(&s);
            let line = unified_line(&text).expect("a cgroup v2 line");
            assert!(
                line.ends_with(&format!("/{instance}/svc")),
                "{method:?}: child was in {line:?}"
            );
        }
        // watchd itself stays where it was: it never joined the service's cgroup.
        let own = fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
        assert!(
            !unified_line(&own)
                .expect("a cgroup v2 line")
                .contains(&instance),
            "{own}"
        );
        wait_until("cgroup empty", || cg.is_empty()).await;
    }

    #[tokio::test]
    async fn the_pidfd_names_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cgroup = root("pidfd");
        for method in [Method::Clone3, Method::Command] {
            let mut s = spec(dir.path(), "sleep", &["100"]);
            s.cgroup = cgroup
                .as_ref()
                .map(|g| g.0.service("svc").expect("service cgroup"));
            let p = spawn_with(&s, method).expect("spawn");
            let _guard = ProcGuard::new(&p);
            let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", p.pidfd.as_raw_fd()))
                .expect("fdinfo");
            let pid_line = info.lines().find_map(|l| l.strip_prefix("Pid:"));
            assert_eq!(
                pid_line.map(str::trim),
                Some(p.pid.to_string().as_str()),
                "{method:?}"
            );
            // argv[0] is the command as configured, not the resolved path.
            let cmdline = fs::read(format!("/proc/{}/cmdline", p.pid)).expect("cmdline");
            assert_eq!(cmdline, b"sleep\x00100\x00", "{method:?}");
            assert_eq!(stat_fields(p.pid).expect("stat")[2], p.pid.to_string());
            if let Some(cg) = &s.cgroup {
                assert_eq!(cg.procs().expect("procs"), vec![p.pid], "{method:?}");
            }
            rustix::process::pidfd_send_signal(&p.pidfd, Signal::KILL).expect("kill by pidfd");
            assert_eq!(
                exit_of(p.pidfd, p.pid).await,
                ExitStatus::Signal(libc::SIGKILL),
                "{method:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_script_without_interpreter_line_runs_with_sh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("plain-script");
        fs::write(&script, "echo \"plain $1\"\n").expect("write");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
        for method in [Method::Clone3, Method::Command] {
            let mut s = spec(dir.path(), script.to_str().expect("utf-8 path"), &["arg"]);
            s.log_path = dir.path().join(format!("{method:?}.log"));
            let p = spawn_with(&s, method).expect("ENOEXEC falls back to sh, as execvp does");
            assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(0));
            assert_eq!(log_text(&s), "plain arg\n", "{method:?}");
        }
    }

    #[tokio::test]
    async fn both_paths_give_the_same_environment() {
        let user = match User::from_name("nobody") {
            Ok(Some(_)) => Some("nobody".to_owned()),
            _ => None,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut logs = Vec::new();
        for method in [Method::Clone3, Method::Command] {
            let mut s = spec(dir.path(), "env", &[]);
            s.log_path = dir.path().join(format!("{method:?}.log"));
            s.user.clone_from(&user);
            s.env = vec![
                ("FTKIT_A".into(), "1".into()),
                ("FTKIT_A".into(), "2".into()),
                ("HOME".into(), "/spec-home".into()),
            ];
            let p = spawn_with(&s, method).expect("spawn");
            assert_eq!(exit_of(p.pidfd, p.pid).await, ExitStatus::Code(0));
            let mut lines: Vec<String> = log_text(&s).lines().map(str::to_owned).collect();
            lines.sort();
            assert!(
                lines.contains(&"FTKIT_A=2".to_owned()),
                "{method:?}: {lines:?}"
            );
            assert!(lines.contains(&"HOME=/spec-home".to_owned()), "{method:?}");
            if user.is_some() {
                assert!(lines.contains(&"USER=nobody".to_owned()), "{method:?}");
                assert!(lines.contains(&"LOGNAME=nobody".to_owned()), "{method:?}");
            }
            logs.push(lines);
        }
        assert_eq!(logs[0], logs[1], "clone3 and fork paths differ");
    }

    #[test]
    fn child_reports_are_decoded() {
        let e = child_failure(ChildStep::Exec.code(), libc::ENOENT);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let e = child_failure(ChildStep::Cwd.code(), libc::EACCES);
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("chdir"), "{e}");
        let e = child_failure(99, libc::EIO);
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        for step in ChildStep::ALL {
            assert_eq!(ChildStep::from_code(step.code()), Some(step));
        }

        let report = |bytes: &[u8]| {
            let (r, mut w) = io::pipe().expect("pipe");
            io::Write::write_all(&mut w, bytes).expect("write");
            drop(w);
            read_report(r)
        };
        assert_eq!(report(&[]).expect("eof"), ChildReport::NeverRan);
        assert_eq!(report(&[REPORT_STARTED]).expect("eof"), ChildReport::Execed);
        let mut failed = vec![REPORT_STARTED];
        failed.extend_from_slice(&ChildStep::Ids.code().to_ne_bytes());
        failed.extend_from_slice(&libc::EPERM.to_ne_bytes());
        assert_eq!(
            report(&failed).expect("report"),
            ChildReport::Failed {
                step: ChildStep::Ids.code(),
                errno: libc::EPERM
            }
        );
        assert!(report(b"abc").is_err(), "a garbled report is an error");
        assert!(report(&failed[1..]).is_err(), "no start byte: garbled");
    }

    /// Not a timed assertion: prints how long spawn() takes into a cgroup, spaced like restarts
    /// (the kernel's cost of a migration depends on the time since the previous one). Run with
    /// `cargo test -p watchd --lib -- --ignored --nocapture spawn_timing`.
    #[test]
    #[ignore = "prints timings; run by hand"]
    fn spawn_timing() {
        const RUNS: usize = 20;
        const SPACING: Duration = Duration::from_millis(150);
        let Some(guard) = root("timing") else { return };
        let cg = guard.0.service("svc").expect("service cgroup");
        let dir = tempfile::tempdir().expect("tempdir");
        println!("spawn() of /bin/true, {RUNS} runs {SPACING:?} apart, cgroup.kill after each");
        println!(
            "{:<10} {:<10} {:>10} {:>10}",
            "path", "cgroup", "p50", "max"
        );
        let cases = [
            (Method::Clone3, true),
            (Method::Command, true),
            (Method::Clone3, false),
            (Method::Command, false),
        ];
        for (method, in_cgroup) in cases {
            let mut times = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                std::thread::sleep(SPACING);
                let mut s = spec(dir.path(), "/bin/true", &[]);
                s.cgroup = in_cgroup.then(|| cg.clone());
                let start = std::time::Instant::now();
                let p = spawn_with(&s, method).expect("spawn");
                times.push(start.elapsed());
                reap_blocking(&p.pidfd);
                if in_cgroup {
                    // As wait_exit_killing_tree does after every exit of a main process.
                    cg.kill().expect("cgroup.kill");
                }
            }
            times.sort();
            println!(
                "{:<10} {:<10} {:>10.2?} {:>10.2?}",
                format!("{method:?}"),
                if in_cgroup { "yes" } else { "no" },
                times[RUNS / 2],
                times[RUNS - 1]
            );
        }
    }

    #[tokio::test]
    async fn a_cgroup_killed_before_stays_usable() {
        let Some(guard) = root("killseq") else { return };
        let cg = guard.0.service("svc").expect("service cgroup");
        let dir = tempfile::tempdir().expect("tempdir");
        for method in [Method::Clone3, Method::Command] {
            // Each round ends with cgroup.kill, as a crash of a service with children does.
            for round in 0..3 {
                let mut s = spec(dir.path(), "sleep", &["100"]);
                s.cgroup = Some(cg.clone());
                let p = spawn_with(&s, method).expect("spawn");
                let _guard = ProcGuard::new(&p);
                tokio::time::sleep(POLL_PAUSE).await;
                assert!(
                    proc_state(p.pid).is_some_and(|state| state != 'Z'),
                    "{method:?} round {round}: the new process was killed"
                );
                assert_eq!(cg.procs().expect("procs"), vec![p.pid], "{method:?}");
                signal_tree(p.pid, Some(&cg), TreeSignal::Kill).expect("cgroup.kill");
                assert_eq!(
                    exit_of(p.pidfd, p.pid).await,
                    ExitStatus::Signal(libc::SIGKILL)
                );
            }
        }
    }
}
