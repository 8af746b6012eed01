//! Checkpoints of critical memory: the [`Checkpointer`] ties the heap, the registered regions
//! and dirty tracking to one `ckpt::Store` per checkpoint stream, owns libft's writer thread
//! and its compaction threads, schedules periodic checkpoints at safe points, and recovers.
//!
//! The caller of a checkpoint is paused only to collect the dirty set and capture the pages
//! (staging copy, or a copy-on-write child that writes the image itself); image writing,
//! checksums and fsync run on the writer thread or in that child. Only the first image of a
//! stream (or one larger than the staging limit) is captured whole: when the store's policy
//! wants a full image, an increment is captured and, once committed, compacted into the full
//! image on a background thread. A failed image never loses dirty pages: they go back to the
//! stream's pending set, or the stream's next image is full. Application memory is written
//! only by `recover`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ckpt::{ImageHeader, ImageInfo, Pending, RegionDesc, Store, StorePolicy};

use super::Error;
use super::dirty::{Area, DirtyMode, DirtySet, Tracker, TrackerKind};
use super::heap::{CriticalHeap, HeapConfig, parse_size};
use super::snapshot::{
    CloneFlavor, Extent, ForkSnapshot, copy_to_staging, dirty_extents, full_extents, total_len,
};
use super::vm::{self, page_size};
use crate::proto::ENV_SERVICE;

/// Environment: the root directory of checkpoint stores; stream `id` lives in `<root>/<id>`.
pub const ENV_CKPT_DIR: &str = "FT_CKPT_DIR";
/// The store root when `FT_CKPT_DIR` is unset, relative to the working directory.
pub const DEFAULT_CKPT_DIR: &str = "ft-ckpt";
/// Environment: period of automatic checkpoints of stream 0 (`500ms`, `2s`), taken at
/// `t_safe_point` calls; watchd sets it from the service's `checkpoint.every`.
pub const ENV_CKPT_EVERY: &str = "FT_CKPT_EVERY";
/// Environment: dirty tracking method, `auto` (default), `uffd` or `hash`.
pub const ENV_DIRTY: &str = "FT_DIRTY";
/// Environment: the largest capture copied into the staging buffer (`64MiB`); larger ones use
/// a copy-on-write child. `0` forces the child.
pub const ENV_CKPT_STAGING_MAX: &str = "FT_CKPT_STAGING_MAX";
/// Environment: how many good checkpoints each store keeps (watchd sets it from the service's
/// `checkpoint.keep`); default that of `ckpt::StorePolicy`.
pub const ENV_CKPT_KEEP: &str = "FT_CKPT_KEEP";
/// Environment: a full image after this many increments (watchd sets it from
/// `checkpoint.full_every`); default that of `ckpt::StorePolicy`.
pub const ENV_CKPT_FULL_EVERY: &str = "FT_CKPT_FULL_EVERY";
/// Default of `FT_CKPT_STAGING_MAX`: copying this much costs a few milliseconds of pause,
/// about what cloning a large process costs.
pub const DEFAULT_STAGING_MAX: usize = 64 << 20;
/// The identity used when neither FT_SERVICE nor argv[0] gives one.
const FALLBACK_IDENTITY: &str = "ft-app";
/// The longest identity an image header stores.
const MAX_IDENTITY: usize = 255;
/// `next_due` when no periodic checkpoint is scheduled.
const NEVER: u64 = u64::MAX;
/// Niceness added to a compaction thread: composing a full image is background work that
/// must not take the CPU from the application it protects.
const COMPACTION_NICENESS: libc::c_int = 10;

/// The application's identity for images and default heap addresses: `FT_SERVICE`, else the
/// file name of argv[0].
pub fn app_identity() -> String {
    let raw = std::env::var_os(ENV_SERVICE)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_string_lossy().into_owned())
        .or_else(|| {
            std::env::args_os().next().and_then(|a| {
                Path::new(&a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| FALLBACK_IDENTITY.to_owned());
    let mut end = raw.len().min(MAX_IDENTITY);
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    raw[..end].to_owned()
}

/// Everything a [`Checkpointer`] needs to know.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    /// Application identity written into (and required from) every image.
    pub app: String,
    /// Where the heap goes.
    pub heap: HeapConfig,
    /// Root of the stores: stream `id` uses `dir/<id>`.
    pub dir: PathBuf,
    /// Captures up to this many bytes are copied into the staging buffer; larger ones use a
    /// copy-on-write child process.
    pub staging_max: usize,
    /// Dirty tracking method.
    pub dirty: DirtyMode,
    /// Retention and full-image cadence of every store.
    pub policy: StorePolicy,
    /// Period of automatic checkpoints of stream 0 at safe points.
    pub every: Option<Duration>,
}

impl CheckpointConfig {
    /// A configuration with the documented defaults.
    pub fn new(app: &str, dir: impl Into<PathBuf>, heap: HeapConfig) -> CheckpointConfig {
        CheckpointConfig {
            app: app.to_owned(),
            heap,
            dir: dir.into(),
            staging_max: DEFAULT_STAGING_MAX,
            dirty: DirtyMode::Auto,
            policy: StorePolicy::default(),
            every: None,
        }
    }

    /// The configuration of the process-wide instance: identity from FT_SERVICE/argv[0], heap
    /// from FT_HEAP_ADDR/FT_HEAP_SIZE (or the identity's default), store root FT_CKPT_DIR (or
    /// `./ft-ckpt`), FT_CKPT_STAGING_MAX, FT_DIRTY, FT_CKPT_KEEP, FT_CKPT_FULL_EVERY and
    /// FT_CKPT_EVERY.
    pub fn from_env() -> Result<CheckpointConfig, Error> {
        let app = app_identity();
        let heap = HeapConfig::from_env(&app)?;
        let dir = std::env::var_os(ENV_CKPT_DIR)
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_CKPT_DIR), PathBuf::from);
        let mut config = CheckpointConfig::new(&app, dir, heap);
        if let Some(v) = env_text(ENV_CKPT_STAGING_MAX) {
            config.staging_max = parse_size(&v).ok_or_else(|| {
                Error::Config(format!(
                    "{ENV_CKPT_STAGING_MAX}={v:?} is not a size like 64MiB"
                ))
            })?;
        }
        if let Some(v) = env_text(ENV_DIRTY) {
            config.dirty = DirtyMode::parse(&v).ok_or_else(|| {
                Error::Config(format!("{ENV_DIRTY}={v:?}: expected auto, uffd or hash"))
            })?;
        }
        if let Some(v) = env_text(ENV_CKPT_KEEP) {
            config.policy.keep = v.trim().parse().ok().filter(|k| *k > 0).ok_or_else(|| {
                Error::Config(format!("{ENV_CKPT_KEEP}={v:?} is not a positive count"))
            })?;
        }
        if let Some(v) = env_text(ENV_CKPT_FULL_EVERY) {
            config.policy.full_every = v.trim().parse().map_err(|_| {
                Error::Config(format!("{ENV_CKPT_FULL_EVERY}={v:?} is not a count"))
            })?;
        }
        if let Some(v) = env_text(ENV_CKPT_EVERY) {
            let every = humantime::parse_duration(v.trim()).map_err(|e| {
                Error::Config(format!(
                    "{ENV_CKPT_EVERY}={v:?} is not a duration like 500ms: {e}"
                ))
            })?;
            config.every = (!every.is_zero()).then_some(every);
        }
        Ok(config)
    }

    /// The store directory of stream `stream`.
    pub fn stream_dir(&self, stream: u32) -> PathBuf {
        self.dir.join(stream.to_string())
    }
}

