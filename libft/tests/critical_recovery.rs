//! Recovery in a new process: a child re-executes this test binary in a role, builds state in
//! critical memory through the process-wide instance (configured by FT_* variables like under
//! watchd), checkpoints, and dies of SIGKILL; a second child recovers and checks every value
//! and pointer against what the first one reported.

mod critical_support;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use critical_support::{
    ROLE_ENV, Rng, crash, describe, digest, heap_addr, killed_by_sigkill, low_byte, report,
    run_role, unique, values,
};
use ft::critical::{CaptureMethod, Checkpointer, global};

/// The test that children run: it does nothing unless ROLE_ENV names a role.
const ENTRY: &str = "child_role";

#[repr(C)]
#[derive(Clone, Copy)]
struct Node {
    value: u64,
    next: *mut Node,
    blob: *mut u8,
    blob_len: usize,
}

/// Registered globals: the list head and a few counters.
static HEAD: AtomicPtr<Node> = AtomicPtr::new(std::ptr::null_mut());
static COUNTERS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// A registered global that does not start on a page boundary (it is in .bss).
static REGION: [AtomicU8; 20_000] = [const { AtomicU8::new(0) }; 20_000];
/// SIGCHLD deliveries seen by the handler of the fork role.
static SIGCHLD_SEEN: AtomicUsize = AtomicUsize::new(0);

const LIST_LEN: u64 = 1000;
const BUFFER_LEN: usize = 8 << 20;

fn cp() -> &'static Checkpointer {
    global().expect("critical memory from the environment")
}

fn register_globals() {
    let c = cp();
    // SAFETY: statics live for the whole process.
    unsafe {
        c.register(HEAD.as_ptr().cast(), size_of::<*mut Node>())
            .expect("register HEAD");
        c.register(COUNTERS.as_ptr() as *mut u8, size_of_val(&COUNTERS))
            .expect("register COUNTERS");
        c.register(REGION.as_ptr() as *mut u8, REGION.len())
            .expect("register REGION");
    }
}

fn blob_byte(value: u64, i: usize) -> u8 {
    low_byte(value)
        .wrapping_mul(31)
        .wrapping_add(low_byte(i as u64))
}

/// The environment of a child: its own service identity, heap address and store.
fn child_env(dir: &std::path::Path, slot: usize) -> Vec<(&'static str, String)> {
    vec![
        ("FT_SERVICE", unique("crit-recovery")),
        ("FT_HEAP_ADDR", format!("{:#x}", heap_addr(slot))),
        ("FT_HEAP_SIZE", "256MiB".to_owned()),
        ("FT_CKPT_DIR", dir.display().to_string()),
    ]
}

#[test]
fn child_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    match role.as_str() {
        "build_list" => build_list(),
        "verify_list" => verify_list(),
        "random_writes" => random_writes(),
        "verify_digest" => verify_digest(),
        "mismatch" => mismatch(),
        "periodic" => periodic(),
        other => panic!("unknown role {other}"),
    }
}

fn build_list() {
    register_globals();
    // SAFETY: nothing touched critical memory yet.
    let recovered = unsafe { cp().recover(0) };
    assert_eq!(recovered.expect("recover"), None, "fresh store");
    let heap = cp().heap();
    let mut head: *mut Node = std::ptr::null_mut();
    let mut sum = 0u64;
    for value in 0..LIST_LEN {
        let blob_len = 1 + usize::try_from(value * 37 % 3000).expect("small");
        let blob = heap.alloc(blob_len, 1).expect("blob").as_ptr();
        for i in 0..blob_len {
            // SAFETY: inside the blob.
            unsafe { blob.add(i).write(blob_byte(value, i)) };
        }
        let node = heap
            .alloc(size_of::<Node>(), align_of::<Node>())
            .expect("node");
        let node = node.as_ptr().cast::<Node>();
        // SAFETY: a fresh block sized and aligned for Node.
        unsafe {
            node.write(Node {
                value,
                next: head,
                blob,
                blob_len,
            })
        };
        head = node;
        sum += value;
        // Churn: free and reallocate some blobs so the allocator has free lists to restore.
        if value % 3 == 0 {
            let tmp = heap.alloc(500, 16).expect("tmp");
            // SAFETY: the block just allocated, not used again.
            unsafe { heap.free(tmp) }.expect("free tmp");
        }
    }
    HEAD.store(head, Ordering::SeqCst);
    COUNTERS[0].store(LIST_LEN, Ordering::SeqCst);
    COUNTERS[1].store(sum, Ordering::SeqCst);
    REGION[12_345].store(77, Ordering::SeqCst);
    let info = cp().checkpoint_sync(0).expect("checkpoint");
    report("seq", info.seq);
    report("head", head as usize);
    report("used_span", heap.stats().expect("stats").used_span);
    // Changes after the checkpoint must not survive the crash.
    // SAFETY: the head node is ours.
    unsafe { (*head).value = 424_242 };
    COUNTERS[0].store(1, Ordering::SeqCst);
    REGION[12_345].store(1, Ordering::SeqCst);
    crash();
}

