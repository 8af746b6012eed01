//! ptrace of the threads being checkpointed or restored: seizing and stopping every thread,
//! register sets, signal masks, and system calls injected into a stopped thread. Owns the
//! guards that put a thread back as it was (registers, signals that arrived meanwhile) and
//! detach it on every path; it must never leave a thread traced or with injected registers.
//! All calls on one tracee must come from the thread that seized it (ptrace's rule).

use std::collections::BTreeSet;
use std::ffi::c_void;
use std::io::{IoSlice, IoSliceMut};
use std::time::{Duration, Instant};

use libc::user_regs_struct;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::ProcError;
use super::meta::Rseq;
use super::regs::{self, SYSCALL_INSN_LEN};

/// `NT_X86_XSTATE` register set.
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Room for the XSAVE area (about 2.7 KiB with AVX-512, 11 KiB with AMX).
const XSTATE_MAX: usize = 16 * 1024;
/// `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13).
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// Attempts to stop a thread that keeps reporting other stops first.
const STOP_ATTEMPTS: usize = 64;
/// Rounds of re-listing `/proc/PID/task` before giving up on a process that keeps spawning.
const TASK_LIST_ROUNDS: usize = 100;
/// `PR_GET_TID_ADDRESS` (`linux/prctl.h`; needs CONFIG_CHECKPOINT_RESTORE).
const PR_GET_TID_ADDRESS: u64 = 40;
/// Bytes below a thread's stack pointer that the x86_64 ABI lets user code use without moving
/// it (the red zone); scratch words for injected calls go below it.
const RED_ZONE: u64 = 128;
/// How long a killed thread may take to be reported gone before it is left to its fate.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between polls for a killed thread's exit.
const REAP_POLL: Duration = Duration::from_millis(1);

fn ptrace_err(op: &'static str, tid: Pid) -> impl FnOnce(Errno) -> ProcError {
    move |errno| {
        if errno == Errno::ESRCH {
            ProcError::Exited { pid: tid.as_raw() }
        } else {
            ProcError::Ptrace {
                op,
                tid: tid.as_raw(),
                errno,
            }
        }
    }
}

/// What a thread looked like when it stopped (`regs`), what to resume it with, and the
/// signals that arrived while it was held (sent again before it is let go).
#[derive(Debug)]
pub struct Tracee {
    pub tid: Pid,
    pub regs: user_regs_struct,
    /// Set once registers were changed: they are written back (restart rule applied by hand,
    /// since the kernel's own restart logic no longer runs) before the detach.
    resume: Option<user_regs_struct>,
    pending: Vec<i32>,
    /// When false, the guard kills the thread's process instead of detaching (a restore stub
    /// that never became the restored process).
    detach_on_drop: bool,
    attached: bool,
}

impl Tracee {
    /// Adopts a child that stopped itself under `PTRACE_TRACEME`; dropping it kills it.
    pub fn adopt_stub(tid: Pid) -> Result<Tracee, ProcError> {
        let regs = ptrace::getregs(tid).map_err(ptrace_err("PTRACE_GETREGS", tid))?;
        Ok(Tracee {
            tid,
            regs,
            resume: None,
            pending: Vec::new(),
            detach_on_drop: false,
            attached: true,
        })
    }

    /// Adopts a thread just created by an injected clone in a thread traced with
    /// `PTRACE_O_TRACECLONE`: waits for its first stop (`SIGSTOP` under `PTRACE_TRACEME`,
    /// `PTRACE_EVENT_STOP` under `PTRACE_SEIZE`). Dropping it kills its process: it belongs
    /// to a process being rebuilt.
    pub fn adopt_clone(tid: Pid) -> Result<Tracee, ProcError> {
        let mut t = Tracee {
            tid,
            regs: zero_regs(),
            resume: None,
            pending: Vec::new(),
            detach_on_drop: false,
            attached: true,
        };
        match wait_stop(tid) {
            Ok(Stop::Signal(sig)) if sig != libc::SIGSTOP => t.pending.push(sig),
            Ok(_) => {}
            Err(e) => {
                // Exited and reaped, or not ours: nothing left to kill or wait for.
                t.attached = false;
                return Err(e);
            }
        }
        t.regs = t.getregs()?;
        Ok(t)
    }

