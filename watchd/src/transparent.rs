//! Transparent checkpoints of one service, taken by watchd with `ckpt::proc`: a dedicated OS
//! thread per service (the [`Checkpointer`]) owns the write tracker of the running instance and
//! makes every ptrace call — periodic and requested dumps, rollbacks, restores — so that the
//! tracer of a process is always the same thread and no actor's event loop ever blocks on one.
//! It never signals, reaps or decides to restart a service: the supervisor does that.
//!
//! ```text
//!  actor ── Track/Untrack/Settings/Dump/Rollback/Restore ──► checkpointer thread ──► ckpt::proc
//!    ▲                                                            │
//!    └────────── replies (oneshot), events, last dump ◄───────────┘
//! ```

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ckpt::proc::{self, DumpOptions, ProcError, RestoreOptions, Tracker};
use ckpt::{Store, StoreError, StorePolicy};
use tokio::sync::oneshot;

use crate::api::{TransparentCheckpoint, TransparentRollback, TransparentStatus};
use crate::config::ServiceConfig;
use crate::events::Events;
use crate::logs::{self, LOG_FILE_MODE};
use crate::machine::EventKind;
use crate::process::{self, SpawnSpec, Spawned};

/// Directory of a service's transparent checkpoints inside its checkpoint directory
/// (`<data_dir>/ckpt/<service>/`, whose numbered directories are libft's streams).
pub const STORE_SUBDIR: &str = "transparent";

/// `/proc/PID/stat` state letters of a stopped process (job control, or traced by another).
const STOPPED_STATES: [char; 2] = ['T', 't'];

/// Where the transparent checkpoints of `service` are kept.
pub fn store_dir(data_dir: &Path, service: &str) -> PathBuf {
    data_dir.join("ckpt").join(service).join(STORE_SUBDIR)
}

/// Why a transparent checkpoint, rollback or restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    /// No process of the service is running.
    #[error("`{service}` has no running process")]
    NotRunning {
        /// The service.
        service: String,
    },
    /// The store holds no good image (or not the one asked for).
    #[error("`{service}` has no such transparent checkpoint: {reason}")]
    NoCheckpoint {
        /// The service.
        service: String,
        /// What the store said.
        reason: String,
    },
    /// The store could not be opened.
    #[error("transparent checkpoint store of `{service}`: {source}")]
    Store {
        /// The service.
        service: String,
        /// The store's error.
        source: StoreError,
    },
    /// ckpt::proc failed.
    #[error("`{service}`: {source}")]
    Proc {
        /// The service.
        service: String,
        /// What failed.
        source: ProcError,
    },
    /// The service's stdout/stderr log or cgroup could not be prepared for a restore.
    #[error("`{service}`: {what}: {source}")]
    Prepare {
        /// The service.
        service: String,
        /// What was being prepared.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The checkpointer thread is gone (the service's supervisor is being replaced).
    #[error("the checkpointer of `{service}` is not running")]
    Gone {
        /// The service.
        service: String,
    },
}

impl TransparentError {
    /// True for the valid negative answers (nothing running, no such checkpoint).
    pub fn is_negative(&self) -> bool {
        matches!(
            self,
            TransparentError::NotRunning { .. } | TransparentError::NoCheckpoint { .. }
        )
    }
}

/// What the checkpointer needs of a service's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Dump this often while a process is tracked; only on request when None.
    pub every: Option<Duration>,
    /// The store's retention and chain policy.
    pub policy: StorePolicy,
}

impl Settings {
    /// The settings of a service with `checkpoint.transparent`, else None.
    pub fn from_config(c: &ServiceConfig) -> Option<Settings> {
        c.checkpoint.transparent.then(|| Settings {
            every: c.checkpoint.every,
            policy: StorePolicy {
                keep: usize::try_from(c.checkpoint.keep).unwrap_or(usize::MAX),
                full_every: c.checkpoint.full_every,
            },
        })
    }
}

