//! What a client sends on a channel, in its order: `SEND` (inline when the channel is idle,
//! else through the channel's sender task), `REQUEST` (queued in order, its response awaited
//! beside), `FLUSH`, and the cumulative answers (PROTOCOL.md: one `DONE` for every
//! `send_window / 2` sends taken, a failure at once, after the `DONE` of the sends before it).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentfabric::sync::lock;
use agentfabric::{Bytes, Channel, Error};
use tokio::sync::mpsc;

use super::deadline::deadline;
use super::state::{ChanEntry, Conn, Queued, SendSide, Unacked};
use crate::errors::OpError;
use crate::link::{tagged, TAG_CLIENT};
use crate::wire::{ErrorCode, SidecarMsg};
use crate::writer::OpPermit;

/// Bytes a `MESSAGE` frame adds to its body (header, channel, request): a body longer than
/// `max_frame` minus this could not reach the other client.
pub const MESSAGE_OVERHEAD: usize = 16 + 4 + 8;

/// The sending side of a new channel, its queue, and its sender task.
pub fn start(
    conn: &Arc<Conn>,
    ch: Channel,
) -> (
    Arc<SendSide>,
    mpsc::Sender<Queued>,
    tokio::task::AbortHandle,
) {
    let limits = &conn.hub.limits;
    // Sends are bounded by the window; requests and flushes by the operations in flight.
    let capacity = limits.send_window as usize + limits.max_ops as usize;
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let side = Arc::new(SendSide {
        ch,
        pending: AtomicU32::new(0),
        queued_sends: AtomicU32::new(0),
        unacked: Mutex::new(Unacked::default()),
        failed: Mutex::new(None),
        ended: tokio::sync::watch::Sender::new(false),
    });
    let task = tokio::spawn(sender(conn.clone(), side.clone(), rx));
    (side, tx, task.abort_handle())
}

/// The largest body a client may send on a channel.
fn max_body(conn: &Conn) -> usize {
    (conn.hub.limits.max_frame as usize).saturating_sub(MESSAGE_OVERHEAD)
}

fn too_big(len: usize, max: usize) -> OpError {
    OpError::new(
        ErrorCode::TooBig,
        format!("a message of {len} bytes; at most {max} fit a frame"),
    )
}

/// `SEND`.
pub fn send(
    conn: &Conn,
    id: u64,
    channel: u32,
    body: Bytes,
    permit: OpPermit,
) -> Result<(), OpError> {
    let e = match conn.channel(channel) {
        Ok(e) => e,
        Err(err) => {
            conn.answer(id, Err(err), permit);
            return Ok(());
        }
    };
    let s = &e.send;
    if body.len() > max_body(conn) {
        fail(conn, s, id, too_big(body.len(), max_body(conn)), permit);
        return Ok(());
    }
    if s.pending.load(Ordering::Acquire) == 0 {
        if let Some(err) = lock(&s.failed).clone() {
            fail(conn, s, id, err, permit);
            return Ok(());
        }
        match s.ch.try_send(body.clone()) {
            Ok(()) => {
                taken(conn, s, id);
                return Ok(());
            }
            Err(Error::WouldBlock) => {}
            Err(err) => {
                let err = OpError::from(err);
                *lock(&s.failed) = Some(err.clone());
                fail(conn, s, id, err, permit);
                return Ok(());
            }
        }
    }
    let window = conn.hub.limits.send_window;
    if s.queued_sends.load(Ordering::Acquire) >= window {
        return Err(OpError::new(
            ErrorCode::WindowExceeded,
            format!("more than {window} sends in flight on channel {channel}"),
        ));
    }
    s.queued_sends.fetch_add(1, Ordering::AcqRel);
    enqueue(conn, &e, Queued::Send { id, body, permit });
    Ok(())
}

/// `REQUEST`: queued in order with the channel's sends.
pub fn request(
    conn: &Conn,
    id: u64,
    channel: u32,
    deadline_ms: u32,
    body: Bytes,
    permit: OpPermit,
) {
    let checked = deadline(deadline_ms).and_then(|d| {
        let e = conn.channel(channel)?;
        if body.len() + 1 > max_body(conn) {
            return Err(too_big(body.len(), max_body(conn) - 1));
        }
        Ok((d, e))
    });
    match checked {
        Ok((d, e)) => enqueue(
            conn,
            &e,
            Queued::Request {
                id,
                body: tagged(TAG_CLIENT, &body),
                deadline: Instant::now() + d,
                permit,
            },
        ),
        Err(err) => conn.answer(id, Err(err), permit),
    }
}

/// `FLUSH`: answered once every earlier send of the channel is (after their `DONE`).
pub fn flush(conn: &Conn, id: u64, channel: u32, permit: OpPermit) {
    match conn.channel(channel) {
        Ok(e) if e.send.pending.load(Ordering::Acquire) == 0 => {
            ack_now(conn, &e.send);
            conn.answer(id, Ok(SidecarMsg::Done), permit);
        }
        Ok(e) => enqueue(conn, &e, Queued::Flush { id, permit }),
        Err(err) => conn.answer(id, Err(err), permit),
    }
}

