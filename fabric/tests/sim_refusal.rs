//! Channel refusal over the simulator: the side that accepted a channel refuses it (its
//! application dropped it, refused it, or takes no channels), and the opener learns it within
//! about a round trip, after what was queued before the refusal; other channels go on; a lost
//! refusal is sent again; a refusal survives a transport reconnection.

mod sim_common;

use std::time::Duration;

use agentfabric::core::Event;
use agentfabric::frame::{Kind, FLAG_RETRANSMIT, MSG_REFUSE, MSG_REQUEST, MSG_RESPONSE};
use agentfabric::sim::{LinkConfig, Side, Sim, SimConfig};
use agentfabric::{Bytes, Class, Config, Error, Priority};
use sim_common::assert_alive;

const DELAY: Duration = Duration::from_millis(2);

fn refused(channel: u32, reason: &str) -> Error {
    Error::ChannelRefused {
        channel,
        reason: reason.to_owned(),
    }
}

/// When side `side` saw channel `ch` refused, and why.
fn refusal_event(sim: &Sim, side: Side, ch: u32) -> Option<(std::time::Instant, String)> {
    sim.events(side).iter().find_map(|(at, e)| match e {
        Event::ChannelRefused { channel, reason } if *channel == ch => Some((*at, reason.clone())),
        _ => None,
    })
}

/// A opens a tool-call channel and a coordination channel; B accepts both after their first
/// messages (a request on the first). Returns (tool channel, coordination channel).
fn two_channels(sim: &mut Sim) -> (u32, u32) {
    let now = sim.now();
    let a = sim.a_mut();
    let tool = a.open_channel(Class::ToolCall, Priority::DEFAULT).unwrap();
    let coord = a
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    a.send(now, tool, Bytes::from_static(b"lookup"), MSG_REQUEST, 7)
        .unwrap();
    a.send(now, coord, Bytes::from_static(b"plan 1"), 0, 0)
        .unwrap();
    assert!(sim.run_until(|s| s.b().readable(tool) && s.b().readable(coord), DELAY * 4));
    let b = sim.b_mut();
    // (Coordination went first: it has priority.)
    assert_eq!(b.accept_channel(), Some(coord));
    assert_eq!(b.accept_channel(), Some(tool));
    assert_eq!(b.recv(tool).unwrap().tag, 7);
    assert_eq!(&b.recv(coord).unwrap().body[..], b"plan 1");
    (tool, coord)
}

#[test]
fn refusal_fails_the_channel_within_a_round_trip_and_spares_the_others() {
    let mut sim = Sim::new(SimConfig::new(1).link(LinkConfig::with_delay(DELAY)));
    let (tool, coord) = two_channels(&mut sim);
    sim.run_for(DELAY * 3); // the request's ack is back: nothing of it is left to retransmit
    assert_eq!(sim.a().stats().inflight, 0);
    let at = sim.now();
    sim.b_mut()
        .refuse_channel(at, tool, "no tools here")
        .unwrap();
    // B's own operations on the channel fail at once.
    assert_eq!(
        sim.b().channel_error(tool),
        Some(refused(tool, "no tools here"))
    );
    assert!(sim.run_until(|s| refusal_event(s, Side::A, tool).is_some(), DELAY * 10));
    let (when, reason) = refusal_event(&sim, Side::A, tool).unwrap();
    assert_eq!(reason, "no tools here");
    assert!(
        when - at <= DELAY + Duration::from_micros(100),
        "the refusal took {:?} for a one-way delay of {DELAY:?}",
        when - at
    );
    // The request never got a response; everything on the channel fails now.
    assert!(!sim
        .events(Side::A)
        .iter()
        .any(|(_, e)| matches!(e, Event::Response { .. })));
    let now = sim.now();
    let err = refused(tool, "no tools here");
    assert_eq!(
        sim.a_mut()
            .send(now, tool, Bytes::from_static(b"again"), 0, 0),
        Err(err.clone())
    );
    assert_eq!(sim.a_mut().poll_capacity(tool, 1), Err(err.clone()));
    assert_eq!(sim.a().channel_error(tool), Some(err.clone()));
    assert_eq!(
        sim.a_mut().want_flush(tool),
        Ok(true),
        "nothing was left unacknowledged"
    );
    // The other channel, both ways, and new channels go on.
    let now = sim.now();
    sim.a_mut()
        .send(now, coord, Bytes::from_static(b"plan 2"), 0, 0)
        .unwrap();
    let back = sim
        .b_mut()
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    sim.b_mut()
        .send(now, back, Bytes::from_static(b"done"), 0, 0)
        .unwrap();
    assert!(sim.run_until(|s| s.b().readable(coord) && s.a().readable(back), DELAY * 4));
    assert_eq!(&sim.b_mut().recv(coord).unwrap().body[..], b"plan 2");
    assert_eq!(&sim.a_mut().recv(back).unwrap().body[..], b"done");
    assert_alive(&sim);
}

