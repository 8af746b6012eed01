//! Restore and rollback: a stopped process reduced to one thread (a fresh stub, or the live
//! process whose other threads were ended) is turned into the process of an image by system
//! calls injected into it — descriptors, address space, vDSO position, signal actions, mm
//! fields, rseq — then its memory is written, the image's other threads are cloned (each
//! given its own kernel-side state by calls injected into it) and all registers set. Owns the
//! image scan (verified whole before a byte is applied) and the stub. It must never apply an
//! unverified image, and never let a process that was half rebuilt run on: a failure past the
//! first change kills it.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::dump::{SCRATCH_LEN, SIGSET_LEN, find_syscall_insn, sigaction_bytes};
use super::meta::{
    FILE_REGION_BASE, FdKind, FdState, MAPPING_REGION_BASE, META_REGION_ID, MappingKind, NSIG,
    PROC_STREAM, PROT_R, PROT_W, PROT_X, ProcessMeta,
};
use super::procfs::{self, MapsLine};
use super::ptrace::{self, Tracee};
use super::regs;
use super::{ProcError, RestoreOptions, RestoredProcess, RollbackSummary};
use crate::image::{ImageHeader, ImageReader, read_chunk_at};
use crate::store::Store;

/// Largest metadata blob accepted (a process with ~100k mappings stays far below).
const MAX_META_LEN: u64 = 256 << 20;
/// Lowest address a mapping may be placed at (`vm.mmap_min_addr` default).
const MIN_ADDR: u64 = 0x10000;
/// End of the 47-bit user address space; the whole range below it is cleared on rebuild.
const USER_TOP: u64 = 0x7fff_ffff_f000;
/// Start of the kernel's half of the address space ([vsyscall] lies there).
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// Offset of data (paths, structs) in the scratch mapping; its first bytes hold a `syscall`
/// instruction.
const SCRATCH_DATA: u64 = 64;
/// The kernel's special mappings that move together (their relative layout is fixed).
const SPECIALS: [&str; 3] = ["[vvar]", "[vvar_vclock]", "[vdso]"];
/// `rseq` flag that unregisters.
const RSEQ_FLAG_UNREGISTER: u64 = 1;
/// prctl options (`linux/prctl.h`).
const PR_SET_NAME: u64 = 15;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_EXE_FILE: u64 = 13;
const PR_SET_MM_MAP: u64 = 14;
/// `sizeof(struct prctl_mm_map)`.
const PRCTL_MM_MAP_LEN: usize = 104;
/// Most auxv bytes `PR_SET_MM_MAP` takes (`sizeof(mm->saved_auxv)` on x86_64).
const MAX_AUXV: usize = 416;
/// Open flags dropped when a descriptor is reopened (the file exists; its contents stay).
const REOPEN_DROP: i32 = libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY;
/// Exit codes of a stub that failed before it stopped.
const STUB_FD_FAILED: i32 = 120;
const STUB_TRACEME_FAILED: i32 = 121;
const STUB_NOT_STOPPED: i32 = 122;
/// `SIGCHLD` as clone3's exit signal.
const EXIT_SIGNAL: u64 = libc::SIGCHLD as u64;

/// A verified image: its header, decoded metadata, and where each chunk lies in the file.
struct Scanned {
    seq: u64,
    path: PathBuf,
    file: File,
    header: ImageHeader,
    meta: ProcessMeta,
    /// (region index, offset, record position, chunk number) of every non-metadata chunk.
    chunks: Vec<(u32, u64, u64, u64)>,
}

fn image_err(path: &std::path::Path) -> impl FnOnce(crate::image::ImageError) -> ProcError + '_ {
    move |source| ProcError::Image {
        path: path.to_owned(),
        source,
    }
}

/// Reads and verifies all of image `seq` (header, every chunk, footer), decodes its metadata.
fn scan(store: &Store, seq: u64, path: PathBuf) -> Result<Scanned, ProcError> {
    let file = File::open(&path).map_err(|source| ProcError::File {
        op: "open",
        path: path.display().to_string(),
        source,
    })?;
    let mut reader = ImageReader::new(&file, store.app()).map_err(image_err(&path))?;
    let header = reader.header().clone();
    let unrestorable = |reason: String| ProcError::Unrestorable { seq, reason };
    if header.stream != PROC_STREAM {
        return Err(unrestorable("not a process checkpoint".into()));
    }
    let meta_len = match header.regions.first() {
        Some(r) if r.id == META_REGION_ID && r.len <= MAX_META_LEN => r.len,
        _ => return Err(unrestorable("no process metadata region".into())),
    };
    let mut meta_bytes = vec![0u8; usize::try_from(meta_len).unwrap_or(0)];
    let mut chunks = Vec::new();
    let mut n = 0u64;
    while let Some(c) = reader.next_chunk().map_err(image_err(&path))? {
        if c.region_index == 0 {
            // The reader checked the chunk lies inside the region.
            let at = usize::try_from(c.offset).unwrap_or(usize::MAX);
            if let Some(dst) = meta_bytes.get_mut(at..at.saturating_add(c.data.len())) {
                dst.copy_from_slice(c.data);
            }
        } else {
            chunks.push((c.region_index, c.offset, c.record_pos, n));
        }
        n += 1;
    }
    let meta = ProcessMeta::decode(&meta_bytes).map_err(|source| ProcError::Meta {
        path: path.clone(),
        source,
    })?;
    Ok(Scanned {
        seq,
        path,
        file,
        header,
        meta,
        chunks,
    })
}

