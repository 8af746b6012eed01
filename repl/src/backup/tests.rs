use super::*;
use crate::RelPath;

const GEN: u64 = 77;

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("valid")
}

fn spec(dir: &Path) -> BackupSpec {
    BackupSpec {
        fileset: "data".into(),
        root: dir.join("replica"),
        state_dir: dir.join("state"),
        segment: SegmentOptions::default(),
    }
}

fn hello(epoch: u64) -> ToBackup {
    ToBackup::Hello {
        fileset: "data".into(),
        generation: GEN,
        epoch,
        mode: Mode::Async,
    }
}

fn write(seq: u64, path: &str, data: &[u8]) -> OpRecord {
    OpRecord {
        seq,
        op: Op::Write {
            path: p(path),
            offset: 0,
            data: data.to_vec(),
        },
    }
}

/// Greets, resyncs from nothing to `next_seq`, and returns the backup.
fn resynced(dir: &Path, next_seq: u64, ops: Vec<Op>) -> Bcplog {
    let mut b = Bcplog::open(spec(dir)).expect("open");
    b.connected();
    let r = b.handle(hello(1)).expect("hello");
    assert_eq!(
        r,
        vec![ToPrimary::State {
            generation: 0,
            durable: 0
        }]
    );
    let r = b.handle(ToBackup::ResyncBegin { next_seq }).expect("begin");
    assert!(
        matches!(&r[..], [ToPrimary::Manifest { last: true, .. }]),
        "{r:?}"
    );
    b.handle(ToBackup::ResyncOps { ops }).expect("ops");
    let r = b.handle(ToBackup::ResyncEnd { next_seq }).expect("end");
    assert_eq!(
        r,
        vec![ToPrimary::Ack {
            durable: next_seq - 1
        }]
    );
    b
}

fn replay_all(b: &Bcplog) {
    let mut last = Instant::now();
    while replay_step(&b.shared(), &mut last).expect("replay") {}
    // One more pass commits what the last batch applied.
    let mut long_ago = Instant::now() - REPLAY_COMMIT_EVERY;
    replay_step(&b.shared(), &mut long_ago).expect("replay");
}

#[test]
fn resync_then_stream_then_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = resynced(
        dir.path(),
        10,
        vec![
            Op::Mkdir {
                path: p("d"),
                mode: 0o755,
            },
            Op::Write {
                path: p("d/f"),
                offset: 0,
                data: b"old".to_vec(),
            },
        ],
    );
    assert_eq!(
        std::fs::read(dir.path().join("replica/d/f")).expect("resynced"),
        b"old"
    );
    b.handle(ToBackup::Ops {
        records: vec![
            write(10, "d/g", b"new"),
            OpRecord {
                seq: 11,
                op: Op::Unlink { path: p("d/f") },
            },
        ],
    })
    .expect("append");
    assert_eq!(
        b.sync().expect("sync"),
        Some(ToPrimary::Ack { durable: 11 })
    );
    replay_all(&b);
    assert_eq!(
        std::fs::read(dir.path().join("replica/d/g")).expect("replayed"),
        b"new"
    );
    assert!(!dir.path().join("replica/d/f").exists());
    let st = b.status();
    assert_eq!(
        (st.durable, st.applied, st.committed, st.generation),
        (11, 11, 11, GEN)
    );

    // A restart: same stream, resumes where the log is; a repeated record is ignored.
    drop(b);
    let mut b = Bcplog::open(spec(dir.path())).expect("reopen");
    b.connected();
    let r = b.handle(hello(1)).expect("hello");
    assert_eq!(
        r,
        vec![ToPrimary::State {
            generation: GEN,
            durable: 11
        }]
    );
    b.handle(ToBackup::Ops {
        records: vec![write(11, "x", b"dup"), write(12, "d/h", b"h")],
    })
    .expect("append");
    assert_eq!(
        b.sync().expect("sync"),
        Some(ToPrimary::Ack { durable: 12 })
    );
    replay_all(&b);
    assert!(
        !dir.path().join("replica/x").exists(),
        "the repeated record was not applied"
    );
    assert!(dir.path().join("replica/d/h").exists());
}

