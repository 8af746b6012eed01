//! What `/proc/PID` says about a process: its threads, memory map, descriptors, mm fields,
//! and which pages hold data (the PAGEMAP_SCAN ioctl). Read-only: it must never change the
//! process, and never panic on a line it does not understand (that is a `ProcfsFormat` error).

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

use super::ProcError;
use super::meta::{FdKind, FdState, MmLayout, PROT_R, PROT_W, PROT_X};

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ProcError + '_ {
    move |source| ProcError::Procfs {
        path: path.to_owned(),
        source,
    }
}

fn format_err(path: &Path, reason: impl Into<String>) -> ProcError {
    ProcError::ProcfsFormat {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn proc_path(pid: Pid, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

/// Maps "no such file" under /proc/PID to "the process is gone".
fn gone_or(pid: Pid, path: &Path) -> impl FnOnce(io::Error) -> ProcError + '_ {
    move |source| {
        if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
            ProcError::Exited { pid: pid.as_raw() }
        } else {
            io_err(path)(source)
        }
    }
}

/// Thread ids of `pid`.
pub fn tasks(pid: Pid) -> Result<Vec<i32>, ProcError> {
    let path = proc_path(pid, "task");
    let mut tids = Vec::new();
    for e in fs::read_dir(&path).map_err(gone_or(pid, &path))? {
        let e = e.map_err(gone_or(pid, &path))?;
        if let Some(t) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(t);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    pub prot: u8,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

impl MapsLine {
    pub fn is_special(&self) -> bool {
        matches!(
            self.path.as_str(),
            "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]"
        )
    }
}

pub fn parse_maps(text: &str, path: &Path) -> Result<Vec<MapsLine>, ProcError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || format_err(path, format!("unparsable maps line {line:?}"));
        let mut rest = line;
        let mut field = || -> Option<&str> {
            let t = rest.trim_start();
            let end = t.find(' ').unwrap_or(t.len());
            let (f, r) = t.split_at(end);
            rest = r;
            (!f.is_empty()).then_some(f)
        };
        let range = field().ok_or_else(bad)?;
        let perms = field().ok_or_else(bad)?.as_bytes().to_vec();
        let offset = field().ok_or_else(bad)?;
        let _dev = field().ok_or_else(bad)?;
        let inode = field().ok_or_else(bad)?;
        let (s, e) = range.split_once('-').ok_or_else(bad)?;
        let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| bad());
        if perms.len() != 4 {
            return Err(bad());
        }
        let mut prot = 0;
        if perms[0] == b'r' {
            prot |= PROT_R;
        }
        if perms[1] == b'w' {
            prot |= PROT_W;
        }
        if perms[2] == b'x' {
            prot |= PROT_X;
        }
        out.push(MapsLine {
            start: hex(s)?,
            end: hex(e)?,
            prot,
            shared: perms[3] == b's',
            offset: hex(offset)?,
            inode: inode.parse().map_err(|_| bad())?,
            path: rest.trim_start().to_owned(),
        });
    }
    Ok(out)
}

pub fn maps(pid: Pid) -> Result<Vec<MapsLine>, ProcError> {
    let path = proc_path(pid, "maps");
    let text = fs::read_to_string(&path).map_err(gone_or(pid, &path))?;
    parse_maps(&text, &path)
}

/// The mm fields of `/proc/PID/stat` (only shown to a process allowed to ptrace it). `brk`
/// is left 0: only the process itself can tell it (see the dump's injected `brk(0)`).
pub fn mm_layout(pid: Pid) -> Result<MmLayout, ProcError> {
    let path = proc_path(pid, "stat");
    let text = fs::read_to_string(&path).map_err(gone_or(pid, &path))?;
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| format_err(&path, "no ')' after the command name"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field n (1-based, man 5 proc) is fields[n - 3].
    let f = |n: usize| -> Result<u64, ProcError> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format_err(&path, format!("field {n} missing or not a number")))
    };
    Ok(MmLayout {
        start_code: f(26)?,
        end_code: f(27)?,
        start_stack: f(28)?,
        start_data: f(45)?,
        end_data: f(46)?,
        start_brk: f(47)?,
        brk: 0,
        arg_start: f(48)?,
        arg_end: f(49)?,
        env_start: f(50)?,
        env_end: f(51)?,
    })
}

