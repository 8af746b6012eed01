//! watchd's configuration: the TOML file an operator writes.
//!
//! Owns parsing and validation. Unknown fields are refused, and every error names the file, the
//! line and the field. Defaults live here, once, as named constants. Nothing in this module
//! touches processes or sockets.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

pub mod cluster;

pub use cluster::{ClusterConfig, FilesetConfig, FilesetMode, NodeConfig};

/// Where watchd keeps its registry, sockets and logs unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ftkit";
/// Time between SIGTERM and SIGKILL when stopping a service.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// First backoff delay after the immediate first restart.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// The cap on backoff delays.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Growth factor of backoff delays.
pub const DEFAULT_BACKOFF_FACTOR: f64 = 2.0;
/// Fraction of a backoff delay added or removed at random.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Running this long without failing resets the backoff.
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(10);
/// Restart budget: at most this many restarts ...
pub const DEFAULT_MAX_RESTARTS: u32 = 5;
/// ... within this window.
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long a service that promised READY may take to say it.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Probe defaults.
pub const DEFAULT_PROBE_PERIOD: Duration = Duration::from_secs(1);
/// Probe defaults.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Probe defaults.
pub const DEFAULT_PROBE_FAILURES: u32 = 3;
/// How often RSS is sampled when a memory limit is configured.
pub const DEFAULT_RSS_CHECK: Duration = Duration::from_secs(5);
/// Size at which a service's captured output is rotated.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated log files kept per service.
pub const DEFAULT_LOG_KEEP: u32 = 3;
/// Events kept in memory for `ftctl events`.
pub const DEFAULT_EVENTS_KEEP: usize = 10_000;
/// Good checkpoints kept per stream.
pub const DEFAULT_CKPT_KEEP: u32 = 3;
/// A full checkpoint image after this many incremental ones.
pub const DEFAULT_CKPT_FULL_EVERY: u32 = 8;
/// Shortest period of transparent checkpoints: each one stops the service for its dump.
pub const MIN_TRANSPARENT_EVERY: Duration = Duration::from_millis(100);
/// Longest heartbeat timeout an application may ask for.
pub const MAX_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A configuration error, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field (dotted path) the error is about, when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Daemon-wide settings.
    #[serde(default)]
    pub watchd: WatchdConfig,
    /// The supervised programs.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// This node's place among the hosts (needed by anything that spans hosts).
    pub cluster: Option<ClusterConfig>,
    /// The other hosts.
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeConfig>,
    /// Replicated directories.
    #[serde(default, rename = "fileset")]
    pub filesets: Vec<FilesetConfig>,
}

/// The `[watchd]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdConfig {
    /// Registry, sockets and logs live here.
    pub data_dir: PathBuf,
    /// This node's name (`FT_NODE`); the host name when absent.
    pub node: Option<String>,
    /// Put each service in its own cgroup v2 when the host has one.
    pub cgroups: bool,
    /// Rotate a service's captured output at this size.
    pub log_max_bytes: ByteSize,
    /// Rotated output files kept per service.
    pub log_keep: u32,
    /// Events kept in memory.
    pub events_keep: usize,
    /// Where the operation rings of filesets live (shared memory).
    pub ring_dir: PathBuf,
    /// The LD_PRELOAD shim for services with `repl_shim = true`; by default `libftrepl.so`
    /// next to the watchd executable.
    pub repl_shim: Option<PathBuf>,
}

impl Default for WatchdConfig {
    fn default() -> Self {
        WatchdConfig {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            node: None,
            cgroups: true,
            log_max_bytes: ByteSize(DEFAULT_LOG_MAX_BYTES),
            log_keep: DEFAULT_LOG_KEEP,
            events_keep: DEFAULT_EVENTS_KEEP,
            ring_dir: PathBuf::from(cluster::DEFAULT_RING_DIR),
            repl_shim: None,
        }
    }
}