/// Image `seq` (verified whole) and the images it is an increment against, down to its full
/// base, each verified whole: base first. A chain that does not verify is refused before a
/// byte of it is applied.
fn scan_chain(store: &Store, seq: u64, path: PathBuf) -> Result<Vec<Scanned>, ProcError> {
    let newest = scan(store, seq, path)?;
    let mut parent = newest.header.parent;
    let mut chain = vec![newest];
    while let Some(p) = parent {
        let path = image_path(store, p);
        if !path.exists() {
            return Err(ProcError::Unrestorable {
                seq,
                reason: format!("chain broken: image {p}, which it builds on, is gone"),
            });
        }
        let img = scan(store, p, path).map_err(|e| ProcError::Unrestorable {
            seq,
            reason: format!("chain broken: image {p}, which it builds on, is refused: {e}"),
        })?;
        if img.header.regions.len() != chain[0].header.regions.len() {
            return Err(ProcError::Unrestorable {
                seq,
                reason: format!("image {p} of its chain describes other regions"),
            });
        }
        parent = img.header.parent;
        chain.insert(0, img);
    }
    Ok(chain)
}

fn image_path(store: &Store, seq: u64) -> PathBuf {
    store.dir().join(format!("{seq:020}.ckpt"))
}

/// The chain of image `seq`, or of the newest image whose chain verifies.
fn select(store: &Store, seq: Option<u64>) -> Result<Vec<Scanned>, ProcError> {
    if let Some(s) = seq {
        let path = image_path(store, s);
        if !path.exists() {
            return Err(ProcError::Store(crate::store::StoreError::NotFound {
                seq: s,
                dir: store.dir().to_owned(),
            }));
        }
        return scan_chain(store, s, path);
    }
    let mut first_err = None;
    for info in store.list()?.into_iter().rev() {
        match scan_chain(store, info.seq, info.path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| ProcError::NoImage {
        dir: store.dir().to_owned(),
    }))
}

/// The newest image of a chain (`select` never returns an empty one).
fn newest(chain: &[Scanned]) -> &Scanned {
    chain
        .last()
        .expect("a chain holds at least its newest image")
}

pub fn restore(
    store: &Store,
    seq: Option<u64>,
    opts: RestoreOptions,
) -> Result<RestoredProcess, ProcError> {
    let started = Instant::now();
    let chain = select(store, seq)?;
    let img = newest(&chain);
    let meta = &img.meta;
    check_threads(img)?;
    for f in &meta.fds {
        if f.kind.reopen_path().is_none() && !opts.fds.iter().any(|(n, _)| *n == f.fd) {
            return Err(ProcError::Unrestorable {
                seq: img.seq,
                reason: format!(
                    "descriptor {} is a {} and no replacement was given",
                    f.fd,
                    f.kind.describe()
                ),
            });
        }
    }
    check_mapped_files(meta)?;
    if !opts.keep_file_contents {
        // A file whose descriptor the caller replaces is the caller's to keep as it is.
        let replaced: Vec<(u64, u64)> = meta
            .fds
            .iter()
            .filter(|f| opts.fds.iter().any(|(n, _)| *n == f.fd))
            .map(|f| (f.dev, f.ino))
            .collect();
        put_back_files(img, &replaced)?;
    }
    let kept: Vec<i32> = opts.fds.iter().map(|(n, _)| *n).collect();
    let (stub_pid, same_pid, pidfd) = spawn_stub(meta.pid, &opts.fds, opts.cgroup.as_ref())?;
    // The stub holds its copies; this process's are closed now.
    drop(opts);
    let mut stub = Tracee::adopt_stub(stub_pid)?;
    // Declared after the stub: on a failure its threads are killed and reaped first (the
    // stub's own exit is reported only once they are gone).
    let mut threads = Vec::new();
    let same_tids = rebuild(&mut stub, &chain, Mode::Restore, &kept, &mut threads)?;
    stub.keep();
    for t in &mut threads {
        t.keep();
    }
    if let Err(e) = release_all(stub, threads) {
        // A thread could not be let go as rebuilt: the process must not run on without it.
        let _ = nix::sys::signal::kill(stub_pid, Signal::SIGKILL);
        ptrace::reap_killed(stub_pid);
        return Err(e);
    }
    Ok(RestoredProcess {
        pid: stub_pid.as_raw(),
        pidfd,
        same_pid,
        same_tids: same_pid && same_tids,
        seq: img.seq,
        took: started.elapsed(),
    })
}

