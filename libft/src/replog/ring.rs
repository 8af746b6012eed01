//! The shared-memory operation ring of a fileset: many producers (threads of applications,
//! through libft and the LD_PRELOAD shim, in many processes) append encoded operations; one
//! consumer (watchd's pump) reads them in ring order, which gives each its dense seq, and
//! releases them once every backup has them durable.
//!
//! This module owns the ring file's layout and every access to the mapping. Producers never
//! allocate and never take a lock; the consumer trusts nothing it reads from the mapping (any
//! process that maps the ring may scribble on it): a corrupt ring yields errors, never a panic
//! or an access outside the mapping. A file truncated under a live mapping is the one thing it
//! cannot defend against (SIGBUS), so the ring file must only be writable by its producers.
//!
//! ```text
//!   producer: reserve (CAS tail) ─► header word ─► encode body ─► state=READY ─► wake consumer?
//!   consumer: next() at cursor ─► Op{seq} / Abandoned{seq} / Invalid{seq}   (seq = ring order)
//!   pump:     release_through(seq) ─► commit (head, head_seq) ─► zero ─► head ─► wake producers
//! ```
//!
//! Layout (little-endian; positions are byte offsets that only grow, the data offset of a
//! position is `position % capacity`):
//!
//! | header offset | field                                                                 |
//! |---------------|-----------------------------------------------------------------------|
//! | 0             | magic `FTRING\0\x01`                                                   |
//! | 8 / 12        | layout version u32 / header length u32 (4096)                         |
//! | 16            | capacity u64: data bytes, a power of two                              |
//! | 24            | generation u64: random, chosen at creation                            |
//! | 32            | flags u32: bit 0 SYNC, bit 1 RETIRED                                  |
//! | 64            | tail u64: next free position (producers CAS it)                       |
//! | 128           | head u64: everything before it is released (producers wait on it)     |
//! | 136 / 140     | release counter u32 (futex) / producers-waiting u32                   |
//! | 192           | consumer-waiting u32 (futex): 0 awake, 1 lingering, 2 asleep          |
//! | 200           | consumer cursor u64, published when it starts lingering               |
//! | 256           | commit counter u64, then two slots of (head u64, head_seq u64)        |
//!
//! The commit slots make `(head, head_seq)` crash-consistent for a restarted consumer: the
//! consumer writes the slot the counter does not select, then bumps the counter.
//!
//! A record starts on an 8-byte boundary and never wraps: `word0` = `len u32 | pid u32 << 32`
//! written with one store right after the reservation (`len` counts the 16-byte header and the
//! padding to 8; bit 31 of `len` marks a PAD record, which fills the end of the data area and
//! has no seq); `word1` = `state u32 | body_len u32 << 32`, stored with Release when the body
//! is complete (state 0 reserved, 1 ready, 3 a producer bug: skip); then the body
//! ([`super::codec`]). Released bytes are zeroed, so an unwritten header reads as 0.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use super::codec::{self, DecodeError, OpRef, WRITE_FIXED};
use super::op::{Op, PathError};

/// Smallest data area a ring may have.
pub const MIN_CAPACITY: u64 = 64 * 1024;
/// Largest data area a ring may have (record lengths must fit in 31 bits).
pub const MAX_CAPACITY: u64 = 1 << 30;
/// How long a producer waits for space in a full ring before [`RingError::Full`].
pub const DEFAULT_FULL_TIMEOUT: Duration = Duration::from_secs(10);
/// Consumer: how long a reserved record may stay unpublished, its producer dead, before it is
/// skipped as [`RingItem::Abandoned`].
pub const DEFAULT_ABANDON_AFTER: Duration = Duration::from_secs(1);
/// Consumer: how long a reserved record may stay unpublished with its producer alive (or no
/// header at all) before [`RingError::Stuck`]. Shorter than [`DEFAULT_FULL_TIMEOUT`], so the
/// pump gives up on a stuck ring before producers give up on a full one.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(5);
/// Consumer: after draining the ring, how long it sleeps without asking producers for a
/// wake-up. Producers then wake it only when a quarter of the ring waits undelivered, or in
/// sync mode: this keeps the futex syscall, and the consumer being woken onto the
/// application's CPU, off a busy application's write path. It bounds the async replication
/// lag added by batching.
pub const DEFAULT_LINGER: Duration = Duration::from_micros(500);

const MAGIC: u64 = u64::from_le_bytes(*b"FTRING\0\x01");
const LAYOUT_VERSION: u32 = 1;
const HEADER_LEN: u32 = 4096;
const HEADER_BYTES: usize = HEADER_LEN as usize;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_CAPACITY: usize = 16;
const OFF_GENERATION: usize = 24;
const OFF_FLAGS: usize = 32;
const OFF_TAIL: usize = 64;
const OFF_HEAD: usize = 128;
const OFF_RELEASES: usize = 136;
const OFF_PRODUCERS_WAITING: usize = 140;
const OFF_CONSUMER_WAITING: usize = 192;
/// The consumer's cursor, published when it starts lingering (for the producers' urgency test).
const OFF_CONSUMER_CURSOR: usize = 200;
const OFF_COMMIT_COUNTER: usize = 256;
const OFF_COMMIT_SLOTS: usize = 264;
/// Bytes of one commit slot: head u64, head_seq u64.
const COMMIT_SLOT_BYTES: usize = 16;

const FLAG_SYNC: u32 = 1;
const FLAG_RETIRED: u32 = 2;

const CONSUMER_AWAKE: u32 = 0;
/// The consumer sleeps but only wants to be woken for urgent records (sync mode, ring filling).
const CONSUMER_LINGERING: u32 = 1;
/// The consumer sleeps and wants to be woken by any publish.
const CONSUMER_ASLEEP: u32 = 2;

/// Record header: word0 and word1.
const RECORD_HEADER: u64 = 16;
const RECORD_ALIGN: u64 = 8;
const PAD_FLAG: u32 = 1 << 31;
const LEN_MASK: u32 = PAD_FLAG - 1;
const STATE_RESERVED: u32 = 0;
const STATE_READY: u32 = 1;
/// Published by a producer whose encoder failed (a bug): the consumer skips it as invalid.
const STATE_BROKEN: u32 = 3;
/// A record may take at most this fraction of the data area; larger writes are split.
const MAX_RECORD_DIVISOR: u64 = 4;
/// Producers wake a lingering consumer once more than capacity / this waits undelivered.
const URGENT_FILL_DIVISOR: u64 = 4;
/// Consumer: how often it re-examines a record that stays reserved (abandon and stuck checks).
const PENDING_RECHECK: Duration = Duration::from_millis(10);
/// Producers map the data area into their page tables this many bytes at a time, before they
/// first write there (`MADV_POPULATE_WRITE`): one syscall per chunk instead of one page fault
/// per 4 KiB page, which cost a fresh process about as much as copying its data into the ring.
/// Small enough that a process logging one operation maps little it does not use.
const POPULATE_CHUNK: u64 = 256 * 1024;
/// The size of a huge page that maps with one page-table entry (PMD) on x86-64 and arm64 with
/// 4 KiB pages: the ring file is backed with such pages where possible.
const HUGE_PAGE: usize = 2 << 20;
/// `madvise` advice: collapse the range into huge pages (the asm-generic value, which x86-64
/// and arm64 use; the libc crate does not have it yet).
const MADV_COLLAPSE: libc::c_int = 25;

