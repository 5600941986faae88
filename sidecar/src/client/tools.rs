//! Tool calls: the endpoint's tool server (calls from the fabric forwarded to the client as
//! `TOOL_CALL`, answered by `TOOL_REPLY`), and the client's own calls (`CALL`, `CANCEL`).

use std::sync::{Arc, Weak};
use std::time::Instant;

use agentfabric::sync::lock;
use agentfabric::tools::{Call, CancelToken, HedgePolicy, ToolClient, ToolRequest, ToolResult};
use agentfabric::{Bytes, Channel, Class};
use tokio::sync::oneshot;

use super::deadline::deadline;
use super::state::Conn;
use crate::errors::OpError;
use crate::link::{valid_endpoint, TOOL_PREFIX};
use crate::wire::{ErrorCode, SidecarMsg, Target};

/// Longest tool name.
const MAX_TOOL: usize = 256;
/// Most replicas one call may list.
const MAX_TARGETS: usize = 8;
/// Most retries one call may ask for.
const MAX_RETRIES: u8 = 8;
/// Tool clients (one per distinct target list) a connection keeps.
const MAX_TOOL_CLIENTS: usize = 64;
/// Priority of the tool-call channels the sidecar opens.
const TOOL_PRIORITY: u8 = 4;

/// Forgets a forwarded call when its future ends: a call still waiting for its reply (the
/// caller cancelled, the deadline passed) is cancelled at the client.
struct Pending<'a> {
    conn: &'a Conn,
    call: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if lock(&self.conn.tool_calls).remove(&self.call).is_some() {
            let _ = self
                .conn
                .out
                .reply(self.call, SidecarMsg::ToolCancelled, None);
        }
    }
}

/// A call of one of the client's tools (from the endpoint's tool server): `TOOL_CALL` to the
/// client, its `TOOL_REPLY` back; cancelled at the client when the caller gives up.
pub async fn forward(conn: Weak<Conn>, req: ToolRequest) -> ToolResult {
    let cancel = req.cancel.clone();
    let Some(conn) = conn.upgrade() else {
        return gone(&cancel, "the endpoint disconnected").await;
    };
    let endpoint = conn.endpoint.clone();
    let call = conn
        .next_call
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    lock(&conn.tool_calls).insert(call, tx);
    let pending = Pending { conn: &conn, call };
    let left = req.deadline.saturating_duration_since(Instant::now());
    let msg = SidecarMsg::ToolCall {
        tool: req.tool,
        node: req.caller,
        deadline_ms: u32::try_from(left.as_millis()).unwrap_or(u32::MAX),
        idempotent: req.idempotent,
        key: req.key.unwrap_or_default(),
        args: req.args,
    };
    if conn.out.event(call, msg).await.is_err() {
        drop(pending);
        return gone(&cancel, &format!("endpoint {endpoint} disconnected")).await;
    }
    match rx.await {
        Ok(r) => r,
        Err(_) => {
            drop(pending);
            drop(conn);
            gone(
                &cancel,
                &format!("endpoint {endpoint} disconnected before it answered"),
            )
            .await
        }
    }
}

/// The client went before answering: the call is given up as not run (its idempotency key is
/// forgotten, so a retry runs it at whichever client serves the name next), and the caller is
/// told it was refused. The tool server stops this future on the token.
async fn gone(cancel: &CancelToken, why: &str) -> ToolResult {
    cancel.abandon(why);
    std::future::pending().await
}

/// `SERVE` / `UNSERVE`.
pub fn serve(conn: &Conn, tool: String, on: bool) -> Result<SidecarMsg, OpError> {
    if tool.is_empty() || tool.len() > MAX_TOOL {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("a tool name has 1 to {MAX_TOOL} bytes"),
        ));
    }
    let mut served = lock(&conn.served);
    if on {
        if !served.contains(&tool) && served.len() >= conn.hub.limits.max_tools {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "this client serves {} tools, the most allowed",
                    served.len()
                ),
            ));
        }
        served.insert(tool);
    } else {
        served.remove(&tool);
    }
    Ok(SidecarMsg::Done)
}

/// `TOOL_REPLY`: the client's answer to a forwarded call (ignored when the call is over).
pub fn reply(conn: &Conn, call: u64, ok: bool, body: Bytes) -> SidecarMsg {
    if let Some(tx) = lock(&conn.tool_calls).remove(&call) {
        let r = if ok {
            Ok(body)
        } else {
            Err(String::from_utf8_lossy(&body).into_owned())
        };
        let _ = tx.send(r);
    }
    SidecarMsg::Done
}

