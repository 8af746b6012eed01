//! The transparent process checkpoint benchmark (issue 7): full dumps of a running C program
//! with 10 MiB, 100 MiB and 1 GiB of written memory (time, throughput, the target's pause,
//! image bytes), restore after `kill -9` until the restored process answers, and incremental
//! dumps after 1 % of the pages were written, beside a plain copy of the same bytes to the
//! same file system (`write` + `fdatasync`) in the same run.
//!
//! Run: `cargo bench -p ftkit-tests --bench ckptproc` (`-- --quick` for a short run, `-- --reps N`
//! repetitions per measurement, `-- --sizes 10,100` sizes in MiB, `-- --only dump,restore,incr`,
//! `-- --dir DIR` for the image directory, `-- --out FILE` to also write the markdown). The
//! target is tests/benches/ckptproc/target.c, compiled with `cc`. It prints tables; it is not a
//! test and asserts nothing about the numbers.

#[allow(dead_code)]
#[path = "watchd/harness.rs"]
mod harness;

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ckpt::proc::{self, DumpOptions, DumpSummary, RestoreOptions, Tracker};
use ckpt::{Store, StorePolicy};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use harness::{Table, percentile, sorted};

const USAGE: &str = "usage: ckptproc-bench [--quick] [--reps N] [--sizes MIB,...] \
[--only dump,restore,incr] [--dir DIR] [--out FILE]";

/// Written memory of the target, in MiB.
const SIZES_MIB: [u64; 3] = [10, 100, 1024];
/// Measured repetitions of each measurement (full run / --quick), after one warm-up.
const REPS: usize = 7;
const REPS_QUICK: usize = 3;
/// Pages written between two incremental dumps, per thousand.
const DIRTY_PERMILLE: u64 = 10;
/// The application identity of the images.
const APP: &str = "ckptproc-bench";
/// Longest wait for one answer of the target (filling 1 GiB at start included).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Retention must never delete an image inside a measurement: the benchmark deletes its own.
const KEEP_ALL: usize = 1 << 20;
/// Increments per chain before the store asks for a full image: more than a run writes.
const LONG_CHAIN: u32 = 1 << 16;
/// Where a page-cache-only store lives when it exists (tmpfs: fdatasync costs nothing).
const TMPFS_DIR: &str = "/dev/shm";
/// Targets of issue 7.
const TARGET_GBPS: f64 = 1.0;
const TARGET_INCR_PCT: f64 = 5.0;
/// Size the targets are judged at.
const TARGET_SIZE_MIB: u64 = 1024;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ckptproc-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug)]
struct Options {
    quick: bool,
    reps: Option<usize>,
    sizes: Vec<u64>,
    dump: bool,
    restore: bool,
    incr: bool,
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        quick: false,
        reps: None,
        sizes: SIZES_MIB.to_vec(),
        dump: true,
        restore: true,
        incr: true,
        dir: None,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--reps" => o.reps = Some(args.next().context(USAGE)?.parse().context(USAGE)?),
            "--sizes" => {
                o.sizes = args
                    .next()
                    .context(USAGE)?
                    .split(',')
                    .map(|s| s.parse::<u64>().with_context(|| format!("{s:?}: {USAGE}")))
                    .collect::<Result<_>>()?;
                ensure!(o.sizes.iter().all(|&s| s > 0), "sizes are MiB above 0");
            }
            "--only" => {
                let list = args.next().context(USAGE)?;
                o.dump = false;
                o.restore = false;
                o.incr = false;
                for part in list.split(',') {
                    match part {
                        "dump" => o.dump = true,
                        "restore" => o.restore = true,
                        "incr" => o.incr = true,
                        other => bail!("unknown section {other:?}; {USAGE}"),
                    }
                }
            }
            "--dir" => o.dir = Some(args.next().context(USAGE)?.into()),
            "--out" => o.out = Some(args.next().context(USAGE)?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(Options {
                    sizes: Vec::new(),
                    ..o
                });
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    Ok(o)
}

fn run() -> Result<()> {
    let opts = parse_args()?;
    if opts.sizes.is_empty() {
        return Ok(());
    }
    harness::install_interrupt_handler()?;
    harness::become_subreaper()?;
    let _sweep = harness::SweepGuard;
    let reps = opts
        .reps
        .unwrap_or(if opts.quick { REPS_QUICK } else { REPS })
        .max(1);
    let base = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    let work = tempfile::Builder::new()
        .prefix("ftkit-ckptproc-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a directory in {}", base.display()))?;
    let shm = Path::new(TMPFS_DIR)
        .is_dir()
        .then(|| {
            tempfile::Builder::new()
                .prefix("ftkit-ckptproc-bench-")
                .tempdir_in(TMPFS_DIR)
        })
        .transpose()
        .context("creating a directory in /dev/shm")?;
    let target_bin = compile_target(work.path())?;

