//! Queue-pair primitives the connection's set-up, its data path, its one-sided operations and
//! the memory-window binder share: creating an RC QP's attributes, the state transitions
//! (RESET -> INIT -> RTR -> RTS) along a [`PathSpec`], a completion channel's fd for tokio,
//! polling a CQ and reading its completions, chaining send work requests, and the errors of
//! verbs calls and failed completions. Nothing here knows of connections: these are the verbs
//! calls, each with its safety argument in one place.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use rdma_sys::*;
use tokio::io::unix::AsyncFd;

use crate::params::{self, LinkLayer};

/// Creation attributes of an RC QP completing on `cq` (sends and receives), signalling chosen
/// per WR.
pub(crate) fn rc_qp_attr(
    cq: *mut ibv_cq,
    send_wr: u32,
    recv_wr: u32,
    send_sge: u32,
    inline: u32,
) -> ibv_qp_init_attr {
    // SAFETY: all-zero is a valid ibv_qp_init_attr (null pointers, zero capacities).
    let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
    init.send_cq = cq;
    init.recv_cq = cq;
    init.qp_type = ibv_qp_type::IBV_QPT_RC;
    init.sq_sig_all = 0;
    init.cap.max_send_wr = send_wr;
    init.cap.max_recv_wr = recv_wr;
    init.cap.max_send_sge = send_sge;
    init.cap.max_recv_sge = 1;
    init.cap.max_inline_data = inline;
    init
}

/// The last OS error, prefixed with what failed.
pub(crate) fn os_err(what: impl std::fmt::Display) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A verbs call's error: `rc` when it is an errno (positive), else the last OS error; prefixed
/// with what failed.
pub(crate) fn rc_err(rc: i32, what: impl std::fmt::Display) -> io::Error {
    let e = if rc > 0 {
        io::Error::from_raw_os_error(rc)
    } else {
        io::Error::last_os_error()
    };
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Moves a new QP from RESET to INIT on `port`, with remote read and write access.
pub(crate) fn to_init(qp: *mut ibv_qp, port: u8, device: &str) -> io::Result<()> {
    // SAFETY: zeroed attrs are valid; the QP is valid.
    unsafe {
        let mut a: ibv_qp_attr = std::mem::zeroed();
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        let rc = ibv_modify_qp(qp, &mut a, mask.0 as i32);
        if rc != 0 {
            return Err(rc_err(rc, format!("cannot move a QP on {device} to INIT")));
        }
    }
    Ok(())
}

/// What moving a QP to RTR and RTS towards its peer takes: the local port and GID, the path to
/// the peer, and the negotiated timers and depths.
#[derive(Clone, Copy)]
pub(crate) struct PathSpec {
    pub(crate) port: u8,
    pub(crate) gid_index: u8,
    pub(crate) link_layer: LinkLayer,
    /// `ibv_mtu` code.
    pub(crate) path_mtu: u8,
    pub(crate) remote_lid: u16,
    pub(crate) remote_gid: params::Gid,
    /// READs the peer may have in flight towards this end (this device's limit).
    pub(crate) reads_in: u8,
    /// READs this end may have in flight (the peer's limit and this device's).
    pub(crate) reads_out: u8,
    pub(crate) min_rnr_timer: u8,
    pub(crate) timeout: u8,
    pub(crate) retry_cnt: u8,
    pub(crate) rnr_retry: u8,
}

/// One QP INIT -> RTR -> RTS towards `dest_qpn` along `p`.
pub(crate) fn connect_one(
    qp: *mut ibv_qp,
    dest_qpn: u32,
    rq_psn: u32,
    sq_psn: u32,
    p: &PathSpec,
) -> io::Result<()> {
    // SAFETY: zeroed attrs are valid; qp is valid.
    unsafe {
        let mut a: ibv_qp_attr = std::mem::zeroed();
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = u32::from(p.path_mtu);
        a.dest_qp_num = dest_qpn;
        a.rq_psn = rq_psn;
        // As many READs in flight from the peer as this device takes (and said it would).
        a.max_dest_rd_atomic = p.reads_in;
        a.min_rnr_timer = p.min_rnr_timer;
        a.ah_attr.port_num = p.port;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.dlid = p.remote_lid;
        if p.link_layer == LinkLayer::Ethernet || !p.remote_gid.is_zero() {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid.raw = p.remote_gid.0;
            a.ah_attr.grh.sgid_index = p.gid_index;
            a.ah_attr.grh.hop_limit = 64;
            a.ah_attr.grh.traffic_class = 0;
            a.ah_attr.grh.flow_label = 0;
        }
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        let rc = ibv_modify_qp(qp, &mut a, mask.0 as i32);
        if rc != 0 {
            return Err(rc_err(
                rc,
                format!(
                    "cannot move the QP to RTR (path MTU {}, remote GID {}, local GID index \
                     {}): wrong GID index or unreachable peer",
                    params::mtu_bytes(p.path_mtu),
                    p.remote_gid,
                    p.gid_index
                ),
            ));
        }
        let mut a: ibv_qp_attr = std::mem::zeroed();
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = p.timeout;
        a.retry_cnt = p.retry_cnt;
        a.rnr_retry = p.rnr_retry;
        a.sq_psn = sq_psn;
        a.max_rd_atomic = p.reads_out;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        let rc = ibv_modify_qp(qp, &mut a, mask.0 as i32);
        if rc != 0 {
            return Err(rc_err(rc, "cannot move the QP to RTS"));
        }
    }
    Ok(())
}

/// The completion channel's fd, for `AsyncFd` (not owned: the channel closes it).
pub(crate) struct ChannelFd(RawFd);
impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A completion channel's fd, made non-blocking (how it is meant to be polled) and registered
/// with tokio.
///
/// # Safety
///
/// `channel` is valid, and outlives the returned `AsyncFd`.
pub(crate) unsafe fn channel_fd(channel: *mut ibv_comp_channel) -> io::Result<AsyncFd<ChannelFd>> {
    // SAFETY: the caller's contract; fcntl on the channel's own fd.
    unsafe {
        let fd = (*channel).fd;
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(os_err("making a completion channel non-blocking"));
        }
        Ok(AsyncFd::register_with_interest(
            ChannelFd(fd),
            tokio::io::Interest::READABLE,
        )?)
    }
}

