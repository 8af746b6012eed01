//! The rules of copy mode, sans-IO: which paths changed, when a changed path has been quiet long
//! enough, and which ops turn what is observed at a path into the replica's state. Time is passed
//! in; the tree is read through [`Tree`] and ops leave through [`Sink`], so tests drive it with
//! a simulated clock and an in-memory tree. It never touches a clock, a watcher or a channel.
//!
//! ```text
//!   WatchEvent ──on_event──► namespace ops at once (Rename, Unlink, Rmdir), paths marked pending
//!   clock ──────poll──────► a pending path quiet for `quiet` ──observe(Tree)──► copy ops ──► Sink
//! ```
//!
//! Invariant (what makes the op stream applicable): for every pending path the engine knows
//! what the replica holds there ([`Replica`]); a path beneath a pending entry whose replica copy
//! is not [`Replica::Present`] is absent on the replica, and no op is ever emitted beneath such an
//! entry: it is copied ("materialized") first.
//!
//! Excluded paths ([`Exclude`]) are never pending and never named by an op: the replica does
//! not have them. So an entry renamed from an excluded name arrives like one moved into the
//! tree (it is copied), and one renamed to an excluded name leaves like one moved out of it.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;
use std::ops::Bound;
use std::time::{Duration, Instant};

use super::exclude::Exclude;
use crate::{Op, OpRecord, RelPath};

/// Most bytes one `Write` op carries.
pub const COPY_CHUNK_BYTES: usize = 1 << 20;

/// How long the engine waits for the event that explains an observation (the second half of a
/// rename, the removal of a path found missing) before it treats the tree as unknown.
pub const EVENT_GRACE: Duration = Duration::from_millis(100);

/// Consecutive failures to read a path before the engine gives it up until it changes again.
pub const MAX_COPY_FAILURES: u32 = 5;

/// Longest quiet interval or maximum delay accepted (keeps deadline arithmetic far from
/// overflow).
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Removed directories remembered to recognise late events beneath them; beyond this the set is
/// forgotten and such an event causes a rescan instead.
const MAX_REMOVED_DIRS: usize = 4096;

/// Mode bits carried by `Create`, `Mkdir` and `Chmod`.
const PERMISSION_BITS: u32 = 0o7777;

/// Kind of a removed entry, as the watcher reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Anything but a directory (file, symlink, special file).
    File,
    /// A directory.
    Dir,
}

/// A change beneath the root, already confined to it (see `event::interpret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// An entry was created at `path` (nothing was there just before).
    Created { path: RelPath },
    /// The content or metadata of `path` changed.
    Changed { path: RelPath },
    /// The entry at `path` was removed.
    Removed {
        path: RelPath,
        kind: Option<EntryKind>,
    },
    /// First half of a rename: the entry left `path`.
    RenameFrom { path: RelPath, tracker: usize },
    /// Second half of a rename (or a rename into the tree): an entry arrived at `path`.
    RenameTo {
        path: RelPath,
        tracker: Option<usize>,
    },
    /// Events were lost or cannot be interpreted exactly: the backups must be resynced.
    Rescan { why: String },
}

/// What the replica holds at a pending path, given every op emitted so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replica {
    /// The replica has this entry (of the same kind; its content may be old).
    Present,
    /// The replica has nothing here, nor beneath.
    Absent,
    /// The replica has an unrelated old entry here that must go first: an entry renamed over
    /// it on the primary replaced it (so it is an empty directory exactly when the new entry is
    /// a directory). Nothing beneath it belongs to the primary's entry.
    Stale,
}

/// Metadata of an open regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// `st_mode` (permission bits are taken from it).
    pub mode: u32,
    /// Length in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// What is at a path now (without following a symlink at the end or anywhere on the way).
#[derive(Debug)]
pub enum Observed<F> {
    /// Nothing (or a path that now runs through a symlink or a non-directory).
    Missing,
    /// A directory.
    Dir { mode: u32 },
    /// A symbolic link.
    Symlink { target: Vec<u8> },
    /// A regular file, opened for reading.
    File(F),
    /// A FIFO, socket or device: not replicated.
    Other,
}