    let mut doc = String::new();
    harness::emit(&mut doc, &header(&opts, reps, work.path())?);
    let mut dumps = Table::new(&[
        "written memory",
        "store on",
        "image bytes",
        "pages",
        "n",
        "dump p50 ms",
        "dump max ms",
        "dump GB/s",
        "dump CPU p50 ms",
        "pause p50 ms",
        "pause max ms",
        "plain write+fdatasync p50 ms",
        "max ms",
        "plain GB/s",
        "plain CPU p50 ms",
        "dump / plain time",
        "target",
        "verdict",
    ]);
    let mut restores = Table::new(&[
        "written memory",
        "image bytes",
        "n",
        "restore → answers p50 ms",
        "max ms",
        "GB/s",
        "proc::restore p50 ms",
        "same pid",
        "memory checksum equal",
    ]);
    let mut incrs = Table::new(&[
        "written memory",
        "dirty",
        "n",
        "pages in image",
        "image bytes",
        "incr p50 ms",
        "incr max ms",
        "pause p50 ms",
        "pause max ms",
        "full dump p50 ms",
        "% of full",
        "target",
        "verdict",
    ]);
    let mut notes: Vec<String> = Vec::new();
    for &mib in &opts.sizes {
        harness::check_interrupted()?;
        eprintln!("ckptproc-bench: {mib} MiB");
        let mut full_p50 = None;
        if opts.dump {
            let mut media = vec![("disk", work.path().to_path_buf())];
            if let Some(s) = &shm {
                media.push(("tmpfs", s.path().to_path_buf()));
            }
            for (medium, dir) in media {
                let r = measure_dumps(&target_bin, mib, &dir, reps)
                    .with_context(|| format!("{mib} MiB full dumps on {medium}"))?;
                if medium == "disk" {
                    full_p50 = Some(r.dump_p50);
                }
                dumps.row(r.row(mib, medium));
                notes.push(r.samples(mib, medium));
            }
        }
        if opts.restore {
            let dir = work.path().join(format!("restore-{mib}"));
            let r = measure_restores(&target_bin, mib, &dir, reps)
                .with_context(|| format!("{mib} MiB restores"))?;
            restores.row(r);
        }
        if opts.incr {
            let dir = work.path().join(format!("incr-{mib}"));
            let r = measure_incrs(&target_bin, mib, &dir, reps, full_p50)
                .with_context(|| format!("{mib} MiB incremental dumps"))?;
            incrs.row(r);
        }
    }
    if opts.dump {
        harness::emit(
            &mut doc,
            &format!(
                "### 1. Full dump vs a plain copy of the same bytes\n\n`proc::dump` of the \
                 running target (the whole call: seize, state, memory, image, detach, commit \
                 with fdatasync + rename + directory fsync), the image deleted after each \
                 measurement; then, in the same rep, a plain `write` of the image's length from \
                 a buffer in memory into a new file of the same directory + `fdatasync` (the \
                 file deleted too). `syncfs` before each. One warm-up of both first (not \
                 counted). \"disk\": the image directory on the disk; \"tmpfs\": in {TMPFS_DIR} \
                 (page cache only, fdatasync is free). GB/s = image bytes / p50 time (10^9 \
                 bytes). Pause = how long the target was stopped (`DumpSummary::pause`). CPU = \
                 user + system time of this process (the dump's reader and writer threads, or \
                 the plain write) during the call: on a shared machine the wall time also \
                 holds waiting for a core, the CPU time does not.\n\n{}\n{}\n\n",
                dumps.render(),
                notes.join("\n")
            ),
        );
    }
    if opts.restore {
        harness::emit(
            &mut doc,
            &format!(
                "### 2. Restore after kill -9\n\nOne full dump kept; then per rep: `kill -9` of \
                 the target and reap (not timed), `proc::restore` of that image (new pipes as \
                 stdin/stdout), and a ping written to the restored process until its answer \
                 is read. The image stays in the page cache (it was just written). \"memory \
                 checksum equal\": the target's checksum of its whole region before the dump \
                 and the restored process's after the last restore.\n\n{}\n",
                restores.render()
            ),
        );
    }
    if opts.incr {
        harness::emit(
            &mut doc,
            &format!(
                "### 3. Incremental dumps\n\n`proc::dump_incremental` with one `Tracker`: the \
                 first dump is full (arms userfaultfd write-protect), then per rep the target \
                 writes {DIRTY_PERMILLE} ‰ of its pages (distinct, random, spread over the \
                 region) and an increment is dumped (`syncfs` before). Images kept (the chain \
                 needs them). \"% of full\" is against the full dump p50 on disk of table 1 \
                 (the tracked first dump when table 1 was not run).\n\n{}\n",
                incrs.render()
            ),
        );
    }
    harness::emit(
        &mut doc,
        "Notes: CRIU is not usable on this kernel (Debian's criu fails on Linux 6.18; no criu \
         binary is installed here), so no CRIU column and no CRIU figure. For scale, from the \
         issue: NT-SwiFT's Winckp needed 71 s for a 211 MB simulator.\n",
    );
    if let Some(out) = &opts.out {
        fs::write(out, &doc).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn header(opts: &Options, reps: usize, dir: &Path) -> Result<String> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut s = String::new();
    writeln!(
        s,
        "## Transparent process checkpoints ({})\n\n{cores} cores, kernel {}, load average {}; \
         image directory {} ({}); {reps} reps per measurement after one warm-up; medians (p50) \
         and maxima; MB/GB = 10^6/10^9 bytes.\n",
        if opts.quick { "--quick" } else { "full" },
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        dir.display(),
        fs_of(dir),
    )?;
    Ok(s)
}

/// Type and source of the mount holding `path` (the longest mount point that prefixes it).
fn fs_of(path: &Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(mount), Some(kind), Some(src)) = (f.get(4), f.get(sep + 1), f.get(sep + 2))
        else {
            continue;
        };
        if path.starts_with(mount) && best.as_ref().is_none_or(|b| b.0 < mount.len()) {
            best = Some((mount.len(), format!("{kind} on {src} at {mount}")));
        }
    }
    best.map_or_else(|| "unknown file system".into(), |b| b.1)
}

