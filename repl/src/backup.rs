//! The backup side of one fileset's stream: what the bcplog does with each message from the
//! pump (greeting and fencing, appending and acknowledging, resync), and the replay loop that
//! applies the durable log to the replica and trims it.
//!
//! Blocking code: both run on their own threads (see [`crate::runtime`]), never on an async
//! event loop. The bcplog thread never acknowledges a record before it is durable in the log;
//! replay never trims a record before the replica's applied seq covering it is durable.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::proto::{Mode, ToBackup, ToPrimary};
use crate::replay::{self, ReplayError, Replica};
use crate::segment::{LogError, SegmentLog, SegmentOptions};
use crate::{Op, OpRecord, manifest};

/// Manifest entries per message during a resync (well under the default frame limit).
pub const MANIFEST_CHUNK: usize = 4096;
/// Records replay applies between looks at the log.
pub const REPLAY_BATCH: usize = 4096;
/// Replay makes the replica durable (and trims the log) at least this often while busy.
pub const REPLAY_COMMIT_EVERY: Duration = Duration::from_millis(500);
/// Replay looks at the log at least this often even without a wake-up.
pub const REPLAY_IDLE_CHECK: Duration = Duration::from_millis(200);
/// Most bytes of appended records the bcplog keeps in memory for replay, which then applies
/// them without reading them back from the log and decoding them again. Beyond it (replay
/// lags far behind) replay reads the log, as it does after a restart.
pub const REPLAY_MEMORY_BYTES: usize = 64 << 20;
/// Bytes a record kept for replay is counted as beyond its data (path, headers).
const RECORD_OVERHEAD: usize = 64;

