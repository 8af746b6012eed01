//! The file-replication benchmark (issue 4): the overhead replication adds to a write-heavy
//! application (through the LD_PRELOAD shim and through libft's file API, async and sync), the
//! throughput of replication to one backup over loopback next to a raw TCP copy of the same
//! bytes, and copy mode next to lsyncd + rsync, all measured on one machine in one run.
//!
//! Run: `cargo build --release --workspace && cargo bench -p ftkit-tests --bench repl`
//! (`-- --quick` for a short run, `-- --out FILE` to also write the markdown, `-- --only
//! overhead,throughput,copy`, `-- --bin-dir DIR` for the binaries, `-- --dir DIR` for the
//! scratch directory, `-- --fs dir` to keep the files there instead of on a private
//! loop-mounted ext4, the default for root). The binaries (watchd, ftctl, libft.so,
//! libftrepl.so) are copied into a private directory first, so a rebuild of target/release
//! during the run changes nothing. Both watchds run on this host and talk over 127.0.0.1; the
//! workload is a small C program compiled here with `cc`. It prints tables; it is not a test
//! and asserts nothing about the numbers.

// Shared with the watchd benchmark; not every helper is used here.
#[allow(dead_code)]
#[path = "watchd/harness.rs"]
mod harness;
#[path = "repl/loopfs.rs"]
mod loopfs;
#[path = "repl/lsyncd.rs"]
mod lsyncd;
#[path = "repl/pair.rs"]
mod pair;
#[path = "repl/rawcopy.rs"]
mod rawcopy;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use harness::{Table, mono_ns, percentile, sorted};
use pair::{Bins, Pair, PairSpec, Source};

const USAGE: &str = "usage: repl-bench [--quick] [--out FILE] [--bin-dir DIR] [--dir DIR] \
[--fs loop|dir] [--only overhead,throughput,copy] [--reps N] [--keep]";

/// The workload program, compiled by the benchmark itself.
const WORKLOAD_SOURCE: &str = include_str!("repl/workload.c");
/// libft's C header, next to the program's source in the scratch directory.
const FT_HEADER: &str = include_str!("../../libft/include/ft.h");
/// What the benchmark copies into its private binary directory.
const BINARIES: [&str; 4] = ["watchd", "ftctl", "libft.so", "libftrepl.so"];

/// How runs keep out of each other's way on the file system (printed with tables 1 and 2).
const FRESH_DIRS: &str = "Every run writes into a new directory. Trees of many small files \
stay until the end of the benchmark: ext4 skips inodes freed in the last minutes when it \
allocates new ones (`recently_deleted`), so creates right after removing tens of thousands of \
files cost up to ten times more CPU. Large files are removed (replicated) after their run.";
/// Target of table 1: async replication adds at most this much to the application's time (%).
const TARGET_ASYNC_OVERHEAD_PCT: f64 = 5.0;
/// Target of table 2: replication reaches at least this share of a raw TCP copy (%).
const TARGET_THROUGHPUT_PCT: f64 = 50.0;

/// The default ring (watchd's `ring_size` default).
const RING_DEFAULT: u64 = 64 << 20;
/// A ring larger than any burst of table 1, to separate the cost of logging from the cost of
/// waiting for ring space when the application outruns replication.
const RING_LARGE: u64 = 512 << 20;
/// Block size of the "many 4 KiB writes" workloads.
const BLOCK: u64 = 4096;
/// Block size of the large-writes throughput workload.
const BIG_BLOCK: u64 = 1 << 20;
/// Size of each small file.
const SMALL_FILE: u64 = 4096;
/// How long a sync-mode write waits for the backup (watchd's default `sync_timeout`).
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy mode's quiet interval and lsyncd's delay (watchd's default `quiet`).
const QUIET: Duration = Duration::from_millis(500);
/// Files per directory of the copy-mode tree.
const FILES_PER_DIR: usize = 1000;
/// Pause between two looks at the copy target while waiting for it to be identical.
const COPY_POLL: Duration = Duration::from_millis(2);
/// Pause between two status polls of the throughput table's acknowledgement watcher.
const ACK_POLL: Duration = Duration::from_millis(5);
/// fdatasync samples of the machine header.
const FSYNC_PROBES: usize = 20;
/// Size of the private file system's sparse image (full run / --quick): room for every tree
/// the benchmark keeps (about 9 GB in a full run).
const LOOP_FS_FULL: u64 = 24 << 30;
const LOOP_FS_QUICK: u64 = 8 << 30;
/// Longest wait for the initial copy of the copy-mode tree (either tool).
const INITIAL_COPY_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Overhead,
    Throughput,
    Copy,
}

impl Section {
    const ALL: [Section; 3] = [Section::Overhead, Section::Throughput, Section::Copy];

    fn parse(s: &str) -> Option<Section> {
        Some(match s {
            "overhead" => Section::Overhead,
            "throughput" => Section::Throughput,
            "copy" => Section::Copy,
            _ => return None,
        })
    }
}

#[derive(Debug)]
struct Options {
    quick: bool,
    out: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
    dir: Option<PathBuf>,
    only: Vec<Section>,
    reps: Option<usize>,
    keep: bool,
    /// Files on a private loop-mounted ext4 (default where possible) or directly in the
    /// scratch directory.
    loop_fs: Option<bool>,
    args: Vec<String>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        quick: false,
        out: None,
        bin_dir: None,
        dir: None,
        only: Section::ALL.to_vec(),
        reps: None,
        keep: false,
        loop_fs: None,
        args: std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect(),
    };
    let mut args = o.args.clone().into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--keep" => o.keep = true,
            "--out" => o.out = Some(args.next().context(USAGE)?.into()),
            "--bin-dir" => o.bin_dir = Some(args.next().context(USAGE)?.into()),
            "--dir" => o.dir = Some(args.next().context(USAGE)?.into()),
            "--fs" => {
                o.loop_fs = Some(match args.next().context(USAGE)?.as_str() {
                    "loop" => true,
                    "dir" => false,
                    other => bail!("--fs {other:?}: {USAGE}"),
                });
            }
            "--reps" => {
                let n: usize = args.next().context(USAGE)?.parse().context(USAGE)?;
                if n == 0 {
                    bail!("--reps must be at least 1");
                }
                o.reps = Some(n);
            }
            "--only" => {
                let list = args.next().context(USAGE)?;
                o.only = list
                    .split(',')
                    .map(|s| Section::parse(s).with_context(|| format!("{s:?}: {USAGE}")))
                    .collect::<Result<_>>()?;
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

/// One run of the C workload: what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `files` files of `bytes` each, written in `block`-byte pwrite calls.
    Big { files: u64, bytes: u64, block: u64 },
    /// `files` files of `bytes` each: create, one write, close.
    Small { files: u64, bytes: u64 },
}