fn env_text(name: &str) -> Option<String> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(|v| v.to_string_lossy().into_owned())
}

/// How a checkpoint captured its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMethod {
    /// Copied into the staging buffer during the pause.
    Staging,
    /// Frozen in a copy-on-write child process.
    Fork,
}

/// A checkpoint whose capture is done; the image is being written in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The stream.
    pub stream: u32,
    /// The image's sequence number.
    pub seq: u64,
    /// The image it is an increment against; None for a full image.
    pub parent: Option<u64>,
    /// Whether the increment, once committed, is compacted into a full image in the
    /// background (the store's policy wanted a full image now).
    pub compacts: bool,
    /// Pages captured (area pages; a region's last page may be short).
    pub pages: usize,
    /// Bytes captured.
    pub bytes: usize,
    /// How they were captured.
    pub method: CaptureMethod,
    /// How long the caller was paused: planning (a scan of the store directory), collecting
    /// the dirty pages and capturing them — not counting waiting for the stream's previous
    /// image (or for its compaction, when the chain reached the store's limit).
    pub pause: Duration,
}

/// What a successful recovery restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The sequence number of the newest image applied.
    pub seq: u64,
    /// The images applied, full base first.
    pub chain: Vec<u64>,
    /// Newer images that were refused, and why (corrupt, torn, broken chain).
    pub skipped: Vec<(u64, String)>,
}

/// The outcome of the last recovery attempt, for `t_recover_report`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The stream.
    pub stream: u32,
    /// Its store directory.
    pub dir: PathBuf,
    /// What was restored (None: no checkpoint), or why recovery failed.
    pub outcome: Result<Option<Recovered>, String>,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = self.dir.display();
        match &self.outcome {
            Ok(None) => write!(f, "stream {}: no checkpoint in {dir}", self.stream),
            Ok(Some(r)) => {
                let chain: Vec<String> = r.chain.iter().map(u64::to_string).collect();
                write!(
                    f,
                    "stream {}: recovered checkpoint {} from {dir} (chain {})",
                    self.stream,
                    r.seq,
                    chain.join(",")
                )?;
                for (seq, why) in &r.skipped {
                    write!(f, "; skipped newer checkpoint {seq}: {why}")?;
                }
                Ok(())
            }
            Err(e) => write!(f, "stream {}: recovery from {dir} failed: {e}", self.stream),
        }
    }
}

/// Critical memory and its checkpoints: the heap, registered regions, dirty tracking, one
/// store per stream, the writer thread and periodic checkpoints. `Send + Sync`; one per
/// process is usual ([`global`]), several with different heap addresses are fine.
#[derive(Debug)]
pub struct Checkpointer {
    heap: CriticalHeap,
    shared: Arc<Shared>,
    config: CheckpointConfig,
    epoch: Instant,
    /// Nanoseconds after `epoch` when the next periodic checkpoint is due; read lock-free by
    /// `safe_point`.
    next_due: AtomicU64,
    writer: Mutex<Option<Writer>>,
}

/// Called by the writer thread after each committed image: stream, image, caller's pause.
/// (Not called again when a compaction later replaces the image with its full equivalent.)
pub type CommitHook = Box<dyn Fn(u32, &ImageInfo, Duration) + Send + Sync>;

struct Shared {
    state: Mutex<State>,
    done: Condvar,
    on_commit: Mutex<Option<CommitHook>>,
    /// Raised when the Checkpointer is dropped: running compactions give up.
    cancel: AtomicBool,
    /// Pauses in progress. A compaction holds back while there is one: a thread of this
    /// process streaming file I/O makes the paused thread's dirty-page scan (page-table work
    /// with TLB flushes) several times slower, and competes with its copy for memory bandwidth.
    pausing: Mutex<usize>,
    /// Signalled when the last pause in progress ends.
    resumed: Condvar,
    /// Compaction threads, joined when the Checkpointer is dropped.
    compactors: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    /// Area 0 is the heap (its whole reservation); area i is the i-th registered region.
    areas: Vec<Area>,
    tracker: Tracker,
    streams: BTreeMap<u32, Stream>,
    /// Bumped whenever what a stream's last image means changes under it (a region added,
    /// the tracker replaced, memory recovered): a job captured under an older layout cannot
    /// be the base of an increment.
    layout: u64,
    report: Option<RecoveryReport>,
}

