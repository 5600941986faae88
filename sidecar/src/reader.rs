//! Reads frames from a client's socket, with the file descriptors that ride beside them
//! (`SCM_RIGHTS`, for `REGION_ADD`). One `recvmsg` fills the buffer with as many frames as the
//! socket holds, so a burst of small frames costs one system call.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use bytes::{Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::wire::{Header, WireError, HEADER_LEN};

/// File descriptors a client may have passed ahead of the frames that take them; more is a
/// protocol violation (a client cannot make the sidecar hold descriptors without bound).
const MAX_PENDING_FDS: usize = 4;

/// Bytes asked of the socket at a time when no larger frame is being read.
const READ_CHUNK: usize = 64 * 1024;

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed its end (or died).
    Eof,
    /// The socket failed.
    Io(io::Error),
    /// A header the protocol does not allow.
    Wire(WireError),
    /// The client passed descriptors that no frame took, or more than fit the control buffer.
    Fds(&'static str),
}

/// Frames from one client.
pub struct FrameReader {
    buf: BytesMut,
    fds: VecDeque<OwnedFd>,
    max_frame: u32,
}

impl FrameReader {
    /// A reader that accepts frames up to `max_frame` bytes (until [`FrameReader::set_max_frame`]).
    pub fn new(max_frame: u32) -> FrameReader {
        FrameReader {
            buf: BytesMut::with_capacity(READ_CHUNK),
            fds: VecDeque::new(),
            max_frame,
        }
    }

    /// The longest frame accepted from now on (after `HELLO_OK`).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// The oldest descriptor passed and not yet taken.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// The next frame: its header and its body (a slice of the read buffer, no copy).
    pub async fn next(&mut self, stream: &UnixStream) -> Result<(Header, Bytes), ReadError> {
        loop {
            if self.buf.len() >= HEADER_LEN {
                let head: &[u8; HEADER_LEN] = self.buf[..HEADER_LEN]
                    .try_into()
                    .expect("the slice has HEADER_LEN bytes");
                let h = Header::parse(head, self.max_frame).map_err(ReadError::Wire)?;
                let total = HEADER_LEN + h.body_len();
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    let body = frame.split_off(HEADER_LEN).freeze();
                    return Ok((h, body));
                }
                self.buf.reserve(total - self.buf.len());
            } else {
                self.buf.reserve(READ_CHUNK);
            }
            self.fill(stream).await?;
        }
    }

    /// One `recvmsg` into the buffer's spare capacity, waiting until the socket is readable.
    async fn fill(&mut self, stream: &UnixStream) -> Result<(), ReadError> {
        loop {
            stream.readable().await.map_err(ReadError::Io)?;
            match stream.try_io(Interest::READABLE, || self.recvmsg(stream)) {
                Ok(0) => return Err(ReadError::Eof),
                Ok(_) if self.fds.len() > MAX_PENDING_FDS => {
                    return Err(ReadError::Fds("more descriptors passed than frames took"))
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(ReadError::Fds(
                        "descriptors beyond what the protocol allows (truncated control data)",
                    ))
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    fn recvmsg(&mut self, stream: &UnixStream) -> io::Result<usize> {
        let spare = self.buf.spare_capacity_mut();
        let mut iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        };
        // Room for a few descriptors; a message with more is truncated (MSG_CTRUNC) and refused.
        let mut cmsg = [0u64; 8];
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        // SAFETY: the iovec points at the buffer's spare capacity, which recvmsg may fill; the
        // control buffer is ours and sized as msg_controllen says.
        let n = unsafe {
            libc::recvmsg(
                stream.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // Every descriptor the kernel installed is owned at once, so none leaks on any path.
        // SAFETY: CMSG_* walk the control buffer the kernel filled, within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        self.fds.push_back(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "control data truncated",
            ));
        }
        let n = n as usize;
        // SAFETY: recvmsg initialised the first n bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Ok(n)
    }
}
