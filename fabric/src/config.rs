//! Session configuration and its defaults.
//!
//! The defaults are the ones the benchmarks run with: what a user gets without tuning is what the
//! benchmark shows.

use std::time::Duration;

use crate::class::Class;

/// Per-class values, indexed by [`Class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerClass<T> {
    /// Value for [`Class::Coordination`].
    pub coordination: T,
    /// Value for [`Class::ToolCall`].
    pub toolcall: T,
    /// Value for [`Class::Bulk`].
    pub bulk: T,
}

impl<T: Copy> PerClass<T> {
    /// The value for `class`.
    pub fn get(&self, class: Class) -> T {
        match class {
            Class::Coordination => self.coordination,
            Class::ToolCall => self.toolcall,
            Class::Bulk => self.bulk,
        }
    }
}

/// Delay-based congestion control (Swift/Timely style) settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CongestionConfig {
    /// Window at session start, in bytes.
    pub initial_window: u64,
    /// The window never shrinks below this.
    pub min_window: u64,
    /// The window never grows above this.
    pub max_window: u64,
    /// Queueing delay tolerated above the smallest RTT seen before the window shrinks.
    pub target_delay: Duration,
    /// Bytes that coordination and tool-call traffic may have in flight beyond the window, so
    /// bulk shrinks first and coordination keeps a reserved share.
    pub coordination_reserve: u64,
}

impl Default for CongestionConfig {
    fn default() -> Self {
        CongestionConfig {
            initial_window: 1 << 20,
            min_window: 128 << 10,
            max_window: 32 << 20,
            target_delay: Duration::from_micros(200),
            coordination_reserve: 256 << 10,
        }
    }
}

/// Configuration of a session (and so of every session a node makes).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// A peer from which nothing has been received for this long is declared dead and every
    /// pending operation fails. Reconnection attempts happen within this bound.
    pub peer_timeout: Duration,
    /// `Node::connect` gives up when the transport connection and the handshake together take
    /// longer than this (RDMA connection set-up can be slow: queue pairs, memory registration).
    pub connect_timeout: Duration,
    /// A keepalive ping is sent when nothing was received for this long.
    pub keepalive_interval: Duration,
    /// An acknowledgement waits at most this long for a reply to piggyback on.
    pub ack_delay: Duration,
    /// Largest message accepted, sent or received (bytes).
    pub max_message: usize,
    /// Receive window per channel (bytes the peer may have unread), by class.
    pub recv_window: PerClass<u32>,
    /// Largest chunk a message is cut into, by class. Smaller chunks bound how long coordination
    /// waits behind bulk; larger ones cost fewer frames.
    pub chunk_size: PerClass<u32>,
    /// Bytes a channel's send queue holds before `send` waits (`try_send` would block), by class.
    /// A single message larger than this is accepted when the queue is empty.
    pub send_queue_bytes: PerClass<usize>,
    /// Messages a channel's send queue holds before `send` waits.
    pub send_queue_messages: usize,
    /// Most channels one session may have open (both sides' together).
    pub max_channels: usize,
    /// Strict priority between classes; `false` sends every message in one first-in first-out
    /// order (only useful as a benchmark baseline).
    pub priorities: bool,
    /// A lower class waiting this long while higher classes keep the link busy gets one chunk out.
    pub starvation_bound: Duration,
    /// Congestion control.
    pub congestion: CongestionConfig,
    /// Smallest retransmission timeout, used only on transports that may lose frames.
    pub min_rto: Duration,
    /// Record per-channel HDR latency histograms (queueing delay, request round trips).
    pub channel_histograms: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            peer_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_millis(200),
            ack_delay: Duration::from_millis(1),
            max_message: 128 << 20,
            recv_window: PerClass {
                coordination: 256 << 10,
                toolcall: 1 << 20,
                bulk: 8 << 20,
            },
            chunk_size: PerClass {
                coordination: 16 << 10,
                toolcall: 32 << 10,
                bulk: 256 << 10,
            },
            send_queue_bytes: PerClass {
                coordination: 256 << 10,
                toolcall: 1 << 20,
                bulk: 8 << 20,
            },
            send_queue_messages: 4096,
            max_channels: 65_536,
            priorities: true,
            starvation_bound: Duration::from_millis(5),
            congestion: CongestionConfig::default(),
            min_rto: Duration::from_millis(20),
            channel_histograms: true,
        }
    }
}

impl Config {
    /// Checks that the values fit together; returns a message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        for class in Class::ALL {
            let chunk = self.chunk_size.get(class) as usize;
            if chunk == 0 || chunk > crate::frame::MAX_FRAME_PAYLOAD {
                return Err(format!(
                    "chunk_size for {class} is {chunk}; it must be 1..={}",
                    crate::frame::MAX_FRAME_PAYLOAD
                ));
            }
            if self.recv_window.get(class) < self.chunk_size.get(class) {
                return Err(format!(
                    "recv_window for {class} is smaller than its chunk_size"
                ));
            }
        }
        if self.keepalive_interval >= self.peer_timeout {
            return Err("keepalive_interval must be shorter than peer_timeout".into());
        }
        if self.congestion.min_window > self.congestion.max_window {
            return Err("congestion.min_window exceeds congestion.max_window".into());
        }
        if self.connect_timeout.is_zero() {
            return Err("connect_timeout must be positive".into());
        }
        if self.max_channels == 0 || self.send_queue_messages == 0 {
            return Err("max_channels and send_queue_messages must be positive".into());
        }
        Ok(())
    }
}
