//! TCP transport for [agentfabric]: moves fabric frames over TCP, with three TCP connections
//! ("lanes") per fabric connection so that coordination never waits behind bulk bytes.
//!
//! Addresses are `host:port` (the part after `tcp://`), e.g. `tcp://127.0.0.1:7000` or
//! `tcp://[::1]:7000`; `listen("127.0.0.1:0")` picks a free port, which
//! [`Listener::local_addr`] reports as a full URL.
//!
//! # Lanes
//!
//! The fabric's scheduler puts coordination ahead of bulk inside the process, but once bytes are
//! in a TCP socket they leave in order. On one connection a coordination frame would queue behind
//! everything the bulk channel already wrote: the socket's send buffer, which Linux auto-tunes up
//! to megabytes, plus the receiver's buffer. On loopback this measured about 700 µs at p99 for a
//! coordination round trip while a bulk channel saturated the session, against about 35 µs idle.
//!
//! So each fabric [`Connection`] is three TCP connections:
//!
//! | lane | carries | [`Lane`](agentfabric::frame::Lane) |
//! |---|---|---|
//! | 0 | everything but bulk data: coordination and tool-call data, acks, keepalives, handshake | `Latency` |
//! | 1 | data frames of bulk channels | `Bulk` |
//! | 2 | one-sided operations: the bytes of region transfers ([below](#one-sided-operations)) | none: not frames |
//!
//! The sink routes each frame by [`OutFrame::lane`](agentfabric::frame::OutFrame::lane) into that
//! lane's own queue, written with its own vectored writes: a full bulk socket never holds back a
//! latency frame, in the process or in the kernel. Frames of one lane keep their order; the lanes
//! are independent, which the session tolerates because all the data of one channel takes the
//! same lane. The stream steps both lanes in turn, latency lane first, so latency frames come
//! out first and are never stuck behind the reading of a large bulk frame: a lane read on the
//! runtime gets at most one read per turn, and the bulk lane on its own thread (the default, see
//! [below](#bulk-lane-threads)) is read by that thread, the stream only taking the frames it
//! queued.
//!
//! **Pairing.** Each TCP connection opens with a 16-byte preamble: magic `"AFTL"`, version (2),
//! lane, lane count (3), a reserved zero byte and a random 64-bit connection id
//! ([`PREAMBLE_LEN`]). [`Transport::connect`] opens the lanes to the same resolved address and
//! writes their preambles; the listener reads each incoming socket's preamble in a spawned task
//! (bounded by [`TcpConfig::connect_timeout`]), pairs the lanes by id, and `accept` yields the
//! connection once all are there. A socket with a bad preamble (wrong magic, version or lane
//! count), a silent one (timeout), a duplicate lane, or a lane of an id already paired is closed
//! with a `tracing` warning; a connection whose other lane does not follow within the connect
//! timeout is closed too, and at most [`TcpConfig::max_half_open`] ids wait at once (the oldest
//! is dropped first), as at most that many sockets wait for their preamble. No client, slow or
//! hostile, can stall `accept` for the others. The id only pairs lanes: it is not a secret and
//! authenticates nothing.
//!
//! **Ending.** An I/O error, a malformed frame, or a lane closed in the middle of a frame on
//! either lane ends the connection at once with that error. A clean end of one lane (the peer is
//! closing) lets the frames still in flight on the other lane be delivered;
//! [`RecvError::Eof`](agentfabric::transport::RecvError::Eof) comes when both lanes have ended.
//! A half-closed peer (one lane ended, the other silent) is left to the session's keepalive.
//!
//! # Bulk lane threads
//!
//! By default ([`BulkLaneIo::Threads`]) the bulk lane's socket is not read or written by the
//! async runtime but by two threads of the connection's own (one per direction; the writer
//! starts with the first bulk frame), at a lower scheduling priority (nice 10 by default, on
//! Linux only: [`ThreadPriority`]). Why: on a fast link moving bulk bytes is CPU work (the
//! kernel's copies), and on the runtime's workers each bulk write or read holds a worker for
//! tens of microseconds; a coordination message arriving meanwhile waits for a free worker, for
//! the runtime to poll its socket, and for its task's turn. The runtime has no priorities, the
//! kernel has: with the bulk copies on low-priority threads, a worker woken for a coordination
//! frame is preferred over them (not always at once: see below). Measured with `agentfabric
//! bench --transport tcp --workload mixed` (both nodes in one process on 2 cores, one runtime
//! worker, see `bench/RESULTS.md`): under a saturating bulk stream the coordination round
//! trip's p99 was 57–62 µs against 31–32 µs idle (ratio 1.79–1.99), with bulk at 0.84–0.98 of
//! its solo rate; with [`BulkLaneIo::Runtime`] (two workers) the loaded p99 was about 1 ms
//! (ratio 24) while bulk moved 5.5 GB/s. The price: a reader thread per connection, whether or
//! not it carries bulk, and a writer thread from its first bulk frame. [`BulkLaneIo::Runtime`]
//! keeps everything on the runtime.
//!
//! Two things limit that preference. On a kernel without full preemption (`PREEMPT_NONE`,
//! common on servers) a thread inside a system call keeps its core until the call returns, so
//! the writer thread hands at most 128 KiB to one call. And the threads need cores: a runtime
//! with as many workers as the machine has cores leaves a woken worker queued behind the other
//! workers while the lane threads run (measured on 2 cores: loaded p99 108–116 µs with 2
//! workers, 57–64 µs with 1, bulk near its solo rate either way). Size the runtime to leave the
//! bulk lanes a core; `agentfabric bench` runs one fewer worker than there are cores.
//!
//! # One-sided operations
//!
//! The transport has a memory domain ([`Transport::memory_domain`]): a node registers its
//! regions with it, and transfers between regions move on the connection's third lane as
//! one-sided writes and reads ([`FrameSink::one_sided`](agentfabric::transport::FrameSink::one_sided)), as they move by RDMA WRITE and READ on
//! the verbs transport, with the same checks and the same failure semantics. No device reads the
//! memory here: the lane's two threads (a writer, started with the first operation, and a
//! reader, at the bulk lane's priority) `send` straight from the registered memory and `recv`
//! straight into it. A transfer's block thus costs the kernel's two copies and nothing more;
//! through the session it also paid a copy out of the bulk lane's read buffer into the region,
//! and frame and chunk handling per 256 KiB. Measured (`agentfabric bench --transport tcp
//! --workload bulk`, 1 MiB blocks, loopback, 2 cores): 1.01–1.15 of raw TCP streaming between
//! buffers of the regions' size in four runs, against 0.47–0.63 through the session.
//!
//! What the lane checks, on the side that owns the memory, before every piece (at most 1 MiB) of
//! every operation: the key names a live registration of this transport, and the range lies
//! inside it. A refused operation fails, and fails the connection (its stream reports the error,
//! so the session resumes on a new one), as an RDMA queue pair goes to its error state.
//! Deregistration waits for the accesses in progress, and cuts a stalled one short by shutting
//! its connection down, so memory is never touched after its registration is dropped. Keys are
//! random 32-bit values: as with RDMA, anyone connected who holds (or guesses) a key can reach
//! that registration while it lives. The wire format and the rest are in the `one_sided` module's
//! source.
//!
//! A connection made by [`TcpTransport::wrap_streams`] has no one-sided lane: its transfers move
//! through the session.
//!
//! # Design choices
//!
//! - **No framing bytes of its own** past the preamble. Every fabric frame opens with a fixed
//!   64-byte header that carries a magic number, a version and the payload length
//!   ([`agentfabric::frame`]). That is all a byte stream needs to be cut back into frames, so
//!   what goes on each lane after its preamble is exactly the frames, back to back. The
//!   receiver validates each header (magic, version, kind, flags and, above all, the length
//!   against [`MAX_FRAME_PAYLOAD`](agentfabric::frame::MAX_FRAME_PAYLOAD)) *before* it sizes any
//!   buffer by that length, so a peer that sends garbage or claims a 4 GiB frame is refused with
//!   [`RecvError::Frame`](agentfabric::transport::RecvError::Frame) and costs no memory.
//! - **Vectored writes, no send-side copy.** [`FrameSink::push`](agentfabric::transport::FrameSink)
//!   only appends the [`OutFrame`](agentfabric::frame::OutFrame) (encoded header and a
//!   reference-counted payload) to its lane's queue. `poll_flush` hands up to [`MAX_IOVECS`]
//!   slices (header, then payload, per frame) to one `writev` call per lane, so many small
//!   coordination frames cost one system call and a large payload is never copied into a send
//!   buffer. A write of at most 2 KiB is the exception: its slices are joined into one buffer
//!   and handed to a plain `send`, which on Linux costs about 0.25 µs less than a `writev`
//!   (measured on the pingpong bench), far more than the copy. Partial writes are tracked
//!   exactly per lane (how far into the front frame the kernel took), and the slice array lives
//!   on the stack and the join buffer is reused, so steady-state sending allocates nothing.
//!   `queued_bytes` is the sum of both lanes' queues.
//! - **Zero-copy receive.** Each lane reads into one large [`BytesMut`](bytes::BytesMut)
//!   ([`TcpConfig::read_buffer_size`], 256 KiB by default), then cuts every whole frame out of it
//!   with `split_to(len).freeze()`: each delivered [`Frame`](agentfabric::frame::Frame)'s payload is
//!   a slice of that read buffer, with no copy. One read usually yields many frames, and
//!   `poll_recv` delivers them all at once. Space for a whole maximal frame is reserved once its
//!   header has been validated, so large frames are received without repeated regrowth.
//! - **`TCP_NODELAY` on by default**, on both lanes. The fabric batches frames itself (one
//!   vectored write per flush) and its coordination traffic is latency-bound, so Nagle's
//!   algorithm could only add delay (up to a delayed-ACK timeout, tens of milliseconds) to small
//!   messages.
//! - **Kernel socket buffers untouched by default**, on both lanes. Linux auto-tunes them;
//!   fixing `SO_SNDBUF`/`SO_RCVBUF` ([`TcpConfig::send_buffer_size`],
//!   [`TcpConfig::recv_buffer_size`]) disables that tuning and is only worth it with
//!   measurements in hand. [`TcpConfig::bulk_send_buffer_size`] fixes the bulk lane's alone.
//!   Measured on loopback (2 busy cores, the ignored test `lane_latency_probe`: one-way latency
//!   of small latency-lane frames under a saturating bulk stream), a 256 KiB bulk send buffer
//!   cut that latency a further 4× at p50 (≈ 400 → 110 µs; two TCP lanes alone already halve
//!   the single connection's ≈ 900 µs), but bulk throughput moved between +15 % and −15 % from
//!   run to run, and a fixed buffer caps throughput at buffer / RTT on real links; so it is not
//!   the default. The options are set with `socket2`
//!   before `connect`/`listen`, so the receive window scale is negotiated with them.
//!
//! # Guarantees
//!
//! TCP is reliable ([`Transport::reliable`] is `true`): frames pushed on one connection arrive
//! complete, exactly once, and in the order pushed among the frames of one lane (hence of one
//! channel), while the connection lives. Frames of different lanes may arrive in any relative
//! order. A frame counted out of `queued_bytes` may still be lost if the connection then fails;
//! the session's acks and resume cover that case. Such a frame was handed to the kernel, or, on
//! the bulk lane's writer thread, taken by that thread, which holds up to 256 KiB plus a frame
//! ahead of the kernel.

