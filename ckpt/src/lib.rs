//! ckpt: checkpoint images (format v1), the local checkpoint store of one application stream
//! (atomic commit, compaction of incremental chains into full images, retention, recovery),
//! and the failpoints of its commit and compaction paths. Linked into user programs through
//! libft, so it must never pull in an async runtime, an actor framework or a database.
//!
//! ```
//! use ckpt::{ImageHeader, RegionDesc, Store, StorePolicy};
//! # let tmp = tempfile::tempdir().unwrap();
//! let store = Store::open(tmp.path(), "my-app", StorePolicy::default()).unwrap();
//! let memory = vec![7u8; 10_000];
//! let plan = store.plan().unwrap(); // seq 1, full (no parent yet)
//! let header = ImageHeader {
//!     app: "my-app".into(),
//!     stream: 1,
//!     seq: plan.seq,
//!     parent: plan.parent,
//!     created_unix_ns: ckpt::unix_now_ns(),
//!     page_size: 4096,
//!     regions: vec![RegionDesc { id: 1, base: 0x7f00_0000_0000, len: memory.len() as u64 }],
//! };
//! let mut pending = store.begin(&header).unwrap();
//! pending.chunk(0, 0, &memory).unwrap(); // or pending.writer().chunk(..)
//! pending.commit().unwrap();
//!
//! let mut restored = vec![0u8; memory.len()];
//! let recovery = store
//!     .recover(&mut |_header, _region, offset, data| {
//!         let at = offset as usize;
//!         restored[at..at + data.len()].copy_from_slice(data);
//!     })
//!     .unwrap()
//!     .expect("one good image");
//! assert_eq!((recovery.seq, restored), (1, memory));
//!
//! // When the plan says `compact`, the increment it allows is written and then replaced by
//! // the full image of the same state (libft does this on a background thread):
//! // `store.compact(seq, &mut || true)`.
//! ```

mod compact;
pub mod failpoint;
pub mod image;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod proc;
pub mod store;

pub use image::{
    CHUNK_RECORD_LEN, ChunkRef, ChunkVisitor, ImageError, ImageHeader, ImageReader, ImageSummary,
    ImageWriter, MAX_CHUNK, RegionDesc, read_chunk_at, read_header, read_image, unix_now_ns,
};
pub use store::{
    ApplyFn, CompactGate, ImageFile, ImageInfo, ListEntry, Pending, Plan, Recovery, Store,
    StoreError, StorePolicy,
};
