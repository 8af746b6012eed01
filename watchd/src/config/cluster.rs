//! The multi-host part of the configuration: `[cluster]` (who this node is on the network and
//! the shared secret), `[[node]]` (the other hosts) and `[[fileset]]` (replicated directories).
//!
//! Owns parsing and validation of those tables only; reading the secret file happens when the
//! daemon starts (a missing secret is a start-up error, not a parse error).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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

/// One `[[fileset]]`: a directory replicated from its primary to its backups.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesetConfig {
    /// Unique name.
    pub name: Spanned<String>,
    /// The directory on this node: the live files on the primary, the replica on a backup.
    pub path: PathBuf,
    /// The node whose files are the original.
    pub primary: String,
    /// The nodes that keep a replica.
    pub backups: Vec<String>,
    /// replay (default) or copy.
    #[serde(default)]
    pub mode: FilesetMode,
    /// A write or fsync returns only once every reachable backup has it durable.
    #[serde(default)]
    pub sync: bool,
    /// Copy mode: copy a file once it has been quiet this long.
    #[serde(default = "default_quiet", with = "humantime_serde")]
    pub quiet: Duration,
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
        for node in std::iter::once(&f.primary).chain(&f.backups) {
            if !known.contains(node) {
                return Err((
                    at,
                    field("primary"),
                    format!("node `{node}` is neither this node nor a [[node]]"),
                ));
            }
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
    fn inconsistent_tables_are_refused_with_the_field() {
        let fs = |body: &str| format!("[[fileset]]\nname = \"data\"\npath = \"/srv/d\"\n{body}\n");
        let cases = [
            (
                fs("primary = \"a\"\nbackups = [\"zz\"]"),
                "fileset[0].primary",
                "zz",
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
}
