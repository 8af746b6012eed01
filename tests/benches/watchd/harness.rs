//! The benchmark's plumbing: clocks, the report socket the supervised program talks to, the
//! process sweep that leaves nothing running, /proc sampling, watchd's control socket, and
//! percentiles and tables.
//!
//! It measures and cleans up; it never decides what a scenario does. It only ever signals
//! processes that descend from the benchmark itself (it is their child subreaper).

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How long one blocking wait sleeps at most before looking at the interrupt flag.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// How long the final sweep keeps killing descendants before it gives up.
const SWEEP_LIMIT: Duration = Duration::from_secs(10);
/// Pause between two rounds of the sweep, so that the killed get reaped.
const SWEEP_PAUSE: Duration = Duration::from_millis(20);
/// Longest wait for one answer on watchd's control socket.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of one report datagram buffer (the program's reports are under 160 bytes).
const REPORT_BUF: usize = 256;

pub const NS_PER_MS: f64 = 1e6;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT/SIGTERM set a flag that every wait checks, so that Ctrl-C unwinds through the
/// Drop guards instead of killing the benchmark with its supervisors still running.
pub fn install_interrupt_handler() -> Result<()> {
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe; no other
        // code of this program installs a handler for these signals.
        unsafe { signal::signal(sig, SigHandler::Handler(on_interrupt)) }
            .with_context(|| format!("installing a handler for {sig}"))?;
    }
    Ok(())
}

/// Fails once the user asked the benchmark to stop.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, in slices, failing early on Ctrl-C.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(POLL_SLICE));
    }
}

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and both clock
    // ids used here exist on every Linux kernel.
    let rc = unsafe { libc::clock_gettime(id, &raw mut ts) };
    assert_eq!(
        rc, 0,
        "clock_gettime cannot fail for CLOCK_MONOTONIC/REALTIME"
    );
    let secs = u64::try_from(ts.tv_sec).expect("the clocks are past 1970");
    let nanos = u64::try_from(ts.tv_nsec).expect("tv_nsec is in [0, 1e9)");
    secs * 1_000_000_000 + nanos
}

/// CLOCK_MONOTONIC in ns: the clock the supervised program stamps its reports with.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME in ns: the clock of watchd's event times.
pub fn real_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// Milliseconds from `from_ns` to `to_ns` (negative when `to` is earlier).
pub fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    // Precision loss above 2^53 ns (104 days) is irrelevant for latencies.
    #[allow(clippy::cast_precision_loss)]
    let (from, to) = (from_ns as f64, to_ns as f64);
    (to - from) / NS_PER_MS
}

/// One line the supervised program sent (see tests/benches/peer/supervised.c).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The program just started.
    Start { pid: i32, mono: u64, real: u64 },
    /// libft accepted heartbeat `seq`; the clocks were read just before `ft_hbeat`.
    Heartbeat {
        pid: i32,
        seq: u64,
        mono: u64,
        real: u64,
    },
    /// A flooding client registered and waits for SIGUSR1.
    Armed { pid: i32 },
    /// A flooding client finished.
    Flood {
        pid: i32,
        ok: u64,
        eagain: u64,
        other: u64,
        elapsed_ns: u64,
    },
}

impl Report {
    fn parse(text: &str) -> Option<Report> {
        let f: Vec<&str> = text.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        let pid = f.get(1).and_then(|s| s.parse::<i32>().ok())?;
        match (f.first().copied(), f.len()) {
            (Some("start"), 4) => Some(Report::Start {
                pid,
                mono: n(2)?,
                real: n(3)?,
            }),
            (Some("hb"), 5) => Some(Report::Heartbeat {
                pid,
                seq: n(2)?,
                mono: n(3)?,
                real: n(4)?,
            }),
            (Some("armed"), 2) => Some(Report::Armed { pid }),
            (Some("flood"), 6) => Some(Report::Flood {
                pid,
                ok: n(2)?,
                eagain: n(3)?,
                other: n(4)?,
                elapsed_ns: n(5)?,
            }),
            _ => None,
        }
    }
}

/// A report and the benchmark's CLOCK_MONOTONIC when it was read.
#[derive(Debug, Clone)]
pub struct Received {
    pub report: Report,
    pub at: u64,
}

/// The Unix datagram socket every supervised program reports to.
#[derive(Debug)]
pub struct Reports {
    socket: UnixDatagram,
    pending: VecDeque<Received>,
}

impl Reports {
    pub fn bind(path: &Path) -> Result<Reports> {
        let socket =
            UnixDatagram::bind(path).with_context(|| format!("binding {}", path.display()))?;
        socket
            .set_read_timeout(Some(POLL_SLICE))
            .context("setting the report socket's timeout")?;
        Ok(Reports {
            socket,
            pending: VecDeque::new(),
        })
    }

