//! Named channels over the simulator: the name travels in front of the channel's first chunk,
//! the acceptor sees it when the channel is offered, and the message bodies are unchanged,
//! fragmented, reordered, lost or resumed.

mod sim_common;

use std::time::{Duration, Instant};

use agentfabric::core::{PeerParams, Role, Session};
use agentfabric::frame::{
    name_prefix, Frame, Header, Kind, FLAG_FIRST, FLAG_LAST, FLAG_RETRANSMIT, MAX_CHANNEL_NAME,
    MSG_NAMED,
};
use agentfabric::sim::{LinkConfig, Side, Sim, SimConfig};
use agentfabric::{Bytes, Class, Config, Error, Priority};
use sim_common::{assert_alive, body};

const NAME: &str = "planner → retriever #1";

#[test]
fn the_name_arrives_and_the_bodies_are_unchanged() {
    let mut sim =
        Sim::new(SimConfig::new(1).link(LinkConfig::with_delay(Duration::from_micros(200))));
    sim.record_frames(true);
    let now = sim.now();
    let ch = sim
        .a_mut()
        .open_named_channel(Class::Coordination, Priority::DEFAULT, NAME)
        .unwrap();
    assert_eq!(sim.a().channel_name(ch), Some(NAME));
    let plain = sim
        .a_mut()
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    for i in 0..3 {
        sim.a_mut().send(now, ch, body(i, 100), 0, i).unwrap();
    }
    sim.a_mut().send(now, plain, body(9, 10), 0, 0).unwrap();
    assert!(sim.run_until(
        |s| s.b().readable(ch) && s.b().readable(plain),
        Duration::from_millis(5)
    ));
    let mut accepted = vec![sim.b_mut().accept_channel().unwrap()];
    accepted.push(sim.b_mut().accept_channel().unwrap());
    accepted.sort_unstable();
    assert_eq!(accepted, vec![ch, plain]);
    assert_eq!(sim.b().channel_name(ch), Some(NAME));
    assert_eq!(sim.b().channel_name(plain), None);
    for i in 0..3 {
        let m = sim.b_mut().recv(ch).unwrap();
        assert_eq!(m.body, body(i, 100), "message {i} unchanged");
        assert_eq!(
            m.msg_flags & MSG_NAMED,
            0,
            "the flag is not the application's"
        );
    }
    assert_eq!(sim.b_mut().recv(plain).unwrap().body, body(9, 10));
    // Only the channel's first chunk carried the name.
    let named: Vec<Header> = sim
        .delivered_frames()
        .iter()
        .filter(|(_, _, h)| h.kind == Kind::Data && h.msg_flags & MSG_NAMED != 0)
        .map(|(_, _, h)| *h)
        .collect();
    assert_eq!(named.len(), 1);
    assert_eq!(
        (named[0].channel, named[0].seq, named[0].offset),
        (ch, 0, 0)
    );
    assert_eq!(named[0].len as usize, 1 + NAME.len() + 100);
    assert_alive(&sim);
}

#[test]
fn a_fragmented_first_message_with_a_name_over_a_lossy_link() {
    let mut cfg = Config::default();
    cfg.chunk_size.coordination = 1000;
    let mut sim = Sim::new(
        SimConfig::new(2)
            .config(cfg)
            .link(LinkConfig::lossy(Duration::from_micros(300), 0.05)),
    );
    sim.record_frames(true);
    let ch = sim
        .a_mut()
        .open_named_channel(Class::Coordination, Priority::new(3).unwrap(), NAME)
        .unwrap();
    // Far more than the receive window in all: the prefix's credit must come back.
    let window = Config::default().recv_window.coordination as usize;
    let msgs: Vec<Bytes> = (0..40).map(|i| body(i, 30_000 + i as usize)).collect();
    assert!(msgs.iter().map(Bytes::len).sum::<usize>() > 4 * window);
    let mut sent = 0;
    let mut got = 0;
    let mut name_seen = None;
    let done = sim.run_until(
        |s| {
            let now = s.now();
            while sent < msgs.len() && s.a_mut().send(now, ch, msgs[sent].clone(), 0, 0).is_ok() {
                sent += 1;
            }
            if let Some(id) = s.b_mut().accept_channel() {
                assert_eq!(id, ch);
                name_seen = s.b().channel_name(id).map(str::to_owned);
            }
            while let Some(m) = s.b_mut().recv(ch) {
                assert!(m.body == msgs[got], "message {got} differs");
                got += 1;
            }
            got == msgs.len()
        },
        Duration::from_secs(30),
    );
    assert!(done, "{got} of {} messages arrived", msgs.len());
    assert_eq!(name_seen.as_deref(), Some(NAME));
    // No chunk, the named one included, is larger than the chunk size.
    for (_, _, h) in sim.delivered_frames() {
        if h.kind == Kind::Data {
            assert!(h.len <= 1000, "a chunk of {} bytes", h.len);
        }
    }
    assert!(sim.link_stats(Side::A).lost > 0, "the link lost frames");
    assert_alive(&sim);
}

