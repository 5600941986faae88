//! A connection's data path, per lane: the state the connection's two halves share ([`Shared`]
//! over [`Inner`]); frames queued and posted as SEND with immediate credits, batched in one
//! chain, inline or copied into registered send slots, selectively signalled ([`SendBatch`]);
//! the CQ polled (frames copied out of their receive buffers, which are reposted at once); the
//! completion channel waited on through tokio's `AsyncFd` (after a spin, when asked); the stall
//! and side-channel checks; the probe that proves a lane's path at set-up. Also the
//! connection's one-sided handle ([`FrameSink::one_sided`]) and the tasks that drain the
//! one-sided CQs. Its verbs objects are in `resources.rs`, its set-up in `establish.rs`, the
//! threads that post for it in `posting.rs`.
//!
//! [`FrameSink::one_sided`]: agentfabric::transport::FrameSink::one_sided

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context as TaskCx, Poll, Waker};
use std::time::Duration;

use agentfabric::frame::{Frame, FrameError, OutFrame, HEADER_LEN};
use agentfabric::sync::lock;
use agentfabric::transport::{ImmediateHandler, OneSided, OneSidedDone, OneSidedOp, RecvError};
use bytes::Bytes;
use rdma_sys::*;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

use crate::config::VerbsConfig;
use crate::one_sided::{RmaCq, RmaShared};
use crate::params::imm;
use crate::qp::{
    chain_send_wrs, channel_fd, explain_status, poll_cq, rc_err, take_cq_event, wc_imm, ChannelFd,
};
use crate::resources::Resources;

/// Takes rail `k`'s one-sided completions as they come, until the connection is gone (`stop`
/// resolves when it drops): completes the operations, and has what waited for room posted
/// ([`post_queued`]).
pub(crate) async fn drain_rma(
    conn: Weak<Mutex<Inner>>,
    ops: Weak<RmaShared>,
    k: usize,
    rma: Arc<RmaCq>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        // Arm first, then drain: a completion that came before arming is found by the drain.
        // SAFETY: the CQ is valid while `rma` lives.
        let armed = unsafe { ibv_req_notify_cq(rma.cq, 0) } == 0;
        {
            // The connection is held (not locked) while its QPs may be posted to.
            let (Some(conn), Some(ops)) = (conn.upgrade(), ops.upgrade()) else {
                return;
            };
            let drained = lock(&ops.state).drain(k);
            match drained {
                Ok(()) => post_queued(&conn, &ops),
                Err((kind, msg)) => fail_conn(&conn, kind, msg),
            }
            if !armed {
                fail_conn(
                    &conn,
                    io::ErrorKind::Other,
                    "arming a one-sided completion queue failed".into(),
                );
                return;
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            r = rma.fd.readable() => match r {
                Ok(mut guard) => {
                    // SAFETY: the channel is valid (and non-blocking) while `rma` lives.
                    unsafe { take_cq_event(rma.channel) };
                    guard.clear_ready();
                }
                Err(e) => {
                    if let Some(conn) = conn.upgrade() {
                        fail_conn(
                            &conn,
                            e.kind(),
                            format!("waiting for one-sided completions failed: {e}"),
                        );
                    }
                    return;
                }
            },
        }
    }
}

/// Fails the connection with `kind` and `msg`, and wakes both halves (the frame path learns
/// of it when it next runs).
pub(crate) fn fail_conn(conn: &Mutex<Inner>, kind: io::ErrorKind, msg: String) {
    let mut st = lock(conn);
    st.fail(kind, msg);
    st.wake_both();
}

/// Posts the one-sided pieces that wait and fit, on the connection's posting thread when it
/// has one, else here. The caller holds the connection, so its QPs live through the post.
fn post_queued(conn: &Mutex<Inner>, ops: &RmaShared) {
    if !ops.queued() || ops.kick() {
        return;
    }
    if let Err(e) = ops.post() {
        fail_conn(conn, e.kind(), e.to_string());
    }
}

/// How one queued WR carries its frame.
#[derive(Clone, Copy)]
enum Carry {
    /// Inline: header and payload straight from the frame (index into `hold`).
    Inline(usize),
    /// Copied into send slot `slot`, `len` bytes, from the frame at index `hold` into `hold`
    /// (when the batch is submitted: see [`SendBatch::submit`]).
    Slot {
        slot: usize,
        len: usize,
        hold: usize,
    },
    /// No data (credit return, FIN, probe).
    Empty,
}

