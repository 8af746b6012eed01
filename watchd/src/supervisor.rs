//! The actors: one [`ServiceSupervisor`] per service under one [`Root`] (ractor).
//!
//! They are thin adapters: they feed the service's [`ServiceMachine`] with inputs (pidfd exits,
//! heartbeats, probe results, timer ticks, operator requests) and carry out its actions (spawn,
//! signal the tree, record events, escalate). Rules never live here. Blocking work (fork/exec,
//! registry fsync, log rotation) runs off the actors' event loops. A panic in a service actor is
//! caught by ractor; the root restarts the actor, which re-adopts the running process by pidfd
//! instead of touching it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::task::JoinHandle;

use crate::api::{Response, ServiceStatus};
use crate::board::{Board, Mark};
use crate::cgroup::{Cgroup, CgroupRoot};
use crate::config::{Config, MAX_HEARTBEAT_TIMEOUT, RestartFrom, ServiceConfig};
use crate::events::Events;
use crate::listener::{Counters, Deliver, Directory};
use crate::machine::{Action, EventKind, ExitStatus, Input, Rules, ServiceMachine, TreeSignal};
use crate::registry::{Record, Registry};
use crate::transparent::{self, Checkpointer};
use crate::{logs, probe, process};

/// How long the escalation hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// What every actor shares: the daemon's fixed facts and its hubs.
#[derive(Debug)]
pub struct Shared {
    /// This node's name (`FT_NODE`).
    pub node: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The configuration file, for reloads.
    pub config_path: PathBuf,
    /// Event hub.
    pub events: Arc<Events>,
    /// Durable registry of running processes.
    pub registry: Registry,
    /// pid → service, for the listener.
    pub directory: Arc<Directory>,
    /// Listener counters, for status.
    pub counters: Arc<Counters>,
    /// watchd's cgroup, when services get their own.
    pub cgroups: Option<CgroupRoot>,
    /// libft's socket path (`FT_SOCKET`).
    pub ft_socket: PathBuf,
    /// sd_notify socket path (`NOTIFY_SOCKET`).
    pub notify_socket: PathBuf,
    /// Accept test-only control requests (fault injection).
    pub test_hooks: bool,
    /// What services are told about replicated filesets (set once at start).
    pub repl_env: std::sync::OnceLock<ReplEnv>,
    /// The replication supervisor, when this node is in a cluster.
    pub repl: std::sync::OnceLock<ActorRef<crate::repl::ReplMsg>>,
    /// The live service actors, by name.
    pub actors: RwLock<HashMap<String, ActorRef<ServiceMsg>>>,
    /// Configuration order of the services, for listings.
    pub order: RwLock<Vec<String>>,
    /// Each service's heartbeat board, written by the listener.
    boards: RwLock<HashMap<String, Arc<Board>>>,
    /// The process each service's actor watches; survives an actor's restart.
    live: Mutex<HashMap<String, Live>>,
    /// Where each service's libft registered from: (pid, address), for requests to it.
    replies: Mutex<HashMap<String, (u32, nix::sys::socket::UnixAddr)>>,
    /// watchd's end of the libft socket, for those requests.
    ft_sender: Mutex<Option<std::os::unix::net::UnixDatagram>>,
    /// The transparent checkpointers of the services that have them (held by their actors).
    checkpointers: Mutex<HashMap<String, Arc<Checkpointer>>>,
    /// Environment a resource group adds to a service's next starts (`FT_EPOCH`, `FT_GROUP`).
    pub group_env: Mutex<HashMap<String, Vec<(String, String)>>>,
    /// The resource group executor, when this node is in a cluster.
    pub groups: std::sync::OnceLock<crate::group::executor::GroupsHandle>,
}

/// The variable that lists a service's filesets for libft and the shim.
pub const ENV_REPL_FILESETS: &str = ft::replog::fileset::ENV_FILESETS;

/// The environment that tells a service's libft and the shim about its filesets.
#[derive(Debug, Clone, Default)]
pub struct ReplEnv {
    /// Fileset name → its `FT_REPL_FILESETS` entry (`NAME|ROOT|RING`).
    pub entries: BTreeMap<String, String>,
    /// The LD_PRELOAD shim, for services with `repl_shim = true`.
    pub shim: Option<PathBuf>,
    /// How long a sync-mode write waits for the backups (the longest of the filesets).
    pub sync_timeout: Option<Duration>,
}

#[derive(Debug)]
struct Live {
    pid: u32,
    start_time: u64,
    waiter: tokio::task::AbortHandle,
}

