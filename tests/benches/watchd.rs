//! The watchd benchmark: crash and hang recovery latency, heartbeat throughput, and CPU and
//! memory per supervised service, measured side by side with supervisord and runit in one run
//! on the same machine, supervising the same small C program (tests/benches/peer/supervised.c).
//!
//! Run: `cargo build --release --workspace && cargo bench -p ftkit-tests --bench watchd`
//! (`-- --quick` for a short run, `-- --out FILE` to also write the markdown). It finds watchd,
//! ftctl and libft.so in the target/release directory above its own executable. It prints
//! tables; it is not a test and asserts nothing about the numbers.

#[path = "watchd/harness.rs"]
mod harness;
#[path = "watchd/peers.rs"]
mod peers;

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use harness::{Received, Report, Reports, Table, mono_ns, ms_between, percentile, sorted};
use peers::{Kind, Paths, Running, Service};

const USAGE: &str = "usage: watchd-bench [--quick] [--out FILE] [--bin-dir DIR] \
[--only crash,hang,throughput,resources] [--services 1,100,1000] [--keep]";

/// The C program, compiled by the benchmark itself.
const PROGRAM_SOURCE: &str = include_str!("peer/supervised.c");
/// libft's C header, next to the program's source in the scratch directory.
const FT_HEADER: &str = include_str!("../../libft/include/ft.h");

/// How long a supervisor may take to start a service the first time.
const FIRST_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replacement may take after a crash or a hang before the run is declared failed.
const REPLACEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long N services may take to be all started.
const START_ALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Crash test: time between a replacement's report and the next SIGKILL. Longer than watchd's
/// `stable_after` (100 ms) so that every watchd restart is an immediate first restart.
const CRASH_SPACING: Duration = Duration::from_millis(150);
/// Pause between two direct spawns of the floor measurement.
const FLOOR_SPACING: Duration = Duration::from_millis(20);
/// The peers' replacements run this long before the next kill, to measure their normal path:
/// runsv sleeps 1 s before restarting a service that ran less than 1 s, and supervisord moves a
/// program from STARTING to RUNNING only on its next loop pass (up to 1 s later); a program
/// killed before that is restarted one loop pass later still.
const CRASH_SPACING_PEERS: Duration = Duration::from_millis(1100);

/// Hang test: the program's heartbeat interval and deadline (ft_hbeat(1, 200) every 50 ms).
const HANG_INTERVAL_MS: u32 = 50;
const HANG_TIMEOUT_MS: u32 = 200;
/// Heartbeats a replacement sends before it is hung again (it runs ≥ 150 ms: past stable_after).
const HANG_WARM_BEATS: u64 = 3;
/// A heartbeat report older than this when read is not used as the "last heartbeat before the
/// stop": the stop must land well inside the 50 ms sleep that follows it.
const HANG_FRESH: Duration = Duration::from_millis(5);
/// A sample is discarded when SIGSTOP landed this long after the heartbeat was taken: the
/// program might have sent one more heartbeat that the benchmark did not see.
const HANG_MAX_STOP_LAG: Duration = Duration::from_millis(25);

/// Throughput test: polls of `status` until `accepted` stops moving.
const DRAIN_POLL: Duration = Duration::from_millis(50);
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Resource test: the program heartbeats every second with a 3 s deadline under watchd.
const RES_INTERVAL_MS: &str = "1000";
const RES_TIMEOUT_MS: &str = "3000";
/// File descriptors wanted for 1000 services (pipes, logs, pidfds, sockets of the peers).
const WANTED_NOFILE: u64 = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Crash,
    Hang,
    Throughput,
    Resources,
}

impl Section {
    const ALL: [Section; 4] = [
        Section::Crash,
        Section::Hang,
        Section::Throughput,
        Section::Resources,
    ];

