//! The proxy's cache: one interface, two eviction policies (SPEC 3.2). Its own crate so that
//! `client bench --simulate-lru` can model it without depending on the proxy.
//!
//! Layout, chosen for memory per entry and O(1) operations:
//! - each entry is one slab slot holding its key bytes and the value's already-encoded JSON
//!   as [`SharedBytes`], so a hit is answered from those bytes: copied when small, shared
//!   by reference when big (so many answers of one big value cost it once, SPEC 3.8);
//! - a [`KeyIndex`] maps keys to slots (4-byte buckets, keys not duplicated);
//! - entries sit on intrusive doubly-linked lists ("lanes") threaded through the slots.
//!
//! LRU keeps every entry, cached NOT_FOUNDs included, on lane 0 in recency order (a hit moves
//! the entry to the tail; the head is evicted), so a client asking for unique missing keys
//! cannot push out entries used more recently (SPEC 3.8). An expired NOT_FOUND there goes
//! when it is looked up or reaches the head. TTL keeps each lane in insertion order. Every
//! entry of a TTL lane has the same time to live (`--ttl` for lane 0, `--negative-ttl` for
//! cached NOT_FOUNDs on lane 1), and the clock only moves forward, so insertion order *is*
//! expiry order: the entry that expires soonest is at a lane head, and the sweep walks lane
//! heads. No operation scans.
//!
//! Time is an input (`now: Instant`) everywhere, so tests drive the clock.

mod index;

use std::time::{Duration, Instant};

use common::framing::SharedBytes;
use slab::Slab;

use index::{KeyIndex, Keyed};

/// Which entries leave first when the cache is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Least recently used goes first; entries do not expire (cached NOT_FOUNDs still do).
    Lru,
    /// The entry that expires soonest goes first; entries expire `ttl` after being stored.
    Ttl,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::Ttl => "ttl",
        }
    }
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub policy: Policy,
    /// Most entries held.
    pub capacity: usize,
    /// Most key + value bytes held, if bounded.
    pub max_bytes: Option<u64>,
    /// Lifetime of an OK entry under the TTL policy.
    pub ttl: Duration,
    /// Lifetime of a cached NOT_FOUND (both policies); zero means NOT_FOUND is not cached.
    pub negative_ttl: Duration,
    /// How long past its expiry an entry is kept for stale-on-error answers.
    pub stale_grace: Duration,
}

/// Counters for METRICS. All maintained incrementally: reading them costs nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub purges: u64,
}

/// A cached answer as a hit sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cached<'a> {
    /// The encoded `data` of an OK answer; empty for a cached NOT_FOUND.
    pub value: &'a SharedBytes,
    pub negative: bool,
}

const NIL: u32 = u32::MAX;
const MAIN: usize = 0;
const NEGATIVE: usize = 1;

/// One cache slot. 56 bytes: the key, the value, the expiry in milliseconds, and list links.
#[derive(Debug)]
struct Entry {
    key: Box<[u8]>,
    value: SharedBytes,
    /// Milliseconds since the cache's epoch at which this entry stops being fresh;
    /// `u64::MAX` for never.
    expires_ms: u64,
    hash: u32,
    prev: u32,
    next: u32,
    lane: u8,
    negative: bool,
}

impl Entry {
    fn key(&self) -> &[u8] {
        &self.key
    }

    fn size(&self) -> u64 {
        u64::try_from(self.key.len().saturating_add(self.value.len())).unwrap_or(u64::MAX)
    }
}

/// Milliseconds of a duration, saturating (flags are bounded at start-up; this is the second
/// line of defence against a wrapping cast).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Clone, Copy, Debug)]
struct Lane {
    head: u32,
    tail: u32,
}

struct Entries(Slab<Entry>);

impl Keyed for Entries {
    fn key_of(&self, slot: u32) -> &[u8] {
        self.0[slot as usize].key()
    }
}

pub struct Cache {
    config: CacheConfig,
    entries: Entries,
    index: KeyIndex,
    lanes: [Lane; 2],
    epoch: Instant,
    stats: CacheStats,
    /// The value of every cached NOT_FOUND (shared, so they allocate nothing for it).
    empty: SharedBytes,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("config", &self.config).field("stats", &self.stats).finish()
    }
}

/// Keys longer than this cannot be stored (protocol keys are at most 256 bytes).
const MAX_KEY: usize = u16::MAX as usize;

