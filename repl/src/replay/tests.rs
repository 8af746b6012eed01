use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::testkit::{self, Mix, Primary, Rng, listing, rec, rel, snapshot_outside};
use super::*;
use crate::segment::{SegmentOptions, SegmentReader};

/// A scratch area: `root` (the replica), `state`, and `outside` with a file that must never
/// change.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    outside: PathBuf,
    base: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().to_path_buf();
        let outside = base.join("outside");
        fs::create_dir(&outside).expect("mkdir outside");
        fs::write(outside.join("secret"), b"do not touch").expect("write secret");
        fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600))
            .expect("chmod");
        Scratch {
            root: base.join("root"),
            state: base.join("state"),
            outside,
            base,
            _dir: dir,
        }
    }

    fn replica(&self) -> Replica {
        Replica::open(&self.root, &self.state).expect("open replica")
    }

    fn second(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.base.join(format!("{name}-root")),
            self.base.join(format!("{name}-state")),
        )
    }
}

fn apply_ok(replica: &mut Replica, r: &OpRecord) -> Applied {
    match replica.apply(r) {
        Ok(a) => a,
        Err(e) if e.consumed() => Applied::Skipped,
        Err(e) => panic!("apply {r:?}: {e}"),
    }
}

fn apply_seq(replica: &mut Replica, ops: &[OpRecord]) {
    for r in ops {
        apply_ok(replica, r);
    }
}

#[test]
fn every_kind_of_operation_is_applied_and_is_idempotent() {
    let s = Scratch::new();
    let mut r = s.replica();
    let ops = vec![
        Op::Mkdir {
            path: rel("d"),
            mode: 0o750,
        },
        Op::Create {
            path: rel("d/e/f"),
            mode: 0o640,
        },
        Op::Write {
            path: rel("d/e/f"),
            offset: 0,
            data: b"hello world".to_vec(),
        },
        Op::Write {
            path: rel("d/e/f"),
            offset: 6,
            data: b"there".to_vec(),
        },
        Op::Truncate {
            path: rel("d/e/f"),
            len: 8,
        },
        Op::Write {
            path: rel("g"),
            offset: 3,
            data: b"xyz".to_vec(),
        },
        Op::Chmod {
            path: rel("g"),
            mode: 0o600,
        },
        Op::SetTimes {
            path: rel("g"),
            atime_ns: Some(1_000_000_123),
            mtime_ns: Some(2_000_000_456),
        },
        Op::Symlink {
            target: b"d/e/f".to_vec(),
            path: rel("link"),
        },
        Op::SetTimes {
            path: rel("link"),
            atime_ns: None,
            mtime_ns: Some(3_000_000_000),
        },
        Op::Link {
            from: rel("g"),
            to: rel("d/hard"),
        },
        Op::Rename {
            from: rel("d/e/f"),
            to: rel("d/moved"),
        },
        Op::Create {
            path: rel("gone"),
            mode: 0o644,
        },
        Op::Unlink { path: rel("gone") },
        Op::Mkdir {
            path: rel("empty"),
            mode: 0o755,
        },
        Op::Rmdir { path: rel("empty") },
        Op::Fsync {
            path: rel("d/moved"),
        },
        Op::Chmod {
            path: rel("d"),
            mode: 0o755,
        },
    ];
    let records: Vec<OpRecord> = ops
        .into_iter()
        .zip(1..)
        .map(|(op, seq)| rec(seq, op))
        .collect();
    for r_ in &records {
        assert_eq!(apply_ok(&mut r, r_), Applied::Done, "{r_:?}");
        // Applied once more to the state it produced, it changes nothing.
        let tree = listing(&s.root);
        r.rebase(r_.seq - 1).expect("rebase");
        let again = apply_ok(&mut r, r_);
        assert!(
            matches!(again, Applied::Done | Applied::AlreadyDone),
            "{r_:?}: {again:?}"
        );
        assert_eq!(
            listing(&s.root),
            tree,
            "re-applying {r_:?} changed the tree"
        );
    }
    assert_eq!(r.commit().expect("commit"), records.len() as u64);

    let root = &s.root;
    assert_eq!(fs::read(root.join("d/moved")).expect("read"), b"hello th");
    assert!(!root.join("d/e/f").exists());
    assert_eq!(
        fs::metadata(root.join("d/moved")).expect("stat").mode() & 0o7777,
        0o640
    );
    // Times first: reading the file would move its atime.
    let g = fs::metadata(root.join("g")).expect("stat");
    assert_eq!(g.mode() & 0o7777, 0o600);
    assert_eq!((g.mtime(), g.mtime_nsec()), (2, 456));
    assert_eq!((g.atime(), g.atime_nsec()), (1, 123));
    assert_eq!(
        g.ino(),
        fs::metadata(root.join("d/hard")).expect("stat").ino()
    );
    assert_eq!(fs::read(root.join("g")).expect("read"), b"\0\0\0xyz");
    assert_eq!(
        fs::read_link(root.join("link")).expect("readlink"),
        Path::new("d/e/f")
    );
    assert_eq!(
        fs::symlink_metadata(root.join("link"))
            .expect("lstat")
            .mtime(),
        3
    );
    assert!(!root.join("gone").exists() && !root.join("empty").exists());
    assert_eq!(
        fs::metadata(root.join("d")).expect("stat").mode() & 0o7777,
        0o755
    );
    assert_eq!(
        fs::metadata(root.join("d/e")).expect("stat").mode() & 0o7777,
        DEFAULT_DIR_MODE
    );

    assert_eq!(r.applied_seq(), records.len() as u64);
    // Records at or below the applied seq are skipped; a record past the next one is a gap.
    assert_eq!(r.apply(&records[0]).expect("skip"), Applied::Skipped);
    let gap = rec(records.len() as u64 + 2, Op::Fsync { path: rel("g") });
    assert!(matches!(r.apply(&gap), Err(ReplayError::Gap { .. })));
    r.commit().expect("commit");
    drop(r);
    let r = s.replica();
    assert_eq!(r.applied_seq(), records.len() as u64);
}

