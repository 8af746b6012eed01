//! The primary side of a fileset at run time: the pump actor (ractor) around the [`Pump`]
//! state machine, the source thread that reads the operation ring (or copy mode), one link
//! task per backup (dial with backoff, read, write), and resync tasks.
//!
//! The actor only feeds inputs and performs actions; blocking work (the ring, scanning and
//! reading files for a resync) runs on threads or `spawn_blocking`, never on the event loop.
//! Ordering on a link: a resync's messages and the records after it go through one writer
//! task that drains the resync queue first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cluster::net::{self, Backoff, NetConfig};
use ft::replog::ring::{ConsumerOptions, Ring, RingError, RingItem};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::copy::{CopyConfig, CopyOutput, CopySource, Exclude};
use crate::manifest::{self, Entry};
use crate::proto::{self, OpsRef, ToBackup, ToPrimary};
use crate::pump::{Action, BackupView, Input, LinkState, Pump, PumpConfig};
use crate::{Op, OpRecord, RelPath};

/// Most records the source hands the pump at once.
const SOURCE_BATCH: usize = 1024;
/// Most bytes of data the source hands the pump at once.
const SOURCE_BATCH_BYTES: usize = 4 << 20;
/// How long the source thread waits for the ring when nothing is pending.
const SOURCE_IDLE_WAIT: Duration = Duration::from_millis(20);
/// How long it waits while a release is pending in sync mode (writers are blocked on it).
const SOURCE_SYNC_WAIT: Duration = Duration::from_millis(1);
/// Bytes of resync operations per message.
const RESYNC_BATCH_BYTES: usize = 4 << 20;
/// Resync messages queued for a link's writer before the resync task waits.
const RESYNC_QUEUE: usize = 4;
/// Pause before redialing a backup after a link ended.
const REDIAL_PAUSE: Duration = Duration::from_millis(100);
/// First pause before redialing a backup that refused the stream (a stale epoch, most likely:
/// this pump's owner was cut off and replaced; it keeps trying, quietly more seldom, until it
/// is stopped).
const REFUSED_PAUSE_INITIAL: Duration = Duration::from_millis(500);
/// Longest pause between redials of a backup that keeps refusing.
const REFUSED_PAUSE_MAX: Duration = Duration::from_secs(10);
/// How often [`flush`] looks at the pump.
const FLUSH_POLL: Duration = Duration::from_millis(5);
/// Suffix of the file beside a ring that names the ownership epoch the ring was created for.
const RING_EPOCH_SUFFIX: &str = ".epoch";

/// A backup node and its addresses (one per network).
#[derive(Debug, Clone)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// Addresses, tried in order.
    pub addrs: Vec<SocketAddr>,
}

/// Where the pump's operations come from.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// The operation ring written by libft and the shim.
    Ring { path: PathBuf, capacity: u64 },
    /// Copy mode: the directory is watched; `exclude`d paths are not replicated (nor listed
    /// or removed by a resync).
    Copy { quiet: Duration, exclude: Exclude },
}

/// Everything the pump of one fileset needs.
#[derive(Debug, Clone)]
pub struct PrimarySpec {
    /// Fileset name.
    pub fileset: String,
    /// The live directory.
    pub root: PathBuf,
    /// Where operations come from.
    pub source: SourceSpec,
    /// The backups.
    pub backups: Vec<Peer>,
    /// Ownership epoch (fencing token).
    pub epoch: u64,
    /// Pump limits and mode.
    pub pump: PumpConfig,
    /// The transport.
    pub net: NetConfig,
}

/// What the source tells the pump.
#[derive(Debug)]
pub enum SourceEvent {
    /// Records in order.
    Records(Vec<OpRecord>),
    /// A record was lost: resync.
    Lost { seq: u64 },
    /// How full the ring is.
    Usage { used: u64, capacity: u64 },
    /// The source stopped working.
    Failed(String),
}

/// What a link's writer sends (internal to the pump; public because it travels in [`PumpMsg`]).
#[derive(Debug)]
pub enum Outbound {
    /// A control or resync message.
    Msg(ToBackup),
    /// Records shared with other links.
    Ops(Vec<Arc<OpRecord>>),
}

