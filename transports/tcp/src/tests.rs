//! Tests: loopback sockets and in-memory readers/writers only, each bounded in time.

use std::collections::{HashSet, VecDeque};
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use agentfabric::class::Class;
use agentfabric::frame::{
    Frame, FrameError, Header, Kind, Lane, OutFrame, HEADER_LEN, MAX_FRAME_PAYLOAD,
};
use agentfabric::transport::{Connection, FrameSink, FrameStream, RecvError, Transport};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::lanes::{LaneSink, LanedSink, LanedStream};
use crate::listener::TcpFrameListener;
use crate::preamble::{Preamble, PreambleError};
use crate::sink::{TcpFrameSink, COALESCE_MAX};
use crate::stream::TcpFrameStream;

use super::*;

const LIMIT: Duration = Duration::from_secs(30);

/// Runs `fut` with a time limit, so a bug fails the test instead of hanging it.
async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test took too long")
}

/// Deterministic payload bytes for frame `seq`.
fn pattern(seq: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| {
            (seq as usize)
                .wrapping_mul(31)
                .wrapping_add(i.wrapping_mul(7)) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn data_frame(seq: u64, len: usize) -> OutFrame {
    let mut h = Header::new(Kind::Data);
    h.seq = seq;
    h.channel = (seq % 5) as u32;
    h.len = len as u32;
    OutFrame {
        header: h.encode(),
        payload: pattern(seq, len),
    }
}

/// A data frame of a bulk channel (lane 1): `payload` is shared, not copied.
fn bulk_frame(seq: u64, payload: &Bytes) -> OutFrame {
    let mut h = Header::new(Kind::Data);
    h.seq = seq;
    h.class = Class::Bulk;
    h.channel = 100;
    h.len = payload.len() as u32;
    OutFrame {
        header: h.encode(),
        payload: payload.clone(),
    }
}

fn check_frame(f: &Frame, seq: u64, len: usize) {
    assert_eq!(f.header.kind, Kind::Data);
    assert_eq!(f.header.seq, seq, "frames out of order");
    assert_eq!(f.header.len as usize, len);
    assert_eq!(f.payload.len(), len);
    assert!(
        f.payload == pattern(seq, len),
        "payload of frame {seq} differs"
    );
}

/// The wire bytes of `frames`, back to back.
fn wire(frames: &[OutFrame]) -> Vec<u8> {
    let mut v = Vec::new();
    for f in frames {
        v.extend_from_slice(&f.header);
        v.extend_from_slice(&f.payload);
    }
    v
}

/// Payload sizes: mostly small (including empty), with a maximal frame every 400.
fn sizes(n: u64) -> Vec<usize> {
    (0..n)
        .map(|i| {
            if i % 400 == 399 {
                MAX_FRAME_PAYLOAD
            } else {
                (i as usize * 37) % 300
            }
        })
        .collect()
}

async fn flush(sink: &mut dyn FrameSink) -> io::Result<()> {
    poll_fn(|cx| sink.poll_flush(cx)).await
}

async fn close(sink: &mut dyn FrameSink) -> io::Result<()> {
    poll_fn(|cx| sink.poll_close(cx)).await
}

async fn recv(stream: &mut dyn FrameStream, out: &mut Vec<Frame>) -> Result<(), RecvError> {
    poll_fn(|cx| stream.poll_recv(cx, out)).await
}

/// Receives frames until `n` have arrived.
async fn recv_n(stream: &mut dyn FrameStream, n: usize) -> Vec<Frame> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        recv(stream, &mut out).await.expect("recv failed");
    }
    assert_eq!(out.len(), n, "more frames than sent");
    out
}

/// A connected pair over loopback: (connecting side, accepting side).
async fn pair(config: TcpConfig) -> (Connection, Connection) {
    let t = TcpTransport::with_config(config);
    let mut listener = t.listen("127.0.0.1:0").await.unwrap();
    let url = listener.local_addr();
    let addr = url.strip_prefix("tcp://").unwrap().to_owned();
    let (a, b) = tokio::join!(t.connect(&addr), listener.accept());
    (a.unwrap(), b.unwrap())
}

/// The `host:port` a listener listens on.
fn addr_of(listener: &dyn Listener) -> String {
    let url = listener.local_addr();
    url.strip_prefix("tcp://").unwrap().to_owned()
}

/// A raw socket that has sent the preamble of `lane` of connection `id`.
async fn raw_lane(addr: &str, id: u64, lane: u8) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&Preamble { lane, id }.encode()).await.unwrap();
    s
}

/// Raw loopback sockets (all lanes, preambles sent) talking to a fabric connection:
/// ([lane 0, lane 1, one-sided lane] raw side, fabric side).
async fn raw_pair() -> ([TcpStream; LANES], Connection) {
    let t = TcpTransport::new();
    let mut listener = t.listen("127.0.0.1:0").await.unwrap();
    let addr = addr_of(listener.as_ref());
    let (l0, l1, l2, conn) = tokio::join!(
        raw_lane(&addr, 42, 0),
        raw_lane(&addr, 42, 1),
        raw_lane(&addr, 42, 2),
        listener.accept()
    );
    ([l0, l1, l2], conn.unwrap())
}

/// True once the peer has closed `s` (EOF or reset); false if it is still open after `wait`.
async fn closed_by_peer(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 64];
    match tokio::time::timeout(wait, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("listener sent {n} bytes"),
        Err(_) => false,
    }
}

