//! The shared vocabulary of resource agents: what a check reports ([`Health`]), how a call fails
//! ([`ResourceError`]), how long each call may take ([`Timeouts`]), the one [`Resource`] type the
//! executor drives whatever its kind, and the bounded way every agent runs a command
//! ([`run_bounded`]). It must never let an agent's command outlive its timeout, nor hold more
//! of a command's output than [`OUTPUT_TAIL`] bytes per stream.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use super::exec::ExecResource;
use super::fileset::{FilesetResource, Replicated};
use super::ip::IpResource;
use super::service::{ServiceCatalog, ServiceResource};
use crate::command::{GroupKill, exit_status};
use crate::machine::ExitStatus;

/// How long bringing a resource online may take by default (Pacemaker's default operation
/// timeout is 20 s; starting a service with its checkpoint may take longer).
pub const DEFAULT_ONLINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long taking a resource offline may take by default.
pub const DEFAULT_OFFLINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the cheap, frequent looks-alive check may take by default.
pub const DEFAULT_LOOKS_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the thorough is-alive check may take by default.
pub const DEFAULT_IS_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The most of each output stream (stdout, stderr) of a command that is kept: its last bytes,
/// which is where a failing program says why.
pub const OUTPUT_TAIL: usize = 4 * 1024;
/// How long the output pipes are still read after a command exited: a daemon it started in the
/// background may hold them open forever, and must not hold up the call.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(100);
/// How long a killed command may take to be reaped before it is left to tokio's orphan reaper
/// (a process in uninterruptible sleep cannot die at once).
pub const REAP_GRACE: Duration = Duration::from_secs(1);
/// The size of one read from a command's output pipe.
const READ_CHUNK: usize = 4 * 1024;

/// What a looks-alive or is-alive check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The resource is online and working.
    Online,
    /// The resource is cleanly offline (not running, address absent).
    Offline,
    /// The resource is there but broken (for a person: why).
    Failed(String),
}

impl Health {
    /// A check's verdict, counting a check that could not be done (timed out, agent failed) as
    /// a failed resource.
    pub fn of(check: Result<Health, ResourceError>) -> Health {
        check.unwrap_or_else(|e| Health::Failed(e.to_string()))
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Online => f.write_str("online"),
            Health::Offline => f.write_str("offline"),
            Health::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// The four calls the executor makes on a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Bring it online.
    Online,
    /// Take it offline.
    Offline,
    /// The cheap, frequent check.
    LooksAlive,
    /// The thorough check.
    IsAlive,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Online => "online",
            Action::Offline => "offline",
            Action::LooksAlive => "looks-alive",
            Action::IsAlive => "is-alive",
        })
    }
}

/// How long each call on one resource may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Bound of [`Resource::online`].
    pub online: Duration,
    /// Bound of [`Resource::offline`].
    pub offline: Duration,
    /// Bound of [`Resource::looks_alive`].
    pub looks_alive: Duration,
    /// Bound of [`Resource::is_alive`].
    pub is_alive: Duration,
}

impl Timeouts {
    /// The bound of `action`.
    pub fn of(&self, action: Action) -> Duration {
        match action {
            Action::Online => self.online,
            Action::Offline => self.offline,
            Action::LooksAlive => self.looks_alive,
            Action::IsAlive => self.is_alive,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            online: DEFAULT_ONLINE_TIMEOUT,
            offline: DEFAULT_OFFLINE_TIMEOUT,
            looks_alive: DEFAULT_LOOKS_ALIVE_TIMEOUT,
            is_alive: DEFAULT_IS_ALIVE_TIMEOUT,
        }
    }
}

