//! Raw baselines measured in the same run as the fabric, on the same runtime and sizes.
//!
//! - `raw-tcp`: a ping-pong between two tokio tasks over one loopback [`TcpStream`] with
//!   `TCP_NODELAY`. Messages have a fixed size known to both sides, so there is no framing at all:
//!   the client writes `size` bytes and reads `size` bytes back, the server reads `size` bytes and
//!   writes them back. No allocation per round trip. This is the best a plain tokio program does.
//! - `raw-tcp-stream`: one task writes `size`-byte blocks back to back, taken in turn from a
//!   buffer of `span` bytes, the other reads them (256 KiB reads, as the fabric's TCP transport
//!   does) into successive places of another `span`-byte buffer and counts bytes. With `span` the
//!   size of a transfer's regions, both copies touch memory as the transfer's do; with `span` one
//!   block, the data never leaves the caches.
//! - `tokio-mpsc`: for the in-process transport, two bounded tokio mpsc channels carrying
//!   [`Bytes`] (refcounted, never copied), one each way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::BenchResult;
use crate::rate::Rate;

/// Bytes per read of the streaming baseline's receiver.
const STREAM_READ: usize = 256 << 10;

/// The client side of a baseline ping-pong. Dropping it stops the echo task.
pub struct BaselinePinger {
    kind: Kind,
    server: JoinHandle<()>,
}

enum Kind {
    RawTcp {
        stream: TcpStream,
        payload: Vec<u8>,
        buf: Vec<u8>,
    },
    Mpsc {
        tx: mpsc::Sender<Bytes>,
        rx: mpsc::Receiver<Bytes>,
        payload: Bytes,
    },
}

impl BaselinePinger {
    /// The baseline's name in reports: `raw-tcp` or `tokio-mpsc`.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::RawTcp { .. } => "raw-tcp",
            Kind::Mpsc { .. } => "tokio-mpsc",
        }
    }

    /// A raw TCP ping-pong of `size`-byte messages over loopback, echo task included.
    pub async fn raw_tcp(size: usize) -> BenchResult<BaselinePinger> {
        let (client, mut server) = tcp_pair().await?;
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; size];
            loop {
                if server.read_exact(&mut buf).await.is_err() {
                    return;
                }
                if server.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        Ok(BaselinePinger {
            kind: Kind::RawTcp {
                stream: client,
                payload: vec![0xa5u8; size],
                buf: vec![0u8; size],
            },
            server,
        })
    }

    /// A pair of tokio mpsc channels with an echo task between them.
    pub fn mpsc(size: usize) -> BaselinePinger {
        let (tx, mut srx) = mpsc::channel::<Bytes>(1024);
        let (stx, rx) = mpsc::channel::<Bytes>(1024);
        let server = tokio::spawn(async move {
            while let Some(b) = srx.recv().await {
                if stx.send(b).await.is_err() {
                    return;
                }
            }
        });
        BaselinePinger {
            kind: Kind::Mpsc {
                tx,
                rx,
                payload: Bytes::from(vec![0xa5u8; size]),
            },
            server,
        }
    }

    /// One round trip.
    pub async fn round_trip(&mut self) -> BenchResult<()> {
        match &mut self.kind {
            Kind::RawTcp {
                stream,
                payload,
                buf,
            } => {
                stream.write_all(payload).await?;
                stream.read_exact(buf).await?;
                Ok(())
            }
            Kind::Mpsc { tx, rx, payload } => {
                tx.send(payload.clone())
                    .await
                    .map_err(|_| "mpsc echo task stopped")?;
                rx.recv().await.ok_or("mpsc echo task stopped")?;
                Ok(())
            }
        }
    }
}

