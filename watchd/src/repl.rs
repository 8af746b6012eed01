//! watchd's file replication: turns `[cluster]`, `[[node]]` and `[[fileset]]` into one actor per
//! fileset (its role, its pump or bcplog) under one supervisor, tells services where their rings
//! are, switches the roles of group-managed filesets ([`ReplMsg::SetRole`]), answers `repl status`.
//!
//! Owns the wiring only: the stream's rules live in the `repl` crate. One fileset's requests run
//! strictly in order; filesets never wait for each other, nor the supervisor for a fileset. A
//! failed actor is restarted after a pause, never taking the daemon or a service down. It never
//! runs a pump and a bcplog of one fileset at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cluster::net::{Conn, Listener, NetConfig, Secret};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use repl::backup::{BackupSpec, Bcplog, Promotion, StreamMeta};
use repl::bcplog::{BcplogActor, BcplogArgs, BcplogMsg, BcplogStatus};
use repl::copy::Exclude;
use repl::primary::{Peer, PrimarySpec, PrimaryStatus, PumpActor, PumpMsg, SourceSpec};
use repl::proto::{Mode, ToBackup, ToPrimary};
use repl::pump::PumpConfig;
use repl::segment::SegmentOptions;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Config, FilesetConfig, FilesetMode};
use crate::events::Events;
use crate::machine::EventKind;
use crate::supervisor::ReplEnv;

/// Pause before a failed replication actor is started again.
pub const RESTART_PAUSE: Duration = Duration::from_millis(500);
/// How long a status query waits for one actor, ms.
const STATUS_TIMEOUT_MS: u64 = 5000;
/// The ownership epoch of a fileset whose primary is fixed by the configuration.
const STATIC_EPOCH: u64 = 1;
/// How long a primary that hands its fileset over (it becomes a backup, or nothing) waits for
/// its connected backups to acknowledge the last writes; past it, they resync later.
pub const HANDOVER_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long draining this node's replica before it becomes the primary may take, ms (a long
/// log takes as long as applying it; the group executor bounds its own wait).
const PROMOTE_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// How long stopping a pump, bcplog or fileset actor may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection to a node that does not take streams now has to greet before it is
/// dropped without an answer.
const REFUSE_GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// This node's part in one fileset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The live files are here; the pump runs here.
    Primary,
    /// A replica is kept here.
    Backup,
    /// Neither.
    None,
}

/// The role the group executor asks for (see [`ReplMsg::SetRole`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleRequest {
    /// This node owns the fileset's group at `epoch`: drain the replica, stop the bcplog, run
    /// the pump with that epoch. `backups`: the nodes to stream to (`None`: every other node
    /// of the fileset).
    Primary {
        /// The group's ownership epoch (fencing token, ≥ 1).
        epoch: u64,
        /// Where to stream.
        backups: Option<Vec<String>>,
    },
    /// Keep a replica: hand the last writes to the backups, stop the pump, run the bcplog.
    Backup,
    /// Neither pump nor bcplog.
    None,
}

/// A fileset's role on this node as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleState {
    /// The role.
    pub role: Role,
    /// The epoch the pump streams with (primary), else 0.
    pub epoch: u64,
    /// Whether the role's actor (pump or bcplog) runs.
    pub running: bool,
    /// Why it does not, if known.
    pub error: Option<String>,
}

/// One fileset in `ftctl repl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesetReport {
    /// Its name.
    pub name: String,
    /// This node's role.
    pub role: Role,
    /// replay or copy.
    pub mode: String,
    /// Sync mode.
    pub sync: bool,
    /// The directory on this node.
    pub path: String,
    /// The primary's node name (`group` for a group-managed fileset this node is not the
    /// primary of).
    pub primary_node: String,
    /// The ownership epoch of this node's pump (primary), else 0.
    #[serde(default)]
    pub epoch: u64,
    /// The pump's state (primary).
    pub pump: Option<PrimaryStatus>,
    /// The bcplog's state (backup).
    pub bcplog: Option<BcplogStatus>,
    /// Why the actor is not running, when it is not.
    pub error: Option<String>,
}

#[derive(Clone)]
enum Plan {
    Primary(PrimarySpec),
    Backup {
        spec: BackupSpec,
        primaries: Vec<String>,
    },
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Primary(s) => write!(f, "Primary({}, epoch {})", s.fileset, s.epoch),
            Plan::Backup { spec, .. } => write!(f, "Backup({})", spec.fileset),
        }
    }
}

/// One fileset as this node holds it.
#[derive(Debug, Clone)]
struct Entry {
    config: FilesetConfig,
    /// The directory, canonical.
    root: PathBuf,
    /// Ring (replay mode).
    ring: Option<PathBuf>,
    /// The bcplog's state directory.
    state_dir: PathBuf,
    /// What copy mode leaves out (see [`crate::group::fileset::copy_exclude`]).
    exclude: Exclude,
    /// Whether this node holds the fileset at all (primary or in `backups`).
    member: bool,
    /// What runs now.
    plan: Option<Plan>,
}

impl Entry {
    fn name(&self) -> &str {
        self.config.name()
    }

    fn role(&self) -> Role {
        match &self.plan {
            Some(Plan::Primary(_)) => Role::Primary,
            Some(Plan::Backup { .. }) => Role::Backup,
            None => Role::None,
        }
    }

    fn epoch(&self) -> u64 {
        match &self.plan {
            Some(Plan::Primary(s)) => s.epoch,
            _ => 0,
        }
    }
}

/// The ring of a fileset: in the ring directory, named after this watchd's data directory so
/// two watchds on one host never share one.
pub fn ring_path(ring_dir: &Path, instance: &str, fileset: &str) -> PathBuf {
    ring_dir.join(format!("ftkit-{instance}-{fileset}.ring"))
}

/// This node as every fileset sees it: fixed at start, shared by all fileset actors.
#[derive(Debug)]
struct Wiring {
    /// This node's name.
    node: String,
    /// The transport (identity, secret, limits) pumps dial with.
    net: NetConfig,
    /// Every node's addresses.
    peers: BTreeMap<String, Vec<SocketAddr>>,
}

