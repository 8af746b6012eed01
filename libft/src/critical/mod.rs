//! Checkpointed critical memory (NT-SwiFT's `t_ftmalloc` / `t_checkpoint` / `t_recover`).
//!
//! Owns the critical heap (a fixed-address mapping whose allocator state lives inside it),
//! the regions registered with `ft_critical`, dirty-page tracking, and checkpoints written to
//! the `ckpt` store and recovered from it. It never maps over foreign memory, never allocates
//! in a snapshot child, and never writes into application memory except in `recover`.
//!
//! ```text
//!  t_checkpoint (caller paused)            writer thread / snapshot child      ckpt::Store
//!  collect dirty pages (uffd+PAGEMAP_SCAN  ──► image chunks, checksums ──► temp, fdatasync,
//!  or hashes), copy to staging or clone COW    (the child writes the file)   rename, dir fsync
//!                                          compaction thread: increment ──► full image (same seq)
//!  t_recover: Store::recover ──► validate layout ──► wipe heap ──► apply chain ──► check heap
//! ```
//!
//! Contract with the application: critical memory is consistent when `t_checkpoint` (or a
//! `t_safe_point` that takes a periodic checkpoint) is called — other threads must not be
//! writing it then. Pointers into the heap survive recovery (fixed address); registered
//! regions are matched by registration order and length, and their contents are restored to
//! wherever they live now (ASLR may move globals), so pointers *into* regions do not survive.

mod checkpoint;
mod dirty;
mod heap;
mod snapshot;
mod uapi;
mod value;
mod vm;

use std::io;

pub use checkpoint::{
    CaptureMethod, CheckpointConfig, Checkpointer, CommitHook, DEFAULT_CKPT_DIR,
    DEFAULT_STAGING_MAX, ENV_CKPT_DIR, ENV_CKPT_EVERY, ENV_CKPT_FULL_EVERY, ENV_CKPT_KEEP,
    ENV_CKPT_STAGING_MAX, ENV_DIRTY, Recovered, RecoveryReport, Started, app_identity, global,
    init_global,
};
pub use dirty::{DirtyMode, TrackerKind};
pub use heap::{
    CriticalHeap, DEFAULT_HEAP_SIZE, DEFAULT_SLOT_SIZE, DEFAULT_WINDOW_BASE, DEFAULT_WINDOW_SLOTS,
    ENV_HEAP_ADDR, ENV_HEAP_SIZE, HeapConfig, HeapStats, MAX_ALIGN, MAX_HEAP_SIZE, MIN_HEAP_SIZE,
    ROOT_NAME_MAX, ROOT_SLOTS, parse_addr, parse_size,
};
pub use value::{Critical, CriticalBox};

/// Why a critical-memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The fixed address range of the heap is already used by another mapping.
    #[error(
        "critical heap {addr:#x}+{size:#x} overlaps existing mappings: {occupant} (choose another FT_HEAP_ADDR)"
    )]
    AddressInUse {
        /// Requested base address.
        addr: usize,
        /// Requested size.
        size: usize,
        /// The mappings in the way, as /proc/self/maps shows them.
        occupant: String,
    },
    /// mmap refused the heap for another reason.
    #[error("cannot map the critical heap at {addr:#x} ({size} bytes): {source}")]
    Map {
        /// Requested base address.
        addr: usize,
        /// Requested size.
        size: usize,
        /// What mmap said.
        #[source]
        source: io::Error,
    },
    /// A configuration value (environment or parameter) is invalid.
    #[error("invalid critical-memory configuration: {0}")]
    Config(String),
    /// The heap has no room for the request.
    #[error("critical heap exhausted: {requested} bytes requested, {used} of {size} bytes used")]
    OutOfMemory {
        /// Bytes asked for.
        requested: usize,
        /// The used span of the heap.
        used: usize,
        /// The heap's size.
        size: usize,
    },
    /// A pointer is not the start of a live block of the heap.
    #[error("{0:#x} is not a live block of the critical heap")]
    InvalidPointer(usize),
    /// An argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The heap's metadata is inconsistent (overwritten by the application, or a bad image).
    #[error("critical heap corrupt: {0}")]
    Corrupt(String),
    /// The checkpoint was made by a process laid out differently (heap address or size,
    /// registered regions).
    #[error("checkpoint does not match this process: {0}")]
    Mismatch(String),
    /// The operation conflicts with one in progress.
    #[error("busy: {0}")]
    Busy(&'static str),
    /// The process is a warm standby (`FT_ROLE=standby`): it writes no checkpoint until it
    /// is promoted (`ft::standby`).
    #[error("this process is a standby: it writes no checkpoints until it is promoted")]
    Standby,
    /// The checkpoint store failed (disk full, I/O error, ...).
    #[error("checkpoint store: {0}")]
    Store(#[from] ckpt::StoreError),
    /// Writing an image failed.
    #[error("checkpoint image: {0}")]
    Image(#[from] ckpt::ImageError),
    /// The copy-on-write snapshot child could not be made or failed.
    #[error("snapshot process: {0}")]
    Snapshot(#[source] io::Error),
    /// libft's checkpoint writer thread could not be started.
    #[error("cannot start the checkpoint writer thread: {0}")]
    Writer(#[source] io::Error),
    /// Dirty-page tracking failed.
    #[error("dirty-page tracking: {0}")]
    Tracking(#[source] io::Error),
    /// A [`Critical`] value could not be (de)serialized.
    #[error("critical value {name:?}: {reason}")]
    Value {
        /// The value's name.
        name: String,
        /// What serde said.
        reason: String,
    },
}

impl Error {
    /// Whether the underlying cause is a full disk (ENOSPC / EDQUOT) anywhere in the chain.
    pub fn is_storage_full(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<io::Error>()
                && (io.kind() == io::ErrorKind::StorageFull
                    || matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
            {
                return true;
            }
            if let Some(img) = e.downcast_ref::<ckpt::ImageError>()
                && matches!(
                    img.io_kind(),
                    Some(io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
                )
            {
                return true;
            }
            cause = e.source();
        }
        false
    }
}
