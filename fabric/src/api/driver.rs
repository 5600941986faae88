//! The task that moves a session's frames over one transport connection.
//!
//! A hand-written future (no boxed future, no allocation per message): it drains what the
//! connection received into the session, fires the session's timers, stages the session's
//! frames in batches and, once the session's lock is released, writes them (one vectored write
//! where the transport allows; see `tx.rs`). It ends when the connection breaks, is replaced by
//! a resumed one, or the session dies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::time::Sleep;

use super::peer_state::{ingest, Feeder, PeerShared, WATCH_TICK};
use crate::error::Error;
use crate::frame::Frame;
use crate::transport::{Connection, RecvError};

/// Why a connection's driver stopped.
pub(crate) enum ConnEnd {
    /// The session is dead (its error was dispatched to every waiter).
    SessionDead,
    /// The connection broke; the session waits for a new one.
    Lost(String),
    /// The peer resumed the session on a new connection, which replaces this one.
    Replaced(Connection),
}

/// Bytes a driver moves in one poll before it yields its worker thread, so the application
/// tasks it just woke (a coordination message that arrived amid bulk) run without waiting for a
/// whole bulk transfer to drain.
const POLL_BUDGET: usize = 128 << 10;

pub(crate) struct ConnDriver<'a> {
    shared: Arc<PeerShared>,
    timer: Pin<Box<Sleep>>,
    resume: Option<&'a mut mpsc::Receiver<Connection>>,
}

impl<'a> ConnDriver<'a> {
    /// Takes over `conn`: its sending half goes into the shared sending half (so application
    /// tasks can write without a task switch), its receiving half into the shared receiving half (so a
    /// task waiting in `recv` can read it); `leftover` frames (read with the handshake) are fed
    /// to the session first.
    pub(crate) fn new(
        shared: Arc<PeerShared>,
        conn: Connection,
        mut leftover: Vec<Frame>,
        resume: Option<&'a mut mpsc::Receiver<Connection>>,
    ) -> Self {
        {
            let mut rx = shared.rx();
            rx.stream = Some(conn.stream);
            shared.rx_wake.mark_unread();
            rx.failed = None;
            rx.frames.clear();
            let mut st = shared.state();
            shared.connect(&mut st, conn.sink);
            st.timer_at = None;
            ingest(&mut st, &mut leftover, Feeder::Driver);
            st.dispatch();
        }
        ConnDriver {
            shared,
            timer: Box::pin(tokio::time::sleep(std::time::Duration::from_secs(3600))),
            resume,
        }
    }

    fn end(&mut self, end: ConnEnd) -> Poll<ConnEnd> {
        let mut st = self.shared.state();
        self.shared.disconnect(&mut st);
        Poll::Ready(end)
    }
}

impl Future for ConnDriver<'_> {
    type Output = ConnEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ConnEnd> {
        let this = self.get_mut();
        let mut work = 0usize;
        loop {
            let mut progress = false;

            // A resumed connection replaces this one.
            if let Some(rx) = this.resume.as_deref_mut() {
                if let Poll::Ready(Some(conn)) = rx.poll_recv(cx) {
                    return this.end(ConnEnd::Replaced(conn));
                }
            }

            // 1. Receive everything that is ready (unless a task waiting in `recv` is reading
            // right now: it feeds the session itself, and hands back what it cannot do).
            let shared = this.shared.clone();
            shared.rx_wake.set_driver(cx.waker());
            let mut rx = shared.rx_wake.try_lock(&shared.rx);
            let received = match rx.as_deref_mut() {
                Some(rx) => match rx.failed.take() {
                    Some(e) => Poll::Ready(Err(e)),
                    None => match rx.stream.as_mut() {
                        Some(stream) => {
                            shared.rx_wake.polling();
                            let mut rcx = Context::from_waker(&shared.rx_waker);
                            stream.poll_recv(&mut rcx, &mut rx.frames)
                        }
                        None => Poll::Pending,
                    },
                },
                None => Poll::Pending,
            };
            let mut st = shared.state();
            if let Some(mut rx) = rx {
                work += ingest(&mut st, &mut rx.frames, Feeder::Driver);
                if shared.rx_wake.release(rx) {
                    // A reader came while this task was reading: read once more for it.
                    progress = true;
                }
            }
            match received {
                Poll::Ready(Ok(())) => progress = true,
                Poll::Ready(Err(e)) => {
                    if let RecvError::Frame(fe) = e {
                        // Garbage from the peer: the session cannot be trusted; close it.
                        let err = Error::from(fe);
                        tracing::warn!(peer = %shared.remote_name, error = %err, "malformed frame; session closed");
                        st.kill(err);
                        shared.disconnect(&mut st);
                        return Poll::Ready(ConnEnd::SessionDead);
                    }
                    st.dispatch();
                    shared.disconnect(&mut st);
                    return Poll::Ready(ConnEnd::Lost(e.to_string()));
                }
                Poll::Pending => {}
            }
            if st.kill_connection {
                st.kill_connection = false;
                shared.disconnect(&mut st);
                return Poll::Ready(ConnEnd::Lost("connection dropped on request".into()));
            }

            // 2. Timers, then stage what the session has (written below, outside the lock).
            let now = Instant::now();
            if st.timer_at.is_some_and(|t| now >= t) {
                st.session.handle_timeout(now);
                st.timer_at = None;
            }
            // Written below, by this task with its own waker (registered for write readiness).
            let more = st.pump(now).more;
            st.dispatch();
            shared.tx.set_driver(cx.waker());

            if st.session.dead().is_some() {
                // Write what is staged (a Close frame), then close the connection.
                drop(st);
                if shared.tx.poll_close(cx).is_pending() {
                    return Poll::Pending;
                }
                shared.disconnect(&mut shared.state());
                return Poll::Ready(ConnEnd::SessionDead);
            }

            // 3. Arm the timer for the session's next deadline; while application tasks feed
            // the session (inline receive), check it every `WATCH_TICK` at least, so they need
            // not wake this task for each deadline they create.
            let next = st.session.poll_timeout();
            if st.watching(now) {
                let tick = now + WATCH_TICK;
                let want = next.map_or(tick, |n| n.min(tick));
                if st.timer_at.is_none_or(|t| t > want) {
                    st.timer_at = Some(want);
                    this.timer.as_mut().reset(want.into());
                }
            } else if next != st.timer_at {
                st.timer_at = next;
                if let Some(t) = next {
                    this.timer.as_mut().reset(t.into());
                }
            }
            let armed = st.timer_at.is_some();
            drop(st);
            match shared.tx.flush(cx) {
                // Another task is writing; it wakes this one when it is done.
                Poll::Ready(Ok(false)) => {}
                Poll::Ready(Ok(true)) => {
                    if more {
                        progress = true;
                        work += super::peer_state::SEND_BATCH;
                    }
                }
                Poll::Ready(Err(e)) => {
                    let mut st = shared.state();
                    st.dispatch();
                    shared.disconnect(&mut st);
                    return Poll::Ready(ConnEnd::Lost(e.to_string()));
                }
                Poll::Pending => {}
            }
            if armed && this.timer.as_mut().poll(cx).is_ready() {
                progress = true;
            }
            if !progress {
                return Poll::Pending;
            }
            if work >= POLL_BUDGET {
                // More to do, but let the tasks woken so far run first.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }
}
