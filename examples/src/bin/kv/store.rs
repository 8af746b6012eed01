//! kv's state: the table in libft's critical heap (found after recovery through the heap root
//! `kv`, which also holds the write count and the log offset the table reflects) and the write
//! log, appended through `ft::fs` so that it is replicated when the data directory is a
//! fileset. The table always equals "checkpointed table + log records after its offset": a
//! write is appended and synced before it is applied, and a record that cannot be undone from
//! the log is never left out of the table (the process stops instead).
//!
//! A standby only reads the log (it may be a replica that replay keeps writing) and takes the
//! checkpoints shipped to it as they arrive (`ft::standby::Follower`), so that the table is
//! current up to the owner's last checkpoint; promotion takes the last one shipped, replays
//! what the log gained after it, cuts a torn tail and opens the log for appending.

use std::io::{self, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use ft::critical::{Checkpointer, CriticalBox, CriticalHeap};
use ft::standby::Follower;
use ftkit_examples::kvproto::sorted_digest;
use ftkit_examples::service::Complaint;
use ftkit_examples::table::{HashTable, Table, TableError};

use crate::PROGRAM;
use crate::log::{self, Op, Record};

/// The checkpoint stream holding the state (`$FT_CKPT_DIR/0`).
pub const STREAM: u32 = 0;
/// Keys of the entries `--preload` adds start with this.
pub const PRELOAD_PREFIX: &str = "pre-";
/// The size of each value `--preload` adds: well under the protocol's line limit, so that a
/// client can `GET` any of them.
pub const PRELOAD_VALUE_BYTES: usize = 4000;
/// The heap root naming the state.
const ROOT_NAME: &str = "kv";
/// Marks an initialised root.
const ROOT_MAGIC: u64 = u64::from_le_bytes(*b"KVROOT01");

/// The state's root, in the critical heap: checkpointed together with the table, so a
/// recovered table always knows where in the log it stands.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Root {
    magic: u64,
    /// The last write applied.
    seq: u64,
    /// The log offset just after that write's record.
    log_pos: u64,
    table: *mut Table,
}

