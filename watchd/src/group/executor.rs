//! The group executor of this node: a ractor actor that follows the cluster node (database,
//! acting verdict, view), feeds [`plan::Plan`] and carries out its steps: it brings the groups
//! this node owns online in dependency order, watches their resources, takes them offline
//! (in reverse order) when they fail, move away or this node stops acting, and reports each
//! outcome with a `ReportGroup` global update. On the update sequencer (the lowest-named
//! member, which the database names its leader) it also runs the failover policy and proposes
//! its decisions. Every ownership change and every state of a run and of its resources is an
//! event and a line of the group journal (`<data_dir>/groups.jsonl`).
//!
//! ```text
//!  NodeHandle ──(poll 50 ms, acting watch)──► Refresh ─┐
//!  online/offline/monitor tasks ──Onlined/Offlined/CheckFailed─┤──► Plan ──► steps ──► tasks,
//!  report tasks ──Reported──────────────────────────────────┘            reports, proposals
//! ```
//!
//! It never decides ownership itself (the policy does, through global updates) and never keeps
//! a resource online once the plan says stop. Quorum-loss stop bound: a node that stops acting
//! keeps its groups only while membership's run lease holds (a quorum still vouches for it) and
//! at most the acting grace, then stops them by force: services killed and addresses deleted
//! at once (within [`FORCED_STOP_SERVICE`], [`FORCED_STOP_IP`]), exec resources through their
//! offline timeouts, filesets and checkpoints back to backups ([`FORCED_STOP_FILESET`]). The
//! lease lapses before any view without that node acts, so a new owner waits only that forced
//! stop bound + [`STOP_MARGIN`], counted from when it first acted without the previous owner,
//! and nothing when it knows the previous owner stopped ([`plan`]). Filesets and checkpoints,
//! fenced by epoch on every replica, come online during that wait; the rest after it. With a quorum disk a node
//! keeps its groups through the whole acting grace (it may regain quorum by taking the disk
//! over when its peer dies, which no lease promises), and the wait counts the grace too.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster::db::{DbContent, GroupState, Ownership, Update, UpdateError};
use cluster::failover::{Decision, PolicyInput};
use cluster::gum::GumError;
use cluster::membership::NodeState;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use self::plan::{Facts, ForcedBounds, ForcedPhase, Plan, PlanConfig, ReportOutcome, Step};
use super::resource::{Health, Resource, ResourceContext, Timeouts};
use super::service::ServiceCatalog;
use crate::events::Events;
use crate::machine::EventKind;
use crate::node::{NodeHandle, NodeRequestError};
use crate::supervisor::Shared;

/// The group journal's file name in the data directory.
pub const JOURNAL_FILE: &str = "groups.jsonl";
/// The journal is moved aside (to `groups.jsonl.1`) beyond this size.
pub const JOURNAL_MAX_BYTES: u64 = 16 << 20;
/// Added to the forced stop bounds in the stop bound: the executor's reaction to the lapse of
/// the run lease (a timer, one message) and the scheduling of the stop's first phase. The
/// forced bounds below leave room for a loaded host (timers seen 100+ ms late on two busy
/// cores): a stop that overruns its bound still killed at its start, but its journal record
/// would come late.
pub const STOP_MARGIN: Duration = Duration::from_millis(150);
/// How long a forced stop of a `service` resource may take: its restarts stopped, its cgroup
/// (or process group) SIGKILLed, its main process reaped. A process cannot act once SIGKILL is
/// delivered (the kill is one write to `cgroup.kill`); the rest is the reaping.
pub const FORCED_STOP_SERVICE: Duration = Duration::from_millis(250);
/// How long a forced stop of an `ip` resource may take: one `ip address del`.
pub const FORCED_STOP_IP: Duration = Duration::from_millis(150);
/// How long a forced stop of a `fileset` or `checkpoint` resource may take: back to the backup
/// role. Its writers were killed in the phase before, and a pump left behind (a role change
/// that outlives the bound) is refused by every backup for its stale epoch anyway.
pub const FORCED_STOP_FILESET: Duration = Duration::from_millis(150);
/// The forced stop bounds of the executor.
pub const FORCED_BOUNDS: ForcedBounds = ForcedBounds {
    service: FORCED_STOP_SERVICE,
    ip: FORCED_STOP_IP,
    fileset: FORCED_STOP_FILESET,
};
/// How many groups a node brings online (or starts standby instances of) at once; more wait
/// their turn (an onlining journals `queued`). A node that takes over many groups at once (its
/// peer died, one batch assigned them all) would otherwise start every service, fileset role
/// change and address together: on a small host the supervisors then answer too late and the
/// onlinings fail and bounce.
pub const ONLINE_CONCURRENCY: usize = 8;
/// How often the cluster node's database and view are looked at for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often the plan and the policy run without any change (failback windows open, failover
/// periods expire, reports that could not be made are retried).
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The same decisions are not proposed again sooner than this after they were.
pub const PROPOSAL_RETRY: Duration = Duration::from_secs(1);
/// How long a looks-alive check may take.
pub const LOOKS_ALIVE_TIMEOUT: Duration = super::resource::DEFAULT_LOOKS_ALIVE_TIMEOUT;
/// How long an is-alive check may take.
pub const IS_ALIVE_TIMEOUT: Duration = super::resource::DEFAULT_IS_ALIVE_TIMEOUT;

