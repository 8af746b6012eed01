//! Cluster membership as a sans-IO state machine: heartbeats on every network, failure
//! suspicion, the regroup that agrees on one view (epoch + member set), planned leave, pause,
//! and the verdict whether this node may act.
//!
//! It never touches a socket, a disk or a clock: time comes in with every input, effects go out
//! as [`Action`]s (send, persist, publish an epoch on the quorum disk, act or stop acting).
//!
//! ```text
//!            (now, Input)                              Action
//!  actor ─────────────────────► Membership ───────────────────────► actor: send on a network,
//!    ▲  heartbeats, messages,       │                                persist, report a view,
//!    │  disk lease status           │                                act / stop acting,
//!    └──── timer at next_deadline() ◄┘                                want / publish on the disk
//! ```
//!
//! # Protocol
//!
//! **Heartbeats.** Every `heartbeat_interval` each node sends every other configured node a
//! heartbeat on every network. It carries the sender's clock stamp and *echoes* the stamp of
//! the newest heartbeat it heard from the receiver on that network, so each node measures, on
//! its own clock only, when a peer last heard it. A peer is *reachable* when, on some network,
//! it was heard and it echoed within `suspect_after` (= `miss_threshold` × interval). A
//! member that is not reachable is *suspected* and starts a regroup; a network that is stale
//! for one peer while another network works raises [`Event::LinkDown`] and nothing else.
//!
//! **Regroup.** The *coordinator* is the lowest-named node among this node and the peers it
//! reaches. It asks every node it reaches for a report (`Collect`); a report carries the
//! node's reachable set, the coordinator it follows, its last committed view and the highest
//! epoch it accepted. From the reports of the nodes that follow it, the coordinator builds the
//! connectivity matrix (an edge needs both ends to report each other) and picks the maximal
//! fully connected set that contains itself with the most votes, then the most nodes, then the
//! most continuing members of the newest view (the *basis*), then the lexicographically
//! smallest names. Without quorum it proposes nothing (and retries after `retry_interval`). A
//! coordinator that is joining (no continuing member of the basis) also proposes nothing while
//! its set leaves out a member of the basis that a participant still reaches, for at most
//! `JOIN_WAIT_SUSPECT_PERIODS` × `suspect_after` ([`Event::JoinDeferred`]): a node that
//! restarts must not remove a healthy member whose link to it is not up yet. Otherwise it
//! proposes view `e` = 1 + every epoch any participant accepted; members accept only from the
//! node they consider coordinator and only an epoch above every epoch they accepted (persisted
//! before they answer); the coordinator commits when all members accepted and tells them.
//! Timeouts restart the regroup with a new round.
//!
//! **Why views are unique.** A view commits only with the acceptance of all its members and
//! only with quorum. Two quorums of nodes share a node, and a node accepts each epoch once. When
//! a view counts the disk's vote, its disk owner first publishes the epoch in its lease slot;
//! a new owner reads every slot when it takes the disk over and never accepts an epoch at or
//! below what it read. So no epoch commits twice with different members.
//!
//! **Same history.** Every view names its predecessor (`prev`) and, per member, the epoch it
//! joined at (`joined`). A member continues only if its last committed view is the predecessor
//! (or the predecessor's predecessor: the proposal carries the newest committed view, which the
//! member installs first); any other member joins anew. So all members of a view saw the same
//! chain of views since the later of their join epochs.
//!
//! **Acting.** A node acts only while (1) it is a member of its committed view, which holds
//! quorum (the disk's vote while a member's lease is known valid), (2) every other member
//! *vouches* for it in that same view: an echo carrying the member's vouch for this epoch is
//! younger than `suspect_after - acting_margin` (so after a view change a node acts again once
//! every member committed the view), and (3) its *fence* has passed. A node stops vouching for a peer as soon as
//! it accepts a view without that peer, and the view's fence is set past the last moment that
//! peer could still act on an earlier vouch. So a node that was removed has stopped acting
//! before anybody acts in the view that removed it.
//!
//! **Planned leave.** A leaving node stops acting, tells the members, and flags its heartbeats;
//! it is never suspected, and the coordinator removes it with a view change that skips the
//! collect round ([`Event::PlannedLeave`], no [`Event::RegroupStarted`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::quorum::Votes;

/// A node's name (the transport's node name; names order the coordinator election).
pub type NodeId = String;
/// A network's name, as configured.
pub type NetworkId = String;

/// Default of [`MembershipConfig::heartbeat_interval`].
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Default of [`MembershipConfig::miss_threshold`]: with the default interval a dead node is
/// suspected after half a second.
pub const DEFAULT_MISS_THRESHOLD: u32 = 5;
/// Default of [`MembershipConfig::link_miss_threshold`].
pub const DEFAULT_LINK_MISS_THRESHOLD: u32 = 3;
/// Default of [`MembershipConfig::acting_margin`].
pub const DEFAULT_ACTING_MARGIN: Duration = Duration::from_millis(100);
/// Default of [`MembershipConfig::round_timeout`].
pub const DEFAULT_ROUND_TIMEOUT: Duration = Duration::from_millis(250);
/// Default of [`MembershipConfig::retry_interval`].
/// (= the round timeout: a round that found no quorum, often because a survivor still followed
/// a coordinator that had just died, is tried again as soon as a round may be.)
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_millis(250);
/// Default of [`MembershipConfig::leave_timeout`].
pub const DEFAULT_LEAVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most nodes a cluster may have (connectivity sets are 64-bit masks).
pub const MAX_NODES: usize = 64;
/// The most networks a node may have.
pub const MAX_NETWORKS: usize = 8;
/// The fewest heartbeats a node may miss before it is suspected: one lost heartbeat must never
/// cost a regroup.
pub const MIN_MISS_THRESHOLD: u32 = 3;
/// The most pause/resume requests a node keeps before it has been able to apply them.
const MAX_PENDING_REQUESTS: usize = 64;
/// Accepted-but-uncommitted views remembered for vouching (older ones are merged).
const MAX_ACCEPTED_LOG: usize = 32;
/// Rounds of different coordinators are told apart by the incarnation in their high bits.
const ROUND_INCARNATION_SHIFT: u32 = 24;
/// How long (in `suspect_after` periods) a joining coordinator waits for a member of the
/// current view that a participant still reaches before it may form a view without it. It
/// covers the member's link to the joiner coming up (watchd's transport redials at once when
/// the joiner connects in, but a connect begun while the joiner's host was down takes up to
/// its one-second timeout), heartbeats both ways, and the next round. A dead member is no
/// longer reported reachable after one `suspect_after`, so this bounds only how long a joiner
/// stays out when a live member keeps failing to reach it.
const JOIN_WAIT_SUSPECT_PERIODS: u32 = 4;

/// One agreed membership: an epoch and its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Unique per committed view, increasing along the history.
    pub epoch: u64,
    /// The epoch of the view this one follows (0 for the first).
    pub prev: u64,
    /// The members.
    pub members: BTreeSet<NodeId>,
    /// Members that may own no groups.
    pub paused: BTreeSet<NodeId>,
    /// Per member, the epoch since which it has been a member without a gap.
    pub joined: BTreeMap<NodeId, u64>,
}

impl View {
    /// Checks what a peer sent: members known, joined complete and not in the future.
    fn check(&self, nodes: &BTreeSet<NodeId>) -> Result<(), &'static str> {
        if self.epoch == 0 || self.prev >= self.epoch {
            return Err("view epochs out of order");
        }
        if self.members.is_empty() || !self.members.is_subset(nodes) {
            return Err("view has unknown or no members");
        }
        if !self.paused.is_subset(&self.members) {
            return Err("view pauses a non-member");
        }
        if self.joined.len() != self.members.len()
            || self
                .joined
                .iter()
                .any(|(n, e)| !self.members.contains(n) || *e > self.epoch)
        {
            return Err("view's join epochs do not match its members");
        }
        Ok(())
    }
}

/// What must survive a restart of this node (the actor writes it durably before it performs
/// any later action of the same batch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    /// The highest epoch this node accepted: it never accepts that epoch or a lower one again.
    pub accepted: u64,
    /// The newest view this node committed.
    pub committed: Option<View>,
}

/// A node's state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Alive but not (yet) a member of the committed view.
    Joining,
    /// A member.
    Online,
    /// A member that may own no groups.
    Paused,
    /// Not a member and not reachable.
    Offline,
}

/// The echo of a heartbeat: the stamp the receiver put on its newest heartbeat heard here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The incarnation of the node whose stamp this is.
    pub incarnation: u64,
    /// Its stamp (microseconds on its own clock).
    pub sent_us: u64,
}

/// A heartbeat, sent on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's incarnation (grows with every start of the sender).
    pub incarnation: u64,
    /// The sender's clock stamp, microseconds.
    pub sent_us: u64,
    /// The receiver's newest stamp the sender heard on this network.
    pub echo: Option<Echo>,
    /// The sender vouches that the receiver may keep acting in view `epoch` (see the module
    /// doc).
    pub vouch: bool,
    /// The sender's committed epoch.
    pub epoch: u64,
    /// The sender is leaving the cluster.
    pub leaving: bool,
    /// The sender owns the quorum disk for this long after its stamp (microseconds).
    pub disk_us: Option<u64>,
}

/// A pause or resume of a member, asked by an operator on any node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRequest {
    /// Per requesting node, increasing.
    pub seq: u64,
    /// The member.
    pub node: NodeId,
    /// Pause (true) or resume.
    pub paused: bool,
}

/// A node's answer to `Collect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The round being answered.
    pub round: u64,
    /// The node the reporter considers coordinator.
    pub follows: NodeId,
    /// The nodes the reporter reaches.
    pub reachable: BTreeSet<NodeId>,
    /// Its last committed view.
    pub committed: Option<View>,
    /// False after a restart until it committed a view again.
    pub continuing: bool,
    /// The highest epoch it accepted.
    pub accepted: u64,
    /// It owns the quorum disk.
    pub disk: bool,
    /// It is leaving.
    pub leaving: bool,
    /// Its operators' pause requests not yet applied.
    pub requests: Vec<PauseRequest>,
}

