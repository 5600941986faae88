//! One QUIC connection as a fabric [`Connection`]: a sink that routes frames to a stream per
//! ordered flow ([`OrderKey`]), and a stream that reads every incoming QUIC stream.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::pin;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use agentfabric::frame::{cut_frames, Frame, OrderKey, OutFrame};
use agentfabric::sync::lock;
use agentfabric::transport::{Connection, FrameSink, FrameStream, RecvError};
use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};

use crate::config::SCHEME;

/// Frames with a payload up to this size are copied with their header into one buffer (one
/// allocation, one chunk for quinn); larger payloads are handed over as they are.
const COALESCE_MAX: usize = 1024;
/// Most bytes taken from a QUIC stream per read.
const READ_MAX: usize = 256 << 10;

/// Application close codes.
const CODE_CLOSED: u32 = 0;
const CODE_DROPPED: u32 = 1;

/// QUIC send priorities (higher is sent first): the control stream above every flow.
const PRIO_CONTROL: i32 = 8;
/// The QUIC priority of a flow of `urgency` (0 most urgent).
fn urgency_priority(urgency: u8) -> i32 {
    OrderKey::URGENCY_LEVELS as i32 - i32::from(urgency)
}

/// Closes the QUIC connection when both halves are gone: at once if it was not closed
/// gracefully (like a network failure), else after the peer closed it or `linger` passed.
struct Guard {
    conn: quinn::Connection,
    graceful: AtomicBool,
    linger: Duration,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.graceful.load(Ordering::Acquire) {
            self.conn
                .close(VarInt::from_u32(CODE_DROPPED), b"connection dropped");
            return;
        }
        let conn = self.conn.clone();
        let linger = self.linger;
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    let _ = tokio::time::timeout(linger, conn.closed()).await;
                    conn.close(VarInt::from_u32(CODE_CLOSED), b"closed");
                });
            }
            Err(_) => conn.close(VarInt::from_u32(CODE_CLOSED), b"closed"),
        }
    }
}

/// Wraps an established QUIC connection: opens the control stream, starts the stream acceptor.
pub(crate) async fn into_connection(
    conn: quinn::Connection,
    linger: Duration,
) -> io::Result<Connection> {
    let remote = format!("{}://{}", SCHEME, conn.remote_address());
    let control = conn.open_uni().await.map_err(|e| connection_error(&e))?;
    let _ = control.set_priority(PRIO_CONTROL);
    // One shared stream per urgency for flows beyond the peer's stream limit.
    let mut shared = Vec::with_capacity(OrderKey::URGENCY_LEVELS);
    for urgency in 0..OrderKey::URGENCY_LEVELS as u8 {
        let s = conn.open_uni().await.map_err(|e| connection_error(&e))?;
        let _ = s.set_priority(urgency_priority(urgency));
        shared.push(Lane::new(Some(s)));
    }
    let guard = Arc::new(Guard {
        conn: conn.clone(),
        graceful: AtomicBool::new(false),
        linger,
    });
    let accept_conn = conn.clone();
    Ok(Connection {
        sink: Box::new(QuicFrameSink {
            conn,
            control: Lane::new(Some(control)),
            shared,
            lanes: HashMap::new(),
            dirty: VecDeque::new(),
            queued: 0,
            closed: false,
            _guard: guard.clone(),
        }),
        stream: Box::new(QuicFrameStream::new(accept_conn, guard)),
        remote,
    })
}

// ---------------------------------------------------------------------------------------------
// Sending

struct Lane {
    /// `None`: the flow's frames ride its urgency's shared stream (no stream of its own could
    /// be opened within the peer's limit).
    stream: Option<SendStream>,
    queue: VecDeque<Bytes>,
    dirty: bool,
}

impl Lane {
    fn new(stream: Option<SendStream>) -> Lane {
        Lane {
            stream,
            queue: VecDeque::new(),
            dirty: false,
        }
    }
}

