//! Hostile review of the limits of SPEC 3.8 over real binaries: what one connection can make
//! the balancer hold, whatever its forwarding window guessed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use common::testkit::{metrics, rss_kib, temp_dir, wait_until, workspace_bin, ChildService};
use serde_json::Value;

const TINY: usize = 300;
const CLIENTS: usize = 4;
const BIG: usize = 32;
const BIG_BYTES: usize = 2 * 1024 * 1024;

/// `tiny/0…`, a few bytes each (the big values are the origin's synthetic ones, which name
/// their key, so a swapped answer shows).
fn data_dir() -> PathBuf {
    let dir = temp_dir("hostile-limits");
    std::fs::create_dir_all(dir.join("tiny")).unwrap();
    for i in 0..TINY {
        std::fs::write(dir.join(format!("tiny/{i}.json")), format!("{i}")).unwrap();
    }
    dir
}

fn bin(name: &str) -> String {
    workspace_bin(name).unwrap().to_str().unwrap().to_owned()
}

fn cluster(dir: &std::path::Path) -> (ChildService, ChildService, ChildService) {
    let (keys, bytes) = ((CLIENTS * BIG).to_string(), BIG_BYTES.to_string());
    let args = ["--port", "0", "--data-dir", dir.to_str().unwrap(), "--synthetic-keys", &keys, "--value-bytes", &bytes];
    let origin = ChildService::spawn(&bin("origin"), &args).unwrap();
    let origin_port = origin.addr().port().to_string();
    let proxy =
        ChildService::spawn(&bin("proxy"), &["--port", "0", "--origin-port", &origin_port, "--cache-type", "lru"])
            .unwrap();
    let proxy_addr = proxy.addr().to_string();
    let balancer = ChildService::spawn(&bin("balancer"), &["--port", "0", "--proxies", &proxy_addr]).unwrap();
    (origin, proxy, balancer)
}

fn read_answers(reader: &mut BufReader<TcpStream>, count: usize) -> Vec<Value> {
    (0..count)
        .map(|_| {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "closed early");
            serde_json::from_str(&line).unwrap()
        })
        .collect()
}

fn routed(balancer: SocketAddr) -> (u64, u64) {
    let m = metrics(balancer).unwrap();
    (m["current_index"].as_u64().unwrap(), m["in_flight"].as_u64().unwrap())
}

/// A delayed GET (`--latency-ms`) followed by enough pipelined METRICS that their answers,
/// waiting behind the GET's, pass the output bound: the origin parked the GET's answer until
/// the client had room, and the room never came, since what was counted waited for that very
/// answer: the connection hung for ever (0 of 3,001 answers). Now an answer that would be
/// written at once is made whenever nothing else can be written.
#[test]
fn answers_waiting_behind_a_delayed_one_do_not_hang_the_origin() {
    let dir = data_dir();
    let args = ["--port", "0", "--data-dir", dir.to_str().unwrap(), "--latency-ms", "200"];
    let origin = ChildService::spawn(&bin("origin"), &args).unwrap();
    let stream = TcpStream::connect(origin.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream);
    let metrics_lines = "METRICS\n".repeat(3000);
    reader.get_mut().write_all(format!("GET tiny/1\n{metrics_lines}").as_bytes()).unwrap();
    let answers = read_answers(&mut reader, 3001);
    assert_eq!(answers[0]["data"], 1);
    assert!(answers[1..].iter().all(|a| a["data"]["role"] == "origin"));
}
