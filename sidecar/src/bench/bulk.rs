//! Workload `bulk`: batched transfers of `block`-byte blocks between registered regions
//! ([`agentfabric::Peer::write`], or [`agentfabric::Peer::read`] with `--pull`), against raw
//! streaming of the same block size in the same run (raw TCP for `tcp`, a tokio mpsc channel for
//! `mem`), or for `verbs` perftest's `ib_write_bw` (`ib_read_bw` with `--pull`) of the same size
//! from the same lab boot (`--perftest`).
//!
//! The raw TCP baseline moves the same bytes the same way: the writer walks a buffer of the
//! regions' size block by block and the reader fills another of that size, so both sides' copies
//! in and out of the kernel touch as much memory as the transfer's. The stream of one
//! cache-resident block over and over (faster: its copies never leave the caches) is reported
//! beside it as `baseline_hot`.
//!
//! Over verbs the blocks move one-sided, by RDMA WRITE (or READ) between the two regions
//! (registered with the device), as `ib_write_bw` (`ib_read_bw`) moves its own.
//!
//! Each batch writes a region of [`BATCH_BYTES`] (at least one block) into a peer's region of the
//! same size, block by block, as a paged KV-cache hand-off does; batches repeat back to back.
//! Throughput counts the bytes of completed batches over the measured time.

use std::time::Instant;

use agentfabric::Config;
use serde_json::json;

use super::report::{fmt_ratio, ratio, round2, round3, Table};
use super::{baseline, progress, BenchResult, FabricPair, Output, Settings, TransportKind};

/// Bytes moved by one batch, and so the size of the regions it moves them between (rounded down
/// to whole blocks, at least one). `mixed --bulk-api transfer` cycles through regions of this
/// size too.
pub const BATCH_BYTES: u64 = 64 << 20;

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let block = s.size as u64;
    let count = (BATCH_BYTES / block).max(1);
    let pair = FabricPair::new(s, Config::default(), "bulk").await?;
    let (src, dst, blocks) = pair.region_pair(block, count)?;
    let remote = dst.descriptor();

    progress(if s.pull {
        "phase fabric: batched region reads"
    } else {
        "phase fabric: batched region writes"
    });
    let limit = s.phase_limit();
    // A pull reads the peer's region into the local one.
    let batch = || async {
        match s.pull {
            false => pair.peer.write(&src, &remote, &blocks, None).await,
            true => pair.peer.read(&src, &remote, &blocks, None).await,
        }
    };
    let work = async {
        let warm_until = Instant::now() + s.warmup;
        while Instant::now() < warm_until {
            batch().await?;
        }
        let (start, mut bytes) = (Instant::now(), 0u64);
        while start.elapsed() < s.duration {
            bytes += batch().await?.bytes;
        }
        BenchResult::Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
    };
    let fabric_mb_s = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("the fabric phase did not finish within {limit:?}"))??;

    // For tcp the baseline streams between two buffers of the regions' size (as a transfer does,
    // so its copies touch memory the same way); the same stream from one cache-resident block is
    // measured too and reported beside it, since it is the best loopback TCP does at all.
    let (base_name, base_mb_s, hot_mb_s) = match s.transport {
        TransportKind::Verbs => {
            let p = super::verbs::Perftest::load(s.perftest.as_ref())?;
            let name = if s.pull { "ib_read_bw" } else { "ib_write_bw" };
            (name, p.and_then(|p| p.bw_mb_s(s.pull, s.size)), None)
        }
        TransportKind::Tcp => {
            progress("phase baseline: raw TCP streaming between region-sized buffers");
            let span = src.len() as usize;
            let mb_s = baseline::tcp_stream_mb_s(s.size, span, s.warmup, s.duration).await?;
            progress("phase baseline_hot: raw TCP streaming of one cache-resident block");
            let hot = baseline::tcp_stream_mb_s(s.size, s.size, s.warmup, s.duration).await?;
            ("raw-tcp-stream", Some(mb_s), Some(hot))
        }
        TransportKind::Mem | TransportKind::Quic => {
            progress("phase baseline: raw streaming");
            let mb_s = baseline::mpsc_stream_mb_s(s.size, s.warmup, s.duration).await;
            ("tokio-mpsc", Some(mb_s), None)
        }
    };
    let r = base_mb_s.and_then(|b| ratio(fabric_mb_s, b));

    let json = json!({
        "transport": s.transport.name(),
        "workload": "bulk",
        "block_bytes": s.size,
        "direction": if s.pull { "pull" } else { "push" },
        "blocks_per_batch": count,
        "duration_s": round3(s.duration.as_secs_f64()),
        "warmup_s": round3(s.warmup.as_secs_f64()),
        "threads": s.threads,
        "busy_poll": s.busy_poll,
        "version": env!("CARGO_PKG_VERSION"),
        "fabric_mb_s": round2(fabric_mb_s),
        "baseline": {"name": base_name, "mb_s": base_mb_s.map(round2)},
        "ratio": r.map(round3),
        "baseline_hot": hot_mb_s.map(|h| json!({
            "name": "raw-tcp-stream-one-block",
            "mb_s": round2(h),
            "ratio": ratio(fabric_mb_s, h).map(round3),
        })),
    });
    let mut t = Table::new(&format!(
        "bulk over {}: {count} blocks of {} B per batch, {}",
        s.transport.name(),
        s.size,
        if s.pull { "pulled" } else { "pushed" }
    ));
    t.line(&format!("fabric        {fabric_mb_s:>10.1} MB/s"));
    match base_mb_s {
        Some(b) => t.line(&format!("{base_name:<14}{b:>10.1} MB/s")),
        None => t.line(&format!(
            "{base_name:<14}  not given (run through soft-roce/lab bench)"
        )),
    }
    t.line(&format!("ratio         {:>10}", fmt_ratio(r)));
    if let Some(h) = hot_mb_s {
        t.line(&format!(
            "(raw TCP from one cache-resident block: {h:.1} MB/s, ratio {})",
            fmt_ratio(ratio(fabric_mb_s, h))
        ));
    }
    Ok(Output {
        json,
        table: t.finish(),
    })
}
