//! Transparent checkpoint of real processes (C programs in tests/progs, compiled with `cc`):
//! dump leaves the target running, dump → kill -9 → restore continues with the same memory,
//! output and file contents as an uninterrupted run, rollback in place returns a live process
//! to its checkpoint, and bad input (no such pid, another user's process, an exited process, a
//! corrupt image, a pipe without a replacement) gives clear errors. Every process is killed and reaped by a guard.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ckpt::proc::{self, DumpOptions, ProcError, RestoreOptions};
use ckpt::{Store, StorePolicy};

/// How long a test waits for a program to print what it expects.
const WAIT: Duration = Duration::from_secs(30);

/// Compiles tests/progs/NAME.c once per test process.
fn compile(name: &str, cell: &'static OnceLock<PathBuf>) -> &'static Path {
    cell.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/progs/{name}.c"));
        let out = dir.join(format!("ckpt-{name}-{}", std::process::id()));
        let st = Command::new("cc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("run cc");
        assert!(st.success(), "cc failed for {}", src.display());
        out
    })
}

fn counter_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    compile("counter", &BIN)
}

fn threads_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    compile("threads", &BIN)
}

/// A process of the test: killed and reaped when dropped, whether the test passed or not.
struct Proc {
    pid: i32,
}

impl Proc {
    fn kill(&self) {
        // SAFETY: kill and waitpid take plain integers; the pid is a child of this process.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), libc::__WALL);
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill takes plain integers.
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0);
    }

    fn alive(&self) -> bool {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        stat.rfind(')')
            .is_some_and(|i| !stat[i + 1..].trim_start().starts_with(['Z', 'X']))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A counter program writing to files in `dir` (stdout `NAME.out`, data `NAME.data`).
struct Counter {
    proc: Proc,
    out: PathBuf,
    data: PathBuf,
}

fn start_counter(dir: &Path, name: &str, heap_mib: u32, stdout: Option<Stdio>) -> Counter {
    let data = dir.join(format!("{name}.data"));
    let mut cmd = Command::new(counter_bin());
    cmd.arg(&data).arg(heap_mib.to_string());
    start(cmd, dir, name, stdout, data)
}

fn start(
    mut cmd: Command,
    dir: &Path,
    name: &str,
    stdout: Option<Stdio>,
    data: PathBuf,
) -> Counter {
    let out = dir.join(format!("{name}.out"));
    let stdout = stdout.unwrap_or_else(|| Stdio::from(File::create(&out).unwrap()));
    // SAFETY: the hook only makes one system call (close_range) between fork and exec. It
    // closes what the test harness leaks to children (its jobserver pipe), which the program
    // would otherwise hold as a descriptor that cannot be restored.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::from(
            File::create(dir.join(format!("{name}.err"))).unwrap(),
        ))
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    // The guard reaps it; the Child handle is not needed (and must not reap it first).
    std::mem::forget(child);
    Counter {
        proc: Proc { pid },
        out,
        data,
    }
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Numbered output lines ("i sum"), without the ready and signal lines.
fn steps(path: &Path) -> Vec<String> {
    lines(path)
        .into_iter()
        .filter(|l| l.split(' ').count() == 2 && !l.starts_with("usr1"))
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_steps(path: &Path, n: usize) {
    wait_until(&format!("{n} steps in {}", path.display()), || {
        steps(path).len() >= n
    });
}

fn store(dir: &Path) -> Store {
    Store::open(&dir.join("store"), "proc-test", StorePolicy::default()).unwrap()
}

/// `got` must be a prefix of (or equal to) the reference run's output, and hold `min` steps.
fn assert_same_history(got: &[String], reference: &[String], min: usize) {
    assert!(got.len() >= min, "only {} steps: {got:?}", got.len());
    for (i, (g, r)) in got.iter().zip(reference).enumerate() {
        assert_eq!(g, r, "step {i} differs from the uninterrupted run");
    }
}

fn reference(dir: &Path, n: usize) -> (Vec<String>, Vec<String>) {
    let c = start_counter(dir, "reference", 1, None);
    wait_steps(&c.out, n);
    c.proc.kill();
    (steps(&c.out), lines(&c.data))
}

#[test]
fn dump_of_a_missing_pid_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    for pid in [0, -3, i32::MAX - 1] {
        match proc::dump(pid, &s, &DumpOptions::default()) {
            Err(ProcError::NoSuchProcess { pid: p }) => assert_eq!(p, pid),
            other => panic!("pid {pid}: expected NoSuchProcess, got {other:?}"),
        }
    }
    assert!(matches!(
        proc::rollback(i32::MAX - 1, &s, None),
        Err(ProcError::NoSuchProcess { .. })
    ));
    assert!(matches!(
        proc::restore(&s, None, RestoreOptions::default()),
        Err(ProcError::NoImage { .. })
    ));
}

/// The unprivileged user the permission test runs its dumper as.
const NOBODY: u32 = 65534;
/// Set (to the target's pid) in the environment of this test binary re-run as `NOBODY`.
const AS_NOBODY_ENV: &str = "FT_PROC_TEST_DUMP_AS_NOBODY";