pub fn rollback(pid: i32, store: &Store, seq: Option<u64>) -> Result<RollbackSummary, ProcError> {
    if pid <= 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(ProcError::NoSuchProcess { pid });
    }
    let chain = select(store, seq)?;
    let img = newest(&chain);
    let meta = &img.meta;
    check_threads(img)?;
    check_mapped_files(meta)?;
    let p = Pid::from_raw(pid);
    let mut others = ptrace::seize_all(p)?;
    let paused = Instant::now();
    if others.is_empty() {
        return Err(ProcError::Exited { pid });
    }
    // seize_all puts the main thread first. Until the first change below, a failure drops
    // these guards, which let every thread go as it was.
    let mut main = others.remove(0);
    // Descriptors still open on the same file at the same number are kept (a pipe keeps its
    // peer); every other one must be reopenable, checked before anything changes.
    let current = procfs::fds(p)?;
    let mut kept = Vec::new();
    for f in &meta.fds {
        let same = current.iter().any(|c| {
            c.fd == f.fd
                && (c.dev, c.ino) == (f.dev, f.ino)
                && std::mem::discriminant(&c.kind) == std::mem::discriminant(&f.kind)
        });
        if same {
            kept.push(f.fd);
        } else if f.kind.reopen_path().is_none() {
            return Err(ProcError::Unrestorable {
                seq: img.seq,
                reason: format!(
                    "descriptor {} ({}) is no longer open, and it cannot be reopened",
                    f.fd,
                    f.kind.describe()
                ),
            });
        }
    }
    main.set_resume(regs::resumable(&main.regs, true));
    // The first change is ending the other threads (the image's are created anew, with their
    // old tids). From there on the process is neither what it was nor what the image holds
    // until the rebuild is done, so a failure kills it (and says so) rather than let it run
    // on half rebuilt; a process that cannot be put back is not worth a second failure mode.
    let mut created = Vec::new();
    let result = end_threads(&mut main, &mut others, p)
        .and_then(|()| put_back_files(img, &[]))
        .and_then(|()| rebuild(&mut main, &chain, Mode::Rollback, &kept, &mut created));
    let same_tids = match result {
        Ok(same) => same,
        Err(e) => {
            let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
            for t in created.into_iter().chain(others) {
                t.kill_and_reap();
            }
            main.kill_and_reap();
            return Err(ProcError::Unrestorable {
                seq: img.seq,
                reason: format!("rollback failed part way, so process {pid} was killed: {e}"),
            });
        }
    };
    if let Err(e) = release_all(main, created) {
        let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
        return Err(ProcError::Unrestorable {
            seq: img.seq,
            reason: format!(
                "rollback done but a thread could not be let go, so process {pid} was killed: {e}"
            ),
        });
    }
    Ok(RollbackSummary {
        pid,
        seq: img.seq,
        pause: paused.elapsed(),
        same_tids,
    })
}

/// Every thread of the image but the main one is created with the clear_child_tid it had,
/// which images before metadata version 3 do not hold.
fn check_threads(img: &Scanned) -> Result<(), ProcError> {
    match img
        .meta
        .threads
        .iter()
        .skip(1)
        .find(|t| t.clear_child_tid.is_none())
    {
        None => Ok(()),
        Some(t) => Err(ProcError::Unrestorable {
            seq: img.seq,
            reason: format!(
                "thread {} of {} has no recorded clear_child_tid (metadata version {}, or its \
                 stack was not readable at dump time); dump the process again",
                t.tid,
                img.meta.threads.len(),
                img.meta.version
            ),
        }),
    }
}

/// Ends every thread in `others` (an injected `exit`, each reaped), keeping the signals held
/// for them on `main`.
fn end_threads(main: &mut Tracee, others: &mut Vec<Tracee>, p: Pid) -> Result<(), ProcError> {
    if others.is_empty() {
        return Ok(());
    }
    let ip = find_syscall_insn(p, &procfs::maps(p)?)?;
    while let Some(t) = others.pop() {
        main.hold(t.exit_thread(ip)?);
    }
    Ok(())
}

/// Lets the rebuilt threads go, the main one last (the others' registers are all set by
/// then, so none of them runs before the process is whole). On an error the ones not yet let
/// go are dropped, which detaches them; the caller kills the process.
fn release_all(main: Tracee, others: Vec<Tracee>) -> Result<(), ProcError> {
    for t in others {
        t.release()?;
    }
    main.release()
}

/// Every file mapped by the image must still be the file it was.
fn check_mapped_files(meta: &ProcessMeta) -> Result<(), ProcError> {
    for m in &meta.mappings {
        if let MappingKind::File {
            path,
            dev,
            ino,
            size,
            mtime_ns,
        } = &m.kind
        {
            let st = std::fs::metadata(path).map_err(|e| ProcError::FileChanged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let mtime = i128::from(st.mtime()) * 1_000_000_000 + i128::from(st.mtime_nsec());
            if (st.dev(), st.ino(), st.len(), mtime) != (*dev, *ino, *size, *mtime_ns) {
                return Err(ProcError::FileChanged {
                    path: path.clone(),
                    reason: "another file, or modified (device, inode, size or mtime differ)"
                        .into(),
                });
            }
        }
    }
    Ok(())
}

/// Puts back the files the process had open for writing: their checkpointed contents (when
/// kept) and size. Written by path, from this process. Every image holds the whole contents
/// of its files, so the newest image of a chain is enough. Files in `skip` (device, inode)
/// are left alone.
fn put_back_files(img: &Scanned, skip: &[(u64, u64)]) -> Result<(), ProcError> {
    let mut buf = Vec::new();
    for (k, f) in img.meta.files.iter().enumerate() {
        if skip.contains(&(f.dev, f.ino)) {
            continue;
        }
        let file_err = |op: &'static str| {
            let path = f.path.clone();
            move |source| ProcError::File { op, path, source }
        };
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&f.path)
            .map_err(file_err("open"))?;
        if f.has_contents {
            let id = FILE_REGION_BASE + u32::try_from(k).unwrap_or(u32::MAX);
            for &(ri, offset, pos, n) in &img.chunks {
                if region_id(&img.header, ri) != Some(id) {
                    continue;
                }
                read_chunk_at(&img.file, pos, n, &mut buf).map_err(image_err(&img.path))?;
                out.write_all_at(&buf, offset).map_err(file_err("write"))?;
            }
        }
        out.set_len(f.size).map_err(file_err("truncate"))?;
    }
    Ok(())
}

fn region_id(h: &ImageHeader, index: u32) -> Option<u32> {
    h.regions.get(usize::try_from(index).ok()?).map(|r| r.id)
}

/// `struct clone_args` up to `set_tid_size` (`linux/sched.h`); libft's uapi has the same.
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