    /// Reads one datagram if one comes within a poll slice.
    fn read_one(&mut self) -> Result<Option<Received>> {
        let mut buf = [0u8; REPORT_BUF];
        match self.socket.recv(&mut buf) {
            Ok(len) => {
                let at = mono_ns();
                let text = String::from_utf8_lossy(&buf[..len]);
                match Report::parse(&text) {
                    Some(report) => Ok(Some(Received { report, at })),
                    None => bail!("the supervised program sent an unknown report {text:?}"),
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("reading the report socket"),
        }
    }

    /// Drops every report that arrived so far and returns them.
    pub fn drain(&mut self) -> Result<Vec<Received>> {
        let mut all: Vec<Received> = self.pending.drain(..).collect();
        self.socket.set_nonblocking(true).context("nonblocking")?;
        let result = loop {
            let mut buf = [0u8; REPORT_BUF];
            match self.socket.recv(&mut buf) {
                Ok(len) => {
                    let at = mono_ns();
                    let text = String::from_utf8_lossy(&buf[..len]);
                    if let Some(report) = Report::parse(&text) {
                        all.push(Received { report, at });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(all),
                Err(e) => break Err(e).context("draining the report socket"),
            }
        };
        self.socket.set_nonblocking(false).context("blocking")?;
        result
    }

    /// The first report (in arrival order) for which `pick` is true, within `timeout`. Reports
    /// that do not match are kept, in order, for later calls.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&Report) -> bool,
    ) -> Result<Received> {
        if let Some(i) = self.pending.iter().position(|r| pick(&r.report)) {
            return Ok(self.pending.remove(i).expect("the index was just found"));
        }
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            check_interrupted()?;
            if let Some(r) = self.read_one()? {
                if pick(&r.report) {
                    return Ok(r);
                }
                self.pending.push_back(r);
            }
        }
        bail!("no {what} within {timeout:?}")
    }
}

/// One process as /proc shows it.
#[derive(Debug, Clone)]
pub struct ProcEntry {
    pub ppid: i32,
    pub comm: String,
}

/// Every process of the system, by pid (a snapshot of /proc/*/stat).
pub fn process_table() -> HashMap<i32, ProcEntry> {
    let mut table = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm may contain spaces and parentheses: it ends at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if let Some(ppid) = rest.get(1).and_then(|s| s.parse::<i32>().ok()) {
            let comm = stat[open + 1..close].to_owned();
            table.insert(pid, ProcEntry { ppid, comm });
        }
    }
    table
}

/// All descendants of `root` (not `root` itself).
pub fn descendants_of(table: &HashMap<i32, ProcEntry>, root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, e) in table {
        children.entry(e.ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).map_or(&[][..], Vec::as_slice) {
            out.push(c);
            queue.push(c);
        }
    }
    out
}

/// Makes the benchmark the reaper of every orphan below it, so that a supervisor that dies
/// leaves its services to us (and to [`sweep`]) instead of to init.
pub fn become_subreaper() -> Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        bail!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Reaps every child that has ended.
fn reap() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// SIGKILLs, by pid, every process that descends from the benchmark, until none is left (or
/// [`SWEEP_LIMIT`] passed). Returns how many processes were signalled.
pub fn sweep() -> usize {
    let me = i32::try_from(std::process::id()).expect("pids fit in i32");
    let end = Instant::now() + SWEEP_LIMIT;
    let mut killed = 0;
    loop {
        reap();
        let table = process_table();
        let alive: Vec<i32> = descendants_of(&table, me)
            .into_iter()
            .filter(|p| !is_zombie(*p))
            .collect();
        if alive.is_empty() || Instant::now() >= end {
            return killed;
        }
        for pid in alive {
            if signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        std::thread::sleep(SWEEP_PAUSE);
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(true)
}

/// Kills everything below the benchmark when dropped (also on panic and on Ctrl-C).
#[derive(Debug)]
pub struct SweepGuard;

impl Drop for SweepGuard {
    fn drop(&mut self) {
        let n = sweep();
        if n > 0 {
            eprintln!("bench: cleanup killed {n} leftover process(es)");
        }
    }
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let close = stat.rfind(')').context("malformed stat")?;
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the comm: state is field 3, utime field 14, stime field 15 (1-based).
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Resident set size of a process in KiB (VmRSS).
pub fn rss_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?;
    Ok(kib)
}

/// Proportional set size of a process in KiB (Pss in smaps_rollup): shared pages divided among
/// the processes that map them, so that sums over many processes do not count libc N times.
pub fn pss_kib(pid: i32) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let line = rollup
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .context("no Pss")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("malformed Pss")?
        .parse()?;
    Ok(kib)
}

/// Clock ticks per second of /proc's utime and stime.
pub fn clock_ticks_per_second() -> Result<u64> {
    // SAFETY: sysconf reads a constant of the C library and touches no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|t| *t > 0)
        .context("sysconf(_SC_CLK_TCK) failed")
}

/// One request on watchd's control socket; the first answer line, parsed.
pub fn control(socket: &Path, request: &serde_json::Value) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading watchd's answer")?;
    serde_json::from_str(&answer).with_context(|| format!("watchd answered {answer:?}"))
}

/// A request whose answer is several lines, ended by `{"result":"end"}` (events).
pub fn control_lines(socket: &Path, request: &serde_json::Value) -> Result<Vec<serde_json::Value>> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut out = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading watchd's answer")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("watchd answered {line:?}"))?;
        if v["result"] == "end" {
            break;
        }
        out.push(v);
    }
    Ok(out)
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(clippy::cast_precision_loss)]
    let n = sorted.len() as f64;
    let rank = (p / 100.0 * n).ceil().max(1.0);
    // `rank` is in [1, len]: the cast is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let index = (rank as usize).min(sorted.len()) - 1;
    sorted[index]
}

/// Sorts samples for [`percentile`].
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// A markdown table.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, w) in width.iter().enumerate() {
                let c = cells.get(i).map_or("", String::as_str);
                let pad = w.saturating_sub(c.chars().count());
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.header);
        out.push('|');
        for w in &width {
            let _ = write!(out, "{}|", "-".repeat(w + 2));
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// Prints a piece of the report at once (a full run takes minutes) and keeps it for `--out`.
pub fn emit(doc: &mut String, text: &str) {
    print!("{text}");
    let _ = std::io::stdout().flush();
    doc.push_str(text);
}

/// target/release: a bench executable is target/release/deps/<bench>-<hash>.
pub fn release_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let deps = exe.parent().context("the executable has no directory")?;
    let dir = deps
        .parent()
        .context("the executable's directory has no parent")?;
    Ok(dir.to_path_buf())
}

/// The first file named `tool` in a directory of `PATH`.
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
