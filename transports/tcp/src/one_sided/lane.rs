//! The one-sided lane's shared state: the operations posted and how far they got, the answers
//! owed to the peer, and how the lane ends. The reader and writer threads, the connection's
//! halves and the lane's entry points (the parent module) all work on it; it starts no thread,
//! so it depends on none of them.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use agentfabric::sync::lock;
use agentfabric::transport::{Immediates, OneSidedDone, OneSidedOp, RecvError, ThreadPriority};

use crate::memory::{Refusal, TcpDomain};

/// Most operations a requester has on the wire (sent, not yet answered); also the most a
/// requester may have outstanding at its peer before the peer fails the connection.
pub(crate) const MAX_OUTSTANDING: usize = 256;

/// Immediates kept for a handler not yet installed
/// ([`OneSided::on_immediate`](agentfabric::transport::OneSided::on_immediate)); later ones are
/// dropped with a warning.
pub(super) const EARLY_IMMEDIATES: usize = 1024;

/// Why the lane ended, kept for the operations posted later and for the stream.
#[derive(Clone)]
pub(super) struct Ended {
    /// A fault (refusal, malformed message, I/O error) rather than the connection's end: the
    /// connection's stream reports it.
    fault: bool,
    kind: io::ErrorKind,
    text: String,
}

impl Ended {
    pub(super) fn error(&self) -> io::Error {
        io::Error::new(self.kind, self.text.clone())
    }
}

/// A posted operation, until it completes.
pub(super) struct Pending {
    pub(super) op: OneSidedOp,
    pub(super) done: Option<OneSidedDone>,
    /// The writer took it: answers for it are expected (an answer for an operation not yet
    /// sent is a protocol error, never a completion).
    pub(super) taken: bool,
    /// A thread is moving its bytes: only that thread may complete it (the memory is in use).
    pub(super) busy: bool,
    /// The target acknowledged a write while its writer was still marking it sent.
    pub(super) acked: bool,
    /// Bytes of a read's answer received so far.
    pub(super) received: u64,
}

/// Something the writer sends in answer to the peer.
pub(super) enum Response {
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
pub(super) struct LaneState {
    /// Posted operations not yet taken by the writer, in post order.
    pub(super) requests: VecDeque<u64>,
    /// Answers to the peer, sent before new requests.
    pub(super) responses: VecDeque<Response>,
    pub(super) ops: HashMap<u64, Pending>,
    pub(super) next_seq: u64,
    /// Operations taken by the writer and not yet completed.
    pub(super) on_wire: usize,
    pub(super) ended: Option<Ended>,
    pub(super) writer_started: bool,
    /// The connection's stream, waiting to hear of a fault.
    stream_waker: Option<Waker>,
}

/// A connection's one-sided lane (see the module docs).
pub(crate) struct OneSidedLane {
    pub(super) me: Weak<OneSidedLane>,
    pub(super) socket: Arc<TcpStream>,
    pub(super) domain: Arc<TcpDomain>,
    pub(super) priority: ThreadPriority,
    pub(super) state: Mutex<LaneState>,
    /// Wakes the writer.
    pub(super) work: Condvar,
    pub(super) imm: Mutex<Immediates>,
}

impl OneSidedLane {
    /// The lane's state on `socket` (in blocking mode), with no thread started yet.
    pub(super) fn new(
        socket: TcpStream,
        domain: Arc<TcpDomain>,
        priority: ThreadPriority,
    ) -> Arc<OneSidedLane> {
        Arc::new_cyclic(|me| OneSidedLane {
            me: me.clone(),
            socket: Arc::new(socket),
            domain,
            priority,
            state: Mutex::default(),
            work: Condvar::new(),
            imm: Mutex::new(Immediates::new(EARLY_IMMEDIATES)),
        })
    }

    /// Ends the lane (once): fails the operations no thread is using, stops both threads and
    /// tells the peer. A `fault` is also reported by the connection's stream.
    pub(super) fn end(&self, fault: bool, kind: io::ErrorKind, text: String) {
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
    pub(super) fn close(&self) {
        self.end(
            false,
            io::ErrorKind::ConnectionAborted,
            "the tcp connection was closed".into(),
        );
    }

    /// `Ready` with the fault that ended the lane; `Pending` (waker registered) otherwise.
    pub(super) fn poll_fault(&self, cx: &Context<'_>) -> Poll<RecvError> {
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

    /// Completes operation `seq` with `result` (taking it out of the table), if it is there.
    pub(super) fn complete(&self, seq: u64, result: io::Result<()>) {
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
    pub(super) fn release(&self, seq: u64, update: impl FnOnce(&mut Pending) -> bool) {
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

    pub(super) fn deliver_immediate(&self, value: u32) {
        if !lock(&self.imm).deliver(value) {
            tracing::warn!(
                value,
                "tcp one-sided lane: immediate dropped (no handler, {EARLY_IMMEDIATES} kept)"
            );
        }
    }
}
