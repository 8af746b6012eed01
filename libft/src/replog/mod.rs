//! The application side of file replication: file operations as typed records ([`op`]), the
//! shared-memory ring that carries them from applications to watchd's pump ([`ring`], with
//! its binary codec), and the filesets of `FT_REPL_FILESETS` ([`fileset`]).
//!
//! Everything here is runtime-free: it is linked into user programs through libft and the
//! LD_PRELOAD shim.

mod codec;
pub mod fileset;
pub mod op;
pub mod ring;

pub use codec::{DecodeError, OpRef};
pub use fileset::{Fileset, FilesetError, Filesets};
pub use op::{MAX_PATH_BYTES, Op, OpRecord, PathError, RelPath, check_path};
pub use ring::{Consumer, ConsumerOptions, RecordError, Ring, RingError, RingItem, Ticket};