impl Shared {
    /// Builds the shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        data_dir: PathBuf,
        config_path: PathBuf,
        events: Arc<Events>,
        registry: Registry,
        directory: Arc<Directory>,
        counters: Arc<Counters>,
        cgroups: Option<CgroupRoot>,
        ft_socket: PathBuf,
        notify_socket: PathBuf,
        test_hooks: bool,
    ) -> Shared {
        Shared {
            node,
            data_dir,
            config_path,
            events,
            registry,
            directory,
            counters,
            cgroups,
            ft_socket,
            notify_socket,
            test_hooks,
            repl_env: std::sync::OnceLock::new(),
            repl: std::sync::OnceLock::new(),
            actors: RwLock::default(),
            order: RwLock::default(),
            live: Mutex::default(),
            boards: RwLock::default(),
            replies: Mutex::default(),
            ft_sender: Mutex::default(),
            checkpointers: Mutex::default(),
            group_env: Mutex::default(),
            groups: std::sync::OnceLock::new(),
        }
    }

    /// The transparent checkpointer of `service`, when it has transparent checkpoints.
    pub fn checkpointer(&self, service: &str) -> Option<Arc<Checkpointer>> {
        self.checkpointers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
            .cloned()
    }

    fn set_checkpointer(&self, service: &str, c: Option<Arc<Checkpointer>>) {
        let mut map = self
            .checkpointers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match c {
            Some(c) => map.insert(service.to_owned(), c),
            None => map.remove(service),
        };
    }

    /// The heartbeat board of `service` (made on first use).
    pub fn board(&self, service: &str) -> Arc<Board> {
        if let Some(b) = self
            .boards
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
        {
            return b.clone();
        }
        self.boards
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(service.to_owned())
            .or_default()
            .clone()
    }

    /// Sets the socket requests to applications are sent from (the libft listener's).
    pub fn set_ft_sender(&self, sock: std::os::unix::net::UnixDatagram) {
        *self
            .ft_sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sock);
    }

    /// Sends "checkpoint `stream` now" to the process of `service` that registered with libft.
    /// Returns its pid, or why it cannot be asked.
    pub fn request_checkpoint(&self, service: &str, stream: u32) -> Result<u32, String> {
        self.send_to_app(service, &ft::proto::WatchdMessage::CheckpointNow { stream })
    }

    /// Promotes the warm standby instance of `service` (started with `FT_ROLE=standby`) in
    /// place, with ownership epoch `epoch`: libft tells the application, which serves from
    /// then on (`ftctl promote`; the group executor when a warm-standby group moves here).
    /// Returns its pid, or why it cannot be told.
    pub fn request_promote(&self, service: &str, epoch: u64) -> Result<u32, String> {
        self.send_to_app(service, &ft::proto::WatchdMessage::Promote { epoch })
    }

    /// Sends `message` to the process of `service` that registered with libft.
    fn send_to_app(
        &self,
        service: &str,
        message: &ft::proto::WatchdMessage,
    ) -> Result<u32, String> {
        let (pid, addr) = self
            .replies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
            .cloned()
            .ok_or_else(|| format!("`{service}` has no process registered with libft"))?;
        if self.directory.resolve(pid).as_deref() != Some(service) {
            return Err(format!(
                "`{service}`: the process that registered (pid {pid}) is gone"
            ));
        }
        let sender = self
            .ft_sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sock = sender.as_ref().ok_or("the libft socket is not open")?;
        let mut buf = [0u8; ft::proto::MAX_DATAGRAM];
        let n = message.encode(&mut buf);
        nix::sys::socket::sendto(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            &buf[..n],
            &addr,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map_err(|e| format!("cannot reach pid {pid} of `{service}`: {e}"))?;
        Ok(pid)
    }

    /// The actor of `service`.
    pub fn actor(&self, service: &str) -> Option<ActorRef<ServiceMsg>> {
        self.actors
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
            .cloned()
    }

    /// Every service actor, in configuration order.
    pub fn actors_in_order(&self) -> Vec<(String, ActorRef<ServiceMsg>)> {
        let order = self
            .order
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let actors = self
            .actors
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        order
            .into_iter()
            .filter_map(|n| actors.get(&n).map(|a| (n, a.clone())))
            .collect()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Deliver for Shared {
    fn deliver(&self, service: &str, _pid: u32, input: Input) -> bool {
        let actors = self
            .actors
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(actor) = actors.get(service) else {
            return false;
        };
        let board = || {
            self.boards
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(service)
                .cloned()
        };
        match input {
            // The common message stays off the actor's loop unless it makes something due sooner.
            Input::Heartbeat { tid, timeout } => match board() {
                Some(b) => {
                    let deadline = std::time::Instant::now() + timeout.min(MAX_HEARTBEAT_TIMEOUT);
                    !b.write(tid, Mark::Deadline(deadline))
                        || actor.cast(ServiceMsg::PullBoard).is_ok()
                }
                None => actor.cast(ServiceMsg::Input(input)).is_ok(),
            },
            Input::HeartbeatEnd { tid } => match board() {
                Some(b) => {
                    b.write(tid, Mark::Ended);
                    true
                }
                None => actor.cast(ServiceMsg::Input(input)).is_ok(),
            },
            other => {
                if matches!(other, Input::Unregister) {
                    // Marks written before it must not outlive it.
                    if let Some(b) = board() {
                        b.clear();
                    }
                }
                actor.cast(ServiceMsg::Input(other)).is_ok()
            }
        }
    }

    fn registered_from(&self, service: &str, pid: u32, address: nix::sys::socket::UnixAddr) {
        self.replies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(service.to_owned(), (pid, address));
    }
}

/// Messages to a service's actor.
#[derive(Debug)]
pub enum ServiceMsg {
    /// First message: adopt a live process or start (per `autostart`).
    Boot {
        /// Start the service when no process of it is alive.
        start: bool,
    },
    /// An input for the state machine (operator request, heartbeat, sd_notify, ...).
    Input(Input),
    /// The result of a spawn (or restore) that ran off the event loop.
    SpawnDone(Result<SpawnedProcess, String>),
    /// The main process ended.
    Exited {
        /// Which.
        pid: u32,
        /// How.
        status: ExitStatus,
    },
    /// A timer fired.
    Tick,
    /// The listener wrote a heartbeat deadline earlier than the armed timer.
    PullBoard,
    /// A probe finished.
    Probe {
        /// Which probe.
        index: usize,
        /// Its outcome.
        outcome: probe::ProbeOutcome,
    },
    /// Report the service's state.
    Status(RpcReplyPort<ServiceStatus>),
    /// Apply a changed configuration.
    Reconfigure(Box<ServiceConfig>),
    /// Stop the service and then the actor (the service was removed from the configuration).
    Remove,
    /// Test hook: panic inside the handler.
    InjectPanic,
}

/// A started main process, and how it was started.
#[derive(Debug)]
pub struct SpawnedProcess {
    /// Its pid.
    pub pid: u32,
    /// The process.
    pub spawned: process::Spawned,
    /// Started from scratch (false: restored from a transparent checkpoint).
    pub fresh: bool,
}

/// One service's supervisor actor.
#[derive(Debug)]
pub struct ServiceSupervisor;

/// Its state.
#[derive(Debug)]
pub struct ServiceState {
    shared: Arc<Shared>,
    config: ServiceConfig,
    machine: ServiceMachine,
    cgroup: Option<Cgroup>,
    armed: Option<tokio::time::Instant>,
    board: Arc<Board>,
    probes: Vec<JoinHandle<()>>,
    rss: Option<JoinHandle<()>>,
    removing: bool,
    recorded: Option<Record>,
    /// Transparent checkpoints, when configured.
    checkpointer: Option<Arc<Checkpointer>>,
    /// The process being spawned or watched was started from scratch (not restored).
    fresh: bool,
}

/// What a service actor starts from.
#[derive(Debug)]
pub struct ServiceArgs {
    /// The shared state.
    pub shared: Arc<Shared>,
    /// Its configuration.
    pub config: ServiceConfig,
    /// What the registry recorded of its process when watchd started.
    pub recorded: Option<Record>,
}

impl Actor for ServiceSupervisor {
    type Msg = ServiceMsg;
    type State = ServiceState;
    type Arguments = ServiceArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ServiceMsg>,
        args: ServiceArgs,
    ) -> Result<ServiceState, ActorProcessingErr> {
        let name = args.config.name().to_owned();
        let cgroup = match &args.shared.cgroups {
            Some(root) => match root.service(&name) {
                Ok(cg) => Some(cg),
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "no cgroup for service; using its process group");
                    None
                }
            },
            None => None,
        };
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(7);
        let seed =
            u64::try_from(seed & u128::from(u64::MAX)).unwrap_or(7) ^ u64::from(std::process::id());
        let board = args.shared.board(args.config.name());
        let checkpointer = start_checkpointer(&args.shared, &args.config);
        Ok(ServiceState {
            checkpointer,
            fresh: true,
            machine: ServiceMachine::new(Rules::from_config(&args.config), seed),
            shared: args.shared,
            config: args.config,
            cgroup,
            armed: None,
            board,
            probes: Vec::new(),
            rss: None,
            removing: false,
            recorded: args.recorded,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ServiceMsg>,
        msg: ServiceMsg,
        st: &mut ServiceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServiceMsg::Boot { start } => boot(&myself, st, start),
            ServiceMsg::Input(input) => drive(&myself, st, input),
            ServiceMsg::SpawnDone(Ok(spawned)) => {
                let pid = spawned.pid;
                st.fresh = spawned.fresh;
                let spawned = spawned.spawned;
                watch_process(&myself, st, pid, spawned.start_time, spawned.pidfd);
                drive(&myself, st, Input::Spawned { pid });
            }
            ServiceMsg::SpawnDone(Err(error)) => drive(&myself, st, Input::SpawnFailed { error }),
            ServiceMsg::Exited { pid, status } => {
                forget_process(st, pid);
                drive(&myself, st, Input::Exited { pid, status });
            }
            ServiceMsg::Tick => {
                st.armed = None;
                drive(&myself, st, Input::Tick);
            }
            ServiceMsg::PullBoard => drive(&myself, st, Input::Tick),
            ServiceMsg::Probe { index, outcome } => {
                drive(
                    &myself,
                    st,
                    Input::Probe {
                        index,
                        ok: outcome.ok,
                        detail: outcome.detail,
                    },
                );
            }
            ServiceMsg::Status(reply) => {
                pull_board(st, std::time::Instant::now());
                let _ = reply.send(ServiceStatus {
                    name: st.config.name().to_owned(),
                    cgroup: st.cgroup.is_some(),
                    view: st.machine.view(std::time::Instant::now()),
                    transparent: st.checkpointer.as_ref().and_then(|c| c.status()),
                });
            }
            ServiceMsg::Reconfigure(config) => reconfigure(&myself, st, *config),
            ServiceMsg::Remove => {
                st.removing = true;
                drive(&myself, st, Input::Stop);
            }
            ServiceMsg::InjectPanic => {
                if st.shared.test_hooks {
                    panic!(
                        "test hook: injected panic in the supervisor of {}",
                        st.config.name()
                    );
                }
            }
        }
        if st.removing && st.machine.pid().is_none() {
            stop_tasks(st);
            myself.stop(Some("removed".into()));
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ServiceMsg>,
        st: &mut ServiceState,
    ) -> Result<(), ActorProcessingErr> {
        stop_tasks(st);
        // Only the actor that owns the published checkpointer withdraws it.
        if let Some(c) = &st.checkpointer
            && st
                .shared
                .checkpointer(st.config.name())
                .is_some_and(|p| Arc::ptr_eq(&p, c))
        {
            st.shared.set_checkpointer(st.config.name(), None);
        }
        Ok(())
    }
}

/// The checkpointer of a service with transparent checkpoints, published in `shared`.
fn start_checkpointer(shared: &Shared, config: &ServiceConfig) -> Option<Arc<Checkpointer>> {
    let name = config.name();
    let settings = transparent::Settings::from_config(config)?;
    match Checkpointer::start(name, &shared.data_dir, settings, shared.events.clone()) {
        Ok(c) => {
            let c = Arc::new(c);
            shared.set_checkpointer(name, Some(c.clone()));
            Some(c)
        }
        Err(e) => {
            shared.events.emit(
                Some(name),
                EventKind::CheckpointFailed,
                format!("cannot start the transparent checkpointer thread: {e}"),
            );
            None
        }
    }
}

/// Adopts the process this service already has (after an actor or watchd restart), else
/// clears leftovers and starts it when asked.
fn boot(myself: &ActorRef<ServiceMsg>, st: &mut ServiceState, start: bool) {
    let name = st.config.name().to_owned();
    // An actor restart finds the process in memory; a watchd restart finds it in the registry.
    let known = st.shared.live().remove(&name).map(|l| {
        l.waiter.abort();
        (l.pid, l.start_time)
    });
    let recorded = known.or_else(|| st.recorded.take().map(|r| (r.pid, r.start_time)));
    if let Some((pid, start_time)) = recorded {
        match process::adopt(pid, start_time) {
            Ok(Some(pidfd)) => {
                // Its checkpoints are its own: a later crash may come back from them.
                st.fresh = false;
                watch_process(myself, st, pid, start_time, pidfd);
                drive(myself, st, Input::Adopted { pid });
                return;
            }
            Ok(None) => {
                st.shared.registry.remove(&name);
                st.shared.events.emit(
                    Some(&name),
                    EventKind::Exited,
                    format!("recorded pid {pid} is gone"),
                );
            }
            Err(e) => {
                tracing::warn!(service = %name, pid, error = %e, "cannot adopt recorded process")
            }
        }
    }
    // Whatever is left in the service's cgroup belongs to no watched process: clear it so
    // two instances never run at once.
    if let Some(cg) = &st.cgroup
        && !cg.is_empty()
    {
        st.shared.events.emit(
            Some(&name),
            EventKind::Killed,
            "killed leftover processes in the service's cgroup",
        );
        let _ = cg.kill();
    }
    if start {
        drive(myself, st, Input::Start);
    }
}

fn watch_process(
    myself: &ActorRef<ServiceMsg>,
    st: &mut ServiceState,
    pid: u32,
    start_time: u64,
    pidfd: OwnedFd,
) {
    let name = st.config.name().to_owned();
    st.shared.directory.insert(pid, &name);
    if let Some(c) = &st.checkpointer {
        c.track(pid, st.fresh);
    }
    let record = Record {
        pid,
        start_time,
        cgroup: st.cgroup.as_ref().map(|c| c.path().to_owned()),
        spawned_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    };
    st.shared.registry.put(&name, record);
    let me = myself.clone();
    let cgroup = st.cgroup.clone();
    let waiter = tokio::spawn(async move {
        // Like systemd's control-group kill mode: nothing of the old tree outlives its main
        // process, so a restart never runs beside leftovers.
        let status = process::wait_exit_killing_tree(pidfd, pid, cgroup).await;
        let _ = me.cast(ServiceMsg::Exited { pid, status });
    });
    if let Some(old) = st.shared.live().insert(
        name,
        Live {
            pid,
            start_time,
            waiter: waiter.abort_handle(),
        },
    ) {
        old.waiter.abort();
    }
}

fn forget_process(st: &mut ServiceState, pid: u32) {
    st.shared.directory.remove(pid);
    if let Some(c) = &st.checkpointer {
        c.untrack(pid);
    }
    let name = st.config.name();
    let mut live = st.shared.live();
    if live.get(name).is_some_and(|l| l.pid == pid) {
        live.remove(name);
        st.shared.registry.remove(name);
    }
}

/// Feeds one input to the machine, carries out its actions, then keeps tasks and the timer in
/// line with the new phase.
fn drive(myself: &ActorRef<ServiceMsg>, st: &mut ServiceState, input: Input) {
    let now = std::time::Instant::now();
    pull_board(st, now);
    let actions = st.machine.step(now, input);
    for action in actions {
        act(myself, st, action);
    }
    reconcile_tasks(myself, st);
    arm_timer(myself, st);
    if st
        .board
        .set_armed(st.armed.map(tokio::time::Instant::into_std))
    {
        let _ = myself.cast(ServiceMsg::PullBoard);
    }
}

/// Hands the heartbeats the listener wrote on the board to the machine.
fn pull_board(st: &mut ServiceState, now: std::time::Instant) {
    for (tid, mark) in st.board.drain() {
        let input = match mark {
            Mark::Deadline(deadline) => Input::HeartbeatUntil { tid, deadline },
            Mark::Ended => Input::HeartbeatEnd { tid },
        };
        // Heartbeat inputs never produce actions.
        let _ = st.machine.step(now, input);
    }
}

fn act(myself: &ActorRef<ServiceMsg>, st: &mut ServiceState, action: Action) {
    let name = st.config.name().to_owned();
    match action {
        Action::Spawn => {
            // Whatever is on the board came from the process before.
            st.board.clear();
            let (spec, ckpt_dir) = spawn_spec(st);
            let me = myself.clone();
            let directory = st.shared.directory.clone();
            if st.config.restart_from == RestartFrom::Checkpoint
                && st.machine.spawn_after_failure()
                && let Some(c) = &st.checkpointer
            {
                let service = spec.service.clone();
                let answer = c.restore(spec);
                tokio::spawn(async move {
                    let result = match answer.await {
                        Ok(r) => r.map(|s| SpawnedProcess {
                            pid: s.spawned.pid,
                            fresh: s.restored_from.is_none(),
                            spawned: s.spawned,
                        }),
                        Err(_) => {
                            Err("the checkpointer ended before it started the service".into())
                        }
                    };
                    let pid = result.as_ref().ok().map(|s| s.pid);
                    let _ = me.cast(ServiceMsg::SpawnDone(result));
                    if let Some(pid) = pid {
                        directory.insert(pid, &service);
                    }
                });
                return;
            }
            tokio::task::spawn_blocking(move || {
                // The service finds its checkpoint store ready (FT_CKPT_DIR); a failure shows
                // to the service itself when it checkpoints.
                let _ = std::fs::create_dir_all(&ckpt_dir);
                let result = process::spawn(&spec)
                    .map(|spawned| SpawnedProcess {
                        pid: spawned.pid,
                        spawned,
                        fresh: true,
                    })
                    .map_err(|e| e.to_string());
                let pid = result.as_ref().ok().map(|s| s.pid);
                let _ = me.cast(ServiceMsg::SpawnDone(result));
                // Published to the listener only now, so that anything the child says (READY
                // may come at once) queues behind SpawnDone in the actor's mailbox. Until
                // then the listener holds the child's datagrams for a moment.
                if let Some(pid) = pid {
                    directory.insert(pid, &spec.service);
                }
            });
        }
        Action::Signal { pid, signal } => {
            if let Err(e) = process::signal_tree(pid, st.cgroup.as_ref(), signal) {
                tracing::warn!(service = %name, pid, error = %e, "signalling the process tree failed");
            }
        }
        Action::Report(e) => st.shared.events.emit(Some(&name), e.kind, e.detail),
        Action::Escalate { reason } => escalate(st, reason),
    }
}

/// What to spawn, and the checkpoint directory it is told about (created off the event loop).
fn spawn_spec(st: &ServiceState) -> (process::SpawnSpec, PathBuf) {
    let c = &st.config;
    let name = c.name().to_owned();
    let sh = &st.shared;
    let ckpt_dir = sh.data_dir.join("ckpt").join(&name);
    let mut env = vec![
        (
            ft::proto::ENV_SOCKET.to_owned(),
            sh.ft_socket.display().to_string(),
        ),
        (ft::proto::ENV_SERVICE.to_owned(), name.clone()),
        (
            "NOTIFY_SOCKET".to_owned(),
            sh.notify_socket.display().to_string(),
        ),
        ("FT_NODE".to_owned(), sh.node.clone()),
        ("FT_ROLE".to_owned(), "primary".to_owned()),
        ("FT_CKPT_DIR".to_owned(), ckpt_dir.display().to_string()),
    ];
    if let (Some(every), false) = (c.checkpoint.every, c.checkpoint.transparent) {
        env.push((
            "FT_CKPT_EVERY".to_owned(),
            format!("{}ms", every.as_millis()),
        ));
    }
    env.push(("FT_CKPT_KEEP".to_owned(), c.checkpoint.keep.to_string()));
    env.push((
        "FT_CKPT_FULL_EVERY".to_owned(),
        c.checkpoint.full_every.to_string(),
    ));
    if let Some(w) = c.hang.watchdog {
        env.push(("WATCHDOG_USEC".to_owned(), w.as_micros().to_string()));
    }
    if let Some(repl) = sh.repl_env.get() {
        let entries: Vec<&str> = c
            .filesets
            .iter()
            .filter_map(|f| repl.entries.get(f).map(String::as_str))
            .collect();
        if !entries.is_empty() {
            env.push((ENV_REPL_FILESETS.to_owned(), entries.join(";")));
            if let Some(t) = repl.sync_timeout {
                env.push((
                    ft::replog::fileset::ENV_SYNC_TIMEOUT.to_owned(),
                    format!("{}ms", t.as_millis()),
                ));
            }
        }
        if c.repl_shim
            && let Some(shim) = &repl.shim
        {
            env.push(("LD_PRELOAD".to_owned(), shim.display().to_string()));
        }
    }
    env.extend(c.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(group) = sh
        .group_env
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&name)
    {
        env.extend(group.iter().cloned());
    }
    let spec = process::SpawnSpec {
        service: name.clone(),
        command: c.command.clone(),
        args: c.args.clone(),
        env,
        cwd: c.cwd.clone(),
        user: c.user.clone(),
        log_path: logs::log_path(&sh.data_dir, &name),
        cgroup: st.cgroup.clone(),
    };
    (spec, ckpt_dir)
}

fn escalate(st: &ServiceState, reason: String) {
    let name = st.config.name().to_owned();
    let events = st.shared.events.clone();
    let Some((program, args)) = st.config.on_escalate.split_first() else {
        events.emit(
            Some(&name),
            EventKind::Escalated,
            format!("{reason} (no hook configured)"),
        );
        return;
    };
    events.emit(
        Some(&name),
        EventKind::Escalated,
        format!("{reason}; running hook {program}"),
    );
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("FT_SERVICE", &name)
        .env("FT_NODE", &st.shared.node)
        .env("FT_EVENT", "escalate")
        .env("FT_REASON", &reason)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::spawn(async move {
        let outcome = match cmd.spawn() {
            Ok(mut child) => match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
                Ok(Ok(s)) if s.success() => return,
                Ok(Ok(s)) => format!("escalation hook exited with {s}"),
                Ok(Err(e)) => format!("escalation hook: {e}"),
                Err(_) => format!(
                    "escalation hook ran longer than {}s and was killed",
                    HOOK_TIMEOUT.as_secs()
                ),
            },
            Err(e) => format!("cannot run escalation hook: {e}"),
        };
        events.emit(Some(&name), EventKind::HookFailed, outcome);
    });
}

