//! `agentfabric info`: which transports this build can use here, and the RDMA devices, ports,
//! states, MTUs and GIDs (with their types) the verbs transport would see (in a build with the
//! `verbs` feature; without it, how to get it).

use std::process::ExitCode;

/// Prints the report on standard output. Exits 0 even when no RDMA device is present (that is
/// information, not an error).
pub fn main() -> ExitCode {
    println!("agentfabric {}", env!("CARGO_PKG_VERSION"));
    println!();
    println!("transports in this build:");
    println!("  mem    in-process (tests, single-process agents)");
    println!("  tcp    three lanes per connection (latency, bulk, one-sided), TCP_NODELAY");
    println!(
        "  quic   quinn + rustls, mutual TLS, ALPN {}",
        agentfabric_quic::ALPN
    );
    verbs();
    ExitCode::SUCCESS
}

/// The verbs line, and the RDMA devices when there are some.
#[cfg(feature = "verbs")]
fn verbs() {
    match agentfabric_verbs::devices() {
        Ok(devs) if devs.is_empty() => {
            println!("  verbs  not available: rdma-core found no RDMA device");
            println!(
                "         (create one with soft-roce/lab setup, or run inside soft-roce/lab run)"
            );
        }
        Ok(devs) => {
            println!("  verbs  available: {} RDMA device(s)", devs.len());
            println!();
            println!("RDMA devices:");
            for d in devs {
                print!("{d}");
            }
        }
        Err(e) => {
            println!("  verbs  not available: {e}");
        }
    }
}

/// The verbs line of a build without the verbs transport.
#[cfg(not(feature = "verbs"))]
fn verbs() {
    println!("  verbs  not in this build: build with the `verbs` feature (the default), which");
    println!("         needs libibverbs-dev librdmacm-dev libclang-dev");
}
