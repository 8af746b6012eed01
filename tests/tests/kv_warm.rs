//! Warm standby of `examples/kv` across hosts: three real watchd nodes, each in its own network
//! namespace, run kv as a resource group {`fileset` kv-data (sync mode), `checkpoint` of kv,
//! `service` kv with `standby = "warm"`, `ip`}, brought online in that order. Every node that
//! may own the group and does not run it keeps kv running with `FT_ROLE=standby`, following the
//! checkpoints the group's `checkpoint` resource ships into its checkpoint directory. The first
//! owner preloads a state (`kv --preload`) that only its checkpoint carries (the preload
//! bypasses the replicated log): each standby must have applied that checkpoint before the
//! fault, and the preloaded keys must answer after every promotion. A `kvclient write --acked`
//! runs throughout from a host on the network that is no node. Faults: kv crashes (restarted
//! locally as the primary, the standbys untouched), kv crashes beyond its restart budget, the
//! owner host dies, the owner is partitioned, and, in the README's two-node deployment with a
//! quorum disk (`examples/kv-cluster/`, kv made warm), the quorum-disk owner's host dies. After
//! each move the next owner must bring the group online by promoting its standby in place (the
//! kv pid there stays the standby's: no cold start; the journal records the promotion), the old
//! owner runs a standby again once it is back, every acknowledged write must be there
//! (`kvclient verify`), and the invariant checker ([`ftkit_tests::groups`]) must find no two
//! nodes that ran the group at once. The host-death tests print the measured owner-death →
//! answering time (the first `PONG primary` on the virtual address).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ftkit_tests::cluster::{Cluster, NAMES, SETTLE};
use ftkit_tests::kv_cluster;
use ftkit_tests::kv_lab::{KvLab, MOVE, lab_addr};
use ftkit_tests::{binary, pid_of, q, wait_until};
use nix::sys::signal::Signal;

/// kv's port (on every address of its node: a standby listens before the address is there).
const KV_PORT: u16 = 7710;
/// The last octet of the virtual address in the lab's network.
const VIP_HOST: u8 = 201;
/// The last octet of the client's address (on the bridge, outside every node).
const CLIENT_HOST: u8 = 251;
/// Acknowledged writes that must follow each fault.
const PROGRESS: usize = 20;
/// How long one PING of a standby may take.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one probe of the virtual address may take after the owner's death (short: the
/// probe tries again rather than wait for a retransmission).
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// The pause between two probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
/// kv's `--preload`: the state a fresh primary starts with (small: one checkpoint of it).
const PRELOAD: &str = "256K";
/// [`PRELOAD`] in bytes.
const PRELOAD_BYTES: usize = 256 << 10;
/// The size of each value `kv --preload` adds (examples/src/bin/kv/store.rs).
const PRELOAD_VALUE_BYTES: usize = 4000;
/// How long one request to kv may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// FNV-1a, as `kvproto::value_for` hashes a key.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// Every node's `[[fileset]]` and `[[service]]` tables; paths relative to the node's
/// configuration file (its data directory is `data/`).
fn kv_tables() -> String {
    format!(
        r#"
[[fileset]]
name = "kv-data"
path = "data/kv-data"
primary = "group"
backups = ["a", "b", "c"]
sync = true

[[fileset]]
name = "kv-ckpt"
path = "data/ckpt/kv"
primary = "group"
backups = ["a", "b", "c"]
mode = "copy"
quiet = "20ms"

[[service]]
name = "kv"
command = {kv}
args = ["--listen", "0.0.0.0:{KV_PORT}", "--data", "data/kv-data", "--checkpoint", "per-request", "--preload", "{PRELOAD}"]
cwd = "."
autostart = false
filesets = ["kv-data"]
ready = {{ notify = true, timeout = "20s" }}
hang = {{ heartbeat = true }}
restart = {{ policy = "always", max_restarts = 2, window = "60s" }}
checkpoint = {{ keep = 3 }}

[service.stop]
grace = "1s"
"#,
        kv = q(binary("kv")),
    )
}

