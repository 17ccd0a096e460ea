//! Whole services running in this process for the service fuzz targets, each started once and
//! reused by every input (a fuzz input is one client connection). Only public APIs: each
//! service's `bind`, the testkit's runner, and real loopback sockets.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use testkit::RunningServer;

/// How long one input may take before the service counts as hung.
pub const LIMIT: Duration = Duration::from_secs(5);
/// The services' `--max-line` here: small, so that the too-long path is reached often.
pub const MAX_LINE: usize = 1024;

fn small_limits(server: &mut common::server::ServerConfig) {
    server.max_line = MAX_LINE;
    // Small enough that a few big answers reach it.
    server.output_limit = 16 * 1024;
}

/// An origin over a small data directory (a file, a bad file, a directory, a FIFO).
pub fn origin() -> SocketAddr {
    static ORIGIN: OnceLock<RunningServer> = OnceLock::new();
    ORIGIN
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("cachetier-fuzz-origin-{}", std::process::id()));
            let _ = std::fs::create_dir_all(dir.join("a/dir.json"));
            let _ = std::fs::write(dir.join("a/1.json"), "{\"v\":1}");
            let _ = std::fs::write(dir.join("a/bad.json"), "{");
            let _ = std::process::Command::new("mkfifo").arg(dir.join("a/fifo.json")).status();
            let mut config = origin::OriginConfig::new(&dir);
            config.synthetic = Some(origin::Synthetic { count: 10, value_bytes: 5000 });
            small_limits(&mut config.server);
            RunningServer::start(origin::bind(config).expect("origin binds"))
        })
        .addr()
}

/// A peer that answers every request line with the bytes last given to [`Peer::set`], then
/// closes: an origin (for a proxy) or a proxy (for a balancer) that says anything.
pub struct Peer {
    addr: SocketAddr,
    answer: Arc<Mutex<Vec<u8>>>,
}

impl Peer {
    /// `health` is the answer to a `HEALTH` probe (so a balancer keeps the peer in use);
    /// every other line gets the fuzzed bytes.
    fn start(health: Option<&'static str>) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("peer binds");
        let addr = listener.local_addr().expect("peer address");
        let answer = Arc::new(Mutex::new(Vec::new()));
        let shared = answer.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                thread::spawn(move || serve(stream, &shared, health));
            }
        });
        Peer { addr, answer }
    }

    pub fn set(&self, bytes: &[u8]) {
        let mut answer = self.answer.lock().unwrap_or_else(|p| p.into_inner());
        answer.clear();
        answer.extend_from_slice(bytes);
    }
}

fn serve(stream: std::net::TcpStream, answer: &Mutex<Vec<u8>>, health: Option<&str>) {
    let _ = stream.set_read_timeout(Some(LIMIT));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if let (Some(health), true) = (health, line.trim().eq_ignore_ascii_case("HEALTH")) {
            if writer.write_all(health.as_bytes()).is_err() {
                return;
            }
            line.clear();
            continue;
        }
        let bytes = answer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Whatever was fuzzed, then close: a line, garbage, half a line, nothing.
        let _ = writer.write_all(&bytes);
        return;
    }
}

/// A proxy in front of a [`Peer`] origin that answers with fuzzed bytes.
pub fn proxy() -> (SocketAddr, &'static Peer) {
    static PROXY: OnceLock<(RunningServer, Peer)> = OnceLock::new();
    let (server, peer) = PROXY.get_or_init(|| {
        let peer = Peer::start(None);
        let mut config = proxy::ProxyConfig::new(peer.addr);
        config.origin_timeout = Duration::from_millis(200);
        config.cache.capacity = 64;
        config.cache.negative_ttl = Duration::from_millis(50);
        config.cache.stale_grace = Duration::from_millis(100);
        config.cache.ttl = Duration::from_millis(20);
        small_limits(&mut config.server);
        (RunningServer::start(proxy::bind(config).expect("proxy binds")), peer)
    });
    (server.addr(), peer)
}

/// A balancer in front of a [`Peer`] proxy that answers GETs with fuzzed bytes. Its HEALTH
/// answer names no role, so the balancer sends it plain one-request-per-connection lines.
pub fn balancer() -> (SocketAddr, &'static Peer) {
    static BALANCER: OnceLock<(RunningServer, Peer)> = OnceLock::new();
    let (server, peer) = BALANCER.get_or_init(|| {
        let peer = Peer::start(Some("{\"status\":\"OK\",\"data\":{\"uptime_s\":1}}\n"));
        let mut config = balancer::BalancerConfig::new(&[peer.addr]);
        config.request_timeout = Duration::from_millis(500);
        config.try_timeout = Duration::from_millis(200);
        config.health_interval = Duration::from_millis(50);
        small_limits(&mut config.server);
        (RunningServer::start(balancer::bind(config).expect("balancer binds")), peer)
    });
    (server.addr(), peer)
}

/// Splits one fuzz input into client bytes and peer bytes: the first byte says how many of
/// the rest (scaled) go to the peer.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&first, rest)) = data.split_first() else { return (&[], &[]) };
    let at = rest.len() * usize::from(first) / 255;
    let (peer, client) = rest.split_at(at.min(rest.len()));
    (client, peer)
}

/// Sends `client` to `addr` and checks the answers; then checks the service still answers
/// another client. Panics (a crash for the fuzzer) on any failure.
pub fn drive(addr: SocketAddr, client: &[u8]) {
    let output = testkit::exchange(addr, client, LIMIT)
        .unwrap_or_else(|e| panic!("{e} for {:?}", String::from_utf8_lossy(client)));
    if let Err(why) = testkit::check_answers(client, &output, MAX_LINE) {
        panic!("{why}: sent {:?}, got {:?}", String::from_utf8_lossy(client), String::from_utf8_lossy(&output));
    }
    let health = testkit::exchange(addr, b"HEALTH\n", LIMIT).expect("HEALTH after the input");
    assert!(
        health.starts_with(b"{\"status\":\"OK\""),
        "HEALTH after the input: {:?}",
        String::from_utf8_lossy(&health)
    );
}
