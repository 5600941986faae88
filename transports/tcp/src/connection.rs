//! A fabric [`Connection`] made of a connection's lane sockets: the lane dispatchers on its frame
//! lanes (the bulk lane on threads of its own or on the runtime, as [`BulkLaneIo`] says), and the
//! one-sided lane attached when there is one. The transport (connecting, or wrapping streams)
//! and the listener both end here, which is why this is a module of its own below them.

use std::io;
use std::sync::Arc;

use agentfabric::frame::Lane;
use agentfabric::transport::{Connection, FrameSink, FrameStream, ThreadPriority};
use socket2::SockRef;

use crate::config::{BulkLaneIo, TcpConfig, SCHEME};
use crate::lane_thread::{ThreadSink, ThreadStream};
use crate::lanes::{LanedSink, LanedStream};
use crate::memory::TcpDomain;
use crate::one_sided::{self, OneSidedLane};

/// Makes a fabric connection of its frame lanes' streams (`lanes[i]` carries lane `i`) and, when
/// there is one, its one-sided lane's.
pub(crate) fn into_connection(
    lanes: [tokio::net::TcpStream; Lane::COUNT],
    one_sided_lane: Option<tokio::net::TcpStream>,
    config: &TcpConfig,
    domain: &Arc<TcpDomain>,
) -> io::Result<Connection> {
    let remote = match lanes[Lane::Latency as usize].peer_addr() {
        Ok(addr) => format!("{SCHEME}://{addr}"),
        Err(_) => format!("{SCHEME}://(unknown)"),
    };
    if let Some(size) = config.bulk_send_buffer_size {
        for s in std::iter::once(&lanes[Lane::Bulk as usize]).chain(&one_sided_lane) {
            if let Err(e) = SockRef::from(s).set_send_buffer_size(size) {
                tracing::warn!(%remote, error = %e, "cannot set SO_SNDBUF of a bulk lane");
            }
        }
    }
    let [latency, bulk] = lanes;
    let (latency_rx, latency_tx) = latency.into_split();
    let (sink, stream): (Box<dyn FrameSink>, Box<dyn FrameStream>) = match config.bulk_lane_io {
        BulkLaneIo::Runtime => {
            let (bulk_rx, bulk_tx) = bulk.into_split();
            (
                Box::new(LanedSink::new([latency_tx, bulk_tx])),
                Box::new(LanedStream::new([latency_rx, bulk_rx], config.read_size())),
            )
        }
        BulkLaneIo::Threads(priority) => {
            let bulk = bulk.into_std()?;
            // Once, for both threads, which share the socket: they block in their system
            // calls, and tokio no longer polls it.
            bulk.set_nonblocking(false)?;
            let bulk = Arc::new(bulk);
            let bulk_tx = ThreadSink::new(bulk.clone(), priority);
            let bulk_rx = ThreadStream::start(bulk, config.read_size(), priority)?;
            (
                Box::new(LanedSink::with_bulk_thread(latency_tx, bulk_tx)),
                Box::new(LanedStream::with_bulk_thread(
                    latency_rx,
                    bulk_rx,
                    config.read_size(),
                )),
            )
        }
    };
    let (sink, stream) = match one_sided_lane {
        None => (sink, stream),
        Some(socket) => {
            let priority = match config.bulk_lane_io {
                BulkLaneIo::Threads(p) => p,
                BulkLaneIo::Runtime => ThreadPriority::Nice(10),
            };
            let lane = OneSidedLane::start(socket.into_std()?, domain.clone(), priority)?;
            one_sided::attach(sink, stream, lane)
        }
    };
    Ok(Connection {
        sink,
        stream,
        remote,
    })
}
