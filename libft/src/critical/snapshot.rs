//! Capturing the pages of one checkpoint while the caller is paused: either copied into a
//! staging buffer, or frozen in a copy-on-write child process (`clone3` with no exit signal, so
//! the application's SIGCHLD handling and `wait()` never see it) that writes the image itself,
//! straight from its copy of the memory onto the image's temp file, and reports the image's
//! totals in a shared page; the writer thread then only waits for it and commits.
//!
//! The child never allocates, takes no lock and runs no code that could: the parent may be
//! multi-threaded, and any lock another thread held at the clone stays held forever in the
//! child. It only computes checksums and calls `write`/`writev`, `sync_file_range` and `_exit`,
//! through an image writer, a file and a report page prepared before the clone; besides, it
//! maps a small stack and starts one thread on it that touches each page ahead of the writer
//! (see `touch_ahead`), and wakes the parent through an eventfd once its report is complete,
//! so the commit does not wait for the child's address space to be torn down.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use ckpt::{ImageError, ImageFile, ImageSummary, ImageWriter};

use super::Error;
use super::dirty::{Area, DirtySet};
use super::uapi::{CLONE_PIDFD, CloneArgs};
use super::vm::{self, align_up, page_size};

/// Exit status of a snapshot child whose image could not be written (the report says why).
const CHILD_EXIT_WRITE_FAILED: libc::c_int = 3;
/// Stack of the child's touch-ahead thread: it runs one small loop and calls nothing.
const TOUCH_STACK: usize = 64 * 1024;
/// `ChildReport::state`: the child has not reported (yet).
const REPORT_NONE: u32 = 0;
/// `ChildReport::state`: the image is complete; the totals are valid.
const REPORT_DONE: u32 = 1;
/// `ChildReport::state`: a write failed; `errno` and `offset` say how and where.
const REPORT_IO_ERROR: u32 = 2;
/// `ChildReport::state`: the writer refused the image for another reason (a bug: the extents
/// are checked before the clone).
const REPORT_REFUSED: u32 = 3;

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

/// Copies the bytes of `extents`, in order, into `buf` (reusing its capacity: the buffer
/// lives on between checkpoints, so its pages stay faulted in). When it must grow, the new
/// pages are faulted in with one `MADV_POPULATE_WRITE` rather than one fault per page.
pub fn copy_to_staging(extents: &[Extent], buf: &mut Vec<u8>) {
    buf.clear();
    let total = total_len(extents);
    if buf.capacity() < total {
        buf.reserve(total);
        let page = page_size();
        let start = align_up(buf.as_ptr() as usize, page);
        let end = vm::align_down(buf.as_ptr() as usize + buf.capacity(), page);
        if let Some(start) = start.filter(|s| *s < end) {
            // SAFETY: the range lies inside the Vec's own allocation (its spare capacity,
            // rounded inwards to whole pages), which nothing else references; populating only
            // faults its pages in, without changing the mapping.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                )
            };
        }
    }
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

/// What the child reports through the shared page: written by the child only, read by the
/// parent only after the child was reaped.
#[repr(C)]
#[derive(Debug)]
struct ChildReport {
    state: AtomicU32,
    errno: i32,
    offset: u64,
    chunks: u64,
    data_bytes: u64,
    file_bytes: u64,
}

/// A page shared between the parent and its snapshot child (MAP_SHARED survives the clone).
#[derive(Debug)]
struct ReportPage {
    report: NonNull<ChildReport>,
    len: usize,
}

// SAFETY: the page is plain shared memory owned by this value; it is only accessed through
// `&self` methods that read it after the child (its only other writer) has been reaped, so
// moving the owner to the writer thread is sound.
unsafe impl Send for ReportPage {}

impl ReportPage {
    fn new() -> io::Result<ReportPage> {
        let len = page_size();
        // SAFETY: a fresh anonymous shared mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let report = NonNull::new(p.cast::<ChildReport>())
            .ok_or_else(|| io::Error::other("mmap returned a null page"))?;
        // The mapping is zero-filled: state REPORT_NONE, every total 0, which is a valid
        // ChildReport (AtomicU32 and integers accept all-zero bytes).
        let page = ReportPage { report, len };
        debug_assert_eq!(page.get().state.load(Ordering::Relaxed), REPORT_NONE);
        Ok(page)
    }

