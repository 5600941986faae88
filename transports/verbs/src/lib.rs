//! RDMA verbs transport for [agentfabric]: fabric frames over reliable-connected (RC) queue pairs,
//! on any rdma-core device (Soft-RoCE `rxe`, RoCE NICs, InfiniBand).
//!
//! Addresses are `verbs://IP:PORT`: `listen("10.77.0.1:7000")` opens a TCP *side channel*
//! listener there; `connect("10.77.0.1:7000")` reaches it, the two ends exchange and check their
//! queue-pair parameters over it, connect their QPs, and from then on frames move only over
//! RDMA. The side channel stays open, silent, as a liveness signal.
//!
//! # Design choices
//!
//! - **`rdma-sys` (raw bindings), not `ibverbs`.** The data path needs a completion channel
//!   whose fd tokio can watch (`AsyncFd`), SEND with immediate data (credits ride in it),
//!   inline sends, selective signalling and chains of work requests posted in one call, and
//!   RDMA WRITE and READ between registered regions. `ibverbs` 0.9 hides
//!   the completion channel, immediate data and WR chains; `rdma-sys` exposes all of rdma-core,
//!   and its Rust re-implementations of the inline verbs (`ibv_post_send`, `ibv_poll_cq`, ...)
//!   cost no extra call. The unsafe code is confined to the files that make verbs calls
//!   (`qp.rs`, `window.rs`, `device.rs`, `memory.rs`, `one_sided.rs`, `resources.rs`,
//!   `datapath.rs`, `posting.rs`; see [Layout](#layout)), behind types whose drop order frees
//!   nothing the device may still touch.
//! - **Out-of-band TCP set-up, not rdma_cm.** rdma_cm sets the QP attributes itself (and leaves
//!   the RNR timer at 0, a 655 ms stall per receiver-not-ready: a common RoCE complaint), does
//!   not let us check the two ends' settings against each other, and needs its own event
//!   channel. The side channel exchanges everything the two QPs must agree on — QPN, PSN, GID
//!   and GID index and type, LID, link layer, active and required path MTU, RNR timer, retry
//!   count, ACK timeout, queue depths, receive buffer size (credits) — and [`params::negotiate`]
//!   turns every incompatibility into an error naming the setting and the fix, on both ends
//!   (the acceptor sends its refusal back). A zero-length probe message each way then proves
//!   the RDMA path itself before `connect` returns, so a wrong GID index or an unreachable
//!   peer fails at connect time, saying so. The TCP connection closing without an RDMA close
//!   is how a killed peer process is noticed at once (its QP is gone; RC retries would take
//!   about `retry_count` × ACK timeout).
//! - **Credits are receive buffers.** Each end posts [`VerbsConfig::recv_depth`] buffers of
//!   [`VerbsConfig::recv_buffer_size`] bytes on its QP's receive queue; the peer starts with
//!   that many credits, spends one per SEND, and gets them back in the 32-bit immediate data of
//!   the messages coming the other way (or in a zero-length credit message when a quarter of
//!   the buffers are owed and no data goes back). A sender never has more SENDs outstanding
//!   than the receiver has buffers posted: no receiver-not-ready NAK, ever. Data keeps the
//!   last credit back for credit returns, so two ends waiting on each other cannot deadlock.
//!   A per-QP receive queue (not an SRQ) keeps credits exact per connection.
//! - **Data path.** `push` queues frames; `poll_flush` posts every frame that credits and
//!   send-queue room allow as one chain (one `ibv_post_send`). Frames up to the QP's
//!   `max_inline_data` go inline straight from the frame (header and payload as two SGEs, no
//!   copy into registered memory); larger ones are copied into a registered send slot. Only
//!   every [`VerbsConfig::signal_every`]-th WR and the last of each chain is signalled; a
//!   signalled completion frees every slot before it (RC completes in order). Received frames
//!   are copied out of their buffer, which is reposted at once (batched), so the credit comes
//!   back without waiting for the application. Completions wake tokio through the completion
//!   channel's fd (`AsyncFd`), armed only when the CQ is found empty, after the coordination
//!   lane has spun on its CQ for [`VerbsConfig::spin_before_sleep`] since its last completion
//!   (so a reply to a recent send is taken without a wake-up); [`VerbsConfig::busy_poll`] spins
//!   on the CQ always (lower latency, one core busy).
//! - **Two lanes** ([`VerbsConfig::bulk_lane`], see `lanes.rs`, set up in `establish.rs`): bulk
//!   channels' data frames take a frames QP of their own, set up beside the first (its
//!   parameters cross the side channel after the first's, and it is probed the same way), with
//!   its own receive buffers and credits. A QP sends in order, so on one QP a coordination frame waited behind every
//!   bulk frame posted before it (in the lab: a loaded coordination p50 of 5.9 ms against
//!   0.53–0.57 ms with the lane, `bench/RESULTS.md`). On a software device the bulk lane's
//!   sends are planned under its lock and posted outside it by a thread of its own
//!   ([`Posting`]). Either lane's failure is the connection's; the stream ends when both
//!   lanes have ended; closing closes both.
//! - **One-sided operations** ([`FrameSink::one_sided`](agentfabric::transport::FrameSink)):
//!   the fabric's transfers between registered regions move by RDMA WRITE and READ. Regions
//!   are registered as MRs in the device's protection domain (the transport's `MemoryDomain`)
//!   for local access, and a type 1 memory window bound over the MR carries the remote key
//!   (read and write). Revoking a region deallocates the window, after which the device refuses
//!   its key, and keeps the MR with the buffer ([`agentfabric::Region::reclaim`]): registering
//!   that buffer again binds a new window instead of pinning the memory again (64 MiB in the
//!   emulated lab: 0.12 of a fresh registration's time, `bench/RESULTS.md`). Dropping a region deregisters it. On a device
//!   without memory windows, or with [`VerbsConfig::memory_windows`] off, the MR carries the
//!   remote key and revoking deregisters it. The operations run on a second RC QP of the connection,
//!   set up with the first (its QPN and PSN travel in the same parameter exchange), so a
//!   coordination frame never waits behind a bulk block in a send queue; it completes on a CQ
//!   of its own, drained by a task of its own, so one-sided completions never wake the task
//!   that reads frames (in the lab that cut the loaded coordination p99 under one-sided bulk
//!   from 72–85 ms to 26 ms). They go out in pieces of at most [`RMA_PIECE`] bytes, at most
//!   [`VerbsConfig::rma_inflight_bytes`] in flight, each signalled; an operation completes
//!   with its last piece. The pieces are planned under a lock of their own and posted outside
//!   it, never under the lock the frames need: on a software device `ibv_post_send` runs the
//!   protocol in the posting system call, for milliseconds under emulation. There a thread of
//!   the connection's own at nice 10 posts them ([`Posting`]), so that work never holds a
//!   runtime worker either (in the lab the loaded coordination p50 under one-sided bulk went
//!   from 9.3–9.6 ms to 0.49–0.50 ms, the p99 from 30–34 ms to 1–2 ms). What keeps an operation's
//!   memory alive rides in its completion, which runs (or is dropped) only once the device is
//!   done with it, flushed, or the QP destroyed. A failed operation (a remote access error:
//!   the region was revoked meanwhile) fails the connection; the fabric resumes on a new one.
//!   A write may carry immediate data (`OneSidedOp::imm`): its last piece goes as RDMA WRITE
//!   with immediate, which consumes one of the empty receives kept posted on the peer's
//!   one-sided QP; the peer's drain task hands the value to the fabric's handler once the
//!   write, and every write before it on the QP, has landed (up to 1,024 values are kept for
//!   a handler not installed yet). The fabric notifies a transfer's
//!   target that way (no message after the last block). Immediates found in the CQ as the
//!   connection is dropped are still handed over: the writer counts them delivered.
//! - **Rails** ([`VerbsConfig::rails`]): extra devices one-sided operations spread over. Each
//!   connection sets up one more one-sided QP per rail, with a CQ and a draining task of its own,
//!   after the main exchange: the two ends send each other their rails' QPN, PSN, GID, MTU and
//!   READ depth, pair rail *k* with rail *k* (as many as both have), connect each pair with the
//!   connection's timers, and prove each pair's path with a zero-length SEND before `connect`
//!   returns. Regions are registered on every rail too (an MR and window per device; the
//!   descriptor carries each rail's remote key), and pieces go to the rail with the fewest bytes
//!   in flight among those both regions span. A write with immediate data still tells the peer
//!   that every byte before it landed: its last piece waits until the other rails have nothing
//!   in flight, and goes on the main device's QP. See `one_sided.rs`. (That a rail's RC
//!   acknowledgement means its bytes are visible at the peer before the main device's
//!   immediate is handed over there is assumed, as multi-rail libraries assume it; it holds for
//!   devices that place data before acknowledging it, as rxe and current RNICs do.)
//! - **Failure.** A failed work completion (e.g. retries exhausted after a link loss), the
//!   QP's error state, or the side channel closing without an in-band close, surfaces as
//!   [`RecvError::Io`](agentfabric::transport::RecvError) naming the cause; the fabric session
//!   then resumes on a new connection (a new QP) or declares the peer dead after its timeout.
//!   A clean close sends an in-band FIN (a flag in the immediate data) after the last frame.
//! - `max_frame_payload()` is the receive buffer size less the 64-byte header: sessions cut
//!   chunks to fit.
//!
//! # Guarantees
//!
//! RC is reliable ([`Transport::reliable`] is `true`): frames pushed on one connection arrive
//! complete, in order, exactly once while the connection lives. A frame posted but not yet
//! acknowledged by the peer's RC layer can be lost when the connection fails; the session's
//! acks and resume cover that case.
//!
//! # Cost of a connection
//!
//! Each connection registers `(recv_depth + send_depth) × recv_buffer_size` bytes per frames
//! QP (4 MiB with the defaults: 32 + 32 buffers of 64 KiB; 8 MiB with the bulk lane) and sets
//! up three QPs (latency frames, bulk frames, one-sided operations; two without the bulk
//! lane), each with its CQ and completion channel, and a task that drains the one-sided CQ
//! (and one more QP, CQ and task per rail); on a software device, two threads that post
//! one-sided work and bulk frames ([`Posting::Auto`]), asleep while there is none. In
//! the Soft-RoCE lab under software emulation (debug build) a connection takes 0.17–0.45 s to
//! set up (resources ~50 ms, parameter exchange ~50 ms, QP to RTS ~5–45 ms, path probe ~50 ms);
//! on hardware it is a few milliseconds.
//!
//! # Building
//!
//! `rdma-sys` generates its bindings with bindgen at build time: the build needs
//! `libibverbs-dev`, `librdmacm-dev`, `pkg-config` and `libclang-dev` (Debian package names).
//! Running needs no device: every call that needs one fails with an error saying so.
//!
//! # Selecting the device
//!
//! [`VerbsConfig::device`], `port` and `gid_index` choose explicitly. Left unset, the
//! environment decides (`AGENTFABRIC_LAB_DEVICE`, `AGENTFABRIC_LAB_GID_INDEX`, as the Soft-RoCE
//! lab sets them), then the device whose RoCE v2 GID carries the side channel's local IP
//! address (as rdma_cm would pick it), then the first ACTIVE port of the first device and its
//! first RoCE v2 IPv4-mapped GID.
//!
//! # Layout
//!
//! Set-up apart from the data path, and each file uses only files listed before it (no import
//! circle):
//!
//! - `params.rs`: the QP parameters the two ends exchange, their encoding and negotiation.
//! - `config.rs`: [`VerbsConfig`], [`Posting`], their validation and environment lookups.
//! - `qp.rs`: queue-pair primitives: QP state transitions along a path, the completion
//!   channel's fd, CQ polling, WR chains, the errors of verbs calls and failed completions.
//! - `window.rs`: memory windows, and the QP each device binds them on.
//! - `device.rs`: listing and opening devices, choosing a port and GID.
//! - `memory.rs`: the transport's memory domain and its registrations.
//! - `one_sided.rs`: one-sided operations and the QPs (rails) they go on.
//! - `resources.rs`: a lane's verbs objects (QP, CQ, channel, registered buffers).
//! - `datapath.rs`: a lane's data path, the connection's one-sided handle and CQ drains.
//! - `posting.rs`: the threads that post one-sided work and bulk-lane sends ([`Posting`]).
//! - `lanes.rs`: the connection's sending and receiving halves over its lanes.
//! - `establish.rs`: connection set-up over the TCP side channel, up to the probes.
//! - `lib.rs`: the transport, its listener, and the choice of device.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};

