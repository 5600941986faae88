//! [`Node`]: a named endpoint with transports; it listens, connects and accepts peers, and runs
//! one task per peer session that survives reconnections.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};

use super::driver::{ConnDriver, ConnEnd};
use super::peer::Peer;
use super::peer_state::{PeerShared, PeerState};
use crate::bulk::{serve_transfers, AlignedBuf, Notification, Region, RegionTable};
use crate::config::Config;
use crate::core::{Handshake, HelloStatus, PeerParams, Role, Session};
use crate::error::{Error, ProtocolError, Result};
use crate::frame::Frame;
use crate::sync::lock;
use crate::transport::{split_url, Connection, Transport};

/// Sessions accepted and not yet taken by [`Node::accept`].
const ACCEPT_BACKLOG: usize = 1024;
/// Transfer notifications not yet taken by [`Node::notification`].
const NOTIFICATION_BACKLOG: usize = 1024;
/// The node's configuration with chunks no larger than what transport `t` carries.
fn session_config(cfg: &Config, t: &dyn Transport) -> Config {
    let max = u32::try_from(t.max_frame_payload())
        .unwrap_or(u32::MAX)
        .max(1);
    let mut cfg = cfg.clone();
    cfg.chunk_size.coordination = cfg.chunk_size.coordination.min(max);
    cfg.chunk_size.toolcall = cfg.chunk_size.toolcall.min(max);
    cfg.chunk_size.bulk = cfg.chunk_size.bulk.min(max);
    cfg
}

/// How long [`Node::close`] waits for its sessions' drivers to hand their Close frames to the
/// transports (and dropping a node lets them try) before it stops them.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The reason peers get when a node is dropped without [`Node::close`].
const DROPPED: &str = "the node was dropped";

/// How often a Hello is repeated on a transport that may lose it.
const HELLO_REPEAT: Duration = Duration::from_millis(50);

/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// Builds a [`Node`].
pub struct NodeBuilder {
    name: String,
    config: Config,
    transports: Vec<Arc<dyn Transport>>,
}

impl NodeBuilder {
    /// Adds a transport; its scheme (`tcp`, `mem`…) selects it in addresses.
    pub fn transport(mut self, t: impl Transport) -> Self {
        self.transports.push(Arc::new(t));
        self
    }

    /// Sets the configuration of every session of the node (default: [`Config::default`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Builds the node. Must be called inside a tokio runtime's context when the node is used.
    pub fn build(self) -> Result<Node> {
        self.config.validate().map_err(Error::Config)?;
        if self.name.is_empty() || self.name.len() > crate::core::handshake::MAX_NAME {
            return Err(Error::Config(format!(
                "node name must be 1 to {} bytes",
                crate::core::handshake::MAX_NAME
            )));
        }
        // Regions are registered for one-sided access with the first transport whose device
        // offers it, else with the first that emulates it (TCP).
        let domains: Vec<_> = self
            .transports
            .iter()
            .filter_map(|t| t.memory_domain())
            .collect();
        let memory_domain = domains
            .iter()
            .find(|d| !d.emulated())
            .or(domains.first())
            .cloned();
        let mut transports = HashMap::new();
        for t in self.transports {
            transports.insert(t.scheme(), t);
        }
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        let (notify_tx, notify_rx) = mpsc::channel(NOTIFICATION_BACKLOG);
        Ok(Node {
            inner: Arc::new(NodeInner {
                name: self.name,
                config: self.config,
                transports,
                sessions: Mutex::new(HashMap::new()),
                incoming_tx: tx,
                incoming_rx: tokio::sync::Mutex::new(rx),
                tasks: Mutex::new(Vec::new()),
                session_tasks: Mutex::new(Vec::new()),
                closed: watch::Sender::new(false),
                regions: Arc::new(RegionTable::new(memory_domain)),
                notify_tx,
                notify_rx: tokio::sync::Mutex::new(notify_rx),
            }),
        })
    }
}

struct SessionEntry {
    shared: Weak<PeerShared>,
    /// Acceptor side: where resumed connections go.
    resume: Option<mpsc::Sender<Connection>>,
}

