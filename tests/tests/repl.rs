//! File replication end to end: two watchds in their own network namespaces (a primary and a
//! backup), an unmodified program writing under the LD_PRELOAD shim, and faults: kill -9 of
//! either watchd, a cut link, and (sync mode) kill -9 of the whole primary. The replica must
//! end identical to the primary (same manifest content hash: paths, kinds, modes, contents).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ftkit_tests::netns::Lab;
use ftkit_tests::{Scratch, Watchd, q};

/// How long replication may take to catch up in these tests.
/// Longest wait for a workload or a replica to catch up: well inside nextest's minute, so a stuck
/// replica fails with its diagnostics instead of being killed silently.
const CATCH_UP: Duration = Duration::from_secs(25);
const PORT: u16 = 7400;

struct Pair {
    lab: Lab,
    _shared: Scratch,
    secret: PathBuf,
    primary_dir: PathBuf,
    replica_dir: PathBuf,
}

impl Pair {
    fn new(label: &str) -> Pair {
        let lab = Lab::new(2);
        let shared = Scratch::new(label);
        let secret = shared.write("secret", "correct horse battery staple\n");
        let primary_dir = shared.path().join("primary");
        let replica_dir = shared.path().join("replica");
        Pair {
            lab,
            secret,
            primary_dir,
            replica_dir,
            _shared: shared,
        }
    }

    /// The configuration of node `me` (0 = primary "a", 1 = backup "b").
    fn config(&self, me: usize, fileset_extra: &str, services: &str) -> String {
        let (name, other, path) = if me == 0 {
            ("a", "b", &self.primary_dir)
        } else {
            ("b", "a", &self.replica_dir)
        };
        let _ = name;
        format!(
            "[cluster]\nname = \"t\"\nsecret_file = {}\nlisten = [\"{}:{PORT}\"]\n\n\
             [[node]]\nname = \"{other}\"\naddresses = [\"{}:{PORT}\"]\n\n\
             [[fileset]]\nname = \"data\"\npath = {}\nprimary = \"a\"\nbackups = [\"b\"]\n{fileset_extra}\n\n{services}",
            q(&self.secret),
            self.lab.addr(me),
            self.lab.addr(1 - me),
            q(path),
        )
    }

    fn start(&self, me: usize, sync: bool, services: &str) -> Watchd {
        self.start_with(me, &format!("sync = {sync}"), services)
    }

    /// Starts node `me` with extra lines in the `[[fileset]]` table.
    fn start_with(&self, me: usize, fileset_extra: &str, services: &str) -> Watchd {
        let node = if me == 0 { "a" } else { "b" };
        // Rings go to the test's scratch directory, not /dev/shm, so nothing outlives the test;
        // watchd creates the directory (a missing ring_dir must not stop replication).
        let scratch_rings = self
            ._shared
            .path()
            .join(ftkit_tests::unique("rings"))
            .join(node);
        Watchd::start_node(
            Some(self.lab.netns(me)),
            &format!("repl-{node}"),
            Some(node),
            &format!("ring_dir = {}", q(&scratch_rings)),
            &self.config(me, fileset_extra, services),
        )
    }
}

fn wait_identical(a: &Path, b: &Path, what: &str) {
    assert!(
        becomes_identical(a, b),
        "{what}: the replica did not become identical to the primary"
    );
}

/// Whether the trees under `a` and `b` become identical within [`CATCH_UP`].
fn becomes_identical(a: &Path, b: &Path) -> bool {
    ftkit_tests::replica::becomes_identical(a, b, CATCH_UP)
}

