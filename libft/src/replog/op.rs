//! File operations as typed records: what the replication sources (libft's file API, the
//! LD_PRELOAD shim, copy mode) produce and what replay applies on a backup.
//!
//! Paths are always relative to a fileset's root and validated on construction ([`RelPath`]);
//! this module owns that validation and must never accept a path that could leave the root
//! lexically (absolute, `..`, `.`, empty components, NUL). Symlink escapes are replay's job.

use serde::{Deserialize, Serialize};

/// Longest relative path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a path was refused as a [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// the path is empty
    #[error("the path is empty")]
    Empty,
    /// the path is absolute
    #[error("the path {0:?} is absolute; fileset paths are relative to the fileset root")]
    Absolute(String),
    /// the path has a `..`, `.` or empty component
    #[error("the path {0:?} has a `..`, `.` or empty component")]
    BadComponent(String),
    /// the path contains a NUL byte
    #[error("the path {0:?} contains a NUL byte")]
    Nul(String),
    /// the path is longer than [`MAX_PATH_BYTES`]
    #[error("the path is {0} bytes long; at most {MAX_PATH_BYTES} are allowed")]
    TooLong(usize),
}

/// A path relative to a fileset root, as bytes (Linux paths need not be UTF-8): non-empty,
/// not absolute, no `.`/`..`/empty components, no NUL, at most [`MAX_PATH_BYTES`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RelPath(#[serde(with = "serde_bytes")] Vec<u8>);

impl RelPath {
    /// Validates `bytes` as a relative path beneath a root.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        check_path(&bytes)?;
        Ok(Self(bytes))
    }

    /// The path's bytes (no trailing NUL).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path as an OS path.
    pub fn as_path(&self) -> &std::path::Path {
        use std::os::unix::ffi::OsStrExt;
        std::path::Path::new(std::ffi::OsStr::from_bytes(&self.0))
    }

    /// The parent directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        let cut = self.0.iter().rposition(|&b| b == b'/')?;
        Some(Self(self.0[..cut].to_vec()))
    }

    /// Whether `self` is `other` or lies beneath it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.starts_with(&other.0)
                && self.0[other.0.len()] == b'/')
    }
}

impl std::fmt::Debug for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl TryFrom<&str> for RelPath {
    type Error = PathError;
    fn try_from(s: &str) -> Result<Self, PathError> {
        Self::new(s.as_bytes())
    }
}

// Deserialization validates, so a frame from the network can never carry an escaping path
// into the rest of the program.
impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        RelPath::new(bytes.into_vec()).map_err(serde::de::Error::custom)
    }
}

/// One file operation. Path-local variants are idempotent when replayed in sequence order from
/// any earlier point: a write at an offset, a truncation to a length, a create that does not
/// truncate; an unlink, mkdir or rmdir whose effect is already present is a no-op. Renames and
/// links are not (the source name may hold a newer file by then): replay makes the replica
/// durable right before and after each of them, so a crash re-applies one only to the state
/// just before or just after it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a regular file if it does not exist (never truncates: a truncating open is
    /// `Create` followed by `Truncate { len: 0 }`).
    Create { path: RelPath, mode: u32 },
    /// Write `data` at `offset`, creating the file if needed.
    Write {
        path: RelPath,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Set the file's length.
    Truncate { path: RelPath, len: u64 },
    /// Rename `from` to `to`, replacing `to`.
    Rename { from: RelPath, to: RelPath },
    /// Remove a file or symlink.
    Unlink { path: RelPath },
    /// Create a directory.
    Mkdir { path: RelPath, mode: u32 },
    /// Remove an empty directory.
    Rmdir { path: RelPath },
    /// Set permission bits (the low 12 bits of `mode`).
    Chmod { path: RelPath, mode: u32 },
    /// Set access and modification times, nanoseconds since the Unix epoch; `None` leaves
    /// that time unchanged.
    SetTimes {
        path: RelPath,
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
    },
    /// Create a symbolic link at `path` pointing at `target` (stored verbatim; replay never
    /// follows it).
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
        path: RelPath,
    },
    /// Create a hard link `to` for the existing file `from`.
    Link { from: RelPath, to: RelPath },
    /// The application made the file durable; replay makes the replica's copy durable too.
    Fsync { path: RelPath },
}

impl Op {
    /// The path the operation changes (the destination for renames and links).
    pub fn path(&self) -> &RelPath {
        match self {
            Op::Create { path, .. }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Unlink { path }
            | Op::Mkdir { path, .. }
            | Op::Rmdir { path }
            | Op::Chmod { path, .. }
            | Op::SetTimes { path, .. }
            | Op::Symlink { path, .. }
            | Op::Fsync { path } => path,
            Op::Rename { to, .. } | Op::Link { to, .. } => to,
        }
    }

