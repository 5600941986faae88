//! TCP transport for [agentfabric]: moves fabric frames over one TCP connection.
//!
//! Addresses are `host:port` (the part after `tcp://`), e.g. `tcp://127.0.0.1:7000` or
//! `tcp://[::1]:7000`; `listen("127.0.0.1:0")` picks a free port, which
//! [`Listener::local_addr`] reports as a full URL.
//!
//! # Design choices
//!
//! - **No framing bytes of its own.** Every fabric frame opens with a fixed 64-byte header that
//!   carries a magic number, a version and the payload length
//!   ([`agentfabric::frame`]). That is all a byte stream needs to be cut back into frames, so the
//!   transport adds nothing: what goes on the wire is exactly the frames, back to back. The
//!   receiver validates each header (magic, version, kind, flags and, above all, the length
//!   against [`MAX_FRAME_PAYLOAD`](agentfabric::frame::MAX_FRAME_PAYLOAD)) *before* it sizes any
//!   buffer by that length, so a peer that sends garbage or claims a 4 GiB frame is refused with
//!   [`RecvError::Frame`](agentfabric::transport::RecvError::Frame) and costs no memory.
//! - **Vectored writes, no send-side copy.** [`FrameSink::push`](agentfabric::transport::FrameSink)
//!   only appends the [`OutFrame`](agentfabric::frame::OutFrame) (encoded header and a
//!   reference-counted payload) to a queue. `poll_flush` hands up to [`MAX_IOVECS`] slices (header,
//!   then payload, per frame) to one `writev` call, so many small coordination frames cost one
//!   system call and a large payload is never copied into a send buffer. Partial writes are
//!   tracked exactly (how far into the front frame the kernel took), and the slice array lives on
//!   the stack, so steady-state sending allocates nothing.
//! - **Zero-copy receive.** The receiver reads into one large [`BytesMut`](bytes::BytesMut)
//!   ([`TcpConfig::read_buffer_size`], 256 KiB by default), then cuts every whole frame out of it
//!   with `split_to(len).freeze()`: each delivered [`Frame`](agentfabric::frame::Frame)'s payload is
//!   a slice of that read buffer, with no copy. One read usually yields many frames, and
//!   `poll_recv` delivers them all at once. Space for a whole maximal frame is reserved once its
//!   header has been validated, so large frames are received without repeated regrowth.
//! - **`TCP_NODELAY` on by default.** The fabric batches frames itself (one vectored write per
//!   flush) and its coordination traffic is latency-bound, so Nagle's algorithm could only add
//!   delay (up to a delayed-ACK timeout, tens of milliseconds) to small messages.
//! - **Kernel socket buffers untouched by default.** Linux auto-tunes them; fixing
//!   `SO_SNDBUF`/`SO_RCVBUF` ([`TcpConfig::send_buffer_size`], [`TcpConfig::recv_buffer_size`])
//!   disables that tuning and is only worth it with measurements in hand. The options are set
//!   with `socket2` before `connect`/`listen`, so the receive window scale is negotiated with them.
//!
//! # Guarantees
//!
//! TCP is reliable ([`Transport::reliable`] is `true`): frames pushed on one connection arrive
//! complete, in the order pushed, exactly once, while the connection lives. A frame handed to the
//! kernel (counted out of `queued_bytes`) may still be lost if the connection then fails; the
//! session's acks and resume cover that case.

#![warn(missing_docs)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use agentfabric::transport::{BoxFuture, Connection, Listener, Transport};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

mod sink;
mod stream;

#[cfg(test)]
mod tests;

use sink::TcpFrameSink;
use stream::TcpFrameStream;

pub use sink::MAX_IOVECS;

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
    /// `SO_SNDBUF` in bytes, or `None` (the default) to keep the kernel's auto-tuned size.
    pub send_buffer_size: Option<usize>,
    /// `SO_RCVBUF` in bytes, or `None` (the default) to keep the kernel's auto-tuned size. Set
    /// before `connect`/`listen` so the TCP window scale is negotiated accordingly.
    pub recv_buffer_size: Option<usize>,
    /// Bytes read from the socket per read call, at most; the receive buffer grows beyond it only
    /// to hold one whole large frame. Default 256 KiB; values below [`MIN_READ_BUFFER_SIZE`] are
    /// raised to it.
    pub read_buffer_size: usize,
    /// Longest time [`Transport::connect`] spends resolving the name and establishing the
    /// connection before failing with [`io::ErrorKind::TimedOut`]. Default 3 s.
    pub connect_timeout: Duration,
    /// Backlog of pending connections of a listening socket. Default 1024 (the kernel may cap it,
    /// e.g. at `net.core.somaxconn`).
    pub listen_backlog: u32,
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
        }
    }
}

