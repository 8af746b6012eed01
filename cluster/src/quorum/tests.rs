use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use super::*;
use crate::membership::tests::sim::{Rng, micros};

fn names(n: usize) -> Vec<NodeId> {
    (0..n).map(|i| format!("n{i}")).collect()
}

fn view(members: &[&str]) -> View {
    View {
        epoch: 1,
        prev: 0,
        members: members.iter().map(|s| s.to_string()).collect(),
        paused: Default::default(),
        joined: members.iter().map(|s| (s.to_string(), 1)).collect(),
    }
}

#[test]
fn votes_count_nodes_and_the_disk() {
    let three = Votes::new(names(3), false);
    assert_eq!((three.total(), three.majority()), (3, 2));
    assert!(three.has_quorum(&view(&["n0", "n1"]), None));
    assert!(!three.has_quorum(&view(&["n0"]), None));
    assert!(
        !three.has_quorum(&view(&["n0", "ghost"]), None),
        "unknown names hold no vote"
    );

    let two_disk = Votes::new(names(2), true);
    assert_eq!((two_disk.total(), two_disk.majority()), (3, 2));
    assert!(two_disk.has_quorum(&view(&["n0"]), Some("n0")));
    assert!(two_disk.has_quorum(&view(&["n1"]), Some("n1")));
    assert!(
        !two_disk.has_quorum(&view(&["n1"]), Some("n0")),
        "the owner is not a member"
    );
    assert!(!two_disk.has_quorum(&view(&["n1"]), None));

    let two = Votes::new(names(2), false);
    assert!(
        !two.has_quorum(&view(&["n0"]), Some("n0")),
        "no disk configured"
    );

    let four_disk = Votes::new(names(4), true);
    assert_eq!(four_disk.majority(), 3);
    assert!(four_disk.has_quorum(&view(&["n2", "n3"]), Some("n3")));
    assert!(!four_disk.has_quorum(&view(&["n2", "n3"]), Some("n0")));
}

#[test]
fn defaults_are_safe_and_unsafe_timings_are_refused() {
    let cfg = DiskConfig::new("c", names(2));
    cfg.validate("n0").expect("defaults are valid");
    let bad = |f: &dyn Fn(&mut DiskConfig)| {
        let mut c = DiskConfig::new("c", names(2));
        f(&mut c);
        match c.validate("n0") {
            Err(QuorumError::InvalidConfig { field, why }) => (field, why),
            other => panic!("accepted or wrong error: {other:?}"),
        }
    };
    let ms = Duration::from_millis;
    let (field, why) = bad(&|c| c.takeover_delay = ms(580));
    assert_eq!(field, "takeover_delay");
    assert!(
        why.contains("lease_time + max_clock_drift + io_timeout"),
        "{why}"
    );
    assert_eq!(bad(&|c| c.renew_interval = ms(300)).0, "renew_interval");
    assert_eq!(bad(&|c| c.io_timeout = ms(150)).0, "io_timeout");
    assert_eq!(bad(&|c| c.settle = ms(80)).0, "settle");
    assert_eq!(bad(&|c| c.safety_margin = ms(400)).0, "safety_margin");
    assert_eq!(bad(&|c| c.lease_time = Duration::ZERO).0, "lease_time");
    assert_eq!(bad(&|c| c.slots = vec!["n1".into()]).0, "slots");
    assert_eq!(
        bad(&|c| c.slots = vec!["n0".into(), "n0".into()]).0,
        "slots"
    );
    assert_eq!(bad(&|c| c.cluster.clear()).0, "cluster");
    assert!(QuorumDisk::new(DiskConfig::new("c", names(2)), "n9", 1, Instant::now()).is_err());
}

fn record(counter: u64) -> SlotRecord {
    SlotRecord {
        node: "n1".into(),
        state: SlotState::Owner,
        generation: 7,
        counter,
        epoch: 42,
    }
}