#[test]
fn refusals_and_protocol_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = resynced(dir.path(), 1, Vec::new());
    // A higher epoch is remembered; an older pump is then refused.
    b.connected();
    b.handle(hello(5)).expect("newer epoch");
    b.connected();
    let e = b.handle(hello(4)).expect_err("stale");
    assert!(e.to_string().contains("stale epoch 4"), "{e}");
    b.connected();
    let e = b
        .handle(ToBackup::Hello {
            fileset: "other".into(),
            generation: GEN,
            epoch: 9,
            mode: Mode::Sync,
        })
        .expect_err("other fileset");
    assert!(matches!(e, BackupError::Refused(_)), "{e}");
    // Ops before the greeting, and a gap.
    b.connected();
    let e = b
        .handle(ToBackup::Ops {
            records: vec![write(1, "a", b"")],
        })
        .expect_err("no hello");
    assert!(matches!(e, BackupError::Protocol(_)), "{e}");
    b.handle(hello(5)).expect("hello");
    let e = b
        .handle(ToBackup::Ops {
            records: vec![write(3, "a", b"")],
        })
        .expect_err("gap");
    assert!(e.to_string().contains("missing"), "{e}");
    // The epoch survives a restart.
    drop(b);
    let mut b = Bcplog::open(spec(dir.path())).expect("reopen");
    b.connected();
    assert!(b.handle(hello(4)).is_err());
}

#[test]
fn a_resync_cut_short_asks_for_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = resynced(dir.path(), 5, Vec::new());
    drop(b);
    let mut b = Bcplog::open(spec(dir.path())).expect("reopen");
    b.connected();
    b.handle(hello(1)).expect("hello");
    b.handle(ToBackup::ResyncBegin { next_seq: 9 })
        .expect("begin");
    b.handle(ToBackup::ResyncOps {
        ops: vec![Op::Mkdir {
            path: p("half"),
            mode: 0o700,
        }],
    })
    .expect("ops");
    drop(b); // the connection (or watchd) dies before ResyncEnd
    let mut b = Bcplog::open(spec(dir.path())).expect("reopen");
    b.connected();
    let r = b.handle(hello(1)).expect("hello");
    assert!(
        matches!(&r[..], [ToPrimary::State { generation: 0, .. }]),
        "{r:?}"
    );
}

#[test]
fn a_crash_between_log_reset_and_replica_rebase_is_mended_by_the_next_resync() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Bcplog::open(spec(dir.path())).expect("open"));
    // The end of a resync to 1812 got as far as the log's reset: the replica still says 0.
    {
        let (mut log, _) =
            SegmentLog::open(&dir.path().join("state/log"), SegmentOptions::default())
                .expect("log");
        log.reset(1812).expect("reset");
    }
    let mut b = Bcplog::open(spec(dir.path())).expect("reopen");
    b.connected();
    let r = b.handle(hello(1)).expect("hello");
    assert_eq!(
        r,
        vec![ToPrimary::State {
            generation: 0,
            durable: 1811
        }]
    );
    let r = b
        .handle(ToBackup::ResyncBegin { next_seq: 2000 })
        .expect("a resync begins although the log does not continue the replica");
    assert!(
        matches!(&r[..], [ToPrimary::Manifest { last: true, .. }]),
        "{r:?}"
    );
    let r = b
        .handle(ToBackup::ResyncEnd { next_seq: 2000 })
        .expect("end");
    assert_eq!(r, vec![ToPrimary::Ack { durable: 1999 }]);
    b.handle(ToBackup::Ops {
        records: vec![write(2000, "f", b"after")],
    })
    .expect("stream");
    b.sync().expect("sync");
    replay_all(&b);
    assert_eq!(
        std::fs::read(dir.path().join("replica/f")).expect("replayed"),
        b"after"
    );
}

#[test]
fn promotion_applies_the_whole_log_and_forgets_the_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = resynced(dir.path(), 1, Vec::new());
    b.handle(ToBackup::Ops {
        records: (1..=20)
            .map(|i| write(i, &format!("f{}", i % 3), format!("v{i}").as_bytes()))
            .collect(),
    })
    .expect("append");
    b.sync().expect("sync");
    // No replay ran: the records are only in the log.
    assert!(!dir.path().join("replica/f0").exists());
    let p = b.promote().expect("promote");
    assert_eq!(
        p,
        Promotion {
            applied: 20,
            followed_generation: GEN,
            log_consistent: true
        }
    );
    assert_eq!(
        std::fs::read(dir.path().join("replica/f2")).expect("applied"),
        b"v20"
    );
    assert_eq!(b.status().committed, 20);
    drop(b);
    // A later stream (of the next primary, or this node's own old one) must resync: the files
    // change under this node's pump from now on.
    let mut b = Bcplog::open(spec(dir.path())).expect("reopen");
    b.connected();
    let r = b.handle(hello(1)).expect("hello");
    assert_eq!(
        r,
        vec![ToPrimary::State {
            generation: 0,
            durable: 20
        }]
    );
}