#[test]
fn dump_of_another_users_process_is_refused_and_leaves_it_running() {
    if let Ok(target) = std::env::var(AS_NOBODY_ENV) {
        // The re-run as nobody: root's process must be refused, with nothing written.
        let pid: i32 = target.parse().unwrap();
        let dir = PathBuf::from(std::env::var("FT_PROC_TEST_DIR").unwrap());
        let s = store(&dir);
        let e = proc::dump(pid, &s, &DumpOptions::default()).unwrap_err();
        assert!(matches!(e, ProcError::PermissionDenied { .. }), "{e}");
        assert!(e.to_string().contains("cannot be checkpointed"), "{e}");
        assert!(matches!(
            proc::rollback(pid, &s, None),
            Err(ProcError::PermissionDenied { .. } | ProcError::NoImage { .. })
        ));
        assert!(s.list().unwrap().is_empty());
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a dumper as another user");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let c = start_counter(tmp.path(), "root-owned", 1, None);
    wait_steps(&c.out, 2);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "dump_of_another_users_process_is_refused_and_leaves_it_running",
            "--nocapture",
        ])
        .env(AS_NOBODY_ENV, c.proc.pid.to_string())
        .env("FT_PROC_TEST_DIR", tmp.path())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the dumper as nobody: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the re-run ran the test: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The refused target runs on, untraced.
    let n = steps(&c.out).len();
    wait_steps(&c.out, n + 2);
    let status = fs::read_to_string(format!("/proc/{}/status", c.proc.pid)).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
}

#[test]
fn dump_of_an_exited_process_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let child = Command::new("true").spawn().unwrap();
    let p = Proc {
        pid: i32::try_from(child.id()).unwrap(),
    };
    std::mem::forget(child);
    wait_until("the child to exit", || !p.alive());
    let e = proc::dump(p.pid, &s, &DumpOptions::default()).unwrap_err();
    assert!(matches!(e, ProcError::Exited { .. }), "{e}");
    assert!(e.to_string().contains("exited"), "{e}");
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn dump_leaves_the_target_running_and_the_image_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let c = start_counter(tmp.path(), "a", 1, None);
    wait_steps(&c.out, 5);
    let sum = proc::dump(c.proc.pid, &s, &DumpOptions::default()).unwrap();
    assert_eq!((sum.pid, sum.seq, sum.threads), (c.proc.pid, 1, 1));
    assert!(sum.pages >= 256 + 1024, "{sum:?}"); // 1 MiB heap + 4 MiB region, written
    assert!(sum.unrestorable.is_empty(), "{:?}", sum.unrestorable);
    assert!(
        sum.file_bytes > 0,
        "the data file and stdout are snapshotted"
    );
    assert!(sum.pause <= sum.total);
    s.verify(sum.seq).unwrap();
    let before = steps(&c.out).len();
    wait_steps(&c.out, before + 10);
    c.proc.signal(libc::SIGUSR1);
    wait_until("the usr1 check", || {
        lines(&c.out).iter().any(|l| l.starts_with("usr1 1"))
    });
    let all = lines(&c.out);
    assert!(all.contains(&"usr1 1 ok".to_owned()), "{all:?}");
    assert!(!all.iter().any(|l| l.contains("BAD")), "{all:?}");
}

#[test]
fn restore_after_kill_continues_with_the_same_state() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let c = start_counter(tmp.path(), "a", 1, None);
    wait_steps(&c.out, 10);
    let dumped = proc::dump(c.proc.pid, &s, &DumpOptions::default()).unwrap();
    wait_steps(&c.out, steps(&c.out).len() + 10);
    c.proc.kill();
    let r = proc::restore(&s, None, RestoreOptions::default()).unwrap();
    let restored = Proc { pid: r.pid };
    assert_eq!(r.seq, dumped.seq);
    assert!(r.same_pid, "root may take the old pid back");
    wait_steps(&c.out, 60);
    restored.signal(libc::SIGUSR1);
    wait_until("the usr1 check", || {
        lines(&c.out).iter().any(|l| l.starts_with("usr1 1"))
    });
    restored.kill();
    let all = lines(&c.out);
    assert!(all.contains(&"usr1 1 ok".to_owned()), "{all:?}");
    assert!(!all.iter().any(|l| l.contains("BAD")), "{all:?}");
    let got = steps(&c.out);
    let data = lines(&c.data);
    let (ref_steps, ref_data) = reference(tmp.path(), got.len());
    assert_same_history(&got, &ref_steps, 60);
    assert_same_history(&data, &ref_data, 60);
}

#[test]
fn rollback_in_place_returns_to_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let c = start_counter(tmp.path(), "a", 1, None);
    wait_steps(&c.out, 10);
    proc::dump(c.proc.pid, &s, &DumpOptions::default()).unwrap();
    let at_dump = steps(&c.out).len();
    wait_steps(&c.out, at_dump + 20);
    let r = proc::rollback(c.proc.pid, &s, None).unwrap();
    assert_eq!((r.pid, r.seq), (c.proc.pid, 1));
    // The files went back to their checkpointed contents, and the program goes on from there.
    let after = steps(&c.out).len();
    assert!(
        after <= at_dump + 2,
        "{after} steps right after the rollback"
    );
    wait_steps(&c.out, at_dump + 30);
    c.proc.signal(libc::SIGUSR1);
    wait_until("the usr1 check", || {
        lines(&c.out).iter().any(|l| l.starts_with("usr1 1"))
    });
    c.proc.kill();
    let all = lines(&c.out);
    assert!(all.contains(&"usr1 1 ok".to_owned()), "{all:?}");
    let got = steps(&c.out);
    let data = lines(&c.data);
    let (ref_steps, ref_data) = reference(tmp.path(), got.len());
    assert_same_history(&got, &ref_steps, at_dump + 30);
    assert_same_history(&data, &ref_data, at_dump + 30);
}

