//! The public async API (tokio): [`Node`], [`Peer`], [`Channel`].
//!
//! - `node.rs`: [`Node`], its listeners, handshakes and one task per peer session;
//! - `peer.rs`: the application handles [`Peer`] and [`Channel`];
//! - `peer_state.rs`: the peer's state (the sans-IO session and its wakers) behind one lock;
//! - `driver.rs`: the task that moves a session's frames over one connection;
//! - `rx.rs`, `tx.rs`: the receiving and sending halves of a peer's connection.
//!
//! Imports: the layers below it: `crate::core` (the session), `crate::frame`,
//! `crate::transport`, `crate::bulk` (the transfer service and notifications a node runs),
//! `crate::sync`, `crate::sliced_copy`, `crate::config`, `crate::class`, `crate::error`; tokio.

mod driver;
mod node;
mod peer;
mod peer_state;
mod rx;
mod tx;

pub use node::{Node, NodeBuilder};
pub use peer::{Channel, ChannelSnapshot, Message, MessageParts, Peer, PeerStats, PendingResponse};
