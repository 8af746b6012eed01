//! The global update manager: the quorum leader sequences changes of the cluster database and
//! every member applies them in the same order. A sans-IO state machine: time comes in with
//! every input, effects go out as [`GumAction`]s (send, persist, apply, read or write the
//! quorum disk, reply to a caller). It never touches a socket, a file or a clock, and never
//! acknowledges an update before every member of the view (and the disk, where it votes) holds it.
//!
//! ```text
//!            (now, GumInput)                         GumAction
//!  actor ─────────────────────►   Gum   ───────────────────────► actor: send, persist (durable
//!    ▲  views, acting, messages,   │                              before what follows), apply /
//!    │  proposals, disk results    │                              install in redb, read / write
//!    └──── timer at next_deadline() ◄┘                             the disk area, reply, report
//! ```
//!
//! # Protocol (Paxos with the view epoch as the ballot)
//!
//! Every node holds an *applied* snapshot (sequence number `seq`) and at most one *pending*
//! update at `seq + 1`, accepted durably under some epoch. The quorum disk, when a view needs
//! its vote, holds the same pair ([`DiskRecord`]), read and written only by its lease owner.
//!
//! - **Leader.** The lowest-named member of the committed view. Members forward their callers'
//!   updates to it; it sequences them one at a time, and only while membership says it acts.
//! - **Sync.** After each new view the leader first asks every member (and, when the view counts
//!   the disk's vote, the disk owner for the disk's record) for its state. It takes the highest
//!   applied snapshot, and the pending update at the next sequence number with the highest
//!   epoch, re-accepted under the new epoch (so an update some member may have applied is
//!   completed, never dropped). Members that are behind, or whose snapshot differs at the same
//!   sequence number, receive the whole snapshot (the database is small). A joining node thus
//!   receives the current database.
//! - **Update.** The leader validates the update against its snapshot, accepts it as pending at
//!   `seq + 1`, and sends it to every member; a member persists it and answers; the disk owner
//!   also writes the disk record before it reports the disk. When every member and the disk
//!   hold it, the leader applies it, replies `Ok(seq)` to the caller and tells the members to
//!   apply it (a later update tells them too).
//! - **Why nothing acknowledged is lost.** An update is acknowledged only after all members of
//!   view `e` (a quorum of votes) accepted it under `e`. Any later view is a quorum too, so it
//!   shares a voter with `e`; that voter answers the later leader's sync with the update (or a
//!   state that contains it), and a member that answered a sync never accepts from an older
//!   view again (it only listens to its current view's leader). The highest epoch at the next
//!   sequence number wins, which is the update itself or, by induction, a re-acceptance of it.
//! - **The disk as a voter.** It cannot refuse an old view by itself, so its record carries the
//!   epoch it was last written in: before the owner reports the record to a leader it writes it
//!   back unchanged under the leader's epoch (its promise), and it never writes for a view
//!   older than that. A view that lost the disk to a newer one stalls instead of overwriting.
//! - **Bad input.** A message from a non-member, of another epoch, or about an unknown update is
//!   dropped with [`GumEvent::Ignored`]; duplicated and reordered messages are harmless.
//! - **Callers.** Every request ends in a [`GumAction::Reply`] within `request_timeout`:
//!   `Ok(seq)` only after the commit; `Invalid` when validation refused it (never sequenced);
//!   `NoLeader` when no leader took it in time (never sequenced); `Timeout` or `InDoubt` when it
//!   was handed to a leader but the outcome is unknown (it may or may not be applied; read the
//!   database). A leader that survives a view change as leader keeps its caller and answers
//!   `Ok` if its sync completes the same proposal; a leader that is replaced answers `InDoubt`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::db::{DbSnapshot, DiskRecord, GumPersisted, Pending, Update, UpdateError};
use crate::membership::{NodeId, View};
use crate::quorum::Votes;

/// Default of [`GumConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`GumConfig::retry_interval`].
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// Default of [`GumConfig::max_queued`].
pub const DEFAULT_MAX_QUEUED: usize = 256;
/// Forwards remembered per view against duplicates, in multiples of `max_queued`.
const FORWARDS_REMEMBERED: usize = 4;

/// The global update manager's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GumConfig {
    /// Every configured node.
    pub nodes: BTreeSet<NodeId>,
    /// Whether a quorum disk holds a vote.
    pub quorum_disk: bool,
    /// Every request is answered within this long.
    pub request_timeout: Duration,
    /// How often the leader repeats a message that was not answered.
    pub retry_interval: Duration,
    /// The most updates waiting for the leader.
    pub max_queued: usize,
}

impl GumConfig {
    /// A configuration with the default timings.
    pub fn new(nodes: impl IntoIterator<Item = NodeId>, quorum_disk: bool) -> GumConfig {
        GumConfig {
            nodes: nodes.into_iter().collect(),
            quorum_disk,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry_interval: DEFAULT_RETRY_INTERVAL,
            max_queued: DEFAULT_MAX_QUEUED,
        }
    }

