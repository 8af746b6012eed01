//! The accepting side: one accept loop per listening socket, one task per handshake (bounded in
//! number and time), established connections routed to the receiver of their channel. The
//! accept loop never waits for a peer, so a slow or hostile peer cannot stop other nodes from
//! connecting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Duration, sleep, timeout};
use tokio_util::codec::{Encoder, FramedRead, FramedWrite};
use tracing::{error, info, warn};

use super::conn::{Conn, PeerInfo};
use super::error::NetError;
use super::frame::FrameCodec;
use super::handshake::{HandshakeMsg, ServerHandshake, drive, fresh_nonce, refuse};
use super::stats::NetStatsSnapshot;
use super::{HANDSHAKE_MAX_FRAME, NetConfig, config_name};

/// How long the accept loop pauses after a failed accept (for example EMFILE), so that a
/// persistent failure does not spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A listening socket that authenticates peers and hands their connections to the receiver of
/// the channel they asked for. Dropping it stops accepting and abandons handshakes in progress;
/// connections already handed out stay open.
#[derive(Debug)]
pub struct Listener {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept_loop: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    cfg: NetConfig,
    channels: Mutex<HashMap<String, mpsc::Sender<Conn>>>,
    pending: Arc<Semaphore>,
}

impl Shared {
    fn channel_open(&self, channel: &str) -> bool {
        self.lock_channels()
            .get(channel)
            .is_some_and(|tx| !tx.is_closed())
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Conn>>> {
        // The map stays consistent whatever a panicking holder did (single inserts/reads).
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Listener {
    /// Listens on `addr` (port 0 picks a free port; see [`Listener::local_addr`]). Needs a
    /// tokio runtime: the accept loop is a task.
    pub async fn bind(cfg: &NetConfig, addr: SocketAddr) -> Result<Listener, NetError> {
        cfg.validate()?;
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|source| NetError::Bind { addr, source })?;
        let local_addr = socket
            .local_addr()
            .map_err(|source| NetError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            channels: Mutex::new(HashMap::new()),
            pending: Arc::new(Semaphore::new(cfg.max_pending_handshakes)),
        });
        let accept_loop = tokio::spawn(accept_loop(socket, Arc::clone(&shared)));
        info!(addr = %local_addr, cluster = %cfg.cluster, node = %cfg.node, "listening for cluster peers");
        Ok(Listener {
            local_addr,
            shared,
            accept_loop,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Registers `name` and returns the receiver of its connections. Connections for a channel
    /// without a live receiver are refused (`channel`). A name may be registered again once
    /// its previous receiver was dropped.
    pub fn channel(&self, name: &str) -> Result<mpsc::Receiver<Conn>, NetError> {
        config_name("channel", name)?;
        let mut channels = self.shared.lock_channels();
        if channels.get(name).is_some_and(|tx| !tx.is_closed()) {
            return Err(NetError::ChannelInUse {
                channel: name.to_owned(),
            });
        }
        let (tx, rx) = mpsc::channel(self.shared.cfg.channel_backlog);
        channels.insert(name.to_owned(), tx);
        Ok(rx)
    }

    /// This node's transport counters (shared with every clone of its [`NetConfig`]).
    pub fn stats(&self) -> NetStatsSnapshot {
        self.shared.cfg.stats.snapshot()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Aborting the loop drops its JoinSet, which aborts the handshakes in progress.
        self.accept_loop.abort();
    }
}

async fn accept_loop(socket: TcpListener, shared: Arc<Shared>) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok((stream, peer)) => match Arc::clone(&shared.pending).try_acquire_owned() {
                    Ok(permit) => {
                        handshakes.spawn(serve(Arc::clone(&shared), stream, peer, permit));
                    }
                    Err(_) => refuse_busy(&shared.cfg, &stream, peer),
                },
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    error!(error = %e, "a handshake task panicked");
                }
            }
        }
    }
}

/// Refuses a connection beyond the handshake limit without spawning anything: one
/// non-blocking write of the refusal into the fresh socket's empty buffer, then close.
fn refuse_busy(cfg: &NetConfig, stream: &TcpStream, peer: SocketAddr) {
    let err = NetError::Busy {
        limit: cfg.max_pending_handshakes,
    };
    if let Some(msg) = HandshakeMsg::refusal_for(&err) {
        let mut frame = BytesMut::new();
        if FrameCodec::new(HANDSHAKE_MAX_FRAME)
            .encode(&msg, &mut frame)
            .is_ok()
        {
            // Best effort: a full buffer or a gone peer only loses the explanation.
            let _ = stream.try_write(&frame);
        }
    }
    cfg.stats.count_inbound_refusal(&err);
    warn!(peer = %peer, reason = %err, "refused an inbound connection");
}

async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer_addr: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let cfg = &shared.cfg;
    // Heartbeats and acks are small; Nagle would delay them.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(peer = %peer_addr, error = %e, "cannot set TCP_NODELAY");
    }
    let (r, w) = stream.into_split();
    let mut rd = FramedRead::new(r, FrameCodec::new(HANDSHAKE_MAX_FRAME));
    let mut wr = FramedWrite::new(w, FrameCodec::new(HANDSHAKE_MAX_FRAME));
    let mut machine = ServerHandshake::new(cfg, fresh_nonce(), |ch: &str| shared.channel_open(ch));
    let outcome = match timeout(
        cfg.handshake_timeout,
        drive(&mut machine, None, &mut rd, &mut wr),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(NetError::HandshakeTimeout {
            after: cfg.handshake_timeout,
        }),
    };
    let established = match outcome {
        Ok(established) => established,
        Err(err) => {
            let (node, channel) = machine.claimed().unwrap_or(("?", "?"));
            warn!(
                peer = %peer_addr,
                claimed_node = ?node,
                channel = ?channel,
                reason = %err,
                "refused an inbound connection"
            );
            cfg.stats.count_inbound_refusal(&err);
            refuse(&mut wr, &err).await;
            return;
        }
    };
    drop(permit);
    cfg.stats.count_accepted();
    info!(
        peer = %peer_addr,
        node = %established.peer_node,
        channel = %established.channel,
        "accepted a connection"
    );
    let sender = shared.lock_channels().get(&established.channel).cloned();
    let conn = Conn::new(
        rd,
        wr,
        PeerInfo {
            node: established.peer_node,
            addr: peer_addr,
            channel: established.channel,
        },
        cfg.max_frame,
    );
    let undelivered = match sender {
        Some(tx) => tx.send(conn).await.err().map(|e| e.0),
        None => Some(conn),
    };
    if let Some(conn) = undelivered {
        warn!(
            peer = %peer_addr,
            node = %conn.peer_node(),
            channel = %conn.channel(),
            "the channel's receiver went away; dropping the connection"
        );
    }
}
