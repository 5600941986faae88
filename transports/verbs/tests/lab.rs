//! Fabric sessions over verbs when things break: a peer process killed, and the link taken down
//! and up (under messages, and under one-sided transfers). They need the Soft-RoCE lab (an RDMA
//! device, root for `ip link`): `#[ignore]`d, run by `soft-roce/tests.d/30-verbs-failures` with
//! `--ignored`.

use std::time::{Duration, Instant};

use agentfabric::{Block, Class, Config, Error, Node, Peer};
use agentfabric_verbs::{VerbsConfig, VerbsTransport};

#[path = "../src/thread_count.rs"]
mod thread_count;
use thread_count::{threads_named, threads_named_become};

fn addr_a() -> String {
    std::env::var("AGENTFABRIC_LAB_ADDR_A").unwrap_or_else(|_| "10.77.0.1".into())
}

fn node(name: &str, device: Option<String>, cfg: Config) -> Node {
    let t = VerbsTransport::with_config(VerbsConfig {
        device,
        ..Default::default()
    });
    Node::builder(name)
        .config(cfg)
        .transport(t)
        .build()
        .expect("node")
}

fn device_b() -> Option<String> {
    std::env::var("AGENTFABRIC_LAB_DEVICE_B").ok()
}

fn log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn within<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