/// One `[[service]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name (`FT_SERVICE`).
    pub name: Spanned<String>,
    /// Program to run: a path, or a name looked up in `PATH`.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Run as this user (name or uid); watchd's own user when absent.
    pub user: Option<String>,
    /// Start when watchd starts.
    #[serde(default = "yes")]
    pub autostart: bool,
    /// When the service counts as started.
    #[serde(default)]
    pub ready: ReadyConfig,
    /// How it is stopped.
    #[serde(default)]
    pub stop: StopConfig,
    /// Restart policy, backoff and budget.
    #[serde(default)]
    pub restart: RestartConfig,
    /// Hang detection by heartbeats and sd_notify watchdog.
    #[serde(default)]
    pub hang: HangConfig,
    /// Probes for programs that speak neither libft nor sd_notify.
    #[serde(default, rename = "probe")]
    pub probes: Vec<ProbeConfig>,
    /// Proactive restarts before the service fails.
    #[serde(default)]
    pub rejuvenate: RejuvenateConfig,
    /// Command run when the service exceeds its restart budget (argv).
    #[serde(default)]
    pub on_escalate: Vec<String>,
    /// Checkpoints: of critical memory taken by libft in the service, or (`transparent`) of
    /// the whole process taken by watchd.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Where a crashed or hung service comes back from.
    #[serde(default)]
    pub restart_from: RestartFrom,
    /// Filesets whose files the service changes: it gets `FT_REPL_FILESETS`, so libft's file
    /// API (and the shim) log its changes for replication.
    #[serde(default)]
    pub filesets: Vec<String>,
    /// Preload the replication shim (`LD_PRELOAD`), for programs that do not use libft.
    #[serde(default)]
    pub repl_shim: bool,
}

/// `[service.checkpoint]`. Without `transparent`: passed to the service's libft through its
/// environment (`FT_CKPT_EVERY`, `FT_CKPT_KEEP`, `FT_CKPT_FULL_EVERY`); images go to
/// `FT_CKPT_DIR`. With `transparent = true`: watchd itself dumps the whole process
/// (`ckpt::proc`) every `every` into `<data_dir>/ckpt/<service>/transparent`, and libft is
/// told nothing of a period.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoint the unmodified process from outside (ptrace) instead of asking libft.
    pub transparent: bool,
    /// Take a checkpoint this often (libft: at the application's next safe point;
    /// transparent: whenever the period is up). None: only on request (`ftctl checkpoint`).
    #[serde(with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Good checkpoints kept.
    pub keep: u32,
    /// A full image after this many incremental ones.
    pub full_every: u32,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            transparent: false,
            every: None,
            keep: DEFAULT_CKPT_KEEP,
            full_every: DEFAULT_CKPT_FULL_EVERY,
        }
    }
}

/// `restart_from`: what a restart after a crash or a hang verdict starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartFrom {
    /// Run the command again.
    #[default]
    Scratch,
    /// Restore the newest good transparent checkpoint (the command runs only when there is
    /// none or the restore fails). Operator starts, restarts and rejuvenation still start
    /// from scratch.
    Checkpoint,
}

fn yes() -> bool {
    true
}

impl ServiceConfig {
    /// The service's name.
    pub fn name(&self) -> &str {
        self.name.get_ref()
    }
}

/// `[service.ready]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadyConfig {
    /// The service says READY (libft `ft_ready` or sd_notify `READY=1`); until it does it is
    /// `starting`.
    pub notify: bool,
    /// With `notify`, how long it may take; without it, the service counts as started after
    /// this long (and `delay` is used).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Without `notify`: running this long counts as started.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
}

impl Default for ReadyConfig {
    fn default() -> Self {
        ReadyConfig {
            notify: false,
            timeout: DEFAULT_READY_TIMEOUT,
            delay: Duration::ZERO,
        }
    }
}

/// `[service.stop]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StopConfig {
    /// Time between SIGTERM and SIGKILL.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for StopConfig {
    fn default() -> Self {
        StopConfig {
            grace: DEFAULT_STOP_GRACE,
        }
    }
}

/// When a service that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status.
    Always,
    /// Unless it exited with status 0 (a hang verdict is a failure).
    OnFailure,
    /// Never: an ended service stays stopped (or failed).
    Never,
}

