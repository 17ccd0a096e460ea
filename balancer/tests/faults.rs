//! Faults injected into real proxy processes: kill -9, SIGSTOP, a restart on the same port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use balancer::BalancerConfig;
use serde_json::Value;
use testkit::{free_port, metrics, wait_until, workspace_bin, ChildService, LineClient, RunningServer};

fn start_origin() -> RunningServer {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut config = origin::OriginConfig::new(data);
    config.synthetic = Some(origin::Synthetic { count: 1000, value_bytes: 100 });
    RunningServer::start(origin::bind(config).unwrap())
}

fn spawn_proxy(origin: SocketAddr, port: u16) -> ChildService {
    let bin = workspace_bin("proxy").unwrap();
    let (port, origin_port) = (port.to_string(), origin.port().to_string());
    ChildService::spawn(
        bin.to_str().unwrap(),
        &["--port", &port, "--origin-port", &origin_port, "--cache-type", "lru", "--log-level", "warn"],
    )
    .unwrap()
}

fn healthy(balancer: SocketAddr, proxy: SocketAddr) -> Option<bool> {
    metrics(balancer).ok()?["proxies"][proxy.to_string()]["healthy"].as_bool()
}

#[test]
fn kill_9_of_a_proxy_under_load_loses_no_request() {
    let origin = start_origin();
    let mut proxies: Vec<ChildService> = (0..3).map(|_| spawn_proxy(origin.addr(), 0)).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(ChildService::addr).collect();
    let balancer = RunningServer::start(balancer::bind(BalancerConfig::new(&addrs)).unwrap());
    let addr = balancer.addr();
    let workers: Vec<_> = (0..8)
        .map(|t| {
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                (0..250)
                    .map(|i| c.request(&format!("GET synthetic/{}", (t * 250 + i) % 200)).unwrap())
                    .collect::<Vec<Value>>()
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || metrics(addr).unwrap()["current_index"].as_u64() >= Some(500)));
    proxies[1].signal("KILL").unwrap();
    let answers: Vec<Value> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert_eq!(answers.len(), 2000);
    let failed: Vec<&Value> = answers.iter().filter(|a| a["status"] != "OK").collect();
    assert!(failed.is_empty(), "{} failed, e.g. {:?}", failed.len(), failed.first());
    // Each answer is for its own key: worker t asked for synthetic/{(t × 250 + i) mod 200}.
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer["data"]["key"], format!("synthetic/{}", i % 200), "answer {i}");
    }
    assert!(wait_until(Duration::from_secs(5), || healthy(addr, addrs[1]) == Some(false)));
    proxies.remove(1).wait_exit(Duration::from_secs(1)).ok();
}

#[test]
fn a_stopped_proxy_is_retried_around_within_the_request_timeout_and_marked_down() {
    let origin = start_origin();
    let proxies: Vec<ChildService> = (0..3).map(|_| spawn_proxy(origin.addr(), 0)).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(ChildService::addr).collect();
    let mut config = BalancerConfig::new(&addrs);
    config.health_interval = Duration::from_millis(200);
    config.health_timeout = Duration::from_millis(200);
    let balancer = RunningServer::start(balancer::bind(config).unwrap());
    let addr = balancer.addr();
    let mut c = LineClient::connect(addr).unwrap();
    for i in 0..6 {
        assert_eq!(c.request(&format!("GET synthetic/{i}")).unwrap()["status"], "OK");
    }
    proxies[0].signal("STOP").unwrap();
    let stopped_at = Instant::now();
    for i in 0..9 {
        let t = Instant::now();
        let answer = c.request(&format!("GET synthetic/{i}")).unwrap();
        assert_eq!(answer["status"], "OK", "{answer}");
        assert!(t.elapsed() < Duration::from_millis(3000), "took {:?}", t.elapsed());
    }
    assert!(wait_until(Duration::from_secs(5), || healthy(addr, addrs[0]) == Some(false)));
    eprintln!("SIGSTOPped proxy marked down after {:?}", stopped_at.elapsed());
    proxies[0].signal("CONT").unwrap();
    assert!(wait_until(Duration::from_secs(5), || healthy(addr, addrs[0]) == Some(true)));
}