/// clone3 flags (`linux/sched.h`): a pidfd of the child is stored at `clone_args.pidfd`; the
/// child starts in the cgroup whose directory fd is `clone_args.cgroup`.
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks the stub: a child of this process (with the checkpointed pid when it is free) that
/// installs the given descriptors at their numbers, closes every other one, and stops under
/// `PTRACE_TRACEME`, created inside `cgroup` when given. Returns its pid stopped, whether it
/// got `want_pid`, and its pidfd.
fn spawn_stub(
    want_pid: i32,
    fds: &[(i32, OwnedFd)],
    cgroup: Option<&OwnedFd>,
) -> Result<(Pid, bool, OwnedFd), ProcError> {
    // Everything the child uses is prepared here: after the fork it may only make system
    // calls (this process may have other threads holding allocator locks).
    let hi = fds
        .iter()
        .flat_map(|(n, f)| [*n, f.as_raw_fd()])
        .max()
        .unwrap_or(0)
        + 1;
    let moves: Vec<(i32, i32)> = fds.iter().map(|(n, f)| (f.as_raw_fd(), *n)).collect();
    let mut targets: Vec<u32> = fds
        .iter()
        .filter_map(|(n, _)| u32::try_from(*n).ok())
        .collect();
    targets.sort_unstable();
    let mut gaps: Vec<(u32, u32)> = Vec::new();
    let mut next = 0u32;
    for &t in &targets {
        if t > next {
            gaps.push((next, t - 1));
        }
        next = t + 1;
    }
    gaps.push((next, u32::MAX));
    let mut staged = vec![0i32; moves.len()];

    let want = [want_pid];
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD,
        pidfd: (&raw mut pidfd).expose_provenance() as u64,
        exit_signal: EXIT_SIGNAL,
        set_tid: want.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    if let Some(dir) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = u64::from(dir.as_raw_fd().unsigned_abs());
    }
    let mut same_pid = true;
    // SAFETY: clone3 without CLONE_VM duplicates the process (like fork); `args` is a live,
    // correctly sized clone_args, set_tid points at one pid_t and `pidfd` (where the kernel
    // writes) outlives the call. The child branch below only makes system calls on memory
    // prepared before the call and never returns.
    let mut r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        // The pid is taken, or setting it needs a capability this process lacks.
        same_pid = false;
        args.set_tid = 0;
        args.set_tid_size = 0;
        // SAFETY: as above, without a pid request.
        r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                size_of::<CloneArgs>(),
            )
        };
    }
    if r < 0 {
        return Err(ProcError::Stub {
            reason: format!("clone3: {}", Errno::last()),
        });
    }
    if r == 0 {
        stub_child(&moves, &mut staged, hi, &gaps);
    }
    // SAFETY: clone3 succeeded with CLONE_PIDFD, so the kernel stored a new pidfd (O_CLOEXEC)
    // that nothing else owns.
    let pidfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
    let pid = Pid::from_raw(i32::try_from(r).map_err(|_| ProcError::Stub {
        reason: format!("clone3 returned {r}"),
    })?);
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => return Ok((pid, same_pid, pidfd)),
            Ok(WaitStatus::Exited(_, code)) => {
                return Err(ProcError::Stub {
                    reason: match code {
                        STUB_FD_FAILED => "installing descriptors failed".into(),
                        STUB_TRACEME_FAILED => "PTRACE_TRACEME failed".into(),
                        c => format!("it exited with status {c} before stopping"),
                    },
                });
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Err(ProcError::Stub {
                    reason: format!("killed by {sig} before stopping"),
                });
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(ProcError::Stub {
                    reason: format!("waitpid: {e}"),
                });
            }
        }
    }
}

/// The stub's side of `spawn_stub`: system calls only, on prepared memory; never returns.
fn stub_child(moves: &[(i32, i32)], staged: &mut [i32], hi: i32, gaps: &[(u32, u32)]) -> ! {
    // SAFETY: plain system calls with integer arguments on this process's own descriptors;
    // nothing allocates or takes a lock, and the function never returns.
    unsafe {
        // Two steps, so no source is overwritten by another's target before it is copied.
        for (slot, &(src, _)) in staged.iter_mut().zip(moves) {
            *slot = libc::fcntl(src, libc::F_DUPFD, hi);
            if *slot < 0 {
                libc::_exit(STUB_FD_FAILED);
            }
        }
        for (&tmp, &(_, target)) in staged.iter().zip(moves) {
            if libc::dup3(tmp, target, 0) < 0 {
                libc::_exit(STUB_FD_FAILED);
            }
        }
        for &(lo, hi) in gaps {
            libc::syscall(libc::SYS_close_range, lo, hi, 0);
        }
        if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 {
            libc::_exit(STUB_TRACEME_FAILED);
        }
        libc::syscall(
            libc::SYS_kill,
            libc::syscall(libc::SYS_getpid),
            libc::SIGSTOP,
        );
        // Only reached if the restorer vanished without finishing.
        libc::_exit(STUB_NOT_STOPPED);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Restore,
    Rollback,
}

/// The first free `len` bytes at or above `MIN_ADDR` outside every range of `taken`.
fn find_gap(taken: &mut [(u64, u64)], len: u64) -> Option<u64> {
    taken.sort_unstable();
    let mut at = MIN_ADDR;
    for &(s, e) in taken.iter() {
        if at + len <= s {
            return Some(at);
        }
        at = at.max(e);
    }
    (at + len <= USER_TOP).then_some(at)
}

/// Injected calls into one stopped thread.
struct Target<'a> {
    t: &'a mut Tracee,
    pid: Pid,
    /// The `syscall` instruction in use.
    ip: u64,
    scratch: u64,
}

