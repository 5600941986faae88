//! One-sided operations over TCP: the connection's third lane, which moves the bytes of region
//! writes and reads straight between registered memory and the socket.
//!
//! Why: without it a transfer's block went through the session: chunked into frames, cut out of
//! the bulk lane's read buffer, then copied into the target region, a user-space copy on each
//! side on top of the kernel's. Measured on loopback (`agentfabric bench --transport tcp
//! --workload bulk`, 1 MiB blocks), that moved 0.47–0.63 of what raw TCP streaming moves between
//! the same buffers. Here the sender hands the region's bytes to `send` and the receiver's
//! `recv` lands them in the target region: the kernel's two copies, as raw streaming.
//!
//! The lane speaks a small protocol of its own, each message a 32-byte header (little-endian),
//! some followed by a payload:
//!
//! ```text
//!  0  op   1  flags (1 last piece, 2 immediate)   2  reserved (0, 2 bytes)   4  len (u32)
//!  8  seq (u64)   16  addr (u64)   24  key (u32)   28  immediate (u32)
//! ```
//!
//! | op | payload | meaning |
//! |---|---|---|
//! | 1 write | `len` bytes | a piece of write `seq`: land it at `addr` of registration `key` |
//! | 2 read | none | read `len` bytes at `addr` of registration `key` for request `seq` |
//! | 3 read data | `len` bytes | a piece of read `seq`'s answer, at offset `addr` of it |
//! | 4 ack | none | the last piece of write `seq` landed |
//! | 5 refuse | none | operation `seq` was refused; `len` holds the reason ([`Refusal`]) |
//!
//! Operations are cut into pieces of at most [`PIECE`] bytes, so each access to registered
//! memory is short (deregistration waits for it: [`crate::memory`]). Each direction's messages
//! are written by one writer thread and read by one reader thread per connection, in blocking
//! mode at the bulk lane's priority, as the bulk lane's threads (see [`crate::BulkLaneIo`]); the
//! writer starts with the first message to send.
//!
//! **What it guarantees, as an RDMA queue pair.** A write completes (its `done` runs) once the
//! target acknowledged its last piece, so its bytes are in the target's memory. The target
//! hands a write's immediate to its handler once the write landed, after every earlier write
//! of the connection (one socket, read in order). Every access is checked on the side that owns
//! the memory: a key that names no live registration, or a range outside it, is refused; a
//! refused operation fails, and fails the connection (its stream reports the error, and the
//! session resumes on a new one), as an RDMA device moves the queue pair to its error state. A
//! malformed message, a piece of a read nobody asked for, or more than
//! [`MAX_OUTSTANDING`] operations from the peer at once fail the connection too. A requester
//! never puts more than [`MAX_OUTSTANDING`] operations on the wire: the rest wait in its queue.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use agentfabric::frame::{Frame, Lane, OutFrame};
use agentfabric::transport::{
    FrameSink, FrameStream, ImmediateHandler, OneSided, OneSidedDone, OneSidedKind, OneSidedOp,
    RecvError,
};
use socket2::SockRef;

use crate::lane_thread::{lock, spawn, ThreadPriority};
use crate::memory::{Refusal, TcpDomain};

/// Length of a message header.
const HEADER_LEN: usize = 32;

/// Most payload bytes in one message: one piece of a write or of a read's answer. Each is one
/// `send` (with its header) and one `recv` (`MSG_WAITALL`), and one lease of the registered
/// memory. Large on purpose: on loopback the cost is in the system calls and the wake-ups
/// between them. Measured (`agentfabric bench --transport tcp --workload bulk`, 1 MiB blocks,
/// 2 cores): with 128 KiB sends (the bulk lane's `WRITE_MAX`) 2.8–3.1 GB/s, 0.61–0.68 of raw
/// streaming, with 100,000 context switches a second; with 1 MiB pieces 3.9–4.9 GB/s,
/// 0.98–1.25, with less than half the switches. The bulk lane keeps its smaller writes for the
/// latency of coordination on a non-preemptive kernel; here `mixed --bulk-api transfer` measured
/// a loaded/idle p99 of 1.02–1.46 with 1 MiB pieces.
pub(crate) const PIECE: usize = 1 << 20;

/// Most operations a requester has on the wire (sent, not yet answered); also the most a
/// requester may have outstanding at its peer before the peer fails the connection.
pub(crate) const MAX_OUTSTANDING: usize = 256;

