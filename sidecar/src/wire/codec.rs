//! The frame header and the encoder and decoder of every message (`sidecar/PROTOCOL.md`).
//!
//! Decoding is total: any bytes give a message or a typed [`WireError`], never a panic. Every
//! read is bounds-checked, no length or count from the wire is trusted for arithmetic or for an
//! allocation before it is checked against the bytes actually present, and a body must be
//! consumed exactly. Payloads (`rest` and `blob` fields) are slices of the body's [`Bytes`], not
//! copies: a `SEND` of 16 MiB is decoded without moving its bytes.
//!
//! Decoding is also exact: a body decodes only if encoding the message gives it back byte for
//! byte (the one exception is an unknown error code, which PROTOCOL.md says to read as
//! `INTERNAL`). So no byte a client sent is silently ignored; in particular a `CALL` key without
//! flags bit 1, and a `WRITE`/`READ` tag with `notify` 0, are rejected rather than dropped,
//! because the message types have nowhere to keep them.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

use super::messages::{
    kind, ClientMsg, ErrorCode, FromClient, SidecarMsg, Target, ToClient, TransferRequest,
    WireBlock,
};

/// Bytes in a frame header: `len` (4), `kind` (2), `flags` (2), `id` (8).
pub const HEADER_LEN: usize = 16;

/// The header bytes that `len` counts (all but `len` itself).
const LEN_COUNTED: u32 = 12;

/// Longest `str` the encoding can carry (its length is a `u16`).
const MAX_STR: usize = u16::MAX as usize;

/// Fewest body bytes one `CALL` target takes (two empty `str`s), to bound its count.
const MIN_TARGET: u64 = 4;

/// Body bytes of one `WRITE`/`READ` block (three `u64`s).
const BLOCK_LEN: u64 = 24;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes after the `len` field: 12 header bytes plus the body.
    pub len: u32,
    /// The frame kind (`messages::kind`).
    pub kind: u16,
    /// 0 in version 1.
    pub flags: u16,
    /// The operation id, or as the kind says.
    pub id: u64,
}

impl Header {
    /// Parses the first 16 bytes; checks 12 <= len <= max_frame - 4 (TooLarge when larger),
    /// flags == 0.
    ///
    /// The kind is not checked here: which kinds are known depends on the direction, and the
    /// `decode_*` functions check it. A reader can therefore trust `body_len()` (it is below
    /// `max_frame`) before it reads the body.
    pub fn parse(b: &[u8; HEADER_LEN], max_frame: u32) -> Result<Header, WireError> {
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let kind = u16::from_le_bytes([b[4], b[5]]);
        let flags = u16::from_le_bytes([b[6], b[7]]);
        let id = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        if len < LEN_COUNTED {
            return Err(WireError::TooShort { len });
        }
        // In u64 so that neither `len + 4` nor `max_frame - 4` can wrap.
        if u64::from(len) + 4 > u64::from(max_frame) {
            return Err(WireError::TooLarge {
                len,
                max: max_frame,
            });
        }
        if flags != 0 {
            return Err(WireError::BadFlags(flags));
        }
        Ok(Header {
            len,
            kind,
            flags,
            id,
        })
    }

    /// Body length (len - 12).
    ///
    /// 0 for a header whose `len` is below 12 (only a hand-built one: `parse` rejects it).
    pub fn body_len(&self) -> usize {
        // u32 -> usize is lossless on every target this crate builds for (Unix, 32/64-bit).
        self.len.saturating_sub(LEN_COUNTED) as usize
    }

    /// The header's 16 bytes, as `parse` reads them.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.len.to_le_bytes());
        b[4..6].copy_from_slice(&self.kind.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b
    }
}

