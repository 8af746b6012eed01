//! The application side of file replication: file operations as typed records ([`op`]).
//!
//! Everything here is runtime-free: it is linked into user programs through libft and the
//! LD_PRELOAD shim.

pub mod op;

pub use op::{MAX_PATH_BYTES, Op, OpRecord, PathError, RelPath};