/// Sends planned and built under the connection's lock, and booked (their send slots and
/// queue entries are theirs): what [`SendBatch::submit`] posts, with or without the lock (a
/// bulk lane's posting thread posts without it, see `lanes.rs`).
pub(crate) struct SendBatch {
    qp: *mut ibv_qp,
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
    /// The frames the WRs point into (inline) or are copied from (slots), kept until posted.
    hold: Vec<OutFrame>,
    /// Slot copies to make before posting: (index into `hold`, offset into the send slots).
    copies: Vec<(usize, usize)>,
    /// The send slots' memory (registered, owned by the connection's [`Resources`]).
    slots: *mut u8,
    /// Nothing was outstanding before this batch: the stall clock starts again when it is
    /// posted (a posting thread kept waiting for a CPU is not a dead link).
    was_idle: bool,
}

impl SendBatch {
    /// Copies the slot-carried frames into their slots and posts every WR in one call.
    /// Returns `ibv_post_send`'s result.
    ///
    /// # Safety
    ///
    /// The connection that built the batch must be held (its QP and send slots live), and the
    /// batch submitted once, before any later batch of the same connection.
    pub(crate) unsafe fn submit(&mut self) -> i32 {
        for &(h, at) in &self.copies {
            let f = &self.hold[h];
            // SAFETY: the slot at `at` is this batch's (booked under the lock, not posted yet,
            // so the device does not read it), and holds a whole frame (checked when planned).
            unsafe {
                let dst = self.slots.add(at);
                std::ptr::copy_nonoverlapping(f.header.as_ptr(), dst, HEADER_LEN);
                std::ptr::copy_nonoverlapping(
                    f.payload.as_ptr(),
                    dst.add(HEADER_LEN),
                    f.payload.len(),
                );
            }
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: WRs and SGEs live until the call returns; inline data is copied by the call;
        // slot data stays in the send slots, which live as long as the QP.
        unsafe { ibv_post_send(self.qp, self.wrs.as_mut_ptr(), &mut bad) }
    }
}

struct Planned {
    carry: Carry,
    imm: u32,
}

/// The state of one lane's QP, shared by the sink and the stream (both are driven by the same
/// task in the fabric, so the mutex is uncontended, but for a bulk lane's posting thread which
/// takes it only to plan and to account).
pub(crate) struct Inner {
    // Declared first: dropped before `res`, whose channel owns the fd.
    fd: AsyncFd<ChannelFd>,
    /// The side channel, on the latency lane: its closing tells of the peer's death.
    side: Option<TcpStream>,
    res: Resources,
    /// Wakes the thread that posts this lane's sends (a bulk lane on a software device, see
    /// `lanes.rs`); `None`: whoever plans them posts them, under the lock.
    poster: Option<std::sync::mpsc::SyncSender<()>>,
    /// One-sided operations on the rails. After `res`: rail 0's QP (in `res`) is destroyed
    /// before the rails' CQs and the operations' completions go (whoever else holds this holds
    /// the connection too while it posts, see [`post_queued`]). A bulk lane shares the
    /// latency lane's, and may outlive rail 0's QP: that is safe because the latency lane's
    /// drop fails them first, after which nothing is posted.
    rma: Arc<RmaShared>,
    /// Dropped with the connection: stops the rails' [`drain_rma`] tasks.
    _rma_stop: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The memory domain whose registrations the one-sided operations name: the device's and
    /// its configured rails' (`memory::domain_id`).
    domain: u64,
    remote: String,
    send_depth: u32,
    signal_every: u64,
    credit_threshold: u32,
    busy_poll: bool,
    /// Keep polling for this long after `last_progress` before sleeping (zero on the bulk lane).
    spin: Duration,
    stall_timeout: Duration,
    /// When a completion last arrived (or the first send after an idle period was posted).
    last_progress: std::time::Instant,
    // Send side.
    queue: VecDeque<OutFrame>,
    queued: usize,
    credits: u32,
    posted: u64,
    completed: u64,
    closing: bool,
    fin_sent: bool,
    // Receive side.
    to_return: u32,
    ready: VecDeque<Frame>,
    fin_received: bool,
    received_any: bool,
    frame_error: Option<FrameError>,
    error: Option<(io::ErrorKind, String)>,
    side_closed: bool,
    armed: bool,
    // Scratch, reused so the steady state allocates nothing.
    wcs: Vec<ibv_wc>,
    repost: Vec<u32>,
    rwrs: Vec<ibv_recv_wr>,
    rsges: Vec<ibv_sge>,
    plan: Vec<Planned>,
    hold: Vec<OutFrame>,
    swrs: Vec<ibv_send_wr>,
    ssges: Vec<ibv_sge>,
    copies: Vec<(usize, usize)>,
    // Wakers of the two halves.
    sink_waker: Option<Waker>,
    stream_waker: Option<Waker>,
}

// SAFETY: the raw pointers in the scratch vectors are only meaningful during one call, under
// the mutex, or inside a `SendBatch` while the thread that built it holds the lane (see
// `send_post_thread`); Resources is Send.
unsafe impl Send for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // A peer's write with immediate that landed just before the connection went has its
        // completion in the one-sided CQ, and the peer counts it delivered: hand it over
        // rather than lose the notification. Failed first, so that nothing more is posted.
        self.fail(
            io::ErrorKind::ConnectionAborted,
            "the connection was closed".into(),
        );
        let mut rma = lock(&self.rma.state);
        for k in 0..rma.rails.len() {
            // Failed already: nothing is posted, and the drain's verdict changes nothing.
            let _ = rma.drain(k);
        }
    }
}

