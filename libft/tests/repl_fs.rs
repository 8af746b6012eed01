//! `ft::fs` writing into a fileset produces the expected operations in the fileset's ring (a
//! consumer in the test reads them), files outside filesets produce none, and sync mode waits
//! for the consumer's release.
//!
//! The filesets are process-wide, so the tests of this file run one at a time.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ft::fs::{self, File, OpenOptions};
use ft::replog::{Consumer, ConsumerOptions, Filesets, Op, RelPath, Ring, RingItem};

const CAPACITY: u64 = 1 << 20;
const SHORT: Duration = Duration::from_millis(20);

static SERIAL: Mutex<()> = Mutex::new(());

/// A fileset rooted in a fresh directory, its ring, and a directory outside it.
struct Setup {
    _serial: MutexGuard<'static, ()>,
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    consumer: Consumer,
}

impl Setup {
    fn new(sync: bool, sync_timeout: Duration) -> Setup {
        let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("tempdir");
        let base = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir(&root).expect("root");
        std::fs::create_dir(&outside).expect("outside");
        let ring_path = base.join("ring");
        let ring = Ring::create(&ring_path, CAPACITY, sync).expect("ring");
        let spec = format!("data|{}|{}", root.display(), ring_path.display());
        fs::set_filesets(
            Filesets::parse(spec.as_bytes())
                .expect("valid filesets")
                .with_sync_timeout(sync_timeout),
        );
        let consumer = ring.consumer(ConsumerOptions::default()).expect("consumer");
        Setup {
            _serial: serial,
            _dir: dir,
            root,
            outside,
            consumer,
        }
    }

    /// Every op logged so far.
    fn ops(&mut self) -> Vec<Op> {
        let mut ops = Vec::new();
        while let Some(item) = self.consumer.next(SHORT).expect("next") {
            match item {
                RingItem::Op { op, .. } => ops.push(op),
                other => panic!("unexpected {other:?}"),
            }
        }
        ops
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        fs::set_filesets(Filesets::none());
    }
}

