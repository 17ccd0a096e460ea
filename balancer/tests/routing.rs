//! The balancer in front of real in-process proxies and origin (or fakes), over loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use balancer::{BalancerConfig, Strategy};
use serde_json::{json, Value};
use testkit::{metrics, refused_addr, wait_until, FakeBehavior, FakeServer, LineClient, RunningServer};

fn start_origin(latency_ms: u64) -> RunningServer {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut config = origin::OriginConfig::new(data);
    config.latency = Duration::from_millis(latency_ms);
    config.synthetic = Some(origin::Synthetic { count: 100_000, value_bytes: 100 });
    RunningServer::start(origin::bind(config).unwrap())
}

fn start_proxy(origin: SocketAddr) -> RunningServer {
    let mut config = proxy::ProxyConfig::new(origin);
    config.cache.policy = proxy::Policy::Lru;
    RunningServer::start(proxy::bind(config).unwrap())
}

fn start_balancer(proxies: &[SocketAddr], tweak: impl FnOnce(&mut BalancerConfig)) -> RunningServer {
    let mut config = BalancerConfig::new(proxies);
    tweak(&mut config);
    RunningServer::start(balancer::bind(config).unwrap())
}

/// Quick health settings so tests see state changes in well under a second.
fn fast_health(config: &mut BalancerConfig) {
    config.health_interval = Duration::from_millis(50);
    config.health_timeout = Duration::from_millis(100);
    config.metrics_interval = Duration::from_millis(100);
}

struct Cluster {
    _origin: RunningServer,
    proxies: Vec<Option<RunningServer>>,
    balancer: RunningServer,
}

impl Cluster {
    fn start(n: usize, tweak: impl FnOnce(&mut BalancerConfig)) -> Cluster {
        let origin = start_origin(0);
        let proxies: Vec<RunningServer> = (0..n).map(|_| start_proxy(origin.addr())).collect();
        let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
        let balancer = start_balancer(&addrs, tweak);
        Cluster { _origin: origin, proxies: proxies.into_iter().map(Some).collect(), balancer }
    }

    fn client(&self) -> LineClient {
        LineClient::connect(self.balancer.addr()).unwrap()
    }

    fn port(&self, i: usize) -> u64 {
        u64::from(self.proxies[i].as_ref().unwrap().addr().port())
    }
}

fn get(c: &mut LineClient, key: &str) -> Value {
    c.request(&format!("GET {key}")).unwrap()
}

fn proxy_state(balancer: SocketAddr, proxy: SocketAddr) -> Value {
    metrics(balancer).unwrap()["proxies"][proxy.to_string()].clone()
}

#[test]
fn round_robin_spreads_300_gets_evenly_over_3_proxies() {
    let cluster = Cluster::start(3, |_| {});
    let mut c = cluster.client();
    let mut per_node: HashMap<u64, usize> = HashMap::new();
    for i in 0..300 {
        let answer = get(&mut c, &format!("article/{}", i % 4 + 1));
        assert_eq!(answer["status"], "OK", "{answer}");
        *per_node.entry(answer["node"].as_u64().unwrap()).or_default() += 1;
    }
    for i in 0..3 {
        assert_eq!(per_node.get(&cluster.port(i)), Some(&100), "{per_node:?}");
    }
    let m = metrics(cluster.balancer.addr()).unwrap();
    assert_eq!((m["strategy"].as_str(), m["current_index"].as_u64()), (Some("round_robin"), Some(300)));
}

