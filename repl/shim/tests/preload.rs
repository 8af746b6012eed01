//! End-to-end tests of libftrepl.so: real programs (coreutils, tar, sh, small C programs)
//! run with the shim preloaded and a fileset on a scratch root; the ring's consumer collects
//! the operations, a small applier replays them into a second directory, and the two trees
//! must be identical (paths, kinds, modes, contents, symlink targets).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ft::replog::{ConsumerOptions, Op, Ring, RingItem};

/// Ring size for the tests: small enough that big copies wrap it (the collector releases).
const RING_CAPACITY: u64 = 1 << 20;
const POLL: Duration = Duration::from_millis(20);

/// The shim: cargo builds the crate's cdylib into `target/<profile>/deps/` beside the test
/// binary for `cargo test` (it only copies it up to `target/<profile>/` for `cargo build`).
fn shim_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("target/<profile>/deps/<test>");
    let lib = deps.join("libftrepl.so");
    assert!(lib.exists(), "{} was not built", lib.display());
    lib
}

/// A fileset on a scratch root, its ring, a replica directory, and a thread that drains the
/// ring as the pump would (collecting, then releasing).
struct Fixture {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    replica: PathBuf,
    outside: PathBuf,
    env: String,
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<Op>>>,
    collector: Option<JoinHandle<()>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = fs::canonicalize(dir.path()).expect("canonical tempdir");
        let root = base.join("primary");
        let replica = base.join("replica");
        let outside = base.join("outside");
        for d in [&root, &replica, &outside] {
            fs::create_dir(d).expect("mkdir");
        }
        let ring_path = base.join("ring");
        let ring = Ring::create(&ring_path, RING_CAPACITY, false).expect("create ring");
        let mut consumer = ring.consumer(ConsumerOptions::default()).expect("consumer");
        let env = format!("data|{}|{}", root.display(), ring_path.display());
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(Mutex::new(Vec::new()));
        let collector = {
            let stop = Arc::clone(&stop);
            let ops = Arc::clone(&ops);
            std::thread::spawn(move || {
                loop {
                    let item = consumer.next(POLL).expect("ring readable");
                    match item {
                        Some(RingItem::Op { seq, op }) => {
                            ops.lock().expect("ops lock").push(op);
                            consumer.release_through(seq).expect("release");
                        }
                        Some(other) => panic!("ring item {other:?}"),
                        None if stop.load(Ordering::SeqCst) => return,
                        None => {}
                    }
                }
            })
        };
        Self {
            _dir: dir,
            base,
            root,
            replica,
            outside,
            env,
            stop,
            ops,
            collector: Some(collector),
        }
    }

    /// A command with the shim preloaded and the fileset configured, run in the root.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("LD_PRELOAD", shim_path())
            .env("FT_REPL_FILESETS", &self.env)
            .current_dir(&self.root);
        cmd
    }

    fn run(&self, cmd: &mut Command) -> Output {
        let out = cmd.output().expect("spawn");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("libftrepl"),
            "the shim complained: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn sh(&self, script: &str) -> Output {
        self.run(self.command("sh").args(["-c", script]))
    }

    /// Stops the collector once the ring is drained and returns every operation.
    fn finish(&mut self) -> Vec<Op> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(collector) = self.collector.take() {
            collector.join().expect("collector ran without panicking");
        }
        std::mem::take(&mut *self.ops.lock().expect("ops lock"))
    }

    /// Replays everything into the replica and asserts that it equals the primary.
    fn assert_replicated(&mut self) -> Vec<Op> {
        let ops = self.finish();
        for op in &ops {
            apply(&self.replica, op);
        }
        let (primary, replica) = (tree(&self.root), tree(&self.replica));
        if primary != replica {
            let only = |a: &Tree, b: &Tree| {
                a.iter()
                    .filter(|(k, v)| b.get(*k) != Some(v))
                    .map(|(k, v)| format!("{k} {}", v.describe()))
                    .collect::<Vec<_>>()
            };
            panic!(
                "replica differs\nprimary only/different: {:#?}\nreplica only/different: {:#?}\nops: {ops:#?}",
                only(&primary, &replica),
                only(&replica, &primary)
            );
        }
        assert!(!primary.is_empty(), "the workload left the primary empty");
        ops
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(collector) = self.collector.take() {
            let _ = collector.join();
        }
    }
}

