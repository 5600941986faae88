//! Channels: `OPEN`, incoming channels, `RESPOND`, `CLOSE`, and the pump that turns the
//! channel's messages into `MESSAGE` events (what a client sends on a channel is `sends.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfabric::sync::lock;
use agentfabric::{Bytes, Channel, Class, Error, Message};

use super::sends;
use super::state::{ChanEntry, Conn};
use crate::errors::{close_code, OpError};
use crate::link::{
    tagged, valid_endpoint, Intro, ENDPOINT_PREFIX, MAX_LABEL, TAG_CLIENT, TAG_CLOSE,
};
use crate::wire::{ErrorCode, SidecarMsg};

/// How long closing a channel this client opened waits for the far side's acknowledgement.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

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
    if conn.is_closed() {
        return Err(OpError::new(ErrorCode::Closed, "the client is gone"));
    }
    let (send, queue, sender) = sends::start(conn, ch.clone());
    let entry = Arc::new(ChanEntry {
        ch,
        opened,
        send,
        queue,
        sender,
        pump: Mutex::new(None),
    });
    match lock(&conn.channels).insert(entry.clone(), conn.hub.limits.max_channels, "channels") {
        Ok(h) => Ok(h),
        Err(e) => {
            entry.stop();
            Err(e)
        }
    }
}

/// Starts the pump of channel `handle`, announcing it first with `hello` if given.
fn start_pump(conn: &Arc<Conn>, handle: u32, hello: Option<SidecarMsg>) {
    let Ok(entry) = conn.channel(handle) else {
        return;
    };
    let task = tokio::spawn(pump(conn.clone(), handle, entry.ch.clone(), hello));
    *lock(&entry.pump) = Some(task.abort_handle());
}

/// The channel's messages, in order, as `MESSAGE` events; its end as `CHANNEL_CLOSED`.
async fn pump(conn: Arc<Conn>, handle: u32, ch: Channel, hello: Option<SidecarMsg>) {
    if let Some(h) = hello {
        if conn.out.event(0, h).await.is_err() {
            return;
        }
    }
    // A peer that is not a sidecar (a Rust application) may send more than a frame carries.
    let max = (conn.hub.limits.max_frame as usize).saturating_sub(sends::MESSAGE_OVERHEAD);
    loop {
        let (code, reason) = match ch.recv().await {
            Ok(m) if m.body.len() > max + usize::from(m.request_id.is_some()) => (
                ErrorCode::TooBig,
                format!(
                    "a message of {} bytes came, more than this sidecar's frames carry ({max})",
                    m.body.len()
                ),
            ),
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
        // The entry goes (its accepted channel is refused when the last handle drops); sends
        // still queued are answered with the channel's end.
        if let Some(e) = conn.forget_channel(handle) {
            sends::end(&conn, &e.send, OpError::new(code, "the channel has ended"));
        }
        return;
    }
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
/// everything sent on it, and the far side acknowledges. Sends still queued after
/// [`CLOSE_DEADLINE`] are answered with `CLOSED` before the `DONE`.
pub async fn close(conn: Arc<Conn>, channel: u32, reason: String) -> Result<SidecarMsg, OpError> {
    let e = conn.channel(channel)?;
    sends::drained(&e.send, CLOSE_DEADLINE).await;
    let e = conn
        .forget_channel(channel)
        .ok_or_else(|| OpError::new(ErrorCode::UnknownChannel, format!("no channel {channel}")))?;
    e.stop_pump();
    sends::end(
        &conn,
        &e.send,
        OpError::new(ErrorCode::Closed, "the channel was closed"),
    );
    sends::drained(&e.send, CLOSE_DEADLINE).await;
    sends::ack_now(&conn, &e.send);
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
