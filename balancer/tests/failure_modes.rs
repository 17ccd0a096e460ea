//! Regression tests for the balancer's failure handling (issue 10, SPEC 3.5, 3.6, 3.8), over
//! real loopback sockets: real origin and proxies where they can show the behaviour, small
//! fake proxies where a real one cannot misbehave.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use balancer::BalancerConfig;
use serde_json::Value;
use testkit::{metrics, wait_until, workspace_bin, ChildService, FakeBehavior, FakeServer, LineClient, RunningServer};

fn start_origin(latency: Duration) -> RunningServer {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut config = origin::OriginConfig::new(data);
    config.latency = latency;
    config.synthetic = Some(origin::Synthetic { count: 100_000, value_bytes: 100 });
    RunningServer::start(origin::bind(config).unwrap())
}

fn start_proxy(origin: SocketAddr, tweak: impl FnOnce(&mut proxy::ProxyConfig)) -> RunningServer {
    let mut config = proxy::ProxyConfig::new(origin);
    config.cache.policy = proxy::Policy::Lru;
    tweak(&mut config);
    RunningServer::start(proxy::bind(config).unwrap())
}

fn start_balancer(proxies: &[SocketAddr], tweak: impl FnOnce(&mut BalancerConfig)) -> RunningServer {
    let mut config = BalancerConfig::new(proxies);
    tweak(&mut config);
    RunningServer::start(balancer::bind(config).unwrap())
}

/// Waits until the balancer's first probes have found out which proxies multiplex.
fn wait_probed(balancer: SocketAddr, proxies: &[SocketAddr], multiplexed: bool) {
    assert!(wait_until(Duration::from_secs(5), || {
        let m = metrics(balancer).unwrap();
        proxies.iter().all(|p| m["proxies"][p.to_string()]["multiplexed"] == multiplexed)
    }));
}

#[test]
fn a_slow_origin_is_answered_ok_once_per_key_without_retries_or_failures() {
    // 1.5 s, under the proxies' 2 s origin timeout: slow, not dead (SPEC 3.6).
    let origin = start_origin(Duration::from_millis(1500));
    let proxies: Vec<RunningServer> = (0..3).map(|_| start_proxy(origin.addr(), |_| {})).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
    let balancer = start_balancer(&addrs, |_| {}); // the defaults
    let addr = balancer.addr();
    wait_probed(addr, &addrs, true);
    let keys = 12;
    let workers: Vec<_> = (0..keys)
        .map(|k| {
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                let t = Instant::now();
                let answer = c.request(&format!("GET synthetic/{k}")).unwrap();
                (answer, t.elapsed())
            })
        })
        .collect();
    let results: Vec<(Value, Duration)> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let latencies: Vec<u128> = results.iter().map(|(_, t)| t.as_millis()).collect();
    eprintln!("slow origin: latencies {latencies:?} ms");
    for (answer, took) in &results {
        assert_eq!(answer["status"], "OK", "{answer}");
        assert!(*took >= Duration::from_millis(1450) && *took < Duration::from_millis(2900), "took {took:?}");
    }
    let fetches = metrics(origin.addr()).unwrap()["ok"].as_u64().unwrap();
    eprintln!("slow origin: {fetches} origin fetches for {keys} keys");
    assert_eq!(fetches, keys, "one origin fetch per key");
    let m = metrics(addr).unwrap();
    assert_eq!((m["retries"].as_u64(), m["errors"].as_u64()), (Some(0), Some(0)), "{m}");
    for p in &addrs {
        let p = &m["proxies"][p.to_string()];
        assert_eq!((p["healthy"].as_bool(), p["failures"].as_u64()), (Some(true), Some(0)), "{m}");
    }
}