use agentfabric::frame::HEADER_LEN;
use agentfabric::sync::lock;
/// The posting thread's priority ([`Posting::Thread`]): the fabric's type, re-exported here
/// where the verbs settings name it.
pub use agentfabric::transport::ThreadPriority;
use agentfabric::transport::{BoxFuture, Connection, Listener, MemoryDomain, Transport};
use tokio::net::TcpStream;

mod config;
mod datapath;
mod device;
mod establish;
mod lanes;
mod memory;
mod one_sided;
pub mod params;
mod posting;
mod qp;
mod resources;
mod window;

pub use config::{Posting, VerbsConfig, READ_DEPTH, RMA_PIECE};
pub use device::{devices, DeviceInfo, GidInfo, PortInfo};

/// Result with the error this crate's functions return: [`io::Error`], the error of the fabric's
/// `Transport` trait, as for every transport. `?` converts it into [`agentfabric::Error`]
/// (`Error::Transport`, with its kind and message) in a function that returns
/// [`agentfabric::Result`].
pub type Result<T, E = io::Error> = std::result::Result<T, E>;

/// The old name of [`Posting`]: it governs the bulk lane's sends too, not only one-sided
/// ("RMA") work.
#[deprecated(note = "renamed to Posting")]
pub type RmaPosting = Posting;