/// Why a call on a resource failed.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The call took longer than its timeout (for a command: it was killed, with its group).
    #[error("{action} timed out after {}{}", humantime::format_duration(*.after), shown(.output))]
    Timeout {
        /// The call.
        action: Action,
        /// Its bound.
        after: Duration,
        /// The tail of what the command printed before it was killed, if anything.
        output: String,
    },
    /// An exec agent answered with a failure.
    #[error("agent {} {operation} failed with {status}{}{}", .agent.display(), meaning(.status), shown(.output))]
    AgentFailed {
        /// The agent's path.
        agent: PathBuf,
        /// `start`, `stop` or `monitor`.
        operation: &'static str,
        /// How it ended.
        status: ExitStatus,
        /// The tail of its stderr (or stdout when stderr was empty).
        output: String,
    },
    /// A program could not be started.
    #[error("cannot run {}: {source}", .program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A property is missing or invalid.
    #[error("property `{property}`: {why}")]
    BadProperty {
        /// The property.
        property: String,
        /// What is wrong with it.
        why: String,
    },
    /// The resource's kind is not one watchd knows.
    #[error("unknown resource kind `{0}` (known: {KNOWN_KINDS})")]
    UnknownKind(String),
    /// The network interface named by an `ip` resource does not exist.
    #[error("network interface `{0}` does not exist")]
    UnknownInterface(String),
    /// A helper command or a kernel request (netlink) answered something watchd cannot read.
    #[error("cannot read the answer of `{command}`: {why}")]
    BadAnswer {
        /// The command line, or the request.
        command: String,
        /// What is wrong with it.
        why: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
}

/// The kinds [`Resource::from_properties`] accepts, for error messages.
pub const KNOWN_KINDS: &str = "exec, ip, service, fileset, checkpoint";

/// `: OUTPUT` or nothing.
fn shown(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

/// ` (OCF_NAME: meaning)` of an OCF exit code, or nothing.
fn meaning(status: &ExitStatus) -> String {
    match status {
        ExitStatus::Code(code) => match ocf_meaning(*code) {
            Some((name, what)) => format!(" ({name}: {what})"),
            None => String::new(),
        },
        ExitStatus::Signal(_) | ExitStatus::Unknown => String::new(),
    }
}

/// The OCF name and meaning of an agent's exit code.
pub fn ocf_meaning(code: i32) -> Option<(&'static str, &'static str)> {
    Some(match code {
        0 => ("OCF_SUCCESS", "success"),
        1 => ("OCF_ERR_GENERIC", "generic error"),
        2 => ("OCF_ERR_ARGS", "invalid arguments"),
        3 => ("OCF_ERR_UNIMPLEMENTED", "action not implemented"),
        4 => ("OCF_ERR_PERM", "insufficient permissions"),
        5 => ("OCF_ERR_INSTALLED", "not installed"),
        6 => ("OCF_ERR_CONFIGURED", "not configured"),
        7 => ("OCF_NOT_RUNNING", "not running"),
        8 => ("OCF_RUNNING_MASTER", "running as primary"),
        9 => ("OCF_FAILED_MASTER", "failed as primary"),
        _ => return None,
    })
}

/// One resource of a group: its name, its bounds, and what kind of thing it is.
#[derive(Debug)]
pub struct Resource {
    name: String,
    timeouts: Timeouts,
    kind: ResourceKind,
}

/// The kinds of resource, each with its validated properties.
#[derive(Debug)]
pub enum ResourceKind {
    /// A custom resource type as an executable (OCF agent conventions).
    Exec(ExecResource),
    /// A virtual IP address on an interface.
    Ip(IpResource),
    /// A watchd service of this node.
    Service(ServiceResource),
    /// A group-managed replicated directory (`fileset`), or a service's checkpoint directory
    /// replicated in copy mode (`checkpoint`).
    Fileset(FilesetResource),
}

impl ResourceKind {
    /// The kind's name as configured (`exec`, `ip`, `service`).
    pub fn name(&self) -> &'static str {
        match self {
            ResourceKind::Exec(_) => "exec",
            ResourceKind::Ip(_) => "ip",
            ResourceKind::Service(_) => "service",
            ResourceKind::Fileset(r) => match r.replicated() {
                Replicated::Files => "fileset",
                Replicated::Checkpoints { .. } => "checkpoint",
            },
        }
    }
}