/// Why a ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// An I/O error on the ring file.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a ring of this layout.
    #[error("{path} is not a usable operation ring: {why}")]
    BadHeader { path: PathBuf, why: String },
    /// The requested capacity is not a power of two within the limits.
    #[error(
        "ring capacity {0} is invalid: a power of two from {MIN_CAPACITY} to {MAX_CAPACITY} bytes"
    )]
    Capacity(u64),
    /// The ring stayed full for the whole timeout: the consumer is not releasing space.
    #[error("the operation ring stayed full for {0:?} (is watchd's pump running?)")]
    Full(Duration),
    /// The ring was retired by watchd: reopen its path.
    #[error("the operation ring was retired; reopen it")]
    Retired,
    /// A path of the operation is not a valid relative path.
    #[error("invalid path in operation: {0}")]
    Path(#[from] PathError),
    /// The operation cannot be encoded in one record (and is not a splittable write).
    #[error("operation of {0} bytes does not fit in a ring record")]
    TooLarge(usize),
    /// The write's offset plus its length overflows.
    #[error("write offset overflows")]
    OffsetOverflow,
    /// The producer's encoder produced a different length than it announced (a bug in libft).
    #[error("internal error: the operation encoder disagreed with its own length")]
    Encoder,
    /// Sync mode: the backups did not confirm durability in time. The operation is still in the
    /// ring and will be replicated.
    #[error("backups did not confirm durability within {0:?}; the operation stays queued")]
    NotDurable(Duration),
    /// The ticket belongs to another ring (another generation).
    #[error("the ticket is from ring generation {ticket:#x}, not {ring:#x}")]
    WrongRing { ticket: u64, ring: u64 },
    /// Another consumer holds the ring (or, for a moment, a child forked by a consumer's
    /// process that has not exec'd yet: it shares the lock). Retry later.
    #[error("another consumer holds the ring {0}")]
    ConsumerBusy(PathBuf),
    /// The ring's shared state is inconsistent (a buggy or hostile producer): retire it.
    #[error("the ring is corrupt at position {pos}: {why}")]
    Corrupt { pos: u64, why: String },
    /// A reservation was never completed and its producer cannot be shown dead: retire it.
    #[error(
        "record seq {seq} at position {pos} stays reserved by pid {pid} (0: no header) for {waited:?}"
    )]
    Stuck {
        seq: u64,
        pos: u64,
        pid: u32,
        waited: Duration,
    },
    /// The seq was released already (seek) or not delivered yet (seek, release).
    #[error("seq {seq} is outside the delivered, unreleased range {first}..={last}")]
    SeqOutOfRange { seq: u64, first: u64, last: u64 },
}

/// The durable position of an appended operation, for [`Ring::wait_durable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    end: u64,
    sync: bool,
}

impl Ticket {
    /// The ring position just past the operation's last record: it is durable on the backups
    /// once the ring's head reaches it.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Whether the ring was in sync mode when the operation was appended: the caller must
    /// then [`Ring::wait_durable`] before acknowledging the application.
    pub fn sync(&self) -> bool {
        self.sync
    }

