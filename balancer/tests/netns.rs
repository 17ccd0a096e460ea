//! Multi-host: the origin, each proxy, the balancer and the load generator each in a network
//! namespace of their own, with their own address on a bridge (itself in a private "switch"
//! namespace, so nothing is configured in the host's). One proxy is cut off (its link set
//! down: packets vanish, no reset) under load: no GET fails, the balancer marks it down
//! within its health settings, and it comes back when the link does. All proxies listen on
//! the same port on different hosts, so nothing may assume 127.0.0.1.
//!
//! Runs when it is root and `ip netns` works; otherwise it says why and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::testkit::{wait_until, workspace_bin, ChildService};
use serde_json::Value;

const SUBNET: &str = "10.200.77";

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("running ip")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The namespaces of one test run; deleting them (on drop) removes every link with them.
struct Hosts {
    prefix: String,
    names: Vec<String>,
}

impl Hosts {
    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    fn switch(&self) -> String {
        self.ns("sw")
    }

    /// A host namespace with `eth0` at `SUBNET.last` on the bridge, the switch side of its
    /// link named `port`.
    fn add_host(&mut self, role: &str, last: u8, port: &str) {
        let ns = self.ns(role);
        ip_ok(&["netns", "add", &ns]);
        self.names.push(ns.clone());
        let switch = self.switch();
        ip_ok(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", &switch]);
        ip_ok(&["-n", &switch, "link", "set", port, "master", "br0", "up"]);
        ip_ok(&["-n", &ns, "addr", "add", &format!("{SUBNET}.{last}/24"), "dev", "eth0"]);
        ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
    }

    fn set_port(&self, port: &str, up: bool) {
        ip_ok(&["-n", &self.switch(), "link", "set", port, if up { "up" } else { "down" }]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self.names.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Creates the switch namespace and its bridge, or explains why this machine cannot.
fn network() -> Result<Hosts, String> {
    let uid = Command::new("id").arg("-u").output().map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    let prefix = format!("ct{}", std::process::id() % 100_000);
    let mut hosts = Hosts { prefix, names: Vec::new() };
    let switch = hosts.switch();
    let out = ip(&["netns", "add", &switch]);
    if !out.status.success() {
        return Err(format!("ip netns add failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    hosts.names.push(switch.clone());
    let out = ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
    if !out.status.success() {
        return Err(format!("cannot create a bridge: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    ip_ok(&["-n", &switch, "link", "set", "br0", "up"]);
    Ok(hosts)
}

/// Runs a binary of this workspace inside a host namespace.
fn spawn_in(hosts: &Hosts, role: &str, binary: &str, args: &[&str]) -> ChildService {
    let bin = workspace_bin(binary).unwrap().display().to_string();
    let ns = hosts.ns(role);
    let mut full = vec!["netns", "exec", ns.as_str(), bin.as_str()];
    full.extend_from_slice(args);
    ChildService::spawn("ip", &full).unwrap()
}

/// The balancer's METRICS, asked from inside the client's namespace.
fn balancer_metrics(hosts: &Hosts) -> Option<Value> {
    let bin = workspace_bin("client").unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &hosts.ns("cl")])
        .arg(bin)
        .args(["--host", &format!("{SUBNET}.10"), "--port", "9000", "--metrics", "--timeout-ms", "1000"])
        .output()
        .ok()?;
    let answer: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(answer["data"].clone())
}

fn proxy_healthy(hosts: &Hosts, proxy: &str) -> Option<bool> {
    balancer_metrics(hosts)?["proxies"][proxy]["healthy"].as_bool()
}

#[test]
fn a_proxy_cut_off_the_network_under_load_fails_no_request() {
    let mut hosts = match network() {
        Ok(hosts) => hosts,
        Err(why) => {
            eprintln!("skipping the multi-host test: {why}");
            return;
        }
    };
    hosts.add_host("or", 1, "p-origin");
    for (i, last) in [2u8, 3, 4].iter().enumerate() {
        hosts.add_host(&format!("p{i}"), *last, &format!("p-proxy{i}"));
    }
    hosts.add_host("lb", 10, "p-lb");
    hosts.add_host("cl", 20, "p-client");

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data").display().to_string();
    let origin_host = format!("{SUBNET}.1");
    let _origin = spawn_in(
        &hosts,
        "or",
        "origin",
        &[
            "--host",
            &origin_host,
            "--port",
            "8000",
            "--data-dir",
            &data,
            "--synthetic-keys",
            "1000",
            "--log-level",
            "warn",
        ],
    );
    let proxy_hosts: Vec<String> = [2, 3, 4].iter().map(|last| format!("{SUBNET}.{last}")).collect();
    let _proxies: Vec<ChildService> = (0..3)
        .map(|i| {
            let args =
                ["--host", &proxy_hosts[i], "--port", "8001", "--origin-host", &origin_host, "--log-level", "warn"];
            spawn_in(&hosts, &format!("p{i}"), "proxy", &args)
        })
        .collect();
    let upstreams: Vec<String> = proxy_hosts.iter().map(|h| format!("{h}:8001")).collect();
    let lb_host = format!("{SUBNET}.10");
    let mut lb_args = vec![
        "--host",
        &lb_host,
        "--port",
        "9000",
        "--health-interval-ms",
        "200",
        "--health-timeout-ms",
        "200",
        "--fall",
        "2",
        "--rise",
        "2",
        "--request-timeout-ms",
        "1500",
        "--log-level",
        "warn",
        "--proxies",
    ];
    lb_args.extend(upstreams.iter().map(String::as_str));
    let _balancer = spawn_in(&hosts, "lb", "balancer", &lb_args);
    let victim = upstreams[1].clone();
    assert!(wait_until(Duration::from_secs(10), || proxy_healthy(&hosts, &victim) == Some(true)));

    // Load from the client's host, for a fixed time.
    let client = workspace_bin("client").unwrap();
    let client_ns = hosts.ns("cl");
    let load = thread::spawn(move || {
        let out = Command::new("ip")
            .args(["netns", "exec", &client_ns])
            .arg(client)
            .args(["--host", &format!("{SUBNET}.10"), "--port", "9000", "bench", "--connections", "4"])
            .args(["--duration", "8", "--warmup", "0", "--keys", "100", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    });
    thread::sleep(Duration::from_secs(2)); // the load runs a while before the cut
    hosts.set_port("p-proxy1", false);
    let cut = Instant::now();
    assert!(wait_until(Duration::from_secs(5), || proxy_healthy(&hosts, &victim) == Some(false)));
    let detected = cut.elapsed();
    thread::sleep(Duration::from_secs(2)); // load continues with the proxy cut off
    hosts.set_port("p-proxy1", true);
    let restored = Instant::now();
    assert!(wait_until(Duration::from_secs(5), || proxy_healthy(&hosts, &victim) == Some(true)));
    let recovered = restored.elapsed();

    let report = load.join().unwrap();
    eprintln!(
        "multi-host: {} GETs, statuses {}, errors {}, cut detected after {detected:?}, back after {recovered:?}",
        report["requests"], report["statuses"], report["errors"]
    );
    assert!(report["requests"].as_u64().unwrap() > 1000, "{report}");
    assert_eq!(report["errors"], 0, "a GET failed: {report}");
    // fall 2 × 200 ms probes with a 200 ms timeout, or the first timed-out requests.
    assert!(detected < Duration::from_millis(2000), "{detected:?}");
    let nodes = report["per_node"].as_object().unwrap();
    assert!(nodes.len() <= 1, "all proxies listen on port 8001 on their own hosts: {nodes:?}");
}
