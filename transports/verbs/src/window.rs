//! Memory windows: one registration (MR) of a buffer, a new remote key each time it is shared.
//!
//! Why: revoking a region must make its remote key useless at once. Deregistering the MR does
//! that, but sharing the same buffer again then costs a new registration, which pins every page
//! again (milliseconds for a large KV-cache pool). Here the MR grants local access only, and a
//! type 1 memory window bound over the whole MR carries the remote key: deallocating the window
//! withdraws the key, and a new window bound to the same MR grants a new one, while the MR and
//! its pinned pages stay.
//!
//! Binding a type 1 window is a work request on a QP in RTS of the same protection domain. Each
//! device keeps one RC QP connected to itself for that ([`Binder`]): a bind is a local operation
//! and never goes on the wire.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentfabric::sync::lock;
use rdma_sys::*;

use crate::params::{Gid, LinkLayer};
use crate::qp::{connect_one, os_err, rc_err, to_init, PathSpec};

/// How long a bind may take before the binder is given up: binds complete in microseconds, so
/// a longer wait means the device or its driver is stuck.
const BIND_TIMEOUT: Duration = Duration::from_secs(2);

/// A type 1 memory window: the remote key of one share of an MR. Deallocated on drop, after
/// which the device refuses its key.
pub(crate) struct Window {
    mw: *mut ibv_mw,
    rkey: u32,
}

// SAFETY: an MW handle is usable from any thread; its key is a plain value.
unsafe impl Send for Window {}
// SAFETY: as above; nothing is mutated after creation.
unsafe impl Sync for Window {}

impl Window {
    /// The window's remote key.
    pub(crate) fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Deallocates the window: from when this returns the device refuses its key. On failure
    /// the key may still be honoured, and the caller must not count it withdrawn.
    pub(crate) fn dealloc(self) -> io::Result<()> {
        let window = std::mem::ManuallyDrop::new(self);
        // SAFETY: the MW is valid and owned here, and not deallocated again (no Drop); its PD
        // outlives it (the registration holding the window holds the device).
        let rc = unsafe { ibv_dealloc_mw(window.mw) };
        if rc != 0 {
            return Err(rc_err(rc, "cannot deallocate a memory window"));
        }
        Ok(())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: as in `dealloc`.
        let rc = unsafe { ibv_dealloc_mw(self.mw) };
        if rc != 0 {
            tracing::warn!(rc, "cannot deallocate a memory window");
        }
    }
}

/// The QP and CQ a device binds memory windows on: an RC QP connected to itself (a bind needs a
/// QP in RTS), its CQ polled by the binding thread. One bind at a time.
///
/// It holds its device's PD and name rather than the device, so that this file needs nothing
/// of `device.rs` (the device makes its binder at the first use and keeps it).
pub(crate) struct Binder {
    state: Mutex<BinderState>,
    /// The device's protection domain: windows are allocated in it.
    pd: *mut ibv_pd,
    /// The device's name, for errors.
    name: String,
}

struct BinderState {
    qp: *mut ibv_qp,
    cq: *mut ibv_cq,
    /// Set when a bind failed in a way that leaves the QP unusable (an error completion moves
    /// an RC QP to the error state; a lost completion leaves it unknown).
    broken: Option<String>,
}

// SAFETY: QP, CQ and PD handles are usable from any thread; all use of the QP and CQ is under
// the mutex.
unsafe impl Send for Binder {}
// SAFETY: as above.
unsafe impl Sync for Binder {}

impl Binder {
    /// The binder of the device `name` (context `ctx`, protection domain `pd`): creates its QP
    /// and CQ and connects the QP to itself on `port` (an ACTIVE one, whose attributes are
    /// `attr`), through GID `gid` at `gid_index`.
    ///
    /// # Safety
    ///
    /// `ctx` and `pd` are open, and the binder is dropped before `pd` is deallocated.
    pub(crate) unsafe fn new(
        ctx: *mut ibv_context,
        pd: *mut ibv_pd,
        name: &str,
        port: u8,
        gid_index: u8,
        gid: Gid,
        attr: &ibv_port_attr,
    ) -> io::Result<Binder> {
        // SAFETY: the context and PD are open (the caller's contract); each handle is checked
        // and owned by `state` (destroyed by its Drop, also on the error paths below).
        unsafe {
            let cq = ibv_create_cq(ctx, 4, std::ptr::null_mut(), std::ptr::null_mut(), 0);
            if cq.is_null() {
                return Err(os_err(format!("cannot create the binding CQ on {name}")));
            }
            let mut state = BinderState {
                qp: std::ptr::null_mut(),
                cq,
                broken: None,
            };
            let mut init: ibv_qp_init_attr = std::mem::zeroed();
            init.send_cq = cq;
            init.recv_cq = cq;
            init.qp_type = ibv_qp_type::IBV_QPT_RC;
            init.cap.max_send_wr = 2;
            init.cap.max_recv_wr = 1;
            init.cap.max_send_sge = 1;
            init.cap.max_recv_sge = 1;
            state.qp = ibv_create_qp(pd, &mut init);
            if state.qp.is_null() {
                return Err(os_err(format!("cannot create the binding QP on {name}")));
            }
            let qpn = (*state.qp).qp_num;

            // Connected to itself: nothing is ever sent, but RTS needs a destination.
            let spec = PathSpec {
                port,
                gid_index,
                link_layer: LinkLayer::from_u8(attr.link_layer),
                path_mtu: attr.active_mtu as u8,
                remote_lid: attr.lid,
                remote_gid: gid,
                reads_in: 0,
                reads_out: 0,
                min_rnr_timer: 12,
                timeout: 14,
                retry_cnt: 7,
                rnr_retry: 7,
            };
            to_init(state.qp, port, name)
                .and_then(|()| connect_one(state.qp, qpn, 0, 0, &spec))
                .map_err(|e| io::Error::new(e.kind(), format!("the binding QP on {name}: {e}")))?;
            Ok(Binder {
                state: Mutex::new(state),
                pd,
                name: name.to_owned(),
            })
        }
    }

