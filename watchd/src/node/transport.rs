//! The membership transport: one outbound connection per peer and network (channel
//! `membership` of `cluster::net`), used only to send, and the inbound connections that peers
//! opened to this node's listeners, used only to receive; every message arrives tagged with the
//! network (the index of the listener that accepted it).
//!
//! ```text
//!  actor ── send(to, network) ──► per-link bounded queue ──► writer task ──TCP──► peer's listener
//!  actor ◄── sink(Inbound) ◄── reader task ◄── listener i's channel `membership` ◄──TCP── peer
//! ```
//!
//! Sending never waits: a full queue drops the message and counts it (heartbeats are
//! idempotent, the other messages are retried by the protocol's timeouts). It never interprets
//! membership messages, and never delivers a message from a node that is not configured.
//! A peer that connects in while this node's link to it is down is up: that link is redialled
//! at once instead of after its backoff pause (a rebooted peer is reached both ways together).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cluster::gum::GumMessage;
use cluster::membership::Message;
use cluster::net::{
    Backoff, Conn, DEFAULT_BACKOFF_FACTOR, DEFAULT_BACKOFF_JITTER, NetConfig, NetError,
    RefusalKind, connect_addr,
};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::{Notify, mpsc};

/// The `cluster::net` channel of membership traffic.
pub const CHANNEL: &str = "membership";
/// Messages queued per peer and network before new ones are dropped.
pub const LINK_QUEUE: usize = 64;
/// How long one TCP connect to a peer may take: a cut link must not hold a redial for the
/// transport's default seconds.
pub const DIAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause between dial attempts.
pub const DIAL_BACKOFF_INITIAL: Duration = Duration::from_millis(50);
/// Longest pause between dial attempts: a healed link is used again within about this.
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// First pause after a peer refused this node for a reason only a configuration change cures
/// (secret, cluster name, protocol version).
pub const DIAL_REFUSED_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest pause after such refusals: each one is logged on both sides, so do not hammer.
pub const DIAL_REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A send that takes longer ends the connection (the peer or the link is stuck).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest silence after which an outbound connection is redialled (see
/// [`Transport::start`]).
pub const MIN_STALE_AFTER: Duration = Duration::from_secs(1);
/// An inbound connection silent this long is closed (peers send heartbeats many times a
/// second; a connection this quiet belongs to a peer that is gone or redialled).
pub const READER_IDLE: Duration = Duration::from_secs(30);
/// How often an idle reader checks whether a newer connection replaced it.
const READER_CHECK: Duration = Duration::from_secs(1);

/// What travels on the channel: membership and global updates (one enum, so both ride the
/// same connections, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wire {
    /// A membership message.
    Membership(Message),
    /// A global update manager's message.
    Gum(GumMessage),
}

/// A message from a peer.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The peer, as authenticated by the handshake and found in the configuration.
    pub from: String,
    /// The network it came on (index of the accepting listener).
    pub network: usize,
    /// The message.
    pub msg: Wire,
}

/// Where inbound messages go (the node actor's mailbox).
pub type InboundSink = Arc<dyn Fn(Inbound) + Send + Sync>;

/// Counters of the transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportStats {
    /// Messages written to a connection.
    pub sent: u64,
    /// Messages received and delivered.
    pub received: u64,
    /// Dropped: the link's queue was full.
    pub dropped_queue_full: u64,
    /// Dropped: no connection on the link (or no link at all).
    pub dropped_not_connected: u64,
    /// Frames from a peer that did not decode.
    pub garbage: u64,
    /// Connections from authenticated peers whose name is not configured.
    pub refused_unknown_node: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_not_connected: AtomicU64,
    garbage: AtomicU64,
    refused_unknown_node: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One network to one peer.
#[derive(Debug)]
struct Link {
    addr: SocketAddr,
    queue: mpsc::Sender<Wire>,
    connected: AtomicBool,
    /// Microseconds after `base` (+1) of the last message from the peer on this network; 0 =
    /// never.
    last_in: AtomicU64,
    /// Bumped for every new inbound connection: older readers of the link stop.
    inbound_gen: AtomicU64,
    /// Ends the writer's pause between dial attempts: the peer just connected to this node.
    redial: Notify,
}

/// One link in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    /// The network's name.
    pub network: String,
    /// The peer's address on it.
    pub address: String,
    /// This node's outbound connection is up.
    pub connected: bool,
    /// Milliseconds since the peer was last heard on it.
    pub heard_ms_ago: Option<u64>,
}

