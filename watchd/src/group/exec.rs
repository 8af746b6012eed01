//! The `exec` resource: a custom resource type as an executable (the analog of an MSCS resource
//! DLL), called like an OCF resource agent: `AGENT start|stop|monitor` with the `OCF_*`
//! environment, answering with OCF exit codes. It owns the mapping from exit codes to results;
//! it must never let an agent outlive its timeout (the agent's process group is killed) nor keep
//! more of its output than [`super::resource::OUTPUT_TAIL`] bytes per stream.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::process::Command;

use super::resource::{Action, Finished, Health, ResourceError, RunError, run_bounded};
use crate::machine::ExitStatus;

/// The property naming the agent's absolute path.
pub const AGENT_PROPERTY: &str = "agent";
/// `OCF_ROOT` handed to agents: where OCF's shell function library lives on hosts that have one
/// (agents that do not source it ignore it; the directory need not exist).
pub const DEFAULT_OCF_ROOT: &str = "/usr/lib/ocf";
/// `OCF_CHECK_LEVEL` of the looks-alive monitor: the cheap check.
pub const LOOKS_ALIVE_CHECK_LEVEL: u32 = 0;
/// `OCF_CHECK_LEVEL` of the is-alive monitor: the thorough check.
pub const IS_ALIVE_CHECK_LEVEL: u32 = 20;
/// Where agents run: a directory that always exists and holds no file system busy.
const AGENT_WORKING_DIRECTORY: &str = "/";
/// OCF_SUCCESS: done, or running.
const OCF_SUCCESS: i32 = 0;
/// OCF_NOT_RUNNING: cleanly stopped.
const OCF_NOT_RUNNING: i32 = 7;
/// OCF_RUNNING_MASTER: running (as the primary of a multi-state resource).
const OCF_RUNNING_MASTER: i32 = 8;

/// A validated `exec` resource.
#[derive(Debug)]
pub struct ExecResource {
    /// The resource's name (`OCF_RESOURCE_INSTANCE`).
    instance: String,
    agent: PathBuf,
    /// Every property, handed over as `OCF_RESKEY_<name>`.
    properties: BTreeMap<String, String>,
    ocf_root: PathBuf,
    /// The epoch of the last `online`, handed over as `FT_EPOCH`; 0 before the first.
    epoch: AtomicU64,
}

/// The three agent operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `start`
    Start,
    /// `stop`
    Stop,
    /// `monitor` at an `OCF_CHECK_LEVEL`.
    Monitor(u32),
}

impl Operation {
    /// The agent's first argument.
    pub fn verb(self) -> &'static str {
        match self {
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::Monitor(_) => "monitor",
        }
    }
}

impl ExecResource {
    /// Validates the properties of resource `instance`: `agent` (an absolute path) is required;
    /// every property name must be usable as an environment variable name.
    pub fn from_properties(
        instance: &str,
        properties: &BTreeMap<String, String>,
    ) -> Result<ExecResource, ResourceError> {
        let bad = |property: &str, why: &str| ResourceError::BadProperty {
            property: property.to_owned(),
            why: why.to_owned(),
        };
        let agent = properties
            .get(AGENT_PROPERTY)
            .ok_or_else(|| bad(AGENT_PROPERTY, "missing (the agent's absolute path)"))?;
        if !Path::new(agent).is_absolute() {
            return Err(bad(
                AGENT_PROPERTY,
                &format!("`{agent}` is not an absolute path"),
            ));
        }
        for (name, value) in properties {
            if !is_parameter_name(name) {
                return Err(bad(
                    name,
                    "not a valid OCF parameter name (ASCII letters, digits and `_`, not starting with a digit)",
                ));
            }
            if value.contains('\0') {
                return Err(bad(name, "the value contains a NUL byte"));
            }
        }
        if instance.is_empty() || instance.contains('\0') {
            return Err(bad(
                "name",
                "a resource name must be non-empty text without NUL",
            ));
        }
        Ok(ExecResource {
            instance: instance.to_owned(),
            agent: PathBuf::from(agent),
            properties: properties.clone(),
            ocf_root: PathBuf::from(DEFAULT_OCF_ROOT),
            epoch: AtomicU64::new(0),
        })
    }

    /// The agent's path.
    pub fn agent(&self) -> &Path {
        &self.agent
    }

