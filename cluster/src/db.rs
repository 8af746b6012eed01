//! The cluster database: its typed content (nodes, properties, groups, resources), the
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
const OUR_TABLES: [&str; 5] = [
    "cluster_meta",
    "cluster_properties",
    "cluster_nodes",
    "cluster_groups",
    "cluster_resources",
];
const KEY_FORMAT: &str = "format";
const KEY_SEQ: &str = "seq";
const KEY_EPOCH: &str = "epoch";
const KEY_GUM: &str = "gum";

/// A group: the unit of failover (filled in by the groups issue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Its unique name.
    pub name: String,
    /// The nodes it prefers, best first.
    pub preferred_owners: Vec<NodeId>,
    /// Free-form settings.
    pub properties: BTreeMap<String, String>,
}

/// A resource inside a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Its unique name (across groups).
    pub name: String,
    /// The group it belongs to.
    pub group: String,
    /// Its type (`service`, `fileset`, `ip`, ...).
    pub kind: String,
    /// Resources of the same group that must be online before it.
    pub depends_on: Vec<String>,
    /// Free-form settings.
    pub properties: BTreeMap<String, String>,
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
                match self
                    .groups
                    .values()
                    .find(|g| g.preferred_owners.contains(node))
                {
                    Some(g) => Err(UpdateError::InUse {
                        what: "node".into(),
                        name: node.clone(),
                        by: format!("group {:?}", g.name),
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
                match self.resources.values().find(|r| r.group == *name) {
                    Some(r) => Err(UpdateError::InUse {
                        what: "group".into(),
                        name: name.clone(),
                        by: format!("resource {:?}", r.name),
                    }),
                    None => Ok(()),
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
        }
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
        properties_ok(&r.properties)
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
            Update::AddGroup(g) | Update::SetGroup(g) => {
                self.groups.insert(g.name.clone(), g);
            }
            Update::RemoveGroup { name } => {
                self.groups.remove(&name);
            }
            Update::AddResource(r) | Update::SetResource(r) => {
                self.resources.insert(r.name.clone(), r);
            }
            Update::RemoveResource { name } => {
                self.resources.remove(&name);
            }
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
