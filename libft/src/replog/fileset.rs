//! Which directories of this host are replicated and through which ring: parses
//! `FT_REPL_FILESETS`, classifies canonical absolute paths, opens each fileset's ring lazily
//! and reopens it when watchd retires it.
//!
//! It never canonicalizes (callers hand it canonical paths) and never fails an application
//! because replication is not running: with no usable ring the operation is counted as
//! dropped (watchd resyncs a fileset whenever it creates its ring).
//!
//! `FT_REPL_FILESETS` = entries separated by `;`, each `NAME|ROOT|RINGPATH`: ROOT absolute and
//! canonical without a trailing slash, RINGPATH absolute. Roots may not nest.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::codec::OpRef;
use super::ring::{Ring, RingError, Ticket};

/// The environment variable watchd sets for the programs whose files it replicates.
pub const ENV_FILESETS: &str = "FT_REPL_FILESETS";
/// How long a sync-mode write or fsync waits for the backups (humantime, e.g. `5s`).
pub const ENV_SYNC_TIMEOUT: &str = "FT_REPL_SYNC_TIMEOUT";
/// Default of [`ENV_SYNC_TIMEOUT`].
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// A missing ring is looked for again at most this often (a stat per write would cost more
/// than the write).
const RING_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Retired rings reopened in a row by one append before giving up (watchd replacing rings
/// faster than this means replication is being reconfigured: the op is dropped).
const REOPEN_ATTEMPTS: usize = 3;
/// Longest fileset name.
const MAX_NAME_BYTES: usize = 255;

/// Why `FT_REPL_FILESETS` (or `FT_REPL_SYNC_TIMEOUT`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilesetError {
    /// An entry is malformed.
    #[error("{ENV_FILESETS} entry {entry:?}: {why}")]
    Entry { entry: String, why: String },
    /// Two entries conflict.
    #[error("{ENV_FILESETS}: {0}")]
    Conflict(String),
    /// The sync timeout does not parse.
    #[error("{ENV_SYNC_TIMEOUT}={0:?} is not a duration such as `5s`")]
    SyncTimeout(String),
}

/// One replicated directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fileset {
    /// The fileset's name (the replication channel is `repl/<name>`).
    pub name: String,
    /// Canonical absolute root, no trailing slash.
    pub root: PathBuf,
    /// The ring file watchd created for it.
    pub ring_path: PathBuf,
}

struct Slot {
    fileset: Fileset,
    ring: RwLock<RingState>,
    order: Mutex<()>,
    dropped: AtomicU64,
    warned: AtomicBool,
}

#[derive(Default)]
struct RingState {
    ring: Option<Arc<Ring>>,
    last_attempt: Option<Instant>,
}

/// The filesets of this process, with their rings. `Send + Sync`.
pub struct Filesets {
    slots: Vec<Slot>,
    sync_timeout: Duration,
}

impl std::fmt::Debug for Filesets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filesets")
            .field(
                "filesets",
                &self.slots.iter().map(|s| &s.fileset).collect::<Vec<_>>(),
            )
            .field("sync_timeout", &self.sync_timeout)
            .finish()
    }
}

impl Filesets {
    /// No filesets: every path is a plain path.
    pub fn none() -> Self {
        Self {
            slots: Vec::new(),
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
        }
    }

    /// From `FT_REPL_FILESETS` and `FT_REPL_SYNC_TIMEOUT` (unset or empty: no filesets).
    pub fn from_env() -> Result<Self, FilesetError> {
        let spec = std::env::var_os(ENV_FILESETS).unwrap_or_default();
        let mut sets = Self::parse(spec.as_bytes())?;
        if let Some(t) = std::env::var_os(ENV_SYNC_TIMEOUT).filter(|t| !t.is_empty()) {
            let text = t.to_string_lossy().into_owned();
            sets.sync_timeout =
                humantime::parse_duration(&text).map_err(|_| FilesetError::SyncTimeout(text))?;
        }
        Ok(sets)
    }

    /// Parses the `FT_REPL_FILESETS` syntax (empty entries are ignored).
    pub fn parse(spec: &[u8]) -> Result<Self, FilesetError> {
        let mut slots: Vec<Slot> = Vec::new();
        for entry in spec.split(|&b| b == b';').filter(|e| !e.is_empty()) {
            let fileset = parse_entry(entry)?;
            for other in &slots {
                let o = &other.fileset;
                if o.name == fileset.name {
                    return Err(FilesetError::Conflict(format!(
                        "the name {:?} is used twice",
                        o.name
                    )));
                }
                let (a, b) = (
                    o.root.as_os_str().as_bytes(),
                    fileset.root.as_os_str().as_bytes(),
                );
                if a == b || beneath(a, b).is_some() || beneath(b, a).is_some() {
                    return Err(FilesetError::Conflict(format!(
                        "the roots of {:?} ({}) and {:?} ({}) overlap",
                        o.name,
                        o.root.display(),
                        fileset.name,
                        fileset.root.display()
                    )));
                }
            }
            slots.push(Slot {
                fileset,
                ring: RwLock::new(RingState::default()),
                order: Mutex::new(()),
                dropped: AtomicU64::new(0),
                warned: AtomicBool::new(false),
            });
        }
        Ok(Self {
            slots,
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
        })
    }