#[test]
fn modes_are_exact_whatever_the_umask() {
    let s = Scratch::new();
    let mut r = s.replica();
    apply_seq(
        &mut r,
        &[
            rec(
                1,
                Op::Create {
                    path: rel("f"),
                    mode: 0o777,
                },
            ),
            rec(
                2,
                Op::Mkdir {
                    path: rel("d"),
                    mode: 0o777,
                },
            ),
        ],
    );
    assert_eq!(
        fs::metadata(s.root.join("f")).expect("stat").mode() & 0o7777,
        0o777
    );
    assert_eq!(
        fs::metadata(s.root.join("d")).expect("stat").mode() & 0o7777,
        0o777
    );
}

/// Every way an operation could reach `outside` through a symlink: each is refused and
/// counted, the stream goes on, and nothing outside changes.
#[test]
fn escapes_through_symlinks_are_refused_and_nothing_outside_is_touched() {
    let s = Scratch::new();
    let before = snapshot_outside(&s.outside);
    let mut r = s.replica();
    let outside_dir = s.outside.as_os_str().as_encoded_bytes().to_vec();
    let outside_file = s
        .outside
        .join("secret")
        .as_os_str()
        .as_encoded_bytes()
        .to_vec();
    let setup = [
        Op::Symlink {
            target: outside_dir.clone(),
            path: rel("out"),
        },
        Op::Symlink {
            target: outside_file.clone(),
            path: rel("s"),
        },
        Op::Symlink {
            target: b"../outside".to_vec(),
            path: rel("rel"),
        },
        Op::Symlink {
            target: b"../outside/secret".to_vec(),
            path: rel("rels"),
        },
        Op::Mkdir {
            path: rel("sub"),
            mode: 0o755,
        },
        Op::Symlink {
            target: b"../../outside".to_vec(),
            path: rel("sub/up"),
        },
    ];
    let mut seq = 0;
    for op in setup {
        seq += 1;
        assert_eq!(
            r.apply(&rec(seq, op))
                .expect("symlinks are stored verbatim"),
            Applied::Done
        );
    }
    let attacks = [
        Op::Write {
            path: rel("s"),
            offset: 0,
            data: b"pwned".to_vec(),
        },
        Op::Write {
            path: rel("rels"),
            offset: 0,
            data: b"pwned".to_vec(),
        },
        Op::Write {
            path: rel("out/secret"),
            offset: 0,
            data: b"pwned".to_vec(),
        },
        Op::Write {
            path: rel("rel/secret"),
            offset: 0,
            data: b"pwned".to_vec(),
        },
        Op::Write {
            path: rel("sub/up/secret"),
            offset: 0,
            data: b"pwned".to_vec(),
        },
        Op::Write {
            path: rel("out/new"),
            offset: 0,
            data: b"pwned".to_vec(),
        },
        Op::Create {
            path: rel("s"),
            mode: 0o777,
        },
        Op::Create {
            path: rel("out/new"),
            mode: 0o777,
        },
        Op::Truncate {
            path: rel("s"),
            len: 0,
        },
        Op::Truncate {
            path: rel("out/secret"),
            len: 0,
        },
        Op::Chmod {
            path: rel("s"),
            mode: 0o777,
        },
        Op::Chmod {
            path: rel("rels"),
            mode: 0o777,
        },
        Op::Chmod {
            path: rel("out/secret"),
            mode: 0o777,
        },
        Op::SetTimes {
            path: rel("out/secret"),
            atime_ns: Some(0),
            mtime_ns: Some(0),
        },
        Op::Fsync { path: rel("s") },
        Op::Mkdir {
            path: rel("out/dir"),
            mode: 0o777,
        },
        Op::Unlink {
            path: rel("out/secret"),
        },
        Op::Unlink {
            path: rel("rel/secret"),
        },
        Op::Rmdir { path: rel("out/x") },
        Op::Rename {
            from: rel("out/secret"),
            to: rel("stolen"),
        },
        Op::Rename {
            from: rel("stolen"),
            to: rel("out/planted"),
        },
        Op::Link {
            from: rel("out/secret"),
            to: rel("hard"),
        },
        Op::Symlink {
            target: b"x".to_vec(),
            path: rel("out/planted"),
        },
        Op::Write {
            path: rel("sub/up/x/y"),
            offset: 0,
            data: b"pwned".to_vec(),
        },
    ];
    let mut refused = 0;
    for op in attacks {
        seq += 1;
        let result = r.apply(&rec(seq, op.clone()));
        if std::env::var("DEBUG_ESC").is_ok() {
            eprintln!("{op:?} -> {result:?}");
        }
        match result {
            Err(ReplayError::Escape { seq: at, path, why }) => {
                assert_eq!(at, seq);
                assert_eq!(&path, op.path(), "{why}");
                refused += 1;
            }
            Ok(Applied::Conflict { .. } | Applied::AlreadyDone) => {}
            other => panic!("{op:?}: {other:?}"),
        }
        assert_eq!(r.applied_seq(), seq, "the stream goes on past {op:?}");
        assert_eq!(
            snapshot_outside(&s.outside),
            before,
            "{op:?} touched the outside"
        );
    }
    assert!(refused >= 20, "only {refused} escapes were reported");
    assert_eq!(r.stats().refused, refused);

    // Operations on the links themselves stay inside: times of the link, removal of the link.
    seq += 1;
    let lutimes = Op::SetTimes {
        path: rel("s"),
        atime_ns: Some(5),
        mtime_ns: Some(5),
    };
    assert_eq!(
        r.apply(&rec(seq, lutimes)).expect("settimes"),
        Applied::Done
    );
    for path in ["s", "out", "sub/up"] {
        seq += 1;
        assert_eq!(
            r.apply(&rec(seq, Op::Unlink { path: rel(path) }))
                .expect("unlink"),
            Applied::Done
        );
    }
    seq += 1;
    assert_eq!(
        r.apply(&rec(seq, Op::Rmdir { path: rel("rel") }))
            .expect("rmdir"),
        Applied::Done
    );
    assert!(fs::symlink_metadata(s.root.join("rel")).is_err());
    assert_eq!(snapshot_outside(&s.outside), before);

    // A symlink that stays inside the root is not followed either, but that is no escape.
    for op in [
        Op::Mkdir {
            path: rel("real"),
            mode: 0o755,
        },
        Op::Symlink {
            target: b"real".to_vec(),
            path: rel("alias"),
        },
    ] {
        seq += 1;
        assert_eq!(r.apply(&rec(seq, op)).expect("setup"), Applied::Done);
    }
    seq += 1;
    let through = Op::Write {
        path: rel("alias/f"),
        offset: 0,
        data: b"x".to_vec(),
    };
    assert!(matches!(
        r.apply(&rec(seq, through)).expect("no escape"),
        Applied::Conflict { .. }
    ));
    assert!(!s.root.join("real/f").exists());

    // Forged records with `..` or absolute paths never decode into an operation.
    #[derive(serde::Serialize)]
    enum Forged {
        Write {
            #[serde(with = "serde_bytes")]
            path: Vec<u8>,
            offset: u64,
            #[serde(with = "serde_bytes")]
            data: Vec<u8>,
        },
    }
    #[derive(serde::Serialize)]
    struct ForgedRecord {
        seq: u64,
        op: Forged,
    }
    let secret_abs = s
        .outside
        .join("secret")
        .as_os_str()
        .as_encoded_bytes()
        .to_vec();
    for path in [
        b"../outside/secret".to_vec(),
        secret_abs,
        b"a/../../outside/secret".to_vec(),
    ] {
        seq += 1;
        let forged = rmp_serde::to_vec(&ForgedRecord {
            seq,
            op: Forged::Write {
                path,
                offset: 0,
                data: b"pwned".to_vec(),
            },
        })
        .expect("encode");
        assert!(matches!(
            r.apply_encoded(seq, &forged),
            Err(ReplayError::Undecodable { .. })
        ));
        assert_eq!(r.applied_seq(), seq);
    }
    seq += 1;
    let wrong_seq = encode_record(&rec(seq + 5, Op::Fsync { path: rel("x") }));
    assert!(matches!(
        r.apply_encoded(seq, &wrong_seq),
        Err(ReplayError::Undecodable { .. })
    ));
    seq += 1;
    assert!(matches!(
        r.apply_encoded(seq, b"\xff\x00garbage"),
        Err(ReplayError::Undecodable { .. })
    ));
    assert_eq!(snapshot_outside(&s.outside), before);
    assert_eq!(r.commit().expect("commit"), seq);
}

