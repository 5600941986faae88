//! What the fabric side of the sidecar needs from a connected client: somewhere to deliver an
//! incoming channel, a tool call or a notification. Clients implement it; the hub and the
//! routing hold it as a trait object, so neither depends on the client's code.

use agentfabric::bulk::Notification;
use std::future::Future;
use std::pin::Pin;

use agentfabric::tools::{ToolRequest, ToolResult};
use agentfabric::Channel;

use crate::link::Intro;

/// A connected client, as seen from the fabric.
pub trait Endpoint: Send + Sync {
    /// Takes a channel a remote endpoint opened to this one (introduced by `intro`). `Err`
    /// refuses it with the reason (a full channel table, say). The client is told
    /// (`INCOMING`) before any of the channel's messages.
    fn incoming(&self, ch: Channel, node: String, intro: Intro) -> Result<(), String>;

    /// Whether the client serves `tool` now.
    fn serves(&self, tool: &str) -> bool;

    /// Runs a call of one of the client's tools: forwarded to the client, answered by it.
    fn call(&self, req: ToolRequest) -> Pin<Box<dyn Future<Output = ToolResult> + Send>>;

    /// A peer's transfer into the client's region `region` completed with a notification. It
    /// waits for the client's budget on a task of its own, so that a client that does not read
    /// holds back no other client's notifications.
    fn notify(&self, region: u32, n: Notification);
}
