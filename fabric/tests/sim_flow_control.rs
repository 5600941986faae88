//! Flow control and bounded memory: a receiver that does not read a channel while the sender
//! offers ten times its window. The sender is pushed back (`WouldBlock`), the receiver never
//! holds more than the window plus one message, other channels are not held up, and once the
//! receiver reads, everything arrives.

mod sim_common;

use std::time::Duration;

use agentfabric::core::Event;
use agentfabric::sim::{LinkConfig, Side, Sim, SimConfig};
use agentfabric::{Class, Config};
use rand::Rng;
use sim_common::{assert_alive, body, rng, Traffic};

fn stalled_reader(link: LinkConfig, reliable: bool, class: Class, seed: u64) {
    let cfg = Config::default();
    let window = cfg.recv_window.get(class) as usize;
    let send_queue = cfg.send_queue_bytes.get(class);
    let mut sim = Sim::new(SimConfig::new(seed).link(link).reliable(reliable));
    let mut r = rng(seed);
    let mut t = Traffic::new();
    // Ten windows' worth of messages of 0..=64 KiB on the channel nobody reads...
    let max_msg = 64 << 10;
    let mut msgs = Vec::new();
    let mut total = 0;
    while total < 10 * window {
        let len = r.gen_range(0..=max_msg);
        total += len;
        msgs.push(body(r.gen(), len));
    }
    let n = msgs.len();
    let stalled = t.add(&mut sim, Side::A, class, 3, msgs);
    t.flows[stalled].reading = false;
    let ch = t.flows[stalled].ch;
    // ...and a channel of the same class that is read normally.
    let other_msgs = (0..200).map(|i| body(i, r.gen_range(0..8192))).collect();
    let other = t.add(&mut sim, Side::A, class, 3, other_msgs);

    let mut max_buffered = 0;
    let mut max_queued = 0;
    let bound = window + max_msg;
    let check = |s: &Sim, max_buffered: &mut usize, max_queued: &mut u64| {
        let b = s.b().buffered_bytes(ch);
        assert!(
            b <= bound,
            "receiver holds {b} bytes, more than window + message ({bound})"
        );
        *max_buffered = (*max_buffered).max(b);
        *max_queued = (*max_queued).max(s.a().stats().queued_bytes);
    };
    let done = sim.run_until(
        |s| {
            t.pump(s);
            check(s, &mut max_buffered, &mut max_queued);
            false
        },
        Duration::from_secs(3),
    );
    assert!(!done);
    assert_alive(&sim);
    let f = &t.flows[stalled];
    assert!(f.would_block > 0, "send was pushed back");
    assert!(f.sent < n, "the sender could not queue everything");
    assert_eq!(f.received, 0);
    // Memory is bounded on both sides, whatever the offered load.
    assert!(
        max_queued as usize <= 2 * (send_queue + max_msg),
        "sender queued {max_queued}"
    );
    assert!(
        max_buffered >= window / 2,
        "the window was used ({max_buffered})"
    );
    let unread = sim.b().channel_stats(ch).unwrap().unread_messages;
    assert!(unread > 0 && unread < n);
    // The channel that is read is not held up by the one that is not.
    assert!(
        t.flows[other].done(),
        "head-of-line blocking between channels"
    );
    eprintln!(
        "{class}: {} of {n} queued, {} unread, receiver max {max_buffered} B (window {window}), \
         sender max queued {max_queued} B, {} WouldBlock",
        f.sent, unread, f.would_block
    );

    // The receiver starts reading: everything arrives, in order.
    t.flows[stalled].reading = true;
    let start = sim.now();
    let done = sim.run_until(
        |s| {
            let all = t.pump(s);
            check(s, &mut max_buffered, &mut max_queued);
            all
        },
        Duration::from_secs(30),
    );
    assert!(done, "everything arrives once the receiver reads");
    t.assert_complete(&sim);
    eprintln!("drained in {:?} virtual", sim.now() - start);
    // The sender was told when its full send queue had room again.
    assert!(sim
        .events(Side::A)
        .iter()
        .any(|(_, e)| *e == Event::Writable(ch)));
}

#[test]
fn stalled_reader_reliable_coordination() {
    stalled_reader(
        LinkConfig::with_delay(Duration::from_micros(100)).bandwidth(1 << 30),
        true,
        Class::Coordination,
        1,
    );
}

#[test]
fn stalled_reader_reliable_toolcall() {
    stalled_reader(
        LinkConfig::with_delay(Duration::from_micros(100)),
        true,
        Class::ToolCall,
        2,
    );
}

#[test]
fn stalled_reader_lossy_link() {
    for seed in 3..6 {
        stalled_reader(
            LinkConfig::lossy(Duration::from_micros(200), 0.05),
            false,
            Class::Coordination,
            seed,
        );
    }
}

#[test]
fn lost_credit_update_is_recovered() {
    // The sender has used all its credit and everything it sent is acknowledged; the receiver
    // reads, and the acknowledgement that gives the credit back is lost. The sender must still
    // get the credit, in bounded time.
    let class = Class::Coordination;
    let cfg = Config::default();
    let window = cfg.recv_window.get(class) as usize;
    let mut sim = Sim::new(
        SimConfig::new(8)
            .link(LinkConfig::with_delay(Duration::from_micros(100)))
            .reliable(false),
    );
    let mut t = Traffic::new();
    let msgs: Vec<_> = (0..(4 * window / 16384))
        .map(|i| body(i as u64, 16384))
        .collect();
    let f = t.add(&mut sim, Side::A, class, 3, msgs);
    t.flows[f].reading = false;
    assert!(!sim.run_until(|s| t.pump(s), Duration::from_millis(50)));
    let ch = t.flows[f].ch;
    assert_eq!(
        sim.a().stats().inflight,
        0,
        "everything sent was acknowledged"
    );
    assert_eq!(sim.b().buffered_bytes(ch), window, "the window is full");
    // The reverse direction loses everything while the receiver reads.
    sim.link_config_mut(Side::B).loss = 1.0;
    t.flows[f].reading = true;
    t.pump(&mut sim);
    sim.run_for(Duration::from_millis(1));
    assert!(
        sim.link_stats(Side::B).lost > 0,
        "the credit update was lost"
    );
    sim.link_config_mut(Side::B).loss = 0.0;
    let start = sim.now();
    assert!(
        t.run(&mut sim, Duration::from_secs(2)),
        "the sender never learnt of the credit"
    );
    t.assert_complete(&sim);
    let took = sim.now() - start;
    eprintln!("recovered in {took:?}");
    // The stalled sender probes on its (backed-off) retransmission timer, which is capped at a
    // quarter of the peer timeout.
    assert!(
        took <= cfg.peer_timeout / 4 + Duration::from_millis(5),
        "recovered only after {took:?}"
    );
}