/// The coordinator's proposal of a view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The round.
    pub round: u64,
    /// The proposed view.
    pub view: View,
    /// The newest committed view any participant knows: members one commit behind install it
    /// first.
    pub basis: Option<View>,
    /// The member whose disk vote the view needs; it publishes the epoch before accepting.
    pub disk_holder: Option<NodeId>,
    /// Per requester, the highest pause request applied.
    pub applied: BTreeMap<NodeId, u64>,
}

/// The membership protocol's messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Liveness, on every network.
    Heartbeat(Heartbeat),
    /// Asks the coordinator for a regroup.
    RegroupRequest,
    /// The coordinator asks for a report.
    Collect {
        /// The round.
        round: u64,
    },
    /// The answer to `Collect`.
    Report(Box<Report>),
    /// A proposed view.
    Propose(Box<Proposal>),
    /// A member accepted the proposal.
    Accept {
        /// The round.
        round: u64,
        /// The accepted epoch.
        epoch: u64,
        /// How long after now the member's fence lasts, microseconds.
        fence_us: u64,
    },
    /// A member refused the proposal.
    Reject {
        /// The round.
        round: u64,
        /// The member's highest accepted epoch.
        accepted: u64,
    },
    /// The proposal committed.
    Commit {
        /// The round.
        round: u64,
        /// The committed epoch.
        epoch: u64,
        /// How long after now the view's fence lasts, microseconds.
        fence_us: u64,
    },
    /// The round ended without a new view; `basis` is the current view, for members that
    /// missed its commit.
    Done {
        /// The round.
        round: u64,
        /// The view that stays.
        basis: Option<View>,
    },
    /// The sender leaves the cluster on purpose.
    Leave,
}

/// Why a regroup runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegroupReason {
    /// A member is not reachable.
    Unreachable(NodeId),
    /// A node that is not a member is reachable.
    Joining(NodeId),
    /// A member restarted.
    Restarted(NodeId),
    /// A member committed a newer view this node missed.
    NewerView(NodeId),
    /// An accepted proposal was not committed in time.
    CommitTimeout,
    /// Operators asked for pause or resume.
    PauseRequest,
    /// This node has no view to continue (first start or restart).
    Rejoin,
    /// Another node asked for it.
    Requested(NodeId),
    /// A member leaves.
    Leaving(NodeId),
}

/// What the actor reports (log, `ftctl cluster events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// A member stopped answering on every network.
    Suspected {
        /// The member.
        node: NodeId,
    },
    /// A peer came back with a new incarnation.
    NodeRestarted {
        /// The peer.
        node: NodeId,
    },
    /// One network to a peer stopped working while another still works.
    LinkDown {
        /// The peer.
        node: NodeId,
        /// The network.
        network: NetworkId,
    },
    /// That network works again.
    LinkUp {
        /// The peer.
        node: NodeId,
        /// The network.
        network: NetworkId,
    },
    /// This node coordinates a regroup.
    RegroupStarted {
        /// The round.
        round: u64,
        /// Why.
        reasons: Vec<RegroupReason>,
    },
    /// The regroup found no partition with quorum.
    NoQuorum {
        /// The round.
        round: u64,
        /// The nodes this node reaches.
        reachable: BTreeSet<NodeId>,
    },
    /// This joining node coordinated a round that would have left out members of the current
    /// view that a participant still reaches; it waits for them to answer it (for a bounded
    /// time) instead of removing healthy members.
    JoinDeferred {
        /// The round.
        round: u64,
        /// The members it waits for.
        waiting_for: BTreeSet<NodeId>,
    },
    /// A member announced that it leaves; it is removed without a regroup.
    PlannedLeave {
        /// The member.
        node: NodeId,
    },
    /// A message was dropped.
    Ignored {
        /// The sender.
        from: NodeId,
        /// Why.
        why: String,
    },
}

/// What happens to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The time of [`Membership::next_deadline`] came (or any other wakeup).
    Tick,
    /// A message from a peer (`network`: the network it came on, for heartbeats).
    Message {
        /// The peer, as authenticated by the transport.
        from: NodeId,
        /// The network, when known.
        network: Option<NetworkId>,
        /// The message.
        msg: Message,
    },
    /// The operator wants this node out of the cluster.
    Leave,
    /// The operator pauses or resumes a member.
    SetPaused {
        /// The member.
        node: NodeId,
        /// Pause or resume.
        paused: bool,
    },
    /// The quorum disk lease changed: this node owns the disk until `valid_until` (its
    /// stop-acting bound), and `max_epoch` is the highest epoch read from the disk.
    DiskLease {
        /// The end of this node's ownership, if it owns the disk.
        valid_until: Option<Instant>,
        /// The highest epoch published on the disk by anyone.
        max_epoch: u64,
    },
    /// The epoch asked for by [`Action::PublishEpoch`] is on the disk.
    EpochPublished {
        /// The epoch.
        epoch: u64,
    },
}

/// What the actor must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `msg` to `to`, on `network` (heartbeats) or on any network that works.
    Send {
        /// The peer.
        to: NodeId,
        /// The network, or `None` for any.
        network: Option<NetworkId>,
        /// The message.
        msg: Message,
    },
    /// Write this durably before performing the actions after it.
    Persist(Persisted),
    /// This node installed `View` (in order; each view once).
    Committed(View),
    /// This node may act (true) or must stop acting at once (false).
    Acting(bool),
    /// This node wants (true) or gives up (false) the quorum disk.
    WantDisk(bool),
    /// Write this epoch into this node's lease slot, then report [`Input::EpochPublished`].
    PublishEpoch(u64),
    /// Something to report.
    Event(Event),
    /// The planned leave is complete: this node is out and the machine is inert.
    Left,
}

/// Errors of the membership configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// A field of the configuration is invalid.
    #[error("membership configuration: {field}: {why}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// Why.
        why: String,
    },
}

fn invalid(field: &'static str, why: impl Into<String>) -> MembershipError {
    MembershipError::InvalidConfig {
        field,
        why: why.into(),
    }
}

/// The rules' parameters. Every node of a cluster should use the same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Every configured node, this one included; each holds a vote.
    pub nodes: BTreeSet<NodeId>,
    /// This node's networks, in order of preference.
    pub networks: Vec<NetworkId>,
    /// Whether a quorum disk holds a vote.
    pub quorum_disk: bool,
    /// How often heartbeats go out on each network.
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals without two-way contact on every network before a member is
    /// suspected.
    pub miss_threshold: u32,
    /// Heartbeat intervals without two-way contact on one network (while another works)
    /// before [`Event::LinkDown`].
    pub link_miss_threshold: u32,
    /// A node stops acting this long before a peer could suspect it: covers a late timer.
    pub acting_margin: Duration,
    /// How long the coordinator waits for reports or acceptances, and a member for the
    /// commit of a view it accepted.
    pub round_timeout: Duration,
    /// The pause after a regroup that changed nothing or found no quorum.
    pub retry_interval: Duration,
    /// How long a leaving node waits for the view without it before it goes anyway.
    pub leave_timeout: Duration,
}

impl MembershipConfig {
    /// A configuration with the default timings.
    pub fn new(
        nodes: impl IntoIterator<Item = NodeId>,
        networks: impl IntoIterator<Item = NetworkId>,
        quorum_disk: bool,
    ) -> MembershipConfig {
        MembershipConfig {
            nodes: nodes.into_iter().collect(),
            networks: networks.into_iter().collect(),
            quorum_disk,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            miss_threshold: DEFAULT_MISS_THRESHOLD,
            link_miss_threshold: DEFAULT_LINK_MISS_THRESHOLD,
            acting_margin: DEFAULT_ACTING_MARGIN,
            round_timeout: DEFAULT_ROUND_TIMEOUT,
            retry_interval: DEFAULT_RETRY_INTERVAL,
            leave_timeout: DEFAULT_LEAVE_TIMEOUT,
        }
    }

    /// How long a member may be silent before it is suspected.
    pub fn suspect_after(&self) -> Duration {
        self.heartbeat_interval.saturating_mul(self.miss_threshold)
    }

    /// How long one network to a peer may be silent before [`Event::LinkDown`].
    pub fn link_down_after(&self) -> Duration {
        self.heartbeat_interval
            .saturating_mul(self.link_miss_threshold)
    }

