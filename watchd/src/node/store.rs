//! The node's durable state: what membership must never forget ([`Persisted`]: the highest
//! accepted epoch and the last committed view) and the incarnation counter, in redb under the
//! data directory; and the cluster database with the global update manager's pending update
//! (`cluster::db::ClusterDb`, a file of its own beside it).
//!
//! Every write is a durable (fsynced) redb commit made on a thread of the store, never on the
//! node thread: one thread per file, so that a membership persist never queues behind commits
//! of global updates. Callers await the commit before anything that must follow it. A record
//! that does not decode is an error, never a default: forgetting an accepted epoch could let
//! a view commit twice.

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

/// Test hook: with `WATCHD_TEST_HOOKS=1` in watchd's environment (read once at open), a file
/// of this name in the data directory holding a number of milliseconds delays every write of
/// the cluster database by that long, as a disk busy with other fsyncs would (read before each
/// write, so a test can slow a running node). Ignored without the variable.
pub const TEST_DELAY_FILE: &str = "test-clusterdb-delay-ms";
/// The environment variable that enables watchd's test hooks.
const TEST_HOOKS_ENV: &str = "WATCHD_TEST_HOOKS";

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

/// Work for the membership state's thread (`cluster.redb`).
enum StateOp {
    Boot(Reply<Boot>),
    Persist(Persisted, Reply<()>),
}

/// Work for the cluster database's thread (`clusterdb.redb`).
enum DbOp {
    Open(Reply<(GumPersisted, DbSnapshot)>),
    SaveGum(GumPersisted, Reply<()>),
    Apply {
        seq: u64,
        epoch: u64,
        update: Update,
        reply: Reply<DbSnapshot>,
    },
    Install(Box<DbSnapshot>, Reply<()>),
}

/// The store. Cloning shares it; the threads end when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    db_path: PathBuf,
    state: mpsc::Sender<StateOp>,
    db: mpsc::Sender<DbOp>,
}

impl std::fmt::Debug for StateOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateOp::Boot(_) => f.write_str("Boot"),
            StateOp::Persist(p, _) => write!(f, "Persist(accepted {})", p.accepted),
        }
    }
}

impl std::fmt::Debug for DbOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbOp::Open(_) => f.write_str("Open"),
            DbOp::SaveGum(..) => f.write_str("SaveGum"),
            DbOp::Apply { seq, .. } => write!(f, "Apply({seq})"),
            DbOp::Install(s, _) => write!(f, "Install({})", s.seq),
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `data_dir` and starts its thread. Blocking: call it
    /// while the daemon starts.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(data_dir, test_delay_file(data_dir))
    }

    /// [`Store::open`] with the delay hook's file given (unit tests need no environment).
    fn open_with(data_dir: &Path, delay: Option<PathBuf>) -> Result<Store, StoreError> {
        let path = data_dir.join(STORE_FILE);
        let err = |e: redb::Error| StoreError::Db {
            path: path.clone(),
            source: Box::new(e),
        };
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(NODE).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        let (state, state_rx) = mpsc::channel();
        let tpath = path.clone();
        std::thread::Builder::new()
            .name("node-store".into())
            .spawn(move || serve_state(&db, &tpath, &state_rx))
            .map_err(|e| err(redb::Error::Io(e)))?;
        let (dbtx, db_rx) = mpsc::channel();
        let db_path = data_dir.join(CLUSTER_DB_FILE);
        let dpath = db_path.clone();
        std::thread::Builder::new()
            .name("node-db".into())
            .spawn(move || serve_db(&dpath, delay.as_deref(), &db_rx))
            .map_err(|e| err(redb::Error::Io(e)))?;
        Ok(Store {
            path,
            db_path,
            state,
            db: dbtx,
        })
    }

    async fn ask_state<T>(&self, op: impl FnOnce(Reply<T>) -> StateOp) -> Result<T, StoreError> {
        ask(&self.state, &self.path, op).await
    }

    async fn ask_db<T>(&self, op: impl FnOnce(Reply<T>) -> DbOp) -> Result<T, StoreError> {
        ask(&self.db, &self.db_path, op).await
    }

    /// Reads the durable state and makes the next incarnation durable. The cluster database
    /// is opened here (not in [`Store::open`]), so a broken one fails the node actor, which is
    /// retried, and not watchd's start.
    pub async fn boot(&self) -> Result<Boot, StoreError> {
        // The database first: a broken one must not use up an incarnation. Queued behind
        // every write submitted before, so a restarted actor reads what its predecessor wrote.
        let (gum, db) = self.ask_db(DbOp::Open).await?;
        let mut b = self.ask_state(StateOp::Boot).await?;
        b.gum = gum;
        b.db = db;
        Ok(b)
    }

    /// Writes `p` durably; returns once it is on disk.
    pub async fn persist(&self, p: Persisted) -> Result<(), StoreError> {
        self.ask_state(|r| StateOp::Persist(p, r)).await
    }

    /// Writes the global update manager's state durably.
    pub async fn save_gum(&self, p: GumPersisted) -> Result<(), StoreError> {
        self.ask_db(|r| DbOp::SaveGum(p, r)).await
    }

    /// Applies update `seq` to the cluster database durably; returns the new database.
    pub async fn apply(
        &self,
        seq: u64,
        epoch: u64,
        update: Update,
    ) -> Result<DbSnapshot, StoreError> {
        self.ask_db(|reply| DbOp::Apply {
            seq,
            epoch,
            update,
            reply,
        })
        .await
    }

    /// Replaces the cluster database durably.
    pub async fn install(&self, snapshot: DbSnapshot) -> Result<(), StoreError> {
        self.ask_db(|r| DbOp::Install(Box::new(snapshot), r)).await
    }
}