    /// The generation of the ring the operation went into.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// The shared mapping: header page plus data area.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access goes through
// atomics or through regions that the ring protocol hands to one thread at a time.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: concurrent access is coordinated by atomics in the mapping.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/len describe a mapping created by mmap in `map_file` and owned by self;
        // no reference into it outlives self (they all borrow the Ring).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Maps the whole file. A file of at least [`HUGE_PAGE`] bytes is mapped at an address aligned
/// to it, so that the huge pages [`back_with_huge_pages`] gave the file can be mapped whole:
/// a producer then takes one page fault per 2 MiB of the ring it writes, not one per 4 KiB.
fn map_file(file: &File, len: usize, path: &Path) -> Result<Mapping, RingError> {
    let fail = |e: io::Error| io_err("cannot map", path, e);
    let align = if len >= HUGE_PAGE { HUGE_PAGE } else { 0 };
    // An inaccessible reservation with room to align inside it; the file goes over its
    // aligned part and the rest is given back.
    let span = len
        .checked_add(align)
        .ok_or_else(|| fail(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: a fresh anonymous, inaccessible mapping at an address the kernel chooses;
    // checked for MAP_FAILED before use.
    let hole = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if hole == libc::MAP_FAILED {
        return Err(fail(io::Error::last_os_error()));
    }
    let start = hole.cast::<u8>();
    let lead = if align == 0 {
        0
    } else {
        (align - (start as usize) % align) % align
    };
    // SAFETY: `lead + len <= span`, so the file is mapped over part of the reservation made
    // above, which nothing else uses (MAP_FIXED replaces only those pages).
    let ptr = unsafe {
        libc::mmap(
            start.add(lead).cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        )
    };
    let mapped = ptr != libc::MAP_FAILED;
    let error = io::Error::last_os_error();
    // SAFETY: the parts of the reservation before and after the file's mapping (or all of it
    // when mapping failed) belong to this function alone; nothing points into them.
    unsafe {
        if !mapped {
            libc::munmap(hole, span);
        } else {
            if lead > 0 {
                libc::munmap(hole, lead);
            }
            if span > lead + len {
                libc::munmap(start.add(lead + len).cast(), span - lead - len);
            }
        }
    }
    if !mapped {
        return Err(fail(error));
    }
    let base = NonNull::new(ptr.cast::<u8>())
        .ok_or_else(|| fail(io::Error::other("mmap returned NULL")))?;
    Ok(Mapping { base, len })
}

/// Asks the kernel to back the (new, still sparse) ring file with huge pages: `MADV_COLLAPSE`
/// (Linux 6.1) does so on tmpfs also when its `huge` option is off. It refuses a range with no
/// page at all, so one byte of each 2 MiB is written first (a zero, as the hole would read).
/// A kernel or a file system that cannot does nothing, and the ring works with small pages.
fn back_with_huge_pages(file: &File, map: &Mapping) {
    let whole = map.len - map.len % HUGE_PAGE;
    if whole == 0 {
        return;
    }
    for at in (0..whole).step_by(HUGE_PAGE) {
        if file.write_all_at(&[0], at as u64).is_err() {
            return;
        }
    }
    // SAFETY: the range is the start of the live mapping of `file`, which nobody else has
    // mapped yet; MADV_COLLAPSE moves the file's pages into huge pages without changing what
    // they hold. Its failure leaves the small pages in place, which is fine.
    unsafe { libc::madvise(map.base.as_ptr().cast(), whole, MADV_COLLAPSE) };
}

/// Gives the file its size with its memory reserved up front (fallocate): a sparse ring on a
/// full tmpfs would kill producers with SIGBUS at their first write to a new page, where a
/// failed create is an error watchd can report. Filesystems without fallocate get a sparse
/// file.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let off_len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate on a descriptor we own; no memory is involved.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, off_len) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return file.set_len(len);
    }
    Err(e)
}

fn io_err(what: &'static str, path: &Path, source: io::Error) -> RingError {
    RingError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// One process's mapping of a ring: the producer side ([`Ring::append`]) and, turned into a
/// [`Consumer`], the consumer side. `Send + Sync`: share it between threads.
pub struct Ring {
    map: Mapping,
    file: File,
    path: PathBuf,
    /// Read once when mapping and never re-read: the mapping's header may be overwritten.
    capacity: u64,
    generation: u64,
    dev: u64,
    ino: u64,
    full_timeout: Duration,
    populated: Populated,
}

/// Which chunks of the data area this process has mapped in ([`POPULATE_CHUNK`]). Only a
/// speed-up: a chunk marked here whose pages are not mapped (a forked child, memory reclaim)
/// is faulted in page by page as usual.
struct Populated {
    chunk: u64,
    /// One bit per chunk.
    done: Box<[AtomicU64]>,
    /// The kernel lacks `MADV_POPULATE_WRITE` (before Linux 5.14).
    unsupported: AtomicBool,
}

impl Populated {
    fn new(capacity: u64) -> Populated {
        let chunk = POPULATE_CHUNK.min(capacity);
        let words = (capacity / chunk).div_ceil(64);
        Populated {
            chunk,
            done: (0..words).map(|_| AtomicU64::new(0)).collect(),
            unsupported: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .field("generation", &format_args!("{:#x}", self.generation))
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Creates a new ring (new generation) at `path` with `capacity` data bytes, owner-only
    /// permissions (watchd adjusts them for the applications). The file appears atomically;
    /// a ring already at `path` is retired afterwards, so its producers reopen the new one.
    pub fn create(path: &Path, capacity: u64, sync: bool) -> Result<Ring, RingError> {
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(RingError::Capacity(capacity));
        }
        let total = u64::from(HEADER_LEN) + capacity;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".new.{}.{}", std::process::id(), random_u64()));
        let tmp = PathBuf::from(tmp);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err("cannot create", &tmp, e))?;
        let cleanup = TempGuard(Some(tmp.clone()));
        let len = usize::try_from(total).map_err(|_| RingError::Capacity(capacity))?;
        file.set_len(total)
            .map_err(|e| io_err("cannot size", &tmp, e))?;
        let map = map_file(&file, len, &tmp)?;
        back_with_huge_pages(&file, &map);
        allocate(&file, total).map_err(|e| io_err("cannot allocate", &tmp, e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_err("cannot stat", &tmp, e))?;
        let ring = Ring {
            map,
            file,
            path: path.to_owned(),
            capacity,
            generation: random_u64(),
            dev: meta.dev(),
            ino: meta.ino(),
            full_timeout: DEFAULT_FULL_TIMEOUT,
            populated: Populated::new(capacity),
        };
        ring.u32_at(OFF_VERSION)
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        ring.u32_at(OFF_HEADER_LEN)
            .store(HEADER_LEN, Ordering::Relaxed);
        ring.u64_at(OFF_CAPACITY).store(capacity, Ordering::Relaxed);
        ring.u64_at(OFF_GENERATION)
            .store(ring.generation, Ordering::Relaxed);
        ring.u32_at(OFF_FLAGS)
            .store(if sync { FLAG_SYNC } else { 0 }, Ordering::Relaxed);
        // Commit slot 0 (selected by counter 0): nothing released, the first record is seq 1.
        ring.u64_at(OFF_COMMIT_SLOTS + 8)
            .store(1, Ordering::Relaxed);
        ring.u64_at(OFF_MAGIC).store(MAGIC, Ordering::Release);

        let previous = Ring::open(path).ok();
        std::fs::rename(&tmp, path).map_err(|e| io_err("cannot rename into place", path, e))?;
        cleanup.disarm();
        if let Some(old) = previous {
            old.retire();
        }
        Ok(ring)
    }

    /// Maps the ring at `path` (producer side, or a consumer after a restart).
    pub fn open(path: &Path) -> Result<Ring, RingError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err("cannot open", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_err("cannot stat", path, e))?;
        let bad = |why: String| RingError::BadHeader {
            path: path.to_owned(),
            why,
        };
        let mut head = [0u8; 32];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?;
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if word(OFF_MAGIC) != MAGIC {
            return Err(bad("bad magic".into()));
        }
        let version = word(OFF_VERSION);
        if version != u64::from(LAYOUT_VERSION) | (u64::from(HEADER_LEN) << 32) {
            return Err(bad(format!(
                "layout version/header length {version:#x}, expected version {LAYOUT_VERSION}"
            )));
        }
        let capacity = word(OFF_CAPACITY);
        if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            return Err(bad(format!("capacity {capacity} is invalid")));
        }
        let total = u64::from(HEADER_LEN) + capacity;
        if meta.len() != total {
            return Err(bad(format!(
                "file is {} bytes, the header says {total}",
                meta.len()
            )));
        }
        let len = usize::try_from(total).map_err(|_| RingError::Capacity(capacity))?;
        let map = map_file(&file, len, path)?;
        Ok(Ring {
            map,
            file,
            path: path.to_owned(),
            capacity,
            generation: word(OFF_GENERATION),
            dev: meta.dev(),
            ino: meta.ino(),
            full_timeout: DEFAULT_FULL_TIMEOUT,
            populated: Populated::new(capacity),
        })
    }

    /// The path the ring was created at or opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The random generation chosen when the ring was created.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Data bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How long [`append`](Self::append) waits for space before [`RingError::Full`].
    pub fn set_full_timeout(&mut self, timeout: Duration) {
        self.full_timeout = timeout;
    }

    /// Whether producers must wait for durability ([`Ticket::sync`]).
    pub fn is_sync(&self) -> bool {
        self.flags().load(Ordering::Acquire) & FLAG_SYNC != 0
    }

    /// Switches sync mode for operations appended from now on.
    pub fn set_sync(&self, sync: bool) {
        if sync {
            self.flags().fetch_or(FLAG_SYNC, Ordering::AcqRel);
        } else {
            self.flags().fetch_and(!FLAG_SYNC, Ordering::AcqRel);
        }
    }

    /// Whether watchd retired the ring (producers must reopen the path).
    pub fn is_retired(&self) -> bool {
        self.flags().load(Ordering::Acquire) & FLAG_RETIRED != 0
    }

    /// Retires the ring: appends fail with [`RingError::Retired`] (so producers reopen the
    /// path) and every waiting producer and the consumer are woken. Reservations racing with
    /// this still complete; the consumer keeps delivering what is in the ring.
    pub fn retire(&self) {
        self.flags().fetch_or(FLAG_RETIRED, Ordering::SeqCst);
        self.releases().fetch_add(1, Ordering::SeqCst);
        self.producers_waiting().store(0, Ordering::SeqCst);
        futex_wake(self.releases(), i32::MAX);
        self.consumer_waiting()
            .store(CONSUMER_AWAKE, Ordering::SeqCst);
        futex_wake(self.consumer_waiting(), i32::MAX);
    }

    /// Whether the operation of `ticket` is released by the pump (durable on every backup).
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        ticket.generation == self.generation && self.head().load(Ordering::Acquire) >= ticket.end
    }

    /// Appends one operation (several records for a write larger than a quarter of the
    /// capacity). Thread-safe and multi-process; allocates nothing. Waits for space while the
    /// ring is full, at most the full timeout. Fails with [`RingError::Retired`] when watchd
    /// retired the ring.
    pub fn append(&self, op: OpRef<'_>) -> Result<Ticket, RingError> {
        op.validate()?;
        let max_body = self.max_record() - RECORD_HEADER;
        let len = op.encoded_len();
        if len as u64 <= max_body {
            return self.append_record(len, |dst| op.encode(dst));
        }
        let Some((path, offset, data)) = op.write_parts() else {
            return Err(RingError::TooLarge(len));
        };
        let fixed = WRITE_FIXED + path.len();
        let chunk = usize::try_from(max_body)
            .ok()
            .and_then(|m| m.checked_sub(fixed))
            .filter(|&c| c > 0)
            .ok_or(RingError::TooLarge(len))?;
        let total = data.len();
        offset
            .checked_add(total as u64)
            .ok_or(RingError::OffsetOverflow)?;
        let mut done = 0;
        loop {
            let n = chunk.min(total - done);
            let piece = data.window(done, n);
            let at = offset + done as u64;
            let ticket =
                self.append_record(fixed + n, |dst| codec::encode_write(dst, path, at, piece))?;
            done += n;
            if done >= total {
                return Ok(ticket);
            }
        }
    }

    /// Waits until the operation of `ticket` is released by the pump, at most `timeout`.
    pub fn wait_durable(&self, ticket: Ticket, timeout: Duration) -> Result<(), RingError> {
        if ticket.generation != self.generation {
            return Err(RingError::WrongRing {
                ticket: ticket.generation,
                ring: self.generation,
            });
        }
        let deadline = deadline_after(timeout);
        loop {
            if self.head().load(Ordering::Acquire) >= ticket.end {
                return Ok(());
            }
            if self.is_retired() {
                return Err(RingError::Retired);
            }
            if Instant::now() >= deadline {
                return Err(RingError::NotDurable(timeout));
            }
            self.wait_for_release(deadline, |head| head >= ticket.end);
        }
    }

    /// Turns this mapping into the ring's single consumer (an exclusive lock on the file,
    /// released when the consumer is dropped or its process dies). Delivery restarts at the
    /// released head with the same seqs as before.
    pub fn consumer(self, options: ConsumerOptions) -> Result<Consumer, RingError> {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                RingError::ConsumerBusy(self.path.clone())
            } else {
                io_err("cannot lock", &self.path, e)
            });
        }
        let counter = self.u64_at(OFF_COMMIT_COUNTER).load(Ordering::Acquire);
        let (head, head_seq) = self.commit_slot(counter);
        let tail = self.tail().load(Ordering::Acquire);
        let corrupt = |why: String| RingError::Corrupt { pos: head, why };
        if !head.is_multiple_of(RECORD_ALIGN) || head_seq == 0 {
            return Err(corrupt(format!(
                "committed head {head} / head_seq {head_seq} is invalid"
            )));
        }
        if tail < head || tail - head > self.capacity || !tail.is_multiple_of(RECORD_ALIGN) {
            return Err(corrupt(format!("tail {tail} does not fit head {head}")));
        }
        // A consumer that died between committing and publishing the head left the bytes in
        // between possibly not zeroed: finish its work (producers cannot use them yet).
        let published = self.head().load(Ordering::Acquire);
        if published < head {
            if head - published > self.capacity {
                return Err(corrupt(format!(
                    "published head {published} is far behind the committed head"
                )));
            }
            self.zero(published, head);
        }
        let mut consumer = Consumer {
            ring: self,
            options,
            commit_counter: counter,
            head,
            head_seq,
            cursor: head,
            next_seq: head_seq,
            delivered_end: head,
            delivered_seq: head_seq - 1,
            known_tail: head,
            stall: None,
            lingered: false,
            abandoned: BTreeSet::new(),
            scratch: Vec::new(),
        };
        consumer.publish_head(head);
        Ok(consumer)
    }

    fn max_record(&self) -> u64 {
        self.capacity / MAX_RECORD_DIVISOR
    }

    fn mask(&self) -> u64 {
        self.capacity - 1
    }

    /// The atomic u64 at a fixed header offset.
    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= HEADER_BYTES);
        // SAFETY: `off` is one of the fixed, 8-aligned header offsets below HEADER_BYTES; the
        // mapping is page-aligned and at least HEADER_BYTES long and lives as long as `self`;
        // AtomicU64 has the layout of u64, and every process accesses these words atomically.
        unsafe { &*self.map.base.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// The atomic u32 at a fixed header offset.
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= HEADER_BYTES);
        // SAFETY: as for u64_at, with 4-byte alignment.
        unsafe { &*self.map.base.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// The record word at data position `pos` (reduced modulo the capacity and aligned down,
    /// so no value can address outside the data area).
    fn word(&self, pos: u64) -> &AtomicU64 {
        let off = usize::try_from(pos & self.mask() & !(RECORD_ALIGN - 1))
            .expect("offsets below the capacity fit in usize: the whole file was mapped");
        // SAFETY: off is 8-aligned and at most capacity - 8, so off + 8 lies inside the data
        // area that follows the header page in the live mapping; records are accessed
        // atomically word by word.
        unsafe {
            &*self
                .map
                .base
                .as_ptr()
                .add(HEADER_BYTES + off)
                .cast::<AtomicU64>()
        }
    }

    /// Raw pointer to data offset `off`, which must be at most the capacity.
    fn data_ptr(&self, off: u64) -> *mut u8 {
        let off = usize::try_from(off.min(self.capacity))
            .expect("offsets up to the capacity fit in usize: the whole file was mapped");
        // SAFETY: HEADER_BYTES + off is at most the mapping's length.
        unsafe { self.map.base.as_ptr().add(HEADER_BYTES + off) }
    }

    fn flags(&self) -> &AtomicU32 {
        self.u32_at(OFF_FLAGS)
    }
    fn tail(&self) -> &AtomicU64 {
        self.u64_at(OFF_TAIL)
    }
    fn head(&self) -> &AtomicU64 {
        self.u64_at(OFF_HEAD)
    }
    fn releases(&self) -> &AtomicU32 {
        self.u32_at(OFF_RELEASES)
    }
    fn producers_waiting(&self) -> &AtomicU32 {
        self.u32_at(OFF_PRODUCERS_WAITING)
    }
    fn consumer_waiting(&self) -> &AtomicU32 {
        self.u32_at(OFF_CONSUMER_WAITING)
    }

    fn commit_slot(&self, counter: u64) -> (u64, u64) {
        let slot = OFF_COMMIT_SLOTS + usize::from(counter % 2 == 1) * COMMIT_SLOT_BYTES;
        (
            self.u64_at(slot).load(Ordering::Acquire),
            self.u64_at(slot + 8).load(Ordering::Acquire),
        )
    }

    /// Reserves, encodes and publishes one record of `body_len` bytes.
    fn append_record(
        &self,
        body_len: usize,
        encode: impl FnOnce(&mut [u8]) -> bool,
    ) -> Result<Ticket, RingError> {
        let body = body_len as u64;
        let rec_len = (RECORD_HEADER + body).next_multiple_of(RECORD_ALIGN);
        let pid = current_pid();
        let reserved = self.reserve(rec_len, pid)?;
        let off = reserved.pos & self.mask();
        #[cfg(test)]
        test_hooks::pause_if(test_hooks::AFTER_HEADER);
        // SAFETY: [off + 16, off + 16 + body_len) lies inside the data area (a record never
        // wraps and off + rec_len <= capacity), and the reservation CAS on `tail` gave these
        // bytes to this call alone: no other producer reserves them, and the consumer does
        // not read them before the Release store of the state below.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(self.data_ptr(off + RECORD_HEADER), body_len) };
        let encoded = encode(dst);
        let state = if encoded { STATE_READY } else { STATE_BROKEN };
        self.word(reserved.pos + 8)
            .store(u64::from(state) | (body << 32), Ordering::Release);
        // Pairs with the consumer's fence between announcing sleep and re-checking the ring:
        // either it sees this record or this load sees it asleep.
        fence(Ordering::SeqCst);
        self.wake_consumer(reserved.sync, reserved.pos + rec_len);
        if !encoded {
            return Err(RingError::Encoder);
        }
        Ok(Ticket {
            generation: self.generation,
            end: reserved.pos + rec_len,
            sync: reserved.sync,
        })
    }

    /// Claims `rec_len` bytes at the tail (after a PAD record when they would cross the end of
    /// the data area) and writes the header word(s).
    fn reserve(&self, rec_len: u64, pid: u32) -> Result<Reserved, RingError> {
        let cap = self.capacity;
        let mut deadline = None;
        let mut tail = self.tail().load(Ordering::Relaxed);
        loop {
            let flags = self.flags().load(Ordering::Acquire);
            if flags & FLAG_RETIRED != 0 {
                return Err(RingError::Retired);
            }
            let head = self.head().load(Ordering::Acquire);
            let room_to_end = cap - (tail & self.mask());
            let pad = if rec_len > room_to_end {
                room_to_end
            } else {
                0
            };
            let end = tail
                .checked_add(pad + rec_len)
                .ok_or_else(|| RingError::Corrupt {
                    pos: tail,
                    why: "tail overflows".into(),
                })?;
            if end.saturating_sub(head) > cap {
                self.wait_for_space(&mut deadline, end - cap)?;
                tail = self.tail().load(Ordering::Relaxed);
                continue;
            }
            // Before the reservation, so the header stores right after it do not fault.
            if pad > 0 {
                self.populate(tail & self.mask(), pad);
                self.populate(0, rec_len);
            } else {
                self.populate(tail & self.mask(), rec_len);
            }
            match self
                .tail()
                .compare_exchange_weak(tail, end, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    #[cfg(test)]
                    test_hooks::pause_if(test_hooks::AFTER_RESERVE);
                    let pid_bits = u64::from(pid) << 32;
                    if pad > 0 {
                        // pad <= capacity <= 2^30, so it fits beside the flag bit.
                        self.word(tail)
                            .store(pad | u64::from(PAD_FLAG) | pid_bits, Ordering::Release);
                    }
                    let pos = tail + pad;
                    self.word(pos).store(rec_len | pid_bits, Ordering::Release);
                    return Ok(Reserved {
                        pos,
                        sync: flags & FLAG_SYNC != 0,
                    });
                }
                Err(actual) => tail = actual,
            }
        }
    }

    fn wait_for_space(
        &self,
        deadline: &mut Option<Instant>,
        need_head: u64,
    ) -> Result<(), RingError> {
        let now = Instant::now();
        let until = *deadline.get_or_insert_with(|| deadline_after(self.full_timeout));
        if now >= until {
            return Err(RingError::Full(self.full_timeout));
        }
        // A lingering consumer is not woken by ordinary publishes: a full ring must wake it.
        self.wake_consumer(true, u64::MAX);
        self.wait_for_release(until, |head| head >= need_head);
        Ok(())
    }

    /// Sleeps until the consumer releases something (or the ring is retired), `done(head)`
    /// holds, or `deadline` passes. Spurious returns are fine: callers loop.
    fn wait_for_release(&self, deadline: Instant, done: impl Fn(u64) -> bool) {
        self.producers_waiting().store(1, Ordering::SeqCst);
        let seen = self.releases().load(Ordering::SeqCst);
        if done(self.head().load(Ordering::Acquire)) || self.is_retired() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            futex_wait(self.releases(), seen, left);
        }
    }

    /// Wakes the consumer if it sleeps and wants to be woken: always when asleep; when
    /// lingering, only for an urgent record (sync mode) or when the records up to `end` leave
    /// a quarter of the ring undelivered.
    fn wake_consumer(&self, urgent: bool, end: u64) {
        let waiting = self.consumer_waiting();
        let wanted = match waiting.load(Ordering::Acquire) {
            CONSUMER_ASLEEP => true,
            CONSUMER_LINGERING => {
                urgent || {
                    let cursor = self.u64_at(OFF_CONSUMER_CURSOR).load(Ordering::Relaxed);
                    end.saturating_sub(cursor) > self.capacity / URGENT_FILL_DIVISOR
                }
            }
            _ => false,
        };
        if wanted && waiting.swap(CONSUMER_AWAKE, Ordering::SeqCst) != CONSUMER_AWAKE {
            futex_wake(waiting, 1);
        }
    }

    /// Maps the chunks of data offsets `[off, off + len)` into this process's page tables,
    /// those it has not mapped yet.
    fn populate(&self, off: u64, len: u64) {
        let p = &self.populated;
        if len == 0 || p.unsupported.load(Ordering::Relaxed) {
            return;
        }
        let end = off.saturating_add(len).min(self.capacity);
        let mut chunk = off / p.chunk;
        while chunk * p.chunk < end {
            let (word, bit) = (chunk / 64, 1u64 << (chunk % 64));
            let Some(done) = usize::try_from(word).ok().and_then(|w| p.done.get(w)) else {
                return;
            };
            // Whoever sets the bit maps the chunk; the others fault in what they touch first.
            if done.load(Ordering::Relaxed) & bit == 0
                && done.fetch_or(bit, Ordering::Relaxed) & bit == 0
            {
                let start = chunk * p.chunk;
                let n = usize::try_from(p.chunk.min(self.capacity - start))
                    .expect("a chunk is at most the capacity, which was mapped");
                // SAFETY: [start, start + n) lies inside the data area of the live mapping,
                // and data offsets that are multiples of the chunk are page-aligned (the
                // mapping and the header are). MADV_POPULATE_WRITE only faults the pages in
                // as writable, as a write would, without changing their contents, so bytes
                // that other producers or the consumer are using meanwhile are unaffected.
                let rc = unsafe {
                    libc::madvise(self.data_ptr(start).cast(), n, libc::MADV_POPULATE_WRITE)
                };
                if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    p.unsupported.store(true, Ordering::Relaxed);
                    return;
                }
            }
            chunk += 1;
        }
    }

    /// Zeroes the data bytes of positions `[from, to)`, at most one capacity.
    fn zero(&self, from: u64, to: u64) {
        let n = to.saturating_sub(from).min(self.capacity);
        let start = from & self.mask();
        let first = n.min(self.capacity - start);
        for (off, len) in [(start, first), (0, n - first)] {
            if len == 0 {
                continue;
            }
            let len = usize::try_from(len).expect("at most the capacity, which was mapped");
            // SAFETY: [off, off + len) lies inside the data area (off + len <= capacity), and
            // the released positions belong to the consumer until it publishes the new head:
            // no producer may reserve them before (reserve checks end - head <= capacity).
            unsafe { std::ptr::write_bytes(self.data_ptr(off), 0, len) };
        }
    }
}

