//! Where recorded operations go: libft's filesets and their rings.
//!
//! The one boundary between the interception layer and libft's producer API. It never fails
//! the application: append errors are reported once on stderr and the operation is dropped
//! (watchd resyncs a fileset whose stream has a gap).

use ft::replog::{Filesets, OpRef, Ticket};

use crate::diag::{self, Trouble};

/// The filesets of this process (from `FT_REPL_FILESETS`).
#[derive(Debug)]
pub(crate) struct Sink {
    filesets: Filesets,
}

impl Sink {
    /// Reads `FT_REPL_FILESETS`; `None` when it is unset, empty or unusable (reported).
    pub(crate) fn from_env() -> Option<Self> {
        match Filesets::from_env() {
            Ok(filesets) if filesets.is_empty() => None,
            Ok(filesets) => Some(Self { filesets }),
            Err(e) => {
                diag::report(
                    Trouble::Config,
                    format_args!("replication is off for this process: {e}"),
                );
                None
            }
        }
    }

    /// The fileset a canonical absolute path belongs to, and its path relative to the root.
    #[inline]
    pub(crate) fn classify<'p>(&self, canonical: &'p [u8]) -> Option<(usize, &'p [u8])> {
        self.filesets.classify(canonical)
    }

    /// Appends `op` to fileset `index`'s ring; the ticket if the caller must wait for
    /// durability (sync mode).
    pub(crate) fn append(&self, index: usize, op: OpRef<'_>) -> Option<Ticket> {
        match self.filesets.append(index, op) {
            Ok(ticket) => ticket.filter(Ticket::sync),
            Err(e) => {
                diag::report(
                    Trouble::Append,
                    format_args!("a {} operation was not replicated: {e}", kind(&op)),
                );
                None
            }
        }
    }

    /// Waits (bounded by the fileset's sync timeout) until `ticket` is durable on the backups.
    pub(crate) fn wait_durable(&self, index: usize, ticket: Ticket) {
        if let Err(e) = self.filesets.wait_durable(index, ticket) {
            diag::report(
                Trouble::Append,
                format_args!("a sync-mode operation returns before the backups confirmed it: {e}"),
            );
        }
    }
}

fn kind(op: &OpRef<'_>) -> &'static str {
    match op {
        OpRef::Create { .. } => "create",
        OpRef::Write { .. } | OpRef::WriteVectored { .. } => "write",
        OpRef::Truncate { .. } => "truncate",
        OpRef::Rename { .. } => "rename",
        OpRef::Unlink { .. } => "unlink",
        OpRef::Mkdir { .. } => "mkdir",
        OpRef::Rmdir { .. } => "rmdir",
        OpRef::Chmod { .. } => "chmod",
        OpRef::SetTimes { .. } => "settimes",
        OpRef::Symlink { .. } => "symlink",
        OpRef::Link { .. } => "link",
        OpRef::Fsync { .. } => "fsync",
    }
}
