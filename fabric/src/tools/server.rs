//! [`ToolServer`]: a registry of named tools served on tool-call channels, with the
//! idempotency window (at most one execution per tool and key), cancellation and deadlines.
//! Serving a whole node beside the application's own channels is `router.rs`'s.
//!
//! Imports: `wire.rs` (decoding requests) and `cancel.rs`; the crate's public API.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::cancel::CancelToken;
use super::wire::{decode, Envelope, FLAG_IDEMPOTENT, KIND_CANCEL};
use crate::sync::lock;
use crate::{Channel, Class, Node, Peer};

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
    /// How many sessions and channels [`ToolServer::serve_beside`] keeps for the application
    /// (its [`Incoming`](super::Incoming) queue) before it stops accepting more. Default 16;
    /// 0 counts as 1.
    pub incoming_queue: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            key_window: 10_000,
            key_ttl: Duration::from_secs(600),
            incoming_queue: 16,
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

/// Tools known only when they are called: whether a name is served, and the one handler for them.
struct Dynamic {
    serves: Box<dyn Fn(&str) -> bool + Send + Sync>,
    handler: BoxedHandler,
}

struct ServerInner {
    tools: HashMap<String, BoxedHandler>,
    dynamic: Option<Dynamic>,
    cfg: ServerConfig,
    keys: Mutex<KeyWindow>,
    executions: AtomicU64,
    deduplicated: AtomicU64,
    cancelled: AtomicU64,
    deadline_exceeded: AtomicU64,
}