struct Reserved {
    pos: u64,
    sync: bool,
}

/// Removes a temporary file unless disarmed.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Tunables of the consumer.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerOptions {
    /// See [`DEFAULT_ABANDON_AFTER`].
    pub abandon_after: Duration,
    /// See [`DEFAULT_STUCK_AFTER`].
    pub stuck_after: Duration,
    /// See [`DEFAULT_LINGER`].
    pub linger: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            abandon_after: DEFAULT_ABANDON_AFTER,
            stuck_after: DEFAULT_STUCK_AFTER,
            linger: DEFAULT_LINGER,
        }
    }
}

/// What the consumer reads: every non-PAD record gets the next seq, whatever its fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingItem {
    /// A published operation.
    Op { seq: u64, op: Op },
    /// The producer (`pid`) died between reserving and publishing: the operation is lost and
    /// the backups need a resync of the fileset.
    Abandoned { seq: u64, pid: u32 },
    /// A published record that does not decode (a buggy or hostile producer): skipped, the
    /// backups need a resync.
    Invalid { seq: u64, error: RecordError },
}

impl RingItem {
    /// The item's seq.
    pub fn seq(&self) -> u64 {
        match self {
            RingItem::Op { seq, .. }
            | RingItem::Abandoned { seq, .. }
            | RingItem::Invalid { seq, .. } => *seq,
        }
    }
}

