//! `agentfabric bench`: the fabric measured against a raw baseline in the same process and run.
//!
//! Both nodes live in this process and talk over loopback TCP (`tcp://127.0.0.1:0`), loopback
//! QUIC, an in-process [`MemNetwork`], or one RDMA device (verbs, in the Soft-RoCE lab; the
//! baseline is perftest from the same boot, see [`verbs`]). Workloads:
//! - [`pingpong`]: coordination round trips of `--size` bytes, against raw TCP (or a pair of tokio
//!   mpsc channels for `mem`), interleaved in slices so both see the same machine noise;
//! - [`mixed`]: 64-byte coordination round trips while bulk traffic to the same peer is kept
//!   saturated (messages on a bulk channel, or region writes with `--bulk-api transfer`), with
//!   priorities on and off (FIFO), plus bulk throughput alone;
//! - [`bulk`]: batched region writes against raw streaming of the same block size;
//! - [`register`]: registering a reclaimed buffer again against registering a fresh one;
//! - [`toolcall`]: tool calls with an injected slow tail, without and with hedging.
//!
//! Every sample after the warm-up goes into an HDR histogram in nanoseconds ([`report`]).

use std::fmt;
use std::future::Future;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentfabric::mem::MemNetwork;
use agentfabric::{Block, Bytes, Channel, Class, Config, Node, Peer, Region};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use tokio::task::AbortHandle;

pub mod baseline;
pub mod bulk;
pub mod mixed;
pub mod pacer;
pub mod pingpong;
pub mod quic;
pub mod register;
pub mod report;
pub mod toolcall;
pub mod verbs;

/// Errors of a benchmark run (fabric, socket or harness failures).
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// Result of a benchmark step.
pub type BenchResult<T> = Result<T, BenchError>;

/// Transports this build can benchmark.
const AVAILABLE_TRANSPORTS: &str = "mem, tcp, quic, verbs";

/// Largest message size accepted by `--size` (the fabric's default `max_message`).
const MAX_SIZE: usize = 128 << 20;

/// Longest `--duration` or `--warmup` accepted, in seconds.
const MAX_SECONDS: f64 = 24.0 * 3600.0;

/// mixed's default `--coord-interval-us`: round trips back to back (see [`pacer`]).
const DEFAULT_COORD_INTERVAL_US: u64 = 0;

/// The transport a benchmark runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// In-process transport ([`MemNetwork`]); baseline: a pair of tokio mpsc channels.
    Mem,
    /// Loopback TCP ([`agentfabric_tcp::TcpTransport`]); baseline: raw tokio `TcpStream`s.
    Tcp,
    /// Loopback QUIC ([`agentfabric_quic::QuicTransport`], mutual TLS with in-memory dev
    /// certificates); baseline: raw quinn.
    Quic,
    /// One RDMA device ([`agentfabric_verbs::VerbsTransport`]); baseline: perftest's figures
    /// from the same lab boot (`--perftest`).
    Verbs,
}

impl TransportKind {
    /// The name used on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Mem => "mem",
            TransportKind::Tcp => "tcp",
            TransportKind::Quic => "quic",
            TransportKind::Verbs => "verbs",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TransportKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "mem" => Ok(TransportKind::Mem),
            "tcp" => Ok(TransportKind::Tcp),
            "quic" => Ok(TransportKind::Quic),
            "verbs" => Ok(TransportKind::Verbs),
            _ => Err(format!(
                "unknown transport {s:?} (available transports: {AVAILABLE_TRANSPORTS})"
            )),
        }
    }
}

/// The benchmark workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Coordination-channel round trips against a raw baseline.
    Pingpong,
    /// Coordination round trips while bulk traffic saturates the same session.
    Mixed,
    /// Batched transfers of `--block-bytes` blocks between registered regions.
    Bulk,
    /// Tool calls with an injected slow tail, without and with hedging.
    Toolcall,
    /// Registering a region from a reclaimed buffer against from a fresh one (`--size` bytes).
    Register,
}

