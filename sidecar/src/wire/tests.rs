//! The codec's tests: round trips of every message, totality on arbitrary and mutated input,
//! one unit test per error, byte layouts written out from PROTOCOL.md, and zero-copy payloads.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::wire::messages::{
    kind, ClientMsg, ErrorCode, FromClient, SidecarMsg, Target, ToClient, TransferRequest,
    WireBlock, HELLO_MAX_FRAME,
};

/// A `max_frame` no test frame reaches, for tests not about the limit.
const BIG: u32 = u32::MAX;

const CLIENT_KINDS: [u16; 18] = [
    kind::HELLO,
    kind::PING,
    kind::OPEN,
    kind::CLOSE,
    kind::SEND,
    kind::REQUEST,
    kind::RESPOND,
    kind::RESPOND_ERROR,
    kind::SERVE,
    kind::UNSERVE,
    kind::CALL,
    kind::CANCEL,
    kind::TOOL_REPLY,
    kind::REGION_ADD,
    kind::REGION_DROP,
    kind::WRITE,
    kind::READ,
    kind::FLUSH,
];

const SIDECAR_KINDS: [u16; 14] = [
    kind::HELLO_OK,
    kind::DONE,
    kind::ERROR,
    kind::OPENED,
    kind::RESPONSE,
    kind::RESULT,
    kind::REGION,
    kind::TRANSFERRED,
    kind::INCOMING,
    kind::MESSAGE,
    kind::CHANNEL_CLOSED,
    kind::TOOL_CALL,
    kind::TOOL_CANCELLED,
    kind::NOTIFICATION,
];

// ---------------------------------------------------------------------------------------------
// Helpers

/// A header for `body` (flags 0).
fn header(kind: u16, id: u64, body: &[u8]) -> Header {
    Header {
        len: u32::try_from(body.len() + 12).unwrap(),
        kind,
        flags: 0,
        id,
    }
}

/// Decodes a client frame of `kind` with this body (id 7).
fn from_client(kind: u16, body: &[u8]) -> Result<FromClient, WireError> {
    decode_from_client(&header(kind, 7, body), Bytes::copy_from_slice(body))
}

/// Decodes a sidecar frame of `kind` with this body (id 7).
fn to_client(kind: u16, body: &[u8]) -> Result<ToClient, WireError> {
    decode_to_client(&header(kind, 7, body), Bytes::copy_from_slice(body))
}

/// Splits a whole frame into its parsed header and its body (a slice of `frame`).
fn split(frame: &Bytes) -> Result<(Header, Bytes), WireError> {
    let head: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(WireError::TooShort { len: 0 })?;
    let h = Header::parse(head, BIG)?;
    Ok((h, frame.slice(HEADER_LEN..)))
}

fn encode_client(m: &FromClient) -> Bytes {
    let mut out = BytesMut::new();
    m.encode(&mut out);
    out.freeze()
}

fn encode_sidecar(m: &ToClient) -> Bytes {
    let mut out = BytesMut::new();
    m.encode(&mut out);
    out.freeze()
}

/// A `str` field's bytes.
fn s(v: &str) -> Vec<u8> {
    let mut b = u16::try_from(v.len()).unwrap().to_le_bytes().to_vec();
    b.extend_from_slice(v.as_bytes());
    b
}

/// Whether `part` lies inside `whole`'s memory (a slice of it, not a copy).
fn is_slice_of(part: &Bytes, whole: &Bytes) -> bool {
    let w = whole.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    part.is_empty() || (p >= w && p + part.len() <= w + whole.len())
}

// ---------------------------------------------------------------------------------------------
// Strategies: arbitrary values of every variant

fn text() -> impl Strategy<Value = String> {
    // Any characters (multi-byte ones included), and the empty string often.
    prop_oneof![Just(String::new()), ".{0,12}"]
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL.to_vec())
}

