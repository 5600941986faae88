//! The transport's settings: [`VerbsConfig`], where one-sided work and bulk-lane sends are
//! posted from ([`Posting`]), the one-sided limits ([`RMA_PIECE`], [`READ_DEPTH`]), and the
//! checks the settings pass before any device is touched ([`VerbsConfig::validate`]), with the
//! environment variables that fill in what is left unset.

use std::io;
use std::time::Duration;

use agentfabric::frame::HEADER_LEN;
use agentfabric::transport::ThreadPriority;

use crate::params;

/// Settings of the verbs transport. [`Default`] reads the lab's environment for the device and
/// GID index and otherwise gives the settings the benchmarks use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbsConfig {
    /// RDMA device name (e.g. `rxe0`); `None`: `AGENTFABRIC_LAB_DEVICE`, else the device whose
    /// GID matches the side channel's local address, else the first with an ACTIVE port.
    pub device: Option<String>,
    /// Port number; `None`: the first ACTIVE port.
    pub port: Option<u8>,
    /// GID index; `None`: `AGENTFABRIC_LAB_GID_INDEX`, else the RoCE v2 IPv4-mapped GID of the
    /// side channel's local address, else the first RoCE v2 IPv4-mapped GID.
    pub gid_index: Option<u8>,
    /// Bytes per receive buffer: the largest frame (header + payload). Must be equal on both
    /// ends. Default 64 KiB.
    pub recv_buffer_size: usize,
    /// Receive buffers posted per connection: the credits the peer may use. Default 32.
    pub recv_depth: u32,
    /// Send queue depth (and registered send slots). Default 32.
    pub send_depth: u32,
    /// Largest frame sent inline (asked of the QP; the device may grant less). Default 256.
    pub max_inline: u32,
    /// Path MTU this end insists on (256..4096), or `None` (default) to use the smaller of the
    /// two ports' active MTUs.
    pub mtu: Option<u32>,
    /// Minimum RNR NAK timer code advertised (1..=31). Default 12 (0.64 ms). Never 0 (655 ms).
    pub min_rnr_timer: u8,
    /// Transport retry count (0..=7). Default 7.
    pub retry_count: u8,
    /// RNR retry count (0..=7, 7 = infinite). Default 7. (Credits prevent RNR anyway.)
    pub rnr_retry: u8,
    /// Local ACK timeout code: 4.096 µs × 2^code. Default 14 (67 ms): with 7 retries a lost
    /// link fails the QP in about half a second.
    pub ack_timeout: u8,
    /// Signal one send in this many (and the last of each batch). Default 16.
    pub signal_every: u32,
    /// Spin on the completion queue instead of sleeping on the completion channel. Default off.
    pub busy_poll: bool,
    /// After a completion on the coordination lane (or a send after an idle spell), keep
    /// polling its completion queue for this long before sleeping on the completion channel.
    /// A reply that comes within it is taken without a wake-up through the channel's fd (an
    /// interrupt, an `epoll` wake-up and a context switch), at the cost of a runtime worker
    /// spinning that long (the task yields to the runtime between polls). An idle connection
    /// sleeps as before. The bulk lane never spins; [`VerbsConfig::busy_poll`] spins always.
    /// Default 50 µs (a few round trips on hardware, as Linux's `net.core.busy_poll` advice);
    /// `Duration::ZERO` sleeps at once; at most 1 s.
    pub spin_before_sleep: Duration,
    /// A connection with sends outstanding and no completion for this long has failed (link
    /// down, peer unreachable), whatever the RC retry machinery says. Default 1 s.
    pub stall_timeout: Duration,
    /// Bound on the TCP side-channel connect, the parameter exchange and the RDMA path check,
    /// each. Default 3 s.
    pub connect_timeout: Duration,
    /// Bytes of one-sided operations (RDMA WRITE/READ of transfers) in flight per connection.
    /// They go out in pieces of at most [`RMA_PIECE`], so a coordination frame queues behind at
    /// most this much bulk in the device and on the wire; enough to keep a link busy (a 100 Gb/s
    /// link with a 5 µs round trip holds 62 KB). Default 256 KiB.
    pub rma_inflight_bytes: u32,
    /// Give registered regions their remote key through memory windows, where the device has
    /// them: revoking a region then withdraws its key but keeps the memory registered, so the
    /// buffer [`Region::reclaim`](agentfabric::Region::reclaim) hands back registers again
    /// without pinning its pages again. Off, or on a device without windows, a region's
    /// registration carries the key itself and revoking deregisters it. Default on.
    pub memory_windows: bool,
    /// Extra RDMA devices ("rails", e.g. `["rxe1"]`) that one-sided operations spread over,
    /// beside the connection's own device: each connection sets up one more one-sided QP per
    /// rail (on the rail's first ACTIVE port and its first RoCE v2 IPv4-mapped GID), regions are
    /// registered on every rail too, and the pieces of each operation go to the rail with the
    /// fewest bytes in flight. Rails pair up by position with the peer's (rail *k* here with
    /// rail *k* there, as many as both ends have), so list them in the same order on both
    /// ends, each on a network that reaches the peer's rail of the same position. At most
    /// [`agentfabric::transport::MAX_RAILS`]. Default none. Env: `AGENTFABRIC_RAILS`
    /// (comma-separated) when empty.
    pub rails: Vec<String>,
    /// Where one-sided operations' pieces (and the bulk lane's sends) are posted from. Default
    /// [`Posting::Auto`]: a thread of the connection's own at nice 10 on a software device,
    /// the submitting or completing task on hardware.
    pub posting: Posting,
    /// Give bulk channels' frames a queue pair of their own (a second one per connection, with
    /// its own receive buffers: twice the registered memory of one), so that coordination never
    /// waits behind bulk data in a send queue. Used when both ends set it. Where the bulk lane's
    /// sends are posted from follows [`VerbsConfig::posting`]. Default on.
    pub bulk_lane: bool,
}

