//! Tools served beside a node's own channels (`ToolServer::serve_beside`), over the in-process
//! transport: a tool call and a coordination request on one node both answered; a tool the node
//! does not have refused at once; the application's queue bounded (a full queue stops the
//! router accepting); dropping the handle stops everything it started.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfabric::mem::MemNetwork;
use agentfabric::tools::{Accepted, Call, ServerConfig, ToolClient, ToolError, ToolServer};
use agentfabric::{Bytes, Class, Node, Peer};

/// A subagent node listening on the network, and an orchestrator's session with it.
struct Nodes {
    subagent: Node,
    _orchestrator: Node,
    /// The orchestrator's side of the session.
    peer: Peer,
}

async fn connect(net: &MemNetwork, subagent: Node) -> Nodes {
    let addr = subagent.listen("mem://subagent").await.unwrap();
    let orchestrator = Node::builder("orchestrator")
        .transport(net.transport())
        .build()
        .unwrap();
    let peer = orchestrator.connect(&addr).await.unwrap();
    Nodes {
        subagent,
        _orchestrator: orchestrator,
        peer,
    }
}

fn subagent(net: &MemNetwork) -> Node {
    Node::builder("subagent")
        .transport(net.transport())
        .build()
        .unwrap()
}

fn search_tools(cfg: ServerConfig) -> ToolServer {
    let mut tools = ToolServer::with_config(cfg);
    tools.register("search", |req| async move { Ok(req.args) });
    tools
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

const WAIT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_and_coordination_on_one_node() {
    let net = MemNetwork::new();
    let node = subagent(&net);
    let mut incoming = search_tools(ServerConfig::default()).serve_beside(node.clone());
    // Waiting and giving up takes nothing from the queue.
    assert!(
        tokio::time::timeout(Duration::from_millis(5), incoming.next())
            .await
            .is_err()
    );
    let nodes = connect(&net, node).await;

    // A tool call is answered by the tool server...
    let client = ToolClient::new(&nodes.peer).unwrap();
    let out = client.call("search", "rust quic", WAIT).await.unwrap();
    assert_eq!(&out[..], b"rust quic");

    // ...and a coordination request by the application, on the same node and session.
    let plan = nodes.peer.channel(Class::Coordination, 6).unwrap();
    let asking = tokio::spawn(async move { plan.request("step 1", WAIT).await });
    let Accepted::Peer(session) = tokio::time::timeout(WAIT, incoming.next())
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("the session is announced before its channels");
    };
    assert_eq!(session.name(), "orchestrator");
    let Accepted::Channel(ch) = tokio::time::timeout(WAIT, incoming.next())
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("expected the coordination channel");
    };
    assert_eq!(ch.class(), Class::Coordination);
    assert_eq!(ch.peer().session_id(), session.session_id());
    let m = ch.recv().await.unwrap();
    assert_eq!(&m.body[..], b"step 1");
    ch.respond(&m, "done: step 1").await.unwrap();
    let reply = asking.await.unwrap().unwrap();
    assert_eq!(&reply[..], b"done: step 1");

    // A bulk channel reaches the application too; the tool-call channel never did.
    let bulk = nodes.peer.channel(Class::Bulk, 2).unwrap();
    bulk.send(vec![7u8; 100_000]).await.unwrap();
    let ch = tokio::time::timeout(WAIT, incoming.accept_channel())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ch.class(), Class::Bulk);
    assert_eq!(ch.recv().await.unwrap().body.len(), 100_000);
    assert_eq!(incoming.queued(), 0);
    let out = client.call("search", "again", WAIT).await.unwrap();
    assert_eq!(&out[..], b"again");
    assert!(
        tokio::time::timeout(Duration::from_millis(50), incoming.next())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_the_node_does_not_have_fails_at_once() {
    let net = MemNetwork::new();
    let node = subagent(&net);
    let _incoming = search_tools(ServerConfig::default()).serve_beside(node.clone());
    let nodes = connect(&net, node).await;
    let client = ToolClient::new(&nodes.peer).unwrap();
    client.call("search", "warm up", WAIT).await.unwrap();
    let t = Instant::now();
    let e = client.call("nope", "", WAIT).await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(e, ToolError::UnknownTool("nope".into()));
    assert!(
        took < Duration::from_millis(50),
        "an unknown tool took {took:?} to fail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_stops_the_router_accepting() {
    const BOUND: usize = 4;
    const OPENED: usize = 7;
    let net = MemNetwork::new();
    let node = subagent(&net);
    let cfg = ServerConfig {
        incoming_queue: BOUND,
        ..ServerConfig::default()
    };
    let mut incoming = search_tools(cfg).serve_beside(node.clone());
    let nodes = connect(&net, node).await;
    let client = ToolClient::new(&nodes.peer).unwrap();
    client.call("search", "before", WAIT).await.unwrap();

    // The application takes nothing: the session's announcement and BOUND - 1 channels fill
    // the queue, and the router accepts no more.
    let mut plans = Vec::new();
    for i in 0..OPENED {
        let ch = nodes.peer.channel(Class::Coordination, 5).unwrap();
        ch.send(format!("plan {i}")).await.unwrap();
        plans.push(ch);
    }
    eventually("the queue filled", || incoming.queued() == BOUND).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(incoming.queued(), BOUND);

    // The channels past the bound are still in the session, not accepted by the router: they
    // can be taken from the session directly.
    let sessions = nodes.subagent.peers();
    assert_eq!(sessions.len(), 1);
    let left = OPENED - (BOUND - 1);
    for _ in 0..left {
        let ch = tokio::time::timeout(WAIT, sessions[0].accept_channel())
            .await
            .expect("a channel the router did not accept")
            .unwrap();
        assert_eq!(ch.class(), Class::Coordination);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(50), sessions[0].accept_channel())
            .await
            .is_err(),
        "more channels in the session than opened"
    );

    // Tool calls on the channel already served go on while the queue is full.
    let out = client.call("search", "while full", WAIT).await.unwrap();
    assert_eq!(&out[..], b"while full");

    // The queue holds the session, then the first channels, in order.
    assert!(matches!(incoming.next().await, Ok(Accepted::Peer(_))));
    for i in 0..BOUND - 1 {
        let ch = incoming.accept_channel().await.unwrap();
        assert_eq!(
            ch.recv().await.unwrap().body,
            Bytes::from(format!("plan {i}"))
        );
    }
}

/// Sets a flag when dropped: shows that a handler's future was stopped.
struct Stopped(Arc<AtomicBool>);
impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_stops_its_tasks() {
    let started = Arc::new(AtomicU32::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let mut tools = ToolServer::new();
    let (sa, st) = (started.clone(), stopped.clone());
    tools.register("long", move |_| {
        sa.fetch_add(1, Ordering::SeqCst);
        let guard = Stopped(st.clone());
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Bytes::new())
        }
    });
    let net = MemNetwork::new();
    let node = subagent(&net);
    let incoming = tools.serve_beside(node.clone());
    let nodes = connect(&net, node).await;
    let client = ToolClient::new(&nodes.peer).unwrap();
    let pending = client.start(Call::new("long", "", Duration::from_secs(20)));
    // A channel left in the queue.
    let plan = nodes.peer.channel(Class::Coordination, 5).unwrap();
    plan.send("never read").await.unwrap();
    eventually("the handler started", || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("the channel was queued", || incoming.queued() == 2).await;

    // The router held the last clone of the node but one: dropping both closes the node.
    let Nodes { subagent, peer, .. } = nodes;
    drop(subagent);
    drop(incoming);
    eventually("the running handler stopped", || {
        stopped.load(Ordering::SeqCst)
    })
    .await;
    eventually("the node closed", || peer.error().is_some()).await;
    let e = tokio::time::timeout(Duration::from_secs(5), pending.wait())
        .await
        .expect("the call ends with the session")
        .unwrap_err();
    assert!(matches!(e, ToolError::PeerGone(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_call_stopped_with_the_handle_runs_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let mut tools = ToolServer::new();
    let (r, st) = (runs.clone(), stopped.clone());
    tools.register("charge", move |_| {
        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = (n == 1).then(|| Stopped(st.clone()));
        async move {
            if let Some(_guard) = guard {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok(Bytes::from(format!("receipt {n}")))
        }
    });
    let call = Call::new("charge", "10 EUR", Duration::from_secs(20)).key("order-17");
    let net = MemNetwork::new();
    let node = subagent(&net);
    let incoming = tools.clone().serve_beside(node.clone());
    let nodes = connect(&net, node).await;
    let first = ToolClient::new(&nodes.peer).unwrap().start(call.clone());
    eventually("the first execution started", || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;

    // The first execution stops with the handle that served it; the same tools, served again,
    // run a retry with the same key (it is not reported as still running).
    drop(incoming);
    // (The tasks are aborted, so they stop at their next poll, not within `drop`.)
    eventually("the first execution stopped", || {
        stopped.load(Ordering::SeqCst)
    })
    .await;
    let _again = tools.serve_beside(nodes.subagent.clone());
    let orchestrator = Node::builder("orchestrator-2")
        .transport(net.transport())
        .build()
        .unwrap();
    let peer = orchestrator.connect("mem://subagent").await.unwrap();
    let retry = ToolClient::new(&peer).unwrap().call_with(call).await;
    assert_eq!(retry.unwrap(), Bytes::from("receipt 2"));
    first.cancel();
}