fn transfer() -> impl Strategy<Value = TransferRequest> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        proptest::option::of(any::<u64>()),
        bytes(24),
        vec(
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(local, remote, len)| WireBlock {
                local,
                remote,
                len,
            }),
            0..5,
        ),
    )
        .prop_map(
            |(channel, region, deadline_ms, notify, descriptor, blocks)| TransferRequest {
                channel,
                region,
                deadline_ms,
                notify,
                descriptor,
                blocks,
            },
        )
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), text()).prop_map(|(min_version, max_version, endpoint)| {
            ClientMsg::Hello {
                min_version,
                max_version,
                endpoint,
            }
        }),
        Just(ClientMsg::Ping),
        (any::<u8>(), any::<u8>(), text(), text(), text()).prop_map(
            |(class, priority, url, endpoint, label)| ClientMsg::Open {
                class,
                priority,
                url,
                endpoint,
                label,
            }
        ),
        (any::<u32>(), text()).prop_map(|(channel, reason)| ClientMsg::Close { channel, reason }),
        (any::<u32>(), bytes(64)).prop_map(|(channel, body)| ClientMsg::Send { channel, body }),
        (any::<u32>(), any::<u32>(), bytes(64)).prop_map(|(channel, deadline_ms, body)| {
            ClientMsg::Request {
                channel,
                deadline_ms,
                body,
            }
        }),
        (any::<u32>(), any::<u64>(), bytes(64)).prop_map(|(channel, request, body)| {
            ClientMsg::Respond {
                channel,
                request,
                body,
            }
        }),
        (any::<u32>(), any::<u64>(), text()).prop_map(|(channel, request, reason)| {
            ClientMsg::RespondError {
                channel,
                request,
                reason,
            }
        }),
        text().prop_map(|tool| ClientMsg::Serve { tool }),
        text().prop_map(|tool| ClientMsg::Unserve { tool }),
        (
            any::<u32>(),
            any::<bool>(),
            any::<u8>(),
            text(),
            vec(
                (text(), text()).prop_map(|(url, endpoint)| Target { url, endpoint }),
                0..4
            ),
            // PROTOCOL.md: a key given with flags bit 1 is never empty.
            proptest::option::of(vec(any::<u8>(), 1..16).prop_map(Bytes::from)),
            bytes(64),
        )
            .prop_map(|(deadline_ms, hedged, retries, tool, targets, key, args)| {
                ClientMsg::Call {
                    deadline_ms,
                    hedged,
                    retries,
                    tool,
                    targets,
                    key,
                    args,
                }
            }),
        any::<u64>().prop_map(|call| ClientMsg::Cancel { call }),
        (any::<u64>(), any::<bool>(), bytes(64))
            .prop_map(|(call, ok, body)| ClientMsg::ToolReply { call, ok, body }),
        any::<u64>().prop_map(|len| ClientMsg::RegionAdd { len }),
        any::<u32>().prop_map(|region| ClientMsg::RegionDrop { region }),
        transfer().prop_map(ClientMsg::Write),
        transfer().prop_map(ClientMsg::Read),
        any::<u32>().prop_map(|channel| ClientMsg::Flush { channel }),
    ]
}

fn sidecar_msg() -> impl Strategy<Value = SidecarMsg> {
    prop_oneof![
        (
            any::<u16>(),
            text(),
            text(),
            any::<u32>(),
            any::<u32>(),
            (any::<u32>(), any::<u32>(), any::<u32>()),
        )
            .prop_map(
                |(version, node, endpoint, uid, pid, (max_frame, max_ops, send_window))| {
                    SidecarMsg::HelloOk {
                        version,
                        node,
                        endpoint,
                        uid,
                        pid,
                        max_frame,
                        max_ops,
                        send_window,
                    }
                }
            ),
        Just(SidecarMsg::Done),
        (code(), text()).prop_map(|(code, message)| SidecarMsg::Error { code, message }),
        (any::<u32>(), text()).prop_map(|(channel, node)| SidecarMsg::Opened { channel, node }),
        bytes(64).prop_map(|body| SidecarMsg::Response { body }),
        bytes(64).prop_map(|body| SidecarMsg::Result { body }),
        (any::<u32>(), any::<u64>(), bytes(24)).prop_map(|(region, len, descriptor)| {
            SidecarMsg::Region {
                region,
                len,
                descriptor,
            }
        }),
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(bytes, blocks, elapsed_ns)| {
            SidecarMsg::Transferred {
                bytes,
                blocks,
                elapsed_ns,
            }
        }),
        (
            any::<u32>(),
            any::<u8>(),
            any::<u8>(),
            text(),
            text(),
            text()
        )
            .prop_map(|(channel, class, priority, node, endpoint, label)| {
                SidecarMsg::Incoming {
                    channel,
                    class,
                    priority,
                    node,
                    endpoint,
                    label,
                }
            }),
        (any::<u32>(), any::<u64>(), bytes(64)).prop_map(|(channel, request, body)| {
            SidecarMsg::Message {
                channel,
                request,
                body,
            }
        }),
        (any::<u32>(), code(), text()).prop_map(|(channel, code, reason)| {
            SidecarMsg::ChannelClosed {
                channel,
                code,
                reason,
            }
        }),
        (
            text(),
            text(),
            any::<u32>(),
            any::<bool>(),
            bytes(16),
            bytes(64)
        )
            .prop_map(|(tool, node, deadline_ms, idempotent, key, args)| {
                SidecarMsg::ToolCall {
                    tool,
                    node,
                    deadline_ms,
                    idempotent,
                    key,
                    args,
                }
            }),
        Just(SidecarMsg::ToolCancelled),
        (any::<u32>(), any::<u64>(), text())
            .prop_map(|(region, tag, node)| SidecarMsg::Notification { region, tag, node }),
    ]
}

fn from_client_frame() -> impl Strategy<Value = FromClient> {
    (any::<u64>(), client_msg()).prop_map(|(id, msg)| FromClient { id, msg })
}

fn to_client_frame() -> impl Strategy<Value = ToClient> {
    (any::<u64>(), sidecar_msg()).prop_map(|(id, msg)| ToClient { id, msg })
}

/// Changes a valid body: cut it, flip a byte, insert a byte or overwrite four bytes with a
/// large length (to aim at the length and count fields).
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, u8),
    BigLen(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1..=u8::MAX).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Insert(i, x)),
        (
            any::<usize>(),
            prop_oneof![Just(u32::MAX), Just(0xFFFF), Just(0x1_0000), any::<u32>()]
        )
            .prop_map(|(i, x)| Mutation::BigLen(i, x)),
    ]
}

