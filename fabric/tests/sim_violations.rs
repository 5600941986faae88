//! Protocol violations, fed to a session as hand-built frames: each one kills the session with
//! its typed error (returned, reported as `Event::Dead`, and returned by every later call),
//! never a panic; and the healthy peer then detects the death in bounded time.

mod sim_common;

use std::time::{Duration, Instant};

use agentfabric::core::{Event, PeerParams, Role, Session};
use agentfabric::frame::{
    Frame, Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST, FLAG_RETRANSMIT, MAX_CHANNEL_NAME,
    MAX_REFUSAL_REASON, MSG_NAMED, MSG_REFUSE, MSG_REQUEST,
};
use agentfabric::sim::{LinkConfig, Side, Sim, SimConfig};
use agentfabric::{Bytes, Class, Config, Error, Priority, ProtocolError};
use proptest::prelude::*;
use sim_common::{rng, Traffic};

const FL: u16 = FLAG_FIRST | FLAG_LAST;

fn acceptor(cfg: Config, reliable: bool) -> (Session, Instant) {
    let now = Instant::now();
    let peer = PeerParams {
        recv_window: cfg.recv_window,
    };
    (Session::new(Role::Acceptor, cfg, peer, reliable, now), now)
}

fn data(ch: u32, class: Class, seq: u64, offset: u64, flags: u16, len: usize) -> Frame {
    let mut h = Header::new(Kind::Data);
    h.channel = ch;
    h.class = class;
    h.seq = seq;
    h.offset = offset;
    h.flags = flags;
    h.len = len as u32;
    Frame {
        header: h,
        payload: Bytes::from(vec![0xAB; len]),
    }
}

fn accept(s: &mut Session, now: Instant, f: Frame) {
    s.handle_frame(now, f).expect("a valid frame is accepted");
}

/// Feeds `bad` and checks the session died of `expected`, everywhere it should show.
fn expect_violation(s: &mut Session, now: Instant, bad: Frame, expected: ProtocolError) {
    let err = Error::Protocol(expected);
    assert_eq!(s.handle_frame(now, bad), Err(err.clone()));
    assert_eq!(s.dead(), Some(&err));
    let events: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
    let deads: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Dead(_)))
        .collect();
    assert_eq!(
        deads,
        vec![&Event::Dead(err.clone())],
        "exactly one Dead event"
    );
    assert!(err.is_fatal());
    // Everything afterwards fails with the same error; nothing more goes out.
    assert_eq!(
        s.handle_frame(now, data(0, Class::Coordination, 0, 0, FL, 1)),
        Err(err.clone())
    );
    assert_eq!(
        s.open_channel(Class::Coordination, Priority::DEFAULT),
        Err(err.clone())
    );
    assert_eq!(s.send(now, 1, Bytes::new(), 0, 0), Err(err.clone()));
    assert_eq!(s.want_flush(1), Err(err.clone()));
    s.handle_timeout(now + Duration::from_secs(10));
    assert!(s.poll_transmit(now).is_none());
    assert!(s.poll_timeout().is_none());
    assert!(s.poll_event().is_none(), "no second Dead");
    assert_eq!(s.dead(), Some(&err));
}

#[test]
fn sequence_from_the_future_on_reliable_transport() {
    let (mut s, now) = acceptor(Config::default(), true);
    accept(&mut s, now, data(0, Class::Coordination, 0, 0, FL, 10));
    // Seq 1 is missing: a reliable transport never loses, so this is a violation.
    expect_violation(
        &mut s,
        now,
        data(0, Class::Coordination, 2, 10, FL, 10),
        ProtocolError::SequenceFromFuture {
            channel: 0,
            seq: 2,
            expected: 1,
        },
    );
}

#[test]
fn sequence_far_in_the_future_on_lossy_transport() {
    let (mut s, now) = acceptor(Config::default(), false);
    // A small gap is reordering: buffered, no error...
    accept(&mut s, now, data(0, Class::Bulk, 3, 30, FL, 10));
    assert!(!s.readable(0));
    assert_eq!(s.buffered_bytes(0), 10);
    // ...a gap beyond the reorder bound is not.
    expect_violation(
        &mut s,
        now,
        data(0, Class::Bulk, 100_000, 0, FL, 1),
        ProtocolError::SequenceFromFuture {
            channel: 0,
            seq: 100_000,
            expected: 0,
        },
    );
}