    fn get(&self) -> &ChildReport {
        // SAFETY: the page is mapped for our whole life, page-aligned (so aligned for
        // ChildReport, which is far smaller than a page) and holds a valid ChildReport (zeroes,
        // or what the child stored). The child's plain fields are read only after its state
        // was loaded with Acquire (or after it was reaped).
        unsafe { self.report.as_ref() }
    }
}

impl Drop for ReportPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing references after
        // this value is gone.
        unsafe { libc::munmap(self.report.as_ptr().cast(), self.len) };
    }
}

/// A copy-on-write child process writing the image of the checkpoint's pages as they were at
/// the clone. Dropping it reaps the child, killing it first unless it reported a finished
/// image (then it is only exiting).
#[derive(Debug)]
pub struct ForkSnapshot {
    child: Option<Child>,
    report: ReportPage,
    /// Readable once the child's report is complete (the child writes it right before `_exit`).
    ready: OwnedFd,
    /// The child reported a finished image: it is exiting by itself.
    reported: bool,
}

#[derive(Debug)]
struct Child {
    pid: libc::pid_t,
    pidfd: OwnedFd,
}

impl ForkSnapshot {
    /// Clones the process; the child writes the bytes of `extents`, in order, as chunks of the
    /// image through its copy of `writer` (onto the same open file), writes the footer, reports
    /// the image's totals and exits with status 0. From then on the file belongs to the child:
    /// the caller must not write through `writer` again, and commits with
    /// `Pending::commit_finished` once [`ForkSnapshot::finish`] returned the totals.
    ///
    /// The caller keeps the extents' memory mapped until the clone returns; the child's copy is
    /// frozen at the clone, whatever the application writes afterwards.
    pub fn start(
        extents: &[Extent],
        writer: &mut ImageWriter<ImageFile>,
        flavor: CloneFlavor,
    ) -> io::Result<ForkSnapshot> {
        let report = ReportPage::new()?;
        // SAFETY: eventfd creates a new descriptor; no memory is passed.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel created this descriptor for us and nothing else owns it.
        let ready = unsafe { OwnedFd::from_raw_fd(efd) };
        let child = spawn(
            extents,
            writer,
            report.report.as_ptr(),
            ready.as_raw_fd(),
            flavor,
        )?;
        Ok(ForkSnapshot {
            child: Some(child),
            report,
            ready,
            reported: false,
        })
    }

    /// The child's process id.
    #[cfg(test)]
    pub fn pid(&self) -> Option<libc::pid_t> {
        self.child.as_ref().map(|c| c.pid)
    }

    /// Waits until the child reported (or died); returns the totals of the image it finished,
    /// or why it did not (a failed write comes back as the image I/O error it was, so a full
    /// disk reads as one). A child that finished is not waited for: it is still tearing down
    /// its copy of the address space (milliseconds per GiB), which may overlap the commit;
    /// dropping the snapshot reaps it.
    pub fn finish(&mut self) -> Result<ImageSummary, Error> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| Error::Snapshot(io::Error::other("no snapshot child")))?;
        wait_report_or_exit(self.ready.as_raw_fd(), child).map_err(Error::Snapshot)?;
        let r = self.report.get();
        let state = r.state.load(Ordering::Acquire);
        if state == REPORT_DONE {
            self.reported = true;
            return Ok(ImageSummary {
                chunks: r.chunks,
                data_bytes: r.data_bytes,
                file_bytes: r.file_bytes,
            });
        }
        // Failed (or died): it exits at once, and its exit status completes the story.
        let child = self
            .child
            .take()
            .ok_or_else(|| Error::Snapshot(io::Error::other("no snapshot child")))?;
        let status = reap(&child).map_err(Error::Snapshot)?;
        let state = r.state.load(Ordering::Acquire);
        match (state, status) {
            (REPORT_DONE, ChildExit::Exited(0)) => {
                self.reported = true;
                Ok(ImageSummary {
                    chunks: r.chunks,
                    data_bytes: r.data_bytes,
                    file_bytes: r.file_bytes,
                })
            }
            (REPORT_IO_ERROR, _) => Err(Error::Image(ImageError::Io {
                offset: r.offset,
                source: io::Error::from_raw_os_error(r.errno),
            })),
            (REPORT_REFUSED, _) => Err(Error::Snapshot(io::Error::other(format!(
                "snapshot child {} could not write its image (not an I/O error)",
                child.pid
            )))),
            (_, ChildExit::Exited(code)) => Err(Error::Snapshot(io::Error::other(format!(
                "snapshot child {} exited with status {code} without finishing its image",
                child.pid
            )))),
            (_, ChildExit::Signaled(sig)) => Err(Error::Snapshot(io::Error::other(format!(
                "snapshot child {} was killed by signal {sig} before finishing its image",
                child.pid
            )))),
        }
    }
}

