//! The line protocol of the `kv` example server and its client `kvclient`: requests, replies,
//! their limits, a bounded line reader, and the values the client writes (derived from the key,
//! so that a verifier can check them). It owns no sockets and never allocates more than
//! [`MAX_LINE`] bytes for one line, whatever a peer sends.
//!
//! One request per line (`\n`, an optional `\r` before it is ignored), one reply line each:
//!
//! ```text
//! SET key value   → OK <seq>         durable as configured; seq numbers every write (SET, DEL)
//! GET key         → VALUE <value> | NONE
//! DEL key         → OK <seq>         durable like SET; deleting a missing key is fine
//! COUNT           → COUNT <n>
//! DIGEST          → DIGEST <16 hex>  FNV-1a over the table sorted by key
//! PING            → PONG primary | PONG standby
//! anything else   → ERR <why>        the connection stays usable
//! ```
//!
//! Verbs are case-insensitive. A key is 1..=[`MAX_KEY`] printable ASCII characters without
//! spaces; a value is the rest of the line after one space, 1..=[`MAX_VALUE`] bytes without
//! control characters (spaces allowed). A line longer than [`MAX_LINE`] is refused with
//! `ERR line too long` (and skipped up to its newline).

use std::io::{self, BufRead};

use crate::table::Fnv;

/// The longest request or reply line, without its newline.
pub const MAX_LINE: usize = 8192;
/// The longest key.
pub const MAX_KEY: usize = 250;
/// The longest value.
pub const MAX_VALUE: usize = 4096;

/// What a server is doing: serving (`primary`) or waiting to be promoted (`standby`, which
/// answers only `PING` and refuses everything else with `ERR standby`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves every request.
    Primary,
    /// Answers `PING` only.
    Standby,
}

impl Role {
    /// The word the protocol (and `FT_ROLE`) uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        }
    }

    /// Parses `primary` / `standby`.
    pub fn parse(word: &str) -> Option<Role> {
        match word {
            "primary" => Some(Role::Primary),
            "standby" => Some(Role::Standby),
            _ => None,
        }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `SET key value`.
    Set {
        /// The key.
        key: &'a [u8],
        /// The value.
        value: &'a [u8],
    },
    /// `GET key`.
    Get {
        /// The key.
        key: &'a [u8],
    },
    /// `DEL key`.
    Del {
        /// The key.
        key: &'a [u8],
    },
    /// `COUNT`.
    Count,
    /// `DIGEST`.
    Digest,
    /// `PING`.
    Ping,
}

impl Request<'_> {
    /// Whether the request changes the table.
    pub fn is_write(&self) -> bool {
        matches!(self, Request::Set { .. } | Request::Del { .. })
    }
}

/// Why a request line was refused (the text after `ERR `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The line is empty.
    #[error("empty request")]
    Empty,
    /// The verb is not one of the protocol's.
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    /// Arguments are missing or surplus.
    #[error("usage: {0}")]
    Usage(&'static str),
    /// The key is empty, too long or has characters other than printable ASCII.
    #[error("bad key: 1-{MAX_KEY} printable ASCII characters without spaces")]
    BadKey,
    /// The value is too long or has control characters.
    #[error("bad value: 1-{MAX_VALUE} bytes without control characters")]
    BadValue,
}

fn valid_key(key: &[u8]) -> bool {
    (1..=MAX_KEY).contains(&key.len()) && key.iter().all(|b| (0x21..=0x7e).contains(b))
}

