//! The connection's halves with the one-sided lane attached: the sink offers its operations,
//! the stream reports its faults, and the lane ends when both halves are gone.

use std::sync::Arc;
use std::task::{Context, Poll};

use agentfabric::frame::Frame;
use agentfabric::transport::{FrameSink, FrameStream, OneSidedSink, RecvError};

use super::lane::OneSidedLane;

/// Ends the lane when the last half of the connection is dropped.
struct Owner(Arc<OneSidedLane>);

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
    lane: Arc<OneSidedLane>,
) -> (Box<dyn FrameSink>, Box<dyn FrameStream>) {
    let owner = Arc::new(Owner(lane.clone()));
    (
        Box::new(OneSidedSink::new(sink, lane.clone(), Some(owner.clone()))),
        Box::new(OneSidedStream {
            inner: stream,
            lane,
            _owner: owner,
        }),
    )
}

struct OneSidedStream {
    inner: Box<dyn FrameStream>,
    lane: Arc<OneSidedLane>,
    _owner: Arc<Owner>,
}

impl FrameStream for OneSidedStream {
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
