//! The rules of supervising one service, as a sans-IO state machine.
//!
//! It owns the restart policy, backoff with jitter, the restart budget and escalation, readiness,
//! heartbeat (FtHbeat) and sd_notify watchdog deadlines, probe thresholds and rejuvenation. It
//! never touches a process, a socket or a clock: time comes in with every input and effects go
//! out as [`Action`]s, so every rule is tested with simulated time.
//!
//! ```text
//!            inputs (now, Input)                      actions
//!  actor ──────────────────────────► ServiceMachine ─────────────► actor: spawn, signal tree,
//!    ▲                                     │                        record event, escalate
//!    └──── timer at next_deadline() ◄──────┘
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{MAX_HEARTBEAT_TIMEOUT, RestartPolicy, ServiceConfig};

/// Monotonic time as the machine sees it. The actor passes `tokio::time::Instant`s converted to
/// this; tests pass simulated time.
pub type Instant = std::time::Instant;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// exit(code)
    Code(i32),
    /// killed by a signal
    Signal(i32),
    /// ended, but watchd could not learn how (an adopted process is not watchd's child)
    Unknown,
}

impl ExitStatus {
    /// Whether the end counts as a failure for `on-failure`.
    pub fn is_failure(self) -> bool {
        !matches!(self, ExitStatus::Code(0))
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
            ExitStatus::Unknown => write!(f, "ended (status unknown)"),
        }
    }
}

/// Which signal the executor sends to the whole process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeSignal {
    /// SIGTERM: please stop.
    Term,
    /// SIGKILL: stop now (or cgroup.kill).
    Kill,
}

/// What happens to the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An operator (or autostart) wants the service running.
    Start,
    /// An operator wants it stopped.
    Stop,
    /// An operator wants it restarted; does not count against the budget.
    Restart,
    /// The executor started the process.
    Spawned {
        /// Its pid.
        pid: u32,
    },
    /// The executor could not start it.
    SpawnFailed {
        /// Why.
        error: String,
    },
    /// A recorded process of an earlier watchd is still alive and now watched again.
    Adopted {
        /// Its pid.
        pid: u32,
    },
    /// The main process ended.
    Exited {
        /// Its pid.
        pid: u32,
        /// How.
        status: ExitStatus,
    },
    /// libft `ft_reg_watch`.
    Register,
    /// libft `ft_del_watch`: heartbeat regions are dropped.
    Unregister,
    /// READY (libft or sd_notify).
    Ready,
    /// FtHbeat: thread `tid` promises its next heartbeat within `timeout`.
    Heartbeat {
        /// Application thread id.
        tid: u32,
        /// Deadline from now.
        timeout: Duration,
    },
    /// The same, learnt later: the heartbeat arrived earlier and set this absolute deadline
    /// (the heartbeat board hands them over this way).
    HeartbeatUntil {
        /// Application thread id.
        tid: u32,
        /// When its next heartbeat is due.
        deadline: Instant,
    },
    /// Thread `tid` left its monitored region.
    HeartbeatEnd {
        /// Application thread id.
        tid: u32,
    },
    /// sd_notify `WATCHDOG=1`.
    Watchdog,
    /// sd_notify `WATCHDOG=trigger`: the service declares itself hung.
    WatchdogTrigger,
    /// sd_notify `STATUS=` or libft status.
    Status(String),
    /// A probe finished.
    Probe {
        /// Index into the configured probes.
        index: usize,
        /// Whether it passed.
        ok: bool,
        /// What it saw.
        detail: String,
    },
    /// Resident memory of the service's processes.
    Rss {
        /// Bytes.
        bytes: u64,
    },
    /// The application committed a checkpoint.
    Checkpointed {
        /// Its stream.
        stream: u32,
        /// Its sequence number.
        seq: u64,
        /// Image size.
        bytes: u64,
        /// How long the application paused for it.
        pause: Duration,
    },
    /// A timer set for `next_deadline` fired (or anything else wants deadlines checked).
    Tick,
}

