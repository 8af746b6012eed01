//! cgroup v2 directories for watchd and its services: finding the unified hierarchy, creating
//! `ftkit-<instance>` under watchd's own cgroup and one child per service, listing, killing and
//! removing them.
//!
//! It never enables a controller (so the "no internal processes" rule cannot bite) and never
//! touches a cgroup outside the instance's directory; names are validated so none can escape it.

use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;
use rustix::process::{Pid, Signal};

/// Prefix of the directory a watchd instance creates under its own cgroup.
pub const INSTANCE_PREFIX: &str = "ftkit-";

/// Longest accepted instance or service name; a cgroup directory name is one path component.
pub const MAX_NAME_LEN: usize = 200;

/// Rounds of "list, SIGKILL each" when `cgroup.kill` is missing (kernels before 5.14): a
/// process may fork between a listing and the kills, so the listing is repeated.
const KILL_FALLBACK_ROUNDS: u32 = 16;

/// Pause between fallback rounds, so that killed processes get to leave the cgroup.
const KILL_FALLBACK_PAUSE: Duration = Duration::from_millis(5);

/// What can go wrong with a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A name that is not a single, plain path component.
    #[error(
        "invalid cgroup name {name:?}: it must be 1-{MAX_NAME_LEN} bytes, without '/' or NUL, and not '.' or '..'"
    )]
    InvalidName {
        /// The refused name.
        name: String,
    },
    /// A cgroup file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A cgroup file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A cgroup directory could not be created.
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A cgroup directory could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The OS error (EBUSY: it still has processes).
        source: io::Error,
    },
    /// A cgroup file held something that is not what the kernel writes there.
    #[error("unexpected content in {path}: {line:?}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: String,
    },
    /// A process of the cgroup could not be signalled.
    #[error("cannot signal pid {pid} of cgroup {path}: {source}")]
    Signal {
        /// The cgroup.
        path: PathBuf,
        /// The process.
        pid: u32,
        /// The OS error.
        source: io::Error,
    },
    /// Processes were still listed after every fallback kill round.
    #[error("cgroup {path} still has processes after {rounds} rounds of SIGKILL")]
    Survivors {
        /// The cgroup.
        path: PathBuf,
        /// How many rounds were tried.
        rounds: u32,
    },
}

/// One service's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

/// The parent cgroup of one watchd instance's services.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    path: PathBuf,
}

impl CgroupRoot {
    /// Finds the cgroup2 hierarchy and watchd's own cgroup in it and creates
    /// `<own cgroup>/ftkit-<instance>` there. `Ok(None)` when this host has no cgroup2 mount,
    /// watchd's cgroup is not reachable through it, or it is not writable.
    pub fn detect(instance: &str) -> Result<Option<CgroupRoot>, CgroupError> {
        validate_name(instance)?;
        let mountinfo = read_file(Path::new("/proc/self/mountinfo"))?;
        let Some((mount_root, mount_point)) = cgroup2_mount(&mountinfo) else {
            return Ok(None);
        };
        let own = read_file(Path::new("/proc/self/cgroup"))?;
        let Some(own) = own_cgroup(&own) else {
            return Ok(None);
        };
        let Some(own_dir) = cgroup_dir(&mount_root, &mount_point, &own) else {
            return Ok(None);
        };
        let path = own_dir.join(format!("{INSTANCE_PREFIX}{instance}"));
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if refuses_us(&e) => return Ok(None),
            Err(source) => return Err(CgroupError::Create { path, source }),
        }
        // Creating a directory can be allowed where moving processes is not (delegation).
        let procs = path.join("cgroup.procs");
        match fs::OpenOptions::new().write(true).open(&procs) {
            Ok(_) => Ok(Some(CgroupRoot { path })),
            Err(e) if refuses_us(&e) => Ok(None),
            Err(source) => Err(CgroupError::Write {
                path: procs,
                source,
            }),
        }
    }

    /// The cgroup of service `name`, created if missing.
    pub fn service(&self, name: &str) -> Result<Cgroup, CgroupError> {
        validate_name(name)?;
        let path = self.path.join(name);
        match fs::create_dir(&path) {
            Ok(()) => Ok(Cgroup { path }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Cgroup { path }),
            Err(source) => Err(CgroupError::Create { path, source }),
        }
    }

    /// The instance's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes every service cgroup and then the instance's directory; fails (EBUSY) while any
    /// of them still has processes.
    pub fn remove(&self) -> Result<(), CgroupError> {
        remove_tree(&self.path)
    }
}

impl Cgroup {
    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A cgroup recorded earlier (re-adoption after a watchd restart); not checked here, so
    /// operations on a vanished directory fail with the OS error.
    pub fn open(path: PathBuf) -> Cgroup {
        Cgroup { path }
    }

