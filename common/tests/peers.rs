//! Peer connections on the mio driver, through the public `Service` API over real sockets:
//! every line a peer sends is delivered (even a burst bigger than the connection's
//! `max_line`), a peer the service closes says nothing more, and a connect that fails is
//! reported exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::peer::{PeerClosed, PeerEnd, PeerId, PeerLine};
use common::server::{ClientId, Ctx, Server, ServerConfig, Service};
use testkit::{send_with_urgent_bytes, wait_until, Piece, RunningServer};

#[derive(Debug, Default)]
struct Seen {
    connected: usize,
    lines: Vec<Vec<u8>>,
    closed: Vec<String>,
}

/// Connects to `target` on start; records what happens on that connection. With
/// `close_after`, closes the connection from inside the `close_after`-th line.
struct Toy {
    target: SocketAddr,
    max_line: usize,
    close_after: Option<usize>,
    /// Bytes queued for the peer once connected.
    send_on_connect: usize,
    seen: Arc<Mutex<Seen>>,
}

impl Service for Toy {
    type Timer = ();

    fn on_start(&mut self, ctx: &mut Ctx<()>) {
        ctx.connect(self.target, self.max_line);
    }

    fn on_line(&mut self, ctx: &mut Ctx<()>, client: ClientId, _line: &[u8]) {
        ctx.reply(client, true, |out| out.extend_from_slice(b"?\n"));
    }

    fn on_timer(&mut self, _ctx: &mut Ctx<()>, _timer: ()) {}

    fn on_peer_connected(&mut self, ctx: &mut Ctx<()>, peer: PeerId) {
        if let Some(out) = ctx.peer_output(peer) {
            out.resize(out.len() + self.send_on_connect, b'r');
        }
        self.seen.lock().unwrap().connected += 1;
    }

    fn on_peer_line(&mut self, ctx: &mut Ctx<()>, peer: PeerId, line: PeerLine<'_>) {
        let mut seen = self.seen.lock().unwrap();
        seen.lines.push(line.bytes().to_vec());
        if self.close_after == Some(seen.lines.len()) {
            assert!(ctx.close_peer(peer));
        }
    }

    fn on_peer_closed(&mut self, _ctx: &mut Ctx<()>, _peer: PeerId, closed: PeerClosed) {
        let what = match closed.end {
            PeerEnd::ConnectFailed(_) => "connect failed",
            PeerEnd::Closed => "closed",
            PeerEnd::Failed(_) => "failed",
            PeerEnd::LineTooLong => "too long",
        };
        self.seen.lock().unwrap().closed.push(what.into());
    }
}

fn start(target: SocketAddr, max_line: usize, close_after: Option<usize>) -> (RunningServer, Arc<Mutex<Seen>>) {
    start_sending(target, max_line, close_after, 0)
}

fn start_sending(
    target: SocketAddr,
    max_line: usize,
    close_after: Option<usize>,
    send_on_connect: usize,
) -> (RunningServer, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    let server = Server::bind(ServerConfig::default(), move |_| {
        Ok(Toy { target, max_line, close_after, send_on_connect, seen: shared })
    })
    .unwrap();
    (RunningServer::start(server), seen)
}

fn lines(n: usize, len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(n * (len + 1));
    for i in 0..n {
        let mut line = format!("{i:0len$}").into_bytes();
        line.truncate(len);
        bytes.extend_from_slice(&line);
        bytes.push(b'\n');
    }
    bytes
}

/// Reading stops early once more than `max_line` bytes are buffered (to report a line too
/// long without reading on forever). With short lines that is after the first read: what the
/// socket still held was never read, and with edge-triggered readiness no event came for it.
#[test]
fn a_burst_of_short_lines_bigger_than_max_line_is_all_delivered() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (server, seen) = start(listener.local_addr().unwrap(), 100, None);
    let (mut origin, _) = listener.accept().unwrap();
    // 4,096 lines of 63 bytes: 256 KiB, far more than one read takes.
    let n = 4096;
    origin.write_all(&lines(n, 63)).unwrap();
    // The connection stays open: no end of stream comes to wake the reader.
    let all = wait_until(Duration::from_secs(5), || seen.lock().unwrap().lines.len() >= n);
    let got = seen.lock().unwrap().lines.len();
    assert!(all, "{got} of {n} lines delivered");
    let seen = seen.lock().unwrap();
    assert!(seen.lines.iter().all(|l| l.len() == 63));
    assert!(seen.closed.is_empty(), "{:?}", seen.closed);
    drop(seen);
    drop(server);
}

