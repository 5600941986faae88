//! The transport's memory domain: memory registered for one-sided operations over TCP (the
//! `one_sided` module), and the leases through which the lane threads reach it.
//!
//! On TCP no device reads or writes memory by itself: the one-sided lane's threads do, with
//! `send` straight from a registration and `recv` straight into one. What an RDMA device checks
//! in hardware is checked here before every access: the key names a live registration, and the
//! range lies inside it. A [`Lease`] is held for the duration of each access (one piece of at
//! most the one-sided lane's piece size), and deregistration waits for the leases to end, so the
//! memory is never touched after its registration is dropped.
//!
//! A lease can wait on a peer: a thread receiving a write's bytes blocks in `recv` until they
//! come. Deregistration does not wait for a stalled peer: after [`DEREGISTER_GRACE`] it shuts
//! down the sockets of the leases still held, which fails their system calls at once (and those
//! connections, as an RDMA device fails a queue pair whose operation meets a deregistered key).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agentfabric::sync::{lock, wait, wait_timeout};
use agentfabric::transport::{MemoryDomain, MemoryRegistration};

use crate::preamble::random_u64;

/// How long deregistration lets accesses in progress finish before it shuts down their
/// connections. An access is one piece (at most 1 MiB), a few hundred microseconds on a live
/// loopback connection: only a stalled or slow peer takes longer.
pub(crate) const DEREGISTER_GRACE: Duration = Duration::from_millis(20);

/// Why an access was refused: sent to the peer in a refusal, and shown in its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No live registration has that key (never registered, or deregistered since).
    UnknownKey = 1,
    /// The range is not inside the registration.
    OutOfRange = 2,
}

impl Refusal {
    pub(crate) fn code(self) -> u32 {
        self as u32
    }

    pub(crate) fn from_code(code: u32) -> Option<Refusal> {
        match code {
            1 => Some(Refusal::UnknownKey),
            2 => Some(Refusal::OutOfRange),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::UnknownKey => {
                "no registered memory has that key (never registered, or deregistered)"
            }
            Refusal::OutOfRange => "the range is outside the registered memory",
        })
    }
}

/// One registration's bookkeeping.
struct Entry {
    base: u64,
    len: u64,
    state: Mutex<EntryState>,
    idle: Condvar,
}

#[derive(Default)]
struct EntryState {
    /// Deregistration has begun: no new lease.
    revoked: bool,
    /// Leases held, with the socket each one's thread is using (shut down to cut a stalled
    /// access short).
    users: HashMap<u64, Arc<TcpStream>>,
    next_user: u64,
}

/// Registrations by key.
type Registry = Arc<Mutex<HashMap<u32, Arc<Entry>>>>;

/// The memory registered with one `TcpTransport` (shared by its clones).
pub(crate) struct TcpDomain {
    id: u64,
    regs: Registry,
}

impl fmt::Debug for TcpDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpDomain")
            .field("id", &self.id)
            .field("registrations", &lock(&self.regs).len())
            .finish()
    }
}

impl TcpDomain {
    pub(crate) fn new() -> Arc<TcpDomain> {
        // Random, so it matches no other transport's domain (an RDMA device's) in the process.
        Arc::new(TcpDomain {
            id: random_u64(),
            regs: Registry::default(),
        })
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Leases `len` bytes at `addr` of the registration `key`, for a thread using `socket`.
    pub(crate) fn lease(
        &self,
        key: u32,
        addr: u64,
        len: u64,
        socket: &Arc<TcpStream>,
    ) -> Result<Lease, Refusal> {
        let entry = lock(&self.regs)
            .get(&key)
            .cloned()
            .ok_or(Refusal::UnknownKey)?;
        let inside = addr >= entry.base
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= entry.base + entry.len);
        if !inside {
            return Err(Refusal::OutOfRange);
        }
        let mut st = lock(&entry.state);
        if st.revoked {
            return Err(Refusal::UnknownKey);
        }
        let user = st.next_user;
        st.next_user += 1;
        st.users.insert(user, socket.clone());
        drop(st);
        Ok(Lease {
            entry,
            user,
            ptr: addr as usize as *mut u8,
            len: len as usize,
        })
    }
}

impl MemoryDomain for TcpDomain {
    fn id(&self) -> u64 {
        self.id
    }

    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
    ) -> io::Result<Box<dyn MemoryRegistration>> {
        let base = addr as u64;
        if base.checked_add(len as u64).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memory to register wraps around the address space",
            ));
        }
        let entry = Arc::new(Entry {
            base,
            len: len as u64,
            state: Mutex::default(),
            idle: Condvar::new(),
        });
        let mut regs = lock(&self.regs);
        // A random key, so a peer cannot name memory it was not given a descriptor for by
        // counting; 0 is never used.
        let key = loop {
            let k = (random_u64() >> 32) as u32;
            if k != 0 && !regs.contains_key(&k) {
                break k;
            }
        };
        regs.insert(key, entry.clone());
        drop(regs);
        Ok(Box::new(TcpRegistration {
            regs: self.regs.clone(),
            key,
            entry,
        }))
    }

    fn emulated(&self) -> bool {
        true
    }
}

/// A registration with a [`TcpDomain`]. Dropping it deregisters the memory: it waits for the
/// accesses in progress (cutting stalled ones short, see the module docs), and every later access
/// with its key is refused.
struct TcpRegistration {
    /// The domain's table (shared, so the registration outlives nothing it needs).
    regs: Registry,
    key: u32,
    entry: Arc<Entry>,
}

impl MemoryRegistration for TcpRegistration {
    fn local_key(&self) -> u32 {
        self.key
    }

    fn remote_key(&self) -> u32 {
        self.key
    }
}

impl Drop for TcpRegistration {
    fn drop(&mut self) {
        lock(&self.regs).remove(&self.key);
        let mut st = lock(&self.entry.state);
        st.revoked = true;
        // One grace period in all, however often the wait is woken before the users are gone.
        let deadline = Instant::now() + DEREGISTER_GRACE;
        while !st.users.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = wait_timeout(&self.entry.idle, st, left).0;
        }
        if !st.users.is_empty() {
            tracing::warn!(
                accesses = st.users.len(),
                "tcp memory deregistered while peers still move its bytes: closing their connections"
            );
            for socket in st.users.values() {
                let _ = socket.shutdown(Shutdown::Both);
            }
            while !st.users.is_empty() {
                st = wait(&self.entry.idle, st);
            }
        }
    }
}

/// Access to a range of registered memory, for one piece of a one-sided operation. The memory
/// stays registered (and so allocated) while the lease lives.
pub(crate) struct Lease {
    entry: Arc<Entry>,
    user: u64,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the lease only carries the address of memory that its registration keeps valid for any
// thread; the accesses through it are made by one thread at a time (the one holding the lease).
unsafe impl Send for Lease {}

impl Lease {
    /// The leased memory's first byte.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The leased length.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = lock(&self.entry.state);
        st.users.remove(&self.user);
        if st.users.is_empty() {
            self.entry.idle.notify_all();
        }
    }
}
