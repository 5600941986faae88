//! Coordination never waits behind bulk: on a bandwidth-limited link saturated by a bulk channel,
//! a small coordination message waits at most about one bulk chunk's wire time (plus the link
//! delay); with priorities off (FIFO) it waits behind the queued bulk bytes.

mod sim_common;

use std::time::Duration;

use agentfabric::frame::HEADER_LEN;
use agentfabric::sim::{LinkConfig, Side, Sim, SimConfig};
use agentfabric::{Class, Config, Priority};
use sim_common::{body, Traffic};

const BANDWIDTH: u64 = 125_000_000; // 1 Gbit/s
const DELAY: Duration = Duration::from_micros(50);
const COORD_LEN: usize = 256;
const COORD_EVERY: Duration = Duration::from_micros(700);
const COORD_COUNT: usize = 200;

struct Outcome {
    latencies: Vec<Duration>,
    bulk_bytes: u64,
    elapsed: Duration,
}

fn run(priorities: bool) -> Outcome {
    let cfg = Config {
        priorities,
        ..Config::default()
    };
    let link = LinkConfig::with_delay(DELAY).bandwidth(BANDWIDTH);
    let mut sim = Sim::new(SimConfig::new(1).config(cfg).link(link));
    let mut bulk = Traffic::new();
    // Far more bulk than the run can carry, so the bulk queue never runs dry.
    let big = body(7, 1 << 20);
    bulk.add(&mut sim, Side::A, Class::Bulk, 7, vec![big; 64]);
    let coord = sim
        .a_mut()
        .open_channel(Class::Coordination, Priority::DEFAULT)
        .unwrap();
    // Let bulk fill the link and the queues first.
    assert!(!bulk.run(&mut sim, Duration::from_millis(20)));
    let start = sim.now();
    let bulk_ch = bulk.flows[0].ch;
    let bulk_before = sim.b().channel_stats(bulk_ch).unwrap().bytes_received;
    let mut next_send = start;
    let mut sent_at = Vec::new();
    let mut latencies = Vec::new();
    let done = sim.run_until(
        |s| {
            bulk.pump(s);
            let now = s.now();
            if sent_at.len() < COORD_COUNT && now >= next_send {
                let msg = body(sent_at.len() as u64, COORD_LEN);
                s.a_mut()
                    .send(now, coord, msg, 0, sent_at.len() as u64)
                    .unwrap();
                sent_at.push(now);
                next_send += COORD_EVERY;
                s.wake_at(next_send);
            }
            while let Some(m) = s.b_mut().recv(coord) {
                assert_eq!(m.tag as usize, latencies.len(), "in order");
                assert_eq!(m.body, body(m.tag, COORD_LEN));
                latencies.push(now - sent_at[latencies.len()]);
            }
            latencies.len() == COORD_COUNT
        },
        Duration::from_secs(5),
    );
    assert!(done, "every coordination message arrived");
    assert!(
        bulk.flows[0].sent < 64,
        "bulk stayed saturated for the whole run"
    );
    let elapsed = sim.now() - start;
    let bulk_bytes = sim.b().channel_stats(bulk_ch).unwrap().bytes_received - bulk_before;
    Outcome {
        latencies,
        bulk_bytes,
        elapsed,
    }
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn coordination_waits_at_most_one_bulk_chunk() {
    let link = LinkConfig::with_delay(DELAY).bandwidth(BANDWIDTH);
    let chunk = Config::default().chunk_size.bulk as usize;
    let chunk_time = link.wire_time(HEADER_LEN + chunk);
    let own_time = link.wire_time(HEADER_LEN + COORD_LEN);
    let bound = chunk_time + own_time + DELAY + Duration::from_micros(10);

    let prio = run(true);
    let fifo = run(false);
    let (p50, p99, max) = (
        percentile(&prio.latencies, 0.5),
        percentile(&prio.latencies, 0.99),
        percentile(&prio.latencies, 1.0),
    );
    let (f50, f99, fmax) = (
        percentile(&fifo.latencies, 0.5),
        percentile(&fifo.latencies, 0.99),
        percentile(&fifo.latencies, 1.0),
    );
    eprintln!(
        "bulk chunk wire time {chunk_time:?}, bound {bound:?}\n\
         priority: p50 {p50:?} p99 {p99:?} max {max:?}\n\
         fifo:     p50 {f50:?} p99 {f99:?} max {fmax:?}"
    );
    // With priorities: never more than one chunk in the way, plus the link delay.
    assert!(max <= bound, "coordination waited {max:?} > {bound:?}");
    // Never faster than the link allows either (the simulation is not cheating).
    assert!(percentile(&prio.latencies, 0.0) >= DELAY + own_time);
    // FIFO is clearly worse: its median is beyond the priority scheduler's worst case.
    assert!(f50 > max * 10, "fifo p50 {f50:?} vs priority max {max:?}");
    assert!(fmax > max * 10);

    // Bulk still gets nearly all of the bandwidth while yielding.
    for (name, o) in [("priority", &prio), ("fifo", &fifo)] {
        let rate = o.bulk_bytes as f64 / o.elapsed.as_secs_f64();
        eprintln!("{name}: bulk goodput {:.1} MB/s", rate / 1e6);
        assert!(rate > 0.85 * BANDWIDTH as f64, "{name}: bulk at {rate} B/s");
    }
}
