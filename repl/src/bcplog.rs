//! The backup side of a fileset at run time: the bcplog actor (ractor) takes connections from
//! pumps, a worker thread runs [`Bcplog`] on each message (append, group commit, ack, resync),
//! and a replay thread applies the durable log to the replica.
//!
//! Only one pump stream is served at a time, and the ownership epoch decides which: a new
//! connection waits in the greeting until its `Hello`; a `Hello` whose epoch is older than the
//! highest one accepted is refused (`Refused`, logged) and the current stream goes on; one
//! with the same or a newer epoch takes over and the previous connection is closed at once.
//! Connections from nodes that may not be the primary are refused and logged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use cluster::net::Conn;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use crate::backup::{self, BackupError, BackupSideStatus, BackupSpec, Bcplog, Promotion};
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
    /// The nodes that may stream to us (the primary, or every node that may become it).
    pub primaries: Vec<String>,
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
    /// This node becomes the primary: close every stream, apply the whole durable log to the
    /// replica (see [`Bcplog::promote`]) and serve no stream any more; the caller then stops
    /// the actor. On an error the bcplog goes on serving.
    Promote(RpcReplyPort<Result<Promotion, String>>),
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
    Promote(std::sync::mpsc::Sender<Result<Promotion, String>>),
    /// The actor stops: the worker ends (and with it the log and the replica are closed).
    Stop,
}

/// The bcplog actor.
#[derive(Debug)]
pub struct BcplogActor;