fn compile_target(dir: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/ckptproc/target.c");
    let out = dir.join("ckptproc-target");
    let st = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("running cc")?;
    ensure!(st.success(), "cc failed for {}", src.display());
    Ok(out)
}

/// The target program (or its restored copy), driven through pipes; killed and reaped when
/// dropped.
#[derive(Debug)]
struct Target {
    pid: i32,
    input: File,
    output: File,
    pending: Vec<u8>,
}

/// (the target's stdin, its stdout) and (our write end, our read end); all close-on-exec.
fn target_pipes() -> Result<((OwnedFd, OwnedFd), (File, File))> {
    let (in_rd, in_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (out_rd, out_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok(((in_rd, out_wr), (File::from(in_wr), File::from(out_rd))))
}

impl Target {
    fn start(bin: &Path, mib: u64) -> Result<Target> {
        let ((stdin, stdout), (input, output)) = target_pipes()?;
        let mut cmd = Command::new(bin);
        // SAFETY: one async-signal-safe system call between fork and exec: descriptors this
        // benchmark inherited without close-on-exec must not reach the target, whose dump
        // would record them (and whose restore would then want a replacement for each).
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        let child = cmd
            .arg(mib.to_string())
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::null())
            .spawn()
            .context("starting the target")?;
        let mut t = Target {
            pid: i32::try_from(child.id()).context("pid")?,
            input,
            output,
            pending: Vec::new(),
        };
        let ready = t.line()?;
        ensure!(ready == "ready", "the target said {ready:?}");
        Ok(t)
    }

    /// Reads one answer line within `ANSWER_TIMEOUT`.
    fn line(&mut self) -> Result<String> {
        let end = Instant::now() + ANSWER_TIMEOUT;
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
            harness::check_interrupted()?;
            let left = end.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "the target did not answer within {ANSWER_TIMEOUT:?}"
            );
            let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            let mut fds = [PollFd::new(self.output.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e).context("poll on the target's stdout"),
            }
            let mut buf = [0u8; 256];
            let n = self.output.read(&mut buf).context("reading the target")?;
            ensure!(n > 0, "the target closed its stdout");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    fn cmd(&mut self, line: &str) -> Result<String> {
        writeln!(self.input, "{line}").context("writing to the target")?;
        self.line()
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if self.pid > 0 {
            let pid = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            self.pid = 0;
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill();
    }
}

fn open_store(dir: &Path) -> Result<Store> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Store::open(
        dir,
        APP,
        StorePolicy {
            keep: KEEP_ALL,
            full_every: LONG_CHAIN,
        },
    )?)
}

