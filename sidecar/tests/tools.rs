//! Tool calls between clients of two sidecars: `SERVE`, `CALL`, `TOOL_CALL`/`TOOL_REPLY`,
//! failures, unknown tools, cancellation, deadlines and at-most-once keys.

mod support;

use std::time::{Duration, Instant};

use agentfabric_sidecar::wire::{kind, ClientMsg, ErrorCode, SidecarMsg, Target, ToClient};
use bytes::Bytes;
use support::{expect_error, Client, TestSidecar};

/// A `CALL` of `tool` on `endpoint` at `url`.
fn call(url: &str, endpoint: &str, tool: &str, deadline_ms: u32, key: Option<&str>) -> ClientMsg {
    ClientMsg::Call {
        deadline_ms,
        hedged: false,
        retries: 0,
        tool: tool.into(),
        targets: vec![Target {
            url: url.into(),
            endpoint: endpoint.into(),
        }],
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        args: Bytes::from(format!("args of {tool}")),
    }
}

/// The next `TOOL_CALL`: its call handle and fields.
async fn tool_call(server: &mut Client) -> (u64, SidecarMsg) {
    let f: ToClient = server
        .event_where("TOOL_CALL", |f| f.msg.kind() == kind::TOOL_CALL)
        .await;
    (f.id, f.msg)
}

/// Two sidecars; `caller` on "ta", `server` on "tb" serving "echo" and "slow".
async fn setup() -> (TestSidecar, TestSidecar, Client, Client) {
    let sa = TestSidecar::start("ta").await;
    let sb = TestSidecar::start("tb").await;
    let caller = sa.client("caller").await;
    let mut server = sb.client("server").await;
    for tool in ["echo", "slow"] {
        server.done(ClientMsg::Serve { tool: tool.into() }).await;
    }
    (sa, sb, caller, server)
}

/// A served tool called from another sidecar: the server's client gets `TOOL_CALL` with the
/// tool, the caller's node, the arguments and the key; its `TOOL_REPLY` is the caller's
/// `RESULT`. A failure (`ok` 0) is `TOOL_FAILED` with the reason; a tool nobody serves (or no
/// longer serves) is `NO_SUCH_TOOL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_result_failure_and_unknown_tool() {
    let (sa, sb, mut caller, mut server) = setup().await;
    let url = sb.url();

    let id = caller
        .op(call(&url, "server", "echo", 5000, Some("key-1")))
        .await;
    let (handle, tc) = tool_call(&mut server).await;
    match tc {
        SidecarMsg::ToolCall {
            tool,
            node,
            deadline_ms,
            key,
            args,
            ..
        } => {
            assert_eq!(tool, "echo");
            assert_eq!(node, "ta", "TOOL_CALL names the caller's node");
            assert_eq!(&key[..], b"key-1");
            assert_eq!(&args[..], b"args of echo");
            assert!(
                deadline_ms > 0 && deadline_ms <= 5000,
                "time left: {deadline_ms} ms"
            );
        }
        _ => unreachable!(),
    }
    assert_ne!(handle, 0, "a TOOL_CALL's id is its handle, never 0");
    server
        .done(ClientMsg::ToolReply {
            call: handle,
            ok: true,
            body: Bytes::from_static(b"echoed"),
        })
        .await;
    assert_eq!(
        caller.reply(id).await,
        SidecarMsg::Result {
            body: Bytes::from_static(b"echoed")
        }
    );

    // Without a key, TOOL_CALL's key is empty.
    let id = caller.op(call(&url, "server", "echo", 5000, None)).await;
    let (handle, tc) = tool_call(&mut server).await;
    assert!(matches!(tc, SidecarMsg::ToolCall { ref key, .. } if key.is_empty()));
    server
        .done(ClientMsg::ToolReply {
            call: handle,
            ok: false,
            body: Bytes::from_static(b"the echo chamber is closed"),
        })
        .await;
    let m = expect_error(caller.reply(id).await, ErrorCode::ToolFailed, "ok=0");
    assert_eq!(m, "the echo chamber is closed");

    caller
        .fails(
            call(&url, "server", "nope", 5000, None),
            ErrorCode::NoSuchTool,
        )
        .await;
    server
        .done(ClientMsg::Unserve {
            tool: "echo".into(),
        })
        .await;
    caller
        .fails(
            call(&url, "server", "echo", 5000, None),
            ErrorCode::NoSuchTool,
        )
        .await;
    // A reply to a call handle that does not exist is ignored (not an error).
    server
        .done(ClientMsg::ToolReply {
            call: 987_654,
            ok: true,
            body: Bytes::new(),
        })
        .await;
    // Bad arguments are refused before anything is sent.
    for bad in [
        call(&url, "server", "echo", 0, None),
        call(&url, "server", "", 5000, None),
        call(&url, "a/b", "echo", 5000, None),
    ] {
        caller.fails(bad, ErrorCode::InvalidArgument).await;
    }
    assert!(
        server
            .take_events()
            .iter()
            .all(|e| e.msg.kind() != kind::TOOL_CALL),
        "no TOOL_CALL for calls that failed before the handler"
    );
    drop((caller, server));
    sa.stop().await;
    sb.stop().await;
}

