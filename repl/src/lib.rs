//! File replication (NT-SwiFT REPL): operations from the application are sequenced by the pump
//! on the primary, appended durably by the bcplog on each backup and applied by replay to the
//! replica directory. The operation types themselves live in libft (`ft::replog`), which the
//! application links.

pub use ft::replog::{Op, OpRecord, PathError, RelPath};

pub mod manifest;
pub mod replay;
pub mod segment;

pub mod pump;

pub mod proto;

pub mod backup;
pub mod bcplog;
pub mod copy;
pub mod primary;
