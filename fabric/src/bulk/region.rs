//! Registered memory: [`Region`], its [`RegionDescriptor`], and the node's table of regions.
//!
//! On transports without RDMA a region is a page-aligned buffer owned by the node. Access is
//! through a read-write lock: a transfer that sends from a region holds a read guard inside the
//! chunks it hands to the transport (zero copy), so the memory cannot be written, revoked or freed
//! while any of those bytes are still in flight; a transfer that lands in a region takes the write
//! guard for the copy. Safe code cannot observe a torn write or free memory under a transfer.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use crate::error::{Error, RegionError, Result};
use crate::sliced_copy::CopyPacer;
use crate::sync::lock;
use crate::transport::{MemoryDomain, MemoryRegistration, RailKeys, MAX_RAILS};

/// Alignment of region memory: a page, as RDMA registration and DMA prefer.
pub const REGION_ALIGN: usize = 4096;

/// A page-aligned buffer: zeroed heap memory ([`AlignedBuf::new`]), or memory the application
/// mapped itself ([`AlignedBuf::from_external`], e.g. a `memfd` another process shares).
///
/// A buffer handed back by [`Region::reclaim`] may keep its registration with the RDMA device
/// (with no remote key: no peer can reach it): registering it again with the same node then
/// only gives it a new remote key, instead of pinning the memory again. The registration goes
/// when the buffer is dropped, before its memory is freed.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// The registration a revoked region left with its memory, key withdrawn
    /// ([`MemoryRegistration::withdraw`]).
    kept: Option<Registered>,
    /// The owner of external memory, dropped (unmapping it) instead of freeing a heap block.
    external: Option<Box<dyn ExternalMemory>>,
}

/// Memory the application owns (a shared mapping, say) that a [`Region`] can use in place of a
/// heap buffer: the sidecar maps a client's `memfd` and registers the mapping, so transfers move
/// the client's own pages.
///
/// # Safety
/// The implementor promises that [`ExternalMemory::as_ptr`] is valid for reads and writes of
/// [`ExternalMemory::len`] bytes, page-aligned, from the value's creation until it is dropped,
/// and that the memory is not unmapped or freed before then. Memory that another process also
/// maps can change under the fabric's feet: a region over it gives no more than that process's
/// discipline (the sidecar's protocol says a client must not write a range a transfer is
/// reading).
pub unsafe trait ExternalMemory: Send + Sync + 'static {
    /// Start of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// Its length in bytes.
    fn len(&self) -> usize;
    /// Whether it has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]> (external memory is
// Send + Sync by its trait's bounds and contract).
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, like a Box<[u8]>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`REGION_ALIGN`]. Fails on a zero or absurd length
    /// or when memory is exhausted, instead of aborting.
    pub fn new(len: usize) -> Result<AlignedBuf> {
        if len == 0 {
            return Err(Error::Config("a region needs at least one byte".into()));
        }
        let layout = Layout::from_size_align(len, REGION_ALIGN)
            .map_err(|_| Error::Config(format!("a region of {len} bytes is too large")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| Error::Config(format!("out of memory allocating {len} bytes")))?;
        Ok(AlignedBuf {
            ptr,
            len,
            kept: None,
            external: None,
        })
    }

    /// Wraps memory the application mapped itself; dropping the buffer (after the region that
    /// holds it is gone) drops `mem`. Fails when the memory is empty or not page-aligned.
    pub fn from_external(mem: Box<dyn ExternalMemory>) -> Result<AlignedBuf> {
        let len = mem.len();
        let ptr = std::ptr::NonNull::new(mem.as_ptr())
            .ok_or_else(|| Error::Config("external memory at address 0".into()))?;
        if len == 0 {
            return Err(Error::Config("a region needs at least one byte".into()));
        }
        if !(ptr.as_ptr() as usize).is_multiple_of(REGION_ALIGN) {
            return Err(Error::Config(format!(
                "external memory must be aligned to {REGION_ALIGN} bytes"
            )));
        }
        Ok(AlignedBuf {
            ptr,
            len,
            kept: None,
            external: Some(mem),
        })
    }

    /// Whether the buffer keeps a device registration from the region it was reclaimed from
    /// (see the type's docs).
    pub fn keeps_registration(&self) -> bool {
        self.kept.is_some()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // The device lets go of the memory before it is freed.
        drop(self.kept.take());
        if let Some(mem) = self.external.take() {
            // The owner unmaps (or keeps) its memory; none of it came from the heap.
            drop(mem);
            return;
        }
        let layout =
            Layout::from_size_align(self.len, REGION_ALIGN).expect("checked at allocation");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("keeps_registration", &self.keeps_registration())
            .finish()
    }
}

