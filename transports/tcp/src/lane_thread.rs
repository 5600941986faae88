//! The bulk lane on threads of its own: one thread writes the lane's socket and one reads it,
//! with blocking system calls, at a low scheduling priority.
//!
//! Why: on a fast link (loopback above all) moving bulk bytes is CPU work, the kernel's copies
//! in `write` and `read`. When that work runs on the async runtime's worker threads, each poll
//! that writes or reads a bulk batch holds a worker for tens of microseconds, and a coordination
//! message that arrives meanwhile waits for a worker to come free, then for the runtime to poll
//! its socket, then for its task's turn in the worker's queue. With both sides of a saturating
//! bulk stream on two cores, that put the coordination round trip's p99 at 12–18× its idle
//! value. A runtime has no priorities; the kernel's scheduler does. On threads of their own at a
//! lower priority ([`ThreadPriority`]) the bulk copies use the CPU the runtime leaves, and the
//! kernel preempts them when a worker wakes for a coordination frame.
//!
//! The threads move frames, not bytes: the writer takes whole queued [`OutFrame`]s (zero-copy,
//! as on the runtime) and writes them with the same vectored writes as [`TcpFrameSink`]; the
//! reader cuts frames out of its read buffer with [`TcpFrameStream`] and queues them for the
//! connection's `poll_recv`. Each direction is bounded: the writer holds at most the batch it
//! took (the session stops pushing bulk at its batch limit until the thread takes the next
//! one), and the reader stops reading (TCP's flow control then holds the peer) while
//! [`READ_QUEUE_LIMIT`] bytes of frames wait to be taken.
//!
//! The writer thread starts with the first bulk frame, so a connection that never sends bulk
//! costs one thread (the reader, blocked in `read`), not two.
//!
//! Both threads and both halves share one socket (one file descriptor, in blocking mode) through
//! an `Arc`: a shared reference is enough to read, write and shut it down, and a copy made with
//! `try_clone` would only add a descriptor to the same socket, sharing its `O_NONBLOCK` flag.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use agentfabric::frame::{Frame, OutFrame, HEADER_LEN};
use agentfabric::sync::{lock, wait};
use agentfabric::transport::{FrameSink, RecvError, ThreadPriority};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sink::TcpFrameSink;
use crate::stream::TcpFrameStream;
use crate::threads::spawn;

/// Most bytes of received frames the reader thread queues before it stops reading.
pub(crate) const READ_QUEUE_LIMIT: usize = 4 << 20;

/// Most bytes of frames the writer thread takes from the queue at a time (at least one frame).
/// What it took counts as handed to the network, like bytes in the socket's send buffer; the
/// rest still counts in `queued_bytes`, so the session's batch limit bounds the queue.
const TAKE_LIMIT: usize = 256 << 10;

/// Most bytes the writer thread hands to one system call. On loopback, and on kernels built
/// without full preemption, a write runs to its end on its core, delivery to the receiving
/// socket included: a 256 KiB write holds the core for about 100 µs, and a coordination task
/// woken on that core waits that long. Measured (`agentfabric bench --transport tcp --workload
/// mixed --threads 1`, 2 cores): `ratio_loaded_idle_p99` 1.85–2.23 with 256 KiB writes,
/// 1.85–1.95 with 64 KiB but less bulk (2.9–3.1 GB/s in the loaded phase), 1.87–2.0 with
/// 128 KiB (bulk 3.4 GB/s, as with 256 KiB). The gain is small and lies in the spread of the
/// runs, not in the loaded p99 itself (57–64 µs with 128 KiB against 58–63 µs with 256 KiB).
const WRITE_MAX: usize = 128 << 10;

fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

/// Keeps `slot` holding a waker that wakes `cx`'s task.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// Sets its flag when the thread's loop ends, however it ends (for the tests, which wait for
/// the threads' end).
#[cfg(test)]
struct Exit<'a>(&'a std::sync::atomic::AtomicBool);

#[cfg(test)]
impl Drop for Exit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A blocking socket seen as an always-ready tokio reader and writer, so that the thread can
/// drive [`TcpFrameStream`] and [`TcpFrameSink`] (with a no-op waker) and share their framing
/// and partial-write logic. The socket is shared with the lane's other direction and with the
/// half that owns the thread (which shuts it down to stop the thread).
struct Blocking(Arc<TcpStream>);