/// Read access to the tree beneath the root.
pub trait Tree {
    /// An open regular file.
    type File: TreeFile;
    /// What is at `path`.
    fn observe(&mut self, path: &RelPath) -> io::Result<Observed<Self::File>>;
    /// The names in directory `dir`, or `None` when it is gone.
    fn list(&mut self, dir: &RelPath) -> io::Result<Option<Vec<Vec<u8>>>>;
    /// Whether `path` is a directory now.
    fn is_dir(&mut self, path: &RelPath) -> io::Result<bool>;
}

/// An open regular file of a [`Tree`].
pub trait TreeFile {
    /// Its metadata now.
    fn meta(&mut self) -> io::Result<FileMeta>;
    /// Reads at `offset`; `Ok(0)` is the end of the file.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

/// The consumer of the engine's output went away or asked it to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// Where the engine's output goes, in order.
pub trait Sink {
    /// The next record (seqs are dense).
    fn record(&mut self, rec: OpRecord) -> Result<(), Stopped>;
    /// The backups must be resynced; the next record will carry `next_seq`.
    fn rescan(&mut self, next_seq: u64) -> Result<(), Stopped>;
}

#[derive(Debug)]
struct Held {
    path: RelPath,
    tracker: usize,
    at: Instant,
}

#[derive(Debug)]
struct Pending {
    path: RelPath,
    replica: Replica,
    /// First change of the current quiet window (for the maximum delay).
    first: Instant,
    due: Instant,
    /// Tie-breaker in the due index.
    tick: u64,
    /// When the path was first found missing at its due time, waiting for the event that
    /// explains it.
    missing_since: Option<Instant>,
    failures: u32,
    /// When an event said the entry appeared (created or renamed into place): a watcher may add the
    /// watch on a new directory only after reporting it, so such a directory is listed no
    /// sooner than [`EVENT_GRACE`] after this.
    appeared: Option<Instant>,
}

impl Pending {
    fn new(path: RelPath, replica: Replica, first: Instant, due: Instant) -> Self {
        Self {
            path,
            replica,
            first,
            due,
            tick: 0,
            missing_since: None,
            failures: 0,
            appeared: None,
        }
    }
}

/// The copy-mode rules for one fileset.
#[derive(Debug)]
pub struct CopyEngine {
    quiet: Duration,
    max_delay: Option<Duration>,
    next_seq: u64,
    pending: BTreeMap<Vec<u8>, Pending>,
    due: BTreeMap<(Instant, u64), Vec<u8>>,
    ticks: u64,
    /// The first half of a rename waiting for its second half: until it arrives (or the
    /// grace period ends in a rescan) later events wait in `deferred` and nothing is copied,
    /// so that no op is emitted against a replica that still has the renamed entry.
    held: Option<Held>,
    deferred: VecDeque<WatchEvent>,
    removed_dirs: HashSet<Vec<u8>>,
    exclude: Exclude,
}

impl CopyEngine {
    /// An engine that copies a path once it has been quiet for `quiet` (or, with `max_delay`,
    /// at the latest that long after its first change), numbering records from `first_seq`.
    /// Intervals are capped at [`MAX_INTERVAL`].
    pub fn new(quiet: Duration, max_delay: Option<Duration>, first_seq: u64) -> Self {
        Self {
            quiet: quiet.min(MAX_INTERVAL),
            max_delay: max_delay.map(|d| d.min(MAX_INTERVAL)),
            next_seq: first_seq.max(1),
            pending: BTreeMap::new(),
            due: BTreeMap::new(),
            ticks: 0,
            held: None,
            deferred: VecDeque::new(),
            removed_dirs: HashSet::new(),
            exclude: Exclude::default(),
        }
    }

    /// The engine ignoring every path that `exclude` excludes (see [`Exclude::excludes`]).
    pub fn with_exclude(mut self, exclude: Exclude) -> Self {
        self.exclude = exclude;
        self
    }

