//! A connection's one-sided operations (RDMA WRITE and READ between registered regions) and the
//! queue pairs they go on: the connection's own one-sided QP (rail 0) and one QP on each extra
//! device, the rails of [`VerbsConfig::rails`](crate::config::VerbsConfig::rails).
//!
//! Operations are cut in pieces of at most [`RMA_PIECE`] bytes; each piece goes to the usable
//! rail with the fewest bytes in flight, within [`VerbsConfig::rma_inflight_bytes`] per rail
//! and the send queue's room. A rail is usable for an operation when both its local and its
//! remote registration span it ([`OneSidedOp::local_rails`], `remote_rails`). Every piece is
//! signalled, and RC completes a QP's pieces in order, so each rail keeps its pieces in a
//! queue by sequence number; an operation completes when its last outstanding piece, on
//! whichever rail, does.
//!
//! A write with immediate data tells the peer that it and everything before it landed: its
//! last piece goes on rail 0, and only once the other rails have nothing in flight, so every
//! byte posted before it, on any rail, has landed when the peer's device hands the immediate
//! over (rail 0 itself completes in order).
//!
//! [`VerbsConfig::rma_inflight_bytes`]: crate::config::VerbsConfig::rma_inflight_bytes

use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentfabric::sync::lock;
use agentfabric::transport::{Immediates, OneSidedDone, OneSidedKind, OneSidedOp, MAX_RAILS};
use rdma_sys::*;
use tokio::io::unix::AsyncFd;

use crate::config::RMA_PIECE;
use crate::device::{Context, LocalPort};
use crate::params::{LinkLayer, RailParams};
use crate::qp::{
    chain_send_wrs, channel_fd, connect_one, explain_status, os_err, poll_cq, rc_err, rc_qp_attr,
    to_init, wc_imm, ChannelFd, PathSpec,
};

/// Receives posted on a one-sided QP: how many of the peer's writes with immediate can land
/// before this end takes their completions (each is reposted as it is taken; beyond this the
/// peer's device waits and retries, receiver not ready).
pub(crate) const RMA_RECVS: u32 = 64;

/// The work-request id of a one-sided QP's receives (its pieces count up from 1).
const RMA_RECV_WR: u64 = u64::MAX;

/// The work-request id of a rail's probe message at set-up.
const RAIL_PROBE_WR: u64 = u64::MAX - 1;

/// A one-sided QP's completion queue and channel. Apart from the frames' so that one-sided
/// completions (one per piece, thousands a second under bulk) never wake the task that reads
/// frames: a task of their own (`datapath::drain_rma`) takes them. Dropped after the QP that
/// completes on it.
pub(crate) struct RmaCq {
    // Declared first: deregistered before `channel` closes the fd.
    pub(crate) fd: AsyncFd<ChannelFd>,
    pub(crate) cq: *mut ibv_cq,
    pub(crate) channel: *mut ibv_comp_channel,
    _dev: Arc<Context>,
}

// SAFETY: CQ and channel handles are usable from any thread; polling is serialised by the
// one-sided state's mutex (`RmaShared::state`), event handling by the single draining task.
unsafe impl Send for RmaCq {}
// SAFETY: as above.
unsafe impl Sync for RmaCq {}

impl RmaCq {
    pub(crate) fn new(dev: &Arc<Context>, depth: u32) -> io::Result<RmaCq> {
        // SAFETY: the context is open; each handle is checked, and owned by the result or
        // destroyed here on failure.
        unsafe {
            let channel = ibv_create_comp_channel(dev.ctx);
            if channel.is_null() {
                return Err(os_err(format!(
                    "cannot create a completion channel on {}",
                    dev.name
                )));
            }
            let cqe = (depth + RMA_RECVS + 1) as i32;
            let cq = ibv_create_cq(dev.ctx, cqe, std::ptr::null_mut(), channel, 0);
            if cq.is_null() {
                let e = os_err(format!("cannot create the one-sided CQ on {}", dev.name));
                ibv_destroy_comp_channel(channel);
                return Err(e);
            }
            // The fd stays open while the AsyncFd lives: `fd` is dropped before `channel`.
            match channel_fd(channel) {
                Ok(fd) => Ok(RmaCq {
                    fd,
                    cq,
                    channel,
                    _dev: dev.clone(),
                }),
                Err(e) => {
                    ibv_destroy_cq(cq);
                    ibv_destroy_comp_channel(channel);
                    Err(e)
                }
            }
        }
    }
}

