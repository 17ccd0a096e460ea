//! `--reuse-port` (SPEC 7): two real balancer processes share one listening port through
//! SO_REUSEPORT, in front of the same real proxies. Both serve (the kernel spreads new
//! connections over them), and under `consistent_hash` they send every key to the same proxy.
//!
//! Which process a connection landed on is read from the kernel: the accepted socket's inode
//! in /proc/net/tcp, found among one process's /proc/PID/fd.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use testkit::{free_port, refused_addr, wait_until, workspace_bin, ChildService, RunningServer, ANSWER_TIMEOUT};

const BALANCER: &str = env!("CARGO_BIN_EXE_balancer");
const KEYS: usize = 1000;

fn start_origin() -> RunningServer {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut config = origin::OriginConfig::new(data);
    config.synthetic = Some(origin::Synthetic { count: 10_000, value_bytes: 50 });
    RunningServer::start(origin::bind(config).unwrap())
}

fn start_proxy(origin: SocketAddr) -> RunningServer {
    let mut config = proxy::ProxyConfig::new(origin);
    config.cache.policy = proxy::Policy::Lru;
    RunningServer::start(proxy::bind(config).unwrap())
}

fn balancer(port: u16, proxies: &[String], reuse_port: bool) -> std::io::Result<ChildService> {
    let port = port.to_string();
    let mut args = vec!["--port", &port, "--strategy", "consistent_hash", "--log-level", "warn"];
    // Slow probes with a wide timeout: no proxy may be marked down on a loaded machine, or
    // routing would rightly change between the two balancers' requests.
    args.extend(["--health-interval-ms", "1000", "--health-timeout-ms", "5000"]);
    if reuse_port {
        args.push("--reuse-port");
    }
    args.push("--proxies");
    args.extend(proxies.iter().map(String::as_str));
    ChildService::spawn(BALANCER, &args)
}

/// The inode of the server side of the loopback connection `server_port` ← `client_port`.
fn accepted_inode(server_port: u16, client_port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (local, remote) = (format!(":{server_port:04X}"), format!(":{client_port:04X}"));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let inode = *fields.get(9)?;
        (fields.get(1)?.ends_with(&local) && fields.get(2)?.ends_with(&remote) && inode != "0")
            .then(|| inode.to_string())
    })
}

fn holds_socket(pid: u32, inode: &str) -> bool {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_str() == Some(wanted.as_str())))
        })
        .unwrap_or(false)
}

/// One blocking connection that knows its own local port (to find it in /proc/net/tcp).
struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    local_port: u16,
}

impl Conn {
    fn connect(addr: impl std::net::ToSocketAddrs) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let local_port = stream.local_addr().unwrap().port();
        Conn { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream, local_port }
    }

    fn request(&mut self, line: &str) -> Value {
        self.writer.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    /// Which of `pids` accepted this connection (once it has been answered, so accepted).
    fn owner(&self, server_port: u16, pids: &[u32]) -> Option<usize> {
        let inode = accepted_inode(server_port, self.local_port)?;
        pids.iter().position(|&pid| holds_socket(pid, &inode))
    }
}

/// A connection answered by each balancer, found by connecting until both have one.
fn one_connection_each(port: u16, pids: &[u32]) -> Vec<Conn> {
    let mut found: Vec<Option<Conn>> = pids.iter().map(|_| None).collect();
    for _ in 0..200 {
        if found.iter().all(Option::is_some) {
            break;
        }
        let mut client = Conn::connect(("127.0.0.1", port));
        assert_eq!(client.request("HEALTH")["status"], "OK");
        if let Some(i) = client.owner(port, pids) {
            if found[i].is_none() {
                found[i] = Some(client);
            }
        }
    }
    found.into_iter().map(|c| c.expect("200 connections all landed on one balancer: the port is not shared")).collect()
}

fn total_requests(client: &mut Conn) -> u64 {
    let m = client.request("METRICS");
    m["data"]["total_requests"].as_u64().unwrap()
}

fn node(client: &mut Conn, key: &str) -> Value {
    let answer = client.request(&format!("GET {key}"));
    assert_eq!(answer["status"], "OK", "{answer}");
    answer["node"].clone()
}

#[test]
fn two_balancers_on_one_port_both_serve_and_route_every_key_alike() {
    let origin = start_origin();
    let proxies: Vec<RunningServer> = (0..3).map(|_| start_proxy(origin.addr())).collect();
    let names: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();
    let port = free_port().unwrap();
    let first = balancer(port, &names, true).unwrap();
    let second = balancer(port, &names, true).unwrap();
    assert_eq!((first.addr().port(), second.addr().port()), (port, port));
    let pids = [first.pid(), second.pid()];

    // Both serve: new connections land on both, and each one's own count grows.
    let mut each = one_connection_each(port, &pids);
    let before: Vec<u64> = each.iter_mut().map(total_requests).collect();
    const FRESH: u64 = 100;
    for i in 0..FRESH {
        let mut client = Conn::connect(("127.0.0.1", port));
        node(&mut client, &format!("synthetic/{i}"));
    }
    let after: Vec<u64> = each.iter_mut().map(total_requests).collect();
    let grown: Vec<u64> = before.iter().zip(&after).map(|(b, a)| a - b).collect();
    // Each count includes its own second METRICS; the fresh GETs split between the two.
    assert_eq!(grown.iter().sum::<u64>(), FRESH + 2, "{grown:?}");
    assert!(grown.iter().all(|&g| g > 1), "one balancer got none of {FRESH} new connections: {grown:?}");

    // They agree on routing: the same proxy for every key, whichever balancer is asked.
    let mut nodes_seen = HashSet::new();
    let (a, b) = each.split_at_mut(1);
    for i in 0..KEYS {
        let key = format!("synthetic/{i}");
        let (from_first, from_second) = (node(&mut a[0], &key), node(&mut b[0], &key));
        assert_eq!(from_first, from_second, "{key} routed differently by the two balancers");
        nodes_seen.insert(from_first.to_string());
    }
    assert_eq!(nodes_seen.len(), proxies.len(), "keys should spread over every proxy: {nodes_seen:?}");
}

#[test]
fn without_reuse_port_a_second_balancer_cannot_take_the_port() {
    let origin = start_origin();
    let proxy = start_proxy(origin.addr());
    let names = [proxy.addr().to_string()];
    let port = free_port().unwrap();
    let _first = balancer(port, &names, true).unwrap();
    assert!(balancer(port, &names, false).is_err(), "a balancer without --reuse-port bound a shared port");
}

#[test]
fn two_proxies_share_a_port_with_reuse_port() {
    let bin = workspace_bin("proxy").unwrap().display().to_string();
    let port = free_port().unwrap().to_string();
    let origin = refused_addr().port().to_string();
    let args = ["--port", &port, "--origin-port", &origin, "--reuse-port", "--log-level", "warn"];
    let first = ChildService::spawn(&bin, &args).unwrap();
    let second = ChildService::spawn(&bin, &args).unwrap();
    assert_eq!(first.addr(), second.addr());
    // Both answer on the shared port: connect until each has answered HEALTH once.
    let pids = [first.pid(), second.pid()];
    let mut answered = [false, false];
    assert!(
        wait_until(Duration::from_secs(10), || {
            let mut client = Conn::connect(first.addr());
            assert_eq!(client.request("HEALTH")["status"], "OK");
            if let Some(i) = client.owner(first.addr().port(), &pids) {
                answered[i] = true;
            }
            answered == [true, true]
        }),
        "only one proxy process answered: {answered:?}"
    );
}
