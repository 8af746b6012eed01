//! The Rust API against a real Unix datagram socket standing in for watchd.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ft::proto::{AppMessage, MAX_DATAGRAM};
use ft::{Error, Watch};

/// How long a test waits for a datagram that must arrive.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// What "fails fast" means: far below any blocking timeout, far above scheduling noise.
const FAST: Duration = Duration::from_millis(500);
/// Upper bound of sends when filling a receiver's queue; the kernel refuses long before.
const MAX_FILL: usize = 100_000;

/// A stand-in for watchd's application socket, in its own temporary directory.
struct FakeWatchd {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeWatchd {
    fn bind() -> FakeWatchd {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("watchd.sock");
        let sock = bind_at(&path);
        FakeWatchd {
            sock,
            path,
            _dir: dir,
        }
    }

    fn recv(&self) -> AppMessage {
        recv_from(&self.sock)
    }

    fn assert_empty(&self) {
        self.sock.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; MAX_DATAGRAM];
        let got = self.sock.recv(&mut buf);
        assert!(
            got.is_err(),
            "unexpected datagram {:?}",
            got.map(|n| AppMessage::decode(&buf[..n]))
        );
        self.sock.set_nonblocking(false).expect("blocking");
    }
}

fn bind_at(path: &Path) -> UnixDatagram {
    let sock = UnixDatagram::bind(path).expect("bind receiver");
    sock.set_read_timeout(Some(RECV_TIMEOUT))
        .expect("read timeout");
    sock
}

fn recv_from(sock: &UnixDatagram) -> AppMessage {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = sock.recv(&mut buf).expect("a datagram arrives");
    AppMessage::decode(&buf[..n]).expect("libft sends valid datagrams")
}

#[test]
fn every_call_arrives_as_its_message() {
    let watchd = FakeWatchd::bind();
    let watch = Watch::connect(&watchd.path).expect("connect");
    assert_eq!(watch.socket_path(), watchd.path);
    assert_eq!(watchd.recv(), AppMessage::Register);

    watch
        .heartbeat(7, Duration::from_millis(1500))
        .expect("heartbeat");
    assert_eq!(
        watchd.recv(),
        AppMessage::Heartbeat {
            tid: 7,
            timeout_ms: 1500
        }
    );
    watch
        .heartbeat(8, Duration::from_secs(u64::MAX))
        .expect("heartbeat");
    assert_eq!(
        watchd.recv(),
        AppMessage::Heartbeat {
            tid: 8,
            timeout_ms: u32::MAX
        }
    );
    watch.heartbeat_end(7).expect("end");
    assert_eq!(watchd.recv(), AppMessage::HeartbeatEnd { tid: 7 });
    watch.ready().expect("ready");
    assert_eq!(watchd.recv(), AppMessage::Ready);
    watch.status("serving 3 clients").expect("status");
    assert_eq!(
        watchd.recv(),
        AppMessage::Status("serving 3 clients".into())
    );
    watch.unregister().expect("unregister");
    assert_eq!(watchd.recv(), AppMessage::Unregister);
    watchd.assert_empty();
}

#[test]
fn region_beats_and_ends_on_drop() {
    let watchd = FakeWatchd::bind();
    let watch = Watch::connect(&watchd.path).expect("connect");
    assert_eq!(watchd.recv(), AppMessage::Register);
    {
        let region = watch
            .region(42, Duration::from_millis(250))
            .expect("region");
        assert_eq!(region.tid(), 42);
        assert_eq!(
            watchd.recv(),
            AppMessage::Heartbeat {
                tid: 42,
                timeout_ms: 250
            }
        );
        region.beat().expect("beat");
        assert_eq!(
            watchd.recv(),
            AppMessage::Heartbeat {
                tid: 42,
                timeout_ms: 250
            }
        );
    }
    assert_eq!(watchd.recv(), AppMessage::HeartbeatEnd { tid: 42 });
    // Dropping the Watch itself says nothing: watchd must still judge a vanished process.
    drop(watch);
    watchd.assert_empty();
}