impl TcpConfig {
    fn read_size(&self) -> usize {
        self.read_buffer_size.max(MIN_READ_BUFFER_SIZE)
    }

    /// Applies the socket options that must precede `connect`/`listen`.
    fn apply_before_connect(&self, socket: &Socket) -> io::Result<()> {
        if let Some(size) = self.send_buffer_size {
            socket.set_send_buffer_size(size)?;
        }
        if let Some(size) = self.recv_buffer_size {
            socket.set_recv_buffer_size(size)?;
        }
        socket.set_nodelay(self.nodelay)
    }

    /// Applies the per-connection options to an established (accepted or wrapped) stream.
    fn apply_to_stream(&self, stream: &tokio::net::TcpStream) -> io::Result<()> {
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

/// The TCP transport: scheme `tcp`, reliable, one TCP connection per [`Connection`].
#[derive(Debug, Clone, Default)]
pub struct TcpTransport {
    config: TcpConfig,
}

impl TcpTransport {
    /// A transport with the default [`TcpConfig`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport with the given settings.
    pub fn with_config(config: TcpConfig) -> Self {
        TcpTransport { config }
    }

    /// The transport's settings.
    pub fn config(&self) -> &TcpConfig {
        &self.config
    }

    /// Wraps an already-connected tokio stream (e.g. one obtained through a proxy or inherited
    /// from a supervisor) in a fabric [`Connection`], applying this transport's socket options
    /// that still can be applied (`TCP_NODELAY`, buffer sizes).
    pub fn wrap_stream(&self, stream: tokio::net::TcpStream) -> io::Result<Connection> {
        self.config.apply_to_stream(&stream)?;
        Ok(into_connection(stream, &self.config))
    }

    async fn connect_inner(&self, addr: &str) -> io::Result<Connection> {
        let target = Target::parse(addr, false)?;
        let limit = self.config.connect_timeout;
        let attempt = async {
            let mut last_err = None;
            for sa in target.resolve().await? {
                match self.connect_one(sa).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => {
                        tracing::debug!(addr = %target.text, resolved = %sa, error = %e, "tcp connect attempt failed");
                        last_err = Some(io::Error::new(
                            e.kind(),
                            format!("cannot connect to tcp://{} ({sa}): {e}", target.text),
                        ));
                    }
                }
            }
            Err(last_err.unwrap_or_else(|| target.no_address()))
        };
        let stream = match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to tcp://{} timed out after {limit:?}",
                        target.text
                    ),
                ))
            }
        };
        Ok(into_connection(stream, &self.config))
    }

    async fn connect_one(&self, sa: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
        self.config.apply_before_connect(&socket)?;
        socket.set_nonblocking(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(sa).await
    }

    async fn listen_inner(&self, addr: &str) -> io::Result<Box<dyn Listener>> {
        let target = Target::parse(addr, true)?;
        let mut last_err = None;
        for sa in target.resolve().await? {
            match self.bind_one(sa) {
                Ok(listener) => {
                    let local = listener.local_addr()?;
                    tracing::debug!(%local, "tcp transport listening");
                    return Ok(Box::new(TcpFrameListener {
                        inner: listener,
                        local: format!("{SCHEME}://{local}"),
                        config: self.config.clone(),
                    }));
                }
                Err(e) => {
                    last_err = Some(io::Error::new(
                        e.kind(),
                        format!("cannot listen on tcp://{} ({sa}): {e}", target.text),
                    ))
                }
            }
        }
        Err(last_err.unwrap_or_else(|| target.no_address()))
    }

    fn bind_one(&self, sa: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
        // Lets a restarted node bind its port while old connections sit in TIME_WAIT. (On
        // Windows SO_REUSEADDR means something else, so it is left alone there.)
        #[cfg(unix)]
        socket.set_reuse_address(true)?;
        // Accepted sockets inherit these, which matters for SO_RCVBUF (window scale in the SYN).
        self.config.apply_before_connect(&socket)?;
        socket.bind(&sa.into())?;
        let backlog = i32::try_from(self.config.listen_backlog).unwrap_or(i32::MAX);
        socket.listen(backlog)?;
        socket.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(socket.into())
    }
}

