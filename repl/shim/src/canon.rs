//! Canonical absolute paths for descriptors and for the entries that path-based calls name.
//!
//! Owns "where is this, really": the kernel's own answer (readlink of /proc/self/fd/N,
//! getcwd), never a lexical guess. Everything works in stack buffers: no allocation, no lock,
//! and every syscall is raw so no wrapper of ours is re-entered.

use std::ffi::CStr;

use libc::c_int;

/// Room for a canonical directory (PATH_MAX) plus one final name (NAME_MAX) and a slash.
pub(crate) const CANON_BYTES: usize = 4096 + 256 + 8;

/// A canonical absolute path in a stack buffer.
pub(crate) struct Canon {
    buf: [u8; CANON_BYTES],
    len: usize,
}

impl std::fmt::Debug for Canon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl Canon {
    fn empty() -> Self {
        Self {
            buf: [0; CANON_BYTES],
            len: 0,
        }
    }

    /// The path's bytes (no NUL).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Appends one path component; `None` if it would not fit.
    fn push(&mut self, name: &[u8]) -> Option<()> {
        let slash = usize::from(self.as_bytes() != b"/");
        if self.len + slash + name.len() >= CANON_BYTES {
            return None;
        }
        if slash == 1 {
            self.buf[self.len] = b'/';
            self.len += 1;
        }
        self.buf[self.len..self.len + name.len()].copy_from_slice(name);
        self.len += name.len();
        Some(())
    }
}

/// Writes "/proc/self/fd/<fd>\0" into `out`, returning the C string.
fn proc_fd_name(fd: c_int, out: &mut [u8; 32]) -> Option<&CStr> {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    let fd = u32::try_from(fd).ok()?;
    let mut digits = [0u8; 10];
    let mut n = 0;
    let mut rest = fd;
    loop {
        digits[n] = b'0' + u8::try_from(rest % 10).ok()?;
        n += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out[..PREFIX.len()].copy_from_slice(PREFIX);
    for (i, d) in digits[..n].iter().rev().enumerate() {
        out[PREFIX.len() + i] = *d;
    }
    out[PREFIX.len() + n] = 0;
    CStr::from_bytes_with_nul(&out[..=PREFIX.len() + n]).ok()
}

/// Whether `fd` refers to an inode with no links left (deleted, or an O_TMPFILE file).
fn unlinked(fd: c_int) -> bool {
    fstat(fd).is_some_and(|st| st.st_nlink == 0)
}

/// `fstat` through a raw syscall.
pub(crate) fn fstat(fd: c_int) -> Option<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is valid for writes of one `stat`; fstat fills it completely on success.
    let rc = unsafe { libc::syscall(libc::SYS_fstat, fd, st.as_mut_ptr()) };
    // SAFETY: rc == 0 means the kernel initialized `st`.
    (rc == 0).then(|| unsafe { st.assume_init() })
}

/// The canonical path of what `fd` refers to (a file or directory), or `None` for
/// anonymous objects (pipes, sockets), deleted entries, or if /proc is missing.
pub(crate) fn fd_path(fd: c_int) -> Option<Canon> {
    let mut name = [0u8; 32];
    let link = proc_fd_name(fd, &mut name)?;
    let mut out = Canon::empty();
    // SAFETY: `link` is NUL-terminated and `out.buf` is valid for CANON_BYTES bytes.
    let n = unsafe {
        libc::syscall(
            libc::SYS_readlinkat,
            libc::AT_FDCWD,
            link.as_ptr(),
            out.buf.as_mut_ptr(),
            CANON_BYTES,
        )
    };
    let n = usize::try_from(n).ok()?;
    if n == 0 || n >= CANON_BYTES || out.buf[0] != b'/' {
        return None;
    }
    out.len = n;
    if out.as_bytes().ends_with(b" (deleted)") && unlinked(fd) {
        return None;
    }
    Some(out)
}

fn cwd_path() -> Option<Canon> {
    let mut out = Canon::empty();
    // SAFETY: `out.buf` is valid for CANON_BYTES bytes; the kernel NUL-terminates.
    let n = unsafe { libc::syscall(libc::SYS_getcwd, out.buf.as_mut_ptr(), CANON_BYTES) };
    let n = usize::try_from(n).ok()?;
    // The syscall returns the length including the NUL; an unreachable cwd starts with '('.
    if n < 2 || out.buf[0] != b'/' {
        return None;
    }
    out.len = n - 1;
    Some(out)
}

