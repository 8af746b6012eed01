//! The failover benchmark (issue 6): how long after the owner host of an `examples/kv` group
//! dies the kv service answers again on the new owner, cold standby (kv started there, recovering
//! the shipped checkpoint and the replicated log) and warm standby (a standby kv on the backups,
//! promoted in place: the service resource's `standby = "warm"`), for 1 and 100 groups, with
//! states of 1 MiB and 100 MiB, and with a replication backlog (an async fileset and a writer
//! running until the fault).
//!
//! Run: `cargo build --release --workspace && cargo bench -p ftkit-tests --bench failover`
//! (`-- --quick` for a short run, `-- --runs N` repetitions per row, `-- --groups N` instead
//! of 100, `-- --only cold,warm,one,many,state,backlog` to pick rows, `-- --out FILE` to also
//! write the markdown, `-- --heartbeat-ms MS` for a cluster heartbeat other than the default
//! 100 ms: failure detection takes five of them). Three watchd nodes run in network namespaces (tests/src/cluster.rs);
//! the client runs in the namespace of the lab's switch, with an address on its bridge. It
//! prints tables; it asserts nothing about the numbers, and a row that cannot be measured says
//! why instead.
//!
//! A sample is the time from just before the owner host dies (its veth goes down, then its
//! watchd and every process of its namespace are killed with SIGKILL) to the first `GET` of a
//! key written before the fault that the client gets answered with the right value through the
//! group's virtual address, polling every few milliseconds. Between samples the dead host boots
//! again and the group fails back (`failback = "immediate"`), so every sample starts from the
//! same layout (owner a, backups b and c; the new owner is always b).

#[allow(dead_code)]
#[path = "watchd/harness.rs"]
mod harness;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ftkit_tests::cluster::{Cluster, NAMES, pids_in_netns};
use ftkit_tests::{binary, json_lines, pid_of, q, q_list};
use serde_json::Value;

use harness::{Table, percentile, real_ns, sorted};

const USAGE: &str = "usage: failover-bench [--quick] [--runs N] [--groups N] [--out FILE] \
[--only cold,warm,one,many,state,backlog] [--heartbeat-ms MS]; with FAILOVER_BENCH_TRACE=1 in \
the environment, each sample prints b's and c's cluster events and b's group journal";
/// The environment variable that asks for each sample's events and journal on stderr.
const TRACE_VAR: &str = "FAILOVER_BENCH_TRACE";
/// Events from this long before the kill are traced too (the survivors stop acting before
/// they suspect the dead node).
const TRACE_BEFORE_MS: f64 = 300.0;

/// Repetitions of a one-group row (full run / --quick).
const RUNS: usize = 20;
const RUNS_QUICK: usize = 2;
/// Repetitions of a heavy row (100 groups, 100 MiB) (full run / --quick).
const HEAVY_RUNS: usize = 5;
const HEAVY_RUNS_QUICK: usize = 1;
/// Groups of the "many groups" rows.
const MANY_GROUPS: usize = 100;
/// At most this many groups: their virtual addresses are `.100` up to `.249` of the lab's /24.
const MAX_GROUPS: usize = 150;
/// Groups per `ftctl group apply` (a control request is at most 64 KiB).
const GROUPS_PER_APPLY: usize = 10;
/// How often one group file is applied when the node is too busy to answer in time.
const APPLY_TRIES: usize = 10;
/// Pause before such a retry.
const APPLY_PAUSE: Duration = Duration::from_secs(1);
/// The first virtual address's last octet.
const VIP_BASE: usize = 100;
/// The client's address on the switch's bridge (last octet).
const CLIENT_OCTET: u8 = 250;
/// kv of group `i` listens on this port + i (on every address of its node).
const KV_PORT_BASE: u16 = 7500;
/// The preloaded states (bytes of values) of the state rows.
const STATE_SMALL: u64 = 1 << 20;
const STATE_LARGE: u64 = 100 << 20;
/// The size of each value `kv --preload` adds.
const PRELOAD_VALUE_BYTES: usize = 4000;
/// Lines of b's kv log printed when its state is found wrong.
const LOG_LINES_ON_FAILURE: usize = 30;
/// How often the client polls.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// How long the client waits for a TCP connection before it tries again: short, because a
/// SYN sent to the dead owner's MAC is only retransmitted after a second.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(50);
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a failover may take before the sample counts as failed.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the groups may take to come (back) online on their first owner, and the warm
/// standbys to run on the backups.
const LAYOUT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the new owner's journal may take to show the group online after kv answered.
const JOURNAL_TIMEOUT: Duration = Duration::from_secs(10);
/// More failovers of a group than host deaths plus this while waiting for the layout: the
/// group does not settle (a resource keeps failing).
const LAYOUT_FAILOVERS: u64 = 3;
/// How long a warm standby may take to answer on a backup once its group is online.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a marker write may take (kv may still be recovering).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two status polls.
const POLL: Duration = Duration::from_millis(50);
/// Pause after the layout is back before the next fault: every member vouches for every other
/// again and the backups' replicas settle.
const BEFORE_KILL: Duration = Duration::from_millis(1000);
/// Backlog rows: how long the writer runs before the fault.
const BACKLOG_WRITING: Duration = Duration::from_secs(3);
/// Backlog rows: the size of each value the writer sets (kv takes at most 4096 bytes).
const BACKLOG_VALUE_BYTES: usize = 4000;
/// Backlog rows: how long the marker is given to reach the backups before the writer starts.
const MARKER_SETTLE: Duration = Duration::from_millis(500);
/// Longest wait for a preloaded state's checkpoint to reach b before a fault.
const SHIP_TIMEOUT: Duration = Duration::from_secs(120);

