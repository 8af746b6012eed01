//! kv's write log: the record format and the scan that replays it. Every write is one record
//! `[magic u32][len u32][crc32c u32][payload: seq u64, op u8, klen u32, key, value]` (little
//! endian; the checksum covers `len` and the payload). A scan stops at the first record that is
//! short, oversized, malformed or fails its checksum — what a crash in the middle of an append
//! leaves — and reports where the valid records end; it never buffers more than one valid record's
//! size, whatever the file holds.

use std::io::{self, Read};

use ftkit_examples::kvproto::{MAX_KEY, MAX_VALUE};

/// The log's file name inside the data directory.
pub const LOG_FILE: &str = "kv.log";
/// Starts every record.
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KVL1");
/// magic + len + crc.
const HEADER_LEN: usize = 12;
/// seq + op + klen.
const MIN_PAYLOAD: usize = 13;
/// The largest payload a valid record has.
const MAX_PAYLOAD: usize = MIN_PAYLOAD + MAX_KEY + MAX_VALUE;
const OP_SET: u8 = 1;
const OP_DEL: u8 = 2;

/// A change of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Set {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Remove `key`.
    Del {
        /// The key.
        key: Vec<u8>,
    },
}

/// One record: the write's sequence number and its change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Numbers every write, from 1.
    pub seq: u64,
    /// The change.
    pub op: Op,
}

/// The bytes of one record.
pub fn encode(record: &Record) -> Vec<u8> {
    let (op, key, value): (u8, &[u8], &[u8]) = match &record.op {
        Op::Set { key, value } => (OP_SET, key, value),
        Op::Del { key } => (OP_DEL, key, &[]),
    };
    let mut payload = Vec::with_capacity(MIN_PAYLOAD + key.len() + value.len());
    payload.extend_from_slice(&record.seq.to_le_bytes());
    payload.push(op);
    // Keys are at most MAX_KEY bytes (the protocol refuses longer ones).
    payload.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
    payload.extend_from_slice(key);
    payload.extend_from_slice(value);
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode_payload(payload: &[u8]) -> Result<Record, String> {
    let field = |at: usize, n: usize| payload.get(at..at + n).ok_or("short payload");
    let seq = u64::from_le_bytes(field(0, 8)?.try_into().map_err(|_| "short seq")?);
    let op = field(8, 1)?[0];
    let klen = u32::from_le_bytes(field(9, 4)?.try_into().map_err(|_| "short klen")?);
    let klen = usize::try_from(klen).map_err(|_| "key length overflows")?;
    if klen == 0 || klen > MAX_KEY {
        return Err(format!("key length {klen}"));
    }
    let key = field(MIN_PAYLOAD, klen)?.to_vec();
    let value = &payload[MIN_PAYLOAD + klen..];
    let op = match op {
        OP_SET if !value.is_empty() => Op::Set {
            key,
            value: value.to_vec(),
        },
        OP_DEL if value.is_empty() => Op::Del { key },
        other => {
            return Err(format!(
                "operation {other} with a {}-byte value",
                value.len()
            ));
        }
    };
    Ok(Record { seq, op })
}

/// Where a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEnd {
    /// The offset just after the last valid record.
    pub valid_end: u64,
    /// Records read.
    pub records: u64,
    /// Why the bytes after `valid_end` were ignored (none: the file ends there).
    pub torn: Option<String>,
}

/// Reads records from `r`, which is positioned at file offset `start`, calling
/// `apply(record, end_offset)` for each valid one, until the end of the file or the first bad
/// record. An error of `apply` stops the scan and is returned as is.
pub fn scan<E: From<io::Error>>(
    r: &mut impl Read,
    start: u64,
    mut apply: impl FnMut(Record, u64) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    let mut end = ScanEnd {
        valid_end: start,
        records: 0,
        torn: None,
    };
    let mut payload = Vec::new();
    loop {
        let mut header = [0u8; HEADER_LEN];
        match read_full(r, &mut header)? {
            0 => return Ok(end),
            n if n < HEADER_LEN => {
                end.torn = Some(format!("a {n}-byte partial record header"));
                return Ok(end);
            }
            _ => {}
        }
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (magic, len, crc) = (word(0), word(4), word(8));
        if magic != RECORD_MAGIC {
            end.torn = Some(format!("bad record magic {magic:#010x}"));
            return Ok(end);
        }
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len_usize) {
            end.torn = Some(format!("a record length of {len} bytes"));
            return Ok(end);
        }
        payload.resize(len_usize, 0);
        let got = read_full(r, &mut payload)?;
        if got < len_usize {
            end.torn = Some(format!("a record cut after {got} of its {len} bytes"));
            return Ok(end);
        }
        if crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), &payload) != crc {
            end.torn = Some("a record failing its checksum".to_owned());
            return Ok(end);
        }
        let record = match decode_payload(&payload) {
            Ok(r) => r,
            Err(why) => {
                end.torn = Some(format!("a malformed record ({why})"));
                return Ok(end);
            }
        };
        let next = end.valid_end + (HEADER_LEN + len_usize) as u64;
        apply(record, next)?;
        end.valid_end = next;
        end.records += 1;
    }
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(seq: u64, k: &str, v: &str) -> Record {
        Record {
            seq,
            op: Op::Set {
                key: k.into(),
                value: v.into(),
            },
        }
    }

    fn scan_all(bytes: &[u8], start: u64) -> (Vec<(Record, u64)>, ScanEnd) {
        let mut got = Vec::new();
        let end = scan::<io::Error>(&mut &bytes[..], start, |r, at| {
            got.push((r, at));
            Ok(())
        })
        .expect("reading a slice cannot fail");
        (got, end)
    }

    #[test]
    fn records_round_trip() {
        let records = [
            set(1, "a", "one"),
            Record {
                seq: 2,
                op: Op::Del { key: "a".into() },
            },
            set(3, "b", "two words"),
        ];
        let bytes: Vec<u8> = records.iter().flat_map(encode).collect();
        let (got, end) = scan_all(&bytes, 100);
        assert_eq!(
            got.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
            records
        );
        assert_eq!(end.valid_end, 100 + bytes.len() as u64);
        assert_eq!(got.last().map(|(_, at)| *at), Some(end.valid_end));
        assert_eq!(end.records, 3);
        assert_eq!(end.torn, None);
    }

    #[test]
    fn a_torn_tail_is_found_at_every_cut() {
        let first = encode(&set(1, "a", "one"));
        let second = encode(&set(2, "b", "two"));
        let whole: Vec<u8> = first.iter().chain(&second).copied().collect();
        for cut in first.len() + 1..whole.len() {
            let (got, end) = scan_all(&whole[..cut], 0);
            assert_eq!(got.len(), 1, "cut at {cut}");
            assert_eq!(end.valid_end, first.len() as u64);
            assert!(end.torn.is_some(), "cut at {cut}");
        }
    }

    #[test]
    fn garbage_and_flipped_bits_stop_the_scan() {
        let rec = encode(&set(1, "a", "one"));
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            let (got, end) = scan_all(&bad, 0);
            assert!(got.is_empty(), "flipped byte {i} was accepted");
            assert_eq!(end.valid_end, 0);
        }
        let zeros = vec![0u8; 64];
        let (got, end) = scan_all(&zeros, 0);
        assert!(got.is_empty());
        assert!(end.torn.is_some());
        let mut huge = RECORD_MAGIC.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 4]);
        let (_, end) = scan_all(&huge, 0);
        assert!(end.torn.is_some_and(|t| t.contains("length")));
    }
}
