//! The checkpoint benchmark (issue 3): full and incremental checkpoints of critical memory, the
//! application's pause per checkpoint, and recovery in a fresh process, measured on one machine
//! and one disk in one run, side by side with a plain `write` + `fdatasync` of the same bytes.
//!
//! Run: `cargo bench -p ftkit-tests --bench ckpt` (`-- --quick` for a short run, `-- --out FILE`
//! to also write the markdown, `-- --dir DIR` for the data directory, `-- --only LIST`). Every
//! measurement runs in a child process (this program re-executed with `FT_CKPT_BENCH_ROLE`), so
//! heaps sit at one fixed address and a fork's pause is not inflated by the parent's memory. It
//! prints tables; it is not a test and asserts nothing about the numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use ckpt::{ImageFile, ImageHeader, ImageWriter, MAX_CHUNK, RegionDesc, StorePolicy};
use ft::critical::{
    CaptureMethod, CheckpointConfig, Checkpointer, DEFAULT_STAGING_MAX, DirtyMode,
    ENV_CKPT_STAGING_MAX, HeapConfig, TrackerKind, parse_size,
};

const USAGE: &str = "usage: ckpt-bench [--quick] [--out FILE] [--dir DIR] \
[--only full,incr,pause,recover,phases]";

/// Selects a child role (and carries its parameters) in a re-executed bench binary.
const ROLE_ENV: &str = "FT_CKPT_BENCH_ROLE";
/// The application identity of every image this benchmark writes.
const APP: &str = "ckpt-bench";
/// Where every child maps its critical heap: above the default window of application heaps
/// (0x5f00_0000_0000 + 64 × 64 GiB) and libft's test window, far from anything else mapped.
const HEAP_ADDR: usize = 0x6400_0000_0000;
/// Heap reservation beyond the measured buffer: the allocator's header, block headers and
/// alignment padding, and room for the plain write of a whole image's length from the heap.
const HEAP_SLACK: usize = 1 << 20;
/// Alignment of the measured buffer in the heap (a page, so page counts are exact).
const BUFFER_ALIGN: usize = 4096;
/// The heap root under which the measured buffer is found again after recovery.
const ROOT: &str = "bench";
/// Sizes of critical memory for full checkpoints, pauses and recovery.
const SIZES: [usize; 3] = [16 << 20, 256 << 20, 1 << 30];
/// Full checkpoints of this size are also measured through the staging buffer (staging_max
/// raised to STAGING_VARIANT_MAX) instead of a copy-on-write child: the trade between pause and
/// throughput that FT_CKPT_STAGING_MAX offers.
const STAGING_VARIANT_SIZE: usize = 256 << 20;
/// The staging_max of that variant.
const STAGING_VARIANT_MAX: usize = 512 << 20;
/// A size's verdict is flagged as unreliable when its plain-write samples differ by more than
/// this factor (the disk's own speed changed during the run).
const UNSTABLE_SPREAD: f64 = 2.0;
/// Critical memory for incremental checkpoints and the steady-state pause.
const BIG: usize = 1 << 30;
/// Dirty fractions of incremental checkpoints, in pages per thousand.
const DIRTY_PERMILLE: [usize; 3] = [1, 10, 100];
/// The steady state: 1 % of the pages written between two checkpoints.
const STEADY_PERMILLE: usize = 10;
/// A recovery chain: one full image and this many increments.
const CHAIN_INCREMENTS: usize = 7;
/// ckpt::store wrote images through a BufWriter of this capacity before it wrote them
/// vectored and unbuffered; the emulation of libft's previous fork path mirrors it.
const STORE_WRITE_BUFFER: usize = 256 * 1024;
/// Pipe capacity of libft's previous fork path (a pipe from the snapshot child to the writer
/// thread), mirrored by the phases.
const PIPE_CAPACITY: libc::c_int = 1 << 20;
/// Linux's MADV_POPULATE_WRITE (5.14+), which the libc crate does not export.
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// Seed of the data generator: runs are reproducible.
const SEED: u64 = 0x5eed_c0de_2024_0003;

/// Target 1: a full checkpoint reaches at least this share of the plain write + fdatasync
/// throughput (percent).
const TARGET_FULL_RATIO_PCT: f64 = 80.0;
/// Target 2: an increment with 1 % of the pages dirty takes at most this share of a full
/// checkpoint's time (percent).
const TARGET_INCR_PCT: f64 = 5.0;
/// Target 3: the application's pause, p99, for 1 GiB of critical memory (milliseconds).
const TARGET_PAUSE_MS: f64 = 10.0;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let result = match std::env::var(ROLE_ENV) {
        Ok(spec) => child::run(&spec),
        Err(_) => run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ckpt-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Full,
    Incr,
    Pause,
    Recover,
    Phases,
}

impl Section {
    const ALL: [Section; 5] = [
        Section::Full,
        Section::Incr,
        Section::Pause,
        Section::Recover,
        Section::Phases,
    ];

    fn parse(s: &str) -> Option<Section> {
        Some(match s {
            "full" => Section::Full,
            "incr" => Section::Incr,
            "pause" => Section::Pause,
            "recover" => Section::Recover,
            "phases" => Section::Phases,
            _ => return None,
        })
    }
}

#[derive(Debug)]
struct Options {
    quick: bool,
    out: Option<PathBuf>,
    dir: Option<PathBuf>,
    only: Vec<Section>,
    args: Vec<String>,
}

