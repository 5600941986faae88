//! A lossy, delayed UDP relay on loopback, for tests and lab benchmarks of QUIC over a bad path.
//!
//! Datagrams from each client address are forwarded to the target from a socket of their own
//! (so the server sees one address per client), and answers are sent back; each datagram is
//! dropped with probability `loss` and delayed by `delay` in each direction. Loss is drawn from
//! a seeded generator, so a run is repeatable for a given interleaving.
//!
//! The relay is bounded: it stops by itself after `idle` without traffic or `lifetime` in all,
//! and when its [`LossyRelay`] handle is dropped.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Settings of a [`LossyRelay`].
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Probability that a datagram is dropped, in each direction.
    pub loss: f64,
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Seed of the loss generator.
    pub seed: u64,
    /// The relay stops after this long without a datagram.
    pub idle: Duration,
    /// The relay stops after this long in all.
    pub lifetime: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            loss: 0.01,
            delay: Duration::from_millis(1),
            seed: 0x5eed,
            idle: Duration::from_secs(20),
            lifetime: Duration::from_secs(300),
        }
    }
}

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub struct LossyRelay {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl LossyRelay {
    /// Starts a relay on 127.0.0.1 (an ephemeral port) in front of `target`.
    pub async fn start(target: SocketAddr, cfg: RelayConfig) -> io::Result<LossyRelay> {
        let front = Arc::new(udp_socket()?);
        let addr = front.local_addr()?;
        let task = tokio::spawn(run(front, target, cfg));
        Ok(LossyRelay { addr, task })
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Leaves the relay running until its idle or lifetime bound (or the runtime's end), for
    /// fixtures that cannot hold the handle; returns its address.
    pub fn detach(self) -> SocketAddr {
        let addr = self.addr;
        std::mem::forget(self);
        addr
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP socket on 127.0.0.1 with 4 MiB buffers (the relay is one socket for many peers).
fn udp_socket() -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    UdpSocket::from_std(s.into())
}

struct Rng(u64);
impl Rng {
    /// A generator from any seed (splitmix64 scrambles it: xorshift from a small seed would
    /// start with small numbers, i.e. drop the first datagrams).
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn drop_it(&mut self, p: f64) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Sends datagrams after their due time, in order (one constant delay keeps FIFO order).
fn delayed_sender(
    sock: Arc<UdpSocket>,
    to: Option<SocketAddr>,
) -> mpsc::Sender<(Instant, Vec<u8>, SocketAddr)> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>, SocketAddr)>(8192);
    tokio::spawn(async move {
        while let Some((due, data, dest)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let r = match to {
                Some(_) => sock.send(&data).await,
                None => sock.send_to(&data, dest).await,
            };
            if r.is_err() {
                // A full or failing socket drops the datagram, as a network would.
                continue;
            }
        }
    });
    tx
}

async fn run(front: Arc<UdpSocket>, target: SocketAddr, cfg: RelayConfig) {
    let end = Instant::now() + cfg.lifetime;
    let mut rng = Rng::new(cfg.seed);
    let mut clients: HashMap<SocketAddr, mpsc::Sender<(Instant, Vec<u8>, SocketAddr)>> =
        HashMap::new();
    let to_clients = delayed_sender(front.clone(), None);
    let mut tasks = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let now = Instant::now();
        let deadline = (now + cfg.idle).min(end);
        let (n, from) = tokio::select! {
            r = front.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        };
        let up = match clients.get(&from) {
            Some(up) => up.clone(),
            None => {
                let Ok(sock) = udp_socket() else {
                    continue;
                };
                if sock.connect(target).await.is_err() {
                    continue;
                }
                let sock = Arc::new(sock);
                let up = delayed_sender(sock.clone(), Some(target));
                // Answers from the target go back to this client.
                let back = to_clients.clone();
                let (loss, delay, seed) = (cfg.loss, cfg.delay, cfg.seed ^ from.port() as u64);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng::new(seed);
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = sock.recv(&mut buf).await {
                        if rng.drop_it(loss) {
                            continue;
                        }
                        let due = Instant::now() + delay;
                        if back.send((due, buf[..n].to_vec(), from)).await.is_err() {
                            return;
                        }
                    }
                }));
                clients.insert(from, up.clone());
                up
            }
        };
        if rng.drop_it(cfg.loss) {
            continue;
        }
        let _ = up.send((now + cfg.delay, buf[..n].to_vec(), target)).await;
    }
    for t in tasks {
        t.abort();
    }
}
