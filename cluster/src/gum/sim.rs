//! A deterministic simulation of whole nodes: membership, the quorum disk lease and the global
//! update manager on every node, wired the way the node actor wires them, over a simulated
//! clock, a network with per-link cuts, loss, delay and reordering, and one shared in-memory
//! disk (lease slots and the database area) with latency, failures and torn writes. A crash
//! keeps exactly what the node made durable (membership's and the GUM's persisted state, the
//! applied database). The invariants are checked after every event.
//!
//! The random source and the world's parameters are the membership simulation's
//! ([`crate::membership::tests::sim`]); its event loop is typed to membership's messages, so
//! this one carries both protocols on one wire, as the actor does.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use super::{
    DbSnapshot, DiskRecord, Gum, GumAction, GumConfig, GumError, GumEvent, GumInput, GumMessage,
    GumPersisted, Update,
};
use crate::db::{DiskCopy, Group, Resource, encode_disk_copy, read_disk_area, write_disk_area};
use crate::membership::tests::sim::{LeaseEv, PendingReads, Rng, World, lease_step, plan_lease_io};
use crate::membership::{
    Action, Event, Input, Membership, MembershipConfig, Message, NodeId, Persisted, View,
};
use crate::quorum::{
    DiskAction, DiskConfig, DiskEvent, DiskInput, DiskOp, MemDisk, QuorumDisk, SECTOR_SIZE, Votes,
};

/// Both protocols on one connection, as the actor sends them.
#[derive(Debug, Clone)]
enum Wire {
    Membership(Message),
    Gum(GumMessage),
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: usize,
        from: usize,
        net: Option<usize>,
        msg: Wire,
    },
    Timer {
        node: usize,
        token: u64,
    },
    /// A quorum-disk lease I/O's step.
    Lease(LeaseEv),
    /// A database record reaches the platter; `torn`: its writer crashed, so only part of it.
    DbLand {
        node: usize,
        record: Box<DiskRecord>,
        torn: bool,
    },
    /// A database read samples the platter.
    DbSample {
        node: usize,
        incarnation: u64,
        id: u64,
    },
    /// A database I/O completes at the node.
    DbDone {
        node: usize,
        incarnation: u64,
        input: GumInput,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub update: Update,
    pub at: Instant,
}

#[derive(Debug)]
pub(crate) struct SimNode {
    pub name: NodeId,
    pub m: Option<Membership>,
    pub q: Option<QuorumDisk>,
    pub g: Option<Gum>,
    pub persisted: Persisted,
    pub incarnation: u64,
    timer: u64,
    /// When membership and the lease machine were last stepped: their deadlines are computed
    /// from there, so a deadline that passed while only another machine ran is not lost.
    m_at: Instant,
    q_at: Instant,
    /// When the node's valid timer fires.
    timer_at: Option<Instant>,
    pub acting: bool,
    /// The lease machine says this node owns the disk.
    pub disk_owner: bool,
    /// What the GUM was told about the lease.
    gum_owner: bool,
    /// Committed views, in order, across restarts.
    pub history: Vec<View>,
    reads: PendingReads,
    db_reads: BTreeMap<u64, Result<Option<DiskRecord>, String>>,
    /// The disk is cut off from this node.
    pub disk_cut: bool,
    /// The durable database (what redb holds).
    pub db: DbSnapshot,
    /// The durable GUM state.
    pub gum_persisted: GumPersisted,
    /// Open requests of the current incarnation.
    pub requests: BTreeMap<u64, Request>,
}

impl SimNode {
    pub(crate) fn alive(&self) -> bool {
        self.m.is_some()
    }
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    pub views: u64,
    pub proposed: u64,
    pub ok: u64,
    pub invalid: u64,
    pub in_doubt: u64,
    pub timeouts: u64,
    pub no_leader: u64,
    pub busy: u64,
    pub installs: u64,
    pub completions: u64,
    pub db_writes: u64,
    pub torn_db_writes: u64,
    pub crashes: u64,
    pub acquired: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, o: &Stats) {
        self.views += o.views;
        self.proposed += o.proposed;
        self.ok += o.ok;
        self.invalid += o.invalid;
        self.in_doubt += o.in_doubt;
        self.timeouts += o.timeouts;
        self.no_leader += o.no_leader;
        self.busy += o.busy;
        self.installs += o.installs;
        self.completions += o.completions;
        self.db_writes += o.db_writes;
        self.torn_db_writes += o.torn_db_writes;
        self.crashes += o.crashes;
        self.acquired += o.acquired;
    }
}

