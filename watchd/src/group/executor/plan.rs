//! The rules of the group executor, sans IO: from what the cluster node says (database, acting
//! verdict, members and since when they are members) and what this node's own group runs did,
//! which groups to bring online (after how long a fence wait), take offline, monitor, and what
//! to report. It reads no clock (time comes in), runs nothing and sends nothing.
//!
//! ```text
//!  node: db, acting, members ──► Plan::evaluate ──► [Step] ──► actor: online/offline/monitor
//!  runs: onlined, offlined,  ──►       ▲                        tasks, ReportGroup updates
//!        check failed, reported        └──────────── (their outcomes come back as inputs)
//! ```
//!
//! Warm standby: for every `service` resource with `standby = "warm"`, each node that may own
//! its group (a preferred owner; with `any_owner`, every node) and does not run the group keeps
//! a standby instance running ([`Step::Standby`]); when the group comes online here, the
//! onlining promotes it (the plan just forgets it, without a stop); when this node no longer
//! may own the group, it is stopped ([`Step::StandbyOff`]). Standby instances serve nothing, so
//! they are not fenced.
//!
//! Safety rules (why two nodes never run one group at once):
//! - A node runs a group only at the epoch the database gives it, and stops at once when the
//!   ownership moves on (another owner, or a newer epoch).
//! - A node that stops acting keeps running only while membership's *run lease* holds (a
//!   quorum still vouches for it: a view change that keeps it) and at most the acting grace;
//!   then it stops everything *by force* (services killed, addresses deleted, filesets back to
//!   backup; exec resources, whose effects cannot be forced, through their offline timeouts):
//!   within [`Plan::stop_bound`] of the lease's end (filesets and checkpoints last: they
//!   are fenced by epoch, every replica refuses an older owner's pump, so a new owner brings
//!   them online at once and waits the bound only before the rest).
//! - The lease lapses before any view without the node acts (membership's fence; the argument
//!   is in `Membership::run_lease_until`: it needs only that clock *rates* differ by less than
//!   acting_margin / suspect_after, never that clocks agree). So a new owner, which acts in such
//!   a view, counts the stop bound from the first moment it saw itself acting in a view without
//!   the previous owner, and waits only what is left of it. It waits nothing when it knows the
//!   previous owner stopped: it reported the group offline or failed, or it has been a member
//!   without a gap since (then it was never lost, and only its own report could have moved the
//!   group).
//! - With a quorum disk ([`PlanConfig::grace_beyond_lease`]) a node keeps its groups through
//!   the whole acting grace, lease or not (when its peer dies, it regains quorum by taking the
//!   disk over, which no lease promises), and the stop bound counts the grace.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cluster::db::{DbContent, GroupState, Ownership};
use cluster::membership::NodeId;

/// The facts the cluster node offers at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The cluster database (this node's copy).
    pub db: &'a DbContent,
    /// Membership's verdict: this node may act.
    pub acting: bool,
    /// The members of the committed view and, per member, the epoch since which it has been a
    /// member without a gap.
    pub member_since: &'a BTreeMap<NodeId, u64>,
    /// The committed view's epoch.
    pub view_epoch: u64,
    /// Membership's run lease: until when this node may keep running its groups while it does
    /// not act (`None`: lapsed).
    pub run_lease: Option<Instant>,
}

/// The executor's timing parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// This node.
    pub me: NodeId,
    /// How long groups keep running after the acting verdict lapsed, waiting for it to come
    /// back in the same membership (a view change that keeps this node).
    pub acting_grace: Duration,
    /// Added to the forced stop bounds in the stop bound: the reaction time of the executor.
    pub stop_margin: Duration,
    /// How long a forced stop of each kind of resource may take.
    pub forced: ForcedBounds,
    /// Keep groups through the whole acting grace even when the run lease lapsed, and count
    /// the grace in the stop bound: a cluster with a quorum disk, where a node that lost its
    /// peer regains quorum by taking the disk over, which no lease can promise beforehand.
    pub grace_beyond_lease: bool,
}

/// How long a forced stop may take, per kind of resource (an exec resource is never forced:
/// its offline timeout counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForcedBounds {
    /// `service`: stop its supervisor's restarts, SIGKILL its cgroup, wait for the reaping.
    pub service: Duration,
    /// `ip`: delete the address.
    pub ip: Duration,
    /// `fileset` and `checkpoint`: back to the backup role (a pump left behind is refused by
    /// every backup anyway, by its stale epoch).
    pub fileset: Duration,
}

/// The phases of a forced stop: first every service and address at once (what clients see),
/// then the exec resources one after the other (dependents first, each within its offline
/// timeout), then every fileset and checkpoint at once (after the services that write them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ForcedPhase {
    /// Services and addresses, concurrently.
    Cut,
    /// Exec resources, in order.
    Agents,
    /// Filesets and checkpoints, concurrently.
    Data,
}

impl ForcedPhase {
    /// The phase of a resource of `kind` (an unknown kind is treated as an agent: in order,
    /// within its offline timeout).
    pub fn of(kind: &str) -> ForcedPhase {
        match kind {
            "service" | "ip" => ForcedPhase::Cut,
            "fileset" | "checkpoint" => ForcedPhase::Data,
            _ => ForcedPhase::Agents,
        }
    }

    /// Whether a resource of `kind` is fenced by its ownership epoch (a replica refuses the
    /// pump of an older epoch), so a new owner may bring it online while the previous owner
    /// may still be stopping: filesets and checkpoints.
    pub fn fenced_by_epoch(kind: &str) -> bool {
        ForcedPhase::of(kind) == ForcedPhase::Data
    }
}

impl ForcedBounds {
    /// The bound of a forced stop of a resource of `kind` whose offline timeout is `offline`.
    pub fn of(&self, kind: &str, offline: Duration) -> Duration {
        match kind {
            "service" => self.service,
            "ip" => self.ip,
            "fileset" | "checkpoint" => self.fileset,
            _ => offline,
        }
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Bring `group`'s resources online at `epoch` in `order`; those not fenced by epoch
    /// ([`ForcedPhase::fenced_by_epoch`]) not before `wait` has passed (the fence wait for a
    /// previous owner that may still be stopping). Nothing else runs for the group.
    Online {
        /// The group.
        group: String,
        /// Its epoch (the fencing token handed to its resources).
        epoch: u64,
        /// The fence wait.
        wait: Duration,
        /// Resource names in topological order.
        order: Vec<String>,
    },
    /// Stop whatever runs for `group` (an onlining, the monitors) and take every resource
    /// offline in `order` (reverse topological order: each after its dependents).
    Offline {
        /// The group.
        group: String,
        /// The epoch it ran at.
        epoch: u64,
        /// Resource names, dependents first.
        order: Vec<String>,
        /// Why (for events).
        why: String,
        /// By force, in [`ForcedPhase`]s, each resource within its forced bound (this node
        /// lost the acting verdict: a new owner counts on [`Plan::stop_bound`]).
        forced: bool,
    },
    /// Watch the online group's resources (looks-alive and is-alive at their intervals).
    Monitor {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: u64,
    },
    /// Report how far the group got (a `ReportGroup` global update, compare-and-set on the
    /// epoch).
    Report {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: u64,
        /// The state reached.
        state: GroupState,
    },
    /// Run the warm service `resources` of `group` as standby instances (`FT_ROLE=standby`),
    /// starting those that do not run that way.
    Standby {
        /// The group.
        group: String,
        /// Its ownership epoch now (handed to the instances as `FT_EPOCH`).
        epoch: u64,
        /// The warm `service` resources.
        resources: Vec<String>,
    },
    /// Stop the standby instances of `resources` of `group` (this node no longer may own it,
    /// or they are no longer warm).
    StandbyOff {
        /// The group.
        group: String,
        /// The resources.
        resources: Vec<String>,
    },
    /// An ownership change observed in the database (for the events and the journal).
    Observed {
        /// The group.
        group: String,
        /// The new ownership.
        ownership: Ownership,
    },
}

/// How a report ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Committed, or refused for good (the ownership moved on): do not send it again.
    Settled,
    /// Not decided (no leader, timeout, in doubt): send it again later.
    Retry,
}

