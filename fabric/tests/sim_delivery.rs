//! Many channels × many messages over a lossy, reordering, duplicating, jittery link: every
//! channel gets exactly its messages, in order, byte for byte.

mod sim_common;

use std::time::Duration;

use agentfabric::sim::{LinkConfig, Side, Sim, SimConfig};
use agentfabric::Config;
use proptest::prelude::*;
use sim_common::{rng, Traffic};

fn lossy_sim(seed: u64, loss: f64, delay: Duration) -> Sim {
    let link = LinkConfig::lossy(delay, loss);
    let cfg = SimConfig::new(seed).link(link);
    assert!(!cfg.reliable, "a lossy link needs unreliable sessions");
    Sim::new(cfg)
}

/// Runs `flows` channels of `per_flow` random messages (0 B to `max_size`) on a lossy link and
/// checks everything arrives exactly once, in order, byte for byte.
fn exchange(seed: u64, loss: f64, flows: usize, per_flow: usize, max_size: usize) -> Sim {
    let mut sim = lossy_sim(seed, loss, Duration::from_micros(200));
    let mut r = rng(seed);
    let mut t = Traffic::new();
    t.add_random(&mut sim, &mut r, flows, per_flow, max_size);
    let done = t.run(&mut sim, Duration::from_secs(120));
    t.assert_complete(&sim);
    assert!(done);
    sim
}

#[test]
fn many_channels_lossy_link_exactly_once_in_order() {
    let start = std::time::Instant::now();
    for seed in [1, 2, 3] {
        let sim = exchange(seed, 0.05, 12, 25, 300 << 10);
        // The faults really happened, and the sessions really recovered from them.
        for side in [Side::A, Side::B] {
            let l = sim.link_stats(side);
            assert!(l.lost > 0 && l.reordered > 0, "{side:?}: {l:?}");
        }
        let retx = sim.a().stats().retransmits + sim.b().stats().retransmits;
        assert!(retx > 0, "loss must cause retransmissions");
        eprintln!(
            "seed {seed}: {:?} virtual, links {:?} / {:?}, retransmits {retx}",
            sim.elapsed(),
            sim.link_stats(Side::A),
            sim.link_stats(Side::B)
        );
    }
    eprintln!("wall time {:?}", start.elapsed());
}

#[test]
fn heavy_loss_still_exactly_once() {
    // A quarter of the frames lost: slow, but nothing lost, duplicated or reordered.
    exchange(11, 0.25, 4, 10, 100 << 10);
}

#[test]
fn loss_free_reliable_link() {
    let mut sim = Sim::new(
        SimConfig::new(5)
            .link(LinkConfig::with_delay(Duration::from_micros(100)).bandwidth(1 << 30)),
    );
    assert!(sim.a().config() == &Config::default());
    let mut t = Traffic::new();
    t.add_random(&mut sim, &mut rng(5), 10, 30, 300 << 10);
    assert!(t.run(&mut sim, Duration::from_secs(10)));
    t.assert_complete(&sim);
    assert_eq!(sim.a().stats().retransmits + sim.b().stats().retransmits, 0);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: sim_common::proptest_cases(24),
        ..ProptestConfig::default()
    })]

    /// Random channels, message sizes, link faults, bandwidth, chunk sizes, and possibly one
    /// transport reconnection mid-run: every channel still gets exactly its messages, in order.
    #[test]
    fn prop_lossy_delivery_exactly_once_in_order(
        seed in any::<u64>(),
        loss in 0.0f64..0.15,
        reorder in 0.0f64..0.3,
        jitter_us in 0u64..2_000,
        bandwidth in prop_oneof![Just(0u64), 50_000_000u64..5_000_000_000],
        chunk in (512u32..=65_536, 512u32..=65_536),
        flows in 1usize..10,
        per_flow in 1usize..25,
        max_size in 0usize..(300 << 10),
        cut in proptest::option::of((100u64..20_000, 0u64..300_000)),
    ) {
        let delay = Duration::from_micros(100);
        let link = LinkConfig {
            jitter: Duration::from_micros(jitter_us),
            reorder,
            reorder_delay: Duration::from_millis(1),
            duplicate: 0.02,
            bandwidth_bytes_per_sec: bandwidth,
            ..LinkConfig::lossy(delay, loss)
        };
        let mut cfg = Config::default();
        cfg.chunk_size.coordination = chunk.0;
        cfg.chunk_size.bulk = chunk.1;
        let mut sim = Sim::new(SimConfig::new(seed).config(cfg).link(link).reliable(false));
        let mut t = Traffic::new();
        t.add_random(&mut sim, &mut rng(seed), flows, per_flow, max_size);
        let mut done = false;
        if let Some((at_us, down_us)) = cut {
            done = t.run(&mut sim, Duration::from_micros(at_us));
            sim.disconnect();
            t.run(&mut sim, Duration::from_micros(down_us));
            sim.reconnect();
        }
        done = done || t.run(&mut sim, Duration::from_secs(120));
        t.assert_complete(&sim);
        prop_assert!(done);
    }
}
