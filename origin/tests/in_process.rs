//! The origin through its library, on an ephemeral loopback port, over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use origin::{OriginConfig, Synthetic};
use serde_json::{json, Value};
use testkit::{metrics, send_with_urgent_bytes, temp_dir, wait_until, LineClient, Piece, RunningServer};

fn sample_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

fn start(config: OriginConfig) -> RunningServer {
    RunningServer::start(origin::bind(config).unwrap())
}

fn start_default() -> RunningServer {
    start(OriginConfig::new(sample_data()))
}

fn client(addr: SocketAddr) -> LineClient {
    LineClient::connect(addr).unwrap()
}

#[test]
fn pipelined_text_and_json_requests_are_answered_in_order() {
    let server = start_default();
    let mut c = client(server.addr());
    c.send_raw(b"GET article/1\n{\"op\":\"get\",\"key\":\"article/2\",\"id\":5}\r\nMETRICS\n").unwrap();
    let first = c.recv().unwrap();
    assert_eq!(first["status"], "OK");
    assert_eq!(first["data"]["id"], 1);
    assert!(first.get("id").is_none());
    let second = c.recv().unwrap();
    assert_eq!(second["status"], "OK");
    assert_eq!(second["data"]["id"], 2);
    assert_eq!(second["id"], 5);
    let third = c.recv().unwrap();
    assert_eq!(third["status"], "OK");
    assert_eq!(third["data"]["role"], "origin");
}

#[test]
fn every_sample_article_is_served_as_one_line_of_valid_json() {
    let server = start_default();
    let mut c = client(server.addr());
    for n in 1..=4 {
        let answer = c.request(&format!("GET /article/{n}")).unwrap();
        assert_eq!(answer["status"], "OK", "article/{n}: {answer}");
        assert_eq!(answer["data"]["id"], n);
    }
    assert_eq!(c.request("GET article/5").unwrap(), json!({"status": "NOT_FOUND", "data": null}));
}

#[test]
fn ids_are_echoed_as_the_same_json_value() {
    let server = start_default();
    let mut c = client(server.addr());
    for (id, expected) in [("\"abc\"", json!("abc")), ("-12", json!(-12)), ("1.5", json!(1.5))] {
        let answer = c.request(&format!("{{\"op\":\"health\",\"id\":{id}}}")).unwrap();
        assert_eq!(answer["id"], expected);
    }
    let raw = {
        c.send("{\"op\":\"get\",\"key\":\"article/9\",\"id\":12345678901234567890123}").unwrap();
        c.recv_line().unwrap().unwrap()
    };
    assert!(raw.ends_with(",\"id\":12345678901234567890123}\n"), "{raw}");
    let answer = c.request("{\"op\":\"get\",\"key\":\"article/1\",\"id\":null}").unwrap();
    assert!(answer.get("id").is_none(), "{answer}");
    let answer = c.request("{\"op\":\"get\",\"key\":\"article/1\",\"id\":true}").unwrap();
    assert_eq!(answer["status"], "BAD_REQUEST");
    let answer = c.request("{\"op\":\"nope\",\"id\":\"e\"}").unwrap();
    assert_eq!((answer["status"].as_str(), answer["id"].as_str()), (Some("WRONG_METHOD"), Some("e")));
}

#[test]
fn malformed_requests_get_clear_statuses_and_the_connection_survives() {
    let server = start_default();
    let mut c = client(server.addr());
    let cases: &[(&[u8], &str)] = &[
        (b"\xff\xfe\xfd\n", "BAD_REQUEST"),
        (b"GET caf\xc3\n", "BAD_REQUEST"),
        (b"{\"op\":\"get\",\"key\":\n", "BAD_REQUEST"),
        (b"{not json}\n", "BAD_REQUEST"),
        (b"{\"op\":\"get\",\"key\":\"a\"}}\n", "BAD_REQUEST"),
        (b"{\"op\":\"get\",\"key\":[1]}\n", "BAD_REQUEST"),
        (b"{\"key\":\"article/1\"}\n", "BAD_REQUEST"),
        (b"FROB article/1\n", "WRONG_METHOD"),
        (b"{\"op\":\"delete\",\"key\":\"article/1\"}\n", "WRONG_METHOD"),
        (b"PURGE article/1\n", "WRONG_METHOD"),
        (b"GET\n", "BAD_REQUEST"),
        (b"GET article/1 extra\n", "BAD_REQUEST"),
        (b"HEALTH now\n", "BAD_REQUEST"),
        (b"GET a\x00b\n", "BAD_REQUEST"),
        (b"{\"op\":\"get\",\"key\":99999999999999999999999999999999999999999e999999}\n", "BAD_REQUEST"),
        // Unknown fields are ignored, however odd: this is a GET of the missing key `a`.
        (b"{\"op\":\"get\",\"key\":\"a\",\"x\":1e999999,\"y\":[[[[{}]]]]}\n", "NOT_FOUND"),
    ];
    for (line, status) in cases {
        c.send_raw(line).unwrap();
        let answer = c.recv().unwrap();
        assert_eq!(answer["status"], *status, "{:?} -> {answer}", String::from_utf8_lossy(line));
        if *status != "NOT_FOUND" {
            assert!(answer["data"].is_string(), "errors carry a message: {answer}");
        }
    }
    // Blank lines get no answer; the next real request is answered next.
    c.send_raw(b"\n\r\n   \nHEALTH\n").unwrap();
    assert_eq!(c.recv().unwrap()["status"], "OK");
}