#[test]
fn a_response_queued_before_the_refusal_arrives_before_it() {
    let mut sim = Sim::new(SimConfig::new(2).link(LinkConfig::with_delay(DELAY)));
    let (tool, _) = two_channels(&mut sim);
    let now = sim.now();
    // The handler answers, then its channel is dropped at once.
    sim.b_mut()
        .send(now, tool, Bytes::from_static(b"sunny"), MSG_RESPONSE, 7)
        .unwrap();
    sim.b_mut().refuse_channel(now, tool, "dropped").unwrap();
    assert!(sim.run_until(|s| refusal_event(s, Side::A, tool).is_some(), DELAY * 10));
    let events: Vec<&Event> = sim
        .events(Side::A)
        .iter()
        .map(|(_, e)| e)
        .filter(|e| matches!(e, Event::Response { .. } | Event::ChannelRefused { .. }))
        .collect();
    assert_eq!(
        events,
        vec![
            &Event::Response {
                channel: tool,
                tag: 7,
                result: Ok(Bytes::from_static(b"sunny")),
            },
            &Event::ChannelRefused {
                channel: tool,
                reason: "dropped".into(),
            },
        ],
        "the response first, then the refusal"
    );
    assert_alive(&sim);
}

#[test]
fn what_arrives_on_a_refused_channel_is_acknowledged_and_discarded() {
    let mut cfg = Config::default();
    cfg.send_queue_bytes.toolcall = 4 * cfg.recv_window.toolcall as usize;
    let mut sim = Sim::new(
        SimConfig::new(3)
            .config(cfg)
            .link(LinkConfig::with_delay(DELAY)),
    );
    let (tool, _) = two_channels(&mut sim);
    let now = sim.now();
    // A message waiting unread on B is dropped with the refusal.
    sim.a_mut()
        .send(now, tool, Bytes::from(vec![1u8; 40_000]), 0, 0)
        .unwrap();
    assert!(sim.run_until(|s| s.b().readable(tool), DELAY * 4));
    let now = sim.now();
    sim.b_mut().refuse_channel(now, tool, "full").unwrap();
    assert_eq!(sim.b().buffered_bytes(tool), 0);
    // A keeps sending while the refusal travels, until its send queue is full: more than its
    // credit, so some is still queued when the refusal arrives.
    sim.record_frames(true);
    let mut sent = 0;
    while sim
        .a_mut()
        .send(now, tool, Bytes::from(vec![7; 30_000]), 0, 0)
        .is_ok()
    {
        sent += 30_000;
    }
    assert!(sent > 2 * Config::default().recv_window.toolcall as usize);
    assert!(sim.run_until(|s| refusal_event(s, Side::A, tool).is_some(), DELAY * 10));
    assert!(
        sim.a().stats().queued_bytes == 0,
        "A dropped what it had queued"
    );
    // So a flush cannot say it all arrived.
    assert!(matches!(
        sim.a_mut().want_flush(tool),
        Err(Error::ChannelRefused { .. })
    ));
    let (refused_at, _) = refusal_event(&sim, Side::A, tool).unwrap();
    sim.run_for(DELAY * 4);
    // Nothing was sent on the channel after the refusal arrived.
    let last = sim
        .delivered_frames()
        .iter()
        .filter(|(_, from, h)| *from == Side::A && h.kind == Kind::Data && h.channel == tool)
        .map(|(at, _, _)| *at)
        .max()
        .unwrap();
    assert!(last <= refused_at + DELAY, "A sent on the refused channel");
    assert!(sim.b_mut().recv(tool).is_none(), "B reads nothing of it");
    assert_eq!(sim.b().buffered_bytes(tool), 0, "B holds nothing of it");
    assert_eq!(
        sim.a().stats().inflight,
        0,
        "everything A sent was acknowledged"
    );
    assert_eq!(
        sim.a().stats().queued_bytes,
        0,
        "A dropped what it had queued"
    );
    assert_alive(&sim);
}