/// A resource's state on this node, for `ftctl group status` / `ftctl resource status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalResource {
    /// onlining, online, offlining, offline, failed.
    pub state: String,
    /// Why it failed, when it did.
    pub detail: String,
}

/// A group run of this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRun {
    /// The epoch it runs (or ran) at.
    pub epoch: u64,
    /// onlining, online, offlining, stopped.
    pub phase: String,
    /// Why it stopped, if it did.
    pub why: String,
    /// Its resources.
    pub resources: BTreeMap<String, LocalResource>,
}

/// What the control server reads without asking the actor.
#[derive(Debug, Default)]
pub struct Board {
    runs: Mutex<BTreeMap<String, LocalRun>>,
}

impl Board {
    /// The group runs of this node.
    pub fn runs(&self) -> BTreeMap<String, LocalRun> {
        lock(&self.runs).clone()
    }

    fn resource(&self, group: &str, epoch: u64, resource: &str, state: &str, detail: String) {
        let mut runs = lock(&self.runs);
        if let Some(run) = runs.get_mut(group).filter(|r| r.epoch == epoch) {
            run.resources.insert(
                resource.to_owned(),
                LocalResource {
                    state: state.to_owned(),
                    detail,
                },
            );
        }
    }
}

/// The running executor, as the daemon and the control server hold it.
#[derive(Debug, Clone)]
pub struct GroupsHandle {
    /// The actor.
    pub actor: ActorRef<ExecMsg>,
    /// Its published state.
    pub board: Arc<Board>,
    /// The cluster node it follows.
    pub node: Arc<NodeHandle>,
    /// This node's services (to validate `service` resources).
    pub catalog: ServiceCatalog,
}

/// One line of the group journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// The node that wrote it.
    pub node: String,
    /// `ownership` (a change seen in the database), `group` (a run of this node), `resource`,
    /// `standby` (a warm standby instance of a service resource), or `decision` (proposed by
    /// this node's policy).
    pub kind: String,
    /// The group.
    pub group: String,
    /// The epoch.
    pub epoch: u64,
    /// The state reached (for ownership: the database's group state).
    pub state: String,
    /// The resource (kind `resource`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The owner (kind `ownership`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Details for a person.
    pub detail: String,
}

/// Appends journal records (one JSON object per line), moving a full journal aside.
#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: Mutex<Option<(std::fs::File, u64)>>,
}

impl Journal {
    fn new(data_dir: &Path) -> Journal {
        Journal {
            path: data_dir.join(JOURNAL_FILE),
            file: Mutex::new(None),
        }
    }

    fn append(&self, record: &JournalRecord) {
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        let mut slot = lock(&self.file);
        if slot.as_ref().is_some_and(|(_, n)| *n >= JOURNAL_MAX_BYTES) {
            *slot = None;
            let mut aside = self.path.clone().into_os_string();
            aside.push(".1");
            let _ = std::fs::rename(&self.path, aside);
        }
        if slot.is_none() {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                Ok(f) => {
                    let len = f.metadata().map_or(0, |m| m.len());
                    *slot = Some((f, len));
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot open the group journal");
                    return;
                }
            }
        }
        if let Some((f, n)) = slot.as_mut() {
            // One write per line, so concurrent readers never see half a record.
            match f.write_all(&line) {
                Ok(()) => *n += u64::try_from(line.len()).unwrap_or(u64::MAX),
                Err(e) => tracing::warn!(error = %e, "cannot write the group journal"),
            }
        }
    }
}

/// Events and journal lines of this node's executor.
#[derive(Debug)]
struct Notes {
    me: String,
    events: Arc<Events>,
    journal: Journal,
    board: Arc<Board>,
}

impl Notes {
    fn group(&self, group: &str, epoch: u64, state: &str, detail: &str) {
        let what = format!("group {group} epoch {epoch} on {}", self.me);
        self.note(
            EventKind::Group,
            "group",
            &what,
            (group, epoch, None),
            state,
            detail,
        );
    }

    fn resource(&self, group: &str, epoch: u64, resource: &str, state: &str, detail: &str) {
        let what = format!(
            "resource {resource} of group {group} epoch {epoch} on {}",
            self.me
        );
        self.board
            .resource(group, epoch, resource, state, detail.to_owned());
        let at = (group, epoch, Some(resource));
        self.note(EventKind::Resource, "resource", &what, at, state, detail);
    }

    /// A standby instance's state (`starting`, `standby`, `promoted`, `stopped`, `failed`):
    /// an event and a journal line of kind `standby` (not a run of the group).
    fn standby(&self, group: &str, epoch: u64, resource: &str, state: &str, detail: &str) {
        let what = format!(
            "standby of resource {resource} of group {group} on {}",
            self.me
        );
        let at = (group, epoch, Some(resource));
        self.note(EventKind::Resource, "standby", &what, at, state, detail);
    }

    /// The event `WHAT: STATE (DETAIL)` and a journal line of `kind` for (group, epoch,
    /// resource).
    fn note(
        &self,
        event: EventKind,
        kind: &str,
        what: &str,
        (group, epoch, resource): (&str, u64, Option<&str>),
        state: &str,
        detail: &str,
    ) {
        let text = if detail.is_empty() {
            format!("{what}: {state}")
        } else {
            format!("{what}: {state} ({detail})")
        };
        self.events.emit(None, event, text);
        self.journal.append(&JournalRecord {
            time_ms: unix_ms(),
            node: self.me.clone(),
            kind: kind.into(),
            group: group.to_owned(),
            epoch,
            state: state.to_owned(),
            resource: resource.map(str::to_owned),
            owner: None,
            detail: detail.to_owned(),
        });
    }

