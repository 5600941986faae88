//! # Orchestrator with five subagents
//!
//! One orchestrator node and five subagent nodes, each its own [`Node`], joined by the fabric.
//! The run has four phases:
//!
//! 1. **Fan-out.** The orchestrator sends every subagent a task (a shard of text to analyse) as a
//!    coordination request, all five in parallel, and gathers the results. Each result is checked
//!    against what the orchestrator expects for that shard.
//! 2. **Idle coordination.** For a short while the orchestrator exchanges small "plan step"
//!    requests with every subagent (coordination class) and calls a simulated tool on each
//!    (tool-call class, 4 KiB answers). Their round trips are recorded in HDR histograms: this is
//!    the baseline.
//! 3. **Hand-off under load.** The orchestrator hands a large result (32 MiB by default, filled
//!    with a position-dependent pattern) to one subagent on a [`Class::Bulk`] channel, while the
//!    plan steps and tool calls of phase 2 go on with *all* subagents, including the one
//!    receiving the bulk data. The subagent checks every byte against the pattern, computes a
//!    checksum and sends its verdict back; the orchestrator compares the checksum with its own.
//! 4. **Report.** p50, p99, p99.9 and max per class and phase, the hand-off's duration and
//!    throughput, and a few session counters from [`Peer::stats`].
//!
//! ## What to look at in the output
//!
//! The round-trip table has three rows per class:
//!
//! - *idle, all subagents*: the baseline, no bulk traffic anywhere.
//! - *hand-off, recipient*: requests to the subagent that is receiving the 32 MiB, on the same
//!   session as the bulk data. This row tests the fabric's central promise, "coordination never
//!   waits behind bulk": classes are scheduled by strict priority (coordination, then tool
//!   calls, then bulk) and bulk messages are cut into chunks, so a plan step should wait about
//!   one chunk's wire time, not the hand-off's. Its p99 and max should stay in the range of the
//!   idle row; a max close to the hand-off's duration means a request waited for the whole bulk
//!   message somewhere. (The hand-off is short, so this row has few samples: read its max.)
//! - *hand-off, the others*: requests to the four other subagents, on other sessions. These
//!   share nothing with the bulk transfer but the process's CPU (every node of this example runs
//!   in one process on two worker threads) and, on TCP, the loopback device.
//!
//! On TCP, bytes already handed to the kernel cannot be overtaken, so some extra tail is
//! expected there; the in-process transport shows the fabric alone.
//!
//! The last table is the fabric's own view of each plan channel. `queue max` is the longest a
//! message waited in the orchestrator's send queue before its first chunk went out: when a round
//! trip is long but `queue max` is short, the time was lost after the orchestrator sent it.
//!
//! ## Running it
//!
//! ```text
//! cargo run --release -p agentfabric-examples --example orchestrator                    # TCP, loopback
//! cargo run --release -p agentfabric-examples --example orchestrator -- --transport mem
//! cargo run --release -p agentfabric-examples --example orchestrator -- --bulk-mib 64
//! ```
//!
//! The process exits with status 0 only if every task result, every reply and the bulk checksum
//! were right. Every wait is bounded, so a broken fabric makes it fail, never hang.

use std::fmt::Write as _;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfabric::mem::MemNetwork;
use agentfabric::{Bytes, Channel, Class, Error, Message, Node, Peer};
use agentfabric_tcp::TcpTransport;
use hdrhistogram::Histogram;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;

// ─── Scenario parameters ─────────────────────────────────────────────────────────────────────

/// How many subagents the orchestrator drives.
const SUBAGENTS: usize = 5;
/// The subagent that receives the bulk hand-off (by index).
const RECIPIENT: usize = 2;
/// Default size of the bulk hand-off.
const DEFAULT_BULK_MIB: usize = 32;
/// Words in each subagent's shard of the fan-out task.
const SHARD_WORDS: usize = 2_000;
/// Size of a simulated tool's answer.
const TOOL_RESULT_BYTES: usize = 4 << 10;

/// Priorities within each class (0–7). Only channels of the same class compete by priority;
/// between classes the order is fixed (coordination > tool call > bulk).
const PLAN_PRIORITY: u8 = 6;
const TOOL_PRIORITY: u8 = 3;
const BULK_PRIORITY: u8 = 3;

