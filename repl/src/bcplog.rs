//! The backup side of a fileset at run time: the bcplog actor (ractor) takes connections from
//! the pump, a worker thread runs [`Bcplog`] on each message (append, group commit, ack,
//! resync), and a replay thread applies the durable log to the replica.
//!
//! Only one pump connection is served at a time: a new one from the configured primary
//! replaces the old (the old primary's link may linger after a failover). Connections from any
//! other node are refused and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use cluster::net::Conn;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use crate::backup::{self, BackupError, BackupSideStatus, BackupSpec, Bcplog};
use crate::proto::{ToBackup, ToPrimary};

/// Pause of the replay thread after an error (disk full, I/O error) before it tries again.
const REPLAY_RETRY: Duration = Duration::from_secs(1);
/// Group commit: the log is made durable (and acknowledged) at least after this many messages
/// or this long, even while more keep arriving, so acknowledgements never starve.
const GROUP_MAX_MESSAGES: usize = 64;
const GROUP_MAX_TIME: Duration = Duration::from_millis(5);

/// Everything the bcplog of one fileset needs.
#[derive(Debug)]
pub struct BcplogArgs {
    /// Replica and state locations.
    pub spec: BackupSpec,
    /// The node allowed to stream to us.
    pub primary: String,
    /// Connections on the fileset's channel (one receiver per listening address).
    pub conns: Vec<mpsc::Receiver<Conn>>,
}

/// Messages of the bcplog actor.
#[derive(Debug)]
pub enum BcplogMsg {
    /// A connection arrived on the channel.
    NewConn(Box<Conn>),
    /// The worker thread ended (a bug or a fatal log error): the actor fails and is restarted.
    WorkerDied(String),
    /// Report the state.
    Status(RpcReplyPort<BcplogStatus>),
}

/// The backup side's state for `ftctl repl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BcplogStatus {
    /// A pump is connected.
    pub connected: bool,
    /// Log and replica counters.
    #[serde(flatten)]
    pub counters: BackupSideStatus,
    /// The last error (a refused pump, a failed append), if any.
    pub last_error: Option<String>,
}

enum Job {
    Connected {
        link: u64,
        out: mpsc::UnboundedSender<ToPrimary>,
    },
    Msg {
        link: u64,
        msg: ToBackup,
    },
    Closed {
        link: u64,
    },
    Status(std::sync::mpsc::Sender<BcplogStatus>),
}

/// The bcplog actor.
#[derive(Debug)]
pub struct BcplogActor;

/// Its state.
#[derive(Debug)]
pub struct BcplogState {
    fileset: String,
    primary: String,
    jobs: std_mpsc::Sender<Job>,
    link: u64,
    link_tasks: Vec<tokio::task::JoinHandle<()>>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Connected { link, .. } => write!(f, "Connected({link})"),
            Job::Msg { link, .. } => write!(f, "Msg({link})"),
            Job::Closed { link } => write!(f, "Closed({link})"),
            Job::Status(_) => f.write_str("Status"),
        }
    }
}

