//! The transport trait: move frames between two nodes. Small on purpose.
//!
//! A transport knows nothing of channels, priorities, credits or sessions: it carries the frames
//! the session hands it, in the order handed, and reports what arrives. Reliability is optional
//! ([`Transport::reliable`]): the session retransmits on transports that may lose frames.
//!
//! The data path is poll-based (no boxed future per call) so that a steady stream of messages
//! costs no allocation; only connection set-up returns boxed futures.
//!
//! This file holds the frame interface: [`Transport`], [`Listener`], [`Connection`] and its
//! halves [`FrameSink`] and [`FrameStream`] (with [`OneSidedSink`], the sending half that
//! attaches one-sided operations to a connection), [`RecvError`] and [`split_url`].
//! `one_sided.rs` holds the vocabulary of one-sided operations between registered memory
//! (RDMA): [`MemoryDomain`], [`MemoryRegistration`], [`RailKeys`], [`OneSidedOp`], [`OneSided`],
//! [`Immediates`]…; everything of it is re-exported here, so every `agentfabric::transport::X`
//! path is the same as before the split.
//!
//! Imports: `crate::frame` (the frames carried) and `crate::thread_priority`; `one_sided.rs`
//! imports nothing from this file (the frame interface depends on it, not the reverse).

mod one_sided;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::frame::{Frame, FrameError, Lane, OutFrame};

pub use crate::thread_priority::ThreadPriority;
pub use one_sided::{
    ImmediateHandler, Immediates, MemoryDomain, MemoryRegistration, OneSided, OneSidedDone,
    OneSidedKind, OneSidedOp, RailKeys, MAX_RAILS,
};

/// A boxed, sendable future (used only on connection set-up).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A way to reach peers: TCP, QUIC, verbs, in-process...
pub trait Transport: Send + Sync + 'static {
    /// URL scheme that selects this transport, e.g. `"tcp"` for `tcp://127.0.0.1:7000`.
    fn scheme(&self) -> &'static str;

    /// Whether frames handed to a connection arrive complete, in order, and exactly once while
    /// the connection lives (TCP, QUIC streams, verbs RC). When `false`, the session retransmits
    /// on timeout and reorders what arrives.
    fn reliable(&self) -> bool {
        true
    }

    /// Largest frame payload this transport carries (e.g. a verbs transport's receive buffer
    /// size less the header). Sessions on it cut messages into chunks no larger than this.
    fn max_frame_payload(&self) -> usize {
        crate::frame::MAX_FRAME_PAYLOAD
    }

    /// Connects to `addr` (the part after `scheme://`).
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Connection>>;

    /// Listens on `addr` (the part after `scheme://`).
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>>;

    /// Where this transport's hardware reaches memory directly (an RDMA device's protection
    /// domain), for one-sided transfers between registered regions; `None` (the default) for
    /// transports that move bytes through the session.
    fn memory_domain(&self) -> Option<Arc<dyn MemoryDomain>> {
        None
    }
}

/// Accepts incoming connections.
pub trait Listener: Send {
    /// The full address peers connect to, with its scheme (e.g. `tcp://127.0.0.1:41234`).
    fn local_addr(&self) -> String;

    /// Waits for the next connection.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Connection>>;
}

/// One transport connection, split in its two directions.
pub struct Connection {
    /// Sends frames.
    pub sink: Box<dyn FrameSink>,
    /// Receives frames.
    pub stream: Box<dyn FrameStream>,
    /// A printable name of the remote end (address).
    pub remote: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// The sending half of a connection.
pub trait FrameSink: Send {
    /// Queues a frame. Never blocks: the caller bounds what it queues with [`queued_bytes`]
    /// (the session's congestion window bounds it further).
    ///
    /// [`queued_bytes`]: FrameSink::queued_bytes
    fn push(&mut self, frame: OutFrame);

    /// Bytes queued and not yet handed to the network.
    fn queued_bytes(&self) -> usize;

    /// Bytes queued on one lane (see [`Lane`]). A transport with a single lane need not
    /// implement it: everything then counts as the latency lane.
    fn queued_bytes_in(&self, lane: Lane) -> usize {
        match lane {
            Lane::Latency => self.queued_bytes(),
            Lane::Bulk => 0,
        }
    }

    /// Writes queued frames. `Ready(Ok(()))` once everything queued has been handed to the
    /// network (batched: one vectored write for many frames where the transport allows).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Flushes and closes the sending direction.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// One-sided operations on this connection, when the transport has them (RDMA). The handle
    /// does not keep the connection alive: once it is gone, posts fail.
    fn one_sided(&self) -> Option<Arc<dyn OneSided>> {
        None
    }
}

/// A sending half that forwards every frame to another and offers one-sided operations beside
/// them: how a transport whose one-sided operations move outside its frame path (tcp's
/// one-sided lane, a test's stand-in) attaches them to a connection.
pub struct OneSidedSink {
    inner: Box<dyn FrameSink>,
    ops: Arc<dyn OneSided>,
    /// Whatever must live as long as this half (e.g. what closes the operations once both halves
    /// of the connection are gone).
    _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl OneSidedSink {
    /// `inner` with `ops` as its one-sided operations; `keep` is dropped with the sink.
    pub fn new(
        inner: Box<dyn FrameSink>,
        ops: Arc<dyn OneSided>,
        keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> OneSidedSink {
        OneSidedSink {
            inner,
            ops,
            _keep: keep,
        }
    }
}

impl FrameSink for OneSidedSink {
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
        Some(self.ops.clone())
    }
}

/// The receiving half of a connection.
pub trait FrameStream: Send {
    /// Receives the frames that are ready into `out`: `Ready(Ok(()))` adds at least one.
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>>;
}

/// Why a connection stopped delivering frames.
#[derive(Debug)]
pub enum RecvError {
    /// The remote end closed the connection cleanly.
    Eof,
    /// An I/O error.
    Io(io::Error),
    /// The bytes received are not a valid frame; the connection cannot be trusted further.
    Frame(FrameError),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Eof => f.write_str("connection closed by the remote end"),
            RecvError::Io(e) => write!(f, "i/o error: {e}"),
            RecvError::Frame(e) => write!(f, "malformed frame: {e}"),
        }
    }
}

impl std::error::Error for RecvError {}

/// Splits `scheme://rest` into its two parts.
pub fn split_url(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    (!scheme.is_empty()).then_some((scheme, rest))
}