/// The group: data and checkpoints (independent: they come online at once), kv (warm), then
/// the address (clients reach kv only once it serves).
fn kv_group(vip: &str) -> String {
    format!(
        r#"
[[group]]
name = "kv"
preferred_owners = ["a", "b", "c"]
failback = "never"

[[group.resource]]
name = "kv-data"
kind = "fileset"
properties = {{ fileset = "kv-data" }}
timeouts = {{ online = "20s", offline = "2s", looks_alive = "300ms", is_alive = "1s" }}

[[group.resource]]
name = "kv-ckpt"
kind = "checkpoint"
properties = {{ fileset = "kv-ckpt", service = "kv" }}
timeouts = {{ online = "20s", offline = "1s", looks_alive = "300ms", is_alive = "1s" }}

[[group.resource]]
name = "kv"
kind = "service"
depends_on = ["kv-data", "kv-ckpt"]
properties = {{ service = "kv", standby = "warm" }}
timeouts = {{ online = "25s", offline = "2s", looks_alive = "300ms", is_alive = "1s" }}

[[group.resource]]
name = "kv-ip"
kind = "ip"
depends_on = ["kv"]
properties = {{ address = "{vip}/24", interface = "eth0" }}
timeouts = {{ online = "5s", offline = "1s", looks_alive = "300ms", is_alive = "1s" }}
"#
    )
}

/// kv's port in the README's files (`examples/kv-cluster/`).
const README_KV_PORT: u16 = 7700;
/// The README's `service` resource's properties (a cold standby)...
const README_SERVICE_PROPERTIES: &str = r#"properties = { service = "kv" }"#;
/// ...and the same resource as a warm standby.
const WARM_SERVICE_PROPERTIES: &str = r#"properties = { service = "kv", standby = "warm" }"#;
/// How often a crash of kv is repeated at most to exhaust its restart budget
/// (`max_restarts = 2`: the third crash within the window is beyond it).
const MAX_CRASHES: usize = 6;

/// The order the group's resources come online in (the first two in either order).
const ONLINE_ORDER: [&str; 4] = ["kv-ckpt", "kv-data", "kv", "kv-ip"];

/// The kv lab of these tests, with the warm standby's own checks.
struct Kv(KvLab);

impl std::ops::Deref for Kv {
    type Target = KvLab;
    fn deref(&self) -> &KvLab {
        &self.0
    }
}

impl std::ops::DerefMut for Kv {
    fn deref_mut(&mut self) -> &mut KvLab {
        &mut self.0
    }
}

impl Kv {
    /// Three nodes with the kv tables, the group applied.
    fn new(label: &str) -> Kv {
        let mut c = Cluster::new(label, 3, 1, false);
        let vip = lab_addr(&c.lab, VIP_HOST);
        c.extra = kv_tables();
        let rings = c.shared.file("rings");
        c.settings = format!("ring_dir = {}", q(&rings));
        c.start_all();
        let group = kv_group(&vip);
        Kv(KvLab::running(c, vip, KV_PORT, CLIENT_HOST, &group))
    }

    /// The two nodes of the README's deployment (`examples/kv-cluster/`, with the lab's
    /// addresses and the test's paths) with one change: kv is a warm standby. Its `service`
    /// resource says `standby = "warm"`, and kv listens on every address of its node at
    /// [`KV_PORT`], so that the test can ask each standby on its node's own address (the
    /// README's kv listens on the virtual address only, which it binds with `IP_FREEBIND`
    /// before its node holds the address).
    fn readme(label: &str) -> Kv {
        let mut c = Cluster::new(label, 2, 1, false);
        let vip = lab_addr(&c.lab, VIP_HOST);
        let readme_listen = format!("\"{vip}:{README_KV_PORT}\"");
        let listen = format!("\"0.0.0.0:{KV_PORT}\"");
        kv_cluster::start_nodes(&mut c, label, &vip, |text| {
            kv_cluster::replaced(text, &readme_listen, &listen)
        });
        let group = kv_cluster::replaced(
            &kv_cluster::group(&vip, &NAMES[..2]),
            README_SERVICE_PROPERTIES,
            WARM_SERVICE_PROPERTIES,
        );
        Kv(KvLab::running(c, vip, KV_PORT, CLIENT_HOST, &group))
    }