/// What the machine asks the executor to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start the program; answer with `Spawned` or `SpawnFailed`.
    Spawn,
    /// Signal every process of the service (its cgroup, else its process group).
    Signal {
        /// The main pid the machine knows.
        pid: u32,
        /// Which signal.
        signal: TreeSignal,
    },
    /// Record an event (ftctl events, log).
    Report(Event),
    /// The restart budget is exhausted: run the escalation hook.
    Escalate {
        /// Why.
        reason: String,
    },
}

/// Kinds of events, as `ftctl events` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A process was started.
    Spawned,
    /// Starting failed.
    SpawnFailed,
    /// The service said READY, or its ready delay passed.
    Ready,
    /// The main process ended.
    Exited,
    /// A hang verdict: a heartbeat, watchdog, ready deadline or probe failed.
    Hang,
    /// A restart is scheduled after a delay.
    RestartScheduled,
    /// Stopping began (SIGTERM sent).
    Stopping,
    /// The grace ran out: SIGKILL sent.
    Killed,
    /// Stopped and will stay stopped.
    Stopped,
    /// Restart budget exceeded, or failed under `never`.
    Failed,
    /// Escalation emitted (hook run).
    Escalated,
    /// A proactive restart: memory limit or schedule.
    Rejuvenate,
    /// A running process of an earlier watchd was taken over.
    Adopted,
    /// A probe failed once (below its threshold).
    ProbeFailed,
    /// watchd started (watchd-wide).
    Started,
    /// The configuration was reloaded (watchd-wide).
    Reloaded,
    /// A new configuration was refused; the running one is kept (watchd-wide).
    ReloadRefused,
    /// A service was added by a reload.
    Added,
    /// A service was removed by a reload.
    Removed,
    /// An actor crashed (panicked) and was restarted; the service was not touched.
    ActorRestarted,
    /// The escalation hook could not be run or failed.
    HookFailed,
    /// A transparent checkpoint was taken on request (periodic ones only show in status).
    Checkpointed,
    /// A transparent checkpoint failed; the service runs on untouched.
    CheckpointFailed,
    /// The service came back from a transparent checkpoint instead of from scratch.
    Restored,
    /// Restoring from a transparent checkpoint was not possible; started from scratch.
    RestoreFailed,
    /// The live service was rolled back to a transparent checkpoint.
    RolledBack,
    /// A group's ownership changed in the cluster database (owner, epoch, state).
    Ownership,
    /// A group run of this node changed state (onlining, online, offlining, offline, failed).
    Group,
    /// A resource of a group run of this node changed state.
    Resource,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// Details for a person.
    pub detail: String,
}

/// Where the service is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Not running and not meant to be.
    Stopped,
    /// Spawn asked for, waiting for `Spawned`.
    Spawning {
        /// Stop as soon as it is spawned.
        stop_requested: bool,
    },
    /// Running, not yet ready.
    Starting {
        /// Main pid.
        pid: u32,
        /// When it started.
        since: Instant,
    },
    /// Running and ready.
    Running {
        /// Main pid.
        pid: u32,
        /// When it started.
        since: Instant,
    },
    /// Signalled, waiting for the exit.
    Stopping {
        /// Main pid.
        pid: u32,
        /// What to do once it is gone.
        then: AfterStop,
        /// When SIGKILL follows (None: already sent).
        kill_at: Option<Instant>,
    },
    /// Waiting out a backoff delay before the next start.
    BackingOff {
        /// When to start.
        until: Instant,
    },
    /// Gave up: budget exceeded, or failed under `never`.
    Failed {
        /// Why.
        reason: String,
    },
}

/// What follows a stop.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterStop {
    /// Stay stopped (operator's stop).
    Stay,
    /// Start again at once, not counted as a failure (operator's restart, rejuvenation).
    Restart,
    /// Treat as a failure (hang verdict): restart under the policy, backoff and budget.
    Fail {
        /// The hang reason.
        reason: String,
    },
}

