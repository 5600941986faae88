//! The listener: accepts TCP connections, reads their lane preambles concurrently, and pairs the
//! lanes of each fabric connection.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentfabric::transport::{BoxFuture, Connection, Listener};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::TcpConfig;
use crate::connection::into_connection;
use crate::memory::TcpDomain;
use crate::preamble::{Preamble, PreambleError, LANES, PREAMBLE_LEN};

/// How many ids of recently paired connections are remembered, to refuse a late extra lane.
const RECENT_IDS: usize = 1024;

/// A listening TCP socket that yields fabric connections, each made of [`LANES`] paired TCP
/// connections.
///
/// Nothing here waits on one client: preambles are read by spawned tasks (each bounded by
/// [`TcpConfig::connect_timeout`]), whose results `accept` collects alongside new sockets. The
/// state lives in the listener, not in the `accept` future, so dropping an `accept` call (in a
/// `select!`, or on a timeout) loses nothing.
pub(crate) struct TcpFrameListener {
    pub(crate) inner: tokio::net::TcpListener,
    pub(crate) local: String,
    pub(crate) config: TcpConfig,
    /// The transport's memory, which accepted connections' one-sided lanes reach.
    domain: Arc<TcpDomain>,
    /// Preamble reads in progress.
    handshakes: JoinSet<Handshake>,
    /// Connections some but not all of whose lanes have arrived, by connection id.
    pub(crate) pending: HashMap<u64, HalfOpen>,
    /// The ids of `pending` by arrival order (a sequence number), oldest first.
    order: BTreeMap<u64, u64>,
    next_seq: u64,
    /// Ids paired recently (bounded), oldest first, and the same as a set.
    recent: VecDeque<u64>,
    recent_set: HashSet<u64>,
    /// Incoming sockets closed so far for a reason (bad preamble, timeout, eviction...).
    pub(crate) closed: u64,
}

/// The outcome of reading one socket's preamble.
struct Handshake {
    stream: TcpStream,
    peer: SocketAddr,
    result: Result<Preamble, HandshakeError>,
}

enum HandshakeError {
    Io(io::Error),
    TimedOut(Duration),
    Preamble(PreambleError),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "reading the lane preamble: {e}"),
            HandshakeError::TimedOut(t) => write!(f, "no lane preamble within {t:?}"),
            HandshakeError::Preamble(e) => e.fmt(f),
        }
    }
}

/// A connection with some of its lanes.
pub(crate) struct HalfOpen {
    seq: u64,
    since: Instant,
    lanes: [Option<TcpStream>; LANES],
}

impl HalfOpen {
    fn arrived(&self) -> usize {
        self.lanes.iter().filter(|l| l.is_some()).count()
    }
}

impl TcpFrameListener {
    pub(crate) fn new(
        inner: tokio::net::TcpListener,
        local: String,
        config: TcpConfig,
        domain: Arc<TcpDomain>,
    ) -> Self {
        TcpFrameListener {
            inner,
            local,
            config,
            domain,
            handshakes: JoinSet::new(),
            pending: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            recent: VecDeque::new(),
            recent_set: HashSet::new(),
            closed: 0,
        }
    }

    /// Preamble reads not yet collected by `accept`.
    #[cfg(test)]
    pub(crate) fn handshakes_in_progress(&self) -> usize {
        self.handshakes.len()
    }

    /// Most connections waiting for their preamble at once, and most half-open ids.
    fn max_pending(&self) -> usize {
        self.config.max_half_open.max(1)
    }

    /// Handles a newly accepted socket: options, then a spawned preamble read.
    fn on_accepted(&mut self, stream: TcpStream, peer: SocketAddr) {
        if self.handshakes.len() >= self.max_pending() {
            tracing::warn!(local = %self.local, %peer, limit = self.max_pending(),
                "too many tcp connections waiting for their lane preamble; closing this one");
            self.closed += 1;
            return;
        }
        if let Err(e) = self.config.apply_to_stream(&stream) {
            tracing::warn!(local = %self.local, %peer, error = %e,
                "cannot set options on accepted tcp connection; closing it");
            self.closed += 1;
            return;
        }
        let limit = self.config.connect_timeout;
        self.handshakes.spawn(read_preamble(
            stream,
            peer,
            limit.max(Duration::from_millis(1)),
        ));
    }