fn rp(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("valid")
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

#[test]
fn file_changes_in_a_fileset_are_logged_in_order() {
    let mut s = Setup::new(false, SHORT);
    let path = s.root.join("f");
    let mut f = File::create(&path).expect("create");
    assert!(f.is_replicated());
    assert_eq!(f.replicated_as(), Some(("data", &b"f"[..])));
    f.write_all(b"hello ").expect("write");
    f.write_all(b"world").expect("write");
    assert_eq!(f.write_at(b"HE", 0).expect("write_at"), 2);
    f.seek(SeekFrom::Start(100)).expect("seek");
    f.write_all(b"!").expect("write after seek");
    f.set_len(50).expect("set_len");
    f.sync_all().expect("sync");
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    drop(f);
    let mode = 0o666 & !current_umask();
    assert_eq!(
        s.ops(),
        vec![
            Op::Create {
                path: rp("f"),
                mode
            },
            Op::Truncate {
                path: rp("f"),
                len: 0
            },
            Op::Write {
                path: rp("f"),
                offset: 0,
                data: b"hello ".to_vec()
            },
            Op::Write {
                path: rp("f"),
                offset: 6,
                data: b"world".to_vec()
            },
            Op::Write {
                path: rp("f"),
                offset: 0,
                data: b"HE".to_vec()
            },
            Op::Write {
                path: rp("f"),
                offset: 100,
                data: b"!".to_vec()
            },
            Op::Truncate {
                path: rp("f"),
                len: 50
            },
            Op::Fsync { path: rp("f") },
            Op::Chmod {
                path: rp("f"),
                mode: 0o600
            },
        ]
    );
    let mut content = Vec::new();
    std::fs::File::open(&path)
        .expect("open")
        .read_to_end(&mut content)
        .expect("read");
    assert_eq!(&content[..11], b"HEllo world");
    assert_eq!(content.len(), 50);

    // Append mode logs the offset the kernel chose; reads log nothing.
    let mut a = OpenOptions::new()
        .read(true)
        .append(true)
        .open(&path)
        .expect("open append");
    a.write_all(b"tail").expect("append");
    let mut buf = [0u8; 4];
    assert_eq!(a.read_at(&mut buf, 0).expect("read_at"), 4);
    assert_eq!(&buf, b"HEll");
    a.seek(SeekFrom::Start(0)).expect("seek");
    let mut first = [0u8; 2];
    a.read_exact(&mut first).expect("read");
    assert_eq!(&first, b"HE");
    assert_eq!(
        s.ops(),
        vec![Op::Write {
            path: rp("f"),
            offset: 50,
            data: b"tail".to_vec()
        }]
    );
}

#[test]
fn files_outside_every_fileset_log_nothing() {
    let mut s = Setup::new(false, SHORT);
    let path = s.outside.join("plain");
    let mut f = File::create(&path).expect("create");
    assert!(!f.is_replicated());
    f.write_all(b"data").expect("write");
    f.set_len(2).expect("set_len");
    f.sync_all().expect("sync");
    drop(f);
    fs::create_dir(s.outside.join("d")).expect("mkdir");
    fs::rename(&path, s.outside.join("d/moved")).expect("rename");
    fs::remove_file(s.outside.join("d/moved")).expect("unlink");
    fs::remove_dir(s.outside.join("d")).expect("rmdir");
    // The root itself is not a member either.
    let root_entry = File::open(&s.root, OpenOptions::new().read(true)).expect("open root");
    assert!(!root_entry.is_replicated());
    assert_eq!(s.ops(), vec![]);
    assert_eq!(std::fs::read(s.outside.join("plain")).ok(), None);
}

#[test]
fn path_operations_and_renames_across_the_boundary() {
    let mut s = Setup::new(false, SHORT);
    let root = s.root.clone();
    fs::create_dir(root.join("d")).expect("mkdir");
    let dmode = mode_of(&root.join("d"));
    File::create(root.join("d/a")).expect("create");
    fs::rename(root.join("d/a"), root.join("d/b")).expect("rename inside");
    fs::remove_file(root.join("d/b")).expect("unlink");
    fs::remove_dir(root.join("d")).expect("rmdir");
    let fmode = 0o666 & !current_umask();
    assert_eq!(
        s.ops(),
        vec![
            Op::Mkdir {
                path: rp("d"),
                mode: dmode
            },
            Op::Create {
                path: rp("d/a"),
                mode: fmode
            },
            Op::Truncate {
                path: rp("d/a"),
                len: 0
            },
            Op::Rename {
                from: rp("d/a"),
                to: rp("d/b")
            },
            Op::Unlink { path: rp("d/b") },
            Op::Rmdir { path: rp("d") },
        ]
    );

    // A tree moved in is logged with its contents; moved out, as its removal.
    let src = s.outside.join("tree");
    std::fs::create_dir_all(src.join("sub")).expect("tree");
    std::fs::write(src.join("sub/file"), b"content").expect("file");
    std::os::unix::fs::symlink("sub/file", src.join("link")).expect("symlink");
    let tmode = mode_of(&src);
    let smode = mode_of(&src.join("sub"));
    let cmode = mode_of(&src.join("sub/file"));
    fs::rename(&src, root.join("tree")).expect("rename in");
    let mut ops = s.ops();
    // Directory entries come in readdir order: compare the two subtrees as sets of ops.
    assert_eq!(
        ops[..2],
        [
            Op::Mkdir {
                path: rp("tree"),
                mode: tmode
            },
            Op::Chmod {
                path: rp("tree"),
                mode: tmode
            },
        ]
    );
    let mut expected = vec![
        Op::Mkdir {
            path: rp("tree/sub"),
            mode: smode,
        },
        Op::Chmod {
            path: rp("tree/sub"),
            mode: smode,
        },
        Op::Unlink {
            path: rp("tree/sub/file"),
        },
        Op::Create {
            path: rp("tree/sub/file"),
            mode: cmode,
        },
        Op::Write {
            path: rp("tree/sub/file"),
            offset: 0,
            data: b"content".to_vec(),
        },
        Op::Chmod {
            path: rp("tree/sub/file"),
            mode: cmode,
        },
        Op::Unlink {
            path: rp("tree/link"),
        },
        Op::Symlink {
            target: b"sub/file".to_vec(),
            path: rp("tree/link"),
        },
    ];
    let mut got = ops.split_off(2);
    got.sort_by_key(|o| format!("{o:?}"));
    expected.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(got, expected);

    fs::rename(root.join("tree"), s.outside.join("back")).expect("rename out");
    let ops = s.ops();
    assert_eq!(ops.last(), Some(&Op::Rmdir { path: rp("tree") }));
    let mut got = ops[..ops.len() - 1].to_vec();
    got.sort_by_key(|o| format!("{o:?}"));
    let mut expected = vec![
        Op::Rmdir {
            path: rp("tree/sub"),
        },
        Op::Unlink {
            path: rp("tree/link"),
        },
        Op::Unlink {
            path: rp("tree/sub/file"),
        },
    ];
    expected.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(got, expected);
    // The sub-directory's removal comes after its entry's.
    let pos = |op: &Op| ops.iter().position(|o| o == op).expect("logged");
    assert!(
        pos(&Op::Unlink {
            path: rp("tree/sub/file")
        }) < pos(&Op::Rmdir {
            path: rp("tree/sub")
        })
    );
}

#[test]
fn paths_reached_through_symlinks_are_classified_by_their_canonical_path() {
    let mut s = Setup::new(false, SHORT);
    let via = s.outside.join("via");
    std::os::unix::fs::symlink(&s.root, &via).expect("dir symlink");
    std::fs::create_dir(s.root.join("x")).expect("mkdir");
    let mut f = File::create(via.join("x/f")).expect("create through the symlink");
    assert_eq!(f.replicated_as(), Some(("data", &b"x/f"[..])));
    f.write_all(b"1").expect("write");
    // A final symlink inside pointing at a file inside logs the target.
    std::os::unix::fs::symlink("x/f", s.root.join("alias")).expect("file symlink");
    let g = File::open(s.root.join("alias"), OpenOptions::new().write(true)).expect("open");
    g.write_at(b"2", 1).expect("write");
    // So does a final symlink outside every fileset that points at a file inside one.
    std::os::unix::fs::symlink(s.root.join("x/f"), s.outside.join("in")).expect("symlink");
    let h = File::open(s.outside.join("in"), OpenOptions::new().write(true)).expect("open");
    assert_eq!(h.replicated_as(), Some(("data", &b"x/f"[..])));
    h.write_at(b"3", 2).expect("write");
    let ops = s.ops();
    assert_eq!(
        ops[2..],
        [
            Op::Write {
                path: rp("x/f"),
                offset: 0,
                data: b"1".to_vec()
            },
            Op::Write {
                path: rp("x/f"),
                offset: 1,
                data: b"2".to_vec()
            },
            Op::Write {
                path: rp("x/f"),
                offset: 2,
                data: b"3".to_vec()
            },
        ]
    );
}

#[test]
fn sync_mode_waits_for_the_backups_and_times_out_keeping_the_data() {
    let mut s = Setup::new(true, Duration::from_millis(200));
    let path = s.root.join("s");
    // Nobody releases: the create returns an error after the timeout, the file exists.
    let err = File::create(&path).expect_err("not durable");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<fs::ReplicationError>())
        .expect("a ReplicationError");
    assert!(inner.is_durability_timeout());
    assert!(path.exists());
    let ops = s.ops();
    assert_eq!(ops.len(), 2, "create and truncate are logged: {ops:?}");

    // A consumer that releases what it reads makes writes and syncs return.
    let mut f = File::open(&path, OpenOptions::new().write(true)).expect("open");
    let released = std::thread::scope(|scope| {
        let consumer = &mut s.consumer;
        let pump = scope.spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < 3 {
                if let Some(item) = consumer.next(Duration::from_secs(5)).expect("next") {
                    std::thread::sleep(Duration::from_millis(30));
                    consumer.release_through(item.seq()).expect("release");
                    seen.push(item);
                }
            }
            seen
        });
        let t0 = std::time::Instant::now();
        f.write_all(b"abc").expect("durable write");
        f.write_all(b"def").expect("durable write");
        f.sync_all().expect("durable sync");
        assert!(
            t0.elapsed() >= Duration::from_millis(90),
            "each op waited for its release"
        );
        pump.join().expect("pump")
    });
    assert_eq!(released.len(), 3);
    assert_eq!(std::fs::read(&path).expect("read"), b"abcdef");
}