#[derive(Debug)]
struct Stream {
    store: Option<Store>,
    /// The newest image of this stream such that memory = that image + `pending` pages.
    last_seq: Option<u64>,
    /// Pages written since `last_seq` was captured.
    pending: DirtySet,
    in_flight: bool,
    /// A compaction of one of this stream's images is running.
    compacting: bool,
    /// How the last compaction ended: the full image, or why not (kept for diagnostics).
    compaction: Option<Result<ImageInfo, String>>,
    /// Result of the last written image, until someone takes it (a failure is reported once).
    outcome: Option<Result<ImageInfo, Error>>,
    /// Reused across checkpoints of the staging path.
    staging: Vec<u8>,
    every: Option<Duration>,
    due: u64,
}

impl Stream {
    fn new(areas: &[Area]) -> Stream {
        Stream {
            store: None,
            last_seq: None,
            pending: DirtySet::for_areas(areas),
            in_flight: false,
            compacting: false,
            compaction: None,
            outcome: None,
            staging: Vec::new(),
            every: None,
            due: NEVER,
        }
    }
}

/// Marks a pause in progress for as long as it lives (see `Shared::pausing`).
struct PauseGuard<'a> {
    shared: &'a Shared,
}

impl<'a> PauseGuard<'a> {
    fn enter(shared: &'a Shared) -> PauseGuard<'a> {
        *shared
            .pausing
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        PauseGuard { shared }
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        let mut n = self
            .shared
            .pausing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.shared.resumed.notify_all();
        }
    }
}

/// What one attempt to start a checkpoint came to.
#[derive(Debug)]
enum Attempt {
    Started(Started),
    /// Nothing was captured: wait for the stream's compaction, then try again.
    AwaitCompaction,
}

#[derive(Debug)]
struct Writer {
    jobs: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
}

/// One image to write, handed to the writer thread.
#[derive(Debug)]
struct Job {
    stream: u32,
    layout: u64,
    pause: Duration,
    store: Store,
    header: ImageHeader,
    extents: Vec<Extent>,
    source: Source,
    /// For an increment: its pages, merged back into the stream if the image fails.
    carried: Option<DirtySet>,
    /// Compact the image into a full one once it is committed.
    compact: bool,
}

#[derive(Debug)]
enum Source {
    /// The captured bytes, in extent order; the writer thread writes the image from them.
    Staging(Vec<u8>),
    /// A child writing the image onto `pending`'s temp file; the writer thread waits for it
    /// and commits.
    Fork {
        snap: ForkSnapshot,
        pending: Box<Pending>,
    },
}

