//! Lanes: a connection's frames take one RC queue pair per [`Lane`] when both ends agree (the
//! default, [`crate::config::VerbsConfig::bulk_lane`]). This file holds the connection's two
//! halves over its lanes ([`connection`]): each frame goes to its lane's QP, and frames come
//! from both.
//!
//! A QP sends its work requests in order, so on one QP a coordination frame waits for every
//! bulk frame posted before it: up to `send_depth` of them, 2 MiB with the defaults. On a
//! software device that wait is long (Soft-RoCE ran 64 KiB SENDs at about 25 MB/s in the lab,
//! 2.6 ms each), and the posting itself runs the protocol inside `ibv_post_send`. With a lane
//! of its own, bulk data queues only behind bulk data: coordination frames never wait behind
//! it in a send queue, and a bulk lane on a software device is posted from a thread of its own
//! at a lower priority ([`crate::config::Posting`], `posting.rs`), off the runtime's workers.
//!
//! The bulk lane is a second frames QP like the first (its own CQ, completion channel, receive
//! buffers and credits), set up over the same side channel after the first (`establish.rs`),
//! and proved by a probe message each way like it. The connection is one: either lane's failure fails it, the
//! stream ends only when both lanes have ended cleanly, and closing closes both. Frames of one
//! channel always take the same lane, so per-channel order holds; the session tolerates any
//! interleaving between lanes.

use std::io;
use std::task::{Context, Poll};

use agentfabric::frame::{Frame, Lane, OutFrame};
use agentfabric::transport::{Connection, FrameSink, FrameStream, OneSided, RecvError};

use crate::datapath::Shared;

/// The connection over its lanes.
pub(crate) fn connection(latency: Shared, bulk: Option<Shared>, remote: String) -> Connection {
    Connection {
        sink: Box::new(LanedSink {
            latency: latency.clone(),
            bulk: bulk.clone(),
        }),
        stream: Box::new(LanedStream {
            latency,
            bulk,
            ended: [false; Lane::COUNT],
        }),
        remote,
    }
}

/// The sending half: each frame goes to its lane's QP.
struct LanedSink {
    latency: Shared,
    bulk: Option<Shared>,
}

impl LanedSink {
    fn lane(&self, lane: Lane) -> Option<&Shared> {
        match lane {
            Lane::Latency => Some(&self.latency),
            Lane::Bulk => self.bulk.as_ref(),
        }
    }

    /// Writes (or closes) both lanes: ready when both are.
    fn poll_both(&mut self, cx: &mut Context<'_>, close: bool) -> Poll<io::Result<()>> {
        let latency = self.latency.poll_write(cx, close)?;
        let bulk = match &self.bulk {
            Some(b) => b.poll_write(cx, close)?,
            None => Poll::Ready(()),
        };
        if latency.is_ready() && bulk.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

impl FrameSink for LanedSink {
    fn push(&mut self, frame: OutFrame) {
        match &self.bulk {
            Some(bulk) if frame.lane() == Lane::Bulk => bulk.push(frame),
            _ => self.latency.push(frame),
        }
    }

    fn queued_bytes(&self) -> usize {
        self.latency.queued() + self.bulk.as_ref().map_or(0, Shared::queued)
    }

    fn queued_bytes_in(&self, lane: Lane) -> usize {
        match (lane, &self.bulk) {
            (Lane::Latency, None) => self.queued_bytes(),
            (lane, _) => self.lane(lane).map_or(0, Shared::queued),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_both(cx, false)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_both(cx, true)
    }

    fn one_sided(&self) -> Option<std::sync::Arc<dyn OneSided>> {
        Some(self.latency.one_sided())
    }
}

/// The receiving half: frames from both lanes, as they come.
struct LanedStream {
    latency: Shared,
    bulk: Option<Shared>,
    /// Per lane, whether it ended cleanly (the peer's FIN and everything before it came).
    ended: [bool; Lane::COUNT],
}

impl FrameStream for LanedStream {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        let before = out.len();
        // A lane without its QP has ended as far as this end knows.
        self.ended[Lane::Bulk as usize] |= self.bulk.is_none();
        let lanes = [
            (Lane::Latency, Some(&self.latency)),
            (Lane::Bulk, self.bulk.as_ref()),
        ];
        for (lane, shared) in lanes {
            let Some(shared) = shared else {
                continue;
            };
            if self.ended[lane as usize] {
                continue;
            }
            match shared.poll_recv(cx, out) {
                Poll::Ready(Ok(())) | Poll::Pending => {}
                Poll::Ready(Err(RecvError::Eof)) => self.ended[lane as usize] = true,
                Poll::Ready(Err(e)) => {
                    // The other lane learns of it too, should anything still poll it.
                    let other = match lane {
                        Lane::Latency => self.bulk.as_ref(),
                        Lane::Bulk => Some(&self.latency),
                    };
                    if let Some(other) = other {
                        other.fail(io::ErrorKind::ConnectionAborted, format!("{e}"));
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
        if out.len() > before {
            return Poll::Ready(Ok(()));
        }
        if self.ended.iter().all(|&e| e) {
            return Poll::Ready(Err(RecvError::Eof));
        }
        // The latency lane ended cleanly and the bulk lane waits for its FIN: only the side
        // channel (the latency lane's) tells of the peer dying meanwhile. A clean close has
        // both FINs acknowledged before the peer drops it, so the bulk lane is looked at once
        // more first.
        if let (true, Some(bulk)) = (self.ended[Lane::Latency as usize], &self.bulk) {
            if self.latency.side_closed(cx) {
                match bulk.poll_recv(cx, out) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                    Poll::Ready(Err(RecvError::Eof)) => return Poll::Ready(Err(RecvError::Eof)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        let e = io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "the side channel closed before the bulk lane's close: the peer \
                             process died or dropped the connection",
                        );
                        bulk.fail(e.kind(), e.to_string());
                        return Poll::Ready(Err(RecvError::Io(e)));
                    }
                }
            }
        }
        Poll::Pending
    }
}
