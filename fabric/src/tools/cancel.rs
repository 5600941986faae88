//! [`CancelToken`]: how a handler learns that its call was cancelled or its deadline passed.
//!
//! Imports: nothing from the rest of the module; `crate::sync` from the crate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Fires when the caller cancels the call, or its deadline passes. Cheap to clone.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    fired: AtomicBool,
    notify: Notify,
    /// Set by [`CancelToken::abandon`]: why the server gave the call up.
    abandoned: Mutex<Option<String>>,
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token that has not fired.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Fires the token (idempotent).
    pub fn cancel(&self) {
        if !self.inner.fired.swap(true, Ordering::AcqRel) {
            self.inner.notify.notify_waiters();
        }
    }

    /// Gives the call up on the server's side, as not run: the server stops the handler,
    /// forgets the call's idempotency key (a retry with it runs the tool), and answers the
    /// caller that the call was refused, with `reason`. For a handler that forwards calls
    /// elsewhere (the sidecar) and finds the executor gone before it answered.
    pub fn abandon(&self, reason: impl Into<String>) {
        crate::sync::lock(&self.inner.abandoned).get_or_insert(reason.into());
        self.cancel();
    }

    /// Why the call was abandoned ([`CancelToken::abandon`]), if it was.
    pub fn abandoned(&self) -> Option<String> {
        crate::sync::lock(&self.inner.abandoned).clone()
    }

    /// Whether the token fired.
    pub fn is_cancelled(&self) -> bool {
        self.inner.fired.load(Ordering::Acquire)
    }

    /// Waits until the token fires.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}
