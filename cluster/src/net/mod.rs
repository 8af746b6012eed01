//! The authenticated node-to-node transport: TCP connections between the nodes of one cluster,
//! opened only after both ends proved the cluster secret, routed to a named *channel*, carrying
//! length-prefixed MessagePack frames. It owns sockets, framing, the handshake and reconnection;
//! it never interprets application messages and never trusts a byte a peer sent before checking it.
//!
//! ```text
//!   connect / connect_retry ──TCP──► Listener (accept loop: one task per handshake, bounded)
//!        │   hello ─────────────────►   │ cluster + version checked
//!        │   ◄──────────── challenge    │ server proves the secret first
//!        │   response ──────────────►   │ client proves it; channel looked up
//!        │   ◄────────────── welcome    │
//!       Conn ◄════ frames ═══════════► Conn ──► Listener::channel(name) receiver
//! ```
//!
//! # Wire format (protocol version 1)
//!
//! **Frames.** Every message is one frame: a 4-byte big-endian unsigned length `N`, then `N`
//! bytes. `N` counts only what follows the prefix. During the handshake `N` must not exceed
//! [`HANDSHAKE_MAX_FRAME`] (4096) bytes; afterwards it must not exceed the configured
//! [`NetConfig::max_frame`] (default [`DEFAULT_MAX_FRAME`], 16 MiB; both ends should use the
//! same value). A frame above the limit, or end-of-stream in the middle of a frame, ends the
//! connection: there is no way to find the next frame boundary.
//!
//! **Envelope.** The `N` bytes are exactly one MessagePack value, a two-element array
//! `[version, body]`: `version` is an unsigned integer ([`PROTOCOL_VERSION`], encoders emit the
//! shortest form, decoders accept any unsigned form that fits 16 bits) and `body` is one
//! MessagePack value; no byte may follow it. The envelope layout and the `refuse` message are
//! frozen across versions, so that a peer of another version can still read why it was refused.
//!
//! **Bodies** use rmp-serde's default encoding: a struct is an array of its fields in
//! declaration order, an enum variant with fields is a one-entry map `{variant name: fields}`,
//! a unit variant is its name as a string, byte strings (nonces, proofs) are `bin`.
//!
//! **Handshake.** The dialing side is the *client*, the listening side the *server*. Names
//! (cluster, node, channel) are UTF-8 strings of 1 to [`MAX_NAME_LEN`] bytes without control
//! characters; nonces are 32 fresh random bytes per connection from each side. In order:
//!
//! ```text
//! C→S  {"hello":     [cluster: str, node: str, channel: str, nonce: bin32]}
//! S→C  {"challenge": [node: str, nonce: bin32, proof: bin32]}    proof = P("server")
//! C→S  {"response":  [proof: bin32]}                             proof = P("client")
//! S→C  {"welcome":   []}
//!
//! P(role) = HMAC-SHA256(key = the cluster secret's bytes,
//!                       "ftkit-net-handshake" 0x00 role 0x00 u16be(version)
//!                       lp(cluster) lp(channel) lp(client node) lp(server node)
//!                       client nonce (32 bytes) server nonce (32 bytes))
//! lp(s) = u32be(byte length of s) followed by the bytes of s
//! ```
//!
//! The server checks the envelope version and the cluster name of `hello` before it answers,
//! then proves the secret over both nonces; the client checks that proof (constant-time) before
//! it proves the secret itself, so neither side reveals a proof that could be replayed on
//! another connection, and a recorded handshake is useless against fresh nonces. The server
//! looks the channel up only after the client proved the secret, so unauthenticated peers learn
//! nothing about the channels. Instead of its next message either side may send
//! `{"refuse": [code: str, detail: str]}` and close; `code` is one of `version`, `cluster`,
//! `channel`, `auth`, `malformed`, `oversized`, `timeout`, `busy` (see
//! [`NetError::refuse_code`]), `detail` a human-readable reason. The whole handshake must end
//! within [`NetConfig::handshake_timeout`].
//!
//! Example: the `hello` of cluster `c`, node `n`, channel `x` and an all-zero nonce is the frame
//! `00 00 00 32 | 92 01 | 81 a5 "hello" 94 a1 "c" a1 "n" a1 "x" c4 20 00×32`.
//!
//! **After `welcome`** both sides send application frames in any order, in the same envelope;
//! the body is the application's message (for example `repl`'s stream messages).
//!
//! What the handshake does not give: frames are neither encrypted nor individually
//! authenticated, so an attacker who can inject into an established TCP stream is not stopped
//! (run the cluster on a trusted network or a VPN); every holder of the secret may claim any
//! node name, so callers that care compare [`Conn::peer_node`] with their configuration.

mod conn;
mod dial;
mod error;
mod frame;
mod handshake;
mod listener;
mod stats;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;
use std::time::Duration;

pub use conn::{Conn, ConnReceiver, ConnSender, PeerInfo};
pub use dial::{
    Backoff, DEFAULT_BACKOFF_FACTOR, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_JITTER,
    DEFAULT_BACKOFF_MAX, connect, connect_addr, connect_retry,
};
pub use error::{DialFailure, NetError, RefusalKind};
pub use frame::decode_body;
pub use listener::Listener;
pub use stats::{NetStats, NetStatsSnapshot, RefusalCounts};