struct NodeInner {
    name: String,
    config: Config,
    transports: HashMap<&'static str, Arc<dyn Transport>>,
    sessions: Mutex<HashMap<u64, SessionEntry>>,
    incoming_tx: mpsc::Sender<Peer>,
    incoming_rx: tokio::sync::Mutex<mpsc::Receiver<Peer>>,
    /// Listeners, handshakes and transfer services: stopped at once when the node closes.
    tasks: Mutex<Vec<AbortHandle>>,
    /// One task per session (its connections' drivers): when the node closes they send the
    /// session's Close frame and end by themselves.
    session_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Set when the node closes ([`Node::close`], or the last handle dropped).
    closed: watch::Sender<bool>,
    regions: Arc<RegionTable>,
    notify_tx: mpsc::Sender<Notification>,
    notify_rx: tokio::sync::Mutex<mpsc::Receiver<Notification>>,
}

impl NodeInner {
    /// Starts serving the peer's transfers on this node's regions.
    fn serve_transfers(&self, shared: &Arc<PeerShared>) {
        let peer = Peer::internal(shared.clone());
        let task = tokio::spawn(serve_transfers(
            peer,
            self.regions.clone(),
            self.notify_tx.clone(),
        ));
        self.track(task.abort_handle());
    }

    fn params(&self) -> PeerParams {
        PeerParams {
            recv_window: self.config.recv_window,
        }
    }

    fn track(&self, h: AbortHandle) {
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(h);
    }

    /// Keeps a session's task, for closing.
    fn track_session(&self, h: JoinHandle<()>) {
        let mut tasks = lock(&self.session_tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(h);
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Registers a new session, unless the node is closed (checked under the sessions' lock,
    /// so a session is either registered before [`NodeInner::shut`] looks, and closed by it,
    /// or refused).
    fn register(&self, id: u64, entry: SessionEntry) -> Result<()> {
        let mut sessions = lock(&self.sessions);
        if self.is_closed() {
            return Err(Error::Closed);
        }
        sessions.insert(id, entry);
        Ok(())
    }

    /// Closes the node: no new session (listeners, handshakes and transfer services stop),
    /// and a Close frame with `reason` queued on every session, which its driver sends before
    /// it ends. Returns the sessions and their tasks, for [`close_sessions`]. Blocks on
    /// nothing.
    fn shut(&self, reason: &str) -> Closing {
        self.closed.send_replace(true);
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        // Taken out of the lock first: closing a session wakes its tasks and writes to its
        // connection, and no lock of the node was held for that before.
        let sessions: Vec<Arc<PeerShared>> = lock(&self.sessions)
            .values()
            .filter_map(|e| e.shared.upgrade())
            .collect();
        for s in &sessions {
            let mut st = s.state();
            st.session.close(reason);
            st.kick();
        }
        Closing {
            sessions: sessions.iter().map(Arc::downgrade).collect(),
            tasks: std::mem::take(&mut *lock(&self.session_tasks)),
        }
    }
}

/// The sessions of a node being closed, and their tasks.
struct Closing {
    sessions: Vec<Weak<PeerShared>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Waits, at most [`CLOSE_GRACE`], for the sessions' tasks to end (each ends once its Close
/// frame is handed to the transport, or at once when its session has no connection); then
/// stops those still running and fails what is still pending on their sessions with
/// [`Error::Closed`].
async fn close_sessions(closing: Closing) {
    let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
    for mut t in closing.tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            t.abort();
        }
    }
    for s in closing.sessions.iter().filter_map(Weak::upgrade) {
        s.state().kill(Error::Closed);
    }
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        // As `Node::close`, without waiting: the session tasks send their Close frames by
        // themselves; a task of the runtime stops those still running after the grace period.
        let closing = self.shut(DROPPED);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(close_sessions(closing));
            }
            Err(_) => {
                for t in &closing.tasks {
                    t.abort();
                }
                for s in closing.sessions.iter().filter_map(Weak::upgrade) {
                    s.state().kill(Error::Closed);
                }
            }
        }
    }
}