fn parse_args() -> Result<Options> {
    // Everything but cargo's --bench, to show the command in the results.
    let given: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut o = Options {
        quick: false,
        out: None,
        dir: None,
        only: Section::ALL.to_vec(),
        args: given.clone(),
    };
    let mut args = given.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = Some(args.next().context(USAGE)?.into()),
            "--dir" => o.dir = Some(args.next().context(USAGE)?.into()),
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

/// How much of everything a run does.
#[derive(Debug)]
struct Plan {
    full_reps: usize,
    incr_reps: usize,
    pause_samples: usize,
    pause_samples_hash: usize,
    recover_reps: usize,
    phase_reps: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                full_reps: 3,
                incr_reps: 2,
                pause_samples: 50,
                pause_samples_hash: 10,
                recover_reps: 1,
                phase_reps: 1,
            }
        } else {
            Plan {
                full_reps: 7,
                incr_reps: 5,
                pause_samples: 200,
                pause_samples_hash: 40,
                recover_reps: 3,
                phase_reps: 3,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: runs the children, collects their samples, prints the tables.

fn run() -> Result<()> {
    let opts = parse_args()?;
    install_interrupt_handler()?;
    let plan = Plan::new(opts.quick);
    let began = Instant::now();
    let root = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("ftkit-ckpt-bench-")
        .tempdir_in(&root)
        .with_context(|| format!("creating a scratch directory in {}", root.display()))?;
    let staging_max = staging_max()?;

    let mut doc = String::new();
    let _ = writeln!(doc, "## Checkpoint benchmark (issue 3)\n");
    let mut command = String::from("cargo bench -p ftkit-tests --bench ckpt");
    if !opts.args.is_empty() {
        let _ = write!(command, " -- {}", opts.args.join(" "));
    }
    let _ = writeln!(doc, "- Command: `{command}`");
    let _ = writeln!(doc, "- Date: {}", utc_now());
    let _ = writeln!(doc, "- Machine: {}", machine());
    let _ = writeln!(
        doc,
        "- Load at start: {} (the machine is shared; other work may run on the same disk)",
        load()
    );
    if let Some(note) = balloon_reporting() {
        let _ = writeln!(doc, "- {note}");
    }
    let _ = writeln!(
        doc,
        "- Data directory: `{}` — {}",
        scratch.path().display(),
        filesystem_of(scratch.path())
    );
    let _ = writeln!(
        doc,
        "- libft settings: staging_max {} MiB (captures up to it are copied during the pause, larger \
         ones use a copy-on-write child), default store policy (keep 3, full_every 8) unless a \
         table says otherwise; MB = 10^6 bytes; medians unless said otherwise.\n",
        staging_max >> 20
    );
    print!("{doc}");

    let mut results = Results::default();
    let dir = scratch.path();
    if opts.only.contains(&Section::Full) {
        for size in SIZES {
            progress(&format!(
                "full checkpoints of {} ({} reps)",
                mib(size),
                plan.full_reps
            ));
            let samples = run_child(
                "full",
                &[
                    ("size", size.to_string()),
                    ("reps", plan.full_reps.to_string()),
                    ("dir", child_dir(dir, &format!("full-{size}"))),
                ],
            )?;
            results.full.insert(size, samples);
        }
        progress(&format!(
            "full checkpoints of {} through the staging buffer ({} reps)",
            mib(STAGING_VARIANT_SIZE),
            plan.full_reps
        ));
        let samples = run_child(
            "full",
            &[
                ("size", STAGING_VARIANT_SIZE.to_string()),
                ("reps", plan.full_reps.to_string()),
                ("staging_max", STAGING_VARIANT_MAX.to_string()),
                ("dir", child_dir(dir, "full-staging")),
            ],
        )?;
        results.full_staging = Some(samples);
        emit(&mut doc, &table_full(&results));
    }
    if opts.only.contains(&Section::Incr) {
        // The measured rows recycle each image's page cache as table 1 does; the last run
        // leaves every image cached, to show what that costs on this machine.
        for (tracker, recycle) in [("uffd", true), ("hash", true), ("uffd", false)] {
            progress(&format!(
                "incremental checkpoints of {} with the {tracker} tracker ({} reps per \
                 fraction{})",
                mib(BIG),
                plan.incr_reps,
                if recycle {
                    ""
                } else {
                    ", images left in the page cache"
                }
            ));
            let samples = run_child(
                "incr",
                &[
                    ("size", BIG.to_string()),
                    ("reps", plan.incr_reps.to_string()),
                    ("tracker", tracker.to_owned()),
                    ("recycle", u8::from(recycle).to_string()),
                    ("dir", child_dir(dir, &format!("incr-{tracker}-{recycle}"))),
                ],
            )?;
            results.incr.push(IncrRun {
                tracker,
                recycle,
                samples,
            });
        }
        emit(&mut doc, &table_incr(&results)?);
    }
    if opts.only.contains(&Section::Pause) {
        for (tracker, count) in [
            ("uffd", plan.pause_samples),
            ("hash", plan.pause_samples_hash),
        ] {
            progress(&format!(
                "steady-state pauses of {} at 1 % dirty, {tracker} tracker ({count} checkpoints)",
                mib(BIG)
            ));
            let samples = run_child(
                "pause",
                &[
                    ("size", BIG.to_string()),
                    ("count", count.to_string()),
                    ("tracker", tracker.to_owned()),
                    ("dir", child_dir(dir, &format!("pause-{tracker}"))),
                ],
            )?;
            results.pause.push((tracker, samples));
        }
        emit(&mut doc, &table_pause(&results)?);
    }
    if opts.only.contains(&Section::Recover) {
        for size in SIZES {
            for increments in [0, CHAIN_INCREMENTS] {
                progress(&format!(
                    "recovery of {} from a full image{}",
                    mib(size),
                    if increments > 0 {
                        format!(" + {increments} increments")
                    } else {
                        String::new()
                    }
                ));
                let row = recovery(dir, size, increments, plan.recover_reps)?;
                results.recover.push(row);
            }
        }
        emit(&mut doc, &table_recover(&results));
    }
    if opts.only.contains(&Section::Phases) {
        for size in SIZES {
            progress(&format!("phases of a full checkpoint of {}", mib(size)));
            let samples = run_child(
                "phases",
                &[
                    ("size", size.to_string()),
                    ("reps", plan.phase_reps.to_string()),
                    ("dir", child_dir(dir, &format!("phases-{size}"))),
                ],
            )?;
            results.phases.insert(size, samples);
        }
        emit(&mut doc, &table_phases(&results)?);
    }
    let tail = format!(
        "Total run time: {:.0} s. Load at the end: {}.\n",
        began.elapsed().as_secs_f64(),
        load()
    );
    emit(&mut doc, &tail);
    if let Some(out) = &opts.out {
        fs::write(out, &doc).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("ckpt-bench: wrote {}", out.display());
    }
    scratch.close().context("removing the scratch directory")?;
    Ok(())
}

fn emit(doc: &mut String, section: &str) {
    print!("{section}");
    doc.push_str(section);
}

fn progress(what: &str) {
    eprintln!("ckpt-bench: {what} ...");
}

fn child_dir(scratch: &Path, name: &str) -> String {
    scratch.join(name).display().to_string()
}

fn staging_max() -> Result<usize> {
    match std::env::var(ENV_CKPT_STAGING_MAX) {
        Ok(v) if !v.is_empty() => parse_size(&v)
            .with_context(|| format!("{ENV_CKPT_STAGING_MAX}={v:?} is not a size like 64MiB")),
        _ => Ok(DEFAULT_STAGING_MAX),
    }
}

/// Everything the children measured.
#[derive(Debug, Default)]
struct Results {
    full: BTreeMap<usize, Vec<Sample>>,
    /// Full checkpoints of STAGING_VARIANT_SIZE with staging_max raised above it.
    full_staging: Option<Vec<Sample>>,
    incr: Vec<IncrRun>,
    pause: Vec<(&'static str, Vec<Sample>)>,
    recover: Vec<RecoverRow>,
    phases: BTreeMap<usize, Vec<Sample>>,
}

/// One child's incremental checkpoints (table 2).
#[derive(Debug)]
struct IncrRun {
    tracker: &'static str,
    /// Whether each image's page cache was dropped after its measurement (as table 1 deletes
    /// each image); the verdict rows do, an extra run shows the cost of not doing it.
    recycle: bool,
    samples: Vec<Sample>,
}

impl Results {
    /// The full-checkpoint runs: (label, size, samples).
    fn full_runs(&self) -> Vec<(String, usize, &Vec<Sample>)> {
        let mut runs: Vec<(String, usize, &Vec<Sample>)> = self
            .full
            .iter()
            .map(|(size, s)| (mib(*size), *size, s))
            .collect();
        if let Some(s) = &self.full_staging {
            runs.push((
                format!(
                    "{} (staging_max {})",
                    mib(STAGING_VARIANT_SIZE),
                    mib(STAGING_VARIANT_MAX)
                ),
                STAGING_VARIANT_SIZE,
                s,
            ));
        }
        runs
    }
}

/// One `@tag key=value ...` line a child printed.
#[derive(Debug, Clone)]
struct Sample {
    tag: String,
    fields: BTreeMap<String, String>,
}

impl Sample {
    fn parse(line: &str) -> Option<Sample> {
        let mut words = line.strip_prefix('@')?.split_whitespace();
        let tag = words.next()?.to_owned();
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Sample { tag, fields })
    }

    fn text(&self, key: &str) -> Result<&str> {
        self.fields
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("sample {} has no {key}", self.tag))
    }

    fn num(&self, key: &str) -> Result<u64> {
        let t = self.text(key)?;
        t.parse()
            .with_context(|| format!("sample {} field {key}={t:?} is not a number", self.tag))
    }

    fn ms(&self, key: &str) -> Result<f64> {
        Ok(ns_to_ms(self.num(key)?))
    }
}

fn tagged<'a>(samples: &'a [Sample], tag: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| s.tag == tag)
}