/// `[service.restart]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// When to restart.
    pub policy: RestartPolicy,
    /// The first restart after a stable run happens at once; later ones back off.
    pub immediate_first: bool,
    /// The first backoff delay.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// The cap on backoff delays.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Growth factor of backoff delays (≥ 1).
    pub backoff_factor: f64,
    /// Fraction of each delay randomly added or removed (0 ≤ jitter < 1).
    pub jitter: f64,
    /// Running this long resets the backoff.
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
    /// Restart budget: more than `max_restarts` within `window` marks the service failed and
    /// escalates.
    pub max_restarts: u32,
    /// The budget's window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            policy: RestartPolicy::OnFailure,
            immediate_first: true,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            backoff_factor: DEFAULT_BACKOFF_FACTOR,
            jitter: DEFAULT_JITTER,
            stable_after: DEFAULT_STABLE_AFTER,
            max_restarts: DEFAULT_MAX_RESTARTS,
            window: DEFAULT_RESTART_WINDOW,
        }
    }
}

/// `[service.hang]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HangConfig {
    /// Honour libft heartbeats (FtHbeat semantics).
    pub heartbeat: bool,
    /// sd_notify watchdog: the service must send `WATCHDOG=1` at least this often
    /// (`WATCHDOG_USEC` is passed to it). Off when absent.
    #[serde(default, with = "humantime_serde")]
    pub watchdog: Option<Duration>,
}

impl Default for HangConfig {
    fn default() -> Self {
        HangConfig {
            heartbeat: true,
            watchdog: None,
        }
    }
}

/// What a probe checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// A TCP connect to `address` succeeds.
    Tcp,
    /// An HTTP GET of `url` answers 2xx or 3xx.
    Http,
    /// `command` exits with status 0.
    Exec,
}

/// One `[[service.probe]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// What it checks.
    pub kind: Spanned<ProbeKind>,
    /// `tcp`: host:port.
    pub address: Option<String>,
    /// `http`: an `http://` URL.
    pub url: Option<String>,
    /// `exec`: argv.
    pub command: Option<Vec<String>>,
    /// Time between checks.
    #[serde(default = "default_probe_period", with = "humantime_serde")]
    pub period: Duration,
    /// Time a check may take.
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures that make a hang verdict.
    #[serde(default = "default_probe_failures")]
    pub failures: u32,
    /// Wait this long after the service started before the first check.
    #[serde(default, with = "humantime_serde")]
    pub initial_delay: Duration,
}

fn default_probe_period() -> Duration {
    DEFAULT_PROBE_PERIOD
}
fn default_probe_timeout() -> Duration {
    DEFAULT_PROBE_TIMEOUT
}
fn default_probe_failures() -> u32 {
    DEFAULT_PROBE_FAILURES
}

/// `[service.rejuvenate]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RejuvenateConfig {
    /// Restart when the resident memory of the service's processes passes this.
    pub max_rss: Option<ByteSize>,
    /// Restart after running this long.
    #[serde(with = "humantime_serde")]
    pub every: Option<Duration>,
    /// How often RSS is sampled.
    #[serde(with = "humantime_serde")]
    pub check_every: Duration,
}

impl Default for RejuvenateConfig {
    fn default() -> Self {
        RejuvenateConfig {
            max_rss: None,
            every: None,
            check_every: DEFAULT_RSS_CHECK,
        }
    }
}