/// True when the process is a zombie (it exited and waits to be reaped).
pub fn is_zombie(pid: Pid) -> bool {
    fs::read_to_string(proc_path(pid, "stat"))
        .ok()
        .and_then(|t| {
            t.rfind(')')
                .map(|i| t[i + 1..].trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(false)
}

pub fn comm(pid: Pid) -> Result<String, ProcError> {
    let path = proc_path(pid, "comm");
    Ok(fs::read_to_string(&path)
        .map_err(gone_or(pid, &path))?
        .trim_end()
        .to_owned())
}

pub fn link(pid: Pid, name: &str) -> Result<String, ProcError> {
    let path = proc_path(pid, name);
    let target = fs::read_link(&path).map_err(gone_or(pid, &path))?;
    Ok(target.to_string_lossy().into_owned())
}

pub fn auxv(pid: Pid) -> Result<Vec<u8>, ProcError> {
    let path = proc_path(pid, "auxv");
    fs::read(&path).map_err(gone_or(pid, &path))
}

/// Character devices that hold no per-open state worth keeping: reopening them is exact.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// The open descriptors of `pid`, in fd order.
pub fn fds(pid: Pid) -> Result<Vec<FdState>, ProcError> {
    let dir = proc_path(pid, "fd");
    let mut nums: Vec<i32> = Vec::new();
    for e in fs::read_dir(&dir).map_err(gone_or(pid, &dir))? {
        let e = e.map_err(gone_or(pid, &dir))?;
        if let Some(n) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            nums.push(n);
        }
    }
    nums.sort_unstable();
    let mut out = Vec::new();
    for fd in nums {
        let link_path = dir.join(fd.to_string());
        let target = match fs::read_link(&link_path) {
            Ok(t) => t.to_string_lossy().into_owned(),
            // Closed since the listing (another thread is stopped too, so only at exit).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&link_path)(e)),
        };
        let info_path = proc_path(pid, &format!("fdinfo/{fd}"));
        let info = match fs::read_to_string(&info_path) {
            Ok(i) => i,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&info_path)(e)),
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .ok_or_else(|| format_err(&info_path, format!("no {name} line")))
        };
        let pos: u64 = field("pos:")?
            .parse()
            .map_err(|_| format_err(&info_path, "pos is not a number"))?;
        let flags = u32::from_str_radix(field("flags:")?, 8)
            .map_err(|_| format_err(&info_path, "flags are not octal"))?
            .cast_signed();
        let meta = fs::metadata(&link_path).ok();
        let (dev, ino) = meta.as_ref().map_or((0, 0), |m| (m.dev(), m.ino()));
        let ft = meta.as_ref().map(|m| m.mode() & libc::S_IFMT);
        let kind = if target.starts_with("pipe:") {
            FdKind::Pipe { target }
        } else if target.starts_with("socket:") {
            FdKind::Socket { target }
        } else if !target.starts_with('/') || target.ends_with(" (deleted)") {
            FdKind::Other { target }
        } else {
            match ft {
                Some(libc::S_IFREG) => FdKind::File { path: target },
                Some(libc::S_IFDIR) => FdKind::Directory { path: target },
                Some(libc::S_IFCHR) if STATELESS_DEVICES.contains(&target.as_str()) => {
                    FdKind::Device { path: target }
                }
                _ => FdKind::Other { target },
            }
        };
        out.push(FdState {
            fd,
            kind,
            flags,
            pos,
            dev,
            ino,
            excluded: false,
        });
    }
    Ok(out)
}