#[test]
fn least_loaded_steers_away_from_a_slow_proxy() {
    let fast = start_origin(0);
    let slow = start_origin(300);
    let proxies = [start_proxy(fast.addr()), start_proxy(fast.addr()), start_proxy(slow.addr())];
    let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
    let balancer = start_balancer(&addrs, |c| c.strategy = Strategy::LeastLoaded);
    let addr = balancer.addr();
    let workers: Vec<_> = (0..12)
        .map(|t| {
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                (0..10)
                    .map(|i| get(&mut c, &format!("synthetic/{}", t * 100 + i))["node"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let nodes: Vec<u64> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let slow_port = u64::from(addrs[2].port());
    let on_slow = nodes.iter().filter(|&&n| n == slow_port).count();
    // Round robin would send it 40 of 120; least_loaded sees its requests pile up.
    assert!(on_slow <= 20, "{on_slow} of {} went to the slow proxy", nodes.len());
    assert_eq!(metrics(addr).unwrap()["strategy"], "least_loaded");
}

#[test]
fn consistent_hash_keeps_keys_on_one_proxy_and_moves_only_the_lost_proxys_keys() {
    let mut cluster = Cluster::start(3, |c| {
        c.strategy = Strategy::ConsistentHash { load_factor: 1.25 };
        fast_health(c);
    });
    let mut c = cluster.client();
    let keys: Vec<String> = (0..60).map(|i| format!("synthetic/{i}")).collect();
    let mut owner: HashMap<&str, u64> = HashMap::new();
    for _ in 0..3 {
        for key in &keys {
            let node = get(&mut c, key)["node"].as_u64().unwrap();
            assert_eq!(*owner.entry(key).or_insert(node), node, "{key} moved between requests");
        }
    }
    let per_node = |port: u64| owner.values().filter(|&&n| n == port).count();
    assert!((0..3).all(|i| per_node(cluster.port(i)) > 0), "{owner:?}");
    // One proxy goes away: only its keys move, and they are still answered.
    let lost = cluster.port(1);
    cluster.proxies[1].take().unwrap().stop().unwrap();
    for key in &keys {
        let answer = get(&mut c, key);
        assert_eq!(answer["status"], "OK", "{key}: {answer}");
        let node = answer["node"].as_u64().unwrap();
        if owner[key.as_str()] == lost {
            assert_ne!(node, lost);
        } else {
            assert_eq!(node, owner[key.as_str()], "{key} moved although its proxy is up");
        }
    }
}

#[test]
fn a_hung_proxy_is_retried_around_within_the_request_timeout_and_marked_down() {
    let origin = start_origin(0);
    let good = [start_proxy(origin.addr()), start_proxy(origin.addr())];
    let hung = FakeServer::start(FakeBehavior::Silent).unwrap();
    let addrs = [good[0].addr(), hung.addr(), good[1].addr()];
    let balancer = start_balancer(&addrs, |c| {
        fast_health(c);
        c.fall = 3;
        c.request_timeout = Duration::from_millis(1500);
        c.try_timeout = Duration::from_millis(500);
    });
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    for i in 0..12 {
        let t = Instant::now();
        let answer = get(&mut c, &format!("article/{}", i % 4 + 1));
        assert_eq!(answer["status"], "OK", "{answer}");
        assert!(t.elapsed() < Duration::from_millis(1500), "answer took {:?}", t.elapsed());
    }
    assert!(wait_until(Duration::from_secs(5), || proxy_state(balancer.addr(), hung.addr())["healthy"] == false));
    let m = metrics(balancer.addr()).unwrap();
    assert!(m["proxies"][hung.addr().to_string()]["consecutive_failures"].as_u64() >= Some(3), "{m}");
    assert_eq!(m["errors"], 0);
}

#[test]
fn all_proxies_down_is_proxy_unreachable_within_the_request_timeout() {
    let refused = [refused_addr(), refused_addr(), refused_addr()];
    let balancer = start_balancer(&refused, |c| c.request_timeout = Duration::from_millis(1000));
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    let t = Instant::now();
    let answer = c.request(r#"{"op":"get","key":"article/1","id":"u"}"#).unwrap();
    assert_eq!((answer["status"].as_str(), answer["id"].as_str()), (Some("PROXY_UNREACHABLE"), Some("u")));
    assert!(t.elapsed() < Duration::from_millis(1000), "{:?}", t.elapsed());

    let hung: Vec<FakeServer> = (0..3).map(|_| FakeServer::start(FakeBehavior::Silent).unwrap()).collect();
    let addrs: Vec<SocketAddr> = hung.iter().map(FakeServer::addr).collect();
    let balancer = start_balancer(&addrs, |c| {
        c.request_timeout = Duration::from_millis(900);
        c.try_timeout = Duration::from_millis(300);
    });
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    let t = Instant::now();
    assert_eq!(get(&mut c, "article/1")["status"], "PROXY_UNREACHABLE");
    assert!(t.elapsed() < Duration::from_millis(1200), "{:?}", t.elapsed());
    let m = metrics(balancer.addr()).unwrap();
    assert_eq!((m["errors"].as_u64(), m["retries"].as_u64()), (Some(1), Some(2)));
}

#[test]
fn purge_fans_out_to_every_proxy_and_counts_who_held_the_key() {
    let cluster = Cluster::start(3, |_| {});
    let mut c = cluster.client();
    for _ in 0..3 {
        get(&mut c, "article/2");
    }
    assert_eq!(c.request("PURGE article/2").unwrap(), json!({"status": "OK", "data": {"purged": 3, "proxies": 3}}));
    let again = c.request(r#"{"op":"purge","key":"article/2","id":4}"#).unwrap();
    assert_eq!(again, json!({"status": "OK", "data": {"purged": 0, "proxies": 3}, "id": 4}));
    assert_eq!(get(&mut c, "article/2")["cache_hit"], false);
}

#[test]
fn metrics_show_routing_each_proxy_and_cluster_sums() {
    let cluster = Cluster::start(3, fast_health);
    let mut c = cluster.client();
    for i in 0..30 {
        get(&mut c, &format!("article/{}", i % 2 + 1));
    }
    let addr = cluster.balancer.addr();
    // Wait for a poll that has seen all 30 GETs.
    assert!(wait_until(Duration::from_secs(5), || {
        let m = metrics(addr).unwrap();
        m["cluster"]["hits"].as_u64().unwrap_or(0) + m["cluster"]["misses"].as_u64().unwrap_or(0) == 30
    }));
    let m = metrics(addr).unwrap();
    for field in ["role", "strategy", "start_time", "uptime_s", "total_requests", "errors", "retries", "connections"] {
        assert!(!m[field].is_null(), "missing {field}: {m}");
    }
    assert_eq!((m["role"].as_str(), m["current_index"].as_u64()), (Some("balancer"), Some(30)));
    for field in ["p50", "p90", "p99", "max"] {
        assert!(m["latency_us"][field].is_u64());
    }
    let proxies = m["proxies"].as_object().unwrap();
    assert_eq!(proxies.len(), 3);
    let (mut hits, mut misses, mut fetches) = (0, 0, 0);
    for (name, p) in proxies {
        for field in ["healthy", "in_flight", "forwarded", "failures", "consecutive_failures", "metrics"] {
            assert!(p.get(field).is_some(), "{name} lacks {field}");
        }
        assert_eq!(p["forwarded"], 10);
        assert_eq!(p["metrics"]["role"], "proxy");
        hits += p["metrics"]["hits"].as_u64().unwrap();
        misses += p["metrics"]["misses"].as_u64().unwrap();
        fetches += p["metrics"]["origin_fetches"].as_u64().unwrap();
    }
    let cl = &m["cluster"];
    assert_eq!(
        (cl["hits"].as_u64(), cl["misses"].as_u64(), cl["origin_fetches"].as_u64()),
        (Some(hits), Some(misses), Some(fetches))
    );
    assert_eq!(misses, 6, "each of 2 keys missed once on each of 3 proxies");
    assert!((cl["hit_rate"].as_f64().unwrap() - 24.0 / 30.0).abs() < 1e-9);
    let health = c.request("HEALTH").unwrap();
    assert_eq!(health["data"]["role"], "balancer");
}

#[test]
fn simple_text_only_proxies_work_including_one_shot_ones() {
    let answer = r#"{"status":"OK","data":{"from":"fake"}}"#;
    let text_only = FakeServer::start(FakeBehavior::Reply(answer.into())).unwrap();
    let one_shot = FakeServer::start(FakeBehavior::ReplyThenClose(answer.into())).unwrap();
    let balancer = start_balancer(&[text_only.addr(), one_shot.addr()], fast_health);
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    for i in 0..20 {
        let a = c.request(&format!("{{\"op\":\"get\",\"key\":\"k/{i}\",\"id\":{i}}}")).unwrap();
        assert_eq!(a, json!({"status": "OK", "data": {"from": "fake"}, "id": i}));
    }
    let m = metrics(balancer.addr()).unwrap();
    for fake in [&text_only, &one_shot] {
        let p = &m["proxies"][fake.addr().to_string()];
        assert_eq!((p["failures"].as_u64(), p["multiplexed"].as_bool()), (Some(0), Some(false)), "{m}");
    }
    assert_eq!(m["errors"], 0);
}

#[test]
fn past_max_pending_a_get_is_overloaded() {
    let hung = FakeServer::start(FakeBehavior::Silent).unwrap();
    let balancer = start_balancer(&[hung.addr()], |c| {
        c.max_pending = 1;
        c.request_timeout = Duration::from_millis(600);
        c.try_timeout = Duration::from_millis(200);
    });
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    c.send_raw(b"{\"op\":\"get\",\"key\":\"a\",\"id\":1}\n{\"op\":\"get\",\"key\":\"b\",\"id\":2}\n").unwrap();
    let first = c.recv().unwrap();
    assert_eq!((first["status"].as_str(), first["id"].as_u64()), (Some("OVERLOADED"), Some(2)));
    assert_eq!(c.recv().unwrap()["status"], "PROXY_UNREACHABLE");
}

#[test]
fn answers_keep_client_order_and_ids_through_the_balancer() {
    let cluster = Cluster::start(3, |_| {});
    let mut c = cluster.client();
    c.send_raw(b"GET article/1\n{\"op\":\"get\",\"key\":\"article/2\",\"id\":\"x\"}\nGET article/3\nGET nope\nMETRICS\nGET ../bad\n")
        .unwrap();
    let answers: Vec<Value> = (0..6).map(|_| c.recv().unwrap()).collect();
    let in_order: Vec<&Value> = answers.iter().filter(|a| a.get("id").is_none()).collect();
    assert_eq!(in_order[0]["data"]["id"], 1);
    assert_eq!(in_order[1]["data"]["id"], 3);
    assert_eq!(in_order[2]["status"], "NOT_FOUND");
    assert_eq!(in_order[3]["data"]["role"], "balancer");
    assert_eq!(in_order[4]["status"], "BAD_REQUEST");
    let tagged = answers.iter().find(|a| a.get("id").is_some()).unwrap();
    assert_eq!((tagged["id"].as_str(), &tagged["data"]["id"]), (Some("x"), &json!(2)));
}

#[test]
fn a_herd_of_gets_for_one_cold_key_makes_one_origin_fetch_with_consistent_hash() {
    let origin = start_origin(300);
    let proxies: Vec<RunningServer> = (0..3).map(|_| start_proxy(origin.addr())).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
    let balancer = start_balancer(&addrs, |c| c.strategy = Strategy::ConsistentHash { load_factor: 1.25 });
    let addr = balancer.addr();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(100));
    let workers: Vec<_> = (0..100)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                barrier.wait();
                c.request(&format!("{{\"op\":\"get\",\"key\":\"synthetic/7\",\"id\":{i}}}")).unwrap()
            })
        })
        .collect();
    for (i, worker) in workers.into_iter().enumerate() {
        let answer = worker.join().unwrap();
        assert_eq!((answer["status"].as_str(), answer["id"].as_u64()), (Some("OK"), Some(i as u64)), "{answer}");
        assert_eq!(answer["data"]["key"], "synthetic/7");
    }
    assert_eq!(metrics(origin.addr()).unwrap()["ok"], 1, "exactly one origin fetch");
    let m = metrics(addr).unwrap();
    assert!(m["collapsed"].as_u64().unwrap() >= 90, "{m}");
    assert_eq!(m["current_index"].as_u64().unwrap() + m["collapsed"].as_u64().unwrap(), 100);
}

/// `n` clients GET `key` at the same moment, each with its own id; returns the answers in
/// client order.
fn herd(addr: SocketAddr, n: usize, key: &'static str) -> Vec<Value> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                barrier.wait();
                c.request(&format!("{{\"op\":\"get\",\"key\":\"{key}\",\"id\":\"c{i}\"}}")).unwrap()
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).collect()
}

