//! Frames and the envelope: the one place that turns messages into bytes on the wire and back
//! (length prefix, size limit, version stamp, MessagePack). It never interprets a body beyond
//! decoding it into the type the caller asks for, and never panics on what a peer sent.

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

use super::PROTOCOL_VERSION;
use super::error::NetError;

/// Bytes of the big-endian length prefix.
pub(crate) const LEN_PREFIX: usize = 4;
/// MessagePack marker of a two-element array: the envelope `[version, body]`.
const ENVELOPE_MARKER: u8 = 0x92;
/// MessagePack markers of the unsigned integer forms.
const POSITIVE_FIXINT_MAX: u8 = 0x7f;
const UINT8: u8 = 0xcc;
const UINT16: u8 = 0xcd;
const UINT32: u8 = 0xce;
const UINT64: u8 = 0xcf;

/// Length-prefixed frames whose contents are envelopes. Decoding yields a frame's bytes (the
/// envelope); encoding writes a whole frame straight into the output buffer.
#[derive(Debug, Clone)]
pub(crate) struct FrameCodec {
    max_frame: usize,
    version: u16,
}

impl FrameCodec {
    pub(crate) fn new(max_frame: usize) -> FrameCodec {
        FrameCodec {
            max_frame,
            version: PROTOCOL_VERSION,
        }
    }

    pub(crate) fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// A codec that stamps another version: only tests play a peer of another version.
    #[cfg(test)]
    pub(crate) fn with_version(mut self, version: u16) -> FrameCodec {
        self.version = version;
        self
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = NetError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, NetError> {
        let &[a, b, c, d, ..] = &src[..] else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]);
        let body_len = match usize::try_from(len) {
            Ok(n) if n <= self.max_frame => n,
            _ => {
                return Err(NetError::FrameTooLarge {
                    len: u64::from(len),
                    max: self.max_frame,
                });
            }
        };
        let total = LEN_PREFIX + body_len;
        if src.len() < total {
            // The limit was checked above, so a peer can make us reserve at most max_frame.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        Ok(Some(src.split_to(body_len)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, NetError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let need = match &src[..] {
            &[a, b, c, d, ..] => {
                let len = u32::from_be_bytes([a, b, c, d]);
                usize::try_from(len).map_or(usize::MAX, |n| n.saturating_add(LEN_PREFIX))
            }
            _ => LEN_PREFIX,
        };
        Err(NetError::Truncated {
            have: src.len(),
            need,
        })
    }
}

impl<T: Serialize + ?Sized> Encoder<&T> for FrameCodec {
    type Error = NetError;

    fn encode(&mut self, item: &T, dst: &mut BytesMut) -> Result<(), NetError> {
        let start = dst.len();
        dst.put_u32(0);
        put_envelope_head(dst, self.version);
        if let Err(e) = rmp_serde::encode::write(&mut (&mut *dst).writer(), item) {
            dst.truncate(start);
            return Err(e.into());
        }
        let body_len = dst.len() - start - LEN_PREFIX;
        let prefix = match u32::try_from(body_len) {
            Ok(n) if body_len <= self.max_frame => n,
            _ => {
                // Nothing of this frame leaves: the connection stays usable for smaller ones.
                dst.truncate(start);
                return Err(NetError::FrameTooLarge {
                    len: u64::try_from(body_len).unwrap_or(u64::MAX),
                    max: self.max_frame,
                });
            }
        };
        dst[start..start + LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
        Ok(())
    }
}

fn put_envelope_head(dst: &mut BytesMut, version: u16) {
    dst.put_u8(ENVELOPE_MARKER);
    match u8::try_from(version) {
        Ok(v) if v <= POSITIVE_FIXINT_MAX => dst.put_u8(v),
        Ok(v) => {
            dst.put_u8(UINT8);
            dst.put_u8(v);
        }
        Err(_) => {
            dst.put_u8(UINT16);
            dst.put_u16(version);
        }
    }
}

/// Splits a frame into the envelope's version and the body's bytes.
pub(crate) fn open_envelope(frame: &[u8]) -> Result<(u16, &[u8]), NetError> {
    let malformed = |detail: &str| NetError::Malformed {
        what: "envelope",
        detail: detail.to_owned(),
    };
    let Some((&marker, rest)) = frame.split_first() else {
        return Err(malformed("empty frame"));
    };
    if marker != ENVELOPE_MARKER {
        return Err(malformed("not a two-element array"));
    }
    let (version, body): (u64, &[u8]) = match *rest {
        [v, ref body @ ..] if v <= POSITIVE_FIXINT_MAX => (u64::from(v), body),
        [UINT8, v, ref body @ ..] => (u64::from(v), body),
        [UINT16, a, b, ref body @ ..] => (u64::from(u16::from_be_bytes([a, b])), body),
        [UINT32, a, b, c, d, ref body @ ..] => (u64::from(u32::from_be_bytes([a, b, c, d])), body),
        [UINT64, a, b, c, d, e, f, g, h, ref body @ ..] => {
            (u64::from_be_bytes([a, b, c, d, e, f, g, h]), body)
        }
        _ => return Err(malformed("the version is not an unsigned integer")),
    };
    let version =
        u16::try_from(version).map_err(|_| malformed("the version does not fit 16 bits"))?;
    if body.is_empty() {
        return Err(malformed("no body"));
    }
    Ok((version, body))
}

/// Decodes one message body (the second element of an envelope) into `T`; bytes left over
/// after the message are an error, not ignored. Public so that a receiver that keeps bodies
/// as bytes (see [`crate::net::ConnReceiver::recv_body`]) decodes them the same way.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, NetError> {
    // From the slice: byte strings are copied once, straight into the value.
    let value: T = rmp_serde::from_slice(body)?;
    match msgpack_value_len(body) {
        Some(len) if len == body.len() => Ok(value),
        Some(len) => Err(NetError::Malformed {
            what: "message",
            detail: format!("{} bytes follow the message", body.len() - len),
        }),
        // rmp-serde decoded what this walk finds incomplete: refuse rather than guess.
        None => Err(NetError::Malformed {
            what: "message",
            detail: "not one complete MessagePack value".into(),
        }),
    }
}