#[test]
fn path_traversal_never_reaches_a_file_outside_the_data_dir() {
    let root = temp_dir("traversal");
    let data = root.join("data");
    std::fs::create_dir_all(data.join("public")).unwrap();
    std::fs::write(data.join("public/ok.json"), "{\"fine\":true}").unwrap();
    std::fs::write(root.join("secret.json"), "{\"secret\":\"TOPSECRET\"}").unwrap();
    std::fs::write(root.join("data.json"), "{\"secret\":\"TOPSECRET\"}").unwrap();
    let server = start(OriginConfig::new(&data));
    let mut c = client(server.addr());
    let secret_path = root.join("secret").display().to_string();
    let attempts = [
        "../secret",
        "/../secret",
        "..",
        "public/../../secret",
        "public/../public/ok",
        "./public/ok",
        "public/./ok",
        "public//ok",
        "%2e%2e/secret",
        "%2E%2E%2Fsecret",
        "..%2fsecret",
        "..\\secret",
        "public\\..\\..\\secret",
        "....//secret",
        secret_path.as_str(),
        "//secret",
        "~/secret",
        "public/ok\u{0}",
        "public/ok/../../../secret",
        "\u{2025}/secret",
        "．．/secret",
    ];
    for key in attempts {
        for line in [format!("GET {key}"), format!("{{\"op\":\"get\",\"key\":{}}}", json!(key))] {
            c.send(&line).unwrap();
            let raw = c.recv_line().unwrap().unwrap();
            assert!(!raw.contains("TOPSECRET"), "{line:?} leaked: {raw}");
            let answer: Value = serde_json::from_str(&raw).unwrap();
            assert_ne!(answer["status"], "OK", "{line:?} -> {answer}");
        }
    }
    // Keys that look odd but are legal stay inside the directory and are simply missing.
    for key in ["...", "secret", "data"] {
        let answer = c.request(&format!("GET {key}")).unwrap();
        assert_eq!(answer["status"], "NOT_FOUND", "{key}: {answer}");
    }
    assert_eq!(c.request("GET public/ok").unwrap()["data"], json!({"fine": true}));
}

#[test]
fn data_file_problems_are_origin_errors_and_edits_show_at_once() {
    let dir = temp_dir("files");
    std::fs::write(dir.join("broken.json"), "{\"a\": [1, 2").unwrap();
    std::fs::write(dir.join("big.json"), format!("\"{}\"", "x".repeat(2000))).unwrap();
    std::fs::write(dir.join("live.json"), "{\"v\":1}").unwrap();
    let mut config = OriginConfig::new(&dir);
    config.max_file_bytes = 1000;
    let server = start(config);
    let mut c = client(server.addr());
    let broken = c.request("GET broken").unwrap();
    assert_eq!(broken["status"], "ORIGIN_ERROR");
    assert!(broken["data"].as_str().unwrap().contains("not valid JSON"));
    let big = c.request("GET big").unwrap();
    assert_eq!(big["status"], "ORIGIN_ERROR");
    assert!(big["data"].as_str().unwrap().contains("larger than 1000"));
    assert_eq!(c.request("GET live").unwrap()["data"], json!({"v": 1}));
    std::fs::write(dir.join("live.json"), "{\"v\":2}").unwrap();
    assert_eq!(c.request("GET live").unwrap()["data"], json!({"v": 2}));
    std::fs::remove_file(dir.join("live.json")).unwrap();
    assert_eq!(c.request("GET live").unwrap()["status"], "NOT_FOUND");
}

