//! The multi-host part of the configuration: `[cluster]` (who this node is on the network, the
//! shared secret, the quorum and the membership timings in `[cluster.timing]`), `[[node]]` (the
//! other hosts) and `[[fileset]]` (replicated directories).
//!
//! Owns parsing and validation of those tables only (the timing relations are checked with the
//! cluster core's own `validate`); reading the secret file and opening the quorum disk happen
//! when the daemon starts (a missing secret is a start-up error, not a parse error).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cluster::membership::{self, MembershipConfig, MembershipError};
use cluster::quorum::{self, DiskConfig, QuorumError};
use repl::copy::{Exclude, ExcludeError, NamePattern};
use serde::Deserialize;
use toml::Spanned;

use super::ByteSize;

/// Largest frame a peer may send, unless configured.
pub const DEFAULT_MAX_FRAME: u64 = 16 << 20;
/// Time a peer has to complete the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy mode copies a file once it has been quiet this long.
pub const DEFAULT_COPY_QUIET: Duration = Duration::from_millis(500);
/// Size of a fileset's operation ring: a few MiB stay in the CPU caches that producers and the
/// pump share (a 64 MiB ring made each append several times dearer); outages longer than the
/// ring covers are bridged by the pump's memory (`max_retained`) or a resync.
pub const DEFAULT_RING_SIZE: u64 = 8 << 20;
/// Smallest ring (the ring's own minimum).
pub const MIN_RING_SIZE: u64 = 64 << 10;
/// Operations kept in memory for backups that lag or reconnect.
pub const DEFAULT_MAX_RETAINED: u64 = 256 << 20;
/// How long a sync-mode write waits for the backups before it returns an error.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Where rings live unless configured: shared memory, so the data is not written to disk a
/// second time.
pub const DEFAULT_RING_DIR: &str = "/dev/shm";

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's name: nodes of another cluster are refused.
    pub name: Spanned<String>,
    /// A file holding the shared secret (at least 16 bytes; a trailing newline is ignored).
    pub secret_file: PathBuf,
    /// Addresses this node listens on, one per network.
    pub listen: Vec<SocketAddr>,
    /// Largest frame accepted from a peer.
    #[serde(default = "default_max_frame")]
    pub max_frame: ByteSize,
    /// Time a peer has to complete the handshake.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Names of the networks, one per `listen` address (default `net0`, `net1`, ...). A
    /// `[[node]]`'s address `i` is its address on network `i`.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Who holds the votes: the nodes alone (`majority`) or the nodes and a quorum disk.
    #[serde(default)]
    pub quorum: QuorumKind,
    /// The quorum disk (a file or block device every node sees); required with
    /// `quorum = "disk"`.
    pub quorum_disk: Option<PathBuf>,
    /// Membership and quorum-disk timings (`[cluster.timing]`).
    pub timing: Option<Spanned<TimingConfig>>,
}

/// `[cluster] quorum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuorumKind {
    /// A partition acts while it holds a majority of the nodes (three nodes or more).
    #[default]
    Majority,
    /// The quorum disk holds one more vote, given to the partition that owns its lease (two
    /// nodes survive the loss of either).
    Disk,
}