/// A proxy that answers HEALTH as a multiplexing proxy would, and each GET tagged N with
/// forged answers for the 20 ids before N — ids it was never sent, or already answered —
/// then its own answer for N.
fn forging_proxy() -> SocketAddr {
    fake_proxy(|line, out| {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        let (Some(id), Some(key)) = (v["id"].as_u64(), v["key"].as_str()) else { return };
        for other in id.saturating_sub(20)..id {
            let _ = writeln!(out, r#"{{"status":"OK","data":"FORGED","cache_hit":true,"node":1,"id":{other}}}"#);
        }
        let _ = writeln!(out, r#"{{"status":"OK","data":{{"key":"{key}","from":"forger"}},"id":{id}}}"#);
    })
}

/// A fake proxy on a thread per connection: HEALTH and METRICS get proper answers (so the
/// balancer multiplexes to it), every other line goes to `answer`.
fn fake_proxy(answer: impl Fn(&str, &mut Vec<u8>) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let answer = answer.clone();
            thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let mut out = Vec::new();
                    match line.as_str() {
                        "HEALTH" => out.extend_from_slice(b"{\"status\":\"OK\",\"data\":{\"role\":\"proxy\"}}\n"),
                        "METRICS" => out.extend_from_slice(b"{\"status\":\"OK\",\"data\":{\"role\":\"proxy\"}}\n"),
                        _ => answer(&line, &mut out),
                    }
                    if writer.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn answers_for_ids_a_proxy_was_never_sent_are_dropped() {
    let origin = start_origin(Duration::ZERO);
    let good = start_proxy(origin.addr(), |_| {});
    let forger = forging_proxy();
    let addrs = [good.addr(), forger];
    let balancer = start_balancer(&addrs, |c| c.request_timeout = Duration::from_millis(300));
    wait_probed(balancer.addr(), &addrs, true);
    let addr = balancer.addr();
    let workers: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                (0..25)
                    .map(|i| {
                        c.request(&format!("{{\"op\":\"get\",\"key\":\"synthetic/{}\",\"id\":{i}}}", t * 25 + i))
                            .unwrap()
                    })
                    .collect::<Vec<Value>>()
            })
        })
        .collect();
    for (t, w) in workers.into_iter().enumerate() {
        for (i, answer) in w.join().unwrap().into_iter().enumerate() {
            assert_ne!(answer["data"], "FORGED", "{answer}");
            assert_eq!(answer["status"], "OK", "{answer}");
            assert_eq!(answer["data"]["key"], format!("synthetic/{}", t * 25 + i), "{answer}");
            assert_eq!(answer["id"], i, "{answer}");
        }
    }
}

#[test]
fn hits_are_answered_at_once_behind_1200_queued_misses() {
    let origin = start_origin(Duration::from_millis(1000));
    let proxy = start_proxy(origin.addr(), |c| c.origin_max_inflight = 8);
    let balancer = start_balancer(&[proxy.addr()], |_| {});
    let addr = balancer.addr();
    wait_probed(addr, &[proxy.addr()], true);
    // Cached first.
    assert_eq!(LineClient::connect(addr).unwrap().request("GET synthetic/0").unwrap()["status"], "OK");
    // 1,200 distinct misses, queued behind an origin that takes 8 at a time for 1 s each;
    // on 80 client connections (a fresh connection forwards 16 at once: its forwarding
    // window, SPEC 3.8).
    let mut loaders: Vec<LineClient> = (0..80).map(|_| LineClient::connect(addr).unwrap()).collect();
    for (n, c) in loaders.iter_mut().enumerate() {
        let batch: String = (0..15)
            .map(|i| format!("{{\"op\":\"get\",\"key\":\"synthetic/{}\",\"id\":{i}}}\n", 1 + n * 15 + i))
            .collect();
        c.send_raw(batch.as_bytes()).unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || metrics(addr).unwrap()["in_flight"].as_u64() >= Some(1200)));
    let mut direct = LineClient::connect(proxy.addr()).unwrap();
    let mut through = LineClient::connect(addr).unwrap();
    for _ in 0..5 {
        let t = Instant::now();
        let straight = direct.request("GET synthetic/0").unwrap();
        let straight_took = t.elapsed();
        let t = Instant::now();
        let answer = through.request("GET synthetic/0").unwrap();
        let took = t.elapsed();
        eprintln!("hit behind 1,200 misses: {took:?} through the balancer, {straight_took:?} straight");
        assert_eq!((answer["status"].as_str(), answer["cache_hit"].as_bool()), (Some("OK"), Some(true)), "{answer}");
        assert_eq!(straight["cache_hit"], true);
        assert!(took < Duration::from_millis(250), "a hit took {took:?} behind queued misses");
    }
    let m = metrics(addr).unwrap();
    let p = &m["proxies"][proxy.addr().to_string()];
    assert_eq!(p["healthy"], true, "{m}");
    let conns = p["connections"].as_u64().unwrap();
    assert!((5..=balancer::pool::MAX_MUX as u64).contains(&conns), "{conns} multiplexed connections");
}

