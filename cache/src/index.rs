//! A hash index from key to slab slot: open addressing with linear probing, deleting by
//! backward shift (no tombstones).
//!
//! Why not `HashMap<Box<str>, u32>`: that would keep every key twice (once in the map, once
//! with the value) and add a pointer and an allocation per entry. Here a bucket is 8 bytes —
//! the slot number and the key's 32-bit hash — and the key lives only in the entry. Keeping
//! the hash in the bucket means probing past other keys reads only the bucket array; an
//! entry is touched only when its hash matches (with a large cache, each touch is a likely
//! cache miss). Hashing is SipHash with a per-process random key, so clients cannot choose
//! keys that collide.

use std::hash::{BuildHasher, RandomState};

const EMPTY: u64 = u64::MAX;

fn pack(hash: u32, slot: u32) -> u64 {
    (u64::from(hash) << 32) | u64::from(slot)
}

fn hash_of(bucket: u64) -> u32 {
    (bucket >> 32) as u32
}

fn slot_of(bucket: u64) -> u32 {
    bucket as u32
}
/// Grow when more than this fraction (in eighths) of the buckets is used.
const MAX_LOAD_EIGHTHS: usize = 6;

/// What the index needs to know about the entries it points at.
pub trait Keyed {
    fn key_of(&self, slot: u32) -> &[u8];
}

#[derive(Debug)]
pub struct KeyIndex {
    buckets: Vec<u64>,
    len: usize,
    hasher: RandomState,
}

impl KeyIndex {
    pub fn with_capacity(entries: usize) -> Self {
        let buckets = bucket_count_for(entries.max(8));
        KeyIndex { buckets: vec![EMPTY; buckets], len: 0, hasher: RandomState::new() }
    }

    pub fn hash(&self, key: &[u8]) -> u32 {
        let h = self.hasher.hash_one(key);
        (h ^ (h >> 32)) as u32
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// The slot holding `key`, if any.
    pub fn find(&self, key: &[u8], hash: u32, entries: &impl Keyed) -> Option<u32> {
        self.find_bucket(key, hash, entries).map(|b| slot_of(self.buckets[b]))
    }

    fn find_bucket(&self, key: &[u8], hash: u32, entries: &impl Keyed) -> Option<usize> {
        let mask = self.mask();
        let mut b = hash as usize & mask;
        loop {
            let bucket = self.buckets[b];
            if bucket == EMPTY {
                return None;
            }
            if hash_of(bucket) == hash && entries.key_of(slot_of(bucket)) == key {
                return Some(b);
            }
            b = (b + 1) & mask;
        }
    }

    /// Records that `slot` (whose key is not in the index yet) has hash `hash`.
    pub fn insert(&mut self, hash: u32, slot: u32) {
        if (self.len + 1) * 8 > self.buckets.len() * MAX_LOAD_EIGHTHS {
            self.grow();
        }
        self.place(pack(hash, slot));
        self.len += 1;
    }

    fn place(&mut self, bucket: u64) {
        let mask = self.mask();
        let mut b = hash_of(bucket) as usize & mask;
        while self.buckets[b] != EMPTY {
            b = (b + 1) & mask;
        }
        self.buckets[b] = bucket;
    }

    fn grow(&mut self) {
        let doubled = vec![EMPTY; self.buckets.len() * 2];
        let old = std::mem::replace(&mut self.buckets, doubled);
        for bucket in old.into_iter().filter(|b| *b != EMPTY) {
            self.place(bucket);
        }
    }

    /// Forgets `key`; returns its slot.
    pub fn remove(&mut self, key: &[u8], hash: u32, entries: &impl Keyed) -> Option<u32> {
        let mut hole = self.find_bucket(key, hash, entries)?;
        let removed = slot_of(self.buckets[hole]);
        self.buckets[hole] = EMPTY;
        self.len -= 1;
        // Backward shift: pull later members of the probe run into the hole when their home
        // bucket lies at or before it, so that lookups never stop early at a gap.
        let mask = self.mask();
        let mut b = (hole + 1) & mask;
        loop {
            let bucket = self.buckets[b];
            if bucket == EMPTY {
                break;
            }
            let home = hash_of(bucket) as usize & mask;
            // Distance from home to b versus from home to the hole, on the ring.
            if (b.wrapping_sub(home) & mask) >= (b.wrapping_sub(hole) & mask) {
                self.buckets[hole] = bucket;
                self.buckets[b] = EMPTY;
                hole = b;
            }
            b = (b + 1) & mask;
        }
        Some(removed)
    }
}

fn bucket_count_for(entries: usize) -> usize {
    (entries * 8 / MAX_LOAD_EIGHTHS + 1).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Entries with forced hashes so that collisions and wrap-around are exercised.
    struct Table {
        keys: Vec<Vec<u8>>,
        hashes: Vec<u32>,
    }

    impl Keyed for Table {
        fn key_of(&self, slot: u32) -> &[u8] {
            &self.keys[slot as usize]
        }
    }

    #[test]
    fn colliding_keys_survive_removal_in_any_order() {
        let mut table = Table { keys: Vec::new(), hashes: Vec::new() };
        let mut index = KeyIndex::with_capacity(8);
        let buckets = index.buckets.len() as u32;
        assert!(buckets >= 8);
        // Many keys share a few home buckets near the end of the array, so probe runs wrap.
        for i in 0..10u32 {
            table.keys.push(format!("k{i}").into_bytes());
            table.hashes.push(buckets - 1 - (i % 3));
            index.insert(table.hashes[i as usize], i);
        }
        let mut present: HashMap<u32, bool> = (0..10).map(|i| (i, true)).collect();
        for victim in [3u32, 0, 9, 4, 1, 7] {
            let key = table.keys[victim as usize].clone();
            assert_eq!(index.remove(&key, table.hashes[victim as usize], &table), Some(victim));
            present.insert(victim, false);
            for (slot, here) in &present {
                let key = &table.keys[*slot as usize];
                let found = index.find(key, table.hashes[*slot as usize], &table);
                assert_eq!(found, here.then_some(*slot), "slot {slot} after removing {victim}");
            }
        }
        assert_eq!(index.len(), 4);
    }

    #[test]
    fn grows_and_keeps_everything() {
        let mut table = Table { keys: Vec::new(), hashes: Vec::new() };
        let mut index = KeyIndex::with_capacity(8);
        for i in 0..10_000u32 {
            let key = format!("key/{i}").into_bytes();
            table.hashes.push(index.hash(&key));
            table.keys.push(key);
            index.insert(table.hashes[i as usize], i);
        }
        for i in 0..10_000u32 {
            assert_eq!(index.find(&table.keys[i as usize], table.hashes[i as usize], &table), Some(i));
        }
        assert_eq!(index.find(b"absent", index.hash(b"absent"), &table), None);
    }
}
