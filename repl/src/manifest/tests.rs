use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use super::*;
use crate::replay::testkit::{self, Rng, rel, snapshot_outside};
use crate::replay::{ReplayError, Replica};

fn write(root: &Path, path: &str, data: &[u8], mode: u32) {
    let p = root.join(path);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(&p, data).expect("write");
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Applies a resync to `replica_root` through the real replay path and returns how many ops.
fn resync(primary_root: &Path, replica_root: &Path, state: &Path) -> usize {
    let primary = scan(primary_root).expect("scan primary");
    let replica = scan(replica_root).expect("scan replica");
    let d = diff(&primary, &replica);
    let mut r = Replica::open(replica_root, state).expect("replica");
    let base = r.applied_seq();
    let mut n = 0u64;
    for op in ResyncOps::new(primary_root, &d).expect("plan") {
        n += 1;
        let op = op.expect("op");
        match r.apply(&OpRecord {
            seq: base + n,
            op: op.clone(),
        }) {
            Ok(_) => {}
            Err(ReplayError::Escape { .. }) => {}
            Err(e) => panic!("{op:?}: {e}"),
        }
    }
    r.commit().expect("commit");
    usize::try_from(n).expect("small")
}

use crate::OpRecord;

#[test]
fn scan_lists_every_entry_without_following_symlinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    write(&root, "a/b/file", b"contents", 0o640);
    write(&root, "top", b"", 0o600);
    symlink("/etc/passwd", root.join("a/abs")).expect("symlink");
    symlink("b", root.join("a/rel")).expect("symlink");
    fs::create_dir(root.join("emptydir")).expect("mkdir");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .expect("mkfifo");
    let m = scan(&root).expect("scan");
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    let paths: Vec<String> = m.entries.keys().map(ToString::to_string).collect();
    assert_eq!(
        paths,
        [
            "a", "a/abs", "a/b", "a/b/file", "a/rel", "emptydir", "fifo", "top"
        ]
    );
    let file = m.entries[&rel("a/b/file")];
    assert_eq!(
        (file.kind, file.mode, file.size, file.hash),
        (
            Kind::File,
            0o640,
            8,
            xxhash_rust::xxh3::xxh3_64(b"contents")
        )
    );
    let abs = m.entries[&rel("a/abs")];
    assert_eq!(
        (abs.kind, abs.size, abs.hash),
        (
            Kind::Symlink,
            11,
            xxhash_rust::xxh3::xxh3_64(b"/etc/passwd")
        )
    );
    assert_eq!(
        m.entries[&rel("a/rel")].kind,
        Kind::Symlink,
        "a symlink to a directory is not entered"
    );
    assert_eq!(m.entries[&rel("fifo")].kind, Kind::Other);
    assert_eq!(m.entries[&rel("a")].size, 0);
    assert!(matches!(
        scan(&dir.path().join("missing")),
        Err(ManifestError::Io { .. })
    ));
}

#[test]
fn entries_too_deep_for_a_relpath_are_reported_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    fs::create_dir(&root).expect("mkdir");
    // 20 levels of 250-byte names: deeper than a RelPath (4096 bytes) may be.
    let name = "n".repeat(250);
    let mut fd = rustix::fs::open(
        &root,
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("open");
    for _ in 0..20 {
        rustix::fs::mkdirat(&fd, name.as_str(), rustix::fs::Mode::from_raw_mode(0o755))
            .expect("mkdir");
        fd = rustix::fs::openat(
            &fd,
            name.as_str(),
            rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("open");
    }
    write(&root, "ok", b"fine", 0o644);
    let m = scan(&root).expect("scan");
    assert!(m.entries.contains_key(&rel("ok")));
    assert_eq!(m.problems.len(), 1, "{:?}", m.problems);
    assert!(m.problems[0].error.contains("4096"), "{:?}", m.problems);
}

#[test]
fn diff_names_what_to_remove_create_fetch_and_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, r) = (dir.path().join("p"), dir.path().join("r"));
    write(&p, "same", b"x", 0o644);
    write(&r, "same", b"x", 0o644);
    write(&p, "changed", b"new", 0o644);
    write(&r, "changed", b"old", 0o644);
    write(&p, "mode", b"m", 0o600);
    write(&r, "mode", b"m", 0o644);
    write(&p, "newdir/f", b"f", 0o644);
    write(&r, "extra/deep/f", b"e", 0o644);
    write(&p, "kind", b"now a file", 0o644);
    write(&r, "kind/inner", b"was a dir", 0o644);
    symlink("same", p.join("link")).expect("symlink");
    symlink("other", r.join("link")).expect("symlink");
    let same_time = fs::metadata(p.join("same"))
        .expect("stat")
        .modified()
        .expect("mtime");
    fs::File::options()
        .write(true)
        .open(r.join("same"))
        .expect("open")
        .set_modified(same_time)
        .expect("set mtime");
    let d = diff(&scan(&p).expect("scan"), &scan(&r).expect("scan"));
    let names = |v: &[RelPath]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let removed: Vec<RelPath> = d.remove.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(
        names(&removed),
        ["kind/inner", "kind", "extra/deep/f", "extra/deep", "extra"]
    );
    assert_eq!(d.remove[1].1, Kind::Dir);
    assert_eq!(d.mkdir, vec![(rel("newdir"), 0o755)]);
    assert_eq!(names(&d.fetch), ["changed", "kind", "link", "newdir/f"]);
    assert_eq!(d.chmod, vec![(rel("mode"), 0o600)]);
    assert!(d.settimes.iter().all(|(p, _)| p != &rel("same")));
    assert!(!d.is_empty());
}