impl Workload {
    /// The name used on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Pingpong => "pingpong",
            Workload::Mixed => "mixed",
            Workload::Bulk => "bulk",
            Workload::Toolcall => "toolcall",
            Workload::Register => "register",
        }
    }
}

/// How the `mixed` workload's bulk load moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BulkApi {
    /// Messages of `--size` bytes sent back to back on a bulk channel.
    Channel,
    /// Batched region writes (`Peer::write`) of `--size`-byte blocks, as a KV-cache hand-off
    /// does.
    Transfer,
}

impl BulkApi {
    /// The name used on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            BulkApi::Channel => "channel",
            BulkApi::Transfer => "transfer",
        }
    }
}

/// Arguments of `agentfabric bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Transport to measure: mem, tcp, quic, or verbs (on an RDMA device: run it through
    /// `soft-roce/lab bench`, which sets the device and address and passes `--perftest`).
    #[arg(long, value_parser = parse_transport, value_name = "mem|tcp|quic|verbs")]
    pub transport: TransportKind,
    /// Workload to run.
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// Message size in bytes: the round-trip payload for pingpong (default 64), the bulk message
    /// (or block, with `--bulk-api transfer`) size for mixed (default 1048576; coordination
    /// messages stay 64 B), the region size for register (default 67108864).
    #[arg(long, value_parser = parse_size, value_name = "BYTES")]
    pub size: Option<usize>,
    /// Measured seconds per measurement, after the warm-up (default 3; 2 per phase for mixed,
    /// whose idle, bulk_solo and loaded phases are each split into 4 interleaved rounds).
    #[arg(long, value_parser = parse_duration, value_name = "SECONDS")]
    pub duration: Option<Duration>,
    /// Block size in bytes for the bulk workload (default 1048576).
    #[arg(long, value_parser = parse_size, value_name = "BYTES")]
    pub block_bytes: Option<usize>,
    /// bulk: pull the blocks (`Peer::read`; RDMA READ over verbs, against `ib_read_bw`) instead
    /// of pushing them (`Peer::write`).
    #[arg(long)]
    pub pull: bool,
    /// verbs: spin on the completion queue (`VerbsConfig::busy_poll`), as perftest does, instead
    /// of sleeping on the completion channel.
    #[arg(long)]
    pub busy_poll: bool,
    /// verbs: after a completion, poll the coordination lane's completion queue this many
    /// microseconds before sleeping on the completion channel (`VerbsConfig::spin_before_sleep`;
    /// the JSON's `spin_us`) [default: the library's, 50]; 0 sleeps at once.
    #[arg(long, value_name = "MICROS", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub spin_us: Option<u32>,
    /// mixed: start coordination round trips at most every this many microseconds, as an agent
    /// that thinks between steps sends them [default: 0, back to back]. Back to back, the round
    /// trips keep a runtime worker busy for as long as they run: on a machine of few cores that
    /// leaves bulk the other cores only. Paced, the worker sleeps between them and each round
    /// trip starts with a wake-up that competes with bulk's copies for a core.
    #[arg(long, value_name = "MICROS", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub coord_interval_us: Option<u32>,
    /// How mixed's bulk load moves its bytes: messages on a bulk channel, or batched region
    /// writes through the transfer API [default: channel].
    #[arg(long, value_enum)]
    pub bulk_api: Option<BulkApi>,
    /// Warm-up seconds before each measurement (not recorded; mixed splits it, like
    /// `--duration`, across the 4 rounds of its idle, bulk_solo and loaded phases).
    #[arg(long, value_parser = parse_warmup, default_value = "0.5", value_name = "SECONDS")]
    pub warmup: Duration,
    /// Worker threads of the tokio runtime that runs both nodes [default: one fewer than the
    /// machine's cores, at least 1, leaving a core to the transports' own threads and the
    /// kernel's copies].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
    /// Print one JSON object on standard output instead of a table.
    #[arg(long)]
    pub json: bool,
    /// verbs: perftest's figures from the same lab boot, the baseline (JSON; see
    /// `sidecar/src/bench/verbs.rs`). Without it the verbs baseline is null.
    #[arg(long, value_name = "FILE")]
    pub perftest: Option<std::path::PathBuf>,
    /// verbs: each node's RDMA device and then its rails (extra devices for one-sided
    /// transfers), as SERVER:CLIENT, e.g. `rxe0,rxe1:rxe1,rxe0` (refused while
    /// `AGENTFABRIC_RAILS` is set). Default: both nodes on the transport's default device
    /// (`AGENTFABRIC_LAB_DEVICE` in the lab), with the rails of `AGENTFABRIC_RAILS`, if any.
    #[arg(long, value_parser = verbs::Devices::parse, value_name = "SERVER:CLIENT")]
    pub devices: Option<verbs::Devices>,
}

