//! The cluster benchmark: how long after `kill -9` of one node's watchd the survivors agree on
//! the view without it (default settings; 2 nodes + quorum disk, 3 and 5 nodes), idle and with
//! a CPU hog on every core, and how many false suspicions a cluster raises while the hog runs.
//!
//! Run: `cargo build --release --workspace && cargo bench -p ftkit-tests --bench cluster`
//! (`-- --quick` for a short run, `-- --runs N` kills per configuration, `-- --hog-for 5m` the
//! false-suspicion period, `-- --out FILE` to also write the markdown). The nodes are watchd
//! processes on loopback, each with its own data directory, found in the target/release
//! directory above this executable (or `--bin-dir`). It prints tables; it asserts nothing about
//! the numbers.
//!
//! A sample is the time from just before the kill(2) to the latest of the survivors' `view`
//! events (their commit of the view without the victim, stamped by watchd in milliseconds of
//! the real-time clock).

#[allow(dead_code)]
#[path = "watchd/harness.rs"]
mod harness;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde_json::{Value, json};

use harness::{Table, percentile, real_ns, sorted};

const USAGE: &str = "usage: cluster-bench [--quick] [--runs N] [--hog-for DURATION] [--out FILE] \
[--bin-dir DIR] [--only latency,suspicions] [--keep]";

/// Kills per configuration and load (full run / --quick).
const RUNS: usize = 20;
const RUNS_QUICK: usize = 4;
/// The false-suspicion period (full run / --quick).
const HOG_FOR: Duration = Duration::from_secs(300);
const HOG_FOR_QUICK: Duration = Duration::from_secs(30);
/// Nodes of the cluster watched for false suspicions.
const SUSPICION_NODES: usize = 3;
/// How long a cluster may take to form, or to agree again after a kill or a restart.
const VIEW_TIMEOUT: Duration = Duration::from_secs(20);
/// How long watchd may take to answer on its control socket after it was started.
const CONTROL_UP_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between the full view and the next kill: every member vouches for every other again.
const BEFORE_KILL: Duration = Duration::from_millis(700);
/// Pause between two status polls.
const POLL: Duration = Duration::from_millis(20);
/// How long watchd may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The cluster secret.
const SECRET: &str = "ftkit cluster benchmark secret\n";
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

