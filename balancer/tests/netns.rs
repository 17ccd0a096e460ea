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

use serde_json::Value;
use testkit::{wait_until, workspace_bin, ChildService};

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

/// Creates the switch namespace and its bridge, or explains why this machine cannot. `tag`
/// keeps the namespaces of the tests in this file apart (they run in parallel).
fn network(tag: &str) -> Result<Hosts, String> {
    let uid = Command::new("id").arg("-u").output().map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    let prefix = format!("ct{}{tag}", std::process::id() % 100_000);
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

/// `client bench` for 8 s from the client's host against the balancer, on its own thread;
/// joins to the bench's JSON summary.
fn bench_from_client_host(hosts: &Hosts) -> thread::JoinHandle<Value> {
    let client = workspace_bin("client").unwrap();
    let client_ns = hosts.ns("cl");
    thread::spawn(move || {
        let out = Command::new("ip")
            .args(["netns", "exec", &client_ns])
            .arg(client)
            .args(["--host", &format!("{SUBNET}.10"), "--port", "9000", "bench", "--connections", "4"])
            .args(["--duration", "8", "--warmup", "0", "--keys", "100", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    })
}

#[test]
fn a_proxy_cut_off_the_network_under_load_fails_no_request() {
    let mut hosts = match network("a") {
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
    let load = bench_from_client_host(&hosts);
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

/// The DNS name every proxy host answers to (SPEC 7: a headless Service's name).
const NAME: &str = "proxies.cachetier.test";

/// A process started directly (not a workspace service: no `listening on` line), killed by
/// its PID and reaped on drop.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `/etc/netns/NS/resolv.conf`, which `ip netns exec NS` bind-mounts over /etc/resolv.conf
/// in a private mount namespace; removed on drop.
struct NetnsResolvConf(std::path::PathBuf);

impl NetnsResolvConf {
    fn write(ns: &str, nameserver: &str) -> NetnsResolvConf {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {nameserver}\noptions timeout:1 attempts:2\n"))
            .unwrap();
        NetnsResolvConf(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The hosts file dnsmasq serves `NAME` from: one line per proxy host.
fn write_hosts(path: &Path, lasts: &[u8]) {
    let text: String = lasts.iter().map(|last| format!("{SUBNET}.{last} {NAME}\n")).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

fn forwarded(metrics: &Value, proxy: &str) -> Option<u64> {
    metrics["proxies"][proxy]["forwarded"].as_u64()
}

/// The balancer is given one DNS name, served by a real dnsmasq on its own host; the
/// balancer's host resolves through it (its own resolv.conf). Under load a fourth proxy host
/// is added to the name: it takes its share after the next lookup. Then one is removed: it
/// drains and leaves. No GET fails.
#[test]
fn proxies_behind_a_dns_name_join_and_leave_under_load() {
    let mut hosts = match network("d") {
        Ok(hosts) => hosts,
        Err(why) => {
            eprintln!("skipping the multi-host DNS test: {why}");
            return;
        }
    };
    if Command::new("dnsmasq").arg("--version").output().is_err() {
        eprintln!("skipping the multi-host DNS test: no dnsmasq");
        return;
    }
    hosts.add_host("or", 1, "p-origin");
    let lasts = [2u8, 3, 4, 5];
    for (i, last) in lasts.iter().enumerate() {
        hosts.add_host(&format!("p{i}"), *last, &format!("p-proxy{i}"));
    }
    hosts.add_host("dns", 30, "p-dns");
    hosts.add_host("lb", 10, "p-lb");
    hosts.add_host("cl", 20, "p-client");

    // dnsmasq: only our hosts file, nothing upstream, nothing of this machine's.
    let dir = testkit::temp_dir("netns-dns");
    let hosts_file = dir.join("proxies.hosts");
    write_hosts(&hosts_file, &lasts[..3]);
    let dns_host = format!("{SUBNET}.30");
    let dnsmasq = Command::new("ip")
        .args(["netns", "exec", &hosts.ns("dns"), "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null"])
        .args(["--no-resolv", "--no-hosts", "--bind-interfaces", "--user=root", "--pid-file"])
        .arg(format!("--listen-address={dns_host}"))
        .arg(format!("--addn-hosts={}", hosts_file.display()))
        .args(["--local-ttl=0", "--log-facility=-"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dnsmasq = Process(dnsmasq);
    let _resolv = NetnsResolvConf::write(&hosts.ns("lb"), &dns_host);
    let resolves = || {
        let out = Command::new("ip").args(["netns", "exec", &hosts.ns("lb"), "getent", "ahostsv4", NAME]).output();
        out.is_ok_and(|o| o.status.success())
    };
    assert!(wait_until(Duration::from_secs(10), resolves), "dnsmasq does not answer for {NAME}");

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data").display().to_string();
    let origin_host = format!("{SUBNET}.1");
    let origin_args = [
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
    ];
    let _origin = spawn_in(&hosts, "or", "origin", &origin_args);
    let proxy_hosts: Vec<String> = lasts.iter().map(|last| format!("{SUBNET}.{last}")).collect();
    let _proxies: Vec<ChildService> = (0..lasts.len())
        .map(|i| {
            let args =
                ["--host", &proxy_hosts[i], "--port", "8001", "--origin-host", &origin_host, "--log-level", "warn"];
            spawn_in(&hosts, &format!("p{i}"), "proxy", &args)
        })
        .collect();
    let upstreams: Vec<String> = proxy_hosts.iter().map(|h| format!("{h}:8001")).collect();
    let lb_host = format!("{SUBNET}.10");
    let name_spec = format!("{NAME}:8001");
    let lb_args = [
        "--host",
        &lb_host,
        "--port",
        "9000",
        "--health-interval-ms",
        "200",
        "--resolve-interval-ms",
        "300",
        "--log-level",
        "info",
        "--proxies",
        &name_spec,
    ];
    let _balancer = spawn_in(&hosts, "lb", "balancer", &lb_args);
    let members = |hosts: &Hosts| -> Option<Vec<String>> {
        Some(balancer_metrics(hosts)?["proxies"].as_object()?.keys().cloned().collect())
    };
    assert!(wait_until(Duration::from_secs(10), || members(&hosts).as_deref() == Some(&upstreams[..3])));
    let m = balancer_metrics(&hosts).unwrap();
    assert_eq!(m["proxies"][&upstreams[0]]["name"], NAME, "{m}");

    let load = bench_from_client_host(&hosts);
    thread::sleep(Duration::from_secs(2)); // the load runs a while on three proxies

    // A fourth host joins the name: it serves after the next lookup.
    write_hosts(&hosts_file, &lasts);
    signal(dnsmasq.0.id(), "HUP");
    let added = Instant::now();
    let newcomer = upstreams[3].clone();
    assert!(
        wait_until(Duration::from_secs(5), || balancer_metrics(&hosts)
            .is_some_and(|m| forwarded(&m, &newcomer).is_some_and(|n| n > 0))),
        "the fourth proxy took no GET"
    );
    let joined = added.elapsed();
    thread::sleep(Duration::from_secs(2));

    // The first host leaves the name: it drains and leaves METRICS.
    write_hosts(&hosts_file, &lasts[1..]);
    signal(dnsmasq.0.id(), "HUP");
    let removed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || members(&hosts).as_deref() == Some(&upstreams[1..])),
        "the removed proxy did not leave: {:?}",
        members(&hosts)
    );
    let left = removed.elapsed();
    let m = balancer_metrics(&hosts).unwrap();

    let report = load.join().unwrap();
    let shares: Vec<Option<u64>> = upstreams[1..].iter().map(|u| forwarded(&m, u)).collect();
    eprintln!(
        "multi-host DNS: {} GETs, errors {}, fourth proxy serving {joined:?} after the DNS change, first gone \
         {left:?} after; forwarded to the remaining three {shares:?}",
        report["requests"], report["errors"]
    );
    assert!(report["requests"].as_u64().unwrap() > 1000, "{report}");
    assert_eq!(report["errors"], 0, "a GET failed: {report}");
    // Round robin: the newcomer, serving for about half the run, has a real share.
    let newest = forwarded(&m, &newcomer).unwrap_or(0);
    let most = shares.iter().flatten().max().copied().unwrap_or(0);
    assert!(newest * 4 > most, "the fourth proxy's share is too small: {shares:?}");
    assert_eq!(m["reloads"], 0, "DNS changes are not reloads");
}
