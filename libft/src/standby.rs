//! Warm standby: the process's role (`FT_ROLE`), its promotion (watchd's `Promote`, or
//! [`promote`]), and the [`Follower`] that keeps a standby's critical memory equal to the newest
//! good checkpoint shipped into its store directory. It never writes an image (a standby's
//! Checkpointer refuses to) and never reads one itself: applying is `Checkpointer::recover`.
//!
//! ```text
//!  owner's t_checkpoint ─► watchd ships the image ─► rename into <FT_CKPT_DIR>/<stream>
//!  standby: Follower::wait_for_change (inotify) ─► apply_newest ─► Checkpointer::recover
//!  Promote{epoch} ─► role() = Primary ─► (one last apply_newest) ─► t_checkpoint continues
//! ```
//!
//! A standby that said ready at start ([`crate::Watch::ready`]) says it again once it serves as
//! the primary: watchd's `service` resource counts the promotion done only then.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::critical::{self, Checkpointer};

/// Environment: the role watchd started the process in, `primary` (default) or `standby`.
pub const ENV_ROLE: &str = "FT_ROLE";
/// While inotify watches the directory, a wait still rescans it this often: an event can be
/// missed (queue overflow, the directory replaced), the scan is the truth.
pub const RESCAN_INTERVAL: Duration = Duration::from_millis(500);
/// Without inotify (it failed to start), a wait rescans the directory this often.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Suffix of a committed image in a store directory (`ckpt::Store`'s naming).
const IMAGE_SUFFIX: &str = ".ckpt";
/// Digits of the zero-padded sequence in an image's name (`ckpt::Store`'s naming).
const SEQ_DIGITS: usize = 20;
/// Bytes read from the inotify descriptor at once (many events; only their masks matter).
const EVENT_BUFFER: usize = 4096;
/// Size of `struct inotify_event` without its name.
const EVENT_HEADER: usize = 16;
/// Directory events that may mean a new, replaced or removed image.
const WATCH_MASK: u32 = libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CLOSE_WRITE
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// What the process is: the one that serves and writes checkpoints, or a warm standby that
/// follows the checkpoints shipped to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves requests and writes checkpoints (the default).
    Primary,
    /// Applies shipped checkpoints, writes none, until promoted.
    Standby,
}

impl Role {
    /// `primary` or `standby` (as `FT_ROLE` spells them, case-insensitive).
    pub fn parse(text: &str) -> Option<Role> {
        match text.trim().to_ascii_lowercase().as_str() {
            "primary" => Some(Role::Primary),
            "standby" => Some(Role::Standby),
            _ => None,
        }
    }

    /// The name `FT_ROLE` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        }
    }
}