#[test]
fn credit_exceeded() {
    let cfg = Config::default();
    let window = u64::from(cfg.recv_window.coordination);
    let (mut s, now) = acceptor(cfg, true);
    // A whole message, left unread: its bytes still count against the window.
    accept(&mut s, now, data(0, Class::Coordination, 0, 0, FL, 1000));
    // The peer never got more credit than the window: a chunk ending past it is refused.
    let len = window as usize - 1000 + 1;
    expect_violation(
        &mut s,
        now,
        data(0, Class::Coordination, 1, 1000, FL, len),
        ProtocolError::CreditExceeded {
            channel: 0,
            end: window + 1,
            credit: window,
        },
    );
}

#[test]
fn credit_exceeded_even_when_reordered() {
    let cfg = Config::default();
    let window = u64::from(cfg.recv_window.toolcall);
    let (mut s, now) = acceptor(cfg, false);
    expect_violation(
        &mut s,
        now,
        data(0, Class::ToolCall, 5, window, FL, 1),
        ProtocolError::CreditExceeded {
            channel: 0,
            end: window + 1,
            credit: window,
        },
    );
}

#[test]
fn continuation_without_first_chunk() {
    let (mut s, now) = acceptor(Config::default(), true);
    expect_violation(
        &mut s,
        now,
        data(0, Class::Coordination, 0, 0, FLAG_LAST, 5),
        ProtocolError::BadFragment { channel: 0 },
    );
}

#[test]
fn first_chunk_inside_a_message() {
    let (mut s, now) = acceptor(Config::default(), true);
    accept(&mut s, now, data(2, Class::Bulk, 0, 0, FLAG_FIRST, 5));
    expect_violation(
        &mut s,
        now,
        data(2, Class::Bulk, 1, 5, FL, 5),
        ProtocolError::BadFragment { channel: 2 },
    );
}

#[test]
fn offset_mismatch() {
    let (mut s, now) = acceptor(Config::default(), true);
    accept(&mut s, now, data(0, Class::Coordination, 0, 0, FL, 5));
    expect_violation(
        &mut s,
        now,
        data(0, Class::Coordination, 1, 6, FL, 5),
        ProtocolError::OffsetMismatch {
            channel: 0,
            expected: 5,
            got: 6,
        },
    );
}

#[test]
fn ack_beyond_what_was_sent() {
    let (mut s, now) = acceptor(Config::default(), true);
    let ch = s
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    s.send(now, ch, Bytes::from_static(b"one chunk"), 0, 0)
        .unwrap();
    assert!(s.poll_transmit(now).is_some());
    let mut h = Header::new(Kind::Ack);
    h.channel = ch;
    h.ack = 1; // fine: one chunk was sent
    accept(
        &mut s,
        now,
        Frame {
            header: h,
            payload: Bytes::new(),
        },
    );
    h.ack = 3;
    expect_violation(
        &mut s,
        now,
        Frame {
            header: h,
            payload: Bytes::new(),
        },
        ProtocolError::AckBeyondSent {
            channel: ch,
            ack: 3,
            sent: 1,
        },
    );
}

#[test]
fn ack_beyond_sent_piggybacked_on_data() {
    let (mut s, now) = acceptor(Config::default(), true);
    let mut f = data(0, Class::Coordination, 0, 0, FL, 5);
    f.header.ack = 1; // we never sent anything on channel 0
    expect_violation(
        &mut s,
        now,
        f,
        ProtocolError::AckBeyondSent {
            channel: 0,
            ack: 1,
            sent: 0,
        },
    );
}

#[test]
fn class_change_on_an_existing_channel() {
    let (mut s, now) = acceptor(Config::default(), true);
    accept(&mut s, now, data(0, Class::Coordination, 0, 0, FL, 5));
    expect_violation(
        &mut s,
        now,
        data(0, Class::Bulk, 1, 5, FL, 5),
        ProtocolError::UnknownChannel { channel: 0 },
    );
}

#[test]
fn data_on_a_channel_of_ours_never_opened() {
    // Odd ids are the acceptor's: the initiator cannot open channel 7.
    let (mut s, now) = acceptor(Config::default(), true);
    expect_violation(
        &mut s,
        now,
        data(7, Class::Coordination, 0, 0, FL, 5),
        ProtocolError::UnknownChannel { channel: 7 },
    );
}