/// Resource timeouts of the benchmark's groups (the offline ones bound how long an old owner
/// may take to stop, which a new owner may have to wait out).
const FILESET_OFFLINE: &str = "2s";
const IP_OFFLINE: &str = "1s";
const KV_OFFLINE: &str = "2s";
/// kv's stop grace (SIGTERM, then SIGKILL), inside its offline timeout.
const KV_STOP_GRACE: &str = "1s";
/// Online timeouts: a 100 MiB recovery, a long replay drain.
const ONLINE_TIMEOUT: &str = "120s";
/// Each fileset's operation ring (small: 100 groups × 3 nodes have one each).
const RING_SIZE: &str = "1MiB";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cold,
    Warm,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Cold => "cold",
            Mode::Warm => "warm",
        }
    }

    /// The p99 target (small state), ms.
    fn target_ms(self) -> f64 {
        match self {
            Mode::Cold => 2000.0,
            Mode::Warm => 1000.0,
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    mode: Mode,
    groups: usize,
    /// Bytes kv preloads (0: a few keys only: "small state").
    preload: u64,
    /// An async data fileset and a writer running until the fault.
    backlog: bool,
    runs: usize,
    /// The cluster's heartbeat interval when not the default (ms).
    heartbeat_ms: Option<u64>,
}

impl Scenario {
    fn state_label(&self) -> String {
        let state = match self.preload {
            0 => "small".to_owned(),
            b if b >= 1 << 20 => format!("{} MiB", b >> 20),
            b => format!("{b} B"),
        };
        let state = if self.backlog {
            format!("{state}, async + writer")
        } else {
            state
        };
        match self.heartbeat_ms {
            Some(ms) => format!("{state}, {ms} ms heartbeats"),
            None => state,
        }
    }

    /// Whether the issue's targets apply (small state, sync replication).
    fn has_target(&self) -> bool {
        self.preload == 0 && !self.backlog
    }
}

#[derive(Debug)]
struct Options {
    quick: bool,
    runs: Option<usize>,
    groups: usize,
    out: Option<PathBuf>,
    only: Vec<String>,
    /// `[cluster.timing] heartbeat_interval` instead of the default (ms).
    heartbeat_ms: Option<u64>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        quick: false,
        runs: None,
        groups: MANY_GROUPS,
        out: None,
        only: Vec::new(),
        heartbeat_ms: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--runs" => o.runs = Some(args.next().context(USAGE)?.parse().context(USAGE)?),
            "--groups" => {
                o.groups = args.next().context(USAGE)?.parse().context(USAGE)?;
                if !(2..=MAX_GROUPS).contains(&o.groups) {
                    bail!("--groups: 2 to {MAX_GROUPS}");
                }
            }
            "--out" => o.out = Some(args.next().context(USAGE)?.into()),
            "--heartbeat-ms" => {
                let ms: u64 = args.next().context(USAGE)?.parse().context(USAGE)?;
                if !(10..=1000).contains(&ms) {
                    bail!("--heartbeat-ms: 10 to 1000");
                }
                o.heartbeat_ms = Some(ms);
            }
            "--only" => {
                for part in args.next().context(USAGE)?.split(',') {
                    if !["cold", "warm", "one", "many", "state", "backlog"].contains(&part) {
                        bail!("unknown row set {part:?}; {USAGE}");
                    }
                    o.only.push(part.to_owned());
                }
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    Ok(o)
}

/// The rows, in the order they run.
fn scenarios(o: &Options) -> Vec<Scenario> {
    let runs = o
        .runs
        .unwrap_or(if o.quick { RUNS_QUICK } else { RUNS })
        .max(1);
    let heavy = o
        .runs
        .unwrap_or(if o.quick {
            HEAVY_RUNS_QUICK
        } else {
            HEAVY_RUNS
        })
        .max(1);
    let row = |mode, groups, preload, backlog, runs| Scenario {
        mode,
        groups,
        preload,
        backlog,
        runs,
        heartbeat_ms: o.heartbeat_ms,
    };
    let has = |set: &str| o.only.iter().any(|s| s == set);
    let any_mode = !has("cold") && !has("warm");
    let any_kind = !["one", "many", "state", "backlog"].iter().any(|k| has(k));
    let mut all = Vec::new();
    for mode in [Mode::Cold, Mode::Warm] {
        if !any_mode && !has(mode.label()) {
            continue;
        }
        let picked = |kind: &str| any_kind || has(kind);
        if picked("one") {
            all.push(row(mode, 1, 0, false, runs));
        }
        if picked("many") {
            all.push(row(mode, o.groups, 0, false, heavy));
        }
        if picked("state") {
            all.push(row(mode, 1, STATE_SMALL, false, runs));
            all.push(row(mode, 1, STATE_LARGE, false, heavy));
        }
        if picked("backlog") {
            all.push(row(mode, 1, 0, true, runs));
        }
    }
    all
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failover-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let opts = parse_args()?;
    harness::install_interrupt_handler()?;
    harness::become_subreaper()?;
    let _sweep = harness::SweepGuard;
    // The helpers of ftkit_tests panic with their diagnostics; a row catches that and fails.
    for b in ["watchd", "ftctl", "kv"] {
        let path = ftkit_tests::target_dir().join(b);
        if !path.is_file() {
            bail!(
                "{} not found: run `cargo build --release --workspace` first",
                path.display()
            );
        }
    }
    let _inotify = InotifyInstances::at_least(INOTIFY_INSTANCES)?;
    let mut doc = String::new();
    harness::emit(&mut doc, &header(&opts));
    let mut table = Table::new(&[
        "standby",
        "groups",
        "state",
        "runs",
        "p50 ms",
        "p99 ms",
        "max ms",
        "per group p50/p99 ms",
        "backlog at fault",
        "target (p99)",
        "verdict",
    ]);
    let mut parts = Table::new(&[
        "standby",
        "groups",
        "state",
        "kill → new view",
        "view → assigned",
        "queued for a turn",
        "fence wait",
        "resources online",
        "online → kv answers",
    ]);
    for s in scenarios(&opts) {
        harness::check_interrupted()?;
        eprintln!(
            "failover-bench: {} standby, {} group(s), state {}: {} run(s)",
            s.mode.label(),
            s.groups,
            s.state_label(),
            s.runs
        );
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(&s)))
            .unwrap_or_else(|p| Err(anyhow::anyhow!("{}", panic_text(&p))));
        let head = vec![
            s.mode.label().to_owned(),
            s.groups.to_string(),
            s.state_label(),
        ];
        match outcome {
            Ok(r) => {
                let all = sorted(r.all_answered.clone());
                let per = sorted(r.per_group.clone());
                let p99 = percentile(&all, 99.0);
                let (target, verdict) = if s.has_target() {
                    let t = s.mode.target_ms();
                    (
                        format!("≤ {t:.0} ms"),
                        if p99 <= t { "met" } else { "missed" }.to_owned(),
                    )
                } else {
                    ("-".to_owned(), "(no target)".to_owned())
                };
                let mut row = head.clone();
                row.extend([
                    all.len().to_string(),
                    fmt_ms(percentile(&all, 50.0)),
                    fmt_ms(p99),
                    fmt_ms(all.last().copied().unwrap_or(f64::NAN)),
                    if s.groups > 1 {
                        format!(
                            "{} / {}",
                            fmt_ms(percentile(&per, 50.0)),
                            fmt_ms(percentile(&per, 99.0))
                        )
                    } else {
                        "-".to_owned()
                    },
                    r.backlog.clone().unwrap_or_else(|| "-".to_owned()),
                    target,
                    verdict,
                ]);
                table.row(row);
                let mut row = head;
                for part in &r.parts {
                    let v = sorted(part.clone());
                    row.push(if v.is_empty() {
                        "?".to_owned()
                    } else {
                        fmt_ms(percentile(&v, 50.0))
                    });
                }
                parts.row(row);
            }
            Err(e) => {
                harness::check_interrupted()?;
                eprintln!("failover-bench: row failed: {e:#}");
                let mut row = head;
                row.push(format!("FAILED: {}", one_line(&e)));
                table.row(row);
            }
        }
    }
    harness::emit(
        &mut doc,
        &format!(
            "## Time from the owner host's death to kv answering on the new owner\n\n{}\n\
             A sample ends at the first `GET` of a key written before the fault answered with \
             its value through the group's address; with N groups, at the last group's answer \
             (per group: every group's own time, all samples). Backlog: the async data \
             fileset's operations (and bytes) not acknowledged by the new owner when the old \
             one died, median over the samples.\n\n",
            table.render()
        ),
    );
    harness::emit(
        &mut doc,
        &format!(
            "## Where the time goes (p50 over samples and groups, ms)\n\n{}\n\
             From the new owner's cluster events (its `view` without the dead node) and its \
             group journal (`groups.jsonl`: the ownership it saw assigned, `queued` when it \
             had to wait for one of the node's turns to bring a group online, `waiting` for \
             the previous owner to stop, `onlining`, `online`), and the client's first \
             answer.\n",
            parts.render()
        ),
    );
    if let Some(out) = &opts.out {
        std::fs::write(out, &doc).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// Every copy-mode fileset's pump holds one inotify instance on its node, and all three nodes
/// run as root on this host: 100 groups' checkpoint filesets (on two nodes at once during a
/// failback) need more than the kernel's default of 128 per user.
const INOTIFY_INSTANCES: u64 = 1024;
/// Where the per-user limit of inotify instances is.
const INOTIFY_LIMIT: &str = "/proc/sys/fs/inotify/max_user_instances";

/// Raises the per-user inotify instance limit for the run; puts the old value back on drop.
struct InotifyInstances(Option<u64>);

impl InotifyInstances {
    fn at_least(n: u64) -> Result<InotifyInstances> {
        let old: u64 = std::fs::read_to_string(INOTIFY_LIMIT)
            .with_context(|| format!("reading {INOTIFY_LIMIT}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {INOTIFY_LIMIT}"))?;
        if old >= n {
            return Ok(InotifyInstances(None));
        }
        std::fs::write(INOTIFY_LIMIT, n.to_string())
            .with_context(|| format!("raising {INOTIFY_LIMIT} to {n} (run as root)"))?;
        eprintln!("failover-bench: {INOTIFY_LIMIT} raised from {old} to {n} for this run");
        Ok(InotifyInstances(Some(old)))
    }
}

impl Drop for InotifyInstances {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            let _ = std::fs::write(INOTIFY_LIMIT, old.to_string());
        }
    }
}