/// Why the state cannot be recovered or kept.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// libft's critical memory refused.
    #[error("critical memory: {0}")]
    Critical(#[from] ft::critical::Error),
    /// A shipped checkpoint cannot be applied (standby).
    #[error("following the shipped checkpoints: {0}")]
    Follow(#[from] ft::standby::Error),
    /// The table is corrupt or the heap full.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The recovered root does not hold together.
    #[error("corrupt state: {0}")]
    Corrupt(String),
    /// The log cannot be read or opened.
    #[error("log {path}: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
}

/// Why a write was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This server is a standby: it takes no writes.
    #[error("standby")]
    Standby,
    /// The record is in the local log and applied, but replication did not confirm it as
    /// configured (sync mode timed out): not acknowledged; a retry is harmless.
    #[error("not durable: {0}")]
    NotDurable(#[source] io::Error),
    /// Nothing was written (the partial record was cut off again).
    #[error("write failed: {0}")]
    Failed(#[source] io::Error),
    /// The log and the table may disagree: the process must stop and recover.
    #[error("{0}")]
    Fatal(String),
}

/// What a successful recovery found, for the start-up lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// No checkpoint.
    Fresh,
    /// Checkpoint `image` was recovered.
    Recovered {
        /// Its sequence number in the checkpoint store.
        image: u64,
        /// Entries it holds.
        count: u64,
        /// Its DIGEST.
        digest: u64,
    },
}

/// The table, its root, and the log.
///
/// Invariant: `root` is a live `Root` block of the checkpointer's heap whose `table` is
/// `table`'s root, both owned by this value; only the holder of `&mut Store` changes them.
#[derive(Debug)]
pub struct Store {
    ckpt: &'static Checkpointer,
    root: NonNull<Root>,
    table: HashTable<'static>,
    log_path: PathBuf,
    /// The log opened for appending: only on a primary.
    writer: Option<ft::fs::File>,
    /// The offset after the last valid record of the log.
    end: u64,
    per_request: bool,
    /// Records replayed since start-up and not checkpointed yet.
    unsaved: u64,
    checkpoints: Complaint,
}

// SAFETY: the raw pointers lead into the critical heap, which is mapped for the whole process
// and shared by all threads; the table and root are only touched through `&mut Store` / `&Store`,
// which the server hands out under one mutex.
unsafe impl Send for Store {}

impl Store {
    /// Recovers the newest good checkpoint of [`STREAM`] (or starts fresh), then replays the
    /// log in `dir` after the checkpoint's offset. Leaves the log untouched: see
    /// [`Store::promote`]. `per_request` takes a synchronous checkpoint after every write.
    pub fn recover(
        ckpt: &'static Checkpointer,
        dir: &Path,
        per_request: bool,
    ) -> Result<(Store, Start), StoreError> {
        // SAFETY: called once at start-up, before any thread exists that could touch the heap,
        // and nothing refers into it yet.
        let recovered = unsafe { ckpt.recover(STREAM) }?;
        let heap = ckpt.heap();
        let (root, table, start) = match recovered {
            Some(r) => {
                let (root, table) = open_root(heap)?;
                let digest = sorted_digest(table.entries()?);
                let start = Start::Recovered {
                    image: r.seq,
                    count: table.count(),
                    digest,
                };
                (root, table, start)
            }
            None => {
                let (root, table) = create_root(heap)?;
                (root, table, Start::Fresh)
            }
        };
        let mut store = Store {
            ckpt,
            root,
            table,
            log_path: dir.join(log::LOG_FILE),
            writer: None,
            end: 0,
            per_request,
            unsaved: 0,
            checkpoints: Complaint::new(PROGRAM),
        };
        store.end = store.root().log_pos;
        Ok((store, start))
    }

    fn root(&self) -> &Root {
        // SAFETY: by the invariant, `root` is a live, initialised Root.
        unsafe { self.root.as_ref() }
    }

    fn root_mut(&mut self) -> &mut Root {
        // SAFETY: as in `root`; `&mut self` makes the access unique.
        unsafe { self.root.as_mut() }
    }

    fn log_error(&self, source: io::Error) -> StoreError {
        StoreError::Log {
            path: self.log_path.clone(),
            source,
        }
    }

    /// Applies the log records after the table's offset; returns how many. A torn tail is
    /// reported and left in place (a standby must not write a replica).
    pub fn catch_up(&mut self) -> Result<u64, StoreError> {
        let mut file = match std::fs::File::open(&self.log_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.root().log_pos > 0 {
                    say!(
                        "warning: no log at {}; the checkpoint stands at offset {}",
                        self.log_path.display(),
                        self.root().log_pos
                    );
                    self.root_mut().log_pos = 0;
                }
                self.end = 0;
                return Ok(0);
            }
            Err(e) => return Err(self.log_error(e)),
        };
        let len = file.metadata().map_err(|e| self.log_error(e))?.len();
        let pos = self.root().log_pos;
        if len < pos {
            // The log lost records the checkpoint holds (an older replica of the log): they
            // stay in the table; new records continue after the log's valid part.
            let end = log::scan::<io::Error>(&mut BufReader::new(&mut file), 0, |_, _| Ok(()))
                .map_err(|e| self.log_error(e))?;
            say!(
                "warning: the log has {len} bytes but the checkpoint stands at offset {pos}; \
                 continuing at offset {}",
                end.valid_end
            );
            self.root_mut().log_pos = end.valid_end;
            self.end = end.valid_end;
            return Ok(0);
        }
        file.seek(SeekFrom::Start(pos))
            .map_err(|e| self.log_error(e))?;
        let mut failed = None;
        let end = log::scan::<io::Error>(&mut BufReader::new(&mut file), pos, |record, at| {
            if let Err(e) = self.apply(&record, at) {
                failed = Some((record.seq, e));
                return Err(io::Error::other("replay stopped"));
            }
            Ok(())
        });
        if let Some((seq, e)) = failed {
            return Err(StoreError::Corrupt(format!(
                "replaying log record {seq}: {e}"
            )));
        }
        let end = end.map_err(|e| self.log_error(e))?;
        self.end = end.valid_end;
        if let Some(why) = &end.torn {
            say!(
                "ignoring {} bytes at the end of the log after offset {}: {why}",
                len - end.valid_end,
                end.valid_end
            );
        }
        self.unsaved += end.records;
        if end.records > 0 {
            say!(
                "replayed {} log records from offset {pos} to {}: seq {} count {} digest {:016x}",
                end.records,
                end.valid_end,
                self.root().seq,
                self.table.count(),
                self.digest()?
            );
        }
        Ok(end.records)
    }

    /// A standby's step: applies the newest checkpoint shipped since the last one, in place,
    /// and finds the table again in it; returns its image sequence, None when nothing new
    /// arrived. The table then stands at the checkpoint's log offset (records the standby
    /// replayed beyond it are replayed again at promotion). On an error the heap may have
    /// been reset: the caller must not use this store any more.
    pub fn follow(&mut self, follower: &mut Follower<'_>) -> Result<Option<u64>, StoreError> {
        if self.writer.is_some() {
            // A primary writes its own checkpoints; shipped ones would roll them back.
            return Ok(None);
        }
        // SAFETY: critical memory (the root and the table) is only touched through this
        // Store, and `&mut self` (the server's store lock) keeps every other thread out of it
        // while its bytes are replaced.
        let applied = unsafe { follower.apply_newest() }?;
        if applied.is_some() {
            let (root, table) = open_root(self.ckpt.heap())?;
            self.root = root;
            self.table = table;
            self.end = self.root().log_pos;
            self.unsaved = 0;
        }
        Ok(applied)
    }

    /// Becomes writable: replays what the log gained since, cuts a torn tail, and opens the
    /// log for appending through `ft::fs` (replicated when it lies in a fileset).
    pub fn promote(&mut self) -> Result<(), StoreError> {
        if self.writer.is_some() {
            return Ok(());
        }
        self.catch_up()?;
        let file = ft::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .open(&self.log_path)
            .map_err(|e| self.log_error(e))?;
        let len = file.metadata().map_err(|e| self.log_error(e))?.len();
        if len > self.end {
            match file.set_len(self.end) {
                Ok(()) => {}
                // Cut locally; the replicas get the truncation when replication catches up.
                Err(e) if is_replication_error(&e) => {
                    say!("warning: cutting the torn log tail was not replicated: {e}");
                }
                Err(e) => return Err(self.log_error(e)),
            }
            say!("cut the log from {len} to {} bytes", self.end);
        }
        if let Some((fileset, _)) = file.replicated_as() {
            say!("the log is in fileset {fileset}: watchd replicates every change");
        }
        self.writer = Some(file);
        if self.unsaved > 0 {
            // Later recoveries start from here instead of replaying again.
            let taken = self.ckpt.checkpoint_sync(STREAM).map(|_| ());
            if taken.is_ok() {
                self.unsaved = 0;
            }
            self.checkpoints.check("checkpoint", taken);
        }
        Ok(())
    }

    /// Fills a fresh, empty table with about `bytes` of values (keys `pre-0`, `pre-1`, ...,
    /// each value `kvproto::value_for(key)` padded to [`PRELOAD_VALUE_BYTES`]) and takes one
    /// synchronous checkpoint of it, so that benchmarks can recover a state of a known size.
    /// The entries bypass the log: the checkpoint holds them, and until it is committed a crash
    /// finds the table fresh again and preloads anew. Returns the entries added (0 when the
    /// table was not fresh: a recovered state is never padded).
    pub fn preload(&mut self, bytes: u64) -> Result<u64, StoreError> {
        if bytes == 0 || self.table.count() > 0 || self.root().seq > 0 {
            return Ok(0);
        }
        let mut added: u64 = 0;
        let mut total: u64 = 0;
        while total < bytes {
            let key = format!("{PRELOAD_PREFIX}{added}");
            let mut value = ftkit_examples::kvproto::value_for(&key);
            let pad = PRELOAD_VALUE_BYTES.saturating_sub(value.len());
            value.push('-');
            value.extend(std::iter::repeat_n('p', pad.saturating_sub(1)));
            self.table.put(key.as_bytes(), value.as_bytes())?;
            total += (key.len() + value.len()) as u64;
            added += 1;
        }
        self.ckpt.checkpoint_sync(STREAM)?;
        self.unsaved = 0;
        Ok(added)
    }

    /// Applies one record that ends at log offset `at`.
    fn apply(&mut self, record: &Record, at: u64) -> Result<(), TableError> {
        match &record.op {
            Op::Set { key, value } => self.table.put(key, value)?,
            Op::Del { key } => {
                self.table.delete(key);
            }
        }
        let applied = self.table.counter() + 1;
        self.table.set_counter(applied);
        let root = self.root_mut();
        root.seq = record.seq;
        root.log_pos = at;
        self.end = at;
        Ok(())
    }

    /// Logs, syncs (replicated as configured), applies and checkpoints one write; returns
    /// its sequence number.
    pub fn write(&mut self, op: Op) -> Result<u64, WriteError> {
        let Some(file) = &self.writer else {
            return Err(WriteError::Standby);
        };
        let record = Record {
            seq: self.root().seq + 1,
            op,
        };
        let bytes = log::encode(&record);
        let start = self.end;
        let after = start + bytes.len() as u64;
        let mut outcome = Ok(record.seq);
        if let Err(e) = write_all_at(file, &bytes, start).and_then(|()| file.sync_data()) {
            let on_disk = file.metadata().map(|m| m.len()).ok();
            if is_replication_error(&e) && on_disk == Some(after) {
                // Whole in the local log: it will be replayed, so the table must have it too.
                outcome = Err(WriteError::NotDurable(e));
            } else {
                return match file.set_len(start) {
                    Ok(()) => Err(WriteError::Failed(e)),
                    Err(cut) if is_replication_error(&cut) => Err(WriteError::Failed(e)),
                    Err(cut) => Err(WriteError::Fatal(format!(
                        "appending to the log failed ({e}) and cutting the partial record \
                         failed too ({cut})"
                    ))),
                };
            }
        }
        self.apply(&record, after).map_err(|e| {
            WriteError::Fatal(format!(
                "write {} is in the log but cannot be applied: {e}",
                record.seq
            ))
        })?;
        if self.per_request {
            let taken = self.ckpt.checkpoint_sync(STREAM).map(|_| ());
            self.checkpoints.check("checkpoint", taken);
        } else {
            self.safe_point();
        }
        outcome
    }

    /// Takes the periodic checkpoint if one is due (the table is consistent whenever the
    /// caller holds the store).
    pub fn safe_point(&mut self) {
        let taken = self.ckpt.safe_point().map(|_| ());
        self.checkpoints.check("t_safe_point", taken);
    }

    /// Starts a checkpoint of `stream` now (watchd's `ftctl checkpoint`).
    pub fn checkpoint(&mut self, stream: u32) {
        let taken = self.ckpt.checkpoint(stream).map(|_| ());
        self.checkpoints.check("requested checkpoint", taken);
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.table.get(key).map(<[u8]>::to_vec)
    }

    /// Live entries.
    pub fn count(&self) -> u64 {
        self.table.count()
    }

    /// FNV-1a over the table sorted by key.
    pub fn digest(&self) -> Result<u64, TableError> {
        Ok(sorted_digest(self.table.entries()?))
    }

    /// The last write applied.
    pub fn seq(&self) -> u64 {
        self.root().seq
    }
}

