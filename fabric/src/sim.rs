//! A deterministic discrete-event simulator for the sans-IO protocol core.
//!
//! [`Sim`] runs two [`Session`]s, an initiator (side [`Side::A`]) and an acceptor (side
//! [`Side::B`]), over a simulated link with explicit virtual time: propagation delay, jitter,
//! bandwidth (frames are serialised one after the other), loss, reordering, duplication,
//! partitions and transport reconnections. Time starts at an [`Instant`] captured once when the
//! simulator is built and only moves when the simulator advances it, from one event to the next;
//! nothing sleeps, so a simulated minute costs what its events cost. Randomness comes from seeded
//! generators, so a run is reproduced exactly by its seed and the application's actions.
//!
//! The loop, at each instant:
//! 1. frames whose arrival time has come are handed to the receiving session with
//!    [`Session::handle_frame`];
//! 2. a session whose [`Session::poll_timeout`] has come gets [`Session::handle_timeout`];
//! 3. each session's [`Session::poll_transmit`] is drained into its outgoing link while the link's
//!    transmitter is free: with a finite bandwidth the link takes one frame, is busy for its wire
//!    time, and the session is asked for the next frame only when the link is free again (as a NIC
//!    with a shallow send queue would), so the session's scheduler, not a queue in the link,
//!    decides what goes next;
//! 4. the sessions' events are collected (see [`Sim::events`]).
//!
//! Then time jumps to the next arrival, the end of a frame's serialisation, a session timer or an
//! application wake-up ([`Sim::wake_at`]). The application acts between steps: the closure given
//! to [`Sim::run_until`] is called at every instant where something happened and may send,
//! receive, accept channels, partition the link, and so on.
//!
//! Each direction of the link behaves as an [`Impairment`] says (also reachable here as
//! [`LinkConfig`]).
//!
//! ```
//! use std::time::Duration;
//! use agentfabric::sim::{Sim, SimConfig, LinkConfig};
//! use agentfabric::{Bytes, Class, Priority};
//!
//! let mut sim = Sim::new(SimConfig::new(7).link(LinkConfig::with_delay(Duration::from_micros(50))));
//! let ch = sim.a_mut().open_channel(Class::Coordination, Priority::DEFAULT).unwrap();
//! let now = sim.now();
//! sim.a_mut().send(now, ch, Bytes::from_static(b"plan"), 0, 0).unwrap();
//! assert!(sim.run_until(|s| s.b().readable(ch), Duration::from_millis(10)));
//! assert_eq!(sim.elapsed(), Duration::from_micros(50));
//! assert_eq!(&sim.b_mut().recv(ch).unwrap().body[..], b"plan");
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::Config;
use crate::core::{Event, PeerParams, Role, Session};
use crate::error::Error;
use crate::frame::{Header, OutFrame};
use crate::impair::Impairment;

pub use crate::impair::Impairment as LinkConfig;

/// One end of the simulated session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The initiator ([`Role::Initiator`]); opens even channel ids.
    A,
    /// The acceptor ([`Role::Acceptor`]); opens odd channel ids.
    B,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// How the simulator is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Seed of the link's random draws.
    pub seed: u64,
    /// Configuration of side A (the initiator).
    pub a: Config,
    /// Configuration of side B (the acceptor).
    pub b: Config,
    /// Whether the sessions are told that the transport never loses, reorders or duplicates
    /// (as on TCP). Use `true` only with loss-free, in-order links: a reliable session treats
    /// a gap as a protocol violation and never retransmits on a timer.
    pub reliable: bool,
    /// The direction from A to B.
    pub a_to_b: Impairment,
    /// The direction from B to A.
    pub b_to_a: Impairment,
}

impl SimConfig {
    /// Default configurations on both sides, a perfect link in both directions, `reliable`.
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            a: Config::default(),
            b: Config::default(),
            reliable: true,
            a_to_b: Impairment::default(),
            b_to_a: Impairment::default(),
        }
    }

    /// Both directions of the link set to `link`; `reliable` becomes `!link.is_lossy()`.
    pub fn link(mut self, link: Impairment) -> SimConfig {
        self.reliable = !link.is_lossy();
        self.a_to_b = link.clone();
        self.b_to_a = link;
        self
    }

    /// The same session configuration on both sides.
    pub fn config(mut self, cfg: Config) -> SimConfig {
        self.a = cfg.clone();
        self.b = cfg;
        self
    }

    /// Sets whether the sessions consider the transport reliable.
    pub fn reliable(mut self, reliable: bool) -> SimConfig {
        self.reliable = reliable;
        self
    }
}

