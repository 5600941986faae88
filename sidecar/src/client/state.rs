//! One client connection's state: its channels, regions, tool calls and calls in flight, and
//! the queue to its socket. Every table is bounded by the limits in `Hub::limits`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agentfabric::sync::lock;
use agentfabric::tools::{ToolClient, ToolResult};
use agentfabric::{Bytes, Channel, Region};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::AbortHandle;

use crate::errors::OpError;
use crate::hub::Hub;
use crate::wire::{ErrorCode, SidecarMsg};
use crate::writer::{OpPermit, Outbound};

/// What waits for the channel's sender task, in order.
pub enum Queued {
    /// A `SEND`.
    Send {
        id: u64,
        body: Bytes,
        permit: OpPermit,
    },
    /// A `REQUEST` (its body already tagged), answered when its response comes.
    Request {
        id: u64,
        body: Bytes,
        deadline: Instant,
        permit: OpPermit,
    },
    /// A `FLUSH`: answered once every send before it is.
    Flush { id: u64, permit: OpPermit },
}

/// Sends the fabric took and the client has not been told of: one `DONE` answers them all.
#[derive(Default)]
pub struct Unacked {
    pub count: u32,
    /// The last one's id.
    pub last: u64,
}

/// The sending side of a channel, shared by the reading task (the inline path) and the
/// channel's sender task, which holds it (not the entry: the entry's queue closes when the
/// entry goes, and the sender ends once it has answered what was queued).
pub struct SendSide {
    pub ch: Channel,
    /// Operations handed to the sender task and not yet through: while any is, a new one
    /// queues behind them instead of taking the inline path, so order holds.
    pub pending: AtomicU32,
    /// Of those, the `SEND`s: the client's window bounds these.
    pub queued_sends: AtomicU32,
    /// Sends the fabric took, not answered yet.
    pub unacked: Mutex<Unacked>,
    /// The first failure (or the channel's end): every later send fails with it.
    pub failed: Mutex<Option<OpError>>,
    /// Set when the channel ends: a send waiting for room gives up.
    pub ended: tokio::sync::watch::Sender<bool>,
}

/// One channel of the client.
pub struct ChanEntry {
    pub ch: Channel,
    /// This client opened it (closing tells the far side in-band); else it was accepted.
    pub opened: bool,
    pub send: Arc<SendSide>,
    pub queue: mpsc::Sender<Queued>,
    pub sender: AbortHandle,
    /// The receive pump, once started.
    pub pump: Mutex<Option<AbortHandle>>,
}

impl ChanEntry {
    /// Stops the receive pump: nothing more of the channel goes to the client.
    pub fn stop_pump(&self) {
        if let Some(t) = lock(&self.pump).take() {
            t.abort();
        }
    }

    /// Stops the channel's tasks (the client is gone: nobody to answer).
    pub fn stop(&self) {
        self.stop_pump();
        self.sender.abort();
    }
}

/// One region of the client.
pub struct RegionEntry {
    pub region: Region,
    /// The node's id of the region (for the hub's owner table).
    pub id: u64,
}

/// A handle table: entries by the `u32` handles given to the client, never reused.
pub struct Table<T> {
    pub map: HashMap<u32, Arc<T>>,
    next: u32,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            map: HashMap::new(),
            next: 1,
        }
    }
}

impl<T> Table<T> {
    /// Inserts `v` under a fresh handle, unless the table holds `max` entries already.
    pub fn insert(&mut self, v: Arc<T>, max: usize, what: &str) -> Result<u32, OpError> {
        if self.map.len() >= max {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!("this client has {max} {what}, the most allowed"),
            ));
        }
        let h = self.next;
        self.next = self
            .next
            .checked_add(1)
            .ok_or_else(|| OpError::new(ErrorCode::Limit, format!("{what}: handles exhausted")))?;
        self.map.insert(h, v);
        Ok(h)
    }
}

/// A connected client.
pub struct Conn {
    /// This connection, for what needs an `Arc` of it from `&self`.
    pub me: std::sync::Weak<Conn>,
    pub hub: Arc<Hub>,
    pub endpoint: String,
    pub out: Outbound,
    /// Operations in flight (`max_ops`).
    pub ops: Arc<Semaphore>,
    pub channels: Mutex<Table<ChanEntry>>,
    pub regions: Mutex<Table<RegionEntry>>,
    /// Tools this client serves.
    pub served: Arc<Mutex<HashSet<String>>>,
    /// Tool calls forwarded to the client, by call handle, waiting for `TOOL_REPLY`.
    pub tool_calls: Mutex<HashMap<u64, oneshot::Sender<ToolResult>>>,
    pub next_call: AtomicU64,
    /// The client's `CALL`s in flight, by operation id: sending cancels one.
    pub calls: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Tool clients by their targets, and tool channels by target.
    pub tool_clients: Mutex<HashMap<Vec<(String, String)>, ToolClient>>,
    pub tool_channels: Mutex<HashMap<(String, String), Channel>>,
    /// Set when the client is gone: nothing new is registered.
    pub closed: AtomicBool,
}

impl Conn {
    /// Replies to operation `id` with `r`.
    pub fn answer(&self, id: u64, r: Result<SidecarMsg, OpError>, permit: OpPermit) {
        let msg = r.unwrap_or_else(OpError::into_msg);
        let _ = self.out.reply(id, msg, Some(permit));
    }

    /// The channel with handle `h`.
    pub fn channel(&self, h: u32) -> Result<Arc<ChanEntry>, OpError> {
        lock(&self.channels)
            .map
            .get(&h)
            .cloned()
            .ok_or_else(|| OpError::new(ErrorCode::UnknownChannel, format!("no channel {h}")))
    }

    /// Removes channel `h` from the table (its sender task ends once it has answered what was
    /// queued).
    pub fn forget_channel(&self, h: u32) -> Option<Arc<ChanEntry>> {
        lock(&self.channels).map.remove(&h)
    }

    /// The region with handle `h`.
    pub fn region(&self, h: u32) -> Result<Arc<RegionEntry>, OpError> {
        lock(&self.regions)
            .map
            .get(&h)
            .cloned()
            .ok_or_else(|| OpError::new(ErrorCode::UnknownRegion, format!("no region {h}")))
    }

    /// Whether the client is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
