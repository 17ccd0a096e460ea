use super::*;
use proptest::prelude::*;

fn config(policy: Policy, capacity: usize) -> CacheConfig {
    CacheConfig {
        policy,
        capacity,
        max_bytes: None,
        ttl: Duration::from_secs(1),
        negative_ttl: Duration::ZERO,
        stale_grace: Duration::ZERO,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn value(cache: &mut Cache, key: &str, now: Instant) -> Option<Vec<u8>> {
    cache.get(key, now).map(|c| c.value.to_vec())
}

#[test]
fn entries_are_fifty_six_bytes() {
    /// Same layout as one slot of `Slab<Entry>`: a vacant link or the entry.
    #[allow(dead_code)]
    enum SlabSlot {
        Vacant(usize),
        Occupied(Entry),
    }
    assert_eq!(std::mem::size_of::<Entry>(), 56);
    assert!(std::mem::size_of::<SlabSlot>() <= 64);
}

#[test]
fn lru_evicts_the_least_recently_used() {
    let t0 = Instant::now();
    let mut cache = Cache::new(config(Policy::Lru, 2), t0);
    cache.insert("a", b"1", false, t0);
    cache.insert("b", b"2", false, t0);
    assert_eq!(value(&mut cache, "a", t0), Some(b"1".to_vec()));
    cache.insert("c", b"3", false, t0);
    assert_eq!(value(&mut cache, "b", t0), None, "b was least recently used");
    assert_eq!(value(&mut cache, "a", t0), Some(b"1".to_vec()));
    assert_eq!(value(&mut cache, "c", t0), Some(b"3".to_vec()));
    assert_eq!(cache.stats().evictions, 1);
    // LRU entries never expire.
    assert_eq!(value(&mut cache, "a", t0 + Duration::from_secs(86_400)), Some(b"1".to_vec()));
}

#[test]
fn ttl_entries_expire_and_are_never_served_after() {
    let t0 = Instant::now();
    let mut cache = Cache::new(config(Policy::Ttl, 10), t0);
    cache.insert("a", b"1", false, t0);
    assert_eq!(value(&mut cache, "a", t0 + ms(999)), Some(b"1".to_vec()));
    assert_eq!(value(&mut cache, "a", t0 + ms(1000)), None);
    assert_eq!(cache.stats().expirations, 1);
    assert_eq!(cache.len(), 0);
}

#[test]
fn ttl_evicts_the_entry_that_expires_soonest() {
    let t0 = Instant::now();
    let mut cache = Cache::new(config(Policy::Ttl, 2), t0);
    cache.insert("a", b"1", false, t0);
    cache.insert("b", b"2", false, t0 + ms(10));
    // Reading `a` does not save it under TTL.
    assert!(cache.get("a", t0 + ms(20)).is_some());
    cache.insert("c", b"3", false, t0 + ms(20));
    assert_eq!(value(&mut cache, "a", t0 + ms(20)), None);
    assert!(cache.get("b", t0 + ms(20)).is_some());
    // Re-storing a key gives it a new lifetime and moves it to the back.
    cache.insert("b", b"2b", false, t0 + ms(30));
    cache.insert("d", b"4", false, t0 + ms(40));
    assert_eq!(value(&mut cache, "c", t0 + ms(40)), None);
    assert_eq!(value(&mut cache, "b", t0 + ms(40)), Some(b"2b".to_vec()));
}

#[test]
fn the_byte_bound_counts_keys_and_values() {
    let t0 = Instant::now();
    let mut cfg = config(Policy::Lru, 100);
    cfg.max_bytes = Some(10);
    let mut cache = Cache::new(cfg, t0);
    assert!(cache.insert("a", b"12345", false, t0));
    assert!(cache.insert("b", b"123", false, t0));
    assert_eq!(cache.stats().bytes, 10);
    assert!(cache.insert("c", b"1", false, t0));
    assert_eq!(value(&mut cache, "a", t0), None);
    assert_eq!(cache.stats().bytes, 6);
    assert!(!cache.insert("big", b"123456789", false, t0), "can never fit");
    assert_eq!(cache.stats().bytes, 6);
}

#[test]
fn the_sweep_reclaims_expired_entries_in_bounded_slices() {
    let t0 = Instant::now();
    let mut cache = Cache::new(config(Policy::Ttl, 1000), t0);
    for i in 0..100 {
        cache.insert(&format!("k{i}"), b"v", false, t0 + ms(i));
    }
    assert_eq!(cache.sweep(t0 + ms(999), 1000), 0, "nothing has expired yet");
    assert_eq!(cache.sweep(t0 + ms(1049), 30), 30);
    assert_eq!(cache.sweep(t0 + ms(1049), 30), 20, "only the first 50 have expired");
    assert_eq!(cache.sweep(t0 + ms(5000), 1000), 50);
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.bytes, stats.expirations), (0, 0, 100));
}