/// Immediates kept for a handler not yet installed ([`OneSided::on_immediate`]); later ones are
/// dropped with a warning.
pub(crate) const EARLY_IMMEDIATES: usize = 1024;

const OP_WRITE: u8 = 1;
const OP_READ: u8 = 2;
const OP_READ_DATA: u8 = 3;
const OP_ACK: u8 = 4;
const OP_REFUSE: u8 = 5;

const FLAG_LAST: u8 = 1;
const FLAG_IMM: u8 = 2;

/// A message header (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Header {
    pub(crate) op: u8,
    pub(crate) flags: u8,
    pub(crate) len: u32,
    pub(crate) seq: u64,
    pub(crate) addr: u64,
    pub(crate) key: u32,
    pub(crate) imm: u32,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.op;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..28].copy_from_slice(&self.key.to_le_bytes());
        b[28..32].copy_from_slice(&self.imm.to_le_bytes());
        b
    }

    /// Decodes and validates a header: known op and flags, reserved bytes zero, a payload no
    /// longer than [`PIECE`].
    pub(crate) fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let h = Header {
            op: b[0],
            flags: b[1],
            len: u32_at(4),
            seq: u64_at(8),
            addr: u64_at(16),
            key: u32_at(24),
            imm: u32_at(28),
        };
        if !(OP_WRITE..=OP_REFUSE).contains(&h.op) {
            return Err(format!("unknown one-sided op {}", h.op));
        }
        if h.flags & !(FLAG_LAST | FLAG_IMM) != 0 {
            return Err(format!("unknown one-sided flags {:#x}", h.flags));
        }
        if b[2] != 0 || b[3] != 0 {
            return Err("reserved one-sided header bytes are not zero".into());
        }
        if h.has_payload() && h.len as usize > PIECE {
            return Err(format!(
                "one-sided piece of {} bytes (at most {PIECE})",
                h.len
            ));
        }
        Ok(h)
    }

    fn has_payload(&self) -> bool {
        matches!(self.op, OP_WRITE | OP_READ_DATA)
    }

    fn last(&self) -> bool {
        self.flags & FLAG_LAST != 0
    }
}

/// Why the lane ended, kept for the operations posted later and for the stream.
#[derive(Clone)]
struct Ended {
    /// A fault (refusal, malformed message, I/O error) rather than the connection's end: the
    /// connection's stream reports it.
    fault: bool,
    kind: io::ErrorKind,
    text: String,
}

impl Ended {
    fn error(&self) -> io::Error {
        io::Error::new(self.kind, self.text.clone())
    }
}

/// A posted operation, until it completes.
struct Pending {
    op: OneSidedOp,
    done: Option<OneSidedDone>,
    /// The writer took it: answers for it are expected (an answer for an operation not yet
    /// sent is a protocol error, never a completion).
    taken: bool,
    /// A thread is moving its bytes: only that thread may complete it (the memory is in use).
    busy: bool,
    /// All of a write's pieces were handed to the socket.
    sent: bool,
    /// The target acknowledged a write while its writer was still marking it sent.
    acked: bool,
    /// Bytes of a read's answer received so far.
    received: u64,
}

/// Something the writer sends in answer to the peer.
enum Response {
    Ack(u64),
    Refuse(u64, Refusal),
    /// A read to serve, piece by piece: `sent` bytes of `len` at `addr` done.
    Serve {
        seq: u64,
        addr: u64,
        key: u32,
        len: u64,
        sent: u64,
    },
}

#[derive(Default)]
struct LaneState {
    /// Posted operations not yet taken by the writer, in post order.
    requests: VecDeque<u64>,
    /// Answers to the peer, sent before new requests.
    responses: VecDeque<Response>,
    ops: HashMap<u64, Pending>,
    next_seq: u64,
    /// Operations taken by the writer and not yet completed.
    on_wire: usize,
    ended: Option<Ended>,
    writer_started: bool,
    /// The connection's stream, waiting to hear of a fault.
    stream_waker: Option<Waker>,
}

#[derive(Default)]
struct Immediates {
    handler: Option<ImmediateHandler>,
    early: VecDeque<u32>,
}

/// A connection's one-sided lane (see the module docs).
pub(crate) struct RmaLane {
    me: Weak<RmaLane>,
    socket: Arc<TcpStream>,
    domain: Arc<TcpDomain>,
    priority: ThreadPriority,
    state: Mutex<LaneState>,
    /// Wakes the writer.
    work: Condvar,
    imm: Mutex<Immediates>,
}

