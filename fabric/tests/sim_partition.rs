//! Partitions: one shorter than the peer timeout heals with nothing lost; one longer makes both
//! sides declare the peer dead within the timeout plus a small bound, and fails what is pending.

mod sim_common;

use std::time::Duration;

use agentfabric::core::Event;
use agentfabric::sim::{LinkConfig, Side, Sim, SimConfig};
use agentfabric::{Bytes, Class, Config, Error, Priority};
use sim_common::{assert_alive, rng, Traffic};

const DELAY: Duration = Duration::from_micros(300);

/// Traffic in both directions that keeps flowing for a while (a few MB per channel).
fn busy_traffic(sim: &mut Sim, seed: u64) -> Traffic {
    let mut t = Traffic::new();
    t.add_random(sim, &mut rng(seed), 6, 60, 200 << 10);
    t
}

fn short_partition_heals(link: LinkConfig, reliable: bool) {
    let mut sim = Sim::new(SimConfig::new(21).link(link).reliable(reliable));
    let timeout = sim.a().config().peer_timeout;
    let mut t = busy_traffic(&mut sim, 21);
    // Let traffic start, then cut the link for 70 % of the peer timeout, mid-transfer.
    assert!(
        !t.run(&mut sim, Duration::from_millis(5)),
        "still transferring"
    );
    let in_flight: usize = t.flows.iter().map(|f| f.sent - f.received).sum();
    assert!(
        in_flight > 0,
        "messages are in flight when the partition starts"
    );
    sim.partition(true);
    let cut = sim.now();
    let sent_before: Vec<u64> = [Side::A, Side::B]
        .iter()
        .map(|&s| sim.link_stats(s).bytes_sent)
        .collect();
    let inflight_before: Vec<u64> = [Side::A, Side::B]
        .iter()
        .map(|&s| sim.session(s).stats().inflight)
        .collect();
    // The applications keep sending into the partition.
    assert!(!t.run(&mut sim, timeout * 7 / 10));
    let received_during: usize = t.flows.iter().map(|f| f.received).sum();
    // Retransmission timeouts back off: what went into the partition is a few rounds of what
    // was unacknowledged (plus what the minimum congestion window let out), not a flood.
    let cc = &sim.a().config().congestion;
    let allowance = cc.min_window + cc.coordination_reserve;
    for (i, side) in [Side::A, Side::B].into_iter().enumerate() {
        let sent = sim.link_stats(side).bytes_sent - sent_before[i];
        let bound = 10 * (inflight_before[i] + allowance);
        eprintln!("{side:?}: {sent} bytes sent into the partition (bound {bound})");
        assert!(sent <= bound, "{side:?}: {sent} bytes into a partition");
    }
    sim.partition(false);
    let healed = sim.now();
    assert_eq!(healed - cut, timeout * 7 / 10);
    assert!(
        t.run(&mut sim, Duration::from_secs(30)),
        "everything arrives after healing"
    );
    eprintln!("completed {:?} after healing", sim.now() - healed);
    t.assert_complete(&sim);
    let total: usize = t.flows.iter().map(|f| f.msgs.len()).sum();
    assert!(received_during < total);
    if reliable {
        assert!(
            sim.link_stats(Side::A).partition_drops == 0,
            "a reliable link holds frames"
        );
    } else {
        let drops =
            sim.link_stats(Side::A).partition_drops + sim.link_stats(Side::B).partition_drops;
        assert!(drops > 0, "the partition dropped frames");
    }
}

#[test]
fn short_partition_heals_unreliable() {
    short_partition_heals(LinkConfig::lossy(DELAY, 0.01), false);
}

#[test]
fn short_partition_heals_reliable() {
    short_partition_heals(LinkConfig::with_delay(DELAY).bandwidth(1 << 30), true);
}