#![warn(missing_docs)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use agentfabric::transport::{BoxFuture, Connection, Listener, MemoryDomain, Transport};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;

// The modules below this root, each using only those after it in this list, so that no two
// import each other:
//
//   listener      accepts sockets, pairs lanes  -> connection, config, memory, preamble
//   connection    a Connection of lane sockets  -> lanes, lane_thread, one_sided, config, memory
//   lanes         the lane dispatchers          -> lane_thread, sink, stream
//   lane_thread   the bulk lane's threads       -> sink, stream, threads
//   one_sided/    the one-sided lane            -> memory, threads
//   memory        registered memory, leases     -> preamble (random ids)
//   sink, stream  one socket's framers
//   config, preamble, threads
mod config;
mod connection;
mod lane_thread;
mod lanes;
mod listener;
mod memory;
mod one_sided;
mod preamble;
mod sink;
mod stream;
mod threads;

#[cfg(test)]
mod one_sided_tests;
#[cfg(test)]
mod tests;

use connection::into_connection;
use listener::TcpFrameListener;
use memory::TcpDomain;
use preamble::Preamble;

/// Scheduling priority of the bulk lane's threads ([`BulkLaneIo::Threads`]; the default is
/// `Nice(10)`). The fabric's own type, re-exported here where tcp's settings name it.
pub use agentfabric::transport::ThreadPriority;
pub use config::{BulkLaneIo, TcpConfig, MIN_READ_BUFFER_SIZE, SCHEME};
pub use preamble::{LANES, PREAMBLE_LEN, PREAMBLE_MAGIC, PREAMBLE_VERSION};
pub use sink::MAX_IOVECS;

