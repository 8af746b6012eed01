//! Tests of the operation ring: round trips, wrap-around, concurrency across threads and
//! forked processes, back-pressure, consumer restarts, dead producers, hostile mappings.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::*;
use crate::replog::codec::sample_ops;
use crate::replog::op::{Op, RelPath};

const CAP: u64 = MIN_CAPACITY;
const WAIT: Duration = Duration::from_secs(10);

fn quick() -> ConsumerOptions {
    ConsumerOptions {
        abandon_after: Duration::from_millis(50),
        stuck_after: Duration::from_millis(300),
        linger: Duration::from_millis(1),
    }
}

fn new_ring(dir: &tempfile::TempDir, sync: bool) -> Ring {
    Ring::create(&dir.path().join("ring"), CAP, sync).expect("create ring")
}

/// A consumer on a ring whose previous consumer was just dropped. The lock may still be held
/// for a moment: children forked by concurrently running tests inherit every descriptor of
/// this process (the same holds for a child of watchd between fork and exec).
fn reopen_consumer(path: &std::path::Path) -> Consumer {
    let start = Instant::now();
    loop {
        match Ring::open(path).expect("open").consumer(quick()) {
            Ok(c) => return c,
            Err(RingError::ConsumerBusy(_)) if start.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("consumer: {e}"),
        }
    }
}

fn rp(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("valid")
}

fn expect_op(c: &mut Consumer) -> (u64, Op) {
    match c
        .next(WAIT)
        .expect("next")
        .expect("an item within the wait")
    {
        RingItem::Op { seq, op } => (seq, op),
        other => panic!("expected an op, got {other:?}"),
    }
}

/// A forked child, killed and reaped on drop.
struct Child(libc::pid_t);

impl Child {
    /// Forks; the child runs `body` (which must not allocate in ways that can deadlock after
    /// fork: ring appends don't) and exits 0, or 101 if it panicked.
    fn fork(body: impl FnOnce()) -> Child {
        // SAFETY: the child only runs `body` and then _exit, never returning into the harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_ok();
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 101 }) };
        }
        Child(pid)
    }

    fn kill9(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }

    fn wait(&mut self) -> i32 {
        let mut status = 0;
        // SAFETY: reaping our own child; status is a valid out pointer.
        let r = unsafe { libc::waitpid(self.0, &raw mut status, 0) };
        self.0 = 0;
        assert!(r > 0, "waitpid failed");
        status
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.0 > 0 {
            self.kill9();
            let _ = self.wait();
        }
    }
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn every_kind_round_trips_with_dense_seqs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = new_ring(&dir, false);
    let ops = sample_ops();
    for op in &ops {
        let t = ring.append(OpRef::from_op(op)).expect("append");
        assert!(!t.sync());
        assert_eq!(t.generation(), ring.generation());
    }
    let mut c = ring.consumer(quick()).expect("consumer");
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(expect_op(&mut c), (i as u64 + 1, op.clone()));
    }
    assert_eq!(c.next(Duration::from_millis(5)).expect("next"), None);
    assert_eq!(c.delivered_seq(), ops.len() as u64);
}

#[test]
fn invalid_paths_are_refused_by_the_producer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = new_ring(&dir, false);
    for path in [&b"../x"[..], b"/abs", b"", b"a//b"] {
        assert!(matches!(
            ring.append(OpRef::Unlink { path }),
            Err(RingError::Path(_))
        ));
    }
    assert!(matches!(
        ring.append(OpRef::Symlink {
            target: b"a\0b",
            path: b"l"
        }),
        Err(RingError::Path(_))
    ));
    assert_eq!(ring.tail().load(Ordering::Relaxed), 0, "nothing reserved");
}