fn mutate(body: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = body.to_vec();
    match *m {
        Mutation::Truncate(i) => b.truncate(i % (b.len() + 1)),
        Mutation::Flip(i, x) if !b.is_empty() => {
            let i = i % b.len();
            b[i] ^= x;
        }
        Mutation::Flip(..) => b.push(1),
        Mutation::Insert(i, x) => b.insert(i % (b.len() + 1), x),
        Mutation::BigLen(i, x) => {
            let at = i % (b.len() + 1);
            for (j, byte) in x.to_le_bytes().into_iter().enumerate() {
                match b.get_mut(at + j) {
                    Some(v) => *v = byte,
                    None => b.push(byte),
                }
            }
        }
    }
    b
}

/// What every decode result must satisfy, for a body of `kind` in the right direction: an
/// error is a typed one about the body (the header was valid), and an accepted client body is
/// exactly what encoding the message gives back (nothing was ignored).
fn check_client_result(kind: u16, id: u64, body: &[u8], r: &Result<FromClient, WireError>) {
    match r {
        Ok(m) => {
            assert_eq!(m.id, id);
            let mut expect = header(kind, id, body).to_bytes().to_vec();
            expect.extend_from_slice(body);
            assert_eq!(&encode_client(m)[..], &expect[..], "{m:?}");
        }
        Err(e) => {
            assert!(!matches!(
                e,
                WireError::UnknownKind(_)
                    | WireError::BadFlags(_)
                    | WireError::TooLarge { .. }
                    | WireError::TooShort { .. }
                    | WireError::BodyLenMismatch { .. }
            ));
            assert_eq!(e.code(), ErrorCode::Malformed);
            assert!(!e.to_string().is_empty());
        }
    }
}