impl Inner {
    /// A lane over `res` (connected, its receives posted), that may send `credits` frames
    /// before the peer returns any; `side` on the latency lane only. Its one-sided operations
    /// are `rma` (the connection's, shared by its lanes); `rma_stop` stops their drains when
    /// this lane goes. It spins for `spin` after a completion before sleeping.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        res: Resources,
        side: Option<TcpStream>,
        rma: Arc<RmaShared>,
        rma_stop: Vec<tokio::sync::oneshot::Sender<()>>,
        domain: u64,
        credits: u32,
        spin: Duration,
        cfg: &VerbsConfig,
        remote: &str,
    ) -> io::Result<Inner> {
        // SAFETY: the fd stays open while the AsyncFd lives: `Inner` drops `fd` before `res`,
        // whose completion channel owns it.
        let fd = unsafe { channel_fd(res.channel())? };
        let send_depth = cfg.send_depth;
        Ok(Inner {
            fd,
            side,
            res,
            poster: None,
            rma,
            _rma_stop: rma_stop,
            domain,
            remote: remote.to_owned(),
            send_depth,
            signal_every: u64::from(cfg.signal_every.clamp(1, send_depth.max(2) / 2)),
            credit_threshold: (cfg.recv_depth / 4).clamp(1, cfg.recv_depth - 1),
            busy_poll: cfg.busy_poll,
            spin,
            stall_timeout: cfg.stall_timeout,
            last_progress: std::time::Instant::now(),
            queue: VecDeque::new(),
            queued: 0,
            credits,
            posted: 0,
            completed: 0,
            closing: false,
            fin_sent: false,
            to_return: 0,
            ready: VecDeque::new(),
            fin_received: false,
            received_any: false,
            frame_error: None,
            error: None,
            side_closed: false,
            armed: false,
            wcs: Vec::with_capacity(32),
            repost: Vec::with_capacity(cfg.recv_depth as usize),
            rwrs: Vec::with_capacity(cfg.recv_depth as usize),
            rsges: Vec::with_capacity(cfg.recv_depth as usize),
            plan: Vec::with_capacity(send_depth as usize),
            hold: Vec::with_capacity(send_depth as usize),
            swrs: Vec::with_capacity(send_depth as usize),
            ssges: Vec::with_capacity(2 * send_depth as usize),
            copies: Vec::with_capacity(send_depth as usize),
            sink_waker: None,
            stream_waker: None,
        })
    }

    fn fail(&mut self, kind: io::ErrorKind, msg: String) {
        if self.error.is_none() {
            tracing::debug!(remote = %self.remote, error = %msg, "verbs connection failed");
            self.error = Some((kind, msg.clone()));
        }
        // The one-sided QPs go to the error state too, so their posted pieces complete soon,
        // as flushed (a failure), whatever broke the connection; operations not posted fail.
        lock(&self.rma.state).fail((kind, msg));
    }

    /// Wakes both halves' tasks.
    pub(crate) fn wake_both(&mut self) {
        for w in [self.stream_waker.take(), self.sink_waker.take()]
            .into_iter()
            .flatten()
        {
            w.wake();
        }
    }

    /// Whether the lane has failed.
    pub(crate) fn failed(&self) -> bool {
        self.error.is_some()
    }

    fn io_error(&self) -> Option<io::Error> {
        self.error
            .as_ref()
            .map(|(k, m)| io::Error::new(*k, m.clone()))
    }

    fn sq_free(&self) -> u32 {
        self.send_depth - (self.posted - self.completed) as u32
    }

    /// Polls the CQ until it is empty: frames to `ready`, credits and freed send slots counted,
    /// buffers reposted. Returns whether anything completed.
    fn drain(&mut self) -> bool {
        let mut progress = false;
        loop {
            let cap = self.wcs.capacity() as i32;
            let n = poll_cq(self.res.cq(), &mut self.wcs);
            if n < 0 {
                self.fail(
                    io::ErrorKind::Other,
                    "polling the completion queue failed".into(),
                );
                break;
            }
            let n = n as usize;
            if n == 0 {
                break;
            }
            progress = true;
            self.last_progress = std::time::Instant::now();
            for k in 0..n {
                let wc = &self.wcs[k];
                let (status, opcode, wr_id, len) = (wc.status, wc.opcode, wc.wr_id, wc.byte_len);
                let imm = wc_imm(wc);
                if status != ibv_wc_status::IBV_WC_SUCCESS {
                    let (kind, msg) = explain_status(status, &self.remote);
                    self.fail(kind, msg);
                    continue;
                }
                if opcode & ibv_wc_opcode::IBV_WC_RECV != 0 {
                    self.received_any = true;
                    let (credits, fin) = if let Some(raw) = imm {
                        imm::decode(raw)
                    } else {
                        (0, false)
                    };
                    self.credits += credits;
                    if fin {
                        self.fin_received = true;
                    }
                    if len > 0 && self.frame_error.is_none() {
                        let bytes = self.res.received(wr_id as usize, len as usize);
                        match Frame::decode(Bytes::copy_from_slice(bytes)) {
                            Ok(f) => self.ready.push_back(f),
                            Err(e) => self.frame_error = Some(e),
                        }
                    }
                    self.repost.push(wr_id as u32);
                    self.to_return += 1;
                } else if wr_id != 0 {
                    // A signalled send: it and every send before it are complete.
                    self.completed = self.completed.max(wr_id);
                }
            }
            self.wcs.clear();
            if n < cap as usize {
                break;
            }
        }
        if !self.repost.is_empty() && self.error.is_none() {
            let repost = std::mem::take(&mut self.repost);
            if let Err(e) = self
                .res
                .post_recvs(&repost, &mut self.rwrs, &mut self.rsges)
            {
                self.fail(e.kind(), e.to_string());
            }
            self.repost = repost;
            self.repost.clear();
        }
        self.repost.clear();
        progress
    }

    /// Posts as much as credits and send-queue room allow, in one `ibv_post_send`: queued
    /// frames, then a credit return if one is due, then FIN when closing. Returns whether
    /// anything was posted. With a posting thread, only wakes it when there may be something
    /// to post (and returns `false`).
    fn post(&mut self) -> bool {
        if let Some(kick) = &self.poster {
            if self.error.is_some() || !self.may_post() {
                return false;
            }
            match kick.try_send(()) {
                // Full: a wake-up is pending, and the thread plans everything when it runs.
                Ok(()) | Err(std::sync::mpsc::TrySendError::Full(())) => return false,
                // The thread is gone (it ends only when this lane is gone, so this does not
                // happen; if it did, nothing would be posted): post here from now on.
                Err(std::sync::mpsc::TrySendError::Disconnected(())) => self.poster = None,
            }
        }
        match self.plan_batch() {
            Some(batch) => self.submit_here(batch),
            None => false,
        }
    }

    /// Whether [`Inner::plan_batch`] may find something to post (frames, a credit return due,
    /// FIN), credits and room aside.
    /// Mirrors the plan's conditions, so a lane waiting for credits or room does not wake its
    /// thread for nothing.
    fn may_post(&self) -> bool {
        let want_return =
            self.to_return >= self.credit_threshold || (self.to_return > 0 && self.closing);
        self.sq_free() > 0
            && ((!self.queue.is_empty() && self.credits >= 2)
                || (want_return && self.credits >= 1 && !self.fin_sent)
                || (self.closing && self.queue.is_empty() && !self.fin_sent && self.credits >= 1))
    }

    /// Plans and books what [`Inner::post`] would post (see there): `None` when nothing.
    pub(crate) fn plan_batch(&mut self) -> Option<SendBatch> {
        if self.error.is_some() {
            return None;
        }
        self.plan.clear();
        self.hold.clear();
        let mut room = self.sq_free();
        let buf_size = self.res.buf_size();
        // Data keeps the last credit back for credit returns, so two ends that both wait for
        // credits can always tell each other about freed buffers.
        while room > 0 && self.credits >= 2 {
            let Some(f) = self.queue.pop_front() else {
                break;
            };
            let len = f.wire_len();
            self.queued -= len;
            if len > buf_size {
                self.fail(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a frame of {len} bytes exceeds the verbs receive buffer size {buf_size}"
                    ),
                );
                return None;
            }
            let seq = self.posted + self.plan.len() as u64; // 0-based
            self.hold.push(f);
            let hold = self.hold.len() - 1;
            let carry = if len as u32 <= self.res.max_inline() {
                Carry::Inline(hold)
            } else {
                let slot = (seq % u64::from(self.send_depth)) as usize;
                Carry::Slot { slot, len, hold }
            };
            let ret = self.to_return.min(imm::CREDITS);
            self.to_return -= ret;
            self.plan.push(Planned {
                carry,
                imm: imm::encode(ret, false),
            });
            self.credits -= 1;
            room -= 1;
        }
        let want_return =
            self.to_return >= self.credit_threshold || (self.to_return > 0 && self.closing);
        if want_return && room > 0 && self.credits >= 1 && !self.fin_sent {
            let ret = self.to_return.min(imm::CREDITS);
            self.to_return -= ret;
            self.plan.push(Planned {
                carry: Carry::Empty,
                imm: imm::encode(ret, false),
            });
            self.credits -= 1;
            room -= 1;
        }
        if self.closing && self.queue.is_empty() && !self.fin_sent && room > 0 && self.credits >= 1
        {
            let ret = self.to_return.min(imm::CREDITS);
            self.to_return -= ret;
            self.plan.push(Planned {
                carry: Carry::Empty,
                imm: imm::encode(ret, true),
            });
            self.credits -= 1;
            self.fin_sent = true;
        }
        self.build_batch()
    }

    /// A zero-length message that only proves the path (and returns nothing yet), posted here.
    fn post_probe(&mut self) {
        self.plan.clear();
        self.hold.clear();
        self.plan.push(Planned {
            carry: Carry::Empty,
            imm: imm::encode(0, false),
        });
        self.credits -= 1;
        if let Some(batch) = self.build_batch() {
            self.submit_here(batch);
        }
    }

    /// Posts `batch` under the lock, and takes it back.
    fn submit_here(&mut self, mut batch: SendBatch) -> bool {
        // SAFETY: this connection built the batch and is held (locked); batches are built and
        // submitted one at a time under the lock.
        let rc = unsafe { batch.submit() };
        self.finish(batch, rc)
    }

    /// Builds the WRs of what is planned into a batch, and books them: their sequence numbers
    /// and slots are taken.
    fn build_batch(&mut self) -> Option<SendBatch> {
        let n = self.plan.len();
        if n == 0 {
            return None;
        }
        self.swrs.clear();
        self.ssges.clear();
        self.copies.clear();
        let lkey = self.res.send_lkey();
        let slots = self.res.send_slots();
        let buf_size = self.res.buf_size();
        // SGEs first (two per WR at most): their addresses are stable when the WRs point at them.
        for p in &self.plan {
            match p.carry {
                Carry::Inline(h) => {
                    let f = &self.hold[h];
                    self.ssges.push(ibv_sge {
                        addr: f.header.as_ptr() as u64,
                        length: HEADER_LEN as u32,
                        lkey: 0,
                    });
                    if !f.payload.is_empty() {
                        self.ssges.push(ibv_sge {
                            addr: f.payload.as_ptr() as u64,
                            length: f.payload.len() as u32,
                            lkey: 0,
                        });
                    }
                }
                Carry::Slot { slot, len, hold } => {
                    self.copies.push((hold, slot * buf_size));
                    self.ssges.push(ibv_sge {
                        addr: slots as u64 + (slot * buf_size) as u64,
                        length: len as u32,
                        lkey,
                    });
                }
                Carry::Empty => {}
            }
        }
        let mut sge_i = 0usize;
        for (k, p) in self.plan.iter().enumerate() {
            let seq = self.posted + k as u64 + 1; // 1-based: the wr_id of a signalled send
            let (num, inline) = match p.carry {
                Carry::Inline(h) => (
                    if self.hold[h].payload.is_empty() {
                        1
                    } else {
                        2
                    },
                    true,
                ),
                Carry::Slot { .. } => (1, false),
                Carry::Empty => (0, true),
            };
            let signalled = k + 1 == n || seq.is_multiple_of(self.signal_every);
            let mut flags = 0u32;
            if inline {
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
            }
            if signalled {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            // SAFETY: zeroed is a valid ibv_send_wr.
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = if signalled { seq } else { 0 };
            wr.sg_list = if num > 0 {
                &mut self.ssges[sge_i]
            } else {
                std::ptr::null_mut()
            };
            wr.num_sge = num;
            wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
            wr.send_flags = flags;
            wr.imm_data_invalidated_rkey_union.imm_data = p.imm.to_be();
            sge_i += num as usize;
            self.swrs.push(wr);
        }
        chain_send_wrs(&mut self.swrs);
        // The stall clock starts when an idle lane books sends (a stall check before they are
        // posted must not count the idle time), and again when they are posted (see `finish`).
        let was_idle = self.posted == self.completed;
        if was_idle {
            self.last_progress = std::time::Instant::now();
        }
        // Booked: later batches take the next sequence numbers and slots, and a close waits
        // for these to complete.
        self.posted += n as u64;
        // The vectors move with their heap buffers, so the WRs' pointers stay valid.
        Some(SendBatch {
            qp: self.res.qp(),
            wrs: std::mem::take(&mut self.swrs),
            sges: std::mem::take(&mut self.ssges),
            hold: std::mem::take(&mut self.hold),
            copies: std::mem::take(&mut self.copies),
            slots,
            was_idle,
        })
    }

    /// Takes a submitted batch back (its vectors are reused) and fails the connection if
    /// `rc`, its post's result, says it failed. Returns whether it was posted.
    pub(crate) fn finish(&mut self, batch: SendBatch, rc: i32) -> bool {
        let SendBatch {
            mut wrs,
            mut sges,
            mut hold,
            mut copies,
            was_idle,
            ..
        } = batch;
        hold.clear();
        wrs.clear();
        sges.clear();
        copies.clear();
        (self.swrs, self.ssges, self.hold, self.copies) = (wrs, sges, hold, copies);
        if rc != 0 {
            let e = rc_err(rc, format!("posting sends to {}", self.remote));
            self.fail(e.kind(), e.to_string());
            return false;
        }
        if was_idle {
            self.last_progress = std::time::Instant::now();
        }
        true
    }

    /// Waits for completion events: arms the CQ (then the caller polls once more, so nothing
    /// that completed before arming is missed), or registers `cx` with the channel's fd.
    /// `Ok(true)`: poll the CQ again.
    fn wait_events(&mut self, cx: &mut TaskCx<'_>) -> io::Result<bool> {
        // Spinning: the task yields to the runtime and polls again (other tasks run between).
        if self.busy_poll || (!self.spin.is_zero() && self.last_progress.elapsed() < self.spin) {
            cx.waker().wake_by_ref();
            return Ok(false);
        }
        if !self.armed {
            // SAFETY: cq is valid.
            let rc = unsafe { ibv_req_notify_cq(self.res.cq(), 0) };
            if rc != 0 {
                return Err(rc_err(rc, "arming the completion queue"));
            }
            self.armed = true;
            return Ok(true);
        }
        match self.fd.poll_read_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                // SAFETY: the channel is valid and non-blocking.
                if unsafe { take_cq_event(self.res.channel()) } {
                    self.armed = false;
                }
                guard.clear_ready();
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }

    /// Notices the side channel closing (the peer process died or dropped the connection).
    fn poll_side(&mut self, cx: &mut TaskCx<'_>) {
        let Some(side) = &self.side else {
            return;
        };
        if self.side_closed {
            return;
        }
        while let Poll::Ready(r) = side.poll_read_ready(cx) {
            if r.is_err() {
                self.side_closed = true;
                return;
            }
            let mut b = [0u8; 64];
            match side.try_read(&mut b) {
                Ok(0) => {
                    self.side_closed = true;
                    return;
                }
                Ok(_) => continue, // nothing is sent after set-up; ignore
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => {
                    self.side_closed = true;
                    return;
                }
            }
        }
    }

    /// Sends outstanding and no completion for `stall_timeout`: the link is gone even if the RC
    /// retry machinery has not said so (Soft-RoCE keeps retrying across a link down/up without
    /// ever completing). The fabric's keepalives keep polling, so this is checked in time.
    fn check_stall(&mut self) {
        if self.error.is_some() {
            return;
        }
        let quiet = self.last_progress.elapsed();
        let outstanding = self.posted - self.completed;
        // Taken before `fail`, which locks the one-sided state again.
        let rma_stalled = lock(&self.rma.state).stalled(self.stall_timeout);
        if outstanding > 0 && quiet > self.stall_timeout {
            let remote = self.remote.clone();
            self.fail(
                io::ErrorKind::TimedOut,
                format!(
                    "no RDMA completion from {remote} for {quiet:?} with {outstanding} sends \
                     outstanding: the link is down or the peer is unreachable"
                ),
            );
        } else if let Some(why) = rma_stalled {
            self.fail(io::ErrorKind::TimedOut, why);
        }
    }

    /// Wakes the other half's task after this one moved its work forward (frames drained into
    /// `ready` by the sink, credits or send slots freed by the stream). Also when that task is
    /// the current one: the fabric polls both halves from one task, which may not poll the
    /// stream again in this turn unless woken.
    fn wake_other(&mut self, sink: bool) {
        let w = if sink {
            self.stream_waker.take()
        } else {
            self.sink_waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// One lane's state; both halves of the connection hold it (see `lanes.rs`).
#[derive(Clone)]
pub(crate) struct Shared(Arc<Mutex<Inner>>);

impl Shared {
    /// The lane `inner`, to be shared by the connection's halves.
    pub(crate) fn new(inner: Inner) -> Shared {
        Shared(Arc::new(Mutex::new(inner)))
    }

    /// The lane, held weakly (by its posting thread).
    pub(crate) fn downgrade(&self) -> Weak<Mutex<Inner>> {
        Arc::downgrade(&self.0)
    }

    /// Queues a frame.
    pub(crate) fn push(&self, frame: OutFrame) {
        let mut st = lock(&self.0);
        st.queued += frame.wire_len();
        st.queue.push_back(frame);
    }

    /// Bytes queued and not yet posted.
    pub(crate) fn queued(&self) -> usize {
        lock(&self.0).queued
    }

    /// Posts what is queued (and, when `close`, FIN after it): `Ready(Ok(()))` once everything
    /// is posted (and, when closing, has completed).
    pub(crate) fn poll_write(&self, cx: &mut TaskCx<'_>, close: bool) -> Poll<io::Result<()>> {
        let mut st = lock(&self.0);
        if close {
            st.closing = true;
        } else if st.closing && !st.queue.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "frame pushed after the verbs connection was closed",
            )));
        }
        loop {
            if let Some(e) = st.io_error() {
                return Poll::Ready(Err(e));
            }
            let drained = st.drain();
            let posted = st.post();
            if drained {
                st.wake_other(true);
            }
            if let Some(e) = st.io_error() {
                return Poll::Ready(Err(e));
            }
            let done =
                st.queue.is_empty() && (!close || (st.fin_sent && st.completed == st.posted));
            if done {
                return Poll::Ready(Ok(()));
            }
            if posted || drained {
                continue;
            }
            st.check_stall();
            if let Some(e) = st.io_error() {
                return Poll::Ready(Err(e));
            }
            st.sink_waker = Some(cx.waker().clone());
            match st.wait_events(cx) {
                Ok(true) => continue,
                Ok(false) => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Receives this lane's frames that are ready into `out` (`Ready(Ok(()))` adds at least
    /// one); `Eof` once the peer closed the lane and everything before its FIN was received.
    pub(crate) fn poll_recv(
        &self,
        cx: &mut TaskCx<'_>,
        out: &mut Vec<Frame>,
    ) -> Poll<Result<(), RecvError>> {
        let mut st = lock(&self.0);
        loop {
            if !st.ready.is_empty() {
                out.extend(st.ready.drain(..));
                // Credits freed by these receives go back now if they are due.
                if st.post() {
                    st.wake_other(false);
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &st.frame_error {
                return Poll::Ready(Err(RecvError::Frame(e.clone())));
            }
            if let Some(e) = st.io_error() {
                return Poll::Ready(Err(RecvError::Io(e)));
            }
            if st.fin_received {
                return Poll::Ready(Err(RecvError::Eof));
            }
            st.poll_side(cx);
            let drained = st.drain();
            if drained {
                st.post();
                st.wake_other(false);
                continue;
            }
            if st.side_closed {
                let remote = st.remote.clone();
                st.fail(
                    io::ErrorKind::ConnectionReset,
                    format!(
                        "the side channel to {remote} closed without an RDMA close: the peer \
                         process died or dropped the connection"
                    ),
                );
                continue;
            }
            st.check_stall();
            if st.error.is_some() {
                continue;
            }
            st.stream_waker = Some(cx.waker().clone());
            match st.wait_events(cx) {
                Ok(true) => continue,
                Ok(false) => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(RecvError::Io(e))),
            }
        }
    }

    /// The connection's one-sided operations (on the latency lane's state).
    pub(crate) fn one_sided(&self) -> Arc<dyn OneSided> {
        let st = lock(&self.0);
        Arc::new(VerbsOneSided {
            conn: Arc::downgrade(&self.0),
            ops: Arc::downgrade(&st.rma),
            domain: st.domain,
        })
    }

    /// Whether the lane's side channel has closed (registering `cx` to hear of it); `false` on
    /// a lane without one.
    pub(crate) fn side_closed(&self, cx: &mut TaskCx<'_>) -> bool {
        let mut st = lock(&self.0);
        st.poll_side(cx);
        st.side_closed
    }

    /// Has `kick` wake the lane's posting thread to post its sends from now on.
    pub(crate) fn set_poster(&self, kick: std::sync::mpsc::SyncSender<()>) {
        lock(&self.0).poster = Some(kick);
    }

    /// Fails the lane (and so the connection's one-sided operations) with `kind` and `msg`.
    pub(crate) fn fail(&self, kind: io::ErrorKind, msg: String) {
        fail_conn(&self.0, kind, msg);
    }
}

/// The connection's one-sided operations
/// ([`FrameSink::one_sided`](agentfabric::transport::FrameSink::one_sided)). Holds the
/// connection weakly: a transfer waiting on its operations does not keep a failed connection
/// alive.
struct VerbsOneSided {
    conn: Weak<Mutex<Inner>>,
    ops: Weak<RmaShared>,
    domain: u64,
}

impl OneSided for VerbsOneSided {
    fn domain(&self) -> u64 {
        self.domain
    }

    fn post(&self, op: OneSidedOp, done: OneSidedDone) {
        let (Some(conn), Some(ops)) = (self.conn.upgrade(), self.ops.upgrade()) else {
            done(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the verbs connection is gone",
            )));
            return;
        };
        let failed = lock(&conn).io_error();
        if let Some(e) = failed {
            done(Err(e));
            return;
        }
        if op.len == 0 && op.imm.is_none() {
            // Nothing to move or tell.
            done(Ok(()));
            return;
        }
        // A failure between the check above and here fails what is queued (`Rma::fail`), so
        // the operation is not lost either way.
        lock(&ops.state).submit(op, done);
        post_queued(&conn, &ops);
    }

    fn on_immediate(&self, handler: ImmediateHandler) {
        if let Some(ops) = self.ops.upgrade() {
            lock(&ops.state).imms.install(handler);
        }
    }
}

/// Proves one lane's RDMA path: its probe message goes out and completes, and the peer's
/// comes in. `side` is the lane that holds the side channel, when another: its closing ends
/// the wait too.
pub(crate) async fn probe(lane: &Shared, side: Option<&Shared>) -> io::Result<()> {
    lock(&lane.0).post_probe();
    poll_fn(|cx| {
        if side.is_some_and(|s| s.side_closed(cx)) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer closed the side channel before the bulk lane's RDMA path check",
            )));
        }
        let mut st = lock(&lane.0);
        loop {
            let drained = st.drain();
            if let Some(e) = st.io_error() {
                return Poll::Ready(Err(e));
            }
            if st.received_any && st.completed == st.posted {
                return Poll::Ready(Ok(()));
            }
            if drained {
                continue;
            }
            st.poll_side(cx);
            if st.side_closed && !st.received_any {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the peer closed the side channel before the RDMA path check",
                )));
            }
            match st.wait_events(cx) {
                Ok(true) => continue,
                Ok(false) => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    })
    .await
}
