//! Copy mode on real directories: a primary tempdir is changed the way programs change files,
//! the emitted records are applied to a replica tempdir by a small applier (replay's rules:
//! removals of what is gone are done; a rename whose source is gone is done only after a
//! rescan), and both trees must end up identical (paths, kinds, modes, contents, file mtimes).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::{Op, RelPath};

const QUIET: Duration = Duration::from_millis(200);
/// How long a test waits for the replica to catch up (the machine may be busy).
const SETTLE: Duration = Duration::from_secs(30);
const BATCH: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Desc {
    File {
        mode: u32,
        data: Vec<u8>,
        mtime_ns: i64,
    },
    Dir {
        mode: u32,
    },
    Link {
        target: Vec<u8>,
    },
}

fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Desc> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Desc>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let rel = path
                .strip_prefix(root)
                .expect("beneath")
                .as_os_str()
                .as_bytes()
                .to_vec();
            let kind = meta.file_type();
            let desc = if kind.is_dir() {
                walk(root, &path, out);
                Desc::Dir {
                    mode: meta.mode() & 0o7777,
                }
            } else if kind.is_symlink() {
                Desc::Link {
                    target: fs::read_link(&path)
                        .map(|t| t.as_os_str().as_bytes().to_vec())
                        .unwrap_or_default(),
                }
            } else if kind.is_file() {
                Desc::File {
                    mode: meta.mode() & 0o7777,
                    data: fs::read(&path).unwrap_or_default(),
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                }
            } else {
                continue;
            };
            out.insert(rel, desc);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// One line per entry: path, kind, mode, size and a hash of the content (never the content:
/// a failure must stay readable with large files).
fn describe(rel: &[u8], desc: Option<&Desc>) -> String {
    let path = String::from_utf8_lossy(rel);
    match desc {
        None => format!("{path:?}: absent"),
        Some(Desc::Dir { mode }) => format!("{path:?}: dir {mode:o}"),
        Some(Desc::Link { target }) => {
            format!("{path:?}: symlink -> {:?}", String::from_utf8_lossy(target))
        }
        Some(Desc::File {
            mode,
            data,
            mtime_ns,
        }) => format!(
            "{path:?}: file {mode:o} {} bytes xxh3 {:016x} mtime {mtime_ns}",
            data.len(),
            xxhash_rust::xxh3::xxh3_64(data)
        ),
    }
}

/// The differences between two trees first, then both trees, one entry per line.
fn report(primary: &BTreeMap<Vec<u8>, Desc>, replica: &BTreeMap<Vec<u8>, Desc>) -> String {
    let mut out = String::from("differences (primary | replica):\n");
    let paths: std::collections::BTreeSet<&Vec<u8>> =
        primary.keys().chain(replica.keys()).collect();
    for p in paths {
        let (a, b) = (primary.get(p), replica.get(p));
        if a != b {
            out += &format!("  {} | {}\n", describe(p, a), describe(p, b));
        }
    }
    for (name, tree) in [("primary", primary), ("replica", replica)] {
        out += &format!("{name} ({} entries):\n", tree.len());
        for (p, d) in tree {
            out += &format!("  {}\n", describe(p, Some(d)));
        }
    }
    out
}

/// `snapshot` without the paths `exclude` excludes.
fn snapshot_without(root: &Path, exclude: &Exclude) -> BTreeMap<Vec<u8>, Desc> {
    let mut snap = snapshot(root);
    snap.retain(|k, _| !exclude.excludes(k));
    snap
}

/// What the manifest resync does after a rescan: the replica becomes a copy of the primary
/// (excluded paths left out).
fn mirror(src: &Path, dst: &Path, exclude: &Exclude) {
    for entry in fs::read_dir(dst).expect("replica readable").flatten() {
        let p = entry.path();
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&p).expect("clear replica");
        } else {
            fs::remove_file(&p).expect("clear replica");
        }
    }
    let snap = snapshot_without(src, exclude);
    for (rel, desc) in snap {
        let at = dst.join(OsStr::from_bytes(&rel));
        match desc {
            Desc::Dir { mode } => {
                fs::create_dir_all(&at).expect("mkdir");
                fs::set_permissions(&at, fs::Permissions::from_mode(mode)).expect("chmod");
            }
            Desc::Link { target } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &at).expect("symlink")
            }
            Desc::File {
                mode,
                data,
                mtime_ns,
            } => {
                fs::write(&at, data).expect("write");
                fs::set_permissions(&at, fs::Permissions::from_mode(mode)).expect("chmod");
                set_mtime(&at, mtime_ns);
            }
        }
    }
}

fn set_mtime(at: &Path, ns: i64) {
    let ns = u64::try_from(ns).expect("after 1970");
    let when = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns);
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(at)
        .expect("open for times");
    f.set_times(fs::FileTimes::new().set_modified(when))
        .expect("set mtime");
}