#[test]
fn wraps_around_with_pad_records_and_splits_large_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Arc::new(new_ring(&dir, false));
    let producer = Ring::open(&dir.path().join("ring")).expect("open");
    let mut c = Ring::open(&dir.path().join("ring"))
        .expect("open")
        .consumer(quick())
        .expect("consumer");
    let mut seq = 0;
    let mut pads_seen = 0;
    let mut last_tail_lap = 0;
    // Sizes chosen so records regularly meet the end of the area at odd places.
    for i in 0..600u64 {
        let len = usize::try_from((i * 977) % 9000).expect("small");
        let data = vec![u8::try_from(i % 251).expect("small"); len];
        producer
            .append(OpRef::Write {
                path: b"f",
                offset: i,
                data: &data,
            })
            .expect("append");
        seq += 1;
        let (s, op) = expect_op(&mut c);
        assert_eq!(s, seq);
        assert_eq!(
            op,
            Op::Write {
                path: rp("f"),
                offset: i,
                data
            }
        );
        c.release_through(s).expect("release");
        let lap = ring.tail().load(Ordering::Relaxed) / CAP;
        if lap != last_tail_lap {
            last_tail_lap = lap;
            pads_seen += 1;
        }
    }
    assert!(pads_seen >= 10, "only {pads_seen} laps");

    // A write larger than capacity/4 becomes several records covering it exactly.
    let big: Vec<u8> = (0..40_000u32).map(|i| (i % 253).to_le_bytes()[0]).collect();
    let t = producer
        .append(OpRef::Write {
            path: b"big",
            offset: 1000,
            data: &big,
        })
        .expect("append big");
    let mut rebuilt = Vec::new();
    while rebuilt.len() < big.len() {
        let (s, op) = expect_op(&mut c);
        let Op::Write { offset, data, .. } = op else {
            panic!("expected a write")
        };
        assert_eq!(offset, 1000 + rebuilt.len() as u64);
        assert!(data.len() as u64 <= CAP / 4);
        rebuilt.extend_from_slice(&data);
        c.release_through(s).expect("release");
    }
    assert_eq!(rebuilt, big);
    assert!(ring.is_durable(t), "the ticket covers the last piece");
}

#[test]
fn vectored_writes_larger_than_a_record_are_split_across_buffers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = new_ring(&dir, false);
    let parts: Vec<Vec<u8>> = (0..7u8)
        .map(|i| vec![i; 5000 + usize::from(i) * 333])
        .collect();
    let slices: Vec<std::io::IoSlice<'_>> =
        parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
    let whole: Vec<u8> = parts.concat();
    ring.append(OpRef::WriteVectored {
        path: b"v",
        offset: 7,
        data: &slices,
    })
    .expect("append");
    let mut c = ring.consumer(quick()).expect("consumer");
    let mut rebuilt = Vec::new();
    while rebuilt.len() < whole.len() {
        let Op::Write { offset, data, .. } = expect_op(&mut c).1 else {
            panic!("expected a write")
        };
        assert_eq!(offset, 7 + rebuilt.len() as u64);
        rebuilt.extend_from_slice(&data);
    }
    assert_eq!(rebuilt, whole);
    assert!(c.delivered_seq() > 1, "split into several records");
}

#[test]
fn a_published_record_that_does_not_decode_is_skipped_as_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = new_ring(&dir, false);
    let ops = sample_ops();
    let mut starts = Vec::new();
    for op in ops.iter().take(4) {
        starts.push(ring.tail().load(Ordering::Relaxed));
        ring.append(OpRef::from_op(op)).expect("append");
    }
    // Record 2: an unknown kind byte. Record 3: an unknown state.
    let w = ring.word(starts[1] + RECORD_HEADER).load(Ordering::Relaxed);
    ring.word(starts[1] + RECORD_HEADER)
        .store((w & !0xff) | 99, Ordering::Relaxed);
    let w1 = ring.word(starts[2] + 8).load(Ordering::Relaxed);
    ring.word(starts[2] + 8)
        .store((w1 & !0xffff_ffff) | 7, Ordering::Relaxed);
    let mut c = ring.consumer(quick()).expect("consumer");
    assert_eq!(expect_op(&mut c), (1, ops[0].clone()));
    assert_eq!(
        c.next(WAIT).expect("next"),
        Some(RingItem::Invalid {
            seq: 2,
            error: RecordError::Decode(DecodeError::UnknownKind(99))
        })
    );
    assert_eq!(
        c.next(WAIT).expect("next"),
        Some(RingItem::Invalid {
            seq: 3,
            error: RecordError::State(7)
        })
    );
    assert_eq!(expect_op(&mut c), (4, ops[3].clone()));
    c.release_through(4).expect("release");
}