/// The header and metadata of the image at `path`.
fn image_meta(path: &Path) -> (ckpt::ImageHeader, proc::ProcessMeta) {
    let mut meta = Vec::new();
    let (header, _) = ckpt::read_image(
        File::open(path).unwrap(),
        "proc-test",
        Some(&mut |region: u32, offset: u64, data: &[u8]| {
            if region == 0 {
                let at = usize::try_from(offset).unwrap();
                if meta.len() < at + data.len() {
                    meta.resize(at + data.len(), 0);
                }
                meta[at..at + data.len()].copy_from_slice(data);
            }
        }),
    )
    .unwrap();
    (header, proc::ProcessMeta::decode(&meta).unwrap())
}

/// Every "i sum" line of `log` is step i of the uninterrupted run (a step replayed after a
/// rollback or restore may appear twice); returns the step numbers in log order.
fn assert_steps_match(log: &[String], reference: &[String]) -> Vec<usize> {
    let mut order = Vec::new();
    for line in log {
        let i: usize = line.split(' ').next().unwrap().parse().unwrap();
        assert_eq!(
            Some(line),
            reference.get(i),
            "step {i} differs from the uninterrupted run"
        );
        order.push(i);
    }
    order
}

#[test]
fn an_excluded_log_is_left_out_of_the_image_and_of_the_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    // stdout (`a.out`, opened without O_APPEND) is the log; the data file is O_APPEND.
    let c = start_counter(tmp.path(), "a", 1, None);
    wait_steps(&c.out, 10);
    let log_name = fs::canonicalize(&c.out)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let opts = DumpOptions {
        exclude_paths: vec![c.out.clone()],
        ..DumpOptions::default()
    };
    let d = proc::dump(c.proc.pid, &s, &opts).unwrap();
    assert_eq!(d.files_excluded, vec![log_name.clone()]);
    let (header, meta) = image_meta(&d.path);
    let names: Vec<&str> = meta.files.iter().map(|f| f.path.as_str()).collect();
    assert!(!names.contains(&log_name.as_str()), "{names:?}");
    let data_name = fs::canonicalize(&c.data).unwrap();
    assert!(names.contains(&data_name.to_str().unwrap()), "{names:?}");
    let file_regions = header
        .regions
        .iter()
        .filter(|r| r.id >= proc::meta::FILE_REGION_BASE)
        .count();
    assert_eq!(file_regions, meta.files.len(), "{:?}", header.regions);
    let kept: u64 = meta.files.iter().map(|f| f.size).sum();
    assert_eq!(d.file_bytes, kept, "only the other files' bytes");
    let stdout = meta.fds.iter().find(|f| f.fd == 1).unwrap();
    assert!(stdout.excluded, "{stdout:?}");
    assert!(
        !meta.fds.iter().any(|f| f.fd != 1 && f.excluded),
        "{:?}",
        meta.fds
    );

    let at_dump = steps(&c.out).len();
    wait_steps(&c.out, at_dump + 20);
    let r = proc::rollback(c.proc.pid, &s, None).unwrap();
    assert_eq!(r.pid, c.proc.pid);
    // Read after the rollback: the log holds at least this, untouched.
    let log_before = fs::read(&c.out).unwrap();
    assert!(
        lines(&c.data).len() <= at_dump + 2,
        "the data file was rolled back"
    );
    let before = steps(&c.out).len();
    assert!(
        before >= at_dump + 20,
        "the log was cut back: {before} steps"
    );
    wait_steps(&c.out, before + 20);
    c.proc.kill();
    let log_after = fs::read(&c.out).unwrap();
    assert!(
        log_after.starts_with(&log_before),
        "the log was rewritten after the rollback"
    );
    let got = steps(&c.out);
    let (ref_steps, ref_data) = reference(tmp.path(), got.len() + 5);
    let order = assert_steps_match(&got, &ref_steps);
    // The replay appends: the step numbers go back to the checkpoint once, after the old end.
    let back = order.windows(2).filter(|w| w[1] <= w[0]).count();
    assert_eq!(back, 1, "{order:?}");
    let turn = order.windows(2).position(|w| w[1] <= w[0]).unwrap();
    assert!(
        turn + 1 >= before - 1,
        "replayed steps start inside the old log: {order:?}"
    );
    // About 10 steps before the checkpoint and 20 after the rollback.
    assert_same_history(&lines(&c.data), &ref_data, 25);
}

#[test]
fn a_restore_reopens_an_excluded_file_at_its_end_and_writes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let c = start_counter(tmp.path(), "a", 1, None);
    wait_steps(&c.out, 10);
    // By descriptor number this time.
    let opts = DumpOptions {
        exclude_fds: vec![1],
        ..DumpOptions::default()
    };
    let d = proc::dump(c.proc.pid, &s, &opts).unwrap();
    assert_eq!(d.files_excluded.len(), 1, "{d:?}");
    let at_dump = steps(&c.out).len();
    wait_steps(&c.out, at_dump + 20);
    c.proc.kill();
    let log_at_kill = fs::read(&c.out).unwrap();
    let killed_at = steps(&c.out).len();
    let r = proc::restore(&s, None, RestoreOptions::default()).unwrap();
    let restored = Proc { pid: r.pid };
    wait_steps(&c.out, killed_at + 20);
    restored.kill();
    assert!(
        fs::read(&c.out).unwrap().starts_with(&log_at_kill),
        "the restore rewrote the excluded log"
    );
    let got = steps(&c.out);
    let (ref_steps, ref_data) = reference(tmp.path(), got.len() + 5);
    let order = assert_steps_match(&got, &ref_steps);
    let turn = order.windows(2).position(|w| w[1] <= w[0]).unwrap();
    assert_eq!(turn + 1, killed_at, "{order:?}");
    // The checkpoint came after 10 printed steps and before `at_dump` were seen.
    assert!((10..=at_dump + 1).contains(&order[turn + 1]), "{order:?}");
    // The data file, not excluded, went back to the checkpoint and went on from there.
    assert_same_history(&lines(&c.data), &ref_data, 25);
}

