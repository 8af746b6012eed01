//! The shim's process state: the sink, the table of tracked descriptors and stdio streams, and
//! the one lock that orders "real call, then ring append" among this process's threads.
//!
//! Owns the fd table's invariants (a descriptor's bit in [`fdbits`] is set iff it is in the
//! table) and its life across fork. It must never hold the lock while waiting for backups.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use ft::replog::{OpRef, Ticket};
use libc::c_int;

use crate::canon::Canon;
use crate::diag::{self, Trouble};
use crate::fdbits;
use crate::lock::{OrderGuard, OrderLock};
use crate::sink::Sink;

/// The installed shim (absent when the process has no filesets: every wrapper passes through).
static SHIM: OnceLock<Shim> = OnceLock::new();
/// The process the table describes; a vfork child (same memory, other pid) must not edit it.
static OWNER: AtomicI32 = AtomicI32::new(0);
/// Whether fork's prepare handler took the lock (it does not when the forking thread is
/// inside the shim, e.g. a fork from a signal handler).
static FORK_LOCKED: AtomicBool = AtomicBool::new(false);

/// Registered stdio streams, for the lock-free fast paths of fileno/fflush/fclose/fseek.
pub(crate) static COOKIE_STREAMS: AtomicUsize = AtomicUsize::new(0);
/// Mirrored streams (see [`Stream::Mirror`]).
pub(crate) static MIRROR_STREAMS: AtomicUsize = AtomicUsize::new(0);

/// The shim of this process.
#[derive(Debug)]
pub(crate) struct Shim {
    sink: Sink,
    tracked: OrderLock<Tracked>,
}

/// The shim, if this process replicates anything.
#[inline]
pub(crate) fn get() -> Option<&'static Shim> {
    SHIM.get()
}

/// Installs the shim (once, from the constructor).
pub(crate) fn install(sink: Sink) -> Option<&'static Shim> {
    OWNER.store(std::process::id().cast_signed(), Ordering::Relaxed);
    let _ = SHIM.set(Shim {
        sink,
        tracked: OrderLock::new(Tracked::new()),
    });
    SHIM.get()
}

/// Whether this is the process the table belongs to (false in a vfork child).
pub(crate) fn in_owner() -> bool {
    // SAFETY: getpid has no preconditions; glibc does not cache it, so a vfork child sees its
    // own pid.
    let pid = unsafe { libc::getpid() };
    pid == OWNER.load(Ordering::Relaxed)
}

/// pthread_atfork prepare: no tracked operation may be half-done while the address space is
/// copied.
///
/// Lock order is "stdio list lock, then ours" (fflush(NULL) holds glibc's list lock while a
/// cookie stream's write takes ours), and fork takes the list lock after the prepare handlers.
/// So the list lock (recursive) is taken first here, then ours; fork's own take nests.
pub(crate) extern "C" fn fork_prepare() {
    if let Some(shim) = get()
        && !crate::reentry::is_inside()
    {
        if let Some(list_lock) = crate::real::_IO_list_lock() {
            // SAFETY: glibc's exported, argument-less stdio list lock (recursive).
            unsafe { list_lock() };
        }
        shim.tracked.acquire_for_fork();
        FORK_LOCKED.store(true, Ordering::Relaxed);
    }
}

/// pthread_atfork parent.
pub(crate) extern "C" fn fork_parent() {
    if let Some(shim) = get()
        && FORK_LOCKED.swap(false, Ordering::Relaxed)
    {
        shim.tracked.release_after_fork();
        if let (Some(_), Some(list_unlock)) =
            (crate::real::_IO_list_lock(), crate::real::_IO_list_unlock())
        {
            // SAFETY: releases the one level of the list lock taken in `fork_prepare`.
            unsafe { list_unlock() };
        }
    }
}

/// pthread_atfork child: the child keeps its inherited descriptors, so the table stays; only
/// the lock and the owner change (glibc has already reset its list lock in the child).
pub(crate) extern "C" fn fork_child() {
    if let Some(shim) = get() {
        FORK_LOCKED.store(false, Ordering::Relaxed);
        shim.tracked.reset_in_child();
        OWNER.store(std::process::id().cast_signed(), Ordering::Relaxed);
    }
}

