//! End-to-end tests of the transport over loopback sockets (port 0, so tests run in parallel):
//! real listeners and dialers, and raw peers that misbehave on purpose.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};

use super::frame::{FrameCodec, decode_body, open_envelope};
use super::handshake::{
    ClientHandshake, FrameReader, FrameWriter, HandshakeMsg, Machine, NONCE_LEN, ServerHandshake,
    decode_handshake,
};
use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const OTHER_SECRET: &[u8] = b"not-the-cluster-secret-at-all!!!";
const CHANNEL: &str = "test/chan";
/// Upper bound for anything a test waits for; generous for a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(10);

fn node(cluster: &str, name: &str, secret: &[u8]) -> NetConfig {
    let mut cfg =
        NetConfig::new(cluster, name, Secret::new(secret).expect("long enough")).expect("valid");
    cfg.handshake_timeout = Duration::from_secs(3);
    cfg.connect_timeout = Duration::from_secs(3);
    cfg
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A port on loopback that nothing listens on (bound, then released).
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind(loopback()).await.expect("bind");
    l.local_addr().expect("addr")
}

async fn server() -> (Listener, mpsc::Receiver<Conn>) {
    let listener = Listener::bind(&node("prod", "srv", SECRET), loopback())
        .await
        .expect("bind");
    let rx = listener.channel(CHANNEL).expect("register");
    (listener, rx)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Msg {
    Ping { n: u32 },
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// Waits until `cond` holds for the listener's counters.
async fn wait_stats(listener: &Listener, what: &str, cond: impl Fn(&NetStatsSnapshot) -> bool) {
    let start = Instant::now();
    while !cond(&listener.stats()) {
        assert!(
            start.elapsed() < PATIENCE,
            "{what}: counters never matched: {:?}",
            listener.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A good client still gets through and can talk.
async fn assert_serves(listener: &Listener, rx: &mut mpsc::Receiver<Conn>) {
    let cfg = node("prod", "good", SECRET);
    let mut client =
        tokio::time::timeout(PATIENCE, connect_addr(&cfg, listener.local_addr(), CHANNEL))
            .await
            .expect("in time")
            .expect("good client connects");
    let mut accepted = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("in time")
        .expect("delivered");
    assert_eq!(accepted.peer_node(), "good");
    client.send(&Msg::Ping { n: 1 }).await.expect("send");
    assert_eq!(
        accepted.recv::<Msg>().await.expect("recv"),
        Msg::Ping { n: 1 }
    );
}

/// A peer that speaks raw frames, to misbehave in ways the real client cannot.
struct RawPeer {
    rd: FrameReader,
    wr: FrameWriter,
}

impl RawPeer {
    async fn dial(addr: SocketAddr, version: u16) -> RawPeer {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawPeer::over(stream, version)
    }

    fn over(stream: TcpStream, version: u16) -> RawPeer {
        let (r, w) = stream.into_split();
        RawPeer {
            rd: FramedRead::new(r, FrameCodec::new(HANDSHAKE_MAX_FRAME)),
            wr: FramedWrite::new(
                w,
                FrameCodec::new(HANDSHAKE_MAX_FRAME).with_version(version),
            ),
        }
    }

    async fn send(&mut self, msg: &HandshakeMsg) {
        self.wr.send(msg).await.expect("raw send");
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        let w = self.wr.get_mut();
        w.write_all(bytes).await.expect("raw write");
        w.flush().await.expect("raw flush");
    }

    /// The next handshake message, or `None` at the end of the stream.
    async fn next(&mut self) -> Option<HandshakeMsg> {
        let frame = tokio::time::timeout(PATIENCE, self.rd.next())
            .await
            .expect("in time")?
            .ok()?;
        Some(decode_handshake(&frame).expect("a handshake message"))
    }

    async fn expect_refusal(&mut self, code: &str) {
        match self.next().await {
            Some(HandshakeMsg::Refuse { code: got, detail }) => {
                assert_eq!(got, code, "detail: {detail}");
                assert!(!detail.is_empty());
            }
            other => panic!("expected a {code} refusal, got {other:?}"),
        }
        assert_eq!(self.next().await, None, "closed after the refusal");
    }
}

fn hello(cluster: &str, channel: &str) -> HandshakeMsg {
    HandshakeMsg::Hello {
        cluster: cluster.into(),
        node: "raw".into(),
        channel: channel.into(),
        nonce: [9; NONCE_LEN],
    }
}

#[tokio::test]
async fn happy_path_both_directions_with_split_halves() {
    let (listener, mut rx) = server().await;
    let cfg = node("prod", "cli", SECRET);
    let client = connect(&cfg, &[listener.local_addr()], CHANNEL)
        .await
        .expect("connects");
    let accepted = rx.recv().await.expect("delivered");
    assert_eq!(client.peer_node(), "srv");
    assert_eq!(client.channel(), CHANNEL);
    assert_eq!(client.peer_addr(), listener.local_addr());
    assert_eq!(accepted.peer_node(), "cli");
    assert_eq!(accepted.channel(), CHANNEL);

    // The server echoes with its halves in two tasks, joined by a queue.
    let (mut srv_tx, mut srv_rx) = accepted.into_split();
    let (echo_tx, mut echo_rx) = mpsc::channel::<Msg>(4);
    let reader = tokio::spawn(async move {
        let mut seen = 0u32;
        loop {
            match srv_rx.recv::<Msg>().await {
                Ok(msg) => {
                    seen += 1;
                    echo_tx.send(msg).await.expect("writer alive");
                }
                Err(NetError::Closed) => return seen,
                Err(e) => panic!("server recv: {e}"),
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(msg) = echo_rx.recv().await {
            srv_tx.send(&msg).await.expect("echo");
        }
        srv_tx.close().await.expect("close");
    });

    // The client sends from one task and receives in another.
    const COUNT: u32 = 200;
    let big = Msg::Data((0..3_000_000u32).map(|i| (i % 251) as u8).collect());
    let (mut cli_tx, mut cli_rx) = client.into_split();
    let big_sent = big.clone();
    let sender = tokio::spawn(async move {
        for n in 0..COUNT {
            cli_tx.feed(&Msg::Ping { n }).await.expect("feed");
        }
        cli_tx.flush().await.expect("flush");
        cli_tx.send(&big_sent).await.expect("big send");
        cli_tx.close().await.expect("close");
    });
    for n in 0..COUNT {
        assert_eq!(cli_rx.recv::<Msg>().await.expect("echo"), Msg::Ping { n });
    }
    assert_eq!(cli_rx.recv::<Msg>().await.expect("big echo"), big);
    assert!(matches!(cli_rx.recv::<Msg>().await, Err(NetError::Closed)));
    assert!(matches!(cli_rx.recv::<Msg>().await, Err(NetError::Closed)));
    sender.await.expect("sender");
    assert_eq!(reader.await.expect("reader"), COUNT + 1);
    writer.await.expect("writer");

    let stats = listener.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.inbound_refused.total(), 0);
    assert_eq!(cfg.stats.snapshot().dialed, 1);
}

#[tokio::test]
async fn a_body_of_the_wrong_type_is_an_error_that_keeps_the_connection() {
    let (listener, mut rx) = server().await;
    let cfg = node("prod", "cli", SECRET);
    let mut client = connect_addr(&cfg, listener.local_addr(), CHANNEL)
        .await
        .expect("connects");
    let mut accepted = rx.recv().await.expect("delivered");
    client.send(&"not a Msg").await.expect("send");
    client.send(&Msg::Ping { n: 2 }).await.expect("send");
    assert!(matches!(
        accepted.recv::<Msg>().await,
        Err(NetError::Decode(_))
    ));
    assert_eq!(
        accepted.recv::<Msg>().await.expect("still usable"),
        Msg::Ping { n: 2 }
    );
    let (_tx, mut raw_rx) = accepted.into_split();
    client.send(&Msg::Ping { n: 3 }).await.expect("send");
    let body = raw_rx.recv_body().await.expect("body");
    assert_eq!(
        decode_body::<Msg>(&body).expect("decodes"),
        Msg::Ping { n: 3 }
    );
}

#[tokio::test]
async fn wrong_secret_is_refused_on_both_sides() {
    let (listener, mut rx) = server().await;
    let cfg = node("prod", "intruder", OTHER_SECRET);
    let err = connect_addr(&cfg, listener.local_addr(), CHANNEL)
        .await
        .expect_err("refused");
    assert!(matches!(err, NetError::BadProof), "{err}");
    assert_eq!(cfg.stats.snapshot().outbound_refused.auth, 1);
    wait_stats(&listener, "auth", |s| s.inbound_refused.auth == 1).await;
    assert_eq!(listener.stats().accepted, 0);
    assert!(rx.try_recv().is_err(), "nothing delivered");
    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn a_client_that_fails_its_proof_is_refused_by_the_server() {
    // Only a hand-made peer can answer a good challenge with a bad response.
    let (listener, mut rx) = server().await;
    let mut raw = RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await;
    raw.send(&hello("prod", CHANNEL)).await;
    assert!(matches!(
        raw.next().await,
        Some(HandshakeMsg::Challenge { .. })
    ));
    raw.send(&HandshakeMsg::Response { proof: [0; 32] }).await;
    raw.expect_refusal("auth").await;
    wait_stats(&listener, "auth", |s| s.inbound_refused.auth == 1).await;
    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn wrong_cluster_is_refused_on_both_sides() {
    let (listener, mut rx) = server().await;
    let cfg = node("staging", "cli", SECRET);
    let err = connect_addr(&cfg, listener.local_addr(), CHANNEL)
        .await
        .expect_err("refused");
    match &err {
        NetError::PeerRefused { code, detail } => {
            assert_eq!(code, "cluster");
            assert!(
                detail.contains("prod") && detail.contains("staging"),
                "{detail}"
            );
        }
        other => panic!("{other}"),
    }
    assert_eq!(cfg.stats.snapshot().outbound_refused.cluster, 1);
    wait_stats(&listener, "cluster", |s| s.inbound_refused.cluster == 1).await;
    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn unknown_channel_is_refused_on_both_sides() {
    let (listener, mut rx) = server().await;
    let cfg = node("prod", "cli", SECRET);
    let err = connect_addr(&cfg, listener.local_addr(), "membership")
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, NetError::PeerRefused { code, .. } if code == "channel"),
        "{err}"
    );
    assert_eq!(cfg.stats.snapshot().outbound_refused.channel, 1);
    wait_stats(&listener, "channel", |s| s.inbound_refused.channel == 1).await;

    // A channel whose receiver was dropped is unknown too, and may be registered again.
    let other = listener.channel("other").expect("register");
    assert!(matches!(
        listener.channel("other"),
        Err(NetError::ChannelInUse { .. })
    ));
    drop(other);
    let err = connect_addr(&cfg, listener.local_addr(), "other")
        .await
        .expect_err("refused");
    assert!(matches!(&err, NetError::PeerRefused { code, .. } if code == "channel"));
    let mut other = listener.channel("other").expect("register again");
    let _client = connect_addr(&cfg, listener.local_addr(), "other")
        .await
        .expect("connects");
    assert_eq!(other.recv().await.expect("delivered").channel(), "other");
    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn other_protocol_version_is_refused_on_both_sides() {
    // A newer client against this server.
    let (listener, mut rx) = server().await;
    let mut raw = RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION + 1).await;
    raw.send(&hello("prod", CHANNEL)).await;
    raw.expect_refusal("version").await;
    wait_stats(&listener, "version", |s| s.inbound_refused.version == 1).await;
    assert_serves(&listener, &mut rx).await;

    // This client against a newer server, which answers in its own version.
    let fake = TcpListener::bind(loopback()).await.expect("bind");
    let fake_addr = fake.local_addr().expect("addr");
    let fake_server = tokio::spawn(async move {
        let (stream, _) = fake.accept().await.expect("accept");
        let mut raw = RawPeer::over(stream, PROTOCOL_VERSION + 1);
        assert!(matches!(raw.next().await, Some(HandshakeMsg::Hello { .. })));
        raw.send(&HandshakeMsg::Challenge {
            node: "future".into(),
            nonce: [1; NONCE_LEN],
            proof: [2; 32],
        })
        .await;
        raw.expect_refusal("version").await;
    });
    let cfg = node("prod", "cli", SECRET);
    let err = connect_addr(&cfg, fake_addr, CHANNEL)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, NetError::Version { ours: PROTOCOL_VERSION, theirs } if theirs == PROTOCOL_VERSION + 1),
        "{err}"
    );
    assert_eq!(cfg.stats.snapshot().outbound_refused.version, 1);
    fake_server.await.expect("fake server saw the refusal");
}

#[tokio::test]
async fn garbage_is_refused_and_the_listener_goes_on() {
    let (listener, mut rx) = server().await;

    // A well-formed frame full of random bytes.
    let mut rng = StdRng::seed_from_u64(42);
    let mut raw = RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await;
    let mut frame = BytesMut::new();
    frame.put_u32(200);
    frame.extend((0..200).map(|_| rng.random::<u8>()));
    raw.send_bytes(&frame).await;
    raw.expect_refusal("malformed").await;
    wait_stats(&listener, "malformed", |s| s.inbound_refused.malformed == 1).await;

    // A valid envelope around a message that is not a handshake message.
    let mut raw = RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await;
    raw.wr.send(&Msg::Ping { n: 5 }).await.expect("send");
    raw.expect_refusal("malformed").await;
    wait_stats(&listener, "malformed", |s| s.inbound_refused.malformed == 2).await;

    // Another protocol entirely: its first four bytes read as a huge length.
    let mut raw = RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await;
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    raw.expect_refusal("oversized").await;
    wait_stats(&listener, "oversized", |s| s.inbound_refused.oversized == 1).await;

    // A client that sends `welcome` first.
    let mut raw = RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await;
    raw.send(&HandshakeMsg::Welcome {}).await;
    raw.expect_refusal("malformed").await;
    wait_stats(&listener, "malformed", |s| s.inbound_refused.malformed == 3).await;

    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn a_silent_peer_times_out_without_blocking_others() {
    let mut cfg = node("prod", "srv", SECRET);
    cfg.handshake_timeout = Duration::from_millis(1500);
    let listener = Listener::bind(&cfg, loopback()).await.expect("bind");
    let mut rx = listener.channel(CHANNEL).expect("register");

    let mut silent: Vec<RawPeer> = Vec::new();
    for _ in 0..5 {
        silent.push(RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await);
    }
    // While five handshakes hang, a good client is served at once.
    let start = Instant::now();
    assert_serves(&listener, &mut rx).await;
    assert!(
        start.elapsed() < cfg.handshake_timeout,
        "served only after {:?}",
        start.elapsed()
    );
    for raw in &mut silent {
        raw.expect_refusal("timeout").await;
    }
    wait_stats(&listener, "timeout", |s| s.inbound_refused.timeout == 5).await;
    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn a_silent_server_times_the_client_out() {
    let fake = TcpListener::bind(loopback()).await.expect("bind");
    let fake_addr = fake.local_addr().expect("addr");
    let fake_server = tokio::spawn(async move {
        let (stream, _) = fake.accept().await.expect("accept");
        let mut raw = RawPeer::over(stream, PROTOCOL_VERSION);
        assert!(matches!(raw.next().await, Some(HandshakeMsg::Hello { .. })));
        raw.expect_refusal("timeout").await;
    });
    let mut cfg = node("prod", "cli", SECRET);
    cfg.handshake_timeout = Duration::from_millis(300);
    let err = connect_addr(&cfg, fake_addr, CHANNEL)
        .await
        .expect_err("times out");
    assert!(matches!(err, NetError::HandshakeTimeout { .. }), "{err}");
    assert_eq!(cfg.stats.snapshot().outbound_refused.timeout, 1);
    fake_server.await.expect("fake server");
}

#[tokio::test]
async fn too_many_pending_handshakes_are_refused_as_busy() {
    let mut cfg = node("prod", "srv", SECRET);
    cfg.max_pending_handshakes = 2;
    cfg.handshake_timeout = Duration::from_secs(2);
    let listener = Listener::bind(&cfg, loopback()).await.expect("bind");
    let mut rx = listener.channel(CHANNEL).expect("register");
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await);
    }
    // Make sure both silent peers hold their slots before the third arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client_cfg = node("prod", "cli", SECRET);
    let err = connect_addr(&client_cfg, listener.local_addr(), CHANNEL)
        .await
        .expect_err("busy");
    assert!(
        matches!(&err, NetError::PeerRefused { code, .. } if code == "busy"),
        "{err}"
    );
    wait_stats(&listener, "busy", |s| s.inbound_refused.busy == 1).await;
    // Once the silent ones timed out, the slots are free again.
    wait_stats(&listener, "timeout", |s| s.inbound_refused.timeout == 2).await;
    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn oversized_frames_are_refused() {
    let mut cfg = node("prod", "srv", SECRET);
    cfg.max_frame = 64 * 1024;
    let listener = Listener::bind(&cfg, loopback()).await.expect("bind");
    let mut rx = listener.channel(CHANNEL).expect("register");

    // In the handshake, the limit is HANDSHAKE_MAX_FRAME whatever max_frame says.
    let mut raw = RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await;
    let mut prefix = BytesMut::new();
    prefix.put_u32(u32::try_from(HANDSHAKE_MAX_FRAME + 1).expect("small"));
    raw.send_bytes(&prefix).await;
    raw.expect_refusal("oversized").await;
    wait_stats(&listener, "oversized", |s| s.inbound_refused.oversized == 1).await;

    // After it, the receiver's max_frame: a sender with a larger limit gets its connection cut.
    let mut big_cfg = node("prod", "big", SECRET);
    big_cfg.max_frame = 1024 * 1024;
    let mut client = connect_addr(&big_cfg, listener.local_addr(), CHANNEL)
        .await
        .expect("connects");
    let mut accepted = rx.recv().await.expect("delivered");
    client
        .send(&Msg::Data(vec![7; 100 * 1024]))
        .await
        .expect("sent");
    match accepted.recv::<Msg>().await {
        Err(NetError::FrameTooLarge { max, len }) => {
            assert_eq!(max, 64 * 1024);
            assert!(len > 100 * 1024);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        accepted.recv::<Msg>().await,
        Err(NetError::Closed)
    ));
    // The server shut the socket down: the client sees the end of the stream.
    let end = tokio::time::timeout(PATIENCE, client.recv::<Msg>())
        .await
        .expect("in time");
    assert!(
        matches!(end, Err(NetError::Closed | NetError::Io(_))),
        "{end:?}"
    );

    // A sender refuses to send above its own limit and keeps the connection.
    let mut small = connect_addr(&cfg, listener.local_addr(), CHANNEL)
        .await
        .expect("connects");
    let mut accepted = rx.recv().await.expect("delivered");
    let err = small
        .send(&Msg::Data(vec![1; 100 * 1024]))
        .await
        .expect_err("too big");
    assert!(matches!(err, NetError::FrameTooLarge { max, .. } if max == 64 * 1024));
    small.send(&Msg::Ping { n: 9 }).await.expect("small one");
    assert_eq!(
        accepted.recv::<Msg>().await.expect("recv"),
        Msg::Ping { n: 9 }
    );
    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn a_truncated_frame_then_eof_is_refused() {
    let (listener, mut rx) = server().await;
    let mut raw = RawPeer::dial(listener.local_addr(), PROTOCOL_VERSION).await;
    let mut partial = BytesMut::new();
    partial.put_u32(100);
    partial.extend_from_slice(&[0x92, 0x01, 0x81]);
    raw.send_bytes(&partial).await;
    raw.wr.get_mut().shutdown().await.expect("shutdown");
    wait_stats(&listener, "truncated", |s| s.inbound_refused.truncated == 1).await;
    assert_eq!(raw.next().await, None, "nothing to tell a peer that left");

    // The same after the handshake: the receiver reports it and ends the connection.
    let cfg = node("prod", "cli", SECRET);
    let client = connect_addr(&cfg, listener.local_addr(), CHANNEL)
        .await
        .expect("connects");
    let accepted = rx.recv().await.expect("delivered");
    let (mut tx, _client_rx) = client.into_split();
    tx.io_for_tests().write_all(&partial).await.expect("write");
    tx.io_for_tests().shutdown().await.expect("shutdown");
    let (_srv_tx, mut srv_rx) = accepted.into_split();
    assert!(matches!(
        srv_rx.recv::<Msg>().await,
        Err(NetError::Truncated { have: 7, need: 104 })
    ));
    assert_serves(&listener, &mut rx).await;
}

#[tokio::test]
async fn a_client_dialing_early_connects_once_the_listener_appears() {
    let addr = dead_addr().await;
    let cfg = node("prod", "cli", SECRET);
    let dialer = tokio::spawn(async move {
        let mut backoff = Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(150),
            2.0,
            0.3,
        );
        let conn = connect_retry(&cfg, &[addr], CHANNEL, &mut backoff).await;
        (conn, cfg.stats.snapshot())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!dialer.is_finished());
    let listener = Listener::bind(&node("prod", "srv", SECRET), addr)
        .await
        .expect("bind the same port");
    let mut rx = listener.channel(CHANNEL).expect("register");
    let (mut conn, stats) = tokio::time::timeout(PATIENCE, dialer)
        .await
        .expect("connects in time")
        .expect("dialer task");
    assert!(stats.dial_failed >= 2, "{stats:?}");
    assert_eq!(stats.dialed, 1);
    let mut accepted = rx.recv().await.expect("delivered");
    conn.send(&Msg::Ping { n: 4 }).await.expect("send");
    assert_eq!(
        accepted.recv::<Msg>().await.expect("recv"),
        Msg::Ping { n: 4 }
    );
}

#[tokio::test]
async fn dial_falls_through_a_dead_address_to_a_live_one() {
    let (listener, mut rx) = server().await;
    let dead = dead_addr().await;
    let cfg = node("prod", "cli", SECRET);
    let conn = connect(&cfg, &[dead, listener.local_addr()], CHANNEL)
        .await
        .expect("second address works");
    assert_eq!(conn.peer_addr(), listener.local_addr());
    assert_eq!(rx.recv().await.expect("delivered").peer_node(), "cli");
    let stats = cfg.stats.snapshot();
    assert_eq!((stats.dial_failed, stats.dialed), (1, 1));

    // All dead: each address's failure is reported.
    let dead2 = dead_addr().await;
    match connect(&cfg, &[dead, dead2], CHANNEL).await {
        Err(NetError::Unreachable { failures }) => {
            assert_eq!(failures.len(), 2);
            assert_eq!(failures[0].addr, dead);
            assert_eq!(failures[1].addr, dead2);
            assert!(matches!(failures[0].error, NetError::Connect { .. }));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        connect(&cfg, &[], CHANNEL).await,
        Err(NetError::NoAddress)
    ));
}

/// A `tracing` writer that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

// The default (current-thread) runtime polls every task on this thread, so the thread's
// default subscriber sees both sides.
#[tokio::test]
async fn refusals_are_logged_on_both_sides_with_the_reason() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (listener, _rx) = server().await;
    let cfg = node("prod", "intruder", OTHER_SECRET);
    let _ = connect_addr(&cfg, listener.local_addr(), CHANNEL).await;
    wait_stats(&listener, "auth", |s| s.inbound_refused.auth == 1).await;
    let text = captured.text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains("WARN")
            && l.contains("handshake with a cluster peer failed")
            && l.contains("did not prove knowledge of the cluster secret")),
        "client side:\n{text}"
    );
    assert!(
        lines.iter().any(|l| l.contains("WARN")
            && l.contains("refused an inbound connection")
            && l.contains("intruder")
            && l.contains("(\"auth\")")),
        "server side:\n{text}"
    );
    let _ = std::io::stderr().flush();
}

#[test]
fn random_bytes_never_make_the_decoders_panic() {
    let cfg = node("prod", "srv", SECRET);
    let valid: Vec<HandshakeMsg> = vec![
        hello("prod", CHANNEL),
        HandshakeMsg::Challenge {
            node: "n".into(),
            nonce: [3; NONCE_LEN],
            proof: [4; 32],
        },
        HandshakeMsg::Response { proof: [5; 32] },
        HandshakeMsg::Welcome {},
        HandshakeMsg::Refuse {
            code: "auth".into(),
            detail: "no".into(),
        },
    ];
    for seed in 0..3000u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        // Half pure noise, half valid frames with a few bytes changed, cut or added.
        let mut input = BytesMut::new();
        if seed % 2 == 0 {
            let len = rng.random_range(0..600);
            input.extend((0..len).map(|_| rng.random::<u8>()));
        } else {
            for _ in 0..rng.random_range(1..4) {
                let msg = &valid[rng.random_range(0..valid.len())];
                tokio_util::codec::Encoder::encode(
                    &mut FrameCodec::new(HANDSHAKE_MAX_FRAME),
                    msg,
                    &mut input,
                )
                .expect("encodes");
            }
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..input.len());
                match rng.random_range(0..3) {
                    0 => input[at] = rng.random(),
                    1 => input.truncate(at),
                    _ => input[at] ^= 1 << rng.random_range(0..8),
                }
                if input.is_empty() {
                    break;
                }
            }
        }
        let mut codec = FrameCodec::new(rng.random_range(0..1024));
        let mut buf = BytesMut::new();
        let mut rest = &input[..];
        let mut frames = Vec::new();
        'feed: while !rest.is_empty() {
            let take = rng.random_range(1..=rest.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
        let _ = codec.decode_eof(&mut buf);
        let _ = super::frame::msgpack_value_len(&input);
        for frame in frames {
            let _ = super::frame::msgpack_value_len(&frame);
            if let Ok((_, body)) = open_envelope(&frame) {
                let _ = decode_body::<Msg>(body);
                let _ = decode_body::<(u64, String, Vec<u8>, Option<bool>)>(body);
            }
            if let Ok(msg) = decode_handshake(&frame) {
                let mut server = ServerHandshake::new(&cfg, [1; NONCE_LEN], |_: &str| true);
                let _ = server.on_message(msg.clone());
                let (mut client, _) = ClientHandshake::start(&cfg, CHANNEL, [2; NONCE_LEN]);
                let _ = client.on_message(msg);
            }
        }
    }
}

#[test]
fn secrets_come_from_files_without_their_line_end_and_never_show() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("secret");
    std::fs::write(&path, b"0123456789abcdef-long-enough\r\n").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let secret = Secret::from_file(&path).expect("reads");
    assert_eq!(secret.expose(), b"0123456789abcdef-long-enough");
    assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    let cfg = NetConfig::new("c", "n", secret).expect("valid");
    assert!(!format!("{cfg:?}").contains("0123456789"));

    std::fs::write(&path, b"short\n").expect("write");
    assert!(matches!(
        Secret::from_file(&path),
        Err(NetError::SecretTooShort { len: 5, min: 16 })
    ));
    assert!(matches!(
        Secret::from_file(&dir.path().join("missing")),
        Err(NetError::SecretFile { .. })
    ));
}

#[test]
fn configurations_are_checked() {
    let secret = || Secret::new(SECRET).expect("long enough");
    assert!(NetConfig::new("", "n", secret()).is_err());
    assert!(NetConfig::new("c", "a\tb", secret()).is_err());
    assert!(NetConfig::new("c", "n".repeat(256), secret()).is_err());
    let mut cfg = NetConfig::new("c", "n", secret()).expect("valid");
    cfg.max_frame = HANDSHAKE_MAX_FRAME - 1;
    assert!(matches!(
        cfg.validate(),
        Err(NetError::InvalidConfig {
            field: "max_frame",
            ..
        })
    ));
    cfg.max_frame = DEFAULT_MAX_FRAME;
    cfg.channel_backlog = 0;
    assert!(cfg.validate().is_err());
    cfg.channel_backlog = 1;
    cfg.handshake_timeout = Duration::ZERO;
    assert!(cfg.validate().is_err());
}
