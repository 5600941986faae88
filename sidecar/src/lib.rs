//! # agentfabric-sidecar
//!
//! One long-lived process per host holding one fabric node, serving the host's agents in any
//! language over a Unix socket, as `sidecar/PROTOCOL.md` describes. Each client is an
//! endpoint (`node/endpoint`); endpoints on one host talk through the node's in-process
//! transport, others through the node's sessions. A client's regions are its own `memfd`s,
//! mapped and registered, so transfers move its pages without a copy.
//!
//! The `agentfabric sidecar` subcommand runs [`main`]. Layers: [`wire`] (the protocol's
//! frames), `reader`/`writer` (one client's socket), `client` (one client's operations),
//! `hub` and `routing` (the node, shared by every client), `run` (start-up).

#![warn(missing_docs)]

mod client;
pub mod config;
mod endpoint;
mod errors;
mod hub;
mod link;
mod reader;
mod routing;
mod run;
mod shm;
mod socket;
pub mod wire;
mod writer;

pub use config::{Limits, SidecarConfig};
pub use run::{main, run, Sidecar, SidecarArgs};
