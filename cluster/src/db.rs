//! The cluster database: its typed content (nodes, properties, groups with their failover
//! policy, resources validated by type, group ownership under fencing epochs), the
//! [`Update`]s that change it, its local redb store ([`ClusterDb`]) and its area on the quorum
//! disk (two checksummed copies of a [`DiskRecord`]).
//!
//! It validates every update against the content before it may be sequenced and applies each
//! one atomically; it never decides the order of updates (that is [`crate::gum`]), never trusts
//! a record or sector whose checksum or format does not check out, and never panics on a file.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::membership::{MAX_NODES, NodeId};
use crate::net::MAX_NAME_LEN;
use crate::quorum::{Disk, SECTOR_SIZE, SECTORS_PER_SLOT};

/// The longest property value.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// The largest encoded update: bigger ones are refused before they are sequenced.
pub const MAX_UPDATE_BYTES: usize = 128 * 1024;
/// How large the updates of one batch may be together, encoded ([`Update::runs_for_batches`]):
/// half an update, leaving room for the batch's own framing.
pub const BATCH_BYTES: usize = MAX_UPDATE_BYTES / 2;
/// The largest encoded database: an update that would make it bigger is refused.
pub const MAX_SNAPSHOT_BYTES: usize = 768 * 1024;
/// The payload of one copy of the database on the quorum disk: room for the largest snapshot
/// plus the largest pending update.
pub const DISK_PAYLOAD_MAX: usize = 1024 * 1024;
/// The first sector of the database area on the quorum disk: after the lease slots of the
/// most nodes a cluster may have, so adding a node never moves it.
pub const DB_AREA_FIRST_SECTOR: u64 = MAX_NODES as u64 * SECTORS_PER_SLOT;
/// Sectors of one copy: a header sector and the payload sectors.
pub const DB_COPY_SECTORS: u64 = 1 + DISK_PAYLOAD_MAX.div_ceil(SECTOR_SIZE) as u64;
/// The sectors a quorum disk needs for the lease slots and both copies of the database.
pub const DB_AREA_END: u64 = DB_AREA_FIRST_SECTOR + 2 * DB_COPY_SECTORS;

/// The version of the redb layout.
const STORE_FORMAT: u32 = 1;
const DISK_MAGIC: [u8; 4] = *b"FTDB";
const DISK_FORMAT: u16 = 1;
/// Where the header's CRC32C sits (it covers every byte before it).
const HEADER_CRC_OFFSET: usize = SECTOR_SIZE - 4;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("cluster_meta");
const PROPERTIES: TableDefinition<&str, &str> = TableDefinition::new("cluster_properties");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("cluster_nodes");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("cluster_groups");
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("cluster_resources");
/// Added with ownership: a store without it (an older one) gains it, empty, on open.
const OWNERSHIP: TableDefinition<&str, &[u8]> = TableDefinition::new("cluster_ownership");
const OUR_TABLES: [&str; 6] = [
    "cluster_meta",
    "cluster_properties",
    "cluster_nodes",
    "cluster_groups",
    "cluster_resources",
    "cluster_ownership",
];
const KEY_FORMAT: &str = "format";
const KEY_SEQ: &str = "seq";
const KEY_EPOCH: &str = "epoch";
const KEY_GUM: &str = "gum";

/// Default of [`Group::failover_threshold`].
pub const DEFAULT_FAILOVER_THRESHOLD: u32 = 3;
/// Default of [`Group::failover_period_ms`]: one hour.
pub const DEFAULT_FAILOVER_PERIOD_MS: u64 = 60 * 60 * 1000;
/// The largest [`Group::failover_threshold`]: it bounds the failover history an ownership keeps.
pub const MAX_FAILOVER_THRESHOLD: u32 = 1000;
/// The longest [`Group::failover_period_ms`]: thirty days.
pub const MAX_FAILOVER_PERIOD_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// Minutes in a UTC day: failback windows are minutes of the day, below this.
pub const MINUTES_PER_DAY: u16 = 24 * 60;
/// Default of [`Resource::online_timeout_ms`].
pub const DEFAULT_ONLINE_TIMEOUT_MS: u64 = 60_000;
/// Default of [`Resource::offline_timeout_ms`].
pub const DEFAULT_OFFLINE_TIMEOUT_MS: u64 = 30_000;
/// Default of [`Resource::looks_alive_ms`] (the cheap check's interval).
pub const DEFAULT_LOOKS_ALIVE_MS: u64 = 5_000;
/// Default of [`Resource::is_alive_ms`] (the thorough check's interval).
pub const DEFAULT_IS_ALIVE_MS: u64 = 60_000;
/// The longest resource timeout or interval: one day (it keeps deadline arithmetic far from
/// overflow).
pub const MAX_RESOURCE_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// The longest [`Ownership::reason`] an update may carry.
pub const MAX_REASON_LEN: usize = 1024;
/// The longest network interface name Linux accepts (`IFNAMSIZ` minus the NUL).
const MAX_IFNAME_LEN: usize = 15;

/// When a group returns to a more preferred owner that is back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failback {
    /// It stays where it is.
    #[default]
    Never,
    /// At once.
    Immediate,
    /// Only while the UTC time of day is in `[start_min, end_min)`; the window wraps past
    /// midnight when `end_min < start_min`.
    Window {
        /// First minute of the UTC day inside the window (0..1440).
        start_min: u16,
        /// First minute of the UTC day after the window (0..1440, not `start_min`).
        end_min: u16,
    },
}

impl Failback {
    /// Whether a failback may start at `now_unix_ms`.
    pub fn allows(&self, now_unix_ms: u64) -> bool {
        match *self {
            Failback::Never => false,
            Failback::Immediate => true,
            Failback::Window { start_min, end_min } => {
                let minute = (now_unix_ms / 60_000) % u64::from(MINUTES_PER_DAY);
                let (start, end) = (u64::from(start_min), u64::from(end_min));
                match start.cmp(&end) {
                    std::cmp::Ordering::Less => start <= minute && minute < end,
                    std::cmp::Ordering::Greater => minute >= start || minute < end,
                    // Refused by validation: an empty window never opens.
                    std::cmp::Ordering::Equal => false,
                }
            }
        }
    }
}

impl std::fmt::Display for Failback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failback::Never => f.write_str("never"),
            Failback::Immediate => f.write_str("immediate"),
            Failback::Window { start_min, end_min } => write!(
                f,
                "window {:02}:{:02}-{:02}:{:02} UTC",
                start_min / 60,
                start_min % 60,
                end_min / 60,
                end_min % 60
            ),
        }
    }
}

/// What operators want of a group (`ftctl group online|offline`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    /// Running on some node.
    #[default]
    Online,
    /// Running nowhere.
    Offline,
}

impl std::fmt::Display for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Desired::Online => "online",
            Desired::Offline => "offline",
        })
    }
}

/// Where a group stands on its owner.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum GroupState {
    /// Running nowhere.
    #[default]
    Offline,
    /// Its owner brings its resources online.
    Onlining,
    /// Running on its owner.
    Online,
    /// Its owner takes its resources offline.
    Offlining,
    /// It failed (on its owner, or the cluster gave up on it); its resources are offline.
    Failed,
}

impl std::fmt::Display for GroupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GroupState::Offline => "offline",
            GroupState::Onlining => "onlining",
            GroupState::Online => "online",
            GroupState::Offlining => "offlining",
            GroupState::Failed => "failed",
        })
    }
}

/// Who owns a group, under which fencing epoch, and how far it got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// The node that runs (or last ran) the group.
    pub owner: Option<NodeId>,
    /// The fencing token: one more with every [`Update::AssignGroup`]; handed to the group's
    /// resources, so replication and checkpoint shipping refuse a stale owner.
    pub epoch: u64,
    /// Where the group stands on its owner.
    pub state: GroupState,
    /// Where a graceful move (operator move, failback, drain) goes once the owner reports the
    /// group offline.
    pub moving_to: Option<NodeId>,
    /// Unix milliseconds of recent failovers, oldest first, pruned to the group's period.
    pub failovers: Vec<u64>,
    /// Why the last transition happened.
    pub reason: String,
}

impl Ownership {
    /// How many recorded failovers fall within `period_ms` before `now_unix_ms` (later ones,
    /// from a proposer whose clock runs ahead, count too).
    pub fn failovers_within(&self, period_ms: u64, now_unix_ms: u64) -> usize {
        self.failovers
            .iter()
            .filter(|t| recent(**t, period_ms, now_unix_ms))
            .count()
    }
}

