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

use agentfabric::Config;
use hdrhistogram::Histogram;

use crate::args::TransportKind;
use crate::baseline::BaselinePinger;
use crate::error::BenchResult;
use crate::pacer::Pacer;
use crate::pair::{fabric_stats_json, FabricPair};
use crate::perftest::Perftest;
use crate::pinger::{interleave, Pinger};
use crate::quic::RawQuinn;
use crate::report::{new_histogram, progress, Output, Summary};
use crate::round_trips::{report, Against};
use crate::settings::Settings;

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
        let Some(base) = base.as_mut() else {
            progress("measuring the fabric (the baseline is perftest's, from --perftest)");
            let mut hf = new_histogram();
            fabric
                .warm_then_record(s.warmup, s.duration, &mut hf, &mut Pacer::back_to_back())
                .await?;
            return BenchResult::Ok((hf, new_histogram()));
        };
        interleave(&mut fabric, base, base_name, s.warmup, s.duration).await
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
    let against = Against {
        key: "baseline",
        json_name: Some(base_name),
        label: format!("baseline {base_name}"),
        note: "",
        summary: base_sum,
    };
    Ok(report(s, "pingpong", fabric_sum, against, stats))
}
