//! The sidecar's settings and its per-client limits (PROTOCOL.md's "Limits").

use std::path::PathBuf;
use std::time::Duration;

/// Per-client limits. `HELLO_OK` tells the client the first three.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest frame, header included, in either direction.
    pub max_frame: u32,
    /// Operations in flight per client; past it the sidecar stops reading the client's socket.
    pub max_ops: u32,
    /// Unanswered `SEND`s per channel.
    pub send_window: u32,
    /// Channels open per client.
    pub max_channels: usize,
    /// Regions registered per client.
    pub max_regions: usize,
    /// Tools served per client.
    pub max_tools: usize,
    /// Bytes of events (messages, calls, notifications) queued to one client before the traffic
    /// addressed to it waits.
    pub queued_bytes: usize,
    /// Deadline of a transfer whose `WRITE`/`READ` gave none.
    pub transfer_deadline: Duration,
    /// How long a remote sidecar may take to introduce an incoming channel.
    pub intro_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: (16 << 20) + (64 << 10),
            max_ops: 1024,
            send_window: 64,
            max_channels: 4096,
            max_regions: 1024,
            max_tools: 256,
            queued_bytes: 64 << 20,
            transfer_deadline: Duration::from_secs(60),
            intro_deadline: Duration::from_secs(5),
        }
    }
}

/// Everything the sidecar needs to start.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The fabric node's name (remote agents reach endpoints as `node/endpoint`).
    pub node: String,
    /// Addresses the node listens on (`tcp://…`, `quic://…`, `verbs://…`); may be empty for a
    /// sidecar that only connects out and serves its own host.
    pub listen: Vec<String>,
    /// The private directory of the socket (created 0700).
    pub socket_dir: PathBuf,
    /// Uids allowed to connect, besides the sidecar's own.
    pub allow_uids: Vec<u32>,
    /// QUIC's CA certificate, node certificate and key (PEM); without them there is no QUIC.
    pub quic_pem: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Whether to add the verbs transport (also implied by a `verbs://` listen address).
    pub verbs: bool,
    /// The per-client limits.
    pub limits: Limits,
}

impl SidecarConfig {
    /// The default socket directory for `node`: `$XDG_RUNTIME_DIR/agentfabric/<node>`, else
    /// `/tmp/agentfabric-<uid>/<node>`.
    pub fn default_socket_dir(node: &str) -> PathBuf {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("agentfabric").join(node),
            _ => PathBuf::from(format!("/tmp/agentfabric-{}", nix::unistd::getuid())).join(node),
        }
    }

    /// The socket's path.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join("sidecar.sock")
    }
}
