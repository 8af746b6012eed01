//! The whole stream over loopback, without watchd: a pump reading a real ring, a bcplog and
//! replay on a real listener. Files are written for real on the "primary" directory and the
//! matching operations appended to the ring (what the shim and libft do); the replica must end
//! identical (same manifest content hash), also across a restart of the backup side and with
//! files that existed before replication started (resync). Also the hand-over to a new primary
//! with a newer ownership epoch: the old primary's files, which hold writes the new one never
//! had, converge on the new primary's, and a pump of the old epoch is refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::net::{Listener, NetConfig, Secret};
use ft::replog::OpRef;
use ft::replog::ring::Ring;
use ractor::{Actor, ActorRef};
use repl::backup::BackupSpec;
use repl::bcplog::{BcplogActor, BcplogArgs, BcplogMsg};
use repl::primary::{Peer, PrimarySpec, PumpActor, PumpMsg, SourceSpec};
use repl::pump::PumpConfig;
use repl::segment::SegmentOptions;

fn net(node: &str) -> NetConfig {
    NetConfig::new(
        "test",
        node,
        Secret::new(b"0123456789abcdef0123".to_vec()).expect("secret"),
    )
    .expect("config")
}

struct Dirs {
    _tmp: tempfile::TempDir,
    primary: PathBuf,
    replica: PathBuf,
    state: PathBuf,
    ring: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Dirs {
        primary: tmp.path().join("primary"),
        replica: tmp.path().join("replica"),
        state: tmp.path().join("state"),
        ring: tmp.path().join("ring"),
        _tmp: tmp,
    };
    std::fs::create_dir_all(&d.primary).expect("mkdir");
    d
}

async fn start_backup(d: &Dirs, listener: &Listener) -> ActorRef<BcplogMsg> {
    let conns = vec![listener.channel("repl/data").expect("channel")];
    let (a, _) = Actor::spawn(
        None,
        BcplogActor,
        BcplogArgs {
            spec: BackupSpec {
                fileset: "data".into(),
                root: d.replica.clone(),
                state_dir: d.state.clone(),
                segment: SegmentOptions::default(),
            },
            primaries: vec!["a".into()],
            conns,
        },
    )
    .await
    .expect("bcplog starts");
    a
}

async fn start_pump(d: &Dirs, addr: std::net::SocketAddr) -> ActorRef<PumpMsg> {
    let (a, _) = Actor::spawn(
        None,
        PumpActor,
        PrimarySpec {
            fileset: "data".into(),
            root: d.primary.clone(),
            source: SourceSpec::Ring {
                path: d.ring.clone(),
                capacity: 1 << 20,
            },
            backups: vec![Peer {
                name: "b".into(),
                addrs: vec![addr],
            }],
            epoch: 1,
            pump: PumpConfig::default(),
            net: net("a"),
        },
    )
    .await
    .expect("pump starts");
    a
}

/// Writes `data` to `rel` under the primary for real and logs it.
fn write(ring: &Ring, root: &Path, rel: &str, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open");
    f.write_all_at(data, offset).expect("write");
    ring.append(OpRef::Write {
        path: rel.as_bytes(),
        offset,
        data,
    })
    .expect("append");
}

fn tree_hash(root: &Path) -> u64 {
    repl::manifest::scan(root).expect("scan").content_hash()
}