    /// A new window over the whole of `mr`, for remote reads and writes, bound and ready: its
    /// key works from when this returns.
    ///
    /// # Safety
    ///
    /// `mr` must be a live MR of the binder's PD, registered with `IBV_ACCESS_MW_BIND` and
    /// `IBV_ACCESS_LOCAL_WRITE`, and outlive the window.
    pub(crate) unsafe fn bind(&self, mr: *mut ibv_mr) -> io::Result<Window> {
        let mut state = lock(&self.state);
        if let Some(why) = &state.broken {
            return Err(io::Error::other(format!(
                "memory windows on {} are out of use: {why}",
                self.name
            )));
        }
        // SAFETY: the PD is open (it outlives the binder); the result is checked.
        let mw = match unsafe { ibv_alloc_mw(self.pd, ibv_mw_type::IBV_MW_TYPE_1) } {
            Some(mw) if !mw.is_null() => mw,
            _ => {
                return Err(os_err(format!(
                    "cannot allocate a memory window on {}",
                    self.name
                )))
            }
        };
        // From here the window is deallocated on every early return.
        let mut window = Window { mw, rkey: 0 };
        // SAFETY: the caller vouches for `mr`; zeroed is a valid bind request.
        let mut bind: ibv_mw_bind = unsafe { std::mem::zeroed() };
        bind.wr_id = 1;
        bind.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        // SAFETY: as above.
        unsafe {
            bind.bind_info.mr = mr;
            bind.bind_info.addr = (*mr).addr as u64;
            bind.bind_info.length = (*mr).length as u64;
        }
        bind.bind_info.mw_access_flags = (ibv_access_flags::IBV_ACCESS_REMOTE_READ
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0;
        // SAFETY: the QP is in RTS and owned by the state under the lock; mw and mr are live.
        let rc = unsafe { ibv_bind_mw(state.qp, mw, &mut bind) };
        if rc != 0 {
            return Err(rc_err(
                rc,
                format!("cannot bind a memory window on {}", self.name),
            ));
        }
        let deadline = Instant::now() + BIND_TIMEOUT;
        // SAFETY: zeroed is a valid work completion to fill.
        let mut wc: ibv_wc = unsafe { std::mem::zeroed() };
        let mut spins = 0u32;
        loop {
            // SAFETY: the CQ is live; one entry into `wc`.
            let n = unsafe { ibv_poll_cq(state.cq, 1, &mut wc) };
            if n > 0 {
                break;
            }
            if n < 0 || Instant::now() >= deadline {
                let why = if n < 0 {
                    format!("polling the binding CQ failed ({n})")
                } else {
                    format!("a bind did not complete within {BIND_TIMEOUT:?}")
                };
                state.broken = Some(why.clone());
                // The window may still be referenced by the pending bind: leak it rather than
                // deallocate it under the device.
                std::mem::forget(window);
                return Err(io::Error::new(io::ErrorKind::TimedOut, why));
            }
            // A bind completes in microseconds: spin briefly, then yield the CPU.
            spins += 1;
            if spins > 64 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        }
        if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
            let why = format!(
                "binding a memory window failed with completion status {}",
                wc.status
            );
            // An error completion moves the QP to the error state: later binds would fail too.
            state.broken = Some(why.clone());
            return Err(io::Error::other(why));
        }
        // SAFETY: the provider set the window's new key when the bind was posted.
        window.rkey = unsafe { (*mw).rkey };
        Ok(window)
    }
}

impl Drop for BinderState {
    fn drop(&mut self) {
        // SAFETY: owned handles, the QP before the CQ it completes on.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            ibv_destroy_cq(self.cq);
        }
    }
}
