//! Memory registration for one-sided operations: the transport's [`MemoryDomain`] is the
//! protection domain of one device, and a registration is a memory region (MR) in it that peers
//! may read and write with its remote key.

use std::io;
use std::sync::Arc;

use agentfabric::transport::{MemoryDomain, MemoryRegistration};
use rdma_sys::*;

use crate::device::Context;

/// The protection domain of one open device. Connections on the same device (the same
/// [`Context`]) reach what is registered here.
pub(crate) struct VerbsDomain {
    pub(crate) dev: Arc<Context>,
}

/// The domain id of a device: connections compare theirs with it.
pub(crate) fn domain_id(dev: &Arc<Context>) -> u64 {
    Arc::as_ptr(dev) as u64
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
        let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0 as i32;
        // SAFETY: the PD is open while `dev` lives (the registration holds it); the caller
        // keeps the memory allocated until the registration is dropped.
        let mr = unsafe { ibv_reg_mr(self.dev.pd, addr.cast(), len, access) };
        if mr.is_null() {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot register {len} bytes for one-sided access on {}: {e} (locked-memory \
                     limit? see ulimit -l)",
                    self.dev.name
                ),
            ));
        }
        Ok(Box::new(VerbsRegistration {
            mr,
            _dev: self.dev.clone(),
        }))
    }
}

/// One MR. Dropping it deregisters it: the device refuses its keys from then on (a peer's
/// operation with them fails with a remote access error), and no longer touches the memory.
struct VerbsRegistration {
    mr: *mut ibv_mr,
    /// Keeps the PD open while the MR lives.
    _dev: Arc<Context>,
}

// SAFETY: an MR handle is usable from any thread; its keys are plain values.
unsafe impl Send for VerbsRegistration {}
// SAFETY: as above; nothing here is mutated after creation.
unsafe impl Sync for VerbsRegistration {}

impl MemoryRegistration for VerbsRegistration {
    fn local_key(&self) -> u32 {
        // SAFETY: the MR is valid until drop.
        unsafe { (*self.mr).lkey }
    }

    fn remote_key(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for VerbsRegistration {
    fn drop(&mut self) {
        // SAFETY: the MR is valid and owned here; after this returns the device no longer
        // accesses its memory.
        unsafe {
            ibv_dereg_mr(self.mr);
        }
    }
}
