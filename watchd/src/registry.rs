//! The durable registry of running services: which pid (and start time, and cgroup) each
//! service's main process has, so a restarted watchd can re-adopt them instead of restarting.
//!
//! Kept in redb under the data directory. Writes go through one writer thread, in order, so
//! that an fsync never runs on an actor's event loop. A record that cannot be decoded is
//! reported and skipped, never a panic.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");

/// The registry file's name inside the data directory.
pub const REGISTRY_FILE: &str = "registry.redb";

/// What is recorded of a running service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Main pid.
    pub pid: u32,
    /// Start time of that pid (clock ticks since boot), to tell it from a reused pid.
    pub start_time: u64,
    /// The service's cgroup, when it has one.
    pub cgroup: Option<PathBuf>,
    /// When it was spawned (milliseconds since the Unix epoch).
    pub spawned_unix_ms: u64,
}

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The database could not be opened or used.
    #[error("registry {path}: {source}")]
    Db {
        /// The file.
        path: PathBuf,
        /// The redb error.
        #[source]
        source: Box<redb::Error>,
    },
}

/// The registry. Cloning shares it; the last clone dropped flushes and closes the database.
#[derive(Debug, Clone)]
pub struct Registry {
    path: PathBuf,
    db: std::sync::Arc<Database>,
    writer: mpsc::Sender<Op>,
    _closer: std::sync::Arc<Closer>,
}

/// Joins the writer thread when the last handle goes, so the file is closed when `Registry` is.
#[derive(Debug)]
struct Closer {
    writer: std::sync::Mutex<Option<mpsc::Sender<Op>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        drop(self.writer.lock().ok().and_then(|mut w| w.take()));
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
enum Op {
    Put(String, Record),
    Remove(String),
    Sync(mpsc::Sender<()>),
}

impl Registry {
    /// Opens (or creates) the registry in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Registry, RegistryError> {
        let path = data_dir.join(REGISTRY_FILE);
        let err = |e: redb::Error| RegistryError::Db {
            path: path.clone(),
            source: Box::new(e),
        };
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        // Make sure the table exists so readers never see "no such table".
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(SERVICES).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        let db = std::sync::Arc::new(db);
        let (tx, rx) = mpsc::channel::<Op>();
        let wdb = db.clone();
        let wpath = path.clone();
        let thread = std::thread::Builder::new()
            .name("registry-writer".into())
            .spawn(move || writer_loop(&wdb, &wpath, &rx))
            .map_err(|e| err(redb::Error::Io(e)))?;
        let closer = Closer {
            writer: std::sync::Mutex::new(Some(tx.clone())),
            thread: std::sync::Mutex::new(Some(thread)),
        };
        Ok(Registry {
            path,
            db,
            writer: tx,
            _closer: std::sync::Arc::new(closer),
        })
    }

    /// Records a running service (asynchronously, in order with other writes).
    pub fn put(&self, service: &str, record: Record) {
        let _ = self.writer.send(Op::Put(service.to_owned(), record));
    }

    /// Forgets a service's process (asynchronously, in order with other writes).
    pub fn remove(&self, service: &str) {
        let _ = self.writer.send(Op::Remove(service.to_owned()));
    }

    /// Waits until every write sent before is durable.
    pub fn sync(&self) {
        let (tx, rx) = mpsc::channel();
        if self.writer.send(Op::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Every record that decodes; undecodable ones are logged and skipped.
    pub fn all(&self) -> Result<Vec<(String, Record)>, RegistryError> {
        let err = |e: redb::Error| RegistryError::Db {
            path: self.path.clone(),
            source: Box::new(e),
        };
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(SERVICES).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (k, v) = entry.map_err(|e| err(e.into()))?;
            match serde_json::from_slice::<Record>(v.value()) {
                Ok(r) => out.push((k.value().to_owned(), r)),
                Err(e) => {
                    tracing::warn!(service = k.value(), error = %e, "registry record unreadable; ignored")
                }
            }
        }
        Ok(out)
    }
}

fn writer_loop(db: &Database, path: &Path, rx: &mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        // Group commit: everything already queued goes into one transaction.
        let mut ops = vec![first];
        while let Ok(op) = rx.try_recv() {
            ops.push(op);
        }
        let mut syncs = Vec::new();
        let result: Result<(), redb::Error> = (|| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(SERVICES)?;
                for op in ops {
                    match op {
                        Op::Put(name, rec) => {
                            let bytes =
                                serde_json::to_vec(&rec).map_err(|e| redb::Error::Io(e.into()))?;
                            table.insert(name.as_str(), bytes.as_slice())?;
                        }
                        Op::Remove(name) => {
                            table.remove(name.as_str())?;
                        }
                        Op::Sync(tx) => syncs.push(tx),
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "registry write failed");
        }
        for s in syncs {
            let _ = s.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pid: u32) -> Record {
        Record {
            pid,
            start_time: 1234,
            cgroup: Some("/x".into()),
            spawned_unix_ms: 5,
        }
    }

    #[test]
    fn records_survive_reopen_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let r = Registry::open(dir.path()).expect("open");
            r.put("a", rec(1));
            r.put("b", rec(2));
            r.put("a", rec(3));
            r.remove("b");
            r.sync();
        }
        let r = Registry::open(dir.path()).expect("reopen");
        assert_eq!(r.all().expect("all"), vec![("a".to_owned(), rec(3))]);
    }

    #[test]
    fn undecodable_record_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Registry::open(dir.path()).expect("open");
        r.put("good", rec(1));
        r.sync();
        let txn = r.db.begin_write().expect("txn");
        txn.open_table(SERVICES)
            .expect("table")
            .insert("bad", b"{not json".as_slice())
            .expect("insert");
        txn.commit().expect("commit");
        assert_eq!(r.all().expect("all"), vec![("good".to_owned(), rec(1))]);
    }

    #[test]
    fn garbage_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(REGISTRY_FILE), vec![0x5a; 10_000]).expect("write");
        assert!(Registry::open(dir.path()).is_err());
    }
}
