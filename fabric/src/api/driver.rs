//! The task that moves a session's frames over one transport connection.
//!
//! A hand-written future (no boxed future, no allocation per message): it drains what the
//! connection received into the session, fires the session's timers, pulls frames from the
//! session into the transport's send queue in batches, and flushes them with one vectored write
//! where the transport allows. It ends when the connection breaks, is replaced by a resumed one,
//! or the session dies.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::time::Sleep;

use super::shared::PeerShared;
use crate::error::Error;
use crate::frame::Frame;
use crate::transport::{Connection, FrameSink, FrameStream, RecvError};

/// Bytes pulled from the session before a flush. Small enough that a coordination frame queued
/// while a batch is written waits for little; large enough to amortise the system call.
const SEND_BATCH: usize = 256 << 10;

/// Why a connection's driver stopped.
pub(crate) enum ConnEnd {
    /// The session is dead (its error was dispatched to every waiter).
    SessionDead,
    /// The connection broke; the session waits for a new one.
    Lost(String),
    /// The peer resumed the session on a new connection, which replaces this one.
    Replaced(Connection),
}

pub(crate) struct ConnDriver<'a> {
    shared: Arc<PeerShared>,
    sink: Box<dyn FrameSink>,
    stream: Box<dyn FrameStream>,
    rx: Vec<Frame>,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    resume: Option<&'a mut mpsc::Receiver<Connection>>,
    closing: bool,
}

impl<'a> ConnDriver<'a> {
    pub(crate) fn new(
        shared: Arc<PeerShared>,
        conn: Connection,
        leftover: Vec<Frame>,
        resume: Option<&'a mut mpsc::Receiver<Connection>>,
    ) -> Self {
        ConnDriver {
            shared,
            sink: conn.sink,
            stream: conn.stream,
            rx: leftover,
            timer: Box::pin(tokio::time::sleep(std::time::Duration::from_secs(3600))),
            timer_at: None,
            resume,
            closing: false,
        }
    }

    /// Feeds received frames to the session. Returns an end if the session died.
    fn ingest(&mut self) -> bool {
        if self.rx.is_empty() {
            return false;
        }
        let mut st = self.shared.lock();
        let now = Instant::now();
        for f in self.rx.drain(..) {
            if st.session.handle_frame(now, f).is_err() {
                break;
            }
        }
        self.rx.clear();
        st.dispatch();
        true
    }
}

impl Future for ConnDriver<'_> {
    type Output = ConnEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ConnEnd> {
        let this = self.get_mut();
        loop {
            let mut progress = false;

            // A resumed connection replaces this one.
            if let Some(rx) = this.resume.as_deref_mut() {
                if let Poll::Ready(Some(conn)) = rx.poll_recv(cx) {
                    return Poll::Ready(ConnEnd::Replaced(conn));
                }
            }

            // 1. Receive everything that is ready.
            if !this.closing {
                match this.stream.poll_recv(cx, &mut this.rx) {
                    Poll::Ready(Ok(())) => {
                        this.ingest();
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => {
                        this.ingest();
                        if let RecvError::Frame(fe) = &e {
                            // Garbage from the peer: the session cannot be trusted; close it.
                            let mut st = this.shared.lock();
                            st.kill(Error::from(fe.clone()));
                            let err = Error::from(fe.clone());
                            tracing::warn!(peer = %this.shared.remote_name, error = %err, "malformed frame; session closed");
                            return Poll::Ready(ConnEnd::SessionDead);
                        }
                        return Poll::Ready(ConnEnd::Lost(e.to_string()));
                    }
                    Poll::Pending => {}
                }
            }

            // 2. Timers, then pull frames to send.
            let (dead, next_timeout, hit_limit) = {
                let mut st = this.shared.lock();
                let now = Instant::now();
                if st.kill_connection {
                    st.kill_connection = false;
                    return Poll::Ready(ConnEnd::Lost("connection dropped on request".into()));
                }
                if this.timer_at.is_some_and(|t| now >= t) {
                    st.session.handle_timeout(now);
                    this.timer_at = None;
                }
                while this.sink.queued_bytes() < SEND_BATCH {
                    match st.session.poll_transmit(now) {
                        Some(f) => this.sink.push(f),
                        None => break,
                    }
                }
                st.dispatch();
                if !st.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.driver = Some(cx.waker().clone());
                }
                (
                    st.session.dead().is_some(),
                    st.session.poll_timeout(),
                    this.sink.queued_bytes() >= SEND_BATCH,
                )
            };

            // 3. Write. If the batch limit was hit and the write finished, pull more.
            match this.sink.poll_flush(cx) {
                Poll::Ready(Ok(())) => progress |= hit_limit,
                Poll::Ready(Err(e)) => return Poll::Ready(ConnEnd::Lost(e.to_string())),
                Poll::Pending => {}
            }

            if dead {
                // Flush what is queued (a Close frame), then close the connection.
                this.closing = true;
                if this.sink.queued_bytes() > 0 {
                    match this.sink.poll_flush(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(_) => {}
                    }
                }
                return match this.sink.poll_close(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => Poll::Ready(ConnEnd::SessionDead),
                };
            }

            // 4. Arm the timer for the session's next deadline.
            if next_timeout != this.timer_at {
                this.timer_at = next_timeout;
                if let Some(t) = next_timeout {
                    this.timer.as_mut().reset(t.into());
                }
            }
            if this.timer_at.is_some() && this.timer.as_mut().poll(cx).is_ready() {
                progress = true;
            }

            if !progress {
                return Poll::Pending;
            }
        }
    }
}
