//! The node actor: the thin adapter that drives the membership, quorum-disk and global-update
//! state machines with real time, real sockets and real storage, and its supervisor.
//!
//! ```text
//!  transport ──Inbound──►┐                          ┌──► transport.send (never waits)
//!  timer ──────Tick─────►│   NodeActor (node        ├──► store: membership persist (awaited:
//!  disk threads ─Reply──►│   thread, SCHED_FIFO)    │    durable first; rare)
//!  ftctl ─Pause/Leave/──►┘   Membership ⇄ QuorumDisk├──► disk thread (lease)
//!        Propose               ⇣ views, acting      ├──► NodeShared (status, events, acting)
//!                             Gum (global updates) ─┴──► Lane: every GumAction, in order
//! ```
//!
//! The global update manager's actions go to the [`Lane`], which performs them in order on a
//! task of its own (its durable writes awaited there), so that no commit of a global update
//! delays a heartbeat. The lane reports back only as messages (`Area`, `LaneFailed`).
//!
//! Glue: a tick right after creation; `WantDisk` → `Want`, `PublishEpoch` → `Publish`,
//! `Published` → `EpochPublished`, every change of the disk's status → `DiskLease` (and, for
//! the global update manager, `DiskOwner`); `Committed` → `ViewCommitted`, `Acting` → `Acting`.
//! It decides nothing itself. A failed actor is restarted by [`NodeSupervisor`] with a new
//! incarnation; until then this node does not act.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::db::DB_AREA_END;
use cluster::gum::{Gum, GumAction, GumConfig, GumError, GumEvent, GumInput, Update};
use cluster::membership::{Action, Event, Input, Membership, MembershipConfig};
use cluster::quorum::{
    DiskAction, DiskConfig, DiskEvent, DiskInput, DiskReply, DiskStatus, QuorumDisk,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::disk::{AreaExecutor, AreaReply, DiskExecutor};
use super::lane::{Lane, LaneItem};
use super::report::NodeShared;
use super::store::Store;
use super::transport::{Inbound, Transport, Wire};

/// Pause before a failed node actor is started again.
pub const RESTART_PAUSE: Duration = Duration::from_secs(1);
/// A durable write of the node's state that takes this long is an event (`slow_store`).
pub const SLOW_STORE: Duration = Duration::from_millis(100);
/// How long a stop of the node actor may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything a start of the node actor needs; shared by every restart.
#[derive(Debug)]
pub struct NodeSetup {
    /// This node.
    pub me: String,
    /// The membership rules' parameters (validated at load).
    pub membership: MembershipConfig,
    /// The global update manager's parameters.
    pub gum: GumConfig,
    /// The quorum disk: its lease parameters and its path.
    pub disk: Option<(DiskConfig, PathBuf)>,
    /// The sockets.
    pub transport: Transport,
    /// Durable state.
    pub store: Store,
    /// What status and events read.
    pub shared: Arc<NodeShared>,
    /// The node thread's runtime (the actor runs there).
    pub rt: Handle,
}

/// Messages of the node actor.
#[derive(Debug)]
pub enum NodeMsg {
    /// A message from a peer.
    Inbound(Inbound),
    /// A deadline of a machine came.
    Tick,
    /// A quorum-disk operation finished.
    Disk(DiskReply),
    /// An operation on the quorum disk's database area finished.
    Area(AreaReply),
    /// A local caller changes the cluster database.
    Propose {
        /// The change.
        update: Update,
        /// Answered once every member has it (or why not).
        reply: RpcReplyPort<Result<u64, GumError>>,
    },
    /// The operator pauses or resumes a member.
    SetPaused {
        /// The member.
        node: String,
        /// Pause or resume.
        paused: bool,
        /// Answered once the request is with the machine.
        reply: RpcReplyPort<()>,
    },
    /// The operator makes this node leave the cluster.
    Leave(RpcReplyPort<()>),
    /// A durable write of the update lane failed: this node's database may differ from its
    /// update manager's, so the actor fails and restarts from the database.
    LaneFailed(String),
}

/// The node actor.
#[derive(Debug)]
pub struct NodeActor;

/// Its state.
#[derive(Debug)]
pub struct NodeState {
    setup: Arc<NodeSetup>,
    incarnation: u64,
    membership: Membership,
    disk: Option<QuorumDisk>,
    exec: Option<DiskExecutor>,
    gum: Gum,
    /// Performs the update manager's actions (see the module doc).
    lane: Lane,
    /// Local callers waiting for their update, by request id.
    callers: BTreeMap<u64, RpcReplyPort<Result<u64, GumError>>>,
    next_request: u64,
    /// The disk status last told to membership.
    lease: Option<DiskStatus>,
    /// Disk ownership as last told to the global update manager.
    gum_disk_owner: bool,
    timer: Option<JoinHandle<()>>,
    armed: Option<Instant>,
    /// When every machine last got a `Tick`: deadlines are looked up from here, because a
    /// machine's `next_deadline(now)` skips deadlines that passed while only another machine
    /// was stepped (they would otherwise wait for the next later deadline).
    ticked: Instant,
    acting: bool,
}

enum Work {
    Membership(Input),
    Disk(DiskInput),
    Gum(GumInput),
}

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = Arc<NodeSetup>;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        setup: Arc<NodeSetup>,
    ) -> Result<NodeState, ActorProcessingErr> {
        let boot = setup.store.boot().await?;
        let now = Instant::now();
        let membership = Membership::new(
            setup.membership.clone(),
            setup.me.clone(),
            boot.incarnation,
            boot.persisted,
            now,
        )?;
        let gum = Gum::new(
            setup.gum.clone(),
            setup.me.clone(),
            boot.gum,
            boot.db.clone(),
        )?;
        setup.shared.set_db(boot.db, gum.leader().cloned());
        let (disk, exec, area): (_, _, Option<AreaExecutor>) = match &setup.disk {
            Some((cfg, path)) => {
                let machine = QuorumDisk::new(cfg.clone(), &setup.me, rand::random(), now)?;
                // The file must hold the database area beyond the lease slots.
                let sectors = cfg.sectors().max(DB_AREA_END);
                let me = myself.clone();
                let exec = DiskExecutor::start(
                    path.clone(),
                    sectors,
                    cfg.io_timeout,
                    Arc::new(move |r| {
                        let _ = me.cast(NodeMsg::Disk(r));
                    }),
                )?;
                let me = myself.clone();
                let area = AreaExecutor::start(
                    path.clone(),
                    sectors,
                    cfg.cluster_hash(),
                    Arc::new(move |r| {
                        let _ = me.cast(NodeMsg::Area(r));
                    }),
                )?;
                (Some(machine), Some(exec), Some(area))
            }
            None => (None, None, None),
        };
        let me = myself.clone();
        setup.transport.set_sink(Some(Arc::new(move |m| {
            let _ = me.cast(NodeMsg::Inbound(m));
        })));
        tracing::info!(
            node = %setup.me,
            incarnation = boot.incarnation,
            view = ?membership.view().map(|v| v.epoch),
            "cluster membership started"
        );
        setup.shared.record(
            "started",
            format!(
                "membership started, incarnation {}, last view {}",
                boot.incarnation,
                membership.view().map_or(0, |v| v.epoch)
            ),
        );
        let lane = Lane::start(setup.clone(), area, myself.clone());
        myself.cast(NodeMsg::Tick)?;
        Ok(NodeState {
            incarnation: boot.incarnation,
            membership,
            disk,
            exec,
            gum,
            lane,
            callers: BTreeMap::new(),
            next_request: 1,
            lease: None,
            gum_disk_owner: false,
            timer: None,
            armed: None,
            ticked: Instant::now(),
            acting: false,
            setup,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<NodeMsg>,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        st.setup.transport.set_sink(None);
        st.lane.stop();
        if let Some(t) = st.timer.take() {
            t.abort();
        }
        st.setup.shared.set_down();
        for (_, reply) in std::mem::take(&mut st.callers) {
            let _ = reply.send(Err(GumError::InDoubt));
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let mut work = VecDeque::new();
        match msg {
            NodeMsg::Inbound(Inbound { from, network, msg }) => match msg {
                Wire::Membership(m) => {
                    let network = st.setup.transport.networks().get(network).cloned();
                    work.push_back(Work::Membership(Input::Message {
                        from,
                        network,
                        msg: m,
                    }));
                }
                Wire::Gum(msg) => work.push_back(Work::Gum(GumInput::Message { from, msg })),
            },
            NodeMsg::Tick => {
                st.armed = None;
                st.ticked = Instant::now();
                work.push_back(Work::Membership(Input::Tick));
                work.push_back(Work::Disk(DiskInput::Tick));
                work.push_back(Work::Gum(GumInput::Tick));
            }
            NodeMsg::Disk(r) => work.push_back(Work::Disk(DiskInput::Io(r))),
            NodeMsg::Area(AreaReply::Read { id, result }) => {
                let result = result.map(|r| r.map(|b| *b));
                work.push_back(Work::Gum(GumInput::DiskRead { id, result }));
            }
            NodeMsg::Area(AreaReply::Written { id, result }) => {
                work.push_back(Work::Gum(GumInput::DiskWritten { id, result }));
            }
            NodeMsg::Propose { update, reply } => {
                let request_id = st.next_request;
                st.next_request += 1;
                st.callers.insert(request_id, reply);
                work.push_back(Work::Gum(GumInput::Propose { request_id, update }));
            }
            NodeMsg::SetPaused {
                node,
                paused,
                reply,
            } => {
                work.push_back(Work::Membership(Input::SetPaused { node, paused }));
                let _ = reply.send(());
            }
            NodeMsg::Leave(reply) => {
                work.push_back(Work::Membership(Input::Leave));
                let _ = reply.send(());
            }
            NodeMsg::LaneFailed(why) => {
                return Err(format!("the update lane failed: {why}").into());
            }
        }
        drive(st, work).await?;
        arm(&myself, st);
        st.setup
            .shared
            .publish(&st.membership, st.acting, st.incarnation);
        st.setup.shared.set_leader(st.gum.leader().cloned());
        Ok(())
    }
}

/// Records a `slow_store` event when a durable write that began at `since` took longer than
/// [`SLOW_STORE`]. `heartbeats_waited`: the node actor waited for it (a membership persist),
/// so did its heartbeats, and a wait near `suspect_after` gets this node suspected by its
/// peers; otherwise only the update lane waited.
pub(super) fn slow_store(shared: &NodeShared, what: &str, since: Instant, heartbeats_waited: bool) {
    let took = since.elapsed();
    if took >= SLOW_STORE {
        let who = if heartbeats_waited {
            "heartbeats waited"
        } else {
            "later global-update actions waited, heartbeats did not"
        };
        tracing::warn!(
            ms = took.as_millis(),
            "writing {what} durably took long; {who}"
        );
        shared.record(
            "slow_store",
            format!("writing {what} durably took {} ms; {who}", took.as_millis()),
        );
    }
}

/// Steps the machines until no glue input is left, performing every action in order.
async fn drive(st: &mut NodeState, mut work: VecDeque<Work>) -> Result<(), ActorProcessingErr> {
    while let Some(w) = work.pop_front() {
        let now = Instant::now();
        match w {
            Work::Membership(input) => {
                for a in st.membership.step(now, input) {
                    perform(st, a, &mut work).await?;
                }
            }
            Work::Disk(input) => {
                let Some(disk) = st.disk.as_mut() else {
                    continue;
                };
                let actions = disk.step(now, input);
                let status = disk.status(now);
                for a in actions {
                    match a {
                        DiskAction::Io { id, op } => {
                            if let Some(exec) = &st.exec {
                                exec.submit(id, op);
                            }
                        }
                        DiskAction::Event(DiskEvent::Published { epoch }) => {
                            tracing::debug!(epoch, "epoch published on the quorum disk");
                            work.push_back(Work::Membership(Input::EpochPublished { epoch }));
                        }
                        DiskAction::Event(e) => disk_event(&st.setup.shared, e),
                    }
                }
                if st.lease != Some(status) {
                    st.lease = Some(status);
                    st.lane.set_disk_owner_until(status.valid_until);
                    work.push_back(Work::Membership(Input::DiskLease {
                        valid_until: status.valid_until,
                        max_epoch: status.max_epoch,
                    }));
                }
                let owner = status.valid_until.is_some();
                if owner != st.gum_disk_owner {
                    st.gum_disk_owner = owner;
                    work.push_back(Work::Gum(GumInput::DiskOwner(owner)));
                }
            }
            Work::Gum(input) => {
                let actions = st.gum.step(now, input);
                st.lane.set_leader(st.gum.leader());
                for a in actions {
                    perform_gum(st, a);
                }
            }
        }
    }
    Ok(())
}

/// Hands a global update manager's action to the lane (a reply with its caller's port).
fn perform_gum(st: &mut NodeState, action: GumAction) {
    match action {
        GumAction::Reply { request_id, result } => {
            if let Some(reply) = st.callers.remove(&request_id) {
                st.lane.push(LaneItem::Reply(reply, result));
            }
        }
        other => st.lane.push(LaneItem::Gum(other)),
    }
}

pub(super) fn gum_event(shared: &NodeShared, e: &GumEvent) {
    let (kind, detail) = match e {
        GumEvent::Ignored { from, why } => (
            "gum_ignored",
            format!("global update message from {from} ignored: {why}"),
        ),
        GumEvent::SyncStarted { epoch } => (
            "gum_sync_started",
            format!("this node leads view {epoch}: collecting the members' databases"),
        ),
        GumEvent::Synced {
            epoch,
            seq,
            completing,
        } => (
            "gum_synced",
            match completing {
                Some(c) => {
                    format!("view {epoch} continues from update {seq}, completing update {c}")
                }
                None => format!("view {epoch} continues from update {seq}"),
            },
        ),
        GumEvent::Installed { seq } => (
            "gum_installed",
            format!("received the cluster database at update {seq}"),
        ),
        GumEvent::Committed { seq } => ("gum_committed", format!("update {seq} committed")),
        GumEvent::Diverged { node, seq } => (
            "gum_diverged",
            format!("{node}'s database differs at update {seq}; the leader's replaces it"),
        ),
        GumEvent::ApplyFailed { seq, why } => (
            "gum_apply_failed",
            format!("update {seq} does not apply here: {why}"),
        ),
        GumEvent::DiskFailed { why } => (
            "gum_disk_failed",
            format!("the quorum disk's database area failed: {why}"),
        ),
    };
    match e {
        GumEvent::Ignored { .. }
        | GumEvent::Diverged { .. }
        | GumEvent::ApplyFailed { .. }
        | GumEvent::DiskFailed { .. } => tracing::warn!(event = kind, "{detail}"),
        _ => tracing::info!(event = kind, "{detail}"),
    }
    shared.record(kind, detail);
}

async fn perform(
    st: &mut NodeState,
    action: Action,
    work: &mut VecDeque<Work>,
) -> Result<(), ActorProcessingErr> {
    let shared = &st.setup.shared;
    match action {
        Action::Send { to, network, msg } => {
            let index = network
                .as_ref()
                .and_then(|n| st.setup.transport.networks().iter().position(|x| x == n));
            if network.is_some() && index.is_none() {
                return Ok(());
            }
            st.setup.transport.send(&to, index, Wire::Membership(msg));
        }
        Action::Persist(p) => {
            // Durable before anything after it: the later actions of the batch wait here.
            let t = Instant::now();
            st.setup.store.persist(p).await?;
            slow_store(&st.setup.shared, "the membership state", t, true);
        }
        Action::Committed(v) => {
            tracing::info!(
                epoch = v.epoch,
                prev = v.prev,
                members = ?v.members,
                paused = ?v.paused,
                "cluster view committed"
            );
            let members: Vec<&str> = v.members.iter().map(String::as_str).collect();
            let mut detail = format!(
                "epoch {} (after {}): {}",
                v.epoch,
                v.prev,
                members.join(" ")
            );
            if !v.paused.is_empty() {
                let paused: Vec<&str> = v.paused.iter().map(String::as_str).collect();
                detail.push_str(&format!("; paused: {}", paused.join(" ")));
            }
            shared.record("view", detail);
            work.push_back(Work::Gum(GumInput::ViewCommitted(v)));
        }
        Action::Acting(acting) => {
            work.push_back(Work::Gum(GumInput::Acting(acting)));
            st.acting = acting;
            shared.set_acting(acting);
            if acting {
                tracing::info!("this node acts: it is a member of a view with quorum");
                shared.record("acting", "this node may act".into());
            } else {
                // Also for a moment at every view change, until every member committed it.
                tracing::warn!(
                    "this node stopped acting: a view change is under way, or it lost quorum or its place in the view"
                );
                shared.record("not_acting", "this node must not act".into());
            }
        }
        Action::WantDisk(want) => {
            tracing::debug!(want, "membership wants the quorum disk");
            work.push_back(Work::Disk(DiskInput::Want(want)));
        }
        Action::PublishEpoch(e) => work.push_back(Work::Disk(DiskInput::Publish(e))),
        Action::Event(e) => membership_event(shared, e),
        Action::Left => {
            tracing::info!("this node left the cluster");
            shared.record(
                "left",
                "this node left the cluster; restart watchd to join again".into(),
            );
            shared.set_left();
        }
    }
    Ok(())
}

fn membership_event(shared: &NodeShared, e: Event) {
    let kind = serde_json::to_value(&e)
        .ok()
        .and_then(|v| v.get("event").and_then(|k| k.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "membership".into());
    let detail = match &e {
        Event::Suspected { node } => format!("{node} stopped answering on every network"),
        Event::NodeRestarted { node } => format!("{node} restarted"),
        Event::LinkDown { node, network } => {
            format!("network {network} to {node} is down (another network still works)")
        }
        Event::LinkUp { node, network } => format!("network {network} to {node} works again"),
        Event::RegroupStarted { round, reasons } => {
            format!("regroup round {round}: {reasons:?}")
        }
        Event::NoQuorum { round, reachable } => {
            let r: Vec<&str> = reachable.iter().map(String::as_str).collect();
            format!(
                "regroup round {round} found no partition with quorum (reachable: {})",
                if r.is_empty() {
                    "none".to_owned()
                } else {
                    r.join(" ")
                }
            )
        }
        Event::JoinDeferred { round, waiting_for } => {
            let w: Vec<&str> = waiting_for.iter().map(String::as_str).collect();
            format!(
                "regroup round {round}: this joining node waits for members it does not reach yet: {}",
                w.join(" ")
            )
        }
        Event::PlannedLeave { node } => format!("{node} leaves the cluster"),
        Event::Ignored { from, why } => format!("message from {from} ignored: {why}"),
    };
    match &e {
        Event::Suspected { .. } | Event::NoQuorum { .. } | Event::Ignored { .. } => {
            tracing::warn!(event = %kind, "{detail}");
        }
        Event::LinkDown { .. } => tracing::warn!(event = %kind, "{detail}"),
        _ => tracing::info!(event = %kind, "{detail}"),
    }
    shared.record(&kind, detail);
}

fn disk_event(shared: &NodeShared, e: DiskEvent) {
    let (kind, detail) = match &e {
        DiskEvent::Acquired {
            generation,
            max_epoch,
        } => (
            "disk_acquired",
            format!(
                "this node owns the quorum disk (generation {generation}, highest epoch {max_epoch})"
            ),
        ),
        DiskEvent::Lost { reason } => ("disk_lost", format!("quorum disk lease lost: {reason}")),
        DiskEvent::Released => ("disk_released", "quorum disk released".to_owned()),
        DiskEvent::Published { epoch } => ("disk_published", format!("epoch {epoch} on the disk")),
        DiskEvent::Contested => (
            "disk_contested",
            "another node wrote while this node claimed the disk; backing off".to_owned(),
        ),
        DiskEvent::RenewalFailed { why } => (
            "disk_renewal_failed",
            format!("lease renewal failed: {why}"),
        ),
        DiskEvent::ReadFailed { why } => ("disk_read_failed", format!("disk read failed: {why}")),
        DiskEvent::Unreadable { slot, why } => (
            "disk_unreadable",
            format!("slot of {slot} is unreadable: {why}"),
        ),
    };
    match &e {
        DiskEvent::Lost { .. }
        | DiskEvent::RenewalFailed { .. }
        | DiskEvent::ReadFailed { .. }
        | DiskEvent::Unreadable { .. } => tracing::warn!(event = kind, "{detail}"),
        _ => tracing::info!(event = kind, "{detail}"),
    }
    shared.record(kind, detail);
}

/// Arms the timer at the machines' next deadline (one timer; re-armed only when it moves).
fn arm(myself: &ActorRef<NodeMsg>, st: &mut NodeState) {
    let since = st.ticked;
    let deadline = [
        st.membership.next_deadline(since),
        st.disk.as_ref().and_then(|d| d.next_deadline(since)),
        st.gum.next_deadline(since),
    ]
    .into_iter()
    .flatten()
    .min();
    if deadline == st.armed && st.timer.as_ref().is_some_and(|t| !t.is_finished()) {
        return;
    }
    if let Some(t) = st.timer.take() {
        t.abort();
    }
    st.armed = deadline;
    if let Some(at) = deadline {
        let me = myself.clone();
        st.timer = Some(st.setup.rt.spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let _ = me.cast(NodeMsg::Tick);
        }));
    }
}

/// Messages of the supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start (again) the node actor.
    Start,
    /// Stop the node actor for good (watchd is stopping).
    Shutdown(RpcReplyPort<()>),
}

