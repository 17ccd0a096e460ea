//! The proxy over real loopback sockets, in front of a real origin (in-process) or of fakes
//! that misbehave on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use origin::OriginConfig;
use proxy::{Policy, ProxyConfig};
use serde_json::{json, Value};
use testkit::{metrics, refused_addr, temp_dir, wait_until, FakeBehavior, FakeServer, LineClient, RunningServer};

fn sample_data() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data")
}

fn start_origin(latency_ms: u64) -> RunningServer {
    let mut config = OriginConfig::new(sample_data());
    config.latency = Duration::from_millis(latency_ms);
    RunningServer::start(origin::bind(config).unwrap())
}

fn start_proxy(config: ProxyConfig) -> RunningServer {
    RunningServer::start(proxy::bind(config).unwrap())
}

fn lru(origin: SocketAddr, capacity: usize) -> ProxyConfig {
    let mut config = ProxyConfig::new(origin);
    config.cache.policy = Policy::Lru;
    config.cache.capacity = capacity;
    config
}

fn get(c: &mut LineClient, key: &str) -> Value {
    c.request(&format!("GET {key}")).unwrap()
}

fn hit(answer: &Value) -> bool {
    answer["cache_hit"].as_bool().unwrap()
}

#[test]
fn a_miss_then_a_hit_with_cache_hit_and_node() {
    let origin = start_origin(0);
    let proxy = start_proxy(ProxyConfig::new(origin.addr()));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    let first = get(&mut c, "article/1");
    assert_eq!(first["status"], "OK");
    assert_eq!(first["cache_hit"], false);
    assert_eq!(first["node"], proxy.addr().port());
    assert_eq!(first["data"]["id"], 1);
    let second = get(&mut c, "/article/1");
    assert_eq!(second["cache_hit"], true);
    assert_eq!(second["data"], first["data"]);
    // Ids are echoed on hits and misses, and the JSON form works the same.
    let with_id = c.request(r#"{"op":"get","key":"article/1","id":"h"}"#).unwrap();
    assert_eq!((with_id["cache_hit"].as_bool(), with_id["id"].as_str()), (Some(true), Some("h")));
    let with_id = c.request(r#"{"op":"get","key":"article/2","id":9}"#).unwrap();
    assert_eq!((with_id["cache_hit"].as_bool(), with_id["id"].as_u64()), (Some(false), Some(9)));
    assert_eq!(metrics(origin.addr()).unwrap()["ok"], 2, "each key fetched once");
}

#[test]
fn only_ok_answers_are_cached_unless_negative_ttl_is_set() {
    let dir = temp_dir("proxy-only-ok");
    std::fs::write(dir.join("broken.json"), "{").unwrap();
    let origin = RunningServer::start(origin::bind(OriginConfig::new(&dir)).unwrap());
    let proxy = start_proxy(ProxyConfig::new(origin.addr()));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    for _ in 0..2 {
        let missing = get(&mut c, "missing");
        assert_eq!((missing["status"].as_str(), hit(&missing)), (Some("NOT_FOUND"), false));
        let broken = get(&mut c, "broken");
        assert_eq!((broken["status"].as_str(), hit(&broken)), (Some("ORIGIN_ERROR"), false));
        assert!(broken["data"].as_str().unwrap().contains("not valid JSON"));
    }
    let m = metrics(origin.addr()).unwrap();
    assert_eq!((m["not_found"].as_u64(), m["errors"].as_u64()), (Some(2), Some(2)));
    assert_eq!(metrics(proxy.addr()).unwrap()["entries"], 0);

    let mut config = ProxyConfig::new(origin.addr());
    config.cache.negative_ttl = Duration::from_secs(30);
    let negative = start_proxy(config);
    let mut c = LineClient::connect(negative.addr()).unwrap();
    assert!(!hit(&get(&mut c, "missing")));
    let cached = get(&mut c, "missing");
    assert_eq!((cached["status"].as_str(), hit(&cached)), (Some("NOT_FOUND"), true));
    assert_eq!(metrics(origin.addr()).unwrap()["not_found"], 3);
}

#[test]
fn ttl_entries_expire_after_ttl_seconds() {
    let origin = start_origin(0);
    let mut config = ProxyConfig::new(origin.addr());
    config.cache.ttl = Duration::from_secs(1);
    let proxy = start_proxy(config);
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    let stored = Instant::now();
    assert!(!hit(&get(&mut c, "article/3")));
    assert!(hit(&get(&mut c, "article/3")));
    // Polled until the entry is no longer served fresh; that must not happen before 1 s.
    assert!(wait_until(Duration::from_secs(5), || !hit(&get(&mut c, "article/3"))));
    assert!(stored.elapsed() >= Duration::from_millis(990), "expired early: {:?}", stored.elapsed());
}

#[test]
fn lru_with_capacity_two_evicts_the_least_recently_used() {
    let origin = start_origin(0);
    let proxy = start_proxy(lru(origin.addr(), 2));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    get(&mut c, "article/1");
    get(&mut c, "article/2");
    assert!(hit(&get(&mut c, "article/1")));
    get(&mut c, "article/3");
    assert!(hit(&get(&mut c, "article/1")), "recently used, kept");
    assert!(hit(&get(&mut c, "article/3")));
    assert!(!hit(&get(&mut c, "article/2")), "least recently used, evicted");
    let m = metrics(proxy.addr()).unwrap();
    assert_eq!(
        (m["entries"].as_u64(), m["evictions"].as_u64(), m["cache_type"].as_str()),
        (Some(2), Some(2), Some("lru"))
    );
}

#[test]
fn the_byte_bound_holds() {
    let origin = start_origin(0);
    let mut config = lru(origin.addr(), 1000);
    config.cache.max_bytes = Some(400);
    let proxy = start_proxy(config);
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    for n in 1..=4 {
        get(&mut c, &format!("article/{n}"));
        let m = metrics(proxy.addr()).unwrap();
        assert!(m["bytes"].as_u64().unwrap() <= 400, "{m}");
    }
    let m = metrics(proxy.addr()).unwrap();
    assert!(m["evictions"].as_u64().unwrap() >= 1, "{m}");
    assert_eq!(m["max_bytes"], 400);
}

#[test]
fn the_sweep_expires_entries_nobody_touches() {
    let origin = start_origin(0);
    let mut config = ProxyConfig::new(origin.addr());
    config.cache.ttl = Duration::from_millis(200);
    config.sweep_interval = Duration::from_millis(50);
    let proxy = start_proxy(config);
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    for n in 1..=3 {
        get(&mut c, &format!("article/{n}"));
    }
    assert_eq!(metrics(proxy.addr()).unwrap()["entries"], 3);
    assert!(wait_until(Duration::from_secs(5), || {
        let m = metrics(proxy.addr()).unwrap();
        m["expirations"] == 3 && m["entries"] == 0 && m["bytes"] == 0
    }));
}

#[test]
fn a_hundred_concurrent_misses_on_one_key_make_one_origin_fetch() {
    let origin = start_origin(300);
    let proxy = start_proxy(ProxyConfig::new(origin.addr()));
    let barrier = Arc::new(Barrier::new(100));
    let addr = proxy.addr();
    let workers: Vec<_> = (0..100)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                barrier.wait();
                get(&mut c, "article/4")
            })
        })
        .collect();
    let mut other = LineClient::connect(addr).unwrap();
    assert!(wait_until(Duration::from_secs(5), || metrics(addr).unwrap()["waiting_on_origin"].as_u64() >= Some(90)));
    let answers: Vec<Value> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(answers.iter().all(|a| a["status"] == "OK" && a["data"]["id"] == 4), "{answers:?}");
    assert_eq!(metrics(origin.addr()).unwrap()["ok"], 1, "exactly one origin fetch");
    let m = metrics(addr).unwrap();
    assert_eq!(m["origin_fetches"], 1);
    assert!(m["coalesced"].as_u64().unwrap() >= 90, "{m}");
    assert_eq!(m["misses"], 100);
    assert_eq!(get(&mut other, "article/4")["cache_hit"], true);
}