#[test]
fn a_line_over_max_line_is_rejected_at_once_and_the_connection_closed() {
    let mut config = OriginConfig::new(sample_data());
    config.server.max_line = 1024;
    let server = start(config);

    // Without a newline: answered as soon as more than max_line bytes are buffered.
    let mut c = client(server.addr());
    c.send_raw(&vec![b'G'; 1025]).unwrap();
    let answer = c.recv().unwrap();
    assert_eq!(answer["status"], "BAD_REQUEST");
    assert!(answer["data"].as_str().unwrap().contains("1024"));
    assert!(c.is_closed_by_peer());

    // With a newline, after a valid request that is still answered first.
    let mut c = client(server.addr());
    let mut burst = b"HEALTH\n".to_vec();
    burst.extend(vec![b'x'; 5000]);
    burst.push(b'\n');
    c.send_raw(&burst).unwrap();
    assert_eq!(c.recv().unwrap()["status"], "OK");
    assert_eq!(c.recv().unwrap()["status"], "BAD_REQUEST");
    assert!(c.is_closed_by_peer());

    // Exactly max_line bytes is not too long: a bad key, and the connection stays.
    let mut c = client(server.addr());
    let line = format!("GET {}", "k".repeat(1020));
    assert_eq!(line.len(), 1024);
    assert_eq!(c.request(&line).unwrap()["status"], "BAD_REQUEST");
    assert_eq!(c.request("HEALTH").unwrap()["status"], "OK");
}

#[test]
fn requests_delivered_one_byte_at_a_time_are_reassembled() {
    let server = start_default();
    let mut c = client(server.addr());
    let text = b"GET article/1\r\n{\"op\":\"get\",\"key\":\"article/4\",\"id\":\"b\"}\nHEALTH\n";
    for byte in text {
        c.send_raw(&[*byte]).unwrap();
    }
    assert_eq!(c.recv().unwrap()["data"]["id"], 1);
    assert_eq!(c.recv().unwrap()["id"], "b");
    assert_eq!(c.recv().unwrap()["data"]["role"], "origin");
}

#[test]
fn half_a_line_then_silence_is_closed_by_the_idle_timeout_without_hurting_others() {
    let mut config = OriginConfig::new(sample_data());
    config.server.idle_timeout = Duration::from_millis(300);
    let server = start(config);
    let mut silent = client(server.addr());
    silent.send_raw(b"GET arti").unwrap();
    let started = Instant::now();
    let watcher = thread::spawn(move || (silent.is_closed_by_peer(), started.elapsed()));
    // Another client keeps working meanwhile (never quiet for long), answered promptly.
    let mut busy = client(server.addr());
    while !watcher.is_finished() && started.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        assert_eq!(busy.request("GET article/2").unwrap()["status"], "OK");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        thread::sleep(Duration::from_millis(20));
    }
    let (closed, after) = watcher.join().unwrap();
    assert!(closed, "the silent connection was not closed");
    assert!(after >= Duration::from_millis(290), "closed too early: {after:?}");
    // The busy client is still fine, and the count of open connections dropped.
    assert_eq!(busy.request("HEALTH").unwrap()["status"], "OK");
    assert_eq!(busy.request("METRICS").unwrap()["data"]["connections"], 1);
}

