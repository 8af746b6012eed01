//! The local protocol between libft (in the application) and watchd.
//!
//! One message is one datagram on the Unix datagram socket named by `FT_SOCKET`. The encoding
//! is a fixed little-endian layout so that a heartbeat is encoded without allocation and decoded
//! without trusting anything: decoding never panics and rejects every malformed input. The sender
//! is never named inside a message; watchd learns it from the kernel (`SCM_CREDENTIALS`).
//!
//! ```text
//! offset 0  1  2        3     4 ...
//!        'F''T' version  kind  body (per kind)
//! kind 1 Register      body: empty
//! kind 2 Heartbeat     body: tid u32, timeout_ms u32
//! kind 3 HeartbeatEnd  body: tid u32
//! kind 4 Ready         body: empty
//! kind 5 Status        body: UTF-8 text, at most MAX_STATUS_LEN bytes
//! kind 6 Unregister    body: empty
//! kind 7 Checkpointed  body: stream u32, seq u64, bytes u64, pause_us u32
//! ```
//!
//! watchd answers on the same socket pair ([`WatchdMessage`], kinds from 0x81). libft's socket
//! is connected to watchd's, and the kernel delivers to a connected datagram socket only what its
//! peer sends, so nothing but watchd can send these to an application.
//!
//! ```text
//! kind 0x81 CheckpointNow  body: stream u32
//! kind 0x82 Promote        body: epoch u64
//! ```

/// The first two bytes of every datagram.
pub const MAGIC: [u8; 2] = *b"FT";
/// The protocol version this library speaks.
pub const VERSION: u8 = 1;
/// The largest datagram either side produces or accepts.
pub const MAX_DATAGRAM: usize = 1024;
/// The longest status text that fits in one datagram.
pub const MAX_STATUS_LEN: usize = MAX_DATAGRAM - HEADER_LEN;
/// The environment variable naming watchd's application socket.
pub const ENV_SOCKET: &str = "FT_SOCKET";
/// The environment variable naming the service the process runs as.
pub const ENV_SERVICE: &str = "FT_SERVICE";

const HEADER_LEN: usize = 4;

/// A message from an application to watchd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppMessage {
    /// The process uses libft: watchd starts honouring its heartbeats (`ft_reg_watch`).
    Register,
    /// Thread `tid` is inside a monitored region and promises its next heartbeat (or the end of
    /// the region) within `timeout_ms` (`ft_hbeat`).
    Heartbeat {
        /// Application-chosen thread id.
        tid: u32,
        /// Time until the next heartbeat is due, in milliseconds.
        timeout_ms: u32,
    },
    /// Thread `tid` left its monitored region (`ft_hbeat_end`).
    HeartbeatEnd {
        /// Application-chosen thread id.
        tid: u32,
    },
    /// The service finished starting up (`ft_ready`).
    Ready,
    /// A free-form status line shown by `ftctl status`.
    Status(String),
    /// The process stops using libft; its heartbeat regions are dropped (`ft_del_watch`).
    Unregister,
    /// A checkpoint was committed (shown by `ftctl status`).
    Checkpointed {
        /// The checkpoint stream (`t_checkpoint(id)`).
        stream: u32,
        /// Its sequence number.
        seq: u64,
        /// Image size in bytes.
        bytes: u64,
        /// How long the application was paused to take it, in microseconds.
        pause_us: u32,
    },
}

/// A message from watchd to an application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchdMessage {
    /// Take a checkpoint of `stream` at the next safe point (`ftctl checkpoint`).
    CheckpointNow {
        /// The checkpoint stream.
        stream: u32,
    },
    /// This standby instance (`FT_ROLE=standby`) is now the primary (`ftctl promote`, or its
    /// group moved to this node): it serves, and its checkpoints continue the sequence.
    Promote {
        /// The ownership epoch (fencing token) of the promotion; 0 when an operator promoted
        /// outside any group.
        epoch: u64,
    },
}

const KIND_CHECKPOINT_NOW: u8 = 0x81;
const KIND_PROMOTE: u8 = 0x82;