impl Drop for ForkSnapshot {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            if !self.reported {
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
            }
            let _ = reap(&child);
        }
    }
}

/// Blocks until `ready` (the child's eventfd) or the child's pidfd is readable: the child
/// reported, or it is gone without reporting.
fn wait_report_or_exit(ready: libc::c_int, child: &Child) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: ready,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: child.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll reads and writes the two pollfd entries of `fds`, which it is given
        // the length of.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n > 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if n < 0 && err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
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

/// Clones the process with every signal blocked (restored in the parent; the child keeps
/// them blocked so that no application handler ever runs in it, and a broken pipe or a file
/// size limit is an error rather than a signal).
fn spawn(
    extents: &[Extent],
    writer: &mut ImageWriter<ImageFile>,
    report: *mut ChildReport,
    ready: libc::c_int,
    flavor: CloneFlavor,
) -> io::Result<Child> {
    let writer: *mut ImageWriter<ImageFile> = writer;
    // Read before the clone: the child must not be the first to initialise anything.
    let page = page_size();
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
        // and only runs allocation-free, lock-free code on memory prepared before the clone.
        ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::addr_of_mut!(args),
                size_of::<CloneArgs>(),
            )
        };
        if ret == 0 {
            child_main(extents, page, writer, report, ready);
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
            child_main(extents, page, writer, report, ready);
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

/// The whole life of the snapshot child: start the touch-ahead thread, write the extents as
/// chunks and the footer through the writer, report, wake the parent, exit. Nothing here
/// allocates or frees, and nothing is dropped: every path ends in `_exit`, which also skips
/// atexit handlers and destructors (the parent's) and ends the touch-ahead thread.
fn child_main(
    extents: &[Extent],
    page: usize,
    writer: *mut ImageWriter<ImageFile>,
    report: *mut ChildReport,
    ready: libc::c_int,
) -> ! {
    let plan = TouchPlan {
        extents: extents.as_ptr(),
        count: extents.len(),
        page,
    };
    start_touch_ahead(&plan);
    // SAFETY: `writer` and `report` point into this process's copy-on-write image of the
    // parent (a live writer the parent lent us, and the shared report page), and nothing else
    // runs in this process but the touch-ahead thread, which only reads the extents' memory.
    // The extents describe memory that was mapped readable at the clone (tracked areas,
    // checked by the caller), so this copy of it is mapped too.
    unsafe {
        let w = &mut *writer;
        let r = &mut *report;
        let pieces = extents.iter().map(|e| {
            let data = std::slice::from_raw_parts(e.addr as *const u8, e.len);
            (e.area, e.offset, data)
        });
        let outcome = w.chunks(pieces).and_then(|()| w.finish_in_place());
        let (state, status) = match &outcome {
            Ok(summary) => {
                r.chunks = summary.chunks;
                r.data_bytes = summary.data_bytes;
                r.file_bytes = summary.file_bytes;
                (REPORT_DONE, 0)
            }
            Err(ImageError::Io { offset, source }) => {
                r.errno = source.raw_os_error().unwrap_or(libc::EIO);
                r.offset = *offset;
                (REPORT_IO_ERROR, CHILD_EXIT_WRITE_FAILED)
            }
            Err(_) => (REPORT_REFUSED, CHILD_EXIT_WRITE_FAILED),
        };
        r.state.store(state, Ordering::Release);
        // The report is complete: let the parent commit while this process is torn down. A
        // failed wake-up costs nothing but that overlap (the parent also watches the pidfd).
        let one: u64 = 1;
        libc::write(ready, std::ptr::addr_of!(one).cast(), size_of::<u64>());
        libc::_exit(status)
    }
}

/// What the touch-ahead thread reads: the extents, in the writer's order.
#[repr(C)]
struct TouchPlan {
    extents: *const Extent,
    count: usize,
    page: usize,
}

/// Starts a thread of the child that reads one byte of every page of the extents, ahead of the
/// writer. A clone marks every page table entry it copies "old", and the first access to each
/// page then has the MMU set its accessed bit: cheap on bare metal, but on a virtual machine
/// this costs about 0.6 µs a page (40 ms per 256 MiB, measured), which the writer (checksums
/// and copies, about 1.7 µs a page) would otherwise pay in line. The thread pays it on another
/// CPU instead. Where no thread can be started the writer pays it itself, as before.
///
/// Only raw system calls (`mmap`, `clone`): nothing that allocates or locks. The stack is
/// never freed; `_exit` ends the process and the thread with it.
fn start_touch_ahead(plan: &TouchPlan) {
    // SAFETY: a fresh private anonymous mapping in this (child) process; no existing memory is
    // affected.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TOUCH_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return;
    }
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM;
    // SAFETY: glibc's clone runs `touch_ahead` on the new stack (its top, which is 16-byte
    // aligned: mmap returns a page-aligned block of TOUCH_STACK bytes) in a thread of this
    // process, with every signal blocked (inherited). `plan` lives in `child_main`'s frame,
    // which never returns (it ends in `_exit`), so it outlives the thread. The thread uses no
    // thread-local state (it shares this thread's TLS pointer, having none of its own) and
    // ends with the plain exit system call when `touch_ahead` returns.
    unsafe {
        libc::clone(
            touch_ahead,
            stack.cast::<u8>().add(TOUCH_STACK).cast(),
            flags,
            std::ptr::from_ref(plan).cast_mut().cast(),
        );
    }
}

