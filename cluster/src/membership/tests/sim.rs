//! A deterministic simulation of a cluster: every node's membership machine (and quorum disk
//! machine when the cluster has a disk), a simulated clock, a network with per-direction link
//! cuts, loss and delay, a shared in-memory disk with latency, torn and late writes, crashes,
//! restarts and planned leaves. The invariants are checked after every event.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use crate::membership::{
    Action, Event, Input, Membership, MembershipConfig, Message, NodeId, Persisted, View,
};
use crate::quorum::{
    DiskAction, DiskConfig, DiskEvent, DiskInput, DiskOp, DiskReply, MemDisk, QuorumDisk,
    SECTOR_SIZE, Votes,
};

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// xorshift64*: small, seedable, good enough to pick faults.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407)
            | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// A uniform index below `n`.
    pub(crate) fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(u64::try_from(n).unwrap_or(u64::MAX))).unwrap_or(0)
    }
    /// A uniform duration below `d` (inclusive of zero).
    pub(crate) fn upto(&mut self, d: Duration) -> Duration {
        Duration::from_micros(self.below(micros(d) + 1))
    }
    pub(crate) fn chance(&mut self, permille: u64) -> bool {
        self.below(1000) < permille
    }
    pub(crate) fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = micros(hi.saturating_sub(lo));
        lo + Duration::from_micros(self.below(span + 1))
    }
}

/// What the simulation's world does.
#[derive(Debug, Clone)]
pub(crate) struct World {
    pub nodes: usize,
    pub networks: usize,
    pub disk: bool,
    /// Message loss, per mille.
    pub loss: u64,
    pub delay_min: Duration,
    pub delay_max: Duration,
    /// Timers fire up to this late.
    pub timer_lateness: Duration,
    pub io_min: Duration,
    pub io_max: Duration,
}

impl World {
    pub(crate) fn calm(nodes: usize, networks: usize, disk: bool) -> World {
        World {
            nodes,
            networks,
            disk,
            loss: 0,
            delay_min: Duration::from_millis(1),
            delay_max: Duration::from_millis(3),
            timer_lateness: Duration::ZERO,
            io_min: Duration::from_micros(200),
            io_max: Duration::from_millis(2),
        }
    }
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: usize,
        from: usize,
        net: Option<usize>,
        msg: Message,
    },
    Timer {
        node: usize,
        token: u64,
    },
    /// A quorum-disk lease I/O's step.
    Lease(LeaseEv),
}

/// A node's lease reads in flight: id → the sectors sampled.
pub(crate) type PendingReads = BTreeMap<u64, Vec<[u8; SECTOR_SIZE]>>;

/// The steps of a quorum-disk lease I/O in the simulated world (the GUM simulation's too).
#[derive(Debug)]
pub(crate) enum LeaseEv {
    /// A write reaches the platter (maybe torn).
    Land {
        sector: u64,
        data: Box<[u8; SECTOR_SIZE]>,
        torn: bool,
    },
    /// A read samples the platter.
    Sample {
        node: usize,
        incarnation: u64,
        id: u64,
        first: u64,
        count: u64,
    },
    /// An I/O completes at the node.
    IoDone {
        node: usize,
        incarnation: u64,
        reply: DiskReply,
    },
}

impl LeaseEv {
    /// The node whose I/O this is (`None`: a write landing concerns only the platter).
    pub(crate) fn node(&self) -> Option<usize> {
        match self {
            LeaseEv::Land { .. } => None,
            LeaseEv::Sample { node, .. } | LeaseEv::IoDone { node, .. } => Some(*node),
        }
    }
}

