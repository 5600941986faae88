//! QUIC transport for [agentfabric]: quinn + rustls (TLS 1.3, ring provider), mutual TLS by
//! default, one QUIC stream per fabric channel.
//!
//! Addresses are `host:port` after `quic://`, e.g. `quic://127.0.0.1:7443`; `listen` on port 0
//! picks a free UDP port, which [`Listener::local_addr`] reports as a full URL.
//!
//! # Security
//!
//! - **TLS 1.3 only**, ALPN [`ALPN`] (`agentfabric/3`: the fabric protocol and its wire
//!   version, `agentfabric::frame::VERSION`). A peer that offers another ALPN is refused
//!   (`no_application_protocol`).
//! - **Mutual TLS by default.** Both sides present a certificate chain signed by the CA the
//!   operator names in [`QuicConfig::ca_cert`]; a client without a certificate, or with one from
//!   another CA, expired, or not valid for TLS client use, is refused during the handshake. The
//!   error says why: the verifying side logs rustls's reason and the refused side gets an
//!   [`io::Error`] naming the TLS alert (e.g. "the peer refused our certificate: certificate
//!   required"). [`QuicConfig::require_client_auth`] turns client authentication off.
//! - Development certificates: [`write_dev_certs`] (used by `agentfabric certs dev DIR`) and
//!   [`DevCa`] (in memory, for tests). A directory keeps its CA: writing more node certificates
//!   to it issues them from the same `ca.pem`/`ca.key`, so the nodes of one directory trust each
//!   other; each new CA has a name of its own, so a certificate from another development CA is
//!   reported as signed by an unknown issuer.
//!
//! # Mapping frames to streams (no head-of-line blocking between channels)
//!
//! The transport knows nothing of channels or classes: the fabric gives each frame an
//! [`agentfabric::frame::OrderKey`] (a flow that must stay in order, and its urgency), or none
//! for session control frames. Today a flow is a channel and its urgency the channel's class:
//!
//! - **Data and Ack frames ride their flow's (channel's) own unidirectional stream**, opened on the
//!   channel's first frame and kept for the connection's life. A lost packet then delays only the
//!   channel whose bytes it carried: QUIC delivers every other stream's data at once. Acks ride
//!   the channel's stream too, so everything about one channel stays in the order the session
//!   produced it, exactly as over TCP (the session needs no new tolerance); data frames also
//!   carry acks and credits, so a separate ack path would gain nothing.
//! - **Handshake, Ping/Pong, Close, and any frame whose header does not decode** go on a control
//!   stream (the first stream each side opens). A garbage frame thus reaches the peer's session,
//!   which refuses it with the same typed error as on TCP.
//! - Order across channels is not kept, which the session allows: on a reliable transport a gap
//!   *within* a channel is a protocol error (`SequenceFromFuture`), while channels are sequenced
//!   independently (`Session::on_data`).
//! - **Stream priorities come from the urgency** (control > coordination > tool call > bulk), so
//!   quinn sends coordination bytes before bulk bytes already buffered. Priority *within* a class
//!   is left to the session's weighted round-robin: giving quinn strict per-priority ordering
//!   would override it and could starve a low-priority channel of its class.
//! - Frames go on the stream as they are (64-byte header, then payload; the header carries the
//!   length): nothing is added. A frame of a few hundred bytes is copied once into one buffer
//!   with its header; a larger payload is handed to quinn as the same `Bytes` (no copy).
//! - Streams are bounded: quinn allocates state for every stream the peer may open when the
//!   connection starts, so the limit ([`QuicConfig::max_streams`], 1024 by default) costs
//!   memory and handshake time per connection. Channels beyond it share one stream per urgency
//!   for the rest of the connection (still in order; isolated from other classes and from the
//!   first channels, not from each other).
//!
//! - **Receiving takes no extra task.** The session's driver polls the streams itself: every
//!   stream has a waker that marks it ready, so a wake-up reads only the streams with data (as
//!   `FuturesUnordered` does), and frames reach the session without a queue or a task switch in
//!   between. One stream yields at most 256 KiB per poll, so a bulk stream cannot starve the
//!   others. Received bytes are copied once (from quinn's chunks into a per-stream buffer) and
//!   frames are cut from that buffer without further copies, as on TCP.
//!
//! Each stream is reliable and ordered, so [`Transport::reliable`] is `true`.
//!
//! # Closing
//!
//! `poll_close` finishes every stream (the peer reads all frames, then end of stream); the
//! connection is kept open until the peer closes it or [`QuicConfig::linger`] passes, so what was
//! written is delivered. Dropping a connection without closing it closes the QUIC connection at
//! once, as a network failure would (the session resumes on a new one).