struct QuicFrameSink {
    conn: quinn::Connection,
    control: Lane,
    /// Per urgency: the stream shared by flows beyond the stream limit.
    shared: Vec<Lane>,
    /// Flow key → its stream and the frames not yet taken by quinn.
    lanes: HashMap<u32, Lane>,
    /// Flows whose queue is not empty, in the order they became so.
    dirty: VecDeque<u32>,
    queued: usize,
    closed: bool,
    _guard: Arc<Guard>,
}

fn encode(frame: OutFrame, out: &mut VecDeque<Bytes>) {
    if frame.payload.len() <= COALESCE_MAX {
        let mut b = BytesMut::with_capacity(frame.wire_len());
        b.extend_from_slice(&frame.header);
        b.extend_from_slice(&frame.payload);
        out.push_back(b.freeze());
    } else {
        out.push_back(Bytes::copy_from_slice(&frame.header));
        out.push_back(frame.payload);
    }
}

fn write_error(e: WriteError) -> io::Error {
    match e {
        WriteError::ConnectionLost(c) => connection_error(&c),
        WriteError::Stopped(code) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("quic stream stopped by the peer (code {code})"),
        ),
        other => io::Error::new(io::ErrorKind::BrokenPipe, format!("quic stream: {other}")),
    }
}

/// Hands the lane's queued chunks to quinn. `Ready(Ok)` once the queue is empty.
fn write_lane(lane: &mut Lane, queued: &mut usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let Some(stream) = lane.stream.as_mut() else {
        return Poll::Ready(Ok(()));
    };
    while !lane.queue.is_empty() {
        let bufs = lane.queue.make_contiguous();
        let written = {
            let fut = pin!(stream.write_chunks(bufs));
            match fut.poll(cx) {
                Poll::Ready(r) => r.map_err(write_error)?,
                Poll::Pending => return Poll::Pending,
            }
        };
        *queued -= written.bytes;
        for _ in 0..written.chunks {
            lane.queue.pop_front();
        }
        if written.bytes == 0 && written.chunks == 0 {
            return Poll::Pending;
        }
    }
    Poll::Ready(Ok(()))
}

impl QuicFrameSink {
    fn open_stream(&self, urgency: u8) -> Option<SendStream> {
        // Opening a unidirectional stream is local (no round trip) while the peer's stream limit
        // allows; if it does not, the flow rides its urgency's shared stream instead of waiting.
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(self.conn.open_uni()).poll(&mut cx) {
            Poll::Ready(Ok(s)) => {
                let _ = s.set_priority(urgency_priority(urgency));
                Some(s)
            }
            _ => None,
        }
    }
}

impl FrameSink for QuicFrameSink {
    fn push(&mut self, frame: OutFrame) {
        self.queued += frame.wire_len();
        let Some(OrderKey { key, urgency }) = frame.order_key() else {
            encode(frame, &mut self.control.queue);
            return;
        };
        if !self.lanes.contains_key(&key) {
            let stream = self.open_stream(urgency);
            self.lanes.insert(key, Lane::new(stream));
        }
        let lane = self.lanes.get_mut(&key).expect("inserted above");
        if lane.stream.is_none() {
            let shared = &mut self.shared[usize::from(urgency).min(OrderKey::URGENCY_LEVELS - 1)];
            encode(frame, &mut shared.queue);
            return;
        }
        encode(frame, &mut lane.queue);
        if !lane.dirty {
            lane.dirty = true;
            self.dirty.push_back(key);
        }
    }

