//! Kernel UAPI definitions that the `libc` crate lacks: userfaultfd write-protect
//! (`linux/userfaultfd.h`), the PAGEMAP_SCAN ioctl (`linux/fs.h`) and `clone3` arguments.
//!
//! Layouts are copied from the kernel headers and checked by size assertions in the tests below;
//! this module only declares, it never issues a system call.

/// `_IOWR(ty, nr, size)` from `asm-generic/ioctl.h`.
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    const IOC_READ_WRITE: u64 = 3;
    (IOC_READ_WRITE << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// The userfaultfd API version (`UFFD_API`).
pub(crate) const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: handle faults from user mode only (allowed for unprivileged users
/// even when `vm.unprivileged_userfaultfd` is 0).
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// Write-protect faults are resolved by the kernel itself, which only records that the page
/// was written (read back with PAGEMAP_SCAN).
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Write-protecting a range also covers pages that were never populated.
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `uffdio_register.mode`: track writes (write-protect mode).
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `uffdio_writeprotect.mode`: set the protection (clear it when absent).
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const UFFDIO: u8 = 0xAA;
/// `UFFDIO_API`: the handshake that enables features.
pub(crate) const UFFDIO_API: u64 = iowr(UFFDIO, 0x3F, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`: attach a range to the userfaultfd.
pub(crate) const UFFDIO_REGISTER: u64 = iowr(UFFDIO, 0x00, size_of::<UffdioRegister>());
/// `UFFDIO_WRITEPROTECT`: (un)protect a registered range.
pub(crate) const UFFDIO_WRITEPROTECT: u64 = iowr(UFFDIO, 0x06, size_of::<UffdioWriteprotect>());

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioApi {
    /// Must be [`UFFD_API`].
    pub api: u64,
    /// Requested features in, granted features out.
    pub features: u64,
    /// Supported ioctls (out).
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    /// Page-aligned start address.
    pub start: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRegister {
    /// The range to register.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// Ioctls usable on the range (out).
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioWriteprotect {
    /// The range to (un)protect.
    pub range: UffdioRange,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

/// `PAGEMAP_SCAN` on `/proc/self/pagemap`.
pub(crate) const PAGEMAP_SCAN: u64 = iowr(b'f', 16, size_of::<PmScanArg>());
/// Write-protect the pages that match, atomically with reporting them.
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail unless every VMA in the range is registered with userfaultfd WP_ASYNC.
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Page category: written since it was last write-protected.
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `struct page_region`: a run of pages with the same categories.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRegion {
    /// First address of the run.
    pub start: u64,
    /// End address of the run (exclusive).
    pub end: u64,
    /// The run's categories, masked by `return_mask`.
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PmScanArg {
    /// `size_of::<PmScanArg>()`.
    pub size: u64,
    /// `PM_SCAN_*`.
    pub flags: u64,
    /// Start of the range to walk.
    pub start: u64,
    /// End of the range to walk (exclusive).
    pub end: u64,
    /// Where the walk stopped (out): `end` when it finished.
    pub walk_end: u64,
    /// Address of a `PageRegion` array.
    pub vec: u64,
    /// Length of that array.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories whose meaning is inverted.
    pub category_inverted: u64,
    /// All of these categories must be present.
    pub category_mask: u64,
    /// At least one of these must be present.
    pub category_anyof_mask: u64,
    /// Categories reported in `PageRegion::categories`.
    pub return_mask: u64,
}

/// `CLONE_PIDFD`: return a pidfd for the child.
pub(crate) const CLONE_PIDFD: u64 = 0x1000;

/// `struct clone_args` (size version 2, 88 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CloneArgs {
    /// `CLONE_*` flags.
    pub flags: u64,
    /// Address of an `int` receiving the pidfd (with `CLONE_PIDFD`).
    pub pidfd: u64,
    /// `CLONE_CHILD_SETTID` target.
    pub child_tid: u64,
    /// `CLONE_PARENT_SETTID` target.
    pub parent_tid: u64,
    /// Signal sent to the parent when the child exits; 0 sends none.
    pub exit_signal: u64,
    /// Child stack (0: share the parent's, copied on write).
    pub stack: u64,
    /// Child stack size.
    pub stack_size: u64,
    /// TLS for `CLONE_SETTLS`.
    pub tls: u64,
    /// PID selection (unused).
    pub set_tid: u64,
    /// PID selection (unused).
    pub set_tid_size: u64,
    /// Target cgroup fd (unused).
    pub cgroup: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_headers() {
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRange>(), 16);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(size_of::<PageRegion>(), 24);
        assert_eq!(size_of::<PmScanArg>(), 96);
        assert_eq!(size_of::<CloneArgs>(), 88);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // The UFFDIO values are what a C program including <linux/userfaultfd.h> prints;
        // PAGEMAP_SCAN is _IOWR('f', 16, struct pm_scan_arg) from <linux/fs.h> (6.7+).
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }
}
