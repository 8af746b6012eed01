//! The control protocol between `ftctl` and watchd.
//!
//! A Unix stream socket (`<data_dir>/control.sock`), one JSON object per line each way: the
//! client writes one [`Request`]; watchd answers with one [`Response`] line, or, for
//! `events --follow`, with a line per event until the client hangs up. Only root and watchd's own
//! user may connect (checked with `SO_PEERCRED`). Lines longer than [`MAX_REQUEST_LINE`] are
//! refused.

use serde::{Deserialize, Serialize};

use crate::machine::{EventKind, View};

/// The socket's file name inside the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The longest request line watchd reads.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// What ftctl asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every service's state and the listener's counters.
    Status,
    /// Start a stopped or failed service.
    Start {
        /// Service name.
        service: String,
    },
    /// Stop a service (SIGTERM, then SIGKILL after its grace).
    Stop {
        /// Service name.
        service: String,
    },
    /// Restart a service (not counted against its budget).
    Restart {
        /// Service name.
        service: String,
    },
    /// Recent events; with `follow`, then every new one.
    Events {
        /// Keep the connection and stream new events.
        follow: bool,
        /// Only the last `last` events (all kept ones when absent).
        last: Option<usize>,
    },
    /// The tail of a service's captured stdout/stderr.
    Logs {
        /// Service name.
        service: String,
        /// At most this many bytes from the end.
        max_bytes: Option<u64>,
    },
    /// Re-read the configuration file and apply it.
    Reload,
    /// Checkpoint a service: a transparent one is dumped by watchd now (the answer is
    /// `checkpointed`); any other is asked, through libft, to checkpoint at its next safe point.
    Checkpoint {
        /// Service name.
        service: String,
        /// Checkpoint stream (`t_checkpoint(id)`); 0 when absent.
        stream: Option<u32>,
    },
    /// Promote the warm standby instance of a service (`FT_ROLE=standby`) in place: libft
    /// tells it (`Promote`), and it serves as primary from then on.
    Promote {
        /// Service name.
        service: String,
        /// The ownership epoch handed to the application; 0 when absent.
        epoch: Option<u64>,
    },
    /// Roll a service with transparent checkpoints back, in place, to one of them.
    Rollback {
        /// Service name.
        service: String,
        /// The checkpoint (image sequence); the newest good one when absent.
        seq: Option<u64>,
    },
    /// Test hook (refused unless watchd runs with `WATCHD_TEST_HOOKS=1`): make the service's
    /// supervisor actor panic, to show that the actor is restarted and the service untouched.
    InjectPanic {
        /// Service name.
        service: String,
    },
    /// The state of every replicated fileset on this node.
    ReplStatus,
    /// The cluster as this node sees it: view, quorum, every node (`ftctl cluster
    /// status|nodes`).
    ClusterStatus,
    /// Recent cluster events (`ftctl cluster events`).
    ClusterEvents {
        /// Only the last `last` events (all kept ones when absent).
        last: Option<usize>,
    },
    /// Pause (a member that may own no groups) or resume a member.
    NodePause {
        /// The member.
        node: String,
        /// Pause (true) or resume.
        paused: bool,
    },
    /// Make a node leave the cluster on purpose (only the node itself can).
    NodeLeave {
        /// The node.
        node: String,
    },
    /// This node's copy of the cluster database (`ftctl cluster db`).
    ClusterDb,
    /// Change the cluster database through a global update (`ftctl cluster set|unset|update`).
    ClusterUpdate {
        /// The change.
        update: cluster::gum::Update,
    },
    /// Resource groups (`ftctl group ...`, `ftctl resource status`).
    Group {
        /// What to do.
        request: crate::group::apply::GroupRequest,
    },
}