/// The simulated cluster.
#[derive(Debug)]
pub(crate) struct Sim {
    pub seed: u64,
    pub rng: Rng,
    pub world: World,
    cfg: MembershipConfig,
    pub gum_cfg: GumConfig,
    disk_cfg: DiskConfig,
    cluster_hash: u64,
    start: Instant,
    pub now: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    events: BTreeMap<u64, Ev>,
    seq: u64,
    pub nodes: Vec<SimNode>,
    names: Vec<NodeId>,
    nets: Vec<String>,
    /// Cut directed links: (from, to, net).
    pub cut: BTreeSet<(usize, usize, usize)>,
    pub disk: MemDisk,
    /// Per mille of database I/Os that fail.
    pub db_flaky: u64,
    /// Per mille of GUM messages delivered twice (a transport should not, the GUM copes).
    pub dup: u64,
    views: BTreeMap<u64, View>,
    votes: Votes,
    last_acquirer: Option<usize>,
    /// The one snapshot checksum each sequence number ever had, on any node.
    history: BTreeMap<u64, u64>,
    /// The one update applied at each sequence number, on any node.
    applied: BTreeMap<u64, Update>,
    /// The highest sequence number acknowledged `Ok` to a caller.
    max_acked: u64,
    /// Acknowledged sequence numbers and the epoch each was committed in.
    acked: BTreeMap<u64, u64>,
    /// The epoch in which each sequence number was first applied.
    applied_epoch: BTreeMap<u64, u64>,
    next_request: u64,
    pub stats: Stats,
    trace: bool,
}

fn names(n: usize) -> Vec<NodeId> {
    (0..n).map(|i| format!("n{i}")).collect()
}