/// The parts of a service's configuration the rules need.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Restart policy.
    pub policy: RestartPolicy,
    /// First restart after a stable run without delay.
    pub immediate_first: bool,
    /// Backoff.
    pub backoff_initial: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Backoff growth.
    pub backoff_factor: f64,
    /// Jitter fraction.
    pub jitter: f64,
    /// Running this long resets the backoff.
    pub stable_after: Duration,
    /// Budget.
    pub max_restarts: u32,
    /// Budget window.
    pub window: Duration,
    /// Wait for READY.
    pub ready_notify: bool,
    /// READY deadline when notifying.
    pub ready_timeout: Duration,
    /// Otherwise ready after this.
    pub ready_delay: Duration,
    /// SIGTERM → SIGKILL.
    pub stop_grace: Duration,
    /// Honour heartbeats.
    pub heartbeat: bool,
    /// sd_notify watchdog interval.
    pub watchdog: Option<Duration>,
    /// Failure thresholds of the probes, by index.
    pub probe_failures: Vec<u32>,
    /// Rejuvenate above this RSS.
    pub max_rss: Option<u64>,
    /// Rejuvenate after running this long.
    pub rejuvenate_every: Option<Duration>,
    /// How late a heartbeat or `WATCHDOG=1` may reach the machine after it was sent (the
    /// listener's coalescing): a deadline counts as missed only this long after it passed, so
    /// a message sent in time is never judged late.
    pub delivery_grace: Duration,
}

impl Rules {
    /// Takes the rules out of a service's configuration.
    pub fn from_config(s: &ServiceConfig) -> Rules {
        Rules {
            policy: s.restart.policy,
            immediate_first: s.restart.immediate_first,
            backoff_initial: s.restart.backoff_initial,
            backoff_max: s.restart.backoff_max,
            backoff_factor: s.restart.backoff_factor,
            jitter: s.restart.jitter,
            stable_after: s.restart.stable_after,
            max_restarts: s.restart.max_restarts,
            window: s.restart.window,
            ready_notify: s.ready.notify,
            ready_timeout: s.ready.timeout,
            ready_delay: s.ready.delay,
            stop_grace: s.stop.grace,
            heartbeat: s.hang.heartbeat,
            watchdog: s.hang.watchdog,
            probe_failures: s.probes.iter().map(|p| p.failures).collect(),
            max_rss: s.rejuvenate.max_rss.map(|b| b.0),
            rejuvenate_every: s.rejuvenate.every,
            delivery_grace: crate::listener::DELIVERY_GRACE,
        }
    }
}

/// What `ftctl status` shows of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// stopped, starting, running, stopping, backoff, failed.
    pub state: String,
    /// Main pid when running.
    pub pid: Option<u32>,
    /// Milliseconds since the current process started.
    pub uptime_ms: Option<u64>,
    /// Automatic restarts since watchd started watching it.
    pub restarts: u32,
    /// Restarts inside the current budget window.
    pub restarts_in_window: u32,
    /// Consecutive failures without a stable run.
    pub consecutive_failures: u32,
    /// How the last process ended.
    pub last_exit: Option<ExitStatus>,
    /// Why it failed, when failed.
    pub failed_reason: Option<String>,
    /// The last status text the service sent.
    pub status_text: Option<String>,
    /// Whether libft registered.
    pub registered: bool,
    /// Open heartbeat regions: (tid, milliseconds to deadline; negative when overdue).
    pub heartbeats: Vec<(u32, i64)>,
    /// Milliseconds until the next start, while backing off.
    pub backoff_ms: Option<u64>,
    /// The last checkpoint the application reported.
    #[serde(default)]
    pub checkpoint: Option<CheckpointView>,
    /// READY notifications received from the current process.
    #[serde(default)]
    pub readies: u64,
}

/// The last checkpoint an application reported, as `ftctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointView {
    /// Stream (`t_checkpoint(id)`).
    pub stream: u32,
    /// Sequence number.
    pub seq: u64,
    /// Image size in bytes.
    pub bytes: u64,
    /// The application's pause for it, in microseconds.
    pub pause_us: u64,
    /// Milliseconds since it was reported.
    pub age_ms: u64,
}

