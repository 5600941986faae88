//! `agentfabric info`: which transports this build can use here, and the RDMA devices, ports,
//! states, MTUs and GIDs (with their types) the verbs transport would see.

use std::process::ExitCode;

/// Prints the report on standard output. Exits 0 even when no RDMA device is present (that is
/// information, not an error).
pub fn main() -> ExitCode {
    println!("agentfabric {}", env!("CARGO_PKG_VERSION"));
    println!();
    println!("transports in this build:");
    println!("  mem    in-process (tests, single-process agents)");
    println!("  tcp    two lanes per connection (latency, bulk), TCP_NODELAY");
    println!(
        "  quic   quinn + rustls, mutual TLS, ALPN {}",
        agentfabric_quic::ALPN
    );
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
    ExitCode::SUCCESS
}
