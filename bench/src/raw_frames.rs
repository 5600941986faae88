//! The frames workload's baseline: one raw connection of the run's transport, no session, whose
//! listening end echoes every frame; [`RawFrames`] makes one round trip at a time (one data
//! frame pushed, flushed, and its echo received) through the transport's frame interface
//! ([`Transport::listen`]/[`Transport::connect`], `FrameSink::push` and `FrameSink::poll_flush`,
//! `FrameStream::poll_recv`). Both transports are built as [`crate::pair::FabricPair`] builds
//! its nodes' (tcp, quic with the bench's dev certificates, mem on a network of its own, verbs
//! with `--busy-poll`, `--spin-us` and `--devices` applied). Every listen and connect address is
//! the part after `scheme://`, as [`Transport`] takes it.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfabric::frame::{Frame, Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST};
use agentfabric::mem::MemNetwork;
use agentfabric::sync::lock;
use agentfabric::transport::{split_url, Connection, Listener, Transport};
use agentfabric::{Bytes, Class};
use agentfabric_quic::QuicTransport;

use crate::args::TransportKind;
use crate::error::BenchResult;
use crate::quic;
use crate::settings::Settings;

/// Bound on each step of setting up the raw connection (listen, connect, first round trip).
/// Generous: under emulation (Soft-RoCE in a TCG VM) rxe can stall for over a second.
const SETUP_LIMIT: Duration = Duration::from_secs(30);

/// The channel id the raw frames carry: any id does, with no session to open channels.
const CHANNEL: u32 = 7;

/// The part of `url` after `scheme://`, which [`Transport::listen`] and [`Transport::connect`]
/// take.
fn address_of(url: &str) -> BenchResult<&str> {
    split_url(url)
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{url:?} is not a scheme://address URL").into())
}

/// The two transports of the raw connection and the URL the server listens on.
struct Transports {
    server: Box<dyn Transport>,
    client: Box<dyn Transport>,
    url: String,
}

impl Transports {
    fn new(server: impl Transport, client: impl Transport, url: impl Into<String>) -> Transports {
        Transports {
            server: Box::new(server),
            client: Box::new(client),
            url: url.into(),
        }
    }
}

/// The server and client transports of the run's transport kind, each built as
/// [`FabricPair::new`] builds its nodes' transports, and the listen URL.
fn transports(s: &Settings) -> BenchResult<Transports> {
    Ok(match s.transport {
        TransportKind::Mem => {
            let net = MemNetwork::new();
            Transports::new(
                net.transport(),
                net.transport(),
                "mem://bench-frames-raw-server",
            )
        }
        TransportKind::Tcp => Transports::new(
            agentfabric_tcp::TcpTransport::new(),
            agentfabric_tcp::TcpTransport::new(),
            "tcp://127.0.0.1:0",
        ),
        TransportKind::Quic => Transports::new(
            QuicTransport::new(quic::config("bench-frames-raw-server")?)?,
            QuicTransport::new(quic::config("bench-frames-raw-client")?)?,
            "quic://127.0.0.1:0",
        ),
        #[cfg(feature = "verbs")]
        TransportKind::Verbs => {
            use crate::verbs;
            let devices = s.devices.as_ref();
            Transports::new(
                verbs::transport(s, devices.map(|d| &d.server)),
                verbs::transport(s, devices.map(|d| &d.client)),
                format!("verbs://{}:0", verbs::listen_addr()?),
            )
        }
        #[cfg(not(feature = "verbs"))]
        TransportKind::Verbs => return Err(crate::VERBS_NOT_BUILT.into()),
    })
}

/// One data frame of `size` payload bytes, a whole message (`FLAG_FIRST | FLAG_LAST`) on a
/// coordination channel.
fn data_frame(size: usize) -> BenchResult<OutFrame> {
    let mut h = Header::new(Kind::Data);
    h.flags = FLAG_FIRST | FLAG_LAST;
    h.class = Class::Coordination;
    h.channel = CHANNEL;
    h.len = u32::try_from(size).map_err(|_| format!("{size} B does not fit one frame"))?;
    Ok(OutFrame {
        header: h.encode(),
        payload: Bytes::from(vec![0xa5u8; size]),
    })
}

/// What the echo task saw go wrong, if anything (shown when the client's side fails).
pub type EchoError = Arc<Mutex<Option<String>>>;

/// `"; the echo side: …"` when the echo task recorded an error, else empty.
pub fn echo_note(error: &EchoError) -> String {
    match lock(error).as_deref() {
        Some(e) => format!("; the echo side: {e}"),
        None => String::new(),
    }
}

/// Round trips of one data frame over one raw transport connection whose other end echoes it.
/// Dropping it stops the echo task.
pub struct RawFrames {
    conn: Connection,
    frame: OutFrame,
    size: usize,
    got: Vec<Frame>,
    echo: tokio::task::JoinHandle<()>,
    echo_error: EchoError,
    /// The transports, kept for as long as their connection is used.
    _transports: (Box<dyn Transport>, Box<dyn Transport>),
}