    fn parse(s: &str) -> Option<Section> {
        match s {
            "crash" => Some(Section::Crash),
            "hang" => Some(Section::Hang),
            "throughput" => Some(Section::Throughput),
            "resources" => Some(Section::Resources),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Options {
    quick: bool,
    out: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
    only: Vec<Section>,
    services: Option<Vec<usize>>,
    keep: bool,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        quick: false,
        out: None,
        bin_dir: None,
        only: Section::ALL.to_vec(),
        services: None,
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--keep" => o.keep = true,
            // cargo bench passes --bench to every bench program.
            "--bench" => {}
            "--out" => o.out = Some(args.next().context(USAGE)?.into()),
            "--bin-dir" => o.bin_dir = Some(args.next().context(USAGE)?.into()),
            "--only" => {
                let list = args.next().context(USAGE)?;
                o.only = list
                    .split(',')
                    .map(|s| Section::parse(s).with_context(|| format!("{s:?}: {USAGE}")))
                    .collect::<Result<_>>()?;
            }
            "--services" => {
                let list = args.next().context(USAGE)?;
                o.services = Some(
                    list.split(',')
                        .map(|s| s.parse().with_context(|| format!("{s:?}: {USAGE}")))
                        .collect::<Result<_>>()?,
                );
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// How much of everything a run does.
#[derive(Debug)]
struct Plan {
    crashes_watchd: usize,
    crashes_peers: usize,
    crashes_young: usize,
    hangs: usize,
    flood_seconds: u32,
    flood_clients: Vec<usize>,
    /// Each client count is measured this many times (a fresh watchd each time): the rate
    /// swings widely from run to run on a 2-core machine.
    flood_repeats: usize,
    resource_counts: Vec<usize>,
    resource_settle: Duration,
    resource_window: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                crashes_watchd: 30,
                crashes_peers: 10,
                crashes_young: 3,
                hangs: 20,
                flood_seconds: 1,
                flood_clients: vec![1, 2],
                flood_repeats: 1,
                resource_counts: vec![1, 100],
                resource_settle: Duration::from_secs(1),
                resource_window: Duration::from_secs(3),
            }
        } else {
            Plan {
                crashes_watchd: 200,
                crashes_peers: 50,
                crashes_young: 10,
                hangs: 200,
                flood_seconds: 3,
                flood_clients: vec![1, 2],
                flood_repeats: 3,
                resource_counts: vec![1, 100, 1000],
                resource_settle: Duration::from_secs(2),
                resource_window: Duration::from_secs(20),
            }
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let opts = parse_args()?;
    let began = Instant::now();
    let mut plan = Plan::new(opts.quick);
    if let Some(counts) = &opts.services {
        plan.resource_counts.clone_from(counts);
    }
    harness::install_interrupt_handler()?;
    harness::become_subreaper()?;
    raise_nofile()?;
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => harness::release_dir()?,
    };
    for (what, file) in [
        ("watchd", "watchd"),
        ("ftctl", "ftctl"),
        ("libft.so", "libft.so"),
    ] {
        let p = bin_dir.join(file);
        if !p.exists() {
            bail!(
                "{what} not found at {}: run `cargo build --release --workspace` first",
                p.display()
            );
        }
    }
    for tool in ["supervisord", "runsvdir", "runsv", "cc"] {
        if harness::find_in_path(tool).is_none() {
            bail!("{tool} not found in PATH: run .ci/install-bench-peers");
        }
    }

    let scratch = tempfile::Builder::new()
        .prefix("ftkit-bench-")
        .tempdir()
        .context("creating the scratch directory")?;
    // Declared after `scratch`, so it runs first: nothing may still use the directory when it
    // is removed.
    let _sweep = harness::SweepGuard;

    let paths = Paths {
        bin_dir: bin_dir.clone(),
        scratch: scratch.path().to_path_buf(),
        program: scratch.path().join("supervised"),
        report_socket: scratch.path().join("report.sock"),
    };
    compile_program(&paths)?;
    let mut reports = Reports::bind(&paths.report_socket)?;

    let mut doc = String::new();
    harness::emit(&mut doc, &machine_header(&opts, &plan, &bin_dir));
    for section in &opts.only {
        let load_before = loadavg();
        let text = match section {
            Section::Crash => crash_section(&paths, &mut reports, &plan)?,
            Section::Hang => hang_section(&paths, &mut reports, &plan)?,
            Section::Throughput => throughput_section(&paths, &mut reports, &plan)?,
            Section::Resources => resources_section(&paths, &mut reports, &plan)?,
        };
        harness::emit(&mut doc, &text);
        harness::emit(
            &mut doc,
            &format!(
                "(load average before / after this table: {load_before} / {})\n\n",
                loadavg()
            ),
        );
    }
    harness::emit(
        &mut doc,
        &format!(
            "(net.unix.max_dgram_qlen = {} at the end of the run)\n",
            dgram_qlen()
        ),
    );
    eprintln!("bench: done in {:.0} s", began.elapsed().as_secs_f64());
    if opts.keep {
        let kept = scratch.keep();
        eprintln!("bench: kept the scratch directory {}", kept.display());
    }
    if let Some(out) = &opts.out {
        std::fs::write(out, &doc).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench: wrote {}", out.display());
    }
    Ok(())
}

/// 1000 services need more descriptors than the usual soft limit of 1024, in watchd and in
/// supervisord alike; children inherit the raised limit.
fn raise_nofile() -> Result<()> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    let want = WANTED_NOFILE.min(hard);
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).context("raising RLIMIT_NOFILE")?;
    }
    Ok(())
}