#[test]
fn path_local_operations_reapplied_from_any_point_leave_the_same_tree() {
    let seed = testkit::seed("path_local_reapply");
    let mut rng = Rng(seed);
    for round in 0..40 {
        let s = Scratch::new();
        let before = snapshot_outside(&s.outside);
        let primary = s.base.join("primary");
        let ops = testkit::primary_ops(
            &mut rng,
            120,
            Mix::PathLocal,
            &Primary::new(&primary),
            &s.outside,
        );
        let mut r = s.replica();
        apply_seq(&mut r, &ops);
        let tree = listing(&s.root);
        assert_eq!(
            tree,
            listing(&primary),
            "seed {seed} round {round}: replica differs"
        );
        for _ in 0..6 {
            let j = 1 + rng.below(ops.len() as u64);
            r.rebase(j - 1).expect("rebase");
            apply_seq(&mut r, &ops[usize::try_from(j - 1).expect("small")..]);
            assert_eq!(
                listing(&s.root),
                tree,
                "seed {seed} round {round}: re-applying from {j} changed the tree"
            );
        }
        assert_eq!(
            snapshot_outside(&s.outside),
            before,
            "seed {seed} round {round}"
        );
    }
}

/// In-process crashes: the replica is dropped without a commit at random points (the tree
/// keeps everything applied, the applied seq falls back to the last commit), reopened, and
/// fed again from there. Renames and links are in the mix: the commits around them keep a
/// crash from re-applying one of them to a later state.
#[test]
fn crashes_between_commits_with_renames_and_links_converge_to_the_same_tree() {
    let seed = testkit::seed("crash_windows");
    let mut rng = Rng(seed);
    for round in 0..30 {
        let s = Scratch::new();
        let primary = s.base.join("primary");
        let ops =
            testkit::primary_ops(&mut rng, 150, Mix::All, &Primary::new(&primary), &s.outside);
        let want = listing(&primary);

        let mut r = s.replica();
        let mut crashes = 0;
        while r.applied_seq() < ops.len() as u64 {
            let next = usize::try_from(r.applied_seq()).expect("small");
            apply_ok(&mut r, &ops[next]);
            match rng.below(10) {
                0 => {
                    r.commit().expect("commit");
                }
                1 => {
                    drop(r);
                    crashes += 1;
                    r = s.replica();
                }
                _ => {}
            }
        }
        assert!(crashes > 0);
        assert_eq!(listing(&s.root), want, "seed {seed} round {round}");
    }
}