#![warn(missing_docs)]

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use agentfabric::sync::lock;
use agentfabric::transport::{BoxFuture, Connection, Listener, Transport};

mod config;
mod conn;
mod dev_certs;
pub mod relay;
mod tls;

#[cfg(test)]
mod tests;

pub use config::{Congestion, QuicConfig, ALPN, SCHEME};
pub use conn::describe_connection_error;
pub use dev_certs::{
    write_dev_certs, write_dev_certs_with, DevCa, DevCertError, DevCertFiles, DevCertOptions,
    Issued,
};
pub use quinn;
pub use rcgen;
pub use tls::{load_certs, load_key};

/// Result with the error this crate's functions return: [`io::Error`], the error of the fabric's
/// `Transport` trait, as for every transport; set-up ([`QuicConfig::from_pem_files`],
/// [`QuicTransport::new`], [`write_dev_certs`], [`DevCa`]) returns it too. `?` converts it into
/// [`agentfabric::Error`] (`Error::Transport`, with its kind and message), as it converts a
/// tool call's [`ToolError`](agentfabric::tools::ToolError), so one program returns
/// [`agentfabric::Result`] through set-up, sessions and tool calls:
///
/// ```
/// use std::time::Duration;
///
/// use agentfabric::tools::{ToolClient, ToolServer};
/// use agentfabric::Node;
/// use agentfabric_quic::{DevCa, QuicTransport};
///
/// #[tokio::main]
/// async fn main() -> agentfabric::Result<()> {
///     // QUIC set-up: std::io::Error.
///     let ca = DevCa::new("example CA")?;
///     let server_tls = QuicTransport::new(ca.node_config("tools")?)?;
///     let agent_tls = QuicTransport::new(ca.node_config("agent")?)?;
///
///     // Nodes and sessions: agentfabric::Error.
///     let server = Node::builder("tools").transport(server_tls).build()?;
///     let addr = server.listen("quic://127.0.0.1:0").await?;
///     let agent = Node::builder("agent").transport(agent_tls).build()?;
///     let peer = agent.connect(&addr).await?;
///
///     // Tool calls: agentfabric::tools::ToolError.
///     let mut tools = ToolServer::new();
///     tools.register("echo", |req| async move { Ok(req.args) });
///     tokio::spawn(tools.serve(server.clone()));
///     let client = ToolClient::new(&peer)?;
///     let out = client.call("echo", "hello", Duration::from_secs(2)).await?;
///     assert_eq!(&out[..], b"hello");
///
///     // What `?` would return for a tool the server does not have.
///     let missing = client.call("nope", "", Duration::from_secs(2)).await;
///     let e = agentfabric::Error::from(missing.unwrap_err());
///     assert_eq!(e.to_string(), "unknown tool \"nope\"");
///     Ok(())
/// }
/// ```
pub type Result<T, E = io::Error> = std::result::Result<T, E>;

/// The QUIC transport: scheme `quic`, reliable, one QUIC connection per [`Connection`], one
/// stream per channel.
pub struct QuicTransport {
    config: QuicConfig,
    client: quinn::ClientConfig,
    /// Client endpoints, one per address family, made on first use and shared by connections.
    endpoints: Mutex<[Option<quinn::Endpoint>; 2]>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// A transport with `config`. Fails when the TLS configuration is unusable (no CA, a key
    /// that does not match its certificate…), with the reason.
    pub fn new(config: QuicConfig) -> io::Result<QuicTransport> {
        let client = config.quinn_client_config()?;
        Ok(QuicTransport {
            config,
            client,
            endpoints: Mutex::new([None, None]),
        })
    }

    /// The transport's settings.
    pub fn config(&self) -> &QuicConfig {
        &self.config
    }

