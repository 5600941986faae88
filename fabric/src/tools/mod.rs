//! Tool calls: named, deadline-bound, cancellable requests to tools served by another node, with
//! at-most-once retries and optional hedging. Built on [`Channel::request`] and
//! [`Channel::respond`] only, so it works over every transport (tool calls usually cross QUIC).
//!
//! ```no_run
//! use std::time::Duration;
//! use agentfabric::tools::{ToolClient, ToolServer, ToolError};
//! # async fn demo(server_node: agentfabric::Node, peer: agentfabric::Peer) -> Result<(), ToolError> {
//! // Server: register tools, serve every session of the node.
//! let mut tools = ToolServer::new();
//! tools.register("echo", |req| async move { Ok(req.args) });
//! tools.register("slow", |req| async move {
//!     tokio::select! {
//!         _ = tokio::time::sleep(Duration::from_secs(5)) => Ok("done".into()),
//!         _ = req.cancel.cancelled() => Err("gave up".into()),
//!     }
//! });
//! tokio::spawn(tools.serve(server_node));
//!
//! // Client: one tool-call channel to the peer.
//! let client = ToolClient::new(&peer)?;
//! let out = client.call("echo", "hi", Duration::from_millis(200)).await?;
//! # Ok(()) }
//! ```
//!
//! # Semantics
//!
//! - **Deadline.** The deadline travels with the request as the time left when it was sent (no
//!   clock agreement needed). The client fails with [`ToolError::DeadlineExceeded`] when it
//!   passes; the server stops the handler then (its [`CancelToken`] fires and its future is
//!   dropped) and answers nothing useful.
//! - **Cancellation.** Dropping the future of [`ToolClient::call`] (or [`PendingCall::cancel`])
//!   sends a cancel message on the same channel, after the request (channels are ordered); the
//!   server fires the handler's [`CancelToken`] and drops the handler's future, so the handler
//!   stops at its next `await`.
//! - **At most once per idempotency key.** A call with a key ([`Call::key`]) runs at most once
//!   per `(tool, key)` while the server remembers the key: a retry (or a duplicate that arrives
//!   while the first runs) gets the first execution's result. The server remembers the last
//!   [`ServerConfig::key_window`] keys (default 10,000). A call whose handler was stopped
//!   (cancelled, deadline) is forgotten, so a retry runs it again. [`Call::retries`] retries on
//!   a lost session or connection with the same key.
//! - **Hedging** (calls marked idempotent, [`Call::hedged`]): when no answer came within a
//!   percentile of recent latency ([`HedgePolicy`], p95 by default), a second request goes to
//!   the next server (or the same when there is one); the first answer wins and the other
//!   request is cancelled. Hedges are capped at a fraction of calls (10% by default). The hedge
//!   timer is tokio's, whose resolution is 1 ms: a percentile below that still waits about a
//!   millisecond, which bounds how far hedging can cut a sub-millisecond tail.
//!
//! # Wire format
//!
//! Request body: `"TC"`, version 1, kind (1 call, 2 cancel), flags, deadline budget in
//! microseconds (u32 LE), call id (u64 LE), key length (u16 LE), key, tool-name length (u16 LE),
//! tool name, arguments. A cancel carries the call id and nothing after it. Errors are answered
//! with [`Channel::respond_error`] and a reason that starts with its kind (`unknown_tool:`,
//! `failed:`, `cancelled:`, `deadline:`, `refused:`).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{watch, Notify};

use crate::{Channel, Class, Error, Node, Peer};

#[cfg(test)]
mod tests;

const MAGIC: &[u8; 2] = b"TC";
const VERSION: u8 = 1;
const KIND_CALL: u8 = 1;
const KIND_CANCEL: u8 = 2;
const FLAG_IDEMPOTENT: u8 = 1;
const HEAD: usize = 2 + 1 + 1 + 1 + 4 + 8;

