//! Capturing the pages of one checkpoint while the caller is paused: either copied into a
//! staging buffer, or frozen in a copy-on-write child process (`clone3` with no exit signal, so
//! the application's SIGCHLD handling and `wait()` never see it) that streams them through a
//! pipe to libft's writer thread.
//!
//! The child never allocates, takes no lock and runs no code that could: the parent may be
//! multi-threaded, and any lock another thread held at the clone stays held forever in the
//! child. It only calls `close`, `write` and `_exit`, on buffers prepared before the clone.

use std::fs::File;
use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::dirty::{Area, DirtySet};
use super::uapi::{CLONE_PIDFD, CloneArgs};
use super::vm::{align_up, page_size};

/// The pipe buffer the fork path asks for (the default `fs.pipe-max-size`); larger writes
/// mean fewer context switches between the child and the writer thread.
const PIPE_CAPACITY: libc::c_int = 1 << 20;
/// Exit status of a snapshot child whose pipe broke (the writer gave up).
const CHILD_EXIT_WRITE_FAILED: libc::c_int = 3;

/// One contiguous run of bytes to capture: `len` bytes of area `area` from `offset`, found in
/// this process at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Index of the area (0 = heap, i = region i), which is also the image's region index.
    pub area: u32,
    /// Offset in the area.
    pub offset: u64,
    /// Length in bytes.
    pub len: usize,
    /// Address of the first byte.
    pub addr: usize,
}

/// The extents of a full image: the first `scan_lens[i]` bytes of every area (the heap's used
/// span rounded up to a page; regions whole).
pub fn full_extents(areas: &[Area], scan_lens: &[usize]) -> Vec<Extent> {
    let page = page_size();
    areas
        .iter()
        .zip(scan_lens)
        .enumerate()
        .filter_map(|(index, (area, limit))| {
            let len = align_up((*limit).min(area.len), page)
                .unwrap_or(area.len)
                .min(area.len);
            (len > 0).then(|| Extent {
                area: u32::try_from(index).unwrap_or(u32::MAX),
                offset: 0,
                len,
                addr: area.base,
            })
        })
        .collect()
}

/// The extents of an incremental image: the runs of dirty pages of every area.
pub fn dirty_extents(areas: &[Area], dirty: &DirtySet) -> Vec<Extent> {
    let page = page_size();
    let mut out = Vec::new();
    for (index, area) in areas.iter().enumerate() {
        let Some(set) = dirty.area(index) else {
            continue;
        };
        for (first, end) in set.runs() {
            let offset = first * page;
            let stop = (end * page).min(area.len);
            if offset < stop {
                out.push(Extent {
                    area: u32::try_from(index).unwrap_or(u32::MAX),
                    offset: offset as u64,
                    len: stop - offset,
                    addr: area.base + offset,
                });
            }
        }
    }
    out
}

/// Total bytes of `extents`.
pub fn total_len(extents: &[Extent]) -> usize {
    extents.iter().map(|e| e.len).sum()
}

/// Copies the bytes of `extents`, in order, into `buf` (reusing its capacity).
pub fn copy_to_staging(extents: &[Extent], buf: &mut Vec<u8>) {
    buf.clear();
    buf.reserve(total_len(extents));
    for e in extents {
        // SAFETY: extents describe tracked areas, which are mapped readable for as long as they
        // are tracked; the caller holds the locks that keep them so and has paused the
        // application's writes (the checkpoint contract).
        let bytes = unsafe { std::slice::from_raw_parts(e.addr as *const u8, e.len) };
        buf.extend_from_slice(bytes);
    }
}

/// Which system call makes the snapshot child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneFlavor {
    /// `clone3`, falling back to `clone` when it is not available (ENOSYS, e.g. under a
    /// seccomp policy that hides it).
    Clone3,
    /// Legacy `clone` with CLONE_PIDFD (Linux 5.2+). Only tests ask for it directly; at run
    /// time it is what `Clone3` falls back to.
    #[cfg_attr(not(test), allow(dead_code))]
    Clone,
}

/// A copy-on-write child process holding the checkpoint's pages as they were at the clone,
/// streaming them through a pipe. Dropping it kills and reaps the child.
#[derive(Debug)]
pub struct ForkSnapshot {
    child: Option<Child>,
    pipe: File,
}

#[derive(Debug)]
struct Child {
    pid: libc::pid_t,
    pidfd: OwnedFd,
}