    /// Replaces the sync-mode timeout.
    pub fn with_sync_timeout(mut self, timeout: Duration) -> Self {
        self.sync_timeout = timeout;
        self
    }

    /// How long sync-mode operations wait for the backups.
    pub fn sync_timeout(&self) -> Duration {
        self.sync_timeout
    }

    /// Number of filesets.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no filesets.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The fileset at `index`.
    pub fn get(&self, index: usize) -> Option<&Fileset> {
        self.slots.get(index).map(|s| &s.fileset)
    }

    /// The fileset a canonical absolute path belongs to, and the path relative to its root
    /// (a component-boundary prefix match; the root itself is not a member).
    pub fn classify<'p>(&self, canonical: &'p [u8]) -> Option<(usize, &'p [u8])> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            beneath(canonical, s.fileset.root.as_os_str().as_bytes()).map(|rel| (i, rel))
        })
    }

    /// A lock that makes "syscall, then append" atomic among this process's threads, so that
    /// their operations are logged in the order their syscalls completed. Hold it across
    /// both, never across a durability wait. `None` for an index not from
    /// [`classify`](Self::classify).
    pub fn order_lock(&self, index: usize) -> Option<MutexGuard<'_, ()>> {
        self.slots
            .get(index)
            .map(|s| s.order.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Appends `op` to the ring of fileset `index`, opening it on first use and reopening it
    /// when watchd retired it. `Ok(None)`: not logged because no usable ring exists
    /// (replication is not running for the fileset; counted in [`dropped`](Self::dropped)).
    /// In sync mode ([`Ticket::sync`]) the caller then calls
    /// [`wait_durable`](Self::wait_durable), outside the order lock.
    pub fn append(&self, index: usize, op: OpRef<'_>) -> Result<Option<Ticket>, RingError> {
        let Some(slot) = self.slots.get(index) else {
            return Ok(None);
        };
        for _ in 0..REOPEN_ATTEMPTS {
            {
                let state = slot.ring.read().unwrap_or_else(PoisonError::into_inner);
                match &state.ring {
                    Some(ring) => match ring.append(op) {
                        Err(RingError::Retired) => {}
                        other => return other.map(Some),
                    },
                    None if !retry_due(state.last_attempt) => break,
                    None => {}
                }
            }
            if !self.reopen(slot) {
                break;
            }
        }
        slot.dropped.fetch_add(1, Ordering::Relaxed);
        Ok(None)
    }

    /// Sync mode: waits until the backups have the operation of `ticket` durable (at most the
    /// sync timeout). Returns at once for a ticket appended in async mode.
    pub fn wait_durable(&self, index: usize, ticket: Ticket) -> Result<(), RingError> {
        if !ticket.sync() {
            return Ok(());
        }
        let ring = self.slots.get(index).and_then(|slot| {
            let state = slot.ring.read().unwrap_or_else(PoisonError::into_inner);
            state
                .ring
                .as_ref()
                .filter(|r| r.generation() == ticket.generation())
                .cloned()
        });
        match ring {
            Some(ring) => ring.wait_durable(ticket, self.sync_timeout),
            // The ring was replaced meanwhile: the op's durability is now the resync's.
            None => Err(RingError::Retired),
        }
    }

    /// The ring of fileset `index` as currently open (`None` before first use or when no
    /// usable ring exists).
    pub fn current_ring(&self, index: usize) -> Option<Arc<Ring>> {
        let slot = self.slots.get(index)?;
        let state = slot.ring.read().unwrap_or_else(PoisonError::into_inner);
        state.ring.clone()
    }

    /// Operations of fileset `index` not logged because no usable ring existed.
    pub fn dropped(&self, index: usize) -> u64 {
        self.slots
            .get(index)
            .map_or(0, |s| s.dropped.load(Ordering::Relaxed))
    }

    /// (Re)opens the slot's ring unless another thread did; false when no usable ring exists.
    fn reopen(&self, slot: &Slot) -> bool {
        let mut state = slot.ring.write().unwrap_or_else(PoisonError::into_inner);
        if state.ring.as_ref().is_some_and(|r| !r.is_retired()) {
            return true;
        }
        if state.ring.is_none() && !retry_due(state.last_attempt) {
            return false;
        }
        state.last_attempt = Some(Instant::now());
        match Ring::open(&slot.fileset.ring_path) {
            Ok(ring) if !ring.is_retired() => {
                state.ring = Some(Arc::new(ring));
                slot.warned.store(false, Ordering::Relaxed);
                true
            }
            Ok(_) => {
                state.ring = None;
                false
            }
            Err(e) => {
                state.ring = None;
                let missing = matches!(&e, RingError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound);
                if !missing && !slot.warned.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "libft: fileset {:?}: operations are not replicated: {e}",
                        slot.fileset.name
                    );
                }
                false
            }
        }
    }
}