/// Compiles the supervised program against libft.so, with an rpath to it.
fn compile_program(paths: &Paths) -> Result<()> {
    let src = paths.scratch.join("supervised.c");
    let include = paths.scratch.join("include");
    std::fs::create_dir_all(&include)?;
    std::fs::write(&src, PROGRAM_SOURCE)?;
    std::fs::write(include.join("ft.h"), FT_HEADER)?;
    let out = Command::new("cc")
        .args(["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&paths.program)
        .arg("-L")
        .arg(&paths.bin_dir)
        .arg(format!("-Wl,-rpath,{}", paths.bin_dir.display()))
        .arg("-lft")
        .output()
        .context("running cc")?;
    if !out.status.success() {
        bail!(
            "cc failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn machine_header(opts: &Options, plan: &Plan, bin_dir: &Path) -> String {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let mut h = String::new();
    let _ = writeln!(h, "## watchd benchmark\n");
    let _ = writeln!(
        h,
        "- date: {}",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(h, "- machine: {cores} cores ({cpu}), Linux {kernel}, {os}");
    let built = std::fs::metadata(bin_dir.join("watchd"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(
            || "unknown".to_owned(),
            |d| {
                command_output(
                    "date",
                    &[
                        "-u",
                        "-d",
                        &format!("@{}", d.as_secs()),
                        "+%Y-%m-%d %H:%M UTC",
                    ],
                )
            },
        );
    let commit = command_output(
        "git",
        &[
            "-C",
            &format!("{}/..", env!("CARGO_MANIFEST_DIR")),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    // The benchmark measures watchd and libft: only their sources matter here.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dirty = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["diff", "--quiet", "HEAD", "--", "watchd", "libft"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(" (git status unknown)", |s| {
            if s.success() {
                ", watchd/ and libft/ unchanged since"
            } else {
                " + uncommitted changes in watchd/ or libft/"
            }
        });
    let _ = writeln!(
        h,
        "- mode: {}; binaries: {} (watchd built {built}; source: commit {commit}{dirty})",
        if opts.quick { "--quick" } else { "full" },
        bin_dir.display()
    );
    let _ = writeln!(
        h,
        "- net.unix.max_dgram_qlen = {} at the start (how many datagrams from other processes a \
         Unix datagram socket such as ft.sock queues before senders get EAGAIN)",
        dgram_qlen()
    );
    let _ = writeln!(
        h,
        "- peers: supervisord {}, runit {}",
        command_output("supervisord", &["--version"]),
        command_output("dpkg-query", &["-W", "-f=${Version}", "runit"])
    );
    let _ = writeln!(
        h,
        "- plan: crashes watchd {} / supervisord, runit {}; hangs {}; flood {} s; services {:?}; \
         CPU window {} s\n",
        plan.crashes_watchd,
        plan.crashes_peers,
        plan.hangs,
        plan.flood_seconds,
        plan.resource_counts,
        plan.resource_window.as_secs()
    );
    h
}

/// net.unix.max_dgram_qlen: watchd may raise it when it starts.
fn dgram_qlen() -> String {
    std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

/// The 1, 5 and 15 minute load averages: a busy machine shows here.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn fmt_ms(v: f64) -> String {
    format!("{v:.2}")
}

// ---------------------------------------------------------------------------------------------
// 1. crash → replacement running

/// What restarts the program in the crash test.
#[derive(Debug, Clone, Copy)]
enum Restarter {
    /// No supervisor: the benchmark itself spawns the program (std::process::Command). The
    /// floor of every supervisor: fork/exec and loading libft.so.
    Direct,
    /// A supervisor; for watchd, with or without its per-service cgroups.
    Supervisor { kind: Kind, cgroups: bool },
}

impl Restarter {
    fn label(self) -> String {
        match self {
            Restarter::Direct => "none: the bench spawns it (floor)".into(),
            Restarter::Supervisor {
                kind: Kind::Watchd,
                cgroups: false,
            } => "watchd, cgroups = false".into(),
            Restarter::Supervisor { kind, .. } => kind.name().into(),
        }
    }
}

/// Spawns the program directly `count` times: the time from just before the spawn to its
/// report, the cost no supervisor can avoid.
fn spawn_floor(paths: &Paths, reports: &mut Reports, count: usize) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        harness::check_interrupted()?;
        reports.drain()?;
        let t0 = mono_ns();
        let mut child = Command::new(&paths.program)
            .arg(&paths.report_socket)
            .arg("idle")
            .stdin(Stdio::null())
            .process_group(0)
            .env_remove("FT_SOCKET")
            .spawn()
            .context("spawning the program")?;
        let r = reports.wait_for(REPLACEMENT_TIMEOUT, "start report", |r| {
            matches!(r, Report::Start { .. })
        });
        let _ = child.kill();
        let _ = child.wait();
        let r = r.with_context(|| format!("direct spawn {} of {count}", i + 1))?;
        let Report::Start { mono, .. } = r.report else {
            bail!("wait_for returned a report it was not asked for")
        };
        samples.push(ms_between(t0, mono));
        harness::sleep(FLOOR_SPACING)?;
    }
    Ok(samples)
}

/// SIGKILLs the running program `count` times; each sample is the time from the kill to the
/// replacement's "start" report.
fn crash_latency(
    paths: &Paths,
    reports: &mut Reports,
    restarter: Restarter,
    count: usize,
    spacing: Duration,
) -> Result<Vec<f64>> {
    let (kind, cgroups) = match restarter {
        Restarter::Direct => return spawn_floor(paths, reports, count),
        Restarter::Supervisor { kind, cgroups } => (kind, cgroups),
    };
    reports.drain()?;
    let tag = format!(
        "crash{}{}",
        spacing.as_millis(),
        if cgroups { "" } else { "-nocg" }
    );
    let services = [Service::new("crash", &["idle"])];
    let mut sup = Running::start_with(kind, paths, &tag, &services, cgroups)?;
    let first = reports
        .wait_for(FIRST_START_TIMEOUT, "first start report", |r| {
            matches!(r, Report::Start { .. })
        })
        .with_context(|| sup.output_tail())?;
    let mut pid = start_pid(&first)?;
    sup.note_service(pid);
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        harness::sleep(spacing)?;
        sup.check_alive()?;
        reports.drain()?;
        let t0 = mono_ns();
        signal::kill(Pid::from_raw(pid), Signal::SIGKILL)
            .with_context(|| format!("SIGKILL {pid}"))?;
        let old = pid;
        let next = reports
            .wait_for(
                REPLACEMENT_TIMEOUT,
                "replacement start report",
                |r| matches!(r, Report::Start { pid, .. } if *pid != old),
            )
            .with_context(|| format!("{}: crash {} of {count}", kind.name(), i + 1))?;
        let Report::Start { pid: new, mono, .. } = next.report else {
            bail!("wait_for returned a report it was not asked for")
        };
        samples.push(ms_between(t0, mono));
        pid = new;
    }
    sup.stop()?;
    Ok(samples)
}

fn start_pid(r: &Received) -> Result<i32> {
    match r.report {
        Report::Start { pid, .. } => Ok(pid),
        _ => bail!("expected a start report, got {:?}", r.report),
    }
}

fn crash_section(paths: &Paths, reports: &mut Reports, plan: &Plan) -> Result<String> {
    let sup = |kind| Restarter::Supervisor {
        kind,
        cgroups: true,
    };
    let runs = [
        (Restarter::Direct, plan.crashes_watchd, FLOOR_SPACING, ""),
        (sup(Kind::Watchd), plan.crashes_watchd, CRASH_SPACING, ""),
        (
            Restarter::Supervisor {
                kind: Kind::Watchd,
                cgroups: false,
            },
            plan.crashes_watchd,
            CRASH_SPACING,
            "",
        ),
        (
            sup(Kind::Supervisord),
            plan.crashes_peers,
            CRASH_SPACING_PEERS,
            "",
        ),
        (
            sup(Kind::Runit),
            plan.crashes_peers,
            CRASH_SPACING_PEERS,
            "",
        ),
        (
            sup(Kind::Supervisord),
            plan.crashes_young,
            CRASH_SPACING,
            " (young)",
        ),
        (
            sup(Kind::Runit),
            plan.crashes_young,
            CRASH_SPACING,
            " (young)",
        ),
    ];
    let mut t = Table::new(&[
        "supervisor",
        "crashes",
        "ran before kill",
        "p50 ms",
        "p99 ms",
        "min ms",
        "max ms",
        "mean ms",
    ]);
    for (restarter, count, spacing, note) in runs {
        let label = format!("{}{note}", restarter.label());
        eprintln!("bench: crash: {label} x{count}, spacing {spacing:?}");
        let spacing_text = match restarter {
            Restarter::Direct => "-".to_owned(),
            Restarter::Supervisor { .. } => format!("{} ms", spacing.as_millis()),
        };
        match crash_latency(paths, reports, restarter, count, spacing) {
            Ok(samples) => {
                let n = samples.len();
                #[allow(clippy::cast_precision_loss)]
                let mean = samples.iter().sum::<f64>() / n as f64;
                let s = sorted(samples);
                t.row(vec![
                    label,
                    n.to_string(),
                    spacing_text,
                    fmt_ms(percentile(&s, 50.0)),
                    fmt_ms(percentile(&s, 99.0)),
                    fmt_ms(s[0]),
                    fmt_ms(s[n - 1]),
                    fmt_ms(mean),
                ]);
            }
            Err(e) => {
                harness::check_interrupted()?;
                t.row(vec![
                    label,
                    count.to_string(),
                    spacing_text,
                    format!("FAILED: {}", one_line(&e)),
                ]);
            }
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### 1. crash → replacement running\n\nSIGKILL of the program's main process at t0; \
         latency = the replacement's first report (CLOCK_MONOTONIC, first line of main) − t0. \
         \"ran before kill\" is how long each replacement ran before the next kill. The first \
         row has no supervisor: the benchmark spawns the program itself (t0 = just before the \
         spawn), the floor that fork/exec and loading libft.so set for everyone. \"(young)\" rows \
         kill each replacement only {} ms after it started.\n",
        CRASH_SPACING.as_millis()
    );
    s.push_str(&t.render());
    let _ = writeln!(
        s,
        "\nwatchd: restart = {}, stop = {}, ready default (running at spawn).  \n\
         supervisord: {}, other settings default.  \n\
         runit: runsvdir DIR, one service dir per service with `run` = `#!/bin/sh` + `exec PROGRAM ARGS`; \
         no log service.\n",
        peers::WATCHD_RESTART,
        peers::WATCHD_STOP,
        peers::SUPERVISORD_PROGRAM.trim().replace('\n', ", ")
    );
    Ok(s)
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['\n', '|'], " ")
}

// ---------------------------------------------------------------------------------------------
// 2. hang → detected

/// `ftctl events --follow --json`, one parsed event per line.
#[derive(Debug)]
struct EventStream {
    child: Child,
    rx: mpsc::Receiver<serde_json::Value>,
}

impl EventStream {
    fn follow(paths: &Paths, socket: &Path) -> Result<EventStream> {
        let mut child = Command::new(paths.ftctl())
            .arg("--socket")
            .arg(socket)
            .args(["events", "--follow", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ftctl events --follow")?;
        let stdout = child.stdout.take().context("ftctl's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Ok(EventStream { child, rx })
    }

    /// The first event of `kind` for `service` stamped at or after `since_ms`.
    fn wait(
        &self,
        kind: &str,
        service: &str,
        since_ms: u64,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            harness::check_interrupted()?;
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(v) => {
                    let matches = v["kind"] == kind
                        && v["service"] == service
                        && v["time_ms"].as_u64().is_some_and(|t| t >= since_ms);
                    if matches {
                        return Ok(v);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("ftctl events ended"),
            }
        }
        bail!("no `{kind}` event for {service} within {timeout:?}")
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct HangRun {
    /// Event time − last heartbeat's deadline, ms.
    detected: Vec<f64>,
    /// Replacement's report − last heartbeat's deadline, ms.
    replaced: Vec<f64>,
    discarded: usize,
}

fn hang_latency(paths: &Paths, reports: &mut Reports, count: usize) -> Result<HangRun> {
    reports.drain()?;
    let interval = HANG_INTERVAL_MS.to_string();
    let timeout = HANG_TIMEOUT_MS.to_string();
    let mut sup = Running::start(
        Kind::Watchd,
        paths,
        "hang",
        &[Service::new(
            "hang",
            &["beat", &interval, &timeout, "report"],
        )],
    )?;
    let socket = sup
        .control_socket
        .clone()
        .context("watchd has a control socket")?;
    let events = EventStream::follow(paths, &socket)?;
    let first = reports
        .wait_for(FIRST_START_TIMEOUT, "first start report", |r| {
            matches!(r, Report::Start { .. })
        })
        .with_context(|| sup.output_tail())?;
    let mut pid = start_pid(&first)?;
    sup.note_service(pid);
    let deadline_ns = u64::from(HANG_TIMEOUT_MS) * 1_000_000;
    let mut run = HangRun {
        detected: Vec::with_capacity(count),
        replaced: Vec::with_capacity(count),
        discarded: 0,
    };
    for i in 0..count {
        sup.check_alive()?;
        let what = || format!("hang {} of {count}", i + 1);
        // A fresh heartbeat, well after registration and past stable_after.
        let (hb_mono, hb_real) = loop {
            let hb = reports
                .wait_for(REPLACEMENT_TIMEOUT, "heartbeat report", |r| {
                    matches!(r, Report::Heartbeat { pid: p, seq, .. }
                        if *p == pid && *seq >= HANG_WARM_BEATS)
                })
                .with_context(what)?;
            let Report::Heartbeat { mono, real, .. } = hb.report else {
                bail!("wait_for returned a report it was not asked for")
            };
            if mono_ns().saturating_sub(hb.at) < nanos(HANG_FRESH) {
                break (mono, real);
            }
        };
        let t_stop = mono_ns();
        signal::kill(Pid::from_raw(pid), Signal::SIGSTOP).with_context(what)?;
        let since_ms = harness::real_ns() / 1_000_000 - 1;
        let valid = t_stop.saturating_sub(hb_mono) < nanos(HANG_MAX_STOP_LAG);
        let old = pid;
        let next = reports
            .wait_for(
                REPLACEMENT_TIMEOUT,
                "replacement start report",
                |r| matches!(r, Report::Start { pid, .. } if *pid != old),
            )
            .with_context(what)?;
        let event = events
            .wait("hang", "hang", since_ms, REPLACEMENT_TIMEOUT)
            .with_context(what)?;
        let Report::Start {
            pid: new,
            mono: start_mono,
            ..
        } = next.report
        else {
            bail!("wait_for returned a report it was not asked for")
        };
        let event_ms = event["time_ms"].as_u64().context("event without time_ms")?;
        if valid {
            run.detected
                .push(ms_between(hb_real + deadline_ns, event_ms * 1_000_000));
            run.replaced
                .push(ms_between(hb_mono + deadline_ns, start_mono));
        } else {
            run.discarded += 1;
        }
        pid = new;
        reports.drain()?;
    }
    drop(events);
    sup.stop()?;
    Ok(run)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).expect("short durations fit in u64 ns")
}

fn hang_section(paths: &Paths, reports: &mut Reports, plan: &Plan) -> Result<String> {
    eprintln!("bench: hang: watchd x{}", plan.hangs);
    let mut t = Table::new(&[
        "supervisor",
        "hangs",
        "detected p50 ms",
        "detected p99 ms",
        "detected max ms",
        "replacement running p50 ms",
        "replacement running p99 ms",
        "replacement running max ms",
    ]);
    match hang_latency(paths, reports, plan.hangs) {
        Ok(run) => {
            let d = sorted(run.detected);
            let r = sorted(run.replaced);
            let n = d.len();
            let mut label = n.to_string();
            if run.discarded > 0 {
                let _ = write!(label, " ({} discarded)", run.discarded);
            }
            t.row(vec![
                "watchd".into(),
                label,
                fmt_ms(percentile(&d, 50.0)),
                fmt_ms(percentile(&d, 99.0)),
                fmt_ms(d.last().copied().unwrap_or(f64::NAN)),
                fmt_ms(percentile(&r, 50.0)),
                fmt_ms(percentile(&r, 99.0)),
                fmt_ms(r.last().copied().unwrap_or(f64::NAN)),
            ]);
        }
        Err(e) => {
            harness::check_interrupted()?;
            t.row(vec![
                "watchd".into(),
                plan.hangs.to_string(),
                format!("FAILED: {}", one_line(&e)),
            ]);
        }
    }
    for kind in [Kind::Supervisord, Kind::Runit] {
        t.row(vec![
            kind.name().into(),
            "-".into(),
            "n/a (no hang detection)".into(),
        ]);
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### 2. hang → detected beyond its deadline\n\nThe program calls ft_hbeat(1, {HANG_TIMEOUT_MS}) \
         every {HANG_INTERVAL_MS} ms; right after a heartbeat the benchmark SIGSTOPs it. \
         deadline = that heartbeat's time + {HANG_TIMEOUT_MS} ms. detected = the `hang` event's \
         time_ms (`ftctl events --follow --json`, whole ms) − deadline; replacement running = the \
         replacement's first report − deadline. Samples where SIGSTOP landed more than \
         {} ms after the heartbeat are discarded (a later heartbeat could have gone unseen).\n",
        HANG_MAX_STOP_LAG.as_millis()
    );
    s.push_str(&t.render());
    let _ = writeln!(
        s,
        "\nwatchd: hang = {{ heartbeat = true }}, restart = {}.\n",
        peers::WATCHD_RESTART
    );
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// 3. heartbeat throughput

#[derive(Debug)]
struct FloodRun {
    sent: u64,
    eagain: u64,
    other: u64,
    elapsed_s: f64,
    accepted: u64,
    watchd_cpu_pct: f64,
    restarts: u64,
}

fn accepted(sup: &Running) -> Result<u64> {
    let st = sup.status()?;
    st["listener"]["accepted"]
        .as_u64()
        .context("status without listener.accepted")
}

fn flood(paths: &Paths, reports: &mut Reports, clients: usize, seconds: u32) -> Result<FloodRun> {
    reports.drain()?;
    let secs = seconds.to_string();
    let services: Vec<Service> = (0..clients)
        .map(|i| Service::new(format!("flood{i}"), &["flood", &secs]))
        .collect();
    let mut sup = Running::start(Kind::Watchd, paths, &format!("flood{clients}"), &services)?;
    let mut pids = Vec::new();
    while pids.len() < clients {
        let r = reports
            .wait_for(FIRST_START_TIMEOUT, "armed report", |r| {
                matches!(r, Report::Armed { .. })
            })
            .with_context(|| sup.output_tail())?;
        if let Report::Armed { pid } = r.report {
            pids.push(pid);
        }
    }
    sup.note_service(pids[0]);
    let ticks = harness::clock_ticks_per_second()?;
    let a0 = accepted(&sup)?;
    let c0 = harness::cpu_ticks(sup.pid())?;
    let m0 = mono_ns();
    for pid in &pids {
        signal::kill(Pid::from_raw(*pid), Signal::SIGUSR1)?;
    }
    let (mut sent, mut eagain, mut other, mut elapsed) = (0, 0, 0, 0);
    for _ in 0..clients {
        let r = reports.wait_for(
            Duration::from_secs(u64::from(seconds)) + REPLACEMENT_TIMEOUT,
            "flood report",
            |r| matches!(r, Report::Flood { .. }),
        )?;
        if let Report::Flood {
            ok,
            eagain: e,
            other: o,
            elapsed_ns,
            ..
        } = r.report
        {
            sent += ok;
            eagain += e;
            other += o;
            elapsed = elapsed.max(elapsed_ns);
        }
    }
    let c1 = harness::cpu_ticks(sup.pid())?;
    let m1 = mono_ns();
    // What is still queued in ft.sock is accepted after the clients stopped.
    let mut a1 = accepted(&sup)?;
    let end = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < end {
        harness::sleep(DRAIN_POLL)?;
        let a = accepted(&sup)?;
        if a == a1 {
            break;
        }
        a1 = a;
    }
    let st = sup.status()?;
    let restarts = st["services"]
        .as_array()
        .map_or(0, |v| v.iter().filter_map(|s| s["restarts"].as_u64()).sum());
    sup.stop()?;
    let elapsed_s = ms_between(0, elapsed) / 1000.0;
    Ok(FloodRun {
        sent,
        eagain,
        other,
        elapsed_s,
        accepted: a1.saturating_sub(a0),
        watchd_cpu_pct: cpu_pct(c1.saturating_sub(c0), ticks, m0, m1),
        restarts,
    })
}

fn cpu_pct(ticks: u64, per_second: u64, from_ns: u64, to_ns: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let cpu_s = ticks as f64 / per_second as f64;
    let wall_s = ms_between(from_ns, to_ns) / 1000.0;
    100.0 * cpu_s / wall_s
}

fn throughput_section(paths: &Paths, reports: &mut Reports, plan: &Plan) -> Result<String> {
    let mut t = Table::new(&[
        "clients",
        "runs",
        "sent/s (FT_OK)",
        "accepted/s (listener.accepted)",
        "accepted/s min – max",
        "dropped/s (FT_EAGAIN)",
        "other errors",
        "watchd CPU % of one core",
        "restarts",
    ]);
    for &clients in &plan.flood_clients {
        let mut runs = Vec::with_capacity(plan.flood_repeats);
        let mut failure = None;
        for run in 0..plan.flood_repeats {
            eprintln!(
                "bench: throughput: {clients} client(s), {} s, run {} of {}",
                plan.flood_seconds,
                run + 1,
                plan.flood_repeats
            );
            match flood(paths, reports, clients, plan.flood_seconds) {
                Ok(r) => runs.push(r),
                Err(e) => {
                    harness::check_interrupted()?;
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            t.row(vec![
                clients.to_string(),
                plan.flood_repeats.to_string(),
                format!("FAILED: {}", one_line(&e)),
            ]);
            continue;
        }
        #[allow(clippy::cast_precision_loss)]
        let rate = |f: fn(&FloodRun) -> u64| -> Vec<f64> {
            sorted(runs.iter().map(|r| f(r) as f64 / r.elapsed_s).collect())
        };
        let accepted = rate(|r| r.accepted);
        let median = |v: &[f64]| format!("{:.0}", percentile(v, 50.0));
        t.row(vec![
            clients.to_string(),
            format!("{} × {} s", runs.len(), plan.flood_seconds),
            median(&rate(|r| r.sent)),
            median(&accepted),
            format!(
                "{:.0} – {:.0}",
                accepted.first().copied().unwrap_or(f64::NAN),
                accepted.last().copied().unwrap_or(f64::NAN)
            ),
            median(&rate(|r| r.eagain)),
            runs.iter().map(|r| r.other).sum::<u64>().to_string(),
            median(&sorted(runs.iter().map(|r| r.watchd_cpu_pct).collect())),
            runs.iter().map(|r| r.restarts).sum::<u64>().to_string(),
        ]);
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### 3. heartbeat throughput into watchd\n\nEach client is a supervised service (the C \
         program, mode `flood`): after ft_reg_watch it calls ft_hbeat(1, 60000) in a tight loop \
         for the given time. sent = calls that returned FT_OK; dropped = FT_EAGAIN (ft.sock's \
         queue full: the datagram was not sent); accepted = the difference of `status` → \
         listener.accepted before the start and after the queue drained, divided by the \
         clients' sending time. Rates are medians over the runs (nearest rank), each run with a \
         fresh watchd; watchd CPU is measured while the clients send.\n"
    );
    s.push_str(&t.render());
    s.push('\n');
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// 4. CPU and memory with N services

#[derive(Debug)]
struct ResourceRun {
    processes: usize,
    cpu_pct: f64,
    rss_kib: u64,
    pss_kib: u64,
    start_all_s: f64,
    restarts: usize,
    window_s: f64,
    /// watchd only: its unusual events over the whole run.
    events: String,
}

fn resources(
    paths: &Paths,
    reports: &mut Reports,
    kind: Kind,
    n: usize,
    plan: &Plan,
) -> Result<ResourceRun> {
    reports.drain()?;
    let services: Vec<Service> = (0..n)
        .map(|i| {
            Service::new(
                format!("hb{i:04}"),
                &["beat", RES_INTERVAL_MS, RES_TIMEOUT_MS],
            )
        })
        .collect();
    let t_spawn = mono_ns();
    let mut sup = Running::start(kind, paths, &format!("res{n}"), &services)?;
    let mut started = std::collections::HashSet::new();
    let mut last_at = t_spawn;
    let end = Instant::now() + START_ALL_TIMEOUT;
    while started.len() < n {
        if Instant::now() >= end {
            bail!(
                "{} started only {} of {n} services within {START_ALL_TIMEOUT:?}",
                kind.name(),
                started.len()
            );
        }
        sup.check_alive()?;
        let remaining = end.saturating_duration_since(Instant::now());
        let r = reports.wait_for(remaining, "start report", |r| {
            matches!(r, Report::Start { .. })
        })?;
        if let Report::Start { pid, .. } = r.report {
            if started.is_empty() {
                sup.note_service(pid);
            }
            started.insert(pid);
            last_at = r.at;
        }
    }
    let start_all_s = ms_between(t_spawn, last_at) / 1000.0;
    let count_starts = |v: Vec<Received>| {
        v.iter()
            .filter(|r| matches!(r.report, Report::Start { .. }))
            .count()
    };
    harness::sleep(plan.resource_settle)?;
    let mut restarts = count_starts(reports.drain()?);
    let pids = sup.accounted_pids();
    let expected = if kind == Kind::Runit { n + 1 } else { 1 };
    if pids.len() != expected {
        bail!(
            "{}: expected {expected} supervisor processes, found {}",
            kind.name(),
            pids.len()
        );
    }
    let sum_ticks = |pids: &[i32]| -> Result<u64> {
        pids.iter()
            .map(|p| harness::cpu_ticks(*p))
            .sum::<Result<u64>>()
    };
    let ticks = harness::clock_ticks_per_second()?;
    let c0 = sum_ticks(&pids)?;
    let m0 = mono_ns();
    let window_end = Instant::now() + plan.resource_window;
    while Instant::now() < window_end {
        harness::sleep(
            window_end
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1)),
        )?;
        restarts += count_starts(reports.drain()?);
        sup.check_alive()?;
    }
    let c1 = sum_ticks(&pids)?;
    let m1 = mono_ns();
    let rss_kib = pids
        .iter()
        .map(|p| harness::rss_kib(*p))
        .sum::<Result<u64>>()?;
    let pss_kib = pids
        .iter()
        .map(|p| harness::pss_kib(*p))
        .sum::<Result<u64>>()?;
    let events = if kind == Kind::Watchd {
        let mut e = sup.unusual_events()?;
        let failed = sup.service_log_lines("ft_hbeat: ");
        if failed > 0 {
            let _ = write!(
                e,
                "; failed ft_hbeat calls logged by the services: {failed}"
            );
        }
        e
    } else {
        String::new()
    };
    sup.stop()?;
    Ok(ResourceRun {
        processes: pids.len(),
        cpu_pct: cpu_pct(c1.saturating_sub(c0), ticks, m0, m1),
        rss_kib,
        pss_kib,
        start_all_s,
        restarts,
        window_s: ms_between(m0, m1) / 1000.0,
        events,
    })
}

fn resources_section(paths: &Paths, reports: &mut Reports, plan: &Plan) -> Result<String> {
    let mut t = Table::new(&[
        "services",
        "supervisor",
        "processes measured",
        "CPU % of one core",
        "RSS MiB",
        "PSS MiB",
        "all started after s",
        "restarts in window",
    ]);
    for &n in &plan.resource_counts {
        for kind in Kind::ALL {
            eprintln!("bench: resources: {} with {n} services", kind.name());
            match resources(paths, reports, kind, n, plan) {
                Ok(r) => {
                    #[allow(clippy::cast_precision_loss)]
                    let (rss, pss) = (r.rss_kib as f64 / 1024.0, r.pss_kib as f64 / 1024.0);
                    t.row(vec![
                        n.to_string(),
                        kind.name().into(),
                        r.processes.to_string(),
                        format!("{:.2} (over {:.1} s)", r.cpu_pct, r.window_s),
                        format!("{rss:.1}"),
                        format!("{pss:.1}"),
                        format!("{:.2}", r.start_all_s),
                        if r.events.is_empty() {
                            r.restarts.to_string()
                        } else {
                            format!("{} (watchd events: {})", r.restarts, r.events)
                        },
                    ]);
                }
                Err(e) => {
                    harness::check_interrupted()?;
                    t.row(vec![
                        n.to_string(),
                        kind.name().into(),
                        format!("FAILED: {}", one_line(&e)),
                    ]);
                }
            }
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### 4. supervisor CPU and memory with N services\n\nN copies of the C program; under \
         watchd each calls ft_hbeat(1, {RES_TIMEOUT_MS}) every {RES_INTERVAL_MS} ms; under \
         supervisord and runit the same binary sleeps (FT_SOCKET unset: no heartbeats, which they \
         could not consume anyway). After all N reported and a settling pause of {} s: CPU = \
         utime+stime (/proc/PID/stat, 10 ms ticks) over the window as % of one core; RSS = VmRSS and \
         PSS = Pss of smaps_rollup (shared pages split among their users) at the end. \
         watchd and supervisord: the daemon's process (all threads); runit: runsvdir + the N runsv \
         processes, summed. \"all started after\" = from launching the supervisor to the N-th \
         start report. \"restarts in window\" counts start reports after all N had started (0 \
         expected); for watchd it also lists its events other than spawned/ready/reloaded, and \
         the failed ft_hbeat calls the services printed (each prints its first 10).\n",
        plan.resource_settle.as_secs()
    );
    s.push_str(&t.render());
    let _ = writeln!(
        s,
        "\nsupervisord: [supervisord] {}; programs as in table 1 (stdout/stderr to AUTO log files). \
         watchd: as in table 1, hang = {{ heartbeat = true }}. runit: as in table 1.\n",
        peers::SUPERVISORD_DAEMON.trim().replace('\n', ", ")
    );
    Ok(s)
}
