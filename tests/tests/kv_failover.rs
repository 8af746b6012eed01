//! Cold standby of `examples/kv` across hosts: real watchd nodes, each in its own network
//! namespace, run kv as a resource group: a virtual address (`ip`), kv's data directory as a
//! group-managed sync-mode fileset (`fileset`), kv's checkpoint directory shipped to the other
//! owners as each image is taken (`checkpoint`), and kv itself (`service`, `--checkpoint
//! per-request`), brought online in that order. A `kvclient write --acked` runs throughout from a
//! host on the network that is no node, reconnecting to the virtual address; after every fault
//! `kvclient verify` must find every acknowledged write, and at the end of every test the
//! invariant checker ([`ftkit_tests::groups`]) reads every node's group journal: no two nodes
//! ever ran the group at once, epochs only grew. Faults: kv crashes (restarted locally, the group
//! stays), kv crashes beyond its restart budget (the group moves), the owner host dies, the owner
//! is partitioned, and, in a two-node cluster with a quorum disk running exactly the README's
//! files (`examples/kv-cluster/`), the host holding the disk's lease dies.

use ftkit_tests::cluster::{Cluster, NAMES, SETTLE};
use ftkit_tests::kv_cluster::{self, readme_file};
use ftkit_tests::kv_lab::{KvLab, MOVE, lab_addr};
use ftkit_tests::{binary, pid_of, q, repo_root, wait_until};
use nix::sys::signal::Signal;

/// kv's port on the virtual address.
const KV_PORT: u16 = 7700;
/// The last octet of the virtual address in the lab's network.
const VIP_HOST: u8 = 200;
/// The last octet of the client's address (on the bridge, outside every node).
const CLIENT_HOST: u8 = 250;
/// Acknowledged writes that must follow each fault (the client rides through it).
const PROGRESS: usize = 20;
/// How often a crash of kv is repeated at most to exhaust its restart budget
/// (`max_restarts = 2` below: the third crash within the window is beyond it).
const MAX_CRASHES: usize = 6;