#[test]
fn random_records_never_panic_and_never_leave_the_root() {
    let seed = testkit::seed("random_records");
    let mut rng = Rng(seed);
    let s = Scratch::new();
    let before = snapshot_outside(&s.outside);
    let mut r = s.replica();
    let weird_names: [&[u8]; 6] = [b"a", b"\xff\xfe", b"..a", b"a b", b"-", b" "];
    let mut seq = 0;
    for _ in 0..3000 {
        seq += 1;
        let path = |rng: &mut Rng| {
            let depth = 1 + rng.index(4);
            let parts: Vec<Vec<u8>> = (0..depth)
                .map(|_| {
                    if rng.below(8) == 0 {
                        vec![b'n'; 1 + rng.index(300)]
                    } else {
                        rng.pick(&weird_names).to_vec()
                    }
                })
                .collect();
            RelPath::new(parts.join(&b'/')).expect("valid")
        };
        let op = match rng.below(6) {
            0 => Op::Write {
                path: path(&mut rng),
                offset: *rng.pick(&[0, u64::MAX, u64::MAX - 3, 1 << 62, i64::MAX as u64]),
                data: vec![1, 2, 3],
            },
            1 => Op::Truncate {
                path: path(&mut rng),
                len: *rng.pick(&[u64::MAX, 1 << 63, 5]),
            },
            2 => Op::Symlink {
                target: rng
                    .pick(&[&b""[..], b"\0", &[b'x'; 5000], b"/", b"..", b"."])
                    .to_vec(),
                path: path(&mut rng),
            },
            3 => Op::SetTimes {
                path: path(&mut rng),
                atime_ns: Some(i64::MIN),
                mtime_ns: Some(i64::MAX),
            },
            4 => Op::Chmod {
                path: path(&mut rng),
                mode: u32::MAX,
            },
            _ => testkit::random_op(&mut rng, Mix::All, &s.outside),
        };
        match r.apply(&rec(seq, op.clone())) {
            Ok(_) => {}
            Err(e) if e.consumed() => {}
            Err(e) => panic!("seed {seed}: {op:?}: {e}"),
        }
        if rng.below(50) == 0 {
            r.commit().expect("commit");
        }
    }
    for _ in 0..500 {
        seq += 1;
        let len = rng.index(80);
        let payload = rng.bytes(len);
        let _ = r.apply_encoded(seq, &payload);
    }
    r.commit().expect("commit");
    assert_eq!(snapshot_outside(&s.outside), before, "seed {seed}");
}

