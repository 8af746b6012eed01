//! watchd's cluster node: membership, quorum and the cluster database of this host, driven
//! over `cluster::net` by the node actor on a dedicated real-time thread, with its durable
//! state in redb, and its verdict (may this node act?), database and events for
//! `ftctl cluster ...` / `ftctl node ...`.
//!
//! Owns the wiring only: the rules are the cluster crate's sans-IO machines
//! (`cluster::membership`, `cluster::quorum`, `cluster::gum`). Nothing here runs on watchd's
//! main event loop except the supervisor and the control queries, which never wait for the
//! node thread longer than a bounded call.

pub mod actor;
pub mod disk;
pub mod lane;
pub mod report;
pub mod rt;
pub mod store;
pub mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cluster::gum::{GumConfig, GumError, Update};
use cluster::net::{Listener, NetConfig, Secret};
use cluster::quorum::Votes;
use ractor::{Actor, ActorRef};

use self::actor::{NodeMsg, NodeSetup, NodeSupervisor, SupervisorMsg};
use self::report::{ClusterEvent, ClusterStatus, DbReport, NodeShared};
use self::rt::NodeRuntime;
use self::store::Store;
use self::transport::Transport;
use crate::config::{ClusterConfig, Config};

/// How long an operator's request may wait for the node actor.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Beyond the global update manager's own request timeout (it always answers within that),
/// how long a caller waits for the node actor.
const UPDATE_MARGIN: Duration = Duration::from_secs(2);
/// How long watchd's shutdown waits for the node actor to stop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why an operator's request about a node was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeRequestError {
    /// No such node in the configuration.
    #[error("node `{0}` is not in this cluster's configuration")]
    UnknownNode(String),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
    /// The node actor did not take the request (restarting, or gone).
    #[error("the cluster node actor is unavailable ({0}); try again")]
    Unavailable(String),
    /// The global update manager did not apply the update.
    #[error("{0}")]
    Update(GumError),
}

/// The running cluster node, as the daemon and the control server see it.
#[derive(Debug)]
pub struct NodeHandle {
    cluster: String,
    me: String,
    nodes: std::collections::BTreeSet<String>,
    disk: Option<PathBuf>,
    realtime: bool,
    shared: Arc<NodeShared>,
    transport: Transport,
    supervisor: ActorRef<SupervisorMsg>,
    /// How long a caller of [`NodeHandle::update`] waits at most.
    update_timeout: Duration,
}

impl NodeHandle {
    /// Starts membership (and the quorum disk) for `config`'s `[cluster]`. `listeners` are the
    /// cluster listeners, one per `listen` address in order, bound on `rt`'s thread; `store`
    /// is this node's durable state.
    pub async fn start(
        config: &Config,
        rt: &NodeRuntime,
        listeners: &[Listener],
        store: Store,
    ) -> anyhow::Result<NodeHandle> {
        let cluster: &ClusterConfig = config
            .cluster
            .as_ref()
            .context("a cluster node needs a [cluster] table")?;
        let me = config.node_name();
        let secret = Secret::from_file(&cluster.secret_file)
            .with_context(|| format!("cluster secret {}", cluster.secret_file.display()))?;
        let mut net = NetConfig::new(cluster.name.get_ref().clone(), me.clone(), secret)?;
        net.max_frame = usize::try_from(cluster.max_frame.0).unwrap_or(usize::MAX);
        net.handshake_timeout = cluster.handshake_timeout;
        net.validate()?;
        let networks = cluster.network_names();
        let inbound = listeners
            .iter()
            .map(|l| l.channel(transport::CHANNEL))
            .collect::<Result<Vec<_>, _>>()
            .context("cannot open the membership channel on the cluster listeners")?;
        let peers: BTreeMap<String, Vec<SocketAddr>> = config
            .nodes
            .iter()
            .filter(|n| *n.name.get_ref() != me)
            .map(|n| (n.name.get_ref().clone(), n.addresses.clone()))
            .collect();
        let membership = cluster.membership_config(&me, &config.nodes);
        membership.validate(&me)?;
        let disk = cluster
            .disk_config(&me, &config.nodes)
            .zip(cluster.quorum_disk.clone());
        let transport = Transport::start(
            rt.handle(),
            net,
            networks,
            peers,
            inbound,
            membership.link_down_after(),
            membership.suspect_after().saturating_mul(2),
        );
        let gum = GumConfig::new(membership.nodes.iter().cloned(), disk.is_some());
        gum.validate(&me)?;
        let gum_request_timeout = gum.request_timeout;
        let votes = Votes::new(membership.nodes.iter().cloned(), disk.is_some());
        let shared = Arc::new(NodeShared::new(me.clone(), votes));
        let setup = Arc::new(NodeSetup {
            me: me.clone(),
            membership: membership.clone(),
            gum,
            disk: disk.clone(),
            transport: transport.clone(),
            store,
            shared: shared.clone(),
            rt: rt.handle().clone(),
        });
        let (supervisor, _) = Actor::spawn(None, NodeSupervisor, setup)
            .await
            .context("cannot start the cluster node supervisor")?;
        Ok(NodeHandle {
            cluster: cluster.name.get_ref().clone(),
            me,
            nodes: membership.nodes,
            disk: disk.map(|(_, p)| p),
            realtime: rt.is_realtime(),
            shared,
            transport,
            supervisor,
            update_timeout: gum_request_timeout.saturating_add(UPDATE_MARGIN),
        })
    }