struct Inner {
    base: Instant,
    networks: Vec<String>,
    peers: BTreeMap<String, Vec<Option<Arc<Link>>>>,
    sink: RwLock<Option<InboundSink>>,
    counters: Counters,
    fresh_after: Duration,
}

// By hand: the sink is a closure.
impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("networks", &self.networks)
            .field("peers", &self.peers)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn stamp(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_micros())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn heard_ago(&self, link: &Link, now: Instant) -> Option<Duration> {
        match link.last_in.load(Ordering::Relaxed) {
            0 => None,
            us => Some(
                now.saturating_duration_since(self.base)
                    .saturating_sub(Duration::from_micros(us - 1)),
            ),
        }
    }

    fn deliver(&self, msg: Inbound) {
        let sink = self
            .sink
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(sink) = sink {
            sink(msg);
        }
    }
}

/// The running transport (its tasks live on the runtime given to [`Transport::start`]).
#[derive(Debug, Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl Transport {
    /// Starts dialing every peer on every network it has an address for (`peers[n][i]` is
    /// peer `n`'s address on network `i`) and serving `inbound[i]`, the receivers of channel
    /// [`CHANNEL`] of listener `i`. A link whose peer has been silent on it for `stale_after`
    /// (at least [`MIN_STALE_AFTER`]) while connected is redialled: TCP alone would take its
    /// retransmission backoff (seconds) to use a healed link again. A network counts as working
    /// for a peer while it was heard on it within `fresh_after`.
    pub fn start(
        rt: &Handle,
        net: NetConfig,
        networks: Vec<String>,
        peers: BTreeMap<String, Vec<SocketAddr>>,
        inbound: Vec<mpsc::Receiver<Conn>>,
        fresh_after: Duration,
        stale_after: Duration,
    ) -> Transport {
        let mut net = net;
        net.connect_timeout = DIAL_CONNECT_TIMEOUT;
        let stale_after = stale_after.max(MIN_STALE_AFTER);
        let mut links = BTreeMap::new();
        let mut writers = Vec::new();
        for (name, addrs) in peers {
            let mut per_net = Vec::new();
            for i in 0..networks.len() {
                let Some(addr) = addrs.get(i).copied() else {
                    per_net.push(None);
                    continue;
                };
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                let link = Arc::new(Link {
                    addr,
                    queue: tx,
                    connected: AtomicBool::new(false),
                    last_in: AtomicU64::new(0),
                    inbound_gen: AtomicU64::new(0),
                    redial: Notify::new(),
                });
                writers.push((name.clone(), link.clone(), rx));
                per_net.push(Some(link));
            }
            links.insert(name, per_net);
        }
        let inner = Arc::new(Inner {
            base: Instant::now(),
            networks,
            peers: links,
            sink: RwLock::new(None),
            counters: Counters::default(),
            fresh_after,
        });
        for (peer, link, rx) in writers {
            rt.spawn(writer(
                inner.clone(),
                net.clone(),
                peer,
                link,
                rx,
                stale_after,
            ));
        }
        for (i, rx) in inbound.into_iter().enumerate() {
            rt.spawn(acceptor(inner.clone(), i, rx));
        }
        Transport { inner }
    }

    /// Where inbound messages go from now on (`None`: dropped, e.g. while the actor restarts).
    pub fn set_sink(&self, sink: Option<InboundSink>) {
        *self
            .inner
            .sink
            .write()
            .unwrap_or_else(PoisonError::into_inner) = sink;
    }

    /// The networks' names, by index.
    pub fn networks(&self) -> &[String] {
        &self.inner.networks
    }

    /// Queues `msg` for `to` on network `network`, or, with `None`, on the first network that
    /// works (connected and recently heard; else connected). Never waits.
    pub fn send(&self, to: &str, network: Option<usize>, msg: Wire) {
        let c = &self.inner.counters;
        let Some(links) = self.inner.peers.get(to) else {
            bump(&c.dropped_not_connected);
            return;
        };
        let link = match network {
            Some(i) => links.get(i).and_then(Option::as_ref),
            None => self.pick(links),
        };
        let Some(link) = link.filter(|l| l.connected.load(Ordering::Relaxed)) else {
            bump(&c.dropped_not_connected);
            return;
        };
        match link.queue.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => bump(&c.dropped_queue_full),
            Err(mpsc::error::TrySendError::Closed(_)) => bump(&c.dropped_not_connected),
        }
    }

    fn pick<'a>(&self, links: &'a [Option<Arc<Link>>]) -> Option<&'a Arc<Link>> {
        let now = Instant::now();
        let up = || {
            links
                .iter()
                .flatten()
                .filter(|l| l.connected.load(Ordering::Relaxed))
        };
        up().find(|l| {
            self.inner
                .heard_ago(l, now)
                .is_some_and(|d| d < self.inner.fresh_after)
        })
        .or_else(|| up().next())
    }

    /// The counters.
    pub fn stats(&self) -> TransportStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransportStats {
            sent: get(&c.sent),
            received: get(&c.received),
            dropped_queue_full: get(&c.dropped_queue_full),
            dropped_not_connected: get(&c.dropped_not_connected),
            garbage: get(&c.garbage),
            refused_unknown_node: get(&c.refused_unknown_node),
        }
    }

    /// Every link to `peer`.
    pub fn links(&self, peer: &str) -> Vec<LinkReport> {
        let now = Instant::now();
        let Some(links) = self.inner.peers.get(peer) else {
            return Vec::new();
        };
        links
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let l = l.as_ref()?;
                Some(LinkReport {
                    network: self.inner.networks.get(i).cloned().unwrap_or_default(),
                    address: l.addr.to_string(),
                    connected: l.connected.load(Ordering::Relaxed),
                    heard_ms_ago: self
                        .inner
                        .heard_ago(l, now)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                })
            })
            .collect()
    }
}

