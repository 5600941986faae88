//! Transfers between regions: batches of blocks written (pushed) to or read (pulled) from a
//! peer's region, and the node-side service that executes the peer's transfers on this node's
//! regions.
//!
//! On transports without one-sided operations (mem, quic) a transfer moves over the session's
//! system channel (a bulk-class channel, so it yields to coordination like any bulk traffic): a
//! write sends a small envelope followed by the block's bytes, taken zero-copy from the local
//! region; the target checks the range against the region and copies the bytes in. A read sends
//! the envelope and receives the bytes. At most [`MAX_INFLIGHT_BLOCKS`] blocks (and
//! [`MAX_INFLIGHT_BYTES`]) are in flight per transfer, so a large batch never floods the send
//! queue.
//!
//! One-sided path: when the connection has one-sided operations ([`OneSided`]: RDMA on verbs,
//! the one-sided lane on tcp), both regions are registered in its domain, and the descriptor
//! carries the remote region's [`RdmaAccess`](super::region::RdmaAccess), the blocks move by
//! RDMA WRITE or READ between the two regions: no copy, no work for the target's CPU (on tcp,
//! the target's lane thread `recv`s them straight into the region: the kernel's copy only). The target's checks run first, once per
//! transfer: one request on the system channel checks the descriptor (key, registration, not
//! revoked) and the range the blocks span, so a refused transfer moves nothing and says why, as on
//! the other path. The local region stays locked (shared for a write, exclusive for a read) until
//! the device is done with every operation: the lock rides in each operation's completion. If an
//! operation fails (the target revoked the region meanwhile, the link went down), the queue pair
//! breaks and the session resumes on a new connection; the failed block and the ones after it
//! then go through the session, where the target either takes them or says why not.
//!
//! A one-sided write that notifies its target asks for a token with the check and sends it as
//! the immediate data of its last write: the target's connection reports it once every block
//! has landed, and the target delivers the notification then, with no message after the blocks
//! (`super::notify`). Reads, and writes whose one-sided path failed before the last write was
//! acknowledged, notify with a message on the system channel after the blocks, as on the other
//! transports; the target delivers each notification once either way.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::notify::PendingNotes;
use super::region::{RdmaAccess, Region, RegionDescriptor, RegionTable, Registered};
use crate::api::{Channel, Message, Peer};
use crate::error::{Error, RegionError, Result};
use crate::frame::MSG_REQUEST;
use crate::transport::{OneSided, OneSidedKind, OneSidedOp, RailKeys};

/// Blocks of one transfer in flight at once.
pub const MAX_INFLIGHT_BLOCKS: usize = 32;
/// Bytes of one transfer in flight at once (at least one block is always allowed).
pub const MAX_INFLIGHT_BYTES: u64 = 16 << 20;

/// Whether a transfer with `count` blocks and `bytes` in flight must wait before it sends a
/// block of `next` bytes (at least one block is always allowed).
fn window_full(count: usize, bytes: u64, next: u64) -> bool {
    count >= MAX_INFLIGHT_BLOCKS || (count > 0 && bytes + next > MAX_INFLIGHT_BYTES)
}

/// Answers to a check: go one-sided, or move the blocks through the session.
const CHECK_ONE_SIDED: u8 = 1;
const CHECK_SESSION: u8 = 0;

/// Longest block a one-sided operation carries (an RDMA work request carries less than 2 GiB); a
/// transfer with a longer block goes through the session.
const ONE_SIDED_MAX_BLOCK: u64 = 1 << 30;

/// One block of a transfer: `len` bytes between offset `local` of the local region and offset
/// `remote` of the remote one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Offset in the local region.
    pub local: u64,
    /// Offset in the remote region.
    pub remote: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a completed transfer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    /// Blocks moved.
    pub blocks: usize,
    /// Bytes moved.
    pub bytes: u64,
    /// Time from start to the last block's completion (and the notification's, if any).
    pub elapsed: Duration,
}

/// A notification a peer attached to a transfer into one of this node's regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Name of the peer that made the transfer.
    pub peer: String,
    /// The region written or read.
    pub region: u64,
    /// The value the peer attached.
    pub tag: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Write = 1,
    Read = 2,
    Notify = 3,
    /// Checks a descriptor and a range before one-sided operations on it.
    Check = 4,
    /// As `Check`, for a write that notifies the target with `tag`: the answer may carry a
    /// token for the last write's immediate data (see `super::notify`).
    CheckNotify = 5,
}