/// The steps of lease I/O `op` (`id`) of `node` at `incarnation`, started at `now`, and when
/// each comes: latency between the world's bounds (1 % late, up to twice the disk's I/O
/// timeout), 0.3 % never completing, errors when the node's disk is `cut`; a read samples and
/// a write lands at a random moment before completion.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_lease_io(
    rng: &mut Rng,
    world: &World,
    io_timeout: Duration,
    now: Instant,
    (node, incarnation): (usize, u64),
    cut: bool,
    id: u64,
    op: DiskOp,
) -> Vec<(Instant, LeaseEv)> {
    let late = rng.chance(10);
    let hang = rng.chance(3);
    let max = if late { io_timeout * 2 } else { world.io_max };
    let latency = rng.between(world.io_min, max);
    let done = now + latency;
    let mid = now + rng.between(Duration::ZERO, latency);
    let (step, reply) = match op {
        DiskOp::Read { .. } if cut => (
            None,
            DiskReply::Read {
                id,
                result: Err("disk cut off".into()),
            },
        ),
        DiskOp::Write { .. } if cut => (
            None,
            DiskReply::Write {
                id,
                result: Err("disk cut off".into()),
            },
        ),
        DiskOp::Read { first, count } => (
            Some(LeaseEv::Sample {
                node,
                incarnation,
                id,
                first,
                count,
            }),
            DiskReply::Read {
                id,
                result: Ok(Vec::new()),
            },
        ),
        DiskOp::Write { sector, data } => (
            Some(LeaseEv::Land {
                sector,
                data,
                torn: false,
            }),
            DiskReply::Write { id, result: Ok(()) },
        ),
    };
    let mut out: Vec<(Instant, LeaseEv)> = step.map(|s| (mid, s)).into_iter().collect();
    if !hang {
        out.push((
            done,
            LeaseEv::IoDone {
                node,
                incarnation,
                reply,
            },
        ));
    }
    out
}