impl Sim {
    pub(crate) fn new(seed: u64, world: World) -> Sim {
        let names = names(world.nodes);
        let nets: Vec<String> = (0..world.networks).map(|i| format!("net{i}")).collect();
        let cfg = MembershipConfig::new(names.clone(), nets.clone(), world.disk);
        let mut gum_cfg = GumConfig::new(names.clone(), world.disk);
        gum_cfg.request_timeout = Duration::from_secs(2);
        gum_cfg.retry_interval = Duration::from_millis(100);
        gum_cfg.max_queued = 16;
        let disk_cfg = DiskConfig::new("simcluster", names.clone());
        let start = Instant::now();
        let mut sim = Sim {
            seed,
            rng: Rng::new(seed),
            votes: Votes::new(names.clone(), world.disk),
            disk: MemDisk::new(crate::db::DB_AREA_END),
            db_flaky: 0,
            dup: 0,
            cluster_hash: disk_cfg.cluster_hash(),
            world,
            cfg,
            gum_cfg,
            disk_cfg,
            start,
            now: start,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            nodes: Vec::new(),
            names: names.clone(),
            nets,
            cut: BTreeSet::new(),
            views: BTreeMap::new(),
            last_acquirer: None,
            history: BTreeMap::new(),
            applied: BTreeMap::new(),
            max_acked: 0,
            acked: BTreeMap::new(),
            applied_epoch: BTreeMap::new(),
            next_request: 1,
            stats: Stats::default(),
            trace: std::env::var_os("SIM_TRACE").is_some(),
        };
        for name in names {
            sim.nodes.push(SimNode {
                name,
                m: None,
                q: None,
                g: None,
                persisted: Persisted::default(),
                incarnation: 0,
                timer: 0,
                m_at: start,
                q_at: start,
                timer_at: None,
                acting: false,
                disk_owner: false,
                gum_owner: false,
                history: Vec::new(),
                reads: BTreeMap::new(),
                db_reads: BTreeMap::new(),
                disk_cut: false,
                db: DbSnapshot::default(),
                gum_persisted: GumPersisted::default(),
                requests: BTreeMap::new(),
            });
        }
        for i in 0..sim.nodes.len() {
            sim.start_node(i);
        }
        sim
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {} at {:?}: {what} (replay: SIM_SEED={} SIM_TRACE=1)",
            self.seed,
            self.elapsed(),
            self.seed
        )
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(Reverse((at, self.seq)));
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub(crate) fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.incarnation += 1;
        node.timer_at = None;
        node.acting = false;
        node.disk_owner = false;
        node.gum_owner = false;
        node.reads.clear();
        node.db_reads.clear();
        node.requests.clear();
        node.m = Some(
            Membership::new(
                self.cfg.clone(),
                node.name.clone(),
                node.incarnation,
                node.persisted.clone(),
                self.now,
            )
            .expect("valid configuration"),
        );
        node.g = Some(
            Gum::new(
                self.gum_cfg.clone(),
                node.name.clone(),
                node.gum_persisted.clone(),
                node.db.clone(),
            )
            .expect("valid configuration"),
        );
        if self.world.disk {
            let seed = self.rng.next();
            node.q = Some(
                QuorumDisk::new(self.disk_cfg.clone(), &node.name, seed, self.now)
                    .expect("valid disk configuration"),
            );
        }
        self.tick(i);
    }

    /// The node dies: what it made durable stays, a database write it had in flight lands torn
    /// or not at all.
    pub(crate) fn crash(&mut self, i: usize) {
        self.stats.crashes += 1;
        let node = &mut self.nodes[i];
        node.m = None;
        node.q = None;
        node.g = None;
        node.acting = false;
        node.disk_owner = false;
        node.gum_owner = false;
        node.reads.clear();
        node.db_reads.clear();
        node.requests.clear();
        let mine: Vec<u64> = self
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Ev::DbLand { node, .. } if *node == i))
            .map(|(s, _)| *s)
            .collect();
        for s in mine {
            if self.rng.chance(500) {
                self.events.remove(&s);
            } else if let Some(Ev::DbLand { torn, .. }) = self.events.get_mut(&s) {
                *torn = true;
            }
        }
    }

    /// Runs until `until` (relative to the start).
    pub(crate) fn run_until(&mut self, until: Duration) {
        let end = self.start + until;
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > end {
                break;
            }
            self.queue.pop();
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            self.now = at;
            self.handle(ev);
            self.check_acting();
        }
        self.now = end;
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { to, from, net, msg } => {
                if !self.nodes[to].alive() {
                    return;
                }
                let from = self.names[from].clone();
                match msg {
                    Wire::Membership(msg) => {
                        let network = net.map(|n| self.nets[n].clone());
                        self.step_member(to, Input::Message { from, network, msg });
                    }
                    Wire::Gum(msg) => self.step_gum(to, GumInput::Message { from, msg }),
                }
                self.reschedule(to);
            }
            Ev::Timer { node, token } => {
                if self.nodes[node].timer == token && self.nodes[node].alive() {
                    self.nodes[node].timer_at = None;
                    self.tick(node);
                }
            }
            Ev::Lease(ev) => {
                let done = matches!(ev, LeaseEv::IoDone { .. });
                let i = ev.node();
                let node = i
                    .map(|i| &mut self.nodes[i])
                    .filter(|n| !done || n.alive())
                    .map(|n| (&mut n.reads, n.incarnation));
                if let (Some(i), Some(reply)) = (i, lease_step(&mut self.disk, ev, node)) {
                    self.step_disk(i, DiskInput::Io(reply));
                    self.reschedule(i);
                }
            }
            Ev::DbLand { record, torn, .. } => {
                if torn {
                    self.land_torn(&record);
                } else {
                    write_disk_area(&mut self.disk, self.cluster_hash, &record)
                        .unwrap_or_else(|e| self.fail(format!("database write failed: {e}")));
                }
            }
            Ev::DbSample {
                node,
                incarnation,
                id,
            } => {
                if self.nodes[node].incarnation == incarnation {
                    let r = read_disk_area(&mut self.disk, self.cluster_hash)
                        .map(|a| a.record)
                        .map_err(|e| e.to_string());
                    self.nodes[node].db_reads.insert(id, r);
                }
            }
            Ev::DbDone {
                node,
                incarnation,
                input,
            } => {
                let n = &mut self.nodes[node];
                if n.incarnation != incarnation || !n.alive() {
                    return;
                }
                let input = match input {
                    GumInput::DiskRead { id, .. } => match n.db_reads.remove(&id) {
                        Some(result) => GumInput::DiskRead { id, result },
                        None => return,
                    },
                    other => other,
                };
                self.step_gum(node, input);
                self.reschedule(node);
            }
        }
    }

    /// Writes a prefix of what [`write_disk_area`] writes (payload first, header last), the last
    /// sector of it half.
    fn land_torn(&mut self, record: &DiskRecord) {
        self.stats.torn_db_writes += 1;
        let Ok(area) = read_disk_area(&mut self.disk, self.cluster_hash) else {
            return;
        };
        let target = area.copy.map_or(DiskCopy::A, DiskCopy::other);
        let Ok(sectors) = encode_disk_copy(self.cluster_hash, target, record) else {
            return;
        };
        let first = target.first_sector();
        let mut order: Vec<(u64, [u8; SECTOR_SIZE])> = sectors
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, s)| (first + i as u64, *s))
            .collect();
        order.push((first, sectors[0]));
        let k = self.rng.index(order.len()) + 1;
        for (j, (sector, data)) in order.iter().take(k).enumerate() {
            if j + 1 == k {
                let mut cur = self.disk.sector(*sector);
                let half = SECTOR_SIZE / 2;
                cur[..half].copy_from_slice(&data[..half]);
                self.disk.put(*sector, &cur);
            } else {
                self.disk.put(*sector, data);
            }
        }
    }

    fn tick(&mut self, i: usize) {
        self.step_member(i, Input::Tick);
        if self.nodes[i].q.is_some() {
            self.step_disk(i, DiskInput::Tick);
        }
        self.step_gum(i, GumInput::Tick);
        self.reschedule(i);
    }

    fn reschedule(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        if !node.alive() {
            return;
        }
        let next = [
            node.m.as_ref().and_then(|m| m.next_deadline(node.m_at)),
            node.q.as_ref().and_then(|q| q.next_deadline(node.q_at)),
            node.g.as_ref().and_then(|g| g.next_deadline(now)),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.max(now));
        // A timer that fires no later than needed stays: its lateness is not drawn again.
        if let (Some(pending), Some(at)) = (node.timer_at, next)
            && pending >= now
            && pending <= at + self.world.timer_lateness
        {
            return;
        }
        node.timer += 1;
        let token = node.timer;
        node.timer_at = None;
        if let Some(at) = next {
            let late = self.rng.between(Duration::ZERO, self.world.timer_lateness);
            node.timer_at = Some(at + late);
            self.push(at + late, Ev::Timer { node: i, token });
        }
    }

    fn step_member(&mut self, i: usize, input: Input) {
        self.nodes[i].m_at = self.now;
        let Some(m) = self.nodes[i].m.as_mut() else {
            return;
        };
        let actions = m.step(self.now, input);
        self.apply_member(i, actions);
    }

    fn step_disk(&mut self, i: usize, input: DiskInput) {
        let now = self.now;
        self.nodes[i].q_at = now;
        let Some(q) = self.nodes[i].q.as_mut() else {
            return;
        };
        let before = q.status(now);
        let out = q.step(now, input);
        let after = q.status(now);
        for a in out {
            match a {
                DiskAction::Io { id, op } => self.start_io(i, id, op),
                DiskAction::Event(e) => match e {
                    DiskEvent::Acquired { .. } => {
                        self.stats.acquired += 1;
                        self.nodes[i].disk_owner = true;
                        self.last_acquirer = Some(i);
                    }
                    DiskEvent::Lost { .. } | DiskEvent::Released => {
                        self.nodes[i].disk_owner = false;
                    }
                    DiskEvent::Published { epoch } => {
                        self.step_member(i, Input::EpochPublished { epoch });
                    }
                    _ => {}
                },
            }
        }
        if before != after {
            self.step_member(
                i,
                Input::DiskLease {
                    valid_until: after.valid_until,
                    max_epoch: after.max_epoch,
                },
            );
        }
        self.sync_owner(i);
    }

    /// The actor tells the GUM whenever the lease's ownership changes.
    fn sync_owner(&mut self, i: usize) {
        let now = self.now;
        let owner = self.nodes[i].q.as_ref().is_some_and(|q| q.is_owner(now));
        if owner != self.nodes[i].gum_owner && self.nodes[i].g.is_some() {
            self.nodes[i].gum_owner = owner;
            self.step_gum(i, GumInput::DiskOwner(owner));
        }
    }

    fn step_gum(&mut self, i: usize, input: GumInput) {
        self.sync_owner_quiet(i);
        let Some(g) = self.nodes[i].g.as_mut() else {
            return;
        };
        let actions = g.step(self.now, input);
        if let Some(t) = g.next_deadline(self.now)
            && t <= self.now
        {
            self.fail(format!(
                "{}: the GUM's next deadline has passed",
                self.names[i]
            ));
        }
        self.apply_gum(i, actions);
    }

    /// Ownership that lapsed by time alone, noticed before the GUM acts on it.
    fn sync_owner_quiet(&mut self, i: usize) {
        let now = self.now;
        let owner = self.nodes[i].q.as_ref().is_some_and(|q| q.is_owner(now));
        if !owner && self.nodes[i].gum_owner {
            self.nodes[i].gum_owner = false;
            if let Some(g) = self.nodes[i].g.as_mut() {
                let actions = g.step(now, GumInput::DiskOwner(false));
                self.apply_gum(i, actions);
            }
        }
    }

    fn start_io(&mut self, i: usize, id: u64, op: DiskOp) {
        let n = &self.nodes[i];
        let who = (i, n.incarnation);
        let steps = plan_lease_io(
            &mut self.rng,
            &self.world,
            self.disk_cfg.io_timeout,
            self.now,
            who,
            n.disk_cut,
            id,
            op,
        );
        for (at, step) in steps {
            self.push(at, Ev::Lease(step));
        }
    }

    /// A database read or write of the disk owner, with latency and occasional failures.
    fn start_db_io(&mut self, i: usize, id: u64, record: Option<DiskRecord>) {
        let incarnation = self.nodes[i].incarnation;
        let latency = self.rng.between(self.world.io_min, self.world.io_max * 2);
        let done = self.now + latency;
        let mid = self.now + self.rng.between(Duration::ZERO, latency);
        let owner = self.nodes[i]
            .q
            .as_ref()
            .is_some_and(|q| q.is_owner(self.now));
        let flaky = self.rng.chance(self.db_flaky);
        let failure = if self.nodes[i].disk_cut {
            Some("disk cut off".to_string())
        } else if !owner {
            Some("this node does not hold the disk's lease".to_string())
        } else if flaky {
            Some("EIO".to_string())
        } else {
            None
        };
        match record {
            None => {
                if failure.is_none() {
                    self.push(
                        mid,
                        Ev::DbSample {
                            node: i,
                            incarnation,
                            id,
                        },
                    );
                } else {
                    self.nodes[i]
                        .db_reads
                        .insert(id, Err(failure.clone().unwrap_or_default()));
                }
                self.push(
                    done,
                    Ev::DbDone {
                        node: i,
                        incarnation,
                        input: GumInput::DiskRead {
                            id,
                            result: Ok(None),
                        },
                    },
                );
            }
            Some(record) => {
                self.stats.db_writes += 1;
                // A failed write may still have reached the platter.
                let lands = failure.is_none() || (flaky && self.rng.chance(500));
                if lands {
                    self.push(
                        mid,
                        Ev::DbLand {
                            node: i,
                            record: Box::new(record),
                            torn: false,
                        },
                    );
                }
                self.push(
                    done,
                    Ev::DbDone {
                        node: i,
                        incarnation,
                        input: GumInput::DiskWritten {
                            id,
                            result: failure.map_or(Ok(()), Err),
                        },
                    },
                );
            }
        }
    }

    fn send(&mut self, from: usize, to: &str, network: Option<String>, msg: Wire) {
        let Some(to) = self.names.iter().position(|n| n == to) else {
            self.fail(format!("send to unknown node {to}"));
        };
        let net = match network {
            Some(n) => match self.nets.iter().position(|x| *x == n) {
                Some(i) if !self.cut.contains(&(from, to, i)) => Some(i),
                _ => return,
            },
            None => match (0..self.nets.len()).find(|i| !self.cut.contains(&(from, to, *i))) {
                Some(_) => None,
                None => return,
            },
        };
        if self.rng.chance(self.world.loss) {
            return;
        }
        if matches!(msg, Wire::Gum(_)) && self.rng.chance(self.dup) {
            let delay = self.rng.between(self.world.delay_min, self.world.delay_max);
            let copy = msg.clone();
            self.push(
                self.now + delay,
                Ev::Deliver {
                    to,
                    from,
                    net,
                    msg: copy,
                },
            );
        }
        let delay = self.rng.between(self.world.delay_min, self.world.delay_max);
        let at = self.now + delay;
        self.push(at, Ev::Deliver { to, from, net, msg });
    }

    fn apply_member(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            if self.trace
                && !matches!(
                    a,
                    Action::Send {
                        msg: Message::Heartbeat(_),
                        ..
                    }
                )
            {
                eprintln!(
                    "{:>10.4} {} {a:?}",
                    self.elapsed().as_secs_f64(),
                    self.names[i]
                );
            }
            match a {
                Action::Send { to, network, msg } => {
                    self.send(i, &to, network, Wire::Membership(msg));
                }
                Action::Persist(p) => self.nodes[i].persisted = p,
                Action::Committed(v) => {
                    self.on_committed(i, &v);
                    self.step_gum(i, GumInput::ViewCommitted(v));
                }
                Action::Acting(b) => {
                    self.nodes[i].acting = b;
                    self.step_gum(i, GumInput::Acting(b));
                }
                Action::WantDisk(b) => {
                    if self.nodes[i].q.is_some() {
                        self.step_disk(i, DiskInput::Want(b));
                    }
                }
                Action::PublishEpoch(e) => self.step_disk(i, DiskInput::Publish(e)),
                Action::Event(Event::Ignored { from, why }) => {
                    self.fail(format!("membership ignored a message from {from}: {why}"));
                }
                Action::Event(_) | Action::Left => {}
            }
        }
    }

    fn apply_gum(&mut self, i: usize, actions: Vec<GumAction>) {
        for a in actions {
            if self.trace {
                let brief = match &a {
                    GumAction::Install(s) => format!("Install(seq {})", s.seq),
                    GumAction::WriteDisk { id, record } => {
                        format!("WriteDisk {{ id: {id}, key: {:?} }}", record.key())
                    }
                    GumAction::Send {
                        to,
                        msg: GumMessage::Status(s),
                    } => format!(
                        "Send {{ to: {to}, Status(epoch {} n {} seq {} pending {:?} disk {:?}) }}",
                        s.epoch,
                        s.n,
                        s.state.seq,
                        s.state.pending.as_ref().map(|p| (p.seq, p.epoch)),
                        s.disk
                            .as_ref()
                            .map(|d| (d.seq, d.pending.as_ref().map(|p| (p.seq, p.epoch))))
                    ),
                    GumAction::Send {
                        to,
                        msg:
                            GumMessage::Prepare {
                                epoch,
                                base,
                                pending,
                            },
                    } => format!(
                        "Send {{ to: {to}, Prepare(epoch {epoch} base {:?} pending {:?}) }}",
                        base.as_ref().map(|b| b.seq),
                        pending.as_ref().map(|p| (p.seq, p.epoch))
                    ),
                    other => format!("{other:?}"),
                };
                eprintln!(
                    "{:>10.4} {} gum {brief}",
                    self.elapsed().as_secs_f64(),
                    self.names[i]
                );
            }
            match a {
                GumAction::Send { to, msg } => self.send(i, &to, None, Wire::Gum(msg)),
                GumAction::Persist(p) => self.nodes[i].gum_persisted = p,
                GumAction::Apply { seq, epoch, update } => self.on_apply(i, seq, epoch, &update),
                GumAction::Install(s) => self.on_install(i, s),
                GumAction::ReadDisk { id } => self.start_db_io(i, id, None),
                GumAction::WriteDisk { id, record } => self.start_db_io(i, id, Some(*record)),
                GumAction::Reply { request_id, result } => self.on_reply(i, request_id, result),
                GumAction::Event(e) => self.on_gum_event(i, e),
            }
        }
    }

    /// The node's store applies update `seq`: it must follow, and match what every other node
    /// applied at `seq`.
    fn on_apply(&mut self, i: usize, seq: u64, epoch: u64, update: &Update) {
        let name = self.names[i].clone();
        let node = &mut self.nodes[i];
        if seq != node.db.seq + 1 {
            self.fail(format!(
                "{name} applies {seq} on top of {}",
                self.nodes[i].db.seq
            ));
        }
        if let Err(e) = node.db.apply(epoch, update) {
            self.fail(format!("{name}: update {seq} does not apply: {e}"));
        }
        if node
            .gum_persisted
            .pending
            .as_ref()
            .is_some_and(|p| p.seq <= seq)
        {
            node.gum_persisted.pending = None;
        }
        let sum = node.db.checksum();
        match self.applied.get(&seq) {
            Some(u) if u != update => self.fail(format!(
                "{name} applied {update:?} as {seq}, another node applied {u:?}"
            )),
            Some(_) => {}
            None => {
                self.applied.insert(seq, update.clone());
                self.applied_epoch.insert(seq, epoch);
            }
        }
        self.record_state(&name, seq, sum);
    }

    fn on_install(&mut self, i: usize, s: DbSnapshot) {
        self.stats.installs += 1;
        let name = self.names[i].clone();
        let (seq, sum) = (s.seq, s.checksum());
        let node = &mut self.nodes[i];
        node.db = s;
        if node
            .gum_persisted
            .pending
            .as_ref()
            .is_some_and(|p| p.seq <= seq)
        {
            node.gum_persisted.pending = None;
        }
        self.record_state(&name, seq, sum);
    }

    /// Every node's database at a sequence number is the same: one history.
    fn record_state(&mut self, name: &str, seq: u64, sum: u64) {
        match self.history.get(&seq) {
            Some(s) if *s != sum => self.fail(format!(
                "{name} holds a different database at {seq} than another node did"
            )),
            Some(_) => {}
            None => {
                self.history.insert(seq, sum);
            }
        }
    }

    fn on_reply(&mut self, i: usize, request_id: u64, result: Result<u64, GumError>) {
        let name = self.names[i].clone();
        let Some(req) = self.nodes[i].requests.remove(&request_id) else {
            self.fail(format!(
                "{name} answered request {request_id} twice or unasked"
            ));
        };
        let limit = self.gum_cfg.request_timeout + self.world.timer_lateness;
        if self.now.duration_since(req.at) > limit {
            self.fail(format!(
                "{name} answered request {request_id} after {:?}",
                self.now.duration_since(req.at)
            ));
        }
        match result {
            Ok(seq) => {
                self.stats.ok += 1;
                match self.applied.get(&seq) {
                    Some(u) if *u == req.update => {}
                    other => self.fail(format!(
                        "{name}: request {request_id} acknowledged as {seq}, but {seq} is {other:?}, not {:?}",
                        req.update
                    )),
                }
                self.max_acked = self.max_acked.max(seq);
                let epoch = self.applied_epoch.get(&seq).copied().unwrap_or(0);
                self.acked.insert(seq, epoch);
            }
            Err(GumError::Invalid(_)) => self.stats.invalid += 1,
            Err(GumError::InDoubt) => self.stats.in_doubt += 1,
            Err(GumError::Timeout) => self.stats.timeouts += 1,
            Err(GumError::NoLeader) => self.stats.no_leader += 1,
            Err(GumError::Busy) => self.stats.busy += 1,
            Err(GumError::NotLeader) => {
                self.fail(format!("{name} told its caller NotLeader"));
            }
        }
    }

    fn on_gum_event(&mut self, i: usize, e: GumEvent) {
        let name = self.names[i].clone();
        match e {
            GumEvent::Synced {
                epoch,
                seq,
                completing,
            } => {
                // No acknowledged update is lost: the leader of a later view holds every one.
                // (The leader of a view that was already superseded may sync to less: it can
                // commit nothing, its members moved on.)
                let must = self
                    .acked
                    .iter()
                    .filter(|(_, e)| **e <= epoch)
                    .map(|(s, _)| *s)
                    .max()
                    .unwrap_or(0);
                let holds = seq >= must || (completing == Some(must) && seq + 1 == must);
                if !holds {
                    self.fail(format!(
                        "{name} synced view {epoch} to {seq} (completing {completing:?}) but {must} was acknowledged"
                    ));
                }
                if completing.is_some() {
                    self.stats.completions += 1;
                }
                if let (Some(c), Some(u)) = (completing, self.applied.get(&must))
                    && c == must
                {
                    let pending = self.nodes[i].g.as_ref().and_then(|g| g.pending().cloned());
                    if pending.as_ref().map(|p| &p.update) != Some(u) {
                        self.fail(format!(
                            "{name} completes {pending:?} at {c}, but {u:?} was acknowledged there"
                        ));
                    }
                }
            }
            GumEvent::Diverged { node, seq } => {
                self.fail(format!("{name} saw a divergent state of {node} at {seq}"));
            }
            GumEvent::ApplyFailed { seq, why } => {
                self.fail(format!("{name}: update {seq} failed to apply: {why}"));
            }
            GumEvent::Ignored { .. }
            | GumEvent::SyncStarted { .. }
            | GumEvent::Installed { .. }
            | GumEvent::Committed { .. }
            | GumEvent::DiskFailed { .. } => {}
        }
    }

    fn on_committed(&mut self, i: usize, v: &View) {
        self.stats.views += 1;
        let name = self.names[i].clone();
        match self.views.get(&v.epoch) {
            Some(known) if known != v => self.fail(format!(
                "two views with epoch {} ({name} committed the second)",
                v.epoch
            )),
            Some(_) => {}
            None => {
                self.views.insert(v.epoch, v.clone());
            }
        }
        if let Some(last) = self.nodes[i].history.last()
            && last.epoch >= v.epoch
        {
            self.fail(format!("{name}: views out of order"));
        }
        self.nodes[i].history.push(v.clone());
    }

    /// Never two partitions acting with quorum: acting nodes' views include each other, and
    /// each holds quorum with the actual disk owner.
    fn check_acting(&self) {
        let owners = self.nodes.iter().filter(|n| n.disk_owner).count();
        if owners > 1 {
            self.fail("two disk owners".into());
        }
        let owner = self.last_acquirer.map(|i| self.names[i].as_str());
        let acting: Vec<(&SimNode, &View)> = self
            .nodes
            .iter()
            .filter(|n| n.acting)
            .filter_map(|n| n.history.last().map(|v| (n, v)))
            .collect();
        for (n, v) in &acting {
            if !self.votes.has_quorum(v, owner) {
                self.fail(format!(
                    "{} acts in view {} without quorum",
                    n.name, v.epoch
                ));
            }
        }
        for (x, vx) in &acting {
            for (y, vy) in &acting {
                if vx.epoch <= vy.epoch && !vy.members.contains(&x.name) {
                    self.fail(format!(
                        "{} acts in view {} while {} acts in view {} without it",
                        x.name, vx.epoch, y.name, vy.epoch
                    ));
                }
            }
        }
    }

    /// A caller on node `i` proposes `update`.
    pub(crate) fn propose(&mut self, i: usize, update: Update) {
        if !self.nodes[i].alive() {
            return;
        }
        self.stats.proposed += 1;
        let id = self.next_request;
        if self.trace {
            eprintln!(
                "{:>10.4} {} propose {id}: {update:?}",
                self.elapsed().as_secs_f64(),
                self.names[i]
            );
        }
        self.next_request += 1;
        self.nodes[i].requests.insert(
            id,
            Request {
                update: update.clone(),
                at: self.now,
            },
        );
        self.step_gum(
            i,
            GumInput::Propose {
                request_id: id,
                update,
            },
        );
        self.reschedule(i);
    }

    pub(crate) fn heal(&mut self) {
        self.cut.clear();
    }

    /// Cuts every link between the groups of `groups` (node → group number).
    pub(crate) fn partition(&mut self, groups: &[usize]) {
        for a in 0..groups.len() {
            for b in 0..groups.len() {
                if groups[a] != groups[b] {
                    for n in 0..self.nets.len() {
                        self.cut.insert((a, b, n));
                    }
                }
            }
        }
    }

    /// Every node runs, all agree on one view of all nodes and act, the leader finished its
    /// sync, and every node holds the same database with nothing pending or open.
    pub(crate) fn converged(&self) -> bool {
        let all: BTreeSet<NodeId> = self.names.iter().cloned().collect();
        let first = self.nodes.first().and_then(|n| n.history.last());
        let views = self.nodes.iter().all(|n| {
            n.alive()
                && n.acting
                && n.history.last() == first
                && first.is_some_and(|v| v.members == all)
        });
        if !views {
            return false;
        }
        let Some(db) = self.nodes.first().map(|n| &n.db) else {
            return false;
        };
        let leader_synced = self
            .nodes
            .iter()
            .filter_map(|n| n.g.as_ref())
            .any(Gum::is_synced_leader);
        leader_synced
            && self.nodes.iter().all(|n| {
                n.db.seq == db.seq
                    && n.db.content == db.content
                    && n.gum_persisted.pending.is_none()
                    && n.requests.is_empty()
                    && n.g.as_ref().is_some_and(|g| g.snapshot() == &n.db)
            })
    }

    /// The disk's database area holds a record no older than the cluster's... when the last
    /// view counted the disk.
    pub(crate) fn disk_record(&mut self) -> Option<DiskRecord> {
        read_disk_area(&mut self.disk, self.cluster_hash)
            .ok()
            .and_then(|a| a.record)
    }

    pub(crate) fn describe(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "{}: alive {} acting {} view {:?} db {} pending {:?} open {} leader-synced {}",
                    n.name,
                    n.alive(),
                    n.acting,
                    n.history.last().map(|v| (v.epoch, v.members.clone())),
                    n.db.seq,
                    n.gum_persisted.pending.as_ref().map(|p| (p.seq, p.epoch)),
                    n.requests.len(),
                    n.g.as_ref().is_some_and(Gum::is_synced_leader),
                )
            })
            .collect::<Vec<_>>()
            .join("\n  ")
    }

    pub(crate) fn max_acked(&self) -> u64 {
        self.max_acked
    }

    pub(crate) fn disk_cut(&mut self, i: usize, cut: bool) {
        self.nodes[i].disk_cut = cut;
    }
}

/// A random update over a small name space, so that many are valid and some are refused.
pub(crate) fn random_update(rng: &mut Rng) -> Update {
    let group = |rng: &mut Rng| format!("g{}", rng.below(3));
    let resource = |rng: &mut Rng| format!("r{}", rng.below(4));
    match rng.below(10) {
        0..=3 => Update::SetProperty {
            key: format!("k{}", rng.below(5)),
            value: format!("v{}", rng.below(1000)),
        },
        4 => Update::DeleteProperty {
            key: format!("k{}", rng.below(5)),
        },
        5 => Update::AddGroup(Group {
            name: group(rng),
            preferred_owners: vec!["n0".into()],
            ..Group::default()
        }),
        6 => Update::RemoveGroup { name: group(rng) },
        7 | 8 => {
            let deps = if rng.chance(500) {
                vec![resource(rng)]
            } else {
                Vec::new()
            };
            Update::AddResource(Resource {
                name: resource(rng),
                group: group(rng),
                kind: "exec".into(),
                depends_on: deps,
                properties: [("agent".to_owned(), "/bin/true".to_owned())].into(),
                ..Resource::default()
            })
        }
        _ => Update::RemoveResource {
            name: resource(rng),
        },
    }
}
