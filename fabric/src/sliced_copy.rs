//! Sliced copies: long copies on a runtime worker (a block into a region, a fragmented message
//! joined for `recv`), cut into slices with the worker yielded between them, so that a
//! coordination message that arrives meanwhile is not held up for the whole copy. [`CopyPacer`]
//! paces one such copy; this is about a worker's CPU time, not about pacing what is sent (the
//! session's congestion window and the transports do that).
//!
//! On a runtime with a single worker nothing else runs while a copy runs: a 1 MiB copy held the
//! worker for about 100 µs. There the slices are small ([`SLICE_ONE_WORKER`]); with more workers,
//! another worker polls the I/O driver while this one copies, and slicing finely only cost bulk
//! rate, so each caller says what slice it wants then.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Bytes copied between yields on a runtime with a single worker. Measured with `agentfabric
/// bench --transport tcp --workload mixed --bulk-api transfer` (one worker, two cores; the
/// receiving node copies each block into its region), `ratio_loaded_idle_p99` / bulk share of
/// solo: unsliced 5.1–5.4 / 0.73; 64 KiB 2.5 / 0.84–0.92; 32 KiB 2.0–2.2 / 0.82–0.85; 24 KiB
/// 1.9 / 0.76; 16 KiB 1.8 / 0.56–0.61 (each yield costs a poll of the I/O driver). At two
/// workers, 32 KiB slices left the p99 as it was and cut the bulk share from 0.74 to 0.58.
pub(crate) const SLICE_ONE_WORKER: usize = 32 << 10;

/// Most time sliced copies spend waiting at their yields, as a multiple of the time they spent
/// copying (on this worker, over the last [`PACE_WINDOW`] or so); past it, copies go on without
/// yielding until they have caught up. Without this bound, on a worker that always has other
/// tasks ready (in-process traffic), each yield waits for the runtime's next I/O poll, dozens of
/// task polls later, and the copies all but stop: transfers of 64 KiB blocks under an in-process
/// ping-pong completed nothing in 50 ms (debug build). With it, copies keep at least a ninth of
/// the worker while other work is ready. Measured with `agentfabric bench --transport tcp
/// --workload mixed --bulk-api transfer` (one worker): `ratio_loaded_idle_p99` 2.26–2.38 with a
/// bound of 4, 2.12–2.17 with 8, 2.0–2.2 unbounded.
const MAX_WAIT_PER_COPY: u32 = 8;

/// The account of copying and waiting is halved once it spans this long, so it follows the
/// worker's recent load.
const PACE_WINDOW: Duration = Duration::from_millis(20);

thread_local! {
    /// This worker's account (time copying, time waiting at yields) of sliced copies.
    static PACE: Cell<(Duration, Duration)> = const { Cell::new((Duration::ZERO, Duration::ZERO)) };
    /// Yields taken by sliced copies on this thread.
    #[cfg(test)]
    pub(crate) static YIELDS: Cell<usize> = const { Cell::new(0) };
}

/// Paces one copy: call [`CopyPacer::before`] before each piece of at most
/// [`CopyPacer::slice`] bytes.
pub(crate) struct CopyPacer {
    /// Bytes between yields (`usize::MAX`: never yield).
    slice: usize,
    since_yield: usize,
    /// When the current stretch of copying began.
    mark: Instant,
}

impl CopyPacer {
    /// A pacer with [`SLICE_ONE_WORKER`]-byte slices on a one-worker runtime, and
    /// `multi_worker_slice` otherwise (`usize::MAX`: do not slice).
    pub(crate) fn new(multi_worker_slice: usize) -> CopyPacer {
        CopyPacer {
            slice: slice_for_runtime(multi_worker_slice),
            since_yield: 0,
            mark: Instant::now(),
        }
    }

    /// Bytes between yields: copy in pieces of at most this.
    pub(crate) fn slice(&self) -> usize {
        self.slice
    }