/// Messages of the pump actor.
#[derive(Debug)]
pub enum PumpMsg {
    /// From the source thread.
    Source(SourceEvent),
    /// A link to `backup` is up.
    Linked {
        backup: String,
        link: u64,
        tx: mpsc::UnboundedSender<Outbound>,
        resync_tx: mpsc::Sender<Outbound>,
    },
    /// The link is gone.
    Unlinked { backup: String, link: u64 },
    /// A message from a backup.
    FromBackup {
        backup: String,
        link: u64,
        msg: ToPrimary,
    },
    /// A resync task ended.
    ResyncFinished {
        backup: String,
        link: u64,
        next_seq: u64,
        result: Result<(), String>,
    },
    /// Report the state.
    Status(RpcReplyPort<PrimaryStatus>),
    /// While set, the ring source looks at the ring with its short wait ([`flush`] counts
    /// its empty reads: at the idle wait, a hand-over waited most of that for nothing).
    Hurry(bool),
}

/// The pump's state for `ftctl repl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// The stream's generation.
    pub generation: u64,
    /// Next seq to be read.
    pub next_seq: u64,
    /// Ring released through this seq.
    pub released: u64,
    /// Records kept in memory.
    pub retained_ops: u64,
    /// Their bytes.
    pub retained_bytes: u64,
    /// One entry per backup.
    pub backups: Vec<BackupLinkStatus>,
    /// Why the source stopped, if it did.
    pub source_error: Option<String>,
    /// The ownership epoch this pump streams with.
    #[serde(default)]
    pub epoch: u64,
    /// Times the source found nothing more to read (ring mode): once this grew past a value
    /// seen after a write, that write has been handed to the pump.
    #[serde(default)]
    pub idle_reads: u64,
}

/// One backup as the pump sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupLinkStatus {
    /// Node name.
    pub name: String,
    /// Connected (handshake done).
    pub connected: bool,
    /// greeting, resyncing, streaming or down.
    pub state: String,
    /// Last seq acknowledged durable.
    pub acked: u64,
    /// Operations not acknowledged yet.
    pub lag_ops: u64,
    /// Their bytes (as far as retained in memory).
    pub lag_bytes: u64,
    /// Age of the oldest unacknowledged operation, ms.
    pub lag_ms: u64,
    /// Resyncs so far.
    pub resyncs: u64,
    /// Why the backup refused this pump the last time it did (a stale epoch: this pump's
    /// ownership was taken over), until it accepts the stream again.
    #[serde(default)]
    pub refused: Option<String>,
    /// The newest ownership epoch the refusing backup knows of: above this pump's epoch, this
    /// pump is fenced (its owner was replaced).
    #[serde(default)]
    pub refused_epoch: u64,
}

impl From<BackupView> for BackupLinkStatus {
    fn from(v: BackupView) -> Self {
        BackupLinkStatus {
            name: v.name,
            connected: v.connected,
            state: match v.link {
                LinkState::Down => "down",
                LinkState::Greeting => "greeting",
                LinkState::Resyncing { .. } => "resyncing",
                LinkState::Streaming { .. } => "streaming",
            }
            .into(),
            acked: v.acked,
            lag_ops: v.lag_ops,
            lag_bytes: v.lag_bytes,
            lag_ms: u64::try_from(v.lag_time.as_millis()).unwrap_or(u64::MAX),
            resyncs: v.resyncs,
            refused: None,
            refused_epoch: 0,
        }
    }
}

/// The pump actor.
#[derive(Debug)]
pub struct PumpActor;

/// Part of a backup's manifest on its way to a resync task: entries, and whether it is the last.
type ManifestPart = (Vec<(RelPath, Entry)>, bool);

#[derive(Debug)]
struct LinkHandles {
    link: u64,
    tx: mpsc::UnboundedSender<Outbound>,
    resync_tx: mpsc::Sender<Outbound>,
    /// Manifest parts for a running resync.
    manifest_tx: Option<mpsc::UnboundedSender<ManifestPart>>,
}

