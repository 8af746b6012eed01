//! What the node actor shows the rest of watchd: the acting verdict, a snapshot of membership
//! for `ftctl cluster status|nodes`, and a bounded ring of cluster events for
//! `ftctl cluster events`.
//!
//! Written by the node actor after every batch, read by the control server without asking the
//! actor (so status works while the actor restarts). It never changes membership.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use cluster::db::{DbContent, DbSnapshot};
use cluster::membership::{Membership, NodeState};
use cluster::quorum::Votes;
use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::actor::NodeMsg;
use super::transport::{LinkReport, TransportStats};

/// Cluster events kept for `ftctl cluster events`.
pub const EVENTS_KEEP: usize = 1000;

/// `ftctl cluster status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub cluster: String,
    /// This node.
    pub node: String,
    /// This run of the node actor (grows with every start).
    pub incarnation: u64,
    /// The node actor runs (false while it restarts after a failure).
    pub running: bool,
    /// This node left the cluster on purpose.
    pub left: bool,
    /// The last committed view's epoch (0: none yet).
    pub epoch: u64,
    /// Its members.
    pub members: Vec<String>,
    /// The node this node considers regroup coordinator.
    pub coordinator: String,
    /// This node may act (own groups): the verdict issue 6's failover obeys.
    pub acting: bool,
    /// The vote count of this node's partition.
    pub quorum: QuorumReport,
    /// The node thread got real-time priority.
    pub realtime: bool,
    /// Every configured node.
    pub nodes: Vec<NodeReport>,
    /// The membership transport's counters.
    pub transport: TransportStats,
    /// The cluster database here: how many updates it reflects.
    pub db_seq: u64,
    /// The node that sequences updates in the current view.
    pub db_leader: Option<String>,
}

/// `ftctl cluster db`: this node's copy of the cluster database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbReport {
    /// How many updates it reflects.
    pub seq: u64,
    /// The view epoch in which the last of them was committed.
    pub epoch: u64,
    /// The node that sequences updates in the current view.
    pub leader: Option<String>,
    /// The content.
    pub content: DbContent,
}

/// The votes of this node's partition (itself and the nodes it reaches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumReport {
    /// `majority` or `disk`.
    pub kind: String,
    /// The partition holds a majority of the votes.
    pub has_quorum: bool,
    /// Votes the partition holds.
    pub votes: usize,
    /// Votes a partition needs.
    pub needed: usize,
    /// All votes.
    pub total: usize,
    /// The quorum disk, when there is one.
    pub disk: Option<String>,
    /// The node known to own the quorum disk's lease now.
    pub disk_owner: Option<String>,
}

/// One node in `ftctl cluster status|nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Its name.
    pub name: String,
    /// joining, online, paused or offline, as this node sees it.
    pub state: NodeState,
    /// It is this node.
    pub me: bool,
    /// This node reaches it (heard and echoed on some network).
    pub reachable: bool,
    /// The epoch since which it has been a member without a gap.
    pub member_since: Option<u64>,
    /// This node's links to it.
    pub links: Vec<LinkReport>,
}

/// One line of `ftctl cluster events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEvent {
    /// Increasing number (per watchd run).
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened (`view`, `suspected`, `link_down`, `acting`, `disk_acquired`, ...).
    pub kind: String,
    /// Details.
    pub detail: String,
}

/// What the actor last published.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    running: bool,
    left: bool,
    incarnation: u64,
    epoch: u64,
    members: Vec<String>,
    joined: BTreeMap<String, u64>,
    coordinator: String,
    states: BTreeMap<String, NodeState>,
    reachable: BTreeSet<String>,
    votes: usize,
    has_quorum: bool,
    disk_owner: Option<String>,
}

#[derive(Debug, Default)]
struct Ring {
    next_seq: u64,
    events: VecDeque<ClusterEvent>,
}

/// Shared between the node actor (writer) and the control server (reader).
#[derive(Debug)]
pub struct NodeShared {
    me: String,
    votes: Votes,
    acting: AtomicBool,
    /// The same verdict, for those who must act on its changes (groups, issue 6).
    acting_tx: watch::Sender<bool>,
    /// Membership's run lease (see `Membership::run_lease_until`): an absolute instant, so a
    /// node actor that stops publishing only lets it lapse.
    run_lease: Mutex<Option<Instant>>,
    snapshot: Mutex<Snapshot>,
    ring: Mutex<Ring>,
    actor: Mutex<Option<ActorRef<NodeMsg>>>,
    db: Mutex<(Arc<DbSnapshot>, Option<String>)>,
}

impl NodeShared {
    /// For node `me` with these votes.
    pub fn new(me: String, votes: Votes) -> NodeShared {
        NodeShared {
            me,
            votes,
            acting: AtomicBool::new(false),
            acting_tx: watch::channel(false).0,
            run_lease: Mutex::new(None),
            snapshot: Mutex::new(Snapshot::default()),
            ring: Mutex::new(Ring::default()),
            actor: Mutex::new(None),
            db: Mutex::new((Arc::new(DbSnapshot::default()), None)),
        }
    }

    /// The cluster database changed (or its leader).
    pub(super) fn set_db(&self, db: DbSnapshot, leader: Option<String>) {
        *lock(&self.db) = (Arc::new(db), leader);
    }

    pub(super) fn set_leader(&self, leader: Option<String>) {
        lock(&self.db).1 = leader;
    }

    /// This node's copy of the cluster database.
    pub fn db(&self) -> DbReport {
        let (db, leader) = lock(&self.db).clone();
        DbReport {
            seq: db.seq,
            epoch: db.epoch,
            leader,
            content: db.content.clone(),
        }
    }