#[test]
fn too_many_channels() {
    let cfg = Config {
        max_channels: 2,
        ..Config::default()
    };
    let (mut s, now) = acceptor(cfg, true);
    accept(&mut s, now, data(0, Class::Coordination, 0, 0, FL, 1));
    accept(&mut s, now, data(2, Class::Coordination, 0, 0, FL, 1));
    expect_violation(
        &mut s,
        now,
        data(4, Class::Coordination, 0, 0, FL, 1),
        ProtocolError::TooManyChannels { max: 2 },
    );
}

#[test]
fn message_larger_than_max_message() {
    let cfg = Config {
        max_message: 1000,
        ..Config::default()
    };
    // Cut in chunks...
    let (mut s, now) = acceptor(cfg.clone(), true);
    accept(
        &mut s,
        now,
        data(0, Class::Coordination, 0, 0, FLAG_FIRST, 600),
    );
    expect_violation(
        &mut s,
        now,
        data(0, Class::Coordination, 1, 600, 0, 600),
        ProtocolError::MessageTooLarge {
            channel: 0,
            len: 1200,
            max: 1000,
        },
    );
    // ...or in one chunk.
    let (mut s, now) = acceptor(cfg, true);
    expect_violation(
        &mut s,
        now,
        data(0, Class::Coordination, 0, 0, FL, 1500),
        ProtocolError::MessageTooLarge {
            channel: 0,
            len: 1500,
            max: 1000,
        },
    );
}

#[test]
fn handshake_frame_inside_a_session() {
    let (mut s, now) = acceptor(Config::default(), true);
    expect_violation(
        &mut s,
        now,
        Frame {
            header: Header::new(Kind::Hello),
            payload: Bytes::new(),
        },
        ProtocolError::UnexpectedFrame("handshake"),
    );
}

fn with_payload(mut f: Frame, msg_flags: u8, payload: Vec<u8>) -> Frame {
    f.header.msg_flags = msg_flags;
    f.header.len = payload.len() as u32;
    f.payload = Bytes::from(payload);
    f
}

/// A first chunk on channel 0 (opened by the peer) flagged `MSG_NAMED` with `payload`.
fn named(payload: Vec<u8>) -> Frame {
    with_payload(
        data(0, Class::Coordination, 0, 0, FL, 0),
        MSG_NAMED,
        payload,
    )
}

#[test]
fn channel_name_longer_than_the_limit() {
    let (mut s, now) = acceptor(Config::default(), true);
    let mut p = vec![(MAX_CHANNEL_NAME + 1) as u8];
    p.extend(std::iter::repeat_n(b'n', MAX_CHANNEL_NAME + 1));
    p.extend_from_slice(b"body");
    expect_violation(
        &mut s,
        now,
        named(p),
        ProtocolError::BadChannelName { channel: 0 },
    );
}

#[test]
fn channel_name_not_utf8() {
    let (mut s, now) = acceptor(Config::default(), true);
    expect_violation(
        &mut s,
        now,
        named(vec![2, 0xff, 0xfe, b'x']),
        ProtocolError::BadChannelName { channel: 0 },
    );
}

#[test]
fn channel_name_truncated_or_empty() {
    for p in [vec![10, b'a', b'b'], vec![], vec![0, b'x']] {
        let (mut s, now) = acceptor(Config::default(), true);
        expect_violation(
            &mut s,
            now,
            named(p),
            ProtocolError::BadChannelName { channel: 0 },
        );
    }
}

#[test]
fn channel_name_on_a_chunk_other_than_the_first() {
    // On the second message of the channel.
    let (mut s, now) = acceptor(Config::default(), true);
    accept(&mut s, now, data(0, Class::Coordination, 0, 0, FL, 5));
    expect_violation(
        &mut s,
        now,
        with_payload(
            data(0, Class::Coordination, 1, 5, FL, 0),
            MSG_NAMED,
            vec![1, b'a'],
        ),
        ProtocolError::BadChannelName { channel: 0 },
    );
    // On a continuation of the first message.
    let (mut s, now) = acceptor(Config::default(), true);
    accept(
        &mut s,
        now,
        with_payload(
            data(0, Class::Coordination, 0, 0, FLAG_FIRST, 0),
            MSG_NAMED,
            vec![1, b'a', 1, 2, 3],
        ),
    );
    expect_violation(
        &mut s,
        now,
        with_payload(
            data(0, Class::Coordination, 1, 5, FLAG_LAST, 0),
            MSG_NAMED,
            vec![1, b'a'],
        ),
        ProtocolError::BadChannelName { channel: 0 },
    );
}

