//! watchd: ftkit's per-host supervisor, as a library under the `watchd` and `ftctl` binaries.
//!
//! The rules live in sans-IO state machines ([`machine`]); the actors, sockets and processes
//! around them are thin adapters. See ARCHITECTURE.md for the picture.

pub mod api;
pub mod board;
pub mod cgroup;
mod command;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod events;
pub mod group;
pub mod listener;
pub mod logs;
pub mod machine;
pub mod node;
pub mod probe;
pub mod process;
pub mod registry;
pub mod repl;
pub mod supervisor;
pub mod transparent;