fn reconcile_tasks(myself: &ActorRef<ServiceMsg>, st: &mut ServiceState) {
    let running = st.machine.is_running();
    if running && st.probes.is_empty() && !st.config.probes.is_empty() {
        for (index, cfg) in st.config.probes.iter().enumerate() {
            let cfg = cfg.clone();
            let me = myself.clone();
            st.probes.push(tokio::spawn(async move {
                tokio::time::sleep(cfg.initial_delay).await;
                loop {
                    let started = tokio::time::Instant::now();
                    let outcome = probe::check(&cfg).await;
                    if me.cast(ServiceMsg::Probe { index, outcome }).is_err() {
                        return;
                    }
                    tokio::time::sleep_until(started + cfg.period).await;
                }
            }));
        }
    }
    if let (true, None, Some(_)) = (running, &st.rss, st.config.rejuvenate.max_rss) {
        let me = myself.clone();
        let pid = st.machine.pid();
        let cgroup = st.cgroup.clone();
        let every = st.config.rejuvenate.check_every;
        st.rss = Some(tokio::spawn(async move {
            let Some(pid) = pid else { return };
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let cg = cgroup.clone();
                let Ok(bytes) =
                    tokio::task::spawn_blocking(move || process::tree_rss(pid, cg.as_ref())).await
                else {
                    return;
                };
                if me.cast(ServiceMsg::Input(Input::Rss { bytes })).is_err() {
                    return;
                }
            }
        }));
    }
    if !running {
        stop_tasks(st);
    }
}

