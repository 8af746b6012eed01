//! libftrepl.so: an LD_PRELOAD shim that replicates the file changes of unmodified,
//! dynamically linked programs. Run a program with `LD_PRELOAD=/path/to/libftrepl.so` and
//! `FT_REPL_FILESETS=NAME|ROOT|RINGPATH;…` (watchd sets both); every change the program makes
//! beneath a fileset's ROOT is appended, as an [`ft::replog::Op`], to that fileset's ring,
//! from where watchd's pump streams it to the backups.
//!
//! # How it works
//! * The real libc functions are found once with `dlsym(RTLD_NEXT)` (in the constructor).
//! * The real call is always made first, exactly once, with the caller's arguments; an
//!   operation is logged only if it succeeded; `errno` is left exactly as the real call set
//!   it; a failure inside the shim never fails the call (it is reported once on stderr).
//! * Paths are the kernel's: a descriptor's canonical path is read from `/proc/self/fd/N`
//!   after a successful open; a path-based call resolves the canonical parent directory plus
//!   the final name (or, for calls that follow a final symlink, the target) before the call.
//!   Paths outside every fileset take a fast path: no lock, no allocation.
//! * Descriptors opened for writing on regular files in a fileset are tracked (fd → fileset,
//!   relative path; dup'ed descriptors share one entry). A lock-free bitmap answers "tracked?"
//!   for every fd-based call, so untracked descriptors (sockets, pipes, other files) cost two
//!   atomic loads — also from signal handlers. Renames move tracked paths; unlink or
//!   replacement stops tracking (later writes go to an inode the fileset no longer names).
//! * One lock orders "real call, then ring append" among the process's threads, so the ring
//!   order is the order in which the calls took effect. Sync-mode durability waits happen
//!   after it is released. A thread-local guard makes the shim's own I/O pass straight through.
//! * Writes are located by `lseek(fd, 0, SEEK_CUR)` after the call minus the bytes written
//!   (O_APPEND included); an appending `pwrite` by the file size. Whether a descriptor appends
//!   is read once when tracking starts and after each `fcntl(F_SETFL)` through the shim, so a
//!   `pwrite` costs no syscall besides itself. A truncating open logs
//!   `Create` + `Truncate{0}`. `copy_file_range`, `sendfile`, `splice` and reflink clones are
//!   logged as writes of the bytes read back from the source (or the file).
//! * fork: the lock is taken in `pthread_atfork`'s prepare handler (after glibc's stdio list
//!   lock, the order every other path uses) so the child inherits a consistent table and
//!   keeps tracking its inherited descriptors. vfork children never edit the parent's table.
//! * exec: the new image loads the shim afresh and adopts the inherited descriptors that are
//!   open for writing on files in a fileset (so `cmd > file` works), from `/proc/self/fd`.
//!
//! # stdio
//! glibc's streams write through an internal `__write` that no preloaded library can see. A
//! stream that `fopen`/`fopen64`/`fdopen` opens for writing on a file in a fileset is
//! therefore replaced by a `fopencookie` stream whose write, seek and close go through the
//! shim (so `fwrite`, `fputs`, `fprintf`, `putc`, `fflush`, `fclose` are all seen, in order,
//! with buffering unchanged), and `fileno`/`fileno_unlocked` return the real descriptor.
//! Streams whose FILE object cannot be replaced — `freopen`/`freopen64` results, and
//! `stdout`/`stderr` when their descriptor is a tracked file (inherited, or `dup2`'ed) — are
//! *mirrored*: what they wrote is read back from the file at `fflush`, `fclose`, seeks and
//! process exit (a destructor), so a crash loses what was not flushed yet, as on the primary.
//!
//! # What the shim cannot see (use copy mode for such programs)
//! * statically linked binaries and programs that make raw system calls (Go binaries, for
//!   instance) — nothing is interposed;
//! * io_uring submissions and AIO;
//! * writes through shared `mmap` mappings (and `msync`);
//! * changes made through a descriptor the shim does not know: opened by a raw syscall, or
//!   a file moved into a fileset while already open (renames into a fileset send the file's
//!   contents, but earlier descriptors stay untracked), and descriptors that a vfork child
//!   dup'ed before exec until the exec'ed program adopts them;
//! * ownership (chown), extended attributes (setting the access ACL is logged as the chmod
//!   it implies), device nodes, FIFOs and sockets (the operation log has no such operations);
//! * programs linked against another C library than glibc (the wrappers rely on glibc's
//!   symbols and stdio internals such as `fopencookie` and the stdio list lock);
//! * concurrent writers on one file in several processes: each process logs its own writes in
//!   its own order, and an O_APPEND write's offset is read after the write, so interleaved
//!   appends from two processes may be logged at the wrong offsets; likewise a `pwrite` after
//!   another process (sharing the open file description since a fork) or a raw syscall
//!   switched `O_APPEND` on or off;
//! * a signal handler that writes to a tracked file while its thread is inside the shim (that
//!   one write is not logged; reported once).

mod canon;
mod diag;
mod fdbits;
mod fdops;
mod lock;
mod pathops;
mod real;
mod rec;
mod reentry;
mod sink;
mod state;
mod stdio;

use libc::c_int;

// The loader runs these for every process the shim is preloaded into.
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = init;

#[used]
#[unsafe(link_section = ".fini_array")]
static DESTRUCTOR: extern "C" fn() = fini;

extern "C" fn init() {
    real::resolve_all();
    let Some(_inside) = reentry::enter() else {
        return;
    };
    let errno = reentry::Errno::save();
    rec::shielded(|| {
        let Some(shim) = sink::Sink::from_env().and_then(state::install) else {
            return;
        };
        // SAFETY: the handlers are plain functions that live as long as the process.
        unsafe {
            libc::pthread_atfork(
                Some(state::fork_prepare),
                Some(state::fork_parent),
                Some(state::fork_child),
            );
        }
        adopt_inherited(shim);
    });
    errno.restore();
}

extern "C" fn fini() {
    let errno = reentry::Errno::save();
    rec::shielded(|| stdio::sync_all_mirrors(true));
    errno.restore();
}

/// Tracks the descriptors inherited across exec that are open for writing on files in a
/// fileset (shell redirections), and mirrors stdout/stderr if theirs are among them.
fn adopt_inherited(shim: &'static state::Shim) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        diag::report(
            diag::Trouble::Path,
            format_args!("cannot list /proc/self/fd; inherited descriptors are not tracked"),
        );
        return;
    };
    let fds: Vec<c_int> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        // SAFETY: F_GETFL only reads the descriptor's flags (a closed one fails harmlessly).
        let flags = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_GETFL) };
        let Ok(flags) = c_int::try_from(flags) else {
            continue;
        };
        if flags >= 0 && flags & libc::O_ACCMODE != libc::O_RDONLY && flags & libc::O_PATH == 0 {
            fdops::adopt(shim, fd, 0, true);
        }
    }
    let mut session = shim.session();
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        if session.tracked().desc(fd).is_some() {
            stdio::mirror_std_stream(&mut session, fd);
        }
    }
}
