use agentfabric::{Class, Node};
use agentfabric_tests::{pair, within, Kind};
use std::time::Duration;

/// Bound on every wait in these tests.
const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_mem_and_tcp() {
    for url in ["mem://s", "tcp://127.0.0.1:0"] {
        let net = agentfabric::mem::MemNetwork::new();
        let server = Node::builder("server")
            .transport(net.transport())
            .transport(agentfabric_tcp::TcpTransport::new())
            .build()
            .unwrap();
        let addr = server.listen(url).await.unwrap();
        let client = Node::builder("client")
            .transport(net.transport())
            .transport(agentfabric_tcp::TcpTransport::new())
            .build()
            .unwrap();
        let peer = client.connect(&addr).await.unwrap();
        let ch = peer.channel(Class::Coordination, 3).unwrap();
        ch.send("hello").await.unwrap();
        let sp = server.accept().await.unwrap();
        assert_eq!(sp.name(), "client");
        let sc = sp.accept_channel().await.unwrap();
        let m = sc.recv().await.unwrap();
        assert_eq!(&m.body[..], b"hello");
        assert_eq!(m.request_id, None);
        assert_eq!(
            sc.respond(&m, "no").await,
            Err(agentfabric::Error::NotARequest)
        );
        let h = tokio::spawn(async move {
            loop {
                let m = sc.recv().await.unwrap();
                sc.respond(&m, m.body.clone()).await.unwrap();
            }
        });
        for i in 0..100u32 {
            let r = ch
                .request(i.to_le_bytes().to_vec(), Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(&r[..], &i.to_le_bytes());
        }
        let big = vec![7u8; 5 << 20];
        let bulk = peer.channel(Class::Bulk, 0).unwrap();
        bulk.send(big.clone()).await.unwrap();
        let sb = sp.accept_channel().await.unwrap();
        let got = sb.recv().await.unwrap();
        assert_eq!(got.body.len(), big.len());
        println!("{url}: {:?}", peer.stats());
        h.abort();
    }
}

/// A task that drains a channel full of ready messages in a loop yields its worker now and
/// then (each `recv` spends tokio task budget), so other tasks on the same worker still run:
/// on a single-threaded runtime, the spawned task gets to run before the loop ends.
#[tokio::test(flavor = "current_thread")]
async fn draining_a_full_channel_lets_other_tasks_run() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const MESSAGES: u32 = 1000;
    let p = pair(Kind::Mem, agentfabric::Config::default()).await;
    let tx = p.client_peer.channel(Class::Coordination, 3).unwrap();
    for i in 0..MESSAGES {
        tx.send(i.to_le_bytes().to_vec()).await.unwrap();
    }
    // Acknowledged: every message is in the receiving node, so no `recv` below has to wait.
    within(LIMIT, tx.flush()).await.unwrap();
    let rx = within(LIMIT, p.server_peer.accept_channel()).await.unwrap();

    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
    let mut seen_at = None;
    for i in 0..MESSAGES {
        let m = rx.recv().await.unwrap();
        assert_eq!(&m.body[..], &i.to_le_bytes(), "in order");
        if seen_at.is_none() && ran.load(Ordering::SeqCst) {
            seen_at = Some(i);
        }
    }
    assert!(
        seen_at.is_some(),
        "the other task never ran while {MESSAGES} ready messages were drained"
    );
}

/// `recv_parts` hands a fragmented message over in its chunks, unjoined, whose concatenation
/// is the body sent; a small message comes as one chunk; a request keeps its id; order holds
/// across both kinds of receive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_parts_hands_over_chunks_without_joining_them() {
    let p = pair(Kind::Mem, agentfabric::Config::default()).await;
    let tx = p.client_peer.channel(Class::Bulk, 0).unwrap();
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    tx.send(big.clone()).await.unwrap();
    tx.send("small").await.unwrap();
    tx.send("after").await.unwrap();
    let rx = within(LIMIT, p.server_peer.accept_channel()).await.unwrap();

    let m = within(LIMIT, rx.recv_parts()).await.unwrap();
    assert!(
        m.parts.len() > 1,
        "a 3 MiB message travels in several chunks"
    );
    assert_eq!(m.len(), big.len());
    assert_eq!(m.request_id, None);
    assert_eq!(m.clone().into_message().body, big);
    assert_eq!(m.parts.concat(), big);

    let m = within(LIMIT, rx.recv_parts()).await.unwrap();
    assert_eq!(m.parts, vec![agentfabric::Bytes::from_static(b"small")]);
    let m = within(LIMIT, rx.recv()).await.unwrap();
    assert_eq!(
        &m.body[..],
        b"after",
        "recv goes on where recv_parts left off"
    );

    // A request received in parts can still be answered.
    let ctx = p.client_peer.channel(Class::ToolCall, 0).unwrap();
    let answer = tokio::spawn(async move { ctx.request("ping", LIMIT).await });
    let rq = within(LIMIT, p.server_peer.accept_channel()).await.unwrap();
    let m = within(LIMIT, rq.recv_parts()).await.unwrap();
    assert!(m.request_id.is_some());
    rq.respond(&m.into_message(), "pong").await.unwrap();
    assert_eq!(&answer.await.unwrap().unwrap()[..], b"pong");
}

/// Two receivers on clones of one channel, each dropped in the middle of joining a large
/// message, both put their message back: the next receives return both, whole, then the
/// message after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receives_dropped_mid_join_lose_neither_message() {
    use std::future::Future;

    let p = pair(Kind::Mem, agentfabric::Config::default()).await;
    let tx = p.client_peer.channel(Class::Bulk, 0).unwrap();
    let big = |fill: u8| vec![fill; 4 << 20];
    tx.send(big(1)).await.unwrap();
    tx.send(big(2)).await.unwrap();
    tx.send("after").await.unwrap();
    within(LIMIT, tx.flush()).await.unwrap();
    let rx = within(LIMIT, p.server_peer.accept_channel()).await.unwrap();

    let (a, b) = (rx.clone(), rx.clone());
    let (mut ra, mut rb) = (Box::pin(a.recv()), Box::pin(b.recv()));
    let polled = std::future::poll_fn(|cx| {
        std::task::Poll::Ready((ra.as_mut().poll(cx), rb.as_mut().poll(cx)))
    })
    .await;
    assert!(
        polled.0.is_pending() && polled.1.is_pending(),
        "each 4 MiB message should be joined in slices, yielding after the first"
    );
    drop((ra, rb));

    let mut fills = Vec::new();
    for _ in 0..2 {
        let m = within(LIMIT, rx.recv()).await.unwrap();
        assert_eq!(m.body.len(), 4 << 20, "a put-back message comes back whole");
        assert!(m.body.iter().all(|&x| x == m.body[0]), "and intact");
        fills.push(m.body[0]);
    }
    fills.sort();
    assert_eq!(fills, vec![1, 2], "neither put-back message is lost");
    let m = within(LIMIT, rx.recv()).await.unwrap();
    assert_eq!(&m.body[..], b"after");
}
