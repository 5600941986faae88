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