#[test]
fn sectors_round_trip_and_every_bit_flip_reads_as_unknown() {
    let h = 0x1234_5678;
    let rec = record(3);
    let s = encode_sector(h, &rec);
    assert_eq!(decode_sector(h, &s), Sector::Valid(rec));
    assert_eq!(decode_sector(h, &[0u8; SECTOR_SIZE]), Sector::Empty);
    assert!(
        matches!(decode_sector(h + 1, &s), Sector::Unknown(_)),
        "another cluster"
    );
    for bit in 0..SECTOR_SIZE * 8 {
        let mut t = *s;
        t[bit / 8] ^= 1 << (bit % 8);
        assert!(
            matches!(decode_sector(h, &t), Sector::Unknown(_)),
            "a flip of bit {bit} went unnoticed"
        );
    }
    let mut garbage = [0xa5u8; SECTOR_SIZE];
    garbage[7] = 255;
    assert!(matches!(decode_sector(h, &garbage), Sector::Unknown(_)));
}

#[test]
fn torn_sectors_read_as_unknown() {
    let h = 99;
    let old = encode_sector(h, &record(3));
    let new = encode_sector(h, &record(5));
    for cut in (512..SECTOR_SIZE).step_by(512) {
        let mut torn = *old;
        torn[..cut].copy_from_slice(&new[..cut]);
        assert!(
            matches!(decode_sector(h, &torn), Sector::Unknown(_)),
            "a write torn at {cut} read as valid"
        );
        let mut half_zero = [0u8; SECTOR_SIZE];
        half_zero[..cut].copy_from_slice(&new[..cut]);
        assert!(matches!(decode_sector(h, &half_zero), Sector::Unknown(_)));
    }
}

/// Runs a machine against `disk` with instant I/O until `until`, feeding wants at once.
struct Solo {
    q: QuorumDisk,
    now: Instant,
    events: Vec<(Duration, DiskEvent)>,
    start: Instant,
}

impl Solo {
    fn new(cfg: DiskConfig, me: &str) -> Solo {
        let now = Instant::now();
        Solo {
            q: QuorumDisk::new(cfg, me, 7, now).expect("valid"),
            now,
            events: Vec::new(),
            start: now,
        }
    }

    fn feed(&mut self, disk: &mut dyn Disk, input: DiskInput) {
        let mut queue = vec![input];
        while let Some(i) = queue.pop() {
            for a in self.q.step(self.now, i) {
                match a {
                    DiskAction::Io { id, op } => queue.push(DiskInput::Io(perform(disk, id, &op))),
                    DiskAction::Event(e) => self.events.push((self.now - self.start, e)),
                }
            }
        }
    }

    fn run(&mut self, disk: &mut dyn Disk, until: Duration) {
        self.feed(disk, DiskInput::Tick);
        while let Some(t) = self.q.next_deadline(self.now) {
            if t > self.start + until {
                break;
            }
            self.now = t;
            self.feed(disk, DiskInput::Tick);
        }
        self.now = self.start + until;
    }

    fn acquired_at(&self) -> Option<Duration> {
        self.events
            .iter()
            .find(|(_, e)| matches!(e, DiskEvent::Acquired { .. }))
            .map(|(t, _)| *t)
    }
}

#[test]
fn a_lone_node_acquires_after_the_takeover_delay_renews_and_publishes() {
    let cfg = DiskConfig::new("c", names(2));
    let mut disk = MemDisk::new(cfg.sectors());
    let mut a = Solo::new(cfg.clone(), "n0");
    a.feed(&mut disk, DiskInput::Want(true));
    a.run(&mut disk, Duration::from_secs(3));
    let at = a.acquired_at().expect("acquired");
    assert!(
        at >= cfg.takeover_delay + cfg.settle,
        "acquired too early: {at:?}"
    );
    assert!(at < cfg.takeover_delay + cfg.settle + 2 * cfg.renew_interval);
    assert!(a.q.is_owner(a.now));
    a.feed(&mut disk, DiskInput::Publish(17));
    assert!(
        a.events
            .iter()
            .any(|(_, e)| *e == DiskEvent::Published { epoch: 17 })
    );
    // The epoch is on the disk: a newcomer reads it.
    let mut b = Solo::new(cfg.clone(), "n1");
    b.run(&mut disk, Duration::from_millis(10));
    assert_eq!(b.q.status(b.now).max_epoch, 17);
    // Giving it up stops acting at once.
    a.feed(&mut disk, DiskInput::Want(false));
    assert!(!a.q.is_owner(a.now));
    assert!(a.events.iter().any(|(_, e)| *e == DiskEvent::Released));
}