/// The fixed envelope that precedes a block (write) or asks for one (read, notify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Envelope {
    op: Op,
    region: RegionDescriptor,
    offset: u64,
    len: u64,
    tag: u64,
}

impl Envelope {
    /// Bytes before the descriptor's rail keys: the op, the descriptor without them, and the
    /// range and tag (the layout before rails; rail keys follow, so a peer that knows no rails
    /// refuses an envelope with them by its length).
    const FIXED: usize = 1 + RegionDescriptor::LEN + 24;

    fn encode(&self) -> Bytes {
        let d = self.region.encode();
        let mut b = BytesMut::with_capacity(Self::FIXED + d.len() - RegionDescriptor::LEN);
        b.put_u8(self.op as u8);
        b.put_slice(&d[..RegionDescriptor::LEN]);
        b.put_u64_le(self.offset);
        b.put_u64_le(self.len);
        b.put_u64_le(self.tag);
        b.put_slice(&d[RegionDescriptor::LEN..]);
        b.freeze()
    }

    fn decode(b: &[u8]) -> Option<Envelope> {
        if b.len() < Self::FIXED
            || b.len() > Self::FIXED + RegionDescriptor::MAX_LEN - RegionDescriptor::LEN
        {
            return None;
        }
        let op = match b[0] {
            1 => Op::Write,
            2 => Op::Read,
            3 => Op::Notify,
            4 => Op::Check,
            5 => Op::CheckNotify,
            _ => return None,
        };
        let mut d = [0u8; RegionDescriptor::MAX_LEN];
        let rails = b.len() - Self::FIXED;
        d[..RegionDescriptor::LEN].copy_from_slice(&b[1..1 + RegionDescriptor::LEN]);
        d[RegionDescriptor::LEN..RegionDescriptor::LEN + rails].copy_from_slice(&b[Self::FIXED..]);
        let region = RegionDescriptor::decode(&d[..RegionDescriptor::LEN + rails])?;
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let base = 1 + RegionDescriptor::LEN;
        Some(Envelope {
            op,
            region,
            offset: word(base),
            len: word(base + 8),
            tag: word(base + 16),
        })
    }
}

/// Region errors travel as text in an error response; this prefix marks them so the initiator
/// gets the typed [`RegionError`] back.
const REGION_ERROR: &str = "region-error";

fn encode_region_error(e: &RegionError) -> String {
    let (code, region, offset, len, region_len) = match *e {
        RegionError::Unknown { region } => (1, region, 0, 0, 0),
        RegionError::BadKey { region } => (2, region, 0, 0, 0),
        RegionError::Revoked { region } => (3, region, 0, 0, 0),
        RegionError::OutOfBounds {
            region,
            offset,
            len,
            region_len,
        } => (4, region, offset, len, region_len),
    };
    format!("{REGION_ERROR}:{code}:{region}:{offset}:{len}:{region_len}: {e}")
}

fn decode_region_error(s: &str) -> Option<RegionError> {
    let mut it = s.strip_prefix(REGION_ERROR)?.strip_prefix(':')?.split(':');
    let mut num = || it.next()?.parse::<u64>().ok();
    let (code, region, offset, len, region_len) = (num()?, num()?, num()?, num()?, num()?);
    Some(match code {
        1 => RegionError::Unknown { region },
        2 => RegionError::BadKey { region },
        3 => RegionError::Revoked { region },
        4 => RegionError::OutOfBounds {
            region,
            offset,
            len,
            region_len,
        },
        _ => return None,
    })
}

/// Turns a remote failure back into a typed error where it is a region error.
fn remote_error(e: Error) -> Error {
    match &e {
        Error::Remote(text) => decode_region_error(text).map_or(e, Error::Region),
        _ => e,
    }
}