/// The length in bytes of the MessagePack value at the start of `buf`, or `None` if `buf` ends
/// inside it or holds the reserved marker. Iterative (a count of values still to skip), so
/// nesting depth costs nothing, and every step consumes at least one byte, so a header that
/// announces billions of elements ends at the end of `buf`.
pub(crate) fn msgpack_value_len(buf: &[u8]) -> Option<usize> {
    let uint = |at: usize, width: usize| -> Option<u64> {
        let bytes = buf.get(at..at.checked_add(width)?)?;
        Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    let mut pos = 0usize;
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let marker = *buf.get(pos)?;
        // (bytes of the header, bytes of payload, values nested inside)
        let (head, payload, nested): (usize, u64, u64) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (1, 0, 0),
            0x80..=0x8f => (1, 0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (1, 0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (1, u64::from(marker & 0x1f), 0),
            0xc1 => return None,
            0xc4 | 0xd9 => (2, uint(pos + 1, 1)?, 0),
            0xc5 | 0xda => (3, uint(pos + 1, 2)?, 0),
            0xc6 | 0xdb => (5, uint(pos + 1, 4)?, 0),
            0xc7 => (3, uint(pos + 1, 1)?, 0),
            0xc8 => (4, uint(pos + 1, 2)?, 0),
            0xc9 => (6, uint(pos + 1, 4)?, 0),
            0xca => (5, 0, 0),
            0xcb => (9, 0, 0),
            0xcc | 0xd0 => (2, 0, 0),
            0xcd | 0xd1 => (3, 0, 0),
            0xce | 0xd2 => (5, 0, 0),
            0xcf | 0xd3 => (9, 0, 0),
            0xd4 => (3, 0, 0),
            0xd5 => (4, 0, 0),
            0xd6 => (6, 0, 0),
            0xd7 => (10, 0, 0),
            0xd8 => (18, 0, 0),
            0xdc => (3, 0, uint(pos + 1, 2)?),
            0xdd => (5, 0, uint(pos + 1, 4)?),
            0xde => (3, 0, 2 * uint(pos + 1, 2)?),
            0xdf => (5, 0, 2 * uint(pos + 1, 4)?),
        };
        pos = pos
            .checked_add(head)?
            .checked_add(usize::try_from(payload).ok()?)?;
        if pos > buf.len() {
            return None;
        }
        pending = pending.checked_add(nested)?;
    }
    Some(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of<T: Serialize + ?Sized>(codec: &mut FrameCodec, item: &T) -> BytesMut {
        let mut buf = BytesMut::new();
        codec.encode(item, &mut buf).expect("encodes");
        buf
    }

    #[test]
    fn round_trip_through_frame_and_envelope() {
        let mut codec = FrameCodec::new(1024);
        let msg = (7u32, "hello".to_owned(), vec![1u8, 2, 3]);
        let mut buf = frame_of(&mut codec, &msg);
        let frame = codec.decode(&mut buf).expect("valid").expect("complete");
        assert!(buf.is_empty());
        let (version, body) = open_envelope(&frame).expect("envelope");
        assert_eq!(version, PROTOCOL_VERSION);
        let back: (u32, String, Vec<u8>) = decode_body(body).expect("body");
        assert_eq!(back, msg);
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut codec = FrameCodec::new(1024);
        let whole = frame_of(&mut codec, &"abcdef");
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert!(
                codec.decode(&mut buf).expect("no error").is_none(),
                "cut {cut}"
            );
            let err = codec.decode_eof(&mut buf).map(|_| ());
            if cut == 0 {
                assert!(err.is_ok());
            } else {
                assert!(
                    matches!(err, Err(NetError::Truncated { have, .. }) if have == cut),
                    "cut {cut}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn oversized_frames_are_refused_on_both_ends() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::new();
        buf.put_u32(17);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(NetError::FrameTooLarge { len: 17, max: 16 })
        ));
        let mut out = BytesMut::from(&b"keep"[..]);
        let err = codec.encode(&vec![0u8; 64], &mut out);
        assert!(matches!(err, Err(NetError::FrameTooLarge { max: 16, .. })));
        assert_eq!(&out[..], b"keep", "a refused frame leaves nothing behind");
    }

    #[test]
    fn versions_in_every_unsigned_form_are_read() {
        for (bytes, version) in [
            (&[0x92, 0x05, 0xc0][..], 5u16),
            (&[0x92, 0xcc, 0xfe, 0xc0][..], 254),
            (&[0x92, 0xcd, 0x01, 0x00, 0xc0][..], 256),
            (&[0x92, 0xce, 0, 0, 0, 2, 0xc0][..], 2),
            (&[0x92, 0xcf, 0, 0, 0, 0, 0, 0, 0, 3, 0xc0][..], 3),
        ] {
            assert_eq!(open_envelope(bytes).expect("valid").0, version);
        }
        for bad in [
            &[][..],
            &[0x91, 0x01, 0xc0][..],
            &[0x92][..],
            &[0x92, 0x01][..],
            &[0x92, 0xce, 0, 1, 0, 0, 0xc0][..],
            &[0x92, 0xa1, b'x', 0xc0][..],
        ] {
            assert!(
                matches!(open_envelope(bad), Err(NetError::Malformed { .. })),
                "{bad:?}"
            );
        }
        let mut codec = FrameCodec::new(64).with_version(300);
        let mut buf = frame_of(&mut codec, &1u8);
        let frame = codec.decode(&mut buf).expect("valid").expect("complete");
        assert_eq!(open_envelope(&frame).expect("valid").0, 300);
    }

    #[test]
    fn value_lengths_match_what_rmp_serde_writes() {
        #[derive(Serialize)]
        struct Sample {
            a: Option<i64>,
            b: f32,
            c: f64,
            #[serde(with = "serde_bytes")]
            d: Vec<u8>,
            e: Vec<(String, i8)>,
            f: std::collections::BTreeMap<u32, bool>,
            g: (),
        }
        for n in [0usize, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536] {
            let sample = Sample {
                a: (n % 2 == 0).then_some(-(i64::try_from(n).expect("small")) * 1_000_000_007),
                b: 1.5,
                c: -2.25,
                d: vec![3; n],
                e: (0..n.min(300))
                    .map(|i| {
                        (
                            "s".repeat(i % 40),
                            i8::try_from(i % 100).expect("small") - 50,
                        )
                    })
                    .collect(),
                f: (0..u32::try_from(n.min(40)).expect("small"))
                    .map(|i| (i * 70_000, i % 3 == 0))
                    .collect(),
                g: (),
            };
            let bytes = rmp_serde::to_vec(&sample).expect("encodes");
            assert_eq!(msgpack_value_len(&bytes), Some(bytes.len()), "n = {n}");
            assert_eq!(
                msgpack_value_len(&bytes[..bytes.len() - 1]),
                None,
                "n = {n}"
            );
        }
        // Huge announced lengths end at the end of the buffer.
        assert_eq!(
            msgpack_value_len(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]),
            None
        );
        assert_eq!(msgpack_value_len(&[0xc6, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(msgpack_value_len(&[0xc1]), None);
        // Deep nesting needs no stack.
        let mut deep = vec![0x91; 1_000_000];
        deep.push(0xc0);
        assert_eq!(msgpack_value_len(&deep), Some(deep.len()));
    }

    #[test]
    fn trailing_bytes_after_a_body_are_an_error() {
        assert_eq!(decode_body::<u8>(&[0x05]).expect("valid"), 5);
        assert!(matches!(
            decode_body::<u8>(&[0x05, 0x06]),
            Err(NetError::Malformed { .. })
        ));
    }
}