#[test]
fn a_torn_newest_copy_falls_back_to_the_older_one() {
    let cfg = DiskConfig::new("c", names(2));
    let mut disk = MemDisk::new(cfg.sectors());
    let mut a = Solo::new(cfg.clone(), "n0");
    a.feed(&mut disk, DiskInput::Want(true));
    a.run(&mut disk, Duration::from_secs(2));
    a.feed(&mut disk, DiskInput::Publish(5));
    // Renewals after the publish carry the epoch into both copies.
    a.run(&mut disk, Duration::from_millis(2500));
    // Tear whichever copy of n0's slot is newer.
    let h = cfg.cluster_hash();
    let counter = |s: &[u8; SECTOR_SIZE]| match decode_sector(h, s) {
        Sector::Valid(r) => r.counter,
        _ => 0,
    };
    let newer = if counter(&disk.sector(0)) > counter(&disk.sector(1)) {
        0
    } else {
        1
    };
    disk.flip_bit(newer, 300);
    let mut b = Solo::new(cfg, "n1");
    b.run(&mut disk, Duration::from_millis(10));
    assert_eq!(
        b.q.status(b.now).max_epoch,
        5,
        "the older copy still carries the epoch"
    );
    assert!(
        !b.events
            .iter()
            .any(|(_, e)| matches!(e, DiskEvent::Unreadable { .. })),
        "one good copy is enough"
    );
    disk.flip_bit(1 - newer, 300);
    let mut c = Solo::new(DiskConfig::new("c", names(2)), "n1");
    c.run(&mut disk, Duration::from_millis(10));
    assert!(c.events.iter().any(|(_, e)| matches!(
        e,
        DiskEvent::Unreadable { slot, .. } if slot == "n0"
    )));
}

