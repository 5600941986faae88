//! Pacing of coordination round trips: a start at most every `interval`, as an agent that
//! thinks between steps sends, rather than one round trip straight after another.
//!
//! Round trips run back to back take all of a runtime worker for as long as they run: on a
//! machine with few cores that measures how much CPU the loop leaves to everything else, not
//! what the fabric does to either. A paced sender starts its next round trip at
//! `max(previous start + interval, previous end)`: a round trip longer than the interval is
//! followed at once by the next one (no catch-up burst), so a slow transport degrades to back to
//! back. Only the round trip itself is timed, never the wait before it.
//!
//! tokio's timer counts whole milliseconds, far too coarse for intervals of tens of
//! microseconds, so on Linux the wait is a `timerfd` (nanosecond resolution) read through
//! tokio's `AsyncFd`: the worker sleeps in the kernel like any other waiting task, instead of
//! spinning. Elsewhere the wait falls back to tokio's timer and its millisecond rounding.

use std::time::{Duration, Instant};

use crate::error::BenchResult;

/// When the next coordination round trip may start.
pub struct Pacer {
    /// Least time from one start to the next; zero for back to back.
    interval: Duration,
    /// The earliest start of the next round trip, once one has started.
    next: Option<Instant>,
    /// The fine-grained timer, made on the first wait that needs it.
    timer: Option<timer::Timer>,
}

impl Pacer {
    /// Round trips back to back: [`Pacer::wait`] never waits.
    pub fn back_to_back() -> Pacer {
        Pacer::every(Duration::ZERO)
    }

    /// At most one start every `interval` (zero: back to back).
    pub fn every(interval: Duration) -> Pacer {
        Pacer {
            interval,
            next: None,
            timer: None,
        }
    }

    /// Waits until the next round trip may start, and books the one after it. Returns how long
    /// it chose to sleep (zero when the start was already due).
    pub async fn wait(&mut self) -> BenchResult<Duration> {
        let mut slept = Duration::ZERO;
        if self.interval.is_zero() {
            return Ok(slept);
        }
        if let Some(next) = self.next {
            let now = Instant::now();
            if next > now {
                slept = next - now;
                let timer = match &mut self.timer {
                    Some(t) => t,
                    slot => slot.insert(
                        timer::Timer::new()
                            .map_err(|e| format!("cannot make the pacing timer: {e}"))?,
                    ),
                };
                timer
                    .sleep(slept)
                    .await
                    .map_err(|e| format!("the pacing timer failed: {e}"))?;
            }
        }
        self.next = Some(Instant::now() + self.interval);
        Ok(slept)
    }
}

#[cfg(target_os = "linux")]
mod timer {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    /// A one-shot monotonic `timerfd`, re-armed by each [`Timer::sleep`].
    pub struct Timer {
        fd: AsyncFd<OwnedFd>,
    }

    impl Timer {
        pub fn new() -> io::Result<Timer> {
            // SAFETY: no pointers; the result is checked before use.
            let raw = unsafe {
                libc::timerfd_create(
                    libc::CLOCK_MONOTONIC,
                    libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a descriptor just created and owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: the `OwnedFd` moves into the `AsyncFd` and is closed only when it drops,
            // so its descriptor stays open and the same for the registration's whole life.
            let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
            Ok(Timer { fd })
        }

        /// Sleeps for `d` (nothing for zero: a zero `it_value` would disarm the timer).
        pub async fn sleep(&mut self, d: Duration) -> io::Result<()> {
            if d.is_zero() {
                return Ok(());
            }
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                    // Under 10^9: fits a c_long on every target.
                    tv_nsec: d.subsec_nanos() as libc::c_long,
                },
            };
            // SAFETY: `spec` lives across the call; the old value is not asked for (null).
            let rc = unsafe {
                libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut())
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            loop {
                let mut ready = self.fd.readable().await?;
                let read = ready.try_io(|fd| {
                    let mut expirations = 0u64;
                    // SAFETY: reads 8 bytes into a live u64, as timerfd requires.
                    let n = unsafe {
                        libc::read(
                            fd.as_raw_fd(),
                            (&mut expirations as *mut u64).cast(),
                            std::mem::size_of::<u64>(),
                        )
                    };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
                match read {
                    Ok(r) => return r,
                    // Woken without an expiration to read: wait again.
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod timer {
    use std::io;
    use std::time::Duration;

    /// tokio's timer: intervals round up to whole milliseconds here.
    pub struct Timer;

    impl Timer {
        pub fn new() -> io::Result<Timer> {
            Ok(Timer)
        }

        pub async fn sleep(&mut self, d: Duration) -> io::Result<()> {
            tokio::time::sleep(d).await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn back_to_back_never_waits() {
        let mut p = Pacer::back_to_back();
        for _ in 0..100 {
            assert_eq!(p.wait().await.unwrap(), Duration::ZERO);
        }
        assert!(p.timer.is_none(), "a back-to-back pacer made a timer");
    }

    #[tokio::test]
    async fn starts_are_at_least_an_interval_apart() {
        let interval = Duration::from_micros(300);
        let mut p = Pacer::every(interval);
        let mut starts = Vec::new();
        for _ in 0..20 {
            p.wait().await.unwrap();
            starts.push(Instant::now());
        }
        for w in starts.windows(2) {
            assert!(
                w[1] - w[0] >= interval,
                "two starts {:?} apart, under the interval {interval:?}",
                w[1] - w[0]
            );
        }
    }

    #[tokio::test]
    async fn a_late_start_goes_at_once_and_is_not_followed_by_a_burst() {
        let interval = Duration::from_millis(2);
        let mut p = Pacer::every(interval);
        assert_eq!(
            p.wait().await.unwrap(),
            Duration::ZERO,
            "the first start waited"
        );
        // A "round trip" five intervals long: the next start is due, so it does not wait...
        std::thread::sleep(interval * 5);
        assert_eq!(
            p.wait().await.unwrap(),
            Duration::ZERO,
            "an overdue start waited"
        );
        // ...and the one after it waits for its interval, rather than going at once to catch
        // up the starts missed.
        let t = Instant::now();
        assert!(p.wait().await.unwrap() > Duration::ZERO, "a catch-up start");
        assert!(t.elapsed() >= interval - Duration::from_micros(100));
    }
}
