//! The verbs objects of one lane's frames QP: its completion channel and CQ, the QP (and, on
//! the latency lane, the connection's one-sided QP beside it), its registered receive buffers
//! and send slots. Here: creating them, the order they are freed in, posting the receive
//! buffers, and what set-up asks of them (this end's QP parameters, the QPs to RTS). The data
//! path (`datapath.rs`) uses them; the set-up (`establish.rs`) makes and connects them.

use std::io;
use std::sync::Arc;

use rdma_sys::*;

use crate::config::VerbsConfig;
use crate::device::Context;
use crate::one_sided::create_rma_qp;
use crate::params::{self, GidType, LinkLayer, Negotiated, QpParams};
use crate::qp::{connect_one, os_err, rc_err, rc_qp_attr, to_init, PathSpec};

/// The verbs objects of one connection. Dropping it destroys the QP first (after which the
/// device has no work request of it in flight), then deregisters the memory, then destroys the
/// CQ and the completion channel; the buffers themselves are freed after that (fields drop
/// after `Drop::drop`), and the device context last (its `Arc`). No safe code can reach the
/// buffers while this lives except through [`Resources`]'s own methods (the data path reads a
/// received frame through [`Resources::received`], and copies frames into the send slots at
/// [`Resources::send_slots`] only while it has booked them).
pub(crate) struct Resources {
    channel: *mut ibv_comp_channel,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    /// The second QP: one-sided operations only. Its receive queue holds [`RMA_RECVS`] empty
    /// receives, each consumed by a peer's RDMA WRITE with immediate (plain WRITE and READ
    /// consume none). Null on a bulk lane's resources (see `lanes.rs`).
    ///
    /// [`RMA_RECVS`]: crate::one_sided::RMA_RECVS
    rma_qp: *mut ibv_qp,
    recv_mr: *mut ibv_mr,
    send_mr: *mut ibv_mr,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
    buf_size: usize,
    port: u8,
    gid_index: u8,
    max_inline: u32,
    dev: Arc<Context>,
}

// SAFETY: the verbs handles are thread-safe; the buffers are only touched under the connection's
// mutex (and by the device, for posted work requests).
unsafe impl Send for Resources {}

impl Drop for Resources {
    fn drop(&mut self) {
        // SAFETY: each handle is null or valid and owned here; the order keeps the device from
        // touching freed memory: the QP goes first (no WR in flight after it is destroyed).
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            if !self.rma_qp.is_null() {
                ibv_destroy_qp(self.rma_qp);
            }
            if !self.recv_mr.is_null() {
                ibv_dereg_mr(self.recv_mr);
            }
            if !self.send_mr.is_null() {
                ibv_dereg_mr(self.send_mr);
            }
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
        }
    }
}

