//! x86_64 register state of a stopped thread: the general registers as plain words, the
//! system-call restart rule applied to them, and the extended (XSAVE) state. Owns the only
//! knowledge of `user_regs_struct`'s layout here; it must never hand out registers that resume
//! a thread with a kernel-internal `-ERESTART*` value in `rax`.

use libc::user_regs_struct;

/// Words of `struct user_regs_struct` on x86_64.
pub const USER_REGS_WORDS: usize = 27;

/// Kernel-internal "restart this system call" results (`include/linux/errno.h`).
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;
/// Length of the `syscall` instruction (0f 05).
pub const SYSCALL_INSN_LEN: u64 = 2;
/// `__NR_restart_syscall` on x86_64.
const NR_RESTART_SYSCALL: u64 = 219;

pub fn to_words(r: &user_regs_struct) -> Vec<u64> {
    vec![
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// The registers of `w` (which must hold `USER_REGS_WORDS` words; shorter input is padded
/// with zeros, which metadata validation rules out beforehand).
pub fn from_words(w: &[u64]) -> user_regs_struct {
    let g = |i: usize| w.get(i).copied().unwrap_or(0);
    user_regs_struct {
        r15: g(0),
        r14: g(1),
        r13: g(2),
        r12: g(3),
        rbp: g(4),
        rbx: g(5),
        r11: g(6),
        r10: g(7),
        r9: g(8),
        r8: g(9),
        rax: g(10),
        rcx: g(11),
        rdx: g(12),
        rsi: g(13),
        rdi: g(14),
        orig_rax: g(15),
        rip: g(16),
        cs: g(17),
        eflags: g(18),
        rsp: g(19),
        ss: g(20),
        fs_base: g(21),
        gs_base: g(22),
        ds: g(23),
        es: g(24),
        fs: g(25),
        gs: g(26),
    }
}

/// How a stopped thread resumes by itself: which system call it restarts, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Not inside a system call, or the call has completed.
    None,
    /// The call restarts from scratch with its original arguments.
    Again { nr: u64 },
    /// The call restarts through `restart_syscall` (relative timeouts kept in the kernel's
    /// per-thread restart block, which only the live thread has).
    Block { nr: u64 },
}

/// Classifies the registers of a thread stopped on its way back from a system call.
pub fn restart_of(r: &user_regs_struct) -> Restart {
    // orig_rax is -1 (as u64) outside system calls.
    let Ok(nr) = i64::try_from(r.orig_rax) else {
        return Restart::None;
    };
    let rax = r.rax.cast_signed();
    match -rax {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => Restart::Again {
            nr: nr.cast_unsigned(),
        },
        ERESTART_RESTARTBLOCK => Restart::Block {
            nr: nr.cast_unsigned(),
        },
        _ => Restart::None,
    }
}

/// The registers to resume with when the kernel's own restart logic will not run (after
/// injected system calls, or in another process): the restart done by hand, `orig_rax` = -1.
/// `keep_block` says whether the thread still has its restart block (the same live thread):
/// then `restart_syscall` resumes the remaining timeout, else the call starts again.
pub fn resumable(r: &user_regs_struct, keep_block: bool) -> user_regs_struct {
    let mut out = *r;
    match restart_of(r) {
        Restart::None => {}
        Restart::Again { nr } => {
            out.rip = r.rip.wrapping_sub(SYSCALL_INSN_LEN);
            out.rax = nr;
        }
        Restart::Block { nr } => {
            out.rip = r.rip.wrapping_sub(SYSCALL_INSN_LEN);
            out.rax = if keep_block { NR_RESTART_SYSCALL } else { nr };
        }
    }
    out.orig_rax = u64::MAX;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(orig: i64, rax: i64) -> user_regs_struct {
        let mut w = vec![0u64; USER_REGS_WORDS];
        w[15] = orig.cast_unsigned();
        w[10] = rax.cast_unsigned();
        w[16] = 0x1000;
        from_words(&w)
    }

    #[test]
    fn words_round_trip() {
        let w: Vec<u64> = (1..=27).collect();
        assert_eq!(to_words(&from_words(&w)), w);
    }

    #[test]
    fn restart_rules() {
        let r = resumable(&regs(35, -ERESTART_RESTARTBLOCK), false);
        assert_eq!((r.rip, r.rax, r.orig_rax), (0xffe, 35, u64::MAX));
        let r = resumable(&regs(35, -ERESTART_RESTARTBLOCK), true);
        assert_eq!(r.rax, NR_RESTART_SYSCALL);
        let r = resumable(&regs(0, -ERESTARTSYS), false);
        assert_eq!((r.rip, r.rax), (0xffe, 0));
        // A completed call (EINTR is a real result) and user code are left alone.
        let r = resumable(&regs(0, -4), false);
        assert_eq!((r.rip, r.rax.cast_signed()), (0x1000, -4));
        let r = resumable(&regs(-1, -ERESTARTSYS), false);
        assert_eq!(r.rip, 0x1000);
        assert_eq!(restart_of(&regs(-1, 0)), Restart::None);
    }
}