/// What building a resource may need of the running watchd (kinds that act through it).
#[derive(Debug, Clone)]
pub struct ResourceContext {
    /// The group the resource belongs to.
    pub group: String,
    /// This node's services, and the supervisor they run under (`service` resources).
    pub services: Option<(ServiceCatalog, std::sync::Arc<crate::supervisor::Shared>)>,
}

impl Resource {
    /// A resource of an already validated kind.
    pub fn new(name: impl Into<String>, timeouts: Timeouts, kind: ResourceKind) -> Resource {
        Resource {
            name: name.into(),
            timeouts,
            kind,
        }
    }

    /// Validates `properties` for `kind` (as stored in the cluster database) and builds the
    /// resource; a missing or bad property or an unknown kind is an error, never a panic.
    pub fn from_properties(
        name: &str,
        kind: &str,
        properties: &BTreeMap<String, String>,
        timeouts: Timeouts,
    ) -> Result<Resource, ResourceError> {
        let kind = match kind {
            "exec" => ResourceKind::Exec(ExecResource::from_properties(name, properties)?),
            "ip" => ResourceKind::Ip(IpResource::from_properties(properties)?),
            "service" => {
                return Err(ResourceError::BadProperty {
                    property: super::service::SERVICE_PROPERTY.to_owned(),
                    why: "a service resource needs watchd's services (Resource::build)".into(),
                });
            }
            "fileset" | "checkpoint" => {
                return Err(ResourceError::BadProperty {
                    property: super::fileset::FILESET_PROPERTY.to_owned(),
                    why: format!(
                        "a {kind} resource needs watchd's file replication (Resource::build)"
                    ),
                });
            }
            other => return Err(ResourceError::UnknownKind(other.to_owned())),
        };
        Ok(Resource::new(name, timeouts, kind))
    }