/// What a restore job starts: the restored process, or (fallback) the spawned command.
#[derive(Debug)]
pub struct Started {
    /// The process, supervised like any spawned one.
    pub spawned: Spawned,
    /// The checkpoint it was restored from; None when it was started from scratch.
    pub restored_from: Option<u64>,
}

type Reply<T> = oneshot::Sender<Result<T, TransparentError>>;

enum Job {
    Settings(Settings),
    Track {
        pid: u32,
        fresh: bool,
    },
    Untrack {
        pid: u32,
    },
    Dump(Reply<TransparentCheckpoint>),
    Rollback {
        seq: Option<u64>,
        reply: Reply<TransparentRollback>,
    },
    Restore {
        spec: Box<SpawnSpec>,
        reply: oneshot::Sender<Result<Started, String>>,
    },
}

/// The last dump that succeeded, and the failures since.
#[derive(Debug, Default)]
struct Last {
    dump: Option<(TransparentCheckpoint, Instant)>,
    failures: u64,
}

/// The handle of one service's checkpointer thread. Dropping it ends the thread once the job
/// it is on (if any) is done.
#[derive(Debug)]
pub struct Checkpointer {
    service: String,
    jobs: mpsc::Sender<Job>,
    last: Arc<Mutex<Last>>,
}

impl Checkpointer {
    /// Starts the thread of `service`, whose store is under `data_dir`.
    pub fn start(
        service: &str,
        data_dir: &Path,
        settings: Settings,
        events: Arc<Events>,
    ) -> std::io::Result<Checkpointer> {
        let (jobs, rx) = mpsc::channel();
        let last = Arc::new(Mutex::new(Last::default()));
        let worker = Worker {
            service: service.to_owned(),
            dir: store_dir(data_dir, service),
            log: logs::log_path(data_dir, service),
            settings,
            store: None,
            tracked: None,
            floor: None,
            due: None,
            last_error: None,
            events,
            last: last.clone(),
        };
        std::thread::Builder::new()
            .name(format!("ckpt-{service}"))
            .spawn(move || worker.run(&rx))?;
        Ok(Checkpointer {
            service: service.to_owned(),
            jobs,
            last,
        })
    }

    /// New settings (a reload changed the service's checkpoint table).
    pub fn configure(&self, settings: Settings) {
        let _ = self.jobs.send(Job::Settings(settings));
    }

    /// `pid` is the service's process now: track its writes and dump it on schedule. A
    /// `fresh` one was started from scratch: checkpoints taken before it are of another life of
    /// the service and are never restored from.
    pub fn track(&self, pid: u32, fresh: bool) {
        let _ = self.jobs.send(Job::Track { pid, fresh });
    }

    /// `pid` is gone: stop tracking it.
    pub fn untrack(&self, pid: u32) {
        let _ = self.jobs.send(Job::Untrack { pid });
    }

