//! Harness for ftkit's end-to-end tests: finds the built binaries, runs a real `watchd` on a
//! scratch data directory, observes it through `ftctl`, the control socket and `/proc`, and
//! leaves no process or cgroup behind, also when a test fails (the guard's `Drop` runs during
//! unwinding). It never fakes an observation: everything it reports was read from watchd, the
//! kernel or the file system. Waiting is always "poll until a condition holds or a deadline
//! passes", never a bare sleep standing in for an assertion.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub mod cluster;
pub mod groups;
pub mod kv_cluster;
pub mod kv_lab;
pub mod netns;
pub mod replica;

/// How often conditions are re-checked while waiting.
pub const POLL: Duration = Duration::from_millis(25);
/// How long a fresh watchd may take to answer `ftctl status`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long watchd may take to exit after SIGTERM before the guard kills it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);
/// The `--timeout` every ftctl call gets.
pub const FTCTL_TIMEOUT: &str = "5s";
/// How long a raw control-socket exchange may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// The default deadline for "the service gets to this state".
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of each log file is printed when a test fails.
const LOG_TAIL_ON_FAILURE: usize = 8 * 1024;
/// How long the cleanup waits for killed processes and cgroups to disappear.
const CLEANUP_WAIT: Duration = Duration::from_secs(3);

const MISSING: &str = "run `cargo build --workspace` first";

// ---------------------------------------------------------------------------------------------
// Binaries

/// The cargo profile directory the test binary was built into (`…/target/debug`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let dir = exe
        .parent()
        .expect("an executable lives in a directory")
        .to_owned();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.parent()
            .expect("deps/ lives in the profile directory")
            .to_owned()
    } else {
        dir
    }
}

/// A binary built by `cargo build --workspace` (`watchd`, `ftctl`, `hbdemo`) or one of this
/// package's helper programs (`notifyd`, `tcpd`, `forker`, `memhog`, `stubborn`).
/// Panics with the build command when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: {MISSING} (the README's test command is \
         `cargo build --workspace && cargo nextest run --workspace`)",
        path.display()
    );
    path
}

/// `libft.so`, built by `cargo build --workspace`.
pub fn libft_so() -> PathBuf {
    binary("libft.so")
}

/// The workspace root (for `libft/include`, `examples/c`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_owned()
}

/// A TOML basic string holding `s` (JSON string syntax is valid TOML for the characters a
/// JSON encoder escapes).
pub fn q(s: impl AsRef<OsStr>) -> String {
    let text = s.as_ref().to_string_lossy();
    serde_json::to_string(text.as_ref()).expect("a string always serialises")
}

/// A TOML array of strings.
pub fn q_list<S: AsRef<OsStr>>(items: &[S]) -> String {
    let parts: Vec<String> = items.iter().map(q).collect();
    format!("[{}]", parts.join(", "))
}

// ---------------------------------------------------------------------------------------------
// Scratch directories

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name for OS objects of this test: `prefix-PID-N`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A unique temporary directory, deleted when dropped.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A new directory whose name starts with `ft-<label>-`.
    pub fn new(label: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ft-{label}-"))
            .tempdir()
            .expect("cannot create a scratch directory in the temp dir");
        Scratch { dir }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` inside it and returns the path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.file(name);
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Polls `probe` until it returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Milliseconds since the Unix epoch (the clock of watchd's event `time_ms`).
pub fn unix_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(d.as_millis()).expect("milliseconds since 1970 fit in u64")
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A process's state letter from `/proc/PID/stat` (`R`, `S`, `T`, `Z`, …), `None` when gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    after.chars().next()
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 3 is the first after the command name, which may contain spaces and ')'.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    after.split(' ').nth(n.checked_sub(3)?).map(str::to_owned)
}

/// Whether `pid` is a live process (a zombie counts as dead: it runs nothing, and its
/// reaper may be an init that reaps late).
pub fn pid_alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// The process's start time in clock ticks since boot (identifies it across pid reuse).
pub fn start_time(pid: u32) -> Option<u64> {
    stat_field(pid, 22)?.parse().ok()
}

/// The session id of `pid`.
pub fn session_of(pid: u32) -> Option<u32> {
    stat_field(pid, 6)?.parse().ok()
}

/// The process group of `pid`.
pub fn pgid_of(pid: u32) -> Option<u32> {
    stat_field(pid, 5)?.parse().ok()
}

/// The parent of `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_field(pid, 4)?.parse().ok()
}

