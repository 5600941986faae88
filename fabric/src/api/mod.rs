//! The public async API (tokio): [`Node`], [`Peer`], [`Channel`].

mod driver;
mod node;
mod peer;
mod rx;
mod shared;
mod tx;

pub use node::{Node, NodeBuilder};
pub use peer::{Channel, ChannelSnapshot, Message, MessageParts, Peer, PeerStats};