/// A simulation of the lease alone: nodes that want the disk at random, crash, restart, lose
/// the disk; I/O with random latency, late and hung I/O, writes that land at a random moment
/// within their I/O and torn writes of crashing nodes. At every instant at most one node may
/// consider itself owner (its flag drops only when its late timer fires).
fn lease_chaos(seed: u64) -> (u64, u64) {
    #[derive(Debug)]
    enum Ev {
        Timer(usize, u64),
        Land(u64, Box<[u8; SECTOR_SIZE]>),
        Sample(usize, u64, u64),
        Done(usize, u64, DiskReply),
        /// Lets faults and the calm period happen while every node is down.
        Clock,
    }
    let mut rng = Rng::new(seed);
    let n = 2 + rng.index(3);
    let cfg = DiskConfig::new("chaos", names(n));
    let start = Instant::now();
    let mut now = start;
    let mut disk = MemDisk::new(cfg.sectors());
    let mut machines: Vec<Option<QuorumDisk>> = (0..n)
        .map(|i| QuorumDisk::new(cfg.clone(), &format!("n{i}"), rng.next(), now).ok())
        .collect();
    let mut owner = vec![false; n];
    let mut incarnation = vec![0u64; n];
    let mut cut = vec![false; n];
    let mut timers = vec![0u64; n];
    let mut samples: BTreeMap<(usize, u64), Vec<[u8; SECTOR_SIZE]>> = BTreeMap::new();
    let mut queue: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut events: BTreeMap<u64, Ev> = BTreeMap::new();
    let mut seq = 0u64;
    let (mut acquisitions, mut losses) = (0u64, 0u64);
    let lateness = Duration::from_millis(rng.below(30));
    let mut push = |queue: &mut BinaryHeap<_>, events: &mut BTreeMap<u64, Ev>, at, ev| {
        seq += 1;
        events.insert(seq, ev);
        queue.push(Reverse((at, seq)));
    };
    for i in 0..n {
        push(&mut queue, &mut events, now, Ev::Timer(i, 0));
    }
    let chaos_end = start + Duration::from_secs(20);
    let end = start + Duration::from_secs(26);
    for ms in (0..26_000).step_by(100) {
        push(
            &mut queue,
            &mut events,
            start + Duration::from_millis(ms),
            Ev::Clock,
        );
    }
    let mut next_fault = start;
    let mut last_wanter = None;
    let mut calm = false;
    while let Some(Reverse((at, s))) = queue.pop() {
        if at > end {
            break;
        }
        let Some(ev) = events.remove(&s) else {
            continue;
        };
        now = at;
        let mut inputs: Vec<(usize, DiskInput)> = Vec::new();
        if now >= next_fault && now < chaos_end {
            next_fault = now + Duration::from_millis(100 + rng.below(1500));
            let i = rng.index(n);
            match rng.below(6) {
                0 => {
                    // Crash; a write in flight lands torn.
                    if let Some((s, Ev::Land(_, data))) =
                        events.iter_mut().find(|(_, e)| matches!(e, Ev::Land(..)))
                    {
                        let _ = s;
                        for b in data[SECTOR_SIZE / 2..].iter_mut() {
                            *b = 0;
                        }
                    }
                    machines[i] = None;
                    owner[i] = false;
                }
                1 => {
                    if machines[i].is_none() {
                        incarnation[i] += 1;
                        machines[i] =
                            QuorumDisk::new(cfg.clone(), &format!("n{i}"), rng.next(), now).ok();
                        inputs.push((i, DiskInput::Tick));
                    }
                }
                2 => cut[i] = !cut[i],
                _ => {
                    let w = rng.chance(600);
                    inputs.push((i, DiskInput::Want(w)));
                    if w {
                        last_wanter = Some(i);
                    }
                }
            }
        }
        if now >= chaos_end && !calm {
            calm = true;
            // Calm: everyone back, disk reachable, exactly one node wants the disk.
            for i in 0..n {
                cut[i] = false;
                if machines[i].is_none() {
                    incarnation[i] += 1;
                    machines[i] =
                        QuorumDisk::new(cfg.clone(), &format!("n{i}"), rng.next(), now).ok();
                }
            }
            let keep = last_wanter.unwrap_or(0);
            for i in 0..n {
                inputs.push((i, DiskInput::Want(i == keep)));
            }
            last_wanter = Some(keep);
        }
        match ev {
            Ev::Timer(i, token) => {
                if timers[i] == token {
                    inputs.push((i, DiskInput::Tick));
                }
            }
            Ev::Land(sector, data) => disk.put(sector, &data),
            Ev::Clock => {}
            Ev::Sample(i, id, inc) => {
                if inc == incarnation[i] {
                    let count = cfg.sectors();
                    samples.insert((i, id), (0..count).map(|s| disk.sector(s)).collect());
                }
            }
            Ev::Done(i, inc, reply) => {
                if inc == incarnation[i] {
                    let reply = match reply {
                        DiskReply::Read { id, result: Ok(_) } => match samples.remove(&(i, id)) {
                            Some(d) => DiskReply::Read { id, result: Ok(d) },
                            None => DiskReply::Read {
                                id,
                                result: Err("lost".into()),
                            },
                        },
                        r => r,
                    };
                    inputs.push((i, DiskInput::Io(reply)));
                }
            }
        }
        for (i, input) in inputs {
            let Some(q) = machines[i].as_mut() else {
                continue;
            };
            for a in q.step(now, input) {
                match a {
                    DiskAction::Event(DiskEvent::Acquired { .. }) => {
                        acquisitions += 1;
                        owner[i] = true;
                    }
                    DiskAction::Event(DiskEvent::Lost { .. } | DiskEvent::Released) => {
                        losses += 1;
                        owner[i] = false;
                    }
                    DiskAction::Event(e) => {
                        if std::env::var_os("LEASE_TRACE").is_some() {
                            eprintln!("{:?} n{i} {e:?}", now - start);
                        }
                    }
                    DiskAction::Io { id, op } => {
                        let slow = rng.chance(20);
                        let hang = rng.chance(5);
                        let max = if slow {
                            cfg.io_timeout * 2
                        } else {
                            Duration::from_millis(5)
                        };
                        let latency = Duration::from_micros(100 + rng.below(micros(max)));
                        let mid = now + rng.upto(latency);
                        let inc = incarnation[i];
                        let reply = if cut[i] {
                            match op {
                                DiskOp::Read { .. } => DiskReply::Read {
                                    id,
                                    result: Err("cut".into()),
                                },
                                DiskOp::Write { .. } => DiskReply::Write {
                                    id,
                                    result: Err("cut".into()),
                                },
                            }
                        } else {
                            match op {
                                DiskOp::Read { .. } => {
                                    push(&mut queue, &mut events, mid, Ev::Sample(i, id, inc));
                                    DiskReply::Read {
                                        id,
                                        result: Ok(Vec::new()),
                                    }
                                }
                                DiskOp::Write { sector, data } => {
                                    push(&mut queue, &mut events, mid, Ev::Land(sector, data));
                                    DiskReply::Write { id, result: Ok(()) }
                                }
                            }
                        };
                        if !hang {
                            push(
                                &mut queue,
                                &mut events,
                                now + latency,
                                Ev::Done(i, inc, reply),
                            );
                        }
                    }
                }
            }
            if let Some(t) = q.next_deadline(now) {
                timers[i] += 1;
                let late = rng.upto(lateness);
                push(&mut queue, &mut events, t + late, Ev::Timer(i, timers[i]));
            }
        }
        if std::env::var_os("LEASE_TRACE").is_some() {
            eprintln!("{:?} {:?} owners {owner:?}", now - start, events.len());
        }
        let owners = owner.iter().filter(|o| **o).count();
        assert!(owners <= 1, "seed {seed}: two owners at {:?}", now - start);
    }
    // After the calm period the one node that wants the disk owns it.
    let keep = last_wanter.unwrap_or(0);
    assert!(
        owner[keep] && machines[keep].as_ref().is_some_and(|q| q.is_owner(now)),
        "seed {seed}: n{keep} did not get the disk in the calm period"
    );
    (acquisitions, losses)
}