    /// Checks every field and the relations between the timings, for node `me`.
    pub fn validate(&self, me: &str) -> Result<(), MembershipError> {
        if self.nodes.is_empty() || self.nodes.len() > MAX_NODES {
            return Err(invalid(
                "nodes",
                format!("{} nodes; 1 to {MAX_NODES} are supported", self.nodes.len()),
            ));
        }
        for n in &self.nodes {
            name_ok("nodes", n)?;
        }
        if !self.nodes.contains(me) {
            return Err(invalid("nodes", format!("this node {me:?} is not listed")));
        }
        if self.networks.is_empty() || self.networks.len() > MAX_NETWORKS {
            return Err(invalid(
                "networks",
                format!(
                    "{} networks; 1 to {MAX_NETWORKS} are supported",
                    self.networks.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for n in &self.networks {
            name_ok("networks", n)?;
            if !seen.insert(n) {
                return Err(invalid("networks", format!("{n:?} is listed twice")));
            }
        }
        if self.heartbeat_interval < Duration::from_millis(1) {
            return Err(invalid("heartbeat_interval", "must be at least 1ms"));
        }
        if self.miss_threshold < MIN_MISS_THRESHOLD {
            return Err(invalid(
                "miss_threshold",
                format!(
                    "must be at least {MIN_MISS_THRESHOLD}: one lost heartbeat must not cost a regroup"
                ),
            ));
        }
        if self.link_miss_threshold == 0 || self.link_miss_threshold >= self.miss_threshold {
            return Err(invalid(
                "link_miss_threshold",
                "must be at least 1 and below miss_threshold: a network is reported down before its node",
            ));
        }
        let w = self.suspect_after();
        if self.acting_margin.is_zero() {
            return Err(invalid(
                "acting_margin",
                "must be longer than zero: a late timer would let a removed node act",
            ));
        }
        if w.saturating_sub(self.acting_margin) < self.heartbeat_interval.saturating_mul(2) {
            return Err(invalid(
                "acting_margin",
                format!(
                    "suspect_after ({w:?}) minus acting_margin ({:?}) must leave at least two heartbeat intervals, or one late heartbeat stops the node",
                    self.acting_margin
                ),
            ));
        }
        if self.round_timeout < self.heartbeat_interval {
            return Err(invalid(
                "round_timeout",
                "must be at least one heartbeat interval",
            ));
        }
        if self.retry_interval < self.round_timeout {
            return Err(invalid("retry_interval", "must be at least round_timeout"));
        }
        if self.leave_timeout < self.round_timeout.saturating_mul(2) {
            return Err(invalid(
                "leave_timeout",
                "must be at least two round timeouts",
            ));
        }
        Ok(())
    }
}

fn name_ok(field: &'static str, name: &str) -> Result<(), MembershipError> {
    if name.is_empty()
        || name.len() > crate::net::MAX_NAME_LEN
        || name.chars().any(char::is_control)
    {
        return Err(invalid(
            field,
            format!("{name:?} is not a valid name (1 to 255 bytes, no control characters)"),
        ));
    }
    Ok(())
}

/// One network to one peer.
#[derive(Debug, Clone, Default)]
struct Link {
    /// When a heartbeat of the peer's current incarnation last arrived on it.
    heard: Option<Instant>,
    /// The newest stamp of the peer heard on it (echoed back).
    peer_stamp: Option<u64>,
    /// When that heartbeat arrived.
    peer_stamp_at: Option<Instant>,
    /// Our newest send time the peer echoed on it.
    echo: Option<Instant>,
    /// LinkDown was reported.
    down: bool,
    /// The link worked at least once (a link that never came up is not reported down).
    was_up: bool,
}

#[derive(Debug, Clone, Default)]
struct Peer {
    incarnation: Option<u64>,
    links: Vec<Link>,
    /// Our newest send time the peer echoed with its vouch for view `vouched_epoch`.
    vouched: Option<Instant>,
    vouched_epoch: u64,
    /// The peer owns the quorum disk at least until then (our clock).
    disk_until: Option<Instant>,
    /// Arrival of the newest heartbeat of the peer whose stamp we echoed with our vouch.
    vouched_arrival: Option<Instant>,
    /// The peer's committed epoch.
    epoch: u64,
    leaving: bool,
    /// When this node learned of the leave.
    leaving_at: Option<Instant>,
    /// Suspected was reported.
    suspected: bool,
}

#[derive(Debug, Clone)]
enum Coord {
    Idle,
    Collecting {
        round: u64,
        deadline: Instant,
        expected: BTreeSet<NodeId>,
        reports: BTreeMap<NodeId, Report>,
    },
    Proposing {
        round: u64,
        deadline: Instant,
        proposal: Box<Proposal>,
        awaiting: BTreeSet<NodeId>,
        fence: Instant,
    },
}

#[derive(Debug, Clone)]
struct Pending {
    proposal: Proposal,
    coordinator: NodeId,
    deadline: Instant,
    /// The acceptance waits for the epoch to be on the disk.
    publishing: bool,
}

/// The membership state machine of one node.
#[derive(Debug)]
pub struct Membership {
    cfg: MembershipConfig,
    votes: Votes,
    me: NodeId,
    incarnation: u64,
    /// Stamps are microseconds since this instant.
    base: Instant,
    peers: BTreeMap<NodeId, Peer>,
    accepted: u64,
    committed: Option<View>,
    /// A view was committed since the last start.
    continuing: bool,
    /// Proposals accepted since the last commit: (epoch, members), for vouching.
    accepted_log: Vec<(u64, BTreeSet<NodeId>)>,
    /// Peers this node vouches for.
    vouching: BTreeSet<NodeId>,
    /// This node may not act before this.
    fence_until: Option<Instant>,
    pending: Option<Pending>,
    coord: Coord,
    next_round: u64,
    quiet_until: Option<Instant>,
    /// Nodes the last round found no quorum without because they still followed another
    /// coordinator: a regroup request from one of them (it now follows this node) ends the
    /// pause between rounds, as the next round may find quorum with it.
    followed_another: BTreeSet<NodeId>,
    /// Since when this joining coordinator has deferred a view that would leave out members of
    /// the current view that a participant still reaches.
    join_wait_since: Option<Instant>,
    requested_by: BTreeSet<NodeId>,
    last_request: Option<Instant>,
    restarted: BTreeSet<NodeId>,
    requests: Vec<PauseRequest>,
    next_request_seq: u64,
    next_heartbeat: Instant,
    /// Send heartbeats at the next evaluation, whatever the schedule.
    heartbeat_now: bool,
    disk_until: Option<Instant>,
    disk_max_epoch: u64,
    leaving_since: Option<Instant>,
    left: bool,
    acting: bool,
    /// This run of the node has acted at least once (before, it runs nothing: no run lease).
    acted: bool,
    want_disk: bool,
}

impl Membership {
    /// The machine of node `me`, started at `now`. `incarnation` must grow with every start
    /// of this node (a persisted counter or the wall clock); `persisted` is what the last
    /// [`Action::Persist`] wrote. The configuration must have passed
    /// [`MembershipConfig::validate`].
    pub fn new(
        cfg: MembershipConfig,
        me: impl Into<NodeId>,
        incarnation: u64,
        persisted: Persisted,
        now: Instant,
    ) -> Result<Membership, MembershipError> {
        let me = me.into();
        cfg.validate(&me)?;
        let peers = cfg
            .nodes
            .iter()
            .filter(|n| **n != me)
            .map(|n| {
                (
                    n.clone(),
                    Peer {
                        links: vec![Link::default(); cfg.networks.len()],
                        ..Peer::default()
                    },
                )
            })
            .collect();
        let committed = persisted.committed.filter(|v| v.check(&cfg.nodes).is_ok());
        let accepted = persisted
            .accepted
            .max(committed.as_ref().map_or(0, |v| v.epoch));
        Ok(Membership {
            votes: Votes::new(cfg.nodes.iter().cloned(), cfg.quorum_disk),
            me,
            incarnation,
            base: now,
            peers,
            accepted,
            committed,
            continuing: false,
            accepted_log: Vec::new(),
            vouching: BTreeSet::new(),
            fence_until: None,
            pending: None,
            coord: Coord::Idle,
            next_round: incarnation.wrapping_shl(ROUND_INCARNATION_SHIFT),
            quiet_until: None,
            followed_another: BTreeSet::new(),
            join_wait_since: None,
            requested_by: BTreeSet::new(),
            last_request: None,
            restarted: BTreeSet::new(),
            requests: Vec::new(),
            next_request_seq: 1,
            next_heartbeat: now,
            heartbeat_now: false,
            disk_until: None,
            disk_max_epoch: 0,
            leaving_since: None,
            left: false,
            acting: false,
            acted: false,
            want_disk: false,
            cfg,
        })
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The configuration.
    pub fn config(&self) -> &MembershipConfig {
        &self.cfg
    }

    /// The last committed view.
    pub fn view(&self) -> Option<&View> {
        self.committed.as_ref()
    }

    /// The highest accepted epoch.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Whether the planned leave completed.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The peers this node reaches now (heard and echoed within `suspect_after` on some
    /// network).
    pub fn reachable(&self, now: Instant) -> BTreeSet<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| self.peer_reachable(p, now))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The node this node considers coordinator: the lowest-named of itself and the
    /// reachable peers that are not leaving.
    pub fn coordinator(&self, now: Instant) -> NodeId {
        self.peers
            .iter()
            .filter(|(_, p)| !p.leaving && self.peer_reachable(p, now))
            .map(|(n, _)| n)
            .chain(std::iter::once(&self.me))
            .min()
            .cloned()
            .unwrap_or_else(|| self.me.clone())
    }

    /// Every configured node's state as this node sees it.
    pub fn node_states(&self, now: Instant) -> BTreeMap<NodeId, NodeState> {
        let view = self.committed.as_ref();
        self.cfg
            .nodes
            .iter()
            .map(|n| {
                let member = view.is_some_and(|v| v.members.contains(n))
                    && (n != &self.me || (self.continuing && self.leaving_since.is_none()));
                let paused = view.is_some_and(|v| v.paused.contains(n));
                let alive = (n == &self.me && !self.left)
                    || self
                        .peers
                        .get(n)
                        .is_some_and(|p| self.peer_reachable(p, now));
                let state = match (member, paused, alive) {
                    (true, true, _) => NodeState::Paused,
                    (true, false, _) => NodeState::Online,
                    (false, _, true) => NodeState::Joining,
                    (false, _, false) => NodeState::Offline,
                };
                (n.clone(), state)
            })
            .collect()
    }

    /// The node known to own the quorum disk now: this one while its lease is valid, else a
    /// peer whose latest heartbeat said it owns the disk (for status reports).
    pub fn disk_holder(&self, now: Instant) -> Option<NodeId> {
        self.disk_owner(now, &self.cfg.nodes)
    }

    /// Whether this node may act now (see the module doc). The actor acts on
    /// [`Action::Acting`]; this is the same verdict, for status and tests.
    pub fn is_acting(&self, now: Instant) -> bool {
        self.acting_until(now).is_some()
    }

    /// When the machine next needs a [`Input::Tick`].
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.left {
            return None;
        }
        let w = self.cfg.suspect_after();
        let lw = self.cfg.link_down_after();
        let mut times: Vec<Option<Instant>> = vec![Some(self.next_heartbeat)];
        for p in self.peers.values() {
            for l in &p.links {
                for t in [l.heard, l.echo] {
                    times.push(t.and_then(|t| t.checked_add(w)));
                    times.push(t.and_then(|t| t.checked_add(lw)));
                }
            }
            times.push(p.disk_until);
        }
        if let Some(until) = self.acting_until(now) {
            times.push(Some(until));
        }
        times.push(self.fence_until);
        times.push(self.disk_until);
        times.push(self.quiet_until);
        times.push(
            self.last_request
                .and_then(|t| t.checked_add(self.cfg.round_timeout)),
        );
        times.push(self.pending.as_ref().map(|p| p.deadline));
        times.push(
            self.leaving_since
                .and_then(|t| t.checked_add(self.cfg.leave_timeout)),
        );
        match &self.coord {
            Coord::Idle => {}
            Coord::Collecting { deadline, .. } | Coord::Proposing { deadline, .. } => {
                times.push(Some(*deadline));
            }
        }
        times.into_iter().flatten().filter(|t| *t > now).min()
    }

    /// Feeds one input and returns what to do.
    pub fn step(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.left {
            return out;
        }
        match input {
            Input::Tick => {}
            Input::Message { from, network, msg } => {
                self.on_message(now, from, network, msg, &mut out);
            }
            Input::Leave => self.on_leave(now, &mut out),
            Input::SetPaused { node, paused } => {
                if self.cfg.nodes.contains(&node) {
                    self.requests.push(PauseRequest {
                        seq: self.next_request_seq,
                        node,
                        paused,
                    });
                    self.next_request_seq += 1;
                    if self.requests.len() > MAX_PENDING_REQUESTS {
                        self.requests.remove(0);
                    }
                }
            }
            Input::DiskLease {
                valid_until,
                max_epoch,
            } => {
                let gained = valid_until.is_some_and(|u| u > now)
                    && self.disk_until.is_none_or(|u| u <= now);
                self.disk_until = valid_until;
                if gained {
                    // The disk's vote arrived: a round that found no quorum may find one now,
                    // so the pause between rounds (a rate limit only) ends here.
                    self.quiet_until = None;
                }
                self.disk_max_epoch = self.disk_max_epoch.max(max_epoch);
                if max_epoch > self.accepted {
                    // A view published by an earlier owner may have committed with that
                    // epoch: never accept it or a lower one.
                    self.accepted = max_epoch;
                    out.push(Action::Persist(self.persisted()));
                }
            }
            Input::EpochPublished { epoch } => self.on_published(now, epoch, &mut out),
        }
        if !self.left {
            self.evaluate(now, &mut out);
        }
        out
    }

    fn persisted(&self) -> Persisted {
        Persisted {
            accepted: self.accepted,
            committed: self.committed.clone(),
        }
    }

    fn stamp(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    fn stamp_instant(&self, us: u64) -> Option<Instant> {
        self.base.checked_add(Duration::from_micros(us))
    }

    fn peer_reachable(&self, p: &Peer, now: Instant) -> bool {
        let w = self.cfg.suspect_after();
        p.links
            .iter()
            .any(|l| fresh(l.heard, now, w) && fresh(l.echo, now, w))
    }

    fn own_disk_valid(&self, now: Instant) -> bool {
        self.disk_until.is_some_and(|t| now < t)
    }

    /// The member (or this node) known to own the disk now.
    fn disk_owner(&self, now: Instant, members: &BTreeSet<NodeId>) -> Option<NodeId> {
        if self.own_disk_valid(now) {
            return Some(self.me.clone());
        }
        self.peers
            .iter()
            .find(|(n, p)| members.contains(*n) && p.disk_until.is_some_and(|t| now < t))
            .map(|(n, _)| n.clone())
    }

    /// `Some(until)` while this node may act: the earliest instant at which one of the
    /// conditions lapses.
    fn acting_until(&self, now: Instant) -> Option<Instant> {
        if self.left || self.leaving_since.is_some() || !self.continuing {
            return None;
        }
        let view = self.committed.as_ref()?;
        if !view.members.contains(&self.me) || self.fence_until.is_some_and(|f| now < f) {
            return None;
        }
        let keep = self
            .cfg
            .suspect_after()
            .saturating_sub(self.cfg.acting_margin);
        let mut until: Option<Instant> = None;
        let mut tighten = |t: Option<Instant>| {
            if let Some(t) = t {
                until = Some(until.map_or(t, |u| u.min(t)));
            }
        };
        for m in view.members.iter().filter(|m| **m != self.me) {
            let p = self.peers.get(m)?;
            // A vouch counts only for the view its giver committed: a node must not act in an
            // older view on the strength of a vouch for a newer one.
            if p.vouched_epoch != view.epoch {
                return None;
            }
            let end = p.vouched?.checked_add(keep)?;
            if now >= end {
                return None;
            }
            tighten(Some(end));
        }
        if !self.votes.has_quorum_of(&view.members, None) {
            let owner = self.disk_owner(now, &view.members)?;
            let end = if owner == self.me {
                self.disk_until
            } else {
                self.peers.get(&owner).and_then(|p| p.disk_until)
            };
            tighten(end);
        }
        Some(until.unwrap_or(far_future(now)))
    }

    /// Until when this node may keep running what it already runs while it does not act (a
    /// view change in progress): the run lease. It holds while this node and the peers whose
    /// vouch for it (for any view) is younger than `suspect_after - acting_margin` hold a
    /// quorum of votes (the disk's vote while this node's disk lease is valid, or that of a
    /// vouching peer known to own the disk).
    ///
    /// Why a view without this node never acts while the lease holds: a member of such a view
    /// stopped vouching for this node when it accepted the view, and the view's fence lasts
    /// `suspect_after` past the arrival of the last heartbeat of this node it vouched for
    /// (the maximum over every member), while the vouch it gave lapses here `acting_margin`
    /// sooner, counted from the earlier send. So once anybody acts in that view, every one of
    /// its members' vouches has lapsed here; the view holds a quorum, so the vouchers left
    /// cannot. Clock rates may differ by up to `acting_margin / suspect_after`.
    ///
    /// `None` when the lease has lapsed, when this run of the node never acted (it runs
    /// nothing; vouches for an earlier view it rejoins prove nothing about the view without
    /// it), or when it left or is leaving (the members remove a leaving node without a fence).
    pub fn run_lease_until(&self, now: Instant) -> Option<Instant> {
        if self.left || self.leaving_since.is_some() || !self.acted {
            return None;
        }
        let keep = self
            .cfg
            .suspect_after()
            .saturating_sub(self.cfg.acting_margin);
        let mut ends: Vec<(Instant, Option<&NodeId>)> = Vec::new();
        for (name, p) in &self.peers {
            if let Some(end) = p.vouched.and_then(|v| v.checked_add(keep)) {
                ends.push((end, Some(name)));
                // A vouching peer that owns the disk brings the disk's vote for as long as
                // both hold.
                if let Some(disk) = p.disk_until {
                    ends.push((end.min(disk), None));
                }
            }
        }
        if let Some(disk) = self.disk_until {
            ends.push((disk, None));
        }
        ends.sort_by_key(|e| std::cmp::Reverse(e.0));
        // The latest instant at which the entries lasting at least that long hold quorum.
        let mut set: BTreeSet<NodeId> = BTreeSet::from([self.me.clone()]);
        let mut disk = false;
        if self.votes.has_quorum_of(&set, None) {
            return Some(far_future(now));
        }
        for (end, who) in ends {
            match who {
                Some(n) => {
                    set.insert(n.clone());
                }
                None => disk = true,
            }
            let owner = disk.then_some(self.me.as_str());
            if self.votes.has_quorum_of(&set, owner) {
                return (now < end).then_some(end);
            }
        }
        None
    }

    fn on_leave(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.leaving_since.is_some() {
            return;
        }
        let member = self.continuing
            && self
                .committed
                .as_ref()
                .is_some_and(|v| v.members.contains(&self.me));
        if !member {
            self.finish_leave(out);
            return;
        }
        self.leaving_since = Some(now);
        // Stop acting before anybody learns of the leave: the members remove this node
        // without waiting for a fence.
        if self.acting {
            self.acting = false;
            out.push(Action::Acting(false));
        }
        self.coord = Coord::Idle;
        self.pending = None;
        let others: Vec<NodeId> = self
            .committed
            .iter()
            .flat_map(|v| v.members.iter())
            .filter(|m| **m != self.me)
            .cloned()
            .collect();
        for m in others {
            out.push(Action::Send {
                to: m,
                network: None,
                msg: Message::Leave,
            });
        }
    }

    fn finish_leave(&mut self, out: &mut Vec<Action>) {
        if self.acting {
            self.acting = false;
            out.push(Action::Acting(false));
        }
        if self.want_disk {
            self.want_disk = false;
            out.push(Action::WantDisk(false));
        }
        self.left = true;
        out.push(Action::Left);
    }

    fn on_message(
        &mut self,
        now: Instant,
        from: NodeId,
        network: Option<NetworkId>,
        msg: Message,
        out: &mut Vec<Action>,
    ) {
        if from == self.me || !self.peers.contains_key(&from) {
            out.push(Action::Event(Event::Ignored {
                from,
                why: "not a configured peer".into(),
            }));
            return;
        }
        if let Err(why) = self.check_message(&msg) {
            out.push(Action::Event(Event::Ignored {
                from,
                why: why.into(),
            }));
            return;
        }
        if self.leaving_since.is_some()
            && !matches!(msg, Message::Heartbeat(_) | Message::Collect { .. })
        {
            return;
        }
        match msg {
            Message::Heartbeat(hb) => {
                let Some(net) =
                    network.and_then(|n| self.cfg.networks.iter().position(|x| *x == n))
                else {
                    out.push(Action::Event(Event::Ignored {
                        from,
                        why: "heartbeat on an unknown network".into(),
                    }));
                    return;
                };
                self.on_heartbeat(now, &from, net, &hb, out);
            }
            Message::RegroupRequest => {
                if self.followed_another.remove(&from) {
                    // It left the last round out because it followed a coordinator it had not
                    // yet suspected (a dead one, typically: suspicions come a few heartbeats
                    // apart). With it, the next round may find quorum: no pause (a rate limit
                    // only; each such node lifts it once per failed round).
                    self.quiet_until = None;
                }
                self.requested_by.insert(from);
            }
            Message::Collect { round } => {
                let report = self.report(now, round);
                out.push(Action::Send {
                    to: from,
                    network: None,
                    msg: Message::Report(Box::new(report)),
                });
            }
            Message::Report(r) => {
                if let Coord::Collecting { round, reports, .. } = &mut self.coord
                    && r.round == *round
                {
                    reports.insert(from, *r);
                }
            }
            Message::Propose(p) => self.on_propose(now, &from, *p, out),
            Message::Accept {
                round,
                epoch,
                fence_us,
            } => self.on_accept(now, &from, round, epoch, fence_us),
            Message::Reject { round, accepted } => {
                if let Coord::Proposing { round: r, .. } = &self.coord
                    && *r == round
                {
                    // The member accepted a higher epoch or follows another coordinator: start
                    // over; the next collect round learns its state.
                    let _ = accepted;
                    self.abort_round();
                    self.requested_by.insert(from);
                }
            }
            Message::Commit {
                round,
                epoch,
                fence_us,
            } => {
                let matches = self.pending.as_ref().is_some_and(|p| {
                    p.coordinator == from
                        && p.proposal.round == round
                        && p.proposal.view.epoch == epoch
                        && !p.publishing
                });
                if matches && let Some(p) = self.pending.take() {
                    let us = Duration::from_micros(fence_us).min(self.cfg.suspect_after());
                    let fence = now.checked_add(us);
                    self.raise_fence(fence);
                    self.install(p.proposal.view, Some(&p.proposal.applied), out);
                }
            }
            Message::Done { basis, .. } => {
                if let Some(b) = basis {
                    self.catch_up(now, &b, out);
                }
            }
            Message::Leave => {
                if let Some(p) = self.peers.get_mut(&from)
                    && !p.leaving
                {
                    p.leaving = true;
                    p.leaving_at = Some(now);
                    out.push(Action::Event(Event::PlannedLeave { node: from }));
                }
            }
        }
    }

    fn check_message(&self, msg: &Message) -> Result<(), &'static str> {
        let nodes = &self.cfg.nodes;
        match msg {
            Message::Report(r) => {
                if !nodes.contains(&r.follows) || !r.reachable.is_subset(nodes) {
                    return Err("report names unknown nodes");
                }
                if r.requests.len() > MAX_PENDING_REQUESTS {
                    return Err("report carries too many requests");
                }
                if let Some(v) = &r.committed {
                    v.check(nodes)?;
                }
            }
            Message::Propose(p) => {
                p.view.check(nodes)?;
                if let Some(b) = &p.basis {
                    b.check(nodes)?;
                    if b.epoch >= p.view.epoch {
                        return Err("proposal's basis is not older than the proposal");
                    }
                }
                if p.disk_holder
                    .as_ref()
                    .is_some_and(|h| !p.view.members.contains(h))
                {
                    return Err("proposal's disk holder is not a member");
                }
            }
            Message::Done { basis: Some(b), .. } => b.check(nodes)?,
            _ => {}
        }
        Ok(())
    }

    fn on_heartbeat(
        &mut self,
        now: Instant,
        from: &NodeId,
        net: usize,
        hb: &Heartbeat,
        out: &mut Vec<Action>,
    ) {
        let echo_at = hb
            .echo
            .filter(|e| e.incarnation == self.incarnation)
            .and_then(|e| self.stamp_instant(e.sent_us))
            .filter(|t| *t <= now);
        let in_view = self
            .committed
            .as_ref()
            .is_some_and(|v| v.members.contains(from));
        let Some(p) = self.peers.get_mut(from) else {
            return;
        };
        match p.incarnation {
            Some(i) if hb.incarnation < i => return,
            Some(i) if hb.incarnation > i => {
                *p = Peer {
                    links: vec![Link::default(); p.links.len()],
                    ..Peer::default()
                };
                if in_view {
                    self.restarted.insert(from.clone());
                    out.push(Action::Event(Event::NodeRestarted { node: from.clone() }));
                }
            }
            _ => {}
        }
        p.incarnation = Some(hb.incarnation);
        let Some(link) = p.links.get_mut(net) else {
            return;
        };
        link.heard = Some(now);
        if link.peer_stamp.is_none_or(|s| hb.sent_us >= s) {
            link.peer_stamp = Some(hb.sent_us);
            link.peer_stamp_at = Some(now);
        }
        if let Some(t) = echo_at {
            link.echo = Some(link.echo.map_or(t, |e| e.max(t)));
            if hb.vouch {
                if hb.epoch > p.vouched_epoch {
                    p.vouched_epoch = hb.epoch;
                    p.vouched = Some(t);
                } else if hb.epoch == p.vouched_epoch {
                    p.vouched = Some(p.vouched.map_or(t, |e| e.max(t)));
                }
            }
            p.disk_until = hb
                .disk_us
                .and_then(|d| t.checked_add(Duration::from_micros(d)));
        }
        p.epoch = hb.epoch;
        if hb.leaving && !p.leaving {
            p.leaving = true;
            p.leaving_at = Some(now);
            out.push(Action::Event(Event::PlannedLeave { node: from.clone() }));
        }
    }

    fn report(&self, now: Instant, round: u64) -> Report {
        Report {
            round,
            follows: self.coordinator(now),
            reachable: self.reachable(now),
            committed: self.committed.clone(),
            continuing: self.continuing,
            accepted: self.accepted,
            disk: self.own_disk_valid(now),
            leaving: self.leaving_since.is_some(),
            requests: self.requests.clone(),
        }
    }

    fn raise_fence(&mut self, fence: Option<Instant>) {
        if let Some(f) = fence {
            self.fence_until = Some(self.fence_until.map_or(f, |g| g.max(f)));
        }
    }

    /// Installs a committed view: the normal commit of an accepted proposal or a catch-up.
    fn install(
        &mut self,
        view: View,
        applied: Option<&BTreeMap<NodeId, u64>>,
        out: &mut Vec<Action>,
    ) {
        if self
            .committed
            .as_ref()
            .is_some_and(|c| c.epoch >= view.epoch)
        {
            return;
        }
        // Vouch for the members, except those a later accepted proposal dropped: a member
        // that dropped a node must never vouch for it again before a commit says otherwise.
        self.accepted_log.retain(|(e, _)| *e > view.epoch);
        let mut vouching: BTreeSet<NodeId> = view
            .members
            .iter()
            .filter(|m| **m != self.me)
            .cloned()
            .collect();
        for (_, members) in &self.accepted_log {
            vouching.retain(|m| members.contains(m));
        }
        self.vouching = vouching;
        self.accepted = self.accepted.max(view.epoch);
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.proposal.view.epoch <= view.epoch)
        {
            self.pending = None;
        }
        if let Some(applied) = applied
            && let Some(seq) = applied.get(&self.me)
        {
            self.requests.retain(|r| r.seq > *seq);
        }
        self.requests.retain(|r| {
            view.members.contains(&r.node) && view.paused.contains(&r.node) != r.paused
        });
        self.continuing = true;
        self.join_wait_since = None;
        self.restarted.clear();
        self.committed = Some(view.clone());
        // Tell the members at once that this node vouches for them in the new view.
        self.heartbeat_now = true;
        out.push(Action::Committed(view));
        out.push(Action::Persist(self.persisted()));
    }

    /// Installs `basis`, a view someone committed, if this node missed only its commit.
    fn catch_up(&mut self, now: Instant, basis: &View, out: &mut Vec<Action>) {
        if !self.can_install(basis) {
            return;
        }
        // The view's fence came with its commit, which this node missed. A node the view
        // removed could act until the last vouch it got plus suspect_after; every vouch it got
        // came before the view's acceptances, so before now. Only when this node committed the
        // predecessor itself does it know that nobody was removed.
        let removed = match &self.committed {
            Some(c) if c.epoch == basis.prev => {
                c.members.iter().any(|m| !basis.members.contains(m))
            }
            _ => true,
        };
        if removed {
            self.raise_fence(now.checked_add(self.cfg.suspect_after()));
        }
        self.install(basis.clone(), None, out);
    }

    fn can_install(&self, v: &View) -> bool {
        if !v.members.contains(&self.me) {
            return false;
        }
        let committed = self.committed.as_ref().map_or(0, |c| c.epoch);
        if committed >= v.epoch {
            return false;
        }
        let accepted_it = self
            .pending
            .as_ref()
            .is_some_and(|p| p.proposal.view == *v && !p.publishing);
        if !self.continuing {
            // After a restart only views accepted since the restart are installed: what was
            // accepted before it is not in the vouching log.
            return accepted_it;
        }
        accepted_it || committed == v.prev
    }

    fn on_propose(&mut self, now: Instant, from: &NodeId, p: Proposal, out: &mut Vec<Action>) {
        let reject = |out: &mut Vec<Action>, accepted: u64| {
            out.push(Action::Send {
                to: from.clone(),
                network: None,
                msg: Message::Reject {
                    round: p.round,
                    accepted,
                },
            });
        };
        if *from != self.me && self.coordinator(now) != *from {
            reject(out, self.accepted);
            return;
        }
        if !self.acceptable(now, &p) {
            if *from == self.me {
                self.abort_round();
            } else {
                reject(out, self.accepted);
            }
            return;
        }
        let view = &p.view;
        if let Some(b) = &p.basis
            && b.epoch == view.prev
            && self.committed.as_ref().map_or(0, |c| c.epoch) < b.epoch
        {
            let b = b.clone();
            self.catch_up(now, &b, out);
        }
        self.accepted = view.epoch;
        self.accepted_log.push((view.epoch, view.members.clone()));
        if self.accepted_log.len() > MAX_ACCEPTED_LOG {
            // Merge the two oldest: the lower epoch with the members of both is stricter.
            let (e0, m0) = self.accepted_log.remove(0);
            if let Some((e1, m1)) = self.accepted_log.first_mut() {
                *e1 = e0.min(*e1);
                m1.retain(|m| m0.contains(m));
            }
        }
        let w = self.cfg.suspect_after();
        let dropped: Vec<NodeId> = self
            .vouching
            .iter()
            .filter(|m| !view.members.contains(*m))
            .cloned()
            .collect();
        for d in dropped {
            self.vouching.remove(&d);
            if let Some(peer) = self.peers.get(&d)
                && !peer.leaving
            {
                let fence = peer.vouched_arrival.and_then(|t| t.checked_add(w));
                self.raise_fence(fence);
            }
        }
        let publishing = p.disk_holder.as_deref() == Some(self.me.as_str());
        let epoch = view.epoch;
        let round = p.round;
        self.pending = Some(Pending {
            proposal: p,
            coordinator: from.clone(),
            deadline: now
                .checked_add(self.cfg.round_timeout.saturating_mul(2))
                .unwrap_or(now),
            publishing,
        });
        out.push(Action::Persist(self.persisted()));
        if publishing {
            out.push(Action::PublishEpoch(epoch));
        } else {
            self.send_accept(now, from.clone(), round, epoch, out);
        }
    }

    fn acceptable(&self, now: Instant, p: &Proposal) -> bool {
        let view = &p.view;
        if !view.members.contains(&self.me)
            || view.epoch <= self.accepted
            || self.leaving_since.is_some()
        {
            return false;
        }
        if p.disk_holder.as_deref() == Some(self.me.as_str()) && !self.own_disk_valid(now) {
            return false;
        }
        let Some(joined) = view.joined.get(&self.me) else {
            return false;
        };
        if *joined == view.epoch {
            return true;
        }
        if !self.continuing {
            return false;
        }
        let committed = self.committed.as_ref().map_or(0, |c| c.epoch);
        committed == view.prev
            || p.basis.as_ref().is_some_and(|b| {
                b.epoch == view.prev && committed == b.prev && b.members.contains(&self.me)
            })
    }

    fn fence_us(&self, now: Instant) -> u64 {
        self.fence_until.map_or(0, |f| {
            u64::try_from(f.saturating_duration_since(now).as_micros()).unwrap_or(u64::MAX)
        })
    }

    fn send_accept(
        &mut self,
        now: Instant,
        to: NodeId,
        round: u64,
        epoch: u64,
        out: &mut Vec<Action>,
    ) {
        let fence_us = self.fence_us(now);
        if to == self.me {
            let me = self.me.clone();
            self.on_accept(now, &me, round, epoch, fence_us);
        } else {
            out.push(Action::Send {
                to,
                network: None,
                msg: Message::Accept {
                    round,
                    epoch,
                    fence_us,
                },
            });
        }
    }

    fn on_published(&mut self, now: Instant, epoch: u64, out: &mut Vec<Action>) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        if !p.publishing || p.proposal.view.epoch != epoch {
            return;
        }
        p.publishing = false;
        let (to, round) = (p.coordinator.clone(), p.proposal.round);
        self.send_accept(now, to, round, epoch, out);
    }

    fn on_accept(&mut self, now: Instant, from: &NodeId, round: u64, epoch: u64, fence_us: u64) {
        if let Coord::Proposing {
            round: r,
            proposal,
            awaiting,
            fence,
            ..
        } = &mut self.coord
            && *r == round
            && proposal.view.epoch == epoch
        {
            awaiting.remove(from);
            // A correct fence is never longer than suspect_after; a larger one is bogus.
            let us = Duration::from_micros(fence_us).min(self.cfg.suspect_after());
            if let Some(f) = now.checked_add(us) {
                *fence = (*fence).max(f);
            }
        }
    }

    /// Everything that depends on time and state rather than on one input.
    fn evaluate(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.watch_peers(now, out);
        if let Some(since) = self.leaving_since {
            self.watch_leave(now, since, out);
            if self.left {
                return;
            }
        } else {
            self.coordinate(now, out);
            self.watch_pending(now);
            self.regroup_if_needed(now, out);
        }
        self.send_heartbeats(now, out);
        let want = self.wants_disk(now);
        if want != self.want_disk {
            self.want_disk = want;
            out.push(Action::WantDisk(want));
        }
        let acting = self.acting_until(now).is_some();
        if acting != self.acting {
            self.acting = acting;
            self.acted |= acting;
            out.push(Action::Acting(acting));
        }
    }

    fn send_heartbeats(&mut self, now: Instant, out: &mut Vec<Action>) {
        if now < self.next_heartbeat && !self.heartbeat_now {
            return;
        }
        self.heartbeat_now = false;
        let interval = self.cfg.heartbeat_interval;
        self.next_heartbeat = self
            .next_heartbeat
            .checked_add(interval)
            .filter(|t| *t > now)
            .or_else(|| now.checked_add(interval))
            .unwrap_or(now);
        let sent_us = self.stamp(now);
        let epoch = self.committed.as_ref().map_or(0, |v| v.epoch);
        let leaving = self.leaving_since.is_some();
        let disk_us = self.disk_until.filter(|t| now < *t).map(|t| {
            u64::try_from(t.saturating_duration_since(now).as_micros()).unwrap_or(u64::MAX)
        });
        let incarnation = self.incarnation;
        for (name, p) in &mut self.peers {
            // A leaving node still vouches: its vouch is about the peer, not about itself.
            let vouch_peer = self.vouching.contains(name);
            for (i, link) in p.links.iter_mut().enumerate() {
                let echo = p.incarnation.zip(link.peer_stamp).map(|(inc, s)| Echo {
                    incarnation: inc,
                    sent_us: s,
                });
                let vouch = vouch_peer && echo.is_some();
                if vouch && let Some(a) = link.peer_stamp_at {
                    p.vouched_arrival = Some(p.vouched_arrival.map_or(a, |v| v.max(a)));
                }
                let Some(network) = self.cfg.networks.get(i) else {
                    continue;
                };
                out.push(Action::Send {
                    to: name.clone(),
                    network: Some(network.clone()),
                    msg: Message::Heartbeat(Heartbeat {
                        incarnation,
                        sent_us,
                        echo,
                        vouch,
                        epoch,
                        leaving,
                        disk_us,
                    }),
                });
            }
        }
    }

    fn watch_peers(&mut self, now: Instant, out: &mut Vec<Action>) {
        let w = self.cfg.suspect_after();
        let lw = self.cfg.link_down_after();
        let members: BTreeSet<NodeId> = self
            .committed
            .as_ref()
            .map(|v| v.members.clone())
            .unwrap_or_default();
        for (name, p) in &mut self.peers {
            let reachable = p
                .links
                .iter()
                .any(|l| fresh(l.heard, now, w) && fresh(l.echo, now, w));
            let suspect = !reachable && members.contains(name) && !p.leaving;
            if suspect && !p.suspected {
                out.push(Action::Event(Event::Suspected { node: name.clone() }));
            }
            p.suspected = suspect;
            if !reachable {
                for l in &mut p.links {
                    l.down = false;
                }
                continue;
            }
            let fresh_links: Vec<bool> = p
                .links
                .iter()
                .map(|l| fresh(l.heard, now, lw) && fresh(l.echo, now, lw))
                .collect();
            if !fresh_links.iter().any(|f| *f) {
                continue;
            }
            for (i, l) in p.links.iter_mut().enumerate() {
                let ok = fresh_links.get(i).copied().unwrap_or(false);
                let Some(network) = self.cfg.networks.get(i) else {
                    continue;
                };
                if ok {
                    l.was_up = true;
                }
                if !ok && !l.down && l.was_up {
                    l.down = true;
                    out.push(Action::Event(Event::LinkDown {
                        node: name.clone(),
                        network: network.clone(),
                    }));
                } else if ok && l.down {
                    l.down = false;
                    out.push(Action::Event(Event::LinkUp {
                        node: name.clone(),
                        network: network.clone(),
                    }));
                }
            }
        }
    }

    fn watch_leave(&mut self, now: Instant, since: Instant, out: &mut Vec<Action>) {
        let my_epoch = self.committed.as_ref().map_or(0, |v| v.epoch);
        let members: Vec<&NodeId> = self
            .committed
            .iter()
            .flat_map(|v| v.members.iter())
            .filter(|m| **m != self.me)
            .collect();
        // Done when every member that still answers has moved past this node's view.
        let done = members.iter().all(|m| {
            self.peers
                .get(*m)
                .is_none_or(|p| !self.peer_reachable(p, now) || p.epoch > my_epoch)
        });
        let timed_out = since
            .checked_add(self.cfg.leave_timeout)
            .is_some_and(|t| now >= t);
        if done || timed_out {
            self.finish_leave(out);
        }
    }

    fn watch_pending(&mut self, now: Instant) {
        if let Some(p) = &self.pending
            && now >= p.deadline
        {
            // Keeps the acceptance (the epoch stays used); the regroup reasons notice.
            let coordinator = p.coordinator.clone();
            if coordinator != self.me {
                self.requested_by.insert(self.me.clone());
            }
            self.pending = None;
        }
    }

    fn reasons(&self, now: Instant) -> Vec<RegroupReason> {
        let mut reasons = BTreeSet::new();
        let view = self.committed.as_ref();
        let my_epoch = view.map_or(0, |v| v.epoch);
        let pending_epoch = self.pending.as_ref().map_or(0, |p| p.proposal.view.epoch);
        let member_of_view = self.continuing && view.is_some_and(|v| v.members.contains(&self.me));
        for (n, p) in &self.peers {
            let reachable = self.peer_reachable(p, now);
            let member = view.is_some_and(|v| v.members.contains(n));
            if member && p.leaving {
                reasons.insert(RegroupReason::Leaving(n.clone()));
            } else if member && !reachable {
                reasons.insert(RegroupReason::Unreachable(n.clone()));
            } else if !member && reachable && !p.leaving {
                reasons.insert(RegroupReason::Joining(n.clone()));
            }
            if member && reachable && p.epoch > my_epoch.max(pending_epoch) {
                reasons.insert(RegroupReason::NewerView(n.clone()));
            }
            // A proposal this node accepted dropped a member and never committed: this node
            // vouches for that member only after a view commits again, so without one the
            // member could never act again.
            if member
                && reachable
                && !p.leaving
                && member_of_view
                && self.pending.is_none()
                && !self.vouching.contains(n)
            {
                reasons.insert(RegroupReason::CommitTimeout);
            }
        }
        for n in &self.restarted {
            reasons.insert(RegroupReason::Restarted(n.clone()));
        }
        if !member_of_view {
            reasons.insert(RegroupReason::Rejoin);
        }
        if self.requested_by.contains(&self.me) {
            reasons.insert(RegroupReason::CommitTimeout);
        }
        if !self.requests.is_empty() {
            reasons.insert(RegroupReason::PauseRequest);
        }
        for n in &self.requested_by {
            if *n != self.me {
                reasons.insert(RegroupReason::Requested(n.clone()));
            }
        }
        reasons.into_iter().collect()
    }

    fn regroup_if_needed(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !matches!(self.coord, Coord::Idle) || self.pending.as_ref().is_some_and(|p| p.publishing)
        {
            return;
        }
        let reasons = self.reasons(now);
        if reasons.is_empty() {
            return;
        }
        let coordinator = self.coordinator(now);
        if coordinator != self.me {
            self.requested_by.clear();
            // The coordinator heard of a leave too and removes the node on its own; ask only
            // when that takes too long.
            let grace = self.cfg.round_timeout.saturating_mul(2);
            let urgent = reasons.iter().any(|r| match r {
                RegroupReason::Leaving(n) => self
                    .peers
                    .get(n)
                    .and_then(|p| p.leaving_at)
                    .and_then(|t| t.checked_add(grace))
                    .is_none_or(|t| now >= t),
                _ => true,
            });
            if !urgent {
                return;
            }
            let due = self
                .last_request
                .and_then(|t| t.checked_add(self.cfg.round_timeout))
                .is_none_or(|t| now >= t);
            if due && self.pending.is_none() {
                self.last_request = Some(now);
                out.push(Action::Send {
                    to: coordinator,
                    network: None,
                    msg: Message::RegroupRequest,
                });
            }
            return;
        }
        if self.quiet_until.is_some_and(|q| now < q) {
            return;
        }
        if self.pending.is_some() {
            return;
        }
        let planned = reasons
            .iter()
            .all(|r| matches!(r, RegroupReason::Leaving(_)));
        if planned && self.planned_change(now, out) {
            return;
        }
        self.requested_by.clear();
        self.start_round(now, reasons, out);
    }

    fn start_round(&mut self, now: Instant, reasons: Vec<RegroupReason>, out: &mut Vec<Action>) {
        self.followed_another.clear();
        let round = self.next_round;
        self.next_round = self.next_round.wrapping_add(1);
        out.push(Action::Event(Event::RegroupStarted { round, reasons }));
        let expected: BTreeSet<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.leaving && self.peer_reachable(p, now))
            .map(|(n, _)| n.clone())
            .collect();
        for n in &expected {
            out.push(Action::Send {
                to: n.clone(),
                network: None,
                msg: Message::Collect { round },
            });
        }
        self.coord = Coord::Collecting {
            round,
            deadline: now.checked_add(self.cfg.round_timeout).unwrap_or(now),
            expected,
            reports: BTreeMap::new(),
        };
    }

