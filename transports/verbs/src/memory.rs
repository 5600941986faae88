//! Memory registration for one-sided operations: the transport's [`MemoryDomain`] is the
//! protection domain of one device, and a registration is a memory region (MR) in it that peers
//! may read and write with its remote key.
//!
//! Where the device has memory windows (and [`VerbsConfig::memory_windows`] is on), the MR
//! grants local access only and a window bound over it carries the remote key (see
//! [`crate::window`]): revoking a region then withdraws the key and keeps the MR, so the same
//! buffer registers again for the price of a new window. Otherwise the MR itself carries the
//! remote key, and revoking deregisters it.
//!
//! [`VerbsConfig::memory_windows`]: crate::VerbsConfig::memory_windows

use std::io;
use std::sync::Arc;

use agentfabric::transport::{MemoryDomain, MemoryRegistration};
use rdma_sys::*;

use crate::device::Context;
use crate::window::Window;

/// The protection domain of one open device. Connections on the same device (the same
/// [`Context`]) reach what is registered here.
pub(crate) struct VerbsDomain {
    pub(crate) dev: Arc<Context>,
    /// Give registrations their remote key through memory windows, where the device can.
    pub(crate) windows: bool,
}

/// The domain id of a device: connections compare theirs with it.
pub(crate) fn domain_id(dev: &Arc<Context>) -> u64 {
    Arc::as_ptr(dev) as u64
}

/// Registers `len` bytes at `addr` with `access`.
///
/// # Safety
///
/// The memory must stay allocated until the MR is deregistered.
unsafe fn reg_mr(
    dev: &Context,
    addr: *mut u8,
    len: usize,
    access: ibv_access_flags,
) -> io::Result<*mut ibv_mr> {
    // SAFETY: the PD is open while `dev` lives; the caller keeps the memory allocated.
    let mr = unsafe { ibv_reg_mr(dev.pd, addr.cast(), len, access.0 as i32) };
    if mr.is_null() {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "cannot register {len} bytes for one-sided access on {}: {e} (locked-memory \
                 limit? see ulimit -l)",
                dev.name
            ),
        ));
    }
    Ok(mr)
}

impl VerbsDomain {
    /// An MR for local access and window binding, with a window over it for remote access.
    ///
    /// # Safety
    ///
    /// As [`MemoryDomain::register`].
    unsafe fn register_windowed(&self, addr: *mut u8, len: usize) -> io::Result<VerbsRegistration> {
        let binder = self.dev.binder().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} cannot bind memory windows", self.dev.name),
            )
        })?;
        let access =
            ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_MW_BIND;
        // SAFETY: as the caller promises.
        let mr = unsafe { reg_mr(&self.dev, addr, len, access)? };
        let mut reg = VerbsRegistration {
            mr,
            window: None,
            windowed: true,
            dev: self.dev.clone(),
        };
        // SAFETY: the MR is live, in the binder's PD, with the access a window needs; the
        // registration drops the window before the MR.
        reg.window = Some(unsafe { binder.bind(&self.dev, mr)? });
        Ok(reg)
    }
}

impl MemoryDomain for VerbsDomain {
    fn id(&self) -> u64 {
        domain_id(&self.dev)
    }

    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
    ) -> io::Result<Box<dyn MemoryRegistration>> {
        if self.windows {
            // SAFETY: as the caller promises.
            match unsafe { self.register_windowed(addr, len) } {
                Ok(reg) => return Ok(Box::new(reg)),
                Err(e) => tracing::debug!(
                    device = %self.dev.name,
                    error = %e,
                    "no memory window: the registration carries the remote key itself"
                ),
            }
        }
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        // SAFETY: as the caller promises.
        let mr = unsafe { reg_mr(&self.dev, addr, len, access)? };
        Ok(Box::new(VerbsRegistration {
            mr,
            window: None,
            windowed: false,
            dev: self.dev.clone(),
        }))
    }
}

/// One MR, and the window that carries its remote key when it has one. Dropping it deallocates
/// the window and deregisters the MR: the device refuses its keys from then on (a peer's
/// operation with them fails with a remote access error), and no longer touches the memory.
struct VerbsRegistration {
    mr: *mut ibv_mr,
    /// The current share's window (windowed registrations between `grant` and `withdraw`).
    window: Option<Window>,
    /// The MR grants local access only; remote keys come from windows.
    windowed: bool,
    /// Keeps the PD (and the binder) alive while the MR lives.
    dev: Arc<Context>,
}

// SAFETY: an MR handle is usable from any thread; its keys are plain values.
unsafe impl Send for VerbsRegistration {}
// SAFETY: as above; `&self` methods only read.
unsafe impl Sync for VerbsRegistration {}

impl MemoryRegistration for VerbsRegistration {
    fn local_key(&self) -> u32 {
        // SAFETY: the MR is valid until drop.
        unsafe { (*self.mr).lkey }
    }

    fn remote_key(&self) -> u32 {
        match (&self.window, self.windowed) {
            (Some(w), _) => w.rkey(),
            // Withdrawn: a key no device hands out for remote access.
            (None, true) => 0,
            // SAFETY: the MR is valid until drop.
            (None, false) => unsafe { (*self.mr).rkey },
        }
    }

    fn withdraw(&mut self) -> io::Result<()> {
        if !self.windowed {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the registration carries its remote key itself: only deregistering withdraws \
                 it",
            ));
        }
        // Deallocating the window makes the device refuse its key.
        match self.window.take() {
            Some(w) => w.dealloc(),
            None => Ok(()),
        }
    }

    fn grant(&mut self) -> io::Result<()> {
        if !self.windowed {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the registration carries its remote key itself",
            ));
        }
        drop(self.window.take());
        let binder = self.dev.binder().ok_or_else(|| {
            io::Error::other(format!("{} cannot bind memory windows", self.dev.name))
        })?;
        // SAFETY: the MR is live, windowed (bind access), in the binder's PD; the window is
        // dropped before the MR (Drop).
        self.window = Some(unsafe { binder.bind(&self.dev, self.mr)? });
        Ok(())
    }
}

impl Drop for VerbsRegistration {
    fn drop(&mut self) {
        // The device refuses to deregister an MR with a window bound to it.
        drop(self.window.take());
        // SAFETY: the MR is valid and owned here; after this returns the device no longer
        // accesses its memory.
        let rc = unsafe { ibv_dereg_mr(self.mr) };
        if rc != 0 {
            tracing::warn!(rc, device = %self.dev.name, "cannot deregister a memory region");
        }
    }
}
