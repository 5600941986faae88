//! Workload `toolcall`: tool calls (`agentfabric::tools`) of `size`-byte arguments to a tool
//! server whose handler is slowed for a fraction of calls (5% delayed by 20 ms: the injected slow
//! tail), without and then with hedging.
//!
//! One server node serves the tool; the client has two tool-call channels to it (the hedge goes
//! to the other one). Calls are made one at a time (closed loop). Whether a call is slow is drawn
//! per execution from a fixed-seed generator, so a hedge is as likely to be slow as any call.
//! Hedging sends a second request when no answer came within the 93rd percentile of recent
//! latency, capped at 10% extra requests; the first answer wins and the other is cancelled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfabric::tools::{Call, HedgePolicy, ToolClient, ToolServer};
use agentfabric::{Bytes, Class, Config, Node};
use serde_json::json;

use crate::args::TransportKind;
use crate::error::BenchResult;
use crate::quic;
use crate::report::{fmt_ratio, new_histogram, progress, ratio, round2, Output, Summary, Table};
use crate::settings::Settings;

/// Fraction of executions delayed.
pub const SLOW_FRACTION: f64 = 0.05;
/// Delay of a slow execution.
pub const SLOW: Duration = Duration::from_millis(20);
/// Percentile of recent latency after which a hedge goes out.
pub const HEDGE_PERCENTILE: f64 = 93.0;

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

async fn nodes(kind: TransportKind) -> BenchResult<(Node, Node, String)> {
    let cfg = Config::default();
    Ok(match kind {
        TransportKind::Quic => quic::nodes(&cfg, "toolcall")?,
        TransportKind::Tcp => {
            let mk = |n: &str| {
                Node::builder(n)
                    .transport(agentfabric_tcp::TcpTransport::new())
                    .build()
            };
            (
                mk("bench-toolcall-server")?,
                mk("bench-toolcall-client")?,
                "tcp://127.0.0.1:0".into(),
            )
        }
        TransportKind::Mem => {
            let net = agentfabric::mem::MemNetwork::new();
            let mk = |n: &str| Node::builder(n).transport(net.transport()).build();
            (
                mk("bench-toolcall-server")?,
                mk("bench-toolcall-client")?,
                "mem://bench-toolcall".into(),
            )
        }
        #[allow(unreachable_patterns)]
        other => return Err(format!("toolcall does not run over {other}").into()),
    })
}

async fn measure(
    client: &ToolClient,
    hedged: bool,
    args: &Bytes,
    warmup: Duration,
    duration: Duration,
) -> BenchResult<hdrhistogram::Histogram<u64>> {
    let mut h = new_histogram();
    let start = Instant::now();
    let end = start + warmup + duration;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            return Ok(h);
        }
        let mut call = Call::new("work", args.clone(), Duration::from_secs(5));
        if hedged {
            call = call.hedged();
        }
        client.call_with(call).await?;
        if t0 >= start + warmup {
            h.saturating_record((t0.elapsed().as_nanos() as u64).max(1));
        }
    }
}

/// Runs the workload and builds its report.
pub async fn run(s: &Settings) -> BenchResult<Output> {
    let (server, client_node, url) = nodes(s.transport).await?;
    let addr = server.listen(&url).await?;
    let executions = Arc::new(AtomicU64::new(0));
    let mut tools = ToolServer::new();
    let ex = executions.clone();
    tools.register("work", move |req| {
        let n = ex.fetch_add(1, Ordering::Relaxed);
        let slow = (splitmix(n) >> 11) as f64 / (1u64 << 53) as f64 <= SLOW_FRACTION;
        async move {
            if slow {
                tokio::time::sleep(SLOW).await;
            }
            Ok(req.args)
        }
    });
    let serving = tokio::spawn(tools.clone().serve(server.clone()));
    let peer = client_node.connect(&addr).await?;
    let chans = || -> BenchResult<Vec<agentfabric::Channel>> {
        Ok(vec![
            peer.channel(Class::ToolCall, 3)?,
            peer.channel(Class::ToolCall, 3)?,
        ])
    };
    let plain = ToolClient::on_channels(chans()?, HedgePolicy::default());
    let hedging = ToolClient::on_channels(
        chans()?,
        HedgePolicy {
            percentile: HEDGE_PERCENTILE,
            max_extra: 0.1,
            ..HedgePolicy::default()
        },
    );
    let args = Bytes::from(vec![0x5au8; s.size]);
    let limit = s.phase_limit();
    progress("measuring plain calls");
    let hp = tokio::time::timeout(limit, measure(&plain, false, &args, s.warmup, s.duration))
        .await
        .map_err(|_| "the plain phase did not finish in time")??;
    progress("measuring hedged calls");
    let hh = tokio::time::timeout(limit, measure(&hedging, true, &args, s.warmup, s.duration))
        .await
        .map_err(|_| "the hedged phase did not finish in time")??;
    serving.abort();
    let ps = Summary::from_histogram(&hp);
    let hs = Summary::from_histogram(&hh);
    let st = hedging.stats();
    let extra_pct = if st.calls == 0 {
        0.0
    } else {
        round2(100.0 * (st.requests.saturating_sub(st.calls)) as f64 / st.calls as f64)
    };
    let r99 = ratio(hs.p99_us, ps.p99_us);
    let json = json!({
        "transport": s.transport.name(),
        "workload": "toolcall",
        "size_bytes": s.size,
        "duration_s": s.duration.as_secs_f64(),
        "warmup_s": s.warmup.as_secs_f64(),
        "threads": s.threads,
        "version": env!("CARGO_PKG_VERSION"),
        "slow_fraction": SLOW_FRACTION,
        "slow_ms": SLOW.as_secs_f64() * 1e3,
        "hedge_percentile": HEDGE_PERCENTILE,
        "plain": ps.to_json(None),
        "hedged": hs.to_json(None),
        "extra_requests_pct": extra_pct,
        "hedges": st.hedges,
        "hedge_wins": st.hedge_wins,
        "ratio_p99": r99,
        "server": {
            "executions": tools.stats().executions,
            "cancelled": tools.stats().cancelled,
        },
    });
    let mut t = Table::new(&format!(
        "agentfabric {} bench: transport={} workload=toolcall size={} B duration={:.2} s \
         slow tail {}% x {} ms",
        env!("CARGO_PKG_VERSION"),
        s.transport,
        s.size,
        s.duration.as_secs_f64(),
        SLOW_FRACTION * 100.0,
        SLOW.as_millis()
    ));
    t.row("plain", &ps, "");
    t.row(
        "hedged",
        &hs,
        &format!(
            "hedged/plain p99 {} extra requests {extra_pct}%",
            fmt_ratio(r99)
        ),
    );
    Ok(Output {
        json,
        table: t.finish(),
    })
}