fn header(opts: &Options) -> String {
    format!(
        "# Failover of examples/kv ({})\n\n{}; {}; commit {}; binaries from {}.\n\
         Three watchd nodes (a, b, c) in network namespaces on one bridge, default cluster \
         timings; each group: preferred owners a, b, c, failback immediate; resources: a \
         replay-mode fileset with kv's log (sync, or async in the backlog rows), a copy-mode \
         checkpoint fileset of kv's checkpoint directory (quiet 20ms), a virtual address, and \
         kv (checkpoint per request) depending on the three; warm rows add `standby = \"warm\"` \
         to the service resource. Offline timeouts: filesets {FILESET_OFFLINE}, address \
         {IP_OFFLINE}, kv {KV_OFFLINE} (stop grace {KV_STOP_GRACE}); a new owner after a lost \
         one first waits out what is left of the old owner's stop bound (the fence wait of the \
         second table). fs.inotify.max_user_instances is raised to {INOTIFY_INSTANCES} for the \
         run (one inotify instance per copy-mode pump; 128 by default).\n\
         Targets (issue 6, small state): warm ≤ 1 s p99, cold ≤ 2 s p99. For scale: MSCS \
         failover is \"typically under a minute\", Pacemaker with SBD defaults about 15-30 s.\n\n",
        if opts.quick { "--quick" } else { "full" },
        machine(),
        load(),
        commit(),
        ftkit_tests::target_dir().display(),
    )
}

/// What one row measured.
#[derive(Debug, Default)]
struct Measured {
    /// Per sample: until every group answered, ms.
    all_answered: Vec<f64>,
    /// Per sample and group, ms.
    per_group: Vec<f64>,
    /// kill → view, view → assigned, queued, fence wait, resources online, online → answer
    /// (ms).
    parts: [Vec<f64>; 6],
    /// The backlog at the fault, as text.
    backlog: Option<String>,
}

/// One row: a fresh cluster, the groups online on a, then `runs` deaths of a.
fn measure(s: &Scenario) -> Result<Measured> {
    let mut lab = Lab::start(s)?;
    let mut m = Measured::default();
    let mut backlog_ops = Vec::new();
    let mut backlog_bytes = Vec::new();
    for rep in 0..s.runs {
        harness::check_interrupted()?;
        lab.wait_layout()?;
        harness::sleep(BEFORE_KILL)?;
        let sample = lab.sample(rep)?;
        eprintln!(
            "failover-bench:   sample {}: all answered after {:.0} ms{}",
            rep + 1,
            sample.all_ms,
            sample
                .backlog
                .map(|(ops, bytes)| format!(" (backlog {ops} ops, {bytes} bytes)"))
                .unwrap_or_default()
        );
        m.all_answered.push(sample.all_ms);
        m.per_group.extend(sample.per_group);
        for (i, part) in sample.parts.into_iter().enumerate() {
            m.parts[i].extend(part);
        }
        if let Some((ops, bytes)) = sample.backlog {
            #[allow(clippy::cast_precision_loss)]
            {
                backlog_ops.push(ops as f64);
                backlog_bytes.push(bytes as f64);
            }
        }
        lab.boot_a()?;
    }
    if s.backlog {
        let ops = sorted(backlog_ops);
        let bytes = sorted(backlog_bytes);
        m.backlog = Some(format!(
            "{:.0} ops ({:.0} KiB)",
            percentile(&ops, 50.0),
            percentile(&bytes, 50.0) / 1024.0
        ));
    }
    Ok(m)
}

