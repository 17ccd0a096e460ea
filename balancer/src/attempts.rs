//! The attempt book: every GET sent to a proxy and not yet answered, held by the connection
//! it was sent on, under the id it was sent with.
//!
//! An answer is delivered only for an attempt sent on the connection it arrives on (SPEC
//! 3.6): ids are owned per connection, so a proxy that answers ids it was never sent, or
//! another connection's ids, finds nothing. An id names a slot of its connection's table and
//! that slot's generation (bumped each time the slot is freed), so it is found by indexing,
//! and a late answer for a slot that has been reused finds a newer generation and is dropped.
//! Each attempt has a deadline (`--request-timeout-ms`, or `--try-timeout-ms`); all get the
//! same timeout, so deadlines arrive sorted and one loop timer for the front serves them all.
//! Plain data: time comes in as an `Instant`, nothing here touches a socket.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// A hasher for maps keyed by numbers that are already well spread and not chosen by
/// clients (key hashes with a random seed), where SipHash would be a fifth of the balancer's
/// work per request (measured with callgrind). One multiplication.
#[derive(Default)]
pub struct SpreadU64(u64);

impl Hasher for SpreadU64 {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type U64Map<V> = HashMap<u64, V, BuildHasherDefault<SpreadU64>>;

/// One GET on its way to one proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The client request it is for.
    pub request: usize,
    pub backend: usize,
    pub conn: usize,
    /// Sent on a connection that was idle, with the bytes that connection had received so
    /// far: if it closes having said nothing more, the proxy closed an idle connection just as
    /// it was reused, and the GET goes again on a new one without counting as a failure.
    pub reused_at: Option<u64>,
}

/// How many ids back from the newest a connection's ring reaches. An attempt still waiting
/// when it falls off the back (its proxy is slow on it, not on those sent after it) moves
/// to the connection's stragglers, so the ring stays this short whatever the proxy does.
const RING_SPAN: usize = 1024;

/// What one connection owes: its attempts by id, the recent ones in a ring indexed by
/// `id - base`, older ones still waiting in a map.
#[derive(Debug, Default)]
struct Owed {
    /// The id of `ring[0]`; the next id is `base + ring.len()`.
    base: u64,
    ring: VecDeque<Option<Attempt>>,
    stragglers: U64Map<Attempt>,
    live: usize,
}

impl Owed {
    fn next_id(&self) -> u64 {
        self.base.wrapping_add(self.ring.len() as u64)
    }

    fn push(&mut self, attempt: Attempt) -> u64 {
        let id = self.next_id();
        self.ring.push_back(Some(attempt));
        self.live += 1;
        if self.ring.len() > RING_SPAN {
            if let Some(Some(old)) = self.ring.pop_front() {
                self.stragglers.insert(self.base, old);
            }
            self.base = self.base.wrapping_add(1);
        }
        self.trim();
        id
    }

    fn is_live(&self, id: u64) -> bool {
        match id.checked_sub(self.base) {
            Some(offset) => usize::try_from(offset).ok().and_then(|i| self.ring.get(i)).is_some_and(Option::is_some),
            None => self.stragglers.contains_key(&id),
        }
    }

    fn take(&mut self, id: u64) -> Option<Attempt> {
        let attempt = match id.checked_sub(self.base) {
            Some(offset) => usize::try_from(offset).ok().and_then(|i| self.ring.get_mut(i))?.take(),
            None => self.stragglers.remove(&id),
        }?;
        self.live = self.live.saturating_sub(1);
        self.trim();
        Some(attempt)
    }

    /// Answers come back roughly in sending order: the answered ids at the front go.
    fn trim(&mut self) {
        while let Some(None) = self.ring.front() {
            self.ring.pop_front();
            self.base = self.base.wrapping_add(1);
        }
    }

    /// The oldest waiting id.
    fn oldest(&self) -> Option<u64> {
        let in_ring = self.ring.iter().position(Option::is_some).map(|i| self.base.wrapping_add(i as u64));
        self.stragglers.keys().copied().min().or(in_ring)
    }

    /// Everything still waiting, in sending order; the connection owes nothing after.
    fn drain(&mut self) -> Vec<Attempt> {
        let next = self.next_id();
        let mut old: Vec<(u64, Attempt)> = self.stragglers.drain().collect();
        old.sort_unstable_by_key(|(id, _)| *id);
        let mut lost: Vec<Attempt> = old.into_iter().map(|(_, a)| a).collect();
        lost.extend(self.ring.drain(..).flatten());
        // Ids go on from where they were: none of this connection's is ever reused.
        self.base = next;
        self.live = 0;
        lost
    }
}