impl RmaLane {
    /// Runs the lane on `socket` (switched to blocking mode) with the reader thread started.
    pub(crate) fn start(
        socket: TcpStream,
        domain: Arc<TcpDomain>,
        priority: ThreadPriority,
    ) -> io::Result<Arc<RmaLane>> {
        socket.set_nonblocking(false)?;
        let lane = Arc::new_cyclic(|me| RmaLane {
            me: me.clone(),
            socket: Arc::new(socket),
            domain,
            priority,
            state: Mutex::default(),
            work: Condvar::new(),
            imm: Mutex::default(),
        });
        let reader = lane.clone();
        spawn("af-tcp-rma-rx", priority, move || read_loop(&reader))?;
        Ok(lane)
    }

    /// Ends the lane (once): fails the operations no thread is using, stops both threads and
    /// tells the peer. A `fault` is also reported by the connection's stream.
    fn end(&self, fault: bool, kind: io::ErrorKind, text: String) {
        let ended = Ended { fault, kind, text };
        let (dones, waker) = {
            let mut st = lock(&self.state);
            if st.ended.is_some() {
                return;
            }
            if fault {
                tracing::warn!(error = %ended.text, "tcp one-sided lane failed");
            }
            st.ended = Some(ended.clone());
            st.requests.clear();
            st.responses.clear();
            let idle: Vec<u64> = st
                .ops
                .iter()
                .filter(|(_, p)| !p.busy)
                .map(|(&seq, _)| seq)
                .collect();
            let dones: Vec<OneSidedDone> = idle
                .into_iter()
                .filter_map(|seq| st.ops.remove(&seq).and_then(|mut p| p.done.take()))
                .collect();
            (dones, st.stream_waker.take())
        };
        self.work.notify_all();
        // Unblocks both threads' system calls, and tells the peer.
        let _ = self.socket.shutdown(Shutdown::Both);
        for done in dones {
            done(Err(ended.error()));
        }
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The connection is gone (both halves dropped): ends the lane, not as a fault.
    fn close(&self) {
        self.end(
            false,
            io::ErrorKind::ConnectionAborted,
            "the tcp connection was closed".into(),
        );
    }

    /// `Ready` with the fault that ended the lane; `Pending` (waker registered) otherwise.
    fn poll_fault(&self, cx: &Context<'_>) -> Poll<RecvError> {
        let mut st = lock(&self.state);
        match &st.ended {
            Some(e) if e.fault => Poll::Ready(RecvError::Io(e.error())),
            Some(_) => Poll::Pending,
            None => {
                if !st
                    .stream_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    st.stream_waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// Starts the writer thread if it is not running. Called under the state's lock.
    fn ensure_writer(&self, st: &mut LaneState) -> io::Result<()> {
        if st.writer_started {
            return Ok(());
        }
        let lane = self.me.upgrade().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "the tcp one-sided lane is gone",
            )
        })?;
        spawn("af-tcp-rma-tx", self.priority, move || write_loop(&lane))?;
        st.writer_started = true;
        Ok(())
    }

    /// Queues an answer to the peer.
    fn respond(&self, r: Response) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.ended.is_some() {
            return Ok(());
        }
        if st.responses.len() >= MAX_OUTSTANDING {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the peer has more than {MAX_OUTSTANDING} one-sided operations outstanding"
                ),
            ));
        }
        st.responses.push_back(r);
        self.ensure_writer(&mut st)?;
        drop(st);
        self.work.notify_one();
        Ok(())
    }

    /// Completes operation `seq` with `result` (taking it out of the table), if it is there.
    fn complete(&self, seq: u64, result: io::Result<()>) {
        let done = {
            let mut st = lock(&self.state);
            let Some(mut p) = st.ops.remove(&seq) else {
                return;
            };
            if p.taken {
                st.on_wire -= 1;
            }
            p.done.take()
        };
        self.work.notify_one();
        if let Some(done) = done {
            done(result);
        }
    }

    /// A thread is done with operation `seq`'s memory: completes it if the lane ended
    /// meanwhile, or if `finished` (its last piece moved, or a write acknowledged).
    fn release(&self, seq: u64, update: impl FnOnce(&mut Pending) -> bool) {
        let result = {
            let mut st = lock(&self.state);
            let ended = st.ended.clone();
            let Some(p) = st.ops.get_mut(&seq) else {
                return;
            };
            p.busy = false;
            let finished = update(p);
            match ended {
                Some(e) => Some(Err(e.error())),
                None if finished => Some(Ok(())),
                None => None,
            }
        };
        if let Some(result) = result {
            self.complete(seq, result);
        }
    }

    fn deliver_immediate(&self, value: u32) {
        let mut imm = lock(&self.imm);
        if let Some(h) = &imm.handler {
            h(value);
        } else if imm.early.len() < EARLY_IMMEDIATES {
            imm.early.push_back(value);
        } else {
            tracing::warn!(
                value,
                "tcp one-sided lane: immediate dropped (no handler, {EARLY_IMMEDIATES} kept)"
            );
        }
    }
}