    fn excluded(&self, path: &RelPath) -> bool {
        self.exclude.excludes(path.as_bytes())
    }

    /// The seq the next record will carry.
    #[cfg(test)]
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Paths waiting to be copied.
    #[cfg(test)]
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// When [`poll`](Self::poll) next has work, if ever.
    pub fn next_wakeup(&self) -> Option<Instant> {
        match &self.held {
            Some(h) => Some(h.at + EVENT_GRACE),
            None => self.due.first_key_value().map(|(&(at, _), _)| at),
        }
    }

    /// Feeds one event. Namespace changes (renames, removals) are emitted at once, in event
    /// order; content is copied later by [`poll`](Self::poll).
    pub fn on_event<T: Tree, S: Sink>(
        &mut self,
        now: Instant,
        ev: WatchEvent,
        tree: &mut T,
        sink: &mut S,
    ) -> Result<(), Stopped> {
        if let WatchEvent::Rescan { why } = &ev {
            return self.rescan(why, sink);
        }
        // An excluded name is nothing to the replica. The first half of a rename away from one
        // is dropped too: its second half then arrives alone, like an entry moved in from
        // outside the tree, which is what it is for the replica. A second half to an excluded
        // name is kept: it may complete a rename the replica must see as a removal.
        match &ev {
            WatchEvent::Created { path }
            | WatchEvent::Changed { path }
            | WatchEvent::Removed { path, .. }
            | WatchEvent::RenameFrom { path, .. }
                if self.excluded(path) =>
            {
                return Ok(());
            }
            _ => {}
        }
        if let Some(h) = &self.held {
            let completes =
                matches!(&ev, WatchEvent::RenameTo { tracker: Some(t), .. } if *t == h.tracker);
            if !completes {
                self.deferred.push_back(ev);
                return Ok(());
            }
        }
        match ev {
            WatchEvent::Created { path } => {
                self.removed_dirs.remove(path.as_bytes());
                // Nothing was at the path on the primary just before, so (all earlier events
                // having been turned into ops) nothing is on the replica either.
                self.touch(now, path, Replica::Absent, |r| match r {
                    Replica::Present => Replica::Stale,
                    other => other,
                });
            }
            WatchEvent::Changed { path } => self.touch(now, path, Replica::Present, |r| r),
            WatchEvent::Removed { path, kind } => self.on_removed(path, kind, sink)?,
            WatchEvent::RenameFrom { path, tracker } => {
                self.held = Some(Held {
                    path,
                    tracker,
                    at: now,
                });
            }
            WatchEvent::RenameTo { path, .. } => match self.held.take() {
                // (only the matching second half gets here while a first half is held)
                Some(h) => {
                    self.on_renamed(now, h.path, path, tree, sink)?;
                    // What arrived meanwhile, in order (it may hold another first half).
                    for ev in std::mem::take(&mut self.deferred) {
                        self.on_event(now, ev, tree, sink)?;
                    }
                }
                None if self.excluded(&path) => {}
                None => self.on_moved_in(now, path),
            },
            WatchEvent::Rescan { .. } => {}
        }
        Ok(())
    }

    /// Does the next piece of due work (one path, with whatever must be copied before it).
    /// Returns whether it did anything; call it again until it returns `false`.
    pub fn poll<T: Tree, S: Sink>(
        &mut self,
        now: Instant,
        tree: &mut T,
        sink: &mut S,
    ) -> Result<bool, Stopped> {
        if let Some(h) = &self.held {
            if h.at + EVENT_GRACE > now {
                return Ok(false);
            }
            let why = format!(
                "{:?} was renamed out of the tree (or the second half of its rename was lost)",
                h.path
            );
            self.rescan(&why, sink)?;
            return Ok(true);
        }
        let Some((&(due, _), key)) = self.due.first_key_value() else {
            return Ok(false);
        };
        if due > now {
            return Ok(false);
        }
        let key = key.clone();
        let Some(path) = self.pending.get(&key).map(|p| p.path.clone()) else {
            // Cannot happen (the two maps change together); heal rather than spin.
            self.due.pop_first();
            return Ok(true);
        };
        if self.materialize_ancestors(now, &path, tree, sink)? {
            self.copy(now, &key, false, tree, sink)?;
        } else {
            // An ancestor could not be copied yet (gone, or unreadable): try again after it.
            let retry = now + self.quiet.max(EVENT_GRACE);
            self.reschedule(&key, retry);
        }
        Ok(true)
    }