/// Why a tool call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolError {
    /// The deadline passed before an answer came.
    DeadlineExceeded,
    /// The call was cancelled (by the caller, or the server reports it stopped the handler).
    Cancelled,
    /// The tool ran and failed; the reason is the handler's.
    Failed(String),
    /// The server has no tool of that name.
    UnknownTool(String),
    /// The server refused the call (malformed request, overloaded…).
    Refused(String),
    /// The session to the server died (peer dead, closed, connection failed); the call may or
    /// may not have run: retry with the same idempotency key.
    PeerGone(Error),
    /// Another fabric error (configuration, message too large…).
    Fabric(Error),
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolError::DeadlineExceeded => f.write_str("tool call deadline exceeded"),
            ToolError::Cancelled => f.write_str("tool call cancelled"),
            ToolError::Failed(r) => write!(f, "tool failed: {r}"),
            ToolError::UnknownTool(t) => write!(f, "unknown tool {t:?}"),
            ToolError::Refused(r) => write!(f, "tool call refused: {r}"),
            ToolError::PeerGone(e) => write!(f, "tool server gone: {e}"),
            ToolError::Fabric(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ToolError {}

impl From<Error> for ToolError {
    fn from(e: Error) -> Self {
        match e {
            Error::DeadlineExceeded => ToolError::DeadlineExceeded,
            Error::Cancelled => ToolError::Cancelled,
            Error::Remote(reason) => parse_remote(&reason),
            e @ (Error::PeerDead { .. }
            | Error::PeerRestarted
            | Error::Closed
            | Error::ClosedByPeer(_)
            | Error::Protocol(_)
            | Error::Transport { .. }) => ToolError::PeerGone(e),
            e => ToolError::Fabric(e),
        }
    }
}

fn parse_remote(reason: &str) -> ToolError {
    let (kind, rest) = reason.split_once(':').unwrap_or(("failed", reason));
    let rest = rest.trim_start().to_owned();
    match kind {
        "unknown_tool" => ToolError::UnknownTool(rest),
        "cancelled" => ToolError::Cancelled,
        "deadline" => ToolError::DeadlineExceeded,
        "refused" => ToolError::Refused(rest),
        "failed" => ToolError::Failed(rest),
        _ => ToolError::Failed(reason.to_owned()),
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope

struct Envelope {
    kind: u8,
    flags: u8,
    budget: Duration,
    call_id: u64,
    key: Bytes,
    tool: String,
    args: Bytes,
}

fn encode_call(
    call_id: u64,
    budget: Duration,
    flags: u8,
    key: &[u8],
    tool: &str,
    args: &[u8],
) -> Bytes {
    let mut b = BytesMut::with_capacity(HEAD + 4 + key.len() + tool.len() + args.len());
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u8(KIND_CALL);
    b.put_u8(flags);
    b.put_u32_le(u32::try_from(budget.as_micros()).unwrap_or(u32::MAX));
    b.put_u64_le(call_id);
    b.put_u16_le(key.len() as u16);
    b.put_slice(key);
    b.put_u16_le(tool.len() as u16);
    b.put_slice(tool.as_bytes());
    b.put_slice(args);
    b.freeze()
}

fn encode_cancel(call_id: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(HEAD);
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u8(KIND_CANCEL);
    b.put_u8(0);
    b.put_u32_le(0);
    b.put_u64_le(call_id);
    b.freeze()
}

fn decode(body: &Bytes) -> Result<Envelope, String> {
    if body.len() < HEAD || &body[..2] != MAGIC {
        return Err("not a tool-call message".into());
    }
    if body[2] != VERSION {
        return Err(format!("tool-call version {} not supported", body[2]));
    }
    let kind = body[3];
    let flags = body[4];
    let budget = Duration::from_micros(u64::from(u32::from_le_bytes(
        body[5..9].try_into().expect("4 bytes"),
    )));
    let call_id = u64::from_le_bytes(body[9..17].try_into().expect("8 bytes"));
    let mut env = Envelope {
        kind,
        flags,
        budget,
        call_id,
        key: Bytes::new(),
        tool: String::new(),
        args: Bytes::new(),
    };
    if kind == KIND_CANCEL {
        return Ok(env);
    }
    if kind != KIND_CALL {
        return Err(format!("unknown tool-call message kind {kind}"));
    }
    let mut at = HEAD;
    let mut field = |what: &str| -> Result<Bytes, String> {
        let len = body
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| format!("truncated {what} length"))?;
        let v = body
            .get(at + 2..at + 2 + len)
            .ok_or_else(|| format!("truncated {what}"))?;
        let v = body.slice_ref(v);
        at += 2 + len;
        Ok(v)
    };
    env.key = field("idempotency key")?;
    let tool = field("tool name")?;
    env.tool = std::str::from_utf8(&tool)
        .map_err(|_| "tool name is not UTF-8".to_owned())?
        .to_owned();
    env.args = body.slice(at..);
    Ok(env)
}

// ---------------------------------------------------------------------------------------------
// Cancellation token

/// Fires when the caller cancels the call, or its deadline passes. Cheap to clone.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    fired: AtomicBool,
    notify: Notify,
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token that has not fired.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Fires the token (idempotent).
    pub fn cancel(&self) {
        if !self.inner.fired.swap(true, Ordering::AcqRel) {
            self.inner.notify.notify_waiters();
        }
    }

    /// Whether the token fired.
    pub fn is_cancelled(&self) -> bool {
        self.inner.fired.load(Ordering::Acquire)
    }

    /// Waits until the token fires.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// What a handler receives.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    /// The tool's name.
    pub tool: String,
    /// The arguments, as the caller sent them.
    pub args: Bytes,
    /// When the caller stops waiting (computed from the budget the request carried).
    pub deadline: Instant,
    /// Fires when the call is cancelled or its deadline passes; the handler's future is dropped
    /// right after, so a handler only needs it to stop work it spawned elsewhere.
    pub cancel: CancelToken,
    /// The caller's idempotency key, if any.
    pub key: Option<Bytes>,
    /// The name of the calling node.
    pub caller: String,
    /// The caller marked the call idempotent (it may be hedged: run twice).
    pub idempotent: bool,
}

/// The result a handler returns: the answer's bytes, or a failure reason.
pub type ToolResult = Result<Bytes, String>;

type BoxedHandler =
    Arc<dyn Fn(ToolRequest) -> Pin<Box<dyn Future<Output = ToolResult> + Send>> + Send + Sync>;

/// Settings of a [`ToolServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Idempotency keys remembered (with their results), most recent first. Default 10,000.
    pub key_window: usize,
    /// Longest a key is remembered. Default 10 minutes.
    pub key_ttl: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            key_window: 10_000,
            key_ttl: Duration::from_secs(600),
        }
    }
}