impl Drop for RmaCq {
    fn drop(&mut self) {
        // SAFETY: owned handles; the QP completing on the CQ is gone (see the type's docs).
        unsafe {
            ibv_destroy_cq(self.cq);
            ibv_destroy_comp_channel(self.channel);
        }
    }
}

/// Creates a one-sided RC QP on `dev`'s protection domain completing on `cq`, moves it to INIT
/// on `port`, and posts its [`RMA_RECVS`] empty receives.
pub(crate) fn create_rma_qp(
    dev: &Context,
    port: u8,
    cq: *mut ibv_cq,
    send_depth: u32,
) -> io::Result<*mut ibv_qp> {
    let mut init = rc_qp_attr(cq, send_depth, RMA_RECVS, 1, 0);
    // SAFETY: the PD and the CQ are valid.
    let qp = unsafe { ibv_create_qp(dev.pd, &mut init) };
    if qp.is_null() {
        return Err(os_err(format!(
            "cannot create a one-sided RC QP on {} (send depth {send_depth})",
            dev.name
        )));
    }
    let ready = to_init(qp, port, &dev.name).and_then(|()| post_empty_recvs(qp, RMA_RECVS));
    if let Err(e) = ready {
        // SAFETY: created above, nothing posted on it that the device still holds.
        unsafe { ibv_destroy_qp(qp) };
        return Err(e);
    }
    Ok(qp)
}

/// Posts `n` empty receives on one-sided QP `qp`, for the peer's writes with immediate.
pub(crate) fn post_empty_recvs(qp: *mut ibv_qp, n: u32) -> io::Result<()> {
    for _ in 0..n {
        // SAFETY: zeroed is a valid ibv_recv_wr (no scatter entries: a write with immediate
        // places its data by address, the receive only reports the immediate).
        let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = RMA_RECV_WR;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is valid; the WR lives until the call returns.
        let rc = unsafe { ibv_post_recv(qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc_err(rc, "cannot post receives on a one-sided QP"));
        }
    }
    Ok(())
}

/// A rail's one-sided QP, owned: destroyed on drop.
pub(crate) struct RailQp {
    qp: *mut ibv_qp,
    rail: LocalPort,
}

// SAFETY: a QP handle is usable from any thread, and verbs calls on one QP are thread-safe;
// posting is serialised by `RmaShared::posting` anyway.
unsafe impl Send for RailQp {}
// SAFETY: as above; `&self` methods only query and post.
unsafe impl Sync for RailQp {}

impl RailQp {
    /// A one-sided QP on `rail`'s device completing on `cq` (of the same device), in INIT with
    /// its receives posted.
    pub(crate) fn new(rail: LocalPort, cq: &RmaCq, send_depth: u32) -> io::Result<RailQp> {
        let qp = create_rma_qp(&rail.dev, rail.port, cq.cq, send_depth)?;
        Ok(RailQp { qp, rail })
    }

    /// What the peer needs to connect its rail to this one.
    pub(crate) fn params(&self) -> io::Result<RailParams> {
        let dev = &self.rail.dev;
        let attr = dev.query_port(self.rail.port)?;
        Ok(RailParams {
            // SAFETY: the QP is valid.
            qpn: unsafe { (*self.qp).qp_num },
            psn: rand::random::<u32>() & 0x00ff_ffff,
            lid: attr.lid,
            gid: dev.query_gid(self.rail.port, self.rail.gid_index)?,
            gid_index: self.rail.gid_index,
            active_mtu: attr.active_mtu as u8,
            reads_in: dev.reads_in,
            link_layer: LinkLayer::from_u8(attr.link_layer),
        })
    }

    /// INIT -> RTR -> RTS towards the peer's rail `remote`, with the connection's timers
    /// (`timers` carries them; its path fields are replaced by the rail's).
    pub(crate) fn connect(
        &self,
        local: &RailParams,
        remote: &RailParams,
        path_mtu: u8,
        timers: &PathSpec,
    ) -> io::Result<()> {
        let spec = PathSpec {
            port: self.rail.port,
            gid_index: self.rail.gid_index,
            link_layer: local.link_layer,
            path_mtu,
            remote_lid: remote.lid,
            remote_gid: remote.gid,
            reads_in: local.reads_in,
            reads_out: remote.reads_in.min(self.rail.dev.reads_out),
            ..*timers
        };
        connect_one(self.qp, remote.qpn, remote.psn, local.psn, &spec).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "rail {} (GID index {}) towards the peer's rail GID {}: {e}",
                    self.rail.dev.name, self.rail.gid_index, remote.gid
                ),
            )
        })
    }

    /// The rail's device name.
    pub(crate) fn device(&self) -> &str {
        &self.rail.dev.name
    }
}