#[test]
fn random_lease_schedules_never_have_two_owners() {
    let (mut acquired, mut lost) = (0, 0);
    for seed in 0..300 {
        let (a, l) = lease_chaos(seed);
        acquired += a;
        lost += l;
    }
    eprintln!("acquisitions {acquired}, losses or releases {lost}");
    assert!(
        acquired > 300 && lost > 100,
        "the schedules barely exercised the lease"
    );
}

#[test]
fn the_file_disk_reads_back_what_it_wrote_and_rejects_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quorum.disk");
    let cfg = DiskConfig::new("c", names(2));
    let mut disk = FileDisk::open(&path, cfg.sectors()).expect("open");
    let len = std::fs::metadata(&path).expect("stat").len();
    assert_eq!(len, cfg.sectors() * SECTOR_SIZE as u64);
    let h = cfg.cluster_hash();
    let s = encode_sector(h, &record(9));
    disk.write_sector(3, &s).expect("write");
    let back = disk.read_sectors(0, 4).expect("read");
    assert_eq!(back.len(), 4);
    assert_eq!(decode_sector(h, &back[3]), Sector::Valid(record(9)));
    assert_eq!(decode_sector(h, &back[0]), Sector::Empty);
    // Garble one byte on the file behind its back.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.write_all_at(&[0xff], 3 * SECTOR_SIZE as u64 + 100)
            .expect("garble");
    }
    let mut again = FileDisk::open(&path, cfg.sectors()).expect("reopen");
    let back = again.read_sectors(3, 1).expect("read");
    assert!(matches!(decode_sector(h, &back[0]), Sector::Unknown(_)));
    // The lease machine runs on it.
    let mut a = Solo::new(cfg.clone(), "n1");
    a.feed(&mut again, DiskInput::Want(true));
    a.run(&mut again, Duration::from_secs(2));
    assert!(a.q.is_owner(a.now), "events: {:?}", a.events);
    eprintln!("direct I/O: {}", again.is_direct());
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let err = FileDisk::open(Path::new("/nonexistent/dir/q.disk"), 4).expect_err("no dir");
    assert!(err.to_string().contains("/nonexistent/dir/q.disk"), "{err}");
}