#[test]
fn a_corrupt_image_is_refused_and_the_process_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let c = start_counter(tmp.path(), "a", 1, None);
    wait_steps(&c.out, 5);
    let d = proc::dump(c.proc.pid, &s, &DumpOptions::default()).unwrap();
    let mut bytes = fs::read(&d.path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    // The image is 0600 and committed; rewrite it in place as a disk error would.
    OpenOptions::new()
        .write(true)
        .open(&d.path)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    let e = proc::restore(&s, Some(d.seq), RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, ProcError::Image { .. }), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
    let e = proc::rollback(c.proc.pid, &s, Some(d.seq)).unwrap_err();
    assert!(matches!(e, ProcError::Image { .. }), "{e}");
    let n = steps(&c.out).len();
    wait_steps(&c.out, n + 5);
    assert!(c.proc.alive());
}

#[test]
fn a_pipe_is_reported_and_restored_only_with_a_replacement() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let (rd, wr) = nix::unistd::pipe().unwrap();
    let c = start_counter(tmp.path(), "b", 1, Some(Stdio::from(wr)));
    let mut reader = File::from(rd);
    let out = tmp.path().join("b.piped");
    let sink = out.clone();
    let copier = std::thread::spawn(move || {
        let mut f = File::create(sink).unwrap();
        let _ = std::io::copy(&mut reader, &mut f);
    });
    wait_steps(&out, 5);
    let d = proc::dump(c.proc.pid, &s, &DumpOptions::default()).unwrap();
    assert_eq!(d.unrestorable.len(), 1, "{:?}", d.unrestorable);
    assert_eq!(d.unrestorable[0].fd, 1);
    assert!(
        d.unrestorable[0].what.starts_with("pipe"),
        "{:?}",
        d.unrestorable
    );
    c.proc.kill();
    drop(c);
    copier.join().unwrap();

    let e = proc::restore(&s, None, RestoreOptions::default()).unwrap_err();
    assert!(matches!(e, ProcError::Unrestorable { .. }), "{e}");
    assert!(e.to_string().contains("descriptor 1"), "{e}");

    let replaced = tmp.path().join("b.replaced");
    let fd: OwnedFd = File::create(&replaced).unwrap().into();
    let r = proc::restore(
        &s,
        None,
        RestoreOptions {
            fds: vec![(1, fd)],
            keep_file_contents: false,
            ..RestoreOptions::default()
        },
    )
    .unwrap();
    let _restored = Proc { pid: r.pid };
    wait_steps(&replaced, 5);
}

#[test]
fn dump_and_restore_of_100_mib() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let c = start_counter(tmp.path(), "big", 100, None);
    wait_steps(&c.out, 3);
    let d = proc::dump(c.proc.pid, &s, &DumpOptions::default()).unwrap();
    c.proc.kill();
    let r = proc::restore(&s, None, RestoreOptions::default()).unwrap();
    let restored = Proc { pid: r.pid };
    let n = steps(&c.out).len();
    wait_steps(&c.out, n + 3);
    restored.signal(libc::SIGUSR1);
    wait_until("the usr1 check", || {
        lines(&c.out).iter().any(|l| l.starts_with("usr1 1"))
    });
    assert!(lines(&c.out).contains(&"usr1 1 ok".to_owned()));
    eprintln!(
        "100 MiB process: dump {:?} (pause {:?}, {} pages, image {} bytes), restore {:?}",
        d.total, d.pause, d.pages, d.image_bytes, r.took
    );
}

#[test]
fn dump_stops_every_thread_and_all_run_on() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let c = start(
        Command::new(threads_bin()),
        tmp.path(),
        "mt",
        None,
        tmp.path().join("unused"),
    );
    let counts = |path: &Path| -> Vec<(u64, u64)> {
        lines(path)
            .iter()
            .filter_map(|l| {
                let v: Vec<u64> = l.split(' ').filter_map(|x| x.parse().ok()).collect();
                (v.len() == 3).then(|| (v[1], v[2]))
            })
            .collect()
    };
    wait_until("both workers counting", || {
        counts(&c.out).last().is_some_and(|&(a, b)| a > 0 && b > 0)
    });
    let d = proc::dump(c.proc.pid, &s, &DumpOptions::default()).unwrap();
    assert_eq!(d.threads, 3, "{d:?}");
    s.verify(d.seq).unwrap();
    let (a, b) = *counts(&c.out).last().unwrap();
    wait_until("both workers counting on after the dump", || {
        counts(&c.out)
            .last()
            .is_some_and(|&(x, y)| x > a + 5 && y > b + 5)
    });
    c.proc.kill();
    // All three come back and count on.
    let r = proc::restore(&s, None, RestoreOptions::default()).unwrap();
    let _restored = Proc { pid: r.pid };
    assert!(r.same_tids, "{r:?}");
    let (a, b) = *counts(&c.out).last().unwrap();
    wait_until("both workers counting on after the restore", || {
        counts(&c.out)
            .last()
            .is_some_and(|&(x, y)| x > a + 5 && y > b + 5)
    });
}

