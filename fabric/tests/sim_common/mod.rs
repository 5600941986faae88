//! Shared helpers of the simulator tests: message generation and a traffic pump that plays the
//! application on both sides (sends what the send queues accept, accepts channels, reads what
//! arrived) and checks every delivery against what was sent.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use agentfabric::core::Event;
use agentfabric::sim::{Side, Sim};
use agentfabric::{Bytes, Class, Error, Priority};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A cheap pseudo-random body of `len` bytes determined by `seed` (xorshift, eight bytes a step).
pub fn body(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// A message size from 0 B to `max` with a skew towards small messages: half under 1 KiB, a
/// third up to 64 KiB, the rest up to `max` (so some are cut into many chunks).
pub fn random_size(rng: &mut StdRng, max: usize) -> usize {
    match rng.gen_range(0..6) {
        0..=2 => rng.gen_range(0..1024.min(max + 1)),
        3 | 4 => rng.gen_range(0..(64 << 10).min(max + 1)),
        _ => rng.gen_range(0..=max),
    }
}

/// One direction of one channel: the messages to send and what arrived.
#[derive(Debug)]
pub struct Flow {
    /// Sending side.
    pub from: Side,
    /// Channel id (the same on both sides).
    pub ch: u32,
    /// Class of the channel.
    pub class: Class,
    /// Every message, in send order.
    pub msgs: Vec<Bytes>,
    /// How many were accepted by `send`.
    pub sent: usize,
    /// When each accepted message was handed to `send`.
    pub send_times: Vec<Instant>,
    /// What the receiver read, in order.
    pub received: usize,
    /// When each message was read.
    pub recv_times: Vec<Instant>,
    /// Whether the receiving application reads this channel.
    pub reading: bool,
    /// The error `send` failed with (other than `WouldBlock`); nothing more is sent then.
    pub send_error: Option<Error>,
    /// Times `send` returned `WouldBlock` on this flow.
    pub would_block: u64,
}

impl Flow {
    /// Whether every message arrived.
    pub fn done(&self) -> bool {
        self.received == self.msgs.len()
    }

    /// Latency of each delivered message (send call to read), in order.
    pub fn latencies(&self) -> Vec<Duration> {
        self.recv_times
            .iter()
            .zip(&self.send_times)
            .map(|(r, s)| *r - *s)
            .collect()
    }
}

/// The application on both sides of a simulation.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Every flow.
    pub flows: Vec<Flow>,
    /// Channels each side accepted (A, B).
    pub accepted: [Vec<u32>; 2],
    /// Times `send` returned `WouldBlock`.
    pub would_block: u64,
}

impl Traffic {
    /// No flows yet.
    pub fn new() -> Traffic {
        Traffic::default()
    }

    /// Opens a channel on `from` and plans `msgs` on it; returns the flow's index.
    pub fn add(
        &mut self,
        sim: &mut Sim,
        from: Side,
        class: Class,
        prio: u8,
        msgs: Vec<Bytes>,
    ) -> usize {
        let ch = sim
            .session_mut(from)
            .open_channel(class, Priority::new(prio).expect("priority 0..=7"))
            .expect("open_channel");
        self.flows.push(Flow {
            from,
            ch,
            class,
            msgs,
            sent: 0,
            send_times: Vec::new(),
            received: 0,
            recv_times: Vec::new(),
            reading: true,
            send_error: None,
            would_block: 0,
        });
        self.flows.len() - 1
    }

    /// Adds `n` flows with random classes and `per_flow` messages of random sizes up to
    /// `max_size`, from random sides.
    pub fn add_random(
        &mut self,
        sim: &mut Sim,
        rng: &mut StdRng,
        n: usize,
        per_flow: usize,
        max_size: usize,
    ) {
        for _ in 0..n {
            let from = if rng.gen_bool(0.5) { Side::A } else { Side::B };
            let class = Class::ALL[rng.gen_range(0..3)];
            let prio = rng.gen_range(0..8);
            let msgs = (0..per_flow)
                .map(|_| {
                    let len = random_size(rng, max_size);
                    body(rng.gen(), len)
                })
                .collect();
            self.add(sim, from, class, prio, msgs);
        }
    }