impl WatchdMessage {
    /// Encodes into `buf` and returns the number of bytes used.
    pub fn encode(&self, buf: &mut [u8; MAX_DATAGRAM]) -> usize {
        buf[0..2].copy_from_slice(&MAGIC);
        buf[2] = VERSION;
        match self {
            WatchdMessage::CheckpointNow { stream } => {
                buf[3] = KIND_CHECKPOINT_NOW;
                buf[4..8].copy_from_slice(&stream.to_le_bytes());
                HEADER_LEN + 4
            }
            WatchdMessage::Promote { epoch } => {
                buf[3] = KIND_PROMOTE;
                buf[4..12].copy_from_slice(&epoch.to_le_bytes());
                HEADER_LEN + 8
            }
        }
    }

    /// Decodes one datagram. Never panics, whatever the input.
    pub fn decode(datagram: &[u8]) -> Result<WatchdMessage, DecodeError> {
        let body = check_header(datagram)?;
        match datagram[3] {
            KIND_CHECKPOINT_NOW => {
                let b = fixed_body(body, 4)?;
                Ok(WatchdMessage::CheckpointNow {
                    stream: u32_at(b, 0),
                })
            }
            KIND_PROMOTE => {
                let b = fixed_body(body, 8)?;
                Ok(WatchdMessage::Promote {
                    epoch: u64_at(b, 0),
                })
            }
            other => Err(DecodeError::BadKind(other)),
        }
    }
}

fn check_header(datagram: &[u8]) -> Result<&[u8], DecodeError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(DecodeError::Oversized);
    }
    if datagram.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    if datagram[0..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if datagram[2] != VERSION {
        return Err(DecodeError::BadVersion(datagram[2]));
    }
    Ok(&datagram[HEADER_LEN..])
}

fn fixed_body(body: &[u8], len: usize) -> Result<&[u8], DecodeError> {
    match body.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(DecodeError::Truncated),
        std::cmp::Ordering::Greater => Err(DecodeError::Oversized),
        std::cmp::Ordering::Equal => Ok(body),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// datagram shorter than its header or its body
    #[error("datagram too short")]
    Truncated,
    /// datagram longer than MAX_DATAGRAM or than its kind allows
    #[error("datagram too long")]
    Oversized,
    /// datagram does not start with the ftkit magic
    #[error("not an ftkit datagram (bad magic)")]
    BadMagic,
    /// datagram speaks a protocol version this side does not know
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    /// datagram kind is unknown
    #[error("unknown message kind {0}")]
    BadKind(u8),
    /// status text is not UTF-8
    #[error("status text is not UTF-8")]
    BadText,
}

const KIND_REGISTER: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_HEARTBEAT_END: u8 = 3;
const KIND_READY: u8 = 4;
const KIND_STATUS: u8 = 5;
const KIND_UNREGISTER: u8 = 6;
const KIND_CHECKPOINTED: u8 = 7;

impl AppMessage {
    /// Encodes into `buf` and returns the number of bytes used. Status texts longer than
    /// [`MAX_STATUS_LEN`] are cut at a character boundary.
    pub fn encode(&self, buf: &mut [u8; MAX_DATAGRAM]) -> usize {
        buf[0..2].copy_from_slice(&MAGIC);
        buf[2] = VERSION;
        match self {
            AppMessage::Register => {
                buf[3] = KIND_REGISTER;
                HEADER_LEN
            }
            AppMessage::Heartbeat { tid, timeout_ms } => {
                buf[3] = KIND_HEARTBEAT;
                buf[4..8].copy_from_slice(&tid.to_le_bytes());
                buf[8..12].copy_from_slice(&timeout_ms.to_le_bytes());
                HEADER_LEN + 8
            }
            AppMessage::HeartbeatEnd { tid } => {
                buf[3] = KIND_HEARTBEAT_END;
                buf[4..8].copy_from_slice(&tid.to_le_bytes());
                HEADER_LEN + 4
            }
            AppMessage::Ready => {
                buf[3] = KIND_READY;
                HEADER_LEN
            }
            AppMessage::Status(text) => {
                buf[3] = KIND_STATUS;
                let mut end = text.len().min(MAX_STATUS_LEN);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                buf[HEADER_LEN..HEADER_LEN + end].copy_from_slice(&text.as_bytes()[..end]);
                HEADER_LEN + end
            }
            AppMessage::Unregister => {
                buf[3] = KIND_UNREGISTER;
                HEADER_LEN
            }
            AppMessage::Checkpointed {
                stream,
                seq,
                bytes,
                pause_us,
            } => {
                buf[3] = KIND_CHECKPOINTED;
                buf[4..8].copy_from_slice(&stream.to_le_bytes());
                buf[8..16].copy_from_slice(&seq.to_le_bytes());
                buf[16..24].copy_from_slice(&bytes.to_le_bytes());
                buf[24..28].copy_from_slice(&pause_us.to_le_bytes());
                HEADER_LEN + 24
            }
        }
    }