/// Urgent bytes from a peer are ordinary bytes of its lines, each where it was sent, and the
/// lines behind them (past the urgent mark a read stops at) are delivered.
#[test]
fn urgent_bytes_from_a_peer_stay_in_its_lines() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (server, seen) = start(listener.local_addr().unwrap(), 100, None);
    let (origin, _) = listener.accept().unwrap();
    let pieces = [
        Piece::Plain(b"value 1"),
        Piece::Urgent(b'!'),
        Piece::Plain(b"a\nvalue 2"),
        Piece::Urgent(b'?'),
        Piece::Plain(b"b\nvalue 3\n"),
    ];
    send_with_urgent_bytes(&origin, &pieces).unwrap();
    let all = wait_until(Duration::from_secs(5), || seen.lock().unwrap().lines.len() >= 3);
    let s = seen.lock().unwrap();
    assert!(all, "{:?}", s.lines);
    assert_eq!(s.lines, vec![b"value 1!a".to_vec(), b"value 2?b".to_vec(), b"value 3".to_vec()]);
    drop(s);
    drop(server);
}

/// A service that closes a peer inside `on_peer_line` hears nothing more of it: no further
/// line (even those read with it) and no `on_peer_closed`; and its socket is closed.
#[test]
fn a_peer_closed_inside_its_line_says_nothing_more() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (server, seen) = start(listener.local_addr().unwrap(), 1024, Some(3));
    let (mut origin, _) = listener.accept().unwrap();
    origin.write_all(&lines(100, 10)).unwrap();
    // Its socket is closed: the origin reads end of stream.
    origin.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = origin.read_to_end(&mut rest);
    assert!(wait_until(Duration::from_secs(5), || seen.lock().unwrap().lines.len() >= 3));
    let more = wait_until(Duration::from_millis(300), || {
        let s = seen.lock().unwrap();
        s.lines.len() > 3 || !s.closed.is_empty()
    });
    let s = seen.lock().unwrap();
    assert!(!more, "after close_peer: {} lines, closed {:?}", s.lines.len(), s.closed);
    assert_eq!(s.connected, 1);
    drop(s);
    drop(server);
}

/// A connect that fails (here at once: no route to a broadcast address) is reported once.
#[test]
fn a_connect_that_fails_is_reported_once() {
    let (server, seen) = start("255.255.255.255:9".parse().unwrap(), 1024, None);
    assert!(wait_until(Duration::from_secs(5), || !seen.lock().unwrap().closed.is_empty()));
    let more = wait_until(Duration::from_millis(300), || seen.lock().unwrap().closed.len() > 1);
    let s = seen.lock().unwrap();
    assert!(!more, "{:?}", s.closed);
    assert_eq!(s.closed, vec!["connect failed".to_string()]);
    assert_eq!(s.connected, 0);
    drop(s);
    drop(server);
}

/// Lines then end of stream in the middle of a line: the complete lines, then `Closed`.
#[test]
fn lines_before_an_end_mid_line_are_delivered_then_the_end() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (server, seen) = start(listener.local_addr().unwrap(), 1024, None);
    let (mut origin, _) = listener.accept().unwrap();
    origin.write_all(b"one\ntwo\r\nthr").unwrap();
    drop(origin);
    assert!(wait_until(Duration::from_secs(5), || !seen.lock().unwrap().closed.is_empty()));
    let s = seen.lock().unwrap();
    assert_eq!(s.lines, vec![b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(s.closed, vec!["closed".to_string()]);
    drop(s);
    drop(server);
}

/// Complete lines still unread when the peer resets are delivered before the end.
#[test]
fn lines_before_a_reset_are_delivered_then_the_end() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (server, seen) = start(listener.local_addr().unwrap(), 1024, None);
    let (origin, _) = listener.accept().unwrap();
    let origin = socket2::Socket::from(origin);
    (&origin).write_all(&lines(50, 10)).unwrap();
    origin.set_linger(Some(Duration::ZERO)).unwrap();
    drop(origin);
    assert!(wait_until(Duration::from_secs(5), || !seen.lock().unwrap().closed.is_empty()));
    let s = seen.lock().unwrap();
    assert_eq!(s.closed.len(), 1, "{:?}", s.closed);
    // What arrived before the reset may be discarded by the kernel; what is delivered is in
    // order and whole.
    assert!(s.lines.iter().enumerate().all(|(i, l)| *l == format!("{i:010}").into_bytes()));
    drop(s);
    drop(server);
}

/// A peer that answers and then resets (it closes with requests unread) while the service
/// still has output for it that the socket would not take: the answers it sent before the
/// reset are delivered, then the end — the failed write does not hide them.
#[test]
fn answers_before_a_reset_are_delivered_though_output_was_pending() {
    for round in 0..10 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (server, seen) = start_sending(listener.local_addr().unwrap(), 1024, None, 64 << 20);
        let (mut origin, _) = listener.accept().unwrap();
        assert!(wait_until(Duration::from_secs(5), || seen.lock().unwrap().connected == 1));
        // Some of what the service sends, so that its output is surely pending.
        let mut some = vec![0; 1 << 20];
        origin.read_exact(&mut some).unwrap();
        origin.write_all(&lines(3, 10)).unwrap();
        // Closing with bytes unread resets the connection.
        drop(origin);
        assert!(wait_until(Duration::from_secs(5), || !seen.lock().unwrap().closed.is_empty()));
        let s = seen.lock().unwrap();
        assert_eq!(s.lines.len(), 3, "round {round}: lines {:?}, closed {:?}", s.lines.len(), s.closed);
        drop(s);
        drop(server);
    }
}