    fn queued_bytes(&self) -> usize {
        self.queued
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed && self.queued > 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "frames pushed after the quic connection's sending side was closed",
            )));
        }
        let mut pending = write_lane(&mut self.control, &mut self.queued, cx)?.is_pending();
        for lane in &mut self.shared {
            pending |= write_lane(lane, &mut self.queued, cx)?.is_pending();
        }
        // A stream blocked by flow control stays dirty without holding back the others.
        for _ in 0..self.dirty.len() {
            let Some(ch) = self.dirty.pop_front() else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&ch) else {
                continue;
            };
            match write_lane(lane, &mut self.queued, cx)? {
                Poll::Ready(()) => lane.dirty = false,
                Poll::Pending => {
                    pending = true;
                    self.dirty.push_back(ch);
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closed {
            if self.poll_flush(cx)?.is_pending() {
                return Poll::Pending;
            }
            for lane in self.lanes.values_mut().chain(&mut self.shared) {
                if let Some(s) = lane.stream.as_mut() {
                    let _ = s.finish();
                }
            }
            if let Some(s) = self.control.stream.as_mut() {
                let _ = s.finish();
            }
            self._guard.graceful.store(true, Ordering::Release);
            self.closed = true;
        }
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// Receives from every stream the peer opened, polled directly from the session's driver (no
/// task per stream, no queue between them): each stream has a waker that marks it ready, so a
/// poll touches only the streams that have data.
struct QuicFrameStream {
    conn: quinn::Connection,
    /// Waits for the next stream the peer opens (boxed once per accepted stream).
    accept: Option<AcceptFuture>,
    /// The acceptor's own waker: it queues [`ACCEPT`] as ready, so the acceptor (which locks
    /// quinn's connection state) is polled only when it may have a stream, not on every call.
    accept_waker: Waker,
    accept_flag: Arc<StreamWake>,
    streams: Vec<Option<StreamRx>>,
    ready: Arc<Ready>,
    /// An error to report once the frames before it are delivered.
    pending_err: Option<RecvError>,
    /// The ready list's spare buffer (see `poll_recv`).
    scratch: Vec<usize>,
    _guard: Arc<Guard>,
}

struct StreamRx {
    recv: RecvStream,
    buf: BytesMut,
    control: bool,
    waker: Waker,
    flag: Arc<StreamWake>,
}

#[derive(Default)]
struct Ready {
    queue: Mutex<Vec<usize>>,
    driver: Mutex<Option<Waker>>,
}

struct StreamWake {
    idx: usize,
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl std::task::Wake for StreamWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.ready.queue).push(self.idx);
        }
        if let Some(w) = lock(&self.ready.driver).as_ref() {
            w.wake_by_ref();
        }
    }
}

type AcceptFuture = Pin<Box<dyn Future<Output = Result<RecvStream, ConnectionError>> + Send>>;

fn accept_next(conn: &quinn::Connection) -> AcceptFuture {
    let conn = conn.clone();
    Box::pin(async move { conn.accept_uni().await })
}

/// The index the acceptor's waker queues in [`Ready::queue`].
const ACCEPT: usize = usize::MAX;

impl QuicFrameStream {
    fn new(conn: quinn::Connection, guard: Arc<Guard>) -> QuicFrameStream {
        let ready: Arc<Ready> = Arc::default();
        // Queued from the start: the first call polls the acceptor.
        lock(&ready.queue).push(ACCEPT);
        let accept_flag = Arc::new(StreamWake {
            idx: ACCEPT,
            queued: AtomicBool::new(true),
            ready: ready.clone(),
        });
        QuicFrameStream {
            accept: Some(accept_next(&conn)),
            accept_waker: Waker::from(accept_flag.clone()),
            accept_flag,
            conn,
            streams: Vec::new(),
            ready,
            pending_err: None,
            scratch: Vec::new(),
            _guard: guard,
        }
    }

    fn add(&mut self, recv: RecvStream) {
        let idx = self.streams.len();
        let flag = Arc::new(StreamWake {
            idx,
            queued: AtomicBool::new(true),
            ready: self.ready.clone(),
        });
        lock(&self.ready.queue).push(idx);
        self.streams.push(Some(StreamRx {
            // The first stream a side opens is its control stream.
            control: recv.id().index() == 0,
            recv,
            buf: BytesMut::new(),
            waker: Waker::from(flag.clone()),
            flag,
        }));
    }

    /// Takes every stream the peer opened so far (none is missed: the acceptor is polled until
    /// it is pending, which registers its waker).
    fn poll_accept(&mut self) {
        self.accept_flag.queued.store(false, Ordering::Release);
        let waker = self.accept_waker.clone();
        let mut cx = Context::from_waker(&waker);
        while let Some(acc) = self.accept.as_mut() {
            match acc.as_mut().poll(&mut cx) {
                Poll::Pending => break,
                Poll::Ready(Ok(recv)) => {
                    self.add(recv);
                    self.accept = Some(accept_next(&self.conn));
                }
                Poll::Ready(Err(e)) => {
                    // Deliver what the streams still hold first.
                    self.accept = None;
                    self.pending_err = Some(recv_error(&e));
                }
            }
        }
    }