/// Where a connection posts its one-sided operations' pieces, and its bulk lane's sends
/// ([`VerbsConfig::posting`], [`VerbsConfig::bulk_lane`]): each gets a thread of its own
/// when a thread is chosen.
///
/// Posting one-sided work never holds the lock the connection's frames need, whichever is
/// chosen; the bulk lane's sends are posted under the bulk lane's own lock by
/// [`Posting::Caller`], outside it by a thread. On hardware
/// `ibv_post_send` writes a doorbell and returns. On a software device (Soft-RoCE `rxe`,
/// `siw`) it runs the protocol in the posting system call: segmenting, checksums, the copies,
/// and often the receiving side's work too. In the lab those calls took 6 ms at p90 and 11 ms
/// at p99 under `mixed --bulk-api transfer` (256 KiB in flight). On a runtime worker that
/// holds up every coordination frame the worker would have handled meanwhile; on a thread of
/// its own at a lower priority the kernel's scheduler runs coordination first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Posting {
    /// [`Posting::Thread`]`(`[`ThreadPriority::Nice`]`(10))` when the connection's device is
    /// a software one (known by its vendor id), [`Posting::Caller`] otherwise.
    #[default]
    Auto,
    /// The task that submits an operation, or that takes the completions which made room,
    /// posts. No thread; the lowest latency to the device where posting is cheap.
    Caller,
    /// A thread per connection, at this priority, posts; submitting and completing only wake
    /// it.
    Thread(ThreadPriority),
}

impl Posting {
    /// The posting thread's priority for a connection on a device that is `software` or not;
    /// `None`: no thread.
    pub(crate) fn thread(self, software: bool) -> Option<ThreadPriority> {
        match self {
            Posting::Auto => software.then_some(ThreadPriority::Nice(10)),
            Posting::Caller => None,
            Posting::Thread(p) => Some(p),
        }
    }
}

/// Largest piece a one-sided operation is posted in (see [`VerbsConfig::rma_inflight_bytes`]).
pub const RMA_PIECE: u32 = 64 << 10;

/// Most RDMA READs a connection keeps in flight (fewer where either device takes fewer: the
/// ends exchange their limits). Enough to cover [`VerbsConfig::rma_inflight_bytes`]'s default
/// in pieces of [`RMA_PIECE`] several times over; devices commonly take 16.
pub const READ_DEPTH: u8 = 16;

impl Default for VerbsConfig {
    fn default() -> Self {
        VerbsConfig {
            device: None,
            port: None,
            gid_index: None,
            recv_buffer_size: 64 * 1024,
            recv_depth: 32,
            send_depth: 32,
            max_inline: 256,
            mtu: None,
            min_rnr_timer: 12,
            retry_count: 7,
            rnr_retry: 7,
            ack_timeout: 14,
            signal_every: 16,
            busy_poll: false,
            spin_before_sleep: Duration::from_micros(50),
            stall_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
            rma_inflight_bytes: 256 << 10,
            memory_windows: true,
            rails: Vec::new(),
            posting: Posting::Auto,
            bulk_lane: true,
        }
    }
}