impl Transport for TcpTransport {
    fn scheme(&self) -> &'static str {
        SCHEME
    }

    fn reliable(&self) -> bool {
        true
    }

    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Connection>> {
        Box::pin(self.connect_inner(addr))
    }

    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(self.listen_inner(addr))
    }
}

/// A listening TCP socket that yields fabric connections.
struct TcpFrameListener {
    inner: tokio::net::TcpListener,
    local: String,
    config: TcpConfig,
}

impl Listener for TcpFrameListener {
    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn accept(&mut self) -> BoxFuture<'_, io::Result<Connection>> {
        Box::pin(async move {
            loop {
                let (stream, peer) = match self.inner.accept().await {
                    Ok(accepted) => accepted,
                    // Failures of one incoming connection (reset before it was accepted) are
                    // not failures of the listener: skip it and wait for the next.
                    Err(e) if is_per_connection_error(&e) => {
                        tracing::debug!(local = %self.local, error = %e, "incoming tcp connection dropped before accept");
                        continue;
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("accepting on {}: {e}", self.local),
                        ))
                    }
                };
                if let Err(e) = self.config.apply_to_stream(&stream) {
                    tracing::debug!(local = %self.local, %peer, error = %e, "cannot set options on accepted tcp connection; dropping it");
                    continue;
                }
                return Ok(into_connection(stream, &self.config));
            }
        })
    }
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

fn into_connection(stream: tokio::net::TcpStream, config: &TcpConfig) -> Connection {
    let remote = match stream.peer_addr() {
        Ok(addr) => format!("{SCHEME}://{addr}"),
        Err(_) => format!("{SCHEME}://(unknown)"),
    };
    let (read, write) = stream.into_split();
    Connection {
        sink: Box::new(TcpFrameSink::new(write)),
        stream: Box::new(TcpFrameStream::new(read, config.read_size())),
        remote,
    }
}

/// A validated `host:port` address, not yet resolved.
struct Target<'a> {
    /// The address as given (without any `tcp://` prefix), for error messages.
    text: &'a str,
    /// A literal socket address, which needs no name resolution.
    literal: Option<SocketAddr>,
    host: &'a str,
    port: u16,
}

impl<'a> Target<'a> {
    /// Checks the shape of `addr`; `allow_port_zero` is for listening (any free port).
    fn parse(addr: &'a str, allow_port_zero: bool) -> io::Result<Target<'a>> {
        let text = addr.strip_prefix("tcp://").unwrap_or(addr);
        let invalid = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "invalid TCP address {addr:?}: {why} (expected host:port, \
                     e.g. 127.0.0.1:7000, [::1]:7000 or localhost:7000)"
                ),
            )
        };
        let target = if let Ok(sa) = text.parse::<SocketAddr>() {
            Target {
                text,
                literal: Some(sa),
                host: "",
                port: sa.port(),
            }
        } else {
            let (host, port) = text.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
            if host.is_empty() {
                return Err(invalid("no host"));
            }
            if host.contains(':') || host.contains('[') || host.contains(']') {
                return Err(invalid("IPv6 addresses must be written in brackets"));
            }
            if host.contains(|c: char| c.is_whitespace() || c == '/') {
                return Err(invalid("bad character in the host name"));
            }
            let port = port
                .parse::<u16>()
                .map_err(|_| invalid("the port must be a number from 0 to 65535"))?;
            Target {
                text,
                literal: None,
                host,
                port,
            }
        };
        if target.port == 0 && !allow_port_zero {
            return Err(invalid("port 0 cannot be connected to"));
        }
        Ok(target)
    }

    async fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        if let Some(sa) = self.literal {
            return Ok(vec![sa]);
        }
        match tokio::net::lookup_host((self.host, self.port)).await {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    Err(self.no_address())
                } else {
                    Ok(addrs)
                }
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot resolve tcp://{}: {e}", self.text),
            )),
        }
    }

    fn no_address(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("tcp://{} resolves to no address", self.text),
        )
    }
}