    /// Checks the fields for node `me`.
    pub fn validate(&self, me: &str) -> Result<(), GumConfigError> {
        if !self.nodes.contains(me) {
            return Err(GumConfigError {
                field: "nodes",
                why: format!("this node {me:?} is not listed"),
            });
        }
        if self.retry_interval.is_zero() {
            return Err(GumConfigError {
                field: "retry_interval",
                why: "must be longer than zero".into(),
            });
        }
        if self.request_timeout < self.retry_interval.saturating_mul(2) {
            return Err(GumConfigError {
                field: "request_timeout",
                why: "must be at least two retry intervals".into(),
            });
        }
        if self.max_queued == 0 {
            return Err(GumConfigError {
                field: "max_queued",
                why: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// An invalid [`GumConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("global update configuration: {field}: {why}")]
pub struct GumConfigError {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub why: String,
}

/// Why a proposed update was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "error")]
pub enum GumError {
    /// The leader refused it: it does not apply to the current database. Not sequenced.
    #[error("refused: {0}")]
    Invalid(UpdateError),
    /// No leader with quorum took it within the timeout. Not sequenced.
    #[error("no leader with quorum took the update in time; it was not applied")]
    NoLeader,
    /// The leader has too many updates waiting. Not sequenced.
    #[error("the leader is busy; the update was not applied")]
    Busy,
    /// It reached a leader but no outcome came back in time: it may or may not be applied.
    #[error("no answer in time; the update may or may not have been applied")]
    Timeout,
    /// The leader changed while it was in flight: it may or may not be applied.
    #[error(
        "the leader changed while the update was in flight; it may or may not have been applied"
    )]
    InDoubt,
    /// The receiver is not the leader (between nodes only: the sender routes it again).
    #[error("not the leader")]
    NotLeader,
}

/// One node's (or the disk's) state as reported to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReport {
    /// The applied sequence number.
    pub seq: u64,
    /// [`DbSnapshot::checksum`] of the applied snapshot.
    pub checksum: u64,
    /// The applied snapshot, when the leader asked for it (it has less).
    pub snapshot: Option<Box<DbSnapshot>>,
    /// The accepted next update.
    pub pending: Option<Pending>,
}

impl StateReport {
    fn pending_key(&self) -> Option<(u64, u64)> {
        self.pending.as_ref().map(|p| (p.seq, p.epoch))
    }
}

/// A member's answer to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The view's epoch.
    pub epoch: u64,
    /// Increases with every status this node sends (the leader keeps the newest).
    pub n: u64,
    /// The sender's state.
    pub state: StateReport,
    /// The quorum disk's record, when the sender owns the disk and the view counts its vote.
    pub disk: Option<StateReport>,
}

/// The global update manager's messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GumMessage {
    /// Leader → member: report your state; include the snapshot if it is newer than `have`.
    Query {
        /// The view's epoch.
        epoch: u64,
        /// The leader's applied sequence number.
        have: u64,
    },
    /// Member → leader.
    Status(Box<Status>),
    /// Leader → member: install `base` if you are behind or differ, then accept `pending`
    /// (a pending update of this epoch just below it is applied first: it was committed).
    Prepare {
        /// The view's epoch.
        epoch: u64,
        /// The leader's applied snapshot.
        base: Option<Box<DbSnapshot>>,
        /// The update to accept.
        pending: Option<Pending>,
    },
    /// Leader → member: apply your pending update `seq` (accepted in this epoch).
    Commit {
        /// The view's epoch.
        epoch: u64,
        /// Its sequence number.
        seq: u64,
    },
    /// Member → leader: a caller's update.
    Forward {
        /// The view's epoch.
        epoch: u64,
        /// The caller's request, as numbered by the sender.
        request_id: u64,
        /// The update.
        update: Update,
    },
    /// Leader → member: the outcome of a forwarded update.
    Outcome {
        /// The epoch of the `Forward`.
        epoch: u64,
        /// The request.
        request_id: u64,
        /// The outcome.
        result: Result<u64, GumError>,
    },
}

impl GumMessage {
    fn epoch(&self) -> u64 {
        match self {
            GumMessage::Query { epoch, .. }
            | GumMessage::Prepare { epoch, .. }
            | GumMessage::Commit { epoch, .. }
            | GumMessage::Forward { epoch, .. }
            | GumMessage::Outcome { epoch, .. } => *epoch,
            GumMessage::Status(s) => s.epoch,
        }
    }
}

/// What happens to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GumInput {
    /// The time of [`Gum::next_deadline`] came (or any other wakeup).
    Tick,
    /// Membership committed this view (from `membership::Action::Committed`).
    ViewCommitted(View),
    /// Membership's verdict (from `membership::Action::Acting`).
    Acting(bool),
    /// This node owns (true) or no longer owns the quorum disk's lease.
    DiskOwner(bool),
    /// A [`GumAction::ReadDisk`] finished.
    DiskRead {
        /// Its id.
        id: u64,
        /// The newest valid record (`None`: never written or unreadable), or why the read failed.
        result: Result<Option<DiskRecord>, String>,
    },
    /// A [`GumAction::WriteDisk`] finished.
    DiskWritten {
        /// Its id.
        id: u64,
        /// Success, or why not.
        result: Result<(), String>,
    },
    /// A message from a peer, as authenticated by the transport.
    Message {
        /// The peer.
        from: NodeId,
        /// The message.
        msg: GumMessage,
    },
    /// A local caller proposes an update; it is answered by exactly one
    /// [`GumAction::Reply`] with the same `request_id` (unique among this node's open requests).
    Propose {
        /// The caller's id.
        request_id: u64,
        /// The update.
        update: Update,
    },
}

/// What the actor must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GumAction {
    /// Send `msg` to `to`.
    Send {
        /// The peer.
        to: NodeId,
        /// The message.
        msg: GumMessage,
    },
    /// Write this durably ([`crate::db::ClusterDb::save_gum`]) before the actions after it.
    Persist(GumPersisted),
    /// Apply update `seq` ([`crate::db::ClusterDb::apply`]) durably before the actions after it.
    /// It also drops the persisted pending update of that sequence number. A failure means
    /// this node's database differs from the machine's: restart the machine from the database.
    Apply {
        /// Its sequence number.
        seq: u64,
        /// The epoch it was committed in.
        epoch: u64,
        /// The update.
        update: Update,
    },
    /// Replace the database ([`crate::db::ClusterDb::install`]) durably before the actions
    /// after it (a state transfer; drops an obsolete persisted pending update).
    Install(DbSnapshot),
    /// Read the quorum disk's database area ([`crate::db::read_disk_area`]) and report
    /// [`GumInput::DiskRead`]. Only while this node owns the disk's lease.
    ReadDisk {
        /// The id to report with.
        id: u64,
    },
    /// Write the record to the quorum disk's database area ([`crate::db::write_disk_area`])
    /// and report [`GumInput::DiskWritten`]. Only while this node owns the disk's lease: an
    /// actor that lost it fails the write instead.
    WriteDisk {
        /// The id to report with.
        id: u64,
        /// The record.
        record: Box<DiskRecord>,
    },
    /// The answer to a [`GumInput::Propose`].
    Reply {
        /// The caller's id.
        request_id: u64,
        /// `Ok(seq)`: applied as update `seq` by every member of the view.
        result: Result<u64, GumError>,
    },
    /// Something to report.
    Event(GumEvent),
}

/// What the actor reports (log, events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum GumEvent {
    /// A message was dropped.
    Ignored {
        /// The sender.
        from: NodeId,
        /// Why.
        why: String,
    },
    /// This node leads the view and collects the members' states.
    SyncStarted {
        /// The view.
        epoch: u64,
    },
    /// The sync chose the state of the view.
    Synced {
        /// The view.
        epoch: u64,
        /// The applied sequence number chosen.
        seq: u64,
        /// The pending update completed, if any.
        completing: Option<u64>,
    },
    /// This node installed a snapshot from the leader or the disk.
    Installed {
        /// Its sequence number.
        seq: u64,
    },
    /// The leader committed an update.
    Committed {
        /// Its sequence number.
        seq: u64,
    },
    /// Two states of the same sequence number differ (a bug or a damaged store); the leader's
    /// snapshot replaces the other.
    Diverged {
        /// The node (or `disk`).
        node: String,
        /// The sequence number.
        seq: u64,
    },
    /// An update the leader committed does not apply here.
    ApplyFailed {
        /// Its sequence number.
        seq: u64,
        /// Why.
        why: String,
    },
    /// The quorum disk's database area could not be read or written.
    DiskFailed {
        /// Why.
        why: String,
    },
}

