//! One-sided operations between registered memory (RDMA WRITE and READ), as transports that
//! have them offer them: the memory domain and its registrations, the rail keys of a
//! registration spanning several devices, the operation itself, the immediates a peer's writes
//! carry, and the per-connection [`OneSided`] handle.
//!
//! Imports: only `std`. The frame interface in `mod.rs` uses these types (a
//! [`FrameSink`](super::FrameSink) may offer a [`OneSided`]); nothing here uses it, which is
//! why [`OneSidedSink`](super::OneSidedSink), a `FrameSink`, lives there.

use std::io;
use std::sync::Arc;

/// Memory registration with a device that reads and writes it directly (see
/// [`Transport::memory_domain`](super::Transport::memory_domain)).
pub trait MemoryDomain: Send + Sync {
    /// Identifies the domain: a [`OneSided`] connection reaches memory registered here when its
    /// [`OneSided::domain`] is this value.
    fn id(&self) -> u64;

    /// Registers the `len` bytes at `addr` for local access and for remote reads and writes by
    /// peers that hold the registration's key.
    ///
    /// # Safety
    ///
    /// The memory must stay allocated until the returned registration is dropped: the device
    /// may write it at any time until then.
    unsafe fn register(&self, addr: *mut u8, len: usize)
        -> io::Result<Box<dyn MemoryRegistration>>;

    /// Whether the host's CPU carries this domain's one-sided operations (over a byte stream,
    /// as the TCP transport does) instead of a device. A node whose transports offer several
    /// domains registers its regions with the first one that is not emulated.
    fn emulated(&self) -> bool {
        false
    }
}

/// Registered memory. Dropping it deregisters the memory: later remote accesses with its key
/// fail on the device, never touch the memory.
pub trait MemoryRegistration: Send + Sync {
    /// The key local work requests name the memory with.
    fn local_key(&self) -> u32;
    /// The key a peer names the memory with in one-sided operations.
    fn remote_key(&self) -> u32;

    /// Withdraws the remote key and keeps the memory registered: once this returns, the device
    /// refuses the key (a peer's operation with it fails), while the memory stays pinned for a
    /// later [`MemoryRegistration::grant`]. This is what makes registering the same memory again
    /// cheap (a registration cache that never honours an old key): the fabric calls it when a
    /// region is revoked, and keeps the registration with the region's buffer.
    ///
    /// Domains that cannot re-key a registration (the default) return an error of kind
    /// [`io::ErrorKind::Unsupported`]: the fabric then drops the registration instead, and
    /// registers the memory afresh next time. On any error the registration must be safe to
    /// drop.
    fn withdraw(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this memory domain cannot withdraw a remote key and keep the registration",
        ))
    }

    /// Gives a registration whose key was withdrawn a new remote key, different from every key
    /// it had before ([`MemoryRegistration::remote_key`] returns it from now on). On an error
    /// the fabric drops the registration and registers the memory afresh.
    fn grant(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this memory domain cannot grant a new remote key to a registration",
        ))
    }

    /// Local keys of the same memory on the domain's extra devices ("rails"), in the domain's
    /// rail order: a transport whose connections have a queue pair on each of several devices
    /// spreads one-sided operations over them. Empty (the default) for one device.
    fn rail_local_keys(&self) -> RailKeys {
        RailKeys::EMPTY
    }

    /// Remote keys of the same memory on the domain's rails, in the same order as
    /// [`MemoryRegistration::rail_local_keys`]; they change with [`MemoryRegistration::grant`]
    /// like [`MemoryRegistration::remote_key`]. Published in a region's descriptor.
    fn rail_remote_keys(&self) -> RailKeys {
        RailKeys::EMPTY
    }
}

/// Most extra devices ("rails") one registration spans besides its main one.
pub const MAX_RAILS: usize = 4;

/// The keys of one registration on its extra devices, rail by rail (at most [`MAX_RAILS`]).
/// A plain value, so that it travels in a [`OneSidedOp`] and a region's descriptor.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RailKeys {
    len: u8,
    keys: [u32; MAX_RAILS],
}

impl RailKeys {
    /// No rails.
    pub const EMPTY: RailKeys = RailKeys {
        len: 0,
        keys: [0; MAX_RAILS],
    };

    /// The keys in `keys`, rail by rail; `None` when there are more than [`MAX_RAILS`].
    pub fn from_slice(keys: &[u32]) -> Option<RailKeys> {
        if keys.len() > MAX_RAILS {
            return None;
        }
        let mut r = RailKeys::EMPTY;
        r.keys[..keys.len()].copy_from_slice(keys);
        r.len = keys.len() as u8;
        Some(r)
    }

    /// The keys, rail by rail.
    pub fn as_slice(&self) -> &[u32] {
        &self.keys[..usize::from(self.len)]
    }

