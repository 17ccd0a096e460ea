//! Which origin fetches exist, who waits on each, and which may run now (SPEC 3.3).
//!
//! A plain data structure, no sockets: concurrent misses on one key join one fetch
//! (coalescing); at most `max_in_flight` fetches run at once and the rest wait in FIFO order;
//! at most `max_pending` requests wait on the origin in all. Waiting means queued behind the
//! in-flight limit or coalesced onto another request's fetch; the request whose own fetch is
//! running is not waiting (SPEC 3.3: inflight 1 and pending 5 accept 6 distinct misses). The proxy's event loop asks it
//! what to do and tells it what happened.

use std::collections::{HashMap, VecDeque};

use common::timers::TimerKey;
use slab::Slab;

/// Identifies a fetch while it exists.
pub type FetchId = usize;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum FetchState {
    /// Waiting for an in-flight slot.
    Queued,
    /// Holding an in-flight slot.
    Running,
}

#[derive(Debug)]
pub struct Fetch<W> {
    pub key: Box<str>,
    pub waiters: Vec<W>,
    pub state: FetchState,
    /// A PURGE arrived while the fetch was under way: answer the waiters, cache nothing.
    pub purged: bool,
    /// The origin connection carrying it, while running.
    pub conn: Option<common::peer::PeerId>,
    /// Its `--origin-timeout-ms` timer.
    pub timer: Option<TimerKey>,
    /// Already retried once on a fresh connection.
    pub retried: bool,
}

/// What happened to a request that missed the cache.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Joined {
    /// A new fetch was created and may start now.
    Start(FetchId),
    /// A new fetch was created and waits for an in-flight slot.
    Queued(FetchId),
    /// Another request's fetch for the same key will answer this one too.
    Coalesced(FetchId),
}

#[derive(Debug)]
pub struct Fetches<W> {
    fetches: Slab<Fetch<W>>,
    by_key: HashMap<Box<str>, FetchId>,
    queue: VecDeque<FetchId>,
    running: usize,
    waiting: usize,
    max_in_flight: usize,
    max_pending: usize,
    /// Requests parked for their connection's forwarding window: they wait too (SPEC 3.3).
    parked: usize,
}

impl<W> Fetches<W> {
    pub fn new(max_in_flight: usize, max_pending: usize) -> Self {
        Fetches {
            fetches: Slab::new(),
            by_key: HashMap::new(),
            queue: VecDeque::new(),
            running: 0,
            waiting: 0,
            max_in_flight: max_in_flight.max(1),
            max_pending,
            parked: 0,
        }
    }

    /// Requests waiting on the origin now: queued, or coalesced onto a running fetch (the
    /// first request of a running fetch is not waiting).
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn get(&self, id: FetchId) -> Option<&Fetch<W>> {
        self.fetches.get(id)
    }

    pub fn get_mut(&mut self, id: FetchId) -> Option<&mut Fetch<W>> {
        self.fetches.get_mut(id)
    }

    /// How many requests are parked outside (they count against `max_pending`).
    pub fn set_parked(&mut self, parked: usize) {
        self.parked = parked;
    }

    /// Whether one more request may wait (`max_pending` counts the parked ones too).
    pub fn may_wait(&self) -> bool {
        self.waiting.saturating_add(self.parked) < self.max_pending
    }

    /// Adds a request that missed on `key`; hands the waiter back when `max_pending`
    /// requests already wait on the origin.
    pub fn join(&mut self, key: &str, waiter: W) -> Result<Joined, W> {
        let start = self.running < self.max_in_flight;
        let coalesces = self.by_key.contains_key(key);
        if (coalesces || !start) && !self.may_wait() {
            return Err(waiter);
        }
        if let Some(&id) = self.by_key.get(key) {
            self.waiting += 1;
            self.fetches[id].waiters.push(waiter);
            return Ok(Joined::Coalesced(id));
        }
        if !start {
            self.waiting += 1;
        }
        let state = if start { FetchState::Running } else { FetchState::Queued };
        let fetch = Fetch {
            key: key.into(),
            waiters: vec![waiter],
            state,
            purged: false,
            conn: None,
            timer: None,
            retried: false,
        };
        let id = self.fetches.insert(fetch);
        self.by_key.insert(key.into(), id);
        Ok(if start {
            self.running += 1;
            Joined::Start(id)
        } else {
            self.queue.push_back(id);
            Joined::Queued(id)
        })
    }