/// Applies one op beneath `root` as replay would (strictly, except where noted).
fn apply(root: &Path, op: &Op, after_rescan: bool) -> Result<(), String> {
    let at = |p: &RelPath| root.join(p.as_path());
    let fail = |e: std::io::Error| format!("{op:?}: {e}");
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    match op {
        Op::Create { path, mode } => {
            // O_NOFOLLOW: the stream must have removed a symlink before creating a file there.
            OpenOptions::new()
                .write(true)
                .create(true)
                .mode(*mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(at(path))
                .map_err(fail)?;
        }
        Op::Write { path, offset, data } => {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(at(path))
                .map_err(fail)?;
            f.write_all_at(data, *offset).map_err(fail)?;
        }
        Op::Truncate { path, len } => {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(at(path))
                .map_err(fail)?;
            f.set_len(*len).map_err(fail)?;
        }
        Op::Chmod { path, mode } => {
            fs::set_permissions(at(path), fs::Permissions::from_mode(*mode)).map_err(fail)?
        }
        Op::SetTimes { path, mtime_ns, .. } => {
            if let Some(ns) = mtime_ns {
                set_mtime(&at(path), *ns);
            }
        }
        Op::Mkdir { path, mode } => match fs::DirBuilder::new().mode(*mode).create(at(path)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && at(path).is_dir() => {}
            Err(e) => return Err(fail(e)),
        },
        Op::Rmdir { path } => match fs::remove_dir(at(path)) {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e) => return Err(fail(e)),
        },
        Op::Unlink { path } => match fs::remove_file(at(path)) {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e) => return Err(fail(e)),
        },
        Op::Symlink { target, path } => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), at(path)).map_err(fail)?
        }
        Op::Rename { from, to } => match fs::rename(at(from), at(to)) {
            Ok(()) => {}
            Err(e) if gone(&e) && after_rescan && fs::symlink_metadata(at(to)).is_ok() => {}
            Err(e) => return Err(fail(e)),
        },
        Op::Link { .. } | Op::Fsync { .. } => return Err(format!("{op:?}: not expected")),
    }
    Ok(())
}

/// A primary watched by copy mode and a replica fed by its output.
struct Harness {
    primary: tempfile::TempDir,
    replica: tempfile::TempDir,
    source: Option<CopySource>,
    rx: mpsc::Receiver<CopyOutput>,
    rt: tokio::runtime::Runtime,
    next_seq: u64,
    rescans: usize,
    /// Every record received, with the time it arrived.
    log: Vec<(Instant, OpRecord)>,
    /// Copy mode's exclude list: the replica is compared with the primary without them.
    exclude: Exclude,
}

impl Harness {
    fn new(cfg: CopyConfig) -> Self {
        Self::with_primary(tempfile::tempdir().expect("tempdir"), cfg)
    }

    fn with_primary(primary: tempfile::TempDir, cfg: CopyConfig) -> Self {
        let replica = tempfile::tempdir().expect("tempdir");
        let exclude = cfg.exclude.clone();
        mirror(primary.path(), replica.path(), &exclude);
        let first = cfg.first_seq;
        let (source, rx) = CopySource::start_with(primary.path(), cfg).expect("copy mode starts");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        Self {
            primary,
            replica,
            source: Some(source),
            rx,
            rt,
            next_seq: first,
            rescans: 0,
            log: Vec::new(),
            exclude,
        }
    }

    /// The primary as the replica must hold it.
    fn primary_snapshot(&self) -> BTreeMap<Vec<u8>, Desc> {
        snapshot_without(self.primary.path(), &self.exclude)
    }

    fn p(&self, rel: &str) -> std::path::PathBuf {
        self.primary.path().join(rel)
    }

    fn recv(&mut self, wait: Duration) -> Option<CopyOutput> {
        let rx = &mut self.rx;
        self.rt
            .block_on(async { tokio::time::timeout(wait, rx.recv()).await.ok().flatten() })
    }

    fn take(&mut self, out: CopyOutput) {
        match out {
            CopyOutput::Records(recs) => {
                assert!(!recs.is_empty(), "empty batches are not sent");
                let now = Instant::now();
                for rec in recs {
                    assert_eq!(rec.seq, self.next_seq, "seqs are dense");
                    self.next_seq += 1;
                    assert!(
                        !names_excluded(&rec.op, &self.exclude),
                        "record {} names an excluded path: {:?}",
                        rec.seq,
                        rec.op
                    );
                    if let Err(e) = apply(self.replica.path(), &rec.op, self.rescans > 0) {
                        panic!("the replica refused record {}: {e}", rec.seq);
                    }
                    self.log.push((now, rec));
                }
            }
            CopyOutput::Rescan { next_seq } => {
                assert_eq!(next_seq, self.next_seq, "a rescan names the next seq");
                self.rescans += 1;
                mirror(self.primary.path(), self.replica.path(), &self.exclude);
            }
        }
    }