/// Nodes in lockstep, whose reads of one instant all sample the disk before the writes of
/// that instant land: every claim races every other. They must all back off (contested) and
/// then exactly one must win.
#[test]
fn simultaneous_claims_back_off_and_one_wins() {
    for seed in 0..20u64 {
        let n = 3;
        let cfg = DiskConfig::new("race", names(n));
        let start = Instant::now();
        let mut disk = MemDisk::new(cfg.sectors());
        let mut qs: Vec<QuorumDisk> = (0..n)
            .map(|i| {
                QuorumDisk::new(cfg.clone(), &format!("n{i}"), seed * 10 + i as u64, start)
                    .expect("valid")
            })
            .collect();
        let mut inputs: Vec<Vec<DiskInput>> = (0..n).map(|_| vec![DiskInput::Want(true)]).collect();
        let mut now = start;
        let mut contested = 0;
        while now < start + Duration::from_secs(10) {
            let mut reads = Vec::new();
            let mut writes = Vec::new();
            for (i, q) in qs.iter_mut().enumerate() {
                for input in std::mem::take(&mut inputs[i])
                    .into_iter()
                    .chain([DiskInput::Tick])
                {
                    for a in q.step(now, input) {
                        match a {
                            DiskAction::Io {
                                id,
                                op: op @ DiskOp::Read { .. },
                            } => reads.push((i, id, op)),
                            DiskAction::Io { id, op } => writes.push((i, id, op)),
                            DiskAction::Event(DiskEvent::Contested) => {
                                contested += 1;
                                if std::env::var_os("LEASE_TRACE").is_some() {
                                    eprintln!("{seed} {:?} n{i} contested", now - start);
                                }
                            }
                            DiskAction::Event(e) => {
                                if std::env::var_os("LEASE_TRACE").is_some() {
                                    eprintln!("{seed} {:?} n{i} {e:?}", now - start);
                                }
                            }
                        }
                    }
                }
            }
            // Reads first, then writes: the replies arrive a millisecond later.
            let mut replies: Vec<(usize, DiskReply)> = Vec::new();
            for (i, id, op) in reads.into_iter().chain(writes) {
                replies.push((i, perform(&mut disk, id, &op)));
            }
            now += Duration::from_millis(1);
            for (i, r) in replies {
                inputs[i].push(DiskInput::Io(r));
            }
            let owners = qs.iter().filter(|q| q.is_owner(now)).count();
            assert!(
                owners <= 1,
                "seed {seed}: {owners} owners at {:?}",
                now - start
            );
            if inputs.iter().all(Vec::is_empty) {
                let next = qs.iter().filter_map(|q| q.next_deadline(now)).min();
                if let Some(t) = next {
                    now = now.max(t);
                }
            }
        }
        assert!(contested >= 2, "seed {seed}: the claims never raced");
        assert_eq!(
            qs.iter().filter(|q| q.is_owner(now)).count(),
            1,
            "seed {seed}: no owner"
        );
    }
}