    /// Seizes `tid` and stops it. `Ok(None)`: the thread is gone (it exited before).
    fn seize(tid: Pid) -> Result<Option<Tracee>, ProcError> {
        match ptrace::seize(tid, ptrace::Options::empty()) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(None),
            Err(Errno::EPERM) => {
                return Err(ProcError::PermissionDenied {
                    pid: tid.as_raw(),
                    reason: "ptrace refused (another tracer, or not allowed)".into(),
                });
            }
            Err(e) => return Err(ptrace_err("PTRACE_SEIZE", tid)(e)),
        }
        let mut t = Tracee {
            tid,
            regs: zero_regs(),
            resume: None,
            pending: Vec::new(),
            detach_on_drop: true,
            attached: true,
        };
        ptrace::interrupt(tid).map_err(ptrace_err("PTRACE_INTERRUPT", tid))?;
        // A signal may arrive first: it stays held (sent again on release), and the thread is
        // stopped in its delivery stop, which is all a dump needs.
        if let Stop::Signal(sig) = wait_stop(tid)? {
            t.pending.push(sig);
        }
        t.regs = ptrace::getregs(tid).map_err(ptrace_err("PTRACE_GETREGS", tid))?;
        Ok(Some(t))
    }

    /// Registers to put back before the detach (restart rule applied by the caller).
    pub fn set_resume(&mut self, regs: user_regs_struct) {
        self.resume = Some(regs);
    }

    pub fn getregs(&self) -> Result<user_regs_struct, ProcError> {
        ptrace::getregs(self.tid).map_err(ptrace_err("PTRACE_GETREGS", self.tid))
    }

    pub fn setregs(&self, regs: user_regs_struct) -> Result<(), ProcError> {
        ptrace::setregs(self.tid, regs).map_err(ptrace_err("PTRACE_SETREGS", self.tid))
    }

    pub fn xstate(&self) -> Result<Vec<u8>, ProcError> {
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast::<c_void>(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes into iov_base, which points
        // into `buf` (alive for the call), and shrinks iov_len to what it wrote.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                self.tid.as_raw(),
                NT_X86_XSTATE as usize as *mut c_void,
                &mut iov as *mut libc::iovec,
            )
        };
        Errno::result(r).map_err(ptrace_err("PTRACE_GETREGSET(NT_X86_XSTATE)", self.tid))?;
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    pub fn set_xstate(&self, xstate: &[u8]) -> Result<(), ProcError> {
        let mut buf = xstate.to_vec();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast::<c_void>(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_SETREGSET only reads iov_len bytes from iov_base, inside `buf`.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGSET,
                self.tid.as_raw(),
                NT_X86_XSTATE as usize as *mut c_void,
                &mut iov as *mut libc::iovec,
            )
        };
        Errno::result(r)
            .map(drop)
            .map_err(ptrace_err("PTRACE_SETREGSET(NT_X86_XSTATE)", self.tid))
    }

    pub fn sigmask(&self) -> Result<u64, ProcError> {
        let mut mask = 0u64;
        // SAFETY: PTRACE_GETSIGMASK writes `addr` (= 8) bytes to `data`, a live u64.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETSIGMASK,
                self.tid.as_raw(),
                size_of::<u64>(),
                &mut mask as *mut u64,
            )
        };
        Errno::result(r).map_err(ptrace_err("PTRACE_GETSIGMASK", self.tid))?;
        Ok(mask)
    }

    pub fn set_sigmask(&self, mask: u64) -> Result<(), ProcError> {
        // SAFETY: PTRACE_SETSIGMASK reads `addr` (= 8) bytes from `data`, a live u64.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SETSIGMASK,
                self.tid.as_raw(),
                size_of::<u64>(),
                &mask as *const u64,
            )
        };
        Errno::result(r)
            .map(drop)
            .map_err(ptrace_err("PTRACE_SETSIGMASK", self.tid))
    }

    pub fn rseq(&self) -> Result<Option<Rseq>, ProcError> {
        // struct ptrace_rseq_configuration: u64 pointer, u32 size, u32 signature, u32 flags,
        // u32 pad.
        let mut conf = [0u8; 24];
        // SAFETY: the request writes at most `addr` (= 24) bytes to `data`, a live buffer.
        let r = unsafe {
            libc::ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.tid.as_raw(),
                conf.len(),
                conf.as_mut_ptr(),
            )
        };
        Errno::result(r).map_err(ptrace_err("PTRACE_GET_RSEQ_CONFIGURATION", self.tid))?;
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&conf[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let half = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&conf[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let addr = word(0);
        Ok((addr != 0).then(|| Rseq {
            addr,
            len: half(8),
            signature: half(12),
        }))
    }

    pub fn robust_list(&self) -> Result<(u64, u64), ProcError> {
        let mut head: u64 = 0;
        let mut len: usize = 0;
        // SAFETY: get_robust_list writes one pointer to `head` and one size_t to `len`, both
        // live locals of exactly those sizes.
        let r = unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                self.tid.as_raw(),
                &mut head as *mut u64,
                &mut len as *mut usize,
            )
        };
        Errno::result(r).map_err(ptrace_err("get_robust_list", self.tid))?;
        Ok((head, len as u64))
    }

    /// Reads `buf.len()` bytes at `addr` of the tracee.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), ProcError> {
        read_mem(self.tid, addr, buf)
    }

    /// Writes `data` at `addr` of the tracee (the pages must be writable there).
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), ProcError> {
        write_mem(self.tid, addr, data)
    }

    /// Makes threads this one creates (clone) start traced and stopped (`PTRACE_O_TRACECLONE`);
    /// the option ends with the detach.
    pub fn trace_clones(&self) -> Result<(), ProcError> {
        ptrace::setoptions(self.tid, ptrace::Options::PTRACE_O_TRACECLONE)
            .map_err(ptrace_err("PTRACE_SETOPTIONS", self.tid))
    }

    /// Keeps `sigs` to be sent again when this thread is let go (signals taken from a thread
    /// that went away).
    pub fn hold(&mut self, sigs: Vec<i32>) {
        self.pending.extend(sigs);
    }

    /// The thread's `clear_child_tid`, asked of the kernel by the thread itself (injected
    /// `prctl(PR_GET_TID_ADDRESS)` at `syscall_ip`), through a word below its stack's red zone
    /// that is put back afterwards. None when that word is not accessible or the kernel
    /// refuses. Sets the resume registers (restart kept) if none were set.
    pub fn tid_address(&mut self, syscall_ip: u64) -> Result<Option<u64>, ProcError> {
        if self.resume.is_none() {
            self.resume = Some(regs::resumable(&self.regs, true));
        }
        let at = self.regs.rsp.wrapping_sub(RED_ZONE + 8) & !7;
        let mut saved = [0u8; 8];
        if self.read_mem(at, &mut saved).is_err() {
            return Ok(None);
        }
        let r = self.inject(syscall_ip, libc::SYS_prctl, &[PR_GET_TID_ADDRESS, at])?;
        if r < 0 {
            // Nothing was written.
            return Ok(None);
        }
        let mut out = [0u8; 8];
        let read = self.read_mem(at, &mut out);
        self.write_mem(at, &saved)?;
        read?;
        Ok(Some(u64::from_le_bytes(out)))
    }

    /// Ends the thread (an injected `exit(0)` at `syscall_ip`, which ends only this thread)
    /// and reaps it. Returns the signals held for it, to be sent to another thread instead.
    /// The thread is gone whatever this returns (killed and reaped on a failure).
    pub fn exit_thread(mut self, syscall_ip: u64) -> Result<Vec<i32>, ProcError> {
        let tid = self.tid;
        let mut r = self.regs;
        r.rax = libc::SYS_exit.cast_unsigned();
        r.rdi = 0;
        r.rip = syscall_ip;
        r.orig_rax = u64::MAX;
        self.attached = false;
        let pending = std::mem::take(&mut self.pending);
        let started = ptrace::setregs(tid, r)
            .and_then(|()| ptrace::cont(tid, None))
            .map_err(ptrace_err("PTRACE_CONT (exit)", tid));
        if let Err(e) = started {
            reap_killed(tid);
            return Err(e);
        }
        loop {
            match waitpid(tid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok(pending),
                Err(Errno::ECHILD | Errno::ESRCH) => return Ok(pending),
                Err(Errno::EINTR) => {}
                // A signal (dropped: the thread is going) or an event stop before the exit.
                Ok(_) => {
                    if let Err(e) = ptrace::cont(tid, None) {
                        reap_killed(tid);
                        return Err(ptrace_err("PTRACE_CONT (exit)", tid)(e));
                    }
                }
                Err(errno) => {
                    reap_killed(tid);
                    return Err(ProcError::Ptrace {
                        op: "waitpid",
                        tid: tid.as_raw(),
                        errno,
                    });
                }
            }
        }
    }

    /// Kills the thread's process and reaps this thread (its exit report to this tracer), so
    /// that nothing of it stays stopped or unreaped. For a process that must not run on.
    pub fn kill_and_reap(mut self) {
        if !self.attached {
            return;
        }
        self.attached = false;
        let _ = nix::sys::signal::kill(self.tid, Signal::SIGKILL);
        reap_killed(self.tid);
    }

    /// Lets the thread go: writes back the resume registers, sends again the signals held
    /// while it was stopped, detaches.
    pub fn release(mut self) -> Result<(), ProcError> {
        self.let_go()
    }

    fn let_go(&mut self) -> Result<(), ProcError> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        let tid = self.tid;
        if let Some(regs) = self.resume.take() {
            self.setregs(regs)?;
        }
        for sig in std::mem::take(&mut self.pending) {
            // SAFETY: tgkill takes plain integers; a vanished thread is reported as ESRCH.
            unsafe {
                libc::syscall(libc::SYS_tgkill, tgid_of(tid), tid.as_raw(), sig);
            }
        }
        ptrace::detach(tid, None).map_err(ptrace_err("PTRACE_DETACH", tid))
    }

    /// The stub becomes an ordinary process: from now on, dropping detaches it.
    pub fn keep(&mut self) {
        self.detach_on_drop = true;
    }

    /// Runs one system call in the stopped thread: `nr(args)` executed at `syscall_ip` (the
    /// address of a `syscall` instruction in the tracee) by a single step. Returns the raw
    /// result (`-errno` on failure). The thread's registers stay changed: the caller restores
    /// them (see `set_resume`).
    pub fn inject(&mut self, syscall_ip: u64, nr: i64, args: &[u64]) -> Result<i64, ProcError> {
        let mut r = self.regs;
        r.rax = nr.cast_unsigned();
        let mut a = [0u64; 6];
        for (slot, v) in a.iter_mut().zip(args) {
            *slot = *v;
        }
        (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9) = (a[0], a[1], a[2], a[3], a[4], a[5]);
        r.rip = syscall_ip;
        // -1: the kernel must not apply its restart logic to the injected call.
        r.orig_rax = u64::MAX;
        self.setregs(r)?;
        for _ in 0..STOP_ATTEMPTS {
            ptrace::step(self.tid, None).map_err(ptrace_err("PTRACE_SINGLESTEP", self.tid))?;
            match wait_stop(self.tid)? {
                Stop::Trap => {
                    let after = self.getregs()?;
                    if after.rip == syscall_ip + SYSCALL_INSN_LEN {
                        return Ok(after.rax.cast_signed());
                    }
                    // A SIGTRAP of the program's own, before the step: keep it for later.
                    self.pending.push(libc::SIGTRAP);
                    self.setregs(r)?;
                }
                // A pending interrupt or group stop reported first: step again.
                Stop::Event => {}
                Stop::Signal(sig) => self.pending.push(sig),
            }
        }
        Err(ProcError::Ptrace {
            op: "single-step an injected system call",
            tid: self.tid.as_raw(),
            errno: Errno::EAGAIN,
        })
    }

    /// `inject`, with a negative result turned into an error naming `what`.
    pub fn inject_ok(
        &mut self,
        syscall_ip: u64,
        what: &'static str,
        nr: i64,
        args: &[u64],
    ) -> Result<u64, ProcError> {
        let r = self.inject(syscall_ip, nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(ProcError::Injected {
                syscall: what,
                tid: self.tid.as_raw(),
                errno: Errno::from_raw(i32::try_from(-r).unwrap_or(libc::EINVAL)),
            });
        }
        Ok(r.cast_unsigned())
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if !self.attached {
            return;
        }
        if self.detach_on_drop {
            let _ = self.let_go();
        } else {
            self.attached = false;
            let _ = nix::sys::signal::kill(self.tid, Signal::SIGKILL);
            reap_killed(self.tid);
        }
    }
}