    /// Ends a fetch (answered, failed or timed out) and hands back its waiters. A later miss
    /// on the same key starts a new fetch.
    pub fn finish(&mut self, id: FetchId) -> Option<Fetch<W>> {
        let fetch = self.fetches.try_remove(id)?;
        if self.by_key.get(&fetch.key) == Some(&id) {
            self.by_key.remove(&fetch.key);
        }
        let owner_running = usize::from(fetch.state == FetchState::Running && !fetch.waiters.is_empty());
        self.waiting -= fetch.waiters.len() - owner_running;
        match fetch.state {
            FetchState::Running => self.running -= 1,
            FetchState::Queued => self.queue.retain(|queued| *queued != id),
        }
        Some(fetch)
    }

    /// The next queued fetch, if an in-flight slot is free; it is now running.
    pub fn start_next(&mut self) -> Option<FetchId> {
        if self.running >= self.max_in_flight {
            return None;
        }
        let id = self.queue.pop_front()?;
        self.fetches[id].state = FetchState::Running;
        self.running += 1;
        // Its first request is no longer waiting: its own fetch is in flight.
        if !self.fetches[id].waiters.is_empty() {
            self.waiting -= 1;
        }
        Some(id)
    }

    /// A PURGE of `key`: a fetch under way for it still answers its waiters but caches
    /// nothing, and later misses no longer join it (it may carry pre-purge data); they start
    /// a new fetch.
    pub fn purge(&mut self, key: &str) {
        if let Some(id) = self.by_key.remove(key) {
            self.fetches[id].purged = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_on_one_key_share_one_fetch() {
        let mut f = Fetches::new(4, 100);
        assert_eq!(f.join("a", 1), Ok(Joined::Start(0)));
        for w in 2..=100 {
            assert_eq!(f.join("a", w), Ok(Joined::Coalesced(0)));
        }
        assert_eq!(f.waiting(), 99, "the first request's own fetch is in flight: it does not wait");
        let fetch = f.finish(0).unwrap();
        assert_eq!(fetch.waiters, (1..=100).collect::<Vec<_>>());
        assert_eq!((f.waiting(), f.running()), (0, 0));
        // Once finished, the next miss fetches again.
        assert!(matches!(f.join("a", 101), Ok(Joined::Start(_))));
    }

    #[test]
    fn at_most_max_in_flight_run_and_the_rest_queue_in_order() {
        let mut f = Fetches::new(2, 100);
        let a = f.join("a", ()).unwrap();
        let b = f.join("b", ()).unwrap();
        let c = f.join("c", ()).unwrap();
        let d = f.join("d", ()).unwrap();
        assert!(matches!((a, b), (Joined::Start(_), Joined::Start(_))));
        let (Joined::Queued(c), Joined::Queued(d)) = (c, d) else { panic!("{c:?} {d:?}") };
        assert_eq!(f.start_next(), None, "no free slot yet");
        let Joined::Start(a) = a else { unreachable!() };
        f.finish(a);
        assert_eq!(f.start_next(), Some(c));
        assert_eq!(f.start_next(), None);
        assert_eq!(f.get(d).map(|x| x.state), Some(FetchState::Queued));
        // A queued fetch can end (timeout) without ever running.
        f.finish(d);
        assert_eq!(f.queued(), 0);
        assert_eq!(f.running(), 2);
    }

    #[test]
    fn max_pending_bounds_every_waiting_request() {
        let mut f = Fetches::new(1, 2);
        let Ok(Joined::Start(a)) = f.join("a", 1) else { panic!() };
        assert_eq!(f.waiting(), 0);
        assert_eq!(f.join("a", 2), Ok(Joined::Coalesced(a)));
        assert!(matches!(f.join("b", 3), Ok(Joined::Queued(_))));
        assert_eq!(f.join("a", 4), Err(4), "coalescing counts against the bound too");
        assert_eq!(f.join("c", 5), Err(5));
        f.finish(a);
        assert_eq!(f.waiting(), 1);
        // b's fetch runs now: b no longer waits.
        assert!(f.start_next().is_some());
        assert_eq!(f.waiting(), 0);
        assert!(f.join("c", 6).is_ok());
    }

    #[test]
    fn inflight_one_and_pending_five_accept_six_distinct_misses() {
        let mut f = Fetches::new(1, 5);
        let accepted = (0..12).filter(|i| f.join(&format!("k{i}"), *i).is_ok()).count();
        assert_eq!(accepted, 6);
        assert_eq!(f.waiting(), 5);
    }

    #[test]
    fn purge_marks_the_fetch_in_flight() {
        let mut f = Fetches::new(2, 10);
        let Ok(Joined::Start(id)) = f.join("a", ()) else { panic!() };
        f.purge("a");
        f.purge("other");
        // A miss after the purge does not join the old fetch.
        let Ok(Joined::Start(second)) = f.join("a", ()) else { panic!() };
        assert_ne!(second, id);
        assert!(f.finish(id).unwrap().purged);
        assert!(!f.finish(second).unwrap().purged);
        assert_eq!(f.waiting(), 0);
    }
}