/// Counters of one direction of the link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames the sending session handed to the link.
    pub frames_sent: u64,
    /// Bytes (header and payload) the sending session handed to the link.
    pub bytes_sent: u64,
    /// Frames handed to the receiving session (duplicates included).
    pub frames_delivered: u64,
    /// Frames lost to the loss probability.
    pub lost: u64,
    /// Frames held back by the reorder probability.
    pub reordered: u64,
    /// Extra copies made by the duplicate probability.
    pub duplicated: u64,
    /// Frames dropped because the link was partitioned when they were sent or due (unreliable
    /// sessions only; a reliable transport holds them).
    pub partition_drops: u64,
    /// Frames in flight (or held by a partition) dropped by [`Sim::disconnect`].
    pub disconnect_drops: u64,
    /// Frames dropped because the receiving session was already dead.
    pub dead_drops: u64,
}

#[derive(Debug)]
struct Link {
    cfg: Impairment,
    rng: StdRng,
    /// When the transmitter finishes serialising the last frame it took.
    tx_free_at: Instant,
    /// Frames in flight, by (arrival, order of sending).
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    frames: HashMap<u64, OutFrame>,
    stats: LinkStats,
}

impl Link {
    fn new(cfg: Impairment, seed: u64, now: Instant) -> Link {
        Link {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            tx_free_at: now,
            queue: BinaryHeap::new(),
            frames: HashMap::new(),
            stats: LinkStats::default(),
        }
    }

    fn uniform(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.rng.gen_range(0..=max.as_nanos() as u64))
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen_bool(p.min(1.0))
    }

    /// Takes a frame from the sender at `now` (the transmitter is free).
    fn send(&mut self, now: Instant, frame: OutFrame, partitioned: bool, order: &mut u64) {
        let wire = frame.wire_len();
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += wire as u64;
        let done = now.max(self.tx_free_at) + self.cfg.wire_time(wire);
        self.tx_free_at = done;
        if partitioned {
            self.stats.partition_drops += 1;
            return;
        }
        if self.chance(self.cfg.loss) {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.chance(self.cfg.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut arrival = done + self.cfg.delay + self.uniform(self.cfg.jitter);
            if self.chance(self.cfg.reorder) && !self.cfg.reorder_delay.is_zero() {
                self.stats.reordered += 1;
                arrival += self.uniform(self.cfg.reorder_delay);
            }
            self.push(arrival, frame.clone(), order);
        }
    }

    fn push(&mut self, arrival: Instant, frame: OutFrame, order: &mut u64) {
        *order += 1;
        self.queue.push(Reverse((arrival, *order)));
        self.frames.insert(*order, frame);
    }

    fn next_arrival(&self) -> Option<(Instant, u64)> {
        self.queue.peek().map(|r| r.0)
    }

    fn pop(&mut self) -> Option<OutFrame> {
        let Reverse((_, id)) = self.queue.pop()?;
        self.frames.remove(&id)
    }

    fn clear(&mut self, now: Instant) {
        self.stats.disconnect_drops += self.queue.len() as u64;
        self.queue.clear();
        self.frames.clear();
        self.tx_free_at = now;
    }
}

/// Counters of the simulator's own checks on one side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SideStats {
    /// Calls of [`Session::handle_timeout`].
    pub timeouts_handled: u64,
    /// Instants after which the session's [`Session::poll_timeout`] was still in the past
    /// although its transmitter was free (or it had no connection): a real driver would spin
    /// on such a timer. Should stay 0.
    pub timer_spins: u64,
}

/// Two sessions connected by a simulated link. See the [module documentation](self).
#[derive(Debug)]
pub struct Sim {
    base: Instant,
    now: Instant,
    sessions: [Session; 2],
    /// `links[i]` carries frames sent by side `i`.
    links: [Link; 2],
    events: [Vec<(Instant, Event)>; 2],
    frame_errors: [Vec<(Instant, Error)>; 2],
    side_stats: [SideStats; 2],
    last_timeout: [Option<(Instant, Instant)>; 2],
    wakes: BinaryHeap<Reverse<Instant>>,
    partitioned: bool,
    /// Frames held by a partition of a reliable transport: (sending side, frame).
    held: Vec<(usize, OutFrame)>,
    reliable: bool,
    connected: bool,
    order: u64,
    /// Headers of delivered frames, when recording.
    trace: Option<Vec<(Instant, Side, Header)>>,
}

