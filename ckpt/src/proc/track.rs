//! Write tracking between dumps of one process: a userfaultfd created inside the target (one
//! injected call), taken out with pidfd_getfd and closed there, so the target sees no extra
//! descriptor; its writable private mappings registered for write-protect in asynchronous mode
//! (the kernel resolves each first write itself and only clears the page's protection), read
//! back and re-armed by PAGEMAP_SCAN on /proc/PID/pagemap. Owns what an increment needs from
//! the previous image; it must never let an increment be written on a parent whose written
//! pages were not all tracked (any doubt means a full image).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use super::meta::{FileSnapshot, Mapping};
use super::ptrace::Tracee;
use crate::image::RegionDesc;

/// `userfaultfd` flag: handle user-mode faults only (allowed without privilege).
const UFFD_USER_MODE_ONLY: u64 = 1;
/// The userfaultfd API version.
const UFFD_API: u64 = 0xAA;
/// Feature: write-protect faults are resolved by the kernel (no reader needed).
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Feature: pages never populated are protected too (required for PAGEMAP_SCAN's
/// write-protect on anonymous memory).
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `uffdio_register.mode`: track writes.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `uffdio_writeprotect.mode`: set the protection.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// The image the next increment builds on, and the layout it was taken with: an increment is
/// only written when the layout is exactly the same (the store's chains need the same regions
/// in every image, and tracking is per address).
#[derive(Debug, Clone)]
pub(super) struct Parent {
    pub seq: u64,
    pub regions: Vec<RegionDesc>,
    /// The mappings with their data runs cleared.
    pub layout: Vec<Mapping>,
    pub files: Vec<FileSnapshot>,
}

/// What incremental dumps of one process keep between dumps (see `dump_incremental`). Holding
/// it keeps the target's write tracking alive; dropping it ends the tracking (the kernel then
/// unregisters the target's memory).
#[derive(Debug)]
pub struct Tracker {
    pub(super) pid: i32,
    /// Start time of the process (clock ticks after boot), so a reused pid is noticed.
    pub(super) start_time: Option<u64>,
    pub(super) uffd: Option<OwnedFd>,
    /// Mapping ranges registered for write tracking.
    pub(super) tracked: Vec<(u64, u64)>,
    pub(super) parent: Option<Parent>,
    /// Why write tracking is not possible for this process (then every dump is full).
    pub(super) disabled: Option<String>,
    /// The staging buffer of the previous dump, kept backed for the next one (see dump.rs).
    pub(super) staging: Staging,
}

/// A reusable buffer; its Debug shows only its size.
#[derive(Default)]
pub(super) struct Staging(pub Vec<u8>);

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staging({} bytes)", self.0.len())
    }
}