/// Runs this program again in `role` with `params`; returns the samples it printed. Its
/// stderr goes to ours.
fn run_child(role: &str, params: &[(&str, String)]) -> Result<Vec<Sample>> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    let exe = std::env::current_exe().context("finding the bench executable")?;
    let mut spec = role.to_owned();
    for (k, v) in params {
        ensure!(
            !v.contains(char::is_whitespace),
            "parameter {k}={v:?} contains white space"
        );
        let _ = write!(spec, " {k}={v}");
    }
    let out = Command::new(exe)
        .env(ROLE_ENV, &spec)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running the child role {spec:?}"))?;
    if !out.status.success() {
        bail!("child role {spec:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(Sample::parse)
        .collect())
}

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C kills the running child (same process group) and makes the parent stop after it, so
/// the scratch directory is still removed.
fn install_interrupt_handler() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let handler = on_interrupt as extern "C" fn(libc::c_int);
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let old = unsafe { libc::signal(sig, handler as libc::sighandler_t) };
        ensure!(
            old != libc::SIG_ERR,
            "installing a signal handler: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 4: recovery, orchestrated by the parent (writer child, then fresh recovering children).

#[derive(Debug)]
struct RecoverRow {
    size: usize,
    increments: usize,
    images: u64,
    image_bytes: u64,
    runs: Vec<RecoverRun>,
}

#[derive(Debug)]
struct RecoverRun {
    /// The images' pages were evicted from the page cache before the run.
    cold: bool,
    new_ms: f64,
    recover_ms: f64,
    /// One verification pass over the chain, warm, after the recovery.
    verify_ms: f64,
    /// The buffer's digest matched and the whole chain was applied.
    ok: bool,
    /// Share of the images' pages in the page cache before the run.
    cached: f64,
}

fn recovery(scratch: &Path, size: usize, increments: usize, reps: usize) -> Result<RecoverRow> {
    let dir = scratch.join(format!("recover-{size}-{increments}"));
    let dir_text = dir.display().to_string();
    let written = run_child(
        "chain",
        &[
            ("size", size.to_string()),
            ("increments", increments.to_string()),
            ("dir", dir_text.clone()),
        ],
    )?;
    let chain = tagged(&written, "chain")
        .next()
        .context("the chain writer printed no summary")?;
    let digest = chain.text("digest")?.to_owned();
    let images = chain.num("images")?;
    let image_bytes = chain.num("bytes")?;
    let mut runs = Vec::new();
    for _ in 0..reps {
        for cold in [true, false] {
            let files = image_files(&dir)?;
            if cold {
                for f in &files {
                    evict(f)?;
                }
            }
            let cached = cached_share(&files)?;
            let got = run_child(
                "recover",
                &[("size", size.to_string()), ("dir", dir_text.clone())],
            )?;
            let r = tagged(&got, "recover")
                .next()
                .context("the recovering child printed no result")?;
            let chain_len = r.num("chain")?;
            let ok = r.text("digest")? == digest && chain_len == images;
            runs.push(RecoverRun {
                cold,
                new_ms: r.ms("new_ns")?,
                recover_ms: r.ms("recover_ns")?,
                verify_ms: r.ms("verify_ns")?,
                ok,
                cached,
            });
        }
    }
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(RecoverRow {
        size,
        increments,
        images,
        image_bytes,
        runs,
    })
}

/// The committed images (and anything else) below a store root.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// Drops a file's (clean) pages from the page cache, so the next reader goes to the disk;
/// only this file is affected, not the rest of the machine.
fn evict(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: fadvise on a descriptor we own; it changes only caching.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    ensure!(
        rc == 0,
        "posix_fadvise({}): {}",
        path.display(),
        std::io::Error::from_raw_os_error(rc)
    );
    Ok(())
}

/// The share of the files' pages in the page cache (mincore), to show what "cold" meant.
fn cached_share(files: &[PathBuf]) -> Result<f64> {
    let page = page_size();
    let (mut resident, mut total) = (0usize, 0usize);
    for path in files {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = usize::try_from(f.metadata()?.len()).context("file length")?;
        if len == 0 {
            continue;
        }
        // SAFETY: a shared read-only mapping of a file we opened; it is only passed to
        // mincore and unmapped below, never dereferenced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        ensure!(
            p != libc::MAP_FAILED,
            "mmap {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: `p` maps `len` bytes; `vec` holds one byte per page of it.
        let rc = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
        let err = std::io::Error::last_os_error();
        // SAFETY: unmaps the mapping created above, which nothing else uses.
        unsafe { libc::munmap(p, len) };
        ensure!(rc == 0, "mincore {}: {err}", path.display());
        resident += vec.iter().filter(|b| **b & 1 != 0).count();
        total += pages;
    }
    Ok(if total == 0 {
        0.0
    } else {
        resident as f64 / total as f64
    })
}

// ---------------------------------------------------------------------------------------------
// Tables.

/// A markdown table.
#[derive(Debug)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
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

fn table_full(results: &Results) -> String {
    let mut t = Table::new(&[
        "critical memory",
        "image bytes",
        "capture",
        "n",
        "libft → durable ms",
        "libft MB/s",
        "write+fdatasync ms",
        "MB/s",
        "ratio",
        "paired ratio",
        "+rename+dir fsync ms",
        "MB/s",
        "ratio",
        "target",
        "verdict",
    ]);
    let mut notes = String::new();
    for (label, _, samples) in results.full_runs() {
        let ck: Vec<&Sample> = tagged(samples, "full").collect();
        let plain: Vec<&Sample> = tagged(samples, "plain").collect();
        let Some(first) = ck.first() else { continue };
        let bytes = first.num("file_bytes").unwrap_or(0);
        let ck_ms = median(ck.iter().filter_map(|s| s.ms("total_ns").ok()).collect());
        let sync_ms = median(
            plain
                .iter()
                .filter_map(|s| Some(s.ms("write_ns").ok()? + s.ms("sync_ns").ok()?))
                .collect(),
        );
        let all_ms = median(plain.iter().filter_map(|s| s.ms("total_ns").ok()).collect());
        let ratio = sync_ms / ck_ms * 100.0;
        let ratio_all = all_ms / ck_ms * 100.0;
        // Same-rep pairs cancel the disk's drift between reps (a shared virtual disk).
        let paired = median(
            ck.iter()
                .filter_map(|c| {
                    let rep = c.num("rep").ok()?;
                    let pl = plain.iter().find(|p| p.num("rep").ok() == Some(rep))?;
                    Some(
                        (pl.ms("write_ns").ok()? + pl.ms("sync_ns").ok()?)
                            / c.ms("total_ns").ok()?
                            * 100.0,
                    )
                })
                .collect(),
        );
        t.row(vec![
            label.clone(),
            bytes.to_string(),
            methods(&ck),
            ck.len().to_string(),
            format!("{ck_ms:.1}"),
            format!("{:.0}", mb_per_s(bytes, ck_ms)),
            format!("{sync_ms:.1}"),
            format!("{:.0}", mb_per_s(bytes, sync_ms)),
            format!("{ratio:.0} %"),
            format!("{paired:.0} %"),
            format!("{all_ms:.1}"),
            format!("{:.0}", mb_per_s(bytes, all_ms)),
            format!("{ratio_all:.0} %"),
            format!("≥ {TARGET_FULL_RATIO_PCT:.0} % of write+fdatasync"),
            verdict(ratio >= TARGET_FULL_RATIO_PCT).to_owned(),
        ]);
        let spread: Vec<String> = ck
            .iter()
            .filter_map(|s| s.ms("total_ns").ok())
            .map(|v| format!("{v:.0}"))
            .collect();
        let pspread: Vec<String> = plain
            .iter()
            .filter_map(|s| Some(s.ms("write_ns").ok()? + s.ms("sync_ns").ok()?))
            .map(|v| format!("{v:.0}"))
            .collect();
        let plain_v = sorted(
            plain
                .iter()
                .filter_map(|s| Some(s.ms("write_ns").ok()? + s.ms("sync_ns").ok()?))
                .collect(),
        );
        let unstable = match (plain_v.first(), plain_v.last()) {
            (Some(lo), Some(hi)) if *lo > 0.0 => hi / lo > UNSTABLE_SPREAD,
            _ => false,
        };
        let _ = writeln!(
            notes,
            "- {}: libft samples {} ms; write+fdatasync samples {} ms.{}",
            label.clone(),
            spread.join(", "),
            pspread.join(", "),
            if unstable {
                " The plain write's own time varied more than 2× between reps (the disk, not \
                 the code): this verdict may flip between runs."
            } else {
                ""
            }
        );
    }
    format!(
        "### 1. Full checkpoint until durable vs a plain write of the same bytes\n\n\
         libft: `checkpoint(0)` then `wait(0)` (= `checkpoint_sync`), heap filled with random \
         data (every page written), store policy full_every 0 and keep > reps, so every image \
         is full and no retention delete falls inside a measurement; each image is removed \
         after its measurement, as the plain write's file is (on this VM, page cache recycled \
         from a file just removed is much cheaper to write into than memory taken anew, so \
         both sides must recycle alike). \"staging\": the pages \
         are copied into the staging buffer during the pause and the writer thread writes the \
         image from it; \"fork\": a copy-on-write child writes the image file itself (a \
         thread of the child touches each page ahead of it, see table 5) and the writer thread \
         commits as soon as the child reports, reaping it afterwards. Either way the image goes out in vectored \
         writes straight from memory, and writeback of each {writeback} MiB written starts at \
         once (`sync_file_range`), so the final `fdatasync` waits for little more than the \
         last piece (table 5 shows what that alone is worth to a plain writer). Plain: `write` \
         of the image's length from the same memory to a new file in the store directory, \
         `fdatasync`, then `rename` + `fsync` of the directory. One warm-up round of both first \
         (not counted), \
         then the two alternate in order within each rep; `syncfs` before each one. \"ratio\" = libft throughput / plain throughput from the medians; \"paired \
         ratio\" = the median of the per-rep ratios (each rep's two runs are back to back); the \
         verdict uses the ratio of medians.\n\n{}\n{notes}\n",
        t.render(),
        writeback = ckpt::store::WRITEBACK_STEP >> 20,
    )
}

fn table_incr(results: &Results) -> Result<String> {
    let full_ref = results.full.get(&BIG).map(|s| {
        median(
            tagged(s, "full")
                .filter_map(|x| x.ms("total_ns").ok())
                .collect(),
        )
    });
    let mut t = Table::new(&[
        "tracker",
        "dirty",
        "n",
        "pages in image",
        "image MB",
        "capture",
        "pause ms",
        "→ durable ms",
        "% of full",
        "target",
        "verdict",
    ]);
    let mut notes = String::new();
    for run in &results.incr {
        let (tracker, samples) = (run.tracker, &run.samples);
        let base = tagged(samples, "base")
            .next()
            .context("incremental child printed no full image")?;
        let base_ms = base.ms("total_ns")?;
        let reference = full_ref.unwrap_or(base_ms);
        let kind = if run.recycle {
            base.text("kind")?.to_owned()
        } else {
            format!("{} (images kept in page cache)", base.text("kind")?)
        };
        let kind = kind.as_str();
        t.row(vec![
            kind.to_owned(),
            "full (first image)".to_owned(),
            "1".to_owned(),
            base.num("pages")?.to_string(),
            format!("{:.1}", mb(base.num("file_bytes")?)),
            base.text("method")?.to_owned(),
            format!("{:.2}", base.ms("pause_ns")?),
            format!("{base_ms:.1}"),
            format!("{:.0} %", base_ms / reference * 100.0),
            String::new(),
            String::new(),
        ]);
        for permille in DIRTY_PERMILLE {
            let rows: Vec<&Sample> = tagged(samples, "incr")
                .filter(|s| s.num("permille").ok() == Some(permille as u64))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let fulls = rows
                .iter()
                .filter(|s| s.text("incremental").ok() != Some("1"))
                .count();
            if fulls > 0 {
                let _ = writeln!(
                    notes,
                    "- {tracker} {}: {fulls} image(s) were full, not increments.",
                    pct_permille(permille)
                );
            }
            let durable = median(rows.iter().filter_map(|s| s.ms("total_ns").ok()).collect());
            let share = durable / reference * 100.0;
            let (target, pass) = if permille == STEADY_PERMILLE && run.recycle {
                (
                    format!("≤ {TARGET_INCR_PCT:.0} % of full"),
                    verdict(share <= TARGET_INCR_PCT).to_owned(),
                )
            } else {
                ("—".to_owned(), String::new())
            };
            t.row(vec![
                kind.to_owned(),
                pct_permille(permille),
                rows.len().to_string(),
                median(
                    rows.iter()
                        .filter_map(|s| s.num("pages").ok().map(|v| v as f64))
                        .collect(),
                )
                .to_string(),
                format!(
                    "{:.1}",
                    median(
                        rows.iter()
                            .filter_map(|s| s.num("file_bytes").ok().map(mb))
                            .collect()
                    )
                ),
                methods(&rows),
                format!(
                    "{:.2}",
                    median(rows.iter().filter_map(|s| s.ms("pause_ns").ok()).collect())
                ),
                format!("{durable:.1}"),
                format!("{share:.1} %"),
                target,
                pass,
            ]);
        }
    }
    let reference_note = match full_ref {
        Some(ms) => format!(
            "the median full checkpoint of {} from table 1 ({ms:.1} ms)",
            mib(BIG)
        ),
        None => "each tracker's own first (full) image (table 1 was not run)".to_owned(),
    };
    Ok(format!(
        "### 2. Incremental checkpoints of {}\n\n\
         Random distinct pages written (8 random bytes each) since the previous image, then \
         `checkpoint(0)` + `wait(0)`; `syncfs` before each. Store policy full_every = u32::MAX \
         (every image after the first is an increment). \"% of full\" is relative to \
         {reference_note}. After each measurement the image's pages are dropped from the page \
         cache (`posix_fadvise(DONTNEED)`, outside the measured time; the chain needs the \
         files, so they cannot be deleted), because table 1 deletes each measured image: on \
         this VM (free page reporting) page cache recycled from a file just dropped costs \
         about as much to write into as on bare metal, while memory the guest takes anew \
         first faults on the host, about 9 µs a page (measured with a plain C writer after a \
         1 GiB heap and a 1 GB file: 10.8 MB into a new file took 25-40 ms kept, 2.2 ms \
         recycled, when the host was slow to back memory), so a chain that keeps every image \
         cached draws fresh memory for each increment and the full checkpoint it is compared \
         with does not. A long-running application does recycle: retention deletes old \
         images. The rows \"images kept in page cache\" show the same run without the drops, \
         for comparison (no verdict); how much they cost varies with the host's state.\n\n\
         {}\n{notes}\n",
        mib(BIG),
        t.render()
    ))
}

fn table_pause(results: &Results) -> Result<String> {
    let mut t = Table::new(&[
        "workload", "tracker", "images", "capture", "n", "p50 ms", "p99 ms", "max ms", "target",
        "verdict",
    ]);
    for (tracker, samples) in &results.pause {
        let all: Vec<&Sample> = tagged(samples, "pause").collect();
        let kind = all
            .first()
            .map_or(*tracker, |s| s.text("kind").unwrap_or(tracker));
        let increment = |s: &&Sample| s.text("incremental").ok() == Some("1");
        let compacts = |s: &&Sample| s.text("compacts").ok() == Some("1");
        let subsets: [(&str, Vec<&Sample>); 5] = [
            ("all (every 9th a full image)", all.clone()),
            (
                "increments not compacted",
                all.iter()
                    .copied()
                    .filter(|s| increment(s) && !compacts(s))
                    .collect(),
            ),
            (
                "increments compacted into the full image",
                all.iter().copied().filter(compacts).collect(),
            ),
            (
                "increments right after a full image",
                all.iter()
                    .copied()
                    .filter(|s| increment(s) && s.text("after_full").ok() == Some("1"))
                    .collect(),
            ),
            (
                "full captures",
                all.iter().copied().filter(|s| !increment(s)).collect(),
            ),
        ];
        for (which, rows) in subsets {
            if rows.is_empty() {
                continue;
            }
            let v = sorted(rows.iter().filter_map(|s| s.ms("pause_ns").ok()).collect());
            let p99 = percentile(&v, 99.0);
            let (target, pass) = if which.starts_with("all") {
                (
                    format!("p99 ≤ {TARGET_PAUSE_MS:.0} ms"),
                    verdict(p99 <= TARGET_PAUSE_MS).to_owned(),
                )
            } else {
                (String::new(), String::new())
            };
            t.row(vec![
                format!("{} steady state, 1 % dirty", mib(BIG)),
                kind.to_owned(),
                which.to_owned(),
                methods(&rows),
                rows.len().to_string(),
                format!("{:.2}", percentile(&v, 50.0)),
                format!("{p99:.2}"),
                format!("{:.2}", v.last().copied().unwrap_or(f64::NAN)),
                target,
                pass,
            ]);
        }
    }
    for (label, size, samples) in results.full_runs() {
        let rows: Vec<&Sample> = tagged(samples, "full").collect();
        let v = sorted(rows.iter().filter_map(|s| s.ms("pause_ns").ok()).collect());
        let p99 = percentile(&v, 99.0);
        let (target, pass) = if size == BIG {
            (
                format!("p99 ≤ {TARGET_PAUSE_MS:.0} ms"),
                verdict(p99 <= TARGET_PAUSE_MS).to_owned(),
            )
        } else {
            ("—".to_owned(), String::new())
        };
        t.row(vec![
            format!("{label} full checkpoint (table 1)"),
            rows.first()
                .and_then(|s| s.text("kind").ok())
                .unwrap_or("?")
                .to_owned(),
            "full".to_owned(),
            methods(&rows),
            rows.len().to_string(),
            format!("{:.2}", percentile(&v, 50.0)),
            format!("{p99:.2}"),
            format!("{:.2}", v.last().copied().unwrap_or(f64::NAN)),
            target,
            pass,
        ]);
    }
    let mut first = Vec::new();
    for (label, _, samples) in results.full_runs() {
        if let Some(w) = tagged(samples, "full_warmup").next() {
            first.push(format!("{label} {:.2} ms", w.ms("pause_ns")?));
        }
    }
    let first = if first.is_empty() {
        String::new()
    } else {
        format!(
            "Pause of the first checkpoint of each process in table 1 (warm-up round, not in \
             the rows above; a fresh staging buffer is page-faulted in): {}.\n\n",
            first.join(", ")
        )
    };
    let limit = StorePolicy::default().chain_limit();
    Ok(format!(
        "### 3. The application's pause per checkpoint\n\n\
         `Started::pause` of `checkpoint(0)`: planning (store directory scan), collecting the \
         dirty pages and capturing them; not counting the wait for the previous image (nor, \
         when a chain reached the store's limit of {limit} increments, for its running compaction). \
         Steady state: 1 % of the pages (random) written between checkpoints while the \
         previous image is written in the background, default store policy (a full image \
         after 8 increments): the 9th image is captured as an increment like the others and, \
         once committed, compacted into the full image on a background thread (composed from \
         the chain on disk), so no checkpoint after the first forks. \"Increments right after \
         a full image\" follow a compacted one (its compaction usually still running). \
         Percentiles are nearest-rank.\n\n{}\n{first}",
        t.render()
    ))
}

fn table_recover(results: &Results) -> String {
    let mut t = Table::new(&[
        "critical memory",
        "images",
        "image MB",
        "page cache",
        "cached before",
        "n",
        "Checkpointer::new ms",
        "t_recover ms",
        "MB/s",
        "one warm verify pass ms",
        "restored correctly",
    ]);
    for row in &results.recover {
        for cold in [true, false] {
            let runs: Vec<_> = row.runs.iter().filter(|r| r.cold == cold).collect();
            if runs.is_empty() {
                continue;
            }
            let new_ms = median(runs.iter().map(|r| r.new_ms).collect());
            let rec_ms = median(runs.iter().map(|r| r.recover_ms).collect());
            let verify_ms = median(runs.iter().map(|r| r.verify_ms).collect());
            let cached = median(runs.iter().map(|r| r.cached * 100.0).collect());
            let ok = runs.iter().all(|r| r.ok);
            t.row(vec![
                mib(row.size),
                if row.increments == 0 {
                    format!("{} (full)", row.images)
                } else {
                    format!("{} (full + {} × 1 %)", row.images, row.increments)
                },
                format!("{:.1}", mb(row.image_bytes)),
                if cold { "cold" } else { "warm" }.to_owned(),
                format!("{cached:.0} %"),
                runs.len().to_string(),
                format!("{new_ms:.2}"),
                format!("{rec_ms:.1}"),
                format!("{:.0}", mb_per_s(row.image_bytes, rec_ms)),
                format!("{verify_ms:.1}"),
                if ok { "yes" } else { "NO" }.to_owned(),
            ]);
        }
    }
    format!(
        "### 4. Recovery in a fresh process\n\n\
         A writer child fills the heap, takes a full checkpoint (and 7 increments of 1 % random \
         pages) and exits; then a fresh child maps the heap at the same address and calls \
         `recover(0)` (which verifies the whole chain before applying it, then copies each \
         chunk into the wiped heap after one `MADV_POPULATE_WRITE` of its pages). \"cold\": the images' \
         pages were dropped from the page cache first (`posix_fadvise(DONTNEED)` on each image; \
         \"cached before\" is what `mincore` saw); \"warm\": right after a cold run. \"restored \
         correctly\": the xxh3 of the recovered buffer equals the writer's and the whole chain \
         was applied. \"one warm verify pass\": `Store::verify` of every image of the chain \
         in the same child right after the recovery (files cached): `recover` verifies the \
         whole chain before applying it, so it reads and checksums everything twice. No \
         target was set for recovery.\n\n{}\n",
        t.render()
    )
}

fn table_phases(results: &Results) -> Result<String> {
    let mut steps = Table::new(&[
        "critical memory",
        "libft capture pause (table 1)",
        "fork",
        "pipe stream, child `write`s",
        "pipe stream, child `vmsplice`s",
        "process_vm_readv from child",
        "xxh3 of all chunks",
        "copy into untouched memory",
        "MADV_POPULATE_WRITE + copy",
        "image write to page cache (incl. xxh3, early writeback)",
        "its fdatasync",
        "its rename + dir fsync",
        "plain write / fdatasync of the same bytes",
    ]);
    let mut ends = Table::new(&[
        "critical memory",
        "n",
        "image from memory (no capture)",
        "child writes the image, touch-ahead thread, commit on its report (libft's fork path)",
        "child writes the image alone, commit after its exit (libft's fork path before)",
        "child streams into a pipe (libft's previous fork path)",
        "plain write+fdatasync",
        "plain write+fdatasync, early writeback",
        "libft (table 1, other moment)",
        "plain write+fdatasync (table 1, other moment)",
    ]);
    let ms_mbs = |ms: f64, bytes: u64| format!("{ms:.1} ms ({:.0} MB/s)", mb_per_s(bytes, ms));
    for (size, samples) in &results.phases {
        let p = tagged(samples, "phases")
            .next()
            .context("phases child printed nothing")?;
        let recipe: Vec<&Sample> = tagged(samples, "recipe").collect();
        let bytes = recipe
            .first()
            .context("phases child printed no recipe")?
            .num("bytes")?;
        let med = |key: &str| median(recipe.iter().filter_map(|s| s.ms(key).ok()).collect());
        let full = results.full.get(size);
        let from_full = |tag: &str, key: &str| {
            full.map(|s| median(tagged(s, tag).filter_map(|x| x.ms(key).ok()).collect()))
        };
        let plain_total = full.map(|s| {
            median(
                tagged(s, "plain")
                    .filter_map(|x| Some(x.ms("write_ns").ok()? + x.ms("sync_ns").ok()?))
                    .collect(),
            )
        });
        let dash = || "—".to_owned();
        steps.row(vec![
            mib(*size),
            from_full("full", "pause_ns").map_or_else(dash, |v| format!("{v:.1} ms")),
            format!("{:.2} ms", p.ms("fork_ns")?),
            ms_mbs(p.ms("pipe_ns")?, bytes),
            ms_mbs(p.ms("vmsplice_ns")?, bytes),
            ms_mbs(p.ms("vm_read_ns")?, bytes),
            ms_mbs(p.ms("xxh3_ns")?, bytes),
            ms_mbs(p.ms("fresh_copy_ns")?, bytes),
            ms_mbs(p.ms("populated_copy_ns")?, bytes),
            ms_mbs(med("image_write_ns"), bytes),
            format!("{:.1} ms", med("image_sync_ns")),
            format!("{:.2} ms", med("image_rename_ns")),
            format!(
                "{:.1} / {:.1} ms",
                med("plain_write_ns"),
                med("plain_sync_ns")
            ),
        ]);
        let recipe_total = median(
            recipe
                .iter()
                .filter_map(|s| {
                    Some(
                        s.ms("image_write_ns").ok()?
                            + s.ms("image_sync_ns").ok()?
                            + s.ms("image_rename_ns").ok()?,
                    )
                })
                .collect(),
        );
        ends.row(vec![
            mib(*size),
            recipe.len().to_string(),
            ms_mbs(recipe_total, bytes),
            ms_mbs(med("by_child_ns"), bytes),
            ms_mbs(med("by_child_alone_ns"), bytes),
            ms_mbs(med("from_write_ns"), bytes),
            ms_mbs(
                median(
                    recipe
                        .iter()
                        .filter_map(|s| {
                            Some(s.ms("plain_write_ns").ok()? + s.ms("plain_sync_ns").ok()?)
                        })
                        .collect(),
                ),
                bytes,
            ),
            ms_mbs(med("plain_early_ns"), bytes),
            from_full("full", "total_ns").map_or_else(dash, |v| ms_mbs(v, bytes)),
            plain_total.map_or_else(dash, |v| ms_mbs(v, bytes)),
        ]);
    }
    Ok(format!(
        "### 5. Where the time of a full checkpoint goes\n\n\
         Measured in one child per size, on the same random data, without libft. Steps: a \
         `fork`ed copy-on-write child streaming the memory through a 1 MiB pipe while the \
         parent reads it in 1 MiB pieces (libft's previous fork path, `write` in the child), \
         the same with `vmsplice` in the child, the memory copied out of a waiting forked \
         child with `process_vm_readv`; xxh3-64 over 1 MiB chunks (ckpt's checksums); a copy \
         into a fresh, never-touched anonymous mapping (first-touch page faults), and the same \
         after one `madvise(MADV_POPULATE_WRITE)` of the whole range (what recovery's apply \
         pass now does before each chunk); the image written with `ckpt::ImageWriter` onto a \
         `ckpt::ImageFile` (vectored writes straight from memory, writeback started every \
         {writeback} MiB, as `ckpt::Store` does) from memory, then `fdatasync`, `rename`, \
         `fsync` of the directory (the store's commit recipe).\n\n{}\n\
         End to end until durable (medians over rounds that run these six one after the \
         other; `syncfs` before each): the image written from memory; libft's fork path \
         emulated (fork; the child starts a thread that reads one byte of each page ahead of \
         it, since a clone marks every page table entry it copies \"old\" and the first access \
         to each page then has the MMU set its accessed bit, which on this VM costs about \
         0.6 µs a page; the child writes the image onto the temp file itself and reports \
         through a pipe; the parent runs the commit recipe on the report, while the child's \
         address space is still being torn down, and reaps it afterwards); the same as libft \
         did before (no thread: the child pays the accessed bits in line; the parent waits for \
         the child's exit before committing); libft's previous fork path emulated (the child \
         streams into a pipe, one thread reads 1 MiB pieces into `ImageWriter` through a \
         256 KiB BufWriter, commit recipe); a plain `write` + `fdatasync` of the same bytes, \
         and the same written in 1 MiB pieces with writeback started every {writeback} MiB. \
         The last two columns come from table 1, measured at another moment on the same \
         disk.\n\n{}\n",
        steps.render(),
        ends.render(),
        writeback = ckpt::store::WRITEBACK_STEP >> 20,
    ))
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// "staging", "fork", or "staging 178, fork 22".
fn methods(rows: &[&Sample]) -> String {
    let staging = rows
        .iter()
        .filter(|s| s.text("method").ok() == Some("staging"))
        .count();
    let fork = rows
        .iter()
        .filter(|s| s.text("method").ok() == Some("fork"))
        .count();
    match (staging, fork) {
        (_, 0) => "staging".to_owned(),
        (0, _) => "fork".to_owned(),
        (s, f) => format!("staging {s}, fork {f}"),
    }
}

fn median(v: Vec<f64>) -> f64 {
    let v = sorted(v);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    // The smallest rank r (1-based) with r ≥ p/100 × n, computed in integers: p has at most
    // two decimals here.
    let scaled = (p * 100.0).round();
    let mut rank = 1;
    while rank < n && (rank as f64) * 10_000.0 < scaled * n as f64 {
        rank += 1;
    }
    sorted[rank - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn mb_per_s(bytes: u64, ms: f64) -> f64 {
    mb(bytes) / (ms / 1e3)
}

fn mib(size: usize) -> String {
    if size >= 1 << 30 && size.is_multiple_of(1 << 30) {
        format!("{} GiB", size >> 30)
    } else {
        format!("{} MiB", size >> 20)
    }
}

fn pct_permille(permille: usize) -> String {
    format!("{}.{} %", permille / 10, permille % 10)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `2025-01-31 12:34 UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Load averages and I/O pressure, from /proc.
fn load() -> String {
    let avg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let avg: Vec<&str> = avg.split_whitespace().take(3).collect();
    let io = fs::read_to_string("/proc/pressure/io").unwrap_or_default();
    let io = io
        .lines()
        .find_map(|l| l.strip_prefix("some "))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("avg60=")))
        .unwrap_or("?")
        .to_owned();
    format!(
        "load average {} (1/5/15 min), I/O pressure some avg60 {io} %",
        avg.join(" ")
    )
}

/// Whether a virtio balloon reports free pages to the host (feature bit 5,
/// VIRTIO_BALLOON_F_REPORTING): then pages the guest allocates anew (page cache, pipe buffers,
/// fresh anonymous memory) may first fault on the host, which makes large writes vary.
fn balloon_reporting() -> Option<String> {
    const VIRTIO_ID_BALLOON: &str = "0x0005";
    const F_REPORTING: usize = 5;
    let devices = fs::read_dir("/sys/bus/virtio/devices").ok()?;
    for d in devices.flatten() {
        let id = fs::read_to_string(d.path().join("device")).unwrap_or_default();
        if id.trim() != VIRTIO_ID_BALLOON {
            continue;
        }
        let features = fs::read_to_string(d.path().join("features")).unwrap_or_default();
        let on = features.as_bytes().get(F_REPORTING) == Some(&b'1');
        return Some(format!(
            "Virtual machine with a virtio balloon, free page reporting {}: memory the guest \
             allocates anew (page cache, pipe buffers, untouched anonymous pages) may first \
             fault on the host, so large writes vary a lot between identical trials",
            if on { "on" } else { "off" }
        ));
    }
    None
}

/// CPU model, cores, memory and kernel, from /proc.
fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {:.1} GiB RAM, Linux {}",
        mem_kib as f64 / (1u64 << 20) as f64,
        kernel.trim()
    )
}

/// The file system holding `path`: type, device and options of its mount, from mountinfo.
fn filesystem_of(path: &Path) -> String {
    let Ok(canon) = fs::canonicalize(path) else {
        return "unknown file system".to_owned();
    };
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(mount_point) = fields.get(4) else {
            continue;
        };
        let mount_point = mount_point.replace("\\040", " ");
        if !canon.starts_with(&mount_point) {
            continue;
        }
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let fstype = fields.get(sep + 1).copied().unwrap_or("?");
        let source = fields.get(sep + 2).copied().unwrap_or("?");
        let options = fields.get(5).copied().unwrap_or("?");
        let super_options = fields.get(sep + 3).copied().unwrap_or("?");
        let len = mount_point.len();
        if best.as_ref().is_none_or(|(l, _)| len >= *l) {
            best = Some((
                len,
                format!(
                    "{fstype} on {source} mounted at {mount_point} ({options}; {super_options})"
                ),
            ));
        }
    }
    best.map_or_else(|| "unknown file system".to_owned(), |(_, d)| d)
}

/// Flushes the file system holding `dir`, so that a measurement does not pay for earlier
/// writeback or discards (unlinked files on a `discard` mount).
fn quiesce(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: syncfs on a descriptor we own.
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    ensure!(
        rc == 0,
        "syncfs {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {}", dir.display()))
}

/// A small deterministic generator (xorshift64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// The children: one measurement each, results printed as `@tag key=value ...` lines.

/// The child roles: each sets up one process's worth of critical memory, measures, prints
/// `@tag key=value ...` lines for the parent, and removes the files it wrote (except the
/// `chain` role, whose store the recovering children read; the parent removes it).
mod child {
    use super::*;

    /// Parameters of a role: `role key=value ...`.
    #[derive(Debug)]
    struct Params {
        role: String,
        map: BTreeMap<String, String>,
    }

    impl Params {
        fn parse(spec: &str) -> Result<Params> {
            let mut words = spec.split_whitespace();
            let role = words.next().context("empty role")?.to_owned();
            let map = words
                .map(|w| {
                    w.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("bad role parameter {w:?}"))
                })
                .collect::<Result<_>>()?;
            Ok(Params { role, map })
        }

        fn text(&self, key: &str) -> Result<&str> {
            self.map
                .get(key)
                .map(String::as_str)
                .with_context(|| format!("role {} needs {key}=", self.role))
        }

        fn usize(&self, key: &str) -> Result<usize> {
            let t = self.text(key)?;
            t.parse()
                .with_context(|| format!("{key}={t:?} is not a count"))
        }

        fn dir(&self) -> Result<PathBuf> {
            Ok(PathBuf::from(self.text("dir")?))
        }

        fn tracker(&self) -> Result<DirtyMode> {
            match self.text("tracker")? {
                "uffd" => Ok(DirtyMode::Uffd),
                "hash" => Ok(DirtyMode::Hash),
                other => bail!("unknown tracker {other:?}"),
            }
        }
    }

    pub fn run(spec: &str) -> Result<()> {
        let p = Params::parse(spec)?;
        match p.role.as_str() {
            "full" => full(&p),
            "incr" => incr(&p),
            "pause" => pause(&p),
            "chain" => chain(&p),
            "recover" => recover(&p),
            "phases" => phases(&p),
            other => bail!("unknown role {other:?}"),
        }
    }

    fn emit(tag: &str, fields: &[(&str, String)]) {
        let mut line = format!("@{tag}");
        for (k, v) in fields {
            let _ = write!(line, " {k}={v}");
        }
        println!("{line}");
    }

    fn config(dir: &Path, size: usize, dirty: DirtyMode) -> Result<CheckpointConfig> {
        let mut c = CheckpointConfig::new(
            APP,
            dir,
            HeapConfig {
                addr: HEAP_ADDR,
                size: size + HEAP_SLACK,
            },
        );
        c.dirty = dirty;
        c.staging_max = staging_max()?;
        Ok(c)
    }

    /// A role's `staging_max=` parameter, if given, overrides the configuration.
    fn override_staging(p: &Params, c: &mut CheckpointConfig) -> Result<()> {
        if p.map.contains_key("staging_max") {
            c.staging_max = p.usize("staging_max")?;
        }
        Ok(())
    }

    /// The measured buffer: `size` bytes in the critical heap, every page written with random
    /// data, registered as the root [`ROOT`].
    struct Buffer {
        ptr: *mut u8,
        len: usize,
    }

    impl Buffer {
        fn fill(cp: &Checkpointer, size: usize, rng: &mut Rng) -> Result<Buffer> {
            let block = cp
                .heap()
                .alloc(size, BUFFER_ALIGN)
                .context("allocating the measured buffer in the critical heap")?;
            cp.heap()
                .set_root(ROOT, Some(block))
                .context("naming the buffer")?;
            let mut b = Buffer {
                ptr: block.as_ptr(),
                len: size,
            };
            for word in b.bytes_mut().chunks_exact_mut(8) {
                word.copy_from_slice(&rng.next().to_le_bytes());
            }
            Ok(b)
        }

        fn found(cp: &Checkpointer, size: usize) -> Result<Buffer> {
            let block = cp
                .heap()
                .root(ROOT)
                .context("reading the root")?
                .context("the recovered heap has no buffer root")?;
            Ok(Buffer {
                ptr: block.as_ptr(),
                len: size,
            })
        }

        fn bytes(&self) -> &[u8] {
            // SAFETY: `ptr` is a live heap block of at least `len` bytes (allocated here or
            // found through its root after recovery); the heap outlives the Buffer, and the
            // only writer is this thread, through `bytes_mut`.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }

        fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as in `bytes`; `&mut self` makes this the only view.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
        }

        /// Writes 8 random bytes into each of `count` distinct random pages.
        fn dirty(&mut self, count: usize, rng: &mut Rng) {
            let page = page_size();
            let pages = self.len / page;
            let mut seen = vec![0u64; pages.div_ceil(64)];
            let mut done = 0;
            let bytes = self.bytes_mut();
            while done < count.min(pages) {
                let p = rng.below(pages);
                if seen[p / 64] & (1 << (p % 64)) != 0 {
                    continue;
                }
                seen[p / 64] |= 1 << (p % 64);
                let at = p * page + rng.below(page / 8) * 8;
                bytes[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
                done += 1;
            }
        }
    }

    fn method(m: CaptureMethod) -> &'static str {
        match m {
            CaptureMethod::Staging => "staging",
            CaptureMethod::Fork => "fork",
        }
    }

    fn kind(cp: &Checkpointer) -> &'static str {
        match cp.tracker_kind() {
            TrackerKind::Uffd => "uffd",
            TrackerKind::Hash => "hash",
        }
    }

    /// One checkpoint of stream 0 until durable: (start info, image, elapsed).
    /// Drops a committed (so clean) image's pages from the page cache, as deleting it would:
    /// table 2's counterpart of table 1 removing each measured image.
    fn drop_cached(path: &Path) -> Result<()> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: posix_fadvise on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(rc == 0, "posix_fadvise {}: error {rc}", path.display());
        Ok(())
    }

    fn durable(cp: &Checkpointer) -> Result<(ft::critical::Started, ckpt::ImageInfo, Duration)> {
        let t = Instant::now();
        let started = cp.checkpoint(0).context("checkpoint")?;
        let info = cp
            .wait(0)
            .context("writing the image")?
            .context("the checkpoint reported no image")?;
        Ok((started, info, t.elapsed()))
    }

    fn started_fields(
        s: &ft::critical::Started,
        info: &ckpt::ImageInfo,
        total: Duration,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("total_ns", nanos(total).to_string()),
            ("pause_ns", nanos(s.pause).to_string()),
            ("method", method(s.method).to_owned()),
            ("pages", s.pages.to_string()),
            ("bytes", s.bytes.to_string()),
            ("file_bytes", info.file_bytes.to_string()),
            ("incremental", u8::from(s.parent.is_some()).to_string()),
        ]
    }

    /// Item 1: full checkpoints and the plain write of the same bytes, alternating.
    fn full(p: &Params) -> Result<()> {
        let size = p.usize("size")?;
        let reps = p.usize("reps")?;
        let dir = p.dir()?;
        let mut c = config(&dir, size, DirtyMode::Auto)?;
        override_staging(p, &mut c)?;
        c.policy = StorePolicy {
            // Room for every image of the run (warm-up included): nothing is deleted.
            keep: reps + 2,
            full_every: 0,
        };
        let stream_dir = c.stream_dir(0);
        fs::create_dir_all(&stream_dir)?;
        // Removes each measured image afterwards, as the plain write removes its file: on a
        // VM with free page reporting, page cache recycled from a file just deleted is far
        // cheaper to write into than memory the guest takes anew, so both sides must recycle
        // alike (a kept image would make libft's next one draw fresh memory every time).
        let remover = ckpt::Store::open(&stream_dir, APP, c.policy.clone())
            .context("opening the store to remove measured images")?;
        let cp = Checkpointer::new(c).context("creating the checkpointer")?;
        let mut rng = Rng::new(SEED);
        let _buf = Buffer::fill(&cp, size, &mut rng)?;
        let heap_base = cp.heap().base();
        let heap_size = cp.heap().size();
        let mut image_bytes = 0usize;
        // Round 0 warms up (the writer thread, the staging buffer, the directory, the disk)
        // and is reported apart; rounds 1..=reps are the measurements.
        for rep in 0..=reps {
            let (full_tag, plain_tag) = if rep == 0 {
                ("full_warmup", "plain_warmup")
            } else {
                ("full", "plain")
            };
            let order = if rep % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for libft in order {
                quiesce(&dir)?;
                if libft {
                    let (s, info, total) = durable(&cp)?;
                    ensure!(s.parent.is_none(), "a full image was planned as increment");
                    image_bytes = usize::try_from(info.file_bytes)?;
                    let mut f = started_fields(&s, &info, total);
                    f.push(("rep", rep.to_string()));
                    f.push(("kind", kind(&cp).to_owned()));
                    emit(full_tag, &f);
                    remover
                        .delete(info.seq)
                        .context("removing the measured image")?;
                } else {
                    ensure!(
                        image_bytes > 0 && image_bytes <= heap_size,
                        "image of {image_bytes} bytes does not fit the heap of {heap_size}"
                    );
                    // SAFETY: the heap reservation is mapped readable for the Checkpointer's
                    // life and `image_bytes <= heap_size`; pages never written read as zero.
                    let data =
                        unsafe { std::slice::from_raw_parts(heap_base as *const u8, image_bytes) };
                    let tmp = stream_dir.join(format!("plain-{rep}.tmp"));
                    let done = stream_dir.join(format!("plain-{rep}.dat"));
                    let t = Instant::now();
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)
                        .with_context(|| format!("creating {}", tmp.display()))?;
                    f.write_all(data)?;
                    let written = t.elapsed();
                    f.sync_data()?;
                    let synced = t.elapsed();
                    fs::rename(&tmp, &done)?;
                    fsync_dir(&stream_dir)?;
                    let total = t.elapsed();
                    drop(f);
                    fs::remove_file(&done)?;
                    emit(
                        plain_tag,
                        &[
                            ("rep", rep.to_string()),
                            ("bytes", image_bytes.to_string()),
                            ("write_ns", nanos(written).to_string()),
                            ("sync_ns", nanos(synced - written).to_string()),
                            ("total_ns", nanos(total).to_string()),
                        ],
                    );
                }
            }
        }
        drop(cp);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Item 2: one full image, then increments at each dirty fraction.
    fn incr(p: &Params) -> Result<()> {
        let size = p.usize("size")?;
        let reps = p.usize("reps")?;
        let dir = p.dir()?;
        let mut c = config(&dir, size, p.tracker()?)?;
        c.policy = StorePolicy {
            full_every: u32::MAX,
            ..StorePolicy::default()
        };
        let recycle = p.usize("recycle")? != 0;
        let cp = Checkpointer::new(c).context("creating the checkpointer")?;
        let mut rng = Rng::new(SEED);
        let mut buf = Buffer::fill(&cp, size, &mut rng)?;
        let pages = size / page_size();
        fs::create_dir_all(&dir)?;
        quiesce(&dir)?;
        let (s, info, total) = durable(&cp)?;
        if recycle {
            drop_cached(&info.path)?;
        }
        let mut f = started_fields(&s, &info, total);
        f.push(("kind", kind(&cp).to_owned()));
        emit("base", &f);
        for permille in DIRTY_PERMILLE {
            for rep in 0..reps {
                buf.dirty(pages * permille / 1000, &mut rng);
                quiesce(&dir)?;
                let (s, info, total) = durable(&cp)?;
                if recycle {
                    drop_cached(&info.path)?;
                }
                let mut f = started_fields(&s, &info, total);
                f.push(("permille", permille.to_string()));
                f.push(("rep", rep.to_string()));
                emit("incr", &f);
            }
        }
        drop(cp);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Item 3: the steady state, 1 % dirty between checkpoints, default store policy.
    fn pause(p: &Params) -> Result<()> {
        let size = p.usize("size")?;
        let count = p.usize("count")?;
        let dir = p.dir()?;
        let c = config(&dir, size, p.tracker()?)?;
        let cp = Checkpointer::new(c).context("creating the checkpointer")?;
        let mut rng = Rng::new(SEED);
        let mut buf = Buffer::fill(&cp, size, &mut rng)?;
        let pages = size / page_size();
        // The first image (full, at start-up) is not part of the steady state.
        cp.checkpoint_sync(0).context("first checkpoint")?;
        // Whether the previous image was (or became, by compaction) a full one.
        let mut after_full = true;
        for i in 0..count {
            buf.dirty(pages * STEADY_PERMILLE / 1000, &mut rng);
            let s = cp.checkpoint(0).context("checkpoint")?;
            emit(
                "pause",
                &[
                    ("i", i.to_string()),
                    ("pause_ns", nanos(s.pause).to_string()),
                    ("method", method(s.method).to_owned()),
                    ("pages", s.pages.to_string()),
                    ("incremental", u8::from(s.parent.is_some()).to_string()),
                    ("compacts", u8::from(s.compacts).to_string()),
                    ("after_full", u8::from(after_full).to_string()),
                    ("kind", kind(&cp).to_owned()),
                ],
            );
            after_full = s.parent.is_none() || s.compacts;
        }
        cp.wait(0).context("writing the last image")?;
        drop(cp);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Item 4, writer: a full image and `increments` increments at 1 %; prints the buffer's
    /// digest. Leaves the store for the recovering children.
    fn chain(p: &Params) -> Result<()> {
        let size = p.usize("size")?;
        let increments = p.usize("increments")?;
        let dir = p.dir()?;
        let cp = Checkpointer::new(config(&dir, size, DirtyMode::Auto)?)
            .context("creating the checkpointer")?;
        let mut rng = Rng::new(SEED);
        let mut buf = Buffer::fill(&cp, size, &mut rng)?;
        let pages = size / page_size();
        let mut infos = vec![cp.checkpoint_sync(0).context("full image")?];
        for _ in 0..increments {
            buf.dirty(pages * STEADY_PERMILLE / 1000, &mut rng);
            infos.push(cp.checkpoint_sync(0).context("increment")?);
        }
        ensure!(
            infos.iter().skip(1).all(|i| i.parent.is_some()),
            "an image of the chain is not an increment"
        );
        emit(
            "chain",
            &[
                (
                    "digest",
                    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(buf.bytes())),
                ),
                ("images", infos.len().to_string()),
                (
                    "bytes",
                    infos.iter().map(|i| i.file_bytes).sum::<u64>().to_string(),
                ),
            ],
        );
        Ok(())
    }

    /// Item 4, a fresh process: map the heap and recover.
    fn recover(p: &Params) -> Result<()> {
        let size = p.usize("size")?;
        let dir = p.dir()?;
        let c = config(&dir, size, DirtyMode::Auto)?;
        let t = Instant::now();
        let cp = Checkpointer::new(c).context("creating the checkpointer")?;
        let new = t.elapsed();
        let t = Instant::now();
        // SAFETY: nothing in this process refers to the heap yet; this thread is the only one
        // that touches it.
        let recovered = unsafe { cp.recover(0) }.context("recover")?;
        let rec = t.elapsed();
        let r = recovered.context("no checkpoint to recover")?;
        let buf = Buffer::found(&cp, size)?;
        // The verification pass alone (recover reads the chain twice: verify, then apply),
        // now with the images in the page cache.
        let store = ckpt::Store::open(&cp.config().stream_dir(0), APP, StorePolicy::default())
            .context("opening the store")?;
        let t = Instant::now();
        for seq in &r.chain {
            store.verify(*seq).context("verifying an image")?;
        }
        let verify = t.elapsed();
        emit(
            "recover",
            &[
                ("new_ns", nanos(new).to_string()),
                ("recover_ns", nanos(rec).to_string()),
                ("verify_ns", nanos(verify).to_string()),
                ("seq", r.seq.to_string()),
                ("chain", r.chain.len().to_string()),
                ("skipped", r.skipped.len().to_string()),
                (
                    "digest",
                    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(buf.bytes())),
                ),
            ],
        );
        Ok(())
    }

    /// An anonymous mapping for the phase measurements (not the critical heap: no libft).
    struct Anon {
        ptr: *mut u8,
        len: usize,
    }

    impl Anon {
        fn map(len: usize) -> Result<Anon> {
            // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            ensure!(
                p != libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            Ok(Anon { ptr: p.cast(), len })
        }

        fn bytes(&self) -> &[u8] {
            // SAFETY: the mapping of `len` bytes lives until drop; only `bytes_mut` writes it.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }

        fn bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as in `bytes`; `&mut self` makes this the only view.
            unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: the mapping created in `map`; no slice of it outlives `self`.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// Item 5: the steps of a full checkpoint, timed one by one.
    fn phases(p: &Params) -> Result<()> {
        let size = p.usize("size")?;
        let reps = p.usize("reps")?;
        let dir = p.dir()?;
        fs::create_dir_all(&dir)?;
        let mut mem = Anon::map(size)?;
        let mut rng = Rng::new(SEED);
        for word in mem.bytes_mut().chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }

        let t = Instant::now();
        let mut acc = 0u64;
        for chunk in mem.bytes().chunks(MAX_CHUNK) {
            acc ^= xxhash_rust::xxh3::xxh3_64(chunk);
        }
        let xxh3 = t.elapsed();
        std::hint::black_box(acc);

        let (fork, pipe) = stream_through_pipe(mem.bytes(), Feed::Write)?;
        let (_, vmsplice) = stream_through_pipe(mem.bytes(), Feed::Vmsplice)?;
        let vm_read = read_from_child(mem.bytes())?;
        // What recovery's apply pass does besides reading: copy into never-touched memory.
        let fresh = Anon::map(size)?;
        let t = Instant::now();
        // SAFETY: `fresh` is a private mapping of `size` bytes that nothing else references;
        // `mem` is another mapping, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(mem.ptr, fresh.ptr, size) };
        let fresh_copy = t.elapsed();
        drop(fresh);
        // The same after populating the whole range in one call.
        let fresh = Anon::map(size)?;
        let t = Instant::now();
        // SAFETY: populating a private anonymous mapping we own only allocates its pages.
        let rc = unsafe { libc::madvise(fresh.ptr.cast(), size, MADV_POPULATE_WRITE) };
        ensure!(
            rc == 0,
            "madvise(MADV_POPULATE_WRITE): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: as for the copy above.
        unsafe { std::ptr::copy_nonoverlapping(mem.ptr, fresh.ptr, size) };
        let populated_copy = t.elapsed();
        drop(fresh);

        let header = ImageHeader {
            app: APP.to_owned(),
            stream: 0,
            seq: 1,
            parent: None,
            created_unix_ns: ckpt::unix_now_ns(),
            page_size: u32::try_from(page_size())?,
            regions: vec![RegionDesc {
                id: 0,
                base: mem.ptr as u64,
                len: size as u64,
            }],
        };
        for rep in 0..reps {
            let (bytes, written, synced, renamed) = image_from_memory(mem.bytes(), &dir, &header)?;
            let by_child = image_by_child(mem.bytes(), &dir, &header, true)?;
            let by_child_alone = image_by_child(mem.bytes(), &dir, &header, false)?;
            let from_write = image_from_child(mem.bytes(), Feed::Write, &dir, &header)?;
            let (plain_written, plain_synced) = plain_from_memory(mem.bytes(), &dir, false)?;
            let (_, early_synced) = plain_from_memory(mem.bytes(), &dir, true)?;
            emit(
                "recipe",
                &[
                    ("rep", rep.to_string()),
                    ("bytes", bytes.to_string()),
                    ("image_write_ns", nanos(written).to_string()),
                    ("image_sync_ns", nanos(synced - written).to_string()),
                    ("image_rename_ns", nanos(renamed - synced).to_string()),
                    ("by_child_ns", nanos(by_child).to_string()),
                    ("by_child_alone_ns", nanos(by_child_alone).to_string()),
                    ("from_write_ns", nanos(from_write).to_string()),
                    ("plain_write_ns", nanos(plain_written).to_string()),
                    ("plain_early_ns", nanos(early_synced).to_string()),
                    (
                        "plain_sync_ns",
                        nanos(plain_synced - plain_written).to_string(),
                    ),
                ],
            );
        }
        fs::remove_dir_all(&dir)?;
        emit(
            "phases",
            &[
                ("xxh3_ns", nanos(xxh3).to_string()),
                ("fork_ns", nanos(fork).to_string()),
                ("pipe_ns", nanos(pipe).to_string()),
                ("vmsplice_ns", nanos(vmsplice).to_string()),
                ("vm_read_ns", nanos(vm_read).to_string()),
                ("fresh_copy_ns", nanos(fresh_copy).to_string()),
                ("populated_copy_ns", nanos(populated_copy).to_string()),
            ],
        );
        Ok(())
    }

    /// A plain `write` of `data` to a new file and `fdatasync`: (written, synced). With
    /// `early`, written in MAX_CHUNK pieces with writeback started every WRITEBACK_STEP bytes,
    /// as `ckpt::ImageFile` does.
    fn plain_from_memory(data: &[u8], dir: &Path, early: bool) -> Result<(Duration, Duration)> {
        quiesce(dir)?;
        let path = dir.join("plain.dat");
        let t = Instant::now();
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        if early {
            let step = usize::try_from(ckpt::store::WRITEBACK_STEP)?;
            let mut started = 0usize;
            for (i, piece) in data.chunks(MAX_CHUNK).enumerate() {
                f.write_all(piece)?;
                let end = i * MAX_CHUNK + piece.len();
                if end - started >= step {
                    // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
                    unsafe {
                        libc::sync_file_range(
                            f.as_raw_fd(),
                            i64::try_from(started)?,
                            i64::try_from(end - started)?,
                            libc::SYNC_FILE_RANGE_WRITE,
                        )
                    };
                    started = end;
                }
            }
        } else {
            f.write_all(data)?;
        }
        let written = t.elapsed();
        f.sync_data()?;
        let synced = t.elapsed();
        drop(f);
        fs::remove_file(&path)?;
        Ok((written, synced))
    }

    /// The image written from memory with the store's commit recipe, each step timed:
    /// (file bytes, written to the page cache, + fdatasync, + rename and directory fsync).
    fn image_from_memory(
        data: &[u8],
        dir: &Path,
        header: &ImageHeader,
    ) -> Result<(u64, Duration, Duration, Duration)> {
        quiesce(dir)?;
        let tmp = dir.join("phases.tmp");
        let done = dir.join("phases.ckpt");
        let t = Instant::now();
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = ImageWriter::new(ImageFile::new(file), header)?;
        w.chunks(std::iter::once((0, 0, data)))?;
        let (out, summary) = w.finish()?;
        let file = out.file();
        let written = t.elapsed();
        file.sync_data()?;
        let synced = t.elapsed();
        fs::rename(&tmp, &done)?;
        fsync_dir(dir)?;
        let renamed = t.elapsed();
        drop(out);
        fs::remove_file(&done)?;
        Ok((summary.file_bytes, written, synced, renamed))
    }

    /// libft's fork path without libft: the header written, a forked child writes the chunks
    /// and the footer itself (the same `ImageWriter` over `ckpt::ImageFile`), the parent runs
    /// the commit recipe. `touch_ahead`: as libft does now (a thread of the child touches each
    /// page ahead of the writer; the parent commits on the child's report and reaps it after);
    /// else as it did before (no thread; the parent commits after the child's exit). Returns
    /// the time until durable.
    fn image_by_child(
        data: &[u8],
        dir: &Path,
        header: &ImageHeader,
        touch_ahead: bool,
    ) -> Result<Duration> {
        quiesce(dir)?;
        let tmp = dir.join("by-child.tmp");
        let done = dir.join("by-child.ckpt");
        let (mut report_rx, mut report_tx) = pipe()?;
        let t = Instant::now();
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = ImageWriter::new(ImageFile::new(file), header)?;
        // SAFETY: this role's process has only its main thread (libft is not used here), so
        // the child may run any code; it writes the image and calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            if touch_ahead {
                let (addr, len) = (data.as_ptr() as usize, data.len());
                std::thread::spawn(move || {
                    for at in (addr..addr + len).step_by(page_size()) {
                        // SAFETY: `data` is mapped readable in this child for its whole life.
                        unsafe { std::ptr::read_volatile(at as *const u8) };
                    }
                });
            }
            let ok = w.chunks(std::iter::once((0, 0, data))).is_ok() && w.finish_in_place().is_ok();
            let _ = report_tx.write_all(&[u8::from(ok)]);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        ensure!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        drop(report_tx);
        let reap = || -> Result<()> {
            let mut status = 0;
            // SAFETY: waits for the child forked above.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            ensure!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the image-writing child failed (status {status})"
            );
            Ok(())
        };
        if touch_ahead {
            let mut ok = [0u8; 1];
            report_rx
                .read_exact(&mut ok)
                .context("reading the child's report")?;
            ensure!(ok[0] == 1, "the image-writing child failed");
        } else {
            reap()?;
        }
        let (out, _) = w.into_parts();
        out.file().sync_data()?;
        fs::rename(&tmp, &done)?;
        fsync_dir(dir)?;
        let elapsed = t.elapsed();
        if touch_ahead {
            reap()?;
        }
        drop(out);
        fs::remove_file(&done)?;
        Ok(elapsed)
    }

    /// A pipe (close-on-exec): (read end, write end).
    fn pipe() -> Result<(File, File)> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two descriptors into the array, which holds two.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        ensure!(rc == 0, "pipe2: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and owned by nothing else.
        Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
    }

    /// Forks a child that just waits, and copies `data` out of it with process_vm_readv in
    /// MAX_CHUNK pieces (one copy, no pipe); returns the time of the copies.
    fn read_from_child(data: &[u8]) -> Result<Duration> {
        let (reader, writer) = pipe()?;
        // SAFETY: this role's process has only its main thread; the child only blocks in
        // read until the parent closes the pipe, then calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child: close/read/_exit on descriptors and a stack byte it owns.
            unsafe {
                libc::close(writer.as_raw_fd());
                let mut byte = 0u8;
                while libc::read(reader.as_raw_fd(), std::ptr::addr_of_mut!(byte).cast(), 1) != 0 {}
                libc::_exit(0);
            }
        }
        ensure!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        drop(reader);
        let mut buf = vec![0u8; MAX_CHUNK];
        let t = Instant::now();
        let mut at = 0usize;
        let mut failure = None;
        while at < data.len() {
            let n = MAX_CHUNK.min(data.len() - at);
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: n,
            };
            let remote = libc::iovec {
                iov_base: data[at..].as_ptr().cast_mut().cast(),
                iov_len: n,
            };
            // SAFETY: reads `n` bytes of the child's copy of `data` into `buf`, which holds
            // MAX_CHUNK ≥ n bytes; the remote address is valid in the child (same layout).
            let got = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            if got <= 0 {
                failure = Some(std::io::Error::last_os_error());
                break;
            }
            at += got.unsigned_abs();
        }
        let elapsed = t.elapsed();
        drop(writer);
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if let Some(e) = failure {
            bail!("process_vm_readv: {e}");
        }
        Ok(elapsed)
    }

    /// How a snapshot child puts its memory into the pipe.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Feed {
        /// `write`, as libft's snapshot child does: the kernel copies into pipe pages.
        Write,
        /// `vmsplice`: the pipe references the child's (frozen, copy-on-write) pages; no copy
        /// on the child's side.
        Vmsplice,
    }

    /// A forked child streaming `data` into a pipe; reaped (and checked) by `finish`.
    struct Streamer {
        pid: libc::pid_t,
        reader: File,
        fork: Duration,
    }

    impl Streamer {
        fn start(data: &[u8], feed: Feed) -> Result<Streamer> {
            let (reader, writer) = pipe()?;
            // SAFETY: F_SETPIPE_SZ on a pipe we own; a refusal only makes the pipe smaller.
            unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_CAPACITY) };
            let t = Instant::now();
            // SAFETY: this role's process has only its main thread (libft is not used here),
            // so the child may run any code; it only writes to the pipe and calls _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: in the child: write/vmsplice/_exit system calls on memory it owns
                // (its copy-on-write image of `data`, which nothing modifies any more: pages
                // the pipe references stay valid, counted, after the child exits).
                unsafe {
                    libc::close(reader.as_raw_fd());
                    let mut at = 0usize;
                    while at < data.len() {
                        let left = data.len() - at;
                        let ptr = data.as_ptr().add(at);
                        let n = match feed {
                            Feed::Write => libc::write(writer.as_raw_fd(), ptr.cast(), left),
                            Feed::Vmsplice => {
                                let iov = libc::iovec {
                                    iov_base: ptr.cast_mut().cast(),
                                    iov_len: left,
                                };
                                libc::vmsplice(writer.as_raw_fd(), &iov, 1, 0)
                            }
                        };
                        if n <= 0 {
                            libc::_exit(1);
                        }
                        at += n.unsigned_abs();
                    }
                    libc::_exit(0);
                }
            }
            let fork = t.elapsed();
            ensure!(pid > 0, "fork: {}", std::io::Error::last_os_error());
            drop(writer);
            Ok(Streamer { pid, reader, fork })
        }

        fn finish(self, received: usize, expected: usize) -> Result<()> {
            let mut status = 0;
            // SAFETY: waits for the child forked in `start`.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
            ensure!(
                received == expected && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the streaming child sent {received} of {expected} bytes (status {status})"
            );
            Ok(())
        }
    }

    /// Streams `data` from a forked child and discards it; returns (the fork call, the whole
    /// stream).
    fn stream_through_pipe(data: &[u8], feed: Feed) -> Result<(Duration, Duration)> {
        let t = Instant::now();
        let mut child = Streamer::start(data, feed)?;
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut total = 0usize;
        loop {
            let n = child.reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n;
        }
        let streamed = t.elapsed();
        let fork = child.fork;
        child.finish(total, data.len())?;
        Ok((fork, streamed))
    }

    /// libft's previous fork path without libft: a forked child streams `data`, one thread
    /// reads it in MAX_CHUNK pieces into an image (ckpt::ImageWriter through a 256 KiB
    /// BufWriter, as libft's writer thread did), then the commit recipe. Returns the time until
    /// durable.
    fn image_from_child(
        data: &[u8],
        feed: Feed,
        dir: &Path,
        header: &ImageHeader,
    ) -> Result<Duration> {
        quiesce(dir)?;
        let tmp = dir.join("from-child.tmp");
        let done = dir.join("from-child.ckpt");
        let t = Instant::now();
        let mut child = Streamer::start(data, feed)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = ImageWriter::new(BufWriter::with_capacity(STORE_WRITE_BUFFER, file), header)?;
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut at = 0usize;
        while at < data.len() {
            let n = MAX_CHUNK.min(data.len() - at);
            child.reader.read_exact(&mut buf[..n])?;
            w.chunk(0, at as u64, &buf[..n])?;
            at += n;
        }
        let (buffered, _) = w.finish()?;
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_data()?;
        fs::rename(&tmp, &done)?;
        fsync_dir(dir)?;
        let elapsed = t.elapsed();
        child.finish(at, data.len())?;
        drop(file);
        fs::remove_file(&done)?;
        Ok(elapsed)
    }
}
