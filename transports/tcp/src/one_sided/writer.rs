//! The one-sided lane's writer thread: answers to the peer first, then this side's operations
//! (at most [`MAX_OUTSTANDING`] on the wire), a piece per `send`.

use std::io;

use agentfabric::sync::{lock, wait};
use agentfabric::transport::{OneSidedKind, OneSidedOp};

use super::lane::{LaneState, OneSidedLane, Response, MAX_OUTSTANDING};
use super::wire::{
    send_message, Header, FLAG_IMM, FLAG_LAST, OP_ACK, OP_READ, OP_READ_DATA, OP_REFUSE, OP_WRITE,
    PIECE,
};
use crate::memory::Refusal;
use crate::threads::spawn;

enum Job {
    Respond(Response),
    Request(u64, OneSidedOp),
}

/// Starts the writer thread if it is not running. Called under the state's lock.
pub(super) fn ensure_started(lane: &OneSidedLane, st: &mut LaneState) -> io::Result<()> {
    if st.writer_started {
        return Ok(());
    }
    let shared = lane.me.upgrade().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotConnected,
            "the tcp one-sided lane is gone",
        )
    })?;
    spawn("af-tcp-rma-tx", lane.priority, move || write_loop(&shared))?;
    st.writer_started = true;
    Ok(())
}

fn write_loop(lane: &OneSidedLane) {
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
                st = wait(&lane.work, st);
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

fn send_request(lane: &OneSidedLane, seq: u64, op: OneSidedOp) -> io::Result<()> {
    let mut h = Header {
        seq,
        key: op.remote_key,
        len: op.len,
        addr: op.remote_addr,
        ..Header::default()
    };
    if op.kind == OneSidedKind::Read {
        h.op = OP_READ;
        // Nothing to release: a read's memory is the reader thread's, which may already be
        // receiving the answer (and marked the read busy).
        // SAFETY: no payload.
        return unsafe { send_message(&lane.socket, &h.encode(), std::ptr::null(), 0) };
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
    lane.release(seq, |p| sent && p.acked);
    result
}

fn send_response(lane: &OneSidedLane, r: Response) -> io::Result<()> {
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
