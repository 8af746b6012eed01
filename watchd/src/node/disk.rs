//! The quorum disk's executors: one performs the lease machine's reads and writes (a dedicated
//! thread with real-time priority: renewals must be on time), the other reads and writes the
//! cluster database's area of the same disk (its own thread and file handle, so a large write
//! never delays a renewal). Each hands its replies back to the node actor.
//!
//! They own the open disk and nothing else: they never decide anything about the lease or the
//! database. A lease operation that waited in the queue longer than the machine's I/O timeout is
//! not performed (the machine already counted it as failed, and a late write must not land),
//! and the disk is reopened after an error so a device that comes back is used again.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster::db::{DiskRecord, read_disk_area, write_disk_area};
use cluster::quorum::{DiskOp, DiskReply, FileDisk, perform};

/// Where lease replies go (the node actor's mailbox).
pub type ReplySink = Arc<dyn Fn(DiskReply) + Send + Sync>;
/// Where database-area replies go.
pub type AreaSink = Arc<dyn Fn(AreaReply) + Send + Sync>;

/// The outcome of an operation on the database area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AreaReply {
    /// A read finished: the newest valid record, or why the read failed.
    Read {
        /// The request's id.
        id: u64,
        /// The record (`None`: never written, or no copy checks out).
        result: Result<Option<Box<DiskRecord>>, String>,
    },
    /// A write finished (durable).
    Written {
        /// The request's id.
        id: u64,
        /// Success, or why not.
        result: Result<(), String>,
    },
}

/// Runs jobs on one disk handle on a thread of its own; the thread ends when the sender goes.
fn worker<J: Send + 'static>(
    name: &'static str,
    path: PathBuf,
    sectors: u64,
    realtime: bool,
    mut run: impl FnMut(&mut FileDisk, J) -> bool + Send + 'static,
    mut fail: impl FnMut(J, &str) + Send + 'static,
    max_wait: Option<Duration>,
) -> std::io::Result<mpsc::Sender<(J, Instant)>> {
    let (tx, rx) = mpsc::channel::<(J, Instant)>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if realtime {
                super::rt::set_realtime(name);
            }
            let mut disk: Option<FileDisk> = None;
            let mut open_error: Option<String> = None;
            while let Ok((job, queued)) = rx.recv() {
                if max_wait.is_some_and(|m| queued.elapsed() >= m) {
                    fail(job, "queued past the I/O timeout; not performed");
                    continue;
                }
                if disk.is_none() {
                    match FileDisk::open(&path, sectors) {
                        Ok(d) => {
                            tracing::info!(
                                thread = name,
                                path = %path.display(),
                                direct = d.is_direct(),
                                "quorum disk opened"
                            );
                            open_error = None;
                            disk = Some(d);
                        }
                        Err(e) => {
                            let why = e.to_string();
                            if open_error.as_deref() != Some(why.as_str()) {
                                tracing::error!(thread = name, error = %why, "cannot open the quorum disk");
                            }
                            fail(job, &why);
                            open_error = Some(why);
                            continue;
                        }
                    }
                }
                let Some(d) = disk.as_mut() else { continue };
                if !run(d, job) {
                    // Reopen next time: the device may have been replaced or remounted.
                    disk = None;
                }
            }
        })?;
    Ok(tx)
}

/// The lease executor.
#[derive(Debug)]
pub struct DiskExecutor {
    tx: mpsc::Sender<((u64, DiskOp), Instant)>,
}

impl DiskExecutor {
    /// Starts the thread for the disk at `path` of at least `sectors` sectors. `io_timeout` is
    /// the lease machine's: older queued operations are answered with an error unperformed.
    pub fn start(
        path: PathBuf,
        sectors: u64,
        io_timeout: Duration,
        reply: ReplySink,
    ) -> std::io::Result<DiskExecutor> {
        let ok = reply.clone();
        let tx = worker(
            "quorum-disk",
            path,
            sectors,
            true,
            move |d, (id, op): (u64, DiskOp)| {
                let r = perform(d, id, &op);
                let sound = !matches!(
                    &r,
                    DiskReply::Read { result: Err(_), .. }
                        | DiskReply::Write { result: Err(_), .. }
                );
                ok(r);
                sound
            },
            move |(id, op), why| reply(failed(id, &op, why)),
            Some(io_timeout),
        )?;
        Ok(DiskExecutor { tx })
    }

    /// Queues one operation; its reply comes through the sink.
    pub fn submit(&self, id: u64, op: DiskOp) {
        if self.tx.send(((id, op), Instant::now())).is_err() {
            tracing::error!("the quorum disk thread is gone");
        }
    }
}

enum AreaJob {
    Read(u64),
    Write(u64, Box<DiskRecord>),
}

/// The database-area executor.
pub struct AreaExecutor {
    tx: mpsc::Sender<(AreaJob, Instant)>,
}

impl std::fmt::Debug for AreaExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AreaExecutor")
    }
}