async fn writer(
    inner: Arc<Inner>,
    net: NetConfig,
    peer: String,
    link: Arc<Link>,
    mut queue: mpsc::Receiver<Wire>,
    stale_after: Duration,
) {
    let mut backoff = Backoff::new(
        DIAL_BACKOFF_INITIAL,
        DIAL_BACKOFF_MAX,
        DEFAULT_BACKOFF_FACTOR,
        DEFAULT_BACKOFF_JITTER,
    );
    let mut refused_backoff = Backoff::new(
        DIAL_REFUSED_BACKOFF_INITIAL,
        DIAL_REFUSED_BACKOFF_MAX,
        DEFAULT_BACKOFF_FACTOR,
        DEFAULT_BACKOFF_JITTER,
    );
    loop {
        // While there is no connection, queued messages are stale by the time one comes up
        // (heartbeats carry their send time): drop them.
        let conn = {
            let dial = dial(&net, &peer, &link, &mut backoff, &mut refused_backoff);
            tokio::pin!(dial);
            loop {
                tokio::select! {
                    c = &mut dial => break c,
                    m = queue.recv() => match m {
                        Some(_) => bump(&inner.counters.dropped_not_connected),
                        None => return,
                    },
                }
            }
        };
        if conn.peer_node() != peer {
            tracing::warn!(
                peer = %peer,
                address = %link.addr,
                answered = %conn.peer_node(),
                "a peer's address answered with another node's name; check [[node]] addresses"
            );
            tokio::time::sleep(refused_backoff.next_delay()).await;
            continue;
        }
        let up_since = Instant::now();
        link.connected.store(true, Ordering::Relaxed);
        tracing::debug!(peer = %peer, address = %link.addr, "membership link up");
        let (mut tx, mut rx) = conn.into_split();
        let mut check = tokio::time::interval(stale_after / 4);
        let why = loop {
            tokio::select! {
                m = queue.recv() => {
                    let Some(m) = m else { return };
                    match tokio::time::timeout(SEND_TIMEOUT, tx.send(&m)).await {
                        Ok(Ok(())) => bump(&inner.counters.sent),
                        Ok(Err(e)) => break format!("send failed: {e}"),
                        Err(_) => break format!("a send took longer than {SEND_TIMEOUT:?}"),
                    }
                }
                // The peer never sends on this connection: anything but a message means it
                // closed or broke.
                r = rx.recv_body() => if let Err(e) = r {
                    break format!("connection ended: {e}");
                },
                _ = check.tick() => {
                    let now = Instant::now();
                    let silent = inner
                        .heard_ago(&link, now)
                        .is_none_or(|d| d >= stale_after);
                    if silent && now.saturating_duration_since(up_since) >= stale_after {
                        break format!("nothing heard from the peer on this network for {stale_after:?}");
                    }
                }
            }
        };
        link.connected.store(false, Ordering::Relaxed);
        tracing::debug!(peer = %peer, address = %link.addr, reason = %why, "membership link down; redialling");
    }
}