    /// Reads what stream `idx` has; frames go to `out`. `Err` ends the connection's reading.
    fn poll_stream(&mut self, idx: usize, out: &mut Vec<Frame>) -> Result<(), RecvError> {
        let Some(Some(st)) = self.streams.get_mut(idx) else {
            return Ok(());
        };
        st.flag.queued.store(false, Ordering::Release);
        let mut cx = Context::from_waker(&st.waker);
        let mut taken = 0usize;
        loop {
            if taken >= READ_MAX {
                // Leave the rest for the next call, so one busy stream cannot starve the others.
                st.waker.wake_by_ref();
                return Ok(());
            }
            let r = match pin!(st.recv.read_chunk(READ_MAX, true)).poll(&mut cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(r) => r,
            };
            match r {
                Ok(Some(chunk)) => {
                    taken += chunk.bytes.len();
                    let mut bytes = chunk.bytes;
                    if st.buf.is_empty() {
                        // Whole frames straight out of quinn's buffer, without a copy; only a
                        // partial frame at the end is kept.
                        cut_frames(&mut bytes, |b, n| b.split_to(n), out)
                            .map_err(RecvError::Frame)?;
                    }
                    if !bytes.is_empty() {
                        st.buf.extend_from_slice(&bytes);
                        let need = cut_frames(&mut st.buf, |b, n| b.split_to(n).freeze(), out)
                            .map_err(RecvError::Frame)?;
                        st.buf.reserve(need.saturating_sub(st.buf.len()));
                    }
                }
                Ok(None) => {
                    let (control, left) = (st.control, st.buf.len());
                    self.streams[idx] = None;
                    if left > 0 {
                        return Err(RecvError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "quic stream ended in the middle of a frame ({left} bytes left)"
                            ),
                        )));
                    }
                    // The peer closed its control stream: it closed its side cleanly.
                    return if control { Err(RecvError::Eof) } else { Ok(()) };
                }
                Err(ReadError::ConnectionLost(e)) => return Err(recv_error(&e)),
                Err(e) => {
                    return Err(RecvError::Io(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("quic stream: {e}"),
                    )))
                }
            }
        }
    }
}

impl FrameStream for QuicFrameStream {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        let before = out.len();
        {
            let mut d = lock(&self.ready.driver);
            if !d.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *d = Some(cx.waker().clone());
            }
        }
        if self.pending_err.is_none() {
            // Swapped with a kept buffer, so taking the ready list allocates nothing.
            let mut ready = std::mem::take(&mut self.scratch);
            ready.clear();
            std::mem::swap(&mut *lock(&self.ready.queue), &mut ready);
            if ready.contains(&ACCEPT) {
                self.poll_accept();
                // The streams just accepted are queued as ready.
                ready.append(&mut lock(&self.ready.queue));
            }
            for &idx in &ready {
                if idx == ACCEPT {
                    continue;
                }
                if let Err(e) = self.poll_stream(idx, out) {
                    self.pending_err = Some(e);
                    break;
                }
            }
            self.scratch = ready;
        }
        if out.len() > before {
            return Poll::Ready(Ok(()));
        }
        match self.pending_err.take() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Pending,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

fn recv_error(e: &ConnectionError) -> RecvError {
    match e {
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CODE_CLOSED) => {
            RecvError::Eof
        }
        other => RecvError::Io(connection_error(other)),
    }
}

/// The hint for a certificate signed by another CA than the trusted one, from the side that
/// verified it. rustls says `UnknownIssuer` (alert "unknown ca") when no trusted CA has the
/// certificate's issuer name, and `BadSignature` (alert "decrypt error") when one has that name
/// but did not sign it: two CAs of the same name, as every development CA had before they were
/// given names of their own.
const OTHER_CA_HERE: &str = "the peer's certificate is signed by a different CA than the one \
     this node trusts (issue every node's certificate from one CA and give every node \
     that CA's ca.pem; `agentfabric certs dev` on the directory that holds ca.pem and ca.key \
     issues more certificates from it)";