/// Waits for killed thread `tid` to be reported gone (reaping it), for at most
/// `REAP_TIMEOUT`: a thread group leader is reported only after its other threads, which a
/// caller reaps first; the bound keeps a missed one from hanging the caller.
pub fn reap_killed(tid: Pid) {
    let until = Instant::now() + REAP_TIMEOUT;
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return,
            Err(Errno::EINTR) => {}
            Err(_) => return,
            Ok(_) => {
                if Instant::now() >= until {
                    return;
                }
                std::thread::sleep(REAP_POLL);
            }
        }
    }
}

fn zero_regs() -> user_regs_struct {
    regs::from_words(&[])
}

/// Thread group of `tid` (the pid), from `/proc/TID/status`; `tid` itself when unreadable.
fn tgid_of(tid: Pid) -> i32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid.as_raw())
}

enum Stop {
    /// A ptrace event stop (`PTRACE_EVENT_STOP`: interrupt or group stop).
    Event,
    /// A SIGTRAP stop (single step done).
    Trap,
    /// A signal-delivery stop of another signal.
    Signal(i32),
}

fn wait_stop(tid: Pid) -> Result<Stop, ProcError> {
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_STOP => {
                return Ok(Stop::Event);
            }
            Ok(WaitStatus::PtraceEvent(..)) => return Ok(Stop::Event),
            Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => return Ok(Stop::Trap),
            Ok(WaitStatus::Stopped(_, sig)) => return Ok(Stop::Signal(sig as i32)),
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                return Err(ProcError::Exited { pid: tid.as_raw() });
            }
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD | Errno::ESRCH) => {
                return Err(ProcError::Exited { pid: tid.as_raw() });
            }
            Err(errno) => {
                return Err(ProcError::Ptrace {
                    op: "waitpid",
                    tid: tid.as_raw(),
                    errno,
                });
            }
        }
    }
}