#[test]
fn a_client_that_never_reads_is_bounded_and_others_are_still_served() {
    let server = start_default();
    let rss_before = testkit::rss_kib(std::process::id());
    let mut hog = TcpStream::connect(server.addr()).unwrap();
    hog.set_nonblocking(true).unwrap();
    let chunk: Vec<u8> = b"GET article/1\n".repeat(4096);
    let limit = 256 * 1024 * 1024;
    let mut sent = 0usize;
    let mut blocked_since: Option<Instant> = None;
    let started = Instant::now();
    while sent < limit && started.elapsed() < Duration::from_secs(30) {
        match hog.write(&chunk) {
            Ok(n) => {
                sent += n;
                blocked_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    // The origin stopped reading: what it accepted is the kernel's buffers plus its bounded
    // output, not the 256 MiB (about 3 GiB of answers) the client tried to push.
    assert!(sent < 64 * 1024 * 1024, "the origin kept reading: {sent} bytes accepted");
    let mut other = client(server.addr());
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(other.request("GET article/3").unwrap()["status"], "OK");
        assert!(t.elapsed() < Duration::from_secs(1), "slow answer while a client hogs: {:?}", t.elapsed());
    }
    if let (Some(before), Some(after)) = (rss_before, testkit::rss_kib(std::process::id())) {
        eprintln!("non-reading client: {sent} bytes accepted; test process RSS {before} KiB -> {after} KiB");
        assert!(after < before + 128 * 1024, "RSS grew from {before} KiB to {after} KiB");
    }
    // Once the hog starts reading, it gets its answers and the origin reads on.
    hog.set_nonblocking(false).unwrap();
    hog.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < 4 << 20 {
        got += hog.read(&mut buf).unwrap();
    }
}

#[test]
fn ten_thousand_connect_close_cycles_leave_the_origin_healthy() {
    let server = start_default();
    let mut pacer = client(server.addr());
    for i in 0..10_000 {
        if i % 100 == 0 {
            // A round trip now and then keeps the client from outrunning the server's accept
            // queue when the test machine is busy (a dropped SYN costs a 1 s retransmit).
            assert_eq!(pacer.request("HEALTH").unwrap()["status"], "OK");
        }
        let stream = testkit::connect_from_spread_source(server.addr(), i).unwrap();
        if i % 1000 == 0 {
            // Some of them say something and leave without reading the answer.
            (&stream).write_all(b"GET article/1\n").unwrap();
        }
        drop(stream);
    }
    assert_eq!(pacer.request("GET article/1").unwrap()["status"], "OK");
    assert!(wait_until(Duration::from_secs(5), || metrics(server.addr()).unwrap()["connections"] == 2));
}

#[test]
fn connections_past_max_connections_get_overloaded_and_are_closed() {
    let mut config = OriginConfig::new(sample_data());
    config.server.max_connections = 2;
    let server = start(config);
    let mut a = client(server.addr());
    let mut b = client(server.addr());
    assert_eq!(a.request("HEALTH").unwrap()["status"], "OK");
    assert_eq!(b.request("HEALTH").unwrap()["status"], "OK");
    let mut c = client(server.addr());
    assert_eq!(c.recv().unwrap()["status"], "OVERLOADED");
    assert!(c.is_closed_by_peer());
    drop(a);
    // A slot frees up once the server has seen the close.
    assert!(wait_until(Duration::from_secs(5), || {
        LineClient::connect(server.addr())
            .and_then(|mut d| d.request("HEALTH"))
            .map(|v| v["status"] == "OK")
            .unwrap_or(false)
    }));
    assert_eq!(b.request("HEALTH").unwrap()["status"], "OK");
}

#[test]
fn latency_is_a_timer_so_concurrent_gets_overlap() {
    let mut config = OriginConfig::new(sample_data());
    config.latency = Duration::from_millis(100);
    let server = start(config);
    let mut clients: Vec<LineClient> = (0..200).map(|_| client(server.addr())).collect();
    let started = Instant::now();
    for c in clients.iter_mut() {
        c.send("GET article/1").unwrap();
    }
    for c in clients.iter_mut() {
        assert_eq!(c.recv().unwrap()["status"], "OK");
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(100), "answered before the latency: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(1), "200 concurrent GETs took {elapsed:?}");
}

#[test]
fn delayed_answers_keep_request_order_and_ids_may_overtake() {
    let mut config = OriginConfig::new(sample_data());
    config.latency = Duration::from_millis(150);
    let server = start(config);
    let mut c = client(server.addr());
    // Without ids: HEALTH is ready at once but waits behind the delayed GET.
    c.send_raw(b"GET article/1\nHEALTH\nGET article/2\n").unwrap();
    assert_eq!(c.recv().unwrap()["data"]["id"], 1);
    assert_eq!(c.recv().unwrap()["data"]["role"], "origin");
    assert_eq!(c.recv().unwrap()["data"]["id"], 2);
    // With ids: the HEALTH overtakes the delayed GET.
    c.send_raw(b"{\"op\":\"get\",\"key\":\"article/3\",\"id\":1}\n{\"op\":\"health\",\"id\":2}\n").unwrap();
    assert_eq!(c.recv().unwrap()["id"], 2);
    assert_eq!(c.recv().unwrap()["id"], 1);
    // HEALTH on its own is never delayed by --latency-ms.
    let t = Instant::now();
    assert_eq!(c.request("HEALTH").unwrap()["status"], "OK");
    assert!(t.elapsed() < Duration::from_millis(100));
}

#[test]
fn metrics_count_what_was_answered() {
    let dir = temp_dir("metrics");
    std::fs::write(dir.join("good.json"), "[1]").unwrap();
    std::fs::write(dir.join("bad.json"), "[1").unwrap();
    let server = start(OriginConfig::new(&dir));
    let mut c = client(server.addr());
    for line in ["GET good", "GET good", "GET missing", "GET bad", "GET ../x", "FOO", "HEALTH", "PURGE good"] {
        c.request(line).unwrap();
    }
    let m = c.request("METRICS").unwrap()["data"].clone();
    assert_eq!(m["role"], "origin");
    assert_eq!(m["ok"], 2);
    assert_eq!(m["not_found"], 1);
    assert_eq!(m["errors"], 2, "ORIGIN_ERROR and the GET with a bad key: {m}");
    assert_eq!(m["total_requests"], 9);
    assert_eq!(m["connections"], 1);
    assert!(m["uptime_s"].is_u64());
    let start_time = m["start_time"].as_str().unwrap();
    assert!(start_time.len() >= 20 && start_time.ends_with('Z') && start_time.as_bytes()[10] == b'T', "{start_time}");
    for field in ["p50", "p90", "p99", "max"] {
        assert!(m["latency_us"][field].is_u64(), "{m}");
    }
    let health = c.request("HEALTH").unwrap();
    assert_eq!(health["data"]["role"], "origin");
    assert!(health["data"]["uptime_s"].is_u64());
}

#[test]
fn synthetic_keys_have_values_near_the_requested_size() {
    let mut config = OriginConfig::new(sample_data());
    config.synthetic = Some(Synthetic { count: 1000, value_bytes: 200 });
    let server = start(config);
    let mut c = client(server.addr());
    for key in ["synthetic/0", "synthetic/999"] {
        let answer = c.request(&format!("GET {key}")).unwrap();
        assert_eq!(answer["data"]["key"], key);
        let size = serde_json::to_string(&answer["data"]).unwrap().len();
        assert!((180..=220).contains(&size), "{key}: {size} bytes");
    }
    assert_eq!(c.request("GET synthetic/1000").unwrap()["status"], "NOT_FOUND");
    assert_eq!(c.request("GET article/1").unwrap()["status"], "OK");
}

#[test]
fn shutdown_answers_a_pending_delayed_request_then_stops() {
    let mut config = OriginConfig::new(sample_data());
    config.latency = Duration::from_millis(300);
    let server = start(config);
    let addr = server.addr();
    let mut c = client(addr);
    c.send("GET article/1").unwrap();
    assert!(wait_until(Duration::from_secs(5), || metrics(addr).unwrap()["pending"] == 1));
    let stopper = thread::spawn(move || server.stop());
    assert_eq!(c.recv().unwrap()["status"], "OK");
    stopper.join().unwrap().unwrap();
    assert!(TcpStream::connect(addr).is_err(), "still accepting after the drain");
}

#[test]
fn a_missing_data_dir_fails_at_start_up() {
    let err = origin::bind(OriginConfig::new("/nonexistent/data")).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/data"), "{err}");
}

#[test]
fn a_request_followed_at_once_by_the_clients_close_is_answered_and_the_connection_ends() {
    let mut config = OriginConfig::new(sample_data());
    config.server.idle_timeout = Duration::from_secs(30);
    let server = start(config);
    for _ in 0..50 {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Data and FIN in one go, as `printf 'GET a\n' | nc -N` sends them.
        stream.write_all(b"GET article/1\nGET article/2").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap(); // returns once the origin closes
        assert_eq!(answer.lines().count(), 2, "{answer}");
        assert!(answer.lines().all(|l| l.contains("\"OK\"")), "{answer}");
    }
    // Closed by the origin right after answering, not by the idle timeout.
    assert!(wait_until(Duration::from_secs(2), || metrics(server.addr()).unwrap()["connections"] == 1));
}

/// A read stops at a TCP urgent mark with the rest of the data still queued, and no new
/// readiness event comes for it: the requests behind urgent bytes are answered all the same,
/// and the urgent bytes are ordinary bytes of the stream, each where it was sent (the second
/// one moves the kernel's single urgent mark past the first).
#[test]
fn requests_behind_urgent_bytes_are_answered_with_the_bytes_in_place() {
    let server = start_default();
    let mut c = client(server.addr());
    c.set_timeout(Duration::from_secs(2)).unwrap();
    let pieces = [
        Piece::Plain(b"GET article/1\nGET article/"),
        Piece::Urgent(b'2'),
        Piece::Plain(b"\nGET article/"),
        Piece::Urgent(b'3'),
        Piece::Plain(b"\n"),
    ];
    send_with_urgent_bytes(c.stream(), &pieces).unwrap();
    for n in 1..=3 {
        let answer = c.recv().unwrap_or_else(|e| panic!("answer {n}: {e}"));
        assert_eq!(answer["data"]["id"], n, "{answer}");
    }
}