/// The cgroup v2 path of `pid` as `/proc/PID/cgroup` shows it (`0::PATH`).
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Where cgroup v2 is mounted, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

fn pid_t(pid: u32) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pids fit in pid_t"))
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    match nix::sys::signal::kill(pid_t(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => panic!("kill({pid}, {signal}) failed: {e}"),
    }
}

/// Waits until `pid` is no longer a live process; panics after `timeout`.
pub fn wait_gone(pid: u32, timeout: Duration) {
    wait_until(&format!("pid {pid} to be gone"), timeout, || {
        (!pid_alive(pid)).then_some(())
    });
}

/// Waits until `pid` is stopped (state `T`).
pub fn wait_stopped(pid: u32, timeout: Duration) {
    wait_until(&format!("pid {pid} to be stopped"), timeout, || {
        (proc_state(pid) == Some('T')).then_some(())
    });
}

/// SIGKILL to `pid` only if it still is the process that started at `started`: pid numbers are
/// reused quickly (pid_max may be 32768) and other tests run alongside. A pidfd pins the
/// process between the check and the kill.
fn kill_if_same(pid: u32, started: Option<u64>) {
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1; no memory
    // is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
    let Ok(fd) = i32::try_from(fd) else { return };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` was just returned by pidfd_open, is open, and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if started.is_some() && start_time(pid) != started {
        return;
    }
    // SAFETY: the fd is a valid pidfd; a NULL siginfo is allowed; flags must be 0.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Every live pid whose environment holds `key=value` (the children of one watchd all carry
/// its `FT_SOCKET`, whatever session, group or cgroup they moved to).
fn pids_with_env(key: &str, value: &str) -> Vec<u32> {
    let needle = format!("{key}={value}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (bound to port 0 and released; the kernel hands out
/// ephemeral ports round-robin, so a parallel test is unlikely to get the same one).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr()
        .expect("a bound socket has an address")
        .port()
}

// ---------------------------------------------------------------------------------------------
// watchd

/// The FNV-1a hash watchd names its cgroup directory with (`ftkit-<hash>`), over the canonical
/// data directory: the guard uses it to find and remove leftovers.
fn instance_name(data_dir: &Path) -> String {
    let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A running watchd on a scratch data directory, with its configuration file. Dropping it
/// stops watchd and kills and removes everything its services left behind.
#[derive(Debug)]
pub struct Watchd {
    label: String,
    settings: String,
    node: String,
    config: PathBuf,
    data_dir: PathBuf,
    /// The network namespace watchd runs in (a node of a [`netns::Lab`]), if any.
    netns: Option<String>,
    child: Option<Child>,
    runs: u32,
    logs: Vec<PathBuf>,
    /// Every service pid seen, with its start time (so a reused pid is never killed).
    pids: Mutex<BTreeMap<u32, Option<u64>>>,
    /// Every service cgroup seen (paths relative to the cgroup2 mount).
    cgroups: Mutex<BTreeSet<String>>,
    /// Declared last so that it is deleted after the cleanup in `Drop`.
    scratch: Scratch,
}

impl Watchd {
    /// Starts watchd with these `[[service]]` tables (TOML text) and default settings.
    pub fn start(label: &str, services: &str) -> Watchd {
        Watchd::start_with(label, "", services)
    }

    /// Starts watchd with extra `[watchd]` lines (`settings`, e.g. `cgroups = false`) and these
    /// services. The harness fills `data_dir` and a unique `node`.
    pub fn start_with(label: &str, settings: &str, services: &str) -> Watchd {
        Watchd::start_in(None, label, settings, services)
    }

    /// Like [`Watchd::start_with`], inside the network namespace `netns` when given (see
    /// [`netns::Lab::netns`]).
    pub fn start_in(netns: Option<&str>, label: &str, settings: &str, services: &str) -> Watchd {
        Watchd::start_node(netns, label, None, settings, services)
    }

    /// Like [`Watchd::start_in`] with this node name (a cluster's `[[node]]` tables name it);
    /// `None` makes a unique one.
    pub fn start_node(
        netns: Option<&str>,
        label: &str,
        node: Option<&str>,
        settings: &str,
        services: &str,
    ) -> Watchd {
        let scratch = Scratch::new(label);
        let data_dir = scratch.file("data");
        let mut w = Watchd {
            label: label.to_owned(),
            settings: settings.to_owned(),
            node: node.map_or_else(|| unique(&format!("n-{label}")), str::to_owned),
            config: scratch.file("watchd.toml"),
            data_dir,
            netns: netns.map(str::to_owned),
            child: None,
            runs: 0,
            logs: Vec::new(),
            pids: Mutex::default(),
            cgroups: Mutex::default(),
            scratch,
        };
        w.write_services(services);
        w.launch();
        w
    }

    /// The whole configuration text for these services.
    pub fn config_text(&self, services: &str) -> String {
        format!(
            "[watchd]\ndata_dir = {}\nnode = {}\n{}\n\n{}\n",
            q(&self.data_dir),
            q(&self.node),
            self.settings,
            services
        )
    }

    /// Rewrites the configuration file (same `[watchd]` table) with these services; watchd
    /// sees it on `ftctl reload`, SIGHUP or a restart.
    pub fn write_services(&self, services: &str) {
        std::fs::write(&self.config, self.config_text(services))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config.display()));
    }

    /// Overwrites the configuration file with exactly `text`.
    pub fn write_config_raw(&self, text: &str) {
        std::fs::write(&self.config, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config.display()));
    }

    fn launch(&mut self) {
        self.runs += 1;
        let log = self.scratch.file(&format!("watchd.{}.log", self.runs));
        let err = std::fs::File::create(&log).expect("create the watchd log file");
        let out = err.try_clone().expect("dup the watchd log file");
        let mut cmd = Command::new(binary("watchd"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("WATCHD_TEST_HOOKS", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(ns) = &self.netns {
            netns::enter_path(&format!("/run/netns/{ns}"), &mut cmd);
        }
        let child = cmd.spawn().expect("cannot spawn watchd");
        self.logs.push(log);
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "watchd ({}) exited during startup with {status}; its log:\n{}",
                    self.label,
                    self.log_text()
                );
            }
            let out = self.ftctl_timeout(&["status", "--json"], "1s");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "watchd did not answer `ftctl status` within {STARTUP_TIMEOUT:?}: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    /// The scratch directory (config, watchd logs, whatever a test puts there).
    pub fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    /// The configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// watchd's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The node name the harness configured.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// libft's socket (`FT_SOCKET`).
    pub fn ft_socket(&self) -> PathBuf {
        self.data_dir.join("ft.sock")
    }

    /// The sd_notify socket (`NOTIFY_SOCKET`).
    pub fn notify_socket(&self) -> PathBuf {
        self.data_dir.join("notify.sock")
    }

    /// The control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join("control.sock")
    }

    /// The pid of the current watchd process.
    pub fn watchd_pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("watchd is running")
    }

    /// Every watchd log of this test (one file per run), concatenated.
    pub fn log_text(&self) -> String {
        let mut all = String::new();
        for (i, p) in self.logs.iter().enumerate() {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            all.push_str(&format!(
                "--- watchd run {} ({}) ---\n{text}",
                i + 1,
                p.display()
            ));
        }
        all
    }

    /// The captured stdout/stderr of a service, read from `<data_dir>/logs/<service>.log`.
    pub fn service_log(&self, service: &str) -> String {
        std::fs::read_to_string(self.data_dir.join("logs").join(format!("{service}.log")))
            .unwrap_or_default()
    }

    /// Records a pid that belongs to this test's services (e.g. a grandchild a service
    /// printed), so that the cleanup kills it if it is still there.
    pub fn track_pid(&self, pid: u32) {
        let started = start_time(pid);
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(pid)
            .or_insert(started);
        if let Some(cg) = cgroup_of(pid)
            && cg.contains("/ftkit-")
        {
            self.cgroups
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(cg);
        }
    }

    /// Runs `ftctl --socket <control.sock> ARGS`.
    pub fn ftctl(&self, args: &[&str]) -> Output {
        self.ftctl_timeout(args, FTCTL_TIMEOUT)
    }

    fn ftctl_timeout(&self, args: &[&str], timeout: &str) -> Output {
        Command::new(binary("ftctl"))
            .arg("--socket")
            .arg(self.control_socket())
            .arg("--timeout")
            .arg(timeout)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run ftctl")
    }

    /// Runs ftctl and asserts exit 0; returns its stdout.
    pub fn ftctl_ok(&self, args: &[&str]) -> String {
        let out = self.ftctl(args);
        assert!(
            out.status.success(),
            "ftctl {args:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ftctl status --json`: one object per service. Every pid seen is recorded for cleanup.
    pub fn status(&self) -> Vec<Value> {
        let text = self.ftctl_ok(&["status", "--json"]);
        let services = json_lines(&text);
        for s in &services {
            if let Some(pid) = pid_of(s) {
                self.track_pid(pid);
            }
        }
        services
    }

    /// The status object of one service; panics when watchd does not list it.
    pub fn service(&self, name: &str) -> Value {
        let all = self.status();
        all.iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("watchd lists no service `{name}`: {all:?}"))
    }

    /// Polls the service's status until `predicate` holds; returns that status. Panics after
    /// `timeout` with the last status and the service's events.
    pub fn wait_for(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.status();
            let current = all.iter().find(|s| s["name"] == name).cloned();
            if let Some(s) = &current
                && predicate(s)
            {
                return s.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for `{name}` to be {what}; last status: \
                     {current:?}; its events:\n{}",
                    self.events_text(Some(name))
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the service is `running` and returns its pid.
    pub fn wait_running(&self, name: &str) -> u32 {
        let s = self.wait_for(name, "running", STATE_TIMEOUT, |s| {
            s["state"] == "running" && pid_of(s).is_some()
        });
        pid_of(&s).expect("checked by the predicate")
    }

    /// Waits until the service is `running` with a pid other than `old`; returns the new pid.
    pub fn wait_new_pid(&self, name: &str, old: u32, timeout: Duration) -> u32 {
        let s = self.wait_for(
            name,
            &format!("running with a pid other than {old}"),
            timeout,
            |s| s["state"] == "running" && pid_of(s).is_some_and(|p| p != old),
        );
        pid_of(&s).expect("checked by the predicate")
    }

    /// Waits until the service is in `state`.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        self.wait_for(name, state, timeout, |s| s["state"] == state)
    }

    /// `ftctl events --json`: every event watchd keeps, oldest first.
    pub fn events(&self) -> Vec<Value> {
        json_lines(&self.ftctl_ok(&["events", "--json"]))
    }

    /// The events about one service.
    pub fn events_of(&self, service: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["service"] == service)
            .collect()
    }

    /// The events about one service, of one kind.
    pub fn events_of_kind(&self, service: &str, kind: &str) -> Vec<Value> {
        self.events_of(service)
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// The newest event's sequence number (0 when there is none).
    pub fn last_seq(&self) -> u64 {
        self.events()
            .last()
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or(0)
    }

    /// Waits for the first event of `kind` about `service`; returns it.
    pub fn wait_event(&self, service: &str, kind: &str, timeout: Duration) -> Value {
        self.wait_event_after(0, service, kind, timeout)
    }

    /// Waits for an event of `kind` about `service` with a sequence number above `seq`.
    pub fn wait_event_after(
        &self,
        seq: u64,
        service: &str,
        kind: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.events().into_iter().find(|e| {
                e["service"] == service
                    && e["kind"] == kind
                    && e["seq"].as_u64().is_some_and(|s| s > seq)
            });
            if let Some(e) = found {
                return e;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for a `{kind}` event of `{service}` \
                     after seq {seq}; its events:\n{}",
                    self.events_text(Some(service))
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn events_text(&self, service: Option<&str>) -> String {
        let out = self.ftctl_timeout(&["events", "--json"], "2s");
        let text = String::from_utf8_lossy(&out.stdout);
        json_lines(&text)
            .into_iter()
            .filter(|e| service.is_none_or(|s| e["service"] == s || e["service"].is_null()))
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// One raw exchange on the control socket: sends `json_line` and returns every answer line
    /// until watchd closes the connection (or a finite listing ends).
    pub fn control(&self, json_line: &str) -> Vec<Value> {
        let mut stream = UnixStream::connect(self.control_socket()).unwrap_or_else(|e| {
            panic!("cannot connect to {}: {e}", self.control_socket().display())
        });
        stream
            .set_read_timeout(Some(CONTROL_TIMEOUT))
            .expect("set a read timeout");
        stream
            .write_all(format!("{}\n", json_line.trim_end()).as_bytes())
            .expect("send the control request");
        let mut answers = Vec::new();
        for line in BufReader::new(stream).lines() {
            let line = line.expect("read a control answer line (within the timeout)");
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("control answer is not JSON ({e}): {line}"));
            let end = v["result"] == "end";
            answers.push(v);
            if end {
                break;
            }
        }
        answers
    }

    /// The listener's counters (`accepted`, `garbage`, `oversized`, `rejected_sender`) from a
    /// raw `status` request.
    pub fn listener_counters(&self) -> Value {
        let answers = self.control(r#"{"op":"status"}"#);
        let status = answers
            .into_iter()
            .find(|a| a["result"] == "status")
            .expect("watchd answers status with a status line");
        status["listener"].clone()
    }

    /// SIGKILL to watchd itself (its services keep running) and reaps it.
    pub fn kill9(&mut self) {
        // Remember the services' pids first: after this nobody can tell us.
        let _ = self.status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a new watchd on the same configuration (after [`Watchd::kill9`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() needs kill9() first");
        self.launch();
    }

    /// Sends `sig` to watchd.
    pub fn signal_watchd(&self, sig: nix::sys::signal::Signal) {
        signal(self.watchd_pid(), sig);
    }

    fn print_diagnostics(&self) {
        eprintln!(
            "===== watchd test `{}` failed: diagnostics =====",
            self.label
        );
        eprintln!("{}", tail(&self.log_text(), LOG_TAIL_ON_FAILURE * 2));
        if self.child.is_some() {
            eprintln!("--- events ---\n{}", self.events_text(None));
        }
        if let Ok(dir) = std::fs::read_dir(self.data_dir.join("logs")) {
            for entry in dir.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                eprintln!(
                    "--- service log {} ---\n{}",
                    entry.path().display(),
                    tail(&text, LOG_TAIL_ON_FAILURE)
                );
            }
        }
        eprintln!("===== end of diagnostics =====");
    }

    fn stop_watchd(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills every process of this watchd's services (by recorded pid, by environment, by
    /// cgroup) and removes the service cgroups.
    fn sweep(&self) {
        let pids = self
            .pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (pid, started) in &pids {
            kill_if_same(*pid, *started);
        }
        let socket = self.ft_socket().display().to_string();
        for pid in pids_with_env("FT_SOCKET", &socket) {
            kill_if_same(pid, start_time(pid));
        }
        let Some(mount) = cgroup2_mount() else { return };
        let mut dirs: BTreeSet<PathBuf> = self
            .cgroups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|cg| mount.join(cg.trim_start_matches('/')))
            .collect();
        let instance = format!("ftkit-{}", instance_name(&self.data_dir));
        let own = cgroup_of(std::process::id()).unwrap_or_default();
        let instance_dir = mount.join(own.trim_start_matches('/')).join(&instance);
        if let Ok(entries) = std::fs::read_dir(&instance_dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path()),
            );
        }
        for dir in &dirs {
            kill_cgroup(dir);
        }
        let deadline = Instant::now() + CLEANUP_WAIT;
        for dir in dirs.iter().chain(std::iter::once(&instance_dir)) {
            while dir.exists() && std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                kill_cgroup(dir);
                std::thread::sleep(POLL);
            }
        }
        // Cgroups seen under other instance directories' parents are left alone: they are not
        // ours. Our instance directory's parent is the test's own cgroup.
        for (pid, started) in &pids {
            let deadline = Instant::now() + CLEANUP_WAIT;
            while pid_alive(*pid) && start_time(*pid) == *started && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
        }
    }
}

impl Drop for Watchd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_diagnostics();
        }
        self.stop_watchd();
        self.sweep();
    }
}

