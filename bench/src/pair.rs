//! Two nodes of the run's transport in this process, one session between them, the server side
//! echoing coordination and draining bulk; and the session counters shown beside latencies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfabric::mem::MemNetwork;
use agentfabric::sync::lock;
use agentfabric::{Block, Channel, Class, Config, Node, Peer, Region};
use tokio::task::AbortHandle;

use crate::args::TransportKind;
use crate::error::BenchResult;
use crate::pinger::FabricPinger;
use crate::quic;
use crate::report;
use crate::settings::Settings;

/// Two nodes of one transport in this process, connected by one session. The server side
/// echoes every message of a coordination or tool-call channel on the same channel, and drains
/// bulk channels, counting their bytes.
pub struct FabricPair {
    /// The node that connected.
    pub client: Node,
    /// The node that listened.
    pub server: Node,
    /// The client's side of the session.
    pub peer: Peer,
    /// Bytes received so far on the server's bulk channels.
    pub bulk_received: Arc<AtomicU64>,
    /// The server's coordination and tool-call channels (the echoing side).
    server_channels: Arc<Mutex<Vec<Channel>>>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl FabricPair {
    /// Registers a region of `count` blocks of `block` bytes on each node (the source on the
    /// client, the destination on the server) and lists the blocks, each to the same offset.
    pub fn region_pair(&self, block: u64, count: u64) -> BenchResult<(Region, Region, Vec<Block>)> {
        let src = self.client.register((block * count) as usize)?;
        let dst = self.server.register((block * count) as usize)?;
        let blocks = (0..count)
            .map(|i| Block {
                local: i * block,
                remote: i * block,
                len: block,
            })
            .collect();
        Ok((src, dst, blocks))
    }

    /// Builds two nodes with `config` on the run's transport; `tag` names them.
    pub async fn new(s: &Settings, config: Config, tag: &str) -> BenchResult<Self> {
        let (server, client, url) = match s.transport {
            TransportKind::Tcp => {
                let mk = |name: String| {
                    Node::builder(name)
                        .transport(agentfabric_tcp::TcpTransport::new())
                        .config(config.clone())
                        .build()
                };
                (
                    mk(format!("bench-{tag}-server"))?,
                    mk(format!("bench-{tag}-client"))?,
                    "tcp://127.0.0.1:0".to_owned(),
                )
            }
            TransportKind::Quic => quic::nodes(&config, tag)?,
            #[cfg(feature = "verbs")]
            TransportKind::Verbs => crate::verbs::nodes(&config, tag, s)?,
            #[cfg(not(feature = "verbs"))]
            TransportKind::Verbs => return Err(crate::VERBS_NOT_BUILT.into()),
            TransportKind::Mem => {
                let net = MemNetwork::new();
                let mk = |name: String| {
                    Node::builder(name)
                        .transport(net.transport())
                        .config(config.clone())
                        .build()
                };
                (
                    mk(format!("bench-{tag}-server"))?,
                    mk(format!("bench-{tag}-client"))?,
                    format!("mem://bench-{tag}-server"),
                )
            }
        };
        let addr = server.listen(&url).await?;
        let peer = client.connect(&addr).await?;
        let speer = tokio::time::timeout(Duration::from_secs(5), server.accept())
            .await
            .map_err(|_| "the server node saw no session within 5 s")??;
        let bulk_received = Arc::new(AtomicU64::new(0));
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let server_channels: Arc<Mutex<Vec<Channel>>> = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let tasks = tasks.clone();
            let counter = bulk_received.clone();
            let channels = server_channels.clone();
            tokio::spawn(async move {
                while let Ok(ch) = speer.accept_channel().await {
                    let h = match ch.class() {
                        Class::Bulk => tokio::spawn(drain(ch, counter.clone())),
                        Class::Coordination | Class::ToolCall => {
                            lock(&channels).push(ch.clone());
                            tokio::spawn(echo(ch))
                        }
                    };
                    lock(&tasks).push(h.abort_handle());
                }
            })
        };
        lock(&tasks).push(acceptor.abort_handle());
        Ok(FabricPair {
            client,
            server,
            peer,
            bulk_received,
            server_channels,
            tasks,
        })
    }

