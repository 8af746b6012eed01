//! What group-managed filesets' role changes cost: three nodes (watchd's real replication
//! supervisors, each on its own runtime, on loopback) hold the filesets of N kv-like groups
//! (a sync replay-mode fileset with kv's log, a copy-mode fileset of its checkpoint directory),
//! and the groups go online on one node, move to another, and fail over when their owner's
//! supervisor is stopped, driven through the `fileset` and `checkpoint` resource agents the way
//! the group executor drives them (at most [`TURNS`] groups at once per node).
//!
//! Each phase prints the process's CPU (user + system, all three nodes) and wall time for the
//! role changes, and again until every backup streams the new primary's writes. The test
//! asserts that the replicas end up identical to the primary's files. By default it runs a few
//! groups; `FTKIT_ROLE_COST_GROUPS=50` measures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftkit_tests::replica::becomes_identical;
use ftkit_tests::{Scratch, free_port, q};
use ractor::{Actor, ActorRef};
use watchd::group::fileset::{FilesetResource, Replicated};
use watchd::repl::{FilesetReport, ReplArgs, ReplMsg, ReplSupervisor, Role};

const SECRET: &str = "correct horse battery staple";
/// Groups brought online (or offline) at once per node, as the group executor does.
const TURNS: usize = 8;
/// Groups by default (`FTKIT_ROLE_COST_GROUPS` overrides).
const DEFAULT_GROUPS: usize = 3;
/// Longest wait for every backup to stream after a phase.
const SETTLE: Duration = Duration::from_secs(120);
/// How often settling is checked.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// Bound of one role change.
const ROLE_CHANGE: Duration = Duration::from_secs(60);
/// kv's log and checkpoints, as the failover bench's groups hold them.
const LOG_BYTES: usize = 64 << 10;
const CHECKPOINT_BYTES: usize = 16 << 10;
const CHECKPOINTS: usize = 3;
const NAMES: [&str; 3] = ["a", "b", "c"];

fn data(g: usize) -> String {
    format!("d{g}")
}

fn ckpt(g: usize) -> String {
    format!("k{g}")
}

fn service(g: usize) -> String {
    format!("kv{g}")
}

/// One node: its replication supervisor on its own runtime.
struct Node {
    name: &'static str,
    rt: Option<tokio::runtime::Runtime>,
    repl: ActorRef<ReplMsg>,
    data_dir: PathBuf,
    files: PathBuf,
}

