//! Copy mode (NT-SwiFT) for programs whose writes cannot be intercepted: watches the fileset's
//! directories (inotify, one watch per directory, see `watch`) and turns the state of each path that has been quiet
//! for the configured interval into [`Op`](crate::Op)s with dense seqs, which the pump streams
//! like ring records. Owns the watcher and copy threads; it must never block the caller's
//! runtime, and never read outside the root or through a symlink.
//!
//! ```text
//!   inotify ─► watch thread ─try_send─► event queue ─► copy thread: interpret ─► CopyEngine
//!   (names by watch,   (queue full ⇒ Rescan)                │ reads files (openat2 BENEATH)
//!    renames in order)
//!                                                            ▼
//!                               tokio mpsc ◄── CopyOutput::Records(batch) | Rescan { next_seq }
//! ```
//!
//! What is emitted for a path, given what is there when it is copied: a regular file →
//! `Create{mode}`, `Truncate{len}`, `Write`s of at most [`COPY_CHUNK_BYTES`], `Chmod`, `SetTimes`
//! (mtime); a directory → `Mkdir`, `Chmod` (and its entries are copied after it when the replica
//! lacked it); a symlink → `Unlink`, `Symlink`. Removals (`Unlink`, `Rmdir`, children first, as
//! the kernel reports them) and renames inside the tree (`Rename`, pending copies follow the
//! entry) are emitted as soon as their event arrives, so they keep the primary's order; an
//! entry renamed into the tree is copied with everything beneath it. A file that changed while
//! it was read is copied again after the next quiet interval, so a torn copy is always followed
//! by a correct one.
//!
//! A [`CopyOutput::Rescan`] (inotify queue overflow, this module's event queue full, a rename
//! out of the tree, an event that cannot be interpreted exactly) means: the backups must be
//! resynced from the primary's tree as it is from now on (the manifest diff), and the stream
//! continues at `next_seq`. For the pump that is `Input::Abandoned { seq: next_seq - 1 }`.
//! Ops emitted after a rescan may refer to states the resync already contains (a rename whose
//! source is gone and target exists, a removal of what is gone): replay treats those as done.
//!
//! While the second half of a rename is awaited (at most [`EVENT_GRACE`]), later events wait
//! and nothing is copied, so no op is emitted against a replica that still holds the entry.
//!
//! Excluded names ([`CopyConfig::exclude`], see [`Exclude`] for the syntax) are no part of the
//! fileset: nothing at or beneath them is copied or named by an op, their events are dropped
//! on the watch thread, and a directory listing skips them. An entry renamed from an excluded
//! name to a replicated one (a temp file committed into place) is copied whole at its new name
//! after the quiet interval; one renamed the other way is removed from the replica (a
//! directory that way causes a rescan). The resync after a rescan must skip them too: see
//! `primary`'s resync, which neither lists them on the primary nor removes them on a replica.
//!
//! Limits: hard links are copied as separate files; FIFOs, sockets and devices are not
//! replicated; directory mtimes are not replicated; without a maximum delay, a file that never
//! stays quiet is never copied. A new directory is listed no sooner than [`EVENT_GRACE`] after
//! it appeared (its watch exists by then; the watch thread adds it before reporting it). A path
//! whose kind changes (file removed, directory made) while its copy is being made can yield one
//! op that replay refuses as a conflict; the removal and creation events that follow repair
//! the replica. A directory moved in the tree into a directory so new that it was not watched
//! yet is recognised by its watch (the kernel's watches belong to directories, not paths); one
//! that left the tree, or whose rename cannot be named exactly, causes a rescan.

mod engine;
mod event;
mod exclude;
mod tree;
mod watch;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub use engine::{COPY_CHUNK_BYTES, EVENT_GRACE, MAX_COPY_FAILURES, MAX_INTERVAL};
use engine::{CopyEngine, Sink, Stopped, WatchEvent};
pub use exclude::{Exclude, ExcludeError, MAX_EXCLUDE_PATTERNS, MAX_PATTERN_BYTES, NamePattern};
use tree::FsTree;
use watch::{StopFd, Watches};

use crate::OpRecord;

/// Default capacity of the queue between the watch thread and the copy thread, in events; when
/// it is full, events are lost and a rescan follows (like inotify's own queue overflow).
pub const DEFAULT_EVENT_QUEUE: usize = 65_536;

/// Batches of records waiting for the consumer before the copy thread waits for it.
pub const OUTPUT_QUEUE_BATCHES: usize = 4;

/// Bytes a record is counted as beyond its data (path, header), for batch sizes; as the pump
/// counts it.
const RECORD_OVERHEAD: usize = 64;

/// Name of the copy thread.
const THREAD_NAME: &str = "ftkit-copy";

/// Name of the thread that reads inotify events.
const WATCH_THREAD_NAME: &str = "ftkit-copy-watch";