impl Cache {
    /// `epoch` is any instant not after the first `now` the cache will see.
    pub fn new(config: CacheConfig, epoch: Instant) -> Self {
        let reserve = config.capacity.min(1 << 20);
        Cache {
            entries: Entries(Slab::with_capacity(reserve)),
            index: KeyIndex::with_capacity(reserve),
            lanes: [Lane { head: NIL, tail: NIL }; 2],
            epoch,
            stats: CacheStats::default(),
            empty: SharedBytes::from(&[][..]),
            config,
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.stats.entries
    }

    pub fn is_empty(&self) -> bool {
        self.stats.entries == 0
    }

    fn ms(&self, at: Instant) -> u64 {
        millis(at.saturating_duration_since(self.epoch))
    }

    fn grace_ms(&self) -> u64 {
        millis(self.config.stale_grace)
    }

    /// A fresh entry for `key`, if there is one. Under LRU a hit makes the entry the most
    /// recently used. An expired entry is never returned; if it is also past the stale
    /// grace it is removed now (counted as an expiration).
    pub fn get(&mut self, key: &str, now: Instant) -> Option<Cached<'_>> {
        let slot = self.find(key.as_bytes())?;
        let now_ms = self.ms(now);
        let entry = &self.entries.0[slot as usize];
        if now_ms >= entry.expires_ms {
            if now_ms >= entry.expires_ms.saturating_add(self.grace_ms()) {
                self.remove_slot(slot);
                self.stats.expirations += 1;
            }
            return None;
        }
        if self.config.policy == Policy::Lru {
            self.unlink(slot);
            self.push_tail(slot, MAIN);
        }
        let entry = &self.entries.0[slot as usize];
        Some(Cached { value: &entry.value, negative: entry.negative })
    }

