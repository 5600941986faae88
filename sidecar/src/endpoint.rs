//! What the fabric side of the sidecar needs from a connected client: somewhere to deliver an
//! incoming channel, a tool call or a notification. Clients implement it; the hub and the
//! routing hold it as a trait object, so neither depends on the client's code.

use agentfabric::bulk::Notification;
use agentfabric::tools::ToolServer;
use agentfabric::Channel;

use crate::link::Intro;

/// A connected client, as seen from the fabric.
pub trait Endpoint: Send + Sync {
    /// Takes a channel a remote endpoint opened to this one (introduced by `intro`). `Err`
    /// refuses it with the reason (a full channel table, say). The client is told
    /// (`INCOMING`) before any of the channel's messages.
    fn incoming(&self, ch: Channel, node: String, intro: Intro) -> Result<(), String>;

    /// The endpoint's tool server, serving the tools its client serves.
    fn tools(&self) -> ToolServer;

    /// A peer's transfer into the client's region `region` completed with a notification. It
    /// waits for the client's budget on a task of its own, so that a client that does not read
    /// holds back no other client's notifications.
    fn notify(&self, region: u32, n: Notification);
}
