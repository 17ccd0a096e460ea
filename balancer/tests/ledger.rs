//! Faults injected into a cluster of real binaries (origin, 3 proxies, balancer) while a
//! bounded load runs, checked against a ledger: every request got exactly one answer (the
//! workers run in lockstep and finally check that nothing more arrives), the answer is for
//! its own key, its status is one the fault makes correct, the fault visibly had an effect
//! (failed attempts, origin failures, stale answers, reconnections), and the cluster is all
//! healthy again afterwards. The counts of each scenario are printed (`--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{free_port, metrics, wait_until, workspace_bin, ChildService, LineClient};

const WORKERS: usize = 8;
const PER_WORKER: usize = 5_000;
/// However fast the cluster, the load goes on until the fault is over (the checks of its
/// effect need requests during it), up to this many requests per worker.
const MAX_PER_WORKER: usize = 50_000;
const KEYS: usize = 200;

fn bin(name: &str) -> String {
    workspace_bin(name).unwrap().display().to_string()
}

struct Cluster {
    origin_port: u16,
    proxy_ports: Vec<u16>,
    lb_port: u16,
    proxy_args: Vec<String>,
    origin: ChildService,
    proxies: Vec<Option<ChildService>>,
    balancer: Option<ChildService>,
}

impl Cluster {
    fn start(proxy_args: &[&str]) -> Cluster {
        let origin_port = free_port().unwrap();
        let proxy_ports: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
        let lb_port = free_port().unwrap();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data").display().to_string();
        let origin_port_s = origin_port.to_string();
        let origin = ChildService::spawn(
            &bin("origin"),
            &["--port", &origin_port_s, "--data-dir", &data, "--synthetic-keys", "1000", "--log-level", "warn"],
        )
        .unwrap();
        let mut cluster = Cluster {
            origin_port,
            proxy_ports,
            lb_port,
            proxy_args: proxy_args.iter().map(|s| s.to_string()).collect(),
            origin,
            proxies: Vec::new(),
            balancer: None,
        };
        cluster.proxies = (0..3).map(|i| Some(cluster.spawn_proxy(i))).collect();
        cluster.balancer = Some(cluster.spawn_balancer());
        cluster
    }

    fn spawn_proxy(&self, i: usize) -> ChildService {
        let (port, origin) = (self.proxy_ports[i].to_string(), self.origin_port.to_string());
        let mut args = vec!["--port", &port, "--origin-port", &origin, "--log-level", "warn"];
        args.extend(self.proxy_args.iter().map(String::as_str));
        ChildService::spawn(&bin("proxy"), &args).unwrap()
    }

    fn spawn_balancer(&self) -> ChildService {
        let port = self.lb_port.to_string();
        let proxies: Vec<String> = self.proxy_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--port", &port, "--log-level", "warn", "--proxies"];
        args.extend(proxies.iter().map(String::as_str));
        ChildService::spawn(&bin("balancer"), &args).unwrap()
    }