/// What a peer needs to address a region: send it over a coordination channel
/// ([`RegionDescriptor::encode`]), and the peer reads or writes the region with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionDescriptor {
    /// Region id, unique within its node.
    pub region: u64,
    /// Length in bytes.
    pub len: u64,
    /// Access key: random per region; a descriptor without it is refused.
    pub key: u64,
    /// How an RDMA device reaches the region directly, when the owning node registered it with
    /// one (its transport has a [`MemoryDomain`](crate::transport::MemoryDomain)).
    pub rdma: Option<RdmaAccess>,
}

/// The address and remote key of a region registered with an RDMA device: what one-sided
/// operations name it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RdmaAccess {
    /// The region's first byte, in the owner's address space (the registration's base).
    pub addr: u64,
    /// The registration's remote key.
    pub rkey: u32,
    /// The registration's remote keys on the owner's extra devices, when its transport spreads
    /// one-sided operations over several (see [`MemoryRegistration::rail_remote_keys`]).
    ///
    /// [`MemoryRegistration::rail_remote_keys`]: crate::transport::MemoryRegistration::rail_remote_keys
    pub rails: RailKeys,
}

impl RegionDescriptor {
    /// Encoded length without rail keys (every descriptor has at least this many bytes).
    pub const LEN: usize = 37;

    /// Longest encoding: [`RegionDescriptor::LEN`] and a key per rail.
    pub const MAX_LEN: usize = Self::LEN + 4 * MAX_RAILS;

    /// Length of [`RegionDescriptor::encode`]'s output for this descriptor.
    pub fn encoded_len(&self) -> usize {
        Self::LEN + 4 * self.rdma.map_or(0, |r| r.rails.len())
    }

    /// The descriptor as little-endian bytes: region, len, key, then a flag byte (0 without
    /// `rdma`, else 1 + the number of rail keys), the RDMA address and remote key (zero
    /// without), then the rail keys. [`RegionDescriptor::LEN`] bytes without rails.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.encoded_len()];
        out[0..8].copy_from_slice(&self.region.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.key.to_le_bytes());
        if let Some(r) = self.rdma {
            out[24] = 1 + r.rails.len() as u8;
            out[25..33].copy_from_slice(&r.addr.to_le_bytes());
            out[33..37].copy_from_slice(&r.rkey.to_le_bytes());
            for (i, k) in r.rails.as_slice().iter().enumerate() {
                out[Self::LEN + 4 * i..Self::LEN + 4 * i + 4].copy_from_slice(&k.to_le_bytes());
            }
        }
        out
    }

    /// Decodes [`RegionDescriptor::encode`]'s output; `None` for a flag byte out of range or a
    /// length that does not match it.
    pub fn decode(b: &[u8]) -> Option<RegionDescriptor> {
        if b.len() < Self::LEN {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let half = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let rails = usize::from(b[24].saturating_sub(1));
        if rails > MAX_RAILS || b.len() != Self::LEN + 4 * rails {
            return None;
        }
        let rdma = match b[24] {
            0 => None,
            _ => {
                let mut keys = [0u32; MAX_RAILS];
                for (i, k) in keys[..rails].iter_mut().enumerate() {
                    *k = half(Self::LEN + 4 * i);
                }
                Some(RdmaAccess {
                    addr: word(25),
                    rkey: half(33),
                    rails: RailKeys::from_slice(&keys[..rails])?,
                })
            }
        };
        Some(RegionDescriptor {
            region: word(0),
            len: word(8),
            key: word(16),
            rdma,
        })
    }
}

/// A region's registration with an RDMA device.
pub(crate) struct Registered {
    /// The [`MemoryDomain::id`] it was made in.
    pub(crate) domain: u64,
    pub(crate) reg: Box<dyn MemoryRegistration>,
    /// The region's base address.
    pub(crate) addr: u64,
}

impl Registered {
    /// What a descriptor publishes of it.
    pub(crate) fn access(&self) -> RdmaAccess {
        RdmaAccess {
            addr: self.addr,
            rkey: self.reg.remote_key(),
            rails: self.reg.rail_remote_keys(),
        }
    }
}