fn verify_list() {
    register_globals();
    // SAFETY: nothing touched critical memory yet.
    let recovered = unsafe { cp().recover(0) }
        .expect("recover")
        .expect("a checkpoint");
    report("seq", recovered.seq);
    let heap = cp().heap();
    heap.check().expect("recovered allocator is consistent");
    assert_eq!(
        COUNTERS[0].load(Ordering::SeqCst),
        LIST_LEN,
        "registered global restored"
    );
    assert_eq!(
        REGION[12_345].load(Ordering::SeqCst),
        77,
        "unaligned global restored"
    );
    let head = HEAD.load(Ordering::SeqCst);
    report("head", head as usize);
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut node = head;
    let mut expect = LIST_LEN;
    let mut sum = 0u64;
    while !node.is_null() {
        assert!(
            heap.contains(node.cast()),
            "node pointer {node:p} outside the heap"
        );
        // SAFETY: a node of the recovered list (pointer checked to be in the heap).
        let n = unsafe { *node };
        expect -= 1;
        assert_eq!(n.value, expect, "list order and values");
        assert!(heap.contains(n.blob), "blob pointer outside the heap");
        for i in 0..n.blob_len {
            // SAFETY: inside the recovered blob.
            let byte = unsafe { n.blob.add(i).read() };
            assert_eq!(byte, blob_byte(n.value, i), "blob bytes");
        }
        ranges.push((node as usize, size_of::<Node>()));
        ranges.push((n.blob as usize, n.blob_len));
        sum += n.value;
        node = n.next;
    }
    assert_eq!(expect, 0, "every node is there");
    assert_eq!(sum, COUNTERS[1].load(Ordering::SeqCst));
    report("nodes", LIST_LEN);
    // The allocator continues where the checkpoint left it: new blocks never overlap old ones.
    ranges.sort_unstable();
    for len in [16usize, 100, 500, 3000, 64 << 10] {
        for _ in 0..200 {
            let p = heap.alloc(len, 16).expect("alloc after recovery").as_ptr() as usize;
            let i = ranges.partition_point(|&(a, _)| a <= p);
            if i > 0 {
                let (a, l) = ranges[i - 1];
                assert!(a + l <= p, "new block {p:#x} overlaps recovered {a:#x}+{l}");
            }
            if let Some(&(a, _)) = ranges.get(i) {
                assert!(
                    p + len <= a,
                    "new block {p:#x}+{len} overlaps recovered {a:#x}"
                );
            }
        }
    }
    heap.check()
        .expect("allocator consistent after more allocations");
    report("allocs_after_recovery", "ok");
}