#[test]
fn threads_and_processes_produce_concurrently_exactly_once_in_order() {
    const THREADS: u64 = 3;
    const PROCS: u64 = 3;
    const PER_PRODUCER: u64 = 3000;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = Arc::new(new_ring(&dir, false));
    // Fork before any thread of this test exists.
    let start = Arc::new(Barrier::new(usize::try_from(THREADS + 1).expect("small")));
    let go = dir.path().join("go");
    let mut children: Vec<Child> = (0..PROCS)
        .map(|p| {
            let ring = Arc::clone(&ring);
            let go = go.clone();
            Child::fork(move || {
                while !go.exists() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                produce(&ring, THREADS + p, PER_PRODUCER);
            })
        })
        .collect();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let ring = Arc::clone(&ring);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                produce(&ring, t, PER_PRODUCER);
            })
        })
        .collect();
    std::fs::write(&go, b"").expect("start the children");
    start.wait();

    let mut c = Ring::open(&path)
        .expect("open")
        .consumer(quick())
        .expect("consumer");
    let mut next_expected: HashMap<u64, u64> = HashMap::new();
    let total = (THREADS + PROCS) * PER_PRODUCER;
    for n in 1..=total {
        let (seq, op) = expect_op(&mut c);
        assert_eq!(seq, n);
        let Op::Write { path, offset, data } = op else {
            panic!("expected writes")
        };
        let producer: u64 = path.to_string()[1..].parse().expect("p<N>");
        let expected = next_expected.entry(producer).or_insert(0);
        assert_eq!(offset, *expected, "producer {producer} out of order");
        assert_eq!(data, record_data(producer, offset));
        *expected += 1;
        // Release in batches, as the pump does after acks.
        if n % 64 == 0 {
            c.release_through(seq).expect("release");
        }
    }
    for t in threads {
        t.join().expect("producer thread");
    }
    for child in &mut children {
        assert_eq!(child.wait(), 0, "child producer failed");
    }
    assert_eq!(c.next(Duration::from_millis(20)).expect("next"), None);
    assert!(next_expected.values().all(|&v| v == PER_PRODUCER));
}

fn record_data(producer: u64, i: u64) -> Vec<u8> {
    let len = usize::try_from((producer * 131 + i * 17) % 700).expect("small");
    vec![u8::try_from((producer + i) % 256).expect("small"); len]
}

fn produce(ring: &Ring, producer: u64, count: u64) {
    let path = format!("p{producer}");
    for i in 0..count {
        let data = record_data(producer, i);
        ring.append(OpRef::Write {
            path: path.as_bytes(),
            offset: i,
            data: &data,
        })
        .expect("append");
    }
}

