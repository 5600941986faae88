//! `agentfabric`: the fabric's command-line tool.
//!
//! Subcommands:
//! - `info`: the transports this build can use here, and the RDMA devices the verbs transport sees;
//! - `bench`: measures the fabric against a raw baseline in the same process and prints latency
//!   summaries (a table, or one JSON object with `--json`; see `bench/JSON.md`); the harness and
//!   workloads are the `agentfabric-bench` crate (`bench/`);
//! - `certs`: writes development certificates for the QUIC transport;
//! - `sidecar`: serves the host's agents in any language over a Unix socket (the
//!   `agentfabric-sidecar` crate, `sidecar/`; its protocol is `sidecar/PROTOCOL.md`).
//!
//! Everything here uses the public API of the agentfabric crates only.
//! Standard output carries results only; progress and logs go to standard error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod certs;
mod info;

/// Command line of the `agentfabric` binary.
#[derive(Debug, Parser)]
#[command(
    name = "agentfabric",
    version,
    about = "agentfabric: a low-latency message fabric for AI agents",
    propagate_version = true
)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Show the transports this build can use here and the RDMA devices (ports, state, MTU, GIDs).
    Info,
    /// Measure the fabric against a raw baseline (same process, same run).
    Bench(agentfabric_bench::BenchArgs),
    /// Write certificates for the QUIC transport (`certs dev DIR [NODE...]`).
    Certs(certs::CertsArgs),
    /// Serve this host's agents (any language) over a Unix socket, on one fabric node.
    Sidecar(agentfabric_sidecar::SidecarArgs),
}

/// Sends `tracing` output (the library's warnings, `RUST_LOG` for more) to standard error, so
/// that standard output holds results only.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Info => info::main(),
        Command::Bench(args) => agentfabric_bench::main(args),
        Command::Certs(args) => certs::main(args),
        Command::Sidecar(args) => agentfabric_sidecar::main(args),
    }
}