/// `[cluster.timing]`: every node of a cluster should use the same values. The defaults are the
/// cluster core's (`cluster::membership`, `cluster::quorum`); their safety relations are checked
/// when the configuration is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    /// How often heartbeats go out on each network.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals without contact on every network before a member is suspected.
    pub miss_threshold: u32,
    /// Heartbeat intervals without contact on one network (another still working) before a
    /// `link_down` event.
    pub link_miss_threshold: u32,
    /// A node stops acting this long before a peer could suspect it.
    #[serde(with = "humantime_serde")]
    pub acting_margin: Duration,
    /// How long a regroup round waits for answers.
    #[serde(with = "humantime_serde")]
    pub round_timeout: Duration,
    /// The pause after a regroup that changed nothing or found no quorum.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// How long a leaving node waits for the view without it.
    #[serde(with = "humantime_serde")]
    pub leave_timeout: Duration,
    /// Quorum disk: how long one renewal keeps the lease.
    #[serde(with = "humantime_serde")]
    pub lease_time: Duration,
    /// Quorum disk: how often the owner renews and every node reads.
    #[serde(with = "humantime_serde")]
    pub renew_interval: Duration,
    /// Quorum disk: the owner stops acting this long before its lease ends.
    #[serde(with = "humantime_serde")]
    pub safety_margin: Duration,
    /// Quorum disk: an I/O that takes longer counts as failed.
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    /// Quorum disk: the most two clocks may drift apart over one takeover delay.
    #[serde(with = "humantime_serde")]
    pub max_clock_drift: Duration,
    /// Quorum disk: how long a challenger watches the disk unchanged before it claims.
    #[serde(with = "humantime_serde")]
    pub takeover_delay: Duration,
    /// Quorum disk: the wait between a claim and its confirming read.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Quorum disk: the longest random wait after a contested claim.
    #[serde(with = "humantime_serde")]
    pub claim_backoff: Duration,
}

impl Default for TimingConfig {
    fn default() -> Self {
        TimingConfig {
            heartbeat_interval: membership::DEFAULT_HEARTBEAT_INTERVAL,
            miss_threshold: membership::DEFAULT_MISS_THRESHOLD,
            link_miss_threshold: membership::DEFAULT_LINK_MISS_THRESHOLD,
            acting_margin: membership::DEFAULT_ACTING_MARGIN,
            round_timeout: membership::DEFAULT_ROUND_TIMEOUT,
            retry_interval: membership::DEFAULT_RETRY_INTERVAL,
            leave_timeout: membership::DEFAULT_LEAVE_TIMEOUT,
            lease_time: quorum::DEFAULT_LEASE_TIME,
            renew_interval: quorum::DEFAULT_RENEW_INTERVAL,
            safety_margin: quorum::DEFAULT_SAFETY_MARGIN,
            io_timeout: quorum::DEFAULT_IO_TIMEOUT,
            max_clock_drift: quorum::DEFAULT_MAX_CLOCK_DRIFT,
            takeover_delay: quorum::DEFAULT_TAKEOVER_DELAY,
            settle: quorum::DEFAULT_SETTLE,
            claim_backoff: quorum::DEFAULT_CLAIM_BACKOFF,
        }
    }
}

impl ClusterConfig {
    /// The timings in force (`[cluster.timing]` or the defaults).
    pub fn timing(&self) -> TimingConfig {
        self.timing
            .as_ref()
            .map(|t| t.get_ref().clone())
            .unwrap_or_default()
    }

    /// The name of network `i` (the network of `listen[i]`).
    pub fn network_name(&self, i: usize) -> String {
        self.networks
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("net{i}"))
    }

    /// The networks' names, one per `listen` address.
    pub fn network_names(&self) -> Vec<String> {
        (0..self.listen.len())
            .map(|i| self.network_name(i))
            .collect()
    }

    /// Every node of the cluster: this one and the `[[node]]`s.
    pub fn node_names(this_node: &str, nodes: &[NodeConfig]) -> BTreeSet<String> {
        nodes
            .iter()
            .map(|n| n.name.get_ref().clone())
            .chain(std::iter::once(this_node.to_owned()))
            .collect()
    }

    /// The membership rules' parameters for node `this_node`.
    pub fn membership_config(&self, this_node: &str, nodes: &[NodeConfig]) -> MembershipConfig {
        let t = self.timing();
        let mut m = MembershipConfig::new(
            Self::node_names(this_node, nodes),
            self.network_names(),
            self.quorum == QuorumKind::Disk,
        );
        m.heartbeat_interval = t.heartbeat_interval;
        m.miss_threshold = t.miss_threshold;
        m.link_miss_threshold = t.link_miss_threshold;
        m.acting_margin = t.acting_margin;
        m.round_timeout = t.round_timeout;
        m.retry_interval = t.retry_interval;
        m.leave_timeout = t.leave_timeout;
        m
    }

    /// The quorum disk's lease parameters, with `quorum = "disk"`. The slots are the node
    /// names in sorted order, so every node computes the same slots from its own `[[node]]`
    /// list (changing the set of nodes moves slots: stop every node and clear the disk first).
    pub fn disk_config(&self, this_node: &str, nodes: &[NodeConfig]) -> Option<DiskConfig> {
        if self.quorum != QuorumKind::Disk {
            return None;
        }
        let t = self.timing();
        let mut d = DiskConfig::new(
            self.name.get_ref().clone(),
            Self::node_names(this_node, nodes),
        );
        d.renew_interval = t.renew_interval;
        d.lease_time = t.lease_time;
        d.safety_margin = t.safety_margin;
        d.io_timeout = t.io_timeout;
        d.max_clock_drift = t.max_clock_drift;
        d.takeover_delay = t.takeover_delay;
        d.settle = t.settle;
        d.claim_backoff = t.claim_backoff;
        Some(d)
    }
}