    /// Removes leaving members without a collect round. False when it cannot (the caller
    /// falls back to a regroup).
    fn planned_change(&mut self, now: Instant, out: &mut Vec<Action>) -> bool {
        let Some(view) = self.committed.clone() else {
            return false;
        };
        if !self.continuing {
            return false;
        }
        let members: BTreeSet<NodeId> = view
            .members
            .iter()
            .filter(|m| **m == self.me || self.peers.get(*m).is_some_and(|p| !p.leaving))
            .cloned()
            .collect();
        if members.len() == view.members.len() {
            return false;
        }
        let holder = self.disk_owner(now, &members);
        if !self.votes.has_quorum_of(&members, holder.as_deref()) {
            return false;
        }
        let Some(epoch) = self.accepted.max(self.disk_max_epoch).checked_add(1) else {
            return false;
        };
        for m in view.members.difference(&members) {
            out.push(Action::Event(Event::PlannedLeave { node: m.clone() }));
        }
        let new = View {
            epoch,
            prev: view.epoch,
            paused: view.paused.intersection(&members).cloned().collect(),
            joined: view
                .joined
                .iter()
                .filter(|(n, _)| members.contains(*n))
                .map(|(n, e)| (n.clone(), *e))
                .collect(),
            members,
        };
        let disk_holder = if self.votes.has_quorum_of(&new.members, None) {
            None
        } else {
            holder
        };
        let round = self.next_round;
        self.next_round = self.next_round.wrapping_add(1);
        self.propose(
            now,
            Proposal {
                round,
                view: new,
                basis: Some(view),
                disk_holder,
                applied: BTreeMap::new(),
            },
            out,
        );
        true
    }

