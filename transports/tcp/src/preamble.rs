//! The lane preamble: the first bytes of each TCP connection, naming the fabric connection it
//! belongs to and the lane it carries.
//!
//! ```text
//!  0  magic "AFTL"   4  version (2)   5  lane   6  lane count (3)   7  reserved (0)
//!  8  connection id (u64, little-endian)
//! ```

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use agentfabric::frame::Lane;

/// Magic bytes that open each TCP connection of the transport ("AFTL": agentfabric TCP lane).
pub const PREAMBLE_MAGIC: [u8; 4] = *b"AFTL";
/// Version of the lane preamble spoken by this build (2: a third lane carries one-sided
/// operations).
pub const PREAMBLE_VERSION: u8 = 2;
/// Length of the lane preamble in bytes.
pub const PREAMBLE_LEN: usize = 16;
/// TCP connections (lanes) per fabric connection: the [`Lane::COUNT`] frame lanes (latency,
/// bulk), then the lane of one-sided operations.
pub const LANES: usize = Lane::COUNT + 1;

/// A decoded lane preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Preamble {
    /// The lane this TCP connection carries (`0..LANES`).
    pub lane: u8,
    /// The fabric connection's id, the same on all of its lanes.
    pub id: u64,
}

/// Why the first bytes of an incoming TCP connection are not a lane preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PreambleError {
    BadMagic([u8; 4]),
    UnsupportedVersion(u8),
    LaneCount(u8),
    BadLane(u8),
    Reserved(u8),
}

impl fmt::Display for PreambleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PreambleError::BadMagic(m) => write!(
                f,
                "bad lane preamble magic {m:02x?} (not an agentfabric tcp client)"
            ),
            PreambleError::UnsupportedVersion(v) => write!(
                f,
                "unsupported lane preamble version {v} (this build speaks {PREAMBLE_VERSION})"
            ),
            PreambleError::LaneCount(n) => {
                write!(
                    f,
                    "peer uses {n} lanes per connection; this build uses {LANES}"
                )
            }
            PreambleError::BadLane(l) => write!(f, "lane {l} out of range (0..{LANES})"),
            PreambleError::Reserved(b) => write!(f, "reserved preamble byte is {b:#x}, not 0"),
        }
    }
}

impl Preamble {
    pub(crate) fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[..4].copy_from_slice(&PREAMBLE_MAGIC);
        b[4] = PREAMBLE_VERSION;
        b[5] = self.lane;
        b[6] = LANES as u8;
        b[7] = 0;
        b[8..].copy_from_slice(&self.id.to_le_bytes());
        b
    }

    /// Checks the magic alone (the first four bytes), so other protocols are refused at once.
    pub(crate) fn check_magic(magic: &[u8; 4]) -> Result<(), PreambleError> {
        if *magic != PREAMBLE_MAGIC {
            return Err(PreambleError::BadMagic(*magic));
        }
        Ok(())
    }

    pub(crate) fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Preamble, PreambleError> {
        let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
        Self::check_magic(&magic)?;
        if b[4] != PREAMBLE_VERSION {
            return Err(PreambleError::UnsupportedVersion(b[4]));
        }
        if usize::from(b[6]) != LANES {
            return Err(PreambleError::LaneCount(b[6]));
        }
        if usize::from(b[5]) >= LANES {
            return Err(PreambleError::BadLane(b[5]));
        }
        if b[7] != 0 {
            return Err(PreambleError::Reserved(b[7]));
        }
        Ok(Preamble {
            lane: b[5],
            id: u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        })
    }
}

/// A fresh random value (the standard library's randomly keyed hasher, fed a process-wide counter
/// and the time): connection ids, so ids of different clients do not collide (an id only pairs
/// the lanes of one connection; it is not a secret and authenticates nothing), and the memory
/// domain's ids and keys.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one((n, nanos, std::process::id()))
}