/// Why a frame could not be decoded. Each names what was wrong (the kind, the field).
///
/// [`WireError::code`] gives the `ERROR` code to answer it with, and `Display` the message
/// naming the problem (PROTOCOL.md: "a fatal `ERROR` with code `MALFORMED` naming the
/// problem").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The frame is longer than `max_frame` (`TOO_LARGE`).
    TooLarge {
        /// The header's `len` (the frame is `len + 4` bytes).
        len: u32,
        /// The `max_frame` in force.
        max: u32,
    },
    /// The header's `len` is below 12, shorter than the header itself.
    TooShort {
        /// The header's `len`.
        len: u32,
    },
    /// The header's `flags` are not 0.
    BadFlags(u16),
    /// A kind this direction does not have (including the other direction's kinds).
    UnknownKind(u16),
    /// The body ended inside a field.
    Truncated {
        /// The frame kind.
        kind: u16,
        /// The field (PROTOCOL.md's name) that did not fit.
        field: &'static str,
    },
    /// Bytes were left after the last field.
    TrailingBytes {
        /// The frame kind.
        kind: u16,
        /// How many.
        extra: usize,
    },
    /// A `str` field is not UTF-8.
    NotUtf8 {
        /// The frame kind.
        kind: u16,
        /// The field.
        field: &'static str,
    },
    /// A value the encoding forbids: a boolean not 0/1, unknown `CALL` flag bits, a `CALL`
    /// key that disagrees with flags bit 1, a `WRITE`/`READ` tag without `notify`.
    BadValue {
        /// The frame kind.
        kind: u16,
        /// The field, and for a rule between fields, the rule.
        field: &'static str,
        /// The value found (for a key, its length).
        value: u64,
    },
    /// A count (`CALL` targets, `WRITE`/`READ` blocks) larger than the rest of the body could
    /// hold. Checked before anything is allocated for the items, so a hostile count costs
    /// nothing.
    TooManyItems {
        /// The frame kind.
        kind: u16,
        /// The count's field.
        field: &'static str,
        /// The count found.
        count: u64,
        /// Body bytes left for the items.
        remaining: usize,
    },
    /// The body handed to a `decode_*` function is not the length its header gives (a bug in
    /// the reader, not in the peer; still an error rather than a panic).
    BodyLenMismatch {
        /// The frame kind.
        kind: u16,
        /// `Header::body_len()`.
        expected: usize,
        /// The body's length.
        actual: usize,
    },
}

impl WireError {
    /// The `ERROR` code that answers this error: `TooLarge` is `TOO_LARGE`, everything else
    /// `MALFORMED`.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

/// The kind's PROTOCOL.md name, or its number when it has none; for messages naming the kind.
struct KindName(u16);

impl fmt::Display for KindName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            kind::HELLO => "HELLO",
            kind::PING => "PING",
            kind::OPEN => "OPEN",
            kind::CLOSE => "CLOSE",
            kind::SEND => "SEND",
            kind::REQUEST => "REQUEST",
            kind::RESPOND => "RESPOND",
            kind::RESPOND_ERROR => "RESPOND_ERROR",
            kind::SERVE => "SERVE",
            kind::UNSERVE => "UNSERVE",
            kind::CALL => "CALL",
            kind::CANCEL => "CANCEL",
            kind::TOOL_REPLY => "TOOL_REPLY",
            kind::REGION_ADD => "REGION_ADD",
            kind::REGION_DROP => "REGION_DROP",
            kind::WRITE => "WRITE",
            kind::READ => "READ",
            kind::FLUSH => "FLUSH",
            kind::HELLO_OK => "HELLO_OK",
            kind::DONE => "DONE",
            kind::ERROR => "ERROR",
            kind::OPENED => "OPENED",
            kind::RESPONSE => "RESPONSE",
            kind::RESULT => "RESULT",
            kind::REGION => "REGION",
            kind::TRANSFERRED => "TRANSFERRED",
            kind::INCOMING => "INCOMING",
            kind::MESSAGE => "MESSAGE",
            kind::CHANNEL_CLOSED => "CHANNEL_CLOSED",
            kind::TOOL_CALL => "TOOL_CALL",
            kind::TOOL_CANCELLED => "TOOL_CANCELLED",
            kind::NOTIFICATION => "NOTIFICATION",
            other => return write!(f, "kind {other:#06x}"),
        };
        f.write_str(name)
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::TooLarge { len, max } => write!(
                f,
                "frame of {} bytes is longer than max_frame ({max})",
                u64::from(len) + 4
            ),
            WireError::TooShort { len } => {
                write!(
                    f,
                    "frame len {len} is shorter than the 12 header bytes it counts"
                )
            }
            WireError::BadFlags(flags) => write!(f, "frame flags {flags:#06x}, must be 0"),
            WireError::UnknownKind(k) => write!(f, "unknown frame kind {k:#06x}"),
            WireError::Truncated { kind, field } => {
                write!(f, "{}: body ends inside field `{field}`", KindName(kind))
            }
            WireError::TrailingBytes { kind, extra } => write!(
                f,
                "{}: {extra} bytes left after the last field",
                KindName(kind)
            ),
            WireError::NotUtf8 { kind, field } => {
                write!(f, "{}: field `{field}` is not UTF-8", KindName(kind))
            }
            WireError::BadValue { kind, field, value } => {
                write!(f, "{}: invalid value {value} for `{field}`", KindName(kind))
            }
            WireError::TooManyItems {
                kind,
                field,
                count,
                remaining,
            } => write!(
                f,
                "{}: count `{field}` = {count} needs more than the {remaining} bytes left",
                KindName(kind)
            ),
            WireError::BodyLenMismatch {
                kind,
                expected,
                actual,
            } => write!(
                f,
                "{}: body of {actual} bytes, the header says {expected}",
                KindName(kind)
            ),
        }
    }
}