    fn propose(&mut self, now: Instant, proposal: Proposal, out: &mut Vec<Action>) {
        for m in proposal.view.members.iter().filter(|m| **m != self.me) {
            out.push(Action::Send {
                to: m.clone(),
                network: None,
                msg: Message::Propose(Box::new(proposal.clone())),
            });
        }
        self.coord = Coord::Proposing {
            round: proposal.round,
            deadline: now.checked_add(self.cfg.round_timeout).unwrap_or(now),
            awaiting: proposal.view.members.clone(),
            proposal: Box::new(proposal.clone()),
            fence: now,
        };
        let me = self.me.clone();
        self.on_propose(now, &me, proposal, out);
    }

    fn coordinate(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !matches!(self.coord, Coord::Idle) && self.coordinator(now) != self.me {
            self.abort_round();
            return;
        }
        match &self.coord {
            Coord::Idle => {}
            Coord::Collecting {
                deadline,
                expected,
                reports,
                ..
            } => {
                let missing = expected
                    .iter()
                    .filter(|n| !reports.contains_key(*n))
                    .any(|n| {
                        self.peers
                            .get(n)
                            .is_some_and(|p| self.peer_reachable(p, now))
                    });
                if !missing || now >= *deadline {
                    self.decide(now, out);
                }
            }
            Coord::Proposing {
                deadline, awaiting, ..
            } => {
                if !awaiting.is_empty() && now >= *deadline {
                    self.abort_round();
                }
            }
        }
        if let Coord::Proposing { awaiting, .. } = &self.coord
            && awaiting.is_empty()
        {
            self.commit_as_coordinator(now, out);
        }
    }

