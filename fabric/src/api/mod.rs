//! The public async API (tokio): [`Node`], [`Peer`], [`Channel`].

mod driver;
mod node;
mod peer;
mod peer_state;
mod rx;
mod tx;

pub use node::{Node, NodeBuilder};
pub use peer::{Channel, ChannelSnapshot, Message, MessageParts, Peer, PeerStats};
