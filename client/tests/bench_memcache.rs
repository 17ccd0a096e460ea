//! `client bench --wire memcache` against a fake memcached on loopback that cuts its answers
//! at awkward points: hits, misses and error replies are told apart and every request is
//! answered once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use client::bench::{self, BenchConfig, Dist, Wire};

/// Answers `get synthetic/N`: a 70,000-byte value (with `\r\n` inside it, as memcached
/// allows) for even N, a miss for odd N but 5, an error line for 5; writes each answer in
/// three pieces. Counts the requests it reads in `gets`.
fn fake_memcached(gets: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let gets = gets.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut value = vec![b'v'; 70_000];
                value[100] = b'\r';
                value[101] = b'\n';
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    gets.fetch_add(1, Ordering::SeqCst);
                    let key = line.trim_end().strip_prefix("get ").unwrap_or("").to_owned();
                    let n: u64 = key.rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or(1);
                    let answer = if n == 5 {
                        b"SERVER_ERROR out of memory\r\n".to_vec()
                    } else if n.is_multiple_of(2) {
                        let mut a = format!("VALUE {key} 0 {}\r\n", value.len()).into_bytes();
                        a.extend_from_slice(&value);
                        a.extend_from_slice(b"\r\nEND\r\n");
                        a
                    } else {
                        b"END\r\n".to_vec()
                    };
                    let cut = [answer.len() / 3, answer.len() * 2 / 3];
                    for piece in [&answer[..cut[0]], &answer[cut[0]..cut[1]], &answer[cut[1]..]] {
                        if writer.write_all(piece).and_then(|_| writer.flush()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn memcache_wire_counts_hits_misses_and_errors() {
    let gets = Arc::new(AtomicUsize::new(0));
    let config = BenchConfig {
        addr: fake_memcached(gets.clone()),
        connections: 3,
        duration: Duration::from_secs(60),
        requests: Some(600),
        keys: 10,
        key_prefix: "synthetic/".into(),
        dist: Dist::Uniform,
        pipeline: 4,
        warmup: Duration::ZERO,
        seed: 3,
        progress: false,
        simulate_lru: None,
        wire: Wire::Memcache,
    };
    let report = bench::run(&config).unwrap();
    assert_eq!(report.requests, 600, "{report:?}");
    assert_eq!(report.connection_errors, 0, "{report:?}");
    let ok = report.statuses.get("OK").copied().unwrap_or(0);
    let missing = report.statuses.get("NOT_FOUND").copied().unwrap_or(0);
    let garbage = report.statuses.get("GARBAGE").copied().unwrap_or(0);
    assert_eq!(ok + missing + garbage, 600, "{report:?}");
    // Uniform over 10 keys: 5 even (hits), 4 odd misses, key 5 an error: about 50/40/10 %.
    assert!((240..=360).contains(&ok), "{report:?}");
    assert!((180..=300).contains(&missing), "{report:?}");
    assert!((30..=100).contains(&garbage), "{report:?}");
    // Each next request goes out as an answer comes in, before it is counted: still exactly
    // the requests asked for (all answered, so all read by the server before the report).
    assert_eq!(gets.load(Ordering::SeqCst), 600);
}
