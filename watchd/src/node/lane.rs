//! The update lane: performs the global update manager's actions on a task of its own, one
//! after the other in the order the machine emitted them, so that the node actor goes on with
//! heartbeats and membership while global updates are fsynced into the cluster database.
//!
//! It must never reorder actions (a send that follows a persist, apply or install goes out only
//! once that write is durable, and so does a caller's reply), never perform anything after a
//! failed write, and nothing once its actor stopped (a successor boots from the database).
//!
//! ```text
//!  NodeActor ──push(GumAction, in order)──► Lane task ──► store (clusterdb thread, awaited)
//!      ▲                                        ├──────► transport.send, area executor,
//!      └──── NodeMsg::Area / LaneFailed ◄───────┘        NodeShared (db, events), replies
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use cluster::gum::{GumAction, GumError};
use cluster::membership::NodeId;
use ractor::{ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::actor::{NodeMsg, NodeSetup, gum_event, slow_store};
use super::disk::{AreaExecutor, AreaReply};
use super::store::StoreError;
use super::transport::Wire;

/// What a local caller of a global update is answered with.
pub type CallerReply = RpcReplyPort<Result<u64, GumError>>;

/// One thing for the lane to do.
#[derive(Debug)]
pub enum LaneItem {
    /// A global update manager's action other than `Reply`.
    Gum(GumAction),
    /// The answer to a local caller (a `GumAction::Reply` with the caller's port).
    Reply(CallerReply, Result<u64, GumError>),
}

/// What the actor tells the lane; read when an action is performed, not when it was queued.
#[derive(Debug, Default)]
struct Facts {
    /// The node that sequences updates in the current view (shown with the database).
    leader: Mutex<Option<NodeId>>,
    /// Until when this node owns the quorum disk's lease (None: it does not).
    disk_owner_until: Mutex<Option<Instant>>,
    /// The actor stopped: nothing more is performed.
    stopped: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves a plain value behind, still valid.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The actor's handle of its lane. Dropping it stops the lane: the queued items are dropped
/// (callers answered `InDoubt`), the write in progress finishes on the store's thread but its
/// result is not used.
#[derive(Debug)]
pub struct Lane {
    /// Unbounded, because the node actor must never wait for the lane. The machine bounds it:
    /// an update is acknowledged only after the writes queued before its acknowledgement, so
    /// a slow disk slows the updates down, and what piles up meanwhile is resends, one per
    /// member and `retry_interval`.
    tx: mpsc::UnboundedSender<LaneItem>,
    facts: Arc<Facts>,
    /// Not awaited: the task ends by itself once the queue is closed and drained.
    _task: JoinHandle<()>,
}

impl Lane {
    /// Starts the lane's task on the node thread. `area` is the quorum disk's database area
    /// (None without a quorum disk); results and failures go to `actor`.
    pub fn start(
        setup: Arc<NodeSetup>,
        area: Option<AreaExecutor>,
        actor: ActorRef<NodeMsg>,
    ) -> Lane {
        let (tx, rx) = mpsc::unbounded_channel();
        let facts = Arc::new(Facts::default());
        let runner = Runner {
            setup: setup.clone(),
            area,
            actor,
            facts: facts.clone(),
            failed: false,
        };
        let task = setup.rt.spawn(runner.run(rx));
        Lane {
            tx,
            facts,
            _task: task,
        }
    }

    /// Queues an item after every item queued before.
    pub fn push(&self, item: LaneItem) {
        if let Err(mpsc::error::SendError(item)) = self.tx.send(item) {
            // The task is gone only after a panic in it; the actor learns of no result and
            // its requests time out. A caller is answered at once.
            tracing::error!("the update lane is gone");
            if let LaneItem::Reply(port, _) = item {
                let _ = port.send(Err(GumError::InDoubt));
            }
        }
    }

    /// The current leader, shown with the database the lane installs.
    pub fn set_leader(&self, leader: Option<&NodeId>) {
        let mut l = lock(&self.facts.leader);
        if l.as_ref() != leader {
            *l = leader.cloned();
        }
    }

    /// Until when this node owns the quorum disk's lease: a disk write is refused after it.
    pub fn set_disk_owner_until(&self, until: Option<Instant>) {
        *lock(&self.facts.disk_owner_until) = until;
    }

    /// Stops the lane (see the type's doc).
    pub fn stop(&self) {
        self.facts.stopped.store(true, Ordering::SeqCst);
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The lane's task.
struct Runner {
    setup: Arc<NodeSetup>,
    area: Option<AreaExecutor>,
    actor: ActorRef<NodeMsg>,
    facts: Arc<Facts>,
    /// A write failed: nothing after it is performed.
    failed: bool,
}

impl Runner {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<LaneItem>) {
        // Ends once the actor's handle is dropped and every queued item was taken.
        while let Some(item) = rx.recv().await {
            if self.halted() {
                if let LaneItem::Reply(port, _) = item {
                    let _ = port.send(Err(GumError::InDoubt));
                }
                continue;
            }
            match item {
                LaneItem::Reply(port, result) => {
                    let _ = port.send(result);
                }
                LaneItem::Gum(action) => {
                    if let Err(e) = self.perform(action).await {
                        self.failed = true;
                        tracing::error!(error = %e, "a durable write of the cluster database failed");
                        let _ = self.actor.cast(NodeMsg::LaneFailed(e.to_string()));
                    }
                }
            }
        }
    }

    fn halted(&self) -> bool {
        self.failed || self.facts.stopped.load(Ordering::SeqCst)
    }

    fn set_db(&self, db: cluster::db::DbSnapshot) {
        let leader = lock(&self.facts.leader).clone();
        self.setup.shared.set_db(db, leader);
    }

    async fn perform(&mut self, action: GumAction) -> Result<(), StoreError> {
        let setup = self.setup.clone();
        let shared = &setup.shared;
        match action {
            GumAction::Send { to, msg } => setup.transport.send(&to, None, Wire::Gum(msg)),
            GumAction::Persist(p) => {
                let t = Instant::now();
                setup.store.save_gum(p).await?;
                slow_store(shared, "the update manager's state", t, false);
            }
            GumAction::Apply { seq, epoch, update } => {
                let t = Instant::now();
                let db = setup.store.apply(seq, epoch, update).await?;
                // A successor actor may have booted from this very database meanwhile.
                if !self.halted() {
                    slow_store(shared, "a global update", t, false);
                    self.set_db(db);
                }
            }
            GumAction::Install(snapshot) => {
                let t = Instant::now();
                setup.store.install(snapshot.clone()).await?;
                if !self.halted() {
                    slow_store(shared, "the cluster database", t, false);
                    self.set_db(snapshot);
                }
            }
            GumAction::ReadDisk { id } => match &self.area {
                Some(area) => area.read(id),
                None => {
                    let _ = self.actor.cast(NodeMsg::Area(AreaReply::Read {
                        id,
                        result: Err("no quorum disk is configured".into()),
                    }));
                }
            },
            GumAction::WriteDisk { id, record } => {
                let owner = lock(&self.facts.disk_owner_until).is_some_and(|t| Instant::now() < t);
                match &self.area {
                    Some(area) if owner => area.write(id, record),
                    _ => {
                        let _ = self.actor.cast(NodeMsg::Area(AreaReply::Written {
                            id,
                            result: Err("this node does not own the quorum disk".into()),
                        }));
                    }
                }
            }
            // The actor turns replies into `LaneItem::Reply` (it holds the callers' ports).
            GumAction::Reply { request_id, .. } => {
                tracing::error!(
                    request_id,
                    "a reply reached the update lane without its caller"
                );
            }
            GumAction::Event(e) => gum_event(shared, &e),
        }
        Ok(())
    }
}