    /// Plays the applications once: sends what fits, accepts channels, reads (checking every
    /// message byte for byte, in order). Returns whether every flow is complete.
    ///
    /// # Panics
    /// On a wrong, duplicated or out-of-order message.
    pub fn pump(&mut self, sim: &mut Sim) -> bool {
        let now = sim.now();
        for side in [Side::A, Side::B] {
            while let Some(id) = sim.session_mut(side).accept_channel() {
                self.accepted[match side {
                    Side::A => 0,
                    Side::B => 1,
                }]
                .push(id);
            }
        }
        let mut all = true;
        for f in &mut self.flows {
            while f.sent < f.msgs.len() && f.send_error.is_none() {
                let tag = f.sent as u64;
                match sim
                    .session_mut(f.from)
                    .send(now, f.ch, f.msgs[f.sent].clone(), 0, tag)
                {
                    Ok(()) => {
                        f.sent += 1;
                        f.send_times.push(now);
                    }
                    Err(Error::WouldBlock) => {
                        self.would_block += 1;
                        f.would_block += 1;
                        break;
                    }
                    Err(e) => f.send_error = Some(e),
                }
            }
            if f.reading {
                let rx = sim.session_mut(f.from.other());
                while let Some(d) = rx.recv(f.ch) {
                    assert!(
                        f.received < f.sent,
                        "channel {}: message {} arrived but only {} were sent",
                        f.ch,
                        f.received,
                        f.sent
                    );
                    assert_eq!(
                        d.tag, f.received as u64,
                        "channel {}: out of order or duplicated",
                        f.ch
                    );
                    assert!(
                        d.body == f.msgs[f.received],
                        "channel {}: message {} differs (len {} vs {})",
                        f.ch,
                        f.received,
                        d.body.len(),
                        f.msgs[f.received].len()
                    );
                    f.received += 1;
                    f.recv_times.push(now);
                }
            }
            all &= f.done();
        }
        all
    }

    /// Runs the simulation, pumping at every instant, until every flow is complete or `max`
    /// virtual time passed; returns whether it completed.
    pub fn run(&mut self, sim: &mut Sim, max: Duration) -> bool {
        sim.run_until(|s| self.pump(s), max)
    }

    /// Asserts that every flow is complete, each channel was accepted by the other side exactly
    /// once, and neither session died.
    pub fn assert_complete(&self, sim: &Sim) {
        for f in &self.flows {
            assert_eq!(f.send_error, None, "channel {}: send failed", f.ch);
            assert!(
                f.done(),
                "channel {} ({:?} -> {:?}, {}): {} of {} messages arrived ({} sent)",
                f.ch,
                f.from,
                f.from.other(),
                f.class,
                f.received,
                f.msgs.len(),
                f.sent
            );
            let acc = &self.accepted[match f.from.other() {
                Side::A => 0,
                Side::B => 1,
            }];
            if !f.msgs.is_empty() {
                assert_eq!(
                    acc.iter().filter(|&&c| c == f.ch).count(),
                    1,
                    "channel {} accepted once",
                    f.ch
                );
            }
        }
        assert_alive(sim);
    }
}

/// Asserts that neither session died and no frame was refused.
pub fn assert_alive(sim: &Sim) {
    for side in [Side::A, Side::B] {
        assert!(
            sim.session(side).dead().is_none(),
            "{side:?} died: {:?}",
            sim.session(side).dead()
        );
        assert!(
            sim.frame_errors(side).is_empty(),
            "{side:?}: {:?}",
            sim.frame_errors(side)
        );
        assert!(
            !sim.events(side)
                .iter()
                .any(|(_, e)| matches!(e, Event::Dead(_))),
            "{side:?} emitted Dead"
        );
        assert_eq!(
            sim.side_stats(side).timer_spins,
            0,
            "{side:?}: timer left in the past"
        );
    }
}

/// A seeded generator.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Proptest cases: `default`, or `PROPTEST_CASES` from the environment for a longer soak.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
