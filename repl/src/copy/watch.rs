//! The inotify watch of a fileset: one watch per directory, kept by watch descriptor, and
//! renames applied to the names in queue order, so every event is named by the path its
//! directory had when the kernel queued it. Owns the inotify fd and its thread; it must never
//! follow a symlink, never drop the watch of a directory still in the tree, and never name an
//! event by a path it cannot vouch for (it reports an error instead: the engine rescans).

// notify's own inotify backend is not used: on a directory rename it removes the watches of
// the whole subtree and adds them again after the batch of events it read, so events in the
// subtree in between were lost or named by the old path (a rename out of a just renamed
// directory left its source on the replica).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use notify::event::{
    AccessKind, AccessMode, CreateKind, DataChange, EventKind, Flag, MetadataKind, ModifyKind,
    RemoveKind, RenameMode,
};
use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;

/// Bytes read from the inotify fd at a time (room for hundreds of events).
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// What every directory is watched for: the changes copy mode replicates, never opens or
/// reads (which would fill the kernel's queue while a tree is read).
fn dir_flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::MODIFY
        | WatchFlags::ATTRIB
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::DONT_FOLLOW
        | WatchFlags::ONLYDIR
        | WatchFlags::EXCL_UNLINK
}

/// The root is also watched for its own removal or rename (the fileset is gone).
fn root_flags() -> WatchFlags {
    dir_flags() | WatchFlags::DELETE_SELF | WatchFlags::MOVE_SELF
}

/// One event as inotify queued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub wd: i32,
    pub mask: ReadFlags,
    pub cookie: u32,
    pub name: Option<Vec<u8>>,
}

/// The side effects naming needs: adding and removing watches, listing directories.
pub trait WatchIo {
    /// Watches directory `path` (not through a symlink); returns its watch descriptor.
    fn add(&mut self, path: &Path, root: bool) -> io::Result<i32>;
    /// Stops watching `wd` (it may be gone already).
    fn remove(&mut self, wd: i32);
    /// The subdirectories of `dir` (not symlinks to directories); empty when it is gone.
    fn subdirs(&mut self, dir: &Path) -> Vec<PathBuf>;
}

/// A directory rename whose first half was seen and whose second half is awaited.
#[derive(Debug)]
struct Moving {
    cookie: u32,
    from: PathBuf,
}

/// Turns raw inotify events into notify events with correct paths, in queue order, and keeps
/// one watch on every directory of the tree. Sans-IO: the watches are changed through
/// [`WatchIo`].
#[derive(Debug)]
pub struct Namer {
    root: PathBuf,
    paths: HashMap<i32, PathBuf>,
    moving: Option<Moving>,
    /// The cookie of the last directory rename taken for a move out of the tree (its
    /// watches were dropped): a late second half of it cannot be trusted.
    abandoned: Option<u32>,
    /// Watched directories found, while a new directory was being watched, at a new path
    /// inside it: moved there before it was watched, so no MOVED_TO comes. They keep their
    /// old name until the MOVED_FROM of that rename is read (events queued before it happened
    /// name the old path), which is then completed with the second half.
    relocated: HashMap<i32, PathBuf>,
    /// The cookie of the last rename completed that way: its MOVED_TO, if the kernel queued
    /// one after all (the watch came just in time), is a duplicate.
    completed: Option<u32>,
}

type Out = notify::Result<notify::Event>;

fn ev(kind: EventKind, path: PathBuf) -> Out {
    Ok(notify::Event::new(kind).add_path(path))
}

fn lost(why: String) -> Out {
    Err(notify::Error::generic(&why))
}

