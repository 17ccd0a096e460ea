//! One client GET through the balancer: who waits for it (the client and any collapsed
//! followers), which proxies it tried, and whether a failed attempt is retried or given up —
//! a decision returned as a value.

use std::time::Instant;

use common::protocol::KeyBuf;

use crate::failure::Failure;

/// A client waiting for an answer, with its id as raw JSON (empty when it had none: a JSON
/// id is never empty).
/// `T` is the promise to keep (a `common::server::Ticket` in the service).
#[derive(Debug)]
pub struct Waiter<T> {
    pub ticket: T,
    pub client_id: String,
    pub received: Instant,
}

impl<T> Waiter<T> {
    pub fn client_id(&self) -> Option<&str> {
        Some(self.client_id.as_str()).filter(|id| !id.is_empty())
    }
}

#[derive(Debug)]
pub struct Request<T> {
    pub leader: Waiter<T>,
    pub key: KeyBuf,
    pub key_hash: u64,
    /// GETs for the same key that joined this one: they get its answer.
    pub followers: Vec<Waiter<T>>,
    /// Proxies tried so far (bit i = proxy i).
    pub tried: u128,
    pub attempts: u32,
    pub last_failure: Option<Failure>,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Send it to another proxy.
    Retry,
    /// Answer PROXY_UNREACHABLE.
    GiveUp,
}

impl<T> Request<T> {
    pub fn new(leader: Waiter<T>, key: KeyBuf, key_hash: u64) -> Self {
        Request { leader, key, key_hash, followers: Vec::new(), tried: 0, attempts: 0, last_failure: None }
    }

    /// An attempt goes to `backend`; true when it is a retry.
    pub fn begin_attempt(&mut self, backend: usize) -> bool {
        self.attempts = self.attempts.saturating_add(1);
        if let Some(bit) = 1u128.checked_shl(u32::try_from(backend).unwrap_or(u32::MAX)) {
            self.tried |= bit;
        }
        self.attempts > 1
    }

    /// The attempt in flight failed: retry while `retries` allow it.
    pub fn after_failure(&mut self, failure: Failure, retries: u32) -> Next {
        self.last_failure = Some(failure);
        if self.attempts > retries {
            Next::GiveUp
        } else {
            Next::Retry
        }
    }

    /// Whether another attempt may start at all (before a proxy is picked).
    pub fn may_attempt(&self, retries: u32) -> bool {
        self.attempts <= retries
    }

    /// The PROXY_UNREACHABLE message.
    pub fn give_up_message(&self) -> String {
        let last = self.last_failure.map_or("no proxy to try", Failure::describe);
        format!("no proxy answered ({} attempts; last: {last})", self.attempts)
    }

    pub fn waiters(&self) -> impl Iterator<Item = &Waiter<T>> {
        std::iter::once(&self.leader).chain(&self.followers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request<()> {
        let key = common::protocol::Key::parse("k".into()).unwrap();
        Request::new(
            Waiter { ticket: (), client_id: String::new(), received: Instant::now() },
            KeyBuf::copy_of(&key, String::new()),
            1,
        )
    }

    #[test]
    fn retries_until_the_budget_is_spent() {
        let mut r = request();
        assert!(!r.begin_attempt(0));
        assert_eq!(r.after_failure(Failure::TimedOut, 2), Next::Retry);
        assert!(r.begin_attempt(2));
        assert_eq!(r.after_failure(Failure::Reset, 2), Next::Retry);
        assert!(r.begin_attempt(1));
        assert_eq!(r.after_failure(Failure::Garbage, 2), Next::GiveUp);
        assert_eq!(r.tried, 0b111);
        assert!(!r.may_attempt(2));
        assert_eq!(r.give_up_message(), "no proxy answered (3 attempts; last: proxy answered garbage)");
    }

    #[test]
    fn with_no_retries_the_first_failure_gives_up() {
        let mut r = request();
        r.begin_attempt(127);
        assert_eq!(r.tried, 1 << 127);
        assert_eq!(r.after_failure(Failure::Closed, 0), Next::GiveUp);
    }
}