#[test]
fn a_full_ring_makes_producers_wait_until_space_is_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = Arc::new(new_ring(&dir, false));
    let data = vec![7u8; 4000];
    let append = |r: &Ring| {
        r.append(OpRef::Write {
            path: b"f",
            offset: 0,
            data: &data,
        })
    };
    let mut n = 0u64;
    while ring.tail().load(Ordering::Relaxed) + 4096 <= CAP {
        append(&ring).expect("room");
        n += 1;
    }
    // With a short timeout and no consumer, a full ring is an error.
    let mut impatient = Ring::open(&path).expect("open");
    impatient.set_full_timeout(Duration::from_millis(50));
    let t0 = Instant::now();
    assert!(matches!(append(&impatient), Err(RingError::Full(_))));
    assert!(t0.elapsed() >= Duration::from_millis(50));

    // A patient producer waits, and proceeds once the consumer releases.
    let t0 = Instant::now();
    let blocked = {
        let ring = Arc::clone(&ring);
        let data = data.clone();
        std::thread::spawn(move || {
            ring.append(OpRef::Write {
                path: b"f",
                offset: 0,
                data: &data,
            })
            .expect("proceeds after release");
            t0.elapsed()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!blocked.is_finished(), "the producer must wait for space");
    let mut c = Ring::open(&path)
        .expect("open")
        .consumer(quick())
        .expect("consumer");
    let (first, _) = expect_op(&mut c);
    c.release_through(first).expect("release");
    let waited = blocked.join().expect("producer");
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    for _ in 1..=n {
        expect_op(&mut c);
    }
}

#[test]
fn a_restarted_consumer_redelivers_unreleased_records_with_the_same_seqs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = new_ring(&dir, false);
    let ops = sample_ops();
    for op in &ops {
        ring.append(OpRef::from_op(op)).expect("append");
    }
    let mut c = ring.consumer(quick()).expect("consumer");
    for _ in 0..ops.len() {
        expect_op(&mut c);
    }
    c.release_through(4).expect("release");
    assert!(matches!(
        c.release_through(99),
        Err(RingError::SeqOutOfRange { .. })
    ));
    // Only one consumer at a time.
    assert!(matches!(
        Ring::open(&path).expect("open").consumer(quick()),
        Err(RingError::ConsumerBusy(_))
    ));
    drop(c);

    let mut c = reopen_consumer(&path);
    assert_eq!(c.head_seq(), 5);
    for (i, op) in ops.iter().enumerate().skip(4) {
        assert_eq!(expect_op(&mut c), (i as u64 + 1, op.clone()));
    }
    // Seek back to an unreleased seq (a backup resuming) and forward again.
    c.seek(7).expect("seek back");
    assert_eq!(expect_op(&mut c), (7, ops[6].clone()));
    assert!(matches!(c.seek(3), Err(RingError::SeqOutOfRange { .. })));
    c.seek(ops.len() as u64 + 1).expect("seek to the end");
    assert_eq!(c.next(Duration::from_millis(5)).expect("next"), None);
}

#[test]
fn a_consumer_dying_between_commit_and_publish_is_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = new_ring(&dir, false);
    for op in sample_ops().iter().take(3) {
        ring.append(OpRef::from_op(op)).expect("append");
    }
    let mut c = ring.consumer(quick()).expect("consumer");
    let (s1, _) = expect_op(&mut c);
    let (s2, _) = expect_op(&mut c);
    c.release_through(s2).expect("release");
    let released = c.ring().head().load(Ordering::Relaxed);
    assert_eq!((s1, s2), (1, 2));
    // Simulate death after the commit but before zeroing and publishing the head.
    c.ring().head().store(0, Ordering::Relaxed);
    c.ring().word(8).store(0xdead_beef, Ordering::Relaxed);
    drop(c);
    let mut c = reopen_consumer(&path);
    assert_eq!(c.ring().head().load(Ordering::Relaxed), released);
    assert_eq!(c.ring().word(8).load(Ordering::Relaxed), 0, "re-zeroed");
    assert_eq!(expect_op(&mut c).0, 3);
}