/// The same tool served on the caller's own sidecar (empty url) works the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_call() {
    let sc = TestSidecar::start("tl").await;
    let mut caller = sc.client("caller").await;
    let mut server = sc.client("server").await;
    server.done(ClientMsg::Serve { tool: "sum".into() }).await;
    let id = caller.op(call("", "server", "sum", 5000, None)).await;
    let (handle, tc) = tool_call(&mut server).await;
    assert!(matches!(tc, SidecarMsg::ToolCall { ref node, .. } if node == "tl"));
    server
        .done(ClientMsg::ToolReply {
            call: handle,
            ok: true,
            body: Bytes::from_static(b"3"),
        })
        .await;
    assert_eq!(
        caller.reply(id).await,
        SidecarMsg::Result {
            body: Bytes::from_static(b"3")
        }
    );
    drop((caller, server));
    sc.stop().await;
}

/// `CANCEL`: the call fails with `CANCELLED` at once (not at its deadline), the serving client
/// gets `TOOL_CANCELLED` for that call, and its late reply is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel() {
    let (sa, sb, mut caller, mut server) = setup().await;
    let id = caller
        .op(call(&sb.url(), "server", "slow", 60_000, None))
        .await;
    let (handle, _) = tool_call(&mut server).await;
    let start = Instant::now();
    caller.done(ClientMsg::Cancel { call: id }).await;
    expect_error(caller.reply(id).await, ErrorCode::Cancelled, "CANCEL");
    let f = server
        .event_where("TOOL_CANCELLED", |f| f.msg.kind() == kind::TOOL_CANCELLED)
        .await;
    assert_eq!(f.id, handle, "TOOL_CANCELLED names the call");
    assert!(start.elapsed() < Duration::from_secs(5));
    server
        .done(ClientMsg::ToolReply {
            call: handle,
            ok: true,
            body: Bytes::from_static(b"too late"),
        })
        .await;
    // Cancelling a call that is over is not an error; the connection still works.
    caller.done(ClientMsg::Cancel { call: id }).await;
    caller.ping().await;
    drop((caller, server));
    sa.stop().await;
    sb.stop().await;
}

/// A deadline that passes while the handler runs: the caller gets `DEADLINE_EXCEEDED` at about
/// the deadline, and the server `TOOL_CANCELLED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline() {
    let (sa, sb, mut caller, mut server) = setup().await;
    let start = Instant::now();
    let id = caller
        .op(call(&sb.url(), "server", "slow", 400, None))
        .await;
    let (handle, _) = tool_call(&mut server).await;
    expect_error(
        caller.reply(id).await,
        ErrorCode::DeadlineExceeded,
        "the deadline",
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(4),
        "DEADLINE_EXCEEDED after {took:?} for a 400 ms deadline"
    );
    let f = server
        .event_where("TOOL_CANCELLED", |f| f.msg.kind() == kind::TOOL_CANCELLED)
        .await;
    assert_eq!(f.id, handle);
    drop((caller, server));
    sa.stop().await;
    sb.stop().await;
}

