//! Large values (SPEC 3.8, issue 15): values up to the origin's 8 MiB file limit pass through
//! every tier intact to clients that write their requests and read their answers in small
//! random pieces (so every service meets partial reads and partial writes), pipelined, with
//! and without ids, on a miss and on a hit; and a client that pipelines large GETs and never
//! reads costs the balancer no more than its output bound and a few buffers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::random::SplitMix64;
use serde_json::Value;
use testkit::{metrics, rss_kib, temp_dir, wait_until, ChildService, LineClient, RunningServer};

/// Value sizes (bytes of each file's JSON): small, just past the sharing thresholds, the
/// benchmark's 64 KiB and 512 KiB, and the origin's default `--max-file-bytes` exactly.
const SIZES: [usize; 5] = [1000, 40 * 1024, 64 * 1024, 512 * 1024, 8 * 1024 * 1024];

/// A JSON string of `bytes` bytes whose letters depend on `seed`, so that a byte taken from
/// another answer, or moved, shows.
fn value_json(seed: u64, bytes: usize) -> String {
    let mut rng = SplitMix64::new(seed);
    let mut text = String::with_capacity(bytes);
    text.push('"');
    while text.len() < bytes - 1 {
        text.push(char::from(b'a' + (rng.next_u64() % 26) as u8));
    }
    text.push('"');
    text
}

/// A data directory with `big0.json` … one file per size; returns it and the values.
fn data_dir(label: &str, sizes: &[usize]) -> (PathBuf, Vec<String>) {
    let dir = temp_dir(label);
    let values: Vec<String> = sizes.iter().enumerate().map(|(i, size)| value_json(i as u64 + 1, *size)).collect();
    for (i, value) in values.iter().enumerate() {
        std::fs::write(dir.join(format!("big{i}.json")), value).unwrap();
    }
    (dir, values)
}

/// Writes `bytes` in random pieces of 1..=`max_piece` bytes.
fn trickle_write(stream: &mut TcpStream, bytes: &[u8], rng: &mut SplitMix64, max_piece: usize) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = (1 + rng.below(max_piece)).min(rest.len());
        stream.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
    }
}

/// Reads `count` answer lines in random pieces of 1..=`max_piece` bytes (bounded in time).
fn trickle_read(stream: &mut TcpStream, count: usize, rng: &mut SplitMix64, max_piece: usize) -> Vec<Value> {
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = Vec::new();
    let mut piece = vec![0u8; max_piece];
    let mut answers = Vec::new();
    while answers.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} answers within 120 s", answers.len());
        let n = 1 + rng.below(max_piece);
        let got = stream.read(&mut piece[..n]).unwrap();
        assert!(got > 0, "closed after {} of {count} answers", answers.len());
        let scanned = buf.len();
        buf.extend_from_slice(&piece[..got]);
        if memchr_newline(&buf[scanned..]).is_none() {
            continue;
        }
        while let Some(end) = memchr_newline(&buf) {
            answers.push(serde_json::from_slice(&buf[..end]).unwrap());
            buf.drain(..=end);
        }
    }
    assert!(buf.is_empty(), "bytes after the last answer");
    answers
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

/// One pipelined exchange at `addr`: for every value, `GET bigI` (in order) and a JSON GET
/// with a string id, then checks every answer: ordered ones in order, id'd ones by id, each
/// value byte for byte. Returns the answers' `cache_hit` fields.
fn pipelined_round(addr: SocketAddr, values: &[String], seed: u64) -> Vec<Option<bool>> {
    let mut rng = SplitMix64::new(seed);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut requests = String::new();
    let mut ordered = Vec::new();
    for (i, _) in values.iter().enumerate() {
        requests.push_str(&format!("GET big{i}\n"));
        ordered.push(i);
        requests.push_str(&format!("{{\"op\":\"get\",\"key\":\"big{i}\",\"id\":\"r{seed}-{i}\"}}\n"));
    }
    trickle_write(&mut stream, requests.as_bytes(), &mut rng, 7);
    let answers = trickle_read(&mut stream, 2 * values.len(), &mut rng, 8192);
    let mut by_id = HashMap::new();
    let mut in_order = Vec::new();
    let mut hits = Vec::new();
    for answer in &answers {
        assert_eq!(answer["status"], "OK", "{}", &answer.to_string()[..answer.to_string().len().min(200)]);
        hits.push(answer.get("cache_hit").and_then(Value::as_bool));
        match answer.get("id") {
            Some(id) => {
                by_id.insert(id.as_str().unwrap().to_owned(), answer["data"].clone());
            }
            None => in_order.push(answer["data"].clone()),
        }
    }
    assert_eq!(in_order.len(), ordered.len());
    for (i, data) in ordered.iter().zip(&in_order) {
        let expected: Value = serde_json::from_str(&values[*i]).unwrap();
        assert!(*data == expected, "ordered answer {i} ({} bytes) differs", values[*i].len());
    }
    for (i, value) in values.iter().enumerate() {
        let expected: Value = serde_json::from_str(value).unwrap();
        assert!(by_id[&format!("r{seed}-{i}")] == expected, "answer with id {i} ({} bytes) differs", value.len());
    }
    hits
}

fn start_origin(dir: &Path) -> RunningServer {
    RunningServer::start(origin::bind(origin::OriginConfig::new(dir)).unwrap())
}

fn start_proxy(origin: SocketAddr) -> RunningServer {
    RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin)).unwrap())
}