#[test]
fn drain_applies_the_log_and_resumes_after_a_restart() {
    let seed = testkit::seed("drain");
    let mut rng = Rng(seed);
    let s = Scratch::new();
    let primary = s.base.join("primary");
    let ops = testkit::primary_ops(&mut rng, 400, Mix::All, &Primary::new(&primary), &s.outside);
    let log_dir = s.base.join("log");
    let (mut log, _) = SegmentLog::open(
        &log_dir,
        SegmentOptions {
            segment_bytes: 4096,
        },
    )
    .expect("open log");
    for r_ in &ops[..250] {
        log.append(r_.seq, &encode_record(r_)).expect("append");
    }
    log.sync().expect("sync");
    let mut r = s.replica();
    assert_eq!(drain(&mut log, &mut r).expect("drain"), 250);
    log.trim_through(250).expect("trim");
    for r_ in &ops[250..] {
        log.append(r_.seq, &encode_record(r_)).expect("append");
    }
    drop(r);
    let mut r = s.replica();
    assert_eq!(r.applied_seq(), 250);
    assert_eq!(drain(&mut log, &mut r).expect("drain"), 400);
    assert_eq!(drain(&mut log, &mut r).expect("nothing left"), 400);

    assert_eq!(listing(&s.root), listing(&primary));

    // A replica behind the start of the log cannot drain it: that needs a resync.
    let (behind_root, behind_state) = s.second("behind");
    let mut behind = Replica::open(&behind_root, &behind_state).expect("open");
    assert!(matches!(
        drain(&mut log, &mut behind),
        Err(ReplayError::Log(LogError::NotHeld { seq: 1, .. }))
    ));
}