    /// The processes directly in this cgroup (`cgroup.procs`).
    pub fn procs(&self) -> Result<Vec<u32>, CgroupError> {
        read_procs(&self.path.join("cgroup.procs"))
    }

    /// The processes of this cgroup and of every cgroup below it (a service may create its own
    /// sub-cgroups where it is allowed to).
    pub fn tree_procs(&self) -> Result<Vec<u32>, CgroupError> {
        let mut out = Vec::new();
        collect_tree_procs(&self.path, &mut out)?;
        Ok(out)
    }

    /// Whether no process is left in the cgroup or below it (`populated 0` in `cgroup.events`).
    /// A cgroup that cannot be read (removed) counts as empty.
    pub fn is_empty(&self) -> bool {
        let events = self.path.join("cgroup.events");
        let Ok(text) = fs::read_to_string(&events) else {
            return true;
        };
        !text.lines().any(|l| l.trim() == "populated 1")
    }

    /// Kills every process of the cgroup and below it with `cgroup.kill` (atomic with respect
    /// to forks). Without it (kernel < 5.14) SIGKILLs each listed process, a few rounds.
    pub fn kill(&self) -> Result<(), CgroupError> {
        let file = self.path.join("cgroup.kill");
        match fs::OpenOptions::new().write(true).open(&file) {
            Ok(mut f) => f
                .write_all(b"1")
                .map_err(|source| CgroupError::Write { path: file, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.path.is_dir() => self.kill_each(),
            Err(source) => Err(CgroupError::Write { path: file, source }),
        }
    }

    /// The fallback of [`Cgroup::kill`]: SIGKILL to each listed process until none is listed.
    /// Blocks for at most `KILL_FALLBACK_ROUNDS * KILL_FALLBACK_PAUSE`.
    pub fn kill_each(&self) -> Result<(), CgroupError> {
        let me = std::process::id();
        for _ in 0..KILL_FALLBACK_ROUNDS {
            let procs = self.tree_procs()?;
            if procs.is_empty() {
                return Ok(());
            }
            for pid in procs.into_iter().filter(|p| *p != me) {
                send_signal(pid, Signal::KILL).map_err(|source| CgroupError::Signal {
                    path: self.path.clone(),
                    pid,
                    source,
                })?;
            }
            std::thread::sleep(KILL_FALLBACK_PAUSE);
        }
        if self.tree_procs()?.is_empty() {
            Ok(())
        } else {
            Err(CgroupError::Survivors {
                path: self.path.clone(),
                rounds: KILL_FALLBACK_ROUNDS,
            })
        }
    }

    /// `cgroup.procs` opened for writing (O_CLOEXEC), for a child to move itself in with a
    /// single `write("0")` between fork and exec.
    pub fn procs_file(&self) -> Result<OwnedFd, CgroupError> {
        let path = self.path.join("cgroup.procs");
        // std opens with O_CLOEXEC; the flag is repeated because the fd must not leak into the
        // service.
        fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map(OwnedFd::from)
            .map_err(|source| CgroupError::Write { path, source })
    }

    /// The cgroup's directory opened `O_PATH | O_DIRECTORY | O_CLOEXEC`, for clone3's
    /// `CLONE_INTO_CGROUP`, which creates a child directly inside the cgroup (no migration).
    pub fn dir_fd(&self) -> Result<OwnedFd, CgroupError> {
        // O_PATH ignores the access mode; std insists on one, and read is the harmless one.
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.path)
            .map(OwnedFd::from)
            .map_err(|source| CgroupError::Open {
                path: self.path.clone(),
                source,
            })
    }

    /// Replaces the cgroup, when no process is left in it or below it, by a new empty directory
    /// of the same name (sub-cgroups the service made are removed). `Ok(true)` when it did;
    /// `Ok(false)`, with nothing changed, while processes remain. A new cgroup has never been
    /// killed, which CLONE_INTO_CGROUP needs on kernels that mix up the kill counters (see
    /// `process`).
    pub fn recreate_if_empty(&self) -> Result<bool, CgroupError> {
        if !self.is_empty() {
            return Ok(false);
        }
        match remove_tree(&self.path) {
            Ok(()) => {}
            // A process arrived since the check.
            Err(CgroupError::Remove { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        match fs::create_dir(&self.path) {
            Ok(()) => Ok(true),
            // Someone else made it again meanwhile: not known to be fresh.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(CgroupError::Create {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Removes the cgroup (and any sub-cgroups the service made); EBUSY while processes remain.
    /// A cgroup that is already gone is not an error.
    pub fn remove(&self) -> Result<(), CgroupError> {
        remove_tree(&self.path)
    }
}

/// Rejects anything that is not one plain path component.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0');
    if bad {
        Err(CgroupError::InvalidName {
            name: name.to_owned(),
        })
    } else {
        Ok(())
    }
}

/// Errors that mean "not ours to use" rather than "broken".
fn refuses_us(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS)
    )
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The root (inside the hierarchy) and mount point of the first cgroup2 mount in a
/// `/proc/self/mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<(String, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        Some((
            unescape_mountinfo(root),
            PathBuf::from(unescape_mountinfo(point)),
        ))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..=i + 3]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(b) = u8::try_from(value) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// watchd's own cgroup v2 path from a `/proc/self/cgroup` text (the `0::/path` line).
fn own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_owned())
}

