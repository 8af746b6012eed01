//! A cluster of watchd nodes for end-to-end tests: one network namespace per node
//! ([`netns::Lab`]), the `[cluster]` and `[[node]]` tables written for each, and waits on what
//! `ftctl cluster status|db|events --json` report. Dropping it stops every node and deletes the
//! namespaces.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::Lab;
use crate::{Scratch, Watchd, json_lines, q};

/// The cluster port of every node (each node has its own network namespace).
pub const PORT: u16 = 7400;
/// How long a view change may take in these tests (defaults: suspicion after 0.5 s, a regroup
/// in a few ms, a quorum-disk takeover after about 1 s; a restarted watchd needs its start).
pub const SETTLE: Duration = Duration::from_secs(15);
/// Node names, by index.
pub const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

/// Watchd nodes of one cluster, each in its own network namespace of a [`Lab`].
#[derive(Debug)]
pub struct Cluster {
    /// The namespaces and their networks.
    pub lab: Lab,
    label: String,
    /// A scratch directory every node sees (secret, quorum disk, test files).
    pub shared: Scratch,
    secret: PathBuf,
    /// `quorum = "disk"` on this file.
    disk: Option<PathBuf>,
    /// Extra configuration (e.g. `[[service]]` tables) every node gets after its cluster tables.
    pub extra: String,
    /// Extra `[watchd]` lines every node gets (e.g. `ring_dir = ...`).
    pub settings: String,
    /// The nodes (None: not started, or dropped).
    pub nodes: Vec<Option<Watchd>>,
}

impl Cluster {
    /// `n` nodes on `networks` networks, with a quorum disk when `disk`; none started yet.
    pub fn new(label: &str, n: usize, networks: usize, disk: bool) -> Cluster {
        let lab = Lab::with_networks(n, networks);
        let shared = Scratch::new(label);
        let secret = shared.write("secret", "correct horse battery staple\n");
        let disk = disk.then(|| shared.file("quorum.disk"));
        Cluster {
            lab,
            label: label.to_owned(),
            shared,
            secret,
            disk,
            extra: String::new(),
            settings: String::new(),
            nodes: (0..n).map(|_| None).collect(),
        }
    }

    /// How many nodes.
    pub fn n(&self) -> usize {
        self.nodes.len()
    }

    /// The `[cluster]` and `[[node]]` tables of node `me`.
    pub fn config(&self, me: usize, secret: &std::path::Path) -> String {
        let nets = self.lab.networks();
        let listen: Vec<String> = (0..nets)
            .map(|k| format!("\"{}:{PORT}\"", self.lab.addr_on(k, me)))
            .collect();
        let mut text = format!(
            "[cluster]\nname = \"t\"\nsecret_file = {}\nlisten = [{}]\n",
            q(secret),
            listen.join(", ")
        );
        if let Some(d) = &self.disk {
            text.push_str(&format!("quorum = \"disk\"\nquorum_disk = {}\n", q(d)));
        }
        for i in (0..self.n()).filter(|i| *i != me) {
            let addrs: Vec<String> = (0..nets)
                .map(|k| format!("\"{}:{PORT}\"", self.lab.addr_on(k, i)))
                .collect();
            text.push_str(&format!(
                "\n[[node]]\nname = \"{}\"\naddresses = [{}]\n",
                NAMES[i],
                addrs.join(", ")
            ));
        }
        text.push('\n');
        text.push_str(&self.extra);
        text
    }

    /// Starts node `i`.
    pub fn start(&mut self, i: usize) {
        let secret = self.secret.clone();
        self.start_with_secret(i, &secret);
    }

    /// Starts node `i` with this secret file.
    pub fn start_with_secret(&mut self, i: usize, secret: &std::path::Path) {
        let w = Watchd::start_node(
            Some(self.lab.netns(i)),
            &format!("{}-{}", self.label, NAMES[i]),
            Some(NAMES[i]),
            &self.settings,
            &self.config(i, secret),
        );
        self.nodes[i] = Some(w);
    }

    /// Starts every node.
    pub fn start_all(&mut self) {
        for i in 0..self.n() {
            self.start(i);
        }
    }

    /// Node `i` (it must run).
    pub fn node(&self, i: usize) -> &Watchd {
        self.nodes[i].as_ref().expect("the node runs")
    }

    /// kill -9 of node `i`'s watchd (its services keep running).
    pub fn kill9(&mut self, i: usize) {
        if let Some(w) = self.nodes[i].as_mut() {
            w.kill9();
        }
    }

