//! watchd's file replication: turns `[cluster]`, `[[node]]` and `[[fileset]]` into running pump
//! and bcplog actors under one supervisor, tells services where their filesets' rings are, and
//! answers `ftctl repl status`.
//!
//! Owns the wiring only: the stream's rules live in the `repl` crate. A failed pump or bcplog
//! actor is restarted after a pause (its durable state is on disk and in the ring); it never
//! takes the daemon or a service down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cluster::net::{Listener, NetConfig, Secret};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use repl::backup::BackupSpec;
use repl::bcplog::{BcplogActor, BcplogArgs, BcplogMsg, BcplogStatus};
use repl::primary::{Peer, PrimarySpec, PrimaryStatus, PumpActor, PumpMsg, SourceSpec};
use repl::proto::Mode;
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
/// The ownership epoch until the cluster core hands out real ones.
const STATIC_EPOCH: u64 = 1;

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
    /// The primary's node name.
    pub primary_node: String,
    /// The pump's state (primary).
    pub pump: Option<PrimaryStatus>,
    /// The bcplog's state (backup).
    pub bcplog: Option<BcplogStatus>,
    /// Why the actor is not running, when it is not.
    pub error: Option<String>,
}

enum Plan {
    Primary(PrimarySpec),
    Backup { spec: BackupSpec, primary: String },
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Primary(s) => write!(f, "Primary({})", s.fileset),
            Plan::Backup { spec, .. } => write!(f, "Backup({})", spec.fileset),
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
    plans: Vec<(FilesetConfig, Option<Plan>)>,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("env", &self.env)
            .field("listeners", &self.listeners.len())
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

/// Reads the secret, binds the listeners and plans every fileset.
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
    let mut plans = Vec::new();
    for f in &config.filesets {
        std::fs::create_dir_all(&f.path)
            .with_context(|| format!("fileset {}: cannot create {}", f.name(), f.path.display()))?;
        let root = std::fs::canonicalize(&f.path)
            .with_context(|| format!("fileset {}: {}", f.name(), f.path.display()))?;
        let plan = if f.primary == node {
            let source = match f.mode {
                FilesetMode::Replay => {
                    let ring = ring_path(&config.watchd.ring_dir, instance, f.name());
                    env.entries.insert(
                        f.name().to_owned(),
                        format!("{}|{}|{}", f.name(), root.display(), ring.display()),
                    );
                    if f.sync {
                        env.sync_timeout = env.sync_timeout.max(Some(f.sync_timeout));
                    }
                    SourceSpec::Ring {
                        path: ring,
                        capacity: f.ring_size.0,
                    }
                }
                FilesetMode::Copy => SourceSpec::Copy { quiet: f.quiet },
            };
            let backups = f
                .backups
                .iter()
                .map(|b| Peer {
                    name: b.clone(),
                    addrs: peers.get(b).cloned().unwrap_or_default(),
                })
                .collect();
            Some(Plan::Primary(PrimarySpec {
                fileset: f.name().to_owned(),
                root,
                source,
                backups,
                epoch: STATIC_EPOCH,
                pump: PumpConfig {
                    mode: if f.sync { Mode::Sync } else { Mode::Async },
                    max_retained_bytes: usize::try_from(f.max_retained.0).unwrap_or(usize::MAX),
                    ..PumpConfig::default()
                },
                net: net.clone(),
            }))
        } else if f.backups.contains(&node) {
            Some(Plan::Backup {
                spec: BackupSpec {
                    fileset: f.name().to_owned(),
                    root,
                    state_dir: config.watchd.data_dir.join("repl").join(f.name()),
                    segment: SegmentOptions::default(),
                },
                primary: f.primary.clone(),
            })
        } else {
            None
        };
        plans.push((f.clone(), plan));
    }
    Ok(Some(Setup {
        env,
        listeners,
        plans,
    }))
}

/// Messages of the replication supervisor.
#[derive(Debug)]
pub enum ReplMsg {
    /// Start (again) the actor of this fileset.
    Start(String),
    /// Report every fileset.
    Status(RpcReplyPort<Vec<FilesetReport>>),
}

/// The supervisor of every pump and bcplog actor.
#[derive(Debug)]
pub struct ReplSupervisor;

#[derive(Debug)]
enum Child {
    Pump(ActorRef<PumpMsg>),
    Bcplog(ActorRef<BcplogMsg>),
}

/// Its state.
#[derive(Debug)]
pub struct ReplState {
    setup: Setup,
    events: Arc<Events>,
    children: BTreeMap<String, Child>,
    ids: BTreeMap<ActorId, String>,
    errors: BTreeMap<String, String>,
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
        for (f, plan) in &args.setup.plans {
            if plan.is_some() {
                myself.cast(ReplMsg::Start(f.name().to_owned()))?;
            }
        }
        Ok(ReplState {
            setup: args.setup,
            events: args.events,
            children: BTreeMap::new(),
            ids: BTreeMap::new(),
            errors: BTreeMap::new(),
        })
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
                let mut out = Vec::new();
                for (f, plan) in &st.setup.plans {
                    let name = f.name().to_owned();
                    let role = match plan {
                        Some(Plan::Primary(_)) => Role::Primary,
                        Some(Plan::Backup { .. }) => Role::Backup,
                        None => Role::None,
                    };
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
                    out.push(FilesetReport {
                        name: name.clone(),
                        role,
                        mode: match f.mode {
                            FilesetMode::Replay => "replay",
                            FilesetMode::Copy => "copy",
                        }
                        .into(),
                        sync: f.sync,
                        path: f.path.display().to_string(),
                        primary_node: f.primary.clone(),
                        pump,
                        bcplog,
                        error: st.errors.get(&name).cloned(),
                    });
                }
                let _ = reply.send(out);
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
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
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

async fn start_child(
    myself: &ActorRef<ReplMsg>,
    st: &mut ReplState,
    name: &str,
) -> anyhow::Result<()> {
    let Some((_, Some(plan))) = st.setup.plans.iter().find(|(f, _)| f.name() == name) else {
        return Ok(());
    };
    let child = match plan {
        Plan::Primary(spec) => {
            let (a, _) =
                Actor::spawn_linked(None, PumpActor, spec.clone(), myself.get_cell()).await?;
            Child::Pump(a)
        }
        Plan::Backup { spec, primary } => {
            let channel = repl::proto::channel(name);
            let conns = st
                .setup
                .listeners
                .iter()
                .map(|l| l.channel(&channel))
                .collect::<Result<Vec<_>, _>>()?;
            let args = BcplogArgs {
                spec: spec.clone(),
                primary: primary.clone(),
                conns,
            };
            let (a, _) = Actor::spawn_linked(None, BcplogActor, args, myself.get_cell()).await?;
            Child::Bcplog(a)
        }
    };
    let id = match &child {
        Child::Pump(a) => a.get_id(),
        Child::Bcplog(a) => a.get_id(),
    };
    st.ids.insert(id, name.to_owned());
    st.children.insert(name.to_owned(), child);
    st.errors.remove(name);
    Ok(())
}