impl Drop for BaselinePinger {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Two connected loopback TCP streams with `TCP_NODELAY` set on both.
async fn tcp_pair() -> BenchResult<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client?;
    let (server, _) = accepted?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

/// Throughput in MB/s (10^6 bytes per second) of a raw TCP stream of `block`-byte writes, sent
/// from and received into buffers of `span` bytes (at least one block). Counted at the receiver
/// over `duration`, after `warmup`.
///
/// The stream is written and read by two threads of its own with blocking sockets, as a plain
/// streaming program would be: its rate does not depend on the runtime's worker count.
pub(crate) async fn tcp_stream_mb_s(
    block: usize,
    span: usize,
    warmup: Duration,
    duration: Duration,
) -> BenchResult<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let (client, server) = tcp_pair().await?;
    let (client, server) = (client.into_std()?, server.into_std()?);
    client.set_nonblocking(false)?;
    server.set_nonblocking(false)?;
    let closers = [client.try_clone()?, server.try_clone()?];
    // Both ends walk buffers of `span` bytes, block by block, as a transfer between two
    // regions of that size does: with `span` larger than the caches, the copies in and out
    // of the kernel touch memory as the fabric's do.
    let span = span.max(block);
    let writer = std::thread::spawn(move || {
        let mut client = client;
        let data = vec![0x5au8; span];
        for chunk in data.chunks(block).cycle() {
            if std::io::Write::write_all(&mut client, chunk).is_err() {
                return;
            }
        }
    });
    let counter = received.clone();
    let reader = std::thread::spawn(move || {
        let mut server = server;
        let mut buf = vec![0u8; span];
        let mut at = 0;
        loop {
            let end = (at + STREAM_READ).min(span);
            match std::io::Read::read(&mut server, &mut buf[at..end]) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    at = if at + n == span { 0 } else { at + n };
                }
            }
        }
    });
    // The threads first fill and fault in their buffers (64 MiB each for a region of 1024
    // blocks of 64 KiB: tens of milliseconds, more on a loaded machine), which is no part of
    // streaming: the warm-up starts with the first bytes received.
    let first = async {
        while received.load(Ordering::Relaxed) == 0 && !reader.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let started = tokio::time::timeout(FIRST_BYTES_LIMIT, first).await.is_ok()
        && received.load(Ordering::Relaxed) > 0;
    let mb_s = if started {
        Ok(measure(&received, warmup, duration).await.mb_s())
    } else {
        Err(format!(
            "the raw TCP stream moved no bytes within {FIRST_BYTES_LIMIT:?}"
        ))
    };
    // Shutting the sockets down ends both threads' blocked calls.
    for s in &closers {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    tokio::task::spawn_blocking(move || {
        let _ = writer.join();
        let _ = reader.join();
    })
    .await
    .map_err(|e| format!("raw TCP stream threads: {e}"))?;
    Ok(mb_s?)
}

/// How long [`tcp_stream_mb_s`] waits for its stream's first bytes.
const FIRST_BYTES_LIMIT: Duration = Duration::from_secs(10);

/// Throughput in MB/s (10^6 bytes per second) of a tokio mpsc channel carrying `block`-byte
/// [`Bytes`] (refcounted: nothing is copied). Counted at the receiver over `duration`, after
/// `warmup`.
pub(crate) async fn mpsc_stream_mb_s(block: usize, warmup: Duration, duration: Duration) -> f64 {
    let received = Arc::new(AtomicU64::new(0));
    let (writer, reader) = {
        let (tx, mut rx) = mpsc::channel::<Bytes>(8);
        let writer = tokio::spawn(async move {
            let data = Bytes::from(vec![0x5au8; block]);
            while tx.send(data.clone()).await.is_ok() {}
        });
        let counter = received.clone();
        let reader = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                counter.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
        });
        (writer, reader)
    };
    let mb_s = measure(&received, warmup, duration).await.mb_s();
    writer.abort();
    reader.abort();
    mb_s
}

/// What `received` counted over `duration`, after `warmup`.
pub(crate) async fn measure(received: &AtomicU64, warmup: Duration, duration: Duration) -> Rate {
    tokio::time::sleep(warmup).await;
    Rate::during(received, tokio::time::sleep(duration)).await.0
}
