//! Hostile input against each service (origin, proxy, balancer): every case gets the right
//! status or a clean close, the service stays up, another client's requests keep being
//! answered promptly, and memory stays bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::random::SplitMix64;
use serde_json::Value;
use testkit::{metrics, rss_kib, LineClient, RunningServer};

/// Runs HEALTH round trips on its own connection until stopped; returns the slowest.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Duration>,
}

impl Prober {
    fn start(addr: SocketAddr) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut c = LineClient::connect(addr).unwrap();
            let mut worst = Duration::ZERO;
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(c.request("HEALTH").unwrap()["status"], "OK");
                worst = worst.max(t.elapsed());
                thread::sleep(Duration::from_millis(10)); // a steady, light probe
            }
            worst
        });
        Prober { stop, thread }
    }

    fn finish(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn answers(c: &mut LineClient, line: &[u8]) -> Value {
    c.send_raw(line).unwrap();
    c.recv().unwrap()
}

/// The batteries measure this process's RSS and the loop's responsiveness: one at a time, so
/// that neither measures another battery running beside it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Measured: RSS grew 0.6 to 3.3 MiB over a battery (in-process services); the hog got
/// 4.4 to 5.0 MB into the kernel's socket buffers before its writes blocked.
const RSS_GROWTH_BOUND_KIB: u64 = 8 * 1024;
const HOG_BOUND_BYTES: usize = 16 << 20;

/// The whole battery against one service.
fn battery(addr: SocketAddr, role: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let rss_before = rss_kib(std::process::id()).expect("/proc/self/status is needed to measure memory");
    let prober = Prober::start(addr);
    let mut c = LineClient::connect(addr).unwrap();

    // Malformed lines: a clear status each, and the connection goes on.
    let cases: &[(&[u8], &str)] = &[
        (b"\xc3\x28\xa0\xa1\n", "BAD_REQUEST"),
        (b"GET a\x00b\n", "BAD_REQUEST"),
        (b"\x00\x00\x00\n", "WRONG_METHOD"),
        (
            b"{\"op\":\"get\",\"key\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}\n",
            "BAD_REQUEST",
        ),
        (b"{\"op\":\"get\",\"key\":1e999999999}\n", "BAD_REQUEST"),
        (b"{\"op\":5,\"key\":\"a\"}\n", "BAD_REQUEST"),
        (b"{\"op\":\"get\",\"key\":{}}\n", "BAD_REQUEST"),
        (b"{\"op\":\"get\",\"key\":\"a\",\"id\":[]}\n", "BAD_REQUEST"),
        (b"{\"op\":\"get\",\"key\":\"a\",\"id\":{\"x\":1}}\n", "BAD_REQUEST"),
        (b"{\"op\":null}\n", "BAD_REQUEST"),
        (b"{}\n", "BAD_REQUEST"),
        (b"{\"op\":\"health\"\n", "BAD_REQUEST"),
        (b"GET ../../etc/passwd\n", "BAD_REQUEST"),
    ];
    for (line, status) in cases {
        let answer = answers(&mut c, line);
        assert_eq!(answer["status"], *status, "{role}: {:?} -> {answer}", String::from_utf8_lossy(line));
    }
    // A deep but ignored field is skipped, and a huge numeric id is echoed as written.
    let deep = format!("{{\"op\":\"health\",\"x\":{}{},\"id\":1e400}}\n", "[".repeat(20_000), "]".repeat(20_000));
    c.send_raw(deep.as_bytes()).unwrap();
    let raw = c.recv_line().unwrap().unwrap();
    assert!(raw.contains("\"status\":\"OK\"") && raw.ends_with(",\"id\":1e400}\n"), "{role}: {raw}");

    // 10,000 tiny requests in one write: 10,000 answers, in order.
    let burst = b"HEALTH\n".repeat(10_000);
    c.send_raw(&burst).unwrap();
    for _ in 0..10_000 {
        assert_eq!(c.recv().unwrap()["data"]["role"], role);
    }

    // Random bytes with newlines here and there: answered or closed, never a crash.
    let mut rng = SplitMix64::new(99);
    let mut noise = TcpStream::connect(addr).unwrap();
    noise.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let bytes: Vec<u8> = (0..200_000).map(|_| if rng.below(50) == 0 { b'\n' } else { rng.next_u64() as u8 }).collect();
    let _ = noise.write_all(&bytes);
    let _ = noise.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = noise.read_to_end(&mut sink); // ends when the service closes it
                                          // One answer per non-blank line (the last one ends at the close), each a JSON object
                                          // with a status.
    let expected = bytes
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.iter().all(|b| *b == b' ' || *b == b'\t'))
        .count();
    let answers: Vec<&[u8]> = sink.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    assert_eq!(answers.len(), expected, "{role}: answers to the noise");
    for line in answers {
        let answer: Value = serde_json::from_slice(line).unwrap_or_else(|e| panic!("{role}: {e}"));
        assert!(answer["status"].is_string(), "{role}: {answer}");
    }

    // A line longer than --max-line: BAD_REQUEST at once, then a clean close.
    let mut long = LineClient::connect(addr).unwrap();
    long.send_raw(&vec![b'a'; 70_000]).unwrap();
    assert_eq!(long.recv().unwrap()["status"], "BAD_REQUEST");
    assert!(long.is_closed_by_peer());

    // Slowloris: a byte every 100 ms is still a request, answered when the line ends.
    let mut slow = LineClient::connect(addr).unwrap();
    for byte in b"HEALTH\n" {
        slow.send_raw(&[*byte]).unwrap();
        thread::sleep(Duration::from_millis(100)); // the attack is the pacing itself
    }
    assert_eq!(slow.recv().unwrap()["status"], "OK");

    // Many half-open connections: half a line each, then silence.
    let half_open: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET synth").unwrap();
            s
        })
        .collect();

    // A client that pipelines and never reads: its reading is paused, others are not.
    let mut hog = TcpStream::connect(addr).unwrap();
    hog.set_nonblocking(true).unwrap();
    let chunk = b"HEALTH\n".repeat(10_000);
    let (mut sent, started) = (0usize, Instant::now());
    let mut blocked_since = None;
    while started.elapsed() < Duration::from_secs(20) {
        match hog.write(&chunk) {
            Ok(n) => {
                sent += n;
                blocked_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if blocked_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(300) {
                    break;
                }
                thread::sleep(Duration::from_millis(5)); // waiting for the socket to stay full
            }
            Err(e) => panic!("{role}: hog write failed: {e}"),
        }
    }
    assert!(sent < HOG_BOUND_BYTES, "{role} kept reading a client that never reads: {sent} bytes");

    // Still serving normally, with everything above still connected.
    assert_eq!(LineClient::connect(addr).unwrap().request("HEALTH").unwrap()["status"], "OK");
    let worst = prober.finish();
    // Normal is a few ms; the margin is for a busy 2-core CI machine, far below a stalled loop.
    assert!(worst < Duration::from_secs(1), "{role}: a HEALTH took {worst:?} during the battery");
    let rss_after = rss_kib(std::process::id()).expect("/proc/self/status is needed to measure memory");
    eprintln!(
        "bad input vs {role}: slowest probe {worst:?}; hog sent {sent} bytes; RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(rss_after < rss_before + RSS_GROWTH_BOUND_KIB, "{role}: memory grew from {rss_before} to {rss_after} KiB");
    drop(half_open);
}

