//! The peer's state, shared by its application handles and its driver task: [`PeerState`] (the
//! sans-IO session, plus the wakers that turn the session's events into progress for waiting
//! futures) behind one mutex in [`PeerShared`], locked through [`StateGuard`].
//!
//! The lock is held only for short, allocation-free work (queue a message, take a message, drain
//! frames); transport I/O happens outside it: received frames are read before it is taken
//! (`rx.rs`), frames to send are staged under it and written after it is released (`tx.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::oneshot;

use super::rx::{RxHalf, RxWake};
use super::tx::TxHalf;
use crate::bulk::PendingNotes;
use crate::class::Class;
use crate::core::id_map::{id_map, IdMap};
use crate::core::Delivered;
use crate::core::{Event, Session};
use crate::error::Error;
use crate::frame::{Frame, Lane};
use crate::sync::lock;
use crate::transport::FrameSink;

/// Bytes pulled from the session before a flush. Small enough that a coordination frame queued
/// while a batch is written waits for little; large enough to amortise the system call.
pub(crate) const SEND_BATCH: usize = 256 << 10;

/// The tasks waiting on each channel (several tasks may send or receive on one channel).
pub(crate) struct Waiters {
    map: IdMap<Vec<Waker>>,
}

impl Default for Waiters {
    fn default() -> Self {
        Waiters { map: id_map() }
    }
}

impl Waiters {
    /// Registers `w` as waiting on channel `id` (once per task).
    pub(crate) fn register(&mut self, id: u32, w: &Waker) {
        let v = self.map.entry(id).or_default();
        if !v.iter().any(|x| x.will_wake(w)) {
            v.push(w.clone());
        }
    }

    /// Removes the task behind `w` from channel `id`'s waiters (it is running and checks
    /// itself: waking it would only make the runtime poll it once more for nothing).
    pub(crate) fn unregister(&mut self, id: u32, w: &Waker) {
        if let Some(v) = self.map.get_mut(&id) {
            v.retain(|x| !x.will_wake(w));
        }
    }

    /// Wakes (once the lock is released) every task waiting on `id`; they check again and
    /// re-register if needed.
    pub(crate) fn wake(&mut self, id: u32, out: &mut WakeList) {
        if let Some(v) = self.map.get_mut(&id) {
            for w in v.drain(..) {
                out.push(w);
            }
        }
    }

    /// Wakes (once the lock is released) every waiting task.
    pub(crate) fn wake_all(&mut self, out: &mut WakeList) {
        for v in self.map.values_mut() {
            for w in v.drain(..) {
                out.push(w);
            }
        }
    }
}

/// Tasks to wake once the state's lock is released: a task woken while the lock is held would
/// often run at once on the other core only to block on that lock. Holds a few wakers inline so
/// the common case allocates nothing.
#[derive(Default)]
pub(crate) struct WakeList {
    inline: [Option<Waker>; 4],
    len: usize,
    more: Vec<Waker>,
}

impl WakeList {
    pub(crate) fn push(&mut self, w: Waker) {
        if self.len < self.inline.len() {
            self.inline[self.len] = Some(w);
            self.len += 1;
        } else {
            self.more.push(w);
        }
    }

    fn wake_all(self) {
        for w in self.inline.into_iter().flatten() {
            w.wake();
        }
        for w in self.more {
            w.wake();
        }
    }
}

/// Where a response goes when it arrives.
pub(crate) type ResponseSlot = oneshot::Sender<Result<Bytes, Error>>;

pub(crate) struct PeerState {
    pub(crate) session: Session,
    pub(crate) recv_wakers: Waiters,
    pub(crate) send_wakers: Waiters,
    pub(crate) flush_wakers: Waiters,
    pub(crate) accept_waker: Option<Waker>,
    pub(crate) system_accept_waker: Option<Waker>,
    /// This side's system channel for bulk transfers, opened on first use.
    pub(crate) transfer_channel: Option<u32>,
    /// Pending requests: tag → (channel, where the response goes).
    pub(crate) responses: HashMap<u64, (u32, ResponseSlot)>,
    /// The application refused the session's new channels (`Peer::refuse_channels`), with
    /// this reason: kept while application handles come and go.
    pub(crate) refuse_channels: Option<String>,
    pub(crate) next_tag: u64,
    pub(crate) request_rtt: HashMap<u32, Box<Histogram<u64>>>,
    /// Per channel, the messages taken by `Channel::recv`s that were dropped while joining
    /// them (several receivers on clones of one channel may each leave one): the next receives
    /// on the channel return them first.
    unjoined: HashMap<u32, VecDeque<Delivered>>,
    /// Set by `Peer::drop_connection`: the driver closes the current connection.
    pub(crate) kill_connection: bool,
    pub(crate) connected_to: String,
    /// Whether a connection is up (its sending half is in `tx`).
    pub(crate) connected: bool,
    /// Where frames pulled from the session are staged for writing (shared with `PeerShared`).
    pub(crate) tx: Arc<TxHalf>,
    /// Frames were staged: the task holding the lock writes them once it has released it.
    pub(crate) flush_pending: bool,
    /// The deadline the driver's timer is armed for.
    pub(crate) timer_at: Option<Instant>,
    /// Until when the driver watches the timers (see [`PeerState::watching`]).
    pub(crate) watch_until: Option<Instant>,
    /// Tasks to wake when the lock is released.
    wakes: WakeList,
}

