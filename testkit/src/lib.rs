//! Blocking helpers for tests: polling a condition with a deadline, running a service binary
//! as a child process that is stopped by PID when dropped, an in-process server runner, fake
//! upstreams, and the framing checks the fuzz targets share. The line client lives in
//! `common::line_client` (the `client` CLI uses it too) and is re-exported here.
//!
//! These are deliberately simple (std sockets, one request at a time); the services
//! themselves never use them. A dev-dependency only.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use common::line_client::{LineClient, ANSWER_TIMEOUT};

/// Asks `addr` for METRICS over a fresh connection and returns `data`.
pub fn metrics(addr: SocketAddr) -> io::Result<Value> {
    let answer = LineClient::connect(addr)?.request("METRICS")?;
    Ok(answer["data"].clone())
}

/// Polls `condition` every few milliseconds until it holds or `limit` passes; returns whether
/// it held. Tests use this instead of sleeping for things to settle.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A service binary running as a child process. Dropping it kills that process (by its PID)
/// and reaps it, so a failing test leaves nothing running.
pub struct ChildService {
    child: Child,
    addr: SocketAddr,
    _stdout: thread::JoinHandle<()>,
}

impl ChildService {
    /// Starts `program args…` and waits (up to 10 s) for its `listening on HOST:PORT` line.
    pub fn spawn(program: &str, args: &[&str]) -> io::Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let (tx, rx) = mpsc::channel();
        let reader = thread::spawn(move || forward_ready_line(stdout, tx));
        let announced = rx.recv_timeout(Duration::from_secs(10));
        let addr = match announced {
            Ok(Some(addr)) => addr,
            other => {
                let _ = child.kill();
                let status = child.wait()?;
                return Err(io::Error::other(format!(
                    "{program} did not announce readiness ({other:?}); exit {status}"
                )));
            }
        };
        Ok(ChildService { child, addr, _stdout: reader })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the child by PID.
    pub fn signal(&self, signal: &str) -> io::Result<()> {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill -{signal} {} failed", self.pid())))
        }
    }

    /// Waits up to `limit` for the child to exit, returning its exit code (None if killed by a
    /// signal), or an error if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> io::Result<Option<i32>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "child still running"));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Reads the child's stdout: reports the address of the first `listening on` line, then keeps
/// draining so that the child never blocks on a full pipe.
fn forward_ready_line(stdout: ChildStdout, tx: mpsc::Sender<Option<SocketAddr>>) {
    let mut lines = BufReader::new(stdout).lines();
    let mut sent = false;
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        if !sent {
            if let Some(addr) = line.strip_prefix("listening on ").and_then(|a| a.trim().parse().ok()) {
                let _ = tx.send(Some(addr));
                sent = true;
            }
        }
    }
    if !sent {
        let _ = tx.send(None);
    }
}

