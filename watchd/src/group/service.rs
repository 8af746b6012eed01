//! The `service` resource: a watchd service of this node that runs only where its group is
//! online. Online starts it (with `FT_EPOCH` and `FT_GROUP` in its environment) and waits until
//! it is running (ready, when it has a ready check); offline stops it; the checks read its
//! supervisor's state, so a service that restarts locally stays online and one that exhausted
//! its restart budget fails its group over.
//!
//! It only asks the service's supervisor actor; it never spawns or signals a process itself,
//! and it refuses a service that watchd would also start on its own (`autostart = true`).

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
/// How often the supervisor's state is read while waiting for a start or a stop.
const POLL: Duration = Duration::from_millis(25);
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
                shared,
            }),
        }
    }

    /// The watchd service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Starts the service for `epoch` and waits until it runs (and is ready).
    pub async fn online(&self, epoch: u64) -> Result<(), ResourceError> {
        self.shared
            .group_env
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                self.service.clone(),
                vec![
                    (ENV_EPOCH.to_owned(), epoch.to_string()),
                    (ENV_GROUP.to_owned(), self.group.clone()),
                ],
            );
        let before = self.view().await?;
        // A process left from before (an adopted one, or a stop that did not happen) has an old
        // epoch in its environment: it is restarted with the new one.
        let (input, old_pid) = match before.state.as_str() {
            "running" | "starting" => (Input::Restart, before.pid),
            _ => (Input::Start, None),
        };
        self.send(input)?;
        loop {
            let v = self.view().await?;
            match v.state.as_str() {
                "running" if v.pid.is_some() && v.pid != old_pid => return Ok(()),
                "failed" => {
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