#[test]
fn a_killed_proxy_restarted_on_its_port_is_healthy_again_after_rise_probes() {
    let origin = start_origin();
    let port = free_port().unwrap();
    let mut victim = spawn_proxy(origin.addr(), port);
    let other = spawn_proxy(origin.addr(), 0);
    let addrs = [victim.addr(), other.addr()];
    let mut config = BalancerConfig::new(&addrs);
    config.health_interval = Duration::from_millis(100);
    config.health_timeout = Duration::from_millis(100);
    config.rise = 3;
    let balancer = RunningServer::start(balancer::bind(config).unwrap());
    let addr = balancer.addr();
    victim.signal("KILL").unwrap();
    victim.wait_exit(Duration::from_secs(5)).unwrap();
    assert!(wait_until(Duration::from_secs(5), || healthy(addr, addrs[0]) == Some(false)));
    let restarted = spawn_proxy(origin.addr(), port);
    let back = Instant::now();
    assert!(wait_until(Duration::from_secs(5), || healthy(addr, addrs[0]) == Some(true)));
    // Three successful probes at 100 ms intervals take at least two intervals.
    assert!(back.elapsed() >= Duration::from_millis(190), "healthy again after only {:?}", back.elapsed());
    // Round robin uses it again.
    let mut c = LineClient::connect(addr).unwrap();
    let nodes: Vec<u64> =
        (0..4).map(|i| c.request(&format!("GET synthetic/{i}")).unwrap()["node"].as_u64().unwrap()).collect();
    assert!(nodes.contains(&u64::from(port)), "{nodes:?}");
    drop(restarted);
}

#[test]
fn a_sigstopped_proxy_under_load_fails_no_request_and_its_gets_are_redispatched_when_marked_down() {
    let origin = start_origin();
    let proxies: Vec<ChildService> = (0..3).map(|_| spawn_proxy(origin.addr(), 0)).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(ChildService::addr).collect();
    let mut config = BalancerConfig::new(&addrs);
    config.health_interval = Duration::from_millis(100);
    config.health_timeout = Duration::from_millis(100);
    // The default 3 s per attempt: GETs stuck on the stopped proxy are rescued by its being
    // marked down (three failed probes), not by their time-out.
    let balancer = RunningServer::start(balancer::bind(config).unwrap());
    let addr = balancer.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                let mut answers = Vec::new();
                for i in 0..4000 {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let started = Instant::now();
                    let answer = c.request(&format!("GET synthetic/{}", (t * 4000 + i) % 1000)).unwrap();
                    answers.push((answer, started, started.elapsed()));
                }
                answers
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || metrics(addr).unwrap()["current_index"].as_u64() >= Some(300)));
    proxies[0].signal("STOP").unwrap();
    let stopped_at = Instant::now();
    assert!(wait_until(Duration::from_secs(5), || healthy(addr, addrs[0]) == Some(false)));
    let marked_down_after = stopped_at.elapsed();
    // Keep the load on a little longer, then stop it.
    let resumed = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || {
        metrics(addr).unwrap()["current_index"].as_u64() >= Some(300) && resumed.elapsed() > Duration::from_millis(300)
    }));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answers: Vec<(Value, Instant, Duration)> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let failed: Vec<&Value> = answers.iter().map(|(a, _, _)| a).filter(|a| a["status"] != "OK").collect();
    assert!(failed.is_empty(), "{} of {} failed, e.g. {:?}", failed.len(), answers.len(), failed.first());
    // The GETs caught on the stopped proxy: sent before it was marked down, answered after.
    let caught: Vec<Duration> = answers
        .iter()
        .filter(|(_, started, took)| {
            *started < stopped_at + marked_down_after && *started + *took > stopped_at + marked_down_after
        })
        .map(|(_, _, took)| *took)
        .collect();
    let slowest = answers.iter().map(|(_, _, took)| *took).max().unwrap_or_default();
    eprintln!(
        "SIGSTOP under load: {} GETs, 0 failed; marked down after {marked_down_after:?}; {} GETs caught on it, slowest answer {slowest:?}",
        answers.len(),
        caught.len()
    );
    assert!(!caught.is_empty(), "no GET was in flight on the stopped proxy");
    // Re-dispatched at the mark-down, well before their 3 s time-out.
    assert!(slowest < Duration::from_millis(2500), "slowest answer {slowest:?}");
    assert!(metrics(addr).unwrap()["retries"].as_u64() >= Some(1));
    proxies[0].signal("CONT").unwrap();
}