fn valid_value(value: &[u8]) -> bool {
    (1..=MAX_VALUE).contains(&value.len()) && value.iter().all(|b| *b >= 0x20 && *b != 0x7f)
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request<'_>, ParseError> {
    let (verb, rest) = match line.iter().position(|b| *b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    if verb.is_empty() && rest.is_none() {
        return Err(ParseError::Empty);
    }
    let one_key = |usage: &'static str| -> Result<&[u8], ParseError> {
        let key = rest.ok_or(ParseError::Usage(usage))?;
        if key.contains(&b' ') {
            return Err(ParseError::Usage(usage));
        }
        if !valid_key(key) {
            return Err(ParseError::BadKey);
        }
        Ok(key)
    };
    let no_args = |usage: &'static str| match rest {
        None => Ok(()),
        Some(_) => Err(ParseError::Usage(usage)),
    };
    match verb.to_ascii_uppercase().as_slice() {
        b"SET" => {
            const USAGE: &str = "SET key value";
            let rest = rest.ok_or(ParseError::Usage(USAGE))?;
            let i = rest
                .iter()
                .position(|b| *b == b' ')
                .ok_or(ParseError::Usage(USAGE))?;
            let (key, value) = (&rest[..i], &rest[i + 1..]);
            if !valid_key(key) {
                return Err(ParseError::BadKey);
            }
            if !valid_value(value) {
                return Err(ParseError::BadValue);
            }
            Ok(Request::Set { key, value })
        }
        b"GET" => Ok(Request::Get {
            key: one_key("GET key")?,
        }),
        b"DEL" => Ok(Request::Del {
            key: one_key("DEL key")?,
        }),
        b"COUNT" => no_args("COUNT").map(|()| Request::Count),
        b"DIGEST" => no_args("DIGEST").map(|()| Request::Digest),
        b"PING" => no_args("PING").map(|()| Request::Ping),
        _ => Err(ParseError::UnknownCommand(
            String::from_utf8_lossy(&verb[..verb.len().min(MAX_KEY)]).into_owned(),
        )),
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK <seq>`: the write is done (and durable as configured).
    Ok(u64),
    /// `VALUE <value>`.
    Value(Vec<u8>),
    /// `NONE`: no such key.
    None,
    /// `COUNT <n>`.
    Count(u64),
    /// `DIGEST <hex>`.
    Digest(u64),
    /// `PONG <role>`.
    Pong(Role),
    /// `ERR <why>`.
    Err(String),
}

impl Reply {
    /// The reply line, with its newline.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = match self {
            Reply::Ok(seq) => format!("OK {seq}").into_bytes(),
            Reply::Value(v) => {
                let mut l = b"VALUE ".to_vec();
                l.extend_from_slice(v);
                l
            }
            Reply::None => b"NONE".to_vec(),
            Reply::Count(n) => format!("COUNT {n}").into_bytes(),
            Reply::Digest(d) => format!("DIGEST {d:016x}").into_bytes(),
            Reply::Pong(role) => format!("PONG {}", role.as_str()).into_bytes(),
            // A reason never breaks the line structure.
            Reply::Err(why) => format!("ERR {}", why.replace(['\n', '\r'], " ")).into_bytes(),
        };
        line.push(b'\n');
        line
    }

    /// Parses a reply line (without its newline); None when it is not one.
    pub fn parse(line: &[u8]) -> Option<Reply> {
        let (word, rest) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        let text = || rest.and_then(|r| std::str::from_utf8(r).ok());
        match (word, rest) {
            (b"OK", Some(_)) => text()?.parse().ok().map(Reply::Ok),
            (b"VALUE", Some(v)) => Some(Reply::Value(v.to_vec())),
            (b"NONE", None) => Some(Reply::None),
            (b"COUNT", Some(_)) => text()?.parse().ok().map(Reply::Count),
            (b"DIGEST", Some(_)) => u64::from_str_radix(text()?, 16).ok().map(Reply::Digest),
            (b"PONG", Some(_)) => Role::parse(text()?).map(Reply::Pong),
            (b"ERR", Some(_)) => Some(Reply::Err(String::from_utf8_lossy(rest?).into_owned())),
            _ => None,
        }
    }
}

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRead {
    /// A whole line is in the buffer (without `\n` and a trailing `\r`).
    Line,
    /// The line was longer than the limit: it was skipped up to and including its newline,
    /// and the buffer is empty.
    TooLong,
    /// End of the stream; a partial last line without its newline is dropped (a peer that went
    /// away mid-line did not finish its request).
    Eof,
}

/// Reads one line of at most `max` bytes into `buf` (cleared first), never buffering more.
pub fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<LineRead> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            buf.clear();
            return Ok(LineRead::Eof);
        }
        let (chunk, used, done) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (&avail[..i], i + 1, true),
            None => (avail, avail.len(), false),
        };
        if !too_long {
            if buf.len() + chunk.len() <= max {
                buf.extend_from_slice(chunk);
            } else {
                too_long = true;
                buf.clear();
            }
        }
        r.consume(used);
        if done {
            break;
        }
    }
    if too_long {
        return Ok(LineRead::TooLong);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(LineRead::Line)
}

/// The key `kvclient write` uses for write number `i`.
pub fn key_name(i: u64) -> String {
    format!("k{i}")
}

/// The value `kvclient write` stores under `key`: a function of the key alone, so that
/// `kvclient verify` checks it without a record of what was written.
pub fn value_for(key: &str) -> String {
    let mut h = Fnv::default();
    h.bytes(key.as_bytes());
    format!("v-{key}-{:016x}", h.0)
}

/// FNV-1a over `(key, value)` pairs sorted by key: what `DIGEST` answers, equal on two
/// replicas holding the same table whatever their histories.
pub fn sorted_digest<'a>(entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> u64 {
    let mut all: Vec<(&[u8], &[u8])> = entries.into_iter().collect();
    all.sort_unstable();
    let mut h = Fnv::default();
    for (k, v) in all {
        h.u64(k.len() as u64);
        h.bytes(k);
        h.u64(v.len() as u64);
        h.bytes(v);
    }
    h.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(b"SET k1 hello world"),
            Ok(Request::Set {
                key: b"k1",
                value: b"hello world"
            })
        );
        assert_eq!(parse_request(b"get k1"), Ok(Request::Get { key: b"k1" }));
        assert_eq!(parse_request(b"DEL k1"), Ok(Request::Del { key: b"k1" }));
        assert_eq!(parse_request(b"COUNT"), Ok(Request::Count));
        assert_eq!(parse_request(b"DIGEST"), Ok(Request::Digest));
        assert_eq!(parse_request(b"ping"), Ok(Request::Ping));
    }

    #[test]
    fn bad_requests_say_why() {
        assert_eq!(parse_request(b""), Err(ParseError::Empty));
        assert!(matches!(
            parse_request(b"FROB x"),
            Err(ParseError::UnknownCommand(_))
        ));
        assert_eq!(
            parse_request(b"SET k1"),
            Err(ParseError::Usage("SET key value"))
        );
        assert_eq!(parse_request(b"SET k1 "), Err(ParseError::BadValue));
        assert_eq!(parse_request(b"SET  v"), Err(ParseError::BadKey));
        assert_eq!(parse_request(b"SET k v\x01"), Err(ParseError::BadValue));
        assert_eq!(parse_request(b"GET"), Err(ParseError::Usage("GET key")));
        assert_eq!(parse_request(b"GET a b"), Err(ParseError::Usage("GET key")));
        assert_eq!(parse_request(b"GET k\xff"), Err(ParseError::BadKey));
        assert_eq!(parse_request(b"PING x"), Err(ParseError::Usage("PING")));
        let long_key = vec![b'k'; MAX_KEY + 1];
        let mut line = b"GET ".to_vec();
        line.extend_from_slice(&long_key);
        assert_eq!(parse_request(&line), Err(ParseError::BadKey));
        let mut line = b"SET k ".to_vec();
        line.extend(std::iter::repeat_n(b'v', MAX_VALUE + 1));
        assert_eq!(parse_request(&line), Err(ParseError::BadValue));
    }

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply::Ok(7),
            Reply::Value(b"a b c".to_vec()),
            Reply::None,
            Reply::Count(3),
            Reply::Digest(0xdead_beef),
            Reply::Pong(Role::Primary),
            Reply::Pong(Role::Standby),
            Reply::Err("standby".into()),
        ] {
            let line = r.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(Reply::parse(&line[..line.len() - 1]), Some(r));
        }
        assert_eq!(Reply::parse(b"OK x"), None);
        assert_eq!(Reply::parse(b"garbage"), None);
        assert_eq!(
            Reply::Err("two\nlines".into()).to_line(),
            b"ERR two lines\n".to_vec()
        );
    }

    #[test]
    fn lines_are_bounded() {
        let input = b"PING\r\nxxxxxxxxxxxxxxxxxxxx\nGET k\npartial".to_vec();
        let mut r = io::BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf, 10).ok(), Some(LineRead::Line));
        assert_eq!(buf, b"PING");
        assert_eq!(
            read_line(&mut r, &mut buf, 10).ok(),
            Some(LineRead::TooLong)
        );
        assert!(buf.is_empty());
        assert_eq!(read_line(&mut r, &mut buf, 10).ok(), Some(LineRead::Line));
        assert_eq!(buf, b"GET k");
        assert_eq!(read_line(&mut r, &mut buf, 10).ok(), Some(LineRead::Eof));
    }

    #[test]
    fn digest_ignores_order_and_values_depend_on_keys() {
        let a = sorted_digest([(&b"a"[..], &b"1"[..]), (b"b", b"2")]);
        let b = sorted_digest([(&b"b"[..], &b"2"[..]), (b"a", b"1")]);
        assert_eq!(a, b);
        assert_ne!(a, sorted_digest([(&b"a"[..], &b"1"[..])]));
        assert_ne!(value_for("k1"), value_for("k2"));
        assert_eq!(value_for("k1"), value_for(&key_name(1)));
    }
}
