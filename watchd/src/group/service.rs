//! The `service` resource: a watchd service of this node that runs only where its group is
//! online. Online starts it (with `FT_EPOCH` and `FT_GROUP` in its environment) and waits until
//! it is running (ready, when it has a ready check); offline stops it; the checks read its
//! supervisor's state, so a service that restarts locally stays online and one that exhausted
//! its restart budget fails its group over.
//!
//! A forced offline (this node lost the acting verdict) also SIGKILLs the service's cgroup (or
//! process group) at once instead of waiting for a graceful stop.
//!
//! Warm standby (`standby = "warm"`): on the nodes that may own the group but do not run it,
//! the executor runs the service with `FT_ROLE=standby` ([`ServiceResource::standby`]); online
//! then promotes that instance in place (libft's `Promote` with the new epoch) when it runs,
//! was started as a standby (its `/proc/PID/environ` says so) and registered with libft;
//! otherwise it falls back to a cold start. A standby that said READY (`ft_ready`, sd_notify)
//! says it again once it serves as the primary: the resource is online then (so the group's
//! address does not come before the service serves). An instance that exits meanwhile, or
//! stays silent for [`PROMOTE_READY_WAIT`], failed its promotion: a cold start follows (the
//! instance is restarted as the primary).
//!
//! It only asks the service's supervisor actor; it never spawns a process itself, signals one
//! only in a forced offline, and refuses a service that watchd would also start on its own
//! (`autostart = true`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::resource::{Action, Health, ResourceError};
use crate::machine::Input;
use crate::supervisor::{ServiceMsg, Shared};

/// The property naming the watchd service.
pub const SERVICE_PROPERTY: &str = "service";
/// The variable that hands a group service its ownership epoch (the fencing token).
pub const ENV_EPOCH: &str = "FT_EPOCH";
/// The variable that names the group a service runs for.
pub const ENV_GROUP: &str = "FT_GROUP";
/// The variable that tells a service its role (`primary` or `standby`).
pub const ENV_ROLE: &str = ft::standby::ENV_ROLE;
/// The property choosing cold (default) or warm standby.
pub const STANDBY_PROPERTY: &str = super::executor::plan::STANDBY_PROPERTY;
/// How long a promoted standby that said READY when it started has to say it again, once it
/// serves as the primary.
pub const PROMOTE_READY_WAIT: Duration = Duration::from_secs(5);
/// How often the supervisor's state is read while waiting for a start or a stop.
const POLL: Duration = Duration::from_millis(25);
/// How often it is read while a promoted standby is awaited (a failover waits on it).
const PROMOTE_POLL: Duration = Duration::from_millis(5);
/// How long one state query of the supervisor actor may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// What the executor knows of this node's services: their names and whether watchd starts them
/// on its own.
#[derive(Debug, Clone, Default)]
pub struct ServiceCatalog {
    /// Service name → its `autostart`.
    pub autostart: BTreeMap<String, bool>,
}

impl ServiceCatalog {
    /// The services of `config`.
    pub fn of(config: &crate::config::Config) -> ServiceCatalog {
        ServiceCatalog {
            autostart: config
                .services
                .iter()
                .map(|s| (s.name().to_owned(), s.autostart))
                .collect(),
        }
    }
}

/// A validated `service` resource.
#[derive(Debug)]
pub struct ServiceResource {
    service: String,
    group: String,
    warm: bool,
    shared: Arc<Shared>,
}

impl ServiceResource {
    /// Validates the properties of a resource of `group`: `service` must name a service of
    /// this node with `autostart = false` (the group decides where it runs).
    pub fn from_properties(
        group: &str,
        properties: &BTreeMap<String, String>,
        catalog: &ServiceCatalog,
        shared: Arc<Shared>,
    ) -> Result<ServiceResource, ResourceError> {
        let bad = |why: String| ResourceError::BadProperty {
            property: SERVICE_PROPERTY.to_owned(),
            why,
        };
        let service = properties
            .get(SERVICE_PROPERTY)
            .ok_or_else(|| bad("missing (the name of a watchd service)".into()))?;
        let warm = match properties.get(STANDBY_PROPERTY).map(String::as_str) {
            None | Some("cold") => false,
            Some("warm") => true,
            Some(other) => {
                return Err(ResourceError::BadProperty {
                    property: STANDBY_PROPERTY.to_owned(),
                    why: format!("`{other}`: \"cold\" (the default) or \"warm\""),
                });
            }
        };
        match catalog.autostart.get(service) {
            None => Err(bad(format!(
                "no service `{service}` in this node's configuration"
            ))),
            Some(true) => Err(bad(format!(
                "service `{service}` has autostart = true; a group's service needs autostart = false (the group decides where it runs)"
            ))),
            Some(false) => Ok(ServiceResource {
                service: service.clone(),
                group: group.to_owned(),
                warm,
                shared,
            }),
        }
    }