/// What this node does with one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting out the fence, then bringing resources online.
    Onlining,
    /// Every resource online; monitors run.
    Online,
    /// Taking every resource offline.
    Offlining,
    /// Nothing runs (every resource was taken offline).
    Stopped,
}

impl Phase {
    /// Whether resources may be running.
    pub fn running(self) -> bool {
        matches!(self, Phase::Onlining | Phase::Online)
    }
}

/// One group this node runs or ran, at one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// The epoch.
    pub epoch: u64,
    /// How far it is.
    pub phase: Phase,
    /// The step of the current phase (monitor, offline) has been handed out.
    pub stepped: bool,
    /// The report still to make, if any.
    pub report: Option<GroupState>,
    /// A report is being sent.
    pub in_flight: bool,
    /// Why it went offline, for status and events.
    pub why: String,
    /// It is taken offline by force (the verdict was lost).
    pub forced: bool,
}

impl Local {
    fn new(epoch: u64, phase: Phase, report: Option<GroupState>, why: String) -> Local {
        Local {
            epoch,
            phase,
            stepped: false,
            report,
            in_flight: false,
            why,
            forced: false,
        }
    }

    /// Moves to `phase`; its step is still to be handed out.
    fn enter(&mut self, phase: Phase) {
        if self.phase != phase {
            self.phase = phase;
            self.stepped = false;
        }
    }
}

/// The acting verdict as the executor uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Acting, a member since this epoch.
    Acting(Option<u64>),
    /// Not acting since `at`; groups keep running until `at + grace`.
    Grace { at: Instant, since: Option<u64> },
    /// Not acting, or acting anew: every group run was stopped.
    Fenced,
}

/// An ownership seen in the database, with the member-since of its owner at that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    ownership: Ownership,
    owner_since: Option<u64>,
}

/// The executor's rules and its memory.
#[derive(Debug)]
pub struct Plan {
    cfg: PlanConfig,
    verdict: Verdict,
    groups: BTreeMap<String, Local>,
    /// The newest ownership seen per group.
    seen: BTreeMap<String, Seen>,
    /// Per group, the ownership seen last at the epoch before the newest one.
    before: BTreeMap<String, Seen>,
    /// The run lease as last seen.
    lease: Option<Instant>,
    /// Per node, the first moment this node saw itself acting in a view without it, and that
    /// view's epoch: its run lease had lapsed by then.
    absent: BTreeMap<NodeId, (Instant, u64)>,
    /// Per group, the warm resources whose standby instances were asked for.
    standby: BTreeMap<String, Vec<String>>,
}

impl Plan {
    /// A plan for a node that runs nothing yet (it starts fenced: acting must be seen first).
    pub fn new(cfg: PlanConfig) -> Plan {
        Plan {
            cfg,
            verdict: Verdict::Fenced,
            groups: BTreeMap::new(),
            seen: BTreeMap::new(),
            before: BTreeMap::new(),
            lease: None,
            absent: BTreeMap::new(),
            standby: BTreeMap::new(),
        }
    }

    /// The groups whose warm resources run as standby instances here.
    pub fn standbys(&self) -> &BTreeMap<String, Vec<String>> {
        &self.standby
    }

    /// The groups this node runs or ran.
    pub fn groups(&self) -> &BTreeMap<String, Local> {
        &self.groups
    }

    /// Whether the executor acts on the database now (acting, not within a grace).
    pub fn acting(&self) -> bool {
        matches!(self.verdict, Verdict::Acting(_))
    }