impl Checkpointer {
    /// Maps the heap and starts dirty tracking (nothing is written until a checkpoint).
    pub fn new(config: CheckpointConfig) -> Result<Checkpointer, Error> {
        let heap = CriticalHeap::map(config.heap)?;
        let heap_area = Area {
            base: heap.base(),
            len: heap.size(),
        };
        let used = heap.lock().used_span();
        let (mut tracker, warning) = Tracker::new(config.dirty)?;
        if let Some(w) = warning {
            warn_fallback(&w);
        }
        if let Err(e) = tracker.add_area(heap_area, used) {
            if config.dirty == DirtyMode::Uffd {
                return Err(e);
            }
            warn_fallback(&e.to_string());
            tracker = Tracker::hashing();
            tracker.add_area(heap_area, used)?;
        }
        let checkpointer = Checkpointer {
            heap,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    areas: vec![heap_area],
                    tracker,
                    streams: BTreeMap::new(),
                    layout: 0,
                    report: None,
                }),
                done: Condvar::new(),
                on_commit: Mutex::new(None),
                cancel: AtomicBool::new(false),
                pausing: Mutex::new(0),
                resumed: Condvar::new(),
                compactors: Mutex::new(Vec::new()),
            }),
            epoch: Instant::now(),
            next_due: AtomicU64::new(NEVER),
            writer: Mutex::new(None),
            config,
        };
        if let Some(every) = checkpointer.config.every {
            checkpointer.set_every(0, Some(every));
        }
        Ok(checkpointer)
    }

    /// The critical heap.
    pub fn heap(&self) -> &CriticalHeap {
        &self.heap
    }

    /// The configuration in use.
    pub fn config(&self) -> &CheckpointConfig {
        &self.config
    }

    /// The dirty tracking method in use (it may have fallen back to hashing).
    pub fn tracker_kind(&self) -> TrackerKind {
        self.state().tracker.kind()
    }

    /// Number of regions registered with [`Checkpointer::register`].
    pub fn region_count(&self) -> usize {
        self.state().areas.len() - 1
    }

    /// Registers `len` bytes at `ptr` (a global, a static buffer) for checkpointing; returns
    /// its region id (1, 2, ... in registration order). Recovery requires the same
    /// registrations, in the same order, with the same lengths. Every stream's next image is
    /// full.
    ///
    /// # Safety
    /// The bytes must stay valid, mapped memory for as long as this Checkpointer lives:
    /// checkpoints read them (from the writer's snapshot or any thread calling checkpoint) and
    /// `recover` overwrites them.
    pub unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<u32, Error> {
        let start = ptr as usize;
        let end = start
            .checked_add(len)
            .filter(|_| !ptr.is_null() && len > 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("region {start:#x}+{len} is empty or wraps"))
            })?;
        let mut st = self.state();
        for (index, area) in st.areas.iter().enumerate() {
            if start < area.base + area.len && area.base < end {
                let what = if index == 0 {
                    "the critical heap".to_owned()
                } else {
                    format!("region {index}")
                };
                return Err(Error::InvalidArgument(format!(
                    "region {start:#x}+{len} overlaps {what} ({:#x}+{})",
                    area.base, area.len
                )));
            }
        }
        match vm::check_read_write(start, end) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                return Err(Error::InvalidArgument(format!(
                    "region {start:#x}+{len}: {why}"
                )));
            }
            Err(e) => return Err(Error::Tracking(e)),
        }
        let area = Area { base: start, len };
        if let Err(e) = st.tracker.add_area(area, len) {
            if self.config.dirty == DirtyMode::Uffd {
                return Err(e);
            }
            let used = self.heap.lock().used_span();
            switch_to_hashing(&mut st, used, &e.to_string())?;
            st.tracker.add_area(area, len)?;
        }
        st.areas.push(area);
        st.layout += 1;
        let areas = st.areas.clone();
        for stream in st.streams.values_mut() {
            stream.last_seq = None;
            stream.pending.reset(&areas);
        }
        Ok(u32::try_from(areas.len() - 1).unwrap_or(u32::MAX))
    }

    /// Takes a checkpoint of every used page's changes on stream `stream` and returns once they
    /// are captured; the image is written in the background. Waits first for the stream's
    /// previous image (and, should its chain have reached the store's limit, for the running
    /// compaction); if that image failed, returns its error instead (no new checkpoint is
    /// taken: its pages are kept for the next one, so call again).
    pub fn checkpoint(&self, stream: u32) -> Result<Started, Error> {
        let mut st = self.wait_idle(self.state(), stream);
        if let Some(Err(e)) = stream_mut(&mut st, stream).outcome.take() {
            return Err(e);
        }
        self.start(st, stream).1
    }

    /// Takes a checkpoint and returns once its image is committed (durable). An earlier
    /// asynchronous failure is superseded: its pages are part of this image.
    pub fn checkpoint_sync(&self, stream: u32) -> Result<ImageInfo, Error> {
        let mut st = self.wait_idle(self.state(), stream);
        stream_mut(&mut st, stream).outcome = None;
        let (st, started) = self.start(st, stream);
        started?;
        let mut st = self.wait_idle(st, stream);
        match stream_mut(&mut st, stream).outcome.take() {
            Some(result) => result,
            None => Err(Error::Busy("the result was taken by a concurrent wait")),
        }
    }

    /// Waits until the stream has no image being written, nor being compacted; returns the
    /// last image written (None if none since the last call) or its failure.
    pub fn wait(&self, stream: u32) -> Result<Option<ImageInfo>, Error> {
        let st = self.wait_idle(self.state(), stream);
        let mut st = self.wait_while(st, stream, |s| s.compacting);
        stream_mut(&mut st, stream).outcome.take().transpose()
    }

    /// How the stream's last compaction ended (the full image it committed, or why it failed),
    /// if one ran. A failed compaction loses nothing: the increment stays, with its chain, and
    /// the next image asks for a compaction again.
    pub fn last_compaction(&self, stream: u32) -> Option<Result<ImageInfo, String>> {
        self.state()
            .streams
            .get(&stream)
            .and_then(|s| s.compaction.clone())
    }

    /// Collects the dirty pages and returns how many the stream's next incremental image
    /// would carry (tests and diagnostics; it re-arms tracking like a checkpoint does).
    pub fn pending_pages(&self, stream: u32) -> Result<usize, Error> {
        let mut st = self.state();
        ensure_stream(&mut st, stream);
        let mut heap = self.heap.lock();
        let used = heap.used_span();
        self.collect_into_streams(&mut st, used)?;
        drop(heap);
        Ok(stream_mut(&mut st, stream).pending.count())
    }

    /// Restores the newest good checkpoint chain of `stream` into the heap and the registered
    /// regions (register them first, as when the checkpoint was taken). Returns what was
    /// restored, or None (memory untouched) when the stream has no checkpoint. A corrupt newest
    /// image is skipped for the previous one; [`Recovered::skipped`] says why. Afterwards every
    /// page counts as clean and the stream's next image may be an increment.
    ///
    /// On an error after memory was written (a layout mismatch is detected before), the heap
    /// is reset to empty, and registered regions may hold part of the image.
    ///
    /// # Safety
    /// No reference into the heap or the registered regions may be alive, and no other thread
    /// may access them, while this runs: their bytes are replaced.
    pub unsafe fn recover(&self, stream: u32) -> Result<Option<Recovered>, Error> {
        let mut st = self.state();
        if st.streams.values().any(|s| s.in_flight || s.compacting) {
            return Err(Error::Busy("a checkpoint image is being written"));
        }
        let result = self.recover_locked(&mut st, stream);
        st.report = Some(RecoveryReport {
            stream,
            dir: self.config.stream_dir(stream),
            outcome: match &result {
                Ok(r) => Ok(r.clone()),
                Err(e) => Err(e.to_string()),
            },
        });
        result
    }

    /// Installs (or removes) the function told about every committed image, on the writer
    /// thread; libft's C ABI uses it to report checkpoints to watchd.
    pub fn set_commit_hook(&self, hook: Option<CommitHook>) {
        *self
            .shared
            .on_commit
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = hook;
    }

    /// The outcome of the last `recover` call.
    pub fn last_report(&self) -> Option<RecoveryReport> {
        self.state().report.clone()
    }

    /// Takes checkpoints of `stream` every `every` (None or zero: stop), at the next
    /// [`Checkpointer::safe_point`] after each period ends.
    pub fn set_every(&self, stream: u32, every: Option<Duration>) {
        let mut st = self.state();
        let now = self.now_ns();
        let s = ensure_stream(&mut st, stream);
        s.every = every.filter(|d| !d.is_zero());
        s.due = s.every.map_or(NEVER, |d| now.saturating_add(nanos(d)));
        self.reschedule(&st);
    }

    /// Marks a point where critical memory is consistent: takes the periodic checkpoints that
    /// are due (asynchronously). Costs a clock read and a compare when none is due. Returns
    /// the checkpoint started, if any, or the failure of starting one (or of the stream's
    /// previous image, reported once).
    pub fn safe_point(&self) -> Result<Option<Started>, Error> {
        if self.now_ns() < self.next_due.load(Ordering::Acquire)
            || crate::standby::role() == crate::standby::Role::Standby
        {
            // A standby takes no periodic checkpoints: its images come from the owner.
            return Ok(None);
        }
        let mut st = self.state();
        let now = self.now_ns();
        let due: Vec<u32> = st
            .streams
            .iter()
            .filter(|(_, s)| s.every.is_some() && s.due <= now && !s.in_flight)
            .map(|(id, _)| *id)
            .collect();
        let mut result = Ok(None);
        for id in due {
            let s = stream_mut(&mut st, id);
            s.due = s.every.map_or(NEVER, |d| now.saturating_add(nanos(d)));
            let started = match s.outcome.take() {
                Some(Err(e)) => Err(e),
                // A chain waiting for its compaction: the next period tries again.
                _ => self.try_start(&mut st, id).map(|a| match a {
                    Attempt::Started(s) => Some(s),
                    Attempt::AwaitCompaction => None,
                }),
            };
            if result.is_ok() {
                result = started;
            }
        }
        self.reschedule(&st);
        result
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(NEVER - 1)
    }

    fn reschedule(&self, st: &State) {
        let next = st
            .streams
            .values()
            .filter(|s| s.every.is_some())
            .map(|s| s.due)
            .min()
            .unwrap_or(NEVER);
        self.next_due.store(next, Ordering::Release);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates the stream if needed and waits until no image of it is being written.
    fn wait_idle<'a>(&'a self, st: MutexGuard<'a, State>, stream: u32) -> MutexGuard<'a, State> {
        self.wait_while(st, stream, |s| s.in_flight)
    }

    /// Creates the stream if needed and waits while `busy` says so of it.
    fn wait_while<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        stream: u32,
        busy: impl Fn(&Stream) -> bool,
    ) -> MutexGuard<'a, State> {
        ensure_stream(&mut st, stream);
        while st.streams.get(&stream).is_some_and(&busy) {
            st = self
                .shared
                .done
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st
    }

    fn store(&self, st: &mut State, stream: u32) -> Result<Store, Error> {
        let s = ensure_stream(st, stream);
        if let Some(store) = &s.store {
            return Ok(store.clone());
        }
        let store = Store::open(
            &self.config.stream_dir(stream),
            &self.config.app,
            self.config.policy.clone(),
        )?;
        s.store = Some(store.clone());
        Ok(store)
    }

    /// Gets-and-re-arms the dirty pages and adds them to every stream's pending set. On a
    /// tracking failure in auto mode, switches to hashing (every stream's next image full).
    fn collect_into_streams(&self, st: &mut State, heap_used: usize) -> Result<(), Error> {
        let lens = scan_lens(&st.areas, heap_used);
        let mut fresh = DirtySet::for_areas(&st.areas);
        let State {
            areas,
            tracker,
            streams,
            ..
        } = st;
        match tracker.collect(areas, &lens, &mut fresh) {
            Ok(()) => {
                for s in streams.values_mut() {
                    s.pending.union_with(&fresh);
                }
                Ok(())
            }
            Err(e) if self.config.dirty == DirtyMode::Uffd => Err(e),
            Err(e) => switch_to_hashing(st, heap_used, &e.to_string()),
        }
    }

    /// Starts a checkpoint of the idle stream `id`, first waiting for its running compaction
    /// when its chain has reached the store's limit (so a lagging compaction slows the
    /// checkpoints down instead of making the next one a full capture).
    fn start<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        id: u32,
    ) -> (MutexGuard<'a, State>, Result<Started, Error>) {
        loop {
            match self.try_start(&mut st, id) {
                Ok(Attempt::Started(s)) => return (st, Ok(s)),
                Ok(Attempt::AwaitCompaction) => st = self.wait_while(st, id, |s| s.compacting),
                Err(e) => return (st, Err(e)),
            }
        }
    }

    /// Collects, captures and queues one image of `id`; the stream must be idle.
    fn try_start(&self, st: &mut State, id: u32) -> Result<Attempt, Error> {
        crate::standby::admit_checkpoint()?;
        let _quiet = PauseGuard::enter(&self.shared);
        let paused = Instant::now();
        let store = self.store(st, id)?;
        let plan = store.plan()?;
        let s = stream_mut(st, id);
        if plan.parent.is_none() && s.compacting && s.last_seq.is_some() {
            // The chain reached its limit while its compaction still runs; once that ends the
            // chain is short again and this checkpoint an increment.
            return Ok(Attempt::AwaitCompaction);
        }
        let mut heap = self.heap.lock();
        let used = heap.used_span();
        self.collect_into_streams(st, used)?;
        let areas = st.areas.clone();
        let lens = scan_lens(&areas, used);
        let layout = st.layout;
        let stream = stream_mut(st, id);
        let incremental = plan.parent.is_some() && plan.parent == stream.last_seq;
        let carried = std::mem::replace(&mut stream.pending, DirtySet::for_areas(&areas));
        let (extents, pages) = if incremental {
            (dirty_extents(&areas, &carried), carried.count())
        } else {
            let extents = full_extents(&areas, &lens);
            let pages = extents.iter().map(|e| e.len.div_ceil(page_size())).sum();
            (extents, pages)
        };
        let bytes = total_len(&extents);
        let header = ImageHeader {
            app: self.config.app.clone(),
            stream: id,
            seq: plan.seq,
            parent: if incremental { plan.parent } else { None },
            created_unix_ns: ckpt::unix_now_ns(),
            page_size: u32::try_from(page_size()).unwrap_or(u32::MAX),
            regions: region_descs(&areas),
        };
        // Only an increment can be compacted, and one compaction per stream runs at a time
        // (the running one shortens this image's chain too).
        let compact = incremental && plan.compact && !stream.compacting;
        let (source, method) = if bytes <= self.config.staging_max {
            let mut buf = std::mem::take(&mut stream.staging);
            copy_to_staging(&extents, &mut buf);
            (Source::Staging(buf), CaptureMethod::Staging)
        } else {
            // The child writes onto the temp file, which must exist (header written) before
            // the clone; the rest of the commit runs on the writer thread.
            let forked = store
                .begin(&header)
                .map_err(Error::from)
                .and_then(|mut pending| {
                    ForkSnapshot::start(&extents, pending.writer(), CloneFlavor::Clone3)
                        .map(|snap| Source::Fork {
                            snap,
                            pending: Box::new(pending),
                        })
                        .map_err(Error::Snapshot)
                });
            match forked {
                Ok(source) => (source, CaptureMethod::Fork),
                Err(e) => {
                    if incremental {
                        stream.pending.union_with(&carried);
                    } else {
                        stream.last_seq = None;
                    }
                    return Err(e);
                }
            }
        };
        drop(heap);
        let pause = paused.elapsed();
        let submitted = self.submit(Job {
            stream: id,
            layout,
            pause,
            store,
            header,
            extents,
            source,
            carried: incremental.then_some(carried),
            compact,
        });
        let stream = stream_mut(st, id);
        if let Err((job, e)) = submitted {
            match job.carried {
                Some(pages) => stream.pending.union_with(&pages),
                None => stream.last_seq = None,
            }
            return Err(Error::Writer(e));
        }
        stream.in_flight = true;
        Ok(Attempt::Started(Started {
            stream: id,
            seq: plan.seq,
            parent: if incremental { plan.parent } else { None },
            compacts: compact,
            pages,
            bytes,
            method,
            pause,
        }))
    }

    /// Hands a job to the writer thread, starting it (again) if needed. Gives the job back
    /// when no thread can be started.
    fn submit(&self, job: Job) -> Result<(), (Box<Job>, std::io::Error)> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let job = match writer.as_ref() {
            Some(w) => match w.jobs.send(job) {
                Ok(()) => return Ok(()),
                // The thread is gone (it does not panic by design, but never lose a job).
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::clone(&self.shared);
        match std::thread::Builder::new()
            .name("ft-ckpt-writer".to_owned())
            .spawn(move || writer_loop(&shared, &rx))
        {
            Ok(thread) => {
                tx.send(job).map_err(|mpsc::SendError(job)| {
                    (
                        Box::new(job),
                        std::io::Error::other("writer thread exited at once"),
                    )
                })?;
                *writer = Some(Writer { jobs: tx, thread });
                Ok(())
            }
            Err(e) => Err((Box::new(job), e)),
        }
    }

    fn recover_locked(&self, st: &mut State, id: u32) -> Result<Option<Recovered>, Error> {
        let store = self.store(st, id)?;
        let areas = st.areas.clone();
        let expected = region_descs(&areas);
        let mut heap = self.heap.lock();
        let mut failure: Option<Error> = None;
        let mut checked: Option<u64> = None;
        let mut wiped = false;
        let result = store.recover(&mut |header, index, offset, data| {
            if failure.is_some() {
                return;
            }
            if checked != Some(header.seq) {
                if let Err(e) = check_layout(header, &expected) {
                    failure = Some(e);
                    return;
                }
                checked = Some(header.seq);
            }
            if !wiped {
                // Pages the image does not carry must read as zero, as they did when it was
                // taken (only the used span is captured, and it starts from a fresh heap).
                heap.wipe_and_format();
                wiped = true;
            }
            let area = areas.get(index as usize);
            let fits = area.is_some_and(|a| {
                offset
                    .checked_add(data.len() as u64)
                    .is_some_and(|end| end <= a.len as u64)
            });
            match area {
                Some(a) if fits => {
                    let dst = a.base + super::heap::to_usize(offset);
                    populate(dst, data.len());
                    // SAFETY: the destination lies inside a tracked area (checked just above),
                    // which is mapped writable: the heap is ours and locked; regions were
                    // checked at registration and their owner promised they stay valid. The
                    // caller of `recover` guarantees nobody else accesses them now.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len());
                    }
                }
                _ => {
                    failure = Some(Error::Corrupt(format!(
                        "image {} has a chunk of {} bytes at offset {offset} of region {index}, outside it",
                        header.seq,
                        data.len()
                    )));
                }
            }
        });
        let outcome = match (result, failure) {
            (Err(e), _) => Err(Error::from(e)),
            (Ok(_), Some(e)) => Err(e),
            (Ok(None), None) => Ok(None),
            (Ok(Some(recovery)), None) => match heap.check_restored() {
                Ok(()) => Ok(Some(Recovered {
                    seq: recovery.seq,
                    chain: recovery.chain,
                    skipped: recovery.skipped,
                })),
                Err(e) => Err(e),
            },
        };
        if !wiped {
            return outcome;
        }
        if outcome.is_err() {
            heap.wipe_and_format();
        }
        let used = heap.used_span();
        drop(heap);
        // Memory was rewritten: every page is clean now, and only the recovered stream's next
        // image may be an increment (on top of what was recovered).
        let lens = scan_lens(&areas, used);
        if let Err(e) = st.tracker.reset(&areas, &lens) {
            if self.config.dirty == DirtyMode::Uffd {
                return Err(e);
            }
            switch_to_hashing(st, used, &e.to_string())?;
        }
        st.layout += 1;
        for s in st.streams.values_mut() {
            s.pending.reset(&areas);
            s.last_seq = None;
        }
        if let Ok(Some(r)) = &outcome {
            stream_mut(st, id).last_seq = Some(r.seq);
        }
        outcome
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Running compactions give up (leaving the increments they were replacing); queued
        // images are still written.
        self.shared.cancel.store(true, Ordering::Relaxed);
        if let Some(Writer { jobs, thread }) = writer {
            // Closing the queue lets the thread finish the queued images and exit.
            drop(jobs);
            let _ = thread.join();
        }
        let compactors = std::mem::take(
            &mut *self
                .shared
                .compactors
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in compactors {
            let _ = handle.join();
        }
    }
}