impl Tracker {
    /// A tracker for process `pid`; its first dump is full and starts the tracking.
    pub fn new(pid: i32) -> Tracker {
        Tracker {
            pid,
            start_time: start_time(pid),
            uffd: None,
            tracked: Vec::new(),
            parent: None,
            disabled: None,
            staging: Staging::default(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The image the next dump would be an increment against, if it can be one.
    pub fn parent(&self) -> Option<u64> {
        self.parent.as_ref().map(|p| p.seq)
    }

    /// Why write tracking is unavailable for this process, when it is.
    pub fn disabled(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    /// Starts a dump of `pid`: hands out the parent (the tracker forgets it until the dump
    /// commits, so a failed dump makes the next one full) after checking this still is the
    /// process it tracked.
    pub(super) fn take_parent(&mut self, pid: i32) -> Option<Parent> {
        let now = start_time(pid);
        if pid != self.pid || now != self.start_time {
            *self = Tracker::new(pid);
        }
        self.parent.take()
    }

    /// True when `[start, end)` was registered for write tracking.
    pub(super) fn is_tracked(&self, start: u64, end: u64) -> bool {
        self.tracked.iter().any(|&(s, e)| s <= start && end <= e)
    }

    /// Registers `ranges` (the writable private mappings, while the target is stopped) for
    /// write-protect tracking and protects all their pages, creating the userfaultfd first if
    /// there is none yet. A range the kernel refuses (already registered elsewhere, a special
    /// kind of memory) is left untracked: increments then copy it whole.
    pub(super) fn arm(
        &mut self,
        main: &mut Tracee,
        syscall_ip: u64,
        ranges: &[(u64, u64)],
    ) -> Result<(), String> {
        if let Some(reason) = &self.disabled {
            return Err(reason.clone());
        }
        if self.uffd.is_none() {
            match create_uffd(main, syscall_ip, self.pid) {
                Ok(fd) => self.uffd = Some(fd),
                Err(reason) => {
                    self.disabled = Some(reason.clone());
                    return Err(reason);
                }
            }
        }
        let uffd = self.uffd.as_ref().expect("created just above").as_raw_fd();
        self.tracked.clear();
        for &(start, end) in ranges {
            if register(uffd, start, end).is_ok() && protect(uffd, start, end).is_ok() {
                self.tracked.push((start, end));
            }
        }
        Ok(())
    }
}

/// Field 22 of `/proc/PID/stat` (start time), None when unreadable.
fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    // Field n (1-based) is the (n - 3)th after the command name.
    after.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Creates a userfaultfd in the target by an injected call, takes a copy with pidfd_getfd,
/// closes the target's, and enables asynchronous write-protect on the copy.
fn create_uffd(main: &mut Tracee, ip: u64, pid: i32) -> Result<OwnedFd, String> {
    let base = u64::from((libc::O_CLOEXEC | libc::O_NONBLOCK).cast_unsigned());
    let mut r = main
        .inject(ip, libc::SYS_userfaultfd, &[base | UFFD_USER_MODE_ONLY])
        .map_err(|e| e.to_string())?;
    if r == -i64::from(libc::EINVAL) {
        // Kernels before 5.11 do not know UFFD_USER_MODE_ONLY.
        r = main
            .inject(ip, libc::SYS_userfaultfd, &[base])
            .map_err(|e| e.to_string())?;
    }
    if r < 0 {
        return Err(format!(
            "userfaultfd in the target failed: {}",
            Errno::from_raw(i32::try_from(-r).unwrap_or(libc::EINVAL))
        ));
    }
    let target_fd = i32::try_from(r).map_err(|_| format!("userfaultfd returned {r}"))?;
    let taken = take_fd(pid, target_fd);
    let closed = main.inject(ip, libc::SYS_close, &[u64::from(target_fd.cast_unsigned())]);
    let fd = taken?;
    closed.map_err(|e| format!("closing the target's userfaultfd: {e}"))?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a uffdio_api that lives for the call; `fd` is open.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    if ret < 0 {
        return Err(format!(
            "UFFDIO_API with WP_ASYNC and WP_UNPOPULATED: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

/// A copy of descriptor `fd` of process `pid` (pidfd_open + pidfd_getfd).
fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd, String> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = i32::try_from(pidfd)
        .ok()
        .filter(|f| *f >= 0)
        .ok_or_else(|| format!("pidfd_open: {}", std::io::Error::last_os_error()))?;
    // SAFETY: `pidfd` is a new descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd takes integers and returns a new descriptor or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    let got = i32::try_from(got)
        .ok()
        .filter(|f| *f >= 0)
        .ok_or_else(|| format!("pidfd_getfd: {}", std::io::Error::last_os_error()))?;
    // SAFETY: `got` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

fn register(uffd: i32, start: u64, end: u64) -> std::io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start,
            len: end - start,
        },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register that lives for the call; it
    // only changes how the target's kernel handles write faults in the range (asynchronously).
    let ret = unsafe { libc::ioctl(uffd, UFFDIO_REGISTER, &mut reg as *mut UffdioRegister) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn protect(uffd: i32, start: u64, end: u64) -> std::io::Result<()> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange {
            start,
            len: end - start,
        },
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads a uffdio_writeprotect that lives for the call; in
    // async mode a protected page still takes writes (the kernel only records them).
    let ret = unsafe {
        libc::ioctl(
            uffd,
            UFFDIO_WRITEPROTECT,
            &mut wp as *mut UffdioWriteprotect,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