fn pages_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    compile("pages", &BIN)
}

/// The pages program (tests/progs/pages.c), driven through a pipe on its stdin and stdout.
struct Pages {
    proc: Proc,
    input: File,
    output: std::io::BufReader<File>,
}

impl Pages {
    /// Sends one command and returns the answer line.
    fn cmd(&mut self, line: &str) -> String {
        use std::io::BufRead;
        writeln!(self.input, "{line}").unwrap();
        let mut answer = String::new();
        self.output.read_line(&mut answer).unwrap();
        answer.trim_end().to_owned()
    }
}

/// Pipes for a pages program: (its stdin, its stdout) and the test's ends of them.
fn pages_pipes() -> ((OwnedFd, OwnedFd), (File, std::io::BufReader<File>)) {
    let (in_rd, in_wr) = nix::unistd::pipe().unwrap();
    let (out_rd, out_wr) = nix::unistd::pipe().unwrap();
    (
        (in_rd, out_wr),
        (
            File::from(in_wr),
            std::io::BufReader::new(File::from(out_rd)),
        ),
    )
}

fn start_pages(mib: u32) -> Pages {
    let ((stdin, stdout), (input, output)) = pages_pipes();
    let mut cmd = Command::new(pages_bin());
    cmd.arg(mib.to_string());
    // SAFETY: one system call between fork and exec (see `start`).
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    std::mem::forget(child);
    let mut p = Pages {
        proc: Proc { pid },
        input,
        output,
    };
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut p.output, &mut ready).unwrap();
    assert_eq!(ready.trim_end(), "ready");
    p
}

/// Pages besides the ones a command wrote that an increment may hold (the stack, libc's data,
/// stdio buffers).
const INCREMENT_SLACK: u64 = 24;

#[test]
fn incremental_dumps_read_the_written_pages_and_a_chain_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let opts = DumpOptions::default();
    let mut p = start_pages(64);
    let mut tracker = proc::Tracker::new(p.proc.pid);

    let full = proc::dump_incremental(&mut tracker, &s, &opts).unwrap();
    assert_eq!(full.parent, None);
    assert!(full.full_reason.is_some());
    assert!(
        full.pages >= 64 * 256,
        "a full dump read {} pages",
        full.pages
    );
    assert_eq!(tracker.disabled(), None);

    assert_eq!(p.cmd("w 100 37 5"), "ok");
    let inc = proc::dump_incremental(&mut tracker, &s, &opts).unwrap();
    assert_eq!(inc.parent, Some(full.seq), "{:?}", inc.full_reason);
    assert!(
        (37..=37 + INCREMENT_SLACK).contains(&inc.pages),
        "an increment after 37 written pages read {}",
        inc.pages
    );
    assert!(inc.image_bytes < full.image_bytes / 20);

    // Freed pages must come back empty, not with the base image's contents.
    assert_eq!(p.cmd("z 200 10"), "ok");
    assert_eq!(p.cmd("w 300 3 9"), "ok");
    assert_eq!(p.cmd("w 100 1 7"), "ok");
    let inc2 = proc::dump_incremental(&mut tracker, &s, &opts).unwrap();
    assert_eq!(inc2.parent, Some(inc.seq), "{:?}", inc2.full_reason);
    assert!(
        (4..=4 + INCREMENT_SLACK).contains(&inc2.pages),
        "{}",
        inc2.pages
    );
    let sum = p.cmd("c");
    assert!(sum.starts_with("sum "), "{sum}");

    // Rollback in place from the chain.
    assert_eq!(p.cmd("w 0 500 3"), "ok");
    assert_ne!(p.cmd("c"), sum);
    proc::rollback(p.proc.pid, &s, None).unwrap();
    assert_eq!(p.cmd("c"), sum);

    // Restore after kill -9 from the chain (base + two increments).
    p.proc.kill();
    let ((stdin, stdout), (input, output)) = pages_pipes();
    let r = proc::restore(
        &s,
        Some(inc2.seq),
        RestoreOptions {
            fds: vec![(0, stdin), (1, stdout)],
            keep_file_contents: false,
            ..RestoreOptions::default()
        },
    )
    .unwrap();
    let mut back = Pages {
        proc: Proc { pid: r.pid },
        input,
        output,
    };
    assert_eq!(back.cmd("c"), sum);
    assert_eq!(back.cmd("w 1 1 1"), "ok");
}

#[test]
fn a_changed_layout_makes_the_next_dump_full() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let opts = DumpOptions::default();
    let mut p = start_pages(8);
    let mut tracker = proc::Tracker::new(p.proc.pid);
    let full = proc::dump_incremental(&mut tracker, &s, &opts).unwrap();
    assert_eq!(p.cmd("m"), "ok");
    let next = proc::dump_incremental(&mut tracker, &s, &opts).unwrap();
    assert_eq!(next.parent, None);
    let reason = next.full_reason.unwrap_or_default();
    assert!(reason.contains("layout"), "{reason}");
    assert!(next.pages >= 8 * 256 + 256, "{}", next.pages);
    // Tracking starts again from the full image.
    assert_eq!(p.cmd("w 3 2 1"), "ok");
    let inc = proc::dump_incremental(&mut tracker, &s, &opts).unwrap();
    assert_eq!(inc.parent, Some(next.seq), "{:?}", inc.full_reason);
    assert!(inc.pages <= 2 + INCREMENT_SLACK, "{}", inc.pages);
    assert!(full.seq < next.seq);
}