#[test]
fn without_a_ring_files_work_and_operations_are_dropped() {
    let s = Setup::new(false, SHORT);
    let spec = format!(
        "data|{}|{}",
        s.root.display(),
        s.root.parent().expect("base").join("no-ring").display()
    );
    fs::set_filesets(Filesets::parse(spec.as_bytes()).expect("valid"));
    let mut f = File::create(s.root.join("f")).expect("create");
    f.write_all(b"x").expect("write");
    assert!(f.is_replicated());
    assert_eq!(std::fs::read(s.root.join("f")).expect("read"), b"x");
    assert_eq!(fs::filesets().dropped(0), 3, "create, truncate, write");
}

fn current_umask() -> u32 {
    // SAFETY: umask only swaps the process's mask; it is set back at once (tests of this file
    // run serially, so nobody creates files in between).
    let old = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    old
}

/// The overhead of logging on an application doing 4 KiB writes into a large file: plain
/// `std::fs::File` against `ft::fs::File` in a fileset (async mode, a consumer thread draining
/// and releasing as the pump would), on tmpfs and on the disk. Rounds of the two alternate;
/// the median wall time and the median CPU time of the writing thread per write are printed,
/// as other work on the machine adds noise. Run it optimized:
/// `cargo test --release -p ft --test repl_fs bench -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: prints ns/op"]
fn bench_fs_write_4k() {
    const ROUNDS: usize = 15;
    const PER_ROUND: u64 = 10_000;
    /// Writes wrap around in a file of this size, so the file stays "large" but bounded.
    const FILE_BYTES: u64 = 64 << 20;
    /// Big enough that the pump never lets it fill, small enough to stay in the caches.
    const RING_BYTES: u64 = 8 << 20;
    /// The pump releases after this many records (acks come in batches).
    const RELEASE_EVERY: u64 = 64;
    let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let block = vec![0xabu8; 4096];
    let blocks = FILE_BYTES / 4096;
    // The ring lives on tmpfs, as watchd puts it.
    let shm = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    for base in ["/dev/shm", "/var/tmp"] {
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        let base = std::fs::canonicalize(dir.path()).expect("canonical");
        let root = base.join("root");
        std::fs::create_dir(&root).expect("root");
        let ring_path = shm.path().join("ring");
        let ring = Ring::create(&ring_path, RING_BYTES, false).expect("ring");
        let spec = format!("data|{}|{}", root.display(), ring_path.display());
        fs::set_filesets(Filesets::parse(spec.as_bytes()).expect("valid"));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pump = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut c = ring.consumer(ConsumerOptions::default()).expect("consumer");
                let mut unreleased = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(item) = c.next(Duration::from_millis(10)).expect("next") {
                        unreleased += 1;
                        if unreleased >= RELEASE_EVERY {
                            c.release_through(item.seq()).expect("release");
                            unreleased = 0;
                        }
                    } else if unreleased > 0 {
                        c.release_through(c.delivered_seq()).expect("release");
                        unreleased = 0;
                    }
                }
            })
        };
        let mut plain = std::fs::File::create(root.join("plain")).expect("create");
        let mut logged = File::create(root.join("logged")).expect("create");
        assert!(logged.is_replicated());
        let mut plain_write = |i: u64| {
            if i.is_multiple_of(blocks) {
                plain.seek(SeekFrom::Start(0)).expect("seek");
            }
            plain.write_all(&block).expect("write");
        };
        let mut logged_write = |i: u64| {
            if i.is_multiple_of(blocks) {
                logged.seek(SeekFrom::Start(0)).expect("seek");
            }
            logged.write_all(&block).expect("write");
        };
        // Fill both files once, so every measured write overwrites cached pages.
        for i in 0..blocks {
            plain_write(i);
            logged_write(i);
        }
        // [plain, logged] x [wall, cpu] per round, ns per write.
        let mut samples = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
        let mut next = blocks;
        for round in 0..ROUNDS {
            for which in [round % 2, 1 - round % 2] {
                let cpu0 = thread_cpu_ns();
                let t0 = std::time::Instant::now();
                for i in next..next + PER_ROUND {
                    if which == 0 {
                        plain_write(i);
                    } else {
                        logged_write(i);
                    }
                }
                let wall = t0.elapsed().as_nanos() as f64 / PER_ROUND as f64;
                let cpu = (thread_cpu_ns() - cpu0) as f64 / PER_ROUND as f64;
                samples[which][0].push(wall);
                samples[which][1].push(cpu);
            }
            next += PER_ROUND;
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let [[mut pw, mut pc], [mut lw, mut lc]] = samples;
        let (pw, pc, lw, lc) = (
            median(&mut pw),
            median(&mut pc),
            median(&mut lw),
            median(&mut lc),
        );
        println!(
            "{}: 4 KiB writes, median ns per write (wall / CPU of the writer): \
             std::fs::File {pw:.0} / {pc:.0}, ft::fs::File logged {lw:.0} / {lc:.0}; \
             overhead {:.0} ns = {:.1} % wall, {:.0} ns CPU",
            base.display(),
            lw - pw,
            (lw - pw) / pw * 100.0,
            lc - pc
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        pump.join().expect("pump");
    }
    fs::set_filesets(Filesets::none());
    drop(serial);
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}
