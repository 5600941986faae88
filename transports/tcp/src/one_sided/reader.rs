//! The one-sided lane's reader thread: lands the peer's writes, queues the answers to its
//! requests, and completes this side's operations as their answers come.

use std::io;

use agentfabric::sync::lock;
use agentfabric::transport::OneSidedKind;

use super::lane::{OneSidedLane, Response, MAX_OUTSTANDING};
use super::wire::{
    recv_exact, Header, FLAG_IMM, HEADER_LEN, OP_ACK, OP_READ, OP_READ_DATA, OP_WRITE,
};
use super::writer;
use crate::memory::Refusal;

pub(super) fn read_loop(lane: &OneSidedLane) {
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
    lane: &'a OneSidedLane,
    /// Where the bytes of a refused write go.
    scratch: Vec<u8>,
    /// The last write refused: its later pieces are refused too.
    refused: Option<u64>,
}

impl Reader<'_> {
    /// Queues an answer to the peer.
    fn respond(&self, r: Response) -> io::Result<()> {
        let lane = self.lane;
        let mut st = lock(&lane.state);
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
        writer::ensure_started(lane, &mut st)?;
        drop(st);
        lane.work.notify_one();
        Ok(())
    }

    fn on_message(&mut self, h: Header) -> io::Result<()> {
        match h.op {
            OP_WRITE => self.on_write(h),
            OP_READ => self.respond(Response::Serve {
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
                    self.respond(Response::Ack(h.seq))?;
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
                    self.respond(Response::Refuse(h.seq, why))?;
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
        // The operation and whether a thread still uses its memory (then that thread fails it).
        let what = lock(&lane.state).ops.get(&h.seq).map(|p| (p.op, p.busy));
        let text = match what {
            Some((op, _)) => format!(
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
        if let Some((_, false)) = what {
            let e = io::Error::new(io::ErrorKind::PermissionDenied, text.clone());
            lane.complete(h.seq, Err(e));
        }
        io::Error::new(io::ErrorKind::PermissionDenied, text)
    }
}
