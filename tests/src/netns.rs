//! Hosts for multi-node tests: one network namespace per node, plugged into one bridge per
//! network (the bridges live in their own namespace), so a test can cut a node off (its bridge
//! ports down), cut a single network of a node, and heal them again. Names are unique per test,
//! and `Drop` deletes every namespace (which deletes the veth pairs and the bridges with them),
//! also when the test fails.

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

/// A set of nodes on one or more switched networks.
#[derive(Debug)]
pub struct Lab {
    /// Namespace names, one per node.
    nodes: Vec<String>,
    /// The namespace holding the bridges.
    switch: String,
    /// Bridge-side interface of each node's link, per network: `ports[net][node]`.
    ports: Vec<Vec<String>>,
    subnet: u8,
}

impl Lab {
    /// `n` nodes (at most 200) on one network, node `i` at `10.<subnet>.0.<i + 1>/24`.
    pub fn new(n: usize) -> Lab {
        Lab::with_networks(n, 1)
    }

    /// `n` nodes (at most 200) on `networks` separate networks (at most 8): network `k` is a
    /// bridge of its own, node `i` is `10.<subnet>.<k>.<i + 1>/24` on it (interface `eth<k>`).
    pub fn with_networks(n: usize, networks: usize) -> Lab {
        assert!((1..=200).contains(&n), "a lab has 1-200 nodes");
        assert!((1..=8).contains(&networks), "a lab has 1-8 networks");
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
            ports: vec![Vec::new(); networks],
            subnet,
        };
        ip(&["netns", "add", &lab.switch]);
        for k in 0..networks {
            let br = format!("br{k}");
            ip(&["-n", &lab.switch, "link", "add", &br, "type", "bridge"]);
            ip(&["-n", &lab.switch, "link", "set", &br, "up"]);
        }
        for i in 0..n {
            let ns = format!("ftn{i}-{id}");
            ip(&["netns", "add", &ns]);
            lab.nodes.push(ns.clone());
            for k in 0..networks {
                // Network 0 keeps the names of the one-network lab (p<i>, eth0).
                let port = if k == 0 {
                    format!("p{i}")
                } else {
                    format!("p{i}n{k}")
                };
                let dev = format!("eth{k}");
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
                    &dev,
                ]);
                ip(&["-n", &lab.switch, "link", "set", &dev, "netns", &ns]);
                ip(&[
                    "-n",
                    &lab.switch,
                    "link",
                    "set",
                    &port,
                    "master",
                    &format!("br{k}"),
                ]);
                ip(&["-n", &lab.switch, "link", "set", &port, "up"]);
                let addr = format!("{}/24", lab.addr_on(k, i));
                ip(&["-n", &ns, "addr", "add", &addr, "dev", &dev]);
                ip(&["-n", &ns, "link", "set", &dev, "up"]);
                lab.ports[k].push(port);
            }
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// Node `i`'s address on network 0.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        self.addr_on(0, i)
    }

    /// Node `i`'s address on network `net`.
    pub fn addr_on(&self, net: usize, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            self.subnet,
            u8::try_from(net).expect("≤ 8 networks"),
            u8::try_from(i + 1).expect("≤ 200 nodes"),
        )
    }

    /// How many networks the lab has.
    pub fn networks(&self) -> usize {
        self.ports.len()
    }

    /// Node `i`'s namespace name.
    pub fn netns(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// Whether node `i`'s first network interface (`eth0`) holds `cidr` (e.g. a group's
    /// virtual address, `10.2.0.200/24`).
    pub fn has_address(&self, i: usize, cidr: &str) -> bool {
        let out = std::process::Command::new("ip")
            .args(["-n", self.netns(i), "-o", "addr", "show", "dev", "eth0"])
            .output()
            .expect("ip addr");
        String::from_utf8_lossy(&out.stdout).contains(cidr)
    }

    /// The namespace holding the bridges: a process entered there (after giving `br<k>` an
    /// address) is a host on the networks that is no node, e.g. a client of the nodes.
    pub fn switch(&self) -> &str {
        &self.switch
    }

    /// Cuts node `i` off every network (its bridge ports go down).
    pub fn cut(&self, i: usize) {
        for net in 0..self.networks() {
            self.cut_link(net, i);
        }
    }

    /// Plugs node `i` back into every network.
    pub fn heal(&self, i: usize) {
        for net in 0..self.networks() {
            self.heal_link(net, i);
        }
    }

    /// Cuts node `i` off network `net` only.
    pub fn cut_link(&self, net: usize, i: usize) {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &self.ports[net][i],
            "down",
        ]);
    }

    /// Plugs node `i` back into network `net`.
    pub fn heal_link(&self, net: usize, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &self.ports[net][i], "up"]);
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

    #[test]
    fn one_network_can_be_cut_while_the_other_works() {
        let lab = Lab::with_networks(2, 2);
        let ping = |from: usize, net: usize, to: usize| {
            let mut cmd = Command::new("ping");
            cmd.args(["-c", "1", "-W", "1", &lab.addr_on(net, to).to_string()]);
            lab.enter(from, &mut cmd);
            cmd.output().expect("run ping").status.success()
        };
        assert!(ping(0, 0, 1) && ping(0, 1, 1));
        lab.cut_link(1, 1);
        assert!(ping(0, 0, 1));
        assert!(!ping(0, 1, 1));
        lab.cut(1);
        assert!(!ping(0, 0, 1));
        lab.heal(1);
        assert!(ping(0, 0, 1) && ping(0, 1, 1));
    }
}