    fn ownership(&self, group: &str, o: &Ownership) {
        let owner = o.owner.clone();
        self.events.emit(
            None,
            EventKind::Ownership,
            format!(
                "group {group}: epoch {} owner {} {}{} ({})",
                o.epoch,
                owner.as_deref().unwrap_or("none"),
                o.state,
                o.moving_to
                    .as_deref()
                    .map(|m| format!(", moving to {m}"))
                    .unwrap_or_default(),
                o.reason
            ),
        );
        self.journal.append(&JournalRecord {
            time_ms: unix_ms(),
            node: self.me.clone(),
            kind: "ownership".into(),
            group: group.to_owned(),
            epoch: o.epoch,
            state: o.state.to_string(),
            resource: None,
            owner,
            detail: o.reason.clone(),
        });
    }

    fn decision(&self, d: &Decision, outcome: &str) {
        let (epoch, state) = match d {
            Decision::Assign { epoch, .. } => (*epoch, "assign"),
            Decision::Release { epoch, .. } => (*epoch, "release"),
            Decision::GiveUp { epoch, .. } => (*epoch, "give_up"),
        };
        let detail = format!("{d:?}: {outcome}");
        tracing::info!(group = d.group(), "policy decision {detail}");
        self.journal.append(&JournalRecord {
            time_ms: unix_ms(),
            node: self.me.clone(),
            kind: "decision".into(),
            group: d.group().to_owned(),
            epoch,
            state: state.into(),
            resource: None,
            owner: None,
            detail,
        });
    }
}

/// Messages of the executor.
#[derive(Debug)]
pub enum ExecMsg {
    /// Something may have changed: look at the cluster node again.
    Refresh,
    /// An onlining ended.
    Onlined {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: u64,
        /// Every resource online, or why not.
        result: Result<(), String>,
    },
    /// An offlining ended.
    Offlined {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: u64,
        /// Every resource stopped within its timeout.
        clean: bool,
        /// It ran by force.
        forced: bool,
    },
    /// A check of an online resource failed.
    CheckFailed {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: u64,
        /// Which resource, and why.
        why: String,
    },
    /// A report ended.
    Reported {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: u64,
        /// The state reported.
        state: GroupState,
        /// Settled or to be retried.
        outcome: ReportOutcome,
    },
    /// The policy's proposals went out.
    Proposed,
    /// For tests and status: the plan's view of this node's runs.
    Runs(RpcReplyPort<BTreeMap<String, LocalRun>>),
}

/// What the executor starts from.
#[derive(Debug)]
pub struct ExecArgs {
    /// The cluster node.
    pub node: Arc<NodeHandle>,
    /// The supervisor's shared state (services, events).
    pub shared: Arc<Shared>,
    /// This node's services.
    pub catalog: ServiceCatalog,
    /// The plan's parameters.
    pub plan: PlanConfig,
    /// Where its board is published.
    pub board: Arc<Board>,
}

/// The executor actor.
#[derive(Debug)]
pub struct GroupExecutor;

/// A resource built for a run, with its check intervals.
#[derive(Debug)]
struct Built {
    resource: Resource,
    looks_alive: Duration,
    is_alive: Duration,
}

/// One group's resources and the task that runs for it.
#[derive(Debug)]
struct Run {
    epoch: u64,
    resources: Arc<BTreeMap<String, Arc<Built>>>,
    task: Option<JoinHandle<()>>,
}

/// The executor's state.
#[derive(Debug)]
pub struct ExecState {
    node: Arc<NodeHandle>,
    shared: Arc<Shared>,
    catalog: ServiceCatalog,
    plan: Plan,
    notes: Arc<Notes>,
    runs: BTreeMap<String, Run>,
    /// Per group, the task starting or stopping its standby instances.
    standbys: BTreeMap<String, JoinHandle<()>>,
    proposing: bool,
    last_proposal: Option<(Vec<Decision>, Instant)>,
    watcher: Option<JoinHandle<()>>,
    /// The in-sync report of this node's primary filesets ([`super::in_sync`]).
    reporter: Option<JoinHandle<()>>,
    deadline: Option<JoinHandle<()>>,
    /// Turns to bring a group online or start its standbys ([`ONLINE_CONCURRENCY`]).
    turns: Arc<Semaphore>,
}