impl Workload {
    fn args(&self, dir: &Path) -> Vec<String> {
        let d = dir.display().to_string();
        match *self {
            Workload::Big {
                files,
                bytes,
                block,
            } => vec![
                "big".into(),
                d,
                files.to_string(),
                bytes.to_string(),
                block.to_string(),
            ],
            Workload::Small { files, bytes } => {
                vec!["small".into(), d, files.to_string(), bytes.to_string()]
            }
        }
    }

    fn label(&self) -> String {
        match *self {
            Workload::Big {
                files,
                bytes,
                block,
            } => format!(
                "{files} × {} files, {} pwrite calls",
                size(bytes),
                size(block)
            ),
            Workload::Small { files, bytes } => {
                format!(
                    "{} × {} files: create, write, close",
                    thousands(files),
                    size(bytes)
                )
            }
        }
    }

    fn bytes(&self) -> u64 {
        match *self {
            Workload::Big { files, bytes, .. } | Workload::Small { files, bytes } => files * bytes,
        }
    }

    /// Whether a run's files stay until the end of the benchmark instead of being removed
    /// after the run. ext4 skips inodes freed in the last minutes when it allocates new
    /// ones (`recently_deleted` in ialloc.c), so after removing tens of thousands of files
    /// every create scans past them and costs up to ten times more CPU; runs that create many
    /// files therefore never follow a mass removal. A few large files do not matter.
    fn keeps_files(&self) -> bool {
        matches!(self, Workload::Small { .. })
    }

    /// The unit of "per call": a write call (big) or a file (small).
    fn units(&self) -> (u64, &'static str) {
        match *self {
            Workload::Big {
                files,
                bytes,
                block,
            } => (files * bytes.div_ceil(block), "write"),
            Workload::Small { files, .. } => (files, "file"),
        }
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How much of everything a run does.
#[derive(Debug)]
struct Plan {
    reps: usize,
    big: Workload,
    small: Workload,
    big_sync: Workload,
    small_sync: Workload,
    throughput: Vec<Workload>,
    copy_counts: Vec<usize>,
}

impl Plan {
    fn new(quick: bool, reps: Option<usize>) -> Plan {
        let big = |files, mib: u64, block| Workload::Big {
            files,
            bytes: mib << 20,
            block,
        };
        let small = |files| Workload::Small {
            files,
            bytes: SMALL_FILE,
        };
        if quick {
            Plan {
                reps: reps.unwrap_or(3),
                big: big(4, 16, BLOCK),
                small: small(5000),
                big_sync: big(1, 1, BLOCK),
                small_sync: small(250),
                throughput: vec![big(4, 16, BLOCK), big(4, 16, BIG_BLOCK), small(5000)],
                copy_counts: vec![1, 1000],
            }
        } else {
            Plan {
                reps: reps.unwrap_or(5),
                big: big(4, 64, BLOCK),
                small: small(20_000),
                big_sync: big(1, 4, BLOCK),
                small_sync: small(1000),
                throughput: vec![big(4, 64, BLOCK), big(4, 64, BIG_BLOCK), small(20_000)],
                copy_counts: vec![1, 1000, 100_000],
            }
        }
    }
}

/// Where everything is.
#[derive(Debug)]
struct Env {
    bins: Bins,
    scratch: PathBuf,
    ring_dir: PathBuf,
    /// The workload without libft (plain syscalls; the shim intercepts them).
    program_sys: PathBuf,
    /// The workload on libft's file API.
    program_ft: PathBuf,
    pairs: std::cell::Cell<u32>,
    /// The file system of `scratch`, for the report.
    files_description: String,
}

impl Env {
    fn pair(&self, spec: PairSpec) -> Result<Pair> {
        let n = self.pairs.get() + 1;
        self.pairs.set(n);
        let dir = self.scratch.join(format!("pair{n}"));
        let pair = Pair::start(&self.bins, &dir, &self.ring_dir, spec)
            .with_context(|| format!("starting watchd pair {n} ({})", spec.describe()))?;
        pair.adopt_filesets()?;
        Ok(pair)
    }
}

/// Removes the private ring directory (tmpfs) when dropped.
#[derive(Debug)]
struct RingDirGuard(PathBuf);

impl Drop for RingDirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("repl-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let opts = parse_args()?;
    let began = Instant::now();
    let plan = Plan::new(opts.quick, opts.reps);
    harness::install_interrupt_handler()?;
    harness::become_subreaper()?;
    for tool in ["cc", "lsyncd", "rsync"] {
        if harness::find_in_path(tool).is_none() {
            bail!("{tool} not found in PATH: run .ci/install-bench-peers");
        }
    }
    let source_bins = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => harness::release_dir()?,
    };
    for file in BINARIES {
        if !source_bins.join(file).is_file() {
            bail!(
                "{file} not found in {}: run `cargo build --release --workspace` first",
                source_bins.display()
            );
        }
    }
    let mut builder = tempfile::Builder::new();
    builder.prefix("ftkit-repl-bench-");
    let scratch = match &opts.dir {
        Some(d) => {
            fs::create_dir_all(d)?;
            builder.tempdir_in(d)
        }
        None => builder.tempdir(),
    }
    .context("creating the scratch directory")?;
    let use_loop = opts.loop_fs.unwrap_or_else(loopfs::LoopFs::available);
    let loop_fs = if use_loop {
        let size = if opts.quick {
            LOOP_FS_QUICK
        } else {
            LOOP_FS_FULL
        };
        Some(
            loopfs::LoopFs::create(scratch.path(), size)
                .context("creating the private file system (`--fs dir` does without)")?,
        )
    } else {
        None
    };
    let ring_dir = PathBuf::from(format!("/dev/shm/ftkit-repl-bench-{}", std::process::id()));
    fs::create_dir_all(&ring_dir).with_context(|| format!("creating {}", ring_dir.display()))?;
    let _ring_guard = RingDirGuard(ring_dir.clone());
    // Declared after `scratch` and the ring directory, so it runs first: no watchd or lsyncd
    // may still use them when they are removed.
    let _sweep = harness::SweepGuard;
    let scratch_path = fs::canonicalize(
        loop_fs
            .as_ref()
            .map_or_else(|| scratch.path(), loopfs::LoopFs::path),
    )?;
    let files_description = loop_fs
        .as_ref()
        .map_or_else(|| filesystem_of(&scratch_path), |l| l.description.clone());

    let bins = Bins {
        dir: scratch_path.join("bin"),
    };
    fs::create_dir_all(&bins.dir)?;
    for file in BINARIES {
        fs::copy(source_bins.join(file), bins.dir.join(file))
            .with_context(|| format!("copying {file} into the private binary directory"))?;
    }
    let (program_sys, program_ft) = compile_workload(&scratch_path, &bins)?;
    let env = Env {
        bins,
        scratch: scratch_path.clone(),
        ring_dir,
        program_sys,
        program_ft,
        pairs: std::cell::Cell::new(0),
        files_description,
    };

    let mut doc = String::new();
    harness::emit(&mut doc, &machine_header(&opts, &plan, &source_bins, &env)?);
    for section in &opts.only {
        let load_before = loadavg();
        let result = match section {
            Section::Overhead => overhead_section(&env, &plan),
            Section::Throughput => throughput_section(&env, &plan),
            Section::Copy => copy_section(&env, &plan),
        };
        let text = match result {
            Ok(t) => t,
            Err(e) => {
                harness::check_interrupted()?;
                format!("FAILED: {}\n", one_line(&e))
            }
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
    eprintln!("repl-bench: done in {:.0} s", began.elapsed().as_secs_f64());
    if opts.keep {
        if let Some(l) = loop_fs {
            eprintln!(
                "repl-bench: left {} mounted; to remove it: umount it, `losetup -d` its device \
                 and delete the scratch directory",
                l.path().display()
            );
            std::mem::forget(l);
        }
        let kept = scratch.keep();
        eprintln!("repl-bench: kept the scratch directory {}", kept.display());
    }
    if let Some(out) = &opts.out {
        fs::write(out, &doc).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("repl-bench: wrote {}", out.display());
    }
    Ok(())
}

/// The last `max` bytes of `text` (or a little less, at a character boundary).
pub fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['\n', '|'], " ")
}

/// Compiles the workload twice: plain syscalls, and on libft's API (linked to the private
/// libft.so with an rpath).
fn compile_workload(scratch: &Path, bins: &Bins) -> Result<(PathBuf, PathBuf)> {
    let src = scratch.join("workload.c");
    let include = scratch.join("include");
    fs::create_dir_all(&include)?;
    fs::write(&src, WORKLOAD_SOURCE)?;
    fs::write(include.join("ft.h"), FT_HEADER)?;
    let sys = scratch.join("workload-sys");
    let ft = scratch.join("workload-ft");
    let common = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror"];
    let mut plain = Command::new("cc");
    plain.args(common).arg(&src).arg("-o").arg(&sys);
    let mut with_ft = Command::new("cc");
    with_ft
        .args(common)
        .arg("-DUSE_FT")
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&ft)
        .arg("-L")
        .arg(&bins.dir)
        .arg(format!("-Wl,-rpath,{}", bins.dir.display()))
        .arg("-lft");
    for cmd in [&mut plain, &mut with_ft] {
        let out = cmd.output().context("running cc")?;
        if !out.status.success() {
            bail!(
                "cc failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok((sys, ft))
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

/// The first line of a command's output (stdout, else stderr), whatever its exit status.
fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The file system a path lives on, from /proc/self/mounts (longest matching mount point).
fn filesystem_of(path: &Path) -> String {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return "unknown".into();
    };
    let p = path.to_string_lossy();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dev), Some(point), Some(kind)) = (f.first(), f.get(1), f.get(2)) else {
            continue;
        };
        let covers = *point == "/"
            || p == *point
            || p.strip_prefix(point).is_some_and(|r| r.starts_with('/'));
        if covers && best.as_ref().is_none_or(|(len, _)| point.len() > *len) {
            best = Some((point.len(), format!("{kind} on {dev} (mounted at {point})")));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, s)| s)
}