    /// `start` with `FT_EPOCH=epoch`; success only on exit code 0.
    pub async fn online(&self, epoch: u64, timeout: Duration) -> Result<(), ResourceError> {
        self.epoch.store(epoch, Ordering::Relaxed);
        let op = Operation::Start;
        let done = self.run(op, Action::Online, timeout).await?;
        self.expect(op, done, |status| start_ok(status).then_some(()))
    }

    /// `stop`; success on exit code 0, and on 7 (it was not running: stop is idempotent).
    pub async fn offline(&self, timeout: Duration) -> Result<(), ResourceError> {
        let op = Operation::Stop;
        let done = self.run(op, Action::Offline, timeout).await?;
        self.expect(op, done, |status| stop_ok(status).then_some(()))
    }

    /// `monitor` at [`LOOKS_ALIVE_CHECK_LEVEL`].
    pub async fn looks_alive(&self, timeout: Duration) -> Result<Health, ResourceError> {
        let op = Operation::Monitor(LOOKS_ALIVE_CHECK_LEVEL);
        let done = self.run(op, Action::LooksAlive, timeout).await?;
        self.expect(op, done, monitor_health)
    }

    /// `monitor` at [`IS_ALIVE_CHECK_LEVEL`].
    pub async fn is_alive(&self, timeout: Duration) -> Result<Health, ResourceError> {
        let op = Operation::Monitor(IS_ALIVE_CHECK_LEVEL);
        let done = self.run(op, Action::IsAlive, timeout).await?;
        self.expect(op, done, monitor_health)
    }

    fn expect<T>(
        &self,
        op: Operation,
        done: Finished,
        verdict: impl FnOnce(ExitStatus) -> Option<T>,
    ) -> Result<T, ResourceError> {
        let status = done.status;
        verdict(status).ok_or_else(|| ResourceError::AgentFailed {
            agent: self.agent.clone(),
            operation: op.verb(),
            status,
            output: done.excerpt(),
        })
    }

    /// The agent's command line and environment for `op` under `timeout`.
    pub fn command(&self, op: Operation, timeout: Duration) -> Command {
        let mut cmd = Command::new(&self.agent);
        cmd.arg(op.verb())
            .current_dir(AGENT_WORKING_DIRECTORY)
            .env("OCF_ROOT", &self.ocf_root)
            .env("OCF_RA_VERSION_MAJOR", "1")
            .env("OCF_RA_VERSION_MINOR", "0")
            .env("OCF_RESOURCE_INSTANCE", &self.instance)
            .env(
                "OCF_RESOURCE_TYPE",
                self.agent.file_name().unwrap_or(self.agent.as_os_str()),
            )
            // Pacemaker's name for the operation's bound, which agents use to pace retries.
            .env(
                "OCF_RESKEY_CRM_meta_timeout",
                timeout.as_millis().to_string(),
            );
        for (name, value) in &self.properties {
            cmd.env(format!("OCF_RESKEY_{name}"), value);
        }
        let epoch = self.epoch.load(Ordering::Relaxed);
        if epoch > 0 {
            cmd.env("FT_EPOCH", epoch.to_string());
        }
        if let Operation::Monitor(level) = op {
            cmd.env("OCF_CHECK_LEVEL", level.to_string());
        }
        cmd
    }

    async fn run(
        &self,
        op: Operation,
        action: Action,
        timeout: Duration,
    ) -> Result<Finished, ResourceError> {
        let mut cmd = self.command(op, timeout);
        run_bounded(&mut cmd, timeout).await.map_err(|e| match e {
            RunError::Spawn(source) => ResourceError::Spawn {
                program: self.agent.clone(),
                source,
            },
            RunError::Wait(source) => ResourceError::Io {
                what: format!("cannot wait for agent {}", self.agent.display()),
                source,
            },
            RunError::Timeout { output } => ResourceError::Timeout {
                action,
                after: timeout,
                output,
            },
        })
    }
}

/// Whether a `start` that ended with `status` brought the resource online.
pub fn start_ok(status: ExitStatus) -> bool {
    status == ExitStatus::Code(OCF_SUCCESS)
}

/// Whether a `stop` that ended with `status` left the resource offline (OCF: stopping a stopped
/// resource succeeds, and some agents say so with "not running").
pub fn stop_ok(status: ExitStatus) -> bool {
    matches!(status, ExitStatus::Code(OCF_SUCCESS | OCF_NOT_RUNNING))
}