/// A minimal replay: what `repl::replay` does, without confinement (the test trusts its ops).
fn apply(root: &Path, op: &Op) {
    let at = |p: &ft::replog::RelPath| root.join(p.as_path());
    let ensure_parent = |p: &Path| {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("parent directories");
        }
    };
    let open = |p: &Path| {
        ensure_parent(p);
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
    };
    match op {
        Op::Create { path, mode } => {
            let p = at(path);
            if fs::symlink_metadata(&p).is_err() {
                drop(open(&p));
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
            }
        }
        Op::Write { path, offset, data } => {
            open(&at(path)).write_all_at(data, *offset).expect("write");
        }
        Op::Truncate { path, len } => open(&at(path)).set_len(*len).expect("truncate"),
        Op::Rename { from, to } => {
            let (f, t) = (at(from), at(to));
            if fs::symlink_metadata(&f).is_ok() {
                ensure_parent(&t);
                fs::rename(&f, &t).expect("rename");
            }
        }
        Op::Unlink { path } => {
            let _ = fs::remove_file(at(path));
        }
        Op::Mkdir { path, mode } => {
            let p = at(path);
            ensure_parent(&p);
            if fs::create_dir(&p).is_ok() {
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
            }
        }
        Op::Rmdir { path } => {
            let _ = fs::remove_dir(at(path));
        }
        Op::Chmod { path, mode } => {
            let p = at(path);
            if fs::symlink_metadata(&p).is_ok_and(|m| !m.file_type().is_symlink()) {
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).expect("chmod");
            }
        }
        Op::SetTimes { .. } | Op::Fsync { .. } => {}
        Op::Symlink { target, path } => {
            let p = at(path);
            ensure_parent(&p);
            let _ = fs::remove_file(&p);
            std::os::unix::fs::symlink(OsStr::from_bytes(target), &p).expect("symlink");
        }
        Op::Link { from, to } => {
            let t = at(to);
            ensure_parent(&t);
            let _ = fs::remove_file(&t);
            fs::hard_link(at(from), &t).expect("link");
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File { mode: u32, data: Vec<u8> },
    Dir { mode: u32 },
    Symlink { target: Vec<u8> },
}

impl Entry {
    fn describe(&self) -> String {
        match self {
            Entry::File { mode, data } => format!("file {mode:o} {} bytes", data.len()),
            Entry::Dir { mode } => format!("dir {mode:o}"),
            Entry::Symlink { target } => format!("symlink -> {}", String::from_utf8_lossy(target)),
        }
    }
}

type Tree = BTreeMap<String, Entry>;

/// Every entry beneath `root` (not the root itself).
fn tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut work = vec![root.to_path_buf()];
    while let Some(dir) = work.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("beneath root")
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let mode = meta.permissions().mode() & 0o7777;
            let value = if meta.file_type().is_symlink() {
                Entry::Symlink {
                    target: fs::read_link(&path)
                        .expect("readlink")
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                }
            } else if meta.is_dir() {
                work.push(path.clone());
                Entry::Dir { mode }
            } else {
                Entry::File {
                    mode,
                    data: fs::read(&path).expect("read"),
                }
            };
            out.insert(rel, value);
        }
    }
    out
}

/// Deterministic bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 256)
                .expect("below 256")
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

