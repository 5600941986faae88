//! One socket's sending framer: a queue of frames written with vectored writes (small writes
//! joined into one buffer), with exact partial-write accounting. It knows nothing of lanes: the
//! dispatcher (`lanes.rs`) gives each lane one, written from the runtime or by the lane's thread
//! (`lane_thread.rs`), both above this file.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use agentfabric::frame::{OutFrame, HEADER_LEN};
use agentfabric::transport::FrameSink;
use tokio::io::AsyncWrite;

/// Most slices handed to one vectored write (two per frame: header, then payload when it is not
/// empty). 64 slices cover 32 frames per system call and cost 1 KiB of stack; Linux accepts up
/// to 1024 (`IOV_MAX`).
pub const MAX_IOVECS: usize = 64;

/// Queue capacity allocated up front, so a typical burst causes no queue growth.
const INITIAL_QUEUE: usize = 256;

/// Writes of at most this many bytes in more than one slice are copied into one buffer and
/// handed to a plain `send`. On Linux a `writev` costs more than a `send` outside TCP itself
/// (the slice array is copied in and checked, the file layer is crossed): measured on the
/// pingpong bench, about 0.25 µs more per small write, where copying a frame of coordination
/// size costs a few nanoseconds. Larger writes stay vectored, as their copy would cost more.
pub(crate) const COALESCE_MAX: usize = 2 << 10;

/// The sending half of one TCP connection, i.e. of one lane (generic over the writer for tests).
pub(crate) struct TcpFrameSink<W> {
    pub(crate) io: W,
    /// Frames not yet completely written, oldest first.
    pub(crate) queue: VecDeque<OutFrame>,
    /// Bytes of the front frame (header, then payload) already written.
    front_written: usize,
    /// Bytes in `queue` not yet written: exactly what `queued_bytes` reports.
    queued: usize,
    /// Most bytes handed to one write call.
    max_write: usize,
    /// The write direction has been shut down.
    closed: bool,
    /// Where a small write's slices are joined (see [`COALESCE_MAX`]).
    joined: Vec<u8>,
}

impl<W> TcpFrameSink<W> {
    pub(crate) fn new(io: W) -> Self {
        TcpFrameSink {
            io,
            queue: VecDeque::with_capacity(INITIAL_QUEUE),
            front_written: 0,
            queued: 0,
            max_write: usize::MAX,
            closed: false,
            joined: Vec::new(),
        }
    }

    /// As [`TcpFrameSink::new`], handing at most `max_write` bytes to one write call.
    pub(crate) fn with_max_write(io: W, max_write: usize) -> Self {
        TcpFrameSink {
            max_write: max_write.max(1),
            ..TcpFrameSink::new(io)
        }
    }

    /// Accounts for `n` bytes taken by the kernel: drops the frames written completely and
    /// remembers how far into the new front frame the write got.
    fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.queued, "wrote more than was queued");
        self.queued -= n;
        while n > 0 {
            let front = self
                .queue
                .front()
                .expect("bytes written beyond the queued frames")
                .wire_len();
            let rest = front - self.front_written;
            if n < rest {
                self.front_written += n;
                return;
            }
            n -= rest;
            self.queue.pop_front();
            self.front_written = 0;
        }
    }
}

/// Fills `slices` with what remains to be written, starting `front_written` bytes into the
/// front frame, `max_bytes` at most; returns how many slices were filled. Empty slices are
/// never produced.
fn fill_slices<'a>(
    queue: &'a VecDeque<OutFrame>,
    front_written: usize,
    max_bytes: usize,
    slices: &mut [IoSlice<'a>; MAX_IOVECS],
) -> usize {
    let mut n = 0;
    let mut room = max_bytes;
    let mut skip = front_written;
    for frame in queue {
        for (part, part_skip) in [
            (&frame.header[..], skip),
            (&frame.payload[..], skip.saturating_sub(HEADER_LEN)),
        ] {
            if part_skip >= part.len() {
                continue;
            }
            let rest = &part[part_skip..];
            let take = rest.len().min(room);
            slices[n] = IoSlice::new(&rest[..take]);
            n += 1;
            room -= take;
            if n == MAX_IOVECS || room == 0 {
                return n;
            }
        }
        skip = 0;
    }
    n
}

impl<W: AsyncWrite + Unpin + Send> FrameSink for TcpFrameSink<W> {
    fn push(&mut self, frame: OutFrame) {
        self.queued += frame.wire_len();
        self.queue.push_back(frame);
    }

    fn queued_bytes(&self) -> usize {
        self.queued
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed && !self.queue.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "frames pushed after the tcp connection's sending side was closed",
            )));
        }
        while !self.queue.is_empty() {
            let written = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let count =
                    fill_slices(&self.queue, self.front_written, self.max_write, &mut slices);
                let slices = &slices[..count];
                let io = Pin::new(&mut self.io);
                let bytes: usize = slices.iter().map(|s| s.len()).sum();
                if count == 1 {
                    ready!(io.poll_write(cx, &slices[0]))?
                } else if bytes <= COALESCE_MAX {
                    self.joined.clear();
                    for s in slices {
                        self.joined.extend_from_slice(s);
                    }
                    ready!(io.poll_write(cx, &self.joined))?
                } else {
                    ready!(io.poll_write_vectored(cx, slices))?
                }
            };
            if written == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "tcp connection accepted no more bytes",
                )));
            }
            self.advance(written);
        }
        // A no-op for a TCP stream (it has no user-space buffer); kept for other writers.
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush(cx))?;
        if !self.closed {
            ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
            self.closed = true;
        }
        Poll::Ready(Ok(()))
    }
}
