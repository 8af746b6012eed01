//! watchd's file replication: turns `[cluster]`, `[[node]]` and `[[fileset]]` into running pump
//! and bcplog actors under one supervisor, tells services where their filesets' rings are,
//! switches the role of group-managed filesets (`primary = "group"`) when the group executor
//! says so ([`ReplMsg::SetRole`]), and answers `ftctl repl status`.
//!
//! Owns the wiring only: the stream's rules live in the `repl` crate. A failed pump or bcplog
//! actor is restarted after a pause (its durable state is on disk and in the ring); it never
//! takes the daemon or a service down. It never runs a pump and a bcplog of one fileset at once.

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
/// How long stopping a pump or bcplog actor may take.
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
#[derive(Debug)]
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

/// What services are told, and what the supervisor runs. `None` without a `[cluster]`.
pub struct Setup {
    /// The environment for services.
    pub env: ReplEnv,
    listeners: Vec<Listener>,
    filesets: Vec<Entry>,
    net: NetConfig,
    node: String,
    peers: BTreeMap<String, Vec<SocketAddr>>,
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

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.filesets.iter().find(|e| e.name() == name)
    }

    fn entry_mut(&mut self, name: &str) -> Option<&mut Entry> {
        self.filesets.iter_mut().find(|e| e.name() == name)
    }

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
        net,
        node: node.clone(),
        peers,
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
        entry.plan = if primary_here {
            Some(setup.primary_plan(&entry, STATIC_EPOCH, &f.backups))
        } else if managed && member {
            Some(setup.backup_plan(&entry, setup.others(&entry)))
        } else if member {
            Some(setup.backup_plan(&entry, vec![f.primary.clone()]))
        } else {
            None
        };
        setup.filesets.push(entry);
    }
    setup.env = env;
    Ok(Some(setup))
}

/// Messages of the replication supervisor.
#[derive(Debug)]
pub enum ReplMsg {
    /// Start (again) the actor of this fileset's current role.
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

/// The supervisor of every pump and bcplog actor.
#[derive(Debug)]
pub struct ReplSupervisor;

#[derive(Debug)]
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
}

/// Its state.
#[derive(Debug)]
pub struct ReplState {
    setup: Setup,
    events: Arc<Events>,
    children: BTreeMap<String, Child>,
    ids: BTreeMap<ActorId, String>,
    errors: BTreeMap<String, String>,
    /// Tasks handing connections from the listeners to the supervisor.
    gates: Vec<tokio::task::JoinHandle<()>>,
}

/// What the supervisor starts from.
#[derive(Debug)]
pub struct ReplArgs {
    /// The planned filesets.
    pub setup: Setup,
    /// Events hub (actor restarts are events).
    pub events: Arc<Events>,
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
        for e in &args.setup.filesets {
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
            if e.plan.is_some() {
                myself.cast(ReplMsg::Start(e.name().to_owned()))?;
            }
        }
        Ok(ReplState {
            setup: args.setup,
            events: args.events,
            children: BTreeMap::new(),
            ids: BTreeMap::new(),
            errors: BTreeMap::new(),
            gates,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ReplMsg>,
        st: &mut ReplState,
    ) -> Result<(), ActorProcessingErr> {
        for g in &st.gates {
            g.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ReplMsg>,
        msg: ReplMsg,
        st: &mut ReplState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReplMsg::Start(name) => {
                if let Err(e) = start_child(&myself, st, &name).await {
                    tracing::error!(fileset = %name, error = %e, "replication did not start; retrying");
                    st.errors.insert(name.clone(), e.to_string());
                    let me = myself.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(RESTART_PAUSE * 4).await;
                        let _ = me.cast(ReplMsg::Start(name));
                    });
                }
            }
            ReplMsg::Status(reply) => {
                let _ = reply.send(status(st).await);
            }
            ReplMsg::SetRole {
                fileset,
                role,
                reply,
            } => {
                let result = set_role(&myself, st, &fileset, role).await;
                match &result {
                    Ok(r) => {
                        tracing::info!(%fileset, role = ?r.role, epoch = r.epoch, "fileset role set");
                    }
                    Err(e) => {
                        tracing::warn!(%fileset, error = %e, "fileset role not set");
                    }
                }
                let _ = reply.send(result);
            }
            ReplMsg::Role { fileset, reply } => {
                let _ = reply.send(role_state(st, &fileset));
            }
            ReplMsg::Config { fileset, reply } => {
                let _ = reply.send(
                    st.setup
                        .entry(&fileset)
                        .map(|e| (e.config.clone(), e.member)),
                );
            }
            ReplMsg::Incoming { fileset, conn } => incoming(st, &fileset, conn),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ReplMsg>,
        evt: SupervisionEvent,
        st: &mut ReplState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        // Actors stopped on purpose (a role change) were forgotten before they stopped.
        let Some(name) = st.ids.remove(&cell.get_id()) else {
            return Ok(());
        };
        st.children.remove(&name);
        st.errors.insert(name.clone(), why.clone());
        st.events.emit(
            None,
            EventKind::ActorRestarted,
            format!("replication actor of fileset {name} failed ({why}); restarting"),
        );
        let me = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RESTART_PAUSE).await;
            let _ = me.cast(ReplMsg::Start(name));
        });
        Ok(())
    }
}