    /// Dumps the tracked process now.
    pub async fn dump(&self) -> Result<TransparentCheckpoint, TransparentError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Job::Dump(reply), rx).await
    }

    /// Rolls the tracked process back to image `seq` (the newest good one when None).
    pub async fn rollback(
        &self,
        seq: Option<u64>,
    ) -> Result<TransparentRollback, TransparentError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Job::Rollback { seq, reply }, rx).await
    }

    /// Brings the service back from its newest good checkpoint, or, when that is not
    /// possible (the reason is recorded as an event), spawns `spec`. The answer comes on the
    /// returned channel; a closed channel means the thread is gone.
    pub fn restore(&self, spec: SpawnSpec) -> oneshot::Receiver<Result<Started, String>> {
        let (reply, rx) = oneshot::channel();
        // A send fails only when the thread is gone; the dropped reply then closes `rx`.
        let _ = self.jobs.send(Job::Restore {
            spec: Box::new(spec),
            reply,
        });
        rx
    }

    /// The last dump that succeeded, as `status` shows it.
    pub fn status(&self) -> Option<TransparentStatus> {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.dump.as_ref().map(|(d, at)| TransparentStatus {
            seq: d.seq,
            pages: d.pages,
            full: d.parent.is_none(),
            pause_us: d.pause_us,
            age_ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
            failures: last.failures,
        })
    }

    async fn ask<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, TransparentError>>,
    ) -> Result<T, TransparentError> {
        let gone = || TransparentError::Gone {
            service: self.service.clone(),
        };
        self.jobs.send(job).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// The thread's state.
struct Worker {
    service: String,
    dir: PathBuf,
    /// The service's stdout/stderr log: left out of every dump, so a dump never copies it
    /// and a rollback never cuts it back (the service writes on at its end).
    log: PathBuf,
    settings: Settings,
    store: Option<Store>,
    /// The running instance and its write tracker (made at its first dump).
    tracked: Option<(u32, Option<Tracker>)>,
    /// The newest image when the service was last started from scratch: restores use only
    /// newer ones.
    floor: Option<u64>,
    /// When the next periodic dump is due.
    due: Option<Instant>,
    /// The last failure reported as an event, so a failure that repeats every period is
    /// reported once.
    last_error: Option<String>,
    events: Arc<Events>,
    last: Arc<Mutex<Last>>,
}

impl Worker {
    fn run(mut self, rx: &mpsc::Receiver<Job>) {
        loop {
            let job = match self.due {
                Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(job) => Some(job),
                    Err(_) => return,
                },
            };
            match job {
                Some(job) => self.handle(job),
                None => self.periodic(),
            }
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Settings(settings) => {
                if settings.policy != self.settings.policy {
                    self.store = None;
                }
                self.settings = settings;
                self.schedule();
            }
            Job::Track { pid, fresh } => {
                if fresh {
                    self.floor = self.newest_image();
                }
                self.tracked = Some((pid, None));
                self.schedule();
            }
            Job::Untrack { pid } => {
                if self.tracked.as_ref().is_some_and(|(p, _)| *p == pid) {
                    self.tracked = None;
                    self.due = None;
                }
            }
            Job::Dump(reply) => {
                let result = self.dump();
                if let Err(e) = &result
                    && !e.is_negative()
                {
                    self.failed(e);
                }
                self.schedule();
                let _ = reply.send(result);
            }
            Job::Rollback { seq, reply } => {
                let _ = reply.send(self.rollback(seq));
            }
            Job::Restore { spec, reply } => {
                let _ = reply.send(self.restore_or_spawn(&spec));
            }
        }
    }

    /// The next periodic dump is one period from now (none without a period or a process).
    fn schedule(&mut self) {
        self.due = match (self.settings.every, &self.tracked) {
            (Some(every), Some(_)) => Some(Instant::now() + every),
            _ => None,
        };
    }

    fn periodic(&mut self) {
        let stopped = self.tracked.as_ref().is_some_and(|(pid, _)| {
            process_state(*pid).is_some_and(|s| STOPPED_STATES.contains(&s))
        });
        // A stopped process makes no progress worth keeping, and its newest checkpoint should
        // be from before it stopped (a hang verdict may follow).
        if !stopped
            && let Err(e) = self.dump()
            && !matches!(e, TransparentError::NotRunning { .. })
        {
            self.failed(&e);
        }
        self.schedule();
    }

    fn failed(&mut self, e: &TransparentError) {
        let message = e.to_string();
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failures += 1;
        if self.last_error.as_deref() != Some(message.as_str()) {
            self.events.emit(
                Some(&self.service),
                EventKind::CheckpointFailed,
                format!("transparent checkpoint failed; the service runs on: {message}"),
            );
            self.last_error = Some(message);
        }
    }

    fn store(&mut self) -> Result<&Store, TransparentError> {
        if self.store.is_none() {
            let store = Store::open(&self.dir, &self.service, self.settings.policy.clone())
                .map_err(|source| TransparentError::Store {
                    service: self.service.clone(),
                    source,
                })?;
            self.store = Some(store);
        }
        Ok(self.store.as_ref().expect("opened just above"))
    }

    /// The newest committed image, good or not.
    fn newest_image(&mut self) -> Option<u64> {
        match self.store().map(|s| s.list()) {
            Ok(Ok(images)) => images.iter().map(|i| i.seq).max(),
            Ok(Err(e)) => {
                tracing::warn!(service = %self.service, error = %e, "cannot list transparent checkpoints");
                None
            }
            Err(e) => {
                tracing::warn!(service = %self.service, error = %e, "cannot open transparent checkpoints");
                None
            }
        }
    }

    fn proc_err(&self, source: ProcError) -> TransparentError {
        let service = self.service.clone();
        match source {
            ProcError::NoImage { .. } | ProcError::Store(StoreError::NotFound { .. }) => {
                TransparentError::NoCheckpoint {
                    service,
                    reason: source.to_string(),
                }
            }
            ProcError::NoSuchProcess { .. } | ProcError::Exited { .. } => {
                TransparentError::NotRunning { service }
            }
            source => TransparentError::Proc { service, source },
        }
    }

    fn dump(&mut self) -> Result<TransparentCheckpoint, TransparentError> {
        let Some(pid) = self.tracked.as_ref().map(|(p, _)| *p) else {
            return Err(TransparentError::NotRunning {
                service: self.service.clone(),
            });
        };
        let store = self.store()?.clone();
        let (_, tracker) = self.tracked.as_mut().expect("checked above");
        let raw = i32::try_from(pid).map_err(|_| TransparentError::NotRunning {
            service: self.service.clone(),
        })?;
        let tracker = tracker.get_or_insert_with(|| Tracker::new(raw));
        let opts = DumpOptions {
            exclude_paths: vec![self.log.clone()],
            ..DumpOptions::default()
        };
        let d = proc::dump_incremental(tracker, &store, &opts).map_err(|e| self.proc_err(e))?;
        let report = TransparentCheckpoint {
            service: self.service.clone(),
            pid,
            seq: d.seq,
            parent: d.parent,
            pages: d.pages,
            image_bytes: d.image_bytes,
            pause_us: micros(d.pause),
            total_us: micros(d.total),
            unrestorable: d
                .unrestorable
                .iter()
                .map(|u| format!("fd {}: {}", u.fd, u.what))
                .collect(),
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.dump = Some((report.clone(), Instant::now()));
        last.failures = 0;
        self.last_error = None;
        Ok(report)
    }

    fn rollback(&mut self, seq: Option<u64>) -> Result<TransparentRollback, TransparentError> {
        let Some(pid) = self.tracked.as_ref().map(|(p, _)| *p) else {
            return Err(TransparentError::NotRunning {
                service: self.service.clone(),
            });
        };
        let raw = i32::try_from(pid).map_err(|_| TransparentError::NotRunning {
            service: self.service.clone(),
        })?;
        let store = self.store()?.clone();
        // The tracker's parent no longer describes the memory: the next dump is full.
        self.tracked = Some((pid, None));
        let r = proc::rollback(raw, &store, seq).map_err(|e| self.proc_err(e))?;
        let report = TransparentRollback {
            service: self.service.clone(),
            pid,
            seq: r.seq,
            pause_us: micros(r.pause),
        };
        self.events.emit(
            Some(&self.service),
            EventKind::RolledBack,
            format!(
                "pid {pid} rolled back to transparent checkpoint #{} (paused {} µs)",
                r.seq, report.pause_us
            ),
        );
        Ok(report)
    }

    fn restore_or_spawn(&mut self, spec: &SpawnSpec) -> Result<Started, String> {
        match self.restore(spec) {
            Ok(started) => {
                self.events.emit(
                    Some(&self.service),
                    EventKind::Restored,
                    format!(
                        "restored from transparent checkpoint #{} as pid {}",
                        started.restored_from.unwrap_or_default(),
                        started.spawned.pid
                    ),
                );
                Ok(started)
            }
            Err(e) => {
                self.events.emit(
                    Some(&self.service),
                    EventKind::RestoreFailed,
                    format!("cannot restore, starting from scratch: {e}"),
                );
                process::spawn(spec)
                    .map(|spawned| Started {
                        spawned,
                        restored_from: None,
                    })
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The newest good checkpoint as a new child of this thread, in the service's cgroup, with
    /// the service's log as stdout and stderr and its own process group.
    fn restore(&mut self, spec: &SpawnSpec) -> Result<Started, TransparentError> {
        let service = self.service.clone();
        let prepare = |what: &'static str| {
            let service = service.clone();
            move |source: std::io::Error| TransparentError::Prepare {
                service,
                what,
                source,
            }
        };
        let store = self.store()?.clone();
        let floor = self.floor;
        let too_old = |seq: u64| floor.is_some_and(|f| seq <= f);
        if self.newest_image().is_none_or(too_old) {
            return Err(TransparentError::NoCheckpoint {
                service,
                reason: "none taken since it was last started from scratch".into(),
            });
        }
        let log = open_log(&spec.log_path).map_err(prepare("open the log"))?;
        let log2 = log.try_clone().map_err(prepare("open the log"))?;
        let cgroup = match &spec.cgroup {
            Some(cg) => {
                // Linux 6.18 kills a child cloned into a cgroup that was ever killed through
                // cgroup.kill (as the crash that brought us here did): a fresh, empty cgroup
                // has a clean counter (see process.rs).
                if let Err(e) = cg.recreate_if_empty() {
                    tracing::warn!(service = %service, error = %e, "cannot recreate the cgroup");
                }
                Some(
                    cg.dir_fd()
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .map_err(prepare("open the cgroup"))?,
                )
            }
            None => None,
        };
        let opts = RestoreOptions {
            fds: vec![(1, log), (2, log2)],
            keep_file_contents: false,
            cgroup,
        };
        let r = proc::restore(&store, None, opts).map_err(|e| self.proc_err(e))?;
        let pid = u32::try_from(r.pid).map_err(|_| TransparentError::Proc {
            service: service.clone(),
            source: ProcError::Stub {
                reason: format!("restore returned pid {}", r.pid),
            },
        })?;
        // Like a spawned service, its own process group (signals without a cgroup reach the
        // tree through it). The stub never exec'd, so its parent may still set it.
        if let Err(e) = nix::unistd::setpgid(
            nix::unistd::Pid::from_raw(r.pid),
            nix::unistd::Pid::from_raw(r.pid),
        ) {
            tracing::warn!(service = %service, pid, error = %e, "cannot give the restored process its own group");
        }
        let kill = |pidfd: &OwnedFd| {
            let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
            let _ = rustix::process::waitid(
                rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(pidfd)),
                rustix::process::WaitIdOptions::EXITED,
            );
        };
        if too_old(r.seq) {
            // The newer images did not verify and restore fell back to an older life.
            kill(&r.pidfd);
            return Err(TransparentError::NoCheckpoint {
                service,
                reason: format!(
                    "image #{} is the newest good one, and it is from before the last start from scratch",
                    r.seq
                ),
            });
        }
        let start_time = match process::start_time(pid) {
            Ok(t) => t,
            Err(e) => {
                kill(&r.pidfd);
                return Err(TransparentError::Prepare {
                    service,
                    what: "read the restored process's start time",
                    source: std::io::Error::other(e.to_string()),
                });
            }
        };
        Ok(Started {
            spawned: Spawned {
                pid,
                pidfd: r.pidfd,
                start_time,
            },
            restored_from: Some(r.seq),
        })
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The state letter of `/proc/PID/stat`.
fn process_state(pid: u32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    rest.split_whitespace().next()?.chars().next()
}

/// The service's stdout/stderr file, opened for appending like a spawn opens it.
fn open_log(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_FILE_MODE)
        .open(path)?;
    Ok(OwnedFd::from(file))
}
