//! The whole stream over loopback, without watchd: a pump reading a real ring, a bcplog and
//! replay on a real listener. Files are written for real on the "primary" directory and the
//! matching operations appended to the ring (what the shim and libft do); the replica must end
//! identical (same manifest content hash), also across a restart of the backup side and with
//! files that existed before replication started (resync).

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
            primary: "a".into(),
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