impl Actor for GroupExecutor {
    type Msg = ExecMsg;
    type State = ExecState;
    type Arguments = ExecArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ExecMsg>,
        args: ExecArgs,
    ) -> Result<ExecState, ActorProcessingErr> {
        let me = args.plan.me.clone();
        let notes = Arc::new(Notes {
            me,
            events: args.shared.events.clone(),
            journal: Journal::new(&args.shared.data_dir),
            board: args.board,
        });
        let watcher = tokio::spawn(watch(args.node.clone(), myself.clone()));
        let reporter = tokio::spawn(super::in_sync::run(args.node.clone(), args.shared.clone()));
        Ok(ExecState {
            node: args.node,
            shared: args.shared,
            catalog: args.catalog,
            plan: Plan::new(args.plan),
            notes,
            runs: BTreeMap::new(),
            standbys: BTreeMap::new(),
            proposing: false,
            last_proposal: None,
            watcher: Some(watcher),
            reporter: Some(reporter),
            deadline: None,
            turns: Arc::new(Semaphore::new(ONLINE_CONCURRENCY)),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ExecMsg>,
        st: &mut ExecState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(w) = st.watcher.take() {
            w.abort();
        }
        if let Some(r) = st.reporter.take() {
            r.abort();
        }
        if let Some(d) = st.deadline.take() {
            d.abort();
        }
        for (_, t) in std::mem::take(&mut st.standbys) {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ExecMsg>,
        msg: ExecMsg,
        st: &mut ExecState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ExecMsg::Refresh => {}
            ExecMsg::Onlined {
                group,
                epoch,
                result,
            } => {
                match &result {
                    Ok(()) => st.notes.group(&group, epoch, "online", ""),
                    Err(why) => st.notes.group(&group, epoch, "failed", why),
                }
                st.plan.onlined(&group, epoch, result);
            }
            ExecMsg::Offlined {
                group,
                epoch,
                clean,
                forced,
            } => {
                let escalated = st
                    .plan
                    .groups()
                    .get(&group)
                    .is_some_and(|l| l.epoch == epoch && l.forced && !forced);
                if escalated {
                    // A graceful offline that finished just as it was cut short for a forced
                    // one: the forced one ends the run.
                    step(&myself, st);
                    return Ok(());
                }
                st.notes.group(
                    &group,
                    epoch,
                    "offline",
                    if clean {
                        ""
                    } else {
                        "a resource did not stop within its offline timeout"
                    },
                );
                if let Some(run) = st.runs.get_mut(&group).filter(|r| r.epoch == epoch) {
                    run.task = None;
                }
                st.plan.offline_ended(&group, epoch, clean, forced);
            }
            ExecMsg::CheckFailed { group, epoch, why } => {
                st.notes.group(&group, epoch, "failed", &why);
                st.plan.check_failed(&group, epoch, why);
            }
            ExecMsg::Reported {
                group,
                epoch,
                state,
                outcome,
            } => st.plan.reported(&group, epoch, state, outcome),
            ExecMsg::Proposed => st.proposing = false,
            ExecMsg::Runs(reply) => {
                let _ = reply.send(runs_of(st));
                return Ok(());
            }
        }
        step(&myself, st);
        Ok(())
    }
}

/// Follows the cluster node: a `Refresh` whenever the acting verdict, the database, its leader
/// or the view changes, and every [`RECHECK_INTERVAL`].
async fn watch(node: Arc<NodeHandle>, actor: ActorRef<ExecMsg>) {
    let mut acting = node.subscribe_acting();
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    let mut last_sent = Instant::now();
    loop {
        tokio::select! {
            changed = acting.changed() => {
                if changed.is_err() {
                    // The node is gone: look once more (it reads as not acting), then poll on.
                    acting = node.subscribe_acting();
                }
                let _ = actor.cast(ExecMsg::Refresh);
                last_sent = Instant::now();
                continue;
            }
            _ = poll.tick() => {}
        }
        let db = node.db();
        let s = node.status();
        let fingerprint = (
            db.seq,
            db.leader,
            s.epoch,
            s.acting,
            s.members,
            s.nodes
                .iter()
                .map(|n| (n.name.clone(), n.state, n.member_since))
                .collect::<Vec<_>>(),
        );
        let changed = last.as_ref() != Some(&fingerprint);
        if changed || last_sent.elapsed() >= RECHECK_INTERVAL {
            last = Some(fingerprint);
            if actor.cast(ExecMsg::Refresh).is_err() {
                return;
            }
            last_sent = Instant::now();
        }
    }
}

/// Reads the node, evaluates the plan, carries out its steps, and (on the sequencer) runs the
/// policy.
fn step(myself: &ActorRef<ExecMsg>, st: &mut ExecState) {
    let db = st.node.db();
    let status = st.node.status();
    let members: BTreeSet<String> = status.members.iter().cloned().collect();
    let member_since: BTreeMap<String, u64> = status
        .nodes
        .iter()
        .filter(|n| members.contains(&n.name))
        .filter_map(|n| n.member_since.map(|m| (n.name.clone(), m)))
        .collect();
    let facts = Facts {
        db: &db.content,
        acting: status.acting && status.running,
        member_since: &member_since,
        view_epoch: status.epoch,
        run_lease: st.node.run_lease(),
    };
    let steps = st.plan.evaluate(Instant::now(), &facts);
    for s in steps {
        carry_out(myself, st, &db.content, s);
    }
    publish(st);
    if let Some(d) = st.deadline.take() {
        d.abort();
    }
    if let Some(at) = st.plan.next_deadline() {
        let me = myself.clone();
        st.deadline = Some(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let _ = me.cast(ExecMsg::Refresh);
        }));
    }
    let leader = db.leader.as_deref() == Some(st.notes.me.as_str());
    if leader && st.plan.acting() && !st.proposing {
        let paused: BTreeSet<String> = status
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Paused && members.contains(&n.name))
            .map(|n| n.name.clone())
            .collect();
        let input = PolicyInput {
            members: &members,
            paused: &paused,
            db: &db.content,
            now_unix_ms: unix_ms(),
        };
        let decisions = cluster::failover::decide(&input);
        propose(myself, st, decisions);
    }
}