/// Partitions for good at a chosen time and checks when and how each side declares the peer dead.
fn long_partition_detected(cfg: Config, link: LinkConfig, reliable: bool, with_traffic: bool) {
    let timeout = cfg.peer_timeout;
    let keepalive = cfg.keepalive_interval;
    let mut sim = Sim::new(SimConfig::new(33).config(cfg).link(link).reliable(reliable));
    let mut t = busy_traffic(&mut sim, 33);
    if !with_traffic {
        // Idle but alive: only keepalives cross the link, for several peer timeouts.
        t = Traffic::new();
        sim.run_for(timeout * 3);
        assert_alive(&sim);
    } else {
        assert!(!t.run(&mut sim, Duration::from_millis(2)));
    }
    sim.partition(true);
    let cut = sim.now();
    let both_dead = sim.run_until(
        |s| {
            t.pump(s);
            s.a().dead().is_some() && s.b().dead().is_some()
        },
        timeout * 3,
    );
    assert!(both_dead, "both sides must declare the peer dead");
    for side in [Side::A, Side::B] {
        let (at, err) = sim.dead_event(side).expect("Dead event");
        let Error::PeerDead { silent_for } = err else {
            panic!("{side:?} died of {err:?}, not PeerDead");
        };
        let after_cut = at - cut;
        eprintln!("{side:?}: dead {after_cut:?} after the cut, silent for {silent_for:?}");
        // Detected as soon as the timeout expired, never late...
        assert!(
            *silent_for >= timeout,
            "{side:?}: silent for {silent_for:?} only"
        );
        assert!(
            *silent_for <= timeout + Duration::from_millis(1),
            "{side:?}: noticed late ({silent_for:?})"
        );
        assert!(
            after_cut <= timeout + Duration::from_millis(1),
            "{side:?}: {after_cut:?}"
        );
        // ...and the peer was heard from shortly before the cut (keepalives work).
        assert!(
            after_cut + keepalive + DELAY * 4 >= timeout,
            "{side:?}: dead only {after_cut:?} after the cut"
        );
        // Exactly one Dead event, and everything afterwards fails with the same error.
        let deads = sim
            .events(side)
            .iter()
            .filter(|(_, e)| matches!(e, Event::Dead(_)))
            .count();
        assert_eq!(deads, 1);
        let err = err.clone();
        let now = sim.now();
        let s = sim.session_mut(side);
        assert_eq!(
            s.open_channel(Class::Bulk, Priority::DEFAULT),
            Err(err.clone())
        );
        if let Some(f) = t.flows.iter().find(|f| f.from == side) {
            if f.sent < f.msgs.len() {
                assert_eq!(
                    f.send_error.as_ref(),
                    Some(&err),
                    "pending sends fail with the cause"
                );
            }
            assert_eq!(
                s.send(now, f.ch, Bytes::from_static(b"late"), 0, 0),
                Err(err.clone())
            );
        }
        assert!(s.poll_transmit(now).is_none());
        assert!(s.poll_timeout().is_none(), "a dead session needs no timer");
    }
    if with_traffic {
        let pending: usize = t.flows.iter().map(|f| f.msgs.len() - f.received).sum();
        assert!(pending > 0, "the partition cut traffic off");
    }
}

#[test]
fn long_partition_kills_both_sides_in_bounded_time() {
    long_partition_detected(
        Config::default(),
        LinkConfig::lossy(DELAY, 0.01),
        false,
        true,
    );
}

#[test]
fn long_partition_reliable_transport() {
    long_partition_detected(
        Config::default(),
        LinkConfig::with_delay(DELAY).bandwidth(1 << 30),
        true,
        true,
    );
}

#[test]
fn long_partition_idle_session_custom_timeout() {
    let cfg = Config {
        peer_timeout: Duration::from_millis(300),
        keepalive_interval: Duration::from_millis(50),
        ..Config::default()
    };
    long_partition_detected(cfg, LinkConfig::with_delay(DELAY), true, false);
}

#[test]
fn idle_session_stays_alive_on_keepalives() {
    // No traffic at all for ten peer timeouts: keepalives keep both sides alive, and cost little.
    let mut sim = Sim::new(SimConfig::new(1).link(LinkConfig::lossy(DELAY, 0.02)));
    let ten = sim.a().config().peer_timeout * 10;
    sim.run_for(ten);
    assert_alive(&sim);
    let frames = sim.link_stats(Side::A).frames_sent;
    let ka = sim.a().config().keepalive_interval;
    assert!(
        frames > 0 && frames <= 4 * (ten.as_millis() / ka.as_millis()) as u64,
        "{frames}"
    );
}