/// Connects to the link's address until it works. Refusals that only a configuration change
/// cures are retried slowly (`refused`), everything else (peer down, link cut) quickly
/// (`backoff`). The pause between attempts ends early when the peer connects to this node
/// (`Link::redial`); an attempt under way is never cut short, or two peers that come up
/// together could abort each other's handshakes for ever.
async fn dial(
    net: &NetConfig,
    peer: &str,
    link: &Link,
    backoff: &mut Backoff,
    refused: &mut Backoff,
) -> Conn {
    let addr = link.addr;
    let mut failures: u64 = 0;
    loop {
        match connect_addr(net, addr, CHANNEL).await {
            Ok(conn) => {
                backoff.reset();
                refused.reset();
                if failures > 0 {
                    tracing::info!(peer, %addr, failures, "membership link connected after retrying");
                }
                return conn;
            }
            Err(e) => {
                failures += 1;
                let misconfigured = matches!(
                    e.refusal_kind(),
                    Some(RefusalKind::Auth | RefusalKind::Cluster | RefusalKind::Version)
                );
                let delay = if misconfigured {
                    refused.next_delay()
                } else {
                    backoff.next_delay()
                };
                if failures == 1 {
                    tracing::info!(peer, %addr, error = %e, ?delay, "cannot reach the peer yet; retrying");
                } else {
                    tracing::debug!(peer, %addr, error = %e, ?delay, failures, "still cannot reach the peer");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    // The peer is up: the rest of the pause would only delay the view that takes
                    // it in, and meanwhile the members this node cannot reach look dead to it.
                    () = link.redial.notified() => {
                        backoff.reset();
                        tracing::debug!(peer, %addr, "the peer connected in: redialling at once");
                    }
                }
            }
        }
    }
}

async fn acceptor(inner: Arc<Inner>, network: usize, mut conns: mpsc::Receiver<Conn>) {
    while let Some(conn) = conns.recv().await {
        let peer = conn.peer_node().to_owned();
        let Some(links) = inner.peers.get(&peer) else {
            bump(&inner.counters.refused_unknown_node);
            tracing::warn!(
                node = %peer,
                address = %conn.peer_addr(),
                "refused a membership connection: the node is not configured here"
            );
            continue;
        };
        // A peer may reach this node on a network this node has no address of it for.
        let link = links.get(network).cloned().flatten();
        tokio::spawn(reader(inner.clone(), network, peer, link, conn));
    }
}