    /// How many rails.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for RailKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// Which way a one-sided operation moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneSidedKind {
    /// Local memory to the peer's (RDMA WRITE).
    Write,
    /// The peer's memory to local (RDMA READ).
    Read,
}

/// One one-sided operation between registered memory on both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneSidedOp {
    /// Write or read.
    pub kind: OneSidedKind,
    /// Local address (inside memory registered in the connection's domain).
    pub local_addr: u64,
    /// The local registration's [`MemoryRegistration::local_key`].
    pub local_key: u32,
    /// Bytes to move.
    pub len: u32,
    /// Address on the peer, as its registration published it.
    pub remote_addr: u64,
    /// The peer registration's [`MemoryRegistration::remote_key`].
    pub remote_key: u32,
    /// The local registration's [`MemoryRegistration::rail_local_keys`]: with
    /// `remote_rails`, lets a connection with queue pairs on several devices move pieces of
    /// the operation on each rail both registrations span. Empty: the main device only.
    pub local_rails: RailKeys,
    /// The peer registration's [`MemoryRegistration::rail_remote_keys`].
    pub remote_rails: RailKeys,
    /// Immediate data for the peer (writes only; RDMA WRITE with immediate): once this write
    /// and every operation posted before it on the connection have landed, the peer's end of
    /// the connection hands the value to its [`ImmediateHandler`]. The fabric uses it to notify
    /// the target of a transfer without a message of its own.
    pub imm: Option<u32>,
}

/// Called by a connection with the immediate data of each peer write that carried one (see
/// [`OneSidedOp::imm`]), in the order the writes landed. Runs on the transport's completion
/// path: it must be quick and must not block.
pub type ImmediateHandler = Arc<dyn Fn(u32) + Send + Sync>;

/// Where a transport puts the immediates it receives: the installed [`ImmediateHandler`], or,
/// before one is installed, a bounded queue handed to it first (as [`OneSided::on_immediate`]
/// asks of every transport).
pub struct Immediates {
    handler: Option<ImmediateHandler>,
    early: Vec<u32>,
    limit: usize,
}

impl Immediates {
    /// No handler yet; at most `limit` immediates kept until one is installed.
    pub fn new(limit: usize) -> Immediates {
        Immediates {
            handler: None,
            early: Vec::new(),
            limit,
        }
    }

    /// Hands `imm` to the handler, or keeps it for one still to come. `false` when it had to be
    /// dropped (no handler, and `limit` kept already): the caller says so in its log.
    pub fn deliver(&mut self, imm: u32) -> bool {
        match &self.handler {
            Some(h) => h(imm),
            None if self.early.len() < self.limit => self.early.push(imm),
            None => return false,
        }
        true
    }

    /// Installs `handler` (replacing any earlier one), after handing it the immediates kept.
    pub fn install(&mut self, handler: ImmediateHandler) {
        for imm in std::mem::take(&mut self.early) {
            handler(imm);
        }
        self.handler = Some(handler);
    }
}

/// Called once when a one-sided operation is over, with its outcome. Runs on the transport's
/// completion path, possibly with the connection's locks held: it must be quick, and must not
/// call back into the connection (post another operation from a task it wakes instead).
pub type OneSidedDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// One-sided operations on a connection (see [`FrameSink::one_sided`](super::FrameSink::one_sided)).
pub trait OneSided: Send + Sync {
    /// The [`MemoryDomain::id`] whose registrations this connection's operations can name.
    fn domain(&self) -> u64;

    /// Starts `op` (in no particular order with the connection's frames: a transfer that needs
    /// one, like a notification after its blocks, waits for the operations to complete first).
    /// `done` is called with the outcome, or dropped unrun if the connection is torn down
    /// first; either way only once the device can no longer touch the operation's memory, so
    /// whatever keeps that memory alive can ride in `done`. A failed operation fails the
    /// connection (an RDMA queue pair goes to its error state).
    fn post(&self, op: OneSidedOp, done: OneSidedDone);

    /// Installs what receives the immediate data of the peer's writes on this connection
    /// (replacing any earlier handler). Immediates that arrive before a handler is installed
    /// are kept, within a bound the transport states, and handed to it first; the fabric
    /// installs one as soon as the connection joins its session.
    fn on_immediate(&self, handler: ImmediateHandler);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn immediates_before_the_handler_are_kept_in_order_within_the_limit() {
        let mut imms = Immediates::new(2);
        assert!(imms.deliver(1));
        assert!(imms.deliver(2));
        assert!(!imms.deliver(3), "a third one past the limit was kept");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        imms.install(Arc::new(move |v| s.lock().unwrap().push(v)));
        assert!(imms.deliver(4));
        assert_eq!(*seen.lock().unwrap(), [1, 2, 4]);
    }
}
