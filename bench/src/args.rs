//! The command line of `agentfabric bench`: the transports, workloads and options it takes, each
//! parsed and range-checked here so a bad value is refused with its reason before anything runs.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::devices::Devices;

/// Transports this build can benchmark.
const AVAILABLE_TRANSPORTS: &str = "mem, tcp, quic, verbs";

/// Largest message size accepted by `--size` (the fabric's default `max_message`).
const MAX_SIZE: usize = 128 << 20;

/// Longest `--duration` or `--warmup` accepted, in seconds.
const MAX_SECONDS: f64 = 24.0 * 3600.0;

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
    /// One RDMA device (`agentfabric_verbs::VerbsTransport`, in builds with the `verbs`
    /// feature); baseline: perftest's figures from the same lab boot (`--perftest`).
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
    /// Coordination round trips against round trips of one raw transport frame (no session).
    Frames,
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
            Workload::Frames => "frames",
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
    /// Message size in bytes: the round-trip payload for pingpong and frames (default 64), the
    /// bulk message (or block, with `--bulk-api transfer`) size for mixed (default 1048576;
    /// coordination messages stay 64 B), the region size for register (default 67108864).
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
    /// `bench/src/perftest.rs`). Without it the verbs baseline is null.
    #[arg(long, value_name = "FILE")]
    pub perftest: Option<std::path::PathBuf>,
    /// verbs: each node's RDMA device and then its rails (extra devices for one-sided
    /// transfers), as SERVER:CLIENT, e.g. `rxe0,rxe1:rxe1,rxe0` (refused while
    /// `AGENTFABRIC_RAILS` is set). Default: both nodes on the transport's default device
    /// (`AGENTFABRIC_LAB_DEVICE` in the lab), with the rails of `AGENTFABRIC_RAILS`, if any.
    #[arg(long, value_parser = Devices::parse, value_name = "SERVER:CLIENT")]
    pub devices: Option<Devices>,
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
