//! Channels: `OPEN`, incoming channels, `SEND` (inline when the channel is idle, else through
//! its sender task), `REQUEST`, `RESPOND`, `CLOSE`, and the pump that turns the channel's
//! messages into `MESSAGE` events.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfabric::sync::lock;
use agentfabric::{Bytes, Channel, Class, Error, Message};
use tokio::sync::mpsc;

use super::state::{ChanEntry, Conn, Queued, Unacked};
use crate::errors::{close_code, OpError};
use crate::link::{
    tagged, valid_endpoint, Intro, ENDPOINT_PREFIX, MAX_LABEL, TAG_CLIENT, TAG_CLOSE,
};
use crate::wire::{ErrorCode, SidecarMsg};
use crate::writer::OpPermit;

/// How long closing a channel this client opened waits for the far side's acknowledgement.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// Longest deadline a request may ask for (an hour).
pub const MAX_DEADLINE_MS: u32 = 3_600_000;

/// Checks a deadline in milliseconds (1 … an hour).
pub fn deadline(ms: u32) -> Result<Duration, OpError> {
    if ms == 0 || ms > MAX_DEADLINE_MS {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("deadline_ms {ms} is not in 1..={MAX_DEADLINE_MS}"),
        ));
    }
    Ok(Duration::from_millis(u64::from(ms)))
}

/// `OPEN`: a channel to `endpoint` on the node at `url`, introduced to the far sidecar.
pub async fn open(
    conn: Arc<Conn>,
    class: u8,
    priority: u8,
    url: String,
    endpoint: String,
    label: String,
) -> Result<SidecarMsg, OpError> {
    let class = Class::from_u8(class)
        .ok_or_else(|| OpError::new(ErrorCode::InvalidArgument, format!("class {class}")))?;
    if priority > 7 {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("priority {priority} is not in 0..=7"),
        ));
    }
    if !valid_endpoint(&endpoint) {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("endpoint name {endpoint:?}: 1-32 bytes of A-Z a-z 0-9 . _ -"),
        ));
    }
    if label.len() > MAX_LABEL {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("a label has at most {MAX_LABEL} bytes"),
        ));
    }
    let peer = conn.hub.peer(&url).await?;
    let ch = peer.channel_named(&format!("{ENDPOINT_PREFIX}{endpoint}"), class, priority)?;
    let intro = Intro {
        endpoint: conn.endpoint.clone(),
        label,
    };
    ch.request(intro.encode(), conn.hub.limits.intro_deadline)
        .await
        .map_err(|e| match e {
            Error::DeadlineExceeded => OpError::new(
                ErrorCode::DeadlineExceeded,
                format!("{} did not take the channel in time", peer.name()),
            ),
            e => OpError::from(e),
        })?;
    let node = peer.name().to_owned();
    let handle = adopt(&conn, ch, true)?;
    start_pump(&conn, handle, None);
    Ok(SidecarMsg::Opened {
        channel: handle,
        node,
    })
}

/// A channel a remote endpoint opened: registered, announced (`INCOMING`), then pumped.
pub fn incoming(conn: &Arc<Conn>, ch: Channel, node: String, intro: Intro) -> Result<(), String> {
    if conn.is_closed() {
        return Err(format!("endpoint {} disconnected", conn.endpoint));
    }
    let class = ch.class() as u8;
    let priority = ch.priority().get();
    let handle = adopt(conn, ch, false).map_err(|e| e.message)?;
    let hello = SidecarMsg::Incoming {
        channel: handle,
        class,
        priority,
        node,
        endpoint: intro.endpoint,
        label: intro.label,
    };
    start_pump(conn, handle, Some(hello));
    Ok(())
}

/// Registers `ch` in the client's table and starts its sender task.
fn adopt(conn: &Arc<Conn>, ch: Channel, opened: bool) -> Result<u32, OpError> {
    let window = conn.hub.limits.send_window as usize;
    let (tx, rx) = mpsc::channel(window.max(1));
    let entry = Arc::new(ChanEntry {
        ch: ch.clone(),
        opened,
        pending: AtomicU32::new(0),
        queue: tx,
        unacked: Mutex::new(Unacked::default()),
        failed: Mutex::new(None),
        tasks: Mutex::new(Vec::new()),
    });
    if conn.is_closed() {
        return Err(OpError::new(ErrorCode::Closed, "the client is gone"));
    }
    let handle =
        lock(&conn.channels).insert(entry.clone(), conn.hub.limits.max_channels, "channels")?;
    let sender = tokio::spawn(sender(conn.clone(), entry.clone(), rx));
    lock(&entry.tasks).push(sender.abort_handle());
    Ok(handle)
}

