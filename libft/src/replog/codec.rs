//! The ring's compact binary encoding of file operations: producers encode from borrowed data
//! ([`OpRef`]) straight into the shared mapping, the consumer decodes into owned [`Op`]s.
//!
//! Encoding never allocates (it runs on every write of the application). Decoding reads bytes
//! that any process with the ring mapped may have written, so it checks every length and
//! every path and must never panic or read past the slice it is given.
//!
//! Body layout (little-endian): `kind u8`, then per kind: numbers first, then paths as
//! `u16 length + bytes`, write data as `u32 length + bytes`.

use std::io::IoSlice;

use super::op::{MAX_PATH_BYTES, Op, PathError, RelPath, check_path};

const KIND_CREATE: u8 = 1;
const KIND_WRITE: u8 = 2;
const KIND_TRUNCATE: u8 = 3;
const KIND_RENAME: u8 = 4;
const KIND_UNLINK: u8 = 5;
const KIND_MKDIR: u8 = 6;
const KIND_RMDIR: u8 = 7;
const KIND_CHMOD: u8 = 8;
const KIND_SETTIMES: u8 = 9;
const KIND_SYMLINK: u8 = 10;
const KIND_LINK: u8 = 11;
const KIND_FSYNC: u8 = 12;

/// SetTimes flag bits: which of the two times is present.
const TIMES_ATIME: u8 = 1;
const TIMES_MTIME: u8 = 2;

/// Bytes a path costs besides its own bytes (the u16 length).
const PATH_PREFIX: usize = 2;
/// Bytes of a Write body besides the path bytes and the data bytes: kind, offset, path
/// length, data length.
pub(crate) const WRITE_FIXED: usize = 1 + 8 + PATH_PREFIX + 4;

