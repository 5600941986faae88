//! agentfabric-bench: the fabric measured against a raw baseline in the same process and run;
//! the `agentfabric bench` subcommand is [`main`].
//!
//! Both nodes live in this process and talk over loopback TCP (`tcp://127.0.0.1:0`), loopback
//! QUIC, an in-process [`MemNetwork`](agentfabric::mem::MemNetwork), or one RDMA device (verbs, in the Soft-RoCE lab; the
//! baseline is perftest from the same boot, see [`perftest`]). Workloads:
//! - [`pingpong`]: coordination round trips of `--size` bytes, against raw TCP (or a pair of tokio
//!   mpsc channels for `mem`), interleaved in slices so both see the same machine noise;
//! - [`mixed`]: 64-byte coordination round trips while bulk traffic to the same peer is kept
//!   saturated (messages on a bulk channel, or region writes with `--bulk-api transfer`), with
//!   priorities on and off (FIFO), plus bulk throughput alone;
//! - [`bulk`]: batched region writes against raw streaming of the same block size;
//! - [`register`]: registering a reclaimed buffer again against registering a fresh one;
//! - [`toolcall`]: tool calls with an injected slow tail, without and with hedging;
//! - [`frames`]: coordination round trips against round trips of one raw transport frame (no
//!   session) over the same transport, interleaved in slices: what the session layer costs.
//!
//! Every sample after the warm-up goes into an HDR histogram in nanoseconds ([`report`]).
//!
//! Files: [`args`] (the command line) and [`settings`] (its defaults and refusals); one module
//! per workload; the harness they share: [`pair`] (two nodes and a session), [`pinger`] (one
//! round trip at a time), [`pacer`], [`rate`], the baselines ([`baseline`], [`quic`],
//! [`raw_frames`], [`perftest`]); the verbs nodes (`verbs`, with [`devices`]); and [`report`]
//! (progress, summaries, table; the JSON is `bench/JSON.md`).
//! The benchmarks use the public API of the agentfabric crates only.
//!
//! The verbs transport is the crate's `verbs` feature (on by default): it links rdma-core and
//! needs its headers and libclang to build. Without it the `verbs` module is left out and
//! `--transport verbs` is refused with [`VERBS_NOT_BUILT`].

use std::process::ExitCode;
use std::time::Duration;

pub mod args;
pub mod baseline;
pub mod bulk;
pub mod devices;
pub mod error;
pub mod frames;
pub mod mixed;
pub mod pacer;
pub mod pair;
pub mod perftest;
pub mod pinger;
pub mod pingpong;
pub mod quic;
pub mod rate;
pub mod raw_frames;
pub mod register;
pub mod report;
pub mod round_trips;
pub mod settings;
pub mod toolcall;
#[cfg(feature = "verbs")]
pub mod verbs;

pub use args::{BenchArgs, BulkApi, TransportKind, Workload};
pub use error::{BenchError, BenchResult};
pub use report::Output;
pub use settings::Settings;

use report::progress;

/// Why `verbs` cannot be used in a build without the `verbs` feature, and how to get it.
pub const VERBS_NOT_BUILT: &str = "the verbs transport is not in this build: build agentfabric \
     with the `verbs` feature (the default; e.g. `cargo build --release -p agentfabric-cli`), \
     which needs the rdma-core headers and libclang (Debian: libibverbs-dev librdmacm-dev \
     libclang-dev)";

/// Runs `agentfabric bench` and returns the process exit code.
pub fn main(args: BenchArgs) -> ExitCode {
    let settings = match Settings::from_args(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match agentfabric::runtime::builder()
        .worker_threads(settings.threads)
        .thread_name("bench-worker")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this agentfabric is a debug build (no optimisations): the fabric runs \
             several times slower than in a release build while the raw baselines barely change, \
             so the figures and ratios are not meaningful; build with --release (cargo run \
             --release -p agentfabric-cli -- bench ...)"
        );
    }
    let s = settings.clone();
    let result = rt.block_on(async move {
        // Run on a worker thread, like the nodes' own tasks, not on the main thread.
        match tokio::spawn(run(s)).await {
            Ok(r) => r,
            Err(e) => Err(format!("benchmark task failed: {e}").into()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(mut out) => {
            progress("done");
            if let Some(obj) = out.json.as_object_mut() {
                obj.insert("debug_build".into(), cfg!(debug_assertions).into());
            }
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
        Workload::Frames => frames::run(&s).await,
    }
}
