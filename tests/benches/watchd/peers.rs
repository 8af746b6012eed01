//! The three supervisors under test: watchd, supervisord and runit (runsvdir + runsv), each run
//! privately in the benchmark's scratch directory with a generated configuration.
//!
//! Owns the configurations (the settings that matter are written here, once) and starting and
//! stopping each supervisor. It never touches a system-wide instance of any of them.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::harness;

/// How long a supervisor may take to stop its services and exit after SIGTERM / SIGHUP.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long watchd may take to answer on its control socket after it was started.
const CONTROL_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of a supervisor's own output shown when it fails.
const OUTPUT_TAIL: usize = 2000;

/// The restart settings every watchd service of the benchmark uses. `stable_after` is shorter
/// than the benchmark's spacing between two faults, so every restart is an immediate first
/// restart; the budget is large enough never to be exhausted by the benchmark.
pub const WATCHD_RESTART: &str = r#"{ policy = "always", immediate_first = true, stable_after = "100ms", max_restarts = 1000000, window = "60s" }"#;
/// watchd's stop grace (the program dies on SIGTERM at once anyway).
pub const WATCHD_STOP: &str = r#"{ grace = "1s" }"#;
/// supervisord's settings per program; everything else is supervisord's default.
pub const SUPERVISORD_PROGRAM: &str =
    "autostart=true\nautorestart=true\nstartsecs=0\nstopsignal=TERM\nstopwaitsecs=1\n";
/// supervisord's daemon settings: enough descriptors for 1000 programs' pipes and log files.
pub const SUPERVISORD_DAEMON: &str = "nodaemon=true\nminfds=8192\nminprocs=4096\n";

/// Which supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Watchd,
    Supervisord,
    Runit,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Watchd, Kind::Supervisord, Kind::Runit];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Watchd => "watchd",
            Kind::Supervisord => "supervisord",
            Kind::Runit => "runit",
        }
    }
}

/// Where everything is.
#[derive(Debug, Clone)]
pub struct Paths {
    /// target/release (watchd, ftctl, libft.so).
    pub bin_dir: PathBuf,
    /// The benchmark's scratch directory (removed at the end).
    pub scratch: PathBuf,
    /// The compiled supervised program.
    pub program: PathBuf,
    /// The socket it reports to.
    pub report_socket: PathBuf,
}

impl Paths {
    pub fn watchd(&self) -> PathBuf {
        self.bin_dir.join("watchd")
    }
    pub fn ftctl(&self) -> PathBuf {
        self.bin_dir.join("ftctl")
    }
}

/// One supervised service: a name and the program's arguments after the report socket.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub args: Vec<String>,
}

impl Service {
    pub fn new(name: impl Into<String>, args: &[&str]) -> Service {
        Service {
            name: name.into(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// A running supervisor. Dropping it stops it and kills whatever it left behind.
#[derive(Debug)]
pub struct Running {
    pub kind: Kind,
    child: Child,
    dir: PathBuf,
    output: PathBuf,
    /// watchd only: its control socket.
    pub control_socket: Option<PathBuf>,
    /// watchd only: the cgroup directory it made for its services (seen through a service).
    cgroup_dir: Option<PathBuf>,
    stopped: bool,
}

/// The configuration text watchd gets for `services`.
pub fn watchd_config(
    paths: &Paths,
    data_dir: &Path,
    services: &[Service],
    cgroups: bool,
) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "[watchd]\ndata_dir = {:?}\nnode = \"bench\"\ncgroups = {cgroups}\n",
        data_dir.display().to_string()
    );
    for s in services {
        let mut args = vec![paths.report_socket.display().to_string()];
        args.extend(s.args.iter().cloned());
        let _ = writeln!(
            c,
            "[[service]]\nname = {:?}\ncommand = {:?}\nargs = {:?}\nrestart = {WATCHD_RESTART}\nstop = {WATCHD_STOP}\nhang = {{ heartbeat = true }}\n",
            s.name,
            paths.program.display().to_string(),
            args
        );
    }
    c
}

fn supervisord_config(paths: &Paths, dir: &Path, services: &[Service]) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "[supervisord]\n{SUPERVISORD_DAEMON}logfile={}\npidfile={}\nchildlogdir={}\n",
        dir.join("supervisord.log").display(),
        dir.join("supervisord.pid").display(),
        dir.join("logs").display()
    );
    for s in services {
        let _ = writeln!(
            c,
            "[program:{}]\ncommand={} {} {}\n{SUPERVISORD_PROGRAM}",
            s.name,
            paths.program.display(),
            paths.report_socket.display(),
            s.args.join(" ")
        );
    }
    c
}