/// The state machine of one service.
#[derive(Debug, Clone)]
pub struct ServiceMachine {
    rules: Rules,
    phase: Phase,
    /// Times of automatic restarts inside the budget window.
    restart_times: VecDeque<Instant>,
    restarts_total: u32,
    consecutive_failures: u32,
    last_exit: Option<ExitStatus>,
    status_text: Option<String>,
    registered: bool,
    heartbeats: BTreeMap<u32, Instant>,
    watchdog_deadline: Option<Instant>,
    probe_fail_counts: Vec<u32>,
    /// READY arrived while the process was being spawned.
    early_ready: bool,
    /// READY notifications received from the current process (a promoted warm standby sends
    /// one more once it serves).
    readies: u64,
    /// The last checkpoint reported, and when.
    last_checkpoint: Option<(CheckpointView, Instant)>,
    /// The pending or latest spawn brings the service back after a crash or a hang verdict
    /// (not an operator's start or restart, nor a rejuvenation).
    spawn_after_failure: bool,
    rng: u64,
}

impl ServiceMachine {
    /// A stopped service. `seed` drives the backoff jitter (tests pass a fixed one).
    pub fn new(rules: Rules, seed: u64) -> ServiceMachine {
        let probes = rules.probe_failures.len();
        ServiceMachine {
            rules,
            phase: Phase::Stopped,
            restart_times: VecDeque::new(),
            restarts_total: 0,
            consecutive_failures: 0,
            last_exit: None,
            status_text: None,
            registered: false,
            heartbeats: BTreeMap::new(),
            watchdog_deadline: None,
            probe_fail_counts: vec![0; probes],
            early_ready: false,
            readies: 0,
            last_checkpoint: None,
            spawn_after_failure: false,
            rng: seed | 1,
        }
    }

    /// Replaces the rules (reload with a changed configuration keeps the process).
    pub fn set_rules(&mut self, rules: Rules) {
        self.probe_fail_counts = vec![0; rules.probe_failures.len()];
        self.rules = rules;
    }

    /// Whether the spawn asked for last brings the service back after a crash or a hang
    /// verdict (the executor may then restore a checkpoint instead of starting from scratch).
    pub fn spawn_after_failure(&self) -> bool {
        self.spawn_after_failure
    }