#[test]
fn linked_list_survives_sigkill_and_recovers_in_a_new_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = child_env(dir.path(), 40);
    let first = run_role(ENTRY, "build_list", &env);
    assert!(killed_by_sigkill(&first), "{}", describe(&first));
    let built = values(&first);
    let second = run_role(ENTRY, "verify_list", &env);
    assert!(second.status.success(), "{}", describe(&second));
    let got = values(&second);
    assert_eq!(got.get("seq"), built.get("seq"), "{}", describe(&second));
    assert_eq!(
        got.get("head"),
        built.get("head"),
        "pointers keep their values"
    );
    assert_eq!(got.get("nodes").map(String::as_str), Some("1000"));
    assert_eq!(
        got.get("allocs_after_recovery").map(String::as_str),
        Some("ok")
    );
}

extern "C" fn count_sigchld(_: libc::c_int) {
    SIGCHLD_SEEN.fetch_add(1, Ordering::SeqCst);
}

fn install_sigchld_handler() {
    // SAFETY: a zeroed sigaction with a handler that only touches an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = count_sigchld as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()), 0);
    }
}

/// Digest of the heap's used span and the unaligned region: the whole checkpointed state.
fn state_digest() -> String {
    let heap = cp().heap();
    let used = heap.stats().expect("stats").used_span;
    // SAFETY: the used span of our heap and a static are readable.
    let (h, r) = unsafe {
        (
            digest(heap.base(), used),
            digest(REGION.as_ptr() as usize, REGION.len()),
        )
    };
    format!("{h:016x}{r:016x}")
}