fn stop_tasks(st: &mut ServiceState) {
    for p in st.probes.drain(..) {
        p.abort();
    }
    if let Some(r) = st.rss.take() {
        r.abort();
    }
}

/// Keeps one timer armed for the machine's next deadline. A later deadline does not re-arm: the
/// early tick finds nothing due and arms again, which keeps heartbeats free of timer churn.
fn arm_timer(myself: &ActorRef<ServiceMsg>, st: &mut ServiceState) {
    let Some(deadline) = st.machine.next_deadline() else {
        return;
    };
    let deadline = tokio::time::Instant::from_std(deadline);
    if st.armed.is_some_and(|a| a <= deadline) {
        return;
    }
    st.armed = Some(deadline);
    let me = myself.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        let _ = me.cast(ServiceMsg::Tick);
    });
}

fn reconfigure(myself: &ActorRef<ServiceMsg>, st: &mut ServiceState, config: ServiceConfig) {
    let old = std::mem::replace(&mut st.config, config);
    st.machine.set_rules(Rules::from_config(&st.config));
    match (
        transparent::Settings::from_config(&st.config),
        st.checkpointer.clone(),
    ) {
        (Some(settings), Some(c)) => c.configure(settings),
        (Some(_), None) => {
            st.checkpointer = start_checkpointer(&st.shared, &st.config);
            if let (Some(c), Some(pid)) = (&st.checkpointer, st.machine.pid()) {
                c.track(pid, false);
            }
        }
        (None, Some(_)) => {
            st.checkpointer = None;
            st.shared.set_checkpointer(st.config.name(), None);
        }
        (None, None) => {}
    }
    stop_tasks(st);
    let c = &st.config;
    let process_changed = old.command != c.command
        || old.args != c.args
        || old.env != c.env
        || old.cwd != c.cwd
        || old.user != c.user
        || old.hang.watchdog != c.hang.watchdog;
    if process_changed && st.machine.pid().is_some() {
        drive(myself, st, Input::Restart);
    } else {
        reconcile_tasks(myself, st);
        arm_timer(myself, st);
    }
}