#[test]
fn large_values_pass_every_tier_intact_through_small_reads_and_writes() {
    let (dir, values) = data_dir("large-values", &SIZES);
    let origin = start_origin(&dir);
    let proxies = [start_proxy(origin.addr()), start_proxy(origin.addr())];
    let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
    let mut config = balancer::BalancerConfig::new(&addrs);
    config.health_interval = Duration::from_millis(50);
    let balancer = RunningServer::start(balancer::bind(config).unwrap());
    // The balancer multiplexes only to proxies its probes found healthy.
    assert!(wait_until(Duration::from_secs(10), || {
        let d = metrics(balancer.addr()).unwrap();
        d["proxies"].as_object().unwrap().values().all(|p| p["healthy"] == true)
    }));

    pipelined_round(origin.addr(), &values, 1);
    // At a proxy: the first round misses (fetched, coalesced), the second hits.
    pipelined_round(proxies[0].addr(), &values, 2);
    let hits = pipelined_round(proxies[0].addr(), &values, 3);
    assert!(hits.iter().all(|h| *h == Some(true)), "{hits:?}");
    // Through the balancer, twice (misses at the other proxy, then hits), then one GET of
    // each value at a time, so no answer is collapsed with another.
    pipelined_round(balancer.addr(), &values, 4);
    pipelined_round(balancer.addr(), &values, 5);
    let mut client = LineClient::connect(balancer.addr()).unwrap();
    client.set_timeout(Duration::from_secs(30)).unwrap();
    for (i, value) in values.iter().enumerate() {
        let answer = client.request(&format!("GET big{i}")).unwrap();
        assert!(answer["data"] == serde_json::from_str::<Value>(value).unwrap(), "value {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Measured: 16.2 MiB of growth (15.6 MiB release; main before issue 15, which copied every
/// answer: 17 MiB): one copy of each of the 32 values the answers wait on, and the input
/// buffer the first answer is relayed from. 31.7 MiB when each waiting answer pinned the
/// input buffer it was read into. Bound: the measure with a margin, far below the 128 MiB
/// the client asked for.
const SLOW_READER_RSS_BOUND_KIB: u64 = 24 * 1024;

/// SPEC 3.8 at the balancer for answers relayed from its input buffer: 256 pipelined GETs of
/// 32 distinct 512 KiB values (each GET after the 32nd collapsed onto one in flight) from a
/// client that reads nothing until the balancer has stopped reading it; then every answer
/// arrives intact, in order.
#[test]
fn a_slow_reader_of_large_values_stays_within_the_memory_bound() {
    const KEYS: usize = 32;
    const REQUESTS: usize = 256;
    let (dir, values) = data_dir("large-slow-reader", &[512 * 1024; KEYS]);
    let bin = |name: &str| testkit::workspace_bin(name).unwrap().to_str().unwrap().to_owned();
    let origin = ChildService::spawn(&bin("origin"), &["--port", "0", "--data-dir", dir.to_str().unwrap()]).unwrap();
    let origin_port = origin.addr().port().to_string();
    let proxy = ChildService::spawn(&bin("proxy"), &["--port", "0", "--origin-port", &origin_port]).unwrap();
    let proxy_addr = proxy.addr().to_string();
    let balancer = ChildService::spawn(&bin("balancer"), &["--port", "0", "--proxies", &proxy_addr]).unwrap();
    let addr = balancer.addr();
    assert!(wait_until(Duration::from_secs(10), || {
        LineClient::connect(addr).unwrap().request("GET big0").unwrap()["status"] == "OK"
    }));
    // Every value cached at the proxy, so that answers come back as fast as it can write.
    let mut warm = LineClient::connect(proxy.addr()).unwrap();
    for i in 0..KEYS {
        assert_eq!(warm.request(&format!("GET big{i}")).unwrap()["status"], "OK");
    }
    let before = rss_kib(balancer.pid()).unwrap();
    let mut slow = TcpStream::connect(addr).unwrap();
    let requests: String = (0..REQUESTS).map(|n| format!("GET big{}\n", n % KEYS)).collect();
    slow.write_all(requests.as_bytes()).unwrap();
    // Settled: nothing in flight to the proxy and nothing more forwarded between two polls.
    let forwarded = || {
        let d = metrics(addr).unwrap();
        let p = d["proxies"].as_object().unwrap().values().next().unwrap().clone();
        (p["in_flight"].as_u64().unwrap(), p["forwarded"].as_u64().unwrap())
    };
    let mut last = u64::MAX;
    assert!(wait_until(Duration::from_secs(20), || {
        let (in_flight, sent) = forwarded();
        let settled = in_flight == 0 && sent == last;
        last = sent;
        settled
    }));
    let growth = rss_kib(balancer.pid()).unwrap().saturating_sub(before);
    eprintln!("balancer RSS growth under {REQUESTS} x 512 KiB for a client that does not read: {growth} KiB");
    assert!(growth < SLOW_READER_RSS_BOUND_KIB, "balancer grew by {growth} KiB");
    assert!(last < REQUESTS as u64, "the balancer should have stopped reading: forwarded {last}");
    // Now read: every answer, in order, intact.
    let mut rng = SplitMix64::new(9);
    let answers = trickle_read(&mut slow, REQUESTS, &mut rng, 64 * 1024);
    for (n, answer) in answers.iter().enumerate() {
        let expected: Value = serde_json::from_str(&values[n % KEYS]).unwrap();
        assert!(answer["data"] == expected, "answer {n} differs");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