impl Target<'_> {
    fn call(&mut self, what: &'static str, nr: i64, args: &[u64]) -> Result<u64, ProcError> {
        self.t.inject_ok(self.ip, what, nr, args)
    }

    /// Puts `bytes` in the scratch data area; returns their address.
    fn stage(&mut self, bytes: &[u8]) -> Result<u64, ProcError> {
        if bytes.len() as u64 > SCRATCH_LEN - SCRATCH_DATA {
            return Err(ProcError::Unsupported {
                reason: format!("{} bytes do not fit the scratch area", bytes.len()),
            });
        }
        let at = self.scratch + SCRATCH_DATA;
        self.t.write_mem(at, bytes)?;
        Ok(at)
    }

    fn stage_path(&mut self, path: &str) -> Result<u64, ProcError> {
        let c = CString::new(path).map_err(|_| ProcError::Unsupported {
            reason: format!("path {path:?} holds a NUL byte"),
        })?;
        self.stage(c.as_bytes_with_nul())
    }

    /// Opens `path` in the target; returns the descriptor.
    fn open(&mut self, path: &str, flags: i32) -> Result<i32, ProcError> {
        let at = self.stage_path(path)?;
        let fd = self.call(
            "openat",
            libc::SYS_openat,
            &[
                libc::AT_FDCWD.cast_unsigned() as u64,
                at,
                u64::from(flags.cast_unsigned()),
                0,
            ],
        )?;
        i32::try_from(fd).map_err(|_| ProcError::Unsupported {
            reason: format!("openat returned {fd}"),
        })
    }

    fn close(&mut self, fd: i32) -> Result<(), ProcError> {
        self.call("close", libc::SYS_close, &[fd_arg(fd)]).map(drop)
    }
}

fn fd_arg(fd: i32) -> u64 {
    u64::from(fd.cast_unsigned())
}

fn prot_bits(p: u8) -> u64 {
    let mut out = 0;
    if p & PROT_R != 0 {
        out |= libc::PROT_READ;
    }
    if p & PROT_W != 0 {
        out |= libc::PROT_WRITE;
    }
    if p & PROT_X != 0 {
        out |= libc::PROT_EXEC;
    }
    u64::from(out.cast_unsigned())
}

