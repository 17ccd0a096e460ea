//! The real `balancer` binary: its flags, and start-up errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use testkit::{metrics, ChildService, LineClient, RunningServer};

const BALANCER: &str = env!("CARGO_BIN_EXE_balancer");

fn proxy() -> (RunningServer, RunningServer) {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let origin = RunningServer::start(origin::bind(origin::OriginConfig::new(data)).unwrap());
    let proxy = RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin.addr())).unwrap());
    (origin, proxy)
}

#[test]
fn strategies_in_both_spellings_and_proxies_in_one_flag() {
    let (_o1, p1) = proxy();
    let (_o2, p2) = proxy();
    let (a, b) = (p1.addr().to_string(), p2.addr().to_string());
    for (spelling, reported) in [
        ("round_robin", "round_robin"),
        ("round-robin", "round_robin"),
        ("least_loaded", "least_loaded"),
        ("least-loaded", "least_loaded"),
        ("consistent_hash", "consistent_hash"),
        ("consistent-hash", "consistent_hash"),
    ] {
        let balancer = ChildService::spawn(
            BALANCER,
            &[
                "--port",
                "0",
                "--proxies",
                &a,
                &b,
                "--strategy",
                spelling,
                "--hash-load-factor",
                "1.5",
                "--log-level",
                "warn",
            ],
        )
        .unwrap();
        let m = metrics(balancer.addr()).unwrap();
        assert_eq!(m["strategy"], reported);
        assert_eq!(m["proxies"].as_object().unwrap().len(), 2);
    }
}

#[test]
fn every_documented_flag_is_accepted() {
    let (_o, p) = proxy();
    let proxy = p.addr().to_string();
    let balancer = ChildService::spawn(
        BALANCER,
        &[
            "--port",
            "0",
            "--proxies",
            &proxy,
            "--strategy",
            "least_loaded",
            "--health-interval-ms",
            "500",
            "--health-timeout-ms",
            "200",
            "--fall",
            "2",
            "--rise",
            "1",
            "--metrics-interval-ms",
            "700",
            "--retries",
            "1",
            "--request-timeout-ms",
            "2000",
            "--try-timeout-ms",
            "900",
            "--hash-load-factor",
            "1.25",
            "--max-pending",
            "100",
            "--max-connections",
            "5",
            "--idle-timeout-ms",
            "400",
            "--max-line",
            "2048",
            "--host",
            "127.0.0.1",
        ],
    )
    .unwrap();
    let addr = balancer.addr();
    let m = metrics(addr).unwrap();
    assert_eq!((m["role"].as_str(), m["strategy"].as_str()), (Some("balancer"), Some("least_loaded")));
    assert!(m["proxies"].get(&proxy).is_some(), "{m}");
    // --max-line 2048: a line of 2048 bytes is a request, one of 2049 is too long.
    let mut c = LineClient::connect(addr).unwrap();
    let at_limit = format!("HEALTH{}", " ".repeat(2048 - 6));
    assert_eq!(c.request(&at_limit).unwrap()["status"], "OK");
    c.send_raw(format!("HEALTH{}\n", " ".repeat(2049 - 6)).as_bytes()).unwrap();
    assert_eq!(c.recv().unwrap()["status"], "BAD_REQUEST");
    assert!(c.is_closed_by_peer());
    // --idle-timeout-ms 400: a silent connection is closed, not at once but well within 5 s.
    let started = std::time::Instant::now();
    let mut idle = LineClient::connect(addr).unwrap();
    assert!(idle.is_closed_by_peer());
    assert!(started.elapsed() >= std::time::Duration::from_millis(300), "closed after {:?}", started.elapsed());
    // --max-connections 5: five are served, the sixth gets OVERLOADED and is closed.
    let mut held: Vec<LineClient> = (0..5).map(|_| LineClient::connect(addr).unwrap()).collect();
    for c in &mut held {
        assert_eq!(c.request("HEALTH").unwrap()["status"], "OK");
    }
    let mut sixth = LineClient::connect(addr).unwrap();
    assert_eq!(sixth.recv().unwrap()["status"], "OVERLOADED");
}

#[test]
fn more_proxies_than_the_balancer_can_track_are_refused_by_the_library_too() {
    let many: Vec<std::net::SocketAddr> =
        (0..129).map(|i| std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + i))).collect();
    assert!(balancer::bind(balancer::BalancerConfig::new(&many)).is_err());
    assert!(balancer::bind(balancer::BalancerConfig::new(&[])).is_err());
}

#[test]
fn bad_flags_are_errors_at_start_up() {
    for args in [
        &["--port", "0"][..],
        &["--port", "0", "--proxies", "127.0.0.1:1", "--strategy", "random"],
        &["--port", "0", "--proxies", "no-such-host.invalid:1"],
        &["--port", "0", "--proxies", "127.0.0.1"],
        &["--port", "0", "--proxies", "127.0.0.1:1", "--hash-load-factor", "0.5"],
        &["--port", "0", "--proxies", "127.0.0.1:1", "--fall", "0"],
    ] {
        let out = Command::new(BALANCER).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
}

/// SPEC 3.8: numeric flags too large to represent are start-up errors naming the flag, never
/// a panic (`--retries 4294967295` once divided by zero at start-up) or a wrap.
#[test]
fn numeric_flags_out_of_range_are_errors_naming_the_flag() {
    for (flag, value) in [
        ("--retries", "4294967295"),
        ("--request-timeout-ms", "18446744073709551615"),
        ("--try-timeout-ms", "18446744073709551615"),
        ("--health-interval-ms", "0"),
        ("--max-pending", "99999999999999999999"),
        ("--idle-timeout-ms", "18446744073709551615"),
        ("--max-connections", "0"),
    ] {
        let out = Command::new(BALANCER)
            .args(["--port", "0", "--proxies", "127.0.0.1:1", &format!("{flag}={value}")])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flag} {value}: {stderr}");
    }
}

#[test]
fn sigterm_answers_the_requests_in_flight_upstream_then_exits_zero() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut origin_config = origin::OriginConfig::new(data);
    origin_config.latency = std::time::Duration::from_millis(500);
    let origin = RunningServer::start(origin::bind(origin_config).unwrap());
    let proxy = RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin.addr())).unwrap());
    let upstream = proxy.addr().to_string();
    let mut balancer =
        ChildService::spawn(BALANCER, &["--port", "0", "--proxies", &upstream, "--log-level", "warn"]).unwrap();
    let addr = balancer.addr();
    let mut c = testkit::LineClient::connect(addr).unwrap();
    c.send("GET article/3").unwrap();
    assert!(testkit::wait_until(std::time::Duration::from_secs(5), || metrics(addr).unwrap()["in_flight"] == 1));
    balancer.signal("TERM").unwrap();
    let answer = c.recv().unwrap();
    assert_eq!((answer["status"].as_str(), &answer["data"]["id"]), (Some("OK"), &serde_json::json!(3)));
    assert_eq!(balancer.wait_exit(std::time::Duration::from_secs(5)).unwrap(), Some(0));
}
