//! The admin listener (SPEC 6) over real sockets: its paths and status codes, keep-alive,
//! `/metrics` agreeing with METRICS, the balancer's `/api/*`, and bad input that must cost
//! the line protocol on the same service nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod observe;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use observe::{cluster, data_dir, get, http, http_raw, read_response, sample, Child2};
use testkit::{metrics, rss_kib, wait_until, LineClient};

#[test]
fn paths_methods_and_status_codes() {
    let c = cluster(1);
    for admin in [c.origin.admin, c.proxies[0].admin, c.balancer.admin] {
        let health = get(admin, "/healthz");
        assert_eq!((health.status, health.text().as_str()), (200, "ok"));
        let head = http(admin, "HEAD", "/metrics").unwrap();
        assert_eq!(head.status, 200);
        assert!(head.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
        assert!(head.body.is_empty());
        assert_eq!(http(admin, "POST", "/metrics").unwrap().status, 405);
        assert_eq!(http(admin, "DELETE", "/healthz").unwrap().status, 405);
        assert_eq!(get(admin, "/no/such/path").status, 404);
        assert_eq!(http_raw(admin, b"\x16\x03\x01garbage\r\n\r\n").unwrap().status, 400);
        assert_eq!(
            http_raw(admin, b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap().status,
            400
        );
    }
    // Only the balancer has a dashboard.
    assert_eq!(get(c.proxies[0].admin, "/").status, 404);
    assert_eq!(get(c.balancer.admin, "/").status, 200);
    assert_eq!(http(c.balancer.admin, "PUT", "/api/cluster").unwrap().status, 405);
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let c = cluster(1);
    let mut stream = TcpStream::connect(c.proxies[0].admin).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Pipelined, then one by one.
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut stream).unwrap().text(), "ok");
    assert!(read_response(&mut stream).unwrap().text().contains("cachetier_cache_hits_total"));
    for _ in 0..20 {
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut stream).unwrap().status, 200);
    }
    // Connection: close is honoured.
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut stream).unwrap().status, 200);
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn metrics_agree_with_the_metrics_request() {
    let c = cluster(1);
    let proxy = c.proxies[0].addr();
    let mut client = LineClient::connect(proxy).unwrap();
    for _ in 0..3 {
        assert_eq!(client.request("GET article/1").unwrap()["status"], "OK");
    }
    assert_eq!(client.request("GET article/none").unwrap()["status"], "NOT_FOUND");
    let m = metrics(proxy).unwrap();
    let text = get(c.proxies[0].admin, "/metrics").text();
    assert_eq!(sample(&text, "cachetier_cache_hits_total"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "cachetier_cache_hits_total"), m["hits"].as_f64());
    assert_eq!(sample(&text, "cachetier_cache_misses_total"), m["misses"].as_f64());
    assert_eq!(sample(&text, "cachetier_origin_fetches_total"), m["origin_fetches"].as_f64());
    assert_eq!(sample(&text, "cachetier_cache_entries"), m["entries"].as_f64());
    // METRICS counted itself; the scrape comes after it was answered.
    assert_eq!(sample(&text, "cachetier_requests_total"), m["total_requests"].as_f64());
    assert_eq!(sample(&text, "cachetier_request_duration_seconds_count"), Some(4.0));
    let origin = get(c.origin.admin, "/metrics").text();
    assert!(origin.contains("cachetier_origin_answers_total{status=\"ok\"} 1\n"), "{origin}");
    assert!(origin.contains("cachetier_origin_answers_total{status=\"not_found\"} 1\n"), "{origin}");
}

#[test]
fn balancer_api_cluster_and_history() {
    let c = cluster(2);
    let history_len = || -> usize {
        let history: serde_json::Value = serde_json::from_slice(&get(c.balancer.admin, "/api/history").body).unwrap();
        history["samples"].as_array().map_or(0, Vec::len)
    };
    // The first tick only sets the baseline; traffic after it shows in the next samples.
    assert!(wait_until(Duration::from_secs(10), || history_len() >= 1));
    let mut client = LineClient::connect(c.balancer.addr()).unwrap();
    for i in 0..20 {
        client.request(&format!("GET article/{}", i % 4 + 1)).unwrap();
    }
    let cluster = get(c.balancer.admin, "/api/cluster");
    assert_eq!(cluster.header("content-type").as_deref(), Some("application/json"));
    let data: serde_json::Value = serde_json::from_slice(&cluster.body).unwrap();
    assert_eq!(data["role"], "balancer");
    assert_eq!(data["proxies"].as_object().unwrap().len(), 2);
    assert_eq!(data["total_requests"], 20);
    // The history fills at one sample a second, with the traffic of the last interval.
    let mut history = serde_json::Value::Null;
    assert!(wait_until(Duration::from_secs(10), || {
        history = serde_json::from_slice(&get(c.balancer.admin, "/api/history").body).unwrap();
        history["samples"].as_array().is_some_and(|s| s.iter().any(|s| s["rps"].as_f64() > Some(0.0)))
    }));
    let samples = history["samples"].as_array().unwrap();
    assert!(samples.iter().any(|s| s["rps"].as_f64().unwrap() > 0.0), "{history}");
    assert!(samples.iter().any(|s| s["p99_us"].as_u64().unwrap() > 0), "{history}");
    assert_eq!(history["health"].as_object().unwrap().len(), 2);
    let text = get(c.balancer.admin, "/metrics").text();
    for proxy in &c.proxies {
        let line = format!("cachetier_proxy_up{{proxy=\"{}\"}} 1\n", proxy.addr());
        assert!(text.contains(&line), "{text}");
    }
    assert!(text.contains("# TYPE cachetier_proxy_forwarded_total counter"));
}