impl std::error::Error for WireError {}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Reads a body's fields in order. Every read checks the bytes left first, so a short body is
/// `Truncated` naming the field, never a panic; payloads are split off the `Bytes`, not copied.
struct Reader {
    kind: u16,
    buf: Bytes,
}

impl Reader {
    fn truncated(&self, field: &'static str) -> WireError {
        WireError::Truncated {
            kind: self.kind,
            field,
        }
    }

    /// The next `N` bytes, as an array.
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let a: [u8; N] = match self.buf.get(..N).and_then(|s| s.try_into().ok()) {
            Some(a) => a,
            None => return Err(self.truncated(field)),
        };
        // Cannot panic: `get(..N)` just showed N bytes are there.
        self.buf.advance(N);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        self.array::<1>(field).map(|[v]| v)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A `u8` that must be 0 or 1.
    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::BadValue {
                kind: self.kind,
                field,
                value: u64::from(v),
            }),
        }
    }

    /// The next `n` bytes, shared with the body (no copy).
    fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, WireError> {
        if n > self.buf.len() {
            return Err(self.truncated(field));
        }
        Ok(self.buf.split_to(n))
    }

    /// A `str`: `u16` length, then that many bytes of UTF-8.
    fn str(&mut self, field: &'static str) -> Result<String, WireError> {
        let n = self.u16(field)?;
        let b = self.take(usize::from(n), field)?;
        match std::str::from_utf8(&b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(WireError::NotUtf8 {
                kind: self.kind,
                field,
            }),
        }
    }

    /// A `blob`: `u32` length, then that many bytes (shared with the body).
    fn blob(&mut self, field: &'static str) -> Result<Bytes, WireError> {
        let n = self.u32(field)?;
        // A length that does not even fit a usize certainly does not fit the body.
        let n = usize::try_from(n).map_err(|_| self.truncated(field))?;
        self.take(n, field)
    }

    /// `rest`: every remaining byte (shared with the body).
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Checks that `count` items of at least `min_len` bytes each can fit in what is left, so
    /// that the caller may allocate `count` items: a hostile count is refused before it costs
    /// memory, and the allocation is bounded by the body's length.
    fn room_for(&self, count: u64, min_len: u64, field: &'static str) -> Result<(), WireError> {
        let left = u64::try_from(self.buf.len()).unwrap_or(u64::MAX);
        match count.checked_mul(min_len) {
            Some(need) if need <= left => Ok(()),
            _ => Err(WireError::TooManyItems {
                kind: self.kind,
                field,
                count,
                remaining: self.buf.len(),
            }),
        }
    }

    /// The body must be consumed exactly.
    fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                kind: self.kind,
                extra: self.buf.len(),
            })
        }
    }
}

/// Whether a client may send `k` (version 1: HELLO ..= READ).
fn is_client_kind(k: u16) -> bool {
    (kind::HELLO..=kind::FLUSH).contains(&k)
}

/// Whether the sidecar may send `k` (version 1).
fn is_sidecar_kind(k: u16) -> bool {
    (kind::HELLO_OK..=kind::TRANSFERRED).contains(&k)
        || (kind::INCOMING..=kind::NOTIFICATION).contains(&k)
}

/// The checks shared by both directions before the body is read: the header as `parse` would
/// check it (a hand-built `Header` may not have been parsed), a kind of this direction, and a
/// body of the length the header gives.
fn reader(h: &Header, body: Bytes, known: fn(u16) -> bool) -> Result<Reader, WireError> {
    if h.len < LEN_COUNTED {
        return Err(WireError::TooShort { len: h.len });
    }
    if h.flags != 0 {
        return Err(WireError::BadFlags(h.flags));
    }
    if !known(h.kind) {
        return Err(WireError::UnknownKind(h.kind));
    }
    if body.len() != h.body_len() {
        return Err(WireError::BodyLenMismatch {
            kind: h.kind,
            expected: h.body_len(),
            actual: body.len(),
        });
    }
    Ok(Reader {
        kind: h.kind,
        buf: body,
    })
}

