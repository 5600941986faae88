//! Channel refusal: this side refusing a channel the peer opened ([`Session::refuse_channel`],
//! [`Session::refuse_new_channels`]), and a refusal from the peer arriving on a channel this
//! side opened.
//!
//! A refusal is the last message of the refusing side's direction of the channel (flag
//! [`MSG_REFUSE`], the reason as its body), queued behind what that side already queued: it
//! keeps the channel's order and is retransmitted and resumed like any chunk (see the module
//! docs of `session`). The refusing side then acknowledges and discards what arrives on the
//! channel (`recv.rs`); the opener, once the refusal is in, drops what it still had to send on
//! the channel and fails every operation on it.
//!
//! Imports: the session (`super::`), `core`'s channel state, the frame format and the error
//! types; calls `send.rs`'s ready list (never the other way round).

use std::time::Instant;

use bytes::Bytes;

use super::{refused, Event, Session, SYSTEM_CHANNEL};
use crate::core::channel_state::OutMsg;
use crate::error::Error;
use crate::frame::{refusal_reason, HEADER_LEN, MSG_REFUSE};

impl Session {
    /// Refuses channel `ch`, which the peer opened: the peer's pending and later operations on
    /// it fail with [`Error::ChannelRefused`] carrying `reason` (cut to
    /// [`MAX_REFUSAL_REASON`](crate::frame::MAX_REFUSAL_REASON) bytes) once the refusal
    /// arrives, after whatever this side queued on the channel before. Messages received and
    /// not read are discarded, and so is what arrives later (acknowledged, so the peer is not
    /// held up); later operations here fail with [`Error::ChannelRefused`] as well. Refusing a
    /// channel again does nothing; a channel this side opened cannot be refused
    /// ([`Error::Config`]).
    pub fn refuse_channel(&mut self, now: Instant, ch: u32, reason: &str) -> Result<(), Error> {
        self.check_open()?;
        match self.channels.get(&ch) {
            None => return Err(Error::UnknownChannel(ch)),
            Some(_) if self.is_local(ch) => {
                return Err(Error::Config(format!(
                    "channel {ch} was opened by this side: only a channel the peer opened can be \
                     refused"
                )))
            }
            Some(c) if c.refused_here.is_some() => return Ok(()),
            Some(_) => {}
        }
        self.refuse(now, ch, reason);
        Ok(())
    }

    /// From now on (with `Some(reason)`), channels the peer opens are refused as they arrive,
    /// and so are those waiting for [`Session::accept_channel`]; `None` takes them again from
    /// now on. System channels are never refused.
    pub fn refuse_new_channels(&mut self, now: Instant, reason: Option<&str>) {
        self.refuse_new = reason.map(|r| refusal_reason(r).to_owned());
        if let Some(reason) = self.refuse_new.clone() {
            while let Some(id) = self.accept_queue.pop_front() {
                self.refuse(now, id, &reason);
            }
        }
    }

    /// Whether channels the peer opens are refused as they arrive.
    pub fn refusing_new_channels(&self) -> bool {
        self.refuse_new.is_some()
    }

    /// The error an operation waiting on channel `ch` should end with: the session's, if it
    /// is dead; [`Error::ChannelRefused`] once the channel was refused (by the peer: after the
    /// messages it sent before the refusal were taken); `None` while it can still make
    /// progress.
    pub fn channel_error(&self, ch: u32) -> Option<Error> {
        if let Some(e) = self.dead() {
            return Some(e.clone());
        }
        let c = self.channels.get(&ch)?;
        let reason = c.refusal()?;
        c.delivered.is_empty().then(|| refused(ch, reason))
    }

    /// A channel the peer opened is refused by this side: mark it, drop what it holds for the
    /// application, and queue the refusal behind what this side queued on it.
    pub(super) fn refuse(&mut self, now: Instant, id: u32, reason: &str) {
        if id & SYSTEM_CHANNEL != 0 {
            return;
        }
        let reason = refusal_reason(reason);
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        if c.refused_here.is_some() {
            return;
        }
        c.refused_here = Some(reason.to_owned());
        // What arrived and was not read is dropped; its bytes go back to the peer as credit.
        for m in c.delivered.drain(..) {
            c.released += m.credit;
        }
        if let Some(p) = c.partial.as_mut() {
            c.released += p.release_rest();
            p.chunks.clear();
        }
        let body = Bytes::copy_from_slice(reason.as_bytes());
        c.queued_bytes += body.len();
        self.queued_bytes += body.len() as u64;
        c.queue.push_back(OutMsg {
            body,
            tag: 0,
            msg_flags: MSG_REFUSE,
            enqueued: now,
        });
        self.sched.on_message_queued(id);
        self.update_ready(id);
        self.events.push_back(Event::ChannelRefused {
            channel: id,
            reason: reason.to_owned(),
        });
    }

    /// The peer refused channel `id` (one this side opened), after every message it sent
    /// before: nothing more is sent on it (queued messages and unacknowledged chunks are
    /// dropped; the peer discards them anyway), and its operations fail.
    pub(super) fn on_refused_by_peer(&mut self, id: u32, reason: String) {
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        c.refusal_dropped = !c.queue.is_empty() || !c.unacked.is_empty();
        let dropped: usize = c.queue.drain(..).map(|m| m.body.len()).sum();
        self.queued_bytes -= (dropped as u64).min(self.queued_bytes);
        c.queued_bytes = 0;
        c.front_pos = 0;
        c.name_prefix = None;
        let unacked: u64 = c
            .unacked
            .drain(..)
            .map(|s| (HEADER_LEN + s.payload.len()) as u64)
            .sum();
        self.inflight -= unacked.min(self.inflight);
        c.in_ready = false;
        c.send_blocked = false;
        c.want_flush = false;
        c.refused_by_peer = Some(reason.clone());
        self.sched.forget(id, c.class);
        self.events.push_back(Event::ChannelRefused {
            channel: id,
            reason,
        });
    }
}