impl Shim {
    /// The fileset of a canonical path.
    #[inline]
    pub(crate) fn classify<'p>(&self, canonical: &'p [u8]) -> Option<(usize, &'p [u8])> {
        self.sink.classify(canonical)
    }

    /// Classifies a canonical path.
    pub(crate) fn classify_canon<'c>(&self, canon: &'c Canon) -> Option<(usize, &'c [u8])> {
        self.classify(canon.as_bytes())
    }

    /// Takes the lock for one intercepted call.
    pub(crate) fn session(&self) -> Session<'_> {
        Session {
            shim: self,
            guard: Some(self.tracked.lock()),
            pending: Cell::new([None, None]),
        }
    }
}

/// An open file description being tracked (shared by the descriptors dup'ed from it).
#[derive(Debug)]
pub(crate) struct Desc {
    /// Index of the fileset.
    pub(crate) fileset: usize,
    /// Path relative to the fileset's root.
    pub(crate) path: Vec<u8>,
    /// Whether writes through it append (`O_APPEND`): read when tracking starts and again
    /// after every `fcntl(F_SETFL)` through the shim, so that positioned writes are located
    /// without a syscall each. See [`crate::rec::written_at`].
    pub(crate) appends: Cell<bool>,
}

/// A stdio stream the shim knows.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    /// A stream of ours (fopencookie) writing through the shim to descriptor `fd`.
    Cookie { fd: c_int },
    /// A glibc stream on a tracked descriptor that writes through glibc's internal write,
    /// which no wrapper sees (freopen, inherited stdout): its new bytes are read back from the
    /// file at fflush, fclose, seeks and exit. `mark` is the file position up to which the
    /// file has been logged.
    Mirror { fd: c_int, mark: u64 },
}

/// The table: tracked descriptors, their descriptions, and known streams.
#[derive(Debug)]
pub(crate) struct Tracked {
    fds: BTreeMap<c_int, u64>,
    descs: BTreeMap<u64, Desc>,
    next_desc: u64,
    streams: BTreeMap<usize, Stream>,
}

impl Tracked {
    const fn new() -> Self {
        Self {
            fds: BTreeMap::new(),
            descs: BTreeMap::new(),
            next_desc: 0,
            streams: BTreeMap::new(),
        }
    }

    /// The description `fd` refers to, if tracked.
    pub(crate) fn desc(&self, fd: c_int) -> Option<&Desc> {
        self.fds.get(&fd).and_then(|id| self.descs.get(id))
    }

    /// Starts tracking `fd` as a new description. Refuses (false) in a vfork child or beyond
    /// the trackable descriptor range.
    pub(crate) fn track(&mut self, fd: c_int, fileset: usize, path: Vec<u8>) -> bool {
        if !in_owner() {
            return false;
        }
        self.untrack(fd);
        if !fdbits::set(fd) {
            diag::report(
                Trouble::FdRange,
                format_args!(
                    "descriptor {fd} is beyond the tracked range; its writes are not replicated"
                ),
            );
            return false;
        }
        let id = self.next_desc;
        self.next_desc += 1;
        let appends = Cell::new(crate::rec::appends(fd));
        self.descs.insert(
            id,
            Desc {
                fileset,
                path,
                appends,
            },
        );
        self.fds.insert(fd, id);
        true
    }

    /// Makes `new` refer to `old`'s description (dup), or untracks `new` if `old` is not
    /// tracked.
    pub(crate) fn share(&mut self, old: c_int, new: c_int) {
        if !in_owner() || old == new {
            return;
        }
        self.untrack(new);
        if let Some(&id) = self.fds.get(&old)
            && fdbits::set(new)
        {
            self.fds.insert(new, id);
        }
    }