    /// Gives up the coordinator's current round (the epoch it accepted stays used).
    fn abort_round(&mut self) {
        self.coord = Coord::Idle;
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.coordinator == self.me)
        {
            self.pending = None;
        }
    }

    fn commit_as_coordinator(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Coord::Proposing {
            proposal, fence, ..
        } = std::mem::replace(&mut self.coord, Coord::Idle)
        else {
            return;
        };
        self.raise_fence(Some(fence));
        let fence_us =
            u64::try_from(fence.saturating_duration_since(now).as_micros()).unwrap_or(u64::MAX);
        for m in proposal.view.members.iter().filter(|m| **m != self.me) {
            out.push(Action::Send {
                to: m.clone(),
                network: None,
                msg: Message::Commit {
                    round: proposal.round,
                    epoch: proposal.view.epoch,
                    fence_us,
                },
            });
        }
        self.pending = None;
        self.quiet_until = None;
        // Requests that arrived during the round are answered by it; a requester whose reason
        // persists asks again.
        self.requested_by.clear();
        self.install(proposal.view, Some(&proposal.applied), out);
    }

    /// The coordinator's decision after the collect round.
    fn decide(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Coord::Collecting { round, reports, .. } =
            std::mem::replace(&mut self.coord, Coord::Idle)
        else {
            return;
        };
        let mine = self.report(now, round);
        let followed_another: BTreeSet<NodeId> = reports
            .iter()
            .filter(|(n, r)| r.follows != self.me && !r.leaving && **n != self.me)
            .map(|(n, _)| n.clone())
            .collect();
        let mut parts: BTreeMap<NodeId, Report> = reports
            .into_iter()
            .filter(|(n, r)| r.follows == self.me && !r.leaving && *n != self.me)
            .collect();
        parts.insert(self.me.clone(), mine);
        let names: Vec<NodeId> = parts.keys().cloned().collect();
        let index = |n: &NodeId| names.iter().position(|x| x == n);
        let mut adj = vec![0u64; names.len()];
        for (i, a) in names.iter().enumerate() {
            for (j, b) in names.iter().enumerate() {
                if i != j
                    && parts.get(a).is_some_and(|r| r.reachable.contains(b))
                    && parts.get(b).is_some_and(|r| r.reachable.contains(a))
                {
                    adj[i] |= 1 << j;
                }
            }
        }
        let holder = parts
            .iter()
            .find(|(_, r)| r.disk)
            .map(|(n, _)| n.clone())
            .filter(|_| self.cfg.quorum_disk);
        let holder_bit = holder.as_ref().and_then(index).map(|i| 1u64 << i);
        let Some(me_idx) = index(&self.me) else {
            return;
        };
        let votes =
            |mask: u64| mask.count_ones() + u32::from(holder_bit.is_some_and(|b| mask & b != 0));
        let basis: Option<View> = parts
            .values()
            .filter_map(|r| r.committed.clone())
            .max_by_key(|v| v.epoch);
        let continuing = |n: &NodeId| -> bool {
            let (Some(r), Some(b)) = (parts.get(n), basis.as_ref()) else {
                return false;
            };
            let last = r.committed.as_ref().map_or(0, |c| c.epoch);
            r.continuing && b.members.contains(n) && (last == b.epoch || last == b.prev)
        };
        let continuing_bits = names
            .iter()
            .enumerate()
            .filter(|(_, n)| continuing(n))
            .fold(0u64, |mask, (i, _)| mask | (1 << i));
        let best = best_clique(&adj, me_idx, |a, b| {
            votes(a)
                .cmp(&votes(b))
                .then(a.count_ones().cmp(&b.count_ones()))
                // Of equal sets, the one that removes the fewest members of the current view:
                // every member removed must stop what it runs.
                .then(
                    (a & continuing_bits)
                        .count_ones()
                        .cmp(&(b & continuing_bits).count_ones()),
                )
                // Fewer, lower names first: the lower mask in bit-reversed order wins.
                .then(lexicographic(b, a))
        });
        let members: BTreeSet<NodeId> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| best & (1 << i) != 0)
            .map(|(_, n)| n.clone())
            .collect();
        let holder = holder.filter(|h| members.contains(h));
        let reachable = self.reachable(now);
        if !self.votes.has_quorum_of(&members, holder.as_deref()) {
            out.push(Action::Event(Event::NoQuorum { round, reachable }));
            self.followed_another = followed_another;
            for n in parts.keys().filter(|n| **n != self.me) {
                out.push(Action::Send {
                    to: n.clone(),
                    network: None,
                    msg: Message::Done { round, basis: None },
                });
            }
            self.quiet_until = now.checked_add(self.cfg.retry_interval);
            return;
        }
        let joining = !continuing(&self.me);
        let basis_if_joining = basis.as_ref().filter(|_| joining);
        if self.join_must_wait(now, round, &parts, basis_if_joining, &members, out) {
            return;
        }
        let mut paused: BTreeSet<NodeId> = basis
            .as_ref()
            .map(|b| b.paused.intersection(&members).cloned().collect())
            .unwrap_or_default();
        let mut applied: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (requester, r) in parts.iter().filter(|(n, _)| members.contains(*n)) {
            let mut reqs = r.requests.clone();
            reqs.sort_by_key(|q| q.seq);
            for q in reqs {
                if members.contains(&q.node) {
                    if q.paused {
                        paused.insert(q.node.clone());
                    } else {
                        paused.remove(&q.node);
                    }
                }
                applied.insert(requester.clone(), q.seq);
            }
        }
        let all_continue = members.iter().all(&continuing);
        // A proposal accepted after the basis but never committed stops its acceptors from
        // vouching for the members it dropped: only a new view makes them vouch again.
        let dangling = |b: &View| parts.values().any(|r| r.accepted > b.epoch);
        if let Some(b) = &basis
            && b.members == members
            && b.paused == paused
            && all_continue
            && applied.is_empty()
            && !dangling(b)
        {
            for n in members.iter().filter(|n| **n != self.me) {
                out.push(Action::Send {
                    to: n.clone(),
                    network: None,
                    msg: Message::Done {
                        round,
                        basis: Some(b.clone()),
                    },
                });
            }
            let b = b.clone();
            self.catch_up(now, &b, out);
            self.quiet_until = now.checked_add(self.cfg.retry_interval);
            return;
        }
        let highest = parts
            .values()
            .map(|r| r.accepted.max(r.committed.as_ref().map_or(0, |c| c.epoch)))
            .chain([self.accepted, self.disk_max_epoch])
            .max()
            .unwrap_or(0);
        let Some(epoch) = highest.checked_add(1) else {
            return;
        };
        let joined = members
            .iter()
            .map(|m| {
                let since = basis
                    .as_ref()
                    .filter(|_| continuing(m))
                    .and_then(|b| b.joined.get(m).copied())
                    .unwrap_or(epoch);
                (m.clone(), since)
            })
            .collect();
        let view = View {
            epoch,
            prev: basis.as_ref().map_or(0, |b| b.epoch),
            members,
            paused,
            joined,
        };
        let disk_holder = if self.votes.has_quorum_of(&view.members, None) {
            None
        } else {
            holder
        };
        self.propose(
            now,
            Proposal {
                round,
                view,
                basis,
                disk_holder,
                applied,
            },
            out,
        );
    }

    /// Whether this coordinator, while it joins (`basis`, the newest view the participants
    /// committed, is given only when this node is no continuing member of it), must not
    /// propose `members` yet because they leave out members of `basis` that a participant
    /// still reaches. Such a member is alive
    /// and connected; it only failed to answer this node (typically its link to a node that
    /// just restarted is still redialling). Removing it would make it stop what it runs for
    /// nothing, so the round ends as without quorum and is retried, for at most
    /// [`JOIN_WAIT_SUSPECT_PERIODS`] × `suspect_after`; after that the choice is as before (a
    /// member that keeps failing to reach the joiner must not keep it out for ever). A member
    /// that died is not waited for: nobody reports it reachable once it is suspected. Not
    /// proposing is always safe: no view commits.
    fn join_must_wait(
        &mut self,
        now: Instant,
        round: u64,
        parts: &BTreeMap<NodeId, Report>,
        basis: Option<&View>,
        members: &BTreeSet<NodeId>,
        out: &mut Vec<Action>,
    ) -> bool {
        let waiting_for: BTreeSet<NodeId> = basis
            .iter()
            .flat_map(|b| b.members.iter())
            .filter(|m| {
                !members.contains(*m)
                    && self.peers.get(*m).is_some_and(|p| !p.leaving)
                    && parts.values().any(|r| r.reachable.contains(*m))
            })
            .cloned()
            .collect();
        if waiting_for.is_empty() {
            self.join_wait_since = None;
            return false;
        }
        let since = *self.join_wait_since.get_or_insert(now);
        let bound = self
            .cfg
            .suspect_after()
            .saturating_mul(JOIN_WAIT_SUSPECT_PERIODS);
        if since.checked_add(bound).is_none_or(|end| now >= end) {
            return false;
        }
        out.push(Action::Event(Event::JoinDeferred { round, waiting_for }));
        for n in parts.keys().filter(|n| **n != self.me) {
            out.push(Action::Send {
                to: n.clone(),
                network: None,
                msg: Message::Done { round, basis: None },
            });
        }
        self.quiet_until = now.checked_add(self.cfg.retry_interval);
        true
    }

    fn wants_disk(&self, now: Instant) -> bool {
        if !self.cfg.quorum_disk || self.leaving_since.is_some() {
            return false;
        }
        let mut part = self.reachable(now);
        part.retain(|n| self.peers.get(n).is_some_and(|p| !p.leaving));
        part.insert(self.me.clone());
        let holding = self.own_disk_valid(now);
        let with_disk = self.votes.has_quorum_of(&part, Some(&self.me));
        let without = self.votes.has_quorum_of(&part, None);
        with_disk && (holding || (self.coordinator(now) == self.me && !without))
    }
}