/// The root the recovered heap names, after checking it and walking its table.
fn open_root(
    heap: &'static CriticalHeap,
) -> Result<(NonNull<Root>, HashTable<'static>), StoreError> {
    let ptr = heap
        .root(ROOT_NAME)?
        .ok_or_else(|| StoreError::Corrupt(format!("the checkpoint has no `{ROOT_NAME}` root")))?
        .cast::<Root>();
    let last = (ptr.as_ptr() as usize).wrapping_add(size_of::<Root>() - 1);
    if !ptr.is_aligned() || !heap.contains(last as *const u8) {
        return Err(StoreError::Corrupt(format!(
            "root {ptr:p} is not a block of the heap"
        )));
    }
    // SAFETY: the root is aligned and lies inside the mapped heap (checked above); Root is
    // integers and a pointer, valid for any bit pattern.
    let root = unsafe { ptr.as_ptr().read() };
    if root.magic != ROOT_MAGIC {
        return Err(StoreError::Corrupt(format!(
            "root {ptr:p} has magic {:#x}",
            root.magic
        )));
    }
    let table = HashTable::open(heap, root.table)?;
    Ok((ptr, table))
}

/// An empty table and its root, named in the heap.
fn create_root(
    heap: &'static CriticalHeap,
) -> Result<(NonNull<Root>, HashTable<'static>), StoreError> {
    let table = HashTable::create(heap)?;
    let root = CriticalBox::new_in(
        heap,
        Root {
            magic: ROOT_MAGIC,
            seq: 0,
            log_pos: 0,
            table: table.as_ptr(),
        },
    )?
    .into_raw();
    heap.set_root(ROOT_NAME, Some(root.cast()))?;
    Ok((root, table))
}

/// Whether `e` says the change was made locally but not replicated as asked.
fn is_replication_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<ft::fs::ReplicationError>())
}

fn write_all_at(file: &ft::fs::File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.write_at(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