impl AsyncRead for Blocking {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // `recv` into the uninitialized spare space: `Read::read` would need it zeroed first,
        // a memset of the whole read buffer per call.
        let socket = socket2::SockRef::from(&*self.0);
        loop {
            // SAFETY: `recv` only writes into the slice, never de-initializes it.
            match socket.recv(unsafe { buf.unfilled_mut() }) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(n) => {
                    // SAFETY: `recv` initialized the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for Blocking {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready((&*self.0).write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready((&*self.0).write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.shutdown(Shutdown::Write))
    }
}

/// Polls a future-like step that never returns `Pending` (its I/O blocks instead).
fn run_blocking<T>(f: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> T {
    let mut cx = Context::from_waker(Waker::noop());
    match f(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("blocking I/O returned Pending"),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

#[derive(Default)]
struct WriterState {
    /// Frames handed over and not yet taken by the thread.
    queue: VecDeque<OutFrame>,
    /// A `poll_flush` or `poll_close` waiting for the thread.
    waiter: Option<Waker>,
    /// The thread waits for work.
    idle: bool,
    /// `poll_close` asked: write everything, then shut the direction down.
    close: bool,
    /// The direction is shut down (after `close`).
    closed: bool,
    /// The sink is gone: stop at once.
    dropped: bool,
    /// The write error that stopped the thread, as (kind, text): later calls report it.
    error: Option<(io::ErrorKind, String)>,
}

#[derive(Default)]
struct WriterShared {
    state: Mutex<WriterState>,
    work: Condvar,
    /// The thread has ended.
    #[cfg(test)]
    exited: std::sync::atomic::AtomicBool,
    /// Wire bytes in `WriterState::queue` (changed under the state's lock, read without it by
    /// `queued_bytes`).
    queued: AtomicUsize,
}

/// The bulk lane's sending half, written by a thread of its own (see the module docs).
pub(crate) struct ThreadSink {
    shared: Arc<WriterShared>,
    /// The lane's socket (blocking mode), kept to start the thread and to shut the direction
    /// down when the sink is dropped.
    socket: Arc<TcpStream>,
    started: bool,
    priority: ThreadPriority,
    /// Frames pushed since the last flush (handed over together, under one lock).
    pending: Vec<OutFrame>,
    pending_bytes: usize,
}

impl ThreadSink {
    /// Writes `socket`, which must be in blocking mode (the thread blocks in `write`; a
    /// non-blocking socket would fail it with `WouldBlock`).
    pub(crate) fn new(socket: Arc<TcpStream>, priority: ThreadPriority) -> ThreadSink {
        ThreadSink {
            shared: Arc::default(),
            socket,
            started: false,
            priority,
            pending: Vec::new(),
            pending_bytes: 0,
        }
    }

    /// No thread runs and no frame waits for one: flushing has nothing to do, and closing only
    /// shuts the direction down (a connection that never sends bulk never starts the thread).
    fn needs_no_thread(&self) -> bool {
        !self.started && self.pending.is_empty()
    }

    fn start(&mut self) -> io::Result<()> {
        if self.started {
            return Ok(());
        }
        let socket = self.socket.clone();
        let shared = self.shared.clone();
        spawn("af-tcp-bulk-tx", self.priority, move || {
            write_loop(socket, &shared)
        })?;
        self.started = true;
        Ok(())
    }

    /// Hands the pending frames to the thread and looks at its progress: `Ready` when it took
    /// everything handed over (with `close`: when it also shut the direction down).
    fn hand_over(&mut self, cx: &Context<'_>, close: bool) -> Poll<io::Result<()>> {
        // Refusals first: a direction closed before the thread started must not start one
        // just to fail its first write with a bare EPIPE.
        let mut st = lock(&self.shared.state);
        if let Some((kind, text)) = &st.error {
            return Poll::Ready(Err(io::Error::new(*kind, text.clone())));
        }
        if st.closed && !self.pending.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "frames pushed after the tcp bulk lane's sending side was closed",
            )));
        }
        if !self.started {
            // Not under the lock: the new thread takes it first thing. Until the frames below
            // are handed over it has no work, so no refusal can appear meanwhile.
            drop(st);
            if let Err(e) = self.start() {
                return Poll::Ready(Err(io::Error::new(
                    e.kind(),
                    format!("cannot start the tcp bulk lane's writer thread: {e}"),
                )));
            }
            st = lock(&self.shared.state);
        }
        if !self.pending.is_empty() {
            st.queue.extend(self.pending.drain(..));
            let bytes = std::mem::take(&mut self.pending_bytes);
            self.shared.queued.fetch_add(bytes, Ordering::Relaxed);
        }
        st.close |= close;
        let wake_thread = st.idle && (!st.queue.is_empty() || close);
        let done = st.queue.is_empty() && (!close || st.closed);
        if !done {
            register(&mut st.waiter, cx);
        }
        drop(st);
        if wake_thread {
            self.shared.work.notify_one();
        }
        if done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

impl FrameSink for ThreadSink {
    fn push(&mut self, frame: OutFrame) {
        self.pending_bytes += frame.wire_len();
        self.pending.push(frame);
    }

    fn queued_bytes(&self) -> usize {
        self.pending_bytes + self.shared.queued.load(Ordering::Relaxed)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.needs_no_thread() {
            return Poll::Ready(Ok(()));
        }
        self.hand_over(cx, false)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.needs_no_thread() {
            // Marked closed whatever `shutdown` says: the caller closed this side, so frames
            // pushed later are refused as after a close by the thread.
            lock(&self.shared.state).closed = true;
            return Poll::Ready(self.socket.shutdown(Shutdown::Write));
        }
        self.hand_over(cx, true)
    }
}

impl Drop for ThreadSink {
    fn drop(&mut self) {
        lock(&self.shared.state).dropped = true;
        self.shared.work.notify_one();
        // Unblocks a thread stuck in `write` to a peer that stopped reading, and tells the peer
        // this direction is over (as dropping a tokio write half does).
        let _ = self.socket.shutdown(Shutdown::Write);
    }
}

fn write_loop(socket: Arc<TcpStream>, shared: &WriterShared) {
    #[cfg(test)]
    let _exit = Exit(&shared.exited);
    let mut sink = TcpFrameSink::with_max_write(Blocking(socket), WRITE_MAX);
    loop {
        let (close, waiter) = {
            let mut st = lock(&shared.state);
            loop {
                if st.dropped {
                    return;
                }
                if !st.queue.is_empty() || st.close {
                    break;
                }
                st.idle = true;
                st = wait(&shared.work, st);
                st.idle = false;
            }
            // One batch at a time, so that what waits here is still counted as queued.
            let mut taken = 0;
            while taken < TAKE_LIMIT {
                let Some(f) = st.queue.pop_front() else { break };
                taken += f.wire_len();
                sink.push(f);
            }
            shared.queued.fetch_sub(taken, Ordering::Relaxed);
            let close = st.close && st.queue.is_empty();
            // A closing waiter waits for the shutdown below, not for this hand-over.
            (close, if close { None } else { st.waiter.take() })
        };
        // Taken: a waiting flush looks again (the session pushes the next batch while this one
        // is written).
        wake(waiter);
        let result = if close {
            run_blocking(|cx| sink.poll_close(cx))
        } else {
            run_blocking(|cx| sink.poll_flush(cx))
        };
        let mut st = lock(&shared.state);
        match result {
            Err(e) => {
                st.error = Some((e.kind(), format!("tcp bulk lane: {e}")));
            }
            Ok(()) if close => st.closed = true,
            Ok(()) => continue,
        }
        let w = st.waiter.take();
        drop(st);
        wake(w);
        return;
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

#[derive(Default)]
struct ReaderState {
    /// Frames received and not yet taken, oldest first.
    frames: VecDeque<Frame>,
    /// Wire bytes in `frames`.
    bytes: usize,
    /// How the lane ended (after the frames before it are taken).
    end: Option<RecvError>,
    /// The connection's `poll_recv` waiting for frames.
    waiter: Option<Waker>,
    /// The thread waits for room in the queue.
    full: bool,
    /// The stream is gone: stop.
    gone: bool,
}

#[derive(Default)]
struct ReaderShared {
    state: Mutex<ReaderState>,
    room: Condvar,
    /// The thread has ended.
    #[cfg(test)]
    exited: std::sync::atomic::AtomicBool,
}

/// The bulk lane's receiving half, read by a thread of its own (see the module docs).
pub(crate) struct ThreadStream {
    shared: Arc<ReaderShared>,
    /// Kept to shut the direction down (unblocking the thread's `read`) when dropped.
    socket: Arc<TcpStream>,
    /// The end was reported; every later call reports a clean end.
    ended: bool,
}

impl ThreadStream {
    /// Starts the reader thread on `socket`, which must be in blocking mode (the thread blocks
    /// in `read`; a non-blocking socket would fail it with `WouldBlock`).
    pub(crate) fn start(
        socket: Arc<TcpStream>,
        read_size: usize,
        priority: ThreadPriority,
    ) -> io::Result<ThreadStream> {
        let reader = socket.clone();
        let shared = Arc::new(ReaderShared::default());
        let s = shared.clone();
        spawn("af-tcp-bulk-rx", priority, move || {
            read_loop(TcpFrameStream::new(Blocking(reader), read_size), &s)
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start the tcp bulk lane's reader thread: {e}"),
            )
        })?;
        Ok(ThreadStream {
            shared,
            socket,
            ended: false,
        })
    }

    /// Same contract as [`TcpFrameStream::poll_step`]: `Ready(Ok(()))` with frames added to
    /// `out`, `Ready(Err(_))` at the lane's end, `Pending` with `cx` registered.
    pub(crate) fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        if self.ended {
            return Poll::Ready(Err(RecvError::Eof));
        }
        let mut st = lock(&self.shared.state);
        if !st.frames.is_empty() {
            out.extend(st.frames.drain(..));
            st.bytes = 0;
            let full = std::mem::take(&mut st.full);
            drop(st);
            if full {
                self.shared.room.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = st.end.take() {
            self.ended = true;
            return Poll::Ready(Err(e));
        }
        register(&mut st.waiter, cx);
        Poll::Pending
    }
}

impl Drop for ThreadStream {
    fn drop(&mut self) {
        lock(&self.shared.state).gone = true;
        self.shared.room.notify_one();
        // Unblocks the thread's `read` (it then returns 0 and the thread ends).
        let _ = self.socket.shutdown(Shutdown::Read);
    }
}

fn read_loop(mut stream: TcpFrameStream<Blocking>, shared: &ReaderShared) {
    #[cfg(test)]
    let _exit = Exit(&shared.exited);
    let mut out = Vec::new();
    loop {
        let step = run_blocking(|cx| stream.poll_step(cx, &mut out));
        if out.is_empty() && step.is_ok() {
            continue; // bytes read, no whole frame yet
        }
        let bytes: usize = out.iter().map(|f| HEADER_LEN + f.payload.len()).sum();
        let mut st = lock(&shared.state);
        st.frames.extend(out.drain(..));
        st.bytes += bytes;
        let stop = step.is_err();
        if let Err(e) = step {
            st.end = Some(e);
        }
        let w = st.waiter.take();
        drop(st);
        wake(w);
        if stop {
            return;
        }
        let mut st = lock(&shared.state);
        while st.bytes >= READ_QUEUE_LIMIT && !st.gone {
            st.full = true;
            st = wait(&shared.room, st);
        }
        if st.gone {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    use agentfabric::frame::{Header, Kind};
    use agentfabric::Class;
    use bytes::Bytes;

    use super::*;

    /// A connected pair of blocking sockets, the first shared as the lane halves take it.
    fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (Arc::new(a), b)
    }

    fn bulk_frame(seq: u64, len: usize) -> OutFrame {
        let mut h = Header::new(Kind::Data);
        h.class = Class::Bulk;
        h.seq = seq;
        h.len = len as u32;
        OutFrame {
            header: h.encode(),
            payload: Bytes::from(vec![seq as u8; len]),
        }
    }

    fn wait_for(what: &str, flag: &AtomicBool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !flag.load(Ordering::SeqCst) {
            assert!(Instant::now() < until, "{what} did not happen within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn frames_cross_both_threads_in_order_and_the_threads_end_with_their_halves() {
        let (a, mut b) = socket_pair();
        let mut sink = ThreadSink::new(a.clone(), ThreadPriority::Inherit);
        let mut stream = ThreadStream::start(a, 64 << 10, ThreadPriority::Inherit).unwrap();
        let (writer, reader) = (sink.shared.clone(), stream.shared.clone());

        // Sink → raw socket: exact bytes, in order.
        let frames: Vec<OutFrame> = (0..20)
            .map(|i| bulk_frame(i, 100_000 + i as usize))
            .collect();
        let expected: Vec<u8> = frames
            .iter()
            .flat_map(|f| f.header.iter().chain(f.payload.iter()).copied())
            .collect();
        for f in frames {
            sink.push(f);
        }
        let read_all = std::thread::spawn(move || {
            let mut got = vec![0u8; expected.len()];
            b.read_exact(&mut got).unwrap();
            assert!(got == expected, "bytes differ");
            b
        });
        std::future::poll_fn(|cx| sink.poll_flush(cx))
            .await
            .unwrap();
        let mut b = read_all.join().unwrap();

        // Raw socket → stream: whole frames, in order.
        for i in 0..20 {
            let f = bulk_frame(i, 70_000);
            b.write_all(&f.header).unwrap();
            b.write_all(&f.payload).unwrap();
        }
        let mut out = Vec::new();
        while out.len() < 20 {
            std::future::poll_fn(|cx| stream.poll_step(cx, &mut out))
                .await
                .unwrap();
        }
        for (i, f) in out.iter().enumerate() {
            assert_eq!(f.header.seq, i as u64);
            assert_eq!(f.payload.len(), 70_000);
        }

        // Closing the sink shuts the direction down: the peer reads a clean end.
        std::future::poll_fn(|cx| sink.poll_close(cx))
            .await
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(b.read_to_end(&mut rest).unwrap(), 0);
        wait_for("the writer thread's end after close", &writer.exited);
        sink.push(bulk_frame(99, 10));
        let late = std::future::poll_fn(|cx| sink.poll_flush(cx))
            .await
            .unwrap_err();
        assert_eq!(late.kind(), io::ErrorKind::BrokenPipe, "{late}");

        // Dropping the stream ends its reader thread, though the peer keeps the socket open.
        assert!(!reader.exited.load(Ordering::SeqCst));
        drop(stream);
        wait_for("the reader thread's end after drop", &reader.exited);
        drop(b);
    }

    #[tokio::test]
    async fn a_writer_blocked_on_a_peer_that_stopped_reading_ends_when_dropped() {
        let (a, b) = socket_pair();
        let mut sink = ThreadSink::new(a, ThreadPriority::Inherit);
        let writer = sink.shared.clone();
        // Far more than loopback socket buffers hold; the peer never reads.
        let block = bulk_frame(0, 1 << 20);
        for _ in 0..64 {
            sink.push(block.clone());
        }
        let flushed = tokio::time::timeout(
            Duration::from_millis(200),
            std::future::poll_fn(|cx| sink.poll_flush(cx)),
        )
        .await;
        assert!(
            flushed.is_err(),
            "64 MiB cannot all be handed over to a peer that does not read"
        );
        assert!(sink.queued_bytes() > 0);
        drop(sink);
        wait_for("the writer thread's end after drop", &writer.exited);
        drop(b);
    }

    #[tokio::test]
    async fn a_write_error_is_reported_by_later_flushes() {
        let (a, b) = socket_pair();
        let mut sink = ThreadSink::new(a, ThreadPriority::Inherit);
        drop(b);
        // The peer is gone: writing fails (reset or broken pipe) sooner or later.
        let until = Instant::now() + Duration::from_secs(10);
        let err = loop {
            sink.push(bulk_frame(0, 64 << 10));
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                std::future::poll_fn(|cx| sink.poll_flush(cx)),
            )
            .await;
            if let Ok(Err(e)) = r {
                break e;
            }
            assert!(Instant::now() < until, "no write error within 10 s");
        };
        assert!(err.to_string().contains("tcp bulk lane"), "{err}");
        let again = std::future::poll_fn(|cx| sink.poll_flush(cx))
            .await
            .unwrap_err();
        assert_eq!(again.kind(), err.kind());
    }

    #[tokio::test]
    async fn frames_pushed_after_a_close_before_any_bulk_are_refused() {
        let (a, mut b) = socket_pair();
        let mut sink = ThreadSink::new(a, ThreadPriority::Inherit);
        std::future::poll_fn(|cx| sink.poll_close(cx))
            .await
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(b.read_to_end(&mut rest).unwrap(), 0);
        sink.push(bulk_frame(0, 10));
        let late = std::future::poll_fn(|cx| sink.poll_flush(cx))
            .await
            .unwrap_err();
        assert_eq!(late.kind(), io::ErrorKind::BrokenPipe, "{late}");
        assert!(
            late.to_string().contains("sending side was closed"),
            "{late}"
        );
        assert!(!sink.started, "no writer thread for refused frames");
    }
}