    // ----- events -----

    fn on_removed<S: Sink>(
        &mut self,
        path: RelPath,
        kind: Option<EntryKind>,
        sink: &mut S,
    ) -> Result<(), Stopped> {
        let replica = self.effective(&path);
        self.take_subtree(path.as_bytes());
        if kind == Some(EntryKind::Dir) {
            if self.removed_dirs.len() >= MAX_REMOVED_DIRS {
                self.removed_dirs.clear();
            }
            self.removed_dirs.insert(path.as_bytes().to_vec());
        }
        if replica == Replica::Absent {
            return Ok(());
        }
        // Children were removed (and their events turned into ops) before the directory.
        match kind {
            Some(EntryKind::File) => self.emit(Op::Unlink { path }, sink),
            Some(EntryKind::Dir) => self.emit(Op::Rmdir { path }, sink),
            None => self.rescan(&format!("{path:?} was removed, kind unknown"), sink),
        }
    }

    fn on_renamed<T: Tree, S: Sink>(
        &mut self,
        now: Instant,
        from: RelPath,
        to: RelPath,
        tree: &mut T,
        sink: &mut S,
    ) -> Result<(), Stopped> {
        self.removed_dirs.remove(to.as_bytes());
        if from == to {
            return Ok(());
        }
        if to.starts_with(&from) || from.starts_with(&to) {
            // The kernel refuses these renames; an event saying otherwise is not understood.
            return self.rescan(&format!("impossible rename {from:?} -> {to:?}"), sink);
        }
        if self.excluded(&to) {
            return self.on_renamed_away(from, &to, tree, sink);
        }
        let from_replica = self.effective(&from);
        let to_replica = self.effective(&to);
        if from_replica == Replica::Stale {
            // The replica holds an unrelated old entry at the source (or nothing), not the
            // entry that moved: remove it (its kind matches the moved entry's, by rename(2)'s
            // rules) and copy the entry at its new place.
            let removal = match tree.observe(&to) {
                Ok(Observed::Dir { .. }) => Op::Rmdir { path: from.clone() },
                Ok(Observed::Missing) | Err(_) => {
                    return self.rescan(
                        &format!("{to:?} vanished right after it was renamed from {from:?}"),
                        sink,
                    );
                }
                Ok(_) => Op::Unlink { path: from.clone() },
            };
            self.emit(removal, sink)?;
        }
        if from_replica != Replica::Present {
            // The replica does not have the source: the entry is new at `to`, over whatever
            // the replica holds there.
            self.take_subtree(to.as_bytes());
            let moved = self.take_subtree(from.as_bytes());
            self.reinsert_moved(&from, &to, moved);
            let state = if to_replica == Replica::Absent {
                Replica::Absent
            } else {
                Replica::Stale
            };
            let due = self.due_at(now, now);
            match self.pending.get_mut(to.as_bytes()) {
                Some(p) => {
                    p.replica = state;
                    p.appeared = Some(now);
                }
                None => self.insert(Pending {
                    appeared: Some(now),
                    ..Pending::new(to, state, now, due)
                }),
            }
            return Ok(());
        }
        if !self.materialize_ancestors(now, &to, tree, sink)? {
            return self.rescan(
                &format!("the target directory of rename {from:?} -> {to:?} cannot be copied"),
                sink,
            );
        }
        self.emit(
            Op::Rename {
                from: from.clone(),
                to: to.clone(),
            },
            sink,
        )?;
        // Whatever was pending at the target was replaced; what was pending at the source now
        // lives at the target, with the same replica state (the replica renamed it too).
        self.take_subtree(to.as_bytes());
        let moved = self.take_subtree(from.as_bytes());
        self.reinsert_moved(&from, &to, moved);
        Ok(())
    }