#[derive(Debug)]
struct Options {
    quick: bool,
    runs: Option<usize>,
    hog_for: Option<Duration>,
    out: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
    latency: bool,
    suspicions: bool,
    keep: bool,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        quick: false,
        runs: None,
        hog_for: None,
        out: None,
        bin_dir: None,
        latency: true,
        suspicions: true,
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--keep" => o.keep = true,
            "--runs" => o.runs = Some(args.next().context(USAGE)?.parse().context(USAGE)?),
            "--hog-for" => {
                o.hog_for = Some(humantime_duration(&args.next().context(USAGE)?).context(USAGE)?);
            }
            "--out" => o.out = Some(args.next().context(USAGE)?.into()),
            "--bin-dir" => o.bin_dir = Some(args.next().context(USAGE)?.into()),
            "--only" => {
                let list = args.next().context(USAGE)?;
                o.latency = false;
                o.suspicions = false;
                for part in list.split(',') {
                    match part {
                        "latency" => o.latency = true,
                        "suspicions" => o.suspicions = true,
                        other => bail!("unknown section {other:?}; {USAGE}"),
                    }
                }
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    Ok(o)
}

/// `90s`, `5m`, `1500ms`, `2h`.
fn humantime_duration(s: &str) -> Result<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("bad duration unit in {s:?} (ms, s, m, h)"),
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let opts = parse_args()?;
    harness::install_interrupt_handler()?;
    harness::become_subreaper()?;
    let _sweep = harness::SweepGuard;
    let bins = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => harness::release_dir()?,
    };
    for b in ["watchd", "ftctl"] {
        if !bins.join(b).is_file() {
            bail!(
                "{b} not found in {}: run `cargo build --release --workspace` first",
                bins.display()
            );
        }
    }
    let runs = opts
        .runs
        .unwrap_or(if opts.quick { RUNS_QUICK } else { RUNS })
        .max(1);
    let hog_for = opts
        .hog_for
        .unwrap_or(if opts.quick { HOG_FOR_QUICK } else { HOG_FOR });
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut doc = String::new();
    harness::emit(
        &mut doc,
        &format!(
            "# Cluster failure detection ({})\n\n{} cores, kernel {}; watchd from {}; default \
             timings (heartbeat {:?}, suspicion after {} missed, quorum-disk lease {:?} renewed \
             every {:?}, takeover after {:?} of silence); nodes on loopback; CPU hog = {cores} \
             busy loops at normal priority.\n\n",
            if opts.quick { "--quick" } else { "full" },
            cores,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned()),
            bins.display(),
            cluster::membership::DEFAULT_HEARTBEAT_INTERVAL,
            cluster::membership::DEFAULT_MISS_THRESHOLD,
            cluster::quorum::DEFAULT_LEASE_TIME,
            cluster::quorum::DEFAULT_RENEW_INTERVAL,
            cluster::quorum::DEFAULT_TAKEOVER_DELAY,
        ),
    );
    if opts.latency {
        let mut table = Table::new(&[
            "cluster", "load", "killed", "runs", "p50 ms", "p99 ms", "max ms",
        ]);
        for hog in [false, true] {
            let _hog = hog.then(|| Hog::start(cores)).transpose()?;
            for (n, disk) in [(2, true), (3, false), (5, false)] {
                harness::check_interrupted()?;
                let label = if disk {
                    format!("{n} nodes + disk")
                } else {
                    format!("{n} nodes")
                };
                eprintln!(
                    "cluster-bench: {label}, {}: {runs} kills",
                    if hog { "CPU hog" } else { "idle" }
                );
                match latencies(&bins, n, disk, runs, opts.keep) {
                    Ok(samples) => {
                        for owner in DiskOwner::ALL {
                            let ms: Vec<f64> = samples
                                .iter()
                                .filter(|s| s.disk_owner == owner)
                                .map(|s| s.ms)
                                .collect();
                            if ms.is_empty() {
                                continue;
                            }
                            let ms = sorted(ms);
                            table.row(vec![
                                label.clone(),
                                if hog { "CPU hog" } else { "idle" }.into(),
                                owner.label().into(),
                                ms.len().to_string(),
                                fmt_ms(percentile(&ms, 50.0)),
                                fmt_ms(percentile(&ms, 99.0)),
                                fmt_ms(ms.last().copied().unwrap_or(f64::NAN)),
                            ]);
                        }
                    }
                    Err(e) => {
                        harness::check_interrupted()?;
                        eprintln!("cluster-bench: {label}: {e:#}");
                        table.row(vec![
                            label,
                            if hog { "CPU hog" } else { "idle" }.into(),
                            format!("FAILED: {}", one_line(&e)),
                        ]);
                    }
                }
            }
        }
        harness::emit(
            &mut doc,
            &format!(
                "## Time from kill -9 of a node's watchd to the survivors' new view\n\n{}\n",
                table.render()
            ),
        );
    }
    if opts.suspicions {
        eprintln!(
            "cluster-bench: {SUSPICION_NODES} nodes under a CPU hog for {}s",
            hog_for.as_secs()
        );
        let mut table = Table::new(&[
            "cluster",
            "load",
            "period",
            "false suspicions",
            "view changes",
            "stopped acting",
        ]);
        let r = suspicions(&bins, SUSPICION_NODES, hog_for, cores, opts.keep)?;
        table.row(vec![
            format!("{SUSPICION_NODES} nodes"),
            format!("CPU hog ({cores} loops)"),
            format!("{} s", hog_for.as_secs()),
            r.suspected.to_string(),
            r.views.to_string(),
            r.not_acting.to_string(),
        ]);
        harness::emit(
            &mut doc,
            &format!(
                "## False suspicions under a CPU hog (no node fails)\n\n{}\nCounted over every \
                 node's events: `suspected` events, committed views after the first, and \
                 `not_acting` events.\n",
                table.render()
            ),
        );
    }
    if let Some(out) = &opts.out {
        std::fs::write(out, &doc).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// Who owned the quorum disk when the victim was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskOwner {
    NoDisk,
    /// The survivor must wait out the victim's lease before it takes the disk over.
    Victim,
    /// The survivor keeps the disk.
    Survivor,
    /// The survivor acquires a disk nobody renews.
    Nobody,
}

impl DiskOwner {
    const ALL: [DiskOwner; 4] = [
        DiskOwner::NoDisk,
        DiskOwner::Victim,
        DiskOwner::Survivor,
        DiskOwner::Nobody,
    ];