impl OneSided for RmaLane {
    fn domain(&self) -> u64 {
        self.domain.id()
    }

    fn post(&self, op: OneSidedOp, done: OneSidedDone) {
        if op.kind == OneSidedKind::Read && op.imm.is_some() {
            done(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a one-sided read cannot carry immediate data",
            )));
            return;
        }
        let mut st = lock(&self.state);
        if let Some(e) = &st.ended {
            let e = e.error();
            drop(st);
            done(Err(e));
            return;
        }
        if let Err(e) = self.ensure_writer(&mut st) {
            drop(st);
            done(Err(io::Error::new(
                e.kind(),
                format!("cannot start the tcp one-sided lane's writer thread: {e}"),
            )));
            return;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.ops.insert(
            seq,
            Pending {
                op,
                done: Some(done),
                taken: false,
                busy: false,
                sent: false,
                acked: false,
                received: 0,
            },
        );
        st.requests.push_back(seq);
        drop(st);
        self.work.notify_one();
    }

    fn on_immediate(&self, handler: ImmediateHandler) {
        let mut imm = lock(&self.imm);
        for v in imm.early.drain(..) {
            handler(v);
        }
        imm.handler = Some(handler);
    }
}

// ---------------------------------------------------------------------------------------------
// Socket helpers

#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