pub(crate) struct RegionInner {
    pub(crate) id: u64,
    pub(crate) key: u64,
    pub(crate) len: u64,
    /// The RDMA registration, if any; taken by [`Region::revoke`] (deregistered, or kept in
    /// the buffer with its key withdrawn). Declared
    /// before `mem` so that it is dropped first: the device lets go of the memory before the
    /// memory can be freed.
    pub(crate) rdma: Mutex<Option<Registered>>,
    pub(crate) mem: Arc<RwLock<AlignedBuf>>,
    pub(crate) revoked: AtomicBool,
    table: Weak<RegionTable>,
}

impl RegionInner {
    /// The registration's lock.
    pub(crate) fn registered(&self) -> std::sync::MutexGuard<'_, Option<Registered>> {
        lock(&self.rdma)
    }

    /// What the descriptor publishes for one-sided access, while registered.
    pub(crate) fn rdma_access(&self) -> Option<RdmaAccess> {
        self.registered().as_ref().map(Registered::access)
    }

    /// Checks `offset..offset+len` against the region.
    pub(crate) fn check(&self, offset: u64, len: u64) -> std::result::Result<(), RegionError> {
        if self.revoked.load(Ordering::Acquire) {
            return Err(RegionError::Revoked { region: self.id });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RegionError::OutOfBounds {
                region: self.id,
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    /// A zero-copy view of `offset..offset+len`, keeping the region readable-only while it lives.
    pub(crate) async fn view(
        &self,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Bytes, RegionError> {
        self.check(offset, len)?;
        let guard = self.mem.clone().read_owned().await;
        // Revocation may have happened while waiting for the guard.
        self.check(offset, len)?;
        Ok(Bytes::from_owner(View {
            guard,
            start: offset as usize,
            end: (offset + len) as usize,
        }))
    }

    /// Copies `data` into the region at `offset`.
    pub(crate) async fn store(
        &self,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), RegionError> {
        self.store_pieces(offset, std::iter::once(data)).await
    }

    /// Copies `pieces`, one after the other, into the region from `offset`: a fragmented block
    /// lands with one copy, never joined first.
    pub(crate) async fn store_pieces<'a>(
        &self,
        offset: u64,
        pieces: impl Iterator<Item = &'a [u8]> + Clone,
    ) -> std::result::Result<(), RegionError> {
        let len: u64 = pieces.clone().map(|p| p.len() as u64).sum();
        self.check(offset, len)?;
        let mut guard = self.mem.write().await;
        self.check(offset, len)?;
        // Not sliced beyond one worker: see `crate::sliced_copy`.
        let mut pacer = CopyPacer::new(usize::MAX);
        let mut at = offset as usize;
        for p in pieces {
            for part in p.chunks(pacer.slice()) {
                pacer.before(part.len()).await;
                guard[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
        }
        Ok(())
    }
}

/// A read guard on a region plus a range: the owner behind a zero-copy `Bytes`.
struct View {
    guard: OwnedRwLockReadGuard<AlignedBuf>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        &self.guard[self.start..self.end]
    }
}

/// The regions registered with a node.
#[derive(Default)]
pub(crate) struct RegionTable {
    regions: Mutex<HashMap<u64, Weak<RegionInner>>>,
    /// Where new regions are also registered for one-sided access (the node's RDMA transport).
    domain: Option<Arc<dyn MemoryDomain>>,
}

impl RegionTable {
    /// A table whose regions are registered with `domain` too, when there is one.
    pub(crate) fn new(domain: Option<Arc<dyn MemoryDomain>>) -> RegionTable {
        RegionTable {
            regions: Mutex::default(),
            domain,
        }
    }

    /// The live region a descriptor names, after checking its key.
    pub(crate) fn lookup(
        &self,
        d: &RegionDescriptor,
    ) -> std::result::Result<Arc<RegionInner>, RegionError> {
        let regions = lock(&self.regions);
        let r = regions
            .get(&d.region)
            .and_then(Weak::upgrade)
            .ok_or(RegionError::Unknown { region: d.region })?;
        if r.key != d.key {
            return Err(RegionError::BadKey { region: d.region });
        }
        Ok(r)
    }

    pub(crate) fn register(self: &Arc<Self>, mut buf: AlignedBuf) -> Region {
        // Before the table's lock: pinning a large buffer takes a while, and lookups wait on it.
        let kept = buf.kept.take();
        let rdma = self.domain.as_ref().and_then(|d| {
            kept.and_then(|k| regrant(d, k))
                .or_else(|| register_with(d, &mut buf))
        });
        let mut regions = lock(&self.regions);
        regions.retain(|_, r| r.strong_count() > 0);
        let id = loop {
            let id = rand::random::<u64>() >> 1;
            if !regions.contains_key(&id) {
                break id;
            }
        };
        let inner = Arc::new(RegionInner {
            id,
            key: rand::random(),
            len: buf.len() as u64,
            rdma: Mutex::new(rdma),
            mem: Arc::new(RwLock::new(buf)),
            revoked: AtomicBool::new(false),
            table: Arc::downgrade(self),
        });
        regions.insert(id, Arc::downgrade(&inner));
        Region { inner }
    }

    fn forget(&self, id: u64) {
        lock(&self.regions).remove(&id);
    }
}

/// Gives `kept`, a registration a reclaimed buffer brought back, a new remote key, when it was
/// made in `domain`; `None` otherwise (dropped: the caller registers the buffer afresh).
fn regrant(domain: &Arc<dyn MemoryDomain>, mut kept: Registered) -> Option<Registered> {
    if kept.domain != domain.id() {
        // Registered with another node's device: that device lets go of it here.
        return None;
    }
    match kept.reg.grant() {
        Ok(()) => Some(kept),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot give a reclaimed buffer's registration a new remote key; registering it \
                 again"
            );
            None
        }
    }
}

/// Registers `buf` with `domain`. A failure (the device's limits, the locked-memory limit)
/// leaves the region without one-sided access: transfers to and from it then move through the
/// session, as on transports without RDMA. Said in the log, since it costs bandwidth.
fn register_with(domain: &Arc<dyn MemoryDomain>, buf: &mut AlignedBuf) -> Option<Registered> {
    let addr = buf.as_mut_ptr();
    // SAFETY: the registration is stored in the region beside the buffer and dropped before it
    // (field order of `RegionInner`), or kept in the buffer itself (`Region::revoke`), whose
    // `Drop` drops it before freeing the memory; the buffer's heap memory does not move when
    // the `AlignedBuf` value does.
    match unsafe { domain.register(addr, buf.len()) } {
        Ok(reg) => Some(Registered {
            domain: domain.id(),
            reg,
            addr: addr as u64,
        }),
        Err(e) => {
            tracing::warn!(
                error = %e,
                len = buf.len(),
                "cannot register a region with the RDMA device; its transfers move through the \
                 session"
            );
            None
        }
    }
}

/// Memory registered with a node, which peers can read and write through its descriptor.
///
/// Dropping the last handle unregisters it; [`Region::revoke`] does so explicitly, after the
/// operations in flight on it have finished.
///
/// On a node with an RDMA transport the region is also registered with the device, and its
/// descriptor carries the device's address and remote key ([`RdmaAccess`]): peers then read
/// and write it one-sided, without this node's CPU. What that changes:
/// - The device checks only the remote key: any peer connected to this device that holds the
///   descriptor (or guesses the address and the 32-bit key) can read and write the whole region
///   while it is registered. The 64-bit `key` is checked by the target's software only, for the
///   check a well-behaved initiator makes first. Share descriptors only with peers trusted with
///   the memory, and revoke a region when they are done.
/// - A peer's one-sided write lands without taking the region's lock: a local read (or a view)
///   of the same bytes meanwhile may see them half written. Coordinate with the writer (the
///   transfer's notification says when its blocks have all landed).
/// - [`Region::revoke`] cannot wait for a peer's one-sided operations: it withdraws the
///   region's remote key (or deregisters it), and the device refuses the rest (the peer's
///   transfer fails with a typed error and its session resumes on a new connection).
///
/// Registration is paid once per region, not per transfer: keep a region (a KV-cache pool, say)
/// for as long as its memory is shared, and move any number of batches in and out of it. To
/// share the same memory anew (with other peers, after revoking it from the first ones), take
/// it back with [`Region::reclaim`] and register it again: where the device can withdraw a
/// remote key and grant a new one for the same registration (the verbs transport does, with
/// memory windows), the memory stays pinned in between and registering it again costs a new
/// key, not a new registration. The old key is refused from the revocation on, so a peer
/// holding the old descriptor never reaches the memory again. A dropped region's registration
/// is not kept: its memory is freed.
///
/// The TCP transport has a memory domain too (`agentfabric-tcp`'s one-sided lane): there the
/// "device" is the transport's lane threads, which check the key and the range of every piece
/// in software before they `send` from the region or `recv` into it. The points above hold for
/// it as they do for RDMA; a node with both registers its regions with the RDMA device.
#[derive(Clone)]
pub struct Region {
    pub(crate) inner: Arc<RegionInner>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.inner.id)
            .field("len", &self.inner.len)
            .finish()
    }
}