/// Configuration of copy mode for one fileset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyConfig {
    /// A changed path is copied once no change was seen for this long.
    pub quiet: Duration,
    /// If set, a path that keeps changing is copied at the latest this long after its first
    /// change (and again once it is quiet); if not, only when it is quiet.
    pub max_delay: Option<Duration>,
    /// Most bytes of records in one [`CopyOutput::Records`] (a single larger record travels
    /// alone).
    pub max_batch_bytes: usize,
    /// The seq of the first record.
    pub first_seq: u64,
    /// Capacity of the event queue (see [`DEFAULT_EVENT_QUEUE`]).
    pub event_queue: usize,
    /// Paths that are no part of the fileset (none by default).
    pub exclude: Exclude,
}

impl CopyConfig {
    /// Quiet interval and batch size; no maximum delay, seqs from 1, the default event queue,
    /// nothing excluded.
    pub fn new(quiet: Duration, max_batch_bytes: usize) -> Self {
        Self {
            quiet,
            max_delay: None,
            max_batch_bytes,
            first_seq: 1,
            event_queue: DEFAULT_EVENT_QUEUE,
            exclude: Exclude::default(),
        }
    }

    fn validate(&self) -> Result<(), CopyError> {
        let bad = |why: String| Err(CopyError::Config(why));
        if self.quiet > MAX_INTERVAL {
            return bad(format!(
                "quiet interval {:?} exceeds {MAX_INTERVAL:?}",
                self.quiet
            ));
        }
        if let Some(max) = self.max_delay
            && max > MAX_INTERVAL
        {
            return bad(format!("maximum delay {max:?} exceeds {MAX_INTERVAL:?}"));
        }
        if self.max_batch_bytes == 0 {
            return bad("max_batch_bytes must be at least 1".into());
        }
        if self.event_queue == 0 {
            return bad("event_queue must be at least 1".into());
        }
        if self.first_seq == 0 {
            return bad("first_seq must be at least 1 (seqs are dense from 1)".into());
        }
        Ok(())
    }
}

/// What copy mode produces, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyOutput {
    /// Records with dense seqs continuing the previous output.
    Records(Vec<OpRecord>),
    /// Every backup must be resynced from the primary's tree; the next record carries
    /// `next_seq`.
    Rescan { next_seq: u64 },
}

/// Why copy mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// the fileset root cannot be opened
    #[error("copy mode: cannot open the fileset root {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the fileset root is not a directory
    #[error("copy mode: the fileset root {0} is not a directory")]
    NotADirectory(PathBuf),
    /// the watcher cannot watch the root
    #[error("copy mode: cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    /// the configuration is invalid
    #[error("copy mode: invalid configuration: {0}")]
    Config(String),
    /// the copy thread cannot be started
    #[error("copy mode: cannot start the copy thread: {0}")]
    Spawn(std::io::Error),
}

#[derive(Debug)]
enum Msg {
    Event(notify::Result<notify::Event>),
    Stop,
}

#[derive(Debug, Default)]
struct StopSignal {
    flag: AtomicBool,
    /// Wakes the copy thread while it waits for room in the output queue.
    notify: tokio::sync::Notify,
}

