//! The harness of the kv failover tests (cold and warm standby): a [`Cluster`] running the kv
//! group, a client host on the lab's bridge with `kvclient write --acked` running throughout,
//! and what the test did to it (host deaths, for the invariant checker). It drives the nodes
//! through `ftctl` and reads their group journals; it never decides what a test asserts beyond
//! "every acknowledged write is there" and the journal invariants.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, NAMES};
use crate::netns::{Lab, enter_path};
use crate::{binary, json_lines, read_or_empty};

/// How long a failover, a restart or a resync may take in these tests.
pub const MOVE: Duration = Duration::from_secs(40);
/// How many keys the writer writes at most (it is stopped long before).
const WRITER_KEYS: &str = "1000000";
/// How long the writer waits for one write before it gives up (it reconnects meanwhile).
const WRITER_DEADLINE_SECS: &str = "60";
/// How long `kvclient wait-up` waits for kv to answer as the primary.
const WAIT_UP_SECS: &str = "40";

/// The address `host` on the lab's first network (its /24).
pub fn lab_addr(lab: &Lab, host: u8) -> String {
    let own = lab.addr(0).octets();
    format!("{}.{}.{}.{host}", own[0], own[1], own[2])
}

/// Runs `ip ARGS`; it must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command's status and output, for failure messages.
pub fn text_of(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kvclient write --acked` running in the client's namespace; killed when dropped.
#[derive(Debug)]
pub struct Writer {
    child: Option<Child>,
    out: PathBuf,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- kvclient write ---\n{}", read_or_empty(&self.out));
        }
    }
}

/// A cluster running the kv group, a client host on its network, and what the test did to it.
pub struct KvLab {
    /// Declared first: the client stops before the nodes and the namespaces go.
    pub writer: Option<Writer>,
    /// The nodes.
    pub c: Cluster,
    /// The group's virtual address.
    pub vip: String,
    /// kv's port on it.
    pub port: u16,
    /// The writer's acknowledged keys, one per line.
    pub acked: PathBuf,
    /// (node, unix ms) of every host death this test caused.
    pub deaths: Vec<(usize, u64)>,
}

impl std::fmt::Debug for KvLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvLab")
            .field("vip", &self.vip)
            .field("port", &self.port)
            .field("deaths", &self.deaths)
            .finish_non_exhaustive()
    }
}

impl KvLab {
    /// The nodes of `c` run: a client address (`client_host` on the lab's network) on the
    /// bridge, every node in one view, `group` (a group file's text) applied; kv answers at
    /// `vip:port`.
    pub fn running(c: Cluster, vip: String, port: u16, client_host: u8, group: &str) -> KvLab {
        let client = format!("{}/24", lab_addr(&c.lab, client_host));
        ip(&["-n", c.lab.switch(), "addr", "add", &client, "dev", "br0"]);
        let all: Vec<usize> = (0..c.n()).collect();
        c.wait_view(&all, &all);
        let acked = c.shared.file("acked");
        let group = c.shared.write("kv-group.toml", group);
        let out = c
            .node(0)
            .ftctl_ok(&["group", "apply", group.to_str().expect("utf-8")]);
        assert!(out.contains("applied"), "{out}");
        KvLab {
            writer: None,
            c,
            vip,
            port,
            acked,
            deaths: Vec::new(),
        }
    }

    /// The client host's namespace, as a path to enter.
    pub fn client_ns(&self) -> String {
        format!("/run/netns/{}", self.c.lab.switch())
    }

    /// `kvclient --addr VIP:PORT ARGS`, run on the client host.
    pub fn kvclient(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary("kvclient"));
        cmd.arg("--addr")
            .arg(format!("{}:{}", self.vip, self.port))
            .args(args)
            .stdin(Stdio::null());
        enter_path(&self.client_ns(), &mut cmd);
        cmd
    }

    /// Starts the writer.
    pub fn start_writer(&mut self) {
        let out = self.c.shared.file("writer.out");
        let log = std::fs::File::create(&out).expect("the writer's output file");
        let err = log.try_clone().expect("dup");
        let acked = self.acked.display().to_string();
        let child = self
            .kvclient(&[
                "write",
                "--count",
                WRITER_KEYS,
                "--acked",
                &acked,
                "--deadline",
                WRITER_DEADLINE_SECS,
            ])
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn kvclient write");
        self.writer = Some(Writer {
            child: Some(child),
            out,
        });
    }

    /// The writer is still writing (it gives up only when one write waited its deadline).
    pub fn assert_writer_alive(&mut self) {
        let writer = self.writer.as_mut().expect("the writer was started");
        let child = writer.child.as_mut().expect("the writer runs");
        let exited = child.try_wait().expect("try_wait on the writer");
        assert!(
            exited.is_none(),
            "the writer stopped ({exited:?}): {}",
            read_or_empty(&writer.out)
        );
    }

    /// How many writes were acknowledged so far (whole lines only).
    pub fn acked_count(&self) -> usize {
        read_or_empty(&self.acked).matches('\n').count()
    }

    /// Waits until `more` writes beyond those acknowledged now are acknowledged; returns how
    /// many are.
    pub fn wait_progress(&mut self, more: usize) -> usize {
        let want = self.acked_count() + more;
        let deadline = Instant::now() + MOVE;
        loop {
            let n = self.acked_count();
            if n >= want {
                return n;
            }
            self.assert_writer_alive();
            assert!(
                Instant::now() < deadline,
                "only {n} of {want} writes acknowledged within {MOVE:?}; the group as the first \
                 live node sees it: {:#}\njournals:\n{}",
                self.first_status(),
                self.journals_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kvclient wait-up`: kv answers `PONG primary` on the virtual address.
    pub fn wait_up(&self) {
        let out = self
            .kvclient(&["wait-up", "--timeout", WAIT_UP_SECS])
            .output()
            .expect("run kvclient wait-up");
        assert!(
            out.status.success(),
            "kv is not up: {}\njournals:\n{}",
            text_of(&out),
            self.journals_text()
        );
    }

    /// `kvclient verify` over every write acknowledged so far: all of them are there. Returns
    /// how many it checked.
    pub fn verify(&self) -> usize {
        // The writer appends while this runs: verify a copy cut at its last whole line.
        let text = read_or_empty(&self.acked);
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let snapshot = self.c.shared.write("acked.snapshot", whole);
        let out = self
            .kvclient(&["verify", "--acked", snapshot.to_str().expect("utf-8")])
            .output()
            .expect("run kvclient verify");
        assert!(
            out.status.success(),
            "verify after a fault: {}\njournals:\n{}",
            text_of(&out),
            self.journals_text()
        );
        whole.lines().count()
    }

    /// `ftctl group status --json` of node `i`: the kv group.
    pub fn group(&self, i: usize) -> Value {
        json_lines(&self.c.node(i).ftctl_ok(&["group", "status", "--json"]))
            .into_iter()
            .find(|x| x["name"] == "kv")
            .unwrap_or(Value::Null)
    }

    /// The group status as the first live node sees it (for failure messages).
    pub fn first_status(&self) -> Value {
        (0..self.c.n())
            .find(|i| !self.deaths.iter().any(|(n, _)| n == i))
            .map_or(Value::Null, |i| self.group(i))
    }

    /// Waits until node `i` sees the group online on `owner` with an epoch above `after`;
    /// returns the epoch.
    pub fn wait_online(&self, i: usize, owner: usize, after: u64) -> u64 {
        let deadline = Instant::now() + MOVE;
        loop {
            let s = self.group(i);
            let epoch = s["epoch"].as_u64().unwrap_or(0);
            if s["state"] == "online" && s["owner"] == NAMES[owner] && epoch > after {
                return epoch;
            }
            assert!(
                Instant::now() < deadline,
                "group kv not online on {} (epoch > {after}) within {MOVE:?}, as {} sees it: {s:#}\njournals:\n{}",
                NAMES[owner],
                NAMES[i],
                self.journals_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node `i`'s group journal.
    pub fn journal(&self, i: usize) -> Vec<Value> {
        crate::groups::journal(self.c.node(i).data_dir())
    }

    /// Every node's group journal.
    pub fn journals(&self) -> Vec<Vec<Value>> {
        (0..self.c.n()).map(|i| self.journal(i)).collect()
    }

    /// Every journal, for failure messages.
    pub fn journals_text(&self) -> String {
        crate::groups::journals_text(&self.journals())
    }

    /// The resources node `i`'s run at `epoch` brought to `state`, in the journal's order.
    pub fn resource_order(&self, i: usize, epoch: u64, state: &str) -> Vec<String> {
        self.journal(i)
            .iter()
            .filter(|r| {
                r["kind"] == "resource"
                    && r["group"] == "kv"
                    && r["epoch"] == epoch
                    && r["state"] == state
            })
            .filter_map(|r| r["resource"].as_str().map(str::to_owned))
            .collect()
    }

    /// The pid of kv on node `i` (it runs there).
    pub fn kv_pid(&self, i: usize) -> u32 {
        self.c.node(i).wait_running("kv")
    }

    /// Node `i`'s host dies (watchd, kv and everything else in it; its network is cut).
    pub fn kill_host(&mut self, i: usize) {
        let at = self.c.kill_host(i);
        self.deaths.push((i, at));
    }

    /// Node `i`'s host boots again: no address survives a reboot, then its watchd starts.
    pub fn boot_host(&mut self, i: usize) {
        let _ = Command::new("ip")
            .args([
                "-n",
                self.c.lab.netns(i),
                "addr",
                "del",
                &format!("{}/24", self.vip),
                "dev",
                "eth0",
            ])
            .output();
        self.c.boot_host(i);
    }

    /// Whether node `i`'s interface holds the virtual address.
    pub fn has_vip(&self, i: usize) -> bool {
        self.c.lab.has_address(i, &format!("{}/24", self.vip))
    }

    /// The invariants over every journal; at least `min_runs` runs of the group were seen.
    pub fn check_invariants(&self, min_runs: usize) {
        let runs = crate::groups::check_invariants(&self.journals(), &self.deaths, "kv");
        assert!(runs.len() >= min_runs, "the checker saw runs: {runs:?}");
    }

    /// Stops the writer (it would write forever) and verifies what it had acknowledged.
    pub fn finish(&mut self) -> usize {
        self.assert_writer_alive();
        self.writer = None;
        self.verify()
    }
}