/// Decodes a frame a client sent: `h` as `Header::parse` gave it, `body` its `h.body_len()`
/// bytes. Sidecar kinds are `UnknownKind`. `rest` and `blob` fields are slices of `body`.
pub fn decode_from_client(h: &Header, body: Bytes) -> Result<FromClient, WireError> {
    let mut r = reader(h, body, is_client_kind)?;
    // Struct literal fields are evaluated in the order written, which is the wire order.
    let msg = match h.kind {
        kind::HELLO => ClientMsg::Hello {
            min_version: r.u16("min_version")?,
            max_version: r.u16("max_version")?,
            endpoint: r.str("endpoint")?,
        },
        kind::PING => ClientMsg::Ping,
        kind::OPEN => ClientMsg::Open {
            class: r.u8("class")?,
            priority: r.u8("priority")?,
            url: r.str("url")?,
            endpoint: r.str("endpoint")?,
            label: r.str("label")?,
        },
        kind::CLOSE => ClientMsg::Close {
            channel: r.u32("channel")?,
            reason: r.str("reason")?,
        },
        kind::SEND => ClientMsg::Send {
            channel: r.u32("channel")?,
            body: r.rest(),
        },
        kind::REQUEST => ClientMsg::Request {
            channel: r.u32("channel")?,
            deadline_ms: r.u32("deadline_ms")?,
            body: r.rest(),
        },
        kind::RESPOND => ClientMsg::Respond {
            channel: r.u32("channel")?,
            request: r.u64("request")?,
            body: r.rest(),
        },
        kind::RESPOND_ERROR => ClientMsg::RespondError {
            channel: r.u32("channel")?,
            request: r.u64("request")?,
            reason: r.str("reason")?,
        },
        kind::SERVE => ClientMsg::Serve {
            tool: r.str("tool")?,
        },
        kind::UNSERVE => ClientMsg::Unserve {
            tool: r.str("tool")?,
        },
        kind::CALL => decode_call(&mut r)?,
        kind::CANCEL => ClientMsg::Cancel {
            call: r.u64("call")?,
        },
        kind::TOOL_REPLY => ClientMsg::ToolReply {
            call: r.u64("call")?,
            ok: r.bool("ok")?,
            body: r.rest(),
        },
        kind::REGION_ADD => ClientMsg::RegionAdd { len: r.u64("len")? },
        kind::REGION_DROP => ClientMsg::RegionDrop {
            region: r.u32("region")?,
        },
        kind::WRITE => ClientMsg::Write(decode_transfer(&mut r)?),
        kind::READ => ClientMsg::Read(decode_transfer(&mut r)?),
        kind::FLUSH => ClientMsg::Flush {
            channel: r.u32("channel")?,
        },
        // `reader` admitted only client kinds; this arm keeps the match total without a panic.
        other => return Err(WireError::UnknownKind(other)),
    };
    r.finish()?;
    Ok(FromClient { id: h.id, msg })
}

/// `CALL` flags bit 0: hedged.
const CALL_HEDGED: u8 = 1 << 0;
/// `CALL` flags bit 1: `key` is an idempotency key.
const CALL_KEYED: u8 = 1 << 1;

fn decode_call(r: &mut Reader) -> Result<ClientMsg, WireError> {
    let k = r.kind;
    let bad = |field, value| WireError::BadValue {
        kind: k,
        field,
        value,
    };
    let deadline_ms = r.u32("deadline_ms")?;
    let flags = r.u8("flags")?;
    if flags & !(CALL_HEDGED | CALL_KEYED) != 0 {
        return Err(bad("flags", u64::from(flags)));
    }
    let retries = r.u8("retries")?;
    let tool = r.str("tool")?;
    let n = r.u16("n")?;
    r.room_for(u64::from(n), MIN_TARGET, "n")?;
    let mut targets = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        targets.push(Target {
            url: r.str("url")?,
            endpoint: r.str("endpoint")?,
        });
    }
    let key = r.blob("key")?;
    let key_len = u64::try_from(key.len()).unwrap_or(u64::MAX);
    let key = match (flags & CALL_KEYED != 0, key.is_empty()) {
        (true, false) => Some(key),
        (false, true) => None,
        (true, true) => return Err(bad("key (empty, with flags bit 1)", 0)),
        // The message has no place for a key that is not an idempotency key; dropping it
        // would hide a client's bug (a forgotten bit 1 would silently lose at-most-once).
        (false, false) => return Err(bad("key (given, without flags bit 1)", key_len)),
    };
    Ok(ClientMsg::Call {
        deadline_ms,
        hedged: flags & CALL_HEDGED != 0,
        retries,
        tool,
        targets,
        key,
        args: r.rest(),
    })
}

