//! Resource groups on this node: the resource agents (exec, ip, ...) behind one [`Resource`]
//! type that the group executor drives. Agents only act on their own resource; the decisions
//! (which node owns which group, at which epoch) are made elsewhere (cluster's failover policy).

pub mod exec;
pub mod ip;
pub mod resource;

pub use resource::{Action, Health, Resource, ResourceError, ResourceKind, Timeouts};