#[derive(Clone)]
enum KeyState {
    /// Running: wait on the receiver for its result.
    Running(watch::Receiver<Option<ToolResult>>),
    Done(ToolResult),
}

/// Remembered idempotency keys: bounded by count and age, oldest evicted first.
#[derive(Default)]
struct KeyWindow {
    map: HashMap<(String, Bytes), (KeyState, Instant)>,
    order: VecDeque<((String, Bytes), Instant)>,
}

impl KeyWindow {
    fn evict(&mut self, cfg: &ServerConfig, now: Instant) {
        while let Some((k, at)) = self.order.front() {
            let expired = now.duration_since(*at) > cfg.key_ttl;
            if self.order.len() <= cfg.key_window && !expired {
                break;
            }
            // Only the entry inserted at that time (a key re-inserted later has a newer stamp).
            if self.map.get(k).is_some_and(|(_, t)| t == at) {
                self.map.remove(k);
            }
            self.order.pop_front();
        }
    }
}

/// Counters of a [`ToolServer`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Handler executions started.
    pub executions: u64,
    /// Calls answered from the idempotency window without running the handler.
    pub deduplicated: u64,
    /// Handlers stopped by a cancel message.
    pub cancelled: u64,
    /// Handlers stopped because the deadline passed.
    pub deadline_exceeded: u64,
}

