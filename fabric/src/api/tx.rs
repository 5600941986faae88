//! The sending half of a peer's connection, written outside the session's lock.
//!
//! Why: a write to a socket can take long. On loopback the kernel delivers the bytes inside the
//! system call, and runs whatever network work is pending on that core with them: under bulk
//! load, 20–100 µs for a 64-byte frame. With the sink inside the session's state, every other
//! task of the peer (a reader taking its message, the driver feeding what arrived) waited for
//! that write. So frames pulled from the session under its lock are *staged* here, in session
//! order, and written once the session's lock is released by the task that pulled them (or by
//! the task writing at the time, see below).
//!
//! Writers: whoever holds `sink` moves every staged frame into it and writes. A task that finds
//! `sink` held leaves its frames staged and marks the half contended; the holder then writes
//! again before it leaves, so no staged frame is left behind. An application task writes with a
//! no-op waker: when a write would block or fails, it wakes the driver, which writes with its own
//! waker (and so learns of write readiness and errors). A driver that finds `sink` held does not
//! spin on it: the holder wakes it when it leaves.
//!
//! Lock order: the session's state, then `sink`, then `staged`. Writers take `sink` without the
//! state (after releasing it) and never take the state while holding `sink`; only connecting
//! and disconnecting take `sink` under the state's lock, and they wait for a write in progress
//! (rare: once per connection).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::frame::{Lane, OutFrame};
use crate::sync::{lock, Contention};
use crate::transport::{FrameSink, OneSided};

/// Frames pulled from the session and not yet handed to the sink.
#[derive(Default)]
pub(crate) struct Staged {
    frames: Vec<OutFrame>,
    bytes: [usize; Lane::COUNT],
}

impl Staged {
    /// Stages `f` behind the frames staged before it.
    pub(crate) fn push(&mut self, f: OutFrame) {
        self.bytes[f.lane() as usize] += f.wire_len();
        self.frames.push(f);
    }

    /// Whether nothing is staged.
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct TxHalf {
    staged: Mutex<Staged>,
    /// `None` while disconnected.
    sink: Mutex<Option<Box<dyn FrameSink>>>,
    /// A task found `sink` held while frames were staged: the holder writes once more.
    contention: Contention,
    /// The driver found `sink` held: the holder wakes it when it leaves.
    driver_waiting: AtomicBool,
    /// Per lane, the bytes the sink held after its last write (staged bytes not included).
    in_sink: [AtomicUsize; Lane::COUNT],
    /// The driver task's waker (a leaf lock): woken when a task's write would block or failed,
    /// or when the driver waits for the sink. Read only on those paths, so a task's write costs
    /// no waker clone.
    driver: Mutex<Option<Waker>>,
    /// The connection's one-sided operations, when its transport has them (a leaf lock).
    one_sided: Mutex<Option<Arc<dyn OneSided>>>,
}

impl TxHalf {
    /// Locks the staging queue (from under the session's lock, to stage frames in order).
    pub(crate) fn staged(&self) -> MutexGuard<'_, Staged> {
        lock(&self.staged)
    }

    /// Bytes on `lane` waiting to be written: staged, plus what the sink held after its last
    /// write (a sink's own writer thread may have written some since).
    pub(crate) fn queued_in(&self, staged: &Staged, lane: Lane) -> usize {
        staged.bytes[lane as usize] + self.in_sink[lane as usize].load(Ordering::Relaxed)
    }

    /// Bytes waiting on every lane (as [`TxHalf::queued_in`]).
    pub(crate) fn queued(&self, staged: &Staged) -> usize {
        self.queued_in(staged, Lane::Latency) + self.queued_in(staged, Lane::Bulk)
    }

    /// Records the driver task's waker (the driver calls this on every poll).
    pub(crate) fn set_driver(&self, w: &Waker) {
        let mut d = lock(&self.driver);
        if !d.as_ref().is_some_and(|d| d.will_wake(w)) {
            *d = Some(w.clone());
        }
    }

    /// The driver task's waker, once it has polled.
    pub(crate) fn driver(&self) -> Option<Waker> {
        lock(&self.driver).clone()
    }