    /// Whether this node may act now.
    pub fn acting(&self) -> bool {
        self.acting.load(Ordering::SeqCst)
    }

    /// Follows the verdict: the receiver sees every change (and starts with the current one).
    pub fn subscribe_acting(&self) -> watch::Receiver<bool> {
        self.acting_tx.subscribe()
    }

    /// Until when this node may keep running what it runs while it does not act: membership's
    /// run lease as last published (`None`: lapsed).
    pub fn run_lease(&self) -> Option<Instant> {
        *lock(&self.run_lease)
    }

    pub(super) fn set_acting(&self, acting: bool) {
        self.acting.store(acting, Ordering::SeqCst);
        self.acting_tx
            .send_if_modified(|a| std::mem::replace(a, acting) != acting);
    }

    /// The node actor is gone (failed or stopped): nothing may act on its old verdict.
    pub(super) fn set_down(&self) {
        self.set_acting(false);
        lock(&self.snapshot).running = false;
    }

    pub(super) fn set_left(&self) {
        // The members remove a node that left without a fence: nothing may outlive the leave.
        *lock(&self.run_lease) = None;
        self.set_acting(false);
        lock(&self.snapshot).left = true;
    }

    pub(super) fn set_actor(&self, actor: Option<ActorRef<NodeMsg>>) {
        *lock(&self.actor) = actor;
    }

    /// The running node actor.
    pub fn actor(&self) -> Option<ActorRef<NodeMsg>> {
        lock(&self.actor).clone()
    }

    /// Records an event in the ring.
    pub fn record(&self, kind: &str, detail: String) {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut ring = lock(&self.ring);
        ring.next_seq += 1;
        let seq = ring.next_seq;
        ring.events.push_back(ClusterEvent {
            seq,
            time_ms,
            kind: kind.to_owned(),
            detail,
        });
        while ring.events.len() > EVENTS_KEEP {
            ring.events.pop_front();
        }
    }

    /// The last `last` events (all kept ones when `None`), oldest first.
    pub fn events(&self, last: Option<usize>) -> Vec<ClusterEvent> {
        let ring = lock(&self.ring);
        let skip = last.map_or(0, |n| ring.events.len().saturating_sub(n));
        ring.events.iter().skip(skip).cloned().collect()
    }

    /// Takes a snapshot of the machine after a batch.
    pub(super) fn publish(&self, m: &Membership, acting: bool, incarnation: u64) {
        let now = Instant::now();
        let reachable = m.reachable(now);
        let mut partition = reachable.clone();
        partition.insert(self.me.clone());
        let disk_owner = m.disk_holder(now);
        let view = m.view();
        let snap = Snapshot {
            running: true,
            left: m.has_left(),
            incarnation,
            epoch: view.map_or(0, |v| v.epoch),
            members: view
                .map(|v| v.members.iter().cloned().collect())
                .unwrap_or_default(),
            joined: view.map(|v| v.joined.clone()).unwrap_or_default(),
            coordinator: m.coordinator(now),
            states: m.node_states(now),
            votes: self.votes.count(&partition, disk_owner.as_deref()),
            has_quorum: self.votes.has_quorum_of(&partition, disk_owner.as_deref()),
            reachable,
            disk_owner,
        };
        // Before the verdict: whoever follows the verdict reads the lease that goes with it.
        *lock(&self.run_lease) = m.run_lease_until(now);
        self.set_acting(acting);
        *lock(&self.snapshot) = snap;
    }

    /// The status report (links and counters come from `transport`, live).
    pub fn status(
        &self,
        cluster: &str,
        disk: Option<String>,
        realtime: bool,
        transport: &super::transport::Transport,
    ) -> ClusterStatus {
        let s = lock(&self.snapshot).clone();
        let (db_seq, db_leader) = {
            let db = lock(&self.db);
            (db.0.seq, db.1.clone())
        };
        let nodes = s
            .states
            .iter()
            .map(|(name, state)| NodeReport {
                name: name.clone(),
                state: *state,
                me: *name == self.me,
                reachable: s.reachable.contains(name),
                member_since: s.joined.get(name).copied(),
                links: transport.links(name),
            })
            .collect();
        ClusterStatus {
            cluster: cluster.to_owned(),
            node: self.me.clone(),
            incarnation: s.incarnation,
            running: s.running,
            left: s.left,
            epoch: s.epoch,
            members: s.members,
            coordinator: s.coordinator,
            acting: self.acting(),
            quorum: QuorumReport {
                kind: if self.votes.has_disk() {
                    "disk"
                } else {
                    "majority"
                }
                .into(),
                has_quorum: s.running && s.has_quorum,
                votes: s.votes,
                needed: self.votes.majority(),
                total: self.votes.total(),
                disk,
                disk_owner: s.disk_owner,
            },
            realtime,
            nodes,
            transport: transport.stats(),
            db_seq,
            db_leader,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: consistent whatever a panicking holder did.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events_in_order() {
        let s = NodeShared::new("a".into(), Votes::new(["a".to_owned()], false));
        for i in 0..EVENTS_KEEP + 5 {
            s.record("x", i.to_string());
        }
        let all = s.events(None);
        assert_eq!(all.len(), EVENTS_KEEP);
        assert_eq!(all[0].detail, "5");
        let last = s.events(Some(2));
        assert_eq!(
            last.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![EVENTS_KEEP as u64 + 4, EVENTS_KEEP as u64 + 5]
        );
    }
}