impl Resources {
    /// The connection's resources; its one-sided QP completes on `rma_cq` (see
    /// [`RmaCq`](crate::one_sided::RmaCq)), which must outlive them. Without `rma_cq`, a
    /// frames-only QP (a bulk lane's).
    pub(crate) fn new(
        dev: Arc<Context>,
        port: u8,
        gid_index: u8,
        cfg: &VerbsConfig,
        rma_cq: Option<*mut ibv_cq>,
    ) -> io::Result<Self> {
        let buf_size = cfg.recv_buffer_size;
        let mut r = Resources {
            channel: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            qp: std::ptr::null_mut(),
            rma_qp: std::ptr::null_mut(),
            recv_mr: std::ptr::null_mut(),
            send_mr: std::ptr::null_mut(),
            recv_buf: vec![0u8; buf_size * cfg.recv_depth as usize],
            send_buf: vec![0u8; buf_size * cfg.send_depth as usize],
            buf_size,
            port,
            gid_index,
            max_inline: 0,
            dev,
        };
        let name = r.dev.name.clone();
        // SAFETY: the context is open; each result is checked and owned by `r` (freed by Drop).
        unsafe {
            r.channel = ibv_create_comp_channel(r.dev.ctx);
            if r.channel.is_null() {
                return Err(os_err(format!(
                    "cannot create a completion channel on {name}"
                )));
            }
            let cqe = (cfg.send_depth + cfg.recv_depth + 1) as i32;
            r.cq = ibv_create_cq(r.dev.ctx, cqe, std::ptr::null_mut(), r.channel, 0);
            if r.cq.is_null() {
                return Err(os_err(format!(
                    "cannot create a CQ of {cqe} entries on {name}"
                )));
            }
            let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32;
            r.recv_mr = ibv_reg_mr(
                r.dev.pd,
                r.recv_buf.as_mut_ptr().cast(),
                r.recv_buf.len(),
                access,
            );
            if r.recv_mr.is_null() {
                return Err(os_err(format!(
                    "cannot register {} bytes of receive buffers on {name} (locked-memory \
                     limit? see ulimit -l)",
                    r.recv_buf.len()
                )));
            }
            r.send_mr = ibv_reg_mr(
                r.dev.pd,
                r.send_buf.as_mut_ptr().cast(),
                r.send_buf.len(),
                access,
            );
            if r.send_mr.is_null() {
                return Err(os_err(format!(
                    "cannot register {} bytes of send buffers on {name}",
                    r.send_buf.len()
                )));
            }
            // Ask for the configured inline size; fall back to smaller ones the device accepts.
            let mut last = None;
            for inline in [cfg.max_inline, 128, 64, 0] {
                if inline > cfg.max_inline {
                    continue;
                }
                let mut init = rc_qp_attr(r.cq, cfg.send_depth, cfg.recv_depth, 2, inline);
                let qp = ibv_create_qp(r.dev.pd, &mut init);
                if !qp.is_null() {
                    r.qp = qp;
                    r.max_inline = init.cap.max_inline_data;
                    break;
                }
                last = Some(io::Error::last_os_error());
            }
            if r.qp.is_null() {
                let e = last.unwrap_or_else(|| io::Error::other("unknown"));
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create an RC QP on {name} (send depth {}, receive depth {}): {e}",
                        cfg.send_depth, cfg.recv_depth
                    ),
                ));
            }
            to_init(r.qp, port, &name)?;
        }
        if let Some(rma_cq) = rma_cq {
            r.rma_qp = create_rma_qp(&r.dev, port, rma_cq, cfg.send_depth)?;
        }
        Ok(r)
    }

    /// A frames-only QP's resources beside these (same device, port and GID index), with
    /// every receive buffer posted: a bulk lane's (see `lanes.rs`).
    pub(crate) fn sibling(&self, cfg: &VerbsConfig) -> io::Result<Resources> {
        let mut r = Resources::new(self.dev.clone(), self.port, self.gid_index, cfg, None)?;
        r.post_all_recvs(cfg)?;
        Ok(r)
    }

    /// Posts every receive buffer (a new QP's).
    pub(crate) fn post_all_recvs(&mut self, cfg: &VerbsConfig) -> io::Result<()> {
        let all: Vec<u32> = (0..cfg.recv_depth).collect();
        let (mut rw, mut rs) = (Vec::new(), Vec::new());
        self.post_recvs(&all, &mut rw, &mut rs)
    }

    /// The frames QP.
    pub(crate) fn qp(&self) -> *mut ibv_qp {
        self.qp
    }

    /// The frames QP's completion queue (its sends and its receives).
    pub(crate) fn cq(&self) -> *mut ibv_cq {
        self.cq
    }

    /// The completion channel the CQ reports to.
    pub(crate) fn channel(&self) -> *mut ibv_comp_channel {
        self.channel
    }

    /// The one-sided QP; null on a bulk lane's resources.
    pub(crate) fn rma_qp(&self) -> *mut ibv_qp {
        self.rma_qp
    }

    /// The device.
    pub(crate) fn dev(&self) -> &Arc<Context> {
        &self.dev
    }

    /// Bytes per receive buffer, and per send slot.
    pub(crate) fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// The largest frame the QP sends inline (what the device granted).
    pub(crate) fn max_inline(&self) -> u32 {
        self.max_inline
    }

    /// The first `len` bytes (at most a buffer's) of receive buffer `i`, whose receive
    /// completed: the device no longer writes it until it is posted again.
    pub(crate) fn received(&self, i: usize, len: usize) -> &[u8] {
        let at = i * self.buf_size;
        &self.recv_buf[at..at + len.min(self.buf_size)]
    }

    /// The local key of the send slots' registration.
    pub(crate) fn send_lkey(&self) -> u32 {
        // SAFETY: send_mr is valid.
        unsafe { (*self.send_mr).lkey }
    }

    /// The send slots' memory: `send_depth` slots of [`Resources::buf_size`] bytes, registered.
    pub(crate) fn send_slots(&mut self) -> *mut u8 {
        self.send_buf.as_mut_ptr()
    }

    fn qpn(&self) -> u32 {
        // SAFETY: qp is valid.
        unsafe { (*self.qp).qp_num }
    }

    /// Posts receive buffers `idx` (one WR each, one call).
    pub(crate) fn post_recvs(
        &mut self,
        idx: &[u32],
        wrs: &mut Vec<ibv_recv_wr>,
        sges: &mut Vec<ibv_sge>,
    ) -> io::Result<()> {
        if idx.is_empty() {
            return Ok(());
        }
        wrs.clear();
        sges.clear();
        // SAFETY: recv_mr is valid.
        let lkey = unsafe { (*self.recv_mr).lkey };
        for &i in idx {
            sges.push(ibv_sge {
                addr: self.recv_buf.as_ptr() as u64 + (i as u64) * self.buf_size as u64,
                length: self.buf_size as u32,
                lkey,
            });
        }
        for (k, &i) in idx.iter().enumerate() {
            wrs.push(ibv_recv_wr {
                wr_id: u64::from(i),
                next: std::ptr::null_mut(),
                sg_list: &mut sges[k],
                num_sge: 1,
            });
        }
        let n = wrs.len();
        for k in 0..n - 1 {
            let next: *mut ibv_recv_wr = &mut wrs[k + 1];
            wrs[k].next = next;
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: the WRs and SGEs live until the call returns; the buffers they name live as
        // long as the QP (see Drop).
        let rc = unsafe { ibv_post_recv(self.qp, wrs.as_mut_ptr(), &mut bad) };
        if rc != 0 {
            return Err(rc_err(rc, "cannot post receive buffers"));
        }
        Ok(())
    }

    pub(crate) fn local_params(&self, cfg: &VerbsConfig) -> io::Result<QpParams> {
        let attr = self.dev.query_port(self.port)?;
        let link_layer = LinkLayer::from_u8(attr.link_layer);
        let gid = self.dev.query_gid(self.port, self.gid_index)?;
        Ok(QpParams {
            version: params::PROTOCOL_VERSION,
            qpn: self.qpn(),
            psn: rand::random::<u32>() & 0x00ff_ffff,
            rma_qpn: if self.rma_qp.is_null() {
                0
            } else {
                // SAFETY: rma_qp is valid.
                unsafe { (*self.rma_qp).qp_num }
            },
            rma_psn: rand::random::<u32>() & 0x00ff_ffff,
            lid: attr.lid,
            gid,
            gid_index: self.gid_index,
            gid_type: if link_layer == LinkLayer::Ethernet {
                self.dev.gid_type(self.port, self.gid_index)
            } else {
                GidType::Unknown
            },
            link_layer,
            active_mtu: attr.active_mtu as u8,
            required_mtu: cfg.mtu.and_then(params::mtu_code).unwrap_or(0),
            min_rnr_timer: cfg.min_rnr_timer,
            retry_cnt: cfg.retry_count,
            rnr_retry: cfg.rnr_retry,
            timeout: cfg.ack_timeout,
            recv_depth: cfg.recv_depth,
            recv_buf_size: cfg.recv_buffer_size as u32,
            send_depth: cfg.send_depth,
            reads_in: self.dev.reads_in,
            device: self.dev.name.clone(),
            port: self.port,
        })
    }

    /// Both QPs (the frames' one only, on a bulk lane) INIT -> RTR -> RTS towards their peers
    /// on `remote`.
    pub(crate) fn connect_qp(
        &mut self,
        local: &QpParams,
        remote: &QpParams,
        n: &Negotiated,
    ) -> io::Result<()> {
        let spec = self.path(local, remote, n);
        connect_one(self.qp, remote.qpn, remote.psn, local.psn, &spec)?;
        if !self.rma_qp.is_null() {
            connect_one(
                self.rma_qp,
                remote.rma_qpn,
                remote.rma_psn,
                local.rma_psn,
                &spec,
            )?;
        }
        Ok(())
    }

    /// The path and timers of this connection's QPs towards `remote`.
    pub(crate) fn path(&self, local: &QpParams, remote: &QpParams, n: &Negotiated) -> PathSpec {
        PathSpec {
            port: self.port,
            gid_index: self.gid_index,
            link_layer: local.link_layer,
            path_mtu: n.path_mtu,
            remote_lid: remote.lid,
            remote_gid: remote.gid,
            reads_in: local.reads_in,
            // No more READs in flight than the peer's device takes, or this one issues: with
            // one, a pulled block moves one piece per round trip.
            reads_out: remote.reads_in.min(self.dev.reads_out),
            min_rnr_timer: local.min_rnr_timer,
            timeout: local.timeout,
            retry_cnt: local.retry_cnt,
            rnr_retry: local.rnr_retry,
        }
    }
}
