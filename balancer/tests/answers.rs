//! What the balancer makes of its proxies' answers (SPEC 2.3, 3.6), over real loopback
//! sockets: any valid JSON passes whatever its depth, byte for byte; an answer that is not a
//! well-formed one fails only the attempt it was for, never the others on its connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{metrics, temp_dir, wait_until, LineClient, RunningServer};

/// Waits until the balancer has probed every proxy and knows whether it multiplexes.
fn wait_probed(balancer: SocketAddr, proxies: &[SocketAddr]) {
    assert!(wait_until(Duration::from_secs(5), || {
        let m = metrics(balancer).unwrap();
        proxies.iter().all(|p| m["proxies"][p.to_string()]["multiplexed"] == true)
    }));
}

/// Measured: 1,000 levels pass; anything past 127 used to tear the link down.
const DEPTH: usize = 1_000;

#[test]
fn a_value_nested_a_thousand_deep_passes_intact_and_the_proxies_stay_up() {
    let dir = temp_dir("balancer-deep");
    // Objects and arrays in turn, one line, as the origin serves it unchanged.
    let value = format!("{}\"bottom\"{}", "{\"a\":[".repeat(DEPTH / 2), "]}".repeat(DEPTH / 2));
    std::fs::write(dir.join("deep.json"), &value).unwrap();
    let origin = RunningServer::start(origin::bind(origin::OriginConfig::new(&dir)).unwrap());
    let proxies: Vec<RunningServer> =
        (0..2).map(|_| RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin.addr())).unwrap())).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
    let balancer = RunningServer::start(balancer::bind(balancer::BalancerConfig::new(&addrs)).unwrap());
    let addr = balancer.addr();
    wait_probed(addr, &addrs);
    let mut c = LineClient::connect(addr).unwrap();
    // Round robin: a miss and a hit at each proxy.
    for i in 0..4 {
        c.send(&format!("{{\"op\":\"get\",\"key\":\"deep\",\"id\":\"c{i}\"}}")).unwrap();
        let line = c.recv_line().unwrap().unwrap();
        let expected_start = format!("{{\"status\":\"OK\",\"data\":{value},\"cache_hit\":");
        assert!(line.starts_with(&expected_start), "answer {i}: {:.200}", line);
        assert!(line.ends_with(&format!(",\"id\":\"c{i}\"}}\n")), "answer {i}: …{}", &line[line.len() - 80..]);
    }
    let m = metrics(addr).unwrap();
    assert_eq!((m["retries"].as_u64(), m["errors"].as_u64()), (Some(0), Some(0)), "{m}");
    for p in &addrs {
        let p = &m["proxies"][p.to_string()];
        assert_eq!((p["healthy"].as_bool(), p["failures"].as_u64()), (Some(true), Some(0)), "{m}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A multiplexing fake proxy: HEALTH and METRICS get proper answers; a GET for key K tagged
/// N gets what `answer(K, N)` says, in the order the GETs came. Counts the connections that
/// carried GETs.
fn fake_mux_proxy(answer: fn(&str, u64) -> String) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let get_conns = Arc::new(AtomicUsize::new(0));
    let counter = get_conns.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let counter = counter.clone();
            thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut counted = false;
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let out = match line.as_str() {
                        "HEALTH" | "METRICS" => "{\"status\":\"OK\",\"data\":{\"role\":\"proxy\"}}".to_owned(),
                        _ => {
                            if !counted {
                                counted = true;
                                counter.fetch_add(1, Ordering::SeqCst);
                            }
                            let v: Value = serde_json::from_str(&line).unwrap();
                            answer(v["key"].as_str().unwrap(), v["id"].as_u64().unwrap())
                        }
                    };
                    if writer.write_all(format!("{out}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, get_conns)
}

fn garbling(key: &str, id: u64) -> String {
    match key {
        // Not JSON, but it still names its attempt: that one fails at once.
        "bad" => format!("{{\"status\":\"OK\",\"data\":[1,],\"id\":{id}}}"),
        // JSON, but no data (SPEC 2.3): not a well-formed answer either.
        "nodata" => format!("{{\"status\":\"OK\",\"id\":{id}}}"),
        // Names no attempt at all: that one meets its deadline.
        "junk" => "junk".to_owned(),
        _ => format!("{{\"status\":\"OK\",\"data\":{{\"key\":\"{key}\"}},\"id\":{id}}}"),
    }
}

#[test]
fn garbage_fails_only_the_attempt_it_was_for_never_the_rest_of_its_connection() {
    let (proxy, get_conns) = fake_mux_proxy(garbling);
    let mut config = balancer::BalancerConfig::new(&[proxy]);
    config.retries = 0; // so that a lost attempt shows as PROXY_UNREACHABLE
    config.request_timeout = Duration::from_millis(500);
    config.try_timeout = Duration::from_millis(500);
    config.fall = 100; // this test is not about health
    let balancer = RunningServer::start(balancer::bind(config).unwrap());
    let addr = balancer.addr();
    wait_probed(addr, &[proxy]);
    let keys = ["good/1", "bad", "nodata", "good/2", "junk", "good/3"];
    // Pipelined on one client connection: all go up the same multiplexed connection at once.
    let mut c = LineClient::connect(addr).unwrap();
    let t = Instant::now();
    let requests: String =
        keys.iter().map(|k| format!("{{\"op\":\"get\",\"key\":\"{k}\",\"id\":\"{k}\"}}\n")).collect();
    c.send_raw(requests.as_bytes()).unwrap();
    let mut answers = std::collections::HashMap::new();
    for _ in keys {
        let answer = c.recv().unwrap();
        answers.insert(answer["id"].as_str().unwrap().to_owned(), (answer, t.elapsed()));
    }
    for key in ["good/1", "good/2", "good/3"] {
        let (answer, _) = &answers[key];
        assert_eq!((answer["status"].as_str(), answer["data"]["key"].as_str()), (Some("OK"), Some(key)), "{answer}");
    }
    for key in ["bad", "nodata"] {
        let (answer, took) = &answers[key];
        assert_eq!(answer["status"], "PROXY_UNREACHABLE", "{answer}");
        assert!(*took < Duration::from_millis(400), "{key} waited for its deadline: {took:?}");
    }
    let (junk, took) = &answers["junk"];
    assert_eq!(junk["status"], "PROXY_UNREACHABLE", "{junk}");
    assert!(*took >= Duration::from_millis(450), "junk: {took:?}");
    assert_eq!(get_conns.load(Ordering::SeqCst), 1, "the GETs' connection was never torn down");
    let m = metrics(addr).unwrap();
    assert_eq!(m["proxies"][proxy.to_string()]["healthy"], true, "{m}");
}