#[test]
fn heartbeats_from_many_threads_share_one_watch() {
    const THREADS: u32 = 4;
    let watchd = FakeWatchd::bind();
    let watch = Watch::connect(&watchd.path).expect("connect");
    assert_eq!(watchd.recv(), AppMessage::Register);
    std::thread::scope(|s| {
        for tid in 1..=THREADS {
            let watch = &watch;
            s.spawn(move || {
                watch
                    .heartbeat(tid, Duration::from_millis(100))
                    .expect("heartbeat")
            });
        }
    });
    let mut tids: Vec<u32> = (0..THREADS)
        .map(|_| match watchd.recv() {
            AppMessage::Heartbeat {
                tid,
                timeout_ms: 100,
            } => tid,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    tids.sort_unstable();
    assert_eq!(tids, (1..=THREADS).collect::<Vec<_>>());
}

#[test]
fn no_listener_is_unreachable_and_fast() {
    let dir = tempfile::tempdir().expect("tempdir");

    // No file at all: ENOENT.
    let missing = dir.path().join("missing.sock");
    let start = Instant::now();
    let err = Watch::connect(&missing).expect_err("nobody listens");
    assert!(matches!(err, Error::Unreachable(_)), "got {err:?}");
    assert!(start.elapsed() < FAST, "took {:?}", start.elapsed());

    // A socket file left behind by a dead watchd: ECONNREFUSED.
    let stale = dir.path().join("stale.sock");
    drop(UnixDatagram::bind(&stale).expect("bind"));
    let start = Instant::now();
    let err = Watch::connect(&stale).expect_err("nobody listens");
    assert!(matches!(err, Error::Unreachable(_)), "got {err:?}");
    assert!(start.elapsed() < FAST, "took {:?}", start.elapsed());
}

#[test]
fn lenient_watch_registers_once_watchd_appears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("later.sock");
    let (watch, first) = Watch::connect_lenient(&path).expect("socket is created");
    assert!(matches!(first, Err(Error::Unreachable(_))), "got {first:?}");
    let err = watch
        .heartbeat(1, Duration::from_millis(300))
        .expect_err("still down");
    assert!(matches!(err, Error::Unreachable(_)), "got {err:?}");
    // Declared while watchd is down: told to watchd as soon as it is reachable.
    assert!(matches!(watch.ready(), Err(Error::Unreachable(_))));

    let receiver = bind_at(&path);
    watch
        .heartbeat(1, Duration::from_millis(300))
        .expect("watchd is up");
    assert_eq!(recv_from(&receiver), AppMessage::Register);
    assert_eq!(recv_from(&receiver), AppMessage::Ready);
    assert_eq!(
        recv_from(&receiver),
        AppMessage::Heartbeat {
            tid: 1,
            timeout_ms: 300
        }
    );
    watch.status("up").expect("status");
    assert_eq!(recv_from(&receiver), AppMessage::Status("up".into()));
}

#[test]
fn full_queue_gives_would_block_and_never_blocks() {
    let watchd = FakeWatchd::bind();
    let watch = Watch::connect(&watchd.path).expect("connect");
    let mut sent = 0usize;
    let mut slowest = Duration::ZERO;
    let outcome = loop {
        assert!(
            sent < MAX_FILL,
            "{MAX_FILL} datagrams queued without WouldBlock"
        );
        let start = Instant::now();
        let result = watch.heartbeat(1, Duration::from_millis(100));
        slowest = slowest.max(start.elapsed());
        match result {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(outcome, Error::WouldBlock), "got {outcome:?}");
    assert!(sent > 0, "the queue holds at least one datagram");
    assert!(slowest < FAST, "a send took {slowest:?}");
    // Still full: fails again at once, and the message is dropped.
    assert!(matches!(watch.ready(), Err(Error::WouldBlock)));

    // Once watchd reads, sending works again.
    assert_eq!(watchd.recv(), AppMessage::Register);
    watch.heartbeat_end(1).expect("room again");
}

#[test]
fn reconnects_to_a_restarted_watchd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("watchd.sock");
    let old = bind_at(&path);
    let watch = Watch::connect(&path).expect("connect");
    assert_eq!(recv_from(&old), AppMessage::Register);
    watch.ready().expect("ready");
    assert_eq!(recv_from(&old), AppMessage::Ready);

    // watchd is killed: its socket closes and a new process binds the path again.
    drop(old);
    std::fs::remove_file(&path).expect("remove old socket");
    let new = bind_at(&path);

    watch
        .heartbeat(3, Duration::from_millis(700))
        .expect("reconnected");
    assert_eq!(recv_from(&new), AppMessage::Register);
    assert_eq!(
        recv_from(&new),
        AppMessage::Ready,
        "readiness is told again"
    );
    assert_eq!(
        recv_from(&new),
        AppMessage::Heartbeat {
            tid: 3,
            timeout_ms: 700
        }
    );
    watch.heartbeat_end(3).expect("common path again");
    assert_eq!(recv_from(&new), AppMessage::HeartbeatEnd { tid: 3 });

    // watchd dies and stays down: one reconnect attempt, then Unreachable, fast.
    drop(new);
    std::fs::remove_file(&path).expect("remove socket");
    let start = Instant::now();
    let err = watch
        .heartbeat(3, Duration::from_millis(700))
        .expect_err("down");
    assert!(matches!(err, Error::Unreachable(_)), "got {err:?}");
    assert!(start.elapsed() < FAST, "took {:?}", start.elapsed());

    // And it comes back later.
    let again = bind_at(&path);
    watch.ready().expect("back");
    assert_eq!(recv_from(&again), AppMessage::Register);
    assert_eq!(recv_from(&again), AppMessage::Ready, "sent once, not twice");
    watch.heartbeat_end(3).expect("common path");
    assert_eq!(recv_from(&again), AppMessage::HeartbeatEnd { tid: 3 });
}

#[test]
fn concurrent_senders_reconnect_once() {
    const THREADS: u32 = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("watchd.sock");
    let old = bind_at(&path);
    let watch = Watch::connect(&path).expect("connect");
    assert_eq!(recv_from(&old), AppMessage::Register);
    drop(old);
    std::fs::remove_file(&path).expect("remove old socket");
    let new = bind_at(&path);

    let barrier = std::sync::Barrier::new(usize::try_from(THREADS).expect("small"));
    std::thread::scope(|s| {
        for tid in 1..=THREADS {
            let (watch, barrier) = (&watch, &barrier);
            s.spawn(move || {
                barrier.wait();
                watch
                    .heartbeat(tid, Duration::from_millis(100))
                    .expect("heartbeat");
            });
        }
    });
    let messages: Vec<AppMessage> = (0..=THREADS).map(|_| recv_from(&new)).collect();
    let registers = messages
        .iter()
        .filter(|m| **m == AppMessage::Register)
        .count();
    assert_eq!(registers, 1, "one reconnect, one Register: {messages:?}");
    let mut tids: Vec<u32> = messages
        .iter()
        .filter_map(|m| match m {
            AppMessage::Heartbeat { tid, .. } => Some(*tid),
            _ => None,
        })
        .collect();
    tids.sort_unstable();
    assert_eq!(tids, (1..=THREADS).collect::<Vec<_>>());
    new.set_nonblocking(true).expect("nonblocking");
    assert!(
        new.recv(&mut [0u8; MAX_DATAGRAM]).is_err(),
        "no extra datagram"
    );
}