/// The pump actor's state.
#[derive(Debug)]
pub struct PumpState {
    spec: PrimarySpec,
    pump: Pump,
    links: BTreeMap<String, LinkHandles>,
    release: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    source_thread: Option<std::thread::JoinHandle<()>>,
    /// Copy mode's watcher (dropping it stops it).
    copy_source: Option<CopySource>,
    source_error: Option<String>,
    generation: u64,
    /// The last refusal of each backup (why, and the newest epoch it knows), until it
    /// accepts the stream again.
    refusals: BTreeMap<String, (String, u64)>,
    /// Empty reads of the ring source (see [`PrimaryStatus::idle_reads`]).
    idle_reads: Arc<AtomicU64>,
    /// See [`PumpMsg::Hurry`].
    hurry: Arc<AtomicBool>,
}

impl Actor for PumpActor {
    type Msg = PumpMsg;
    type State = PumpState;
    type Arguments = PrimarySpec;

    async fn pre_start(
        &self,
        myself: ActorRef<PumpMsg>,
        spec: PrimarySpec,
    ) -> Result<PumpState, ActorProcessingErr> {
        std::fs::create_dir_all(&spec.root)?;
        let release = Arc::new(AtomicU64::new(0));
        let idle_reads = Arc::new(AtomicU64::new(0));
        let hurry = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (mut copy_task, mut copy_source) = (None, None);
        let (generation, head_seq, source_thread) = match &spec.source {
            SourceSpec::Ring { path, capacity } => {
                let sync = spec.pump.mode == proto::Mode::Sync;
                let ring = open_or_create_ring(path, *capacity, sync, spec.epoch)?;
                let generation = ring.generation();
                let consumer = ring.consumer(ConsumerOptions::default())?;
                let head_seq = consumer.head_seq();
                release.store(head_seq - 1, Ordering::Relaxed);
                let me = myself.clone();
                let (rel, st, idle, hurry) = (
                    release.clone(),
                    stop.clone(),
                    idle_reads.clone(),
                    hurry.clone(),
                );
                let thread = std::thread::Builder::new()
                    .name(format!("ring-{}", spec.fileset))
                    .spawn(move || ring_source(consumer, me, rel, st, idle, hurry, sync))?;
                (generation, head_seq, Some(thread))
            }
            SourceSpec::Copy { quiet, exclude } => {
                // Sequence numbers start over with every start: a fresh generation makes the
                // backups compare their trees (a resync) before records flow.
                let cfg = CopyConfig {
                    exclude: exclude.clone(),
                    ..CopyConfig::new(*quiet, SOURCE_BATCH_BYTES)
                };
                let root = spec.root.clone();
                let (source, mut rx) =
                    tokio::task::spawn_blocking(move || CopySource::start_with(&root, cfg))
                        .await??;
                let me = myself.clone();
                copy_task = Some(tokio::spawn(async move {
                    while let Some(out) = rx.recv().await {
                        let event = match out {
                            CopyOutput::Records(r) => SourceEvent::Records(r),
                            CopyOutput::Rescan { next_seq } => SourceEvent::Lost {
                                seq: next_seq.saturating_sub(1),
                            },
                        };
                        if me.cast(PumpMsg::Source(event)).is_err() {
                            return;
                        }
                    }
                    let _ = me.cast(PumpMsg::Source(SourceEvent::Failed(
                        "copy mode stopped watching".into(),
                    )));
                }));
                copy_source = Some(source);
                (rand::random::<u64>() | 1, 1, None)
            }
        };
        let pump = Pump::new(
            spec.pump.clone(),
            spec.fileset.clone(),
            generation,
            spec.epoch,
            head_seq,
            spec.backups.iter().map(|b| b.name.clone()),
        );
        let mut tasks: Vec<_> = copy_task.into_iter().collect();
        for peer in &spec.backups {
            tasks.push(tokio::spawn(link_task(
                myself.clone(),
                spec.net.clone(),
                spec.fileset.clone(),
                peer.clone(),
            )));
        }
        tracing::info!(fileset = %spec.fileset, generation, epoch = spec.epoch, head_seq, "pump started");
        Ok(PumpState {
            spec,
            pump,
            links: BTreeMap::new(),
            release,
            stop,
            tasks,
            source_thread,
            copy_source,
            source_error: None,
            generation,
            refusals: BTreeMap::new(),
            idle_reads,
            hurry,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<PumpMsg>,
        st: &mut PumpState,
    ) -> Result<(), ActorProcessingErr> {
        st.stop.store(true, Ordering::Relaxed);
        for t in &st.tasks {
            t.abort();
        }
        if let Some(t) = st.source_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(c) = st.copy_source.take() {
            let _ = tokio::task::spawn_blocking(move || drop(c)).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<PumpMsg>,
        msg: PumpMsg,
        st: &mut PumpState,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        let input = match msg {
            PumpMsg::Source(SourceEvent::Records(r)) => Input::Records(r),
            PumpMsg::Source(SourceEvent::Lost { seq }) => Input::Abandoned { seq },
            PumpMsg::Source(SourceEvent::Usage { used, capacity }) => {
                Input::RingUsage { used, capacity }
            }
            PumpMsg::Source(SourceEvent::Failed(why)) => {
                tracing::error!(fileset = %st.spec.fileset, %why, "pump: the source failed");
                st.source_error = Some(why.clone());
                return Err(why.into());
            }
            PumpMsg::Linked {
                backup,
                link,
                tx,
                resync_tx,
            } => {
                st.links.insert(
                    backup.clone(),
                    LinkHandles {
                        link,
                        tx,
                        resync_tx,
                        manifest_tx: None,
                    },
                );
                Input::Connected { backup }
            }
            PumpMsg::Unlinked { backup, link } => {
                if st.links.get(&backup).is_none_or(|l| l.link != link) {
                    return Ok(());
                }
                st.links.remove(&backup);
                Input::Disconnected { backup }
            }
            PumpMsg::FromBackup { backup, link, msg } => {
                let Some(l) = st.links.get_mut(&backup).filter(|l| l.link == link) else {
                    return Ok(());
                };
                match msg {
                    ToPrimary::State {
                        generation,
                        durable,
                    } => {
                        st.refusals.remove(&backup);
                        Input::State {
                            backup,
                            generation,
                            durable,
                        }
                    }
                    ToPrimary::Ack { durable } => Input::Ack { backup, durable },
                    ToPrimary::Manifest { entries, last } => {
                        if let Some(tx) = &l.manifest_tx {
                            let _ = tx.send((entries, last));
                        }
                        return Ok(());
                    }
                    ToPrimary::Refused { reason, epoch } => {
                        tracing::warn!(fileset = %st.spec.fileset, %backup, epoch = st.spec.epoch, newest = epoch, %reason, "pump: the backup refused the stream");
                        st.refusals.insert(backup.clone(), (reason, epoch));
                        st.links.remove(&backup);
                        Input::Disconnected { backup }
                    }
                }
            }
            PumpMsg::ResyncFinished {
                backup,
                link,
                next_seq,
                result,
            } => {
                let Some(l) = st.links.get_mut(&backup).filter(|l| l.link == link) else {
                    return Ok(());
                };
                l.manifest_tx = None;
                match result {
                    Ok(()) => Input::ResyncDone { backup, next_seq },
                    Err(why) => {
                        tracing::warn!(fileset = %st.spec.fileset, %backup, %why, "pump: resync failed; reconnecting");
                        st.links.remove(&backup);
                        Input::Disconnected { backup }
                    }
                }
            }
            PumpMsg::Hurry(on) => {
                st.hurry.store(on, Ordering::Release);
                return Ok(());
            }
            PumpMsg::Status(reply) => {
                let (ops, bytes) = st.pump.retained();
                let _ = reply.send(PrimaryStatus {
                    generation: st.generation,
                    next_seq: st.pump.next_seq(),
                    released: st.pump.released(),
                    retained_ops: ops as u64,
                    retained_bytes: bytes as u64,
                    backups: st
                        .pump
                        .view(now)
                        .into_iter()
                        .map(|v| {
                            let refusal = st.refusals.get(&v.name).cloned();
                            BackupLinkStatus {
                                refused_epoch: refusal.as_ref().map_or(0, |r| r.1),
                                refused: refusal.map(|r| r.0),
                                ..v.into()
                            }
                        })
                        .collect(),
                    source_error: st.source_error.clone(),
                    epoch: st.spec.epoch,
                    idle_reads: st.idle_reads.load(Ordering::Acquire),
                });
                return Ok(());
            }
        };
        let actions = st.pump.step(now, input);
        for a in actions {
            perform(&myself, st, a);
        }
        Ok(())
    }
}

fn perform(myself: &ActorRef<PumpMsg>, st: &mut PumpState, action: Action) {
    match action {
        Action::Send { backup, msg } => {
            if let Some(l) = st.links.get(&backup) {
                let _ = l.tx.send(Outbound::Msg(msg));
            }
        }
        Action::SendOps { backup, records } => {
            if let Some(l) = st.links.get(&backup) {
                let _ = l.tx.send(Outbound::Ops(records));
            }
        }
        Action::Release { through } => {
            st.release.fetch_max(through, Ordering::Release);
        }
        Action::StartResync { backup, next_seq } => {
            let Some(l) = st.links.get_mut(&backup) else {
                return;
            };
            let (mtx, mrx) = mpsc::unbounded_channel();
            l.manifest_tx = Some(mtx);
            let (me, link, resync_tx, root) = (
                myself.clone(),
                l.link,
                l.resync_tx.clone(),
                st.spec.root.clone(),
            );
            let exclude = match &st.spec.source {
                SourceSpec::Copy { exclude, .. } => exclude.clone(),
                SourceSpec::Ring { .. } => Exclude::default(),
            };
            tracing::info!(fileset = %st.spec.fileset, %backup, next_seq, "pump: resyncing a backup");
            tokio::spawn(async move {
                let result = resync(root, &exclude, next_seq, resync_tx, mrx)
                    .await
                    .map_err(|e| e.to_string());
                let _ = me.cast(PumpMsg::ResyncFinished {
                    backup,
                    link,
                    next_seq,
                    result,
                });
            });
        }
        Action::Close { backup, reason } => {
            tracing::warn!(fileset = %st.spec.fileset, %backup, %reason, "pump: closing the link");
            // Dropping the senders ends the writer, which shuts the connection down.
            if st.links.remove(&backup).is_some() {
                let now = Instant::now();
                for a in st.pump.step(now, Input::Disconnected { backup }) {
                    perform(myself, st, a);
                }
            }
        }
    }
}

/// Creates the ring, or opens it when a compatible one exists that was created for the same
/// ownership `epoch` (records written while watchd was down are still there). A ring of another
/// epoch is replaced: a new owner starts a new generation, so every backup compares its files
/// with this node's (a resync) instead of resuming a stream that another primary continued.
fn open_or_create_ring(
    path: &std::path::Path,
    capacity: u64,
    sync: bool,
    epoch: u64,
) -> Result<Ring, RingError> {
    let epoch_file = ring_epoch_path(path);
    let ring_epoch = std::fs::read_to_string(&epoch_file)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let ring = match Ring::open(path) {
        Ok(ring)
            if ring.capacity() == capacity && !ring.is_retired() && ring_epoch == Some(epoch) =>
        {
            ring.set_sync(sync);
            return Ok(ring);
        }
        Ok(old) => {
            // Another size or another owner: producers must move to a new ring; its
            // generation makes the backups resync.
            old.retire();
            let _ = std::fs::remove_file(path);
            Ring::create(path, capacity, sync)?
        }
        Err(e) => {
            if path.exists() {
                tracing::warn!(path = %path.display(), error = %e, "ring unusable; replacing it");
                let _ = std::fs::remove_file(path);
            }
            Ring::create(path, capacity, sync)?
        }
    };
    write_ring_epoch(&epoch_file, epoch).map_err(|source| RingError::Io {
        what: "write the epoch file of",
        path: path.to_owned(),
        source,
    })?;
    Ok(ring)
}

/// The file beside `ring` that names the epoch it was created for.
pub fn ring_epoch_path(ring: &std::path::Path) -> PathBuf {
    let mut name = ring.as_os_str().to_owned();
    name.push(RING_EPOCH_SUFFIX);
    PathBuf::from(name)
}

/// Written with a rename, so a reader sees the old epoch or the new one.
fn write_ring_epoch(file: &std::path::Path, epoch: u64) -> std::io::Result<()> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{epoch}\n"))?;
    std::fs::rename(&tmp, file)
}

/// Retires the ring at `path` (producers stop logging into it and look for a new one, which
/// does not exist until a pump creates it) and removes it with its epoch file: for a node that
/// stops being the fileset's primary.
pub fn retire_ring(path: &std::path::Path) {
    if let Ok(ring) = Ring::open(path) {
        ring.retire();
    }
    for p in [path.to_owned(), ring_epoch_path(path)] {
        if let Err(e) = std::fs::remove_file(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove a retired ring");
        }
    }
}

/// The source thread: reads the ring in order and hands batches to the pump; performs the
/// releases the pump asks for.
fn ring_source(
    mut consumer: ft::replog::ring::Consumer,
    pump: ActorRef<PumpMsg>,
    release: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    idle_reads: Arc<AtomicU64>,
    hurry: Arc<AtomicBool>,
    sync: bool,
) {
    let capacity = consumer.ring().capacity();
    let mut released = consumer.head_seq() - 1;
    let mut last_usage = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let target = release.load(Ordering::Acquire);
        if target > released {
            if let Err(e) = consumer.release_through(target) {
                let _ = pump.cast(PumpMsg::Source(SourceEvent::Failed(format!(
                    "releasing the ring through {target}: {e}"
                ))));
                return;
            }
            released = target;
        }
        let pending = consumer.delivered_seq() > released;
        let wait =
            if (sync && pending) || consumer.producers_waiting() || hurry.load(Ordering::Acquire) {
                SOURCE_SYNC_WAIT
            } else {
                SOURCE_IDLE_WAIT
            };
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut timeout = wait;
        let mut lost = None;
        let mut idle = false;
        while batch.len() < SOURCE_BATCH && bytes < SOURCE_BATCH_BYTES {
            match consumer.next(timeout) {
                Ok(Some(RingItem::Op { seq, op })) => {
                    bytes += op.data_len();
                    batch.push(OpRecord { seq, op });
                    timeout = Duration::ZERO;
                }
                Ok(Some(item)) => {
                    tracing::warn!(
                        ?item,
                        "ring: a record was lost; the backups will be resynced"
                    );
                    lost = Some(item.seq());
                    break;
                }
                Ok(None) => {
                    idle = true;
                    break;
                }
                Err(e) => {
                    // A ring that cannot be read on (corrupt, or a reservation that never
                    // completes) is retired: producers move to a new one, whose generation
                    // makes the backups resync, when the actor restarts.
                    if matches!(e, RingError::Corrupt { .. } | RingError::Stuck { .. }) {
                        consumer.ring().retire();
                    }
                    let _ = pump.cast(PumpMsg::Source(SourceEvent::Failed(format!(
                        "reading the ring: {e}"
                    ))));
                    return;
                }
            }
        }
        if !batch.is_empty()
            && pump
                .cast(PumpMsg::Source(SourceEvent::Records(batch)))
                .is_err()
        {
            return;
        }
        if let Some(seq) = lost
            && pump
                .cast(PumpMsg::Source(SourceEvent::Lost { seq }))
                .is_err()
        {
            return;
        }
        if idle {
            // Counted after the batch was handed over: see `flush`.
            idle_reads.fetch_add(1, Ordering::Release);
        }
        if last_usage.elapsed() >= SOURCE_IDLE_WAIT {
            last_usage = Instant::now();
            let used = consumer.used_bytes();
            let _ = pump.cast(PumpMsg::Source(SourceEvent::Usage { used, capacity }));
        }
    }
}

/// One backup's link: dial, hand the pump a writer, read until the connection ends, redial.
async fn link_task(pump: ActorRef<PumpMsg>, net: NetConfig, fileset: String, peer: Peer) {
    let channel = proto::channel(&fileset);
    let mut backoff = Backoff::default();
    let mut refused_backoff = Backoff::new(
        REFUSED_PAUSE_INITIAL,
        REFUSED_PAUSE_MAX,
        net::DEFAULT_BACKOFF_FACTOR,
        net::DEFAULT_BACKOFF_JITTER,
    );
    let mut link = 0u64;
    loop {
        let conn = net::connect_retry(&net, &peer.addrs, &channel, &mut backoff).await;
        if conn.peer_node() != peer.name {
            tracing::warn!(%fileset, expected = %peer.name, got = %conn.peer_node(), "pump: the backup's address answers as another node");
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        }
        backoff.reset();
        link += 1;
        let mut refused = false;
        let (mut sender, mut receiver) = conn.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
        let (resync_tx, mut resync_rx) = mpsc::channel::<Outbound>(RESYNC_QUEUE);
        let mut writer = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    m = resync_rx.recv() => m,
                    m = rx.recv() => m,
                };
                let Some(out) = next else { break };
                let sent = match &out {
                    Outbound::Msg(m) => sender.feed(m).await,
                    Outbound::Ops(records) => sender.feed(&OpsRef::Ops { records }).await,
                };
                if sent.is_err() {
                    break;
                }
                if rx.is_empty() && resync_rx.is_empty() && sender.flush().await.is_err() {
                    break;
                }
            }
            let _ = sender.close().await;
        });
        if pump
            .cast(PumpMsg::Linked {
                backup: peer.name.clone(),
                link,
                tx,
                resync_tx,
            })
            .is_err()
        {
            writer.abort();
            return;
        }
        tracing::info!(%fileset, backup = %peer.name, "pump: linked");
        loop {
            tokio::select! {
                r = receiver.recv::<ToPrimary>() => match r {
                    Ok(msg) => {
                        refused |= matches!(msg, ToPrimary::Refused { .. });
                        if pump.cast(PumpMsg::FromBackup { backup: peer.name.clone(), link, msg }).is_err() {
                            writer.abort();
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::info!(%fileset, backup = %peer.name, error = %e, "pump: link ended");
                        break;
                    }
                },
                // The writer ended (the pump closed the link, or a send failed).
                _ = &mut writer => break,
            }
        }
        writer.abort();
        let _ = pump.cast(PumpMsg::Unlinked {
            backup: peer.name.clone(),
            link,
        });
        if refused {
            tokio::time::sleep(refused_backoff.next_delay()).await;
        } else {
            refused_backoff.reset();
            tokio::time::sleep(REDIAL_PAUSE).await;
        }
    }
}

