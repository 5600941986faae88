//! Tool calls: named, deadline-bound, cancellable requests to tools served by another node, with
//! at-most-once retries and optional hedging. Built on [`Channel::request`](crate::Channel::request) and
//! [`Channel::respond`](crate::Channel::respond) only, so it works over every transport (tool calls usually cross QUIC).
//!
//! ```no_run
//! use std::time::Duration;
//! use agentfabric::tools::{ToolClient, ToolServer, ToolError};
//! use agentfabric::Class;
//! # async fn demo(server_node: agentfabric::Node, peer: agentfabric::Peer) -> Result<(), ToolError> {
//! // Server: register tools, serve them beside the node's own channels.
//! let mut tools = ToolServer::new();
//! tools.register("echo", |req| async move { Ok(req.args) });
//! tools.register("slow", |req| async move {
//!     tokio::select! {
//!         _ = tokio::time::sleep(Duration::from_secs(5)) => Ok("done".into()),
//!         _ = req.cancel.cancelled() => Err("gave up".into()),
//!     }
//! });
//! let mut incoming = tools.serve_beside(server_node);
//! tokio::spawn(async move {
//!     // Every channel that is not a tool call comes here, with its peer (`ch.peer()`).
//!     while let Ok(ch) = incoming.accept_channel().await {
//!         if ch.class() == Class::Coordination {
//!             tokio::spawn(async move {
//!                 while let Ok(m) = ch.recv().await {
//!                     let _ = ch.respond(&m, "ok").await;
//!                 }
//!             });
//!         } // else dropped: nobody reads it
//!     }
//! });
//!
//! // Client: one tool-call channel to the peer.
//! let client = ToolClient::new(&peer)?;
//! let out = client.call("echo", "hi", Duration::from_millis(200)).await?;
//! # Ok(()) }
//! ```
//!
//! # Serving
//!
//! A node's sessions and channels have one taker each, so a node serves tools in one of three
//! ways:
//!
//! - [`ToolServer::serve_beside`]: the tools and the application's own channels together. One
//!   task accepts every session and channel, serves the tool-call channels, and hands every
//!   other channel (and each session) to the application through [`Incoming`], a bounded queue:
//!   when the application does not take them, the queue fills and the task stops accepting.
//!   A channel the application does not want is dropped, never kept.
//! - [`ToolServer::serve`]: a node that serves tools and nothing else. It takes every session,
//!   and drops the channels of other classes unread.
//! - [`ToolServer::serve_peer`] or [`ToolServer::serve_channel`] on sessions or channels the
//!   application accepted itself (`serve_peer` drops the channels of other classes too).
//!
//! # Semantics
//!
//! - **Deadline.** The deadline travels with the request as the time left when it was sent (no
//!   clock agreement needed). The client fails with [`ToolError::DeadlineExceeded`] when it
//!   passes; the server stops the handler then (its [`CancelToken`] fires and its future is
//!   dropped) and answers nothing useful.
//! - **Cancellation.** Dropping the future of [`ToolClient::call`] (or [`PendingCall::cancel`])
//!   sends a cancel message on the same channel, after the request (channels are ordered); the
//!   server fires the handler's [`CancelToken`] and drops the handler's future, so the handler
//!   stops at its next `await`.
//! - **At most once per idempotency key.** A call with a key ([`Call::key`]) runs at most once
//!   per `(tool, key)` while the server remembers the key: a retry (or a duplicate that arrives
//!   while the first runs) gets the first execution's result. The server remembers the last
//!   [`ServerConfig::key_window`] keys (default 10,000). A call whose handler was stopped
//!   (cancelled, deadline, or the serving stopped: an [`Incoming`] or a
//!   [`ToolServer::serve_channel`] future dropped) is forgotten, so a retry runs it again.
//!   [`Call::retries`] retries on a lost session or connection with the same key.
//! - **Hedging** (calls marked idempotent, [`Call::hedged`]): when no answer came within a
//!   percentile of recent latency ([`HedgePolicy`], p95 by default), a second request goes to
//!   the next server (or the same when there is one); the first answer wins and the other
//!   request is cancelled. Hedges are capped at a fraction of calls (10% by default). The hedge
//!   timer is tokio's, whose resolution is 1 ms: a percentile below that still waits about a
//!   millisecond, which bounds how far hedging can cut a sub-millisecond tail.
//!
//! # Wire format
//!
//! Request body: `"TC"`, version 1, kind (1 call, 2 cancel), flags, deadline budget in
//! microseconds (u32 LE), call id (u64 LE), key length (u16 LE), key, tool-name length (u16 LE),
//! tool name, arguments. A cancel carries the call id and nothing after it. Errors are answered
//! with [`Channel::respond_error`](crate::Channel::respond_error) and a reason that starts with its kind (`unknown_tool:`,
//! `failed:`, `cancelled:`, `deadline:`, `refused:`).
//!
//! # Layout
//!
//! - `wire.rs`: the request and cancel envelopes (encoding and decoding);
//! - `cancel.rs`: [`CancelToken`];
//! - `server.rs`: [`ToolServer`] (handlers, the idempotency window, cancellation and deadlines);
//! - `router.rs`: [`ToolServer::serve_beside`] and its [`Incoming`] queue (a node's sessions
//!   and channels: tool calls to the server, the rest to the application);
//! - `client.rs`: [`ToolClient`] (deadlines, retries, hedging, cancel on drop) and
//!   [`ToolError`], the error its calls return;
//! - `convert.rs`: `From` between [`ToolError`] and the crate's [`Error`](crate::Error) (and
//!   from `std::io::Error`), so `?` works across them: a tool call's error in a function that
//!   returns [`crate::Result`] becomes the fabric's error, its tool failure an
//!   [`Error::Tool`](crate::Error::Tool).
//!
//! Imports: `router.rs` uses `server.rs`, `server.rs` uses `wire.rs` and `cancel.rs`, `client.rs`
//! uses `wire.rs`, `convert.rs` uses `client.rs`; `wire.rs` and `cancel.rs` use no other file of
//! the module, and this file only re-exports (and names [`Result`]). Outside the module, only the
//! public API of the crate ([`Node`](crate::Node), [`Peer`](crate::Peer),
//! [`Channel`](crate::Channel), [`Error`](crate::Error)) and tokio.

mod cancel;
mod client;
mod convert;
mod router;
mod server;
mod wire;

#[cfg(test)]
mod tests;

pub use crate::error::ToolFailure;
pub use cancel::CancelToken;
pub use client::{Call, ClientStats, HedgePolicy, PendingCall, ToolClient, ToolError};
pub use router::{Accepted, Incoming};
pub use server::{ServerConfig, ServerStats, ToolRequest, ToolResult, ToolServer};

/// Result with a tool call's [`ToolError`].
pub type Result<T, E = ToolError> = std::result::Result<T, E>;
