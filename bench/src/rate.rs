//! Throughput measured in slices.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Bytes a counter advanced by and the seconds it took, summed over one or more slices: a
/// throughput measured in slices is the sum of their bytes over the sum of their times.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Rate {
    bytes: u64,
    secs: f64,
}

impl Rate {
    /// Runs `work` and returns, with its output, what `counter` advanced by while it ran.
    pub(crate) async fn during<T>(counter: &AtomicU64, work: impl Future<Output = T>) -> (Rate, T) {
        let (b0, t0) = (counter.load(Ordering::Relaxed), Instant::now());
        let out = work.await;
        let rate = Rate {
            bytes: counter.load(Ordering::Relaxed).saturating_sub(b0),
            secs: t0.elapsed().as_secs_f64(),
        };
        (rate, out)
    }

    /// MB/s (10^6 bytes per second); 0 when no time was measured.
    pub(crate) fn mb_s(self) -> f64 {
        if self.secs <= 0.0 {
            return 0.0;
        }
        self.bytes as f64 / self.secs / 1e6
    }
}

impl std::ops::AddAssign for Rate {
    fn add_assign(&mut self, other: Rate) {
        self.bytes += other.bytes;
        self.secs += other.secs;
    }
}