impl Peer {
    /// Writes (pushes) `blocks` from the local region `local` into the peer's region `remote`,
    /// and then, with `notify`, tells the peer's node (see `Node::notification`).
    ///
    /// Completes when every block has landed in the remote region (acknowledged by the peer's
    /// node after its bounds check). Fails with [`Error::Transfer`] naming the first block that
    /// failed and why (a [`RegionError`] from either side, the session's error). Every range is
    /// checked before anything is sent; blocks may land in any order. Dropping the future
    /// cancels the transfer: blocks not yet sent are not sent, blocks already sent may land.
    ///
    /// The notification reaches the peer's node once, after every block has landed. Over the
    /// session this future completes after the peer took it; over RDMA it rides on the last
    /// write (with immediate data), and the peer's node may deliver it a moment after this
    /// future completes.
    pub async fn write(
        &self,
        local: &Region,
        remote: &RegionDescriptor,
        blocks: &[Block],
        notify: Option<u64>,
    ) -> Result<TransferReport> {
        self.transfer(OneSidedKind::Write, local, remote, blocks, notify)
            .await
    }

    /// Reads (pulls) `blocks` from the peer's region `remote` into the local region `local`;
    /// otherwise as [`Peer::write`]. Dropping the future may leave the block being copied in
    /// landed in part (a large block is copied in slices, yielding between them).
    pub async fn read(
        &self,
        local: &Region,
        remote: &RegionDescriptor,
        blocks: &[Block],
        notify: Option<u64>,
    ) -> Result<TransferReport> {
        self.transfer(OneSidedKind::Read, local, remote, blocks, notify)
            .await
    }

    async fn transfer(
        &self,
        dir: OneSidedKind,
        local: &Region,
        remote: &RegionDescriptor,
        blocks: &[Block],
        notify: Option<u64>,
    ) -> Result<TransferReport> {
        let start = Instant::now();
        let fail = |block: usize, cause: Error| Error::Transfer {
            block,
            cause: Box::new(cause),
        };
        // Check every range first: a bad batch moves nothing.
        for (i, b) in blocks.iter().enumerate() {
            local
                .inner
                .check(b.local, b.len)
                .map_err(|e| fail(i, Error::Region(e)))?;
            if b.remote
                .checked_add(b.len)
                .is_none_or(|end| end > remote.len)
            {
                let e = RegionError::OutOfBounds {
                    region: remote.region,
                    offset: b.remote,
                    len: b.len,
                    region_len: remote.len,
                };
                return Err(fail(i, Error::Region(e)));
            }
        }
        let ch = self.transfer_channel()?;
        let mut bytes = 0u64;
        // Blocks before this one moved one-sided; the rest go through the session.
        let mut from = 0;
        // The target's token for notifying by the last write's immediate, and whether that
        // write was acknowledged (the notification is then on its way without a message).
        let mut token = None;
        let mut notified = false;
        if let Some(route) = self.one_sided_route(local, remote, blocks) {
            // Only writes carry immediate data.
            let tag = notify.filter(|_| dir == OneSidedKind::Write);
            let check = check_remote(&ch, remote, blocks, tag)
                .await
                .map_err(|(i, e)| fail(i, e))?;
            token = check.token;
            let moved = if check.one_sided {
                one_sided(dir, &route, local, blocks, token).await
            } else {
                Err((0, 0))
            };
            match moved {
                Ok((n, imm_sent)) => {
                    bytes = n;
                    from = blocks.len();
                    notified = imm_sent;
                }
                Err((failed, n)) => {
                    tracing::debug!(
                        peer = %self.name(),
                        block = failed,
                        "one-sided transfer not possible or failed; the rest goes through the \
                         session"
                    );
                    bytes = n;
                    from = failed;
                }
            }
        }
        let mut inflight: JoinSet<(usize, u64, Result<()>)> = JoinSet::new();
        let mut inflight_bytes = 0u64;
        for (i, b) in blocks.iter().copied().enumerate().skip(from) {
            while window_full(inflight.len(), inflight_bytes, b.len) {
                let (idx, len, r) = inflight
                    .join_next()
                    .await
                    .expect("non-empty")
                    .map_err(|_| fail(i, Error::Cancelled))?;
                r.map_err(|e| fail(idx, e))?;
                inflight_bytes -= len;
                bytes += len;
            }
            let env = Envelope {
                op: match dir {
                    OneSidedKind::Write => Op::Write,
                    OneSidedKind::Read => Op::Read,
                },
                region: *remote,
                offset: b.remote,
                len: b.len,
                tag: 0,
            };
            let (ch, local) = (ch.clone(), local.clone());
            inflight_bytes += b.len;
            inflight.spawn(async move {
                let r = match dir {
                    OneSidedKind::Write => write_block(&ch, &local, env, b).await,
                    OneSidedKind::Read => read_block(&ch, &local, env, b).await,
                };
                (i, b.len, r)
            });
        }
        while let Some(done) = inflight.join_next().await {
            let (idx, len, r) = done.map_err(|_| fail(blocks.len(), Error::Cancelled))?;
            r.map_err(|e| fail(idx, e))?;
            bytes += len;
        }
        if let Some(tag) = notify.filter(|_| !notified) {
            // With a token the target delivers the one it holds, unless the last write's
            // immediate delivered it already (that write may have landed even if it failed here).
            let env = Envelope {
                op: Op::Notify,
                region: *remote,
                offset: token.map_or(0, u64::from),
                len: 0,
                tag,
            };
            ch.request_with_head(None, env.encode())
                .await
                .map_err(|e| fail(blocks.len(), remote_error(e)))?;
        }
        Ok(TransferReport {
            blocks: blocks.len(),
            bytes,
            elapsed: start.elapsed(),
        })
    }
}