    /// The host of node `i` dies: its watchd and every process in its network namespace are
    /// killed with SIGKILL and its network is cut. Returns the unix ms of the death (for
    /// [`crate::groups::check_invariants`]). [`Cluster::boot_host`] brings it back.
    pub fn kill_host(&mut self, i: usize) -> u64 {
        let pids = pids_in_netns(self.lab.netns(i));
        self.kill9(i);
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // A process that was forking meanwhile: its child is in the namespace too.
        for pid in pids_in_netns(self.lab.netns(i)) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.lab.cut(i);
        crate::unix_ms()
    }

    /// The host of node `i` boots again after [`Cluster::kill_host`]: its network back, then
    /// its watchd (what else a real boot resets, such as addresses, is the test's to reset).
    pub fn boot_host(&mut self, i: usize) {
        self.lab.heal(i);
        self.restart(i);
    }

    /// Starts node `i` again after [`Cluster::kill9`].
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].as_mut().expect("the node ran").restart();
    }

    /// `ftctl cluster status --json` of node `i`.
    pub fn status(&self, i: usize) -> Value {
        let text = self.node(i).ftctl_ok(&["cluster", "status", "--json"]);
        serde_json::from_str(text.trim()).expect("cluster status is one JSON object")
    }

    /// `ftctl cluster db --json` of node `i`.
    pub fn db(&self, i: usize) -> Value {
        let text = self.node(i).ftctl_ok(&["cluster", "db", "--json"]);
        serde_json::from_str(text.trim()).expect("cluster db is one JSON object")
    }

    /// Sets a cluster property through node `i` (a global update).
    pub fn set(&self, i: usize, key: &str, value: &str) {
        let out = self.node(i).ftctl_ok(&["cluster", "set", key, value]);
        assert!(out.contains("committed"), "{out}");
    }

    /// Waits until node `i`'s database has `key` = `value`.
    pub fn wait_property(&self, i: usize, key: &str, value: &str) -> Value {
        crate::wait_until(
            &format!("{key}={value} on node {}", NAMES[i]),
            SETTLE,
            || {
                let db = self.db(i);
                (db["content"]["properties"][key] == value).then_some(db)
            },
        )
    }

    /// `ftctl cluster events --json` of node `i`.
    pub fn events(&self, i: usize) -> Vec<Value> {
        json_lines(&self.node(i).ftctl_ok(&["cluster", "events", "--json"]))
    }

    /// Waits until `pred` holds for node `i`'s status; returns it.
    pub fn wait(&self, i: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + SETTLE;
        loop {
            let s = self.status(i);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not get to `{what}` within {SETTLE:?}; status: {s:#}\nevents:\n{}",
                NAMES[i],
                self.events(i)
                    .iter()
                    .map(|e| format!("{}  {}", e["kind"], e["detail"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every node in `nodes` has committed the same view with exactly `members`,
    /// acts, and sees quorum; returns the epoch.
    pub fn wait_view(&self, nodes: &[usize], members: &[usize]) -> u64 {
        let want: Vec<&str> = members.iter().map(|i| NAMES[*i]).collect();
        let deadline = Instant::now() + SETTLE;
        loop {
            let all: Vec<Value> = nodes.iter().map(|i| self.status(*i)).collect();
            let epochs: Vec<u64> = all
                .iter()
                .map(|s| s["epoch"].as_u64().unwrap_or(0))
                .collect();
            let agreed = all.iter().all(|s| {
                members_of(s) == want
                    && s["acting"] == true
                    && s["quorum"]["has_quorum"] == true
                    && s["epoch"] == all[0]["epoch"]
            });
            if agreed && epochs[0] > 0 {
                return epochs[0];
            }
            assert!(
                Instant::now() < deadline,
                "nodes {nodes:?} did not agree on view {want:?} within {SETTLE:?}: {:?}",
                all.iter()
                    .map(|s| (
                        s["node"].clone(),
                        s["epoch"].clone(),
                        s["members"].clone(),
                        s["acting"].clone()
                    ))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every process whose network namespace is `ns` (`ip netns pids`).
pub fn pids_in_netns(ns: &str) -> Vec<u32> {
    std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The members of a `cluster status` object.
pub fn members_of(s: &Value) -> Vec<&str> {
    s["members"]
        .as_array()
        .map(|m| m.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The state of `node` in a `cluster status` object.
pub fn state_of<'a>(s: &'a Value, node: &str) -> &'a str {
    s["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|x| x["name"] == node))
        .and_then(|x| x["state"].as_str())
        .unwrap_or("?")
}
