//! Workload `mixed`: 64-byte coordination round trips while bulk traffic to the same peer (a bulk
//! channel, or region transfers) is kept saturated.
//!
//! Phases:
//! 1. `idle`: coordination round trips alone (default configuration);
//! 2. `bulk_solo`: bulk alone (`bulk_solo_mb_s`);
//! 3. `loaded`: round trips while one task keeps the bulk path full (priorities on, the
//!    default): with `--bulk-api channel` (the default) it keeps a bulk channel's send queue full
//!    of `block`-byte messages, and `bulk_mb_s` is counted at the receiver; with
//!    `--bulk-api transfer` it writes batches of `block`-byte blocks from a registered region into
//!    the peer's ([`agentfabric::Peer::write`], a KV-cache hand-off), and `bulk_mb_s` counts the
//!    bytes of completed batches; either way over the measured part;
//! 4. `bulk_baseline`: the raw streaming baseline of the same block size (raw TCP for `tcp`, a
//!    tokio mpsc channel for `mem`; for `verbs`, perftest's `ib_write_bw` from the same lab
//!    boot, given with `--perftest`, else null), `warmup` then `duration`;
//! 5. `fifo`: as `loaded`, on a fresh pair of nodes built with `priorities: false`, `warmup` then
//!    `duration`.
//!
//! Phases 1 to 3, whose figures are compared with each other, are interleaved: [`ROUNDS`]
//! rounds of idle, solo and loaded slices, each slice `duration / ROUNDS` long after a warm-up
//! of `warmup / ROUNDS`. A machine's speed drifts between seconds (bulk alone moved 2.7 GB/s in
//! one run and 4.4 GB/s in the next); slices taken side by side see the same drift.
//!
//! Phases 1 to 3 use one pair of nodes, so its session counters in `fabric_stats` are
//! cumulative; the idle and loaded slices each use a coordination channel of their own, so the
//! loaded channel's queueing-delay histogram covers the loaded slices (and their warm-ups)
//! only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfabric::{Block, Bytes, Channel, Class, Config, Peer, Region};
use serde_json::json;
use tokio::task::JoinHandle;

use super::report::{fmt_ratio, ratio, round2, round3, Summary, Table};
use super::{
    baseline, fabric_stats_json, new_histogram, progress, BenchResult, BulkApi, FabricPair, Pinger,
    Settings, TransportKind,
};
use super::{Output, Workload};

/// Size of the coordination messages.
pub const COORDINATION_SIZE: usize = 64;

/// Rounds of idle, bulk-alone and loaded slices (see the module docs).
const ROUNDS: u32 = 4;

/// Bytes of the regions a transfer load cycles through (rounded down to whole blocks).
const TRANSFER_SPAN: u64 = 64 << 20;
/// Blocks per region write of a transfer load: small batches, so that the bytes counted at each
/// batch's completion track the rate closely.
const TRANSFER_BATCH: usize = 16;
/// Most blocks a transfer load's regions hold, whatever the block size.
const TRANSFER_MAX_BLOCKS: u64 = 4096;

/// What the bulk load sends, and where its delivered bytes are counted.
enum BulkSource {
    /// `block`-byte messages on a bulk channel, counted by the receiving node.
    Channel { channel: Channel, block: Bytes },
    /// Region writes of `batches`, counted as each batch completes (the blocks have then landed
    /// in the peer's region).
    Transfer {
        peer: Peer,
        src: Region,
        dst: Region,
        batches: Arc<Vec<Vec<Block>>>,
        landed: Arc<AtomicU64>,
    },
}

impl BulkSource {
    fn new(pair: &FabricPair, api: BulkApi, size: usize) -> BenchResult<BulkSource> {
        Ok(match api {
            BulkApi::Channel => BulkSource::Channel {
                channel: pair.peer.channel(Class::Bulk, 3)?,
                block: Bytes::from(vec![0x5au8; size]),
            },
            BulkApi::Transfer => {
                let block = size as u64;
                let count = (TRANSFER_SPAN / block).clamp(1, TRANSFER_MAX_BLOCKS);
                let (src, dst, blocks) = pair.region_pair(block, count)?;
                BulkSource::Transfer {
                    peer: pair.peer.clone(),
                    src,
                    dst,
                    batches: Arc::new(blocks.chunks(TRANSFER_BATCH).map(<[_]>::to_vec).collect()),
                    landed: Arc::new(AtomicU64::new(0)),
                }
            }
        })
    }