/// A `CALL`'s settings.
pub struct CallArgs {
    pub deadline_ms: u32,
    pub hedged: bool,
    pub retries: u8,
    pub tool: String,
    pub targets: Vec<Target>,
    pub key: Option<Bytes>,
    pub args: Bytes,
}

/// Checks a `CALL` before it starts.
pub fn check(c: &CallArgs) -> Result<(), OpError> {
    deadline(c.deadline_ms)?;
    let bad = |m: String| Err(OpError::new(ErrorCode::InvalidArgument, m));
    if c.tool.is_empty() || c.tool.len() > MAX_TOOL {
        return bad(format!("a tool name has 1 to {MAX_TOOL} bytes"));
    }
    if c.targets.is_empty() || c.targets.len() > MAX_TARGETS {
        return bad(format!("a call lists 1 to {MAX_TARGETS} endpoints"));
    }
    if c.retries > MAX_RETRIES {
        return bad(format!("at most {MAX_RETRIES} retries"));
    }
    if let Some(t) = c.targets.iter().find(|t| !valid_endpoint(&t.endpoint)) {
        return bad(format!("endpoint name {:?}", t.endpoint));
    }
    Ok(())
}

/// `CALL`: runs until answered, failed, or cancelled through `cancel`.
pub async fn call(
    conn: Arc<Conn>,
    c: CallArgs,
    cancel: oneshot::Receiver<()>,
) -> Result<SidecarMsg, OpError> {
    let client = tool_client(&conn, &c.targets).await?;
    let mut call =
        Call::new(&c.tool, c.args, deadline(c.deadline_ms)?).retries(u32::from(c.retries));
    if let Some(k) = c.key {
        call = call.key(k);
    }
    if c.hedged {
        call = call.hedged();
    }
    let r = tokio::select! {
        r = client.call_with(call) => r.map(|body| SidecarMsg::Result { body }).map_err(OpError::from),
        _ = cancel => Err(OpError::new(ErrorCode::Cancelled, "cancelled by the client")),
    };
    if let Err(e) = &r {
        if matches!(
            e.code,
            ErrorCode::Refused | ErrorCode::PeerDead | ErrorCode::Closed
        ) {
            // A refused channel stays refused: the next call opens a new one.
            forget(&conn, &c.targets);
        }
    }
    r
}

/// Forgets the tool client and channels of `targets`.
fn forget(conn: &Conn, targets: &[Target]) {
    let key: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.url.clone(), t.endpoint.clone()))
        .collect();
    lock(&conn.tool_clients).remove(&key);
    let mut chans = lock(&conn.tool_channels);
    for (url, ep) in key {
        chans.remove(&(url, ep));
    }
}

/// The tool client for `targets`, reusing channels and clients while their sessions live.
async fn tool_client(conn: &Conn, targets: &[Target]) -> Result<ToolClient, OpError> {
    let key: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.url.clone(), t.endpoint.clone()))
        .collect();
    if let Some(c) = lock(&conn.tool_clients).get(&key) {
        if targets.iter().all(|t| live(conn, t)) {
            return Ok(c.clone());
        }
    }
    let mut chans = Vec::with_capacity(targets.len());
    for t in targets {
        chans.push(tool_channel(conn, t).await?);
    }
    let client = ToolClient::on_channels(chans, HedgePolicy::default());
    let mut clients = lock(&conn.tool_clients);
    if clients.len() >= MAX_TOOL_CLIENTS {
        clients.clear();
    }
    clients.insert(key, client.clone());
    Ok(client)
}

/// Whether the cached tool channel to `t` is on a live session.
fn live(conn: &Conn, t: &Target) -> bool {
    lock(&conn.tool_channels)
        .get(&(t.url.clone(), t.endpoint.clone()))
        .is_some_and(|ch| ch.peer().error().is_none())
}

async fn tool_channel(conn: &Conn, t: &Target) -> Result<Channel, OpError> {
    let k = (t.url.clone(), t.endpoint.clone());
    if let Some(ch) = lock(&conn.tool_channels).get(&k) {
        if ch.peer().error().is_none() {
            return Ok(ch.clone());
        }
    }
    let peer = conn.hub.peer(&t.url).await?;
    let ch = peer.channel_named(
        &format!("{TOOL_PREFIX}{}", t.endpoint),
        Class::ToolCall,
        TOOL_PRIORITY,
    )?;
    let mut chans = lock(&conn.tool_channels);
    if chans.len() >= MAX_TOOL_CLIENTS * MAX_TARGETS {
        chans.clear();
    }
    chans.insert(k, ch.clone());
    Ok(ch)
}