    /// Opens a coordination channel that round-trips `size`-byte messages, and makes one round
    /// trip so the server's echo is running.
    pub async fn coordination_pinger(&self, size: usize) -> BenchResult<FabricPinger> {
        let channel = self.peer.channel(Class::Coordination, 7)?;
        let mut p = FabricPinger::new(channel, size);
        tokio::time::timeout(Duration::from_secs(5), p.round_trip())
            .await
            .map_err(|_| "the first coordination round trip took over 5 s")??;
        Ok(p)
    }
}

impl Drop for FabricPair {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

/// Server side: sends every message back on the same channel.
async fn echo(ch: Channel) {
    while let Ok(m) = ch.recv().await {
        if ch.send(m.body).await.is_err() {
            return;
        }
    }
}

/// Server side: reads every message, counting bytes. Takes each message in its chunks
/// (`recv_parts`), as a bulk consumer that writes the bytes elsewhere would: the raw TCP
/// baseline does not join what it reads either.
async fn drain(ch: Channel, counter: Arc<AtomicU64>) {
    while let Ok(m) = ch.recv_parts().await {
        counter.fetch_add(m.len() as u64, Ordering::Relaxed);
    }
}

/// Peer counters worth showing next to latencies (RTT, window, stalls, retransmits) of the
/// client's session, and the session-level queueing delay (from `send` until the driver took
/// the message's first chunk for the wire, whole microseconds, since the channel opened, warm-up
/// included) of `coord`'s coordination channel on both sides.
pub fn fabric_stats_json(pair: &FabricPair, coord: &FabricPinger) -> serde_json::Value {
    let st = pair.peer.stats();
    let s = &st.session;
    let us = |d: Option<Duration>| d.map(|d| report::round2(d.as_secs_f64() * 1e6));
    let delay = |ch: Option<Channel>| {
        ch.and_then(|c| c.stats())
            .and_then(|c| c.stats.queue_delay_us)
            .map(|h| report::Summary::from_histogram_us(&h).to_json(None))
    };
    let id = coord.channel().id();
    let server = lock(&pair.server_channels)
        .iter()
        .find(|c| c.id() == id)
        .cloned();
    serde_json::json!({
        "srtt_us": us(s.srtt),
        "min_rtt_us": us(s.min_rtt),
        "cwnd": s.cwnd,
        "inflight": s.inflight,
        "queued_bytes": s.queued_bytes,
        "credit_stalls": s.credit_stalls,
        "retransmits": s.retransmits,
        "frames_sent": s.frames_sent,
        "frames_received": s.frames_received,
        "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received,
        "resumes": s.resumes,
        "connected": st.connected,
        "coordination_queue_delay_us": {
            "client": delay(Some(coord.channel().clone())),
            "server": delay(server),
        },
    })
}

/// The counters of [`fabric_stats_json`] a person reads beside the latencies, in words, for the
/// table (the JSON keeps them all): round-trip time, congestion window, retransmits, credit
/// stalls, resumptions, and the coordination channel's queueing before the wire (p99).
pub fn fabric_stats_words(stats: &serde_json::Value) -> String {
    if !stats.is_object() {
        return "no session counters".into();
    }
    let us = |v: &serde_json::Value, digits: usize| {
        v.as_f64()
            .map_or("-".into(), |x| format!("{x:.digits$} µs"))
    };
    let count = |k: &str| stats[k].as_u64().unwrap_or(0);
    // Whole microseconds, as the fabric records them.
    let queue_p99 = |side: &str| us(&stats["coordination_queue_delay_us"][side]["p99_us"], 0);
    format!(
        "srtt {} (min {}), cwnd {}, {} retransmits, {} credit stalls, {} resumes; \
         coordination queueing before the wire p99: client {}, server {}",
        us(&stats["srtt_us"], 1),
        us(&stats["min_rtt_us"], 1),
        report::fmt_bytes(count("cwnd")),
        count("retransmits"),
        count("credit_stalls"),
        count("resumes"),
        queue_p99("client"),
        queue_p99("server"),
    )
}
