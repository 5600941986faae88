//! A tokio runtime sized for the fabric: one worker fewer than the cores, so that the
//! transports' own threads have a core.
//!
//! The tcp transport moves bulk on threads of its own at a low priority (two per connection,
//! tcp's `bulk_lane_io`), and the verbs transport posts on threads of its own on a software
//! device. They need a core while the runtime's workers run. tokio's default runtime has a
//! worker per core: a worker woken for a coordination message then waits behind the other
//! workers while the lane threads run, and bulk waits for the workers in turn (five 16 MiB
//! messages over tcp took 23–188 ms each on a 2-core machine; the tcp transport's docs give the
//! loaded round trips: p99 108–116 µs with 2 workers, 57–64 µs with 1).
//!
//! [`runtime()`] (also at the crate root, [`crate::runtime()`]) builds that runtime;
//! [`builder()`] gives its builder, to change other settings first; [`worker_threads()`] is its
//! worker count. `#[tokio::main(worker_threads = N)]` takes a literal only (an attribute cannot
//! call a function), so a program that wants the count of the machine it runs on builds the
//! runtime itself:
//!
//! ```
//! fn main() -> agentfabric::Result<()> {
//!     agentfabric::runtime()?.block_on(async {
//!         // ... build nodes, connect, send ...
//!         Ok(())
//!     })
//! }
//! ```
//!
//! Imports: std and tokio only.

/// The name of the runtime's threads.
const THREAD_NAME: &str = "agentfabric-worker";

/// The number of workers for a runtime that runs the fabric: one fewer than the cores this
/// process may use (`std::thread::available_parallelism`, which counts CPU affinity and cgroup
/// quotas), and at least 1.
pub fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

/// A multi-thread runtime's builder with [`worker_threads()`] workers, I/O and timers enabled
/// (`enable_all`) and threads named `agentfabric-worker`. Change other settings, then
/// `build()`. The worker count is set explicitly, so `TOKIO_WORKER_THREADS` does not apply; set
/// `worker_threads` on the builder to choose another.
pub fn builder() -> tokio::runtime::Builder {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(worker_threads())
        .thread_name(THREAD_NAME)
        .enable_all();
    b
}

/// A multi-thread runtime for the fabric: [`worker_threads()`] workers (one fewer than the
/// cores, at least 1), I/O and timers enabled, threads named `agentfabric-worker`. Fails only
/// when the operating system refuses the threads or the I/O driver.
///
/// ```
/// fn main() -> agentfabric::Result<()> {
///     let rt = agentfabric::runtime()?;
///     rt.block_on(async {
///         let net = agentfabric::mem::MemNetwork::new();
///         let node = agentfabric::Node::builder("agent")
///             .transport(net.transport())
///             .build()?;
///         node.listen("mem://agent").await?;
///         Ok(())
///     })
/// }
/// ```
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    builder().build()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn one_worker_fewer_than_the_cores_and_at_least_one() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let want = if cores > 1 { cores - 1 } else { 1 };
        assert_eq!(worker_threads(), want);
        let rt = runtime().unwrap();
        assert_eq!(rt.metrics().num_workers(), want);
    }

    #[test]
    fn the_runtime_has_io_timers_and_named_threads() {
        let rt = runtime().unwrap();
        let name = rt.block_on(async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                .await
                .unwrap()
        });
        assert_eq!(name.as_deref(), Some(THREAD_NAME));
    }
}