/// Starts the pump of channel `handle`, announcing it first with `hello` if given.
fn start_pump(conn: &Arc<Conn>, handle: u32, hello: Option<SidecarMsg>) {
    let Ok(entry) = conn.channel(handle) else {
        return;
    };
    let task = tokio::spawn(pump(conn.clone(), handle, entry.ch.clone(), hello));
    lock(&entry.tasks).push(task.abort_handle());
}

/// `SEND`: inline when nothing of the channel is queued (the common case: one `try_send`, no
/// task hop), else behind the queued sends. Answered lazily (PROTOCOL.md): one `DONE` for every
/// `send_window / 2` sends taken, so a client handles a reply per message only when it
/// must — a failure at once, as an `ERROR` after the `DONE` of the sends before it.
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
    if e.pending.load(Ordering::Acquire) == 0 {
        if let Some(err) = lock(&e.failed).clone() {
            fail(conn, &e, id, err, permit);
            return Ok(());
        }
        match e.ch.try_send(body.clone()) {
            Ok(()) => {
                taken(conn, &e, id);
                return Ok(());
            }
            Err(Error::WouldBlock) => {}
            Err(err) => {
                let err = OpError::from(err);
                *lock(&e.failed) = Some(err.clone());
                fail(conn, &e, id, err, permit);
                return Ok(());
            }
        }
    }
    enqueue(conn, &e, channel, Queued::Send { id, body, permit })
}

/// `FLUSH`: answered once every earlier send of the channel is (after their `DONE`).
pub fn flush(conn: &Conn, id: u64, channel: u32, permit: OpPermit) -> Result<(), OpError> {
    let e = match conn.channel(channel) {
        Ok(e) => e,
        Err(err) => {
            conn.answer(id, Err(err), permit);
            return Ok(());
        }
    };
    if e.pending.load(Ordering::Acquire) == 0 {
        ack_now(conn, &e);
        conn.answer(id, Ok(SidecarMsg::Done), permit);
        return Ok(());
    }
    enqueue(conn, &e, channel, Queued::Flush { id, permit })
}

/// Queues behind the channel's pending sends; more than the window is the client's violation.
fn enqueue(conn: &Conn, e: &ChanEntry, channel: u32, q: Queued) -> Result<(), OpError> {
    let window = conn.hub.limits.send_window;
    if e.pending.load(Ordering::Acquire) >= window {
        return Err(OpError::new(
            ErrorCode::WindowExceeded,
            format!("more than {window} sends in flight on channel {channel}"),
        ));
    }
    e.pending.fetch_add(1, Ordering::AcqRel);
    // Capacity is the window, and at most `window` are pending: never full.
    e.queue
        .try_send(q)
        .map_err(|_| OpError::new(ErrorCode::Internal, "send queue full"))
}

/// The fabric took send `id`: answered with the next `DONE` (now, when half the window is
/// unanswered).
fn taken(conn: &Conn, e: &ChanEntry, id: u64) {
    let every = (conn.hub.limits.send_window / 2).max(1);
    let mut u = lock(&e.unacked);
    u.count += 1;
    u.last = id;
    if u.count >= every {
        u.count = 0;
        let _ = conn.out.reply(id, SidecarMsg::Done, None);
    }
}

/// Answers every taken send now.
fn ack_now(conn: &Conn, e: &ChanEntry) {
    let mut u = lock(&e.unacked);
    if u.count > 0 {
        u.count = 0;
        let _ = conn.out.reply(u.last, SidecarMsg::Done, None);
    }
}

/// Send `id` failed: the sends before it are answered first, so the `ERROR` answers only it.
fn fail(conn: &Conn, e: &ChanEntry, id: u64, err: OpError, permit: OpPermit) {
    ack_now(conn, e);
    conn.answer(id, Err(err), permit);
}