    /// Bytes the load's sender walks through: what the raw streaming baseline walks too.
    fn span(&self) -> usize {
        match self {
            BulkSource::Channel { block, .. } => block.len(),
            BulkSource::Transfer { src, .. } => src.len() as usize,
        }
    }

    /// The counter of bytes delivered.
    fn delivered<'a>(&'a self, pair: &'a FabricPair) -> &'a AtomicU64 {
        match self {
            BulkSource::Channel { .. } => &pair.bulk_received,
            BulkSource::Transfer { landed, .. } => landed,
        }
    }
}

/// A task that keeps the bulk path full: a bulk channel's send queue, or region writes back to
/// back.
struct BulkLoad<'a> {
    source: &'a BulkSource,
    task: JoinHandle<BenchResult<()>>,
}

impl<'a> BulkLoad<'a> {
    fn start(source: &'a BulkSource) -> BulkLoad<'a> {
        let task = match source {
            BulkSource::Channel { channel, block } => {
                let (ch, block) = (channel.clone(), block.clone());
                tokio::spawn(async move {
                    loop {
                        ch.send(block.clone()).await?;
                    }
                })
            }
            BulkSource::Transfer {
                peer,
                src,
                dst,
                batches,
                landed,
            } => {
                let (peer, src, remote) = (peer.clone(), src.clone(), dst.descriptor());
                let (batches, landed) = (batches.clone(), landed.clone());
                tokio::spawn(async move {
                    for batch in batches.iter().cycle() {
                        let done = peer.write(&src, &remote, batch, None).await?;
                        landed.fetch_add(done.bytes, Ordering::Relaxed);
                    }
                    Ok(())
                })
            }
        };
        BulkLoad { source, task }
    }

    /// Stops sending and waits until what was queued has been received, so that the next phase
    /// starts on an empty link.
    async fn stop(self) -> BenchResult<()> {
        self.task.abort();
        // Cancelled is the expected outcome; an error means the session failed first.
        if let Ok(Err(e)) = self.task.await {
            return Err(format!("bulk sender failed: {e}").into());
        }
        let drained = async {
            match self.source {
                BulkSource::Channel { channel, .. } => channel.flush().await?,
                // Transfers share one ordered channel to the peer: a last one-block write
                // completes after every block the cancelled batch had sent.
                BulkSource::Transfer {
                    peer,
                    src,
                    dst,
                    batches,
                    ..
                } => {
                    peer.write(src, &dst.descriptor(), &batches[0][..1], None)
                        .await?;
                }
            }
            BenchResult::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(30), drained)
            .await
            .map_err(|_| "the bulk load did not drain within 30 s")??;
        Ok(())
    }
}

/// Bulk throughput in MB/s from a counter of delivered bytes and a snapshot of it.
fn mb_s(delivered: &AtomicU64, start: (u64, Instant)) -> f64 {
    let (b1, t1) = (delivered.load(Ordering::Relaxed), Instant::now());
    let secs = (t1 - start.1).as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    b1.saturating_sub(start.0) as f64 / secs / 1e6
}

fn snapshot(delivered: &AtomicU64) -> (u64, Instant) {
    (delivered.load(Ordering::Relaxed), Instant::now())
}

/// Runs coordination round trips while bulk runs: returns their summary and the bulk MB/s
/// counted over the measured part.
///
/// A fresh coordination channel is opened for the phase, so that its statistics cover this
/// phase only; they are returned with the summary.
async fn loaded_phase(
    pair: &FabricPair,
    bulk: &BulkSource,
    s: &Settings,
) -> BenchResult<(Summary, f64, serde_json::Value)> {
    let fabric = pair.coordination_pinger(COORDINATION_SIZE).await?;
    let mut coord = Pinger::Fabric(fabric);
    let load = BulkLoad::start(bulk);
    let delivered = bulk.delivered(pair);
    let work = async {
        coord.run_until(Instant::now() + s.warmup, None).await?;
        let start = snapshot(delivered);
        let mut h = new_histogram();
        coord
            .run_until(Instant::now() + s.duration, Some(&mut h))
            .await?;
        BenchResult::Ok((Summary::from_histogram(&h), mb_s(delivered, start)))
    };
    let limit = s.phase_limit();
    let r = tokio::time::timeout(limit, work).await;
    load.stop().await?;
    let (summary, mb_s) =
        r.map_err(|_| format!("a loaded phase did not finish within {limit:?}"))??;
    let stats = match coord.as_fabric() {
        Some(f) => fabric_stats_json(pair, f),
        None => serde_json::Value::Null,
    };
    Ok((summary, mb_s, stats))
}

/// What the interleaved rounds measured.
struct Rounds {
    idle: Summary,
    loaded: Summary,
    bulk_solo: f64,
    bulk_loaded: f64,
    stats_loaded: serde_json::Value,
}

/// Bytes delivered and seconds measured, summed over slices.
#[derive(Default)]
struct Rate {
    bytes: u64,
    secs: f64,
}

impl Rate {
    /// Adds what `delivered` counted since `start`.
    fn add(&mut self, delivered: &AtomicU64, start: (u64, Instant)) {
        self.bytes += delivered.load(Ordering::Relaxed).saturating_sub(start.0);
        self.secs += start.1.elapsed().as_secs_f64();
    }