/// A registry of named tools, served on tool-call channels. Build it with
/// [`ToolServer::register`], then serve it:
///
/// - beside the application's own channels on one node: [`ToolServer::serve_beside`] (the way
///   for a subagent that also coordinates);
/// - on a node that does nothing else: [`ToolServer::serve`] (it takes every session);
/// - on one session or one channel the application accepted itself:
///   [`ToolServer::serve_peer`], [`ToolServer::serve_channel`].
///
/// Clones share the registry, the idempotency window and the counters.
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
                dynamic: None,
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

    /// Serves every tool `serves` accepts (and no tool of that name is registered) with the one
    /// `handler`, which finds the tool's name in [`ToolRequest::tool`]: for a server whose tools
    /// come and go while it serves, such as the sidecar forwarding calls to its clients. A name
    /// `serves` refuses fails as an unknown tool. Set before serving, as with
    /// [`ToolServer::register`] (same panic).
    pub fn register_dynamic<S, F, Fut>(&mut self, serves: S, handler: F) -> &mut Self
    where
        S: Fn(&str) -> bool + Send + Sync + 'static,
        F: Fn(ToolRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ToolResult> + Send + 'static,
    {
        let h: BoxedHandler = Arc::new(move |req| Box::pin(handler(req)));
        Arc::get_mut(&mut self.inner)
            .expect("register tools before the server is cloned or serving")
            .dynamic = Some(Dynamic {
            serves: Box::new(serves),
            handler: h,
        });
        self
    }

    /// The handler for `tool`: registered by name, else the dynamic one if it serves the name.
    fn handler(&self, tool: &str) -> Option<BoxedHandler> {
        if let Some(h) = self.inner.tools.get(tool) {
            return Some(h.clone());
        }
        let d = self.inner.dynamic.as_ref()?;
        (d.serves)(tool).then(|| d.handler.clone())
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

    /// Idempotency keys remembered now (for the tests of the window's bound).
    #[cfg(test)]
    pub(super) fn keys_remembered(&self) -> usize {
        lock(&self.inner.keys).map.len()
    }

    /// The settings.
    pub(super) fn config(&self) -> &ServerConfig {
        &self.inner.cfg
    }

    /// Serves tool calls on every session `node` accepts, until the node closes.
    ///
    /// It takes **every** session of the node: the application's own [`Node::accept`] never
    /// sees one while this runs, and the channels of other classes are dropped unread (see
    /// [`ToolServer::serve_peer`]). For a node that serves tools *and* has channels of its own
    /// (a subagent that also coordinates), use [`ToolServer::serve_beside`], which hands those
    /// channels to the application.
    ///
    /// The sessions are served in tasks of their own, which outlive this future: dropping it
    /// stops accepting new sessions only. [`ToolServer::serve_beside`] stops everything when its
    /// handle is dropped.
    pub async fn serve(self, node: Node) {
        while let Ok(peer) = node.accept().await {
            tokio::spawn(self.clone().serve_peer(peer));
        }
    }

    /// Serves every tool-call channel the peer opens, until the session dies.
    ///
    /// Channels of **other classes are dropped unread**: nobody answers a coordination or bulk
    /// channel the peer opens on this session (dropped, the channel is refused: its requests fail
    /// with `Error::ChannelRefused` at the caller). Use it only on a
    /// session that carries nothing but tool calls; to serve tools beside the application's own
    /// channels, use [`ToolServer::serve_beside`] (or accept the channels yourself and give the
    /// tool-call ones to [`ToolServer::serve_channel`]). It must be the session's only
    /// [`Peer::accept_channel`] caller.
    pub async fn serve_peer(self, peer: Peer) {
        while let Ok(ch) = peer.accept_channel().await {
            if ch.class() == Class::ToolCall {
                tokio::spawn(self.clone().serve_channel(ch));
            }
        }
    }

    /// Serves calls arriving on `ch` until the session dies.
    ///
    /// Each call runs in a task of its own, owned by this future: when the session dies the
    /// future waits for the calls still running (they finish or meet their deadline, so a keyed
    /// call's result is remembered for a retry on another session); when the future is dropped
    /// first, the running calls are dropped with it (as if cancelled: a keyed call is forgotten,
    /// so a retry runs it again).
    pub async fn serve_channel(self, ch: Channel) {
        let running: Arc<Mutex<HashMap<u64, CancelToken>>> = Arc::default();
        let caller = ch.peer().name().to_owned();
        let mut calls = JoinSet::new();
        while let Ok(msg) = ch.recv().await {
            // Forget the calls that have finished (a panicked handler included).
            while calls.try_join_next().is_some() {}
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
                let token = lock(&running).get(&env.call_id).cloned();
                if let Some(t) = token {
                    t.cancel();
                }
                continue;
            }
            if msg.request_id.is_none() {
                continue;
            }
            let token = CancelToken::new();
            lock(&running).insert(env.call_id, token.clone());
            let this = self.clone();
            let ch = ch.clone();
            let running = running.clone();
            let caller = caller.clone();
            calls.spawn(async move {
                let call_id = env.call_id;
                let answer = this.run_call(env, token, received, caller).await;
                lock(&running).remove(&call_id);
                let _ = match answer {
                    Ok(body) => ch.respond(&msg, body).await,
                    Err(reason) => ch.respond_error(&msg, &reason).await,
                };
            });
        }
        while calls.join_next().await.is_some() {}
    }

    /// Runs one call (or finds its result by key); returns the answer or an error reason.
    async fn run_call(
        &self,
        env: Envelope,
        cancel: CancelToken,
        received: Instant,
        caller: String,
    ) -> Result<Bytes, String> {
        let Some(handler) = self.handler(&env.tool) else {
            return Err(format!("unknown_tool: {}", env.tool));
        };
        let deadline = received + env.budget;
        let slot = (!env.key.is_empty()).then(|| (env.tool.clone(), env.key.clone()));
        let mut publish = None;
        if let Some(k) = &slot {
            let now = Instant::now();
            let found = {
                let mut keys = lock(&self.inner.keys);
                keys.evict(&self.inner.cfg, now);
                let found = keys.map.get(k).map(|(s, _)| s.clone());
                if found.is_none() {
                    let (tx, rx) = watch::channel(None);
                    keys.map.insert(k.clone(), (KeyState::Running(rx), now));
                    keys.order.push_back((k.clone(), now));
                    keys.evict(&self.inner.cfg, now);
                    publish = Some(Publisher {
                        keys: &self.inner.keys,
                        key: k.clone(),
                        at: now,
                        tx,
                        recorded: false,
                    });
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
                if let Some(why) = cancel.abandoned() {
                    // Not run, as far as the key goes: `publish` is dropped, the key forgotten.
                    drop(publish);
                    return Err(format!("refused: {why}"));
                }
                self.inner.cancelled.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                self.inner.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
                cancel.cancel();
                drop(publish);
                return Err("deadline: the handler did not finish in time".into());
            }
        };
        if let (Some(p), Some(r)) = (publish, &outcome) {
            p.record(r);
        }
        match outcome {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => Err(format!("failed: {e}")),
            None => Err("cancelled: by the caller".into()),
        }
    }
}

/// The execution of a keyed call that this server started. [`Publisher::record`] remembers its
/// result under the key (and hands it to the duplicates waiting for it); dropped without a
/// result (the handler was cancelled or met its deadline, the serving future was dropped, the
/// handler panicked), it forgets the key, so that a retry runs the call again instead of
/// finding it running for as long as the key is remembered.
struct Publisher<'a> {
    keys: &'a Mutex<KeyWindow>,
    key: (String, Bytes),
    /// When the key was inserted: only that entry is ours (a key evicted while its call ran may
    /// have been inserted again by another call since).
    at: Instant,
    tx: watch::Sender<Option<ToolResult>>,
    recorded: bool,
}

impl Publisher<'_> {
    fn record(mut self, result: &ToolResult) {
        {
            let mut keys = lock(self.keys);
            if let Some(entry) = keys.map.get_mut(&self.key).filter(|(_, t)| *t == self.at) {
                entry.0 = KeyState::Done(result.clone());
            }
        }
        let _ = self.tx.send(Some(result.clone()));
        self.recorded = true;
    }
}

impl Drop for Publisher<'_> {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let mut keys = lock(self.keys);
        if keys.map.get(&self.key).is_some_and(|(_, t)| *t == self.at) {
            keys.map.remove(&self.key);
        }
        // Dropping `tx` next tells the waiting duplicates that this execution stopped.
    }
}
