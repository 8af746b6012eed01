//! Resource groups on this node: the resource agents (exec, ip, service, ...) behind one
//! [`Resource`] type, the executor that drives them for the groups this node owns, and the
//! operators' requests (`ftctl group ...`). Agents only act on their own resource; the decisions
//! (which node owns which group, at which epoch) are made elsewhere (cluster's failover policy).

pub mod apply;
pub mod exec;
pub mod executor;
pub mod fileset;
pub mod in_sync;
pub mod ip;
pub mod resource;
pub mod service;

pub use resource::{Action, Health, Resource, ResourceError, ResourceKind, Timeouts};