#[test]
fn stale_entries_are_kept_for_the_grace_and_only_served_as_stale() {
    let t0 = Instant::now();
    let mut cfg = config(Policy::Ttl, 10);
    cfg.stale_grace = Duration::from_secs(5);
    let mut cache = Cache::new(cfg, t0);
    cache.insert("a", b"1", false, t0);
    assert!(cache.get_stale("a", t0 + ms(500)).is_none(), "fresh is not stale");
    assert!(cache.get("a", t0 + ms(2000)).is_none());
    assert_eq!(cache.get_stale("a", t0 + ms(2000)).map(|c| c.value.to_vec()), Some(b"1".to_vec()));
    assert_eq!(cache.sweep(t0 + ms(5999), 10), 0, "kept through the grace");
    assert!(cache.get_stale("a", t0 + ms(6000)).is_none());
    assert_eq!(cache.sweep(t0 + ms(6000), 10), 1);
}

#[test]
fn negative_entries_are_cached_only_with_a_negative_ttl() {
    let t0 = Instant::now();
    let mut cache = Cache::new(config(Policy::Lru, 10), t0);
    assert!(!cache.insert("gone", b"", true, t0));
    let mut cfg = config(Policy::Lru, 10);
    cfg.negative_ttl = ms(500);
    let mut cache = Cache::new(cfg, t0);
    assert!(cache.insert("gone", b"ignored", true, t0));
    assert_eq!(cache.get("gone", t0 + ms(499)).map(|c| (c.value.to_vec(), c.negative)), Some((Vec::new(), true)));
    assert_eq!(cache.get("gone", t0 + ms(500)), None);
    assert_eq!(cache.stats().expirations, 1);
    // Under LRU a NOT_FOUND sits in recency order, not expiry order: the sweep leaves it, a
    // lookup after its expiry removes it.
    cache.insert("gone2", b"", true, t0 + ms(600));
    assert_eq!(cache.sweep(t0 + ms(1100), 10), 0);
    assert_eq!(cache.get("gone2", t0 + ms(1100)), None);
    assert!(cache.is_empty());
}

#[test]
fn lru_not_found_entries_never_push_out_more_recent_ones() {
    let t0 = Instant::now();
    let mut cfg = config(Policy::Lru, 3);
    cfg.negative_ttl = Duration::from_secs(60);
    let mut cache = Cache::new(cfg, t0);
    assert!(cache.insert("miss1", b"", true, t0));
    assert!(cache.insert("miss2", b"", true, t0));
    cache.insert("a", b"1", false, t0);
    // A fourth entry evicts the least recently used: miss1, not a.
    cache.insert("b", b"2", false, t0);
    assert!(value(&mut cache, "a", t0).is_some());
    assert!(value(&mut cache, "b", t0).is_some());
    // Alternating a and b now always hits.
    for i in 0..10 {
        let key = if i % 2 == 0 { "a" } else { "b" };
        assert!(value(&mut cache, key, t0).is_some(), "{key} was pushed out");
    }
    assert_eq!(cache.get("miss1", t0), None);
}

