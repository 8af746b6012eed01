//! Test helpers shared by the segment, replay and manifest tests: a seeded generator, random
//! operations over a small set of colliding paths, and a tree listing to compare replicas.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::{ParentDir, file_name, kind_of, open_beneath};
use crate::manifest::{self, Kind};
use crate::{Op, OpRecord, RelPath};

/// A small deterministic generator (SplitMix64), so that failures reproduce from the seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).expect("below n fits in usize")
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

/// A seed from `REPL_TEST_SEED` or the clock, printed so that a failure can be replayed.
pub(crate) fn seed(test: &str) -> u64 {
    let seed = std::env::var("REPL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| {
                    u64::try_from(d.as_nanos() % u128::from(u64::MAX)).unwrap_or(1)
                })
        });
    eprintln!("{test}: REPL_TEST_SEED={seed}");
    seed
}

pub(crate) fn rel(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("valid test path")
}

pub(crate) fn rec(seq: u64, op: Op) -> OpRecord {
    OpRecord { seq, op }
}

/// Which operations a random sequence may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mix {
    /// Only operations confined to their own path (no rename, no link).
    PathLocal,
    /// Every kind.
    All,
}

const NAMES: [&str; 3] = ["a", "b", "c"];
/// Modes with group and other write bits too, so that a umask applied by mistake shows.
const MODES: [u32; 7] = [0o600, 0o644, 0o640, 0o700, 0o755, 0o664, 0o777];

/// A random path of depth 1 to 3 over three names: paths collide a lot, as files, directories
/// and symlinks, which is the point.
pub(crate) fn random_path(rng: &mut Rng) -> RelPath {
    let depth = 1 + rng.index(3);
    let parts: Vec<&str> = (0..depth).map(|_| *rng.pick(&NAMES)).collect();
    rel(&parts.join("/"))
}

/// A random operation; symlink targets point inside the root, nowhere, or at `outside`.
pub(crate) fn random_op(rng: &mut Rng, mix: Mix, outside: &Path) -> Op {
    let path = random_path(rng);
    let kinds = match mix {
        Mix::PathLocal => 10,
        Mix::All => 12,
    };
    match rng.below(kinds) {
        0 => Op::Create {
            path,
            mode: *rng.pick(&MODES),
        },
        1 | 2 => {
            let len = rng.index(64);
            Op::Write {
                path,
                offset: rng.below(128),
                data: rng.bytes(len),
            }
        }
        3 => Op::Truncate {
            path,
            len: rng.below(200),
        },
        4 => Op::Unlink { path },
        5 => Op::Mkdir {
            path,
            mode: *rng.pick(&MODES),
        },
        6 => Op::Rmdir { path },
        7 => {
            if rng.below(2) == 0 {
                Op::Chmod {
                    path,
                    mode: *rng.pick(&MODES),
                }
            } else {
                Op::SetTimes {
                    path,
                    atime_ns: Some(i64::try_from(rng.below(1 << 62)).expect("fits")),
                    mtime_ns: None,
                }
            }
        }
        8 => {
            let outside_file = outside.join("secret");
            let targets: [&[u8]; 5] = [
                b"a",
                b"../b",
                b"c/a",
                b"nowhere",
                outside_file.as_os_str().as_encoded_bytes(),
            ];
            Op::Symlink {
                target: rng.pick(&targets).to_vec(),
                path,
            }
        }
        9 => Op::Fsync { path },
        10 => Op::Rename {
            from: random_path(rng),
            to: path,
        },
        _ => Op::Link {
            from: random_path(rng),
            to: path,
        },
    }
}

/// A primary tree that performs operations with the real system calls, the way an application
/// would (paths resolved without symlinks, as the sources canonicalize them), so that a random
/// stream can be limited to what a primary can actually produce.
#[derive(Debug)]
pub(crate) struct Primary {
    root: OwnedFd,
}

impl Primary {
    pub(crate) fn new(root: &Path) -> Primary {
        std::fs::create_dir_all(root).expect("create primary root");
        let root = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open primary root");
        Primary { root }
    }

