//! Group-managed filesets (`primary = "group"`) changing roles between two nodes in their own
//! network namespaces, driven the way the group executor drives them: through the `fileset` and
//! `checkpoint` resource agents (online with the ownership epoch, offline), and through
//! `ReplMsg::SetRole` where a test forces what a cut-off old owner would do. Each node is
//! watchd's real replication supervisor on a runtime whose threads live in the node's
//! namespace (the pump, bcplog and replay actors, the listeners and the rings are the
//! daemon's); the writers append to the rings the way libft does, through the `FT_REPL_FILESETS`
//! entry the node hands its services.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ft::replog::OpRef;
use ft::replog::fileset::Filesets;
use ftkit_tests::netns::Lab;
use ftkit_tests::replica::{becomes_identical, tree_hash};
use ftkit_tests::{Scratch, q};
use ractor::{Actor, ActorRef};
use watchd::group::Health;
use watchd::group::fileset::{FilesetResource, Replicated};
use watchd::repl::{ReplArgs, ReplMsg, ReplSupervisor, Role, RoleRequest, RoleState};

/// Longest wait for a replica to catch up: well inside nextest's minute.
const CATCH_UP: Duration = Duration::from_secs(20);
/// Bound of a role change in these tests (the executor uses the resource's online timeout).
const ROLE_CHANGE: Duration = Duration::from_secs(30);
const PORT: u16 = 7400;
const SECRET: &str = "correct horse battery staple";
/// The service whose checkpoint directory the `checkpoint` fileset is.
const SERVICE: &str = "kv";

/// One node: watchd's replication supervisor on a runtime inside the node's namespace.
struct Node {
    name: &'static str,
    /// Declared before `_scratch`, so stopped before its directories go.
    rt: Option<tokio::runtime::Runtime>,
    repl: ActorRef<ReplMsg>,
    /// Fileset name → its `FT_REPL_FILESETS` entry on this node.
    env: BTreeMap<String, String>,
    files: PathBuf,
    ckpt: PathBuf,
    data_dir: PathBuf,
    _scratch: Scratch,
}

impl Node {
    fn start(lab: &Lab, index: usize, secret: &Path) -> Node {
        let name = ["a", "b"][index];
        let scratch = Scratch::new(&format!("roles-{name}"));
        let data_dir = scratch.path().join("data");
        let files = scratch.path().join("files");
        let ckpt = data_dir.join("ckpt").join(SERVICE);
        let other = 1 - index;
        let text = format!(
            "[watchd]\nnode = \"{name}\"\ndata_dir = {}\nring_dir = {}\n\n\
             [cluster]\nname = \"t\"\nsecret_file = {}\nlisten = [\"{}:{PORT}\"]\n\n\
             [[node]]\nname = \"{}\"\naddresses = [\"{}:{PORT}\"]\n\n\
             [[fileset]]\nname = \"data\"\npath = {}\nprimary = \"group\"\nbackups = [\"a\", \"b\"]\n\n\
             [[fileset]]\nname = \"ckpt\"\npath = {}\nprimary = \"group\"\nbackups = [\"a\", \"b\"]\n\
             mode = \"copy\"\nquiet = \"20ms\"\n",
            q(&data_dir),
            q(scratch.path()),
            q(secret),
            lab.addr(index),
            ["a", "b"][other],
            lab.addr(other),
            q(&files),
            q(&ckpt),
        );
        let config = watchd::config::Config::parse(&scratch.path().join("watchd.toml"), &text)
            .expect("valid configuration");
        let rt = runtime_in(lab, index);
        let instance = ftkit_tests::unique(name);
        let (repl, env) = rt
            .block_on(rt.spawn(async move {
                let setup = watchd::repl::setup(&config, &instance)
                    .await
                    .expect("replication setup")
                    .expect("a cluster node");
                let env = setup.env.entries.clone();
                let events = std::sync::Arc::new(watchd::events::Events::new(100));
                let (repl, _) = Actor::spawn(None, ReplSupervisor, ReplArgs { setup, events })
                    .await
                    .expect("the replication supervisor starts");
                (repl, env)
            }))
            .expect("join");
        Node {
            name,
            rt: Some(rt),
            repl,
            env,
            files,
            ckpt,
            data_dir,
            _scratch: scratch,
        }
    }

