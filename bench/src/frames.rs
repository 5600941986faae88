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

use agentfabric::Config;
use hdrhistogram::Histogram;

use crate::args::Workload;
use crate::error::BenchResult;
use crate::pair::{fabric_stats_json, FabricPair};
use crate::pinger::{interleave, Pinger};
use crate::raw_frames::{echo_note, RawFrames};
use crate::report::{Output, Summary};
use crate::round_trips::{report, Against};
use crate::settings::Settings;

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let pair = FabricPair::new(s, Config::default(), "frames").await?;
    let mut fabric = Pinger::Fabric(pair.coordination_pinger(s.size).await?);
    let raw_frames = RawFrames::new(s).await?;
    let echo_error = raw_frames.echo_error();
    let mut raw = Pinger::Frames(Box::new(raw_frames));

    let work = interleave(
        &mut fabric,
        &mut raw,
        "raw transport frames",
        s.warmup,
        s.duration,
    );
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
    let against = Against {
        key: "frames",
        json_name: None,
        label: format!("{} frames", s.transport),
        note: "no session",
        summary: Some(frames_sum),
    };
    Ok(report(
        s,
        Workload::Frames.name(),
        fabric_sum,
        against,
        stats,
    ))
}