    /// Like [`Resource::from_properties`], for every kind: those that act through the running
    /// watchd (`service`) take what they need from `context`.
    pub fn build(
        name: &str,
        kind: &str,
        properties: &BTreeMap<String, String>,
        timeouts: Timeouts,
        context: &ResourceContext,
    ) -> Result<Resource, ResourceError> {
        match (kind, &context.services) {
            ("service", Some((catalog, shared))) => {
                let r = ServiceResource::from_properties(
                    &context.group,
                    properties,
                    catalog,
                    shared.clone(),
                )?;
                Ok(Resource::new(name, timeouts, ResourceKind::Service(r)))
            }
            ("fileset" | "checkpoint", Some((_, shared))) => {
                let what = if kind == "fileset" {
                    Replicated::Files
                } else {
                    Replicated::Checkpoints { service: None }
                };
                let r = FilesetResource::from_properties(properties, what, shared)?;
                Ok(Resource::new(name, timeouts, ResourceKind::Fileset(r)))
            }
            _ => Resource::from_properties(name, kind, properties, timeouts),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bounds.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Its kind and properties.
    pub fn kind(&self) -> &ResourceKind {
        &self.kind
    }

    /// Brings it online for the ownership `epoch` (the fencing token), within its online
    /// timeout.
    pub async fn online(&self, epoch: u64) -> Result<(), ResourceError> {
        self.online_noting(epoch).await.map(|_| ())
    }

    /// Like [`Resource::online`], with what is worth an event about how it came online (a
    /// service's warm standby promoted, or why it was not).
    pub async fn online_noting(&self, epoch: u64) -> Result<Option<String>, ResourceError> {
        let timeout = self.timeouts.online;
        match &self.kind {
            ResourceKind::Exec(r) => r.online(epoch, timeout).await.map(|()| None),
            ResourceKind::Ip(r) => within(Action::Online, timeout, r.online(timeout))
                .await
                .map(|()| None),
            ResourceKind::Service(r) => within(Action::Online, timeout, r.online(epoch)).await,
            ResourceKind::Fileset(r) => within(Action::Online, timeout, r.online(epoch))
                .await
                .map(|()| None),
        }
    }

    /// Runs a `service` resource as a warm standby instance for the group at `epoch`, within
    /// its online timeout; its pid. Other kinds have no standby.
    pub async fn standby(&self, epoch: u64) -> Result<u32, ResourceError> {
        match &self.kind {
            ResourceKind::Service(r) => {
                within(Action::Online, self.timeouts.online, r.standby(epoch)).await
            }
            other => Err(ResourceError::BadProperty {
                property: super::service::STANDBY_PROPERTY.to_owned(),
                why: format!("a {} resource has no standby instance", other.name()),
            }),
        }
    }

    /// Takes it offline (succeeds when it already is), within its offline timeout.
    pub async fn offline(&self) -> Result<(), ResourceError> {
        let timeout = self.timeouts.offline;
        match &self.kind {
            ResourceKind::Exec(r) => r.offline(timeout).await,
            ResourceKind::Ip(r) => within(Action::Offline, timeout, r.offline(timeout)).await,
            ResourceKind::Service(r) => within(Action::Offline, timeout, r.offline()).await,
            ResourceKind::Fileset(r) => within(Action::Offline, timeout, r.offline()).await,
        }
    }

    /// Takes it offline by force within its kind's forced bound (this node lost the acting
    /// verdict): a service is killed, an address deleted, a fileset made a backup without
    /// handing its last writes over. An exec resource's effects cannot be forced: its agent's
    /// stop runs within the offline timeout.
    pub async fn force_offline(
        &self,
        bounds: &super::executor::plan::ForcedBounds,
    ) -> Result<(), ResourceError> {
        let bound = bounds.of(self.kind.name(), self.timeouts.offline);
        match &self.kind {
            ResourceKind::Exec(r) => r.offline(self.timeouts.offline).await,
            ResourceKind::Ip(r) => within(Action::Offline, bound, r.offline(bound)).await,
            ResourceKind::Service(r) => within(Action::Offline, bound, r.force_offline()).await,
            ResourceKind::Fileset(r) => within(Action::Offline, bound, r.offline()).await,
        }
    }

    /// The cheap, frequent check, within its looks-alive timeout.
    pub async fn looks_alive(&self) -> Result<Health, ResourceError> {
        let timeout = self.timeouts.looks_alive;
        match &self.kind {
            ResourceKind::Exec(r) => r.looks_alive(timeout).await,
            ResourceKind::Ip(r) => {
                within(Action::LooksAlive, timeout, r.looks_alive(timeout)).await
            }
            ResourceKind::Service(r) => within(Action::LooksAlive, timeout, r.looks_alive()).await,
            ResourceKind::Fileset(r) => within(Action::LooksAlive, timeout, r.looks_alive()).await,
        }
    }

    /// The thorough check, within its is-alive timeout.
    pub async fn is_alive(&self) -> Result<Health, ResourceError> {
        let timeout = self.timeouts.is_alive;
        match &self.kind {
            ResourceKind::Exec(r) => r.is_alive(timeout).await,
            ResourceKind::Ip(r) => within(Action::IsAlive, timeout, r.is_alive(timeout)).await,
            ResourceKind::Service(r) => within(Action::IsAlive, timeout, r.is_alive()).await,
            ResourceKind::Fileset(r) => within(Action::IsAlive, timeout, r.is_alive()).await,
        }
    }
}

/// Runs `call` bounded by `timeout`; when it is cut off it is dropped (a command it runs through
/// [`run_bounded`] has its process group killed then) and the result is a
/// [`ResourceError::Timeout`].
pub async fn within<T>(
    action: Action,
    timeout: Duration,
    call: impl Future<Output = Result<T, ResourceError>>,
) -> Result<T, ResourceError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(ResourceError::Timeout {
            action,
            after: timeout,
            output: String::new(),
        }))
}

/// What a command left behind when it ended within its bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// How it ended.
    pub status: ExitStatus,
    /// The last bytes of its stdout (at most the bound it ran with, [`OUTPUT_TAIL`] by
    /// default), behind a `...` marker when earlier ones were dropped.
    pub stdout: Vec<u8>,
    /// The last bytes of its stderr, bounded the same way.
    pub stderr: Vec<u8>,
    /// Whether the start of stdout was dropped (a reader that parses stdout must refuse it).
    pub stdout_cut: bool,
}

