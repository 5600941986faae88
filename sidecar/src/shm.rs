//! A client's shared memory as a fabric region: the `memfd` it passed is mapped shared, and the
//! mapping is registered, so transfers read and write the client's own pages.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use agentfabric::bulk::ExternalMemory;
use memmap2::{MmapMut, MmapOptions};

/// Largest region a client may register (the address space is the limit that matters).
pub const MAX_REGION: u64 = 1 << 40;

/// A shared mapping of a client's file.
pub struct SharedMapping {
    map: MmapMut,
}

// SAFETY: the mapping is valid for `len` bytes, page-aligned (mmap), until it is dropped, which
// unmaps it; the file cannot shrink under it (`map_sealed` requires F_SEAL_SHRINK), so touching
// its pages cannot fault.
unsafe impl ExternalMemory for SharedMapping {
    fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Maps `len` bytes of `fd` shared. The file must be sealed against shrinking (a `memfd` with
/// `F_SEAL_SHRINK`): a client that truncated a file the sidecar maps would make every access
/// to the lost pages kill the sidecar with SIGBUS.
pub fn map_sealed(fd: OwnedFd, len: u64) -> Result<SharedMapping, String> {
    if len == 0 || len > MAX_REGION {
        return Err(format!("region length {len} is not in 1..={MAX_REGION}"));
    }
    // SAFETY: F_GET_SEALS on a descriptor we own; it only reads the seals.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(format!(
            "the descriptor is not a memfd that can be sealed ({})",
            std::io::Error::last_os_error()
        ));
    }
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err("the memfd must be sealed with F_SEAL_SHRINK before it is passed".into());
    }
    let file = File::from(fd);
    let size = file
        .metadata()
        .map_err(|e| format!("cannot stat the descriptor: {e}"))?
        .len();
    if size < len {
        return Err(format!(
            "the memfd holds {size} bytes, fewer than the {len} asked"
        ));
    }
    let len = usize::try_from(len).map_err(|_| "length beyond the address space".to_owned())?;
    // SAFETY: a shared mapping of a file that cannot shrink (checked above); the client may
    // write the pages at any time, which the protocol tells it not to do under a transfer.
    let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }
        .map_err(|e| format!("cannot map {len} bytes of the memfd: {e}"))?;
    Ok(SharedMapping { map })
}