/// Result with the error this crate's functions return: [`io::Error`], the error of the fabric's
/// `Transport` trait, as for every transport. `?` converts it into [`agentfabric::Error`]
/// (`Error::Transport`, with its kind and message) in a function that returns
/// [`agentfabric::Result`].
pub type Result<T, E = io::Error> = std::result::Result<T, E>;

/// The TCP transport: scheme `tcp`, reliable, three TCP connections (lanes) per
/// [`Connection`], and a memory domain for one-sided operations (see the
/// [crate docs](crate#one-sided-operations)). Clones share the memory domain.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    config: TcpConfig,
    domain: Arc<TcpDomain>,
}

impl Default for TcpTransport {
    fn default() -> Self {
        Self::with_config(TcpConfig::default())
    }
}

impl TcpTransport {
    /// A transport with the default [`TcpConfig`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport with the given settings.
    pub fn with_config(config: TcpConfig) -> Self {
        TcpTransport {
            config,
            domain: TcpDomain::new(),
        }
    }

    /// The transport's settings.
    pub fn config(&self) -> &TcpConfig {
        &self.config
    }

    /// Wraps two already-connected tokio streams (e.g. obtained through a proxy or inherited
    /// from a supervisor) in a fabric [`Connection`]: `latency` carries lane 0 and `bulk` lane 1
    /// (see the [crate docs](crate#lanes)), applying this transport's socket options that still
    /// can be applied (`TCP_NODELAY`, buffer sizes). The connection has no one-sided lane:
    /// transfers on it move through the session.
    ///
    /// No preamble is written or read: the streams must already be paired, and connected to a
    /// peer that wrapped its ends the same way (its lane 0 being this side's lane 0). To reach a
    /// peer's [`Listener`], use [`Transport::connect`], which sends the preambles.
    pub fn wrap_streams(
        &self,
        latency: tokio::net::TcpStream,
        bulk: tokio::net::TcpStream,
    ) -> io::Result<Connection> {
        self.config.apply_to_stream(&latency)?;
        self.config.apply_to_stream(&bulk)?;
        into_connection([latency, bulk], None, &self.config, &self.domain)
    }

