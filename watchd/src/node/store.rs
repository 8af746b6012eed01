//! The node's durable state: what membership must never forget ([`Persisted`]: the highest
//! accepted epoch and the last committed view) and the incarnation counter, in redb under the
//! data directory; and the cluster database with the global update manager's pending update
//! (`cluster::db::ClusterDb`, a file of its own beside it).
//!
//! Every write is a durable (fsynced) redb commit made on the store's own thread; callers await
//! the commit, so the node actor's event loop never blocks on an fsync yet performs nothing that
//! must follow a persist before the persist is on disk. A record that does not decode is an
//! error, never a default: forgetting an accepted epoch could let a view commit twice.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use cluster::db::{ClusterDb, DbError, DbSnapshot, GumPersisted, Update};
use cluster::membership::Persisted;
use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::oneshot;

/// The file's name inside the data directory.
pub const STORE_FILE: &str = "cluster.redb";
/// The cluster database's file inside the data directory.
pub const CLUSTER_DB_FILE: &str = "clusterdb.redb";

const NODE: TableDefinition<&str, &[u8]> = TableDefinition::new("node");
const KEY_MEMBERSHIP: &str = "membership";
const KEY_INCARNATION: &str = "incarnation";

/// Errors of the node's store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("cluster state {path}: {source}")]
    Db {
        /// The file.
        path: PathBuf,
        /// The redb error.
        #[source]
        source: Box<redb::Error>,
    },
    /// A record is unreadable: this node must not guess what it accepted before.
    #[error(
        "cluster state {path}: the `{key}` record is unreadable ({why}); this node cannot know which epochs it accepted: move the file away to make it join as a new node"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The record.
        key: &'static str,
        /// The decoding error.
        why: String,
    },
    /// The cluster database failed (this node's copy is broken or foreign).
    #[error(transparent)]
    ClusterDb(#[from] DbError),
    /// The store's thread is gone.
    #[error("cluster state {path}: the store's thread is gone")]
    Gone {
        /// The file.
        path: PathBuf,
    },
}

/// What a start of the node actor reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// Membership's durable state (default on a first start).
    pub persisted: Persisted,
    /// This start's incarnation: one more than the last one, already durable.
    pub incarnation: u64,
    /// The global update manager's durable state.
    pub gum: GumPersisted,
    /// The cluster database.
    pub db: DbSnapshot,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Op {
    Boot(Reply<Boot>),
    Persist(Persisted, Reply<()>),
    SaveGum(GumPersisted, Reply<()>),
    Apply {
        seq: u64,
        epoch: u64,
        update: Update,
        reply: Reply<DbSnapshot>,
    },
    Install(Box<DbSnapshot>, Reply<()>),
}

/// The store. Cloning shares it; the thread ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    tx: mpsc::Sender<Op>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Boot(_) => f.write_str("Boot"),
            Op::Persist(p, _) => write!(f, "Persist(accepted {})", p.accepted),
            Op::SaveGum(..) => f.write_str("SaveGum"),
            Op::Apply { seq, .. } => write!(f, "Apply({seq})"),
            Op::Install(s, _) => write!(f, "Install({})", s.seq),
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `data_dir` and starts its thread. Blocking: call it
    /// while the daemon starts.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join(STORE_FILE);
        let err = |e: redb::Error| StoreError::Db {
            path: path.clone(),
            source: Box::new(e),
        };
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(NODE).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        let (tx, rx) = mpsc::channel();
        let tpath = path.clone();
        let db_path = data_dir.join(CLUSTER_DB_FILE);
        std::thread::Builder::new()
            .name("node-store".into())
            .spawn(move || serve(&db, &tpath, &db_path, &rx))
            .map_err(|e| err(redb::Error::Io(e)))?;
        Ok(Store { path, tx })
    }

    async fn ask<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(op(tx)).map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Reads the durable state and makes the next incarnation durable. The cluster database
    /// is opened here (not in [`Store::open`]), so a broken one fails the node actor, which is
    /// retried, and not watchd's start.
    pub async fn boot(&self) -> Result<Boot, StoreError> {
        self.ask(Op::Boot).await
    }

    /// Writes `p` durably; returns once it is on disk.
    pub async fn persist(&self, p: Persisted) -> Result<(), StoreError> {
        self.ask(|r| Op::Persist(p, r)).await
    }

    /// Writes the global update manager's state durably.
    pub async fn save_gum(&self, p: GumPersisted) -> Result<(), StoreError> {
        self.ask(|r| Op::SaveGum(p, r)).await
    }

    /// Applies update `seq` to the cluster database durably; returns the new database.
    pub async fn apply(
        &self,
        seq: u64,
        epoch: u64,
        update: Update,
    ) -> Result<DbSnapshot, StoreError> {
        self.ask(|reply| Op::Apply {
            seq,
            epoch,
            update,
            reply,
        })
        .await
    }

    /// Replaces the cluster database durably.
    pub async fn install(&self, snapshot: DbSnapshot) -> Result<(), StoreError> {
        self.ask(|r| Op::Install(Box::new(snapshot), r)).await
    }

    fn gone(&self) -> StoreError {
        StoreError::Gone {
            path: self.path.clone(),
        }
    }
}

