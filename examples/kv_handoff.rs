//! KV-cache hand-off: a prefill worker pushes a paged KV cache to a decode worker while the two
//! keep exchanging coordination messages.
//!
//! The decode worker registers a region for the cache and sends its descriptor to the prefill
//! worker on a coordination channel. The prefill worker writes 1,000 blocks of 64 KiB (scattered
//! over the region, as a paged cache is) with one batched transfer, asking for a notification
//! at the end; meanwhile a coordination ping-pong keeps running between the two. At the end the
//! decode worker checks every block byte for byte, and the example prints the transfer's
//! throughput and the coordination round trips measured during the hand-off.
//!
//! ```sh
//! cargo run --release -p agentfabric-examples --example kv_handoff            # TCP on loopback
//! cargo run --release -p agentfabric-examples --example kv_handoff -- --transport mem
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfabric::mem::MemNetwork;
use agentfabric::{Block, Class, Node, RegionDescriptor};
use hdrhistogram::Histogram;

const BLOCKS: u64 = 1000;
const BLOCK: u64 = 64 << 10;
/// Every await that could hang is bounded by this.
const LIMIT: Duration = Duration::from_secs(30);

fn byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9) >> 11) as u8
}

/// Where block `i` of the cache lives in the decode worker's region (scattered pages).
fn slot(i: u64) -> u64 {
    (i * 389) % BLOCKS
}

type AnyError = Box<dyn std::error::Error + Send + Sync>;

async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T, AnyError> {
    tokio::time::timeout(LIMIT, f)
        .await
        .map_err(|_| format!("{what} did not finish within {LIMIT:?}").into())
}

async fn run(mem: bool) -> Result<(), AnyError> {
    let net = MemNetwork::new();
    let build = |name: &str| {
        let b = Node::builder(name);
        if mem {
            b.transport(net.transport()).build()
        } else {
            b.transport(agentfabric_tcp::TcpTransport::new()).build()
        }
    };
    let decode = build("decode")?;
    let addr = decode
        .listen(if mem {
            "mem://decode"
        } else {
            "tcp://127.0.0.1:0"
        })
        .await?;
    let prefill = build("prefill")?;
    let to_decode = prefill.connect(&addr).await?;
    let from_prefill = timed("accept", decode.accept()).await??;

    // Decode: register the cache region and send its descriptor over coordination.
    let cache = decode.register((BLOCKS * BLOCK) as usize)?;
    let ctl_decode = from_prefill.channel(Class::Coordination, 7)?;
    ctl_decode
        .send(cache.descriptor().encode().to_vec())
        .await?;

    // Prefill: the KV cache it computed (a pattern here), in a registered region.
    let kv = prefill.register((BLOCKS * BLOCK) as usize)?;
    let data: Vec<u8> = (0..BLOCKS * BLOCK).map(byte).collect();
    kv.write_at(0, &data).await?;
    let ctl_prefill = timed("accept_channel", to_decode.accept_channel()).await??;
    let desc_msg = timed("descriptor", ctl_prefill.recv()).await??;
    let remote =
        RegionDescriptor::decode(&desc_msg.body).ok_or("the descriptor message is malformed")?;

    // Coordination keeps going during the hand-off: prefill pings, decode echoes.
    let echo = tokio::spawn({
        let ch = ctl_decode.clone();
        async move {
            while let Ok(m) = ch.recv().await {
                if ch.send(m.body).await.is_err() {
                    break;
                }
            }
        }
    });
    let done = Arc::new(AtomicBool::new(false));
    let pinger = tokio::spawn({
        let (ch, done) = (ctl_prefill.clone(), done.clone());
        async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                ch.send(vec![0u8; 64]).await?;
                ch.recv().await?;
                h.saturating_record(t.elapsed().as_micros().max(1) as u64);
            }
            Ok::<_, agentfabric::Error>(h)
        }
    });

    let blocks: Vec<Block> = (0..BLOCKS)
        .map(|i| Block {
            local: i * BLOCK,
            remote: slot(i) * BLOCK,
            len: BLOCK,
        })
        .collect();
    let report = timed(
        "the hand-off",
        to_decode.write(&kv, &remote, &blocks, Some(0xCAFE)),
    )
    .await??;
    let note = timed("the notification", decode.notification()).await??;
    done.store(true, Ordering::Relaxed);
    let hist = timed("the pinger", pinger).await???;
    echo.abort();

    // Decode checks every block where the page table says it is.
    let mut page = vec![0u8; BLOCK as usize];
    for i in 0..BLOCKS {
        cache.read_at(slot(i) * BLOCK, &mut page).await?;
        let want = &data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
        if page != want {
            return Err(format!("block {i} differs at the decode worker").into());
        }
    }

    let mb = report.bytes as f64 / 1e6;
    let secs = report.elapsed.as_secs_f64();
    println!(
        "KV-cache hand-off over {}",
        if mem { "mem" } else { "tcp (loopback)" }
    );
    println!(
        "  moved      {} blocks of {} KiB = {mb:.1} MB in {:.1} ms ({:.0} MB/s), verified",
        report.blocks,
        BLOCK >> 10,
        secs * 1e3,
        mb / secs
    );
    println!("  notified   tag {:#x} from {}", note.tag, note.peer);
    println!(
        "  coordination during the hand-off: {} round trips, p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        hist.len(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    Ok(())
}

fn main() -> ExitCode {
    let mem = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--transport") => match std::env::args().nth(2).as_deref() {
            Some("mem") => true,
            Some("tcp") => false,
            other => {
                eprintln!("--transport takes tcp or mem, not {other:?}");
                return ExitCode::from(2);
            }
        },
        Some(other) => {
            eprintln!("usage: kv_handoff [--transport tcp|mem] (unknown argument {other:?})");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(mem)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv_handoff failed: {e}");
            ExitCode::FAILURE
        }
    }
}