/// The protocol version stamped on every frame; a peer speaking another one is refused.
pub const PROTOCOL_VERSION: u16 = 1;
/// The largest frame accepted before the handshake completed: an unauthenticated peer must not
/// make this node allocate more.
pub const HANDSHAKE_MAX_FRAME: usize = 4096;
/// The largest cluster, node or channel name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Default of [`NetConfig::max_frame`]: large enough for a 1 MiB write chunk with headroom.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
/// Default of [`NetConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`NetConfig::connect_timeout`]: a black-holed address (link down) must not hold a
/// dial for the kernel's two minutes before the next address is tried.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default of [`NetConfig::max_pending_handshakes`].
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 64;
/// Default of [`NetConfig::channel_backlog`].
pub const DEFAULT_CHANNEL_BACKLOG: usize = 16;

/// This node's identity and the transport's limits. Clones share [`NetConfig::stats`], so one
/// node keeps one `NetConfig` (cloned where needed) and sees all its counters in one place.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The cluster's name; a peer of another cluster is refused.
    pub cluster: String,
    /// This node's name, told to peers in the handshake.
    pub node: String,
    /// The shared cluster secret both ends prove in the handshake.
    pub secret: Secret,
    /// The largest frame sent or accepted after the handshake, in bytes (at least
    /// [`HANDSHAKE_MAX_FRAME`], at most `u32::MAX`).
    pub max_frame: usize,
    /// How long a handshake may take, on either side, before the connection is dropped.
    pub handshake_timeout: Duration,
    /// How long one TCP connect may take before the next address is tried.
    pub connect_timeout: Duration,
    /// Handshakes in progress on a listener at once; more connections are refused as `busy`,
    /// so a flood of silent peers costs a bounded number of tasks.
    pub max_pending_handshakes: usize,
    /// Established connections queued per channel before the listener's handshake task waits
    /// for the channel's receiver.
    pub channel_backlog: usize,
    /// Counters of accepted, dialed and refused connections.
    pub stats: NetStats,
}

impl NetConfig {
    /// A configuration with the default limits and fresh counters.
    pub fn new(
        cluster: impl Into<String>,
        node: impl Into<String>,
        secret: Secret,
    ) -> Result<NetConfig, NetError> {
        let cfg = NetConfig {
            cluster: cluster.into(),
            node: node.into(),
            secret,
            max_frame: DEFAULT_MAX_FRAME,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            channel_backlog: DEFAULT_CHANNEL_BACKLOG,
            stats: NetStats::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; [`Listener::bind`] and the dial functions call it too, because the
    /// fields are public.
    pub fn validate(&self) -> Result<(), NetError> {
        config_name("cluster", &self.cluster)?;
        config_name("node", &self.node)?;
        if self.max_frame < HANDSHAKE_MAX_FRAME || u32::try_from(self.max_frame).is_err() {
            return Err(NetError::InvalidConfig {
                field: "max_frame",
                why: format!(
                    "{} is outside {HANDSHAKE_MAX_FRAME}..={}",
                    self.max_frame,
                    u32::MAX
                ),
            });
        }
        for (field, value) in [
            ("handshake_timeout", self.handshake_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(NetError::InvalidConfig {
                    field,
                    why: "must be longer than zero".into(),
                });
            }
        }
        for (field, value) in [
            ("max_pending_handshakes", self.max_pending_handshakes),
            ("channel_backlog", self.channel_backlog),
        ] {
            if value == 0 {
                return Err(NetError::InvalidConfig {
                    field,
                    why: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

/// The shared cluster secret: at least [`Secret::MIN_LEN`] bytes. Its `Debug` output never shows
/// the bytes, and they are overwritten when the value is dropped.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The shortest secret accepted: 128 bits.
    pub const MIN_LEN: usize = 16;

    /// Takes the secret's bytes as they are.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, NetError> {
        let secret = Secret(bytes.into());
        if secret.0.len() < Self::MIN_LEN {
            return Err(NetError::SecretTooShort {
                len: secret.0.len(),
                min: Self::MIN_LEN,
            });
        }
        Ok(secret)
    }

    /// Reads the secret from a file, without its trailing line ends (files written by `echo`
    /// or an editor end with one). Warns when the file is readable by group or others.
    /// Blocking I/O: call it while loading the configuration, not on an event loop.
    pub fn from_file(path: &Path) -> Result<Secret, NetError> {
        use std::os::unix::fs::PermissionsExt;

        const GROUP_OTHER_BITS: u32 = 0o077;
        let io_err = |source| NetError::SecretFile {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if meta.permissions().mode() & GROUP_OTHER_BITS != 0 {
            tracing::warn!(
                path = %path.display(),
                "the cluster secret file is readable by group or others; restrict it to mode 0600"
            );
        }
        let mut bytes = std::fs::read(path).map_err(io_err)?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        Secret::new(bytes)
    }

    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keeps the compiler from dropping the fill as a dead store.
        std::hint::black_box(&self.0);
    }
}

/// Checks a name received from a peer: 1..=MAX_NAME_LEN bytes, no control characters (they
/// end up in logs).
pub(crate) fn wire_name(what: &'static str, name: &str) -> Result<(), NetError> {
    name_problem(name).map_or(Ok(()), |detail| {
        Err(NetError::Malformed {
            what,
            detail: detail.to_owned(),
        })
    })
}

/// Checks a name from this node's configuration or caller.
pub(crate) fn config_name(field: &'static str, name: &str) -> Result<(), NetError> {
    name_problem(name).map_or(Ok(()), |why| {
        Err(NetError::InvalidConfig {
            field,
            why: why.to_owned(),
        })
    })
}

fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name.len() > MAX_NAME_LEN {
        Some("name longer than 255 bytes")
    } else if name.chars().any(char::is_control) {
        Some("name contains a control character")
    } else {
        None
    }
}