impl Wiring {
    /// The pump of `e` with `epoch`, streaming to `backups`.
    fn primary_plan(&self, e: &Entry, epoch: u64, backups: &[String]) -> Plan {
        let f = &e.config;
        let source = match (&e.ring, f.mode) {
            (Some(ring), FilesetMode::Replay) => SourceSpec::Ring {
                path: ring.clone(),
                capacity: f.ring_size.0,
            },
            _ => SourceSpec::Copy {
                quiet: f.quiet,
                exclude: e.exclude.clone(),
            },
        };
        Plan::Primary(PrimarySpec {
            fileset: f.name().to_owned(),
            root: e.root.clone(),
            source,
            backups: backups
                .iter()
                .map(|b| Peer {
                    name: b.clone(),
                    addrs: self.peers.get(b).cloned().unwrap_or_default(),
                })
                .collect(),
            epoch,
            pump: PumpConfig {
                mode: if f.sync { Mode::Sync } else { Mode::Async },
                max_retained_bytes: usize::try_from(f.max_retained.0).unwrap_or(usize::MAX),
                ..PumpConfig::default()
            },
            net: self.net.clone(),
        })
    }

    /// The bcplog of `e`, taking streams from `primaries`.
    fn backup_plan(&self, e: &Entry, primaries: Vec<String>) -> Plan {
        Plan::Backup {
            spec: BackupSpec {
                fileset: e.name().to_owned(),
                root: e.root.clone(),
                state_dir: e.state_dir.clone(),
                segment: SegmentOptions::default(),
            },
            primaries,
        }
    }

    /// The other nodes of a group-managed fileset: where its primary streams, and who may
    /// stream to it.
    fn others(&self, e: &Entry) -> Vec<String> {
        e.config
            .backups
            .iter()
            .filter(|n| **n != self.node)
            .cloned()
            .collect()
    }
}

/// What services are told, and what the supervisor runs. `None` without a `[cluster]`.
pub struct Setup {
    /// The environment for services.
    pub env: ReplEnv,
    listeners: Vec<Listener>,
    filesets: Vec<Entry>,
    wiring: Wiring,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("env", &self.env)
            .field("listeners", &self.listeners.len())
            .field("filesets", &self.filesets)
            .finish_non_exhaustive()
    }
}

impl Setup {
    /// The cluster listeners, one per `[cluster] listen` address in order: other channels
    /// (membership) share the ports.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }
}

/// Reads the secret, binds the listeners and plans every fileset (a group-managed one starts
/// as a backup on every node that holds it).
pub async fn setup(config: &Config, instance: &str) -> anyhow::Result<Option<Setup>> {
    let Some(cluster) = &config.cluster else {
        return Ok(None);
    };
    let node = config.node_name();
    let secret = Secret::from_file(&cluster.secret_file)
        .with_context(|| format!("cluster secret {}", cluster.secret_file.display()))?;
    let mut net = NetConfig::new(cluster.name.get_ref().clone(), node.clone(), secret)?;
    net.max_frame = usize::try_from(cluster.max_frame.0).unwrap_or(usize::MAX);
    net.handshake_timeout = cluster.handshake_timeout;
    net.validate()?;
    let mut listeners = Vec::new();
    for addr in &cluster.listen {
        listeners.push(
            Listener::bind(&net, *addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        );
    }
    let peers: BTreeMap<String, Vec<SocketAddr>> = config
        .nodes
        .iter()
        .map(|n| (n.name.get_ref().clone(), n.addresses.clone()))
        .collect();
    let shim = config.watchd.repl_shim.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("libftrepl.so")))
    });
    let mut env = ReplEnv {
        entries: BTreeMap::new(),
        shim,
        sync_timeout: None,
    };
    let mut setup = Setup {
        env: ReplEnv::default(),
        listeners,
        filesets: Vec::new(),
        wiring: Wiring {
            node: node.clone(),
            net,
            peers,
        },
    };
    for f in &config.filesets {
        std::fs::create_dir_all(&f.path)
            .with_context(|| format!("fileset {}: cannot create {}", f.name(), f.path.display()))?;
        let root = std::fs::canonicalize(&f.path)
            .with_context(|| format!("fileset {}: {}", f.name(), f.path.display()))?;
        let managed = f.group_managed();
        let primary_here = !managed && f.primary == node;
        let member = primary_here || f.backups.contains(&node);
        let ring = (f.mode == FilesetMode::Replay)
            .then(|| ring_path(&config.watchd.ring_dir, instance, f.name()));
        // A missing ring directory would only show when the pump fails to create its ring,
        // after the services started writing: refuse to start instead.
        if ring.is_some() && member {
            std::fs::create_dir_all(&config.watchd.ring_dir).with_context(|| {
                format!(
                    "fileset {}: cannot create ring_dir {}",
                    f.name(),
                    config.watchd.ring_dir.display()
                )
            })?;
        }
        // Services write through the ring of the node they run on; a group-managed fileset's
        // services run where the group is online, which is where its pump runs (the executor
        // brings the fileset online before the services that depend on it).
        if let Some(ring) = &ring
            && (primary_here || (managed && member))
        {
            env.entries.insert(
                f.name().to_owned(),
                format!("{}|{}|{}", f.name(), root.display(), ring.display()),
            );
            if f.sync {
                env.sync_timeout = env.sync_timeout.max(Some(f.sync_timeout));
            }
        }
        let exclude = crate::group::fileset::copy_exclude(f, &root, &config.watchd.data_dir)
            .with_context(|| format!("fileset {}: exclude", f.name()))?;
        if !exclude.is_empty() {
            let patterns: Vec<&str> = exclude.patterns().iter().map(|p| p.as_str()).collect();
            tracing::info!(fileset = %f.name(), exclude = ?patterns, "copy mode leaves these names out");
        }
        let mut entry = Entry {
            config: f.clone(),
            exclude,
            root,
            ring,
            state_dir: config.watchd.data_dir.join("repl").join(f.name()),
            member,
            plan: None,
        };
        let w = &setup.wiring;
        entry.plan = if primary_here {
            Some(w.primary_plan(&entry, STATIC_EPOCH, &f.backups))
        } else if managed && member {
            Some(w.backup_plan(&entry, w.others(&entry)))
        } else if member {
            Some(w.backup_plan(&entry, vec![f.primary.clone()]))
        } else {
            None
        };
        setup.filesets.push(entry);
    }
    setup.env = env;
    Ok(Some(setup))
}

/// How long watchd waits at startup for every fileset's pump or bcplog to run before it starts
/// the services (which log into the pumps' rings).
pub const STARTUP_WAIT: Duration = Duration::from_secs(5);