/// A supervisor process in its own process group (so the terminal's Ctrl-C reaches only the
/// benchmark, which then stops it in order), without any ftkit variable of the caller.
fn command(program: &Path, output: &Path) -> Result<Command> {
    let out = fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    for var in [
        "FT_SOCKET",
        "NOTIFY_SOCKET",
        "FT_SERVICE",
        "FT_NODE",
        "FT_ROLE",
        "FT_CKPT_DIR",
        "WATCHDOG_USEC",
    ] {
        cmd.env_remove(var);
    }
    Ok(cmd)
}

impl Running {
    /// Starts `kind` supervising `services`, in `<scratch>/<tag>-<kind>/`.
    pub fn start(kind: Kind, paths: &Paths, tag: &str, services: &[Service]) -> Result<Running> {
        Running::start_with(kind, paths, tag, services, true)
    }

    /// Like [`Running::start`]; `watchd_cgroups` is watchd's `[watchd] cgroups` setting.
    pub fn start_with(
        kind: Kind,
        paths: &Paths,
        tag: &str,
        services: &[Service],
        watchd_cgroups: bool,
    ) -> Result<Running> {
        let dir = paths.scratch.join(format!("{tag}-{}", kind.name()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let output = dir.join("supervisor.out");
        let (child, control_socket) = match kind {
            Kind::Watchd => {
                let data_dir = dir.join("data");
                let config = dir.join("watchd.toml");
                fs::write(
                    &config,
                    watchd_config(paths, &data_dir, services, watchd_cgroups),
                )?;
                let child = command(&paths.watchd(), &output)?
                    .arg("--config")
                    .arg(&config)
                    .spawn()
                    .with_context(|| format!("starting {}", paths.watchd().display()))?;
                (child, Some(data_dir.join("control.sock")))
            }
            Kind::Supervisord => {
                fs::create_dir_all(dir.join("logs"))?;
                let config = dir.join("supervisord.conf");
                fs::write(&config, supervisord_config(paths, &dir, services))?;
                let child = command(Path::new("supervisord"), &output)?
                    .arg("--nodaemon")
                    .arg("--configuration")
                    .arg(&config)
                    .spawn()
                    .context("starting supervisord (run .ci/install-bench-peers)")?;
                (child, None)
            }
            Kind::Runit => {
                let service_dir = dir.join("service");
                for s in services {
                    let sdir = service_dir.join(&s.name);
                    fs::create_dir_all(&sdir)?;
                    let run = sdir.join("run");
                    fs::write(
                        &run,
                        format!(
                            "#!/bin/sh\nexec {} {} {}\n",
                            paths.program.display(),
                            paths.report_socket.display(),
                            s.args.join(" ")
                        ),
                    )?;
                    fs::set_permissions(&run, fs::Permissions::from_mode(0o755))?;
                }
                let child = command(Path::new("runsvdir"), &output)?
                    .arg(&service_dir)
                    .spawn()
                    .context("starting runsvdir (run .ci/install-bench-peers)")?;
                (child, None)
            }
        };
        let mut running = Running {
            kind,
            child,
            dir,
            output,
            control_socket,
            cgroup_dir: None,
            stopped: false,
        };
        if let Some(socket) = running.control_socket.clone() {
            running.wait_for_control(&socket)?;
        }
        Ok(running)
    }

    fn wait_for_control(&mut self, socket: &Path) -> Result<()> {
        let end = Instant::now() + CONTROL_UP_TIMEOUT;
        loop {
            harness::check_interrupted()?;
            self.check_alive()?;
            if harness::control(socket, &serde_json::json!({"op": "status"})).is_ok() {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!("watchd did not answer on {} in time", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails (with the tail of its output) when the supervisor has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its output ends with:\n{}",
                self.kind.name(),
                self.output_tail()
            );
        }
        Ok(())
    }

    pub fn output_tail(&self) -> String {
        let text = fs::read_to_string(&self.output).unwrap_or_default();
        let mut extra = String::new();
        if self.kind == Kind::Supervisord {
            extra = fs::read_to_string(self.dir.join("supervisord.log")).unwrap_or_default();
        }
        let all = format!("{text}{extra}");
        let start = all.len().saturating_sub(OUTPUT_TAIL);
        let start = (start..all.len())
            .find(|i| all.is_char_boundary(*i))
            .unwrap_or(all.len());
        all[start..].to_owned()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit in i32")
    }

    /// The processes whose CPU and memory count as the supervisor's: watchd or supervisord
    /// alone; for runit, runsvdir and every runsv below it.
    pub fn accounted_pids(&self) -> Vec<i32> {
        let root = self.pid();
        let mut pids = vec![root];
        if self.kind == Kind::Runit {
            let table = harness::process_table();
            pids.extend(
                harness::descendants_of(&table, root)
                    .into_iter()
                    .filter(|p| table.get(p).is_some_and(|e| e.comm == "runsv")),
            );
        }
        pids
    }

    /// Remembers the cgroup watchd gave the service process `pid` (its parent directory is
    /// watchd's per-data-dir cgroup), so that leftovers can be reported after watchd exits.
    pub fn note_service(&mut self, pid: i32) {
        if self.kind != Kind::Watchd || self.cgroup_dir.is_some() {
            return;
        }
        let Some(mount) = cgroup2_mount() else { return };
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return;
        };
        let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
            return;
        };
        let service_dir = mount.join(path.trim_start_matches('/'));
        if let Some(parent) = service_dir.parent()
            && parent
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ftkit-"))
        {
            self.cgroup_dir = Some(parent.to_path_buf());
        }
    }

    /// watchd's `status` answer.
    pub fn status(&self) -> Result<serde_json::Value> {
        let socket = self
            .control_socket
            .as_ref()
            .context("only watchd has a control socket")?;
        harness::control(socket, &serde_json::json!({"op": "status"}))
    }

    /// watchd only: how many events of each kind it recorded, except the routine ones of a
    /// start (spawned, ready, reloaded), as "kind N, kind N".
    pub fn unusual_events(&self) -> Result<String> {
        let socket = self
            .control_socket
            .as_ref()
            .context("only watchd has a control socket")?;
        let events = harness::control_lines(
            socket,
            &serde_json::json!({"op": "events", "follow": false, "last": null}),
        )?;
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for e in events {
            let kind = e["kind"].as_str().unwrap_or("?").to_owned();
            if !matches!(kind.as_str(), "spawned" | "ready" | "reloaded") {
                *counts.entry(kind).or_default() += 1;
            }
        }
        Ok(counts
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// watchd only: lines of the services' captured output that contain `needle`.
    pub fn service_log_lines(&self, needle: &str) -> usize {
        let Ok(entries) = fs::read_dir(self.dir.join("data").join("logs")) else {
            return 0;
        };
        entries
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .map(|text| text.lines().filter(|l| l.contains(needle)).count())
            .sum()
    }

    /// Stops the supervisor the way its operator would (watchd, supervisord: SIGTERM; runsvdir:
    /// SIGHUP, which makes every runsv stop), waits for it, then kills whatever is left below
    /// the benchmark.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let sig = match self.kind {
            Kind::Watchd | Kind::Supervisord => Signal::SIGTERM,
            Kind::Runit => Signal::SIGHUP,
        };
        let pid = Pid::from_raw(self.pid());
        let mut result = Ok(());
        if self.child.try_wait()?.is_none() {
            let _ = signal::kill(pid, sig);
            let end = Instant::now() + STOP_TIMEOUT;
            loop {
                if self.child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() >= end {
                    result = Err(anyhow::anyhow!(
                        "{} did not exit within {STOP_TIMEOUT:?} of {sig}",
                        self.kind.name()
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        harness::sweep();
        if let Some(dir) = &self.cgroup_dir
            && dir.exists()
        {
            eprintln!(
                "bench: watchd left its cgroup {} behind; removing the empty directories",
                dir.display()
            );
            remove_empty_cgroups(dir);
        }
        result
    }
}

/// Where cgroup v2 is mounted (from /proc/self/mountinfo).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// rmdir of a cgroup subtree, leaves first (only empty cgroups can be removed).
fn remove_empty_cgroups(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_cgroups(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("bench: stopping {}: {e:#}", self.kind.name());
        }
    }
}
