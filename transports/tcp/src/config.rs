//! The transport's settings ([`TcpConfig`], [`BulkLaneIo`]) and its URL scheme, with the socket
//! options they set. Below everything that reads them: the transport, the listener and the
//! assembly of a connection.

use std::io;
use std::time::Duration;

use agentfabric::transport::ThreadPriority;
use socket2::{SockRef, Socket};

/// URL scheme of this transport: `tcp://host:port`.
pub const SCHEME: &str = "tcp";

/// Smallest read buffer used, whatever [`TcpConfig::read_buffer_size`] says.
pub const MIN_READ_BUFFER_SIZE: usize = 4 * 1024;

/// Settings of the TCP transport. [`Default`] gives the settings the benchmarks use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// Sets `TCP_NODELAY` (disables Nagle's algorithm). Default `true`: the fabric batches frames
    /// itself, and Nagle would only delay small coordination messages.
    pub nodelay: bool,
    /// `SO_SNDBUF` in bytes of both lanes, or `None` (the default) to keep the kernel's
    /// auto-tuned size.
    pub send_buffer_size: Option<usize>,
    /// `SO_RCVBUF` in bytes of both lanes, or `None` (the default) to keep the kernel's
    /// auto-tuned size. Set before `connect`/`listen` so the TCP window scale is negotiated
    /// accordingly.
    pub recv_buffer_size: Option<usize>,
    /// Bytes read from the socket per read call, at most; the receive buffer grows beyond it only
    /// to hold one whole large frame. Default 256 KiB; values below [`MIN_READ_BUFFER_SIZE`] are
    /// raised to it.
    pub read_buffer_size: usize,
    /// Longest time [`Transport::connect`](agentfabric::transport::Transport::connect) spends resolving the name and establishing the
    /// connection (both lanes, preambles written) before failing with
    /// [`io::ErrorKind::TimedOut`]. A listener gives an incoming socket as long to send its lane
    /// preamble, and a connection as long for its second lane to follow its first. Default 3 s.
    pub connect_timeout: Duration,
    /// Backlog of pending connections of a listening socket. Default 1024 (the kernel may cap it,
    /// e.g. at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Most incoming connections a listener keeps half-open (some lanes arrived, not all); the
    /// oldest is closed when one more arrives. Also the most sockets waiting for their lane
    /// preamble at once (further ones are closed at once). Default 1024; 0 counts as 1.
    pub max_half_open: usize,
    /// `SO_SNDBUF` of the bulk lane only, in bytes, overriding [`TcpConfig::send_buffer_size`]
    /// there; `None` keeps that setting.
    pub bulk_send_buffer_size: Option<usize>,
    /// Where the bulk lane's system calls run. Default
    /// [`BulkLaneIo::Threads`]`(`[`ThreadPriority::Nice`]`(10))`: see [`BulkLaneIo`].
    pub bulk_lane_io: BulkLaneIo,
}

/// Where the bulk lane's reads and writes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkLaneIo {
    /// On the async runtime's workers, like the latency lane's: no thread of its own, and a
    /// worker busy copying bulk bytes delays the coordination messages queued behind it.
    Runtime,
    /// On two threads per connection (one per direction; the writer starts with the first bulk
    /// frame) at the given priority, so that the kernel, not the runtime's queue order, decides
    /// who gets the CPU when bulk saturates it: see [crate docs](crate#bulk-lane-threads).
    Threads(ThreadPriority),
}

impl Default for BulkLaneIo {
    fn default() -> Self {
        BulkLaneIo::Threads(ThreadPriority::Nice(10))
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            nodelay: true,
            send_buffer_size: None,
            recv_buffer_size: None,
            read_buffer_size: 256 * 1024,
            connect_timeout: Duration::from_secs(3),
            listen_backlog: 1024,
            max_half_open: 1024,
            bulk_send_buffer_size: None,
            bulk_lane_io: BulkLaneIo::default(),
        }
    }
}

impl TcpConfig {
    /// Bytes per read: [`TcpConfig::read_buffer_size`], raised to [`MIN_READ_BUFFER_SIZE`].
    pub(crate) fn read_size(&self) -> usize {
        self.read_buffer_size.max(MIN_READ_BUFFER_SIZE)
    }

    /// Applies the socket options that must precede `connect`/`listen`.
    pub(crate) fn apply_before_connect(&self, socket: &Socket) -> io::Result<()> {
        if let Some(size) = self.send_buffer_size {
            socket.set_send_buffer_size(size)?;
        }
        if let Some(size) = self.recv_buffer_size {
            socket.set_recv_buffer_size(size)?;
        }
        socket.set_nodelay(self.nodelay)
    }

    /// Applies the per-connection options to an established (accepted or wrapped) stream.
    pub(crate) fn apply_to_stream(&self, stream: &tokio::net::TcpStream) -> io::Result<()> {
        let socket = SockRef::from(stream);
        if let Some(size) = self.send_buffer_size {
            socket.set_send_buffer_size(size)?;
        }
        if let Some(size) = self.recv_buffer_size {
            socket.set_recv_buffer_size(size)?;
        }
        socket.set_nodelay(self.nodelay)
    }
}