use device::{Context, LocalPort};
use establish::Role;

/// URL scheme of this transport: `verbs://ip:port`.
pub const SCHEME: &str = "verbs";

/// Where a connection's own device is named, for errors.
const MAIN_DEVICE_SETTING: &str = "AGENTFABRIC_LAB_DEVICE / VerbsConfig::device";
/// Where the rails are named, for errors.
const RAILS_SETTING: &str = "VerbsConfig::rails (or AGENTFABRIC_RAILS)";

/// The verbs transport: scheme `verbs`, reliable, one RC QP per [`Connection`].
#[derive(Default, Clone)]
pub struct VerbsTransport {
    config: VerbsConfig,
}

/// Open devices, shared by every connection of the process (opening a device costs a few
/// system calls and mappings), closed with the last connection on them.
static OPEN: Mutex<Option<HashMap<String, Weak<Context>>>> = Mutex::new(None);

impl std::fmt::Debug for VerbsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl VerbsTransport {
    /// A transport with the default [`VerbsConfig`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport with the given settings.
    pub fn with_config(config: VerbsConfig) -> Self {
        VerbsTransport { config }
    }

    /// The transport's settings.
    pub fn config(&self) -> &VerbsConfig {
        &self.config
    }

    /// The open device called `name` (opened now if no connection holds it); `setting` names
    /// where the name came from, for the error when there is no such device.
    fn device(&self, name: &str, setting: &str) -> io::Result<Arc<Context>> {
        let mut open = lock(&OPEN);
        let open = open.get_or_insert_with(HashMap::new);
        if let Some(d) = open.get(name).and_then(Weak::upgrade) {
            return Ok(d);
        }
        let d = Context::open(name, setting)?;
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(name.to_owned(), Arc::downgrade(&d));
        Ok(d)
    }