    fn mb_s(&self) -> f64 {
        if self.secs <= 0.0 {
            return 0.0;
        }
        self.bytes as f64 / self.secs / 1e6
    }
}

/// Phases idle, bulk_solo and loaded, in [`ROUNDS`] rounds of one slice each.
async fn interleaved(pair: &FabricPair, bulk: &BulkSource, s: &Settings) -> BenchResult<Rounds> {
    let (slice, warmup) = (s.duration / ROUNDS, s.warmup / ROUNDS);
    let delivered = bulk.delivered(pair);
    let mut idle_coord = Pinger::Fabric(pair.coordination_pinger(COORDINATION_SIZE).await?);
    let mut loaded_coord = Pinger::Fabric(pair.coordination_pinger(COORDINATION_SIZE).await?);
    let (mut idle, mut loaded) = (new_histogram(), new_histogram());
    let (mut solo_rate, mut loaded_rate) = (Rate::default(), Rate::default());
    for _ in 0..ROUNDS {
        idle_coord.run_until(Instant::now() + warmup, None).await?;
        idle_coord
            .run_until(Instant::now() + slice, Some(&mut idle))
            .await?;

        let load = BulkLoad::start(bulk);
        tokio::time::sleep(warmup).await;
        let start = snapshot(delivered);
        tokio::time::sleep(slice).await;
        solo_rate.add(delivered, start);
        load.stop().await?;

        let load = BulkLoad::start(bulk);
        loaded_coord
            .run_until(Instant::now() + warmup, None)
            .await?;
        let start = snapshot(delivered);
        let r = loaded_coord
            .run_until(Instant::now() + slice, Some(&mut loaded))
            .await;
        loaded_rate.add(delivered, start);
        load.stop().await?;
        r?;
    }
    let stats_loaded = match loaded_coord.as_fabric() {
        Some(f) => fabric_stats_json(pair, f),
        None => serde_json::Value::Null,
    };
    Ok(Rounds {
        idle: Summary::from_histogram(&idle),
        loaded: Summary::from_histogram(&loaded),
        bulk_solo: solo_rate.mb_s(),
        bulk_loaded: loaded_rate.mb_s(),
        stats_loaded,
    })
}

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let limit = s.phase_limit();

    let pair = FabricPair::new(s, Config::default(), "prio").await?;
    let bulk = BulkSource::new(&pair, s.bulk_api, s.size)?;

    progress(&format!(
        "phases idle, bulk_solo and loaded (priorities on): {ROUNDS} interleaved rounds"
    ));
    let rounds = tokio::time::timeout(limit * ROUNDS, interleaved(&pair, &bulk, s))
        .await
        .map_err(|_| "the interleaved idle, bulk_solo and loaded phases did not finish")??;
    let Rounds {
        idle,
        loaded,
        bulk_solo,
        bulk_loaded,
        stats_loaded,
    } = rounds;