fn beneath_or_at(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

impl Namer {
    /// Watches every directory beneath `root` (canonical).
    pub fn new(root: PathBuf, io: &mut impl WatchIo) -> io::Result<Self> {
        let mut namer = Self {
            root,
            paths: HashMap::new(),
            moving: None,
            abandoned: None,
            relocated: HashMap::new(),
            completed: None,
        };
        let root = namer.root.clone();
        let wd = io.add(&root, true)?;
        namer.paths.insert(wd, root.clone());
        let mut out = Vec::new();
        namer.watch_beneath(&root, io, &mut out);
        if let Some(Err(e)) = out.into_iter().next() {
            return Err(io::Error::other(e.to_string()));
        }
        Ok(namer)
    }

    /// Watches every directory beneath `dir` (which is watched already), top-down: each is
    /// watched before it is listed, so that nothing created in it goes unseen.
    fn watch_beneath(&mut self, dir: &Path, io: &mut impl WatchIo, out: &mut Vec<Out>) {
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for sub in io.subdirs(&d) {
                match io.add(&sub, false) {
                    Ok(wd) => match self.paths.get(&wd) {
                        // Watched under another name: it (with what is beneath it, watched
                        // too) moved here.
                        Some(old) if *old != sub => {
                            self.relocated.insert(wd, sub);
                        }
                        _ => {
                            self.paths.insert(wd, sub.clone());
                            todo.push(sub);
                        }
                    },
                    // Gone or replaced meanwhile: its removal is reported by its parent.
                    Err(e)
                        if matches!(
                            e.raw_os_error().map(Errno::from_raw_os_error),
                            Some(Errno::NOENT | Errno::NOTDIR | Errno::LOOP)
                        ) => {}
                    Err(e) => {
                        out.push(lost(format!("cannot watch {}: {e}", sub.display())));
                        return;
                    }
                }
            }
        }
    }

    /// Drops the watches of `dir` and of everything beneath it.
    fn unwatch_subtree(&mut self, dir: &Path, io: &mut impl WatchIo) {
        let gone: Vec<i32> = self
            .paths
            .iter()
            .filter(|(_, p)| beneath_or_at(p, dir))
            .map(|(&wd, _)| wd)
            .collect();
        for wd in gone {
            self.paths.remove(&wd);
            io.remove(wd);
        }
    }

    /// A directory rename whose second half did not follow its first: it left the tree (or
    /// the second half was lost, which the engine also treats as a rescan).
    fn moved_out(&mut self, io: &mut impl WatchIo) {
        if let Some(m) = self.moving.take() {
            self.unwatch_subtree(&m.from, io);
            self.abandoned = Some(m.cookie);
        }
    }

    /// Names one raw event; may add or drop watches.
    pub fn on_raw(&mut self, raw: RawEvent, io: &mut impl WatchIo) -> Vec<Out> {
        let mut out = Vec::new();
        let mask = raw.mask;
        if mask.contains(ReadFlags::QUEUE_OVERFLOW) {
            out.push(Ok(
                notify::Event::new(EventKind::Other).set_flag(Flag::Rescan)
            ));
            return out;
        }
        let completes_move = mask.contains(ReadFlags::MOVED_TO)
            && self.moving.as_ref().is_some_and(|m| m.cookie == raw.cookie);
        if !completes_move && self.moving.is_some() {
            if let Some(m) = &self.moving
                && let Some(dir) = self.paths.get(&raw.wd)
                && beneath_or_at(dir, &m.from)
            {
                // An event from inside a directory between the two halves of its rename: its
                // name is neither the old nor (yet) the new one.
                out.push(lost(format!(
                    "an event inside {} arrived between the halves of its rename",
                    m.from.display()
                )));
            }
            self.moved_out(io);
        }
        if mask.contains(ReadFlags::IGNORED) {
            // The watch is gone (its directory was removed, or we dropped it).
            if self.paths.remove(&raw.wd).is_some_and(|p| p == self.root) {
                out.push(lost("the watch of the fileset root is gone".into()));
            }
            return out;
        }
        let Some(dir) = self.paths.get(&raw.wd) else {
            // A watch dropped since the event was queued (moved out of the tree).
            tracing::debug!(wd = raw.wd, "copy mode: event of a dropped watch ignored");
            return out;
        };
        let path = match &raw.name {
            Some(name) => dir.join(OsStr::from_bytes(name)),
            None => dir.clone(),
        };
        let is_dir = mask.contains(ReadFlags::ISDIR);
        if mask.contains(ReadFlags::DELETE_SELF) || mask.contains(ReadFlags::MOVE_SELF) {
            // Only the root is watched for these.
            if path == self.root {
                let kind = if mask.contains(ReadFlags::DELETE_SELF) {
                    EventKind::Remove(RemoveKind::Other)
                } else {
                    EventKind::Modify(ModifyKind::Name(RenameMode::From))
                };
                out.push(ev(kind, path));
            }
            return out;
        }
        if mask.contains(ReadFlags::MOVED_FROM) {
            out.push(Ok(notify::Event::new(EventKind::Modify(ModifyKind::Name(
                RenameMode::From,
            )))
            .add_path(path.clone())
            .set_tracker(cookie_tracker(raw.cookie))));
            if is_dir && let Some(to) = self.take_relocation(&path) {
                self.rename_subtree(&path, &to);
                self.completed = Some(raw.cookie);
                out.push(Ok(notify::Event::new(EventKind::Modify(ModifyKind::Name(
                    RenameMode::To,
                )))
                .add_path(to)
                .set_tracker(cookie_tracker(raw.cookie))));
                return out;
            }
            if is_dir {
                self.moving = Some(Moving {
                    cookie: raw.cookie,
                    from: path,
                });
            }
            return out;
        }
        if mask.contains(ReadFlags::MOVED_TO) {
            if self.completed == Some(raw.cookie) {
                // Already completed from the watch of its new place (see `relocated`).
                return out;
            }
            if is_dir {
                match self.moving.take() {
                    Some(m) if m.cookie == raw.cookie => self.rename_subtree(&m.from, &path),
                    other => {
                        self.moving = other;
                        if self.abandoned == Some(raw.cookie) {
                            out.push(lost(format!(
                                "the second half of the rename to {} came late",
                                path.display()
                            )));
                        }
                        // Moved in from outside: watch it like a new directory.
                        self.watch_new_dir(&path, io, &mut out);
                    }
                }
            }
            out.push(Ok(notify::Event::new(EventKind::Modify(ModifyKind::Name(
                RenameMode::To,
            )))
            .add_path(path)
            .set_tracker(cookie_tracker(raw.cookie))));
            return out;
        }
        if mask.contains(ReadFlags::CREATE) {
            let kind = if is_dir {
                self.watch_new_dir(&path, io, &mut out);
                CreateKind::Folder
            } else {
                CreateKind::File
            };
            out.push(ev(EventKind::Create(kind), path));
            return out;
        }
        if mask.contains(ReadFlags::DELETE) {
            let kind = if is_dir {
                RemoveKind::Folder
            } else {
                RemoveKind::File
            };
            out.push(ev(EventKind::Remove(kind), path));
            return out;
        }
        if mask.contains(ReadFlags::MODIFY) {
            out.push(ev(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                path.clone(),
            ));
        }
        if mask.contains(ReadFlags::ATTRIB) {
            out.push(ev(
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                path.clone(),
            ));
        }
        if mask.contains(ReadFlags::CLOSE_WRITE) {
            out.push(ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                path,
            ));
        }
        out
    }

    /// The end of what one read returned: a directory rename still half seen is taken for a
    /// move out of the tree (the kernel queues both halves at once).
    pub fn end_of_batch(&mut self, io: &mut impl WatchIo) -> Vec<Out> {
        self.moved_out(io);
        let mut out = Vec::new();
        for (wd, to) in std::mem::take(&mut self.relocated) {
            // Its MOVED_FROM never came: where it was is unknown to the engine.
            if let Some(from) = self.paths.get(&wd).cloned() {
                self.rename_subtree(&from, &to);
                out.push(lost(format!(
                    "{} moved to {} without an event",
                    from.display(),
                    to.display()
                )));
            }
        }
        out
    }

    /// The new path of the watched directory now named `path`, if it was found elsewhere.
    fn take_relocation(&mut self, path: &Path) -> Option<PathBuf> {
        let wd = self
            .paths
            .iter()
            .find(|(_, p)| p.as_path() == path)
            .map(|(&wd, _)| wd)?;
        self.relocated.remove(&wd)
    }

    fn watch_new_dir(&mut self, path: &Path, io: &mut impl WatchIo, out: &mut Vec<Out>) {
        match io.add(path, false) {
            Ok(wd) => {
                self.paths.insert(wd, path.to_path_buf());
                self.watch_beneath(path, io, out);
            }
            // Already gone or replaced: what happened to it is reported by its parent.
            Err(e)
                if matches!(
                    e.raw_os_error().map(Errno::from_raw_os_error),
                    Some(Errno::NOENT | Errno::NOTDIR | Errno::LOOP)
                ) => {}
            Err(e) => out.push(lost(format!("cannot watch {}: {e}", path.display()))),
        }
    }

    /// The watches beneath `from` now name directories beneath `to`.
    fn rename_subtree(&mut self, from: &Path, to: &Path) {
        for p in self.paths.values_mut() {
            if let Ok(rest) = p.strip_prefix(from) {
                *p = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    /// Watches the tree again from scratch (after lost events): every directory there now is
    /// watched under its current path, watches of anything else are dropped.
    pub fn rewatch(&mut self, io: &mut impl WatchIo) -> Vec<Out> {
        let old = std::mem::take(&mut self.paths);
        self.moving = None;
        self.relocated.clear();
        let mut out = Vec::new();
        let root = self.root.clone();
        match io.add(&root, true) {
            Ok(wd) => {
                self.paths.insert(wd, root.clone());
                self.watch_beneath(&root, io, &mut out);
            }
            Err(e) => out.push(lost(format!("cannot watch the fileset root again: {e}"))),
        }
        for wd in old.into_keys() {
            if !self.paths.contains_key(&wd) {
                io.remove(wd);
            }
        }
        out
    }

    /// Directories watched.
    #[cfg(test)]
    pub fn watched(&self) -> std::collections::BTreeSet<PathBuf> {
        self.paths.values().cloned().collect()
    }
}

fn cookie_tracker(cookie: u32) -> usize {
    usize::try_from(cookie).unwrap_or(usize::MAX)
}

/// The real [`WatchIo`]: an inotify fd.
#[derive(Debug)]
pub struct Inotify {
    fd: OwnedFd,
}

impl WatchIo for Inotify {
    fn add(&mut self, path: &Path, root: bool) -> io::Result<i32> {
        let flags = if root { root_flags() } else { dir_flags() };
        Ok(inotify::add_watch(&self.fd, path, flags)?)
    }

    fn remove(&mut self, wd: i32) {
        // EINVAL: the kernel dropped it already (its directory was removed).
        if let Err(e) = inotify::remove_watch(&self.fd, wd)
            && e != Errno::INVAL
        {
            tracing::debug!(wd, error = %e, "copy mode: cannot remove a watch");
        }
    }

    fn subdirs(&mut self, dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            // DirEntry::file_type does not follow a symlink.
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }
}

/// The inotify fd and the names of its watches, shared by the watch thread (which reads
/// events) and the copy thread (which re-establishes the watches on a rescan).
#[derive(Debug)]
pub struct Watches {
    io: Inotify,
    namer: Namer,
}

impl Watches {
    /// Watches every directory beneath `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        let mut io = Inotify { fd };
        let namer = Namer::new(root.to_path_buf(), &mut io)?;
        Ok(Self { io, namer })
    }

    /// See [`Namer::rewatch`].
    pub fn rewatch(&mut self) -> Vec<Out> {
        self.namer.rewatch(&mut self.io)
    }
}

/// Locks the shared watches; a panic elsewhere leaves them usable (names are plain data).
pub fn lock(w: &Mutex<Watches>) -> std::sync::MutexGuard<'_, Watches> {
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wakes the watch thread to make it end.
#[derive(Debug)]
pub struct StopFd(OwnedFd);

impl StopFd {
    pub fn new() -> io::Result<Self> {
        Ok(Self(rustix::event::eventfd(
            0,
            EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?))
    }

    pub fn signal(&self) {
        if let Err(e) = rustix::io::write(&self.0, &1u64.to_ne_bytes()) {
            tracing::error!(error = %e, "copy mode: cannot wake the watch thread");
        }
    }
}

/// The watch thread: reads events and hands them, named, to `handler`, until `stop` is
/// signalled.
pub fn run(watches: &Arc<Mutex<Watches>>, stop: &StopFd, mut handler: impl FnMut(Out)) {
    let fd = match lock(watches).io.fd.try_clone() {
        Ok(fd) => fd,
        Err(e) => {
            handler(lost(format!("the watch thread cannot start: {e}")));
            return;
        }
    };
    let mut buf = vec![MaybeUninit::<u8>::uninit(); READ_BUFFER_BYTES];
    loop {
        let mut fds = [
            PollFd::new(&fd, PollFlags::IN),
            PollFd::new(&stop.0, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => {
                handler(lost(format!("cannot wait for inotify events: {e}")));
                return;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        let mut guard = lock(watches);
        let Watches { io, namer } = &mut *guard;
        let mut reader = inotify::Reader::new(fd.as_fd(), &mut buf);
        loop {
            let raw = match reader.next() {
                Ok(e) => RawEvent {
                    wd: e.wd(),
                    mask: e.events(),
                    cookie: e.cookie(),
                    name: e.file_name().map(|n| n.to_bytes().to_vec()),
                },
                Err(Errno::AGAIN | Errno::INTR) => break,
                Err(e) => {
                    handler(lost(format!("cannot read inotify events: {e}")));
                    break;
                }
            };
            for out in namer.on_raw(raw, io) {
                handler(out);
            }
            // A rename's halves are queued together: decide about a half-seen one only
            // once the kernel has nothing more.
            if reader.is_buffer_empty() {
                let mut probe = [PollFd::new(&fd, PollFlags::IN)];
                let more =
                    rustix::event::poll(&mut probe, Some(&rustix::event::Timespec::default()))
                        .is_ok_and(|n| n > 0);
                if !more {
                    for out in namer.end_of_batch(io) {
                        handler(out);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