fn random_writes() {
    let expect_fork = std::env::var("FT_TEST_EXPECT").is_ok_and(|v| v == "fork");
    if expect_fork {
        install_sigchld_handler();
    }
    register_globals();
    let heap = cp().heap();
    let buf = heap.alloc(BUFFER_LEN, 4096).expect("buffer");
    heap.set_root("buffer", Some(buf)).expect("root");
    let buf = buf.as_ptr();
    let rounds: usize = std::env::var("FT_TEST_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let mut rng = Rng::new(0xC0FFEE);
    let mut churn: Vec<NonNull<u8>> = Vec::new();
    let (mut forks, mut staged) = (0, 0);
    for round in 0..rounds {
        for _ in 0..1 + rng.below(60) {
            let at = rng.below(BUFFER_LEN);
            // SAFETY: inside the buffer.
            unsafe { buf.add(at).write(rng.byte()) };
        }
        for _ in 0..rng.below(20) {
            REGION[rng.below(REGION.len())].store(rng.byte(), Ordering::Relaxed);
        }
        if rng.below(2) == 0 {
            churn.push(heap.alloc(1 + rng.below(10_000), 16).expect("churn"));
        }
        if !churn.is_empty() && rng.below(3) == 0 {
            let p = churn.swap_remove(rng.below(churn.len()));
            // SAFETY: a live block, forgotten here.
            unsafe { heap.free(p) }.expect("free churn");
        }
        COUNTERS[2].store(round as u64, Ordering::SeqCst);
        let started = cp().checkpoint(0).expect("checkpoint");
        // Capture is done when checkpoint returns: this is the state the image holds.
        report(&format!("digest_{}", started.seq), state_digest());
        match started.method {
            CaptureMethod::Fork => forks += 1,
            CaptureMethod::Staging => staged += 1,
        }
    }
    let last = cp().checkpoint_sync(0).expect("last checkpoint");
    report("last_seq", last.seq);
    report("digest", state_digest());
    report("forks", forks + usize::from(expect_fork));
    report("staged", staged + usize::from(!expect_fork));
    if expect_fork {
        report(
            "sigchld_during_checkpoints",
            SIGCHLD_SEEN.load(Ordering::SeqCst),
        );
        // The handler works: an ordinary child does raise SIGCHLD.
        std::process::Command::new("true")
            .status()
            .expect("run true");
        report("sigchld_after_true", SIGCHLD_SEEN.load(Ordering::SeqCst));
    }
    crash();
}

fn verify_digest() {
    register_globals();
    // SAFETY: nothing touched critical memory yet; the report is read right after.
    let seq = unsafe { ft::capi::t_recover(0) };
    report("seq", seq);
    // SAFETY: t_recover_report returns a NUL-terminated string valid until the next t_recover.
    let text = unsafe { std::ffi::CStr::from_ptr(ft::capi::t_recover_report()) };
    report("report", text.to_string_lossy());
    cp().heap()
        .check()
        .expect("recovered allocator is consistent");
    let buffer = cp()
        .heap()
        .root("buffer")
        .expect("root")
        .expect("buffer root");
    assert!(cp().heap().usable_size(buffer).expect("live block") >= BUFFER_LEN);
    report("digest", state_digest());
}

/// Runs random_writes and verify_digest with `extra` environment; returns both value maps.
fn write_then_recover(
    slot: usize,
    extra: &[(&'static str, String)],
) -> (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, String>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = child_env(dir.path(), slot);
    env.extend(extra.iter().cloned());
    let first = run_role(ENTRY, "random_writes", &env);
    assert!(killed_by_sigkill(&first), "{}", describe(&first));
    let second = run_role(ENTRY, "verify_digest", &env);
    assert!(second.status.success(), "{}", describe(&second));
    (values(&first), values(&second), dir)
}

/// The images in the stream-0 store, oldest first: (seq, parent).
fn images(dir: &std::path::Path, app: &str) -> Vec<(u64, Option<u64>)> {
    let store =
        ckpt::Store::open(&dir.join("0"), app, ckpt::StorePolicy::default()).expect("open store");
    store
        .list()
        .expect("list")
        .into_iter()
        .map(|i| (i.seq, i.parent))
        .collect()
}

fn app_of(env: &[(&str, String)]) -> String {
    env.iter()
        .find(|(k, _)| *k == "FT_SERVICE")
        .map(|(_, v)| v.clone())
        .expect("FT_SERVICE set")
}

#[test]
fn many_incremental_checkpoints_recover_the_last_live_state() {
    let (wrote, read, _dir) = write_then_recover(41, &[]);
    assert_eq!(read.get("seq"), wrote.get("last_seq"), "{read:?}");
    assert_eq!(
        read.get("digest"),
        wrote.get("digest"),
        "recovered = live at last checkpoint"
    );
    assert_eq!(
        wrote.get("forks").map(String::as_str),
        Some("0"),
        "{wrote:?}"
    );
}

#[test]
fn hashing_fallback_recovers_the_last_live_state() {
    let (wrote, read, _dir) = write_then_recover(42, &[("FT_DIRTY", "hash".to_owned())]);
    assert_eq!(read.get("seq"), wrote.get("last_seq"));
    assert_eq!(read.get("digest"), wrote.get("digest"));
}

#[test]
fn fork_snapshots_recover_and_never_raise_sigchld() {
    let (wrote, read, _dir) = write_then_recover(
        43,
        &[
            ("FT_CKPT_STAGING_MAX", "0".to_owned()),
            ("FT_TEST_EXPECT", "fork".to_owned()),
            ("FT_TEST_ROUNDS", "10".to_owned()),
        ],
    );
    assert_eq!(
        wrote.get("staged").map(String::as_str),
        Some("0"),
        "{wrote:?}"
    );
    assert_eq!(
        wrote.get("forks").map(String::as_str),
        Some("11"),
        "{wrote:?}"
    );
    assert_eq!(
        wrote.get("sigchld_during_checkpoints").map(String::as_str),
        Some("0"),
        "a snapshot child raised SIGCHLD"
    );
    assert_ne!(
        wrote.get("sigchld_after_true").map(String::as_str),
        Some("0")
    );
    assert_eq!(read.get("seq"), wrote.get("last_seq"));
    assert_eq!(read.get("digest"), wrote.get("digest"));
}

#[test]
fn a_corrupt_newest_image_is_skipped_for_the_previous_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = child_env(dir.path(), 44);
    env.push(("FT_TEST_ROUNDS", "4".to_owned()));
    let first = run_role(ENTRY, "random_writes", &env);
    assert!(killed_by_sigkill(&first), "{}", describe(&first));
    let wrote = values(&first);
    let list = images(dir.path(), &app_of(&env));
    assert!(
        list.iter().any(|(_, p)| p.is_some()),
        "increments were written: {list:?}"
    );
    let (newest, _) = *list.last().expect("images");
    // Flip one byte in the middle of the newest image.
    let path = dir.path().join("0").join(format!("{newest:020}.ckpt"));
    let mut bytes = std::fs::read(&path).expect("read image");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&path, &bytes).expect("write image");

    let second = run_role(ENTRY, "verify_digest", &env);
    assert!(second.status.success(), "{}", describe(&second));
    let read = values(&second);
    let seq: u64 = read["seq"].parse().expect("seq");
    assert_eq!(seq, newest - 1, "{read:?}");
    assert_eq!(
        read.get("digest"),
        wrote.get(&format!("digest_{seq}")),
        "state of image {seq}"
    );
    let report = &read["report"];
    assert!(
        report.contains(&format!("recovered checkpoint {seq}"))
            && report.contains(&format!("skipped newer checkpoint {newest}")),
        "{report}"
    );
}

fn mismatch() {
    let c = cp();
    // SAFETY: statics live for the whole process. One region fewer than the checkpoint has.
    unsafe {
        c.register(HEAD.as_ptr().cast(), size_of::<*mut Node>())
            .expect("register HEAD");
        c.register(COUNTERS.as_ptr() as *mut u8, size_of_val(&COUNTERS))
            .expect("register COUNTERS");
    }
    // SAFETY: nothing touched critical memory.
    let code = unsafe { ft::capi::t_recover(0) };
    report("code", code);
    // SAFETY: valid until the next t_recover.
    let text = unsafe { std::ffi::CStr::from_ptr(ft::capi::t_recover_report()) };
    report("report", text.to_string_lossy());
    assert!(HEAD.load(Ordering::SeqCst).is_null(), "nothing applied");
    assert!(c.heap().alloc(64, 16).is_ok(), "the heap is still usable");
}

#[test]
fn a_different_layout_is_refused_before_anything_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = child_env(dir.path(), 45);
    let first = run_role(ENTRY, "build_list", &env);
    assert!(killed_by_sigkill(&first), "{}", describe(&first));
    let second = run_role(ENTRY, "mismatch", &env);
    assert!(second.status.success(), "{}", describe(&second));
    let got = values(&second);
    assert_eq!(
        got.get("code"),
        Some(&ft::capi::FT_EMISMATCH.to_string()),
        "{got:?}"
    );
    assert!(got["report"].contains("3 regions"), "{got:?}");

    // Another heap address is refused too.
    let mut moved = env.clone();
    moved[1].1 = format!("{:#x}", heap_addr(46));
    let third = run_role(ENTRY, "verify_list", &moved);
    assert!(!third.status.success());
    assert!(
        String::from_utf8_lossy(&third.stderr).contains("FT_HEAP_ADDR"),
        "{}",
        describe(&third)
    );
}

