//! Transport reconnection (session resume) with messages in flight in both directions: every
//! ordered channel resumes with no loss and no duplicate, on reliable and unreliable transports.

mod sim_common;

use std::collections::HashSet;
use std::time::Duration;

use agentfabric::core::Event;
use agentfabric::frame::{Kind, FLAG_RETRANSMIT};
use agentfabric::sim::{LinkConfig, Side, Sim, SimConfig};
use agentfabric::Error;
use rand::Rng;
use sim_common::{assert_alive, rng, Traffic};

/// Disconnects `cuts` times at random moments while traffic flows both ways, reconnecting after
/// a random gap shorter than the peer timeout; checks exactly-once in-order delivery.
fn resume_under_traffic(link: LinkConfig, reliable: bool, seed: u64, cuts: u64) {
    let duplicating = link.duplicate > 0.0;
    let mut sim = Sim::new(SimConfig::new(seed).link(link).reliable(reliable));
    sim.record_frames(true);
    let mut r = rng(seed);
    let mut t = Traffic::new();
    t.add_random(&mut sim, &mut r, 8, 40, 256 << 10);
    let mut done = false;
    for _ in 0..cuts {
        // Run a little, then cut the connection mid-transfer.
        done = t.run(&mut sim, Duration::from_micros(r.gen_range(200..3_000)));
        assert!(!done, "the cut should come while messages are in flight");
        let in_flight = sim.a().stats().inflight + sim.b().stats().inflight;
        assert!(in_flight > 0, "unacknowledged chunks at the cut");
        sim.disconnect();
        assert!(!sim.a().is_connected() && !sim.b().is_connected());
        // The application keeps sending while the connection is down.
        t.run(&mut sim, Duration::from_millis(r.gen_range(1..200)));
        sim.reconnect();
    }
    done = done || t.run(&mut sim, Duration::from_secs(60));
    assert!(done);
    t.assert_complete(&sim);
    for side in [Side::A, Side::B] {
        let st = sim.session(side).stats();
        assert_eq!(st.resumes, cuts, "{side:?}: one resume per reconnection");
        assert!(
            st.retransmits > 0,
            "{side:?}: unacknowledged chunks were sent again"
        );
        assert!(
            sim.link_stats(side).disconnect_drops > 0,
            "{side:?}: the cuts dropped frames"
        );
    }
    // Chunks the receiver already had came again (their acks were lost with the connection)
    // and were dropped: the traffic checker saw each message exactly once.
    let mut seen = HashSet::new();
    let mut dups = 0;
    for (_, from, h) in sim.delivered_frames() {
        if h.kind == Kind::Data && !seen.insert((*from, h.channel, h.seq)) {
            // (The lossy link also duplicates frames by itself.)
            assert!(
                duplicating || h.flags & FLAG_RETRANSMIT != 0,
                "only retransmissions repeat a sequence"
            );
            dups += 1;
        }
    }
    assert!(
        dups > 0,
        "some duplicates reached the receivers and were dropped"
    );
    eprintln!(
        "reliable={reliable}: {:?} virtual, {dups} duplicate chunks dropped, retransmits {} / {}",
        sim.elapsed(),
        sim.a().stats().retransmits,
        sim.b().stats().retransmits
    );
}

#[test]
fn resume_reliable_transport() {
    for seed in [1, 2] {
        resume_under_traffic(
            LinkConfig::with_delay(Duration::from_micros(500)).bandwidth(1 << 30),
            true,
            seed,
            5,
        );
    }
}

#[test]
fn resume_unreliable_transport() {
    for seed in [3, 4] {
        resume_under_traffic(
            LinkConfig::lossy(Duration::from_micros(500), 0.03),
            false,
            seed,
            5,
        );
    }
}