/// A named endpoint of the fabric. Cheap to clone.
///
/// [`Node::close`] ends it and tells its peers; dropping the last clone does the same without
/// waiting: every session sends the peer a Close frame (the peer's pending and later
/// operations fail with [`Error::ClosedByPeer`] within about a round trip, instead of at its
/// peer timeout), fails with [`Error::Closed`] on this side, and the node's tasks stop.
///
/// # The runtime
///
/// A node runs on the tokio runtime it is built in. Build that runtime with
/// [`runtime()`](crate::runtime()): one worker fewer than the cores (at least one). The tcp
/// transport moves bulk on low-priority threads of its own (two per connection), and verbs posts
/// on threads of its own on a software device: they need a core while the workers run. With
/// tokio's default (`#[tokio::main]`, a worker per core), a woken worker waits behind them, and
/// they behind the workers: five 16 MiB messages took 23–188 ms each on a 2-core machine.
///
/// ```
/// fn main() -> agentfabric::Result<()> {
///     agentfabric::runtime()?.block_on(async {
///         let net = agentfabric::mem::MemNetwork::new();
///         let node = agentfabric::Node::builder("orchestrator")
///             .transport(net.transport())
///             .build()?;
///         node.listen("mem://orchestrator").await?;
///         Ok(())
///     })
/// }
/// ```
///
/// `#[tokio::main(worker_threads = N)]` takes a literal only (an attribute cannot call a
/// function): [`runtime::worker_threads()`](crate::runtime::worker_threads) is the count the
/// helper uses, and [`runtime::builder()`](crate::runtime::builder) its builder, for other
/// settings.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl Node {
    /// Starts building a node called `name` (1–255 bytes; peers see it). Build it inside a
    /// runtime from [`runtime()`](crate::runtime()), which leaves the transports' bulk threads a
    /// core (see [`Node`]).
    pub fn builder(name: impl Into<String>) -> NodeBuilder {
        NodeBuilder {
            name: name.into(),
            config: Config::default(),
            transports: Vec::new(),
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn transport_for<'u>(&self, url: &'u str) -> Result<(Arc<dyn Transport>, &'u str)> {
        let (scheme, addr) = split_url(url)
            .ok_or_else(|| Error::InvalidAddress(format!("{url:?} has no scheme:// prefix")))?;
        let t = self
            .inner
            .transports
            .get(scheme)
            .ok_or_else(|| Error::UnknownTransport(scheme.to_owned()))?;
        Ok((t.clone(), addr))
    }

    /// Closes the node: every session sends its peer a Close frame carrying `reason` (the
    /// peer's pending and later operations fail with [`Error::ClosedByPeer`] with it, within
    /// about a round trip), then ends; here they fail with [`Error::Closed`]. The listeners
    /// stop, and later [`Node::connect`], [`Node::accept`] and [`Node::listen`] fail with
    /// [`Error::Closed`] (a pending `accept` too).
    ///
    /// Returns once every session's driver has handed its Close frame to the transport, or
    /// after one second at most (a transport that takes no more bytes, such as a peer that
    /// stopped reading, does not hold it longer: such sessions are ended without it). Messages
    /// still queued are not sent: use [`Channel::flush`](crate::Channel::flush) first. Closing
    /// again does nothing more; dropping the last handle of the node closes it the same way
    /// without waiting.
    pub async fn close(&self, reason: &str) {
        let closing = self.inner.shut(reason);
        close_sessions(closing).await;
    }

    /// Listens on `url` (e.g. `tcp://127.0.0.1:0`, `mem://name`) and accepts sessions in the
    /// background; take them with [`Node::accept`]. Returns the address peers should use.
    /// Fails with [`Error::Closed`] once the node is closed.
    pub async fn listen(&self, url: &str) -> Result<String> {
        if self.inner.is_closed() {
            return Err(Error::Closed);
        }
        let (t, addr) = self.transport_for(url)?;
        let mut listener = t.listen(addr).await.map_err(|e| Error::transport(&e))?;
        let local = listener.local_addr();
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            loop {
                let conn = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        if e.kind() == io::ErrorKind::NotConnected {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                let t = t.clone();
                let handle = tokio::spawn(accept_connection(Arc::downgrade(&inner), t, conn));
                inner.track(handle.abort_handle());
            }
        });
        self.inner.track(task.abort_handle());
        if self.inner.is_closed() {
            // Closed while the listener was being set up.
            task.abort();
            return Err(Error::Closed);
        }
        Ok(local)
    }

    /// Connects to the node at `url` and opens a session. Fails with a transport error when the
    /// peer cannot be reached, [`Error::Protocol`] when the handshake is refused or malformed,
    /// or [`Error::Closed`] once this node is closed.
    pub async fn connect(&self, url: &str) -> Result<Peer> {
        if self.inner.is_closed() {
            return Err(Error::Closed);
        }
        let (t, addr) = self.transport_for(url)?;
        let session_id = rand::random::<u64>() | 1;
        let timeout = self.inner.config.connect_timeout;
        let hello = Handshake {
            session_id,
            status: HelloStatus::New,
            name: self.inner.name.clone(),
            params: self.inner.params(),
        };
        let (conn, ack, leftover) = tokio::time::timeout(timeout, dial(&*t, addr, &hello))
            .await
            .map_err(|_| Error::Transport {
                kind: io::ErrorKind::TimedOut,
                message: format!("could not connect and handshake with {url} within {timeout:?}"),
            })??;
        if ack.status != HelloStatus::Accepted {
            return Err(ProtocolError::BadHandshake(format!("{url} refused the session")).into());
        }
        let session = Session::new(
            Role::Initiator,
            session_config(&self.inner.config, &*t),
            ack.params,
            t.reliable(),
            Instant::now(),
        );
        let shared = Arc::new(PeerShared::new(
            ack.name,
            session_id,
            PeerState::new(session, url.to_owned()),
        ));
        let entry = SessionEntry {
            shared: Arc::downgrade(&shared),
            resume: None,
        };
        if let Err(e) = self.inner.register(session_id, entry) {
            // Closed during the handshake: the peer is told, as the node's other peers were.
            close_unregistered(&shared, conn).await;
            return Err(e);
        }
        let mode = Mode::Initiator {
            transport: t,
            addr: addr.to_owned(),
            hello: Handshake {
                status: HelloStatus::Resume,
                ..hello
            },
        };
        let task = tokio::spawn(run_session(
            Arc::downgrade(&self.inner),
            shared.clone(),
            conn,
            leftover,
            mode,
        ));
        self.inner.track_session(task);
        self.inner.serve_transfers(&shared);
        Ok(Peer::app(shared))
    }

    /// Waits for the next session a peer opened with this node (after [`Node::listen`]).
    /// Fails with [`Error::Closed`] once the node is closed.
    pub async fn accept(&self) -> Result<Peer> {
        let mut closed = self.inner.closed.subscribe();
        let accept = async {
            self.inner
                .incoming_rx
                .lock()
                .await
                .recv()
                .await
                .ok_or(Error::Closed)
        };
        tokio::select! {
            biased;
            _ = closed.wait_for(|c| *c) => Err(Error::Closed),
            r = accept => r,
        }
    }

    /// Registers `len` bytes of zeroed, page-aligned memory with the node, for peers to read and
    /// write through the region's descriptor.
    pub fn register(&self, len: usize) -> Result<Region> {
        Ok(self.inner.regions.register(AlignedBuf::new(len)?))
    }

    /// Registers a buffer the application allocated (and may have filled).
    pub fn register_buf(&self, buf: AlignedBuf) -> Region {
        self.inner.regions.register(buf)
    }

    /// Waits for the next notification a peer attached to a transfer into one of this node's
    /// regions. Notifications queue (boundedly: a full queue slows the writers down).
    pub async fn notification(&self) -> Result<Notification> {
        self.inner
            .notify_rx
            .lock()
            .await
            .recv()
            .await
            .ok_or(Error::Closed)
    }

    /// Every live session of the node.
    pub fn peers(&self) -> Vec<Peer> {
        let sessions = lock(&self.inner.sessions);
        sessions
            .values()
            .filter_map(|e| e.shared.upgrade())
            .map(Peer::app)
            .collect()
    }
}