fn parse_transport(s: &str) -> Result<TransportKind, String> {
    s.parse()
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of bytes"))?;
    if n == 0 || n > MAX_SIZE {
        return Err(format!("the size must be 1 to {MAX_SIZE} bytes"));
    }
    Ok(n)
}

fn parse_seconds(s: &str, min_exclusive_zero: bool) -> Result<Duration, String> {
    let x: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !x.is_finite() || x < 0.0 || (min_exclusive_zero && x == 0.0) || x > MAX_SECONDS {
        let low = if min_exclusive_zero { "above 0" } else { "0" };
        return Err(format!("expected {low} to {MAX_SECONDS} seconds"));
    }
    Duration::try_from_secs_f64(x).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_seconds(s, true)
}

fn parse_warmup(s: &str) -> Result<Duration, String> {
    parse_seconds(s, false)
}

/// Resolved settings of one run (defaults applied).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Transport under test.
    pub transport: TransportKind,
    /// Workload.
    pub workload: Workload,
    /// Pingpong: payload bytes. Mixed: bulk message or block bytes (per `bulk_api`). Bulk: block
    /// bytes. Toolcall: argument bytes.
    pub size: usize,
    /// Measured time of each measurement.
    pub duration: Duration,
    /// Warm-up before each measurement.
    pub warmup: Duration,
    /// Runtime worker threads.
    pub threads: usize,
    /// verbs: the perftest figures file, if given.
    pub perftest: Option<std::path::PathBuf>,
    /// Mixed: how the bulk load moves its bytes.
    pub bulk_api: BulkApi,
    /// Mixed: least time from one coordination round trip's start to the next (zero: back to
    /// back).
    pub coord_interval: Duration,
    /// verbs: spin on the completion queue.
    pub busy_poll: bool,
    /// verbs: how long the coordination lane polls after a completion before it sleeps.
    pub spin: Option<Duration>,
    /// Bulk: pull (read) the blocks instead of pushing (writing) them.
    pub pull: bool,
    /// verbs: each node's device and rails, if given.
    pub devices: Option<verbs::Devices>,
}

impl Settings {
    /// The JSON's `spin_us`: the verbs spin before sleeping, in microseconds (null off verbs).
    pub fn spin_us(&self) -> Option<u128> {
        self.spin.map(|d| d.as_micros())
    }