    /// `from` was renamed to the excluded name `to`: for the replica, it is gone.
    fn on_renamed_away<T: Tree, S: Sink>(
        &mut self,
        from: RelPath,
        to: &RelPath,
        tree: &mut T,
        sink: &mut S,
    ) -> Result<(), Stopped> {
        let replica = self.effective(&from);
        // Copies pending at or beneath the source would name paths that left the fileset.
        self.take_subtree(from.as_bytes());
        if replica == Replica::Absent {
            return Ok(());
        }
        // Whatever the replica holds at the source (the entry, or an unrelated old one of the
        // same kind) must go. A file goes with an unlink; a directory's replica copy has
        // entries the engine cannot name exactly (some may be pending), so the backups are
        // compared instead, as for a directory moved out of the tree.
        match tree.observe(to) {
            Ok(Observed::Dir { .. }) => self.rescan(
                &format!("directory {from:?} was renamed to the excluded name {to:?}"),
                sink,
            ),
            Ok(Observed::Missing) | Err(_) => self.rescan(
                &format!(
                    "{to:?} vanished right after {from:?} was renamed to it (an excluded name)"
                ),
                sink,
            ),
            Ok(Observed::File(_) | Observed::Symlink { .. } | Observed::Other) => {
                self.emit(Op::Unlink { path: from }, sink)
            }
        }
    }

    fn on_moved_in(&mut self, now: Instant, path: RelPath) {
        self.removed_dirs.remove(path.as_bytes());
        let replica = self.effective(&path);
        self.take_subtree(path.as_bytes());
        let state = if replica == Replica::Absent {
            Replica::Absent
        } else {
            Replica::Stale
        };
        let due = self.due_at(now, now);
        self.insert(Pending {
            appeared: Some(now),
            ..Pending::new(path, state, now, due)
        });
    }

    fn rescan<S: Sink>(&mut self, why: &str, sink: &mut S) -> Result<(), Stopped> {
        tracing::warn!(
            why,
            dropped = self.pending.len(),
            next_seq = self.next_seq,
            "copy mode: rescan, the backups will be resynced"
        );
        // The resync copies the primary as it is after this point, which covers everything
        // pending now.
        self.pending.clear();
        self.due.clear();
        self.held = None;
        self.deferred.clear();
        self.removed_dirs.clear();
        sink.rescan(self.next_seq)
    }

    // ----- copying -----