/// Waits until every fileset this node holds runs its role's actor (a primary's pump has
/// created its ring), at most `timeout`; past it, says which do not and returns.
pub async fn wait_started(repl: &ActorRef<ReplMsg>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pending: Vec<String> = match ractor::call_t!(repl, ReplMsg::Status, STATUS_TIMEOUT_MS) {
            Ok(reports) => reports
                .into_iter()
                .filter(|r| match r.role {
                    Role::Primary => r.pump.is_none(),
                    Role::Backup => r.bcplog.is_none(),
                    Role::None => false,
                })
                .map(|r| r.name)
                .collect(),
            Err(e) => vec![e.to_string()],
        };
        if pending.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?pending,
                "replication has not started for these filesets yet; starting the services anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The actor that ended and why, when `evt` says a child failed or stopped.
fn ended(evt: SupervisionEvent) -> Option<(ractor::ActorCell, String)> {
    match evt {
        SupervisionEvent::ActorFailed(cell, err) => Some((cell, err.to_string())),
        SupervisionEvent::ActorTerminated(cell, _, reason) => {
            Some((cell, reason.unwrap_or_else(|| "stopped".into())))
        }
        _ => None,
    }
}

/// Messages of the replication supervisor.
#[derive(Debug)]
pub enum ReplMsg {
    /// Start (again) the actor of this fileset's current role (and the fileset's own actor,
    /// in its startup role, if that is not running).
    Start(String),
    /// Report every fileset.
    Status(RpcReplyPort<Vec<FilesetReport>>),
    /// Change the role of a group-managed fileset on this node (the group executor, through
    /// the `fileset` and `checkpoint` resources). Answers once the role's actor runs.
    SetRole {
        /// The fileset.
        fileset: String,
        /// What this node becomes.
        role: RoleRequest,
        /// The role reached, or why not.
        reply: RpcReplyPort<Result<RoleState, String>>,
    },
    /// The current role of a fileset.
    Role {
        /// The fileset.
        fileset: String,
        /// Its role, or why there is none (unknown fileset).
        reply: RpcReplyPort<Result<RoleState, String>>,
    },
    /// The configuration of a fileset (for resource agents).
    Config {
        /// The fileset.
        fileset: String,
        /// Its configuration, and whether this node holds it.
        reply: RpcReplyPort<Option<(FilesetConfig, bool)>>,
    },
    /// A pump connected on the fileset's channel.
    Incoming {
        /// The fileset.
        fileset: String,
        /// The connection (handshake done).
        conn: Box<Conn>,
    },
}

/// The supervisor of every fileset actor (each of which supervises its pump or bcplog).
#[derive(Debug)]
pub struct ReplSupervisor;

#[derive(Debug, Clone)]
enum Child {
    Pump(ActorRef<PumpMsg>),
    Bcplog(ActorRef<BcplogMsg>),
}

impl Child {
    fn id(&self) -> ActorId {
        match self {
            Child::Pump(a) => a.get_id(),
            Child::Bcplog(a) => a.get_id(),
        }
    }

    fn cell(&self) -> ractor::ActorCell {
        match self {
            Child::Pump(a) => a.get_cell(),
            Child::Bcplog(a) => a.get_cell(),
        }
    }
}

/// What a fileset actor last published about its fileset: read by the supervisor for status
/// reports without asking the actor, which may be busy in a long role change.
#[derive(Debug, Clone)]
struct View {
    role: Role,
    epoch: u64,
    /// The pump or bcplog that runs, if it matches the role.
    child: Option<Child>,
    error: Option<String>,
}

impl View {
    /// Nothing runs (the fileset actor is not running).
    fn down(why: String) -> View {
        View {
            role: Role::None,
            epoch: 0,
            child: None,
            error: Some(why),
        }
    }

    fn role_state(&self) -> RoleState {
        RoleState {
            role: self.role,
            epoch: self.epoch,
            running: self.child.is_some(),
            error: self.error.clone(),
        }
    }
}

/// One fileset as the supervisor routes to it.
#[derive(Debug)]
struct Slot {
    /// The fileset as it starts (and restarts after its actor failed).
    initial: Arc<Entry>,
    /// Its actor; `None` while it is being (re)started.
    actor: Option<ActorRef<FilesetMsg>>,
    /// What its actor last published.
    view: watch::Receiver<View>,
}

/// Its state.
#[derive(Debug)]
pub struct ReplState {
    wiring: Arc<Wiring>,
    events: Arc<Events>,
    /// In configuration order (the order of status reports).
    filesets: Vec<Slot>,
    /// Fileset name → its slot.
    index: BTreeMap<String, usize>,
    /// Fileset actor → its slot.
    ids: BTreeMap<ActorId, usize>,
    /// Tasks handing connections from the listeners to the supervisor.
    gates: Vec<tokio::task::JoinHandle<()>>,
    /// The cluster listeners, held for the supervisor's life: dropping one stops accepting on
    /// its port, for membership (which shares the ports) as much as for the pumps.
    _listeners: Vec<Listener>,
}

impl ReplState {
    fn slot(&self, fileset: &str) -> Option<&Slot> {
        self.index.get(fileset).and_then(|i| self.filesets.get(*i))
    }
}

/// What the supervisor starts from.
#[derive(Debug)]
pub struct ReplArgs {
    /// The planned filesets.
    pub setup: Setup,
    /// Events hub (actor restarts are events).
    pub events: Arc<Events>,
}

fn unknown(fileset: &str) -> String {
    format!("no [[fileset]] named `{fileset}` on this node")
}

impl Actor for ReplSupervisor {
    type Msg = ReplMsg;
    type State = ReplState;
    type Arguments = ReplArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ReplMsg>,
        args: ReplArgs,
    ) -> Result<ReplState, ActorProcessingErr> {
        let mut gates = Vec::new();
        let mut filesets = Vec::new();
        let mut index = BTreeMap::new();
        for e in args.setup.filesets {
            // Every node that may be a backup takes the fileset's connections for its whole
            // life, whatever its role: the bcplog gets them, or they are refused with a reason.
            let takes_streams = e.member && (e.config.group_managed() || e.role() == Role::Backup);
            if takes_streams {
                let channel = repl::proto::channel(e.name());
                for l in &args.setup.listeners {
                    let mut rx = l.channel(&channel)?;
                    let (me, name) = (myself.clone(), e.name().to_owned());
                    gates.push(tokio::spawn(async move {
                        while let Some(conn) = rx.recv().await {
                            let msg = ReplMsg::Incoming {
                                fileset: name.clone(),
                                conn: Box::new(conn),
                            };
                            if me.cast(msg).is_err() {
                                return;
                            }
                        }
                    }));
                }
            }
            // Queued before any request can reach the supervisor, so each fileset's actor runs
            // before its first request is routed.
            myself.cast(ReplMsg::Start(e.name().to_owned()))?;
            index.insert(e.name().to_owned(), filesets.len());
            filesets.push(Slot {
                initial: Arc::new(e),
                actor: None,
                view: watch::channel(View::down("starting".into())).1,
            });
        }
        Ok(ReplState {
            wiring: Arc::new(args.setup.wiring),
            events: args.events,
            filesets,
            index,
            ids: BTreeMap::new(),
            gates,
            _listeners: args.setup.listeners,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<ReplMsg>,
        st: &mut ReplState,
    ) -> Result<(), ActorProcessingErr> {
        for g in &st.gates {
            g.abort();
        }
        // Each fileset actor stops its pump or bcplog; what does not stop in time is killed
        // when this actor's children are terminated.
        myself
            .get_cell()
            .stop_children_and_wait(None, Some(STOP_TIMEOUT))
            .await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ReplMsg>,
        msg: ReplMsg,
        st: &mut ReplState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReplMsg::Start(name) => start_fileset(&myself, st, &name).await,
            ReplMsg::Status(reply) => {
                let node = st.wiring.node.clone();
                let filesets: Vec<(Arc<Entry>, View)> = st
                    .filesets
                    .iter()
                    .map(|s| (s.initial.clone(), s.view.borrow().clone()))
                    .collect();
                // The pumps and bcplogs answer in their own time: never here.
                tokio::spawn(async move {
                    let _ = reply.send(status(&node, filesets).await);
                });
            }
            ReplMsg::SetRole {
                fileset,
                role,
                reply,
            } => route(st, &fileset, FilesetMsg::SetRole { role, reply }),
            ReplMsg::Role { fileset, reply } => route(st, &fileset, FilesetMsg::Role(reply)),
            ReplMsg::Config { fileset, reply } => {
                let _ = reply.send(
                    st.slot(&fileset)
                        .map(|s| (s.initial.config.clone(), s.initial.member)),
                );
            }
            ReplMsg::Incoming { fileset, conn } => {
                route(st, &fileset, FilesetMsg::Incoming(conn));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ReplMsg>,
        evt: SupervisionEvent,
        st: &mut ReplState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((cell, why)) = ended(evt) else {
            return Ok(());
        };
        let Some(slot) = st
            .ids
            .remove(&cell.get_id())
            .and_then(|i| st.filesets.get_mut(i))
        else {
            return Ok(());
        };
        slot.actor = None;
        // Its pump or bcplog was killed with it; a new one may start only once it is gone.
        let orphan = slot.view.borrow().child.clone();
        slot.view = watch::channel(View::down(format!("restarting after: {why}"))).1;
        let name = slot.initial.name().to_owned();
        tracing::error!(fileset = %name, error = %why, "the fileset's replication actor failed; restarting it");
        st.events.emit(
            None,
            EventKind::ActorRestarted,
            format!(
                "replication actor of fileset {name} failed ({why}); restarting it in its startup role"
            ),
        );
        tokio::spawn(async move {
            if let Some(child) = orphan {
                let cell = child.cell();
                cell.kill();
                if cell.wait(Some(STOP_TIMEOUT)).await.is_err() {
                    tracing::warn!(fileset = %name, "the failed fileset actor's pump or bcplog did not stop in time");
                }
            }
            tokio::time::sleep(RESTART_PAUSE).await;
            let _ = myself.cast(ReplMsg::Start(name));
        });
        Ok(())
    }
}

/// Starts the fileset's actor (in its startup role) if it does not run, else asks it to start
/// its pump or bcplog.
async fn start_fileset(myself: &ActorRef<ReplMsg>, st: &mut ReplState, name: &str) {
    let Some(&i) = st.index.get(name) else {
        return;
    };
    let Some(slot) = st.filesets.get_mut(i) else {
        return;
    };
    if let Some(a) = &slot.actor {
        let _ = a.cast(FilesetMsg::Start);
        return;
    }
    let first = slot.initial.as_ref().clone();
    let (tx, rx) = watch::channel(view_of(&first, None, None));
    let args = FilesetArgs {
        entry: first,
        wiring: st.wiring.clone(),
        events: st.events.clone(),
        view: tx,
    };
    match Actor::spawn_linked(None, FilesetActor, args, myself.get_cell()).await {
        Ok((a, _)) => {
            st.ids.insert(a.get_id(), i);
            slot.actor = Some(a);
            slot.view = rx;
        }
        Err(e) => {
            tracing::error!(fileset = %name, error = %e, "the fileset's replication actor did not start; retrying");
            slot.view = watch::channel(View::down(e.to_string())).1;
            let (me, name) = (myself.clone(), name.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(RESTART_PAUSE * 4).await;
                let _ = me.cast(ReplMsg::Start(name));
            });
        }
    }
}

/// Hands `msg` to its fileset's actor, or answers it here when that cannot be.
fn route(st: &ReplState, fileset: &str, msg: FilesetMsg) {
    let Some(slot) = st.slot(fileset) else {
        msg.refuse(unknown(fileset));
        return;
    };
    let restarting = || format!("the replication actor of fileset {fileset} is restarting");
    match &slot.actor {
        Some(a) => {
            if let Err(ractor::MessagingErr::SendErr(msg)) = a.cast(msg) {
                msg.refuse(restarting());
            }
        }
        None => msg.refuse(restarting()),
    }
}

/// Every fileset's report: the pumps and bcplogs are asked all at once.
async fn status(node: &str, filesets: Vec<(Arc<Entry>, View)>) -> Vec<FilesetReport> {
    let asks: Vec<_> = filesets
        .iter()
        .map(|(_, v)| {
            let child = v.child.clone();
            tokio::spawn(async move {
                match child {
                    Some(Child::Pump(a)) => (
                        ractor::call_t!(a, PumpMsg::Status, STATUS_TIMEOUT_MS).ok(),
                        None,
                    ),
                    Some(Child::Bcplog(a)) => (
                        None,
                        ractor::call_t!(a, BcplogMsg::Status, STATUS_TIMEOUT_MS).ok(),
                    ),
                    None => (None, None),
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(filesets.len());
    for ((e, v), ask) in filesets.into_iter().zip(asks) {
        let (pump, bcplog) = ask.await.unwrap_or((None, None));
        let f = &e.config;
        let primary_node = match (f.group_managed(), v.role) {
            (true, Role::Primary) => node.to_owned(),
            _ => f.primary.clone(),
        };
        out.push(FilesetReport {
            name: e.name().to_owned(),
            role: v.role,
            mode: match f.mode {
                FilesetMode::Replay => "replay",
                FilesetMode::Copy => "copy",
            }
            .into(),
            sync: f.sync,
            path: f.path.display().to_string(),
            primary_node,
            epoch: v.epoch,
            pump,
            bcplog,
            error: v.error,
        });
    }
    out
}

/// The actor of one fileset: owns its plan, its pump or bcplog (linked to it) and its last
/// error, and handles the fileset's requests one at a time, in the order they came.
#[derive(Debug)]
struct FilesetActor;

/// Requests for one fileset (routed by the supervisor; see [`ReplMsg`]).
#[derive(Debug)]
enum FilesetMsg {
    Start,
    SetRole {
        role: RoleRequest,
        reply: RpcReplyPort<Result<RoleState, String>>,
    },
    Role(RpcReplyPort<Result<RoleState, String>>),
    Incoming(Box<Conn>),
}

impl FilesetMsg {
    /// Answers the request with `why` (a pump's connection is dropped: it redials).
    fn refuse(self, why: String) {
        match self {
            FilesetMsg::SetRole { reply, .. } | FilesetMsg::Role(reply) => {
                let _ = reply.send(Err(why));
            }
            FilesetMsg::Start | FilesetMsg::Incoming(_) => {}
        }
    }
}

#[derive(Debug)]
struct FilesetArgs {
    entry: Entry,
    wiring: Arc<Wiring>,
    events: Arc<Events>,
    view: watch::Sender<View>,
}

#[derive(Debug)]
struct FilesetState {
    entry: Entry,
    wiring: Arc<Wiring>,
    events: Arc<Events>,
    child: Option<Child>,
    error: Option<String>,
    view: watch::Sender<View>,
}

/// What `entry` with `child` running shows: the child counts as running only if it is the
/// kind its plan asks for.
fn view_of(entry: &Entry, child: Option<&Child>, error: Option<&String>) -> View {
    let child = match (&entry.plan, child) {
        (Some(Plan::Primary(_)), Some(c @ Child::Pump(_)))
        | (Some(Plan::Backup { .. }), Some(c @ Child::Bcplog(_))) => Some(c.clone()),
        _ => None,
    };
    View {
        role: entry.role(),
        epoch: entry.epoch(),
        child,
        error: error.cloned(),
    }
}

impl Actor for FilesetActor {
    type Msg = FilesetMsg;
    type State = FilesetState;
    type Arguments = FilesetArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<FilesetMsg>,
        args: FilesetArgs,
    ) -> Result<FilesetState, ActorProcessingErr> {
        if args.entry.plan.is_some() {
            myself.cast(FilesetMsg::Start)?;
        }
        Ok(FilesetState {
            entry: args.entry,
            wiring: args.wiring,
            events: args.events,
            child: None,
            error: None,
            view: args.view,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<FilesetMsg>,
        st: &mut FilesetState,
    ) -> Result<(), ActorProcessingErr> {
        st.stop_child().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<FilesetMsg>,
        msg: FilesetMsg,
        st: &mut FilesetState,
    ) -> Result<(), ActorProcessingErr> {
        let name = st.entry.name().to_owned();
        match msg {
            FilesetMsg::Start => {
                if let Err(e) = st.start_child(&myself).await {
                    tracing::error!(fileset = %name, error = %e, "replication did not start; retrying");
                    st.error = Some(e.to_string());
                    let me = myself.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(RESTART_PAUSE * 4).await;
                        let _ = me.cast(FilesetMsg::Start);
                    });
                }
            }
            FilesetMsg::SetRole { role, reply } => {
                let result = st.set_role(&myself, role).await;
                match &result {
                    Ok(r) => {
                        tracing::info!(fileset = %name, role = ?r.role, epoch = r.epoch, "fileset role set");
                    }
                    Err(e) => {
                        tracing::warn!(fileset = %name, error = %e, "fileset role not set");
                    }
                }
                // Published before the answer: whoever got it sees the new role in reports.
                st.publish();
                let _ = reply.send(result);
            }
            FilesetMsg::Role(reply) => {
                let _ = reply.send(Ok(st.role_state()));
            }
            FilesetMsg::Incoming(conn) => st.incoming(conn),
        }
        st.publish();
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<FilesetMsg>,
        evt: SupervisionEvent,
        st: &mut FilesetState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((cell, why)) = ended(evt) else {
            return Ok(());
        };
        // Actors stopped on purpose (a role change) were forgotten before they stopped.
        if st.child.as_ref().map(Child::id) != Some(cell.get_id()) {
            return Ok(());
        }
        st.child = None;
        st.error = Some(why.clone());
        st.publish();
        let name = st.entry.name();
        st.events.emit(
            None,
            EventKind::ActorRestarted,
            format!("replication actor of fileset {name} failed ({why}); restarting"),
        );
        tokio::spawn(async move {
            tokio::time::sleep(RESTART_PAUSE).await;
            let _ = myself.cast(FilesetMsg::Start);
        });
        Ok(())
    }
}

impl FilesetState {
    fn name(&self) -> &str {
        self.entry.name()
    }

    /// Tells the supervisor (status reports) what runs now.
    fn publish(&self) {
        self.view.send_replace(view_of(
            &self.entry,
            self.child.as_ref(),
            self.error.as_ref(),
        ));
    }

    fn role_state(&self) -> RoleState {
        view_of(&self.entry, self.child.as_ref(), self.error.as_ref()).role_state()
    }

    /// A pump connected: the bcplog takes it, or it is told why not.
    fn incoming(&self, conn: Box<Conn>) {
        let fileset = self.name();
        if let (Some(Plan::Backup { .. }), Some(Child::Bcplog(a))) = (&self.entry.plan, &self.child)
        {
            let _ = a.cast(BcplogMsg::NewConn(conn));
            return;
        }
        let node = &self.wiring.node;
        let (reason, ours) = match &self.entry.plan {
            Some(Plan::Primary(s)) => (
                format!(
                    "node {node} is the primary of fileset {fileset} (epoch {})",
                    s.epoch
                ),
                Some(s.epoch),
            ),
            // Restarting after a failure: the pump redials.
            Some(Plan::Backup { .. }) => return,
            None => (
                format!("node {node} does not keep a replica of fileset {fileset} now"),
                None,
            ),
        };
        let fileset = fileset.to_owned();
        tokio::spawn(async move { refuse(*conn, fileset, reason, ours).await });
    }

    async fn start_child(&mut self, myself: &ActorRef<FilesetMsg>) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let Some(plan) = &self.entry.plan else {
            return Ok(());
        };
        let child = match plan {
            Plan::Primary(spec) => {
                let (a, _) =
                    Actor::spawn_linked(None, PumpActor, spec.clone(), myself.get_cell()).await?;
                Child::Pump(a)
            }
            Plan::Backup { spec, primaries } => {
                let args = BcplogArgs {
                    spec: spec.clone(),
                    primaries: primaries.clone(),
                    // Connections arrive through the supervisor (`ReplMsg::Incoming`).
                    conns: Vec::new(),
                };
                let (a, _) =
                    Actor::spawn_linked(None, BcplogActor, args, myself.get_cell()).await?;
                Child::Bcplog(a)
            }
        };
        self.child = Some(child);
        self.error = None;
        self.publish();
        Ok(())
    }

    /// Stops the fileset's actor on purpose (it is forgotten first, so it is not restarted).
    async fn stop_child(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        self.publish();
        let stopped = match &child {
            Child::Pump(a) => a.stop_and_wait(None, Some(STOP_TIMEOUT)).await,
            Child::Bcplog(a) => a.stop_and_wait(None, Some(STOP_TIMEOUT)).await,
        };
        if let Err(e) = stopped {
            tracing::warn!(fileset = %self.name(), error = %e, "a replication actor did not stop in time");
        }
    }

    async fn set_role(
        &mut self,
        myself: &ActorRef<FilesetMsg>,
        role: RoleRequest,
    ) -> Result<RoleState, String> {
        let name = self.name().to_owned();
        let e = &self.entry;
        if !e.config.group_managed() {
            return Err(format!(
                "fileset {name} has its primary fixed in the configuration (primary = \"{}\"); \
                 only filesets with primary = \"group\" change roles",
                e.config.primary
            ));
        }
        if !e.member {
            return Err(format!(
                "node {} does not hold fileset {name} (it is not in its `backups`)",
                self.wiring.node
            ));
        }
        match role {
            RoleRequest::Primary { epoch, backups } => {
                self.become_primary(myself, epoch, backups).await?
            }
            RoleRequest::Backup => self.become_backup(myself).await?,
            RoleRequest::None => {
                self.leave().await;
                self.entry.plan = None;
                self.error = None;
            }
        }
        Ok(self.role_state())
    }

    async fn become_primary(
        &mut self,
        myself: &ActorRef<FilesetMsg>,
        epoch: u64,
        backups: Option<Vec<String>>,
    ) -> Result<(), String> {
        if epoch == 0 {
            return Err("epoch 0 is not an ownership epoch".into());
        }
        let name = self.name().to_owned();
        let e = &self.entry;
        if let Some(Plan::Primary(spec)) = &e.plan {
            if spec.epoch == epoch {
                // Already (or still, after a failed start) the primary of this epoch.
                return self.start_child(myself).await.map_err(|e| e.to_string());
            }
            if epoch < spec.epoch {
                return Err(format!(
                    "stale epoch {epoch}: this node is the primary of fileset {name} at epoch {}",
                    spec.epoch
                ));
            }
        }
        let state_dir = e.state_dir.clone();
        let seen = tokio::task::spawn_blocking(move || StreamMeta::load(&state_dir))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .epoch;
        if epoch < seen {
            return Err(format!(
                "stale epoch {epoch}: this node's replica of fileset {name} has followed epoch {seen}"
            ));
        }
        let e = &self.entry;
        let others = self.wiring.others(e);
        let backups = backups.unwrap_or_else(|| others.clone());
        for b in &backups {
            if !others.contains(b) {
                return Err(format!(
                    "node {b} is not another node of fileset {name} (its `backups`: {})",
                    e.config.backups.join(", ")
                ));
            }
        }
        let plan = self.wiring.primary_plan(e, epoch, &backups);
        // The replica to drain: this node's, unless it is the primary already (of an older
        // epoch: its files are the original, its log was drained when it became the primary).
        let backup_spec = match &e.plan {
            Some(Plan::Primary(_)) => None,
            Some(Plan::Backup { spec, .. }) => Some(spec.clone()),
            None => match self.wiring.backup_plan(e, Vec::new()) {
                Plan::Backup { spec, .. } => Some(spec),
                Plan::Primary(_) => None,
            },
        };
        if let Some(spec) = backup_spec {
            let promotion = match &self.child {
                Some(Child::Bcplog(a)) => {
                    ractor::call_t!(a, BcplogMsg::Promote, PROMOTE_TIMEOUT_MS)
                        .map_err(|e| format!("draining the replica: {e}"))??
                }
                // No bcplog runs (it restarts after a failure, or the role was none): drain the
                // replica here.
                _ => tokio::task::spawn_blocking(move || -> Result<Promotion, String> {
                    let mut b = Bcplog::open(spec).map_err(|e| e.to_string())?;
                    b.promote().map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())??,
            };
            if promotion.followed_generation == 0 {
                tracing::warn!(
                    fileset = %name, applied = promotion.applied,
                    "promoting a replica that never completed a resync (or was cut short in one): it may lack files"
                );
            }
        }
        // The bcplog (drained), or the pump of an older epoch of this node.
        self.stop_child().await;
        self.entry.plan = Some(plan);
        self.start_child(myself).await.map_err(|e| {
            self.error = Some(e.to_string());
            format!("the pump did not start: {e}")
        })
    }

    async fn become_backup(&mut self, myself: &ActorRef<FilesetMsg>) -> Result<(), String> {
        let e = &self.entry;
        if matches!(e.plan, Some(Plan::Backup { .. })) {
            return self.start_child(myself).await.map_err(|e| e.to_string());
        }
        let plan = self.wiring.backup_plan(e, self.wiring.others(e));
        self.leave().await;
        self.entry.plan = Some(plan);
        self.start_child(myself).await.map_err(|e| {
            self.error = Some(e.to_string());
            format!("the bcplog did not start: {e}")
        })
    }

    /// Stops the fileset's actor. A primary first lets its connected backups acknowledge what
    /// was written (bounded), and its ring is retired: producers left on this node stop
    /// logging.
    async fn leave(&mut self) {
        let Some(Plan::Primary(spec)) = &self.entry.plan else {
            self.stop_child().await;
            return;
        };
        let name = self.name();
        if let Some(Child::Pump(a)) = &self.child {
            match repl::primary::flush(a, &spec.source, HANDOVER_FLUSH_TIMEOUT).await {
                Ok(s) => {
                    tracing::info!(fileset = %name, through = s.next_seq.saturating_sub(1), "the backups have every write")
                }
                Err(err) => {
                    tracing::warn!(fileset = %name, error = %err, "handing over without every write acknowledged; the backups will resync")
                }
            }
        }
        let ring = self.entry.ring.clone();
        self.stop_child().await;
        if let Some(ring) = ring {
            let _ = tokio::task::spawn_blocking(move || repl::primary::retire_ring(&ring)).await;
        }
    }
}

/// Answers a pump's greeting with `Refused`, and says so loudly when the pump's epoch is newer
/// than this node's own primary epoch (this node's ownership is stale: it was cut off).
async fn refuse(mut conn: Conn, fileset: String, reason: String, ours: Option<u64>) {
    let peer = conn.peer_node().to_owned();
    let hello = tokio::time::timeout(REFUSE_GREETING_TIMEOUT, conn.recv::<ToBackup>()).await;
    let theirs = match hello {
        Ok(Ok(ToBackup::Hello { epoch, .. })) => Some(epoch),
        _ => None,
    };
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if theirs > ours => tracing::error!(
            %fileset, %peer, ours, theirs,
            "a pump of a newer ownership epoch connected: this node's primaryship is stale"
        ),
        _ => tracing::warn!(%fileset, %peer, epoch = ?theirs, %reason, "refused a pump"),
    }
    let _ = tokio::time::timeout(
        REFUSE_GREETING_TIMEOUT,
        conn.send(&ToPrimary::Refused {
            reason,
            epoch: ours.unwrap_or(0),
        }),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Instant;

    use cluster::net::{Conn, Listener, NetConfig, Secret};
    use ractor::{Actor, ActorRef};

    use super::*;

    const SECRET: &str = "correct horse battery staple";
    /// Longest wait for anything in these tests (none should come near it).
    const PATIENCE: Duration = Duration::from_secs(30);
    const POLL: Duration = Duration::from_millis(20);

    /// Node `b` of the cluster: it completes the transport handshake of `fileset`'s stream and
    /// then never says a word, so a pump streaming to it waits for acknowledgements forever.
    struct MuteBackup {
        addr: SocketAddr,
        _listener: Listener,
        holder: tokio::task::JoinHandle<()>,
    }

    impl MuteBackup {
        async fn start(fileset: &str) -> MuteBackup {
            let net = NetConfig::new(
                "t",
                "b",
                Secret::new(SECRET.as_bytes().to_vec()).expect("secret"),
            )
            .expect("net config");
            let listener = Listener::bind(&net, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .await
                .expect("bind");
            let mut rx = listener
                .channel(&repl::proto::channel(fileset))
                .expect("channel");
            let holder = tokio::spawn(async move {
                let mut held: Vec<Conn> = Vec::new();
                while let Some(conn) = rx.recv().await {
                    held.push(conn);
                }
            });
            MuteBackup {
                addr: listener.local_addr(),
                _listener: listener,
                holder,
            }
        }
    }

    impl Drop for MuteBackup {
        fn drop(&mut self) {
            self.holder.abort();
        }
    }

    /// Node `a`'s replication supervisor over two group-managed copy-mode filesets, `slow` and
    /// `quick`, whose other node is `b`.
    async fn node_a(dir: &Path, b: SocketAddr) -> (ActorRef<ReplMsg>, Arc<Events>, SocketAddr) {
        let secret = dir.join("secret");
        std::fs::write(&secret, format!("{SECRET}\n")).expect("secret file");
        let s = |p: PathBuf| format!("{:?}", p.display().to_string());
        let text = format!(
            "[watchd]\nnode = \"a\"\ndata_dir = {}\nring_dir = {}\n\n\
             [cluster]\nname = \"t\"\nsecret_file = {}\nlisten = [\"127.0.0.1:0\"]\n\n\
             [[node]]\nname = \"b\"\naddresses = [\"{b}\"]\n\n\
             [[fileset]]\nname = \"slow\"\npath = {}\nprimary = \"group\"\nbackups = [\"a\", \"b\"]\n\
             mode = \"copy\"\nquiet = \"20ms\"\n\n\
             [[fileset]]\nname = \"quick\"\npath = {}\nprimary = \"group\"\nbackups = [\"a\", \"b\"]\n\
             mode = \"copy\"\nquiet = \"20ms\"\n",
            s(dir.join("data")),
            s(dir.join("rings")),
            s(secret),
            s(dir.join("slow")),
            s(dir.join("quick")),
        );
        let config = Config::parse(&dir.join("watchd.toml"), &text).expect("a valid configuration");
        let instance = format!("t{}", std::process::id());
        let setup = setup(&config, &instance)
            .await
            .expect("replication setup")
            .expect("a cluster node");
        let events = Arc::new(Events::new(100));
        let listen = setup.listeners()[0].local_addr();
        let repl = Actor::spawn(
            None,
            ReplSupervisor,
            ReplArgs {
                setup,
                events: events.clone(),
            },
        )
        .await
        .expect("the replication supervisor starts")
        .0;
        (repl, events, listen)
    }

    fn millis(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).expect("small")
    }

    /// Asks for a role change without waiting for the answer.
    fn ask_role(
        repl: &ActorRef<ReplMsg>,
        fileset: &str,
        role: RoleRequest,
    ) -> ractor::concurrency::OneshotReceiver<Result<RoleState, String>> {
        let (tx, rx) = ractor::concurrency::oneshot();
        repl.cast(ReplMsg::SetRole {
            fileset: fileset.to_owned(),
            role,
            reply: tx.into(),
        })
        .expect("the supervisor runs");
        rx
    }

    async fn report(repl: &ActorRef<ReplMsg>, fileset: &str) -> FilesetReport {
        ractor::call_t!(repl, ReplMsg::Status, millis(PATIENCE))
            .expect("the supervisor answers")
            .into_iter()
            .find(|r| r.name == fileset)
            .expect("the fileset is reported")
    }

    /// Stops the supervisor also when the test fails.
    struct Stop(ActorRef<ReplMsg>);

    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.stop(None);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_hand_over_does_not_hold_up_another_filesets_role_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = MuteBackup::start("slow").await;
        let (repl, _, _) = node_a(dir.path(), b.addr).await;
        let _stop = Stop(repl.clone());
        let primary = || RoleRequest::Primary {
            epoch: 1,
            backups: None,
        };

        // `slow` is the primary here, with one write that b never acknowledges.
        let state = ask_role(&repl, "slow", primary())
            .await
            .expect("answered")
            .expect("slow becomes the primary");
        assert_eq!((state.role, state.running), (Role::Primary, true));
        std::fs::write(dir.path().join("slow").join("unacknowledged"), b"x").expect("write");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let r = report(&repl, "slow").await;
            let pending = r.pump.as_ref().is_some_and(|p| {
                p.next_seq > 1 && p.backups.iter().any(|l| l.connected && l.acked == 0)
            });
            if pending {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the write was not sent to b: {r:?}"
            );
            tokio::time::sleep(POLL).await;
        }

        // Handing `slow` over waits (up to HANDOVER_FLUSH_TIMEOUT) for b's acknowledgement.
        // `quick`, asked for after it, does not wait for that.
        let mut slow = ask_role(&repl, "slow", RoleRequest::Backup);
        let quick = ask_role(&repl, "quick", primary());
        let state = tokio::time::timeout(PATIENCE, quick)
            .await
            .expect("quick's role change answers")
            .expect("answered")
            .expect("quick becomes the primary");
        assert_eq!(
            (state.role, state.epoch, state.running),
            (Role::Primary, 1, true)
        );
        assert!(
            slow.try_recv().is_err(),
            "slow's hand-over answered before quick's role change"
        );
        let r = report(&repl, "quick").await;
        assert!(r.pump.is_some(), "quick's pump does not run: {r:?}");

        let state = tokio::time::timeout(PATIENCE, slow)
            .await
            .expect("slow's hand-over answers")
            .expect("answered")
            .expect("slow becomes a backup");
        assert_eq!((state.role, state.running), (Role::Backup, true));
        let r = report(&repl, "slow").await;
        assert!(r.bcplog.is_some() && r.pump.is_none(), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fileset_actor_restarts_in_its_startup_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = MuteBackup::start("slow").await;
        let (repl, events, _) = node_a(dir.path(), b.addr).await;
        let _stop = Stop(repl.clone());
        let primary = |epoch| RoleRequest::Primary {
            epoch,
            backups: None,
        };
        let state = ask_role(&repl, "quick", primary(1))
            .await
            .expect("answered")
            .expect("quick becomes the primary");
        assert_eq!((state.role, state.running), (Role::Primary, true));

        // Every fileset actor dies, and with it its pump or bcplog.
        let actors = repl.get_children();
        assert_eq!(actors.len(), 2, "one actor per fileset");
        let roles: Vec<ractor::ActorCell> = actors.iter().flat_map(|a| a.get_children()).collect();
        assert_eq!(roles.len(), 2, "one pump or bcplog per fileset");
        for a in &actors {
            a.kill();
        }

        // Each comes back in its startup role: a group-managed fileset is a backup.
        let deadline = Instant::now() + PATIENCE;
        for fileset in ["quick", "slow"] {
            loop {
                // A question routed to the killed actor before the supervisor saw it die is
                // dropped with it (no answer): ask again, like any other not-yet.
                let state = ractor::call_t!(
                    repl,
                    |reply| ReplMsg::Role {
                        fileset: fileset.to_owned(),
                        reply
                    },
                    millis(PATIENCE)
                );
                if let Ok(Ok(s)) = &state
                    && s.role == Role::Backup
                    && s.running
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{fileset} did not restart as a backup: {state:?}"
                );
                tokio::time::sleep(POLL).await;
            }
        }
        for r in &roles {
            assert_eq!(
                r.get_status(),
                ractor::ActorStatus::Stopped,
                "a pump or bcplog of a failed fileset actor outlived it"
            );
        }
        let restarted: Vec<String> = events
            .recent(None)
            .into_iter()
            .filter(|e| e.kind == EventKind::ActorRestarted)
            .map(|e| e.detail)
            .collect();
        for fileset in ["quick", "slow"] {
            assert!(
                restarted
                    .iter()
                    .any(|d| d.contains(&format!("fileset {fileset} failed"))),
                "no restart event for {fileset}: {restarted:?}"
            );
        }
        // The supervisor lives on, and the restarted fileset changes roles again.
        assert_eq!(repl.get_status(), ractor::ActorStatus::Running);
        let state = ask_role(&repl, "quick", primary(2))
            .await
            .expect("answered")
            .expect("quick becomes the primary again");
        assert_eq!(
            (state.role, state.epoch, state.running),
            (Role::Primary, 2, true)
        );
        let err = ask_role(&repl, "nothing", RoleRequest::Backup)
            .await
            .expect("answered")
            .expect_err("an unknown fileset");
        assert_eq!(err, "no [[fileset]] named `nothing` on this node");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cluster_listeners_take_connections_while_the_supervisor_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = MuteBackup::start("slow").await;
        let (repl, _, listen) = node_a(dir.path(), b.addr).await;
        let _stop = Stop(repl.clone());
        let net = NetConfig::new(
            "t",
            "b",
            Secret::new(SECRET.as_bytes().to_vec()).expect("secret"),
        )
        .expect("net config");
        // b's pump of `quick` reaches a, a backup of it (membership dials the same ports).
        let conn = cluster::net::connect_addr(&net, listen, &repl::proto::channel("quick")).await;
        assert!(conn.is_ok(), "a did not take the connection: {conn:?}");
    }
}
