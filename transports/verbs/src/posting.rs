//! The threads that post for a connection where [`Posting`](crate::config::Posting) asks for
//! them (a software device, by default): one posts the connection's one-sided pieces, one its
//! bulk lane's sends. Each sleeps until the data path wakes it, plans under the lock the work
//! needs and posts outside it (on a software device `ibv_post_send` runs the protocol, for
//! milliseconds), at its own priority, and ends when its connection is gone.

use std::io;
use std::sync::{Mutex, Weak};

use agentfabric::sync::lock;
use agentfabric::transport::ThreadPriority;

use crate::datapath::{fail_conn, Inner, Shared};
use crate::one_sided::RmaShared;

/// Name of a connection's one-sided posting thread.
pub(crate) const ONE_SIDED_POSTER: &str = "af-verbs-post";

/// Name of a bulk lane's posting thread.
pub(crate) const BULK_POSTER: &str = "af-verbs-bulk";

/// Has the bulk lane's sends posted by a thread of its own at `priority` from now on (`None`:
/// by whoever plans them).
pub(crate) fn start_posting(
    bulk: &Shared,
    priority: Option<ThreadPriority>,
    remote_name: &str,
) -> io::Result<()> {
    let Some(priority) = priority else {
        return Ok(());
    };
    // One pending wake-up is enough: the thread posts all that fits when it runs.
    let (kick, kicks) = std::sync::mpsc::sync_channel(1);
    let lane = bulk.downgrade();
    spawn_poster(BULK_POSTER, remote_name, move || {
        send_post_thread(lane, kicks, priority)
    })?;
    bulk.set_poster(kick);
    Ok(())
}

/// Starts a posting thread named `name` for the connection to `remote_name`.
pub(crate) fn spawn_poster(
    name: &str,
    remote_name: &str,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "verbs connection to {remote_name}: cannot start its posting thread {name} \
                     ({e}); VerbsConfig::posting = Posting::Caller needs none"
                ),
            )
        })
}

/// The connection's one-sided posting thread ([`crate::config::Posting`]): posts what is
/// queued each time it is woken, at `priority`, until the connection is gone (its wake-up
/// sender drops with it).
pub(crate) fn post_thread(
    conn: Weak<Mutex<Inner>>,
    ops: Weak<RmaShared>,
    kicks: std::sync::mpsc::Receiver<()>,
    priority: ThreadPriority,
) {
    priority.apply();
    while kicks.recv().is_ok() {
        // Held through the post: the QPs live until it returns. If the connection was
        // dropped meanwhile, it is torn down here when these go.
        let (Some(conn), Some(ops)) = (conn.upgrade(), ops.upgrade()) else {
            return;
        };
        if let Err(e) = ops.post() {
            fail_conn(&conn, e.kind(), e.to_string());
        }
    }
}

/// A lane's posting thread (`lanes.rs`): plans under the lane's lock and posts outside
/// it, each time it is woken, at `priority`, until the lane is gone (its wake-up sender drops
/// with it).
pub(crate) fn send_post_thread(
    lane: Weak<Mutex<Inner>>,
    kicks: std::sync::mpsc::Receiver<()>,
    priority: ThreadPriority,
) {
    priority.apply();
    while kicks.recv().is_ok() {
        // Held through the post: the QP and send slots live until it returns.
        let Some(lane) = lane.upgrade() else {
            return;
        };
        loop {
            let planned = {
                let mut st = lock(&lane);
                let planned = st.plan_batch();
                if planned.is_none() && st.failed() {
                    // Planning failed the lane (an oversize frame): the halves learn of it now.
                    st.wake_both();
                }
                planned
            };
            let Some(mut batch) = planned else {
                break;
            };
            // Outside the lock: on a software device this call runs the protocol for every
            // byte posted, for milliseconds, while the lane's stream half takes its receives.
            // SAFETY: `lane` is held; this thread is the lane's only poster once it runs (its
            // `poster` is set), so batches are submitted one at a time, in order.
            let rc = unsafe { batch.submit() };
            let mut st = lock(&lane);
            let posted = st.finish(batch, rc);
            // The sink waits for its queue to empty (or the error), the stream perhaps for
            // credits returned.
            st.wake_both();
            if !posted {
                break;
            }
        }
    }
}