/// Sends `header` then the `len` bytes at `payload`.
///
/// # Safety
///
/// `payload` must be valid for reads of `len` bytes for the duration of the call.
unsafe fn send_message(
    socket: &TcpStream,
    header: &[u8; HEADER_LEN],
    payload: *const u8,
    len: usize,
) -> io::Result<()> {
    let body: &[u8] = if len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(payload, len)
    };
    let sock = SockRef::from(socket);
    let total = HEADER_LEN + len;
    let mut done = 0;
    while done < total {
        let slices: [IoSlice<'_>; 2];
        let bufs: &[IoSlice<'_>] = if done < HEADER_LEN {
            slices = [IoSlice::new(&header[done..]), IoSlice::new(body)];
            &slices
        } else {
            slices = [IoSlice::new(&body[done - HEADER_LEN..]), IoSlice::new(&[])];
            &slices[..1]
        };
        match sock.send_vectored_with_flags(bufs, SEND_FLAGS) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "tcp connection accepted no more bytes",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receives exactly `len` bytes into `ptr`. `Ok(false)` when the peer closed the connection
/// before the first byte (and `allow_eof`).
///
/// # Safety
///
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
unsafe fn recv_exact(
    socket: &TcpStream,
    ptr: *mut u8,
    len: usize,
    allow_eof: bool,
) -> io::Result<bool> {
    let sock = SockRef::from(socket);
    let mut done = 0;
    while done < len {
        let buf =
            std::slice::from_raw_parts_mut(ptr.add(done).cast::<MaybeUninit<u8>>(), len - done);
        match sock.recv_with_flags(buf, libc::MSG_WAITALL) {
            Ok(0) if done == 0 && allow_eof => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the tcp one-sided lane in the middle of a message",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Writer

enum Job {
    Respond(Response),
    Request(u64, OneSidedOp),
}

fn write_loop(lane: &RmaLane) {
    loop {
        let job = {
            let mut st = lock(&lane.state);
            loop {
                if st.ended.is_some() {
                    return;
                }
                if let Some(r) = st.responses.pop_front() {
                    break Job::Respond(r);
                }
                if st.on_wire < MAX_OUTSTANDING {
                    if let Some(seq) = st.requests.pop_front() {
                        let Some(p) = st.ops.get_mut(&seq) else {
                            continue;
                        };
                        // A write's memory is read by this thread until its last piece is sent.
                        p.busy = p.op.kind == OneSidedKind::Write;
                        p.taken = true;
                        let op = p.op;
                        st.on_wire += 1;
                        break Job::Request(seq, op);
                    }
                }
                st = lane.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = match job {
            Job::Respond(r) => send_response(lane, r),
            Job::Request(seq, op) => send_request(lane, seq, op),
        };
        if let Err(e) = result {
            lane.end(true, e.kind(), format!("tcp one-sided lane: {e}"));
            return;
        }
    }
}

fn send_request(lane: &RmaLane, seq: u64, op: OneSidedOp) -> io::Result<()> {
    let mut h = Header {
        seq,
        key: op.remote_key,
        len: op.len,
        addr: op.remote_addr,
        ..Header::default()
    };
    if op.kind == OneSidedKind::Read {
        h.op = OP_READ;
        // SAFETY: no payload.
        unsafe { send_message(&lane.socket, &h.encode(), std::ptr::null(), 0) }?;
        lane.release(seq, |p| {
            p.sent = true;
            false
        });
        return Ok(());
    }
    let len = u64::from(op.len);
    // The local memory is checked as the target checks its own: the fabric names registered
    // memory, but the trait is public, and a wrong address must not be read.
    let local = match op.len {
        0 => None,
        _ => match lane
            .domain
            .lease(op.local_key, op.local_addr, len, &lane.socket)
        {
            Ok(l) => Some(l),
            Err(r) => {
                lane.release(seq, |_| false);
                lane.complete(
                    seq,
                    Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "one-sided write from local memory {:#x}: {r}",
                            op.local_addr
                        ),
                    )),
                );
                return Ok(());
            }
        },
    };
    h.op = OP_WRITE;
    let mut off = 0u64;
    let result = loop {
        let n = (len - off).min(PIECE as u64);
        let last = off + n == len;
        h.len = n as u32;
        h.addr = op.remote_addr.wrapping_add(off);
        h.flags = 0;
        if last {
            h.flags |= FLAG_LAST;
            if let Some(imm) = op.imm {
                h.flags |= FLAG_IMM;
                h.imm = imm;
            }
        }
        let ptr = local.as_ref().map_or(std::ptr::null(), |l| {
            l.ptr().cast_const().wrapping_add(off as usize)
        });
        // SAFETY: `ptr..ptr+n` lies inside the lease, which keeps the memory registered.
        if let Err(e) = unsafe { send_message(&lane.socket, &h.encode(), ptr, n as usize) } {
            break Err(e);
        }
        off += n;
        if last {
            break Ok(());
        }
    };
    drop(local);
    let sent = result.is_ok();
    lane.release(seq, |p| {
        p.sent = sent;
        sent && p.acked
    });
    result
}

fn send_response(lane: &RmaLane, r: Response) -> io::Result<()> {
    let (header, lease) = match r {
        Response::Ack(seq) => (
            Header {
                op: OP_ACK,
                seq,
                ..Header::default()
            },
            None,
        ),
        Response::Refuse(seq, why) => (refusal(seq, why), None),
        Response::Serve {
            seq,
            addr,
            key,
            len,
            sent,
        } => {
            let n = (len - sent).min(PIECE as u64);
            let last = sent + n == len;
            let lease = match (n, addr.checked_add(sent)) {
                (0, _) => Ok(None),
                (_, None) => Err(Refusal::OutOfRange),
                (_, Some(at)) => lane.domain.lease(key, at, n, &lane.socket).map(Some),
            };
            match lease {
                Err(why) => (refusal(seq, why), None),
                Ok(lease) => {
                    if !last {
                        // Back in the queue behind what waits, so answers interleave.
                        lock(&lane.state).responses.push_back(Response::Serve {
                            seq,
                            addr,
                            key,
                            len,
                            sent: sent + n,
                        });
                    }
                    let h = Header {
                        op: OP_READ_DATA,
                        flags: if last { FLAG_LAST } else { 0 },
                        len: n as u32,
                        seq,
                        addr: sent,
                        ..Header::default()
                    };
                    (h, lease)
                }
            }
        }
    };
    let (ptr, len) = lease
        .as_ref()
        .map_or((std::ptr::null(), 0), |l| (l.ptr().cast_const(), l.len()));
    // SAFETY: the lease keeps `ptr..ptr+len` registered until it is dropped, after the call.
    let result = unsafe { send_message(&lane.socket, &header.encode(), ptr, len) };
    drop(lease);
    result
}

fn refusal(seq: u64, why: Refusal) -> Header {
    Header {
        op: OP_REFUSE,
        seq,
        len: why.code(),
        ..Header::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Reader

fn read_loop(lane: &RmaLane) {
    let mut reader = Reader {
        lane,
        scratch: Vec::new(),
        refused: None,
    };
    loop {
        let mut b = [0u8; HEADER_LEN];
        // SAFETY: `b` is a local array of `HEADER_LEN` bytes.
        match unsafe { recv_exact(&lane.socket, b.as_mut_ptr(), HEADER_LEN, true) } {
            Ok(true) => {}
            Ok(false) => {
                lane.end(
                    false,
                    io::ErrorKind::ConnectionReset,
                    "the peer closed the tcp connection".into(),
                );
                return;
            }
            Err(e) => {
                lane.end(true, e.kind(), format!("tcp one-sided lane: {e}"));
                return;
            }
        }
        let result = match Header::decode(&b) {
            Ok(h) => reader.on_message(h),
            Err(why) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed one-sided message from the peer: {why}"),
            )),
        };
        if let Err(e) = result {
            lane.end(true, e.kind(), format!("tcp one-sided lane: {e}"));
            return;
        }
    }
}

struct Reader<'a> {
    lane: &'a RmaLane,
    /// Where the bytes of a refused write go.
    scratch: Vec<u8>,
    /// The last write refused: its later pieces are refused too.
    refused: Option<u64>,
}

impl Reader<'_> {
    fn on_message(&mut self, h: Header) -> io::Result<()> {
        match h.op {
            OP_WRITE => self.on_write(h),
            OP_READ => self.lane.respond(Response::Serve {
                seq: h.seq,
                addr: h.addr,
                key: h.key,
                len: u64::from(h.len),
                sent: 0,
            }),
            OP_READ_DATA => self.on_read_data(h),
            OP_ACK => self.on_ack(h.seq),
            _ => Err(self.on_refusal(h)),
        }
    }

    fn on_write(&mut self, h: Header) -> io::Result<()> {
        let lane = self.lane;
        let lease = match h.len {
            _ if self.refused == Some(h.seq) => Err(None),
            0 => Ok(None),
            n => lane
                .domain
                .lease(h.key, h.addr, u64::from(n), &lane.socket)
                .map(Some)
                .map_err(Some),
        };
        match lease {
            Ok(lease) => {
                if let Some(l) = &lease {
                    // SAFETY: the lease keeps `ptr..ptr+len` registered during the call.
                    unsafe { recv_exact(&lane.socket, l.ptr(), l.len(), false) }?;
                }
                drop(lease);
                if h.last() {
                    if h.flags & FLAG_IMM != 0 {
                        lane.deliver_immediate(h.imm);
                    }
                    lane.respond(Response::Ack(h.seq))?;
                }
                Ok(())
            }
            Err(why) => {
                self.scratch.resize(h.len as usize, 0);
                // SAFETY: `scratch` holds `len` bytes.
                unsafe {
                    recv_exact(
                        &lane.socket,
                        self.scratch.as_mut_ptr(),
                        h.len as usize,
                        false,
                    )
                }?;
                if let Some(why) = why {
                    self.refused = Some(h.seq);
                    lane.respond(Response::Refuse(h.seq, why))?;
                }
                Ok(())
            }
        }
    }

    fn on_read_data(&mut self, h: Header) -> io::Result<()> {
        let lane = self.lane;
        let unexpected = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("one-sided read data for request {}: {why}", h.seq),
            )
        };
        let (key, addr, last) = {
            let mut st = lock(&lane.state);
            let Some(p) = st.ops.get_mut(&h.seq) else {
                return Err(unexpected("no such read in flight"));
            };
            if p.op.kind != OneSidedKind::Read || !p.taken || p.busy {
                return Err(unexpected("no such read in flight"));
            }
            let end = p.received + u64::from(h.len);
            if h.addr != p.received || end > u64::from(p.op.len) {
                return Err(unexpected("out of order or past the read's end"));
            }
            let last = end == u64::from(p.op.len);
            if last != h.last() {
                return Err(unexpected("the last piece does not end the read"));
            }
            p.busy = true;
            (
                p.op.local_key,
                p.op.local_addr.wrapping_add(p.received),
                last,
            )
        };
        let result = match h.len {
            0 => Ok(()),
            n => match lane.domain.lease(key, addr, u64::from(n), &lane.socket) {
                // SAFETY: the lease keeps `ptr..ptr+len` registered during the call.
                Ok(l) => unsafe { recv_exact(&lane.socket, l.ptr(), l.len(), false) }.map(drop),
                Err(r) => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("one-sided read into local memory {addr:#x}: {r}"),
                )),
            },
        };
        match result {
            Ok(()) => {
                lane.release(h.seq, |p| {
                    p.received += u64::from(h.len);
                    last
                });
                Ok(())
            }
            Err(e) => {
                let text = e.to_string();
                lane.release(h.seq, |_| false);
                lane.complete(h.seq, Err(io::Error::new(e.kind(), text)));
                Err(e)
            }
        }
    }

    fn on_ack(&mut self, seq: u64) -> io::Result<()> {
        let lane = self.lane;
        let finished = {
            let mut st = lock(&lane.state);
            match st.ops.get_mut(&seq) {
                Some(p) if p.op.kind == OneSidedKind::Write && p.taken => {
                    if p.busy {
                        // The writer completes it when it lets go of the memory.
                        p.acked = true;
                        false
                    } else {
                        true
                    }
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("one-sided ack for request {seq}, no such write in flight"),
                    ))
                }
            }
        };
        if finished {
            lane.complete(seq, Ok(()));
        }
        Ok(())
    }

    /// The peer refused one of this side's operations: fails it, and the lane.
    fn on_refusal(&mut self, h: Header) -> io::Error {
        let lane = self.lane;
        let why = Refusal::from_code(h.len)
            .map_or_else(|| format!("reason {}", h.len), |r| r.to_string());
        let what = lock(&lane.state).ops.get(&h.seq).map(|p| p.op);
        let text = match what {
            Some(op) => format!(
                "the peer refused a one-sided {} of {} bytes at {:#x} (key {:#x}): {why}",
                if op.kind == OneSidedKind::Write {
                    "write"
                } else {
                    "read"
                },
                op.len,
                op.remote_addr,
                op.remote_key
            ),
            None => format!("the peer refused one-sided request {}: {why}", h.seq),
        };
        let busy = lock(&lane.state).ops.get(&h.seq).is_some_and(|p| p.busy);
        if what.is_some() && !busy {
            lane.complete(
                h.seq,
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    text.clone(),
                )),
            );
        }
        io::Error::new(io::ErrorKind::PermissionDenied, text)
    }
}

