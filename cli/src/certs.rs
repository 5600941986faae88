//! `agentfabric certs dev [--force] DIR [NODE...]`: writes node certificates for the QUIC
//! transport (mutual TLS) issued by the directory's development CA, made on the first run and
//! kept after, so demos and tests need no manual step. Production uses the operator's CA: load
//! its files with `agentfabric_quic::QuicConfig::from_pem_files`.

use std::path::PathBuf;
use std::process::ExitCode;

use agentfabric_quic::{DevCertError, DevCertOptions};
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
    /// Write, per node, `NODE.pem` and `NODE.key` (valid for both TLS server and client use,
    /// names NODE, localhost, 127.0.0.1, ::1), issued by the directory's development CA
    /// (`ca.pem`, `ca.key`): made on the first run, kept by later ones, so every node
    /// certificate of the directory verifies against the same `ca.pem`.
    Dev {
        /// Replace the certificate and key of a node that has them already (the CA is kept).
        #[arg(long)]
        force: bool,
        /// Directory to write to (created if needed).
        dir: PathBuf,
        /// Node names (default: `node`).
        nodes: Vec<String>,
    },
}

/// Runs `agentfabric certs`.
pub fn main(args: CertsArgs) -> ExitCode {
    match args.command {
        CertsCommand::Dev { force, dir, nodes } => {
            let nodes = if nodes.is_empty() {
                vec!["node".to_owned()]
            } else {
                nodes
            };
            let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let options = DevCertOptions { force };
            match agentfabric_quic::write_dev_certs_with(&dir, &names, options) {
                Ok(files) => {
                    if files.ca_created {
                        eprintln!("new development CA: {}", files.ca_cert.display());
                    } else {
                        eprintln!(
                            "kept the existing CA {} (certificates issued from it before stay valid)",
                            files.ca_cert.display()
                        );
                    }
                    println!("{}", files.ca_cert.display());
                    for (_, cert, key) in &files.nodes {
                        println!("{}\n{}", cert.display(), key.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(DevCertError::NodeExists { node, path }) => {
                    eprintln!(
                        "error: {} exists already: node {node} has a certificate; pass --force \
                         to replace it (nothing was written)",
                        path.display()
                    );
                    ExitCode::FAILURE
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
