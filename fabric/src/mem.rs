//! The in-process transport, with an optionally impaired network: delay, bandwidth, jitter (which reorders),
//! loss (an [`Impairment`], also reachable here as [`LinkConfig`]), partitions and forced
//! disconnections. For tests, examples and single-process agents.
//!
//! Nodes that share a [`MemNetwork`] reach each other by name: `mem://NAME`. Frames move as
//! values (the payload is a refcounted `Bytes`, never copied). With loss or jitter configured the
//! transport reports itself unreliable, so sessions retransmit and reorder.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::frame::{Frame, OutFrame};
use crate::impair::Impairment;
use crate::sync::lock;
use crate::transport::{
    BoxFuture, Connection, FrameSink, FrameStream, Listener, RecvError, Transport,
};

pub use crate::impair::Impairment as LinkConfig;

/// Whether frames arrive complete, in order and once on a network impaired by `link`: this
/// transport honours its delay, jitter, bandwidth and loss, not its reordering or duplication
/// (see [`crate::impair`]), so only loss and jitter make it unreliable.
fn reliable(link: &Impairment) -> bool {
    link.loss == 0.0 && link.jitter.is_zero()
}

struct NetState {
    listeners: HashMap<String, mpsc::Sender<Connection>>,
    link: Impairment,
    rng: StdRng,
    live: Vec<Arc<ConnFlags>>,
}

/// A simulated network joining in-process nodes.
#[derive(Clone)]
pub struct MemNetwork {
    state: Arc<Mutex<NetState>>,
    partitioned: Arc<AtomicBool>,
}

impl Default for MemNetwork {
    fn default() -> Self {
        MemNetwork::new()
    }
}

impl std::fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNetwork").finish_non_exhaustive()
    }
}

impl MemNetwork {
    /// A perfect network: no delay, no loss.
    pub fn new() -> MemNetwork {
        MemNetwork::with_link(Impairment::default(), 1)
    }

    /// A network with impairments, and a seed for its random choices.
    pub fn with_link(link: Impairment, seed: u64) -> MemNetwork {
        MemNetwork {
            state: Arc::new(Mutex::new(NetState {
                listeners: HashMap::new(),
                link,
                rng: StdRng::seed_from_u64(seed),
                live: Vec::new(),
            })),
            partitioned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A transport on this network, to give to a node.
    pub fn transport(&self) -> MemTransport {
        MemTransport { net: self.clone() }
    }

    /// While `true`, nothing gets through (connections stay up, as in a real partition). On a
    /// lossy network (loss or jitter configured) frames sent meanwhile are dropped; on a
    /// reliable one they are held and delivered when the partition heals, as TCP would after
    /// retransmitting.
    pub fn set_partitioned(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
    }

    /// Breaks every open connection, as a network failure would; sessions then reconnect.
    pub fn disconnect_all(&self) {
        let mut st = lock(&self.state);
        for c in st.live.drain(..) {
            c.broken.store(true, Ordering::SeqCst);
            c.wake();
        }
    }

    /// Makes `name` unreachable: new connections to it are refused.
    pub fn unlisten(&self, name: &str) {
        lock(&self.state).listeners.remove(name);
    }
}

/// The in-process transport (scheme `mem`).
#[derive(Clone, Debug)]
pub struct MemTransport {
    net: MemNetwork,
}

struct ConnFlags {
    broken: AtomicBool,
    /// The receiving task of each side, woken when the connection breaks.
    wakers: Mutex<[Option<std::task::Waker>; 2]>,
}

impl ConnFlags {
    fn wake(&self) {
        for w in lock(&self.wakers).iter_mut() {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
    }
}

struct Item {
    at: Instant,
    seq: u64,
    frame: OutFrame,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct MemSink {
    net: MemNetwork,
    /// `None` once closed: the receiver then sees the end of the stream after what was sent.
    tx: Option<mpsc::UnboundedSender<Item>>,
    queue: VecDeque<OutFrame>,
    queued: usize,
    seq: u64,
    flags: Arc<ConnFlags>,
    /// When the link finishes serialising what was sent so far (bandwidth model).
    link_free: Instant,
}

struct MemStream {
    rx: mpsc::UnboundedReceiver<Item>,
    heap: BinaryHeap<Reverse<Item>>,
    timer: Pin<Box<Sleep>>,
    flags: Arc<ConnFlags>,
    side: usize,
    /// The network's partition switch: while on, frames wait here (reliable networks).
    partitioned: Arc<AtomicBool>,
}

/// How often a stream holding frames during a partition checks whether it has healed.
const PARTITION_POLL: Duration = Duration::from_millis(5);

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "mem connection broken")
}

impl FrameSink for MemSink {
    fn push(&mut self, frame: OutFrame) {
        self.queued += frame.wire_len();
        self.queue.push_back(frame);
    }

    fn queued_bytes(&self) -> usize {
        self.queued
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.flags.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(broken()));
        }
        let partitioned = self.net.partitioned.load(Ordering::SeqCst);
        let now = Instant::now();
        let mut st = lock(&self.net.state);
        let link = st.link.clone();
        for frame in self.queue.drain(..) {
            let dropped_by_partition = partitioned && !reliable(&link);
            if dropped_by_partition || (link.loss > 0.0 && st.rng.gen_bool(link.loss.min(1.0))) {
                continue;
            }
            let jitter = if link.jitter.is_zero() {
                Duration::ZERO
            } else {
                link.jitter.mul_f64(st.rng.gen::<f64>())
            };
            // Serialisation: a frame leaves once the link has sent the ones before it.
            let depart = if link.bandwidth_bytes_per_sec == 0 {
                now
            } else {
                let wire = Duration::from_secs_f64(
                    frame.wire_len() as f64 / link.bandwidth_bytes_per_sec as f64,
                );
                self.link_free = self.link_free.max(now) + wire;
                self.link_free
            };
            self.seq += 1;
            let item = Item {
                at: depart + link.delay + jitter,
                seq: self.seq,
                frame,
            };
            match &self.tx {
                Some(tx) if tx.send(item).is_ok() => {}
                _ => return Poll::Ready(Err(broken())),
            }
        }
        self.queued = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.poll_flush(cx);
        self.tx = None;
        r
    }
}

