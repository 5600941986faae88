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
//! (registered with the device), as `ib_write_bw` (`ib_read_bw`) moves its own; over tcp they
//! move one-sided too, on the connection's one-sided lane (`agentfabric-tcp`).
//!
//! Each batch writes a region of [`BATCH_BYTES`] (at least one block) into a peer's region of the
//! same size, block by block, as a paged KV-cache hand-off does; batches repeat back to back.
//! Throughput counts the bytes of completed batches over the measured time. The measured time is
//! split into rounds in which the fabric and the in-process baselines take turns, so a change
//! in the machine's speed during the run weighs on both alike (`rounds` in the JSON: 4, or 1
//! over verbs, whose baseline perftest measured in the lab run).

use std::time::{Duration, Instant};

use agentfabric::Config;
use serde_json::json;

use crate::args::TransportKind;
use crate::baseline;
use crate::devices::Devices;
use crate::error::BenchResult;
use crate::pair::FabricPair;
use crate::perftest::Perftest;
use crate::report::{fmt_ratio, progress, ratio, round2, round3, Output, Table};
use crate::settings::Settings;

/// Bytes moved by one batch, and so the size of the regions it moves them between (rounded down
/// to whole blocks, at least one). `mixed --bulk-api transfer` cycles through regions of this
/// size too.
pub const BATCH_BYTES: u64 = 64 << 20;

/// Rounds the measured time is split into, the fabric and the baselines measured in this
/// process taking turns (see `run`).
const ROUNDS: u32 = 4;

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let block = s.size as u64;
    let count = (BATCH_BYTES / block).max(1);
    let pair = FabricPair::new(s, Config::default(), "bulk").await?;
    let (src, dst, blocks) = pair.region_pair(block, count)?;
    let remote = dst.descriptor();

    // A pull reads the peer's region into the local one.
    let batch = || async {
        match s.pull {
            false => pair.peer.write(&src, &remote, &blocks, None).await,
            true => pair.peer.read(&src, &remote, &blocks, None).await,
        }
    };
    // Batches back to back for `time` (at least one); returns the bytes moved and the time taken.
    let run_batches = |time: Duration| async move {
        let (start, mut bytes) = (Instant::now(), 0u64);
        while bytes == 0 || start.elapsed() < time {
            bytes += batch().await?.bytes;
        }
        BenchResult::Ok((bytes, start.elapsed()))
    };
    let limit = s.phase_limit();
    let bounded = |what: &'static str, f| async move {
        tokio::time::timeout(limit, f)
            .await
            .map_err(|_| format!("the {what} phase did not finish within {limit:?}"))?
    };

    // The baselines measured in this process alternate with the fabric in rounds, so that a
    // change in the machine's speed during the run (another load, the clock) weighs on both
    // alike; perftest's figures come from the lab run, so verbs measures in one round.
    let rounds = match s.transport {
        TransportKind::Verbs => 1,
        _ => ROUNDS,
    };
    let round = s.duration / rounds;
    progress(if s.pull {
        "phase fabric: warm-up (batched region reads)"
    } else {
        "phase fabric: warm-up (batched region writes)"
    });
    bounded("fabric warm-up", run_batches(s.warmup)).await?;
    let (mut bytes, mut elapsed) = (0u64, Duration::ZERO);
    let (mut base, mut hot) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        progress(&format!("round {}/{rounds}: fabric", i + 1));
        let (b, e) = bounded("fabric", run_batches(round)).await?;
        bytes += b;
        elapsed += e;
        // Each baseline opens fresh sockets: the first round warms up as long as the fabric
        // did, the later ones a quarter of that.
        let warmup = if i == 0 { s.warmup } else { s.warmup / 4 };
        match s.transport {
            TransportKind::Verbs => {}
            TransportKind::Tcp => {
                progress(&format!(
                    "round {}/{rounds}: raw TCP streaming between region-sized buffers",
                    i + 1
                ));
                let span = src.len() as usize;
                base.push(baseline::tcp_stream_mb_s(s.size, span, warmup, round).await?);
                progress(&format!(
                    "round {}/{rounds}: raw TCP streaming of one cache-resident block",
                    i + 1
                ));
                hot.push(baseline::tcp_stream_mb_s(s.size, s.size, warmup, round).await?);
            }
            TransportKind::Mem | TransportKind::Quic => {
                progress(&format!("round {}/{rounds}: raw streaming", i + 1));
                base.push(baseline::mpsc_stream_mb_s(s.size, warmup, round).await);
            }
        }
    }
    let fabric_mb_s = bytes as f64 / elapsed.as_secs_f64() / 1e6;
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let (base_name, base_mb_s, hot_mb_s) = match s.transport {
        TransportKind::Verbs => {
            let p = Perftest::load(s.perftest.as_ref())?;
            let name = if s.pull { "ib_read_bw" } else { "ib_write_bw" };
            (name, p.and_then(|p| p.bw_mb_s(s.pull, s.size)), None)
        }
        // For tcp the baseline streams between two buffers of the regions' size (as a transfer
        // does, so its copies touch memory the same way); the same stream from one
        // cache-resident block is reported beside it, since it is the best loopback TCP does.
        TransportKind::Tcp => ("raw-tcp-stream", mean(&base), mean(&hot)),
        TransportKind::Mem | TransportKind::Quic => ("tokio-mpsc", mean(&base), None),
    };
    let r = base_mb_s.and_then(|b| ratio(fabric_mb_s, b));

    let json = json!({
        "transport": s.transport.name(),
        "workload": "bulk",
        "block_bytes": s.size,
        "direction": if s.pull { "pull" } else { "push" },
        "blocks_per_batch": count,
        "duration_s": round3(s.duration.as_secs_f64()),
        "rounds": rounds,
        "warmup_s": round3(s.warmup.as_secs_f64()),
        "threads": s.threads,
        "busy_poll": s.busy_poll,
        "spin_us": s.spin_us(),
        "devices": s.devices.as_ref().map(Devices::to_json),
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