async fn status(st: &ReplState) -> Vec<FilesetReport> {
    let mut out = Vec::new();
    for e in &st.setup.filesets {
        let name = e.name().to_owned();
        let (mut pump, mut bcplog) = (None, None);
        match st.children.get(&name) {
            Some(Child::Pump(a)) => {
                pump = ractor::call_t!(a, PumpMsg::Status, STATUS_TIMEOUT_MS).ok();
            }
            Some(Child::Bcplog(a)) => {
                bcplog = ractor::call_t!(a, BcplogMsg::Status, STATUS_TIMEOUT_MS).ok();
            }
            None => {}
        }
        let f = &e.config;
        let primary_node = match (f.group_managed(), e.role()) {
            (true, Role::Primary) => st.setup.node.clone(),
            _ => f.primary.clone(),
        };
        out.push(FilesetReport {
            name: name.clone(),
            role: e.role(),
            mode: match f.mode {
                FilesetMode::Replay => "replay",
                FilesetMode::Copy => "copy",
            }
            .into(),
            sync: f.sync,
            path: f.path.display().to_string(),
            primary_node,
            epoch: e.epoch(),
            pump,
            bcplog,
            error: st.errors.get(&name).cloned(),
        });
    }
    out
}

fn role_state(st: &ReplState, fileset: &str) -> Result<RoleState, String> {
    let e = st
        .setup
        .entry(fileset)
        .ok_or_else(|| format!("no [[fileset]] named `{fileset}` on this node"))?;
    let running = matches!(
        (&e.plan, st.children.get(fileset)),
        (Some(Plan::Primary(_)), Some(Child::Pump(_)))
            | (Some(Plan::Backup { .. }), Some(Child::Bcplog(_)))
    );
    Ok(RoleState {
        role: e.role(),
        epoch: e.epoch(),
        running,
        error: st.errors.get(fileset).cloned(),
    })
}

/// A pump connected: the bcplog takes it, or it is told why not.
fn incoming(st: &ReplState, fileset: &str, conn: Box<Conn>) {
    let Some(e) = st.setup.entry(fileset) else {
        return;
    };
    if let (Some(Plan::Backup { .. }), Some(Child::Bcplog(a))) = (&e.plan, st.children.get(fileset))
    {
        let _ = a.cast(BcplogMsg::NewConn(conn));
        return;
    }
    let node = &st.setup.node;
    let (reason, ours) = match &e.plan {
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

async fn start_child(
    myself: &ActorRef<ReplMsg>,
    st: &mut ReplState,
    name: &str,
) -> anyhow::Result<()> {
    if st.children.contains_key(name) {
        return Ok(());
    }
    let Some(plan) = st.setup.entry(name).and_then(|e| e.plan.as_ref()) else {
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
            let (a, _) = Actor::spawn_linked(None, BcplogActor, args, myself.get_cell()).await?;
            Child::Bcplog(a)
        }
    };
    st.ids.insert(child.id(), name.to_owned());
    st.children.insert(name.to_owned(), child);
    st.errors.remove(name);
    Ok(())
}

/// Stops the fileset's actor on purpose (it is forgotten first, so it is not restarted).
async fn stop_child(st: &mut ReplState, name: &str) {
    let Some(child) = st.children.remove(name) else {
        return;
    };
    st.ids.remove(&child.id());
    let stopped = match &child {
        Child::Pump(a) => a.stop_and_wait(None, Some(STOP_TIMEOUT)).await,
        Child::Bcplog(a) => a.stop_and_wait(None, Some(STOP_TIMEOUT)).await,
    };
    if let Err(e) = stopped {
        tracing::warn!(fileset = %name, error = %e, "a replication actor did not stop in time");
    }
}

async fn set_role(
    myself: &ActorRef<ReplMsg>,
    st: &mut ReplState,
    name: &str,
    role: RoleRequest,
) -> Result<RoleState, String> {
    let e = st
        .setup
        .entry(name)
        .ok_or_else(|| format!("no [[fileset]] named `{name}` on this node"))?;
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
            st.setup.node
        ));
    }
    match role {
        RoleRequest::Primary { epoch, backups } => {
            become_primary(myself, st, name, epoch, backups).await?
        }
        RoleRequest::Backup => become_backup(myself, st, name).await?,
        RoleRequest::None => {
            leave(st, name).await;
            if let Some(e) = st.setup.entry_mut(name) {
                e.plan = None;
            }
            st.errors.remove(name);
        }
    }
    role_state(st, name)
}