    /// The current connection's one-sided operations, if it has them.
    pub(crate) fn one_sided(&self) -> Option<Arc<dyn OneSided>> {
        lock(&self.one_sided).clone()
    }

    /// Installs the sending half of a new connection (`None`: disconnected). What was staged is
    /// dropped either way: the session sends again whatever the peer did not acknowledge.
    pub(crate) fn set_sink(&self, sink: Option<Box<dyn FrameSink>>) {
        *lock(&self.one_sided) = sink.as_ref().and_then(|s| s.one_sided());
        let mut s = lock(&self.sink);
        *s = sink;
        let mut st = self.staged();
        st.frames.clear();
        st.bytes = [0; Lane::COUNT];
        for n in &self.in_sink {
            n.store(0, Ordering::Relaxed);
        }
    }

    /// Moves the staged frames into `sink` and writes; records what the sink still holds.
    fn write(&self, sink: &mut dyn FrameSink, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut st = self.staged();
            for f in st.frames.drain(..) {
                sink.push(f);
            }
            st.bytes = [0; Lane::COUNT];
        }
        let r = sink.poll_flush(cx);
        for lane in [Lane::Latency, Lane::Bulk] {
            self.in_sink[lane as usize].store(sink.queued_bytes_in(lane), Ordering::Relaxed);
        }
        r
    }

    /// Writes what is staged, from the driver, with its waker. `Ready(Ok(true))` once
    /// everything is written; `Ready(Ok(false))` when another task is writing: that task writes
    /// what is staged before it leaves, then wakes the driver.
    pub(crate) fn flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.driver_waiting.store(true, Ordering::SeqCst);
        match self.write_all(cx) {
            // Left set: the holder wakes this driver when it leaves.
            None => Poll::Ready(Ok(false)),
            Some(r) => {
                self.driver_waiting.store(false, Ordering::SeqCst);
                r.map_ok(|()| true)
            }
        }
    }

    /// Writes what is staged until nothing staged is left behind; `None` when another task
    /// holds the sink (and so writes it).
    fn write_all(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        loop {
            let mut guard = self.contention.try_lock(&self.sink)?;
            let r = match guard.as_deref_mut() {
                Some(sink) => self.write(sink, cx),
                None => Poll::Ready(Ok(())),
            };
            let came = self.contention.release(guard);
            if !matches!(r, Poll::Ready(Ok(()))) || !came {
                return Some(r);
            }
            // Another task staged frames while this one wrote: write them too.
        }
    }

    /// Writes what is staged from an application task; when the write would block or failed,
    /// the driver is woken to finish it (its waker is the one registered for write readiness).
    pub(crate) fn flush_from_task(&self) {
        let mut cx = Context::from_waker(Waker::noop());
        let blocked = match self.write_all(&mut cx) {
            None => return,
            Some(r) => !matches!(r, Poll::Ready(Ok(()))),
        };
        if blocked || self.driver_waiting.swap(false, Ordering::SeqCst) {
            if let Some(w) = self.driver() {
                w.wake();
            }
        }
    }

    /// Writes what is staged and closes the sending direction (the session is dead).
    pub(crate) fn poll_close(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = lock(&self.sink);
        let Some(sink) = guard.as_deref_mut() else {
            return Poll::Ready(Ok(()));
        };
        std::task::ready!(self.write(sink, cx))?;
        sink.poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::HEADER_LEN;
    use bytes::Bytes;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{mpsc, Arc};
    use std::task::Wake;

    /// A sink that records what it wrote, can hold its writer inside a write until released,
    /// and can report that a write would block.
    struct FakeSink {
        written: Arc<Mutex<Vec<u8>>>,
        queue: Vec<OutFrame>,
        /// When set, the next write tells the test it started, then waits for its go-ahead.
        hold: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
        would_block: bool,
    }

    impl FrameSink for FakeSink {
        fn push(&mut self, frame: OutFrame) {
            self.queue.push(frame);
        }
        fn queued_bytes(&self) -> usize {
            self.queue.iter().map(OutFrame::wire_len).sum()
        }
        fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if let Some((started, go)) = self.hold.take() {
                started.send(()).unwrap();
                go.recv().unwrap();
            }
            if self.would_block {
                return Poll::Pending;
            }
            let mut w = self.written.lock().unwrap();
            w.extend(self.queue.drain(..).map(|f| f.payload[0]));
            Poll::Ready(Ok(()))
        }
        fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    fn frame(n: u8) -> OutFrame {
        OutFrame {
            header: [0; HEADER_LEN],
            payload: Bytes::from(vec![n]),
        }
    }

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn half(hold: bool, would_block: bool) -> (Arc<TxHalf>, Arc<Mutex<Vec<u8>>>, HoldCtl) {
        let written = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        let tx = Arc::new(TxHalf::default());
        tx.set_sink(Some(Box::new(FakeSink {
            written: written.clone(),
            queue: Vec::new(),
            hold: hold.then_some((started_tx, go_rx)),
            would_block,
        })));
        (tx, written, HoldCtl { started_rx, go_tx })
    }

    struct HoldCtl {
        started_rx: mpsc::Receiver<()>,
        go_tx: mpsc::Sender<()>,
    }

    #[test]
    fn frames_staged_while_another_task_writes_are_written_by_it_in_order() {
        let (tx, written, ctl) = half(true, false);
        tx.staged().push(frame(1));
        let writer = {
            let tx = tx.clone();
            std::thread::spawn(move || tx.flush_from_task())
        };
        ctl.started_rx.recv().unwrap();
        // While the first task is inside its write, a second stages and cannot write itself.
        tx.staged().push(frame(2));
        tx.flush_from_task();
        assert_eq!(*written.lock().unwrap(), Vec::<u8>::new());
        ctl.go_tx.send(()).unwrap();
        writer.join().unwrap();
        assert_eq!(
            *written.lock().unwrap(),
            vec![1, 2],
            "the writer wrote the frame staged meanwhile, after its own"
        );
    }

    #[test]
    fn a_driver_that_finds_the_sink_busy_is_woken_when_the_writer_leaves() {
        let (tx, written, ctl) = half(true, false);
        tx.staged().push(frame(1));
        let driver = Arc::new(Count::default());
        tx.set_driver(&Waker::from(driver.clone()));
        let writer = {
            let tx = tx.clone();
            std::thread::spawn(move || tx.flush_from_task())
        };
        ctl.started_rx.recv().unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            matches!(tx.flush(&mut cx), Poll::Ready(Ok(false))),
            "the driver does not wait for the writer"
        );
        ctl.go_tx.send(()).unwrap();
        writer.join().unwrap();
        assert_eq!(driver.0.load(Ordering::SeqCst), 1, "the driver was woken");
        assert_eq!(*written.lock().unwrap(), vec![1]);
    }

    #[test]
    fn a_task_whose_write_would_block_wakes_the_driver() {
        let (tx, _written, _ctl) = half(false, true);
        tx.staged().push(frame(1));
        let driver = Arc::new(Count::default());
        tx.set_driver(&Waker::from(driver.clone()));
        tx.flush_from_task();
        assert_eq!(driver.0.load(Ordering::SeqCst), 1);
        assert_eq!(tx.queued(&tx.staged()), HEADER_LEN + 1, "still in the sink");
    }

    #[test]
    fn a_task_whose_write_completes_leaves_the_driver_alone() {
        let (tx, written, _ctl) = half(false, false);
        tx.staged().push(frame(7));
        let driver = Arc::new(Count::default());
        tx.set_driver(&Waker::from(driver.clone()));
        tx.flush_from_task();
        assert_eq!(driver.0.load(Ordering::SeqCst), 0);
        assert_eq!(*written.lock().unwrap(), vec![7]);
        assert_eq!(tx.queued(&tx.staged()), 0);
    }

    #[test]
    fn disconnect_drops_what_was_staged() {
        let (tx, written, _ctl) = half(false, false);
        tx.staged().push(frame(1));
        tx.set_sink(None);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(tx.flush(&mut cx), Poll::Ready(Ok(true))));
        assert!(written.lock().unwrap().is_empty());
        assert_eq!(tx.queued(&tx.staged()), 0);
    }
}