    /// Device, port and GID index for a connection whose side channel has local address `ip`.
    fn choose(&self, ip: IpAddr) -> io::Result<(Arc<Context>, u8, u8)> {
        let cfg = &self.config;
        let gid_env = cfg.env_gid_index()?;
        let name = match cfg.env_device() {
            Some(n) => n,
            None => match Context::find_by_ip(ip) {
                Some((n, _, _)) => n,
                None => Context::names()?.into_iter().next().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no RDMA devices found: {}", device::NO_DEVICE_HINT),
                    )
                })?,
            },
        };
        let dev = self.device(&name, MAIN_DEVICE_SETTING)?;
        let port = match cfg.port {
            Some(p) => p,
            None => dev.first_active_port()?,
        };
        let gid = match gid_env {
            Some(g) => g,
            None => dev.pick_gid(port, Some(ip))?,
        };
        Ok((dev, port, gid))
    }

    /// The rails' devices, each with its port and GID index, refusing the connection's own
    /// device `main` among them.
    fn rails(&self, main: &Arc<Context>) -> io::Result<Vec<LocalPort>> {
        self.config
            .checked_rails()?
            .iter()
            .map(|name| {
                let dev = self.device(name, RAILS_SETTING)?;
                if Arc::ptr_eq(&dev, main) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{RAILS_SETTING} names {name}, the connection's own device: a rail \
                             must be another device"
                        ),
                    ));
                }
                let port = dev.first_active_port()?;
                let gid_index = dev.pick_gid(port, None)?;
                Ok(LocalPort {
                    dev,
                    port,
                    gid_index,
                })
            })
            .collect()
    }

    async fn connect_inner(&self, addr: &str) -> io::Result<Connection> {
        self.config.validate()?;
        let target = parse(addr, false)?;
        let limit = self.config.connect_timeout;
        let side = match tokio::time::timeout(limit, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot reach the verbs peer {SCHEME}://{target} over its TCP side \
                         channel: {e} (is a node listening there, and is the address routable?)"
                    ),
                ))
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "cannot reach the verbs peer {SCHEME}://{target}: no answer within \
                         {limit:?} (unreachable peer)"
                    ),
                ))
            }
        };
        let local_ip = side.local_addr()?.ip();
        let (dev, port, gid) = self.choose(local_ip)?;
        let rails = self.rails(&dev)?;
        establish::establish(
            side,
            Role::Initiator,
            LocalPort {
                dev,
                port,
                gid_index: gid,
            },
            rails,
            &self.config,
            format!("{SCHEME}://{target}"),
        )
        .await
    }

    async fn listen_inner(&self, addr: &str) -> io::Result<Box<dyn Listener>> {
        self.config.validate()?;
        let target = parse(addr, true)?;
        let listener = tokio::net::TcpListener::bind(target).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {SCHEME}://{target} (TCP side channel): {e}"),
            )
        })?;
        let local = listener.local_addr()?;
        // Fail now, not on the first connection, if there is no device to serve it with.
        let (dev, _, _) = self.choose(local.ip())?;
        self.rails(&dev)?;
        tracing::debug!(%local, "verbs transport listening");
        Ok(Box::new(VerbsListener {
            inner: listener,
            local: format!("{SCHEME}://{local}"),
            transport: Arc::new(self.clone()),
            pending: tokio::task::JoinSet::new(),
        }))
    }
}