async fn reader(
    inner: Arc<Inner>,
    network: usize,
    peer: String,
    link: Option<Arc<Link>>,
    conn: Conn,
) {
    let generation = link
        .as_ref()
        .map(|l| l.inbound_gen.fetch_add(1, Ordering::Relaxed) + 1);
    if let Some(l) = link
        .as_ref()
        .filter(|l| !l.connected.load(Ordering::Relaxed))
    {
        l.redial.notify_one();
    }
    let replaced = || {
        link.as_ref()
            .zip(generation)
            .is_some_and(|(l, g)| l.inbound_gen.load(Ordering::Relaxed) != g)
    };
    // The sending half stays open: dropping it would half-close the peer's connection.
    let (_tx, mut rx) = conn.into_split();
    let mut last = Instant::now();
    loop {
        match tokio::time::timeout(READER_CHECK, rx.recv::<Wire>()).await {
            Ok(Ok(msg)) => {
                last = Instant::now();
                if let Some(l) = &link {
                    l.last_in.store(inner.stamp(last), Ordering::Relaxed);
                }
                bump(&inner.counters.received);
                inner.deliver(Inbound {
                    from: peer.clone(),
                    network,
                    msg,
                });
            }
            // The frame was sound but its body not a message we know: skip it, keep going.
            Ok(Err(e @ (NetError::Decode(_) | NetError::Malformed { .. }))) => {
                let n = inner.counters.garbage.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(peer = %peer, error = %e, dropped = n + 1, "undecodable membership message dropped");
                }
            }
            Ok(Err(_)) => return,
            Err(_) => {
                if replaced() || last.elapsed() >= READER_IDLE {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cluster::net::{Listener, Secret, connect_addr};

    use super::*;

    fn net(node: &str) -> NetConfig {
        let secret = Secret::new(b"transport test secret 0123".to_vec()).expect("secret");
        NetConfig::new("t", node, secret).expect("config")
    }

    async fn listeners(node: &str, n: usize) -> Vec<Listener> {
        let mut out = Vec::new();
        for _ in 0..n {
            let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
            out.push(Listener::bind(&net(node), addr).await.expect("bind"));
        }
        out
    }

    fn start(node: &str, own: &[Listener], peer: &str, theirs: &[Listener]) -> Transport {
        let inbound = own
            .iter()
            .map(|l| l.channel(CHANNEL).expect("channel"))
            .collect();
        Transport::start(
            &Handle::current(),
            net(node),
            vec!["net0".into(), "net1".into()],
            BTreeMap::from([(
                peer.to_owned(),
                theirs.iter().map(Listener::local_addr).collect(),
            )]),
            inbound,
            Duration::from_millis(300),
            Duration::from_secs(1),
        )
    }

    async fn connected(t: &Transport, peer: &str) {
        for _ in 0..500 {
            if t.links(peer).iter().all(|l| l.connected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("links to {peer} never came up: {:?}", t.links(peer));
    }

    #[tokio::test]
    async fn messages_arrive_tagged_with_their_network_and_strangers_are_refused() {
        let (la, lb) = (listeners("a", 2).await, listeners("b", 2).await);
        let ta = start("a", &la, "b", &lb);
        let tb = start("b", &lb, "a", &la);
        let (tx, mut rx) = mpsc::unbounded_channel();
        tb.set_sink(Some(Arc::new(move |m| {
            let _ = tx.send(m);
        })));
        connected(&ta, "b").await;
        connected(&tb, "a").await;

        ta.send("b", Some(1), Wire::Membership(Message::RegroupRequest));
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("a message");
        assert_eq!((m.from.as_str(), m.network), ("a", 1));
        assert_eq!(m.msg, Wire::Membership(Message::RegroupRequest));
        // The receiver now heard a on network 1 only.
        let heard: Vec<bool> = tb
            .links("a")
            .iter()
            .map(|l| l.heard_ms_ago.is_some())
            .collect();
        assert_eq!(heard, [false, true]);

        // Any network: one of them, once.
        ta.send("b", None, Wire::Membership(Message::Leave));
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("a message");
        assert_eq!(m.msg, Wire::Membership(Message::Leave));
        assert!(rx.try_recv().is_err());

        // An unknown peer (it knows the secret, but is not configured) is refused.
        let mut stranger = connect_addr(&net("zz"), lb[0].local_addr(), CHANNEL)
            .await
            .expect("the handshake itself succeeds");
        let _ = stranger
            .send(&Wire::Membership(Message::RegroupRequest))
            .await;
        for _ in 0..200 {
            if tb.stats().refused_unknown_node == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(tb.stats().refused_unknown_node, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "nothing from the stranger");

        // A peer that is not configured at all gets nothing queued.
        ta.send("nobody", None, Wire::Membership(Message::Leave));
        assert!(ta.stats().dropped_not_connected >= 1);
        assert!(ta.stats().sent >= 2);
    }

    /// A peer that comes up while this node's links to it wait out their dial backoff is
    /// reached at once: its inbound connections cut the pauses short.
    #[tokio::test]
    async fn a_peer_that_connects_in_is_redialled_at_once() {
        // Well below DIAL_BACKOFF_MAX less its jitter, so waiting out a pause misses it.
        const AT_ONCE: Duration = Duration::from_millis(250);
        // Long enough for the pauses to have grown to DIAL_BACKOFF_MAX.
        const GROW: Duration = Duration::from_millis(1200);
        // Each round without the redial passes by chance only when both pauses happen to end
        // within AT_ONCE; three rounds make that unlikely.
        for round in 0..3 {
            let la = listeners("a", 2).await;
            let addrs: Vec<SocketAddr> = listeners("b", 2)
                .await
                .iter()
                .map(Listener::local_addr)
                .collect();
            // b is down (its ports refuse): a's writers back off.
            let ta = Transport::start(
                &Handle::current(),
                net("a"),
                vec!["net0".into(), "net1".into()],
                BTreeMap::from([("b".to_owned(), addrs.clone())]),
                la.iter()
                    .map(|l| l.channel(CHANNEL).expect("channel"))
                    .collect(),
                Duration::from_millis(300),
                Duration::from_secs(1),
            );
            tokio::time::sleep(GROW).await;
            assert!(ta.links("b").iter().all(|l| !l.connected));
            let mut lb = Vec::new();
            for addr in &addrs {
                lb.push(
                    Listener::bind(&net("b"), *addr)
                        .await
                        .expect("rebind b's port"),
                );
            }
            let up = Instant::now();
            let _tb = start("b", &lb, "a", &la);
            connected(&ta, "b").await;
            let took = up.elapsed();
            assert!(
                took < AT_ONCE,
                "round {round}: a reached b {took:?} after b connected in"
            );
        }
    }
}