/// What a `monitor` that ended with `status` says, or `None` when the agent failed.
pub fn monitor_health(status: ExitStatus) -> Option<Health> {
    match status {
        ExitStatus::Code(OCF_SUCCESS | OCF_RUNNING_MASTER) => Some(Health::Online),
        ExitStatus::Code(OCF_NOT_RUNNING) => Some(Health::Offline),
        _ => None,
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what a shell can read back as `$OCF_RESKEY_<name>`.
fn is_parameter_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn properties_are_validated() {
        let ok = ExecResource::from_properties(
            "db",
            &props(&[("agent", "/opt/agents/db"), ("config", "/etc/db.conf")]),
        )
        .expect("valid");
        assert_eq!(ok.agent(), Path::new("/opt/agents/db"));
        let err = |pairs: &[(&str, &str)]| {
            ExecResource::from_properties("db", &props(pairs))
                .expect_err("invalid")
                .to_string()
        };
        assert_eq!(
            err(&[]),
            "property `agent`: missing (the agent's absolute path)"
        );
        assert_eq!(
            err(&[("agent", "agents/db")]),
            "property `agent`: `agents/db` is not an absolute path"
        );
        assert!(
            err(&[("agent", "/a"), ("x-y", "1")]).starts_with("property `x-y`: not a valid OCF"),
        );
        assert!(err(&[("agent", "/a"), ("1x", "1")]).starts_with("property `1x`:"));
        assert_eq!(
            err(&[("agent", "/a"), ("x", "a\0b")]),
            "property `x`: the value contains a NUL byte"
        );
    }

    #[test]
    fn exit_codes_map_to_results() {
        assert!(start_ok(ExitStatus::Code(0)));
        for bad in [1, 2, 3, 5, 6, 7] {
            assert!(!start_ok(ExitStatus::Code(bad)), "{bad}");
        }
        assert!(!start_ok(ExitStatus::Signal(9)));
        assert!(stop_ok(ExitStatus::Code(0)) && stop_ok(ExitStatus::Code(7)));
        assert!(!stop_ok(ExitStatus::Code(1)) && !stop_ok(ExitStatus::Signal(15)));
        assert_eq!(monitor_health(ExitStatus::Code(0)), Some(Health::Online));
        assert_eq!(monitor_health(ExitStatus::Code(8)), Some(Health::Online));
        assert_eq!(monitor_health(ExitStatus::Code(7)), Some(Health::Offline));
        for bad in [1, 2, 3, 4, 5, 6, 9, 42, 255] {
            assert_eq!(monitor_health(ExitStatus::Code(bad)), None, "{bad}");
        }
        assert_eq!(monitor_health(ExitStatus::Signal(9)), None);
        assert_eq!(monitor_health(ExitStatus::Unknown), None);
    }

    #[test]
    fn the_environment_follows_ocf() {
        let r = ExecResource::from_properties(
            "web",
            &props(&[("agent", "/opt/agents/web"), ("port", "8080")]),
        )
        .expect("valid");
        r.epoch.store(5, Ordering::Relaxed);
        let cmd = r.command(
            Operation::Monitor(IS_ALIVE_CHECK_LEVEL),
            Duration::from_secs(2),
        );
        let std = cmd.as_std();
        let env: BTreeMap<String, String> = std
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
            .collect();
        let args: Vec<_> = std.get_args().collect();
        assert_eq!(args, ["monitor"]);
        for (k, v) in [
            ("OCF_ROOT", DEFAULT_OCF_ROOT),
            ("OCF_RA_VERSION_MAJOR", "1"),
            ("OCF_RESOURCE_INSTANCE", "web"),
            ("OCF_RESOURCE_TYPE", "web"),
            ("OCF_RESKEY_agent", "/opt/agents/web"),
            ("OCF_RESKEY_port", "8080"),
            ("OCF_RESKEY_CRM_meta_timeout", "2000"),
            ("OCF_CHECK_LEVEL", "20"),
            ("FT_EPOCH", "5"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        let start = r.command(Operation::Start, Duration::from_secs(1));
        assert!(
            !start
                .as_std()
                .get_envs()
                .any(|(k, _)| k == "OCF_CHECK_LEVEL")
        );
    }
}