    /// Call before copying `n` bytes (at most [`CopyPacer::slice`]): yields when a slice was
    /// copied since the last yield, unless copies on this worker have already waited their share.
    pub(crate) async fn before(&mut self, n: usize) {
        if self.since_yield >= self.slice {
            self.since_yield = 0;
            let now = Instant::now();
            let (copying, waiting) = PACE.get();
            let copying = copying + (now - self.mark);
            self.mark = now;
            account(copying, waiting);
            if waiting <= copying * MAX_WAIT_PER_COPY {
                // Deferred until the runtime has polled its I/O driver: a coordination message
                // that arrived meanwhile is taken before the copy goes on.
                tokio::task::yield_now().await;
                #[cfg(test)]
                YIELDS.set(YIELDS.get() + 1);
                let after = Instant::now();
                self.mark = after;
                // Read again: other copies on this worker ran meanwhile.
                let (copying, waiting) = PACE.get();
                account(copying, waiting + (after - now));
            }
        }
        self.since_yield += n;
    }
}

/// Records this worker's account of sliced copies, halved once it spans [`PACE_WINDOW`].
fn account(copying: Duration, waiting: Duration) {
    if copying + waiting > PACE_WINDOW {
        PACE.set((copying / 2, waiting / 2));
    } else {
        PACE.set((copying, waiting));
    }
}

/// [`SLICE_ONE_WORKER`] on a runtime with one worker, else `multi_worker_slice`.
fn slice_for_runtime(multi_worker_slice: usize) -> usize {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.metrics().num_workers() == 1 => SLICE_ONE_WORKER,
        _ => multi_worker_slice,
    }
}

/// Awaits `copy` beside another task; returns its output and whether the other task ran while
/// it was running (on a one-worker runtime: whether the copy let the worker go).
#[cfg(test)]
pub(crate) async fn beside_another_task<F: std::future::Future>(copy: F) -> (F::Output, bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let running = Arc::new(AtomicBool::new(false));
    let saw = Arc::new(AtomicBool::new(false));
    let (r, s) = (running.clone(), saw.clone());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let other = tokio::spawn(async move {
        let _ = started_tx.send(());
        loop {
            if r.load(Ordering::SeqCst) {
                s.store(true, Ordering::SeqCst);
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    started_rx.await.expect("task started");
    running.store(true, Ordering::SeqCst);
    let out = copy.await;
    running.store(false, Ordering::SeqCst);
    other.abort();
    (out, saw.load(Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies `src` into `dst` paced, as the callers do.
    async fn paced_copy(dst: &mut [u8], src: &[u8], multi_worker_slice: usize) {
        let mut pacer = CopyPacer::new(multi_worker_slice);
        let mut at = 0;
        for part in src.chunks(pacer.slice()) {
            pacer.before(part.len()).await;
            dst[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }

    #[test]
    fn a_copy_beside_a_busy_task_waits_at_yields_only_its_share() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (yields, slices) = rt.block_on(async {
            const LEN: usize = 8 << 20;
            let src: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
            // Written, so its pages are in: the copy's time is the copy's, not page faults'.
            let mut dst = vec![1u8; LEN];
            // Always ready, with 2 ms of work per poll: each yield of the copy waits for at
            // least one of its polls, far longer than a slice's copy.
            let busy = tokio::spawn(async {
                loop {
                    let until = Instant::now() + Duration::from_millis(2);
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    tokio::task::yield_now().await;
                }
            });
            tokio::task::yield_now().await;
            YIELDS.set(0);
            paced_copy(&mut dst, &src, usize::MAX).await;
            busy.abort();
            assert!(dst == src, "copied bytes differ");
            (YIELDS.get(), LEN / SLICE_ONE_WORKER)
        });
        // Unbounded, the copy would yield at every slice boundary.
        assert!(
            yields * 4 < slices,
            "{yields} yields in {slices} slices beside a busy task"
        );
    }

    #[test]
    fn slice_size_follows_the_worker_count() {
        let one = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(
            one.block_on(async { CopyPacer::new(1 << 20).slice() }),
            SLICE_ONE_WORKER
        );
        let two = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        assert_eq!(
            two.block_on(async { CopyPacer::new(1 << 20).slice() }),
            1 << 20
        );
        assert_eq!(
            CopyPacer::new(usize::MAX).slice(),
            usize::MAX,
            "outside a runtime"
        );
    }
}
