//! Assembles a running watchd: data directory and its lock, registry, cgroup root, application
//! listener, actor tree, cluster node (its thread, listeners and membership), control server,
//! and the signals (SIGHUP reloads; SIGTERM and SIGINT stop every service, then watchd).
//!
//! Nothing here makes a supervision decision; it only wires the parts together.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ractor::Actor;

use crate::api::CONTROL_SOCKET;
use crate::cgroup::CgroupRoot;
use crate::config::Config;
use crate::events::Events;
use crate::listener::{self, Counters, Directory, Protocol};
use crate::machine::Input;
use crate::node::NodeHandle;
use crate::node::rt::NodeRuntime;
use crate::node::store::Store;
use crate::registry::Registry;
use crate::supervisor::{Root, RootArgs, RootMsg, ServiceMsg, Shared};
use crate::{control, logs};

/// The lock file that keeps two watchds off one data directory.
pub const LOCK_FILE: &str = "watchd.lock";
/// How often captured logs are checked for rotation.
const LOG_ROTATE_CHECK: Duration = Duration::from_secs(10);
/// Extra time allowed on shutdown beyond the longest stop grace.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(2);

/// Options that do not belong in the configuration file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Accept test-only control requests (fault injection).
    pub test_hooks: bool,
}

/// Runs watchd until SIGTERM/SIGINT.
pub async fn run(config_path: PathBuf, config: Config, options: Options) -> anyhow::Result<()> {
    let data_dir = config.watchd.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("logs"))
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;
    let registry = Registry::open(&data_dir).context("cannot open the registry")?;
    let events = Arc::new(Events::new(config.watchd.events_keep));
    let node = config.node_name();

    let cgroups = if config.watchd.cgroups {
        match CgroupRoot::detect(&instance_name(&data_dir)) {
            Ok(Some(root)) => Some(root),
            Ok(None) => {
                tracing::warn!(
                    "no writable cgroup v2 here: services are confined by process group only"
                );
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cgroup v2 unusable: services are confined by process group only");
                None
            }
        }
    } else {
        None
    };
    let cgroup_prefix = cgroups
        .as_ref()
        .and_then(|_| own_cgroup_prefix(&instance_name(&data_dir)));
    let directory = Arc::new(Directory::new(cgroup_prefix));
    let counters = Arc::new(Counters::default());
    let ft_socket = data_dir.join(listener::FT_SOCKET_FILE);
    let notify_socket = data_dir.join(listener::NOTIFY_SOCKET_FILE);
    let shared = Arc::new(Shared::new(
        node.clone(),
        data_dir.clone(),
        config_path.clone(),
        events.clone(),
        registry.clone(),
        directory.clone(),
        counters.clone(),
        cgroups,
        ft_socket.clone(),
        notify_socket.clone(),
        options.test_hooks,
    ));
    // A cluster node gets its own real-time thread; the cluster listeners are bound there so
    // that heartbeats are read on time however busy this thread is.
    let node_rt = match &config.cluster {
        Some(_) => Some(NodeRuntime::start().context("cannot start the cluster node thread")?),
        None => None,
    };
    let repl_setup = match &node_rt {
        Some(rt) => {
            let (cfg, instance) = (config.clone(), instance_name(&data_dir));
            rt.handle()
                .spawn(async move { crate::repl::setup(&cfg, &instance).await })
                .await
                .context("the cluster node thread failed")?
        }
        None => crate::repl::setup(&config, &instance_name(&data_dir)).await,
    }
    .context("cannot set up file replication")?;
    let cluster_node = match (&node_rt, &repl_setup) {
        (Some(rt), Some(setup)) => {
            let store = Store::open(&data_dir).context("cannot open the cluster state")?;
            Some(Arc::new(
                NodeHandle::start(&config, rt, setup.listeners(), store)
                    .await
                    .context("cannot start cluster membership")?,
            ))
        }
        _ => None,
    };
    if let Some(setup) = repl_setup {
        let _ = shared.repl_env.set(setup.env.clone());
        let (repl, _) = Actor::spawn(
            None,
            crate::repl::ReplSupervisor,
            crate::repl::ReplArgs {
                setup,
                events: events.clone(),
            },
        )
        .await
        .context("cannot start the replication supervisor")?;
        // Services log into the rings the pumps create: they start once the pumps run.
        crate::repl::wait_started(&repl, crate::repl::STARTUP_WAIT).await;
        let _ = shared.repl.set(repl);
    }
    let ft_sender = listener::start(
        &ft_socket,
        Protocol::Ft,
        directory.clone(),
        shared.clone(),
        counters.clone(),
    )
    .with_context(|| format!("cannot listen on {}", ft_socket.display()))?;
    shared.set_ft_sender(ft_sender);
    listener::start(
        &notify_socket,
        Protocol::Notify,
        directory,
        shared.clone(),
        counters,
    )
    .with_context(|| format!("cannot listen on {}", notify_socket.display()))?;

    let control_path = data_dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&control_path);
    let control_listener = tokio::net::UnixListener::bind(&control_path)
        .with_context(|| format!("cannot listen on {}", control_path.display()))?;
    std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o660))?;

    let max_grace = config
        .services
        .iter()
        .map(|s| s.stop.grace)
        .max()
        .unwrap_or_default();
    let log_max = config.watchd.log_max_bytes.0;
    let log_keep = config.watchd.log_keep;
    let config_for_groups = config.clone();
    let (root, root_handle) = Actor::spawn(
        None,
        Root,
        RootArgs {
            shared: shared.clone(),
            config,
        },
    )
    .await
    .context("cannot start the root supervisor")?;
    if let Some(node) = &cluster_node {
        let groups =
            crate::group::executor::start(node.clone(), shared.clone(), &config_for_groups)
                .await
                .context("cannot start the group executor")?;
        let _ = shared.groups.set(groups);
    }
    tokio::spawn(control::serve(
        control_listener,
        shared.clone(),
        root.clone(),
        cluster_node.clone(),
    ));
    tokio::spawn(rotate_logs(shared.clone(), log_max, log_keep));
    shared.events.emit(
        None,
        crate::machine::EventKind::Started,
        format!("watchd {} started on node {node}", std::process::id()),
    );
    tracing::info!(data_dir = %data_dir.display(), control = %control_path.display(), "watchd running");

    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match root.call(RootMsg::Reload, Some(Duration::from_secs(30))).await {
                    Ok(ractor::rpc::CallResult::Success(r)) => tracing::info!(?r, "reload on SIGHUP"),
                    other => tracing::error!(?other, "reload on SIGHUP failed"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping every service");
    shutdown(&shared, max_grace + SHUTDOWN_MARGIN).await;
    root.stop(None);
    let _ = root_handle.await;
    if let Some(cluster_node) = &cluster_node {
        cluster_node.shutdown().await;
    }
    registry.sync();
    // Empty cgroups are ours to clean; one that still holds a process (a service that outlived
    // its stop) stays, and rmdir refuses it.
    if let Some(cgroups) = &shared.cgroups
        && let Err(e) = cgroups.remove()
    {
        tracing::warn!(error = %e, "cgroups of this watchd left in place");
    }
    let _ = std::fs::remove_file(&control_path);
    // Last: the node thread also serves the cluster listeners.
    drop(cluster_node);
    drop(node_rt);
    Ok(())
}

/// Stops every service and waits (bounded) until none has a process.
async fn shutdown(shared: &Shared, bound: Duration) {
    let actors = shared.actors_in_order();
    for (_, a) in &actors {
        let _ = a.cast(ServiceMsg::Input(Input::Stop));
    }
    let deadline = tokio::time::Instant::now() + bound;
    while tokio::time::Instant::now() < deadline {
        let mut alive = 0;
        for (_, a) in &actors {
            if let Ok(ractor::rpc::CallResult::Success(s)) = a
                .call(ServiceMsg::Status, Some(Duration::from_secs(1)))
                .await
                && s.view.pid.is_some()
            {
                alive += 1;
            }
        }
        if alive == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("some services did not stop within {bound:?}");
}

async fn rotate_logs(shared: Arc<Shared>, max: u64, keep: u32) {
    let mut tick = tokio::time::interval(LOG_ROTATE_CHECK);
    loop {
        tick.tick().await;
        let paths: Vec<PathBuf> = shared
            .actors_in_order()
            .into_iter()
            .map(|(n, _)| logs::log_path(&shared.data_dir, &n))
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for p in paths {
                if let Err(e) = logs::rotate_if_needed(&p, max, keep) {
                    tracing::warn!(path = %p.display(), error = %e, "log rotation failed");
                }
            }
        })
        .await;
    }
}

/// Holds an exclusive lock on the data directory for watchd's lifetime.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            bail!(
                "another watchd is running on data directory {}",
                data_dir.display()
            )
        }
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    }
}

/// A stable, short, path-safe name for this data directory's cgroup.
pub fn instance_name(data_dir: &Path) -> String {
    let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    // FNV-1a: stable across runs and builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The cgroup path (as `/proc/PID/cgroup` shows it) under which services' cgroups live.
fn own_cgroup_prefix(instance: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim_end_matches('/');
    Some(format!("{own}/ftkit-{instance}"))
}