    /// An expired entry for `key` that expired less than the stale grace ago: what
    /// stale-on-error may serve when a fetch fails (SPEC 3.4).
    pub fn get_stale(&self, key: &str, now: Instant) -> Option<Cached<'_>> {
        let slot = self.find(key.as_bytes())?;
        let entry = &self.entries.0[slot as usize];
        let now_ms = self.ms(now);
        let stale = now_ms >= entry.expires_ms && now_ms < entry.expires_ms.saturating_add(self.grace_ms());
        stale.then_some(Cached { value: &entry.value, negative: entry.negative })
    }

    /// Stores an OK answer's encoded data (`negative == false`) or a NOT_FOUND (`negative ==
    /// true`, `value` ignored), replacing any entry for the key. Returns false when the entry
    /// is not stored: a NOT_FOUND while negative caching is off, or an entry that could never
    /// fit within `max_bytes`.
    pub fn insert(&mut self, key: &str, value: &[u8], negative: bool, now: Instant) -> bool {
        let value = if negative { self.empty.clone() } else { SharedBytes::from(value) };
        self.insert_shared(key, value, negative, now)
    }

    /// [`Cache::insert`] of bytes already shared (the ones the waiters of a fetch are answered
    /// from), so they are held once.
    pub fn insert_shared(&mut self, key: &str, value: SharedBytes, negative: bool, now: Instant) -> bool {
        let value = if negative { self.empty.clone() } else { value };
        let size = u64::try_from(key.len().saturating_add(value.len())).unwrap_or(u64::MAX);
        let too_big = self.config.max_bytes.is_some_and(|max| size > max) || key.len() > MAX_KEY;
        if (negative && self.config.negative_ttl.is_zero()) || too_big || self.config.capacity == 0 {
            return false;
        }
        if let Some(slot) = self.find(key.as_bytes()) {
            self.remove_slot(slot);
        }
        while self.stats.entries >= self.config.capacity
            || self.config.max_bytes.is_some_and(|max| self.stats.bytes.saturating_add(size) > max)
        {
            let Some(victim) = self.eviction_candidate() else { break };
            self.remove_slot(victim);
            self.stats.evictions += 1;
        }
        let now_ms = self.ms(now);
        let lru = self.config.policy == Policy::Lru;
        let (lane, expires_ms) = if negative {
            // Under LRU a NOT_FOUND shares the recency lane (see the module comment).
            (if lru { MAIN } else { NEGATIVE }, now_ms.saturating_add(millis(self.config.negative_ttl)))
        } else if !lru {
            (MAIN, now_ms.saturating_add(millis(self.config.ttl)))
        } else {
            (MAIN, u64::MAX)
        };
        let hash = self.index.hash(key.as_bytes());
        let slot = self.entries.0.insert(Entry {
            key: key.as_bytes().into(),
            value,
            expires_ms,
            hash,
            prev: NIL,
            next: NIL,
            lane: lane as u8,
            negative,
        });
        let Ok(slot) = u32::try_from(slot) else {
            // More than 4 billion entries: not reachable with a usize capacity flag on a real
            // machine, but never index with a wrapped slot.
            self.entries.0.remove(slot);
            return false;
        };
        self.index.insert(hash, slot);
        self.push_tail(slot, lane);
        self.stats.entries += 1;
        self.stats.bytes = self.stats.bytes.saturating_add(size);
        true
    }

    /// Forgets `key` without counting a purge: the origin said it is gone (SPEC 3.8: a key
    /// answered NOT_FOUND is never later served stale from an older entry).
    pub fn forget(&mut self, key: &str) {
        if let Some(slot) = self.find(key.as_bytes()) {
            self.remove_slot(slot);
        }
    }

    /// PURGE: removes the key; true if it was held (counted in `purges`).
    pub fn purge(&mut self, key: &str) -> bool {
        match self.find(key.as_bytes()) {
            Some(slot) => {
                self.remove_slot(slot);
                self.stats.purges += 1;
                true
            }
            None => false,
        }
    }

    /// Removes up to `budget` entries that are past their expiry plus the stale grace,
    /// soonest first. Returns how many were removed; when that equals `budget` there may be
    /// more, and the caller should sweep again soon.
    pub fn sweep(&mut self, now: Instant, budget: usize) -> usize {
        let limit = self.ms(now);
        let grace = self.grace_ms();
        let lanes: &[usize] = if self.config.policy == Policy::Ttl { &[MAIN, NEGATIVE] } else { &[NEGATIVE] };
        let mut removed = 0;
        for &lane in lanes {
            while removed < budget {
                let head = self.lanes[lane].head;
                if head == NIL || self.entries.0[head as usize].expires_ms.saturating_add(grace) > limit {
                    break;
                }
                self.remove_slot(head);
                self.stats.expirations += 1;
                removed += 1;
            }
        }
        removed
    }

    /// The entry to evict next. TTL: the one expiring soonest (a lane head; on a tie, the
    /// main lane). LRU: the least recently used entry, cached NOT_FOUNDs included.
    fn eviction_candidate(&self) -> Option<u32> {
        let head = |lane: usize| Some(self.lanes[lane].head).filter(|h| *h != NIL);
        let expires = |slot: u32| self.entries.0[slot as usize].expires_ms;
        match (self.config.policy, head(MAIN), head(NEGATIVE)) {
            (_, None, negative) => negative,
            (_, main, None) => main,
            (Policy::Ttl, Some(main), Some(negative)) => {
                Some(if expires(negative) < expires(main) { negative } else { main })
            }
            (Policy::Lru, Some(main), Some(_)) => Some(main),
        }
    }

    fn find(&self, key: &[u8]) -> Option<u32> {
        self.index.find(key, self.index.hash(key), &self.entries)
    }

    fn remove_slot(&mut self, slot: u32) {
        self.unlink(slot);
        // Out of the index first, while the index can still read the entry's key.
        let entry = &self.entries.0[slot as usize];
        self.index.remove(entry.key(), entry.hash, &self.entries);
        let entry = self.entries.0.remove(slot as usize);
        self.stats.entries -= 1;
        self.stats.bytes = self.stats.bytes.saturating_sub(entry.size());
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next, lane) = {
            let e = &self.entries.0[slot as usize];
            (e.prev, e.next, e.lane as usize)
        };
        if prev == NIL {
            self.lanes[lane].head = next;
        } else {
            self.entries.0[prev as usize].next = next;
        }
        if next == NIL {
            self.lanes[lane].tail = prev;
        } else {
            self.entries.0[next as usize].prev = prev;
        }
        let e = &mut self.entries.0[slot as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    fn push_tail(&mut self, slot: u32, lane: usize) {
        let tail = self.lanes[lane].tail;
        {
            let e = &mut self.entries.0[slot as usize];
            e.prev = tail;
            e.next = NIL;
            e.lane = lane as u8;
        }
        if tail == NIL {
            self.lanes[lane].head = slot;
        } else {
            self.entries.0[tail as usize].next = slot;
        }
        self.lanes[lane].tail = slot;
    }
}

#[cfg(test)]
mod tests;
