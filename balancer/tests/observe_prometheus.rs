//! `/metrics` checked by the real thing (SPEC 6): `promtool check metrics` on each tier's
//! exposition, and a Prometheus server that scrapes all three tiers and answers queries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod observe;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use observe::{cluster, get, scratch, tool_or_skip, Child2};
use serde_json::Value;
use testkit::{free_port, wait_until, LineClient};

fn promtool_check(exposition: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_every_tier() {
    if !tool_or_skip("promtool") {
        return;
    }
    let c = cluster(3);
    let mut client = LineClient::connect(c.balancer.addr()).unwrap();
    for i in 0..30 {
        client.request(&format!("GET article/{}", i % 5)).unwrap();
    }
    client.request("BOGUS").unwrap();
    // The balancer lists its proxies once it has polled them.
    assert!(wait_until(Duration::from_secs(10), || get(c.balancer.admin, "/metrics")
        .text()
        .contains("cachetier_cluster_hits_total")));
    for (tier, admin) in [("origin", c.origin.admin), ("proxy", c.proxies[0].admin), ("balancer", c.balancer.admin)] {
        let exposition = get(admin, "/metrics").text();
        let (ok, report) = promtool_check(&exposition);
        assert!(ok, "promtool rejects the {tier}'s exposition: {report}\n{exposition}");
        assert!(report.trim().is_empty(), "promtool lint for the {tier}: {report}");
    }
    // And it would notice a broken one (a counter without _total, a family without HELP).
    let (ok, _) = promtool_check("# TYPE cachetier_requests counter\ncachetier_requests 1\n");
    assert!(!ok, "promtool accepted a broken exposition: the check proves nothing");
}

/// A Prometheus server as a child process, stopped (by PID) when dropped.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[(&str, SocketAddr)]) -> Prometheus {
        let dir = scratch("prometheus");
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n");
        for (job, addr) in targets {
            config += &format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n");
        }
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .args(["--log.level=warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Prometheus { child, addr }
    }

    fn api(&self, path: &str) -> Option<Value> {
        let answer = observe::http(self.addr, "GET", path).ok()?;
        let value: Value = serde_json::from_slice(&answer.body).ok()?;
        (value["status"] == "success").then(|| value["data"].clone())
    }

    fn query(&self, query: &str) -> Option<Value> {
        let encoded: String = query
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        self.api(&format!("/api/v1/query?query={encoded}"))
    }

    /// The value of the single series `query` selects, if there is exactly one.
    fn scalar(&self, query: &str) -> Option<f64> {
        let data = self.query(query)?;
        let result = data["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_all_three_tiers() {
    if !tool_or_skip("prometheus") {
        return;
    }
    let c = cluster(2);
    // Known traffic at one proxy: 1 miss, then 4 hits.
    let mut client = LineClient::connect(c.proxies[0].addr()).unwrap();
    for _ in 0..5 {
        assert_eq!(client.request("GET article/2").unwrap()["status"], "OK");
    }
    let prometheus =
        Prometheus::start(&[("origin", c.origin.admin), ("proxy", c.proxies[0].admin), ("balancer", c.balancer.admin)]);
    let all_up = wait_until(Duration::from_secs(60), || {
        let Some(targets) = prometheus.api("/api/v1/targets") else { return false };
        let active = targets["activeTargets"].as_array().cloned().unwrap_or_default();
        active.len() == 3 && active.iter().all(|t| t["health"] == "up")
    });
    assert!(all_up, "targets: {:?}", prometheus.api("/api/v1/targets"));
    let hits = format!("cachetier_cache_hits_total{{instance=\"{}\"}}", c.proxies[0].admin);
    assert!(
        wait_until(Duration::from_secs(30), || prometheus.scalar(&hits) == Some(4.0)),
        "hits: {:?}",
        prometheus.scalar(&hits)
    );
    assert_eq!(prometheus.scalar("cachetier_cache_misses_total{job=\"proxy\"}"), Some(1.0));
    let ok_answers = "cachetier_origin_answers_total{job=\"origin\",status=\"ok\"}";
    assert!(wait_until(Duration::from_secs(30), || prometheus.scalar(ok_answers) == Some(1.0)));
    // The histogram is usable as one: a quantile over its buckets.
    let quantile = "histogram_quantile(0.5,cachetier_request_duration_seconds_bucket{job=\"proxy\"})";
    let q = prometheus.scalar(quantile).unwrap_or(f64::NAN);
    assert!(q > 0.0 && q < 1.0, "p50 {q}");
    // Per-proxy series at the balancer, one per proxy, all up.
    let up = prometheus.query("cachetier_proxy_up{job=\"balancer\"}").unwrap();
    let series = up["result"].as_array().unwrap();
    assert_eq!(series.len(), 2, "{up}");
    assert!(series.iter().all(|s| s["value"][1] == "1"), "{up}");
    assert_eq!(prometheus.scalar("cachetier_build_info{job=\"balancer\"}"), Some(1.0));
}

/// `--admin-port` on a real binary: the announced line, and a scrape through it.
#[test]
fn binaries_announce_their_admin_listener() {
    let origin = Child2::spawn(
        "origin",
        &[
            "--port",
            "0",
            "--admin-port",
            "0",
            "--admin-host",
            "127.0.0.1",
            "--data-dir",
            &observe::data_dir(),
            "--log-level",
            "warn",
        ],
    )
    .unwrap();
    let admin = origin.admin.expect("admin listening on … announced");
    // --admin-host is accepted and used (tests stay on 127.0.0.1).
    assert_eq!(admin.ip().to_string(), "127.0.0.1");
    assert_ne!(admin.port(), origin.addr.port());
    assert_eq!(get(admin, "/healthz").text(), "ok");
    assert!(get(admin, "/metrics").text().contains("cachetier_origin_answers_total"));
}

/// The sample configuration the README points to is one Prometheus accepts.
#[test]
fn the_sample_prometheus_config_is_valid() {
    if !tool_or_skip("promtool") {
        return;
    }
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/prometheus.yml");
    let out = Command::new("promtool").args(["check", "config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
