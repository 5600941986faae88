//! A run's settings: the command line with each workload's defaults applied, and the options
//! that do not apply to the chosen workload or transport refused.

use std::time::Duration;

use crate::args::{BenchArgs, BulkApi, TransportKind, Workload};
use crate::devices::Devices;

/// mixed's default `--coord-interval-us`: round trips back to back (see [`pacer`]).
const DEFAULT_COORD_INTERVAL_US: u64 = 0;

/// Resolved settings of one run (defaults applied).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Transport under test.
    pub transport: TransportKind,
    /// Workload.
    pub workload: Workload,
    /// Pingpong and frames: payload bytes. Mixed: bulk message or block bytes (per
    /// `bulk_api`). Bulk: block bytes. Toolcall: argument bytes.
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
    pub devices: Option<Devices>,
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
        if a.transport == TransportKind::Verbs && !cfg!(feature = "verbs") {
            return Err(crate::VERBS_NOT_BUILT.to_owned());
        }
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
            Workload::Frames => (64, Duration::from_secs(3)),
        };
        Ok(Settings {
            transport: a.transport,
            workload: a.workload,
            size: a.size.unwrap_or(size),
            duration: a.duration.unwrap_or(duration),
            warmup: a.warmup,
            // Without --threads, agentfabric::runtime's count: one fewer than the cores (at least
            // one). The workers are not all the fabric's threads (tcp's bulk lane has two per
            // connection, and the kernel's copies run on the cores too); measured on 2 cores
            // (`bench --transport tcp --workload mixed`): loaded p99 108–116 µs with 2 workers,
            // 57–63 µs with 1, bulk near or above its solo rate either way.
            threads: a
                .threads
                .map_or_else(agentfabric::runtime::worker_threads, usize::from),
            perftest: a.perftest.clone(),
            bulk_api: a.bulk_api.unwrap_or(BulkApi::Channel),
            coord_interval: Duration::from_micros(
                a.coord_interval_us
                    .map_or(DEFAULT_COORD_INTERVAL_US, u64::from),
            ),
            busy_poll: a.busy_poll,
            spin: (a.transport == TransportKind::Verbs).then(|| {
                a.spin_us
                    .map_or_else(default_spin, |us| Duration::from_micros(us.into()))
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

/// The verbs nodes' default spin after a completion (`--spin-us` when not given).
#[cfg(feature = "verbs")]
fn default_spin() -> Duration {
    agentfabric_verbs::VerbsConfig::default().spin_before_sleep
}

/// Without the verbs transport no run takes it (`from_args` refuses it first).
#[cfg(not(feature = "verbs"))]
fn default_spin() -> Duration {
    Duration::ZERO
}
