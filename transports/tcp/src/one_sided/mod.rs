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
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use agentfabric::sync::lock;
use agentfabric::transport::{
    ImmediateHandler, Immediates, OneSided, OneSidedDone, OneSidedKind, OneSidedOp, RecvError,
    ThreadPriority,
};

use crate::memory::{Refusal, TcpDomain};
use crate::threads::spawn;

mod halves;
mod reader;
mod wire;
mod writer;

pub(crate) use halves::attach;
#[cfg(test)]
pub(crate) use wire::Header;

/// Most payload bytes in one message: one piece of a write or of a read's answer. Each is one
/// `send` (with its header) and one `recv` (`MSG_WAITALL`), and one lease of the registered
/// memory. Large on purpose: on loopback the cost is in the system calls and the wake-ups
/// between them. Measured (`agentfabric bench --transport tcp --workload bulk`, 1 MiB blocks,
/// 2 cores, fabric and baseline phases one after the other): with 128 KiB sends (the bulk lane's
/// `WRITE_MAX`) 2.8–3.1 GB/s, 0.61–0.68 of raw streaming, with 100,000 context switches a
/// second; with 1 MiB pieces 3.9–4.9 GB/s, 0.98–1.27, with less than half the switches. The bulk lane keeps its smaller writes for the
/// latency of coordination on a non-preemptive kernel; here `mixed --bulk-api transfer` measured
/// a loaded/idle p99 of 1.02–1.46 with 1 MiB pieces.
pub(crate) const PIECE: usize = 1 << 20;

/// Most operations a requester has on the wire (sent, not yet answered); also the most a
/// requester may have outstanding at its peer before the peer fails the connection.
pub(crate) const MAX_OUTSTANDING: usize = 256;

/// Immediates kept for a handler not yet installed ([`OneSided::on_immediate`]); later ones are
/// dropped with a warning.
pub(crate) const EARLY_IMMEDIATES: usize = 1024;

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

/// A connection's one-sided lane (see the module docs).
pub(crate) struct OneSidedLane {
    me: Weak<OneSidedLane>,
    socket: Arc<TcpStream>,
    domain: Arc<TcpDomain>,
    priority: ThreadPriority,
    state: Mutex<LaneState>,
    /// Wakes the writer.
    work: Condvar,
    imm: Mutex<Immediates>,
}

impl OneSidedLane {
    /// Runs the lane on `socket` (switched to blocking mode) with the reader thread started.
    pub(crate) fn start(
        socket: TcpStream,
        domain: Arc<TcpDomain>,
        priority: ThreadPriority,
    ) -> io::Result<Arc<OneSidedLane>> {
        socket.set_nonblocking(false)?;
        let lane = Arc::new_cyclic(|me| OneSidedLane {
            me: me.clone(),
            socket: Arc::new(socket),
            domain,
            priority,
            state: Mutex::default(),
            work: Condvar::new(),
            imm: Mutex::new(Immediates::new(EARLY_IMMEDIATES)),
        });
        let reader = lane.clone();
        // "rma" rather than "one-sided" in the thread names: Linux keeps 15 bytes of a name.
        spawn("af-tcp-rma-rx", priority, move || {
            reader::read_loop(&reader)
        })?;
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
        spawn("af-tcp-rma-tx", self.priority, move || {
            writer::write_loop(&lane)
        })?;
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
        if !lock(&self.imm).deliver(value) {
            tracing::warn!(
                value,
                "tcp one-sided lane: immediate dropped (no handler, {EARLY_IMMEDIATES} kept)"
            );
        }
    }
}

impl OneSided for OneSidedLane {
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
                acked: false,
                received: 0,
            },
        );
        st.requests.push_back(seq);
        drop(st);
        self.work.notify_one();
    }

    fn on_immediate(&self, handler: ImmediateHandler) {
        lock(&self.imm).install(handler);
    }
}