// ---------------------------------------------------------------------------------------------
// The connection's halves

/// Ends the lane when the last half of the connection is dropped.
struct Owner(Arc<RmaLane>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Wraps a connection's halves so that its sink offers the lane's one-sided operations and its
/// stream reports the lane's faults.
pub(crate) fn attach(
    sink: Box<dyn FrameSink>,
    stream: Box<dyn FrameStream>,
    lane: Arc<RmaLane>,
) -> (Box<dyn FrameSink>, Box<dyn FrameStream>) {
    let owner = Arc::new(Owner(lane.clone()));
    (
        Box::new(RmaSink {
            inner: sink,
            lane: lane.clone(),
            _owner: owner.clone(),
        }),
        Box::new(RmaStream {
            inner: stream,
            lane,
            _owner: owner,
        }),
    )
}

struct RmaSink {
    inner: Box<dyn FrameSink>,
    lane: Arc<RmaLane>,
    _owner: Arc<Owner>,
}

impl FrameSink for RmaSink {
    fn push(&mut self, frame: OutFrame) {
        self.inner.push(frame);
    }

    fn queued_bytes(&self) -> usize {
        self.inner.queued_bytes()
    }

    fn queued_bytes_in(&self, lane: Lane) -> usize {
        self.inner.queued_bytes_in(lane)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_close(cx)
    }

    fn one_sided(&self) -> Option<Arc<dyn OneSided>> {
        Some(self.lane.clone())
    }
}

struct RmaStream {
    inner: Box<dyn FrameStream>,
    lane: Arc<RmaLane>,
    _owner: Arc<Owner>,
}

impl FrameStream for RmaStream {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        if let Poll::Ready(e) = self.lane.poll_fault(cx) {
            return Poll::Ready(Err(e));
        }
        self.inner.poll_recv(cx, out)
    }
}
