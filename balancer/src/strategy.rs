//! Routing: which proxy a GET goes to (SPEC 3.5). Plain types and functions over a snapshot
//! of the proxies' state, so every rule is unit-tested without sockets.

/// Most proxies one balancer routes over (tried proxies are a bit set).
pub const MAX_PROXIES: usize = 128;

/// What routing needs to know about one proxy.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub healthy: bool,
    pub in_flight: usize,
    /// Stable identity for consistent hashing (a hash of the proxy's `host:port`).
    pub id_hash: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    RoundRobin,
    LeastLoaded,
    ConsistentHash { load_factor: f64 },
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::RoundRobin => "round_robin",
            Kind::LeastLoaded => "least_loaded",
            Kind::ConsistentHash { .. } => "consistent_hash",
        }
    }
}

/// A routing strategy with its little state (the round-robin position).
#[derive(Clone, Debug)]
pub struct Router {
    kind: Kind,
    next: usize,
}

impl Router {
    pub fn new(kind: Kind) -> Self {
        Router { kind, next: 0 }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Picks a proxy for `key` among `candidates` (at most [`MAX_PROXIES`]), skipping those
    /// whose bit is set in `tried` when any other is left. Only healthy proxies are
    /// considered, unless none is healthy: then all are (fail open). `None` only when there
    /// are no candidates at all.
    pub fn pick(&mut self, key: &str, candidates: &[Candidate], tried: u128) -> Option<usize> {
        let candidates = &candidates[..candidates.len().min(MAX_PROXIES)];
        let was_tried = |i: usize| tried >> i & 1 == 1;
        let any_healthy_untried = (0..candidates.len()).any(|i| candidates[i].healthy && !was_tried(i));
        let any_untried = (0..candidates.len()).any(|i| !was_tried(i));
        let eligible = |i: usize| -> bool {
            let c = &candidates[i];
            let health_ok = c.healthy || !any_healthy_untried;
            let fresh = !was_tried(i) || !any_untried;
            health_ok && fresh
        };
        match self.kind {
            Kind::RoundRobin => self.round_robin(candidates.len(), eligible),
            Kind::LeastLoaded => self.least_loaded(candidates, eligible),
            Kind::ConsistentHash { load_factor } => consistent_hash(key, candidates, eligible, load_factor),
        }
    }

    fn round_robin(&mut self, n: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let found = (0..n).map(|k| (self.next + k) % n).find(|&i| eligible(i))?;
        self.next = (found + 1) % n;
        Some(found)
    }

    /// Fewest in flight; among equals, the first at or after the rotating position, so ties
    /// are taken in turn.
    fn least_loaded(&mut self, candidates: &[Candidate], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = candidates.len();
        let found =
            (0..n).map(|k| (self.next + k) % n).filter(|&i| eligible(i)).min_by_key(|&i| candidates[i].in_flight)?;
        self.next = (found + 1) % n;
        Some(found)
    }
}

/// Rendezvous (highest random weight) hashing with bounded load: each proxy gets a score for
/// the key, the highest score owns it. When a proxy leaves, only the keys it owned move (each
/// to its second choice); nothing else changes. A proxy may take the request only while its
/// in-flight count is below ceil(load_factor × (total in flight + 1) / eligible proxies);
/// otherwise the key's next choice is tried.
fn consistent_hash(
    key: &str,
    candidates: &[Candidate],
    eligible: impl Fn(usize) -> bool,
    load_factor: f64,
) -> Option<usize> {
    let key_hash = fnv1a(key.as_bytes());
    let score = |i: usize| mix(key_hash ^ candidates[i].id_hash);
    let (count, total) = (0..candidates.len())
        .filter(|&i| eligible(i))
        .fold((0usize, 0usize), |(n, sum), i| (n + 1, sum + candidates[i].in_flight));
    if count == 0 {
        return None;
    }
    let bound = (load_factor * (total + 1) as f64 / count as f64).ceil() as usize;
    // The first proxy in score order that is under the bound is the best-scoring one among
    // those under it. With a factor >= 1 one always is; a smaller factor falls back to the
    // owner rather than refusing.
    let best = |under_bound: bool| {
        (0..candidates.len())
            .filter(|&i| eligible(i) && (!under_bound || candidates[i].in_flight < bound))
            .max_by_key(|&i| score(i))
    };
    best(true).or_else(|| best(false))
}

/// FNV-1a: deterministic across runs and builds, so routing survives a balancer restart.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64's finalizer: spreads the combined key/proxy hash so scores are independent.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(tried: &[usize]) -> u128 {
        tried.iter().fold(0, |m, i| m | 1 << i)
    }

    fn proxies(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                healthy: true,
                in_flight: 0,
                id_hash: fnv1a(format!("127.0.0.1:{}", 8001 + i).as_bytes()),
            })
            .collect()
    }

    #[test]
    fn round_robin_takes_healthy_proxies_in_turn() {
        let mut r = Router::new(Kind::RoundRobin);
        let mut c = proxies(3);
        let picks: Vec<_> = (0..6).map(|_| r.pick("k", &c, 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        c[1].healthy = false;
        let picks: Vec<_> = (0..4).map(|_| r.pick("k", &c, 0).unwrap()).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
    }

    #[test]
    fn none_healthy_fails_open_to_all() {
        let mut r = Router::new(Kind::RoundRobin);
        let mut c = proxies(2);
        c[0].healthy = false;
        c[1].healthy = false;
        let picks: Vec<_> = (0..4).map(|_| r.pick("k", &c, 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        assert_eq!(r.pick("k", &[], 0), None);
    }

    #[test]
    fn retries_avoid_proxies_already_tried_while_others_remain() {
        let mut r = Router::new(Kind::RoundRobin);
        let c = proxies(3);
        assert_eq!(r.pick("k", &c, mask(&[0])), Some(1));
        assert_eq!(r.pick("k", &c, mask(&[1, 2])), Some(0));
        // Everything tried: any proxy may be tried again.
        assert!(r.pick("k", &c, mask(&[0, 1, 2])).is_some());
        // Only an unhealthy proxy is left untried: it gets its chance before a retry on the
        // healthy one that already failed this request.
        let mut c2 = proxies(2);
        c2[1].healthy = false;
        assert_eq!(r.pick("k", &c2, mask(&[0])), Some(1));
    }

    #[test]
    fn least_loaded_prefers_fewest_in_flight_and_rotates_ties() {
        let mut r = Router::new(Kind::LeastLoaded);
        let mut c = proxies(3);
        c[0].in_flight = 5;
        c[1].in_flight = 2;
        c[2].in_flight = 9;
        assert_eq!(r.pick("k", &c, 0), Some(1));
        let mut c = proxies(3);
        let picks: Vec<_> = (0..6).map(|_| r.pick("k", &c, 0).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 2, "{picks:?}");
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 2, "{picks:?}");
        c[2].healthy = false;
        c[0].in_flight = 1;
        assert_eq!(r.pick("k", &c, 0), Some(1));
    }

    #[test]
    fn consistent_hash_is_stable_and_spreads_keys() {
        let mut r = Router::new(Kind::ConsistentHash { load_factor: 1.25 });
        let c = proxies(3);
        let mut counts = [0usize; 3];
        for k in 0..10_000 {
            let key = format!("synthetic/{k}");
            let first = r.pick(&key, &c, 0).unwrap();
            assert_eq!(r.pick(&key, &c, 0), Some(first), "same key, same proxy");
            counts[first] += 1;
        }
        assert!(counts.iter().all(|&n| (3000..3700).contains(&n)), "{counts:?}");
    }

    #[test]
    fn when_a_proxy_leaves_only_its_keys_move() {
        for n in [3usize, 5] {
            let mut r = Router::new(Kind::ConsistentHash { load_factor: 1.25 });
            let mut c = proxies(n);
            let before: Vec<usize> = (0..10_000).map(|k| r.pick(&format!("k{k}"), &c, 0).unwrap()).collect();
            c[1].healthy = false;
            let after: Vec<usize> = (0..10_000).map(|k| r.pick(&format!("k{k}"), &c, 0).unwrap()).collect();
            let moved: Vec<usize> = (0..10_000).filter(|&k| before[k] != after[k]).collect();
            assert!(moved.iter().all(|&k| before[k] == 1), "a key that proxy 1 did not own moved");
            assert_eq!(moved.len(), before.iter().filter(|&&p| p == 1).count(), "all of its keys moved");
            assert!(
                moved.len() as f64 <= 10_000.0 * (1.0 / n as f64 + 0.05),
                "{} moved of 10000 with n={n}",
                moved.len()
            );
            // And when it comes back, the same keys return to it.
            c[1].healthy = true;
            let back: Vec<usize> = (0..10_000).map(|k| r.pick(&format!("k{k}"), &c, 0).unwrap()).collect();
            assert_eq!(back, before);
        }
    }

    #[test]
    fn bounded_load_sends_a_key_to_its_next_choice_when_the_owner_is_full() {
        let mut r = Router::new(Kind::ConsistentHash { load_factor: 1.25 });
        let mut c = proxies(3);
        let owner = r.pick("hot", &c, 0).unwrap();
        // total in flight 12 → bound ceil(1.25 × 13 / 3) = 6: the owner at 6 is full.
        c[owner].in_flight = 6;
        c[(owner + 1) % 3].in_flight = 3;
        c[(owner + 2) % 3].in_flight = 3;
        let second = r.pick("hot", &c, 0).unwrap();
        assert_ne!(second, owner);
        // total 10 → bound ceil(1.25 × 11 / 3) = 5: the owner at 4 is under it.
        c[owner].in_flight = 4;
        assert_eq!(r.pick("hot", &c, 0), Some(owner), "under the bound the owner takes it");
    }
}