#[test]
fn sync_mode_waits_for_release_and_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = Arc::new(new_ring(&dir, true));
    assert!(ring.is_sync());
    let t = ring.append(OpRef::Fsync { path: b"f" }).expect("append");
    assert!(t.sync());
    let t0 = Instant::now();
    assert!(matches!(
        ring.wait_durable(t, Duration::from_millis(50)),
        Err(RingError::NotDurable(_))
    ));
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert!(!ring.is_durable(t));

    let waiter = {
        let ring = Arc::clone(&ring);
        std::thread::spawn(move || ring.wait_durable(t, WAIT))
    };
    let mut c = Ring::open(&path)
        .expect("open")
        .consumer(quick())
        .expect("consumer");
    let (seq, _) = expect_op(&mut c);
    std::thread::sleep(Duration::from_millis(20));
    assert!(!waiter.is_finished(), "durable only after release");
    c.release_through(seq).expect("release");
    waiter.join().expect("waiter").expect("durable");
    assert!(ring.is_durable(t));

    ring.set_sync(false);
    let t2 = ring.append(OpRef::Fsync { path: b"f" }).expect("append");
    assert!(!t2.sync());

    // A ticket of another ring is refused; retiring wakes and fails waiters.
    let other = Ring::create(&dir.path().join("other"), CAP, true).expect("create");
    assert!(matches!(
        other.wait_durable(t2, WAIT),
        Err(RingError::WrongRing { .. })
    ));
    let waiter = {
        let ring = Arc::clone(&ring);
        std::thread::spawn(move || ring.wait_durable(t2, WAIT))
    };
    std::thread::sleep(Duration::from_millis(20));
    ring.retire();
    assert!(matches!(
        waiter.join().expect("waiter"),
        Err(RingError::Retired)
    ));
}

#[test]
fn create_retires_the_previous_ring_and_producers_see_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let old = Ring::create(&path, CAP, false).expect("create");
    let producer = Ring::open(&path).expect("open");
    let new = Ring::create(&path, CAP * 2, false).expect("re-create");
    assert_ne!(old.generation(), new.generation());
    assert!(old.is_retired() && producer.is_retired() && !new.is_retired());
    assert!(matches!(
        producer.append(OpRef::Unlink { path: b"x" }),
        Err(RingError::Retired)
    ));
    let reopened = Ring::open(&path).expect("reopen");
    assert_eq!(reopened.generation(), new.generation());
    assert_eq!(reopened.capacity(), CAP * 2);
    assert!(matches!(
        Ring::create(&dir.path().join("bad"), CAP + 1, false),
        Err(RingError::Capacity(_))
    ));
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ring")]);
}

/// Forks a producer that stops at `point` of an append, and waits until it reserved.
fn producer_stopped_at(ring: &Arc<Ring>, point: u8) -> Child {
    let before = ring.tail().load(Ordering::Acquire);
    let child = {
        let ring = Arc::clone(ring);
        Child::fork(move || {
            test_hooks::PAUSE_AT.store(point, Ordering::Relaxed);
            let _ = ring.append(OpRef::Write {
                path: b"lost",
                offset: 0,
                data: b"never published",
            });
        })
    };
    wait_until("the child's reservation", || {
        ring.tail().load(Ordering::Acquire) > before
            && (point == test_hooks::AFTER_RESERVE
                || ring.word(before).load(Ordering::Acquire) != 0)
    });
    child
}

#[test]
fn a_producer_killed_between_reserve_and_publish_is_abandoned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = Arc::new(new_ring(&dir, false));
    ring.append(OpRef::Unlink { path: b"before" })
        .expect("append");
    // Killed and left a zombie: the pid exists but no longer maps the ring.
    let zombie = producer_stopped_at(&ring, test_hooks::AFTER_HEADER);
    // Killed and reaped.
    let mut reaped = producer_stopped_at(&ring, test_hooks::AFTER_HEADER);
    ring.append(OpRef::Unlink { path: b"after" })
        .expect("append");
    let (zpid, rpid) = (
        u32::try_from(zombie.0).expect("pid"),
        u32::try_from(reaped.0).expect("pid"),
    );

    let mut c = Ring::open(&path)
        .expect("open")
        .consumer(quick())
        .expect("consumer");
    assert_eq!(expect_op(&mut c).0, 1);
    // Alive: not abandoned (the consumer waits).
    assert_eq!(c.next(Duration::from_millis(100)).expect("next"), None);
    zombie.kill9();
    reaped.kill9();
    let _ = reaped.wait();
    assert_eq!(
        c.next(WAIT).expect("next"),
        Some(RingItem::Abandoned { seq: 2, pid: zpid })
    );
    assert_eq!(
        c.next(WAIT).expect("next"),
        Some(RingItem::Abandoned { seq: 3, pid: rpid })
    );
    assert_eq!(expect_op(&mut c), (4, Op::Unlink { path: rp("after") }));
    // Seeking back re-delivers the abandoned records at once, with their seqs.
    c.seek(2).expect("seek");
    assert_eq!(
        c.next(Duration::ZERO).expect("next"),
        Some(RingItem::Abandoned { seq: 2, pid: zpid })
    );
    c.release_through(4)
        .expect("release past the abandoned records");
    drop(zombie);
}

