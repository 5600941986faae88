//! How the transport starts its own threads (the bulk lane's and the one-sided lane's): named,
//! with a small stack, at the priority the settings give them.

use std::io;

use agentfabric::transport::ThreadPriority;

/// Stack of each lane thread: they keep their buffers on the heap.
const THREAD_STACK: usize = 256 << 10;

/// Starts `f` on a thread named `name` that first takes `priority`.
pub(crate) fn spawn(
    name: &str,
    priority: ThreadPriority,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            priority.apply();
            f()
        })
        .map(drop)
}