    fn lb(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.lb_port))
    }

    fn all_healthy(&self) -> bool {
        metrics(self.lb()).is_ok_and(|m| {
            m["proxies"].as_object().is_some_and(|p| p.len() == 3 && p.values().all(|v| v["healthy"] == true))
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillProxy,
    StopProxy,
    RestartProxy,
    StopOrigin,
    RestartBalancer,
}

impl Fault {
    /// Checks that the fault happened as far as the cluster could see: a scenario whose fault
    /// did nothing would pass its status checks trivially.
    fn check_effect(self, ledger: &Ledger, balancer: &Value, victim: &str) -> Result<(), String> {
        let p = &balancer["proxies"][victim];
        let count = |v: &Value| v.as_u64().unwrap_or(0);
        match self {
            // A stopped proxy that is back before its GETs time out may leave no failure behind
            // (SPEC 3.6: slow is not dead); its GETs then waited, which the latency shows.
            Fault::StopProxy if count(&balancer["latency_us"]["max"]) >= 300_000 => Ok(()),
            Fault::KillProxy | Fault::StopProxy | Fault::RestartProxy => {
                let seen = count(&p["failures"]) > 0 || count(&balancer["retries"]) > 0 || p["healthy"] == false;
                seen.then_some(()).ok_or(format!("the balancer saw no failure of {victim}: {p}"))
            }
            Fault::StopOrigin => {
                let failures = ledger.statuses.get("ORIGIN_FAILURE").copied().unwrap_or(0);
                (failures + ledger.stale > 0)
                    .then_some(())
                    .ok_or("no answer shows the origin stopped (no ORIGIN_FAILURE, nothing stale)".into())
            }
            Fault::RestartBalancer => {
                (ledger.resent > 0).then_some(()).ok_or("no worker lost its connection to the killed balancer".into())
            }
        }
    }

    /// What an operator does afterwards so that the cluster can be whole again.
    fn recover(self, cluster: &mut Cluster) {
        if let Fault::KillProxy = self {
            if let Some(mut dead) = cluster.proxies[1].take() {
                dead.wait_exit(Duration::from_secs(5)).unwrap();
            }
            cluster.proxies[1] = Some(cluster.spawn_proxy(1));
        }
    }

    fn inject(self, cluster: &mut Cluster) {
        match self {
            Fault::KillProxy => cluster.proxies[1].as_ref().unwrap().signal("KILL").unwrap(),
            Fault::StopProxy => {
                let proxy = cluster.proxies[1].as_ref().unwrap();
                proxy.signal("STOP").unwrap();
                thread::sleep(Duration::from_secs(2)); // the fault lasts 2 s
                proxy.signal("CONT").unwrap();
            }
            Fault::RestartProxy => {
                let mut victim = cluster.proxies[1].take().unwrap();
                victim.signal("KILL").unwrap();
                victim.wait_exit(Duration::from_secs(5)).unwrap();
                thread::sleep(Duration::from_secs(1)); // down for a second
                cluster.proxies[1] = Some(cluster.spawn_proxy(1));
            }
            Fault::StopOrigin => {
                cluster.origin.signal("STOP").unwrap();
                thread::sleep(Duration::from_secs(2)); // the fault lasts 2 s
                cluster.origin.signal("CONT").unwrap();
            }
            Fault::RestartBalancer => {
                let mut old = cluster.balancer.take().unwrap();
                old.signal("KILL").unwrap();
                old.wait_exit(Duration::from_secs(5)).unwrap();
                thread::sleep(Duration::from_millis(500)); // down for half a second
                cluster.balancer = Some(cluster.spawn_balancer());
            }
        }
    }
}

/// One worker's requests: each answered exactly once, resent after a lost connection.
#[derive(Default)]
struct Ledger {
    sent: usize,
    statuses: BTreeMap<String, usize>,
    stale: usize,
    resent: usize,
    answers: usize,
}

fn connect(addr: SocketAddr) -> LineClient {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match LineClient::connect_timeout(addr, Duration::from_secs(1)) {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)), // retry pacing
            Err(e) => panic!("cannot reconnect to {addr}: {e}"),
        }
    }
}

fn worker(addr: SocketAddr, t: usize, done: Arc<AtomicUsize>, fault_over: Arc<AtomicBool>) -> Ledger {
    let mut ledger = Ledger::default();
    let mut c = connect(addr);
    let mut i = 0;
    while i < MAX_PER_WORKER && (i < PER_WORKER || !fault_over.load(Ordering::Relaxed)) {
        i += 1;
        let key = format!("synthetic/{}", (t * PER_WORKER + i) % KEYS);
        let answer: Value = loop {
            match c.request(&format!("GET {key}")) {
                Ok(answer) => break answer,
                Err(_) => {
                    // The balancer went away mid-request: a GET is safe to send again.
                    ledger.resent += 1;
                    c = connect(addr);
                }
            }
        };
        ledger.sent += 1;
        ledger.answers += 1;
        let status = answer["status"].as_str().unwrap_or("?").to_owned();
        if status == "OK" {
            assert_eq!(answer["data"]["key"], key.as_str(), "an answer for another key: {answer}");
        }
        if answer["stale"] == true {
            ledger.stale += 1;
        }
        *ledger.statuses.entry(status).or_default() += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    // Nothing more may arrive: no request was answered twice.
    c.set_timeout(Duration::from_millis(200)).unwrap();
    assert!(!matches!(c.recv_line(), Ok(Some(_))), "an extra answer arrived");
    ledger
}

/// Scenarios take turns: six clusters of real binaries at once on a 2-core machine would test
/// the machine's patience rather than the cluster.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn scenario(name: &str, fault: Fault, proxy_args: &[&str], allowed: &[&str]) {
    scenario_with(name, fault, proxy_args, allowed, false);
}

