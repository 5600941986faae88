//! The receiving half of a peer's connection, shared by the connection's driver task and the
//! application tasks waiting in `recv`.
//!
//! Why: a message that goes transport → driver task → application task pays one task switch
//! per receive, and on a multi-threaded runtime two tasks made runnable at once often end up on
//! different cores, each hand-over a futex wake-up. So a task waiting in `recv` reads the
//! connection itself ("inline receive"): the transport's wake-up goes straight to that task,
//! which feeds what arrived to the session and takes its message with no task in between. The
//! driver keeps everything else (writes that would block, timers, connection loss) and reads
//! whenever no application task waits.
//!
//! Wake-ups: the transport is always polled with one waker, [`RxWake`], which hands each wake to
//! the first waiting reader, or to the driver when none waits. A reader that stops waiting after
//! a wake it did not act on passes the wake on, so no readiness is ever lost. A reader whose
//! task keeps a polled `recv` future but stops polling it (busy with something else) is not
//! waited for long: a second wake before anyone read goes to the driver as well, and the driver
//! reads the connection whenever its timer fires (every [`super::peer_state::WATCH_TICK`] while
//! traffic flows, at least every `keepalive_interval` otherwise).
//!
//! Lock order: `PeerShared::rx` before `PeerShared::state`; `RxWake`'s own lock is a leaf, and
//! wakers are called after it is released.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Wake, Waker};

use crate::frame::Frame;
use crate::sync::{lock, Contention};
use crate::transport::{FrameStream, RecvError};

/// The connection's receiving half.
#[derive(Default)]
pub(crate) struct RxHalf {
    /// `None` while disconnected.
    pub(crate) stream: Option<Box<dyn FrameStream>>,
    /// Reused buffer for received frames.
    pub(crate) frames: Vec<Frame>,
    /// A receive error met by a reader, for the driver to act on (end the connection).
    pub(crate) failed: Option<RecvError>,
}

/// The waker every poll of the transport uses; see the module docs.
#[derive(Default)]
pub(crate) struct RxWake {
    inner: Mutex<WakeState>,
    /// A task found the receiving half locked: whoever holds it reads again, or hands the
    /// reading on, after unlocking (the wake that task came for may have arrived after the
    /// holder's last poll of the transport).
    contention: Contention,
}

#[derive(Default)]
struct WakeState {
    driver: Option<Waker>,
    /// Tasks waiting in `recv` on this peer: (registration id, rank, waker), by rank (lower
    /// first: coordination before tool calls before bulk), oldest first within a rank.
    readers: Vec<(u64, u8, Waker)>,
    next_id: u64,
    /// A wake came and nobody has polled the transport since.
    signalled: bool,
}

impl RxWake {
    fn state(&self) -> MutexGuard<'_, WakeState> {
        lock(&self.inner)
    }

    /// Locks `rx` if it is free. When it is not, the holder is told (see
    /// [`RxWake::release`]), so the wake-up this task came for is not lost.
    pub(crate) fn try_lock<'a>(&self, rx: &'a Mutex<RxHalf>) -> Option<MutexGuard<'a, RxHalf>> {
        self.contention.try_lock(rx)
    }

    /// Unlocks `guard`; `true` when another task found it locked meanwhile: the caller reads
    /// the transport again, or hands the reading on.
    pub(crate) fn release(&self, guard: MutexGuard<'_, RxHalf>) -> bool {
        self.contention.release(guard)
    }

    /// Sets the driver's waker (the fallback when no reader waits).
    pub(crate) fn set_driver(&self, w: &Waker) {
        let mut s = self.state();
        if !s.driver.as_ref().is_some_and(|d| d.will_wake(w)) {
            s.driver = Some(w.clone());
        }
    }

    /// Whether a wake came that no poll of the transport has acted on yet. Without one the
    /// transport has nothing new: its waker is registered and has not fired.
    pub(crate) fn unread(&self) -> bool {
        self.state().signalled
    }

    /// Marks the transport as possibly holding data nobody polled for (a new connection).
    pub(crate) fn mark_unread(&self) {
        self.state().signalled = true;
    }

    /// Called right before the transport is polled: the poll acts on every wake so far.
    pub(crate) fn polling(&self) {
        self.state().signalled = false;
    }

    /// Marks the transport as having work and wakes the driver (a reader gave up its turn, or
    /// stopped before the transport was drained).
    pub(crate) fn wake_driver(&self) {
        let w = {
            let mut s = self.state();
            s.signalled = true;
            s.driver.clone()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Registers (or refreshes) a waiting reader of `rank`; `id` keeps its registration.
    fn register(&self, id: &mut Option<u64>, rank: u8, w: &Waker) {
        let mut s = self.state();
        if let Some(me) = *id {
            if let Some(slot) = s.readers.iter_mut().find(|r| r.0 == me) {
                if !slot.2.will_wake(w) {
                    slot.2 = w.clone();
                }
                return;
            }
        }
        let me = s.next_id;
        s.next_id += 1;
        let at = s.readers.partition_point(|r| r.1 <= rank);
        s.readers.insert(at, (me, rank, w.clone()));
        *id = Some(me);
    }

    /// Removes a reader; a wake it did not act on goes to the next reader or the driver.
    fn deregister(&self, id: u64) {
        let next = {
            let mut s = self.state();
            s.readers.retain(|r| r.0 != id);
            if !s.signalled {
                return;
            }
            s.readers
                .first()
                .map(|r| r.2.clone())
                .or_else(|| s.driver.clone())
        };
        if let Some(w) = next {
            w.wake();
        }
    }
}

impl Wake for RxWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let (w, also_driver) = {
            let mut s = self.state();
            // A second wake before anyone polled: the reader woken first has not come to read
            // (its task is busy elsewhere); the driver reads instead of waiting for it.
            let unread = std::mem::replace(&mut s.signalled, true);
            match s.readers.first() {
                Some(r) => (Some(r.2.clone()), s.driver.clone().filter(|_| unread)),
                None => (s.driver.clone(), None),
            }
        };
        for w in [w, also_driver].into_iter().flatten() {
            w.wake();
        }
    }
}