fn default_max_frame() -> ByteSize {
    ByteSize(DEFAULT_MAX_FRAME)
}
fn default_handshake_timeout() -> Duration {
    DEFAULT_HANDSHAKE_TIMEOUT
}

/// One `[[node]]`: another host of the cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Its name (its `[watchd] node`).
    pub name: Spanned<String>,
    /// Its addresses, one per network, tried in order.
    pub addresses: Vec<SocketAddr>,
}

/// How a fileset's changes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilesetMode {
    /// Operations logged by libft's file API or the LD_PRELOAD shim, replayed on the backups.
    #[default]
    Replay,
    /// The directory is watched; files are copied whole after a quiet interval.
    Copy,
}

/// The `primary` of a fileset whose primary is chosen at run time by the resource group that
/// holds it (a `fileset` or `checkpoint` resource), not by the configuration.
pub const GROUP_MANAGED_PRIMARY: &str = "group";

/// One `[[fileset]]`: a directory replicated from its primary to its backups.
///
/// With `primary = "group"` the fileset is group-managed: `backups` lists every node that may
/// hold it (at least two); each starts as a backup, and the group executor makes the group's
/// owner the primary (with the group's ownership epoch, which the backups use to refuse an old
/// owner's stream).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesetConfig {
    /// Unique name.
    pub name: Spanned<String>,
    /// The directory on this node: the live files on the primary, the replica on a backup.
    pub path: PathBuf,
    /// The node whose files are the original, or `"group"` (see above).
    pub primary: String,
    /// The nodes that keep a replica (group-managed: every node that may hold the fileset).
    pub backups: Vec<String>,
    /// replay (default) or copy.
    #[serde(default)]
    pub mode: FilesetMode,
    /// A write or fsync returns only once every reachable backup has it durable.
    #[serde(default)]
    pub sync: bool,
    /// Copy mode: copy a file once it has been quiet this long (a checkpoint directory, whose
    /// images are complete when renamed into place, does well with `20ms`).
    #[serde(default = "default_quiet", with = "humantime_serde")]
    pub quiet: Duration,
    /// Copy mode: names that are no part of the fileset (`*` and `?` wildcards, matched against
    /// each component of a path; see `repl::copy::Exclude`), e.g. `[".tmp-*", "*.swp"]`.
    /// Refused in replay mode, whose producers (libft, the shim) log every name.
    #[serde(default)]
    pub exclude: Vec<Spanned<String>>,
    /// Size of the operation ring (a power of two).
    #[serde(default = "default_ring_size")]
    pub ring_size: ByteSize,
    /// Operations kept in memory for backups that lag or reconnect.
    #[serde(default = "default_max_retained")]
    pub max_retained: ByteSize,
    /// Sync mode: how long a write waits for the backups before it fails.
    #[serde(default = "default_sync_timeout", with = "humantime_serde")]
    pub sync_timeout: Duration,
}

fn default_quiet() -> Duration {
    DEFAULT_COPY_QUIET
}
fn default_ring_size() -> ByteSize {
    ByteSize(DEFAULT_RING_SIZE)
}
fn default_max_retained() -> ByteSize {
    ByteSize(DEFAULT_MAX_RETAINED)
}
fn default_sync_timeout() -> Duration {
    DEFAULT_SYNC_TIMEOUT
}

