//! The `client` CLI and the bench library against real in-process services.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use client::bench::{self, BenchConfig, Dist};
use serde_json::Value;
use testkit::{refused_addr, RunningServer};

const CLIENT: &str = env!("CARGO_BIN_EXE_client");

fn cluster() -> (RunningServer, RunningServer) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut config = origin::OriginConfig::new(data);
    config.synthetic = Some(origin::Synthetic { count: 100, value_bytes: 100 });
    let origin = RunningServer::start(origin::bind(config).unwrap());
    let mut proxy_config = proxy::ProxyConfig::new(origin.addr());
    proxy_config.cache.policy = proxy::Policy::Lru;
    let proxy = RunningServer::start(proxy::bind(proxy_config).unwrap());
    (origin, proxy)
}

fn run_client(port: u16, args: &[&str]) -> (Option<i32>, Value) {
    let out = Command::new(CLIENT).arg("--port").arg(port.to_string()).args(args).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\n  \""), "not pretty-printed: {text}");
    (out.status.code(), serde_json::from_str(&text).unwrap())
}

#[test]
fn the_cli_prints_the_answer_with_latency_and_exits_zero_only_on_ok() {
    let (_origin, proxy) = cluster();
    let port = proxy.addr().port();
    let (code, miss) = run_client(port, &["--get", "article/1"]);
    assert_eq!((code, miss["status"].as_str(), miss["cache_hit"].as_bool()), (Some(0), Some("OK"), Some(false)));
    assert!(miss["latency_ms"].as_f64().unwrap() > 0.0);
    let (_, hit) = run_client(port, &["--get", "article/1"]);
    assert_eq!(hit["cache_hit"], true);
    let (code, missing) = run_client(port, &["--get", "article/404"]);
    assert_eq!((code, missing["status"].as_str()), (Some(1), Some("NOT_FOUND")));
    let (code, bad) = run_client(port, &["--get", "../etc/passwd"]);
    assert_eq!((code, bad["status"].as_str()), (Some(1), Some("BAD_REQUEST")));
    let (code, metrics) = run_client(port, &["--metrics"]);
    assert_eq!((code, metrics["data"]["role"].as_str()), (Some(0), Some("proxy")));
    let (code, health) = run_client(port, &["--health"]);
    assert_eq!((code, health["data"]["role"].as_str()), (Some(0), Some("proxy")));
    let (code, purge) = run_client(port, &["--purge", "article/1"]);
    assert_eq!((code, purge["data"]["purged"].as_bool()), (Some(0), Some(true)));
}

#[test]
fn a_refused_connection_is_a_client_connection_error() {
    let (code, answer) = run_client(refused_addr().port(), &["--get", "article/1", "--timeout-ms", "500"]);
    assert_ne!(code, Some(0));
    assert_eq!(answer["status"], "CLIENT_CONNECTION_ERROR");
    assert!(answer["data"].as_str().unwrap().contains("refused"), "{answer}");
}

/// A closed stdout (`client --get k | head -0`) is reported and exits 1, not a panic (101).
#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    let (_origin, proxy) = cluster();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(CLIENT)
        .args(["--port", &proxy.addr().port().to_string(), "--get", "article/1"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("client: stdout:") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_cli_refuses_to_guess_what_to_do() {
    // A listening service that counts what it is sent: a refusal must send nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let out = Command::new(CLIENT).args(["--port", &port]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no action: a usage error, not a connection error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("say what to do"));
    let out = Command::new(CLIENT).args(["--port", &port, "--get", "a", "--metrics"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "two actions at once must be rejected as usage");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "a refused command line connected anyway");
}

/// Defect 10 (SPEC 3.8): a key with a control character once smuggled a second request
/// (`--get $'article/1\nPURGE article/1'` purged the key and exited 0).
#[test]
fn a_key_with_a_control_character_is_refused_and_nothing_is_sent() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    for args in [["--get", "article/1\nPURGE article/1"], ["--purge", "a\rb"], ["--get", "a\u{7f}"], ["--get", "a\tb"]]
    {
        let out = Command::new(CLIENT).args(["--port", &port]).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("control character"), "{args:?}");
    }
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "a refused key was sent");
}

#[test]
fn bench_counts_every_request_and_reports_hits_and_nodes() {
    let (_origin, proxy) = cluster();
    let config = BenchConfig {
        addr: proxy.addr(),
        connections: 4,
        duration: Duration::from_secs(60),
        requests: Some(3000),
        keys: 50,
        key_prefix: "synthetic/".into(),
        dist: Dist::Zipf(0.99),
        pipeline: 4,
        warmup: Duration::ZERO,
        seed: 7,
        progress: false,
        simulate_lru: Some(20),
        wire: bench::Wire::Line,
    };
    let report = bench::run(&config).unwrap();
    assert_eq!(report.requests, 3000);
    assert_eq!(report.statuses.get("OK"), Some(&3000));
    assert_eq!(report.errors, 0);
    // 50 keys: a key misses until its first fetch is cached (concurrent misses on it, from
    // other connections or deeper in a pipeline, miss too); nearly everything else hits.
    let ratio = report.hit_ratio.unwrap();
    assert!((0.9..1.0).contains(&ratio), "{report:?}");
    assert_eq!(report.per_node.get(&proxy.addr().port().to_string()), Some(&3000));
    assert!(report.latency_us.p50 > 0 && report.latency_us.max >= report.latency_us.p99);
    // 50 keys in an LRU of 20 entries, under the same Zipf sequence: some hits, some misses.
    let sim = report.simulated_lru.as_ref().unwrap();
    assert_eq!(sim.capacity, 20);
    assert!((0.3..0.95).contains(&sim.hit_ratio), "{sim:?}");
    let text = bench::summary(&report);
    assert!(text.contains("throughput") && text.contains("p99.9") && text.contains("hit ratio"), "{text}");
}

#[test]
fn bench_json_output_is_one_object_with_the_summary_fields() {
    let (_origin, proxy) = cluster();
    let out = Command::new(CLIENT)
        .args(["--port", &proxy.addr().port().to_string(), "bench", "--connections", "2", "--requests", "500"])
        .args(["--keys", "20", "--dist", "zipf", "--warmup", "0", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["requests"], 500);
    for field in ["throughput_rps", "latency_us", "statuses", "errors", "hit_ratio", "per_node"] {
        assert!(!report[field].is_null(), "missing {field}: {report}");
    }
    for field in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_us"][field].is_u64(), "{report}");
    }
}

#[test]
fn a_service_that_never_answers_is_a_client_connection_error_after_the_timeout() {
    let silent = testkit::FakeServer::start(testkit::FakeBehavior::Silent).unwrap();
    let started = std::time::Instant::now();
    let (code, answer) = run_client(silent.addr().port(), &["--get", "article/1", "--timeout-ms", "300"]);
    assert_ne!(code, Some(0));
    assert_eq!(answer["status"], "CLIENT_CONNECTION_ERROR", "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(answer["latency_ms"].as_f64().unwrap() >= 290.0, "{answer}");
}