/// Whether a failover at `t` still counts at `now` for a period of `period_ms`.
fn recent(t: u64, period_ms: u64, now: u64) -> bool {
    t.saturating_add(period_ms) > now
}

/// The resource types, and the properties each requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// A watchd-supervised program: property `service` (the watchd service name).
    Service,
    /// A replicated directory: property `fileset` (the fileset's name).
    Fileset,
    /// A service's checkpoint store, shipped to the other possible owners: properties `service`
    /// (whose checkpoint directory) and `fileset` (the copy-mode fileset over that directory
    /// that carries the images), the same the resource agent reads.
    Checkpoint,
    /// A virtual address: properties `address` (CIDR, e.g. `10.0.0.5/24`) and `interface`.
    Ip,
    /// A custom type: property `agent` (the absolute path of an executable).
    Exec,
}

impl ResourceKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Service,
        ResourceKind::Fileset,
        ResourceKind::Checkpoint,
        ResourceKind::Ip,
        ResourceKind::Exec,
    ];

    /// The kind named `name` (as stored in [`Resource::kind`]).
    pub fn from_name(name: &str) -> Option<ResourceKind> {
        ResourceKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Its name as stored in [`Resource::kind`].
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Service => "service",
            ResourceKind::Fileset => "fileset",
            ResourceKind::Checkpoint => "checkpoint",
            ResourceKind::Ip => "ip",
            ResourceKind::Exec => "exec",
        }
    }

    /// The properties a resource of this kind must have.
    pub fn required_properties(self) -> &'static [&'static str] {
        match self {
            ResourceKind::Service => &["service"],
            ResourceKind::Checkpoint => &["service", "fileset"],
            ResourceKind::Fileset => &["fileset"],
            ResourceKind::Ip => &["address", "interface"],
            ResourceKind::Exec => &["agent"],
        }
    }

    /// Checks the kind's properties in `props` (others are left to the resource agent).
    fn check(self, props: &BTreeMap<String, String>) -> Result<(), String> {
        for key in self.required_properties() {
            let Some(v) = props.get(*key) else {
                return Err(format!("a {} resource needs property {key:?}", self.name()));
            };
            if let Some(why) = property_problem(key, v) {
                return Err(format!("property {key:?} = {v:?}: {why}"));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with the value `v` of a required property `key`, if anything.
fn property_problem(key: &str, v: &str) -> Option<&'static str> {
    match key {
        "service" | "fileset" => name_ok(key, v)
            .err()
            .map(|_| "1 to 255 bytes without control characters"),
        "address" => cidr_ok(v).err(),
        "interface" => (v.is_empty()
            || v.len() > MAX_IFNAME_LEN
            || v == "."
            || v == ".."
            || v.chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()))
        .then_some("not a network interface name"),
        "agent" => (!v.starts_with('/') || v.chars().any(char::is_control))
            .then_some("not an absolute path"),
        _ => None,
    }
}

/// An address with its prefix length, IPv4 or IPv6.
fn cidr_ok(v: &str) -> Result<(), &'static str> {
    let Some((addr, len)) = v.split_once('/') else {
        return Err("not ADDRESS/PREFIX");
    };
    let max = match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return Err("not an IP address"),
    };
    match len.parse::<u8>() {
        Ok(l) if l <= max && !len.starts_with('+') => Ok(()),
        _ => Err("prefix length out of range"),
    }
}

/// A group: the unit of failover, and its policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Its unique name.
    pub name: String,
    /// The nodes it prefers, best first (cascading: `[a, b, c]`; N+1: `[own, spare]`).
    pub preferred_owners: Vec<NodeId>,
    /// Free-form settings.
    pub properties: BTreeMap<String, String>,
    /// After the preferred owners, any other member known to the database ([`Update::AddNode`])
    /// may own it, in name order.
    #[serde(default)]
    pub any_owner: bool,
    /// More failovers than this within [`Group::failover_period_ms`] leave it failed, offline.
    #[serde(default = "default_failover_threshold")]
    pub failover_threshold: u32,
    /// The period the threshold counts failovers over.
    #[serde(default = "default_failover_period_ms")]
    pub failover_period_ms: u64,
    /// Whether it returns to a more preferred owner that is back.
    #[serde(default)]
    pub failback: Failback,
    /// What operators want.
    #[serde(default)]
    pub desired: Desired,
}

fn default_failover_threshold() -> u32 {
    DEFAULT_FAILOVER_THRESHOLD
}

fn default_failover_period_ms() -> u64 {
    DEFAULT_FAILOVER_PERIOD_MS
}

impl Default for Group {
    /// A group without a name (fill it in) and the default policy.
    fn default() -> Group {
        Group {
            name: String::new(),
            preferred_owners: Vec::new(),
            properties: BTreeMap::new(),
            any_owner: false,
            failover_threshold: DEFAULT_FAILOVER_THRESHOLD,
            failover_period_ms: DEFAULT_FAILOVER_PERIOD_MS,
            failback: Failback::Never,
            desired: Desired::Online,
        }
    }
}

impl Group {
    /// The rank of `node` among the preferred owners (0 is the best); `None` when it is not
    /// one of them.
    pub fn preference(&self, node: &str) -> Option<usize> {
        self.preferred_owners.iter().position(|n| n == node)
    }
}

/// A resource inside a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Its unique name (across groups).
    pub name: String,
    /// The group it belongs to.
    pub group: String,
    /// Its type: a [`ResourceKind`] name (`service`, `fileset`, `checkpoint`, `ip`, `exec`).
    pub kind: String,
    /// Resources of the same group that must be online before it.
    pub depends_on: Vec<String>,
    /// Its settings: the kind's required ones ([`ResourceKind::required_properties`]) and any
    /// the resource agent understands.
    pub properties: BTreeMap<String, String>,
    /// How long bringing it online may take.
    #[serde(default = "default_online_timeout_ms")]
    pub online_timeout_ms: u64,
    /// How long taking it offline may take.
    #[serde(default = "default_offline_timeout_ms")]
    pub offline_timeout_ms: u64,
    /// The interval of the cheap check.
    #[serde(default = "default_looks_alive_ms")]
    pub looks_alive_ms: u64,
    /// The interval of the thorough check.
    #[serde(default = "default_is_alive_ms")]
    pub is_alive_ms: u64,
}

fn default_online_timeout_ms() -> u64 {
    DEFAULT_ONLINE_TIMEOUT_MS
}

fn default_offline_timeout_ms() -> u64 {
    DEFAULT_OFFLINE_TIMEOUT_MS
}

fn default_looks_alive_ms() -> u64 {
    DEFAULT_LOOKS_ALIVE_MS
}

fn default_is_alive_ms() -> u64 {
    DEFAULT_IS_ALIVE_MS
}

impl Default for Resource {
    /// A resource without name, group or kind (fill them in) and the default timeouts.
    fn default() -> Resource {
        Resource {
            name: String::new(),
            group: String::new(),
            kind: String::new(),
            depends_on: Vec::new(),
            properties: BTreeMap::new(),
            online_timeout_ms: DEFAULT_ONLINE_TIMEOUT_MS,
            offline_timeout_ms: DEFAULT_OFFLINE_TIMEOUT_MS,
            looks_alive_ms: DEFAULT_LOOKS_ALIVE_MS,
            is_alive_ms: DEFAULT_IS_ALIVE_MS,
        }
    }
}

impl Resource {
    /// Its kind, when it is one this version knows (validation refuses others).
    pub fn resource_kind(&self) -> Option<ResourceKind> {
        ResourceKind::from_name(&self.kind)
    }
}

/// Everything the cluster database holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbContent {
    /// Nodes and their properties.
    pub nodes: BTreeMap<NodeId, BTreeMap<String, String>>,
    /// Cluster-wide properties.
    pub properties: BTreeMap<String, String>,
    /// Groups by name.
    pub groups: BTreeMap<String, Group>,
    /// Resources by name.
    pub resources: BTreeMap<String, Resource>,
    /// Ownership by group name (a group without a record, from a database older than
    /// ownership, is offline at epoch 0: see [`DbContent::ownership_of`]).
    #[serde(default)]
    pub ownership: BTreeMap<String, Ownership>,
}

