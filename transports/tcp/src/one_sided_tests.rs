//! Tests of the one-sided lane: operations between registered memory, the checks on every
//! access, and what a misbehaving peer gets.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use agentfabric::transport::{
    Connection, FrameStream, MemoryRegistration, OneSided, OneSidedKind, OneSidedOp, RailKeys,
    RecvError, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::one_sided::{Header, MAX_OUTSTANDING, PIECE};
use crate::preamble::Preamble;
use crate::TcpTransport;

const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test took too long")
}

/// Heap memory registered with a transport. The registration is dropped before the buffer.
struct Mem {
    reg: Option<Box<dyn MemoryRegistration>>,
    buf: Vec<u8>,
}

impl Mem {
    fn new(t: &TcpTransport, len: usize, fill: impl Fn(usize) -> u8) -> Mem {
        let mut buf: Vec<u8> = (0..len).map(fill).collect();
        let domain = t.memory_domain().expect("tcp has a memory domain");
        // SAFETY: `reg` is dropped before `buf` (field order, and `deregister`), and the
        // vector's heap memory does not move.
        let reg = unsafe { domain.register(buf.as_mut_ptr(), len) }.unwrap();
        Mem {
            reg: Some(reg),
            buf,
        }
    }

    fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    fn key(&self) -> u32 {
        self.reg.as_ref().unwrap().remote_key()
    }
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 9)) as u8
}

fn write_op(from: &Mem, at: u64, to: &Mem, len: u32, imm: Option<u32>) -> OneSidedOp {
    OneSidedOp {
        kind: OneSidedKind::Write,
        local_addr: from.addr(),
        local_key: from.key(),
        len,
        remote_addr: to.addr() + at,
        remote_key: to.key(),
        local_rails: RailKeys::EMPTY,
        remote_rails: RailKeys::EMPTY,
        imm,
    }
}

/// Connects `a` to a listener of `b`: (a's end, b's end).
async fn pair(a: &TcpTransport, b: &TcpTransport) -> (Connection, Connection) {
    let mut listener = b.listen("127.0.0.1:0").await.unwrap();
    let url = listener.local_addr();
    let addr = url.strip_prefix("tcp://").unwrap().to_owned();
    let (c, s) = tokio::join!(a.connect(&addr), listener.accept());
    (c.unwrap(), s.unwrap())
}

fn one_sided(c: &Connection) -> Arc<dyn OneSided> {
    c.sink
        .one_sided()
        .expect("a tcp connection has one-sided operations")
}

/// Posts `op` and waits for its outcome.
async fn run(os: &Arc<dyn OneSided>, op: OneSidedOp) -> io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    os.post(
        op,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    bounded(rx)
        .await
        .unwrap_or_else(|_| Err(io::Error::other("the operation was dropped unrun")))
}