impl Actor for BcplogActor {
    type Msg = BcplogMsg;
    type State = BcplogState;
    type Arguments = BcplogArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<BcplogMsg>,
        args: BcplogArgs,
    ) -> Result<BcplogState, ActorProcessingErr> {
        let fileset = args.spec.fileset.clone();
        let spec = args.spec;
        let bcplog = tokio::task::spawn_blocking(move || Bcplog::open(spec)).await??;
        let shared = bcplog.shared();
        let stop = Arc::new(AtomicBool::new(false));
        let (jobs, rx) = std_mpsc::channel();
        let me = myself.clone();
        let name = fileset.clone();
        std::thread::Builder::new()
            .name(format!("bcplog-{fileset}"))
            .spawn(move || {
                let why = worker(bcplog, rx, &name);
                let _ = me.cast(BcplogMsg::WorkerDied(why));
            })?;
        let (st, name) = (stop.clone(), fileset.clone());
        std::thread::Builder::new()
            .name(format!("replay-{fileset}"))
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match backup::replay_loop(shared.clone(), st.clone()) {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(fileset = %name, error = %e, "replay failed; retrying");
                            std::thread::sleep(REPLAY_RETRY);
                        }
                    }
                }
            })?;
        let mut accept_tasks = Vec::new();
        for mut rx in args.conns {
            let me = myself.clone();
            accept_tasks.push(tokio::spawn(async move {
                while let Some(conn) = rx.recv().await {
                    if me.cast(BcplogMsg::NewConn(Box::new(conn))).is_err() {
                        return;
                    }
                }
            }));
        }
        tracing::info!(%fileset, primary = %args.primary, "bcplog started");
        Ok(BcplogState {
            fileset,
            primary: args.primary,
            jobs,
            link: 0,
            link_tasks: Vec::new(),
            accept_tasks,
            stop,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<BcplogMsg>,
        st: &mut BcplogState,
    ) -> Result<(), ActorProcessingErr> {
        st.stop.store(true, Ordering::Relaxed);
        for t in st.link_tasks.iter().chain(&st.accept_tasks) {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<BcplogMsg>,
        msg: BcplogMsg,
        st: &mut BcplogState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BcplogMsg::NewConn(conn) => {
                if conn.peer_node() != st.primary {
                    tracing::warn!(
                        fileset = %st.fileset, from = %conn.peer_node(), primary = %st.primary,
                        "bcplog: refused a stream from a node that is not the primary"
                    );
                    return Ok(());
                }
                for t in st.link_tasks.drain(..) {
                    t.abort();
                }
                st.link += 1;
                let link = st.link;
                let (mut sender, mut receiver) = conn.into_split();
                let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ToPrimary>();
                if st.jobs.send(Job::Connected { link, out: out_tx }).is_err() {
                    return Err("the bcplog worker is gone".into());
                }
                st.link_tasks.push(tokio::spawn(async move {
                    while let Some(m) = out_rx.recv().await {
                        if sender.feed(&m).await.is_err() {
                            break;
                        }
                        if out_rx.is_empty() && sender.flush().await.is_err() {
                            break;
                        }
                    }
                    let _ = sender.close().await;
                }));
                let jobs = st.jobs.clone();
                let fileset = st.fileset.clone();
                st.link_tasks.push(tokio::spawn(async move {
                    loop {
                        match receiver.recv::<ToBackup>().await {
                            Ok(msg) => {
                                if jobs.send(Job::Msg { link, msg }).is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::info!(%fileset, error = %e, "bcplog: the pump's link ended");
                                let _ = jobs.send(Job::Closed { link });
                                return;
                            }
                        }
                    }
                }));
            }
            BcplogMsg::WorkerDied(why) => return Err(why.into()),
            BcplogMsg::Status(reply) => {
                let (tx, rx) = std_mpsc::channel();
                if st.jobs.send(Job::Status(tx)).is_ok() {
                    let status = tokio::task::spawn_blocking(move || {
                        rx.recv_timeout(Duration::from_secs(5)).ok()
                    })
                    .await?;
                    if let Some(s) = status {
                        let _ = reply.send(s);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The worker thread: handles every queued message, then makes the appended records durable
/// once and acknowledges them (group commit). Returns why it stopped.
fn worker(mut b: Bcplog, jobs: std_mpsc::Receiver<Job>, fileset: &str) -> String {
    let mut current: Option<(u64, mpsc::UnboundedSender<ToPrimary>)> = None;
    let mut last_error: Option<String> = None;
    loop {
        let Ok(first) = jobs.recv() else {
            return "the actor is gone".into();
        };
        let mut next = Some(first);
        let started = std::time::Instant::now();
        let mut handled = 0;
        while let Some(job) = next.take() {
            handled += 1;
            match job {
                Job::Connected { link, out } => {
                    b.connected();
                    current = Some((link, out));
                }
                Job::Closed { link } => {
                    if current.as_ref().is_some_and(|(l, _)| *l == link) {
                        current = None;
                    }
                }
                Job::Msg { link, msg } => {
                    let Some((cur, out)) = current.as_ref().filter(|(l, _)| *l == link) else {
                        continue;
                    };
                    let _ = cur;
                    match b.handle(msg) {
                        Ok(replies) => {
                            for r in replies {
                                let _ = out.send(r);
                            }
                        }
                        Err(e) => {
                            let fatal = matches!(e, BackupError::Meta { .. });
                            tracing::warn!(%fileset, error = %e, "bcplog: closing the pump's link");
                            if let BackupError::Refused(reason) = &e {
                                let _ = out.send(ToPrimary::Refused {
                                    reason: reason.clone(),
                                });
                            }
                            last_error = Some(e.to_string());
                            current = None;
                            if fatal {
                                return e.to_string();
                            }
                        }
                    }
                }
                Job::Status(reply) => {
                    let _ = reply.send(BcplogStatus {
                        connected: current.is_some(),
                        counters: b.status(),
                        last_error: last_error.clone(),
                    });
                }
            }
            if handled < GROUP_MAX_MESSAGES && started.elapsed() < GROUP_MAX_TIME {
                next = jobs.try_recv().ok();
            }
        }
        match b.sync() {
            Ok(Some(ack)) => {
                if let Some((_, out)) = &current {
                    let _ = out.send(ack);
                }
            }
            Ok(None) => {}
            Err(e) => {
                // The log is poisoned after a failed sync: nothing more may be acknowledged.
                tracing::error!(%fileset, error = %e, "bcplog: the log cannot be made durable");
                return e.to_string();
            }
        }
    }
}