/// Why a standby operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `FT_ROLE` holds something else than `primary` or `standby`.
    #[error("{ENV_ROLE}={0:?}: expected primary or standby")]
    BadRole(String),
    /// The process was not started as a standby: it has nothing to follow.
    #[error(
        "not a standby ({ENV_ROLE} is not standby): there are no shipped checkpoints to follow"
    )]
    NotStandby,
    /// The process was promoted and has written checkpoints of its own since: applying a
    /// shipped one would roll its own progress back.
    #[error("promoted: this process writes its own checkpoints now and follows no more")]
    Promoted,
    /// The store directory cannot be read or watched.
    #[error("checkpoint directory {dir}: {source}")]
    Dir {
        /// The stream's store directory.
        dir: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// Applying the checkpoint failed (see `Checkpointer::recover`: a layout mismatch leaves
    /// memory untouched, a failure after memory was written leaves the heap empty).
    #[error(transparent)]
    Critical(#[from] critical::Error),
}

/// The role `FT_ROLE` names (unset or empty: primary); an unknown value is an error.
pub fn role_from_env() -> Result<Role, Error> {
    match std::env::var_os(ENV_ROLE) {
        None => Ok(Role::Primary),
        Some(v) if v.is_empty() => Ok(Role::Primary),
        Some(v) => {
            let text = v.to_string_lossy();
            Role::parse(&text).ok_or_else(|| Error::BadRole(text.into_owned()))
        }
    }
}

/// The role the process started in, read from `FT_ROLE` once. An invalid value is reported on
/// stderr and counts as primary: watchd only ever sets the two valid ones.
fn started_as() -> Role {
    static STARTED: OnceLock<Role> = OnceLock::new();
    *STARTED.get_or_init(|| {
        role_from_env().unwrap_or_else(|e| {
            eprintln!("libft: {e}; running as primary");
            Role::Primary
        })
    })
}

/// A promotion arrived (`Promote`, or [`promote`]).
static PROMOTED: AtomicBool = AtomicBool::new(false);
/// The highest epoch a promotion carried.
static PROMOTED_EPOCH: AtomicU64 = AtomicU64::new(0);
/// The process started a checkpoint as primary: following ends for good.
static WROTE_AS_PRIMARY: AtomicBool = AtomicBool::new(false);

/// The process's role now: `FT_ROLE` at start-up, primary once promoted.
pub fn role() -> Role {
    if started_as() == Role::Standby && !PROMOTED.load(Ordering::Acquire) {
        Role::Standby
    } else {
        Role::Primary
    }
}

/// Records a promotion with ownership epoch `epoch` (watchd's `Promote`, delivered by
/// [`crate::Watch::poll_command`], which calls this): from now on [`role`] is primary and
/// checkpoints may be written; they continue the sequence of the store directory. Returns
/// true when this call turned a standby into the primary (false: promoted already, or the
/// process never was a standby). Idempotent; the highest epoch seen is kept.
pub fn promote(epoch: u64) -> bool {
    PROMOTED_EPOCH.fetch_max(epoch, Ordering::AcqRel);
    let was = PROMOTED.swap(true, Ordering::AcqRel);
    started_as() == Role::Standby && !was
}

/// The epoch of the promotion, once one arrived (also in a process that was never a standby).
pub fn promoted() -> Option<u64> {
    PROMOTED
        .load(Ordering::Acquire)
        .then(|| PROMOTED_EPOCH.load(Ordering::Acquire))
}

/// Asked by the Checkpointer before it captures an image: a standby writes none. Once a
/// promoted process writes, its [`Follower`]s stop applying shipped images.
pub(crate) fn admit_checkpoint() -> Result<(), critical::Error> {
    match role() {
        Role::Standby => Err(critical::Error::Standby),
        Role::Primary => {
            WROTE_AS_PRIMARY.store(true, Ordering::Release);
            Ok(())
        }
    }
}

/// One image file of the store directory, as much as tells whether it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    seq: u64,
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

/// Keeps a standby's critical memory (heap and registered regions) equal to the newest good
/// checkpoint of one stream in its store directory (`FT_CKPT_DIR/<stream>`), where watchd's
/// replication drops the images the owner takes (any process may, by rename).
///
/// Contract: while [`Follower::apply_newest`] runs, no thread of the process may access the
/// critical heap or the registered regions (the same rule as `t_recover`): their bytes are
/// replaced in place, at the same addresses. Pointers into the heap stay valid; anything the
/// application derived from its contents (a cached count, a Rust reference) must be read again
/// after an apply. Between applies the standby may read critical memory, but must not write
/// it: the next apply overwrites it anyway, and a promotion starts from it.
///
/// After a promotion, call `apply_newest` once more before changing critical memory, to take
/// the image shipped last; once the process writes a checkpoint of its own, the follower
/// refuses ([`Error::Promoted`]).
#[derive(Debug)]
pub struct Follower<'a> {
    ckpt: &'a Checkpointer,
    stream: u32,
    dir: PathBuf,
    /// The image memory holds (from this follower, or from the recovery at start-up).
    applied: Option<u64>,
    /// The images newer than `applied` when an apply was last attempted: nothing is tried
    /// again until they change.
    attempted: Option<Vec<Stamp>>,
    /// Images refused so far (each reported once on stderr).
    reported: BTreeSet<u64>,
    /// Images the last apply refused, and why.
    skipped: Vec<(u64, String)>,
    watch: Option<DirWatch>,
}