impl ForkSnapshot {
    /// Clones the process; the child writes the bytes of `extents`, in order, into the pipe
    /// that [`ForkSnapshot::read_exact`] reads, then exits with status 0.
    pub fn start(extents: &[Extent], flavor: CloneFlavor) -> io::Result<ForkSnapshot> {
        let (read_end, write_end) = pipe()?;
        // A bigger pipe is only an optimisation.
        // SAFETY: F_SETPIPE_SZ on a pipe we own; no memory is passed.
        unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_CAPACITY) };
        let child = spawn(extents, write_end.as_raw_fd(), read_end.as_raw_fd(), flavor)?;
        drop(write_end);
        Ok(ForkSnapshot {
            child: Some(child),
            pipe: File::from(read_end),
        })
    }

    /// The child's process id.
    #[cfg(test)]
    pub fn pid(&self) -> Option<libc::pid_t> {
        self.child.as_ref().map(|c| c.pid)
    }

    /// Reads the next `buf.len()` bytes of the stream.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.pipe.read_exact(buf)
    }

    /// Checks that the stream has ended and the child exited with status 0.
    pub fn finish(mut self) -> io::Result<()> {
        let mut extra = [0u8; 1];
        let n = loop {
            match self.pipe.read(&mut extra) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        let child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other("no snapshot child"))?;
        let status = reap(&child)?;
        if n != 0 {
            return Err(io::Error::other(
                "snapshot child wrote more than its extents",
            ));
        }
        match status {
            ChildExit::Exited(0) => Ok(()),
            ChildExit::Exited(code) => Err(io::Error::other(format!(
                "snapshot child {} exited with status {code}",
                child.pid
            ))),
            ChildExit::Signaled(sig) => Err(io::Error::other(format!(
                "snapshot child {} was killed by signal {sig}",
                child.pid
            ))),
        }
    }
}

impl Drop for ForkSnapshot {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            // SAFETY: pidfd_send_signal on a pidfd we own; it cannot hit a recycled pid.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    child.pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            let _ = reap(&child);
        }
    }
}

enum ChildExit {
    Exited(i32),
    Signaled(i32),
}

/// Waits for the child through its pidfd. `__WALL` because a child with no exit signal is a
/// "clone" child that plain waits ignore.
fn reap(child: &Child) -> io::Result<ChildExit> {
    let id = libc::id_t::try_from(child.pidfd.as_raw_fd())
        .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    loop {
        let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: waitid writes a siginfo_t into `info`, which is large enough and zeroed.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                id,
                info.as_mut_ptr(),
                libc::WEXITED | libc::__WALL,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid succeeded, so it filled `info` for an exited child.
        let info = unsafe { info.assume_init() };
        // SAFETY: si_status is valid for SIGCHLD-style siginfo, which waitid returns.
        let status = unsafe { info.si_status() };
        return Ok(if info.si_code == libc::CLD_EXITED {
            ChildExit::Exited(status)
        } else {
            ChildExit::Signaled(status)
        });
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two fds into the array, which holds two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Clones the process with every signal blocked (restored in the parent; the child keeps
/// them blocked so that no application handler ever runs in it, and a broken pipe is an
/// EPIPE error rather than a signal).
fn spawn(
    extents: &[Extent],
    write_fd: RawFd,
    read_fd: RawFd,
    flavor: CloneFlavor,
) -> io::Result<Child> {
    let mut all = MaybeUninit::<libc::sigset_t>::uninit();
    let mut old = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises `all`; pthread_sigmask reads `all` and writes `old`.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
    }
    let mut pidfd: libc::c_int = -1;
    let mut ret: libc::c_long = -1;
    let mut errno = libc::ENOSYS;
    if flavor == CloneFlavor::Clone3 {
        let mut args = CloneArgs {
            flags: CLONE_PIDFD,
            pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
            exit_signal: 0,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM duplicates the process copy-on-write; the child runs
        // on its own copy of this stack and goes straight to `child_main`, which never returns
        // and only makes async-signal-safe system calls on memory prepared before the clone.
        ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::addr_of_mut!(args),
                size_of::<CloneArgs>(),
            )
        };
        if ret == 0 {
            child_main(write_fd, read_fd, extents);
        }
        if ret < 0 {
            errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL);
        }
    }
    if ret < 0 && errno == libc::ENOSYS {
        // Exit signal 0 (the low byte of the flags); CLONE_PIDFD stores the pidfd through the
        // parent_tid argument.
        // SAFETY: as for clone3 above: a copy-on-write child that only runs `child_main`.
        ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                CLONE_PIDFD as libc::c_ulong,
                0usize,
                std::ptr::addr_of_mut!(pidfd),
                0usize,
                0usize,
            )
        };
        if ret == 0 {
            child_main(write_fd, read_fd, extents);
        }
    }
    let result = if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    };
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut()) };
    let pid = libc::pid_t::try_from(result?).map_err(|_| io::Error::other("bad child pid"))?;
    if pidfd < 0 {
        return Err(io::Error::other("clone returned no pidfd"));
    }
    // SAFETY: the kernel created this pidfd for us and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Child { pid, pidfd })
}