/// Pacing of the background traffic: coordination is sporadic in a real agent system, so the
/// probes send at a steady rate rather than back to back (which would measure saturation).
const PLAN_PERIOD: Duration = Duration::from_millis(1);
const TOOL_PERIOD: Duration = Duration::from_millis(4);
/// Length of the idle baseline.
const IDLE_PHASE: Duration = Duration::from_millis(500);

/// Bounds on every wait, so that a broken fabric fails the run instead of hanging it.
const SETUP_LIMIT: Duration = Duration::from_secs(5);
const RPC_DEADLINE: Duration = Duration::from_secs(1);
const HANDOFF_LIMIT: Duration = Duration::from_secs(20);
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(3);
/// Hard cap on the whole run.
const RUN_LIMIT: Duration = Duration::from_secs(40);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

// ─── Entry point ─────────────────────────────────────────────────────────────────────────────

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Multi-thread runtime: subagents and orchestrator really run in parallel, as separate
    // processes would. Two workers match the small machines this example is run on.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = rt.block_on(async {
        tokio::time::timeout(RUN_LIMIT, run(opts))
            .await
            .unwrap_or_else(|_| Err(format!("the run did not finish within {RUN_LIMIT:?}").into()))
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(report) => {
            report.print();
            if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("orchestrator: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: orchestrator [--transport tcp|mem] [--bulk-mib N]";

struct Options {
    transport: Fabric,
    bulk_bytes: usize,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut opts = Options {
            transport: Fabric::Tcp,
            bulk_bytes: DEFAULT_BULK_MIB << 20,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--transport" => {
                    opts.transport = match args.next().as_deref() {
                        Some("tcp") => Fabric::Tcp,
                        Some("mem") => Fabric::Mem(MemNetwork::new()),
                        other => {
                            let got = other.unwrap_or("nothing");
                            return Err(format!("--transport takes tcp or mem, not {got:?}"));
                        }
                    }
                }
                "--bulk-mib" => {
                    let mib: usize = args
                        .next()
                        .and_then(|v| v.parse().ok())
                        .filter(|&m| (1..=100).contains(&m))
                        .ok_or("--bulk-mib takes a number from 1 to 100")?;
                    opts.bulk_bytes = mib << 20;
                }
                "-h" | "--help" => return Err("Orchestrator with five subagents.".into()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(opts)
    }
}

/// Which transport the nodes use. Only node construction and addresses differ: everything
/// after that is the same code, because every transport has the same semantics.
#[derive(Clone)]
enum Fabric {
    /// TCP over loopback; each node listens on an ephemeral port.
    Tcp,
    /// The in-process transport; nodes reach each other by name on one shared network.
    Mem(MemNetwork),
}

impl Fabric {
    fn describe(&self) -> &'static str {
        match self {
            Fabric::Tcp => "tcp (loopback)",
            Fabric::Mem(_) => "mem (in-process)",
        }
    }

    fn node(&self, name: &str) -> Res<Node> {
        let builder = Node::builder(name);
        let builder = match self {
            Fabric::Tcp => builder.transport(TcpTransport::new()),
            Fabric::Mem(net) => builder.transport(net.transport()),
        };
        Ok(builder.build()?)
    }

    fn listen_url(&self, name: &str) -> String {
        match self {
            Fabric::Tcp => "tcp://127.0.0.1:0".to_owned(),
            Fabric::Mem(_) => format!("mem://{name}"),
        }
    }
}

// ─── The orchestrator ────────────────────────────────────────────────────────────────────────

/// The orchestrator's handles on one subagent: the session and its long-lived channels.
struct Subagent {
    peer: Peer,
    /// Coordination: tasks, plan steps, results.
    plan: Channel,
    /// Tool calls the orchestrator routes through the subagent.
    tools: Channel,
}

async fn run(opts: Options) -> Res<Report> {
    let fabric = opts.transport;
    let mut report = Report::new(fabric.describe());

    let started = Instant::now();
    let (addrs, subagent_tasks) = start_subagents(&fabric).await?;
    let orchestrator = fabric.node("orchestrator")?;
    let subs = connect_all(&orchestrator, &addrs).await?;
    report.setup = started.elapsed();

    report.fan_out = fan_out(&subs, &mut report.failures).await?;

    let probes = Probes::start(&subs);
    tokio::time::sleep(IDLE_PHASE).await;
    report.idle = probes.finish(&mut report.failures).await;

    // Build the payload before the clock starts: we measure the fabric, not the pattern.
    let payload = pattern(opts.bulk_bytes);
    let probes = Probes::start(&subs);
    let handoff = hand_off(&subs[RECIPIENT], payload).await;
    report.during = probes.finish(&mut report.failures).await;
    match handoff {
        Ok(h) => report.handoff = Some(h),
        Err(e) => report.failures.push(format!("bulk hand-off: {e}")),
    }

    report.library_view = library_view(&subs);
    shut_down(&subs, subagent_tasks, &mut report.failures).await;
    Ok(report)
}

/// Starts every subagent node; returns the addresses they listen on and their tasks.
async fn start_subagents(fabric: &Fabric) -> Res<(Vec<String>, Vec<JoinHandle<Res<()>>>)> {
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..SUBAGENTS {
        let name = format!("subagent-{i}");
        let node = fabric.node(&name)?;
        addrs.push(
            within(
                "listen",
                SETUP_LIMIT,
                node.listen(&fabric.listen_url(&name)),
            )
            .await?,
        );
        tasks.push(tokio::spawn(subagent(node)));
    }
    Ok((addrs, tasks))
}

/// Opens a session with every subagent and the two long-lived channels on each.
async fn connect_all(orchestrator: &Node, addrs: &[String]) -> Res<Vec<Subagent>> {
    let mut subs = Vec::new();
    for addr in addrs {
        let peer = within("connect", SETUP_LIMIT, orchestrator.connect(addr)).await?;
        subs.push(Subagent {
            plan: peer.channel(Class::Coordination, PLAN_PRIORITY)?,
            tools: peer.channel(Class::ToolCall, TOOL_PRIORITY)?,
            peer,
        });
    }
    Ok(subs)
}

/// Phase 1: one task per subagent, all in flight at once; results gathered and checked.
async fn fan_out(subs: &[Subagent], failures: &mut Vec<String>) -> Res<FanOut> {
    let started = Instant::now();
    let mut pending = JoinSet::new();
    for (i, sub) in subs.iter().enumerate() {
        let plan = sub.plan.clone();
        pending.spawn(async move {
            let shard = shard_text(i);
            let body = format!("task {i}\n{shard}");
            let t = Instant::now();
            let reply = plan.request(body, RPC_DEADLINE).await;
            (i, t.elapsed(), reply, summarise(i, &shard))
        });
    }
    let mut out = FanOut::default();
    while let Some(joined) = pending.join_next().await {
        let (i, took, reply, expected) = joined?;
        out.slowest = out.slowest.max(took);
        match reply {
            Ok(r) if r == expected.as_bytes() => out.results.push(expected),
            Ok(r) => failures.push(format!(
                "task {i}: expected {expected:?}, got {:?}",
                String::from_utf8_lossy(&r)
            )),
            Err(e) => failures.push(format!("task {i}: {e}")),
        }
    }
    out.total = started.elapsed();
    out.results.sort();
    Ok(out)
}

/// Phase 3: hands `payload` to one subagent on a bulk channel and waits for its verdict.
async fn hand_off(sub: &Subagent, payload: Bytes) -> Res<Handoff> {
    let bulk = sub.peer.channel(Class::Bulk, BULK_PRIORITY)?;
    let expected = verdict_ok(payload.len(), checksum(&payload));
    let bytes = payload.len();
    let deadline = tokio::time::Instant::now() + HANDOFF_LIMIT;

    let started = Instant::now();
    // `send` returns once the message is queued; `flush` once the subagent's node has
    // acknowledged every chunk, which is when the data has crossed the fabric.
    until("queue the hand-off", deadline, bulk.send(payload)).await?;
    until("deliver the hand-off", deadline, bulk.flush()).await?;
    let delivered = started.elapsed();
    let reply = until("await the verdict", deadline, bulk.recv()).await?;
    let verified = started.elapsed();

    let verdict = String::from_utf8_lossy(&reply.body).into_owned();
    if verdict != expected {
        return Err(format!("subagent reported {verdict:?}, expected {expected:?}").into());
    }
    Ok(Handoff {
        to: sub.peer.name().to_owned(),
        bytes,
        delivered,
        verified,
        verdict,
        session: sub.peer.stats().session,
    })
}

/// Cross-check with the fabric's own per-channel histograms: request round trips (recorded by
/// `Channel::request`) and queueing delay (from `send` to the first chunk on the wire). A long
/// queueing delay means the orchestrator's side held the message; a long round trip with a short
/// queueing delay means it waited further on (in the network or at the subagent).
fn library_view(subs: &[Subagent]) -> Vec<String> {
    let max_us = |h: Option<Histogram<u64>>| h.map_or("-".to_owned(), |h| h.max().to_string());
    subs.iter()
        .map(|s| {
            let (requests, rtt_p99, rtt_max, queue_max) = match s.plan.stats() {
                Some(c) => (
                    c.stats.messages_sent,
                    c.request_rtt_us
                        .as_ref()
                        .map_or("-".to_owned(), |h| h.value_at_quantile(0.99).to_string()),
                    max_us(c.request_rtt_us),
                    max_us(c.stats.queue_delay_us),
                ),
                None => (0, "-".into(), "-".into(), "-".into()),
            };
            let session = s.peer.stats().session;
            format!(
                "{:<12} {requests:>6} {rtt_p99:>8} {rtt_max:>8} {queue_max:>8}    {:>6} {:>6}",
                s.peer.name(),
                session
                    .srtt
                    .map_or("-".into(), |d| d.as_micros().to_string()),
                session.retransmits
            )
        })
        .collect()
}

/// Closes every session (the subagents see `ClosedByPeer` and stop) and waits for them.
async fn shut_down(subs: &[Subagent], tasks: Vec<JoinHandle<Res<()>>>, failures: &mut Vec<String>) {
    for sub in subs {
        sub.peer.close("work done");
    }
    for (i, task) in tasks.into_iter().enumerate() {
        match tokio::time::timeout(SHUTDOWN_LIMIT, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(format!("subagent-{i}: {e}")),
            Ok(Err(e)) => failures.push(format!("subagent-{i} panicked: {e}")),
            Err(_) => failures.push(format!(
                "subagent-{i} did not stop within {SHUTDOWN_LIMIT:?}"
            )),
        }
    }
}

// ─── Background coordination and tool calls ──────────────────────────────────────────────────

/// A kind of small request the orchestrator keeps sending while the phases run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    PlanStep,
    ToolCall,
}