/// What [`PeerState::pump`] did.
#[derive(Default)]
pub(crate) struct Pumped {
    /// Frames are staged, to be written.
    pub(crate) staged: bool,
    /// The batch limit was hit: there may be more to pull once the staged frames are written.
    pub(crate) more: bool,
}

/// Who feeds frames to the session.
#[derive(Clone, Copy)]
pub(crate) enum Feeder {
    /// The connection's driver task.
    Driver,
    /// An application task waiting in `recv` on this channel of this class.
    Reader(u32, Class),
}

/// Feeds `frames` to the session, in order; returns the bytes taken. From a reader, it also
/// sees that the driver's timer covers the deadlines the frames created.
pub(crate) fn ingest(st: &mut PeerState, frames: &mut Vec<Frame>, by: Feeder) -> usize {
    let now = Instant::now();
    let mut bytes = 0;
    for f in frames.drain(..) {
        bytes += crate::frame::HEADER_LEN + f.payload.len();
        if st.session.handle_frame(now, f).is_err() {
            break;
        }
    }
    frames.clear();
    if let Feeder::Reader(ch, class) = by {
        // An ack now due within `ack_delay` on the reader's own channel is usually carried by
        // the reply the reader is about to send, or the driver learns of it when the reader
        // next waits (`PeerState::idle`), or at its next watch tick. A bulk reader sends no
        // reply, and acks owed on other channels are not the reader's: for those the driver is
        // woken now, as a sender's window depends on them.
        let others = class == Class::Bulk || st.session.acks_owed_beyond(ch);
        if !st.watching(now) || (others && st.timer_needs_driver()) {
            st.wake_driver();
        }
        st.watch_until = Some(now + WATCH);
        st.kick_at(now);
    }
    bytes
}