impl Region {
    /// What a peer needs to read or write this region.
    pub fn descriptor(&self) -> RegionDescriptor {
        RegionDescriptor {
            region: self.inner.id,
            len: self.inner.len,
            key: self.inner.key,
            rdma: self.inner.rdma_access(),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether the region is empty (never: regions have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Copies `data` into the region at `offset` (waits while a transfer is sending from it).
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.store(offset, data).await.map_err(Error::Region)
    }

    /// Copies `buf.len()` bytes from the region at `offset` into `buf`.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let view = self
            .inner
            .view(offset, buf.len() as u64)
            .await
            .map_err(Error::Region)?;
        buf.copy_from_slice(&view);
        Ok(())
    }

    /// Revokes the region: new operations on it, local or remote, are refused at once; this
    /// waits until the operations already in flight through this node have finished, then
    /// withdraws its device registration's remote key (a peer's one-sided operations in flight
    /// are cut off: see [`Region`]).
    ///
    /// Where the device can re-key a registration, the registration stays with the region's
    /// memory, keyless, for [`Region::reclaim`] to hand back; otherwise it is deregistered.
    pub async fn revoke(&self) {
        self.inner.revoked.store(true, Ordering::Release);
        // The write guard is granted only once every in-flight view is gone.
        let mut mem = self.inner.mem.write().await;
        let registered = self.inner.registered().take();
        if let Some(mut r) = registered {
            // Either way a peer's one-sided access with the old key now fails on the device.
            match r.reg.withdraw() {
                Ok(()) => mem.kept = Some(r),
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::Unsupported {
                        tracing::warn!(
                            region = self.inner.id,
                            error = %e,
                            "cannot withdraw a revoked region's remote key; deregistering it"
                        );
                    }
                    drop(r);
                }
            }
        }
        drop(mem);
        if let Some(t) = self.inner.table.upgrade() {
            t.forget(self.inner.id);
        }
    }

