//! The transport's one error type and the classification of handshake failures into refusal
//! kinds (for counters) and wire codes (for the peer). It never decides what to do about an
//! error: listener and dialer do.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network configuration: {field}: {why}")]
    InvalidConfig { field: &'static str, why: String },
    #[error("the cluster secret is {len} bytes long; at least {min} are required")]
    SecretTooShort { len: usize, min: usize },
    #[error("cannot read the cluster secret from {}: {source}", path.display())]
    SecretFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("no address to dial")]
    NoAddress,
    #[error("no address of the peer could be reached: {}", FailureList(failures))]
    Unreachable { failures: Vec<DialFailure> },
    #[error("I/O error on the connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    #[error("the connection ended inside a frame ({have} of {need} bytes received)")]
    Truncated { have: usize, need: usize },
    #[error("the peer closed the connection")]
    Closed,
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("cannot decode the message: {}", Escaped(.0))]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("cannot encode the message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error(
        "protocol version mismatch: this node speaks version {ours}, the peer version {theirs}"
    )]
    Version { ours: u16, theirs: u16 },
    #[error("wrong cluster: this node belongs to {ours:?}, the peer to {theirs:?}")]
    WrongCluster { ours: String, theirs: String },
    #[error("no service listens on channel {channel:?} here")]
    UnknownChannel { channel: String },
    #[error("authentication failed: the peer did not prove knowledge of the cluster secret")]
    BadProof,
    #[error("the peer refused the connection ({code:?}): {detail:?}")]
    PeerRefused { code: String, detail: String },
    #[error("unexpected handshake message: expected {expected}, got {got}")]
    UnexpectedMessage {
        expected: &'static str,
        got: &'static str,
    },
    #[error("the handshake did not complete within {after:?}")]
    HandshakeTimeout { after: Duration },
    #[error("too many handshakes in progress (limit {limit})")]
    Busy { limit: usize },
    #[error("channel {channel:?} already has a receiver")]
    ChannelInUse { channel: String },
}

/// One address that [`crate::net::connect`] tried, and why it failed.
#[derive(Debug)]
pub struct DialFailure {
    pub addr: SocketAddr,
    pub error: NetError,
}

/// Shows a message that may quote peer-controlled text (serde errors name unknown variants)
/// with its control characters escaped, so a peer cannot forge log lines.
struct Escaped<'a, T>(&'a T);

impl<T: fmt::Display> fmt::Display for Escaped<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.to_string().chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

struct FailureList<'a>(&'a [DialFailure]);

impl fmt::Display for FailureList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, failure) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", failure.addr, failure.error)?;
        }
        Ok(())
    }
}

/// Why a handshake failed, as counted in [`crate::net::RefusalCounts`]. A refusal the peer
/// announced is counted under the kind of its code, so both ends count a wrong secret as
/// `Auth` whichever of them noticed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// Another protocol version.
    Version,
    /// Another cluster name.
    Cluster,
    /// A channel nobody listens on.
    Channel,
    /// A proof of the secret that did not verify.
    Auth,
    /// Bytes that are not a handshake message in the right order.
    Malformed,
    /// A frame above the size limit.
    Oversized,
    /// End-of-stream inside a frame.
    Truncated,
    /// End-of-stream between frames, before the handshake completed.
    Closed,
    /// The handshake did not complete in time.
    Timeout,
    /// Too many handshakes in progress.
    Busy,
    /// A socket error.
    Io,
    /// The peer refused with a code this version does not know.
    Other,
}

impl RefusalKind {
    /// Every kind, in counter order.
    pub const ALL: [RefusalKind; 12] = [
        RefusalKind::Version,
        RefusalKind::Cluster,
        RefusalKind::Channel,
        RefusalKind::Auth,
        RefusalKind::Malformed,
        RefusalKind::Oversized,
        RefusalKind::Truncated,
        RefusalKind::Closed,
        RefusalKind::Timeout,
        RefusalKind::Busy,
        RefusalKind::Io,
        RefusalKind::Other,
    ];

    /// The wire code sent in a `refuse` message, for the kinds that are announced.
    pub fn code(self) -> Option<&'static str> {
        match self {
            RefusalKind::Version => Some("version"),
            RefusalKind::Cluster => Some("cluster"),
            RefusalKind::Channel => Some("channel"),
            RefusalKind::Auth => Some("auth"),
            RefusalKind::Malformed => Some("malformed"),
            RefusalKind::Oversized => Some("oversized"),
            RefusalKind::Timeout => Some("timeout"),
            RefusalKind::Busy => Some("busy"),
            RefusalKind::Truncated | RefusalKind::Closed | RefusalKind::Io | RefusalKind::Other => {
                None
            }
        }
    }

    /// The kind a peer's `refuse` code stands for.
    pub fn from_code(code: &str) -> RefusalKind {
        RefusalKind::ALL
            .into_iter()
            .find(|kind| kind.code() == Some(code))
            .unwrap_or(RefusalKind::Other)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl NetError {
    /// How this error is counted when it ends a handshake; `None` for errors that are not about
    /// a peer (configuration, bind, dial).
    pub fn refusal_kind(&self) -> Option<RefusalKind> {
        Some(match self {
            NetError::Version { .. } => RefusalKind::Version,
            NetError::WrongCluster { .. } => RefusalKind::Cluster,
            NetError::UnknownChannel { .. } => RefusalKind::Channel,
            NetError::BadProof => RefusalKind::Auth,
            NetError::Malformed { .. }
            | NetError::Decode(_)
            | NetError::UnexpectedMessage { .. } => RefusalKind::Malformed,
            NetError::FrameTooLarge { .. } => RefusalKind::Oversized,
            NetError::Truncated { .. } => RefusalKind::Truncated,
            NetError::Closed => RefusalKind::Closed,
            NetError::HandshakeTimeout { .. } => RefusalKind::Timeout,
            NetError::Busy { .. } => RefusalKind::Busy,
            NetError::Io(_) => RefusalKind::Io,
            NetError::PeerRefused { code, .. } => RefusalKind::from_code(code),
            NetError::InvalidConfig { .. }
            | NetError::SecretTooShort { .. }
            | NetError::SecretFile { .. }
            | NetError::Bind { .. }
            | NetError::Connect { .. }
            | NetError::ConnectTimeout { .. }
            | NetError::NoAddress
            | NetError::Unreachable { .. }
            | NetError::Encode(_)
            | NetError::ChannelInUse { .. } => return None,
        })
    }

    /// The code this node sends in its `refuse` message when this error ends a handshake;
    /// `None` when nothing is sent (the peer is gone, or it refused us).
    pub fn refuse_code(&self) -> Option<&'static str> {
        match self {
            NetError::PeerRefused { .. } => None,
            other => other.refusal_kind().and_then(RefusalKind::code),
        }
    }
}