#[test]
fn a_reservation_that_never_gets_completed_is_stuck() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = Arc::new(new_ring(&dir, false));
    // No header at all: the producer died right after its CAS.
    let child = producer_stopped_at(&ring, test_hooks::AFTER_RESERVE);
    child.kill9();
    let mut c = Ring::open(&path)
        .expect("open")
        .consumer(quick())
        .expect("consumer");
    let t0 = Instant::now();
    let err = loop {
        match c.next(WAIT) {
            Ok(None) => assert!(t0.elapsed() < WAIT, "never reported stuck"),
            Ok(Some(item)) => panic!("unexpected {item:?}"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, RingError::Stuck { seq: 1, pid: 0, .. }),
        "{err}"
    );
    drop(child);

    // A live producer that never publishes is stuck too, not abandoned.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = Arc::new(new_ring(&dir, false));
    let child = producer_stopped_at(&ring, test_hooks::AFTER_HEADER);
    let mut c = Ring::open(&path)
        .expect("open")
        .consumer(quick())
        .expect("consumer");
    let err = loop {
        match c.next(WAIT) {
            Ok(None) => {}
            Ok(Some(item)) => panic!("unexpected {item:?}"),
            Err(e) => break e,
        }
    };
    let pid = u32::try_from(child.0).expect("pid");
    assert!(
        matches!(err, RingError::Stuck { seq: 1, pid: p, .. } if p == pid),
        "{err}"
    );
}