#[test]
fn many_touched_files_fall_back_to_syncing_the_filesystem() {
    let s = Scratch::new();
    let mut r = s.replica();
    let n = MAX_DIRTY_FDS as u64 + 50;
    for seq in 1..=n {
        let op = Op::Write {
            path: rel(&format!("d{}/f{seq}", seq % 7)),
            offset: 0,
            data: vec![1; 10],
        };
        assert_eq!(r.apply(&rec(seq, op)).expect("write"), Applied::Done);
    }
    assert!(r.dirty_overflow);
    assert_eq!(r.commit().expect("commit"), n);
    assert!(!r.dirty_overflow && r.dirty.is_empty());
}

#[test]
fn forceful_removal_takes_whole_trees_but_stops_at_the_depth_limit() {
    let s = Scratch::new();
    let mut r = s.replica();
    let mut seq = 0;
    let mut next = |op| {
        seq += 1;
        rec(seq, op)
    };
    let setup = [
        next(Op::Write {
            path: rel("t/a/b/c/f"),
            offset: 0,
            data: b"x".to_vec(),
        }),
        next(Op::Symlink {
            target: s.outside.as_os_str().as_encoded_bytes().to_vec(),
            path: rel("t/a/out"),
        }),
        next(Op::Mkdir {
            path: rel("t/e"),
            mode: 0o755,
        }),
    ];
    apply_seq(&mut r, &setup);
    let before = snapshot_outside(&s.outside);
    assert_eq!(
        r.apply(&next(Op::Unlink { path: rel("t") }))
            .expect("unlink"),
        Applied::Done
    );
    assert!(!s.root.join("t").exists());
    assert_eq!(snapshot_outside(&s.outside), before);

    let deep = vec!["d"; MAX_REMOVE_DEPTH + 2].join("/");
    apply_seq(
        &mut r,
        &[next(Op::Mkdir {
            path: rel(&deep),
            mode: 0o755,
        })],
    );
    let removed = r.apply(&next(Op::Rmdir { path: rel("d") })).expect("rmdir");
    assert!(matches!(removed, Applied::Conflict { .. }), "{removed:?}");
    // A file at the path of an rmdir goes too.
    apply_seq(
        &mut r,
        &[next(Op::Create {
            path: rel("plain"),
            mode: 0o644,
        })],
    );
    assert_eq!(
        r.apply(&next(Op::Rmdir { path: rel("plain") }))
            .expect("rmdir"),
        Applied::Done
    );
    assert!(!s.root.join("plain").exists());
}