#[tokio::test]
async fn scheme_reliability_and_listen_address() {
    bounded(async {
        let t = TcpTransport::new();
        assert_eq!(t.scheme(), "tcp");
        assert!(t.reliable());
        assert_eq!(t.config(), &TcpConfig::default());
        assert!(t.config().nodelay);
        let listener = t.listen("127.0.0.1:0").await.unwrap();
        let url = listener.local_addr();
        let port: u16 = url
            .strip_prefix("tcp://127.0.0.1:")
            .unwrap_or_else(|| panic!("unexpected local address {url}"))
            .parse()
            .unwrap();
        assert_ne!(port, 0);
        // The full URL is accepted too, and the remote names are URLs.
        let (a, b) = tokio::join!(t.connect(&url), async {
            let mut l = listener;
            l.accept().await
        });
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.remote, url);
        assert!(b.remote.starts_with("tcp://127.0.0.1:"), "{}", b.remote);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_round_trip_in_order_small_and_large() {
    bounded(async {
        let (mut a, mut b) = pair(TcpConfig::default()).await;
        let sizes = sizes(2000);
        let total: usize = sizes.iter().map(|s| HEADER_LEN + s).sum();
        let sender_sizes = sizes.clone();
        let sender = tokio::spawn(async move {
            // Push in bursts of varying length, flushing after each, as a session would.
            let mut seq = 0usize;
            let mut burst = 1;
            while seq < sender_sizes.len() {
                let end = (seq + burst).min(sender_sizes.len());
                for (i, &len) in sender_sizes.iter().enumerate().take(end).skip(seq) {
                    a.sink.push(data_frame(i as u64, len));
                }
                flush(a.sink.as_mut()).await.unwrap();
                assert_eq!(a.sink.queued_bytes(), 0);
                seq = end;
                burst = burst % 97 + 1;
            }
            a
        });
        let frames = recv_n(b.stream.as_mut(), sizes.len()).await;
        for (i, f) in frames.iter().enumerate() {
            check_frame(f, i as u64, sizes[i]);
        }
        let received: usize = frames.iter().map(|f| HEADER_LEN + f.payload.len()).sum();
        assert_eq!(received, total);

        // And the other direction, on the same connection.
        let mut a = sender.await.unwrap();
        for i in 0..10u64 {
            b.sink
                .push(data_frame(i, if i == 5 { MAX_FRAME_PAYLOAD } else { 10 }));
        }
        let (flushed, frames) = tokio::join!(flush(b.sink.as_mut()), recv_n(a.stream.as_mut(), 10));
        flushed.unwrap();
        for (i, f) in frames.iter().enumerate() {
            check_frame(f, i as u64, if i == 5 { MAX_FRAME_PAYLOAD } else { 10 });
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_socket_buffers_force_partial_writes() {
    bounded(async {
        let config = TcpConfig {
            send_buffer_size: Some(4096),
            recv_buffer_size: Some(4096),
            read_buffer_size: 1, // raised to MIN_READ_BUFFER_SIZE
            ..TcpConfig::default()
        };
        let (mut a, mut b) = pair(config).await;
        let sizes: Vec<usize> = (0..300u64)
            .map(|i| match i % 50 {
                7 => MAX_FRAME_PAYLOAD,
                13 => 100_003,
                _ => (i as usize * 131) % 5000,
            })
            .collect();
        let frames: Vec<OutFrame> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| data_frame(i as u64, len))
            .collect();
        let expected = wire(&frames);
        // queued_bytes values that fall on frame boundaries.
        let mut boundaries = std::collections::HashSet::new();
        let mut rest = expected.len();
        boundaries.insert(rest);
        for f in &frames {
            rest -= f.wire_len();
            boundaries.insert(rest);
        }
        for f in frames {
            a.sink.push(f);
        }
        assert_eq!(a.sink.queued_bytes(), expected.len());

        let sender = tokio::spawn(async move {
            // Poll by hand to watch queued_bytes between writes.
            let mut mid_frame = 0usize;
            let mut pending = 0usize;
            let mut last = a.sink.queued_bytes();
            poll_fn(|cx| {
                let r = a.sink.poll_flush(cx);
                if r.is_pending() {
                    pending += 1;
                    let q = a.sink.queued_bytes();
                    assert!(q <= last, "queued_bytes grew");
                    last = q;
                    if !boundaries.contains(&q) {
                        mid_frame += 1;
                    }
                }
                r
            })
            .await
            .unwrap();
            assert_eq!(a.sink.queued_bytes(), 0);
            (a, pending, mid_frame)
        });

        // A slow reader, so the sender keeps hitting a full socket buffer.
        let mut out = Vec::new();
        let mut got = Vec::with_capacity(expected.len());
        while out.len() < sizes.len() {
            tokio::time::sleep(Duration::from_micros(200)).await;
            let from = out.len();
            recv(b.stream.as_mut(), &mut out).await.unwrap();
            for f in &out[from..] {
                got.extend_from_slice(&f.header.encode());
                got.extend_from_slice(&f.payload);
            }
        }
        assert!(got == expected, "received bytes differ from the bytes sent");
        for (i, f) in out.iter().enumerate() {
            check_frame(f, i as u64, sizes[i]);
        }
        let (_a, pending, mid_frame) = sender.await.unwrap();
        assert!(pending > 0, "the socket buffer never filled");
        assert!(mid_frame > 0, "no write stopped in the middle of a frame");
    })
    .await
}

/// A writer that takes at most a scripted number of bytes per call, and is sometimes not ready.
struct StingyWriter {
    written: Vec<u8>,
    limits: Vec<usize>,
    calls: usize,
    max_slices_seen: usize,
    /// Most bytes offered to one call.
    max_offered: usize,
    /// Calls that offered one contiguous buffer (`poll_write`), and the bytes they offered.
    plain_calls: usize,
    plain_bytes: usize,
}

impl StingyWriter {
    /// Takes `limits[i % len]` bytes at the `i`-th call.
    fn new(limits: Vec<usize>) -> Self {
        StingyWriter {
            written: Vec::new(),
            limits,
            calls: 0,
            max_slices_seen: 0,
            max_offered: 0,
            plain_calls: 0,
            plain_bytes: 0,
        }
    }

    fn take(&mut self, bufs: &[IoSlice<'_>]) -> usize {
        self.max_slices_seen = self.max_slices_seen.max(bufs.len());
        let offered: usize = bufs.iter().map(|b| b.len()).sum();
        self.max_offered = self.max_offered.max(offered);
        assert!(
            bufs.iter().all(|b| !b.is_empty()),
            "empty slice handed to writev"
        );
        let mut budget = self.limits[self.calls % self.limits.len()];
        self.calls += 1;
        let mut n = 0;
        for b in bufs {
            let k = budget.min(b.len());
            self.written.extend_from_slice(&b[..k]);
            n += k;
            budget -= k;
            if budget == 0 {
                break;
            }
        }
        n
    }
}

impl AsyncWrite for StingyWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.plain_calls += 1;
        self.plain_bytes += buf.len();
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.calls % 3 == 2 {
            self.calls += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(self.take(bufs)))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn sink_handles_every_kind_of_partial_write_exactly() {
    bounded(async {
        let frames: Vec<OutFrame> = (0..500u64)
            .map(|i| data_frame(i, [0, 1, 63, 64, 65, 200, 3000][i as usize % 7]))
            .collect();
        let expected = wire(&frames);
        let mut sink = TcpFrameSink::new(StingyWriter::new(vec![
            1, 3, 63, 64, 65, 127, 128, 129, 500, 4096, 7, 100_000,
        ]));
        for f in frames {
            sink.push(f);
        }
        assert_eq!(sink.queued_bytes(), expected.len());
        let mut pending = 0;
        poll_fn(|cx| {
            let r = sink.poll_flush(cx);
            if r.is_pending() {
                pending += 1;
                // queued_bytes is exact at every step.
                assert_eq!(sink.queued_bytes(), expected.len() - sink.io.written.len());
            }
            r
        })
        .await
        .unwrap();
        assert_eq!(sink.queued_bytes(), 0);
        assert!(sink.queue.is_empty());
        assert!(sink.io.written == expected, "bytes written differ");
        assert_eq!(sink.io.max_slices_seen, MAX_IOVECS);
        assert!(pending > 0);
        // Nothing queued: flushing again is immediately ready and writes nothing.
        let calls = sink.io.calls;
        poll_fn(|cx| sink.poll_flush(cx)).await.unwrap();
        assert_eq!(sink.io.calls, calls);
    })
    .await
}

/// Pushes `frames` into `sink`, flushes it and checks that exactly their bytes were written.
async fn push_and_flush(
    mut sink: TcpFrameSink<StingyWriter>,
    frames: Vec<OutFrame>,
) -> TcpFrameSink<StingyWriter> {
    let expected = wire(&frames);
    for f in frames {
        sink.push(f);
    }
    poll_fn(|cx| sink.poll_flush(cx)).await.unwrap();
    assert!(sink.io.written == expected, "bytes written differ");
    sink
}

#[tokio::test]
async fn a_sink_with_a_write_cap_offers_no_more_per_call_and_writes_everything_exactly() {
    bounded(async {
        // Frames larger than the cap, smaller ones, and empty payloads.
        let frames: Vec<OutFrame> = (0..200u64)
            .map(|i| data_frame(i, [0, 5, 1000, 70_000, 200_000][i as usize % 5]))
            .collect();
        const CAP: usize = 64 << 10;
        let writer = StingyWriter::new(vec![usize::MAX, 9, 40_000]);
        let sink = push_and_flush(TcpFrameSink::with_max_write(writer, CAP), frames).await;
        assert_eq!(
            sink.io.max_offered, CAP,
            "a write was offered more than the cap"
        );
        assert_eq!(sink.queued_bytes(), 0);
    })
    .await
}

#[tokio::test]
async fn small_writes_go_out_as_one_plain_buffer_and_large_ones_vectored() {
    bounded(async {
        // Twelve coordination-sized frames: one plain write of all of them, joined in order.
        let small: Vec<OutFrame> = (0..12u64).map(|i| data_frame(i, 64)).collect();
        let bytes = wire(&small).len();
        assert!(bytes <= COALESCE_MAX);
        let sink = push_and_flush(
            TcpFrameSink::new(StingyWriter::new(vec![usize::MAX])),
            small,
        )
        .await;
        assert_eq!((sink.io.calls, sink.io.plain_calls), (1, 1));
        assert_eq!(sink.io.plain_bytes, bytes);

        // Frames too large to copy go out vectored, as they are.
        let large: Vec<OutFrame> = (0..4u64).map(|i| data_frame(i, 3000)).collect();
        let sink = push_and_flush(
            TcpFrameSink::new(StingyWriter::new(vec![usize::MAX])),
            large,
        )
        .await;
        assert_eq!((sink.io.calls, sink.io.plain_calls), (1, 0));
        assert_eq!(sink.io.max_slices_seen, 8);
    })
    .await
}

/// A reader that returns scripted chunks (or less, if the buffer is smaller), then EOF.
struct ChunkedReader {
    chunks: VecDeque<Vec<u8>>,
}

impl ChunkedReader {
    fn new(data: &[u8], chunk_sizes: &[usize]) -> Self {
        let mut chunks = VecDeque::new();
        let mut at = 0;
        let mut i = 0;
        while at < data.len() {
            let n = chunk_sizes[i % chunk_sizes.len()].min(data.len() - at);
            chunks.push_back(data[at..at + n].to_vec());
            at += n;
            i += 1;
        }
        ChunkedReader { chunks }
    }
}

impl AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(chunk) = self.chunks.front_mut() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn stream_reassembles_frames_split_anywhere_and_batches() {
    bounded(async {
        let sizes: Vec<usize> = (0..200).map(|i| [0, 1, 64, 1000, 70_000][i % 5]).collect();
        let frames: Vec<OutFrame> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| data_frame(i as u64, len))
            .collect();
        let bytes = wire(&frames);
        for chunking in [&[1usize][..], &[2, 61, 64, 65, 1], &[7919], &[usize::MAX]] {
            let mut stream = TcpFrameStream::new(ChunkedReader::new(&bytes, chunking), 4096);
            let mut out = Vec::new();
            let err = loop {
                match recv(&mut stream, &mut out).await {
                    Ok(()) => {}
                    Err(e) => break e,
                }
            };
            assert!(matches!(err, RecvError::Eof), "{err}");
            assert_eq!(out.len(), sizes.len());
            for (i, f) in out.iter().enumerate() {
                check_frame(f, i as u64, sizes[i]);
            }
        }

        // Everything the reader hands over in one read is delivered by one call.
        let small: Vec<OutFrame> = (0..200u64)
            .map(|i| data_frame(i, i as usize % 500))
            .collect();
        let bytes = wire(&small);
        let reader = ChunkedReader::new(&bytes, &[usize::MAX]);
        let mut stream = TcpFrameStream::new(reader, TcpConfig::default().read_size());
        let mut out = Vec::new();
        recv(&mut stream, &mut out).await.unwrap();
        assert_eq!(out.len(), small.len(), "not delivered in one batch");
        for (i, f) in out.iter().enumerate() {
            check_frame(f, i as u64, i % 500);
        }
    })
    .await
}

#[tokio::test]
async fn frames_before_a_bad_frame_are_delivered_first() {
    bounded(async {
        let mut bytes = wire(&[data_frame(0, 10), data_frame(1, 20)]);
        bytes.extend_from_slice(&[0u8; 100]);
        let mut stream = TcpFrameStream::new(ChunkedReader::new(&bytes, &[usize::MAX]), 4096);
        let mut out = Vec::new();
        recv(&mut stream, &mut out).await.unwrap();
        assert_eq!(out.len(), 2);
        check_frame(&out[1], 1, 20);
        let err = recv(&mut stream, &mut out).await.unwrap_err();
        assert!(
            matches!(err, RecvError::Frame(FrameError::BadMagic([0, 0]))),
            "{err}"
        );
        // The error is sticky: the stream cannot be trusted further.
        let err = recv(&mut stream, &mut out).await.unwrap_err();
        assert!(
            matches!(err, RecvError::Frame(FrameError::BadMagic(_))),
            "{err}"
        );
        assert_eq!(out.len(), 2);
    })
    .await
}

#[tokio::test]
async fn garbage_bytes_give_bad_magic() {
    bounded(async {
        let ([mut raw, _l1, _l2], mut conn) = raw_pair().await;
        // Another protocol: refused from its first two bytes, without waiting for a header.
        raw.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut out = Vec::new();
        let err = recv(conn.stream.as_mut(), &mut out).await.unwrap_err();
        assert!(
            matches!(err, RecvError::Frame(FrameError::BadMagic(m)) if m == *b"GE"),
            "{err}"
        );
        assert!(out.is_empty());

        // A right magic with a wrong header later on is refused too.
        let ([mut raw, _l1, _l2], mut conn) = raw_pair().await;
        let mut bad = data_frame(0, 0).header;
        bad[2] = 99; // version
        raw.write_all(&bad).await.unwrap();
        let err = recv(conn.stream.as_mut(), &mut out).await.unwrap_err();
        assert!(
            matches!(err, RecvError::Frame(FrameError::UnsupportedVersion(99))),
            "{err}"
        );

        // Garbage on the bulk lane breaks the connection just the same.
        let ([_l0, mut raw, _l2], mut conn) = raw_pair().await;
        raw.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
        let err = recv(conn.stream.as_mut(), &mut out).await.unwrap_err();
        assert!(
            matches!(err, RecvError::Frame(FrameError::BadMagic(m)) if m == *b"SS"),
            "{err}"
        );
    })
    .await
}

#[tokio::test]
async fn truncated_frame_then_close_is_unexpected_eof() {
    bounded(async {
        // A frame announcing 100 payload bytes, of which 10 arrive, then lane 0 closes (lane 1
        // stays open: a lane cut in the middle of a frame ends the connection at once).
        let ([mut raw, _l1, _l2], mut conn) = raw_pair().await;
        let f = data_frame(0, 100);
        raw.write_all(&f.header).await.unwrap();
        raw.write_all(&f.payload[..10]).await.unwrap();
        raw.shutdown().await.unwrap();
        let mut out = Vec::new();
        let err = recv(conn.stream.as_mut(), &mut out).await.unwrap_err();
        match &err {
            RecvError::Io(e) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                assert!(e.to_string().contains("74 of 164 bytes"), "{e}");
            }
            other => panic!("expected UnexpectedEof, got {other}"),
        }
        assert!(out.is_empty());

        // Half a header, on the bulk lane this time.
        let ([l0, mut raw, _l2], mut conn) = raw_pair().await;
        raw.write_all(&f.header[..30]).await.unwrap();
        drop(raw);
        drop(l0);
        let err = recv(conn.stream.as_mut(), &mut out).await.unwrap_err();
        assert!(
            matches!(&err, RecvError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof
                && e.to_string().contains("30 of 64")),
            "{err}"
        );
    })
    .await
}

#[tokio::test]
async fn close_delivers_everything_then_eof() {
    bounded(async {
        let (mut a, mut b) = pair(TcpConfig::default()).await;
        for i in 0..50 {
            a.sink.push(data_frame(i, 1000));
        }
        let (closed, frames) = tokio::join!(close(a.sink.as_mut()), recv_n(b.stream.as_mut(), 50));
        closed.unwrap();
        assert_eq!(a.sink.queued_bytes(), 0);
        for (i, f) in frames.iter().enumerate() {
            check_frame(f, i as u64, 1000);
        }
        let mut out = Vec::new();
        let err = recv(b.stream.as_mut(), &mut out).await.unwrap_err();
        assert!(matches!(err, RecvError::Eof), "{err}");
        // Closing twice is harmless; pushing after closing is an error, not a silent loss.
        close(a.sink.as_mut()).await.unwrap();
        a.sink.push(data_frame(50, 1));
        let err = flush(a.sink.as_mut()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    })
    .await
}

#[tokio::test]
async fn four_gib_frame_header_is_refused_without_allocating() {
    bounded(async {
        let t = TcpTransport::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (raw, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let mut raw = raw.unwrap();
        // The stream type itself, to look at its buffer afterwards.
        let (read, _write) = accepted.unwrap().0.into_split();
        let read_size = t.config().read_size();
        let mut stream = TcpFrameStream::new(read, read_size);
        let mut h = Header::new(Kind::Data);
        h.len = u32::MAX;
        raw.write_all(&h.encode()).await.unwrap();
        let mut out = Vec::new();
        let err = recv(&mut stream, &mut out).await.unwrap_err();
        assert!(
            matches!(err, RecvError::Frame(FrameError::PayloadTooLarge { len, max })
                if len == u64::from(u32::MAX) && max == MAX_FRAME_PAYLOAD),
            "{err}"
        );
        assert!(
            stream.buf.capacity() <= read_size,
            "buffer grew to {} bytes",
            stream.buf.capacity()
        );
    })
    .await
}

#[tokio::test]
async fn connect_to_closed_port_fails_clearly() {
    bounded(async {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let err = TcpTransport::new().connect(&addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
    })
    .await
}

#[tokio::test]
async fn bad_address_text_is_invalid_input() {
    bounded(async {
        let t = TcpTransport::new();
        for bad in [
            "",
            "localhost",
            "127.0.0.1",
            ":7000",
            "127.0.0.1:notaport",
            "127.0.0.1:70000",
            "::1:7000",
            "host name:7000",
            "quic://127.0.0.1:7000",
        ] {
            let err = t.connect(bad).await.unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidInput,
                "connect {bad:?}: {err}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
            let err = t.listen(bad).await.err().expect("listen should fail");
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidInput,
                "listen {bad:?}: {err}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        // Port 0 is fine to listen on, not to connect to.
        let err = t.connect("127.0.0.1:0").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    })
    .await
}

#[tokio::test]
async fn connect_by_host_name_and_ipv6_literal() {
    bounded(async {
        let t = TcpTransport::new();
        let mut listener = t.listen("localhost:0").await.unwrap();
        let url = listener.local_addr();
        let port = url.rsplit_once(':').unwrap().1.to_owned();
        // `localhost` may resolve to ::1 and 127.0.0.1; the listener bound the first of them.
        let by_name = format!("localhost:{port}");
        let (a, b) = tokio::join!(t.connect(&by_name), listener.accept());
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        a.sink.push(data_frame(1, 3));
        flush(a.sink.as_mut()).await.unwrap();
        check_frame(&recv_n(b.stream.as_mut(), 1).await[0], 1, 3);

        // IPv6 loopback, where the machine has it.
        if let Ok(mut l6) = t.listen("[::1]:0").await {
            let url = l6.local_addr();
            assert!(url.starts_with("tcp://[::1]:"), "{url}");
            let (a, b) = tokio::join!(t.connect(&url), l6.accept());
            a.unwrap();
            b.unwrap();
        }
    })
    .await
}

#[test]
fn preamble_round_trips_and_refuses_bad_bytes() {
    for lane in 0..LANES as u8 {
        let p = Preamble {
            lane,
            id: 0x0123_4567_89ab_cdef,
        };
        let b = p.encode();
        assert_eq!(b.len(), PREAMBLE_LEN);
        assert_eq!(&b[..4], b"AFTL");
        assert_eq!(Preamble::decode(&b), Ok(p));
    }
    let good = Preamble { lane: 1, id: 7 }.encode();
    let with = |i: usize, v: u8| {
        let mut b = good;
        b[i] = v;
        Preamble::decode(&b)
    };
    assert_eq!(with(0, b'G'), Err(PreambleError::BadMagic(*b"GFTL")));
    assert_eq!(with(4, 9), Err(PreambleError::UnsupportedVersion(9)));
    // Version 1 had no one-sided lane.
    assert_eq!(with(4, 1), Err(PreambleError::UnsupportedVersion(1)));
    assert_eq!(with(5, 3), Err(PreambleError::BadLane(3)));
    assert_eq!(with(6, 1), Err(PreambleError::LaneCount(1)));
    assert_eq!(with(7, 1), Err(PreambleError::Reserved(1)));
    // Connection ids differ from one connection to the next.
    let ids: HashSet<u64> = (0..1000).map(|_| preamble::random_u64()).collect();
    assert_eq!(ids.len(), 1000);
}

#[tokio::test]
async fn push_routes_bulk_data_to_lane_1_and_everything_else_to_lane_0() {
    bounded(async {
        let block = pattern(9, 5000);
        let mut latency = Vec::new();
        let mut bulk = Vec::new();
        let mut all = Vec::new();
        for i in 0..300u64 {
            let f = match i % 6 {
                0 | 3 => bulk_frame(i, &block),
                1 => data_frame(i, (i as usize * 13) % 700), // coordination data
                2 => {
                    let mut f = data_frame(i, 40);
                    let mut h = Header::decode(&f.header).unwrap();
                    h.class = Class::ToolCall;
                    f.header = h.encode();
                    f
                }
                4 => {
                    // An ack of a bulk channel: not bulk *data*, so it takes the latency lane.
                    let mut h = Header::new(Kind::Ack);
                    h.class = Class::Bulk;
                    h.seq = i;
                    OutFrame {
                        header: h.encode(),
                        payload: Bytes::new(),
                    }
                }
                _ => {
                    let mut h = Header::new(Kind::Ping);
                    h.seq = i;
                    OutFrame {
                        header: h.encode(),
                        payload: Bytes::new(),
                    }
                }
            };
            if f.lane() == Lane::Bulk {
                assert!(i % 6 == 0 || i % 6 == 3);
                bulk.push(f.clone());
            } else {
                latency.push(f.clone());
            }
            all.push(f);
        }
        let (latency, bulk) = (wire(&latency), wire(&bulk));
        let mut sink =
            LanedSink::new([StingyWriter::new(vec![1000]), StingyWriter::new(vec![777])]);
        for f in all {
            sink.push(f);
        }
        assert_eq!(sink.queued_bytes(), latency.len() + bulk.len());
        flush(&mut sink).await.unwrap();
        assert_eq!(sink.queued_bytes(), 0);
        let written = |lane: &LaneSink<StingyWriter>| match lane {
            LaneSink::Runtime(s) => s.io.written.clone(),
            LaneSink::Thread(_) => unreachable!("test sinks are written from the runtime"),
        };
        assert!(written(&sink.lanes[0]) == latency, "lane 0 bytes differ");
        assert!(written(&sink.lanes[1]) == bulk, "lane 1 bytes differ");
        close(&mut sink).await.unwrap();
    })
    .await
}

/// A reader that passes reads through only while its gate is open.
struct Gated<R> {
    inner: R,
    gate: Arc<Mutex<(bool, Option<Waker>)>>,
}

fn gate(open: bool) -> Arc<Mutex<(bool, Option<Waker>)>> {
    Arc::new(Mutex::new((open, None)))
}

fn open_gate(gate: &Mutex<(bool, Option<Waker>)>) {
    let mut g = gate.lock().unwrap();
    g.0 = true;
    if let Some(w) = g.1.take() {
        w.wake();
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Gated<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        {
            let mut g = self.gate.lock().unwrap();
            if !g.0 {
                g.1 = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Two loopback TCP connections: (client ends, server ends).
async fn two_socket_pairs() -> ([TcpStream; 2], [TcpStream; 2]) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        clients.push(c.unwrap());
        servers.push(s.unwrap().0);
    }
    let [c0, c1]: [TcpStream; 2] = clients.try_into().unwrap();
    let [s0, s1]: [TcpStream; 2] = servers.try_into().unwrap();
    ([c0, c1], [s0, s1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_frames_pass_a_stalled_bulk_lane() {
    bounded(async {
        let ([c0, c1], [s0, s1]) = two_socket_pairs().await;
        let mut a = TcpTransport::new().wrap_streams(c0, c1).unwrap();
        // The receiver's bulk lane does not read at all until its gate opens.
        let bulk_gate = gate(false);
        let mut b = LanedStream::new(
            [
                Gated {
                    inner: s0,
                    gate: gate(true),
                },
                Gated {
                    inner: s1,
                    gate: bulk_gate.clone(),
                },
            ],
            TcpConfig::default().read_size(),
        );
        // 64 MiB of bulk first (far more than loopback socket buffers hold), then coordination.
        let block = pattern(1, MAX_FRAME_PAYLOAD);
        const BULK: u64 = 64;
        const SMALL: u64 = 100;
        for i in 0..BULK {
            a.sink.push(bulk_frame(i, &block));
        }
        for i in 0..SMALL {
            a.sink.push(data_frame(i, 100));
        }
        let sender = tokio::spawn(async move {
            flush(a.sink.as_mut()).await.unwrap();
            a
        });
        let frames = recv_n(&mut b, SMALL as usize).await;
        for (i, f) in frames.iter().enumerate() {
            check_frame(f, i as u64, 100);
        }
        // The bulk lane is still backed up on the sending side.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!sender.is_finished(), "the bulk lane did not back up");

        open_gate(&bulk_gate);
        let frames = recv_n(&mut b, BULK as usize).await;
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.header.class, Class::Bulk);
            assert_eq!(f.header.seq, i as u64, "bulk frames out of order");
            assert!(f.payload == block);
        }
        let mut a = sender.await.unwrap();
        assert_eq!(a.sink.queued_bytes(), 0);
        close(a.sink.as_mut()).await.unwrap();
        let mut out = Vec::new();
        let err = recv(&mut b, &mut out).await.unwrap_err();
        assert!(matches!(err, RecvError::Eof), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_lanes_round_trip_over_connect_and_accept() {
    bounded(async {
        mixed_round_trip(TcpConfig::default()).await;
        // With a small send buffer on the bulk lane only (many partial writes there).
        mixed_round_trip(TcpConfig {
            bulk_send_buffer_size: Some(16 << 10),
            ..TcpConfig::default()
        })
        .await;
        // The bulk lane on the runtime, and on threads at the other priorities.
        for bulk_lane_io in [
            BulkLaneIo::Runtime,
            BulkLaneIo::Threads(ThreadPriority::Idle),
            BulkLaneIo::Threads(ThreadPriority::Inherit),
        ] {
            mixed_round_trip(TcpConfig {
                bulk_lane_io,
                ..TcpConfig::default()
            })
            .await;
        }
    })
    .await
}

async fn mixed_round_trip(config: TcpConfig) {
    let (mut a, mut b) = pair(config).await;
    let block = pattern(3, 300_000);
    let n = 400u64;
    for i in 0..n {
        if i % 4 == 0 {
            a.sink.push(bulk_frame(i, &block));
        } else {
            a.sink.push(data_frame(i, (i as usize * 7) % 2000));
        }
    }
    let (flushed, frames) = tokio::join!(
        flush(a.sink.as_mut()),
        recv_n(b.stream.as_mut(), n as usize)
    );
    flushed.unwrap();
    // Each lane in order; together, every frame exactly once.
    let (mut last_bulk, mut last_small) = (None, None);
    let mut seen = HashSet::new();
    for f in &frames {
        let i = f.header.seq;
        assert!(seen.insert(i), "frame {i} twice");
        if f.header.class == Class::Bulk {
            assert!(last_bulk < Some(i), "bulk lane out of order");
            last_bulk = Some(i);
            assert!(f.payload == block);
        } else {
            assert!(last_small < Some(i), "latency lane out of order");
            last_small = Some(i);
            check_frame(f, i, (i as usize * 7) % 2000);
        }
    }
    assert_eq!(seen.len(), n as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_of_concurrent_clients_are_paired_by_id() {
    bounded(async {
        let t = TcpTransport::new();
        let mut listener = t.listen("127.0.0.1:0").await.unwrap();
        let addr = addr_of(listener.as_ref());
        const CLIENTS: u64 = 12;
        let mut clients = Vec::new();
        for i in 0..CLIENTS {
            let t = t.clone();
            let addr = addr.clone();
            clients.push(tokio::spawn(async move {
                let mut c = t.connect(&addr).await.unwrap();
                // The client's number on both lanes.
                c.sink.push(data_frame(i, 10));
                c.sink.push(bulk_frame(i, &Bytes::from_static(b"bulk")));
                flush(c.sink.as_mut()).await.unwrap();
                // Wait for the server's answer before closing.
                let reply = recv_n(c.stream.as_mut(), 1).await;
                assert_eq!(reply[0].header.seq, i);
            }));
        }
        let mut seen = HashSet::new();
        for _ in 0..CLIENTS {
            let mut conn = listener.accept().await.unwrap();
            let frames = recv_n(conn.stream.as_mut(), 2).await;
            let (small, bulk) = if frames[0].header.class == Class::Bulk {
                (&frames[1], &frames[0])
            } else {
                (&frames[0], &frames[1])
            };
            assert_eq!(bulk.header.class, Class::Bulk);
            assert_eq!(
                small.header.seq, bulk.header.seq,
                "lanes of different clients paired"
            );
            assert!(seen.insert(small.header.seq));
            conn.sink.push(data_frame(small.header.seq, 1));
            flush(conn.sink.as_mut()).await.unwrap();
        }
        for c in clients {
            c.await.unwrap();
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_silent_and_half_open_clients_do_not_block_accept() {
    bounded(async {
        // A long preamble timeout: a good client must get through well before it.
        let t = TcpTransport::with_config(TcpConfig {
            connect_timeout: Duration::from_secs(20),
            ..TcpConfig::default()
        });
        let mut listener = t.listen_lanes("127.0.0.1:0").await.unwrap();
        let addr = addr_of(&listener);
        let mut silent = TcpStream::connect(&addr).await.unwrap();
        let mut partial = TcpStream::connect(&addr).await.unwrap();
        partial.write_all(b"AFTL\x01").await.unwrap();
        let mut http = TcpStream::connect(&addr).await.unwrap();
        http.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut bad_version = TcpStream::connect(&addr).await.unwrap();
        let mut b = Preamble { lane: 0, id: 5 }.encode();
        b[4] = 1;
        bad_version.write_all(&b).await.unwrap();
        let mut half_open = raw_lane(&addr, 77, 1).await;

        let started = std::time::Instant::now();
        let (c, s) = tokio::join!(t.connect(&addr), listener.accept());
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "accept waited for the bad clients"
        );
        c.sink.push(data_frame(1, 5));
        flush(c.sink.as_mut()).await.unwrap();
        check_frame(&recv_n(s.stream.as_mut(), 1).await[0], 1, 5);

        // Once the listener has read them all (two are still waiting for their preamble)...
        run_listener_until(&mut listener, |l| {
            l.closed == 2 && l.pending.contains_key(&77)
        })
        .await;
        assert_eq!(listener.handshakes_in_progress(), 2);
        // ...it has closed the bad ones...
        for (name, sock) in [("http", &mut http), ("bad version", &mut bad_version)] {
            assert!(
                closed_by_peer(sock, Duration::from_secs(5)).await,
                "{name} client not closed"
            );
        }
        // ...and keeps the slow ones waiting, within their time limit.
        assert!(!closed_by_peer(&mut silent, Duration::from_millis(50)).await);
        assert!(!closed_by_peer(&mut partial, Duration::from_millis(50)).await);
        assert!(!closed_by_peer(&mut half_open, Duration::from_millis(50)).await);

        // A lane that already arrived for a pending id is refused...
        let _first = raw_lane(&addr, 88, 0).await;
        run_listener_until(&mut listener, |l| l.pending.contains_key(&88)).await;
        let closed = listener.closed;
        let mut duplicate = raw_lane(&addr, 88, 0).await;
        run_listener_until(&mut listener, |l| l.closed == closed + 1).await;
        assert!(closed_by_peer(&mut duplicate, Duration::from_secs(5)).await);
        // ...and so is one more lane of an already paired connection.
        let _second = raw_lane(&addr, 88, 1).await;
        let _third = raw_lane(&addr, 88, 2).await;
        let _conn = listener.accept().await.unwrap();
        let mut late = raw_lane(&addr, 88, 1).await;
        run_listener_until(&mut listener, |l| l.closed == closed + 2).await;
        assert!(closed_by_peer(&mut late, Duration::from_secs(5)).await);
        assert!(!listener.pending.contains_key(&88));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_open_clients_are_closed_after_the_timeout() {
    bounded(async {
        let t = TcpTransport::with_config(TcpConfig {
            connect_timeout: Duration::from_millis(300),
            ..TcpConfig::default()
        });
        let mut listener = t.listen_lanes("127.0.0.1:0").await.unwrap();
        let addr = addr_of(&listener);
        let mut silent = TcpStream::connect(&addr).await.unwrap();
        let mut half_open = raw_lane(&addr, 5, 0).await;
        // Nothing to accept; meanwhile both are timed out and closed.
        let r = tokio::time::timeout(Duration::from_millis(1500), listener.accept()).await;
        assert!(r.is_err(), "accepted a connection from nothing");
        assert!(closed_by_peer(&mut silent, Duration::from_secs(5)).await);
        assert!(closed_by_peer(&mut half_open, Duration::from_secs(5)).await);
        assert!(listener.pending.is_empty());
    })
    .await
}

/// Polls `accept` in short slices until `done` holds (nothing should be accepted meanwhile).
async fn run_listener_until(
    listener: &mut TcpFrameListener,
    done: impl Fn(&TcpFrameListener) -> bool,
) {
    while !done(listener) {
        let r = tokio::time::timeout(Duration::from_millis(20), listener.accept()).await;
        assert!(r.is_err(), "unexpected connection");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_set_is_bounded_oldest_dropped_first() {
    bounded(async {
        const MAX: usize = 4;
        let t = TcpTransport::with_config(TcpConfig {
            max_half_open: MAX,
            ..TcpConfig::default()
        });
        let mut listener = t.listen_lanes("127.0.0.1:0").await.unwrap();
        let addr = addr_of(&listener);
        let mut halves = Vec::new();
        for id in 1..=10u64 {
            halves.push(raw_lane(&addr, id, 0).await);
            run_listener_until(&mut listener, |l| {
                l.pending.contains_key(&id) && l.handshakes_in_progress() == 0
            })
            .await;
            assert!(listener.pending.len() <= MAX);
        }
        let ids: HashSet<u64> = listener.pending.keys().copied().collect();
        assert_eq!(ids, (7..=10).collect());
        for (i, h) in halves.iter_mut().enumerate() {
            let closed =
                closed_by_peer(h, Duration::from_millis(if i < 6 { 5000 } else { 50 })).await;
            assert_eq!(closed, i < 6, "half-open id {} closed: {closed}", i + 1);
        }
        // Completing one of the kept ids yields its connection.
        let _l1 = raw_lane(&addr, 9, 1).await;
        let _l2 = raw_lane(&addr, 9, 2).await;
        let conn = listener.accept().await.unwrap();
        assert!(conn.remote.starts_with("tcp://127.0.0.1:"));
        assert_eq!(listener.pending.len(), MAX - 1);
    })
    .await
}

#[tokio::test]
async fn clean_end_of_one_lane_delivers_the_other_lanes_frames_first() {
    bounded(async {
        let ([mut l0, mut l1, _l2], mut conn) = raw_pair().await;
        let block = pattern(2, 1000);
        l0.write_all(&wire(&[data_frame(0, 10)])).await.unwrap();
        l0.shutdown().await.unwrap();
        let frames = recv_n(conn.stream.as_mut(), 1).await;
        check_frame(&frames[0], 0, 10);
        // Lane 0 has ended cleanly, lane 1 has not: the connection waits for lane 1...
        let mut out = Vec::new();
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            recv(conn.stream.as_mut(), &mut out),
        )
        .await;
        assert!(r.is_err(), "connection ended with a lane still open");
        // ...whose frames still arrive.
        l1.write_all(&wire(&[bulk_frame(1, &block)])).await.unwrap();
        let frames = recv_n(conn.stream.as_mut(), 1).await;
        assert_eq!(frames[0].header.seq, 1);
        assert!(frames[0].payload == block);
        l1.shutdown().await.unwrap();
        let mut out = Vec::new();
        let err = recv(conn.stream.as_mut(), &mut out).await.unwrap_err();
        assert!(matches!(err, RecvError::Eof), "{err}");
    })
    .await
}

/// One-way latency of small latency-lane frames while bulk saturates the connection, one TCP
/// connection (as before lanes) against two lanes. A measurement, not a check: run with
/// `cargo test --release -p agentfabric-tcp lane_latency_probe -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: cargo test --release -p agentfabric-tcp lane_latency_probe -- --ignored --nocapture"]
async fn lane_latency_probe() {
    let bulk_sndbuf = |size| {
        TcpTransport::with_config(TcpConfig {
            bulk_send_buffer_size: size,
            ..TcpConfig::default()
        })
    };
    for (laned, bulk_buf) in [(false, None), (true, None), (true, Some(256 << 10))]
        .into_iter()
        .cycle()
        .take(6)
    {
        let ([c0, c1], [s0, s1]) = two_socket_pairs().await;
        let (mut sink, mut stream): (Box<dyn FrameSink>, Box<dyn FrameStream>) = if laned {
            let a = bulk_sndbuf(bulk_buf).wrap_streams(c0, c1).unwrap();
            let b = TcpTransport::new().wrap_streams(s0, s1).unwrap();
            (a.sink, b.stream)
        } else {
            let (_, w) = c0.into_split();
            let (r, _) = s0.into_split();
            (
                Box::new(TcpFrameSink::new(w)),
                Box::new(TcpFrameStream::new(r, TcpConfig::default().read_size())),
            )
        };
        let start = tokio::time::Instant::now();
        let run = Duration::from_millis(1500);
        let block = pattern(1, MAX_FRAME_PAYLOAD);
        let sender = tokio::spawn(async move {
            let mut next_probe = start;
            let mut seq = 0;
            while start.elapsed() < run {
                if tokio::time::Instant::now() >= next_probe {
                    let mut h = Header::new(Kind::Data);
                    h.channel = 1;
                    h.tag = start.elapsed().as_nanos() as u64;
                    sink.push(OutFrame {
                        header: h.encode(),
                        payload: Bytes::new(),
                    });
                    next_probe += Duration::from_micros(200);
                }
                while sink.queued_bytes() < 2 * MAX_FRAME_PAYLOAD {
                    sink.push(bulk_frame(seq, &block));
                    seq += 1;
                }
                flush(sink.as_mut()).await.unwrap();
            }
            close(sink.as_mut()).await.unwrap();
        });
        let mut lat = Vec::new();
        let mut bulk_bytes = 0usize;
        let mut out = Vec::new();
        loop {
            out.clear();
            if recv(stream.as_mut(), &mut out).await.is_err() {
                break;
            }
            let now = start.elapsed().as_nanos() as u64;
            for f in &out {
                if f.header.class == Class::Bulk {
                    bulk_bytes += f.payload.len();
                } else {
                    lat.push((now - f.header.tag) / 1000);
                }
            }
        }
        sender.await.unwrap();
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
        println!(
            "{} (bulk SO_SNDBUF {:?}): probes {} one-way µs p50 {} p99 {} max {}; bulk {:.0} MB/s",
            if laned { "two lanes " } else { "one stream" },
            bulk_buf,
            lat.len(),
            pct(0.5),
            pct(0.99),
            lat[lat.len() - 1],
            bulk_bytes as f64 / run.as_secs_f64() / 1e6
        );
    }
}