impl Node {
    fn start(index: usize, groups: usize, ports: &[u16; 3], secret: &Path, dir: &Path) -> Node {
        let name = NAMES[index];
        let root = dir.join(name);
        let data_dir = root.join("data");
        let files = root.join("files");
        let mut text = format!(
            "[watchd]\nnode = \"{name}\"\ndata_dir = {}\nring_dir = {}\n\n\
             [cluster]\nname = \"t\"\nsecret_file = {}\nlisten = [\"127.0.0.1:{}\"]\n\n",
            q(&data_dir),
            q(root.join("rings")),
            q(secret),
            ports[index],
        );
        for (i, other) in NAMES.iter().enumerate() {
            if i != index {
                text.push_str(&format!(
                    "[[node]]\nname = \"{other}\"\naddresses = [\"127.0.0.1:{}\"]\n\n",
                    ports[i]
                ));
            }
        }
        for g in 0..groups {
            text.push_str(&format!(
                "[[fileset]]\nname = \"{}\"\npath = {}\nprimary = \"group\"\n\
                 backups = [\"a\", \"b\", \"c\"]\nsync = true\nring_size = \"1MiB\"\n\n\
                 [[fileset]]\nname = \"{}\"\npath = {}\nprimary = \"group\"\n\
                 backups = [\"a\", \"b\", \"c\"]\nmode = \"copy\"\nquiet = \"20ms\"\n\n",
                data(g),
                q(files.join(service(g))),
                ckpt(g),
                q(data_dir.join("ckpt").join(service(g))),
            ));
        }
        let config = watchd::config::Config::parse(&root.join("watchd.toml"), &text)
            .expect("valid configuration");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let instance = ftkit_tests::unique(name);
        let repl = rt
            .block_on(rt.spawn(async move {
                let setup = watchd::repl::setup(&config, &instance)
                    .await
                    .expect("replication setup")
                    .expect("a cluster node");
                let events = Arc::new(watchd::events::Events::new(100));
                Actor::spawn(None, ReplSupervisor, ReplArgs { setup, events })
                    .await
                    .expect("the replication supervisor starts")
                    .0
            }))
            .expect("join");
        Node {
            name,
            rt: Some(rt),
            repl,
            data_dir,
            files,
        }
    }

    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let rt = self.rt.as_ref().expect("running");
        rt.block_on(rt.spawn(fut)).expect("join")
    }

    fn data_root(&self, g: usize) -> PathBuf {
        self.files.join(service(g))
    }

    fn ckpt_root(&self, g: usize) -> PathBuf {
        self.data_dir.join("ckpt").join(service(g))
    }

    /// The two resource agents of group `g` on this node.
    fn agents(&self, g: usize) -> [Arc<FilesetResource>; 2] {
        let agent = |fileset: String, what: Replicated| {
            let mut props = BTreeMap::new();
            props.insert("fileset".to_owned(), fileset);
            if matches!(what, Replicated::Checkpoints { .. }) {
                props.insert("service".to_owned(), service(g));
            }
            Arc::new(
                FilesetResource::with_supervisor(
                    &props,
                    what,
                    self.repl.clone(),
                    &self.data_dir,
                    self.name,
                )
                .expect("valid properties"),
            )
        };
        [
            agent(data(g), Replicated::Files),
            agent(ckpt(g), Replicated::Checkpoints { service: None }),
        ]
    }

    fn reports(&self) -> Vec<FilesetReport> {
        let repl = self.repl.clone();
        self.run(async move { ractor::call_t!(repl, ReplMsg::Status, 30_000) })
            .expect("the supervisor answers")
    }

    /// Stops the supervisor (its pumps and bcplogs with it), as when its host dies.
    fn stop(&mut self) {
        let repl = self.repl.clone();
        if let Some(rt) = self.rt.take() {
            let _ = rt.block_on(rt.spawn(async move {
                repl.stop_and_wait(None, Some(Duration::from_secs(20)))
                    .await
            }));
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU time of this process so far (user + system).
fn cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer, which points to a zeroed,
    // properly aligned rusage owned by this frame.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: getrusage succeeded, so it initialised the struct (which was zeroed anyway).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).expect("positive"))
            + Duration::from_micros(u64::try_from(t.tv_usec).expect("positive"))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What one phase cost.
#[derive(Debug, Default)]
struct Cost {
    /// Each role change's wall time.
    changes: Vec<Duration>,
    wall: Duration,
    cpu: Duration,
    settle_wall: Duration,
    settle_cpu: Duration,
}

fn percentile(v: &[Duration], p: usize) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[(v.len() - 1) * p / 100]
}

fn print(what: &str, groups: usize, c: &Cost) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let n = u32::try_from(groups.max(1)).expect("small");
    println!(
        "| {what:<28} | {:>6} | {:>7.0} | {:>7.0} | {:>7.0} | {:>8.0} | {:>7.1} | {:>8.0} | {:>9.1} |",
        c.changes.len(),
        ms(percentile(&c.changes, 50)),
        ms(percentile(&c.changes, 100)),
        ms(c.wall),
        ms(c.cpu),
        ms(c.cpu / n),
        ms(c.settle_wall),
        ms(c.settle_cpu / n),
    );
}

/// Runs `change` for every group, [`TURNS`] groups at a time, both filesets of a group at once
/// (they do not depend on each other), on `node`'s runtime; returns each change's wall time.
fn each_group(
    node: &Node,
    groups: usize,
    change: impl Fn(Arc<FilesetResource>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    + Send
    + Sync
    + 'static,
) -> Vec<Duration> {
    let agents: Vec<[Arc<FilesetResource>; 2]> = (0..groups).map(|g| node.agents(g)).collect();
    let change = Arc::new(change);
    node.run(async move {
        let turns = Arc::new(tokio::sync::Semaphore::new(TURNS));
        let mut tasks = Vec::new();
        for pair in agents {
            let (turns, change) = (turns.clone(), change.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = turns.acquire().await.expect("open");
                let both = pair.map(|r| {
                    let change = change.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        change(r).await;
                        t.elapsed()
                    })
                });
                let mut out = Vec::new();
                for t in both {
                    out.push(t.await.expect("role change"));
                }
                out
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.extend(t.await.expect("group"));
        }
        out
    })
}

fn online(node: &Node, groups: usize, epoch: u64) -> Vec<Duration> {
    let name = node.name;
    each_group(node, groups, move |r| {
        Box::pin(async move {
            tokio::time::timeout(ROLE_CHANGE, r.online(epoch))
                .await
                .expect("online in time")
                .unwrap_or_else(|e| panic!("{name} online({epoch}) of {}: {e}", r.fileset()));
        })
    })
}

fn offline(node: &Node, groups: usize) -> Vec<Duration> {
    let name = node.name;
    each_group(node, groups, move |r| {
        Box::pin(async move {
            tokio::time::timeout(ROLE_CHANGE, r.offline())
                .await
                .expect("offline in time")
                .unwrap_or_else(|e| panic!("{name} offline of {}: {e}", r.fileset()));
        })
    })
}