fn syncfs(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: syncfs on a descriptor we own; it touches no memory of ours.
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    ensure!(
        rc == 0,
        "syncfs({}): {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// User + system CPU time this process used so far (all its threads), in ms.
fn cpu_ms() -> f64 {
    // SAFETY: getrusage writes one `struct rusage` into the zeroed value we own; RUSAGE_SELF
    // is a valid `who`.
    let usage = unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut r);
        r
    };
    let tv = |t: libc::timeval| {
        // Precision loss above 2^53 µs is irrelevant here.
        #[allow(clippy::cast_precision_loss)]
        let us = t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
        us / 1e3
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// Bytes per second in GB/s (10^9).
fn gbps(bytes: u64, ms: f64) -> f64 {
    // Precision loss above 2^53 bytes is irrelevant here.
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    b / (ms / 1e3) / 1e9
}

fn p50(v: &[f64]) -> f64 {
    percentile(&sorted(v.to_vec()), 50.0)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn samples_text(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mib_label(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// A plain copy: `len` bytes of `buf` written to a new file in `dir`, fdatasync'ed, removed.
fn plain_copy(dir: &Path, buf: &[u8]) -> Result<Duration> {
    let path = dir.join("plain-copy");
    let t = Instant::now();
    let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(buf).context("plain write")?;
    f.sync_data().context("plain fdatasync")?;
    let took = t.elapsed();
    drop(f);
    fs::remove_file(&path).context("removing the plain copy")?;
    Ok(took)
}

#[derive(Debug)]
struct DumpResult {
    image_bytes: u64,
    pages: u64,
    dumps: Vec<f64>,
    dump_cpu: Vec<f64>,
    pauses: Vec<f64>,
    plains: Vec<f64>,
    plain_cpu: Vec<f64>,
    dump_p50: f64,
}

impl DumpResult {
    fn row(&self, mib: u64, medium: &str) -> Vec<String> {
        let plain = p50(&self.plains);
        let rate = gbps(self.image_bytes, self.dump_p50);
        let judged = mib == TARGET_SIZE_MIB;
        vec![
            mib_label(mib),
            medium.into(),
            self.image_bytes.to_string(),
            self.pages.to_string(),
            self.dumps.len().to_string(),
            fmt_ms(self.dump_p50),
            fmt_ms(max(&self.dumps)),
            format!("{rate:.2}"),
            fmt_ms(p50(&self.dump_cpu)),
            fmt_ms(p50(&self.pauses)),
            fmt_ms(max(&self.pauses)),
            fmt_ms(plain),
            fmt_ms(max(&self.plains)),
            format!("{:.2}", gbps(self.image_bytes, plain)),
            fmt_ms(p50(&self.plain_cpu)),
            format!("{:.2}", self.dump_p50 / plain),
            if judged {
                format!("≥ {TARGET_GBPS} GB/s")
            } else {
                "—".into()
            },
            if !judged {
                String::new()
            } else if rate >= TARGET_GBPS {
                "PASS".into()
            } else {
                "MISS".into()
            },
        ]
    }

    fn samples(&self, mib: u64, medium: &str) -> String {
        format!(
            "- {} on {medium}: dump samples {} ms (CPU {} ms); pauses {} ms; plain samples \
             {} ms (CPU {} ms).",
            mib_label(mib),
            samples_text(&self.dumps),
            samples_text(&self.dump_cpu),
            samples_text(&self.pauses),
            samples_text(&self.plains),
            samples_text(&self.plain_cpu)
        )
    }
}

fn measure_dumps(bin: &Path, mib: u64, dir: &Path, reps: usize) -> Result<DumpResult> {
    let dir = dir.join(format!("dump-{mib}"));
    let store = open_store(&dir)?;
    let target = Target::start(bin, mib)?;
    let pid = target.pid;
    let opts = DumpOptions::default();
    let mut plain_buf: Vec<u8> = Vec::new();
    let mut r = DumpResult {
        image_bytes: 0,
        pages: 0,
        dumps: Vec::new(),
        dump_cpu: Vec::new(),
        pauses: Vec::new(),
        plains: Vec::new(),
        plain_cpu: Vec::new(),
        dump_p50: f64::NAN,
    };
    for rep in 0..=reps {
        harness::check_interrupted()?;
        syncfs(&dir)?;
        let cpu = cpu_ms();
        let d: DumpSummary = proc::dump(pid, &store, &opts)?;
        let dump_cpu = cpu_ms() - cpu;
        store.delete(d.seq)?;
        if plain_buf.is_empty() {
            // Written, so every page is backed before any plain copy is timed.
            let len = usize::try_from(d.image_bytes).context("image size")?;
            plain_buf = (0..len)
                .map(|i| u8::try_from(i % 251).unwrap_or(1) | 1)
                .collect();
        }
        syncfs(&dir)?;
        let cpu = cpu_ms();
        let plain = plain_copy(&dir, &plain_buf)?;
        let plain_cpu = cpu_ms() - cpu;
        if rep == 0 {
            continue; // warm-up
        }
        r.image_bytes = d.image_bytes;
        r.pages = d.pages;
        r.dumps.push(ms(d.total));
        r.dump_cpu.push(dump_cpu);
        r.pauses.push(ms(d.pause));
        r.plains.push(ms(plain));
        r.plain_cpu.push(plain_cpu);
    }
    r.dump_p50 = p50(&r.dumps);
    Ok(r)
}

fn measure_restores(bin: &Path, mib: u64, dir: &Path, reps: usize) -> Result<Vec<String>> {
    let store = open_store(dir)?;
    let mut target = Target::start(bin, mib)?;
    let before = target.cmd("c")?;
    let d = proc::dump(target.pid, &store, &DumpOptions::default())?;
    let mut answered = Vec::new();
    let mut calls = Vec::new();
    let mut same_pid = true;
    for rep in 0..=reps {
        harness::check_interrupted()?;
        target.kill();
        let ((stdin, stdout), (input, output)) = target_pipes()?;
        let t = Instant::now();
        let back = proc::restore(
            &store,
            Some(d.seq),
            RestoreOptions {
                fds: vec![(0, stdin), (1, stdout)],
                keep_file_contents: false,
                ..RestoreOptions::default()
            },
        )?;
        target = Target {
            pid: back.pid,
            input,
            output,
            pending: Vec::new(),
        };
        let answer = target.cmd("p")?;
        let took = t.elapsed();
        ensure!(answer == "ok", "the restored target said {answer:?}");
        if rep == 0 {
            continue; // warm-up
        }
        same_pid &= back.same_pid;
        answered.push(ms(took));
        calls.push(ms(back.took));
    }
    let after = target.cmd("c")?;
    let p = p50(&answered);
    Ok(vec![
        mib_label(mib),
        d.image_bytes.to_string(),
        answered.len().to_string(),
        fmt_ms(p),
        fmt_ms(max(&answered)),
        format!("{:.2}", gbps(d.image_bytes, p)),
        fmt_ms(p50(&calls)),
        if same_pid { "yes" } else { "no" }.into(),
        if before == after { "yes" } else { "NO" }.into(),
    ])
}

fn measure_incrs(
    bin: &Path,
    mib: u64,
    dir: &Path,
    reps: usize,
    full_p50: Option<f64>,
) -> Result<Vec<String>> {
    let store = open_store(dir)?;
    let mut target = Target::start(bin, mib)?;
    let opts = DumpOptions::default();
    let mut tracker = Tracker::new(target.pid);
    let first = proc::dump_incremental(&mut tracker, &store, &opts)?;
    ensure!(
        tracker.disabled().is_none(),
        "write tracking unavailable: {:?}",
        tracker.disabled()
    );
    let mut times = Vec::new();
    let mut pauses = Vec::new();
    let mut pages = Vec::new();
    let mut bytes = Vec::new();
    for rep in 0..=reps {
        harness::check_interrupted()?;
        let answer = target.cmd(&format!("d {DIRTY_PERMILLE} {} {}", rep + 1, rep % 200 + 2))?;
        ensure!(answer.starts_with("ok "), "the target said {answer:?}");
        syncfs(dir)?;
        let inc = proc::dump_incremental(&mut tracker, &store, &opts)?;
        ensure!(
            inc.parent.is_some(),
            "the dump was full: {:?}",
            inc.full_reason
        );
        if rep == 0 {
            continue; // warm-up
        }
        times.push(ms(inc.total));
        pauses.push(ms(inc.pause));
        #[allow(clippy::cast_precision_loss)]
        {
            pages.push(inc.pages as f64);
            bytes.push(inc.image_bytes as f64);
        }
    }
    let full = full_p50.unwrap_or_else(|| ms(first.total));
    let p = p50(&times);
    let pct = p / full * 100.0;
    let judged = mib == TARGET_SIZE_MIB;
    Ok(vec![
        mib_label(mib),
        format!("{:.1} %", f64::from(u32::try_from(DIRTY_PERMILLE)?) / 10.0),
        times.len().to_string(),
        format!("{:.0}", p50(&pages)),
        format!("{:.0}", p50(&bytes)),
        fmt_ms(p),
        fmt_ms(max(&times)),
        fmt_ms(p50(&pauses)),
        fmt_ms(max(&pauses)),
        fmt_ms(full),
        format!("{pct:.1} %"),
        if judged {
            format!("≤ {TARGET_INCR_PCT} % of full")
        } else {
            "—".into()
        },
        if !judged {
            String::new()
        } else if pct <= TARGET_INCR_PCT {
            "PASS".into()
        } else {
            "MISS".into()
        },
    ])
}
