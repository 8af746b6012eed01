//! The replication stream between a pump (primary) and one backup: the messages on the
//! `cluster::net` channel `repl/<fileset>` and what each side may send when.
//!
//! ```text
//!  pump (dials)                                   backup (listens)
//!   Hello{fileset, generation, epoch, mode}  ──►
//!                                            ◄──  State{generation, durable}   (or Refused)
//!   ── resume: durable+1 is still retained ──
//!   Ops{records}  ──►  …                     ◄──  Ack{durable}  …
//!   ── otherwise resync ──
//!   ResyncBegin{next_seq}                    ──►
//!                                            ◄──  Manifest{entries, last} …
//!   ResyncOps{ops} …, ResyncEnd{next_seq}  ──►
//!                                            ◄──  Ack{durable: next_seq - 1}
//!   Ops{records} …  (stream from next_seq)
//! ```
//!
//! This module only defines the messages; the rules live in [`crate::pump`] and
//! [`crate::backup`]. It never trusts a field: the receivers check sequence numbers,
//! generations and epochs.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::manifest::Entry;
use crate::{Op, OpRecord, RelPath};

/// The `cluster::net` channel of a fileset's stream.
pub fn channel(fileset: &str) -> String {
    format!("repl/{fileset}")
}

/// When the application's write or fsync returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// At once; the backups lag behind (measured and shown).
    Async,
    /// Only once every reachable backup has the operation durable in its log (DRBD protocol C).
    Sync,
}

/// Pump → backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToBackup {
    /// First message on a connection.
    Hello {
        /// The fileset's name (must match the channel).
        fileset: String,
        /// The stream's generation: sequence numbers are only comparable within one.
        generation: u64,
        /// The ownership epoch (fencing token): a backup refuses a pump with an older one.
        epoch: u64,
        /// The fileset's mode.
        mode: Mode,
    },
    /// Records in sequence order, continuing exactly after the previous ones.
    Ops { records: Vec<OpRecord> },
    /// The backup cannot resume: it sends its manifest, then receives the differences.
    ResyncBegin { next_seq: u64 },
    /// Operations that bring files up to date (no sequence numbers: applied at once).
    ResyncOps { ops: Vec<Op> },
    /// End of a resync (removals travelled as ops): continue at `next_seq`.
    ResyncEnd { next_seq: u64 },
}

/// The encoding side of [`ToBackup::Ops`], so records shared between backups are serialized
/// without cloning their data. Decodes as [`ToBackup::Ops`].
#[derive(Debug, Serialize)]
pub enum OpsRef<'a> {
    /// Same variant name and shape as [`ToBackup::Ops`].
    Ops { records: &'a [Arc<OpRecord>] },
}

/// Backup → pump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToPrimary {
    /// Answer to `Hello`: the stream the backup holds and how far it is durable in its log.
    State { generation: u64, durable: u64 },
    /// Everything through `durable` is durable in the backup's log.
    Ack { durable: u64 },
    /// Part of the backup's manifest during a resync.
    Manifest {
        entries: Vec<(RelPath, Entry)>,
        last: bool,
    },
    /// The backup refuses the stream (stale epoch, wrong fileset, not a backup now); the
    /// connection closes.
    Refused {
        /// Why, for a person.
        reason: String,
        /// The newest ownership epoch the refusing node knows of (0: none). Above the pump's
        /// own, it means the pump's owner was replaced: it is fenced.
        #[serde(default)]
        epoch: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_ref_decodes_as_ops() {
        let rec = Arc::new(OpRecord {
            seq: 3,
            op: Op::Unlink {
                path: RelPath::new(&b"x"[..]).expect("valid"),
            },
        });
        let bytes = rmp_serde::to_vec(&OpsRef::Ops {
            records: std::slice::from_ref(&rec),
        })
        .expect("encodes");
        let back: ToBackup = rmp_serde::from_slice(&bytes).expect("decodes");
        assert_eq!(
            back,
            ToBackup::Ops {
                records: vec![(*rec).clone()]
            }
        );
    }
}
