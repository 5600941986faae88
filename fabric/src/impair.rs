//! Impairments of a simulated network link: delay, jitter, bandwidth, loss, reordering and
//! duplication. One type, [`Impairment`], configures both drivers that simulate a network:
//!
//! - the discrete-event simulator [`crate::sim`], one per direction of its link (re-exported
//!   there as `sim::LinkConfig`);
//! - the in-process transport [`crate::mem`], for both directions of every connection of a
//!   [`MemNetwork`](crate::mem::MemNetwork) (re-exported there as `mem::LinkConfig`).
//!
//! What each driver honours:
//!
//! | field | `sim` | `mem` |
//! |---|---|---|
//! | `delay` | yes | yes |
//! | `jitter` | yes, uniform in `0..=jitter` | yes, uniform in `0..jitter` |
//! | `bandwidth_bytes_per_sec` | yes, per direction | yes, per direction of each connection |
//! | `loss` | yes | yes |
//! | `reorder`, `reorder_delay` | yes | no (ignored) |
//! | `duplicate` | yes | no (ignored) |
//!
//! With loss or jitter, the in-process transport reports itself unreliable (sessions on it then
//! retransmit and reorder); the simulator's sessions are told what [`Impairment::is_lossy`] says
//! (through [`SimConfig::link`](crate::sim::SimConfig::link)).
//!
//! Imports: only `std`.

use std::time::Duration;

/// The behaviour of one direction of a simulated link (see the module docs for which driver
/// honours which field).
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// One-way (propagation) delay added to every frame once it is serialised.
    pub delay: Duration,
    /// Extra delay drawn uniformly up to `jitter` for each frame independently (so jitter also
    /// reorders frames sent close together): from `0..=jitter` in whole nanoseconds by the
    /// simulator, from `0..jitter` by the in-process transport.
    pub jitter: Duration,
    /// Bandwidth in bytes per second (header and payload count), per direction (of each
    /// connection, on the in-process transport); 0 means infinite, so frames take no time to
    /// serialise. Frames are serialised one after the other, so a queue builds up behind a
    /// burst as on a real link. (The in-process transport's former `LinkConfig` called it
    /// `bandwidth`.)
    pub bandwidth_bytes_per_sec: u64,
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Probability that a frame is held back by an extra delay drawn uniformly from
    /// `0..=reorder_delay`, so that frames sent after it may overtake it. Simulator only.
    pub reorder: f64,
    /// The largest extra delay of a reordered frame. Simulator only.
    pub reorder_delay: Duration,
    /// Probability that a frame is delivered twice (the copy has its own delay draw).
    /// Simulator only.
    pub duplicate: f64,
}

impl Default for Impairment {
    /// A perfect link: no delay, infinite bandwidth, no loss, no reordering.
    fn default() -> Self {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth_bytes_per_sec: 0,
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            duplicate: 0.0,
        }
    }
}

impl Impairment {
    /// A loss-free, in-order link with infinite bandwidth and the given one-way delay.
    pub fn with_delay(delay: Duration) -> Impairment {
        Impairment {
            delay,
            ..Impairment::default()
        }
    }

    /// A hostile link: `delay` plus up to `delay` of jitter, `loss` probability of loss, 10 %
    /// of frames held back by up to four times `delay`, and 1 % duplicated.
    pub fn lossy(delay: Duration, loss: f64) -> Impairment {
        Impairment {
            delay,
            jitter: delay,
            bandwidth_bytes_per_sec: 0,
            loss,
            reorder: 0.1,
            reorder_delay: delay * 4,
            duplicate: 0.01,
        }
    }

    /// This link with the given bandwidth in bytes per second (0: infinite).
    pub fn bandwidth(mut self, bytes_per_sec: u64) -> Impairment {
        self.bandwidth_bytes_per_sec = bytes_per_sec;
        self
    }

    /// Whether this link can lose, reorder or duplicate frames, so that the simulator's sessions
    /// must be created with `reliable = false` (the in-process transport decides for itself:
    /// see the module docs).
    pub fn is_lossy(&self) -> bool {
        self.loss > 0.0
            || self.duplicate > 0.0
            || !self.jitter.is_zero()
            || (self.reorder > 0.0 && !self.reorder_delay.is_zero())
    }

    /// Time to serialise `bytes` onto the link, rounded up to the nanosecond (the simulator's
    /// model; the in-process transport computes it in floating point).
    pub fn wire_time(&self, bytes: usize) -> Duration {
        if self.bandwidth_bytes_per_sec == 0 {
            return Duration::ZERO;
        }
        let bw = u128::from(self.bandwidth_bytes_per_sec);
        let nanos = (bytes as u128 * 1_000_000_000).div_ceil(bw);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}
