//! Workload `frames`: what the session layer costs above the transport. Round trips of one
//! `size`-byte data frame through the transport's own frame interface, with no session
//! ([`Transport::listen`]/[`Transport::connect`], `FrameSink::push` and `FrameSink::poll_flush`,
//! `FrameStream::poll_recv`), against coordination-channel round trips of the same size between
//! two nodes on the same transport ([`FabricPair`], as `pingpong`'s fabric side).
//!
//! The raw side is one connection between two transports of the run's kind built as the nodes'
//! are (tcp, quic with the bench's dev certificates, mem on a network of its own, verbs with
//! `--busy-poll`, `--spin-us` and `--devices` applied); a task on the listening end sends every
//! frame it receives straight back. The client pushes one data frame (`FLAG_FIRST | FLAG_LAST`,
//! coordination class, channel 7), flushes it, and waits for the echo. Every listen and connect
//! address is the part after `scheme://`, as [`Transport`] takes it.
//!
//! Both are warmed up for `warmup`, then measured in alternating slices of about half a second
//! (fabric first, then frames, then frames first...) until each has been measured for
//! `duration`, as in `pingpong`. The ratios are fabric / frames. Both pairs stay connected for
//! the whole run: with `--busy-poll` over verbs the idle pair's connections spin too, so both
//! sides' figures include the other pair's pollers.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentfabric::frame::{Frame, Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST};
use agentfabric::mem::MemNetwork;
use agentfabric::sync::lock;
use agentfabric::transport::{split_url, Connection, Listener, Transport};
use agentfabric::{Bytes, Class, Config};
use agentfabric_quic::QuicTransport;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::args::{TransportKind, Workload};
use crate::devices::Devices;
use crate::error::BenchResult;
use crate::pair::{fabric_stats_json, FabricPair};
use crate::pinger::Pinger;
use crate::report::{fmt_ratio, new_histogram, progress, ratio, Output, Summary, Table};
use crate::settings::Settings;
use crate::{quic, verbs};

/// Longest measured slice before switching to the other side.
const SLICE: Duration = Duration::from_millis(500);

/// Bound on each step of setting up the raw connection (listen, connect, first round trip).
/// Generous: under emulation (Soft-RoCE in a TCG VM) rxe can stall for over a second.
const SETUP_LIMIT: Duration = Duration::from_secs(30);

/// The channel number the raw frames carry (the one the fabric's coordination pinger opens).
const CHANNEL: u32 = 7;

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let pair = FabricPair::new(s, Config::default(), "frames").await?;
    let mut fabric = Pinger::Fabric(pair.coordination_pinger(s.size).await?);
    let mut raw = RawFrames::new(s).await?;

    let work = async {
        let mut hf = new_histogram();
        let mut hr = new_histogram();
        progress("warming up fabric and raw transport frames");
        fabric.run_until(Instant::now() + s.warmup, None).await?;
        raw.run_until(Instant::now() + s.warmup, None).await?;

        let slices = (s.duration.as_secs_f64() / SLICE.as_secs_f64())
            .ceil()
            .max(1.0) as u32;
        let slice = s.duration / slices;
        progress(&format!(
            "measuring {slices} interleaved slices of {:.3} s each",
            slice.as_secs_f64()
        ));
        for i in 0..slices {
            if i % 2 == 0 {
                fabric
                    .run_until(Instant::now() + slice, Some(&mut hf))
                    .await?;
                raw.run_until(Instant::now() + slice, Some(&mut hr)).await?;
            } else {
                raw.run_until(Instant::now() + slice, Some(&mut hr)).await?;
                fabric
                    .run_until(Instant::now() + slice, Some(&mut hf))
                    .await?;
            }
        }
        BenchResult::Ok((hf, hr))
    };
    let limit = s.phase_limit() * 2;
    let (hf, hr): (Histogram<u64>, Histogram<u64>) =
        tokio::time::timeout(limit, work).await.map_err(|_| {
            format!(
                "the frames measurement did not finish within {limit:?}{}",
                echo_note(&raw.echo_error)
            )
        })??;

    let fabric_sum = Summary::from_histogram(&hf);
    let frames_sum = Summary::from_histogram(&hr);
    let stats = match fabric.as_fabric() {
        Some(f) => fabric_stats_json(&pair, f),
        None => serde_json::Value::Null,
    };
    let r = |f: fn(&Summary) -> f64| ratio(f(&fabric_sum), f(&frames_sum));
    let r50 = r(|x| x.p50_us);
    let r99 = r(|x| x.p99_us);
    let r999 = r(|x| x.p999_us);

    let json = json!({
        "transport": s.transport.name(),
        "workload": Workload::Frames.name(),
        "size_bytes": s.size,
        "duration_s": s.duration.as_secs_f64(),
        "warmup_s": s.warmup.as_secs_f64(),
        "threads": s.threads,
        "busy_poll": s.busy_poll,
        "spin_us": s.spin_us(),
        "devices": s.devices.as_ref().map(Devices::to_json),
        "version": env!("CARGO_PKG_VERSION"),
        "fabric": fabric_sum.to_json(None),
        "frames": frames_sum.to_json(None),
        "ratio_p50": r50,
        "ratio_p99": r99,
        "ratio_p999": r999,
        "fabric_stats": stats,
    });

    let mut t = Table::new(&format!(
        "agentfabric {} bench: transport={} workload=frames size={} B duration={:.2} s \
         warmup={:.2} s threads={}",
        env!("CARGO_PKG_VERSION"),
        s.transport,
        s.size,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.threads
    ));
    t.row(
        "fabric",
        &fabric_sum,
        &format!(
            "fabric/frames: p50 {} p99 {} p99.9 {}",
            fmt_ratio(r50),
            fmt_ratio(r99),
            fmt_ratio(r999)
        ),
    );
    t.row(
        &format!("{} frames", s.transport),
        &frames_sum,
        "no session",
    );
    t.line(&format!("fabric_stats: {stats}"));
    Ok(Output {
        json,
        table: t.finish(),
    })
}

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
        TransportKind::Verbs => {
            let devices = s.devices.as_ref();
            Transports::new(
                verbs::transport(s, devices.map(|d| &d.server)),
                verbs::transport(s, devices.map(|d| &d.client)),
                format!("verbs://{}:0", verbs::listen_addr()?),
            )
        }
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
type EchoError = Arc<Mutex<Option<String>>>;

/// `"; the echo side: …"` when the echo task recorded an error, else empty.
fn echo_note(error: &EchoError) -> String {
    match lock(error).as_deref() {
        Some(e) => format!("; the echo side: {e}"),
        None => String::new(),
    }
}

/// Round trips of one data frame over one raw transport connection whose other end echoes it.
/// Dropping it stops the echo task.
struct RawFrames {
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
    /// Two transports of the run's kind, one listening and one connected to it, the echo task
    /// on the listening end, and one round trip made.
    async fn new(s: &Settings) -> BenchResult<RawFrames> {
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
    async fn round_trip(&mut self) -> BenchResult<()> {
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

    /// Round trips back to back until `until`; each one is recorded (in nanoseconds) when
    /// `hist` is given (as [`Pinger::run_until`]).
    async fn run_until(
        &mut self,
        until: Instant,
        mut hist: Option<&mut Histogram<u64>>,
    ) -> BenchResult<u64> {
        let mut n = 0;
        loop {
            let t0 = Instant::now();
            if t0 >= until {
                return Ok(n);
            }
            self.round_trip().await?;
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if let Some(h) = hist.as_deref_mut() {
                h.saturating_record(ns.max(1));
            }
            n += 1;
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