/// The error that ends `stream` (frames before it are skipped).
async fn stream_error(stream: &mut dyn FrameStream) -> RecvError {
    let mut out = Vec::new();
    bounded(std::future::poll_fn(|cx| loop {
        match stream.poll_recv(cx, &mut out) {
            Poll::Ready(Err(e)) => return Poll::Ready(e),
            Poll::Ready(Ok(())) => out.clear(),
            Poll::Pending => return Poll::Pending,
        }
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_move_bytes_between_registrations() {
    let (ta, tb) = (TcpTransport::new(), TcpTransport::new());
    let (a, b) = pair(&ta, &tb).await;
    // More than two pieces, not a multiple of the piece size.
    let len = 2 * PIECE + 4321;
    let src = Mem::new(&ta, len, pattern);
    let dst = Mem::new(&tb, len + 100, |_| 0);
    let os = one_sided(&a);
    assert_eq!(os.domain(), ta.memory_domain().unwrap().id());
    run(&os, write_op(&src, 100, &dst, len as u32, Some(7)))
        .await
        .unwrap();
    // A zero-length write carries an immediate and touches no memory.
    run(&os, write_op(&src, 0, &dst, 0, Some(8))).await.unwrap();
    assert!(dst.buf[..100].iter().all(|&b| b == 0));
    assert!(
        dst.buf[100..] == src.buf[..],
        "the written bytes differ from the source"
    );
    // Immediates that came before the handler are handed to it first, in order.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    one_sided(&b).on_immediate(Arc::new(move |v| s.lock().unwrap().push(v)));
    run(&os, write_op(&src, 0, &dst, 1, Some(9))).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [7, 8, 9]);

    // And back by a read, into fresh memory.
    let back = Mem::new(&ta, len, |_| 0);
    let read = OneSidedOp {
        kind: OneSidedKind::Read,
        local_addr: back.addr(),
        local_key: back.key(),
        len: len as u32,
        remote_addr: dst.addr() + 100,
        remote_key: dst.key(),
        local_rails: RailKeys::EMPTY,
        remote_rails: RailKeys::EMPTY,
        imm: None,
    };
    run(&os, read).await.unwrap();
    assert!(back.buf == src.buf, "the read bytes differ");
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_access_fails_the_operation_and_the_connection() {
    let (ta, tb) = (TcpTransport::new(), TcpTransport::new());
    let src = Mem::new(&ta, 4096, pattern);
    let dst = Mem::new(&tb, 4096, |_| 0);
    for (what, op, reason) in [
        (
            "unknown key",
            OneSidedOp {
                remote_key: dst.key() ^ 0x5a5a,
                local_rails: RailKeys::EMPTY,
                remote_rails: RailKeys::EMPTY,
                ..write_op(&src, 0, &dst, 4096, None)
            },
            "no registered memory has that key",
        ),
        (
            "past the end",
            write_op(&src, 1, &dst, 4096, None),
            "outside the registered memory",
        ),
        (
            "read before the start",
            OneSidedOp {
                kind: OneSidedKind::Read,
                remote_addr: dst.addr() - 1,
                ..write_op(&src, 0, &dst, 16, None)
            },
            "outside the registered memory",
        ),
    ] {
        let (mut a, _b) = pair(&ta, &tb).await;
        let os = one_sided(&a);
        let e = run(&os, op).await.unwrap_err();
        assert!(
            e.to_string().contains("the peer refused") && e.to_string().contains(reason),
            "{what}: {e}"
        );
        let RecvError::Io(e) = stream_error(a.stream.as_mut()).await else {
            panic!("{what}: the stream did not fail with an i/o error");
        };
        assert!(e.to_string().contains(reason), "{what}: {e}");
        // Later operations fail at once.
        let e = run(&os, write_op(&src, 0, &dst, 16, None))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(reason), "{what}: later post: {e}");
    }
    assert!(dst.buf.iter().all(|&b| b == 0), "refused bytes landed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_memory_is_checked_before_it_is_sent() {
    let (ta, tb) = (TcpTransport::new(), TcpTransport::new());
    let (a, _b) = pair(&ta, &tb).await;
    let src = Mem::new(&ta, 4096, pattern);
    let dst = Mem::new(&tb, 8192, |_| 0);
    let os = one_sided(&a);
    let too_long = write_op(&src, 0, &dst, 8192, None);
    let e = run(&os, too_long).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(dst.buf.iter().all(|&b| b == 0));
    // Nothing reached the peer: the connection still works.
    run(&os, write_op(&src, 0, &dst, 4096, None)).await.unwrap();
    assert!(dst.buf[..4096] == src.buf[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_fail_once_the_connection_is_gone() {
    let (ta, tb) = (TcpTransport::new(), TcpTransport::new());
    let (a, b) = pair(&ta, &tb).await;
    let src = Mem::new(&ta, 4096, pattern);
    let dst = Mem::new(&tb, 4096, |_| 0);
    let os = one_sided(&a);
    drop(a);
    let e = run(&os, write_op(&src, 0, &dst, 4096, None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("closed"), "{e}");
    // The peer's end sees its lane end, and its posts fail too.
    let peer = one_sided(&b);
    let op = OneSidedOp {
        kind: OneSidedKind::Read,
        ..write_op(&dst, 0, &src, 16, None)
    };
    let deadline = Instant::now() + LIMIT;
    while run(&peer, op).await.is_ok() {
        assert!(Instant::now() < deadline, "the peer's lane never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fabric connection accepted from raw sockets: (raw lanes, the fabric's end).
async fn raw_peer(t: &TcpTransport) -> ([TcpStream; 3], Connection) {
    let mut listener = t.listen("127.0.0.1:0").await.unwrap();
    let url = listener.local_addr();
    let addr = url.strip_prefix("tcp://").unwrap().to_owned();
    let lane = |n: u8| {
        let addr = addr.clone();
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&Preamble { lane: n, id: 99 }.encode())
                .await
                .unwrap();
            s
        }
    };
    let (l0, l1, l2, conn) = tokio::join!(lane(0), lane(1), lane(2), listener.accept());
    ([l0, l1, l2], conn.unwrap())
}

fn header(op: u8, flags: u8, len: u32, seq: u64, addr: u64, key: u32) -> [u8; 32] {
    Header {
        op,
        flags,
        len,
        seq,
        addr,
        key,
        imm: 0,
    }
    .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_unexpected_messages_fail_the_connection() {
    let t = TcpTransport::new();
    let mut bad_op = header(1, 0, 0, 0, 0, 0);
    bad_op[0] = 9;
    let mut reserved = header(4, 0, 0, 0, 0, 0);
    reserved[3] = 1;
    for (what, bytes, expect) in [
        ("unknown op", bad_op.to_vec(), "unknown one-sided op 9"),
        ("bad flags", header(1, 0x80, 0, 0, 0, 0).to_vec(), "flags"),
        ("reserved bytes", reserved.to_vec(), "reserved"),
        (
            "oversize piece",
            header(1, 1, PIECE as u32 + 1, 0, 0, 1).to_vec(),
            "at most",
        ),
        (
            "ack of nothing",
            header(4, 0, 0, 3, 0, 0).to_vec(),
            "no such write",
        ),
        (
            "read data of nothing",
            header(3, 1, 0, 3, 0, 0).to_vec(),
            "no such read",
        ),
        (
            "cut in the middle of a header",
            header(4, 0, 0, 3, 0, 0)[..10].to_vec(),
            "in the middle of a message",
        ),
    ] {
        let ([_l0, _l1, mut l2], mut conn) = raw_peer(&t).await;
        l2.write_all(&bytes).await.unwrap();
        if what.starts_with("cut") {
            l2.shutdown().await.unwrap();
        }
        let RecvError::Io(e) = stream_error(conn.stream.as_mut()).await else {
            panic!("{what}: not an i/o error");
        };
        assert!(e.to_string().contains(expect), "{what}: {e}");
        // The lane is closed on the peer too.
        let mut b = [0u8; 64];
        let n = bounded(l2.read(&mut b)).await.unwrap_or(0);
        assert_eq!(n, 0, "{what}: the lane was not closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_too_many_requests_outstanding_is_cut_off() {
    let t = TcpTransport::new();
    let mem = Mem::new(&t, PIECE, pattern);
    let ([_l0, _l1, mut l2], mut conn) = raw_peer(&t).await;
    // Reads whose answers this peer never takes: once the socket buffers are full the answers
    // queue up, and past the bound the connection fails instead of queuing more.
    let mut requests = Vec::new();
    for seq in 0..(MAX_OUTSTANDING as u64 * 4) {
        requests.extend_from_slice(&header(2, 0, PIECE as u32, seq, mem.addr(), mem.key()));
    }
    l2.write_all(&requests).await.unwrap();
    let RecvError::Io(e) = stream_error(conn.stream.as_mut()).await else {
        panic!("not an i/o error");
    };
    assert!(e.to_string().contains("outstanding"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_cuts_a_stalled_write_short() {
    let t = TcpTransport::new();
    let mut mem = Mem::new(&t, PIECE, |_| 0);
    let ([_l0, _l1, mut l2], mut conn) = raw_peer(&t).await;
    // A write of one piece whose bytes stop coming after the first 100.
    l2.write_all(&header(1, 1, 64 << 10, 0, mem.addr(), mem.key()))
        .await
        .unwrap();
    l2.write_all(&[0xEE; 100]).await.unwrap();
    let deadline = Instant::now() + LIMIT;
    // SAFETY: a volatile read of memory that the lane's thread may be writing (a byte; the test
    // only waits for it to change).
    while unsafe { std::ptr::read_volatile(mem.buf.as_ptr().add(99)) } != 0xEE {
        assert!(Instant::now() < deadline, "the first bytes never landed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Deregistering does not wait for the stalled peer: it closes that connection.
    let reg = mem.reg.take().unwrap();
    let started = Instant::now();
    bounded(tokio::task::spawn_blocking(move || drop(reg)))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "deregistration waited {:?} for a stalled peer",
        started.elapsed()
    );
    let RecvError::Io(_) = stream_error(conn.stream.as_mut()).await else {
        panic!("the connection did not fail");
    };
    // Bytes sent now reach nothing.
    let _ = l2.write_all(&[0xDD; 1000]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !mem.buf.contains(&0xDD),
        "bytes landed after deregistration"
    );
}