    /// Payload bytes carried (file data or link target), for lag accounting.
    pub fn data_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            Op::Symlink { target, .. } => target.len(),
            _ => 0,
        }
    }

    /// A short name of the kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Rename { .. } => "rename",
            Op::Unlink { .. } => "unlink",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Chmod { .. } => "chmod",
            Op::SetTimes { .. } => "settimes",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Fsync { .. } => "fsync",
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write { path, offset, data } => {
                write!(f, "write {path:?} @{offset} ({} bytes)", data.len())
            }
            Op::Rename { from, to } => write!(f, "rename {from:?} -> {to:?}"),
            Op::Link { from, to } => write!(f, "link {from:?} -> {to:?}"),
            Op::Symlink { target, path } => {
                write!(
                    f,
                    "symlink {path:?} -> {:?}",
                    String::from_utf8_lossy(target)
                )
            }
            Op::Truncate { path, len } => write!(f, "truncate {path:?} to {len}"),
            Op::Create { path, mode } | Op::Mkdir { path, mode } | Op::Chmod { path, mode } => {
                write!(f, "{} {path:?} mode {mode:o}", self.kind())
            }
            other => write!(f, "{} {:?}", other.kind(), other.path()),
        }
    }
}

/// An operation with its place in the fileset's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Per-fileset sequence number, dense and increasing from 1.
    pub seq: u64,
    /// The operation.
    pub op: Op,
}

/// The rules of a [`RelPath`], checked without allocating on success (producers call this on
/// every operation they log; [`RelPath::new`] applies the same rules).
pub fn check_path(bytes: &[u8]) -> Result<(), PathError> {
    let shown = || String::from_utf8_lossy(bytes).into_owned();
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    if bytes.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(PathError::Nul(shown()));
    }
    if bytes[0] == b'/' {
        return Err(PathError::Absolute(shown()));
    }
    if bytes
        .split(|&b| b == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return Err(PathError::BadComponent(shown()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relpath_refuses_escapes_and_accepts_plain_paths() {
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "a/../b",
            "a//b",
            "./a",
            "a/.",
            "a/",
            "a\0b",
        ] {
            assert!(
                RelPath::new(bad.as_bytes()).is_err(),
                "{bad:?} was accepted"
            );
        }
        assert_eq!(
            RelPath::new(vec![b'a'; MAX_PATH_BYTES + 1]),
            Err(PathError::TooLong(MAX_PATH_BYTES + 1))
        );
        for good in ["a", "a/b/c", "..a", "a..", ".hidden/x", "with space/ü"] {
            assert!(
                RelPath::new(good.as_bytes()).is_ok(),
                "{good:?} was refused"
            );
        }
        let non_utf8 = RelPath::new(vec![0xff, b'/', 0xfe]).expect("non-UTF-8 is fine");
        assert_eq!(non_utf8.parent().expect("has parent").as_bytes(), &[0xff]);
    }

    #[test]
    fn starts_with_respects_component_boundaries() {
        let p = |s: &str| RelPath::new(s.as_bytes()).expect("valid");
        assert!(p("a/b").starts_with(&p("a")));
        assert!(p("a").starts_with(&p("a")));
        assert!(!p("ab").starts_with(&p("a")));
    }

    #[test]
    fn ops_round_trip_through_messagepack_and_bad_paths_are_refused_on_decode() {
        let rec = OpRecord {
            seq: 7,
            op: Op::Write {
                path: RelPath::new(&b"d/f"[..]).expect("valid"),
                offset: 4096,
                data: vec![1, 2, 3],
            },
        };
        let bytes = rmp_serde::to_vec(&rec).expect("encodes");
        let back: OpRecord = rmp_serde::from_slice(&bytes).expect("decodes");
        assert_eq!(back, rec);

        // A forged record whose path escapes: encode the same shape with a raw byte string.
        #[derive(Serialize)]
        enum Forged {
            Unlink {
                #[serde(with = "serde_bytes")]
                path: Vec<u8>,
            },
        }
        #[derive(Serialize)]
        struct ForgedRecord {
            seq: u64,
            op: Forged,
        }
        let forged = rmp_serde::to_vec(&ForgedRecord {
            seq: 1,
            op: Forged::Unlink {
                path: b"../../etc/passwd".to_vec(),
            },
        })
        .expect("encodes");
        let err = rmp_serde::from_slice::<OpRecord>(&forged).expect_err("escape refused");
        assert!(err.to_string().contains(".."), "{err}");
    }
}
