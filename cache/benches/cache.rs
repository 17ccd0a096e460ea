//! Cache micro-benchmarks at 1,000,000 entries, for both policies, on one core:
//! hit lookups per second, inserts with eviction per second, and heap bytes per entry
//! beyond the key and value bytes themselves.
//!
//! Run: `cargo bench -p cache --bench cache` (pin it with `taskset -c 1` for stable figures).
//! A counting global allocator measures heap use exactly (requested bytes), and the process
//! RSS is shown beside it (which also includes the allocator's own per-block overhead).
#![allow(unsafe_code)] // the counting allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cache::{Cache, CacheConfig, Policy};
use common::random::{SplitMix64, Zipf};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers every call to the system allocator and only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn entries() -> usize {
    std::env::var("CACHE_BENCH_ENTRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}
const VALUE_BYTES: usize = 200;
const LOOKUPS: usize = 10_000_000;
const INSERTS: usize = 3_000_000;

fn rss_kib() -> u64 {
    testkit::rss_kib(std::process::id()).unwrap_or(0)
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    println!("cache benchmark: {} entries, {VALUE_BYTES}-byte values, keys like synthetic/123456", entries());
    let keys: Vec<String> = (0..entries() + INSERTS).map(|i| format!("synthetic/{i}")).collect();
    let value = vec![b'x'; VALUE_BYTES];
    let mut rng = SplitMix64::new(42);
    let uniform: Vec<u32> = (0..LOOKUPS).map(|_| rng.below(entries()) as u32).collect();
    let zipf = Zipf::new(entries(), 0.99);
    let skewed: Vec<u32> = (0..LOOKUPS).map(|_| zipf.sample(&mut rng) as u32).collect();
    for policy in [Policy::Lru, Policy::Ttl] {
        if filter.as_deref().is_some_and(|f| f != policy.name()) {
            continue;
        }
        run(policy, &keys, &value, &uniform, &skewed);
    }
}

/// Looks up every index of `order`, keys formatted on the stack as a proxy finds them in a
/// just-read request line (so the benchmark does not pay a cache miss to fetch each key).
/// Returns lookups per second.
fn lookups(cache: &mut Cache, order: &[u32], value_len: usize, now: Instant) -> f64 {
    let start = Instant::now();
    let mut found = 0usize;
    let mut buf = *b"synthetic/\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    for &i in order {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(i).as_bytes();
        buf[10..10 + digits.len()].copy_from_slice(digits);
        let key = std::str::from_utf8(&buf[..10 + digits.len()]).unwrap_or_default();
        if let Some(hit) = cache.get(key, now) {
            found += hit.value.len();
        }
    }
    let elapsed = start.elapsed();
    black_box(found);
    assert_eq!(found, order.len() * value_len, "every lookup must hit");
    order.len() as f64 / elapsed.as_secs_f64()
}

fn run(policy: Policy, keys: &[String], value: &[u8], uniform: &[u32], skewed: &[u32]) {
    let config = CacheConfig {
        policy,
        capacity: entries(),
        max_bytes: None,
        ttl: Duration::from_secs(3600),
        negative_ttl: Duration::ZERO,
        stale_grace: Duration::ZERO,
    };
    let t0 = Instant::now();
    let heap_before = ALLOCATED.load(Ordering::Relaxed);
    let rss_before = rss_kib();
    let mut cache = Cache::new(config, t0);
    let fill = Instant::now();
    for key in &keys[..entries()] {
        cache.insert(key, value, false, t0);
    }
    let fill_time = fill.elapsed();
    let heap = ALLOCATED.load(Ordering::Relaxed) - heap_before;
    let rss = (rss_kib() - rss_before) * 1024;
    let payload: usize = keys[..entries()].iter().map(|k| k.len() + value.len()).sum();
    assert_eq!(cache.len(), entries());

    let uniform_rate = lookups(&mut cache, uniform, value.len(), t0);
    let skewed_rate = lookups(&mut cache, skewed, value.len(), t0);

    let start = Instant::now();
    for key in &keys[entries()..] {
        cache.insert(key, value, false, t0);
    }
    let insert_time = start.elapsed();
    assert_eq!(cache.stats().evictions as usize, keys.len() - entries());

    let per_sec = |n: usize, d: Duration| n as f64 / d.as_secs_f64() / 1e6;
    println!("{}:", policy.name());
    println!("  fill (inserts into a growing cache): {:.2} M/s", per_sec(entries(), fill_time));
    println!("  hit lookups, uniform random:         {:.2} M/s", uniform_rate / 1e6);
    println!("  hit lookups, Zipf(0.99):             {:.2} M/s", skewed_rate / 1e6);
    println!("  inserts with eviction:               {:.2} M/s", per_sec(keys.len() - entries(), insert_time));
    println!(
        "  memory per entry beyond key+value:   {:.1} B requested from the allocator; {:.1} B by RSS",
        (heap - payload) as f64 / entries() as f64,
        (rss as f64 - payload as f64) / entries() as f64
    );
    drop(cache);
}