/// What watchd answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The request was carried out.
    Ok {
        /// What was done.
        message: String,
    },
    /// The answer to `status`.
    Status(StatusReport),
    /// A transparent checkpoint was taken (answer to `checkpoint` of a transparent service).
    Checkpointed(TransparentCheckpoint),
    /// The service was rolled back (answer to `rollback`).
    RolledBack(TransparentRollback),
    /// Answer to `ReplStatus`.
    Repl {
        /// One report per configured fileset.
        filesets: Vec<crate::repl::FilesetReport>,
    },
    /// Answer to `ClusterStatus`.
    Cluster(Box<crate::node::report::ClusterStatus>),
    /// Answer to `ClusterDb`.
    ClusterDb(Box<crate::node::report::DbReport>),
    /// Answer to `ClusterEvents`.
    ClusterEvents {
        /// Oldest first.
        events: Vec<crate::node::report::ClusterEvent>,
    },
    /// Answer to `Group` status: every group and its resources.
    Groups {
        /// In name order.
        groups: Vec<crate::group::apply::GroupReport>,
    },
    /// One event (`events` sends one line per event, then `end` unless following).
    Event(EventRecord),
    /// The end of a finite event listing.
    End,
    /// The answer to `logs`.
    Logs {
        /// The log text (lossy UTF-8).
        text: String,
    },
    /// A valid negative answer: the service does not exist.
    NotFound {
        /// What was not found.
        what: String,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// This node's name.
    pub node: String,
    /// watchd's pid.
    pub watchd_pid: u32,
    /// The configuration file in force.
    pub config: String,
    /// Per service.
    pub services: Vec<ServiceStatus>,
    /// Datagrams on the application sockets.
    pub listener: ListenerCounters,
}

/// One service in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Its name.
    pub name: String,
    /// Whether cgroup v2 confines it.
    pub cgroup: bool,
    /// What the state machine shows.
    #[serde(flatten)]
    pub view: View,
    /// The last transparent checkpoint of the service, when it has transparent checkpoints.
    #[serde(default)]
    pub transparent: Option<TransparentStatus>,
}

/// The last transparent checkpoint of a service, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransparentStatus {
    /// Image sequence.
    pub seq: u64,
    /// Pages of memory written to the image (an increment holds only those written since).
    pub pages: u64,
    /// Whether it is a full image (not an increment).
    pub full: bool,
    /// How long the service was stopped for it, in microseconds.
    pub pause_us: u64,
    /// Milliseconds since it was taken.
    pub age_ms: u64,
    /// Dumps that failed since the last one that succeeded.
    pub failures: u64,
}

/// A transparent checkpoint just taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransparentCheckpoint {
    /// The service.
    pub service: String,
    /// The process dumped.
    pub pid: u32,
    /// Image sequence (the ID `rollback` takes).
    pub seq: u64,
    /// The image it is an increment against; none for a full image.
    pub parent: Option<u64>,
    /// Pages of memory written to the image.
    pub pages: u64,
    /// Bytes of the image file.
    pub image_bytes: u64,
    /// How long the service was stopped, in microseconds.
    pub pause_us: u64,
    /// The whole dump, commit included, in microseconds.
    pub total_us: u64,
    /// Descriptors a restore cannot bring back by itself (pipes, sockets, ...).
    pub unrestorable: Vec<String>,
}

/// A rollback just done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransparentRollback {
    /// The service.
    pub service: String,
    /// The process rolled back.
    pub pid: u32,
    /// The image it now is.
    pub seq: u64,
    /// How long the service was stopped, in microseconds.
    pub pause_us: u64,
}

/// Counters of the application sockets (`FT_SOCKET`, `NOTIFY_SOCKET`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerCounters {
    /// Accepted messages.
    pub accepted: u64,
    /// Dropped: not a valid message.
    pub garbage: u64,
    /// Dropped: larger than the protocol allows.
    pub oversized: u64,
    /// Dropped: no kernel credentials, or the sender is not a process of a supervised service.
    pub rejected_sender: u64,
}

/// One event as ftctl shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Increasing number (per watchd run).
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The service, when the event is about one.
    pub service: Option<String>,
    /// What happened.
    pub kind: EventKind,
    /// Details.
    pub detail: String,
}