/// Median time of a 4 KiB write + fdatasync in `dir`: what one durable append costs here.
fn fdatasync_ms(dir: &Path) -> Result<f64> {
    let path = dir.join("fdatasync-probe");
    let mut f = fs::File::create(&path)?;
    let block = vec![0x5au8; 4096];
    let mut samples = Vec::with_capacity(FSYNC_PROBES);
    for _ in 0..FSYNC_PROBES {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(f);
    fs::remove_file(&path)?;
    Ok(percentile(&sorted(samples), 50.0))
}

fn machine_header(opts: &Options, plan: &Plan, source_bins: &Path, env: &Env) -> Result<String> {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or_else(|| "unknown".to_owned(), |kib| format!("{} GiB", kib >> 20));
    let built = fs::metadata(source_bins.join("watchd"))
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
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let commit = command_output(
        "git",
        &[
            "-C",
            &repo.display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args([
            "diff", "--quiet", "HEAD", "--", "repl", "libft", "watchd", "cluster",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(" (git status unknown)", |s| {
            if s.success() {
                ", repl/ libft/ watchd/ cluster/ unchanged since"
            } else {
                " + uncommitted changes in repl/, libft/, watchd/ or cluster/"
            }
        });
    let mut cmdline = String::from("cargo bench -p ftkit-tests --bench repl");
    if !opts.args.is_empty() {
        let _ = write!(cmdline, " -- {}", opts.args.join(" "));
    }
    let mut h = String::new();
    let _ = writeln!(h, "## File replication benchmark\n");
    let _ = writeln!(h, "- command: `{cmdline}`");
    let _ = writeln!(
        h,
        "- date: {}",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(
        h,
        "- machine: {cores} cores ({cpu}), {mem} RAM, Linux {kernel}, {os}"
    );
    let _ = writeln!(
        h,
        "- files: {} ({}); 4 KiB write + fdatasync there: {:.2} ms (median of {FSYNC_PROBES}); \
         rings in {} ({})",
        env.scratch.display(),
        env.files_description,
        fdatasync_ms(&env.scratch)?,
        env.ring_dir.display(),
        filesystem_of(&env.ring_dir)
    );
    let _ = writeln!(
        h,
        "- mode: {}; binaries copied from {} (watchd built {built}; source: commit {commit}{dirty}): {}",
        if opts.quick { "--quick" } else { "full" },
        source_bins.display(),
        first_line(&env.bins.watchd().display().to_string(), &["--version"])
    );
    let _ = writeln!(
        h,
        "- peers: lsyncd {}, {}; compiler: {}",
        first_line("lsyncd", &["-version"]).trim_start_matches("Version: "),
        first_line("rsync", &["--version"]),
        first_line("cc", &["--version"])
    );
    let _ = writeln!(
        h,
        "- topology: primary and backup watchd on this host, cluster links over 127.0.0.1 (two \
         listen ports), each node with its own data directory and fileset directory; the \
         backup's bcplog, replay and fdatasyncs share the cores and the disk with the \
         application (a real backup is another host)"
    );
    let _ = writeln!(
        h,
        "- plan: {} runs per row; copy mode: {:?} changed files; quiet interval / lsyncd delay {} ms\n",
        plan.reps,
        plan.copy_counts,
        QUIET.as_millis()
    );
    Ok(h)
}

/// The 1, 5 and 15 minute load averages: a busy machine shows here.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// Flushes every dirty page, so one run's writeback does not land in the next run's time.
fn flush_page_cache_writes() {
    // SAFETY: sync(2) takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::sync() };
}

// ---------------------------------------------------------------------------------------------
// The workload program

/// What the workload printed.
#[derive(Debug, Clone, Copy)]
struct WorkloadRun {
    start_ns: u64,
    end_ns: u64,
    /// User + system CPU time of the workload process between start and end.
    cpu_ns: u64,
    bytes: u64,
}

impl WorkloadRun {
    fn seconds(&self) -> f64 {
        harness::ms_between(self.start_ns, self.end_ns) / 1000.0
    }

    fn cpu_seconds(&self) -> f64 {
        harness::ms_between(0, self.cpu_ns) / 1000.0
    }
}

fn run_workload(
    program: &Path,
    wl: &Workload,
    dir: &Path,
    env: &[(String, String)],
) -> Result<WorkloadRun> {
    harness::check_interrupted()?;
    let mut cmd = Command::new(program);
    cmd.args(wl.args(dir))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in [
        "LD_PRELOAD",
        "FT_REPL_FILESETS",
        "FT_REPL_SYNC_TIMEOUT",
        "FT_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().context("running the workload")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the workload failed ({}): {}{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 2000),
            stdout
        );
    }
    let field = |name: &str| -> Result<u64> {
        stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("the workload printed no {name}: {stdout:?}"))?
            .parse()
            .with_context(|| format!("the workload's {name} is not a number: {stdout:?}"))
    };
    let run = WorkloadRun {
        start_ns: field("start_ns")?,
        end_ns: field("end_ns")?,
        cpu_ns: field("cpu_ns")?,
        bytes: field("bytes")?,
    };
    if run.bytes != wl.bytes() {
        bail!("the workload wrote {} bytes, not {}", run.bytes, wl.bytes());
    }
    Ok(run)
}

/// Paths, kinds, sizes and contents of a tree (modes and times left out: the copy-mode peer,
/// rsync without -p, does not carry modes), as one hash; `None` when it cannot be scanned.
fn contents_hash(root: &Path) -> Option<u64> {
    let m = repl::manifest::scan(root).ok()?;
    if !m.problems.is_empty() {
        return None;
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (path, e) in &m.entries {
        let kind: u8 = match e.kind {
            repl::manifest::Kind::File => 1,
            repl::manifest::Kind::Dir => 2,
            repl::manifest::Kind::Symlink => 3,
            repl::manifest::Kind::Other => 4,
        };
        h.update(&(path.as_bytes().len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update(&[kind]);
        h.update(&e.size.to_le_bytes());
        h.update(&e.hash.to_le_bytes());
    }
    Some(h.digest())
}

/// Whether the replica's tree equals the primary's: paths, kinds, modes, sizes, contents
/// (repl's manifest content hash).
fn replica_identical(primary: &Path, replica: &Path) -> bool {
    let hash = |p: &Path| {
        repl::manifest::scan(p)
            .ok()
            .filter(|m| m.problems.is_empty())
            .map(|m| m.content_hash())
    };
    matches!((hash(primary), hash(replica)), (Some(a), Some(b)) if a == b)
}

fn fmt_s(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// "p50 (min – max)" of samples.
fn with_range(samples: &[f64]) -> String {
    let v = sorted(samples.to_vec());
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => format!(
            "{} ({} – {})",
            fmt_s(percentile(&v, 50.0)),
            fmt_s(*lo),
            fmt_s(*hi)
        ),
        _ => "-".into(),
    }
}

fn mb_per_s(bytes: u64, seconds: f64) -> String {
    format!("{:.0}", bytes as f64 / 1e6 / seconds)
}

// ---------------------------------------------------------------------------------------------
// 1. overhead on the application

/// How the workload writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum How {
    /// Plain syscalls, nothing replicated.
    PlainSys,
    /// libft's API on a path outside every fileset (not replicated).
    PlainFt,
    /// Plain syscalls under the LD_PRELOAD shim, into the fileset.
    Shim,
    /// libft's API into the fileset.
    Libft,
}

impl How {
    const ALL: [How; 4] = [How::PlainSys, How::PlainFt, How::Shim, How::Libft];

    fn label(self) -> &'static str {
        match self {
            How::PlainSys => "plain syscalls (open/pwrite/close)",
            How::PlainFt => "libft API, not replicated",
            How::Shim => "same syscalls under the LD_PRELOAD shim",
            How::Libft => "libft API (ft_create_file/ft_write_file_at/ft_close_file)",
        }
    }

    fn replicated(self) -> bool {
        matches!(self, How::Shim | How::Libft)
    }

    /// The unreplicated run a replicated one is compared with: the same program.
    fn baseline(self) -> How {
        match self {
            How::PlainSys | How::Shim => How::PlainSys,
            How::PlainFt | How::Libft => How::PlainFt,
        }
    }
}

/// A group of table 1: one watchd pair configuration and the workloads run under it.
#[derive(Debug)]
struct Group {
    label: &'static str,
    spec: PairSpec,
    workloads: [Workload; 2],
}

/// A row of table 1: (workload label, how, group label or "" for unreplicated runs).
type RowKey = (String, How, &'static str);

/// Samples of table 1: (wall, CPU) seconds per row; how many replicated runs left an
/// identical replica (identical, runs); why a row failed.
#[derive(Debug, Default)]
struct Samples {
    seconds: BTreeMap<RowKey, Vec<(f64, f64)>>,
    identical: BTreeMap<RowKey, (usize, usize)>,
    failures: BTreeMap<RowKey, String>,
    order: Vec<(Workload, &'static str)>,
}

fn overhead_section(env: &Env, plan: &Plan) -> Result<String> {
    let groups = [
        Group {
            label: "async, ring 64 MiB (default)",
            spec: PairSpec {
                source: Source::Replay,
                sync: false,
                ring_size: RING_DEFAULT,
            },
            workloads: [plan.big, plan.small],
        },
        Group {
            label: "async, ring 512 MiB",
            spec: PairSpec {
                source: Source::Replay,
                sync: false,
                ring_size: RING_LARGE,
            },
            workloads: [plan.big, plan.small],
        },
        Group {
            label: "sync",
            spec: PairSpec {
                source: Source::Replay,
                sync: true,
                ring_size: RING_DEFAULT,
            },
            workloads: [plan.big_sync, plan.small_sync],
        },
    ];
    let mut s = Samples::default();
    let mut settings = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        for wl in &g.workloads {
            s.order.push((*wl, g.label));
        }
        let mut pair = match env.pair(g.spec) {
            Ok(p) => p,
            Err(e) => {
                harness::check_interrupted()?;
                for wl in &g.workloads {
                    for how in [How::Shim, How::Libft] {
                        s.failures.insert((wl.label(), how, g.label), one_line(&e));
                    }
                }
                continue;
            }
        };
        settings.push(format!(
            "{}:\n\n```toml\n{}```\n",
            g.label, pair.fileset_toml
        ));
        for wl in &g.workloads {
            for rep in 0..plan.reps {
                // Rotate the order, so drift during a repetition touches every variant alike.
                let mut order = How::ALL;
                order.rotate_left(rep % How::ALL.len());
                for how in order {
                    eprintln!(
                        "repl-bench: overhead: {} / {} / {} run {} of {}",
                        g.label,
                        wl.label(),
                        how.label(),
                        rep + 1,
                        plan.reps
                    );
                    let key = (wl.label(), how, if how.replicated() { g.label } else { "" });
                    if s.failures.contains_key(&key) {
                        continue;
                    }
                    let rel = format!("g{gi}-r{rep}-{how:?}");
                    match overhead_run(env, &mut pair, wl, how, &rel) {
                        Ok((run, identical)) => {
                            let (wall, cpu) = (run.seconds(), run.cpu_seconds());
                            eprintln!("repl-bench:   {wall:.3} s, CPU {cpu:.3} s");
                            s.seconds.entry(key.clone()).or_default().push((wall, cpu));
                            if let Some(same) = identical {
                                let e = s.identical.entry(key).or_default();
                                e.0 += usize::from(same);
                                e.1 += 1;
                            }
                        }
                        Err(e) => {
                            harness::check_interrupted()?;
                            eprintln!("repl-bench: {}\n{}", one_line(&e), pair.logs());
                            s.failures.insert(key, one_line(&e));
                        }
                    }
                }
            }
        }
        pair.stop();
    }
    Ok(overhead_table(&s, &settings, env))
}

/// One run: returns what the workload reported and, for replicated runs, whether the
/// replica was identical to the primary afterwards.
fn overhead_run(
    env: &Env,
    pair: &mut Pair,
    wl: &Workload,
    how: How,
    rel: &str,
) -> Result<(WorkloadRun, Option<bool>)> {
    flush_page_cache_writes();
    if !how.replicated() {
        let dir = env.scratch.join("plain").join(rel);
        fs::create_dir_all(dir.parent().context("a run directory has a parent")?)?;
        let program = match how {
            How::PlainSys => &env.program_sys,
            _ => &env.program_ft,
        };
        let run = run_workload(program, wl, &dir, &[])?;
        if !wl.keeps_files() {
            fs::remove_dir_all(&dir)?;
        }
        return Ok((run, None));
    }
    let dir = pair.primary_root.join(rel);
    let (program, shim) = match how {
        How::Shim => (&env.program_sys, true),
        _ => (&env.program_ft, false),
    };
    let vars = pair.service_env(&env.bins, shim, SYNC_TIMEOUT);
    let run = run_workload(program, wl, &dir, &vars)?;
    pair.drain()?;
    let identical = replica_identical(&dir, &pair.replica_root.join(rel));
    if !wl.keeps_files() {
        pair.remove_tree(rel)?;
        pair.drain()?;
    }
    Ok((run, Some(identical)))
}

fn overhead_table(s: &Samples, settings: &[String], env: &Env) -> String {
    let mut t = Table::new(&[
        "workload",
        "how",
        "replication",
        "runs",
        "p50 s",
        "min s",
        "max s",
        "MB/s (p50)",
        "µs per write/file (p50)",
        "× unreplicated (p50 / p50)",
        "app CPU s (p50)",
        "CPU × unreplicated",
        "replica identical",
    ]);
    let wall = |v: &[(f64, f64)]| sorted(v.iter().map(|x| x.0).collect());
    let cpu = |v: &[(f64, f64)]| sorted(v.iter().map(|x| x.1).collect());
    let median = |key: &RowKey| {
        s.seconds
            .get(key)
            .map(|v| (percentile(&wall(v), 50.0), percentile(&cpu(v), 50.0)))
    };
    let mut seen = std::collections::BTreeSet::new();
    for (wl, group) in &s.order {
        let label = wl.label();
        let (units, _) = wl.units();
        for how in How::ALL {
            let g = if how.replicated() { *group } else { "" };
            let key = (label.clone(), how, g);
            if !seen.insert(key.clone()) {
                continue;
            }
            let repl_label = if how.replicated() { *group } else { "none" };
            if let Some(err) = s.failures.get(&key) {
                t.row(vec![
                    label.clone(),
                    how.label().into(),
                    repl_label.into(),
                    format!("FAILED: {err}"),
                ]);
                continue;
            }
            let Some(samples) = s.seconds.get(&key) else {
                continue;
            };
            let v = wall(samples);
            let p50 = percentile(&v, 50.0);
            let cpu50 = percentile(&cpu(samples), 50.0);
            let (ratio, cpu_ratio) = if how == How::PlainSys {
                ("1 (reference)".to_owned(), "1".to_owned())
            } else {
                let base = (label.clone(), how.baseline(), "");
                match median(&base) {
                    Some((b, bc)) if how.replicated() => (
                        format!("{:.2} ({:+.0} %)", p50 / b, (p50 / b - 1.0) * 100.0),
                        format!("{:.2}", cpu50 / bc),
                    ),
                    Some(_) => {
                        let (sys, sys_cpu) = median(&(label.clone(), How::PlainSys, ""))
                            .unwrap_or((f64::NAN, f64::NAN));
                        (
                            format!("{:.2} × plain syscalls", p50 / sys),
                            format!("{:.2} × plain syscalls", cpu50 / sys_cpu),
                        )
                    }
                    None => ("-".into(), "-".into()),
                }
            };
            let identical = s
                .identical
                .get(&key)
                .map_or_else(|| "-".to_owned(), |(ok, n)| format!("{ok} of {n}"));
            t.row(vec![
                label.clone(),
                how.label().into(),
                repl_label.into(),
                v.len().to_string(),
                fmt_s(p50),
                fmt_s(v[0]),
                fmt_s(v[v.len() - 1]),
                mb_per_s(wl.bytes(), p50),
                format!("{:.1}", p50 * 1e6 / units as f64),
                ratio,
                fmt_s(cpu50),
                cpu_ratio,
                identical,
            ]);
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### 1. Overhead on the application\n\nThe C workload (tests/benches/repl/workload.c) \
         prints its own wall time, CLOCK_MONOTONIC from before the first create to after the \
         last close (no fsync), and its CPU time over the same span (getrusage, user + system: \
         what replication costs the application itself, apart from waiting and from sharing the \
         cores with the two watchds). Replicated runs write beneath the primary's fileset: the plain \
         build under the LD_PRELOAD shim (LD_PRELOAD + FT_REPL_FILESETS exactly as watchd sets \
         them for a service with `repl_shim = true, filesets = [\"data\"]`), the libft build \
         with FT_REPL_FILESETS only. Unreplicated runs write to a directory outside the fileset \
         on the same file system. Before every run: sync(2) and, for replicated runs, the \
         replica caught up (a marker written last is on the replica, then the pump's acked, \
         released and next_seq and the backup's applied and committed agree). \"× \
         unreplicated\" divides by the same program's unreplicated p50 (target for async: ≤ \
         {TARGET_ASYNC_OVERHEAD_PCT:.0} % more); \"replica identical\" compares the trees \
         (paths, kinds, modes, sizes, xxh3 of contents) of the run's directory after the \
         replica caught up. Sync mode waits for the backup's fdatasync on every change, so its \
         workloads are smaller. {FRESH_DIRS}\n"
    );
    out.push_str(&t.render());
    let _ = writeln!(
        out,
        "\n`[watchd] ring_dir` = {} (tmpfs), cgroups = false; sync rows: FT_REPL_SYNC_TIMEOUT = \
         {} ms. The primary's fileset per replication setting:\n\n{}",
        env.ring_dir.display(),
        SYNC_TIMEOUT.as_millis(),
        settings.join("\n")
    );
    out
}

// ---------------------------------------------------------------------------------------------
// 2. throughput to one backup

/// Polls the primary's acknowledged seq until stopped; returns (CLOCK_MONOTONIC, acked).
struct AckWatcher {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(u64, u64)>>,
}

impl std::fmt::Debug for AckWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckWatcher").finish_non_exhaustive()
    }
}

impl AckWatcher {
    fn start(control: PathBuf) -> Result<AckWatcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("ack-watcher".into())
            .spawn(move || {
                let mut samples = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    if let Ok(v) =
                        harness::control(&control, &serde_json::json!({"op": "repl_status"}))
                    {
                        let at = mono_ns();
                        let acked = v["filesets"][0]["pump"]["backups"][0]["acked"].as_u64();
                        if let Some(a) = acked {
                            samples.push((at, a));
                        }
                    }
                    std::thread::sleep(ACK_POLL);
                }
                samples
            })?;
        Ok(AckWatcher { stop, handle })
    }

    fn finish(self) -> Result<Vec<(u64, u64)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the ack watcher panicked"))
    }
}

#[derive(Debug, Default)]
struct ThroughputRows {
    app_s: Vec<f64>,
    applied_s: Vec<f64>,
    catch_up_s: Vec<f64>,
    acked_s: Vec<f64>,
    raw_s: Vec<f64>,
    /// CPU seconds of the primary's and the backup's watchd from the workload's start until
    /// the replica settled.
    primary_cpu_s: Vec<f64>,
    backup_cpu_s: Vec<f64>,
    identical: usize,
    runs: usize,
    resyncs: u64,
    failure: Option<String>,
}

fn throughput_section(env: &Env, plan: &Plan) -> Result<String> {
    let spec = PairSpec {
        source: Source::Replay,
        sync: false,
        ring_size: RING_DEFAULT,
    };
    let mut pair = env.pair(spec)?;
    let mut rows: Vec<(Workload, ThroughputRows)> = Vec::new();
    for (wi, wl) in plan.throughput.iter().enumerate() {
        let mut r = ThroughputRows::default();
        for rep in 0..plan.reps {
            eprintln!(
                "repl-bench: throughput: {} run {} of {}",
                wl.label(),
                rep + 1,
                plan.reps
            );
            let rel = format!("t{wi}-r{rep}");
            if let Err(e) = throughput_run(env, &mut pair, wl, &rel, &mut r) {
                harness::check_interrupted()?;
                r.failure = Some(one_line(&e));
                break;
            }
        }
        rows.push((*wl, r));
    }
    let describe = spec.describe();
    pair.stop();
    let mut t = Table::new(&[
        "workload (shim)",
        "runs",
        "MB",
        "app wrote in s (p50)",
        "→ replica applied s: p50 (min – max)",
        "catch-up after the app's last write s (p50)",
        "MB/s to applied (p50)",
        "MB/s to acked (p50)",
        "raw TCP copy s: p50 (min – max)",
        "raw MB/s (p50)",
        "replication / raw",
        "watchd CPU s, primary / backup (p50)",
        "replica identical",
    ]);
    for (wl, r) in &rows {
        if let Some(e) = &r.failure {
            t.row(vec![wl.label(), r.runs.to_string(), format!("FAILED: {e}")]);
            continue;
        }
        let p = |v: &Vec<f64>| percentile(&sorted(v.clone()), 50.0);
        let bytes = wl.bytes();
        let (applied, acked, raw) = (p(&r.applied_s), p(&r.acked_s), p(&r.raw_s));
        t.row(vec![
            wl.label(),
            r.runs.to_string(),
            format!("{:.0}", bytes as f64 / 1e6),
            fmt_s(p(&r.app_s)),
            with_range(&r.applied_s),
            fmt_s(p(&r.catch_up_s)),
            mb_per_s(bytes, applied),
            mb_per_s(bytes, acked),
            with_range(&r.raw_s),
            mb_per_s(bytes, raw),
            format!("{:.0} %", 100.0 * raw / applied),
            format!(
                "{} / {}",
                fmt_s(p(&r.primary_cpu_s)),
                fmt_s(p(&r.backup_cpu_s))
            ),
            format!("{} of {}", r.identical, r.runs),
        ]);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### 2. Replication throughput to one backup over loopback\n\nThe workload runs under \
         the shim into the primary's fileset (async); the benchmark then writes a marker file \
         through ft::fs. \"→ replica applied\" = from the workload's first write (its \
         CLOCK_MONOTONIC) until the marker's contents are on the replica (looked at every {} ms; \
         replay applies in order, so everything before it is there); \"to acked\" uses the first \
         time the pump reported the backup's acknowledgement (durable in its bcplog) of the \
         last seq (repl_status polled every {} ms, the request behind `ftctl repl status \
         --json`). Raw TCP copy, in the same run after each replication: a sender thread reads \
         the same files from the primary and streams them over 127.0.0.1 to a receiver thread \
         that writes them as files and ends with one syncfs(2); time from connect to the \
         receiver's answer. replication / raw = raw time / replication time (target ≥ \
         {TARGET_THROUGHPUT_PCT:.0} %). watchd CPU: utime + stime of each daemon (all threads, \
         /proc/PID/stat) from the workload's start until the replica settled. Pump resyncs \
         during these runs: {}. {FRESH_DIRS}\n",
        pair::MARKER_POLL.as_millis(),
        ACK_POLL.as_millis(),
        rows.iter().map(|(_, r)| r.resyncs).sum::<u64>()
    );
    out.push_str(&t.render());
    let _ = writeln!(out, "\nwatchd fileset: {describe}, sync_timeout n/a.\n");
    Ok(out)
}

fn throughput_run(
    env: &Env,
    pair: &mut Pair,
    wl: &Workload,
    rel: &str,
    r: &mut ThroughputRows,
) -> Result<()> {
    flush_page_cache_writes();
    let before = pair.wait_settled()?;
    let cpu_before = pair.cpu_ticks()?;
    let watcher = AckWatcher::start(pair.primary_control())?;
    let vars = pair.service_env(&env.bins, true, SYNC_TIMEOUT);
    let run = run_workload(&env.program_sys, wl, &pair.primary_root.join(rel), &vars);
    let marker = run.as_ref().ok().map(|_| pair.write_marker());
    let applied_at = match &marker {
        Some(Ok((m, body))) => Some(pair.wait_marker(m, body)),
        _ => None,
    };
    let settled = pair.wait_settled();
    let samples = watcher.finish()?;
    let cpu_after = pair.cpu_ticks()?;
    let run = run?;
    let (marker, _) = marker.context("a marker follows a run")??;
    let applied_at = applied_at.context("a wait follows a marker")??;
    let settled = settled?;
    let last = settled.acked;
    let acked_at = samples
        .iter()
        .find(|(_, a)| *a >= last)
        .map(|(t, _)| *t)
        .context("the watcher never saw the final acknowledgement")?;
    let identical = replica_identical(&pair.primary_root.join(rel), &pair.replica_root.join(rel));
    pair.remove_marker(&marker)?;
    let files = rawcopy::files_beneath(&pair.primary_root.join(rel))?;
    let target = env.scratch.join("raw").join(rel);
    flush_page_cache_writes();
    let raw = rawcopy::copy(&files, &target)?;
    if raw.bytes != wl.bytes() || raw.files != files.len() as u64 {
        bail!(
            "the raw copy moved {} bytes in {} files, not {} in {}",
            raw.bytes,
            raw.files,
            wl.bytes(),
            files.len()
        );
    }
    if !wl.keeps_files() {
        fs::remove_dir_all(&target)?;
        pair.remove_tree(rel)?;
    }
    let after = pair.drain()?;
    r.app_s.push(run.seconds());
    r.applied_s
        .push(harness::ms_between(run.start_ns, applied_at) / 1000.0);
    r.catch_up_s
        .push(harness::ms_between(run.end_ns, applied_at) / 1000.0);
    r.acked_s
        .push(harness::ms_between(run.start_ns, acked_at) / 1000.0);
    r.raw_s.push(raw.seconds);
    let per_second = harness::clock_ticks_per_second()? as f64;
    r.primary_cpu_s
        .push(cpu_after.0.saturating_sub(cpu_before.0) as f64 / per_second);
    r.backup_cpu_s
        .push(cpu_after.1.saturating_sub(cpu_before.1) as f64 / per_second);
    r.identical += usize::from(identical);
    r.runs += 1;
    eprintln!(
        "repl-bench:   replica applied after {:.3} s, raw copy {:.3} s",
        harness::ms_between(run.start_ns, applied_at) / 1000.0,
        raw.seconds
    );
    r.resyncs += after.resyncs.saturating_sub(before.resyncs);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. copy mode against lsyncd + rsync

/// The contents of file `index` after change round `round` (4 KiB, distinct per round).
fn copy_contents(round: u64, index: usize) -> Vec<u8> {
    let mut v = format!("round {round} file {index}\n").into_bytes();
    let mut x = round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (index as u64) ^ 0x5555;
    while v.len() < usize::try_from(SMALL_FILE).unwrap_or(4096) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(b"abcdefghijklmnopqrstuvwxyz"[usize::try_from(x % 26).unwrap_or(0)]);
    }
    v
}

fn copy_rel(index: usize) -> String {
    format!("d{:03}/f{:06}", index / FILES_PER_DIR, index)
}

/// Writes files `indices` of `root` (plain writes: the tools watch, nothing is intercepted);
/// returns CLOCK_MONOTONIC after the last close.
fn write_round(root: &Path, indices: &[usize], round: u64) -> Result<u64> {
    for &i in indices {
        let path = root.join(copy_rel(i));
        fs::write(&path, copy_contents(round, i))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(mono_ns())
}

/// Creates the tree of `total` files (round 0).
fn populate(root: &Path, total: usize) -> Result<()> {
    for d in 0..total.div_ceil(FILES_PER_DIR) {
        fs::create_dir_all(root.join(format!("d{d:03}")))?;
    }
    let all: Vec<usize> = (0..total).collect();
    write_round(root, &all, 0)?;
    Ok(())
}

/// Waits until every file of `indices` under `target` has the contents of `round`; returns
/// CLOCK_MONOTONIC of the look that found the last one.
fn wait_round(
    target: &Path,
    indices: &[usize],
    round: u64,
    timeout: Duration,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<u64> {
    let end = Instant::now() + timeout;
    let mut next = 0;
    let mut polls = 0u32;
    loop {
        while let Some(&i) = indices.get(next) {
            if fs::read(target.join(copy_rel(i))).is_ok_and(|b| b == copy_contents(round, i)) {
                next += 1;
            } else {
                break;
            }
        }
        if next == indices.len() {
            return Ok(mono_ns());
        }
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(250) {
            alive()?;
            harness::check_interrupted()?;
        }
        if Instant::now() >= end {
            bail!(
                "{} of {} changed files reached the target within {timeout:?}",
                next,
                indices.len()
            );
        }
        std::thread::sleep(COPY_POLL);
    }
}

/// Waits until two trees hold the same paths and contents.
fn wait_same_tree(
    a: &Path,
    b: &Path,
    timeout: Duration,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let end = Instant::now() + timeout;
    loop {
        alive()?;
        if let (Some(x), Some(y)) = (contents_hash(a), contents_hash(b))
            && x == y
        {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!(
                "{} did not become identical to {} within {timeout:?}",
                b.display(),
                a.display()
            );
        }
        harness::sleep(Duration::from_millis(200))?;
    }
}

/// One tool of table 3.
enum CopyTool {
    Ftkit(Pair),
    Lsyncd {
        lsyncd: lsyncd::Lsyncd,
        source: PathBuf,
        target: PathBuf,
    },
}

impl std::fmt::Debug for CopyTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl CopyTool {
    fn name(&self) -> &'static str {
        match self {
            CopyTool::Ftkit(_) => "ftkit copy mode",
            CopyTool::Lsyncd { .. } => "lsyncd + rsync",
        }
    }

    /// (live tree, replica tree).
    fn trees(&self) -> (PathBuf, PathBuf) {
        match self {
            CopyTool::Ftkit(p) => (p.primary_root.join("tree"), p.replica_root.join("tree")),
            CopyTool::Lsyncd { source, target, .. } => (source.join("tree"), target.join("tree")),
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        match self {
            CopyTool::Ftkit(p) => p.check_alive(),
            CopyTool::Lsyncd { lsyncd, .. } => lsyncd.check_alive(),
        }
    }
}

#[derive(Debug, Default)]
struct CopyRows {
    seconds: Vec<f64>,
    identical: usize,
    failure: Option<String>,
}

fn copy_section(env: &Env, plan: &Plan) -> Result<String> {
    let total = plan.copy_counts.iter().copied().max().unwrap_or(1);
    let mut tools: Vec<CopyTool> = Vec::new();
    let mut setup_failures: Vec<(&'static str, String)> = Vec::new();
    // ftkit: the tree is populated before watchd starts; the pump's initial resync copies it.
    eprintln!("repl-bench: copy: ftkit copy mode, {total} files");
    let ftkit = (|| -> Result<CopyTool> {
        let spec = PairSpec {
            source: Source::Copy { quiet: QUIET },
            sync: false,
            ring_size: RING_DEFAULT,
        };
        let n = env.pairs.get() + 1;
        let live = env.scratch.join(format!("pair{n}")).join("primary");
        populate(&live.join("tree"), total)?;
        let mut pair = env.pair(spec)?;
        let (a, b) = (
            pair.primary_root.join("tree"),
            pair.replica_root.join("tree"),
        );
        wait_same_tree(&a, &b, INITIAL_COPY_TIMEOUT, &mut || pair.check_alive())?;
        Ok(CopyTool::Ftkit(pair))
    })();
    match ftkit {
        Ok(t) => tools.push(t),
        Err(e) => {
            harness::check_interrupted()?;
            setup_failures.push(("ftkit copy mode", one_line(&e)));
        }
    }
    eprintln!("repl-bench: copy: lsyncd, {total} files");
    let base = env.scratch.join("lsyncd");
    let (source, target) = (base.join("source"), base.join("target"));
    let lsyncd_config = lsyncd::config(&source, &target, &base.join("lsyncd.log"), QUIET);
    let lsync = (|| -> Result<CopyTool> {
        populate(&source.join("tree"), total)?;
        fs::create_dir_all(&target)?;
        let mut l = lsyncd::Lsyncd::start(&base, &source, &target, QUIET)?;
        let (a, b) = (source.join("tree"), target.join("tree"));
        wait_same_tree(&a, &b, INITIAL_COPY_TIMEOUT, &mut || l.check_alive())?;
        Ok(CopyTool::Lsyncd {
            lsyncd: l,
            source: source.clone(),
            target: target.clone(),
        })
    })();
    match lsync {
        Ok(t) => tools.push(t),
        Err(e) => {
            harness::check_interrupted()?;
            setup_failures.push(("lsyncd + rsync", one_line(&e)));
        }
    }
    let mut results: BTreeMap<(usize, &'static str), CopyRows> = BTreeMap::new();
    let mut round = 0u64;
    for &n in &plan.copy_counts {
        // Spread the changed files over the whole tree.
        let stride = (total / n).max(1);
        let indices: Vec<usize> = (0..n).map(|i| i * stride).collect();
        for rep in 0..plan.reps {
            let mut order: Vec<usize> = (0..tools.len()).collect();
            order.rotate_left(rep % tools.len().max(1));
            for ti in order {
                let tool = &mut tools[ti];
                let rows = results.entry((n, tool.name())).or_default();
                if rows.failure.is_some() {
                    continue;
                }
                round += 1;
                eprintln!(
                    "repl-bench: copy: {} changed files, {} run {} of {}",
                    n,
                    tool.name(),
                    rep + 1,
                    plan.reps
                );
                match copy_run(tool, &indices, round) {
                    Ok((secs, same)) => {
                        rows.seconds.push(secs);
                        rows.identical += usize::from(same);
                    }
                    Err(e) => {
                        harness::check_interrupted()?;
                        rows.failure = Some(one_line(&e));
                    }
                }
            }
        }
    }
    let ftkit_desc = tools.iter().find_map(|t| match t {
        CopyTool::Ftkit(p) => Some(p.spec.describe()),
        CopyTool::Lsyncd { .. } => None,
    });
    drop(tools);
    let mut t = Table::new(&[
        "changed files",
        "tool",
        "runs",
        "p50 s",
        "min s",
        "max s",
        "p50 − delay s",
        "tree identical afterwards",
    ]);
    for &n in &plan.copy_counts {
        for name in ["ftkit copy mode", "lsyncd + rsync"] {
            if let Some((_, e)) = setup_failures.iter().find(|(w, _)| *w == name) {
                t.row(vec![
                    thousands(n as u64),
                    name.into(),
                    "0".into(),
                    format!("FAILED to set up: {e}"),
                ]);
                continue;
            }
            let Some(r) = results.get(&(n, name)) else {
                continue;
            };
            if let Some(e) = &r.failure {
                t.row(vec![
                    thousands(n as u64),
                    name.into(),
                    r.seconds.len().to_string(),
                    format!("FAILED: {e}"),
                ]);
                continue;
            }
            let v = sorted(r.seconds.clone());
            if v.is_empty() {
                continue;
            }
            let p50 = percentile(&v, 50.0);
            t.row(vec![
                thousands(n as u64),
                name.into(),
                v.len().to_string(),
                fmt_s(p50),
                fmt_s(v[0]),
                fmt_s(v[v.len() - 1]),
                fmt_s(p50 - QUIET.as_secs_f64()),
                format!("{} of {}", r.identical, v.len()),
            ]);
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### 3. Copy mode against lsyncd + rsync\n\nA tree of {} files of {} in {} \
         {}, copied to each tool's replica before the measurements (ftkit: the \
         pump's initial resync; lsyncd: its startup rsync). Each run rewrites N files spread \
         over the tree (open O_TRUNC, write 4 KiB, close; plain writes, nothing intercepted); \
         time = from after the last close until every changed file has its new contents on the \
         replica (looked at every {} ms). \"tree identical afterwards\": the whole tree (paths, \
         kinds, sizes, xxh3 of contents) once the run's files arrived. Both tools run the whole \
         time, each on its own tree; the runs alternate. ftkit's quiet interval and lsyncd's \
         delay are both {} ms (lsyncd's delay counts from the first event of a batch, copy \
         mode's quiet interval from a file's last change).\n",
        thousands(total as u64),
        size(SMALL_FILE),
        total.div_ceil(FILES_PER_DIR),
        if total.div_ceil(FILES_PER_DIR) == 1 {
            "directory"
        } else {
            "directories"
        },
        COPY_POLL.as_millis(),
        QUIET.as_millis()
    );
    out.push_str(&t.render());
    let _ = writeln!(
        out,
        "\nftkit: watchd fileset {}, backup on the same host over 127.0.0.1.  \nlsyncd \
         configuration (target: a local directory, so rsync copies locally):\n\n```lua\n{}```\n",
        ftkit_desc.unwrap_or_else(|| "mode = \"copy\" (did not start)".into()),
        lsyncd_config
    );
    Ok(out)
}

/// One run: rewrite the files, wait for them on the replica; returns the seconds from the
/// last write and whether the whole tree was identical afterwards.
fn copy_run(tool: &mut CopyTool, indices: &[usize], round: u64) -> Result<(f64, bool)> {
    let (live, replica) = tool.trees();
    flush_page_cache_writes();
    let last_write = write_round(&live, indices, round)?;
    let done = wait_round(
        &replica,
        indices,
        round,
        pair::CATCH_UP_TIMEOUT,
        &mut || tool.check_alive(),
    )?;
    let identical = contents_hash(&live).is_some_and(|a| contents_hash(&replica) == Some(a));
    // Let the tool go idle (a second pass, a late batch) before the next run.
    harness::sleep(QUIET * 2)?;
    Ok((harness::ms_between(last_write, done) / 1000.0, identical))
}