struct ServerInner {
    tools: HashMap<String, BoxedHandler>,
    cfg: ServerConfig,
    keys: Mutex<KeyWindow>,
    executions: AtomicU64,
    deduplicated: AtomicU64,
    cancelled: AtomicU64,
    deadline_exceeded: AtomicU64,
}

/// A registry of named tools, served on tool-call channels. Build it with
/// [`ToolServer::register`], then serve a node, a peer or a channel; clones share the registry,
/// the idempotency window and the counters.
#[derive(Clone)]
pub struct ToolServer {
    inner: Arc<ServerInner>,
}

impl Default for ToolServer {
    fn default() -> Self {
        ToolServer::with_config(ServerConfig::default())
    }
}

impl std::fmt::Debug for ToolServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.inner.tools.keys().collect();
        names.sort();
        f.debug_struct("ToolServer").field("tools", &names).finish()
    }
}

impl ToolServer {
    /// An empty registry with the default settings.
    pub fn new() -> ToolServer {
        ToolServer::default()
    }

    /// An empty registry with `cfg`.
    pub fn with_config(cfg: ServerConfig) -> ToolServer {
        ToolServer {
            inner: Arc::new(ServerInner {
                tools: HashMap::new(),
                cfg,
                keys: Mutex::new(KeyWindow::default()),
                executions: AtomicU64::new(0),
                deduplicated: AtomicU64::new(0),
                cancelled: AtomicU64::new(0),
                deadline_exceeded: AtomicU64::new(0),
            }),
        }
    }

    /// Registers `handler` as tool `name` (replacing any tool of that name). Register before
    /// serving: a server already shared (cloned, serving) panics here.
    pub fn register<F, Fut>(&mut self, name: &str, handler: F) -> &mut Self
    where
        F: Fn(ToolRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ToolResult> + Send + 'static,
    {
        let h: BoxedHandler = Arc::new(move |req| Box::pin(handler(req)));
        Arc::get_mut(&mut self.inner)
            .expect("register tools before the server is cloned or serving")
            .tools
            .insert(name.to_owned(), h);
        self
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            executions: self.inner.executions.load(Ordering::Relaxed),
            deduplicated: self.inner.deduplicated.load(Ordering::Relaxed),
            cancelled: self.inner.cancelled.load(Ordering::Relaxed),
            deadline_exceeded: self.inner.deadline_exceeded.load(Ordering::Relaxed),
        }
    }

    /// Serves every session `node` accepts, until the node closes.
    pub async fn serve(self, node: Node) {
        while let Ok(peer) = node.accept().await {
            tokio::spawn(self.clone().serve_peer(peer));
        }
    }

    /// Serves every tool-call channel the peer opens, until the session dies. Channels of other
    /// classes are ignored.
    pub async fn serve_peer(self, peer: Peer) {
        while let Ok(ch) = peer.accept_channel().await {
            if ch.class() == Class::ToolCall {
                tokio::spawn(self.clone().serve_channel(ch));
            }
        }
    }