    /// Decodes one datagram. Never panics, whatever the input.
    pub fn decode(datagram: &[u8]) -> Result<AppMessage, DecodeError> {
        let body = check_header(datagram)?;
        let fixed = |len: usize| fixed_body(body, len);
        match datagram[3] {
            KIND_REGISTER => fixed(0).map(|_| AppMessage::Register),
            KIND_HEARTBEAT => {
                let b = fixed(8)?;
                Ok(AppMessage::Heartbeat {
                    tid: u32_at(b, 0),
                    timeout_ms: u32_at(b, 4),
                })
            }
            KIND_HEARTBEAT_END => {
                let b = fixed(4)?;
                Ok(AppMessage::HeartbeatEnd { tid: u32_at(b, 0) })
            }
            KIND_READY => fixed(0).map(|_| AppMessage::Ready),
            KIND_STATUS => std::str::from_utf8(body)
                .map(|s| AppMessage::Status(s.to_owned()))
                .map_err(|_| DecodeError::BadText),
            KIND_UNREGISTER => fixed(0).map(|_| AppMessage::Unregister),
            KIND_CHECKPOINTED => {
                let b = fixed(24)?;
                Ok(AppMessage::Checkpointed {
                    stream: u32_at(b, 0),
                    seq: u64_at(b, 4),
                    bytes: u64_at(b, 12),
                    pause_us: u32_at(b, 20),
                })
            }
            other => Err(DecodeError::BadKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: AppMessage) {
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = m.encode(&mut buf);
        assert_eq!(AppMessage::decode(&buf[..n]), Ok(m));
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(AppMessage::Register);
        roundtrip(AppMessage::Heartbeat {
            tid: 7,
            timeout_ms: 1500,
        });
        roundtrip(AppMessage::Heartbeat {
            tid: u32::MAX,
            timeout_ms: u32::MAX,
        });
        roundtrip(AppMessage::HeartbeatEnd { tid: 3 });
        roundtrip(AppMessage::Ready);
        roundtrip(AppMessage::Status("serving 12 clients".into()));
        roundtrip(AppMessage::Unregister);
        roundtrip(AppMessage::Checkpointed {
            stream: 2,
            seq: u64::MAX - 1,
            bytes: 1 << 40,
            pause_us: 999,
        });
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = WatchdMessage::CheckpointNow { stream: 5 }.encode(&mut buf);
        assert_eq!(
            WatchdMessage::decode(&buf[..n]),
            Ok(WatchdMessage::CheckpointNow { stream: 5 })
        );
        assert_eq!(
            WatchdMessage::decode(&buf[..n - 1]),
            Err(DecodeError::Truncated)
        );
        // The two directions never mistake each other's messages.
        assert!(AppMessage::decode(&buf[..n]).is_err());
        let n = AppMessage::HeartbeatEnd { tid: 1 }.encode(&mut buf);
        assert!(WatchdMessage::decode(&buf[..n]).is_err());
    }

    #[test]
    fn watchd_messages_roundtrip_and_refuse_garbage() {
        let mut buf = [0u8; MAX_DATAGRAM];
        for m in [
            WatchdMessage::Promote { epoch: 0 },
            WatchdMessage::Promote { epoch: 7 },
            WatchdMessage::Promote { epoch: u64::MAX },
            WatchdMessage::CheckpointNow { stream: u32::MAX },
        ] {
            let n = m.encode(&mut buf);
            assert_eq!(WatchdMessage::decode(&buf[..n]), Ok(m.clone()));
            assert_eq!(
                WatchdMessage::decode(&buf[..n - 1]),
                Err(DecodeError::Truncated)
            );
            let mut longer = buf[..n].to_vec();
            longer.push(0);
            assert_eq!(WatchdMessage::decode(&longer), Err(DecodeError::Oversized));
            // The other direction never mistakes it for one of its own.
            assert!(AppMessage::decode(&buf[..n]).is_err());
        }
        let n = WatchdMessage::Promote {
            epoch: 0x0102_0304_0506_0708,
        }
        .encode(&mut buf);
        assert_eq!(&buf[..n], b"FT\x01\x82\x08\x07\x06\x05\x04\x03\x02\x01");
        assert_eq!(
            WatchdMessage::decode(b"FT\x01\x82"),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            WatchdMessage::decode(b"FT\x02\x82\0\0\0\0\0\0\0\0"),
            Err(DecodeError::BadVersion(2))
        );
        assert_eq!(
            WatchdMessage::decode(b"XT\x01\x82\0\0\0\0\0\0\0\0"),
            Err(DecodeError::BadMagic)
        );
        assert_eq!(
            WatchdMessage::decode(b"FT\x01\x83\0\0\0\0\0\0\0\0"),
            Err(DecodeError::BadKind(0x83))
        );
        // Random bytes behind a valid header never panic and never decode to a wrong length.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut garbage = [0u8; 32];
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = usize::try_from(x % 32).expect("< 32");
            for (i, b) in garbage.iter_mut().enumerate().take(len) {
                *b = (x >> (i % 8 * 8)).to_le_bytes()[0];
            }
            if len >= 4 {
                garbage[0..3].copy_from_slice(b"FT\x01");
                garbage[3] = if x.is_multiple_of(2) {
                    KIND_PROMOTE
                } else {
                    garbage[3]
                };
            }
            if let Ok(WatchdMessage::Promote { .. }) = WatchdMessage::decode(&garbage[..len]) {
                assert_eq!(len, HEADER_LEN + 8);
            }
        }
    }

    #[test]
    fn long_status_is_cut_at_a_char_boundary() {
        let text = "é".repeat(MAX_DATAGRAM);
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = AppMessage::Status(text).encode(&mut buf);
        assert!(n <= MAX_DATAGRAM);
        match AppMessage::decode(&buf[..n]) {
            Ok(AppMessage::Status(s)) => {
                assert!(s.len() <= MAX_STATUS_LEN && s.chars().all(|c| c == 'é'))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_datagrams_are_refused() {
        assert_eq!(AppMessage::decode(b""), Err(DecodeError::Truncated));
        assert_eq!(AppMessage::decode(b"FT\x01"), Err(DecodeError::Truncated));
        assert_eq!(
            AppMessage::decode(b"XX\x01\x01"),
            Err(DecodeError::BadMagic)
        );
        assert_eq!(
            AppMessage::decode(b"FT\x09\x01"),
            Err(DecodeError::BadVersion(9))
        );
        assert_eq!(
            AppMessage::decode(b"FT\x01\x63"),
            Err(DecodeError::BadKind(0x63))
        );
        assert_eq!(
            AppMessage::decode(b"FT\x01\x02\x01\x00"),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            AppMessage::decode(b"FT\x01\x01extra"),
            Err(DecodeError::Oversized)
        );
        assert_eq!(
            AppMessage::decode(b"FT\x01\x05\xff\xfe"),
            Err(DecodeError::BadText)
        );
        assert_eq!(
            AppMessage::decode(&[0u8; MAX_DATAGRAM + 1]),
            Err(DecodeError::Oversized)
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift generator keeps this test free of dependencies and deterministic.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = [0u8; 64];
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = usize::try_from(x % 64).expect("< 64");
            for (i, b) in buf.iter_mut().enumerate().take(len) {
                *b = (x >> (i % 8 * 8)).to_le_bytes()[0] ^ u8::try_from(i).expect("< 64");
            }
            if len >= 3 && x.is_multiple_of(3) {
                buf[0..3].copy_from_slice(b"FT\x01");
            }
            let _ = AppMessage::decode(&buf[..len]);
        }
    }
}