    /// Whether this node may act now (member of a view with quorum; see
    /// `cluster::membership`).
    pub fn acting(&self) -> bool {
        self.shared.acting()
    }

    /// Follows the acting verdict: every change, starting with the current value. Whoever
    /// owns groups must stop them at once when it turns false.
    pub fn subscribe_acting(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.subscribe_acting()
    }

    /// Until when this node may keep running its groups while it does not act (a view change
    /// in progress): membership's run lease, `None` once it lapsed.
    pub fn run_lease(&self) -> Option<std::time::Instant> {
        self.shared.run_lease()
    }

    /// `ftctl cluster status`.
    pub fn status(&self) -> ClusterStatus {
        self.shared.status(
            &self.cluster,
            self.disk.as_ref().map(|p| p.display().to_string()),
            self.realtime,
            &self.transport,
        )
    }

    /// `ftctl cluster events`.
    pub fn events(&self, last: Option<usize>) -> Vec<ClusterEvent> {
        self.shared.events(last)
    }

    /// `ftctl cluster db`.
    pub fn db(&self) -> DbReport {
        self.shared.db()
    }

    /// `ftctl cluster set|unset|update`: hands `update` to the global update manager; `Ok(seq)`
    /// once every member of the view (and the quorum disk, where it votes) has it.
    pub async fn update(&self, update: Update) -> Result<u64, NodeRequestError> {
        let actor = self
            .shared
            .actor()
            .ok_or_else(|| NodeRequestError::Unavailable("restarting".into()))?;
        let wait = self.update_timeout;
        match actor
            .call(|reply| NodeMsg::Propose { update, reply }, Some(wait))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(Ok(seq))) => Ok(seq),
            Ok(ractor::rpc::CallResult::Success(Err(e))) => Err(NodeRequestError::Update(e)),
            Ok(_) => Err(NodeRequestError::Update(GumError::Timeout)),
            Err(e) => Err(NodeRequestError::Unavailable(e.to_string())),
        }
    }

    /// `ftctl node pause|resume NODE`: asks for the member's pause; the next regroup applies
    /// it.
    pub async fn set_paused(&self, node: &str, paused: bool) -> Result<String, NodeRequestError> {
        if !self.nodes.contains(node) {
            return Err(NodeRequestError::UnknownNode(node.to_owned()));
        }
        self.ask(|reply| NodeMsg::SetPaused {
            node: node.to_owned(),
            paused,
            reply,
        })
        .await?;
        Ok(format!(
            "{} of {node} requested; the next view applies it",
            if paused { "pause" } else { "resume" }
        ))
    }

    /// `ftctl node leave NODE`: only this node can leave (it announces it to the others).
    pub async fn leave(&self, node: &str) -> Result<String, NodeRequestError> {
        if !self.nodes.contains(node) {
            return Err(NodeRequestError::UnknownNode(node.to_owned()));
        }
        if node != self.me {
            return Err(NodeRequestError::Refused(format!(
                "a node leaves on its own: run `ftctl node leave {node}` against {node}'s watchd (this is {})",
                self.me
            )));
        }
        self.ask(NodeMsg::Leave).await?;
        Ok(format!(
            "{node} leaves the cluster (it stops acting now; the others remove it without a regroup)"
        ))
    }

    async fn ask(
        &self,
        msg: impl FnOnce(ractor::RpcReplyPort<()>) -> NodeMsg,
    ) -> Result<(), NodeRequestError> {
        let actor = self
            .shared
            .actor()
            .ok_or_else(|| NodeRequestError::Unavailable("restarting".into()))?;
        match actor.call(msg, Some(REQUEST_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(())) => Ok(()),
            Ok(_) => Err(NodeRequestError::Unavailable("no answer in time".into())),
            Err(e) => Err(NodeRequestError::Unavailable(e.to_string())),
        }
    }

    /// Stops the node actor (watchd is stopping). Peers will suspect this node.
    pub async fn shutdown(&self) {
        let _ = self
            .supervisor
            .call(SupervisorMsg::Shutdown, Some(SHUTDOWN_TIMEOUT))
            .await;
        self.supervisor.stop(None);
    }
}
