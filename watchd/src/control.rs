//! The control server: `ftctl`'s side of the protocol in [`crate::api`].
//!
//! It checks the caller's kernel credentials (root or watchd's own user), reads one bounded
//! request line, and answers from the actors and the event hub. A malformed or oversized request
//! gets an error answer; it never disturbs the daemon.

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::api::{MAX_REQUEST_LINE, Request, Response, ServiceStatus, StatusReport};
use crate::logs;
use crate::machine::{EventKind, Input, View};
use crate::node::{NodeHandle, NodeRequestError};
use crate::supervisor::{RootMsg, ServiceMsg, Shared};
use crate::transparent::TransparentError;
use cluster::db::UpdateError;
use cluster::gum::GumError;

/// How long a service actor may take to report its status.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a reload may take.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// `logs` without `max_bytes`.
const DEFAULT_LOG_TAIL: u64 = 64 * 1024;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a transparent checkpoint or rollback may take before the answer gives up on it.
pub const TRANSPARENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Serves the control socket until the process ends. `node` is the cluster node, when this
/// watchd is one.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    root: ActorRef<RootMsg>,
    node: Option<Arc<NodeHandle>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                let root = root.clone();
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &shared, &root, node.as_deref()).await {
                        tracing::debug!(error = %e, "control connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    stream: UnixStream,
    shared: &Shared,
    root: &ActorRef<RootMsg>,
    node: Option<&NodeHandle>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let own_uid = nix::unistd::geteuid().as_raw();
    let (read, mut write) = stream.into_split();
    if cred.uid() != 0 && cred.uid() != own_uid {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "control request from an unauthorised user refused");
        return send(
            &mut write,
            &Response::Error {
                message: "permission denied: only root and watchd's user may control it".into(),
            },
        )
        .await;
    }
    let mut line = Vec::new();
    let limit = u64::try_from(MAX_REQUEST_LINE).unwrap_or(u64::MAX) + 1;
    let mut reader = BufReader::new(read).take(limit);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(r) => r?,
        Err(_) => {
            return send(
                &mut write,
                &Response::Error {
                    message: "no request within the time limit".into(),
                },
            )
            .await;
        }
    };
    if line.len() > MAX_REQUEST_LINE {
        return send(
            &mut write,
            &Response::Error {
                message: format!("request longer than {MAX_REQUEST_LINE} bytes"),
            },
        )
        .await;
    }
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            return send(
                &mut write,
                &Response::Error {
                    message: format!("bad request: {e}"),
                },
            )
            .await;
        }
    };
    match request {
        Request::Status => {
            let report = status(shared).await;
            send(&mut write, &Response::Status(report)).await
        }
        Request::Start { service } => {
            operate(
                shared,
                &mut write,
                &service,
                Input::Start,
                "start requested",
            )
            .await
        }
        Request::Stop { service } => {
            operate(shared, &mut write, &service, Input::Stop, "stop requested").await
        }
        Request::Restart { service } => {
            operate(
                shared,
                &mut write,
                &service,
                Input::Restart,
                "restart requested",
            )
            .await
        }
        Request::Events { follow, last } => {
            if !follow {
                for e in shared.events.recent(last) {
                    send(&mut write, &Response::Event(e)).await?;
                }
                return send(&mut write, &Response::End).await;
            }
            let (past, mut rx) = shared.events.follow(last);
            let mut last_seq = 0;
            for e in past {
                last_seq = e.seq;
                send(&mut write, &Response::Event(e)).await?;
            }
            loop {
                match rx.recv().await {
                    Ok(e) if e.seq <= last_seq => {}
                    Ok(e) => {
                        last_seq = e.seq;
                        send(&mut write, &Response::Event(e)).await?;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let message = format!("this follower fell behind and missed {n} events");
                        send(&mut write, &Response::Error { message }).await?;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
        Request::Logs { service, max_bytes } => {
            if shared.actor(&service).is_none() {
                return send(
                    &mut write,
                    &Response::NotFound {
                        what: format!("service `{service}`"),
                    },
                )
                .await;
            }
            let path = logs::log_path(&shared.data_dir, &service);
            let max = max_bytes.unwrap_or(DEFAULT_LOG_TAIL);
            let response = match tokio::task::spawn_blocking(move || logs::tail(&path, max)).await {
                Ok(Ok(bytes)) => Response::Logs {
                    text: String::from_utf8_lossy(&bytes).into_owned(),
                },
                Ok(Err(e)) => Response::Error {
                    message: format!("cannot read the log of `{service}`: {e}"),
                },
                Err(e) => Response::Error {
                    message: format!("log reader failed: {e}"),
                },
            };
            send(&mut write, &response).await
        }
        Request::Reload => {
            let response = match root.call(RootMsg::Reload, Some(RELOAD_TIMEOUT)).await {
                Ok(ractor::rpc::CallResult::Success(r)) => r,
                Ok(_) => Response::Error {
                    message: "reload did not finish in time".into(),
                },
                Err(e) => Response::Error {
                    message: format!("reload failed: {e}"),
                },
            };
            send(&mut write, &response).await
        }
        Request::Checkpoint { service, stream } => {
            let response = match (shared.actor(&service), shared.checkpointer(&service)) {
                (None, _) => Response::NotFound {
                    what: format!("service `{service}`"),
                },
                (Some(_), Some(c)) => {
                    match tokio::time::timeout(TRANSPARENT_TIMEOUT, c.dump()).await {
                        Ok(Ok(report)) => {
                            shared.events.emit(
                                Some(&service),
                                EventKind::Checkpointed,
                                format!(
                                    "transparent checkpoint #{} of pid {} on request: {} pages, paused {} µs",
                                    report.seq, report.pid, report.pages, report.pause_us
                                ),
                            );
                            Response::Checkpointed(report)
                        }
                        Ok(Err(e)) => transparent_failure(&e),
                        Err(_) => timed_out(&service, "checkpoint"),
                    }
                }
                (Some(_), None) => match shared.request_checkpoint(&service, stream.unwrap_or(0)) {
                    Ok(pid) => Response::Ok {
                        message: format!(
                            "{service}: checkpoint of stream {} requested from pid {pid}",
                            stream.unwrap_or(0)
                        ),
                    },
                    Err(message) => Response::Error { message },
                },
            };
            send(&mut write, &response).await
        }
        Request::Promote { service, epoch } => {
            let epoch = epoch.unwrap_or(0);
            let response = match shared.actor(&service) {
                None => Response::NotFound {
                    what: format!("service `{service}`"),
                },
                Some(_) => match shared.request_promote(&service, epoch) {
                    Ok(pid) => Response::Ok {
                        message: format!("{service}: pid {pid} promoted (epoch {epoch})"),
                    },
                    Err(message) => Response::Error { message },
                },
            };
            send(&mut write, &response).await
        }
        Request::Rollback { service, seq } => {
            let response = match (shared.actor(&service), shared.checkpointer(&service)) {
                (None, _) => Response::NotFound {
                    what: format!("service `{service}`"),
                },
                (Some(_), None) => Response::Error {
                    message: format!(
                        "`{service}` has no transparent checkpoints \
                         (checkpoint = {{ transparent = true }} in its configuration)"
                    ),
                },
                (Some(_), Some(c)) => {
                    match tokio::time::timeout(TRANSPARENT_TIMEOUT, c.rollback(seq)).await {
                        Ok(Ok(report)) => Response::RolledBack(report),
                        Ok(Err(e)) => transparent_failure(&e),
                        Err(_) => timed_out(&service, "rollback"),
                    }
                }
            };
            send(&mut write, &response).await
        }
        Request::ReplStatus => {
            let response = match shared.repl.get() {
                None => Response::Repl {
                    filesets: Vec::new(),
                },
                Some(r) => match ractor::call_t!(r, crate::repl::ReplMsg::Status, 10_000) {
                    Ok(filesets) => Response::Repl { filesets },
                    Err(e) => Response::Error {
                        message: format!("replication supervisor: {e}"),
                    },
                },
            };
            send(&mut write, &response).await
        }
        Request::ClusterStatus
        | Request::ClusterEvents { .. }
        | Request::ClusterDb
        | Request::ClusterUpdate { .. }
        | Request::NodePause { .. }
        | Request::NodeLeave { .. } => {
            let response = match node {
                None => Response::NotFound {
                    what: "cluster: this watchd has no [cluster] table".into(),
                },
                Some(node) => cluster_request(node, request).await,
            };
            send(&mut write, &response).await
        }
        Request::Group { request } => {
            let response = match shared.groups.get() {
                None => Response::NotFound {
                    what: "groups: this watchd has no [cluster] table".into(),
                },
                Some(groups) => crate::group::apply::serve(groups, request).await,
            };
            send(&mut write, &response).await
        }
        Request::InjectPanic { service } => {
            if !shared.test_hooks {
                return send(
                    &mut write,
                    &Response::Error {
                        message: "test hooks are disabled".into(),
                    },
                )
                .await;
            }
            match shared.actor(&service) {
                Some(a) => {
                    let _ = a.cast(ServiceMsg::InjectPanic);
                    send(
                        &mut write,
                        &Response::Ok {
                            message: "panic injected".into(),
                        },
                    )
                    .await
                }
                None => {
                    send(
                        &mut write,
                        &Response::NotFound {
                            what: format!("service `{service}`"),
                        },
                    )
                    .await
                }
            }
        }
    }
}

/// A transparent checkpoint or rollback that did not happen: nothing running or no such
/// checkpoint is a valid negative answer, anything else an error.
fn transparent_failure(e: &TransparentError) -> Response {
    if e.is_negative() {
        Response::NotFound {
            what: e.to_string(),
        }
    } else {
        Response::Error {
            message: e.to_string(),
        }
    }
}

fn timed_out(service: &str, what: &str) -> Response {
    Response::Error {
        message: format!(
            "{service}: the transparent {what} did not finish within {}s (it goes on in watchd)",
            TRANSPARENT_TIMEOUT.as_secs()
        ),
    }
}

/// The cluster requests (the caller checked that this watchd is a cluster node).
async fn cluster_request(node: &NodeHandle, request: Request) -> Response {
    let outcome = match request {
        Request::ClusterStatus => return Response::Cluster(Box::new(node.status())),
        Request::ClusterEvents { last } => {
            return Response::ClusterEvents {
                events: node.events(last),
            };
        }
        Request::ClusterDb => return Response::ClusterDb(Box::new(node.db())),
        Request::ClusterUpdate { update } => node
            .update(update)
            .await
            .map(|seq| format!("update {seq} committed: every member of the view has it")),
        Request::NodePause { node: name, paused } => node.set_paused(&name, paused).await,
        Request::NodeLeave { node: name } => node.leave(&name).await,
        other => Err(NodeRequestError::Refused(format!(
            "not a cluster request: {other:?}"
        ))),
    };
    match outcome {
        Ok(message) => Response::Ok { message },
        Err(NodeRequestError::UnknownNode(n)) => Response::NotFound {
            what: format!("node `{n}`"),
        },
        Err(NodeRequestError::Update(GumError::Invalid(UpdateError::NotFound { what, name }))) => {
            Response::NotFound {
                what: format!("{what} `{name}` in the cluster database"),
            }
        }
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

async fn operate(
    shared: &Shared,
    write: &mut (impl AsyncWriteExt + Unpin),
    service: &str,
    input: Input,
    what: &str,
) -> std::io::Result<()> {
    match shared.actor(service) {
        Some(a) => {
            let response = match a.cast(ServiceMsg::Input(input)) {
                Ok(()) => Response::Ok {
                    message: format!("{service}: {what}"),
                },
                Err(e) => Response::Error {
                    message: format!("{service}: supervisor unavailable ({e}); try again"),
                },
            };
            send(write, &response).await
        }
        None => {
            send(
                write,
                &Response::NotFound {
                    what: format!("service `{service}`"),
                },
            )
            .await
        }
    }
}

/// Asks every service's supervisor at once (in configuration order in the report), so that
/// with many services on a busy host the answer takes as long as the slowest supervisor, not
/// their sum (100 services at 20 ms each would outlast a client's 1 s timeout).
async fn status(shared: &Shared) -> StatusReport {
    let asks = shared
        .actors_in_order()
        .into_iter()
        .map(|(name, actor)| async move {
            match actor.call(ServiceMsg::Status, Some(STATUS_TIMEOUT)).await {
                Ok(ractor::rpc::CallResult::Success(s)) => s,
                _ => ServiceStatus {
                    name,
                    cgroup: false,
                    view: unknown_view(),
                    transparent: None,
                },
            }
        });
    let services = futures_util::future::join_all(asks).await;
    StatusReport {
        node: shared.node.clone(),
        watchd_pid: std::process::id(),
        config: shared.config_path.display().to_string(),
        services,
        listener: shared.counters.snapshot(),
    }
}

fn unknown_view() -> View {
    View {
        state: "unknown".into(),
        pid: None,
        uptime_ms: None,
        restarts: 0,
        restarts_in_window: 0,
        consecutive_failures: 0,
        last_exit: None,
        failed_reason: None,
        status_text: Some("supervisor did not answer (restarting?)".into()),
        registered: false,
        heartbeats: vec![],
        backoff_ms: None,
        checkpoint: None,
        readies: 0,
    }
}

async fn send(
    write: &mut (impl AsyncWriteExt + Unpin),
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}
