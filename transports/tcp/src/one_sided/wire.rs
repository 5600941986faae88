//! The one-sided lane's messages: the header's encoding and validation, and the system calls
//! that move a message between a socket and memory.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::TcpStream;

use socket2::SockRef;

/// Most payload bytes in one message: one piece of a write or of a read's answer. Each is one
/// `send` (with its header) and one `recv` (`MSG_WAITALL`), and one lease of the registered
/// memory. Large on purpose: on loopback the cost is in the system calls and the wake-ups
/// between them. Measured (`agentfabric bench --transport tcp --workload bulk`, 1 MiB blocks,
/// 2 cores, fabric and baseline phases one after the other): with 128 KiB sends (the bulk lane's
/// `WRITE_MAX`) 2.8–3.1 GB/s, 0.61–0.68 of raw streaming, with 100,000 context switches a
/// second; with 1 MiB pieces 3.9–4.9 GB/s, 0.98–1.27, with less than half the switches. The
/// bulk lane keeps its smaller writes for the latency of coordination on a non-preemptive
/// kernel; here `mixed --bulk-api transfer` measured a loaded/idle p99 of 1.02–1.46 with 1 MiB
/// pieces.
pub(crate) const PIECE: usize = 1 << 20;

/// Length of a message header.
pub(super) const HEADER_LEN: usize = 32;

pub(super) const OP_WRITE: u8 = 1;
pub(super) const OP_READ: u8 = 2;
pub(super) const OP_READ_DATA: u8 = 3;
pub(super) const OP_ACK: u8 = 4;
pub(super) const OP_REFUSE: u8 = 5;

pub(super) const FLAG_LAST: u8 = 1;
pub(super) const FLAG_IMM: u8 = 2;

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

    pub(super) fn last(&self) -> bool {
        self.flags & FLAG_LAST != 0
    }
}

#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

/// Sends `header` then the `len` bytes at `payload`.
///
/// # Safety
///
/// `payload` must be valid for reads of `len` bytes for the duration of the call.
pub(super) unsafe fn send_message(
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
pub(super) unsafe fn recv_exact(
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
