//! libft: the application side of ftkit.
//!
//! Registration with watchd, FtHbeat-style heartbeats and readiness, in Rust ([`watch`]) and
//! through a C ABI (`libft.so`, `include/ft.h`). This crate is linked into user programs: it
//! never pulls in an async runtime, an actor framework or a database, and it never blocks or
//! aborts the application when watchd is unreachable.

pub mod capi;
pub mod proto;
pub mod watch;

pub use watch::{Error, Region, Watch, current_tid};