#[test]
fn entry_ops_rebuild_a_file_in_chunks_and_a_symlink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("p");
    let big: Vec<u8> = (0..FETCH_CHUNK_BYTES * 2 + 10)
        .map(|i| u8::try_from(i % 251).expect("below 251"))
        .collect();
    write(&root, "d/big", &big, 0o640);
    symlink("../d/big", root.join("d/ln")).expect("symlink");
    let ops: Vec<Op> = entry_ops(&root, &rel("d/big"))
        .expect("ops")
        .collect::<Result<_, _>>()
        .expect("read");
    let kinds: Vec<&str> = ops.iter().map(Op::kind).collect();
    assert_eq!(
        kinds,
        [
            "create", "write", "write", "write", "truncate", "chmod", "settimes"
        ]
    );
    assert!(ops.iter().all(|op| op.data_len() <= FETCH_CHUNK_BYTES));
    assert!(matches!(ops[4], Op::Truncate { len, .. } if len == big.len() as u64));
    let ops: Vec<Op> = entry_ops(&root, &rel("d/ln"))
        .expect("ops")
        .collect::<Result<_, _>>()
        .expect("read");
    assert_eq!(
        ops,
        vec![
            Op::Unlink { path: rel("d/ln") },
            Op::Symlink {
                target: b"../d/big".to_vec(),
                path: rel("d/ln")
            }
        ]
    );
    assert!(matches!(
        entry_ops(&root, &rel("d")),
        Err(ManifestError::NotFetchable { .. })
    ));
    // A symlinked parent is not followed when fetching.
    symlink("d", root.join("alias")).expect("symlink");
    assert!(entry_ops(&root, &rel("alias/big")).is_err());
}

/// Builds a random tree under `root` with std::fs (independently of replay).
fn random_tree(rng: &mut Rng, root: &Path, outside: &Path, n: usize) {
    fs::create_dir_all(root).expect("mkdir root");
    for _ in 0..n {
        let path = testkit::random_path(rng);
        let full = root.join(path.as_path());
        let Some(parent) = full.parent() else {
            continue;
        };
        // std::fs follows symlinks: never create anything through one.
        let through_symlink = path.as_path().ancestors().skip(1).any(|a| {
            !a.as_os_str().is_empty()
                && fs::symlink_metadata(root.join(a)).is_ok_and(|m| m.file_type().is_symlink())
        });
        if through_symlink || fs::create_dir_all(parent).is_err() {
            continue; // a symlink or a file is in the way
        }
        if fs::symlink_metadata(&full).is_ok() {
            continue;
        }
        match rng.below(5) {
            0 => {
                let _ = fs::create_dir(&full);
            }
            1 => {
                let target = if rng.below(2) == 0 {
                    Path::new("a")
                } else {
                    outside
                };
                let _ = symlink(target, &full);
            }
            _ => {
                let len = rng.index(3000);
                if fs::write(&full, rng.bytes(len)).is_ok() {
                    let mode = *rng.pick(&[0o600, 0o644, 0o755]);
                    let _ = fs::set_permissions(&full, fs::Permissions::from_mode(mode));
                }
            }
        }
    }
}

#[test]
fn a_resync_of_random_trees_makes_the_replica_identical() {
    let seed = testkit::seed("manifest_resync");
    let mut rng = Rng(seed);
    for round in 0..25 {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::write(outside.join("secret"), b"x").expect("write");
        let before = snapshot_outside(&outside);
        let (p, r, state) = (
            dir.path().join("p"),
            dir.path().join("r"),
            dir.path().join("s"),
        );
        random_tree(&mut rng, &p, &outside, 30);
        fs::create_dir(&r).expect("mkdir replica");
        // The replica: sometimes a damaged copy of the primary, sometimes unrelated.
        if rng.below(2) == 0 {
            random_tree(&mut rng, &r, &outside, 30);
        } else {
            resync(&p, &r, &state);
            random_tree(&mut rng, &r, &outside, 10);
            for (path, _) in scan(&r)
                .expect("scan")
                .entries
                .iter()
                .filter(|_| rng.below(4) == 0)
            {
                let full = r.join(path.as_path());
                match fs::symlink_metadata(&full) {
                    Ok(m) if m.is_file() => {
                        let _ = fs::write(&full, b"damaged");
                    }
                    Ok(m) if m.is_dir() => {
                        let _ = fs::set_permissions(&full, fs::Permissions::from_mode(0o700));
                    }
                    _ => {}
                }
            }
        }
        let primary = scan(&p).expect("scan");
        resync(&p, &r, &state);
        let replica = scan(&r).expect("scan");
        let left = diff(&primary, &replica);
        assert!(
            left.is_empty(),
            "seed {seed} round {round}: still differs: {left:?}"
        );
        assert_eq!(
            primary.content_hash(),
            replica.content_hash(),
            "seed {seed} round {round}"
        );
        assert_eq!(
            resync(&p, &r, &state),
            0,
            "a second resync has nothing to do"
        );
        assert_eq!(snapshot_outside(&outside), before);
    }
}

#[test]
fn manifests_travel_as_messagepack() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a/b", b"data", 0o644);
    let m = scan(dir.path()).expect("scan");
    let bytes = rmp_serde::to_vec(&m).expect("encode");
    let back: Manifest = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(back, m);
    let d = diff(&m, &Manifest::default());
    let back: Diff =
        rmp_serde::from_slice(&rmp_serde::to_vec(&d).expect("encode")).expect("decode");
    assert_eq!(back, d);
}