/// Most rounds of work at one instant before the simulator declares a livelock.
const MAX_ROUNDS_PER_INSTANT: u32 = 1_000_000;

impl Sim {
    /// Builds the two sessions at a base instant captured now, each with the other's receive
    /// windows as its [`PeerParams`], connected.
    ///
    /// # Panics
    /// If either configuration fails [`Config::validate`].
    pub fn new(cfg: SimConfig) -> Sim {
        for (name, c) in [("a", &cfg.a), ("b", &cfg.b)] {
            if let Err(e) = c.validate() {
                panic!("invalid configuration for side {name}: {e}");
            }
        }
        let base = Instant::now();
        let params = |c: &Config| PeerParams {
            recv_window: c.recv_window,
        };
        let a = Session::new(
            Role::Initiator,
            cfg.a.clone(),
            params(&cfg.b),
            cfg.reliable,
            base,
        );
        let b = Session::new(
            Role::Acceptor,
            cfg.b.clone(),
            params(&cfg.a),
            cfg.reliable,
            base,
        );
        let seed = cfg.seed;
        Sim {
            base,
            now: base,
            sessions: [a, b],
            links: [
                Link::new(cfg.a_to_b, seed ^ 0x5eed_a2b0, base),
                Link::new(cfg.b_to_a, seed.rotate_left(17) ^ 0x5eed_b2a0, base),
            ],
            events: [Vec::new(), Vec::new()],
            frame_errors: [Vec::new(), Vec::new()],
            side_stats: [SideStats::default(), SideStats::default()],
            last_timeout: [None, None],
            wakes: BinaryHeap::new(),
            partitioned: false,
            held: Vec::new(),
            reliable: cfg.reliable,
            connected: true,
            order: 0,
            trace: None,
        }
    }

    // ------------------------------------------------------------------ access

    /// The virtual time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The instant the simulation started at (virtual time zero).
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Virtual time elapsed since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// The session of `side`.
    pub fn session(&self, side: Side) -> &Session {
        &self.sessions[side.index()]
    }

    /// The session of `side`, to act on it as its application would.
    pub fn session_mut(&mut self, side: Side) -> &mut Session {
        &mut self.sessions[side.index()]
    }

    /// Side A's session (the initiator).
    pub fn a(&self) -> &Session {
        self.session(Side::A)
    }

    /// Side B's session (the acceptor).
    pub fn b(&self) -> &Session {
        self.session(Side::B)
    }

    /// Side A's session, mutably.
    pub fn a_mut(&mut self) -> &mut Session {
        self.session_mut(Side::A)
    }

    /// Side B's session, mutably.
    pub fn b_mut(&mut self) -> &mut Session {
        self.session_mut(Side::B)
    }

    /// The configuration of the link carrying frames sent by `from`; changes apply to frames
    /// sent afterwards.
    pub fn link_config_mut(&mut self, from: Side) -> &mut Impairment {
        &mut self.links[from.index()].cfg
    }

    /// Counters of the link carrying frames sent by `from`.
    pub fn link_stats(&self, from: Side) -> &LinkStats {
        &self.links[from.index()].stats
    }

    /// Counters of the simulator's checks on `side`.
    pub fn side_stats(&self, side: Side) -> &SideStats {
        &self.side_stats[side.index()]
    }

    /// Every event `side`'s session emitted so far, with the virtual time it was collected at
    /// (the instant of the step that caused it).
    pub fn events(&self, side: Side) -> &[(Instant, Event)] {
        &self.events[side.index()]
    }

    /// Takes the events of `side` collected so far.
    pub fn take_events(&mut self, side: Side) -> Vec<(Instant, Event)> {
        std::mem::take(&mut self.events[side.index()])
    }

    /// When `side` emitted [`Event::Dead`], and its error.
    pub fn dead_event(&self, side: Side) -> Option<(Instant, &Error)> {
        self.events[side.index()].iter().find_map(|(t, e)| match e {
            Event::Dead(err) => Some((*t, err)),
            _ => None,
        })
    }

    /// Starts (`true`) or stops recording the header of every frame handed to a session; see
    /// [`Sim::delivered_frames`]. Starting again clears what was recorded.
    pub fn record_frames(&mut self, on: bool) {
        self.trace = on.then(Vec::new);
    }

    /// Headers of the frames delivered while recording: when, the side that sent the frame, and
    /// its header.
    pub fn delivered_frames(&self) -> &[(Instant, Side, Header)] {
        self.trace.as_deref().unwrap_or(&[])
    }