impl FrameStream for MemStream {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        if self.flags.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(RecvError::Io(broken())));
        }
        {
            let mut w = lock(&self.flags.wakers);
            if !w[self.side]
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                w[self.side] = Some(cx.waker().clone());
            }
        }
        let mut closed = false;
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(item)) => self.heap.push(Reverse(item)),
                Poll::Ready(None) => {
                    closed = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if self.partitioned.load(Ordering::SeqCst) && !self.heap.is_empty() {
            self.timer
                .as_mut()
                .reset((Instant::now() + PARTITION_POLL).into());
            if self.timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        let now = Instant::now();
        let before = out.len();
        while self.heap.peek().is_some_and(|Reverse(i)| i.at <= now) {
            let Reverse(item) = self.heap.pop().expect("peeked");
            match item.frame.decode() {
                Ok(f) => out.push(f),
                Err(e) => return Poll::Ready(Err(RecvError::Frame(e))),
            }
        }
        if out.len() > before {
            return Poll::Ready(Ok(()));
        }
        if closed && self.heap.is_empty() {
            return Poll::Ready(Err(RecvError::Eof));
        }
        if let Some(Reverse(next)) = self.heap.peek() {
            self.timer.as_mut().reset(next.at.into());
            if self.timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}

fn pair(net: &MemNetwork, a: &str, b: &str) -> (Connection, Connection) {
    let flags = Arc::new(ConnFlags {
        broken: AtomicBool::new(false),
        wakers: Mutex::new([None, None]),
    });
    {
        let mut st = lock(&net.state);
        st.live.retain(|c| !c.broken.load(Ordering::SeqCst));
        st.live.push(flags.clone());
    }
    let (tx_ab, rx_ab) = mpsc::unbounded_channel();
    let (tx_ba, rx_ba) = mpsc::unbounded_channel();
    let mk = |tx, rx, remote: &str, side: usize| Connection {
        sink: Box::new(MemSink {
            net: net.clone(),
            tx: Some(tx),
            queue: VecDeque::new(),
            queued: 0,
            seq: 0,
            flags: flags.clone(),
            link_free: Instant::now(),
        }),
        stream: Box::new(MemStream {
            rx,
            heap: BinaryHeap::new(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            flags: flags.clone(),
            side,
            partitioned: net.partitioned.clone(),
        }),
        remote: format!("mem://{remote}"),
    };
    (mk(tx_ab, rx_ba, b, 0), mk(tx_ba, rx_ab, a, 1))
}

struct MemListener {
    name: String,
    rx: mpsc::Receiver<Connection>,
}

impl Listener for MemListener {
    fn local_addr(&self) -> String {
        format!("mem://{}", self.name)
    }

    fn accept(&mut self) -> BoxFuture<'_, io::Result<Connection>> {
        Box::pin(async move {
            self.rx
                .recv()
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "mem network gone"))
        })
    }
}

impl Transport for MemTransport {
    fn scheme(&self) -> &'static str {
        "mem"
    }

    fn reliable(&self) -> bool {
        reliable(&lock(&self.net.state).link)
    }

    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Connection>> {
        Box::pin(async move {
            let tx = lock(&self.net.state)
                .listeners
                .get(addr)
                .cloned()
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("nothing listens on mem://{addr}"),
                    )
                })?;
            let (mine, theirs) = pair(&self.net, "client", addr);
            tx.send(theirs).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("mem://{addr} closed"),
                )
            })?;
            Ok(mine)
        })
    }

    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            if addr.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "empty mem address",
                ));
            }
            let mut st = lock(&self.net.state);
            if st.listeners.get(addr).is_some_and(|tx| !tx.is_closed()) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("mem://{addr} is already listened on"),
                ));
            }
            let (tx, rx) = mpsc::channel(64);
            st.listeners.insert(addr.to_owned(), tx);
            Ok(Box::new(MemListener {
                name: addr.to_owned(),
                rx,
            }) as Box<dyn Listener>)
        })
    }
}