impl PeerState {
    /// Whether the session now has a deadline earlier than the driver's armed timer.
    fn timer_needs_driver(&self) -> bool {
        match (self.session.poll_timeout(), self.timer_at) {
            (Some(t), Some(armed)) => t < armed,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// Whether the driver checks the session's timers every [`WATCH_TICK`] (application tasks
    /// fed it recently), so a new deadline needs no wake-up of its own.
    pub(crate) fn watching(&self, now: Instant) -> bool {
        self.watch_until.is_some_and(|w| now < w)
    }

    /// An application task is about to wait: if the session has a deadline before the driver's
    /// timer, wake the driver now (the task is idle, so the wake-up costs it nothing).
    pub(crate) fn idle(&mut self) {
        if self.timer_needs_driver() {
            self.wake_driver();
        }
    }

    /// Keeps a message whose join a dropped `Channel::recv` left unfinished, for the channel's
    /// next receive, and wakes a receiver waiting on the channel (another clone's).
    pub(crate) fn put_back_unjoined(&mut self, ch: u32, m: Delivered) {
        self.unjoined.entry(ch).or_default().push_back(m);
        self.recv_wakers.wake(ch, &mut self.wakes);
    }

    /// The oldest message put back on channel `ch` (see [`PeerState::put_back_unjoined`]).
    pub(crate) fn take_unjoined(&mut self, ch: u32) -> Option<Delivered> {
        if self.unjoined.is_empty() {
            return None;
        }
        let queue = self.unjoined.get_mut(&ch)?;
        let m = queue.pop_front();
        if queue.is_empty() {
            self.unjoined.remove(&ch);
        }
        m
    }

    pub(crate) fn new(session: Session, connected_to: String) -> PeerState {
        PeerState {
            session,
            recv_wakers: Waiters::default(),
            send_wakers: Waiters::default(),
            flush_wakers: Waiters::default(),
            accept_waker: None,
            system_accept_waker: None,
            transfer_channel: None,
            responses: HashMap::new(),
            refuse_channels: None,
            next_tag: 1,
            request_rtt: HashMap::new(),
            unjoined: HashMap::new(),
            kill_connection: false,
            connected_to,
            connected: false,
            tx: Arc::default(),
            flush_pending: false,
            timer_at: None,
            watch_until: None,
            wakes: WakeList::default(),
        }
    }

    /// Pulls frames from the session and stages them for writing (see `tx.rs`). Returns
    /// whether anything is staged, and whether the batch limit was hit (once what is staged is
    /// written, call again for more).
    pub(crate) fn pump(&mut self, now: Instant) -> Pumped {
        if !self.connected {
            return Pumped::default();
        }
        let tx = &*self.tx;
        let mut staged = tx.staged();
        loop {
            // Bulk stops at the batch limit; coordination, tool calls, acks and keepalives go on
            // as long as the latency lane has room, however backed up the bulk lane is.
            let bulk_ok = tx.queued(&staged) < SEND_BATCH;
            if !bulk_ok && tx.queued_in(&staged, Lane::Latency) >= SEND_BATCH {
                break;
            }
            match self.session.poll_transmit_lane(now, bulk_ok) {
                Some(f) => staged.push(f),
                None => break,
            }
        }
        Pumped {
            staged: !staged.is_empty(),
            more: tx.queued(&staged) >= SEND_BATCH,
        }
    }

    /// After the application changed the session (queued a message, read one): write what is
    /// ready from this task (once the lock is released) when the connection takes it at once,
    /// which saves a task switch on the latency path; otherwise leave the work to the driver.
    pub(crate) fn kick(&mut self) {
        self.kick_at(Instant::now());
    }

    /// As [`PeerState::kick`], at `now`.
    pub(crate) fn kick_at(&mut self, now: Instant) {
        let Pumped { staged, more } = self.pump(now);
        // Written by this task once it releases the lock (see `StateGuard`'s drop).
        self.flush_pending |= staged;
        self.dispatch();
        // The driver must run if there is more to send than one batch, or the session now needs
        // an earlier timer that the driver is not already watching for. (A write that would
        // block or fails wakes it too: see `TxHalf::flush_from_task`.)
        let earlier_timer = self.timer_needs_driver() && !self.watching(now);
        if more || earlier_timer || !self.connected {
            self.wake_driver();
        }
    }

    /// Turns the session's events into wake-ups. Call after anything that may produce events.
    pub(crate) fn dispatch(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                Event::ChannelOpened(_) => {
                    if let Some(w) = self.accept_waker.take() {
                        self.wakes.push(w);
                    }
                }
                Event::SystemChannelOpened(_) => {
                    if let Some(w) = self.system_accept_waker.take() {
                        self.wakes.push(w);
                    }
                }
                Event::Readable(ch) => self.recv_wakers.wake(ch, &mut self.wakes),
                Event::Writable(ch) => self.send_wakers.wake(ch, &mut self.wakes),
                Event::Flushed(ch) => self.flush_wakers.wake(ch, &mut self.wakes),
                Event::Response { tag, result, .. } => {
                    // A response nobody waits for (deadline passed, cancelled) is dropped.
                    if let Some((_, slot)) = self.responses.remove(&tag) {
                        let _ = slot.send(result.map_err(Error::Remote));
                    }
                }
                Event::ChannelRefused { channel, reason } => {
                    // Responses that came before the refusal were delivered above; the other
                    // requests on the channel fail now.
                    let tags: Vec<u64> = self
                        .responses
                        .iter()
                        .filter(|(_, (ch, _))| *ch == channel)
                        .map(|(&tag, _)| tag)
                        .collect();
                    for tag in tags {
                        if let Some((_, slot)) = self.responses.remove(&tag) {
                            let _ = slot.send(Err(Error::ChannelRefused {
                                channel,
                                reason: reason.clone(),
                            }));
                        }
                    }
                    self.recv_wakers.wake(channel, &mut self.wakes);
                    self.send_wakers.wake(channel, &mut self.wakes);
                    self.flush_wakers.wake(channel, &mut self.wakes);
                }
                Event::Dead(err) => {
                    tracing::debug!(error = %err, "session dead");
                    self.fail_all(&err);
                }
            }
        }
    }