/// An unmodified Debian program: perl (package perl-base, Essential in Debian) running a
/// counter loop that prints to a file. Dump, kill -9, restore: the numbers go on from the
/// checkpointed value, with none lost or repeated.
#[test]
fn an_unmodified_perl_counter_continues_after_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut cmd = Command::new("/usr/bin/perl");
    cmd.args([
        "-e",
        "$| = 1; my $i = 0; while (1) { print \"$i\\n\"; $i++; select(undef, undef, undef, 0.01); }",
    ]);
    let c = start(cmd, tmp.path(), "perl", None, tmp.path().join("unused"));
    let count = |path: &Path| lines(path).len();
    wait_until("perl's first lines", || count(&c.out) >= 20);
    let d = proc::dump(c.proc.pid, &s, &DumpOptions::default()).unwrap();
    assert!(d.unrestorable.is_empty(), "{:?}", d.unrestorable);
    let at_dump = count(&c.out);
    c.proc.kill();
    // What it printed after the dump is undone by the restore (the file is put back).
    let r = proc::restore(&s, None, RestoreOptions::default()).unwrap();
    let _restored = Proc { pid: r.pid };
    wait_until("perl counting on after the restore", || {
        count(&c.out) >= at_dump + 50
    });
    let got = lines(&c.out);
    for (i, l) in got.iter().enumerate().take(at_dump + 50) {
        assert_eq!(l, &i.to_string(), "line {i} after the restore");
    }
}

fn mtcounter_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    compile("mtcounter", &BIN)
}

/// Output files of the mtcounter program, one per thread (stdout is the main thread's).
const MT_FILES: [&str; 4] = ["out", "heap", "map", "pipe"];

/// The multi-threaded counter (tests/progs/mtcounter.c) writing into its own directory, fed
/// lines through a pipe on its stdin (read by its "pipe" thread).
struct MtCounter {
    proc: Proc,
    dir: PathBuf,
    input: File,
}

impl MtCounter {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn send(&mut self, line: &str) {
        writeln!(self.input, "{line}").unwrap();
    }

    /// Numbered lines of each thread's output.
    fn progress(&self) -> Vec<usize> {
        MT_FILES
            .iter()
            .map(|f| steps(&self.file(f)).len())
            .collect()
    }

    /// Waits until every counting thread wrote `more` lines beyond `from` (see `progress`).
    fn wait_counting(&self, from: &[usize], more: usize) {
        for (i, f) in MT_FILES.iter().enumerate().take(3) {
            wait_steps(&self.file(f), from[i] + more);
        }
    }

    /// Sends `lines` and waits until the pipe thread wrote `total` lines.
    fn feed(&mut self, lines: std::ops::RangeInclusive<u32>, total: usize) {
        for n in lines {
            self.send(&n.to_string());
        }
        wait_steps(&self.file("pipe"), total);
    }

    /// SIGUSR1: each counting thread re-sums its area; all three must answer "ok".
    fn check_memory(&self, pid: i32, generation: u32) {
        // SAFETY: kill takes plain integers.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
        let out = self.file("out");
        let answers = || {
            lines(&out)
                .into_iter()
                .filter(|l| l.starts_with("usr1 ") && l.contains(&format!(" {generation} ")))
                .collect::<Vec<_>>()
        };
        wait_until("three usr1 answers", || answers().len() >= 3);
        for a in answers() {
            assert!(a.ends_with(" ok"), "{a}");
        }
    }
}

fn start_mt(parent: &Path, name: &str) -> MtCounter {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).unwrap();
    let (rd, wr) = nix::unistd::pipe().unwrap();
    let mut cmd = Command::new(mtcounter_bin());
    cmd.arg(&dir);
    // SAFETY: one system call between fork and exec (see `start`).
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::from(rd))
        .stdout(Stdio::from(File::create(dir.join("out")).unwrap()))
        .stderr(Stdio::from(File::create(dir.join("err")).unwrap()))
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    std::mem::forget(child);
    let m = MtCounter {
        proc: Proc { pid },
        dir,
        input: File::from(wr),
    };
    wait_until("mtcounter ready", || {
        lines(&m.file("out")).contains(&"ready".to_owned())
    });
    m
}

/// Thread ids of process `pid`, sorted.
fn tids(pid: i32) -> Vec<i32> {
    let mut t: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    t.sort_unstable();
    t
}

/// Per thread: its blocked signals (`SigBlk` of its status) and its robust futex list.
fn thread_state(pid: i32) -> Vec<(i32, String, u64, usize)> {
    tids(pid)
        .into_iter()
        .map(|tid| {
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            let blk = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .unwrap()
                .trim()
                .to_owned();
            let mut head: u64 = 0;
            let mut len: usize = 0;
            // SAFETY: get_robust_list writes one pointer and one size_t to the two locals.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_get_robust_list,
                    tid,
                    &mut head as *mut u64,
                    &mut len as *mut usize,
                )
            };
            assert_eq!(r, 0, "get_robust_list({tid})");
            (tid, blk, head, len)
        })
        .collect()
}

