//! Round-trip latency over verbs, in the lab: agentfabric coordination-channel round trips and,
//! underneath them, raw transport frame round trips (no session), between a server on
//! `AGENTFABRIC_LAB_DEVICE` (10.77.0.1) and a client on `AGENTFABRIC_LAB_DEVICE_B` when set.
//!
//! `verbs_pingpong [SIZE_BYTES] [ITERATIONS]` (defaults 64 and 2000) prints one JSON object per
//! measurement (`"transport": "verbs"`, `"workload": "pingpong"`, `"size_bytes"`, and a latency
//! summary of round trips in µs) so `soft-roce/bench.d/10-verbs-pingpong` can set them next to
//! perftest's `ib_send_lat` from the same boot. Until `agentfabric bench --transport verbs`
//! exists (sidecar), this is the verbs benchmark.

use std::future::poll_fn;
use std::time::{Duration, Instant};

use agentfabric::frame::{Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST};
use agentfabric::transport::Transport;
use agentfabric::{Class, Config, Node};
use agentfabric_verbs::{VerbsConfig, VerbsTransport};
use bytes::Bytes;
use hdrhistogram::Histogram;

fn summary(name: &str, size: usize, h: &Histogram<u64>) -> String {
    let us = |ns: u64| ns as f64 / 1000.0;
    format!(
        "{{\"transport\": \"verbs\", \"workload\": \"pingpong\", \"measure\": \"{name}\", \
         {}, \"size_bytes\": {size}, \"version\": \"{}\", \"count\": {}, \"p50_us\": {:.2}, \
         \"p99_us\": {:.2}, \"p999_us\": {:.2}, \"max_us\": {:.2}}}",
        mode(),
        env!("CARGO_PKG_VERSION"),
        h.len(),
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    )
}

/// `VERBS_PINGPONG_SAME_DEVICE=1`: the client on the server's device too (rxe0 -> rxe0, as
/// perftest runs in the lab); `VERBS_PINGPONG_BUSY_POLL=1`: both ends spin on their CQs.
fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn server_cfg() -> VerbsConfig {
    VerbsConfig {
        busy_poll: flag("VERBS_PINGPONG_BUSY_POLL"),
        ..Default::default()
    }
}

fn client_cfg() -> VerbsConfig {
    let device = if flag("VERBS_PINGPONG_SAME_DEVICE") {
        None
    } else {
        std::env::var("AGENTFABRIC_LAB_DEVICE_B").ok()
    };
    VerbsConfig {
        device,
        ..server_cfg()
    }
}

fn mode() -> String {
    format!(
        "\"client_device\": \"{}\", \"busy_poll\": {}",
        if flag("VERBS_PINGPONG_SAME_DEVICE") {
            "A"
        } else {
            "B"
        },
        flag("VERBS_PINGPONG_BUSY_POLL")
    )
}

fn frame(len: usize) -> OutFrame {
    let mut h = Header::new(Kind::Data);
    h.flags = FLAG_FIRST | FLAG_LAST;
    h.len = len as u32;
    OutFrame {
        header: h.encode(),
        payload: Bytes::from(vec![7u8; len]),
    }
}

async fn raw(addr: &str, size: usize, iters: usize) -> Histogram<u64> {
    let server = VerbsTransport::with_config(server_cfg());
    let mut l = server.listen(&format!("{addr}:0")).await.expect("listen");
    let url = l.local_addr();
    let target = url.strip_prefix("verbs://").unwrap().to_owned();
    let echo = tokio::spawn(async move {
        let mut c = l.accept().await.expect("accept");
        let mut got = Vec::new();
        loop {
            got.clear();
            if poll_fn(|cx| c.stream.poll_recv(cx, &mut got))
                .await
                .is_err()
            {
                return;
            }
            for f in got.drain(..) {
                c.sink.push(f.encode());
            }
            if poll_fn(|cx| c.sink.poll_flush(cx)).await.is_err() {
                return;
            }
        }
    });
    let mut c = VerbsTransport::with_config(client_cfg())
        .connect(&target)
        .await
        .expect("connect");
    let mut h = Histogram::<u64>::new(3).unwrap();
    let f = frame(size);
    let mut got = Vec::new();
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        c.sink.push(f.clone());
        poll_fn(|cx| c.sink.poll_flush(cx)).await.expect("send");
        got.clear();
        poll_fn(|cx| c.stream.poll_recv(cx, &mut got))
            .await
            .expect("echo");
        if i >= iters / 10 {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    drop(c);
    echo.abort();
    h
}

async fn fabric(addr: &str, size: usize, iters: usize) -> Histogram<u64> {
    let server = Node::builder("server")
        .config(Config::default())
        .transport(VerbsTransport::with_config(server_cfg()))
        .build()
        .unwrap();
    let url = server.listen(&format!("verbs://{addr}:0")).await.unwrap();
    let client = Node::builder("client")
        .config(Config::default())
        .transport(VerbsTransport::with_config(client_cfg()))
        .build()
        .unwrap();
    let peer = client.connect(&url).await.unwrap();
    let sp = server.accept().await.unwrap();
    let echo = tokio::spawn(async move {
        let ch = sp.accept_channel().await.unwrap();
        while let Ok(m) = ch.recv().await {
            if ch.send(m.body).await.is_err() {
                return;
            }
        }
    });
    let ch = peer.channel(Class::Coordination, 7).unwrap();
    let body = Bytes::from(vec![7u8; size]);
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        ch.send(body.clone()).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(30), ch.recv())
            .await
            .expect("echo within 30 s")
            .unwrap();
        assert_eq!(m.body.len(), size);
        if i >= iters / 10 {
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    echo.abort();
    h
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let addr = std::env::var("AGENTFABRIC_LAB_ADDR_A").unwrap_or_else(|_| "10.77.0.1".into());
    let h = raw(&addr, size, iters).await;
    println!("{}", summary("raw_transport_frames", size, &h));
    let h = fabric(&addr, size, iters).await;
    println!("{}", summary("fabric_coordination", size, &h));
}