#[test]
fn the_channel_is_offered_once_its_named_first_chunk_is_in() {
    // A lossy transport's receiver may see later chunks first: the channel waits for the
    // first one, so the application never sees it without its name.
    let now = Instant::now();
    let cfg = Config::default();
    let peer = PeerParams {
        recv_window: cfg.recv_window,
    };
    let mut b = Session::new(Role::Acceptor, cfg, peer, false, now);
    let prefix = name_prefix("late");
    let chunk = |seq: u64, offset: u64, flags: u16, msg_flags: u8, payload: Bytes| {
        let mut h = Header::new(Kind::Data);
        h.channel = 0;
        h.seq = seq;
        h.offset = offset;
        h.flags = flags;
        h.msg_flags = msg_flags;
        h.len = payload.len() as u32;
        Frame { header: h, payload }
    };
    let first_len = (prefix.len() + 5) as u64;
    b.handle_frame(
        now,
        chunk(1, first_len, FLAG_FIRST | FLAG_LAST, 0, body(2, 7)),
    )
    .unwrap();
    assert_eq!(
        b.accept_channel(),
        None,
        "not offered before its first chunk"
    );
    let mut first = prefix.to_vec();
    first.extend_from_slice(&body(1, 5));
    b.handle_frame(
        now,
        chunk(0, 0, FLAG_FIRST | FLAG_LAST, MSG_NAMED, Bytes::from(first)),
    )
    .unwrap();
    assert_eq!(b.accept_channel(), Some(0));
    assert_eq!(b.channel_name(0), Some("late"));
    assert_eq!(b.recv(0).unwrap().body, body(1, 5));
    assert_eq!(b.recv(0).unwrap().body, body(2, 7));
}

#[test]
fn a_resume_in_the_middle_of_the_named_first_message() {
    let link = LinkConfig::with_delay(Duration::from_millis(5)).bandwidth(100 << 20);
    let mut sim = Sim::new(SimConfig::new(3).link(link));
    sim.record_frames(true);
    let now = sim.now();
    let ch = sim
        .a_mut()
        .open_named_channel(Class::Bulk, Priority::DEFAULT, NAME)
        .unwrap();
    let big = body(7, 3 << 20);
    sim.a_mut().send(now, ch, big.clone(), 0, 0).unwrap();
    // Cut while the first chunks are on the wire, none acknowledged.
    sim.run_for(Duration::from_millis(3));
    assert!(sim.a().stats().inflight > 0);
    sim.disconnect();
    sim.run_for(Duration::from_millis(10));
    sim.reconnect();
    assert!(sim.run_until(|s| s.b().readable(ch), Duration::from_secs(5)));
    assert_eq!(sim.b_mut().accept_channel(), Some(ch));
    assert_eq!(sim.b().channel_name(ch), Some(NAME));
    let m = sim.b_mut().recv(ch).unwrap();
    assert_eq!(m.body.len(), big.len());
    assert!(m.body == big, "the message is intact");
    // The named first chunk went again, as it was.
    let named: Vec<&Header> = sim
        .delivered_frames()
        .iter()
        .filter(|(_, _, h)| h.kind == Kind::Data && h.msg_flags & MSG_NAMED != 0)
        .map(|(_, _, h)| h)
        .collect();
    assert!(named.iter().all(|h| h.seq == 0 && h.offset == 0));
    assert!(
        named.iter().any(|h| h.flags & FLAG_RETRANSMIT != 0),
        "the named chunk was sent again after the resume"
    );
    assert_eq!(sim.a().stats().resumes, 1);
    assert_alive(&sim);
}

#[test]
fn bad_names_are_refused_before_anything_is_opened() {
    let mut sim = Sim::new(SimConfig::new(4));
    let long = "x".repeat(MAX_CHANNEL_NAME + 1);
    for bad in ["", long.as_str()] {
        match sim
            .a_mut()
            .open_named_channel(Class::Coordination, Priority::DEFAULT, bad)
        {
            Err(Error::InvalidChannelName(m)) => {
                assert!(m.contains("64"), "the error names the limit: {m}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert_eq!(sim.a().stats().channels, 0);
    // 64 bytes of multi-byte characters is the longest name.
    let longest = "é".repeat(MAX_CHANNEL_NAME / 2);
    let ch = sim
        .a_mut()
        .open_named_channel(Class::Coordination, Priority::DEFAULT, &longest)
        .unwrap();
    let now = sim.now();
    sim.a_mut().send(now, ch, Bytes::new(), 0, 0).unwrap();
    assert!(sim.run_until(|s| s.b().readable(ch), Duration::from_millis(5)));
    assert_eq!(sim.b_mut().accept_channel(), Some(ch));
    assert_eq!(sim.b().channel_name(ch), Some(longest.as_str()));
    assert!(sim.b_mut().recv(ch).unwrap().body.is_empty());
}