/// Connects and runs the initiator's side of the handshake.
async fn dial(
    t: &dyn Transport,
    addr: &str,
    hello: &Handshake,
) -> Result<(Connection, Handshake, Vec<Frame>)> {
    let mut conn = t.connect(addr).await.map_err(|e| Error::transport(&e))?;
    // On a transport that may lose frames the Hello is repeated until answered (the acceptor
    // answers repeats, and the session ignores repeated answers).
    let repeat = (!t.reliable()).then_some(HELLO_REPEAT);
    let mut frames = loop {
        conn.sink.push(hello.encode());
        poll_fn(|cx| conn.sink.poll_flush(cx))
            .await
            .map_err(|e| Error::transport(&e))?;
        match repeat {
            None => break recv_some(&mut conn).await?,
            Some(every) => {
                if let Ok(r) = tokio::time::timeout(every, recv_some(&mut conn)).await {
                    break r?;
                }
            }
        }
    };
    let ack = Handshake::decode(&frames[0])?;
    frames.remove(0);
    Ok((conn, ack, frames))
}

async fn recv_some(conn: &mut Connection) -> Result<Vec<Frame>> {
    let mut frames = Vec::new();
    poll_fn(|cx| conn.stream.poll_recv(cx, &mut frames))
        .await
        .map_err(|e| match e {
            crate::transport::RecvError::Frame(f) => Error::from(f),
            other => Error::Transport {
                kind: io::ErrorKind::ConnectionAborted,
                message: format!("during the handshake: {other}"),
            },
        })?;
    Ok(frames)
}