/// At most once per key: a second `CALL` with the key of one that completed gets the same
/// result without a `TOOL_CALL`; two concurrent `CALL`s with one key run the handler once and
/// both get its result; another key runs the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_per_key() {
    let (sa, sb, mut caller, mut server) = setup().await;
    let url = sb.url();

    let id = caller
        .op(call(&url, "server", "echo", 5000, Some("once")))
        .await;
    let (handle, _) = tool_call(&mut server).await;
    server
        .done(ClientMsg::ToolReply {
            call: handle,
            ok: true,
            body: Bytes::from_static(b"first result"),
        })
        .await;
    let first = caller.reply(id).await;
    assert_eq!(
        first,
        SidecarMsg::Result {
            body: Bytes::from_static(b"first result")
        }
    );
    let again = caller
        .call(call(&url, "server", "echo", 5000, Some("once")))
        .await;
    assert_eq!(again, first, "the key's result, not a second execution");
    server.ping().await;
    assert!(
        server
            .queued_events()
            .iter()
            .all(|e| e.msg.kind() != kind::TOOL_CALL),
        "the handler ran twice for one key: {:?}",
        server.queued_events()
    );

    // Two at once with a new key: one TOOL_CALL, two RESULTs.
    let one = caller
        .op(call(&url, "server", "echo", 5000, Some("twin")))
        .await;
    let two = caller
        .op(call(&url, "server", "echo", 5000, Some("twin")))
        .await;
    let (handle, _) = tool_call(&mut server).await;
    // Give a duplicate execution time to show up before answering.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server
        .done(ClientMsg::ToolReply {
            call: handle,
            ok: true,
            body: Bytes::from_static(b"twin result"),
        })
        .await;
    let want = SidecarMsg::Result {
        body: Bytes::from_static(b"twin result"),
    };
    assert_eq!(caller.reply(one).await, want);
    assert_eq!(caller.reply(two).await, want);
    server.ping().await;
    let dup: Vec<_> = server
        .take_events()
        .into_iter()
        .filter(|e| e.msg.kind() == kind::TOOL_CALL)
        .collect();
    assert!(dup.is_empty(), "a second execution for one key: {dup:?}");

    // Another key is another execution.
    let id = caller
        .op(call(&url, "server", "echo", 5000, Some("other")))
        .await;
    let (handle, _) = tool_call(&mut server).await;
    server
        .done(ClientMsg::ToolReply {
            call: handle,
            ok: true,
            body: Bytes::from_static(b"other result"),
        })
        .await;
    assert_eq!(
        caller.reply(id).await,
        SidecarMsg::Result {
            body: Bytes::from_static(b"other result")
        }
    );
    drop((caller, server));
    sa.stop().await;
    sb.stop().await;
}

/// A `CALL` reusing the id of one in flight is refused (`CANCEL` names calls by id), and the
/// first call is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_id_in_flight() {
    let (sa, sb, mut caller, mut server) = setup().await;
    let id = caller
        .op(call(&sb.url(), "server", "slow", 5000, None))
        .await;
    let (handle, _) = tool_call(&mut server).await;
    caller
        .write(&agentfabric_sidecar::wire::FromClient {
            id,
            msg: call(&sb.url(), "server", "slow", 5000, None),
        })
        .await
        .unwrap();
    expect_error(
        caller.reply(id).await,
        ErrorCode::InvalidArgument,
        "a CALL reusing an id in flight",
    );
    server
        .done(ClientMsg::ToolReply {
            call: handle,
            ok: true,
            body: Bytes::from_static(b"done"),
        })
        .await;
    assert_eq!(
        caller.reply(id).await,
        SidecarMsg::Result {
            body: Bytes::from_static(b"done")
        }
    );
    drop((caller, server));
    sa.stop().await;
    sb.stop().await;
}
