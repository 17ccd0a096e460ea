//! The real `proxy` binary: flags, the snake_case aliases, and start-up errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::{metrics, ChildService, LineClient};

const PROXY: &str = env!("CARGO_BIN_EXE_proxy");

fn origin() -> testkit::RunningServer {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    testkit::RunningServer::start(origin::bind(origin::OriginConfig::new(data)).unwrap())
}

#[test]
fn the_snake_case_aliases_of_the_original_implementation_work() {
    let origin = origin();
    let port = origin.addr().port().to_string();
    let mut proxy = ChildService::spawn(
        PROXY,
        &[
            "--port",
            "0",
            "--origin_host",
            "127.0.0.1",
            "--origin_port",
            &port,
            "--cache_type",
            "lru",
            "--lru_capacity",
            "7",
        ],
    )
    .unwrap();
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    assert_eq!(c.request("GET article/1").unwrap()["cache_hit"], false);
    let hit = c.request("GET article/1").unwrap();
    assert_eq!((hit["cache_hit"].as_bool(), hit["node"].as_u64()), (Some(true), Some(u64::from(proxy.addr().port()))));
    let m = metrics(proxy.addr()).unwrap();
    assert_eq!((m["cache_type"].as_str(), m["capacity"].as_u64()), (Some("lru"), Some(7)));
    proxy.signal("TERM").unwrap();
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)).unwrap(), Some(0));
}

#[test]
fn kebab_case_flags_with_fractional_seconds() {
    let origin = origin();
    let port = origin.addr().port().to_string();
    let proxy = ChildService::spawn(
        PROXY,
        &[
            "--port",
            "0",
            "--origin-port",
            &port,
            "--cache-type",
            "ttl",
            "--ttl",
            "0.5",
            "--capacity",
            "3",
            "--max-bytes",
            "100000",
            "--negative-ttl",
            "1.5",
            "--stale-if-error",
            "2",
            "--sweep-interval-ms",
            "100",
            "--origin-timeout-ms",
            "500",
            "--origin-max-inflight",
            "4",
            "--max-pending",
            "50",
            "--max-connections",
            "20",
            "--idle-timeout-ms",
            "5000",
            "--max-line",
            "4096",
            "--log-level",
            "warn",
        ],
    )
    .unwrap();
    let m = metrics(proxy.addr()).unwrap();
    assert_eq!(
        (m["cache_type"].as_str(), m["capacity"].as_u64(), m["max_bytes"].as_u64()),
        (Some("ttl"), Some(3), Some(100000))
    );
    // --ttl 0.5 takes effect: a hit at once, a miss once half a second has passed (and not
    // before 0.4 s: the fraction was not rounded down to zero).
    let mut c = LineClient::connect(proxy.addr()).unwrap();
    let stored = std::time::Instant::now();
    assert_eq!(c.request("GET article/1").unwrap()["cache_hit"], false);
    let mut hit_until = Duration::ZERO;
    assert!(testkit::wait_until(Duration::from_secs(5), || {
        let hit = c.request("GET article/1").unwrap()["cache_hit"] == true;
        if hit {
            hit_until = stored.elapsed();
        }
        !hit
    }));
    let expired_after = stored.elapsed();
    assert!(hit_until < Duration::from_millis(600), "still a hit after {hit_until:?}");
    assert!(expired_after >= Duration::from_millis(400), "expired after only {expired_after:?}");
}

#[test]
fn bad_flags_are_errors_at_start_up() {
    for args in [
        &["--origin-port", "8000"][..], // --port is required
        &["--port", "0", "--cache-type", "fifo"],
        &["--port", "0", "--ttl", "-1"],
        &["--port", "0", "--frobnicate"],
        &["--port", "0", "--origin-max-inflight", "0"],
    ] {
        let out = Command::new(PROXY).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
}