    /// Forgets `fd` (closed or reused); drops its description when no descriptor is left.
    pub(crate) fn untrack(&mut self, fd: c_int) {
        if !in_owner() {
            return;
        }
        fdbits::clear(fd);
        if let Some(id) = self.fds.remove(&fd)
            && !self.fds.values().any(|&other| other == id)
        {
            self.descs.remove(&id);
        }
        let before = self.streams.len();
        self.streams
            .retain(|_, s| !matches!(s, Stream::Mirror { fd: m, .. } if *m == fd));
        let gone = before - self.streams.len();
        MIRROR_STREAMS.fetch_sub(gone, Ordering::Relaxed);
    }

    /// Forgets every tracked descriptor in `first..=last`.
    pub(crate) fn untrack_range(&mut self, first: c_int, last: c_int) {
        let fds: Vec<c_int> = self.fds.range(first..=last).map(|(&fd, _)| fd).collect();
        for fd in fds {
            self.untrack(fd);
        }
    }

    /// Descriptions in `fileset` at `path` or beneath it.
    pub(crate) fn descs_under(&self, fileset: usize, path: &[u8]) -> Vec<u64> {
        self.descs
            .iter()
            .filter(|(_, d)| d.fileset == fileset && beneath_or_at(&d.path, path))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Moves descriptions `ids` (found under `from`) to the same place under `to`, or stops
    /// tracking them when `to` is outside every fileset.
    pub(crate) fn relocate(&mut self, ids: &[u64], from: &[u8], to: Option<(usize, &[u8])>) {
        if !in_owner() {
            return;
        }
        for id in ids {
            match to {
                Some((fileset, to)) => {
                    if let Some(desc) = self.descs.get_mut(id) {
                        let mut path = to.to_vec();
                        path.extend_from_slice(&desc.path[from.len()..]);
                        desc.path = path;
                        desc.fileset = fileset;
                    }
                }
                None => {
                    let fds: Vec<c_int> = self
                        .fds
                        .iter()
                        .filter(|&(_, d)| d == id)
                        .map(|(&fd, _)| fd)
                        .collect();
                    for fd in fds {
                        self.untrack(fd);
                    }
                }
            }
        }
    }

    /// Stops tracking descriptions of exactly `path` (it was unlinked or replaced): their
    /// later writes go to an inode the fileset no longer names.
    pub(crate) fn forget_path(&mut self, fileset: usize, path: &[u8]) {
        let ids: Vec<u64> = self
            .descs
            .iter()
            .filter(|(_, d)| d.fileset == fileset && d.path == path)
            .map(|(&id, _)| id)
            .collect();
        self.relocate(&ids, path, None);
    }

    /// The stream registered at `file`.
    pub(crate) fn stream(&self, file: *mut libc::FILE) -> Option<Stream> {
        self.streams.get(&(file as usize)).copied()
    }

    /// Registers or replaces a stream.
    pub(crate) fn set_stream(&mut self, file: *mut libc::FILE, stream: Stream) {
        let counter = |s: &Stream| match s {
            Stream::Cookie { .. } => &COOKIE_STREAMS,
            Stream::Mirror { .. } => &MIRROR_STREAMS,
        };
        counter(&stream).fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.streams.insert(file as usize, stream) {
            counter(&old).fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forgets a stream.
    pub(crate) fn remove_stream(&mut self, file: *mut libc::FILE) -> Option<Stream> {
        let old = self.streams.remove(&(file as usize))?;
        match old {
            Stream::Cookie { .. } => COOKIE_STREAMS.fetch_sub(1, Ordering::Relaxed),
            Stream::Mirror { .. } => MIRROR_STREAMS.fetch_sub(1, Ordering::Relaxed),
        };
        Some(old)
    }

    /// Every mirrored stream.
    pub(crate) fn mirrors(&self) -> Vec<(usize, c_int)> {
        self.streams
            .iter()
            .filter_map(|(&f, s)| match s {
                Stream::Mirror { fd, .. } => Some((f, *fd)),
                Stream::Cookie { .. } => None,
            })
            .collect()
    }
}

/// Whether `path` is `prefix` or lies beneath it.
pub(crate) fn beneath_or_at(path: &[u8], prefix: &[u8]) -> bool {
    path == prefix
        || (path.len() > prefix.len() && path.starts_with(prefix) && path[prefix.len()] == b'/')
}

/// Durability waits owed after the lock is released: one per fileset touched.
type Pending = [Option<(usize, Ticket)>; 2];

/// One intercepted call's hold on the lock. Dropping it releases the lock and then waits for
/// the backups if a fileset is in sync mode.
pub(crate) struct Session<'s> {
    shim: &'s Shim,
    guard: Option<OrderGuard<'s, Tracked>>,
    pending: Cell<Pending>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session")
    }
}

impl Session<'_> {
    /// The shim.
    pub(crate) fn shim(&self) -> &Shim {
        self.shim
    }

