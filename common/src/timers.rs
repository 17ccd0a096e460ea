//! A deadline queue for the event loop: the earliest deadline becomes `poll`'s timeout.
//!
//! An ordered map keyed by (deadline, sequence number), as twemproxy keeps its timeouts in a
//! tree: insert, cancel and pop-earliest are all O(log n), and cancelling is exact (no
//! tombstones piling up when timers are re-armed often).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Identifies a scheduled timer so that it can be cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerKey {
    deadline: Instant,
    seq: u64,
}

impl TimerKey {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

#[derive(Debug)]
pub struct TimerQueue<T> {
    entries: BTreeMap<TimerKey, T>,
    next_seq: u64,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        TimerQueue { entries: BTreeMap::new(), next_seq: 0 }
    }
}

impl<T> TimerQueue<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `value` to fire at `deadline`. Timers with equal deadlines fire in the order
    /// they were scheduled.
    pub fn schedule(&mut self, deadline: Instant, value: T) -> TimerKey {
        let key = TimerKey { deadline, seq: self.next_seq };
        self.next_seq += 1;
        self.entries.insert(key, value);
        key
    }

    /// Removes a timer that has not fired yet, returning its value.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        self.entries.remove(&key)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.first_key_value().map(|(key, _)| key.deadline)
    }

    /// How long `poll` may sleep: until the earliest deadline, or forever when there is none.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.next_deadline().map(|deadline| deadline.saturating_duration_since(now))
    }

    /// Takes the earliest timer whose deadline is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<T> {
        let entry = self.entries.first_entry()?;
        if entry.key().deadline <= now {
            Some(entry.remove())
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_deadline_order_and_respects_cancel() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = TimerQueue::new();
        let _a = q.schedule(t0 + ms(30), "a");
        let b = q.schedule(t0 + ms(10), "b");
        let _c = q.schedule(t0 + ms(20), "c");
        let _d = q.schedule(t0 + ms(20), "d");
        assert_eq!(q.timeout(t0), Some(ms(10)));
        assert_eq!(q.cancel(b), Some("b"));
        assert_eq!(q.cancel(b), None);
        assert_eq!(q.timeout(t0), Some(ms(20)));
        assert_eq!(q.pop_expired(t0 + ms(19)), None);
        assert_eq!(q.pop_expired(t0 + ms(25)), Some("c"));
        assert_eq!(q.pop_expired(t0 + ms(25)), Some("d"));
        assert_eq!(q.pop_expired(t0 + ms(25)), None);
        assert_eq!(q.timeout(t0 + ms(40)), Some(Duration::ZERO));
        assert_eq!(q.pop_expired(t0 + ms(40)), Some("a"));
        assert!(q.is_empty());
        assert_eq!(q.timeout(t0), None);
    }
}
