//! The connection's halves with the one-sided lane attached: the sink offers its operations,
//! the stream reports its faults, and the lane ends when both halves are gone.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use agentfabric::frame::{Frame, Lane, OutFrame};
use agentfabric::transport::{FrameSink, FrameStream, OneSided, RecvError};

use super::RmaLane;

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
