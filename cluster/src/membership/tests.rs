use std::time::{Duration, Instant};

use super::*;

pub(crate) mod sim;

use sim::{Rng, Sim, World};

fn names(n: usize) -> Vec<NodeId> {
    (0..n).map(|i| format!("n{i}")).collect()
}

fn cfg(n: usize) -> MembershipConfig {
    MembershipConfig::new(names(n), ["a".to_string()], false)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The one view every running node committed last, when they agree.
fn agreed(sim: &Sim) -> Option<View> {
    let running: Vec<_> = sim.nodes.iter().filter(|n| n.alive()).collect();
    let first = running.first()?.history.last()?.clone();
    running
        .iter()
        .all(|n| n.history.last() == Some(&first))
        .then_some(first)
}

fn members(v: &View) -> Vec<&str> {
    v.members.iter().map(String::as_str).collect()
}

#[test]
fn defaults_are_valid_and_unsafe_timings_are_refused() {
    let c = cfg(3);
    c.validate("n0").expect("defaults are valid");
    assert_eq!(c.suspect_after(), Duration::from_millis(500));

    let bad = |f: &dyn Fn(&mut MembershipConfig)| {
        let mut c = cfg(3);
        f(&mut c);
        match c.validate("n0") {
            Err(MembershipError::InvalidConfig { field, why }) => (field, why),
            Ok(()) => panic!("accepted"),
        }
    };
    assert_eq!(bad(&|c| c.miss_threshold = 2).0, "miss_threshold");
    assert_eq!(bad(&|c| c.link_miss_threshold = 5).0, "link_miss_threshold");
    assert_eq!(bad(&|c| c.link_miss_threshold = 0).0, "link_miss_threshold");
    assert_eq!(
        bad(&|c| c.acting_margin = Duration::ZERO).0,
        "acting_margin"
    );
    let (field, why) = bad(&|c| c.acting_margin = Duration::from_millis(400));
    assert_eq!(field, "acting_margin");
    assert!(why.contains("two heartbeat intervals"), "{why}");
    assert_eq!(
        bad(&|c| c.heartbeat_interval = Duration::ZERO).0,
        "heartbeat_interval"
    );
    assert_eq!(
        bad(&|c| c.round_timeout = Duration::from_millis(10)).0,
        "round_timeout"
    );
    assert_eq!(
        bad(&|c| c.retry_interval = Duration::from_millis(100)).0,
        "retry_interval"
    );
    assert_eq!(
        bad(&|c| c.leave_timeout = Duration::from_millis(300)).0,
        "leave_timeout"
    );
    assert_eq!(bad(&|c| c.networks.clear()).0, "networks");
    assert_eq!(
        bad(&|c| c.networks = vec!["a".into(), "a".into()]).0,
        "networks"
    );
    assert_eq!(
        bad(&|c| {
            c.nodes.remove("n0");
        })
        .0,
        "nodes"
    );
    assert_eq!(
        bad(&|c| {
            c.nodes.insert("bad\nname".into());
        })
        .0,
        "nodes"
    );
    assert_eq!(
        bad(&|c| c.nodes = (0..65)
            .map(|i| format!("x{i}"))
            .chain(["n0".to_string()])
            .collect())
        .0,
        "nodes"
    );
    assert!(Membership::new(cfg(3), "zz", 1, Persisted::default(), Instant::now()).is_err());
}

#[test]
fn best_clique_prefers_votes_then_size_then_lower_names() {
    // 0-1-2 triangle, 0-3 edge: the triangle wins.
    let adj = vec![0b1110, 0b0101, 0b0011, 0b0001];
    let by_size = |a: u64, b: u64| {
        a.count_ones()
            .cmp(&b.count_ones())
            .then(lexicographic(b, a))
    };
    assert_eq!(best_clique(&adj, 0, by_size), 0b0111);
    // 0-1 and 0-2, no 1-2: equal sizes, the lower names {0,1} win.
    let adj = vec![0b110, 0b001, 0b001];
    assert_eq!(best_clique(&adj, 0, by_size), 0b011);
    // ... unless node 2's disk vote tips it.
    let with_disk = |a: u64, b: u64| {
        let v = |m: u64| m.count_ones() + u32::from(m & 0b100 != 0);
        v(a).cmp(&v(b)).then(by_size(a, b))
    };
    assert_eq!(best_clique(&adj, 0, with_disk), 0b101);
    assert_eq!(lexicographic(0b011, 0b101), std::cmp::Ordering::Less);
    assert_eq!(lexicographic(0b001, 0b011), std::cmp::Ordering::Less);
}

#[test]
fn bad_messages_are_ignored_not_trusted() {
    let now = Instant::now();
    let mut m = Membership::new(cfg(3), "n0", 1, Persisted::default(), now).expect("valid");
    let ignored = |a: &[Action]| {
        a.iter()
            .any(|a| matches!(a, Action::Event(Event::Ignored { .. })))
    };
    let a = m.step(
        now,
        Input::Message {
            from: "stranger".into(),
            network: None,
            msg: Message::RegroupRequest,
        },
    );
    assert!(ignored(&a));
    let bogus = View {
        epoch: 5,
        prev: 9,
        members: ["n1".to_string()].into(),
        paused: Default::default(),
        joined: [("n1".to_string(), 5)].into(),
    };
    for msg in [
        Message::Done {
            round: 1,
            basis: Some(bogus.clone()),
        },
        Message::Propose(Box::new(Proposal {
            round: 1,
            view: View {
                members: ["n0".to_string(), "ghost".to_string()].into(),
                ..bogus.clone()
            },
            basis: None,
            disk_holder: None,
            applied: Default::default(),
        })),
        Message::Heartbeat(Heartbeat {
            incarnation: 1,
            sent_us: 0,
            echo: None,
            vouch: true,
            epoch: u64::MAX,
            leaving: false,
            disk_us: Some(u64::MAX),
        }),
    ] {
        let a = m.step(
            now,
            Input::Message {
                from: "n1".into(),
                network: Some("nowhere".into()),
                msg,
            },
        );
        assert!(ignored(&a), "accepted a bad message: {a:?}");
    }
    // A heartbeat with absurd values on a real network is taken without harm.
    let a = m.step(
        now,
        Input::Message {
            from: "n1".into(),
            network: Some("a".into()),
            msg: Message::Heartbeat(Heartbeat {
                incarnation: u64::MAX,
                sent_us: u64::MAX,
                echo: Some(Echo {
                    incarnation: 1,
                    sent_us: u64::MAX,
                }),
                vouch: true,
                epoch: u64::MAX,
                leaving: false,
                disk_us: Some(u64::MAX),
            }),
        },
    );
    assert!(!ignored(&a));
    assert!(!m.is_acting(now));
    let _ = m.next_deadline(now);
}

#[test]
fn three_nodes_form_one_view_and_act() {
    let mut sim = Sim::new(1, World::calm(3, 1, false), |_| {});
    sim.run_until(secs(2.0));
    let v = agreed(&sim).expect("one view");
    assert_eq!(members(&v), ["n0", "n1", "n2"]);
    assert!(sim.nodes.iter().all(|n| n.acting));
    let m = sim.nodes[1].m.as_ref().expect("running");
    let states = m.node_states(sim.now);
    assert!(
        states.values().all(|s| *s == NodeState::Online),
        "{states:?}"
    );
    assert_eq!(m.coordinator(sim.now), "n0");
}

#[test]
fn a_crashed_node_is_removed_within_a_second() {
    let mut sim = Sim::new(2, World::calm(3, 2, false), |_| {});
    sim.run_until(secs(2.0));
    let before = agreed(&sim).expect("formed");
    sim.crash(0); // the coordinator
    let crash = sim.elapsed();
    let mut detected = None;
    while sim.elapsed() < crash + secs(3.0) {
        sim.run_until(sim.elapsed() + Duration::from_millis(10));
        if let Some(v) = agreed(&sim)
            && v.epoch > before.epoch
            && sim.nodes[1].acting
            && sim.nodes[2].acting
        {
            detected = Some(sim.elapsed() - crash);
            assert_eq!(members(&v), ["n1", "n2"]);
            break;
        }
    }
    let took = detected.expect("the survivors agreed on a new view");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let m = sim.nodes[1].m.as_ref().expect("running");
    assert_eq!(m.node_states(sim.now)["n0"], NodeState::Offline);
}

/// n1 stops hearing the coordinator n0 first, n2 only a little later (n0 dies): n1's first
/// round finds no quorum, as n2 still follows n0. n2's request when it suspects n0 starts
/// the next round at once instead of after the pause between rounds.
#[test]
fn a_member_that_suspects_the_dead_coordinator_later_is_not_waited_for_a_whole_retry_interval() {
    let mut sim = Sim::new(11, World::calm(3, 2, false), |_| {});
    sim.run_until(secs(2.0));
    let before = agreed(&sim).expect("formed");
    sim.cut_between(0, 1);
    // n2 hears one more heartbeat of n0 than n1 (they come every 100 ms).
    sim.run_until(sim.elapsed() + Duration::from_millis(150));
    sim.crash(0);
    let crash = sim.elapsed();
    let quorum_failures = sim.stats.no_quorum;
    let mut no_quorum_at = None;
    let mut view_at = None;
    while sim.elapsed() < crash + secs(3.0) {
        sim.run_until(sim.elapsed() + Duration::from_millis(5));
        if no_quorum_at.is_none() && sim.stats.no_quorum > quorum_failures {
            no_quorum_at = Some(sim.elapsed());
        }
        if let Some(v) = agreed(&sim)
            && v.epoch > before.epoch
        {
            view_at = Some(sim.elapsed());
            assert_eq!(members(&v), ["n1", "n2"]);
            break;
        }
    }
    let failed = no_quorum_at.expect("n1's first round should have found no quorum");
    let view = view_at.expect("the survivors agreed on a new view");
    // n2 suspects n0 one heartbeat (0.1 s) after n1 did; the view follows within a few
    // message delays, not after the whole pause between rounds.
    let retry = MembershipConfig::new(names(3), ["a".to_string()], false).retry_interval;
    let took = view - failed;
    assert!(
        took + Duration::from_millis(100) < retry,
        "the view came {took:?} after the failed round"
    );
}

#[test]
fn losing_one_network_raises_an_event_and_changes_no_view() {
    let mut sim = Sim::new(3, World::calm(3, 2, false), |_| {});
    sim.run_until(secs(2.0));
    let before = agreed(&sim).expect("formed");
    let regroups = sim.stats.regroups;
    sim.cut_network(1);
    sim.run_until(secs(5.0));
    assert_eq!(agreed(&sim).as_ref(), Some(&before));
    assert_eq!(
        sim.stats.regroups, regroups,
        "a network loss caused a regroup"
    );
    assert_eq!(sim.stats.suspected, 0);
    assert_eq!(
        sim.stats.link_down, 6,
        "each node reports each peer's link once"
    );
    assert!(sim.nodes.iter().all(|n| n.acting));
}

#[test]
fn a_planned_leave_causes_no_regroup() {
    let mut sim = Sim::new(4, World::calm(4, 1, false), |_| {});
    sim.run_until(secs(2.0));
    let regroups = sim.stats.regroups;
    sim.leave(0); // even the coordinator
    sim.run_until(secs(4.0));
    assert!(sim.nodes[0].left);
    let v = agreed(&sim).expect("the others agree");
    assert_eq!(members(&v), ["n1", "n2", "n3"]);
    assert_eq!(sim.stats.regroups, regroups, "the leave caused a regroup");
    assert_eq!(sim.stats.suspected, 0);
    assert!(sim.nodes[1..].iter().all(|n| n.acting));
    // It comes back as a new incarnation and joins.
    sim.start_node(0);
    sim.run_until(secs(6.0));
    assert_eq!(
        members(&agreed(&sim).expect("rejoined")),
        ["n0", "n1", "n2", "n3"]
    );
}

#[test]
fn pause_and_resume_are_agreed() {
    let mut sim = Sim::new(5, World::calm(3, 1, false), |_| {});
    sim.run_until(secs(2.0));
    sim.set_paused(2, 1, true);
    sim.run_until(secs(3.0));
    let v = agreed(&sim).expect("agreed");
    assert_eq!(v.paused.iter().collect::<Vec<_>>(), ["n1"]);
    let m = sim.nodes[0].m.as_ref().expect("running");
    assert_eq!(m.node_states(sim.now)["n1"], NodeState::Paused);
    sim.set_paused(0, 1, false);
    sim.run_until(secs(4.0));
    assert!(agreed(&sim).expect("agreed").paused.is_empty());
    let epoch = agreed(&sim).expect("agreed").epoch;
    sim.run_until(secs(6.0));
    assert_eq!(
        agreed(&sim).expect("agreed").epoch,
        epoch,
        "no churn afterwards"
    );
}

#[test]
fn a_restarted_node_rejoins_as_a_new_member() {
    let mut sim = Sim::new(6, World::calm(3, 1, false), |_| {});
    sim.run_until(secs(2.0));
    sim.crash(2);
    sim.start_node(2); // faster than detection
    sim.run_until(secs(4.0));
    let v = agreed(&sim).expect("agreed");
    assert_eq!(members(&v), ["n0", "n1", "n2"]);
    assert_eq!(v.joined["n2"], v.epoch, "the restarted node joined anew");
    assert!(v.joined["n0"] < v.epoch);
    assert!(sim.nodes.iter().all(|n| n.acting));
}

#[test]
fn the_minority_stops_acting_and_the_partition_heals() {
    let mut sim = Sim::new(7, World::calm(3, 1, false), |_| {});
    sim.run_until(secs(2.0));
    sim.partition(&[0, 0, 1]);
    sim.run_until(secs(4.0));
    assert!(sim.nodes[0].acting && sim.nodes[1].acting);
    assert!(!sim.nodes[2].acting, "the minority still acts");
    assert_eq!(
        members(sim.nodes[0].history.last().expect("view")),
        ["n0", "n1"]
    );
    sim.heal();
    sim.run_until(secs(6.0));
    assert!(sim.converged());
}

#[test]
fn two_nodes_without_a_disk_stop_when_one_dies() {
    let mut sim = Sim::new(8, World::calm(2, 1, false), |_| {});
    sim.run_until(secs(2.0));
    assert!(sim.converged());
    sim.crash(1);
    sim.run_until(secs(4.0));
    assert!(!sim.nodes[0].acting, "one of two votes is no quorum");
}

/// Random faults, then a stable network: returns how long convergence took after the heal.
pub(crate) fn chaos(seed: u64, disk: bool) -> (Duration, sim::Stats) {
    if let Some(only) = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        && only != seed
    {
        return (Duration::ZERO, sim::Stats::default());
    }
    const CHAOS: f64 = 15.0;
    const BOUND: f64 = 8.0;
    let mut rng = Rng::new(seed ^ 0x5eed);
    let nodes = 2 + rng.index(4);
    let networks = 1 + rng.index(2);
    let world = World {
        loss: rng.below(80),
        delay_min: Duration::from_millis(1),
        delay_max: Duration::from_millis(2 + rng.below(30)),
        timer_lateness: Duration::from_millis(rng.below(20)),
        ..World::calm(nodes, networks, disk)
    };
    let mut sim = Sim::new(seed, world, |_| {});
    let mut t = 0.5;
    while t < CHAOS {
        sim.run_until(secs(t));
        let n = sim.nodes.len();
        let pick = rng.index(n);
        match rng.below(14) {
            0 | 1 => {
                let groups: Vec<usize> = (0..n).map(|_| rng.index(3)).collect();
                sim.partition(&groups);
            }
            2 | 3 => sim.heal(),
            4 => sim.cut_network(rng.index(networks)),
            5 => {
                let other = rng.index(n);
                for net in 0..networks {
                    sim.cut.insert((pick, other, net));
                }
            }
            6 => {
                if rng.chance(300) {
                    sim.crash_tearing(pick);
                } else {
                    sim.crash(pick);
                }
            }
            7 if !sim.nodes[pick].alive() => sim.start_node(pick),
            8 if sim.nodes[pick].alive() => sim.leave(pick),
            9 if sim.nodes[pick].alive() => {
                let target = rng.index(n);
                let paused = rng.chance(500);
                sim.set_paused(pick, target, paused);
            }
            10 => sim.world.loss = rng.below(200),
            11 => {
                let spike = rng.chance(200);
                sim.world.delay_max =
                    Duration::from_millis(2 + rng.below(if spike { 400 } else { 40 }));
            }
            12 => sim.nodes[pick].disk_cut = !sim.nodes[pick].disk_cut,
            _ => {}
        }
        t += 0.05 + Duration::from_millis(rng.below(1500)).as_secs_f64();
    }
    // Heal everything and keep it stable.
    sim.run_until(secs(CHAOS));
    sim.heal();
    sim.world.loss = 0;
    sim.world.delay_max = Duration::from_millis(5);
    for i in 0..sim.nodes.len() {
        sim.nodes[i].disk_cut = false;
        if !sim.nodes[i].alive() {
            sim.start_node(i);
        }
    }
    let mut converged_at = None;
    let mut t = CHAOS;
    while t < CHAOS + BOUND {
        t += 0.05;
        sim.run_until(secs(t));
        for i in 0..sim.nodes.len() {
            // A leave that was under way at the heal completes; bring the node back.
            if !sim.nodes[i].alive() {
                sim.start_node(i);
                converged_at = None;
            }
        }
        match (sim.converged(), converged_at) {
            (true, None) => converged_at = Some(t),
            (false, Some(_)) => converged_at = None,
            _ => {}
        }
    }
    sim.check_histories();
    let at = converged_at.unwrap_or_else(|| {
        panic!(
            "seed {seed}: no stable view of all {} nodes {BOUND}s after the heal: {:?}",
            sim.nodes.len(),
            sim.nodes
                .iter()
                .map(|n| (
                    n.name.clone(),
                    n.alive(),
                    n.acting,
                    n.history.last().map(|v| (v.epoch, v.members.clone()))
                ))
                .collect::<Vec<_>>()
        )
    });
    (secs(at - CHAOS), std::mem::take(&mut sim.stats))
}

fn chaos_seeds(range: std::ops::Range<u64>, disk: bool) {
    let mut worst = Duration::ZERO;
    let mut total = sim::Stats::default();
    let seeds = range.end - range.start;
    for seed in range {
        eprintln!("seed {seed}");
        let (took, s) = chaos(seed, disk);
        worst = worst.max(took);
        total.regroups += s.regroups;
        total.commits += s.commits;
        total.planned_leaves += s.planned_leaves;
        total.link_down += s.link_down;
        total.no_quorum += s.no_quorum;
        total.suspected += s.suspected;
        total.acquired += s.acquired;
    }
    eprintln!("worst convergence after the heal: {worst:?}; totals: {total:?}");
    if std::env::var_os("SIM_SEED").is_none() {
        // The schedules must have exercised what they claim to.
        assert!(total.commits > seeds * 10 && total.suspected > seeds);
        assert!(total.planned_leaves > seeds / 4 && total.link_down > seeds / 4);
        assert!(total.no_quorum > seeds);
        assert!(
            !disk || total.acquired > seeds,
            "the disk was rarely acquired"
        );
    }
}

/// Invariants (a)–(d) over random partitions, loss, delay, crashes, restarts, network cuts,
/// planned leaves and pauses, without a quorum disk.
#[test]
fn random_faults_keep_the_invariants_without_a_disk() {
    chaos_seeds(0..160, false);
}

/// The same with a quorum disk (and disk faults: cut-off nodes, torn, late and hung I/O).
#[test]
fn random_faults_keep_the_invariants_with_a_disk() {
    chaos_seeds(1000..1160, true);
}

/// (e) A two-node cluster with a quorum disk survives the loss of either node: the survivor
/// acquires the disk and acts alone within a bound, and the dead node rejoins when it returns.
#[test]
fn two_nodes_and_a_disk_survive_the_loss_of_either_node() {
    const BOUND: Duration = Duration::from_secs(3);
    let mut worst = Duration::ZERO;
    for seed in 0..100u64 {
        let mut rng = Rng::new(seed);
        let world = World {
            loss: rng.below(30),
            delay_max: Duration::from_millis(2 + rng.below(20)),
            timer_lateness: Duration::from_millis(rng.below(20)),
            ..World::calm(2, 1 + rng.index(2), true)
        };
        let mut sim = Sim::new(seed, world, |_| {});
        let formed = secs(2.0 + Duration::from_millis(rng.below(2000)).as_secs_f64());
        sim.run_until(formed);
        assert!(sim.converged(), "seed {seed}: no view of both");
        let dead = usize::from(seed % 2 == 1);
        let alive = 1 - dead;
        if rng.chance(500) {
            sim.crash_tearing(dead);
        } else {
            sim.crash(dead);
        }
        let mut took = None;
        while sim.elapsed() < formed + BOUND {
            sim.run_until(sim.elapsed() + Duration::from_millis(10));
            let n = &sim.nodes[alive];
            if n.acting && n.history.last().is_some_and(|v| v.members.len() == 1) {
                took = Some(sim.elapsed() - formed);
                break;
            }
        }
        let took = took.unwrap_or_else(|| panic!("seed {seed}: n{alive} did not survive alone"));
        worst = worst.max(took);
        assert!(
            sim.nodes[alive].disk_owner,
            "seed {seed}: acting alone without the disk"
        );
        sim.start_node(dead);
        sim.run_until(sim.elapsed() + secs(3.0));
        assert!(sim.converged(), "seed {seed}: n{dead} did not rejoin");
        sim.check_histories();
    }
    eprintln!("worst time to act alone: {worst:?}");
}

/// What the group executor does with the verdict and the lease: a node runs (groups) from the
/// moment it acts until its run lease lapses while it does not act. Updates `running` (by
/// node index and incarnation) and checks that no node acts in a view that lacks a node that
/// runs.
fn check_run_leases(sim: &Sim, seed: u64, running: &mut BTreeSet<(usize, u64)>) {
    for (i, x) in sim.nodes.iter().enumerate() {
        let key = (i, x.incarnation);
        let lease =
            x.m.as_ref()
                .and_then(|m| m.run_lease_until(sim.now))
                .is_some();
        if x.alive() && x.acting {
            running.insert(key);
        } else if !x.alive() || !lease {
            running.remove(&key);
        }
    }
    for &(i, inc) in running.iter() {
        let x = &sim.nodes[i];
        if x.incarnation != inc {
            continue;
        }
        for y in sim.nodes.iter().filter(|n| n.alive() && n.acting) {
            let view = y.history.last().expect("an acting node committed a view");
            assert!(
                view.members.contains(&x.name),
                "seed {seed}: {} acts in view {} {:?} while {} still runs on its lease",
                y.name,
                view.epoch,
                view.members,
                x.name
            );
        }
    }
}

#[test]
fn a_run_lease_rides_through_view_changes_and_lapses_before_a_view_without_its_node_acts() {
    for seed in 0..60u64 {
        let mut rng = Rng::new(seed ^ 0x1ea5e);
        let world = World {
            delay_max: Duration::from_millis(2 + rng.below(20)),
            ..World::calm(3 + rng.index(3), 1, false)
        };
        let mut sim = Sim::new(seed, world, |_| {});
        let mut running = BTreeSet::new();
        sim.run_until(secs(2.0));
        let n = sim.nodes.len();
        // A crash of another node blinks the verdict but never the lease of the majority.
        let crashed = rng.index(n);
        sim.crash(crashed);
        let at = sim.elapsed();
        while sim.elapsed() < at + secs(2.0) {
            sim.run_until(sim.elapsed() + Duration::from_millis(2));
            check_run_leases(&sim, seed, &mut running);
            for (i, node) in sim.nodes.iter().enumerate() {
                if i != crashed {
                    let m = node.m.as_ref().expect("running");
                    assert!(
                        m.run_lease_until(sim.now).is_some(),
                        "seed {seed}: {} lost its run lease when {} crashed",
                        node.name,
                        sim.nodes[crashed].name
                    );
                }
            }
        }
        // It comes back: the view change that takes it in blinks no survivor's lease either.
        sim.start_node(crashed);
        let at = sim.elapsed();
        while sim.elapsed() < at + secs(2.0) {
            sim.run_until(sim.elapsed() + Duration::from_millis(2));
            check_run_leases(&sim, seed, &mut running);
            for (i, node) in sim.nodes.iter().enumerate() {
                if i != crashed {
                    let m = node.m.as_ref().expect("running");
                    assert!(
                        m.run_lease_until(sim.now).is_some(),
                        "seed {seed}: {} lost its run lease when {} rejoined",
                        node.name,
                        sim.nodes[crashed].name
                    );
                }
            }
        }
        // A partition: the minority's leases lapse before the majority acts without it.
        let groups: Vec<usize> = (0..n).map(|i| usize::from(i % 3 == 0)).collect();
        sim.partition(&groups);
        let at = sim.elapsed();
        while sim.elapsed() < at + secs(2.0) {
            sim.run_until(sim.elapsed() + Duration::from_millis(2));
            check_run_leases(&sim, seed, &mut running);
        }
    }
}

/// Three nodes; n0 (the lowest name, so the coordinator once it is back) dies and the others
/// form {n1, n2}. n0 restarts while n1's link to it is still down (its transport is redialling
/// in backoff) and n2 reaches both. Returns the simulation just after the restart and the view
/// n0 comes back to.
fn rejoin_with_one_link_down(seed: u64) -> (Sim, View) {
    let mut sim = Sim::new(seed, World::calm(3, 1, false), |_| {});
    sim.run_until(secs(2.0));
    assert!(sim.converged(), "no view of all three");
    sim.crash(0);
    sim.run_until(secs(4.0));
    let basis = agreed(&sim).expect("the survivors agree");
    assert_eq!(members(&basis), ["n1", "n2"]);
    assert!(sim.nodes[1].acting && sim.nodes[2].acting);
    sim.cut.insert((1, 0, 0));
    sim.start_node(0);
    (sim, basis)
}

/// The views committed after `basis`, in epoch order.
fn views_after(sim: &Sim, basis: &View) -> Vec<View> {
    sim.views
        .range(basis.epoch + 1..)
        .map(|(_, v)| v.clone())
        .collect()
}

/// Bug 3 of the kv failover tests: a rebooting node must not form a view without a healthy
/// member that merely cannot reach it yet; once the link is up the view grows to all three
/// and the member never stopped acting.
#[test]
fn a_rejoining_node_never_evicts_a_healthy_member_whose_link_to_it_is_still_down() {
    for seed in 0..20u64 {
        let (mut sim, basis) = rejoin_with_one_link_down(seed);
        // About what the transport's redial backoff takes at most.
        let link_up = sim.elapsed() + Duration::from_millis(900);
        while sim.elapsed() < link_up {
            sim.run_until(sim.elapsed() + Duration::from_millis(5));
            assert!(
                sim.nodes[1].acting,
                "seed {seed}: n1 stopped acting at {:?}",
                sim.elapsed()
            );
        }
        assert!(
            views_after(&sim, &basis).is_empty(),
            "seed {seed}: a view committed while n1 could not reach n0: {:?}",
            views_after(&sim, &basis)
        );
        assert!(
            sim.stats.join_deferred > 0,
            "seed {seed}: n0 never coordinated a round that would have dropped n1"
        );
        sim.heal();
        let healed = sim.elapsed();
        while !sim.converged() && sim.elapsed() < healed + secs(3.0) {
            sim.run_until(sim.elapsed() + Duration::from_millis(10));
        }
        assert!(
            sim.converged(),
            "seed {seed}: the view did not grow to all three"
        );
        let later = views_after(&sim, &basis);
        assert!(
            later.iter().all(|v| v.members.contains("n1")),
            "seed {seed}: n1 was evicted: {later:?}"
        );
        let last = later.last().expect("n0 joined");
        assert_eq!(
            last.joined["n1"], basis.joined["n1"],
            "seed {seed}: n1 continued without a gap"
        );
        sim.check_histories();
    }
}

/// The wait is bounded: when the member's link to the joiner stays down, the joiner forms a
/// view with the member that reaches it (as before the wait existed), and a member that dies
/// is removed as fast as without a joiner.
#[test]
fn a_rejoining_node_waits_for_a_reachable_member_only_so_long_and_never_for_a_dead_one() {
    let bound = cfg(3)
        .suspect_after()
        .saturating_mul(JOIN_WAIT_SUSPECT_PERIODS);
    for seed in 0..10u64 {
        let (mut sim, basis) = rejoin_with_one_link_down(seed);
        let restarted = sim.elapsed();
        while views_after(&sim, &basis).is_empty() && sim.elapsed() < restarted + secs(5.0) {
            sim.run_until(sim.elapsed() + Duration::from_millis(10));
        }
        let took = sim.elapsed() - restarted;
        let first = views_after(&sim, &basis);
        let first = first.first().expect("a view without n1 after the bound");
        assert_eq!(members(first), ["n0", "n2"], "seed {seed}");
        assert!(took >= bound, "seed {seed}: did not wait: {took:?}");
        assert!(
            took < bound + secs(1.5),
            "seed {seed}: waited too long: {took:?}"
        );
        sim.check_histories();

        // A member that dies while the joiner waits for it is not waited for.
        let (mut sim, basis) = rejoin_with_one_link_down(seed);
        sim.run_until(sim.elapsed() + Duration::from_millis(300));
        sim.crash(1);
        let crash = sim.elapsed();
        let mut took = None;
        while sim.elapsed() < crash + secs(3.0) {
            sim.run_until(sim.elapsed() + Duration::from_millis(10));
            if let Some(v) = agreed(&sim)
                && v.epoch > basis.epoch
                && sim.nodes[0].acting
                && sim.nodes[2].acting
            {
                assert_eq!(members(&v), ["n0", "n2"], "seed {seed}");
                took = Some(sim.elapsed() - crash);
                break;
            }
        }
        let took = took.unwrap_or_else(|| panic!("seed {seed}: n1's death was not handled"));
        assert!(took < secs(1.2), "seed {seed}: took {took:?}");
        sim.check_histories();
    }
}

/// Of two equally large sets with quorum, the one that removes fewer members of the current
/// view wins over lower names.
#[test]
fn a_regroup_keeps_the_members_of_the_current_view_over_lower_names() {
    // Five nodes; the view is {n2, n3, n4}; n0 and n1 restart and n1 is cut off from n3 and
    // n4 for good. n0's choice between {n0, n1, n2} and {n0, n2, n3, n4}: the larger wins
    // anyway; cut n3-n4 too, so {n0, n1, n2}, {n0, n2, n3} and {n0, n2, n4} tie.
    let mut sim = Sim::new(9, World::calm(5, 1, false), |_| {});
    sim.run_until(secs(2.0));
    assert!(sim.converged());
    sim.crash(0);
    sim.crash(1);
    sim.run_until(secs(4.0));
    let basis = agreed(&sim).expect("the survivors agree");
    assert_eq!(members(&basis), ["n2", "n3", "n4"]);
    for (a, b) in [(1, 3), (1, 4), (3, 4)] {
        sim.cut.insert((a, b, 0));
        sim.cut.insert((b, a, 0));
    }
    sim.start_node(0);
    sim.start_node(1);
    sim.run_until(secs(8.0));
    for v in views_after(&sim, &basis) {
        assert!(
            !(v.members.contains("n1") && !v.members.contains("n3") && !v.members.contains("n4")),
            "a view dropped two continuing members for a restarted one: {v:?}"
        );
    }
    sim.check_histories();
}
