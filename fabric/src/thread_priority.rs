//! Scheduling priority for the threads a transport runs its bulk work on (the tcp transport's
//! bulk lane, the verbs transport's one-sided posting on software devices).
//!
//! Why a transport needs it: moving bulk bytes can be CPU work done in system calls (the
//! kernel's copies in `write` and `read` on loopback TCP; Soft-RoCE's whole protocol inside the
//! posting `write`). Done on the async runtime's workers, that work holds a worker while a
//! coordination message waits for it. A runtime has no priorities; the kernel's scheduler
//! does: on a thread of its own at a lower priority, bulk uses the CPU time the runtime
//! leaves, and the kernel preempts it when a worker wakes for a coordination frame.

#[cfg(target_os = "linux")]
use std::io;

/// Scheduling priority of a transport's bulk thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadPriority {
    /// Linux `SCHED_IDLE`: the thread runs only on CPU time nothing else wants, and the kernel
    /// preempts it as soon as any normal thread wakes. Bulk nearly stops while the
    /// application keeps the CPUs busy. Measured over tcp at two runtime workers
    /// (`agentfabric bench --transport tcp --workload mixed --threads 2`, 2 cores):
    /// `ratio_loaded_idle_p99` 3.3 against `Nice(10)`'s 2.7–3.3 with 256 KiB writes (bulk 0.29
    /// of its solo rate), and 1.7–1.9 with 32–64 KiB writes, but with bulk at 0.09–0.16 of
    /// solo. Elsewhere than Linux a no-op, as [`ThreadPriority::Inherit`].
    Idle,
    /// A nice value (-20..=19; raising priority, below the process's own, needs privileges).
    /// Linux only: elsewhere `setpriority` would renice the whole process, so this is a no-op
    /// there, as [`ThreadPriority::Inherit`].
    Nice(i8),
    /// The priority of the thread that started the bulk thread.
    Inherit,
}

impl ThreadPriority {
    /// Applies the priority to the calling thread. A failure is logged, not fatal: the thread
    /// still works, only without the scheduling preference.
    #[cfg(target_os = "linux")]
    pub fn apply(self) {
        let result = match self {
            ThreadPriority::Inherit => return,
            ThreadPriority::Idle => set_idle(),
            ThreadPriority::Nice(n) => set_nice(i32::from(n)),
        };
        if let Err(e) = result {
            tracing::warn!(priority = ?self, error = %e, "cannot set a bulk thread's priority");
        }
    }

    /// Leaves the calling thread's priority as it is: outside Linux, `setpriority` with
    /// `PRIO_PROCESS` and who = 0 renices the whole process (the runtime's workers with it), and
    /// there is no portable per-thread call. Logged at debug level, since it happens on every
    /// connection with the default settings.
    #[cfg(not(target_os = "linux"))]
    pub fn apply(self) {
        if self != ThreadPriority::Inherit {
            tracing::debug!(
                priority = ?self,
                "bulk thread priorities are applied on Linux only; the thread keeps its creator's"
            );
        }
    }
}

#[cfg(target_os = "linux")]
fn set_idle() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system call on the calling thread (pid 0) with a valid parameter.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn set_nice(n: i32) -> io::Result<()> {
    // On Linux, PRIO_PROCESS with who = 0 sets the calling thread's nice value only.
    // SAFETY: plain system call.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Linux only: elsewhere the priorities are not applied (see `ThreadPriority::apply`).
    #[cfg(target_os = "linux")]
    #[test]
    fn thread_priorities_are_applied_to_the_calling_thread() {
        let nice = std::thread::spawn(|| {
            ThreadPriority::Nice(7).apply();
            // SAFETY: plain system call on the calling thread.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .join()
        .unwrap();
        assert_eq!(nice, 7);
        let policy = std::thread::spawn(|| {
            ThreadPriority::Idle.apply();
            // SAFETY: plain system call on the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_IDLE);
    }
}