    /// Applies the per-workload defaults to the parsed arguments. An option that the chosen
    /// workload or transport does not use is refused, not ignored: the run would not measure
    /// what was asked.
    pub fn from_args(a: &BenchArgs) -> Result<Settings, String> {
        let refuse = |option: &str, applies_to: &str| {
            Err(format!(
                "{option} applies to {applies_to} only, not to workload {} over {}",
                a.workload.name(),
                a.transport
            ))
        };
        if a.bulk_api.is_some() && a.workload != Workload::Mixed {
            return refuse("--bulk-api", "the mixed workload");
        }
        if a.coord_interval_us.is_some() && a.workload != Workload::Mixed {
            return refuse("--coord-interval-us", "the mixed workload");
        }
        if a.pull && a.workload != Workload::Bulk {
            return refuse("--pull", "the bulk workload");
        }
        if a.block_bytes.is_some() && a.workload != Workload::Bulk {
            return refuse("--block-bytes", "the bulk workload (mixed takes --size)");
        }
        if a.busy_poll && a.transport != TransportKind::Verbs {
            return refuse("--busy-poll", "the verbs transport");
        }
        if a.spin_us.is_some() && a.transport != TransportKind::Verbs {
            return refuse("--spin-us", "the verbs transport");
        }
        if a.perftest.is_some() && a.transport != TransportKind::Verbs {
            return refuse("--perftest", "the verbs transport");
        }
        if a.devices.is_some() && a.transport != TransportKind::Verbs {
            return refuse("--devices", "the verbs transport");
        }
        let (size, duration) = match a.workload {
            Workload::Pingpong => (64, Duration::from_secs(3)),
            Workload::Mixed => (1 << 20, Duration::from_secs(2)),
            Workload::Bulk => (a.block_bytes.unwrap_or(1 << 20), Duration::from_secs(3)),
            Workload::Toolcall => (64, Duration::from_secs(3)),
            Workload::Register => (64 << 20, Duration::from_secs(3)),
        };
        Ok(Settings {
            transport: a.transport,
            workload: a.workload,
            size: a.size.unwrap_or(size),
            duration: a.duration.unwrap_or(duration),
            warmup: a.warmup,
            threads: a.threads.map_or_else(default_threads, usize::from),
            perftest: a.perftest.clone(),
            bulk_api: a.bulk_api.unwrap_or(BulkApi::Channel),
            coord_interval: Duration::from_micros(
                a.coord_interval_us
                    .map_or(DEFAULT_COORD_INTERVAL_US, u64::from),
            ),
            busy_poll: a.busy_poll,
            spin: (a.transport == TransportKind::Verbs).then(|| {
                a.spin_us.map_or(
                    agentfabric_verbs::VerbsConfig::default().spin_before_sleep,
                    |us| Duration::from_micros(us.into()),
                )
            }),
            pull: a.pull,
            devices: a.devices.clone(),
        })
    }

    /// A bound on how long one phase (warm-up and measurement) may take before the run is
    /// declared stuck.
    pub fn phase_limit(&self) -> Duration {
        (self.warmup + self.duration) * 3 + Duration::from_secs(30)
    }
}

