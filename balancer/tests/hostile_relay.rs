//! A lying proxy against the balancer's answer path (SPEC 2.3, 3.6), over real loopback
//! sockets: forged, foreign, repeated and oddly written ids, answers out of order, split at
//! every byte, an attempt stuck behind a thousand newer ones, and odd client ids. The client
//! gets one valid JSON object per line with its own id byte for byte (or PROXY_UNREACHABLE),
//! and never data answered for someone else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use testkit::{metrics, wait_until, LineClient, RunningServer};

/// One GET the fake proxy got: its key and tag, and the connection to answer it on.
struct Got {
    key: String,
    id: u64,
    w: TcpStream,
}

/// A multiplexing fake proxy that answers HEALTH and METRICS itself and hands every GET to
/// the test, which answers (or not) whatever it likes.
fn puppet_proxy() -> (SocketAddr, Receiver<Got>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let tx = tx.clone();
            thread::spawn(move || {
                stream.set_nodelay(true).unwrap();
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if line == "HEALTH" || line == "METRICS" {
                        let _ = writer.write_all(b"{\"status\":\"OK\",\"data\":{\"role\":\"proxy\"}}\n");
                        continue;
                    }
                    let v: Value = serde_json::from_str(&line).unwrap();
                    let got = Got {
                        key: v["key"].as_str().unwrap().to_owned(),
                        id: v["id"].as_u64().unwrap(),
                        w: writer.try_clone().unwrap(),
                    };
                    if tx.send(got).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn balancer_for(proxy: SocketAddr) -> RunningServer {
    let mut config = balancer::BalancerConfig::new(&[proxy]);
    config.retries = 0;
    config.request_timeout = Duration::from_secs(5);
    config.try_timeout = Duration::from_secs(5);
    config.fall = 100_000; // these tests are about answers, not health
    let balancer = RunningServer::start(balancer::bind(config).unwrap());
    let addr = balancer.addr();
    assert!(wait_until(Duration::from_secs(5), || {
        metrics(addr).unwrap()["proxies"][proxy.to_string()]["multiplexed"] == true
    }));
    balancer
}

fn got(rx: &Receiver<Got>) -> Got {
    rx.recv_timeout(Duration::from_secs(5)).expect("the balancer forwarded the GET")
}

fn say(w: &mut TcpStream, line: &[u8]) {
    w.write_all(line).unwrap();
    w.write_all(b"\n").unwrap();
}

#[test]
fn forged_and_oddly_written_ids_find_nothing_and_the_real_answer_comes_through_intact() {
    let (proxy, rx) = puppet_proxy();
    let balancer = balancer_for(proxy);
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    c.send("{\"op\":\"get\",\"key\":\"k/1\",\"id\":\"x\"}").unwrap();
    let mut g = got(&rx);
    let id = g.id;
    for forged in [
        format!("{}", id + 1),
        format!("{}", id + 5_000),
        "18446744073709551615".to_owned(),
        "99999999999999999999999".to_owned(),
        format!("-{id}"),
        "1e3".to_owned(),
        format!("{id}.0"),
        format!("\"{id}\""),
        "null".to_owned(),
    ] {
        say(&mut g.w, format!("{{\"status\":\"OK\",\"data\":\"FORGED {forged}\",\"id\":{forged}}}").as_bytes());
    }
    // The real one, with the id first and blanks everywhere.
    say(
        &mut g.w,
        format!(" {{ \"id\" : {id} ,\t\"status\" : \"OK\" , \"data\" : [ 1.10 , \"\\u00e9\" ] }} \r").as_bytes(),
    );
    let line = c.recv_line().unwrap().unwrap();
    assert_eq!(line, " {\t\"status\" : \"OK\" , \"data\" : [ 1.10 , \"\\u00e9\" ] ,\"id\":\"x\"}\n");
    // Answering it again, late, reaches nobody: the next GET gets its own answer.
    say(&mut g.w, format!("{{\"status\":\"OK\",\"data\":\"AGAIN\",\"id\":{id}}}").as_bytes());
    c.send("{\"op\":\"get\",\"key\":\"k/2\",\"id\":2}").unwrap();
    let mut g2 = got(&rx);
    assert!(g2.id != id, "an id is never reused on its connection");
    say(&mut g2.w, format!("{{\"status\":\"OK\",\"data\":\"{}\",\"id\":{}}}", g2.key, g2.id).as_bytes());
    assert_eq!(c.recv_line().unwrap().unwrap(), "{\"status\":\"OK\",\"data\":\"k/2\",\"id\":2}\n");
}

#[test]
fn answers_out_of_order_and_split_at_every_byte_reach_their_own_clients() {
    let (proxy, rx) = puppet_proxy();
    let balancer = balancer_for(proxy);
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    let ids = ["123456789012345678901234567890", "1.10", "\"a\\\"b\\u00e9\"", "-0", "1E+2"];
    let mut pending = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        c.send(&format!("{{\"op\":\"get\",\"key\":\"k/{i}\",\"id\":{id}}}")).unwrap();
        pending.push(got(&rx));
    }
    // Last first, one byte per write.
    for g in pending.iter_mut().rev() {
        let answer = format!("{{\"status\":\"OK\",\"data\":{{\"key\":\"{}\"}},\"node\":1,\"id\":{}}}\n", g.key, g.id);
        for b in answer.as_bytes() {
            g.w.write_all(&[*b]).unwrap();
            g.w.flush().unwrap();
        }
    }
    let mut seen = Vec::new();
    for _ in ids {
        seen.push(c.recv_line().unwrap().unwrap());
    }
    for (i, id) in ids.iter().enumerate() {
        let expected = format!("{{\"status\":\"OK\",\"data\":{{\"key\":\"k/{i}\"}},\"node\":1,\"id\":{id}}}\n");
        assert!(seen.contains(&expected), "{expected:?} not in {seen:?}");
    }
}

#[test]
fn an_attempt_stuck_behind_a_thousand_newer_ones_is_still_answered() {
    let (proxy, rx) = puppet_proxy();
    let balancer = balancer_for(proxy);
    let mut slow = LineClient::connect(balancer.addr()).unwrap();
    slow.set_timeout(Duration::from_secs(10)).unwrap();
    slow.send("{\"op\":\"get\",\"key\":\"stuck\",\"id\":\"s\"}").unwrap();
    let mut stuck = got(&rx);
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    for i in 0..1_500 {
        c.send(&format!("{{\"op\":\"get\",\"key\":\"k/{i}\",\"id\":{i}}}")).unwrap();
        let mut g = got(&rx);
        // The stuck attempt's id, answered on its behalf, must never deliver.
        say(&mut g.w, format!("{{\"status\":\"OK\",\"data\":\"{}\",\"id\":{}}}", g.key, g.id).as_bytes());
        assert_eq!(c.recv_line().unwrap().unwrap(), format!("{{\"status\":\"OK\",\"data\":\"k/{i}\",\"id\":{i}}}\n"));
    }
    say(&mut stuck.w, format!("{{\"status\":\"OK\",\"data\":\"late\",\"id\":{}}}", stuck.id).as_bytes());
    assert_eq!(slow.recv_line().unwrap().unwrap(), "{\"status\":\"OK\",\"data\":\"late\",\"id\":\"s\"}\n");
}

#[test]
fn a_hundred_thousand_levels_pass_and_ten_mebibytes_of_brackets_fail_only_their_attempt() {
    let (proxy, rx) = puppet_proxy();
    let balancer = balancer_for(proxy);
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    let depth = 100_000;
    let deep = format!("{}0{}", "[{\"a\":".repeat(depth), "}]".repeat(depth));
    c.send("{\"op\":\"get\",\"key\":\"deep\",\"id\":1}").unwrap();
    let mut g = got(&rx);
    say(&mut g.w, format!("{{\"status\":\"OK\",\"data\":{deep},\"id\":{}}}", g.id).as_bytes());
    let line = c.recv_line().unwrap().unwrap();
    assert_eq!(line, format!("{{\"status\":\"OK\",\"data\":{deep},\"id\":1}}\n"));
    c.send("{\"op\":\"get\",\"key\":\"open\",\"id\":2}").unwrap();
    let mut g = got(&rx);
    let mut open = b"{\"status\":\"OK\",\"data\":".to_vec();
    open.extend(std::iter::repeat_n(b'[', 10 << 20));
    open.extend_from_slice(format!(",\"id\":{}}}", g.id).as_bytes());
    say(&mut g.w, &open);
    let v: Value = serde_json::from_str(&c.recv_line().unwrap().unwrap()).unwrap();
    assert_eq!((v["status"].as_str(), v["id"].as_u64()), (Some("PROXY_UNREACHABLE"), Some(2)), "{v}");
}

/// Measured before the fix: one client GET of a value holding a lone surrogate escape
/// (`"\ud800"`, valid JSON to the origin and the proxies, and to serde) was garbage to the
/// balancer; with the default `--retries 2`, each of three proxies took a failure for it, so
/// three such GETs (from one client) marked every proxy DOWN.
#[test]
fn a_value_with_a_lone_surrogate_escape_is_relayed_and_marks_no_proxy_down() {
    let dir = testkit::temp_dir("balancer-surrogate");
    std::fs::write(dir.join("lone.json"), "[\"\\ud800\",\"\\udfff x\"]").unwrap();
    let origin = RunningServer::start(origin::bind(origin::OriginConfig::new(&dir)).unwrap());
    let proxies: Vec<RunningServer> =
        (0..3).map(|_| RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin.addr())).unwrap())).collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
    let balancer = RunningServer::start(balancer::bind(balancer::BalancerConfig::new(&addrs)).unwrap());
    let addr = balancer.addr();
    assert!(wait_until(Duration::from_secs(5), || {
        let m = metrics(addr).unwrap();
        addrs.iter().all(|p| m["proxies"][p.to_string()]["multiplexed"] == true)
    }));
    let mut c = LineClient::connect(addr).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    for i in 0..4 {
        c.send(&format!("{{\"op\":\"get\",\"key\":\"lone\",\"id\":{i}}}")).unwrap();
        let line = c.recv_line().unwrap().unwrap();
        assert!(line.starts_with("{\"status\":\"OK\",\"data\":[\"\\ud800\",\"\\udfff x\"],"), "{line}");
        assert!(line.ends_with(&format!(",\"id\":{i}}}\n")), "{line}");
    }
    let m = metrics(addr).unwrap();
    for p in &addrs {
        let p = &m["proxies"][p.to_string()];
        assert_eq!((p["healthy"].as_bool(), p["failures"].as_u64()), (Some(true), Some(0)), "{m}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn odd_client_ids_come_back_byte_for_byte_on_the_error_path_too() {
    let dead = testkit::refused_addr();
    let mut config = balancer::BalancerConfig::new(&[dead]);
    config.retries = 0;
    let balancer = RunningServer::start(balancer::bind(config).unwrap());
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    for id in ["123456789012345678901234567890", "1E400", "-0.0e-0", "\"\\ud800\\u00e9\\\"\"", "\"é😀\"", "1.10"] {
        c.send(&format!("{{\"op\":\"get\",\"key\":\"k\",\"id\" : {id} }}")).unwrap();
        let line = c.recv_line().unwrap().unwrap();
        assert!(line.starts_with("{\"status\":\"PROXY_UNREACHABLE\""), "{line}");
        assert!(line.ends_with(&format!(",\"id\":{id}}}\n")), "{id}: {line}");
    }
}

#[test]
fn bad_bytes_in_data_fail_only_their_attempt_at_once() {
    let (proxy, rx) = puppet_proxy();
    let balancer = balancer_for(proxy);
    let mut c = LineClient::connect(balancer.addr()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    let bad: [&[u8]; 8] = [
        b"\"\xff\"",             // not UTF-8
        b"\"\xc0\xaf\"",         // overlong
        b"\"\xed\xa0\x80\"",     // a surrogate encoded in UTF-8
        b"\"\xf4\x90\x80\x80\"", // past U+10FFFF
        b"\"a\x00b\"",           // a raw NUL
        b"[1,]",
        b"\"\\ud80\"",
        b"01",
    ];
    for (i, data) in bad.iter().enumerate() {
        let t = std::time::Instant::now();
        c.send(&format!("{{\"op\":\"get\",\"key\":\"k/{i}\",\"id\":{i}}}")).unwrap();
        let mut g = got(&rx);
        let mut line = b"{\"status\":\"OK\",\"data\":".to_vec();
        line.extend_from_slice(data);
        line.extend_from_slice(format!(",\"id\":{}}}", g.id).as_bytes());
        say(&mut g.w, &line);
        let v: Value = serde_json::from_str(&c.recv_line().unwrap().unwrap()).unwrap();
        assert_eq!((v["status"].as_str(), v["id"].as_u64()), (Some("PROXY_UNREACHABLE"), Some(i as u64)), "{v}");
        // Measured: a few ms; the attempt's deadline is 5 s.
        assert!(t.elapsed() < Duration::from_secs(2), "{i}: waited {:?}", t.elapsed());
    }
    c.send("{\"op\":\"get\",\"key\":\"good\",\"id\":\"g\"}").unwrap();
    let mut g = got(&rx);
    say(&mut g.w, format!("{{\"status\":\"OK\",\"data\":\"\\u0000\",\"id\":{}}}", g.id).as_bytes());
    assert_eq!(c.recv_line().unwrap().unwrap(), "{\"status\":\"OK\",\"data\":\"\\u0000\",\"id\":\"g\"}\n");
}

#[test]
fn ids_of_another_connection_to_the_same_proxy_deliver_nothing() {
    let (proxy, rx) = puppet_proxy();
    let balancer = balancer_for(proxy);
    // More than one upstream connection carries (256): a second one opens. From several
    // clients, each within its forwarding window.
    let n = 300;
    let mut clients: Vec<LineClient> = (0..30).map(|_| LineClient::connect(balancer.addr()).unwrap()).collect();
    for (k, c) in clients.iter_mut().enumerate() {
        c.set_timeout(Duration::from_secs(10)).unwrap();
        let requests: String =
            (k * 10..k * 10 + 10).map(|i| format!("{{\"op\":\"get\",\"key\":\"k/{i}\",\"id\":{i}}}\n")).collect();
        c.send_raw(requests.as_bytes()).unwrap();
    }
    let gets: Vec<Got> = (0..n).map(|_| got(&rx)).collect();
    let conn_of = |g: &Got| g.w.peer_addr().unwrap();
    // A: the connection that carried the most (its ids reach past all of B's).
    let mut peers: Vec<SocketAddr> = gets.iter().map(conn_of).collect();
    peers.sort();
    let busiest = *peers.iter().max_by_key(|p| peers.iter().filter(|q| q == p).count()).unwrap();
    let (on_a, on_b): (Vec<&Got>, Vec<&Got>) = gets.iter().partition(|g| conn_of(g) == busiest);
    assert!(!on_b.is_empty(), "a second connection carried some");
    let b_ids: Vec<u64> = on_b.iter().map(|g| g.id).collect();
    let foreign: Vec<&&Got> = on_a.iter().filter(|g| !b_ids.contains(&g.id)).collect();
    assert!(!foreign.is_empty());
    // The liar answers connection A's ids on connection B first, then everything for real.
    let mut wb = on_b[0].w.try_clone().unwrap();
    for g in &foreign {
        say(&mut wb, format!("{{\"status\":\"OK\",\"data\":\"FORGED\",\"id\":{}}}", g.id).as_bytes());
    }
    for g in &gets {
        let mut w = g.w.try_clone().unwrap();
        say(&mut w, format!("{{\"status\":\"OK\",\"data\":\"{}\",\"id\":{}}}", g.key, g.id).as_bytes());
    }
    for c in &mut clients {
        for _ in 0..n / 30 {
            let v: Value = serde_json::from_str(&c.recv_line().unwrap().unwrap()).unwrap();
            assert_eq!(v["data"].as_str().unwrap(), format!("k/{}", v["id"]), "{v}");
        }
    }
}

/// A lost connection is one failure of its proxy, however many GETs it carried: one
/// over-long line on a link with ten GETs outstanding does not mark the proxy down (`--fall 3`).
#[test]
fn a_link_lost_with_many_gets_on_it_counts_one_failure() {
    let (proxy, rx) = puppet_proxy();
    let mut config = balancer::BalancerConfig::new(&[proxy]);
    config.retries = 0;
    config.request_timeout = Duration::from_secs(5);
    config.try_timeout = Duration::from_secs(5);
    let balancer = RunningServer::start(balancer::bind(config).unwrap());
    let addr = balancer.addr();
    assert!(wait_until(Duration::from_secs(5), || {
        metrics(addr).unwrap()["proxies"][proxy.to_string()]["multiplexed"] == true
    }));
    let mut c = LineClient::connect(addr).unwrap();
    let gets: String = (0..10).map(|k| format!("GET k/{k}\n")).collect();
    c.send_raw(gets.as_bytes()).unwrap();
    let mut held: Vec<Got> = (0..10).map(|_| got(&rx)).collect();
    // 17 MiB without a newline: past the longest answer the balancer reads, so the link's
    // framing is lost and it is closed.
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..17 {
        if held[0].w.write_all(&chunk).is_err() {
            break;
        }
    }
    for _ in 0..10 {
        assert_eq!(c.recv().unwrap()["status"], "PROXY_UNREACHABLE");
    }
    let state = &metrics(addr).unwrap()["proxies"][proxy.to_string()];
    assert_eq!(state["failures"], 1, "{state}");
    assert_eq!(state["healthy"], true, "{state}");
    held.clear();
}