/// How a transfer's blocks move one-sided: the connection's operations, the remote region's
/// address and key, the local region's key.
struct Route {
    ops: Arc<dyn OneSided>,
    remote: RdmaAccess,
    local_key: u32,
    /// The local registration's keys on its extra devices (see [`RailKeys`]).
    local_rails: RailKeys,
}

impl Peer {
    /// The one-sided route for a transfer between `local` and `remote`, when there is one (see
    /// the module docs).
    fn one_sided_route(
        &self,
        local: &Region,
        remote: &RegionDescriptor,
        blocks: &[Block],
    ) -> Option<Route> {
        let access = remote.rdma?;
        if blocks.iter().any(|b| b.len > ONE_SIDED_MAX_BLOCK) {
            return None;
        }
        let ops = self.shared.tx.one_sided()?;
        let reg = local.inner.registered();
        let r = reg.as_ref().filter(|r| r.domain == ops.domain())?;
        Some(Route {
            local_key: r.reg.local_key(),
            local_rails: r.reg.rail_local_keys(),
            ops,
            remote: access,
        })
    }
}

/// The target's answer to a check.
struct Checked {
    /// Go one-sided; otherwise the target's end of this connection cannot reach the region
    /// (another device than the one it is registered with): use the session.
    one_sided: bool,
    /// For a write that notifies: the token to send as the last write's immediate data.
    token: Option<u32>,
}

