//! Heartbeats do not wait for durable writes of global updates: a 3-node cluster applies
//! global updates while the cluster database's writes are slow, and no node is suspected.
//!
//! The regression test slows every write of `clusterdb.redb` with watchd's test hook (a file
//! in the data directory, see `watchd::node::store::TEST_DELAY_FILE`); the ignored
//! measurement loads the disk for real (fsync loops and `dd oflag=dsync`) and prints counts.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftkit_tests::cluster::{Cluster, NAMES};
use serde_json::Value;

/// The test hook's file in a node's data directory (watchd's `TEST_DELAY_FILE`).
const DELAY_FILE: &str = "test-clusterdb-delay-ms";
/// The injected delay of every cluster-database write: longer than `suspect_after` (500 ms),
/// so one awaited write silences a node's heartbeats long enough to get it suspected.
const DELAY_MS: u64 = 600;
/// Global updates issued under the delay.
const UPDATES: usize = 4;

/// Every cluster event of node `i`, by kind.
fn kinds(c: &Cluster, i: usize) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in c.events(i) {
        let k = e["kind"].as_str().unwrap_or("?").to_owned();
        out.entry(k).or_default().push(e);
    }
    out
}

fn count(k: &BTreeMap<String, Vec<Value>>, kind: &str) -> usize {
    k.get(kind).map_or(0, Vec::len)
}

#[test]
fn slow_cluster_database_writes_get_no_healthy_node_suspected() {
    let mut c = Cluster::new("gum-lane", 3, 1, false);
    c.start_all();
    let epoch = c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    for i in 0..3 {
        std::fs::write(c.node(i).data_dir().join(DELAY_FILE), DELAY_MS.to_string())
            .expect("write the delay hook");
    }
    // Updates through every node (the leader `a` and both members), one after the other so
    // that each finishes well within the request timeout despite the slow writes.
    let mut failed = Vec::new();
    for n in 0..UPDATES {
        let out = c
            .node(n % 3)
            .ftctl(&["cluster", "set", &format!("k{n}"), &format!("v{n}")]);
        if !out.status.success() {
            failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    for i in 0..3 {
        let _ = std::fs::remove_file(c.node(i).data_dir().join(DELAY_FILE));
    }
    let mut slow = 0;
    for (i, name) in NAMES.iter().enumerate().take(3) {
        let k = kinds(&c, i);
        slow += count(&k, "slow_store");
        assert_eq!(
            count(&k, "suspected"),
            0,
            "node {} suspected a healthy peer: {:?}",
            name,
            k.get("suspected")
        );
        let s = c.status(i);
        assert_eq!(
            s["epoch"].as_u64(),
            Some(epoch),
            "node {} changed views: {:?}",
            name,
            k.get("view")
        );
        assert_eq!(s["acting"], true);
    }
    assert!(failed.is_empty(), "updates failed: {failed:?}");
    for i in 0..3 {
        let (k, v) = (format!("k{}", UPDATES - 1), format!("v{}", UPDATES - 1));
        c.wait_property(i, &k, &v);
    }
    // The hook worked: the writes were slow.
    assert!(slow >= UPDATES, "only {slow} slow_store events");
}

/// Background disk load: threads writing 4 KiB and fsyncing in a loop, and `dd oflag=dsync`
/// loops, all in `dir`. Stopped (and its files removed) on drop.
struct DiskLoad {
    stop: Arc<AtomicBool>,
    fsyncs: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    children: Vec<Child>,
}

impl DiskLoad {
    fn start(dir: &std::path::Path, fsync_threads: usize, dds: usize) -> DiskLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let fsyncs = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for t in 0..fsync_threads {
            let path = dir.join(format!("fsync-{t}"));
            let stop = stop.clone();
            let fsyncs = fsyncs.clone();
            threads.push(std::thread::spawn(move || {
                let Ok(mut f) = std::fs::File::create(&path) else {
                    return;
                };
                let block = [0x5au8; 4096];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if f.write_all(&block).is_err() || f.sync_data().is_err() {
                        break;
                    }
                    fsyncs.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    if n.is_multiple_of(256) {
                        let _ = f.set_len(0);
                    }
                }
                let _ = std::fs::remove_file(&path);
            }));
        }
        let children = (0..dds)
            .filter_map(|k| {
                let file = dir.join(format!("dd-{k}"));
                Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "while :; do dd if=/dev/zero of='{}' bs=1M count=32 oflag=dsync 2>/dev/null; done",
                        file.display()
                    ))
                    .stdin(Stdio::null())
                    .process_group(0)
                    .spawn()
                    .ok()
            })
            .collect();
        DiskLoad {
            stop,
            fsyncs,
            threads,
            children,
        }
    }
}

impl Drop for DiskLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in &mut self.children {
            if let Ok(pgid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = c.wait();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Measurement, not a pass/fail test: global updates issued concurrently through every node
/// while the disk is loaded; prints the `slow_store` events and the suspicions and views.
/// `GUM_LANE_SECONDS` (default 30), `GUM_LANE_FSYNC_THREADS` (default 16) and
/// `GUM_LANE_DDS` (default 4) size the run.
#[test]
#[ignore = "a measurement under real disk load; run by hand with --ignored --nocapture"]
fn measure_suspicions_under_disk_load() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let seconds = env("GUM_LANE_SECONDS", 30);
    let fsync_threads = usize::try_from(env("GUM_LANE_FSYNC_THREADS", 16)).unwrap_or(16);
    let dds = usize::try_from(env("GUM_LANE_DDS", 4)).unwrap_or(4);
    let mut c = Cluster::new("gum-load", 3, 1, false);
    c.start_all();
    let epoch = c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    let load = DiskLoad::start(c.shared.path(), fsync_threads, dds);
    let started = Instant::now();
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    std::thread::scope(|s| {
        for w in 0..6 {
            let (c, ok, failed) = (&c, &ok, &failed);
            s.spawn(move || {
                let mut n = 0;
                while started.elapsed() < Duration::from_secs(seconds) {
                    let out =
                        c.node(w % 3)
                            .ftctl(&["cluster", "set", &format!("w{w}"), &format!("{n}")]);
                    if out.status.success() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            });
        }
    });
    let fsyncs = load.fsyncs.load(Ordering::Relaxed);
    drop(load);
    println!(
        "{seconds} s, {fsync_threads} fsync threads ({fsyncs} fsyncs), {dds} dd loops: {} updates committed, {} failed",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    for (i, name) in NAMES.iter().enumerate().take(3) {
        let k = kinds(&c, i);
        let slow: Vec<u64> = k
            .get("slow_store")
            .map(|v| {
                v.iter()
                    .filter_map(|e| {
                        let d = e["detail"].as_str()?;
                        d.split(" took ").nth(1)?.split(' ').next()?.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "node {}: slow_store {} (max {} ms, >=300 ms: {}, heartbeats waited: {}), suspected {}, regroups {}, views {}, epoch {} -> {}",
            name,
            slow.len(),
            slow.iter().max().copied().unwrap_or(0),
            slow.iter().filter(|ms| **ms >= 300).count(),
            k.get("slow_store").map_or(0, |v| v
                .iter()
                .filter(|e| e["detail"]
                    .as_str()
                    .is_some_and(|d| d.ends_with("; heartbeats waited")))
                .count()),
            count(&k, "suspected"),
            count(&k, "regroup_started"),
            count(&k, "view"),
            epoch,
            c.status(i)["epoch"]
        );
    }
}