impl Transport for VerbsTransport {
    fn scheme(&self) -> &'static str {
        SCHEME
    }

    fn reliable(&self) -> bool {
        true
    }

    fn max_frame_payload(&self) -> usize {
        self.config
            .recv_buffer_size
            .saturating_sub(HEADER_LEN)
            .clamp(1, agentfabric::frame::MAX_FRAME_PAYLOAD)
    }

    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Connection>> {
        Box::pin(self.connect_inner(addr))
    }

    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(self.listen_inner(addr))
    }

    /// The protection domain of the device this transport's connections use when it is named
    /// ([`VerbsConfig::device`] or `AGENTFABRIC_LAB_DEVICE`), else of the first device, with
    /// those of its rails ([`VerbsConfig::rails`]). `None` when a device cannot be opened:
    /// regions then move through the session. A connection that ends up on another device
    /// (chosen by its IP address) moves them through the session too.
    fn memory_domain(&self) -> Option<Arc<dyn MemoryDomain>> {
        let name = match self.config.env_device() {
            Some(n) => n,
            None => Context::names().ok()?.into_iter().next()?,
        };
        let domain = self.device(&name, MAIN_DEVICE_SETTING).and_then(|dev| {
            let rails = self.rails(&dev)?.into_iter().map(|r| r.dev).collect();
            Ok(memory::VerbsDomain {
                dev,
                rails,
                windows: self.config.memory_windows,
            })
        });
        match domain {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                tracing::debug!(device = %name, error = %e, "no RDMA memory domain");
                None
            }
        }
    }
}

/// Accepts side-channel connections and sets each up concurrently (a slow or bad client does
/// not hold up the others); failed set-ups are logged and skipped.
struct VerbsListener {
    inner: tokio::net::TcpListener,
    local: String,
    transport: Arc<VerbsTransport>,
    pending: tokio::task::JoinSet<io::Result<Connection>>,
}

impl Listener for VerbsListener {
    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn accept(&mut self) -> BoxFuture<'_, io::Result<Connection>> {
        Box::pin(async move {
            loop {
                tokio::select! {
                    accepted = self.inner.accept() => {
                        let (side, peer) = match accepted {
                            Ok(a) => a,
                            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted
                                | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted) => continue,
                            Err(e) => return Err(io::Error::new(e.kind(), format!("accepting on {}: {e}", self.local))),
                        };
                        let t = self.transport.clone();
                        self.pending.spawn(async move {
                            let ip = side.local_addr()?.ip();
                            let (dev, port, gid) = t.choose(ip)?;
                            let rails = t.rails(&dev)?;
                            let main = LocalPort { dev, port, gid_index: gid };
                            establish::establish(side, Role::Acceptor, main, rails, &t.config,
                                format!("{SCHEME}://{peer}")).await
                        });
                    }
                    Some(done) = self.pending.join_next(), if !self.pending.is_empty() => {
                        match done {
                            Ok(Ok(conn)) => return Ok(conn),
                            Ok(Err(e)) => tracing::warn!(local = %self.local, error = %e, "incoming verbs connection failed"),
                            Err(e) => tracing::warn!(local = %self.local, error = %e, "verbs connection set-up task failed"),
                        }
                    }
                }
            }
        })
    }
}

fn parse(addr: &str, allow_port_zero: bool) -> io::Result<SocketAddr> {
    let text = addr.strip_prefix("verbs://").unwrap_or(addr);
    let sa: SocketAddr = text.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid verbs address {addr:?}: expected IP:PORT of the peer's RDMA interface, \
                 e.g. 10.77.0.1:7000"
            ),
        )
    })?;
    if sa.port() == 0 && !allow_port_zero {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid verbs address {addr:?}: port 0"),
        ));
    }
    Ok(sa)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod thread_count;