/// Turns the stopped thread `t` (the only thread of its process) into the image's main
/// thread and process, and creates the image's other threads (pushed to `threads`, each
/// stopped with its state set; dropping them kills the process). `kept` lists descriptors
/// that already are what the image says (left open, repositioned). Returns whether every
/// created thread got its checkpointed tid.
fn rebuild(
    t: &mut Tracee,
    chain: &[Scanned],
    mode: Mode,
    kept: &[i32],
    threads: &mut Vec<Tracee>,
) -> Result<bool, ProcError> {
    let img = newest(chain);
    let meta = &img.meta;
    let thread = &meta.threads[0];
    let pid = t.tid;
    let current = procfs::maps(pid)?;
    let specials_now: Vec<&MapsLine> = current
        .iter()
        .filter(|m| SPECIALS.contains(&m.path.as_str()))
        .collect();
    for name in SPECIALS {
        let have = specials_now.iter().find(|m| m.path == name);
        let want = meta
            .mappings
            .iter()
            .find(|m| matches!(&m.kind, MappingKind::Special { name: n } if n == name));
        match (have, want) {
            (Some(h), Some(w)) if h.end - h.start != w.len() => {
                return Err(ProcError::Unrestorable {
                    seq: img.seq,
                    reason: format!("{name} has another size in this kernel"),
                });
            }
            (None, Some(_)) => {
                return Err(ProcError::Unrestorable {
                    seq: img.seq,
                    reason: format!("this process has no {name} to put where the image's was"),
                });
            }
            _ => {}
        }
    }

    // A scratch mapping outside both layouts, executable so it holds its own `syscall`.
    let boot_ip = find_syscall_insn(pid, &current)?;
    let mut taken: Vec<(u64, u64)> = current
        .iter()
        .map(|m| (m.start, m.end))
        .chain(meta.mappings.iter().map(|m| (m.start, m.end)))
        .collect();
    let scratch_at = find_gap(&mut taken, SCRATCH_LEN).ok_or_else(|| ProcError::Unsupported {
        reason: "no free address range for the scratch mapping".into(),
    })?;
    let mut tg = Target {
        t,
        pid,
        ip: boot_ip,
        scratch: 0,
    };
    tg.scratch = tg.call(
        "mmap (scratch)",
        libc::SYS_mmap,
        &[
            scratch_at,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
    )?;
    tg.t.write_mem(tg.scratch, &[0x0f, 0x05])?;
    tg.ip = tg.scratch;

    // rseq points into memory about to go: unregister first, or the kernel's next update
    // of it kills the thread.
    if let Some(r) = tg.t.rseq()? {
        tg.call(
            "rseq (unregister)",
            libc::SYS_rseq,
            &[
                r.addr,
                u64::from(r.len),
                RSEQ_FLAG_UNREGISTER,
                u64::from(r.signature),
            ],
        )?;
    }

    restore_fds(&mut tg, &meta.fds, kept, mode)?;
    let cwd = meta.cwd.clone();
    let at = tg.stage_path(&cwd)?;
    tg.call("chdir", libc::SYS_chdir, &[at])?;

    // Files behind the image's file mappings, opened before the address space is cleared.
    let mut map_fds: BTreeMap<(String, bool), i32> = BTreeMap::new();
    for m in &meta.mappings {
        if let MappingKind::File { path, .. } = &m.kind {
            let rw = m.shared && m.prot & PROT_W != 0;
            if let std::collections::btree_map::Entry::Vacant(slot) =
                map_fds.entry((path.clone(), rw))
            {
                let flags = if rw { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC;
                slot.insert(tg.open(path, flags)?);
            }
        }
    }

    // Clear the address space but for the scratch mapping and the kernel's mappings.
    let mut keep: Vec<(u64, u64)> = specials_now.iter().map(|m| (m.start, m.end)).collect();
    keep.push((tg.scratch, tg.scratch + SCRATCH_LEN));
    keep.sort_unstable();
    let top = current
        .iter()
        .map(|m| m.end)
        .chain(meta.mappings.iter().map(|m| m.end))
        .filter(|&e| e < KERNEL_HALF)
        .max()
        .unwrap_or(USER_TOP)
        .max(USER_TOP);
    let mut at = 0u64;
    for &(s, e) in keep.iter().chain(std::iter::once(&(top, top))) {
        if s > at {
            tg.call("munmap", libc::SYS_munmap, &[at, s - at])?;
        }
        at = at.max(e);
    }
    move_specials(&mut tg, &specials_now, meta)?;

    for m in &meta.mappings {
        if matches!(m.kind, MappingKind::Special { .. }) {
            continue;
        }
        let prot = prot_bits(m.prot | if m.has_contents { PROT_R | PROT_W } else { 0 });
        let share = if m.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let (flags, fd) = match &m.kind {
            MappingKind::File { path, .. } => {
                let rw = m.shared && m.prot & PROT_W != 0;
                (
                    share,
                    map_fds.get(&(path.clone(), rw)).copied().unwrap_or(-1),
                )
            }
            _ => {
                let grows = if m.is_stack() { libc::MAP_GROWSDOWN } else { 0 };
                (share | libc::MAP_ANONYMOUS | grows, -1)
            }
        };
        let got = tg.call(
            "mmap",
            libc::SYS_mmap,
            &[
                m.start,
                m.len(),
                prot,
                u64::from((flags | libc::MAP_FIXED).cast_unsigned()),
                u64::from(fd.cast_unsigned()),
                m.offset,
            ],
        )?;
        if got != m.start {
            return Err(ProcError::Unrestorable {
                seq: img.seq,
                reason: format!("mapping {:#x} landed at {got:#x}", m.start),
            });
        }
    }
    for fd in map_fds.into_values() {
        tg.close(fd)?;
    }

    for sig in 1..=NSIG {
        if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
            continue;
        }
        let raw = sigaction_bytes(&meta.sigactions[sig - 1]);
        let at = tg.stage(&raw)?;
        tg.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[sig as u64, at, 0, SIGSET_LEN],
        )?;
    }
    set_mm(&mut tg, meta, mode)?;
    if mode == Mode::Restore {
        let mut name = meta.comm.as_bytes().to_vec();
        name.truncate(15);
        name.push(0);
        let at = tg.stage(&name)?;
        tg.call("prctl(PR_SET_NAME)", libc::SYS_prctl, &[PR_SET_NAME, at])?;
    }
    // The stub's own value means nothing to the restored program; an image without one
    // (older metadata) gets none.
    if mode == Mode::Restore || thread.clear_child_tid.is_some() {
        tg.call(
            "set_tid_address",
            libc::SYS_set_tid_address,
            &[thread.clear_child_tid.unwrap_or(0)],
        )?;
    }
    if let Some(r) = thread.rseq {
        tg.call(
            "rseq",
            libc::SYS_rseq,
            &[r.addr, u64::from(r.len), 0, u64::from(r.signature)],
        )?;
    }
    if thread.robust_list.0 != 0 {
        tg.call(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[thread.robust_list.0, thread.robust_list.1],
        )?;
    }

    write_memory(&mut tg, chain)?;
    for m in &meta.mappings {
        if m.has_contents && !matches!(m.kind, MappingKind::Special { .. }) {
            let want = prot_bits(m.prot);
            if want != prot_bits(m.prot | PROT_R | PROT_W) {
                tg.call("mprotect", libc::SYS_mprotect, &[m.start, m.len(), want])?;
            }
        }
    }

    let same_tids = create_threads(&mut tg, meta, threads)?;

    // The scratch mapping removes itself: the step traps right after the call returns.
    let scratch = tg.scratch;
    tg.call(
        "munmap (scratch)",
        libc::SYS_munmap,
        &[scratch, SCRATCH_LEN],
    )?;
    let t = tg.t;
    t.set_xstate(&thread.xstate)?;
    t.set_sigmask(thread.sigmask)?;
    t.set_resume(regs::from_words(&thread.regs));
    Ok(same_tids)
}

/// Flags of a thread clone (`linux/sched.h`), what `pthread_create` passes but the tid
/// reporting ones: the tid lives in the image's memory already.
const THREAD_CLONE_FLAGS: i32 = libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS;
/// `sizeof(struct clone_args)` up to `set_tid_size` (`CLONE_ARGS_SIZE_VER1`).
const CLONE_ARGS_VER1: usize = 80;

/// A `struct clone_args` (first version) for a thread of the image: TLS and clear_child_tid
/// set at creation, `set_tid` (an address in the target) asking for a tid when given.
fn thread_clone_args(tls: u64, clear_child_tid: u64, set_tid: Option<u64>) -> Vec<u8> {
    let mut flags = u64::from(THREAD_CLONE_FLAGS.cast_unsigned());
    if clear_child_tid != 0 {
        flags |= u64::from(libc::CLONE_CHILD_CLEARTID.cast_unsigned());
    }
    let words = [
        flags,
        0, // pidfd
        clear_child_tid,
        0, // parent_tid
        0, // exit_signal: a thread signals nobody
        0, // stack: the thread starts on its parent's (it is stopped before it runs)
        0, // stack_size
        tls,
        set_tid.unwrap_or(0),
        u64::from(set_tid.is_some()),
    ];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    debug_assert_eq!(bytes.len(), CLONE_ARGS_VER1);
    bytes
}