    fn label(self) -> &'static str {
        match self {
            DiskOwner::NoDisk => "any node",
            DiskOwner::Victim => "the disk's owner",
            DiskOwner::Survivor => "the other node (the survivor owns the disk)",
            DiskOwner::Nobody => "a node (nobody owned the disk)",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    ms: f64,
    disk_owner: DiskOwner,
}

/// `runs` kills of a node of an `n`-node cluster (with a quorum disk when `disk`).
fn latencies(bins: &Path, n: usize, disk: bool, runs: usize, keep: bool) -> Result<Vec<Sample>> {
    let mut c = Cluster::start(bins, n, disk, keep)?;
    let all: Vec<usize> = (0..n).collect();
    c.wait_view(&all, &all)?;
    let mut samples = Vec::with_capacity(runs);
    for run in 0..runs {
        harness::sleep(BEFORE_KILL)?;
        // With a disk, every other kill hits its owner (the survivor must wait out the lease
        // before it takes the disk over) and the others the node without it.
        let owner = if disk {
            let s = c.status(0)?;
            s["quorum"]["disk_owner"]
                .as_str()
                .and_then(|o| NAMES.iter().position(|n| *n == o))
        } else {
            None
        };
        let victim = match owner {
            Some(o) if run % 2 == 0 => o,
            Some(o) => (o + 1) % n,
            None => run % n,
        };
        let survivors: Vec<usize> = all.iter().copied().filter(|i| *i != victim).collect();
        let disk_owner = match owner {
            _ if !disk => DiskOwner::NoDisk,
            Some(o) if o == victim => DiskOwner::Victim,
            Some(_) => DiskOwner::Survivor,
            None => DiskOwner::Nobody,
        };
        let after: Vec<u64> = survivors
            .iter()
            .map(|i| c.last_seq(*i))
            .collect::<Result<_>>()?;
        let t0 = real_ns();
        c.kill9(victim)?;
        c.wait_view(&survivors, &survivors)?;
        let mut latest: Option<u64> = None;
        for (i, seq) in survivors.iter().zip(&after) {
            let t = c
                .view_time(*i, *seq, &survivors)?
                .with_context(|| format!("node {} logged no view without the victim", NAMES[*i]))?;
            latest = Some(latest.map_or(t, |l| l.max(t)));
        }
        let latest = latest.context("no survivors")?;
        // Milliseconds of the real-time clock against its nanoseconds at the kill.
        #[allow(clippy::cast_precision_loss)]
        let ms = (latest as f64 * 1e6 - t0 as f64) / 1e6;
        eprintln!(
            "cluster-bench:   kill -9 of {} ({}): {ms:.0} ms",
            NAMES[victim],
            disk_owner.label()
        );
        samples.push(Sample { ms, disk_owner });
        c.start_node(victim)?;
        c.wait_view(&all, &all)?;
    }
    Ok(samples)
}

#[derive(Debug, Default)]
struct Suspicions {
    suspected: u64,
    views: u64,
    not_acting: u64,
}

/// An `n`-node cluster left alone for `period` while a CPU hog runs.
fn suspicions(
    bins: &Path,
    n: usize,
    period: Duration,
    cores: usize,
    keep: bool,
) -> Result<Suspicions> {
    let c = Cluster::start(bins, n, false, keep)?;
    let all: Vec<usize> = (0..n).collect();
    c.wait_view(&all, &all)?;
    harness::sleep(BEFORE_KILL)?;
    let after: Vec<u64> = all.iter().map(|i| c.last_seq(*i)).collect::<Result<_>>()?;
    let hog = Hog::start(cores)?;
    harness::sleep(period)?;
    drop(hog);
    let mut r = Suspicions::default();
    for (i, seq) in all.iter().zip(&after) {
        for e in c.events(*i)? {
            if e["seq"].as_u64().unwrap_or(0) <= *seq {
                continue;
            }
            match e["kind"].as_str() {
                Some("suspected") => r.suspected += 1,
                Some("view") => r.views += 1,
                Some("not_acting") => r.not_acting += 1,
                _ => {}
            }
        }
    }
    Ok(r)
}

/// `cores` busy loops at normal priority, killed when dropped.
struct Hog {
    children: Vec<Child>,
}

impl Hog {
    fn start(cores: usize) -> Result<Hog> {
        let mut children = Vec::new();
        for _ in 0..cores {
            children.push(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting a CPU hog")?,
            );
        }
        Ok(Hog { children })
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Node {
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Watchd processes on loopback, one data directory each; stopped when dropped.
struct Cluster {
    bins: PathBuf,
    dir: Option<tempfile::TempDir>,
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(bins: &Path, n: usize, disk: bool, keep: bool) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("ftkit-cluster-bench-")
            .tempdir()
            .context("creating the scratch directory")?;
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET)?;
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let data = dir.path().join(NAMES[i]);
            let mut text = format!(
                "[watchd]\nnode = \"{}\"\ndata_dir = \"{}\"\ncgroups = false\n\n[cluster]\n\
                 name = \"bench\"\nsecret_file = \"{}\"\nlisten = [\"127.0.0.1:{}\"]\n",
                NAMES[i],
                data.display(),
                secret.display(),
                ports[i]
            );
            if disk {
                let _ = write!(
                    text,
                    "quorum = \"disk\"\nquorum_disk = \"{}\"\n",
                    dir.path().join("quorum.disk").display()
                );
            }
            for j in (0..n).filter(|j| *j != i) {
                let _ = write!(
                    text,
                    "\n[[node]]\nname = \"{}\"\naddresses = [\"127.0.0.1:{}\"]\n",
                    NAMES[j], ports[j]
                );
            }
            let config = dir.path().join(format!("{}.toml", NAMES[i]));
            std::fs::write(&config, text)?;
            nodes.push(Node {
                config,
                socket: data.join("control.sock"),
                log: dir.path().join(format!("{}.log", NAMES[i])),
                child: None,
            });
        }
        let mut c = Cluster {
            bins: bins.to_owned(),
            dir: Some(dir),
            nodes,
        };
        if keep && let Some(d) = c.dir.take() {
            eprintln!("cluster-bench: keeping {}", d.keep().display());
        }
        for i in 0..n {
            c.start_node(i)?;
        }
        Ok(c)
    }