fn periodic() {
    register_globals();
    let heap = cp().heap();
    let buf = heap.alloc(1 << 20, 4096).expect("buffer").as_ptr();
    let start = std::time::Instant::now();
    let mut i = 0usize;
    while start.elapsed() < std::time::Duration::from_millis(400) {
        // SAFETY: inside the buffer.
        unsafe { buf.add(i % (1 << 20)).write(low_byte(i as u64)) };
        i += 4099;
        assert_eq!(ft::capi::t_safe_point(), ft::capi::FT_OK);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(ft::capi::t_checkpoint_wait(0), ft::capi::FT_OK);
    report("done", 1);
}

#[test]
fn ft_ckpt_every_takes_checkpoints_at_safe_points() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = child_env(dir.path(), 47);
    env.push(("FT_CKPT_EVERY", "50ms".to_owned()));
    env.push(("FT_CKPT_KEEP", "100".to_owned()));
    let out = run_role(ENTRY, "periodic", &env);
    assert!(out.status.success(), "{}", describe(&out));
    let list = images(dir.path(), &app_of(&env));
    // At most one per period (plus rounding); at least a few even on a loaded machine.
    assert!(
        (3..=9).contains(&list.len()),
        "{} images in 400 ms at 50 ms: {list:?}",
        list.len()
    );
}
