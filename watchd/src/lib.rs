//! watchd: ftkit's per-host supervisor, as a library under the `watchd` and `ftctl` binaries.
//!
//! The rules live in sans-IO state machines ([`machine`]); the actors, sockets and processes
//! around them are thin adapters. See ARCHITECTURE.md for the picture.

pub mod api;
pub mod config;
pub mod ctl;
pub mod events;
pub mod listener;
pub mod machine;
pub mod probe;
pub mod registry;