/// Errors of the backup side. A protocol error closes the connection; the pump reconnects.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The log failed.
    #[error("log: {0}")]
    Log(#[from] LogError),
    /// The replica failed.
    #[error("replica: {0}")]
    Replay(#[from] ReplayError),
    /// Scanning the replica for a resync failed.
    #[error("manifest: {0}")]
    Manifest(#[from] manifest::ManifestError),
    /// The stream state file could not be read or written.
    #[error("stream state {path}: {why}")]
    Meta { path: PathBuf, why: String },
    /// The pump broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The pump is refused (another fileset, a stale epoch).
    #[error("refused: {0}")]
    Refused(String),
}

/// What a backup remembers about its stream, durably (`<state_dir>/stream`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    /// The generation of the stream its log and replica follow (0: none yet).
    pub generation: u64,
    /// The highest ownership epoch seen: older pumps are refused.
    pub epoch: u64,
}

const META_FILE: &str = "stream";

impl StreamMeta {
    /// The stream state kept in `dir` (the default when there is none yet).
    pub fn load(dir: &Path) -> Result<StreamMeta, BackupError> {
        let path = dir.join(META_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => rmp_serde::from_slice(&bytes).map_err(|e| BackupError::Meta {
                path,
                why: format!("damaged ({e}); delete it to resync the replica from scratch"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StreamMeta::default()),
            Err(e) => Err(BackupError::Meta {
                path,
                why: e.to_string(),
            }),
        }
    }

    /// Written with the atomic recipe: temp file, fsync, rename, fsync of the directory.
    fn store(&self, dir: &Path) -> Result<(), BackupError> {
        use std::io::Write;
        let path = dir.join(META_FILE);
        let tmp = dir.join(format!(".{META_FILE}.tmp"));
        let fail = |e: std::io::Error| BackupError::Meta {
            path: path.clone(),
            why: e.to_string(),
        };
        let bytes = rmp_serde::to_vec(self).expect("plain data encodes");
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(fail)?;
        Ok(())
    }
}

/// Where a backup keeps a fileset.
#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// The fileset's name.
    pub fileset: String,
    /// The replica directory.
    pub root: PathBuf,
    /// Log, applied seq and stream state live beneath this directory.
    pub state_dir: PathBuf,
    /// Segment sizes.
    pub segment: SegmentOptions,
}

/// The log and the replica, shared by the bcplog and replay threads.
#[derive(Debug)]
pub struct Shared {
    /// The durable log.
    pub log: Mutex<SegmentLog>,
    /// The replica.
    pub replica: Mutex<Replica>,
    /// Set when the log's durable seq moved (replay waits on it).
    wake: (Mutex<bool>, Condvar),
    /// Records appended to the log, in memory for replay (see [`REPLAY_MEMORY_BYTES`]).
    recent: Mutex<Recent>,
    /// Bumped, with the replica locked, whenever the replica's seqs stop following the log
    /// (a resync, a promotion): replay drops records it fetched before.
    rebases: AtomicU64,
}

/// A run of consecutive records the bcplog appended, oldest first, and their weight. Only a
/// copy: the log stays the record of truth (replay falls back to it for anything missing).
#[derive(Debug, Default)]
struct Recent {
    records: VecDeque<OpRecord>,
    bytes: usize,
}

fn weight(rec: &OpRecord) -> usize {
    rec.op.data_len() + RECORD_OVERHEAD
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Wakes the replay loop.
    pub fn wake_replay(&self) {
        *lock(&self.wake.0) = true;
        self.wake.1.notify_one();
    }

    /// Keeps appended records for replay: those continuing the run held, while it stays
    /// within [`REPLAY_MEMORY_BYTES`].
    fn keep_for_replay(&self, records: impl IntoIterator<Item = OpRecord>) {
        let mut recent = lock(&self.recent);
        for rec in records {
            let follows = recent.records.back().is_none_or(|b| b.seq + 1 == rec.seq);
            let w = weight(&rec);
            if !follows || recent.bytes + w > REPLAY_MEMORY_BYTES {
                return;
            }
            recent.bytes += w;
            recent.records.push_back(rec);
        }
    }

    /// Forgets the records kept for replay and makes replay drop what it fetched: the
    /// replica's seqs are about to stop following the log. Call with the replica locked.
    fn rebase(&self) {
        self.rebases.fetch_add(1, Ordering::AcqRel);
        let mut recent = lock(&self.recent);
        recent.records.clear();
        recent.bytes = 0;
    }

    /// The kept records from `applied + 1` on, through `durable`, at most `max`; empty when
    /// the next record is not in memory.
    fn take_recent(&self, applied: u64, durable: u64, max: usize) -> Vec<OpRecord> {
        let mut recent = lock(&self.recent);
        while let Some(front) = recent.records.front() {
            if front.seq > applied {
                break;
            }
            let w = weight(front);
            recent.bytes -= w;
            recent.records.pop_front();
        }
        let mut out = Vec::new();
        if recent.records.front().is_none_or(|f| f.seq != applied + 1) {
            return out;
        }
        while out.len() < max {
            match recent.records.front() {
                Some(f) if f.seq <= durable => {
                    let w = weight(f);
                    recent.bytes -= w;
                    out.extend(recent.records.pop_front());
                }
                _ => break,
            }
        }
        out
    }

    fn wait_for_work(&self, timeout: Duration) {
        let mut woken = lock(&self.wake.0);
        if !*woken {
            woken = self
                .wake
                .1
                .wait_timeout(woken, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *woken = false;
    }
}

/// Phase of the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for Hello.
    Greeting,
    /// Hello accepted, our generation differs: waiting for ResyncBegin.
    AwaitResync { generation: u64 },
    /// Appending records.
    Streaming,
    /// Between ResyncBegin and ResyncEnd.
    Resyncing { generation: u64, next_seq: u64 },
}

/// The bcplog of one fileset: the rules for each message from the pump.
#[derive(Debug)]
pub struct Bcplog {
    spec: BackupSpec,
    shared: Arc<Shared>,
    meta: StreamMeta,
    /// What the state file holds: a change of `meta` that leaves it as it is costs no write
    /// (each write is two fsyncs, and a role change made three per backup).
    stored: StreamMeta,
    phase: Phase,
    /// Seq to give the next resync op when it is applied (outside the stream's numbering).
    resync_seq: u64,
    /// Records received on the current connection.
    pub received: u64,
    /// The durable seq last acknowledged (or reported) on this connection.
    acked: u64,
}

/// What [`Bcplog::promote`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// The replica is complete (and durable) through this seq of the stream it followed.
    pub applied: u64,
    /// The generation of the stream the replica had followed to its end (0: none, or a resync
    /// was cut short: the replica may lack files).
    pub followed_generation: u64,
    /// Whether the log continued the replica (otherwise its records were not applied).
    pub log_consistent: bool,
}

/// Counters for `ftctl repl status` on a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSideStatus {
    /// Generation of the stream followed.
    pub generation: u64,
    /// Highest epoch seen.
    pub epoch: u64,
    /// Last seq in the log.
    pub received: u64,
    /// Durable in the log (acknowledged).
    pub durable: u64,
    /// Applied to the replica.
    pub applied: u64,
    /// Applied and durable in the replica.
    pub committed: u64,
    /// Operations refused (escapes, undecodable).
    pub refused: u64,
    /// Operations the replica's state did not allow.
    pub conflicts: u64,
    /// Bytes held by the log.
    pub log_bytes: u64,
}

impl Bcplog {
    /// Opens the log (recovering it), the replica and the stream state.
    pub fn open(spec: BackupSpec) -> Result<Bcplog, BackupError> {
        std::fs::create_dir_all(&spec.state_dir).map_err(|e| BackupError::Meta {
            path: spec.state_dir.clone(),
            why: e.to_string(),
        })?;
        let (log, recovery) = SegmentLog::open(&spec.state_dir.join("log"), spec.segment.clone())?;
        if !recovery.is_clean() {
            tracing::warn!(fileset = %spec.fileset, ?recovery, "bcplog: the log was repaired on open");
        }
        let replica = Replica::open(&spec.root, &spec.state_dir.join("replay"))?;
        let meta = StreamMeta::load(&spec.state_dir)?;
        Ok(Bcplog {
            spec,
            shared: Arc::new(Shared {
                log: Mutex::new(log),
                replica: Mutex::new(replica),
                wake: (Mutex::new(false), Condvar::new()),
                recent: Mutex::new(Recent::default()),
                rebases: AtomicU64::new(0),
            }),
            meta,
            stored: meta,
            phase: Phase::Greeting,
            resync_seq: 0,
            received: 0,
            acked: 0,
        })
    }

    /// The state replay shares.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// A new connection from the pump: start over with its greeting.
    pub fn connected(&mut self) {
        self.phase = Phase::Greeting;
        self.received = 0;
    }

    /// The highest ownership epoch this backup has accepted (durable).
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    /// Whether a pump greeting with (`fileset`, `epoch`) may stream to this backup: the same
    /// fileset, and an epoch no older than the highest one accepted so far. A newer epoch is
    /// accepted (and remembered when its `Hello` is handled).
    pub fn admits(&self, fileset: &str, epoch: u64) -> Result<(), BackupError> {
        if fileset != self.spec.fileset {
            return Err(BackupError::Refused(format!(
                "this stream is for fileset `{}`, not `{fileset}`",
                self.spec.fileset
            )));
        }
        if epoch < self.meta.epoch {
            return Err(BackupError::Refused(format!(
                "stale epoch {epoch}: this backup has seen epoch {}",
                self.meta.epoch
            )));
        }
        Ok(())
    }

    /// Before this node becomes the fileset's primary: applies everything the log holds
    /// durably to the replica and makes it durable (the replica is then complete up to the
    /// last received operation), trims the log, and forgets the followed stream (the files
    /// will change under a new primary, so any later stream must resync them). The epoch is
    /// kept. The caller must have stopped the stream (no connection is served any more).
    pub fn promote(&mut self) -> Result<Promotion, BackupError> {
        self.phase = Phase::Greeting;
        let followed = self.meta.generation;
        let (applied, log_consistent) = {
            let mut log = lock(&self.shared.log);
            log.sync()?;
            let mut replica = lock(&self.shared.replica);
            self.shared.rebase();
            let consistent = log_continues(&log, replica.applied_seq());
            let applied = if consistent {
                replay::drain(&mut log, &mut replica)?
            } else {
                // Records past a hole cannot be applied in order: what the replica holds is
                // all there is.
                tracing::warn!(fileset = %self.spec.fileset, "bcplog: the log does not continue the replica; promoting the replica as it is");
                replica.commit()?
            };
            log.trim_through(applied)?;
            (applied, consistent)
        };
        self.meta.generation = 0;
        self.store_meta()?;
        tracing::info!(fileset = %self.spec.fileset, applied, followed, "bcplog: replica drained for promotion");
        Ok(Promotion {
            applied,
            followed_generation: followed,
            log_consistent,
        })
    }

    /// Makes `meta` durable, unless the state file holds it already.
    fn store_meta(&mut self) -> Result<(), BackupError> {
        if self.meta != self.stored {
            self.meta.store(&self.spec.state_dir)?;
            self.stored = self.meta;
        }
        Ok(())
    }

    /// Counters.
    pub fn status(&self) -> BackupSideStatus {
        let log = lock(&self.shared.log);
        let replica = lock(&self.shared.replica);
        let stats = replica.stats();
        BackupSideStatus {
            generation: self.meta.generation,
            epoch: self.meta.epoch,
            received: log.last_seq(),
            durable: log.durable_seq(),
            applied: replica.applied_seq(),
            committed: replica.committed_seq(),
            refused: stats.refused,
            conflicts: stats.conflicts,
            log_bytes: log.bytes(),
        }
    }

    /// Handles one message; returns the replies. `Ops` are appended but not synced: call
    /// [`Bcplog::sync`] once the batch of queued messages is handled (group commit).
    pub fn handle(&mut self, msg: ToBackup) -> Result<Vec<ToPrimary>, BackupError> {
        match (self.phase, msg) {
            (
                Phase::Greeting,
                ToBackup::Hello {
                    fileset,
                    generation,
                    epoch,
                    mode,
                },
            ) => self.on_hello(fileset, generation, epoch, mode),
            (Phase::Streaming, ToBackup::Ops { records }) => {
                self.append(records)?;
                Ok(Vec::new())
            }
            (Phase::AwaitResync { generation }, ToBackup::ResyncBegin { next_seq }) => {
                self.resync_begin(generation, next_seq)
            }
            // A pump may resync a backup it is streaming to (a lost record on its side).
            (Phase::Streaming, ToBackup::ResyncBegin { next_seq }) => {
                self.resync_begin(self.meta.generation, next_seq)
            }
            (Phase::Resyncing { .. }, ToBackup::ResyncOps { ops }) => {
                self.resync_ops(ops)?;
                Ok(Vec::new())
            }
            (
                Phase::Resyncing {
                    generation,
                    next_seq,
                },
                ToBackup::ResyncEnd { next_seq: end },
            ) if end == next_seq => self.resync_end(generation, next_seq),
            (phase, msg) => Err(BackupError::Protocol(format!(
                "{} while {phase:?}",
                msg_kind(&msg)
            ))),
        }
    }

    fn on_hello(
        &mut self,
        fileset: String,
        generation: u64,
        epoch: u64,
        mode: Mode,
    ) -> Result<Vec<ToPrimary>, BackupError> {
        self.admits(&fileset, epoch)?;
        // The stream this replica follows, as the answer reports it (even when a resync is
        // already certain and stored below).
        let mut followed = self.meta.generation;
        if epoch > self.meta.epoch {
            self.meta.epoch = epoch;
            if generation != self.meta.generation {
                // A resync follows: the replica follows no stream from here on, stored with
                // the epoch at once (resync_begin then has nothing to write).
                self.meta.generation = 0;
            }
            self.store_meta()?;
        }
        // Whatever was appended before a crash or a dropped link is made durable now, so the
        // answer is exactly what the log holds.
        let (durable, consistent) = {
            let mut log = lock(&self.shared.log);
            log.sync()?;
            let applied = lock(&self.shared.replica).applied_seq();
            // The log must continue where the replica is: a hole between them (a crash in the
            // middle of a resync, a damaged log) can only be mended by a resync.
            let consistent = log_continues(&log, applied);
            (log.durable_seq(), consistent)
        };
        self.acked = durable;
        if !consistent {
            tracing::warn!(fileset = %self.spec.fileset, "bcplog: log and replica disagree; asking for a resync");
            self.meta.generation = 0;
            followed = 0;
        }
        tracing::info!(
            fileset = %self.spec.fileset, generation, epoch, ?mode, durable,
            ours = self.meta.generation, "bcplog: pump greeted"
        );
        self.phase = if generation == self.meta.generation && generation != 0 {
            Phase::Streaming
        } else {
            Phase::AwaitResync { generation }
        };
        Ok(vec![ToPrimary::State {
            generation: followed,
            durable,
        }])
    }

    fn append(&mut self, records: Vec<OpRecord>) -> Result<(), BackupError> {
        let mut appended = Vec::with_capacity(records.len());
        let result = {
            let mut log = lock(&self.shared.log);
            records.into_iter().try_for_each(|rec| {
                let last = log.last_seq();
                if rec.seq <= last {
                    return Ok(()); // a resumed stream may repeat what we already hold
                }
                if rec.seq != last + 1 {
                    return Err(BackupError::Protocol(format!(
                        "record {} after {last}: records in between are missing",
                        rec.seq
                    )));
                }
                log.append_with(rec.seq, |buf| replay::encode_record_into(&rec, buf))?;
                self.received += 1;
                appended.push(rec);
                Ok(())
            })
        };
        self.shared.keep_for_replay(appended);
        result
    }

    /// Makes what was appended durable; returns the ack to send when it moved.
    pub fn sync(&mut self) -> Result<Option<ToPrimary>, BackupError> {
        if self.phase != Phase::Streaming {
            return Ok(None);
        }
        let mut log = lock(&self.shared.log);
        let before = log.durable_seq();
        let durable = log.sync()?;
        drop(log);
        if durable > before {
            self.shared.wake_replay();
        }
        if durable > self.acked {
            self.acked = durable;
            return Ok(Some(ToPrimary::Ack { durable }));
        }
        Ok(None)
    }

    fn resync_begin(
        &mut self,
        generation: u64,
        next_seq: u64,
    ) -> Result<Vec<ToPrimary>, BackupError> {
        tracing::info!(fileset = %self.spec.fileset, generation, next_seq, "bcplog: resync begins");
        // Until the resync ends, this replica follows no stream: a crash in the middle makes
        // the next greeting ask for a resync again.
        self.meta.generation = 0;
        self.store_meta()?;
        let entries = {
            // Bring the replica up to everything it received, so the manifest shows the most
            // recent state and the primary sends only what is really missing.
            let mut log = lock(&self.shared.log);
            let mut replica = lock(&self.shared.replica);
            self.shared.rebase();
            // A log that does not continue the replica (a crash between the log's reset and
            // the replica's rebase at the end of an earlier resync) holds nothing usable: the
            // resync replaces it.
            if log_continues(&log, replica.applied_seq()) {
                replay::drain(&mut log, &mut replica)?;
            }
            self.resync_seq = replica.applied_seq();
            drop(replica);
            let scanned = manifest::scan(&self.spec.root)?;
            for p in &scanned.problems {
                tracing::warn!(fileset = %self.spec.fileset, path = %p.path, error = %p.error, "bcplog: replica entry unreadable during resync");
            }
            scanned.entries.into_iter().collect::<Vec<_>>()
        };
        self.phase = Phase::Resyncing {
            generation,
            next_seq,
        };
        let chunks = entries.len().div_ceil(MANIFEST_CHUNK).max(1);
        let mut entries = entries.into_iter();
        Ok((0..chunks)
            .map(|i| ToPrimary::Manifest {
                entries: entries.by_ref().take(MANIFEST_CHUNK).collect(),
                last: i + 1 == chunks,
            })
            .collect())
    }

    fn resync_ops(&mut self, ops: Vec<Op>) -> Result<(), BackupError> {
        let mut replica = lock(&self.shared.replica);
        for op in ops {
            self.resync_seq = replica.applied_seq() + 1;
            let rec = OpRecord {
                seq: self.resync_seq,
                op,
            };
            match replica.apply(&rec) {
                Ok(_) => {}
                Err(e) if e.consumed() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn resync_end(
        &mut self,
        generation: u64,
        next_seq: u64,
    ) -> Result<Vec<ToPrimary>, BackupError> {
        if next_seq == 0 {
            return Err(BackupError::Protocol("resync to seq 0".into()));
        }
        {
            // A crash anywhere in here leaves generation 0 behind: the next greeting resyncs.
            let mut log = lock(&self.shared.log);
            let mut replica = lock(&self.shared.replica);
            self.shared.rebase();
            log.reset(next_seq)?;
            replica.rebase(next_seq - 1)?;
        }
        self.meta.generation = generation;
        self.store_meta()?;
        self.phase = Phase::Streaming;
        self.acked = next_seq - 1;
        tracing::info!(fileset = %self.spec.fileset, generation, next_seq, "bcplog: resync done");
        Ok(vec![ToPrimary::Ack {
            durable: next_seq - 1,
        }])
    }
}

/// Whether the log continues where the replica is (no hole between the replica's applied seq
/// and the log's first record).
fn log_continues(log: &SegmentLog, applied: u64) -> bool {
    match log.first_seq() {
        Some(first) => first <= applied + 1,
        None => log.last_seq() <= applied,
    }
}

fn msg_kind(msg: &ToBackup) -> &'static str {
    match msg {
        ToBackup::Hello { .. } => "Hello",
        ToBackup::Ops { .. } => "Ops",
        ToBackup::ResyncBegin { .. } => "ResyncBegin",
        ToBackup::ResyncOps { .. } => "ResyncOps",
        ToBackup::ResyncEnd { .. } => "ResyncEnd",
    }
}

/// One pass of replay: applies what the log holds durably past the replica's applied seq (at
/// most [`REPLAY_BATCH`] records), commits when due or when caught up, and trims the log
/// through the committed seq. Returns whether it applied anything.
pub fn replay_step(shared: &Shared, last_commit: &mut Instant) -> Result<bool, BackupError> {
    let rebases = shared.rebases.load(Ordering::Acquire);
    let applied = lock(&shared.replica).applied_seq();
    let durable = lock(&shared.log).durable_seq();
    // Records the bcplog kept in memory, else the log (after a restart, or when replay fell
    // further behind than the memory holds).
    let kept = shared.take_recent(applied, durable, REPLAY_BATCH);
    let batch: Vec<(u64, Vec<u8>)> = if !kept.is_empty() {
        Vec::new()
    } else {
        let mut log = lock(&shared.log);
        let durable = log.durable_seq();
        if durable <= applied || log.first_seq().is_none_or(|f| f > applied + 1) {
            Vec::new()
        } else {
            log.read_from(applied + 1)?
                .take_while(|r| r.as_ref().map_or(true, |(seq, _)| *seq <= durable))
                .take(REPLAY_BATCH)
                .collect::<Result<_, _>>()?
        }
    };
    let fetched = kept.len() + batch.len();
    let worked = fetched > 0;
    let caught_up = fetched < REPLAY_BATCH;
    let mut replica = lock(&shared.replica);
    if shared.rebases.load(Ordering::Acquire) != rebases {
        // A resync or promotion renumbered the replica meanwhile: what was fetched is stale.
        return Ok(worked);
    }
    // An error that leaves a record unapplied stops the batch: nothing after it may go first.
    let go_on = |outcome: Result<_, ReplayError>| match outcome {
        Ok(_) => Ok(()),
        Err(e) if e.consumed() => Ok(()),
        Err(e) => Err(e),
    };
    for rec in &kept {
        go_on(replica.apply(rec))?;
    }
    for (seq, payload) in &batch {
        go_on(replica.apply_encoded(*seq, payload))?;
    }
    let due = last_commit.elapsed() >= REPLAY_COMMIT_EVERY;
    if replica.applied_seq() > replica.committed_seq() && (caught_up || due) {
        let committed = replica.commit()?;
        *last_commit = Instant::now();
        drop(replica);
        lock(&shared.log).trim_through(committed)?;
    }
    Ok(worked)
}

/// The replay loop: runs until `stop` is set.
pub fn replay_loop(
    shared: Arc<Shared>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), BackupError> {
    let mut last_commit = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if !replay_step(&shared, &mut last_commit)? {
            shared.wait_for_work(REPLAY_IDLE_CHECK);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
