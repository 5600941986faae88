//! `agentfabric certs dev DIR [NODE...]`: writes a development CA and node certificates for the
//! QUIC transport (mutual TLS), so demos and tests need no manual step. Production uses the
//! operator's CA: load its files with `agentfabric_quic::QuicConfig::from_pem_files`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

/// Arguments of `agentfabric certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// What to make.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// The `certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a development CA (`ca.pem`, `ca.key`) and, per node, `NODE.pem` and `NODE.key`
    /// (valid for both TLS server and client use, names NODE, localhost, 127.0.0.1, ::1).
    Dev {
        /// Directory to write to (created if needed).
        dir: PathBuf,
        /// Node names (default: `node`).
        nodes: Vec<String>,
    },
}

/// Runs `agentfabric certs`.
pub fn main(args: CertsArgs) -> ExitCode {
    match args.command {
        CertsCommand::Dev { dir, nodes } => {
            let nodes = if nodes.is_empty() {
                vec!["node".to_owned()]
            } else {
                nodes
            };
            let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
            match agentfabric_quic::write_dev_certs(&dir, &names) {
                Ok(files) => {
                    println!("{}", files.ca_cert.display());
                    for (_, cert, key) in &files.nodes {
                        println!("{}\n{}", cert.display(), key.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "error: cannot write development certificates to {}: {e}",
                        dir.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}