fn serve(db: &Database, path: &Path, db_path: &Path, rx: &mpsc::Receiver<Op>) {
    let mut cdb: Option<ClusterDb> = None;
    while let Ok(op) = rx.recv() {
        match op {
            Op::Boot(reply) => {
                let r = cluster_db(&mut cdb, db_path).and_then(|c| {
                    let (gum, snapshot) = (c.gum_persisted()?, c.snapshot()?);
                    let mut b = boot(db, path)?;
                    b.gum = gum;
                    b.db = snapshot;
                    Ok(b)
                });
                let _ = reply.send(r);
            }
            Op::Persist(p, reply) => {
                let _ = reply.send(write(db, path, KEY_MEMBERSHIP, &p));
            }
            Op::SaveGum(p, reply) => {
                let r = cluster_db(&mut cdb, db_path).and_then(|c| Ok(c.save_gum(&p)?));
                let _ = reply.send(r);
            }
            Op::Apply {
                seq,
                epoch,
                update,
                reply,
            } => {
                let r =
                    cluster_db(&mut cdb, db_path).and_then(|c| Ok(c.apply(seq, epoch, &update)?));
                let _ = reply.send(r);
            }
            Op::Install(snapshot, reply) => {
                let r = cluster_db(&mut cdb, db_path).and_then(|c| Ok(c.install(&snapshot)?));
                let _ = reply.send(r);
            }
        }
    }
}

/// The cluster database, opened on first use.
fn cluster_db<'a>(
    cdb: &'a mut Option<ClusterDb>,
    path: &Path,
) -> Result<&'a mut ClusterDb, StoreError> {
    if cdb.is_none() {
        *cdb = Some(ClusterDb::open(path)?);
    }
    cdb.as_mut().ok_or_else(|| StoreError::Gone {
        path: path.to_owned(),
    })
}

fn db_err(path: &Path) -> impl Fn(redb::Error) -> StoreError + '_ {
    move |e| StoreError::Db {
        path: path.to_owned(),
        source: Box::new(e),
    }
}

fn read<T: serde::de::DeserializeOwned>(
    db: &Database,
    path: &Path,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    let err = db_err(path);
    let txn = db.begin_read().map_err(|e| err(e.into()))?;
    let table = txn.open_table(NODE).map_err(|e| err(e.into()))?;
    let Some(v) = table.get(key).map_err(|e| err(e.into()))? else {
        return Ok(None);
    };
    serde_json::from_slice(v.value())
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            path: path.to_owned(),
            key,
            why: e.to_string(),
        })
}

fn write<T: serde::Serialize>(
    db: &Database,
    path: &Path,
    key: &'static str,
    value: &T,
) -> Result<(), StoreError> {
    let err = db_err(path);
    let bytes = serde_json::to_vec(value).map_err(|e| err(redb::Error::Io(e.into())))?;
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    {
        let mut table = txn.open_table(NODE).map_err(|e| err(e.into()))?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| err(e.into()))?;
    }
    // redb's default durability is immediate: the commit returns once the data is fsynced.
    txn.commit().map_err(|e| err(e.into()))
}

fn boot(db: &Database, path: &Path) -> Result<Boot, StoreError> {
    let persisted = read::<Persisted>(db, path, KEY_MEMBERSHIP)?.unwrap_or_default();
    let last = read::<u64>(db, path, KEY_INCARNATION)?.unwrap_or(0);
    let incarnation = last.saturating_add(1);
    write(db, path, KEY_INCARNATION, &incarnation)?;
    Ok(Boot {
        persisted,
        incarnation,
        gum: GumPersisted::default(),
        db: DbSnapshot::default(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use cluster::membership::View;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn state_and_incarnations_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();
        let view = View {
            epoch: 7,
            prev: 3,
            members: BTreeSet::from(["a".to_owned(), "b".to_owned()]),
            paused: BTreeSet::new(),
            joined: BTreeMap::from([("a".to_owned(), 1), ("b".to_owned(), 7)]),
        };
        let p = Persisted {
            accepted: 9,
            committed: Some(view),
        };
        rt.block_on(async {
            let s = Store::open(dir.path()).expect("open");
            let b = s.boot().await.expect("boot");
            assert_eq!(b.incarnation, 1);
            assert_eq!(b.persisted, Persisted::default());
            s.persist(p.clone()).await.expect("persist");
        });
        // The thread holds the database until the last handle is dropped; give it a moment.
        let reopened = (0..100).find_map(|_| {
            Store::open(dir.path()).ok().or_else(|| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            })
        });
        let s = reopened.expect("reopen");
        let b = rt.block_on(s.boot()).expect("boot");
        assert_eq!(b.incarnation, 2);
        assert_eq!(b.persisted, p);
        assert_eq!(rt.block_on(s.boot()).expect("boot").incarnation, 3);
    }

    #[test]
    fn an_unreadable_record_is_an_error_not_a_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = Database::create(dir.path().join(STORE_FILE)).expect("create");
            let txn = db.begin_write().expect("txn");
            txn.open_table(NODE)
                .expect("table")
                .insert(KEY_MEMBERSHIP, b"{garbage".as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        let s = Store::open(dir.path()).expect("open");
        let err = runtime().block_on(s.boot()).expect_err("corrupt");
        assert!(err.to_string().contains("unreadable"), "{err}");
    }

    #[test]
    fn a_garbage_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STORE_FILE), vec![0x5a; 10_000]).expect("write");
        assert!(Store::open(dir.path()).is_err());
    }
}