/// Carries out a lease I/O step on the shared `disk`; `reads` and `incarnation` are the
/// node's (`None`: it is not running). Returns the reply to hand the node's disk machine.
pub(crate) fn lease_step(
    disk: &mut MemDisk,
    ev: LeaseEv,
    node: Option<(&mut PendingReads, u64)>,
) -> Option<DiskReply> {
    match ev {
        LeaseEv::Land { sector, data, torn } => {
            if torn {
                let mut cur = disk.sector(sector);
                let half = SECTOR_SIZE / 2;
                cur[..half].copy_from_slice(&data[..half]);
                disk.put(sector, &cur);
            } else {
                disk.put(sector, &data);
            }
            None
        }
        LeaseEv::Sample {
            incarnation,
            id,
            first,
            count,
            ..
        } => {
            if let Some((reads, running)) = node
                && running == incarnation
            {
                reads.insert(id, (first..first + count).map(|s| disk.sector(s)).collect());
            }
            None
        }
        LeaseEv::IoDone {
            incarnation, reply, ..
        } => {
            let (reads, running) = node?;
            if running != incarnation {
                return None;
            }
            match reply {
                DiskReply::Read { id, .. } => Some(DiskReply::Read {
                    id,
                    result: Ok(reads.remove(&id)?),
                }),
                other => Some(other),
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct SimNode {
    pub name: NodeId,
    pub m: Option<Membership>,
    pub q: Option<QuorumDisk>,
    pub persisted: Persisted,
    pub incarnation: u64,
    timer: u64,
    pub acting: bool,
    /// The disk machine says this node owns the disk (its stop-acting flag).
    pub disk_owner: bool,
    pub left: bool,
    /// Committed views, in order, across restarts (what the node persisted as history).
    pub history: Vec<View>,
    /// Pending reads: id → sampled sectors.
    reads: PendingReads,
    /// Disk cut off from this node (I/O errors).
    pub disk_cut: bool,
}

impl SimNode {
    pub(crate) fn alive(&self) -> bool {
        self.m.is_some() && !self.left
    }
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    pub regroups: u64,
    pub commits: u64,
    pub planned_leaves: u64,
    pub link_down: u64,
    pub no_quorum: u64,
    pub suspected: u64,
    pub acquired: u64,
    pub join_deferred: u64,
}

#[derive(Debug)]
pub(crate) struct Sim {
    pub rng: Rng,
    pub world: World,
    pub cfg: MembershipConfig,
    pub disk_cfg: DiskConfig,
    pub start: Instant,
    pub now: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    events: BTreeMap<u64, Ev>,
    seq: u64,
    pub nodes: Vec<SimNode>,
    pub names: Vec<NodeId>,
    pub nets: Vec<String>,
    /// Cut directed links: (from, to, net).
    pub cut: BTreeSet<(usize, usize, usize)>,
    pub disk: MemDisk,
    pub views: BTreeMap<u64, View>,
    pub stats: Stats,
    votes: Votes,
    /// The node that acquired the disk last: nobody else can use the disk's vote until
    /// another node acquires it.
    pub last_acquirer: Option<usize>,
    /// Instants at which the disk had two acting owners, or acting nodes broke the rule.
    pub check: bool,
    /// Print every action but heartbeats.
    pub trace: bool,
}

impl Sim {
    pub(crate) fn new(seed: u64, world: World, tweak: impl Fn(&mut MembershipConfig)) -> Sim {
        let names: Vec<NodeId> = (0..world.nodes).map(|i| format!("n{i}")).collect();
        let nets: Vec<String> = (0..world.networks).map(|i| format!("net{i}")).collect();
        let mut cfg = MembershipConfig::new(names.clone(), nets.clone(), world.disk);
        tweak(&mut cfg);
        let disk_cfg = DiskConfig::new("simcluster", names.clone());
        let start = Instant::now();
        let mut sim = Sim {
            rng: Rng::new(seed),
            votes: Votes::new(names.clone(), world.disk),
            disk: MemDisk::new(disk_cfg.sectors()),
            world,
            cfg,
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
            stats: Stats::default(),
            last_acquirer: None,
            check: true,
            trace: std::env::var_os("SIM_TRACE").is_some(),
        };
        for name in names {
            sim.nodes.push(SimNode {
                name,
                m: None,
                q: None,
                persisted: Persisted::default(),
                incarnation: 0,
                timer: 0,
                acting: false,
                disk_owner: false,
                left: false,
                history: Vec::new(),
                reads: BTreeMap::new(),
                disk_cut: false,
            });
        }
        for i in 0..sim.nodes.len() {
            sim.start_node(i);
        }
        sim
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
        node.left = false;
        node.acting = false;
        node.disk_owner = false;
        node.reads.clear();
        let m = Membership::new(
            self.cfg.clone(),
            node.name.clone(),
            node.incarnation,
            node.persisted.clone(),
            self.now,
        )
        .expect("valid configuration");
        node.m = Some(m);
        if self.world.disk {
            let seed = self.rng.next();
            node.q = Some(
                QuorumDisk::new(self.disk_cfg.clone(), &node.name, seed, self.now)
                    .expect("valid disk configuration"),
            );
        }
        self.step_node(i, Input::Tick);
    }

    pub(crate) fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.m = None;
        node.q = None;
        node.acting = false;
        node.disk_owner = false;
        node.reads.clear();
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
            if self.check {
                self.check_acting();
            }
        }
        self.now = end;
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { to, from, net, msg } => {
                if !self.nodes[to].alive() {
                    return;
                }
                let network = net.map(|n| self.nets[n].clone());
                let from = self.names[from].clone();
                self.step_node(to, Input::Message { from, network, msg });
            }
            Ev::Timer { node, token } => {
                if self.nodes[node].timer == token && self.nodes[node].alive() {
                    self.step_node(node, Input::Tick);
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
                }
            }
        }
    }

    fn reschedule(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        if !node.alive() {
            return;
        }
        let m = node.m.as_ref().map(|m| m.next_deadline(now));
        let q = node.q.as_ref().map(|q| q.next_deadline(now));
        let next = [m.flatten(), q.flatten()].into_iter().flatten().min();
        node.timer += 1;
        let token = node.timer;
        if let Some(at) = next {
            let late = self.rng.between(Duration::ZERO, self.world.timer_lateness);
            self.push(at + late, Ev::Timer { node: i, token });
        }
    }

    pub(crate) fn step_node(&mut self, i: usize, input: Input) {
        let tick = matches!(input, Input::Tick);
        let Some(m) = self.nodes[i].m.as_mut() else {
            return;
        };
        let actions = m.step(self.now, input);
        self.apply(i, actions);
        if tick && self.nodes[i].q.is_some() {
            self.step_disk(i, DiskInput::Tick);
        }
        self.reschedule(i);
    }

    fn step_disk(&mut self, i: usize, input: DiskInput) {
        let now = self.now;
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
                        let Some(m) = self.nodes[i].m.as_mut() else {
                            return;
                        };
                        let acts = m.step(now, Input::EpochPublished { epoch });
                        self.apply(i, acts);
                    }
                    _ => {}
                },
            }
        }
        if before != after {
            let Some(m) = self.nodes[i].m.as_mut() else {
                return;
            };
            let acts = m.step(
                now,
                Input::DiskLease {
                    valid_until: after.valid_until,
                    max_epoch: after.max_epoch,
                },
            );
            self.apply(i, acts);
        }
        self.reschedule(i);
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

    /// Crash `i` while one of its writes may be in flight: that write lands torn.
    pub(crate) fn crash_tearing(&mut self, i: usize) {
        let seqs: Vec<u64> = self
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Ev::Lease(LeaseEv::Land { .. })))
            .map(|(s, _)| *s)
            .collect();
        if let Some(s) = seqs.first()
            && let Some(Ev::Lease(LeaseEv::Land { torn, .. })) = self.events.get_mut(s)
        {
            *torn = true;
        }
        self.crash(i);
    }

    fn send(&mut self, from: usize, to: &str, network: Option<String>, msg: Message) {
        let Some(to) = self.names.iter().position(|n| n == to) else {
            panic!("send to unknown node {to}");
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
        let delay = self.rng.between(self.world.delay_min, self.world.delay_max);
        let at = self.now + delay;
        self.push(at, Ev::Deliver { to, from, net, msg });
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
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
                Action::Send { to, network, msg } => self.send(i, &to, network, msg),
                Action::Persist(p) => self.nodes[i].persisted = p,
                Action::Committed(v) => self.on_committed(i, v),
                Action::Acting(b) => self.nodes[i].acting = b,
                Action::WantDisk(b) => {
                    if self.nodes[i].q.is_some() {
                        self.step_disk(i, DiskInput::Want(b));
                    }
                }
                Action::PublishEpoch(e) => {
                    assert!(self.world.disk, "publish without a disk");
                    self.step_disk(i, DiskInput::Publish(e));
                }
                Action::Event(e) => match e {
                    Event::RegroupStarted { .. } => self.stats.regroups += 1,
                    Event::PlannedLeave { .. } => self.stats.planned_leaves += 1,
                    Event::LinkDown { .. } => self.stats.link_down += 1,
                    Event::NoQuorum { .. } => self.stats.no_quorum += 1,
                    Event::JoinDeferred { .. } => self.stats.join_deferred += 1,
                    Event::Suspected { .. } => self.stats.suspected += 1,
                    Event::Ignored { from, why } => panic!("ignored a message from {from}: {why}"),
                    _ => {}
                },
                Action::Left => {
                    let n = &mut self.nodes[i];
                    n.left = true;
                    n.acting = false;
                    n.disk_owner = false;
                    n.q = None;
                }
            }
        }
    }

    fn on_committed(&mut self, i: usize, v: View) {
        self.stats.commits += 1;
        let name = self.names[i].clone();
        // (a) one view per epoch.
        match self.views.get(&v.epoch) {
            Some(known) => assert_eq!(
                known, &v,
                "two views with epoch {} ({name} committed the second)",
                v.epoch
            ),
            None => {
                self.views.insert(v.epoch, v.clone());
            }
        }
        assert!(
            v.members.contains(&name),
            "{name} committed a view without it"
        );
        // Quorum at commit.
        assert!(
            self.votes.count(&v.members, None) + usize::from(self.world.disk)
                >= self.votes.majority(),
            "view {} committed without quorum",
            v.epoch
        );
        let node = &mut self.nodes[i];
        let joined = v.joined.get(&name).copied().expect("joined of a member");
        if let Some(last) = node.history.last() {
            assert!(last.epoch < v.epoch, "{name}: views out of order");
        }
        // (b) locally: a continuing member's previous view is the predecessor, with the same
        // join epoch.
        if joined != v.epoch {
            let last = node
                .history
                .last()
                .unwrap_or_else(|| panic!("{name} continues into {} with no history", v.epoch));
            assert_eq!(
                last.epoch, v.prev,
                "{name} skipped a view before {}",
                v.epoch
            );
            assert_eq!(
                last.joined.get(&name),
                Some(&joined),
                "{name}: join epoch changed"
            );
        }
        node.history.push(v);
    }

    /// (c): no two acting nodes in views that exclude each other, every acting node's view has
    /// quorum with the actual disk owner, and at most one node acts as the disk's owner.
    fn check_acting(&self) {
        let owners: Vec<&SimNode> = self.nodes.iter().filter(|n| n.disk_owner).collect();
        assert!(
            owners.len() <= 1,
            "two disk owners at {:?}: {:?}",
            self.elapsed(),
            owners.iter().map(|n| &n.name).collect::<Vec<_>>()
        );
        let owner = self.last_acquirer.map(|i| self.names[i].as_str());
        let acting: Vec<(&SimNode, &View)> = self
            .nodes
            .iter()
            .filter(|n| n.acting)
            .map(|n| (n, n.history.last().expect("an acting node has a view")))
            .collect();
        for (n, v) in &acting {
            assert!(
                self.votes.has_quorum(v, owner),
                "{} acts at {:?} in view {} without quorum (disk owner {owner:?})",
                n.name,
                self.elapsed(),
                v.epoch
            );
        }
        for (x, vx) in &acting {
            for (y, vy) in &acting {
                if vx.epoch <= vy.epoch {
                    assert!(
                        vy.members.contains(&x.name),
                        "{} acts in view {} while {} acts in view {} without it (at {:?})",
                        x.name,
                        vx.epoch,
                        y.name,
                        vy.epoch,
                        self.elapsed()
                    );
                }
            }
        }
    }

    /// (b) globally: any two members of a committed view saw the same views since the later
    /// of their join epochs.
    pub(crate) fn check_histories(&self) {
        for v in self.views.values() {
            let members: Vec<&SimNode> = self
                .nodes
                .iter()
                .filter(|n| n.history.iter().any(|h| h.epoch == v.epoch))
                .collect();
            for a in &members {
                for b in &members {
                    let from = v.joined[&a.name].max(v.joined[&b.name]);
                    let part = |n: &SimNode| -> Vec<u64> {
                        n.history
                            .iter()
                            .map(|h| h.epoch)
                            .filter(|e| *e >= from && *e <= v.epoch)
                            .collect()
                    };
                    assert_eq!(
                        part(a),
                        part(b),
                        "{} and {} saw different views before {}",
                        a.name,
                        b.name,
                        v.epoch
                    );
                }
            }
        }
    }

    /// Whether every node runs, agrees on one view with all nodes, and acts.
    pub(crate) fn converged(&self) -> bool {
        let all: BTreeSet<NodeId> = self.names.iter().cloned().collect();
        let first = self.nodes.first().and_then(|n| n.history.last());
        self.nodes.iter().all(|n| {
            n.alive()
                && n.acting
                && n.history.last() == first
                && first.is_some_and(|v| v.members == all)
        })
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

    /// Cuts every link between nodes `a` and `b`, both ways.
    pub(crate) fn cut_between(&mut self, a: usize, b: usize) {
        for n in 0..self.nets.len() {
            self.cut.insert((a, b, n));
            self.cut.insert((b, a, n));
        }
    }

    pub(crate) fn cut_network(&mut self, net: usize) {
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b {
                    self.cut.insert((a, b, net));
                }
            }
        }
    }

    pub(crate) fn leave(&mut self, i: usize) {
        self.step_node(i, Input::Leave);
    }

    pub(crate) fn set_paused(&mut self, i: usize, node: usize, paused: bool) {
        let node = self.names[node].clone();
        self.step_node(i, Input::SetPaused { node, paused });
    }
}