fn scenario_with(name: &str, fault: Fault, proxy_args: &[&str], allowed: &[&str], expect_stale: bool) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut cluster = Cluster::start(proxy_args);
    assert!(wait_until(Duration::from_secs(10), || cluster.all_healthy()));
    let done = Arc::new(AtomicUsize::new(0));
    let fault_over = Arc::new(AtomicBool::new(false));
    let addr = cluster.lb();
    let workers: Vec<_> = (0..WORKERS)
        .map(|t| {
            let (done, fault_over) = (done.clone(), fault_over.clone());
            thread::spawn(move || worker(addr, t, done, fault_over))
        })
        .collect();
    assert!(wait_until(Duration::from_secs(60), || done.load(Ordering::Relaxed) >= WORKERS * PER_WORKER / 4));
    let started = Instant::now();
    fault.inject(&mut cluster);
    let fault_time = started.elapsed();
    fault_over.store(true, Ordering::Relaxed);
    let mut ledger = Ledger::default();
    for w in workers {
        let l = w.join().unwrap();
        for (status, n) in l.statuses {
            *ledger.statuses.entry(status).or_default() += n;
        }
        ledger.stale += l.stale;
        ledger.sent += l.sent;
        ledger.resent += l.resent;
        ledger.answers += l.answers;
    }
    eprintln!(
        "ledger {name}: {} requests, {} answered, statuses {:?}, stale {}, resent after reconnect {}, fault took {:?}",
        ledger.sent, ledger.answers, ledger.statuses, ledger.stale, ledger.resent, fault_time
    );
    // Counted from the workers' answers (in lockstep, one per request, none extra).
    assert_eq!(ledger.answers, ledger.sent, "every request answered exactly once");
    for status in ledger.statuses.keys() {
        assert!(allowed.contains(&status.as_str()), "{name}: {status} is not a correct answer to this fault");
    }
    let victim = format!("127.0.0.1:{}", cluster.proxy_ports[1]);
    let balancer_metrics = metrics(cluster.lb()).unwrap();
    if let Err(why) = fault.check_effect(&ledger, &balancer_metrics, &victim) {
        panic!("{name}: the fault had no visible effect: {why}");
    }
    if expect_stale {
        assert!(ledger.stale > 0, "{name}: stale-if-error served nothing stale");
        let ok = ledger.statuses.get("OK").copied().unwrap_or(0);
        assert_eq!(ok, ledger.sent, "{name}: every answer OK, fresh or stale");
    }
    fault.recover(&mut cluster);
    assert!(wait_until(Duration::from_secs(15), || cluster.all_healthy()), "{name}: not all healthy again");
}

#[test]
fn ledger_kill_9_of_a_proxy() {
    scenario("kill -9 proxy", Fault::KillProxy, &["--cache-type", "lru"], &["OK"]);
}

#[test]
fn ledger_sigstop_of_a_proxy_for_2s() {
    scenario("SIGSTOP proxy 2s", Fault::StopProxy, &["--cache-type", "lru"], &["OK"]);
}

#[test]
fn ledger_restart_of_a_killed_proxy() {
    scenario("restart killed proxy", Fault::RestartProxy, &["--cache-type", "lru"], &["OK"]);
}

/// Entries expire every second, so misses reach the stopped origin. The proxies give up on
/// it after 500 ms, before the balancer's 1 s try timeout, so ORIGIN_FAILURE is the correct
/// answer for a miss during the 2 s stop.
#[test]
fn ledger_origin_stopped_for_2s_without_stale() {
    let args = ["--cache-type", "ttl", "--ttl", "1", "--origin-timeout-ms", "500"];
    scenario("origin stopped 2s", Fault::StopOrigin, &args, &["OK", "ORIGIN_FAILURE"]);
}

/// The same with --stale-if-error: every key was cached before the stop, so every answer is
/// OK (the ones the origin could not refresh marked stale).
#[test]
fn ledger_origin_stopped_for_2s_with_stale_if_error() {
    let args = ["--cache-type", "ttl", "--ttl", "1", "--origin-timeout-ms", "500", "--stale-if-error", "30"];
    scenario_with("origin stopped 2s, stale-if-error", Fault::StopOrigin, &args, &["OK"], true);
}

/// The load reconnects and sends its interrupted GETs again; each is answered once.
#[test]
fn ledger_kill_and_restart_of_the_balancer() {
    scenario("balancer killed and restarted", Fault::RestartBalancer, &["--cache-type", "lru"], &["OK"]);
}