/// A change of the cluster database, sequenced by the global update manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Update {
    /// Sets a cluster property.
    SetProperty {
        /// The property.
        key: String,
        /// Its value.
        value: String,
    },
    /// Deletes a cluster property (it must exist).
    DeleteProperty {
        /// The property.
        key: String,
    },
    /// Adds a node (it must not exist).
    AddNode {
        /// The node.
        node: NodeId,
    },
    /// Removes a node (no group may prefer it).
    RemoveNode {
        /// The node.
        node: NodeId,
    },
    /// Sets a property of a node (the node must exist).
    SetNodeProperty {
        /// The node.
        node: NodeId,
        /// The property.
        key: String,
        /// Its value.
        value: String,
    },
    /// Deletes a property of a node (it must exist).
    DeleteNodeProperty {
        /// The node.
        node: NodeId,
        /// The property.
        key: String,
    },
    /// Adds a group (its name must be new).
    AddGroup(Group),
    /// Removes a group (it must exist and hold no resource).
    RemoveGroup {
        /// The group.
        name: String,
    },
    /// Replaces a group (it must exist).
    SetGroup(Group),
    /// Adds a resource (new name, existing group, dependencies in the same group).
    AddResource(Resource),
    /// Removes a resource (nothing may depend on it).
    RemoveResource {
        /// The resource.
        name: String,
    },
    /// Replaces a resource (it must exist; it must not move to another group while something
    /// depends on it; its dependencies must form no cycle).
    SetResource(Resource),
    /// Hands a group to a new owner (compare-and-set: `epoch` must be the current one plus
    /// one, so of racing proposers one wins). With an owner the group becomes
    /// [`GroupState::Onlining`]; without one it becomes [`GroupState::Failed`] when `failover`
    /// (the cluster gives up on it) and [`GroupState::Offline`] otherwise. A `failover` is
    /// recorded at `at_ms`, and the history is pruned to the group's period at `at_ms`.
    AssignGroup {
        /// The group.
        group: String,
        /// The new epoch: the current one plus one.
        epoch: u64,
        /// The new owner: a node of the database or a preferred owner of the group.
        owner: Option<NodeId>,
        /// The proposer's clock (unix ms): when the failover happened.
        at_ms: u64,
        /// Why.
        reason: String,
        /// Whether this counts as a failover (the owner was lost or failed the group).
        failover: bool,
    },
    /// The owner reports how far it got (compare-and-set: `epoch` must be the current one):
    /// onlining to online or failed, online to failed, offlining to offline or failed.
    ReportGroup {
        /// The group.
        group: String,
        /// The owner's epoch: the current one.
        epoch: u64,
        /// The state reached.
        state: GroupState,
    },
    /// Asks the owner to take an onlining or online group offline gracefully (it becomes
    /// [`GroupState::Offlining`]), then to hand it to `to` (compare-and-set on `epoch`).
    ReleaseGroup {
        /// The group.
        group: String,
        /// The owner's epoch: the current one.
        epoch: u64,
        /// Where it goes next (a node of the database or a preferred owner, not the owner);
        /// none: it stays offline.
        to: Option<NodeId>,
        /// Why.
        reason: String,
    },
    /// Sets what operators want of a group. On a failed group it also clears the failover
    /// history (the operator's retry), and a failed group without owner becomes offline.
    SetGroupDesired {
        /// The group.
        group: String,
        /// What they want.
        desired: Desired,
    },
    /// Several updates applied in order as one: all of them or none, under one sequence number
    /// (one global update round for what one policy run decided). It must not be empty and
    /// must not hold another batch.
    Batch {
        /// The updates, in order.
        updates: Vec<Update>,
    },
}