    /// Serves calls arriving on `ch` until the session dies.
    pub async fn serve_channel(self, ch: Channel) {
        let running: Arc<Mutex<HashMap<u64, CancelToken>>> = Arc::default();
        let caller = ch.peer().name().to_owned();
        while let Ok(msg) = ch.recv().await {
            let received = Instant::now();
            let env = match decode(&msg.body) {
                Ok(env) => env,
                Err(why) => {
                    if msg.request_id.is_some() {
                        let _ = ch.respond_error(&msg, &format!("refused: {why}")).await;
                    }
                    continue;
                }
            };
            if env.kind == KIND_CANCEL {
                let token = running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&env.call_id)
                    .cloned();
                if let Some(t) = token {
                    t.cancel();
                }
                continue;
            }
            if msg.request_id.is_none() {
                continue;
            }
            let token = CancelToken::new();
            running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(env.call_id, token.clone());
            let this = self.clone();
            let ch = ch.clone();
            let running = running.clone();
            let caller = caller.clone();
            tokio::spawn(async move {
                let call_id = env.call_id;
                let answer = this.run_call(env, token, received, caller).await;
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&call_id);
                let _ = match answer {
                    Ok(body) => ch.respond(&msg, body).await,
                    Err(reason) => ch.respond_error(&msg, &reason).await,
                };
            });
        }
    }

    /// Runs one call (or finds its result by key); returns the answer or an error reason.
    async fn run_call(
        &self,
        env: Envelope,
        cancel: CancelToken,
        received: Instant,
        caller: String,
    ) -> Result<Bytes, String> {
        let Some(handler) = self.inner.tools.get(&env.tool).cloned() else {
            return Err(format!("unknown_tool: {}", env.tool));
        };
        let deadline = received + env.budget;
        let slot = (!env.key.is_empty()).then(|| (env.tool.clone(), env.key.clone()));
        let mut publish = None;
        if let Some(k) = &slot {
            let now = Instant::now();
            let found = {
                let mut keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
                keys.evict(&self.inner.cfg, now);
                let found = keys.map.get(k).map(|(s, _)| s.clone());
                if found.is_none() {
                    let (tx, rx) = watch::channel(None);
                    keys.map.insert(k.clone(), (KeyState::Running(rx), now));
                    keys.order.push_back((k.clone(), now));
                    keys.evict(&self.inner.cfg, now);
                    publish = Some((tx, now));
                }
                found
            };
            match found {
                Some(KeyState::Done(r)) => {
                    self.inner.deduplicated.fetch_add(1, Ordering::Relaxed);
                    return r.map_err(|e| format!("failed: {e}"));
                }
                Some(KeyState::Running(mut rx)) => {
                    self.inner.deduplicated.fetch_add(1, Ordering::Relaxed);
                    // The same key is running: answer with its result, within our own deadline.
                    let wait = async {
                        loop {
                            if let Some(r) = rx.borrow().clone() {
                                return Some(r);
                            }
                            if rx.changed().await.is_err() {
                                return None;
                            }
                        }
                    };
                    return tokio::select! {
                        r = wait => match r {
                            Some(r) => r.map_err(|e| format!("failed: {e}")),
                            None => Err("cancelled: the first execution with this key was stopped; retry".into()),
                        },
                        _ = cancel.cancelled() => Err("cancelled: by the caller".into()),
                        _ = tokio::time::sleep_until(deadline.into()) => Err("deadline: passed while waiting for the first execution".into()),
                    };
                }
                None => {}
            }
        }
        self.inner.executions.fetch_add(1, Ordering::Relaxed);
        let req = ToolRequest {
            tool: env.tool,
            args: env.args,
            deadline,
            cancel: cancel.clone(),
            key: slot.as_ref().map(|(_, k)| k.clone()),
            caller,
            idempotent: env.flags & FLAG_IDEMPOTENT != 0,
        };
        let fut = handler(req);
        let outcome = tokio::select! {
            r = fut => Some(r),
            _ = cancel.cancelled() => {
                self.inner.cancelled.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                self.inner.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
                cancel.cancel();
                return self.finish(slot, publish, None, "deadline: the handler did not finish in time");
            }
        };
        self.finish(slot, publish, outcome, "cancelled: by the caller")
    }

    /// Records the outcome under the key (a stopped handler is forgotten) and shapes the answer.
    fn finish(
        &self,
        slot: Option<(String, Bytes)>,
        publish: Option<(watch::Sender<Option<ToolResult>>, Instant)>,
        outcome: Option<ToolResult>,
        stopped: &str,
    ) -> Result<Bytes, String> {
        if let (Some(k), Some((tx, at))) = (slot, publish) {
            let mut keys = self.inner.keys.lock().unwrap_or_else(|e| e.into_inner());
            match &outcome {
                Some(r) => {
                    keys.map.insert(k, (KeyState::Done(r.clone()), at));
                    let _ = tx.send(Some(r.clone()));
                }
                None => {
                    keys.map.remove(&k);
                    // Dropping `tx` tells waiters the first execution stopped.
                }
            }
        }
        match outcome {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => Err(format!("failed: {e}")),
            None => Err(stopped.to_owned()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// When to send a hedge (a second request) for a call marked idempotent.
#[derive(Debug, Clone)]
pub struct HedgePolicy {
    /// Percentile of recent call latencies after which the hedge goes out. Default 95.
    pub percentile: f64,
    /// Latencies remembered. Default 1000.
    pub window: usize,
    /// No hedging before this many latencies are known. Default 20.
    pub min_samples: usize,
    /// Hedges sent, at most, as a fraction of calls. Default 0.1.
    pub max_extra: f64,
    /// Shortest hedge delay, whatever the percentile says. Default 100 µs.
    pub min_delay: Duration,
}

impl Default for HedgePolicy {
    fn default() -> Self {
        HedgePolicy {
            percentile: 95.0,
            window: 1000,
            min_samples: 20,
            max_extra: 0.1,
            min_delay: Duration::from_micros(100),
        }
    }
}

/// A tool call to make with [`ToolClient::call_with`].
#[derive(Debug, Clone)]
pub struct Call {
    /// Tool name.
    pub tool: String,
    /// Arguments.
    pub args: Bytes,
    /// Time allowed for the whole call, retries and hedges included.
    pub deadline: Duration,
    /// Idempotency key: the server runs the tool at most once per (tool, key).
    pub key: Option<Bytes>,
    /// Retries after a lost session or connection (with the same key). Default 0.
    pub retries: u32,
    /// The call may run twice (is idempotent): allow a hedge.
    pub hedged: bool,
}

impl Call {
    /// A call of `tool` with `args` and `deadline`, no key, no retry, no hedge.
    pub fn new(tool: &str, args: impl Into<Bytes>, deadline: Duration) -> Call {
        Call {
            tool: tool.to_owned(),
            args: args.into(),
            deadline,
            key: None,
            retries: 0,
            hedged: false,
        }
    }

    /// Sets the idempotency key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Call {
        self.key = Some(key.into());
        self
    }

    /// Sets the number of retries.
    pub fn retries(mut self, n: u32) -> Call {
        self.retries = n;
        self
    }

    /// Marks the call idempotent and allows a hedge.
    pub fn hedged(mut self) -> Call {
        self.hedged = true;
        self
    }
}

/// Counters of a [`ToolClient`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Calls made.
    pub calls: u64,
    /// Requests sent (first attempts, retries and hedges).
    pub requests: u64,
    /// Hedges sent.
    pub hedges: u64,
    /// Calls the hedge answered first.
    pub hedge_wins: u64,
    /// Retries sent.
    pub retries: u64,
}

#[derive(Default)]
struct Latencies {
    ring: VecDeque<u64>,
    since_sort: usize,
    cached: Option<Duration>,
}

struct ClientInner {
    replicas: Vec<Channel>,
    policy: HedgePolicy,
    next_id: AtomicU64,
    next_replica: AtomicU64,
    lat: Mutex<Latencies>,
    calls: AtomicU64,
    requests: AtomicU64,
    hedges: AtomicU64,
    hedge_wins: AtomicU64,
    retries: AtomicU64,
}

/// Calls tools on one server, or on several replicas of it (hedges go to the next replica).
/// Cheap to clone.
#[derive(Clone)]
pub struct ToolClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for ToolClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolClient")
            .field("replicas", &self.inner.replicas.len())
            .finish_non_exhaustive()
    }
}