/// Asks the target to check `remote` (key, registration, not revoked) and the range `blocks`
/// span, and, for a write that notifies with `tag`, for a notification token. On refusal: the
/// index of the block to blame (the first out of bounds, else 0) and why.
async fn check_remote(
    ch: &Channel,
    remote: &RegionDescriptor,
    blocks: &[Block],
    tag: Option<u64>,
) -> std::result::Result<Checked, (usize, Error)> {
    // The ranges were checked against `remote.len` already: no overflow here.
    let (Some(lo), Some(hi)) = (
        blocks.iter().map(|b| b.remote).min(),
        blocks.iter().map(|b| b.remote + b.len).max(),
    ) else {
        return Ok(Checked {
            one_sided: true,
            token: None,
        });
    };
    let env = Envelope {
        op: if tag.is_some() {
            Op::CheckNotify
        } else {
            Op::Check
        },
        region: *remote,
        offset: lo,
        len: hi - lo,
        tag: tag.unwrap_or(0),
    };
    let e = match ch.request_with_head(None, env.encode()).await {
        Ok(answer) => {
            return Ok(Checked {
                one_sided: answer.first() == Some(&CHECK_ONE_SIDED),
                token: answer
                    .get(1..5)
                    .map(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")))
                    .filter(|&t| t != 0),
            })
        }
        Err(e) => remote_error(e),
    };
    if let Error::Region(RegionError::OutOfBounds { region_len, .. }) = e {
        let beyond = blocks
            .iter()
            .position(|b| b.remote + b.len > region_len)
            .unwrap_or(0);
        let b = blocks[beyond];
        let e = RegionError::OutOfBounds {
            region: remote.region,
            offset: b.remote,
            len: b.len,
            region_len,
        };
        return Err((beyond, Error::Region(e)));
    }
    Err((0, e))
}

/// Moves `blocks` by one-sided operations, at most [`MAX_INFLIGHT_BLOCKS`] (and
/// [`MAX_INFLIGHT_BYTES`]) at a time; the last operation carries `imm` as immediate data.
/// Returns the bytes moved and whether an operation carried `imm`, or the first block that did
/// not move (with the bytes moved before it): the connection failed under it.
async fn one_sided(
    dir: OneSidedKind,
    route: &Route,
    local: &Region,
    blocks: &[Block],
    imm: Option<u32>,
) -> std::result::Result<(u64, bool), (usize, u64)> {
    // The device reads the local region (write) or writes it (read): hold it shared or
    // exclusive, with the region itself (its registration), until the last operation is over.
    let inner = local.inner.clone();
    let (keep, base): (Arc<dyn Send + Sync>, u64) = match dir {
        OneSidedKind::Write => {
            let g = inner.mem.clone().read_owned().await;
            let base = g.as_ptr() as u64;
            (Arc::new((g, inner.clone())), base)
        }
        OneSidedKind::Read => {
            let mut g = inner.mem.clone().write_owned().await;
            let base = g.as_mut_ptr() as u64;
            (Arc::new((g, inner.clone())), base)
        }
    };
    if inner.revoked.load(std::sync::atomic::Ordering::Acquire) {
        // Revoked while waiting for the lock: the session path reports it.
        return Err((0, 0));
    }
    let mut ops = OpsInFlight::default();
    // Zero-length blocks move nothing: the last operation is the last block with bytes.
    let last = blocks.iter().rposition(|b| b.len > 0);
    for (i, b) in blocks.iter().enumerate() {
        if b.len == 0 {
            continue;
        }
        while window_full(ops.pending.len(), ops.bytes, b.len) {
            ops.wait_oldest().await.map_err(|idx| (idx, ops.moved))?;
        }
        let (tx, rx) = oneshot::channel();
        let keep = keep.clone();
        route.ops.post(
            OneSidedOp {
                kind: dir,
                local_addr: base + b.local,
                local_key: route.local_key,
                len: b.len as u32,
                // Wrapping: the address came from the peer; its device refuses a bad one.
                remote_addr: route.remote.addr.wrapping_add(b.remote),
                remote_key: route.remote.rkey,
                local_rails: route.local_rails,
                remote_rails: route.remote.rails,
                imm: imm.filter(|_| Some(i) == last),
            },
            Box::new(move |r| {
                let _ = tx.send(r);
                drop(keep);
            }),
        );
        ops.pending.push_back((i, b.len, rx));
        ops.bytes += b.len;
    }
    while !ops.pending.is_empty() {
        ops.wait_oldest().await.map_err(|idx| (idx, ops.moved))?;
    }
    Ok((ops.moved, imm.is_some() && last.is_some()))
}

/// A transfer's one-sided operations in flight, oldest first.
#[derive(Default)]
struct OpsInFlight {
    /// (block index, length, completion).
    pending: VecDeque<(usize, u64, oneshot::Receiver<std::io::Result<()>>)>,
    /// Bytes in flight.
    bytes: u64,
    /// Bytes of completed operations.
    moved: u64,
}

impl OpsInFlight {
    /// Waits for the oldest operation; `Err(block)` when it failed or was dropped. Operations
    /// spread over several devices may finish out of order: waiting for the oldest first only
    /// holds back the window a little, and keeps the blame on the first block that failed.
    async fn wait_oldest(&mut self) -> std::result::Result<(), usize> {
        let Some((idx, len, rx)) = self.pending.pop_front() else {
            return Ok(());
        };
        match rx.await {
            Ok(Ok(())) => {
                self.bytes -= len;
                self.moved += len;
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, block = idx, "one-sided operation failed");
                Err(idx)
            }
            Err(_) => Err(idx),
        }
    }
}

async fn write_block(ch: &Channel, local: &Region, env: Envelope, b: Block) -> Result<()> {
    // Zero copy: the chunk keeps a read guard on the local region until the peer has it.
    let data = local
        .inner
        .view(b.local, b.len)
        .await
        .map_err(Error::Region)?;
    ch.request_with_head(Some(env.encode()), data)
        .await
        .map(drop)
        .map_err(remote_error)
}