/// Sends what `SEND` queued, in order; answers flushes after the sends before them.
async fn sender(conn: Arc<Conn>, e: Arc<ChanEntry>, mut rx: mpsc::Receiver<Queued>) {
    while let Some(q) = rx.recv().await {
        match q {
            Queued::Send { id, body, permit } => {
                let failed = lock(&e.failed).clone();
                let r = match failed {
                    Some(err) => Err(err),
                    None => e.ch.send(body).await.map_err(|err| {
                        let err = OpError::from(err);
                        *lock(&e.failed) = Some(err.clone());
                        err
                    }),
                };
                match r {
                    Ok(()) => {
                        taken(&conn, &e, id);
                        drop(permit);
                    }
                    Err(err) => fail(&conn, &e, id, err, permit),
                }
            }
            Queued::Flush { id, permit } => {
                ack_now(&conn, &e);
                conn.answer(id, Ok(SidecarMsg::Done), permit);
            }
        }
        e.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The channel's messages, in order, as `MESSAGE` events; its end as `CHANNEL_CLOSED`.
async fn pump(conn: Arc<Conn>, handle: u32, ch: Channel, hello: Option<SidecarMsg>) {
    if let Some(h) = hello {
        if conn.out.event(0, h).await.is_err() {
            return;
        }
    }
    loop {
        let (code, reason) = match ch.recv().await {
            Ok(m) => match m.request_id {
                None => {
                    let msg = SidecarMsg::Message {
                        channel: handle,
                        request: 0,
                        body: m.body,
                    };
                    if conn.out.event(0, msg).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(req) => match m.body.first() {
                    Some(&TAG_CLIENT) => {
                        let msg = SidecarMsg::Message {
                            channel: handle,
                            request: req,
                            body: m.body.slice(1..),
                        };
                        if conn.out.event(0, msg).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(&TAG_CLOSE) => {
                        let _ = ch.respond(&m, Vec::new()).await;
                        let reason = String::from_utf8_lossy(&m.body[1..]).into_owned();
                        (ErrorCode::Closed, reason)
                    }
                    _ => {
                        let _ = ch.respond_error(&m, "not a sidecar request").await;
                        continue;
                    }
                },
            },
            Err(e) => {
                let reason = match &e {
                    Error::ChannelRefused { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                (close_code(&e), reason)
            }
        };
        let _ = conn
            .out
            .event(
                0,
                SidecarMsg::ChannelClosed {
                    channel: handle,
                    code,
                    reason,
                },
            )
            .await;
        // The entry goes (its accepted channel is refused when the last handle drops).
        drop(ch);
        conn.forget_channel(handle);
        return;
    }
}

/// `REQUEST`: the client's request, tagged, answered by the far client's `RESPOND`.
pub async fn request(
    conn: Arc<Conn>,
    channel: u32,
    deadline_ms: u32,
    body: Bytes,
) -> Result<SidecarMsg, OpError> {
    let deadline = deadline(deadline_ms)?;
    let e = conn.channel(channel)?;
    let answer = e.ch.request(tagged(TAG_CLIENT, &body), deadline).await?;
    Ok(SidecarMsg::Response { body: answer })
}

/// `RESPOND` / `RESPOND_ERROR`.
pub async fn respond(
    conn: Arc<Conn>,
    channel: u32,
    request: u64,
    answer: Result<Bytes, String>,
) -> Result<SidecarMsg, OpError> {
    if request == 0 {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            "request 0 is not a request",
        ));
    }
    let e = conn.channel(channel)?;
    let req = Message {
        body: Bytes::new(),
        request_id: Some(request),
    };
    match answer {
        Ok(body) => e.ch.respond(&req, body).await?,
        Err(reason) => e.ch.respond_error(&req, &reason).await?,
    }
    Ok(SidecarMsg::Done)
}

/// `CLOSE`: an accepted channel is refused; one this client opened is closed in-band, after
/// everything sent on it, and the far side acknowledges.
pub async fn close(conn: Arc<Conn>, channel: u32, reason: String) -> Result<SidecarMsg, OpError> {
    // Sends the client already made go first (their answers included).
    let e = conn.channel(channel)?;
    let start = tokio::time::Instant::now();
    while e.pending.load(Ordering::Acquire) > 0 && start.elapsed() < CLOSE_DEADLINE {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    ack_now(&conn, &e);
    let e = conn
        .forget_channel(channel)
        .ok_or_else(|| OpError::new(ErrorCode::UnknownChannel, format!("no channel {channel}")))?;
    shut(&e, &reason).await;
    Ok(SidecarMsg::Done)
}

/// Ends a channel that left the client's table (a `CLOSE`, or the client's exit).
pub async fn shut(e: &ChanEntry, reason: &str) {
    if e.opened {
        let _ =
            e.ch.request(tagged(TAG_CLOSE, reason.as_bytes()), CLOSE_DEADLINE)
                .await;
    } else {
        let _ = e.ch.refuse(reason);
    }
}