/// Kills every process in a cgroup directory (`cgroup.kill`, else each pid in `cgroup.procs`).
fn kill_cgroup(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            kill_if_same(pid, None);
        }
    }
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Parses one JSON value per non-empty line.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// The `pid` of a status object, when it has one.
pub fn pid_of(status: &Value) -> Option<u32> {
    status["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

/// Sends one datagram to a Unix datagram socket from this (unsupervised) process.
pub fn send_datagram(path: &Path, bytes: &[u8]) {
    let sock = UnixDatagram::unbound().expect("create a datagram socket");
    sock.send_to(bytes, path)
        .unwrap_or_else(|e| panic!("send {} bytes to {}: {e}", bytes.len(), path.display()));
}

/// Reads a whole file, or an empty string when it does not exist (yet).
pub fn read_or_empty(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Signal flags for the helper programs

/// One flag per signal number (Linux has 64 signals, numbered from 1).
static SIGNAL_FLAGS: [AtomicBool; 65] = [const { AtomicBool::new(false) }; 65];

extern "C" fn raise_signal_flag(sig: libc::c_int) {
    if let Some(flag) = usize::try_from(sig).ok().and_then(|i| SIGNAL_FLAGS.get(i)) {
        flag.store(true, Ordering::SeqCst);
    }
}

/// Installs a handler for `sig` that only raises a flag, and returns the flag. Used by the
/// helper programs (SIGUSR2 = "misbehave now").
pub fn signal_flag(sig: libc::c_int) -> &'static AtomicBool {
    let flag = usize::try_from(sig)
        .ok()
        .and_then(|i| SIGNAL_FLAGS.get(i))
        .expect("a signal number between 1 and 64");
    // SAFETY: `action` is zeroed, its mask emptied and its handler set before sigaction reads
    // it; the handler only stores to a static atomic, which is async-signal-safe.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = raise_signal_flag as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(sig, &action, std::ptr::null_mut())
    };
    assert_eq!(
        rc,
        0,
        "sigaction({sig}): {}",
        std::io::Error::last_os_error()
    );
    flag
}

/// Prints one line to stdout prefixed with the program name and pid, and flushes (stdout is a
/// log file under watchd, which would otherwise buffer it).
pub fn say(program: &str, text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{program}[{}]: {text}", std::process::id());
    let _ = out.flush();
}

/// Parses `--name value` pairs of a helper program; unknown flags are an error.
pub fn helper_args(known: &[&str]) -> BTreeMap<String, String> {
    let mut args = std::env::args().skip(1);
    let mut map = BTreeMap::new();
    while let Some(flag) = args.next() {
        let name = flag.trim_start_matches("--").to_owned();
        assert!(
            known.contains(&name.as_str()),
            "unknown option {flag} (known: {known:?})"
        );
        let value = args.next().unwrap_or_default();
        map.insert(name, value);
    }
    map
}

/// A numeric helper argument with a default.
pub fn arg_u64(args: &BTreeMap<String, String>, name: &str, default: u64) -> u64 {
    args.get(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("--{name}: {v:?} is not a number"))
    })
}

/// Compiles `examples/c/<source>` with `cc` against `libft/include/ft.h` and the built
/// `libft.so` (with an rpath, so it runs without LD_LIBRARY_PATH), into a scratch directory
/// that lives as long as the returned `Scratch`. Panics with cc's output when it fails.
pub fn build_c_example(source: &str, exe_name: &str) -> (Scratch, PathBuf) {
    let build = Scratch::new("cc");
    let exe = build.file(exe_name);
    let root = repo_root();
    let lib_dir = libft_so()
        .parent()
        .expect("libft.so lives in a directory")
        .to_owned();
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(root.join("libft/include"))
        .arg(root.join("examples/c").join(source))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lft")
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc {source} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (build, exe)
}