#[test]
fn admission_follows_the_highest_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = resynced(dir.path(), 1, Vec::new());
    assert!(b.admits("data", 1).is_ok());
    b.connected();
    b.handle(hello(3)).expect("a newer epoch is accepted");
    assert_eq!(b.epoch(), 3);
    assert!(b.admits("data", 3).is_ok());
    let e = b.admits("data", 2).expect_err("stale");
    assert!(matches!(e, BackupError::Refused(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "refused: stale epoch 2: this backup has seen epoch 3"
    );
    assert!(b.admits("other", 9).is_err());
}

fn kept_seqs(b: &Bcplog) -> Vec<u64> {
    let shared = b.shared();
    let recent = lock(&shared.recent);
    recent.records.iter().map(|r| r.seq).collect()
}

fn replica_file(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join("replica").join(name)).expect("replayed")
}

#[test]
fn replay_takes_kept_records_once_durable_and_reads_the_log_for_what_memory_lacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = resynced(dir.path(), 1, Vec::new());
    b.handle(ToBackup::Ops {
        records: vec![write(1, "a", b"one"), write(2, "b", b"two")],
    })
    .expect("append");
    assert_eq!(kept_seqs(&b), [1, 2]);
    let mut last = Instant::now();
    assert!(
        !replay_step(&b.shared(), &mut last).expect("replay"),
        "nothing is applied before it is durable in the log"
    );
    assert_eq!(b.status().applied, 0);
    b.sync().expect("sync");
    replay_all(&b);
    assert_eq!(kept_seqs(&b), Vec::<u64>::new(), "taken by replay");
    assert_eq!(replica_file(dir.path(), "a"), b"one");
    assert_eq!(replica_file(dir.path(), "b"), b"two");

    // Memory lost record 3 (a lagging replay, a restart): replay reads 3 and 4 from the log,
    // and the kept copy of 4 is then dropped unused.
    b.handle(ToBackup::Ops {
        records: vec![write(3, "c", b"three")],
    })
    .expect("append");
    lock(&b.shared().recent).records.clear();
    b.handle(ToBackup::Ops {
        records: vec![write(4, "d", b"four")],
    })
    .expect("append");
    assert_eq!(kept_seqs(&b), [4]);
    b.sync().expect("sync");
    replay_all(&b);
    assert_eq!(replica_file(dir.path(), "c"), b"three");
    assert_eq!(replica_file(dir.path(), "d"), b"four");
    let st = b.status();
    assert_eq!((st.applied, st.committed), (4, 4));

    // Kept records follow each other: after a gap nothing more is kept until replay took
    // the run.
    b.shared()
        .keep_for_replay([write(5, "e", b"5"), write(7, "g", b"7")]);
    assert_eq!(kept_seqs(&b), [5]);
}

#[test]
fn a_resync_forgets_the_records_kept_for_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = resynced(dir.path(), 1, Vec::new());
    b.handle(ToBackup::Ops {
        records: vec![write(1, "a", b"old")],
    })
    .expect("append");
    b.sync().expect("sync");
    let before = b.shared().rebases.load(Ordering::Relaxed);
    // The primary resyncs and starts its stream over at seq 1: the kept old record 1 must
    // never be applied in place of the new one.
    b.handle(ToBackup::ResyncBegin { next_seq: 1 })
        .expect("begin");
    b.handle(ToBackup::ResyncOps {
        ops: vec![Op::Write {
            path: p("base"),
            offset: 0,
            data: b"resynced".to_vec(),
        }],
    })
    .expect("ops");
    b.handle(ToBackup::ResyncEnd { next_seq: 1 }).expect("end");
    assert!(b.shared().rebases.load(Ordering::Relaxed) > before);
    assert_eq!(kept_seqs(&b), Vec::<u64>::new());
    b.handle(ToBackup::Ops {
        records: vec![write(1, "a", b"new")],
    })
    .expect("append");
    b.sync().expect("sync");
    replay_all(&b);
    assert_eq!(replica_file(dir.path(), "a"), b"new");
    assert_eq!(replica_file(dir.path(), "base"), b"resynced");
}