/// The touch-ahead thread: one volatile read per page of every extent, in order.
extern "C" fn touch_ahead(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the TouchPlan that `start_touch_ahead` was given, alive until the
    // process exits; its extents array is the child's copy-on-write copy of the parent's,
    // and each extent describes memory mapped readable at the clone (so in this process too).
    unsafe {
        let plan = &*arg.cast::<TouchPlan>();
        let page = plan.page.max(1);
        for i in 0..plan.count {
            let e = &*plan.extents.add(i);
            let end = e.addr.saturating_add(e.len);
            let mut at = e.addr;
            while at < end {
                std::ptr::read_volatile(at as *const u8);
                at = vm::align_down(at, page).saturating_add(page);
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(i: usize) -> u8 {
        u8::try_from(i % 251).expect("below 251")
    }

    const APP: &str = "snapshot-test";

    fn header(page: usize) -> ckpt::ImageHeader {
        ckpt::ImageHeader {
            app: APP.into(),
            stream: 0,
            seq: 1,
            parent: None,
            created_unix_ns: 0,
            page_size: u32::try_from(page).expect("page size fits"),
            regions: vec![ckpt::RegionDesc {
                id: 0,
                base: 0,
                len: 8 * page as u64,
            }],
        }
    }

    fn child_writes_the_image(flavor: CloneFlavor) {
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
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            ckpt::Store::open(dir.path(), APP, ckpt::StorePolicy::default()).expect("open store");
        let mut pending = store.begin(&header(page)).expect("begin");
        let mut snap = ForkSnapshot::start(&extents, pending.writer(), flavor).expect("clone");
        // Writes after the clone must not show in the image.
        data.iter_mut().for_each(|b| *b = 0xEE);
        let summary = snap.finish().expect("the child finishes its image");
        assert_eq!(summary.data_bytes, 2 * page as u64 + 100);
        pending.commit_finished(&summary).expect("commit");
        let mut got = vec![0u8; 8 * page];
        let recovered = store
            .recover(&mut |_h, _region, offset, bytes| {
                let at = usize::try_from(offset).expect("small offset");
                got[at..at + bytes.len()].copy_from_slice(bytes);
            })
            .expect("recover")
            .expect("an image");
        assert_eq!(recovered.seq, 1);
        let expected: Vec<u8> = (0..8 * page)
            .map(|i| {
                if (page..3 * page).contains(&i) || (6 * page..6 * page + 100).contains(&i) {
                    pattern(i)
                } else {
                    0
                }
            })
            .collect();
        assert!(got == expected, "the image holds the pages as they were");
    }

    #[test]
    fn clone3_child_writes_the_pages_as_they_were() {
        child_writes_the_image(CloneFlavor::Clone3);
    }

    #[test]
    fn legacy_clone_child_writes_the_pages_as_they_were() {
        child_writes_the_image(CloneFlavor::Clone);
    }

    #[test]
    fn a_failed_write_in_the_child_comes_back_as_that_io_error() {
        let page = page_size();
        // More than a pipe holds: should another test's snapshot child hold a copy of the read
        // end for a moment, the write blocks until it is gone instead of succeeding.
        let data = vec![3u8; 1 << 20];
        let extents = [Extent {
            area: 0,
            offset: 0,
            len: data.len(),
            addr: data.as_ptr() as usize,
        }];
        // A pipe whose read end is closed before the clone: the header fits in the pipe, the
        // child's chunks then fail with EPIPE (its signals are blocked, so no SIGPIPE).
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two fds into the array, which holds two.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are new and owned by nothing else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let file = std::fs::File::from(write_end);
        let mut h = header(page);
        h.regions[0].len = data.len() as u64;
        let mut writer = ImageWriter::new(ImageFile::new(file), &h).expect("header");
        drop(read_end);
        let mut snap =
            ForkSnapshot::start(&extents, &mut writer, CloneFlavor::Clone3).expect("clone");
        match snap.finish() {
            Err(Error::Image(ImageError::Io { source, .. })) => {
                assert_eq!(source.raw_os_error(), Some(libc::EPIPE), "{source}");
            }
            other => panic!("expected the child's EPIPE, got {other:?}"),
        }
    }

    #[test]
    fn a_finished_child_is_reaped_when_its_snapshot_is_dropped() {
        let page = page_size();
        let data: Vec<u8> = (0..64 * page).map(pattern).collect();
        let extents = [Extent {
            area: 0,
            offset: 0,
            len: data.len(),
            addr: data.as_ptr() as usize,
        }];
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            ckpt::Store::open(dir.path(), APP, ckpt::StorePolicy::default()).expect("open store");
        let mut h = header(page);
        h.regions[0].len = data.len() as u64;
        let mut pending = store.begin(&h).expect("begin");
        let mut snap =
            ForkSnapshot::start(&extents, pending.writer(), CloneFlavor::Clone3).expect("clone");
        let pid = snap.pid().expect("pid");
        let summary = snap.finish().expect("the child finishes its image");
        assert_eq!(summary.data_bytes, data.len() as u64);
        // Committed on the report alone, before the child is reaped.
        pending.commit_finished(&summary).expect("commit");
        drop(snap);
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "snapshot child {pid} still exists (not reaped)");
        let recovered = store
            .recover(&mut |_h, _region, _offset, _bytes| {})
            .expect("recover")
            .expect("an image");
        assert_eq!(recovered.seq, 1);
    }

    #[test]
    fn dropping_an_unfinished_snapshot_kills_and_reaps_the_child() {
        let big = vec![7u8; 8 << 20];
        let extents = [Extent {
            area: 0,
            offset: 0,
            len: big.len(),
            addr: big.as_ptr() as usize,
        }];
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            ckpt::Store::open(dir.path(), APP, ckpt::StorePolicy::default()).expect("open store");
        let mut h = header(page_size());
        h.regions[0].len = big.len() as u64;
        let mut pending = store.begin(&h).expect("begin");
        let snap =
            ForkSnapshot::start(&extents, pending.writer(), CloneFlavor::Clone3).expect("clone");
        let pid = snap.pid().expect("pid");
        drop(snap);
        // Reaped: the pid no longer names a process of ours (or a zombie).
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "snapshot child {pid} still exists");
        pending.abort();
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