/// Runs one resync over a link: asks for the backup's manifest, compares it with the primary
/// tree, and sends the differences as operations. Excluded paths are left out on both sides:
/// never sent, and a replica's own are left alone.
async fn resync(
    root: PathBuf,
    exclude: &Exclude,
    next_seq: u64,
    tx: mpsc::Sender<Outbound>,
    mut manifests: mpsc::UnboundedReceiver<ManifestPart>,
) -> Result<(), String> {
    let closed = || "the link closed".to_string();
    tx.send(Outbound::Msg(ToBackup::ResyncBegin { next_seq }))
        .await
        .map_err(|_| closed())?;
    let mut replica = manifest::Manifest::default();
    loop {
        let (entries, last) = manifests.recv().await.ok_or_else(closed)?;
        replica.entries.extend(
            entries
                .into_iter()
                .filter(|(p, _)| !exclude.excludes(p.as_bytes())),
        );
        if last {
            break;
        }
    }
    let (otx, mut orx) = mpsc::channel::<Result<Vec<Op>, String>>(2);
    let scan_root = root.clone();
    let exclude = exclude.clone();
    tokio::task::spawn_blocking(move || {
        let primary = match manifest::scan_skipping(&scan_root, |name| exclude.excludes_name(name))
        {
            Ok(m) => m,
            Err(e) => {
                let _ = otx.blocking_send(Err(e.to_string()));
                return;
            }
        };
        let diff = manifest::diff(&primary, &replica);
        let ops = match manifest::ResyncOps::new(&scan_root, &diff) {
            Ok(o) => o,
            Err(e) => {
                let _ = otx.blocking_send(Err(e.to_string()));
                return;
            }
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        for item in ops {
            match item {
                Ok(op) => {
                    bytes += op.data_len() + 64;
                    batch.push(op);
                }
                // A file that vanished or cannot be read now: its later operations (or the
                // next resync) bring it; the rest goes on.
                Err(e) => tracing::warn!(error = %e, "resync: entry skipped"),
            }
            if bytes >= RESYNC_BATCH_BYTES {
                bytes = 0;
                if otx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                    return;
                }
            }
        }
        if !batch.is_empty() {
            let _ = otx.blocking_send(Ok(batch));
        }
    });
    while let Some(batch) = orx.recv().await {
        let ops = batch?;
        tx.send(Outbound::Msg(ToBackup::ResyncOps { ops }))
            .await
            .map_err(|_| closed())?;
    }
    tx.send(Outbound::Msg(ToBackup::ResyncEnd { next_seq }))
        .await
        .map_err(|_| closed())?;
    Ok(())
}