#[test]
fn hits_are_served_within_milliseconds_while_a_fetch_is_pending() {
    let origin = start_origin(1000);
    let proxy = start_proxy(ProxyConfig::new(origin.addr()));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    get(&mut c, "article/1");
    let mut slow = LineClient::connect(proxy.addr()).unwrap();
    slow.send("GET article/2").unwrap();
    assert!(wait_until(Duration::from_secs(5), || metrics(proxy.addr()).unwrap()["fetches_running"] == 1));
    for _ in 0..20 {
        let t = Instant::now();
        assert!(hit(&get(&mut c, "article/1")));
        // Far below the origin's 1 s: the fetch does not hold the loop (the margin is for busy CI).
        assert!(t.elapsed() < Duration::from_millis(300), "hit took {:?} during a fetch", t.elapsed());
    }
    assert_eq!(slow.recv().unwrap()["status"], "OK");
}

fn assert_origin_failure_within(origin: SocketAddr, timeout_ms: u64, expect_in_message: &str) {
    let mut config = ProxyConfig::new(origin);
    config.origin_timeout = Duration::from_millis(timeout_ms);
    let proxy = start_proxy(config);
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    let t = Instant::now();
    let answer = get(&mut c, "article/1");
    assert!(t.elapsed() < Duration::from_millis(timeout_ms + 1000), "took {:?}", t.elapsed());
    assert_eq!(answer["status"], "ORIGIN_FAILURE", "{answer}");
    assert_eq!(answer["cache_hit"], false);
    let message = answer["data"].as_str().unwrap();
    assert!(message.contains(expect_in_message), "{message:?} lacks {expect_in_message:?}");
    // The proxy keeps serving, and failures are never cached: the next GET tries again.
    assert_eq!(c.request("HEALTH").unwrap()["data"]["role"], "proxy");
    assert_eq!(get(&mut c, "article/1")["status"], "ORIGIN_FAILURE");
    let m = metrics(proxy.addr()).unwrap();
    assert_eq!((m["origin_errors"].as_u64(), m["entries"].as_u64()), (Some(2), Some(0)), "{m}");
}

