//! Tests: loopback sockets and in-memory readers/writers only, each bounded in time.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use agentfabric::frame::{
    Frame, FrameError, Header, Kind, OutFrame, HEADER_LEN, MAX_FRAME_PAYLOAD,
};
use agentfabric::transport::{Connection, FrameSink, FrameStream, RecvError, Transport};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

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

/// A raw loopback socket talking to a fabric connection: (raw side, fabric side).
async fn raw_pair() -> (tokio::net::TcpStream, Connection) {
    let t = TcpTransport::new();
    let mut listener = t.listen("127.0.0.1:0").await.unwrap();
    let url = listener.local_addr();
    let addr = url.strip_prefix("tcp://").unwrap().to_owned();
    let (raw, conn) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    (raw.unwrap(), conn.unwrap())
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
}

impl StingyWriter {
    fn take(&mut self, bufs: &[IoSlice<'_>]) -> usize {
        self.max_slices_seen = self.max_slices_seen.max(bufs.len());
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
        let mut sink = TcpFrameSink::new(StingyWriter {
            written: Vec::new(),
            limits: vec![1, 3, 63, 64, 65, 127, 128, 129, 500, 4096, 7, 100_000],
            calls: 0,
            max_slices_seen: 0,
        });
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
        let (mut raw, mut conn) = raw_pair().await;
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
        let (mut raw, mut conn) = raw_pair().await;
        let mut bad = data_frame(0, 0).header;
        bad[2] = 99; // version
        raw.write_all(&bad).await.unwrap();
        let err = recv(conn.stream.as_mut(), &mut out).await.unwrap_err();
        assert!(
            matches!(err, RecvError::Frame(FrameError::UnsupportedVersion(99))),
            "{err}"
        );
    })
    .await
}

#[tokio::test]
async fn truncated_frame_then_close_is_unexpected_eof() {
    bounded(async {
        // A frame announcing 100 payload bytes, of which 10 arrive.
        let (mut raw, mut conn) = raw_pair().await;
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

        // Half a header.
        let (mut raw, mut conn) = raw_pair().await;
        raw.write_all(&f.header[..30]).await.unwrap();
        drop(raw);
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
