//! libft: the application side of ftkit.
//!
//! Registration with watchd, FtHbeat-style heartbeats and readiness ([`watch`]), and
//! checkpointed critical memory — a fixed-address heap, registered globals, `t_checkpoint` /
//! `t_recover` ([`critical`]), warm standby (role, promotion, following shipped checkpoints:
//! [`standby`]) — in Rust and through a C ABI (`libft.so`, `include/ft.h`). This
//! crate is linked into user programs: it never pulls in an async runtime, an actor framework
//! or a database, and it never blocks or aborts the application when watchd is unreachable.

pub mod capi;
pub mod critical;
pub mod fs;
pub mod proto;
pub mod replog;
pub mod standby;
pub mod watch;

pub use standby::{Role, role};
pub use watch::{Error, Region, Watch, current_tid};