/// Opens `path` relative to `dirfd` with O_PATH, runs `f` on the descriptor, closes it.
fn with_opath<R>(dirfd: c_int, path: &CStr, flags: c_int, f: impl FnOnce(c_int) -> R) -> Option<R> {
    // SAFETY: `path` is NUL-terminated; O_PATH opens nothing for I/O and has no side effects.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            dirfd,
            path.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | flags,
        )
    };
    let fd = c_int::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    let result = f(fd);
    // SAFETY: `fd` was opened just above and is closed exactly once.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    Some(result)
}

/// The canonical path of the directory `dirfd` (or the cwd for AT_FDCWD).
fn dir_path(dirfd: c_int) -> Option<Canon> {
    if dirfd == libc::AT_FDCWD {
        cwd_path()
    } else {
        fd_path(dirfd)
    }
}

/// The canonical path of the directory entry that `path` (relative to `dirfd`) names,
/// without following a final symlink: the canonical parent plus the final name. `None` for
/// names like `.`/`..`, for an empty path, or when the parent cannot be resolved.
pub(crate) fn entry_path(dirfd: c_int, path: &CStr) -> Option<Canon> {
    let mut bytes = path.to_bytes();
    while bytes.len() > 1 && bytes.ends_with(b"/") {
        bytes = &bytes[..bytes.len() - 1];
    }
    if bytes.is_empty() || bytes == b"/" {
        return None;
    }
    let (dir, name) = match bytes.iter().rposition(|&b| b == b'/') {
        Some(cut) => (Some(&bytes[..cut]), &bytes[cut + 1..]),
        None => (None, bytes),
    };
    if name == b"." || name == b".." {
        return None;
    }
    let mut base = match dir {
        None => dir_path(dirfd)?,
        Some([]) => {
            let mut root = Canon::empty();
            root.buf[0] = b'/';
            root.len = 1;
            root
        }
        Some(dir) => {
            let mut z = [0u8; 4097];
            if dir.len() >= z.len() {
                return None;
            }
            z[..dir.len()].copy_from_slice(dir);
            let dir = CStr::from_bytes_until_nul(&z).ok()?;
            with_opath(dirfd, dir, libc::O_DIRECTORY, fd_path)??
        }
    };
    base.push(name)?;
    Some(base)
}

/// The canonical path of what `path` (relative to `dirfd`) refers to, following a final
/// symlink when `follow` is set (as chmod, truncate and utimensat do).
pub(crate) fn target_path(dirfd: c_int, path: &CStr, follow: bool) -> Option<Canon> {
    if path.to_bytes().is_empty() {
        return None;
    }
    if follow {
        with_opath(dirfd, path, 0, fd_path)?
    } else {
        entry_path(dirfd, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn descriptors_and_entries_resolve_to_canonical_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir(real.join("sub")).expect("mkdir");
        std::os::unix::fs::symlink(real.join("sub"), real.join("link")).expect("symlink");
        let file = std::fs::File::create(real.join("sub/f")).expect("create");

        let got = fd_path(file.as_raw_fd()).expect("fd path");
        assert_eq!(
            got.as_bytes(),
            real.join("sub/f").as_os_str().as_encoded_bytes()
        );

        let via_link = std::ffi::CString::new(real.join("link/g").as_os_str().as_encoded_bytes())
            .expect("no NUL");
        let entry = entry_path(libc::AT_FDCWD, &via_link).expect("entry");
        assert_eq!(
            entry.as_bytes(),
            real.join("sub/g").as_os_str().as_encoded_bytes()
        );

        // The final symlink itself is the entry unless following is asked for.
        let link = std::ffi::CString::new(real.join("link").as_os_str().as_encoded_bytes())
            .expect("no NUL");
        let kept = target_path(libc::AT_FDCWD, &link, false).expect("entry");
        assert_eq!(
            kept.as_bytes(),
            real.join("link").as_os_str().as_encoded_bytes()
        );
        let followed = target_path(libc::AT_FDCWD, &link, true).expect("target");
        assert_eq!(
            followed.as_bytes(),
            real.join("sub").as_os_str().as_encoded_bytes()
        );

        assert!(entry_path(libc::AT_FDCWD, c"a/..").is_none());
        assert!(entry_path(libc::AT_FDCWD, c"").is_none());
        let top = entry_path(libc::AT_FDCWD, c"/etc/").expect("top-level entry");
        assert_eq!(top.as_bytes(), b"/etc");
    }
}