async fn wait_identical(d: &Dirs, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (p, r) = (d.primary.clone(), d.replica.clone());
        let same =
            tokio::task::spawn_blocking(move || r.exists() && tree_hash(&p) == tree_hash(&r))
                .await
                .expect("join");
        if same {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the replica did not become identical"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_follows_the_primary_through_resync_and_restarts() {
    let d = dirs();
    // Present before replication starts: only a resync can bring it.
    std::fs::create_dir_all(d.primary.join("old/deep")).expect("mkdir");
    std::fs::write(d.primary.join("old/deep/file"), b"from before").expect("write");

    let listener = Listener::bind(&net("b"), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let backup = start_backup(&d, &listener).await;
    let pump = start_pump(&d, listener.local_addr()).await;
    let ring = Ring::open(&d.ring).expect("open ring");
    wait_identical(&d, "initial resync").await;

    for i in 0..200u64 {
        write(
            &ring,
            &d.primary,
            &format!("dir{}/f{}", i % 7, i % 13),
            i * 10,
            format!("record {i}").as_bytes(),
        );
    }
    std::fs::remove_file(d.primary.join("old/deep/file")).expect("rm");
    ring.append(OpRef::Unlink {
        path: b"old/deep/file",
    })
    .expect("append");
    wait_identical(&d, "streaming").await;

    // The backup side restarts (as after kill -9 of its watchd): it resumes, no resync.
    backup.stop(None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..50u64 {
        write(&ring, &d.primary, "while-down", i * 4, b"abcd");
    }
    let backup = start_backup(&d, &listener).await;
    wait_identical(&d, "after the backup restarted").await;

    // The pump restarts: it re-reads what was not released, with the same seqs.
    pump.stop(None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    write(&ring, &d.primary, "after-pump-restart", 0, b"x");
    let pump = start_pump(&d, listener.local_addr()).await;
    wait_identical(&d, "after the pump restarted").await;

    let status = ractor::call!(pump, PumpMsg::Status).expect("status");
    assert_eq!(status.backups[0].state, "streaming", "{status:?}");
    assert_eq!(
        status.backups[0].resyncs, 0,
        "the restarted pump resumed without a resync: {status:?}"
    );
    let bstatus = ractor::call!(backup, BcplogMsg::Status).expect("status");
    assert!(
        bstatus.connected && bstatus.counters.refused == 0,
        "{bstatus:?}"
    );
    pump.stop(None);
    backup.stop(None);
}

/// One side of a fileset in the hand-over test: its files, its backup state, its ring.
struct Side {
    node: &'static str,
    root: PathBuf,
    state: PathBuf,
    ring: PathBuf,
}

impl Side {
    fn new(base: &Path, node: &'static str) -> Side {
        let side = Side {
            node,
            root: base.join(format!("{node}-files")),
            state: base.join(format!("{node}-state")),
            ring: base.join(format!("{node}-ring")),
        };
        std::fs::create_dir_all(&side.root).expect("mkdir");
        side
    }
}

async fn pump_of(
    node: &str,
    root: &Path,
    ring: &Path,
    epoch: u64,
    backup: &str,
    addr: std::net::SocketAddr,
) -> ActorRef<PumpMsg> {
    let (a, _) = Actor::spawn(
        None,
        PumpActor,
        PrimarySpec {
            fileset: "data".into(),
            root: root.to_owned(),
            source: SourceSpec::Ring {
                path: ring.to_owned(),
                capacity: 1 << 20,
            },
            backups: vec![Peer {
                name: backup.into(),
                addrs: vec![addr],
            }],
            epoch,
            pump: PumpConfig::default(),
            net: net(node),
        },
    )
    .await
    .expect("pump starts");
    a
}

async fn bcplog_of(side: &Side, primary: &str, listener: &Listener) -> ActorRef<BcplogMsg> {
    let (a, _) = Actor::spawn(
        None,
        BcplogActor,
        BcplogArgs {
            spec: BackupSpec {
                fileset: "data".into(),
                root: side.root.clone(),
                state_dir: side.state.clone(),
                segment: SegmentOptions::default(),
            },
            primaries: vec![primary.into()],
            conns: vec![listener.channel("repl/data").expect("channel")],
        },
    )
    .await
    .expect("bcplog starts");
    a
}

async fn same_trees(a: &Path, b: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (x, y) = (a.to_owned(), b.to_owned());
        let same = tokio::task::spawn_blocking(move || tree_hash(&x) == tree_hash(&y))
            .await
            .expect("join");
        if same {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the trees did not become identical"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_epoch_takes_over_and_the_divergent_old_primary_converges_on_it() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("info")
        .try_init();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Side::new(tmp.path(), "a"), Side::new(tmp.path(), "b"));
    let any = "127.0.0.1:0".parse().expect("addr");
    let la = Listener::bind(&net(a.node), any).await.expect("bind");
    let lb = Listener::bind(&net(b.node), any).await.expect("bind");

    // Epoch 1: a is the primary, b follows.
    let b_log = bcplog_of(&b, a.node, &lb).await;
    let a_pump = pump_of(a.node, &a.root, &a.ring, 1, b.node, lb.local_addr()).await;
    let a_ring = Ring::open(&a.ring).expect("ring");
    write(&a_ring, &a.root, "shared", 0, b"version 1");
    write(&a_ring, &a.root, "dir/kept", 0, b"kept");
    same_trees(&a.root, &b.root, "epoch 1").await;

    // a is cut off: what it writes from now on never reaches b (its pump is gone, the records
    // stay in its ring), and it changes files b has.
    a_pump.stop_and_wait(None, None).await.expect("stop");
    write(&a_ring, &a.root, "only-on-a", 0, b"never shipped");
    write(&a_ring, &a.root, "shared", 0, b"VERSION A, LONGER THAN B'S");
    write(&a_ring, &a.root, "dir/kept", 4, b" and more");

    // Epoch 2: b is promoted (its replay drained), its pump streams to a's files.
    let promotion = ractor::call!(b_log, BcplogMsg::Promote)
        .expect("call")
        .expect("promoted");
    assert!(promotion.log_consistent, "{promotion:?}");
    b_log.stop_and_wait(None, None).await.expect("stop");
    let b_pump = pump_of(b.node, &b.root, &b.ring, 2, a.node, la.local_addr()).await;
    let a_log = bcplog_of(&a, b.node, &la).await;
    let b_ring = Ring::open(&b.ring).expect("ring");
    write(&b_ring, &b.root, "shared", 0, b"version 2");
    write(&b_ring, &b.root, "new-on-b", 0, b"b");
    same_trees(&a.root, &b.root, "a follows b").await;
    assert!(!a.root.join("only-on-a").exists());
    assert_eq!(
        std::fs::read(a.root.join("shared")).expect("read"),
        b"version 2"
    );
    assert_eq!(
        std::fs::read(a.root.join("dir/kept")).expect("read"),
        b"kept"
    );

    // A pump of the old epoch (b's name, another tree) is refused by a, and nothing of it
    // reaches a's files; b's stream goes on.
    let stale_root = tmp.path().join("stale-files");
    std::fs::create_dir_all(&stale_root).expect("mkdir");
    std::fs::write(stale_root.join("junk"), b"from the old epoch").expect("write");
    let stale = pump_of(
        b.node,
        &stale_root,
        &tmp.path().join("stale-ring"),
        1,
        a.node,
        la.local_addr(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = ractor::call!(stale, PumpMsg::Status).expect("status");
        if let Some(why) = &st.backups[0].refused {
            assert!(why.contains("stale epoch 1"), "{why}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stale pump was not refused: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write(&b_ring, &b.root, "after-the-stale-pump", 0, b"still b");
    same_trees(&a.root, &b.root, "b's stream after the stale pump").await;
    assert!(!a.root.join("junk").exists());
    let st = ractor::call!(b_pump, PumpMsg::Status).expect("status");
    assert_eq!(st.epoch, 2);
    assert_eq!(st.backups[0].state, "streaming", "{st:?}");
    let st = ractor::call!(a_log, BcplogMsg::Status).expect("status");
    assert!(st.connected && st.counters.epoch == 2, "{st:?}");
    stale.stop(None);
    b_pump.stop(None);
    a_log.stop(None);
}