/// One sample's figures.
#[derive(Debug)]
struct Sample {
    all_ms: f64,
    per_group: Vec<f64>,
    parts: [Vec<f64>; 6],
    backlog: Option<(u64, u64)>,
}

/// The cluster of one row and the client's namespace.
struct Lab {
    s: Scenario,
    c: Cluster,
    /// The switch namespace's `/run/netns` path, where the client runs.
    client_ns: String,
    subnet: [u8; 3],
    /// Host deaths caused so far (each is one failover of every group).
    deaths: u64,
}

impl Lab {
    fn start(s: &Scenario) -> Result<Lab> {
        let mut c = Cluster::new("fo-bench", 3, 1, false);
        let own = c.lab.addr(0).octets();
        let subnet = [own[0], own[1], own[2]];
        c.extra = node_config(s)?;
        if let Some(ms) = s.heartbeat_ms {
            c.extra.push_str(&format!(
                "\n[cluster.timing]\nheartbeat_interval = \"{ms}ms\"\n"
            ));
        }
        // Rings in the scratch directory, not /dev/shm, so that nothing outlives the row.
        let rings = c.shared.path().join("rings");
        std::fs::create_dir_all(&rings).context("creating the ring directory")?;
        c.settings = format!("ring_dir = {}", q(&rings));
        c.start_all();
        c.wait_view(&[0, 1, 2], &[0, 1, 2]);
        let switch = c.lab.switch().to_owned();
        let client = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], CLIENT_OCTET);
        ip(&[
            "-n",
            &switch,
            "addr",
            "add",
            &format!("{client}/24"),
            "dev",
            "br0",
        ])?;
        let lab = Lab {
            s: *s,
            c,
            client_ns: format!("/run/netns/{switch}"),
            subnet,
            deaths: 0,
        };
        // A few groups per file: one control request is at most 64 KiB.
        let all: Vec<usize> = (0..s.groups).collect();
        for (k, chunk) in all.chunks(GROUPS_PER_APPLY).enumerate() {
            let path = lab
                .c
                .shared
                .write(&format!("groups-{k}.toml"), &group_file(s, chunk, subnet));
            // Applying a file again changes nothing, so a busy node's timeout (and the refusal
            // of a file applied again before the first apply's updates were in) is retried.
            let mut tries = 0;
            loop {
                let out =
                    lab.c
                        .node(0)
                        .ftctl(&["group", "apply", path.to_str().context("utf-8 path")?]);
                if out.status.success() {
                    break;
                }
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                tries += 1;
                let busy = err.contains("did not answer") || err.contains("apply the file again");
                if !busy || tries >= APPLY_TRIES {
                    bail!(
                        "ftctl group apply: {}{err}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
                harness::sleep(APPLY_PAUSE)?;
            }
        }
        Ok(lab)
    }

    /// Every node's journaled policy decisions on group `g` (its status line), for an error.
    fn decisions(&self, g: &Value) -> Vec<String> {
        (0..3)
            .flat_map(|i| {
                read_journal(self.c.node(i).data_dir())
                    .into_iter()
                    .filter(|r| r["kind"] == "decision" && r["group"] == g["name"])
                    .map(move |r| format!("{} at {}: {}", NAMES[i], r["time_ms"], r["detail"]))
            })
            .collect()
    }

    fn vip(&self, g: usize) -> Ipv4Addr {
        let [x, y, z] = self.subnet;
        Ipv4Addr::new(x, y, z, octet(VIP_BASE + g))
    }

    fn kv_addr(&self, g: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip(g), kv_port(g))
    }

    /// `ftctl group status --json` of node `i`, by group name.
    fn groups(&self, i: usize) -> Result<BTreeMap<String, Value>> {
        let out = self.c.node(i).ftctl(&["group", "status", "--json"]);
        if !out.status.success() {
            bail!(
                "ftctl group status on {}: {}",
                NAMES[i],
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(json_lines(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .filter_map(|g| Some((g["name"].as_str()?.to_owned(), g)))
            .collect())
    }

    /// The kv services' pids on node `i` (running ones).
    fn kv_pids(&self, i: usize) -> BTreeMap<String, u32> {
        self.c
            .node(i)
            .status()
            .iter()
            .filter(|s| s["state"] == "running")
            .filter_map(|s| Some((s["name"].as_str()?.to_owned(), pid_of(s)?)))
            .collect()
    }

    /// Waits until every group is online on a (as b sees it) and, warm, a standby answers on b
    /// for every group.
    fn wait_layout(&self) -> Result<()> {
        let end = Instant::now() + LAYOUT_TIMEOUT;
        let on_a = |g: &Value| g["state"] == "online" && g["owner"] == NAMES[0];
        loop {
            harness::check_interrupted()?;
            // A node busy starting a hundred groups may answer late: ask again.
            let groups = match self.groups(1) {
                Ok(g) => g,
                Err(e) if Instant::now() < end && e.to_string().contains("did not answer") => {
                    harness::sleep(POLL)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let online = (0..self.s.groups)
                .filter(|g| groups.get(&group_name(*g)).is_some_and(on_a))
                .count();
            if online == self.s.groups {
                break;
            }
            // A group that fails over again and again will not settle: say why at once.
            if let Some(g) = groups.values().find(|g| {
                g["failovers_in_period"].as_u64().unwrap_or(0) > self.deaths + LAYOUT_FAILOVERS
            }) {
                // Each node's journal says why its last run of the group failed.
                let broken: Vec<String> = (0..3)
                    .filter_map(|i| {
                        let journal = read_journal(self.c.node(i).data_dir());
                        let last = journal.iter().rev().find(|r| {
                            r["kind"] == "resource"
                                && r["group"] == g["name"]
                                && r["state"] == "failed"
                        })?;
                        Some(format!(
                            "on {}: {} {}",
                            NAMES[i], last["resource"], last["detail"]
                        ))
                    })
                    .collect();
                let decided = self.decisions(g);
                bail!(
                    "group {} keeps failing ({} failovers; {online} of {} groups online on a): \
                     {}; decisions: {}",
                    g["name"],
                    g["failovers_in_period"],
                    self.s.groups,
                    broken.join("; "),
                    decided.join("; ")
                );
            }
            if Instant::now() >= end {
                // The groups that are not there yet, with what the database says of them.
                let mut not_yet = groups.values().filter(|g| !on_a(g)).peekable();
                // The policy's word on the first of them, from the nodes' journals.
                let decided = not_yet
                    .peek()
                    .map(|g| self.decisions(g))
                    .unwrap_or_default();
                let stuck: Vec<String> = not_yet
                    .take(5)
                    .map(|g| {
                        format!(
                            "{} {} on {} at epoch {} ({})",
                            g["name"], g["state"], g["owner"], g["epoch"], g["reason"]
                        )
                    })
                    .collect();
                bail!(
                    "{online} of {} groups online on a after {LAYOUT_TIMEOUT:?}; not yet: {}; \
                     decisions: {}",
                    self.s.groups,
                    stuck.join("; "),
                    decided.join("; ")
                );
            }
            harness::sleep(POLL)?;
        }
        if self.s.mode == Mode::Warm {
            let b = self.c.lab.addr(1);
            let targets: Vec<SocketAddrV4> = (0..self.s.groups)
                .map(|g| SocketAddrV4::new(b, kv_port(g)))
                .collect();
            let ns = self.client_ns.clone();
            in_netns(&ns, move || {
                let end = Instant::now() + STANDBY_TIMEOUT;
                for t in &targets {
                    loop {
                        let reply = match call(*t, "PING") {
                            Ok(r) => r,
                            Err(e) => format!("nothing ({e})"),
                        };
                        if reply == "PONG standby" {
                            break;
                        }
                        if Instant::now() >= end {
                            bail!(
                                "no warm standby on b: kv at {t} answers {reply} to PING \
                                 {STANDBY_TIMEOUT:?} after the group came online on a (does \
                                 this watchd support the service resource's standby = \
                                 \"warm\"?)"
                            );
                        }
                        harness::sleep(POLL)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Writes the markers, kills host a, polls until every group answers on b.
    fn sample(&mut self, rep: usize) -> Result<Sample> {
        let n = self.s.groups;
        let markers: Vec<(SocketAddrV4, String, String)> = (0..n)
            .map(|g| {
                (
                    self.kv_addr(g),
                    format!("marker-{rep}"),
                    format!("written-before-fault-{rep}-{g}"),
                )
            })
            .collect();
        let ns = self.client_ns.clone();
        let to_write = markers.clone();
        in_netns(&ns, move || {
            for (addr, key, value) in &to_write {
                set_until_ok(*addr, key, value)?;
            }
            Ok(())
        })?;
        let writer = if self.s.backlog {
            harness::sleep(MARKER_SETTLE)?;
            let w = Writer::start(&self.client_ns, self.kv_addr(0));
            harness::sleep(BACKLOG_WRITING)?;
            Some(w)
        } else {
            None
        };
        if self.s.preload > 0 {
            self.wait_checkpoints_shipped()?;
        }
        let standby_pids = if self.s.mode == Mode::Warm {
            self.kv_pids(1)
        } else {
            BTreeMap::new()
        };
        let backlog = if self.s.backlog {
            Some(self.backlog_to_b()?)
        } else {
            None
        };
        let view_seq = last_event_seq(&self.c, 1);

        // The host dies: off the network first (t0), then everything in it is killed.
        let ns = self.c.lab.netns(0).to_owned();
        let t0 = real_ns();
        self.deaths += 1;
        self.c.lab.cut(0);
        self.c.kill9(0);
        for _ in 0..3 {
            for pid in pids_in_netns(&ns) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(POLL);
        }
        if let Some(acked) = writer.map(Writer::stop).transpose()? {
            eprintln!("failover-bench:     the writer had {acked} writes acknowledged");
        }

        let answered = poll_all(&self.client_ns, &markers)?;
        let t0_ms = ns_to_ms(t0);
        let per_group: Vec<f64> = answered.iter().map(|t| ns_to_ms(*t) - t0_ms).collect();
        let all_ms = per_group.iter().copied().fold(f64::NAN, f64::max);

        // Where the time went, from b's events and journal.
        let view = view_time(&self.c, 1, view_seq)?;
        // kv may answer before the executor has logged the group online.
        let end = Instant::now() + JOURNAL_TIMEOUT;
        let journal = loop {
            let journal = read_journal(self.c.node(1).data_dir());
            let complete = (0..n).all(|g| steps_of(&journal, &group_name(g), t0_ms).is_some());
            if complete || Instant::now() >= end {
                break journal;
            }
            harness::sleep(POLL)?;
        };
        if std::env::var_os(TRACE_VAR).is_some() {
            trace_sample(&self.c, t0_ms, &journal);
        }
        let mut parts: [Vec<f64>; 6] = Default::default();
        #[allow(clippy::cast_precision_loss)]
        for (g, done) in answered.iter().enumerate() {
            let Some(steps) = steps_of(&journal, &group_name(g), t0_ms) else {
                continue;
            };
            let done = ns_to_ms(*done);
            if let Some(v) = view {
                parts[0].push(v as f64 - t0_ms);
                parts[1].push(steps.assigned as f64 - v as f64);
            }
            let onlining = steps.onlining as f64;
            // A queued group's turn came with its `waiting` (the rest of the fence) or, when
            // the fence passed meanwhile, with its `onlining`.
            let turn = steps.waiting.unwrap_or(steps.onlining) as f64;
            parts[2].push(steps.queued.map_or(0.0, |q| turn - q as f64));
            parts[3].push(steps.waiting.map_or(0.0, |w| onlining - w as f64));
            parts[4].push(steps.online as f64 - onlining);
            parts[5].push(done - steps.online as f64);
        }

        if n > 1 {
            eprintln!(
                "failover-bench:     per resource, p50 from its onlining to online (ms): {}",
                resource_times(&journal, n, t0_ms)
            );
        }

        self.check_recovered()?;
        if self.s.mode == Mode::Warm {
            let now = self.kv_pids(1);
            for g in 0..n {
                let name = service_name(g);
                match (standby_pids.get(&name), now.get(&name)) {
                    (Some(before), Some(after)) if before == after => {}
                    (before, after) => bail!(
                        "{name} on b was not promoted in place: standby pid {before:?}, \
                         serving pid {after:?} (does this watchd support the service \
                         resource's standby = \"warm\"?)"
                    ),
                }
            }
        }
        Ok(Sample {
            all_ms,
            per_group,
            parts,
            backlog,
        })
    }

    /// Each kv on b serves what a had: a preloaded state is there whole (its last key
    /// answers), and b's kv never preloaded a table of its own (it recovered a's checkpoint
    /// or, warm, applied the shipped ones).
    fn check_recovered(&self) -> Result<()> {
        for g in 0..self.s.groups {
            let log = self.c.node(1).service_log(&service_name(g));
            if log.contains("preloaded") {
                bail!(
                    "{} on b preloaded a table of its own instead of recovering a's checkpoint",
                    service_name(g)
                );
            }
        }
        if self.s.preload == 0 {
            return Ok(());
        }
        let last = format!("pre-{}", preloaded_entries(self.s.preload) - 1);
        let addrs: Vec<SocketAddrV4> = (0..self.s.groups).map(|g| self.kv_addr(g)).collect();
        let checked = in_netns(&self.client_ns, move || {
            for addr in addrs {
                let reply = call(addr, &format!("GET {last}"))?;
                if !reply.starts_with("VALUE ") {
                    bail!("kv at {addr} lost the preloaded state: GET {last} answers {reply:?}");
                }
            }
            Ok(())
        });
        if checked.is_err() {
            let log = self.c.node(1).service_log(&service_name(0));
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_LINES_ON_FAILURE)..].join("\n");
            eprintln!(
                "failover-bench: {} on b, the end of its log:\n{tail}",
                service_name(0)
            );
        }
        checked
    }

    /// The data fileset of group 0: operations (and bytes) a's pump has not had acknowledged
    /// by b.
    fn backlog_to_b(&self) -> Result<(u64, u64)> {
        self.lag_to_b(&data_fileset(0))
    }

    /// Waits until b has acknowledged every checkpoint image of group 0 that a shipped (a
    /// preloaded state is checkpointed once, after the promotion that makes a the owner, and
    /// this row measures recovery from it, not a race with its shipping).
    fn wait_checkpoints_shipped(&self) -> Result<()> {
        let deadline = Instant::now() + SHIP_TIMEOUT;
        loop {
            let (ops, bytes) = self.lag_to_b(&ckpt_fileset(0))?;
            if ops == 0 && bytes == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "a's checkpoints did not reach b within {SHIP_TIMEOUT:?}: {ops} ops, {bytes} bytes behind"
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Operations (and bytes) of `fileset` that a's pump has not had acknowledged by b.
    fn lag_to_b(&self, data: &str) -> Result<(u64, u64)> {
        let out = self.c.node(0).ftctl(&["repl", "status", "--json"]);
        if !out.status.success() {
            bail!(
                "ftctl repl status on a: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for f in json_lines(&String::from_utf8_lossy(&out.stdout)) {
            if f["name"] != data {
                continue;
            }
            for b in f["pump"]["backups"].as_array().into_iter().flatten() {
                if b["name"] == NAMES[1] {
                    return Ok((
                        b["lag_ops"].as_u64().unwrap_or(0),
                        b["lag_bytes"].as_u64().unwrap_or(0),
                    ));
                }
            }
            bail!("a's pump of {data} lists no backup b: {f}");
        }
        bail!("a reports no fileset {data}")
    }

    /// Host a boots again: its stale virtual addresses gone, back on the network, watchd
    /// started; the groups fail back to it.
    fn boot_a(&mut self) -> Result<()> {
        let ns = self.c.lab.netns(0).to_owned();
        let batch: String = (0..self.s.groups)
            .map(|g| format!("addr del {}/24 dev eth0\n", self.vip(g)))
            .collect();
        let mut child = Command::new("ip")
            .args(["-force", "-n", &ns, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("running ip -batch")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(batch.as_bytes())?;
        }
        child.wait()?;
        self.c.lab.heal(0);
        self.c.restart(0);
        self.c.wait_view(&[0, 1, 2], &[0, 1, 2]);
        Ok(())
    }
}

/// How many entries `kv --preload bytes` adds (keys `pre-N` with values of 4000 bytes, until
/// keys and values reach `bytes`; see examples/src/bin/kv/store.rs).
fn preloaded_entries(bytes: u64) -> u64 {
    let mut total = 0;
    let mut n: u64 = 0;
    while total < bytes {
        total += (format!("pre-{n}").len() + PRELOAD_VALUE_BYTES) as u64;
        n += 1;
    }
    n
}

/// The steps of the new owner's run of a group, from its journal (unix ms).
#[derive(Debug)]
struct Steps {
    assigned: u64,
    queued: Option<u64>,
    waiting: Option<u64>,
    onlining: u64,
    online: u64,
}

fn read_journal(data_dir: &Path) -> Vec<Value> {
    json_lines(&std::fs::read_to_string(data_dir.join("groups.jsonl")).unwrap_or_default())
}

/// The first assignment of `group` to b after `t0_ms` and its run's steps.
fn steps_of(journal: &[Value], group: &str, t0_ms: f64) -> Option<Steps> {
    let after = |r: &&Value| {
        #[allow(clippy::cast_precision_loss)]
        let t = r["time_ms"].as_u64().unwrap_or(0) as f64;
        r["group"] == group && t >= t0_ms.floor()
    };
    let owned = journal
        .iter()
        .filter(after)
        .find(|r| r["kind"] == "ownership" && r["owner"] == NAMES[1])?;
    let epoch = owned["epoch"].as_u64()?;
    let at = |state: &str| {
        journal
            .iter()
            .filter(after)
            .find(|r| r["kind"] == "group" && r["epoch"] == epoch && r["state"] == state)
            .and_then(|r| r["time_ms"].as_u64())
    };
    Some(Steps {
        assigned: owned["time_ms"].as_u64()?,
        queued: at("queued"),
        waiting: at("waiting"),
        onlining: at("onlining")?,
        online: at("online")?,
    })
}

/// Per kind of resource (the suffix of its name), the p50 over groups of the time from its
/// `onlining` to its `online` record in b's journal after `t0_ms`: where the onlining of many
/// groups at once spends its time.
fn resource_times(journal: &[Value], groups: usize, t0_ms: f64) -> String {
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut started: HashMap<String, u64> = HashMap::new();
    let mut failed: BTreeMap<String, (usize, String)> = BTreeMap::new();
    #[allow(clippy::cast_precision_loss)]
    for r in journal {
        let (Some(t), Some(name)) = (r["time_ms"].as_u64(), r["resource"].as_str()) else {
            continue;
        };
        if r["kind"] != "resource" || (t as f64) < t0_ms.floor() {
            continue;
        }
        match r["state"].as_str() {
            Some("onlining") => {
                started.entry(name.to_owned()).or_insert(t);
            }
            Some("online") => {
                if let Some(from) = started.remove(name) {
                    let kind = name.rsplit('-').next().unwrap_or(name).to_owned();
                    by_kind
                        .entry(kind)
                        .or_default()
                        .push(t.saturating_sub(from) as f64);
                }
            }
            Some("failed") => {
                started.remove(name);
                let kind = name.rsplit('-').next().unwrap_or(name).to_owned();
                let (count, first) = failed.entry(kind).or_default();
                *count += 1;
                if first.is_empty() {
                    r["detail"].as_str().unwrap_or_default().clone_into(first);
                }
            }
            _ => {}
        }
    }
    let mut out: Vec<String> = by_kind
        .iter_mut()
        .map(|(kind, v)| {
            v.sort_by(f64::total_cmp);
            format!(
                "{kind} {:.0} ({} runs, {groups} groups)",
                v[v.len() / 2],
                v.len()
            )
        })
        .collect();
    out.extend(
        failed
            .iter()
            .map(|(kind, (count, first))| format!("{kind} failed {count}× (first: {first})")),
    );
    out.join(", ")
}

/// Prints the cluster events of b and c from just before the kill at `t0_ms` on, and b's
/// group journal after it: where one sample's time went, step by step.
fn trace_sample(c: &Cluster, t0_ms: f64, journal: &[Value]) {
    #[allow(clippy::cast_precision_loss)]
    let since = |r: &Value| r["time_ms"].as_u64().unwrap_or(0) as f64 - t0_ms;
    for (i, name) in NAMES.iter().enumerate().take(3).skip(1) {
        for e in c.events(i).iter().filter(|e| since(e) >= -TRACE_BEFORE_MS) {
            eprintln!(
                "failover-bench:     {name} {:+.0} ms {} {}",
                since(e),
                e["kind"].as_str().unwrap_or("?"),
                e["detail"].as_str().unwrap_or("")
            );
        }
    }
    for r in journal.iter().filter(|r| since(r) >= 0.0) {
        eprintln!("failover-bench:     b journal {:+.0} ms {r}", since(r));
    }
}

/// The newest cluster event's sequence number on node `i`.
fn last_event_seq(c: &Cluster, i: usize) -> u64 {
    c.events(i)
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// `time_ms` of node `i`'s first `view` event after `seq` without node a.
fn view_time(c: &Cluster, i: usize, seq: u64) -> Result<Option<u64>> {
    Ok(c.events(i).iter().find_map(|e| {
        if e["kind"] != "view" || e["seq"].as_u64().unwrap_or(0) <= seq {
            return None;
        }
        let detail = e["detail"].as_str()?;
        let (_, rest) = detail.split_once("): ")?;
        let listed: Vec<&str> = rest.split(';').next()?.split_whitespace().collect();
        (!listed.contains(&NAMES[0])).then(|| e["time_ms"].as_u64())?
    }))
}

/// Every node's `[[fileset]]` and `[[service]]` tables (paths relative to each node's
/// configuration file, so every node has its own).
fn node_config(s: &Scenario) -> Result<String> {
    let kv = binary("kv");
    let mut text = String::new();
    for g in 0..s.groups {
        let mut args = vec![
            "--listen".to_owned(),
            format!("0.0.0.0:{}", kv_port(g)),
            "--data".to_owned(),
            format!("kvdata/{}", service_name(g)),
            "--checkpoint".to_owned(),
            "per-request".to_owned(),
        ];
        if s.preload > 0 {
            args.extend(["--preload".to_owned(), s.preload.to_string()]);
        }
        text.push_str(&format!(
            "[[fileset]]\nname = \"{data}\"\npath = \"kvdata/{svc}\"\nprimary = \"group\"\n\
             backups = [\"a\", \"b\", \"c\"]\nsync = {sync}\nring_size = \"{RING_SIZE}\"\n\n\
             [[fileset]]\nname = \"{ckpt}\"\npath = \"data/ckpt/{svc}\"\nprimary = \"group\"\n\
             backups = [\"a\", \"b\", \"c\"]\nmode = \"copy\"\nquiet = \"20ms\"\n\n\
             [[service]]\nname = \"{svc}\"\ncommand = {cmd}\nargs = {args}\ncwd = \".\"\n\
             autostart = false\nfilesets = [\"{data}\"]\n\
             ready = {{ notify = true, timeout = \"{ONLINE_TIMEOUT}\" }}\n\
             hang = {{ heartbeat = true }}\n\
             restart = {{ policy = \"always\", max_restarts = 10, window = \"60s\" }}\n\
             checkpoint = {{ keep = 3 }}\n\n[service.stop]\ngrace = \"{KV_STOP_GRACE}\"\n\n",
            data = data_fileset(g),
            ckpt = ckpt_fileset(g),
            svc = service_name(g),
            sync = !s.backlog,
            cmd = q(&kv),
            args = q_list(&args),
        ));
    }
    Ok(text)
}

/// The group file of groups `groups`: one group per kv instance.
fn group_file(s: &Scenario, groups: &[usize], subnet: [u8; 3]) -> String {
    let mut text = String::new();
    let standby = match s.mode {
        Mode::Cold => "",
        Mode::Warm => ", standby = \"warm\"",
    };
    for &g in groups {
        let name = group_name(g);
        let [x, y, z] = subnet;
        let vip = Ipv4Addr::new(x, y, z, octet(VIP_BASE + g));
        text.push_str(&format!(
            r#"[[group]]
name = "{name}"
preferred_owners = ["a", "b", "c"]
failback = "immediate"
failover_threshold = 1000
failover_period = "1h"

[[group.resource]]
name = "{name}-data"
kind = "fileset"
properties = {{ fileset = "{data}" }}
timeouts = {{ online = "{ONLINE_TIMEOUT}", offline = "{FILESET_OFFLINE}" }}

[[group.resource]]
name = "{name}-ckpt"
kind = "checkpoint"
properties = {{ fileset = "{ckpt}", service = "{svc}" }}
timeouts = {{ online = "{ONLINE_TIMEOUT}", offline = "{FILESET_OFFLINE}" }}

[[group.resource]]
name = "{name}-vip"
kind = "ip"
properties = {{ address = "{vip}/24", interface = "eth0" }}
timeouts = {{ online = "5s", offline = "{IP_OFFLINE}" }}

[[group.resource]]
name = "{name}-kv"
kind = "service"
depends_on = ["{name}-data", "{name}-ckpt", "{name}-vip"]
properties = {{ service = "{svc}"{standby} }}
timeouts = {{ online = "{ONLINE_TIMEOUT}", offline = "{KV_OFFLINE}" }}

"#,
            data = data_fileset(g),
            ckpt = ckpt_fileset(g),
            svc = service_name(g),
        ));
    }
    text
}

fn group_name(g: usize) -> String {
    format!("g{g}")
}

fn service_name(g: usize) -> String {
    format!("kv{g}")
}

fn data_fileset(g: usize) -> String {
    format!("kv{g}-data")
}

fn ckpt_fileset(g: usize) -> String {
    format!("kv{g}-ckpt")
}

fn kv_port(g: usize) -> u16 {
    KV_PORT_BASE + u16::try_from(g).unwrap_or(u16::MAX - KV_PORT_BASE)
}

fn octet(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

/// Runs `f` on a thread inside the network namespace at `ns` (a `/run/netns` path).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        f()
    })
    .join()
    .map_err(|p| anyhow::anyhow!("{}", panic_text(&p)))?
}

/// Moves the calling thread into the network namespace at `ns`.
fn enter_netns(ns: &str) -> Result<()> {
    let file = std::fs::File::open(ns).with_context(|| format!("opening {ns}"))?;
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns {ns}"))
}

/// One request on a fresh connection; its reply line.
fn call(addr: SocketAddrV4, request: &str) -> Result<String> {
    let s = TcpStream::connect_timeout(&SocketAddr::V4(addr), CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    s.set_nodelay(true)?;
    (&s).write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// `SET key value` until kv answers `OK`.
fn set_until_ok(addr: SocketAddrV4, key: &str, value: &str) -> Result<()> {
    let end = Instant::now() + WRITE_TIMEOUT;
    loop {
        let reply = call(addr, &format!("SET {key} {value}"));
        if let Ok(r) = &reply
            && r.starts_with("OK ")
        {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("SET {key} at {addr} not acknowledged within {WRITE_TIMEOUT:?}: {reply:?}");
        }
        harness::sleep(POLL)?;
    }
}

/// Polls every group's address until it answers its marker; returns the real-time clock (ns)
/// of each group's first right answer.
fn poll_all(ns: &str, markers: &[(SocketAddrV4, String, String)]) -> Result<Vec<u64>> {
    let threads: Vec<_> = markers
        .iter()
        .cloned()
        .map(|(addr, key, value)| {
            let ns = ns.to_owned();
            std::thread::spawn(move || -> Result<u64> {
                enter_netns(&ns)?;
                let want = format!("VALUE {value}");
                let request = format!("GET {key}");
                let end = Instant::now() + FAILOVER_TIMEOUT;
                loop {
                    harness::check_interrupted()?;
                    let last = match call(addr, &request) {
                        Ok(r) if r == want => return Ok(real_ns()),
                        Ok(r) => r,
                        Err(e) => e.to_string(),
                    };
                    if Instant::now() >= end {
                        bail!(
                            "{addr} did not answer {request} within {FAILOVER_TIMEOUT:?} \
                             (last: {last})"
                        );
                    }
                    std::thread::sleep(POLL_EVERY);
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| {
            t.join()
                .map_err(|p| anyhow::anyhow!("{}", panic_text(&p)))?
        })
        .collect()
}

/// A client setting large values as fast as kv acknowledges them, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    /// The last reply other than `OK`, if any.
    last_refusal: Arc<std::sync::Mutex<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(ns: &str, addr: SocketAddrV4) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let last_refusal = Arc::new(std::sync::Mutex::new(String::new()));
        let refused = Arc::clone(&last_refusal);
        let (flag, count, ns) = (Arc::clone(&stop), Arc::clone(&acked), ns.to_owned());
        let thread = std::thread::spawn(move || {
            if enter_netns(&ns).is_err() {
                return;
            }
            let value = "w".repeat(BACKLOG_VALUE_BYTES);
            let mut n: u64 = 0;
            while !flag.load(Ordering::Acquire) {
                let Ok(s) = TcpStream::connect_timeout(&SocketAddr::V4(addr), CONNECT_TIMEOUT)
                else {
                    std::thread::sleep(POLL_EVERY);
                    continue;
                };
                let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
                let _ = s.set_nodelay(true);
                let mut reader = BufReader::new(&s);
                while !flag.load(Ordering::Acquire) {
                    n += 1;
                    if (&s)
                        .write_all(format!("SET w{n} {value}\n").as_bytes())
                        .is_err()
                    {
                        break;
                    }
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() || line.is_empty() {
                        break;
                    }
                    if line.starts_with("OK ") {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else if let Ok(mut l) = refused.lock() {
                        *l = line.trim_end().to_owned();
                    }
                }
            }
        });
        Writer {
            stop,
            acked,
            last_refusal,
            thread: Some(thread),
        }
    }

    /// Stops the writer; returns how many writes kv acknowledged.
    fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let acked = self.acked.load(Ordering::Relaxed);
        if acked == 0 {
            let refusal = self
                .last_refusal
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            bail!(
                "the writer had no write acknowledged before the fault (last reply: {refusal:?})"
            );
        }
        Ok(acked)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ns_to_ms(ns: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let v = ns as f64 / 1e6;
    v
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic".to_owned())
}

fn fmt_ms(ms: f64) -> String {
    if ms.is_nan() {
        "-".into()
    } else {
        format!("{ms:.0}")
    }
}

fn one_line(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let line = text.lines().next().unwrap_or_default();
    let mut short: String = line.chars().take(300).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    short
}

/// CPU model, cores, memory and kernel, from /proc.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    #[allow(clippy::cast_precision_loss)]
    let gib = mem_kib as f64 / f64::from(1u32 << 20);
    format!(
        "{model}, {cores} cores, {gib:.1} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// Load averages at the start.
fn load() -> String {
    let avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let avg: Vec<&str> = avg.split_whitespace().take(3).collect();
    format!("load average {} (1/5/15 min)", avg.join(" "))
}

/// The commit of the workspace (and whether it has local changes).
fn commit() -> String {
    let root = ftkit_tests::repo_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{head} + local changes")
            } else {
                head
            }
        }
        None => "unknown".to_owned(),
    }
}