/// The acceptor's side of the handshake for one incoming connection.
async fn accept_connection(node: Weak<NodeInner>, t: Arc<dyn Transport>, mut conn: Connection) {
    let Some(timeout) = node.upgrade().map(|n| n.config.connect_timeout) else {
        return;
    };
    let frames = match tokio::time::timeout(timeout, recv_some(&mut conn)).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!(remote = %conn.remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(remote = %conn.remote, "no handshake within {timeout:?}");
            return;
        }
    };
    let hello = match Handshake::decode(&frames[0]) {
        Ok(h) if matches!(h.status, HelloStatus::New | HelloStatus::Resume) => h,
        Ok(_) | Err(_) => {
            tracing::warn!(remote = %conn.remote, "connection did not open with a Hello; closed");
            return;
        }
    };
    let leftover = frames[1..].to_vec();
    let Some(inner) = node.upgrade() else { return };
    let mut answer = Handshake {
        session_id: hello.session_id,
        status: HelloStatus::Accepted,
        name: inner.name.clone(),
        params: inner.params(),
    };
    if hello.status == HelloStatus::Resume {
        let resume = {
            let sessions = lock(&inner.sessions);
            sessions.get(&hello.session_id).and_then(|e| {
                let shared = e.shared.upgrade()?;
                let alive = shared.state().session.dead().is_none();
                Some((e.resume.clone()?, shared)).filter(|_| alive)
            })
        };
        let Some((resume, shared)) = resume else {
            answer.status = HelloStatus::UnknownSession;
            conn.sink.push(answer.encode());
            let _ = poll_fn(|cx| conn.sink.poll_flush(cx)).await;
            return;
        };
        shared.state().session.set_handshake_reply(answer.encode());
        conn.sink.push(answer.encode());
        if poll_fn(|cx| conn.sink.poll_flush(cx)).await.is_ok() {
            let _ = resume.send(conn).await;
        }
        return;
    }
    conn.sink.push(answer.encode());
    if poll_fn(|cx| conn.sink.poll_flush(cx)).await.is_err() {
        return;
    }
    let mut session = Session::new(
        Role::Acceptor,
        session_config(&inner.config, &*t),
        hello.params,
        t.reliable(),
        Instant::now(),
    );
    session.set_handshake_reply(answer.encode());
    let shared = Arc::new(PeerShared::new(
        hello.name,
        hello.session_id,
        PeerState::new(session, conn.remote.clone()),
    ));
    let (resume_tx, resume_rx) = mpsc::channel(4);
    let entry = SessionEntry {
        shared: Arc::downgrade(&shared),
        resume: Some(resume_tx),
    };
    if inner.register(hello.session_id, entry).is_err() {
        // The node closed during the handshake: the peer is told, as its other peers were.
        drop(inner);
        close_unregistered(&shared, conn).await;
        return;
    }
    let task = tokio::spawn(run_session(
        node.clone(),
        shared.clone(),
        conn,
        leftover,
        Mode::Acceptor { resume: resume_rx },
    ));
    inner.track_session(task);
    inner.serve_transfers(&shared);
    let tx = inner.incoming_tx.clone();
    drop(inner);
    let _ = tx.send(Peer::app(shared)).await;
}