/// Why a published record was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The body length does not match the record length.
    #[error("body of {body} bytes does not fit record of {len} bytes")]
    BodyLength { body: u64, len: u64 },
    /// The state word holds an unknown value (3: the producer's encoder failed).
    #[error("unknown record state {0}")]
    State(u32),
    /// The body does not decode.
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

/// The ring's single consumer (watchd's pump).
pub struct Consumer {
    ring: Ring,
    options: ConsumerOptions,
    commit_counter: u64,
    /// Released position and the seq of the record there: the consumer's own copies, never
    /// re-read from the mapping.
    head: u64,
    head_seq: u64,
    cursor: u64,
    next_seq: u64,
    /// High-water mark of delivery (seek may move the cursor back).
    delivered_end: u64,
    delivered_seq: u64,
    /// The tail as last read and validated: re-read only when the cursor reaches it, so the
    /// consumer does not pull the producers' hottest cache line on every record.
    known_tail: u64,
    /// The position where a record stays reserved, and since when.
    stall: Option<(u64, Instant)>,
    /// The last sleep on an empty ring was the lingering kind.
    lingered: bool,
    /// Positions of records already declared abandoned (re-delivered at once after a seek).
    abandoned: BTreeSet<u64>,
    /// Private copies of record bodies being decoded (kept to reuse its allocation).
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("ring", &self.ring)
            .field("head", &self.head)
            .field("head_seq", &self.head_seq)
            .field("cursor", &self.cursor)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

enum Step {
    Item(RingItem),
    Skipped,
    Empty,
    Pending,
}

/// A record header as read (and validated) at a position.
struct Header {
    len: u64,
    pad: bool,
    pid: u32,
}

impl Consumer {
    /// The ring (for generation, sync mode, retire).
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Seq of the oldest unreleased record (the first one ever is 1).
    pub fn head_seq(&self) -> u64 {
        self.head_seq
    }

