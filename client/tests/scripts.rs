//! The cluster scripts end to end, as a user runs them: start on free non-default ports, GET
//! twice through the balancer (a miss, then a hit), METRICS, refuse a second start, stop, and
//! nothing of it left running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use testkit::{free_port, temp_dir, wait_until};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

struct ClusterEnv {
    vars: Vec<(&'static str, String)>,
    run_dir: PathBuf,
    lb_port: u16,
}

impl ClusterEnv {
    fn new() -> ClusterEnv {
        let ports: Vec<u16> = (0..5).map(|_| free_port().unwrap()).collect();
        let run_dir = temp_dir("cluster-scripts");
        let vars = vec![
            ("ORIGIN_PORT", ports[0].to_string()),
            ("PROXY_PORTS", format!("{} {} {}", ports[1], ports[2], ports[3])),
            ("LB_PORT", ports[4].to_string()),
            ("CACHE_TYPE", "lru".into()),
            ("STRATEGY", "consistent_hash".into()),
            ("ORIGIN_LATENCY_MS", "20".into()),
            ("RUN_DIR", run_dir.display().to_string()),
        ];
        ClusterEnv { vars, run_dir, lb_port: ports[4] }
    }

    fn script(&self, name: &str) -> Output {
        Command::new("bash").arg(root().join("scripts").join(name)).envs(self.vars.iter().cloned()).output().unwrap()
    }

    /// PIDs recorded by start_cluster.sh.
    fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.run_dir.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect()
    }

    fn client(&self, args: &[&str]) -> (bool, Value) {
        let out = Command::new(root().join("target/release/client"))
            .arg("--port")
            .arg(self.lb_port.to_string())
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), serde_json::from_slice(&out.stdout).unwrap())
    }
}

impl Drop for ClusterEnv {
    /// Whatever happened, stop what this test started (by the PIDs it recorded).
    fn drop(&mut self) {
        let _ = self.script("kill_cluster.sh");
    }
}

fn running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn start_get_metrics_and_kill_with_the_scripts() {
    let cluster = ClusterEnv::new();
    let started = cluster.script("start_cluster.sh");
    let stdout = String::from_utf8_lossy(&started.stdout);
    assert!(started.status.success(), "start failed:\n{stdout}\n{}", String::from_utf8_lossy(&started.stderr));
    assert!(stdout.contains(&cluster.lb_port.to_string()) && stdout.contains("logs"), "{stdout}");
    let pids = cluster.pids();
    assert_eq!(pids.len(), 5, "origin, three proxies and the balancer");

    let (ok, miss) = cluster.client(&["--get", "article/1"]);
    assert!(ok, "{miss}");
    assert_eq!((miss["status"].as_str(), miss["cache_hit"].as_bool()), (Some("OK"), Some(false)));
    let (_, hit) = cluster.client(&["--get", "article/1"]);
    assert_eq!((hit["cache_hit"].as_bool(), &hit["node"]), (Some(true), &miss["node"]));
    let (ok, metrics) = cluster.client(&["--metrics"]);
    assert!(ok);
    assert_eq!(
        (metrics["data"]["role"].as_str(), metrics["data"]["strategy"].as_str()),
        (Some("balancer"), Some("consistent_hash"))
    );
    assert!(cluster.run_dir.join("balancer.log").exists());

    let again = cluster.script("start_cluster.sh");
    assert!(!again.status.success(), "a second cluster was started over the first");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    let status = cluster.script("status.sh");
    assert!(String::from_utf8_lossy(&status.stdout).contains("UP"));

    let stopped = cluster.script("kill_cluster.sh");
    assert!(stopped.status.success(), "{}", String::from_utf8_lossy(&stopped.stderr));
    assert!(wait_until(Duration::from_secs(10), || pids.iter().all(|&pid| !running(pid))), "left running: {pids:?}");
    let (ok, gone) = cluster.client(&["--health", "--timeout-ms", "500"]);
    assert!(!ok);
    assert_eq!(gone["status"], "CLIENT_CONNECTION_ERROR");
}

#[test]
fn a_taken_port_is_a_clear_error_and_nothing_is_left_running() {
    let cluster = ClusterEnv::new();
    let _holder = std::net::TcpListener::bind(("127.0.0.1", cluster.lb_port)).unwrap();
    let out = cluster.script("start_cluster.sh");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&cluster.lb_port.to_string()) && stderr.contains("in use"), "{stderr}");
    // Nothing listens on the cluster's other ports, and nothing the script recorded runs.
    let others: Vec<u16> = cluster.vars[..2]
        .iter()
        .flat_map(|(_, ports)| ports.split_whitespace().map(|p| p.parse::<u16>().unwrap()).collect::<Vec<_>>())
        .collect();
    assert_eq!(others.len(), 4, "the origin and three proxies");
    for port in others {
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "something was left on port {port}");
    }
    assert!(cluster.pids().iter().all(|&pid| !running(pid)), "left running: {:?}", cluster.pids());
}

#[test]
fn a_service_that_dies_at_start_up_is_reported_with_its_log_and_the_rest_is_stopped() {
    let mut cluster = ClusterEnv::new();
    for (name, value) in cluster.vars.iter_mut() {
        if *name == "CACHE_TYPE" {
            *value = "fifo".into();
        }
    }
    let out = cluster.script("start_cluster.sh");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exited") && stderr.contains("fifo"), "the proxy's log should be shown: {stderr}");
    // The origin had started before the proxies: it is stopped again.
    let origin_port: u16 = cluster.vars[0].1.parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", origin_port)).is_err()));
}