/// Hands the policy's decisions to the global update manager: together, as few batches as
/// fit (one global update round for a policy run, however many groups it moves).
fn propose(myself: &ActorRef<ExecMsg>, st: &mut ExecState, decisions: Vec<Decision>) {
    if decisions.is_empty() {
        return;
    }
    if let Some((last, at)) = &st.last_proposal
        && *last == decisions
        && at.elapsed() < PROPOSAL_RETRY
    {
        return;
    }
    st.last_proposal = Some((decisions.clone(), Instant::now()));
    st.proposing = true;
    let node = st.node.clone();
    let notes = st.notes.clone();
    let me = myself.clone();
    tokio::spawn(async move {
        let updates = decisions.iter().map(Decision::to_update).collect();
        let mut decided = decisions.iter();
        for run in Update::runs_for_batches(updates) {
            let these: Vec<&Decision> = decided.by_ref().take(run.len()).collect();
            let Some(update) = Update::batch(run) else {
                continue;
            };
            match node.update(update).await {
                // One of them no longer applies (the database moved on since the policy read
                // it, e.g. an operator's move): the others go on their own.
                Err(e) if these.len() > 1 && is_refusal(&e).is_some() => {
                    for d in these {
                        let outcome = outcome(node.update(d.to_update()).await, 1);
                        notes.decision(d, &outcome);
                    }
                }
                result => {
                    let outcome = outcome(result, these.len());
                    for d in these {
                        notes.decision(d, &outcome);
                    }
                }
            }
        }
        let _ = me.cast(ExecMsg::Proposed);
    });
}

/// What became of a proposal of `n` decisions, for the journal.
fn outcome(result: Result<u64, NodeRequestError>, n: usize) -> String {
    match (result, n) {
        (Ok(seq), 1) => format!("committed as update {seq}"),
        (Ok(seq), n) => format!("committed as update {seq}, a batch of {n}"),
        (Err(e), _) => format!("not applied: {e}"),
    }
}

fn carry_out(myself: &ActorRef<ExecMsg>, st: &mut ExecState, db: &DbContent, s: Step) {
    match s {
        Step::Observed { group, ownership } => st.notes.ownership(&group, &ownership),
        Step::Online {
            group,
            epoch,
            wait,
            order,
        } => {
            // The run takes the service over (promoting a standby that got to run).
            if let Some(t) = st.standbys.remove(&group) {
                t.abort();
            }
            if let Some(old) = st.runs.remove(&group)
                && let Some(t) = old.task
            {
                t.abort();
            }
            let context = context(st, &group);
            let mut resources = BTreeMap::new();
            let mut broken = None;
            for name in &order {
                match build(db, name, &context) {
                    Ok(r) => {
                        resources.insert(name.clone(), Arc::new(r));
                    }
                    Err(why) => {
                        broken.get_or_insert(format!("resource {name}: {why}"));
                    }
                }
            }
            let resources = Arc::new(resources);
            lock(&st.notes.board.runs).insert(
                group.clone(),
                LocalRun {
                    epoch,
                    phase: "onlining".into(),
                    why: String::new(),
                    resources: BTreeMap::new(),
                },
            );
            let deps = order
                .iter()
                .filter_map(|n| {
                    db.resources
                        .get(n)
                        .map(|r| (n.clone(), r.depends_on.clone()))
                })
                .collect();
            let task = tokio::spawn(online(
                myself.clone(),
                st.notes.clone(),
                st.turns.clone(),
                group.clone(),
                epoch,
                wait,
                order,
                deps,
                resources.clone(),
                broken,
            ));
            st.runs.insert(
                group,
                Run {
                    epoch,
                    resources,
                    task: Some(task),
                },
            );
        }
        Step::Monitor { group, epoch } => {
            let Some(run) = st.runs.get_mut(&group).filter(|r| r.epoch == epoch) else {
                return;
            };
            if let Some(t) = run.task.take() {
                t.abort();
            }
            run.task = Some(tokio::spawn(monitor(
                myself.clone(),
                group,
                epoch,
                run.resources.clone(),
            )));
        }
        Step::Offline {
            group,
            epoch,
            order,
            why,
            forced,
        } => {
            let context = context(st, &group);
            let run = st.runs.entry(group.clone()).or_insert_with(|| Run {
                epoch,
                resources: Arc::new(BTreeMap::new()),
                task: None,
            });
            if let Some(t) = run.task.take() {
                // Dropping an onlining kills the agent it waits for (its process group).
                t.abort();
            }
            if run.epoch != epoch {
                run.epoch = epoch;
                run.resources = Arc::new(BTreeMap::new());
            }
            // Resources never built here (a clean-up after a restart) are built now; one that
            // cannot be built cannot have been started by this watchd either.
            let mut resources: Vec<(String, Option<Arc<Built>>)> = Vec::new();
            for name in &order {
                let r = match run.resources.get(name) {
                    Some(r) => Some(r.clone()),
                    None => build(db, name, &context).ok().map(Arc::new),
                };
                resources.push((name.clone(), r));
            }
            {
                let mut runs = lock(&st.notes.board.runs);
                let entry = runs.entry(group.clone()).or_insert_with(|| LocalRun {
                    epoch,
                    phase: String::new(),
                    why: String::new(),
                    resources: BTreeMap::new(),
                });
                if entry.epoch != epoch {
                    entry.epoch = epoch;
                    entry.resources.clear();
                }
            }
            run.task = Some(tokio::spawn(offline(
                myself.clone(),
                st.notes.clone(),
                group,
                epoch,
                why,
                resources,
                forced,
            )));
        }
        Step::Standby {
            group,
            epoch,
            resources,
        } => {
            let context = context(st, &group);
            let built = resources
                .into_iter()
                .map(|name| {
                    let r = build(db, &name, &context);
                    (name, r)
                })
                .collect();
            if let Some(t) = st.standbys.remove(&group) {
                t.abort();
            }
            let task = tokio::spawn(standby(
                st.notes.clone(),
                st.turns.clone(),
                group.clone(),
                epoch,
                built,
            ));
            st.standbys.insert(group, task);
        }
        Step::StandbyOff { group, resources } => {
            let context = context(st, &group);
            let built = resources
                .into_iter()
                .map(|name| {
                    let r = build(db, &name, &context);
                    (name, r)
                })
                .collect();
            if let Some(t) = st.standbys.remove(&group) {
                t.abort();
            }
            let epoch = db.ownership_of(&group).epoch;
            let task = tokio::spawn(standby_off(st.notes.clone(), group.clone(), epoch, built));
            st.standbys.insert(group, task);
        }
        Step::Report {
            group,
            epoch,
            state,
        } => {
            let node = st.node.clone();
            let me = myself.clone();
            tokio::spawn(async move {
                let update = Update::ReportGroup {
                    group: group.clone(),
                    epoch,
                    state,
                };
                let outcome = match node.update(update).await {
                    Ok(_) => ReportOutcome::Settled,
                    Err(NodeRequestError::Update(GumError::Invalid(e))) => {
                        tracing::info!(%group, epoch, %state, error = %e, "report refused (the ownership moved on)");
                        ReportOutcome::Settled
                    }
                    Err(e) => {
                        tracing::info!(%group, epoch, %state, error = %e, "report not applied; retrying");
                        ReportOutcome::Retry
                    }
                };
                let _ = me.cast(ExecMsg::Reported {
                    group,
                    epoch,
                    state,
                    outcome,
                });
            });
        }
    }
}