    let (base_name, bulk_base) = match s.transport {
        TransportKind::Tcp | TransportKind::Mem => {
            let tcp = s.transport == TransportKind::Tcp;
            let name = if tcp { "raw-tcp-stream" } else { "tokio-mpsc" };
            progress(&format!("phase bulk_baseline: {name} streaming"));
            let mb_s =
                baseline::stream_mb_s(tcp, s.size, bulk.span(), s.warmup, s.duration).await?;
            (name, Some(mb_s))
        }
        TransportKind::Verbs => (
            "ib_write_bw",
            super::verbs::Perftest::load(s.perftest.as_ref())?
                .and_then(|p| p.write_bw_mb_s(s.size)),
        ),
        TransportKind::Quic => unreachable!("mixed over quic is refused in bench::run"),
    };
    drop(bulk);
    drop(pair);

    progress("phase fifo: the same with priorities off");
    let fifo_config = Config {
        priorities: false,
        ..Default::default()
    };
    let pair = FabricPair::new(s, fifo_config, "fifo").await?;
    let bulk = BulkSource::new(&pair, s.bulk_api, s.size)?;
    let (fifo, bulk_fifo, stats_fifo) = loaded_phase(&pair, &bulk, s).await?;
    drop(bulk);
    drop(pair);

    let r_loaded = ratio(loaded.p99_us, idle.p99_us);
    let r_fifo = ratio(fifo.p99_us, idle.p99_us);
    let r_bulk = ratio(bulk_loaded, bulk_solo);
    let json = json!({
        "transport": s.transport.name(),
        "workload": Workload::Mixed.name(),
        "size_bytes": COORDINATION_SIZE,
        "block_bytes": s.size,
        "bulk_api": s.bulk_api.name(),
        "duration_s": s.duration.as_secs_f64(),
        "warmup_s": s.warmup.as_secs_f64(),
        "threads": s.threads,
        "busy_poll": s.busy_poll,
        "version": env!("CARGO_PKG_VERSION"),
        "idle": idle.to_json(None),
        "loaded": loaded.to_json(None),
        "fifo": fifo.to_json(None),
        "bulk_mb_s": round2(bulk_loaded),
        "bulk_solo_mb_s": round2(bulk_solo),
        "ratio_loaded_idle_p99": r_loaded,
        "ratio_fifo_idle_p99": r_fifo,
        "ratio_bulk_loaded_solo": r_bulk,
        "fifo_bulk_mb_s": round2(bulk_fifo),
        "bulk_baseline": { "name": base_name, "mb_s": bulk_base.map(round2) },
        "fabric_stats": { "loaded": stats_loaded, "fifo": stats_fifo },
    });

    let mut t = Table::new(&format!(
        "agentfabric {} bench: transport={} workload=mixed coordination={} B bulk block={} B \
         by {} duration={:.2} s/phase warmup={:.2} s threads={}",
        env!("CARGO_PKG_VERSION"),
        s.transport,
        COORDINATION_SIZE,
        s.size,
        s.bulk_api.name(),
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.threads
    ));
    t.row("idle", &idle, "");
    t.row(
        "loaded (priorities)",
        &loaded,
        &format!(
            "p99 / idle p99 = {}; bulk {:.1} MB/s",
            fmt_ratio(r_loaded),
            bulk_loaded
        ),
    );
    t.row(
        "fifo (no priorities)",
        &fifo,
        &format!(
            "p99 / idle p99 = {}; bulk {:.1} MB/s",
            fmt_ratio(r_fifo),
            bulk_fifo
        ),
    );
    t.line(&format!(
        "bulk: solo {:.1} MB/s, during loaded {:.1} MB/s (ratio {}), {} {}",
        bulk_solo,
        bulk_loaded,
        fmt_ratio(r_bulk.map(round3)),
        base_name,
        bulk_base.map_or("not given".to_owned(), |b| format!("{b:.1} MB/s"))
    ));
    t.line(&format!("fabric_stats loaded: {stats_loaded}"));
    t.line(&format!("fabric_stats fifo: {stats_fifo}"));
    Ok(Output {
        json,
        table: t.finish(),
    })
}