/// A size in bytes, written as an integer or as `"256MiB"`, `"10MB"`, `"4k"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"256MiB"`-style sizes.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => return Err(format!("unknown size unit `{other}` in `{s}`")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        let mut config = Config::parse(path, &text)?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_owned());
        config.resolve_paths(&base);
        Ok(config)
    }

    /// Makes relative paths relative to `base` (the configuration file's directory): the data
    /// directory, working directories, and commands that contain a `/`. Bare command names are
    /// left for a `PATH` lookup.
    pub fn resolve_paths(&mut self, base: &Path) {
        if self.watchd.data_dir.is_relative() {
            self.watchd.data_dir = base.join(&self.watchd.data_dir);
        }
        if self.watchd.ring_dir.is_relative() {
            self.watchd.ring_dir = base.join(&self.watchd.ring_dir);
        }
        if let Some(shim) = &mut self.watchd.repl_shim
            && shim.is_relative()
        {
            *shim = base.join(&*shim);
        }
        if let Some(c) = &mut self.cluster {
            if c.secret_file.is_relative() {
                c.secret_file = base.join(&c.secret_file);
            }
            if let Some(disk) = &mut c.quorum_disk
                && disk.is_relative()
            {
                *disk = base.join(&*disk);
            }
        }
        for f in &mut self.filesets {
            if f.path.is_relative() {
                f.path = base.join(&f.path);
            }
        }
        for s in &mut self.services {
            if s.command.contains('/') && Path::new(&s.command).is_relative() {
                s.command = base.join(&s.command).display().to_string();
            }
            if let Some(cwd) = &mut s.cwd
                && cwd.is_relative()
            {
                *cwd = base.join(&*cwd);
            }
        }
    }

    /// Parses and validates configuration text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let field = field_of_message(e.message())
                .or_else(|| e.span().and_then(|s| key_before(text, s.start)));
            ConfigError {
                file: path.to_owned(),
                line,
                field,
                message: e.message().trim().to_owned(),
            }
        })?;
        config
            .validate()
            .map_err(|(offset, field, message)| ConfigError {
                file: path.to_owned(),
                line: offset.map(|o| line_of(text, o)),
                field: Some(field),
                message,
            })?;
        Ok(config)
    }

    /// Checks what the types cannot: unique names, present per-kind probe fields, sane numbers.
    /// Returns (byte offset, field, message) of the first problem.
    fn validate(&self) -> Result<(), (Option<usize>, String, String)> {
        if let Some(c) = &self.cluster
            && self.watchd.node.is_none()
        {
            return Err((
                Some(c.name.span().start),
                "watchd.node".into(),
                "a node of a cluster needs an explicit `node` name in [watchd]".into(),
            ));
        }
        cluster::validate(
            &self.node_name(),
            self.cluster.as_ref(),
            &self.nodes,
            &self.filesets,
        )?;
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = Some(s.name.span().start);
            let field = |f: &str| format!("service[{i}].{f}");
            let name = s.name();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || name.starts_with('.')
            {
                return Err((
                    at,
                    field("name"),
                    format!(
                        "`{name}` is not a valid service name (1-64 of A-Z a-z 0-9 - _ ., not starting with .)"
                    ),
                ));
            }
            if !seen.insert(name.to_owned()) {
                return Err((
                    at,
                    field("name"),
                    format!("service `{name}` is defined twice"),
                ));
            }
            if s.command.is_empty() {
                return Err((at, field("command"), "must not be empty".into()));
            }
            let r = &s.restart;
            if !(r.backoff_factor >= 1.0 && r.backoff_factor.is_finite()) {
                return Err((
                    at,
                    field("restart.backoff_factor"),
                    "must be a number ≥ 1".into(),
                ));
            }
            if !(0.0..1.0).contains(&r.jitter) {
                return Err((at, field("restart.jitter"), "must be in [0, 1)".into()));
            }
            if r.backoff_max < r.backoff_initial {
                return Err((
                    at,
                    field("restart.backoff_max"),
                    "must not be smaller than restart.backoff_initial".into(),
                ));
            }
            if r.window.is_zero() {
                return Err((at, field("restart.window"), "must be longer than 0s".into()));
            }
            if s.hang
                .watchdog
                .is_some_and(|w| w < Duration::from_millis(10))
            {
                return Err((at, field("hang.watchdog"), "must be at least 10ms".into()));
            }
            if s.rejuvenate.check_every < Duration::from_millis(10) {
                return Err((
                    at,
                    field("rejuvenate.check_every"),
                    "must be at least 10ms".into(),
                ));
            }
            if s.rejuvenate
                .every
                .is_some_and(|e| e < Duration::from_secs(1))
            {
                return Err((at, field("rejuvenate.every"), "must be at least 1s".into()));
            }
            if s.checkpoint
                .every
                .is_some_and(|e| e < Duration::from_millis(10))
            {
                return Err((
                    at,
                    field("checkpoint.every"),
                    "must be at least 10ms".into(),
                ));
            }
            for f in &s.filesets {
                if !self.filesets.iter().any(|x| x.name() == f) {
                    return Err((at, field("filesets"), format!("no [[fileset]] named `{f}`")));
                }
            }
            if s.checkpoint.keep == 0 {
                return Err((at, field("checkpoint.keep"), "must be at least 1".into()));
            }
            validate_transparent(s).map_err(|(f, message)| (at, field(f), message))?;
            for (j, p) in s.probes.iter().enumerate() {
                let pat = Some(p.kind.span().start);
                let pfield = |f: &str| format!("service[{i}].probe[{j}].{f}");
                let (needed, present) = match p.kind.get_ref() {
                    ProbeKind::Tcp => ("address", p.address.is_some()),
                    ProbeKind::Http => ("url", p.url.is_some()),
                    ProbeKind::Exec => {
                        ("command", p.command.as_ref().is_some_and(|c| !c.is_empty()))
                    }
                };
                if !present {
                    return Err((
                        pat,
                        pfield(needed),
                        format!("a {:?} probe needs `{needed}`", p.kind.get_ref()).to_lowercase(),
                    ));
                }
                if let Some(url) = &p.url
                    && crate::probe::parse_http_url(url).is_none()
                {
                    return Err((
                        pat,
                        pfield("url"),
                        format!("`{url}` is not an http://host:port/path URL"),
                    ));
                }
                if p.failures == 0 {
                    return Err((pat, pfield("failures"), "must be at least 1".into()));
                }
                if p.period.is_zero() || p.timeout.is_zero() {
                    return Err((
                        pat,
                        pfield("period"),
                        "period and timeout must be longer than 0s".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The node name: configured, or the host name.
    pub fn node_name(&self) -> String {
        self.watchd.node.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }

    /// The service with this name.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name() == name)
    }
}

/// The rules of transparent checkpoints and of restarts from them: (field, message).
fn validate_transparent(s: &ServiceConfig) -> Result<(), (&'static str, String)> {
    let c = &s.checkpoint;
    if c.transparent
        && let Some(every) = c.every
        && every < MIN_TRANSPARENT_EVERY
    {
        return Err((
            "checkpoint.every",
            format!(
                "transparent checkpoints stop the service for each dump: at least {} apart",
                humantime::format_duration(MIN_TRANSPARENT_EVERY)
            ),
        ));
    }
    if s.restart_from != RestartFrom::Checkpoint {
        return Ok(());
    }
    if !c.transparent {
        return Err((
            "restart_from",
            "restart_from = \"checkpoint\" needs transparent checkpoints \
             (checkpoint = { transparent = true, every = \"30s\" })"
                .into(),
        ));
    }
    if s.user.is_some() {
        return Err((
            "restart_from",
            "restart_from = \"checkpoint\" cannot be used with `user`: a restored process \
             keeps watchd's credentials"
                .into(),
        ));
    }
    if s.ready.notify {
        return Err((
            "restart_from",
            "restart_from = \"checkpoint\" cannot be used with ready.notify: a restored \
             process is past its READY and never says it again"
                .into(),
        ));
    }
    if s.repl_shim || !s.filesets.is_empty() {
        return Err((
            "restart_from",
            "restart_from = \"checkpoint\" cannot be used with replicated filesets: the \
             replication log would not go back with the process"
                .into(),
        ));
    }
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key whose value starts at `offset` (`key = value`), when the text shows one.
fn key_before(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?.trim_end().strip_suffix('=')?.trim_end();
    let start = before
        .rfind(|c: char| {
            !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' || c == '"')
        })
        .map_or(0, |i| i + 1);
    let key = before[start..].trim_matches('"');
    (!key.is_empty()).then(|| key.to_owned())
}

/// serde messages quote the field in backticks: "unknown field `x`", "missing field `y`".
fn field_of_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    let quoted = &message[start..start + len];
    (message.contains("field")).then(|| quoted.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn minimal_service_gets_defaults() {
        let c = parse("[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\n").expect("valid");
        assert_eq!(c.services.len(), 1);
        let s = &c.services[0];
        assert_eq!(s.name(), "a");
        assert_eq!(s.restart, RestartConfig::default());
        assert_eq!(s.stop.grace, DEFAULT_STOP_GRACE);
        assert!(s.autostart && s.hang.heartbeat && s.hang.watchdog.is_none());
        assert_eq!(c.watchd.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn full_service_parses() {
        let text = r#"
[watchd]
data_dir = "/tmp/x"
node = "n1"
log_max_bytes = "1MiB"

[[service]]
name = "web"
command = "/usr/bin/web"
args = ["-p", "8080"]
env = { RUST_LOG = "info" }
cwd = "/tmp"
on_escalate = ["/bin/echo", "escalated"]
restart = { policy = "always", backoff_initial = "50ms", backoff_max = "2s", max_restarts = 3, window = "10s" }
hang = { watchdog = "500ms" }
ready = { notify = true, timeout = "5s" }
rejuvenate = { max_rss = "256MiB", every = "24h" }

[[service.probe]]
kind = "http"
url = "http://127.0.0.1:8080/health"
period = "200ms"
failures = 2
"#;
        let c = parse(text).expect("valid");
        assert_eq!(c.watchd.log_max_bytes, ByteSize(1 << 20));
        let s = &c.services[0];
        assert_eq!(s.restart.policy, RestartPolicy::Always);
        assert_eq!(s.restart.backoff_initial, Duration::from_millis(50));
        assert_eq!(s.hang.watchdog, Some(Duration::from_millis(500)));
        assert_eq!(s.rejuvenate.max_rss, Some(ByteSize(256 << 20)));
        assert_eq!(s.probes[0].failures, 2);
        assert_eq!(*s.probes[0].kind.get_ref(), ProbeKind::Http);
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let e =
            parse("[[service]]\nname = \"a\"\ncommand = \"x\"\nrestrat = {}\n").expect_err("bad");
        assert_eq!(e.line, Some(4), "{e}");
        assert_eq!(e.field.as_deref(), Some("restrat"), "{e}");
        let shown = e.to_string();
        assert!(shown.starts_with("test.toml:4"), "{shown}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse("[[service]]\nname = \"a\"\n").expect_err("bad");
        assert_eq!(e.field.as_deref(), Some("command"), "{e}");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("restart = { policy = \"sometimes\" }", "policy"),
            ("restart = { jitter = 1.5 }", "service[0].restart.jitter"),
            (
                "restart = { backoff_factor = 0.5 }",
                "service[0].restart.backoff_factor",
            ),
            ("stop = { grace = \"soon\" }", "grace"),
            ("rejuvenate = { max_rss = \"12 parsecs\" }", "max_rss"),
        ];
        for (extra, field) in cases {
            let text = format!("[[service]]\nname = \"a\"\ncommand = \"x\"\n{extra}\n");
            let e = parse(&text).expect_err(extra);
            assert!(e.line.is_some(), "{extra}: {e}");
            let shown = e.to_string();
            assert!(
                e.field.as_deref() == Some(field) || shown.contains(field),
                "{extra}: expected field {field} in {shown}"
            );
        }
    }

    #[test]
    fn duplicate_and_invalid_names_are_refused() {
        let e = parse("[[service]]\nname = \"a\"\ncommand = \"x\"\n[[service]]\nname = \"a\"\ncommand = \"y\"\n")
            .expect_err("dup");
        assert_eq!(e.line, Some(5));
        assert!(e.message.contains("twice"));
        let e = parse("[[service]]\nname = \"../evil\"\ncommand = \"x\"\n").expect_err("bad name");
        assert_eq!(e.field.as_deref(), Some("service[0].name"));
    }

    #[test]
    fn probe_needs_its_target() {
        let e = parse(
            "[[service]]\nname = \"a\"\ncommand = \"x\"\n[[service.probe]]\nkind = \"tcp\"\n",
        )
        .expect_err("no address");
        assert_eq!(e.field.as_deref(), Some("service[0].probe[0].address"));
        assert_eq!(e.line, Some(5));
        let e = parse("[[service]]\nname = \"a\"\ncommand = \"x\"\n[[service.probe]]\nkind = \"http\"\nurl = \"ftp://x\"\n")
            .expect_err("bad url");
        assert_eq!(e.field.as_deref(), Some("service[0].probe[0].url"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in [
            "[[service]",
            "\u{0}\u{1}",
            "service = 3",
            "[watchd]\ndata_dir = 5",
            "= =",
        ] {
            assert!(parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut c = parse("[watchd]\ndata_dir = \"data\"\n[[service]]\nname = \"a\"\ncommand = \"../bin/a\"\ncwd = \"w\"\n[[service]]\nname = \"b\"\ncommand = \"sleep\"\n").expect("valid");
        c.resolve_paths(Path::new("/etc/ft"));
        assert_eq!(c.watchd.data_dir, PathBuf::from("/etc/ft/data"));
        assert_eq!(c.services[0].command, "/etc/ft/../bin/a");
        assert_eq!(c.services[0].cwd.as_deref(), Some(Path::new("/etc/ft/w")));
        assert_eq!(c.services[1].command, "sleep");
    }

    #[test]
    fn checkpoint_section() {
        let c = parse("[[service]]\nname = \"a\"\ncommand = \"x\"\ncheckpoint = { every = \"500ms\", keep = 5 }\n")
            .expect("valid");
        assert_eq!(
            c.services[0].checkpoint.every,
            Some(Duration::from_millis(500))
        );
        assert_eq!(c.services[0].checkpoint.keep, 5);
        assert_eq!(c.services[0].checkpoint.full_every, DEFAULT_CKPT_FULL_EVERY);
        let e = parse("[[service]]\nname = \"a\"\ncommand = \"x\"\ncheckpoint = { keep = 0 }\n")
            .expect_err("keep 0");
        assert_eq!(e.field.as_deref(), Some("service[0].checkpoint.keep"));
    }

    #[test]
    fn transparent_checkpoints_and_restart_from() {
        let base = "[[service]]\nname = \"a\"\ncommand = \"x\"\n";
        let c = parse(&format!(
            "{base}checkpoint = {{ transparent = true, every = \"200ms\", keep = 2 }}\nrestart_from = \"checkpoint\"\n"
        ))
        .expect("valid");
        let s = &c.services[0];
        assert!(s.checkpoint.transparent);
        assert_eq!(s.checkpoint.every, Some(Duration::from_millis(200)));
        assert_eq!(s.restart_from, RestartFrom::Checkpoint);
        let plain = parse(base).expect("valid");
        assert_eq!(plain.services[0].restart_from, RestartFrom::Scratch);
        assert!(!plain.services[0].checkpoint.transparent);

        let refused = [
            ("restart_from = \"checkpoint\"", "needs transparent"),
            (
                "checkpoint = { every = \"1s\" }\nrestart_from = \"checkpoint\"",
                "needs transparent",
            ),
            (
                "checkpoint = { transparent = true, every = \"50ms\" }",
                "100ms",
            ),
            (
                "checkpoint = { transparent = true }\nrestart_from = \"checkpoint\"\nuser = \"nobody\"",
                "credentials",
            ),
            (
                "checkpoint = { transparent = true }\nrestart_from = \"checkpoint\"\nready = { notify = true }",
                "READY",
            ),
            (
                "checkpoint = { transparent = true }\nrestart_from = \"checkpoint\"\nrepl_shim = true",
                "replicated",
            ),
        ];
        for (extra, expected) in refused {
            let e = parse(&format!("{base}{extra}\n")).expect_err(extra);
            assert!(e.message.contains(expected), "{extra}: {e}");
            assert_eq!(e.line, Some(2), "{extra}: {e}");
            let field = e.field.as_deref().unwrap_or_default();
            assert!(field.starts_with("service[0]."), "{extra}: {e}");
        }
        let e = parse(&format!("{base}restart_from = \"later\"\n")).expect_err("bad value");
        assert_eq!(e.line, Some(4), "{e}");
        // Transparent without a period: on request only.
        parse(&format!("{base}checkpoint = {{ transparent = true }}\n")).expect("valid");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("4k"), Ok(ByteSize(4000)));
        assert_eq!(ByteSize::parse("4KiB"), Ok(ByteSize(4096)));
        assert_eq!(ByteSize::parse("12"), Ok(ByteSize(12)));
        assert!(ByteSize::parse("99999999999999GiB").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }
}