fn fresh(t: Option<Instant>, now: Instant, window: Duration) -> bool {
    t.is_some_and(|t| t.checked_add(window).is_none_or(|end| now < end))
}

fn far_future(now: Instant) -> Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365);
    now.checked_add(FAR).unwrap_or(now)
}

/// Orders two sets of participant indices by their sorted members: `Less` when `a` comes
/// first lexicographically.
fn lexicographic(a: u64, b: u64) -> std::cmp::Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a == 0, b == 0) {
            (true, true) => return std::cmp::Ordering::Equal,
            (true, false) => return std::cmp::Ordering::Less,
            (false, true) => return std::cmp::Ordering::Greater,
            (false, false) => {}
        }
        let (x, y) = (a.trailing_zeros(), b.trailing_zeros());
        if x != y {
            return x.cmp(&y);
        }
        a &= a - 1;
        b &= b - 1;
    }
}

/// The best maximal clique containing `me` (Bron–Kerbosch with pivoting) under `better`
/// (`Greater` = better).
fn best_clique(adj: &[u64], me: usize, better: impl Fn(u64, u64) -> std::cmp::Ordering) -> u64 {
    let mut best = 1u64 << me;
    let p = adj.get(me).copied().unwrap_or(0);
    bron_kerbosch(adj, 1 << me, p, 0, &mut |clique| {
        if better(clique, best) == std::cmp::Ordering::Greater {
            best = clique;
        }
    });
    best
}

fn bron_kerbosch(adj: &[u64], r: u64, mut p: u64, mut x: u64, found: &mut dyn FnMut(u64)) {
    if p == 0 && x == 0 {
        found(r);
        return;
    }
    let pivot_set = p | x;
    let pivot = pivot_set.trailing_zeros() as usize;
    let pivot_adj = adj.get(pivot).copied().unwrap_or(0);
    let mut candidates = p & !pivot_adj;
    while candidates != 0 {
        let v = candidates.trailing_zeros() as usize;
        let bit = 1u64 << v;
        let nv = adj.get(v).copied().unwrap_or(0);
        bron_kerbosch(adj, r | bit, p & nv, x & nv, found);
        p &= !bit;
        x |= bit;
        candidates &= !bit;
    }
}

#[cfg(test)]
pub(crate) mod tests;
