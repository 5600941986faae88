//! Bulk movement between registered memory: [`Region`]s, their descriptors, and batched
//! transfers ([`Peer::write`](crate::Peer::write), [`Peer::read`](crate::Peer::read)) of paged
//! data such as KV-cache blocks.

mod notify;
mod region;
mod transfer;

pub(crate) use notify::PendingNotes;

pub use crate::error::RegionError;
pub(crate) use region::RegionTable;
pub use region::{AlignedBuf, RdmaAccess, Region, RegionDescriptor, REGION_ALIGN};
pub(crate) use transfer::serve_transfers;
pub use transfer::{Block, Notification, TransferReport, MAX_INFLIGHT_BLOCKS, MAX_INFLIGHT_BYTES};