impl Finished {
    /// Its stderr for a person (or its stdout when stderr is empty): the last lines, with
    /// control characters escaped so garbage cannot mangle a log or a terminal.
    pub fn excerpt(&self) -> String {
        let text = excerpt(&self.stderr);
        if text.is_empty() {
            excerpt(&self.stdout)
        } else {
            text
        }
    }
}

/// How [`run_bounded`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command could not be started.
    #[error("cannot start it: {0}")]
    Spawn(io::Error),
    /// Waiting for it failed.
    #[error("cannot wait for it: {0}")]
    Wait(io::Error),
    /// It outlived its bound and was killed with its process group.
    #[error("timed out")]
    Timeout {
        /// The tail of its stderr (or stdout) until then, for a person.
        output: String,
    },
}

/// Runs `cmd` with stdin from /dev/null, its output captured (only the last [`OUTPUT_TAIL`]
/// bytes of each stream are kept), in a process group of its own, bounded by `timeout`. At the
/// timeout, or when this future is dropped, the whole group is SIGKILLed; a command that ends
/// within its bound keeps its group (an agent's `start` may leave a daemon behind on purpose).
pub async fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Finished, RunError> {
    run_bounded_keeping(cmd, timeout, OUTPUT_TAIL).await
}

/// [`run_bounded`] keeping up to `keep` bytes of each stream (a command whose whole output is
/// parsed needs more than a failing program's last words).
pub async fn run_bounded_keeping(
    cmd: &mut Command,
    timeout: Duration,
    keep: usize,
) -> Result<Finished, RunError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .map_err(RunError::Spawn)?;
    // Declared after `child`, so dropped before it: when this future is cancelled, the group is
    // killed while its leader is still unreaped (its pid, hence the group id, cannot be reused).
    let mut group = GroupKill::of(&child);
    let mut stdout = Tail::new(keep);
    let mut stderr = Tail::new(keep);
    let ended = tokio::time::timeout(timeout, collect(&mut child, &mut stdout, &mut stderr)).await;
    match ended {
        Ok(Ok(status)) => {
            // Reaped: the group id may now be reused, so it must not be signalled any more.
            group.disarm();
            let stdout_cut = stdout.cut();
            Ok(Finished {
                status: exit_status(status),
                stdout: stdout.into_bytes(),
                stderr: stderr.into_bytes(),
                stdout_cut,
            })
        }
        Ok(Err(e)) => {
            group.kill();
            reap(&mut child).await;
            Err(RunError::Wait(e))
        }
        Err(_) => {
            group.kill();
            reap(&mut child).await;
            let stdout_cut = stdout.cut();
            let finished = Finished {
                status: ExitStatus::Unknown,
                stdout: stdout.into_bytes(),
                stderr: stderr.into_bytes(),
                stdout_cut,
            };
            Err(RunError::Timeout {
                output: finished.excerpt(),
            })
        }
    }
}

/// Reads both output pipes into their tails until the command has exited and the pipes are
/// closed, or [`OUTPUT_DRAIN_GRACE`] after the exit.
async fn collect(
    child: &mut Child,
    out: &mut Tail,
    err: &mut Tail,
) -> io::Result<std::process::ExitStatus> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];
    let mut status = None;
    let drain = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain);
    loop {
        if let Some(status) = status
            && stdout.is_none()
            && stderr.is_none()
        {
            return Ok(status);
        }
        tokio::select! {
            read = read_some(&mut stdout, &mut out_buf) => match read {
                Some(n) => out.push(&out_buf[..n]),
                None => stdout = None,
            },
            read = read_some(&mut stderr, &mut err_buf) => match read {
                Some(n) => err.push(&err_buf[..n]),
                None => stderr = None,
            },
            ended = child.wait(), if status.is_none() => {
                status = Some(ended?);
                drain
                    .as_mut()
                    .reset(tokio::time::Instant::now() + OUTPUT_DRAIN_GRACE);
            }
            () = &mut drain, if status.is_some() => {
                return Ok(status.expect("the branch runs only once the status is known"));
            }
        }
    }
}