    /// When [`Plan::evaluate`] must run again at the latest (the end of an acting grace or of
    /// the run lease).
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.verdict {
            Verdict::Grace { at, .. } => Some(self.grace_end(at)),
            _ => None,
        }
    }

    /// Groups keep running without the verdict until the acting grace or the run lease ends,
    /// whichever comes first.
    fn grace_end(&self, at: Instant) -> Instant {
        let grace = at.checked_add(self.cfg.acting_grace).unwrap_or(at);
        if self.cfg.grace_beyond_lease {
            return grace;
        }
        self.lease.map_or(at, |l| l.min(grace))
    }

    /// How long after its run lease lapsed a previous owner of `group` may still run one of its
    /// resources that no epoch fences: the forced stop's phases before the data (the longest
    /// service or address bound, every exec resource's offline timeout) and the margin (and
    /// the acting grace, with [`PlanConfig::grace_beyond_lease`]). Filesets and checkpoints
    /// are left out: every replica refuses a pump of an older epoch, so a new owner brings them
    /// online without waiting ([`ForcedPhase::fenced_by_epoch`]), and the previous owner stops
    /// them last, after the services that write them are dead.
    pub fn stop_bound(&self, db: &DbContent, group: &str) -> Duration {
        let mut phases: BTreeMap<ForcedPhase, Duration> = BTreeMap::new();
        for r in db.resources.values().filter(|r| r.group == group) {
            let phase = ForcedPhase::of(&r.kind);
            if phase == ForcedPhase::Data {
                continue;
            }
            let bound = self
                .cfg
                .forced
                .of(&r.kind, Duration::from_millis(r.offline_timeout_ms));
            let sum = phases.entry(phase).or_default();
            *sum = match phase {
                ForcedPhase::Agents => sum.saturating_add(bound),
                ForcedPhase::Cut | ForcedPhase::Data => (*sum).max(bound),
            };
        }
        let grace = if self.cfg.grace_beyond_lease {
            self.cfg.acting_grace
        } else {
            Duration::ZERO
        };
        phases
            .values()
            .fold(self.cfg.stop_margin.saturating_add(grace), |a, b| {
                a.saturating_add(*b)
            })
    }

    /// The onlining of `group` at `epoch` ended: every resource online (`Ok`), or one failed
    /// (every resource goes offline, then the group is reported failed).
    pub fn onlined(&mut self, group: &str, epoch: u64, result: Result<(), String>) {
        let Some(l) = self.at(group, epoch) else {
            return;
        };
        if l.phase != Phase::Onlining {
            return;
        }
        match result {
            Ok(()) => {
                l.enter(Phase::Online);
                l.report = Some(GroupState::Online);
            }
            Err(why) => {
                l.enter(Phase::Offlining);
                l.report = Some(GroupState::Failed);
                l.why = why;
            }
        }
    }

    /// A check of an online resource of `group` failed: every resource goes offline, then the
    /// group is reported failed (the policy moves it or gives up).
    pub fn check_failed(&mut self, group: &str, epoch: u64, why: String) {
        if let Some(l) = self.at(group, epoch)
            && l.phase == Phase::Online
        {
            l.enter(Phase::Offlining);
            l.report = Some(GroupState::Failed);
            l.why = why;
        }
    }

    /// Every resource of `group` at `epoch` went offline (`clean` false when one did not stop
    /// within its timeout and was left to its kill).
    pub fn offlined(&mut self, group: &str, epoch: u64, clean: bool) {
        self.offline_ended(group, epoch, clean, true);
    }

    /// Like [`Plan::offlined`], from an offline that ran by force or not: the end of a graceful
    /// offline that the plan meanwhile escalated to a forced one is not the end of the run.
    pub fn offline_ended(&mut self, group: &str, epoch: u64, clean: bool, forced: bool) {
        let Some(l) = self.at(group, epoch) else {
            return;
        };
        if l.forced && !forced {
            return;
        }
        l.enter(Phase::Stopped);
        if !clean && l.report == Some(GroupState::Offline) {
            // A resource that would not stop leaves the group in doubt: not cleanly offline.
            l.report = Some(GroupState::Failed);
        }
    }

    /// A report ended.
    pub fn reported(&mut self, group: &str, epoch: u64, state: GroupState, outcome: ReportOutcome) {
        let Some(l) = self.at(group, epoch) else {
            return;
        };
        l.in_flight = false;
        if outcome == ReportOutcome::Settled && l.report == Some(state) {
            l.report = None;
        }
    }

    fn at(&mut self, group: &str, epoch: u64) -> Option<&mut Local> {
        self.groups.get_mut(group).filter(|l| l.epoch == epoch)
    }

    /// The steps for the facts at `now`.
    pub fn evaluate(&mut self, now: Instant, facts: &Facts<'_>) -> Vec<Step> {
        let mut out = Vec::new();
        self.observe(facts, &mut out);
        self.lease = facts.run_lease;
        self.note_absent(now, facts);
        let mine = facts.member_since.get(&self.cfg.me).copied();
        self.verdict = match self.verdict {
            Verdict::Acting(since) if !facts.acting => Verdict::Grace { at: now, since },
            Verdict::Acting(since) if since != mine => {
                // A gap in membership that the verdict never showed: as good as a loss.
                self.fence(facts.db, "this node's membership had a gap");
                Verdict::Acting(mine)
            }
            Verdict::Grace { since, .. } if facts.acting && since == mine => Verdict::Acting(since),
            Verdict::Grace { .. } if facts.acting => {
                self.fence(facts.db, "this node rejoined the cluster");
                Verdict::Acting(mine)
            }
            Verdict::Fenced if facts.acting => Verdict::Acting(mine),
            v => v,
        };
        if let Verdict::Grace { at, .. } = self.verdict
            && now >= self.grace_end(at)
            && !facts.acting
        {
            // The lease may have lapsed before the verdict did (a cut-off node).
            let why = if self.lease.is_some_and(|l| now < l) {
                "this node lost the acting verdict"
            } else {
                "this node's run lease lapsed (no quorum vouches for it)"
            };
            self.fence(facts.db, why);
            self.verdict = Verdict::Fenced;
        }
        if self.acting() {
            let names: BTreeSet<String> = self
                .groups
                .keys()
                .chain(facts.db.groups.keys())
                .cloned()
                .collect();
            for name in names {
                self.group(now, &name, facts, &mut out);
            }
            self.standbys_for(facts, &mut out);
        }
        // Monitors and offlines go out whatever the verdict: a failed run must not stay half up.
        self.hand_out(facts.db, &mut out);
        out
    }

    /// Asks for the standby instances this node should run, and stops those it should not.
    fn standbys_for(&mut self, facts: &Facts<'_>, out: &mut Vec<Step>) {
        let db = facts.db;
        let names: BTreeSet<String> = self
            .standby
            .keys()
            .chain(db.groups.keys())
            .cloned()
            .collect();
        for name in names {
            let running = self
                .groups
                .get(&name)
                .is_some_and(|l| l.phase != Phase::Stopped);
            if running {
                // Its run owns the service now (promoted, started or stopping); a standby comes
                // back once the run has stopped.
                self.standby.remove(&name);
                continue;
            }
            let want = warm_resources(db, &name, &self.cfg.me);
            let have = self.standby.get(&name);
            if have == Some(&want) || (have.is_none() && want.is_empty()) {
                continue;
            }
            let gone: Vec<String> = have
                .map(|h| h.iter().filter(|r| !want.contains(*r)).cloned().collect())
                .unwrap_or_default();
            if !gone.is_empty() {
                out.push(Step::StandbyOff {
                    group: name.clone(),
                    resources: gone,
                });
            }
            if want.is_empty() {
                self.standby.remove(&name);
            } else {
                out.push(Step::Standby {
                    group: name.clone(),
                    epoch: db.ownership_of(&name).epoch,
                    resources: want.clone(),
                });
                self.standby.insert(name, want);
            }
        }
    }

    /// Remembers, per node of the database, since when this node has acted in a view without
    /// it (forgotten when it is a member again).
    fn note_absent(&mut self, now: Instant, facts: &Facts<'_>) {
        self.absent
            .retain(|n, _| facts.db.nodes.contains_key(n) && !facts.member_since.contains_key(n));
        if !facts.acting {
            return;
        }
        for n in facts.db.nodes.keys() {
            if !facts.member_since.contains_key(n) {
                self.absent
                    .entry(n.clone())
                    .or_insert((now, facts.view_epoch));
            }
        }
    }

    /// Records ownership changes (and remembers, per group, the ownership of the epoch before).
    fn observe(&mut self, facts: &Facts<'_>, out: &mut Vec<Step>) {
        for name in facts.db.groups.keys() {
            let own = facts.db.ownership_of(name);
            let owner_since = own
                .owner
                .as_ref()
                .and_then(|o| facts.member_since.get(o).copied());
            let changed = self.seen.get(name).is_none_or(|s| {
                s.ownership.epoch != own.epoch
                    || s.ownership.owner != own.owner
                    || s.ownership.state != own.state
                    || s.ownership.moving_to != own.moving_to
            });
            if changed {
                out.push(Step::Observed {
                    group: name.clone(),
                    ownership: own.clone(),
                });
            }
            let epoch = own.epoch;
            let seen = Seen {
                ownership: own,
                owner_since,
            };
            if let Some(old) = self.seen.insert(name.clone(), seen)
                && old.ownership.epoch < epoch
            {
                self.before.insert(name.clone(), old);
            }
        }
        self.seen.retain(|n, _| facts.db.groups.contains_key(n));
        self.before.retain(|n, _| facts.db.groups.contains_key(n));
    }

    /// Stops every running group (the verdict is gone for good); each reports, once acting
    /// again, that it failed here (or, if its owner was asked to take it offline, that it is).
    fn fence(&mut self, db: &DbContent, why: &str) {
        for l in self.groups.values_mut() {
            if l.phase == Phase::Offlining && !l.forced {
                // A graceful offline under way (a failed check, a release) may take the sum of
                // the offline timeouts, longer than a new owner waits: it goes on by force.
                l.forced = true;
                l.stepped = false;
                l.why = format!("{}; {why}", l.why);
            }
        }
        for (name, l) in self.groups.iter_mut().filter(|(_, l)| l.phase.running()) {
            let state = db.ownership_of(name).state;
            l.report = Some(if state == GroupState::Offlining {
                GroupState::Offline
            } else {
                GroupState::Failed
            });
            l.in_flight = false;
            why.clone_into(&mut l.why);
            l.forced = true;
            l.enter(Phase::Offlining);
        }
    }

    /// Hands out the monitor and offline steps of runs that entered those phases.
    fn hand_out(&mut self, db: &DbContent, out: &mut Vec<Step>) {
        for (name, l) in self.groups.iter_mut().filter(|(_, l)| !l.stepped) {
            match l.phase {
                Phase::Online => out.push(Step::Monitor {
                    group: name.clone(),
                    epoch: l.epoch,
                }),
                Phase::Offlining => out.push(Step::Offline {
                    group: name.clone(),
                    epoch: l.epoch,
                    order: offline_order(db, name),
                    why: l.why.clone(),
                    forced: l.forced,
                }),
                Phase::Onlining | Phase::Stopped => {}
            }
            l.stepped = true;
        }
    }

    /// Marks a run to be taken offline, without a report of its own (the ownership moved on,
    /// or the database says it is not running).
    fn stop(&mut self, name: &str, why: String) {
        if let Some(l) = self.groups.get_mut(name) {
            l.report = None;
            l.why = why;
            l.forced = false;
            l.enter(Phase::Offlining);
        }
    }

    /// The rules for one group while acting.
    fn group(&mut self, now: Instant, name: &str, facts: &Facts<'_>, out: &mut Vec<Step>) {
        let db = facts.db;
        let exists = db.groups.contains_key(name);
        let own = db.ownership_of(name);
        let mine = exists && own.owner.as_deref() == Some(self.cfg.me.as_str());
        if let Some(l) = self.groups.get(name).cloned() {
            if !mine || own.epoch > l.epoch {
                match l.phase {
                    Phase::Onlining | Phase::Online => {
                        let why = if exists {
                            format!(
                                "ownership moved to {} at epoch {}",
                                own.owner.as_deref().unwrap_or("nobody"),
                                own.epoch
                            )
                        } else {
                            "the group was removed".to_owned()
                        };
                        self.stop(name, why);
                        return;
                    }
                    Phase::Offlining => {
                        if let Some(x) = self.groups.get_mut(name) {
                            x.report = None;
                        }
                        return;
                    }
                    Phase::Stopped => {
                        self.groups.remove(name);
                    }
                }
            } else if own.epoch < l.epoch {
                // This copy of the database is behind what this node already ran.
                return;
            } else {
                self.same_epoch(name, &own, l.phase);
                self.report(name, &own, out);
                return;
            }
        }
        if !mine {
            return;
        }
        // A group of this node that it does not run (yet).
        let order = match cluster::failover::topo_order(db, name) {
            Ok(o) => o,
            Err(e) => {
                // Refused by validation; a database that holds one anyway cannot go online.
                let report = matches!(own.state, GroupState::Onlining | GroupState::Online)
                    .then_some(GroupState::Failed);
                let mut l = Local::new(own.epoch, Phase::Stopped, report, e.to_string());
                l.stepped = true;
                self.groups.insert(name.to_owned(), l);
                self.report(name, &own, out);
                return;
            }
        };
        match own.state {
            GroupState::Onlining => {
                let wait = self.fence_wait(now, db, name, own.epoch, facts);
                let mut l = Local::new(own.epoch, Phase::Onlining, None, String::new());
                l.stepped = true;
                self.groups.insert(name.to_owned(), l);
                out.push(Step::Online {
                    group: name.to_owned(),
                    epoch: own.epoch,
                    wait,
                    order,
                });
            }
            GroupState::Online | GroupState::Offlining => {
                // The database says this node runs it, but nothing here does (watchd
                // restarted, or the run was fenced): clean up, then say so.
                let report = if own.state == GroupState::Online {
                    GroupState::Failed
                } else {
                    GroupState::Offline
                };
                let why = format!("not running here at epoch {}", own.epoch);
                self.groups.insert(
                    name.to_owned(),
                    Local::new(own.epoch, Phase::Offlining, Some(report), why),
                );
            }
            GroupState::Offline | GroupState::Failed => {}
        }
    }

    /// A group this node runs at the database's epoch.
    fn same_epoch(&mut self, name: &str, own: &Ownership, phase: Phase) {
        match (own.state, phase) {
            (GroupState::Offlining, Phase::Onlining | Phase::Online) => {
                let why = format!(
                    "released{}",
                    own.moving_to
                        .as_deref()
                        .map(|t| format!(" to {t}"))
                        .unwrap_or_default()
                );
                self.stop(name, why);
                if let Some(x) = self.groups.get_mut(name) {
                    x.report = Some(GroupState::Offline);
                }
            }
            (GroupState::Offlining, Phase::Offlining) => {
                if let Some(x) = self.groups.get_mut(name)
                    && x.report.is_none()
                {
                    x.report = Some(GroupState::Offline);
                }
            }
            (GroupState::Offline | GroupState::Failed, Phase::Onlining | Phase::Online) => {
                let why = format!("the group is {} at epoch {}", own.state, own.epoch);
                self.stop(name, why);
            }
            _ => {}
        }
    }

    /// Sends the pending report of `name` when its run got there and it still fits the
    /// database; drops it when it no longer can.
    fn report(&mut self, name: &str, own: &Ownership, out: &mut Vec<Step>) {
        let me = self.cfg.me.as_str();
        let Some(l) = self.groups.get_mut(name) else {
            return;
        };
        let Some(state) = l.report else {
            return;
        };
        let ready = match l.phase {
            Phase::Stopped => true,
            Phase::Online => state == GroupState::Online,
            Phase::Onlining | Phase::Offlining => false,
        };
        if !ready {
            return;
        }
        if own.epoch != l.epoch || own.owner.as_deref() != Some(me) {
            l.report = None;
            return;
        }
        let fits = matches!(
            (own.state, state),
            (
                GroupState::Onlining,
                GroupState::Online | GroupState::Failed
            ) | (GroupState::Online, GroupState::Failed)
                | (
                    GroupState::Offlining,
                    GroupState::Offline | GroupState::Failed
                )
        );
        if !fits {
            // Already there, or overtaken by another change: nothing left to say.
            l.report = None;
            return;
        }
        if l.in_flight {
            return;
        }
        l.in_flight = true;
        out.push(Step::Report {
            group: name.to_owned(),
            epoch: l.epoch,
            state,
        });
    }

    /// How long to wait before onlining `name` at `epoch`.
    fn fence_wait(
        &self,
        now: Instant,
        db: &DbContent,
        name: &str,
        epoch: u64,
        facts: &Facts<'_>,
    ) -> Duration {
        if epoch <= 1 {
            return Duration::ZERO;
        }
        let Some(prev) = self
            .before
            .get(name)
            .filter(|p| p.ownership.epoch.checked_add(1) == Some(epoch))
        else {
            return self.stop_bound(db, name);
        };
        let Some(owner) = prev.ownership.owner.as_deref() else {
            return self.stop_bound(db, name);
        };
        if owner == self.cfg.me {
            // This node's own earlier run is over: a new run starts only after it stopped.
            return Duration::ZERO;
        }
        if matches!(
            prev.ownership.state,
            GroupState::Offline | GroupState::Failed
        ) {
            return Duration::ZERO;
        }
        match (prev.owner_since, facts.member_since.get(owner)) {
            (Some(then), Some(now)) if then == *now => Duration::ZERO,
            _ => self.lost_owner_wait(now, db, name, owner, facts),
        }
    }

    /// What is left of the stop bound of `owner`, a previous owner of `name` that was lost:
    /// counted from the moment this node saw itself acting in a view without it (its run lease
    /// had lapsed by then), when no view change came since (it cannot have rejoined and
    /// gained a new lease unseen); else the whole bound from now.
    fn lost_owner_wait(
        &self,
        now: Instant,
        db: &DbContent,
        name: &str,
        owner: &str,
        facts: &Facts<'_>,
    ) -> Duration {
        let bound = self.stop_bound(db, name);
        match self.absent.get(owner) {
            Some((since, epoch)) if *epoch == facts.view_epoch => {
                bound.saturating_sub(now.saturating_duration_since(*since))
            }
            _ => bound,
        }
    }
}