/// Seizes and stops every thread of `pid`, re-listing `/proc/PID/task` until no new thread
/// appears. The thread whose tid is `pid` comes first.
pub fn seize_all(pid: Pid) -> Result<Vec<Tracee>, ProcError> {
    let mut seized: Vec<Tracee> = Vec::new();
    let mut gone: BTreeSet<i32> = BTreeSet::new();
    for _ in 0..TASK_LIST_ROUNDS {
        let tids = super::procfs::tasks(pid)?;
        let new: Vec<i32> = tids
            .into_iter()
            .filter(|t| !gone.contains(t) && !seized.iter().any(|s| s.tid.as_raw() == *t))
            .collect();
        if new.is_empty() {
            if !seized.iter().any(|t| t.tid == pid) {
                return Err(ProcError::Exited { pid: pid.as_raw() });
            }
            seized.sort_by_key(|t| (t.tid != pid, t.tid.as_raw()));
            return Ok(seized);
        }
        for tid in new {
            match Tracee::seize(Pid::from_raw(tid))? {
                Some(t) => seized.push(t),
                None if tid == pid.as_raw() => return Err(ProcError::Exited { pid: tid }),
                None => {
                    gone.insert(tid);
                }
            }
        }
    }
    Err(ProcError::Unsupported {
        reason: format!(
            "process {pid} kept creating threads through {TASK_LIST_ROUNDS} rounds of seizing"
        ),
    })
}

