//! [`ToolServer::serve_beside`] and what it returns, [`Incoming`]: one task that accepts a
//! node's sessions and their channels, serves every tool-call channel with a [`ToolServer`] and
//! queues everything else, boundedly, for the application.
//!
//! Imports: `server.rs` ([`ToolServer`], its settings, `serve_channel`); the crate's public API.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::server::ToolServer;
use crate::{Channel, Class, Error, Node, Peer, Result};

/// What [`Incoming::next`] hands the application: a session a peer opened with the node, or a
/// channel (of any class but [`Class::ToolCall`]) a peer opened in one.
#[derive(Debug)]
#[non_exhaustive]
pub enum Accepted {
    /// A new session. It comes before any of its channels.
    Peer(Peer),
    /// A channel for the application; [`Channel::peer`] is the session it belongs to.
    Channel(Channel),
}

/// The sessions and channels of a node served by [`ToolServer::serve_beside`], except the
/// tool calls, which the [`ToolServer`] answers. Take them with [`Incoming::accept_channel`]
/// (channels only) or [`Incoming::next`] (sessions too).
///
/// - **Every session goes through it.** It calls [`Node::accept`] and each session's
///   [`Peer::accept_channel`] itself; do not call them beside it (they would take sessions and
///   channels from it, and it would not be told of some channels that arrive).
/// - **Bounded.** It keeps at most
///   [`ServerConfig::incoming_queue`](super::ServerConfig::incoming_queue) sessions and
///   channels (16 by default) that the application has not taken; when the queue is full it
///   stops accepting (sessions, and channels of every class, tool calls included) until the
///   application takes one. Channels it has not accepted wait in the session, under
///   the fabric's own bounds. Tool calls on tool-call channels already served go on.
/// - **Nothing is kept that nobody handles.** A channel is in the queue or in the
///   application's hands, never held elsewhere: a channel the application drops, or leaves in
///   the queue when it drops the `Incoming`, is dropped (the router keeps no handle on it), so
///   it is refused, as any channel the application drops: its opener's requests on it fail
///   at once with `Error::ChannelRefused`.
/// - **Dropping it stops everything it started**: the accepting task, the tool-call channels'
///   tasks and the handlers still running are aborted (they stop at their next poll; a keyed
///   call stopped so is forgotten, as a cancelled one, so a retry runs it again). It holds a
///   clone of the node, so the node lives at least as long. It also stops, and
///   [`Incoming::next`] fails with [`Error::Closed`], if the node's accept fails.
pub struct Incoming {
    queue: mpsc::Receiver<Accepted>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("queued", &self.queue.len())
            .field("running", &!self.task.is_finished())
            .finish()
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Incoming {
    /// Waits for the next session or channel for the application, in the order they were
    /// accepted (a session before its channels). Fails with [`Error::Closed`] once the router
    /// has stopped and its queue is empty.
    ///
    /// Cancel-safe: dropping the future takes nothing from the queue.
    pub async fn next(&mut self) -> Result<Accepted> {
        self.queue.recv().await.ok_or(Error::Closed)
    }

    /// Waits for the next channel for the application (any class but [`Class::ToolCall`]);
    /// sessions announced before it are passed over (each channel names its own:
    /// [`Channel::peer`]). Fails with [`Error::Closed`] once the router has stopped and its
    /// queue is empty.
    ///
    /// Cancel-safe: dropping the future loses no channel.
    pub async fn accept_channel(&mut self) -> Result<Channel> {
        loop {
            match self.next().await? {
                Accepted::Channel(ch) => return Ok(ch),
                Accepted::Peer(_) => continue,
            }
        }
    }

    /// Sessions and channels waiting in the queue for the application (never more than
    /// [`ServerConfig::incoming_queue`](super::ServerConfig::incoming_queue)).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

impl ToolServer {
    /// Serves this server's tools on `node` **beside the application's own channels**: every
    /// session the node accepts, and every channel opened in it, goes through one task; the
    /// tool-call channels are served here, every other channel (coordination, bulk) and every
    /// session is handed to the application through the returned [`Incoming`], a bounded queue.
    ///
    /// ```no_run
    /// # use agentfabric::{Class, Node};
    /// # use agentfabric::tools::ToolServer;
    /// # async fn subagent(node: Node) {
    /// let mut tools = ToolServer::new();
    /// tools.register("search", |req| async move { Ok(req.args) });
    /// let mut incoming = tools.serve_beside(node);
    /// while let Ok(ch) = incoming.accept_channel().await {
    ///     if ch.class() != Class::Coordination {
    ///         continue; // dropped: nobody reads it
    ///     }
    ///     tokio::spawn(async move {
    ///         while let Ok(m) = ch.recv().await {
    ///             let _ = ch.respond(&m, "done").await;
    ///         }
    ///     });
    /// }
    /// # }
    /// ```
    ///
    /// See [`Incoming`] for the queue's bound, what is dropped and how it stops. Must be called
    /// inside a tokio runtime (it spawns its task there).
    pub fn serve_beside(self, node: Node) -> Incoming {
        let (tx, queue) = mpsc::channel(self.config().incoming_queue.max(1));
        let task = tokio::spawn(route(Routing::new(node), self, tx));
        Incoming { queue, task }
    }
}

/// The router's loop: room in the application's queue first, then the next session or channel.
async fn route(mut routing: Routing, tools: ToolServer, tx: mpsc::Sender<Accepted>) {
    loop {
        // Nothing is accepted without room for it: the channels the router holds are the ones
        // in the queue, never more.
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        let item = loop {
            match poll_fn(|cx| routing.poll_arrival(cx)).await {
                Arrival::Session(Ok(peer)) => break Accepted::Peer(peer),
                Arrival::Session(Err(_)) => return,
                Arrival::Channel(ch) if ch.class() == Class::ToolCall => {
                    routing.tools.spawn(tools.clone().serve_channel(ch));
                }
                Arrival::Channel(ch) => break Accepted::Channel(ch),
            }
        };
        permit.send(item);
    }
}

type Accepting<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

enum Arrival {
    Session(Result<Peer>),
    Channel(Channel),
}

/// A session the router accepts channels of.
struct Watched {
    peer: Peer,
    next: Accepting<Channel>,
}

fn accept_channel(peer: &Peer) -> Accepting<Channel> {
    let peer = peer.clone();
    Box::pin(async move { peer.accept_channel().await })
}

fn accept_session(node: &Node) -> Accepting<Peer> {
    let node = node.clone();
    Box::pin(async move { node.accept().await })
}

/// The router's state: the node's next session, the sessions' next channels, and the tasks
/// serving tool-call channels. Every future here takes something only when it completes, so
/// one that is not polled (while the queue is full) or is dropped (with the router) takes
/// nothing.
struct Routing {
    node: Node,
    session: Accepting<Peer>,
    peers: Vec<Watched>,
    /// Where the next round of polling the sessions starts (each gets a turn first).
    turn: usize,
    tools: JoinSet<()>,
}

impl Routing {
    fn new(node: Node) -> Routing {
        Routing {
            session: accept_session(&node),
            node,
            peers: Vec::new(),
            turn: 0,
            tools: JoinSet::new(),
        }
    }

    /// The next session or channel. Polls every live session (cost linear in their number, paid
    /// once per wake-up: when a session or channel arrives, or a tool-call channel's task ends).
    fn poll_arrival(&mut self, cx: &mut Context<'_>) -> Poll<Arrival> {
        while let Poll::Ready(Some(_)) = self.tools.poll_join_next(cx) {}
        if let Poll::Ready(r) = self.session.as_mut().poll(cx) {
            self.session = accept_session(&self.node);
            if let Ok(peer) = &r {
                self.peers.push(Watched {
                    peer: peer.clone(),
                    next: accept_channel(peer),
                });
            }
            return Poll::Ready(Arrival::Session(r));
        }
        let n = self.peers.len();
        let mut found = None;
        let mut dead = Vec::new();
        for k in 0..n {
            let i = (self.turn + k) % n;
            let w = &mut self.peers[i];
            match w.next.as_mut().poll(cx) {
                Poll::Ready(Ok(ch)) => {
                    w.next = accept_channel(&w.peer);
                    self.turn = i + 1;
                    found = Some(ch);
                    break;
                }
                // The session is over: it has no more channels.
                Poll::Ready(Err(_)) => dead.push(i),
                Poll::Pending => {}
            }
        }
        dead.sort_unstable();
        for i in dead.into_iter().rev() {
            self.peers.swap_remove(i);
        }
        match found {
            Some(ch) => Poll::Ready(Arrival::Channel(ch)),
            None => Poll::Pending,
        }
    }
}