fn context(st: &ExecState, group: &str) -> ResourceContext {
    ResourceContext {
        group: group.to_owned(),
        services: Some((st.catalog.clone(), st.shared.clone())),
    }
}

/// Builds resource `name` as the database describes it.
fn build(db: &DbContent, name: &str, context: &ResourceContext) -> Result<Built, String> {
    let r = db
        .resources
        .get(name)
        .ok_or_else(|| "not in the cluster database".to_owned())?;
    let timeouts = Timeouts {
        online: Duration::from_millis(r.online_timeout_ms),
        offline: Duration::from_millis(r.offline_timeout_ms),
        looks_alive: LOOKS_ALIVE_TIMEOUT,
        is_alive: IS_ALIVE_TIMEOUT,
    };
    let resource = Resource::build(name, &r.kind, &r.properties, timeouts, context)
        .map_err(|e| e.to_string())?;
    Ok(Built {
        resource,
        looks_alive: Duration::from_millis(r.looks_alive_ms),
        is_alive: Duration::from_millis(r.is_alive_ms),
    })
}

/// Brings the resources online, each once its dependencies are (those of independent branches
/// at once), those that no epoch fences only once the fence wait has passed; stops at the
/// first failure (the plan then takes them all offline).
#[allow(clippy::too_many_arguments)]
async fn online(
    actor: ActorRef<ExecMsg>,
    notes: Arc<Notes>,
    turns: Arc<Semaphore>,
    group: String,
    epoch: u64,
    wait: Duration,
    order: Vec<String>,
    deps: BTreeMap<String, Vec<String>>,
    resources: Arc<BTreeMap<String, Arc<Built>>>,
    broken: Option<String>,
) {
    // The fence counts from the assignment, also while the group waits for its turn.
    let fence_end = tokio::time::Instant::now() + wait;
    let _turn = match turns.clone().try_acquire_owned() {
        Ok(turn) => Some(turn),
        Err(_) => {
            notes.group(
                &group,
                epoch,
                "queued",
                &format!("{ONLINE_CONCURRENCY} groups are onlining on this node"),
            );
            // The semaphore is never closed; were it, the group would go on without a turn.
            turns.acquire_owned().await.ok()
        }
    };
    let left = fence_end.saturating_duration_since(tokio::time::Instant::now());
    let mut fenced = !left.is_zero();
    if fenced {
        notes.group(
            &group,
            epoch,
            "waiting",
            &format!(
                "{} ms for the previous owner to stop (filesets and checkpoints come online meanwhile)",
                left.as_millis()
            ),
        );
    }
    let result = async {
        if let Some(why) = broken {
            return Err(why);
        }
        // The run begins (in the journal, which the invariant checkers read) when resources
        // that no epoch fences may start: once the fence wait has passed.
        let mut begun = false;
        let begin = |begun: &mut bool| {
            if !std::mem::replace(begun, true) {
                notes.group(&group, epoch, "onlining", "");
            }
        };
        if !fenced {
            begin(&mut begun);
        }
        // Every resource whose dependencies are online starts at once: independent branches
        // of the DAG (a fileset and a checkpoint) do not wait for each other. A failure drops
        // the others (an agent in flight is killed with its process group).
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut started: BTreeSet<&str> = BTreeSet::new();
        let mut running = JoinSet::new();
        loop {
            let mut held = false;
            for name in &order {
                let ready = deps
                    .get(name)
                    .is_none_or(|d| d.iter().all(|x| done.contains(x.as_str())));
                if started.contains(name.as_str()) || !ready {
                    continue;
                }
                let Some(r) = resources.get(name) else {
                    return Err(format!("resource {name}: not built"));
                };
                if fenced && !ForcedPhase::fenced_by_epoch(r.resource.kind().name()) {
                    held = true;
                    continue;
                }
                started.insert(name);
                notes.resource(&group, epoch, name, "onlining", "");
                let (r, name) = (r.clone(), name.clone());
                running.spawn(async move {
                    let result = r.resource.online_noting(epoch).await;
                    (name, result)
                });
            }
            let joined = if fenced && held {
                tokio::select! {
                    j = running.join_next(), if !running.is_empty() => j,
                    () = tokio::time::sleep_until(fence_end) => {
                        fenced = false;
                        begin(&mut begun);
                        continue;
                    }
                }
            } else {
                running.join_next().await
            };
            let Some(joined) = joined else {
                // Only fenced resources (or none) were left to start.
                begin(&mut begun);
                break;
            };
            let (name, result) = joined.map_err(|e| format!("an onlining task ended: {e}"))?;
            match result {
                Ok(detail) => {
                    let detail = detail.unwrap_or_default();
                    if detail.starts_with("promoted") {
                        notes.standby(&group, epoch, &name, "promoted", &detail);
                    }
                    notes.resource(&group, epoch, &name, "online", &detail);
                    if let Some(n) = order.iter().find(|n| **n == name) {
                        done.insert(n);
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    notes.resource(&group, epoch, &name, "failed", &why);
                    return Err(format!("resource {name}: {why}"));
                }
            }
        }
        if done.len() == order.len() {
            Ok(())
        } else {
            Err("a resource depends on one outside the group".to_owned())
        }
    }
    .await;
    let _ = actor.cast(ExecMsg::Onlined {
        group,
        epoch,
        result,
    });
}

/// Starts (or keeps) the standby instances of a group's warm service resources.
async fn standby(
    notes: Arc<Notes>,
    turns: Arc<Semaphore>,
    group: String,
    epoch: u64,
    resources: Vec<(String, Result<Built, String>)>,
) {
    // Standby instances take turns with the onlinings (a group's onlining aborts its standby
    // task, turn and all); the semaphore is never closed.
    let _turn = turns.acquire_owned().await.ok();
    for (name, r) in resources {
        let r = match r {
            Ok(r) => r,
            Err(why) => {
                notes.standby(&group, epoch, &name, "failed", &why);
                continue;
            }
        };
        notes.standby(&group, epoch, &name, "starting", "");
        match r.resource.standby(epoch).await {
            Ok(pid) => notes.standby(&group, epoch, &name, "standby", &format!("pid {pid}")),
            Err(e) => notes.standby(&group, epoch, &name, "failed", &e.to_string()),
        }
    }
}

/// Stops the standby instances of resources this node no longer keeps warm.
async fn standby_off(
    notes: Arc<Notes>,
    group: String,
    epoch: u64,
    resources: Vec<(String, Result<Built, String>)>,
) {
    for (name, r) in resources {
        let Ok(r) = r else {
            // Not buildable here: watchd cannot have started it either.
            continue;
        };
        match r.resource.offline().await {
            Ok(()) => notes.standby(&group, epoch, &name, "stopped", ""),
            Err(e) => notes.standby(&group, epoch, &name, "failed", &e.to_string()),
        }
    }
}

/// Takes the resources offline in order (dependents first); a resource that does not stop
/// within its timeout is left to its kill and the next one goes on. A forced stop goes in
/// [`ForcedPhase`]s instead, each resource within its forced bound ([`FORCED_BOUNDS`]), so it
/// ends within [`Plan::stop_bound`] (what a new owner waits for).
#[allow(clippy::too_many_arguments)]
async fn offline(
    actor: ActorRef<ExecMsg>,
    notes: Arc<Notes>,
    group: String,
    epoch: u64,
    why: String,
    resources: Vec<(String, Option<Arc<Built>>)>,
    forced: bool,
) {
    let mut clean = true;
    if forced {
        notes.group(&group, epoch, "offlining", &format!("by force: {why}"));
        let mut phases: BTreeMap<ForcedPhase, Vec<(String, Arc<Built>)>> = BTreeMap::new();
        for (name, r) in resources {
            match r {
                Some(r) => phases
                    .entry(ForcedPhase::of(r.resource.kind().name()))
                    .or_default()
                    .push((name, r)),
                None => notes.resource(&group, epoch, &name, "offline", "cannot be built here"),
            }
        }
        for (phase, members) in phases {
            if phase == ForcedPhase::Data {
                // What clients could see has stopped; a new owner may start it now (it waited
                // the stop bound of these phases). The invariant checkers end the run here.
                notes.group(
                    &group,
                    epoch,
                    "fenced",
                    "services, addresses and agents stopped; filesets and checkpoints, fenced by epoch, follow",
                );
            }
            match phase {
                ForcedPhase::Agents => {
                    for (name, r) in members {
                        clean &= stop_one(&notes, &group, epoch, &name, &r, false).await;
                    }
                }
                ForcedPhase::Cut | ForcedPhase::Data => {
                    let mut all = JoinSet::new();
                    for (name, r) in members {
                        let (notes, group) = (notes.clone(), group.clone());
                        all.spawn(
                            async move { stop_one(&notes, &group, epoch, &name, &r, true).await },
                        );
                    }
                    // A fileset or checkpoint slow to turn backup leaves nothing in doubt: its
                    // epoch fences it on every replica. Counting it would report the group
                    // failed here and keep the policy from bringing it back to this node.
                    let fenced = phase == ForcedPhase::Data;
                    while let Some(done) = all.join_next().await {
                        clean &= done.unwrap_or(false) || fenced;
                    }
                }
            }
        }
    } else {
        notes.group(&group, epoch, "offlining", &why);
        for (name, r) in resources {
            let Some(r) = r else {
                notes.resource(&group, epoch, &name, "offline", "cannot be built here");
                continue;
            };
            clean &= stop_one(&notes, &group, epoch, &name, &r, false).await;
        }
    }
    let _ = actor.cast(ExecMsg::Offlined {
        group,
        epoch,
        clean,
        forced,
    });
}

/// Takes one resource offline (by force when `forced`); whether it stopped within its bound.
async fn stop_one(
    notes: &Notes,
    group: &str,
    epoch: u64,
    name: &str,
    r: &Built,
    forced: bool,
) -> bool {
    notes.resource(
        group,
        epoch,
        name,
        "offlining",
        if forced { "by force" } else { "" },
    );
    let result = if forced {
        r.resource.force_offline(&FORCED_BOUNDS).await
    } else {
        r.resource.offline().await
    };
    match result {
        Ok(()) => {
            notes.resource(group, epoch, name, "offline", "");
            true
        }
        Err(e) => {
            notes.resource(group, epoch, name, "failed", &e.to_string());
            false
        }
    }
}

/// Runs every resource's looks-alive and is-alive at their intervals until one fails.
async fn monitor(
    actor: ActorRef<ExecMsg>,
    group: String,
    epoch: u64,
    resources: Arc<BTreeMap<String, Arc<Built>>>,
) {
    let mut checks = JoinSet::new();
    for (name, r) in resources.iter() {
        let (name, r) = (name.clone(), r.clone());
        checks.spawn(async move {
            let why = watch_resource(&r).await;
            format!("resource {name}: {why}")
        });
    }
    if let Some(Ok(why)) = checks.join_next().await {
        let _ = actor.cast(ExecMsg::CheckFailed { group, epoch, why });
    }
}

/// The intervals of one resource come from the database; the checks' bounds from its
/// [`Timeouts`]. Returns why it failed.
async fn watch_resource(b: &Built) -> String {
    let (looks, is, r) = (b.looks_alive, b.is_alive, &b.resource);
    let start = tokio::time::Instant::now();
    let mut looks_alive = tokio::time::interval_at(start + looks, looks);
    let mut is_alive = tokio::time::interval_at(start + is, is);
    looks_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    is_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (what, health) = tokio::select! {
            _ = looks_alive.tick() => ("looks-alive", Health::of(r.looks_alive().await)),
            _ = is_alive.tick() => ("is-alive", Health::of(r.is_alive().await)),
        };
        match health {
            Health::Online => {}
            Health::Offline => return format!("{what}: it went offline"),
            Health::Failed(why) => return format!("{what}: {why}"),
        }
    }
}