/// Who waits for an update's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    Local(u64),
    Remote {
        node: NodeId,
        request_id: u64,
        epoch: u64,
    },
}

#[derive(Debug, Clone)]
struct Queued {
    caller: Caller,
    update: Update,
    deadline: Instant,
}

/// The update the leader sequenced and has not committed.
#[derive(Debug, Clone)]
struct Inflight {
    seq: u64,
    origin: u64,
    caller: Option<Caller>,
}

#[derive(Debug, Clone)]
struct LocalRequest {
    update: Update,
    deadline: Instant,
    /// Handed to this leader in this epoch.
    forwarded: Option<(NodeId, u64)>,
    /// In this node's own leader queue (or in flight here).
    queued: bool,
}

/// What the leader last sent a member, to repeat it only after `retry_interval`.
type SendKey = (bool, u64, Option<(u64, u64)>);

#[derive(Debug, Clone)]
struct Lead {
    synced: bool,
    /// Each member's newest status in this view: (n, report).
    reports: BTreeMap<NodeId, (u64, StateReport)>,
    /// The disk's newest record as reported, and by whom.
    disk: Option<(NodeId, StateReport)>,
    sent: BTreeMap<NodeId, (Instant, SendKey)>,
    /// The members the leader waits for (it repeats its message to them).
    waiting: BTreeSet<NodeId>,
}

#[derive(Debug, Clone, Default)]
struct DiskState {
    owner: bool,
    /// The record as last read or written (`Some(None)`: nothing valid on the disk).
    known: Option<Option<DiskRecord>>,
    /// The checksum of the known record's snapshot.
    known_sum: u64,
    /// The outstanding I/O and, for a write, the record.
    io: Option<(u64, Option<DiskRecord>)>,
    /// The wanted record changed while an I/O was outstanding.
    dirty: bool,
    /// No new I/O before this (after a failure).
    hold_until: Option<Instant>,
    /// The disk was found written by a newer view (reported once).
    stale: bool,
}

/// The global update manager of one node.
#[derive(Debug)]
pub struct Gum {
    cfg: GumConfig,
    votes: Votes,
    me: NodeId,
    snapshot: DbSnapshot,
    checksum: u64,
    pending: Option<Pending>,
    view: Option<View>,
    acting: bool,
    lead: Option<Lead>,
    queue: VecDeque<Queued>,
    inflight: Option<Inflight>,
    requests: BTreeMap<u64, LocalRequest>,
    disk: DiskState,
    next_io: u64,
    next_status: u64,
    /// The time of the step under way (none before the first).
    now: Option<Instant>,
    /// The epoch of the last prepare taken from a leader.
    prepared: u64,
    /// Forwards of this view already taken (a duplicate must not be sequenced twice).
    forwards_seen: VecDeque<(NodeId, u64)>,
}

impl Gum {
    /// The machine of node `me`, restarted from its database (`snapshot`, from
    /// [`crate::db::ClusterDb::snapshot`]) and `persisted` (from
    /// [`crate::db::ClusterDb::gum_persisted`]).
    pub fn new(
        cfg: GumConfig,
        me: impl Into<NodeId>,
        persisted: GumPersisted,
        snapshot: DbSnapshot,
    ) -> Result<Gum, GumConfigError> {
        let me = me.into();
        cfg.validate(&me)?;
        let pending = persisted
            .pending
            .filter(|p| Some(p.seq) == snapshot.seq.checked_add(1));
        Ok(Gum {
            votes: Votes::new(cfg.nodes.iter().cloned(), cfg.quorum_disk),
            checksum: snapshot.checksum(),
            snapshot,
            pending,
            view: None,
            acting: false,
            lead: None,
            queue: VecDeque::new(),
            inflight: None,
            requests: BTreeMap::new(),
            disk: DiskState::default(),
            next_io: 1,
            next_status: 1,
            now: None,
            prepared: 0,
            forwards_seen: VecDeque::new(),
            me,
            cfg,
        })
    }

    /// The applied database.
    pub fn snapshot(&self) -> &DbSnapshot {
        &self.snapshot
    }

    /// The accepted, not yet applied update.
    pub fn pending(&self) -> Option<&Pending> {
        self.pending.as_ref()
    }

    /// The view this node is in.
    pub fn view(&self) -> Option<&View> {
        self.view.as_ref()
    }

    /// The leader of the current view.
    pub fn leader(&self) -> Option<&NodeId> {
        self.view.as_ref().and_then(|v| v.members.first())
    }

    /// Whether this node leads the view and finished its sync (it takes updates while it acts).
    pub fn is_synced_leader(&self) -> bool {
        self.lead.as_ref().is_some_and(|l| l.synced)
    }