/// Why [`flush`] did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The pump did not answer.
    #[error("the pump does not answer: {0}")]
    Pump(String),
    /// Some connected backup had not acknowledged everything in time.
    #[error("backups still behind after {after:?}: {behind}")]
    Timeout {
        /// The bound.
        after: Duration,
        /// Which backups lag, and how far.
        behind: String,
    },
}

/// Waits until everything written to the fileset before the call has been read by the pump
/// (ring: an empty read of the ring after the call; copy mode: the quiet interval and the
/// rename grace, after which changed files have been copied) and acknowledged as durable by
/// every connected backup, or `timeout`. Backups that are down are not waited for (they resume
/// or resync later). For a primary that hands the fileset over gracefully: the next primary
/// must not lose the last writes. Returns the pump's last status.
pub async fn flush(
    pump: &ActorRef<PumpMsg>,
    source: &SourceSpec,
    timeout: Duration,
) -> Result<PrimaryStatus, FlushError> {
    let deadline = Instant::now() + timeout;
    let ask_ms = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let status = || async {
        ractor::call_t!(pump, PumpMsg::Status, ask_ms).map_err(|e| FlushError::Pump(e.to_string()))
    };
    let ring = match source {
        SourceSpec::Ring { .. } => {
            let _ = pump.cast(PumpMsg::Hurry(true));
            true
        }
        SourceSpec::Copy { quiet, .. } => {
            let settle = (*quiet + crate::copy::EVENT_GRACE)
                .min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(settle).await;
            false
        }
    };
    let first = status().await?;
    // Two more empty reads: the second began after `first` was answered, so everything written
    // before the call was handed to the pump before it was counted. The count seen in one
    // answer is judged with the next one, which the pump gives after handling those records.
    let target = first.idle_reads.saturating_add(2);
    let mut seen_idle = first.idle_reads;
    loop {
        let s = status().await?;
        let read_all = !ring || seen_idle >= target;
        let newest = s.next_seq.saturating_sub(1);
        let behind: Vec<String> = s
            .backups
            .iter()
            .filter(|b| b.connected && b.acked < newest)
            .map(|b| format!("{} acknowledged {} of {newest}", b.name, b.acked))
            .collect();
        if read_all && behind.is_empty() {
            let _ = pump.cast(PumpMsg::Hurry(false));
            return Ok(s);
        }
        if Instant::now() >= deadline {
            let _ = pump.cast(PumpMsg::Hurry(false));
            return Err(FlushError::Timeout {
                after: timeout,
                behind: if read_all {
                    behind.join(", ")
                } else {
                    "the ring was not read to its end".into()
                },
            });
        }
        seen_idle = s.idle_reads;
        tokio::time::sleep(FLUSH_POLL).await;
    }
}