/// A task's registration as a waiting reader, removed when dropped (the wait ended or was
/// cancelled).
pub(crate) struct ReaderSlot<'a> {
    wake: &'a RxWake,
    id: Option<u64>,
}

impl<'a> ReaderSlot<'a> {
    pub(crate) fn new(wake: &'a RxWake) -> Self {
        ReaderSlot { wake, id: None }
    }

    /// Registers the task behind `w` to be woken when the transport has data. Of several
    /// waiting tasks the one of the lowest `rank` is woken: a coordination reader reads (and
    /// gets its message) before a bulk reader would have read a batch of bulk frames.
    pub(crate) fn register(&mut self, rank: u8, w: &Waker) {
        self.wake.register(&mut self.id, rank, w);
    }
}

impl Drop for ReaderSlot<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.wake.deregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count::default());
        (c.clone(), Waker::from(c))
    }
    fn n(c: &Count) -> usize {
        c.0.load(Ordering::SeqCst)
    }
    /// An `RxWake` with a driver registered, the driver's wake count, and the waker the
    /// transport would call.
    fn with_driver() -> (Arc<RxWake>, Arc<Count>, Waker) {
        let rx = Arc::new(RxWake::default());
        let (driver, dw) = counter();
        rx.set_driver(&dw);
        let waker = Waker::from(rx.clone());
        (rx, driver, waker)
    }

    #[test]
    fn wakes_the_first_reader_else_the_driver() {
        let (rx, driver, waker) = with_driver();
        let (reader, rw) = counter();
        waker.wake_by_ref();
        assert_eq!(n(&driver), 1);
        {
            let mut slot = ReaderSlot::new(&rx);
            slot.register(0, &rw);
            rx.polling();
            waker.wake_by_ref();
            assert_eq!((n(&reader), n(&driver)), (1, 1));
            // The reader polls, then leaves: nothing to pass on.
            rx.polling();
        }
        assert_eq!(n(&driver), 1);
        waker.wake_by_ref();
        assert_eq!(n(&driver), 2);
    }

    #[test]
    fn a_reader_leaving_after_an_unread_wake_passes_it_on() {
        let (rx, driver, waker) = with_driver();
        let (_, rw) = counter();
        let mut slot = ReaderSlot::new(&rx);
        slot.register(0, &rw);
        rx.polling();
        waker.wake_by_ref();
        assert_eq!(n(&driver), 0);
        drop(slot);
        assert_eq!(n(&driver), 1, "the unread wake reaches the driver");
    }

    #[test]
    fn a_second_wake_before_any_read_also_reaches_the_driver() {
        let (rx, driver, waker) = with_driver();
        let (reader, rw) = counter();
        let mut slot = ReaderSlot::new(&rx);
        slot.register(0, &rw);
        rx.polling();
        waker.wake_by_ref();
        assert_eq!(n(&driver), 0);
        waker.wake_by_ref();
        assert_eq!((n(&reader), n(&driver)), (2, 1));
    }

    #[test]
    fn the_reader_of_the_lowest_rank_is_woken() {
        let (rx, _, waker) = with_driver();
        let (bulk, bw) = counter();
        let (coord, cw) = counter();
        let mut b = ReaderSlot::new(&rx);
        b.register(2, &bw);
        let mut c = ReaderSlot::new(&rx);
        c.register(0, &cw);
        rx.polling();
        waker.wake_by_ref();
        assert_eq!((n(&coord), n(&bulk)), (1, 0));
        rx.polling();
        drop(c);
        waker.wake_by_ref();
        assert_eq!(n(&bulk), 1);
    }
}
