//! Tool calls over the in-process transport: deadlines, cancellation, idempotency, hedging.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::wire::{decode, encode_call, encode_cancel, FLAG_IDEMPOTENT, KIND_CALL, KIND_CANCEL};
use super::*;
use crate::mem::MemNetwork;
use crate::{Class, Node, Peer};

struct Setup {
    client: ToolClient,
    server: ToolServer,
    _nodes: (Node, Node),
    peer: Peer,
}

async fn setup(tools: ToolServer, replicas: usize, policy: HedgePolicy) -> Setup {
    let net = MemNetwork::new();
    let server_node = Node::builder("tool-server")
        .transport(net.transport())
        .build()
        .unwrap();
    let addr = server_node.listen("mem://tools").await.unwrap();
    tokio::spawn(tools.clone().serve(server_node.clone()));
    let client_node = Node::builder("agent")
        .transport(net.transport())
        .build()
        .unwrap();
    let peer = client_node.connect(&addr).await.unwrap();
    let chans = (0..replicas)
        .map(|_| peer.channel(Class::ToolCall, 3).unwrap())
        .collect();
    Setup {
        client: ToolClient::on_channels(chans, policy),
        server: tools,
        _nodes: (server_node, client_node),
        peer,
    }
}

/// Sets a flag when dropped: shows that a handler's future was stopped.
struct Stopped(Arc<AtomicBool>);
impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{what} did not happen"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_unknown_tool_and_failure() {
    let mut tools = ToolServer::new();
    tools.register("echo", |req| async move { Ok(req.args) });
    tools.register("fail", |_| async move { Err("disk full".to_owned()) });
    let s = setup(tools, 1, HedgePolicy::default()).await;
    let d = Duration::from_secs(2);
    assert_eq!(&s.client.call("echo", "hi", d).await.unwrap()[..], b"hi");
    assert_eq!(
        s.client.call("nope", "", d).await.unwrap_err(),
        ToolError::UnknownTool("nope".into())
    );
    assert_eq!(
        s.client.call("fail", "", d).await.unwrap_err(),
        ToolError::Failed("disk full".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_travels_and_stops_the_handler() {
    let stopped = Arc::new(AtomicBool::new(false));
    let seen_budget = Arc::new(std::sync::Mutex::new(None));
    let mut tools = ToolServer::new();
    let (st, sb) = (stopped.clone(), seen_budget.clone());
    tools.register("slow", move |req| {
        let guard = Stopped(st.clone());
        *sb.lock().unwrap() = Some(req.deadline.saturating_duration_since(Instant::now()));
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Bytes::new())
        }
    });
    let s = setup(tools, 1, HedgePolicy::default()).await;
    let t = Instant::now();
    let e = s
        .client
        .call("slow", "", Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(e, ToolError::DeadlineExceeded);
    assert!(t.elapsed() < Duration::from_millis(500));
    let budget = seen_budget.lock().unwrap().expect("handler ran");
    assert!(budget <= Duration::from_millis(100) && budget > Duration::from_millis(50));
    // The server gave up at the deadline too.
    eventually("handler stopped at the deadline", || {
        stopped.load(Ordering::SeqCst)
    })
    .await;
    assert_eq!(s.server.stats().deadline_exceeded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_call_stops_its_handler() {
    let started = Arc::new(AtomicU32::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let token_fired = Arc::new(AtomicBool::new(false));
    let mut tools = ToolServer::new();
    let (sa, st, tf) = (started.clone(), stopped.clone(), token_fired.clone());
    tools.register("long", move |req| {
        sa.fetch_add(1, Ordering::SeqCst);
        let guard = Stopped(st.clone());
        let tf = tf.clone();
        // Work spawned elsewhere watches the token.
        let token = req.cancel.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            tf.store(true, Ordering::SeqCst);
        });
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Bytes::new())
        }
    });
    let s = setup(tools, 1, HedgePolicy::default()).await;
    // Explicit cancel.
    let pending = s
        .client
        .start(Call::new("long", "", Duration::from_secs(20)));
    eventually("handler started", || started.load(Ordering::SeqCst) == 1).await;
    pending.cancel();
    assert_eq!(pending.wait().await.unwrap_err(), ToolError::Cancelled);
    eventually("handler stopped", || stopped.load(Ordering::SeqCst)).await;
    eventually("token fired", || token_fired.load(Ordering::SeqCst)).await;
    assert_eq!(s.server.stats().cancelled, 1);
    // A dropped future cancels too.
    stopped.store(false, Ordering::SeqCst);
    let _ = tokio::time::timeout(
        Duration::from_millis(50),
        s.client.call("long", "", Duration::from_secs(20)),
    )
    .await;
    eventually("handler stopped after drop", || {
        stopped.load(Ordering::SeqCst)
    })
    .await;
    eventually("second cancel counted", || s.server.stats().cancelled == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_call_with_the_same_key_executes_once() {
    let runs = Arc::new(AtomicU32::new(0));
    let mut tools = ToolServer::new();
    let r = runs.clone();
    tools.register("charge", move |req| {
        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok(Bytes::from(format!("receipt {n} for {:?}", req.args)))
        }
    });
    let s = setup(tools, 1, HedgePolicy::default()).await;
    let call = Call::new("charge", "10 EUR", Duration::from_secs(2)).key("order-17");
    // Two concurrent duplicates (a retry while the first still runs), then a later retry.
    let (a, b) = tokio::join!(
        s.client.call_with(call.clone()),
        s.client.call_with(call.clone())
    );
    let c = s.client.call_with(call.clone()).await;
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the tool ran more than once"
    );
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(s.server.stats().deduplicated, 2);
    // Another key runs again.
    s.client
        .call_with(Call::new("charge", "10 EUR", Duration::from_secs(2)).key("order-18"))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_is_refused_and_its_key_forgotten() {
    let runs = Arc::new(AtomicU32::new(0));
    let mut tools = ToolServer::new();
    let r = runs.clone();
    tools.register("forward", move |req| {
        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 1 {
                // The executor went before answering: given up as not run.
                req.cancel.abandon("the executor went");
                std::future::pending::<()>().await;
            }
            Ok(Bytes::from(format!("run {n}")))
        }
    });
    let s = setup(tools, 1, HedgePolicy::default()).await;
    let call = Call::new("forward", "", Duration::from_secs(2)).key("k");
    match s.client.call_with(call.clone()).await {
        Err(ToolError::Refused(why)) => assert!(why.contains("the executor went"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The key was forgotten: the retry runs the tool (a recorded failure would answer it).
    assert_eq!(&s.client.call_with(call).await.unwrap()[..], b"run 2");
    assert_eq!(
        s.server.stats().cancelled,
        0,
        "an abandoned call is not a cancelled one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_window_is_bounded() {
    let runs = Arc::new(AtomicU32::new(0));
    let mut tools = ToolServer::with_config(ServerConfig {
        key_window: 4,
        ..ServerConfig::default()
    });
    let r = runs.clone();
    tools.register("t", move |_| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok(Bytes::new()) }
    });
    let s = setup(tools, 1, HedgePolicy::default()).await;
    for i in 0..10 {
        let call = Call::new("t", "", Duration::from_secs(2)).key(format!("k{i}"));
        s.client.call_with(call).await.unwrap();
    }
    assert_eq!(s.server.keys_remembered(), 4);
    // An old key was forgotten (runs again), a recent one was not.
    let old = Call::new("t", "", Duration::from_secs(2)).key("k0");
    let recent = Call::new("t", "", Duration::from_secs(2)).key("k9");
    s.client.call_with(recent).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 10);
    s.client.call_with(old).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_answers_a_slow_call_and_cancels_the_loser() {
    let slow_next = Arc::new(AtomicBool::new(false));
    let loser_stopped = Arc::new(AtomicBool::new(false));
    let mut tools = ToolServer::new();
    let (sn, ls) = (slow_next.clone(), loser_stopped.clone());
    tools.register("lookup", move |req| {
        let slow = sn.swap(false, Ordering::SeqCst);
        let guard = slow.then(|| Stopped(ls.clone()));
        async move {
            let _guard = guard;
            if slow {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok(req.args)
        }
    });
    let s = setup(tools, 2, HedgePolicy::default()).await;
    for _ in 0..40 {
        s.client
            .call_with(Call::new("lookup", "x", Duration::from_secs(2)).hedged())
            .await
            .unwrap();
    }
    let delay = s.client.hedge_delay().expect("enough samples");
    assert!(delay < Duration::from_millis(200), "hedge delay {delay:?}");
    slow_next.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let r = s
        .client
        .call_with(Call::new("lookup", "y", Duration::from_secs(2)).hedged())
        .await
        .unwrap();
    assert_eq!(&r[..], b"y");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the hedge did not answer"
    );
    let st = s.client.stats();
    assert!(st.hedge_wins >= 1, "{st:?}");
    assert!(st.hedges as f64 <= 0.1 * st.calls as f64 + 1.0, "{st:?}");
    eventually("the slow attempt was cancelled", || {
        loser_stopped.load(Ordering::SeqCst)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_gone_is_reported() {
    let mut tools = ToolServer::new();
    tools.register("echo", |req| async move { Ok(req.args) });
    let s = setup(tools, 1, HedgePolicy::default()).await;
    s.peer.close("bye");
    let e = s
        .client
        .call("echo", "x", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, ToolError::PeerGone(_)), "{e:?}");
}

#[test]
fn envelope_roundtrip_and_garbage() {
    let b = encode_call(
        7,
        Duration::from_millis(250),
        FLAG_IDEMPOTENT,
        b"key",
        "tool",
        b"args",
    );
    let e = decode(&b).unwrap();
    assert_eq!(
        (
            e.kind,
            e.flags,
            e.call_id,
            &e.key[..],
            e.tool.as_str(),
            &e.args[..]
        ),
        (
            KIND_CALL,
            FLAG_IDEMPOTENT,
            7,
            &b"key"[..],
            "tool",
            &b"args"[..]
        )
    );
    assert_eq!(e.budget, Duration::from_millis(250));
    let c = decode(&encode_cancel(9)).unwrap();
    assert_eq!((c.kind, c.call_id), (KIND_CANCEL, 9));
    for n in 0..b.len() {
        let _ = decode(&b.slice(..n));
    }
    assert!(decode(&Bytes::from_static(b"hello world, not a call")).is_err());
}