/// The next chunk of `pipe`: `None` at its end or on an error; never ready for no pipe.
async fn read_some<R: AsyncRead + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    match pipe {
        Some(p) => loop {
            match p.read(buf).await {
                Ok(0) => return None,
                Ok(n) => return Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        },
        None => std::future::pending().await,
    }
}

async fn reap(child: &mut Child) {
    // Already dead by the group kill; this only covers a failed killpg.
    let _ = child.start_kill();
    if tokio::time::timeout(REAP_GRACE, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            pid = child.id(),
            "command did not die within {REAP_GRACE:?} of SIGKILL"
        );
    }
}

/// The last `keep` bytes of a stream, and whether earlier ones were dropped.
#[derive(Debug)]
struct Tail {
    bytes: Vec<u8>,
    keep: usize,
    dropped: bool,
}

impl Tail {
    fn new(keep: usize) -> Tail {
        Tail {
            bytes: Vec::new(),
            keep,
            dropped: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        // Trimming only past twice the bound keeps the copying linear in what was read.
        if self.bytes.len() > self.keep.saturating_mul(2) {
            let cut = self.bytes.len() - self.keep;
            self.bytes.drain(..cut);
            self.dropped = true;
        }
    }

    fn cut(&self) -> bool {
        self.dropped || self.bytes.len() > self.keep
    }

    fn into_bytes(mut self) -> Vec<u8> {
        if self.bytes.len() > self.keep {
            let cut = self.bytes.len() - self.keep;
            self.bytes.drain(..cut);
            self.dropped = true;
        }
        if self.dropped {
            // A marker, so a reader knows the text does not start at the beginning.
            let mut marked = b"...".to_vec();
            marked.extend_from_slice(&self.bytes);
            marked
        } else {
            self.bytes
        }
    }
}

/// `bytes` as one line of printable text: invalid UTF-8 replaced, control characters (line
/// ends included) escaped, surrounding blanks trimmed.
pub fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => shown.push_str(" | "),
            '\t' => shown.push(' '),
            c if c.is_control() => shown.extend(c.escape_default()),
            c => shown.push(c),
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use super::*;

    const SHORT: Duration = Duration::from_millis(300);
    /// Generous bound for "ends within its timeout" on a loaded 2-core machine.
    const PROMPTLY: Duration = Duration::from_secs(3);

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[tokio::test]
    async fn a_command_s_status_and_output_are_captured() {
        let done = run_bounded(&mut sh("echo out; echo err >&2; exit 3"), PROMPTLY)
            .await
            .expect("runs");
        assert_eq!(done.status, ExitStatus::Code(3));
        assert_eq!(done.stdout, b"out\n");
        assert_eq!(done.stderr, b"err\n");
        assert_eq!(done.excerpt(), "err");
    }

    #[tokio::test]
    async fn stdin_is_empty() {
        let done = run_bounded(&mut sh("wc -c"), PROMPTLY).await.expect("runs");
        assert_eq!(done.status, ExitStatus::Code(0));
        assert_eq!(excerpt(&done.stdout), "0");
    }

    #[tokio::test]
    async fn megabytes_of_output_keep_only_the_tail() {
        let done = run_bounded(
            &mut sh(
                "head -c 5000000 /dev/urandom; head -c 3000000 /dev/zero >&2; echo the end >&2",
            ),
            Duration::from_secs(20),
        )
        .await
        .expect("runs");
        assert_eq!(done.status, ExitStatus::Code(0));
        assert_eq!(done.stdout.len(), OUTPUT_TAIL + 3);
        assert!(done.stdout.starts_with(b"..."));
        assert!(done.stderr.ends_with(b"\0the end\n"));
        let shown = done.excerpt();
        assert!(shown.ends_with("\\u{0}the end"), "{shown}");
        assert!(!shown.chars().any(char::is_control), "{shown}");
    }