    /// The table.
    pub(crate) fn tracked(&self) -> &Tracked {
        self.guard
            .as_ref()
            .expect("the guard is only taken out in Drop")
    }

    /// The table, for changes.
    pub(crate) fn tracked_mut(&mut self) -> &mut Tracked {
        self.guard
            .as_mut()
            .expect("the guard is only taken out in Drop")
    }

    /// Appends `op` to `fileset`'s ring.
    pub(crate) fn emit(&self, fileset: usize, op: OpRef<'_>) {
        if let Some(ticket) = self.shim.sink.append(fileset, op) {
            let mut pending = self.pending.get();
            let slot = pending
                .iter()
                .position(|p| p.is_none_or(|(f, _)| f == fileset))
                .unwrap_or(pending.len() - 1);
            pending[slot] = Some((fileset, ticket));
            self.pending.set(pending);
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        for (fileset, ticket) in self.pending.get().into_iter().flatten() {
            self.shim.sink.wait_durable(fileset, ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests change the process-wide owner pid: one at a time.
    static OWNER_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn dups_share_descriptions_and_renames_move_or_drop_them() {
        let _one = OWNER_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Descriptor numbers far above what the test process uses: only the bits matter.
        let (a, b, c) = (3_000_001, 3_000_002, 3_000_003);
        OWNER.store(std::process::id().cast_signed(), Ordering::Relaxed);
        let mut t = Tracked::new();
        assert!(t.track(a, 0, b"dir/f".to_vec()));
        t.share(a, b);
        assert!(t.track(c, 0, b"dirt/g".to_vec()));
        assert!(fdbits::is_set(b));

        let ids = t.descs_under(0, b"dir");
        assert_eq!(ids.len(), 1, "dir/f only: dirt/ is not beneath dir/");
        t.relocate(&ids, b"dir", Some((0, &b"moved"[..])));
        assert_eq!(t.desc(b).map(|d| d.path.as_slice()), Some(&b"moved/f"[..]));
        assert_eq!(t.desc(c).map(|d| d.path.as_slice()), Some(&b"dirt/g"[..]));

        // Closing one dup keeps the description for the other.
        t.untrack(a);
        assert!(!fdbits::is_set(a));
        assert!(t.desc(b).is_some());

        // Unlinking the file stops tracking every descriptor of it.
        t.forget_path(0, b"moved/f");
        assert!(t.desc(b).is_none() && !fdbits::is_set(b));

        // A rename out of every fileset drops the description.
        let ids = t.descs_under(0, b"dirt");
        t.relocate(&ids, b"dirt", None);
        assert!(t.desc(c).is_none() && !fdbits::is_set(c));
        assert!(t.descs.is_empty() && t.fds.is_empty());
    }

    #[test]
    fn a_vfork_child_never_edits_the_table() {
        let _one = OWNER_TESTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fd = 3_000_010;
        OWNER.store(-1, Ordering::Relaxed);
        let mut t = Tracked::new();
        assert!(!t.track(fd, 0, b"f".to_vec()));
        assert!(!fdbits::is_set(fd));
        OWNER.store(std::process::id().cast_signed(), Ordering::Relaxed);
    }
}