    /// Handles a finished preamble read; returns a connection when it completes one.
    fn on_handshake(&mut self, hs: Handshake) -> Option<Connection> {
        let Handshake {
            stream,
            peer,
            result,
        } = hs;
        let p = match result {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(local = %self.local, %peer, reason = %e, "closing incoming tcp connection");
                self.closed += 1;
                return None;
            }
        };
        if self.recent_set.contains(&p.id) {
            tracing::warn!(local = %self.local, %peer, id = p.id, lane = p.lane,
                "closing incoming tcp connection: a lane of an already paired connection");
            self.closed += 1;
            return None;
        }
        let lane = usize::from(p.lane);
        if let Some(half) = self.pending.get_mut(&p.id) {
            if half.lanes[lane].is_some() {
                tracing::warn!(local = %self.local, %peer, id = p.id, lane = p.lane,
                    "closing incoming tcp connection: its lane already arrived");
                self.closed += 1;
                return None;
            }
            half.lanes[lane] = Some(stream);
            if half.arrived() < LANES {
                return None;
            }
            let half = self.pending.remove(&p.id).expect("present");
            self.order.remove(&half.seq);
            self.remember(p.id);
            let lanes = half.lanes.map(|l| l.expect("every lane arrived"));
            let [latency, bulk, one_sided] = lanes;
            return match into_connection(
                [latency, bulk],
                Some(one_sided),
                &self.config,
                &self.domain,
            ) {
                Ok(conn) => Some(conn),
                Err(e) => {
                    tracing::warn!(local = %self.local, %peer, error = %e,
                        "closing incoming tcp connection");
                    self.closed += 1;
                    None
                }
            };
        }
        // The first lane of a new connection.
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut lanes: [Option<TcpStream>; LANES] = Default::default();
        lanes[lane] = Some(stream);
        self.pending.insert(
            p.id,
            HalfOpen {
                seq,
                since: Instant::now(),
                lanes,
            },
        );
        self.order.insert(seq, p.id);
        while self.pending.len() > self.max_pending() {
            self.drop_oldest("too many half-open connections; dropping the oldest");
        }
        None
    }

    fn remember(&mut self, id: u64) {
        if self.recent.len() >= RECENT_IDS {
            if let Some(old) = self.recent.pop_front() {
                self.recent_set.remove(&old);
            }
        }
        self.recent.push_back(id);
        self.recent_set.insert(id);
    }

    fn drop_oldest(&mut self, why: &str) {
        let Some((_, id)) = self.order.pop_first() else {
            return;
        };
        if let Some(half) = self.pending.remove(&id) {
            tracing::warn!(local = %self.local, id, lanes = half.arrived(), of = LANES,
                "closing half-open tcp connection: {why}");
            self.closed += half.arrived() as u64;
        }
    }

    /// When the oldest half-open connection expires.
    fn next_expiry(&self) -> Option<Instant> {
        let (_, id) = self.order.first_key_value()?;
        Some(self.pending[id].since + self.config.connect_timeout)
    }

    /// Drops the half-open connections whose other lanes did not arrive in time.
    fn expire(&mut self, now: Instant) {
        while self.next_expiry().is_some_and(|t| t <= now) {
            self.drop_oldest("its other lanes did not arrive within the connect timeout");
        }
    }

    async fn accept_inner(&mut self) -> io::Result<Connection> {
        loop {
            self.expire(Instant::now());
            let expiry = self.next_expiry();
            tokio::select! {
                biased;
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match done {
                        Ok(hs) => {
                            if let Some(conn) = self.on_handshake(hs) {
                                return Ok(conn);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(local = %self.local, error = %e, "lane preamble task failed");
                        }
                    }
                }
                accepted = self.inner.accept() => match accepted {
                    Ok((stream, peer)) => self.on_accepted(stream, peer),
                    // Failures of one incoming connection (reset before it was accepted) are
                    // not failures of the listener: skip it and wait for the next.
                    Err(e) if is_per_connection_error(&e) => {
                        tracing::debug!(local = %self.local, error = %e, "incoming tcp connection dropped before accept");
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("accepting on {}: {e}", self.local),
                        ))
                    }
                },
                () = sleep_until(expiry), if expiry.is_some() => {}
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Reads and checks one socket's preamble, within `limit`.
async fn read_preamble(mut stream: TcpStream, peer: SocketAddr, limit: Duration) -> Handshake {
    let read = async {
        let mut buf = [0u8; PREAMBLE_LEN];
        // The magic first: another protocol is refused as soon as its first bytes arrive.
        stream
            .read_exact(&mut buf[..4])
            .await
            .map_err(HandshakeError::Io)?;
        Preamble::check_magic(&buf[..4].try_into().expect("4 bytes"))
            .map_err(HandshakeError::Preamble)?;
        stream
            .read_exact(&mut buf[4..])
            .await
            .map_err(HandshakeError::Io)?;
        Preamble::decode(&buf).map_err(HandshakeError::Preamble)
    };
    let result = match tokio::time::timeout(limit, read).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::TimedOut(limit)),
    };
    Handshake {
        stream,
        peer,
        result,
    }
}

impl Listener for TcpFrameListener {
    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn accept(&mut self) -> BoxFuture<'_, io::Result<Connection>> {
        Box::pin(self.accept_inner())
    }
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}