/// Where the cgroup `own` (as `/proc/self/cgroup` shows it) lives in the file system, given a
/// cgroup2 mount of the hierarchy's `mount_root` at `mount_point`; `None` when the mount does
/// not show that cgroup.
fn cgroup_dir(mount_root: &str, mount_point: &Path, own: &str) -> Option<PathBuf> {
    let root = mount_root.trim_end_matches('/');
    let rest = own.strip_prefix(root)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let mut dir = mount_point.to_owned();
    for part in rest.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return None;
        }
        dir.push(part);
    }
    Some(dir)
}

fn read_procs(path: &Path) -> Result<Vec<u32>, CgroupError> {
    let text = read_file(path)?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse::<u32>().map_err(|_| CgroupError::Format {
                path: path.to_owned(),
                line: l.to_owned(),
            })
        })
        .collect()
}

fn collect_tree_procs(dir: &Path, out: &mut Vec<u32>) -> Result<(), CgroupError> {
    out.extend(read_procs(&dir.join("cgroup.procs"))?);
    for sub in sub_cgroups(dir)? {
        match collect_tree_procs(&sub, out) {
            Ok(()) => {}
            // A sub-cgroup removed while we walk had no processes left.
            Err(CgroupError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn sub_cgroups(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = fs::read_dir(dir).map_err(|source| CgroupError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut subs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CgroupError::Read {
            path: dir.to_owned(),
            source,
        })?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            subs.push(entry.path());
        }
    }
    Ok(subs)
}

/// rmdir, deepest first; a directory that is already gone is fine.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let subs = match sub_cgroups(dir) {
        Ok(s) => s,
        Err(CgroupError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for sub in subs {
        remove_tree(&sub)?;
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Remove {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// kill(2) where a process that is already gone is not an error.
pub(crate) fn send_signal(pid: u32, signal: Signal) -> io::Result<()> {
    let raw = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let Some(pid) = Pid::from_raw(raw) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    match rustix::process::kill_process(pid, signal) {
        Ok(()) | Err(Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Unique, self-cleaning cgroup roots for tests of this crate.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// How long a guard waits for killed processes to leave before giving up on removal.
    const REMOVE_ATTEMPTS: u32 = 400;
    const REMOVE_PAUSE: Duration = Duration::from_millis(5);

    /// A unique instance name per test, so parallel tests never share a cgroup.
    pub(crate) fn unique_instance(tag: &str) -> String {
        format!(
            "t{}-{}-{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Kills and removes the instance's cgroups even when the test fails.
    #[derive(Debug)]
    pub(crate) struct RootGuard(pub(crate) CgroupRoot);

    impl Drop for RootGuard {
        fn drop(&mut self) {
            let all = Cgroup::open(self.0.path().to_owned());
            let _ = all.kill();
            for _ in 0..REMOVE_ATTEMPTS {
                if all.is_empty() && self.0.remove().is_ok() {
                    return;
                }
                std::thread::sleep(REMOVE_PAUSE);
            }
            eprintln!("could not remove test cgroup {}", self.0.path().display());
        }
    }

    /// A fresh instance root, or `None` (with a message) where cgroup v2 is not writable.
    pub(crate) fn root(tag: &str) -> Option<RootGuard> {
        match CgroupRoot::detect(&unique_instance(tag)).expect("detect must not fail on this host")
        {
            Some(r) => Some(RootGuard(r)),
            None => {
                eprintln!("skipping: no writable cgroup v2 here");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_support::root;

    #[test]
    fn names_are_validated() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(
                matches!(validate_name(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(validate_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(validate_name("web-1.service").is_ok());
        assert!(CgroupRoot::detect("../evil").is_err());
    }

    #[test]
    fn mountinfo_parsing() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    41 31 0:38 /sub /sys/fs/cgroup/my\\040dir rw,relatime - cgroup2 cgroup2 rw\n";
        let (root, point) = cgroup2_mount(text).expect("has a cgroup2 line");
        assert_eq!(root, "/sub");
        assert_eq!(point, PathBuf::from("/sys/fs/cgroup/my dir"));
        assert!(cgroup2_mount("31 23 0:28 / /x rw - tmpfs tmpfs rw\n").is_none());
        assert_eq!(
            own_cgroup("4:memory:/x\n0::/user.slice/a.scope\n").as_deref(),
            Some("/user.slice/a.scope")
        );
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
        assert_eq!(
            cgroup_dir("/", Path::new("/m"), "/"),
            Some(PathBuf::from("/m"))
        );
        assert_eq!(
            cgroup_dir("/", Path::new("/m"), "/a/b"),
            Some(PathBuf::from("/m/a/b"))
        );
        assert_eq!(
            cgroup_dir("/sub", Path::new("/m"), "/sub/a"),
            Some(PathBuf::from("/m/a"))
        );
        assert_eq!(cgroup_dir("/sub", Path::new("/m"), "/subx/a"), None);
        assert_eq!(cgroup_dir("/sub", Path::new("/m"), "/other"), None);
        assert_eq!(cgroup_dir("/", Path::new("/m"), "/a/../b"), None);
    }

    #[test]
    fn service_cgroups_are_created_listed_and_removed() {
        let Some(guard) = root("svc") else { return };
        let r = &guard.0;
        assert!(r.path().is_dir());
        assert!(
            r.path()
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(INSTANCE_PREFIX))
        );
        let cg = r.service("web").expect("create service cgroup");
        assert_eq!(cg.path(), r.path().join("web"));
        assert_eq!(r.service("web").expect("existing is fine"), cg);
        assert!(r.service("..").is_err());
        assert!(cg.is_empty());
        assert_eq!(cg.procs().expect("readable"), Vec::<u32>::new());
        assert_eq!(Cgroup::open(cg.path().to_owned()), cg);
        let fd = cg.dir_fd().expect("open the directory");
        let meta = fs::metadata(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .expect("fd names a directory");
        assert!(meta.is_dir());
        drop(fd);
        fs::create_dir(cg.path().join("sub")).expect("sub-cgroup");
        assert!(
            cg.recreate_if_empty().expect("recreate"),
            "empty: recreated"
        );
        assert!(cg.path().is_dir());
        assert!(!cg.path().join("sub").exists(), "sub-cgroups go with it");
        cg.remove().expect("empty cgroup is removable");
        assert!(!cg.path().exists());
        assert!(matches!(cg.dir_fd(), Err(CgroupError::Open { .. })));
        assert!(
            cg.recreate_if_empty().expect("recreate"),
            "a missing cgroup is made"
        );
        cg.remove().expect("empty cgroup is removable");
        cg.remove().expect("removing twice is fine");
        r.service("other").expect("create");
        r.remove().expect("root with empty children is removable");
        assert!(!r.path().exists());
    }

    /// Puts a fresh `sleep` into the cgroup through `procs_file` and returns its pid.
    fn sleeper_in(cg: &Cgroup) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let procs = cg.procs_file().expect("open cgroup.procs");
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("100");
        // SAFETY: the closure only calls write(2) on an fd opened before the fork, which is
        // async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                rustix::io::write(&procs, b"0")
                    .map(|_| ())
                    .map_err(io::Error::from)
            });
        }
        cmd.spawn().expect("spawn sleep")
    }

    #[test]
    fn kill_and_fallback_kill_empty_the_cgroup() {
        let Some(guard) = root("kill") else { return };
        let cg = guard.0.service("svc").expect("create");
        for fallback in [false, true] {
            let mut a = sleeper_in(&cg);
            let mut b = sleeper_in(&cg);
            let mut listed = cg.procs().expect("procs");
            listed.sort_unstable();
            let mut want = vec![a.id(), b.id()];
            want.sort_unstable();
            assert_eq!(listed, want);
            assert!(!cg.is_empty());
            busy_remove(&cg);
            if fallback {
                cg.kill_each().expect("fallback kill")
            } else {
                cg.kill().expect("cgroup.kill")
            }
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(a.wait().expect("reap").signal(), Some(libc::SIGKILL));
            assert_eq!(b.wait().expect("reap").signal(), Some(libc::SIGKILL));
            assert!(cg.procs().expect("procs").is_empty());
        }
    }

    fn busy_remove(cg: &Cgroup) {
        match cg.remove() {
            Err(CgroupError::Remove { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EBUSY))
            }
            other => panic!("removing a populated cgroup must fail with EBUSY, got {other:?}"),
        }
    }
}