/// Queues behind the channel's pending operations (the queue has room for every one a client
/// may have in flight: the window's sends and `max_ops`).
fn enqueue(conn: &Conn, e: &ChanEntry, q: Queued) {
    e.send.pending.fetch_add(1, Ordering::AcqRel);
    if let Err(mpsc::error::TrySendError::Full(q) | mpsc::error::TrySendError::Closed(q)) =
        e.queue.try_send(q)
    {
        // Not expected within the bounds above; answered rather than lost if it happens.
        e.send.pending.fetch_sub(1, Ordering::AcqRel);
        if matches!(q, Queued::Send { .. }) {
            e.send.queued_sends.fetch_sub(1, Ordering::AcqRel);
        }
        let err = OpError::new(ErrorCode::Internal, "the channel's send queue is full");
        let (id, permit) = match q {
            Queued::Send { id, permit, .. }
            | Queued::Request { id, permit, .. }
            | Queued::Flush { id, permit } => (id, permit),
        };
        conn.answer(id, Err(err), permit);
    }
}

/// The fabric took send `id`: answered with the next `DONE` (now, when half the window is
/// unanswered).
fn taken(conn: &Conn, s: &SendSide, id: u64) {
    let every = (conn.hub.limits.send_window / 2).max(1);
    let mut u = lock(&s.unacked);
    u.count += 1;
    u.last = id;
    if u.count >= every {
        u.count = 0;
        let _ = conn.out.reply(id, SidecarMsg::Done, None);
    }
}

/// Answers every taken send now.
pub fn ack_now(conn: &Conn, s: &SendSide) {
    let mut u = lock(&s.unacked);
    if u.count > 0 {
        u.count = 0;
        let _ = conn.out.reply(u.last, SidecarMsg::Done, None);
    }
}

/// Send `id` failed: the sends before it are answered first, so the `ERROR` answers only it.
fn fail(conn: &Conn, s: &SendSide, id: u64, err: OpError, permit: OpPermit) {
    ack_now(conn, s);
    conn.answer(id, Err(err), permit);
}

/// Marks the channel ended (its sends fail with `err` from now on, one waiting for room too)
/// and answers the sends taken.
pub fn end(conn: &Conn, s: &SendSide, err: OpError) {
    lock(&s.failed).get_or_insert(err);
    s.ended.send_replace(true);
    ack_now(conn, s);
}

/// `op` (a send waiting for the channel's room), unless the channel ends first: then the
/// channel's failure.
async fn unless_ended<T>(
    s: &SendSide,
    op: impl std::future::Future<Output = agentfabric::Result<T>>,
) -> Result<T, OpError> {
    let mut ended = s.ended.subscribe();
    tokio::select! {
        r = op => r.map_err(OpError::from),
        _ = ended.wait_for(|e| *e) => Err(lock(&s.failed)
            .clone()
            .unwrap_or_else(|| OpError::new(ErrorCode::Closed, "the channel has ended"))),
    }
}

/// Waits (up to `limit`) until the sender task has been through everything queued.
pub async fn drained(s: &SendSide, limit: Duration) {
    let start = tokio::time::Instant::now();
    while s.pending.load(Ordering::Acquire) > 0 && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Sends what was queued, in order; answers flushes after the sends before them. Ends when the
/// channel's entry (and so the queue's sender) is gone and the queue is empty.
async fn sender(conn: Arc<Conn>, s: Arc<SendSide>, mut rx: mpsc::Receiver<Queued>) {
    while let Some(q) = rx.recv().await {
        let failed = lock(&s.failed).clone();
        match q {
            Queued::Send { id, body, permit } => {
                let r = match failed {
                    Some(err) => Err(err),
                    None => unless_ended(&s, s.ch.send(body)).await.inspect_err(|err| {
                        lock(&s.failed).get_or_insert(err.clone());
                    }),
                };
                s.queued_sends.fetch_sub(1, Ordering::AcqRel);
                match r {
                    Ok(()) => {
                        taken(&conn, &s, id);
                        drop(permit);
                    }
                    Err(err) => fail(&conn, &s, id, err, permit),
                }
            }
            Queued::Request {
                id,
                body,
                deadline,
                permit,
            } => {
                let queued = match failed {
                    Some(err) => Err(err),
                    None => unless_ended(&s, s.ch.send_request(body)).await,
                };
                match queued {
                    Ok(pending) => {
                        // In its place on the channel: the answer is awaited beside the sends.
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            let left = deadline.saturating_duration_since(Instant::now());
                            let r = pending
                                .wait(left)
                                .await
                                .map(|body| SidecarMsg::Response { body })
                                .map_err(OpError::from);
                            conn.answer(id, r, permit);
                        });
                    }
                    Err(err) => conn.answer(id, Err(err), permit),
                }
            }
            Queued::Flush { id, permit } => {
                ack_now(&conn, &s);
                conn.answer(id, Ok(SidecarMsg::Done), permit);
            }
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}