async fn read_block(ch: &Channel, local: &Region, env: Envelope, b: Block) -> Result<()> {
    let data = ch
        .request_with_head(None, env.encode())
        .await
        .map_err(remote_error)?;
    if data.len() as u64 != b.len {
        return Err(Error::Remote(format!(
            "read returned {} bytes for a {}-byte block",
            data.len(),
            b.len
        )));
    }
    local
        .inner
        .store(b.local, &data)
        .await
        .map_err(Error::Region)
}

/// Serves the peer's transfers on this node's regions, for the life of the session.
/// Also delivers the notifications that landed with the peer's writes (see `super::notify`).
pub(crate) async fn serve_transfers(
    peer: Peer,
    regions: Arc<RegionTable>,
    notifications: mpsc::Sender<Notification>,
) {
    let notes = peer.shared.notes.clone();
    loop {
        tokio::select! {
            ch = peer.accept_system_channel() => {
                let Ok(ch) = ch else {
                    // The session is over: what landed still goes out.
                    for (region, tag) in notes.take_landed() {
                        deliver(&notifications, peer.name(), region, tag).await;
                    }
                    return;
                };
                let (regions, notifications, notes, name) = (
                    regions.clone(),
                    notifications.clone(),
                    notes.clone(),
                    peer.name().to_owned(),
                );
                tokio::spawn(async move {
                    let served = serve_channel(&ch, &regions, &notifications, &notes, &name);
                    if let Err(e) = served.await {
                        tracing::debug!(peer = %name, error = %e, "transfer service ended");
                    }
                });
            }
            (region, tag) = notes.next_landed() => {
                deliver(&notifications, peer.name(), region, tag).await;
            }
        }
    }
}

async fn serve_channel(
    ch: &Channel,
    regions: &RegionTable,
    notifications: &mpsc::Sender<Notification>,
    notes: &PendingNotes,
    peer: &str,
) -> Result<()> {
    loop {
        let m = ch.recv().await?;
        let Some(env) = Envelope::decode(&m.body) else {
            tracing::warn!(peer, "malformed transfer envelope; ignored");
            if m.request_id.is_some() {
                ch.respond_error(&m, "malformed transfer envelope").await?;
            }
            continue;
        };
        match env.op {
            Op::Write => {
                // The envelope came as a plain message; the block follows as the request.
                let data = ch.recv_unassembled().await?;
                if data.msg_flags & MSG_REQUEST == 0 {
                    tracing::warn!(peer, "write envelope not followed by its block; ignored");
                    continue;
                }
                let r = match regions.lookup(&env.region) {
                    Ok(r) if data.len() as u64 != env.len => Err(RegionError::OutOfBounds {
                        region: r.id,
                        offset: env.offset,
                        len: data.len() as u64,
                        region_len: r.len,
                    }),
                    Ok(r) => {
                        r.store_pieces(env.offset, data.pieces().map(|p| &p[..]))
                            .await
                    }
                    Err(e) => Err(e),
                };
                let req = Message {
                    body: Bytes::new(),
                    request_id: Some(data.tag),
                };
                answer(ch, &req, r.map(|()| Bytes::new())).await?;
            }
            Op::Read => {
                let r = match regions.lookup(&env.region) {
                    Ok(r) => r.view(env.offset, env.len).await,
                    Err(e) => Err(e),
                };
                answer(ch, &m, r).await?;
            }
            Op::Check | Op::CheckNotify => {
                let here = ch.connection_domain();
                let r = regions.lookup(&env.region).and_then(|r| {
                    // The registration's access and domain, under one lock.
                    let (access, domain) = {
                        let g = r.registered();
                        (
                            g.as_ref().map(Registered::access),
                            g.as_ref().map(|g| g.domain),
                        )
                    };
                    if access != env.region.rdma {
                        // Not the registration the region has: an old or forged descriptor.
                        return Err(RegionError::BadKey { region: r.id });
                    }
                    r.check(env.offset, env.len)?;
                    // One-sided only if this end of the connection is on the region's device.
                    let reachable = domain == here;
                    if !reachable {
                        return Ok(Bytes::from_static(&[CHECK_SESSION]));
                    }
                    let token = (env.op == Op::CheckNotify)
                        .then(|| notes.announce(r.id, env.tag))
                        .flatten();
                    let mut a = vec![CHECK_ONE_SIDED];
                    if let Some(t) = token {
                        a.extend_from_slice(&t.to_le_bytes());
                    }
                    Ok(Bytes::from(a))
                });
                answer(ch, &m, r).await?;
            }
            Op::Notify if env.offset != 0 => {
                // A notification announced at the check: deliver it unless the last write's
                // immediate did (see `super::notify`).
                let token = u32::try_from(env.offset).unwrap_or(0);
                if let Some((region, tag)) = notes.take(token) {
                    deliver(notifications, peer, region, tag).await;
                }
                answer(ch, &m, Ok(Bytes::new())).await?;
            }
            Op::Notify => {
                let r = regions.lookup(&env.region).map(|r| r.id);
                if let Ok(region) = r {
                    deliver(notifications, peer, region, env.tag).await;
                }
                answer(ch, &m, r.map(|_| Bytes::new())).await?;
            }
        }
    }
}