#[test]
fn channel_name_from_the_side_that_did_not_open_the_channel() {
    let (mut s, now) = acceptor(Config::default(), true);
    let ch = s
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    expect_violation(
        &mut s,
        now,
        with_payload(
            data(ch, Class::Coordination, 0, 0, FL, 0),
            MSG_NAMED,
            vec![1, b'a'],
        ),
        ProtocolError::BadChannelName { channel: ch },
    );
}

/// A refusal (or what claims to be one) on a channel this side (the acceptor) opened.
fn refusal_on(ch: u32, seq: u64, offset: u64, msg_flags: u8, reason: Vec<u8>) -> Frame {
    with_payload(
        data(ch, Class::ToolCall, seq, offset, FL, 0),
        msg_flags,
        reason,
    )
}

fn own_channel(s: &mut Session) -> u32 {
    s.open_channel(Class::ToolCall, Priority::DEFAULT).unwrap()
}

#[test]
fn refusal_from_the_side_that_opened_the_channel() {
    let (mut s, now) = acceptor(Config::default(), true);
    // Channel 0 is the peer's own: it cannot refuse it.
    expect_violation(
        &mut s,
        now,
        with_payload(
            data(0, Class::ToolCall, 0, 0, FL, 0),
            MSG_REFUSE,
            b"no".to_vec(),
        ),
        ProtocolError::BadRefusal { channel: 0 },
    );
}

#[test]
fn refusal_with_other_message_flags() {
    let (mut s, now) = acceptor(Config::default(), true);
    let ch = own_channel(&mut s);
    expect_violation(
        &mut s,
        now,
        refusal_on(ch, 0, 0, MSG_REFUSE | MSG_REQUEST, b"no".to_vec()),
        ProtocolError::BadRefusal { channel: ch },
    );
}

#[test]
fn refusal_reason_not_utf8_or_too_long() {
    for reason in [vec![0xc3, 0x28], vec![b'r'; MAX_REFUSAL_REASON + 1]] {
        let (mut s, now) = acceptor(Config::default(), true);
        let ch = own_channel(&mut s);
        expect_violation(
            &mut s,
            now,
            refusal_on(ch, 0, 0, MSG_REFUSE, reason),
            ProtocolError::BadRefusal { channel: ch },
        );
    }
}

#[test]
fn message_after_a_refusal() {
    let (mut s, now) = acceptor(Config::default(), true);
    let ch = own_channel(&mut s);
    accept(
        &mut s,
        now,
        refusal_on(ch, 0, 0, MSG_REFUSE, b"no".to_vec()),
    );
    let events: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(events.contains(&Event::ChannelRefused {
        channel: ch,
        reason: "no".into()
    }));
    expect_violation(
        &mut s,
        now,
        refusal_on(ch, 1, 2, 0, b"more".to_vec()),
        ProtocolError::BadRefusal { channel: ch },
    );
}