/// Messages to the root.
#[derive(Debug)]
pub enum RootMsg {
    /// Re-read the configuration file and apply it.
    Reload(RpcReplyPort<Response>),
}

/// The root supervisor: owns the configuration and the service actors.
#[derive(Debug)]
pub struct Root;

/// The root's state.
#[derive(Debug)]
pub struct RootState {
    shared: Arc<Shared>,
    config: Config,
    children: HashMap<ActorId, String>,
    removing: HashSet<String>,
}

/// What the root starts from.
#[derive(Debug)]
pub struct RootArgs {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The configuration in force.
    pub config: Config,
}

impl Actor for Root {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMsg>,
        args: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let mut st = RootState {
            shared: args.shared,
            config: args.config,
            children: HashMap::new(),
            removing: HashSet::new(),
        };
        *st.shared
            .order
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = st
            .config
            .services
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        let mut records = stop_unconfigured(&st);
        for svc in st.config.services.clone() {
            let start = svc.autostart;
            let recorded = records.remove(svc.name());
            spawn_service(&myself, &mut st, svc, start, recorded).await?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        msg: RootMsg,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Reload(reply) => {
                let response = reload(&myself, st).await;
                let _ = reply.send(response);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        evt: SupervisionEvent,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                reason
                    .filter(|r| r != "removed")
                    .map(|r| format!("terminated: {r}")),
            ),
            _ => return Ok(()),
        };
        let Some(name) = st.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        {
            let mut actors = st
                .shared
                .actors
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if actors
                .get(&name)
                .is_some_and(|a| a.get_id() == cell.get_id())
            {
                actors.remove(&name);
            }
        }
        if st.removing.remove(&name) {
            if let Some(root) = &st.shared.cgroups
                && let Ok(cg) = root.service(&name)
            {
                let _ = cg.remove();
            }
            return Ok(());
        }
        let why = failure.unwrap_or_else(|| "stopped unexpectedly".into());
        st.shared.events.emit(
            Some(&name),
            EventKind::ActorRestarted,
            format!("supervisor actor failed ({why}); restarted, service untouched"),
        );
        if let Some(cfg) = st.config.service(&name).cloned() {
            let start = cfg.autostart;
            spawn_service(&myself, st, cfg, start, None).await?;
        }
        Ok(())
    }
}

