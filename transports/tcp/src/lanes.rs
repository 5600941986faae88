//! The lane dispatchers: a fabric connection's sending half puts each frame on its lane's
//! socket, and its receiving half steps both lanes' sockets in turn (see the
//! [crate docs](crate#lanes) for why coordination and bulk take separate TCP connections).
//!
//! Each lane is one socket's framer ([`TcpFrameSink`], [`TcpFrameStream`]) driven from the
//! async runtime, or the same framer driven by a thread of the lane's own ([`ThreadSink`],
//! [`ThreadStream`], for the bulk lane with [`crate::config::BulkLaneIo::Threads`]).

use std::io;
use std::task::{Context, Poll};

use agentfabric::frame::{Frame, Lane, OutFrame};
use agentfabric::transport::{FrameSink, FrameStream, RecvError};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::lane_thread::{ThreadSink, ThreadStream};
use crate::sink::TcpFrameSink;
use crate::stream::TcpFrameStream;

// ---------------------------------------------------------------------------------------------
// Sending

/// One lane's sending half: written from the async runtime, or by a thread of its own
/// ([`crate::config::BulkLaneIo`]).
pub(crate) enum LaneSink<W> {
    /// Written by whichever task flushes the connection.
    Runtime(TcpFrameSink<W>),
    /// Written by the lane's own thread.
    Thread(ThreadSink),
}

impl<W: AsyncWrite + Unpin + Send> LaneSink<W> {
    fn get(&mut self) -> &mut dyn FrameSink {
        match self {
            LaneSink::Runtime(s) => s,
            LaneSink::Thread(s) => s,
        }
    }

    fn queued(&self) -> usize {
        match self {
            LaneSink::Runtime(s) => s.queued_bytes(),
            LaneSink::Thread(s) => s.queued_bytes(),
        }
    }
}

/// The sending half of a fabric connection: one sink per lane, each with its own queue and
/// partial-write state, so bulk bytes waiting for lane 1's socket never hold back a frame of
/// lane 0.
pub(crate) struct LanedSink<W> {
    pub(crate) lanes: [LaneSink<W>; Lane::COUNT],
}

impl<W> LanedSink<W> {
    /// `writers[i]` carries lane `i` ([`Lane::Latency`] = 0, [`Lane::Bulk`] = 1), both written
    /// from the runtime.
    pub(crate) fn new(writers: [W; Lane::COUNT]) -> Self {
        LanedSink {
            lanes: writers.map(|w| LaneSink::Runtime(TcpFrameSink::new(w))),
        }
    }

    /// The latency lane written from the runtime, the bulk lane by its own thread.
    pub(crate) fn with_bulk_thread(latency: W, bulk: ThreadSink) -> Self {
        LanedSink {
            lanes: [
                LaneSink::Runtime(TcpFrameSink::new(latency)),
                LaneSink::Thread(bulk),
            ],
        }
    }
}

