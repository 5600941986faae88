//! [`ToolClient`]: calls with deadlines, retries on a lost session, hedging to replicas, and
//! a cancel sent when the caller gives up; [`ToolError`], why a call failed (the server's
//! error reasons, parsed).
//!
//! Imports: `wire.rs` (encoding requests and cancels); the crate's public API.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::wire::{encode_call, encode_cancel, FLAG_IDEMPOTENT};
use crate::sync::lock;
use crate::{Channel, Class, Error, Peer};

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
    /// The server refused the call (malformed request, overloaded…), or the node serves no
    /// tool calls: its application refused or dropped the channel, or serves no session
    /// (`Error::ChannelRefused`; retrying on the same channel cannot succeed).
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
            Error::Tool(f) => f.into(),
            Error::DeadlineExceeded => ToolError::DeadlineExceeded,
            Error::Cancelled => ToolError::Cancelled,
            Error::Remote(reason) => parse_remote(&reason),
            Error::ChannelRefused { reason, .. } => ToolError::Refused(format!(
                "the node serves no tool calls (channel refused: {reason})"
            )),
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
        let mut lat = lock(&self.inner.lat);
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
        let mut lat = lock(&self.inner.lat);
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