    /// The current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The main pid, when a process is alive.
    pub fn pid(&self) -> Option<u32> {
        match self.phase {
            Phase::Starting { pid, .. }
            | Phase::Running { pid, .. }
            | Phase::Stopping { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// Whether a process of the service exists or is being spawned (and may already speak).
    fn process_expected(&self) -> bool {
        self.pid().is_some()
            || matches!(
                self.phase,
                Phase::Spawning {
                    stop_requested: false
                }
            )
    }

    /// Whether probes and RSS sampling should run now.
    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    /// The earliest time at which a `Tick` may change something.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match &self.phase {
            Phase::BackingOff { until } => consider(*until),
            Phase::Stopping {
                kill_at: Some(t), ..
            } => consider(*t),
            Phase::Starting { since, .. } => {
                consider(*since + self.ready_wait());
                self.consider_hang_deadlines(&mut consider);
            }
            Phase::Running { since, .. } => {
                if self.consecutive_failures > 0 {
                    consider(*since + self.rules.stable_after);
                }
                if let Some(every) = self.rules.rejuvenate_every {
                    consider(*since + every);
                }
                self.consider_hang_deadlines(&mut consider);
            }
            _ => {}
        }
        next
    }

    fn consider_hang_deadlines(&self, consider: &mut impl FnMut(Instant)) {
        if let Some(t) = self.heartbeats.values().min() {
            consider(*t + self.rules.delivery_grace);
        }
        if let Some(t) = self.watchdog_deadline {
            consider(t + self.rules.delivery_grace);
        }
    }

    fn ready_wait(&self) -> Duration {
        if self.rules.ready_notify {
            self.rules.ready_timeout
        } else {
            self.rules.ready_delay
        }
    }

    /// Feeds one input and returns what to do.
    pub fn step(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Start => self.on_start(now, &mut out),
            Input::Stop => self.on_stop(now, &mut out),
            Input::Restart => self.on_restart(now, &mut out),
            Input::Spawned { pid } => self.on_spawned(now, pid, &mut out),
            Input::SpawnFailed { error } => {
                if matches!(self.phase, Phase::Spawning { .. }) {
                    report(&mut out, EventKind::SpawnFailed, error.clone());
                    self.last_exit = None;
                    if matches!(
                        self.phase,
                        Phase::Spawning {
                            stop_requested: true
                        }
                    ) {
                        self.phase = Phase::Stopped;
                    } else {
                        self.after_failure(now, format!("cannot start: {error}"), true, &mut out);
                    }
                }
            }
            Input::Adopted { pid } => {
                self.reset_process_state(now);
                self.phase = Phase::Running { pid, since: now };
                report(&mut out, EventKind::Adopted, format!("pid {pid}"));
            }
            Input::Exited { pid, status } => self.on_exited(now, pid, status, &mut out),
            Input::Register => self.registered = true,
            Input::Unregister => {
                self.registered = false;
                self.heartbeats.clear();
            }
            Input::Ready => {
                self.readies = self.readies.saturating_add(1);
                if matches!(self.phase, Phase::Spawning { .. }) {
                    self.early_ready = true;
                }
                if let Phase::Starting { pid, since } = self.phase {
                    self.phase = Phase::Running { pid, since };
                    report(&mut out, EventKind::Ready, format!("pid {pid} said READY"));
                }
            }
            Input::Heartbeat { tid, timeout } => {
                self.heartbeat_until(now, tid, now + timeout.min(MAX_HEARTBEAT_TIMEOUT));
            }
            Input::HeartbeatUntil { tid, deadline } => {
                self.heartbeat_until(now, tid, deadline.min(now + MAX_HEARTBEAT_TIMEOUT));
            }
            Input::HeartbeatEnd { tid } => {
                self.heartbeats.remove(&tid);
            }
            Input::Watchdog => {
                if let (Some(w), true) = (self.rules.watchdog, self.process_expected()) {
                    self.watchdog_deadline = Some(now + w);
                }
            }
            Input::WatchdogTrigger => {
                self.hang(now, "service reported WATCHDOG=trigger".into(), &mut out)
            }
            Input::Status(text) => self.status_text = Some(text),
            Input::Checkpointed {
                stream,
                seq,
                bytes,
                pause,
            } => {
                let pause_us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
                let view = CheckpointView {
                    stream,
                    seq,
                    bytes,
                    pause_us,
                    age_ms: 0,
                };
                self.last_checkpoint = Some((view, now));
            }
            Input::Probe { index, ok, detail } => self.on_probe(now, index, ok, detail, &mut out),
            Input::Rss { bytes } => {
                if let (Some(limit), Phase::Running { pid, .. }) = (self.rules.max_rss, &self.phase)
                    && bytes > limit
                {
                    let pid = *pid;
                    report(
                        &mut out,
                        EventKind::Rejuvenate,
                        format!("resident memory {bytes} bytes passed the limit of {limit}"),
                    );
                    self.begin_stop(now, pid, AfterStop::Restart, TreeSignal::Term, &mut out);
                }
            }
            Input::Tick => self.on_tick(now, &mut out),
        }
        out
    }