impl<'a> Follower<'a> {
    /// Follows stream `stream` of `ckpt` (created with `FT_ROLE=standby`). Memory counts as
    /// holding the image the last `recover` of this stream restored, if any.
    pub fn new(ckpt: &'a Checkpointer, stream: u32) -> Result<Follower<'a>, Error> {
        if started_as() != Role::Standby {
            return Err(Error::NotStandby);
        }
        let dir = ckpt.config().stream_dir(stream);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Dir {
            dir: dir.clone(),
            source,
        })?;
        let applied = ckpt
            .last_report()
            .filter(|r| r.stream == stream)
            .and_then(|r| r.outcome.ok().flatten())
            .map(|r| r.seq);
        let watch = DirWatch::new(&dir)
            .map_err(|e| {
                eprintln!(
                    "libft: cannot watch {} ({e}); polling it every {} ms",
                    dir.display(),
                    POLL_INTERVAL.as_millis()
                );
            })
            .ok();
        Ok(Follower {
            ckpt,
            stream,
            dir,
            applied,
            attempted: None,
            reported: BTreeSet::new(),
            skipped: Vec::new(),
            watch,
        })
    }

    /// The stream followed.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// The store directory watched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checkpoint memory holds, if any.
    pub fn applied(&self) -> Option<u64> {
        self.applied
    }

    /// Newer images the last apply refused (corrupt, torn, broken chain), with the reason.
    pub fn skipped(&self) -> &[(u64, String)] {
        &self.skipped
    }

    /// Waits up to `timeout` until the directory holds images newer than the one applied that
    /// were not tried yet; true when it does (then call [`Follower::apply_newest`]).
    pub fn wait_for_change(&mut self, timeout: Duration) -> Result<bool, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.has_news()? {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let left = deadline - now;
            if self.watch.is_none() {
                // The directory may have been replaced (its watch ends): watch the new one.
                self.watch = DirWatch::new(&self.dir).ok();
            }
            match &self.watch {
                Some(w) => match w.wait(left.min(RESCAN_INTERVAL)) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => self.watch = None,
                },
                None => std::thread::sleep(left.min(POLL_INTERVAL)),
            }
        }
    }

    /// Applies the newest good checkpoint of the directory into the heap and the registered
    /// regions, in place, if images newer than the applied one arrived (or changed) since the
    /// last attempt; returns its sequence, or None when nothing new was applied. Incremental
    /// chains are resolved as recovery does; images that do not verify are skipped (reported
    /// once on stderr, and by [`Follower::skipped`]) for the newest good one. Should the
    /// images newer than the applied one vanish or go bad, the newest good one may be older:
    /// memory then goes back to it, and its sequence is returned.
    ///
    /// # Safety
    /// No other thread may access critical memory (heap or registered regions) while this
    /// runs, and no reference into it may be alive: its bytes are replaced.
    pub unsafe fn apply_newest(&mut self) -> Result<Option<u64>, Error> {
        if WROTE_AS_PRIMARY.load(Ordering::Acquire) {
            return Err(Error::Promoted);
        }
        let stamps = self.scan()?;
        if stamps.is_empty() || self.attempted.as_ref() == Some(&stamps) {
            return Ok(None);
        }
        // SAFETY: the caller guarantees that nobody accesses critical memory meanwhile.
        let recovered = unsafe { self.ckpt.recover(self.stream) };
        let recovered = match recovered {
            Ok(r) => r,
            Err(e) => {
                // Memory may have been reset: hold no image, try again once the directory
                // changes.
                self.applied = None;
                self.attempted = Some(self.scan()?);
                return Err(e.into());
            }
        };
        self.skipped = recovered
            .as_ref()
            .map_or_else(Vec::new, |r| r.skipped.clone());
        for (seq, why) in &self.skipped {
            if self.reported.insert(*seq) {
                eprintln!(
                    "libft: standby: checkpoint {seq} of stream {} in {} skipped: {why}",
                    self.stream,
                    self.dir.display()
                );
            }
        }
        let Some(r) = recovered else {
            // No good image at all: memory is untouched.
            self.attempted = Some(stamps);
            return Ok(None);
        };
        let newer = stamps.into_iter().filter(|s| s.seq > r.seq).collect();
        self.attempted = Some(newer);
        if self.applied == Some(r.seq) {
            return Ok(None);
        }
        self.applied = Some(r.seq);
        Ok(Some(r.seq))
    }

    fn has_news(&self) -> Result<bool, Error> {
        let stamps = self.scan()?;
        Ok(!stamps.is_empty() && self.attempted.as_ref() != Some(&stamps))
    }

    /// The committed images newer than the applied one, by sequence.
    fn scan(&self) -> Result<Vec<Stamp>, Error> {
        let dir_err = |source| Error::Dir {
            dir: self.dir.clone(),
            source,
        };
        let floor = self.applied.unwrap_or(0);
        let mut stamps = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // Removed (replication replacing it): no images until it is back.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(stamps),
            Err(e) => return Err(dir_err(e)),
        };
        for entry in entries {
            let entry = entry.map_err(dir_err)?;
            let Some(seq) = entry.file_name().to_str().and_then(parse_image_name) else {
                continue;
            };
            if seq <= floor {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Renamed over or removed since the listing: the next scan sees what is there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(dir_err(e)),
            };
            stamps.push(Stamp {
                seq,
                dev: meta.dev(),
                ino: meta.ino(),
                len: meta.len(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            });
        }
        stamps.sort_by_key(|s| s.seq);
        Ok(stamps)
    }
}