    /// Copies every pending ancestor of `path` whose replica copy is not present, top-down.
    /// Returns whether all of them are present now.
    fn materialize_ancestors<T: Tree, S: Sink>(
        &mut self,
        now: Instant,
        path: &RelPath,
        tree: &mut T,
        sink: &mut S,
    ) -> Result<bool, Stopped> {
        let bytes = path.as_bytes();
        for cut in slash_positions(bytes) {
            let key = &bytes[..cut];
            let unmaterialized = self
                .pending
                .get(key)
                .is_some_and(|p| p.replica != Replica::Present);
            if !unmaterialized {
                continue;
            }
            let key = key.to_vec();
            // An event beneath it came from a watch added after (while walking) the
            // one on this directory: it can be listed now.
            self.copy(now, &key, true, tree, sink)?;
            if self
                .pending
                .get(&key)
                .is_some_and(|p| p.replica != Replica::Present)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Copies the pending entry `key` (its ancestors are materialized); `watched`: a directory
    /// that just appeared is known to be watched already.
    fn copy<T: Tree, S: Sink>(
        &mut self,
        now: Instant,
        key: &[u8],
        watched: bool,
        tree: &mut T,
        sink: &mut S,
    ) -> Result<(), Stopped> {
        let Some(entry) = self.remove_pending(key) else {
            return Ok(());
        };
        let path = entry.path.clone();
        let state = entry.replica;
        let observed = match tree.observe(&path) {
            Ok(o) => o,
            Err(e) => {
                self.failed(now, entry, &e);
                return Ok(());
            }
        };
        match observed {
            Observed::Missing => self.on_missing(now, entry, tree, sink)?,
            Observed::Dir { mode } => {
                // A directory the replica lacks may hold entries no event reported (created
                // before the watch on it existed): list it before creating it, once the watch
                // exists.
                if let Some(listable) = entry.appeared.map(|t| t + EVENT_GRACE)
                    && state != Replica::Present
                    && !watched
                    && now < listable
                {
                    self.insert(Pending {
                        due: listable,
                        ..entry
                    });
                    return Ok(());
                }
                let children = if state == Replica::Present {
                    Vec::new()
                } else {
                    match tree.list(&path) {
                        Ok(Some(names)) => names,
                        Ok(None) => return self.on_missing(now, entry, tree, sink),
                        Err(e) => {
                            self.failed(now, entry, &e);
                            return Ok(());
                        }
                    }
                };
                if state == Replica::Stale {
                    self.emit(Op::Rmdir { path: path.clone() }, sink)?;
                }
                let mode = mode & PERMISSION_BITS;
                self.emit(
                    Op::Mkdir {
                        path: path.clone(),
                        mode,
                    },
                    sink,
                )?;
                self.emit(
                    Op::Chmod {
                        path: path.clone(),
                        mode,
                    },
                    sink,
                )?;
                for name in children {
                    self.discovered(now, &path, name);
                }
            }
            Observed::Symlink { target } => {
                if state != Replica::Absent {
                    self.emit(Op::Unlink { path: path.clone() }, sink)?;
                }
                self.emit(Op::Symlink { target, path }, sink)?;
            }
            Observed::File(file) => {
                if state == Replica::Stale {
                    self.emit(Op::Unlink { path: path.clone() }, sink)?;
                }
                self.copy_file(now, entry, file, sink)?;
            }
            Observed::Other => {
                if state != Replica::Absent {
                    self.emit(Op::Unlink { path: path.clone() }, sink)?;
                }
                tracing::debug!(%path, "copy mode: special file not replicated");
            }
        }
        Ok(())
    }

    /// A child found by listing a directory the replica lacked: absent there too.
    fn discovered(&mut self, now: Instant, dir: &RelPath, name: Vec<u8>) {
        if self.exclude.excludes_name(&name) {
            return;
        }
        let mut bytes = Vec::with_capacity(dir.as_bytes().len() + 1 + name.len());
        bytes.extend_from_slice(dir.as_bytes());
        bytes.push(b'/');
        bytes.extend_from_slice(&name);
        if let Some(p) = self.pending.get_mut(&bytes) {
            p.replica = Replica::Absent;
            return;
        }
        match RelPath::new(bytes) {
            // Quiet since before the listing (a change would have been reported by the watch
            // that exists by now): due at once.
            Ok(path) => self.insert(Pending::new(path, Replica::Absent, now, now)),
            Err(e) => {
                tracing::warn!(dir = %dir, error = %e, "copy mode: entry not replicated");
            }
        }
    }

    fn copy_file<F: TreeFile, S: Sink>(
        &mut self,
        now: Instant,
        entry: Pending,
        mut file: F,
        sink: &mut S,
    ) -> Result<(), Stopped> {
        let path = entry.path.clone();
        let before = match file.meta() {
            Ok(m) => m,
            Err(e) => {
                self.failed(now, entry, &e);
                return Ok(());
            }
        };
        let mode = before.mode & PERMISSION_BITS;
        self.emit(
            Op::Create {
                path: path.clone(),
                mode,
            },
            sink,
        )?;
        self.emit(
            Op::Truncate {
                path: path.clone(),
                len: before.len,
            },
            sink,
        )?;
        let mut offset = 0u64;
        let mut torn = false;
        let mut read_error = None;
        while offset < before.len {
            let want = usize::try_from(before.len - offset)
                .unwrap_or(COPY_CHUNK_BYTES)
                .min(COPY_CHUNK_BYTES);
            let mut data = vec![0u8; want];
            let mut got = 0usize;
            while got < want {
                let at = offset + u64::try_from(got).unwrap_or(u64::MAX);
                match file.read_at(&mut data[got..], at) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        read_error = Some(e);
                        break;
                    }
                }
            }
            data.truncate(got);
            if got > 0 {
                self.emit(
                    Op::Write {
                        path: path.clone(),
                        offset,
                        data,
                    },
                    sink,
                )?;
            }
            offset += u64::try_from(got).unwrap_or(u64::MAX);
            if got < want {
                // Shorter than it was a moment ago: it is changing under us.
                torn = true;
                break;
            }
        }
        self.emit(
            Op::Chmod {
                path: path.clone(),
                mode,
            },
            sink,
        )?;
        self.emit(
            Op::SetTimes {
                path: path.clone(),
                atime_ns: None,
                mtime_ns: Some(before.mtime_ns),
            },
            sink,
        )?;
        // What was emitted made the replica's file exist, whatever state it had.
        let entry = Pending {
            replica: Replica::Present,
            ..entry
        };
        if let Some(e) = read_error {
            self.failed(now, entry, &e);
            return Ok(());
        }
        let changed = match file.meta() {
            Ok(after) => after != before,
            Err(_) => true,
        };
        if torn || changed {
            tracing::debug!(%path, "copy mode: file changed while it was read; copying it again");
            let due = self.due_at(now, now);
            self.insert(Pending {
                first: now,
                due,
                missing_since: None,
                failures: 0,
                ..entry
            });
        }
        Ok(())
    }