/// Runs `agentfabric bench` and returns the process exit code.
pub fn main(args: BenchArgs) -> ExitCode {
    let settings = match Settings::from_args(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads)
        .thread_name("bench-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let s = settings.clone();
    let result = rt.block_on(async move {
        // Run on a worker thread, like the nodes' own tasks, not on the main thread.
        match tokio::spawn(run(s)).await {
            Ok(r) => r,
            Err(e) => Err(format!("benchmark task failed: {e}").into()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    progress("done");
    match result {
        Ok(out) => {
            if args.json {
                match serde_json::to_string_pretty(&out.json) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: cannot encode the result: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", out.table);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What a workload produces: the JSON object and the readable table.
pub struct Output {
    /// The JSON object of `notes/bench-json.md`.
    pub json: serde_json::Value,
    /// The same, as a table for people.
    pub table: String,
}

async fn run(s: Settings) -> BenchResult<Output> {
    progress(&format!(
        "bench: transport={} workload={} size={} B duration={:.2} s warmup={:.2} s threads={}",
        s.transport,
        s.workload.name(),
        s.size,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.threads
    ));
    match s.workload {
        Workload::Mixed | Workload::Bulk if s.transport == TransportKind::Quic => Err(format!(
            "workload {} does not run over quic yet (pingpong and toolcall do)",
            s.workload.name()
        )
        .into()),
        Workload::Toolcall if s.transport == TransportKind::Verbs => Err(
            "workload toolcall runs over quic, tcp and mem (tool calls leave the cluster)".into(),
        ),
        Workload::Toolcall => toolcall::run(&s).await,
        Workload::Pingpong => pingpong::run(&s).await,
        Workload::Mixed => mixed::run(&s).await,
        Workload::Bulk => bulk::run(&s).await,
        Workload::Register => register::run(&s).await,
    }
}

/// Prints a progress line on standard error.
pub fn progress(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[agentfabric bench +{t:.2}s] {msg}");
}

/// Bytes a counter advanced by and the seconds it took, summed over one or more slices: a
/// throughput measured in slices is the sum of their bytes over the sum of their times.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Rate {
    bytes: u64,
    secs: f64,
}

impl Rate {
    /// Runs `work` and returns, with its output, what `counter` advanced by while it ran.
    pub(crate) async fn during<T>(counter: &AtomicU64, work: impl Future<Output = T>) -> (Rate, T) {
        let (b0, t0) = (counter.load(Ordering::Relaxed), Instant::now());
        let out = work.await;
        let rate = Rate {
            bytes: counter.load(Ordering::Relaxed).saturating_sub(b0),
            secs: t0.elapsed().as_secs_f64(),
        };
        (rate, out)
    }

    /// MB/s (10^6 bytes per second); 0 when no time was measured.
    pub(crate) fn mb_s(self) -> f64 {
        if self.secs <= 0.0 {
            return 0.0;
        }
        self.bytes as f64 / self.secs / 1e6
    }
}

impl std::ops::AddAssign for Rate {
    fn add_assign(&mut self, other: Rate) {
        self.bytes += other.bytes;
        self.secs += other.secs;
    }
}

/// A histogram of round-trip times in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Something that performs one round trip at a time.
pub enum Pinger {
    /// An agentfabric channel whose peer echoes every message.
    Fabric(FabricPinger),
    /// A raw baseline (TCP stream or mpsc pair).
    Baseline(baseline::BaselinePinger),
    /// Raw quinn echo over one pair of streams (the QUIC baseline; boxed, it is large).
    Quinn(Box<quic::RawQuinn>),
}

impl Pinger {
    /// One round trip.
    pub async fn round_trip(&mut self) -> BenchResult<()> {
        match self {
            Pinger::Fabric(p) => p.round_trip().await,
            Pinger::Baseline(p) => p.round_trip().await,
            Pinger::Quinn(p) => p.round_trip().await,
        }
    }

    /// The fabric pinger inside, if this is one.
    pub fn as_fabric(&self) -> Option<&FabricPinger> {
        match self {
            Pinger::Fabric(p) => Some(p),
            Pinger::Baseline(_) | Pinger::Quinn(_) => None,
        }
    }

    /// Round trips back to back until `until`; each one is recorded (in nanoseconds) when
    /// `hist` is given. Returns the number of round trips made.
    pub async fn run_until(
        &mut self,
        until: Instant,
        hist: Option<&mut Histogram<u64>>,
    ) -> BenchResult<u64> {
        self.run_paced_until(until, hist, &mut pacer::Pacer::back_to_back())
            .await
    }

    /// As [`Pinger::run_until`], each round trip starting when `pacer` lets it; the wait before
    /// a round trip is not part of its time.
    pub async fn run_paced_until(
        &mut self,
        until: Instant,
        mut hist: Option<&mut Histogram<u64>>,
        pacer: &mut pacer::Pacer,
    ) -> BenchResult<u64> {
        let mut n = 0;
        loop {
            pacer.wait().await?;
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

    /// Round trips paced by `pacer` for `warmup`, not recorded, then for `dur`, recorded into
    /// `hist`; returns the recorded count.
    pub async fn warm_then_record(
        &mut self,
        warmup: Duration,
        dur: Duration,
        hist: &mut Histogram<u64>,
        pacer: &mut pacer::Pacer,
    ) -> BenchResult<u64> {
        self.run_paced_until(Instant::now() + warmup, None, pacer)
            .await?;
        self.run_paced_until(Instant::now() + dur, Some(hist), pacer)
            .await
    }
}

/// A client channel of a [`FabricPair`]: sends a payload and waits for the echo.
pub struct FabricPinger {
    channel: Channel,
    payload: Bytes,
}

impl FabricPinger {
    /// One round trip with plain `send` then `recv` (not `request`/`respond`).
    pub async fn round_trip(&mut self) -> BenchResult<()> {
        self.channel.send(self.payload.clone()).await?;
        let m = self.channel.recv().await?;
        if m.body.len() != self.payload.len() {
            return Err(format!(
                "echo of {} bytes came back as {} bytes",
                self.payload.len(),
                m.body.len()
            )
            .into());
        }
        Ok(())
    }
}

/// Two nodes of one transport in this process, connected by one session. The server side
/// echoes every message of a coordination or tool-call channel on the same channel, and drains
/// bulk channels, counting their bytes.
pub struct FabricPair {
    /// The node that connected.
    pub client: Node,
    /// The node that listened.
    pub server: Node,
    /// The client's side of the session.
    pub peer: Peer,
    /// Bytes received so far on the server's bulk channels.
    pub bulk_received: Arc<AtomicU64>,
    /// The server's coordination and tool-call channels (the echoing side).
    server_channels: Arc<Mutex<Vec<Channel>>>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl FabricPair {
    /// Registers a region of `count` blocks of `block` bytes on each node (the source on the
    /// client, the destination on the server) and lists the blocks, each to the same offset.
    pub fn region_pair(&self, block: u64, count: u64) -> BenchResult<(Region, Region, Vec<Block>)> {
        let src = self.client.register((block * count) as usize)?;
        let dst = self.server.register((block * count) as usize)?;
        let blocks = (0..count)
            .map(|i| Block {
                local: i * block,
                remote: i * block,
                len: block,
            })
            .collect();
        Ok((src, dst, blocks))
    }

    /// Builds two nodes with `config` on the run's transport; `tag` names them.
    pub async fn new(s: &Settings, config: Config, tag: &str) -> BenchResult<Self> {
        let (server, client, url) = match s.transport {
            TransportKind::Tcp => {
                let mk = |name: String| {
                    Node::builder(name)
                        .transport(agentfabric_tcp::TcpTransport::new())
                        .config(config.clone())
                        .build()
                };
                (
                    mk(format!("bench-{tag}-server"))?,
                    mk(format!("bench-{tag}-client"))?,
                    "tcp://127.0.0.1:0".to_owned(),
                )
            }
            TransportKind::Quic => quic::nodes(&config, tag)?,
            TransportKind::Verbs => verbs::nodes(&config, tag, s)?,
            TransportKind::Mem => {
                let net = MemNetwork::new();
                let mk = |name: String| {
                    Node::builder(name)
                        .transport(net.transport())
                        .config(config.clone())
                        .build()
                };
                (
                    mk(format!("bench-{tag}-server"))?,
                    mk(format!("bench-{tag}-client"))?,
                    format!("mem://bench-{tag}-server"),
                )
            }
        };
        let addr = server.listen(&url).await?;
        let peer = client.connect(&addr).await?;
        let speer = tokio::time::timeout(Duration::from_secs(5), server.accept())
            .await
            .map_err(|_| "the server node saw no session within 5 s")??;
        let bulk_received = Arc::new(AtomicU64::new(0));
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let server_channels: Arc<Mutex<Vec<Channel>>> = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let tasks = tasks.clone();
            let counter = bulk_received.clone();
            let channels = server_channels.clone();
            tokio::spawn(async move {
                while let Ok(ch) = speer.accept_channel().await {
                    let h = match ch.class() {
                        Class::Bulk => tokio::spawn(drain(ch, counter.clone())),
                        Class::Coordination | Class::ToolCall => {
                            lock(&channels).push(ch.clone());
                            tokio::spawn(echo(ch))
                        }
                    };
                    lock(&tasks).push(h.abort_handle());
                }
            })
        };
        lock(&tasks).push(acceptor.abort_handle());
        Ok(FabricPair {
            client,
            server,
            peer,
            bulk_received,
            server_channels,
            tasks,
        })
    }

    /// Opens a coordination channel that round-trips `size`-byte messages, and makes one round
    /// trip so the server's echo is running.
    pub async fn coordination_pinger(&self, size: usize) -> BenchResult<FabricPinger> {
        let channel = self.peer.channel(Class::Coordination, 7)?;
        let mut p = FabricPinger {
            channel,
            payload: Bytes::from(vec![0xa5u8; size]),
        };
        tokio::time::timeout(Duration::from_secs(5), p.round_trip())
            .await
            .map_err(|_| "the first coordination round trip took over 5 s")??;
        Ok(p)
    }
}

/// The runtime's worker count when `--threads` is not given: one fewer than the machine's cores
/// (at least one). The workers are not all the fabric's threads: the tcp transport's bulk lane
/// has two threads per connection, and the kernel's copies for every socket run on the cores
/// too. With as many workers as cores, a coordination task woken while bulk runs often lands
/// on a core another worker holds and waits its turn there; measured on 2 cores (`agentfabric
/// bench --transport tcp --workload mixed`): loaded p99 108–116 µs with 2 workers, 57–63 µs
/// with 1, bulk near or above its solo rate either way; pingpong ratios alike with 1 or 2.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

impl Drop for FabricPair {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Server side: sends every message back on the same channel.
async fn echo(ch: Channel) {
    while let Ok(m) = ch.recv().await {
        if ch.send(m.body).await.is_err() {
            return;
        }
    }
}

/// Server side: reads every message, counting bytes. Takes each message in its chunks
/// (`recv_parts`), as a bulk consumer that writes the bytes elsewhere would: the raw TCP
/// baseline does not join what it reads either.
async fn drain(ch: Channel, counter: Arc<AtomicU64>) {
    while let Ok(m) = ch.recv_parts().await {
        counter.fetch_add(m.len() as u64, Ordering::Relaxed);
    }
}

/// Peer counters worth showing next to latencies (RTT, window, stalls, retransmits) of the
/// client's session, and the session-level queueing delay (from `send` until the driver took
/// the message's first chunk for the wire, whole microseconds, since the channel opened, warm-up
/// included) of `coord`'s coordination channel on both sides.
pub fn fabric_stats_json(pair: &FabricPair, coord: &FabricPinger) -> serde_json::Value {
    let st = pair.peer.stats();
    let s = &st.session;
    let us = |d: Option<Duration>| d.map(|d| report::round2(d.as_secs_f64() * 1e6));
    let delay = |ch: Option<Channel>| {
        ch.and_then(|c| c.stats())
            .and_then(|c| c.stats.queue_delay_us)
            .map(|h| report::Summary::from_histogram_us(&h).to_json(None))
    };
    let id = coord.channel.id();
    let server = lock(&pair.server_channels)
        .iter()
        .find(|c| c.id() == id)
        .cloned();
    serde_json::json!({
        "srtt_us": us(s.srtt),
        "min_rtt_us": us(s.min_rtt),
        "cwnd": s.cwnd,
        "inflight": s.inflight,
        "queued_bytes": s.queued_bytes,
        "credit_stalls": s.credit_stalls,
        "retransmits": s.retransmits,
        "frames_sent": s.frames_sent,
        "frames_received": s.frames_received,
        "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received,
        "resumes": s.resumes,
        "connected": st.connected,
        "coordination_queue_delay_us": {
            "client": delay(Some(coord.channel.clone())),
            "server": delay(server),
        },
    })
}
