//! Wire format: a fixed 64-byte little-endian header followed by a payload.
//!
//! The header is a `zerocopy` struct, so encoding is a copy of the struct's bytes and decoding is a
//! bounds-checked cast. Decoding is total: every byte string yields a [`Frame`] or a typed
//! [`FrameError`], never a panic, and never an allocation sized by an untrusted length field (the
//! length is checked against [`MAX_FRAME_PAYLOAD`] before anything is reserved).
//!
//! ```text
//!  0  magic "AF"      2  version   3  kind     4  flags (u16)
//!  6  class|priority  7  msg flags 8  channel (u32)        12 payload length (u32)
//! 16  seq (u64)      24  ack (u64)          32  credit (u64)
//! 40  offset (u64)   48  tag (u64)          56  timestamp (u32)   60  timestamp echo (u32)
//! ```

use bytes::Bytes;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::class::{Class, Priority};

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 64;
/// The two magic bytes that open every frame ("AF").
pub const MAGIC: [u8; 2] = *b"AF";
/// Wire protocol version spoken by this build (3: named channels and channel refusal, the
/// message flags [`MSG_NAMED`] and [`MSG_REFUSE`]).
pub const VERSION: u8 = 3;
/// Hard upper bound on one frame's payload. Messages larger than this are fragmented; a header
/// that claims more is rejected before any memory is reserved for it.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Opens or resumes a session (first frame of a connection, initiator to acceptor).
    Hello = 1,
    /// The acceptor's answer to [`Kind::Hello`].
    HelloAck = 2,
    /// A chunk of a message on a channel; also carries the ack and credit of the reverse direction.
    Data = 3,
    /// Acknowledgement and credit for one channel, with no data.
    Ack = 4,
    /// Keepalive probe; answered by [`Kind::Pong`].
    Ping = 5,
    /// Answer to [`Kind::Ping`].
    Pong = 6,
    /// The session is being closed; the payload is a UTF-8 reason.
    Close = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Data,
            4 => Kind::Ack,
            5 => Kind::Ping,
            6 => Kind::Pong,
            7 => Kind::Close,
            _ => return None,
        })
    }
}

/// Frame flag: first chunk of a message.
pub const FLAG_FIRST: u16 = 1 << 0;
/// Frame flag: last chunk of a message.
pub const FLAG_LAST: u16 = 1 << 1;
/// Frame flag (Hello): the initiator asks to resume the session named by `tag`.
pub const FLAG_RESUME: u16 = 1 << 2;
/// Frame flag (HelloAck): the acceptor resumed the session.
pub const FLAG_RESUMED: u16 = 1 << 3;
/// Frame flag (HelloAck): the acceptor does not know the session the initiator asked to resume.
pub const FLAG_UNKNOWN_SESSION: u16 = 1 << 4;
/// Frame flag (Data): the chunk is a retransmission (statistics only).
pub const FLAG_RETRANSMIT: u16 = 1 << 5;
const KNOWN_FLAGS: u16 = (1 << 6) - 1;

/// Message flag: the message is a request; `tag` is its request id.
pub const MSG_REQUEST: u8 = 1 << 0;
/// Message flag: the message is the response to the request whose id is `tag`.
pub const MSG_RESPONSE: u8 = 1 << 1;
/// Message flag: the response reports a failure of the handler; the body is a UTF-8 reason.
pub const MSG_ERROR: u8 = 1 << 2;
/// Message flag: the channel has a name, carried in front of the payload of the first chunk of
/// the channel's first message (offset 0) as `[u8 len][len bytes of UTF-8]`, 1 to
/// [`MAX_CHANNEL_NAME`] bytes (see [`name_prefix`] and [`split_name`]). The receiver strips it
/// before the message is assembled; the prefix counts in the chunk's length, offsets and
/// credit. Set on that chunk only.
pub const MSG_NAMED: u8 = 1 << 3;
/// Message flag: the side that accepted the channel refuses it (its application dropped the
/// channel, never took it, or refused it). The message's body is the UTF-8 reason, at most
/// [`MAX_REFUSAL_REASON`] bytes; it is the last message of that direction of the channel. Only
/// the side that did not open the channel sends it.
pub const MSG_REFUSE: u8 = 1 << 4;
const KNOWN_MSG_FLAGS: u8 = (1 << 5) - 1;