impl Rpc {
    fn period(self) -> Duration {
        match self {
            Rpc::PlanStep => PLAN_PERIOD,
            Rpc::ToolCall => TOOL_PERIOD,
        }
    }

    fn request(self, n: u64) -> String {
        match self {
            Rpc::PlanStep => format!("step {n}: rerank the candidate documents"),
            Rpc::ToolCall => format!("search {n}: vector index, top 8"),
        }
    }

    /// Whether `reply` answers request `n` (replies are matched to requests by the fabric, so a
    /// wrong number here would be a fabric bug).
    fn check(self, n: u64, reply: &[u8]) -> bool {
        match self {
            Rpc::PlanStep => reply == format!("done {n}").as_bytes(),
            Rpc::ToolCall => {
                reply.len() == TOOL_RESULT_BYTES
                    && reply.starts_with(format!("results {n}:").as_bytes())
            }
        }
    }
}

/// Round-trip histograms of one phase, per subagent and kind of request.
#[derive(Default)]
struct PhaseRtts {
    samples: Vec<(usize, Rpc, Histogram<u64>)>,
}

impl PhaseRtts {
    /// All round trips of `rpc` to the subagents that `which` selects, in one histogram.
    fn merged(&self, rpc: Rpc, which: impl Fn(usize) -> bool) -> Histogram<u64> {
        let mut all = histogram();
        for (sub, kind, h) in &self.samples {
            if *kind == rpc && which(*sub) {
                all.add(h).expect("histograms share their bounds");
            }
        }
        all
    }
}