fn publish(st: &ExecState) {
    let mut runs = lock(&st.notes.board.runs);
    let plan = st.plan.groups();
    runs.retain(|g, r| plan.get(g).is_some_and(|l| l.epoch == r.epoch));
    for (g, l) in plan {
        let entry = runs.entry(g.clone()).or_insert_with(|| LocalRun {
            epoch: l.epoch,
            phase: String::new(),
            why: String::new(),
            resources: BTreeMap::new(),
        });
        entry.phase = phase_name(l.phase).into();
        entry.why.clone_from(&l.why);
    }
}

fn runs_of(st: &ExecState) -> BTreeMap<String, LocalRun> {
    st.notes.board.runs()
}

fn phase_name(p: plan::Phase) -> &'static str {
    match p {
        plan::Phase::Onlining => "onlining",
        plan::Phase::Online => "online",
        plan::Phase::Offlining => "offlining",
        plan::Phase::Stopped => "stopped",
    }
}

/// Starts the executor of a cluster node, with the acting grace from the membership timings.
pub async fn start(
    node: Arc<NodeHandle>,
    shared: Arc<Shared>,
    config: &crate::config::Config,
) -> anyhow::Result<GroupsHandle> {
    use anyhow::Context;
    let cluster = config
        .cluster
        .as_ref()
        .context("the group executor needs a [cluster] table")?;
    let me = config.node_name();
    let membership = cluster.membership_config(&me, &config.nodes);
    let grace = membership.suspect_after();
    let board = Arc::new(Board::default());
    let catalog = ServiceCatalog::of(config);
    let (actor, _) = Actor::spawn(
        None,
        GroupExecutor,
        ExecArgs {
            node: node.clone(),
            shared,
            catalog: catalog.clone(),
            plan: PlanConfig {
                me,
                acting_grace: grace,
                stop_margin: STOP_MARGIN,
                forced: FORCED_BOUNDS,
                grace_beyond_lease: membership.quorum_disk,
            },
            board: board.clone(),
        },
    )
    .await
    .context("cannot start the group executor")?;
    Ok(GroupsHandle {
        actor,
        board,
        node,
        catalog,
    })
}

/// Whether an update error means the change can never apply as asked.
pub fn is_refusal(e: &NodeRequestError) -> Option<&UpdateError> {
    match e {
        NodeRequestError::Update(GumError::Invalid(u)) => Some(u),
        _ => None,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: consistent whatever a panicking holder did.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