async fn spawn_service(
    myself: &ActorRef<RootMsg>,
    st: &mut RootState,
    config: ServiceConfig,
    start: bool,
    recorded: Option<Record>,
) -> Result<(), ActorProcessingErr> {
    let name = config.name().to_owned();
    let args = ServiceArgs {
        shared: st.shared.clone(),
        config,
        recorded,
    };
    let (actor, _) = Actor::spawn_linked(None, ServiceSupervisor, args, myself.get_cell()).await?;
    st.children.insert(actor.get_id(), name.clone());
    st.shared
        .actors
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(name, actor.clone());
    actor.cast(ServiceMsg::Boot { start })?;
    Ok(())
}

/// Processes recorded for services that are no longer configured are stopped.
/// Returns the records of the configured services.
fn stop_unconfigured(st: &RootState) -> HashMap<String, Record> {
    let mut configured = HashMap::new();
    let records = match st.shared.registry.all() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the registry; no process will be re-adopted");
            return configured;
        }
    };
    for (name, rec) in records {
        if st.config.service(&name).is_some() {
            configured.insert(name, rec);
            continue;
        }
        st.shared.registry.remove(&name);
        let cgroup = rec.cgroup.map(Cgroup::open);
        if let Ok(Some(_pidfd)) = process::adopt(rec.pid, rec.start_time) {
            st.shared.events.emit(
                Some(&name),
                EventKind::Removed,
                format!(
                    "pid {} belongs to a service no longer configured; killed",
                    rec.pid
                ),
            );
            let _ = process::signal_tree(rec.pid, cgroup.as_ref(), TreeSignal::Kill);
        }
    }
    configured
}

