//! Memory registration for one-sided operations: the transport's [`MemoryDomain`] is the
//! protection domain of its device (and of each rail's, `VerbsConfig::rails`), and a
//! registration is a memory region (MR) in each that peers may read and write with its remote
//! keys (the main device's, and one per rail in [`MemoryRegistration::rail_remote_keys`]).
//!
//! Where the device has memory windows (and [`VerbsConfig::memory_windows`] is on), the MR
//! grants local access only and a window bound over it carries the remote key (see
//! [`crate::window`]): revoking a region then withdraws the key and keeps the MR, so the same
//! buffer registers again for the price of a new window. Otherwise the MR itself carries the
//! remote key, and revoking deregisters it.
//!
//! [`VerbsConfig::memory_windows`]: crate::config::VerbsConfig::memory_windows

use std::io;
use std::sync::Arc;

use agentfabric::transport::{MemoryDomain, MemoryRegistration, RailKeys, MAX_RAILS};
use rdma_sys::*;

use crate::device::Context;
use crate::window::Window;

/// The protection domains of the transport's device and of its rails
/// ([`VerbsConfig::rails`]). Connections on the same devices reach what is registered here.
///
/// [`VerbsConfig::rails`]: crate::config::VerbsConfig::rails
pub(crate) struct VerbsDomain {
    pub(crate) dev: Arc<Context>,
    /// The extra devices one-sided operations spread over, in rail order.
    pub(crate) rails: Vec<Arc<Context>>,
    /// Give registrations their remote key through memory windows, where the device can.
    pub(crate) windows: bool,
}

/// The domain id of a device and its rails: connections compare theirs with it, so a
/// connection reaches a registration only when both span the same devices in the same order.
pub(crate) fn domain_id(dev: &Arc<Context>, rails: &[Arc<Context>]) -> u64 {
    rails.iter().fold(Arc::as_ptr(dev) as u64, |id, r| {
        id.rotate_left(17) ^ (Arc::as_ptr(r) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    })
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

/// An MR on `dev` for local access and window binding, with a window over it for remote
/// access.
///
/// # Safety
///
/// As [`MemoryDomain::register`].
unsafe fn register_windowed(
    dev: &Arc<Context>,
    addr: *mut u8,
    len: usize,
) -> io::Result<DeviceRegistration> {
    let binder = dev.binder().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{} cannot bind memory windows", dev.name),
        )
    })?;
    let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_MW_BIND;
    // SAFETY: as the caller promises.
    let mr = unsafe { reg_mr(dev, addr, len, access)? };
    let mut reg = DeviceRegistration {
        mr,
        window: None,
        windowed: true,
        dev: dev.clone(),
    };
    // SAFETY: the MR is live, in the binder's PD, with the access a window needs; the
    // registration drops the window before the MR.
    reg.window = Some(unsafe { binder.bind(mr)? });
    Ok(reg)
}

/// The memory registered on `dev`: windowed when `windows` and the device can, else an MR that
/// carries the remote key itself.
///
/// # Safety
///
/// As [`MemoryDomain::register`].
unsafe fn register_on(
    dev: &Arc<Context>,
    windows: bool,
    addr: *mut u8,
    len: usize,
) -> io::Result<DeviceRegistration> {
    if windows {
        // SAFETY: as the caller promises.
        match unsafe { register_windowed(dev, addr, len) } {
            Ok(reg) => return Ok(reg),
            Err(e) => tracing::debug!(
                device = %dev.name,
                error = %e,
                "no memory window: the registration carries the remote key itself"
            ),
        }
    }
    let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
        | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
        | ibv_access_flags::IBV_ACCESS_REMOTE_READ;
    // SAFETY: as the caller promises.
    let mr = unsafe { reg_mr(dev, addr, len, access)? };
    Ok(DeviceRegistration {
        mr,
        window: None,
        windowed: false,
        dev: dev.clone(),
    })
}

impl MemoryDomain for VerbsDomain {
    fn id(&self) -> u64 {
        domain_id(&self.dev, &self.rails)
    }

    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
    ) -> io::Result<Box<dyn MemoryRegistration>> {
        // SAFETY (all three): as the caller promises; a registration made before a later one
        // fails is dropped (deregistered) on the way out.
        let main = unsafe { register_on(&self.dev, self.windows, addr, len)? };
        let rails = self
            .rails
            .iter()
            .map(|dev| unsafe { register_on(dev, self.windows, addr, len) })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Box::new(VerbsRegistration { main, rails }))
    }
}

/// A registration on the main device and on each rail.
struct VerbsRegistration {
    main: DeviceRegistration,
    rails: Vec<DeviceRegistration>,
}

impl VerbsRegistration {
    /// `key` of each rail's registration, in rail order (no allocation: the descriptor and
    /// every transfer ask for them).
    fn rail_keys(&self, key: fn(&DeviceRegistration) -> u32) -> RailKeys {
        let mut keys = [0u32; MAX_RAILS];
        for (k, r) in keys.iter_mut().zip(&self.rails) {
            *k = key(r);
        }
        // `LocalPort`s come from `checked_rails`: never more than MAX_RAILS.
        RailKeys::from_slice(&keys[..self.rails.len().min(MAX_RAILS)]).unwrap_or_default()
    }

    fn all(&mut self) -> impl Iterator<Item = &mut DeviceRegistration> {
        std::iter::once(&mut self.main).chain(self.rails.iter_mut())
    }
}

impl MemoryRegistration for VerbsRegistration {
    fn local_key(&self) -> u32 {
        self.main.local_key()
    }

    fn remote_key(&self) -> u32 {
        self.main.remote_key()
    }

    fn withdraw(&mut self) -> io::Result<()> {
        // Every device's key goes, even when one of them fails (the caller then drops it all).
        let mut first = Ok(());
        for reg in self.all() {
            let r = reg.withdraw();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn grant(&mut self) -> io::Result<()> {
        self.all().try_for_each(DeviceRegistration::grant)
    }

    fn rail_local_keys(&self) -> RailKeys {
        self.rail_keys(DeviceRegistration::local_key)
    }

    fn rail_remote_keys(&self) -> RailKeys {
        self.rail_keys(DeviceRegistration::remote_key)
    }
}

/// One MR on one device, and the window that carries its remote key when it has one. Dropping
/// it deallocates the window and deregisters the MR: the device refuses its keys from then on
/// (a peer's operation with them fails with a remote access error), and no longer touches the
/// memory.
struct DeviceRegistration {
    mr: *mut ibv_mr,
    /// The current share's window (windowed registrations between `grant` and `withdraw`).
    window: Option<Window>,
    /// The MR grants local access only; remote keys come from windows.
    windowed: bool,
    /// Keeps the PD (and the binder) alive while the MR lives.
    dev: Arc<Context>,
}

// SAFETY: an MR handle is usable from any thread; its keys are plain values.
unsafe impl Send for DeviceRegistration {}
// SAFETY: as above; `&self` methods only read.
unsafe impl Sync for DeviceRegistration {}

impl DeviceRegistration {
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
        self.window = Some(unsafe { binder.bind(self.mr)? });
        Ok(())
    }
}

impl Drop for DeviceRegistration {
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