/// Paced request loops, one per (subagent, kind), running until told to stop.
struct Probes {
    stop: Arc<AtomicBool>,
    loops: JoinSet<(usize, Rpc, Res<Histogram<u64>>)>,
}

impl Probes {
    fn start(subs: &[Subagent]) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let mut loops = JoinSet::new();
        for (i, sub) in subs.iter().enumerate() {
            for (rpc, ch) in [(Rpc::PlanStep, &sub.plan), (Rpc::ToolCall, &sub.tools)] {
                let (ch, stop) = (ch.clone(), stop.clone());
                loops.spawn(async move { (i, rpc, probe(ch, rpc, stop).await) });
            }
        }
        Probes { stop, loops }
    }

    async fn finish(mut self, failures: &mut Vec<String>) -> PhaseRtts {
        self.stop.store(true, Ordering::Relaxed);
        let mut rtts = PhaseRtts::default();
        // Each loop notices `stop` within one period, or fails its current request at
        // RPC_DEADLINE: this cannot wait long.
        while let Some(joined) = self.loops.join_next().await {
            match joined {
                Ok((i, rpc, Ok(h))) => rtts.samples.push((i, rpc, h)),
                Ok((_, _, Err(e))) => failures.push(e.to_string()),
                Err(e) => failures.push(format!("probe panicked: {e}")),
            }
        }
        rtts
    }
}