    fn client_endpoint(&self, v6: bool) -> io::Result<quinn::Endpoint> {
        let mut eps = lock(&self.endpoints);
        let slot = &mut eps[usize::from(v6)];
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = if v6 {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut ep = endpoint(bind, None, self.config.socket_buffer)?;
        ep.set_default_client_config(self.client.clone());
        *slot = Some(ep.clone());
        Ok(ep)
    }

    async fn connect_inner(&self, addr: &str) -> io::Result<Connection> {
        let (host, sa) = resolve(addr, false).await?;
        let name = self.config.server_name.clone().unwrap_or(host);
        let ep = self.client_endpoint(sa.is_ipv6())?;
        let connecting = ep.connect(sa, &name).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("quic://{addr}: cannot connect: {e}"),
            )
        })?;
        let limit = self.config.connect_timeout;
        let conn = match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let err = conn::connection_error(&e);
                return Err(io::Error::new(
                    err.kind(),
                    format!("quic://{addr}: handshake failed: {err}"),
                ));
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("quic://{addr}: no QUIC handshake within {limit:?}"),
                ))
            }
        };
        conn::into_connection(conn, self.config.linger).await
    }

    async fn listen_inner(&self, addr: &str) -> io::Result<Box<dyn Listener>> {
        let (_, sa) = resolve(addr, true).await?;
        let sc = self.config.quinn_server_config()?;
        let ep = endpoint(sa, Some(sc), self.config.socket_buffer)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on quic://{sa}: {e}")))?;
        let local = ep.local_addr()?;
        tracing::debug!(%local, "quic transport listening");
        let local = format!("{SCHEME}://{local}");
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(accept_loop(
            ep.clone(),
            local.clone(),
            self.config.linger,
            tx,
        ));
        Ok(Box::new(QuicListener {
            endpoint: ep,
            local,
            ready,
            task,
        }))
    }
}

impl Transport for QuicTransport {
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

/// A quinn endpoint on a UDP socket bound to `addr` with `buffer`-byte socket buffers.
fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    buffer: usize,
) -> io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too on an unspecified IPv6 address, as quinn does.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer than asked for is not an error.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("quic: no async runtime (run inside tokio)"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        runtime,
    )
}

/// Resolves `host:port`; returns the host part (for the TLS server name) and an address.
async fn resolve(addr: &str, allow_port_zero: bool) -> io::Result<(String, SocketAddr)> {
    let text = addr.strip_prefix("quic://").unwrap_or(addr).to_owned();
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid QUIC address {addr:?}: {why} (expected host:port)"),
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    if port == 0 && !allow_port_zero {
        return Err(bad("port 0 cannot be connected to"));
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok((host, SocketAddr::new(ip, port)));
    }
    let h = host.clone();
    let sa = tokio::task::spawn_blocking(move || (h.as_str(), port).to_socket_addrs())
        .await
        .map_err(io::Error::other)?
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve quic://{text}: {e}")))?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("quic://{text} resolves to no address"),
            )
        })?;
    Ok((host, sa))
}

/// A listening QUIC endpoint that yields fabric connections. Handshakes run concurrently, each
/// in its own task, so a slow or refused client never delays the others.
struct QuicListener {
    endpoint: quinn::Endpoint,
    local: String,
    ready: tokio::sync::mpsc::Receiver<Connection>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        // Refuse new connections; established ones live on until their owners drop them.
        self.endpoint.set_server_config(None);
        self.task.abort();
    }
}

/// Accepts incoming connections and runs their handshakes; established ones go to `tx`.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    local: String,
    linger: Duration,
    tx: tokio::sync::mpsc::Sender<Connection>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        let local = local.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            // A refused handshake fails that connection only: say why and go on.
            match incoming.await {
                Ok(conn) => match conn::into_connection(conn, linger).await {
                    Ok(c) => {
                        let _ = tx.send(c).await;
                    }
                    Err(e) => {
                        tracing::warn!(%local, %remote, error = %e, "quic connection failed during set-up");
                    }
                },
                Err(e) => {
                    tracing::warn!(%local, %remote, error = %conn::connection_error(&e), "quic handshake refused");
                }
            }
        });
    }
}

impl Listener for QuicListener {
    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn accept(&mut self) -> BoxFuture<'_, io::Result<Connection>> {
        Box::pin(async move {
            self.ready.recv().await.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("{}: endpoint closed", self.local),
                )
            })
        })
    }
}