async fn become_primary(
    myself: &ActorRef<ReplMsg>,
    st: &mut ReplState,
    name: &str,
    epoch: u64,
    backups: Option<Vec<String>>,
) -> Result<(), String> {
    if epoch == 0 {
        return Err("epoch 0 is not an ownership epoch".into());
    }
    let e = st.setup.entry(name).ok_or("fileset vanished")?;
    if let Some(Plan::Primary(spec)) = &e.plan {
        if spec.epoch == epoch {
            // Already (or still, after a failed start) the primary of this epoch.
            return start_child(myself, st, name)
                .await
                .map_err(|e| e.to_string());
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
    let others = st.setup.others(e);
    let backups = backups.unwrap_or_else(|| others.clone());
    for b in &backups {
        if !others.contains(b) {
            return Err(format!(
                "node {b} is not another node of fileset {name} (its `backups`: {})",
                e.config.backups.join(", ")
            ));
        }
    }
    let plan = st.setup.primary_plan(e, epoch, &backups);
    // The replica to drain: this node's, unless it is the primary already (of an older
    // epoch: its files are the original, its log was drained when it became the primary).
    let backup_spec = match &e.plan {
        Some(Plan::Primary(_)) => None,
        Some(Plan::Backup { spec, .. }) => Some(spec.clone()),
        None => match st.setup.backup_plan(e, Vec::new()) {
            Plan::Backup { spec, .. } => Some(spec),
            Plan::Primary(_) => None,
        },
    };
    if let Some(spec) = backup_spec {
        let promotion = match st.children.get(name) {
            Some(Child::Bcplog(a)) => ractor::call_t!(a, BcplogMsg::Promote, PROMOTE_TIMEOUT_MS)
                .map_err(|e| format!("draining the replica: {e}"))??,
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
    stop_child(st, name).await;
    if let Some(e) = st.setup.entry_mut(name) {
        e.plan = Some(plan);
    }
    start_child(myself, st, name).await.map_err(|e| {
        st.errors.insert(name.to_owned(), e.to_string());
        format!("the pump did not start: {e}")
    })
}

async fn become_backup(
    myself: &ActorRef<ReplMsg>,
    st: &mut ReplState,
    name: &str,
) -> Result<(), String> {
    let e = st.setup.entry(name).ok_or("fileset vanished")?;
    if matches!(e.plan, Some(Plan::Backup { .. })) {
        return start_child(myself, st, name)
            .await
            .map_err(|e| e.to_string());
    }
    let plan = st.setup.backup_plan(e, st.setup.others(e));
    leave(st, name).await;
    if let Some(e) = st.setup.entry_mut(name) {
        e.plan = Some(plan);
    }
    start_child(myself, st, name).await.map_err(|e| {
        st.errors.insert(name.to_owned(), e.to_string());
        format!("the bcplog did not start: {e}")
    })
}

/// Stops the fileset's actor. A primary first lets its connected backups acknowledge what was
/// written (bounded), and its ring is retired: producers left on this node stop logging.
async fn leave(st: &mut ReplState, name: &str) {
    let Some(e) = st.setup.entry(name) else {
        return;
    };
    if let Some(Plan::Primary(spec)) = &e.plan {
        if let Some(Child::Pump(a)) = st.children.get(name) {
            match repl::primary::flush(a, &spec.source, HANDOVER_FLUSH_TIMEOUT).await {
                Ok(s) => {
                    tracing::info!(fileset = %name, through = s.next_seq.saturating_sub(1), "the backups have every write")
                }
                Err(err) => {
                    tracing::warn!(fileset = %name, error = %err, "handing over without every write acknowledged; the backups will resync")
                }
            }
        }
        let ring = e.ring.clone();
        stop_child(st, name).await;
        if let Some(ring) = ring {
            let _ = tokio::task::spawn_blocking(move || repl::primary::retire_ring(&ring)).await;
        }
    } else {
        stop_child(st, name).await;
    }
}