/// A file operation borrowing its paths and data from the caller: what producers append.
/// Paths are relative to the fileset root, with the rules of [`RelPath`] (checked by
/// `Ring::append` without allocating).
#[derive(Debug, Clone, Copy)]
pub enum OpRef<'a> {
    /// See [`Op::Create`].
    Create { path: &'a [u8], mode: u32 },
    /// See [`Op::Write`].
    Write {
        path: &'a [u8],
        offset: u64,
        data: &'a [u8],
    },
    /// A gathered write (`writev`/`pwritev`): encoded and decoded as one [`Op::Write`] of the
    /// concatenated buffers.
    WriteVectored {
        path: &'a [u8],
        offset: u64,
        data: &'a [IoSlice<'a>],
    },
    /// See [`Op::Truncate`].
    Truncate { path: &'a [u8], len: u64 },
    /// See [`Op::Rename`].
    Rename { from: &'a [u8], to: &'a [u8] },
    /// See [`Op::Unlink`].
    Unlink { path: &'a [u8] },
    /// See [`Op::Mkdir`].
    Mkdir { path: &'a [u8], mode: u32 },
    /// See [`Op::Rmdir`].
    Rmdir { path: &'a [u8] },
    /// See [`Op::Chmod`].
    Chmod { path: &'a [u8], mode: u32 },
    /// See [`Op::SetTimes`].
    SetTimes {
        path: &'a [u8],
        atime_ns: Option<i64>,
        mtime_ns: Option<i64>,
    },
    /// See [`Op::Symlink`]; `target` is at most [`MAX_PATH_BYTES`], without NUL.
    Symlink { target: &'a [u8], path: &'a [u8] },
    /// See [`Op::Link`].
    Link { from: &'a [u8], to: &'a [u8] },
    /// See [`Op::Fsync`].
    Fsync { path: &'a [u8] },
}

impl<'a> OpRef<'a> {
    /// Borrows an owned operation.
    pub fn from_op(op: &'a Op) -> OpRef<'a> {
        match op {
            Op::Create { path, mode } => OpRef::Create {
                path: path.as_bytes(),
                mode: *mode,
            },
            Op::Write { path, offset, data } => OpRef::Write {
                path: path.as_bytes(),
                offset: *offset,
                data,
            },
            Op::Truncate { path, len } => OpRef::Truncate {
                path: path.as_bytes(),
                len: *len,
            },
            Op::Rename { from, to } => OpRef::Rename {
                from: from.as_bytes(),
                to: to.as_bytes(),
            },
            Op::Unlink { path } => OpRef::Unlink {
                path: path.as_bytes(),
            },
            Op::Mkdir { path, mode } => OpRef::Mkdir {
                path: path.as_bytes(),
                mode: *mode,
            },
            Op::Rmdir { path } => OpRef::Rmdir {
                path: path.as_bytes(),
            },
            Op::Chmod { path, mode } => OpRef::Chmod {
                path: path.as_bytes(),
                mode: *mode,
            },
            Op::SetTimes {
                path,
                atime_ns,
                mtime_ns,
            } => OpRef::SetTimes {
                path: path.as_bytes(),
                atime_ns: *atime_ns,
                mtime_ns: *mtime_ns,
            },
            Op::Symlink { target, path } => OpRef::Symlink {
                target,
                path: path.as_bytes(),
            },
            Op::Link { from, to } => OpRef::Link {
                from: from.as_bytes(),
                to: to.as_bytes(),
            },
            Op::Fsync { path } => OpRef::Fsync {
                path: path.as_bytes(),
            },
        }
    }

    /// Checks every path (and a symlink target) against the rules of [`RelPath`], without
    /// allocating unless it fails.
    pub fn validate(&self) -> Result<(), PathError> {
        match *self {
            OpRef::Rename { from, to } | OpRef::Link { from, to } => {
                check_path(from)?;
                check_path(to)
            }
            OpRef::Symlink { target, path } => {
                check_target(target)?;
                check_path(path)
            }
            _ => check_path(self.path()),
        }
    }

    /// The (destination) path of the operation.
    pub fn path(&self) -> &'a [u8] {
        match *self {
            OpRef::Create { path, .. }
            | OpRef::Write { path, .. }
            | OpRef::WriteVectored { path, .. }
            | OpRef::Truncate { path, .. }
            | OpRef::Unlink { path }
            | OpRef::Mkdir { path, .. }
            | OpRef::Rmdir { path }
            | OpRef::Chmod { path, .. }
            | OpRef::SetTimes { path, .. }
            | OpRef::Symlink { path, .. }
            | OpRef::Fsync { path } => path,
            OpRef::Rename { to, .. } | OpRef::Link { to, .. } => to,
        }
    }

    /// The data of a write (flat or gathered), or `None` for other kinds.
    pub(crate) fn write_parts(&self) -> Option<(&'a [u8], u64, Data<'a>)> {
        match *self {
            OpRef::Write { path, offset, data } => Some((path, offset, Data::Flat(data))),
            OpRef::WriteVectored { path, offset, data } => Some((
                path,
                offset,
                Data::Vectored {
                    bufs: data,
                    skip: 0,
                    len: data.iter().map(|b| b.len()).sum(),
                },
            )),
            _ => None,
        }
    }

    /// Bytes [`encode`](Self::encode) writes.
    pub(crate) fn encoded_len(&self) -> usize {
        let p = |b: &[u8]| PATH_PREFIX + b.len();
        match *self {
            OpRef::Create { path, .. } | OpRef::Mkdir { path, .. } | OpRef::Chmod { path, .. } => {
                1 + 4 + p(path)
            }
            OpRef::Write { .. } | OpRef::WriteVectored { .. } => match self.write_parts() {
                Some((path, _, data)) => WRITE_FIXED + path.len() + data.len(),
                None => 0,
            },
            OpRef::Truncate { path, .. } => 1 + 8 + p(path),
            OpRef::Rename { from, to } | OpRef::Link { from, to } => 1 + p(from) + p(to),
            OpRef::Unlink { path } | OpRef::Rmdir { path } | OpRef::Fsync { path } => 1 + p(path),
            OpRef::SetTimes { path, .. } => 1 + 1 + 8 + 8 + p(path),
            OpRef::Symlink { target, path } => 1 + p(target) + p(path),
        }
    }

    /// Encodes the operation into `dst`, which must be exactly [`encoded_len`](Self::encoded_len)
    /// bytes long. Returns false (having written garbage) if it is not.
    pub(crate) fn encode(&self, dst: &mut [u8]) -> bool {
        let mut w = Writer::new(dst);
        match *self {
            OpRef::Create { path, mode } => w.kind_mode_path(KIND_CREATE, mode, path),
            OpRef::Mkdir { path, mode } => w.kind_mode_path(KIND_MKDIR, mode, path),
            OpRef::Chmod { path, mode } => w.kind_mode_path(KIND_CHMOD, mode, path),
            OpRef::Write { .. } | OpRef::WriteVectored { .. } => {
                if let Some((path, offset, data)) = self.write_parts() {
                    return encode_write(dst, path, offset, data);
                }
            }
            OpRef::Truncate { path, len } => {
                w.put(&[KIND_TRUNCATE]);
                w.put(&len.to_le_bytes());
                w.path(path);
            }
            OpRef::Rename { from, to } => w.kind_two_paths(KIND_RENAME, from, to),
            OpRef::Link { from, to } => w.kind_two_paths(KIND_LINK, from, to),
            OpRef::Unlink { path } => w.kind_path(KIND_UNLINK, path),
            OpRef::Rmdir { path } => w.kind_path(KIND_RMDIR, path),
            OpRef::Fsync { path } => w.kind_path(KIND_FSYNC, path),
            OpRef::SetTimes {
                path,
                atime_ns,
                mtime_ns,
            } => {
                let flags = if atime_ns.is_some() { TIMES_ATIME } else { 0 }
                    | if mtime_ns.is_some() { TIMES_MTIME } else { 0 };
                w.put(&[KIND_SETTIMES, flags]);
                w.put(&atime_ns.unwrap_or(0).to_le_bytes());
                w.put(&mtime_ns.unwrap_or(0).to_le_bytes());
                w.path(path);
            }
            OpRef::Symlink { target, path } => w.kind_two_paths(KIND_SYMLINK, target, path),
        }
        w.finished()
    }
}

/// Encodes one Write (or one chunk of a split write) into `dst`, which must be exactly
/// `WRITE_FIXED + path.len() + data.len()` bytes.
pub(crate) fn encode_write(dst: &mut [u8], path: &[u8], offset: u64, data: Data<'_>) -> bool {
    let Ok(data_len) = u32::try_from(data.len()) else {
        return false;
    };
    let mut w = Writer::new(dst);
    w.put(&[KIND_WRITE]);
    w.put(&offset.to_le_bytes());
    w.path(path);
    w.put(&data_len.to_le_bytes());
    match data {
        Data::Flat(bytes) => w.put(bytes),
        Data::Vectored { bufs, skip, len } => {
            let mut skip = skip;
            let mut left = len;
            for buf in bufs {
                if left == 0 {
                    break;
                }
                let buf: &[u8] = buf;
                if skip >= buf.len() {
                    skip -= buf.len();
                    continue;
                }
                let take = (buf.len() - skip).min(left);
                w.put(buf.get(skip..skip + take).unwrap_or_default());
                left -= take;
                skip = 0;
            }
        }
    }
    w.finished()
}

/// The data of a write: one slice, or a window (`skip`, `len`) over gathered buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Data<'a> {
    Flat(&'a [u8]),
    Vectored {
        bufs: &'a [IoSlice<'a>],
        skip: usize,
        len: usize,
    },
}

impl<'a> Data<'a> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Data::Flat(b) => b.len(),
            Data::Vectored { len, .. } => *len,
        }
    }

    /// The window `[from, from + len)` of this data (clamped to what exists).
    pub(crate) fn window(&self, from: usize, len: usize) -> Data<'a> {
        match *self {
            Data::Flat(b) => {
                let from = from.min(b.len());
                let end = from.saturating_add(len).min(b.len());
                Data::Flat(b.get(from..end).unwrap_or_default())
            }
            Data::Vectored {
                bufs,
                skip,
                len: total,
            } => {
                let from = from.min(total);
                Data::Vectored {
                    bufs,
                    skip: skip + from,
                    len: len.min(total - from),
                }
            }
        }
    }
}

