//! Locking helpers for the fabric and its transports.
//!
//! The fabric's locks guard plain data (queues, counters, maps) whose every update is complete
//! before the next line can panic, so a panic elsewhere while one was held leaves nothing half
//! done: [`lock`] and [`wait`] keep going with the data instead of spreading the panic to every
//! later caller, as `Mutex::lock().unwrap()` would. The transports use these same helpers, so
//! the policy lives in one place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

/// Locks `m`, ignoring poisoning (see the module docs for why that is sound here).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` with `guard`, ignoring poisoning as [`lock`] does.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` with `guard` for at most `timeout`, ignoring poisoning as [`lock`] does; the
/// flag is `true` when the time ran out.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, bool) {
    match cv.wait_timeout(guard, timeout) {
        Ok((g, t)) => (g, t.timed_out()),
        Err(e) => {
            let (g, t) = e.into_inner();
            (g, t.timed_out())
        }
    }
}

/// A lock whose waiters do not wait: a task that finds it held leaves its work to the holder,
/// and the holder, once it has unlocked, learns that someone came meanwhile (and does the
/// work once more, or hands it on), so nothing that task came for is lost.
#[derive(Default)]
pub(crate) struct Contention {
    /// A task found the lock held since the holder took it.
    came: AtomicBool,
}

impl Contention {
    /// Locks `m` if it is free; `None` tells the holder (see [`Contention::release`]).
    pub(crate) fn try_lock<'a, T>(&self, m: &'a Mutex<T>) -> Option<MutexGuard<'a, T>> {
        self.came.store(true, Ordering::SeqCst);
        let g = match m.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => return None,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        // Whatever the others came for, this holder's work from here on covers it.
        self.came.store(false, Ordering::SeqCst);
        Some(g)
    }

    /// Unlocks `guard`; `true` when another task found the lock held meanwhile.
    pub(crate) fn release<T>(&self, guard: MutexGuard<'_, T>) -> bool {
        drop(guard);
        self.came.swap(false, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_learns_that_another_task_found_the_lock_held() {
        let c = Contention::default();
        let m = Mutex::new(());
        let held = c.try_lock(&m).expect("free");
        assert!(c.try_lock(&m).is_none());
        assert!(c.release(held), "the contention is reported to the holder");
        let held = c.try_lock(&m).expect("free again");
        assert!(!c.release(held), "nothing to report without contention");
    }
}