/// Longest channel name, in bytes of UTF-8.
pub const MAX_CHANNEL_NAME: usize = 64;
/// Longest reason carried by a [`MSG_REFUSE`] message, in bytes (a longer one is cut at a
/// character boundary by the sender).
pub const MAX_REFUSAL_REASON: usize = 256;

/// Why a channel name cannot be used: empty, longer than [`MAX_CHANNEL_NAME`] bytes.
pub fn check_channel_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CHANNEL_NAME {
        return Err(format!(
            "a channel name is 1 to {MAX_CHANNEL_NAME} bytes of UTF-8; this one is {} bytes",
            name.len()
        ));
    }
    Ok(())
}

/// The prefix a named channel's first chunk starts with: `[u8 len][name]`. `name` must pass
/// [`check_channel_name`].
pub fn name_prefix(name: &str) -> Bytes {
    debug_assert!(check_channel_name(name).is_ok(), "{name:?} was not checked");
    let mut v = Vec::with_capacity(1 + name.len());
    v.push(name.len() as u8);
    v.extend_from_slice(name.as_bytes());
    Bytes::from(v)
}

/// Splits the payload of a chunk flagged [`MSG_NAMED`] into the channel's name and the rest of
/// the payload (zero-copy). Total: `None` when the prefix is truncated, empty, longer than
/// [`MAX_CHANNEL_NAME`] or not UTF-8.
pub fn split_name(payload: &Bytes) -> Option<(String, Bytes)> {
    let len = usize::from(*payload.first()?);
    if len == 0 || len > MAX_CHANNEL_NAME || payload.len() < 1 + len {
        return None;
    }
    let name = std::str::from_utf8(&payload[1..1 + len]).ok()?.to_owned();
    Some((name, payload.slice(1 + len..)))
}

/// `reason` cut to at most [`MAX_REFUSAL_REASON`] bytes, at a character boundary.
pub fn refusal_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REFUSAL_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// The fixed-layout header as it is on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RawHeader {
    magic: [u8; 2],
    version: u8,
    kind: u8,
    flags: U16,
    class_prio: u8,
    msg_flags: u8,
    channel: U32,
    len: U32,
    seq: U64,
    ack: U64,
    credit: U64,
    offset: U64,
    tag: U64,
    ts: U32,
    ts_echo: U32,
}

const _: () = assert!(core::mem::size_of::<RawHeader>() == HEADER_LEN);

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: Kind,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Class of the channel (meaningful on Data frames).
    pub class: Class,
    /// Priority of the channel within its class (meaningful on Data frames).
    pub priority: Priority,
    /// `MSG_*` bits of the message (meaningful on the first chunk).
    pub msg_flags: u8,
    /// Channel id.
    pub channel: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Chunk sequence number within the channel's direction (Data), or ping id (Ping/Pong).
    pub seq: u64,
    /// Cumulative ack for the reverse direction: every chunk with a lower sequence was received.
    pub ack: u64,
    /// Flow-control limit for the reverse direction: the peer may send up to this byte offset.
    pub credit: u64,
    /// Byte offset of this chunk within the channel's direction.
    pub offset: u64,
    /// Message tag (request id for requests and responses; session id in Hello).
    pub tag: u64,
    /// Sender's clock in microseconds (wrapping), for RTT measurement.
    pub ts: u32,
    /// Echo of the peer's `ts`, advanced by how long the echo was held, or 0 for none.
    pub ts_echo: u32,
}