    /// Revokes the region (as [`Region::revoke`]) and hands its memory back, with the bytes it
    /// holds. Register the buffer again ([`Node::register_buf`](crate::Node::register_buf))
    /// to share it anew: the new region has a new id, key and (on RDMA) remote key, so the old
    /// descriptor stays refused, and where the device can re-key a registration the memory is
    /// not pinned again (see [`AlignedBuf`]).
    ///
    /// Hands the region back instead while another handle to it (a clone of this `Region`, a
    /// transfer still finishing with it) or a view of its memory (a received block not yet
    /// dropped) is alive; it stays revoked, and the call can be repeated once they are gone.
    pub async fn reclaim(self) -> std::result::Result<AlignedBuf, Region> {
        self.revoke().await;
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(inner) => return Err(Region { inner }),
        };
        match Arc::try_unwrap(inner.mem) {
            Ok(mem) => Ok(mem.into_inner()),
            // A view still holds the memory: the region goes back as it was.
            Err(mem) => Err(Region {
                inner: Arc::new(RegionInner { mem, ..inner }),
            }),
        }
    }

    /// Whether the region was revoked.
    pub fn is_revoked(&self) -> bool {
        self.inner.revoked.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_store_lets_other_tasks_run_on_a_one_worker_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let saw = rt.block_on(async {
            const LEN: usize = 4 << 20;
            let table = Arc::new(RegionTable::default());
            let region = table.register(AlignedBuf::new(LEN).expect("memory"));
            let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
            let (stored, saw) =
                crate::sliced_copy::beside_another_task(region.write_at(0, &data)).await;
            stored.expect("store");
            let mut back = vec![0u8; LEN];
            region.read_at(0, &mut back).await.expect("read");
            assert!(back == data, "stored bytes differ");
            saw
        });
        assert!(saw, "the store held the only worker from start to end");
    }
}