#[test]
fn purge_removes_and_counts() {
    let t0 = Instant::now();
    let mut cache = Cache::new(config(Policy::Lru, 10), t0);
    cache.insert("a", b"1", false, t0);
    assert!(cache.purge("a"));
    assert!(!cache.purge("a"));
    assert_eq!(cache.stats().purges, 1);
    assert!(cache.get("a", t0).is_none());
}

// ---- Model-based property test -------------------------------------------------------

/// The reference: a plain list, every decision made by scanning and sorting.
struct Model {
    cfg: CacheConfig,
    items: Vec<ModelItem>,
    seq: u64,
    stats: CacheStats,
}

#[derive(Clone)]
struct ModelItem {
    key: String,
    value: Vec<u8>,
    negative: bool,
    expires: u64,
    inserted: u64,
    used: u64,
}

impl Model {
    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn pos(&self, key: &str) -> Option<usize> {
        self.items.iter().position(|i| i.key == key)
    }

    fn remove(&mut self, pos: usize) {
        let item = self.items.remove(pos);
        self.stats.entries -= 1;
        self.stats.bytes -= (item.key.len() + item.value.len()) as u64;
    }

    fn grace(&self) -> u64 {
        self.cfg.stale_grace.as_millis() as u64
    }

    fn get(&mut self, key: &str, now: u64) -> Option<(Vec<u8>, bool)> {
        let pos = self.pos(key)?;
        let item = self.items[pos].clone();
        if now >= item.expires {
            if now >= item.expires.saturating_add(self.grace()) {
                self.remove(pos);
                self.stats.expirations += 1;
            }
            return None;
        }
        if self.cfg.policy == Policy::Lru {
            let t = self.tick();
            self.items[pos].used = t;
        }
        Some((item.value, item.negative))
    }

    fn get_stale(&self, key: &str, now: u64) -> Option<(Vec<u8>, bool)> {
        let item = &self.items[self.pos(key)?];
        (now >= item.expires && now < item.expires.saturating_add(self.grace()))
            .then(|| (item.value.clone(), item.negative))
    }

    fn victim(&self, now: u64) -> Option<usize> {
        let by = |f: &dyn Fn(&ModelItem) -> (u64, u64, u64)| {
            self.items.iter().enumerate().min_by_key(|(_, i)| f(i)).map(|(p, _)| p)
        };
        match self.cfg.policy {
            Policy::Ttl => by(&|i| (i.expires, i.negative as u64, i.inserted)),
            // Cached NOT_FOUNDs take part in LRU order like any entry (SPEC 3.8).
            Policy::Lru => {
                let _ = now;
                by(&|i| (i.used, 0, 0))
            }
        }
    }

    fn insert(&mut self, key: &str, value: &[u8], negative: bool, now: u64) -> bool {
        let value = if negative { Vec::new() } else { value.to_vec() };
        let size = (key.len() + value.len()) as u64;
        if (negative && self.cfg.negative_ttl.is_zero())
            || self.cfg.max_bytes.is_some_and(|m| size > m)
            || self.cfg.capacity == 0
        {
            return false;
        }
        if let Some(pos) = self.pos(key) {
            self.remove(pos);
        }
        while self.stats.entries >= self.cfg.capacity || self.cfg.max_bytes.is_some_and(|m| self.stats.bytes + size > m)
        {
            let Some(pos) = self.victim(now) else { break };
            self.remove(pos);
            self.stats.evictions += 1;
        }
        let expires = if negative {
            now + self.cfg.negative_ttl.as_millis() as u64
        } else if self.cfg.policy == Policy::Ttl {
            now + self.cfg.ttl.as_millis() as u64
        } else {
            u64::MAX
        };
        let t = self.tick();
        self.items.push(ModelItem { key: key.into(), value, negative, expires, inserted: t, used: t });
        self.stats.entries += 1;
        self.stats.bytes += size;
        true
    }

