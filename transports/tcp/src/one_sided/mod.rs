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
//! | 5 refuse | none | operation `seq` was refused; `len` holds the reason ([`Refusal`](crate::memory::Refusal)) |
//!
//! Operations are cut into pieces of at most [`PIECE`](wire::PIECE) bytes, so each access to
//! registered memory is short (deregistration waits for it: [`crate::memory`]). Each direction's
//! messages are written by one writer thread and read by one reader thread per connection, in
//! blocking mode at the bulk lane's priority, as the bulk lane's threads (see
//! [`crate::config::BulkLaneIo`]); the writer starts with the first message to send.
//!
//! **What it guarantees, as an RDMA queue pair.** A write completes (its `done` runs) once the
//! target acknowledged its last piece, so its bytes are in the target's memory. The target
//! hands a write's immediate to its handler once the write landed, after every earlier write
//! of the connection (one socket, read in order). Every access is checked on the side that owns
//! the memory: a key that names no live registration, or a range outside it, is refused; a
//! refused operation fails, and fails the connection (its stream reports the error, and the
//! session resumes on a new one), as an RDMA device moves the queue pair to its error state. A
//! malformed message, a piece of a read nobody asked for, or more than
//! [`MAX_OUTSTANDING`](lane::MAX_OUTSTANDING) operations from the peer at once fail the
//! connection too. A requester never puts more than [`MAX_OUTSTANDING`](lane::MAX_OUTSTANDING)
//! operations on the wire: the rest wait in its queue.
//!
//! The files, each using only those before it: `wire` (the messages and the system calls that
//! move them), `lane` (the state both threads and both halves share), `writer` and `reader` (the
//! threads; the reader starts the writer to answer the peer), `halves` (the connection's halves
//! with the lane attached), and this module (starting the lane, posting operations).

use std::io;
use std::net::TcpStream;
use std::sync::Arc;

use agentfabric::sync::lock;
use agentfabric::transport::{
    ImmediateHandler, OneSided, OneSidedDone, OneSidedKind, OneSidedOp, ThreadPriority,
};

use crate::memory::TcpDomain;
use crate::threads::spawn;

mod halves;
mod lane;
mod reader;
mod wire;
mod writer;

pub(crate) use halves::attach;
pub(crate) use lane::OneSidedLane;
use lane::Pending;
#[cfg(test)]
pub(crate) use lane::MAX_OUTSTANDING;
#[cfg(test)]
pub(crate) use wire::{Header, PIECE};

// The lane's entry points, above the files that make it up: starting it (its reader thread) and
// posting operations (which starts its writer thread).
impl OneSidedLane {
    /// Runs the lane on `socket` (switched to blocking mode) with the reader thread started.
    pub(crate) fn start(
        socket: TcpStream,
        domain: Arc<TcpDomain>,
        priority: ThreadPriority,
    ) -> io::Result<Arc<OneSidedLane>> {
        socket.set_nonblocking(false)?;
        let lane = OneSidedLane::new(socket, domain, priority);
        let reader = lane.clone();
        // "rma" rather than "one-sided" in the thread names: Linux keeps 15 bytes of a name.
        spawn("af-tcp-rma-rx", priority, move || {
            reader::read_loop(&reader)
        })?;
        Ok(lane)
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
        if let Err(e) = writer::ensure_started(self, &mut st) {
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
