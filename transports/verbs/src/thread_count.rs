//! Counting this process's threads by name, for the tests that check a connection's threads
//! come and go: shared by the crate's unit tests and its lab integration tests (`#[path]`).

use std::time::Duration;

/// Threads of this process named `name` (Linux: `/proc/self/task/*/comm`).
pub fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim_end() == name)
                .count()
        })
        .unwrap_or(0)
}

/// Waits up to 5 s for the threads of this process named `name` to number `n` (a new thread
/// names itself once it runs; an ending one goes once it has run out), and returns how many
/// there are then.
pub async fn threads_named_become(name: &str, n: usize) -> usize {
    let t = std::time::Instant::now();
    while threads_named(name) != n && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    threads_named(name)
}