impl Header {
    /// A header of the given kind with every other field zero.
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            class: Class::Coordination,
            priority: Priority::DEFAULT,
            msg_flags: 0,
            channel: 0,
            len: 0,
            seq: 0,
            ack: 0,
            credit: 0,
            offset: 0,
            tag: 0,
            ts: 0,
            ts_echo: 0,
        }
    }

    /// Encodes the header into its 64 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let raw = RawHeader {
            magic: MAGIC,
            version: VERSION,
            kind: self.kind as u8,
            flags: U16::new(self.flags),
            class_prio: ((self.class as u8) << 4) | self.priority.get(),
            msg_flags: self.msg_flags,
            channel: U32::new(self.channel),
            len: U32::new(self.len),
            seq: U64::new(self.seq),
            ack: U64::new(self.ack),
            credit: U64::new(self.credit),
            offset: U64::new(self.offset),
            tag: U64::new(self.tag),
            ts: U32::new(self.ts),
            ts_echo: U32::new(self.ts_echo),
        };
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes and validates a header from the first [`HEADER_LEN`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Header, FrameError> {
        let (raw, _) = RawHeader::ref_from_prefix(buf).map_err(|_| FrameError::Truncated {
            needed: HEADER_LEN,
            got: buf.len(),
        })?;
        if raw.magic != MAGIC {
            return Err(FrameError::BadMagic([raw.magic[0], raw.magic[1]]));
        }
        if raw.version != VERSION {
            return Err(FrameError::UnsupportedVersion(raw.version));
        }
        let kind = Kind::from_u8(raw.kind).ok_or(FrameError::UnknownKind(raw.kind))?;
        let flags = raw.flags.get();
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        if raw.msg_flags & !KNOWN_MSG_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(u16::from(raw.msg_flags)));
        }
        let class =
            Class::from_u8(raw.class_prio >> 4).ok_or(FrameError::BadClass(raw.class_prio))?;
        let priority =
            Priority::new(raw.class_prio & 0x0f).ok_or(FrameError::BadClass(raw.class_prio))?;
        let len = raw.len.get();
        if len as usize > MAX_FRAME_PAYLOAD {
            return Err(FrameError::PayloadTooLarge {
                len: u64::from(len),
                max: MAX_FRAME_PAYLOAD,
            });
        }
        Ok(Header {
            kind,
            flags,
            class,
            priority,
            msg_flags: raw.msg_flags,
            channel: raw.channel.get(),
            len,
            seq: raw.seq.get(),
            ack: raw.ack.get(),
            credit: raw.credit.get(),
            offset: raw.offset.get(),
            tag: raw.tag.get(),
            ts: raw.ts.get(),
            ts_echo: raw.ts_echo.get(),
        })
    }
}

/// Total length (header and payload) of the frame that starts at `buf`, once its header is
/// complete. Stream transports use it to cut frames out of a byte stream; it validates the header
/// so a bad length is refused before any buffer is sized by it.
pub fn frame_len(buf: &[u8]) -> Result<usize, FrameError> {
    let h = Header::decode(buf)?;
    Ok(HEADER_LEN + h.len as usize)
}

/// Cuts the whole frames at the front of a stream transport's receive buffer into `out`;
/// `split(buf, n)` takes the first `n` bytes off as one frame's buffer (zero-copy for `Bytes` and
/// `BytesMut`). Returns how many bytes the buffer must hold for the frame at its front to be
/// complete (`HEADER_LEN` while its header is incomplete). A wrong magic is refused as soon as
/// its two bytes are in, not after a whole header; a bad header before anything is sized by its
/// length. Frames cut before an error stay in `out`.
pub fn cut_frames<B: AsRef<[u8]>>(
    buf: &mut B,
    split: impl Fn(&mut B, usize) -> Bytes,
    out: &mut Vec<Frame>,
) -> Result<usize, FrameError> {
    loop {
        let b = buf.as_ref();
        if b.len() >= MAGIC.len() && b[..MAGIC.len()] != MAGIC {
            return Err(FrameError::BadMagic([b[0], b[1]]));
        }
        if b.len() < HEADER_LEN {
            return Ok(HEADER_LEN);
        }
        let len = frame_len(b)?;
        if b.len() < len {
            return Ok(len);
        }
        out.push(Frame::decode(split(buf, len))?);
    }
}