    fn start_node(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(self.bins.join("watchd"))
            .arg("--config")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting watchd")?;
        node.child = Some(child);
        let end = Instant::now() + CONTROL_UP_TIMEOUT;
        while harness::control(&node.socket, &json!({"op": "cluster_status"})).is_err() {
            if Instant::now() >= end {
                bail!(
                    "watchd {} did not come up; its log:\n{}",
                    NAMES[i],
                    self.log_tail(i)
                );
            }
            harness::sleep(POLL)?;
        }
        Ok(())
    }

    fn kill9(&mut self, i: usize) -> Result<()> {
        let Some(mut child) = self.nodes[i].child.take() else {
            bail!("node {} is not running", NAMES[i]);
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid")?);
        signal::kill(pid, Signal::SIGKILL).context("kill -9")?;
        child.wait()?;
        Ok(())
    }

    fn status(&self, i: usize) -> Result<Value> {
        let v = harness::control(&self.nodes[i].socket, &json!({"op": "cluster_status"}))?;
        if v["result"] != "cluster" {
            bail!("node {} answered {v}", NAMES[i]);
        }
        Ok(v)
    }

    fn events(&self, i: usize) -> Result<Vec<Value>> {
        let v = harness::control(
            &self.nodes[i].socket,
            &json!({"op": "cluster_events", "last": null}),
        )?;
        Ok(v["events"].as_array().cloned().unwrap_or_default())
    }

    fn last_seq(&self, i: usize) -> Result<u64> {
        Ok(self
            .events(i)?
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0))
    }

    /// `time_ms` of node `i`'s first `view` event after `seq` whose members are `members`.
    fn view_time(&self, i: usize, seq: u64, members: &[usize]) -> Result<Option<u64>> {
        let want: Vec<&str> = members.iter().map(|m| NAMES[*m]).collect();
        Ok(self.events(i)?.iter().find_map(|e| {
            if e["kind"] != "view" || e["seq"].as_u64().unwrap_or(0) <= seq {
                return None;
            }
            let detail = e["detail"].as_str()?;
            let (_, rest) = detail.split_once("): ")?;
            let listed: Vec<&str> = rest.split(';').next()?.split_whitespace().collect();
            (listed == want).then(|| e["time_ms"].as_u64()).flatten()
        }))
    }

    /// Waits until every node of `nodes` committed the same view of exactly `members` and
    /// acts.
    fn wait_view(&self, nodes: &[usize], members: &[usize]) -> Result<()> {
        let want: Vec<&str> = members.iter().map(|m| NAMES[*m]).collect();
        let end = Instant::now() + VIEW_TIMEOUT;
        loop {
            let all: Vec<Value> = nodes
                .iter()
                .map(|i| self.status(*i))
                .collect::<Result<_>>()?;
            let ok = all.iter().all(|s| {
                let m: Vec<&str> = s["members"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                m == want && s["acting"] == true && s["epoch"] == all[0]["epoch"]
            });
            if ok {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!(
                    "no agreement on {want:?} within {VIEW_TIMEOUT:?}: {:?}",
                    all.iter()
                        .map(|s| (s["node"].clone(), s["epoch"].clone(), s["members"].clone()))
                        .collect::<Vec<_>>()
                );
            }
            harness::sleep(POLL)?;
        }
    }

    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let start = text.len().saturating_sub(3000);
        text.get(start..).unwrap_or(&text).to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = &n.child
                && let Ok(pid) = i32::try_from(c.id())
            {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let end = Instant::now() + STOP_TIMEOUT;
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                while Instant::now() < end && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(POLL);
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

fn fmt_ms(ms: f64) -> String {
    if ms.is_nan() {
        "-".into()
    } else {
        format!("{ms:.0}")
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}