#[derive(Debug)]
pub struct AttemptBook {
    timeout: Duration,
    /// By connection index. It outlives its connection, its ids going on from where they
    /// were, so an id of a closed connection never names an attempt of the next one there.
    owed: Vec<Owed>,
    /// (deadline, conn, id) in sending order; entries of answered attempts are skipped.
    deadlines: VecDeque<(Instant, usize, u64)>,
    live: usize,
}

impl AttemptBook {
    pub fn new(timeout: Duration) -> Self {
        AttemptBook { timeout, owed: Vec::new(), deadlines: VecDeque::new(), live: 0 }
    }

    /// Records an attempt sent now; returns its id (what goes on the wire).
    pub fn start(&mut self, now: Instant, attempt: Attempt) -> u64 {
        if self.owed.len() <= attempt.conn {
            self.owed.resize_with(attempt.conn + 1, Owed::default);
        }
        let Some(owed) = self.owed.get_mut(attempt.conn) else { return 0 }; // resized above
        let id = owed.push(attempt);
        self.live += 1;
        self.deadlines.push_back((now + self.timeout, attempt.conn, id));
        id
    }

    /// An answer tagged `id` arrived on `conn`: the attempt, if one with that id was sent on
    /// that connection and is still waiting. `None`: unknown, late or foreign; drop it.
    pub fn answered(&mut self, conn: usize, id: u64) -> Option<Attempt> {
        let attempt = self.owed.get_mut(conn)?.take(id)?;
        self.live = self.live.saturating_sub(1);
        self.trim_deadlines();
        Some(attempt)
    }

    /// An untagged answer arrived on single-request connection `conn`: its oldest attempt.
    pub fn answered_in_order(&mut self, conn: usize) -> Option<Attempt> {
        let id = self.owed.get(conn)?.oldest()?;
        self.answered(conn, id)
    }

    /// The attempts still waiting on `conn`, which has closed, in sending order; they leave
    /// the book.
    pub fn conn_lost(&mut self, conn: usize) -> Vec<Attempt> {
        let Some(owed) = self.owed.get_mut(conn) else { return Vec::new() };
        let lost = owed.drain();
        self.live = self.live.saturating_sub(lost.len());
        self.trim_deadlines();
        lost
    }

    /// Attempts still waiting on `conn`.
    pub fn owed_by(&self, conn: usize) -> usize {
        self.owed.get(conn).map_or(0, |o| o.live)
    }

    /// The next attempt whose deadline has passed at `now`; it leaves the book.
    pub fn next_expired(&mut self, now: Instant) -> Option<Attempt> {
        self.trim_deadlines();
        let &(deadline, conn, id) = self.deadlines.front()?;
        if deadline > now {
            return None;
        }
        self.answered(conn, id)
    }