impl FilesetConfig {
    /// The fileset's name.
    pub fn name(&self) -> &str {
        self.name.get_ref()
    }

    /// Whether its primary is chosen by a resource group at run time (`primary = "group"`).
    pub fn group_managed(&self) -> bool {
        self.primary == GROUP_MANAGED_PRIMARY
    }

    /// The configured exclude list (validated at load, so an error here means the
    /// configuration was not loaded through [`validate`]).
    pub fn exclude(&self) -> Result<Exclude, ExcludeError> {
        Exclude::new(self.exclude.iter().map(|p| p.get_ref()))
    }
}

/// Names of nodes and filesets: 1-64 of `A-Z a-z 0-9 - _ .`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A problem: (byte offset, field, message).
pub type Problem = (Option<usize>, String, String);

/// Checks `networks`, `quorum`, `quorum_disk` and the timings (with the cluster core's own
/// checks of the timing relations, so an unsafe combination is refused at load).
fn validate_quorum(
    this_node: &str,
    c: &ClusterConfig,
    nodes: &[NodeConfig],
) -> Result<(), Problem> {
    let at = Some(c.name.span().start);
    if !c.networks.is_empty() {
        if c.networks.len() != c.listen.len() {
            return Err((
                at,
                "cluster.networks".into(),
                format!(
                    "names {} networks but `listen` has {} addresses (one name per address)",
                    c.networks.len(),
                    c.listen.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for n in &c.networks {
            if !valid_name(n) {
                return Err((
                    at,
                    "cluster.networks".into(),
                    format!("`{n}` is not a valid network name"),
                ));
            }
            if !seen.insert(n) {
                return Err((
                    at,
                    "cluster.networks".into(),
                    format!("network `{n}` is named twice"),
                ));
            }
        }
    }
    match (c.quorum, &c.quorum_disk) {
        (QuorumKind::Disk, None) => {
            return Err((
                at,
                "cluster.quorum_disk".into(),
                "is required with quorum = \"disk\" (a file or device every node sees)".into(),
            ));
        }
        (QuorumKind::Majority, Some(_)) => {
            return Err((
                at,
                "cluster.quorum_disk".into(),
                "is only used with quorum = \"disk\"".into(),
            ));
        }
        (QuorumKind::Disk, Some(p)) if p.as_os_str().is_empty() => {
            return Err((at, "cluster.quorum_disk".into(), "must not be empty".into()));
        }
        _ => {}
    }
    let timing_at = c.timing.as_ref().map_or(at, |t| Some(t.span().start));
    let field = |f: &str| match f {
        "nodes" | "slots" => "node".to_owned(),
        "networks" => "cluster.listen".to_owned(),
        "cluster" => "cluster.name".to_owned(),
        other => format!("cluster.timing.{other}"),
    };
    let line_of = |f: &str| {
        if f.starts_with("cluster.timing.") {
            timing_at
        } else {
            at
        }
    };
    if let Err(MembershipError::InvalidConfig { field: f, why }) =
        c.membership_config(this_node, nodes).validate(this_node)
    {
        let name = field(f);
        return Err((line_of(&name), name, why));
    }
    if let Some(d) = c.disk_config(this_node, nodes)
        && let Err(e) = d.validate(this_node)
    {
        let (name, why) = match e {
            QuorumError::InvalidConfig { field: f, why } => (field(f), why),
            other => ("cluster.quorum_disk".to_owned(), other.to_string()),
        };
        return Err((line_of(&name), name, why));
    }
    Ok(())
}

/// Checks a fileset's `exclude` list: every pattern (reported at its own line), their number,
/// and copy mode.
fn validate_exclude(f: &FilesetConfig, i: usize) -> Result<(), Problem> {
    let field = format!("fileset[{i}].exclude");
    let Some(first) = f.exclude.first() else {
        return Ok(());
    };
    if f.mode != FilesetMode::Copy {
        return Err((
            Some(first.span().start),
            field,
            "is only honoured in copy mode (mode = \"copy\"): in replay mode libft and the shim \
             log every name they write"
                .into(),
        ));
    }
    for p in &f.exclude {
        if let Err(e) = NamePattern::new(p.get_ref()) {
            return Err((Some(p.span().start), field, e.to_string()));
        }
    }
    f.exclude()
        .map(|_| ())
        .map_err(|e| (Some(first.span().start), field, e.to_string()))
}

/// Checks the multi-host tables against each other and against this node's name.
pub fn validate(
    this_node: &str,
    cluster: Option<&ClusterConfig>,
    nodes: &[NodeConfig],
    filesets: &[FilesetConfig],
) -> Result<(), Problem> {
    if let Some(c) = cluster {
        let at = Some(c.name.span().start);
        if !valid_name(c.name.get_ref()) {
            return Err((
                at,
                "cluster.name".into(),
                format!("`{}` is not a valid name", c.name.get_ref()),
            ));
        }
        if c.listen.is_empty() {
            return Err((
                at,
                "cluster.listen".into(),
                "needs at least one address".into(),
            ));
        }
        if c.max_frame.0 < 64 << 10 || c.max_frame.0 > 1 << 30 {
            return Err((at, "cluster.max_frame".into(), "must be 64KiB-1GiB".into()));
        }
        if c.handshake_timeout.is_zero() {
            return Err((
                at,
                "cluster.handshake_timeout".into(),
                "must be longer than 0s".into(),
            ));
        }
    } else if let Some(n) = nodes.first() {
        return Err((
            Some(n.name.span().start),
            "node".into(),
            "[[node]] needs a [cluster] table".into(),
        ));
    } else if let Some(f) = filesets.first() {
        return Err((
            Some(f.name.span().start),
            "fileset".into(),
            "[[fileset]] needs a [cluster] table (the backups are other nodes)".into(),
        ));
    }
    let mut known = std::collections::BTreeSet::new();
    known.insert(this_node.to_owned());
    for (i, n) in nodes.iter().enumerate() {
        let at = Some(n.name.span().start);
        let name = n.name.get_ref();
        if !valid_name(name) {
            return Err((
                at,
                format!("node[{i}].name"),
                format!("`{name}` is not a valid node name"),
            ));
        }
        if name != this_node && !known.insert(name.clone()) {
            return Err((
                at,
                format!("node[{i}].name"),
                format!("node `{name}` is defined twice"),
            ));
        }
        if n.addresses.is_empty() && name != this_node {
            return Err((
                at,
                format!("node[{i}].addresses"),
                "needs at least one address".into(),
            ));
        }
    }
    if let Some(c) = cluster {
        validate_quorum(this_node, c, nodes)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, f) in filesets.iter().enumerate() {
        let at = Some(f.name.span().start);
        let field = |x: &str| format!("fileset[{i}].{x}");
        let name = f.name();
        if !valid_name(name) {
            return Err((
                at,
                field("name"),
                format!("`{name}` is not a valid fileset name"),
            ));
        }
        if !seen.insert(name.to_owned()) {
            return Err((
                at,
                field("name"),
                format!("fileset `{name}` is defined twice"),
            ));
        }
        let path = f.path.to_string_lossy();
        // Relative paths are resolved against the configuration file's directory later.
        if path.is_empty() || path.contains([';', '|']) || f.path == std::path::Path::new("/") {
            return Err((
                at,
                field("path"),
                format!("`{path}` must be a directory other than / without `;` or `|`"),
            ));
        }
        if f.group_managed() && known.contains(GROUP_MANAGED_PRIMARY) {
            return Err((
                at,
                field("primary"),
                format!(
                    "`{GROUP_MANAGED_PRIMARY}` is ambiguous: it means \"chosen by the resource group\", \
                     but a node has that name too (rename the node)"
                ),
            ));
        }
        let primary = (!f.group_managed()).then_some(&f.primary);
        for node in primary.into_iter().chain(&f.backups) {
            if !known.contains(node) {
                return Err((
                    at,
                    field(if primary == Some(node) {
                        "primary"
                    } else {
                        "backups"
                    }),
                    format!("node `{node}` is neither this node nor a [[node]]"),
                ));
            }
        }
        if f.group_managed() && f.backups.len() < 2 {
            return Err((
                at,
                field("backups"),
                "with primary = \"group\", lists every node that may hold the fileset: at least two"
                    .into(),
            ));
        }
        if f.backups.is_empty() {
            return Err((
                at,
                field("backups"),
                "needs at least one backup node".into(),
            ));
        }
        if f.backups.contains(&f.primary) {
            return Err((
                at,
                field("backups"),
                "the primary cannot be its own backup".into(),
            ));
        }
        let mut b = f.backups.clone();
        b.sort();
        b.dedup();
        if b.len() != f.backups.len() {
            return Err((at, field("backups"), "lists a node twice".into()));
        }
        let ring = f.ring_size.0;
        if ring < MIN_RING_SIZE || !ring.is_power_of_two() || ring > 1 << 34 {
            return Err((
                at,
                field("ring_size"),
                "must be a power of two between 64KiB and 16GiB".into(),
            ));
        }
        if f.sync_timeout.is_zero() {
            return Err((at, field("sync_timeout"), "must be longer than 0s".into()));
        }
        if f.quiet > Duration::from_secs(3600) {
            return Err((at, field("quiet"), "must be at most 1h".into()));
        }
        validate_exclude(f, i)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;

    const CLUSTER: &str = r#"
[watchd]
node = "a"

[cluster]
name = "demo"
secret_file = "secret"
listen = ["10.0.0.1:7400"]

[[node]]
name = "b"
addresses = ["10.0.0.2:7400", "10.1.0.2:7400"]
"#;

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(Path::new("t.toml"), &format!("{CLUSTER}{extra}")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_fileset_with_defaults_parses() {
        let c = parse(
            "[[fileset]]\nname = \"data\"\npath = \"/srv/data\"\nprimary = \"a\"\nbackups = [\"b\"]\n\n\
             [[service]]\nname = \"s\"\ncommand = \"/bin/true\"\nfilesets = [\"data\"]\nrepl_shim = true\n",
        )
        .expect("valid");
        let f = &c.filesets[0];
        assert_eq!(f.mode, super::FilesetMode::Replay);
        assert!(!f.sync);
        assert_eq!(f.ring_size.0, super::DEFAULT_RING_SIZE);
        assert_eq!(c.nodes[0].addresses.len(), 2);
        assert!(c.services[0].repl_shim);
    }

    #[test]
    fn a_group_managed_fileset_lists_every_node_that_may_hold_it() {
        let c = parse(
            "[[fileset]]\nname = \"ckpt\"\npath = \"/srv/ckpt\"\nprimary = \"group\"\n\
             backups = [\"a\", \"b\"]\nmode = \"copy\"\nquiet = \"20ms\"\n",
        )
        .expect("valid");
        let f = &c.filesets[0];
        assert!(f.group_managed());
        assert_eq!(f.quiet, std::time::Duration::from_millis(20));
        let err = parse(
            "[[node]]\nname = \"group\"\naddresses = [\"10.0.0.3:7400\"]\n\n\
             [[fileset]]\nname = \"d\"\npath = \"/srv/d\"\nprimary = \"group\"\nbackups = [\"a\", \"b\"]\n",
        )
        .expect_err("ambiguous");
        assert!(err.contains("ambiguous"), "{err}");
    }

    #[test]
    fn inconsistent_tables_are_refused_with_the_field() {
        let fs = |body: &str| format!("[[fileset]]\nname = \"data\"\npath = \"/srv/d\"\n{body}\n");
        let cases = [
            (
                fs("primary = \"a\"\nbackups = [\"zz\"]"),
                "fileset[0].backups",
                "zz",
            ),
            (
                fs("primary = \"zz\"\nbackups = [\"b\"]"),
                "fileset[0].primary",
                "zz",
            ),
            (
                fs("primary = \"group\"\nbackups = [\"b\"]"),
                "fileset[0].backups",
                "at least two",
            ),
            (
                fs("primary = \"a\"\nbackups = []"),
                "fileset[0].backups",
                "at least one",
            ),
            (
                fs("primary = \"a\"\nbackups = [\"a\"]"),
                "fileset[0].backups",
                "own backup",
            ),
            (
                fs("primary = \"a\"\nbackups = [\"b\"]\nring_size = \"100KiB\""),
                "fileset[0].ring_size",
                "power of two",
            ),
            (
                fs("primary = \"a\"\nbackups = [\"b\"]\nmode = \"mirror\""),
                "mode",
                "unknown variant",
            ),
            (
                "[[service]]\nname = \"s\"\ncommand = \"/bin/true\"\nfilesets = [\"nope\"]\n"
                    .into(),
                "service[0].filesets",
                "nope",
            ),
        ];
        for (extra, field, needle) in cases {
            let err = parse(&extra).expect_err(&extra);
            assert!(
                err.contains(field) && err.contains(needle),
                "{extra}: {err}"
            );
        }
        let err = Config::parse(
            Path::new("t.toml"),
            "[[fileset]]\nname = \"d\"\npath = \"/x\"\nprimary = \"a\"\nbackups = [\"b\"]\n",
        )
        .expect_err("no cluster");
        assert!(err.to_string().contains("needs a [cluster]"), "{err}");
        let err = Config::parse(
            Path::new("t.toml"),
            "[cluster]\nname = \"x\"\nsecret_file = \"s\"\nlisten = [\"127.0.0.1:1\"]\n",
        )
        .expect_err("no node name");
        assert!(err.to_string().contains("watchd.node"), "{err}");
    }

    #[test]
    fn a_copy_fileset_exclude_list_is_validated_at_load_with_its_line() {
        let fs = |body: &str| {
            format!(
                "[[fileset]]\nname = \"ckpt\"\npath = \"/srv/ckpt\"\nprimary = \"a\"\nbackups = [\"b\"]\n{body}\n"
            )
        };
        let c = parse(&fs("mode = \"copy\"\nexclude = [\".tmp-*\", \"*.swp\"]")).expect("valid");
        let ex = c.filesets[0].exclude().expect("valid list");
        let patterns: Vec<&str> = ex.patterns().iter().map(|p| p.as_str()).collect();
        assert_eq!(patterns, [".tmp-*", "*.swp"]);
        assert!(ex.excludes(b"sub/.tmp-4-99"));
        assert!(
            parse(&fs("mode = \"copy\"")).expect("valid").filesets[0]
                .exclude()
                .expect("empty")
                .is_empty()
        );

        // The line of the bad pattern itself: the 9th of the fileset's text.
        let cluster_lines = CLUSTER.lines().count();
        let err = parse(&fs(
            "mode = \"copy\"\nexclude = [\n  \"ok-*\",\n  \"sub/*.tmp\",\n]",
        ))
        .expect_err("a path, not a name");
        let line = cluster_lines + 9;
        assert!(
            err.starts_with(&format!("t.toml:{line}: field `fileset[0].exclude`"))
                && err.contains("`sub/*.tmp`")
                && err.contains("single name"),
            "{err}"
        );
        for (bad, needle) in [
            ("\"\"", "empty"),
            ("\"*\"", "every name"),
            ("\"..\"", "`..`"),
        ] {
            let err = parse(&fs(&format!("mode = \"copy\"\nexclude = [{bad}]"))).expect_err(bad);
            assert!(
                err.contains("fileset[0].exclude") && err.contains(needle),
                "{bad}: {err}"
            );
        }
        let err = parse(&fs("exclude = [\".tmp-*\"]")).expect_err("replay mode");
        assert!(
            err.contains("fileset[0].exclude") && err.contains("only honoured in copy mode"),
            "{err}"
        );
        let err = parse(&fs("mode = \"copy\"\nexclude = \".tmp-*\"")).expect_err("not a list");
        assert!(err.contains("exclude"), "{err}");
    }

    #[test]
    fn quorum_and_timing_default_to_the_cluster_core_s_values() {
        let c = parse("").expect("valid");
        let cl = c.cluster.as_ref().expect("cluster");
        assert_eq!(cl.quorum, super::QuorumKind::Majority);
        assert_eq!(cl.network_names(), vec!["net0".to_owned()]);
        let m = cl.membership_config("a", &c.nodes);
        assert_eq!(
            m,
            cluster::membership::MembershipConfig::new(
                ["a".to_owned(), "b".to_owned()],
                ["net0".to_owned()],
                false
            )
        );
        assert!(cl.disk_config("a", &c.nodes).is_none());
    }

    #[test]
    fn a_quorum_disk_with_timings_parses() {
        let text = format!(
            "{}\n[cluster.timing]\nheartbeat_interval = \"50ms\"\nmiss_threshold = 6\nlease_time = \"1s\"\ntakeover_delay = \"1300ms\"\n",
            CLUSTER.replace(
                "listen = [\"10.0.0.1:7400\"]",
                "listen = [\"10.0.0.1:7400\", \"10.1.0.1:7400\"]\nnetworks = [\"public\", \"private\"]\nquorum = \"disk\"\nquorum_disk = \"/dev/shm/qd\""
            )
        );
        let c = Config::parse(Path::new("t.toml"), &text).expect("valid");
        let cl = c.cluster.as_ref().expect("cluster");
        assert_eq!(cl.quorum, super::QuorumKind::Disk);
        let m = cl.membership_config("a", &c.nodes);
        assert_eq!(m.heartbeat_interval, std::time::Duration::from_millis(50));
        assert_eq!(m.miss_threshold, 6);
        assert!(m.quorum_disk);
        assert_eq!(m.networks, vec!["public".to_owned(), "private".to_owned()]);
        let d = cl.disk_config("a", &c.nodes).expect("disk");
        assert_eq!(d.slots, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(d.lease_time, std::time::Duration::from_secs(1));
    }

    #[test]
    fn unsafe_timings_and_bad_quorum_settings_name_the_field() {
        let with = |cluster_extra: &str, timing: &str| {
            let text = format!(
                "{}\n[cluster.timing]\n{timing}\n",
                CLUSTER.replace(
                    "listen = [\"10.0.0.1:7400\"]",
                    &format!("listen = [\"10.0.0.1:7400\"]\n{cluster_extra}")
                )
            );
            Config::parse(Path::new("t.toml"), &text).map_err(|e| e.to_string())
        };
        let disk = "quorum = \"disk\"\nquorum_disk = \"/q\"";
        let cases = [
            (
                "",
                "miss_threshold = 1",
                "cluster.timing.miss_threshold",
                "at least",
            ),
            (
                "",
                "link_miss_threshold = 9",
                "cluster.timing.link_miss_threshold",
                "below miss_threshold",
            ),
            (
                "",
                "acting_margin = \"450ms\"",
                "cluster.timing.acting_margin",
                "two heartbeat",
            ),
            (
                disk,
                "takeover_delay = \"580ms\"",
                "cluster.timing.takeover_delay",
                "lease_time + max_clock_drift",
            ),
            (
                disk,
                "settle = \"50ms\"",
                "cluster.timing.settle",
                "io_timeout",
            ),
            ("quorum = \"disk\"", "", "cluster.quorum_disk", "required"),
            (
                "quorum_disk = \"/q\"",
                "",
                "cluster.quorum_disk",
                "only used",
            ),
            ("quorum = \"witness\"", "", "quorum", "unknown variant"),
            (
                "networks = [\"a\", \"b\"]",
                "",
                "cluster.networks",
                "one name per address",
            ),
            ("", "heartbeat = \"1s\"", "heartbeat", "unknown field"),
        ];
        for (extra, timing, field, needle) in cases {
            let err = with(extra, timing).expect_err(timing);
            assert!(
                err.contains(field) && err.contains(needle),
                "{extra} / {timing}: {err}"
            );
        }
        // The line of a timing error is the [cluster.timing] table's.
        let err = with("", "miss_threshold = 1").expect_err("unsafe");
        assert!(err.starts_with("t.toml:15:"), "{err}");
    }
}