    /// The resources node `i`'s run at `epoch` brought to `state`, in order (the two
    /// independent filesets sorted).
    fn resource_order(&self, i: usize, epoch: u64, state: &str) -> Vec<String> {
        let mut order = self.0.resource_order(i, epoch, state);
        let first = order.len().min(2);
        order[..first].sort();
        order
    }

    /// Waits until node `i` runs kv as a warm standby (started with `FT_ROLE=standby`, answering
    /// `PONG standby` on the node's own address); returns its pid.
    fn wait_standby(&self, i: usize) -> u32 {
        let addr: SocketAddr = format!("{}:{KV_PORT}", self.c.lab.addr(i))
            .parse()
            .expect("socket address");
        let ns = self.client_ns();
        wait_until(&format!("a warm standby on {}", NAMES[i]), MOVE, || {
            let pid = ftkit_tests::pid_of(
                &self
                    .c
                    .node(i)
                    .status()
                    .into_iter()
                    .find(|s| s["name"] == "kv" && s["state"] == "running")?,
            )?;
            (started_as(pid, "standby") && ping(&ns, addr).as_deref() == Some("PONG standby"))
                .then_some(pid)
        })
    }

    /// Waits until the owner `owner` streams both filesets to node `backup`.
    fn wait_in_sync(&self, owner: usize, backup: usize) {
        kv_cluster::wait_in_sync(&self.c, owner, backup, &["kv-data", "kv-ckpt"], MOVE);
    }