#[test]
fn with_collapse_off_every_get_goes_upstream_and_bounded_load_spreads_them() {
    let origin = start_origin(300);
    let proxies: Vec<RunningServer> = (0..3).map(|_| start_proxy(origin.addr())).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
    let balancer = start_balancer(&addrs, |c| {
        c.strategy = Strategy::ConsistentHash { load_factor: 1.25 };
        c.collapse = false;
    });
    let answers = herd(balancer.addr(), 60, "synthetic/9");
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!((answer["status"].as_str(), answer["id"].as_str()), (Some("OK"), Some(format!("c{i}").as_str())));
    }
    let m = metrics(balancer.addr()).unwrap();
    assert_eq!((m["collapsed"].as_u64(), m["current_index"].as_u64()), (Some(0), Some(60)), "{m}");
    let forwarded: Vec<u64> =
        addrs.iter().map(|a| m["proxies"][a.to_string()]["forwarded"].as_u64().unwrap()).collect();
    assert_eq!(forwarded.iter().sum::<u64>(), 60, "{forwarded:?}");
    assert!(forwarded.iter().filter(|&&f| f > 0).count() >= 2, "bounded load did not spread: {forwarded:?}");
}

#[test]
fn collapsed_followers_of_a_large_value_each_get_it_whole_with_their_own_id() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut config = origin::OriginConfig::new(data);
    config.latency = Duration::from_millis(300);
    config.synthetic = Some(origin::Synthetic { count: 10, value_bytes: 256 * 1024 });
    let origin = RunningServer::start(origin::bind(config).unwrap());
    let proxy = start_proxy(origin.addr());
    let balancer = start_balancer(&[proxy.addr()], |_| {});
    let answers = herd(balancer.addr(), 200, "synthetic/3");
    let first = answers[0]["data"].clone();
    assert!(first.to_string().len() >= 256 * 1024, "a 256 KiB value");
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!((answer["status"].as_str(), answer["id"].as_str()), (Some("OK"), Some(format!("c{i}").as_str())));
        assert_eq!(answer["data"], first, "client {i} got another value");
    }
    let m = metrics(balancer.addr()).unwrap();
    assert!(m["collapsed"].as_u64() >= Some(150), "{m}");
    assert_eq!(metrics(origin.addr()).unwrap()["ok"], 1);
}