fn origin() -> RunningServer {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut config = origin::OriginConfig::new(data);
    config.synthetic = Some(origin::Synthetic { count: 100, value_bytes: 100 });
    RunningServer::start(origin::bind(config).unwrap())
}

#[test]
fn the_origin_survives_the_battery() {
    let origin = origin();
    battery(origin.addr(), "origin");
}

#[test]
fn the_proxy_survives_the_battery() {
    let origin = origin();
    let proxy = RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin.addr())).unwrap());
    battery(proxy.addr(), "proxy");
}

#[test]
fn the_balancer_survives_the_battery() {
    let origin = origin();
    let proxy = RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin.addr())).unwrap());
    let balancer = RunningServer::start(balancer::bind(balancer::BalancerConfig::new(&[proxy.addr()])).unwrap());
    battery(balancer.addr(), "balancer");
}

/// Measured: 259 MB before (each collapsed follower got its own copy of the 256 KiB answer);
/// the bound is the SPEC's 16 MiB target.
const COLLAPSE_RSS_BOUND_KIB: u64 = 16 * 1024;

/// SPEC 3.8 at the balancer: 1,000 pipelined GETs of one 256 KiB value, collapsed onto one
/// upstream request, for a client that never reads: the answers share the value's bytes.
#[test]
fn collapsed_answers_to_a_client_that_never_reads_stay_bounded() {
    use testkit::ChildService;
    use testkit::{data_dir_with_big_value, rss_growth_under_a_non_reading_client, workspace_bin};
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = data_dir_with_big_value("balancer-rss", 256 * 1024);
    let bin = |name: &str| workspace_bin(name).unwrap().to_str().unwrap().to_owned();
    let origin = ChildService::spawn(
        &bin("origin"),
        &["--port", "0", "--data-dir", dir.to_str().unwrap(), "--latency-ms", "300"],
    )
    .unwrap();
    let origin_port = origin.addr().port().to_string();
    let proxy = ChildService::spawn(&bin("proxy"), &["--port", "0", "--origin-port", &origin_port]).unwrap();
    let proxy_addr = proxy.addr().to_string();
    let balancer = ChildService::spawn(&bin("balancer"), &["--port", "0", "--proxies", &proxy_addr]).unwrap();
    let addr = balancer.addr();
    // Wait for the balancer to see the proxy healthy, so that the GETs are forwarded.
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        LineClient::connect(addr).unwrap().request("GET big").unwrap()["status"] == "OK"
    }));
    let proxy_purge = LineClient::connect(proxy.addr()).unwrap().request("PURGE big").unwrap();
    assert_eq!(proxy_purge["status"], "OK");
    let mut last = (0, 0);
    let growth = rss_growth_under_a_non_reading_client(addr, balancer.pid(), "GET big\n", 1000, || {
        let d = metrics(addr).unwrap();
        let in_flight: u64 = d["proxies"].as_object().unwrap().values().map(|p| p["in_flight"].as_u64().unwrap()).sum();
        // One routed, a window's worth collapsed onto it, the rest parked for room (SPEC 3.8);
        // the few answers the kernel's socket buffers take are answered. Settled once nothing
        // moves between two looks.
        let now = (d["collapsed"].as_u64().unwrap(), d["waiting_for_room"].as_u64().unwrap());
        let settled = now.0 > 0 && now.0 + now.1 >= 990 && in_flight == 0 && now == last;
        last = now;
        settled
    })
    .unwrap();
    eprintln!("balancer (collapsing) RSS growth under 1,000 x 256 KiB for a non-reading client: {growth} KiB");
    assert!(growth < COLLAPSE_RSS_BOUND_KIB, "balancer grew by {growth} KiB");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The service fuzz targets' harness (`fuzz/src/lib.rs`), compiled into this test so that
