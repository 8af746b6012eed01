//! The worker's choice of stream: by epoch, without the actor or sockets.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::proto::Mode;
use crate::segment::SegmentOptions;
use crate::{Op, OpRecord, RelPath};

/// Longest wait for the worker's answer.
const ANSWER: Duration = Duration::from_secs(10);

struct Harness {
    jobs: std_mpsc::Sender<Job>,
    worker: Option<std::thread::JoinHandle<String>>,
}

impl Harness {
    fn start(dir: &Path) -> Harness {
        let b = Bcplog::open(BackupSpec {
            fileset: "data".into(),
            root: dir.join("replica"),
            state_dir: dir.join("state"),
            segment: SegmentOptions::default(),
        })
        .expect("open");
        let (jobs, rx) = std_mpsc::channel();
        let worker = std::thread::spawn(move || worker(b, rx, "data"));
        Harness {
            jobs,
            worker: Some(worker),
        }
    }

    fn connect(&self, link: u64) -> mpsc::UnboundedReceiver<ToPrimary> {
        let (out, rx) = mpsc::unbounded_channel();
        self.jobs
            .send(Job::Connected { link, out })
            .expect("worker");
        rx
    }

    fn send(&self, link: u64, msg: ToBackup) {
        self.jobs.send(Job::Msg { link, msg }).expect("worker");
    }

    fn status(&self) -> BcplogStatus {
        let (tx, rx) = std_mpsc::channel();
        self.jobs.send(Job::Status(tx)).expect("worker");
        rx.recv_timeout(ANSWER).expect("status")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.jobs.send(Job::Stop);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn hello(generation: u64, epoch: u64) -> ToBackup {
    ToBackup::Hello {
        fileset: "data".into(),
        generation,
        epoch,
        mode: Mode::Async,
    }
}

/// The next message on a link; `None` when the worker closed it.
fn next(rx: &mut mpsc::UnboundedReceiver<ToPrimary>) -> Option<ToPrimary> {
    let deadline = std::time::Instant::now() + ANSWER;
    loop {
        match rx.try_recv() {
            Ok(m) => return Some(m),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {
                assert!(std::time::Instant::now() < deadline, "no answer");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Resyncs from nothing over `link` to generation `generation`, continuing at seq 1.
fn resync(h: &Harness, rx: &mut mpsc::UnboundedReceiver<ToPrimary>, link: u64) {
    h.send(link, ToBackup::ResyncBegin { next_seq: 1 });
    loop {
        match next(rx).expect("manifest") {
            ToPrimary::Manifest { last: true, .. } => break,
            ToPrimary::Manifest { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    h.send(link, ToBackup::ResyncEnd { next_seq: 1 });
    assert_eq!(next(rx), Some(ToPrimary::Ack { durable: 0 }));
}

fn write(seq: u64, path: &str) -> OpRecord {
    OpRecord {
        seq,
        op: Op::Write {
            path: RelPath::new(path.as_bytes()).expect("valid"),
            offset: 0,
            data: b"x".to_vec(),
        },
    }
}

#[test]
fn a_stale_epoch_is_refused_and_the_current_stream_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path());
    let mut new = h.connect(1);
    h.send(1, hello(7, 2));
    assert!(matches!(next(&mut new), Some(ToPrimary::State { .. })));
    resync(&h, &mut new, 1);

    // An old owner's pump (epoch 1) connects and greets: refused, and only its link closes.
    let mut old = h.connect(2);
    h.send(2, hello(5, 1));
    match next(&mut old) {
        Some(ToPrimary::Refused { reason, epoch }) => {
            assert!(reason.contains("stale epoch 1"), "{reason}");
            assert_eq!(epoch, 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(next(&mut old), None, "the refused link is closed");
    // Records it might push after its refusal are not taken.
    h.send(
        2,
        ToBackup::Ops {
            records: vec![write(1, "from-the-old-owner")],
        },
    );
    // The current stream is untouched.
    h.send(
        1,
        ToBackup::Ops {
            records: vec![write(1, "a"), write(2, "b")],
        },
    );
    assert_eq!(next(&mut new), Some(ToPrimary::Ack { durable: 2 }));
    let st = h.status();
    assert!(st.connected, "{st:?}");
    assert_eq!((st.counters.epoch, st.counters.received), (2, 2), "{st:?}");
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("stale epoch")),
        "{st:?}"
    );
}

#[test]
fn a_newer_epoch_takes_over_and_the_old_link_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path());
    let mut old = h.connect(1);
    h.send(1, hello(7, 1));
    assert!(matches!(next(&mut old), Some(ToPrimary::State { .. })));
    resync(&h, &mut old, 1);
    h.send(
        1,
        ToBackup::Ops {
            records: vec![write(1, "a")],
        },
    );
    assert_eq!(next(&mut old), Some(ToPrimary::Ack { durable: 1 }));

    // A new connection that has not greeted yet does not disturb the stream.
    let mut new = h.connect(2);
    h.send(
        1,
        ToBackup::Ops {
            records: vec![write(2, "b")],
        },
    );
    assert_eq!(next(&mut old), Some(ToPrimary::Ack { durable: 2 }));

    // Its Hello with a newer epoch and another generation takes over: the old link closes at
    // once; the backup reports the stream it follows, which the new pump (another generation)
    // answers with a resync.
    h.send(2, hello(9, 2));
    assert_eq!(next(&mut old), None, "the old pump's link is closed");
    assert_eq!(
        next(&mut new),
        Some(ToPrimary::State {
            generation: 7,
            durable: 2
        })
    );
    // Whatever the old pump still sends is ignored.
    h.send(
        1,
        ToBackup::Ops {
            records: vec![write(3, "late")],
        },
    );
    let st = h.status();
    assert_eq!((st.counters.epoch, st.counters.received), (2, 2), "{st:?}");
    resync(&h, &mut new, 2);
    let st = h.status();
    assert_eq!(st.counters.generation, 9, "{st:?}");
    // The epoch is durable: after a restart the old pump is still refused.
    drop(h);
    let h = Harness::start(dir.path());
    let mut again = h.connect(1);
    h.send(1, hello(7, 1));
    assert!(
        matches!(next(&mut again), Some(ToPrimary::Refused { .. })),
        "a restarted backup still refuses epoch 1"
    );
}

#[test]
fn a_promoted_bcplog_serves_no_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path());
    let mut link = h.connect(1);
    h.send(1, hello(7, 1));
    assert!(matches!(next(&mut link), Some(ToPrimary::State { .. })));
    resync(&h, &mut link, 1);
    h.send(
        1,
        ToBackup::Ops {
            records: vec![write(1, "a")],
        },
    );
    assert_eq!(next(&mut link), Some(ToPrimary::Ack { durable: 1 }));
    let (tx, rx) = std_mpsc::channel();
    h.jobs.send(Job::Promote(tx)).expect("worker");
    let p = rx.recv_timeout(ANSWER).expect("answer").expect("promoted");
    assert_eq!(p.applied, 1);
    assert!(dir.path().join("replica/a").exists());
    assert_eq!(next(&mut link), None, "the stream is closed");
    let mut late = h.connect(2);
    h.send(2, hello(7, 1));
    assert_eq!(
        next(&mut late),
        None,
        "no stream is served after a promotion"
    );
}