    fn same(&self) -> bool {
        self.primary_snapshot() == snapshot(self.replica.path())
    }

    /// Applies output until the replica equals the primary, then for a while longer (late
    /// output must not break it); returns when it first became equal.
    fn settle(&mut self) -> Instant {
        let deadline = Instant::now() + SETTLE;
        let equal_at = loop {
            if let Some(out) = self.recv(Duration::from_millis(20)) {
                self.take(out);
                continue;
            }
            if self.same() {
                break Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not catch up ({} rescans); {}",
                self.rescans,
                report(&self.primary_snapshot(), &snapshot(self.replica.path()))
            );
        };
        let linger = Instant::now() + QUIET * 2 + EVENT_GRACE * 2;
        while Instant::now() < linger {
            if let Some(out) = self.recv(Duration::from_millis(20)) {
                self.take(out);
            }
        }
        let (primary, replica) = (self.primary_snapshot(), snapshot(self.replica.path()));
        assert!(
            primary == replica,
            "the replica changed after it had caught up; {}",
            report(&primary, &replica)
        );
        equal_at
    }

    fn ops_since(&self, n: usize) -> Vec<&Op> {
        self.log[n..].iter().map(|(_, r)| &r.op).collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Stop watching before the tempdirs go.
        self.source.take();
    }
}

/// Whether `op` names (changes, or renames from) an excluded path.
fn names_excluded(op: &Op, exclude: &Exclude) -> bool {
    let from = match op {
        Op::Rename { from, .. } | Op::Link { from, .. } => Some(from.as_bytes()),
        _ => None,
    };
    from.into_iter()
        .chain([op.path().as_bytes()])
        .any(|p| exclude.excludes(p))
}

fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).expect("write");
}

fn append(path: &Path, data: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(data).expect("append");
}

#[test]
fn copy_files_created_modified_appended_truncated_and_chmodded() {
    let mut h = Harness::new(CopyConfig::new(QUIET, BATCH));
    write(&h.p("a"), b"hello");
    write(&h.p("b"), &vec![7u8; 3 * COPY_CHUNK_BYTES + 17]);
    write(&h.p("empty"), b"");
    h.settle();
    write(&h.p("a"), b"HELLO, again");
    append(&h.p("b"), b"tail");
    OpenOptions::new()
        .write(true)
        .open(h.p("empty"))
        .and_then(|f| f.set_len(4096))
        .expect("extend");
    fs::set_permissions(h.p("a"), fs::Permissions::from_mode(0o640)).expect("chmod");
    h.settle();
    OpenOptions::new()
        .write(true)
        .open(h.p("b"))
        .and_then(|f| f.set_len(10))
        .expect("truncate");
    fs::set_permissions(h.p("empty"), fs::Permissions::from_mode(0o4755)).expect("chmod");
    h.settle();
    let max_write = h
        .log
        .iter()
        .filter_map(|(_, r)| match &r.op {
            Op::Write { data, .. } => Some(data.len()),
            _ => None,
        })
        .max();
    assert_eq!(max_write, Some(COPY_CHUNK_BYTES));
}