fn decode_transfer(r: &mut Reader) -> Result<TransferRequest, WireError> {
    let channel = r.u32("channel")?;
    let region = r.u32("region")?;
    let deadline_ms = r.u32("deadline_ms")?;
    let notify = r.bool("notify")?;
    let tag = r.u64("tag")?;
    if !notify && tag != 0 {
        // As for a CALL key: `notify: None` has no place for a tag, so it is not dropped.
        return Err(WireError::BadValue {
            kind: r.kind,
            field: "tag (nonzero, with notify 0)",
            value: tag,
        });
    }
    let descriptor = r.blob("descriptor")?;
    let n = r.u32("n")?;
    r.room_for(u64::from(n), BLOCK_LEN, "n")?;
    // `room_for` bounds n by the body's length / 24, so this cannot overflow nor be hostile.
    let mut blocks = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        blocks.push(WireBlock {
            local: r.u64("local")?,
            remote: r.u64("remote")?,
            len: r.u64("len")?,
        });
    }
    Ok(TransferRequest {
        channel,
        region,
        deadline_ms,
        notify: notify.then_some(tag),
        descriptor,
        blocks,
    })
}

/// Decodes a frame the sidecar sent (the client side: the tests' Rust client): `h` as
/// `Header::parse` gave it, `body` its `h.body_len()` bytes. Client kinds are `UnknownKind`.
/// `rest` and `blob` fields are slices of `body`; an unknown error code reads as `Internal`.
pub fn decode_to_client(h: &Header, body: Bytes) -> Result<ToClient, WireError> {
    let mut r = reader(h, body, is_sidecar_kind)?;
    // Struct literal fields are evaluated in the order written, which is the wire order.
    let msg = match h.kind {
        kind::HELLO_OK => SidecarMsg::HelloOk {
            version: r.u16("version")?,
            node: r.str("node")?,
            endpoint: r.str("endpoint")?,
            uid: r.u32("uid")?,
            pid: r.u32("pid")?,
            max_frame: r.u32("max_frame")?,
            max_ops: r.u32("max_ops")?,
            send_window: r.u32("send_window")?,
        },
        kind::DONE => SidecarMsg::Done,
        kind::ERROR => SidecarMsg::Error {
            code: ErrorCode::from_u16(r.u16("code")?),
            message: r.str("message")?,
        },
        kind::OPENED => SidecarMsg::Opened {
            channel: r.u32("channel")?,
            node: r.str("node")?,
        },
        kind::RESPONSE => SidecarMsg::Response { body: r.rest() },
        kind::RESULT => SidecarMsg::Result { body: r.rest() },
        kind::REGION => SidecarMsg::Region {
            region: r.u32("region")?,
            len: r.u64("len")?,
            descriptor: r.blob("descriptor")?,
        },
        kind::TRANSFERRED => SidecarMsg::Transferred {
            bytes: r.u64("bytes")?,
            blocks: r.u32("blocks")?,
            elapsed_ns: r.u64("elapsed_ns")?,
        },
        kind::INCOMING => SidecarMsg::Incoming {
            channel: r.u32("channel")?,
            class: r.u8("class")?,
            priority: r.u8("priority")?,
            node: r.str("node")?,
            endpoint: r.str("endpoint")?,
            label: r.str("label")?,
        },
        kind::MESSAGE => SidecarMsg::Message {
            channel: r.u32("channel")?,
            request: r.u64("request")?,
            body: r.rest(),
        },
        kind::CHANNEL_CLOSED => SidecarMsg::ChannelClosed {
            channel: r.u32("channel")?,
            code: ErrorCode::from_u16(r.u16("code")?),
            reason: r.str("reason")?,
        },
        kind::TOOL_CALL => SidecarMsg::ToolCall {
            tool: r.str("tool")?,
            node: r.str("node")?,
            deadline_ms: r.u32("deadline_ms")?,
            idempotent: r.bool("idempotent")?,
            key: r.blob("key")?,
            args: r.rest(),
        },
        kind::TOOL_CANCELLED => SidecarMsg::ToolCancelled,
        kind::NOTIFICATION => SidecarMsg::Notification {
            region: r.u32("region")?,
            tag: r.u64("tag")?,
            node: r.str("node")?,
        },
        // `reader` admitted only sidecar kinds; this arm keeps the match total without a panic.
        other => return Err(WireError::UnknownKind(other)),
    };
    r.finish()?;
    Ok(ToClient { id: h.id, msg })
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Where encoded fields go: a buffer, or a counter (so `frame_len` is computed by the very code
/// that encodes, and cannot disagree with it).
trait Sink {
    fn put(&mut self, b: &[u8]);
}

impl Sink for BytesMut {
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// Counts the bytes it is given.
struct Counter(usize);

impl Sink for Counter {
    fn put(&mut self, b: &[u8]) {
        self.0 = self.0.saturating_add(b.len());
    }
}

fn put_u8(s: &mut impl Sink, v: u8) {
    s.put(&[v]);
}

fn put_u16(s: &mut impl Sink, v: u16) {
    s.put(&v.to_le_bytes());
}

fn put_u32(s: &mut impl Sink, v: u32) {
    s.put(&v.to_le_bytes());
}

fn put_u64(s: &mut impl Sink, v: u64) {
    s.put(&v.to_le_bytes());
}

/// A `str`. One longer than 65,535 bytes (the `u16` length) is cut at the last character
/// boundary that fits: the encoder cannot fail, the result is still valid UTF-8 and a valid
/// frame, and the only strings that can be that long are free text (reasons, messages); names
/// are checked far below that by the server.
fn put_str(s: &mut impl Sink, v: &str) {
    let mut end = v.len().min(MAX_STR);
    while !v.is_char_boundary(end) {
        // Terminates: 0 is a boundary. A UTF-8 character is at most 4 bytes, so ≤ 3 steps.
        end -= 1;
    }
    let v = v.get(..end).unwrap_or_default();
    // `end <= MAX_STR`, so the conversion cannot fail.
    put_u16(s, u16::try_from(v.len()).unwrap_or(u16::MAX));
    s.put(v.as_bytes());
}

/// A `blob`.
///
/// # Panics
///
/// When `v` is 4 GiB or longer: no frame can hold it (the frame's `len` is a `u32`), and the
/// callers bound what they send by `max_frame` long before that.
fn put_blob(s: &mut impl Sink, v: &[u8]) {
    let n = u32::try_from(v.len()).expect("a blob of 4 GiB or more cannot be framed");
    put_u32(s, n);
    s.put(v);
}

/// The `len` field for a frame of `body` body bytes.
///
/// # Panics
///
/// When the frame would be 4 GiB or longer (see `put_blob`).
fn len_field(body: usize) -> u32 {
    body.checked_add(LEN_COUNTED as usize)
        .and_then(|n| u32::try_from(n).ok())
        .expect("a frame of 4 GiB or more cannot be framed")
}

/// Writes a header, the fields `put_fields` writes and, unless `payload_apart`, the trailing
/// `rest` payload it returns; patches `len` to count the payload either way. Returns the
/// payload when it was left apart.
fn encode_frame<'a>(
    out: &mut BytesMut,
    kind: u16,
    id: u64,
    payload_apart: bool,
    put_fields: impl FnOnce(&mut BytesMut) -> Option<&'a Bytes>,
) -> Option<Bytes> {
    let start = out.len();
    // `len` is patched below, once the body's length is known.
    out.extend_from_slice(
        &Header {
            len: 0,
            kind,
            flags: 0,
            id,
        }
        .to_bytes(),
    );
    let payload = put_fields(out);
    let payload_len = payload.map_or(0, Bytes::len);
    let fields_len = out.len() - start - HEADER_LEN;
    let len = len_field(fields_len.saturating_add(payload_len));
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    match payload {
        Some(p) if payload_apart => Some(p.clone()),
        Some(p) => {
            out.extend_from_slice(p);
            None
        }
        None => None,
    }
}

impl ClientMsg {
    /// The frame kind this message is sent as (`messages::kind`).
    pub fn kind(&self) -> u16 {
        match self {
            ClientMsg::Hello { .. } => kind::HELLO,
            ClientMsg::Ping => kind::PING,
            ClientMsg::Open { .. } => kind::OPEN,
            ClientMsg::Close { .. } => kind::CLOSE,
            ClientMsg::Send { .. } => kind::SEND,
            ClientMsg::Request { .. } => kind::REQUEST,
            ClientMsg::Respond { .. } => kind::RESPOND,
            ClientMsg::RespondError { .. } => kind::RESPOND_ERROR,
            ClientMsg::Serve { .. } => kind::SERVE,
            ClientMsg::Unserve { .. } => kind::UNSERVE,
            ClientMsg::Call { .. } => kind::CALL,
            ClientMsg::Cancel { .. } => kind::CANCEL,
            ClientMsg::ToolReply { .. } => kind::TOOL_REPLY,
            ClientMsg::RegionAdd { .. } => kind::REGION_ADD,
            ClientMsg::RegionDrop { .. } => kind::REGION_DROP,
            ClientMsg::Write(_) => kind::WRITE,
            ClientMsg::Read(_) => kind::READ,
            ClientMsg::Flush { .. } => kind::FLUSH,
        }
    }

    /// Writes every field but a trailing `rest`, and returns that `rest`.
    fn put_fields(&self, s: &mut impl Sink) -> Option<&Bytes> {
        match self {
            ClientMsg::Hello {
                min_version,
                max_version,
                endpoint,
            } => {
                put_u16(s, *min_version);
                put_u16(s, *max_version);
                put_str(s, endpoint);
                None
            }
            ClientMsg::Ping => None,
            ClientMsg::Open {
                class,
                priority,
                url,
                endpoint,
                label,
            } => {
                put_u8(s, *class);
                put_u8(s, *priority);
                put_str(s, url);
                put_str(s, endpoint);
                put_str(s, label);
                None
            }
            ClientMsg::Close { channel, reason } => {
                put_u32(s, *channel);
                put_str(s, reason);
                None
            }
            ClientMsg::Send { channel, body } => {
                put_u32(s, *channel);
                Some(body)
            }
            ClientMsg::Request {
                channel,
                deadline_ms,
                body,
            } => {
                put_u32(s, *channel);
                put_u32(s, *deadline_ms);
                Some(body)
            }
            ClientMsg::Respond {
                channel,
                request,
                body,
            } => {
                put_u32(s, *channel);
                put_u64(s, *request);
                Some(body)
            }
            ClientMsg::RespondError {
                channel,
                request,
                reason,
            } => {
                put_u32(s, *channel);
                put_u64(s, *request);
                put_str(s, reason);
                None
            }
            ClientMsg::Serve { tool } | ClientMsg::Unserve { tool } => {
                put_str(s, tool);
                None
            }
            ClientMsg::Call {
                deadline_ms,
                hedged,
                retries,
                tool,
                targets,
                key,
                args,
            } => {
                put_u32(s, *deadline_ms);
                let mut flags = 0;
                if *hedged {
                    flags |= CALL_HEDGED;
                }
                // `Some(empty)` is written as given (bit 1, empty key) and the decoder refuses
                // it, as PROTOCOL.md says: the encoder reproduces, it does not validate.
                if key.is_some() {
                    flags |= CALL_KEYED;
                }
                put_u8(s, flags);
                put_u8(s, *retries);
                put_str(s, tool);
                // More than 65,535 targets cannot be encoded; the rest are not sent (a call
                // hedges over a handful of replicas, the server never builds such a list).
                let n = targets.len().min(usize::from(u16::MAX));
                put_u16(s, u16::try_from(n).unwrap_or(u16::MAX));
                for t in targets.iter().take(n) {
                    put_str(s, &t.url);
                    put_str(s, &t.endpoint);
                }
                put_blob(s, key.as_deref().unwrap_or_default());
                Some(args)
            }
            ClientMsg::Cancel { call } => {
                put_u64(s, *call);
                None
            }
            ClientMsg::ToolReply { call, ok, body } => {
                put_u64(s, *call);
                put_u8(s, u8::from(*ok));
                Some(body)
            }
            ClientMsg::RegionAdd { len } => {
                put_u64(s, *len);
                None
            }
            ClientMsg::RegionDrop { region } => {
                put_u32(s, *region);
                None
            }
            ClientMsg::Flush { channel } => {
                put_u32(s, *channel);
                None
            }
            ClientMsg::Write(t) | ClientMsg::Read(t) => {
                put_u32(s, t.channel);
                put_u32(s, t.region);
                put_u32(s, t.deadline_ms);
                put_u8(s, u8::from(t.notify.is_some()));
                put_u64(s, t.notify.unwrap_or(0));
                put_blob(s, &t.descriptor);
                // More than u32::MAX blocks would not fit a frame anyway (24 bytes each).
                let n = u32::try_from(t.blocks.len()).expect("too many blocks for a frame");
                put_u32(s, n);
                for b in &t.blocks {
                    put_u64(s, b.local);
                    put_u64(s, b.remote);
                    put_u64(s, b.len);
                }
                None
            }
        }
    }
}

impl FromClient {
    /// Appends the whole frame (header and body) to `out`.
    ///
    /// A `str` longer than 65,535 bytes is cut at a character boundary; `CALL` targets past
    /// 65,535 are not sent.
    ///
    /// # Panics
    ///
    /// When the frame would be 4 GiB or longer, which no `max_frame` allows.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.frame_len());
        encode_frame(out, self.msg.kind(), self.id, false, |out| {
            self.msg.put_fields(out)
        });
    }

    /// The bytes `encode` appends (header included), without encoding.
    pub fn frame_len(&self) -> usize {
        let mut c = Counter(HEADER_LEN);
        let payload = self.msg.put_fields(&mut c).map_or(0, Bytes::len);
        c.0.saturating_add(payload)
    }
}

impl SidecarMsg {
    /// The frame kind this message is sent as (`messages::kind`).
    pub fn kind(&self) -> u16 {
        match self {
            SidecarMsg::HelloOk { .. } => kind::HELLO_OK,
            SidecarMsg::Done => kind::DONE,
            SidecarMsg::Error { .. } => kind::ERROR,
            SidecarMsg::Opened { .. } => kind::OPENED,
            SidecarMsg::Response { .. } => kind::RESPONSE,
            SidecarMsg::Result { .. } => kind::RESULT,
            SidecarMsg::Region { .. } => kind::REGION,
            SidecarMsg::Transferred { .. } => kind::TRANSFERRED,
            SidecarMsg::Incoming { .. } => kind::INCOMING,
            SidecarMsg::Message { .. } => kind::MESSAGE,
            SidecarMsg::ChannelClosed { .. } => kind::CHANNEL_CLOSED,
            SidecarMsg::ToolCall { .. } => kind::TOOL_CALL,
            SidecarMsg::ToolCancelled => kind::TOOL_CANCELLED,
            SidecarMsg::Notification { .. } => kind::NOTIFICATION,
        }
    }

    /// Writes every field but a trailing `rest`, and returns that `rest`.
    fn put_fields(&self, s: &mut impl Sink) -> Option<&Bytes> {
        match self {
            SidecarMsg::HelloOk {
                version,
                node,
                endpoint,
                uid,
                pid,
                max_frame,
                max_ops,
                send_window,
            } => {
                put_u16(s, *version);
                put_str(s, node);
                put_str(s, endpoint);
                put_u32(s, *uid);
                put_u32(s, *pid);
                put_u32(s, *max_frame);
                put_u32(s, *max_ops);
                put_u32(s, *send_window);
                None
            }
            SidecarMsg::Done | SidecarMsg::ToolCancelled => None,
            SidecarMsg::Error { code, message } => {
                put_u16(s, *code as u16);
                put_str(s, message);
                None
            }
            SidecarMsg::Opened { channel, node } => {
                put_u32(s, *channel);
                put_str(s, node);
                None
            }
            SidecarMsg::Response { body } | SidecarMsg::Result { body } => Some(body),
            SidecarMsg::Region {
                region,
                len,
                descriptor,
            } => {
                put_u32(s, *region);
                put_u64(s, *len);
                put_blob(s, descriptor);
                None
            }
            SidecarMsg::Transferred {
                bytes,
                blocks,
                elapsed_ns,
            } => {
                put_u64(s, *bytes);
                put_u32(s, *blocks);
                put_u64(s, *elapsed_ns);
                None
            }
            SidecarMsg::Incoming {
                channel,
                class,
                priority,
                node,
                endpoint,
                label,
            } => {
                put_u32(s, *channel);
                put_u8(s, *class);
                put_u8(s, *priority);
                put_str(s, node);
                put_str(s, endpoint);
                put_str(s, label);
                None
            }
            SidecarMsg::Message {
                channel,
                request,
                body,
            } => {
                put_u32(s, *channel);
                put_u64(s, *request);
                Some(body)
            }
            SidecarMsg::ChannelClosed {
                channel,
                code,
                reason,
            } => {
                put_u32(s, *channel);
                put_u16(s, *code as u16);
                put_str(s, reason);
                None
            }
            SidecarMsg::ToolCall {
                tool,
                node,
                deadline_ms,
                idempotent,
                key,
                args,
            } => {
                put_str(s, tool);
                put_str(s, node);
                put_u32(s, *deadline_ms);
                put_u8(s, u8::from(*idempotent));
                put_blob(s, key);
                Some(args)
            }
            SidecarMsg::Notification { region, tag, node } => {
                put_u32(s, *region);
                put_u64(s, *tag);
                put_str(s, node);
                None
            }
        }
    }
}

impl ToClient {
    /// Writes the header and every field but a trailing `rest` payload, and returns that
    /// payload (if the kind has one) so a writer can send it with writev without copying it.
    ///
    /// The header's `len` counts the payload: `head` followed by the payload is the frame.
    /// A `str` longer than 65,535 bytes is cut at a character boundary.
    ///
    /// # Panics
    ///
    /// When the frame would be 4 GiB or longer, which no `max_frame` allows.
    pub fn encode_parts(&self, head: &mut BytesMut) -> Option<Bytes> {
        encode_frame(head, self.msg.kind(), self.id, true, |out| {
            self.msg.put_fields(out)
        })
    }

    /// Appends the whole frame, head and payload, to `out` in one buffer (copying the
    /// payload; `encode_parts` does not).
    ///
    /// # Panics
    ///
    /// As `encode_parts`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.frame_len());
        encode_frame(out, self.msg.kind(), self.id, false, |out| {
            self.msg.put_fields(out)
        });
    }

    /// The bytes of the whole frame (header and payload included), without encoding: what a
    /// queue bounded in bytes charges for it.
    pub fn frame_len(&self) -> usize {
        let mut c = Counter(HEADER_LEN);
        let payload = self.msg.put_fields(&mut c).map_or(0, Bytes::len);
        c.0.saturating_add(payload)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
