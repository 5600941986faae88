//! Small locking pieces shared by the receiving (`rx.rs`) and sending (`tx.rs`) halves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// Locks `m`. A panic while it was held leaves plain data behind; keep going with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