impl StopSignal {
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// The watch thread's side of the event queue: it holds at most `capacity` events, counted
/// rather than preallocated (a bounded std channel of [`DEFAULT_EVENT_QUEUE`] slots allocates
/// and zeroes megabytes whenever a pump starts, which is at every role change).
#[derive(Debug, Clone)]
struct EventSender {
    tx: Sender<Msg>,
    /// Events sent and not yet taken by the copy thread.
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl EventSender {
    /// Queues an event; false when the queue is full (the event is lost).
    fn event(&self, res: notify::Result<notify::Event>) -> bool {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if self.tx.send(Msg::Event(res)).is_err() {
            // The copy thread is gone: nothing waits for the event.
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        true
    }

    /// Wakes the copy thread to stop (never lost to a full queue).
    fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

/// Copy mode running for one fileset; dropping it stops the watcher and the copy thread (the
/// drop waits for the thread, which stops within one chunk read).
#[derive(Debug)]
pub struct CopySource {
    root: PathBuf,
    stop: Arc<StopSignal>,
    wake: EventSender,
    thread: Option<JoinHandle<()>>,
    watch: WatchThread,
}

/// The thread reading inotify events; dropping it stops it and waits for it.
#[derive(Debug)]
struct WatchThread {
    stop: Arc<StopFd>,
    thread: Option<JoinHandle<()>>,
}

impl WatchThread {
    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.signal();
        if thread.join().is_err() {
            tracing::error!("copy mode watch thread panicked");
        }
    }
}

impl Drop for WatchThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl CopySource {
    /// Watches `root` recursively and copies changed paths once they have been quiet for
    /// `quiet`, in batches of at most `max_batch_bytes`. Blocks while a watch is set up on
    /// every directory (call it from a blocking context for large trees).
    pub fn start(
        root: &Path,
        quiet: Duration,
        max_batch_bytes: usize,
    ) -> Result<(CopySource, mpsc::Receiver<CopyOutput>), CopyError> {
        Self::start_with(root, CopyConfig::new(quiet, max_batch_bytes))
    }

    /// [`start`](Self::start) with every setting.
    pub fn start_with(
        root: &Path,
        cfg: CopyConfig,
    ) -> Result<(CopySource, mpsc::Receiver<CopyOutput>), CopyError> {
        cfg.validate()?;
        let root_err = |source| CopyError::Root {
            path: root.to_owned(),
            source,
        };
        let root = std::fs::canonicalize(root).map_err(root_err)?;
        if !std::fs::metadata(&root).map_err(root_err)?.is_dir() {
            return Err(CopyError::NotADirectory(root));
        }
        let tree = FsTree::open(&root).map_err(root_err)?;

        let (tx, events) = std::sync::mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let event_tx = EventSender {
            tx,
            queued: queued.clone(),
            capacity: cfg.event_queue,
        };
        let overflow = Arc::new(AtomicBool::new(false));
        let handler = {
            let tx = event_tx.clone();
            let overflow = overflow.clone();
            let (root, exclude) = (root.clone(), cfg.exclude.clone());
            move |res: notify::Result<notify::Event>| {
                // An excluded file being written (a temp file of hundreds of MiB) must not
                // fill the queue and cause a rescan.
                if !event::may_matter(&res) || event::only_excluded(&root, &exclude, &res) {
                    return;
                }
                // Never block the watch thread: a full queue loses events, which a rescan
                // covers.
                if !tx.event(res) {
                    overflow.store(true, Ordering::Release);
                }
            }
        };
        let watches = Watches::open(&root).map_err(|e| CopyError::Watch {
            path: root.clone(),
            source: notify::Error::io(e),
        })?;
        let watches = Arc::new(Mutex::new(watches));
        let watch_stop = Arc::new(StopFd::new().map_err(CopyError::Spawn)?);
        let watch_thread = {
            let (watches, stop) = (watches.clone(), watch_stop.clone());
            std::thread::Builder::new()
                .name(WATCH_THREAD_NAME.into())
                .spawn(move || watch::run(&watches, &stop, handler))
                .map_err(CopyError::Spawn)?
        };
        // Dropped (the thread stopped) if anything below fails.
        let watch = WatchThread {
            stop: watch_stop,
            thread: Some(watch_thread),
        };

        let (out_tx, out_rx) = mpsc::channel(OUTPUT_QUEUE_BATCHES);
        let stop = Arc::new(StopSignal::default());
        let worker = Worker {
            root: root.clone(),
            engine: CopyEngine::new(cfg.quiet, cfg.max_delay, cfg.first_seq)
                .with_exclude(cfg.exclude.clone()),
            tree,
            events,
            queued,
            overflow,
            drain_limit: cfg.event_queue,
            out: Output {
                tx: out_tx,
                rt: None,
                stop: stop.clone(),
                batch: Vec::new(),
                bytes: 0,
                max_batch_bytes: cfg.max_batch_bytes,
                watches,
            },
        };
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || worker.run())
            .map_err(CopyError::Spawn)?;

        let exclude: Vec<&str> = cfg.exclude.patterns().iter().map(|p| p.as_str()).collect();
        tracing::info!(root = %root.display(), quiet = ?cfg.quiet, max_delay = ?cfg.max_delay, ?exclude, "copy mode started");
        Ok((
            CopySource {
                root,
                stop,
                wake: event_tx,
                thread: Some(thread),
                watch,
            },
            out_rx,
        ))
    }

    /// The watched root (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the copy thread still runs (it ends when the receiver is dropped).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for CopySource {
    fn drop(&mut self) {
        self.stop.flag.store(true, Ordering::Release);
        self.stop.notify.notify_one();
        self.wake.stop();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(root = %self.root.display(), "copy mode thread panicked");
        }
        self.watch.shutdown();
    }
}

/// The copy thread: feeds events and the clock to the engine.
struct Worker {
    root: PathBuf,
    engine: CopyEngine,
    tree: FsTree,
    events: Receiver<Msg>,
    /// Events queued (see [`EventSender`]): counted down as they are taken.
    queued: Arc<AtomicUsize>,
    overflow: Arc<AtomicBool>,
    drain_limit: usize,
    out: Output,
}

impl Worker {
    fn run(mut self) {
        // Built here, not by `start`: a runtime must not be dropped inside the caller's async
        // context, as it would be if `start` failed after building it.
        match tokio::runtime::Builder::new_current_thread().build() {
            Ok(rt) => self.out.rt = Some(rt),
            Err(e) => {
                tracing::error!(root = %self.root.display(), error = %e, "copy mode cannot run");
                return;
            }
        }
        // The loop only ends by being stopped (drop of the source or of the receiver).
        let Err(Stopped) = self.serve();
        tracing::debug!(root = %self.root.display(), "copy mode stopped");
    }