#[test]
fn a_lost_refusal_is_sent_again() {
    let cfg = Config::default();
    let mut sim = Sim::new(
        SimConfig::new(4)
            .link(LinkConfig::with_delay(DELAY))
            .reliable(false),
    );
    sim.record_frames(true);
    let (tool, _) = two_channels(&mut sim);
    // B measures the round trip (its acknowledged data does), so its retransmission timeout
    // is the usual floor rather than the 100 ms it starts with.
    let now = sim.now();
    let back = sim
        .b_mut()
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    sim.b_mut()
        .send(now, back, Bytes::from_static(b"hello"), 0, 0)
        .unwrap();
    sim.run_for(DELAY * 3);
    assert!(sim.b().stats().srtt.is_some());
    // The refusal leaves B while the path drops everything.
    sim.partition(true);
    let at = sim.now();
    sim.b_mut().refuse_channel(at, tool, "gone").unwrap();
    sim.run_for(Duration::from_micros(100));
    sim.partition(false);
    assert!(
        sim.link_stats(Side::B).partition_drops > 0,
        "the refusal was lost"
    );
    assert!(refusal_event(&sim, Side::A, tool).is_none());
    assert!(sim.run_until(
        |s| refusal_event(s, Side::A, tool).is_some(),
        cfg.peer_timeout / 2
    ));
    // Sent again by the retransmission timer, as any unacknowledged chunk.
    let again = sim.delivered_frames().iter().any(|(_, from, h)| {
        *from == Side::B
            && h.kind == Kind::Data
            && h.channel == tool
            && h.msg_flags & MSG_REFUSE != 0
            && h.flags & FLAG_RETRANSMIT != 0
    });
    assert!(again, "the refusal arrived as a retransmission");
    let (when, _) = refusal_event(&sim, Side::A, tool).unwrap();
    assert!(
        when - at < cfg.min_rto * 4,
        "the refusal came {:?} after it was lost",
        when - at
    );
    assert_alive(&sim);
}

#[test]
fn a_refusal_survives_a_reconnection() {
    let mut sim = Sim::new(SimConfig::new(5).link(LinkConfig::with_delay(DELAY)));
    let (tool, coord) = two_channels(&mut sim);
    sim.run_for(DELAY * 3);
    let at = sim.now();
    sim.b_mut().refuse_channel(at, tool, "bye").unwrap();
    // The connection breaks while the refusal is on the wire; it comes again on the next.
    sim.run_for(Duration::from_micros(200));
    sim.disconnect();
    sim.run_for(DELAY * 2);
    assert!(
        refusal_event(&sim, Side::A, tool).is_none(),
        "lost with the connection"
    );
    sim.reconnect();
    assert!(sim.run_until(|s| refusal_event(s, Side::A, tool).is_some(), DELAY * 4));
    // Another reconnection changes nothing: both sides still hold the channel refused.
    sim.disconnect();
    sim.reconnect();
    let now = sim.now();
    assert_eq!(
        sim.a_mut().send(now, tool, Bytes::from_static(b"x"), 0, 0),
        Err(refused(tool, "bye"))
    );
    assert_eq!(sim.b().channel_error(tool), Some(refused(tool, "bye")));
    sim.a_mut()
        .send(now, coord, Bytes::from_static(b"still here"), 0, 0)
        .unwrap();
    assert!(sim.run_until(|s| s.b().readable(coord), DELAY * 4));
    assert_eq!(sim.a().stats().resumes, 2);
    assert_alive(&sim);
}