    /// When the machine next needs a [`GumInput::Tick`]. Right after a step at `now` it lies
    /// beyond `now`; when other inputs came since, it may have passed: tick at once then.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut times: Vec<Instant> = self.requests.values().map(|r| r.deadline).collect();
        times.extend(self.queue.iter().map(|q| q.deadline));
        if self.disk.owner && self.disk.known.is_none() && self.disk.io.is_none() {
            times.extend(self.disk.hold_until);
        }
        if let Some(lead) = &self.lead {
            times.extend(
                lead.sent
                    .iter()
                    .filter(|(m, _)| lead.waiting.contains(*m))
                    .filter_map(|(_, (at, _))| at.checked_add(self.cfg.retry_interval)),
            );
        }
        // After a step at `now` every deadline lies beyond it; one at or before `now` means
        // other inputs came in between: tick at once.
        times.into_iter().min().map(|t| t.max(now))
    }

    /// Feeds one input and returns what to do.
    pub fn step(&mut self, now: Instant, input: GumInput) -> Vec<GumAction> {
        let mut out = Vec::new();
        self.now = Some(now);
        if self.disk.hold_until.is_some_and(|t| t <= now) {
            self.disk.hold_until = None;
        }
        match input {
            GumInput::Tick => {}
            GumInput::ViewCommitted(v) => self.on_view(v, &mut out),
            GumInput::Acting(a) => self.acting = a,
            GumInput::DiskOwner(o) => self.on_disk_owner(o, &mut out),
            GumInput::DiskRead { id, result } => self.on_disk_read(id, result, &mut out),
            GumInput::DiskWritten { id, result } => self.on_disk_written(id, result, &mut out),
            GumInput::Message { from, msg } => self.on_message(now, from, msg, &mut out),
            GumInput::Propose { request_id, update } => {
                if self.requests.contains_key(&request_id) {
                    // A reused id (a bug of the caller): the older request is answered first,
                    // never silently lost.
                    self.fail_request(request_id, &mut out);
                }
                self.requests.insert(
                    request_id,
                    LocalRequest {
                        update,
                        deadline: now.checked_add(self.cfg.request_timeout).unwrap_or(now),
                        forwarded: None,
                        queued: false,
                    },
                );
            }
        }
        self.expire(now, &mut out);
        self.route(&mut out);
        self.lead_step(now, &mut out);
        out
    }

    fn inflight_for(&self, request_id: u64) -> bool {
        self.inflight
            .as_ref()
            .is_some_and(|i| i.caller == Some(Caller::Local(request_id)))
    }

    /// Answers an open request that ran out of time: `Timeout` if a leader may have it,
    /// `NoLeader` if none ever took it.
    fn fail_request(&mut self, id: u64, out: &mut Vec<GumAction>) {
        let Some(r) = self.requests.remove(&id) else {
            return;
        };
        let sequenced = self.inflight_for(id);
        if sequenced && let Some(i) = self.inflight.as_mut() {
            i.caller = None;
        }
        self.queue.retain(|q| q.caller != Caller::Local(id));
        let result = if r.forwarded.is_some() || sequenced {
            GumError::Timeout
        } else {
            GumError::NoLeader
        };
        out.push(GumAction::Reply {
            request_id: id,
            result: Err(result),
        });
    }

    fn is_leader(&self) -> bool {
        self.leader() == Some(&self.me)
    }

    /// Whether the view needs the disk's vote for its quorum.
    fn uses_disk(&self) -> bool {
        self.view
            .as_ref()
            .is_some_and(|v| self.cfg.quorum_disk && !self.votes.has_quorum_of(&v.members, None))
    }

    fn epoch(&self) -> u64 {
        self.view.as_ref().map_or(0, |v| v.epoch)
    }

    fn my_report(&self, have: Option<u64>) -> StateReport {
        StateReport {
            seq: self.snapshot.seq,
            checksum: self.checksum,
            snapshot: have
                .filter(|h| *h < self.snapshot.seq)
                .map(|_| Box::new(self.snapshot.clone())),
            pending: self.pending.clone(),
        }
    }

    /// The epoch the disk's record was written in (0: nothing on the disk).
    fn disk_written(&self) -> Option<u64> {
        self.disk
            .known
            .as_ref()
            .map(|r| r.as_ref().map_or(0, |r| r.written))
    }

    /// The disk's record as the leader of this view may use it: known, no I/O outstanding,
    /// and promised to this view (written in this epoch).
    fn disk_report(&self, have: Option<u64>) -> Option<StateReport> {
        if !self.disk.owner || self.disk.io.is_some() || self.disk_written() != Some(self.epoch()) {
            return None;
        }
        let rec = self.disk.known.as_ref()?;
        let empty = DbSnapshot::default();
        let (committed, pending) = match rec {
            Some(r) => (&r.committed, r.pending.clone()),
            None => (&empty, None),
        };
        Some(StateReport {
            seq: committed.seq,
            checksum: self.disk.known_sum,
            pending,
            snapshot: have
                .filter(|h| *h < committed.seq)
                .map(|_| Box::new(committed.clone())),
        })
    }

    fn reply(&mut self, caller: Caller, result: Result<u64, GumError>, out: &mut Vec<GumAction>) {
        match caller {
            Caller::Local(request_id) => {
                if self.requests.remove(&request_id).is_some() {
                    out.push(GumAction::Reply { request_id, result });
                }
            }
            Caller::Remote {
                node,
                request_id,
                epoch,
            } => out.push(GumAction::Send {
                to: node,
                msg: GumMessage::Outcome {
                    epoch,
                    request_id,
                    result,
                },
            }),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Views, requests, routing.
    // ---------------------------------------------------------------------------------------

    fn on_view(&mut self, v: View, out: &mut Vec<GumAction>) {
        if !v.members.contains(&self.me) || self.view.as_ref().is_some_and(|c| c.epoch >= v.epoch) {
            return;
        }
        let was_leader = self.lead.is_some();
        self.view = Some(v);
        self.forwards_seen.clear();
        if self.is_leader() {
            self.lead = Some(Lead {
                synced: false,
                reports: BTreeMap::new(),
                disk: None,
                sent: BTreeMap::new(),
                waiting: BTreeSet::new(),
            });
            out.push(GumAction::Event(GumEvent::SyncStarted {
                epoch: self.epoch(),
            }));
        } else {
            self.lead = None;
            if was_leader {
                self.abdicate(out);
            }
        }
        // The leader will ask for the disk's record: promise it to this view at once.
        self.disk_promise(out);
    }

    /// This node no longer leads: updates it never sequenced go back to their routes, the one
    /// in flight is in doubt.
    fn abdicate(&mut self, out: &mut Vec<GumAction>) {
        if let Some(i) = self.inflight.take()
            && let Some(c) = i.caller
        {
            self.reply(c, Err(GumError::InDoubt), out);
        }
        for q in std::mem::take(&mut self.queue) {
            match q.caller {
                Caller::Local(id) => {
                    if let Some(r) = self.requests.get_mut(&id) {
                        r.queued = false;
                    }
                }
                remote => self.reply(remote, Err(GumError::NotLeader), out),
            }
        }
    }

    fn expire(&mut self, now: Instant, out: &mut Vec<GumAction>) {
        let expired: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| now >= r.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.fail_request(id, out);
        }
        self.queue.retain(|q| match &q.caller {
            // A local caller's deadline is its request's.
            Caller::Local(id) => self.requests.contains_key(id),
            Caller::Remote { .. } => now < q.deadline,
        });
    }

    fn route(&mut self, out: &mut Vec<GumAction>) {
        let Some(leader) = self.leader().cloned() else {
            return;
        };
        let epoch = self.epoch();
        let leading = leader == self.me;
        let mut busy = Vec::new();
        for (id, r) in &mut self.requests {
            if r.forwarded.is_some() || r.queued {
                continue;
            }
            if leading {
                if self.queue.len() >= self.cfg.max_queued {
                    busy.push(*id);
                    continue;
                }
                r.queued = true;
                self.queue.push_back(Queued {
                    caller: Caller::Local(*id),
                    update: r.update.clone(),
                    deadline: r.deadline,
                });
            } else {
                r.forwarded = Some((leader.clone(), epoch));
                out.push(GumAction::Send {
                    to: leader.clone(),
                    msg: GumMessage::Forward {
                        epoch,
                        request_id: *id,
                        update: r.update.clone(),
                    },
                });
            }
        }
        for id in busy {
            self.reply(Caller::Local(id), Err(GumError::Busy), out);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Messages.
    // ---------------------------------------------------------------------------------------

    fn ignore(from: NodeId, why: impl Into<String>, out: &mut Vec<GumAction>) {
        out.push(GumAction::Event(GumEvent::Ignored {
            from,
            why: why.into(),
        }));
    }

    fn on_message(
        &mut self,
        now: Instant,
        from: NodeId,
        msg: GumMessage,
        out: &mut Vec<GumAction>,
    ) {
        if from == self.me || !self.cfg.nodes.contains(&from) {
            return Self::ignore(from, "not a configured peer", out);
        }
        // An outcome answers a request of an earlier epoch too: it is matched exactly.
        if let GumMessage::Outcome {
            epoch,
            request_id,
            result,
        } = msg
        {
            return self.on_outcome(from, epoch, request_id, result, out);
        }
        let Some(view) = &self.view else {
            return Self::ignore(from, "no view yet", out);
        };
        if !view.members.contains(&from) {
            return Self::ignore(from, "not a member of the view", out);
        }
        let epoch = msg.epoch();
        if epoch != view.epoch {
            let why = if epoch < view.epoch {
                "stale epoch"
            } else {
                "epoch not committed here yet"
            };
            return Self::ignore(from, why, out);
        }
        let leader = self.leader().cloned();
        match msg {
            GumMessage::Query { have, .. } => {
                if leader.as_ref() != Some(&from) {
                    return Self::ignore(from, "query from a non-leader", out);
                }
                self.send_status(from, Some(have), out);
            }
            GumMessage::Prepare { base, pending, .. } => {
                if leader.as_ref() != Some(&from) {
                    return Self::ignore(from, "prepare from a non-leader", out);
                }
                self.on_prepare(&from, base, pending, out);
            }
            GumMessage::Commit { seq, .. } => {
                if leader.as_ref() != Some(&from) {
                    return Self::ignore(from, "commit from a non-leader", out);
                }
                match self.pending.clone() {
                    Some(p) if p.seq == seq && p.epoch == epoch => self.apply_pending(p, out),
                    _ if self.snapshot.seq >= seq => {}
                    _ => Self::ignore(from.clone(), "commit of an unknown update", out),
                }
                self.send_status(from, None, out);
            }
            GumMessage::Status(s) => {
                let Some(lead) = self.lead.as_mut() else {
                    return Self::ignore(from, "status to a non-leader", out);
                };
                let s = *s;
                if lead.reports.get(&from).is_some_and(|(n, _)| *n >= s.n) {
                    return;
                }
                if let Some(d) = s.disk {
                    lead.disk = Some((from.clone(), d));
                }
                lead.reports.insert(from, (s.n, s.state));
            }
            GumMessage::Forward {
                request_id, update, ..
            } => {
                let key = (from.clone(), request_id);
                if self.forwards_seen.contains(&key) {
                    return Self::ignore(from, "a forward seen before", out);
                }
                self.forwards_seen.push_back(key);
                if self.forwards_seen.len()
                    > self.cfg.max_queued.saturating_mul(FORWARDS_REMEMBERED)
                {
                    self.forwards_seen.pop_front();
                }
                let caller = Caller::Remote {
                    node: from,
                    request_id,
                    epoch,
                };
                if leader.as_ref() != Some(&self.me) {
                    self.reply(caller, Err(GumError::NotLeader), out);
                } else if self.queue.len() >= self.cfg.max_queued {
                    self.reply(caller, Err(GumError::Busy), out);
                } else {
                    self.queue.push_back(Queued {
                        caller,
                        update,
                        deadline: now.checked_add(self.cfg.request_timeout).unwrap_or(now),
                    });
                }
            }
            GumMessage::Outcome { .. } => {}
        }
    }

    fn on_outcome(
        &mut self,
        from: NodeId,
        epoch: u64,
        request_id: u64,
        result: Result<u64, GumError>,
        out: &mut Vec<GumAction>,
    ) {
        let Some(r) = self.requests.get_mut(&request_id) else {
            return Self::ignore(from, "outcome of no open request", out);
        };
        if r.forwarded.as_ref() != Some(&(from.clone(), epoch)) {
            return Self::ignore(from, "outcome from a node the request was not sent to", out);
        }
        if result == Err(GumError::NotLeader) {
            // Never sequenced: route it again.
            r.forwarded = None;
            return;
        }
        self.requests.remove(&request_id);
        out.push(GumAction::Reply { request_id, result });
    }

    fn send_status(&mut self, to: NodeId, have: Option<u64>, out: &mut Vec<GumAction>) {
        let disk = if self.uses_disk() {
            if have.is_some() {
                self.disk_promise(out);
            }
            self.disk_report(have)
        } else {
            None
        };
        let n = self.next_status;
        self.next_status += 1;
        out.push(GumAction::Send {
            to,
            msg: GumMessage::Status(Box::new(Status {
                epoch: self.epoch(),
                n,
                state: self.my_report(have),
                disk,
            })),
        });
    }

    /// A member takes the leader's state: the base if it is behind or differs, then the
    /// pending update.
    fn on_prepare(
        &mut self,
        from: &NodeId,
        base: Option<Box<DbSnapshot>>,
        pending: Option<Pending>,
        out: &mut Vec<GumAction>,
    ) {
        let epoch = self.epoch();
        self.prepared = epoch;
        // The update of this epoch just below the new one was committed by the leader.
        if let (Some(mine), Some(new)) = (self.pending.clone(), pending.as_ref())
            && mine.epoch == epoch
            && Some(new.seq) == mine.seq.checked_add(1)
        {
            self.apply_pending(mine, out);
        }
        if let Some(b) = base {
            let behind = b.seq > self.snapshot.seq;
            let differs = b.seq == self.snapshot.seq && b.checksum() != self.checksum;
            if behind || differs {
                self.install(*b, out);
            }
            if pending.is_none() && self.pending.as_ref().is_some_and(|p| p.epoch < epoch) {
                // The leader's state has no pending update: an older epoch's acceptance here
                // was not chosen (the sync would have completed it). One of this epoch stays:
                // this message may be older than the prepare that carried it.
                self.pending = None;
                out.push(GumAction::Persist(GumPersisted::default()));
            }
        }
        match pending {
            Some(p) if p.epoch != epoch => {
                Self::ignore(from.clone(), "pending update of another epoch", out);
            }
            Some(p) if Some(p.seq) == self.snapshot.seq.checked_add(1) => {
                let new = self.pending.as_ref() != Some(&p);
                self.pending = Some(p);
                if new {
                    out.push(GumAction::Persist(GumPersisted {
                        pending: self.pending.clone(),
                    }));
                }
            }
            Some(p) if p.seq <= self.snapshot.seq => {}
            Some(_) => Self::ignore(from.clone(), "pending update beyond the next one", out),
            None => {}
        }
        self.disk_duty(out);
        self.send_status(from.clone(), None, out);
    }

    fn apply_pending(&mut self, p: Pending, out: &mut Vec<GumAction>) {
        let epoch = self.epoch();
        match self.snapshot.apply(epoch, &p.update) {
            Ok(()) => {
                self.checksum = self.snapshot.checksum();
                self.pending = None;
                out.push(GumAction::Apply {
                    seq: p.seq,
                    epoch,
                    update: p.update,
                });
            }
            Err(e) => {
                // The leader validated it against the same state: this node's state differs
                // (a damaged store). A member drops it, so that its next status shows the
                // leader a state to replace with the whole snapshot; the leader keeps it and
                // waits for a new view (it cannot happen there: it validated this very state).
                out.push(GumAction::Event(GumEvent::ApplyFailed {
                    seq: p.seq,
                    why: e.to_string(),
                }));
                if self.lead.is_none() {
                    self.pending = None;
                    out.push(GumAction::Persist(GumPersisted::default()));
                }
            }
        }
    }

    fn install(&mut self, s: DbSnapshot, out: &mut Vec<GumAction>) {
        self.checksum = s.checksum();
        self.snapshot = s;
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.seq <= self.snapshot.seq)
        {
            self.pending = None;
        }
        out.push(GumAction::Event(GumEvent::Installed {
            seq: self.snapshot.seq,
        }));
        out.push(GumAction::Install(self.snapshot.clone()));
    }

    // ---------------------------------------------------------------------------------------
    // The quorum disk.
    // ---------------------------------------------------------------------------------------

    fn on_disk_owner(&mut self, owner: bool, out: &mut Vec<GumAction>) {
        if owner == self.disk.owner {
            return;
        }
        self.disk = DiskState {
            owner,
            ..DiskState::default()
        };
        if owner {
            self.start_read(out);
        }
    }

    fn start_read(&mut self, out: &mut Vec<GumAction>) {
        if let (Some(hold), Some(now)) = (self.disk.hold_until, self.now)
            && now < hold
        {
            return;
        }
        let id = self.next_io;
        self.next_io += 1;
        self.disk.io = Some((id, None));
        self.disk.known = None;
        out.push(GumAction::ReadDisk { id });
    }

    fn on_disk_read(
        &mut self,
        id: u64,
        result: Result<Option<DiskRecord>, String>,
        out: &mut Vec<GumAction>,
    ) {
        if !self.disk.owner || self.disk.io.as_ref().map(|(i, _)| *i) != Some(id) {
            return;
        }
        self.disk.io = None;
        match result {
            Ok(r) => {
                self.set_known(r);
                self.disk_done(out);
            }
            Err(why) => {
                out.push(GumAction::Event(GumEvent::DiskFailed { why }));
                // Nothing is known: read again when needed, after a pause.
                self.disk.hold_until = self
                    .now
                    .and_then(|n| n.checked_add(self.cfg.retry_interval));
            }
        }
    }

    fn on_disk_written(&mut self, id: u64, result: Result<(), String>, out: &mut Vec<GumAction>) {
        if !self.disk.owner || self.disk.io.as_ref().map(|(i, _)| *i) != Some(id) {
            return;
        }
        let Some((_, record)) = self.disk.io.take() else {
            return;
        };
        match result {
            Ok(()) => {
                if let Some(r) = record {
                    self.set_known(Some(r));
                }
                self.disk_done(out);
            }
            Err(why) => {
                out.push(GumAction::Event(GumEvent::DiskFailed { why }));
                // Either copy may hold what is newest now: read before anything else.
                self.disk.known = None;
                self.start_read(out);
            }
        }
    }

    fn set_known(&mut self, r: Option<DiskRecord>) {
        self.disk.known_sum = r.as_ref().map_or_else(
            || DbSnapshot::default().checksum(),
            |r| r.committed.checksum(),
        );
        self.disk.known = Some(r);
    }

    /// After a disk I/O: write again if the wanted record changed meanwhile, and tell the
    /// leader what the disk holds.
    fn disk_done(&mut self, out: &mut Vec<GumAction>) {
        self.disk.dirty = false;
        self.disk_duty(out);
        self.disk_promise(out);
        if self.disk.io.is_none()
            && self.uses_disk()
            && let Some(leader) = self.leader().cloned()
            && leader != self.me
        {
            self.send_status(leader, None, out);
        }
    }

    /// The disk owner of a view that counts the disk brings the disk to its own state.
    ///
    /// The disk is an acceptor like a member, but it cannot refuse an old view by itself: its
    /// record carries the epoch it was last written in, which works as its promise. An owner
    /// never writes for a view older than that epoch (its view is stale: another view's
    /// leader already used the disk), and before the disk's record is reported to a leader it
    /// is written back unchanged under the leader's epoch (see [`Gum::disk_promise`]).
    fn disk_duty(&mut self, out: &mut Vec<GumAction>) {
        if !self.disk.owner || !self.uses_disk() {
            return;
        }
        // Before this view's leader chose its state, the disk's record is what the leader
        // must see, not this node's.
        let chosen = match &self.lead {
            Some(l) => l.synced,
            None => self.prepared == self.epoch(),
        };
        if !chosen {
            return;
        }
        if self.disk.io.is_some() {
            self.disk.dirty = true;
            return;
        }
        let epoch = self.epoch();
        let Some(written) = self.disk_written() else {
            self.start_read(out);
            return;
        };
        if written > epoch {
            return;
        }
        if let Some(disk) = self.disk_report(None) {
            let target = (self.snapshot.seq, self.checksum, self.pending_key());
            if matches_target(&disk, target, epoch) {
                return;
            }
        }
        let record = DiskRecord {
            committed: self.snapshot.clone(),
            pending: self.pending.clone(),
            written: epoch,
        };
        self.write_disk(record, out);
    }

    fn write_disk(&mut self, record: DiskRecord, out: &mut Vec<GumAction>) {
        let id = self.next_io;
        self.next_io += 1;
        self.disk.io = Some((id, Some(record.clone())));
        out.push(GumAction::WriteDisk {
            id,
            record: Box::new(record),
        });
    }

    /// Phase one for the disk: the owner makes the disk's record reportable to this view's
    /// leader, reading it if unknown and writing it back unchanged under this epoch (the
    /// promise that no older view's leader may use the disk any more).
    fn disk_promise(&mut self, out: &mut Vec<GumAction>) {
        if !self.disk.owner || !self.uses_disk() || self.disk.io.is_some() {
            return;
        }
        let epoch = self.epoch();
        match self.disk.known.clone() {
            None => self.start_read(out),
            Some(r) => {
                let written = r.as_ref().map_or(0, |r| r.written);
                if written < epoch {
                    let record = r.map_or_else(
                        || DiskRecord {
                            written: epoch,
                            ..DiskRecord::default()
                        },
                        |r| DiskRecord {
                            written: epoch,
                            ..r
                        },
                    );
                    self.write_disk(record, out);
                } else if written > epoch && !self.disk.stale {
                    // Reported once; the view is stale and membership moves on.
                    self.disk.stale = true;
                    out.push(GumAction::Event(GumEvent::DiskFailed {
                        why: format!(
                            "the disk's database was written in epoch {written}, after this view ({epoch})"
                        ),
                    }));
                }
            }
        }
    }

    fn pending_key(&self) -> Option<(u64, u64)> {
        self.pending.as_ref().map(|p| (p.seq, p.epoch))
    }

    // ---------------------------------------------------------------------------------------
    // The leader.
    // ---------------------------------------------------------------------------------------

    fn lead_step(&mut self, now: Instant, out: &mut Vec<GumAction>) {
        if self.lead.is_none() {
            return;
        }
        // The leader as disk owner reports to itself.
        if self.uses_disk()
            && let Some(d) = self.disk_report(Some(self.snapshot.seq))
            && let Some(lead) = self.lead.as_mut()
        {
            lead.disk = Some((self.me.clone(), d));
        }
        if !self.lead.as_ref().is_some_and(|l| l.synced) && !self.collect(now, out) {
            return;
        }
        // Commit and sequence until something must wait (each turn commits one update or
        // takes one off the queue, so this ends).
        loop {
            if self.pending.is_some() {
                if !self.all_hold_target() {
                    break;
                }
                self.commit(out);
                if self.pending.is_some() {
                    break;
                }
                continue;
            }
            if !self.acting || self.queue.is_empty() {
                break;
            }
            self.sequence(out);
            if self.pending.is_none() {
                break;
            }
            // The disk owner (this node) refreshes the report once the write is done.
            if self.uses_disk()
                && let Some(d) = self.disk_report(Some(self.snapshot.seq))
                && let Some(lead) = self.lead.as_mut()
            {
                lead.disk = Some((self.me.clone(), d));
            }
        }
        self.drive(now, out);
    }

    fn others(&self) -> Vec<NodeId> {
        self.view
            .as_ref()
            .map(|v| {
                v.members
                    .iter()
                    .filter(|m| **m != self.me)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn due(&self, m: &NodeId, key: SendKey, now: Instant) -> bool {
        self.lead.as_ref().is_some_and(|l| match l.sent.get(m) {
            None => true,
            Some((at, k)) => {
                *k != key
                    || at
                        .checked_add(self.cfg.retry_interval)
                        .is_none_or(|t| now >= t)
            }
        })
    }

    fn mark_sent(&mut self, m: &NodeId, key: SendKey, now: Instant) {
        if let Some(l) = self.lead.as_mut() {
            l.sent.insert(m.clone(), (now, key));
        }
    }

    /// Phase one of the sync: true once the leader chose the view's state.
    fn collect(&mut self, now: Instant, out: &mut Vec<GumAction>) -> bool {
        let epoch = self.epoch();
        let have = self.snapshot.seq;
        let others = self.others();
        let uses_disk = self.uses_disk();
        let Some(lead) = self.lead.as_ref() else {
            return false;
        };
        // A report that is newer than the leader must carry its snapshot.
        let complete = |r: &StateReport| r.seq <= have || r.snapshot.is_some();
        let disk_ok = !uses_disk || lead.disk.as_ref().is_some_and(|(_, d)| complete(d));
        let missing: Vec<NodeId> = others
            .iter()
            .filter(|m| {
                let has = lead.reports.get(*m).is_some_and(|(_, r)| complete(r));
                // Without the disk's record, ask everybody: the owner answers with it.
                !has || !disk_ok
            })
            .cloned()
            .collect();
        if missing.is_empty() && disk_ok {
            self.choose(out);
            return true;
        }
        let key = (false, have, None);
        if let Some(l) = self.lead.as_mut() {
            l.waiting = missing.iter().cloned().collect();
        }
        for m in missing {
            if self.due(&m, key, now) {
                self.mark_sent(&m, key, now);
                out.push(GumAction::Send {
                    to: m,
                    msg: GumMessage::Query { epoch, have },
                });
            }
        }
        if !disk_ok {
            self.disk_promise(out);
        }
        false
    }

    /// The sync's choice: the highest applied snapshot, and the pending update at the next
    /// sequence number with the highest epoch, accepted again under this epoch.
    fn choose(&mut self, out: &mut Vec<GumAction>) {
        let epoch = self.epoch();
        let Some(lead) = self.lead.as_mut() else {
            return;
        };
        let mut reports: Vec<(String, StateReport)> = lead
            .reports
            .iter()
            .map(|(n, (_, r))| (n.clone(), r.clone()))
            .collect();
        if let Some((_, d)) = &lead.disk {
            reports.push(("disk".into(), d.clone()));
        }
        lead.synced = true;
        lead.sent.clear();
        let best = reports
            .iter()
            .filter(|(_, r)| r.seq > self.snapshot.seq)
            .max_by_key(|(_, r)| r.seq)
            .and_then(|(_, r)| r.snapshot.clone());
        if let Some(s) = best {
            self.install(*s, out);
        }
        for (who, r) in &reports {
            if r.seq == self.snapshot.seq && r.checksum != self.checksum {
                out.push(GumAction::Event(GumEvent::Diverged {
                    node: who.clone(),
                    seq: r.seq,
                }));
            }
        }
        let next = self.snapshot.seq.checked_add(1);
        let chosen = reports
            .iter()
            .filter_map(|(_, r)| r.pending.as_ref())
            .chain(self.pending.as_ref())
            .filter(|p| Some(p.seq) == next)
            .max_by_key(|p| p.epoch)
            .cloned();
        let chosen = match chosen {
            Some(p) if self.snapshot.check_next(&p.update).is_err() => {
                // Proposed on top of this very snapshot by its first leader, so it applies;
                // one that does not was never applied anywhere either.
                out.push(GumAction::Event(GumEvent::Diverged {
                    node: format!("pending update {}", p.seq),
                    seq: p.seq,
                }));
                None
            }
            other => other,
        };
        let own_before = self.pending_key();
        self.pending = chosen.map(|p| Pending { epoch, ..p });
        if self.pending_key() != own_before {
            out.push(GumAction::Persist(GumPersisted {
                pending: self.pending.clone(),
            }));
        }
        // The caller of an update this node sequenced before keeps waiting only if the sync
        // completes that very proposal.
        let completes = |i: &Inflight, p: &Option<Pending>| {
            p.as_ref()
                .is_some_and(|p| p.seq == i.seq && p.origin == i.origin)
        };
        match self.inflight.take() {
            Some(i) if completes(&i, &self.pending) => self.inflight = Some(i),
            Some(i) => {
                if let Some(c) = i.caller {
                    self.reply(c, Err(GumError::InDoubt), out);
                }
            }
            None => {}
        }
        if self.inflight.is_none()
            && let Some(p) = &self.pending
        {
            self.inflight = Some(Inflight {
                seq: p.seq,
                origin: p.origin,
                caller: None,
            });
        }
        out.push(GumAction::Event(GumEvent::Synced {
            epoch,
            seq: self.snapshot.seq,
            completing: self.pending.as_ref().map(|p| p.seq),
        }));
        self.disk_duty(out);
    }

    fn target(&self) -> (u64, u64, Option<(u64, u64)>) {
        (self.snapshot.seq, self.checksum, self.pending_key())
    }

    /// Whether every member and (where it votes) the disk hold the leader's state.
    fn all_hold_target(&self) -> bool {
        let Some(lead) = &self.lead else {
            return false;
        };
        let target = self.target();
        let epoch = self.epoch();
        let members = self.others().iter().all(|m| {
            lead.reports
                .get(m)
                .is_some_and(|(_, r)| holds_target(r, target))
        });
        let disk = !self.uses_disk()
            || lead
                .disk
                .as_ref()
                .is_some_and(|(_, d)| matches_target(d, target, epoch));
        members && disk
    }

    fn commit(&mut self, out: &mut Vec<GumAction>) {
        let Some(p) = self.pending.clone() else {
            return;
        };
        let seq = p.seq;
        let origin = p.origin;
        self.apply_pending(p, out);
        if self.pending.is_some() {
            return;
        }
        out.push(GumAction::Event(GumEvent::Committed { seq }));
        if let Some(i) = self.inflight.take()
            && i.seq == seq
            && i.origin == origin
            && let Some(c) = i.caller
        {
            self.reply(c, Ok(seq), out);
        }
    }

    fn sequence(&mut self, out: &mut Vec<GumAction>) {
        let epoch = self.epoch();
        while let Some(q) = self.queue.pop_front() {
            if let Err(e) = self.snapshot.check_next(&q.update) {
                self.reply(q.caller, Err(GumError::Invalid(e)), out);
                continue;
            }
            let Some(seq) = self.snapshot.seq.checked_add(1) else {
                self.reply(q.caller, Err(GumError::Busy), out);
                continue;
            };
            self.pending = Some(Pending {
                seq,
                epoch,
                origin: epoch,
                update: q.update,
            });
            out.push(GumAction::Persist(GumPersisted {
                pending: self.pending.clone(),
            }));
            self.inflight = Some(Inflight {
                seq,
                origin: epoch,
                caller: Some(q.caller),
            });
            self.disk_duty(out);
            return;
        }
    }

    /// Sends every member that does not hold the leader's state what brings it there.
    fn drive(&mut self, now: Instant, out: &mut Vec<GumAction>) {
        let Some(lead) = self.lead.as_ref() else {
            return;
        };
        let epoch = self.epoch();
        let target = self.target();
        let key = (true, target.0, target.2);
        let disk_lags = self.uses_disk()
            && !lead
                .disk
                .as_ref()
                .is_some_and(|(_, d)| matches_target(d, target, epoch));
        let disk_owner = lead.disk.as_ref().map(|(n, _)| n.clone());
        let mut sends = Vec::new();
        let mut waiting = BTreeSet::new();
        for m in self.others() {
            let report = lead.reports.get(&m).map(|(_, r)| r);
            let holds = report.is_some_and(|r| holds_target(r, target));
            let owes_disk = disk_lags && disk_owner.as_ref().is_none_or(|o| *o == m);
            if holds && !owes_disk {
                continue;
            }
            waiting.insert(m.clone());
            if !self.due(&m, key, now) {
                continue;
            }
            let msg = match report {
                Some(r) if r.seq > self.snapshot.seq => {
                    // Only a bug puts a member ahead of the leader after the sync: sync again.
                    out.push(GumAction::Event(GumEvent::Diverged {
                        node: m.clone(),
                        seq: r.seq,
                    }));
                    if let Some(l) = self.lead.as_mut() {
                        l.synced = false;
                        l.sent.clear();
                    }
                    self.collect(now, out);
                    return;
                }
                Some(r)
                    if self.pending.is_none()
                        && r.seq.checked_add(1) == Some(self.snapshot.seq)
                        && r.pending_key() == Some((self.snapshot.seq, epoch)) =>
                {
                    GumMessage::Commit {
                        epoch,
                        seq: self.snapshot.seq,
                    }
                }
                Some(r)
                    if (r.seq == self.snapshot.seq
                        && r.checksum == self.checksum
                        && (self.pending.is_some() || r.pending.is_none()))
                        || (r.seq.checked_add(1) == Some(self.snapshot.seq)
                            && r.pending_key() == Some((self.snapshot.seq, epoch))) =>
                {
                    GumMessage::Prepare {
                        epoch,
                        base: None,
                        pending: self.pending.clone(),
                    }
                }
                _ => GumMessage::Prepare {
                    epoch,
                    base: Some(Box::new(self.snapshot.clone())),
                    pending: self.pending.clone(),
                },
            };
            sends.push((m, msg));
        }
        if let Some(l) = self.lead.as_mut() {
            l.waiting = waiting;
        }
        for (m, msg) in sends {
            self.mark_sent(&m, key, now);
            out.push(GumAction::Send { to: m, msg });
        }
        if disk_lags && disk_owner.as_ref() == Some(&self.me) {
            self.disk_duty(out);
        }
    }
}

/// Whether the member's state `r` is exactly `(seq, checksum, pending)`.
fn holds_target(r: &StateReport, target: (u64, u64, Option<(u64, u64)>)) -> bool {
    let (seq, checksum, pending) = target;
    r.seq == seq && r.checksum == checksum && r.pending_key() == pending
}

/// Whether the disk's record `r` stands for `target`: the same state, or one commit behind it
/// with the committed update accepted in this epoch (only this epoch's leader proposes under
/// it, so that update is the one the leader applied; a sync completes it, so the disk is not
/// rewritten for every commit).
fn matches_target(r: &StateReport, target: (u64, u64, Option<(u64, u64)>), epoch: u64) -> bool {
    let (seq, _, pending) = target;
    holds_target(r, target)
        || (pending.is_none()
            && r.seq.checked_add(1) == Some(seq)
            && r.pending_key() == Some((seq, epoch)))
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