impl Shared {
    /// Records the result of a written image and wakes waiters. Returns the image to compact
    /// when `compact` asked for it and it was committed (the stream then counts as compacting).
    fn complete(
        &self,
        id: u32,
        layout: u64,
        carried: Option<DirtySet>,
        result: Result<ImageInfo, Error>,
        staging: Option<Vec<u8>>,
        compact: bool,
    ) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let current = st.layout;
        let mut to_compact = None;
        if let Some(s) = st.streams.get_mut(&id) {
            s.in_flight = false;
            if let Ok(info) = &result
                && compact
                && !s.compacting
                && !self.cancel.load(Ordering::Relaxed)
            {
                s.compacting = true;
                to_compact = Some(info.seq);
            }
            if let Some(mut buf) = staging {
                buf.clear();
                s.staging = buf;
            }
            match &result {
                Ok(info) => s.last_seq = (layout == current).then_some(info.seq),
                Err(_) => match carried {
                    // The failed increment's pages are still unsaved: keep them pending,
                    // so the next increment (against the same parent) carries them.
                    Some(pages) if layout == current => s.pending.union_with(&pages),
                    // A failed full image leaves nothing to build on.
                    _ => s.last_seq = None,
                },
            }
            s.outcome = Some(result);
        }
        self.done.notify_all();
        to_compact
    }

    /// Blocks while an application thread is paused for a checkpoint.
    fn wait_out_pauses(&self) {
        let mut n = self.pausing.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            n = self.resumed.wait(n).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Records how a compaction ended and wakes waiters.
    fn compacted(&self, id: u32, seq: u64, result: Result<ImageInfo, ckpt::StoreError>) {
        if let Err(e) = &result
            && !matches!(e, ckpt::StoreError::Cancelled { .. })
        {
            // Nothing is lost (the increment and its chain stay), but chains grow until a
            // compaction succeeds, which someone running the program should hear about.
            eprintln!("libft: compacting checkpoint {seq} of stream {id} failed: {e}");
        }
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = st.streams.get_mut(&id) {
            s.compacting = false;
            s.compaction = Some(result.map_err(|e| e.to_string()));
        }
        self.done.notify_all();
    }
}