/// Creates every thread of the image but the main one: an injected clone3 in the main thread
/// (traced with `PTRACE_O_TRACECLONE`, so each new thread starts stopped under ptrace), with
/// its checkpointed tid when that is free, then rseq and the robust list injected into the
/// new thread itself, and its extended state, signal mask and registers set. Returns whether
/// every thread got its checkpointed tid.
fn create_threads(
    tg: &mut Target<'_>,
    meta: &ProcessMeta,
    threads: &mut Vec<Tracee>,
) -> Result<bool, ProcError> {
    if meta.threads.len() < 2 {
        return Ok(true);
    }
    tg.t.trace_clones()?;
    let mut same_tids = true;
    let args_at = tg.scratch + SCRATCH_DATA;
    let tid_at = args_at + CLONE_ARGS_VER1 as u64;
    for th in &meta.threads[1..] {
        let regs = regs::from_words(&th.regs);
        // check_threads refused images without it.
        let ctid = th.clear_child_tid.unwrap_or(0);
        let mut staged = thread_clone_args(regs.fs_base, ctid, Some(tid_at));
        staged.extend_from_slice(&th.tid.to_le_bytes());
        tg.stage(&staged)?;
        let size = CLONE_ARGS_VER1 as u64;
        let mut r = tg.t.inject(tg.ip, libc::SYS_clone3, &[args_at, size])?;
        if r < 0 {
            // The tid is taken (EEXIST), or cannot be asked for here: any tid will do.
            same_tids = false;
            tg.stage(&thread_clone_args(regs.fs_base, ctid, None))?;
            r = tg.t.inject(tg.ip, libc::SYS_clone3, &[args_at, size])?;
        }
        let tid = i32::try_from(r)
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| ProcError::Injected {
                syscall: "clone3 (thread)",
                tid: tg.t.tid.as_raw(),
                errno: Errno::from_raw(i32::try_from(-r).unwrap_or(libc::EINVAL)),
            })?;
        threads.push(Tracee::adopt_clone(Pid::from_raw(tid))?);
        let t = threads
            .last_mut()
            .expect("the thread was pushed just above");
        let mut own = Target {
            t,
            pid: tg.pid,
            ip: tg.ip,
            scratch: tg.scratch,
        };
        if let Some(r) = th.rseq {
            own.call(
                "rseq",
                libc::SYS_rseq,
                &[r.addr, u64::from(r.len), 0, u64::from(r.signature)],
            )?;
        }
        if th.robust_list.0 != 0 {
            own.call(
                "set_robust_list",
                libc::SYS_set_robust_list,
                &[th.robust_list.0, th.robust_list.1],
            )?;
        }
        let t = own.t;
        t.set_xstate(&th.xstate)?;
        t.set_sigmask(th.sigmask)?;
        t.set_resume(regs::from_words(&th.regs));
    }
    Ok(same_tids)
}

/// Closes what the image does not hold, reopens what it holds at the same numbers and
/// offsets.
fn restore_fds(
    tg: &mut Target<'_>,
    fds: &[FdState],
    kept: &[i32],
    mode: Mode,
) -> Result<(), ProcError> {
    if mode == Mode::Rollback {
        for c in procfs::fds(tg.pid)? {
            if !kept.contains(&c.fd) {
                tg.close(c.fd)?;
            }
        }
    }
    for f in fds {
        let is_file = matches!(f.kind, FdKind::File { .. });
        if kept.contains(&f.fd) {
            if mode == Mode::Rollback && is_file {
                seek_checkpointed(tg, f)?;
            }
            continue;
        }
        let Some(path) = f.kind.reopen_path() else {
            // Unrestorable ones were refused before anything changed.
            continue;
        };
        let flags = f.flags & !REOPEN_DROP;
        let got = tg.open(path, flags)?;
        if got != f.fd {
            let cloexec = if f.flags & libc::O_CLOEXEC != 0 {
                libc::O_CLOEXEC
            } else {
                0
            };
            tg.call(
                "dup3",
                libc::SYS_dup3,
                &[fd_arg(got), fd_arg(f.fd), fd_arg(cloexec)],
            )?;
            tg.close(got)?;
        }
        if is_file {
            seek_checkpointed(tg, f)?;
        }
    }
    Ok(())
}

/// Puts a regular file's offset where the image wants it: the checkpointed offset, or, for
/// a file excluded from the snapshot (a log, whose contents were not rolled back), its
/// current end (see `FdState::excluded`).
fn seek_checkpointed(tg: &mut Target<'_>, f: &FdState) -> Result<(), ProcError> {
    let (pos, whence) = if f.excluded {
        (0, libc::SEEK_END)
    } else {
        (f.pos, libc::SEEK_SET)
    };
    tg.call(
        "lseek",
        libc::SYS_lseek,
        &[fd_arg(f.fd), pos, u64::from(whence.cast_unsigned())],
    )?;
    Ok(())
}