    /// Wakes every waiting operation; they observe the session's error.
    fn fail_all(&mut self, err: &Error) {
        self.recv_wakers.wake_all(&mut self.wakes);
        self.send_wakers.wake_all(&mut self.wakes);
        self.flush_wakers.wake_all(&mut self.wakes);
        for w in [self.accept_waker.take(), self.system_accept_waker.take()]
            .into_iter()
            .flatten()
        {
            self.wakes.push(w);
        }
        for (_, (_, slot)) in self.responses.drain() {
            let _ = slot.send(Err(err.clone()));
        }
        self.wake_driver();
    }

    pub(crate) fn wake_driver(&mut self) {
        if let Some(w) = self.tx.driver() {
            self.wakes.push(w);
        }
    }

    /// Kills the session with `err` (the node shuts down, the transport delivered garbage, the
    /// peer refused to resume) and fails every waiter.
    pub(crate) fn kill(&mut self, err: Error) {
        self.session.abort(err);
        self.dispatch();
    }
}

/// Identity and state of one peer session.
pub(crate) struct PeerShared {
    pub(crate) remote_name: String,
    pub(crate) session_id: u64,
    pub(crate) state: Mutex<PeerState>,
    /// The connection's receiving half (see `rx.rs`); locked before `state`.
    pub(crate) rx: Mutex<RxHalf>,
    pub(crate) rx_wake: Arc<RxWake>,
    /// `rx_wake` as a waker: the only waker the transport's receive side is polled with.
    pub(crate) rx_waker: Waker,
    /// The connection's sending half (see `tx.rs`); also in `PeerState::tx`.
    pub(crate) tx: Arc<TxHalf>,
    /// Notifications of transfers into this node that ride on the peer's last write.
    pub(crate) notes: Arc<PendingNotes>,
    /// Application handles of the session alive ([`Peer`](super::peer::Peer)s the
    /// application holds, or its channels hold): with none, nobody can take the channels the
    /// peer opens, so they are refused as they arrive. The node's own tasks hold handles that
    /// do not count.
    app_handles: AtomicUsize,
}

/// Why channels are refused when the application holds no handle of their session.
const NO_APP_HANDLE: &str = "the application dropped every handle of the session";

/// Bytes a task waiting in `recv` reads from the connection in one go before it leaves the rest
/// to the driver (a bulk flood is the driver's work, not a coordination reader's).
const INLINE_BUDGET: usize = 64 << 10;

/// How long after an application task last fed the session the driver keeps checking the
/// session's timers every [`WATCH_TICK`] instead of being woken for each earlier deadline.
const WATCH: Duration = Duration::from_millis(250);

/// The driver's timer period while it watches (see [`WATCH`]).
pub(crate) const WATCH_TICK: Duration = Duration::from_millis(25);

impl PeerShared {
    pub(crate) fn new(remote_name: String, session_id: u64, state: PeerState) -> PeerShared {
        let rx_wake = Arc::new(RxWake::default());
        PeerShared {
            remote_name,
            session_id,
            tx: Arc::clone(&state.tx),
            state: Mutex::new(state),
            rx: Mutex::new(RxHalf::default()),
            rx_waker: Waker::from(rx_wake.clone()),
            rx_wake,
            notes: Arc::default(),
            app_handles: AtomicUsize::new(0),
        }
    }

    /// An application handle of the session was made (see `PeerShared::app_handles`).
    pub(crate) fn app_handle_added(&self) {
        if self.app_handles.fetch_add(1, Ordering::SeqCst) == 0 {
            self.update_refusing();
        }
    }

