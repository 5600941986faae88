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
//! 4. `bulk_baseline`: the raw streaming baseline of the same block size, `warmup` then
//!    `duration`: for `tcp`, raw TCP streaming one cache-resident block over and over with
//!    `--bulk-api channel` (as the channel load sends one message's buffer), and between buffers
//!    of the transfer regions' size with `--bulk-api transfer` (as the transfers' copies walk
//!    them); for `mem`, a tokio mpsc channel; for `verbs`, perftest's `ib_write_bw` from the same
//!    lab boot, given with `--perftest`, else null. It runs after phases 1 to 3's nodes are
//!    gone;
//! 5. `fifo`: as `loaded`, on a fresh pair of nodes built with `priorities: false`, `warmup` then
//!    `duration`.
//!
//! Phases 1 to 3, whose figures are compared with each other, are interleaved: [`ROUNDS`]
//! rounds of idle, solo and loaded slices, each slice `duration / ROUNDS` long after a warm-up
//! of `warmup / ROUNDS`. A machine's speed drifts between seconds (bulk alone moved 2.7 GB/s in
//! one run and 4.4 GB/s in the next); slices taken side by side see the same drift.
//!
//! The coordination round trips of every phase run back to back, or with
//! `--coord-interval-us N` start at most every N µs ([`crate::pacer`]); only the round trip
//! itself is timed.
//!
//! Phases 1 to 3 use one pair of nodes, so its session counters in `fabric_stats` are
//! cumulative; the idle and loaded slices each use a coordination channel of their own, so the
//! loaded channel's queueing-delay histogram covers the loaded slices (and their warm-ups)
//! only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfabric::{Block, Bytes, Channel, Class, Config, Peer, Region};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::args::{BulkApi, TransportKind, Workload};
use crate::baseline;
use crate::bulk::BATCH_BYTES;
use crate::devices::Devices;
use crate::error::BenchResult;
use crate::pacer::Pacer;
use crate::pair::{fabric_stats_json, fabric_stats_words, FabricPair};
use crate::perftest::Perftest;
use crate::pinger::Pinger;
use crate::rate::Rate;
use crate::report::{
    fmt_ratio, new_histogram, progress, ratio, round2, round3, Output, Summary, Table,
};
use crate::settings::Settings;

/// Size of the coordination messages.
pub const COORDINATION_SIZE: usize = 64;

/// Rounds of idle, bulk-alone and loaded slices (see the module docs).
const ROUNDS: u32 = 4;

/// Blocks per region write of a transfer load: small batches, so that the bytes counted at each
/// batch's completion track the rate closely.
const TRANSFER_BATCH: usize = 16;
/// Most blocks a transfer load's regions hold, whatever the block size.
const TRANSFER_MAX_BLOCKS: u64 = 4096;

/// What the bulk load sends, and where its delivered bytes are counted (`delivered`).
enum BulkSource {
    /// `block`-byte messages on a bulk channel, counted by the receiving node.
    Channel {
        channel: Channel,
        block: Bytes,
        delivered: Arc<AtomicU64>,
    },
    /// Region writes of `batches`, counted as each batch completes (the blocks have then landed
    /// in the peer's region).
    Transfer {
        peer: Peer,
        src: Region,
        dst: Region,
        batches: Arc<Vec<Vec<Block>>>,
        delivered: Arc<AtomicU64>,
    },
}

