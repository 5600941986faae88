//! One socket's receiving framer: one read buffer cut into zero-copy frames. It knows nothing of
//! lanes: the dispatcher (`lanes.rs`) gives each lane one, read from the runtime or by the lane's
//! thread (`lane_thread.rs`), both above this file.

use std::cmp;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use agentfabric::frame::{self, Frame, FrameError, HEADER_LEN};
use agentfabric::transport::{FrameStream, RecvError};
use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

/// The receiving half of one TCP connection, i.e. of one lane (generic over the reader for
/// tests).
pub(crate) struct TcpFrameStream<R> {
    io: R,
    /// Bytes received and not yet delivered as frames (always a prefix of a frame's bytes).
    pub(crate) buf: BytesMut,
    /// Usual read size: reserved when the buffer runs low.
    read_size: usize,
    /// The remote end closed its direction: no more reads.
    eof: bool,
}

impl<R> TcpFrameStream<R> {
    pub(crate) fn new(io: R, read_size: usize) -> Self {
        TcpFrameStream {
            io,
            buf: BytesMut::with_capacity(read_size),
            read_size,
            eof: false,
        }
    }

    /// Cuts every whole frame at the front of the buffer into `out`. Returns the length of the
    /// next, incomplete frame if its header is complete (validated), or `HEADER_LEN` otherwise.
    fn cut_frames(&mut self, out: &mut Vec<Frame>) -> Result<usize, FrameError> {
        frame::cut_frames(&mut self.buf, |b, n| b.split_to(n).freeze(), out)
    }

    fn eof_error(&self, need: usize) -> RecvError {
        let have = self.buf.len();
        let msg = if have < HEADER_LEN {
            format!(
                "tcp connection closed in the middle of a frame header ({have} of {HEADER_LEN} bytes received)"
            )
        } else {
            format!(
                "tcp connection closed in the middle of a frame ({have} of {need} bytes received)"
            )
        };
        RecvError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, msg))
    }
}

impl<R: AsyncRead + Unpin> TcpFrameStream<R> {
    /// Reads once into the spare capacity of `buf`; returns the number of bytes read (0 at EOF).
    fn poll_read_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let spare = self.buf.spare_capacity_mut();
        debug_assert!(!spare.is_empty());
        let start = spare.as_ptr();
        let mut read_buf = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read_buf))?;
        let filled = read_buf.filled();
        let n = filled.len();
        // The reader cannot swap the buffer out (it only gets `&mut ReadBuf`), but check anyway:
        // the `set_len` below relies on these bytes being the ones at the end of `buf`.
        assert_eq!(
            filled.as_ptr(),
            start.cast::<u8>(),
            "reader replaced the read buffer"
        );
        // SAFETY: `ReadBuf` guarantees its first `n` bytes are initialized, and they are the first
        // `n` bytes of `buf`'s spare capacity (checked above), so `len + n` bytes are initialized.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Poll::Ready(Ok(n))
    }
}

impl<R: AsyncRead + Unpin> TcpFrameStream<R> {
    /// One step of receiving: delivers the whole frames already buffered, or else reads once.
    /// `Ready(Ok(()))` means progress (frames added to `out`, or bytes read that may complete a
    /// frame on the next step); `Pending` means the reader is waiting (its waker registered).
    pub(crate) fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        let before = out.len();
        let need = match self.cut_frames(out) {
            Ok(need) => need,
            // Frames cut before the bad one are delivered first; the error (whose bytes are
            // still at the front of the buffer) is reported on the next call.
            Err(_) if out.len() > before => return Poll::Ready(Ok(())),
            Err(e) => return Poll::Ready(Err(RecvError::Frame(e))),
        };
        if out.len() > before {
            return Poll::Ready(Ok(()));
        }
        if self.eof {
            return Poll::Ready(Err(if self.buf.is_empty() {
                RecvError::Eof
            } else {
                self.eof_error(need)
            }));
        }
        // Make room: the rest of the pending frame at least (its header is validated, so
        // `need` is bounded by HEADER_LEN + MAX_FRAME_PAYLOAD), and a good read's worth when
        // the spare space runs low. When the delivered frames have been dropped this reuses
        // the buffer; otherwise it allocates a new one (once per buffer, not per frame).
        let spare = self.buf.capacity() - self.buf.len();
        let rest_of_frame = need - self.buf.len();
        if spare < cmp::max(rest_of_frame, self.read_size / 8) {
            self.buf.reserve(cmp::max(rest_of_frame, self.read_size));
        }
        match ready!(self.poll_read_buf(cx)) {
            Ok(0) => self.eof = true,
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(RecvError::Io(e))),
        }
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Unpin + Send> FrameStream for TcpFrameStream<R> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        let before = out.len();
        loop {
            ready!(self.poll_step(cx, out))?;
            if out.len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}
