//! Regions: `REGION_ADD` (a client's memfd mapped and registered, no copy), `REGION_DROP`, the
//! `WRITE`/`READ` transfers, and notifications to the region's owner.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use agentfabric::sync::lock;
use agentfabric::{AlignedBuf, Block, RegionDescriptor};

use super::state::{Conn, RegionEntry};
use crate::endpoint::Endpoint;
use crate::errors::OpError;
use crate::shm::map_sealed;
use crate::wire::{ErrorCode, SidecarMsg, TransferRequest};

/// Most blocks one transfer may list.
const MAX_BLOCKS: usize = 65_536;

/// `REGION_ADD`: maps the client's memfd and registers the mapping with the node.
pub async fn add(conn: Arc<Conn>, fd: Option<OwnedFd>, len: u64) -> Result<SidecarMsg, OpError> {
    let fd = fd.ok_or_else(|| {
        OpError::new(
            ErrorCode::BadFd,
            "REGION_ADD came without a file descriptor",
        )
    })?;
    let node = conn.hub.node.clone();
    // Mapping and registering (pinning, on verbs) take a while for a large region: off the
    // runtime's workers.
    let region = tokio::task::spawn_blocking(move || {
        let mapping = map_sealed(fd, len).map_err(|m| OpError::new(ErrorCode::BadFd, m))?;
        let buf = AlignedBuf::from_external(Box::new(mapping))
            .map_err(|e| OpError::new(ErrorCode::BadFd, e.to_string()))?;
        Ok::<_, OpError>(node.register_buf(buf))
    })
    .await
    .map_err(|e| OpError::new(ErrorCode::Internal, format!("registering: {e}")))??;
    let desc = region.descriptor();
    let entry = Arc::new(RegionEntry {
        region,
        id: desc.region,
    });
    if conn.is_closed() {
        return Err(OpError::new(ErrorCode::Closed, "the client is gone"));
    }
    let handle = lock(&conn.regions).insert(entry, conn.hub.limits.max_regions, "regions")?;
    let owner: Arc<dyn Endpoint> = conn.clone();
    conn.hub
        .own_region(desc.region, Arc::downgrade(&owner), handle);
    Ok(SidecarMsg::Region {
        region: handle,
        len,
        descriptor: desc.encode().into(),
    })
}

/// `REGION_DROP`: revokes the region, waits for transfers on it, and unmaps it.
pub async fn drop_region(conn: Arc<Conn>, handle: u32) -> Result<SidecarMsg, OpError> {
    let e = lock(&conn.regions)
        .map
        .remove(&handle)
        .ok_or_else(|| OpError::new(ErrorCode::UnknownRegion, format!("no region {handle}")))?;
    release(&conn, &e).await;
    Ok(SidecarMsg::Done)
}

/// Revokes a region that left the client's table; the mapping goes with the last reference.
pub async fn release(conn: &Conn, e: &RegionEntry) {
    conn.hub.disown_region(e.id);
    e.region.revoke().await;
}

/// `WRITE` / `READ`.
pub async fn transfer(
    conn: Arc<Conn>,
    t: TransferRequest,
    write: bool,
) -> Result<SidecarMsg, OpError> {
    if t.blocks.is_empty() || t.blocks.len() > MAX_BLOCKS {
        return Err(OpError::new(
            ErrorCode::InvalidArgument,
            format!("a transfer has 1 to {MAX_BLOCKS} blocks"),
        ));
    }
    let ch = conn.channel(t.channel)?;
    let local = conn.region(t.region)?;
    let remote = RegionDescriptor::decode(&t.descriptor)
        .ok_or_else(|| OpError::new(ErrorCode::InvalidArgument, "not a region descriptor"))?;
    let blocks: Vec<Block> = t
        .blocks
        .iter()
        .map(|b| Block {
            local: b.local,
            remote: b.remote,
            len: b.len,
        })
        .collect();
    let deadline = match t.deadline_ms {
        0 => conn.hub.limits.transfer_deadline,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let peer = ch.ch.peer();
    let run = async {
        if write {
            peer.write(&local.region, &remote, &blocks, t.notify).await
        } else {
            peer.read(&local.region, &remote, &blocks, t.notify).await
        }
    };
    let report = tokio::time::timeout(deadline, run).await.map_err(|_| {
        OpError::new(
            ErrorCode::DeadlineExceeded,
            "the transfer's deadline passed",
        )
    })??;
    Ok(SidecarMsg::Transferred {
        bytes: report.bytes,
        blocks: u32::try_from(report.blocks).unwrap_or(u32::MAX),
        elapsed_ns: u64::try_from(report.elapsed.as_nanos()).unwrap_or(u64::MAX),
    })
}