#[test]
fn copy_directory_trees_are_created_and_deleted() {
    let mut h = Harness::new(CopyConfig::new(QUIET, BATCH));
    // mkdir -p with files at every level, written at once (before notify watches the new
    // directories).
    let deep = h.p("t/u/v/w/x");
    fs::create_dir_all(&deep).expect("mkdir -p");
    for (i, d) in ["t", "t/u", "t/u/v", "t/u/v/w", "t/u/v/w/x"]
        .iter()
        .enumerate()
    {
        write(&h.p(&format!("{d}/f{i}")), d.as_bytes());
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(h.p("t/private"))
        .expect("mkdir");
    fs::set_permissions(h.p("t/private"), fs::Permissions::from_mode(0o700)).expect("chmod");
    h.settle();
    fs::remove_file(h.p("t/u/v/f2")).expect("rm");
    fs::remove_dir_all(h.p("t/u/v/w")).expect("rm -r");
    h.settle();
    let n = h.log.len();
    fs::remove_dir_all(h.p("t")).expect("rm -r");
    h.settle();
    let ops = h.ops_since(n);
    assert!(
        ops.iter()
            .all(|op| matches!(op, Op::Unlink { .. } | Op::Rmdir { .. })),
        "a deletion is only removals: {ops:?}"
    );
    assert_eq!(ops.last().map(|op| op.path()), Some(&rel("t")));
}

fn rel(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("valid")
}

#[test]
fn copy_renames_inside_the_tree_move_entries_on_the_replica() {
    let mut h = Harness::new(CopyConfig::new(QUIET, BATCH));
    fs::create_dir_all(h.p("d/sub")).expect("mkdir");
    write(&h.p("d/sub/big"), &vec![1u8; 2 * COPY_CHUNK_BYTES]);
    write(&h.p("f"), b"file");
    write(&h.p("over"), b"to be replaced");
    h.settle();
    let n = h.log.len();
    fs::rename(h.p("d"), h.p("e")).expect("rename dir");
    fs::rename(h.p("f"), h.p("over")).expect("rename over");
    fs::create_dir(h.p("new")).expect("mkdir");
    fs::rename(h.p("e/sub"), h.p("new/sub")).expect("rename into a new directory");
    h.settle();
    let ops = h.ops_since(n);
    assert!(
        !ops.iter().any(|op| matches!(op, Op::Write { .. })),
        "renamed files are not copied again: {ops:?}"
    );
    assert!(ops.contains(&&Op::Rename {
        from: rel("d"),
        to: rel("e")
    }));
    // A freshly written file renamed into place (how editors save).
    write(&h.p(".save.tmp"), b"saved content");
    fs::rename(h.p(".save.tmp"), h.p("over")).expect("save");
    // And a fresh directory renamed before it was copied.
    fs::create_dir(h.p("fresh")).expect("mkdir");
    write(&h.p("fresh/inner"), b"inner");
    fs::rename(h.p("fresh"), h.p("renamed_fresh")).expect("rename");
    h.settle();
}

/// The renames of the run that once failed under load (`mv d e; mkdir new; mv e/sub
/// new/sub`), with the second rename at varying distances from the first, so that it lands
/// before, while and after the watch thread handles the first: the replica must end equal
/// each time, without a rescan (every rename happened inside the tree and was seen).
#[test]
fn copy_rename_out_of_a_just_renamed_directory_leaves_nothing_behind() {
    const ROUNDS: u32 = 8;
    const STEP: Duration = Duration::from_micros(150);
    let mut h = Harness::new(CopyConfig::new(QUIET, BATCH));
    for round in 0..ROUNDS {
        let (d, e, new) = (
            format!("d{round}"),
            format!("e{round}"),
            format!("new{round}"),
        );
        fs::create_dir_all(h.p(&format!("{d}/sub/deeper"))).expect("mkdir");
        write(&h.p(&format!("{d}/sub/deeper/f")), b"x");
        h.settle();
        fs::rename(h.p(&d), h.p(&e)).expect("rename dir");
        let spin = Instant::now();
        while spin.elapsed() < STEP * round {
            std::hint::spin_loop();
        }
        fs::create_dir(h.p(&new)).expect("mkdir");
        fs::rename(h.p(&format!("{e}/sub")), h.p(&format!("{new}/sub"))).expect("rename");
        write(
            &h.p(&format!("{new}/sub/deeper/g")),
            b"written after the renames",
        );
        h.settle();
    }
    assert_eq!(h.rescans, 0);
}

#[test]
fn copy_symlinks_are_replicated_without_being_followed() {
    let outside = tempfile::tempdir().expect("tempdir");
    write(&outside.path().join("secret"), b"outside the tree");
    let mut h = Harness::new(CopyConfig::new(QUIET, BATCH));
    fs::create_dir(h.p("d")).expect("mkdir");
    std::os::unix::fs::symlink("d", h.p("to_dir")).expect("symlink");
    std::os::unix::fs::symlink(outside.path(), h.p("escape")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent/\u{e9}", h.p("dangling")).expect("symlink");
    h.settle();
    // Writes through a symlink to a directory outside are not beneath the root.
    write(&outside.path().join("new"), b"not replicated");
    fs::remove_file(h.p("to_dir")).expect("rm");
    std::os::unix::fs::symlink("elsewhere", h.p("to_dir")).expect("retarget");
    h.settle();
    assert!(
        !h.log
            .iter()
            .any(|(_, r)| r.op.path().as_bytes().starts_with(b"escape/")),
        "nothing is copied through a symlink"
    );
}

#[test]
fn copy_waits_for_a_continuously_written_file_to_be_quiet() {
    for max_delay in [None, Some(QUIET + QUIET / 2)] {
        let mut cfg = CopyConfig::new(QUIET, BATCH);
        cfg.max_delay = max_delay;
        let mut h = Harness::new(cfg);
        let busy = h.p("busy.log");
        write(&busy, b"");
        h.settle();
        let n = h.log.len();
        let started = Instant::now();
        let writer = {
            let busy = busy.clone();
            std::thread::spawn(move || {
                while started.elapsed() < QUIET * 10 {
                    append(&busy, b"a line of log\n");
                    std::thread::sleep(QUIET / 20);
                }
                Instant::now()
            })
        };
        // Collect while the writer runs.
        let mut outs = Vec::new();
        while !writer.is_finished() {
            if let Some(out) = h.recv(Duration::from_millis(10)) {
                outs.push((Instant::now(), out));
            }
        }
        let stopped = writer.join().expect("writer");
        let copied_while_busy = outs.iter().any(|(at, out)| {
            *at < stopped
                && matches!(out, CopyOutput::Records(r) if r.iter().any(|r| matches!(&r.op, Op::Write { .. })))
        });
        for (_, out) in outs {
            h.take(out);
        }
        match max_delay {
            None => assert!(!copied_while_busy, "copied before the file was quiet"),
            Some(_) => assert!(copied_while_busy, "the maximum delay forces a copy"),
        }
        h.settle();
        assert!(h.log.len() > n);
    }
}

#[test]
fn copy_a_thousand_files_created_at_once() {
    let mut h = Harness::new(CopyConfig::new(QUIET, BATCH));
    fs::create_dir(h.p("many")).expect("mkdir");
    h.settle();
    let start = Instant::now();
    for i in 0..1000 {
        write(
            &h.p(&format!("many/f{i:04}")),
            format!("file {i}\n").as_bytes(),
        );
    }
    let written = Instant::now();
    let equal = h.settle();
    eprintln!(
        "1,000 files: written in {:?}, replica identical {:?} after the last write",
        written - start,
        equal.saturating_duration_since(written)
    );
}

#[test]
fn copy_odd_names_are_replicated_byte_for_byte() {
    let mut h = Harness::new(CopyConfig::new(QUIET, BATCH));
    let names: [&[u8]; 5] = [
        b"new\nline",
        b"\xff\xfe not utf-8",
        b"-starts with dash",
        b" spaces ",
        b"tab\there",
    ];
    for name in names {
        let p = h.primary.path().join(OsStr::from_bytes(name));
        write(&p, name);
        let d = h
            .primary
            .path()
            .join(OsStr::from_bytes(&[b"dir ", name].concat()));
        fs::create_dir(&d).expect("mkdir");
        write(&d.join(OsStr::from_bytes(name)), b"inside");
    }
    h.settle();
    let first = h.primary.path().join(OsStr::from_bytes(names[0]));
    let second = h.primary.path().join(OsStr::from_bytes(names[1]));
    fs::rename(&first, &second).expect("rename odd names");
    h.settle();
}

#[test]
fn copy_renames_into_and_out_of_the_tree() {
    let outside = tempfile::tempdir().expect("tempdir");
    let mut h = Harness::new(CopyConfig::new(QUIET, BATCH));
    write(&h.p("keep"), b"keep");
    fs::create_dir(h.p("target")).expect("mkdir");
    h.settle();
    // In: a whole tree appears at once, over an empty directory.
    let src = outside.path().join("tree");
    fs::create_dir_all(src.join("a/b")).expect("mkdir");
    write(&src.join("a/b/f"), b"moved in");
    write(&src.join("top"), b"top");
    std::os::unix::fs::symlink("a/b/f", src.join("link")).expect("symlink");
    fs::rename(&src, h.p("target")).expect("move in");
    h.settle();
    assert_eq!(h.rescans, 0);
    // Out: the tree can only tell that something left; the backups are resynced.
    fs::rename(h.p("target"), outside.path().join("back")).expect("move out");
    h.settle();
    assert_eq!(h.rescans, 1);
    // The stream continues after the rescan.
    write(&h.p("after"), b"after the rescan");
    h.settle();
}

#[test]
fn copy_event_queue_overflow_causes_a_rescan_and_recovery() {
    let mut cfg = CopyConfig::new(Duration::from_millis(50), 1);
    cfg.event_queue = 8;
    let mut h = Harness::new(cfg);
    // The consumer does not read: the copy thread fills the output queue and waits, while the
    // tree keeps changing and the event queue overflows.
    for i in 0..20 {
        write(&h.p(&format!("pre{i}")), b"x");
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..300 {
        write(&h.p(&format!("burst{i}")), b"y");
    }
    h.settle();
    eprintln!("rescans {} records {}", h.rescans, h.log.len());
    assert!(h.rescans >= 1, "the lost events caused a rescan");
    write(&h.p("after"), b"z");
    fs::create_dir(h.p("newdir")).expect("mkdir");
    write(&h.p("newdir/f"), b"watched again");
    h.settle();
}

#[test]
fn copy_drop_stops_the_thread_even_when_the_consumer_is_stuck() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, rx) = CopySource::start(dir.path(), Duration::from_millis(10), 1).expect("start");
    for i in 0..50 {
        write(&dir.path().join(format!("f{i}")), b"data");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(source.is_running());
    let t = Instant::now();
    drop(source);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        t.elapsed()
    );
    drop(rx);

    // Dropping the receiver ends the thread too.
    let (source, rx) = CopySource::start(dir.path(), Duration::from_millis(10), 1).expect("start");
    drop(rx);
    write(&dir.path().join("poke"), b"poke");
    let deadline = Instant::now() + SETTLE;
    while source.is_running() {
        assert!(
            Instant::now() < deadline,
            "the thread outlived its receiver"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn copy_source_and_its_receiver_can_move_into_an_async_task() {
    fn send<T: Send + 'static>() {}
    send::<CopySource>();
    send::<mpsc::Receiver<CopyOutput>>();
    // Started and dropped from inside a runtime: nothing blocks on it or panics.
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let path = dir.path().to_owned();
    let got = rt.block_on(async move {
        let (source, mut rx) = CopySource::start(&path, Duration::from_millis(10), BATCH)
            .expect("start in an async context");
        write(&path.join("f"), b"x");
        let out = tokio::time::timeout(SETTLE, rx.recv()).await;
        drop(source);
        out
    });
    assert!(matches!(got, Ok(Some(CopyOutput::Records(_)))), "{got:?}");
}

#[test]
fn copy_start_refuses_bad_roots_and_configs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    write(&file, b"x");
    assert!(matches!(
        CopySource::start(&file, QUIET, BATCH),
        Err(CopyError::NotADirectory(_))
    ));
    assert!(matches!(
        CopySource::start(&dir.path().join("missing"), QUIET, BATCH),
        Err(CopyError::Root { .. })
    ));
    assert!(matches!(
        CopySource::start(dir.path(), QUIET, 0),
        Err(CopyError::Config(_))
    ));
    let mut cfg = CopyConfig::new(QUIET, BATCH);
    cfg.max_delay = Some(MAX_INTERVAL * 2);
    assert!(matches!(
        CopySource::start_with(dir.path(), cfg),
        Err(CopyError::Config(_))
    ));
}

/// Time from the last write of one file until its records arrive. Run with
/// `cargo test -p repl copy_latency -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn copy_latency_of_one_file() {
    for quiet in [
        Duration::from_millis(10),
        Duration::from_millis(100),
        Duration::from_secs(1),
    ] {
        let mut h = Harness::new(CopyConfig::new(quiet, BATCH));
        let mut samples = Vec::new();
        for i in 0..10 {
            let name = format!("f{i}");
            write(&h.p(&name), &vec![b'x'; 4096]);
            let written = Instant::now();
            let n = h.log.len();
            loop {
                let out = h.recv(SETTLE).expect("records arrive");
                h.take(out);
                if h.log[n..]
                    .iter()
                    .any(|(_, r)| matches!(&r.op, Op::SetTimes { path, .. } if *path == rel(&name)))
                {
                    break;
                }
            }
            samples.push(h.log.last().map(|(at, _)| *at - written).expect("logged"));
        }
        samples.sort();
        // 1,000 files written at once: until the last file's records arrived (received, not
        // applied, so that the measurement is copy mode's alone).
        for i in 0..1000 {
            write(&h.p(&format!("many{i:04}")), &vec![b'y'; 4096]);
        }
        let written = Instant::now();
        let mut copied = 0;
        while copied < 1000 {
            if let CopyOutput::Records(recs) = h.recv(SETTLE).expect("records arrive") {
                copied += recs
                    .iter()
                    .filter(|r| matches!(&r.op, Op::SetTimes { .. }))
                    .count();
            }
        }
        let many = written.elapsed();
        eprintln!("quiet {quiet:?}: 1,000 files -> last ops emitted {many:?} after the last write");
        eprintln!(
            "quiet {quiet:?}: last write -> ops emitted: min {:?}, median {:?}, max {:?}",
            samples[0],
            samples[samples.len() / 2],
            samples[samples.len() - 1]
        );
    }
}

#[test]
fn copy_failure_report_shows_the_difference_first_and_no_contents() {
    let big = Desc::File {
        mode: 0o644,
        data: vec![1u8; 2 * COPY_CHUNK_BYTES],
        mtime_ns: 7,
    };
    let primary = BTreeMap::from([(b"new/sub".to_vec(), Desc::Dir { mode: 0o755 })]);
    let mut replica = primary.clone();
    replica.insert(b"e/sub/big".to_vec(), big);
    let text = report(&primary, &replica);
    eprintln!("{text}");
    let first_diff = text.lines().nth(1).expect("a difference");
    assert!(
        first_diff.contains("\"e/sub/big\": absent | \"e/sub/big\": file 644 2097152 bytes xxh3")
    );
    assert!(text.len() < 1000, "contents are not printed");
}

// ----- exclude lists -----

fn excluding(quiet: Duration, patterns: &[&str]) -> CopyConfig {
    CopyConfig {
        exclude: Exclude::new(patterns).expect("valid patterns"),
        ..CopyConfig::new(quiet, BATCH)
    }
}

fn write_bytes(h: &Harness, n: usize) -> usize {
    h.ops_since(n)
        .iter()
        .map(|op| match op {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        })
        .sum()
}

/// Size of the image of the commit measurement.
const IMAGE_BYTES: usize = 20 << 20;
/// Chunks it is written in.
const IMAGE_CHUNKS: usize = 5;
/// The quiet interval of a checkpoint fileset (watchd's suggested one).
const CKPT_QUIET: Duration = Duration::from_millis(20);
/// Pause between two chunks: well past the quiet interval, as a store writing its image
/// between two phases of a checkpoint.
const CHUNK_GAP: Duration = Duration::from_millis(150);

/// Writes one image the way the checkpoint store commits it (`.tmp-<seq>-<pid>` written in
/// chunks with quiet gaps, fdatasync, renamed to `<seq:020>.ckpt`); returns the bytes of
/// `Write` records shipped until the replica had it, and the records naming the image.
fn commit_image(h: &mut Harness, seq: u64) -> (usize, usize) {
    let n = h.log.len();
    let temp = h.p(&format!(".tmp-{seq}-{}", std::process::id()));
    let chunk = vec![u8::try_from(seq % 251).expect("< 251"); IMAGE_BYTES / IMAGE_CHUNKS];
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&temp)
        .expect("create the temp image");
    for _ in 0..IMAGE_CHUNKS {
        (&f).write_all(&chunk).expect("write a chunk");
        let until = Instant::now() + CHUNK_GAP;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Some(out) = h.recv(left) {
                h.take(out);
            }
        }
    }
    f.sync_data().expect("fdatasync");
    drop(f);
    let image = format!("{seq:020}.ckpt");
    fs::rename(&temp, h.p(&image)).expect("commit");
    h.settle();
    let named = h
        .ops_since(n)
        .iter()
        .filter(|op| *op.path() == rel(&image))
        .count();
    (write_bytes(h, n), named)
}

