//! First steps: an orchestrator, three subagents (two over TCP, one over QUIC with certificates
//! as `agentfabric certs dev` writes them), each serving a tool beside its own channels: a plan
//! step, a tool call with a deadline, a 16 MiB result back on a bulk channel named for its task.
//! `cargo run --release -p agentfabric-examples --example first_steps` (`cargo test` runs it).

use std::time::Duration;

use agentfabric::tools::{Incoming, ToolClient, ToolServer};
use agentfabric::{Channel, Class, Error, Node, Peer};
use agentfabric_quic::{write_dev_certs, QuicConfig, QuicTransport};
use agentfabric_tcp::TcpTransport;

const RESULT_BYTES: usize = 16 << 20;

fn main() -> agentfabric::Result<()> {
    agentfabric::runtime()?.block_on(run())
}

async fn run() -> agentfabric::Result<()> {
    let dir = std::env::temp_dir().join(format!("af-first-steps-{}", std::process::id()));
    let certs = write_dev_certs(&dir, &["orchestrator", "subagent-3"])?;
    let quic = |i: usize| -> agentfabric::Result<QuicTransport> {
        let (_, cert, key) = &certs.nodes[i];
        let config = QuicConfig::from_pem_files(&certs.ca_cert, cert, key)?;
        Ok(QuicTransport::new(config)?)
    };
    let orch = Node::builder("orchestrator")
        .transport(TcpTransport::new())
        .transport(quic(0)?)
        .build()?;
    for (i, url) in [(1, "tcp"), (2, "tcp"), (3, "quic")] {
        let sub = Node::builder(format!("subagent-{i}"));
        let sub = match url {
            "quic" => sub.transport(quic(1)?).build()?,
            _ => sub.transport(TcpTransport::new()).build()?,
        };
        let addr = sub.listen(&format!("{url}://127.0.0.1:0")).await?;
        let mut tools = ToolServer::new();
        tools.register("word_count", |req| async move {
            Ok(req.args.split(|b| *b == b' ').count().to_string().into())
        });
        tokio::spawn(subagent(tools.serve_beside(sub)));
        let peer = orch.connect(&addr).await?;
        println!("{}", orchestrate(format!("task-{i}"), peer).await?);
    }
    orch.close("all tasks done").await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

async fn orchestrate(task: String, peer: Peer) -> agentfabric::Result<String> {
    let plan = peer.channel(Class::Coordination, 6)?;
    let ack = plan
        .request(format!("{task}: count"), Duration::from_secs(2))
        .await?;
    let tools = ToolClient::new(&peer)?;
    let deadline = Duration::from_millis(500);
    let words = tools.call("word_count", "a b c d", deadline).await?;
    // The subagent opens one channel to us, for the result, named after the task.
    let result = peer.accept_channel().await?;
    let body = result.recv().await?.body;
    if result.name() != Some(&format!("result/{task}")) || body.len() != RESULT_BYTES {
        let what = format!("{task}: {:?}, {} bytes", result.name(), body.len());
        return Err(Error::Remote(what));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (ack, words, mib) = (text(&ack), text(&words), body.len() >> 20);
    Ok(format!(
        "{}: {task} {ack}, {words} words, {mib} MiB",
        peer.name()
    ))
}

/// A subagent: its `ToolServer` answers tool calls, every other channel comes here.
async fn subagent(mut incoming: Incoming) {
    while let Ok(ch) = incoming.accept_channel().await {
        tokio::spawn(plan_steps(ch));
    }
}

async fn plan_steps(ch: Channel) -> agentfabric::Result<()> {
    loop {
        let step = ch.recv().await?;
        let text = String::from_utf8_lossy(&step.body).into_owned();
        let task = text.split(':').next().unwrap_or("task");
        ch.respond(&step, "taken").await?;
        let name = format!("result/{task}");
        let result = ch.peer().channel_named(&name, Class::Bulk, 2)?;
        result.send(vec![7u8; RESULT_BYTES]).await?;
        result.flush().await?;
    }
}

#[test]
fn first_steps_run() {
    main().expect("the first steps run");
}
