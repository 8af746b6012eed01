//! The cluster core: what every multi-host feature of ftkit stands on. Today: the authenticated
//! node-to-node transport ([`net`]) that file replication, membership and checkpoint shipping
//! share.

pub mod db;
pub mod failover;
pub mod gum;
pub mod membership;
pub mod net;
pub mod quorum;