/// The delay hook's file, when test hooks are enabled.
fn test_delay_file(data_dir: &Path) -> Option<PathBuf> {
    std::env::var(TEST_HOOKS_ENV)
        .is_ok_and(|v| v == "1")
        .then(|| data_dir.join(TEST_DELAY_FILE))
}

/// Sleeps as long as the delay hook's file says (nothing without the file or with garbage).
fn test_delay(file: Option<&Path>) {
    let Some(file) = file else {
        return;
    };
    let ms = std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    if let Some(ms) = ms {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Sends `op` to the store thread behind `to` (serving the file at `path`) and awaits its
/// answer; a thread that is gone is [`StoreError::Gone`].
async fn ask<O, T>(
    to: &mpsc::Sender<O>,
    path: &Path,
    op: impl FnOnce(Reply<T>) -> O,
) -> Result<T, StoreError> {
    let gone = || StoreError::Gone {
        path: path.to_owned(),
    };
    let (tx, rx) = oneshot::channel();
    to.send(op(tx)).map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

fn serve_state(db: &Database, path: &Path, rx: &mpsc::Receiver<StateOp>) {
    while let Ok(op) = rx.recv() {
        match op {
            StateOp::Boot(reply) => {
                let _ = reply.send(boot(db, path));
            }
            StateOp::Persist(p, reply) => {
                let _ = reply.send(write(db, path, KEY_MEMBERSHIP, &p));
            }
        }
    }
}

fn serve_db(db_path: &Path, delay: Option<&Path>, rx: &mpsc::Receiver<DbOp>) {
    let mut cdb: Option<ClusterDb> = None;
    while let Ok(op) = rx.recv() {
        match op {
            DbOp::Open(reply) => {
                let r = cluster_db(&mut cdb, db_path)
                    .and_then(|c| Ok((c.gum_persisted()?, c.snapshot()?)));
                let _ = reply.send(r);
            }
            DbOp::SaveGum(p, reply) => {
                test_delay(delay);
                let r = cluster_db(&mut cdb, db_path).and_then(|c| Ok(c.save_gum(&p)?));
                let _ = reply.send(r);
            }
            DbOp::Apply {
                seq,
                epoch,
                update,
                reply,
            } => {
                test_delay(delay);
                let r =
                    cluster_db(&mut cdb, db_path).and_then(|c| Ok(c.apply(seq, epoch, &update)?));
                let _ = reply.send(r);
            }
            DbOp::Install(snapshot, reply) => {
                test_delay(delay);
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
    fn a_membership_persist_does_not_queue_behind_slow_database_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let delay = dir.path().join(TEST_DELAY_FILE);
        let rt = runtime();
        let s = Store::open_with(dir.path(), Some(delay.clone())).expect("open");
        rt.block_on(s.boot()).expect("boot");
        std::fs::write(&delay, "800").expect("write the delay");
        rt.block_on(async {
            let t = std::time::Instant::now();
            let slow = s.save_gum(GumPersisted::default());
            let fast = async {
                s.persist(Persisted::default()).await.expect("persist");
                t.elapsed()
            };
            let (saved, persisted_after) = tokio::join!(slow, fast);
            saved.expect("save_gum");
            assert!(
                persisted_after < std::time::Duration::from_millis(400),
                "the membership persist waited {persisted_after:?} for the database"
            );
            assert!(t.elapsed() >= std::time::Duration::from_millis(800));
        });
    }

    #[test]
    fn a_garbage_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STORE_FILE), vec![0x5a; 10_000]).expect("write");
        assert!(Store::open(dir.path()).is_err());
    }
}