/// Waits until every pump of `primary` streams to every backup in `backups` with everything
/// acknowledged.
fn settle(primary: &Node, backups: &[&str]) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let reports = primary.reports();
        let pending: Vec<String> = reports
            .iter()
            .filter(|r| {
                r.role != Role::Primary
                    || r.pump.as_ref().is_none_or(|p| {
                        let newest = p.next_seq.saturating_sub(1);
                        backups.iter().any(|b| {
                            !p.backups.iter().any(|l| {
                                l.name == *b && l.state == "streaming" && l.acked >= newest
                            })
                        })
                    })
            })
            .map(|r| format!("{}: {:?}", r.name, r.pump.as_ref().map(|p| &p.backups)))
            .collect();
        if pending.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not settled on {}: {pending:?}",
            primary.name
        );
        std::thread::sleep(SETTLE_POLL);
    }
}

/// Measures `changes`, then (with a `primary`) until it settled.
fn measured(
    changes: impl FnOnce() -> Vec<Duration>,
    primary: Option<&Node>,
    backups: &[&str],
) -> Cost {
    let (t0, c0) = (Instant::now(), cpu());
    let changes = changes();
    let (t1, c1) = (Instant::now(), cpu());
    if let Some(primary) = primary {
        settle(primary, backups);
    }
    Cost {
        changes,
        wall: t1 - t0,
        cpu: c1 - c0,
        settle_wall: t1.elapsed(),
        settle_cpu: cpu() - c1,
    }
}

/// kv's files on the first owner before anything runs.
fn seed(node: &Node, groups: usize) {
    for g in 0..groups {
        let d = node.data_root(g);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("log"), vec![b'l'; LOG_BYTES]).expect("log");
        let k = node.ckpt_root(g);
        std::fs::create_dir_all(&k).expect("mkdir");
        for i in 0..CHECKPOINTS {
            std::fs::write(
                k.join(format!("{i:020}.ckpt")),
                vec![u8::try_from(i).expect("small"); CHECKPOINT_BYTES],
            )
            .expect("checkpoint");
        }
    }
}

fn assert_identical(primary: &Node, backup: &Node, groups: usize) {
    for g in 0..groups {
        for (x, y) in [
            (primary.data_root(g), backup.data_root(g)),
            (primary.ckpt_root(g), backup.ckpt_root(g)),
        ] {
            assert!(
                becomes_identical(&x, &y, Duration::from_secs(20)),
                "{} and {} differ",
                x.display(),
                y.display()
            );
        }
    }
}

#[test]
fn role_changes_of_many_groups() {
    let groups = std::env::var("FTKIT_ROLE_COST_GROUPS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(DEFAULT_GROUPS);
    let shared = Scratch::new("role-cost");
    let secret = shared.write("secret", &format!("{SECRET}\n"));
    let ports = [free_port(), free_port(), free_port()];
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(i, groups, &ports, &secret, shared.path()))
        .collect();
    seed(&nodes[0], groups);
    // Every fileset's bcplog runs on every node before anything is measured.
    for n in &nodes {
        let deadline = Instant::now() + SETTLE;
        while !n
            .reports()
            .iter()
            .all(|r| r.role == Role::Backup && r.bcplog.is_some())
        {
            assert!(Instant::now() < deadline, "{} did not start", n.name);
            std::thread::sleep(SETTLE_POLL);
        }
    }
    println!(
        "\n{groups} groups (2 filesets each) on 3 nodes, {TURNS} groups at once; CPU of all three nodes\n"
    );
    println!(
        "| phase                        | changes | p50 ms | max ms | wall ms | CPU ms | CPU/group | settle ms | settle CPU/group |"
    );
    println!(
        "|------------------------------|---------|--------|--------|---------|--------|-----------|-----------|------------------|"
    );
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let cost = measured(|| online(a, groups, 1), Some(a), &["b", "c"]);
    print("layout: online on a", groups, &cost);
    assert_identical(a, b, groups);
    assert_identical(a, c, groups);

    let cost = measured(|| offline(a, groups), None, &[]);
    print("move a→b: offline on a", groups, &cost);
    let cost = measured(|| online(b, groups, 2), Some(b), &["a", "c"]);
    print("move a→b: online on b", groups, &cost);
    assert_identical(b, a, groups);
    assert_identical(b, c, groups);

    // b's host dies: c takes the groups over, a is resynced from c.
    let (t0, c0) = (Instant::now(), cpu());
    nodes[1].stop();
    println!(
        "(b stopped: {:.0} ms, {:.0} ms CPU)",
        t0.elapsed().as_secs_f64() * 1000.0,
        (cpu() - c0).as_secs_f64() * 1000.0
    );
    let (a, c) = (&nodes[0], &nodes[2]);
    let cost = measured(|| online(c, groups, 3), Some(c), &["a"]);
    print("failover b→c: online on c", groups, &cost);
    assert_identical(c, a, groups);
}