/// The measurement of the report: bytes shipped for one 20 MiB image written in 5 chunks with
/// quiet gaps, without and with the checkpoint's exclude list. Without it the temp file is
/// copied at each gap (every prefix), then renamed; with it, the image is copied once.
#[test]
fn copy_checkpoint_commit_ships_each_image_once_with_the_temp_exclude() {
    let mut before = Harness::new(CopyConfig::new(CKPT_QUIET, BATCH));
    let (shipped_before, _) = commit_image(&mut before, 1);
    let mut after = Harness::new(excluding(CKPT_QUIET, &[".tmp-*"]));
    let (shipped_after, named) = commit_image(&mut after, 1);
    eprintln!(
        "one {} MiB image in {IMAGE_CHUNKS} chunks, {CHUNK_GAP:?} gaps, quiet {CKPT_QUIET:?}: \
         {shipped_before} bytes shipped without the exclude, {shipped_after} with it",
        IMAGE_BYTES >> 20
    );
    assert_eq!(shipped_after, IMAGE_BYTES, "the image, once");
    assert!(
        !after
            .log
            .iter()
            .any(|(_, r)| matches!(&r.op, Op::Rename { .. })),
        "no rename from a name the replica does not have"
    );
    assert!(named > 0);
    // Without it, at least one growing prefix went before the commit's rename.
    assert!(
        shipped_before > IMAGE_BYTES,
        "the temp file was shipped only once without the exclude ({shipped_before} bytes)"
    );
    assert_eq!(before.rescans + after.rescans, 0);
}