/// Takes (and acknowledges) the event waiting on `channel`, if any; returns whether there was
/// one. One read, not a read until `EAGAIN`: each channel serves one CQ, and an armed CQ raises
/// at most one event per arming, so after one event the channel stays empty until the CQ is
/// armed again, and a second read would only cost a system call per wake-up to learn so. The
/// channel's fd is edge-triggered in the reactor; the next event, after the next arming, is a
/// new edge.
///
/// # Safety
///
/// `channel` is valid and non-blocking.
pub(crate) unsafe fn take_cq_event(channel: *mut ibv_comp_channel) -> bool {
    let (mut cq, mut ctx) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: the caller's contract; one event got, one acknowledged.
    unsafe {
        if ibv_get_cq_event(channel, &mut cq, &mut ctx) != 0 {
            return false;
        }
        ibv_ack_cq_events(cq, 1);
    }
    true
}

/// Polls up to `wcs.capacity()` completions of `cq` into `wcs`; negative on failure.
pub(crate) fn poll_cq(cq: *mut ibv_cq, wcs: &mut Vec<ibv_wc>) -> i32 {
    wcs.clear();
    // SAFETY: the CQ is valid while its connection lives (the callers hold it); wcs has room for
    // its capacity, and poll_cq writes at most that many.
    let n = unsafe { ibv_poll_cq(cq, wcs.capacity() as i32, wcs.as_mut_ptr()) };
    if n > 0 {
        // SAFETY: poll_cq initialised the first n entries.
        unsafe { wcs.set_len(n as usize) };
    }
    n
}

/// A completion's immediate data, when it carried some.
pub(crate) fn wc_imm(wc: &ibv_wc) -> Option<u32> {
    (wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0)
        // SAFETY: reading a u32 union member.
        .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }))
}

/// Links `wrs` into one list for a single `ibv_post_send` (each points at the next; the last
/// keeps its null `next`). The pointers are valid while `wrs` is neither moved nor grown.
pub(crate) fn chain_send_wrs(wrs: &mut [ibv_send_wr]) {
    for k in 1..wrs.len() {
        let next: *mut ibv_send_wr = &mut wrs[k];
        wrs[k - 1].next = next;
    }
}

/// The verbs library's name for completion status `status`.
fn status_text(status: u32) -> String {
    // SAFETY: returns a static string.
    unsafe { CStr::from_ptr(ibv_wc_status_str(status)) }
        .to_string_lossy()
        .into_owned()
}

/// A failed completion's `status` as an error kind and a message that names `remote` and the
/// likely cause.
pub(crate) fn explain_status(status: u32, remote: &str) -> (io::ErrorKind, String) {
    let text = status_text(status);
    match status {
        ibv_wc_status::IBV_WC_RETRY_EXC_ERR => (
            io::ErrorKind::TimedOut,
            format!(
                "RDMA transport retries exhausted towards {remote} ({text}): the peer died, the \
                 link is down, or its GID is unreachable from here (wrong GID index?)"
            ),
        ),
        ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => (
            io::ErrorKind::TimedOut,
            format!("receiver-not-ready retries exhausted towards {remote} ({text})"),
        ),
        ibv_wc_status::IBV_WC_WR_FLUSH_ERR => (
            io::ErrorKind::ConnectionAborted,
            format!("the QP to {remote} went to the error state ({text})"),
        ),
        ibv_wc_status::IBV_WC_REM_ACCESS_ERR => (
            io::ErrorKind::PermissionDenied,
            format!(
                "{remote} refused a one-sided access ({text}): the region was revoked, or the \
                 key or range is not its registration's"
            ),
        ),
        _ => (
            io::ErrorKind::ConnectionAborted,
            format!("RDMA work request to {remote} failed: {text} (status {status})"),
        ),
    }
}