/// Why an update is refused (the caller's request failed; nothing was sequenced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "error")]
pub enum UpdateError {
    /// A name or key is empty, too long or holds control characters.
    #[error("invalid {what} {name:?}: 1 to 255 bytes without control characters")]
    InvalidName {
        /// What it names.
        what: String,
        /// The name.
        name: String,
    },
    /// A value is too long.
    #[error("value of {key:?} is {len} bytes; at most {max} are allowed")]
    ValueTooLong {
        /// The property.
        key: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The thing to change does not exist.
    #[error("no {what} named {name:?}")]
    NotFound {
        /// node, property, group or resource.
        what: String,
        /// The name.
        name: String,
    },
    /// The thing to add exists already.
    #[error("a {what} named {name:?} exists already")]
    Exists {
        /// node, group or resource.
        what: String,
        /// The name.
        name: String,
    },
    /// The thing to remove is still used.
    #[error("{what} {name:?} is still used by {by}")]
    InUse {
        /// node, group or resource.
        what: String,
        /// The name.
        name: String,
        /// Who uses it.
        by: String,
    },
    /// A dependency is not a resource of the same group, or the dependencies form a cycle.
    #[error("resource {resource:?}: {why}")]
    BadDependency {
        /// The resource.
        resource: String,
        /// Why.
        why: String,
    },
    /// A resource type this version does not know.
    #[error(
        "resource {resource:?}: unknown type {kind:?} (known: service, fileset, checkpoint, ip, exec)"
    )]
    UnknownKind {
        /// The resource.
        resource: String,
        /// Its type.
        kind: String,
    },
    /// A resource's properties or timeouts do not fit its type.
    #[error("resource {resource:?}: {why}")]
    BadResource {
        /// The resource.
        resource: String,
        /// Why.
        why: String,
    },
    /// A group's policy is out of range.
    #[error("group {group:?}: {why}")]
    BadPolicy {
        /// The group.
        group: String,
        /// Why.
        why: String,
    },
    /// A compare-and-set on a group's epoch lost (another update changed the ownership first).
    #[error("group {group:?}: epoch {got} given, {expected} expected")]
    StaleEpoch {
        /// The group.
        group: String,
        /// The epoch the update had to carry.
        expected: u64,
        /// The epoch it carried.
        got: u64,
    },
    /// A group's state does not allow the change.
    #[error("group {group:?} is {state}: {why}")]
    BadState {
        /// The group.
        group: String,
        /// Its state.
        state: GroupState,
        /// Why the change does not fit it.
        why: String,
    },
    /// A batch is empty or nested.
    #[error("batch of updates: {why}")]
    BadBatch {
        /// What is wrong with it.
        why: String,
    },
    /// An update of a batch is refused (so is the whole batch).
    #[error("update {index} of the batch: {source}")]
    InBatch {
        /// Its position in the batch, from 0.
        index: usize,
        /// Why it is refused.
        source: Box<UpdateError>,
    },
    /// The update or the database it would produce is too large.
    #[error("{what} would be {size} bytes; at most {max} are allowed")]
    TooLarge {
        /// update or database.
        what: String,
        /// The encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// Errors of the local store or the disk area (this node's storage is broken or foreign).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// redb failed.
    #[error("cluster database {path}: {source}")]
    Store {
        /// The file.
        path: PathBuf,
        /// The redb error.
        #[source]
        source: Box<redb::Error>,
    },
    /// The file holds something that is not (this version of) a cluster database.
    #[error("cluster database {path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An update was applied out of order.
    #[error("cluster database {path}: update {got} applied at sequence {have}")]
    OutOfOrder {
        /// The file.
        path: PathBuf,
        /// The sequence number of the update.
        got: u64,
        /// The sequence number of the stored content.
        have: u64,
    },
    /// An update that the leader validated failed here: this node's content differs.
    #[error("cluster database {path}: update {seq} does not apply: {source}")]
    Diverged {
        /// The file.
        path: PathBuf,
        /// The update's sequence number.
        seq: u64,
        /// Why.
        #[source]
        source: UpdateError,
    },
    /// Encoding failed (a value the encoder cannot represent).
    #[error("cannot encode {what}: {why}")]
    Encode {
        /// What.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// The quorum disk's database area could not be read or written.
    #[error("quorum disk database area: {0}")]
    DiskIo(#[source] io::Error),
    /// The record is too large for the disk area.
    #[error("the database record is {size} bytes; the quorum disk holds at most {max}")]
    DiskTooLarge {
        /// The encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

fn name_ok(what: &str, name: &str) -> Result<(), UpdateError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(UpdateError::InvalidName {
            what: what.into(),
            name: name.chars().take(MAX_NAME_LEN).collect(),
        });
    }
    Ok(())
}

fn value_ok(key: &str, value: &str) -> Result<(), UpdateError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(UpdateError::ValueTooLong {
            key: key.into(),
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

fn properties_ok(props: &BTreeMap<String, String>) -> Result<(), UpdateError> {
    for (k, v) in props {
        name_ok("property", k)?;
        value_ok(k, v)?;
    }
    Ok(())
}

fn not_found(what: &str, name: &str) -> UpdateError {
    UpdateError::NotFound {
        what: what.into(),
        name: name.into(),
    }
}

fn exists(what: &str, name: &str) -> UpdateError {
    UpdateError::Exists {
        what: what.into(),
        name: name.into(),
    }
}

fn reason_ok(reason: &str) -> Result<(), UpdateError> {
    if reason.len() > MAX_REASON_LEN {
        return Err(UpdateError::ValueTooLong {
            key: "reason".into(),
            len: reason.len(),
            max: MAX_REASON_LEN,
        });
    }
    Ok(())
}

/// The compare-and-set of the group updates.
fn epoch_is(group: &str, expected: u64, got: u64) -> Result<(), UpdateError> {
    if got == expected {
        Ok(())
    } else {
        Err(UpdateError::StaleEpoch {
            group: group.into(),
            expected,
            got,
        })
    }
}

fn bad_dep(resource: &str, why: impl Into<String>) -> UpdateError {
    UpdateError::BadDependency {
        resource: resource.into(),
        why: why.into(),
    }
}

impl DbContent {
    /// Checks `update` against this content without changing anything.
    pub fn validate(&self, update: &Update) -> Result<(), UpdateError> {
        match update {
            Update::SetProperty { key, value } => {
                name_ok("property", key)?;
                value_ok(key, value)
            }
            Update::DeleteProperty { key } => {
                if self.properties.contains_key(key) {
                    Ok(())
                } else {
                    Err(not_found("property", key))
                }
            }
            Update::AddNode { node } => {
                name_ok("node", node)?;
                if self.nodes.contains_key(node) {
                    return Err(exists("node", node));
                }
                if self.nodes.len() >= MAX_NODES {
                    return Err(UpdateError::TooLarge {
                        what: "the node list".into(),
                        size: self.nodes.len() + 1,
                        max: MAX_NODES,
                    });
                }
                Ok(())
            }
            Update::RemoveNode { node } => {
                if !self.nodes.contains_key(node) {
                    return Err(not_found("node", node));
                }
                if let Some(g) = self
                    .groups
                    .values()
                    .find(|g| g.preferred_owners.contains(node))
                {
                    return Err(UpdateError::InUse {
                        what: "node".into(),
                        name: node.clone(),
                        by: format!("group {:?}", g.name),
                    });
                }
                // A node that may run a group, or that a move heads for, stays until the
                // group is settled elsewhere.
                match self.ownership.iter().find(|(_, o)| {
                    o.moving_to.as_ref() == Some(node)
                        || (o.owner.as_ref() == Some(node)
                            && matches!(
                                o.state,
                                GroupState::Onlining | GroupState::Online | GroupState::Offlining
                            ))
                }) {
                    Some((g, _)) => Err(UpdateError::InUse {
                        what: "node".into(),
                        name: node.clone(),
                        by: format!("the ownership of group {g:?}"),
                    }),
                    None => Ok(()),
                }
            }
            Update::SetNodeProperty { node, key, value } => {
                if !self.nodes.contains_key(node) {
                    return Err(not_found("node", node));
                }
                name_ok("property", key)?;
                value_ok(key, value)
            }
            Update::DeleteNodeProperty { node, key } => {
                let props = self
                    .nodes
                    .get(node)
                    .ok_or_else(|| not_found("node", node))?;
                if props.contains_key(key) {
                    Ok(())
                } else {
                    Err(not_found("node property", key))
                }
            }
            Update::AddGroup(g) => {
                self.group_ok(g)?;
                if self.groups.contains_key(&g.name) {
                    return Err(exists("group", &g.name));
                }
                Ok(())
            }
            Update::RemoveGroup { name } => {
                if !self.groups.contains_key(name) {
                    return Err(not_found("group", name));
                }
                if let Some(r) = self.resources.values().find(|r| r.group == *name) {
                    return Err(UpdateError::InUse {
                        what: "group".into(),
                        name: name.clone(),
                        by: format!("resource {:?}", r.name),
                    });
                }
                let state = self.ownership_of(name).state;
                if matches!(state, GroupState::Offline | GroupState::Failed) {
                    Ok(())
                } else {
                    Err(UpdateError::BadState {
                        group: name.clone(),
                        state,
                        why: "only an offline or failed group may be removed".into(),
                    })
                }
            }
            Update::SetGroup(g) => {
                self.group_ok(g)?;
                if !self.groups.contains_key(&g.name) {
                    return Err(not_found("group", &g.name));
                }
                Ok(())
            }
            Update::AddResource(r) => {
                if self.resources.contains_key(&r.name) {
                    name_ok("resource", &r.name)?;
                    return Err(exists("resource", &r.name));
                }
                self.resource_ok(r)
            }
            Update::RemoveResource { name } => {
                if !self.resources.contains_key(name) {
                    return Err(not_found("resource", name));
                }
                match self
                    .resources
                    .values()
                    .find(|r| r.depends_on.contains(name))
                {
                    Some(r) => Err(UpdateError::InUse {
                        what: "resource".into(),
                        name: name.clone(),
                        by: format!("resource {:?}", r.name),
                    }),
                    None => Ok(()),
                }
            }
            Update::SetResource(r) => {
                let Some(old) = self.resources.get(&r.name) else {
                    return Err(not_found("resource", &r.name));
                };
                if old.group != r.group
                    && let Some(d) = self
                        .resources
                        .values()
                        .find(|x| x.depends_on.contains(&r.name))
                {
                    return Err(UpdateError::InUse {
                        what: "resource".into(),
                        name: r.name.clone(),
                        by: format!("resource {:?} in group {:?}", d.name, d.group),
                    });
                }
                self.resource_ok(r)?;
                self.acyclic_with(r)
            }
            Update::AssignGroup {
                group,
                epoch,
                owner,
                at_ms: _,
                reason,
                failover: _,
            } => {
                let g = self.group(group)?;
                let own = self.ownership_of(group);
                let expected = own
                    .epoch
                    .checked_add(1)
                    .ok_or_else(|| UpdateError::BadState {
                        group: group.clone(),
                        state: own.state,
                        why: "its epoch cannot grow any more".into(),
                    })?;
                epoch_is(group, expected, *epoch)?;
                if let Some(n) = owner {
                    self.possible_owner(g, n)?;
                }
                reason_ok(reason)
            }
            Update::ReportGroup {
                group,
                epoch,
                state,
            } => {
                self.group(group)?;
                let own = self.ownership_of(group);
                epoch_is(group, own.epoch, *epoch)?;
                let bad = |why: &str| {
                    Err(UpdateError::BadState {
                        group: group.clone(),
                        state: own.state,
                        why: why.into(),
                    })
                };
                if own.owner.is_none() {
                    return bad("it has no owner to report");
                }
                match (own.state, *state) {
                    (GroupState::Onlining, GroupState::Online | GroupState::Failed)
                    | (GroupState::Online, GroupState::Failed)
                    | (GroupState::Offlining, GroupState::Offline | GroupState::Failed) => Ok(()),
                    (_, to) => bad(&format!("its owner cannot report it {to}")),
                }
            }
            Update::ReleaseGroup {
                group,
                epoch,
                to,
                reason,
            } => {
                let g = self.group(group)?;
                let own = self.ownership_of(group);
                epoch_is(group, own.epoch, *epoch)?;
                let bad = |why: String| {
                    Err(UpdateError::BadState {
                        group: group.clone(),
                        state: own.state,
                        why,
                    })
                };
                let Some(owner) = &own.owner else {
                    return bad("it has no owner to release it".into());
                };
                if !matches!(own.state, GroupState::Onlining | GroupState::Online) {
                    return bad("only an onlining or online group can be released".into());
                }
                if let Some(n) = to {
                    if n == owner {
                        return bad(format!("{n:?} owns it already"));
                    }
                    self.possible_owner(g, n)?;
                }
                reason_ok(reason)
            }
            Update::SetGroupDesired { group, desired: _ } => self.group(group).map(|_| ()),
            Update::Batch { updates } => self.after_batch(updates).map(|_| ()),
        }
    }

    /// This content after every update of a batch, in order; the first refusal refuses all.
    fn after_batch(&self, list: &[Update]) -> Result<DbContent, UpdateError> {
        if list.is_empty() {
            return Err(UpdateError::BadBatch {
                why: "it is empty".into(),
            });
        }
        let mut next = self.clone();
        for (index, u) in list.iter().enumerate() {
            if matches!(u, Update::Batch { .. }) {
                return Err(UpdateError::BadBatch {
                    why: format!("update {index} is a batch itself"),
                });
            }
            next.apply(u).map_err(|e| UpdateError::InBatch {
                index,
                source: Box::new(e),
            })?;
        }
        Ok(next)
    }

    /// The group named `name`.
    fn group(&self, name: &str) -> Result<&Group, UpdateError> {
        self.groups
            .get(name)
            .ok_or_else(|| not_found("group", name))
    }

    /// Whether `node` may own `g`: a node of the database or one of its preferred owners.
    fn possible_owner(&self, g: &Group, node: &str) -> Result<(), UpdateError> {
        name_ok("node", node)?;
        if self.nodes.contains_key(node) || g.preference(node).is_some() {
            Ok(())
        } else {
            Err(not_found("node", node))
        }
    }

    /// The ownership of group `name`: its record, or (a group from a database older than
    /// ownership) offline at epoch 0.
    pub fn ownership_of(&self, name: &str) -> Ownership {
        self.ownership.get(name).cloned().unwrap_or_default()
    }

    fn group_ok(&self, g: &Group) -> Result<(), UpdateError> {
        name_ok("group", &g.name)?;
        let mut seen = BTreeSet::new();
        for n in &g.preferred_owners {
            name_ok("node", n)?;
            if !seen.insert(n) {
                return Err(UpdateError::Exists {
                    what: format!("preferred owner of group {:?}", g.name),
                    name: n.clone(),
                });
            }
        }
        let bad = |why: String| {
            Err(UpdateError::BadPolicy {
                group: g.name.clone(),
                why,
            })
        };
        if g.failover_threshold > MAX_FAILOVER_THRESHOLD {
            return bad(format!(
                "failover threshold {} is above {MAX_FAILOVER_THRESHOLD}",
                g.failover_threshold
            ));
        }
        if g.failover_period_ms == 0 || g.failover_period_ms > MAX_FAILOVER_PERIOD_MS {
            return bad(format!(
                "failover period {} ms is outside 1..={MAX_FAILOVER_PERIOD_MS} ms",
                g.failover_period_ms
            ));
        }
        if let Failback::Window { start_min, end_min } = g.failback {
            if start_min >= MINUTES_PER_DAY || end_min >= MINUTES_PER_DAY {
                return bad(format!(
                    "failback window {start_min}..{end_min}: minutes of the day are below {MINUTES_PER_DAY}"
                ));
            }
            if start_min == end_min {
                return bad(format!(
                    "failback window {start_min}..{end_min} is empty (use never or immediate)"
                ));
            }
        }
        properties_ok(&g.properties)
    }

    /// Name, group and dependencies (existing resources of the same group, none twice, not
    /// itself).
    fn resource_ok(&self, r: &Resource) -> Result<(), UpdateError> {
        name_ok("resource", &r.name)?;
        name_ok("resource type", &r.kind)?;
        if !self.groups.contains_key(&r.group) {
            return Err(not_found("group", &r.group));
        }
        properties_ok(&r.properties)?;
        let bad = |why: String| {
            Err(UpdateError::BadResource {
                resource: r.name.clone(),
                why,
            })
        };
        let Some(kind) = r.resource_kind() else {
            return Err(UpdateError::UnknownKind {
                resource: r.name.clone(),
                kind: r.kind.clone(),
            });
        };
        if let Err(why) = kind.check(&r.properties) {
            return bad(why);
        }
        for (what, ms) in [
            ("online timeout", r.online_timeout_ms),
            ("offline timeout", r.offline_timeout_ms),
            ("looks-alive interval", r.looks_alive_ms),
            ("is-alive interval", r.is_alive_ms),
        ] {
            if ms == 0 || ms > MAX_RESOURCE_TIMEOUT_MS {
                return bad(format!(
                    "{what} {ms} ms is outside 1..={MAX_RESOURCE_TIMEOUT_MS} ms"
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for d in &r.depends_on {
            if *d == r.name {
                return Err(bad_dep(&r.name, "depends on itself"));
            }
            if !seen.insert(d) {
                return Err(bad_dep(&r.name, format!("lists {d:?} twice")));
            }
            match self.resources.get(d) {
                None => return Err(bad_dep(&r.name, format!("depends on unknown {d:?}"))),
                Some(x) if x.group != r.group => {
                    return Err(bad_dep(
                        &r.name,
                        format!("depends on {d:?} of another group {:?}", x.group),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Whether the dependencies stay acyclic once `r` replaces its namesake.
    fn acyclic_with(&self, r: &Resource) -> Result<(), UpdateError> {
        let deps = |n: &str| -> Vec<String> {
            if n == r.name {
                r.depends_on.clone()
            } else {
                self.resources
                    .get(n)
                    .map(|x| x.depends_on.clone())
                    .unwrap_or_default()
            }
        };
        // A cycle through `r` is the only one the replacement can create.
        let mut stack: Vec<String> = deps(&r.name);
        let mut visited = BTreeSet::new();
        while let Some(n) = stack.pop() {
            if n == r.name {
                return Err(bad_dep(&r.name, "the dependencies form a cycle"));
            }
            if visited.insert(n.clone()) {
                stack.extend(deps(&n));
            }
        }
        Ok(())
    }

    /// Applies `update` after validating it; on error nothing changed.
    pub fn apply(&mut self, update: &Update) -> Result<(), UpdateError> {
        if let Update::Batch { updates } = update {
            *self = self.after_batch(updates)?;
            return Ok(());
        }
        self.validate(update)?;
        match update.clone() {
            Update::SetProperty { key, value } => {
                self.properties.insert(key, value);
            }
            Update::DeleteProperty { key } => {
                self.properties.remove(&key);
            }
            Update::AddNode { node } => {
                self.nodes.insert(node, BTreeMap::new());
            }
            Update::RemoveNode { node } => {
                self.nodes.remove(&node);
            }
            Update::SetNodeProperty { node, key, value } => {
                if let Some(p) = self.nodes.get_mut(&node) {
                    p.insert(key, value);
                }
            }
            Update::DeleteNodeProperty { node, key } => {
                if let Some(p) = self.nodes.get_mut(&node) {
                    p.remove(&key);
                }
            }
            Update::AddGroup(g) => {
                // A group added again under an old name goes on from the epoch it had: an
                // epoch starting over at 0 would be refused as stale by the replicas its
                // earlier owners wrote to (and could let a stale owner's writes in).
                let epoch = self.ownership.get(&g.name).map_or(0, |o| o.epoch);
                self.ownership.insert(
                    g.name.clone(),
                    Ownership {
                        epoch,
                        ..Ownership::default()
                    },
                );
                self.groups.insert(g.name.clone(), g);
            }
            Update::SetGroup(g) => {
                self.groups.insert(g.name.clone(), g);
            }
            Update::RemoveGroup { name } => {
                self.groups.remove(&name);
                // A record that ever had an owner stays, owner-less, to keep the name's
                // epoch (see AddGroup).
                match self.ownership.get_mut(&name) {
                    Some(own) if own.epoch > 0 => {
                        *own = Ownership {
                            epoch: own.epoch,
                            reason: "group removed".into(),
                            ..Ownership::default()
                        };
                    }
                    _ => {
                        self.ownership.remove(&name);
                    }
                }
            }
            Update::AddResource(r) | Update::SetResource(r) => {
                self.resources.insert(r.name.clone(), r);
            }
            Update::RemoveResource { name } => {
                self.resources.remove(&name);
            }
            Update::AssignGroup {
                group,
                epoch,
                owner,
                at_ms,
                reason,
                failover,
            } => {
                let (threshold, period) = self
                    .groups
                    .get(&group)
                    .map_or((0, 0), |g| (g.failover_threshold, g.failover_period_ms));
                let own = self.ownership.entry(group).or_default();
                own.state = match (&owner, failover) {
                    (Some(_), _) => GroupState::Onlining,
                    (None, true) => GroupState::Failed,
                    (None, false) => GroupState::Offline,
                };
                own.owner = owner;
                own.epoch = epoch;
                own.moving_to = None;
                own.reason = reason;
                if failover {
                    own.failovers.push(at_ms);
                    own.failovers.sort_unstable();
                }
                own.failovers.retain(|t| recent(*t, period, at_ms));
                // More than threshold + 1 never changes a decision; the bound keeps the record
                // small.
                let keep = usize::try_from(threshold)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1);
                let excess = own.failovers.len().saturating_sub(keep);
                own.failovers.drain(..excess);
            }
            Update::ReportGroup {
                group,
                epoch: _,
                state,
            } => {
                let own = self.ownership.entry(group).or_default();
                own.reason = format!("{} reported {state}", own.owner.as_deref().unwrap_or("?"));
                own.state = state;
            }
            Update::ReleaseGroup {
                group,
                epoch: _,
                to,
                reason,
            } => {
                let own = self.ownership.entry(group).or_default();
                own.state = GroupState::Offlining;
                own.moving_to = to;
                own.reason = reason;
            }
            Update::SetGroupDesired { group, desired } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.desired = desired;
                }
                let own = self.ownership.entry(group).or_default();
                if own.state == GroupState::Failed {
                    own.failovers.clear();
                    if own.owner.is_none() {
                        own.state = GroupState::Offline;
                    }
                    own.reason = format!("operator: desired {desired}");
                }
                if desired == Desired::Offline {
                    own.moving_to = None;
                }
            }
            // Applied as a whole above, before any validation of a single update.
            Update::Batch { .. } => {}
        }
        Ok(())
    }
}

fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, DbError> {
    rmp_serde::to_vec(v).map_err(|e| DbError::Encode {
        what,
        why: e.to_string(),
    })
}

impl Update {
    /// The encoded size of the update.
    pub fn encoded_len(&self) -> Result<usize, DbError> {
        Ok(encode("update", self)?.len())
    }

    /// `updates` as one update: the update itself when it is alone, a batch otherwise (`None`
    /// when there is none).
    pub fn batch(mut updates: Vec<Update>) -> Option<Update> {
        match updates.len() {
            0 => None,
            1 => updates.pop(),
            _ => Some(Update::Batch { updates }),
        }
    }

    /// Splits `updates`, in order, into runs that fit one batch each: at most
    /// [`BATCH_BYTES`] encoded (an update larger than that alone forms a run of its own, which
    /// the sequencer refuses as too large, as it would without batching).
    pub fn runs_for_batches(updates: Vec<Update>) -> Vec<Vec<Update>> {
        let mut runs: Vec<Vec<Update>> = Vec::new();
        let mut size: usize = 0;
        for u in updates {
            let len = u.encoded_len().unwrap_or(usize::MAX);
            match runs.last_mut() {
                Some(run) if size.saturating_add(len) <= BATCH_BYTES => {
                    size += len;
                    run.push(u);
                }
                _ => {
                    size = len;
                    runs.push(vec![u]);
                }
            }
        }
        runs
    }
}

/// The database at one point of its history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbSnapshot {
    /// How many updates it reflects (0: the empty database).
    pub seq: u64,
    /// The membership epoch in which the update `seq` was committed.
    pub epoch: u64,
    /// The content.
    pub content: DbContent,
}

impl DbSnapshot {
    /// Applies `update` as the next one (`seq + 1`), committed in `epoch`; on error nothing
    /// changed.
    pub fn apply(&mut self, epoch: u64, update: &Update) -> Result<(), UpdateError> {
        self.content.apply(update)?;
        self.seq += 1;
        self.epoch = epoch;
        Ok(())
    }

    /// Checks that `update` may follow this snapshot: valid against the content, and neither
    /// the update nor the resulting database too large.
    pub fn check_next(&self, update: &Update) -> Result<(), UpdateError> {
        let size = update.encoded_len().map_err(|e| UpdateError::TooLarge {
            what: format!("update ({e})"),
            size: usize::MAX,
            max: MAX_UPDATE_BYTES,
        })?;
        if size > MAX_UPDATE_BYTES {
            return Err(UpdateError::TooLarge {
                what: "the update".into(),
                size,
                max: MAX_UPDATE_BYTES,
            });
        }
        let mut next = self.clone();
        next.apply(0, update)?;
        let size = next.encode().map_or(usize::MAX, |b| b.len());
        if size > MAX_SNAPSHOT_BYTES {
            return Err(UpdateError::TooLarge {
                what: "the cluster database".into(),
                size,
                max: MAX_SNAPSHOT_BYTES,
            });
        }
        Ok(())
    }

    /// The MessagePack encoding (deterministic: every map is ordered).
    pub fn encode(&self) -> Result<Vec<u8>, DbError> {
        encode("snapshot", self)
    }

    /// Decodes [`DbSnapshot::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<DbSnapshot, String> {
        rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
    }

    /// A digest of the sequence number and the content: equal snapshots have equal checksums.
    /// (The epoch is left out: the same history may be committed in different epochs.)
    pub fn checksum(&self) -> u64 {
        let mut h = Sha256::new();
        h.update(self.seq.to_le_bytes());
        match rmp_serde::to_vec(&self.content) {
            Ok(b) => h.update(&b),
            // Unreachable for string maps; still, never equal to a real encoding.
            Err(_) => h.update(b"unencodable"),
        }
        let d = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        u64::from_le_bytes(b)
    }
}

/// An update a node accepted (durably) but has not applied yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Its sequence number: the applied one plus one.
    pub seq: u64,
    /// The epoch of the view whose leader asked for the acceptance (the ballot).
    pub epoch: u64,
    /// The epoch of the view whose leader first sequenced it (identifies the proposal).
    pub origin: u64,
    /// The update.
    pub update: Update,
}

/// What the global update manager keeps durable beside the database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GumPersisted {
    /// The accepted but not yet applied update.
    pub pending: Option<Pending>,
}

/// What the quorum disk holds: the same state a member holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The applied database.
    pub committed: DbSnapshot,
    /// The accepted next update.
    pub pending: Option<Pending>,
    /// The epoch of the view in which it was written.
    pub written: u64,
}

impl DiskRecord {
    /// The order of records on the disk: the highest sequence number they reach, then the
    /// epoch they were written in, then the applied sequence number (a commit of the pending
    /// update is progress too).
    pub fn key(&self) -> (u64, u64, u64) {
        let seq = self.pending.as_ref().map_or(self.committed.seq, |p| p.seq);
        (seq, self.written, self.committed.seq)
    }
}

/// The cluster database of this node, in redb. Each change is one write transaction; changes
/// take `&mut self`, so one handle is the only writer (redb's file lock keeps other processes
/// out).
#[derive(Debug)]
pub struct ClusterDb {
    path: PathBuf,
    db: Database,
}

impl ClusterDb {
    /// Opens (or creates) the database at `path`, checking every page: a corrupt file or a redb
    /// file of something else is an error, never a panic.
    pub fn open(path: &Path) -> Result<ClusterDb, DbError> {
        let store = |e: redb::Error| DbError::Store {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| store(e.into()))?;
        let me = ClusterDb {
            path: path.to_path_buf(),
            db,
        };
        let txn = me.db.begin_write().map_err(|e| store(e.into()))?;
        let foreign: Vec<String> = txn
            .list_tables()
            .map_err(|e| store(e.into()))?
            .map(|t| t.name().to_owned())
            .filter(|n| !OUR_TABLES.contains(&n.as_str()))
            .collect();
        if !foreign.is_empty() {
            return Err(me.corrupt(format!(
                "not a cluster database (it holds tables {foreign:?})"
            )));
        }
        {
            let mut meta = txn.open_table(META).map_err(|e| store(e.into()))?;
            let format = meta
                .get(KEY_FORMAT)
                .map_err(|e| store(e.into()))?
                .map(|v| v.value().to_vec());
            match format {
                None => {
                    meta.insert(KEY_FORMAT, STORE_FORMAT.to_le_bytes().as_slice())
                        .map_err(|e| store(e.into()))?;
                }
                Some(v) if v == STORE_FORMAT.to_le_bytes() => {}
                Some(v) => {
                    return Err(me.corrupt(format!("unknown format {v:?}")));
                }
            }
            txn.open_table(PROPERTIES).map_err(|e| store(e.into()))?;
            txn.open_table(NODES).map_err(|e| store(e.into()))?;
            txn.open_table(GROUPS).map_err(|e| store(e.into()))?;
            txn.open_table(RESOURCES).map_err(|e| store(e.into()))?;
            txn.open_table(OWNERSHIP).map_err(|e| store(e.into()))?;
        }
        txn.commit().map_err(|e| store(e.into()))?;
        // Decode once so that a garbled record is reported at startup.
        me.snapshot()?;
        me.gum_persisted()?;
        Ok(me)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn store(&self, e: impl Into<redb::Error>) -> DbError {
        DbError::Store {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn corrupt(&self, why: impl Into<String>) -> DbError {
        DbError::Corrupt {
            path: self.path.clone(),
            why: why.into(),
        }
    }

    /// The stored database.
    pub fn snapshot(&self) -> Result<DbSnapshot, DbError> {
        let txn = self.db.begin_read().map_err(|e| self.store(e))?;
        let meta = txn.open_table(META).map_err(|e| self.store(e))?;
        let u64_of = |key: &str| -> Result<u64, DbError> {
            match meta.get(key).map_err(|e| self.store(e))? {
                None => Ok(0),
                Some(v) => {
                    let b: [u8; 8] = v
                        .value()
                        .try_into()
                        .map_err(|_| self.corrupt(format!("{key} is not 8 bytes")))?;
                    Ok(u64::from_le_bytes(b))
                }
            }
        };
        let seq = u64_of(KEY_SEQ)?;
        let epoch = u64_of(KEY_EPOCH)?;
        let mut content = DbContent::default();
        let props = txn.open_table(PROPERTIES).map_err(|e| self.store(e))?;
        for e in props.iter().map_err(|e| self.store(e))? {
            let (k, v) = e.map_err(|e| self.store(e))?;
            content
                .properties
                .insert(k.value().to_owned(), v.value().to_owned());
        }
        let nodes = txn.open_table(NODES).map_err(|e| self.store(e))?;
        for e in nodes.iter().map_err(|e| self.store(e))? {
            let (k, v) = e.map_err(|e| self.store(e))?;
            let props = rmp_serde::from_slice(v.value())
                .map_err(|e| self.corrupt(format!("node {:?}: {e}", k.value())))?;
            content.nodes.insert(k.value().to_owned(), props);
        }
        let groups = txn.open_table(GROUPS).map_err(|e| self.store(e))?;
        for e in groups.iter().map_err(|e| self.store(e))? {
            let (k, v) = e.map_err(|e| self.store(e))?;
            let g: Group = rmp_serde::from_slice(v.value())
                .map_err(|e| self.corrupt(format!("group {:?}: {e}", k.value())))?;
            content.groups.insert(k.value().to_owned(), g);
        }
        let resources = txn.open_table(RESOURCES).map_err(|e| self.store(e))?;
        for e in resources.iter().map_err(|e| self.store(e))? {
            let (k, v) = e.map_err(|e| self.store(e))?;
            let r: Resource = rmp_serde::from_slice(v.value())
                .map_err(|e| self.corrupt(format!("resource {:?}: {e}", k.value())))?;
            content.resources.insert(k.value().to_owned(), r);
        }
        let ownership = txn.open_table(OWNERSHIP).map_err(|e| self.store(e))?;
        for e in ownership.iter().map_err(|e| self.store(e))? {
            let (k, v) = e.map_err(|e| self.store(e))?;
            let o: Ownership = rmp_serde::from_slice(v.value())
                .map_err(|e| self.corrupt(format!("ownership of {:?}: {e}", k.value())))?;
            content.ownership.insert(k.value().to_owned(), o);
        }
        Ok(DbSnapshot {
            seq,
            epoch,
            content,
        })
    }

    /// What the global update manager persisted last.
    pub fn gum_persisted(&self) -> Result<GumPersisted, DbError> {
        let txn = self.db.begin_read().map_err(|e| self.store(e))?;
        let meta = txn.open_table(META).map_err(|e| self.store(e))?;
        match meta.get(KEY_GUM).map_err(|e| self.store(e))? {
            None => Ok(GumPersisted::default()),
            Some(v) => rmp_serde::from_slice(v.value())
                .map_err(|e| self.corrupt(format!("global update state: {e}"))),
        }
    }

    /// Stores `p` durably (one transaction).
    pub fn save_gum(&mut self, p: &GumPersisted) -> Result<(), DbError> {
        let bytes = encode("global update state", p)?;
        let txn = self.db.begin_write().map_err(|e| self.store(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.store(e))?;
            meta.insert(KEY_GUM, bytes.as_slice())
                .map_err(|e| self.store(e))?;
        }
        txn.commit().map_err(|e| self.store(e))
    }

    /// Applies update `seq` (committed in `epoch`) in one transaction, and drops a persisted
    /// pending update it makes obsolete. `seq` must follow the stored sequence number.
    pub fn apply(&mut self, seq: u64, epoch: u64, update: &Update) -> Result<DbSnapshot, DbError> {
        let mut snap = self.snapshot()?;
        if seq != snap.seq.wrapping_add(1) {
            return Err(DbError::OutOfOrder {
                path: self.path.clone(),
                got: seq,
                have: snap.seq,
            });
        }
        let before = snap.content.clone();
        snap.apply(epoch, update)
            .map_err(|source| DbError::Diverged {
                path: self.path.clone(),
                seq,
                source,
            })?;
        self.write(&before, &snap)?;
        Ok(snap)
    }

    /// Replaces the stored database by `snapshot` in one transaction (a state transfer), and
    /// drops a persisted pending update it makes obsolete.
    pub fn install(&mut self, snapshot: &DbSnapshot) -> Result<(), DbError> {
        let before = self.snapshot()?.content;
        self.write(&before, snapshot)
    }

    /// Writes the difference between `before` (what is stored) and `after` in one transaction.
    fn write(&self, before: &DbContent, after: &DbSnapshot) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(|e| self.store(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.store(e))?;
            meta.insert(KEY_SEQ, after.seq.to_le_bytes().as_slice())
                .map_err(|e| self.store(e))?;
            meta.insert(KEY_EPOCH, after.epoch.to_le_bytes().as_slice())
                .map_err(|e| self.store(e))?;
            let stale = match meta.get(KEY_GUM).map_err(|e| self.store(e))? {
                Some(v) => rmp_serde::from_slice::<GumPersisted>(v.value())
                    .ok()
                    .and_then(|g| g.pending)
                    .is_none_or(|p| p.seq <= after.seq),
                None => false,
            };
            if stale {
                let empty = encode("global update state", &GumPersisted::default())?;
                meta.insert(KEY_GUM, empty.as_slice())
                    .map_err(|e| self.store(e))?;
            }
            let mut props = txn.open_table(PROPERTIES).map_err(|e| self.store(e))?;
            for k in before.properties.keys() {
                if !after.content.properties.contains_key(k) {
                    props.remove(k.as_str()).map_err(|e| self.store(e))?;
                }
            }
            for (k, v) in &after.content.properties {
                if before.properties.get(k) != Some(v) {
                    props
                        .insert(k.as_str(), v.as_str())
                        .map_err(|e| self.store(e))?;
                }
            }
            let mut nodes = txn.open_table(NODES).map_err(|e| self.store(e))?;
            self.write_map(&mut nodes, "node", &before.nodes, &after.content.nodes)?;
            let mut groups = txn.open_table(GROUPS).map_err(|e| self.store(e))?;
            self.write_map(&mut groups, "group", &before.groups, &after.content.groups)?;
            let mut resources = txn.open_table(RESOURCES).map_err(|e| self.store(e))?;
            self.write_map(
                &mut resources,
                "resource",
                &before.resources,
                &after.content.resources,
            )?;
            let mut ownership = txn.open_table(OWNERSHIP).map_err(|e| self.store(e))?;
            self.write_map(
                &mut ownership,
                "ownership",
                &before.ownership,
                &after.content.ownership,
            )?;
        }
        txn.commit().map_err(|e| self.store(e))
    }

    fn write_map<V: Serialize + PartialEq>(
        &self,
        table: &mut redb::Table<&str, &[u8]>,
        what: &'static str,
        before: &BTreeMap<String, V>,
        after: &BTreeMap<String, V>,
    ) -> Result<(), DbError> {
        for k in before.keys() {
            if !after.contains_key(k) {
                table.remove(k.as_str()).map_err(|e| self.store(e))?;
            }
        }
        for (k, v) in after {
            if before.get(k) != Some(v) {
                let bytes = encode(what, v)?;
                table
                    .insert(k.as_str(), bytes.as_slice())
                    .map_err(|e| self.store(e))?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The database area of the quorum disk.
// ---------------------------------------------------------------------------------------------

/// One of the two copies of the database on the quorum disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DiskCopy {
    /// The first copy.
    A,
    /// The second copy.
    B,
}

impl DiskCopy {
    /// The copy's first (header) sector.
    pub fn first_sector(self) -> u64 {
        match self {
            DiskCopy::A => DB_AREA_FIRST_SECTOR,
            DiskCopy::B => DB_AREA_FIRST_SECTOR + DB_COPY_SECTORS,
        }
    }

    /// The other copy.
    pub fn other(self) -> DiskCopy {
        match self {
            DiskCopy::A => DiskCopy::B,
            DiskCopy::B => DiskCopy::A,
        }
    }

    fn code(self) -> u8 {
        match self {
            DiskCopy::A => 0,
            DiskCopy::B => 1,
        }
    }
}

/// A decoded copy header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskHeader {
    /// The highest sequence number the record reaches.
    pub seq: u64,
    /// The epoch it was written in.
    pub epoch: u64,
    /// The applied sequence number of the record.
    pub committed: u64,
    /// The payload's length in bytes.
    pub len: u32,
    /// The payload's CRC32C.
    pub crc: u32,
}

/// What a copy's header sector says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderState {
    /// Never written.
    Empty,
    /// A header whose checksum, magic, version, cluster and copy check out.
    Valid(DiskHeader),
    /// Anything else (torn, garbled, of another cluster or format).
    Unknown(&'static str),
}

/// Encodes one copy of `record`: its header sector and its payload sectors.
pub fn encode_disk_copy(
    cluster_hash: u64,
    copy: DiskCopy,
    record: &DiskRecord,
) -> Result<Vec<[u8; SECTOR_SIZE]>, DbError> {
    let payload = encode("disk record", record)?;
    if payload.len() > DISK_PAYLOAD_MAX {
        return Err(DbError::DiskTooLarge {
            size: payload.len(),
            max: DISK_PAYLOAD_MAX,
        });
    }
    let len = u32::try_from(payload.len()).map_err(|_| DbError::DiskTooLarge {
        size: payload.len(),
        max: DISK_PAYLOAD_MAX,
    })?;
    let (seq, epoch, committed) = record.key();
    let mut h = [0u8; SECTOR_SIZE];
    h[0..4].copy_from_slice(&DISK_MAGIC);
    h[4..6].copy_from_slice(&DISK_FORMAT.to_le_bytes());
    h[6] = copy.code();
    h[8..16].copy_from_slice(&cluster_hash.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&epoch.to_le_bytes());
    h[32..36].copy_from_slice(&len.to_le_bytes());
    h[36..40].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    h[40..48].copy_from_slice(&committed.to_le_bytes());
    let crc = crc32c::crc32c(&h[..HEADER_CRC_OFFSET]);
    h[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    let mut out = vec![h];
    for chunk in payload.chunks(SECTOR_SIZE) {
        let mut s = [0u8; SECTOR_SIZE];
        s[..chunk.len()].copy_from_slice(chunk);
        out.push(s);
    }
    Ok(out)
}

fn u64_at(s: &[u8; SECTOR_SIZE], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(b)
}

fn u32_at(s: &[u8; SECTOR_SIZE], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&s[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Decodes the header sector of `copy`.
pub fn decode_disk_header(cluster_hash: u64, copy: DiskCopy, s: &[u8; SECTOR_SIZE]) -> HeaderState {
    if s.iter().all(|b| *b == 0) {
        return HeaderState::Empty;
    }
    if crc32c::crc32c(&s[..HEADER_CRC_OFFSET]) != u32_at(s, HEADER_CRC_OFFSET) {
        return HeaderState::Unknown("header checksum mismatch (torn or garbled)");
    }
    if s[0..4] != DISK_MAGIC {
        return HeaderState::Unknown("not a cluster database header");
    }
    if s[4..6] != DISK_FORMAT.to_le_bytes() {
        return HeaderState::Unknown("unknown format version");
    }
    if s[6] != copy.code() {
        return HeaderState::Unknown("header of the other copy");
    }
    if u64_at(s, 8) != cluster_hash {
        return HeaderState::Unknown("database of another cluster");
    }
    let len = u32_at(s, 32);
    if usize::try_from(len).map_or(true, |l| l > DISK_PAYLOAD_MAX) {
        return HeaderState::Unknown("payload length out of range");
    }
    HeaderState::Valid(DiskHeader {
        seq: u64_at(s, 16),
        epoch: u64_at(s, 24),
        committed: u64_at(s, 40),
        len,
        crc: u32_at(s, 36),
    })
}

/// The number of payload sectors of a header.
pub fn payload_sectors(h: &DiskHeader) -> u64 {
    u64::from(h.len).div_ceil(SECTOR_SIZE as u64)
}

/// Decodes the payload sectors that follow a valid header.
pub fn decode_disk_payload(
    h: &DiskHeader,
    sectors: &[[u8; SECTOR_SIZE]],
) -> Result<DiskRecord, &'static str> {
    let len = usize::try_from(h.len).map_err(|_| "payload length out of range")?;
    let bytes: Vec<u8> = sectors.iter().flatten().copied().take(len).collect();
    if bytes.len() != len {
        return Err("payload shorter than its header says");
    }
    if crc32c::crc32c(&bytes) != h.crc {
        return Err("payload checksum mismatch (torn or garbled)");
    }
    let record: DiskRecord =
        rmp_serde::from_slice(&bytes).map_err(|_| "payload does not decode")?;
    if record.key() != (h.seq, h.epoch, h.committed) {
        return Err("payload does not match its header");
    }
    Ok(record)
}

/// What a read of the database area found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskArea {
    /// The valid copy with the highest [`DiskRecord::key`], if any.
    pub record: Option<DiskRecord>,
    /// The copy it came from.
    pub copy: Option<DiskCopy>,
    /// Copies that were written but do not check out, and why.
    pub unreadable: Vec<(DiskCopy, &'static str)>,
}

/// Reads the database area: the valid copy with the highest [`DiskRecord::key`]; a torn or
/// corrupt copy reads as absent (and is listed in `unreadable`). Blocking.
pub fn read_disk_area(disk: &mut dyn Disk, cluster_hash: u64) -> Result<DiskArea, DbError> {
    let mut area = DiskArea::default();
    let mut valid: Vec<(DiskHeader, DiskCopy)> = Vec::new();
    for copy in [DiskCopy::A, DiskCopy::B] {
        let s = disk
            .read_sectors(copy.first_sector(), 1)
            .map_err(DbError::DiskIo)?;
        let Some(s) = s.first() else {
            return Err(DbError::DiskIo(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short read",
            )));
        };
        match decode_disk_header(cluster_hash, copy, s) {
            HeaderState::Empty => {}
            HeaderState::Valid(h) => valid.push((h, copy)),
            HeaderState::Unknown(why) => area.unreadable.push((copy, why)),
        }
    }
    // Newest first: a copy whose payload does not check out yields to the other.
    valid.sort_by_key(|(h, c)| std::cmp::Reverse((h.seq, h.epoch, h.committed, *c)));
    for (h, copy) in valid {
        let n = payload_sectors(&h);
        let sectors = disk
            .read_sectors(copy.first_sector() + 1, n)
            .map_err(DbError::DiskIo)?;
        match decode_disk_payload(&h, &sectors) {
            Ok(r) if area.record.is_none() => {
                area.record = Some(r);
                area.copy = Some(copy);
            }
            Ok(_) => {}
            Err(why) => area.unreadable.push((copy, why)),
        }
    }
    Ok(area)
}

/// Writes `record` over the copy that does not hold the newest valid record (payload first,
/// header last), so a torn write destroys at most the older copy. Blocking.
pub fn write_disk_area(
    disk: &mut dyn Disk,
    cluster_hash: u64,
    record: &DiskRecord,
) -> Result<(), DbError> {
    let current = read_disk_area(disk, cluster_hash)?;
    let target = current.copy.map_or(DiskCopy::A, DiskCopy::other);
    let sectors = encode_disk_copy(cluster_hash, target, record)?;
    let first = target.first_sector();
    for (i, s) in sectors.iter().enumerate().skip(1) {
        let i = u64::try_from(i).unwrap_or(u64::MAX);
        disk.write_sector(first + i, s).map_err(DbError::DiskIo)?;
    }
    if let Some(h) = sectors.first() {
        disk.write_sector(first, h).map_err(DbError::DiskIo)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
