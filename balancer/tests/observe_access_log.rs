//! `--access-log` on real binaries (SPEC 6): one JSON line per answered request, buffered
//! but written within a second and at exit, reopened on SIGUSR1, an unwritable path refused at
//! start-up, failed writes counted and never fatal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod observe;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use observe::{data_dir, scratch, Child2};
use serde_json::Value;
use testkit::{metrics, wait_until, workspace_bin, LineClient};

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn origin() -> Child2 {
    Child2::spawn("origin", &["--port", "0", "--data-dir", &data_dir(), "--log-level", "warn"]).unwrap()
}

#[test]
fn every_answer_is_a_line_written_within_a_second() {
    let dir = scratch("access-log");
    let log = dir.join("proxy.log");
    let origin = origin();
    let port = origin.addr.port().to_string();
    let proxy = Child2::spawn(
        "proxy",
        &["--port", "0", "--origin-port", &port, "--access-log", log.to_str().unwrap(), "--log-level", "warn"],
    )
    .unwrap();
    let mut client = LineClient::connect(proxy.addr).unwrap();
    client.request("GET article/1").unwrap();
    client.request("GET article/1").unwrap();
    client.request(r#"{"op":"get","key":"article/404","id":"x1"}"#).unwrap();
    client.request("GET bad key here").unwrap();
    client.request("HEALTH").unwrap();
    assert!(wait_until(Duration::from_secs(3), || lines(&log).len() == 5), "{:?}", lines(&log));
    let l = lines(&log);
    assert_eq!(l[0]["op"], "get");
    assert_eq!(l[0]["key"], "article/1");
    assert_eq!(l[0]["status"], "OK");
    assert_eq!(l[0]["cache_hit"], false);
    assert_eq!(l[1]["cache_hit"], true);
    assert_eq!(l[1]["node"], proxy.addr.port());
    let from: std::net::SocketAddr = l[0]["client"].as_str().unwrap().parse().unwrap();
    assert!(from.ip().is_loopback() && from.port() != proxy.addr.port());
    assert!(l.iter().all(|line| line["client"] == l[0]["client"]), "one connection, one client");
    assert_eq!(l[2]["status"], "NOT_FOUND");
    assert_eq!(l[2]["id"], "x1");
    assert_eq!(l[3]["status"], "BAD_REQUEST");
    assert_eq!(l[4]["op"], "health");
    for line in &l {
        let ts = line["ts"].as_str().unwrap();
        assert!(ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
        assert!(line["latency_us"].is_u64());
    }
}

#[test]
fn sigusr1_reopens_and_exit_flushes() {
    let dir = scratch("access-log-rotate");
    let log = dir.join("balancer-side.log");
    let rotated = dir.join("balancer-side.log.1");
    let mut origin = Child2::spawn(
        "origin",
        &["--port", "0", "--data-dir", &data_dir(), "--access-log", log.to_str().unwrap(), "--log-level", "warn"],
    )
    .unwrap();
    let mut client = LineClient::connect(origin.addr).unwrap();
    client.request("GET article/1").unwrap();
    assert!(wait_until(Duration::from_secs(3), || lines(&log).len() == 1));
    std::fs::rename(&log, &rotated).unwrap();
    origin.signal("USR1");
    // The reopen happens on the loop; a request after it lands in the new file.
    assert!(wait_until(Duration::from_secs(3), || log.exists()), "not reopened");
    client.request("GET article/2").unwrap();
    // SIGTERM: the buffered line is written at exit, without waiting for the tick.
    origin.signal("TERM");
    let status = origin.child().wait().unwrap();
    assert!(status.success());
    assert_eq!(lines(&rotated).len(), 1);
    let new = lines(&log);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0]["key"], "article/2");
}

#[test]
fn unwritable_path_is_refused_at_start_up() {
    let out = Command::new(workspace_bin("origin").unwrap())
        .args(["--port", "0", "--data-dir", &data_dir(), "--access-log", "/nonexistent-dir/sub/access.log"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--access-log") && stderr.contains("/nonexistent-dir"), "{stderr}");
}

#[test]
fn failed_writes_are_counted_and_serving_goes_on() {
    let origin = Child2::spawn(
        "origin",
        &["--port", "0", "--data-dir", &data_dir(), "--access-log", "/dev/full", "--log-level", "error"],
    )
    .unwrap();
    let mut client = LineClient::connect(origin.addr).unwrap();
    for _ in 0..10 {
        assert_eq!(client.request("GET article/1").unwrap()["status"], "OK");
    }
    assert!(
        wait_until(Duration::from_secs(5), || metrics(origin.addr).unwrap()["access_log_dropped"].as_u64() >= Some(10)),
        "{}",
        metrics(origin.addr).unwrap()
    );
    assert_eq!(client.request("GET article/2").unwrap()["status"], "OK");
}

#[test]
fn dash_means_stderr() {
    let program = workspace_bin("origin").unwrap();
    let dir = scratch("access-log-stderr");
    let stderr_path = dir.join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let origin = Child2::spawn_path(
        &program,
        &["--port", "0", "--data-dir", &data_dir(), "--access-log", "-", "--log-level", "warn"],
        Stdio::from(stderr),
    )
    .unwrap();
    LineClient::connect(origin.addr).unwrap().request("GET article/3").unwrap();
    assert!(wait_until(Duration::from_secs(3), || lines(&stderr_path).iter().any(|l| l["key"] == "article/3")));
}