impl AreaExecutor {
    /// Starts the thread for the database area of the disk at `path` (at least `sectors`
    /// sectors: the lease slots and the area) of the cluster whose hash is `cluster_hash`.
    pub fn start(
        path: PathBuf,
        sectors: u64,
        cluster_hash: u64,
        reply: AreaSink,
    ) -> std::io::Result<AreaExecutor> {
        let ok = reply.clone();
        let tx = worker(
            "quorum-db",
            path,
            sectors,
            false,
            move |d, job: AreaJob| match job {
                AreaJob::Read(id) => {
                    let r = read_disk_area(d, cluster_hash);
                    let sound = r.is_ok();
                    ok(AreaReply::Read {
                        id,
                        result: r.map(|a| a.record.map(Box::new)).map_err(|e| e.to_string()),
                    });
                    sound
                }
                AreaJob::Write(id, record) => {
                    let r = write_disk_area(d, cluster_hash, &record);
                    let sound = r.is_ok();
                    ok(AreaReply::Written {
                        id,
                        result: r.map_err(|e| e.to_string()),
                    });
                    sound
                }
            },
            move |job, why| {
                reply(match job {
                    AreaJob::Read(id) => AreaReply::Read {
                        id,
                        result: Err(why.to_owned()),
                    },
                    AreaJob::Write(id, _) => AreaReply::Written {
                        id,
                        result: Err(why.to_owned()),
                    },
                });
            },
            None,
        )?;
        Ok(AreaExecutor { tx })
    }

    /// Reads the newest valid record of the area.
    pub fn read(&self, id: u64) {
        let _ = self.tx.send((AreaJob::Read(id), Instant::now()));
    }

    /// Writes `record` over the older copy.
    pub fn write(&self, id: u64, record: Box<DiskRecord>) {
        let _ = self.tx.send((AreaJob::Write(id, record), Instant::now()));
    }
}

fn failed(id: u64, op: &DiskOp, why: &str) -> DiskReply {
    match op {
        DiskOp::Read { .. } => DiskReply::Read {
            id,
            result: Err(why.to_owned()),
        },
        DiskOp::Write { .. } => DiskReply::Write {
            id,
            result: Err(why.to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use cluster::db::{DB_AREA_END, DbSnapshot};
    use cluster::quorum::{SECTOR_SIZE, SECTORS_PER_SLOT};

    use super::*;

    #[test]
    fn reads_and_writes_reach_the_file_and_errors_are_replies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qd");
        let (tx, rx) = mpsc::channel();
        let sink: ReplySink = Arc::new(move |r| {
            let _ = tx.send(r);
        });
        let exec = DiskExecutor::start(
            path.clone(),
            2 * SECTORS_PER_SLOT,
            Duration::from_secs(5),
            sink.clone(),
        )
        .expect("start");
        let data = Box::new([7u8; SECTOR_SIZE]);
        exec.submit(1, DiskOp::Write { sector: 1, data });
        let r = rx.recv_timeout(Duration::from_secs(5)).expect("reply");
        assert_eq!(
            r,
            DiskReply::Write {
                id: 1,
                result: Ok(())
            }
        );
        exec.submit(2, DiskOp::Read { first: 0, count: 2 });
        match rx.recv_timeout(Duration::from_secs(5)).expect("reply") {
            DiskReply::Read {
                id: 2,
                result: Ok(s),
            } => {
                assert_eq!(s.len(), 2);
                assert_eq!(s[0], [0u8; SECTOR_SIZE]);
                assert_eq!(s[1], [7u8; SECTOR_SIZE]);
            }
            other => panic!("{other:?}"),
        }
        // A disk that cannot be opened answers every operation with an error.
        let bad = DiskExecutor::start(
            dir.path().join("missing-dir").join("qd"),
            4,
            Duration::from_secs(5),
            sink,
        )
        .expect("start");
        bad.submit(3, DiskOp::Read { first: 0, count: 1 });
        match rx.recv_timeout(Duration::from_secs(5)).expect("reply") {
            DiskReply::Read {
                id: 3,
                result: Err(e),
            } => assert!(!e.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_database_area_round_trips_beside_the_lease_slots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qd");
        let (tx, rx) = mpsc::channel();
        let area = AreaExecutor::start(
            path,
            DB_AREA_END,
            42,
            Arc::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .expect("start");
        area.read(1);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).expect("reply"),
            AreaReply::Read {
                id: 1,
                result: Ok(None)
            }
        );
        let record = DiskRecord {
            committed: DbSnapshot {
                seq: 3,
                epoch: 2,
                ..DbSnapshot::default()
            },
            pending: None,
            written: 2,
        };
        area.write(2, Box::new(record.clone()));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).expect("reply"),
            AreaReply::Written {
                id: 2,
                result: Ok(())
            }
        );
        area.read(3);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).expect("reply"),
            AreaReply::Read {
                id: 3,
                result: Ok(Some(Box::new(record)))
            }
        );
    }
}