/// Moves the kernel's mappings to where the image had them, keeping their relative layout:
/// first all to a free range, then each to its place (a direct move could land on another).
fn move_specials(
    tg: &mut Target<'_>,
    now: &[&MapsLine],
    meta: &ProcessMeta,
) -> Result<(), ProcError> {
    let mut moves = Vec::new();
    for m in now {
        let want = meta
            .mappings
            .iter()
            .find(|w| matches!(&w.kind, MappingKind::Special { name } if *name == m.path));
        match want {
            Some(w) => moves.push((m.start, m.end - m.start, w.start)),
            None => {
                tg.call(
                    "munmap (special)",
                    libc::SYS_munmap,
                    &[m.start, m.end - m.start],
                )?;
            }
        }
    }
    if moves.iter().all(|&(from, _, to)| from == to) {
        return Ok(());
    }
    let lo = moves.iter().map(|m| m.0).min().unwrap_or(0);
    let hi = moves.iter().map(|m| m.0 + m.1).max().unwrap_or(0);
    let mut taken: Vec<(u64, u64)> = meta
        .mappings
        .iter()
        .map(|m| (m.start, m.end))
        .chain(moves.iter().map(|m| (m.0, m.0 + m.1)))
        .chain(std::iter::once((tg.scratch, tg.scratch + SCRATCH_LEN)))
        .collect();
    let temp = find_gap(&mut taken, hi - lo).ok_or_else(|| ProcError::Unsupported {
        reason: "no free range to move the vDSO through".into(),
    })?;
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    for &(from, len, _) in &moves {
        tg.call(
            "mremap (special)",
            libc::SYS_mremap,
            &[from, len, len, flags, temp + (from - lo)],
        )?;
    }
    for &(from, len, to) in &moves {
        tg.call(
            "mremap (special)",
            libc::SYS_mremap,
            &[temp + (from - lo), len, len, flags, to],
        )?;
    }
    Ok(())
}

/// `PR_SET_MM_MAP` with the image's mm fields and auxv; the executable link too on restore.
fn set_mm(tg: &mut Target<'_>, meta: &ProcessMeta, mode: Mode) -> Result<(), ProcError> {
    let mm = &meta.mm;
    let auxv: &[u8] = if meta.auxv.len() <= MAX_AUXV {
        &meta.auxv
    } else {
        &[]
    };
    let mut buf = Vec::with_capacity(PRCTL_MM_MAP_LEN + auxv.len());
    for v in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
    ] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let auxv_at = tg.scratch + SCRATCH_DATA + PRCTL_MM_MAP_LEN as u64;
    buf.extend_from_slice(&(if auxv.is_empty() { 0 } else { auxv_at }).to_le_bytes());
    buf.extend_from_slice(&u32::try_from(auxv.len()).unwrap_or(0).to_le_bytes());
    buf.extend_from_slice(&u32::MAX.to_le_bytes()); // exe_fd -1: unchanged here
    buf.extend_from_slice(auxv);
    let at = tg.stage(&buf)?;
    tg.call(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[PR_SET_MM, PR_SET_MM_MAP, at, PRCTL_MM_MAP_LEN as u64, 0],
    )?;
    if mode == Mode::Restore
        && let Ok(fd) = tg.open(&meta.exe, libc::O_RDONLY | libc::O_CLOEXEC)
    {
        // Best effort: /proc/PID/exe naming the right program is cosmetic.
        let _ = tg.t.inject(
            tg.ip,
            libc::SYS_prctl,
            &[PR_SET_MM, PR_SET_MM_EXE_FILE, fd_arg(fd), 0, 0],
        );
        tg.close(fd)?;
    }
    Ok(())
}

/// Writes the memory chunks of the chain, base first (a later image's bytes win), where their
/// mappings now are, clipped to the pages the newest image says held data (a page freed
/// since an older image stays as the fresh mapping has it).
fn write_memory(tg: &mut Target<'_>, chain: &[Scanned]) -> Result<(), ProcError> {
    let mut buf = Vec::new();
    let meta = &newest(chain).meta;
    for img in chain {
        for &(ri, offset, pos, n) in &img.chunks {
            let Some(region) = img
                .header
                .regions
                .get(usize::try_from(ri).unwrap_or(usize::MAX))
            else {
                continue;
            };
            if region.id < MAPPING_REGION_BASE || region.id >= FILE_REGION_BASE {
                continue;
            }
            let Some(mapping) = usize::try_from(region.id - MAPPING_REGION_BASE)
                .ok()
                .and_then(|i| meta.mappings.get(i))
            else {
                continue;
            };
            read_chunk_at(&img.file, pos, n, &mut buf).map_err(image_err(&img.path))?;
            let start = mapping.start + offset;
            let end = start + buf.len() as u64;
            match &mapping.runs {
                None => ptrace::write_mem(tg.pid, start, &buf)?,
                Some(runs) => {
                    let first = runs.partition_point(|&(_, e)| e <= start);
                    for &(s, e) in runs[first..].iter().take_while(|&&(s, _)| s < end) {
                        let (lo, hi) = (s.max(start), e.min(end));
                        let at = usize::try_from(lo - start).unwrap_or(0);
                        let to = usize::try_from(hi - start).unwrap_or(0);
                        ptrace::write_mem(tg.pid, lo, &buf[at..to])?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn word(b: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
    }

    #[test]
    fn thread_clone_args_follow_the_kernel_layout() {
        let a = thread_clone_args(0x7f00, 0x7f10, Some(0x5000));
        assert_eq!(a.len(), CLONE_ARGS_VER1);
        let flags = word(&a, 0);
        for f in [libc::CLONE_THREAD, libc::CLONE_VM, libc::CLONE_SETTLS] {
            assert_ne!(flags & u64::from(f.cast_unsigned()), 0);
        }
        assert_ne!(
            flags & u64::from(libc::CLONE_CHILD_CLEARTID.cast_unsigned()),
            0
        );
        // child_tid, exit_signal, tls, set_tid, set_tid_size
        assert_eq!(
            [
                word(&a, 2),
                word(&a, 4),
                word(&a, 7),
                word(&a, 8),
                word(&a, 9)
            ],
            [0x7f10, 0, 0x7f00, 0x5000, 1]
        );
        let b = thread_clone_args(0x7f00, 0, None);
        assert_eq!(
            word(&b, 0) & u64::from(libc::CLONE_CHILD_CLEARTID.cast_unsigned()),
            0
        );
        assert_eq!([word(&b, 8), word(&b, 9)], [0, 0]);
    }
}
