//! Changing the proxy set of a running `balancer` binary (SPEC 7): `--proxies-file` reloaded
//! on SIGHUP (add, remove with drain, an invalid file), a reload under load that fails no
//! GET, key movement under consistent_hash, and drain/enable on the admin port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod observe;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use observe::{http, scratch, Child2};
use serde_json::Value;
use testkit::{metrics, wait_until, workspace_bin, LineClient, RunningServer};

struct Rig {
    _origin: RunningServer,
    proxies: Vec<RunningServer>,
    file: PathBuf,
    log: PathBuf,
    balancer: Child2,
}

fn start_origin() -> RunningServer {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut config = origin::OriginConfig::new(data);
    config.synthetic = Some(origin::Synthetic { count: 100_000, value_bytes: 50 });
    RunningServer::start(origin::bind(config).unwrap())
}

fn write_file(file: &Path, addrs: &[SocketAddr]) {
    let mut text = String::from("# proxies for this test\n\n");
    for addr in addrs {
        text.push_str(&format!("{addr}   # a proxy\n"));
    }
    // Written whole, then renamed: a reload never reads half a file.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

impl Rig {
    /// `n` in-process proxies; the balancer binary starts with those `listed` in its file.
    fn start(label: &str, n: usize, listed: &[usize], strategy: &str) -> Rig {
        let origin = start_origin();
        let proxies: Vec<RunningServer> = (0..n)
            .map(|_| RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin.addr())).unwrap()))
            .collect();
        let dir = scratch(label);
        let (file, log) = (dir.join("proxies"), dir.join("balancer.log"));
        write_file(&file, &listed.iter().map(|&i| proxies[i].addr()).collect::<Vec<_>>());
        let stderr = std::fs::File::create(&log).unwrap();
        let file_arg = file.to_str().unwrap().to_owned();
        let args = [
            "--port",
            "0",
            "--admin-port",
            "0",
            "--proxies-file",
            &file_arg,
            "--strategy",
            strategy,
            "--health-interval-ms",
            "100",
            "--metrics-interval-ms",
            "200",
            "--log-level",
            "info",
        ];
        let balancer = Child2::spawn_path(&workspace_bin("balancer").unwrap(), &args, Stdio::from(stderr)).unwrap();
        Rig { _origin: origin, proxies, file, log, balancer }
    }

    fn addr(&self, i: usize) -> String {
        self.proxies[i].addr().to_string()
    }

    fn write(&self, listed: &[usize]) {
        write_file(&self.file, &listed.iter().map(|&i| self.proxies[i].addr()).collect::<Vec<_>>());
    }

    fn metrics(&self) -> Value {
        metrics(self.balancer.addr).unwrap()
    }

    fn members(&self) -> BTreeSet<String> {
        self.metrics()["proxies"].as_object().unwrap().keys().cloned().collect()
    }

    fn expect_members(&self, listed: &[usize]) -> bool {
        let want: BTreeSet<String> = listed.iter().map(|&i| self.addr(i)).collect();
        wait_until(Duration::from_secs(10), || self.members() == want)
    }

    /// Rewrites the file, sends SIGHUP, and waits until `field` (`reloads` or
    /// `reloads_failed`) counts it; returns how long that took.
    fn reload(&self, listed: &[usize], field: &str) -> Duration {
        let before = self.metrics()[field].as_u64().unwrap();
        self.write(listed);
        let sent = Instant::now();
        self.balancer.signal("HUP");
        assert!(
            wait_until(Duration::from_secs(10), || self.metrics()[field].as_u64() == Some(before + 1)),
            "the reload was not counted in {field}"
        );
        sent.elapsed()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn get(client: &mut LineClient, key: &str) -> Value {
    client.request(&format!("GET {key}")).unwrap()
}

fn node(answer: &Value) -> u64 {
    assert_eq!(answer["status"], "OK", "{answer}");
    answer["node"].as_u64().unwrap()
}

fn port(rig: &Rig, i: usize) -> u64 {
    u64::from(rig.proxies[i].addr().port())
}

/// SIGHUP with a proxy added: it serves within one reload, the stayers keep their counters;
/// then one removed: it drains, leaves METRICS, and gets no more GETs.
#[test]
fn sighup_adds_a_proxy_then_removes_one() {
    let rig = Rig::start("members-add-remove", 3, &[0, 1], "round_robin");
    assert!(rig.expect_members(&[0, 1]));
    let mut c = LineClient::connect(rig.balancer.addr).unwrap();
    for k in 0..20 {
        node(&get(&mut c, &format!("synthetic/{k}")));
    }
    let forwarded = |rig: &Rig, i: usize| rig.metrics()["proxies"][rig.addr(i)]["forwarded"].as_u64();
    let before = forwarded(&rig, 0).unwrap();
    assert!(before > 0);

    // Add proxy 2: time from SIGHUP until a GET is answered by it.
    rig.write(&[0, 1, 2]);
    let sent = Instant::now();
    rig.balancer.signal("HUP");
    let mut served_by_new = None;
    for k in 0..10_000 {
        if node(&get(&mut c, &format!("synthetic/{}", 100 + k))) == port(&rig, 2) {
            served_by_new = Some(sent.elapsed());
            break;
        }
        if sent.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let served_by_new = served_by_new.expect("the added proxy never served");
    println!("reload time, SIGHUP to a GET answered by the added proxy: {served_by_new:?}");
    assert!(rig.expect_members(&[0, 1, 2]));
    let m = rig.metrics();
    assert_eq!((m["reloads"].as_u64(), m["reloads_failed"].as_u64()), (Some(1), Some(0)));
    assert!(forwarded(&rig, 0).unwrap() >= before, "a stayer lost its counters");
    assert_eq!(m["proxies"][rig.addr(2)]["healthy"], true);
    assert_eq!(m["proxies"][rig.addr(2)]["draining"], false);

    // Remove proxy 0: it leaves METRICS once drained, and sees no GET after that.
    rig.reload(&[1, 2], "reloads");
    assert!(rig.expect_members(&[1, 2]), "the removed proxy is still listed: {:?}", rig.members());
    let asked = metrics(rig.proxies[0].addr()).unwrap()["total_requests"].as_u64().unwrap();
    for k in 0..60 {
        assert_ne!(node(&get(&mut c, &format!("synthetic/{}", 20_000 + k))), port(&rig, 0));
    }
    let asked_after = metrics(rig.proxies[0].addr()).unwrap()["total_requests"].as_u64().unwrap();
    // Our own METRICS request above is the one more it answered.
    assert!(asked_after <= asked + 1, "the removed proxy still got GETs ({asked} -> {asked_after})");
    assert!(rig.log_text().contains("has drained and left the set"), "{}", rig.log_text());
}

/// An invalid file (a bad line) changes nothing; the log names the line.
#[test]
fn an_invalid_file_changes_nothing_and_the_log_names_the_line() {
    let rig = Rig::start("members-invalid", 2, &[0, 1], "round_robin");
    assert!(rig.expect_members(&[0, 1]));
    let text = format!("{}\n# fine so far\n{}\nnot-a-proxy\n", rig.addr(0), rig.addr(1));
    std::fs::write(&rig.file, text).unwrap();
    rig.balancer.signal("HUP");
    assert!(wait_until(Duration::from_secs(10), || rig.metrics()["reloads_failed"].as_u64() == Some(1)));
    assert_eq!(rig.metrics()["reloads"].as_u64(), Some(0));
    assert!(rig.expect_members(&[0, 1]));
    assert!(
        wait_until(Duration::from_secs(5), || rig.log_text().contains("line 4: 'not-a-proxy'")),
        "the error does not name line 4: {}",
        rig.log_text()
    );
    // An unreadable file too.
    std::fs::remove_file(&rig.file).unwrap();
    rig.balancer.signal("HUP");
    assert!(wait_until(Duration::from_secs(10), || rig.metrics()["reloads_failed"].as_u64() == Some(2)));
    assert!(rig.expect_members(&[0, 1]));
    let mut c = LineClient::connect(rig.balancer.addr).unwrap();
    node(&get(&mut c, "synthetic/1"));
}

/// Reloads that add and remove proxies while clients keep GETting: no GET fails.
#[test]
fn reloads_under_load_fail_no_get() {
    const CLIENTS: usize = 4;
    const MAX_GETS_EACH: usize = 50_000;
    let rig = Rig::start("members-load", 4, &[0, 1], "round_robin");
    assert!(rig.expect_members(&[0, 1]));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let addr = rig.balancer.addr;
    let loaders: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let (stop, done) = (stop.clone(), done.clone());
            thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                let (mut ok, mut failed) = (0u64, Vec::new());
                let started = Instant::now();
                for i in 0..MAX_GETS_EACH {
                    if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    let answer = get(&mut c, &format!("synthetic/{}", (t * 7919 + i) % 100_000));
                    done.fetch_add(1, Ordering::SeqCst);
                    if answer["status"] == "OK" {
                        ok += 1;
                    } else {
                        failed.push(answer.to_string());
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for set in [&[0, 1, 2][..], &[1, 2, 3], &[3, 0], &[0, 1, 2, 3], &[2]] {
        let at = done.load(Ordering::SeqCst);
        rig.reload(set, "reloads");
        assert!(rig.expect_members(set), "set {set:?} not reached: {:?}", rig.members());
        // Let the load run on each set for a while (bounded: the loaders stop on their own).
        wait_until(Duration::from_secs(20), || done.load(Ordering::SeqCst) >= at + 2_000);
    }
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut failed) = (0, Vec::new());
    for loader in loaders {
        let (o, f) = loader.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    println!("GETs during 5 reloads: {ok} OK, {} failed", failed.len());
    assert!(ok > 100, "the load loop hardly ran ({ok})");
    assert!(failed.is_empty(), "failed GETs: {:?}", &failed[..failed.len().min(5)]);
}

/// consistent_hash on the binary: 1,000 keys over four proxies, a fifth added by SIGHUP;
/// every key that moved moved to the new proxy.
#[test]
fn a_reload_moves_only_the_keys_of_the_added_proxy() {
    const KEYS: usize = 1_000;
    let rig = Rig::start("members-hash", 5, &[0, 1, 2, 3], "consistent_hash");
    assert!(rig.expect_members(&[0, 1, 2, 3]));
    let mut c = LineClient::connect(rig.balancer.addr).unwrap();
    let owners =
        |c: &mut LineClient| -> Vec<u64> { (0..KEYS).map(|k| node(&get(c, &format!("synthetic/{k}")))).collect() };
    let before = owners(&mut c);
    rig.reload(&[0, 1, 2, 3, 4], "reloads");
    assert!(rig.expect_members(&[0, 1, 2, 3, 4]));
    let after = owners(&mut c);
    let moved: Vec<usize> = (0..KEYS).filter(|&k| before[k] != after[k]).collect();
    println!("keys moved adding a fifth proxy to four, on the binary: {} of {KEYS}", moved.len());
    assert!(moved.iter().all(|&k| after[k] == port(&rig, 4)), "a key moved between two old proxies");
    assert!((120..=300).contains(&moved.len()), "{} keys moved", moved.len());
    // Removing it again sends every key back to where it was.
    rig.reload(&[0, 1, 2, 3], "reloads");
    assert!(rig.expect_members(&[0, 1, 2, 3]));
    assert_eq!(owners(&mut c), before);
}

/// Drain and enable over HTTP on the admin port.
#[test]
fn drain_and_enable_on_the_admin_port() {
    let rig = Rig::start("members-drain", 2, &[0, 1], "round_robin");
    assert!(rig.expect_members(&[0, 1]));
    let admin = rig.balancer.admin.unwrap();
    let drain = format!("/proxies/{}/drain", rig.addr(0));
    let response = http(admin, "POST", &drain).unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(rig.metrics()["proxies"][rig.addr(0)]["draining"], true);
    let mut c = LineClient::connect(rig.balancer.addr).unwrap();
    for k in 0..40 {
        assert_eq!(node(&get(&mut c, &format!("synthetic/{k}"))), port(&rig, 1), "a drained proxy got a GET");
    }
    assert_eq!(http(admin, "POST", &format!("/proxies/{}/enable", rig.addr(0))).unwrap().status, 200);
    assert_eq!(rig.metrics()["proxies"][rig.addr(0)]["draining"], false);
    let nodes: BTreeSet<u64> = (0..40).map(|k| node(&get(&mut c, &format!("synthetic/{}", 100 + k)))).collect();
    assert!(nodes.contains(&port(&rig, 0)), "an enabled proxy got no GET");
    assert_eq!(http(admin, "POST", "/proxies/127.0.0.1:1/drain").unwrap().status, 404);
    assert_eq!(http(admin, "GET", &drain).unwrap().status, 405);
    assert_eq!(http(admin, "POST", &format!("/proxies/{}/explode", rig.addr(0))).unwrap().status, 404);
    let prom = observe::get(admin, "/metrics").text();
    assert!(prom.contains("cachetier_reloads_total 0"), "{prom}");
    assert!(prom.contains("cachetier_reloads_failed_total 0"), "{prom}");

    // `:` percent-encoded, as some HTTP clients send it.
    let encoded = format!("/proxies/{}/drain", rig.addr(0).replace(':', "%3A"));
    assert_eq!(http(admin, "POST", &encoded).unwrap().status, 200);
    assert_eq!(rig.metrics()["proxies"][rig.addr(0)]["draining"], true);
    assert_eq!(http(admin, "POST", &format!("/proxies/{}/enable", rig.addr(0))).unwrap().status, 200);

    // A proxy listed by name is drained by that name (HOST:PORT with HOST a DNS name).
    let port0 = port(&rig, 0);
    std::fs::write(&rig.file, format!("localhost:{port0}\n{}\n", rig.addr(1))).unwrap();
    let before = rig.metrics()["reloads"].as_u64().unwrap();
    rig.balancer.signal("HUP");
    assert!(wait_until(Duration::from_secs(10), || rig.metrics()["reloads"].as_u64() == Some(before + 1)));
    // The name is resolved after the reload is counted (off the loop): wait for it.
    let named = || rig.metrics()["proxies"][rig.addr(0)]["name"] == "localhost";
    assert!(wait_until(Duration::from_secs(10), named), "{}", rig.metrics());
    let by_name = http(admin, "POST", &format!("/proxies/localhost:{port0}/drain")).unwrap();
    assert_eq!(by_name.status, 200, "{}", by_name.text());
    assert_eq!(rig.metrics()["proxies"][rig.addr(0)]["draining"], true);
    assert_eq!(
        http(admin, "POST", &format!("/proxies/localhost:{}/drain", port0.wrapping_add(1))).unwrap().status,
        404
    );
}

/// Kills and reaps a process this test started, by its PID, on drop.
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start-up resolves the proxies' names before the loop runs, blocking for as long as a
/// nameserver takes; a SIGHUP then (a deploy tool reloading a balancer it just started) must
/// not kill it (SIGHUP's default action): it reloads once it listens. The balancer gets a
/// private mount namespace whose resolv.conf names a nameserver that never answers. Runs when
/// it is root and `unshare -m` works; otherwise it says why and passes.
#[test]
fn a_sighup_while_names_resolve_at_start_up_does_not_kill_the_balancer() {
    let uid = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout).unwrap_or_default();
    let unshare = std::process::Command::new("unshare").args(["-m", "true"]).status();
    if String::from_utf8_lossy(&uid).trim() != "0" || !unshare.is_ok_and(|s| s.success()) {
        eprintln!("skipping the slow-resolver test: not root, or no unshare -m");
        return;
    }
    // A nameserver that takes every query and answers none.
    // On an address of its own, so that parallel runs do not collide.
    let nameserver = format!("127.{}.0.77", 20 + std::process::id() % 200);
    let silent = std::net::UdpSocket::bind((nameserver.as_str(), 53)).unwrap();
    let dir = scratch("early-hup");
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n")).unwrap();
    let file = dir.join("proxies");
    std::fs::write(&file, "127.0.0.1:9\nslow.cachetier.invalid:9\n").unwrap();
    let log = dir.join("balancer.log");
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec {} --port 0 --proxies-file {} --log-level info",
        resolv.display(),
        workspace_bin("balancer").unwrap().display(),
        file.display()
    );
    let child = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut balancer = Started(child);
    // Its lookup is under way once it holds a socket (it listens only after the lookups).
    let looking_up = || {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
        })
    };
    assert!(wait_until(Duration::from_secs(10), looking_up), "the balancer never began a lookup");
    let hup = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
    assert!(hup.success());
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let reloaded_or_gone = || text().contains("SIGHUP: reloading") || balancer.0.try_wait().ok().flatten().is_some();
    assert!(wait_until(Duration::from_secs(15), reloaded_or_gone), "no reload: {}", text());
    let status = balancer.0.try_wait().ok().flatten();
    assert!(status.is_none(), "a SIGHUP during start-up killed the balancer ({status:?}): {}", text());
    assert!(text().contains("listening on"));
    drop(balancer);
    drop(silent);
}