/// Round-trip times of `n` HEALTH requests on one line-protocol connection, sorted.
fn health_latencies(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let mut client = LineClient::connect(addr).unwrap();
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(client.request("HEALTH").unwrap()["status"], "OK");
            t.elapsed()
        })
        .collect();
    times.sort();
    times
}

/// The bad clients of SPEC 6 at once, against a proxy binary, while its line protocol is
/// timed: none of them may slow it down, take more than bounded memory, or get more than a
/// 400-class answer or a close.
#[test]
fn bad_admin_clients_cost_the_line_protocol_nothing() {
    let origin = Child2::spawn("origin", &["--port", "0", "--data-dir", &data_dir(), "--log-level", "warn"]).unwrap();
    let origin_port = origin.addr.port().to_string();
    let proxy = Child2::spawn(
        "proxy",
        &[
            "--port",
            "0",
            "--origin-port",
            &origin_port,
            "--admin-port",
            "0",
            "--idle-timeout-ms",
            "1500",
            "--log-level",
            "warn",
        ],
    )
    .unwrap();
    let admin = proxy.admin.unwrap();
    let baseline = health_latencies(proxy.addr, 300);
    let rss_before = rss_kib(proxy.pid()).unwrap();

    // Huge headers: 431 and a close.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    huge.resize(200_000, b'a');
    let mut stream = TcpStream::connect(admin).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = stream.write_all(&huge);
    let answer = read_response(&mut stream).unwrap();
    assert_eq!(answer.status, 431);

    // A client that pipelines scrapes and never reads.
    let mut greedy = TcpStream::connect(admin).unwrap();
    greedy.set_nonblocking(true).unwrap();
    // It keeps sending for up to 2 s (at most 100,000 requests): a service that read them all
    // and buffered every answer would grow by hundreds of MB (checked below).
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".repeat(100_000);
    let mut sent = 0;
    let started = Instant::now();
    while sent < scrape.len() && started.elapsed() < Duration::from_secs(2) {
        match greedy.write(&scrape[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => break,
        }
    }
    // (Socket buffers take most of them; the proxy answers one at a time as they drain.)
    eprintln!("the greedy client got {} requests in", sent / 25);
    // Slowloris: many connections each sending a request head a byte at a time.
    let mut slow: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(admin).unwrap()).collect();
    // Thousands of connections that send nothing (most are refused past the cap).
    let idle: Vec<TcpStream> = (0..2000).filter_map(|_| TcpStream::connect(admin).ok()).collect();
    // The line protocol, timed while the slow clients trickle.
    let mut during = Vec::new();
    for round in 0..10 {
        for s in &mut slow {
            let _ = s.write_all(&b"GET /metrics HTTP/1.1\r\nX: y"[round % 10..round % 10 + 1]);
        }
        during.extend(health_latencies(proxy.addr, 30));
    }
    during.sort();
    let p90 = |t: &[Duration]| t[t.len() * 9 / 10];
    let max = during[during.len() - 1];
    eprintln!(
        "line HEALTH: p90 {:?} / max {:?} alone, p90 {:?} / max {:?} under admin abuse",
        p90(&baseline),
        baseline[baseline.len() - 1],
        p90(&during),
        max
    );
    // A line request waits for at most the one scrape in progress: tens of µs in a release
    // build, up to ~20 ms in a debug build on a loaded 2-core machine (measured), where
    // scheduling alone makes stalls of 100-200 ms. Answering the greedy client's scrapes in one
    // go would hold the loop for seconds.
    assert!(max < Duration::from_secs(1), "the line protocol stalled for {max:?} under admin abuse");
    let allowed = (p90(&baseline) * 20).max(Duration::from_millis(50));
    assert!(p90(&during) <= allowed, "line p90 went from {:?} to {:?} under admin abuse", p90(&baseline), p90(&during));
    // Memory stays bounded: 2000 connections, a greedy client and 200 KB headers cost a few MB.
    let rss_after = rss_kib(proxy.pid()).unwrap();
    assert!(rss_after < rss_before + 32 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");

    // The slowloris connections never finished a request: closed by the deadline.
    let closed = wait_until(Duration::from_secs(10), || {
        slow.iter_mut().all(|s| {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 1];
            matches!(s.read(&mut buf), Ok(0))
                || matches!(s.read(&mut buf), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
        })
    });
    assert!(closed, "slowloris connections were not closed");
    drop(idle);
    drop(greedy);
    // And the admin listener still serves.
    assert!(wait_until(Duration::from_secs(10), || http(admin, "GET", "/healthz").is_ok_and(|r| r.status == 200)));
    assert_eq!(LineClient::connect(proxy.addr).unwrap().request("GET article/1").unwrap()["status"], "OK");
}