async fn reload(myself: &ActorRef<RootMsg>, st: &mut RootState) -> Response {
    let path = st.shared.config_path.clone();
    let new = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("new configuration refused, the running one is kept: {e}");
            st.shared
                .events
                .emit(None, EventKind::ReloadRefused, message.clone());
            return Response::Error { message };
        }
    };
    if new.watchd != st.config.watchd {
        let message =
            "new configuration refused: [watchd] settings change only with a restart of watchd"
                .to_owned();
        st.shared
            .events
            .emit(None, EventKind::ReloadRefused, message.clone());
        return Response::Error { message };
    }
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for old in &st.config.services {
        if new.service(old.name()).is_none() {
            removed.push(old.name().to_owned());
            if let Some(actor) = st.shared.actor(old.name()) {
                st.removing.insert(old.name().to_owned());
                let _ = actor.cast(ServiceMsg::Remove);
            }
        }
    }
    for svc in &new.services {
        match st.config.service(svc.name()) {
            None => added.push(svc.clone()),
            Some(old) if old != svc => {
                changed.push(svc.name().to_owned());
                if let Some(actor) = st.shared.actor(svc.name()) {
                    let _ = actor.cast(ServiceMsg::Reconfigure(Box::new(svc.clone())));
                }
            }
            Some(_) => {}
        }
    }
    *st.shared
        .order
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) =
        new.services.iter().map(|s| s.name().to_owned()).collect();
    let added_names: Vec<String> = added.iter().map(|s| s.name().to_owned()).collect();
    st.config = new;
    for svc in added {
        let start = svc.autostart;
        if let Err(e) = spawn_service(myself, st, svc, start, None).await {
            tracing::error!(error = %e, "cannot start a supervisor for an added service");
        }
    }
    for n in &added_names {
        st.shared
            .events
            .emit(Some(n), EventKind::Added, "added by reload");
    }
    for n in &removed {
        st.shared
            .events
            .emit(Some(n), EventKind::Removed, "removed by reload; stopping");
    }
    let message = format!(
        "reloaded: added [{}], removed [{}], changed [{}]",
        added_names.join(", "),
        removed.join(", "),
        changed.join(", ")
    );
    st.shared
        .events
        .emit(None, EventKind::Reloaded, message.clone());
    Response::Ok { message }
}