impl Drop for RailQp {
    fn drop(&mut self) {
        // SAFETY: owned; after this the device runs no WR of it.
        unsafe { ibv_destroy_qp(self.qp) };
    }
}

/// Proves each rail's path before the connection is handed out: a zero-length SEND on every
/// rail QP (consuming one of the peer's empty receives), waiting for its completion, which RC
/// gives only once the peer's QP took it. Receives the peer's own probes, and reposts them.
pub(crate) async fn probe_rails(
    rails: &[(&RailQp, &RmaCq)],
    limit: Duration,
    remote: &str,
) -> io::Result<()> {
    for (rail, _) in rails {
        // SAFETY: zeroed is a valid ibv_send_wr (no scatter entries: zero length).
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = RAIL_PROBE_WR;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is valid and in RTS; the WR lives until the call returns.
        let rc = unsafe { ibv_post_send(rail.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc_err(rc, format!("probing rail {}", rail.device())));
        }
    }
    let deadline = Instant::now() + limit;
    let mut proved = vec![false; rails.len()];
    let mut wcs = Vec::with_capacity(8);
    while proved.iter().any(|p| !p) {
        for (k, (rail, cq)) in rails.iter().enumerate() {
            if poll_cq(cq.cq, &mut wcs) < 0 {
                return Err(io::Error::other(format!(
                    "polling rail {}'s completion queue failed",
                    rail.device()
                )));
            }
            for wc in &wcs {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    let (kind, msg) = explain_status(wc.status, remote);
                    return Err(io::Error::new(
                        kind,
                        format!("rail {} does not reach the peer's: {msg}", rail.device()),
                    ));
                }
                match wc.wr_id {
                    RAIL_PROBE_WR => proved[k] = true,
                    RMA_RECV_WR => post_empty_recvs(rail.qp, 1)?,
                    _ => {}
                }
            }
        }
        if Instant::now() > deadline {
            let silent: Vec<&str> = (0..rails.len())
                .filter(|&k| !proved[k])
                .map(|k| rails[k].0.device())
                .collect();
            return Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!(
                    "rails {silent:?} do not reach the peer's within {limit:?}: check that rail \
                     k here and rail k on the peer share a network (VerbsConfig::rails / \
                     AGENTFABRIC_RAILS, same order on both ends)"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// A posted piece of a one-sided operation.
struct Piece {
    /// Its rail's sequence number (1-based; the work-request id).
    seq: u64,
    len: u32,
    /// The operation it belongs to.
    op: u64,
}

/// One rail: a one-sided QP and what is in flight on it.
pub(crate) struct Rail {
    qp: *mut ibv_qp,
    /// Owns `qp` on the extra devices (rail 0's belongs to the connection's resources).
    /// Declared before `cq`: the QP is destroyed before the CQ it completes on.
    own: Option<RailQp>,
    pub(crate) cq: Arc<RmaCq>,
    /// Posted pieces, in order.
    inflight: VecDeque<Piece>,
    /// Pieces posted and completed, and bytes in flight.
    posted: u64,
    completed: u64,
    bytes: u64,
    /// When a completion last arrived (or the first piece after an idle spell was posted).
    progress: Instant,
}

// SAFETY: the QP handle is usable from any thread; the rail is used under the one-sided
// state's mutex, its QP also by the poster (under `RmaShared::posting`).
unsafe impl Send for Rail {}

impl Rail {
    /// Rail 0: the connection's own one-sided QP `qp` (owned elsewhere, and destroyed before
    /// this is dropped) on `cq`.
    pub(crate) fn main(qp: *mut ibv_qp, cq: Arc<RmaCq>) -> Rail {
        Rail {
            qp,
            own: None,
            cq,
            inflight: VecDeque::new(),
            posted: 0,
            completed: 0,
            bytes: 0,
            progress: Instant::now(),
        }
    }

    /// An extra rail, owning its QP.
    pub(crate) fn extra(qp: RailQp, cq: Arc<RmaCq>) -> Rail {
        Rail {
            qp: qp.qp,
            own: Some(qp),
            ..Rail::main(std::ptr::null_mut(), cq)
        }
    }

    fn name(&self) -> &str {
        self.own.as_ref().map_or("the main device", RailQp::device)
    }
}

/// An operation from its submission until its outcome is handed over.
struct OpState {
    /// Pieces posted and not completed yet.
    left: u32,
    /// Every piece is posted (or never will be: the connection failed).
    posted_all: bool,
    /// Called once with the outcome; `None` once called.
    done: Option<OneSidedDone>,
    /// The first failure among its pieces.
    err: Option<io::Error>,
}

/// One piece planned for posting.
#[derive(Clone, Copy)]
struct Planned {
    rail: usize,
    op: u64,
    kind: OneSidedKind,
    local_addr: u64,
    lkey: u32,
    remote_addr: u64,
    rkey: u32,
    len: u32,
    imm: Option<u32>,
}

/// What a drain found wrong (the connection fails with it).
pub(crate) type Failure = (io::ErrorKind, String);

/// A connection's one-sided operations on its rails.
pub(crate) struct Rma {
    /// Rail 0 first. Dropped before `ops`: whatever the operations' completions keep alive
    /// outlives the QPs that could touch it.
    pub(crate) rails: Vec<Rail>,
    /// Operations not posted in full yet (by id), with the bytes of the front one posted.
    queue: VecDeque<(u64, OneSidedOp)>,
    front_done: u32,
    /// Every operation not finished yet, by id from `base`.
    ops: VecDeque<OpState>,
    base: u64,
    /// Bytes in flight per rail ([`VerbsConfig::rma_inflight_bytes`](crate::config::VerbsConfig)).
    budget: u32,
    send_depth: u32,
    remote: String,
    /// Set once the connection failed: nothing more is posted.
    failed: Option<Failure>,
    /// Takes the immediate data of the peer's writes.
    pub(crate) imms: Immediates,
    /// Scratch for draining, reused so the steady state allocates nothing.
    wcs: Vec<ibv_wc>,
}

// SAFETY: the raw pointers (QPs, CQs) are handles usable from any thread; the state is used
// under `RmaShared::state`.
unsafe impl Send for Rma {}

impl Rma {
    pub(crate) fn new(
        rails: Vec<Rail>,
        budget: u32,
        send_depth: u32,
        remote: String,
        imms: Immediates,
    ) -> Rma {
        debug_assert!(!rails.is_empty() && rails.len() <= 1 + MAX_RAILS);
        Rma {
            rails,
            queue: VecDeque::new(),
            front_done: 0,
            ops: VecDeque::new(),
            base: 0,
            budget,
            send_depth,
            remote,
            failed: None,
            imms,
            wcs: Vec::with_capacity(32),
        }
    }

    /// Queues `op`; `done` gets its outcome (see [`agentfabric::transport::OneSided::post`]),
    /// at once when the connection has failed.
    pub(crate) fn submit(&mut self, op: OneSidedOp, done: OneSidedDone) {
        if self.failed.is_some() {
            done(Err(self.error()));
            return;
        }
        let id = self.base + self.ops.len() as u64;
        self.ops.push_back(OpState {
            left: 0,
            posted_all: false,
            done: Some(done),
            err: None,
        });
        self.queue.push_back((id, op));
    }

    /// Counts one piece of operation `id` over (with `r`), and hands the operation's outcome
    /// over when it was its last.
    fn settle(&mut self, id: u64, r: io::Result<()>) {
        let Some(st) = id
            .checked_sub(self.base)
            .and_then(|k| self.ops.get_mut(k as usize))
        else {
            return;
        };
        st.left = st.left.saturating_sub(1);
        if let Err(e) = r {
            st.err.get_or_insert(e);
        }
        self.finish_if_over(id);
    }

    /// Hands operation `id`'s outcome over if nothing of it is left in flight or to post, and
    /// forgets finished operations at the front.
    fn finish_if_over(&mut self, id: u64) {
        if let Some(st) = id
            .checked_sub(self.base)
            .and_then(|k| self.ops.get_mut(k as usize))
        {
            if st.posted_all && st.left == 0 {
                if let Some(done) = st.done.take() {
                    done(st.err.take().map_or(Ok(()), Err));
                }
            }
        }
        while self.ops.front().is_some_and(|st| st.done.is_none()) {
            self.ops.pop_front();
            self.base += 1;
        }
    }

    /// The connection failed with `why`: every rail QP goes to the error state (its posted
    /// pieces complete soon, flushed), and operations not posted in full fail (at once, or once
    /// their posted pieces are over).
    pub(crate) fn fail(&mut self, why: Failure) {
        if self.failed.is_none() {
            for rail in &self.rails {
                // SAFETY: zeroed attrs are valid; the QP is valid.
                unsafe {
                    let mut a: ibv_qp_attr = std::mem::zeroed();
                    a.qp_state = ibv_qp_state::IBV_QPS_ERR;
                    ibv_modify_qp(rail.qp, &mut a, ibv_qp_attr_mask::IBV_QP_STATE.0 as i32);
                }
            }
            self.failed = Some(why);
        }
        let queue = std::mem::take(&mut self.queue);
        self.front_done = 0;
        for (id, _) in queue {
            let e = self.error();
            if let Some(st) = id
                .checked_sub(self.base)
                .and_then(|k| self.ops.get_mut(k as usize))
            {
                st.posted_all = true;
                st.err.get_or_insert(e);
            }
            self.finish_if_over(id);
        }
    }

    /// The connection's failure as an error (or a generic one before any).
    fn error(&self) -> io::Error {
        match &self.failed {
            Some((k, m)) => io::Error::new(*k, m.clone()),
            None => io::Error::new(io::ErrorKind::ConnectionAborted, "the connection failed"),
        }
    }

    /// Takes rail `k`'s completions until its CQ is empty: settles the pieces, hands the
    /// peer's immediates over, reposts their receives. `Err` with the failure that should
    /// fail the connection (already applied here).
    pub(crate) fn drain(&mut self, k: usize) -> Result<(), Failure> {
        let cq = self.rails[k].cq.cq;
        let mut first_failure = None;
        let mut reposts = 0;
        loop {
            let cap = self.wcs.capacity() as i32;
            let n = poll_cq(cq, &mut self.wcs);
            if n < 0 {
                first_failure.get_or_insert((
                    io::ErrorKind::Other,
                    format!("polling rail {k}'s one-sided completion queue failed"),
                ));
                break;
            }
            if n == 0 {
                break;
            }
            self.rails[k].progress = Instant::now();
            for i in 0..n as usize {
                let (status, id) = (self.wcs[i].status, self.wcs[i].wr_id);
                let ok = status == ibv_wc_status::IBV_WC_SUCCESS;
                match id {
                    RMA_RECV_WR => {
                        if ok {
                            let imm = wc_imm(&self.wcs[i]);
                            if let Some(imm) = imm {
                                if !self.imms.deliver(imm) {
                                    tracing::warn!(remote = %self.remote,
                                        "write with immediate before any handler, and too \
                                         many kept; dropped");
                                }
                            }
                            reposts += 1;
                        } else if status != ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                            first_failure.get_or_insert(explain_status(status, &self.remote));
                        }
                    }
                    RAIL_PROBE_WR => {}
                    seq => {
                        let r = if ok {
                            Ok(())
                        } else {
                            let (kind, msg) = match &self.failed {
                                // A flushed piece: the connection's failure says why.
                                Some(f) if status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR => {
                                    f.clone()
                                }
                                _ => explain_status(status, &self.remote),
                            };
                            if self.failed.is_none() {
                                // The rest of this drain's flushes then carry this cause.
                                self.fail((kind, msg.clone()));
                                first_failure.get_or_insert((kind, msg.clone()));
                            }
                            Err(io::Error::new(kind, msg))
                        };
                        self.complete(k, seq, r);
                    }
                }
            }
            self.wcs.clear();
            if n < cap {
                break;
            }
        }
        if reposts > 0 && self.failed.is_none() {
            if let Err(e) = post_empty_recvs(self.rails[k].qp, reposts) {
                first_failure.get_or_insert((e.kind(), e.to_string()));
            }
        }
        match first_failure {
            Some(f) => {
                self.fail(f.clone());
                Err(f)
            }
            None => Ok(()),
        }
    }

    /// Rail `k`'s pieces up to `seq` are over: the earlier ones succeeded (RC completes in
    /// order, each had its own completion), `seq` with `r`.
    fn complete(&mut self, k: usize, seq: u64, r: io::Result<()>) {
        let mut r = Some(r);
        let rail = &mut self.rails[k];
        rail.completed = rail.completed.max(seq);
        while self.rails[k].inflight.front().is_some_and(|p| p.seq <= seq) {
            let rail = &mut self.rails[k];
            let p = rail.inflight.pop_front().expect("checked");
            rail.bytes -= u64::from(p.len);
            let outcome = if p.seq == seq {
                r.take().unwrap_or(Ok(()))
            } else {
                Ok(())
            };
            self.settle(p.op, outcome);
        }
    }

    /// Plans the queued operations' pieces that rails' budgets and send queues allow now into
    /// `batch`, booked as in flight (see [`RmaShared::post`] for who posts them). Nothing once
    /// the connection failed.
    fn plan(&mut self, batch: &mut Batch) {
        batch.plan.clear();
        batch.rails.clear();
        if self.failed.is_some() || self.queue.is_empty() {
            return;
        }
        self.plan_pieces(&mut batch.plan);
        for (k, rail) in self.rails.iter().enumerate() {
            let count = batch.plan.iter().filter(|p| p.rail == k).count();
            if count > 0 {
                batch.rails.push(BatchRail {
                    rail: k,
                    qp: rail.qp,
                    first_seq: rail.posted - count as u64 + 1,
                    count,
                    was_idle: rail.posted - count as u64 == rail.completed,
                });
            }
        }
    }

    /// Takes the last `count` pieces booked on rail `k` back out of flight (they were never
    /// posted) and settles them as failed with `e`.
    fn take_back(&mut self, k: usize, count: usize, e: &io::Error) {
        for _ in 0..count {
            let rail = &mut self.rails[k];
            let Some(p) = rail.inflight.pop_back() else {
                return;
            };
            rail.posted -= 1;
            rail.bytes -= u64::from(p.len);
            self.settle(p.op, Err(io::Error::new(e.kind(), e.to_string())));
        }
    }

    /// Fills `plan` with the pieces that fit now, in operation order, and records them as in
    /// flight (bytes, sequence numbers, pieces left per operation).
    fn plan_pieces(&mut self, plan: &mut Vec<Planned>) {
        let n = self.rails.len();
        let mut bytes = [0u64; 1 + MAX_RAILS];
        let mut room = [0u64; 1 + MAX_RAILS];
        for (k, r) in self.rails.iter().enumerate() {
            bytes[k] = r.bytes;
            room[k] = u64::from(self.send_depth).saturating_sub(r.posted - r.completed);
        }
        let budget = u64::from(self.budget);
        let mut full = 0; // operations planned in full
        let mut front_done = self.front_done;
        'ops: for (i, &(id, op)) in self.queue.iter().enumerate() {
            let usable = 1 + (n - 1).min(op.local_rails.len()).min(op.remote_rails.len());
            let mut at = if i == 0 { self.front_done } else { 0 };
            loop {
                let len = (op.len - at).min(RMA_PIECE);
                let last = at + len == op.len;
                // One piece always goes on an idle rail.
                let fits = |r: usize| {
                    room[r] > 0 && (bytes[r] == 0 || bytes[r] + u64::from(len) <= budget)
                };
                let notify = last && op.imm.is_some() && op.kind == OneSidedKind::Write;
                let rail = if notify {
                    // Any piece outstanding on another rail (posted or planned), even one of
                    // no bytes, holds the immediate back.
                    let idle = |r: usize| room[r] == u64::from(self.send_depth);
                    if !(1..n).all(idle) || !fits(0) {
                        break 'ops;
                    }
                    0
                } else {
                    match (0..usable).filter(|&r| fits(r)).min_by_key(|&r| bytes[r]) {
                        Some(r) => r,
                        None => break 'ops,
                    }
                };
                let (lkey, rkey) = match rail {
                    0 => (op.local_key, op.remote_key),
                    r => (
                        op.local_rails.as_slice()[r - 1],
                        op.remote_rails.as_slice()[r - 1],
                    ),
                };
                plan.push(Planned {
                    rail,
                    op: id,
                    kind: op.kind,
                    // Wrapping: the device refuses an address outside the registration.
                    local_addr: op.local_addr.wrapping_add(u64::from(at)),
                    lkey,
                    remote_addr: op.remote_addr.wrapping_add(u64::from(at)),
                    rkey,
                    len,
                    imm: op.imm.filter(|_| notify),
                });
                bytes[rail] += u64::from(len);
                room[rail] -= 1;
                at += len;
                if last {
                    full = i + 1;
                    front_done = 0;
                    break;
                }
                front_done = at;
            }
        }
        // Book what was planned: per operation its pieces, per rail its bytes and sequence.
        for p in plan.iter() {
            let rail = &mut self.rails[p.rail];
            if rail.posted == rail.completed {
                rail.progress = Instant::now();
            }
            rail.posted += 1;
            rail.bytes += u64::from(p.len);
            rail.inflight.push_back(Piece {
                seq: rail.posted,
                len: p.len,
                op: p.op,
            });
            let k = (p.op - self.base) as usize;
            self.ops[k].left += 1;
        }
        for (id, _) in self.queue.drain(..full) {
            let k = (id - self.base) as usize;
            self.ops[k].posted_all = true;
        }
        self.front_done = front_done;
    }

    /// A rail with pieces outstanding and no completion for `limit`: its description.
    pub(crate) fn stalled(&self, limit: Duration) -> Option<String> {
        self.rails.iter().find_map(|r| {
            let outstanding = r.posted - r.completed;
            let quiet = r.progress.elapsed();
            (outstanding > 0 && quiet > limit).then(|| {
                format!(
                    "no one-sided completion on {} from {} for {quiet:?} with {outstanding} \
                     pieces outstanding: the link is down or the peer is unreachable",
                    r.name(),
                    self.remote
                )
            })
        })
    }
}

/// A rail's share of a planned batch: its QP and the work-request id of its first piece.
struct BatchRail {
    rail: usize,
    qp: *mut ibv_qp,
    first_seq: u64,
    /// Its pieces in the batch.
    count: usize,
    /// It had nothing in flight before them: its stall clock starts when they are posted.
    was_idle: bool,
}

/// Pieces planned under the state's lock and posted outside it, with the scratch the work
/// requests are built in (reused, so the steady state allocates nothing).
pub(crate) struct Batch {
    plan: Vec<Planned>,
    rails: Vec<BatchRail>,
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
}

// SAFETY: the QP handles are usable from any thread (verbs calls on a QP are thread-safe); the
// WRs' pointers are meaningful only during one post, under `RmaShared::posting`.
unsafe impl Send for Batch {}

impl Batch {
    fn new(send_depth: u32, rails: usize) -> Batch {
        let cap = send_depth as usize * rails;
        Batch {
            plan: Vec::with_capacity(cap),
            rails: Vec::with_capacity(rails),
            wrs: Vec::with_capacity(send_depth as usize),
            sges: Vec::with_capacity(send_depth as usize),
        }
    }

    /// Posts rail `r`'s pieces as one chain. `Err((posted, rc))` when the device refused: the
    /// pieces before the refused one went.
    fn post_rail(&mut self, r: usize) -> Result<(), (usize, i32)> {
        let BatchRail {
            rail,
            qp,
            first_seq,
            ..
        } = self.rails[r];
        self.wrs.clear();
        self.sges.clear();
        let mine = self.plan.iter().filter(|p| p.rail == rail);
        for p in mine.clone() {
            self.sges.push(ibv_sge {
                addr: p.local_addr,
                length: p.len,
                lkey: p.lkey,
            });
        }
        for (i, p) in mine.enumerate() {
            // SAFETY: zeroed is a valid ibv_send_wr.
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            // Every piece is signalled: the budget frees as they complete.
            wr.wr_id = first_seq + i as u64;
            wr.sg_list = &mut self.sges[i];
            // A zero-length scatter entry means 2 GiB to some devices: none instead.
            wr.num_sge = i32::from(p.len > 0);
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.opcode = match (p.kind, p.imm) {
                (OneSidedKind::Write, Some(imm)) => {
                    wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
                }
                (OneSidedKind::Write, None) => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                (OneSidedKind::Read, _) => ibv_wr_opcode::IBV_WR_RDMA_READ,
            };
            wr.wr.rdma.remote_addr = p.remote_addr;
            wr.wr.rdma.rkey = p.rkey;
            self.wrs.push(wr);
        }
        let n = self.wrs.len();
        chain_send_wrs(&mut self.wrs);
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive (the caller holds the connection); WRs and SGEs live until
        // the call returns; the memory they name is registered and kept alive by each
        // operation's completion (see `OneSided::post`).
        let rc = unsafe { ibv_post_send(qp, self.wrs.as_mut_ptr(), &mut bad) };
        // The WRs before `bad` were posted: they are in flight like any other. A provider that
        // leaves `bad` null makes them all count as posted: the safe side, since their
        // operations then end only once the QP is destroyed, never while the device may still
        // run them.
        let posted = ((bad as usize).wrapping_sub(self.wrs.as_ptr() as usize)
            / std::mem::size_of::<ibv_send_wr>())
        .min(n);
        self.wrs.clear();
        self.sges.clear();
        if rc == 0 {
            Ok(())
        } else {
            Err((posted, rc))
        }
    }
}

/// A connection's one-sided operations, shared by whoever submits them, the rails' draining
/// tasks and, where [`crate::config::Posting`] asks for one, the connection's posting thread.
///
/// Apart from the frames' state, and posted outside any lock the frames need: on a software
/// device (Soft-RoCE) `ibv_post_send` runs the whole protocol, copies included, in the posting
/// system call, and a coordination frame must not wait for that (measured in the lab: the
/// posting `write`s of `mixed --bulk-api transfer` took 6 ms at p90, 11 ms at p99).
pub(crate) struct RmaShared {
    /// Locked with [`agentfabric::sync::lock`] (a panic elsewhere does not poison it for the
    /// others).
    pub(crate) state: Mutex<Rma>,
    /// Serialises posting, so that batches reach the QPs in the order they were planned (their
    /// work-request ids count up, and RC completes them in posted order). Taken before
    /// `state`, never while holding it.
    posting: Mutex<Batch>,
    /// Wakes the connection's posting thread; `None` when whoever submits or completes posts.
    kick: Option<SyncSender<()>>,
}

impl RmaShared {
    /// `kick` wakes the posting thread, if there is one.
    pub(crate) fn new(rma: Rma, kick: Option<SyncSender<()>>) -> RmaShared {
        let batch = Batch::new(rma.send_depth, rma.rails.len());
        RmaShared {
            state: Mutex::new(rma),
            posting: Mutex::new(batch),
            kick,
        }
    }

    /// Whether operations wait to be posted.
    pub(crate) fn queued(&self) -> bool {
        !lock(&self.state).queue.is_empty()
    }

    /// Has the posting thread post what is queued: `true` when it was woken (or already had
    /// a wake-up pending), `false` when there is no thread (or it is gone) and the caller must
    /// post ([`RmaShared::post`]).
    pub(crate) fn kick(&self) -> bool {
        match &self.kick {
            // Full: a wake-up is pending already, and the post it leads to plans this work too
            // (the thread takes the wake-up before it plans).
            Some(k) => !matches!(k.try_send(()), Err(TrySendError::Disconnected(_))),
            None => false,
        }
    }

    /// Posts the pieces that fit now: planned and booked under the state's lock, posted
    /// outside it (one `ibv_post_send` per rail). `Err` when the device refused (the caller
    /// fails the connection; the pieces not posted are settled as failed). The caller keeps
    /// the connection alive meanwhile, so its QPs are.
    pub(crate) fn post(&self) -> io::Result<()> {
        let mut batch = lock(&self.posting);
        lock(&self.state).plan(&mut batch);
        for r in 0..batch.rails.len() {
            let Err((posted, rc)) = batch.post_rail(r) else {
                continue;
            };
            let mut st = lock(&self.state);
            let k = batch.rails[r].rail;
            let e = rc_err(
                rc,
                format!(
                    "posting one-sided operations to {} on {}",
                    st.remote,
                    st.rails[k].name()
                ),
            );
            st.take_back(k, batch.rails[r].count - posted, &e);
            // The later rails' pieces never go.
            let later = io::Error::other("an earlier rail's post failed");
            for b in &batch.rails[r + 1..] {
                st.take_back(b.rail, b.count, &later);
            }
            return Err(e);
        }
        if batch.rails.iter().any(|b| b.was_idle) {
            // The stall clock of a rail idle when these were planned starts now that they are
            // posted: a posting thread kept off the CPU is not a silent link.
            let mut st = lock(&self.state);
            let now = Instant::now();
            for b in batch.rails.iter().filter(|b| b.was_idle) {
                st.rails[b.rail].progress = now;
            }
        }
        Ok(())
    }
}