fn retry_due(last: Option<Instant>) -> bool {
    last.is_none_or(|t| t.elapsed() >= RING_RETRY_INTERVAL)
}

/// The part of `path` below `root` (component boundary, non-empty), if any.
fn beneath<'p>(path: &'p [u8], root: &[u8]) -> Option<&'p [u8]> {
    let rest = path.strip_prefix(root)?.strip_prefix(b"/")?;
    (!rest.is_empty()).then_some(rest)
}

fn parse_entry(entry: &[u8]) -> Result<Fileset, FilesetError> {
    let shown = String::from_utf8_lossy(entry).into_owned();
    let fail = |why: &str| FilesetError::Entry {
        entry: shown.clone(),
        why: why.to_owned(),
    };
    let mut parts = entry.split(|&b| b == b'|');
    let (Some(name), Some(root), Some(ring), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(fail("expected NAME|ROOT|RINGPATH"));
    };
    let name = std::str::from_utf8(name).map_err(|_| fail("the name is not UTF-8"))?;
    if name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || name.chars().any(|c| c.is_control() || c == '/')
    {
        return Err(fail(
            "the name must be 1 to 255 bytes without control characters or `/`",
        ));
    }
    if root.first() != Some(&b'/') || root == b"/" || root.ends_with(b"/") {
        return Err(fail(
            "the root must be an absolute path other than `/`, without a trailing slash",
        ));
    }
    if root[1..]
        .split(|&b| b == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return Err(fail(
            "the root must be canonical (no empty, `.` or `..` components)",
        ));
    }
    if ring.first() != Some(&b'/') || ring.ends_with(b"/") {
        return Err(fail("the ring path must be an absolute file path"));
    }
    Ok(Fileset {
        name: name.to_owned(),
        root: Path::new(OsStr::from_bytes(root)).to_owned(),
        ring_path: Path::new(OsStr::from_bytes(ring)).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_classifies_on_component_boundaries() {
        let sets = Filesets::parse(b"data|/srv/data|/dev/shm/r1;;logs|/var/log/app|/dev/shm/r2;")
            .expect("valid");
        assert_eq!(sets.len(), 2);
        assert_eq!(
            sets.get(1).expect("two"),
            &Fileset {
                name: "logs".into(),
                root: "/var/log/app".into(),
                ring_path: "/dev/shm/r2".into()
            }
        );
        assert_eq!(sets.classify(b"/srv/data/a/b"), Some((0, &b"a/b"[..])));
        assert_eq!(sets.classify(b"/var/log/app/x"), Some((1, &b"x"[..])));
        assert_eq!(
            sets.classify(b"/srv/data"),
            None,
            "the root is not a member"
        );
        assert_eq!(sets.classify(b"/srv/data/"), None);
        assert_eq!(sets.classify(b"/srv/database/x"), None);
        assert_eq!(sets.classify(b"/srv"), None);
        assert_eq!(sets.classify(b"relative/srv/data/x"), None);
        assert!(Filesets::parse(b"").expect("empty").is_empty());
    }

    #[test]
    fn refuses_malformed_entries() {
        for bad in [
            &b"noseparators"[..],
            b"a|/r",
            b"a|/r|/ring|extra",
            b"|/r|/ring",
            b"a/b|/r|/ring",
            b"a|relative|/ring",
            b"a|/|/ring",
            b"a|/r/|/ring",
            b"a|/r//s|/ring",
            b"a|/r/./s|/ring",
            b"a|/r/../s|/ring",
            b"a|/r|relative",
            b"a|/r|/ring/",
            b"\xff|/r|/ring",
            b"a\x01|/r|/ring",
        ] {
            let err = Filesets::parse(bad).expect_err("refused");
            assert!(
                matches!(err, FilesetError::Entry { .. }),
                "{:?}: {err}",
                String::from_utf8_lossy(bad)
            );
        }
        for conflict in [
            &b"a|/r|/x;a|/s|/y"[..],
            b"a|/r|/x;b|/r|/y",
            b"a|/r|/x;b|/r/s|/y",
            b"a|/r/s|/x;b|/r|/y",
        ] {
            assert!(matches!(
                Filesets::parse(conflict),
                Err(FilesetError::Conflict(_))
            ));
        }
        // Siblings sharing a prefix are not nested.
        assert!(Filesets::parse(b"a|/r|/x;b|/rs|/y").is_ok());
    }

    #[test]
    fn a_missing_ring_drops_operations_without_failing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = format!("d|/nonexistent-root|{}/ring", dir.path().display());
        let sets = Filesets::parse(spec.as_bytes()).expect("valid");
        let op = OpRef::Unlink { path: b"x" };
        assert!(sets.append(0, op).expect("no error").is_none());
        assert!(sets.append(0, op).expect("no error").is_none());
        assert_eq!(sets.dropped(0), 2);
        assert!(
            sets.append(7, op)
                .expect("bad index logs nothing")
                .is_none()
        );
        assert!(sets.order_lock(7).is_none());
    }
}