#[test]
fn an_origin_that_never_answers_is_an_origin_failure_at_the_timeout() {
    let fake = FakeServer::start(FakeBehavior::Silent).unwrap();
    assert_origin_failure_within(fake.addr(), 300, "within 300 ms");
}

#[test]
fn an_origin_that_answers_garbage_is_an_origin_failure() {
    let fake = FakeServer::start(FakeBehavior::Reply("HTTP/1.1 200 OK".into())).unwrap();
    assert_origin_failure_within(fake.addr(), 2000, "garbage");
    let fake = FakeServer::start(FakeBehavior::Reply(r#"{"status":"WEIRD","data":1}"#.into())).unwrap();
    assert_origin_failure_within(fake.addr(), 2000, "WEIRD");
}

#[test]
fn an_origin_that_closes_without_answering_is_an_origin_failure() {
    let fake = FakeServer::start(FakeBehavior::CloseWithoutAnswer).unwrap();
    assert_origin_failure_within(fake.addr(), 2000, "closed");
}

#[test]
fn a_refused_origin_is_an_origin_failure() {
    assert_origin_failure_within(refused_addr(), 2000, "refused");
}

#[test]
fn an_origin_that_closes_after_every_answer_serves_a_hundred_misses() {
    let answer = r#"{"status":"OK","data":{"one":"shot"}}"#;
    let fake = FakeServer::start(FakeBehavior::ReplyThenClose(answer.into())).unwrap();
    let proxy = start_proxy(ProxyConfig::new(fake.addr()));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    for n in 0..100 {
        let a = get(&mut c, &format!("k/{n}"));
        assert_eq!((a["status"].as_str(), hit(&a)), (Some("OK"), false), "miss {n}: {a}");
        assert_eq!(a["data"], json!({"one": "shot"}));
    }
    assert_eq!(fake.requests(), 100);
    let m = metrics(proxy.addr()).unwrap();
    assert_eq!((m["origin_fetches"].as_u64(), m["origin_errors"].as_u64()), (Some(100), Some(0)));
}

#[test]
fn a_reused_connection_the_origin_closed_while_idle_is_retried_on_a_fresh_one() {
    // The origin closes idle connections quickly; the proxy must not turn that into errors.
    let mut config = OriginConfig::new(sample_data());
    config.server.idle_timeout = Duration::from_millis(100);
    let origin = RunningServer::start(origin::bind(config).unwrap());
    let proxy = start_proxy(lru(origin.addr(), 100));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    for n in 1..=4 {
        assert_eq!(get(&mut c, &format!("article/{n}"))["status"], "OK");
        // Until the origin has closed the proxy's idle connection (only this probe remains).
        assert!(wait_until(Duration::from_secs(5), || metrics(origin.addr()).unwrap()["connections"] == 1));
    }
    let m = metrics(proxy.addr()).unwrap();
    assert_eq!((m["origin_errors"].as_u64(), m["origin_fetches"].as_u64()), (Some(0), Some(4)), "{m}");
}

#[test]
fn a_reused_connection_that_dies_before_answering_is_retried_once_on_a_fresh_one() {
    let answer = r#"{"status":"OK","data":"v"}"#;
    let fake = FakeServer::start(FakeBehavior::ReplyFirstOnly(answer.into())).unwrap();
    let proxy = start_proxy(ProxyConfig::new(fake.addr()));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    for key in ["a", "b", "c"] {
        assert_eq!(get(&mut c, key)["status"], "OK", "{key}");
    }
    let m = metrics(proxy.addr()).unwrap();
    // a: new connection. b, c: sent on the kept connection, dropped, retried on a new one.
    assert_eq!((m["origin_errors"].as_u64(), m["origin_fetches"].as_u64()), (Some(0), Some(3)), "{m}");
    assert_eq!(m["origin_connects"], 3);
    assert_eq!(fake.requests(), 5);
}

#[test]
fn stale_answers_are_served_when_the_origin_fails_within_the_grace() {
    let origin = start_origin(0);
    let mut config = ProxyConfig::new(origin.addr());
    config.cache.ttl = Duration::from_millis(200);
    config.cache.stale_grace = Duration::from_secs(30);
    config.origin_timeout = Duration::from_millis(300);
    let proxy = start_proxy(config);
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    let fresh = get(&mut c, "article/2");
    origin.stop().unwrap();
    assert!(wait_until(Duration::from_secs(5), || get(&mut c, "article/2").get("stale").is_some()));
    let stale = get(&mut c, "article/2");
    assert_eq!(stale["status"], "OK");
    assert_eq!((stale["stale"].as_bool(), hit(&stale)), (Some(true), true));
    assert_eq!(stale["data"], fresh["data"]);
    // Without an entry to fall back on, the failure shows.
    assert_eq!(get(&mut c, "article/3")["status"], "ORIGIN_FAILURE");
    assert!(metrics(proxy.addr()).unwrap()["stale_served"].as_u64().unwrap() >= 2);
}

#[test]
fn purge_removes_the_entry_so_the_next_get_misses() {
    let origin = start_origin(0);
    let proxy = start_proxy(ProxyConfig::new(origin.addr()));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    get(&mut c, "article/1");
    assert_eq!(c.request("PURGE article/1").unwrap(), json!({"status": "OK", "data": {"purged": true}}));
    assert_eq!(c.request("PURGE article/1").unwrap()["data"]["purged"], false);
    assert_eq!(c.request(r#"{"op":"purge","key":"never","id":1}"#).unwrap()["id"], 1);
    assert!(!hit(&get(&mut c, "article/1")));
    assert!(hit(&get(&mut c, "article/1")));
    assert_eq!(metrics(proxy.addr()).unwrap()["purges"], 1);
}

#[test]
fn too_many_requests_waiting_on_the_origin_get_overloaded() {
    let origin = start_origin(500);
    let mut config = ProxyConfig::new(origin.addr());
    config.max_pending = 2;
    config.origin_max_inflight = 1;
    let proxy = start_proxy(config);
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    // SPEC 3.3: the first GET's own fetch is in flight (not waiting); two wait queued; the
    // fourth is past --max-pending.
    let burst: String = (1..=4).map(|i| format!("{{\"op\":\"get\",\"key\":\"article/{i}\",\"id\":{i}}}\n")).collect();
    c.send_raw(burst.as_bytes()).unwrap();
    let first = c.recv().unwrap();
    assert_eq!((first["status"].as_str(), first["id"].as_u64()), (Some("OVERLOADED"), Some(4)));
    // The connection stays, and the three admitted requests (two queued behind the first) finish.
    let mut rest = [c.recv().unwrap(), c.recv().unwrap(), c.recv().unwrap()];
    rest.sort_by_key(|a| a["id"].as_u64());
    assert_eq!(rest.map(|a| a["status"].as_str().unwrap().to_owned()), ["OK", "OK", "OK"]);
    let m = metrics(proxy.addr()).unwrap();
    assert_eq!(
        (m["overloaded"].as_u64(), m["misses"].as_u64(), m["origin_fetches"].as_u64()),
        (Some(1), Some(4), Some(3))
    );
}

#[test]
fn metrics_add_up_after_a_scripted_sequence() {
    let origin = start_origin(0);
    let proxy = start_proxy(lru(origin.addr(), 100));
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    for line in [
        "GET article/1", // miss
        "GET article/1", // hit
        "GET article/1", // hit
        "GET article/2", // miss
        "GET missing",   // miss (NOT_FOUND, not cached)
        "GET missing",   // miss
        "GET ../bad",    // bad request: neither hit nor miss
        "FROB",          // wrong method
        "PURGE article/2",
        "GET article/2", // miss
        "HEALTH",
    ] {
        c.request(line).unwrap();
    }
    let m = c.request("METRICS").unwrap()["data"].clone();
    assert_eq!(m["role"], "proxy");
    assert_eq!(m["total_requests"], 12);
    assert_eq!((m["hits"].as_u64(), m["misses"].as_u64()), (Some(2), Some(5)));
    assert!((m["hit_rate"].as_f64().unwrap() - 2.0 / 7.0).abs() < 1e-9);
    assert_eq!(m["origin_fetches"], 5);
    assert_eq!(m["origin_errors"], 0);
    assert_eq!(m["coalesced"], 0);
    assert_eq!(m["stale_served"], 0);
    assert_eq!((m["entries"].as_u64(), m["purges"].as_u64()), (Some(2), Some(1)));
    assert_eq!(m["capacity"], 100);
    assert_eq!(m["connections"], 1);
    for field in ["start_time", "uptime_s", "bytes", "evictions", "expirations", "cache_type"] {
        assert!(!m[field].is_null(), "missing {field}: {m}");
    }
    for field in ["p50", "p90", "p99", "max"] {
        assert!(m["latency_us"][field].is_u64(), "{m}");
    }
    assert!(m["latency_us"]["max"].as_u64().unwrap() >= 1);
}