/// The same, from the side whose certificate was refused.
const OTHER_CA_THERE: &str = "this node's certificate is signed by a different CA than the one \
     the peer trusts (issue every node's certificate from one CA and give every node \
     that CA's ca.pem; `agentfabric certs dev` on the directory that holds ca.pem and ca.key \
     issues more certificates from it)";

/// Readable name of a TLS alert, and after it a hint about its usual cause (`": …"`, or empty):
/// when the peer sent it about us (`from_peer`), or when we refused the peer's certificate for
/// `reason` (rustls's words).
fn alert_text(alert: u8, from_peer: bool, reason: &str) -> (String, String) {
    use rustls::AlertDescription as A;
    let d = A::from(alert);
    let hint = if !from_peer {
        let other_ca = ["UnknownIssuer", "BadSignature"]
            .iter()
            .any(|r| reason.contains(r));
        if other_ca {
            OTHER_CA_HERE
        } else {
            ""
        }
    } else {
        match d {
            A::CertificateRequired => {
                "the peer requires a client certificate and we presented none"
            }
            A::UnknownCA | A::DecryptError => OTHER_CA_THERE,
            A::CertificateExpired => "our certificate is expired (or not yet valid)",
            A::BadCertificate => "the peer could not verify our certificate",
            A::NoApplicationProtocol => {
                "no ALPN protocol in common (the peer speaks another fabric protocol version)"
            }
            A::CertificateUnknown => "the peer did not accept our certificate",
            _ => "",
        }
    };
    // "CertificateRequired" → "certificate required"
    let name = format!("{d:?}");
    let mut words = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if c.is_uppercase() && prev_lower {
            words.push(' ');
        }
        prev_lower = c.is_lowercase();
        words.push(c.to_ascii_lowercase());
    }
    let hint = if hint.is_empty() {
        String::new()
    } else {
        format!(": {hint}")
    };
    (format!("TLS alert {alert} ({words})"), hint)
}

/// A QUIC connection error in words: for TLS failures, rustls's reason (when we refused the
/// peer) or the alert the peer sent (when it refused us), with the usual cause.
pub fn describe_connection_error(e: &ConnectionError) -> String {
    match e {
        ConnectionError::TransportError(t) => {
            let code = u64::from(t.code);
            if (0x100..0x200).contains(&code) {
                let (alert, hint) = alert_text((code - 0x100) as u8, false, &t.reason);
                format!("TLS handshake failed: {} ({alert}){hint}", t.reason)
            } else {
                format!("QUIC protocol error: {t}")
            }
        }
        ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            let reason = String::from_utf8_lossy(&c.reason);
            let reason = if reason.is_empty() {
                String::new()
            } else {
                format!(" [{reason}]")
            };
            if (0x100..0x200).contains(&code) {
                let (alert, hint) = alert_text((code - 0x100) as u8, true, "");
                format!("the peer refused the TLS handshake: {alert}{hint}{reason}")
            } else {
                format!("aborted by the peer's QUIC stack: {c}")
            }
        }
        ConnectionError::ApplicationClosed(c) => format!("closed by the peer: {c}"),
        ConnectionError::TimedOut => "the QUIC connection timed out (peer silent)".into(),
        other => format!("quic: {other}"),
    }
}

/// A QUIC connection error as an [`io::Error`] of a fitting kind, with
/// [`describe_connection_error`]'s text.
pub(crate) fn connection_error(e: &ConnectionError) -> io::Error {
    let kind = match e {
        ConnectionError::TransportError(_) | ConnectionError::ConnectionClosed(_) => {
            io::ErrorKind::ConnectionRefused
        }
        ConnectionError::TimedOut => io::ErrorKind::TimedOut,
        ConnectionError::Reset => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, describe_connection_error(e))
}