/// As `check_client_result`, for the sidecar's direction: an unknown error code reads as
/// `INTERNAL`, so there the bytes need not come back, but the message does.
fn check_sidecar_result(kind: u16, id: u64, body: &[u8], r: &Result<ToClient, WireError>) {
    match r {
        Ok(m) => {
            assert_eq!(m.id, id);
            let again = encode_sidecar(m);
            let (h, b) = split(&again).unwrap();
            assert_eq!(decode_to_client(&h, b).as_ref(), Ok(m));
            if kind != kind::ERROR && kind != kind::CHANNEL_CLOSED {
                assert_eq!(&again[HEADER_LEN..], body, "{m:?}");
            }
        }
        Err(e) => {
            assert!(!matches!(
                e,
                WireError::UnknownKind(_)
                    | WireError::BadFlags(_)
                    | WireError::TooLarge { .. }
                    | WireError::TooShort { .. }
                    | WireError::BodyLenMismatch { .. }
            ));
            assert_eq!(e.code(), ErrorCode::Malformed);
            assert!(!e.to_string().is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Every client message: encode, parse the header, decode, compare; the other direction
    /// does not know the kind.
    #[test]
    fn client_round_trip(m in from_client_frame()) {
        let frame = encode_client(&m);
        prop_assert_eq!(frame.len(), m.frame_len());
        let (h, body) = split(&frame).unwrap();
        prop_assert_eq!(h.kind, m.msg.kind());
        prop_assert_eq!(h.id, m.id);
        prop_assert_eq!(h.body_len(), body.len());
        prop_assert_eq!(decode_to_client(&h, body.clone()), Err(WireError::UnknownKind(h.kind)));
        let back = decode_from_client(&h, body.clone()).unwrap();
        prop_assert_eq!(&back, &m);
        // Payloads are slices of the body, not copies.
        match &back.msg {
            ClientMsg::Send { body: p, .. }
            | ClientMsg::Request { body: p, .. }
            | ClientMsg::Respond { body: p, .. }
            | ClientMsg::ToolReply { body: p, .. } => prop_assert!(is_slice_of(p, &body)),
            ClientMsg::Call { key, args, .. } => {
                prop_assert!(is_slice_of(args, &body));
                if let Some(k) = key {
                    prop_assert!(is_slice_of(k, &body));
                }
            }
            ClientMsg::Write(t) | ClientMsg::Read(t) => {
                prop_assert!(is_slice_of(&t.descriptor, &body))
            }
            _ => {}
        }
    }

    /// Every sidecar message: as above, and `encode_parts` + its payload is `encode`.
    #[test]
    fn sidecar_round_trip(m in to_client_frame()) {
        let frame = encode_sidecar(&m);
        prop_assert_eq!(frame.len(), m.frame_len());

        let mut head = BytesMut::new();
        let payload = m.encode_parts(&mut head);
        let has_rest = matches!(
            m.msg,
            SidecarMsg::Response { .. }
                | SidecarMsg::Result { .. }
                | SidecarMsg::Message { .. }
                | SidecarMsg::ToolCall { .. }
        );
        prop_assert_eq!(payload.is_some(), has_rest);
        let mut joined = head.to_vec();
        joined.extend_from_slice(payload.as_deref().unwrap_or_default());
        prop_assert_eq!(&joined[..], &frame[..]);

        let (h, body) = split(&frame).unwrap();
        prop_assert_eq!(h.kind, m.msg.kind());
        prop_assert_eq!(h.id, m.id);
        prop_assert_eq!(h.body_len(), body.len());
        prop_assert_eq!(decode_from_client(&h, body.clone()), Err(WireError::UnknownKind(h.kind)));
        let back = decode_to_client(&h, body.clone()).unwrap();
        prop_assert_eq!(&back, &m);
        match &back.msg {
            SidecarMsg::Response { body: p }
            | SidecarMsg::Result { body: p }
            | SidecarMsg::Message { body: p, .. }
            | SidecarMsg::Region { descriptor: p, .. } => prop_assert!(is_slice_of(p, &body)),
            SidecarMsg::ToolCall { key, args, .. } => {
                prop_assert!(is_slice_of(key, &body));
                prop_assert!(is_slice_of(args, &body));
            }
            _ => {}
        }
    }

    /// Arbitrary bytes as a frame, under any `max_frame`: a message or a typed error.
    #[test]
    fn arbitrary_bytes_never_panic(frame in vec(any::<u8>(), 0..300), max_frame in any::<u32>()) {
        let Some(head) = frame.get(..HEADER_LEN).and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok()) else {
            return Ok(());
        };
        let Ok(h) = Header::parse(head, max_frame) else {
            return Ok(());
        };
        prop_assert!(h.len >= 12 && u64::from(h.len) + 4 <= u64::from(max_frame) && h.flags == 0);
        // The body as a reader would have it, or shorter when the input ends first.
        let rest = &frame[HEADER_LEN..];
        let body = Bytes::copy_from_slice(rest.get(..h.body_len()).unwrap_or(rest));
        let a = decode_from_client(&h, body.clone());
        let b = decode_to_client(&h, body.clone());
        prop_assert!(a.is_err() || b.is_err());
        if body.len() == h.body_len() {
            if is_client_kind(h.kind) {
                check_client_result(h.kind, h.id, &body, &a);
            }
            if is_sidecar_kind(h.kind) {
                check_sidecar_result(h.kind, h.id, &body, &b);
            }
        }
    }

    /// Arbitrary bodies behind valid headers of every known kind (what gets past the header).
    #[test]
    fn arbitrary_bodies_never_panic(
        k in prop::sample::select([CLIENT_KINDS.as_slice(), SIDECAR_KINDS.as_slice()].concat()),
        id in any::<u64>(),
        // Small bytes make small lengths and counts, so bodies get past the first fields.
        body in prop_oneof![vec(any::<u8>(), 0..200), vec(0u8..3, 0..200)],
    ) {
        let h = header(k, id, &body);
        let a = decode_from_client(&h, Bytes::from(body.clone()));
        let b = decode_to_client(&h, Bytes::from(body.clone()));
        if is_client_kind(k) {
            prop_assert_eq!(b, Err(WireError::UnknownKind(k)));
            check_client_result(k, id, &body, &a);
        } else {
            prop_assert_eq!(a, Err(WireError::UnknownKind(k)));
            check_sidecar_result(k, id, &body, &b);
        }
    }

    /// Valid client bodies, damaged: a message or a typed error, and an accepted body still
    /// re-encodes to itself.
    #[test]
    fn mutated_client_bodies(m in from_client_frame(), mu in vec(mutation(), 1..4)) {
        let frame = encode_client(&m);
        let mut body = frame[HEADER_LEN..].to_vec();
        for x in &mu {
            body = mutate(&body, x);
        }
        let k = m.msg.kind();
        let r = decode_from_client(&header(k, m.id, &body), Bytes::from(body.clone()));
        check_client_result(k, m.id, &body, &r);
    }

    /// Valid sidecar bodies, damaged: as above.
    #[test]
    fn mutated_sidecar_bodies(m in to_client_frame(), mu in vec(mutation(), 1..4)) {
        let frame = encode_sidecar(&m);
        let mut body = frame[HEADER_LEN..].to_vec();
        for x in &mu {
            body = mutate(&body, x);
        }
        let k = m.msg.kind();
        let r = decode_to_client(&header(k, m.id, &body), Bytes::from(body.clone()));
        check_sidecar_result(k, m.id, &body, &r);
    }
}

// ---------------------------------------------------------------------------------------------
// The header

#[test]
fn header_parses_and_round_trips() {
    let h = Header {
        len: 12 + 5,
        kind: kind::SEND,
        flags: 0,
        id: 0x0102_0304_0506_0708,
    };
    let b = h.to_bytes();
    assert_eq!(
        b,
        [17, 0, 0, 0, 0x05, 0x00, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1],
        "little-endian, in PROTOCOL.md's order"
    );
    assert_eq!(Header::parse(&b, BIG), Ok(h));
    assert_eq!(h.body_len(), 5);
}

#[test]
fn header_too_large() {
    let max = HELLO_MAX_FRAME;
    let at = |len: u32| Header {
        len,
        kind: kind::SEND,
        flags: 0,
        id: 1,
    };
    // The largest frame is exactly max_frame bytes: len = max_frame - 4.
    assert!(Header::parse(&at(max - 4).to_bytes(), max).is_ok());
    let e = Header::parse(&at(max - 3).to_bytes(), max).unwrap_err();
    assert_eq!(e, WireError::TooLarge { len: max - 3, max });
    assert_eq!(e.code(), ErrorCode::TooLarge);
    assert!(e.to_string().contains("65537"), "{e}");
    assert_eq!(
        Header::parse(&at(u32::MAX).to_bytes(), u32::MAX),
        Err(WireError::TooLarge {
            len: u32::MAX,
            max: u32::MAX
        })
    );
    // A max_frame below the header's own size admits nothing, without underflow.
    for max in 0..16 {
        assert!(matches!(
            Header::parse(&at(12).to_bytes(), max),
            Err(WireError::TooLarge { .. })
        ));
    }
}

#[test]
fn header_too_short() {
    for len in [0, 1, 11] {
        let b = Header {
            len,
            kind: kind::PING,
            flags: 0,
            id: 1,
        }
        .to_bytes();
        let e = Header::parse(&b, BIG).unwrap_err();
        assert_eq!(e, WireError::TooShort { len });
        assert_eq!(e.code(), ErrorCode::Malformed);
    }
    // A hand-built header is checked again by the decoders.
    let h = Header {
        len: 3,
        kind: kind::PING,
        flags: 0,
        id: 1,
    };
    assert_eq!(h.body_len(), 0);
    assert_eq!(
        decode_from_client(&h, Bytes::new()),
        Err(WireError::TooShort { len: 3 })
    );
}

#[test]
fn header_bad_flags() {
    for flags in [1, 0x8000, u16::MAX] {
        let h = Header {
            len: 12,
            kind: kind::PING,
            flags,
            id: 1,
        };
        assert_eq!(
            Header::parse(&h.to_bytes(), BIG),
            Err(WireError::BadFlags(flags))
        );
        assert_eq!(
            decode_from_client(&h, Bytes::new()),
            Err(WireError::BadFlags(flags))
        );
        assert_eq!(
            decode_to_client(&h, Bytes::new()),
            Err(WireError::BadFlags(flags))
        );
    }
}

#[test]
fn unknown_kinds() {
    for k in [0, 0x0013, 0x00FF, 0x8000, 0x8009, 0x8100, 0x8107, u16::MAX] {
        assert_eq!(from_client(k, &[]), Err(WireError::UnknownKind(k)));
        assert_eq!(to_client(k, &[]), Err(WireError::UnknownKind(k)));
    }
    // Each direction's kinds are unknown to the other.
    for k in CLIENT_KINDS {
        assert_eq!(to_client(k, &[]), Err(WireError::UnknownKind(k)));
    }
    for k in SIDECAR_KINDS {
        assert_eq!(from_client(k, &[]), Err(WireError::UnknownKind(k)));
    }
    let e = WireError::UnknownKind(0x8009);
    assert_eq!(e.code(), ErrorCode::Malformed);
    assert!(e.to_string().contains("0x8009"), "{e}");
}

#[test]
fn body_length_must_match_header() {
    let h = header(kind::CANCEL, 1, &[0; 8]);
    assert_eq!(
        decode_from_client(&h, Bytes::from_static(&[0; 7])),
        Err(WireError::BodyLenMismatch {
            kind: kind::CANCEL,
            expected: 8,
            actual: 7
        })
    );
    assert_eq!(
        decode_from_client(&h, Bytes::from_static(&[0; 9])),
        Err(WireError::BodyLenMismatch {
            kind: kind::CANCEL,
            expected: 8,
            actual: 9
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Body errors

#[test]
fn truncated_fields() {
    fn t<T>(kind: u16, field: &'static str) -> Result<T, WireError> {
        Err(WireError::Truncated { kind, field })
    }
    // Inside a fixed-size field.
    assert_eq!(from_client(kind::CLOSE, &[1, 0]), t(kind::CLOSE, "channel"));
    assert_eq!(from_client(kind::CANCEL, &[0; 7]), t(kind::CANCEL, "call"));
    // Inside a str's length, and inside its bytes.
    assert_eq!(
        from_client(kind::CLOSE, &[1, 0, 0, 0, 5]),
        t(kind::CLOSE, "reason")
    );
    assert_eq!(
        from_client(kind::CLOSE, &[1, 0, 0, 0, 5, 0, b'a', b'b']),
        t(kind::CLOSE, "reason")
    );
    // A blob longer than what is left.
    let mut region = vec![1, 0, 0, 0];
    region.extend_from_slice(&10u64.to_le_bytes());
    region.extend_from_slice(&u32::MAX.to_le_bytes());
    region.extend_from_slice(b"desc");
    assert_eq!(
        to_client(kind::REGION, &region),
        t(kind::REGION, "descriptor")
    );
    // The last field of a long body, and an empty body where fields are due.
    let mut ok = vec![1, 0];
    ok.extend(s("node"));
    ok.extend(s("ep"));
    ok.extend_from_slice(&[0; 19]);
    assert_eq!(
        to_client(kind::HELLO_OK, &ok),
        t(kind::HELLO_OK, "send_window")
    );
    assert_eq!(from_client(kind::HELLO, &[]), t(kind::HELLO, "min_version"));
    let e = from_client(kind::CLOSE, &[1, 0]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Malformed);
    assert_eq!(e.to_string(), "CLOSE: body ends inside field `channel`");
}

#[test]
fn trailing_bytes() {
    fn tb<T>(kind: u16, extra: usize) -> Result<T, WireError> {
        Err(WireError::TrailingBytes { kind, extra })
    }
    assert_eq!(from_client(kind::PING, &[0]), tb(kind::PING, 1));
    assert_eq!(from_client(kind::CANCEL, &[0; 9]), tb(kind::CANCEL, 1));
    let mut hello = vec![1, 0, 1, 0];
    hello.extend(s("agent"));
    assert!(from_client(kind::HELLO, &hello).is_ok());
    hello.extend_from_slice(&[0, 0, 0]);
    assert_eq!(from_client(kind::HELLO, &hello), tb(kind::HELLO, 3));
    assert_eq!(to_client(kind::DONE, &[1, 2]), tb(kind::DONE, 2));
    assert_eq!(
        to_client(kind::TOOL_CANCELLED, &[0]),
        tb(kind::TOOL_CANCELLED, 1)
    );
    let e = from_client(kind::PING, &[0]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Malformed);
    assert!(e.to_string().starts_with("PING"), "{e}");
}

#[test]
fn not_utf8() {
    fn bad<T>(kind: u16, field: &'static str) -> Result<T, WireError> {
        Err(WireError::NotUtf8 { kind, field })
    }
    assert_eq!(
        from_client(kind::SERVE, &[1, 0, 0xFF]),
        bad(kind::SERVE, "tool")
    );
    // A surrogate, and an overlong encoding of '/': not UTF-8 either.
    assert_eq!(
        from_client(kind::UNSERVE, &[3, 0, 0xED, 0xA0, 0x80]),
        bad(kind::UNSERVE, "tool")
    );
    let mut open = vec![0, 0];
    open.extend(s("tcp://h"));
    open.extend_from_slice(&[2, 0, 0xC0, 0xAF]);
    open.extend(s(""));
    assert_eq!(from_client(kind::OPEN, &open), bad(kind::OPEN, "endpoint"));
    let mut call = s("tool");
    call.extend_from_slice(&[1, 0, 0x80]);
    assert_eq!(
        to_client(kind::TOOL_CALL, &call),
        bad(kind::TOOL_CALL, "node")
    );
    let e = from_client(kind::SERVE, &[1, 0, 0xFF]).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Malformed);
    assert!(e.to_string().contains("tool"), "{e}");
}

/// A `WRITE` body up to its block count.
fn write_head(notify: u8, tag: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1u32.to_le_bytes()); // channel
    b.extend_from_slice(&2u32.to_le_bytes()); // region
    b.extend_from_slice(&0u32.to_le_bytes()); // deadline_ms
    b.push(notify);
    b.extend_from_slice(&tag.to_le_bytes());
    b.extend_from_slice(&3u32.to_le_bytes()); // descriptor
    b.extend_from_slice(b"abc");
    b
}

#[test]
fn hostile_block_count() {
    // u32::MAX blocks and none present: refused before anything is allocated for them.
    let mut w = write_head(0, 0);
    w.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        from_client(kind::WRITE, &w),
        Err(WireError::TooManyItems {
            kind: kind::WRITE,
            field: "n",
            count: u64::from(u32::MAX),
            remaining: 0
        })
    );
    // Two blocks need 48 bytes: 47 are too few, 48 are enough.
    let mut w = write_head(0, 0);
    w.extend_from_slice(&2u32.to_le_bytes());
    w.extend_from_slice(&[0; 47]);
    assert_eq!(
        from_client(kind::READ, &w),
        Err(WireError::TooManyItems {
            kind: kind::READ,
            field: "n",
            count: 2,
            remaining: 47
        })
    );
    w.push(0);
    let Ok(FromClient {
        msg: ClientMsg::Read(t),
        ..
    }) = from_client(kind::READ, &w)
    else {
        panic!("two blocks in 48 bytes")
    };
    assert_eq!(t.blocks.len(), 2);
    // A CALL claiming 65,535 targets in a few bytes.
    let mut call = vec![0; 6];
    call.extend(s("t"));
    call.extend_from_slice(&u16::MAX.to_le_bytes());
    call.extend_from_slice(&[0; 8]);
    let e = from_client(kind::CALL, &call).unwrap_err();
    assert_eq!(
        e,
        WireError::TooManyItems {
            kind: kind::CALL,
            field: "n",
            count: 65535,
            remaining: 8
        }
    );
    assert_eq!(e.code(), ErrorCode::Malformed);
    assert!(e.to_string().contains("65535"), "{e}");
}

#[test]
fn bad_values() {
    fn bv<T>(kind: u16, field: &'static str, value: u64) -> Result<T, WireError> {
        Err(WireError::BadValue { kind, field, value })
    }
    // Booleans are 0 or 1.
    let mut reply = 9u64.to_le_bytes().to_vec();
    reply.push(2);
    assert_eq!(
        from_client(kind::TOOL_REPLY, &reply),
        bv(kind::TOOL_REPLY, "ok", 2)
    );
    assert_eq!(
        from_client(kind::WRITE, &write_head(2, 0)),
        bv(kind::WRITE, "notify", 2)
    );
    let mut tc = s("tool");
    tc.extend(s("node"));
    tc.extend_from_slice(&[0, 0, 0, 0, 0xFF]);
    assert_eq!(
        to_client(kind::TOOL_CALL, &tc),
        bv(kind::TOOL_CALL, "idempotent", 255)
    );
    // A tag without notify has nowhere to go in the message.
    assert_eq!(
        from_client(kind::WRITE, &write_head(0, 5)),
        bv(kind::WRITE, "tag (nonzero, with notify 0)", 5)
    );

    // CALL: unknown flag bits, bit 1 with an empty key, a key without bit 1.
    let call = |flags: u8, key: &[u8]| {
        let mut b = vec![0, 0, 0, 0, flags, 0];
        b.extend(s("tool"));
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend(s("tcp://n"));
        b.extend(s("ep"));
        b.extend_from_slice(&u32::try_from(key.len()).unwrap().to_le_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(b"args");
        b
    };
    for flags in [0b100, 0x80, 0xFF] {
        assert_eq!(
            from_client(kind::CALL, &call(flags, b"k")),
            bv(kind::CALL, "flags", u64::from(flags))
        );
    }
    assert_eq!(
        from_client(kind::CALL, &call(0b10, b"")),
        bv(kind::CALL, "key (empty, with flags bit 1)", 0)
    );
    assert_eq!(
        from_client(kind::CALL, &call(0b01, b"key")),
        bv(kind::CALL, "key (given, without flags bit 1)", 3)
    );
    let Ok(FromClient {
        msg: ClientMsg::Call {
            hedged, key, args, ..
        },
        ..
    }) = from_client(kind::CALL, &call(0b11, b"key"))
    else {
        panic!("a valid CALL")
    };
    assert!(hedged);
    assert_eq!(key.as_deref(), Some(&b"key"[..]));
    assert_eq!(&args[..], b"args");
    let e = from_client(kind::TOOL_REPLY, &reply).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Malformed);
    assert!(e.to_string().contains("`ok`"), "{e}");
}

#[test]
fn unknown_error_code_reads_as_internal() {
    let mut b = 999u16.to_le_bytes().to_vec();
    b.extend(s("what"));
    let m = to_client(kind::ERROR, &b).unwrap();
    assert_eq!(
        m.msg,
        SidecarMsg::Error {
            code: ErrorCode::Internal,
            message: "what".into()
        }
    );
    let mut c = 5u32.to_le_bytes().to_vec();
    c.extend_from_slice(&0u16.to_le_bytes());
    c.extend(s(""));
    assert!(matches!(
        to_client(kind::CHANNEL_CLOSED, &c).unwrap().msg,
        SidecarMsg::ChannelClosed {
            code: ErrorCode::Internal,
            ..
        }
    ));
}

// ---------------------------------------------------------------------------------------------
// Byte layouts, written out from PROTOCOL.md's tables (the round trips alone would pass with an
// encoder and decoder that agree on a wrong layout).

#[test]
fn call_layout() {
    let m = FromClient {
        id: 0x42,
        msg: ClientMsg::Call {
            deadline_ms: 1000,
            hedged: true,
            retries: 3,
            tool: "t".into(),
            targets: vec![Target {
                url: "u".into(),
                endpoint: "e".into(),
            }],
            key: Some(Bytes::from_static(b"k")),
            args: Bytes::from_static(b"AB"),
        },
    };
    #[rustfmt::skip]
    let expect: &[u8] = &[
        // len = 12 + 24, kind 0x000B, flags 0, id 0x42
        36, 0, 0, 0, 0x0B, 0x00, 0, 0, 0x42, 0, 0, 0, 0, 0, 0, 0,
        0xE8, 0x03, 0, 0, // deadline_ms 1000
        0b11,             // flags: hedged, keyed
        3,                // retries
        1, 0, b't',       // tool
        1, 0,             // n
        1, 0, b'u', 1, 0, b'e',
        1, 0, 0, 0, b'k', // key
        b'A', b'B',       // args
    ];
    assert_eq!(&encode_client(&m)[..], expect);
    let (h, body) = split(&Bytes::from_static(expect)).unwrap();
    assert_eq!(decode_from_client(&h, body), Ok(m));
}

#[test]
fn write_layout() {
    let m = FromClient {
        id: 1,
        msg: ClientMsg::Write(TransferRequest {
            channel: 2,
            region: 3,
            deadline_ms: 0,
            notify: Some(0x55),
            descriptor: Bytes::from_static(b"D"),
            blocks: vec![WireBlock {
                local: 4,
                remote: 5,
                len: 6,
            }],
        }),
    };
    let mut expect = Header {
        len: 12 + 4 + 4 + 4 + 1 + 8 + 5 + 4 + 24,
        kind: kind::WRITE,
        flags: 0,
        id: 1,
    }
    .to_bytes()
    .to_vec();
    #[rustfmt::skip]
    expect.extend_from_slice(&[
        2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, // channel, region, deadline_ms
        1, 0x55, 0, 0, 0, 0, 0, 0, 0,       // notify, tag
        1, 0, 0, 0, b'D',                   // descriptor
        1, 0, 0, 0,                         // n
        4, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0,
    ]);
    assert_eq!(&encode_client(&m)[..], &expect[..]);
}

#[test]
fn hello_ok_and_message_layout() {
    let m = ToClient {
        id: 0,
        msg: SidecarMsg::HelloOk {
            version: 1,
            node: "n".into(),
            endpoint: "e".into(),
            uid: 1000,
            pid: 7,
            max_frame: 0x0101_0000,
            max_ops: 1024,
            send_window: 64,
        },
    };
    #[rustfmt::skip]
    let expect: &[u8] = &[
        40, 0, 0, 0, 0x01, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        1, 0, 1, 0, b'n', 1, 0, b'e',
        0xE8, 0x03, 0, 0, 7, 0, 0, 0, 0, 0, 0x01, 0x01, 0, 0x04, 0, 0, 64, 0, 0, 0,
    ];
    assert_eq!(&encode_sidecar(&m)[..], expect);

    let m = ToClient {
        id: 0,
        msg: SidecarMsg::Message {
            channel: 9,
            request: 0,
            body: Bytes::from_static(b"hello"),
        },
    };
    let mut head = BytesMut::new();
    let payload = m.encode_parts(&mut head).unwrap();
    #[rustfmt::skip]
    let expect_head: &[u8] = &[
        29, 0, 0, 0, 0x02, 0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(&head[..], expect_head);
    assert_eq!(&payload[..], b"hello");
    // The payload handed back is the message's own buffer, not a copy.
    let SidecarMsg::Message { body, .. } = &m.msg else {
        unreachable!()
    };
    assert_eq!(payload.as_ptr(), body.as_ptr());
}

#[test]
fn error_code_encodes_as_its_number() {
    for code in ErrorCode::ALL {
        let frame = encode_sidecar(&ToClient {
            id: 3,
            msg: SidecarMsg::Error {
                code,
                message: String::new(),
            },
        });
        assert_eq!(
            frame[HEADER_LEN..HEADER_LEN + 2],
            (code as u16).to_le_bytes()
        );
    }
    assert_eq!(
        encode_sidecar(&ToClient {
            id: 0,
            msg: SidecarMsg::Error {
                code: ErrorCode::TooBig,
                message: "x".into()
            }
        })[HEADER_LEN..],
        [22, 0, 1, 0, b'x']
    );
}

#[test]
fn encode_appends() {
    // Frames encoded one after the other into one buffer are each whole.
    let a = ToClient {
        id: 1,
        msg: SidecarMsg::Done,
    };
    let b = ToClient {
        id: 2,
        msg: SidecarMsg::Result {
            body: Bytes::from_static(b"r"),
        },
    };
    let mut out = BytesMut::new();
    a.encode(&mut out);
    let p = b.encode_parts(&mut out).unwrap();
    out.extend_from_slice(&p);
    b.encode(&mut out);
    let mut buf = out.freeze();
    let mut got = Vec::new();
    while !buf.is_empty() {
        let (h, _) = split(&buf).unwrap();
        let frame = buf.split_to(HEADER_LEN + h.body_len());
        got.push(decode_to_client(&h, frame.slice(HEADER_LEN..)).unwrap());
    }
    assert_eq!(got, vec![a, b.clone(), b]);
}

#[test]
fn long_strings_are_cut_at_a_char_boundary() {
    // 'é' is two bytes: 40,000 of them are 80,000 bytes; 65,535 is odd, so the cut is 65,534.
    let reason = "é".repeat(40_000);
    let m = FromClient {
        id: 1,
        msg: ClientMsg::Close {
            channel: 1,
            reason: reason.clone(),
        },
    };
    let frame = encode_client(&m);
    assert_eq!(frame.len(), m.frame_len());
    let (h, body) = split(&frame).unwrap();
    let Ok(FromClient {
        msg: ClientMsg::Close { reason: got, .. },
        ..
    }) = decode_from_client(&h, body)
    else {
        panic!("a valid CLOSE")
    };
    assert_eq!(got.len(), 65_534);
    assert!(reason.starts_with(&got));
    // Exactly 65,535 bytes fit whole.
    let tool = "a".repeat(65_535);
    let m = FromClient {
        id: 1,
        msg: ClientMsg::Serve { tool },
    };
    let frame = encode_client(&m);
    let (h, body) = split(&frame).unwrap();
    assert_eq!(decode_from_client(&h, body), Ok(m));
}

#[test]
fn every_error_displays_its_kind() {
    let errors = [
        WireError::Truncated {
            kind: kind::CALL,
            field: "tool",
        },
        WireError::TrailingBytes {
            kind: kind::CALL,
            extra: 1,
        },
        WireError::NotUtf8 {
            kind: kind::CALL,
            field: "tool",
        },
        WireError::BadValue {
            kind: kind::CALL,
            field: "flags",
            value: 4,
        },
        WireError::TooManyItems {
            kind: kind::CALL,
            field: "n",
            count: 9,
            remaining: 1,
        },
        WireError::BodyLenMismatch {
            kind: kind::CALL,
            expected: 1,
            actual: 2,
        },
    ];
    for e in errors {
        assert!(e.to_string().starts_with("CALL: "), "{e}");
        assert_eq!(e.code(), ErrorCode::Malformed);
    }
    let e = WireError::Truncated {
        kind: 0x7777,
        field: "x",
    };
    assert!(e.to_string().starts_with("kind 0x7777"), "{e}");
}