impl Drop for RawFrames {
    fn drop(&mut self) {
        self.echo.abort();
    }
}

impl RawFrames {
    /// What the echo task saw go wrong, shared with it (for [`echo_note`]).
    pub fn echo_error(&self) -> EchoError {
        self.echo_error.clone()
    }

    /// Two transports of the run's kind, one listening and one connected to it, the echo task
    /// on the listening end, and one round trip made.
    pub async fn new(s: &Settings) -> BenchResult<RawFrames> {
        let Transports {
            server,
            client,
            url,
        } = transports(s)?;
        let max = server.max_frame_payload().min(client.max_frame_payload());
        if s.size > max {
            return Err(format!(
                "the frames workload sends one frame per round trip and the {} transport \
                 carries at most {max} B in one: --size {} is too large",
                s.transport, s.size
            )
            .into());
        }
        let frame = data_frame(s.size)?;
        let listener = tokio::time::timeout(SETUP_LIMIT, server.listen(address_of(&url)?))
            .await
            .map_err(|_| format!("listening on {url} took over {SETUP_LIMIT:?}"))?
            .map_err(|e| format!("cannot listen on {url} for the raw frames: {e}"))?;
        let local = listener.local_addr();
        let target = address_of(&local)?.to_owned();
        let echo_error: EchoError = Arc::new(Mutex::new(None));
        let echo = tokio::spawn(echo(listener, echo_error.clone()));
        let conn = match tokio::time::timeout(SETUP_LIMIT, client.connect(&target)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                echo.abort();
                return Err(format!("cannot connect to {local} for the raw frames: {e}").into());
            }
            Err(_) => {
                echo.abort();
                return Err(format!("connecting to {local} took over {SETUP_LIMIT:?}").into());
            }
        };
        let mut me = RawFrames {
            conn,
            frame,
            size: s.size,
            got: Vec::new(),
            echo,
            echo_error,
            _transports: (server, client),
        };
        // QUIC announces a stream with its first bytes: the echo's accept returns only now.
        tokio::time::timeout(SETUP_LIMIT, me.round_trip())
            .await
            .map_err(|_| {
                format!(
                    "the first raw frame round trip took over {SETUP_LIMIT:?}{}",
                    echo_note(&me.echo_error)
                )
            })??;
        Ok(me)
    }

    /// One round trip: push the frame, flush it, and wait for the one frame that comes back.
    pub async fn round_trip(&mut self) -> BenchResult<()> {
        let Connection { sink, stream, .. } = &mut self.conn;
        sink.push(self.frame.clone());
        if let Err(e) = poll_fn(|cx| sink.poll_flush(cx)).await {
            return Err(format!(
                "sending a raw frame failed: {e}{}",
                echo_note(&self.echo_error)
            )
            .into());
        }
        self.got.clear();
        // `Ready(Ok)` adds at least one frame; loop anyway so an empty return cannot pass.
        while self.got.is_empty() {
            if let Err(e) = poll_fn(|cx| stream.poll_recv(cx, &mut self.got)).await {
                return Err(format!(
                    "waiting for the echoed raw frame failed: {e}{}",
                    echo_note(&self.echo_error)
                )
                .into());
            }
        }
        match self.got.as_slice() {
            [f] if f.header.kind == Kind::Data && f.payload.len() == self.size => Ok(()),
            [f] => Err(format!(
                "the echo of a {} B data frame came back as a {:?} frame of {} B",
                self.size,
                f.header.kind,
                f.payload.len()
            )
            .into()),
            more => Err(format!(
                "one raw frame was sent and {} came back in one receive",
                more.len()
            )
            .into()),
        }
    }
}

/// The listening end: accepts one connection and sends every frame it receives straight back,
/// until the connection ends (or the task is aborted). Keeps the listener for as long as it
/// runs (a QUIC listener's endpoint carries the connection). Records what ended it, unless the
/// client closed the connection.
async fn echo(mut listener: Box<dyn Listener>, error: EchoError) {
    let fail = |what: String| *lock(&error) = Some(what);
    let Connection {
        mut sink,
        mut stream,
        ..
    } = match listener.accept().await {
        Ok(c) => c,
        Err(e) => return fail(format!("accepting the raw connection failed: {e}")),
    };
    let mut got = Vec::new();
    loop {
        got.clear();
        match poll_fn(|cx| stream.poll_recv(cx, &mut got)).await {
            Ok(()) => {}
            Err(agentfabric::transport::RecvError::Eof) => return,
            Err(e) => return fail(format!("receiving a raw frame failed: {e}")),
        }
        for f in got.drain(..) {
            sink.push(f.encode());
        }
        if let Err(e) = poll_fn(|cx| sink.poll_flush(cx)).await {
            return fail(format!("echoing a raw frame failed: {e}"));
        }
    }
}