/// Combines the results of the lanes: the first error wins; ready when every lane is.
fn both(a: Poll<io::Result<()>>, b: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
    match (a, b) {
        (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
        (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
        _ => Poll::Pending,
    }
}

impl<W: AsyncWrite + Unpin + Send> FrameSink for LanedSink<W> {
    fn push(&mut self, frame: OutFrame) {
        let lane = frame.lane() as usize;
        self.lanes[lane].get().push(frame);
    }

    fn queued_bytes(&self) -> usize {
        self.lanes.iter().map(LaneSink::queued).sum()
    }

    fn queued_bytes_in(&self, lane: Lane) -> usize {
        self.lanes[lane as usize].queued()
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Both lanes are polled every time (latency first), so each registers its waker when
        // its socket is full, and a blocked bulk lane never stops the latency lane's writes.
        let [latency, bulk] = &mut self.lanes;
        let a = latency.get().poll_flush(cx);
        both(a, bulk.get().poll_flush(cx))
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let [latency, bulk] = &mut self.lanes;
        let a = latency.get().poll_close(cx);
        both(a, bulk.get().poll_close(cx))
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// One lane's receiving half: read from the async runtime, or by a thread of its own
/// ([`crate::config::BulkLaneIo`]).
pub(crate) enum LaneStream<R> {
    /// Read by whichever task polls the connection.
    Runtime(TcpFrameStream<R>),
    /// Read by the lane's own thread.
    Thread(ThreadStream),
}

impl<R: AsyncRead + Unpin> LaneStream<R> {
    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        match self {
            LaneStream::Runtime(s) => s.poll_step(cx, out),
            LaneStream::Thread(s) => s.poll_step(cx, out),
        }
    }
}

/// The receiving half of a fabric connection: one [`LaneStream`] per lane, a [`TcpFrameStream`]
/// read from the runtime or (the bulk lane, [`crate::config::BulkLaneIo::Threads`]) a
/// [`ThreadStream`] whose thread reads it.
///
/// Every call steps both lanes in turn, latency lane first, at most one read per lane read from
/// the runtime per turn (a threaded lane's step only takes the frames its thread queued), so
/// frames of lane 0 are never held back by a large bulk frame being read on lane 1, and appear
/// first in `out`.
pub(crate) struct LanedStream<R> {
    pub(crate) lanes: [LaneStream<R>; Lane::COUNT],
    /// Lanes that reached a clean end of stream (no partial frame left).
    ended: [bool; Lane::COUNT],
    /// An error met after frames of this call were already added to `out`: reported next.
    error: Option<RecvError>,
}

impl<R> LanedStream<R> {
    /// `readers[i]` carries lane `i` ([`Lane::Latency`] = 0, [`Lane::Bulk`] = 1).
    pub(crate) fn new(readers: [R; Lane::COUNT], read_size: usize) -> Self {
        LanedStream::of(readers.map(|r| LaneStream::Runtime(TcpFrameStream::new(r, read_size))))
    }

    /// The latency lane read from the runtime, the bulk lane by its own thread.
    pub(crate) fn with_bulk_thread(latency: R, bulk: ThreadStream, read_size: usize) -> Self {
        LanedStream::of([
            LaneStream::Runtime(TcpFrameStream::new(latency, read_size)),
            LaneStream::Thread(bulk),
        ])
    }

    fn of(lanes: [LaneStream<R>; Lane::COUNT]) -> Self {
        LanedStream {
            lanes,
            ended: [false; Lane::COUNT],
            error: None,
        }
    }
}

impl<R: AsyncRead + Unpin + Send> FrameStream for LanedStream<R> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Err(e));
        }
        let before = out.len();
        loop {
            if self.ended.iter().all(|&e| e) {
                // Both directions closed cleanly, with no partial frame on either.
                if out.len() > before {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(RecvError::Eof));
            }
            let mut progress = false;
            for (lane, ended) in self.lanes.iter_mut().zip(self.ended.iter_mut()) {
                if *ended {
                    continue;
                }
                match lane.poll_step(cx, out) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(())) => progress = true,
                    // A clean end of one lane: the peer is closing. Its other lane may still
                    // hold frames sent before the close; they are delivered, and the
                    // connection ends when that lane ends too.
                    Poll::Ready(Err(RecvError::Eof)) => *ended = true,
                    // Anything else (I/O error, a lane closed mid-frame, a malformed frame)
                    // breaks the whole connection at once.
                    Poll::Ready(Err(e)) => {
                        if out.len() > before {
                            self.error = Some(e);
                            return Poll::Ready(Ok(()));
                        }
                        return Poll::Ready(Err(e));
                    }
                }
            }
            if out.len() > before {
                return Poll::Ready(Ok(()));
            }
            if !progress && !self.ended.iter().all(|&e| e) {
                return Poll::Pending;
            }
        }
    }
}