    /// Errors returned by `side`'s [`Session::handle_frame`], with when.
    pub fn frame_errors(&self, side: Side) -> &[(Instant, Error)] {
        &self.frame_errors[side.index()]
    }

    // ------------------------------------------------------------------ faults

    /// Partitions the link in both directions (`true`) or heals it (`false`). The sessions are
    /// not told: they find out by their timers.
    ///
    /// With unreliable sessions (a datagram-like transport) every frame sent while the link is
    /// partitioned is lost, and so is every frame in flight that falls due. With reliable
    /// sessions (a TCP-like transport, which retransmits underneath) frames are held instead
    /// and delivered in order when the partition heals.
    pub fn partition(&mut self, on: bool) {
        self.partitioned = on;
        if !on {
            let now = self.now;
            for (from, frame) in std::mem::take(&mut self.held) {
                self.links[from].push(now, frame, &mut self.order);
            }
        }
    }

    /// Whether the link is partitioned.
    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }

    /// Breaks the transport connection: frames in flight are dropped and both sessions get
    /// [`Session::connection_lost`]. The sessions live on, waiting for [`Sim::reconnect`], until
    /// their peer timeout.
    pub fn disconnect(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        let now = self.now;
        for l in &mut self.links {
            l.clear(now);
        }
        for (from, _) in std::mem::take(&mut self.held) {
            self.links[from].stats.disconnect_drops += 1;
        }
        for s in &mut self.sessions {
            s.connection_lost(now);
        }
        self.collect_events();
    }

    /// A new transport connection carries the session (as after a successful resume
    /// handshake): both sessions get [`Session::connected`] and send again everything
    /// unacknowledged.
    pub fn reconnect(&mut self) {
        if self.connected {
            return;
        }
        self.connected = true;
        let now = self.now;
        for l in &mut self.links {
            l.tx_free_at = now;
        }
        for s in &mut self.sessions {
            s.connected(now);
        }
        self.collect_events();
    }

    /// Whether a transport connection carries the session (see [`Sim::disconnect`]).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Delivers `frame` to `to` at the current instant (after frames already due now),
    /// bypassing loss (but not partitions or disconnection): a hand-built frame from a
    /// misbehaving peer. It is handled when the simulation next runs.
    pub fn inject(&mut self, to: Side, frame: OutFrame) {
        let now = self.now;
        self.links[to.other().index()].push(now, frame, &mut self.order);
    }

    /// Makes sure the simulation stops at `at` (the [`Sim::run_until`] closure is called then),
    /// so the application can act at a chosen time.
    pub fn wake_at(&mut self, at: Instant) {
        if at > self.now {
            self.wakes.push(Reverse(at));
        }
    }

    // ------------------------------------------------------------------ running

    /// Runs until `pred` returns `true` or `max` of virtual time has passed; returns whether
    /// `pred` returned `true`. `pred` is called at every instant where something happened
    /// (after that instant's frames, timers and transmissions), possibly several times at one
    /// instant, and may act as the application of either side (send, recv, accept, partition,
    /// disconnect...); what it queues is processed before time advances.
    pub fn run_until(&mut self, mut pred: impl FnMut(&mut Sim) -> bool, max: Duration) -> bool {
        let deadline = self.now + max;
        loop {
            self.settle();
            if pred(self) {
                return true;
            }
            // The application may have queued work at this instant.
            if self.settle() {
                continue;
            }
            self.count_spins();
            if self.now >= deadline {
                return false;
            }
            self.now = match self.next_event() {
                Some(t) if t <= deadline => t,
                _ => deadline,
            };
            while self.wakes.peek().is_some_and(|w| w.0 <= self.now) {
                self.wakes.pop();
            }
        }
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(|_| false, d);
    }

    /// Does everything due at the current instant; returns whether anything happened.
    fn settle(&mut self) -> bool {
        let mut any = false;
        for round in 0.. {
            assert!(
                round < MAX_ROUNDS_PER_INSTANT,
                "livelock: still busy after {round} rounds at {:?}",
                self.elapsed()
            );
            let mut progress = self.deliver_due();
            progress |= self.fire_timers();
            progress |= self.transmit();
            self.collect_events();
            if !progress {
                break;
            }
            any = true;
        }
        any
    }

    /// Hands every frame due now to its receiver, in arrival order across both directions.
    fn deliver_due(&mut self) -> bool {
        let now = self.now;
        let mut any = false;
        loop {
            let next = [0, 1]
                .into_iter()
                .filter_map(|i| self.links[i].next_arrival().map(|a| (a, i)))
                .filter(|((at, _), _)| *at <= now)
                .min();
            let Some((_, from)) = next else {
                return any;
            };
            any = true;
            let frame = self.links[from].pop().expect("peeked");
            let to = 1 - from;
            if self.partitioned {
                if self.reliable {
                    self.held.push((from, frame));
                } else {
                    self.links[from].stats.partition_drops += 1;
                }
                continue;
            }
            if self.sessions[to].dead().is_some() {
                self.links[from].stats.dead_drops += 1;
                continue;
            }
            self.links[from].stats.frames_delivered += 1;
            let frame = frame
                .decode()
                .expect("a session emitted a frame that does not decode");
            if let Some(t) = self.trace.as_mut() {
                let side = if from == 0 { Side::A } else { Side::B };
                t.push((now, side, frame.header));
            }
            if let Err(e) = self.sessions[to].handle_frame(now, frame) {
                self.frame_errors[to].push((now, e));
            }
        }
    }

    /// Calls `handle_timeout` on a session whose timer has come (once per timer value and
    /// instant, so a timer left in the past cannot loop).
    fn fire_timers(&mut self) -> bool {
        let now = self.now;
        let mut any = false;
        for i in 0..2 {
            let Some(t) = self.sessions[i].poll_timeout() else {
                continue;
            };
            if t <= now && self.last_timeout[i] != Some((now, t)) {
                self.last_timeout[i] = Some((now, t));
                self.sessions[i].handle_timeout(now);
                self.side_stats[i].timeouts_handled += 1;
                any = true;
            }
        }
        any
    }

    /// Drains each session into its link while the link's transmitter is free.
    fn transmit(&mut self) -> bool {
        if !self.connected {
            return false;
        }
        let now = self.now;
        let mut any = false;
        for i in 0..2 {
            while self.links[i].tx_free_at <= now {
                let Some(f) = self.sessions[i].poll_transmit(now) else {
                    break;
                };
                any = true;
                let drop = self.partitioned && !self.reliable;
                self.links[i].send(now, f, drop, &mut self.order);
            }
        }
        any
    }

    fn collect_events(&mut self) {
        let now = self.now;
        for i in 0..2 {
            while let Some(e) = self.sessions[i].poll_event() {
                self.events[i].push((now, e));
            }
        }
    }

    fn count_spins(&mut self) {
        let now = self.now;
        for i in 0..2 {
            let idle = !self.connected || self.links[i].tx_free_at <= now;
            if idle && self.sessions[i].poll_timeout().is_some_and(|t| t <= now) {
                self.side_stats[i].timer_spins += 1;
            }
        }
    }

    /// The next instant after now at which something is due.
    fn next_event(&self) -> Option<Instant> {
        let now = self.now;
        let mut cands: Vec<Instant> = Vec::with_capacity(8);
        for i in 0..2 {
            if let Some((t, _)) = self.links[i].next_arrival() {
                cands.push(t);
            }
            if self.connected {
                cands.push(self.links[i].tx_free_at);
            }
            if let Some(t) = self.sessions[i].poll_timeout() {
                cands.push(t);
            }
        }
        if let Some(w) = self.wakes.peek() {
            cands.push(w.0);
        }
        cands.into_iter().filter(|&t| t > now).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class::{Class, Priority};
    use crate::frame::HEADER_LEN;
    use bytes::Bytes;

    /// Sends `n` messages of `len` bytes from A on one bulk channel and runs until B has read
    /// them all; returns the simulator.
    fn transfer(cfg: SimConfig, n: usize, len: usize) -> Sim {
        let mut sim = Sim::new(cfg);
        let ch = sim
            .a_mut()
            .open_channel(Class::Bulk, Priority::DEFAULT)
            .unwrap();
        let mut sent = 0;
        let mut got = 0;
        let done = sim.run_until(
            |s| {
                let now = s.now();
                while sent < n
                    && s.a_mut()
                        .send(now, ch, Bytes::from(vec![sent as u8; len]), 0, sent as u64)
                        .is_ok()
                {
                    sent += 1;
                }
                while let Some(m) = s.b_mut().recv(ch) {
                    assert_eq!(m.tag, got as u64);
                    assert_eq!(m.body.len(), len);
                    got += 1;
                }
                got == n
            },
            Duration::from_secs(60),
        );
        assert!(done);
        sim
    }

    fn trace(sim: &Sim) -> Vec<(Duration, Side, Header)> {
        sim.delivered_frames()
            .iter()
            .map(|(t, s, h)| (*t - sim.base(), *s, *h))
            .collect()
    }

    #[test]
    fn same_seed_same_run() {
        let cfg = |seed| {
            let mut c =
                SimConfig::new(seed).link(LinkConfig::lossy(Duration::from_micros(100), 0.1));
            c.a_to_b.bandwidth_bytes_per_sec = 1 << 30;
            c
        };
        let run = |seed| {
            let mut sim = Sim::new(cfg(seed));
            sim.record_frames(true);
            let ch = sim
                .a_mut()
                .open_channel(Class::Bulk, Priority::DEFAULT)
                .unwrap();
            let now = sim.now();
            for i in 0..20 {
                sim.a_mut()
                    .send(now, ch, Bytes::from(vec![i; 100_000]), 0, 0)
                    .unwrap();
            }
            sim.run_for(Duration::from_millis(200));
            (trace(&sim), sim.link_stats(Side::A).clone())
        };
        let (t1, s1) = run(1);
        let (t2, s2) = run(1);
        assert_eq!(t1, t2);
        assert_eq!(s1, s2);
        assert!(s1.lost > 0);
        let (t3, _) = run(2);
        assert_ne!(t1, t3, "another seed, another run");
    }

    #[test]
    fn bandwidth_serialises_frames() {
        // 1 MiB in 64 KiB chunks on a 100 MB/s link with no delay: the last chunk arrives after
        // exactly sixteen chunks' wire time (the initial window lets them all out at once).
        let link = LinkConfig::default().bandwidth(100_000_000);
        let chunk = Config::default().chunk_size.bulk as usize;
        let sim = transfer(SimConfig::new(1).link(link.clone()), 1, 16 * chunk);
        assert_eq!(sim.elapsed(), link.wire_time(HEADER_LEN + chunk) * 16);
        assert_eq!(link.wire_time(1_000_000), Duration::from_millis(10));
        assert_eq!(LinkConfig::default().wire_time(1 << 30), Duration::ZERO);
    }

    #[test]
    fn loss_rate_is_as_configured() {
        let link = LinkConfig {
            loss: 0.2,
            ..LinkConfig::with_delay(Duration::from_micros(50))
        };
        let sim = transfer(SimConfig::new(3).link(link).reliable(false), 300, 1000);
        let st = sim.link_stats(Side::A);
        let rate = st.lost as f64 / st.frames_sent as f64;
        assert!((0.15..0.25).contains(&rate), "{st:?}");
        assert_eq!(st.frames_delivered + st.lost, st.frames_sent);
        assert!(sim.a().stats().retransmits >= st.lost / 2);
    }

    #[test]
    fn wake_at_and_run_for_stop_on_time() {
        let mut sim = Sim::new(SimConfig::new(1));
        let t = sim.now() + Duration::from_micros(1234);
        sim.wake_at(t);
        let mut seen = Vec::new();
        sim.run_until(
            |s| {
                seen.push(s.elapsed());
                false
            },
            Duration::from_millis(2),
        );
        assert!(seen.contains(&Duration::from_micros(1234)), "{seen:?}");
        assert_eq!(sim.elapsed(), Duration::from_millis(2));
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.elapsed(), Duration::from_millis(3002));
        // Keepalives kept an idle session alive, and no timer was left in the past.
        assert!(sim.a().dead().is_none() && sim.b().dead().is_none());
        assert_eq!(sim.side_stats(Side::A).timer_spins, 0);
        assert!(sim.side_stats(Side::A).timeouts_handled > 0);
    }

    #[test]
    fn reliable_partition_holds_frames_in_order() {
        let mut sim =
            Sim::new(SimConfig::new(1).link(LinkConfig::with_delay(Duration::from_micros(10))));
        let ch = sim
            .a_mut()
            .open_channel(Class::Coordination, Priority::DEFAULT)
            .unwrap();
        sim.partition(true);
        let now = sim.now();
        for i in 0..5u8 {
            sim.a_mut()
                .send(now, ch, Bytes::from(vec![i; 10]), 0, 0)
                .unwrap();
        }
        sim.run_for(Duration::from_millis(100));
        assert!(!sim.b().readable(ch));
        sim.partition(false);
        sim.run_for(Duration::from_millis(1));
        for i in 0..5u8 {
            assert_eq!(sim.b_mut().recv(ch).unwrap().body[0], i);
        }
        assert_eq!(sim.link_stats(Side::A).partition_drops, 0);
        assert!(sim.frame_errors(Side::B).is_empty());
    }
}