fn writer_loop(shared: &Arc<Shared>, jobs: &mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let (stream, layout, pause, compact) = (job.stream, job.layout, job.pause, job.compact);
        let store = job.store.clone();
        let carried = job.carried.clone();
        let (result, staging, snapshot) = write_image(job);
        if let Ok(info) = &result {
            let hook = shared
                .on_commit
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(hook) = hook.as_ref() {
                hook(stream, info, pause);
            }
        }
        let to_compact = shared.complete(stream, layout, carried, result, staging, compact);
        // Reaped only now: a snapshot child that finished its image is still tearing down its
        // copy of the address space, which need not delay the waiters woken just above.
        drop(snapshot);
        if let Some(seq) = to_compact {
            start_compaction(shared, stream, store, seq);
        }
    }
}

/// Compacts image `seq` of `stream` on a thread of its own, at a lower priority, so that the
/// stream's next increments are written meanwhile.
fn start_compaction(shared: &Arc<Shared>, stream: u32, store: Store, seq: u64) {
    let worker = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("ft-ckpt-compact".to_owned())
        .spawn(move || {
            // SAFETY: setpriority on this thread's own id (Linux applies PRIO_PROCESS to a
            // thread); it only lowers this thread's priority. Failing to is harmless.
            unsafe {
                let tid = libc::id_t::try_from(libc::gettid()).unwrap_or(0);
                if tid != 0 {
                    let now = libc::getpriority(libc::PRIO_PROCESS, tid);
                    libc::setpriority(
                        libc::PRIO_PROCESS,
                        tid,
                        now.saturating_add(COMPACTION_NICENESS),
                    );
                }
            }
            let mut gate = || {
                worker.wait_out_pauses();
                !worker.cancel.load(Ordering::Relaxed)
            };
            let result = store.compact(seq, &mut gate);
            worker.compacted(stream, seq, result);
        });
    match spawned {
        Ok(handle) => {
            let mut handles = shared
                .compactors
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Join the finished ones, so handles do not pile up.
            let (done, running): (Vec<_>, Vec<_>) =
                handles.drain(..).partition(JoinHandle::is_finished);
            *handles = running;
            handles.push(handle);
            drop(handles);
            for h in done {
                let _ = h.join();
            }
        }
        Err(e) => shared.compacted(
            stream,
            seq,
            Err(ckpt::StoreError::Uncompactable {
                seq,
                reason: format!("cannot start a compaction thread: {e}"),
            }),
        ),
    }
}