    #[tokio::test]
    async fn a_background_child_holding_the_pipes_does_not_hold_up_the_call() {
        let started = Instant::now();
        let done = run_bounded(&mut sh("sleep 5 & echo started"), PROMPTLY)
            .await
            .expect("runs");
        assert_eq!(done.status, ExitStatus::Code(0));
        assert_eq!(done.stdout, b"started\n");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    fn pid_in(file: &Path) -> i32 {
        std::fs::read_to_string(file)
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Gone, or a zombie waiting for a reaper that is not us.
    fn is_dead(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        }
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_with_its_group_at_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leader = dir.path().join("leader");
        let background = dir.path().join("background");
        let script = format!(
            "sleep 30 & echo $! > {bg}.tmp && mv {bg}.tmp {bg}; echo $$ > {l}.tmp && mv {l}.tmp {l}; echo hanging >&2; exec sleep 30",
            bg = background.display(),
            l = leader.display()
        );
        let started = Instant::now();
        let err = run_bounded(&mut sh(&script), SHORT)
            .await
            .expect_err("times out");
        let took = started.elapsed();
        assert!(took >= SHORT && took < PROMPTLY, "{took:?}");
        match err {
            RunError::Timeout { output } => assert_eq!(output, "hanging"),
            other => panic!("{other:?}"),
        }
        let leader = pid_in(&leader);
        assert!(
            !Path::new(&format!("/proc/{leader}")).exists(),
            "command {leader} still exists"
        );
        let background = pid_in(&background);
        let deadline = Instant::now() + PROMPTLY;
        while !is_dead(background) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(is_dead(background), "{background} survived the group kill");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let err = run_bounded(&mut Command::new("/nonexistent/agent"), SHORT)
            .await
            .expect_err("cannot start");
        assert!(
            matches!(&err, RunError::Spawn(e) if e.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn within_turns_a_slow_call_into_a_timeout() {
        let slow = async {
            tokio::time::sleep(PROMPTLY).await;
            Ok(())
        };
        let err = within(Action::IsAlive, SHORT, slow)
            .await
            .expect_err("too slow");
        assert_eq!(err.to_string(), "is-alive timed out after 300ms");
        assert_eq!(
            within(Action::Online, SHORT, async { Ok(7) })
                .await
                .expect("fast"),
            7
        );
    }

    #[test]
    fn excerpts_are_one_printable_line() {
        assert_eq!(
            excerpt(b"  a\nb\tc\x1b[31m\xff \n"),
            "a | b c\\u{1b}[31m\u{fffd}"
        );
        assert_eq!(excerpt(b""), "");
    }

    #[test]
    fn timeouts_default_and_select_by_action() {
        let t = Timeouts::default();
        assert_eq!(t.of(Action::Online), DEFAULT_ONLINE_TIMEOUT);
        assert_eq!(t.of(Action::Offline), DEFAULT_OFFLINE_TIMEOUT);
        assert_eq!(t.of(Action::LooksAlive), DEFAULT_LOOKS_ALIVE_TIMEOUT);
        assert_eq!(t.of(Action::IsAlive), DEFAULT_IS_ALIVE_TIMEOUT);
    }

    #[test]
    fn unknown_kinds_are_refused() {
        let err =
            Resource::from_properties("r", "teleporter", &BTreeMap::new(), Timeouts::default())
                .expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown resource kind `teleporter` (known: exec, ip, service, fileset, checkpoint)"
        );
    }

    #[test]
    fn error_messages_name_the_ocf_meaning() {
        let err = ResourceError::AgentFailed {
            agent: PathBuf::from("/opt/agent"),
            operation: "start",
            status: ExitStatus::Code(6),
            output: "no config".into(),
        };
        assert_eq!(
            err.to_string(),
            "agent /opt/agent start failed with exit code 6 (OCF_ERR_CONFIGURED: not configured): no config"
        );
        assert_eq!(
            Health::of(Err(err)).to_string().split(':').next(),
            Some("failed")
        );
    }
}