/// The sequence of a committed image's file name (`<seq:020>.ckpt`).
fn parse_image_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(IMAGE_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// An inotify watch on one directory: only a wake-up, the directory scan decides.
#[derive(Debug)]
struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    fn new(dir: &Path) -> io::Result<DirWatch> {
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: inotify_init1 takes no pointers; the flags are valid.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor just returned to us and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is an open inotify descriptor; `path` is NUL-terminated and outlives
        // the call.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), WATCH_MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirWatch { fd })
    }

    /// Waits up to `timeout` for an event and drains the queue; false once the watch ended
    /// (the directory was removed or moved away).
    fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd that outlives the call, and the count says one.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(true)
            } else {
                Err(e)
            };
        }
        let mut alive = true;
        let mut buf = [0u8; EVENT_BUFFER];
        loop {
            // SAFETY: `buf` is writable for its whole length, which is what read is given.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(alive),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            };
            if n == 0 {
                return Ok(alive);
            }
            let mut at = 0;
            while at + EVENT_HEADER <= n {
                let field = |off: usize| {
                    u32::from_ne_bytes([
                        buf[at + off],
                        buf[at + off + 1],
                        buf[at + off + 2],
                        buf[at + off + 3],
                    ])
                };
                let (mask, name_len) = (field(4), field(12));
                if mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                    alive = false;
                }
                at += EVENT_HEADER + usize::try_from(name_len).unwrap_or(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse() {
        assert_eq!(Role::parse("standby"), Some(Role::Standby));
        assert_eq!(Role::parse(" Primary\n"), Some(Role::Primary));
        assert_eq!(Role::parse("backup"), None);
        assert_eq!(Role::parse(""), None);
        for r in [Role::Primary, Role::Standby] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn image_names_follow_the_store() {
        assert_eq!(parse_image_name("00000000000000000007.ckpt"), Some(7));
        for bad in [
            "7.ckpt",
            "0000000000000000007.ckpt",
            "0000000000000000000x.ckpt",
            "99999999999999999999.ckpt",
            ".tmp-7-123",
            "00000000000000000007.ckpt.part",
        ] {
            assert_eq!(parse_image_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_watch_wakes_on_a_rename_and_ends_with_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("0");
        std::fs::create_dir(&sub).expect("mkdir");
        let watch = DirWatch::new(&sub).expect("inotify");
        let start = Instant::now();
        assert!(watch.wait(Duration::from_millis(50)).expect("wait"));
        assert!(
            start.elapsed() >= Duration::from_millis(40),
            "woke without an event"
        );
        std::fs::write(sub.join("incoming"), b"x").expect("write");
        std::fs::rename(sub.join("incoming"), sub.join("00000000000000000001.ckpt"))
            .expect("rename");
        let start = Instant::now();
        assert!(watch.wait(Duration::from_secs(5)).expect("wait"));
        assert!(start.elapsed() < Duration::from_secs(4), "no wake-up");
        std::fs::remove_dir_all(&sub).expect("rmdir");
        assert!(!watch.wait(Duration::from_secs(5)).expect("wait"));
    }
}