/// PAGEMAP_SCAN definitions (`linux/fs.h`, 6.7+). libft/src/critical/uapi.rs has the same for
/// its own process; duplicated here (a handful of constants) until they move to one place.
mod uapi {
    /// `_IOWR('f', 16, struct pm_scan_arg)`.
    pub const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
    /// Write-protect the pages that match, atomically with reporting them.
    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    /// Fail unless every mapping in the range is registered for async write-protect.
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    pub const PAGE_IS_FILE: u64 = 1 << 2;
    pub const PAGE_IS_PRESENT: u64 = 1 << 3;
    pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
    pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PageRegion {
        pub start: u64,
        pub end: u64,
        pub categories: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PmScanArg {
        pub size: u64,
        pub flags: u64,
        pub start: u64,
        pub end: u64,
        pub walk_end: u64,
        pub vec: u64,
        pub vec_len: u64,
        pub max_pages: u64,
        pub category_inverted: u64,
        pub category_mask: u64,
        pub category_anyof_mask: u64,
        pub return_mask: u64,
    }
}

/// Runs of pages one PAGEMAP_SCAN call reports at most.
const SCAN_VEC_LEN: usize = 512;

/// Which pages of the process hold data of their own.
#[derive(Debug)]
pub struct Pagemap {
    file: fs::File,
    path: PathBuf,
}

impl Pagemap {
    pub fn open(pid: Pid) -> Result<Pagemap, ProcError> {
        let path = proc_path(pid, "pagemap");
        let file = fs::File::open(&path).map_err(gone_or(pid, &path))?;
        Ok(Pagemap { file, path })
    }

    /// Page runs in `start..end` written since they were last write-protected, protected
    /// again as they are reported (so the next call reports only later writes). Fails unless
    /// the whole range is registered for asynchronous write-protect.
    pub fn written_runs(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>, ProcError> {
        use uapi::*;
        self.scan(
            start,
            end,
            PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            0,
            PAGE_IS_WRITTEN,
            0,
        )
    }

    /// Page runs in `start..end` that hold data: present or swapped out; with `anon_only`,
    /// only anonymous pages (a private file mapping's copied-on-write pages, not the file's
    /// own page cache), and never the shared zero page.
    pub fn data_runs(
        &self,
        start: u64,
        end: u64,
        anon_only: bool,
    ) -> Result<Vec<(u64, u64)>, ProcError> {
        use uapi::*;
        let excluded = if anon_only {
            PAGE_IS_FILE | PAGE_IS_PFNZERO
        } else {
            PAGE_IS_PFNZERO
        };
        self.scan(
            start,
            end,
            0,
            excluded,
            excluded,
            PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        )
    }

    /// One PAGEMAP_SCAN walk of `start..end`: runs of pages that have every category of `all`
    /// (those of `inverted` counted as absent) and, when `any` is not 0, one of `any`.
    fn scan(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        inverted: u64,
        all: u64,
        any: u64,
    ) -> Result<Vec<(u64, u64)>, ProcError> {
        use uapi::*;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut vec = vec![PageRegion::default(); SCAN_VEC_LEN];
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                flags,
                start: at,
                end,
                vec: vec.as_mut_ptr() as u64,
                vec_len: SCAN_VEC_LEN as u64,
                category_inverted: inverted,
                category_mask: all,
                category_anyof_mask: any,
                return_mask: all | any,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most vec_len PageRegions into
            // `vec` (alive, of that length) and `walk_end` into `arg`; the fd is open.
            let n = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN,
                    &mut arg as *mut PmScanArg,
                )
            };
            if n < 0 {
                return Err(io_err(&self.path)(io::Error::last_os_error()));
            }
            let n = usize::try_from(n).unwrap_or(0).min(SCAN_VEC_LEN);
            for r in &vec[..n] {
                match runs.last_mut() {
                    Some(last) if last.1 == r.start => last.1 = r.end,
                    _ => runs.push((r.start, r.end)),
                }
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let text = "55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]\n\
                    7f1e2c000000-7f1e2c021000 r-xs 00001000 fe:01 1234   /usr/lib/a b.so\n\
                    7ffd1000-7ffd2000 ---p 00000000 00:00 0 \n";
        let m = parse_maps(text, Path::new("maps")).unwrap_or_default();
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].prot, m[0].shared, m[0].path.as_str()),
            (3, false, "[heap]")
        );
        assert_eq!(
            (m[1].prot, m[1].shared, m[1].offset, m[1].inode),
            (5, true, 0x1000, 1234)
        );
        assert_eq!(m[1].path, "/usr/lib/a b.so");
        assert_eq!((m[2].prot, m[2].path.as_str()), (0, ""));
        assert!(parse_maps("zz-1 rw-p 0 0 0", Path::new("maps")).is_err());
    }
}