    /// Seq the next delivered item gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest seq delivered so far (head_seq - 1 when none).
    pub fn delivered_seq(&self) -> u64 {
        self.delivered_seq
    }

    /// Whether some producer waits for space or (sync mode) for durability: the pump should
    /// release what the backups acknowledged without delay.
    pub fn producers_waiting(&self) -> bool {
        self.ring.producers_waiting().load(Ordering::Relaxed) != 0
    }

    /// Bytes reserved and not released (the pump's backlog, including PAD).
    pub fn used_bytes(&self) -> u64 {
        self.ring
            .tail()
            .load(Ordering::Acquire)
            .saturating_sub(self.head)
            .min(self.ring.capacity)
    }

    /// The next item in ring order, waiting at most `timeout` for one (`Ok(None)` then).
    pub fn next(&mut self, timeout: Duration) -> Result<Option<RingItem>, RingError> {
        let deadline = deadline_after(timeout);
        loop {
            match self.poll()? {
                Step::Item(item) => {
                    self.lingered = false;
                    return Ok(Some(item));
                }
                Step::Skipped => {}
                Step::Empty => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    let (mode, nap) = if self.lingered {
                        (CONSUMER_ASLEEP, deadline - now)
                    } else {
                        (CONSUMER_LINGERING, self.options.linger.min(deadline - now))
                    };
                    self.lingered = true;
                    self.sleep(mode, nap);
                }
                Step::Pending => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    self.sleep(CONSUMER_ASLEEP, PENDING_RECHECK.min(deadline - now));
                }
            }
        }
    }

    /// Releases every record up to and including `seq` (it must have been delivered): the
    /// producers may reuse the space, and sync-mode producers waiting for them return.
    /// Durable across a consumer crash: a restarted consumer starts after `seq`.
    pub fn release_through(&mut self, seq: u64) -> Result<(), RingError> {
        if seq < self.head_seq {
            return Ok(());
        }
        if seq > self.delivered_seq {
            return Err(self.out_of_range(seq));
        }
        let (_, end) = self.locate(seq)?;
        let old = self.head;
        let counter = self.commit_counter + 1;
        let slot = OFF_COMMIT_SLOTS + usize::from(counter % 2 == 1) * COMMIT_SLOT_BYTES;
        self.ring.u64_at(slot).store(end, Ordering::Relaxed);
        self.ring.u64_at(slot + 8).store(seq + 1, Ordering::Relaxed);
        self.ring
            .u64_at(OFF_COMMIT_COUNTER)
            .store(counter, Ordering::Release);
        self.commit_counter = counter;
        self.head = end;
        self.head_seq = seq + 1;
        self.ring.zero(old, end);
        self.abandoned = self.abandoned.split_off(&end);
        self.publish_head(end);
        Ok(())
    }

    /// Moves delivery back (or forward) to `seq`, which must be unreleased and at most one past
    /// the highest delivered: a backup that reconnects resumes from its acknowledged seq.
    pub fn seek(&mut self, seq: u64) -> Result<(), RingError> {
        if seq < self.head_seq || seq > self.delivered_seq + 1 {
            return Err(self.out_of_range(seq));
        }
        let (start, _) = self.locate(seq)?;
        self.cursor = start;
        self.next_seq = seq;
        self.stall = None;
        Ok(())
    }

    fn out_of_range(&self, seq: u64) -> RingError {
        RingError::SeqOutOfRange {
            seq,
            first: self.head_seq,
            last: self.delivered_seq,
        }
    }

    /// Start and end position of delivered record `seq` (or, for `delivered_seq + 1`, the
    /// position after the delivered ones), walking the validated headers from the head.
    fn locate(&self, seq: u64) -> Result<(u64, u64), RingError> {
        let mut pos = self.head;
        let mut s = self.head_seq;
        while pos < self.delivered_end {
            let h = self.header_at(pos, self.delivered_end)?;
            if !h.pad {
                if s == seq {
                    return Ok((pos, pos + h.len));
                }
                s += 1;
            }
            pos += h.len;
        }
        if s == seq {
            return Ok((pos, pos));
        }
        Err(RingError::Corrupt {
            pos,
            why: format!("walking from the head found seq {s}, not the delivered seq {seq}"),
        })
    }

    /// Publishes the head to producers and wakes those waiting for space or durability.
    fn publish_head(&mut self, head: u64) {
        self.ring.head().store(head, Ordering::Release);
        self.ring.releases().fetch_add(1, Ordering::SeqCst);
        if self.ring.producers_waiting().swap(0, Ordering::SeqCst) != 0 {
            futex_wake(self.ring.releases(), i32::MAX);
        }
    }

    /// Reads and validates the header word at `pos`, given that positions below `limit` are
    /// reserved. `Ok(None)`-like "no header yet" is reported as a zero-length header.
    fn header_at(&self, pos: u64, limit: u64) -> Result<Header, RingError> {
        let w0 = self.ring.word(pos).load(Ordering::Acquire);
        let corrupt = |why: String| RingError::Corrupt { pos, why };
        if w0 == 0 {
            return Err(corrupt("missing record header".into()));
        }
        self.parse_header(pos, w0, limit).map_err(corrupt)
    }

    fn parse_header(&self, pos: u64, w0: u64, limit: u64) -> Result<Header, String> {
        let raw = lo32(w0);
        let pid = hi32(w0);
        let pad = raw & PAD_FLAG != 0;
        let len = u64::from(raw & LEN_MASK);
        let room_to_end = self.ring.capacity - (pos & self.ring.mask());
        let min = if pad { RECORD_ALIGN } else { RECORD_HEADER };
        let max = if pad {
            room_to_end
        } else {
            self.ring.max_record().min(room_to_end)
        };
        if !len.is_multiple_of(RECORD_ALIGN) || len < min || len > max {
            return Err(format!(
                "record length {len} (pad: {pad}) is invalid here ({room_to_end} bytes to the end)"
            ));
        }
        if pos + len > limit {
            return Err(format!("record of {len} bytes runs past the tail {limit}"));
        }
        Ok(Header { len, pad, pid })
    }

    fn poll(&mut self) -> Result<Step, RingError> {
        let pos = self.cursor;
        if pos >= self.known_tail {
            let tail = self.ring.tail().load(Ordering::Acquire);
            if tail < pos
                || tail - self.head > self.ring.capacity
                || !tail.is_multiple_of(RECORD_ALIGN)
            {
                return Err(RingError::Corrupt {
                    pos,
                    why: format!("tail {tail} is inconsistent with head {}", self.head),
                });
            }
            self.known_tail = tail;
        }
        let tail = self.known_tail;
        if tail == pos {
            self.stall = None;
            return Ok(Step::Empty);
        }
        let seq = self.next_seq;
        let w0 = self.ring.word(pos).load(Ordering::Acquire);
        if w0 == 0 {
            // Reserved, header not written yet: normally a matter of nanoseconds.
            let waited = self.stalled_for(pos);
            if waited >= self.options.stuck_after {
                return Err(RingError::Stuck {
                    seq,
                    pos,
                    pid: 0,
                    waited,
                });
            }
            return Ok(Step::Pending);
        }
        let h = self
            .parse_header(pos, w0, tail)
            .map_err(|why| RingError::Corrupt { pos, why })?;
        if h.pad {
            self.advance(h.len, false);
            return Ok(Step::Skipped);
        }
        let w1 = self.ring.word(pos + 8).load(Ordering::Acquire);
        let state = lo32(w1);
        let body = w1 >> 32;
        let item = match state {
            STATE_READY => match self.read_body(pos, h.len, body) {
                Ok(op) => RingItem::Op { seq, op },
                Err(error) => RingItem::Invalid { seq, error },
            },
            STATE_RESERVED => {
                if !self.abandoned.contains(&pos) {
                    let waited = self.stalled_for(pos);
                    let abandoned =
                        waited >= self.options.abandon_after && !self.producer_alive(h.pid);
                    if !abandoned {
                        if waited >= self.options.stuck_after {
                            return Err(RingError::Stuck {
                                seq,
                                pos,
                                pid: h.pid,
                                waited,
                            });
                        }
                        return Ok(Step::Pending);
                    }
                    self.abandoned.insert(pos);
                }
                RingItem::Abandoned { seq, pid: h.pid }
            }
            other => RingItem::Invalid {
                seq,
                error: RecordError::State(other),
            },
        };
        self.advance(h.len, true);
        Ok(Step::Item(item))
    }

    fn read_body(&mut self, pos: u64, len: u64, body: u64) -> Result<Op, RecordError> {
        let room = len - RECORD_HEADER;
        if body > room || room - body >= RECORD_ALIGN {
            return Err(RecordError::BodyLength { body, len });
        }
        let n = usize::try_from(body).map_err(|_| RecordError::BodyLength { body, len })?;
        let off = (pos & self.ring.mask()) + RECORD_HEADER;
        let ring = &self.ring;
        let read = |at: usize, count: usize, dst: &mut Vec<u8>| {
            let count = count.min(n.saturating_sub(at));
            dst.reserve(count);
            let spare = dst.spare_capacity_mut();
            // SAFETY: [off + at, off + at + count) lies inside the body, which lies inside the
            // data area (the header was validated to fit before the end of the area), and
            // `spare` has room for `count` bytes (reserved above), which the copy initialises
            // before set_len. The bytes are copied into private memory and only the copy is
            // decoded, so a producer changing them concurrently can only make the decoded
            // operation wrong, never the reads unsafe.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    ring.data_ptr(off + at as u64),
                    spare.as_mut_ptr().cast::<u8>(),
                    count,
                );
                dst.set_len(dst.len() + count);
            }
        };
        Ok(codec::decode_piecewise(n, &mut self.scratch, read)?)
    }

    fn advance(&mut self, len: u64, counts: bool) {
        self.cursor += len;
        self.stall = None;
        if self.cursor > self.delivered_end {
            self.delivered_end = self.cursor;
        }
        if counts {
            self.delivered_seq = self.delivered_seq.max(self.next_seq);
            self.next_seq += 1;
        }
    }

    fn stalled_for(&mut self, pos: u64) -> Duration {
        let now = Instant::now();
        match self.stall {
            Some((p, since)) if p == pos => now - since,
            _ => {
                self.stall = Some((pos, now));
                Duration::ZERO
            }
        }
    }

    /// Whether `pid` may still complete a record: it exists and still maps this ring (a
    /// zombie maps nothing; a reused pid maps something else).
    fn producer_alive(&self, pid: u32) -> bool {
        let Ok(pid_t) = libc::pid_t::try_from(pid) else {
            return false;
        };
        if pid_t <= 0 {
            return false;
        }
        // SAFETY: signal 0 only checks for existence and permission.
        if unsafe { libc::kill(pid_t, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            Ok(maps) => maps_contain(&maps, self.ring.dev, self.ring.ino),
            // Cannot tell (no /proc, no permission): assume alive; the stuck timeout decides.
            Err(_) => true,
        }
    }

    /// Sleeps in `mode` for at most `nap`, unless the ring already has progress to offer.
    fn sleep(&self, mode: u32, nap: Duration) {
        let waiting = self.ring.consumer_waiting();
        self.ring
            .u64_at(OFF_CONSUMER_CURSOR)
            .store(self.cursor, Ordering::Relaxed);
        waiting.store(mode, Ordering::SeqCst);
        // Pairs with the producers' fence between publishing and looking at this word.
        fence(Ordering::SeqCst);
        if !self.progress_possible() {
            futex_wait(waiting, mode, nap);
        }
        waiting.store(CONSUMER_AWAKE, Ordering::Relaxed);
    }

    /// Whether poll() would now deliver, skip or fail rather than find nothing to do.
    fn progress_possible(&self) -> bool {
        let tail = self.ring.tail().load(Ordering::Acquire);
        if tail == self.cursor {
            return false;
        }
        let w0 = self.ring.word(self.cursor).load(Ordering::Acquire);
        if w0 == 0 {
            return false;
        }
        match self.parse_header(self.cursor, w0, tail) {
            Ok(h) if !h.pad => {
                let state = self.ring.word(self.cursor + 8).load(Ordering::Acquire) & 0xffff_ffff;
                state != u64::from(STATE_RESERVED)
            }
            _ => true,
        }
    }
}