#[test]
fn channels_are_refused_as_they_arrive_while_the_application_takes_none() {
    let cfg = Config {
        max_channels: 8,
        ..Config::default()
    };
    let mut sim = Sim::new(
        SimConfig::new(6)
            .config(cfg)
            .link(LinkConfig::with_delay(DELAY)),
    );
    let now = sim.now();
    // One channel waits to be accepted when the application stops taking channels.
    let waiting = sim
        .a_mut()
        .open_channel(Class::ToolCall, Priority::DEFAULT)
        .unwrap();
    sim.a_mut()
        .send(now, waiting, Bytes::from_static(b"q0"), MSG_REQUEST, 1)
        .unwrap();
    assert!(sim.run_until(|s| s.b().readable(waiting), DELAY * 4));
    let now = sim.now();
    sim.b_mut().refuse_new_channels(now, Some("nobody home"));
    assert_eq!(sim.b_mut().accept_channel(), None);
    // Then channels keep arriving.
    let mut late = Vec::new();
    for i in 0..5u64 {
        let ch = sim
            .a_mut()
            .open_channel(Class::ToolCall, Priority::DEFAULT)
            .unwrap();
        sim.a_mut()
            .send(now, ch, Bytes::from_static(b"q"), MSG_REQUEST, 2 + i)
            .unwrap();
        late.push(ch);
    }
    assert!(sim.run_until(
        |s| std::iter::once(waiting)
            .chain(late.iter().copied())
            .all(|ch| refusal_event(s, Side::A, ch).is_some()),
        DELAY * 4
    ));
    for ch in std::iter::once(waiting).chain(late.iter().copied()) {
        let (when, reason) = refusal_event(&sim, Side::A, ch).unwrap();
        assert_eq!(reason, "nobody home");
        assert!(when - now <= DELAY * 2 + Duration::from_micros(100));
    }
    assert_eq!(sim.b_mut().accept_channel(), None, "none was offered");
    // Refused channels count as channels: the set is bounded by max_channels.
    assert_eq!(sim.b().stats().channels, 6);
    // Taking channels again: the next one is offered.
    let now = sim.now();
    sim.b_mut().refuse_new_channels(now, None);
    let next = sim
        .a_mut()
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    sim.a_mut()
        .send(now, next, Bytes::from_static(b"hi"), 0, 0)
        .unwrap();
    assert!(sim.run_until(|s| s.b().readable(next), DELAY * 4));
    assert_eq!(sim.b_mut().accept_channel(), Some(next));
    assert!(refusal_event(&sim, Side::A, next).is_none());
    assert_alive(&sim);
}

#[test]
fn only_a_channel_the_peer_opened_can_be_refused() {
    let mut sim = Sim::new(SimConfig::new(7).link(LinkConfig::with_delay(DELAY)));
    let (tool, _) = two_channels(&mut sim);
    let now = sim.now();
    assert!(matches!(
        sim.a_mut().refuse_channel(now, tool, "mine"),
        Err(Error::Config(_))
    ));
    assert_eq!(
        sim.b_mut().refuse_channel(now, 999, "?"),
        Err(Error::UnknownChannel(999))
    );
    // Refusing twice sends one refusal.
    sim.record_frames(true);
    sim.b_mut().refuse_channel(now, tool, "once").unwrap();
    sim.b_mut().refuse_channel(now, tool, "twice").unwrap();
    sim.run_for(DELAY * 4);
    let refusals = sim
        .delivered_frames()
        .iter()
        .filter(|(_, from, h)| *from == Side::B && h.msg_flags & MSG_REFUSE != 0)
        .count();
    assert_eq!(refusals, 1);
    assert_eq!(refusal_event(&sim, Side::A, tool).unwrap().1, "once");
    assert_alive(&sim);
}
