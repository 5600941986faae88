//! Notifications that ride on a one-sided transfer's last write (RDMA WRITE with immediate).
//!
//! When a one-sided write asks to notify its target, the target hands out a token as it checks
//! the transfer, remembering the region and tag under it; the initiator puts the token in the
//! immediate data of the transfer's last write. The write lands after every write before it on
//! the connection, so when the target's connection reports the immediate, all of the transfer's
//! blocks are in place: the notification is delivered then, with no message of its own and no
//! round trip after the last block.
//!
//! Exactly once: a token is taken out of the table by whichever comes first, the immediate or
//! the session message the initiator sends instead when the one-sided path failed before its
//! last write was acknowledged (it names the token); the second finds nothing and delivers
//! nothing. The table is bounded; when it is full the target hands out no token and the
//! initiator notifies through the session, as on transports without RDMA.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::sync::lock;
use crate::transport::ImmediateHandler;

/// Tokens handed out and not yet used, plus notifications landed and not yet delivered, per
/// session. Beyond this the target hands out no more tokens.
pub(crate) const MAX_PENDING_NOTES: usize = 1024;

/// A notification's region and tag.
pub(crate) type Note = (u64, u64);

/// A session's notification tokens (see the module docs).
#[derive(Default)]
pub(crate) struct PendingNotes {
    inner: Mutex<Table>,
    landed_ready: Notify,
}

#[derive(Default)]
struct Table {
    last: u32,
    waiting: HashMap<u32, Note>,
    landed: VecDeque<Note>,
}

impl PendingNotes {
    /// Hands out a token for a notification of `region` with `tag`; `None` when the table is
    /// full (the initiator then notifies through the session).
    pub(crate) fn announce(&self, region: u64, tag: u64) -> Option<u32> {
        let mut t = lock(&self.inner);
        if t.waiting.len() + t.landed.len() >= MAX_PENDING_NOTES {
            return None;
        }
        // Never 0 (not a token on the wire) and never one still waiting.
        let token = loop {
            t.last = t.last.wrapping_add(1);
            if t.last != 0 && !t.waiting.contains_key(&t.last) {
                break t.last;
            }
        };
        t.waiting.insert(token, (region, tag));
        Some(token)
    }

    /// The write carrying `token` landed: its notification is ready for delivery. An unknown
    /// token (already delivered through the session, or never handed out) is ignored.
    pub(crate) fn land(&self, token: u32) {
        let mut t = lock(&self.inner);
        if let Some(note) = t.waiting.remove(&token) {
            t.landed.push_back(note);
            drop(t);
            self.landed_ready.notify_one();
        } else {
            tracing::debug!(token, "write with immediate names no pending notification");
        }
    }

    /// Takes `token`'s notification for delivery through the session; `None` when its write
    /// landed with the immediate (delivered that way) or it was never handed out.
    pub(crate) fn take(&self, token: u32) -> Option<Note> {
        lock(&self.inner).waiting.remove(&token)
    }

    /// The next landed notification, in landing order.
    pub(crate) async fn next_landed(&self) -> Note {
        loop {
            let ready = self.landed_ready.notified();
            if let Some(n) = lock(&self.inner).landed.pop_front() {
                return n;
            }
            ready.await;
        }
    }

    /// Every landed notification not yet delivered, in landing order.
    pub(crate) fn take_landed(&self) -> Vec<Note> {
        lock(&self.inner).landed.drain(..).collect()
    }

    /// What a connection of the session calls with the immediates of the peer's writes.
    pub(crate) fn handler(self: &Arc<Self>) -> ImmediateHandler {
        let notes = Arc::downgrade(self);
        Arc::new(move |token| {
            if let Some(n) = notes.upgrade() {
                n.land(token);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_delivered_once_whichever_way_comes_first() {
        let notes = Arc::new(PendingNotes::default());
        let a = notes.announce(1, 10).expect("room");
        let b = notes.announce(2, 20).expect("room");
        assert_ne!(a, b);
        // `a` lands by immediate; the session's fallback for it then finds nothing.
        (notes.handler())(a);
        assert_eq!(notes.take(a), None);
        // `b` goes through the session; a late immediate for it is ignored.
        assert_eq!(notes.take(b), Some((2, 20)));
        notes.land(b);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(rt.block_on(notes.next_landed()), (1, 10));
        assert!(notes.take_landed().is_empty());
        // Forged tokens deliver nothing.
        notes.land(0xdead);
        assert!(notes.take_landed().is_empty());
        let c = notes.announce(3, 30).expect("room");
        notes.land(c);
        assert_eq!(notes.take_landed(), vec![(3, 30)]);
    }

    #[test]
    fn the_table_is_bounded() {
        let notes = PendingNotes::default();
        for i in 0..MAX_PENDING_NOTES as u64 {
            assert!(notes.announce(i, i).is_some());
        }
        assert_eq!(notes.announce(0, 0), None);
        // Landed but undelivered notifications count too.
        notes.land(1);
        assert_eq!(notes.announce(0, 0), None);
        assert_eq!(notes.take(2), Some((1, 1)));
        assert!(notes.announce(0, 0).is_some());
    }
}