    fn parent(&self, path: &RelPath) -> Option<ParentDir> {
        match path.parent() {
            None => Some(ParentDir::Root),
            Some(p) => open_beneath(
                self.root.as_fd(),
                p.as_path(),
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .ok()
            .map(ParentDir::Dir),
        }
    }

    fn open_regular(&self, path: &RelPath, flags: OFlags) -> Option<OwnedFd> {
        let parent = self.parent(path)?;
        let fd = open_beneath(
            parent.fd(self.root.as_fd()),
            file_name(path),
            flags,
            Mode::empty(),
        )
        .ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        (kind_of(&st) == FileType::RegularFile || kind_of(&st) == FileType::Directory).then_some(fd)
    }

    /// Performs `op`; `true` when it succeeded (and so would have been recorded).
    pub(crate) fn perform(&self, op: &Op) -> bool {
        let root = self.root.as_fd();
        let mode = |bits: u32| Mode::from_raw_mode(bits);
        match op {
            Op::Create { path, mode: bits } => {
                let Some(p) = self.parent(path) else {
                    return false;
                };
                let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NONBLOCK;
                match open_beneath(p.fd(root), file_name(path), flags, mode(*bits)) {
                    Ok(fd) => rustix::fs::fchmod(&fd, mode(*bits)).is_ok(),
                    Err(rustix::io::Errno::EXIST) => self
                        .open_regular(path, OFlags::WRONLY | OFlags::NONBLOCK)
                        .is_some(),
                    Err(_) => false,
                }
            }
            Op::Write { path, offset, data } => {
                let Some(fd) = self.open_regular(path, OFlags::WRONLY | OFlags::NONBLOCK) else {
                    return false;
                };
                rustix::io::pwrite(&fd, data, *offset).is_ok_and(|n| n == data.len())
            }
            Op::Truncate { path, len } => self
                .open_regular(path, OFlags::WRONLY | OFlags::NONBLOCK)
                .is_some_and(|fd| rustix::fs::ftruncate(&fd, *len).is_ok()),
            Op::Unlink { path } | Op::Rmdir { path } => {
                let Some(p) = self.parent(path) else {
                    return false;
                };
                let flags = if matches!(op, Op::Rmdir { .. }) {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                rustix::fs::unlinkat(p.fd(root), file_name(path), flags).is_ok()
            }
            Op::Mkdir { path, mode: bits } => {
                let Some(p) = self.parent(path) else {
                    return false;
                };
                let name = file_name(path);
                rustix::fs::mkdirat(p.fd(root), name, mode(*bits)).is_ok()
                    && rustix::fs::chmodat(p.fd(root), name, mode(*bits), AtFlags::empty()).is_ok()
            }
            Op::Chmod { path, mode: bits } => self
                .open_regular(path, OFlags::RDONLY | OFlags::NONBLOCK)
                .is_some_and(|fd| rustix::fs::fchmod(&fd, mode(*bits)).is_ok()),
            Op::SetTimes { path, .. } | Op::Fsync { path } => self
                .open_regular(path, OFlags::RDONLY | OFlags::NONBLOCK)
                .is_some(),
            Op::Symlink { target, path } => {
                let Some(p) = self.parent(path) else {
                    return false;
                };
                let target = std::ffi::OsStr::from_bytes(target);
                rustix::fs::symlinkat(target, p.fd(root), file_name(path)).is_ok()
            }
            Op::Rename { from, to } | Op::Link { from, to } => {
                let (Some(pf), Some(pt)) = (self.parent(from), self.parent(to)) else {
                    return false;
                };
                let (a, b) = (file_name(from), file_name(to));
                if matches!(op, Op::Rename { .. }) {
                    rustix::fs::renameat(pf.fd(root), a, pt.fd(root), b).is_ok()
                } else {
                    rustix::fs::linkat(pf.fd(root), a, pt.fd(root), b, AtFlags::empty()).is_ok()
                }
            }
        }
    }
}

/// `n` random operations that succeeded on `primary` (performed there as they are generated),
/// numbered from 1: a stream a real primary could have sent.
pub(crate) fn primary_ops(
    rng: &mut Rng,
    n: usize,
    mix: Mix,
    primary: &Primary,
    outside: &Path,
) -> Vec<OpRecord> {
    let mut ops = Vec::with_capacity(n);
    while ops.len() < n {
        let op = random_op(rng, mix, outside);
        if primary.perform(&op) {
            ops.push(rec(ops.len() as u64 + 1, op));
        }
    }
    ops
}

/// The tree beneath `root` as sorted lines (path, kind, mode, size, content hash), times left
/// out: equal listings mean equal trees.
pub(crate) fn listing(root: &Path) -> Vec<String> {
    let m = manifest::scan(root).expect("scan");
    assert!(m.problems.is_empty(), "scan problems: {:?}", m.problems);
    m.entries
        .iter()
        .map(|(p, e)| {
            let kind = match e.kind {
                Kind::File => "file",
                Kind::Dir => "dir",
                Kind::Symlink => "symlink",
                Kind::Other => "other",
            };
            format!("{p} {kind} {:o} {} {:016x}", e.mode, e.size, e.hash)
        })
        .collect()
}

/// Files, modes and mtimes of a directory outside the replica, to prove it was not touched.
pub(crate) fn snapshot_outside(dir: &Path) -> Vec<(String, Vec<u8>, u32, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .expect("list outside")
        .map(|e| {
            let path = e.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let content = if meta.is_file() {
                std::fs::read(&path).expect("read")
            } else {
                Vec::new()
            };
            (
                path.display().to_string(),
                content,
                meta.mode(),
                meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
            )
        })
        .collect();
    out.sort();
    let meta = std::fs::metadata(dir).expect("stat outside");
    out.push((
        "<dir>".to_owned(),
        Vec::new(),
        meta.mode(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
    ));
    out
}