#[test]
fn copy_excluded_names_on_real_directories() {
    let primary = tempfile::tempdir().expect("tempdir");
    // Present at start: the initial resync (the harness's mirror) leaves them out.
    write(&primary.path().join(".tmp-0-1"), b"stale temp");
    fs::create_dir(primary.path().join("cache")).expect("mkdir");
    write(&primary.path().join("cache/x"), b"cached");
    let mut h = Harness::with_primary(primary, excluding(QUIET, &[".tmp-*", "cache", "*.swp"]));
    assert!(!h.replica.path().join(".tmp-0-1").exists());
    write(&h.p("kept"), b"kept");
    write(&h.p(".kept.swp"), b"swap");
    fs::create_dir(h.p("cache/sub")).expect("mkdir");
    write(&h.p("cache/sub/y"), b"y");
    fs::create_dir(h.p("d")).expect("mkdir");
    write(&h.p("d/.tmp-1-1"), b"in a new directory");
    write(&h.p("d/f"), b"f");
    h.settle();
    // Renamed to an excluded name: gone from the replica; back: copied again.
    fs::rename(h.p("kept"), h.p(".tmp-kept")).expect("rename away");
    h.settle();
    assert!(!h.replica.path().join("kept").exists());
    fs::rename(h.p(".tmp-kept"), h.p("kept")).expect("rename back");
    fs::remove_dir_all(h.p("cache")).expect("rm -r");
    fs::remove_file(h.p(".kept.swp")).expect("rm");
    h.settle();
    assert!(h.replica.path().join("kept").exists());
    assert_eq!(h.rescans, 0);
}