/// Which lane of a transport a frame should take, for transports that can carry more than one
/// ordered lane per connection (several TCP connections, queue pairs; QUIC maps finer flows to
/// streams with [`OrderKey`]).
///
/// Bulk data rides its own lane so that coordination never queues behind bulk bytes already
/// inside the transport (socket buffers, send queues): priority then holds below the fabric too.
/// Frames of one channel always take the same lane, so per-channel order is kept; the session
/// tolerates any interleaving between lanes. Transports with one lane ignore this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Everything but bulk data: coordination and tool-call data, acks, keepalives, handshake.
    Latency = 0,
    /// Data frames of bulk channels.
    Bulk = 1,
}

impl Lane {
    /// Number of lanes.
    pub const COUNT: usize = 2;

    /// The lane for an encoded header (any bytes: unknown or malformed headers take
    /// [`Lane::Latency`], where the receiver will reject them).
    pub fn of(header: &[u8]) -> Lane {
        match Header::decode(header) {
            Ok(h) if h.kind == Kind::Data && h.class == Class::Bulk => Lane::Bulk,
            _ => Lane::Latency,
        }
    }
}

/// Which ordered flow a frame belongs to, for transports that can carry many independently
/// ordered streams (QUIC): frames with the same `key` must arrive in the order sent; frames of
/// different keys may overtake each other, so loss on one flow does not stall another.
/// `urgency` ranks flows for sending, 0 first (below [`OrderKey::URGENCY_LEVELS`]). The transport
/// needs nothing else about what the frames mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrderKey {
    /// The flow (frames of one key stay in order).
    pub key: u32,
    /// Sending rank, 0 most urgent.
    pub urgency: u8,
}

impl OrderKey {
    /// Number of urgency levels.
    pub const URGENCY_LEVELS: usize = Class::ALL.len();

    /// The flow of an encoded header: `Some` for data and acknowledgements of one channel (a
    /// flow per channel, its class's rank as the urgency); `None` for session control frames
    /// (and undecodable headers), which must keep their order with respect to each other only.
    pub fn of(header: &[u8]) -> Option<OrderKey> {
        let h = Header::decode(header).ok()?;
        matches!(h.kind, Kind::Data | Kind::Ack).then_some(OrderKey {
            key: h.channel,
            urgency: h.class as u8,
        })
    }
}

/// A decoded frame: header and payload. The payload is a zero-copy slice of the received buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The validated header.
    pub header: Header,
    /// The payload, exactly `header.len` bytes.
    pub payload: Bytes,
}

impl Frame {
    /// Decodes one whole frame. `buf` must hold exactly one frame: a shorter buffer is
    /// [`FrameError::Truncated`], a longer one [`FrameError::TrailingBytes`].
    pub fn decode(mut buf: Bytes) -> Result<Frame, FrameError> {
        let header = Header::decode(&buf)?;
        let total = HEADER_LEN + header.len as usize;
        if buf.len() < total {
            return Err(FrameError::Truncated {
                needed: total,
                got: buf.len(),
            });
        }
        if buf.len() > total {
            return Err(FrameError::TrailingBytes {
                extra: buf.len() - total,
            });
        }
        let payload = buf.split_off(HEADER_LEN);
        Ok(Frame { header, payload })
    }

    /// Encodes the header for sending, with the payload kept as it is (no copy).
    pub fn encode(&self) -> OutFrame {
        OutFrame {
            header: self.header.encode(),
            payload: self.payload.clone(),
        }
    }
}

/// A frame ready for the wire: encoded header bytes and the payload, which transports write with
/// a vectored write so the payload is never copied into a send buffer.
#[derive(Debug, Clone)]
pub struct OutFrame {
    /// The encoded header.
    pub header: [u8; HEADER_LEN],
    /// The payload.
    pub payload: Bytes,
}

impl OutFrame {
    /// The transport lane this frame should take.
    pub fn lane(&self) -> Lane {
        Lane::of(&self.header)
    }