#[test]
fn a_proxy_that_closes_after_each_answer_works_with_no_retries() {
    let answer = r#"{"status":"OK","data":{"from":"fake"}}"#;
    // One answers once per connection then closes; the other keeps a connection for one
    // answer and closes it only when it is reused: the balancer finds it closed.
    let one_shot = FakeServer::start(FakeBehavior::ReplyThenClose(answer.into())).unwrap();
    let drops_reused = FakeServer::start(FakeBehavior::ReplyFirstOnly(answer.into())).unwrap();
    let addrs = [one_shot.addr(), drops_reused.addr()];
    let balancer = start_balancer(&addrs, |c| c.retries = 0);
    wait_probed(balancer.addr(), &addrs, false);
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    for i in 0..200 {
        let a = c.request(&format!("{{\"op\":\"get\",\"key\":\"k/{i}\",\"id\":{i}}}")).unwrap();
        assert_eq!((a["status"].as_str(), a["id"].as_u64()), (Some("OK"), Some(i)), "GET {i}: {a}");
    }
    let m = metrics(balancer.addr()).unwrap();
    for p in addrs {
        let p = &m["proxies"][p.to_string()];
        assert_eq!((p["failures"].as_u64(), p["healthy"].as_bool()), (Some(0), Some(true)), "{m}");
    }
    assert_eq!((m["errors"].as_u64(), m["retries"].as_u64()), (Some(0), Some(0)), "{m}");
    assert!(m["reopened"].as_u64() > Some(0), "the reused connections were found closed: {m}");
}

#[test]
fn a_multiplexed_connection_the_proxy_closed_while_idle_is_reopened_without_failure() {
    let origin = start_origin(Duration::ZERO);
    let proxy = start_proxy(origin.addr(), |c| c.server.idle_timeout = Duration::from_millis(100));
    let balancer = start_balancer(&[proxy.addr()], |c| c.retries = 0);
    wait_probed(balancer.addr(), &[proxy.addr()], true);
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    for i in 0..6 {
        assert_eq!(c.request(&format!("GET synthetic/{i}")).unwrap()["status"], "OK");
        // Long enough for the proxy to close the balancer's idle connection.
        let before = metrics(proxy.addr()).unwrap()["connections"].as_u64().unwrap();
        assert!(wait_until(Duration::from_secs(2), || metrics(proxy.addr()).unwrap()["connections"].as_u64()
            < Some(before)));
    }
    let m = metrics(balancer.addr()).unwrap();
    assert_eq!(
        (m["errors"].as_u64(), m["proxies"][proxy.addr().to_string()]["failures"].as_u64()),
        (Some(0), Some(0)),
        "{m}"
    );
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_thousand_pipelined_purges_hold_a_bounded_number_of_descriptors() {
    let origin = start_origin(Duration::ZERO);
    let proxies: Vec<RunningServer> = (0..3).map(|_| start_proxy(origin.addr(), |_| {})).collect();
    let ports: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let bin = workspace_bin("balancer").unwrap();
    let mut args = vec!["--port", "0", "--log-level", "warn", "--proxies"];
    args.extend(ports.iter().map(String::as_str));
    let lb = ChildService::spawn(bin.to_str().unwrap(), &args).unwrap();
    assert_eq!(LineClient::connect(lb.addr()).unwrap().request("HEALTH").unwrap()["status"], "OK");
    let baseline = open_descriptors(lb.pid());
    let done = Arc::new(AtomicBool::new(false));
    let peak = {
        let (done, pid) = (done.clone(), lb.pid());
        thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::SeqCst) {
                peak = peak.max(open_descriptors(pid));
                thread::sleep(Duration::from_millis(1));
            }
            peak
        })
    };
    let mut c = LineClient::connect(lb.addr()).unwrap();
    let batch: String = (0..1000).map(|i| format!("PURGE synthetic/{i}\n")).collect();
    c.send_raw(batch.as_bytes()).unwrap();
    let answers: Vec<Value> = (0..1000).map(|_| c.recv().unwrap()).collect();
    done.store(true, Ordering::SeqCst);
    let peak = peak.join().unwrap();
    eprintln!("1,000 pipelined PURGEs: descriptors {baseline} -> peak {peak}");
    for a in &answers {
        assert_eq!(a["status"], "OK", "{a}");
        assert_eq!(a["data"]["proxies"], 3, "every OK reached every proxy: {a}");
    }
    // At most MAX_RUNNING fan-outs of one connection per proxy, plus probes and polls.
    let bound = baseline + balancer::purge::MAX_RUNNING * 3 + 16;
    assert!(peak <= bound, "peak {peak} descriptors, bound {bound}");
}

/// The answers the relay property is checked with, and what the scripted proxy sends.
type Script = Arc<Mutex<Vec<u8>>>;

mod relay_property {
    use super::*;
    use proptest::prelude::*;

    /// Client ids that must come back byte for byte.
    const IDS: [&str; 4] = ["123456789012345678901234567890", "1.10", "\"a\\\"b\\u00e9\"", "-7e2"];