/// Sends request after request on `ch` at `rpc`'s pace and records their round trips.
async fn probe(ch: Channel, rpc: Rpc, stop: Arc<AtomicBool>) -> Res<Histogram<u64>> {
    let mut hist = histogram();
    let mut tick = tokio::time::interval(rpc.period());
    // If a round trip ever takes longer than the period, do not fire a burst to catch up: that
    // would measure our own queueing, not the fabric's.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let started = Instant::now();
    for n in 0.. {
        tick.tick().await;
        if stop.load(Ordering::Relaxed) || started.elapsed() > HANDOFF_LIMIT {
            break;
        }
        let t = Instant::now();
        let reply = ch
            .request(rpc.request(n), RPC_DEADLINE)
            .await
            .map_err(|e| format!("{rpc:?} {n} to {}: {e}", ch.peer().name()))?;
        hist.saturating_record(t.elapsed().as_nanos() as u64);
        if !rpc.check(n, &reply) {
            return Err(format!("{rpc:?} {n} to {}: wrong reply", ch.peer().name()).into());
        }
    }
    Ok(hist)
}

// ─── The subagent ────────────────────────────────────────────────────────────────────────────

/// A subagent: serves the orchestrator's session until the orchestrator closes it.
async fn subagent(node: Node) -> Res<()> {
    let peer = within("wait for the orchestrator", SETUP_LIMIT, node.accept()).await?;
    let mut serving = JoinSet::new();
    // The peer's channels appear here when their first message arrives. Each gets its own task,
    // so that checking 32 MiB of bulk data never delays a plan step. `accept_channel` fails
    // once the session is over (closed, or the peer silent past `Config::peer_timeout`), so
    // this loop is bounded.
    while let Ok(ch) = peer.accept_channel().await {
        serving.spawn(serve(ch));
    }
    let mut result = Ok(());
    while let Some(joined) = serving.join_next().await {
        if let Err(e) = joined.map_err(BoxError::from).and_then(|r| r) {
            result = Err(e);
        }
    }
    match peer.error() {
        Some(Error::ClosedByPeer(_)) => result,
        Some(e) => Err(format!("session ended with: {e}").into()),
        None => Err("session still open after accept_channel failed".into()),
    }
}