    /// The watchd service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether it asks for a warm standby.
    pub fn warm(&self) -> bool {
        self.warm
    }

    /// The environment of the service's next starts: its group, epoch and role.
    fn set_env(&self, epoch: u64, role: ft::standby::Role) {
        self.shared
            .group_env
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                self.service.clone(),
                vec![
                    (ENV_EPOCH.to_owned(), epoch.to_string()),
                    (ENV_GROUP.to_owned(), self.group.clone()),
                    (ENV_ROLE.to_owned(), role.as_str().to_owned()),
                ],
            );
    }

    /// Brings the service online for `epoch`: promotes its warm standby instance when it can
    /// (`Some(detail)` says what happened), else starts it and waits until it runs (and is
    /// ready).
    pub async fn online(&self, epoch: u64) -> Result<Option<String>, ResourceError> {
        // Whatever happens next (a promotion that fails, a restart), a new process is the
        // primary.
        self.set_env(epoch, ft::standby::Role::Primary);
        let mut note = None;
        if self.warm {
            let v = self.view().await?;
            match self.promote(epoch, &v).await {
                Ok(pid) => {
                    return Ok(Some(format!(
                        "promoted the warm standby in place (pid {pid})"
                    )));
                }
                Err(why) => {
                    tracing::info!(service = %self.service, %why, "no promotion: cold start");
                    note = Some(format!("cold start: {why}"));
                }
            }
        }
        self.start(None).await?;
        Ok(note)
    }

    /// Promotes the running standby instance for `epoch`; its pid, or why not.
    async fn promote(&self, epoch: u64, v: &crate::machine::View) -> Result<u32, String> {
        if v.state != "running" {
            return Err(format!("the standby is {}", v.state));
        }
        let pid = v.pid.ok_or("no standby process")?;
        if !started_as_standby(pid).await {
            return Err(format!("pid {pid} was not started as a standby"));
        }
        let told = self.shared.request_promote(&self.service, epoch)?;
        if told != pid {
            return Err(format!(
                "pid {told} registered with libft, but the service's process is pid {pid}"
            ));
        }
        if v.readies == 0 {
            return Ok(pid);
        }
        let deadline = tokio::time::Instant::now() + PROMOTE_READY_WAIT;
        loop {
            let now = self.view().await.map_err(|e| e.to_string())?;
            if now.pid != Some(pid) || now.state != "running" {
                return Err(format!(
                    "pid {pid} did not survive its promotion (now {})",
                    now.state
                ));
            }
            if now.readies > v.readies {
                return Ok(pid);
            }
            if tokio::time::Instant::now() >= deadline {
                // It may still answer as a standby: counting it online would bring the group's
                // address up in front of a service that refuses to serve.
                return Err(format!(
                    "pid {pid} did not say READY again within {PROMOTE_READY_WAIT:?} of its promotion"
                ));
            }
            tokio::time::sleep(PROMOTE_POLL).await;
        }
    }

    /// Runs the service as a warm standby for the group at `epoch` (`FT_ROLE=standby`): keeps
    /// an instance that already runs as one, else (re)starts it; returns its pid.
    pub async fn standby(&self, epoch: u64) -> Result<u32, ResourceError> {
        self.set_env(epoch, ft::standby::Role::Standby);
        let v = self.view().await?;
        if let Some(pid) = v.pid
            && matches!(v.state.as_str(), "running" | "starting")
            && started_as_standby(pid).await
        {
            return Ok(pid);
        }
        self.start(Some(&v)).await
    }

    /// Starts the service (restarts a process left from before: it has an old environment)
    /// and waits until a new process runs; its pid.
    async fn start(&self, before: Option<&crate::machine::View>) -> Result<u32, ResourceError> {
        let before = match before {
            Some(v) => v.clone(),
            None => self.view().await?,
        };
        // A process left from before (an adopted one, or a stop that did not happen) has an old
        // epoch in its environment: it is restarted with the new one.
        let (input, old_pid) = match before.state.as_str() {
            "running" | "starting" => (Input::Restart, before.pid),
            _ => (Input::Start, None),
        };
        self.send(input)?;
        loop {
            let v = self.view().await?;
            match (v.state.as_str(), v.pid) {
                ("running", Some(pid)) if v.pid != old_pid => return Ok(pid),
                ("failed", _) => {
                    return Err(self.failed(
                        Action::Online,
                        v.failed_reason.as_deref().unwrap_or("failed"),
                    ));
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Stops the service and waits until no process of it is left.
    pub async fn offline(&self) -> Result<(), ResourceError> {
        self.send(Input::Stop)?;
        self.stopped().await
    }

    /// Stops the service by force: its supervisor stops restarting it, every process of it is
    /// SIGKILLed (its cgroup, else its process group, checked against the recorded start time),
    /// and the reaping is awaited. The caller bounds it.
    pub async fn force_offline(&self) -> Result<(), ResourceError> {
        // First the stop, so that the supervisor reads the exit as the end of a stop rather
        // than a crash to restart.
        self.send(Input::Stop)?;
        let shared = self.shared.clone();
        let service = self.service.clone();
        let killed = tokio::task::spawn_blocking(move || kill_service(&shared, &service))
            .await
            .map_err(|e| self.io(format!("the kill did not run: {e}")))?;
        if let Err(why) = killed {
            tracing::warn!(service = %self.service, error = %why, "forced stop: cannot kill; waiting for the graceful stop");
        }
        self.stopped().await
    }

    /// Waits until the supervisor has no process of the service left.
    async fn stopped(&self) -> Result<(), ResourceError> {
        loop {
            let v = self.view().await?;
            if matches!(v.state.as_str(), "stopped" | "failed") && v.pid.is_none() {
                self.shared
                    .group_env
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&self.service);
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Running, or restarting locally within its budget.
    pub async fn looks_alive(&self) -> Result<Health, ResourceError> {
        Ok(health(&self.view().await?))
    }

    /// The supervisor's verdict: it watches the heartbeats, probes and hangs, and restarts the
    /// service locally; a service it gave up on (budget exhausted) has failed.
    pub async fn is_alive(&self) -> Result<Health, ResourceError> {
        Ok(health(&self.view().await?))
    }

    fn send(&self, input: Input) -> Result<(), ResourceError> {
        let actor = self.actor()?;
        actor
            .cast(ServiceMsg::Input(input))
            .map_err(|e| self.io(format!("its supervisor is unavailable: {e}")))
    }

    async fn view(&self) -> Result<crate::machine::View, ResourceError> {
        let actor = self.actor()?;
        match actor.call(ServiceMsg::Status, Some(QUERY_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(s)) => Ok(s.view),
            Ok(_) => Err(self.io("its supervisor did not answer in time".into())),
            Err(e) => Err(self.io(format!("its supervisor is unavailable: {e}"))),
        }
    }

    fn actor(&self) -> Result<ractor::ActorRef<ServiceMsg>, ResourceError> {
        self.shared
            .actor(&self.service)
            .ok_or_else(|| self.io("no such service (removed by a reload?)".into()))
    }

    fn io(&self, why: String) -> ResourceError {
        ResourceError::Io {
            what: format!("service `{}`", self.service),
            source: std::io::Error::other(why),
        }
    }

    fn failed(&self, action: Action, why: &str) -> ResourceError {
        self.io(format!("{action}: the service failed: {why}"))
    }
}

/// Whether process `pid` was started with `FT_ROLE=standby` (its initial environment, as the
/// kernel keeps it; false when it cannot be read).
async fn started_as_standby(pid: u32) -> bool {
    let wanted = format!("{ENV_ROLE}={}", ft::standby::Role::Standby.as_str());
    tokio::fs::read(format!("/proc/{pid}/environ"))
        .await
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == wanted.as_bytes()))
}

/// SIGKILLs every process of `service` as the registry records it (nothing when it records
/// none: nothing runs).
fn kill_service(shared: &Shared, service: &str) -> Result<(), String> {
    use crate::machine::TreeSignal;
    let records = shared.registry.all().map_err(|e| e.to_string())?;
    let Some((_, rec)) = records.into_iter().find(|(n, _)| n == service) else {
        return Ok(());
    };
    match rec.cgroup {
        // cgroup.kill reaches every process of the cgroup atomically, reused pids or not.
        Some(path) => {
            let cg = crate::cgroup::Cgroup::open(path);
            crate::process::signal_tree(rec.pid, Some(&cg), TreeSignal::Kill)
                .map_err(|e| e.to_string())
        }
        None => match crate::process::adopt(rec.pid, rec.start_time) {
            // The pidfd pins the pid: it cannot be reused while it is open.
            Ok(Some(_pidfd)) => crate::process::signal_tree(rec.pid, None, TreeSignal::Kill)
                .map_err(|e| e.to_string()),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// A service's state as a check's verdict.
fn health(v: &crate::machine::View) -> Health {
    match v.state.as_str() {
        // Restarting locally (backoff, a restart's stop, a new start) is the supervisor's
        // business until it gives up.
        "running" | "starting" | "backoff" | "stopping" => Health::Online,
        "failed" => Health::Failed(format!(
            "the service failed: {}",
            v.failed_reason
                .as_deref()
                .unwrap_or("restart budget exhausted")
        )),
        _ => Health::Offline,
    }
}
