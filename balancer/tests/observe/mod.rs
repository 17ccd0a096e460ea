//! What the observability tests (SPEC 6) share: services with an admin listener, in process
//! or as child processes, a small blocking HTTP client, and the rule for external tools.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::server::{Server, Service};
use testkit::{workspace_bin, RunningServer};

/// An in-process service and its admin address.
pub struct InProcess {
    pub server: RunningServer,
    pub admin: SocketAddr,
}

impl InProcess {
    pub fn start<S>(server: Server<S>) -> InProcess
    where
        S: Service + Send + 'static,
        S::Timer: Send,
    {
        let admin = server.admin_addr().expect("admin listener configured");
        InProcess { server: RunningServer::start(server), admin }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}

fn with_admin(mut config: common::server::ServerConfig) -> common::server::ServerConfig {
    config.admin_port = Some(0);
    config
}

/// origin → one proxy per `proxies` → balancer (fast health probes), all in process with an
/// admin listener each.
pub struct Cluster {
    pub origin: InProcess,
    pub proxies: Vec<InProcess>,
    pub balancer: InProcess,
}

pub fn cluster(proxies: usize) -> Cluster {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
    let mut origin_config = origin::OriginConfig::new(data);
    origin_config.server = with_admin(origin_config.server);
    let origin = InProcess::start(origin::bind(origin_config).unwrap());
    let proxies: Vec<InProcess> = (0..proxies)
        .map(|_| {
            let mut config = proxy::ProxyConfig::new(origin.addr());
            config.server = with_admin(config.server);
            InProcess::start(proxy::bind(config).unwrap())
        })
        .collect();
    let addrs: Vec<SocketAddr> = proxies.iter().map(InProcess::addr).collect();
    let mut config = balancer::BalancerConfig::new(&addrs);
    config.server = with_admin(config.server);
    config.health_interval = Duration::from_millis(200);
    config.metrics_interval = Duration::from_millis(200);
    config.strategy = balancer::Strategy::ConsistentHash { load_factor: 1.25 };
    let balancer = InProcess::start(balancer::bind(config).unwrap());
    Cluster { origin, proxies, balancer }
}

/// A service binary as a child process, with both addresses it announced. Dropping it kills
/// that process by its PID.
pub struct Child2 {
    child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
}

impl Child2 {
    /// Starts this workspace's binary `name` and waits for `listening on` (and, when
    /// `--admin-port` is among the args, `admin listening on`).
    pub fn spawn(name: &str, args: &[&str]) -> std::io::Result<Child2> {
        let program = workspace_bin(name)?;
        Child2::spawn_path(&program, args, Stdio::inherit())
    }

    pub fn spawn_path(program: &std::path::Path, args: &[&str], stderr: Stdio) -> std::io::Result<Child2> {
        let wants_admin = args.contains(&"--admin-port");
        let mut child =
            Command::new(program).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr).spawn()?;
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || (wants_admin && admin.is_none()) {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("admin listening on ") {
                        admin = a.trim().parse().ok();
                    } else if let Some(a) = line.strip_prefix("listening on ") {
                        addr = a.trim().parse().ok();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait()?;
                    return Err(std::io::Error::other(format!("{} did not announce ({status})", program.display())));
                }
            }
        }
        Ok(Child2 { child, addr: addr.expect("addr"), admin })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().unwrap();
        assert!(status.success());
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Child2 {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Http {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// Reads one response from `stream` (Content-Length framing).
pub fn read_response(stream: &mut impl Read) -> std::io::Result<Http> {
    read_response_to(stream, true)
}

/// Reads one response; without its body when `with_body` is false (an answer to HEAD).
pub fn read_response_to(stream: &mut impl Read, with_body: bool) -> std::io::Result<Http> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a response"));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let http = Http { status, head, body: Vec::new() };
    let length: usize =
        if with_body { http.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0) } else { 0 };
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok(Http { body, ..http })
}

/// Sends raw request bytes on a fresh connection and reads one response.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<Http> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    read_response(&mut stream)
}

pub fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Http> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let response = read_response_to(&mut stream, method != "HEAD")?;
    if method == "HEAD" {
        // Nothing may follow the head.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        return Ok(Http { body: rest, ..response });
    }
    Ok(response)
}

/// The origin's sample data directory.
pub fn data_dir() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data").display().to_string()
}

pub fn get(addr: SocketAddr, path: &str) -> Http {
    http(addr, "GET", path).unwrap()
}

/// The value of an unlabelled sample in an exposition.
pub fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Whether an external tool (Prometheus, Chromium) may be missing: only on a developer's
/// machine that cannot install it (not root) and outside CI. Everywhere else `.ci/run` has
/// installed it and a missing tool fails the test.
pub fn tool_or_skip(tool: &str) -> bool {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    assert!(!root && !ci, "{tool} is not installed (.ci/run installs it: apt-get install prometheus chromium)");
    eprintln!("skipping: {tool} is not installed and this is neither root nor CI");
    false
}

/// A fresh directory for this test's files.
pub fn scratch(label: &str) -> PathBuf {
    testkit::temp_dir(label)
}