    /// The ordered flow this frame belongs to (see [`OrderKey`]).
    pub fn order_key(&self) -> Option<OrderKey> {
        OrderKey::of(&self.header)
    }

    /// Header plus payload length.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Decodes this frame back (used by in-process transports, which skip the byte stream).
    pub fn decode(&self) -> Result<Frame, FrameError> {
        let header = Header::decode(&self.header)?;
        if header.len as usize != self.payload.len() {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN + header.len as usize,
                got: HEADER_LEN + self.payload.len(),
            });
        }
        Ok(Frame {
            header,
            payload: self.payload.clone(),
        })
    }
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the header or the declared payload need.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// Bytes left over after the declared payload.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The frame does not start with "AF": not this protocol, or a stream out of sync.
    BadMagic([u8; 2]),
    /// A protocol version this build does not speak.
    UnsupportedVersion(u8),
    /// A frame kind this build does not know.
    UnknownKind(u8),
    /// Flag bits this build does not know.
    UnknownFlags(u16),
    /// An invalid class or priority byte.
    BadClass(u8),
    /// The header claims a payload larger than [`MAX_FRAME_PAYLOAD`].
    PayloadTooLarge {
        /// Claimed length.
        len: u64,
        /// Largest accepted.
        max: usize,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated { needed, got } => {
                write!(f, "truncated frame: needed {needed} bytes, got {got}")
            }
            FrameError::TrailingBytes { extra } => {
                write!(f, "{extra} bytes after the frame's payload")
            }
            FrameError::BadMagic(m) => write!(f, "bad magic {m:02x?}: not an agentfabric frame"),
            FrameError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported protocol version {v} (this build speaks {VERSION})"
                )
            }
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::UnknownFlags(fl) => write!(f, "unknown flag bits {fl:#x}"),
            FrameError::BadClass(b) => write!(f, "invalid class/priority byte {b:#x}"),
            FrameError::PayloadTooLarge { len, max } => {
                write!(f, "frame claims a {len}-byte payload; the limit is {max}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            kind: Kind::Data,
            flags: FLAG_FIRST | FLAG_LAST,
            class: Class::Bulk,
            priority: Priority::new(5).unwrap(),
            msg_flags: MSG_REQUEST,
            channel: 7,
            len: 3,
            seq: 9,
            ack: 11,
            credit: 1 << 40,
            offset: 12345,
            tag: u64::MAX,
            ts: 77,
            ts_echo: 66,
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let mut wire = h.encode().to_vec();
        wire.extend_from_slice(b"abc");
        let f = Frame::decode(Bytes::from(wire)).unwrap();
        assert_eq!(f.header, h);
        assert_eq!(&f.payload[..], b"abc");
    }

    #[test]
    fn cut_frames_takes_whole_frames_and_says_what_the_next_needs() {
        let mut wire = Vec::new();
        for _ in 0..2 {
            wire.extend_from_slice(&sample().encode());
            wire.extend_from_slice(b"abc");
        }
        wire.extend_from_slice(&sample().encode()[..10]);
        let mut buf = Bytes::from(wire);
        let mut out = Vec::new();
        let need = cut_frames(&mut buf, |b, n| b.split_to(n), &mut out).unwrap();
        assert_eq!((out.len(), need, buf.len()), (2, HEADER_LEN, 10));
        assert!(out.iter().all(|f| &f.payload[..] == b"abc"));

        let mut buf = Bytes::from(sample().encode().to_vec());
        assert_eq!(
            cut_frames(&mut buf, |b, n| b.split_to(n), &mut out),
            Ok(HEADER_LEN + 3)
        );
        let mut bad = Bytes::from_static(b"XY");
        assert_eq!(
            cut_frames(&mut bad, |b, n| b.split_to(n), &mut out),
            Err(FrameError::BadMagic(*b"XY"))
        );
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        let h = sample();
        let wire = h.encode();
        assert!(matches!(
            Frame::decode(Bytes::copy_from_slice(&wire[..10])),
            Err(FrameError::Truncated {
                needed: 64,
                got: 10
            })
        ));
        assert!(matches!(
            Frame::decode(Bytes::copy_from_slice(&wire)),
            Err(FrameError::Truncated {
                needed: 67,
                got: 64
            })
        ));
        let mut bad = wire;
        bad[0] = b'X';
        assert!(matches!(Header::decode(&bad), Err(FrameError::BadMagic(_))));
        let mut bad = wire;
        bad[2] = 99;
        assert_eq!(
            Header::decode(&bad),
            Err(FrameError::UnsupportedVersion(99))
        );
        let mut bad = wire;
        bad[3] = 200;
        assert_eq!(Header::decode(&bad), Err(FrameError::UnknownKind(200)));
        // A frame claiming a 4 GiB payload is refused from the header alone.
        let mut huge = sample();
        huge.len = u32::MAX;
        assert!(matches!(
            frame_len(&huge.encode()),
            Err(FrameError::PayloadTooLarge { len, .. }) if len == u64::from(u32::MAX)
        ));
        let mut bad = wire;
        bad[6] = 0xf0;
        assert!(matches!(Header::decode(&bad), Err(FrameError::BadClass(_))));
    }

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for name in ["a", "tools/search", &"é".repeat(MAX_CHANNEL_NAME / 2)] {
            check_channel_name(name).unwrap();
            let mut wire = name_prefix(name).to_vec();
            wire.extend_from_slice(b"body");
            let (got, rest) = split_name(&Bytes::from(wire)).unwrap();
            assert_eq!((got.as_str(), &rest[..]), (name, &b"body"[..]));
        }
        let long = "x".repeat(MAX_CHANNEL_NAME + 1);
        assert!(check_channel_name("").unwrap_err().contains("64"));
        assert!(check_channel_name(&long).unwrap_err().contains("64"));
        for bad in [
            &[][..],
            &[0][..],
            &[3, b'a'][..],
            &[2, 0xff, 0xfe][..],
            &[65; 70][..],
        ] {
            assert_eq!(split_name(&Bytes::copy_from_slice(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let r = "é".repeat(MAX_REFUSAL_REASON);
        let cut = refusal_reason(&r);
        assert!(cut.len() <= MAX_REFUSAL_REASON && cut.len() >= MAX_REFUSAL_REASON - 1);
        assert!(r.starts_with(cut));
        assert_eq!(refusal_reason("short"), "short");
    }

    proptest! {
        // Reading a name prefix is total.
        #[test]
        fn split_name_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Some((name, rest)) = split_name(&Bytes::from(bytes.clone())) {
                prop_assert!(check_channel_name(&name).is_ok());
                prop_assert_eq!(1 + name.len() + rest.len(), bytes.len());
            }
        }

        // Decoding is total: arbitrary bytes give a frame or an error, never a panic.
        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::decode(Bytes::from(bytes.clone()));
            let _ = frame_len(&bytes);
        }

        // Mutating a valid frame never panics either, and valid fields round-trip.
        #[test]
        fn roundtrip_any(seq in any::<u64>(), ack in any::<u64>(), credit in any::<u64>(),
                         ch in any::<u32>(), prio in 0u8..8, tag in any::<u64>(),
                         payload in proptest::collection::vec(any::<u8>(), 0..100),
                         flip in any::<(usize, u8)>()) {
            let mut h = sample();
            h.seq = seq; h.ack = ack; h.credit = credit; h.channel = ch; h.tag = tag;
            h.priority = Priority::new(prio).unwrap();
            h.len = payload.len() as u32;
            let mut wire = h.encode().to_vec();
            wire.extend_from_slice(&payload);
            let f = Frame::decode(Bytes::from(wire.clone())).unwrap();
            prop_assert_eq!(f.header, h);
            let i = flip.0 % wire.len();
            wire[i] ^= flip.1;
            let _ = Frame::decode(Bytes::from(wire));
        }
    }
}