    fn on_start(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Stopped | Phase::Failed { .. } | Phase::BackingOff { .. } => {
                // An operator's start is a fresh start: the budget and backoff begin again.
                self.restart_times.clear();
                self.consecutive_failures = 0;
                self.begin_spawn(now, false, out);
            }
            Phase::Spawning {
                ref mut stop_requested,
            } => *stop_requested = false,
            Phase::Stopping { ref mut then, .. } => *then = AfterStop::Restart,
            Phase::Starting { .. } | Phase::Running { .. } => {}
        }
    }

    fn on_stop(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.phase.clone() {
            Phase::Starting { pid, .. } | Phase::Running { pid, .. } => {
                self.begin_stop(now, pid, AfterStop::Stay, TreeSignal::Term, out);
            }
            Phase::Stopping { .. } => {
                if let Phase::Stopping { then, .. } = &mut self.phase {
                    *then = AfterStop::Stay;
                }
            }
            Phase::Spawning { .. } => {
                self.phase = Phase::Spawning {
                    stop_requested: true,
                }
            }
            Phase::BackingOff { .. } | Phase::Failed { .. } => {
                self.phase = Phase::Stopped;
                report(out, EventKind::Stopped, "stopped by request".into());
            }
            Phase::Stopped => {}
        }
    }

    fn on_restart(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.phase.clone() {
            Phase::Starting { pid, .. } | Phase::Running { pid, .. } => {
                self.begin_stop(now, pid, AfterStop::Restart, TreeSignal::Term, out);
            }
            _ => self.on_start(now, out),
        }
    }

    fn on_spawned(&mut self, now: Instant, pid: u32, out: &mut Vec<Action>) {
        let Phase::Spawning { stop_requested } = self.phase else {
            // A spawn we no longer want: make sure it does not outlive us.
            out.push(Action::Signal {
                pid,
                signal: TreeSignal::Kill,
            });
            return;
        };
        self.watchdog_deadline = self.rules.watchdog.map(|w| now + w);
        report(out, EventKind::Spawned, format!("pid {pid}"));
        self.phase = Phase::Starting { pid, since: now };
        if stop_requested {
            self.begin_stop(now, pid, AfterStop::Stay, TreeSignal::Term, out);
        } else if self.rules.ready_notify && self.early_ready {
            self.phase = Phase::Running { pid, since: now };
            report(out, EventKind::Ready, format!("pid {pid} said READY"));
        } else if !self.rules.ready_notify && self.rules.ready_delay.is_zero() {
            self.phase = Phase::Running { pid, since: now };
            report(
                out,
                EventKind::Ready,
                format!("pid {pid} (no readiness notification configured)"),
            );
        }
    }

    fn heartbeat_until(&mut self, _now: Instant, tid: u32, deadline: Instant) {
        if self.rules.heartbeat && self.process_expected() {
            self.registered = true;
            self.heartbeats.insert(tid, deadline);
        }
    }

    /// Asks for a spawn. What the new process says before the executor reports it spawned
    /// (READY, heartbeats, status) is kept: it may speak before its spawn is seen.
    fn begin_spawn(&mut self, now: Instant, after_failure: bool, out: &mut Vec<Action>) {
        self.spawn_after_failure = after_failure;
        self.reset_process_state(now);
        self.early_ready = false;
        self.readies = 0;
        self.phase = Phase::Spawning {
            stop_requested: false,
        };
        out.push(Action::Spawn);
    }

    fn reset_process_state(&mut self, now: Instant) {
        self.registered = false;
        self.heartbeats.clear();
        self.status_text = None;
        self.probe_fail_counts.iter_mut().for_each(|c| *c = 0);
        self.watchdog_deadline = self.rules.watchdog.map(|w| now + w);
    }

    fn on_exited(&mut self, now: Instant, pid: u32, status: ExitStatus, out: &mut Vec<Action>) {
        if self.pid() != Some(pid) {
            return;
        }
        self.last_exit = Some(status);
        self.heartbeats.clear();
        self.watchdog_deadline = None;
        report(out, EventKind::Exited, format!("pid {pid}: {status}"));
        match std::mem::replace(&mut self.phase, Phase::Stopped) {
            Phase::Stopping {
                then: AfterStop::Stay,
                ..
            } => {
                report(out, EventKind::Stopped, "stopped by request".into());
            }
            Phase::Stopping {
                then: AfterStop::Restart,
                ..
            } => {
                self.begin_spawn(now, false, out);
            }
            Phase::Stopping {
                then: AfterStop::Fail { reason },
                ..
            } => {
                self.after_failure(now, reason, true, out);
            }
            _ => {
                let failure = status.is_failure();
                let restart = match self.rules.policy {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => failure,
                    RestartPolicy::Never => false,
                };
                if restart {
                    self.after_failure(now, format!("{status}"), failure, out);
                } else if failure {
                    let reason = format!("{status} (restart policy: {:?})", self.rules.policy);
                    report(out, EventKind::Failed, reason.clone());
                    self.phase = Phase::Failed { reason };
                } else {
                    report(
                        out,
                        EventKind::Stopped,
                        "exited cleanly; not restarted".into(),
                    );
                }
            }
        }
    }

    /// The process is gone and must come back: apply budget and backoff.
    fn after_failure(&mut self, now: Instant, reason: String, counts: bool, out: &mut Vec<Action>) {
        while self
            .restart_times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.rules.window)
        {
            self.restart_times.pop_front();
        }
        if self.restart_times.len() >= self.rules.max_restarts as usize {
            let why = format!(
                "{reason}; restart budget exhausted ({} restarts within {})",
                self.restart_times.len(),
                humantime::format_duration(self.rules.window)
            );
            report(out, EventKind::Failed, why.clone());
            out.push(Action::Escalate {
                reason: why.clone(),
            });
            self.phase = Phase::Failed { reason: why };
            return;
        }
        let delay = self.backoff_delay();
        if counts {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        }
        self.restart_times.push_back(now);
        self.restarts_total = self.restarts_total.saturating_add(1);
        if delay.is_zero() {
            self.begin_spawn(now, true, out);
        } else {
            report(
                out,
                EventKind::RestartScheduled,
                format!(
                    "{reason}; restarting in {}",
                    humantime::format_duration(round_ms(delay))
                ),
            );
            self.phase = Phase::BackingOff { until: now + delay };
        }
    }

    /// Delay before the next restart, from the count of consecutive failures.
    fn backoff_delay(&mut self) -> Duration {
        let k = self.consecutive_failures;
        let step = match (self.rules.immediate_first, k) {
            (true, 0) => return Duration::ZERO,
            (true, k) => k - 1,
            (false, k) => k,
        };
        let base = self.rules.backoff_initial.as_secs_f64()
            * self
                .rules
                .backoff_factor
                .powi(i32::try_from(step.min(64)).unwrap_or(64));
        let capped = base.min(self.rules.backoff_max.as_secs_f64());
        let jittered = capped * (1.0 + self.rules.jitter * (2.0 * self.next_unit() - 1.0));
        Duration::from_secs_f64(jittered.clamp(0.0, self.rules.backoff_max.as_secs_f64()))
    }

    /// A uniform number in [0, 1) from xorshift64*.
    fn next_unit(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn begin_stop(
        &mut self,
        now: Instant,
        pid: u32,
        then: AfterStop,
        sig: TreeSignal,
        out: &mut Vec<Action>,
    ) {
        let kill_at = match sig {
            TreeSignal::Term => {
                report(
                    out,
                    EventKind::Stopping,
                    format!("SIGTERM to pid {pid} and its tree"),
                );
                Some(now + self.rules.stop_grace)
            }
            TreeSignal::Kill => None,
        };
        out.push(Action::Signal { pid, signal: sig });
        self.phase = Phase::Stopping { pid, then, kill_at };
    }

    fn hang(&mut self, now: Instant, reason: String, out: &mut Vec<Action>) {
        let pid = match self.phase {
            Phase::Starting { pid, .. } | Phase::Running { pid, .. } => pid,
            _ => return,
        };
        report(out, EventKind::Hang, format!("pid {pid}: {reason}"));
        self.heartbeats.clear();
        self.watchdog_deadline = None;
        // A hung process may not act on SIGTERM (it may even be stopped): kill the tree.
        self.begin_stop(
            now,
            pid,
            AfterStop::Fail {
                reason: format!("hang: {reason}"),
            },
            TreeSignal::Kill,
            out,
        );
    }

    fn on_probe(
        &mut self,
        now: Instant,
        index: usize,
        ok: bool,
        detail: String,
        out: &mut Vec<Action>,
    ) {
        if !self.is_running() {
            return;
        }
        let (Some(count), Some(&threshold)) = (
            self.probe_fail_counts.get_mut(index),
            self.rules.probe_failures.get(index),
        ) else {
            return;
        };
        if ok {
            *count = 0;
            return;
        }
        *count += 1;
        let n = *count;
        if n >= threshold {
            self.hang(
                now,
                format!("probe {index} failed {n} times in a row: {detail}"),
                out,
            );
        } else {
            report(
                out,
                EventKind::ProbeFailed,
                format!("probe {index} ({n}/{threshold}): {detail}"),
            );
        }
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.phase.clone() {
            Phase::BackingOff { until } if now >= until => {
                // Backing off is only ever entered after a failure.
                self.begin_spawn(now, true, out);
            }
            Phase::Stopping {
                pid,
                then,
                kill_at: Some(t),
            } if now >= t => {
                report(
                    out,
                    EventKind::Killed,
                    format!("grace ran out: SIGKILL to pid {pid} and its tree"),
                );
                out.push(Action::Signal {
                    pid,
                    signal: TreeSignal::Kill,
                });
                self.phase = Phase::Stopping {
                    pid,
                    then,
                    kill_at: None,
                };
            }
            Phase::Starting { pid, since } => {
                if now >= since + self.ready_wait() {
                    if self.rules.ready_notify {
                        let t = humantime::format_duration(self.rules.ready_timeout);
                        self.hang(now, format!("no READY within {t}"), out);
                        return;
                    }
                    self.phase = Phase::Running { pid, since };
                    report(
                        out,
                        EventKind::Ready,
                        format!("pid {pid} running for its ready delay"),
                    );
                }
                self.check_hang_deadlines(now, out);
            }
            Phase::Running { pid, since } => {
                if self.consecutive_failures > 0 && now >= since + self.rules.stable_after {
                    self.consecutive_failures = 0;
                }
                if let Some(every) = self.rules.rejuvenate_every
                    && now >= since + every
                {
                    let every = humantime::format_duration(every);
                    report(
                        out,
                        EventKind::Rejuvenate,
                        format!("scheduled restart after {every}"),
                    );
                    self.begin_stop(now, pid, AfterStop::Restart, TreeSignal::Term, out);
                    return;
                }
                self.check_hang_deadlines(now, out);
            }
            _ => {}
        }
    }

    fn check_hang_deadlines(&mut self, now: Instant, out: &mut Vec<Action>) {
        let grace = self.rules.delivery_grace;
        if let Some((&tid, &deadline)) = self.heartbeats.iter().min_by_key(|(_, d)| **d)
            && now >= deadline + grace
        {
            let late = round_ms(now - deadline);
            let reason = format!(
                "thread {tid} missed its heartbeat deadline (late by {})",
                humantime::format_duration(late)
            );
            self.hang(now, reason, out);
            return;
        }
        if let Some(deadline) = self.watchdog_deadline
            && now >= deadline + grace
        {
            let w = humantime::format_duration(self.rules.watchdog.unwrap_or_default());
            self.hang(now, format!("no WATCHDOG=1 within {w}"), out);
        }
    }

    /// What `ftctl status` shows.
    pub fn view(&self, now: Instant) -> View {
        let (state, uptime, failed_reason, backoff) = match &self.phase {
            Phase::Stopped => ("stopped", None, None, None),
            Phase::Spawning { .. } => ("starting", None, None, None),
            Phase::Starting { since, .. } => ("starting", Some(now - *since), None, None),
            Phase::Running { since, .. } => ("running", Some(now - *since), None, None),
            Phase::Stopping { .. } => ("stopping", None, None, None),
            Phase::BackingOff { until } => (
                "backoff",
                None,
                None,
                Some(until.saturating_duration_since(now)),
            ),
            Phase::Failed { reason } => ("failed", None, Some(reason.clone()), None),
        };
        let window_start = now.checked_sub(self.rules.window);
        View {
            state: state.into(),
            pid: self.pid(),
            uptime_ms: uptime.map(millis),
            restarts: self.restarts_total,
            restarts_in_window: u32::try_from(
                self.restart_times
                    .iter()
                    .filter(|t| window_start.is_none_or(|w| **t > w))
                    .count(),
            )
            .unwrap_or(u32::MAX),
            consecutive_failures: self.consecutive_failures,
            last_exit: self.last_exit,
            failed_reason,
            status_text: self.status_text.clone(),
            registered: self.registered,
            heartbeats: self
                .heartbeats
                .iter()
                .map(|(tid, d)| {
                    let ms = if *d >= now {
                        millis(*d - now).cast_signed()
                    } else {
                        -millis(now - *d).cast_signed()
                    };
                    (*tid, ms)
                })
                .collect(),
            backoff_ms: backoff.map(millis),
            checkpoint: self.last_checkpoint.as_ref().map(|(v, at)| CheckpointView {
                age_ms: millis(now.saturating_duration_since(*at)),
                ..v.clone()
            }),
            readies: self.readies,
        }
    }
}

fn report(out: &mut Vec<Action>, kind: EventKind, detail: String) {
    out.push(Action::Report(Event { kind, detail }));
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(millis(d))
}

#[cfg(test)]
mod tests;