/// A service running in-process on its own thread, drained and joined when dropped.
pub struct RunningServer {
    addr: SocketAddr,
    handle: common::server::ShutdownHandle,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

impl RunningServer {
    pub fn start<S>(server: common::server::Server<S>) -> Self
    where
        S: common::server::Service + Send + 'static,
        S::Timer: Send,
    {
        let addr = server.local_addr();
        let handle = server.shutdown_handle();
        let thread = thread::spawn(move || server.run());
        RunningServer { addr, handle, thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drains the server and waits for its loop to return.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> io::Result<()> {
        self.handle.shutdown();
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| io::Error::other("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// A fresh, empty directory under the system temp dir, unique to this process and call.
pub fn temp_dir(label: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("cachetier-{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The resident set size of process `pid` in KiB, from /proc (None where that is unavailable).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Connects to `addr` from the loopback source address `127.0.0.{2 + n % 200}`. Tests that
/// open thousands of short connections spread them over many source addresses so that the
/// TIME_WAIT sockets they leave behind never exhaust one address's ephemeral ports.
pub fn connect_from_spread_source(addr: SocketAddr, n: usize) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let source = SocketAddr::from(([127, 0, 0, 2 + (n % 200) as u8], 0));
    socket.bind(&source.into())?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

/// How a [`FakeServer`] treats each request line it reads.
#[derive(Clone, Debug)]
pub enum FakeBehavior {
    /// Reads requests and never answers.
    Silent,
    /// Answers every request with this exact line (a `\n` is added).
    Reply(String),
    /// Closes the connection as soon as a request arrives, without answering.
    CloseWithoutAnswer,
    /// Answers one request with this line, then closes (a one-shot peer).
    ReplyThenClose(String),
    /// Answers the first request of each connection with this line, and closes on the second
    /// without answering it: a peer that dropped a kept-alive connection just as it was reused.
    ReplyFirstOnly(String),
}

/// A deliberately simple, misbehaving peer for failure tests: a thread per connection,
/// counting the request lines it receives. Stops accepting when dropped.
pub struct FakeServer {
    addr: SocketAddr,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeServer {
    pub fn start(behavior: FakeBehavior) -> io::Result<FakeServer> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopping) = (requests.clone(), stop.clone());
        thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (behavior, counter, stopping) = (behavior.clone(), counter.clone(), stopping.clone());
                        thread::spawn(move || serve_fake(stream, behavior, counter, stopping));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(FakeServer { addr, requests, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Request lines received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn serve_fake(
    stream: TcpStream,
    behavior: FakeBehavior,
    counter: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut seen = 0;
    while !stop.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                counter.fetch_add(1, Ordering::SeqCst);
                line.clear();
                seen += 1;
                match &behavior {
                    FakeBehavior::Silent => {}
                    FakeBehavior::Reply(answer) => {
                        if writer.write_all(format!("{answer}\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                    FakeBehavior::CloseWithoutAnswer => return,
                    FakeBehavior::ReplyThenClose(answer) => {
                        let _ = writer.write_all(format!("{answer}\n").as_bytes());
                        return;
                    }
                    FakeBehavior::ReplyFirstOnly(answer) => {
                        if seen > 1 || writer.write_all(format!("{answer}\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// One piece of what [`send_with_urgent_bytes`] writes.
pub enum Piece<'a> {
    Plain(&'a [u8]),
    /// One byte sent as TCP urgent (out-of-band) data.
    Urgent(u8),
}

/// Writes `pieces` on `stream`, corked so that they leave in one segment: the receiver then
/// holds what follows an urgent byte behind the urgent mark when it reads. Linux stops a read
/// at that mark with the rest queued, and edge-triggered readiness brings no event for what is
/// left, so a reader that takes a short read for an empty socket stalls.
pub fn send_with_urgent_bytes(stream: &TcpStream, pieces: &[Piece<'_>]) -> io::Result<()> {
    use std::io::Write;
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_cork(true)?;
    let mut writer = stream;
    for piece in pieces {
        match piece {
            Piece::Plain(bytes) => writer.write_all(bytes)?,
            Piece::Urgent(byte) => {
                socket.send_out_of_band(&[*byte])?;
            }
        }
    }
    socket.set_tcp_cork(false)
}

/// A loopback port that refuses connections: bound once, then released.
pub fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok();
    let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    drop(listener);
    addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1)))
}

/// The path of one of this workspace's binaries (`origin`, `proxy`, `balancer`, `client`),
/// for tests in another package: next to the running test executable's `deps/` directory,
/// built once with the same profile if a `cargo test -p …` run did not build it.
pub fn workspace_bin(name: &str) -> io::Result<std::path::PathBuf> {
    use std::sync::Mutex;
    static BUILD: Mutex<()> = Mutex::new(());
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| io::Error::other("test executable has no target directory"))?
        .to_path_buf();
    let path = profile_dir.join(name);
    let _guard = BUILD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // Each binary lives in the package of the same name.
        build.args(["build", "-p", name, "--bin", name]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let output = build.output()?;
        if !output.status.success() || !path.exists() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(io::Error::other(format!("could not build {name} ({}): {stderr}", output.status)));
        }
    }
    Ok(path)
}

/// A free loopback port, for a service that must be restarted on the same port.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// SPEC 3.8 at one tier: sends `count` pipelined `line`s to the service at `addr` (process
/// `pid`) from a client that never reads, waits until `settled` says every answer the service
/// will make has completed (up to 20 s), and returns the service's RSS growth in KiB. The
/// client stays connected until then, so nothing it caused has been freed yet.
pub fn rss_growth_under_a_non_reading_client(
    addr: SocketAddr,
    pid: u32,
    line: &str,
    count: usize,
    mut settled: impl FnMut() -> bool,
) -> io::Result<u64> {
    let before = rss_kib(pid).ok_or_else(|| io::Error::other("RSS unreadable: /proc is needed for this test"))?;
    let mut hog = TcpStream::connect(addr)?;
    hog.write_all(line.repeat(count).as_bytes())?;
    if !wait_until(Duration::from_secs(20), &mut settled) {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "the service never settled"));
    }
    let after = rss_kib(pid).ok_or_else(|| io::Error::other("RSS unreadable"))?;
    drop(hog);
    Ok(after.saturating_sub(before))
}

/// A data directory holding `big.json`: a JSON string of `bytes` bytes.
pub fn data_dir_with_big_value(label: &str, bytes: usize) -> std::path::PathBuf {
    let dir = temp_dir(label);
    let value = format!("\"{}\"", "x".repeat(bytes.saturating_sub(2)));
    let _ = std::fs::write(dir.join("big.json"), value);
    dir
}

/// For fuzzing whole services and for the regression tests their crashers become: sends
/// `input` on a fresh connection to `addr`, closes the sending side, and reads until the
/// service closes the connection. A service that neither answers nor closes within `limit`
/// is an error (a hang).
pub fn exchange(addr: SocketAddr, input: &[u8], limit: Duration) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(limit))?;
    // The service may close early (a line too long): a failed write is not an error here.
    let _ = stream.write_all(input);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + limit;
    let mut output = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(output),
            Ok(n) => output.extend_from_slice(&buf[..n]),
            // A signal (libFuzzer's timers, say) is not the service's doing.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(output),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the service neither answered nor closed"))
            }
            Err(e) => return Err(e),
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the service kept the connection open"));
        }
    }
}

/// How many answers a service owes for `input` sent whole and then closed (SPEC 2): one per
/// non-blank line (the last, unterminated one included), up to and including a line longer
/// than `max_line`, after which the connection closes.
pub fn answers_owed(input: &[u8], max_line: usize) -> usize {
    let mut owed = 0;
    let mut parts = input.split(|b| *b == b'\n').peekable();
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        if last && part.is_empty() {
            break;
        }
        if part.len() > max_line {
            return owed + 1;
        }
        let line = part.strip_suffix(b"\r").unwrap_or(part);
        if !line.iter().all(|b| *b == b' ' || *b == b'\t') {
            owed += 1;
        }
    }
    owed
}

/// Checks a service's answers to `input` (from [`exchange`]): exactly [`answers_owed`] lines,
/// each a JSON object with a string `status` and a `data` field, and an `id`, where there is
/// one, a number or a string.
pub fn check_answers(input: &[u8], output: &[u8], max_line: usize) -> Result<(), String> {
    let owed = answers_owed(input, max_line);
    if !output.is_empty() && output.last() != Some(&b'\n') {
        return Err("the last answer is not a whole line".into());
    }
    let lines: Vec<&[u8]> = output.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    if lines.len() != owed {
        return Err(format!("{} answers to {owed} requests", lines.len()));
    }
    for line in lines {
        let answer: Value = serde_json::from_slice(line)
            .map_err(|e| format!("an answer is not JSON ({e}): {:?}", String::from_utf8_lossy(line)))?;
        if !answer["status"].is_string() || answer.get("data").is_none() {
            return Err(format!("an answer without status or data: {answer}"));
        }
        if let Some(id) = answer.get("id") {
            if !(id.is_number() || id.is_string()) {
                return Err(format!("an answer with an id that is neither number nor string: {answer}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_owed_follows_the_framing_rules() {
        assert_eq!(answers_owed(b"", 8), 0);
        assert_eq!(answers_owed(b"GET a\n", 8), 1);
        assert_eq!(answers_owed(b"GET a", 8), 1);
        assert_eq!(answers_owed(b"\n \t\r\n\nx\n", 8), 1);
        assert_eq!(answers_owed(b"a\n123456789\nb\n", 8), 2);
        assert_eq!(answers_owed(b"a\n123456789", 8), 2);
        assert_eq!(answers_owed(b"1234567\r\n", 8), 1);
        assert_eq!(answers_owed(b"12345678\r\n", 8), 1, "too long with its \\r: answered, then closed");
        assert!(check_answers(b"x\ny\n", b"{\"status\":\"OK\",\"data\":null}\n", 8).is_err());
        assert!(check_answers(b"x\n", b"{\"status\":\"OK\",\"data\":null,\"id\":[1]}\n", 8).is_err());
        assert!(check_answers(b"x\n", b"{\"status\":\"OK\",\"data\":null,\"id\":7}\n", 8).is_ok());
    }
}