    async fn connect_inner(&self, addr: &str) -> io::Result<Connection> {
        let target = Target::parse(addr, false)?;
        let limit = self.config.connect_timeout;
        let attempt = async {
            let mut last_err = None;
            for sa in target.resolve().await? {
                match self.connect_lanes(sa).await {
                    Ok(lanes) => return Ok(lanes),
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
        let lanes = match tokio::time::timeout(limit, attempt).await {
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
        let [latency, bulk, one_sided] = lanes;
        into_connection([latency, bulk], Some(one_sided), &self.config, &self.domain)
    }

    /// Opens the lanes to `sa` (concurrently) and writes their preambles.
    async fn connect_lanes(&self, sa: SocketAddr) -> io::Result<[tokio::net::TcpStream; LANES]> {
        let id = preamble::random_u64();
        let (mut latency, mut bulk, mut one_sided) = tokio::try_join!(
            self.connect_one(sa),
            self.connect_one(sa),
            self.connect_one(sa)
        )?;
        for (lane, stream) in [&mut latency, &mut bulk, &mut one_sided]
            .into_iter()
            .enumerate()
        {
            let p = Preamble {
                lane: lane as u8,
                id,
            };
            stream.write_all(&p.encode()).await?;
        }
        Ok([latency, bulk, one_sided])
    }

    async fn connect_one(&self, sa: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
        self.config.apply_before_connect(&socket)?;
        socket.set_nonblocking(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(sa).await
    }

    /// Binds a listener (the concrete type, which tests inspect).
    async fn listen_lanes(&self, addr: &str) -> io::Result<TcpFrameListener> {
        let target = Target::parse(addr, true)?;
        let mut last_err = None;
        for sa in target.resolve().await? {
            match self.bind_one(sa) {
                Ok(listener) => {
                    let local = listener.local_addr()?;
                    tracing::debug!(%local, "tcp transport listening");
                    return Ok(TcpFrameListener::new(
                        listener,
                        format!("{SCHEME}://{local}"),
                        self.config.clone(),
                        self.domain.clone(),
                    ));
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
        Box::pin(async move {
            let listener = self.listen_lanes(addr).await?;
            Ok(Box::new(listener) as Box<dyn Listener>)
        })
    }

    fn memory_domain(&self) -> Option<Arc<dyn MemoryDomain>> {
        Some(self.domain.clone())
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