/// Writes and commits one image; returns the staging buffer for reuse, and the snapshot
/// child to reap once the outcome is published.
fn write_image(
    job: Job,
) -> (
    Result<ImageInfo, Error>,
    Option<Vec<u8>>,
    Option<ForkSnapshot>,
) {
    let Job {
        store,
        header,
        extents,
        source,
        ..
    } = job;
    match source {
        Source::Staging(data) => {
            let result = write_staged(&store, &header, &extents, &data);
            (result, Some(data), None)
        }
        Source::Fork { mut snap, pending } => {
            let result = snap
                .finish()
                .and_then(|summary| Ok(pending.commit_finished(&summary)?));
            (result, None, Some(snap))
        }
    }
}

/// Writes the image from the staging buffer (vectored writes straight from it, many chunks
/// per system call) and commits it.
fn write_staged(
    store: &Store,
    header: &ImageHeader,
    extents: &[Extent],
    data: &[u8],
) -> Result<ImageInfo, Error> {
    if total_len(extents) > data.len() {
        return Err(Error::Corrupt(
            "staging buffer shorter than its extents".to_owned(),
        ));
    }
    let mut pending = store.begin(header)?;
    let mut rest = data;
    let pieces = extents.iter().map(|e| {
        let (bytes, tail) = rest.split_at(e.len);
        rest = tail;
        (e.area, e.offset, bytes)
    });
    pending.writer().chunks(pieces)?;
    Ok(pending.commit()?)
}