/// The `[[fileset]]` and `[[service]]` tables of a node of the three-node tests. Paths are
/// relative to the node's configuration file, whose directory holds its data directory
/// (`data/`), so every node gets the same text: kv's data in `data/kv-data`, its checkpoints in
/// watchd's checkpoint directory for kv (`data/ckpt/kv`, its `FT_CKPT_DIR`).
fn kv_tables(vip: &str, nodes: &[&str]) -> String {
    let backups = nodes
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[[fileset]]
name = "kv-data"
path = "data/kv-data"
primary = "group"
backups = [{backups}]
sync = true

[[fileset]]
name = "kv-ckpt"
path = "data/ckpt/kv"
primary = "group"
backups = [{backups}]
mode = "copy"
quiet = "20ms"

[[service]]
name = "kv"
command = {kv}
args = ["--listen", "{vip}:{KV_PORT}", "--data", "data/kv-data", "--checkpoint", "per-request"]
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

/// The order the group's resources come online in.
const ONLINE_ORDER: [&str; 4] = ["kv-ip", "kv-data", "kv-ckpt", "kv"];

/// The address `host` in the lab's network 0 (`10.S.0.host`).
/// A cluster running the kv group (see [`KvLab`]).
type Kv = KvLab;

/// `n` nodes (with a quorum disk when `disk`) with the kv tables, the group applied (preferred
/// owners in name order).
fn kv(label: &str, n: usize, disk: bool) -> Kv {
    let mut c = Cluster::new(label, n, 1, disk);
    let vip = lab_addr(&c.lab, VIP_HOST);
    c.extra = kv_tables(&vip, &NAMES[..n]);
    // Rings in the scratch directory, not /dev/shm, so nothing outlives the test.
    let rings = c.shared.file("rings");
    c.settings = format!("ring_dir = {}", q(&rings));
    c.start_all();
    let group = kv_cluster::group(&vip, &NAMES[..n]);
    KvLab::running(c, vip, KV_PORT, CLIENT_HOST, &group)
}

/// The two nodes of the README's deployment, each running its file of `examples/kv-cluster/`
/// with the hosts' addresses and paths replaced by the lab's and the test's (and the rings in
/// the scratch directory); the README's group file applied.
fn readme_kv(label: &str) -> Kv {
    let mut c = Cluster::new(label, 2, 1, false);
    let vip = lab_addr(&c.lab, VIP_HOST);
    kv_cluster::start_nodes(&mut c, label, &vip, str::to_owned);
    let group = kv_cluster::group(&vip, &NAMES[..2]);
    KvLab::running(c, vip, KV_PORT, CLIENT_HOST, &group)
}

/// kv crashes: watchd restarts it where it is and the group stays (same owner, same epoch);
/// then it crashes beyond its restart budget: the group moves to the next preferred owner,
/// which recovers from the shipped checkpoint and the replicated log.
#[test]
fn kv_crashes_restart_locally_then_beyond_the_budget_the_group_moves() {
    let mut t = kv("kvf-crash", 3, false);
    let e1 = t.wait_online(1, 0, 0);
    assert_eq!(t.resource_order(0, e1, "online"), ONLINE_ORDER);
    assert!(t.has_vip(0) && !t.has_vip(1) && !t.has_vip(2));
    t.wait_up();
    t.start_writer();
    t.wait_progress(PROGRESS);

    // One crash: restarted locally, the group does not move.
    let first = t.kv_pid(0);
    ftkit_tests::signal(first, Signal::SIGKILL);
    let second = t.c.node(0).wait_new_pid("kv", first, MOVE);
    t.wait_progress(PROGRESS);
    let s = t.group(1);
    assert_eq!(
        (s["owner"].as_str(), s["epoch"].as_u64()),
        (Some("a"), Some(e1)),
        "{s:#}"
    );
    assert_eq!(s["state"], "online", "{s:#}");
    t.verify();
    let log = t.c.node(0).service_log("kv");
    assert!(log.contains("recovered seq"), "{log}");

    // Crashes beyond the budget: the group moves to b.
    let mut pid = second;
    let mut crashes = 0;
    loop {
        ftkit_tests::signal(pid, Signal::SIGKILL);
        crashes += 1;
        let moved = wait_until("kv restarted or given up", MOVE, || {
            let s = t.group(1);
            if s["owner"] != "a" || s["epoch"].as_u64() != Some(e1) {
                return Some(None);
            }
            let kv = t.c.node(0).service("kv");
            match pid_of(&kv) {
                Some(p) if p != pid && kv["state"] == "running" => Some(Some(p)),
                _ => None,
            }
        });
        match moved {
            Some(p) if crashes < MAX_CRASHES => pid = p,
            Some(_) => panic!("kv was restarted after {crashes} crashes (budget: 2)"),
            None => break,
        }
    }
    let e2 = t.wait_online(0, 1, e1);
    assert_eq!(t.resource_order(1, e2, "online"), ONLINE_ORDER);
    assert_eq!(
        t.resource_order(0, e1, "offline"),
        ["kv", "kv-ckpt", "kv-data", "kv-ip"]
    );
    assert!(t.has_vip(1) && !t.has_vip(0));
    assert_eq!(t.group(2)["failovers_in_period"], 1);
    t.wait_up();
    let n = t.wait_progress(PROGRESS);
    t.verify();
    let log = t.c.node(1).service_log("kv");
    assert!(
        log.contains("recovered seq"),
        "b started from a's checkpoint: {log}"
    );

    let checked = t.finish();
    assert!(checked >= n, "{checked} < {n}");
    println!("{checked} acknowledged writes verified");
    t.check_invariants(2);
}

/// The owner host dies: the group moves; it boots again and stays a backup (failback never);
/// then the new owner is partitioned from the others: it stops acting and takes kv offline,
/// the group moves again, and when the partition heals the old owner never ran it at the same
/// time as the new one.
#[test]
fn the_owner_host_dies_then_the_next_owner_is_partitioned() {
    let mut t = kv("kvf-host", 3, false);
    let e1 = t.wait_online(1, 0, 0);
    t.wait_up();
    t.start_writer();
    t.wait_progress(PROGRESS);
    // A checkpoint image has reached b (kv checkpoints per request; copy mode ships them).
    let shipped = t.c.node(1).data_dir().join("ckpt/kv/0");
    wait_until("a checkpoint image on b", MOVE, || {
        std::fs::read_dir(&shipped)
            .ok()?
            .flatten()
            .any(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
            .then_some(())
    });

    // The owner host dies: b takes over from the replicated log and the shipped checkpoints.
    t.kill_host(0);
    let e2 = t.wait_online(1, 1, e1);
    assert!(t.has_vip(1));
    t.wait_progress(PROGRESS);
    t.verify();
    // b's kv recovered from a shipped checkpoint, or, when the owner died while copy mode was
    // replacing the images (removals go out at once, copies after the quiet interval: README,
    // "Limits"), from the replicated log alone; verify() above found every acknowledged write
    // either way.
    let log = t.c.node(1).service_log("kv");
    let from_checkpoint = log.contains("recovered seq");
    assert!(
        from_checkpoint || (log.contains("no checkpoint") && log.contains("replayed")),
        "{log}"
    );
    if !from_checkpoint {
        println!("b found no whole shipped checkpoint image: it recovered from the log alone");
    }

    // It boots again: it rejoins as a backup, the group stays on b. Its replicas catch up from
    // b meanwhile; b is cut off as soon as the writes go on, often before that.
    t.boot_host(0);
    t.c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    t.wait_progress(PROGRESS);
    let s = t.group(0);
    assert_eq!(
        (s["owner"].as_str(), s["epoch"].as_u64()),
        (Some("b"), Some(e2)),
        "{s:#}"
    );
    assert!(!t.has_vip(0));

    // b is cut off from everybody (the client included): the majority (a, c) brings the group
    // up on a, the first preferred owner, when b had reported a's replicas in sync, else on c
    // (a node still catching up lacks writes b acknowledged); b stops acting and takes
    // everything offline.
    t.c.lab.cut(1);
    let (third, e3) = wait_until("kv online on a or c", MOVE, || {
        let s = t.group(0);
        let epoch = s["epoch"].as_u64().unwrap_or(0);
        let owner = NAMES.iter().position(|n| s["owner"] == *n);
        (s["state"] == "online" && epoch > e2)
            .then_some(owner)
            .flatten()
            .filter(|o| *o != 1)
            .map(|o| (o, epoch))
    });
    println!(
        "after b was cut off: kv online on {} at epoch {e3}",
        NAMES[third]
    );
    t.wait_progress(PROGRESS);
    t.verify();
    // Cut off, b cannot hand its last writes to the backups: its fileset resources may time out
    // going offline; what counts is that kv and the address are gone and the run ended.
    wait_until("b ended its run", SETTLE, || {
        let ended = ftkit_tests::groups::journal(t.c.node(1).data_dir())
            .iter()
            .any(|r| r["kind"] == "group" && r["epoch"] == e2 && r["state"] == "offline");
        (ended
            && !t.has_vip(1)
            && t.resource_order(1, e2, "offline")
                .contains(&"kv".to_owned()))
        .then_some(())
    });

    // The partition heals: b rejoins, the group stays where it is.
    t.c.lab.heal(1);
    t.c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    t.wait_progress(PROGRESS);
    let s = t.group(1);
    assert_eq!(
        (s["owner"].as_str(), s["epoch"].as_u64()),
        (Some(NAMES[third]), Some(e3)),
        "{s:#}"
    );
    t.finish();
    t.check_invariants(3);
}

/// The README's two-node deployment (`examples/kv-cluster/`, run as they are but for the hosts'
/// addresses and paths). The group comes online on a. The standby host b dies: a, alone, wins
/// the quorum disk's vote and keeps kv running (the writes go on without a backup); b boots
/// again and catches up. Then the host holding the group and the disk's lease, a, dies: b
/// takes the disk over, forms the cluster alone and brings kv up with every acknowledged write.
#[test]
fn the_readme_two_node_deployment_survives_the_loss_of_the_quorum_disk_owner() {
    let mut t = readme_kv("kvf-readme");
    let s = t.c.status(0);
    assert_eq!(s["quorum"]["kind"], "disk", "{s:#}");
    let e1 = t.wait_online(1, 0, 0);
    assert_eq!(t.resource_order(0, e1, "online"), ONLINE_ORDER);
    t.wait_up();
    t.start_writer();
    t.wait_progress(PROGRESS);

    // The standby host dies: a keeps the group, with the disk's vote.
    t.kill_host(1);
    t.c.wait_view(&[0], &[0]);
    let s = t.c.status(0);
    assert_eq!(s["quorum"]["disk_owner"], "a", "{s:#}");
    t.wait_progress(PROGRESS);
    let g = t.group(0);
    assert_eq!(
        (g["owner"].as_str(), g["epoch"].as_u64()),
        (Some("a"), Some(e1)),
        "{g:#}"
    );
    t.boot_host(1);
    t.c.wait_view(&[0, 1], &[0, 1]);
    t.wait_progress(PROGRESS);
    t.verify();
    let s = t.c.status(1);
    println!(
        "after b's return the quorum disk's owner is {}",
        s["quorum"]["disk_owner"]
    );

    // The owner of the group (and of the disk, while it holds it) dies.
    t.kill_host(0);
    t.c.wait_view(&[1], &[1]);
    let s = t.c.status(1);
    assert_eq!(s["quorum"]["disk_owner"], "b", "{s:#}");
    t.wait_online(1, 1, e1);
    assert!(t.has_vip(1));
    t.wait_up();
    t.wait_progress(PROGRESS);
    t.verify();
    t.finish();
    t.check_invariants(2);
}

/// The README's section shows `a.toml` and `kv-group.toml` as they are, and `b.toml` is `a.toml`
/// with the node's name and address and the other node swapped (what the README says of it).
#[test]
fn the_readme_shows_the_kv_cluster_files_as_they_are() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("## Two-node kv deployment")
        .nth(1)
        .expect("the README has the section");
    for file in ["a.toml", "kv-group.toml"] {
        let text = readme_file(file);
        assert!(
            section.contains(&format!("```toml\n{text}```")),
            "README.md does not show examples/kv-cluster/{file} as it is"
        );
    }
    let swapped = readme_file("a.toml")
        .replace("Node \"a\" of", "Node \"b\" of")
        .replace("b.toml differs only", "a.toml differs only")
        .replace("node = \"a\"", "node = \"b\"")
        .replace(
            "listen = [\"10.0.0.1:7400\"]",
            "listen = [\"10.0.0.2:7400\"]",
        )
        .replace(
            "name = \"b\"\naddresses = [\"10.0.0.2:7400\"]",
            "name = \"a\"\naddresses = [\"10.0.0.1:7400\"]",
        );
    assert_eq!(readme_file("b.toml"), swapped);
}