    /// When the front attempt's deadline is due, if any attempt waits.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.trim_deadlines();
        self.deadlines.front().map(|&(deadline, _, _)| deadline)
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Drops the front deadlines of attempts no longer waiting.
    fn trim_deadlines(&mut self) {
        while let Some(&(_, conn, id)) = self.deadlines.front() {
            if self.owed.get(conn).is_some_and(|o| o.is_live(id)) {
                return;
            }
            self.deadlines.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(request: usize, conn: usize) -> Attempt {
        Attempt { request, backend: conn / 10, conn, reused_at: None }
    }

    fn start(book: &mut AttemptBook, at: Instant, a: Attempt) -> u64 {
        book.start(at, a)
    }

    #[test]
    fn an_answer_counts_only_on_the_connection_its_attempt_was_sent_on() {
        let t0 = Instant::now();
        let mut book = AttemptBook::new(Duration::from_secs(3));
        let a = start(&mut book, t0, attempt(1, 10));
        let b = start(&mut book, t0, attempt(2, 20));
        assert_eq!(a, b, "ids are per connection: both are the first of theirs");
        let c = start(&mut book, t0, attempt(3, 20));
        assert_eq!(book.answered(10, c), None, "another connection's id");
        assert_eq!(book.answered(30, a), None, "a connection that was sent nothing");
        assert_eq!(book.answered(10, 999), None, "an id never sent");
        assert_eq!(book.answered(10, a), Some(attempt(1, 10)));
        assert_eq!(book.answered(10, a), None, "answered twice");
        assert_eq!((book.owed_by(10), book.owed_by(20)), (0, 2));
        assert_eq!(book.answered(20, b).map(|x| x.request), Some(2));
        assert_eq!(book.answered(20, c).map(|x| x.request), Some(3));
        assert!(book.is_empty());
    }

    #[test]
    fn a_late_answer_finds_nothing_and_ids_are_never_reused() {
        let t0 = Instant::now();
        let mut book = AttemptBook::new(Duration::from_millis(100));
        let old = start(&mut book, t0, attempt(1, 0));
        assert_eq!(book.next_expired(t0 + Duration::from_millis(100)).map(|a| a.request), Some(1));
        let new = start(&mut book, t0 + Duration::from_millis(100), attempt(2, 0));
        assert!(new > old, "a proxy that answers in order can only forge ids already answered");
        assert_eq!(book.answered(0, old), None, "the timed-out attempt's answer, late");
        assert_eq!(book.answered(0, new).map(|a| a.request), Some(2));
        // Nor across a lost connection whose index a new one takes.
        let before_loss = start(&mut book, t0, attempt(3, 0));
        assert_eq!(book.conn_lost(0).len(), 1);
        let after_loss = start(&mut book, t0, attempt(4, 0));
        assert!(after_loss > before_loss);
        assert_eq!(book.answered(0, before_loss), None);
        assert_eq!(book.answered(0, after_loss).map(|a| a.request), Some(4));
    }

    #[test]
    fn an_attempt_stuck_behind_thousands_stays_answerable_and_the_ring_short() {
        let t0 = Instant::now();
        let mut book = AttemptBook::new(Duration::from_secs(3));
        let stuck = start(&mut book, t0, attempt(0, 2));
        for r in 1..5_000 {
            let id = start(&mut book, t0, attempt(r, 2));
            assert_eq!(book.answered(2, id).map(|a| a.request), Some(r));
        }
        assert!(book.owed[2].ring.len() <= RING_SPAN);
        assert_eq!(book.owed_by(2), 1);
        assert_eq!(book.answered_in_order(2).map(|a| a.request), Some(0));
        assert_eq!(book.answered(2, stuck), None);
        assert!(book.is_empty());
    }

    #[test]
    fn deadlines_expire_in_order_and_skip_answered_attempts() {
        let t0 = Instant::now();
        let mut book = AttemptBook::new(Duration::from_millis(100));
        let a = start(&mut book, t0, attempt(1, 0));
        let _b = start(&mut book, t0 + Duration::from_millis(10), attempt(2, 0));
        let _c = start(&mut book, t0 + Duration::from_millis(50), attempt(3, 1));
        assert_eq!(book.next_deadline(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(book.next_expired(t0 + Duration::from_millis(99)), None);
        book.answered(0, a);
        assert_eq!(book.next_deadline(), Some(t0 + Duration::from_millis(110)));
        let late = t0 + Duration::from_millis(150);
        assert_eq!(book.next_expired(late).map(|x| x.request), Some(2));
        assert_eq!(book.next_expired(late).map(|x| x.request), Some(3));
        assert_eq!(book.next_expired(late), None);
        assert_eq!(book.next_deadline(), None);
        assert!(book.is_empty());
    }

    #[test]
    fn a_lost_connection_gives_back_exactly_its_waiting_attempts() {
        let t0 = Instant::now();
        let mut book = AttemptBook::new(Duration::from_secs(1));
        let ids: Vec<u64> = (0..6).map(|r| start(&mut book, t0, attempt(r, r % 2))).collect();
        book.answered(0, ids[2]);
        let lost: Vec<usize> = book.conn_lost(0).iter().map(|a| a.request).collect();
        assert_eq!(lost, vec![0, 4], "in sending order");
        assert_eq!(book.answered(0, ids[0]), None, "gone with its connection");
        assert_eq!(book.len(), 3);
        // A new connection reusing index 0 owes nothing of the old one's.
        assert_eq!(book.owed_by(0), 0);
        assert_eq!(book.answered_in_order(1).map(|a| a.request), Some(1));
        assert_eq!(book.answered_in_order(1).map(|a| a.request), Some(3));
        assert_eq!(book.answered_in_order(1).map(|a| a.request), Some(5));
        assert_eq!(book.answered_in_order(1), None);
        assert!(book.is_empty());
    }

    #[test]
    fn answered_in_order_the_ring_stays_empty() {
        let t0 = Instant::now();
        let mut book = AttemptBook::new(Duration::from_secs(1));
        for r in 0..10_000 {
            let id = start(&mut book, t0, attempt(r, 3));
            assert_eq!(book.answered(3, id).map(|a| a.request), Some(r));
        }
        assert!(book.owed[3].ring.is_empty());
        assert!(book.deadlines.is_empty());
    }
}