/// The property of a `service` resource that asks for a warm standby.
pub const STANDBY_PROPERTY: &str = "standby";

/// The `service` resources of `group` with `standby = "warm"`, when `me` may own the group (a
/// preferred owner, or any node of the database when the group has `any_owner`).
pub fn warm_resources(db: &DbContent, group: &str, me: &str) -> Vec<String> {
    let Some(g) = db.groups.get(group) else {
        return Vec::new();
    };
    let may_own =
        g.preferred_owners.iter().any(|o| o == me) || (g.any_owner && db.nodes.contains_key(me));
    if !may_own {
        return Vec::new();
    }
    db.resources
        .values()
        .filter(|r| r.group == group && r.kind == "service")
        .filter(|r| r.properties.get(STANDBY_PROPERTY).map(String::as_str) == Some("warm"))
        .map(|r| r.name.clone())
        .collect()
}

/// The resources of `group`, dependents first (every resource of the group, also when the
/// dependencies are broken: offline must not leave one behind).
pub fn offline_order(db: &DbContent, group: &str) -> Vec<String> {
    match cluster::failover::topo_order(db, group) {
        Ok(mut o) => {
            o.reverse();
            o
        }
        Err(_) => db
            .resources
            .values()
            .filter(|r| r.group == group)
            .map(|r| r.name.clone())
            .rev()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use cluster::db::{Group, Resource, Update};

    use super::*;

    const GRACE: Duration = Duration::from_millis(500);
    const MARGIN: Duration = Duration::from_millis(500);

    const FORCED: ForcedBounds = ForcedBounds {
        service: Duration::from_millis(300),
        ip: Duration::from_millis(200),
        fileset: Duration::from_millis(250),
    };

    fn plan(me: &str) -> Plan {
        Plan::new(PlanConfig {
            me: me.into(),
            acting_grace: GRACE,
            stop_margin: MARGIN,
            forced: FORCED,
            grace_beyond_lease: false,
        })
    }

    /// Group `g` preferring a, b, c with resources data <- addr <- svc (offline 1 s each).
    fn db() -> DbContent {
        let mut db = DbContent::default();
        for n in ["a", "b", "c"] {
            db.apply(&Update::AddNode { node: n.into() }).expect("node");
        }
        db.apply(&Update::AddGroup(Group {
            name: "g".into(),
            preferred_owners: vec!["a".into(), "b".into(), "c".into()],
            ..Group::default()
        }))
        .expect("group");
        for (name, deps) in [
            ("data", vec![]),
            ("addr", vec!["data"]),
            ("svc", vec!["addr"]),
        ] {
            db.apply(&Update::AddResource(Resource {
                name: name.into(),
                group: "g".into(),
                kind: "exec".into(),
                depends_on: deps.into_iter().map(String::from).collect(),
                properties: [("agent".to_owned(), "/bin/true".to_owned())].into(),
                offline_timeout_ms: 1000,
                ..Resource::default()
            }))
            .expect("resource");
        }
        db
    }

    fn assign(db: &mut DbContent, owner: &str) {
        let epoch = db.ownership_of("g").epoch + 1;
        db.apply(&Update::AssignGroup {
            group: "g".into(),
            epoch,
            owner: Some(owner.into()),
            at_ms: 0,
            reason: "test".into(),
            failover: false,
        })
        .expect("assign");
    }

    /// Assigns `g` to a (epoch 1), and has `a`'s plan bring it online and report it.
    fn online_on_a(a: &mut Plan, db: &mut DbContent, t: Instant, m: &BTreeMap<NodeId, u64>) {
        assign(db, "a");
        run(a, t, db, true, m);
        a.onlined("g", 1, Ok(()));
        run(a, t, db, true, m);
        report(db, GroupState::Online);
        a.reported("g", 1, GroupState::Online, ReportOutcome::Settled);
    }

    fn report(db: &mut DbContent, state: GroupState) {
        let epoch = db.ownership_of("g").epoch;
        db.apply(&Update::ReportGroup {
            group: "g".into(),
            epoch,
            state,
        })
        .expect("report");
    }

    fn members(ms: &[(&str, u64)]) -> BTreeMap<NodeId, u64> {
        ms.iter().map(|(n, e)| ((*n).to_owned(), *e)).collect()
    }

    fn run(
        p: &mut Plan,
        now: Instant,
        db: &DbContent,
        acting: bool,
        m: &BTreeMap<NodeId, u64>,
    ) -> Vec<Step> {
        run_with(p, now, db, acting, m, Some(now + Duration::from_secs(3600)))
    }

    /// Like `run`, with the run lease given (the view's epoch is the newest member-since).
    fn run_with(
        p: &mut Plan,
        now: Instant,
        db: &DbContent,
        acting: bool,
        m: &BTreeMap<NodeId, u64>,
        run_lease: Option<Instant>,
    ) -> Vec<Step> {
        p.evaluate(
            now,
            &Facts {
                db,
                acting,
                member_since: m,
                view_epoch: m.values().copied().max().unwrap_or(0),
                run_lease,
            },
        )
        .into_iter()
        .filter(|s| !matches!(s, Step::Observed { .. }))
        .collect()
    }

    fn online(epoch: u64, wait: Duration) -> Step {
        Step::Online {
            group: "g".into(),
            epoch,
            wait,
            order: vec!["data".into(), "addr".into(), "svc".into()],
        }
    }

    fn offline(epoch: u64, why: &str) -> Step {
        Step::Offline {
            group: "g".into(),
            epoch,
            order: vec!["svc".into(), "addr".into(), "data".into()],
            why: why.into(),
            forced: false,
        }
    }

    fn forced(epoch: u64, why: &str) -> Step {
        Step::Offline {
            group: "g".into(),
            epoch,
            order: vec!["svc".into(), "addr".into(), "data".into()],
            why: why.into(),
            forced: true,
        }
    }

    fn rep(epoch: u64, state: GroupState) -> Step {
        Step::Report {
            group: "g".into(),
            epoch,
            state,
        }
    }

    #[test]
    fn the_owner_onlines_in_order_reports_and_monitors() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut db = db();
        let mut p = plan("a");
        assert_eq!(run(&mut p, t, &db, true, &m), vec![]);
        assign(&mut db, "a");
        // The first owner ever has nobody to wait for.
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![online(1, Duration::ZERO)]
        );
        assert_eq!(run(&mut p, t, &db, true, &m), vec![], "once");
        p.onlined("g", 1, Ok(()));
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![
                rep(1, GroupState::Online),
                Step::Monitor {
                    group: "g".into(),
                    epoch: 1
                }
            ]
        );
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![],
            "the report is in flight"
        );
        p.reported("g", 1, GroupState::Online, ReportOutcome::Retry);
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![rep(1, GroupState::Online)]
        );
        p.reported("g", 1, GroupState::Online, ReportOutcome::Settled);
        report(&mut db, GroupState::Online);
        assert_eq!(run(&mut p, t, &db, true, &m), vec![]);
        // Other nodes do nothing.
        let mut b = plan("b");
        assert_eq!(run(&mut b, t, &db, true, &m), vec![]);
    }

    #[test]
    fn a_failed_check_takes_everything_offline_in_reverse_then_reports_failed() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1)]);
        let mut db = db();
        let mut p = plan("a");
        online_on_a(&mut p, &mut db, t, &m);
        p.check_failed("g", 1, "resource svc: gone".into());
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![offline(1, "resource svc: gone")]
        );
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![],
            "no report before it is offline"
        );
        p.offlined("g", 1, true);
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![rep(1, GroupState::Failed)]
        );
        p.reported("g", 1, GroupState::Failed, ReportOutcome::Settled);
        report(&mut db, GroupState::Failed);
        assert_eq!(run(&mut p, t, &db, true, &m), vec![]);
    }

    #[test]
    fn a_failed_onlining_goes_offline_and_reports_failed() {
        let t = Instant::now();
        let m = members(&[("a", 1)]);
        let mut db = db();
        let mut p = plan("a");
        assign(&mut db, "a");
        run(&mut p, t, &db, true, &m);
        p.onlined("g", 1, Err("resource addr: timed out".into()));
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![offline(1, "resource addr: timed out")]
        );
        p.offlined("g", 1, true);
        assert_eq!(
            run(&mut p, t, &db, true, &m),
            vec![rep(1, GroupState::Failed)]
        );
    }

    #[test]
    fn a_release_goes_offline_and_reports_offline_and_the_target_needs_no_fence() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1)]);
        let mut db = db();
        let (mut a, mut b) = (plan("a"), plan("b"));
        assign(&mut db, "a");
        run(&mut a, t, &db, true, &m);
        run(&mut b, t, &db, true, &m);
        a.onlined("g", 1, Ok(()));
        run(&mut a, t, &db, true, &m);
        report(&mut db, GroupState::Online);
        a.reported("g", 1, GroupState::Online, ReportOutcome::Settled);
        db.apply(&Update::ReleaseGroup {
            group: "g".into(),
            epoch: 1,
            to: Some("b".into()),
            reason: "move".into(),
        })
        .expect("release");
        assert_eq!(
            run(&mut a, t, &db, true, &m),
            vec![offline(1, "released to b")]
        );
        a.offlined("g", 1, true);
        assert_eq!(
            run(&mut a, t, &db, true, &m),
            vec![rep(1, GroupState::Offline)]
        );
        report(&mut db, GroupState::Offline);
        run(&mut b, t, &db, true, &m);
        assign(&mut db, "b");
        // b saw a report the group offline: no fence wait.
        assert_eq!(
            run(&mut b, t, &db, true, &m),
            vec![online(2, Duration::ZERO)]
        );
        // a forgets its stopped run.
        assert_eq!(run(&mut a, t, &db, true, &m), vec![]);
        assert!(a.groups().is_empty());
    }

    #[test]
    fn a_new_owner_waits_out_the_stop_bound_of_a_lost_owner() {
        let t = Instant::now();
        let mut db = db();
        let mut b = plan("b");
        let all = members(&[("a", 1), ("b", 1), ("c", 1)]);
        assign(&mut db, "a");
        report(&mut db, GroupState::Online);
        run(&mut b, t, &db, true, &all);
        // a is lost: the view without it, the group assigned to b.
        let without = members(&[("b", 1), ("c", 1)]);
        assign(&mut db, "b");
        // Exec resources cannot be forced: their offline timeouts, one after the other.
        let bound = Duration::from_secs(3) + MARGIN;
        assert_eq!(b.stop_bound(&db, "g"), bound);
        assert_eq!(run(&mut b, t, &db, true, &without), vec![online(2, bound)]);
    }

    #[test]
    fn a_previous_owner_that_stayed_a_member_was_not_lost() {
        let t = Instant::now();
        let mut db = db();
        let mut b = plan("b");
        let all = members(&[("a", 1), ("b", 1)]);
        assign(&mut db, "a");
        report(&mut db, GroupState::Online);
        run(&mut b, t, &db, true, &all);
        // The report and the assignment arrive together: b never saw "offline".
        db.apply(&Update::ReleaseGroup {
            group: "g".into(),
            epoch: 1,
            to: Some("b".into()),
            reason: "move".into(),
        })
        .expect("release");
        report(&mut db, GroupState::Offline);
        assign(&mut db, "b");
        assert_eq!(
            run(&mut b, t, &db, true, &all),
            vec![online(2, Duration::ZERO)]
        );
        // Had a rejoined in between (a new member-since), b would have waited.
        let mut c = plan("b");
        let mut db2 = self::db();
        assign(&mut db2, "a");
        report(&mut db2, GroupState::Online);
        run(&mut c, t, &db2, true, &all);
        assign(&mut db2, "b");
        let rejoined = members(&[("a", 7), ("b", 1)]);
        assert_eq!(
            run(&mut c, t, &db2, true, &rejoined),
            vec![online(2, c.stop_bound(&db2, "g"))]
        );
        // A node that starts with the assignment already there knows nothing: it waits.
        let mut fresh = plan("b");
        assert_eq!(
            run(&mut fresh, t, &db2, true, &rejoined),
            vec![online(2, fresh.stop_bound(&db2, "g"))]
        );
    }

    #[test]
    fn ownership_moving_away_stops_the_run_at_once_without_a_report() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1)]);
        let mut db = db();
        let mut a = plan("a");
        assign(&mut db, "a");
        run(&mut a, t, &db, true, &m);
        // Reassigned while still onlining (a was seen lost by the others).
        assign(&mut db, "b");
        assert_eq!(
            run(&mut a, t, &db, true, &m),
            vec![offline(1, "ownership moved to b at epoch 2")]
        );
        a.onlined("g", 1, Ok(()));
        a.offlined("g", 1, true);
        assert_eq!(run(&mut a, t, &db, true, &m), vec![]);
    }

    #[test]
    fn losing_the_verdict_keeps_groups_through_a_view_change_but_stops_them_after_the_grace() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1)]);
        let mut db = db();
        let mut a = plan("a");
        online_on_a(&mut a, &mut db, t, &m);
        // A view change (c joins): the verdict blinks, a stays a member since epoch 1.
        assert_eq!(run(&mut a, t, &db, false, &m), vec![]);
        assert_eq!(a.next_deadline(), Some(t + GRACE));
        let joined = members(&[("a", 1), ("b", 1), ("c", 5)]);
        assert_eq!(
            run(&mut a, t + Duration::from_millis(200), &db, true, &joined),
            vec![]
        );
        assert_eq!(a.groups()["g"].phase, Phase::Online);
        // Now a loses the verdict for good.
        let t2 = t + Duration::from_secs(10);
        assert_eq!(run(&mut a, t2, &db, false, &joined), vec![]);
        assert_eq!(
            run(&mut a, t2 + GRACE, &db, false, &joined),
            vec![forced(1, "this node lost the acting verdict")]
        );
        a.offlined("g", 1, true);
        assert_eq!(
            run(&mut a, t2 + GRACE, &db, false, &joined),
            vec![],
            "no report without acting"
        );
        // Back in the cluster with a stale database that still names it: it says it failed
        // (the compare-and-set decides whether that still applies).
        let back = members(&[("a", 9), ("b", 1), ("c", 5)]);
        assert_eq!(
            run(&mut a, t2 + GRACE * 2, &db, true, &back),
            vec![rep(1, GroupState::Failed)]
        );
    }

    #[test]
    fn coming_back_in_a_new_membership_within_the_grace_stops_the_groups() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1)]);
        let mut db = db();
        let mut a = plan("a");
        assign(&mut db, "a");
        run(&mut a, t, &db, true, &m);
        a.onlined("g", 1, Ok(()));
        run(&mut a, t, &db, true, &m);
        run(&mut a, t, &db, false, &m);
        let rejoined = members(&[("a", 4), ("b", 1)]);
        assert_eq!(
            run(&mut a, t + Duration::from_millis(100), &db, true, &rejoined),
            vec![forced(1, "this node rejoined the cluster")]
        );
    }

    #[test]
    fn an_owned_group_that_is_not_running_here_is_cleaned_up_and_reported_failed() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1)]);
        let mut db = db();
        assign(&mut db, "a");
        report(&mut db, GroupState::Online);
        // watchd restarted: the plan starts empty.
        let mut a = plan("a");
        assert_eq!(
            run(&mut a, t, &db, true, &m),
            vec![offline(1, "not running here at epoch 1")]
        );
        a.offlined("g", 1, true);
        assert_eq!(
            run(&mut a, t, &db, true, &m),
            vec![rep(1, GroupState::Failed)]
        );
    }

    #[test]
    fn a_resource_that_does_not_stop_turns_a_clean_offline_into_failed() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1)]);
        let mut db = db();
        let mut a = plan("a");
        online_on_a(&mut a, &mut db, t, &m);
        db.apply(&Update::ReleaseGroup {
            group: "g".into(),
            epoch: 1,
            to: None,
            reason: "offline".into(),
        })
        .expect("release");
        assert_eq!(run(&mut a, t, &db, true, &m), vec![offline(1, "released")]);
        a.offlined("g", 1, false);
        assert_eq!(
            run(&mut a, t, &db, true, &m),
            vec![rep(1, GroupState::Failed)]
        );
    }

    #[test]
    fn observed_changes_are_reported_once_each() {
        let t = Instant::now();
        let m = members(&[("a", 1)]);
        let mut db = db();
        let mut b = plan("b");
        let observed = |p: &mut Plan, db: &DbContent| {
            p.evaluate(
                t,
                &Facts {
                    db,
                    acting: true,
                    member_since: &m,
                    view_epoch: 1,
                    run_lease: None,
                },
            )
            .into_iter()
            .filter(|s| matches!(s, Step::Observed { .. }))
            .count()
        };
        assert_eq!(observed(&mut b, &db), 1);
        assert_eq!(observed(&mut b, &db), 0);
        assign(&mut db, "a");
        assert_eq!(observed(&mut b, &db), 1);
        report(&mut db, GroupState::Online);
        assert_eq!(observed(&mut b, &db), 1);
    }

    /// Group `k` on a, b, c with one resource of every kind (offline timeouts 5 s).
    fn kinds_db() -> DbContent {
        let mut db = DbContent::default();
        for n in ["a", "b", "c"] {
            db.apply(&Update::AddNode { node: n.into() }).expect("node");
        }
        db.apply(&Update::AddGroup(Group {
            name: "k".into(),
            preferred_owners: vec!["a".into(), "b".into(), "c".into()],
            ..Group::default()
        }))
        .expect("group");
        let props = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        for (name, kind, p) in [
            ("data", "fileset", props(&[("fileset", "data")])),
            (
                "ckpt",
                "checkpoint",
                props(&[("fileset", "ckpt"), ("service", "svc")]),
            ),
            ("hook", "exec", props(&[("agent", "/bin/true")])),
            ("svc", "service", props(&[("service", "svc")])),
            (
                "addr",
                "ip",
                props(&[("address", "10.0.0.9/24"), ("interface", "eth0")]),
            ),
            ("hook2", "exec", props(&[("agent", "/bin/true")])),
        ] {
            db.apply(&Update::AddResource(Resource {
                name: name.into(),
                group: "k".into(),
                kind: kind.into(),
                properties: p,
                offline_timeout_ms: 5000,
                ..Resource::default()
            }))
            .expect("resource");
        }
        db
    }

    #[test]
    fn the_stop_bound_counts_forced_kinds_by_their_forced_bound_and_exec_by_its_timeout() {
        let db = kinds_db();
        // Services and addresses at once (300 ms), the two exec resources one after the other
        // (5 s each: their effects cannot be forced); filesets and checkpoints (250 ms) are
        // fenced by epoch and do not count.
        assert_eq!(
            plan("b").stop_bound(&db, "k"),
            Duration::from_millis(300 + 10_000) + MARGIN
        );
        assert!(
            ForcedPhase::fenced_by_epoch("fileset") && ForcedPhase::fenced_by_epoch("checkpoint")
        );
        assert!(!ForcedPhase::fenced_by_epoch("service") && !ForcedPhase::fenced_by_epoch("ip"));
        assert!(!ForcedPhase::fenced_by_epoch("exec"));
        assert_eq!(ForcedPhase::of("service"), ForcedPhase::Cut);
        assert_eq!(ForcedPhase::of("ip"), ForcedPhase::Cut);
        assert_eq!(ForcedPhase::of("exec"), ForcedPhase::Agents);
        assert_eq!(ForcedPhase::of("checkpoint"), ForcedPhase::Data);
        // Without exec resources the bound is small.
        let mut db = db;
        for r in ["hook", "hook2"] {
            db.apply(&Update::RemoveResource { name: r.into() })
                .expect("remove");
        }
        assert_eq!(
            plan("b").stop_bound(&db, "k"),
            Duration::from_millis(300) + MARGIN
        );
    }

    #[test]
    fn a_lapsed_run_lease_stops_the_groups_by_force_before_the_grace_ends() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut db = db();
        let mut a = plan("a");
        assign(&mut db, "a");
        run(&mut a, t, &db, true, &m);
        a.onlined("g", 1, Ok(()));
        run(&mut a, t, &db, true, &m);
        // The verdict drops; the quorum's vouches still hold for 100 ms.
        let lease = t + Duration::from_millis(100);
        assert_eq!(run_with(&mut a, t, &db, false, &m, Some(lease)), vec![]);
        assert_eq!(a.next_deadline(), Some(lease));
        assert_eq!(
            run_with(&mut a, lease, &db, false, &m, Some(lease)),
            vec![forced(
                1,
                "this node's run lease lapsed (no quorum vouches for it)"
            )]
        );
        // A node that finds its lease gone with the verdict stops at once.
        let mut b = plan("a");
        let mut db2 = self::db();
        assign(&mut db2, "a");
        run(&mut b, t, &db2, true, &m);
        b.onlined("g", 1, Ok(()));
        run(&mut b, t, &db2, true, &m);
        assert_eq!(
            run_with(&mut b, t, &db2, false, &m, None),
            vec![forced(
                1,
                "this node's run lease lapsed (no quorum vouches for it)"
            )]
        );
    }

    #[test]
    fn a_lease_renewed_during_a_view_change_keeps_the_groups_until_the_grace_ends() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut db = db();
        let mut a = plan("a");
        assign(&mut db, "a");
        run(&mut a, t, &db, true, &m);
        a.onlined("g", 1, Ok(()));
        run(&mut a, t, &db, true, &m);
        let ms = Duration::from_millis;
        assert_eq!(
            run_with(&mut a, t, &db, false, &m, Some(t + ms(100))),
            vec![]
        );
        // The vouches keep coming: the lease moves on, the grace still bounds the blink.
        assert_eq!(
            run_with(&mut a, t + ms(100), &db, false, &m, Some(t + ms(900))),
            vec![]
        );
        assert_eq!(a.next_deadline(), Some(t + GRACE));
        assert_eq!(a.groups()["g"].phase, Phase::Online);
        assert_eq!(
            run_with(&mut a, t + GRACE, &db, false, &m, Some(t + ms(900))),
            vec![forced(1, "this node lost the acting verdict")]
        );
    }

    #[test]
    fn a_new_owner_counts_the_stop_bound_from_when_it_first_acted_without_the_lost_owner() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut db = db();
        let all = members(&[("a", 1), ("b", 1), ("c", 1)]);
        assign(&mut db, "a");
        report(&mut db, GroupState::Online);
        let mut b = plan("b");
        run(&mut b, t, &db, true, &all);
        // The view without a (epoch 2), acting: a's run lease has lapsed by now.
        let without = members(&[("b", 1), ("c", 1)]);
        let view2 = |p: &mut Plan, now: Instant, db: &DbContent, m: &BTreeMap<NodeId, u64>| {
            p.evaluate(
                now,
                &Facts {
                    db,
                    acting: true,
                    member_since: m,
                    view_epoch: 2,
                    run_lease: Some(now + Duration::from_secs(3600)),
                },
            )
            .into_iter()
            .filter(|s| !matches!(s, Step::Observed { .. }))
            .collect::<Vec<_>>()
        };
        assert_eq!(view2(&mut b, t + ms(10), &db, &without), vec![]);
        // The assignment arrives 1 s later: what is left of the bound.
        assign(&mut db, "b");
        let bound = b.stop_bound(&db, "g");
        assert_eq!(
            view2(&mut b, t + ms(1010), &db, &without),
            vec![online(2, bound - ms(1000))]
        );
        // After another view change, nothing is known: the whole bound.
        let mut c = plan("b");
        let mut db2 = self::db();
        assign(&mut db2, "a");
        report(&mut db2, GroupState::Online);
        run(&mut c, t, &db2, true, &all);
        view2(&mut c, t + ms(10), &db2, &without);
        assign(&mut db2, "b");
        let later = members(&[("b", 1), ("c", 1)]);
        assert_eq!(
            c.evaluate(
                t + ms(1010),
                &Facts {
                    db: &db2,
                    acting: true,
                    member_since: &later,
                    view_epoch: 3,
                    run_lease: None,
                },
            )
            .into_iter()
            .filter(|s| !matches!(s, Step::Observed { .. }))
            .collect::<Vec<_>>(),
            vec![online(2, bound)]
        );
        // Not acting when a was seen missing: that moment proves nothing.
        let mut d = plan("b");
        let mut db3 = self::db();
        assign(&mut db3, "a");
        report(&mut db3, GroupState::Online);
        run(&mut d, t, &db3, true, &all);
        run_with(&mut d, t + ms(10), &db3, false, &without, Some(t + ms(50)));
        run(&mut d, t + ms(500), &db3, true, &without);
        assign(&mut db3, "b");
        assert_eq!(
            run(&mut d, t + ms(1500), &db3, true, &without),
            vec![online(2, bound - ms(1000))]
        );
    }

    /// Group `g` preferring a, b (not c) with a fileset and a warm service depending on it.
    fn warm_db(any_owner: bool) -> DbContent {
        let mut db = DbContent::default();
        for n in ["a", "b", "c"] {
            db.apply(&Update::AddNode { node: n.into() }).expect("node");
        }
        db.apply(&Update::AddGroup(Group {
            name: "g".into(),
            preferred_owners: vec!["a".into(), "b".into()],
            any_owner,
            ..Group::default()
        }))
        .expect("group");
        db.apply(&Update::AddResource(Resource {
            name: "data".into(),
            group: "g".into(),
            kind: "fileset".into(),
            properties: [("fileset".to_owned(), "data".to_owned())].into(),
            ..Resource::default()
        }))
        .expect("fileset");
        db.apply(&Update::AddResource(Resource {
            name: "kv".into(),
            group: "g".into(),
            kind: "service".into(),
            depends_on: vec!["data".into()],
            properties: [
                ("service".to_owned(), "kv".to_owned()),
                ("standby".to_owned(), "warm".to_owned()),
            ]
            .into(),
            ..Resource::default()
        }))
        .expect("service");
        db
    }

    fn standby_steps(steps: Vec<Step>) -> Vec<Step> {
        steps
            .into_iter()
            .filter(|s| matches!(s, Step::Standby { .. } | Step::StandbyOff { .. }))
            .collect()
    }

    fn standby(epoch: u64) -> Step {
        Step::Standby {
            group: "g".into(),
            epoch,
            resources: vec!["kv".into()],
        }
    }

    #[test]
    fn warm_services_run_as_standbys_on_every_possible_owner_that_does_not_run_the_group() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut db = warm_db(false);
        let (mut a, mut b, mut c) = (plan("a"), plan("b"), plan("c"));
        // As soon as the group is defined, on its preferred owners only, once.
        assert_eq!(run(&mut a, t, &db, true, &m), vec![standby(0)]);
        assert_eq!(run(&mut b, t, &db, true, &m), vec![standby(0)]);
        assert_eq!(run(&mut c, t, &db, true, &m), vec![]);
        assert_eq!(run(&mut a, t, &db, true, &m), vec![]);
        // Not acting: nothing is asked for.
        let mut fenced = plan("b");
        assert_eq!(run(&mut fenced, t, &db, false, &m), vec![]);
        // a becomes the owner: its onlining takes the instance over (a promotion), no stop.
        assign(&mut db, "a");
        let steps = run(&mut a, t, &db, true, &m);
        assert!(
            matches!(steps.as_slice(), [Step::Online { group, .. }] if group == "g"),
            "{steps:?}"
        );
        assert!(a.standbys().is_empty());
        assert_eq!(standby_steps(run(&mut b, t, &db, true, &m)), vec![]);
        a.onlined("g", 1, Ok(()));
        run(&mut a, t, &db, true, &m);
        report(&mut db, GroupState::Online);
        a.reported("g", 1, GroupState::Online, ReportOutcome::Settled);
        // Moved to b: a stops its primary, then runs a standby again; b promotes its own.
        db.apply(&Update::ReleaseGroup {
            group: "g".into(),
            epoch: 1,
            to: Some("b".into()),
            reason: "move".into(),
        })
        .expect("release");
        let steps = run(&mut a, t, &db, true, &m);
        assert!(
            matches!(steps.as_slice(), [Step::Offline { forced: false, .. }]),
            "{steps:?}"
        );
        assert_eq!(standby_steps(run(&mut a, t, &db, true, &m)), vec![]);
        a.offlined("g", 1, true);
        let steps = run(&mut a, t, &db, true, &m);
        assert_eq!(
            steps,
            vec![
                Step::Report {
                    group: "g".into(),
                    epoch: 1,
                    state: GroupState::Offline
                },
                standby(1)
            ]
        );
        report(&mut db, GroupState::Offline);
        assign(&mut db, "b");
        let steps = run(&mut b, t, &db, true, &m);
        assert!(
            matches!(steps.as_slice(), [Step::Online { group, wait, .. }] if group == "g" && wait.is_zero()),
            "{steps:?}"
        );
        assert!(b.standbys().is_empty());
        assert_eq!(standby_steps(run(&mut a, t, &db, true, &m)), vec![]);
    }

    #[test]
    fn a_standby_stops_when_the_service_is_no_longer_warm_or_the_node_no_longer_may_own_it() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut db = warm_db(true);
        let mut c = plan("c");
        // any_owner: every node keeps a standby.
        assert_eq!(run(&mut c, t, &db, true, &m), vec![standby(0)]);
        let mut g = db.groups["g"].clone();
        g.any_owner = false;
        db.apply(&Update::SetGroup(g)).expect("set group");
        assert_eq!(
            run(&mut c, t, &db, true, &m),
            vec![Step::StandbyOff {
                group: "g".into(),
                resources: vec!["kv".into()]
            }]
        );
        assert!(c.standbys().is_empty());
        assert_eq!(run(&mut c, t, &db, true, &m), vec![]);
        // Cold again on a preferred owner: its standby stops.
        let mut a = plan("a");
        assert_eq!(run(&mut a, t, &db, true, &m), vec![standby(0)]);
        let mut r = db.resources["kv"].clone();
        r.properties.insert("standby".into(), "cold".into());
        db.apply(&Update::SetResource(r)).expect("set resource");
        assert_eq!(
            run(&mut a, t, &db, true, &m),
            vec![Step::StandbyOff {
                group: "g".into(),
                resources: vec!["kv".into()]
            }]
        );
        assert_eq!(warm_resources(&db, "g", "a"), Vec::<String>::new());
    }

    #[test]
    fn a_graceful_offline_under_way_goes_on_by_force_when_the_lease_lapses() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut db = db();
        let mut a = plan("a");
        online_on_a(&mut a, &mut db, t, &m);
        // A check fails (the partition took the interface's carrier): a graceful offline.
        a.check_failed("g", 1, "resource addr: no carrier".into());
        assert_eq!(
            run(&mut a, t, &db, true, &m),
            vec![offline(1, "resource addr: no carrier")]
        );
        // Then the verdict and the lease go: the offline is handed out again, by force.
        assert_eq!(
            run_with(&mut a, t, &db, false, &m, None),
            vec![forced(
                1,
                "resource addr: no carrier; this node's run lease lapsed (no quorum vouches for it)"
            )]
        );
        assert_eq!(run_with(&mut a, t, &db, false, &m, None), vec![], "once");
        // The graceful offline, cut short, ends late: it does not end the forced one.
        a.offline_ended("g", 1, false, false);
        assert_eq!(a.groups()["g"].phase, Phase::Offlining);
        a.offlined("g", 1, true);
        assert_eq!(
            run(
                &mut a,
                t + GRACE,
                &db,
                true,
                &members(&[("a", 2), ("b", 1)])
            ),
            vec![rep(1, GroupState::Failed)]
        );
    }

    #[test]
    fn with_a_quorum_disk_groups_ride_the_whole_grace_and_the_bound_counts_it() {
        let t = Instant::now();
        let m = members(&[("a", 1), ("b", 1)]);
        let mut db = db();
        let mut a = Plan::new(PlanConfig {
            me: "a".into(),
            acting_grace: GRACE,
            stop_margin: MARGIN,
            forced: FORCED,
            grace_beyond_lease: true,
        });
        assert_eq!(
            a.stop_bound(&db, "g"),
            GRACE + Duration::from_secs(3) + MARGIN
        );
        assign(&mut db, "a");
        run(&mut a, t, &db, true, &m);
        a.onlined("g", 1, Ok(()));
        run(&mut a, t, &db, true, &m);
        // The peer (the disk's holder) died: no lease, but the disk may come to this node.
        assert_eq!(run_with(&mut a, t, &db, false, &m, None), vec![]);
        assert_eq!(a.next_deadline(), Some(t + GRACE));
        assert_eq!(
            run_with(&mut a, t + GRACE, &db, false, &m, None),
            vec![forced(
                1,
                "this node's run lease lapsed (no quorum vouches for it)"
            )]
        );
    }
}