/// A bounds-checked cursor over the destination: a wrong length turns into `false` from
/// [`Writer::finished`], never a panic (the shim must not unwind into C).
struct Writer<'d> {
    dst: &'d mut [u8],
    at: usize,
    overflow: bool,
}

impl<'d> Writer<'d> {
    fn new(dst: &'d mut [u8]) -> Self {
        Self {
            dst,
            at: 0,
            overflow: false,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        let end = self.at.saturating_add(bytes.len());
        match self.dst.get_mut(self.at..end) {
            Some(slot) => {
                slot.copy_from_slice(bytes);
                self.at = end;
            }
            None => self.overflow = true,
        }
    }

    fn path(&mut self, path: &[u8]) {
        match u16::try_from(path.len()) {
            Ok(n) => {
                self.put(&n.to_le_bytes());
                self.put(path);
            }
            Err(_) => self.overflow = true,
        }
    }

    fn kind_path(&mut self, kind: u8, path: &[u8]) {
        self.put(&[kind]);
        self.path(path);
    }

    fn kind_mode_path(&mut self, kind: u8, mode: u32, path: &[u8]) {
        self.put(&[kind]);
        self.put(&mode.to_le_bytes());
        self.path(path);
    }

    fn kind_two_paths(&mut self, kind: u8, a: &[u8], b: &[u8]) {
        self.put(&[kind]);
        self.path(a);
        self.path(b);
    }

    fn finished(&self) -> bool {
        !self.overflow && self.at == self.dst.len()
    }
}

/// Why a record body did not decode into an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// the body ends in the middle of a field
    #[error("the record body ends in the middle of a field")]
    Truncated,
    /// the kind byte names no operation
    #[error("unknown operation kind {0}")]
    UnknownKind(u8),
    /// bytes are left after the operation
    #[error("{0} bytes are left after the operation")]
    TrailingBytes(usize),
    /// a path is not a valid relative path
    #[error("bad path: {0}")]
    Path(#[from] PathError),
    /// a symlink target is empty, too long or contains NUL
    #[error("bad symlink target ({0} bytes)")]
    Target(usize),
    /// unknown SetTimes flag bits
    #[error("unknown SetTimes flags {0:#x}")]
    Flags(u8),
}

/// Decodes one record body; every byte must belong to the operation.
pub(crate) fn decode(body: &[u8]) -> Result<Op, DecodeError> {
    let mut r = Reader { rest: body };
    let kind = r.u8()?;
    let op = match kind {
        KIND_CREATE => {
            let mode = r.u32()?;
            Op::Create {
                path: r.path()?,
                mode,
            }
        }
        KIND_MKDIR => {
            let mode = r.u32()?;
            Op::Mkdir {
                path: r.path()?,
                mode,
            }
        }
        KIND_CHMOD => {
            let mode = r.u32()?;
            Op::Chmod {
                path: r.path()?,
                mode,
            }
        }
        KIND_WRITE => {
            let offset = r.u64()?;
            let path = r.path()?;
            let len = usize::try_from(r.u32()?).map_err(|_| DecodeError::Truncated)?;
            Op::Write {
                path,
                offset,
                data: r.take(len)?.to_vec(),
            }
        }
        KIND_TRUNCATE => {
            let len = r.u64()?;
            Op::Truncate {
                path: r.path()?,
                len,
            }
        }
        KIND_RENAME => Op::Rename {
            from: r.path()?,
            to: r.path()?,
        },
        KIND_LINK => Op::Link {
            from: r.path()?,
            to: r.path()?,
        },
        KIND_UNLINK => Op::Unlink { path: r.path()? },
        KIND_RMDIR => Op::Rmdir { path: r.path()? },
        KIND_FSYNC => Op::Fsync { path: r.path()? },
        KIND_SETTIMES => {
            let flags = r.u8()?;
            if flags & !(TIMES_ATIME | TIMES_MTIME) != 0 {
                return Err(DecodeError::Flags(flags));
            }
            let atime = r.i64()?;
            let mtime = r.i64()?;
            Op::SetTimes {
                path: r.path()?,
                atime_ns: (flags & TIMES_ATIME != 0).then_some(atime),
                mtime_ns: (flags & TIMES_MTIME != 0).then_some(mtime),
            }
        }
        KIND_SYMLINK => {
            let target = r.sized()?;
            check_target(target).map_err(|_| DecodeError::Target(target.len()))?;
            Op::Symlink {
                target: target.to_vec(),
                path: r.path()?,
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if !r.rest.is_empty() {
        return Err(DecodeError::TrailingBytes(r.rest.len()));
    }
    Ok(op)
}

/// Decodes a body of `len` bytes that lies in memory other processes may write (the ring):
/// `read(at, n, dst)` appends body bytes `at..at + n` to `dst` (`at + n <= len` always holds).
/// Every byte is copied once into private memory and only the copies are decoded; a write's
/// data is copied straight into its own buffer (the consumer's hot path: no second copy),
/// everything else goes through `scratch`.
pub(crate) fn decode_piecewise(
    len: usize,
    scratch: &mut Vec<u8>,
    read: impl Fn(usize, usize, &mut Vec<u8>),
) -> Result<Op, DecodeError> {
    /// Kind, offset and path length of a write.
    const HEAD: usize = 1 + 8 + PATH_PREFIX;
    scratch.clear();
    if len >= WRITE_FIXED {
        read(0, HEAD, scratch);
    }
    if scratch.first() != Some(&KIND_WRITE) {
        scratch.clear();
        read(0, len, scratch);
        return decode(scratch);
    }
    let mut r = Reader { rest: scratch };
    r.u8()?;
    let offset = r.u64()?;
    let path_len = usize::from(u16::from_le_bytes(r.array()?));
    let data_at = HEAD + path_len + 4;
    if data_at > len {
        return Err(DecodeError::Truncated);
    }
    read(HEAD, path_len + 4, scratch);
    let mut r = Reader {
        rest: &scratch[HEAD..],
    };
    let path = RelPath::new(r.take(path_len)?)?;
    let data_len = usize::try_from(r.u32()?).map_err(|_| DecodeError::Truncated)?;
    match len - data_at {
        n if n < data_len => return Err(DecodeError::Truncated),
        n if n > data_len => return Err(DecodeError::TrailingBytes(n - data_len)),
        _ => {}
    }
    let mut data = Vec::with_capacity(data_len);
    read(data_at, data_len, &mut data);
    Ok(Op::Write { path, offset, data })
}

struct Reader<'b> {
    rest: &'b [u8],
}

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Result<&'b [u8], DecodeError> {
        if n > self.rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn sized(&mut self) -> Result<&'b [u8], DecodeError> {
        let n = u16::from_le_bytes(self.array()?);
        self.take(usize::from(n))
    }

    fn path(&mut self) -> Result<RelPath, DecodeError> {
        Ok(RelPath::new(self.sized()?)?)
    }
}

/// A symlink target: stored verbatim, so only what the kernel itself refuses is refused.
fn check_target(target: &[u8]) -> Result<(), PathError> {
    if target.is_empty() {
        return Err(PathError::Empty);
    }
    if target.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong(target.len()));
    }
    if target.contains(&0) {
        return Err(PathError::Nul(String::from_utf8_lossy(target).into_owned()));
    }
    Ok(())
}