/// Not a test on its own: the server process that `peer_process_killed` starts and kills. Does
/// nothing unless `AF_VERBS_CHILD_URL_FILE` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn helper_child_server() {
    let Some(file) = std::env::var_os("AF_VERBS_CHILD_URL_FILE") else {
        return;
    };
    let n = node("child", None, Config::default());
    let url = n
        .listen(&format!("verbs://{}:0", addr_a()))
        .await
        .expect("listen");
    std::fs::write(&file, &url).unwrap();
    loop {
        let peer = n.accept().await.expect("accept");
        tokio::spawn(async move {
            while let Ok(ch) = peer.accept_channel().await {
                tokio::spawn(async move {
                    while let Ok(m) = ch.recv().await {
                        if &m.body[..] == b"hold" {
                            continue; // never answered: the parent's request stays pending
                        }
                        if ch.respond(&m, m.body.clone()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn peer_process_killed() {
    log();
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    let file = format!("{dir}/af-verbs-child-{}", std::process::id());
    let _ = std::fs::remove_file(&file);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "helper_child_server", "--nocapture"])
        .env("AF_VERBS_CHILD_URL_FILE", &file)
        .spawn()
        .expect("start the child");
    let url = within(Duration::from_secs(60), async {
        loop {
            if let Ok(u) = std::fs::read_to_string(&file) {
                if !u.is_empty() {
                    return u;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let cfg = Config {
        peer_timeout: Duration::from_millis(1000),
        ..Config::default()
    };
    let me = node("parent", device_b(), cfg);
    let peer = within(Duration::from_secs(10), me.connect(&url))
        .await
        .unwrap();
    let ch = peer.channel(Class::ToolCall, 3).unwrap();
    let r = ch
        .request("hello", Duration::from_secs(10))
        .await
        .expect("echo from the child");
    assert_eq!(&r[..], b"hello");
    let pending = tokio::spawn({
        let ch = ch.clone();
        async move { ch.request("hold", Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let killed = Instant::now();
    child.kill().expect("kill the child");
    let _ = child.wait();
    let e = within(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap_err();
    let took = killed.elapsed();
    println!("peer process killed: pending request failed after {took:?} with: {e}");
    assert!(matches!(e, Error::PeerDead { .. }), "unexpected {e}");
    assert!(
        took < Duration::from_secs(5),
        "death noticed after {took:?}"
    );
    let _ = std::fs::remove_file(&file);
}

fn ip(args: &str) {
    let st = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run ip");
    assert!(st.success(), "ip {args} failed");
}

/// Restores what the lab's routing loses when veth1 goes down (its table-101 route and static
/// neighbour; see soft-roce/lib/guest.sh).
fn restore_lab_routes() {
    let a = addr_a();
    let b = std::env::var("AGENTFABRIC_LAB_ADDR_B").unwrap_or_else(|_| "10.77.0.2".into());
    let mac0 = std::fs::read_to_string("/sys/class/net/veth0/address").unwrap();
    ip(&format!("route replace {a}/32 dev veth1 src {b} table 101"));
    ip(&format!(
        "neigh replace {a} lladdr {} dev veth1 nud permanent",
        mac0.trim()
    ));
}

/// A server node on the lab's first device and a client node on its second, connected, so their
/// traffic crosses the veth pair; the peer timeout (8 s) outlasts [`link_outage`], so the session
/// survives it and resumes on a new QP. Returns (server, client, client's peer, server's peer).
async fn across_veth() -> (Node, Node, Peer, Peer) {
    let Some(dev_b) = device_b() else {
        panic!("needs the lab's second device (AGENTFABRIC_LAB_DEVICE_B) so traffic crosses veth");
    };
    let cfg = Config {
        peer_timeout: Duration::from_secs(8),
        ..Config::default()
    };
    let server = node("server", None, cfg.clone());
    let url = server
        .listen(&format!("verbs://{}:0", addr_a()))
        .await
        .unwrap();
    let client = node("client", Some(dev_b), cfg);
    let peer = within(Duration::from_secs(10), client.connect(&url))
        .await
        .unwrap();
    let sp = within(Duration::from_secs(10), server.accept())
        .await
        .unwrap();
    (server, client, peer, sp)
}

/// Takes veth1 down for 2 s (longer than the QP's stall timeout), then up, with the lab's routes.
async fn link_outage() {
    ip("link set veth1 down");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    ip("link set veth1 up");
    restore_lab_routes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn link_down_and_up_loses_nothing() {
    log();
    let (_server, _client, peer, sp) = across_veth().await;
    const N: u32 = 400;
    let ch = peer.channel(Class::Coordination, 4).unwrap();
    let sender = tokio::spawn({
        let ch = ch.clone();
        async move {
            for i in 0..N {
                ch.send(format!(
                    "msg {i:05} {}",
                    "x".repeat((i as usize * 97) % 3000)
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ch.flush().await.unwrap();
        }
    });
    let rx = within(Duration::from_secs(10), sp.accept_channel())
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        for i in 0..N {
            let m = within(Duration::from_secs(30), rx.recv()).await.unwrap();
            let want = format!("msg {i:05} ");
            assert!(m.body.starts_with(want.as_bytes()), "expected {want}");
        }
        assert!(rx.try_recv().unwrap().is_none(), "a duplicate arrived");
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    println!("link down");
    link_outage().await;
    println!("link up");
    within(Duration::from_secs(60), async {
        sender.await.unwrap();
        reader.await.unwrap();
    })
    .await;
    let resumes = peer.stats().session.resumes;
    println!("all {N} messages once, in order; session resumes: {resumes}");
    assert!(peer.error().is_none());
    assert!(
        resumes >= 1,
        "the outage should have cost the QP and a resume"
    );
}

/// The byte at offset `i` of the outage test's data.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ 0x3c
}

/// The first offset where `got` and `want` differ, and how many bytes do.
fn first_difference(got: &[u8], want: &[u8]) -> Option<(usize, usize)> {
    if got == want {
        return None;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b)?;
    let count = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some((first, count))
}

/// A one-sided write and then a one-sided read, each with the link taken down under it: the
/// one-sided operations fail with the QP, the rest of each transfer goes through the resumed
/// session, and both regions end up holding every byte, in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn transfers_across_a_link_outage_keep_every_byte() {
    log();
    let (server, client, peer, _sp) = across_veth().await;
    // 16 MiB: under emulation the transfer takes far longer than the 20 ms before the link
    // goes down (asserted below).
    const BLOCK: u64 = 64 << 10;
    const N: u64 = 256;
    let len = (BLOCK * N) as usize;
    let data: Vec<u8> = (0..len as u64).map(pattern).collect();
    let src = client.register(len).unwrap();
    src.write_at(0, &data).await.unwrap();
    let dst = server.register(len).unwrap();
    let back = client.register(len).unwrap();
    let d = dst.descriptor();
    assert!(d.rdma.is_some() && src.descriptor().rdma.is_some());
    // Block i of the client's region to slot N-1-i of the server's.
    let blocks: Vec<Block> = (0..N)
        .map(|i| Block {
            local: i * BLOCK,
            remote: (N - 1 - i) * BLOCK,
            len: BLOCK,
        })
        .collect();
    for (what, write) in [("write", true), ("read", false)] {
        let resumes = peer.stats().session.resumes;
        let t = tokio::spawn({
            let (peer, src, back, d, blocks) =
                (peer.clone(), src.clone(), back.clone(), d, blocks.clone());
            async move {
                if write {
                    peer.write(&src, &d, &blocks, None).await
                } else {
                    peer.read(&back, &d, &blocks, None).await
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let cut_short = !t.is_finished();
        link_outage().await;
        let r = within(Duration::from_secs(60), t).await.unwrap();
        let report = r.unwrap_or_else(|e| panic!("the {what} failed: {e}"));
        assert_eq!(report.bytes, BLOCK * N, "{what}: bytes moved");
        let resumed = peer.stats().session.resumes - resumes;
        println!("{what}: cut short by the outage; session resumes: {resumed}");
        assert!(
            cut_short,
            "the {what} finished before the link went down: nothing was tested"
        );
        assert!(resumed >= 1, "the {what}'s outage cost no resume");
        // Byte for byte: the server's slots for a write, the client's fresh region for a read.
        let (region, want): (&agentfabric::Region, Vec<u8>) = if write {
            let mut want = vec![0u8; len];
            for b in &blocks {
                want[b.remote as usize..(b.remote + b.len) as usize]
                    .copy_from_slice(&data[b.local as usize..(b.local + b.len) as usize]);
            }
            (&dst, want)
        } else {
            (&back, data.clone())
        };
        let mut got = vec![0u8; len];
        region.read_at(0, &mut got).await.unwrap();
        if let Some((at, count)) = first_difference(&got, &want) {
            panic!("{what}: {count} bytes differ, the first at offset {at}");
        }
    }
}

/// The bytes of bulk message `i` of the outage test: its number, then a pattern of its own.
fn bulk_message(i: u64, len: usize) -> Vec<u8> {
    let mut m: Vec<u8> = (0..len as u64)
        .map(|j| pattern(i * 1_000_003 + j))
        .collect();
    m[..8].copy_from_slice(&i.to_be_bytes());
    m
}

/// Channel bulk (its frames on the bulk lane's queue pair) and coordination (on the first queue
/// pair) with the link taken down under both: the session resumes on new queue pairs, the bulk
/// lane with it, and each channel's receiver gets every message once, byte for byte, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn both_lanes_across_a_link_outage_lose_nothing() {
    log();
    let (_server, _client, peer, sp) = across_veth().await;
    // 64 MiB of bulk: the link goes down mid-stream (asserted), under emulation (about 25 MB/s)
    // and well beyond it.
    const BULK: u64 = 1024;
    const BULK_LEN: usize = 64 << 10;
    const COORD: u32 = 300;
    let bulk = peer.channel(Class::Bulk, 3).unwrap();
    let coord = peer.channel(Class::Coordination, 4).unwrap();
    let bulk_sender = tokio::spawn({
        let bulk = bulk.clone();
        async move {
            for i in 0..BULK {
                bulk.send(bulk_message(i, BULK_LEN)).await.unwrap();
            }
            bulk.flush().await.unwrap();
        }
    });
    let coord_sender = tokio::spawn({
        let coord = coord.clone();
        async move {
            for i in 0..COORD {
                coord.send(format!("coord {i:05}")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            coord.flush().await.unwrap();
        }
    });
    let mut readers = Vec::new();
    for _ in 0..2 {
        let rx = within(Duration::from_secs(10), sp.accept_channel())
            .await
            .unwrap();
        readers.push(tokio::spawn(async move {
            let class = rx.class();
            let count = if class == Class::Bulk {
                BULK
            } else {
                u64::from(COORD)
            };
            for i in 0..count {
                let m = within(Duration::from_secs(60), rx.recv()).await.unwrap();
                if class == Class::Bulk {
                    let want = bulk_message(i, BULK_LEN);
                    if let Some((at, n)) = first_difference(&m.body, &want) {
                        let got = u64::from_be_bytes(m.body[..8].try_into().unwrap());
                        panic!("bulk message {i} (it says {got}): {n} bytes differ, from {at}");
                    }
                    assert_eq!(m.body.len(), BULK_LEN, "bulk message {i}'s length");
                } else {
                    assert_eq!(&m.body[..], format!("coord {i:05}").as_bytes());
                }
            }
            assert!(rx.try_recv().unwrap().is_none(), "a {class:?} duplicate");
            class
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Both ends of the one connection post the bulk lane's sends from a thread of their own on
    // a software device: the lane is there.
    assert_eq!(threads_named("af-verbs-bulk"), 2, "no bulk lane to test");
    let cut_short = !bulk_sender.is_finished();
    println!("link down");
    link_outage().await;
    println!("link up");
    within(Duration::from_secs(120), async {
        bulk_sender.await.unwrap();
        coord_sender.await.unwrap();
        for r in readers {
            r.await.unwrap();
        }
    })
    .await;
    let resumes = peer.stats().session.resumes;
    println!("every bulk and coordination message once, in order; session resumes: {resumes}");
    assert!(cut_short, "the bulk finished before the link went down");
    assert!(peer.error().is_none());
    assert!(
        resumes >= 1,
        "the outage should have cost the QPs and a resume"
    );
    // The resumed connection has its bulk lane again, and the old one's threads are gone.
    assert_eq!(
        threads_named_become("af-verbs-bulk", 2).await,
        2,
        "bulk lane threads after the resume"
    );
}