    fn on_missing<T: Tree, S: Sink>(
        &mut self,
        now: Instant,
        entry: Pending,
        tree: &mut T,
        sink: &mut S,
    ) -> Result<(), Stopped> {
        if entry.missing_since.is_none() {
            // Its removal or rename is probably on the way: wait for that event.
            self.insert(Pending {
                due: now + EVENT_GRACE,
                missing_since: Some(now),
                ..entry
            });
            return Ok(());
        }
        if self.explained_missing(&entry.path, tree) {
            // Gone from a directory that still exists (its removal or rename was turned into
            // ops, or an event arrived after the removal, such as the close of an unlinked
            // file), or beneath a directory whose removal was seen.
            tracing::debug!(path = %entry.path, "copy mode: changed path is gone");
            return Ok(());
        }
        self.rescan(
            &format!(
                "{:?} changed but its directory vanished without an event",
                entry.path
            ),
            sink,
        )
    }

    fn explained_missing<T: Tree>(&self, path: &RelPath, tree: &mut T) -> bool {
        let mut top_missing = path.clone();
        while let Some(parent) = top_missing.parent() {
            match tree.is_dir(&parent) {
                Ok(true) => break,
                Ok(false) => top_missing = parent,
                Err(_) => return false,
            }
        }
        top_missing == *path || self.removed_dirs.contains(top_missing.as_bytes())
    }

    fn failed(&mut self, now: Instant, entry: Pending, err: &io::Error) {
        let failures = entry.failures + 1;
        if failures > MAX_COPY_FAILURES {
            tracing::error!(
                path = %entry.path,
                error = %err,
                "copy mode: cannot read the path; giving up until it changes again"
            );
            return;
        }
        tracing::warn!(path = %entry.path, error = %err, failures, "copy mode: cannot read the path; retrying");
        self.insert(Pending {
            due: now + self.quiet.max(EVENT_GRACE),
            failures,
            ..entry
        });
    }

    fn emit<S: Sink>(&mut self, op: Op, sink: &mut S) -> Result<(), Stopped> {
        let seq = self.next_seq;
        sink.record(OpRecord { seq, op })?;
        self.next_seq += 1;
        Ok(())
    }

    // ----- bookkeeping -----