/// Every thread's output of `got` is a prefix of the uninterrupted run's (started in `ref`,
/// fed lines 1..=`fed`), with at least `min[i]` lines.
fn assert_mt_history(tmp: &Path, got: &MtCounter, fed: u32, min: &[usize]) {
    let outputs: Vec<Vec<String>> = MT_FILES.iter().map(|f| steps(&got.file(f))).collect();
    let mut r = start_mt(tmp, "ref");
    r.feed(1..=fed, usize::try_from(fed).unwrap());
    for (f, o) in MT_FILES.iter().zip(&outputs) {
        wait_steps(&r.file(f), o.len());
    }
    r.proc.kill();
    for ((f, o), &m) in MT_FILES.iter().zip(&outputs).zip(min) {
        let reference = steps(&r.file(f));
        assert!(o.len() >= m, "{f}: only {} lines", o.len());
        for (i, (g, w)) in o.iter().zip(&reference).enumerate() {
            assert_eq!(g, w, "{f}: line {i} differs from the uninterrupted run");
        }
    }
}

/// The acceptance test for multi-threaded programs: four threads (heap, mmap'd region, files
/// written, a pipe, a signal handler, one thread blocked in read), dump → kill -9 → restore:
/// every thread comes back with its tid, signal mask and robust list, and goes on exactly as
/// an uninterrupted run; a joined thread's exit is seen (clear_child_tid).
#[test]
fn a_multi_threaded_process_restores_with_every_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut m = start_mt(tmp.path(), "a");
    m.feed(1..=5, 5);
    m.wait_counting(&[0; 4], 10);
    let before = thread_state(m.proc.pid);
    assert_eq!(before.len(), 4, "{before:?}");
    let d = proc::dump(m.proc.pid, &s, &DumpOptions::default()).unwrap();
    assert_eq!(d.threads, 4, "{d:?}");
    assert_eq!(d.unrestorable.len(), 1, "{:?}", d.unrestorable);
    assert_eq!(d.unrestorable[0].fd, 0);
    let at_dump = m.progress();
    // Undone by the restore: the files go back to their checkpointed contents.
    m.feed(6..=6, 6);
    m.wait_counting(&at_dump, 10);
    m.proc.kill();

    let (rd, wr) = nix::unistd::pipe().unwrap();
    let r = proc::restore(
        &s,
        None,
        RestoreOptions {
            fds: vec![(0, rd)],
            ..RestoreOptions::default()
        },
    )
    .unwrap();
    let restored = Proc { pid: r.pid };
    assert!(r.same_pid && r.same_tids, "{r:?}");
    assert_eq!(
        thread_state(r.pid),
        before,
        "tids, signal masks, robust lists"
    );
    let mut m = MtCounter {
        proc: restored,
        dir: m.dir.clone(),
        input: File::from(wr),
    };
    assert_eq!(
        steps(&m.file("pipe")).len(),
        5,
        "the pipe thread's file put back"
    );
    m.feed(6..=10, 10);
    m.wait_counting(&at_dump, 30);
    m.check_memory(r.pid, 1);
    m.send("q");
    wait_until("main joining the pipe thread", || {
        lines(&m.file("out")).contains(&"joined".to_owned())
    });
    m.proc.kill();
    let min: Vec<usize> = at_dump.iter().map(|n| n + 30).take(3).chain([10]).collect();
    assert_mt_history(tmp.path(), &m, 10, &min);
}

/// Rollback in place of a live multi-threaded process whose pipe thread has ended since the
/// checkpoint: its threads are ended and the image's four created again with their tids;
/// memory, files and every thread's progress go back to the checkpoint and on from there as
/// in an uninterrupted run.
#[test]
fn rollback_of_a_multi_threaded_process_returns_every_thread_to_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut m = start_mt(tmp.path(), "a");
    m.feed(1..=5, 5);
    m.wait_counting(&[0; 4], 10);
    let before = thread_state(m.proc.pid);
    proc::dump(m.proc.pid, &s, &DumpOptions::default()).unwrap();
    let at_dump = m.progress();
    m.feed(6..=8, 8);
    m.send("q");
    wait_until("main joining the pipe thread", || {
        lines(&m.file("out")).contains(&"joined".to_owned())
    });
    assert_eq!(tids(m.proc.pid).len(), 3);
    m.wait_counting(&at_dump, 20);

    let r = proc::rollback(m.proc.pid, &s, None).unwrap();
    assert_eq!((r.pid, r.seq), (m.proc.pid, 1));
    assert!(r.same_tids, "{r:?}");
    assert_eq!(thread_state(m.proc.pid), before);
    let now = m.progress();
    assert_eq!(now[3], 5, "the pipe thread's file went back");
    for (i, (n, d)) in now.iter().zip(&at_dump).enumerate().take(3) {
        assert!(
            n <= &(d + 2),
            "{}: {n} lines right after the rollback",
            MT_FILES[i]
        );
    }
    m.feed(6..=10, 10);
    m.wait_counting(&at_dump, 30);
    m.check_memory(m.proc.pid, 1);
    m.send("q");
    wait_until("main joining the pipe thread", || {
        lines(&m.file("out")).contains(&"joined".to_owned())
    });
    m.proc.kill();
    let min: Vec<usize> = at_dump.iter().map(|n| n + 30).take(3).chain([10]).collect();
    assert_mt_history(tmp.path(), &m, 10, &min);
}