/// A source tree outside the fileset: nested dirs, big and empty files, modes, a symlink.
fn make_source(dir: &Path) {
    fs::create_dir_all(dir.join("a/b/c")).expect("mkdir");
    fs::create_dir(dir.join("empty")).expect("mkdir");
    fs::write(dir.join("top.txt"), b"top level\n").expect("write");
    fs::write(dir.join("a/big.bin"), pattern(3 * 1024 * 1024 + 17, 7)).expect("write");
    fs::write(dir.join("a/b/mid.bin"), pattern(70_000, 3)).expect("write");
    fs::write(dir.join("a/b/c/empty"), b"").expect("write");
    fs::write(dir.join("a/b/c/run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
    fs::set_permissions(dir.join("a/b/c/run.sh"), fs::Permissions::from_mode(0o750))
        .expect("chmod");
    std::os::unix::fs::symlink("../top.txt", dir.join("a/link")).expect("symlink");
}

/// Compiles a C program into the fixture's base directory.
fn compile(fx: &Fixture, name: &str, source: &str) -> PathBuf {
    let src = fx.base.join(format!("{name}.c"));
    let exe = fx.base.join(name);
    fs::write(&src, source).expect("write C source");
    let out = Command::new("cc")
        .args([
            "-std=c11",
            "-D_GNU_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O1",
            "-pthread",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

#[test]
fn cp_r_of_a_tree_is_replicated() {
    let mut fx = Fixture::new();
    let src = fx.outside.join("src");
    make_source(&src);
    fx.run(
        fx.command("cp")
            .arg("-r")
            .arg(&src)
            .arg(fx.root.join("copy")),
    );
    fx.run(
        fx.command("cp")
            .arg("-a")
            .arg(&src)
            .arg(fx.root.join("archive")),
    );
    let ops = fx.assert_replicated();
    assert!(
        ops.iter().any(|op| matches!(op, Op::Symlink { .. })),
        "{ops:?}"
    );
}

#[test]
fn tar_x_of_an_archive_is_replicated() {
    let mut fx = Fixture::new();
    let src = fx.outside.join("src");
    make_source(&src);
    let archive = fx.outside.join("src.tar");
    let out = Command::new("tar")
        .arg("cf")
        .arg(&archive)
        .arg("-C")
        .arg(&fx.outside)
        .arg("src")
        .output()
        .expect("tar c");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::create_dir(fx.root.join("x")).expect("mkdir");
    fx.run(
        fx.command("tar")
            .arg("xf")
            .arg(&archive)
            .arg("-C")
            .arg(fx.root.join("x")),
    );
    fx.run(fx.command("tar").arg("xf").arg(&archive)); // into the root's cwd
    fx.assert_replicated();
}

#[test]
fn shell_redirections_moves_and_removals_are_replicated() {
    let mut fx = Fixture::new();
    fs::write(fx.outside.join("in.txt"), b"from outside\n").expect("write");
    fx.sh(&format!(
        "echo x > f; mv f g; rm g; \
         echo one > keep; echo two >> keep; mkdir -p d/e; mv keep d/e/kept; \
         cat {out}/in.txt > copied; mv {out}/in.txt moved-in; \
         echo gone > {out}/moved-out-src; mv copied {out}/moved-out; \
         ln -s d/e/kept sym; ln d/e/kept hard; chmod 600 d/e/kept; \
         mkdir tmpd; rmdir tmpd; touch t; : > t2; printf 'abc' > t2; \
         mkdir -p {out}/tree/sub; echo q > {out}/tree/sub/q; ln -s sub/q {out}/tree/l; \
         mv {out}/tree tree-in; mkdir -p dd/ee; echo z > dd/ee/z; mv dd {out}/dd-out",
        out = fx.outside.display()
    ));
    let ops = fx.assert_replicated();
    assert!(!fx.root.join("copied").exists());
    assert!(
        ops.iter().any(|op| matches!(op, Op::Link { .. })),
        "{ops:?}"
    );
}

const STDIO_AND_CALLS: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define CHECK(x) do { if (!(x)) { perror(#x); exit(1); } } while (0)

int main(void) {
    FILE *f = fopen("stdio.txt", "w");
    CHECK(f);
    for (int i = 0; i < 2000; i++) fprintf(f, "line %d %s\n", i, "some text");
    char block[5000];
    memset(block, 'z', sizeof block);
    CHECK(fwrite(block, 1, sizeof block, f) == sizeof block);
    CHECK(fseek(f, 10, SEEK_SET) == 0);
    fputs("REWRITTEN", f);
    CHECK(fileno(f) >= 0);
    CHECK(fflush(f) == 0);
    CHECK(fsync(fileno(f)) == 0);
    CHECK(fclose(f) == 0);

    f = fopen("stdio.txt", "a");
    CHECK(f);
    fprintf(f, "appended %d\n", 42);
    CHECK(fclose(f) == 0);

    f = fopen("rw.txt", "w+");
    CHECK(f);
    fputs("hello world", f);
    rewind(f);
    char got[6] = {0};
    CHECK(fread(got, 1, 5, f) == 5 && strcmp(got, "hello") == 0);
    CHECK(fseek(f, 0, SEEK_END) == 0);
    fputs("!", f);
    CHECK(fclose(f) == 0);

    int fd = open("fdopen.txt", O_CREAT | O_WRONLY | O_TRUNC, 0640);
    CHECK(fd >= 0);
    f = fdopen(fd, "w");
    CHECK(f);
    CHECK(fileno(f) == fd);
    fprintf(f, "through fdopen\n");
    CHECK(fclose(f) == 0);

    fd = open("p.bin", O_CREAT | O_RDWR, 0600);
    CHECK(fd >= 0);
    CHECK(pwrite(fd, "0123456789", 10, 100) == 10);
    struct iovec iov[3] = {{"aa", 2}, {"bbbb", 4}, {"c", 1}};
    CHECK(writev(fd, iov, 3) == 7);
    CHECK(pwritev(fd, iov, 3, 50) == 7);
    CHECK(ftruncate(fd, 105) == 0);
    CHECK(fchmod(fd, 0604) == 0);
    int fd2 = dup(fd);
    CHECK(fd2 >= 0);
    CHECK(close(fd) == 0);
    CHECK(write(fd2, "after-dup", 9) == 9);
    int fd3 = fcntl(fd2, F_DUPFD_CLOEXEC, 50);
    CHECK(fd3 >= 50);
    CHECK(dup2(fd3, 40) == 40);
    CHECK(write(40, "via-40", 6) == 6);
    CHECK(close(fd2) == 0 && close(fd3) == 0 && close(40) == 0);

    fd = open("app.log", O_CREAT | O_WRONLY | O_APPEND, 0644);
    CHECK(fd >= 0);
    for (int i = 0; i < 10; i++) CHECK(write(fd, "appendline\n", 11) == 11);
    CHECK(pwrite(fd, "P", 1, 0) == 1); /* O_APPEND: lands at the end */
    CHECK(close(fd) == 0);
    /* O_APPEND switched on and off with fcntl: positioned writes follow the current flag */
    fd = open("setfl.log", O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0 && pwrite(fd, "0123456789", 10, 0) == 10);
    CHECK(fcntl(fd, F_SETFL, O_APPEND) == 0);
    CHECK(pwrite(fd, "A", 1, 2) == 1); /* appended */
    CHECK(fcntl(fd, F_SETFL, 0) == 0);
    CHECK(pwrite(fd, "B", 1, 3) == 1); /* at offset 3 */
    CHECK(close(fd) == 0);

    CHECK(mkdir("dir", 0755) == 0);
    CHECK(mkdir("dir/sub", 0700) == 0);
    CHECK(rename("p.bin", "dir/sub/p.bin") == 0);
    CHECK(symlink("sub/p.bin", "dir/plink") == 0);
    CHECK(link("dir/sub/p.bin", "dir/hard.bin") == 0);
    CHECK(unlink("fdopen.txt") == 0);
    CHECK(mkdir("gone", 0755) == 0);
    CHECK(rmdir("gone") == 0);
    CHECK(rename("dir", "dir2") == 0);
    CHECK(truncate("dir2/hard.bin", 20) == 0);
    CHECK(chmod("dir2/sub", 0750) == 0);

    char tmpl[] = "tmp.XXXXXX";
    fd = mkstemp(tmpl);
    CHECK(fd >= 0);
    CHECK(write(fd, "atomic contents", 15) == 15);
    CHECK(fsync(fd) == 0 && close(fd) == 0);
    CHECK(rename(tmpl, "atomic.txt") == 0);
    CHECK(remove("stdio.txt.missing") == -1 && errno == ENOENT);

    /* a tracked descriptor follows renames of its file and of its directory */
    fd = open("moving.txt", O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0 && write(fd, "one\n", 4) == 4);
    CHECK(mkdir("mv", 0755) == 0);
    CHECK(rename("moving.txt", "mv/moved.txt") == 0);
    CHECK(write(fd, "two\n", 4) == 4);
    CHECK(rename("mv", "mv2") == 0);
    CHECK(write(fd, "three\n", 6) == 6);
    CHECK(close(fd) == 0);
    /* writes to an unlinked file must not bring it back on the replica */
    fd = open("doomed.txt", O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0 && write(fd, "x", 1) == 1);
    CHECK(unlink("doomed.txt") == 0);
    CHECK(write(fd, "after unlink", 12) == 12);
    CHECK(close(fd) == 0);

    /* space allocation, copies from outside, splice from a pipe */
    fd = open("space.bin", O_CREAT | O_RDWR, 0644);
    CHECK(fd >= 0 && write(fd, "abcdefghij", 10) == 10);
    CHECK(posix_fallocate(fd, 0, 20000) == 0);
    CHECK(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2, 4) == 0);
    int src = open(getenv("OUTSIDE_FILE"), O_RDONLY);
    CHECK(src >= 0);
    CHECK(sendfile(fd, src, NULL, 7) == 7);
    off_t in_off = 3;
    CHECK(copy_file_range(src, &in_off, fd, NULL, 5, 0) == 5);
    int pipefd[2];
    CHECK(pipe(pipefd) == 0 && write(pipefd[1], "spliced", 7) == 7);
    loff_t out_off = 30000;
    CHECK(splice(pipefd[0], NULL, fd, &out_off, 7, 0) == 7);
    CHECK(close(src) == 0 && close(fd) == 0);

    /* exchanging a directory and a file */
    CHECK(mkdir("xa", 0755) == 0);
    fd = open("xa/inside", O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0 && write(fd, "in xa", 5) == 5 && close(fd) == 0);
    fd = open("xb", O_CREAT | O_WRONLY, 0600);
    CHECK(fd >= 0 && write(fd, "file xb", 7) == 7);
    CHECK(renameat2(AT_FDCWD, "xa", AT_FDCWD, "xb", RENAME_EXCHANGE) == 0);
    CHECK(write(fd, "+", 1) == 1); /* now at xa */
    CHECK(close(fd) == 0);

    /* an O_TMPFILE file gets its name with linkat */
    fd = open(".", O_TMPFILE | O_WRONLY, 0640);
    CHECK(fd >= 0 && write(fd, "was anonymous", 13) == 13);
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    CHECK(linkat(AT_FDCWD, proc, AT_FDCWD, "named.txt", AT_SYMLINK_FOLLOW) == 0);
    CHECK(write(fd, "!", 1) == 1);
    CHECK(close(fd) == 0);
    return 0;
}
"#;

#[test]
fn a_c_program_using_stdio_and_file_calls_is_replicated() {
    let mut fx = Fixture::new();
    let exe = compile(&fx, "calls", STDIO_AND_CALLS);
    let outside_file = fx.outside.join("source.txt");
    fs::write(&outside_file, b"0123456789 from outside").expect("write");
    fx.run(fx.command(&exe).env("OUTSIDE_FILE", &outside_file));
    let ops = fx.assert_replicated();
    assert!(!fx.root.join("doomed.txt").exists());
    assert_eq!(
        fs::read(fx.root.join("mv2/moved.txt")).expect("read"),
        b"one\ntwo\nthree\n"
    );
    assert!(
        ops.iter().any(|op| matches!(op, Op::Fsync { .. })),
        "{ops:?}"
    );
    let log = fs::read(fx.root.join("app.log")).expect("read");
    assert_eq!(log.len(), 111);
    assert_eq!(log.last(), Some(&b'P'));
}

const THREADS: &str = r#"
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 8
#define WRITES 400
static int shared_fd;

static void *worker(void *arg) {
    long id = (long)arg;
    char name[32], rec[64];
    snprintf(name, sizeof name, "t%ld.dat", id);
    int fd = open(name, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0) { perror("open"); exit(1); }
    FILE *f = fopen("stdio-shared.txt", "a");
    if (!f) { perror("fopen"); exit(1); }
    for (int i = 0; i < WRITES; i++) {
        int n = snprintf(rec, sizeof rec, "thread %ld record %d\n", id, i);
        if (write(fd, rec, n) != n) { perror("write"); exit(1); }
        if (write(shared_fd, rec, n) != n) { perror("shared write"); exit(1); }
        /* overlapping positioned writes: the last one in kernel order must win */
        if (pwrite(shared_fd + 0, rec, 8, 0) != 8) { perror("pwrite"); exit(1); }
        fprintf(f, "%s", rec);
    }
    fclose(f);
    close(fd);
    return NULL;
}

int main(void) {
    shared_fd = open("shared.log", O_CREAT | O_WRONLY | O_APPEND, 0644);
    if (shared_fd < 0) { perror("open shared"); return 1; }
    pthread_t t[THREADS];
    for (long i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    close(shared_fd);
    return 0;
}
"#;

#[test]
fn a_multi_threaded_writer_is_replicated_in_kernel_order() {
    let mut fx = Fixture::new();
    let exe = compile(&fx, "threads", THREADS);
    fx.run(&mut fx.command(&exe));
    fx.assert_replicated();
}

const FORKS: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    int fd = open("inherited.txt", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0) return 1;
    if (write(fd, "parent-before\n", 14) != 14) return 1;
    FILE *f = fopen("stream.txt", "w");
    if (!f) return 1;
    fprintf(f, "parent stream\n");
    fflush(f);
    pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid == 0) {
        if (write(fd, "child\n", 6) != 6) _exit(1);
        int own = open("child-own.txt", O_CREAT | O_WRONLY, 0600);
        if (own < 0 || write(own, "mine\n", 5) != 5) _exit(1);
        fprintf(f, "child stream\n");
        fclose(f);
        /* exec with the inherited descriptor on stdout: the new image adopts it */
        if (dup2(fd, 1) < 0) _exit(1);
        execlp("echo", "echo", "from-exec", (char *)NULL);
        _exit(1);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return 1;
    if (write(fd, "parent-after\n", 13) != 13) return 1;
    fclose(f);
    printf("done\n");
    return 0;
}
"#;

#[test]
fn a_forking_program_is_replicated_in_parent_and_child() {
    let mut fx = Fixture::new();
    let exe = compile(&fx, "forks", FORKS);
    let out = fx.run(&mut fx.command(&exe));
    assert_eq!(out.stdout, b"done\n");
    fx.assert_replicated();
    let text = fs::read_to_string(fx.root.join("inherited.txt")).expect("read");
    assert_eq!(text, "parent-before\nchild\nfrom-exec\nparent-after\n");
}

const STDOUT_TO_FILE: &str = r#"
#include <stdio.h>
int main(void) {
    for (int i = 0; i < 3000; i++) printf("stdout line %d\n", i);
    fprintf(stderr, "to stderr\n");
    FILE *f = freopen("reopened.txt", "w", stdout);
    if (!f) return 1;
    printf("after freopen\n");
    fflush(stdout);
    printf("at exit\n");
    return 0;
}
"#;

#[test]
fn stdout_redirected_into_the_fileset_and_freopen_are_replicated() {
    let mut fx = Fixture::new();
    let exe = compile(&fx, "stdout", STDOUT_TO_FILE);
    fx.sh(&format!("{} > out.txt 2> err.txt", exe.display()));
    fx.assert_replicated();
    let out = fs::read_to_string(fx.root.join("out.txt")).expect("read");
    assert_eq!(out.lines().count(), 3000);
    let reopened = fs::read_to_string(fx.root.join("reopened.txt")).expect("read");
    assert_eq!(reopened, "after freopen\nat exit\n");
}

#[test]
fn paths_outside_the_fileset_produce_no_operations() {
    let mut fx = Fixture::new();
    let src = fx.outside.join("src");
    make_source(&src);
    fx.run(
        fx.command("sh")
            .current_dir(&fx.outside)
            .args(["-c", "cp -r src copy && tar cf t.tar copy && mkdir x && tar xf t.tar -C x && mv copy moved && rm -r moved x t.tar && echo hi > f && ln -s f l"]),
    );
    // The root itself is not a member either.
    fx.run(fx.command("touch").arg(&fx.root));
    let ops = fx.finish();
    assert!(ops.is_empty(), "{ops:?}");
}

const ERRNO: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(void) {
    errno = 0;
    int fd = open("no/such/dir/file", O_CREAT | O_WRONLY, 0644);
    printf("open-missing %d %d\n", fd, errno);
    errno = 0;
    fd = open("missing.txt", O_RDONLY);
    printf("open-enoent %d %d\n", fd, errno);
    errno = 0;
    printf("fopen %p %d\n", (void *)fopen("no/such/file", "w"), errno);
    errno = 0;
    printf("unlink %d %d\n", unlink("missing.txt"), errno);
    errno = 0;
    printf("rename %d %d\n", rename("missing.txt", "x"), errno);
    errno = 0;
    printf("mkdir-twice %d ", mkdir("d", 0755));
    printf("%d %d\n", mkdir("d", 0755), errno);
    fd = open("ok.txt", O_CREAT | O_WRONLY, 0644);
    errno = 1234;
    ssize_t n = write(fd, "x", 1);
    printf("write-keeps %zd %d\n", n, errno);
    errno = 4321;
    close(fd);
    printf("close-keeps %d\n", errno);
    errno = 0;
    printf("write-closed %zd %d\n", write(fd, "x", 1), errno);
    return 0;
}
"#;

#[test]
fn errno_is_exactly_what_the_real_call_left() {
    let mut fx = Fixture::new();
    let exe = compile(&fx, "errno", ERRNO);
    let with = fx.run(&mut fx.command(&exe));
    // The same program without the shim, in a fresh directory, prints the same.
    let plain_dir = fx.outside.join("plain");
    fs::create_dir(&plain_dir).expect("mkdir");
    let without = Command::new(&exe)
        .current_dir(&plain_dir)
        .output()
        .expect("spawn");
    let text = String::from_utf8_lossy(&with.stdout).into_owned();
    assert_eq!(text, String::from_utf8_lossy(&without.stdout));
    assert!(
        text.contains(&format!("open-enoent -1 {}\n", libc::ENOENT)),
        "{text}"
    );
    assert!(
        text.contains(&format!("open-missing -1 {}\n", libc::ENOENT)),
        "{text}"
    );
    assert!(text.contains("write-keeps 1 1234\n"), "{text}");
    assert!(text.contains("close-keeps 4321\n"), "{text}");
    fx.assert_replicated();
}

#[test]
fn without_filesets_the_shim_changes_nothing() {
    let fx = Fixture::new();
    let exe = compile(&fx, "errno", ERRNO);
    let stdio = compile(&fx, "calls", STDIO_AND_CALLS);
    let outside_file = fx.outside.join("source.txt");
    fs::write(&outside_file, b"0123456789 from outside").expect("write");
    let run = |preload: bool, dir: &str| {
        let dir = fx.outside.join(dir);
        fs::create_dir(&dir).expect("mkdir");
        let mut outputs = Vec::new();
        for program in [&exe, &stdio] {
            let mut cmd = Command::new(program);
            cmd.current_dir(&dir)
                .env_remove("FT_REPL_FILESETS")
                .env("OUTSIDE_FILE", &outside_file);
            if preload {
                cmd.env("LD_PRELOAD", shim_path());
            }
            let out = cmd.output().expect("spawn");
            outputs.push((out.status.code(), out.stdout, out.stderr));
        }
        let mut sh = Command::new("sh");
        sh.current_dir(&dir).args([
            "-c",
            "echo hi > f; cat f; ls -la --time-style=+ . | wc -l; cp -r f g && cat g",
        ]);
        if preload {
            sh.env("LD_PRELOAD", shim_path());
        }
        let out = sh.output().expect("spawn");
        outputs.push((out.status.code(), out.stdout, out.stderr));
        (outputs, tree(&dir))
    };
    let (with, with_tree) = run(true, "with");
    let (without, without_tree) = run(false, "without");
    assert_eq!(with, without);
    assert_eq!(
        with_tree.keys().collect::<Vec<_>>(),
        without_tree.keys().collect::<Vec<_>>()
    );
    for (k, v) in &with_tree {
        if let (Entry::File { data: a, .. }, Some(Entry::File { data: b, .. })) =
            (v, without_tree.get(k))
            && !k.starts_with("tmp.")
        {
            assert_eq!(a, b, "{k}");
        }
    }
}

#[test]
fn the_shim_can_be_preloaded_into_a_process_that_writes_its_own_file_with_std() {
    // A sanity check of the harness: writes by a process that is not preloaded are not seen.
    let mut fx = Fixture::new();
    fs::File::create(fx.root.join("direct"))
        .expect("create")
        .write_all(b"x")
        .expect("write");
    let ops = fx.finish();
    assert!(ops.is_empty(), "{ops:?}");
}

#[test]
fn a_malformed_fileset_list_is_reported_once_and_changes_nothing() {
    let fx = Fixture::new();
    let out = Command::new("sh")
        .args(["-c", "echo hi > f && cat f && rm f"])
        .current_dir(&fx.root)
        .env("LD_PRELOAD", shim_path())
        .env("FT_REPL_FILESETS", "not-a-fileset")
        .output()
        .expect("spawn");
    assert!(out.status.success());
    assert_eq!(out.stdout, b"hi\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One line per process (sh, cat, rm), each naming the problem.
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
    assert!(
        stderr
            .lines()
            .all(|l| l.contains("expected NAME|ROOT|RINGPATH")),
        "{stderr}"
    );
}
