//! The hit path allocates nothing in steady state: a counting global allocator counts heap
//! allocations made on the proxy's and the balancer's event-loop threads while thousands of
//! cache hits flow through both.
#![allow(unsafe_code)] // the counting allocator
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use common::server::{Server, Service};
use testkit::{metrics, wait_until};

struct Counting;

/// Allocations per tracked thread: [untracked, proxy, balancer].
static ALLOCATIONS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

thread_local! {
    /// Which counter this thread's allocations go to (0: not counted).
    static TRACKED: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let which = TRACKED.try_with(Cell::get).unwrap_or(0);
    if which != 0 {
        ALLOCATIONS[which].fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PROXY: usize = 1;
const BALANCER: usize = 2;

/// Runs a server on its own thread, counting that thread's allocations under `which`.
fn run_tracked<S>(server: Server<S>, which: usize) -> common::server::ShutdownHandle
where
    S: Service + Send + 'static,
    S::Timer: Send,
{
    let handle = server.shutdown_handle();
    thread::spawn(move || {
        TRACKED.with(|t| t.set(which));
        server.run()
    });
    handle
}

/// Sends `rounds` batches of 100 pipelined GETs over `stream` and reads all the answers,
/// checking each: valid JSON, OK, the value of the key asked for, in order. Returns how many
/// were cache hits.
fn hits(stream: &mut TcpStream, rounds: usize) -> usize {
    let mut batch = Vec::new();
    for k in 0..100 {
        batch.extend_from_slice(format!("GET synthetic/{k}\n").as_bytes());
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut pending: Vec<u8> = Vec::new();
    let mut hit_count = 0;
    for _ in 0..rounds {
        stream.write_all(&batch).unwrap();
        let mut answered = 0;
        while answered < 100 {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed");
            pending.extend_from_slice(&buf[..n]);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let answer: serde_json::Value = serde_json::from_slice(&pending[..end]).unwrap();
                assert_eq!(answer["status"], "OK", "{answer}");
                assert_eq!(answer["data"]["key"], format!("synthetic/{answered}"), "{answer}");
                hit_count += usize::from(answer["cache_hit"] == true);
                pending.drain(..=end);
                answered += 1;
            }
        }
        assert!(pending.is_empty(), "more answers than requests");
    }
    hit_count
}

#[test]
fn hits_through_the_balancer_and_a_proxy_allocate_nothing_in_steady_state() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut origin_config = origin::OriginConfig::new(data);
    origin_config.synthetic = Some(origin::Synthetic { count: 100, value_bytes: 200 });
    let origin = origin::bind(origin_config).unwrap();
    let origin_addr = origin.local_addr();
    let origin_stop = origin.shutdown_handle();
    thread::spawn(move || origin.run());

    let mut proxy_config = proxy::ProxyConfig::new(origin_addr);
    proxy_config.cache.policy = proxy::Policy::Lru;
    let proxy = proxy::bind(proxy_config).unwrap();
    let proxy_addr = proxy.local_addr();
    let proxy_stop = run_tracked(proxy, PROXY);

    // Probes and polls happen once at start, then not again during the test.
    let mut config = balancer::BalancerConfig::new(&[proxy_addr]);
    config.health_interval = Duration::from_secs(3600);
    config.metrics_interval = Duration::from_secs(3600);
    let balancer = balancer::bind(config).unwrap();
    let balancer_addr = balancer.local_addr();
    let balancer_stop = run_tracked(balancer, BALANCER);
    assert!(wait_until(Duration::from_secs(5), || {
        let m = metrics(balancer_addr).unwrap();
        let p = &m["proxies"][proxy_addr.to_string()];
        p["multiplexed"] == true && !p["metrics"].is_null()
    }));

    let mut stream = TcpStream::connect(balancer_addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    hits(&mut stream, 300); // warm-up: every key cached, every buffer and table at its size
    let before = [PROXY, BALANCER].map(|i| ALLOCATIONS[i].load(Ordering::SeqCst));
    let hit_count = hits(&mut stream, 200); // 20,000 hits
    let after = [PROXY, BALANCER].map(|i| ALLOCATIONS[i].load(Ordering::SeqCst));
    assert_eq!(hit_count, 20_000, "every answer measured must be a cache hit");
    let (proxy_allocs, balancer_allocs) = (after[0] - before[0], after[1] - before[1]);
    eprintln!("allocations during 20,000 hits: proxy {proxy_allocs}, balancer {balancer_allocs}");
    assert_eq!(proxy_allocs, 0, "the proxy allocated on the hit path");
    assert_eq!(balancer_allocs, 0, "the balancer allocated on the hit path");

    for stop in [balancer_stop, proxy_stop, origin_stop] {
        stop.shutdown();
    }
}