    fn serve(&mut self) -> Result<std::convert::Infallible, Stopped> {
        loop {
            if self.out.stop.is_set() {
                return Err(Stopped);
            }
            let msg = match self.engine.next_wakeup() {
                Some(at) => {
                    match self
                        .events
                        .recv_timeout(at.saturating_duration_since(Instant::now()))
                    {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return Err(Stopped),
                    }
                }
                None => Some(self.events.recv().map_err(|_| Stopped)?),
            };
            if let Some(m) = msg {
                self.handle(m)?;
            }
            self.drain()?;
            while self
                .engine
                .poll(Instant::now(), &mut self.tree, &mut self.out)?
            {
                // Keep up with events between copies (a removal is emitted promptly, a path
                // that changed again waits again).
                self.drain()?;
            }
            self.out.flush()?;
        }
    }

    fn handle(&mut self, msg: Msg) -> Result<(), Stopped> {
        match msg {
            Msg::Stop => Err(Stopped),
            Msg::Event(res) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                match event::interpret(&self.root, res) {
                    Some(ev) => {
                        self.engine
                            .on_event(Instant::now(), ev, &mut self.tree, &mut self.out)
                    }
                    None => Ok(()),
                }
            }
        }
    }

    fn drain(&mut self) -> Result<(), Stopped> {
        for _ in 0..self.drain_limit {
            match self.events.try_recv() {
                Ok(m) => self.handle(m)?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(Stopped),
            }
        }
        if self.overflow.swap(false, Ordering::AcqRel) {
            let why = "copy mode's event queue overflowed".to_owned();
            self.engine.on_event(
                Instant::now(),
                WatchEvent::Rescan { why },
                &mut self.tree,
                &mut self.out,
            )?;
        }
        if self.out.stop.is_set() {
            return Err(Stopped);
        }
        Ok(())
    }
}

/// Batches records and hands them to the consumer; re-establishes the watches on a rescan.
struct Output {
    tx: mpsc::Sender<CopyOutput>,
    /// Runs nothing but the wait for room in `tx` (or for the stop signal); set when the
    /// thread starts.
    rt: Option<tokio::runtime::Runtime>,
    stop: Arc<StopSignal>,
    batch: Vec<OpRecord>,
    bytes: usize,
    max_batch_bytes: usize,
    watches: Arc<Mutex<Watches>>,
}

impl Output {
    fn flush(&mut self) -> Result<(), Stopped> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        self.send(CopyOutput::Records(batch))
    }

    fn send(&mut self, out: CopyOutput) -> Result<(), Stopped> {
        let out = match self.tx.try_send(out) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Stopped),
            Err(mpsc::error::TrySendError::Full(out)) => out,
        };
        if self.stop.is_set() {
            return Err(Stopped);
        }
        let (tx, stop) = (&self.tx, &self.stop);
        let Some(rt) = &self.rt else {
            return Err(Stopped);
        };
        rt.block_on(async {
            tokio::select! {
                permit = tx.reserve() => match permit {
                    Ok(permit) => {
                        permit.send(out);
                        Ok(())
                    }
                    Err(_) => Err(Stopped),
                },
                () = stop.notify.notified() => Err(Stopped),
            }
        })
    }

    /// Watches may be missing (directories created while events were lost) or stale (renames
    /// whose events were lost): set them all up again before the rescan is announced, so that
    /// nothing changing after the resync's scan goes unseen.
    fn rewatch(&mut self) {
        for e in watch::lock(&self.watches).rewatch() {
            match e {
                Err(e) => {
                    tracing::error!(error = %e, "copy mode: cannot watch the whole fileset again; changes may go unseen")
                }
                Ok(ev) => tracing::debug!(?ev, "copy mode: event while watching again"),
            }
        }
    }
}

impl Sink for Output {
    fn record(&mut self, rec: OpRecord) -> Result<(), Stopped> {
        if self.stop.is_set() {
            return Err(Stopped);
        }
        self.bytes += rec.op.data_len() + RECORD_OVERHEAD;
        self.batch.push(rec);
        if self.bytes >= self.max_batch_bytes {
            self.flush()?;
        }
        Ok(())
    }

    fn rescan(&mut self, next_seq: u64) -> Result<(), Stopped> {
        self.flush()?;
        self.rewatch();
        self.send(CopyOutput::Rescan { next_seq })
    }
}