/// The whole life of the snapshot child: stream the extents into the pipe and exit.
fn child_main(write_fd: RawFd, read_fd: RawFd, extents: &[Extent]) -> ! {
    // SAFETY: only async-signal-safe system calls on memory that this process owns (its
    // copy-on-write image of the parent); `_exit` skips atexit handlers and destructors, which
    // belong to the parent.
    unsafe {
        // Without our copy of the read end, the pipe breaks (EPIPE) when the writer gives up.
        libc::close(read_fd);
        for e in extents {
            let mut addr = e.addr;
            let mut left = e.len;
            while left > 0 {
                let n = libc::write(write_fd, addr as *const libc::c_void, left);
                if n < 0 {
                    if *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    libc::_exit(CHILD_EXIT_WRITE_FAILED);
                }
                let n = n.unsigned_abs();
                if n == 0 {
                    libc::_exit(CHILD_EXIT_WRITE_FAILED);
                }
                addr += n;
                left -= n.min(left);
            }
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(i: usize) -> u8 {
        u8::try_from(i % 251).expect("below 251")
    }

    fn stream_back(flavor: CloneFlavor) {
        let page = page_size();
        let mut data: Vec<u8> = (0..8 * page).map(pattern).collect();
        let base = data.as_ptr() as usize;
        let extents = [
            Extent {
                area: 0,
                offset: page as u64,
                len: 2 * page,
                addr: base + page,
            },
            Extent {
                area: 0,
                offset: 6 * page as u64,
                len: 100,
                addr: base + 6 * page,
            },
        ];
        let mut snap = ForkSnapshot::start(&extents, flavor).expect("clone");
        // Writes after the clone must not show in the snapshot.
        data.iter_mut().for_each(|b| *b = 0xEE);
        let mut got = vec![0u8; 2 * page + 100];
        snap.read_exact(&mut got).expect("read");
        snap.finish().expect("child exits 0");
        let expected: Vec<u8> = (page..3 * page)
            .chain(6 * page..6 * page + 100)
            .map(pattern)
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn clone3_child_streams_the_pages_as_they_were() {
        stream_back(CloneFlavor::Clone3);
    }

    #[test]
    fn legacy_clone_child_streams_the_pages_as_they_were() {
        stream_back(CloneFlavor::Clone);
    }

    #[test]
    fn dropping_an_unread_snapshot_kills_and_reaps_the_child() {
        let big = vec![7u8; 8 << 20];
        let extents = [Extent {
            area: 0,
            offset: 0,
            len: big.len(),
            addr: big.as_ptr() as usize,
        }];
        let snap = ForkSnapshot::start(&extents, CloneFlavor::Clone3).expect("clone");
        let pid = snap.pid().expect("pid");
        drop(snap);
        // Reaped: the pid no longer names a process of ours (or a zombie).
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "snapshot child {pid} still exists");
    }

    #[test]
    fn extents_follow_dirty_runs_and_clip_partial_pages() {
        let page = page_size();
        let areas = [
            Area {
                base: 0x10_0000,
                len: 4 * page,
            },
            Area {
                base: 0x20_0000 + 8,
                len: page + 10,
            },
        ];
        let mut dirty = DirtySet::for_areas(&areas);
        dirty.mark(0, 1, 2);
        dirty.mark(1, 1, 1);
        let ex = dirty_extents(&areas, &dirty);
        assert_eq!(
            ex,
            vec![
                Extent {
                    area: 0,
                    offset: page as u64,
                    len: 2 * page,
                    addr: 0x10_0000 + page
                },
                Extent {
                    area: 1,
                    offset: page as u64,
                    len: 10,
                    addr: 0x20_0000 + 8 + page
                },
            ]
        );
        let full = full_extents(&areas, &[page + 1, areas[1].len]);
        assert_eq!(full[0].len, 2 * page);
        assert_eq!(full[1].len, page + 10);
        assert_eq!(total_len(&full), 3 * page + 10);
    }
}
