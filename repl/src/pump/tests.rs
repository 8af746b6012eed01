use super::*;
use crate::{Op, RelPath};

fn rename(seq: u64) -> OpRecord {
    OpRecord {
        seq,
        op: Op::Rename {
            from: RelPath::new(&b"a"[..]).expect("valid"),
            to: RelPath::new(&b"b"[..]).expect("valid"),
        },
    }
}

const GEN: u64 = 0xfeed;

fn rec(seq: u64, bytes: usize) -> OpRecord {
    OpRecord {
        seq,
        op: Op::Write {
            path: RelPath::new(&b"f"[..]).expect("valid"),
            offset: 0,
            data: vec![0; bytes],
        },
    }
}

fn recs(from: u64, to: u64) -> Vec<OpRecord> {
    (from..=to).map(|s| rec(s, 10)).collect()
}

fn pump(mode: Mode, backups: &[&str]) -> Pump {
    let cfg = PumpConfig {
        mode,
        ..PumpConfig::default()
    };
    Pump::new(
        cfg,
        "data",
        GEN,
        1,
        1,
        backups.iter().map(|s| s.to_string()),
    )
}

fn sent_seqs(actions: &[Action], to: &str) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendOps { backup, records } if backup == to => {
                Some(records.iter().map(|r| r.seq).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

fn released(actions: &[Action]) -> Option<u64> {
    actions.iter().rev().find_map(|a| match a {
        Action::Release { through } => Some(*through),
        _ => None,
    })
}

fn connect(p: &mut Pump, now: Instant, b: &str, generation: u64, durable: u64) -> Vec<Action> {
    let hello = p.step(now, Input::Connected { backup: b.into() });
    assert!(matches!(
        &hello[..],
        [Action::Send {
            msg: ToBackup::Hello {
                generation: GEN,
                ..
            },
            ..
        }]
    ));
    p.step(
        now,
        Input::State {
            backup: b.into(),
            generation,
            durable,
        },
    )
}

#[test]
fn streams_in_order_and_releases_after_the_ack() {
    let now = Instant::now();
    let mut p = pump(Mode::Async, &["b"]);
    assert!(connect(&mut p, now, "b", GEN, 0).is_empty());
    let a = p.step(now, Input::Records(recs(1, 5)));
    assert_eq!(sent_seqs(&a, "b"), vec![1, 2, 3, 4, 5]);
    assert_eq!(released(&a), None, "nothing is acknowledged yet");
    let a = p.step(
        now,
        Input::Ack {
            backup: "b".into(),
            durable: 3,
        },
    );
    assert_eq!(released(&a), Some(3));
    assert_eq!(p.retained().0, 2);
    let v = &p.view(now)[0];
    assert_eq!((v.acked, v.lag_ops), (3, 2));
}

#[test]
fn a_reconnecting_backup_resumes_after_its_durable_point() {
    let now = Instant::now();
    let mut p = pump(Mode::Async, &["b"]);
    connect(&mut p, now, "b", GEN, 0);
    p.step(now, Input::Records(recs(1, 10)));
    p.step(
        now,
        Input::Ack {
            backup: "b".into(),
            durable: 4,
        },
    );
    p.step(now, Input::Disconnected { backup: "b".into() });
    let a = p.step(now, Input::Records(recs(11, 12)));
    assert!(sent_seqs(&a, "b").is_empty());
    assert_eq!(
        released(&a),
        None,
        "a streaming backup that dropped out holds the ring"
    );
    // It lost nothing it acknowledged but got only through 6 durably.
    let a = connect(&mut p, now, "b", GEN, 6);
    assert_eq!(sent_seqs(&a, "b"), (7..=12).collect::<Vec<_>>());
    assert_eq!(released(&a), Some(6));
}

#[test]
fn another_generation_or_a_lost_range_means_resync() {
    let now = Instant::now();
    let mut p = pump(Mode::Async, &["b"]);
    p.step(now, Input::Records(recs(1, 3)));
    let a = connect(&mut p, now, "b", GEN + 1, 2);
    assert!(matches!(
        &a[..],
        [Action::StartResync { next_seq: 4, .. }, ..]
    ));
    let a = p.step(now, Input::Records(recs(4, 6)));
    assert!(
        sent_seqs(&a, "b").is_empty(),
        "nothing streams during a resync"
    );
    let a = p.step(
        now,
        Input::ResyncDone {
            backup: "b".into(),
            next_seq: 4,
        },
    );
    assert_eq!(sent_seqs(&a, "b"), vec![4, 5, 6]);

    // A backup that is behind what memory still holds is resynced too.
    let mut p = Pump::new(
        PumpConfig {
            max_retained_bytes: 0,
            ..PumpConfig::default()
        },
        "data",
        GEN,
        1,
        1,
        ["b".to_string(), "c".to_string()],
    );
    connect(&mut p, now, "b", GEN, 0);
    p.step(now, Input::Records(recs(1, 5)));
    p.step(
        now,
        Input::Ack {
            backup: "b".into(),
            durable: 5,
        },
    );
    p.step(
        now,
        Input::RingUsage {
            used: 1000,
            capacity: 1000,
        },
    );
    p.step(now, Input::Records(recs(6, 6)));
    let a = connect(&mut p, now, "c", GEN, 2);
    assert!(
        matches!(&a[..], [Action::StartResync { next_seq: 7, .. }, ..]),
        "{a:?}"
    );
}

#[test]
fn sync_mode_does_not_wait_for_an_unreachable_backup() {
    let now = Instant::now();
    let mut p = pump(Mode::Sync, &["b", "c"]);
    connect(&mut p, now, "b", GEN, 0);
    connect(&mut p, now, "c", GEN, 0);
    p.step(now, Input::Records(recs(1, 4)));
    let a = p.step(
        now,
        Input::Ack {
            backup: "b".into(),
            durable: 4,
        },
    );
    assert_eq!(released(&a), None, "c has not acknowledged");
    let a = p.step(now, Input::Disconnected { backup: "c".into() });
    assert_eq!(released(&a), Some(4));
    // With nobody reachable, records are released as soon as they are read.
    let a = p.step(now, Input::Disconnected { backup: "b".into() });
    assert_eq!(released(&a), None);
    let a = p.step(now, Input::Records(recs(5, 5)));
    assert_eq!(released(&a), Some(5));
}

#[test]
fn async_mode_gives_up_a_disconnected_backup_at_the_high_water_mark() {
    let now = Instant::now();
    let mut p = pump(Mode::Async, &["b"]);
    connect(&mut p, now, "b", GEN, 0);
    p.step(now, Input::Records(recs(1, 3)));
    p.step(now, Input::Disconnected { backup: "b".into() });
    let a = p.step(
        now,
        Input::RingUsage {
            used: 700,
            capacity: 1000,
        },
    );
    assert_eq!(released(&a), None);
    let a = p.step(
        now,
        Input::RingUsage {
            used: 800,
            capacity: 1000,
        },
    );
    assert_eq!(released(&a), Some(3));
    // Memory still has the records, so it resumes without a resync.
    let a = connect(&mut p, now, "b", GEN, 0);
    assert_eq!(sent_seqs(&a, "b"), vec![1, 2, 3]);
}

#[test]
fn the_window_bounds_what_is_in_flight() {
    let now = Instant::now();
    let cfg = PumpConfig {
        max_inflight_bytes: 3 * (10 + RECORD_OVERHEAD),
        max_batch_bytes: 2 * (10 + RECORD_OVERHEAD),
        ..PumpConfig::default()
    };
    let mut p = Pump::new(cfg, "data", GEN, 1, 1, ["b".to_string()]);
    connect(&mut p, now, "b", GEN, 0);
    let a = p.step(now, Input::Records(recs(1, 10)));
    let batches: Vec<usize> = a
        .iter()
        .filter_map(|a| match a {
            Action::SendOps { records, .. } => Some(records.len()),
            _ => None,
        })
        .collect();
    assert_eq!(batches, vec![2, 1]);
    let a = p.step(
        now,
        Input::Ack {
            backup: "b".into(),
            durable: 2,
        },
    );
    assert_eq!(sent_seqs(&a, "b"), vec![4, 5]);
}

#[test]
fn protocol_violations_close_the_link() {
    let now = Instant::now();
    let mut p = pump(Mode::Async, &["b"]);
    connect(&mut p, now, "b", GEN, 0);
    p.step(now, Input::Records(recs(1, 2)));
    let a = p.step(
        now,
        Input::Ack {
            backup: "b".into(),
            durable: 9,
        },
    );
    assert!(matches!(&a[..], [Action::Close { .. }]), "{a:?}");
    let a = p.step(
        now,
        Input::State {
            backup: "b".into(),
            generation: GEN,
            durable: 0,
        },
    );
    assert!(matches!(&a[..], [Action::Close { .. }]), "{a:?}");
    // Unknown backups are ignored, not trusted.
    assert!(
        p.step(
            now,
            Input::Ack {
                backup: "zz".into(),
                durable: 1
            }
        )
        .is_empty()
    );
}

/// A simulated backup: a durable log that must grow densely.
#[derive(Debug, Default)]
struct SimBackup {
    generation: u64,
    durable: u64,
    received: u64,
    connected: bool,
    resyncing: Option<u64>,
}

/// Random connects, disconnects, acks, ring pressure and abandoned records over many seeds:
/// every backup sees dense sequences, the ring is never released past what a holding backup
/// has durable, and when the dust settles every backup has everything.
#[test]
fn random_schedules_keep_the_invariants() {
    let (mut caught_up, mut resyncs, mut releases) = (0, 0, 0);
    for seed in 0..300u64 {
        let mut rng = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mode = if seed % 2 == 0 {
            Mode::Async
        } else {
            Mode::Sync
        };
        let names = ["b", "c"];
        let cfg = PumpConfig {
            mode,
            max_inflight_bytes: 8 * (10 + RECORD_OVERHEAD),
            max_batch_bytes: 3 * (10 + RECORD_OVERHEAD),
            max_retained_bytes: 40 * (10 + RECORD_OVERHEAD),
            ..PumpConfig::default()
        };
        let mut p = Pump::new(cfg, "data", GEN, 1, 1, names.iter().map(|s| s.to_string()));
        let mut sims: BTreeMap<&str, SimBackup> =
            names.iter().map(|n| (*n, SimBackup::default())).collect();
        let mut produced = 0u64;
        let now = Instant::now();
        let mut pending: Vec<Action> = Vec::new();
        for round in 0..400 {
            let settle = round >= 300;
            let input = match next(8) {
                0 | 1 if !settle => {
                    let n = 1 + next(4);
                    let v = recs(produced + 1, produced + n);
                    produced += n;
                    Input::Records(v)
                }
                2 if !settle && next(20) == 0 => {
                    produced += 1;
                    Input::Abandoned { seq: produced }
                }
                3 if !settle => {
                    let b = names[usize::try_from(next(2)).expect("small")];
                    sims.get_mut(b).expect("known").connected = false;
                    sims.get_mut(b).expect("known").resyncing = None;
                    Input::Disconnected { backup: b.into() }
                }
                4 => Input::RingUsage {
                    used: next(1000),
                    capacity: 1000,
                },
                _ => {
                    let b = names[usize::try_from(next(2)).expect("small")];
                    let s = sims.get_mut(b).expect("known");
                    if !s.connected {
                        s.connected = true;
                        // A real backup syncs its log before answering, so what it
                        // received is what it reports.
                        s.durable = s.received;
                        let mut a = p.step(now, Input::Connected { backup: b.into() });
                        pending.append(&mut a);
                        Input::State {
                            backup: b.into(),
                            generation: s.generation,
                            durable: s.durable,
                        }
                    } else if let Some(next_seq) = s.resyncing.take() {
                        s.generation = GEN;
                        s.durable = next_seq - 1;
                        s.received = next_seq - 1;
                        Input::ResyncDone {
                            backup: b.into(),
                            next_seq,
                        }
                    } else {
                        s.durable = s.received;
                        Input::Ack {
                            backup: b.into(),
                            durable: s.durable,
                        }
                    }
                }
            };
            let mut actions = p.step(now, input);
            pending.append(&mut actions);
            for a in pending.drain(..) {
                match a {
                    Action::SendOps { backup, records } => {
                        let s = sims.get_mut(backup.as_str()).expect("known");
                        assert!(s.connected, "seed {seed}: sent to a disconnected backup");
                        for r in records {
                            assert_eq!(
                                r.seq,
                                s.received + 1,
                                "seed {seed}: not dense for {backup}"
                            );
                            s.received = r.seq;
                        }
                    }
                    Action::StartResync { backup, next_seq } => {
                        resyncs += 1;
                        sims.get_mut(backup.as_str()).expect("known").resyncing = Some(next_seq);
                    }
                    Action::Release { through } => {
                        releases += 1;
                        for (name, b) in &p.backups {
                            if b.holds_release {
                                assert!(
                                    sims[name.as_str()].durable >= through,
                                    "seed {seed}: released {through} past {name}'s durable point"
                                );
                            }
                        }
                    }
                    Action::Close { reason, .. } => {
                        panic!("seed {seed}: unexpected close: {reason}")
                    }
                    Action::Send { .. } => {}
                }
            }
        }
        for (name, s) in &sims {
            if s.connected && s.resyncing.is_none() {
                assert_eq!(s.durable, produced, "seed {seed}: {name} did not catch up");
                caught_up += 1;
            }
        }
    }
    // The schedules really exercised the paths the invariants are about.
    assert!(
        caught_up > 300 && resyncs > 300 && releases > 3000,
        "{caught_up} {resyncs} {releases}"
    );
}

#[test]
fn a_rename_during_a_resync_triggers_one_more_comparison() {
    let now = Instant::now();
    let mut p = pump(Mode::Async, &["b"]);
    let a = connect(&mut p, now, "b", GEN + 1, 0);
    assert!(
        matches!(&a[..], [Action::StartResync { next_seq: 1, .. }]),
        "{a:?}"
    );
    // While the resync copies files, the application renames one.
    p.step(now, Input::Records(vec![rec(1, 10), rename(2), rec(3, 10)]));
    let a = p.step(
        now,
        Input::ResyncDone {
            backup: "b".into(),
            next_seq: 1,
        },
    );
    assert_eq!(sent_seqs(&a, "b"), vec![1, 2, 3]);
    p.step(now, Input::Records(vec![rec(4, 10)]));
    // Caught up past the overlapping records: compared again, from the current position.
    let a = p.step(
        now,
        Input::Ack {
            backup: "b".into(),
            durable: 3,
        },
    );
    assert!(
        matches!(&a[..], [Action::StartResync { next_seq: 5, .. }, ..]),
        "{a:?}"
    );
    // No rename overlapped this one: streaming goes on.
    let a = p.step(
        now,
        Input::ResyncDone {
            backup: "b".into(),
            next_seq: 5,
        },
    );
    assert!(
        !a.iter().any(|x| matches!(x, Action::StartResync { .. })),
        "{a:?}"
    );
    p.step(now, Input::Records(vec![rec(5, 10)]));
    let a = p.step(
        now,
        Input::Ack {
            backup: "b".into(),
            durable: 5,
        },
    );
    assert!(
        !a.iter().any(|x| matches!(x, Action::StartResync { .. })),
        "{a:?}"
    );
    assert_eq!(p.view(now)[0].resyncs, 2);
}