/// Largest number of iovecs one process_vm_readv/writev call takes (IOV_MAX).
const IOV_MAX: usize = 1024;

pub fn read_mem(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<(), ProcError> {
    let len = buf.len();
    let n = process_vm_readv(
        pid,
        &mut [IoSliceMut::new(buf)],
        &[RemoteIoVec {
            base: usize::try_from(addr).unwrap_or(usize::MAX),
            len,
        }],
    )
    .map_err(|errno| mem_err("read", pid, addr, len, errno))?;
    if n != len {
        return Err(mem_err(
            "read",
            pid,
            addr + n as u64,
            len - n,
            Errno::EFAULT,
        ));
    }
    Ok(())
}

pub fn write_mem(pid: Pid, addr: u64, data: &[u8]) -> Result<(), ProcError> {
    let n = process_vm_writev(
        pid,
        &[IoSlice::new(data)],
        &[RemoteIoVec {
            base: usize::try_from(addr).unwrap_or(usize::MAX),
            len: data.len(),
        }],
    )
    .map_err(|errno| mem_err("write", pid, addr, data.len(), errno))?;
    if n != data.len() {
        return Err(mem_err(
            "write",
            pid,
            addr + n as u64,
            data.len() - n,
            Errno::EFAULT,
        ));
    }
    Ok(())
}

/// Reads the remote ranges `(addr, len)` back to back into `buf` (which is exactly as long
/// as their sum), in calls of up to `IOV_MAX` ranges.
pub fn read_ranges(pid: Pid, ranges: &[(u64, usize)], buf: &mut [u8]) -> Result<(), ProcError> {
    let mut at = 0;
    for group in ranges.chunks(IOV_MAX) {
        let total: usize = group.iter().map(|r| r.1).sum();
        let remote: Vec<RemoteIoVec> = group
            .iter()
            .map(|&(a, l)| RemoteIoVec {
                base: usize::try_from(a).unwrap_or(usize::MAX),
                len: l,
            })
            .collect();
        let dst = &mut buf[at..at + total];
        let n = process_vm_readv(pid, &mut [IoSliceMut::new(dst)], &remote)
            .map_err(|errno| mem_err("read", pid, group[0].0, total, errno))?;
        if n != total {
            return Err(mem_err("read", pid, group[0].0, total - n, Errno::EFAULT));
        }
        at += total;
    }
    Ok(())
}

fn mem_err(op: &'static str, pid: Pid, addr: u64, len: usize, errno: Errno) -> ProcError {
    if errno == Errno::ESRCH {
        return ProcError::Exited { pid: pid.as_raw() };
    }
    ProcError::Memory {
        op,
        pid: pid.as_raw(),
        addr,
        len,
        errno,
    }
}