/// A manifest scan skipping excluded names (the resync's) neither reads nor lists them, nor
/// anything beneath an excluded directory.
#[test]
fn copy_resync_scan_skips_excluded_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ex = Exclude::new([".tmp-*", "cache"]).expect("valid");
    write(&dir.path().join(".tmp-1-2"), b"t");
    write(&dir.path().join("00000000000000000001.ckpt"), b"i");
    fs::create_dir_all(dir.path().join("cache/deep")).expect("mkdir");
    write(&dir.path().join("cache/deep/f"), b"c");
    fs::create_dir(dir.path().join("d")).expect("mkdir");
    write(&dir.path().join("d/.tmp-3-4"), b"t");
    let m = crate::manifest::scan_skipping(dir.path(), |n| ex.excludes_name(n)).expect("scan");
    let paths: Vec<String> = m.entries.keys().map(ToString::to_string).collect();
    assert_eq!(paths, ["00000000000000000001.ckpt", "d"], "{paths:?}");
    assert!(m.problems.is_empty());
}

/// The pump in copy mode with an exclude list, over loopback to a bcplog: the first resync
/// neither sends the primary's excluded names nor removes the replica's own, and the stream
/// never names them (a committed temp file arrives as its final name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_pump_resync_and_stream_leave_excluded_names_out() {
    use cluster::net::{Listener, NetConfig, Secret};
    use ractor::Actor;

    use crate::backup::BackupSpec;
    use crate::bcplog::{BcplogActor, BcplogArgs};
    use crate::primary::{Peer, PrimarySpec, PumpActor, SourceSpec};
    use crate::pump::PumpConfig;
    use crate::segment::SegmentOptions;

    let net = |node: &str| {
        NetConfig::new(
            "test",
            node,
            Secret::new(b"0123456789abcdef0123".to_vec()).expect("secret"),
        )
        .expect("config")
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let (primary, replica) = (tmp.path().join("primary"), tmp.path().join("replica"));
    fs::create_dir_all(primary.join("cache")).expect("mkdir");
    fs::create_dir_all(&replica).expect("mkdir");
    write(&primary.join("kept"), b"kept");
    write(&primary.join(".tmp-1-1"), &vec![1u8; 1 << 20]);
    write(&primary.join("cache/x"), b"cached");
    write(&replica.join(".tmp-9-9"), b"the replica's own temp file");
    write(&replica.join("stale"), b"not on the primary");
    let exclude = Exclude::new([".tmp-*", "cache"]).expect("valid");

    let listener = Listener::bind(&net("b"), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let (bcplog, _) = Actor::spawn(
        None,
        BcplogActor,
        BcplogArgs {
            spec: BackupSpec {
                fileset: "data".into(),
                root: replica.clone(),
                state_dir: tmp.path().join("state"),
                segment: SegmentOptions::default(),
            },
            primaries: vec!["a".into()],
            conns: vec![listener.channel("repl/data").expect("channel")],
        },
    )
    .await
    .expect("bcplog starts");
    let (pump, _) = Actor::spawn(
        None,
        PumpActor,
        PrimarySpec {
            fileset: "data".into(),
            root: primary.clone(),
            source: SourceSpec::Copy {
                quiet: CKPT_QUIET,
                exclude: exclude.clone(),
            },
            backups: vec![Peer {
                name: "b".into(),
                addrs: vec![listener.local_addr()],
            }],
            epoch: 1,
            pump: PumpConfig::default(),
            net: net("a"),
        },
    )
    .await
    .expect("pump starts");

    let wait_same = |what: &'static str| {
        let (p, r, ex) = (primary.clone(), replica.clone(), exclude.clone());
        async move {
            let deadline = Instant::now() + SETTLE;
            loop {
                let (p2, r2, ex2) = (p.clone(), r.clone(), ex.clone());
                let same = tokio::task::spawn_blocking(move || {
                    snapshot_without(&p2, &ex2) == snapshot_without(&r2, &ex2)
                })
                .await
                .expect("join");
                if same {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: the replica did not catch up; {}",
                    report(&snapshot(&p), &snapshot(&r))
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_same("the first resync").await;
    assert!(!replica.join("stale").exists(), "the resync ran");
    assert!(!replica.join(".tmp-1-1").exists());
    assert!(!replica.join("cache").exists());
    assert_eq!(
        fs::read(replica.join(".tmp-9-9")).expect("the replica's own temp file is left alone"),
        b"the replica's own temp file"
    );

    write(&primary.join(".tmp-2-2"), &vec![2u8; 1 << 20]);
    tokio::time::sleep(CKPT_QUIET * 5).await;
    fs::rename(
        primary.join(".tmp-2-2"),
        primary.join("00000000000000000002.ckpt"),
    )
    .expect("commit");
    write(&primary.join("cache/y"), b"more cache");
    wait_same("the stream").await;
    assert!(!replica.join(".tmp-2-2").exists());
    assert!(replica.join("00000000000000000002.ckpt").exists());
    let status = ractor::call!(pump, crate::primary::PumpMsg::Status).expect("status");
    assert_eq!(status.backups[0].state, "streaming", "{status:?}");
    assert_eq!(status.backups[0].resyncs, 1, "only the first: {status:?}");
    pump.stop(None);
    bcplog.stop(None);
}