    /// Lines a proxy might send for the GET tagged `{ID}`: mostly answers with the status and
    /// the tag anywhere among odd members, sometimes with the tag missing, doubled or wrong,
    /// sometimes raw bytes.
    fn answer_bytes() -> impl Strategy<Value = Vec<u8>> {
        let other = prop_oneof![
            Just("\"data\":1.10".to_string()),
            Just("\"data\":\"x\\\"y\\u00e9\"".to_string()),
            Just("\"node\":123456789012345678901234567890".to_string()),
            Just("\"data\":{\"id\":3,\"a\":[1,{}]}".to_string()),
            "\"[a-z]{1,3}\":[0-9a-z\\[\\]{}\",:]{0,8}",
        ];
        let structured = (prop::collection::vec(other, 0..4), any::<usize>(), any::<usize>(), 0u8..12, "[ x}]{0,1}")
            .prop_map(|(mut members, status_at, id_at, mutate, tail)| {
                members.insert(status_at % (members.len() + 1), "\"status\":\"OK\"".into());
                let id = match mutate {
                    0 => "\"id\":999999",
                    1 => "\"id\":\"{ID}\"",
                    _ => "\"id\":{ID}",
                };
                if mutate != 2 {
                    members.insert(id_at % (members.len() + 1), id.into());
                }
                if mutate == 3 {
                    members.push(id.into());
                }
                format!(" {{{}}}{tail}", members.join(" , ")).into_bytes()
            });
        prop_oneof![4 => structured, 1 => prop::collection::vec(any::<u8>(), 0..40)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn whatever_a_proxy_sends_the_client_gets_one_json_line_with_its_id(
            answer in answer_bytes(),
            which in 0usize..IDS.len(),
        ) {
            let (addr, script) = shared_balancer();
            *script.lock().unwrap() = answer.clone();
            let id = IDS[which];
            let mut c = LineClient::connect(addr).unwrap();
            c.send(&format!("{{\"op\":\"get\",\"key\":\"k\",\"id\":{id}}}")).unwrap();
            let line = c.recv_line().unwrap().expect("an answer line");
            let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            prop_assert!(value.is_object());
            prop_assert!(line.ends_with(&format!("\"id\":{id}}}\n")), "id not byte for byte: {line:?}");
            let status = value["status"].as_str().unwrap_or("");
            if status == "PROXY_UNREACHABLE" {
                return Ok(());
            }
            // Otherwise it is the proxy's answer, passed through.
            let sent = String::from_utf8_lossy(&answer).replace("{ID}", "");
            prop_assert!(sent.contains("\"status\""), "{line:?} from {sent:?}");
        }
    }

    /// One balancer (and scripted proxy) for all cases.
    fn shared_balancer() -> (SocketAddr, Script) {
        static SHARED: std::sync::OnceLock<(SocketAddr, Script)> = std::sync::OnceLock::new();
        SHARED
            .get_or_init(|| {
                let script: Script = Arc::new(Mutex::new(Vec::new()));
                let answer = script.clone();
                let proxy = fake_proxy(move |line, out| {
                    let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                    let tag = v["id"].as_u64().map(|n| n.to_string()).unwrap_or_default();
                    let template = answer.lock().unwrap().clone();
                    let text = String::from_utf8_lossy(&template).replace("{ID}", &tag);
                    // Raw bytes stay raw; only the placeholder is replaced.
                    let bytes = if std::str::from_utf8(&template).is_ok() { text.into_bytes() } else { template };
                    out.extend(bytes.into_iter().filter(|b| *b != b'\n'));
                    out.push(b'\n');
                });
                let mut config = BalancerConfig::new(&[proxy]);
                config.request_timeout = Duration::from_millis(150);
                config.try_timeout = Duration::from_millis(150);
                config.retries = 1;
                let server = RunningServer::start(balancer::bind(config).unwrap());
                let addr = server.addr();
                wait_probed(addr, &[proxy], true);
                std::mem::forget(server); // lives for the whole test binary
                (addr, script)
            })
            .clone()
    }
}

#[test]
fn the_collapse_flag_takes_on_or_off() {
    let origin = start_origin(Duration::ZERO);
    let proxy = start_proxy(origin.addr(), |_| {});
    let bin = workspace_bin("balancer").unwrap();
    let proxy_addr = proxy.addr().to_string();
    for value in ["on", "off"] {
        let args = ["--port", "0", "--collapse", value, "--try-timeout-ms", "500", "--proxies", &proxy_addr];
        let lb = ChildService::spawn(bin.to_str().unwrap(), &args).unwrap();
        assert_eq!(LineClient::connect(lb.addr()).unwrap().request("GET synthetic/1").unwrap()["status"], "OK");
    }
    let status = std::process::Command::new(&bin)
        .args(["--collapse", "maybe", "--proxies", &proxy_addr])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
}
