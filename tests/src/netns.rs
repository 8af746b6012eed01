//! Hosts for multi-node tests: one network namespace per node, all plugged into a bridge that
//! lives in its own namespace, so a test can cut a node off (its bridge port down) and heal it
//! again. Names are unique per test, and `Drop` deletes every namespace (which deletes the veth
//! pairs and the bridge with them), also when the test fails.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static LABS: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A set of nodes on one switched network.
#[derive(Debug)]
pub struct Lab {
    /// Namespace names, one per node.
    nodes: Vec<String>,
    /// The namespace holding the bridge.
    switch: String,
    /// Bridge-side interface of each node's link.
    ports: Vec<String>,
    subnet: u8,
}

impl Lab {
    /// `n` nodes (at most 200), node `i` at `10.<subnet>.0.<i + 1>/24`.
    pub fn new(n: usize) -> Lab {
        assert!((1..=200).contains(&n), "a lab has 1-200 nodes");
        // Interface names have at most 15 bytes and must be unique only inside a namespace,
        // but namespace names are global: pid + counter keeps parallel tests apart.
        let id = format!(
            "{:x}{:x}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let subnet = u8::try_from(LABS.load(Ordering::Relaxed) % 250 + 1).expect("< 251");
        let mut lab = Lab {
            nodes: Vec::new(),
            switch: format!("ftsw-{id}"),
            ports: Vec::new(),
            subnet,
        };
        ip(&["netns", "add", &lab.switch]);
        ip(&["-n", &lab.switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lab.switch, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("ftn{i}-{id}");
            ip(&["netns", "add", &ns]);
            lab.nodes.push(ns.clone());
            let port = format!("p{i}");
            // Create the pair inside the switch namespace, then move the node end.
            ip(&[
                "-n",
                &lab.switch,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
            ]);
            ip(&["-n", &lab.switch, "link", "set", "eth0", "netns", &ns]);
            ip(&["-n", &lab.switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &lab.switch, "link", "set", &port, "up"]);
            let addr = format!("{}/24", lab.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            lab.ports.push(port);
        }
        lab
    }

    /// Node `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            self.subnet,
            0,
            u8::try_from(i + 1).expect("≤ 200 nodes"),
        )
    }

    /// Node `i`'s namespace name.
    pub fn netns(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// Cuts node `i` off the network (its bridge port goes down).
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &self.ports[i], "down"]);
    }

    /// Plugs node `i` back in.
    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &self.ports[i], "up"]);
    }

    /// Makes `cmd` run inside node `i`'s network namespace (only the network: the file system
    /// and the cgroup tree stay shared, as on hosts that share nothing but see the same disk in
    /// a test).
    pub fn enter(&self, i: usize, cmd: &mut Command) {
        enter_path(&format!("/run/netns/{}", self.nodes[i]), cmd);
    }
}

/// Makes `cmd` run in the network namespace bound at `path` (`/run/netns/NAME`).
pub fn enter_path(path: &str, cmd: &mut Command) {
    let ns = std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    // SAFETY: the closure runs in the forked child before exec; it only calls setns(2) on a
    // descriptor opened before the fork, and an Errno converts to io::Error without allocating.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_reach_each_other_until_cut() {
        let lab = Lab::new(2);
        let ping = |from: usize, to: usize| {
            let mut cmd = Command::new("ping");
            cmd.args(["-c", "1", "-W", "1", &lab.addr(to).to_string()]);
            lab.enter(from, &mut cmd);
            cmd.output().expect("run ping").status.success()
        };
        assert!(ping(0, 1));
        lab.cut(1);
        assert!(!ping(0, 1));
        lab.heal(1);
        assert!(ping(0, 1));
        let name = lab.netns(0).to_owned();
        drop(lab);
        assert!(!std::path::Path::new(&format!("/run/netns/{name}")).exists());
    }
}
