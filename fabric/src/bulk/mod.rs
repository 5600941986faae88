//! Bulk movement between registered memory: [`Region`]s, their descriptors, and batched
//! transfers ([`Peer::write`](crate::Peer::write), [`Peer::read`](crate::Peer::read)) of paged
//! data such as KV-cache blocks.
//!
//! - `region.rs`: [`Region`], its descriptor and the node's table of regions;
//! - `transfer.rs`: transfers, and the node-side service that executes the peer's;
//! - `notify.rs`: notifications that ride on a one-sided transfer's last write.
//!
//! Imports: `crate::transport` (one-sided operations and memory registration),
//! `crate::sync`, `crate::sliced_copy`, `crate::error`, `crate::frame`; and the API's
//! [`Peer`](crate::Peer) and [`Channel`](crate::Channel), which transfers run over
//! (`transfer.rs` only). The node in `crate::api` starts the transfer service in turn: the two
//! folders use each other, no two files do.

mod notify;
mod region;
mod transfer;

pub(crate) use notify::PendingNotes;

pub use crate::error::RegionError;
pub(crate) use region::RegionTable;
pub use region::{AlignedBuf, ExternalMemory, RdmaAccess, Region, RegionDescriptor, REGION_ALIGN};
pub(crate) use transfer::serve_transfers;
pub use transfer::{Block, Notification, TransferReport, MAX_INFLIGHT_BLOCKS, MAX_INFLIGHT_BYTES};
