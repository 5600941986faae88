//! # agentfabric
//!
//! A low-latency message fabric for AI agents: ordered, prioritised, congestion-aware channels
//! over pluggable transports (in-process, TCP; QUIC and verbs as separate crates).
//!
//! ```no_run
//! use agentfabric::{Class, Node};
//! # async fn demo() -> agentfabric::Result<()> {
//! let net = agentfabric::mem::MemNetwork::new();
//! let server = Node::builder("subagent").transport(net.transport()).build()?;
//! let addr = server.listen("mem://subagent").await?;
//! let client = Node::builder("orchestrator").transport(net.transport()).build()?;
//! let peer = client.connect(&addr).await?;
//! let plan = peer.channel(Class::Coordination, 5)?;
//! plan.send("step 1: fetch the documents").await?;
//! let theirs = server.accept().await?.accept_channel().await?;
//! assert_eq!(&theirs.recv().await?.body[..], b"step 1: fetch the documents");
//! # Ok(()) }
//! ```
//!
//! Layers: [`frame`] (wire format) and [`core`] (the sans-IO session state machine) know nothing
//! of sockets or time; [`transport`] is the small trait transports implement; [`Node`],
//! [`Peer`] and [`Channel`] are the async API on tokio; [`mem`] is the in-process transport.
//! [`bulk`] moves blocks between registered regions and [`tools`] makes tool calls, both on
//! that API. [`sim`] runs two sessions over a virtual link; its link and [`mem`]'s network are
//! impaired as an [`impair::Impairment`] says. [`sync`] is the one poison-ignoring lock the
//! fabric and its transports use. [`runtime()`] builds the tokio runtime to run it on: one
//! worker fewer than the cores, so that the transports' bulk threads have one ([`mod@runtime`]).

#![warn(missing_docs)]

mod api;
pub mod bulk;
pub mod class;
pub mod config;
pub mod core;
pub mod error;
pub mod frame;
pub mod impair;
pub mod mem;
pub mod runtime;
pub mod sim;
mod sliced_copy;
pub mod sync;
mod thread_priority;
pub mod tools;
pub mod transport;

pub use api::{
    Channel, ChannelSnapshot, Message, MessageParts, Node, NodeBuilder, Peer, PeerStats,
    PendingResponse,
};
pub use bulk::{AlignedBuf, Block, Region, RegionDescriptor};
pub use bytes::Bytes;
pub use class::{Class, Priority};
pub use config::{Config, CongestionConfig, PerClass};
pub use core::{ChannelStats, SessionStats};
pub use error::{Error, ProtocolError, Result};
pub use frame::MAX_CHANNEL_NAME;
pub use runtime::runtime;