/// Both nodes' replication status and the tails of their logs, for a failure message.
fn diagnostics(a: &Watchd, b: &Watchd) -> String {
    let tail = |w: &Watchd| {
        let log = w.log_text();
        let start = log.len().saturating_sub(6000);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    };
    let status = |w: &Watchd| {
        let out = w.ftctl(&["repl", "status", "--json"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    format!(
        "primary: {}\nbackup: {}\nprimary log tail:\n{}\nbackup log tail:\n{}",
        status(a),
        status(b),
        tail(a),
        tail(b)
    )
}

/// A shell service under the shim running `script` with the fileset as its working directory.
fn shim_service(dir: &Path, script: &str) -> String {
    format!(
        "[[service]]\nname = \"writer\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", {}]\ncwd = {}\n\
         filesets = [\"data\"]\nrepl_shim = true\nrestart = {{ policy = \"never\" }}\n",
        q(script),
        q(dir)
    )
}

#[test]
fn cp_and_tar_under_the_shim_are_replicated() {
    let p = Pair::new("repl-shim");
    std::fs::create_dir_all(&p.primary_dir).expect("mkdir");
    let src = ftkit_tests::repo_root().join("repl");
    let archive = p._shared.path().join("src.tar");
    let ok = std::process::Command::new("tar")
        .arg("-C")
        .arg(ftkit_tests::repo_root())
        .args(["-cf"])
        .arg(&archive)
        .arg("cluster")
        .status()
        .expect("tar c");
    assert!(ok.success());
    let b = p.start(1, false, "");
    let a = p.start(
        0,
        false,
        &shim_service(
            &p.primary_dir,
            &format!(
                "cp -r {} tree && mkdir un && tar -C un -xf {} && echo done > marker && exec sleep 1000",
                q(&src),
                q(&archive)
            ),
        ),
    );
    let deadline = Instant::now() + CATCH_UP;
    while !p.primary_dir.join("marker").exists() {
        assert!(Instant::now() < deadline, "the workload did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_identical(&p.primary_dir, &p.replica_dir, "cp -r and tar x");
    assert!(p.replica_dir.join("tree/src/pump.rs").exists());
    let status = a.ftctl_ok(&["repl", "status"]);
    assert!(status.contains("streaming"), "{status}");
    let status = b.ftctl_ok(&["repl", "status", "--json"]);
    assert!(status.contains("\"connected\":true"), "{status}");
}

#[test]
fn faults_during_a_workload_lose_nothing() {
    let p = Pair::new("repl-faults");
    std::fs::create_dir_all(&p.primary_dir).expect("mkdir");
    let stop = p._shared.path().join("stop");
    let mut b = p.start(1, false, "");
    let mut a = p.start(
        0,
        false,
        &shim_service(
            &p.primary_dir,
            &format!(
                "i=0; while [ ! -e {} ]; do echo \"line $i\" >> f$((i % 40)); \
                 if [ $((i % 500)) -eq 0 ]; then mkdir -p d$i && mv f$((i % 40)) d$i/; fi; \
                 i=$((i+1)); done; echo $i > marker; exec sleep 1000",
                q(&stop)
            ),
        ),
    );
    // kill -9 of the backup's watchd and a restart.
    std::thread::sleep(Duration::from_millis(300));
    b.kill9();
    std::thread::sleep(Duration::from_millis(300));
    b.restart();
    // A cut link for two seconds.
    p.lab.cut(1);
    std::thread::sleep(Duration::from_secs(2));
    p.lab.heal(1);
    // kill -9 of the primary's watchd (the writer keeps running and keeps logging to the ring).
    a.kill9();
    std::thread::sleep(Duration::from_millis(300));
    a.restart();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "").expect("stop the writer");
    let deadline = Instant::now() + CATCH_UP;
    while !p.primary_dir.join("marker").exists() {
        assert!(
            Instant::now() < deadline,
            "the workload did not finish\n{}",
            diagnostics(&a, &b)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        becomes_identical(&p.primary_dir, &p.replica_dir),
        "after the faults: the replica did not become identical to the primary\n{}",
        diagnostics(&a, &b)
    );
    let lines: u64 = std::fs::read_to_string(p.primary_dir.join("marker"))
        .expect("marker")
        .trim()
        .parse()
        .expect("count");
    // The faults really fell inside the workload.
    assert!(lines > 1000, "the writer only wrote {lines} lines");
}

#[test]
fn sync_mode_keeps_every_acknowledged_write_when_the_primary_dies() {
    let p = Pair::new("repl-sync");
    std::fs::create_dir_all(&p.primary_dir).expect("mkdir");
    let acked = p._shared.path().join("acked");
    let _b = p.start(1, true, "");
    let mut a = p.start(
        0,
        true,
        &shim_service(
            &p.primary_dir,
            &format!(
                // The acknowledged number is renamed into place: a kill between a truncating
                // `>` and its write would leave the file empty.
                "i=0; while :; do echo $i >> log; echo $i > {0}.tmp; mv {0}.tmp {0}; i=$((i+1)); done",
                q(&acked)
            ),
        ),
    );
    // Let it write a while, then kill the whole primary: watchd and the writer.
    let deadline = Instant::now() + CATCH_UP;
    while ftkit_tests::read_or_empty(&acked)
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
        < 200
    {
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let writer = ftkit_tests::pid_of(&a.service("writer")).expect("writer pid");
    a.kill9();
    ftkit_tests::signal(writer, nix::sys::signal::Signal::SIGKILL);
    ftkit_tests::wait_gone(writer, Duration::from_secs(5));
    let last: u64 = ftkit_tests::read_or_empty(&acked)
        .trim()
        .parse()
        .expect("a number was acknowledged");
    // Everything acknowledged to the writer reaches the replica (the backup's replay drains
    // its durable log).
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let text = ftkit_tests::read_or_empty(&p.replica_dir.join("log"));
        let have: Vec<u64> = text.lines().filter_map(|l| l.parse().ok()).collect();
        if have.len() as u64 > last {
            assert_eq!(
                have[..=usize::try_from(last).expect("small")],
                (0..=last).collect::<Vec<_>>()[..]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged through {last}, the replica has {} lines",
            have.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bad input on the backup's port: a peer with the wrong secret, raw garbage, and an
/// authenticated stream (a forged pump) whose operations try to leave the replica through a
/// symlink. Each is refused, nothing outside the replica is touched, and the real stream goes on.
#[test]
fn bad_input_is_refused_and_the_stream_recovers() {
    use std::io::Write as _;
    let p = Pair::new("repl-bad");
    std::fs::create_dir_all(&p.primary_dir).expect("mkdir");
    let outside = p._shared.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let b = p.start(1, false, "");
    let backup_addr = std::net::SocketAddr::from((p.lab.addr(1), PORT));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The test process joins node a's network namespace for its own connections.
    let ns = std::fs::File::open(format!("/run/netns/{}", p.lab.netns(0))).expect("netns");
    let ok = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            // Garbage bytes: refused by the handshake.
            let mut raw = std::net::TcpStream::connect(backup_addr).expect("connect");
            let _ = raw.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff garbage");
            drop(raw);
            rt.block_on(async {
                let secret = |s: &[u8]| cluster::net::Secret::new(s.to_vec()).expect("secret");
                let wrong =
                    cluster::net::NetConfig::new("t", "a", secret(b"not the right secret!!"))
                        .expect("cfg");
                let err = cluster::net::connect(&wrong, &[backup_addr], "repl/data")
                    .await
                    .expect_err("refused");
                assert!(
                    err.to_string().to_lowercase().contains("auth")
                        || err.to_string().contains("proof"),
                    "{err}"
                );
                // A forged pump that knows the secret: a symlink out of the replica, then a write
                // through it.
                let right =
                    cluster::net::NetConfig::new("t", "a", secret(b"correct horse battery staple"))
                        .expect("cfg");
                let mut conn = cluster::net::connect(&right, &[backup_addr], "repl/data")
                    .await
                    .expect("connect");
                use repl::proto::{Mode, ToBackup, ToPrimary};
                conn.send(&ToBackup::Hello {
                    fileset: "data".into(),
                    generation: 42,
                    epoch: 1,
                    mode: Mode::Async,
                })
                .await
                .expect("hello");
                let state: ToPrimary = conn.recv().await.expect("state");
                assert!(matches!(state, ToPrimary::State { .. }), "{state:?}");
                conn.send(&ToBackup::ResyncBegin { next_seq: 1 })
                    .await
                    .expect("begin");
                loop {
                    match conn.recv::<ToPrimary>().await.expect("manifest") {
                        ToPrimary::Manifest { last: true, .. } => break,
                        ToPrimary::Manifest { .. } => {}
                        other => panic!("{other:?}"),
                    }
                }
                let rp = |s: &str| repl::RelPath::new(s.as_bytes()).expect("valid");
                conn.send(&ToBackup::ResyncOps { ops: vec![] })
                    .await
                    .expect("ops");
                conn.send(&ToBackup::ResyncEnd { next_seq: 1 })
                    .await
                    .expect("end");
                let _ack: ToPrimary = conn.recv().await.expect("ack");
                let records = vec![
                    repl::OpRecord {
                        seq: 1,
                        op: repl::Op::Symlink {
                            target: outside.as_os_str().as_encoded_bytes().to_vec(),
                            path: rp("escape"),
                        },
                    },
                    repl::OpRecord {
                        seq: 2,
                        op: repl::Op::Write {
                            path: rp("escape/pwned"),
                            offset: 0,
                            data: b"x".to_vec(),
                        },
                    },
                    repl::OpRecord {
                        seq: 3,
                        op: repl::Op::Mkdir {
                            path: rp("escape/dir"),
                            mode: 0o755,
                        },
                    },
                ];
                conn.send(&ToBackup::Ops { records }).await.expect("ops");
                let ack: ToPrimary = conn.recv().await.expect("ack");
                assert_eq!(ack, ToPrimary::Ack { durable: 3 });
            });
            true
        })
        .join()
        .expect("the forged peer")
    });
    assert!(ok);
    // Replay refuses both escapes; nothing appears outside.
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let st = b.ftctl_ok(&["repl", "status", "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(st.lines().next().expect("a line")).expect("json");
        if v["bcplog"]["applied"].as_u64() == Some(3) {
            assert_eq!(v["bcplog"]["refused"].as_u64(), Some(2), "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replay did not get through the forged records: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read_dir(&outside).expect("read").count(),
        0,
        "something was written outside the replica"
    );
    // The real primary now streams (it resyncs the replica the forged pump left behind).
    let _a = p.start(
        0,
        false,
        &shim_service(&p.primary_dir, "echo hello > greeting; exec sleep 1000"),
    );
    let deadline = Instant::now() + CATCH_UP;
    while !p.primary_dir.join("greeting").exists() {
        assert!(Instant::now() < deadline, "the workload did not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_identical(&p.primary_dir, &p.replica_dir, "after the forged stream");
}

/// libft's file API (no shim) and stdio under the shim, from a C program run by watchd.
#[test]
fn a_c_program_through_libft_and_through_stdio_is_replicated() {
    let (_build, exe) = ftkit_tests::build_c_example("replwriter.c", "replwriter");
    let p = Pair::new("repl-c");
    let (api_dir, stdio_dir) = (p.primary_dir.join("api"), p.primary_dir.join("stdio"));
    std::fs::create_dir_all(&api_dir).expect("mkdir");
    std::fs::create_dir_all(&stdio_dir).expect("mkdir");
    let service = |name: &str, dir: &Path, args: &str, shim: bool| {
        format!(
            "[[service]]\nname = \"{name}\"\ncommand = {}\nargs = [{args}]\ncwd = {}\n\
             filesets = [\"data\"]\nrepl_shim = {shim}\nrestart = {{ policy = \"never\" }}\n",
            q(&exe),
            q(dir)
        )
    };
    let _b = p.start(1, false, "");
    let a = p.start(
        0,
        false,
        &format!(
            "{}\n{}",
            service("api", &api_dir, "\"1500\"", false),
            service("stdio", &stdio_dir, "\"--stdio\", \"1500\"", true)
        ),
    );
    for name in ["api", "stdio"] {
        let deadline = Instant::now() + CATCH_UP;
        while !a.service_log(name).contains("done 1500") {
            assert!(
                Instant::now() < deadline,
                "{name} did not finish: {}",
                a.service_log(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    wait_identical(&p.primary_dir, &p.replica_dir, "libft API and stdio");
    let journal = std::fs::read_to_string(p.replica_dir.join("api/journal.log")).expect("journal");
    assert_eq!(journal.lines().count(), 1500);
    assert_eq!(
        std::fs::read_to_string(p.replica_dir.join("stdio/snapshot")).expect("snapshot"),
        "1500 records\n"
    );
}

/// Copy mode: no interception at all; the primary's directory is watched and files are copied
/// once quiet. Changes made directly in the directory (by this test) reach the replica, renames
/// and removals included, also across a kill -9 of the primary's watchd.
#[test]
fn copy_mode_follows_a_watched_directory() {
    let p = Pair::new("repl-copy");
    std::fs::create_dir_all(p.primary_dir.join("pre")).expect("mkdir");
    std::fs::write(p.primary_dir.join("pre/existing"), b"before watchd").expect("write");
    let copy = "mode = \"copy\"\nquiet = \"50ms\"";
    let _b = p.start_with(1, copy, "");
    let mut a = p.start_with(0, copy, "");
    wait_identical(&p.primary_dir, &p.replica_dir, "the initial resync");
    for i in 0..200 {
        let dir = p.primary_dir.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join(format!("f{i}")),
            format!("file {i}\n").repeat(i + 1),
        )
        .expect("write");
    }
    std::fs::rename(p.primary_dir.join("d3"), p.primary_dir.join("renamed")).expect("rename");
    std::fs::remove_dir_all(p.primary_dir.join("d4")).expect("rm");
    wait_identical(&p.primary_dir, &p.replica_dir, "copy mode");
    a.kill9();
    std::fs::write(
        p.primary_dir.join("while-down"),
        b"written while watchd was dead",
    )
    .expect("write");
    a.restart();
    wait_identical(&p.primary_dir, &p.replica_dir, "after watchd was restarted");
}