    fn due_at(&self, first: Instant, now: Instant) -> Instant {
        let quiet = now + self.quiet;
        match self.max_delay {
            Some(max) => quiet.min(first + max).max(now),
            None => quiet,
        }
    }

    /// Marks `path` changed at `now`: a new entry gets `fresh`, an existing one `existing(old)`.
    fn touch(
        &mut self,
        now: Instant,
        path: RelPath,
        fresh: Replica,
        existing: impl FnOnce(Replica) -> Replica,
    ) {
        let Some(p) = self.pending.get_mut(path.as_bytes()) else {
            let due = self.due_at(now, now);
            let appeared = (fresh == Replica::Absent).then_some(now);
            self.insert(Pending {
                appeared,
                ..Pending::new(path, fresh, now, due)
            });
            return;
        };
        p.replica = existing(p.replica);
        if fresh == Replica::Absent {
            p.appeared = Some(now);
        }
        p.missing_since = None;
        p.failures = 0;
        let first = p.first;
        let due = self.due_at(first, now);
        self.reschedule(path.as_bytes(), due);
    }

    fn insert(&mut self, mut p: Pending) {
        let key = p.path.as_bytes().to_vec();
        self.remove_pending(&key);
        self.ticks += 1;
        p.tick = self.ticks;
        self.due.insert((p.due, p.tick), key.clone());
        self.pending.insert(key, p);
    }

    fn reschedule(&mut self, key: &[u8], due: Instant) {
        let Some(p) = self.pending.get_mut(key) else {
            return;
        };
        self.due.remove(&(p.due, p.tick));
        self.ticks += 1;
        p.tick = self.ticks;
        p.due = due;
        self.due.insert((due, p.tick), key.to_vec());
    }

    fn remove_pending(&mut self, key: &[u8]) -> Option<Pending> {
        let p = self.pending.remove(key)?;
        self.due.remove(&(p.due, p.tick));
        Some(p)
    }

    /// Removes and returns the entry at `key` and every entry beneath it.
    fn take_subtree(&mut self, key: &[u8]) -> Vec<Pending> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        if self.pending.contains_key(key) {
            keys.push(key.to_vec());
        }
        let mut lower = key.to_vec();
        lower.push(b'/');
        let mut upper = key.to_vec();
        // '0' follows '/': [key + "/", key + "0") holds exactly the paths beneath key.
        upper.push(b'0');
        keys.extend(
            self.pending
                .range::<[u8], _>((Bound::Included(&lower[..]), Bound::Excluded(&upper[..])))
                .map(|(k, _)| k.clone()),
        );
        keys.iter().filter_map(|k| self.remove_pending(k)).collect()
    }

    /// Puts entries taken from beneath `from` back beneath `to`.
    fn reinsert_moved(&mut self, from: &RelPath, to: &RelPath, moved: Vec<Pending>) {
        let cut = from.as_bytes().len();
        for p in moved {
            let mut bytes = to.as_bytes().to_vec();
            bytes.extend_from_slice(&p.path.as_bytes()[cut..]);
            match RelPath::new(bytes) {
                Ok(path) => self.insert(Pending {
                    path,
                    missing_since: None,
                    ..p
                }),
                Err(e) => tracing::warn!(
                    path = %p.path,
                    error = %e,
                    "copy mode: renamed entry not replicated"
                ),
            }
        }
    }

    /// What the replica holds at `path`, given the pending entries at and above it.
    fn effective(&self, path: &RelPath) -> Replica {
        let bytes = path.as_bytes();
        let under_unmaterialized = slash_positions(bytes).any(|cut| {
            self.pending
                .get(&bytes[..cut])
                .is_some_and(|p| p.replica != Replica::Present)
        });
        if under_unmaterialized {
            return Replica::Absent;
        }
        self.pending
            .get(bytes)
            .map_or(Replica::Present, |p| p.replica)
    }
}

/// Positions of the separators in a relative path, i.e. the ends of its strict ancestors,
/// shortest first.
fn slash_positions(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'/')
        .map(|(i, _)| i)
}
