//! The node's own thread: a current-thread tokio runtime on a dedicated OS thread with
//! real-time priority (SCHED_FIFO, lowest level), so that heartbeats, timers and the cluster
//! sockets keep their timing while services or a CPU hog load every core.
//!
//! It owns only the thread and its priority; what runs on it is the node actor, the membership
//! transport and the cluster listeners. Nothing that spins or blocks may run here: a real-time
//! thread that spins starves the host (the kernel's RT throttling is the only brake).

use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The SCHED_FIFO priority of the node's threads: the lowest real-time level, above every
/// normal thread and below the kernel's own real-time threads.
pub const RT_PRIORITY: i32 = 1;

/// Gives the calling thread SCHED_FIFO priority [`RT_PRIORITY`] (threads and processes it
/// creates get normal priority back: SCHED_RESET_ON_FORK). Returns whether it worked; a
/// failure (no CAP_SYS_NICE, RT budget of a cgroup) is logged and otherwise ignored.
pub fn set_realtime(thread: &str) -> bool {
    let param = libc::sched_param {
        sched_priority: RT_PRIORITY,
    };
    // SAFETY: pid 0 names the calling thread only; `param` is an initialised sched_param that
    // lives across the call, and the kernel only reads it.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc == 0 {
        tracing::info!(
            thread,
            priority = RT_PRIORITY,
            "real-time scheduling (SCHED_FIFO) for the cluster's timing"
        );
        true
    } else {
        tracing::warn!(
            thread,
            error = %io::Error::last_os_error(),
            "cannot get real-time priority; heartbeats may be late under CPU load"
        );
        false
    }
}

/// The running thread. Dropping it stops the runtime (every task on it ends) and joins the
/// thread.
#[derive(Debug)]
pub struct NodeRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    realtime: bool,
}

impl NodeRuntime {
    /// Starts the thread and its runtime.
    pub fn start() -> io::Result<NodeRuntime> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<(Handle, bool)>>();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("watchd-node".into())
            .spawn(move || {
                let realtime = set_realtime("watchd-node");
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((rt.handle().clone(), realtime)));
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        let (handle, realtime) = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the node thread ended during its start"))??;
        Ok(NodeRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
            realtime,
        })
    }

    /// Spawns tasks on the node thread.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Whether the thread got real-time priority.
    pub fn is_realtime(&self) -> bool {
        self.realtime
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_node_thread_and_the_runtime_stops_on_drop() {
        let rt = NodeRuntime::start().expect("start");
        let (tx, rx) = std::sync::mpsc::channel();
        rt.handle().spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the task ran");
        assert_eq!(name.as_deref(), Some("watchd-node"));
        drop(rt);
    }
}
