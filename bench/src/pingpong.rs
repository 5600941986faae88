//! Workload `pingpong`: coordination-channel round trips of `size` bytes, fabric vs baseline.
//!
//! The client sends on a coordination channel with plain `send` and waits with `recv`; the
//! server's task receives and sends the same bytes back on the same channel. The baseline (raw
//! TCP for `tcp`, raw quinn for `quic`, a tokio mpsc pair for `mem`) does the same with the same
//! size. For `verbs` the baseline is perftest's `ib_send_lat` from the same lab boot, as round
//! trips ([`crate::perftest`]); the fabric is then measured alone.
//!
//! Both are warmed up for `warmup`, then measured in alternating slices of about half a second
//! (fabric first, then baseline, then baseline first...) until each has been measured for
//! `duration`, so slow drifts of a shared machine hit both alike. Every round trip after the
//! warm-up is recorded.

use std::time::{Duration, Instant};

use agentfabric::Config;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::args::TransportKind;
use crate::baseline::BaselinePinger;
use crate::devices::Devices;
use crate::error::BenchResult;
use crate::pacer::Pacer;
use crate::pair::{fabric_stats_json, fabric_stats_words, FabricPair};
use crate::perftest::Perftest;
use crate::pinger::Pinger;
use crate::quic::RawQuinn;
use crate::report::{fmt_ratio, new_histogram, progress, ratio, Output, Summary, Table};
use crate::settings::Settings;

/// Longest measured slice before switching to the other side.
const SLICE: Duration = Duration::from_millis(500);

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let pair = FabricPair::new(s, Config::default(), "pingpong").await?;
    let mut fabric = Pinger::Fabric(pair.coordination_pinger(s.size).await?);
    // `None`: an external baseline (perftest), not measured here.
    let (mut base, base_name) = match s.transport {
        TransportKind::Tcp => {
            let b = BaselinePinger::raw_tcp(s.size).await?;
            let name = b.name();
            (Some(Pinger::Baseline(b)), name)
        }
        TransportKind::Mem => {
            let b = BaselinePinger::mpsc(s.size);
            let name = b.name();
            (Some(Pinger::Baseline(b)), name)
        }
        TransportKind::Quic => (
            Some(Pinger::Quinn(Box::new(RawQuinn::new(s.size).await?))),
            "raw-quinn",
        ),
        TransportKind::Verbs => (None, "ib_send_lat"),
    };

    let work = async {
        let mut hf = new_histogram();
        let mut hb = new_histogram();
        let Some(base) = base.as_mut() else {
            progress("measuring the fabric (the baseline is perftest's, from --perftest)");
            fabric
                .warm_then_record(s.warmup, s.duration, &mut hf, &mut Pacer::back_to_back())
                .await?;
            return BenchResult::Ok((hf, hb));
        };
        progress(&format!("warming up fabric and {base_name}"));
        let t = Instant::now() + s.warmup;
        fabric.run_until(t, None).await?;
        let t = Instant::now() + s.warmup;
        base.run_until(t, None).await?;

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
                base.run_until(Instant::now() + slice, Some(&mut hb))
                    .await?;
            } else {
                base.run_until(Instant::now() + slice, Some(&mut hb))
                    .await?;
                fabric
                    .run_until(Instant::now() + slice, Some(&mut hf))
                    .await?;
            }
        }
        BenchResult::Ok((hf, hb))
    };
    let limit = s.phase_limit() * 2;
    let (hf, hb): (Histogram<u64>, Histogram<u64>) = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("the pingpong measurement did not finish within {limit:?}"))??;

    let fabric_sum = Summary::from_histogram(&hf);
    let base_sum = match base {
        Some(_) => Some(Summary::from_histogram(&hb)),
        None => Perftest::load(s.perftest.as_ref())?.and_then(|p| p.send_lat_round_trip(s.size)),
    };
    if base_sum.is_none() {
        progress(&format!(
            "no {base_name} figures for {} B (run through soft-roce/lab bench): baseline null",
            s.size
        ));
    }
    let stats = match fabric.as_fabric() {
        Some(f) => fabric_stats_json(&pair, f),
        None => serde_json::Value::Null,
    };
    let r = |f: fn(&Summary) -> f64| base_sum.and_then(|b| ratio(f(&fabric_sum), f(&b)));
    let r50 = r(|x| x.p50_us);
    let r99 = r(|x| x.p99_us);
    let r999 = r(|x| x.p999_us);

    let json = json!({
        "transport": s.transport.name(),
        "workload": "pingpong",
        "size_bytes": s.size,
        "duration_s": s.duration.as_secs_f64(),
        "warmup_s": s.warmup.as_secs_f64(),
        "threads": s.threads,
        "busy_poll": s.busy_poll,
        "spin_us": s.spin_us(),
        "devices": s.devices.as_ref().map(Devices::to_json),
        "version": env!("CARGO_PKG_VERSION"),
        "fabric": fabric_sum.to_json(None),
        "baseline": base_sum.map(|b| b.to_json(Some(base_name))),
        "ratio_p50": r50,
        "ratio_p99": r99,
        "ratio_p999": r999,
        "fabric_stats": stats,
    });

    let mut t = Table::new(&format!(
        "agentfabric {} bench: transport={} workload=pingpong size={} B duration={:.2} s \
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
            "fabric/baseline: p50 {} p99 {} p99.9 {}",
            fmt_ratio(r50),
            fmt_ratio(r99),
            fmt_ratio(r999)
        ),
    );
    match &base_sum {
        Some(b) => t.row(&format!("baseline {base_name}"), b, ""),
        None => t.line(&format!("baseline {base_name}: not given")),
    }
    t.line(&format!("session: {}", fabric_stats_words(&stats)));
    Ok(Output {
        json,
        table: t.finish(),
    })
}