#[test]
fn a_second_replica_on_the_same_state_is_refused_and_a_bad_state_file_is_an_error() {
    let s = Scratch::new();
    let r = s.replica();
    assert!(matches!(
        Replica::open(&s.root, &s.state),
        Err(ReplayError::Locked { .. })
    ));
    drop(r);
    fs::write(s.state.join(APPLIED_FILE), b"garbage").expect("write");
    assert!(matches!(
        Replica::open(&s.root, &s.state),
        Err(ReplayError::State { .. })
    ));
}

const CHILD_ENV: &str = "REPL_REPLAY_CRASH_CHILD";

/// The child of `kill9_...`: applies the log from its applied seq on, committing every few
/// records, until it is killed (or done).
#[test]
#[ignore = "runs only as the child process of kill9_while_applying_and_committing"]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\n').collect();
    let [log_dir, root, state, every] = parts[..] else {
        panic!("bad child spec {spec:?}");
    };
    let every: u64 = every.parse().expect("commit interval");
    let mut r = Replica::open(Path::new(root), Path::new(state)).expect("open replica");
    let reader = SegmentReader::open(Path::new(log_dir), r.applied_seq() + 1).expect("reader");
    let mut n = 0u64;
    for item in reader {
        let (seq, payload) = item.expect("record");
        match r.apply_encoded(seq, &payload) {
            Ok(_) => {}
            Err(e) if e.consumed() => {}
            Err(e) => panic!("apply {seq}: {e}"),
        }
        n += 1;
        if n.is_multiple_of(every) {
            r.commit().expect("commit");
        }
    }
    r.commit().expect("commit");
}

#[test]
fn kill9_while_applying_and_committing_then_reopen_and_drain_gives_the_same_tree() {
    let seed = testkit::seed("kill9");
    let mut rng = Rng(seed);
    let s = Scratch::new();
    let before = snapshot_outside(&s.outside);
    let primary = s.base.join("primary");
    let ops = testkit::primary_ops(
        &mut rng,
        2500,
        Mix::All,
        &Primary::new(&primary),
        &s.outside,
    );
    let log_dir = s.base.join("log");
    let (mut log, _) = SegmentLog::open(&log_dir, SegmentOptions::default()).expect("log");
    for r_ in &ops {
        log.append(r_.seq, &encode_record(r_)).expect("append");
    }
    log.sync().expect("sync");

    let want = listing(&primary);

    let exe = std::env::current_exe().expect("test binary");
    let mut killed = 0;
    let mut progress = Vec::new();
    for _ in 0..15 {
        let spec = format!(
            "{}\n{}\n{}\n{}",
            log_dir.display(),
            s.root.display(),
            s.state.display(),
            1 + rng.below(20)
        );
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "replay::tests::crash_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, spec)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn child");
        std::thread::sleep(Duration::from_millis(20 + rng.below(150)));
        match child.try_wait().expect("poll child") {
            Some(status) => {
                assert!(status.success(), "seed {seed}: child failed: {status}");
                break;
            }
            None => {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                killed += 1;
                progress.push(s.replica().committed_seq());
            }
        }
    }
    progress.dedup();
    let midway = progress
        .iter()
        .filter(|&&p| p > 0 && p < ops.len() as u64)
        .count();
    assert!(
        midway >= 2,
        "seed {seed}: kills did not land in the middle: {progress:?}"
    );
    let mut r = s.replica();
    assert_eq!(
        drain(&mut log, &mut r).expect("drain"),
        ops.len() as u64,
        "seed {seed}"
    );
    assert_eq!(listing(&s.root), want, "seed {seed}: {killed} kills");
    assert_eq!(snapshot_outside(&s.outside), before);
    eprintln!(
        "kill9: {killed} kills, committed seq after each: {progress:?}, last drain: {:?}",
        r.stats()
    );
}