    /// The owner host `owner` dies; returns the time until kv answered `PONG primary` on the
    /// virtual address. The probe connects with a short timeout and tries again at once: a
    /// SYN lost to the dead host must not add TCP's one-second retransmission to the figure.
    fn kill_owner_and_time(&mut self, owner: usize) -> Duration {
        let addr: SocketAddr = format!("{}:{KV_PORT}", self.vip)
            .parse()
            .expect("socket address");
        let ns = self.client_ns();
        let t0 = Instant::now();
        self.kill_host(owner);
        let answered = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).expect("the client's namespace");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            while t0.elapsed() < MOVE {
                if ask(addr, PROBE_TIMEOUT).as_deref() == Some("PONG primary") {
                    return Some(t0.elapsed());
                }
                std::thread::sleep(PROBE_INTERVAL);
            }
            None
        })
        .join()
        .expect("the probe thread");
        answered.unwrap_or_else(|| {
            panic!(
                "kv did not answer as primary within {MOVE:?}\njournals:\n{}",
                self.journals_text()
            )
        })
    }

    /// Node `i`'s journal records of `epoch` as milliseconds after the last host death, for a
    /// person reading where a failover's time went.
    fn timeline(&self, i: usize, epoch: u64) -> String {
        let died = self.deaths.last().map_or(0, |d| d.1);
        self.journal(i)
            .iter()
            .filter(|r| r["group"] == "kv" && r["epoch"] == epoch)
            .map(|r| {
                let at = r["time_ms"].as_u64().unwrap_or(0);
                format!(
                    "  +{:>5} ms {} {} {} {}",
                    i128::from(at) - i128::from(died),
                    r["kind"].as_str().unwrap_or(""),
                    r["resource"].as_str().unwrap_or(""),
                    r["state"].as_str().unwrap_or(""),
                    r["detail"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The lines kv process `pid` wrote to node `i`'s service log (the log outlives a host's
    /// reboot, and with it the lines of earlier processes).
    fn kv_lines(&self, i: usize, pid: u32) -> Vec<String> {
        let mine = format!("kv[{pid}]: ");
        self.c
            .node(i)
            .service_log("kv")
            .lines()
            .filter_map(|l| l.strip_prefix(&mine).map(str::to_owned))
            .collect()
    }

    /// Waits until the standby `pid` on node `i` has applied a shipped checkpoint that holds
    /// the preloaded table and nothing else (its line `applied checkpoint S: seq 0 count N`:
    /// no write was logged before it, and N entries are the preload's).
    fn wait_applied_preload(&self, i: usize, pid: u32) {
        let want = format!(": seq 0 count {}", preloaded_entries());
        wait_until(
            &format!(
                "the standby on {} applying the preloaded checkpoint",
                NAMES[i]
            ),
            MOVE,
            || {
                self.kv_lines(i, pid)
                    .iter()
                    .any(|l| l.starts_with("applied checkpoint ") && l.ends_with(&want))
                    .then_some(())
            },
        );
    }

    /// One request to kv on the virtual address, from the client's host: its answer line.
    fn request(&self, line: &str) -> Option<String> {
        let addr: SocketAddr = format!("{}:{KV_PORT}", self.vip)
            .parse()
            .expect("socket address");
        in_ns(&self.client_ns(), addr, line, REQUEST_TIMEOUT)
    }

    /// The first and the last preloaded key answer with their values through the virtual
    /// address.
    fn assert_preloaded(&self, when: &str) {
        for n in [0, preloaded_entries() - 1] {
            let key = format!("pre-{n}");
            let reply = self.request(&format!("GET {key}"));
            assert_eq!(
                reply,
                Some(format!("VALUE {}", preloaded_value(&key))),
                "{when}: GET {key}\njournals:\n{}",
                self.journals_text()
            );
        }
    }

    /// kill -9 of kv on the owner `owner` (running as the primary at `epoch`, pid `pid`) until
    /// its supervisor gives up and the group leaves `owner`; `crashes` counts the crashes so
    /// far (earlier ones in the window count against the budget). Each restart in between is
    /// the primary again, on the same node at the same epoch.
    fn crash_beyond_budget(&self, owner: usize, epoch: u64, mut pid: u32, mut crashes: usize) {
        loop {
            ftkit_tests::signal(pid, Signal::SIGKILL);
            crashes += 1;
            let restarted = wait_until("kv restarted or given up", MOVE, || {
                let s = self.group(owner);
                if s["owner"] != NAMES[owner] || s["epoch"].as_u64() != Some(epoch) {
                    return Some(None);
                }
                let kv = self.c.node(owner).service("kv");
                match pid_of(&kv) {
                    // A standby started here after the run stopped is no restart: the group
                    // is about to leave (its ownership is not updated yet).
                    Some(p) if p != pid && kv["state"] == "running" => {
                        started_as(p, "primary").then_some(Some(p))
                    }
                    _ => None,
                }
            });
            match restarted {
                Some(p) if crashes < MAX_CRASHES => pid = p,
                Some(_) => panic!("kv was restarted after {crashes} crashes (budget: 2)"),
                None => return,
            }
        }
    }

    /// Waits until node `i`'s run of the group at `epoch` has ended (its journal says the group
    /// is offline or fenced at that epoch, kv among the resources it took offline) and the
    /// virtual address is gone from it.
    fn wait_run_ended(&self, i: usize, epoch: u64) {
        wait_until(
            &format!("{} ended its run at epoch {epoch}", NAMES[i]),
            SETTLE,
            || {
                let ended = self.journal(i).iter().any(|r| {
                    r["kind"] == "group"
                        && r["group"] == "kv"
                        && r["epoch"] == epoch
                        && (r["state"] == "offline" || r["state"] == "fenced")
                });
                (ended
                    && !self.has_vip(i)
                    && self
                        .resource_order(i, epoch, "offline")
                        .contains(&"kv".to_owned()))
                .then_some(())
            },
        );
    }

    /// Whether the journal of node `i` shows the promotion of its standby at `epoch`.
    fn promoted(&self, i: usize, epoch: u64) -> bool {
        self.journal(i).iter().any(|r| {
            r["kind"] == "standby"
                && r["group"] == "kv"
                && r["epoch"] == epoch
                && r["state"] == "promoted"
        })
    }
}

/// Whether process `pid` was started with `FT_ROLE=role` (false when it is gone).
fn started_as(pid: u32, role: &str) -> bool {
    let want = format!("FT_ROLE={role}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
}

/// `PING` kv at `addr` from the network namespace at `ns`: its answer line.
fn ping(ns: &str, addr: SocketAddr) -> Option<String> {
    in_ns(ns, addr, "PING", PING_TIMEOUT)
}

/// One request to kv at `addr` from the network namespace at `ns`: its answer line.
fn in_ns(ns: &str, addr: SocketAddr, request: &str, timeout: Duration) -> Option<String> {
    let ns = ns.to_owned();
    let request = request.to_owned();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).ok()?;
        // Only this thread enters the namespace; it ends after the call.
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        ask_line(addr, &request, timeout)
    })
    .join()
    .ok()
    .flatten()
}

/// `PING` kv at `addr` from this thread's namespace, each step within `timeout`.
fn ask(addr: SocketAddr, timeout: Duration) -> Option<String> {
    ask_line(addr, "PING", timeout)
}

/// One request to kv at `addr` from this thread's namespace, each step within `timeout`.
fn ask_line(addr: SocketAddr, request: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(format!("{request}\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line.trim_end().to_owned())
}

/// How many entries `kv --preload PRELOAD` adds: keys `pre-N` with values of
/// [`PRELOAD_VALUE_BYTES`], until keys and values reach [`PRELOAD_BYTES`].
fn preloaded_entries() -> u64 {
    let (mut total, mut n) = (0, 0);
    while total < PRELOAD_BYTES {
        total += format!("pre-{n}").len() + PRELOAD_VALUE_BYTES;
        n += 1;
    }
    n
}

/// The value `kv --preload` gives `key`: `kvproto::value_for(key)` padded with `-ppp…` to
/// [`PRELOAD_VALUE_BYTES`].
fn preloaded_value(key: &str) -> String {
    let hash = key.bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    let mut value = format!("v-{key}-{hash:016x}");
    let pad = PRELOAD_VALUE_BYTES.saturating_sub(value.len());
    value.push('-');
    value.extend(std::iter::repeat_n('p', pad.saturating_sub(1)));
    value
}

/// The owner host dies twice (a, then b after a came back as a standby): each time the next
/// owner promotes its warm standby in place, no acknowledged write is lost, and no two nodes
/// ever ran the group at once.
#[test]
fn the_owner_host_dies_and_the_next_owner_promotes_its_warm_standby() {
    let mut t = Kv::new("kvw");
    let e1 = t.wait_online(1, 0, 0);
    assert_eq!(t.resource_order(0, e1, "online"), ONLINE_ORDER);
    t.wait_up();
    // a's kv (a standby promoted before any state existed, or a primary started fresh)
    // preloaded its table and checkpointed it.
    let kv_a = t.kv_pid(0);
    let said = format!("preloaded {} entries", preloaded_entries());
    assert!(
        t.kv_lines(0, kv_a).iter().any(|l| l.starts_with(&said)),
        "a's kv did not preload: {:?}",
        t.kv_lines(0, kv_a)
    );
    t.assert_preloaded("on a");
    // Every other possible owner keeps a warm standby, which applies the preloaded checkpoint
    // shipped to it before any write is logged.
    let standby_b = t.wait_standby(1);
    let standby_c = t.wait_standby(2);
    t.wait_applied_preload(1, standby_b);
    t.wait_applied_preload(2, standby_c);
    t.start_writer();
    t.wait_progress(PROGRESS);

    // a dies: b (next preferred) promotes its standby.
    let took_ab = t.kill_owner_and_time(0);
    let e2 = t.wait_online(1, 1, e1);
    println!(
        "warm failover a -> b: owner death -> kv answering on the new owner: {} ms",
        took_ab.as_millis()
    );
    println!("{}", t.timeline(1, e2));
    assert_eq!(
        t.kv_pid(1),
        standby_b,
        "b's kv is not its standby: a cold start\njournals:\n{}",
        t.journals_text()
    );
    assert!(t.promoted(1, e2), "no promotion event on b");
    assert_eq!(t.resource_order(1, e2, "online"), ONLINE_ORDER);
    // The preloaded state is in no log: b serves it from the checkpoints it applied, and
    // never preloaded a table of its own.
    t.assert_preloaded("on b after a's death");
    let lines_b = t.kv_lines(1, standby_b);
    assert!(
        !lines_b.iter().any(|l| l.starts_with("preloaded")),
        "b's kv preloaded a table of its own: {lines_b:?}"
    );
    // c's standby stays as it was.
    assert_eq!(t.wait_standby(2), standby_c);
    t.wait_progress(PROGRESS);
    t.verify();

    // a comes back: a standby again, the group stays on b (failback never).
    t.boot_host(0);
    t.c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    let standby_a = t.wait_standby(0);
    t.wait_progress(PROGRESS);
    t.wait_in_sync(1, 0);

    // b dies: a (most preferred member) promotes its standby.
    let took_ba = t.kill_owner_and_time(1);
    let e3 = t.wait_online(0, 0, e2);
    println!(
        "warm failover b -> a: owner death -> kv answering on the new owner: {} ms",
        took_ba.as_millis()
    );
    println!("{}", t.timeline(0, e3));
    assert_eq!(t.kv_pid(0), standby_a, "a's kv is not its standby");
    assert!(t.promoted(0, e3), "no promotion event on a");
    t.assert_preloaded("on a after b's death");
    let lines_a = t.kv_lines(0, standby_a);
    assert!(
        !lines_a.iter().any(|l| l.starts_with("preloaded")),
        "a's rebooted kv preloaded a table of its own: {lines_a:?}"
    );
    t.wait_progress(PROGRESS);
    let n = t.finish();
    assert!(n >= 3 * PROGRESS, "only {n} acknowledged writes");
    t.check_invariants(3);
}

/// The next owner's standby hangs (SIGSTOP) just before the owner host dies: it cannot take
/// the promotion. Whichever comes first decides how b recovers: watchd's hang detection
/// restarts the stopped instance (before the promotion: a new standby is promoted; during it:
/// the promotion failed, a cold start follows), or the promotion fails after 5 s without
/// READY and the instance is restarted as the primary. Either way kv serves on b with every
/// acknowledged write, and the group's address never comes up in front of a standby (the
/// writer's writes would get `ERR standby` until its deadline).
#[test]
fn a_hung_standby_does_not_keep_the_group_from_serving() {
    let mut t = Kv::new("kvhung");
    let e1 = t.wait_online(1, 0, 0);
    t.wait_up();
    let standby_b = t.wait_standby(1);
    t.wait_applied_preload(1, standby_b);
    t.start_writer();
    t.wait_progress(PROGRESS);
    t.wait_in_sync(0, 1);

    let pid = nix::unistd::Pid::from_raw(i32::try_from(standby_b).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP b's standby");
    let took = t.kill_owner_and_time(0);
    let e2 = t.wait_online(1, 1, e1);
    println!(
        "a hung standby on b, a dies: kv answering on b after {} ms",
        took.as_millis()
    );
    println!("{}", t.timeline(1, e2));
    let serving = t.kv_pid(1);
    assert_ne!(
        serving, standby_b,
        "the stopped standby cannot serve, yet it is b's kv"
    );
    assert!(
        started_as(serving, "primary") || t.promoted(1, e2),
        "b's kv {serving} neither started as the primary nor was promoted\njournals:\n{}",
        t.journals_text()
    );
    t.wait_progress(PROGRESS);
    // The writer treats `ERR standby` as a failed write: none was acknowledged by a standby,
    // and verify found every acknowledged one.
    let n = t.finish();
    assert!(n >= 2 * PROGRESS, "only {n} acknowledged writes");
    t.check_invariants(2);
}

/// kv crashes on the owner: its supervisor restarts it there as the primary (same owner, same
/// epoch) and the standbys stay as they are; then it crashes beyond its restart budget: the
/// group moves to the next owner, which promotes its standby in place, and the old owner runs a
/// standby again (it may own the group: it is a preferred owner). No acknowledged write is lost
/// and no two nodes ever ran the group at once.
#[test]
fn kv_crashes_restart_locally_then_beyond_the_budget_the_next_owner_promotes_its_standby() {
    let mut t = Kv::new("kvw-crash");
    let e1 = t.wait_online(1, 0, 0);
    t.wait_up();
    let standby_b = t.wait_standby(1);
    let standby_c = t.wait_standby(2);
    t.wait_applied_preload(1, standby_b);
    t.wait_applied_preload(2, standby_c);
    t.start_writer();
    t.wait_progress(PROGRESS);

    // One crash: restarted locally as the primary, from its checkpoint and log.
    let first = t.kv_pid(0);
    ftkit_tests::signal(first, Signal::SIGKILL);
    let second = t.c.node(0).wait_new_pid("kv", first, MOVE);
    assert!(
        started_as(second, "primary"),
        "a's restarted kv is not the primary"
    );
    t.wait_progress(PROGRESS);
    let s = t.group(1);
    assert_eq!(
        (
            s["owner"].as_str(),
            s["epoch"].as_u64(),
            s["state"].as_str()
        ),
        (Some("a"), Some(e1), Some("online")),
        "{s:#}"
    );
    assert!(t.has_vip(0) && !t.has_vip(1) && !t.has_vip(2));
    let lines = t.kv_lines(0, second);
    assert!(
        lines.iter().any(|l| l.starts_with("recovered seq")),
        "a's restarted kv did not recover: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("preloaded")),
        "a's restarted kv preloaded a fresh table: {lines:?}"
    );
    assert_eq!(t.wait_standby(1), standby_b, "b's standby was restarted");
    assert_eq!(t.wait_standby(2), standby_c, "c's standby was restarted");
    assert!(
        !t.journal(0).iter().any(|r| r["kind"] == "group"
            && r["group"] == "kv"
            && r["epoch"] == e1
            && r["state"] != "onlining"
            && r["state"] != "online"),
        "the local restart touched a's run of the group"
    );
    t.assert_preloaded("on a after a local restart");
    t.verify();

    // Crashes beyond the budget: the group moves to b, which promotes its standby.
    t.crash_beyond_budget(0, e1, second, 1);
    let e2 = t.wait_online(0, 1, e1);
    assert_eq!(
        t.kv_pid(1),
        standby_b,
        "b's kv is not its standby: a cold start\njournals:\n{}",
        t.journals_text()
    );
    assert!(
        t.promoted(1, e2),
        "no promotion event on b\njournals:\n{}",
        t.journals_text()
    );
    assert_eq!(t.resource_order(1, e2, "online"), ONLINE_ORDER);
    assert!(t.has_vip(1) && !t.has_vip(0));
    assert_eq!(t.group(2)["failovers_in_period"], 1);
    t.wait_up();
    t.assert_preloaded("on b after a's kv failed");
    t.wait_progress(PROGRESS);
    t.verify();

    // a runs a standby again; c's never moved.
    t.wait_standby(0);
    assert_eq!(t.wait_standby(2), standby_c, "c's standby was restarted");
    let s = t.group(0);
    assert_eq!(
        (s["owner"].as_str(), s["epoch"].as_u64()),
        (Some("b"), Some(e2)),
        "{s:#}"
    );
    t.wait_progress(PROGRESS);
    let n = t.finish();
    assert!(n >= 4 * PROGRESS, "only {n} acknowledged writes");
    t.check_invariants(2);
}

/// The owner is cut off from the others (and from the client): it stops acting and kills kv
/// by force; the majority brings the group online on the next owner, which promotes its
/// standby. When the partition heals, the old owner runs a standby again and the group stays
/// where it is (failback never).
#[test]
fn the_owner_is_partitioned_and_the_next_owner_promotes_its_standby() {
    let mut t = Kv::new("kvw-cut");
    let e1 = t.wait_online(1, 0, 0);
    t.wait_up();
    let standby_b = t.wait_standby(1);
    let standby_c = t.wait_standby(2);
    t.wait_applied_preload(1, standby_b);
    t.wait_applied_preload(2, standby_c);
    t.start_writer();
    t.wait_progress(PROGRESS);
    let kv_a = t.kv_pid(0);

    t.c.lab.cut(0);
    let e2 = t.wait_online(1, 1, e1);
    t.wait_up();
    assert_eq!(
        t.kv_pid(1),
        standby_b,
        "b's kv is not its standby: a cold start\njournals:\n{}",
        t.journals_text()
    );
    assert!(
        t.promoted(1, e2),
        "no promotion event on b\njournals:\n{}",
        t.journals_text()
    );
    assert!(t.has_vip(1));
    t.assert_preloaded("on b after a's partition");
    t.wait_progress(PROGRESS);
    t.verify();
    // Cut off, a stopped acting: kv killed, the address deleted, the run ended.
    t.wait_run_ended(0, e1);
    assert!(
        t.journal(0).iter().any(|r| r["kind"] == "group"
            && r["epoch"] == e1
            && r["state"] == "offlining"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("by force"))),
        "a's stop was not forced\njournals:\n{}",
        t.journals_text()
    );
    wait_until("a's kv killed", SETTLE, || {
        (!ftkit_tests::pid_alive(kv_a)).then_some(())
    });
    assert_eq!(t.wait_standby(2), standby_c, "c's standby was restarted");

    // The partition heals: a runs a standby again, the group stays on b.
    t.c.lab.heal(0);
    t.c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    t.wait_standby(0);
    t.wait_progress(PROGRESS);
    let s = t.group(0);
    assert_eq!(
        (s["owner"].as_str(), s["epoch"].as_u64()),
        (Some("b"), Some(e2)),
        "{s:#}"
    );
    assert!(!t.has_vip(0));
    let n = t.finish();
    assert!(n >= 3 * PROGRESS, "only {n} acknowledged writes");
    t.check_invariants(2);
}

/// The README's two-node deployment with a quorum disk, kv a warm standby ([`Kv::readme`]).
/// The standby host b dies: a wins the disk's vote and keeps the group; b boots again, catches
/// up and runs a standby again. Then a, the owner of the group and of the disk, dies: b takes
/// the disk over, forms the cluster alone and promotes its standby, with every acknowledged
/// write.
#[test]
fn the_readme_two_node_deployment_with_warm_standby_survives_the_loss_of_the_quorum_disk_owner() {
    let mut t = Kv::readme("kvw-readme");
    let s = t.c.status(0);
    assert_eq!(s["quorum"]["kind"], "disk", "{s:#}");
    let e1 = t.wait_online(1, 0, 0);
    t.wait_up();
    t.wait_standby(1);
    t.start_writer();
    t.wait_progress(PROGRESS);

    // The standby host dies: a keeps the group, with the disk's vote.
    t.kill_host(1);
    t.c.wait_view(&[0], &[0]);
    t.wait_progress(PROGRESS);
    let g = t.group(0);
    assert_eq!(
        (g["owner"].as_str(), g["epoch"].as_u64()),
        (Some("a"), Some(e1)),
        "{g:#}"
    );
    t.boot_host(1);
    t.c.wait_view(&[0, 1], &[0, 1]);
    let standby_b = t.wait_standby(1);
    t.wait_progress(PROGRESS);
    t.wait_in_sync(0, 1);
    t.verify();

    // The owner of the group and of the disk dies.
    let s = t.c.status(0);
    assert_eq!(s["quorum"]["disk_owner"], "a", "{s:#}");
    let took = t.kill_owner_and_time(0);
    t.c.wait_view(&[1], &[1]);
    let s = t.c.status(1);
    assert_eq!(s["quorum"]["disk_owner"], "b", "{s:#}");
    let e2 = t.wait_online(1, 1, e1);
    println!(
        "warm failover a -> b (quorum disk): owner death -> kv answering on b: {} ms",
        took.as_millis()
    );
    println!("{}", t.timeline(1, e2));
    assert_eq!(
        t.kv_pid(1),
        standby_b,
        "b's kv is not its standby: a cold start\njournals:\n{}",
        t.journals_text()
    );
    assert!(
        t.promoted(1, e2),
        "no promotion event on b\njournals:\n{}",
        t.journals_text()
    );
    assert!(t.has_vip(1));
    t.wait_progress(PROGRESS);
    let n = t.finish();
    assert!(n >= 3 * PROGRESS, "only {n} acknowledged writes");
    t.check_invariants(2);
}