impl VerbsConfig {
    /// Checks the settings on their own (before any device is touched).
    pub fn validate(&self) -> io::Result<()> {
        let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        if self.recv_buffer_size < HEADER_LEN + 1 || self.recv_buffer_size > (1 << 30) {
            return bad(format!(
                "VerbsConfig::recv_buffer_size {} is out of range ({}..=1 GiB)",
                self.recv_buffer_size,
                HEADER_LEN + 1
            ));
        }
        if !(2..=params::imm::CREDITS).contains(&self.recv_depth) {
            return bad(format!(
                "VerbsConfig::recv_depth {} is out of range (2..=65535)",
                self.recv_depth
            ));
        }
        if !(RMA_PIECE..=1 << 30).contains(&self.rma_inflight_bytes) {
            return bad(format!(
                "VerbsConfig::rma_inflight_bytes {} is out of range (one piece, {RMA_PIECE} \
                 bytes, to 1 GiB)",
                self.rma_inflight_bytes
            ));
        }
        if let Posting::Thread(ThreadPriority::Nice(n)) = self.posting {
            if !(-20..=19).contains(&n) {
                return bad(format!(
                    "VerbsConfig::posting Thread(Nice({n})) is out of range (-20..=19)"
                ));
            }
        }
        if !(2..=1 << 15).contains(&self.send_depth) {
            return bad(format!(
                "VerbsConfig::send_depth {} is out of range (2..=32768)",
                self.send_depth
            ));
        }
        if let Some(m) = self.mtu {
            if params::mtu_code(m).is_none() {
                return bad(format!(
                    "VerbsConfig::mtu {m} is not an RDMA MTU (256, 512, 1024, 2048 or 4096)"
                ));
            }
        }
        if self.min_rnr_timer == 0 || self.min_rnr_timer > 31 {
            return bad(format!(
                "VerbsConfig::min_rnr_timer {} is out of range 1..=31 (0 would mean 655 ms stalls)",
                self.min_rnr_timer
            ));
        }
        if self.spin_before_sleep > Duration::from_secs(1) {
            return bad(format!(
                "VerbsConfig::spin_before_sleep {:?} is over 1 s: spinning that long is busy \
                 polling (set busy_poll instead)",
                self.spin_before_sleep
            ));
        }
        self.checked_rails()?;
        if self.retry_count > 7 || self.rnr_retry > 7 || self.ack_timeout > 31 {
            return bad(
                "VerbsConfig::retry_count and rnr_retry must be 0..=7, ack_timeout 0..=31".into(),
            );
        }
        Ok(())
    }

    pub(crate) fn env_device(&self) -> Option<String> {
        self.device.clone().or_else(|| {
            std::env::var("AGENTFABRIC_LAB_DEVICE")
                .ok()
                .filter(|s| !s.is_empty())
        })
    }

    /// [`VerbsConfig::rails`] (else `AGENTFABRIC_RAILS`), checked: at most
    /// [`agentfabric::transport::MAX_RAILS`], each a different device.
    pub(crate) fn checked_rails(&self) -> io::Result<Vec<String>> {
        let rails = self.env_rails();
        let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        if rails.len() > agentfabric::transport::MAX_RAILS {
            return bad(format!(
                "VerbsConfig::rails (or AGENTFABRIC_RAILS) names {} devices; at most {} are \
                 supported",
                rails.len(),
                agentfabric::transport::MAX_RAILS
            ));
        }
        for (i, r) in rails.iter().enumerate() {
            if rails[..i].contains(r) {
                return bad(format!(
                    "VerbsConfig::rails (or AGENTFABRIC_RAILS) {rails:?}: each rail must name a \
                     different device"
                ));
            }
        }
        Ok(rails)
    }

    /// [`VerbsConfig::rails`], else `AGENTFABRIC_RAILS`.
    pub(crate) fn env_rails(&self) -> Vec<String> {
        if !self.rails.is_empty() {
            return self.rails.clone();
        }
        std::env::var("AGENTFABRIC_RAILS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn env_gid_index(&self) -> io::Result<Option<u8>> {
        if let Some(g) = self.gid_index {
            return Ok(Some(g));
        }
        match std::env::var("AGENTFABRIC_LAB_GID_INDEX") {
            Ok(s) if !s.trim().is_empty() => s.trim().parse().map(Some).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("AGENTFABRIC_LAB_GID_INDEX={s:?} is not a GID index (0..=255)"),
                )
            }),
            _ => Ok(None),
        }
    }
}