/// Whether a `/proc/PID/maps` text has a mapping of the file (dev, ino).
fn maps_contain(maps: &str, dev: u64, ino: u64) -> bool {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    maps.lines().any(|line| {
        let mut f = line.split_whitespace().skip(3);
        let (Some(d), Some(i)) = (f.next(), f.next()) else {
            return false;
        };
        let Some((ma, mi)) = d.split_once(':') else {
            return false;
        };
        u32::from_str_radix(ma, 16) == Ok(major)
            && u32::from_str_radix(mi, 16) == Ok(minor)
            && i.parse::<u64>() == Ok(ino)
    })
}

/// The low half of a record word.
#[allow(clippy::cast_possible_truncation)] // keeping the low 32 bits is the point
fn lo32(word: u64) -> u32 {
    word as u32
}

/// The high half of a record word.
fn hi32(word: u64) -> u32 {
    u32::try_from(word >> 32).unwrap_or(u32::MAX)
}

fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    // A timeout too large to represent means "practically forever".
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(u64::from(u32::MAX)))
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `word` is a live, aligned u32 inside the shared mapping; FUTEX_WAIT (not
    // PRIVATE: producers and the consumer live in different processes) only reads it and
    // sleeps; `ts` is valid for the duration of the call. Errors (EAGAIN: value changed,
    // ETIMEDOUT, EINTR) all mean "look again", which every caller does.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &raw const ts,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32, count: i32) {
    // SAFETY: `word` is a live, aligned u32 inside the shared mapping; FUTEX_WAKE does not
    // access memory besides using the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            count,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// This process's pid, cached (getpid is a syscall) and forgotten in a forked child.
fn current_pid() -> u32 {
    static PID: AtomicU32 = AtomicU32::new(0);
    static AT_FORK: Once = Once::new();
    extern "C" fn forget_pid() {
        PID.store(0, Ordering::Relaxed);
    }
    let cached = PID.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic (async-signal-safe), for
        // the child side of fork; libft is never unloaded while the process lives.
        unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) };
    });
    let pid = std::process::id();
    PID.store(pid, Ordering::Relaxed);
    pid
}

fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        return u64::from_le_bytes(buf);
    }
    // No entropy source: uniqueness is all a generation needs.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() ^ (u64::from(d.subsec_nanos()) << 32));
    t ^ (u64::from(std::process::id()) << 12)
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;

#[cfg(test)]
pub(crate) mod test_hooks {
    //! Stops a (forked) producer at a chosen point of `append`, so a test can kill it there.
    use std::sync::atomic::{AtomicU8, Ordering};

    pub const AFTER_RESERVE: u8 = 1;
    pub const AFTER_HEADER: u8 = 2;
    pub static PAUSE_AT: AtomicU8 = AtomicU8::new(0);

    pub fn pause_if(point: u8) {
        if PAUSE_AT.load(Ordering::Relaxed) == point {
            loop {
                // SAFETY: pause has no preconditions; the test kills this process.
                unsafe { libc::pause() };
            }
        }
    }
}
