//! Workload `register`: what sharing the same memory anew costs. A region of `--size` bytes
//! (default 64 MiB) is registered with a node from a buffer that [`agentfabric::Region::reclaim`]
//! handed back, against the baseline of registering a fresh buffer of the same size, measured
//! in the same run, one of each in turn.
//!
//! Over verbs a reclaimed buffer keeps its device registration (an MR for local access; revoking
//! deallocated the memory window that carried its remote key), so registering it again binds a
//! new window; a fresh buffer is pinned page by page. Both buffers are written through before
//! the timed step, as a KV-cache pool in use is, so the baseline times the registration, not
//! page faults. Over tcp and mem nothing is kept and nothing is pinned: both paths take
//! microseconds there.
//!
//! Samples are the time `Node::register_buf` takes; `reclaim` is the time the revocation and
//! hand-back took (withdrawing the key, or deregistering where nothing is kept).

use std::time::{Duration, Instant};

use agentfabric::{AlignedBuf, Config, Node};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::devices::Devices;
use crate::error::BenchResult;
use crate::pair::FabricPair;
use crate::report::{fmt_ratio, new_histogram, progress, ratio, round3, Output, Summary, Table};
use crate::settings::Settings;

/// A buffer of `len` bytes with every page written, as memory in use is.
fn touched(len: usize) -> BenchResult<AlignedBuf> {
    let mut buf = AlignedBuf::new(len)?;
    for page in buf.chunks_mut(4096) {
        page[0] = 1;
    }
    Ok(buf)
}

/// The histograms of the fresh registrations, the reclaimed buffers' and the reclaims.
type Hists = [Histogram<u64>; 3];

fn record(h: &mut Option<&mut Hists>, which: usize, d: Duration) {
    if let Some(h) = h {
        h[which].saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
    }
}

/// What the reclaimed path showed.
#[derive(Default, Clone, Copy)]
struct Seen {
    /// The node registered regions for one-sided access (their descriptor has RDMA access).
    one_sided: bool,
    /// Reclaimed buffers kept their registration.
    kept: bool,
}

/// Until `until` (at least once): one fresh registration, then one of the reclaimed buffer
/// `buf`, which comes back reclaimed; recorded into `hists` when given.
async fn steps(
    node: &Node,
    len: usize,
    mut buf: AlignedBuf,
    until: Instant,
    mut hists: Option<&mut Hists>,
) -> BenchResult<(AlignedBuf, Seen)> {
    loop {
        let fresh = touched(len)?;
        let t0 = Instant::now();
        let region = node.register_buf(fresh);
        record(&mut hists, 0, t0.elapsed());
        // Deregistered and freed, untimed.
        drop(region);

        let t0 = Instant::now();
        let region = node.register_buf(buf);
        record(&mut hists, 1, t0.elapsed());
        let one_sided = region.descriptor().rdma.is_some();
        let t0 = Instant::now();
        buf = region
            .reclaim()
            .await
            .map_err(|_| "a region the benchmark holds the only handle of was not handed back")?;
        record(&mut hists, 2, t0.elapsed());
        if Instant::now() >= until {
            let kept = buf.keeps_registration();
            return Ok((buf, Seen { one_sided, kept }));
        }
    }
}

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let pair = FabricPair::new(s, Config::default(), "register").await?;
    let node = &pair.server;
    let len = s.size;
    let mut hists: Hists = [new_histogram(), new_histogram(), new_histogram()];
    let limit = s.phase_limit();
    let bounded = |what: &'static str, f| async move {
        tokio::time::timeout(limit, f)
            .await
            .map_err(|_| format!("the {what} did not finish within {limit:?}"))?
    };
    // The buffer that goes round: registered, reclaimed, registered again.
    let buf = touched(len)?;
    progress("phase warm-up: fresh and reclaimed registrations in turn");
    let until = Instant::now() + s.warmup;
    let (buf, _) = bounded("warm-up", steps(node, len, buf, until, None)).await?;
    progress("phase measure: fresh and reclaimed registrations in turn");
    let until = Instant::now() + s.duration;
    let (buf, seen) = bounded(
        "measurement",
        steps(node, len, buf, until, Some(&mut hists)),
    )
    .await?;
    drop(buf);

    let [fresh, reused, reclaim] = &hists;
    let (f, r, c) = (
        Summary::from_histogram(fresh),
        Summary::from_histogram(reused),
        Summary::from_histogram(reclaim),
    );
    let (ratio_p50, ratio_p99) = (ratio(r.p50_us, f.p50_us), ratio(r.p99_us, f.p99_us));
    let json = json!({
        "transport": s.transport.name(),
        "workload": "register",
        "size_bytes": len,
        "duration_s": round3(s.duration.as_secs_f64()),
        "warmup_s": round3(s.warmup.as_secs_f64()),
        "threads": s.threads,
        "devices": s.devices.as_ref().map(Devices::to_json),
        "version": env!("CARGO_PKG_VERSION"),
        "one_sided": seen.one_sided,
        "kept_registration": seen.kept,
        "fabric": r.to_json(Some("register-reclaimed")),
        "baseline": f.to_json(Some("register-fresh")),
        "reclaim": c.to_json(None),
        "ratio_p50": ratio_p50,
        "ratio_p99": ratio_p99,
    });
    let mut t = Table::new(&format!(
        "register over {}: regions of {len} B; one-sided access: {}; reclaimed buffers keep \
         their registration: {}",
        s.transport.name(),
        seen.one_sided,
        seen.kept
    ));
    t.row(
        "register reclaimed",
        &r,
        &format!(
            "/ fresh: ratio_p50 {}  ratio_p99 {}",
            fmt_ratio(ratio_p50),
            fmt_ratio(ratio_p99)
        ),
    );
    t.row("register fresh", &f, "baseline");
    t.row("reclaim", &c, "revoke and hand back");
    Ok(Output {
        json,
        table: t.finish(),
    })
}