/// Faults in the pages of `[addr, addr + len)` for writing with one `MADV_POPULATE_WRITE`
/// (Linux 5.14+), before a chunk is copied there: far cheaper than one fault per page for the
/// freshly wiped heap. Only an optimisation: where the kernel refuses, the copy faults the
/// pages in itself.
fn populate(addr: usize, len: usize) {
    let page = page_size();
    let start = vm::align_down(addr, page);
    let Some(end) = addr.checked_add(len).and_then(|e| vm::align_up(e, page)) else {
        return;
    };
    if end > start {
        // SAFETY: MADV_POPULATE_WRITE only faults in (and zero-fills if absent) pages of a
        // range the caller is about to write anyway, inside a tracked area (mapped writable);
        // it never changes their contents or the mapping.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }
}

fn ensure_stream(st: &mut State, id: u32) -> &mut Stream {
    let areas = &st.areas;
    st.streams.entry(id).or_insert_with(|| Stream::new(areas))
}

fn stream_mut(st: &mut State, id: u32) -> &mut Stream {
    ensure_stream(st, id)
}

/// How much of each area holds data: the heap's used span, regions whole.
fn scan_lens(areas: &[Area], heap_used: usize) -> Vec<usize> {
    areas
        .iter()
        .enumerate()
        .map(|(i, a)| if i == 0 { heap_used.min(a.len) } else { a.len })
        .collect()
}

fn region_descs(areas: &[Area]) -> Vec<RegionDesc> {
    areas
        .iter()
        .enumerate()
        .map(|(i, a)| RegionDesc {
            id: u32::try_from(i).unwrap_or(u32::MAX),
            base: a.base as u64,
            len: a.len as u64,
        })
        .collect()
}

/// Checks an image's layout against this process before anything is applied: same page size,
/// heap at the same address with the same size, same number of regions with the same lengths
/// (region addresses may differ: ASLR moves globals between runs).
fn check_layout(header: &ImageHeader, expected: &[RegionDesc]) -> Result<(), Error> {
    let seq = header.seq;
    if u64::from(header.page_size) != page_size() as u64 {
        return Err(Error::Mismatch(format!(
            "image {seq} was taken with {}-byte pages, this system uses {}",
            header.page_size,
            page_size()
        )));
    }
    let (Some(heap), Some(want)) = (header.regions.first(), expected.first()) else {
        return Err(Error::Mismatch(format!("image {seq} describes no heap")));
    };
    if heap.base != want.base || heap.len != want.len {
        return Err(Error::Mismatch(format!(
            "image {seq} holds a heap at {:#x}+{:#x}, this process has it at {:#x}+{:#x} \
             (start with the FT_HEAP_ADDR/FT_HEAP_SIZE and identity used when it was taken)",
            heap.base, heap.len, want.base, want.len
        )));
    }
    if header.regions.len() != expected.len() {
        return Err(Error::Mismatch(format!(
            "image {seq} holds {} regions registered with ft_critical, this process registered \
             {} (register the same ones, in the same order, before t_recover)",
            header.regions.len() - 1,
            expected.len() - 1
        )));
    }
    for (i, (got, want)) in header.regions.iter().zip(expected).enumerate().skip(1) {
        if got.id != want.id || got.len != want.len {
            return Err(Error::Mismatch(format!(
                "region {i} is {} bytes in image {seq}, but {} bytes were registered",
                got.len, want.len
            )));
        }
    }
    Ok(())
}

/// Replaces the tracker with a hashing one (baselined on current contents) and makes every
/// stream's next image full, since pages written before the switch are unknown.
fn switch_to_hashing(st: &mut State, heap_used: usize, why: &str) -> Result<(), Error> {
    warn_fallback(why);
    let mut tracker = Tracker::hashing();
    for (area, len) in st.areas.iter().zip(scan_lens(&st.areas, heap_used)) {
        tracker.add_area(*area, len)?;
    }
    st.tracker = tracker;
    st.layout += 1;
    let areas = st.areas.clone();
    for s in st.streams.values_mut() {
        s.last_seq = None;
        s.pending.reset(&areas);
    }
    Ok(())
}

/// Says once per process that dirty tracking fell back to hashing.
fn warn_fallback(why: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!("libft: {why}; tracking dirty pages by hashing instead (slower checkpoints)");
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(NEVER - 1)
}

static GLOBAL: OnceLock<Result<Checkpointer, Error>> = OnceLock::new();

/// The process-wide instance behind the C ABI, created on first use from the environment
/// ([`CheckpointConfig::from_env`]). Creation is attempted once: if it fails (a bad
/// configuration, the heap's address taken), every later call gets the same error.
pub fn global() -> Result<&'static Checkpointer, &'static Error> {
    GLOBAL
        .get_or_init(|| CheckpointConfig::from_env().and_then(Checkpointer::new))
        .as_ref()
}

/// Creates the process-wide instance with an explicit configuration, before anything used
/// it; [`Error::Busy`] if it exists (or failed) already.
pub fn init_global(config: CheckpointConfig) -> Result<&'static Checkpointer, Error> {
    if GLOBAL.get().is_some() {
        return Err(Error::Busy("the process-wide critical heap exists already"));
    }
    let created = Checkpointer::new(config)?;
    GLOBAL
        .set(Ok(created))
        .map_err(|_| Error::Busy("the process-wide critical heap exists already"))?;
    global().map_err(|_| Error::Busy("the process-wide critical heap failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpointer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Checkpointer>();
    }

    #[test]
    fn layout_check_names_what_differs() {
        let expected = vec![
            RegionDesc {
                id: 0,
                base: 0x5f00_0000_0000,
                len: 1 << 20,
            },
            RegionDesc {
                id: 1,
                base: 0x5555_0000,
                len: 64,
            },
        ];
        let header = |regions: Vec<RegionDesc>| ImageHeader {
            app: "a".into(),
            stream: 0,
            seq: 7,
            parent: None,
            created_unix_ns: 0,
            page_size: u32::try_from(page_size()).expect("page size fits"),
            regions,
        };
        // A moved global (ASLR) is fine.
        let mut moved = expected.clone();
        moved[1].base = 0x5666_0000;
        assert!(check_layout(&header(moved), &expected).is_ok());
        let mut other_heap = expected.clone();
        other_heap[0].base += 1 << 30;
        let err = check_layout(&header(other_heap), &expected).expect_err("heap moved");
        assert!(err.to_string().contains("FT_HEAP_ADDR"), "{err}");
        let err = check_layout(&header(expected[..1].to_vec()), &expected).expect_err("count");
        assert!(err.to_string().contains("0 regions"), "{err}");
        let mut longer = expected.clone();
        longer[1].len = 65;
        let err = check_layout(&header(longer), &expected).expect_err("length");
        assert!(err.to_string().contains("region 1 is 65 bytes"), "{err}");
    }

    #[test]
    fn report_says_what_happened() {
        let report = RecoveryReport {
            stream: 3,
            dir: PathBuf::from("/ck/3"),
            outcome: Ok(Some(Recovered {
                seq: 9,
                chain: vec![5, 9],
                skipped: vec![(10, "bad checksum".into())],
            })),
        };
        assert_eq!(
            report.to_string(),
            "stream 3: recovered checkpoint 9 from /ck/3 (chain 5,9); skipped newer checkpoint 10: bad checksum"
        );
    }
}