    fn purge(&mut self, key: &str) -> bool {
        let Some(pos) = self.pos(key) else { return false };
        self.remove(pos);
        self.stats.purges += 1;
        true
    }

    fn sweep(&mut self, now: u64, budget: usize) -> usize {
        // Under LRU every entry is in recency order, not expiry order: expired ones go when
        // looked up or evicted, not by the sweep.
        let lanes: &[bool] = if self.cfg.policy == Policy::Ttl { &[false, true] } else { &[] };
        let mut removed = 0;
        for &negative in lanes {
            loop {
                if removed == budget {
                    return removed;
                }
                let oldest = self
                    .items
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| i.negative == negative)
                    .min_by_key(|(_, i)| i.inserted);
                match oldest {
                    Some((pos, item)) if item.expires.saturating_add(self.grace()) <= now => {
                        self.remove(pos);
                        self.stats.expirations += 1;
                        removed += 1;
                    }
                    _ => break,
                }
            }
        }
        removed
    }
}

#[derive(Clone, Debug)]
enum Op {
    Get(u8),
    GetStale(u8),
    Insert(u8, Vec<u8>, bool),
    Purge(u8),
    Advance(u64),
    Sweep(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8).prop_map(Op::Get),
        1 => (0u8..8).prop_map(Op::GetStale),
        4 => (0u8..8, proptest::collection::vec(any::<u8>(), 0..12), proptest::bool::weighted(0.2))
            .prop_map(|(k, v, n)| Op::Insert(k, v, n)),
        1 => (0u8..8).prop_map(Op::Purge),
        2 => (0u64..1500).prop_map(Op::Advance),
        1 => (0usize..4).prop_map(Op::Sweep),
    ]
}

fn cache_config() -> impl Strategy<Value = CacheConfig> {
    (
        prop_oneof![Just(Policy::Lru), Just(Policy::Ttl)],
        0usize..6,
        proptest::option::of(8u64..40),
        1u64..3000,
        prop_oneof![Just(0u64), 1u64..2000],
        prop_oneof![Just(0u64), 1u64..2000],
    )
        .prop_map(|(policy, capacity, max_bytes, ttl, negative_ttl, grace)| CacheConfig {
            policy,
            capacity,
            max_bytes,
            ttl: ms(ttl),
            negative_ttl: ms(negative_ttl),
            stale_grace: ms(grace),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_cache_behaves_like_the_reference(cfg in cache_config(), ops in proptest::collection::vec(op(), 1..120)) {
        let t0 = Instant::now();
        let mut cache = Cache::new(cfg.clone(), t0);
        let mut model = Model { cfg, items: Vec::new(), seq: 0, stats: CacheStats::default() };
        let mut now = 0u64;
        for op in ops {
            let at = t0 + ms(now);
            match op {
                Op::Get(k) => {
                    let key = format!("key{k}");
                    let got = cache.get(&key, at).map(|c| (c.value.to_vec(), c.negative));
                    prop_assert_eq!(got, model.get(&key, now), "get {}", key);
                }
                Op::GetStale(k) => {
                    let key = format!("key{k}");
                    let got = cache.get_stale(&key, at).map(|c| (c.value.to_vec(), c.negative));
                    prop_assert_eq!(got, model.get_stale(&key, now), "get_stale {}", key);
                }
                Op::Insert(k, v, negative) => {
                    let key = format!("key{k}");
                    prop_assert_eq!(cache.insert(&key, &v, negative, at), model.insert(&key, &v, negative, now));
                }
                Op::Purge(k) => {
                    let key = format!("key{k}");
                    prop_assert_eq!(cache.purge(&key), model.purge(&key));
                }
                Op::Advance(d) => now += d,
                Op::Sweep(budget) => prop_assert_eq!(cache.sweep(at, budget), model.sweep(now, budget)),
            }
            prop_assert_eq!(cache.stats(), model.stats);
        }
    }
}