/// Closes a session the node refused to register (it closed during the handshake) on its
/// first connection, which no driver runs: its Close frame is written there directly.
async fn close_unregistered(shared: &PeerShared, mut conn: Connection) {
    let frames: Vec<_> = {
        let mut st = shared.state();
        st.session.close("the node was closed");
        std::iter::from_fn(|| st.session.poll_transmit(Instant::now())).collect()
    };
    for f in frames {
        conn.sink.push(f);
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, poll_fn(|cx| conn.sink.poll_close(cx))).await;
}

enum Mode {
    Initiator {
        transport: Arc<dyn Transport>,
        addr: String,
        hello: Handshake,
    },
    Acceptor {
        resume: mpsc::Receiver<Connection>,
    },
}

/// Runs a session across connections until it dies.
async fn run_session(
    node: Weak<NodeInner>,
    shared: Arc<PeerShared>,
    mut conn: Connection,
    mut leftover: Vec<Frame>,
    mut mode: Mode,
) {
    loop {
        let end = match &mut mode {
            Mode::Acceptor { resume } => {
                ConnDriver::new(shared.clone(), conn, leftover, Some(resume)).await
            }
            Mode::Initiator { .. } => ConnDriver::new(shared.clone(), conn, leftover, None).await,
        };
        shared.clear_rx();
        let next = match end {
            ConnEnd::SessionDead => break,
            ConnEnd::Replaced(c) => Some((c, Vec::new())),
            ConnEnd::Lost(why) => {
                tracing::debug!(peer = %shared.remote_name, %why, "connection lost; resuming");
                {
                    let mut st = shared.state();
                    st.session.connection_lost(Instant::now());
                    st.dispatch();
                }
                match &mut mode {
                    Mode::Initiator {
                        transport,
                        addr,
                        hello,
                    } => until_dead(&shared, reconnect(&shared, &**transport, addr, hello)).await,
                    Mode::Acceptor { resume } => {
                        until_dead(&shared, async {
                            resume.recv().await.map(|c| (c, Vec::new()))
                        })
                        .await
                    }
                }
            }
        };
        let Some((c, lo)) = next else { break };
        {
            let mut st = shared.state();
            let now = Instant::now();
            st.session.connection_lost(now);
            st.session.connected(now);
            st.connected_to = c.remote.clone();
            st.dispatch();
        }
        conn = c;
        leftover = lo;
    }
    if let Some(inner) = node.upgrade() {
        lock(&inner.sessions).remove(&shared.session_id);
    }
}

/// Runs `fut` until it yields or the session dies (peer timeout, close); `None` if it died.
async fn until_dead<T>(
    shared: &PeerShared,
    fut: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        let deadline = {
            let mut st = shared.state();
            st.session.handle_timeout(Instant::now());
            st.dispatch();
            if st.session.dead().is_some() {
                return None;
            }
            st.session.poll_timeout()
        };
        let deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_millis(100));
        // Wake at least every 50 ms to notice a local close.
        let deadline = deadline.min(Instant::now() + Duration::from_millis(50));
        tokio::select! {
            r = &mut fut => return r,
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// Reconnects and resumes, retrying with backoff; `None` if the peer no longer knows the session.
async fn reconnect(
    shared: &PeerShared,
    t: &dyn Transport,
    addr: &str,
    hello: &Handshake,
) -> Option<(Connection, Vec<Frame>)> {
    let mut backoff = Duration::from_millis(2);
    loop {
        match dial(t, addr, hello).await {
            Ok((conn, ack, leftover)) if ack.status == HelloStatus::Accepted => {
                return Some((conn, leftover));
            }
            Ok(_) => {
                shared.state().kill(Error::PeerRestarted);
                return None;
            }
            Err(e) => tracing::debug!(error = %e, "reconnect attempt failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
