//! What the sidecar sends one client: a queue and the task that writes it to the socket.
//!
//! Replies go straight in, each holding its operation's permit until it is written: a client
//! that sends operations but never reads their replies stops being read after `max_ops`.
//! Events — messages, incoming channels, tool calls, notifications — first take their size
//! from the client's byte budget, which the writer gives back once they are written: a client
//! that stops reading (or is stopped) holds back its own traffic, and the sidecar's memory
//! stays bounded, while nothing disconnects it.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::wire::{SidecarMsg, ToClient};

/// Frames written with one `write` when several are queued.
const BATCH_BYTES: usize = 256 * 1024;

/// A payload at least this long is written from its own buffer instead of being copied into
/// the batch.
const SEPARATE_PAYLOAD: usize = 16 * 1024;

/// The client is gone: its writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

struct Out {
    /// `None`: the end; the writer stops after what came before.
    frame: Option<ToClient>,
    /// The operation's permit (a reply) or the bytes of budget (an event), given back once the
    /// frame is written.
    _permit: Option<OwnedSemaphorePermit>,
}

/// An operation's place among the client's `max_ops` in flight.
pub type OpPermit = OwnedSemaphorePermit;

/// The sending side of one client's queue. Cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::UnboundedSender<Out>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
}

impl Outbound {
    /// A queue with `budget_bytes` for events, and the task that writes it to `sink`. The task
    /// ends when every `Outbound` is dropped (after writing what is queued) or the socket fails.
    pub fn start(
        sink: OwnedWriteHalf,
        budget_bytes: usize,
    ) -> (Outbound, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(budget_bytes));
        let task = tokio::spawn(write_loop(sink, rx, budget.clone()));
        (
            Outbound {
                tx,
                budget,
                budget_bytes,
            },
            task,
        )
    }

    /// Queues the reply to operation `id`, whose permit is given back once it is written
    /// (`None` for the frames that answer no operation: `HELLO_OK`, a fatal `ERROR`).
    pub fn reply(&self, id: u64, msg: SidecarMsg, op: Option<OpPermit>) -> Result<(), Gone> {
        self.tx
            .send(Out {
                frame: Some(ToClient { id, msg }),
                _permit: op,
            })
            .map_err(|_| Gone)
    }

    /// Ends the queue: the writer stops once what is queued before is written, whatever
    /// handles of the queue (a task still finishing) are left; their frames are dropped.
    pub fn end(&self) {
        let _ = self.tx.send(Out {
            frame: None,
            _permit: None,
        });
    }

    /// Queues an event once the client's budget has room for it (waits while it has not).
    pub async fn event(&self, id: u64, msg: SidecarMsg) -> Result<(), Gone> {
        let cost = event_cost(&msg).min(self.budget_bytes) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(cost.max(1))
            .await
            .map_err(|_| Gone)?;
        self.tx
            .send(Out {
                frame: Some(ToClient { id, msg }),
                _permit: Some(permit),
            })
            .map_err(|_| Gone)
    }
}

/// An event's share of the budget: its payload plus a frame's overhead.
fn event_cost(msg: &SidecarMsg) -> usize {
    let payload = match msg {
        SidecarMsg::Message { body, .. } => body.len(),
        SidecarMsg::ToolCall { args, key, .. } => args.len() + key.len(),
        _ => 0,
    };
    payload + 64
}

async fn write_loop(
    mut sink: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    budget: Arc<Semaphore>,
) {
    let mut batch = BytesMut::with_capacity(BATCH_BYTES);
    // The frames in `batch`: their permits go back once they are written, not when queued.
    let mut held: Vec<Out> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            let Some(frame) = &out.frame else {
                let _ = write(&mut sink, &mut batch, None).await;
                return close(&budget);
            };
            if let Some(payload) = frame.encode_parts(&mut batch) {
                if payload.len() >= SEPARATE_PAYLOAD {
                    if write(&mut sink, &mut batch, Some(payload)).await.is_err() {
                        return close(&budget);
                    }
                    // The batch and this frame are written: their budget goes back now, not
                    // when the queue is next empty (a slow reader's producers would wait).
                    held.clear();
                    drop(out);
                    next = rx.try_recv().ok();
                    continue;
                }
                batch.extend_from_slice(&payload);
            }
            held.push(out);
            if batch.len() < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if write(&mut sink, &mut batch, None).await.is_err() {
            return close(&budget);
        }
        held.clear();
    }
}

/// Writes the batch, then `payload` if any.
async fn write(
    sink: &mut OwnedWriteHalf,
    batch: &mut BytesMut,
    payload: Option<Bytes>,
) -> std::io::Result<()> {
    if !batch.is_empty() {
        sink.write_all(batch).await?;
        batch.clear();
    }
    if let Some(p) = payload {
        sink.write_all(&p).await?;
    }
    Ok(())
}

/// The socket failed: whoever waits for budget learns the client is gone.
fn close(budget: &Semaphore) {
    budget.close();
}