impl BulkSource {
    fn new(pair: &FabricPair, api: BulkApi, size: usize) -> BenchResult<BulkSource> {
        Ok(match api {
            BulkApi::Channel => BulkSource::Channel {
                channel: pair.peer.channel(Class::Bulk, 3)?,
                block: Bytes::from(vec![0x5au8; size]),
                delivered: pair.bulk_received.clone(),
            },
            BulkApi::Transfer => {
                let block = size as u64;
                let count = (BATCH_BYTES / block).clamp(1, TRANSFER_MAX_BLOCKS);
                let (src, dst, blocks) = pair.region_pair(block, count)?;
                BulkSource::Transfer {
                    peer: pair.peer.clone(),
                    src,
                    dst,
                    batches: Arc::new(blocks.chunks(TRANSFER_BATCH).map(<[_]>::to_vec).collect()),
                    delivered: Arc::new(AtomicU64::new(0)),
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
    fn delivered(&self) -> &AtomicU64 {
        match self {
            BulkSource::Channel { delivered, .. } | BulkSource::Transfer { delivered, .. } => {
                delivered
            }
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
            BulkSource::Channel { channel, block, .. } => {
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
                delivered,
            } => {
                let (peer, src, remote) = (peer.clone(), src.clone(), dst.descriptor());
                let (batches, delivered) = (batches.clone(), delivered.clone());
                tokio::spawn(async move {
                    for batch in batches.iter().cycle() {
                        let done = peer.write(&src, &remote, batch, None).await?;
                        delivered.fetch_add(done.bytes, Ordering::Relaxed);
                    }
                    Ok(())
                })
            }
        };
        BulkLoad { source, task }
    }

    /// Stops sending and waits until what was queued has been received (for transfers, as
    /// nearly as the public API allows: see below), so that the next phase starts on an empty
    /// link.
    async fn stop(self) -> BenchResult<()> {
        self.task.abort();
        // Cancelled is the expected outcome; an error means the session failed first.
        if let Ok(Err(e)) = self.task.await {
            return Err(format!("bulk sender failed: {e}").into());
        }
        let drained = async {
            match self.source {
                BulkSource::Channel { channel, .. } => channel.flush().await?,
                // `Peer::write` promises only that the cancelled batch's blocks already sent
                // may still land, not when. A last one-block write is a best-effort drain: it
                // follows them onto the same session and, in practice, completes once they are
                // through; nothing in the public API makes that certain.
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

/// Coordination round trips on `coord` while `bulk` keeps the bulk path full: `warmup` of
/// them, then `dur` recorded into `hist`. Returns the bulk bytes delivered over the recorded
/// part; the load is stopped (and drained) before this returns, error or not.
async fn loaded_slice(
    coord: &mut Pinger,
    pacer: &mut Pacer,
    bulk: &BulkSource,
    warmup: Duration,
    dur: Duration,
    hist: &mut Histogram<u64>,
) -> BenchResult<Rate> {
    let load = BulkLoad::start(bulk);
    // A round trip's error is returned only after the load is stopped: the load must not
    // outlive the slice.
    let work = async {
        coord
            .run_paced_until(Instant::now() + warmup, None, pacer)
            .await?;
        let (rate, r) = Rate::during(
            bulk.delivered(),
            coord.run_paced_until(Instant::now() + dur, Some(hist), pacer),
        )
        .await;
        r?;
        BenchResult::Ok(rate)
    };
    let r = work.await;
    load.stop().await?;
    r
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
    let mut coord = Pinger::Fabric(pair.coordination_pinger(COORDINATION_SIZE).await?);
    let mut h = new_histogram();
    let mut pacer = Pacer::every(s.coord_interval);
    let slice = loaded_slice(&mut coord, &mut pacer, bulk, s.warmup, s.duration, &mut h);
    let limit = s.phase_limit();
    let rate = tokio::time::timeout(limit, slice)
        .await
        .map_err(|_| format!("a loaded phase did not finish within {limit:?}"))??;
    let stats = match coord.as_fabric() {
        Some(f) => fabric_stats_json(pair, f),
        None => serde_json::Value::Null,
    };
    Ok((Summary::from_histogram(&h), rate.mb_s(), stats))
}

/// What the interleaved rounds measured.
struct Rounds {
    idle: Summary,
    loaded: Summary,
    bulk_solo: f64,
    bulk_loaded: f64,
    stats_loaded: serde_json::Value,
}

/// Phases idle, bulk_solo and loaded, in [`ROUNDS`] rounds of one slice each.
async fn interleaved(pair: &FabricPair, bulk: &BulkSource, s: &Settings) -> BenchResult<Rounds> {
    let (slice, warmup) = (s.duration / ROUNDS, s.warmup / ROUNDS);
    let mut idle_coord = Pinger::Fabric(pair.coordination_pinger(COORDINATION_SIZE).await?);
    let mut loaded_coord = Pinger::Fabric(pair.coordination_pinger(COORDINATION_SIZE).await?);
    let mut idle_pacer = Pacer::every(s.coord_interval);
    let mut loaded_pacer = Pacer::every(s.coord_interval);
    let (mut idle, mut loaded) = (new_histogram(), new_histogram());
    let (mut solo_rate, mut loaded_rate) = (Rate::default(), Rate::default());
    for _ in 0..ROUNDS {
        idle_coord
            .warm_then_record(warmup, slice, &mut idle, &mut idle_pacer)
            .await?;

        let load = BulkLoad::start(bulk);
        solo_rate += baseline::measure(bulk.delivered(), warmup, slice).await;
        load.stop().await?;

        loaded_rate += loaded_slice(
            &mut loaded_coord,
            &mut loaded_pacer,
            bulk,
            warmup,
            slice,
            &mut loaded,
        )
        .await?;
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
    // Three phases' worth of warm-up and measurement, interleaved.
    let rounds_limit = limit * 3;
    let rounds = tokio::time::timeout(rounds_limit, interleaved(&pair, &bulk, s))
        .await
        .map_err(|_| {
            format!(
                "the interleaved idle, bulk_solo and loaded phases did not finish within \
                 {rounds_limit:?}"
            )
        })??;
    let Rounds {
        idle,
        loaded,
        bulk_solo,
        bulk_loaded,
        stats_loaded,
    } = rounds;
    // Phases 1 to 3's nodes go first (their regions, session and transport threads), so that
    // the baseline has the machine to itself as the fabric had.
    let span = bulk.span();
    drop(bulk);
    drop(pair);

    let (base_name, bulk_base) = match s.transport {
        TransportKind::Tcp => {
            progress("phase bulk_baseline: raw-tcp-stream streaming");
            let mb_s = baseline::tcp_stream_mb_s(s.size, span, s.warmup, s.duration).await?;
            ("raw-tcp-stream", Some(mb_s))
        }
        TransportKind::Mem => {
            progress("phase bulk_baseline: tokio-mpsc streaming");
            let mb_s = baseline::mpsc_stream_mb_s(s.size, s.warmup, s.duration).await;
            ("tokio-mpsc", Some(mb_s))
        }
        TransportKind::Verbs => (
            "ib_write_bw",
            Perftest::load(s.perftest.as_ref())?.and_then(|p| p.bw_mb_s(false, s.size)),
        ),
        TransportKind::Quic => unreachable!("mixed over quic is refused in bench::run"),
    };

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
        "coord_interval_us": s.coord_interval.as_micros(),
        "duration_s": s.duration.as_secs_f64(),
        "warmup_s": s.warmup.as_secs_f64(),
        "threads": s.threads,
        "busy_poll": s.busy_poll,
        "spin_us": s.spin_us(),
        "devices": s.devices.as_ref().map(Devices::to_json),
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
         by {} coordination {} duration={:.2} s/phase warmup={:.2} s/phase (idle, bulk_solo and \
         loaded split in {ROUNDS} rounds) threads={}",
        env!("CARGO_PKG_VERSION"),
        s.transport,
        COORDINATION_SIZE,
        s.size,
        s.bulk_api.name(),
        match s.coord_interval.as_micros() {
            0 => "back to back".to_owned(),
            us => format!("every >= {us} us"),
        },
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
    t.line(&format!(
        "session, loaded: {}",
        fabric_stats_words(&stats_loaded)
    ));
    t.line(&format!(
        "session, fifo: {}",
        fabric_stats_words(&stats_fifo)
    ));
    Ok(Output {
        json,
        table: t.finish(),
    })
}