/// Sends a cancel for `call_id` when dropped while armed (the caller gave up).
struct CancelOnDrop {
    ch: Channel,
    call_id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let msg = encode_cancel(self.call_id);
        if let Err(Error::WouldBlock) = self.ch.try_send(msg.clone()) {
            let ch = self.ch.clone();
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = ch.send(msg).await;
                });
            }
        }
    }
}

impl ToolClient {
    /// A client on a new tool-call channel (priority 3) to `peer`.
    pub fn new(peer: &Peer) -> crate::Result<ToolClient> {
        Ok(ToolClient::on_channels(
            vec![peer.channel(Class::ToolCall, 3)?],
            HedgePolicy::default(),
        ))
    }

    /// A client on the given channels (replicas of one service; the first is tried first), with
    /// a hedging policy.
    pub fn on_channels(replicas: Vec<Channel>, policy: HedgePolicy) -> ToolClient {
        assert!(!replicas.is_empty(), "a tool client needs a channel");
        ToolClient {
            inner: Arc::new(ClientInner {
                replicas,
                policy,
                next_id: AtomicU64::new(1),
                next_replica: AtomicU64::new(0),
                lat: Mutex::new(Latencies::default()),
                calls: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                hedges: AtomicU64::new(0),
                hedge_wins: AtomicU64::new(0),
                retries: AtomicU64::new(0),
            }),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        let i = &self.inner;
        ClientStats {
            calls: i.calls.load(Ordering::Relaxed),
            requests: i.requests.load(Ordering::Relaxed),
            hedges: i.hedges.load(Ordering::Relaxed),
            hedge_wins: i.hedge_wins.load(Ordering::Relaxed),
            retries: i.retries.load(Ordering::Relaxed),
        }
    }

    /// The delay after which a hedge would go out now, if hedging is possible.
    pub fn hedge_delay(&self) -> Option<Duration> {
        let p = &self.inner.policy;
        let mut lat = self.inner.lat.lock().unwrap_or_else(|e| e.into_inner());
        if lat.ring.len() < p.min_samples {
            return None;
        }
        if lat.cached.is_none() || lat.since_sort >= 32 {
            let mut v: Vec<u64> = lat.ring.iter().copied().collect();
            v.sort_unstable();
            let idx = ((p.percentile / 100.0) * (v.len() - 1) as f64).round() as usize;
            lat.cached = Some(Duration::from_micros(v[idx.min(v.len() - 1)]).max(p.min_delay));
            lat.since_sort = 0;
        }
        lat.cached
    }

    fn record(&self, d: Duration) {
        let mut lat = self.inner.lat.lock().unwrap_or_else(|e| e.into_inner());
        if lat.ring.len() >= self.inner.policy.window.max(1) {
            lat.ring.pop_front();
        }
        lat.ring.push_back(d.as_micros() as u64);
        lat.since_sort += 1;
    }

    /// Calls `tool` with `args`; fails after `deadline`. Dropping the future cancels the call
    /// at the server.
    pub async fn call(
        &self,
        tool: &str,
        args: impl Into<Bytes>,
        deadline: Duration,
    ) -> Result<Bytes, ToolError> {
        self.call_with(Call::new(tool, args, deadline)).await
    }

    /// Makes `call` (with its key, retries and hedging). Dropping the future cancels it.
    pub async fn call_with(&self, call: Call) -> Result<Bytes, ToolError> {
        let start = Instant::now();
        let end = start + call.deadline;
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        let mut attempt = 0u32;
        let r = loop {
            let r = if call.hedged {
                self.hedged(&call, end).await
            } else {
                let ch = &self.inner.replicas[attempt as usize % self.inner.replicas.len()];
                self.attempt(ch, &call, end).await
            };
            match r {
                Err(ToolError::PeerGone(_)) if attempt < call.retries && Instant::now() < end => {
                    attempt += 1;
                    self.inner.retries.fetch_add(1, Ordering::Relaxed);
                    // Give a reconnecting session a moment.
                    tokio::time::sleep(Duration::from_millis(5).min(end - Instant::now())).await;
                }
                r => break r,
            }
        };
        if r.is_ok() {
            self.record(start.elapsed());
        }
        r
    }

    /// Starts `call` in a task; the handle cancels it or waits for its result.
    pub fn start(&self, call: Call) -> PendingCall {
        let me = self.clone();
        PendingCall {
            task: tokio::spawn(async move { me.call_with(call).await }),
        }
    }

    async fn attempt(&self, ch: &Channel, call: &Call, end: Instant) -> Result<Bytes, ToolError> {
        let now = Instant::now();
        if now >= end {
            return Err(ToolError::DeadlineExceeded);
        }
        let budget = end - now;
        let call_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let flags = if call.hedged { FLAG_IDEMPOTENT } else { 0 };
        let key = call.key.as_deref().unwrap_or(&[]);
        if key.len() > u16::MAX as usize || call.tool.len() > u16::MAX as usize {
            return Err(ToolError::Fabric(Error::Config(
                "tool name or idempotency key longer than 65535 bytes".into(),
            )));
        }
        let body = encode_call(call_id, budget, flags, key, &call.tool, &call.args);
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let mut guard = CancelOnDrop {
            ch: ch.clone(),
            call_id,
            armed: true,
        };
        let r = ch.request(body, budget).await;
        // Answered, or the deadline passed (the server stops by itself then): nothing to cancel.
        guard.armed = false;
        r.map_err(ToolError::from)
    }

    async fn hedged(&self, call: &Call, end: Instant) -> Result<Bytes, ToolError> {
        let n = self.inner.replicas.len();
        let first_idx = self.inner.next_replica.fetch_add(1, Ordering::Relaxed) as usize % n;
        let first_ch = self.inner.replicas[first_idx].clone();
        let first = self.attempt(&first_ch, call, end);
        tokio::pin!(first);
        let Some(delay) = self.hedge_delay() else {
            return first.await;
        };
        tokio::select! {
            r = &mut first => return r,
            _ = tokio::time::sleep(delay) => {}
        }
        if !self.may_hedge() {
            return first.await;
        }
        self.inner.hedges.fetch_add(1, Ordering::Relaxed);
        let second_ch = self.inner.replicas[(first_idx + 1) % n].clone();
        let second = self.attempt(&second_ch, call, end);
        tokio::pin!(second);
        // The first answer wins; the loser's future is dropped, which cancels it at its server.
        // A failure waits for the other attempt.
        tokio::select! {
            r = &mut first => match r {
                Ok(b) => Ok(b),
                Err(_) => second.await,
            },
            r = &mut second => match r {
                Ok(b) => {
                    self.inner.hedge_wins.fetch_add(1, Ordering::Relaxed);
                    Ok(b)
                }
                Err(_) => first.await,
            },
        }
    }

    fn may_hedge(&self) -> bool {
        let calls = self.inner.calls.load(Ordering::Relaxed) as f64;
        let hedges = self.inner.hedges.load(Ordering::Relaxed) as f64;
        hedges < self.inner.policy.max_extra * calls
    }
}

/// A call running in a task ([`ToolClient::start`]).
#[derive(Debug)]
pub struct PendingCall {
    task: tokio::task::JoinHandle<Result<Bytes, ToolError>>,
}

impl PendingCall {
    /// Cancels the call: the server's handler is told and stopped; [`PendingCall::wait`]
    /// returns [`ToolError::Cancelled`].
    pub fn cancel(&self) {
        self.task.abort();
    }

    /// Waits for the call's result.
    pub async fn wait(self) -> Result<Bytes, ToolError> {
        match self.task.await {
            Ok(r) => r,
            Err(_) => Err(ToolError::Cancelled),
        }
    }
}
