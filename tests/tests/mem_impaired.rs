//! The full stack (nodes, drivers, sessions) over the in-process transport with an impaired
//! network: delay, limited bandwidth, jitter that reorders, loss, and partitions.

use std::time::{Duration, Instant};

use agentfabric::mem::{LinkConfig, MemNetwork};
use agentfabric::{Class, Config, Error, Node};
use agentfabric_tests::{body, check_body, within};

const LIMIT: Duration = Duration::from_secs(60);

async fn nodes(
    net: &MemNetwork,
    cfg: Config,
) -> (Node, Node, agentfabric::Peer, agentfabric::Peer) {
    let server = Node::builder("server")
        .transport(net.transport())
        .config(cfg.clone())
        .build()
        .unwrap();
    let addr = server.listen("mem://server").await.unwrap();
    let client = Node::builder("client")
        .transport(net.transport())
        .config(cfg)
        .build()
        .unwrap();
    let cp = client.connect(&addr).await.unwrap();
    let sp = within(LIMIT, server.accept()).await.unwrap();
    (server, client, cp, sp)
}

/// Loss, reordering, delay and a bandwidth limit: every channel still gets exactly its
/// messages, in order, byte for byte (the session retransmits and reorders).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_reordering_link_delivers_exactly_once_in_order() {
    let net = MemNetwork::with_link(
        LinkConfig {
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(2),
            loss: 0.05,
            bandwidth_bytes_per_sec: 50_000_000,
            ..LinkConfig::default()
        },
        7,
    );
    let (_s, _c, cp, sp) = nodes(&net, Config::default()).await;
    const CH: u32 = 6;
    const N: u32 = 60;
    let mut senders = Vec::new();
    for c in 0..CH {
        let ch = cp.channel(Class::ALL[(c % 3) as usize], 3).unwrap();
        senders.push(tokio::spawn(async move {
            for i in 0..N {
                ch.send(body(c, i, 100 + (i as usize * 997) % 70_000))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..CH {
        let rx = within(LIMIT, sp.accept_channel()).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut chan = None;
            for i in 0..N {
                let (c, seq) = check_body(&within(LIMIT, rx.recv()).await.unwrap().body);
                assert_eq!(*chan.get_or_insert(c), c);
                assert_eq!(seq, i, "channel {c} out of order");
            }
        }));
    }
    for t in senders.into_iter().chain(readers) {
        within(LIMIT, t).await.unwrap();
    }
    assert!(
        cp.stats().session.retransmits > 0,
        "a 5 % lossy link must have caused retransmissions"
    );
}

/// A partition shorter than the peer timeout heals with nothing lost; a longer one kills the
/// session on both sides with `PeerDead`, in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_heal_or_kill_within_the_bound() {
    let net = MemNetwork::new();
    let cfg = Config {
        peer_timeout: Duration::from_millis(600),
        keepalive_interval: Duration::from_millis(100),
        ..Config::default()
    };
    let (_s, _c, cp, sp) = nodes(&net, cfg).await;
    let ch = cp.channel(Class::Coordination, 3).unwrap();
    ch.send(body(0, 0, 32)).await.unwrap();
    let rx = within(LIMIT, sp.accept_channel()).await.unwrap();
    assert_eq!(
        check_body(&within(LIMIT, rx.recv()).await.unwrap().body),
        (0, 0)
    );

    // Short partition: messages sent during it arrive after it heals.
    net.set_partitioned(true);
    for i in 1..=5 {
        ch.send(body(0, i, 32)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    net.set_partitioned(false);
    for i in 1..=5 {
        assert_eq!(
            check_body(&within(LIMIT, rx.recv()).await.unwrap().body),
            (0, i)
        );
    }
    assert!(cp.error().is_none() && sp.error().is_none());

    // Long partition: both sides declare the peer dead.
    net.set_partitioned(true);
    let t0 = Instant::now();
    let e = within(LIMIT, rx.recv()).await.unwrap_err();
    assert!(matches!(e, Error::PeerDead { .. }), "{e}");
    let e = within(LIMIT, ch.flush()).await;
    assert!(matches!(e, Err(Error::PeerDead { .. }) | Ok(())), "{e:?}");
    assert!(matches!(cp.error(), Some(Error::PeerDead { .. })));
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "death took {:?}",
        t0.elapsed()
    );
}