#[test]
fn disconnect_longer_than_peer_timeout_is_death() {
    let mut sim = Sim::new(
        SimConfig::new(9)
            .link(LinkConfig::with_delay(Duration::from_micros(500)).bandwidth(1 << 30)),
    );
    let timeout = sim.a().config().peer_timeout;
    let mut t = Traffic::new();
    t.add_random(&mut sim, &mut rng(9), 4, 40, 256 << 10);
    assert!(!t.run(&mut sim, Duration::from_millis(1)));
    sim.disconnect();
    let cut = sim.now();
    let dead = sim.run_until(
        |s| {
            t.pump(s);
            s.a().dead().is_some() && s.b().dead().is_some()
        },
        timeout * 3,
    );
    assert!(
        dead,
        "no reconnection within the peer timeout: the peer is dead"
    );
    for side in [Side::A, Side::B] {
        let (at, err) = sim.dead_event(side).expect("Dead event");
        assert!(matches!(err, Error::PeerDead { silent_for } if *silent_for >= timeout));
        let after = at - cut;
        assert!(
            after <= timeout + Duration::from_millis(1)
                && after + Duration::from_millis(2) >= timeout,
            "{side:?}: dead {after:?} after the disconnection"
        );
        assert_eq!(
            sim.side_stats(side).timer_spins,
            0,
            "{side:?}: a timer stayed in the past"
        );
    }
    // A reconnection after death does not revive the session.
    sim.reconnect();
    assert!(sim.a().dead().is_some() && !sim.a().is_connected());
    assert_eq!(sim.a().stats().resumes, 0);
    let deads = sim
        .events(Side::A)
        .iter()
        .filter(|(_, e)| matches!(e, Event::Dead(_)))
        .count();
    assert_eq!(deads, 1);
}

#[test]
fn quick_reconnect_while_idle_changes_nothing() {
    let mut sim =
        Sim::new(SimConfig::new(2).link(LinkConfig::with_delay(Duration::from_micros(100))));
    let mut t = Traffic::new();
    t.add_random(&mut sim, &mut rng(2), 3, 5, 10 << 10);
    assert!(t.run(&mut sim, Duration::from_secs(1)));
    sim.run_for(Duration::from_millis(10));
    let before = sim.a().stats().retransmits + sim.b().stats().retransmits;
    sim.disconnect();
    sim.run_for(Duration::from_millis(5));
    sim.reconnect();
    sim.run_for(Duration::from_millis(10));
    assert_alive(&sim);
    t.assert_complete(&sim);
    // Everything was acknowledged before the cut: nothing to send again.
    assert_eq!(
        sim.a().stats().retransmits + sim.b().stats().retransmits,
        before
    );
}

/// A transport with a bulk lane of its own asks for frames with `bulk_ok` false while that lane
/// is backed up (`Session::poll_transmit_lane`). After a resume, a coordination channel's
/// retransmissions must still go before its new chunks: a reliable transport's receiver takes a
/// gap in a channel's sequence for a broken peer. (Found in the lab: a link outage under channel
/// bulk over verbs killed the session with `SequenceFromFuture` on the coordination channel.)
#[test]
fn after_a_resume_retransmissions_go_before_new_chunks_while_bulk_waits() {
    use agentfabric::frame::Header;
    use agentfabric::{Class, Priority};
    let link = LinkConfig::with_delay(Duration::from_millis(5));
    let mut sim = Sim::new(SimConfig::new(11).link(link).reliable(true));
    let now = sim.now();
    let a = sim.a_mut();
    let coord = a
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    let bulk = a.open_channel(Class::Bulk, Priority::DEFAULT).unwrap();
    a.send(now, bulk, sim_common::body(1, 1 << 20), 0, 0)
        .unwrap();
    for i in 0..5 {
        a.send(now, coord, sim_common::body(10 + i, 100), 0, 0)
            .unwrap();
    }
    // Everything goes onto the link and nothing is acknowledged yet (5 ms each way).
    sim.run_for(Duration::from_micros(200));
    assert!(sim.a().stats().inflight > 0);
    sim.disconnect();
    let now = sim.now();
    for i in 0..3 {
        sim.a_mut()
            .send(now, coord, sim_common::body(20 + i, 100), 0, 0)
            .unwrap();
    }
    sim.reconnect();
    // The bulk lane is backed up: only what may go on the other lane is asked for.
    let mut coord_frames = Vec::new();
    while let Some(f) = sim.a_mut().poll_transmit_lane(now, false) {
        let h = Header::decode(&f.header).unwrap();
        if h.kind != Kind::Data {
            continue;
        }
        assert_ne!(h.channel, bulk, "a bulk chunk went while bulk could not");
        coord_frames.push((h.seq, h.flags & FLAG_RETRANSMIT != 0));
    }
    let seqs: Vec<u64> = coord_frames.iter().map(|&(s, _)| s).collect();
    assert_eq!(
        seqs,
        (0..8).collect::<Vec<_>>(),
        "the coordination channel's chunks in order, retransmissions first"
    );
    assert!(coord_frames[..5].iter().all(|&(_, retx)| retx));
    assert!(coord_frames[5..].iter().all(|&(_, retx)| !retx));
}