    /// Runs `fut` on the node's runtime (so every socket it opens is in the node's namespace).
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let rt = self.rt.as_ref().expect("running");
        rt.block_on(rt.spawn(fut)).expect("join")
    }

    /// The agent of a `fileset` (or `checkpoint`) resource over `fileset` on this node.
    fn agent(&self, fileset: &str, what: Replicated) -> Agent {
        let mut props = BTreeMap::new();
        props.insert("fileset".to_owned(), fileset.to_owned());
        if matches!(what, Replicated::Checkpoints { .. }) {
            props.insert("service".to_owned(), SERVICE.to_owned());
        }
        let r = FilesetResource::with_supervisor(
            &props,
            what,
            self.repl.clone(),
            &self.data_dir,
            self.name,
        )
        .expect("valid properties");
        Agent {
            r: std::sync::Arc::new(r),
        }
    }

    fn set_role(&self, fileset: &str, role: RoleRequest) -> Result<RoleState, String> {
        let (repl, fileset) = (self.repl.clone(), fileset.to_owned());
        self.run(async move {
            ractor::call_t!(
                repl,
                |reply| ReplMsg::SetRole {
                    fileset,
                    role,
                    reply
                },
                u64::try_from(ROLE_CHANGE.as_millis()).expect("small")
            )
            .expect("the supervisor answers")
        })
    }

    fn role(&self, fileset: &str) -> RoleState {
        let (repl, fileset) = (self.repl.clone(), fileset.to_owned());
        self.run(async move {
            ractor::call_t!(repl, |reply| ReplMsg::Role { fileset, reply }, 10_000)
                .expect("the supervisor answers")
                .expect("a fileset of this node")
        })
    }

    fn report(&self, fileset: &str) -> String {
        let repl = self.repl.clone();
        let reports = self.run(async move { ractor::call_t!(repl, ReplMsg::Status, 10_000) });
        format!(
            "{}: {:?}",
            self.name,
            reports.map(|r| r
                .into_iter()
                .filter(|f| f.name == fileset)
                .collect::<Vec<_>>())
        )
    }

    /// A writer as a service of this node would have it (libft's view of `FT_REPL_FILESETS`).
    fn writer(&self) -> Writer {
        let entry = self
            .env
            .get("data")
            .expect("the data fileset is in the env");
        Writer {
            filesets: Filesets::parse(entry.as_bytes()).expect("a valid entry"),
            root: std::fs::canonicalize(&self.files).expect("root"),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let repl = self.repl.clone();
        if let Some(rt) = self.rt.take() {
            let _ = rt.block_on(rt.spawn(async move {
                repl.stop_and_wait(None, Some(Duration::from_secs(10)))
                    .await
            }));
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A multi-threaded runtime whose worker threads (and every thread they start) are in node
/// `index`'s network namespace.
fn runtime_in(lab: &Lab, index: usize) -> tokio::runtime::Runtime {
    let path = format!("/run/netns/{}", lab.netns(index));
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("netns");
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
    .join()
    .expect("the runtime thread")
}

/// A resource agent, callable from the test thread on a node's runtime.
struct Agent {
    r: std::sync::Arc<FilesetResource>,
}

impl Agent {
    fn online(&self, node: &Node, epoch: u64) {
        let r = self.r.clone();
        node.run(async move { r.online(epoch).await })
            .unwrap_or_else(|e| panic!("{} online({epoch}): {e}", node.name));
    }

    fn offline(&self, node: &Node) {
        let r = self.r.clone();
        node.run(async move { r.offline().await })
            .unwrap_or_else(|e| panic!("{} offline: {e}", node.name));
    }

    fn looks_alive(&self, node: &Node) -> Health {
        let r = self.r.clone();
        node.run(async move { r.looks_alive().await })
            .expect("looks-alive answers")
    }

    fn is_alive(&self, node: &Node) -> Health {
        let r = self.r.clone();
        node.run(async move { r.is_alive().await })
            .expect("is-alive answers")
    }
}

/// Writes files for real and logs the writes to the fileset's ring, as libft does.
struct Writer {
    filesets: Filesets,
    root: PathBuf,
}

impl Writer {
    /// Whether the write was logged (a ring of a running pump existed).
    fn write(&self, rel: &str, offset: u64, data: &[u8]) -> bool {
        let path = self.root.join(rel);
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
        self.filesets
            .append(
                0,
                OpRef::Write {
                    path: rel.as_bytes(),
                    offset,
                    data,
                },
            )
            .expect("append")
            .is_some()
    }
}

fn lab_and_nodes(label: &str) -> (Lab, Scratch, Node, Node) {
    let lab = Lab::new(2);
    let shared = Scratch::new(label);
    let secret = shared.write("secret", &format!("{SECRET}\n"));
    let a = Node::start(&lab, 0, &secret);
    let b = Node::start(&lab, 1, &secret);
    (lab, shared, a, b)
}

fn wait_identical(x: &Node, y: &Node, what: &str) {
    assert!(
        becomes_identical(&x.files, &y.files, CATCH_UP),
        "{what}: {} and {} did not become identical\n{}\n{}",
        x.name,
        y.name,
        x.report("data"),
        y.report("data")
    );
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + CATCH_UP;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn roles_move_with_the_epoch_and_an_old_owner_is_fenced() {
    let (lab, _shared, a, b) = lab_and_nodes("roles");
    // Every node of a group-managed fileset starts as a backup.
    for n in [&a, &b] {
        let r = n.role("data");
        assert_eq!((r.role, r.running), (Role::Backup, true), "{}", n.name);
    }
    let (fa, fb) = (
        a.agent("data", Replicated::Files),
        b.agent("data", Replicated::Files),
    );
    assert_eq!(fa.looks_alive(&a), Health::Offline);

    // Epoch 1: the group is online on a.
    fa.online(&a, 1);
    assert_eq!(fa.looks_alive(&a), Health::Online);
    let wa = a.writer();
    for i in 0..50u64 {
        assert!(wa.write(
            &format!("d{}/f{}", i % 3, i % 7),
            i * 8,
            format!("a{i:06}").as_bytes()
        ));
    }
    wait_identical(&a, &b, "epoch 1");
    assert_eq!(fa.is_alive(&a), Health::Online);

    // A graceful move to b (epoch 2): a offline (its last writes reach b first), b online (its
    // replica drained). b's files equal a's last files the moment b is the primary.
    assert!(wa.write("last-of-a", 0, b"written just before the move"));
    fa.offline(&a);
    assert_eq!(a.role("data").role, Role::Backup);
    fb.online(&b, 2);
    assert_eq!(
        tree_hash(&b.files),
        tree_hash(&a.files),
        "b became the primary without a's last writes"
    );
    // a's services have nothing to log into any more: its ring was retired.
    assert!(
        !wa.write("after-the-move", 0, b"x"),
        "a write on a was logged after a stopped being the primary"
    );
    // (b's pump may have resynced a already, which removed it: b has no such file.)
    if let Err(e) = std::fs::remove_file(a.files.join("after-the-move")) {
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "rm: {e}");
    }
    // b's services log into b's pump; a's replica follows b.
    let wb = b.writer();
    for i in 0..50u64 {
        assert!(wb.write(&format!("d{}/g{i}", i % 4), 0, format!("b{i}").as_bytes()));
    }
    wait_identical(&b, &a, "a follows b");
    assert_eq!(a.role("data").epoch, 0);
    assert_eq!(b.role("data").epoch, 2);

    // a, having followed epoch 2, refuses to become the primary of an older epoch.
    let err = a
        .set_role(
            "data",
            RoleRequest::Primary {
                epoch: 1,
                backups: None,
            },
        )
        .expect_err("a stale epoch");
    assert!(err.contains("stale epoch 1"), "{err}");

    // b is cut off; the group moves back to a at epoch 3 while b still believes it is the
    // primary of epoch 2 and keeps writing (a cut-off old owner).
    lab.cut(1);
    fa.online(&a, 3);
    // The group's services start on a after its fileset is online: they find a's new ring.
    let wa = a.writer();
    assert!(wa.write("from-a-epoch-3", 0, b"the new owner"));
    assert!(wb.write("from-b-stale", 0, b"the old owner, cut off"));
    assert!(wb.write("d0/g0", 0, b"OVERWRITTEN BY THE OLD OWNER"));
    lab.heal(1);
    // b's pump (epoch 2) reaches a, which refuses it; nothing of it reaches a's files, and b's
    // resource sees that it is fenced.
    wait_until(
        "b's pump was not refused by a",
        || matches!(fb.is_alive(&b), Health::Failed(why) if why.contains("refuses this pump")),
    );
    assert!(!a.files.join("from-b-stale").exists());
    assert_eq!(
        std::fs::read(a.files.join("d0/g0")).expect("read"),
        b"b0",
        "the old owner's write reached the new owner"
    );
    // The executor takes the stale owner offline: b becomes a backup and converges on a's files
    // (its own divergent writes are undone).
    fb.offline(&b);
    wait_identical(&a, &b, "b follows a after being fenced");
    assert!(!b.files.join("from-b-stale").exists());
    assert!(b.files.join("from-a-epoch-3").exists());
    assert_eq!(fa.is_alive(&a), Health::Online);

    // A pump of epoch 2 dialing b now (another stale pump of the old owner's epoch, from a's
    // address) is refused by b's bcplog, which follows epoch 3; its files never arrive.
    let stale_root = _shared.path().join("stale");
    std::fs::create_dir_all(&stale_root).expect("mkdir");
    std::fs::write(stale_root.join("junk"), b"from epoch 2").expect("write");
    let spec = repl::primary::PrimarySpec {
        fileset: "data".into(),
        root: stale_root,
        source: repl::primary::SourceSpec::Ring {
            path: _shared.path().join("stale-ring"),
            capacity: 1 << 20,
        },
        backups: vec![repl::primary::Peer {
            name: "b".into(),
            addrs: vec![std::net::SocketAddr::from((lab.addr(1), PORT))],
        }],
        epoch: 2,
        pump: repl::pump::PumpConfig::default(),
        net: cluster::net::NetConfig::new(
            "t",
            "a",
            cluster::net::Secret::new(SECRET.as_bytes().to_vec()).expect("secret"),
        )
        .expect("net"),
    };
    let stale = a.run(async move {
        Actor::spawn(None, repl::primary::PumpActor, spec)
            .await
            .expect("pump")
            .0
    });
    wait_until("the stale pump was not refused by b", || {
        let s = stale.clone();
        let st = a.run(async move { ractor::call_t!(s, repl::primary::PumpMsg::Status, 10_000) });
        st.is_ok_and(|st| {
            st.backups[0]
                .refused
                .as_ref()
                .is_some_and(|w| w.contains("stale epoch 2"))
        })
    });
    assert!(wa.write("after-the-stale-pump", 0, b"a goes on"));
    wait_identical(&a, &b, "a's stream after the stale pump");
    assert!(!b.files.join("junk").exists());
    stale.stop(None);
}

#[test]
fn the_checkpoint_resource_ships_each_committed_image_to_the_standby() {
    use ckpt::image::{ImageHeader, RegionDesc};
    use ckpt::store::{Store, StorePolicy};

    let (_lab, _shared, a, b) = lab_and_nodes("roles-ckpt");
    let what = || Replicated::Checkpoints { service: None };
    let (ca, cb) = (a.agent("ckpt", what()), b.agent("ckpt", what()));
    // A fileset over another directory than the service's checkpoints is refused.
    let mut props = BTreeMap::new();
    props.insert("fileset".to_owned(), "data".to_owned());
    props.insert("service".to_owned(), SERVICE.to_owned());
    let wrong = FilesetResource::with_supervisor(&props, what(), a.repl.clone(), &a.data_dir, "a")
        .expect("valid properties");
    let err = a
        .run(async move { wrong.online(1).await })
        .expect_err("replay-mode data fileset");
    assert!(err.to_string().contains("mode = \"copy\""), "{err}");

    ca.online(&a, 1);
    assert_eq!(ca.looks_alive(&a), Health::Online);
    let region_len = 256 * 1024u64;
    let commit = |seq: u64, fill: u8| {
        let store = Store::open(&a.ckpt, SERVICE, StorePolicy::default()).expect("store");
        let header = ImageHeader {
            app: SERVICE.into(),
            stream: 0,
            seq,
            parent: None,
            created_unix_ns: 1,
            page_size: 4096,
            regions: vec![RegionDesc {
                id: 0,
                base: 0x7000_0000,
                len: region_len,
            }],
        };
        let mut pending = store.begin(&header).expect("begin");
        let data = vec![fill; usize::try_from(region_len).expect("small")];
        pending.chunk(0, 0, &data).expect("chunk");
        pending.commit().expect("commit");
        Instant::now()
    };
    let recovered = |dir: &Path| -> Option<(u64, Vec<u8>)> {
        let store = Store::open(dir, SERVICE, StorePolicy::default()).ok()?;
        let mut bytes = Vec::new();
        let r = store
            .recover(&mut |_, _, _, data| bytes.extend_from_slice(data))
            .ok()??;
        Some((r.seq, bytes))
    };
    for (seq, fill) in [(1u64, 0xa1u8), (2, 0xb2)] {
        let committed = commit(seq, fill);
        // The standby's store verifies the shipped image (its whole chain) and recovers it.
        wait_until(&format!("image {seq} did not reach b"), || {
            recovered(&b.ckpt).is_some_and(|(s, bytes)| {
                s == seq && bytes.len() == 256 * 1024 && bytes.iter().all(|x| *x == fill)
            })
        });
        let took = committed.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "image {seq} took {took:?} to reach the standby"
        );
        let store = Store::open(&b.ckpt, SERVICE, StorePolicy::default()).expect("store");
        store.verify(seq).expect("the shipped image verifies");
    }
    // Failover of the checkpoint resource: b owns it at epoch 2, and its own images go to a.
    ca.offline(&a);
    cb.online(&b, 2);
    let store = Store::open(&b.ckpt, SERVICE, StorePolicy::default()).expect("store");
    let mut pending = store
        .begin(&ImageHeader {
            app: SERVICE.into(),
            stream: 0,
            seq: 3,
            parent: None,
            created_unix_ns: 2,
            page_size: 4096,
            regions: vec![RegionDesc {
                id: 0,
                base: 0x7000_0000,
                len: 4096,
            }],
        })
        .expect("begin");
    pending.chunk(0, 0, &[0xc3; 4096]).expect("chunk");
    pending.commit().expect("commit");
    wait_until("b's image did not reach a", || {
        recovered(&a.ckpt).is_some_and(|(s, _)| s == 3)
    });
    assert_eq!(cb.is_alive(&b), Health::Online);
}