/// A dump that fails after the target was stopped and asked for its state (here: the store
/// is gone) leaves every thread running as it was: the same output as an uninterrupted run.
#[test]
fn a_failed_dump_leaves_a_multi_threaded_target_running_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut m = start_mt(tmp.path(), "a");
    m.feed(1..=3, 3);
    m.wait_counting(&[0; 4], 5);
    fs::remove_dir_all(s.dir()).unwrap();
    fs::write(s.dir(), b"not a directory").unwrap();
    let before = thread_state(m.proc.pid);
    let e = proc::dump(m.proc.pid, &s, &DumpOptions::default()).unwrap_err();
    assert!(matches!(e, ProcError::Store(_)), "{e}");
    assert_eq!(thread_state(m.proc.pid), before);
    let status = fs::read_to_string(format!("/proc/{}/status", m.proc.pid)).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
    let at = m.progress();
    m.feed(4..=6, 6);
    m.wait_counting(&at, 20);
    m.check_memory(m.proc.pid, 1);
    m.proc.kill();
    let min: Vec<usize> = at.iter().map(|n| n + 20).take(3).chain([6]).collect();
    assert_mt_history(tmp.path(), &m, 6, &min);
}

/// A process that exits while it is being dumped (killed from another thread once the dump
/// has it stopped): a clear error, no image, no panic.
#[test]
fn a_process_that_exits_mid_dump_gives_a_clear_error_and_no_image() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut failures = 0;
    for round in 0..5 {
        let c = start_counter(tmp.path(), &format!("x{round}"), 256, None);
        wait_steps(&c.out, 1);
        let pid = c.proc.pid;
        let killer = std::thread::spawn(move || {
            // Once the dump has seized it (a tracer shows), and then a little later each
            // round, so the exit lands in different phases of the dump.
            let traced = || {
                fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
            };
            let start = Instant::now();
            while !traced() && start.elapsed() < WAIT {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(10 * round));
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let result = proc::dump(pid, &s, &DumpOptions::default());
        killer.join().unwrap();
        match result {
            Ok(d) => {
                // The dump won the race: its image is whole.
                s.verify(d.seq).unwrap();
                s.delete(d.seq).unwrap();
            }
            Err(e) => {
                failures += 1;
                assert!(
                    matches!(
                        e,
                        ProcError::Exited { .. } | ProcError::NoSuchProcess { .. }
                    ),
                    "round {round}: {e:?}"
                );
                assert!(e.to_string().contains(&pid.to_string()), "{e}");
            }
        }
        assert!(s.list().unwrap().is_empty(), "round {round}");
        let left: Vec<_> = fs::read_dir(s.dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(
            left.iter().all(|n| !n.to_string_lossy().contains("tmp")),
            "{left:?}"
        );
    }
    assert!(
        failures > 0,
        "no dump of five raced the exit of its process"
    );
}

/// A process holding pid `want` (clone3 `set_tid`: root in the initial pid namespace) that
/// only waits to be killed.
fn occupy_pid(want: i32) -> Proc {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
    }
    let tid = [want];
    let args = CloneArgs {
        exit_signal: u64::try_from(libc::SIGCHLD).unwrap(),
        set_tid: tid.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    let mut r = -1;
    // The kernel frees a thread's id a moment after its process can be reaped: EEXIST for
    // that moment.
    for _ in 0..1000 {
        // SAFETY: clone3 without CLONE_VM is a fork of this process; `args` and `tid` are
        // live and correctly sized. The child only calls pause (no allocation, no lock)
        // until killed.
        r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                size_of::<CloneArgs>(),
            )
        };
        if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if r == 0 {
        loop {
            // SAFETY: pause takes no arguments.
            unsafe { libc::pause() };
        }
    }
    assert_eq!(
        r,
        i64::from(want),
        "clone3 with set_tid {want}: {}",
        std::io::Error::last_os_error()
    );
    Proc { pid: want }
}

/// A thread id taken by another process at restore time: the thread gets another one,
/// `same_tids` says so, and the process runs on as before (its other threads too, and the
/// renamed thread's exit is still seen by its joiner).
#[test]
fn a_taken_thread_id_is_replaced_and_the_process_runs_on() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let mut m = start_mt(tmp.path(), "a");
    m.feed(1..=3, 3);
    m.wait_counting(&[0; 4], 5);
    let before = tids(m.proc.pid);
    proc::dump(m.proc.pid, &s, &DumpOptions::default()).unwrap();
    let at_dump = m.progress();
    m.proc.kill();
    let taken = *before.last().unwrap();
    let _holder = occupy_pid(taken);

    let (rd, wr) = nix::unistd::pipe().unwrap();
    let r = proc::restore(
        &s,
        None,
        RestoreOptions {
            fds: vec![(0, rd)],
            ..RestoreOptions::default()
        },
    )
    .unwrap();
    let restored = Proc { pid: r.pid };
    assert!(r.same_pid && !r.same_tids, "{r:?}");
    let now = tids(r.pid);
    assert_eq!(now.len(), 4, "{now:?}");
    assert!(!now.contains(&taken), "{now:?}");
    assert_eq!(
        now.iter().filter(|t| before.contains(t)).count(),
        3,
        "{before:?} → {now:?}"
    );
    let mut m = MtCounter {
        proc: restored,
        dir: m.dir.clone(),
        input: File::from(wr),
    };
    m.feed(4..=6, 6);
    m.wait_counting(&at_dump, 20);
    m.check_memory(r.pid, 1);
    m.send("q");
    wait_until("main joining the pipe thread", || {
        lines(&m.file("out")).contains(&"joined".to_owned())
    });
    m.proc.kill();
    let min: Vec<usize> = at_dump.iter().map(|n| n + 20).take(3).chain([6]).collect();
    assert_mt_history(tmp.path(), &m, 6, &min);
}