/// Starts the node actor on the node thread and restarts it after a failure.
#[derive(Debug)]
pub struct NodeSupervisor;

/// Its state.
#[derive(Debug)]
pub struct SupervisorState {
    setup: Arc<NodeSetup>,
    child: Option<ActorRef<NodeMsg>>,
    stopping: bool,
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<NodeSetup>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        setup: Arc<NodeSetup>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        myself.cast(SupervisorMsg::Start)?;
        Ok(SupervisorState {
            setup,
            child: None,
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start => {
                if st.stopping || st.child.is_some() {
                    return Ok(());
                }
                let setup = st.setup.clone();
                let cell = myself.get_cell();
                // Spawned from a task of the node thread, the actor runs on the node thread.
                let spawned = st
                    .setup
                    .rt
                    .spawn(async move { Actor::spawn_linked(None, NodeActor, setup, cell).await })
                    .await;
                match spawned {
                    Ok(Ok((actor, _))) => {
                        st.setup.shared.set_actor(Some(actor.clone()));
                        st.child = Some(actor);
                    }
                    Ok(Err(e)) => restart_later(&myself, st, &format!("did not start: {e}")),
                    Err(e) => restart_later(&myself, st, &format!("did not start: {e}")),
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                st.stopping = true;
                if let Some(child) = st.child.take() {
                    st.setup.shared.set_actor(None);
                    let _ = child.stop_and_wait(None, Some(STOP_TIMEOUT)).await;
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (id, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell.get_id(), reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if st.child.as_ref().is_none_or(|c| c.get_id() != id) {
            return Ok(());
        }
        st.child = None;
        st.setup.shared.set_actor(None);
        if !st.stopping {
            restart_later(&myself, st, &why);
        }
        Ok(())
    }
}

fn restart_later(myself: &ActorRef<SupervisorMsg>, st: &SupervisorState, why: &str) {
    // Until the restart this node does not act: nothing vouches for it any more.
    st.setup.shared.set_down();
    tracing::error!(reason = %why, "the cluster node actor failed; restarting it with a new incarnation");
    st.setup
        .shared
        .record("failed", format!("node actor failed ({why}); restarting"));
    let me = myself.clone();
    tokio::spawn(async move {
        tokio::time::sleep(RESTART_PAUSE).await;
        let _ = me.cast(SupervisorMsg::Start);
    });
}