    /// An application handle of the session was dropped.
    pub(crate) fn app_handle_dropped(&self) {
        if self.app_handles.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.update_refusing();
        }
    }

    /// Makes the session refuse new channels while no application handle is alive or the
    /// application asked for it (`Peer::refuse_channels`), and take them otherwise. The count
    /// is read again under the lock, so racing handles settle on the right state.
    pub(crate) fn update_refusing(&self) {
        let mut st = self.state();
        let reason = match (&st.refuse_channels, self.app_handles.load(Ordering::SeqCst)) {
            (Some(r), _) => Some(r.clone()),
            (None, 0) => Some(NO_APP_HANDLE.to_owned()),
            (None, _) => None,
        };
        if reason.is_none() && !st.session.refusing_new_channels() {
            return;
        }
        st.session
            .refuse_new_channels(Instant::now(), reason.as_deref());
        st.kick();
    }

    /// Locks the receiving half.
    pub(crate) fn rx(&self) -> MutexGuard<'_, RxHalf> {
        lock(&self.rx)
    }

    /// Reads what the connection has into the session from an application task waiting in
    /// `recv` on channel `ch` (see `rx.rs`), until the transport has nothing more, the budget
    /// is spent, or `ch` has a message (the rest is left to the driver: a coordination reader
    /// does not stay to read bulk). Does nothing when another task is reading or there is no
    /// connection; errors are left to the driver.
    pub(crate) fn read_inline(&self, ch: u32, class: Class) {
        if !self.rx_wake.unread() {
            // Nothing arrived since the last poll (which left the waker registered).
            return;
        }
        let Some(mut rx) = self.rx_wake.try_lock(&self.rx) else {
            return;
        };
        let handed_on = self.read_locked(&mut rx, ch, class);
        if self.rx_wake.release(rx) && !handed_on {
            // Another task came to read while this one held the receiving half.
            self.rx_wake.wake_driver();
        }
    }

    /// [`PeerShared::read_inline`] with the receiving half locked; `true` when the rest was
    /// handed to the driver.
    fn read_locked(&self, rx: &mut RxHalf, ch: u32, class: Class) -> bool {
        if rx.failed.is_some() {
            return false;
        }
        let Some(stream) = rx.stream.as_mut() else {
            return false;
        };
        let mut cx = Context::from_waker(&self.rx_waker);
        let mut taken = 0usize;
        let mut last = false;
        loop {
            self.rx_wake.polling();
            let r = stream.poll_recv(&mut cx, &mut rx.frames);
            let mut mine = last;
            if !rx.frames.is_empty() {
                let mut st = self.state();
                taken += ingest(&mut st, &mut rx.frames, Feeder::Reader(ch, class));
                mine = st.session.readable(ch);
            }
            match r {
                Poll::Pending => return false,
                // With its message in, this task polls once more, which usually finds nothing
                // and leaves the waker registered; more than that is the driver's.
                Poll::Ready(Ok(())) if mine && !last => last = true,
                Poll::Ready(Ok(())) if taken < INLINE_BUDGET && !mine => {}
                Poll::Ready(Ok(())) => {
                    // This task has its message, or has read its share: the rest is the
                    // driver's.
                    self.rx_wake.wake_driver();
                    return true;
                }
                Poll::Ready(Err(e)) => {
                    rx.failed = Some(e);
                    self.rx_wake.wake_driver();
                    return true;
                }
            }
        }
    }

    /// Takes the connection's receiving half away (the connection ended).
    pub(crate) fn clear_rx(&self) {
        let mut rx = self.rx();
        rx.stream = None;
        rx.frames.clear();
        rx.failed = None;
    }
    /// Locks the state; tasks woken meanwhile are woken, and frames staged meanwhile written,
    /// when the guard is dropped.
    pub(crate) fn state(&self) -> StateGuard<'_> {
        StateGuard {
            guard: Some(lock(&self.state)),
            tx: &self.tx,
        }
    }

    /// Installs a new connection's sending half (what was staged for an older one is dropped).
    pub(crate) fn connect(&self, st: &mut PeerState, sink: Box<dyn FrameSink>) {
        self.tx.set_sink(Some(sink));
        if let Some(ops) = self.tx.one_sided() {
            // Before the session can use the connection, so no peer write's immediate is missed.
            ops.on_immediate(self.notes.handler());
        }
        st.connected = true;
    }

    /// Marks the connection gone: drops its sending half, and what was staged for it.
    pub(crate) fn disconnect(&self, st: &mut PeerState) {
        st.connected = false;
        st.flush_pending = false;
        self.tx.set_sink(None);
    }
}

/// The locked state. Dropping it releases the lock, then wakes the tasks that events made ready
/// and writes the frames staged meanwhile.
pub(crate) struct StateGuard<'a> {
    guard: Option<MutexGuard<'a, PeerState>>,
    tx: &'a TxHalf,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = PeerState;
    fn deref(&self) -> &PeerState {
        self.guard.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut PeerState {
        self.guard.as_mut().expect("present until drop")
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            let wakes = std::mem::take(&mut g.wakes);
            let flush = std::mem::take(&mut g.flush_pending);
            drop(g);
            wakes.wake_all();
            if flush {
                self.tx.flush_from_task();
            }
        }
    }
}
