//! Request collapsing (SPEC 3.5, `--collapse on|off`): while a GET for a key is on its way to
//! a proxy, later GETs for the key wait for its answer instead of going upstream.
//!
//! Keyed by a hash with a random seed, so that joining allocates nothing; the caller checks
//! that the leader's key really is the same (two keys with one hash just do not collapse).

use std::hash::{BuildHasher, RandomState};

use crate::attempts::U64Map;

#[derive(Debug)]
pub struct Collapser {
    enabled: bool,
    hasher: RandomState,
    /// Key hash → the request in flight that others may join.
    leaders: U64Map<usize>,
}

impl Collapser {
    pub fn new(enabled: bool) -> Self {
        Collapser { enabled, hasher: RandomState::new(), leaders: U64Map::default() }
    }

    pub fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The request a GET with this key hash may join, if collapsing is on.
    pub fn leader(&self, key_hash: u64) -> Option<usize> {
        if !self.enabled {
            return None;
        }
        self.leaders.get(&key_hash).copied()
    }

    /// `request` goes upstream for its key; later GETs may join it.
    pub fn lead(&mut self, key_hash: u64, request: usize) {
        if self.enabled {
            self.leaders.entry(key_hash).or_insert(request);
        }
    }

    /// `request` is answered (or a PURGE detached it): nobody joins it any more.
    pub fn finished(&mut self, key_hash: u64, request: usize) {
        if self.leaders.get(&key_hash) == Some(&request) {
            self.leaders.remove(&key_hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_gets_join_the_leader_until_it_is_finished() {
        let mut c = Collapser::new(true);
        let k = c.hash("a");
        assert_eq!(c.leader(k), None);
        c.lead(k, 4);
        c.lead(k, 5);
        assert_eq!(c.leader(k), Some(4), "the first stays the leader");
        c.finished(k, 5);
        assert_eq!(c.leader(k), Some(4), "only the leader itself detaches");
        c.finished(k, 4);
        assert_eq!(c.leader(k), None);
        assert_ne!(c.hash("a"), c.hash("b"));
    }

    #[test]
    fn off_means_every_get_goes_upstream() {
        let mut c = Collapser::new(false);
        let k = c.hash("a");
        c.lead(k, 1);
        assert_eq!(c.leader(k), None);
    }
}