/// splitmix64: deterministic garbage for the hostile-mapping tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Drives a consumer over whatever is in the ring; only errors may come out, never a panic.
fn drain_hostile(path: &std::path::Path, rng: &mut Rng) {
    let options = ConsumerOptions {
        abandon_after: Duration::ZERO,
        stuck_after: Duration::from_millis(1),
        linger: Duration::ZERO,
    };
    let Ok(ring) = Ring::open(path) else { return };
    let Ok(mut c) = ring.consumer(options) else {
        return;
    };
    for _ in 0..200 {
        match c.next(Duration::from_millis(2)) {
            Ok(Some(item)) => {
                if rng.below(3) == 0 {
                    let _ = c.release_through(item.seq());
                }
                if rng.below(7) == 0 {
                    let _ = c.seek(rng.below(item.seq() + 2));
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = c.release_through(c.delivered_seq());
}

#[test]
fn garbage_in_the_mapping_gives_errors_never_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    for seed in 0..150u64 {
        let mut rng = Rng(seed);
        let ring = Ring::create(&path, CAP, false).expect("create");
        // Start from a plausible ring: real records, some released.
        for op in sample_ops()
            .iter()
            .cycle()
            .take(usize::try_from(rng.below(40)).expect("small"))
        {
            ring.append(OpRef::from_op(op)).expect("append");
        }
        let tail = ring.tail().load(Ordering::Relaxed);
        let data_words = CAP / 8;
        match seed % 4 {
            // Random words in the used part of the data area.
            0 => {
                for _ in 0..rng.below(20) + 1 {
                    let at = rng.below(tail.max(8) / 8) * 8;
                    ring.word(at).store(rng.next(), Ordering::Relaxed);
                }
            }
            // Plausible-looking headers with wrong lengths, states and pids.
            1 => {
                for _ in 0..rng.below(10) + 1 {
                    let at = rng.below(tail.max(8) / 8) * 8;
                    let len = rng.below(CAP * 2) & !if rng.below(2) == 0 { 7 } else { 0 };
                    let pad = if rng.below(4) == 0 {
                        u64::from(PAD_FLAG)
                    } else {
                        0
                    };
                    ring.word(at).store(
                        (len & 0xffff_ffff) | pad | (rng.next() << 32),
                        Ordering::Relaxed,
                    );
                    ring.word(at + 8)
                        .store(rng.below(5) | (rng.below(CAP) << 32), Ordering::Relaxed);
                }
            }
            // Random header fields: tail, head, commit slots.
            2 => {
                let fields = [
                    OFF_TAIL,
                    OFF_HEAD,
                    OFF_COMMIT_COUNTER,
                    OFF_COMMIT_SLOTS,
                    OFF_COMMIT_SLOTS + 8,
                ];
                for _ in 0..rng.below(3) + 1 {
                    let f = fields[usize::try_from(rng.below(5)).expect("small")];
                    let v = match rng.below(3) {
                        0 => rng.next(),
                        1 => rng.below(tail + 64),
                        _ => rng.below(CAP * 3) & !7,
                    };
                    ring.u64_at(f).store(v, Ordering::Relaxed);
                }
            }
            // Everything random.
            _ => {
                for w in 0..data_words {
                    ring.word(w * 8).store(rng.next(), Ordering::Relaxed);
                }
                ring.tail()
                    .store(rng.below(CAP + 1) & !7, Ordering::Relaxed);
            }
        }
        drain_hostile(&path, &mut rng);
    }

    // A header page of random bytes is refused by open.
    for seed in 0..100u64 {
        let mut rng = Rng(seed);
        let mut bytes: Vec<u8> = (0..4096 + CAP)
            .map(|_| rng.next().to_le_bytes()[0])
            .collect();
        if seed % 2 == 0 {
            bytes[..8].copy_from_slice(&MAGIC.to_le_bytes());
        }
        std::fs::write(&path, &bytes).expect("write");
        assert!(matches!(
            Ring::open(&path),
            Err(RingError::BadHeader { .. })
        ));
    }
    std::fs::write(&path, b"short").expect("write");
    assert!(Ring::open(&path).is_err());
}

#[test]
fn a_producer_scribbling_concurrently_cannot_make_the_consumer_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let ring = Arc::new(new_ring(&dir, false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            let ring = Arc::clone(&ring);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut rng = Rng(w);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if w == 0 {
                        // Errors (a scribbled tail, the final retire) are expected here.
                        let _ = ring.append(OpRef::Write {
                            path: b"f",
                            offset: i,
                            data: &[1, 2, 3],
                        });
                        i += 1;
                    } else {
                        let tail = ring.tail().load(Ordering::Relaxed);
                        let at = tail.saturating_sub(rng.below(4096)) & !7;
                        ring.word(at).store(rng.next(), Ordering::Relaxed);
                        if rng.below(50) == 0 {
                            ring.tail().store(rng.next() & !7, Ordering::Relaxed);
                        }
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let options = ConsumerOptions {
        abandon_after: Duration::ZERO,
        stuck_after: Duration::from_millis(1),
        linger: Duration::ZERO,
    };
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut errors = 0;
    while Instant::now() < deadline {
        let Ok(mut c) = Ring::open(&path).expect("open").consumer(options) else {
            continue;
        };
        loop {
            match c.next(Duration::from_millis(1)) {
                Ok(Some(item)) => {
                    let _ = c.release_through(item.seq());
                }
                Ok(None) => {}
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    ring.retire();
    for w in workers {
        w.join().expect("worker");
    }
    assert!(errors > 0, "the scribbler was noticed");
}

/// Micro-benchmark of the producer's hot path (a 4 KiB write). Run it optimized:
/// `cargo test --release -p ft --lib bench_append -- --ignored --nocapture`.
/// Prints the producer alone (ring pre-faulted, the consumer drains between rounds, untimed)
/// and with a consumer thread draining and releasing concurrently, for two ring sizes.
#[test]
#[ignore = "benchmark: prints ns/op"]
fn bench_append_4k_write() {
    let data = vec![0x5au8; 4096];
    let mut copy_dst = vec![0u8; 4096];
    let rounds = 200_000u64;
    let t0 = Instant::now();
    for i in 0..rounds {
        copy_dst.copy_from_slice(&data);
        std::hint::black_box(&mut copy_dst);
        std::hint::black_box(i);
    }
    let copy_ns = t0.elapsed().as_nanos() as f64 / rounds as f64;
    println!("a 4 KiB memcpy (cache-hot): {copy_ns:.0} ns");
    for capacity in [4u64 << 20, 64 << 20] {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let path = dir.path().join("ring");
        let ring = Ring::create(&path, capacity, false).expect("create");
        let mut c = Ring::open(&path)
            .expect("open")
            .consumer(ConsumerOptions::default())
            .expect("consumer");
        let append = |i: u64| {
            ring.append(OpRef::Write {
                path: b"dir/some-file.dat",
                offset: i * 4096,
                data: &data,
            })
            .expect("append");
        };
        let per_round = capacity / 4200;
        let mut timed = Duration::ZERO;
        let mut n = 0u64;
        for round in 0..8 {
            let t0 = Instant::now();
            for i in 0..per_round {
                append(i);
            }
            if round > 0 {
                timed += t0.elapsed();
                n += per_round;
            }
            let mut last = 0;
            while let Some(item) = c.next(Duration::ZERO).expect("next") {
                last = item.seq();
            }
            c.release_through(last).expect("release");
        }
        println!(
            "ring {} MiB, producer alone: {:.0} ns/op",
            capacity >> 20,
            timed.as_nanos() as f64 / n as f64
        );
        let total = 300_000u64;
        let drainer = std::thread::spawn(move || {
            let mut seen = 0;
            while seen < total {
                if let Some(item) = c.next(WAIT).expect("next") {
                    seen += 1;
                    if seen % 256 == 0 || seen == total {
                        c.release_through(item.seq()).expect("release");
                    }
                }
            }
        });
        let t0 = Instant::now();
        for i in 0..total {
            append(i);
        }
        let ns = t0.elapsed().as_nanos() as f64 / total as f64;
        drainer.join().expect("consumer");
        println!(
            "ring {} MiB, with a concurrent consumer: {ns:.0} ns/op",
            capacity >> 20
        );
    }
}

#[test]
fn a_large_ring_is_mapped_aligned_for_huge_pages_and_every_chunk_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ring");
    let cap = 4 * HUGE_PAGE as u64;
    let ring = Ring::create(&path, cap, false).expect("create ring");
    let producer = Ring::open(&path).expect("open");
    for r in [&ring, &producer] {
        assert_eq!(
            r.map.base.as_ptr() as usize % HUGE_PAGE,
            0,
            "huge-page aligned"
        );
    }
    let mut consumer = ring.consumer(quick()).expect("consumer");
    // Writes of a quarter chunk wrap the area more than once, so every chunk is populated
    // (and every record crosses from populated bytes into the next chunk at some point).
    let data: Vec<u8> = (0..POPULATE_CHUNK / 4 + 8)
        .map(|i| (i % 251) as u8)
        .collect();
    let rounds = 3 * cap / (POPULATE_CHUNK / 4);
    for i in 0..rounds {
        producer
            .append(OpRef::Write {
                path: b"f",
                offset: i,
                data: &data,
            })
            .expect("append");
        let (seq, op) = expect_op(&mut consumer);
        assert_eq!(seq, i + 1);
        assert_eq!(
            op,
            Op::Write {
                path: rp("f"),
                offset: i,
                data: data.clone()
            }
        );
        consumer.release_through(seq).expect("release");
    }
    let words = &producer.populated.done;
    let chunks = cap / POPULATE_CHUNK;
    let marked: u64 = words
        .iter()
        .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
        .sum();
    assert!(
        producer.populated.unsupported.load(Ordering::Relaxed) || marked == chunks,
        "{marked} of {chunks} chunks populated"
    );
}
