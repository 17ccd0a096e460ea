//! `client bench` against fake peers on loopback: how many writes a deep pipeline makes, and
//! what it does with a peer that answers what it was not asked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use client::bench::{self, BenchConfig, Dist, Wire};

const ANSWER: &[u8] = b"{\"status\":\"OK\",\"data\":null}\n";

fn config(addr: SocketAddr, pipeline: usize, requests: Option<u64>, duration: Duration) -> BenchConfig {
    BenchConfig {
        addr,
        connections: 1,
        duration,
        requests,
        keys: 10,
        key_prefix: "synthetic/".into(),
        dist: Dist::Uniform,
        pipeline,
        warmup: Duration::ZERO,
        seed: 5,
        progress: false,
        simulate_lru: None,
        wire: Wire::Line,
    }
}

/// A server whose every connection is handled by `serve` on its own thread.
fn fake(serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

/// Reads 16 requests, then answers all 16 in one write.
fn answers_in_sixteens(stream: TcpStream) {
    let mut writer = stream.try_clone().unwrap();
    let mut waiting = 0;
    for line in BufReader::new(stream).lines() {
        if line.is_err() {
            return;
        }
        waiting += 1;
        if waiting == 16 {
            waiting = 0;
            if writer.write_all(&ANSWER.repeat(16)).is_err() {
                return;
            }
        }
    }
}

#[test]
fn a_deep_pipeline_is_topped_up_in_one_write_per_batch() {
    let report = bench::run(&config(fake(answers_in_sixteens), 16, Some(3200), Duration::from_secs(30))).unwrap();
    assert_eq!(report.requests, 3200, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    // 3,200 requests 16 at a time are 200 batches (measured: 200); one write per answer
    // would be 3,200.
    assert!((200..=240).contains(&report.request_batches), "{report:?}");
}

/// Reads one request, then writes answers without being asked until the client goes away
/// (or 5 s pass).
fn answers_unasked(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let flood = ANSWER.repeat(1000);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if writer.write_all(&flood).is_err() {
            return;
        }
    }
}

#[test]
fn a_peer_flooding_answers_is_cut_off_and_the_run_ends_on_time() {
    let started = Instant::now();
    let report = bench::run(&config(fake(answers_unasked), 1, None, Duration::from_secs(1))).unwrap();
    let took = started.elapsed();
    // The run is 1 s; the peer floods for 5 s after each new connection. Measured: 1.0 s.
    assert!(took < Duration::from_millis(2500), "took {took:?}: {report:?}");
    // Each connection: its one answer (perhaps a second one, matched to the next request if
    // it came in a later read), then the flood is noticed and the connection dropped.
    let ok = report.statuses.get("OK").copied().unwrap_or(0);
    assert!(ok >= 1 && ok <= 2 * report.connection_errors, "{report:?}");
}

/// Answers every request twice, in one write.
fn answers_twice(stream: TcpStream) {
    let mut writer = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines() {
        if line.is_err() || writer.write_all(&ANSWER.repeat(2)).is_err() {
            return;
        }
    }
}

#[test]
fn an_answer_too_many_is_a_connection_error_not_an_answer() {
    let report = bench::run(&config(fake(answers_twice), 4, Some(40), Duration::from_secs(30))).unwrap();
    // Every request is either answered or lost with its connection, and no answer is
    // counted twice: the 40 are all accounted for, each extra answer is a connection error.
    let ok = report.statuses.get("OK").copied().unwrap_or(0);
    assert_eq!(ok, report.requests, "{report:?}");
    assert!(report.connection_errors >= 1, "{report:?}");
    assert!(report.requests <= 40, "{report:?}");
}