/// Its state.
#[derive(Debug)]
pub struct BcplogState {
    fileset: String,
    primaries: Vec<String>,
    jobs: std_mpsc::Sender<Job>,
    link: u64,
    link_tasks: Vec<tokio::task::JoinHandle<()>>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Log and replica, shared with the replay thread: woken on stop, so it ends at once
    /// instead of after its idle wait (a role change waits for it).
    shared: Arc<backup::Shared>,
    /// The worker and replay threads, joined when the actor stops so that the log and the
    /// replica are closed when `stop_and_wait` returns.
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// A killed or panicked actor skips `post_stop`: its threads must still end, or the replay
/// thread would hold the log (and its lock) forever and no bcplog of the fileset could start.
impl Drop for BcplogState {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

impl BcplogState {
    /// Tells the worker and the replay thread to end, and the link tasks.
    fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shared.wake_replay();
        for t in self.link_tasks.iter().chain(&self.accept_tasks) {
            t.abort();
        }
        let _ = self.jobs.send(Job::Stop);
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Connected { link, .. } => write!(f, "Connected({link})"),
            Job::Msg { link, .. } => write!(f, "Msg({link})"),
            Job::Closed { link } => write!(f, "Closed({link})"),
            Job::Status(_) => f.write_str("Status"),
            Job::Promote(_) => f.write_str("Promote"),
            Job::Stop => f.write_str("Stop"),
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
        let replay_shared = shared.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (jobs, rx) = std_mpsc::channel();
        let me = myself.clone();
        let name = fileset.clone();
        let mut threads = Vec::new();
        threads.push(
            std::thread::Builder::new()
                .name(format!("bcplog-{fileset}"))
                .spawn(move || {
                    let why = worker(bcplog, rx, &name);
                    let _ = me.cast(BcplogMsg::WorkerDied(why));
                })?,
        );
        let (st, name) = (stop.clone(), fileset.clone());
        threads.push(std::thread::Builder::new()
            .name(format!("replay-{fileset}"))
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match backup::replay_loop(replay_shared.clone(), st.clone()) {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(fileset = %name, error = %e, "replay failed; retrying");
                            std::thread::sleep(REPLAY_RETRY);
                        }
                    }
                }
            })?);
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
        tracing::info!(%fileset, primaries = ?args.primaries, "bcplog started");
        Ok(BcplogState {
            fileset,
            primaries: args.primaries,
            jobs,
            link: 0,
            link_tasks: Vec::new(),
            accept_tasks,
            stop,
            shared,
            threads,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<BcplogMsg>,
        st: &mut BcplogState,
    ) -> Result<(), ActorProcessingErr> {
        st.signal_stop();
        let threads = std::mem::take(&mut st.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
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
                if !st.primaries.iter().any(|p| p == conn.peer_node()) {
                    tracing::warn!(
                        fileset = %st.fileset, from = %conn.peer_node(), primaries = ?st.primaries,
                        "bcplog: refused a stream from a node that may not be the primary"
                    );
                    return Ok(());
                }
                st.link_tasks.retain(|t| !t.is_finished());
                st.link += 1;
                let link = st.link;
                let peer = conn.peer_node().to_owned();
                let (mut sender, mut receiver) = conn.into_split();
                let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ToPrimary>();
                // The worker learns of the link before the reader can hand it the link's first
                // message (the pump's hello): a hello that came first was dropped, and the pump
                // waited for a greeting forever.
                if st.jobs.send(Job::Connected { link, out: out_tx }).is_err() {
                    return Err("the bcplog worker is gone".into());
                }
                let jobs = st.jobs.clone();
                let fileset = st.fileset.clone();
                let reader = tokio::spawn(async move {
                    loop {
                        match receiver.recv::<ToBackup>().await {
                            Ok(msg) => {
                                if jobs.send(Job::Msg { link, msg }).is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::info!(%fileset, %peer, error = %e, "bcplog: a pump's link ended");
                                let _ = jobs.send(Job::Closed { link });
                                return;
                            }
                        }
                    }
                });
                let reader_handle = reader.abort_handle();
                // The writer ends when the worker drops the link (refused, replaced, closed):
                // it shuts the connection and stops the reader with it.
                let writer = tokio::spawn(async move {
                    while let Some(m) = out_rx.recv().await {
                        if sender.feed(&m).await.is_err() {
                            break;
                        }
                        if out_rx.is_empty() && sender.flush().await.is_err() {
                            break;
                        }
                    }
                    let _ = sender.close().await;
                    reader_handle.abort();
                });
                st.link_tasks.push(reader);
                st.link_tasks.push(writer);
            }
            BcplogMsg::WorkerDied(why) => return Err(why.into()),
            BcplogMsg::Promote(reply) => {
                let (tx, rx) = std_mpsc::channel();
                if st.jobs.send(Job::Promote(tx)).is_err() {
                    let _ = reply.send(Err("the bcplog worker is gone".into()));
                    return Ok(());
                }
                // Applying a long log takes as long as it takes; the caller bounds the wait.
                let done = tokio::task::spawn_blocking(move || rx.recv().ok()).await?;
                let _ = reply.send(
                    done.unwrap_or_else(|| Err("the bcplog worker ended during the drain".into())),
                );
            }
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

/// The pump connection being served, and its epoch.
struct Current {
    link: u64,
    out: mpsc::UnboundedSender<ToPrimary>,
    epoch: u64,
}

/// The worker thread: handles every queued message, then makes the appended records durable
/// once and acknowledges them (group commit). Returns why it stopped.
fn worker(mut b: Bcplog, jobs: std_mpsc::Receiver<Job>, fileset: &str) -> String {
    let mut current: Option<Current> = None;
    // Connections that have not greeted yet: they do not disturb the current stream.
    let mut greeting: BTreeMap<u64, mpsc::UnboundedSender<ToPrimary>> = BTreeMap::new();
    let mut last_error: Option<String> = None;
    // After a promotion no stream is served any more.
    let mut promoted = false;
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
                    if !promoted {
                        greeting.insert(link, out);
                    }
                }
                Job::Closed { link } => {
                    greeting.remove(&link);
                    if current.as_ref().is_some_and(|c| c.link == link) {
                        current = None;
                    }
                }
                Job::Msg { link, msg } => {
                    if current.as_ref().is_some_and(|c| c.link == link) {
                        if let Err(e) = on_current(&mut b, &mut current, msg, fileset) {
                            last_error = Some(e.to_string());
                            if matches!(e, BackupError::Meta { .. }) {
                                return e.to_string();
                            }
                        }
                    } else if let Some(out) = greeting.remove(&link) {
                        match greet(&mut b, &mut current, link, out, msg, fileset) {
                            Ok(()) => {}
                            Err(e) => {
                                last_error = Some(e.to_string());
                                if matches!(e, BackupError::Meta { .. }) {
                                    return e.to_string();
                                }
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
                Job::Stop => return "stopped".into(),
                Job::Promote(reply) => {
                    // Whatever was appended is made durable and applied by the promotion; the
                    // pumps see their connections close.
                    current = None;
                    greeting.clear();
                    let result = b.promote().map_err(|e| e.to_string());
                    promoted = result.is_ok();
                    if let Err(e) = &result {
                        tracing::error!(%fileset, error = %e, "bcplog: the replica could not be drained for promotion");
                        last_error = Some(e.clone());
                    }
                    let _ = reply.send(result);
                }
            }
            if handled < GROUP_MAX_MESSAGES && started.elapsed() < GROUP_MAX_TIME {
                next = jobs.try_recv().ok();
            }
        }
        match b.sync() {
            Ok(Some(ack)) => {
                if let Some(c) = &current {
                    let _ = c.out.send(ack);
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

/// A message on the stream being served. An error closes that stream.
fn on_current(
    b: &mut Bcplog,
    current: &mut Option<Current>,
    msg: ToBackup,
    fileset: &str,
) -> Result<(), BackupError> {
    let Some(c) = current.as_ref() else {
        return Ok(());
    };
    match b.handle(msg) {
        Ok(replies) => {
            for r in replies {
                let _ = c.out.send(r);
            }
            Ok(())
        }
        Err(e) => {
            tracing::warn!(%fileset, epoch = c.epoch, error = %e, "bcplog: closing the pump's link");
            if let BackupError::Refused(reason) = &e {
                let _ = c.out.send(ToPrimary::Refused {
                    reason: reason.clone(),
                    epoch: b.epoch(),
                });
            }
            *current = None;
            Err(e)
        }
    }
}

/// The first message of a new connection: a `Hello` that this backup admits takes over from
/// the stream being served (whose connection closes); anything else is refused and only that
/// connection closes.
fn greet(
    b: &mut Bcplog,
    current: &mut Option<Current>,
    link: u64,
    out: mpsc::UnboundedSender<ToPrimary>,
    msg: ToBackup,
    fileset: &str,
) -> Result<(), BackupError> {
    let ToBackup::Hello {
        fileset: theirs,
        epoch,
        ..
    } = &msg
    else {
        let e = BackupError::Protocol("the first message of a stream must be Hello".into());
        tracing::warn!(%fileset, error = %e, "bcplog: closing a new pump link");
        return Err(e);
    };
    if let Err(e) = b.admits(theirs, *epoch) {
        tracing::warn!(%fileset, epoch, current = ?current.as_ref().map(|c| c.epoch), error = %e, "bcplog: refused a pump");
        if let BackupError::Refused(reason) = &e {
            let _ = out.send(ToPrimary::Refused {
                reason: reason.clone(),
                epoch: b.epoch(),
            });
        }
        return Err(e);
    }
    if let Some(old) = current.take() {
        // Dropping its sender closes the old connection now.
        tracing::info!(%fileset, epoch, old_epoch = old.epoch, "bcplog: a new pump connection takes over the stream");
    }
    b.connected();
    *current = Some(Current {
        link,
        out,
        epoch: *epoch,
    });
    on_current(b, current, msg, fileset)
}

#[cfg(test)]
mod tests;
