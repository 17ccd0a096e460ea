//! The attempt book: every GET sent to a proxy and not yet answered, by the id it was sent
//! with, and which connection owns it.
//!
//! An answer is delivered only for an attempt sent on the connection it arrives on (SPEC
//! 3.6): a proxy that answers ids it was never sent, or another connection's ids, finds
//! nothing. Each attempt has a deadline (`--request-timeout-ms`, or `--try-timeout-ms`); all
//! get the same timeout, so deadlines arrive sorted and one loop timer for the front serves
//! them all. Plain data: time comes in as an `Instant`, nothing here touches a socket.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// A hasher for maps keyed by numbers that are already well spread and not chosen by
/// clients (our own sequential ids, key hashes with a random seed), where SipHash would be a
/// fifth of the balancer's work per request (measured with callgrind). One multiplication.
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

/// What one connection owes: its attempt ids in sending order (answered ones are skipped
/// lazily) and how many are still live.
#[derive(Debug, Default)]
struct Owed {
    ids: VecDeque<u64>,
    live: usize,
}

#[derive(Debug)]
pub struct AttemptBook {
    timeout: Duration,
    next_id: u64,
    live: U64Map<Attempt>,
    /// (deadline, id) in sending order.
    deadlines: VecDeque<(Instant, u64)>,
    /// By connection index.
    owed: Vec<Owed>,
}

impl AttemptBook {
    pub fn new(timeout: Duration) -> Self {
        AttemptBook { timeout, next_id: 1, live: U64Map::default(), deadlines: VecDeque::new(), owed: Vec::new() }
    }

    /// Records an attempt sent now; returns its id (what goes on the wire).
    pub fn start(&mut self, now: Instant, attempt: Attempt) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.live.insert(id, attempt);
        self.deadlines.push_back((now + self.timeout, id));
        if self.owed.len() <= attempt.conn {
            self.owed.resize_with(attempt.conn + 1, Owed::default);
        }
        let owed = &mut self.owed[attempt.conn];
        owed.ids.push_back(id);
        owed.live += 1;
        id
    }

    /// An answer tagged `id` arrived on `conn`: the attempt, if one with that id was sent on
    /// that connection and is still waiting. `None`: unknown, late or foreign; drop it.
    pub fn answered(&mut self, conn: usize, id: u64) -> Option<Attempt> {
        match self.live.get(&id) {
            Some(attempt) if attempt.conn == conn => {}
            _ => return None,
        }
        self.take(id)
    }

    /// An untagged answer arrived on single-request connection `conn`: its oldest attempt.
    pub fn answered_in_order(&mut self, conn: usize) -> Option<Attempt> {
        let id = self.owed.get(conn)?.ids.iter().copied().find(|id| self.live.contains_key(id))?;
        self.take(id)
    }

    /// The attempts still waiting on `conn`, which has closed; they leave the book.
    pub fn conn_lost(&mut self, conn: usize) -> Vec<Attempt> {
        let Some(owed) = self.owed.get_mut(conn) else { return Vec::new() };
        let ids = std::mem::take(&mut owed.ids);
        owed.live = 0;
        ids.into_iter().filter_map(|id| self.live.remove(&id)).collect()
    }

    /// Attempts still waiting on `conn`.
    pub fn owed_by(&self, conn: usize) -> usize {
        self.owed.get(conn).map_or(0, |o| o.live)
    }

    /// The next attempt whose deadline has passed at `now`; it leaves the book.
    pub fn next_expired(&mut self, now: Instant) -> Option<Attempt> {
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if !self.live.contains_key(&id) {
                self.deadlines.pop_front();
                continue;
            }
            if deadline > now {
                return None;
            }
            return self.take(id);
        }
        None
    }

    /// When the front attempt's deadline is due, if any attempt waits.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.trim_deadlines();
        self.deadlines.front().map(|&(deadline, _)| deadline)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn take(&mut self, id: u64) -> Option<Attempt> {
        let attempt = self.live.remove(&id)?;
        if let Some(owed) = self.owed.get_mut(attempt.conn) {
            owed.live = owed.live.saturating_sub(1);
            // Answers come back roughly in sending order: drop the answered ids at the front,
            // so that the queue holds about what is in flight.
            while owed.ids.front().is_some_and(|front| !self.live.contains_key(front)) {
                owed.ids.pop_front();
            }
        }
        self.trim_deadlines();
        Some(attempt)
    }

    fn trim_deadlines(&mut self) {
        while self.deadlines.front().is_some_and(|(_, id)| !self.live.contains_key(id)) {
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

    #[test]
    fn an_answer_counts_only_on_the_connection_its_attempt_was_sent_on() {
        let t0 = Instant::now();
        let mut book = AttemptBook::new(Duration::from_secs(3));
        let a = book.start(t0, attempt(1, 10));
        let b = book.start(t0, attempt(2, 20));
        assert_eq!(book.answered(20, a), None, "a foreign connection's id");
        assert_eq!(book.answered(10, 999), None, "an id never sent");
        assert_eq!(book.answered(10, a), Some(attempt(1, 10)));
        assert_eq!(book.answered(10, a), None, "answered twice");
        assert_eq!((book.owed_by(10), book.owed_by(20)), (0, 1));
        assert_eq!(book.answered(20, b).map(|x| x.request), Some(2));
        assert!(book.is_empty());
    }

    #[test]
    fn deadlines_expire_in_order_and_skip_answered_attempts() {
        let t0 = Instant::now();
        let mut book = AttemptBook::new(Duration::from_millis(100));
        let a = book.start(t0, attempt(1, 0));
        let _b = book.start(t0 + Duration::from_millis(10), attempt(2, 0));
        let _c = book.start(t0 + Duration::from_millis(50), attempt(3, 1));
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
        let ids: Vec<u64> = (0..4).map(|r| book.start(t0, attempt(r, r % 2))).collect();
        book.answered(0, ids[0]);
        let lost: Vec<usize> = book.conn_lost(0).iter().map(|a| a.request).collect();
        assert_eq!(lost, vec![2]);
        assert_eq!(book.answered(0, ids[2]), None, "gone with its connection");
        assert_eq!(book.len(), 2);
        // A new connection reusing index 0 owes nothing of the old one's.
        assert_eq!(book.owed_by(0), 0);
        assert_eq!(book.answered_in_order(1).map(|a| a.request), Some(1));
        assert_eq!(book.answered_in_order(1).map(|a| a.request), Some(3));
        assert_eq!(book.answered_in_order(1), None);
    }
}