/// every input a fuzzer ever crashed on is replayed here the way the target ran it.
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
#[path = "../../fuzz/src/lib.rs"]
mod fuzz_harness;

/// Replays every crasher kept under `fuzz/regressions/<target>/` through its target's
/// harness: no panic, one valid answer per request line, the service still serving.
fn replay_crashers(target: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    let entries = std::fs::read_dir(root.join(target)).unwrap();
    for entry in entries {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        match target {
            "origin_service" => fuzz_harness::drive(fuzz_harness::origin(), &data),
            "proxy_service" => {
                let (client, answer) = fuzz_harness::split(&data);
                let (addr, origin) = fuzz_harness::proxy();
                origin.set(answer);
                fuzz_harness::drive(addr, client);
            }
            _ => {
                let (client, answer) = fuzz_harness::split(&data);
                let (addr, proxy) = fuzz_harness::balancer();
                proxy.set(answer);
                // The balancer only forwards once it has seen the peer healthy.
                assert!(testkit::wait_until(Duration::from_secs(5), || {
                    metrics(addr).unwrap()["proxies"].as_object().unwrap().values().all(|p| p["healthy"] == true)
                }));
                fuzz_harness::drive(addr, client);
            }
        }
        replayed += 1;
    }
    replayed
}

/// The origin and proxy crashers: both were the harness's own (an EINTR from libFuzzer's
/// timer signal taken for a hang), kept all the same.
#[test]
fn every_origin_and_proxy_fuzz_crasher_is_replayed() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    assert!(replay_crashers("origin_service") >= 1);
    assert!(replay_crashers("proxy_service") >= 1);
}

/// Found by `balancer_service`: a proxy (plain, one request per connection) answering
/// `{"status":"éé","dlata":null}`, or a line holding invalid UTF-8, was relayed to the client
/// unchanged: an answer without `data`, or not JSON at all (SPEC 2.3). Both are now garbage:
/// the attempt is retried, then `PROXY_UNREACHABLE`.
#[test]
fn every_balancer_fuzz_crasher_is_replayed() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    assert!(replay_crashers("balancer_service") >= 1);
}