#[test]
fn violation_mid_traffic_kills_one_side_and_the_peer_notices() {
    let mut sim =
        Sim::new(SimConfig::new(4).link(LinkConfig::lossy(Duration::from_micros(200), 0.02)));
    let timeout = sim.a().config().peer_timeout;
    let mut t = Traffic::new();
    t.add_random(&mut sim, &mut rng(4), 4, 50, 100 << 10);
    assert!(!t.run(&mut sim, Duration::from_millis(3)));
    let ch = t
        .flows
        .iter()
        .find(|f| f.from == Side::A)
        .map(|f| f.ch)
        .unwrap_or(0);
    // A frame as from A whose sequence is absurdly far ahead on a channel B knows.
    let mut h = Header::new(Kind::Data);
    h.channel = ch;
    h.class = t
        .flows
        .iter()
        .find(|f| f.ch == ch)
        .map_or(Class::Coordination, |f| f.class);
    h.seq = 1 << 40;
    h.flags = FL | FLAG_RETRANSMIT;
    h.msg_flags = MSG_REQUEST;
    sim.inject(
        Side::B,
        OutFrame {
            header: h.encode(),
            payload: Bytes::new(),
        },
    );
    let hit = sim.now();
    let both = sim.run_until(
        |s| {
            t.pump(s);
            s.a().dead().is_some() && s.b().dead().is_some()
        },
        timeout * 2,
    );
    assert!(both);
    let (at_b, err_b) = sim.dead_event(Side::B).unwrap();
    assert_eq!(at_b, hit, "B dies at once");
    assert!(
        matches!(err_b, Error::Protocol(ProtocolError::SequenceFromFuture { seq, .. }) if *seq == 1 << 40),
        "{err_b:?}"
    );
    assert_eq!(sim.frame_errors(Side::B).len(), 1);
    let (at_a, err_a) = sim.dead_event(Side::A).unwrap();
    assert!(matches!(err_a, Error::PeerDead { .. }), "{err_a:?}");
    assert!(
        at_a - hit <= timeout + Duration::from_millis(1),
        "A noticed after {:?}",
        at_a - hit
    );
    assert!(
        sim.link_stats(Side::A).dead_drops > 0,
        "A kept sending to a dead peer until then"
    );
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        prop_oneof![
            Just(Kind::Data),
            Just(Kind::Data),
            Just(Kind::Data),
            Just(Kind::Ack),
            Just(Kind::Ping),
            Just(Kind::Pong),
            Just(Kind::Close),
            Just(Kind::Hello),
        ],
        0u32..6,
        0usize..3,
        (0u64..12, 0u64..12, any::<u64>()),
        prop_oneof![0u64..70_000, any::<u64>()],
        0u16..64,
        0usize..20_000,
        (any::<u32>(), prop_oneof![Just(0u8), 0u8..32]),
    )
        .prop_map(
            |(kind, ch, class, (seq, ack, credit), offset, flags, len, (ts, msg_flags))| {
                let mut h = Header::new(kind);
                h.channel = ch;
                h.class = Class::ALL[class];
                h.seq = seq;
                h.ack = ack;
                h.credit = if credit % 2 == 0 {
                    credit
                } else {
                    credit % 300_000
                };
                h.offset = offset;
                h.flags = flags & (FLAG_FIRST | FLAG_LAST | FLAG_RETRANSMIT);
                h.len = len as u32;
                h.ts = ts;
                h.ts_echo = ts.rotate_left(7);
                // Message flags, names and refusals included: a named chunk's payload starts
                // with a length byte that may or may not fit.
                h.msg_flags = msg_flags;
                let mut payload = vec![1; len];
                if let Some(b) = payload.first_mut() {
                    *b = (ts % 80) as u8;
                }
                Frame {
                    header: h,
                    payload: Bytes::from(payload),
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: sim_common::proptest_cases(256), ..ProptestConfig::default() })]

    /// Any sequence of frames, valid or not, leaves the session either alive or dead of a
    /// typed protocol error; never a panic, and a dead session stays dead.
    #[test]
    fn arbitrary_frames_never_panic(
        reliable in any::<bool>(),
        frames in proptest::collection::vec(arb_frame(), 1..24),
    ) {
        let (mut s, t0) = acceptor(Config::default(), reliable);
        let ch = s.open_channel(Class::Coordination, Priority::DEFAULT).unwrap();
        let mut now = t0;
        let mut died: Option<Error> = None;
        for (i, f) in frames.into_iter().enumerate() {
            now += Duration::from_micros(50);
            let _ = s.send(now, ch, Bytes::from(vec![2; 3000 * i]), 0, i as u64);
            let r = s.handle_frame(now, f);
            match (&died, r) {
                (Some(e), r) => prop_assert_eq!(r, Err(e.clone())),
                (None, Ok(())) => {}
                (None, Err(e)) => {
                    prop_assert!(matches!(e, Error::Protocol(_)), "{:?}", e);
                    died = Some(e);
                }
            }
            while s.poll_transmit(now).is_some() {}
            for c in 0..6 {
                while s.recv(c).is_some() {}
            }
            s.handle_timeout(now);
            while let Some(e) = s.poll_event() {
                if let Event::Dead(e) = e {
                    prop_assert!(died.is_none() || died.as_ref() == Some(&e) || matches!(e, Error::ClosedByPeer(_)));
                    died.get_or_insert(e);
                }
            }
            prop_assert_eq!(s.dead().cloned(), died.clone());
        }
    }
}
