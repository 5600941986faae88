//! RTT estimation and the delay-based congestion window.
//!
//! RTT comes from the header's timestamp echo: the peer echoes the last timestamp it received,
//! advanced by how long it held it, so a delayed acknowledgement does not inflate the sample.
//! The window follows Swift: additive increase while the RTT is under `min_rtt + target_delay`,
//! multiplicative decrease (at most once per RTT, at most by half) above it.

use std::time::{Duration, Instant};

use crate::config::CongestionConfig;

/// Smoothed RTT estimator (RFC 6298 style) with a minimum filter.
#[derive(Debug, Clone)]
pub(crate) struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    min: Duration,
    latest: Duration,
    min_set_at: Option<Instant>,
}

/// The minimum RTT is forgotten after this long, so a path change can raise it.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);

impl RttEstimator {
    pub(crate) fn new() -> Self {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            min: Duration::MAX,
            latest: Duration::ZERO,
            min_set_at: None,
        }
    }

    pub(crate) fn on_sample(&mut self, now: Instant, sample: Duration) {
        self.latest = sample;
        let stale = self
            .min_set_at
            .is_none_or(|at| now.saturating_duration_since(at) > MIN_RTT_WINDOW);
        if sample <= self.min || stale {
            self.min = sample;
            self.min_set_at = Some(now);
        }
        match self.srtt {
            None => {
                self.srtt = Some(sample);
                self.rttvar = sample / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(sample);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + sample) / 8);
            }
        }
    }

    pub(crate) fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    pub(crate) fn min(&self) -> Option<Duration> {
        (self.min != Duration::MAX).then_some(self.min)
    }

    pub(crate) fn latest(&self) -> Duration {
        self.latest
    }

    /// Retransmission timeout: srtt + 4·rttvar, at least `floor`.
    pub(crate) fn rto(&self, floor: Duration) -> Duration {
        match self.srtt {
            Some(s) => (s + self.rttvar * 4).max(floor),
            None => floor.max(Duration::from_millis(100)),
        }
    }
}

/// The congestion window in bytes.
#[derive(Debug, Clone)]
pub(crate) struct CongestionWindow {
    cfg: CongestionConfig,
    window: f64,
    last_decrease: Option<Instant>,
}

impl CongestionWindow {
    pub(crate) fn new(cfg: CongestionConfig) -> Self {
        let window = cfg.initial_window.clamp(cfg.min_window, cfg.max_window) as f64;
        CongestionWindow {
            cfg,
            window,
            last_decrease: None,
        }
    }

    pub(crate) fn window(&self) -> u64 {
        self.window as u64
    }

    /// Bytes that a class may have in flight: bulk gets the window, coordination and tool calls
    /// the window plus the reserve, so bulk is the first to be held back.
    pub(crate) fn allowance(&self, bulk: bool) -> u64 {
        if bulk {
            self.window()
        } else {
            self.window() + self.cfg.coordination_reserve
        }
    }

    /// Feeds one RTT sample taken as `acked` bytes were acknowledged.
    pub(crate) fn on_ack(&mut self, now: Instant, acked: u64, rtt: &RttEstimator, chunk: u64) {
        let (Some(min), Some(srtt)) = (rtt.min(), rtt.srtt()) else {
            return;
        };
        let sample = rtt.latest();
        let target = min + self.cfg.target_delay;
        if sample <= target {
            // Additive increase: about one chunk per window acknowledged.
            self.window += chunk as f64 * acked as f64 / self.window.max(1.0);
        } else {
            let due = self
                .last_decrease
                .is_none_or(|at| now.saturating_duration_since(at) >= srtt);
            if due {
                let excess = (sample - target).as_secs_f64() / sample.as_secs_f64();
                let factor = (1.0 - 0.8 * excess).max(0.5);
                self.window *= factor;
                self.last_decrease = Some(now);
            }
        }
        self.clamp();
    }

    /// A retransmission timeout: the path lost frames; start again from the minimum.
    pub(crate) fn on_timeout(&mut self) {
        self.window = self.cfg.min_window as f64;
    }

    fn clamp(&mut self) {
        self.window = self
            .window
            .clamp(self.cfg.min_window as f64, self.cfg.max_window as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_under_target_and_shrinks_above() {
        let now = Instant::now();
        let mut rtt = RttEstimator::new();
        let mut cw = CongestionWindow::new(CongestionConfig::default());
        let start = cw.window();
        for i in 0..100 {
            rtt.on_sample(now, Duration::from_micros(20));
            cw.on_ack(now + Duration::from_micros(i), 64 << 10, &rtt, 64 << 10);
        }
        assert!(
            cw.window() > start,
            "window should grow below the target delay"
        );
        let grown = cw.window();
        rtt.on_sample(now, Duration::from_millis(5));
        cw.on_ack(now + Duration::from_millis(1), 64 << 10, &rtt, 64 << 10);
        assert!(
            cw.window() < grown,
            "window should shrink above the target delay"
        );
        assert!(
            cw.window() >= grown / 2,
            "one decrease is at most a halving"
        );
        cw.on_timeout();
        assert_eq!(cw.window(), CongestionConfig::default().min_window);
    }

    #[test]
    fn rto_has_a_floor() {
        let mut rtt = RttEstimator::new();
        rtt.on_sample(Instant::now(), Duration::from_micros(10));
        assert_eq!(
            rtt.rto(Duration::from_millis(20)),
            Duration::from_millis(20)
        );
    }
}