/// Answers every message of one channel, according to the channel's class.
async fn serve(ch: Channel) -> Res<()> {
    loop {
        let msg = match ch.recv().await {
            Ok(m) => m,
            // The session's end is reported by `subagent`; here it just means "stop".
            Err(e) if e.is_fatal() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match ch.class() {
            Class::Coordination => answer_coordination(&ch, &msg).await?,
            Class::ToolCall => answer_tool_call(&ch, &msg).await?,
            Class::Bulk => check_hand_off(&ch, msg).await?,
        }
    }
}

async fn answer_coordination(ch: &Channel, msg: &Message) -> Res<()> {
    let text = std::str::from_utf8(&msg.body).unwrap_or("");
    if let Some(rest) = text.strip_prefix("task ") {
        let (shard, words) = rest.split_once('\n').unwrap_or((rest, ""));
        let shard: usize = shard.parse().unwrap_or(usize::MAX);
        ch.respond(msg, summarise(shard, words)).await?;
    } else if let Some(rest) = text.strip_prefix("step ") {
        let n = rest.split(':').next().unwrap_or("?");
        ch.respond(msg, format!("done {n}")).await?;
    } else {
        // The requester gets `Error::Remote` with this reason instead of waiting for a deadline.
        ch.respond_error(msg, "unknown coordination message")
            .await?;
    }
    Ok(())
}

async fn answer_tool_call(ch: &Channel, msg: &Message) -> Res<()> {
    let text = std::str::from_utf8(&msg.body).unwrap_or("");
    let n = text
        .strip_prefix("search ")
        .and_then(|r| r.split(':').next())
        .unwrap_or("?");
    let mut answer = format!("results {n}:").into_bytes();
    answer.resize(TOOL_RESULT_BYTES, b'.');
    ch.respond(msg, answer).await?;
    Ok(())
}

/// Checks a hand-off byte for byte and sends the verdict back on the same channel.
async fn check_hand_off(ch: &Channel, msg: Message) -> Res<()> {
    // Checking 32 MiB takes milliseconds of CPU: do it off the runtime's worker threads, which
    // also carry this node's coordination traffic.
    let verdict = tokio::task::spawn_blocking(move || verify(&msg.body)).await?;
    ch.send(verdict).await?;
    Ok(())
}

// ─── Payloads ────────────────────────────────────────────────────────────────────────────────

/// The 64-bit word at word index `k` of the bulk pattern. It depends on the position, so a
/// chunk delivered at the wrong offset, twice, or not at all is caught, not just a flipped bit.
fn pattern_word(k: u64) -> u64 {
    (k ^ 0xA5A5_5A5A_0F0F_F0F0).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// `len` bytes of the pattern (`len` is a whole number of MiB, so of 8-byte words).
fn pattern(len: usize) -> Bytes {
    let mut buf = Vec::with_capacity(len);
    for k in 0..(len / 8) as u64 {
        buf.extend_from_slice(&pattern_word(k).to_le_bytes());
    }
    Bytes::from(buf)
}

/// FNV-1a over 64-bit little-endian words: cheap, and order-sensitive.
fn checksum(data: &[u8]) -> u64 {
    data.chunks(8).fold(0xcbf2_9ce4_8422_2325, |h, w| {
        let mut word = [0u8; 8];
        word[..w.len()].copy_from_slice(w);
        (h ^ u64::from_le_bytes(word)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn verdict_ok(len: usize, sum: u64) -> String {
    format!("verified {len} bytes, checksum {sum:016x}")
}

/// The subagent's check: every word against the pattern, then the checksum for the orchestrator.
fn verify(data: &[u8]) -> String {
    let words = data.chunks_exact(8);
    if !words.remainder().is_empty() {
        return format!(
            "corrupt: {} bytes is not a whole number of words",
            data.len()
        );
    }
    match words
        .zip(0u64..)
        .position(|(w, k)| w != pattern_word(k).to_le_bytes())
    {
        Some(k) => format!(
            "corrupt: the word at byte {} differs from the pattern",
            k * 8
        ),
        None => verdict_ok(data.len(), checksum(data)),
    }
}

/// A deterministic shard of "document" text for subagent `i`.
fn shard_text(i: usize) -> String {
    const VOCAB: [&str; 8] = [
        "agent",
        "plan",
        "tool",
        "context",
        "retrieve",
        "summarise",
        "embedding",
        "kv-cache",
    ];
    let words: Vec<&str> = (0..SHARD_WORDS)
        .map(|k| VOCAB[(k * 7 + i * 3 + k / 5) % VOCAB.len()])
        .collect();
    words.join(" ")
}

/// The "analysis" a subagent performs on its shard; the orchestrator computes the same to check.
fn summarise(shard: usize, text: &str) -> String {
    let words = text.split_whitespace().count();
    let longest = text
        .split_whitespace()
        .max_by_key(|w| w.len())
        .unwrap_or("");
    let distinct = {
        let mut v: Vec<&str> = text.split_whitespace().collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    format!("shard {shard}: {words} words, {distinct} distinct, longest {longest:?}")
}

// ─── Report ──────────────────────────────────────────────────────────────────────────────────

#[derive(Default)]
struct FanOut {
    total: Duration,
    slowest: Duration,
    results: Vec<String>,
}

struct Handoff {
    to: String,
    bytes: usize,
    delivered: Duration,
    verified: Duration,
    verdict: String,
    session: agentfabric::core::SessionStats,
}

struct Report {
    transport: &'static str,
    setup: Duration,
    fan_out: FanOut,
    idle: PhaseRtts,
    during: PhaseRtts,
    handoff: Option<Handoff>,
    library_view: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn new(transport: &'static str) -> Report {
        Report {
            transport,
            setup: Duration::ZERO,
            fan_out: FanOut::default(),
            idle: PhaseRtts::default(),
            during: PhaseRtts::default(),
            handoff: None,
            library_view: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn print(&self) {
        let mut out = String::new();
        let _ = writeln!(out, "agentfabric orchestrator example");
        let _ = writeln!(out, "  transport       {}", self.transport);
        let _ = writeln!(
            out,
            "  setup           {SUBAGENTS} subagents listening, orchestrator connected in {:.1?}",
            self.setup
        );
        let _ = writeln!(
            out,
            "  fan-out         {} of {SUBAGENTS} results gathered in {:.1?} (slowest round trip {:.1?})",
            self.fan_out.results.len(),
            self.fan_out.total,
            self.fan_out.slowest
        );
        for r in &self.fan_out.results {
            let _ = writeln!(out, "                  {r}");
        }

        let _ = writeln!(
            out,
            "\nround trips, µs                        count      p50      p99    p99.9      max"
        );
        let recipient = |i: usize| i == RECIPIENT;
        let others = |i: usize| i != RECIPIENT;
        for (rpc, class) in [
            (Rpc::PlanStep, "coordination"),
            (Rpc::ToolCall, "tool call"),
        ] {
            let rows = [
                ("idle, all subagents", self.idle.merged(rpc, |_| true)),
                ("hand-off, recipient", self.during.merged(rpc, recipient)),
                ("hand-off, the others", self.during.merged(rpc, others)),
            ];
            for (phase, h) in rows {
                let _ = writeln!(out, "{}", latency_row(&format!("{class:<13} {phase}"), &h));
            }
        }
        let _ = writeln!(out, "\nbulk hand-off");
        match &self.handoff {
            Some(h) => {
                let mib = h.bytes as f64 / f64::from(1 << 20);
                let _ = writeln!(out, "  to              {}", h.to);
                let _ = writeln!(out, "  size            {mib:.1} MiB");
                let _ = writeln!(
                    out,
                    "  delivered in    {:.1?}  ({:.0} MiB/s, acknowledged by the subagent's node)",
                    h.delivered,
                    mib / h.delivered.as_secs_f64()
                );
                let _ = writeln!(
                    out,
                    "  verified in     {:.1?}  ({:.0} MiB/s end to end, byte-for-byte check included)",
                    h.verified,
                    mib / h.verified.as_secs_f64()
                );
                let _ = writeln!(out, "  verdict         {}", h.verdict);
                let s = &h.session;
                let _ = writeln!(
                    out,
                    "  session         srtt {}, min rtt {}, cwnd {} KiB, credit stalls {}, retransmits {}",
                    s.srtt.map_or("-".into(), |d| format!("{d:.0?}")),
                    s.min_rtt.map_or("-".into(), |d| format!("{d:.0?}")),
                    s.cwnd >> 10,
                    s.credit_stalls,
                    s.retransmits
                );
            }
            None => {
                let _ = writeln!(out, "  failed: see the problems below");
            }
        }

        let _ = writeln!(
            out,
            "\nthe fabric's own view of the plan channels, µs (Channel::stats, Peer::stats)"
        );
        let _ = writeln!(
            out,
            "  peer           sent  rtt p99  rtt max  queue max      srtt  retransmits"
        );
        for line in &self.library_view {
            let _ = writeln!(out, "  {line}");
        }

        if self.failures.is_empty() {
            let _ = writeln!(out, "\nresult: OK");
        } else {
            let _ = writeln!(out, "\nresult: FAILED");
            for f in &self.failures {
                let _ = writeln!(out, "  - {f}");
            }
        }
        print!("{out}");
    }
}

/// A histogram of round trips in nanoseconds, 1 ns to 60 s, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

fn latency_row(label: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("{label:<36} {:>7}  (no samples)", 0);
    }
    let us = |ns: u64| ns as f64 / 1_000.0;
    format!(
        "{label:<36} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        h.len(),
        us(h.value_at_quantile(0.50)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    )
}

// ─── Bounded waits ───────────────────────────────────────────────────────────────────────────

/// Awaits a fabric operation for at most `limit`, naming it in the error.
async fn within<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = agentfabric::Result<T>>,
) -> Res<T> {
    until(what, tokio::time::Instant::now() + limit, fut).await
}

/// Awaits a fabric operation until `deadline`, naming it in the error.
async fn until<T>(
    what: &str,
    deadline: tokio::time::Instant,
    fut: impl Future<Output = agentfabric::Result<T>>,
) -> Res<T> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}").into()),
        Err(_) => Err(format!("{what}: timed out").into()),
    }
}