/// One operation of every kind (and edge cases: empty write, longest path), for tests.
#[cfg(test)]
pub(crate) fn sample_ops() -> Vec<Op> {
    vec![
        Op::Create {
            path: test_path("a"),
            mode: 0o640,
        },
        Op::Write {
            path: test_path("d/f"),
            offset: 1 << 40,
            data: (0..=255).collect(),
        },
        Op::Write {
            path: test_path("empty"),
            offset: 0,
            data: Vec::new(),
        },
        Op::Truncate {
            path: test_path("d/f"),
            len: 12345,
        },
        Op::Rename {
            from: test_path("x"),
            to: test_path("y/z"),
        },
        Op::Unlink {
            path: test_path("gone"),
        },
        Op::Mkdir {
            path: test_path("dir"),
            mode: 0o755,
        },
        Op::Rmdir {
            path: test_path("dir"),
        },
        Op::Chmod {
            path: test_path("a"),
            mode: 0o4755,
        },
        Op::SetTimes {
            path: test_path("a"),
            atime_ns: Some(-5),
            mtime_ns: None,
        },
        Op::SetTimes {
            path: test_path("a"),
            atime_ns: None,
            mtime_ns: Some(i64::MAX),
        },
        Op::Symlink {
            target: b"../outside/../x".to_vec(),
            path: test_path("link"),
        },
        Op::Link {
            from: test_path("a"),
            to: test_path("hard"),
        },
        Op::Fsync {
            path: test_path(&"p".repeat(MAX_PATH_BYTES)),
        },
    ]
}

