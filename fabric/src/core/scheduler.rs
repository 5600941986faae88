//! Which channel sends the next chunk.
//!
//! Strict priority between classes (coordination, then tool calls, then bulk), weighted
//! round-robin between the ready channels of one class (weight = priority + 1 chunks per turn),
//! and anti-starvation: a class that has waited longer than the bound while higher classes kept
//! the link busy gets one chunk out. With priorities off, every message goes out whole in the
//! order it was queued (the FIFO baseline of the benchmarks).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::class::{Class, Priority};

#[derive(Debug, Default)]
struct ClassRing {
    /// Ready channels with their weight.
    ring: VecDeque<(u32, u32)>,
    /// Chunks the front channel may still send in its turn (0: not yet started).
    deficit: u32,
}

#[derive(Debug)]
pub(crate) struct Scheduler {
    priorities: bool,
    classes: [ClassRing; 3],
    /// With priorities off: one entry per queued message, in queue order.
    fifo: VecDeque<u32>,
    waiting_since: [Option<Instant>; 3],
    starvation_bound: Duration,
}

impl Scheduler {
    pub(crate) fn new(priorities: bool, starvation_bound: Duration) -> Self {
        Scheduler {
            priorities,
            classes: Default::default(),
            fifo: VecDeque::new(),
            waiting_since: [None; 3],
            starvation_bound,
        }
    }

    pub(crate) fn priorities(&self) -> bool {
        self.priorities
    }

    /// A message was queued on `ch` (FIFO mode keeps message order).
    pub(crate) fn on_message_queued(&mut self, ch: u32) {
        if !self.priorities {
            self.fifo.push_back(ch);
        }
    }

    /// `ch` has become able to send (priority mode). The caller tracks membership so a channel
    /// is never added twice.
    pub(crate) fn mark_ready(&mut self, ch: u32, class: Class, prio: Priority) {
        if self.priorities {
            self.classes[class.index()]
                .ring
                .push_back((ch, prio.weight()));
        }
    }

    /// The channel that should send the next chunk, given which classes the congestion window
    /// still lets send. The caller sends one chunk and then calls [`Scheduler::after_send`].
    pub(crate) fn pick(&mut self, now: Instant, allowed: impl Fn(Class) -> bool) -> Option<u32> {
        if !self.priorities {
            return self.fifo.front().copied();
        }
        let mut first = None;
        for class in Class::ALL {
            let ring = &self.classes[class.index()];
            if ring.ring.is_empty() || !allowed(class) {
                continue;
            }
            if first.is_none() {
                first = Some(class);
                continue;
            }
            // A lower class is ready but not chosen: starving since when?
            let since = self.waiting_since[class.index()].get_or_insert(now);
            if now.saturating_duration_since(*since) >= self.starvation_bound {
                self.waiting_since[class.index()] = None;
                return self.front_of(class);
            }
        }
        let class = first?;
        self.waiting_since[class.index()] = None;
        self.front_of(class)
    }

    fn front_of(&mut self, class: Class) -> Option<u32> {
        let ring = &mut self.classes[class.index()];
        let &(ch, weight) = ring.ring.front()?;
        if ring.deficit == 0 {
            ring.deficit = weight;
        }
        Some(ch)
    }

    /// After `ch` sent a chunk: `still_ready` says whether it can send more now, `message_done`
    /// whether the chunk ended a message.
    pub(crate) fn after_send(
        &mut self,
        ch: u32,
        class: Class,
        still_ready: bool,
        message_done: bool,
    ) {
        if !self.priorities {
            if message_done && self.fifo.front() == Some(&ch) {
                self.fifo.pop_front();
            }
            return;
        }
        let ring = &mut self.classes[class.index()];
        if ring.ring.front().map(|e| e.0) != Some(ch) {
            return;
        }
        if !still_ready {
            ring.ring.pop_front();
            ring.deficit = 0;
            return;
        }
        ring.deficit = ring.deficit.saturating_sub(1);
        if ring.deficit == 0 {
            ring.ring.rotate_left(1);
        }
    }

    /// `ch` cannot send (no credit, or nothing queued): take it out of its ring.
    pub(crate) fn remove(&mut self, ch: u32, class: Class) {
        if !self.priorities {
            return;
        }
        let ring = &mut self.classes[class.index()];
        if let Some(i) = ring.ring.iter().position(|e| e.0 == ch) {
            ring.ring.remove(i);
            if i == 0 {
                ring.deficit = 0;
            }
        }
    }

    /// `ch` will never send again (its peer refused it): take it out of its ring, and in FIFO
    /// mode drop its queued messages' turns.
    pub(crate) fn forget(&mut self, ch: u32, class: Class) {
        self.remove(ch, class);
        if !self.priorities {
            self.fifo.retain(|&c| c != ch);
        }
    }

    /// Forgets everything (the session is dead).
    pub(crate) fn clear(&mut self) {
        for r in &mut self.classes {
            r.ring.clear();
            r.deficit = 0;
        }
        self.fifo.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: u8) -> Priority {
        Priority::new(v).unwrap()
    }

    #[test]
    fn strict_priority_between_classes() {
        let now = Instant::now();
        let mut s = Scheduler::new(true, Duration::from_secs(1));
        s.mark_ready(1, Class::Bulk, p(7));
        s.mark_ready(2, Class::Coordination, p(0));
        assert_eq!(s.pick(now, |_| true), Some(2));
        s.after_send(2, Class::Coordination, false, true);
        assert_eq!(s.pick(now, |_| true), Some(1));
        // Congestion holds bulk back: nothing to send.
        assert_eq!(s.pick(now, |c| c != Class::Bulk), None);
    }

    #[test]
    fn weighted_round_robin_inside_a_class() {
        let now = Instant::now();
        let mut s = Scheduler::new(true, Duration::from_secs(1));
        s.mark_ready(1, Class::Bulk, p(0)); // weight 1
        s.mark_ready(2, Class::Bulk, p(2)); // weight 3
        let mut counts = [0u32; 3];
        for _ in 0..400 {
            let ch = s.pick(now, |_| true).unwrap();
            counts[ch as usize] += 1;
            s.after_send(ch, Class::Bulk, true, false);
        }
        assert_eq!(counts[1], 100);
        assert_eq!(counts[2], 300);
    }

    #[test]
    fn starving_class_gets_a_turn() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(true, Duration::from_millis(5));
        s.mark_ready(1, Class::Coordination, p(3));
        s.mark_ready(2, Class::Bulk, p(3));
        assert_eq!(s.pick(t0, |_| true).unwrap(), 1);
        s.after_send(1, Class::Coordination, true, true);
        assert_eq!(s.pick(t0 + Duration::from_millis(1), |_| true).unwrap(), 1);
        s.after_send(1, Class::Coordination, true, true);
        assert_eq!(s.pick(t0 + Duration::from_millis(6), |_| true).unwrap(), 2);
    }

    #[test]
    fn fifo_mode_keeps_message_order() {
        let now = Instant::now();
        let mut s = Scheduler::new(false, Duration::from_millis(5));
        s.on_message_queued(5);
        s.on_message_queued(1);
        assert_eq!(s.pick(now, |_| true).unwrap(), 5);
        s.after_send(5, Class::Bulk, true, false);
        assert_eq!(s.pick(now, |_| true).unwrap(), 5);
        s.after_send(5, Class::Bulk, true, true);
        assert_eq!(s.pick(now, |_| true).unwrap(), 1);
    }
}
