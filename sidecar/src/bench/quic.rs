//! QUIC in the bench: node transports with development certificates made in memory (mutual TLS,
//! as deployed), and the `pingpong` workload against a raw quinn echo measured in the same run.
//!
//! The baseline is the plainest quinn program with the same TLS configuration (TLS 1.3, mutual
//! TLS, the fabric's ALPN, the same transport settings): one unidirectional stream each way (as
//! the fabric's transport uses); the client writes `size` bytes and reads `size` bytes back, the
//! echo task reads them and writes them back. The fabric and the baseline are measured in
//! alternating slices, as the TCP pingpong is.

use std::time::{Duration, Instant};

use agentfabric::{Config, Node};
use agentfabric_quic::{quinn, DevCa, QuicConfig, QuicTransport};
use hdrhistogram::Histogram;
use serde_json::json;

use super::report::{fmt_ratio, ratio, Summary, Table};
use super::{
    fabric_stats_json, new_histogram, progress, BenchResult, FabricPair, Output, Pinger, Settings,
};

/// Longest measured slice before switching to the other side.
const SLICE: Duration = Duration::from_millis(500);

fn dev_ca() -> BenchResult<&'static DevCa> {
    static CA: std::sync::OnceLock<DevCa> = std::sync::OnceLock::new();
    if let Some(ca) = CA.get() {
        return Ok(ca);
    }
    let ca = DevCa::new("agentfabric bench CA")?;
    Ok(CA.get_or_init(|| ca))
}

/// The QUIC settings of a bench node named `name` (a certificate from an in-memory dev CA).
pub fn config(name: &str) -> BenchResult<QuicConfig> {
    Ok(dev_ca()?.node_config(name)?)
}

/// A node named `name` on QUIC with `cfg`.
pub fn node(name: String, cfg: &Config) -> BenchResult<Node> {
    let t = QuicTransport::new(config(&name)?)?;
    Ok(Node::builder(name)
        .transport(t)
        .config(cfg.clone())
        .build()?)
}

/// (server, client, listen URL) for [`FabricPair::new`].
pub fn nodes(cfg: &Config, tag: &str) -> BenchResult<(Node, Node, String)> {
    Ok((
        node(format!("bench-{tag}-server"), cfg)?,
        node(format!("bench-{tag}-client"), cfg)?,
        "quic://127.0.0.1:0".to_owned(),
    ))
}

/// A raw quinn ping-pong of `size`-byte messages on one bidirectional stream. Dropping it stops
/// the echo task.
pub struct RawQuinn {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    payload: Vec<u8>,
    buf: Vec<u8>,
    server: tokio::task::JoinHandle<()>,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
    _conn: quinn::Connection,
}

impl Drop for RawQuinn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl RawQuinn {
    /// Sets up both endpoints on loopback and the echo task.
    pub async fn new(size: usize) -> BenchResult<RawQuinn> {
        let server_ep = quinn::Endpoint::server(
            config("raw-server")?.quinn_server_config()?,
            "127.0.0.1:0".parse()?,
        )?;
        let addr = server_ep.local_addr()?;
        let mut client_ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        client_ep.set_default_client_config(config("raw-client")?.quinn_client_config()?);
        // One unidirectional stream each way, as the fabric's QUIC transport uses (and as its
        // settings allow: no bidirectional streams).
        let accept = {
            let ep = server_ep.clone();
            tokio::spawn(async move {
                let conn = ep.accept().await.ok_or("no connection")?.await?;
                let recv = conn.accept_uni().await?;
                let send = conn.open_uni().await?;
                BenchResult::Ok((conn, send, recv))
            })
        };
        let conn = client_ep.connect(addr, "127.0.0.1")?.await?;
        let mut send = conn.open_uni().await?;
        // A stream is announced to the peer by its first bytes: make one round trip here.
        let payload = vec![0xa5u8; size];
        send.write_all(&payload).await?;
        let (sconn, mut ssend, mut srecv) = accept.await??;
        let server = tokio::spawn(async move {
            let _conn = sconn;
            let mut buf = vec![0u8; size];
            while srecv.read_exact(&mut buf).await.is_ok() {
                if ssend.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        let recv = conn.accept_uni().await?;
        let mut me = RawQuinn {
            send,
            recv,
            payload,
            buf: vec![0u8; size],
            server,
            _endpoints: (server_ep, client_ep),
            _conn: conn,
        };
        me.recv.read_exact(&mut me.buf).await?;
        Ok(me)
    }

    /// One round trip.
    pub async fn round_trip(&mut self) -> BenchResult<()> {
        self.send.write_all(&self.payload).await?;
        self.recv.read_exact(&mut self.buf).await?;
        Ok(())
    }

    async fn run_until(
        &mut self,
        until: Instant,
        mut h: Option<&mut Histogram<u64>>,
    ) -> BenchResult<()> {
        loop {
            let t0 = Instant::now();
            if t0 >= until {
                return Ok(());
            }
            self.round_trip().await?;
            if let Some(h) = h.as_deref_mut() {
                h.saturating_record((t0.elapsed().as_nanos() as u64).max(1));
            }
        }
    }
}

/// `--transport quic --workload pingpong`.
pub async fn pingpong(s: &Settings) -> BenchResult<Output> {
    let pair = FabricPair::new(s.transport, Config::default(), "pingpong").await?;
    let mut fabric = Pinger::Fabric(pair.coordination_pinger(s.size).await?);
    let mut base = RawQuinn::new(s.size).await?;
    let base_name = "raw-quinn";
    let work = async {
        progress(&format!("warming up fabric and {base_name}"));
        fabric.run_until(Instant::now() + s.warmup, None).await?;
        base.run_until(Instant::now() + s.warmup, None).await?;
        let slices = (s.duration.as_secs_f64() / SLICE.as_secs_f64())
            .ceil()
            .max(1.0) as u32;
        let slice = s.duration / slices;
        progress(&format!(
            "measuring {slices} interleaved slices of {:.3} s each",
            slice.as_secs_f64()
        ));
        let mut hf = new_histogram();
        let mut hb = new_histogram();
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
    let (hf, hb) = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("the pingpong measurement did not finish within {limit:?}"))??;
    let fabric_sum = Summary::from_histogram(&hf);
    let base_sum = Summary::from_histogram(&hb);
    let stats = match fabric.as_fabric() {
        Some(f) => fabric_stats_json(&pair, f),
        None => serde_json::Value::Null,
    };
    let r50 = ratio(fabric_sum.p50_us, base_sum.p50_us);
    let r99 = ratio(fabric_sum.p99_us, base_sum.p99_us);
    let r999 = ratio(fabric_sum.p999_us, base_sum.p999_us);
    let json = json!({
        "transport": s.transport.name(),
        "workload": "pingpong",
        "size_bytes": s.size,
        "duration_s": s.duration.as_secs_f64(),
        "warmup_s": s.warmup.as_secs_f64(),
        "threads": s.threads,
        "version": env!("CARGO_PKG_VERSION"),
        "fabric": fabric_sum.to_json(None),
        "baseline": base_sum.to_json(Some(base_name)),
        "ratio_p50": r50,
        "ratio_p99": r99,
        "ratio_p999": r999,
        "fabric_stats": stats,
    });
    let mut t = Table::new(&format!(
        "agentfabric {} bench: transport=quic workload=pingpong size={} B duration={:.2} s \
         warmup={:.2} s threads={}",
        env!("CARGO_PKG_VERSION"),
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
    t.row(&format!("baseline {base_name}"), &base_sum, "");
    t.line(&format!("fabric_stats: {stats}"));
    Ok(Output {
        json,
        table: t.finish(),
    })
}
