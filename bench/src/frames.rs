//! Workload `frames`: what the session layer costs above the transport. Round trips of one
//! `size`-byte data frame through the transport's own frame interface, with no session
//! (`Transport::listen`/`Transport::connect`, `FrameSink::push` and `FrameSink::poll_flush`,
//! `FrameStream::poll_recv`), against coordination-channel round trips of the same size between
//! two nodes on the same transport ([`FabricPair`], as `pingpong`'s fabric side).
//!
//! The raw side is one connection between two transports of the run's kind, built as the nodes'
//! are, whose listening end sends every frame it receives straight back ([`RawFrames`]). The
//! client pushes one data frame (`FLAG_FIRST | FLAG_LAST`, coordination class, channel 7),
//! flushes it, and waits for the echo.
//!
//! Both are warmed up for `warmup`, then measured in alternating slices of about half a second
//! (fabric first, then frames, then frames first...) until each has been measured for
//! `duration`, as in `pingpong`. The ratios are fabric / frames. Both pairs stay connected for
//! the whole run: with `--busy-poll` over verbs the idle pair's connections spin too, so both
//! sides' figures include the other pair's pollers.

use std::time::{Duration, Instant};

use agentfabric::Config;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::args::Workload;
use crate::devices::Devices;
use crate::error::BenchResult;
use crate::pair::{fabric_stats_json, fabric_stats_words, FabricPair};
use crate::pinger::Pinger;
use crate::raw_frames::{echo_note, RawFrames};
use crate::report::{fmt_ratio, new_histogram, progress, ratio, Output, Summary, Table};
use crate::settings::Settings;

/// Longest measured slice before switching to the other side.
const SLICE: Duration = Duration::from_millis(500);

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let pair = FabricPair::new(s, Config::default(), "frames").await?;
    let mut fabric = Pinger::Fabric(pair.coordination_pinger(s.size).await?);
    let raw_frames = RawFrames::new(s).await?;
    let echo_error = raw_frames.echo_error();
    let mut raw = Pinger::Frames(Box::new(raw_frames));

    let work = async {
        let mut hf = new_histogram();
        let mut hr = new_histogram();
        progress("warming up fabric and raw transport frames");
        fabric.run_until(Instant::now() + s.warmup, None).await?;
        raw.run_until(Instant::now() + s.warmup, None).await?;

        let slices = (s.duration.as_secs_f64() / SLICE.as_secs_f64())
            .ceil()
            .max(1.0) as u32;
        let slice = s.duration / slices;
        progress(&format!(
            "measuring {slices} interleaved slices of {:.3} s each",
            slice.as_secs_f64()
        ));
        for i in 0..slices {
            if i % 2 == 0 {
                fabric
                    .run_until(Instant::now() + slice, Some(&mut hf))
                    .await?;
                raw.run_until(Instant::now() + slice, Some(&mut hr)).await?;
            } else {
                raw.run_until(Instant::now() + slice, Some(&mut hr)).await?;
                fabric
                    .run_until(Instant::now() + slice, Some(&mut hf))
                    .await?;
            }
        }
        BenchResult::Ok((hf, hr))
    };
    let limit = s.phase_limit() * 2;
    let (hf, hr): (Histogram<u64>, Histogram<u64>) =
        tokio::time::timeout(limit, work).await.map_err(|_| {
            format!(
                "the frames measurement did not finish within {limit:?}{}",
                echo_note(&echo_error)
            )
        })??;

    let fabric_sum = Summary::from_histogram(&hf);
    let frames_sum = Summary::from_histogram(&hr);
    let stats = match fabric.as_fabric() {
        Some(f) => fabric_stats_json(&pair, f),
        None => serde_json::Value::Null,
    };
    let r = |f: fn(&Summary) -> f64| ratio(f(&fabric_sum), f(&frames_sum));
    let r50 = r(|x| x.p50_us);
    let r99 = r(|x| x.p99_us);
    let r999 = r(|x| x.p999_us);

    let json = json!({
        "transport": s.transport.name(),
        "workload": Workload::Frames.name(),
        "size_bytes": s.size,
        "duration_s": s.duration.as_secs_f64(),
        "warmup_s": s.warmup.as_secs_f64(),
        "threads": s.threads,
        "busy_poll": s.busy_poll,
        "spin_us": s.spin_us(),
        "devices": s.devices.as_ref().map(Devices::to_json),
        "version": env!("CARGO_PKG_VERSION"),
        "fabric": fabric_sum.to_json(None),
        "frames": frames_sum.to_json(None),
        "ratio_p50": r50,
        "ratio_p99": r99,
        "ratio_p999": r999,
        "fabric_stats": stats,
    });

    let mut t = Table::new(&format!(
        "agentfabric {} bench: transport={} workload=frames size={} B duration={:.2} s \
         warmup={:.2} s threads={}",
        env!("CARGO_PKG_VERSION"),
        s.transport,
        s.size,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.threads
    ));
    t.row(
        "fabric",
        &fabric_sum,
        &format!(
            "fabric/frames: p50 {} p99 {} p99.9 {}",
            fmt_ratio(r50),
            fmt_ratio(r99),
            fmt_ratio(r999)
        ),
    );
    t.row(
        &format!("{} frames", s.transport),
        &frames_sum,
        "no session",
    );
    t.line(&format!("session: {}", fabric_stats_words(&stats)));
    Ok(Output {
        json,
        table: t.finish(),
    })
}