/// Queues a notification for `Node::notification`. Bounded: a node that never reads its
/// notifications slows its writers down.
async fn deliver(notifications: &mpsc::Sender<Notification>, peer: &str, region: u64, tag: u64) {
    let n = Notification {
        peer: peer.to_owned(),
        region,
        tag,
    };
    let _ = notifications.send(n).await;
}

async fn answer(
    ch: &Channel,
    req: &Message,
    r: std::result::Result<Bytes, RegionError>,
) -> Result<()> {
    match r {
        Ok(body) => ch.respond(req, body).await,
        Err(e) => ch.respond_error(req, &encode_region_error(&e)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_and_region_errors_round_trip() {
        let mut env = Envelope {
            op: Op::Read,
            region: RegionDescriptor {
                region: 1,
                len: 2,
                key: 3,
                rdma: None,
            },
            offset: 4,
            len: 5,
            tag: 6,
        };
        assert_eq!(Envelope::decode(&env.encode()), Some(env));
        assert_eq!(Envelope::decode(&env.encode()[1..]), None);
        env.op = Op::Check;
        env.region.rdma = Some(RdmaAccess {
            addr: 0x7f00_dead_b000,
            rkey: 0x1234_5678,
            rails: RailKeys::EMPTY,
        });
        assert_eq!(Envelope::decode(&env.encode()), Some(env));
        // Without rails, the layout before rails existed.
        assert_eq!(env.encode().len(), Envelope::FIXED);
        // A flag byte that promises rail keys the bytes do not hold is refused, not read as
        // "no RDMA" or as fewer rails.
        let flag = 1 + 24;
        let mut bad = env.encode().to_vec();
        bad[flag] = 2;
        assert_eq!(Envelope::decode(&bad), None);
        // Rail keys round-trip, in order; more than MAX_RAILS is refused.
        env.region.rdma.as_mut().unwrap().rails = RailKeys::from_slice(&[7, 8, 9]).unwrap();
        let wire = env.encode();
        assert_eq!(wire.len(), Envelope::FIXED + 12);
        assert_eq!(Envelope::decode(&wire), Some(env));
        assert_eq!(Envelope::decode(&wire[..wire.len() - 4]), None);
        let mut bad = wire.to_vec();
        bad[flag] = 2 + crate::transport::MAX_RAILS as u8;
        bad.resize(
            Envelope::FIXED + RegionDescriptor::LEN + 4 * (1 + crate::transport::MAX_RAILS),
            0,
        );
        assert_eq!(Envelope::decode(&bad), None);
        assert!(RailKeys::from_slice(&[0; crate::transport::MAX_RAILS + 1]).is_none());
        // Any length, however long, is refused without a panic.
        for len in 0..Envelope::FIXED + 2 * RegionDescriptor::MAX_LEN {
            let mut any = vec![0xa5u8; len];
            if let Some(op) = any.first_mut() {
                *op = 4;
            }
            let _ = Envelope::decode(&any);
        }
        let e = RegionError::OutOfBounds {
            region: 9,
            offset: 10,
            len: 11,
            region_len: 12,
        };
        assert_eq!(decode_region_error(&encode_region_error(&e)), Some(e));
        assert_eq!(decode_region_error("something else"), None);
    }
}