#[cfg(test)]
fn test_path(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("valid test path")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s.as_bytes()).expect("valid test path")
    }

    /// [`decode_piecewise`] over a slice, with a scratch buffer holding garbage.
    fn piecewise(body: &[u8]) -> Result<Op, DecodeError> {
        let mut scratch = vec![0xaa; 7];
        decode_piecewise(body.len(), &mut scratch, |at, n, dst| {
            dst.extend_from_slice(&body[at..at + n]);
        })
    }

    #[test]
    fn every_kind_round_trips() {
        for op in sample_ops() {
            let r = OpRef::from_op(&op);
            r.validate().expect("valid");
            let mut buf = vec![0u8; r.encoded_len()];
            assert!(r.encode(&mut buf), "{op:?}");
            assert_eq!(decode(&buf).expect("decodes"), op);
            assert_eq!(piecewise(&buf).expect("decodes"), op);
            // Every strict prefix is refused, never a panic.
            for cut in 0..buf.len() {
                assert!(decode(&buf[..cut]).is_err(), "{op:?} cut at {cut}");
                assert!(piecewise(&buf[..cut]).is_err(), "{op:?} cut at {cut}");
            }
            let mut longer = buf.clone();
            longer.push(0);
            assert_eq!(decode(&longer), Err(DecodeError::TrailingBytes(1)));
            assert_eq!(piecewise(&longer), Err(DecodeError::TrailingBytes(1)));
            // A wrong destination size is reported, not a panic.
            let mut short = vec![0u8; buf.len().saturating_sub(1)];
            assert!(!r.encode(&mut short));
        }
    }

    #[test]
    fn vectored_writes_decode_as_one_write() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let r = OpRef::WriteVectored {
            path: b"f",
            offset: 7,
            data: &slices,
        };
        let mut buf = vec![0u8; r.encoded_len()];
        assert!(r.encode(&mut buf));
        assert_eq!(
            decode(&buf).expect("decodes"),
            Op::Write {
                path: rp("f"),
                offset: 7,
                data: b"abcdefgh".to_vec()
            }
        );
        // A window over the gathered buffers crosses buffer boundaries correctly.
        let (_, _, data) = r.write_parts().expect("a write");
        let window = data.window(2, 4);
        let mut buf = vec![0u8; WRITE_FIXED + 1 + window.len()];
        assert!(encode_write(&mut buf, b"f", 9, window));
        assert_eq!(
            decode(&buf).expect("decodes"),
            Op::Write {
                path: rp("f"),
                offset: 9,
                data: b"cdef".to_vec()
            }
        );
    }

    #[test]
    fn check_path_agrees_with_relpath() {
        let long = "a".repeat(MAX_PATH_BYTES + 1);
        for p in [
            "", "/abs", "..", "a/../b", "a//b", "./a", "a/.", "a/", "a\0b", "a", "a/b", "..a",
            ".h/x", &long,
        ] {
            assert_eq!(
                check_path(p.as_bytes()),
                RelPath::new(p.as_bytes()).map(|_| ()),
                "{p:?}"
            );
        }
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[99]), Err(DecodeError::UnknownKind(99)));
        let escape = OpRef::Unlink { path: b"../x" };
        let mut buf = vec![0u8; escape.encoded_len()];
        assert!(escape.encode(&mut buf));
        assert!(matches!(decode(&buf), Err(DecodeError::Path(_))));
        assert!(escape.validate().is_err());
        let times = OpRef::SetTimes {
            path: b"a",
            atime_ns: None,
            mtime_ns: None,
        };
        let mut buf = vec![0u8; times.encoded_len()];
        assert!(times.encode(&mut buf));
        buf[1] = 0x80;
        assert_eq!(decode(&buf), Err(DecodeError::Flags(0x80)));
    }
}
